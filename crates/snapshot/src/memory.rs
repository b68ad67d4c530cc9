//! Where guest memory comes from and goes to, independent of how the VMM holds it.
//!
//! The VMM describes guest RAM as a `MemoryLayout` (regions by guest-physical address; x86
//! RAM has a hole below 4 GiB) and hands it over through `MemorySource`. `GuestSlices`
//! implements it for host slices, which is what a VMM with mmapped guest memory has.
use serde::{Deserialize, Serialize};

/// Snapshot page size: guest pages are 4 KiB, and so are KVM dirty-log bits.
pub const PAGE_SIZE: u64 = 4096;

/// Largest guest memory a manifest may describe: the manifest is untrusted, and restore
/// and merge size buffers and files from it.
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;

/// One region of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub gpa: u64,
    pub len: u64,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE
    }
}

/// Guest RAM as regions sorted by address, page aligned, not overlapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryLayout {
    pub regions: Vec<Region>,
}

impl MemoryLayout {
    /// Builds and checks a layout from `(gpa, len)` pairs.
    pub fn new(regions: &[(u64, u64)]) -> Result<MemoryLayout, String> {
        let layout = MemoryLayout {
            regions: regions
                .iter()
                .map(|&(gpa, len)| Region { gpa, len })
                .collect(),
        };
        layout.check()?;
        Ok(layout)
    }

    /// Checks the layout's invariants; the error says which region breaks which.
    pub fn check(&self) -> Result<(), String> {
        let mut prev_end = 0u64;
        let mut total = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if !r.gpa.is_multiple_of(PAGE_SIZE) || !r.len.is_multiple_of(PAGE_SIZE) || r.len == 0 {
                return Err(format!(
                    "region {i} (gpa {:#x}, {} bytes) is empty or not 4 KiB aligned",
                    r.gpa, r.len
                ));
            }
            let end = r.gpa.checked_add(r.len).ok_or_else(|| {
                format!("region {i} (gpa {:#x}, {} bytes) overflows", r.gpa, r.len)
            })?;
            if i > 0 && r.gpa < prev_end {
                return Err(format!(
                    "region {i} at gpa {:#x} overlaps or precedes the one ending at {prev_end:#x}",
                    r.gpa
                ));
            }
            prev_end = end;
            total += r.len;
            if total > MAX_MEMORY_BYTES {
                return Err(format!(
                    "the regions add up to more than {MAX_MEMORY_BYTES} bytes"
                ));
            }
        }
        Ok(())
    }

    /// Sum of region lengths.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// One past the highest guest address: the size of the sparse memory file.
    pub fn end(&self) -> u64 {
        self.regions.last().map_or(0, |r| r.end())
    }

    /// The index of the region holding all of `gpa..gpa + len`, if one does.
    pub fn find(&self, gpa: u64, len: u64) -> Option<usize> {
        let end = gpa.checked_add(len)?;
        self.regions
            .iter()
            .position(|r| r.gpa <= gpa && end <= r.end())
    }
}

/// Guest memory to snapshot. The VM is paused while a snapshot is written, so reads see a
/// consistent image.
pub trait MemorySource {
    fn layout(&self) -> MemoryLayout;
    /// Fills `buf` with guest memory from `gpa`; the range lies inside one region.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Whether `gpa..gpa + len` is known to be all zero without reading it (memory the
    /// guest never touched). Writers skip such ranges; `false` is always correct.
    fn known_zero(&self, _gpa: u64, _len: u64) -> bool {
        false
    }
    /// `gpa..gpa + len` in place, when the source can lend it without a copy (and without
    /// side effects such as faulting in memory the guest never touched); `None` makes the
    /// writer `read` it instead.
    fn borrow(&self, _gpa: u64, _len: u64) -> Option<&[u8]> {
        None
    }
}

/// Guest memory as host slices, one per region: what a VMM with mmapped RAM holds.
pub struct GuestSlices<'a> {
    slices: Vec<(u64, &'a [u8])>,
}

impl<'a> GuestSlices<'a> {
    /// `slices` are `(gpa, memory)` pairs; their layout must pass `MemoryLayout::check`.
    pub fn new(slices: Vec<(u64, &'a [u8])>) -> Result<Self, String> {
        let s = GuestSlices { slices };
        s.layout().check()?;
        Ok(s)
    }
}

impl MemorySource for GuestSlices<'_> {
    fn layout(&self) -> MemoryLayout {
        MemoryLayout {
            regions: self
                .slices
                .iter()
                .map(|(gpa, s)| Region {
                    gpa: *gpa,
                    len: s.len() as u64,
                })
                .collect(),
        }
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let (start, s) = self
            .slices
            .iter()
            .find(|(start, s)| *start <= gpa && gpa - *start < s.len() as u64)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("guest address {gpa:#x} is outside guest memory"),
                )
            })?;
        let off = (gpa - start) as usize;
        let src = s.get(off..off + buf.len()).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} bytes at {gpa:#x} cross the end of a region", buf.len()),
            )
        })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn borrow(&self, gpa: u64, len: u64) -> Option<&[u8]> {
        let (start, s) = self
            .slices
            .iter()
            .find(|(start, s)| *start <= gpa && gpa - *start < s.len() as u64)?;
        let off = (gpa - start) as usize;
        s.get(off..off.checked_add(len as usize)?)
    }
}

/// Guest memory owned by this process: what `materialize` fills and `merge` uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedMemory {
    pub regions: Vec<(u64, Vec<u8>)>,
}

