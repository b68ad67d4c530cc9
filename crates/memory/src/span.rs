//! [`GuestSpan`]: a stretch of guest memory as the host maps it, without a Rust reference.
//!
//! A running vCPU may write any guest page at any time. A `&[u8]` over such memory would
//! promise Rust that it does not change while borrowed, which is false, so guest memory is
//! reached only through raw spans: copies in and out (`memcpy` semantics, as vm-memory's
//! volatile slices have), volatile loads and stores for single values, fills, and I/O
//! vectors for the kernel to copy from or into.
//!
//! Hashing, zero checks and vectored writes need their bytes as a slice. They get it from
//! one place, [`GuestSpan::racy_bytes`] (private), whose contract is: the bytes may change
//! while read; the result then describes some mix of old and new contents, and whoever
//! relies on it must notice the change some other way (the dirty log marks the page, so it
//! is sent or saved again). That is the rule migration's pre-copy has always lived by.
use std::io::IoSlice;
use std::marker::PhantomData;

/// A host mapping of `len` bytes of guest memory, valid for `'a`.
#[derive(Clone, Copy, Debug)]
pub struct GuestSpan<'a> {
    ptr: *mut u8,
    len: usize,
    _memory: PhantomData<&'a ()>,
}

// SAFETY: a span is an address range in a mapping that outlives it; every access through it
// is a raw copy or volatile access that tolerates concurrent writers (see the module docs),
// so it may move to and be shared with other threads as the mapping itself is.
unsafe impl Send for GuestSpan<'_> {}
// SAFETY: as for Send.
unsafe impl Sync for GuestSpan<'_> {}

impl<'a> GuestSpan<'a> {
    /// A span over `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be mapped readable and writable for all of `'a` (guest memory
    /// mappings are never unmapped while a view of them lives).
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        Self {
            ptr,
            len,
            _memory: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// `len` bytes at `offset`, if they lie inside this span.
    pub fn sub(&self, offset: usize, len: usize) -> Option<GuestSpan<'a>> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `offset..end` lies inside this span, which is mapped for 'a.
        Some(unsafe { GuestSpan::new(self.ptr.add(offset), len) })
    }

    /// Consecutive pieces of `piece` bytes (the last may be shorter).
    pub fn chunks(&self, piece: usize) -> impl Iterator<Item = GuestSpan<'a>> + 'a {
        let (this, piece) = (*self, piece.max(1));
        (0..self.len)
            .step_by(piece)
            .filter_map(move |off| this.sub(off, piece.min(this.len - off)))
    }

    /// Copies the span into `buf`, which must have the span's length.
    pub fn copy_to(&self, buf: &mut [u8]) {
        assert_eq!(
            buf.len(),
            self.len,
            "copy_to: buffer and span lengths differ"
        );
        // SAFETY: the span is mapped readable for `len` bytes; `buf` is a distinct, writable
        // Rust buffer of the same length, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, buf.as_mut_ptr(), self.len) }
    }

