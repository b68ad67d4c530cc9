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
    /// The hash of every region, as [`hash_regions_by_reading`] defines it. Both sides call
    /// it while the VM is paused, so its cost is downtime: a VMM may answer from chunk
    /// hashes it computed earlier and kept valid (the definition is per [`HASH_CHUNK`]
    /// so it can). The default reads all of memory.
    fn region_hashes(&self) -> Result<Vec<RegionHash>, MemoryError> {
        hash_regions_by_reading(self)
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

/// Memory is hashed in chunks of this many bytes (the last chunk of a region may be
/// shorter); a region's hash is BLAKE3 over the BLAKE3 hashes of its chunks in order.
pub const HASH_CHUNK: u64 = 64 << 10;

/// The hash of one chunk of memory.
pub fn chunk_hash(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// The hash of an all-zero chunk of `len` bytes (at most [`HASH_CHUNK`]), without memory.
pub fn zero_chunk_hash(len: usize) -> [u8; 32] {
    static FULL: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    static ZERO: [u8; HASH_CHUNK as usize] = [0; HASH_CHUNK as usize];
    let len = len.min(ZERO.len());
    if len == ZERO.len() {
        *FULL.get_or_init(|| chunk_hash(&ZERO))
    } else {
        chunk_hash(&ZERO[..len])
    }
}

/// A region's hash from its chunks' hashes, in order.
pub fn combine_chunks(
    region: &MemoryRegion,
    chunks: impl IntoIterator<Item = [u8; 32]>,
) -> RegionHash {
    // One update over all of them: BLAKE3 hashes many 1 KiB blocks in parallel (SIMD) only
    // when it gets them at once, and this runs inside the downtime.
    let chunks = chunks.into_iter();
    let mut all = Vec::with_capacity(chunks.size_hint().0 * 32);
    for c in chunks {
        all.extend_from_slice(&c);
    }
    RegionHash {
        gpa: region.gpa,
        size: region.size,
        hash: *blake3::hash(&all).as_bytes(),
    }
}

/// The hash of every region ([`GuestMemoryAccess::region_hashes`]). Both sides call it
/// while the VM is paused.
pub fn hash_regions<M: GuestMemoryAccess + ?Sized>(
    mem: &M,
) -> Result<Vec<RegionHash>, MemoryError> {
    mem.region_hashes()
}

/// The definition of the region hashes: every chunk read and hashed.
pub fn hash_regions_by_reading<M: GuestMemoryAccess + ?Sized>(
    mem: &M,
) -> Result<Vec<RegionHash>, MemoryError> {
    let mut buf = vec![0u8; HASH_CHUNK as usize];
    mem.regions()
        .into_iter()
        .map(|r| {
            let mut chunks = Vec::with_capacity(r.size.div_ceil(HASH_CHUNK) as usize);
            let mut off = 0u64;
            while off < r.size {
                let n = (r.size - off).min(HASH_CHUNK) as usize;
                mem.read(r.gpa + off, &mut buf[..n])?;
                chunks.push(chunk_hash(&buf[..n]));
                off += n as u64;
            }
            Ok(combine_chunks(&r, chunks))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunk_hashes_match_hashing_zeros() {
        assert_eq!(
            zero_chunk_hash(HASH_CHUNK as usize),
            chunk_hash(&[0; 65536])
        );
        assert_eq!(zero_chunk_hash(4096), chunk_hash(&[0; 4096]));
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
