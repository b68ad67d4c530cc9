//! Guest RAM as regions by guest-physical address (x86 RAM has a hole below 4 GiB).
use serde::{Deserialize, Serialize};

/// Guest page size: guest pages are 4 KiB, and so are KVM dirty-log bits.
pub const PAGE_SIZE: u64 = 4096;

/// Largest guest memory a layout may describe: layouts also come from untrusted files and
/// streams, and restore and merge size buffers and files from them.
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;

/// One region of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// Whether `gpa..gpa + len` lies inside this region.
    pub fn holds(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa && gpa.checked_add(len).is_some_and(|end| end <= self.end())
    }
}

/// A layout that breaks an invariant; the message names the region and the values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("region {index} (gpa {gpa:#x}, {len} bytes) is empty or not 4 KiB aligned")]
    Unaligned { index: usize, gpa: u64, len: u64 },
    #[error("region {index} (gpa {gpa:#x}, {len} bytes) overflows the address space")]
    Overflow { index: usize, gpa: u64, len: u64 },
    #[error("region {index} at gpa {gpa:#x} overlaps or precedes the one ending at {prev_end:#x}")]
    Overlap {
        index: usize,
        gpa: u64,
        prev_end: u64,
    },
    #[error("the regions add up to more than {MAX_MEMORY_BYTES} bytes")]
    TooLarge,
}

/// Guest RAM as regions sorted by address, page aligned, not overlapping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryLayout {
    pub regions: Vec<Region>,
}

impl MemoryLayout {
    /// Builds and checks a layout from `(gpa, len)` pairs.
    pub fn new(regions: &[(u64, u64)]) -> Result<MemoryLayout, LayoutError> {
        let layout = MemoryLayout {
            regions: regions
                .iter()
                .map(|&(gpa, len)| Region { gpa, len })
                .collect(),
        };
        layout.check()?;
        Ok(layout)
    }

    /// Checks the layout's invariants.
    pub fn check(&self) -> Result<(), LayoutError> {
        let mut prev_end = 0u64;
        let mut total = 0u64;
        for (index, r) in self.regions.iter().enumerate() {
            let (gpa, len) = (r.gpa, r.len);
            if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 {
                return Err(LayoutError::Unaligned { index, gpa, len });
            }
            let end = gpa
                .checked_add(len)
                .ok_or(LayoutError::Overflow { index, gpa, len })?;
            if index > 0 && gpa < prev_end {
                return Err(LayoutError::Overlap {
                    index,
                    gpa,
                    prev_end,
                });
            }
            prev_end = end;
            total += len;
            if total > MAX_MEMORY_BYTES {
                return Err(LayoutError::TooLarge);
            }
        }
        Ok(())
    }

    /// Sum of region lengths.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Sum of region pages.
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.pages()).sum()
    }

    /// One past the highest guest address: the size of a sparse memory file.
    pub fn end(&self) -> u64 {
        self.regions.last().map_or(0, |r| r.end())
    }

    /// The index of the region holding all of `gpa..gpa + len`, if one does.
    pub fn find(&self, gpa: u64, len: u64) -> Option<usize> {
        // Layouts have a handful of regions: a scan beats a binary search.
        self.regions.iter().position(|r| r.holds(gpa, len))
    }

    /// (region index, page index inside it) of the page holding `gpa`.
    pub fn locate(&self, gpa: u64) -> Option<(usize, u64)> {
        let i = self.find(gpa, 1)?;
        Some((i, (gpa - self.regions[i].gpa) / PAGE_SIZE))
    }

    /// Whether `other` describes the same regions.
    pub fn same_as(&self, other: &MemoryLayout) -> bool {
        self.regions == other.regions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_checks_name_what_is_wrong() {
        let ok = MemoryLayout::new(&[(0, 0x10000), (1 << 32, 0x2000)]).unwrap();
        assert_eq!(ok.total_bytes(), 0x12000);
        assert_eq!(ok.total_pages(), 0x12);
        assert_eq!(ok.end(), (1 << 32) + 0x2000);
        assert_eq!(ok.find(0xf000, 0x1000), Some(0));
        assert_eq!(ok.find(0xf000, 0x1001), None);
        assert_eq!(ok.locate((1 << 32) + 0x1fff), Some((1, 1)));
        assert_eq!(ok.locate(0x10000), None);
        let e = MemoryLayout::new(&[(0, 0x1001)]).unwrap_err();
        assert!(e.to_string().contains("not 4 KiB aligned"), "{e}");
        let e = MemoryLayout::new(&[(0x2000, 0x2000), (0x1000, 0x1000)]).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
        let e = MemoryLayout::new(&[(u64::MAX - 0xfff, 0x2000)]).unwrap_err();
        assert!(matches!(
            e,
            LayoutError::Unaligned { .. } | LayoutError::Overflow { .. }
        ));
        let e = MemoryLayout::new(&[(0, MAX_MEMORY_BYTES + PAGE_SIZE)]).unwrap_err();
        assert_eq!(e, LayoutError::TooLarge);
    }
}