    /// Appends the span's bytes to `buf` (one copy, no zero fill before it).
    pub fn append_to(&self, buf: &mut Vec<u8>) {
        buf.reserve(self.len);
        let at = buf.len();
        // SAFETY: the span is mapped readable for `len` bytes; `reserve` made room for
        // `len` more bytes after `at` in `buf`, a distinct Rust allocation, and the copy
        // initializes them before the length covers them.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr, buf.as_mut_ptr().add(at), self.len);
            buf.set_len(at + self.len);
        }
    }

    /// Copies `data`, which must have the span's length, into the span.
    pub fn copy_from(&self, data: &[u8]) {
        assert_eq!(
            data.len(),
            self.len,
            "copy_from: data and span lengths differ"
        );
        // SAFETY: the span is mapped writable for `len` bytes; `data` is a distinct Rust
        // buffer of the same length.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr, self.len) }
    }

    /// Copies another span of the same length into this one (guest to guest, or from a
    /// mapped file); the spans may overlap.
    pub fn copy_from_span(&self, src: &GuestSpan<'_>) {
        assert_eq!(src.len, self.len, "copy_from_span: lengths differ");
        // SAFETY: both spans are mapped for their length; `copy` allows overlap.
        unsafe { std::ptr::copy(src.ptr, self.ptr, self.len) }
    }

    /// Sets every byte to `byte`.
    pub fn fill(&self, byte: u8) {
        // SAFETY: the span is mapped writable for `len` bytes.
        unsafe { std::ptr::write_bytes(self.ptr, byte, self.len) }
    }

    /// A single value at `offset`, read once (volatile), as a device register or a ring
    /// index is read. None if it does not fit inside the span.
    pub fn load<T: Pod>(&self, offset: usize) -> Option<T> {
        let at = self.sub(offset, std::mem::size_of::<T>())?;
        // SAFETY: `at` covers size_of::<T>() mapped bytes; `Pod` types are valid for any bit
        // pattern; unaligned addresses are read bytewise by `read_unaligned` semantics
        // below, aligned ones with one volatile load.
        Some(unsafe {
            if at.ptr.align_offset(std::mem::align_of::<T>()) == 0 {
                std::ptr::read_volatile(at.ptr as *const T)
            } else {
                std::ptr::read_unaligned(at.ptr as *const T)
            }
        })
    }

    /// Writes a single value at `offset` once (volatile). False if it does not fit.
    pub fn store<T: Pod>(&self, offset: usize, value: T) -> bool {
        let Some(at) = self.sub(offset, std::mem::size_of::<T>()) else {
            return false;
        };
        // SAFETY: `at` covers size_of::<T>() mapped writable bytes.
        unsafe {
            if at.ptr.align_offset(std::mem::align_of::<T>()) == 0 {
                std::ptr::write_volatile(at.ptr as *mut T, value)
            } else {
                std::ptr::write_unaligned(at.ptr as *mut T, value)
            }
        }
        true
    }

    /// The one place guest memory is seen as a slice (see the module docs for the contract).
    fn racy_bytes(&self) -> &'a [u8] {
        // SAFETY: the span is mapped readable for `len` bytes for 'a. Concurrent writes by
        // vCPUs may change the bytes while the slice lives; every caller below only reads
        // them once (hash, zero check, the kernel's copy into a socket) and relies on the
        // dirty log, not on the bytes staying put, to learn of a change.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Whether every byte is zero (as read now).
    pub fn is_zero(&self) -> bool {
        is_zero(self.racy_bytes())
    }

    /// The XXH3-64 hash of the bytes (as read now): [`page_hash`] of a page.
    pub fn hash(&self) -> u64 {
        page_hash(self.racy_bytes())
    }

    /// The CRC-32 of the bytes (as read now).
    pub fn crc32(&self) -> u32 {
        crc32fast::hash(self.racy_bytes())
    }

    /// Feeds the bytes (as read now) to a CRC-32 in progress.
    pub fn crc32_update(&self, h: &mut crc32fast::Hasher) {
        h.update(self.racy_bytes());
    }

    /// An I/O vector over the span for a vectored write: the kernel copies the bytes as they
    /// are when it reads them.
    pub fn io_slice(&self) -> IoSlice<'a> {
        IoSlice::new(self.racy_bytes())
    }

    /// The span as a writable slice, for filling it from a reader (a socket, a file).
    ///
    /// # Safety
    /// Nothing else may read or write these bytes while the slice lives: no vCPU runs on
    /// this memory (a migration target before its switch-over, a VM being restored) and no
    /// other span over them is used.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &'a mut [u8] {
        // SAFETY: mapped writable for `len` bytes for 'a; exclusivity is the caller's.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Reads exactly the span's length from `r` into it.
    ///
    /// # Safety
    /// As for [`as_mut_slice`](Self::as_mut_slice).
    pub unsafe fn read_exact_from(&self, r: &mut impl std::io::Read) -> std::io::Result<()> {
        // SAFETY: forwarded to the caller.
        r.read_exact(unsafe { self.as_mut_slice() })
    }

    /// Writes the span (as read now) to `w`.
    pub fn write_all_to(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        w.write_all(self.racy_bytes())
    }
}

