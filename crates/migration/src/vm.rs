//! What the VMM provides: control of the VM on each side. Guest memory is ray-memory's
//! [`GuestMemory`] view; dirty logs are its [`DirtyBitmap`].
//!
//! The drivers never touch KVM. The VMM implements these traits over its memory map,
//! `KVM_GET_DIRTY_LOG` and its vCPU threads; tests implement them over
//! [`ray_memory::OwnedMemory`] (`memvm`, feature `test-util`).

use ray_memory::{page_hash, DirtyBitmap, GuestMemory, GuestSpan, MemoryError, MemoryLayout};

use crate::protocol::RegionHash;

/// A VM operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("the VM could not {op}: {reason}")]
pub struct VmError {
    pub op: &'static str,
    pub reason: String,
}

/// The VM on the sending host (in the VM lifecycle state `MigrationSource`).
pub trait SourceVm {
    /// Starts dirty-page tracking (KVM_MEM_LOG_DIRTY_PAGES on every slot) and clears the log.
    fn start_dirty_log(&mut self) -> Result<(), VmError>;
    /// Pages written since the previous call (or since `start_dirty_log`), one
    /// [`ray_memory::PageBitmap`] per region of the guest memory's
    /// [`layout`](GuestMemory::layout), in its order, and clears them. Must include the VMM's
    /// own writes (virtio devices, etc.), not just the vCPUs'.
    fn dirty_log(&mut self) -> Result<DirtyBitmap, VmError>;
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
    /// The source copies these disks (`--copy-disks`): `(id, path)` of the file made here
    /// for each, which the VM's configuration must use instead of the source's path.
    /// Called once, before any block arrives; an error refuses the copy.
    fn disks_arrived(&mut self, disks: &[(String, std::path::PathBuf)]) -> Result<(), VmError> {
        let _ = disks;
        Ok(())
    }
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
    layout: MemoryLayout,
    page_size: usize,
    zero: u64,
    hashes: Vec<Vec<u64>>,
    /// Per region, the sum of [`mix`] over its pages that are not zero, kept up to date by
    /// every record so that the digest costs nothing inside the downtime (zero pages add
    /// nothing, so a fresh table starts at 0 without a pass over its pages).
    sums: Vec<u128>,
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
    /// Every page of `layout` starts as a zero page.
    pub fn new(layout: &MemoryLayout, page_size: usize) -> Self {
        let page_size = page_size.max(1);
        let zero = page_hash(&vec![0u8; page_size]);
        Self {
            hashes: layout
                .regions
                .iter()
                .map(|r| vec![zero; (r.len / page_size as u64) as usize])
                .collect(),
            sums: vec![0; layout.regions.len()],
            layout: layout.clone(),
            page_size,
            zero,
        }
    }

    /// (region, first page index) of `gpa`, which must be inside a region.
    fn locate(&self, gpa: u64) -> Option<(usize, usize)> {
        let r = self.layout.find(gpa, 1)?;
        let first = (gpa - self.layout.regions[r].gpa) / self.page_size as u64;
        Some((r, first as usize))
    }

    /// Hashes the whole pages of guest memory `span`, which starts at `gpa`, as they are now.
    pub fn record(&mut self, gpa: u64, span: GuestSpan<'_>) {
        if let Some((r, first)) = self.locate(gpa) {
            let ps = self.page_size;
            for (k, page) in span.chunks(ps).enumerate() {
                if page.len() == ps {
                    self.set(r, first + k, page.hash());
                }
            }
        }
    }

    /// Hashes `data`, whole pages starting at `gpa`, from a Rust buffer (pages copied out of
    /// guest memory, decompressed, or made up by a test).
    pub fn record_bytes(&mut self, gpa: u64, data: &[u8]) {
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
    /// placed through [`GuestMemory::write`], so the hash is of guest memory, not of the
    /// buffer they came from.
    pub fn record_from<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        gpa: u64,
        len: u64,
    ) -> Result<(), MemoryError> {
        let span = mem.span(gpa, len)?;
        self.record(gpa, span);
        Ok(())
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
        self.layout
            .regions
            .iter()
            .zip(&self.sums)
            .map(|(r, sum)| {
                let mut hash = [0u8; 32];
                hash[..16].copy_from_slice(&sum.to_le_bytes());
                RegionHash {
                    gpa: r.gpa,
                    size: r.len,
                    hash,
                }
            })
            .collect()
    }

