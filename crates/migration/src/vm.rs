//! What the VMM provides: guest memory access and control of the VM on each side.
//!
//! The drivers never touch KVM. The VMM implements these traits over its memory map,
//! `KVM_GET_DIRTY_LOG` and its vCPU threads; tests implement them over a `Vec<u8>`
//! ([`crate::memvm`]).

use crate::protocol::{MemoryRegion, RegionHash};

/// A guest memory access outside the map, or one the backend refused.
#[derive(Debug, thiserror::Error)]
#[error("guest memory access of {len} bytes at {gpa:#x} failed: {reason}")]
pub struct MemoryError {
    pub gpa: u64,
    pub len: usize,
    pub reason: String,
}

/// A VM operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("the VM could not {op}: {reason}")]
pub struct VmError {
    pub op: &'static str,
    pub reason: String,
}

/// Guest memory as the migration sees it. Shared with running vCPUs, hence `&self`.
pub trait GuestMemoryAccess: Sync {
    /// Every region, in a fixed order; dirty bitmaps follow the same order.
    fn regions(&self) -> Vec<MemoryRegion>;
    /// Copies `buf.len()` bytes at `gpa` into `buf`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError>;
    /// Copies `data` to `gpa`. The receiver calls it only for whole pages inside `regions()`.
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError>;
    /// Whether the page at `gpa` is known to hold only zeros without reading it (e.g. a
    /// hole in the memory file that was never written). The sender sends such pages as one
    /// bit and never touches them, so reading does not allocate them. Default: never known.
    fn known_zero(&self, gpa: u64) -> bool {
        let _ = gpa;
        false
    }
    /// Optional fast path for the sender: the guest's own bytes at `gpa..gpa + len`, so
    /// pages go from guest memory to the socket with the kernel's copy only. Running vCPUs
    /// may change them at any time: the sender reads each byte once (zero check, page
    /// hash, the kernel's copy) and relies on the dirty log to resend a page that changed
    /// meanwhile, never on two reads agreeing. `None` (the default): the sender copies
    /// with [`read`](Self::read).
    fn guest_bytes(&self, gpa: u64, len: usize) -> Option<&[u8]> {
        let _ = (gpa, len);
        None
    }
    /// Makes the `len` bytes (whole pages) at `gpa` zero, as for a page the sender marked
    /// zero. The default writes zeros; a backend that knows the pages are still untouched
    /// (fresh memory reads as zero) can skip them without allocating or scanning.
    fn write_zeros(&self, gpa: u64, len: usize) -> Result<(), MemoryError> {
        self.write(gpa, &vec![0u8; len])
    }
    /// Optional fast path for the receiver: calls `fill` once with the `len` guest bytes at
    /// `gpa` so it can write them in place (straight from the socket), saving the copy
    /// through a buffer that [`write`](Self::write) costs. Same rules as `write` (whole
    /// pages inside one region of `regions()`; writes count as dirty for the VMM); `fill`
    /// may leave the range partly written if the connection fails, and the receiver then
    /// discards the VM. Returns `Ok(false)` without calling `fill` when the backend has no
    /// such path (the default): the receiver falls back to `write`.
    fn fill_in_place(
        &self,
        gpa: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<bool, MemoryError> {
        let _ = (gpa, len, fill);
        Ok(false)
    }
}

/// The VM on the sending host (in the VM lifecycle state `MigrationSource`).
pub trait SourceVm {
    /// Starts dirty-page tracking (KVM_MEM_LOG_DIRTY_PAGES on every slot) and clears the log.
    fn start_dirty_log(&mut self) -> Result<(), VmError>;
    /// Pages written since the previous call (or since `start_dirty_log`), one bitmap per
    /// region in `regions()` order, and clears them. Must include the VMM's own writes
    /// (virtio devices, etc.), not just the vCPUs'.
    fn dirty_log(&mut self) -> Result<Vec<DirtyBitmap>, VmError>;
    fn stop_dirty_log(&mut self) -> Result<(), VmError>;
    /// Stops every vCPU and device that can write guest memory.
    fn pause(&mut self) -> Result<(), VmError>;
    fn resume(&mut self) -> Result<(), VmError>;
    /// Limits vCPUs to `100 - percent` % of their run time; 0 lifts the throttle.
    fn throttle(&mut self, percent: u8) -> Result<(), VmError>;
    /// vCPU, VM and device state, opaque to the migration; called while paused.
    fn save_state(&mut self) -> Result<Vec<u8>, VmError>;
}

/// The VM being built on the receiving host (in the VM lifecycle state `MigrationTarget`).
pub trait TargetVm {
    /// Applies the blob `save_state` produced on the source. Untrusted input: validate.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError>;
    /// Starts the vCPUs. Called at most once, only after the source relinquished the VM.
    fn resume(&mut self) -> Result<(), VmError>;
    /// Tears the half-built VM down (verification failed, or the source went away).
    fn discard(&mut self);
}

/// One bit per page of one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl DirtyBitmap {
    pub fn new(pages: usize) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    /// Every page set.
    pub fn full(pages: usize) -> Self {
        let mut b = Self::new(pages);
        for i in 0..pages {
            b.set(i);
        }
        b
    }