impl OwnedMemory {
    /// Zeroed memory for `layout`, refusing (instead of aborting) if it cannot be allocated.
    pub fn zeroed(layout: &MemoryLayout) -> Result<OwnedMemory, String> {
        let mut regions = Vec::with_capacity(layout.regions.len());
        for r in &layout.regions {
            let mut v = Vec::new();
            v.try_reserve_exact(r.len as usize).map_err(|e| {
                format!(
                    "cannot allocate {} bytes for region at {:#x}: {e}",
                    r.len, r.gpa
                )
            })?;
            v.resize(r.len as usize, 0);
            regions.push((r.gpa, v));
        }
        Ok(OwnedMemory { regions })
    }

    /// Borrows the regions as `(gpa, &mut [u8])`, the form `RestorePlan` writes into.
    pub fn as_mut_slices(&mut self) -> Vec<(u64, &mut [u8])> {
        self.regions
            .iter_mut()
            .map(|(g, v)| (*g, v.as_mut_slice()))
            .collect()
    }

    pub fn as_source(&self) -> GuestSlices<'_> {
        GuestSlices {
            slices: self
                .regions
                .iter()
                .map(|(g, v)| (*g, v.as_slice()))
                .collect(),
        }
    }
}

/// The part of the caller's memory `targets` (`(gpa, slice)` per region) holding
/// `gpa..gpa + len`, if one slice holds all of it.
pub(crate) fn target_range<'t>(
    targets: &'t mut [(u64, &mut [u8])],
    gpa: u64,
    len: u64,
) -> Option<&'t mut [u8]> {
    targets.iter_mut().find_map(|(start, s)| {
        let off = gpa.checked_sub(*start)?;
        let end = off.checked_add(len)?;
        if end <= s.len() as u64 {
            s.get_mut(off as usize..end as usize)
        } else {
            None
        }
    })
}

/// Pages written since the parent snapshot, one bitmap per layout region.
///
/// The format is KVM's `KVM_GET_DIRTY_LOG`: for region `r`, bit `b` of word `w` (least
/// significant bit first) is the page at `gpa = r.gpa + (w * 64 + b) * 4096`. The VMM ORs in
/// the pages it wrote itself (virtio rings and buffers, loaded images), which KVM does not see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    pub regions: Vec<Vec<u64>>,
}

impl DirtyBitmap {
    /// An all-clean bitmap for `layout`.
    pub fn clean(layout: &MemoryLayout) -> DirtyBitmap {
        DirtyBitmap {
            regions: layout
                .regions
                .iter()
                .map(|r| vec![0u64; r.pages().div_ceil(64) as usize])
                .collect(),
        }
    }

    /// Marks every page touching `gpa..gpa + len` dirty; false if that is outside `layout`.
    pub fn mark(&mut self, layout: &MemoryLayout, gpa: u64, len: u64) -> bool {
        let Some(i) = layout.find(gpa, len) else {
            return false;
        };
        let Some(words) = self.regions.get_mut(i) else {
            return false;
        };
        let r = layout.regions[i];
        let first = (gpa - r.gpa) / PAGE_SIZE;
        let last = (gpa + len.max(1) - 1 - r.gpa) / PAGE_SIZE;
        for p in first..=last {
            if let Some(w) = words.get_mut((p / 64) as usize) {
                *w |= 1 << (p % 64);
            }
        }
        true
    }

    /// ORs `other` (e.g. KVM's log) into this bitmap (e.g. the VMM's own writes).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a |= *b;
            }
        }
    }

    pub fn is_dirty(&self, region: usize, page: u64) -> bool {
        self.regions
            .get(region)
            .and_then(|w| w.get((page / 64) as usize))
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Checks the bitmap has one bitmap per region, each long enough for its pages.
    pub fn check(&self, layout: &MemoryLayout) -> Result<(), String> {
        if self.regions.len() != layout.regions.len() {
            return Err(format!(
                "the dirty bitmap has {} regions, guest memory has {}",
                self.regions.len(),
                layout.regions.len()
            ));
        }
        for (i, (words, r)) in self.regions.iter().zip(&layout.regions).enumerate() {
            let need = r.pages().div_ceil(64) as usize;
            if words.len() < need {
                return Err(format!(
                    "the dirty bitmap of region {i} has {} words, its {} pages need {need}",
                    words.len(),
                    r.pages()
                ));
            }
        }
        Ok(())
    }

    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }
}

/// True if every byte of `buf` is zero. Compares 16-byte blocks, which the compiler
/// vectorizes: this runs over all of guest memory on every full snapshot.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(16);
    let words_zero = chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0);
    words_zero && chunks.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_checks() {
        assert!(MemoryLayout::new(&[(0, 0x1000), (0x10000, 0x2000)]).is_ok());
        assert!(MemoryLayout::new(&[(0, 0x1001)])
            .unwrap_err()
            .contains("aligned"));
        assert!(MemoryLayout::new(&[(0x2000, 0x1000), (0, 0x1000)])
            .unwrap_err()
            .contains("overlaps"));
        assert!(MemoryLayout::new(&[(u64::MAX - 0xfff, 0x2000)])
            .unwrap_err()
            .contains("overflows"));
    }

    #[test]
    fn dirty_bitmap_marks_pages_like_kvm() {
        let layout = MemoryLayout::new(&[(0, 0x10000), (0x100000, 0x100000)]).unwrap();
        let mut d = DirtyBitmap::clean(&layout);
        assert!(d.mark(&layout, 0x100000 + 65 * 4096 + 5, 4096));
        assert!(d.is_dirty(1, 65) && d.is_dirty(1, 66) && !d.is_dirty(1, 64));
        assert_eq!(d.regions[1][1], 0b110);
        assert!(!d.mark(&layout, 0x20000, 1));
        assert_eq!(d.count(), 2);
        assert!(d.check(&layout).is_ok());
    }

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 4096 + 3];
        assert!(is_zero(&b));
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
    }
}