/// Plain data: any bit pattern is a valid value (integers and arrays of them).
///
/// # Safety
/// Implement only for types with no padding, no invalid bit patterns and no pointers.
pub unsafe trait Pod: Copy + 'static {}
macro_rules! pod {
    ($($t:ty),*) => { $(
        // SAFETY: primitive integers are valid for every bit pattern and have no padding.
        unsafe impl Pod for $t {}
    )* };
}
pod!(u8, u16, u32, u64, u128, i8, i16, i32, i64, i128);
// SAFETY: arrays of Pod are Pod (no padding between elements of these types).
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}

/// True if every byte of `buf` is zero. ORs each 64-byte block together without an early
/// exit inside it, which the compiler turns into vector ORs (about 3x the speed of a
/// compare per 16 bytes on a zero page): full snapshots and migrations run this over all
/// of guest memory.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    let blocks_zero = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0);
    blocks_zero && chunks.remainder().iter().all(|&b| b == 0)
}

/// The hash of one page: XXH3-64, fast enough (tens of GB/s) to run inline on every page a
/// migration sends and receives. It detects corruption and lost pages, not forgery.
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_copy_fill_load_store_and_hash() {
        let mut backing = vec![0u8; 8192];
        // SAFETY: `backing` outlives the span and nothing else touches it meanwhile.
        let s = unsafe { GuestSpan::new(backing.as_mut_ptr(), backing.len()) };
        assert!(s.is_zero());
        assert_eq!(s.hash(), page_hash(&[0u8; 8192]));
        let page = s.sub(4096, 4096).unwrap();
        assert!(s.sub(4097, 4096).is_none());
        page.copy_from(&[7u8; 4096]);
        let mut out = [0u8; 4096];
        page.copy_to(&mut out);
        assert_eq!(out, [7u8; 4096]);
        assert!(!s.is_zero() && s.sub(0, 4096).unwrap().is_zero());
        assert!(page.store(3, 0x1122_3344u32), "unaligned store");
        assert_eq!(page.load::<u32>(3), Some(0x1122_3344));
        assert!(page.store(8, 0xabcd_u64));
        assert_eq!(page.load::<u64>(8), Some(0xabcd));
        assert_eq!(page.load::<u64>(4092), None);
        assert_eq!(
            s.chunks(3000).map(|c| c.len()).collect::<Vec<_>>(),
            vec![3000, 3000, 2192]
        );
        page.fill(0);
        assert!(s.is_zero());
        assert_eq!(s.crc32(), crc32fast::hash(&[0u8; 8192]));
        let mut w = Vec::new();
        s.sub(0, 10).unwrap().write_all_to(&mut w).unwrap();
        assert_eq!(w, vec![0u8; 10]);
        let mut v = vec![5u8];
        page.sub(0, 3).unwrap().copy_from(&[1, 2, 3]);
        page.sub(0, 3).unwrap().append_to(&mut v);
        s.sub(0, 2).unwrap().append_to(&mut v);
        assert_eq!(v, [5, 1, 2, 3, 0, 0]);
        page.fill(0);
        let mut r: &[u8] = &[9u8; 16];
        // SAFETY: nothing else touches `backing` while the span fills.
        unsafe { s.sub(16, 16).unwrap().read_exact_from(&mut r).unwrap() };
        assert_eq!(s.load::<[u8; 16]>(16), Some([9u8; 16]));
        drop(backing);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        let mut b = [0u8; 4097];
        b[4096] = 1;
        assert!(!is_zero(&b));
        b[4096] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
        b[17] = 0;
        for i in [0, 63, 64, 4095] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
        assert!(is_zero(&b));
        assert!(is_zero(&[]));
    }
}