    /// Wraps a KVM-style bitmap (bit i of word i/64 = page i); bits past `pages` are dropped.
    pub fn from_words(mut words: Vec<u64>, pages: usize) -> Self {
        words.resize(pages.div_ceil(64), 0);
        if !pages.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        Self { words, pages }
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn set(&mut self, page: usize) {
        if page < self.pages {
            self.words[page / 64] |= 1 << (page % 64);
        }
    }

    pub fn get(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// ORs `other` in (same region, same size).
    pub fn union(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Indices of set pages, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + bit)
            })
        })
    }
}

/// The hash of one page: XXH3-64. Fast enough to run inline on every page sent and
/// received (tens of GB/s), which is what lets verification cost no extra pass over memory.
/// It detects corruption and lost pages, not deliberate forgery: integrity against an
/// attacker on the path needs MACed page frames (see [`crate::SenderConfig::crc_pages`]).
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// Hints the CPU to load the cache line at `at` for reading (a page the sender will check
/// and hash next). Never faults and changes nothing, whatever `at` is.
pub fn prefetch_read(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// Hints the CPU to load the cache line at `at` for writing (a page the receiver is about
/// to fill). Never faults and changes nothing, whatever `at` is.
pub fn prefetch_write(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    prefetch::<{ std::arch::x86_64::_MM_HINT_ET0 }>(at);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

#[cfg(target_arch = "x86_64")]
fn prefetch<const HINT: i32>(at: *const u8) {
    // SAFETY: a prefetch is only a hint: it never faults, whatever the address, and has no
    // architectural effect.
    unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(at.cast()) }
}

/// One hash per guest page, as last sent (source) or placed (target); what the
/// verification compares.
///
/// Source: the sender hashes every page it sends from the very bytes it sends; a page
/// changed after that is in the next dirty log and is sent (and hashed) again, the last
/// time while the VM is paused. Target: the receiver hashes every page right after placing
/// it in guest memory, from guest memory. Pages never sent are zero on both sides. So the
/// two tables agree exactly when the target's memory equals what the source last sent,
/// page for page; with `SenderConfig::recheck_memory` the source also rereads its paused
/// memory to prove the last sent bytes are its memory (that the dirty log missed nothing).
#[derive(Debug, Clone)]
pub struct PageHashes {
    regions: Vec<MemoryRegion>,
    page_size: usize,
    zero: u64,
    hashes: Vec<Vec<u64>>,
    /// Per region, the sum of [`mix`] over its pages that are not zero, kept up to date by
    /// every record so that the digest costs nothing inside the downtime (zero pages add
    /// nothing, so a fresh table starts at 0 without a pass over its pages).
    sums: Vec<u128>,
    scratch: Vec<u8>,
}

/// A page's hash bound to its index: two 64-bit lanes of XXH3 seeded by the index. Sums of
/// these change when any page's hash changes or moves (a multiset hash over (index, hash)).
fn mix(index: u64, hash: u64) -> u128 {
    let b = hash.to_le_bytes();
    let hi = xxhash_rust::xxh3::xxh3_64_with_seed(&b, index);
    let lo = xxhash_rust::xxh3::xxh3_64_with_seed(&b, !index);
    (u128::from(hi) << 64) | u128::from(lo)
}

impl PageHashes {
    /// Every page starts as a zero page.
    pub fn new(regions: &[MemoryRegion], page_size: usize) -> Self {
        let page_size = page_size.max(1);
        let zero = page_hash(&vec![0u8; page_size]);
        let pages = |r: &MemoryRegion| r.size / page_size as u64;
        Self {
            hashes: regions
                .iter()
                .map(|r| vec![zero; pages(r) as usize])
                .collect(),
            sums: vec![0; regions.len()],
            regions: regions.to_vec(),
            page_size,
            zero,
            scratch: Vec::new(),
        }
    }

    /// (region, first page index) of `gpa`, which must be inside a region.
    fn locate(&self, gpa: u64) -> Option<(usize, usize)> {
        self.regions
            .iter()
            .position(|r| gpa >= r.gpa && gpa - r.gpa < r.size)
            .map(|i| {
                (
                    i,
                    ((gpa - self.regions[i].gpa) / self.page_size as u64) as usize,
                )
            })
    }

    /// Hashes `data`, whole pages starting at `gpa`.
    pub fn record(&mut self, gpa: u64, data: &[u8]) {
        if let Some((r, first)) = self.locate(gpa) {
            for (k, page) in data.chunks_exact(self.page_size).enumerate() {
                self.set(r, first + k, page_hash(page));
            }
        }
    }

    fn set(&mut self, r: usize, page: usize, hash: u64) {
        let Some(slot) = self.hashes[r].get_mut(page) else {
            return;
        };
        if *slot != hash {
            let i = page as u64;
            let term = |h: u64| if h == self.zero { 0 } else { mix(i, h) };
            self.sums[r] = self.sums[r]
                .wrapping_sub(term(*slot))
                .wrapping_add(term(hash));
            *slot = hash;
        }
    }

    /// Hashes the `len` bytes (whole pages) at `gpa` as they are in `mem` now: for pages
    /// placed through [`GuestMemoryAccess::write`], so the hash is of guest memory, not of
    /// the buffer they came from.
    pub fn record_from<M: GuestMemoryAccess + ?Sized>(
        &mut self,
        mem: &M,
        gpa: u64,
        len: usize,
    ) -> Result<(), MemoryError> {
        if let Some(b) = mem.guest_bytes(gpa, len) {
            self.record(gpa, b);
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.scratch);
        buf.resize(len, 0);
        let r = mem.read(gpa, &mut buf);
        if r.is_ok() {
            self.record(gpa, &buf);
        }
        self.scratch = buf;
        r
    }

    /// The page at `gpa` is all zeros.
    pub fn record_zero(&mut self, gpa: u64) {
        if let Some((r, p)) = self.locate(gpa) {
            self.set(r, p, self.zero);
        }
    }

    /// The recorded hash of the page at `gpa`.
    pub fn get(&self, gpa: u64) -> Option<u64> {
        let (r, p) = self.locate(gpa)?;
        self.hashes[r].get(p).copied()
    }

    /// One digest per region: the sum of every non-zero page's hash mixed with its index (128 bits,
    /// little-endian, in the first 16 bytes of [`RegionHash::hash`], the rest zero). Kept
    /// up to date as pages are recorded, so taking it inside the downtime costs nothing.
    pub fn digests(&self) -> Vec<RegionHash> {
        self.regions
            .iter()
            .zip(&self.sums)
            .map(|(r, sum)| {
                let mut hash = [0u8; 32];
                hash[..16].copy_from_slice(&sum.to_le_bytes());
                RegionHash {
                    gpa: r.gpa,
                    size: r.size,
                    hash,
                }
            })
            .collect()
    }

    /// Reads every page not known to be zero and compares it with its recorded hash;
    /// returns the first page whose memory differs from what was recorded.
    pub fn first_difference<M: GuestMemoryAccess + ?Sized>(
        &self,
        mem: &M,
    ) -> Result<Option<u64>, MemoryError> {
        let mut buf = vec![0u8; self.page_size];
        for (r, hashes) in self.regions.iter().zip(&self.hashes) {
            for (p, &want) in hashes.iter().enumerate() {
                let gpa = r.gpa + (p * self.page_size) as u64;
                let got = if mem.known_zero(gpa) {
                    self.zero
                } else if let Some(b) = mem.guest_bytes(gpa, self.page_size) {
                    page_hash(b)
                } else {
                    mem.read(gpa, &mut buf)?;
                    page_hash(&buf)
                };
                if got != want {
                    return Ok(Some(gpa));
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_hashes_follow_records_and_digests_see_every_page() {
        let regions = [
            MemoryRegion {
                gpa: 0,
                size: 0x4000,
            },
            MemoryRegion {
                gpa: 0x10000,
                size: 0x2000,
            },
        ];
        let mut a = PageHashes::new(&regions, 0x1000);
        let b = PageHashes::new(&regions, 0x1000);
        assert_eq!(a.digests(), b.digests(), "fresh tables agree");
        assert_eq!(a.get(0x1000), Some(page_hash(&[0; 0x1000])));
        a.record(0x1000, &[7u8; 0x2000]);
        assert_eq!(a.get(0x2000), Some(page_hash(&[7; 0x1000])));
        assert_ne!(a.digests()[0], b.digests()[0]);
        assert_eq!(a.digests()[1], b.digests()[1], "other regions unchanged");
        a.record(0x1000, &[0u8; 0x1000]);
        a.record_zero(0x2000);
        assert_eq!(a.digests(), b.digests(), "zero pages hash like fresh ones");
        a.record(0x11000, &[1u8; 0x1000]);
        assert_ne!(a.digests()[1], b.digests()[1]);
        // The digest is of (index, hash) pairs: the same pages swapped differ.
        let (mut x, mut y) = (b.clone(), b.clone());
        x.record(0x0, &[1u8; 0x1000]);
        x.record(0x1000, &[2u8; 0x1000]);
        y.record(0x0, &[2u8; 0x1000]);
        y.record(0x1000, &[1u8; 0x1000]);
        assert_ne!(x.digests()[0], y.digests()[0]);
        // Kept up to date incrementally: equal to a table built from scratch.
        let mut z = PageHashes::new(&regions, 0x1000);
        z.record(0x1000, &[2u8; 0x1000]);
        z.record(0x0, &[1u8; 0x1000]);
        assert_eq!(x.digests(), z.digests());
        assert_eq!(a.get(0x9000), None, "outside every region");
    }

    #[test]
    fn bitmap_sets_counts_iterates_and_unions() {
        let mut a = DirtyBitmap::new(130);
        a.set(0);
        a.set(64);
        a.set(129);
        a.set(500); // out of range: ignored
        assert_eq!(a.count(), 3);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        let mut b = DirtyBitmap::new(130);
        b.set(1);
        b.union(&a);
        assert_eq!(b.count(), 4);
        assert!(b.get(1) && b.get(129) && !b.get(2) && !b.get(999));
        assert_eq!(DirtyBitmap::full(130).count(), 130);
        assert_eq!(
            DirtyBitmap::from_words(vec![u64::MAX, u64::MAX], 70).count(),
            70
        );
    }
}