    /// Reads every page not known to be zero and compares it with its recorded hash;
    /// returns the first page whose memory differs from what was recorded.
    pub fn first_difference<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
    ) -> Result<Option<u64>, MemoryError> {
        let ps = self.page_size;
        for (r, hashes) in self.layout.regions.iter().zip(&self.hashes) {
            let region = mem.span(r.gpa, (hashes.len() * ps) as u64)?;
            for ((p, &want), page) in hashes.iter().enumerate().zip(region.chunks(ps)) {
                let gpa = r.gpa + (p * ps) as u64;
                let got = if mem.known_zero(gpa, ps as u64) {
                    self.zero
                } else {
                    page.hash()
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
    use ray_memory::OwnedMemory;

    #[test]
    fn page_hashes_follow_records_and_digests_see_every_page() {
        let layout = MemoryLayout::new(&[(0, 0x4000), (0x10000, 0x2000)]).unwrap();
        let mut a = PageHashes::new(&layout, 0x1000);
        let b = PageHashes::new(&layout, 0x1000);
        assert_eq!(a.digests(), b.digests(), "fresh tables agree");
        assert_eq!(a.get(0x1000), Some(page_hash(&[0; 0x1000])));
        a.record_bytes(0x1000, &[7u8; 0x2000]);
        assert_eq!(a.get(0x2000), Some(page_hash(&[7; 0x1000])));
        assert_ne!(a.digests()[0], b.digests()[0]);
        assert_eq!(a.digests()[1], b.digests()[1], "other regions unchanged");
        a.record_bytes(0x1000, &[0u8; 0x1000]);
        a.record_zero(0x2000);
        assert_eq!(a.digests(), b.digests(), "zero pages hash like fresh ones");
        a.record_bytes(0x11000, &[1u8; 0x1000]);
        assert_ne!(a.digests()[1], b.digests()[1]);
        // The digest is of (index, hash) pairs: the same pages swapped differ.
        let (mut x, mut y) = (b.clone(), b.clone());
        x.record_bytes(0x0, &[1u8; 0x1000]);
        x.record_bytes(0x1000, &[2u8; 0x1000]);
        y.record_bytes(0x0, &[2u8; 0x1000]);
        y.record_bytes(0x1000, &[1u8; 0x1000]);
        assert_ne!(x.digests()[0], y.digests()[0]);
        // Kept up to date incrementally: equal to a table built from scratch.
        let mut z = PageHashes::new(&layout, 0x1000);
        z.record_bytes(0x1000, &[2u8; 0x1000]);
        z.record_bytes(0x0, &[1u8; 0x1000]);
        assert_eq!(x.digests(), z.digests());
        assert_eq!(a.get(0x9000), None, "outside every region");
    }

    #[test]
    fn spans_hash_like_the_bytes_they_hold() {
        let layout = MemoryLayout::new(&[(0, 0x4000), (0x10000, 0x2000)]).unwrap();
        let mem = OwnedMemory::zeroed(&layout).unwrap();
        mem.write(0x1000, &[1u8; 0x1000]).unwrap();
        mem.write(0x2000, &[2u8; 0x1000]).unwrap();
        mem.write(0x10000, &[3u8; 0x1000]).unwrap();
        let mut from_spans = PageHashes::new(&layout, 0x1000);
        from_spans.record(0x1000, mem.span(0x1000, 0x2000).unwrap());
        from_spans.record_from(&mem, 0x10000, 0x2000).unwrap();
        let mut from_bytes = PageHashes::new(&layout, 0x1000);
        from_bytes.record_bytes(0x1000, &[1u8; 0x1000]);
        from_bytes.record_bytes(0x2000, &[2u8; 0x1000]);
        from_bytes.record_bytes(0x10000, &[3u8; 0x1000]);
        assert_eq!(from_spans.digests(), from_bytes.digests());
        assert_eq!(from_spans.first_difference(&mem).unwrap(), None);
        mem.write(0x11008, &[9u8]).unwrap();
        assert_eq!(from_spans.first_difference(&mem).unwrap(), Some(0x11000));
        assert!(from_spans.record_from(&mem, 0x4000, 0x1000).is_err());
    }
}
