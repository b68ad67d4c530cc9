//! [`BarAllocator`]: places BARs in the guest-physical MMIO window, each naturally aligned.

/// A bump allocator over `[start, end)`. BARs are placed once, when devices are created
/// (no hot-unplug yet), so nothing is ever freed.
#[derive(Debug, Clone)]
pub struct BarAllocator {
    next: u64,
    end: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no room for a {size:#x}-byte BAR in the MMIO window (next free {next:#x}, end {end:#x})")]
pub struct NoRoom {
    pub size: u64,
    pub next: u64,
    pub end: u64,
}

impl BarAllocator {
    pub fn new(start: u64, end: u64) -> Self {
        Self { next: start, end }
    }

    /// `size` bytes (a power of two) aligned to `size`, as a BAR must be.
    pub fn allocate(&mut self, size: u64) -> Result<u64, NoRoom> {
        let no_room = || NoRoom {
            size,
            next: self.next,
            end: self.end,
        };
        if !size.is_power_of_two() {
            return Err(no_room());
        }
        let base = self
            .next
            .checked_next_multiple_of(size)
            .ok_or_else(no_room)?;
        let end = base.checked_add(size).ok_or_else(no_room)?;
        if end > self.end {
            return Err(no_room());
        }
        self.next = end;
        Ok(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_aligned_disjoint_and_bounded() {
        let mut a = BarAllocator::new(0xc000_1000, 0xc010_0000);
        assert_eq!(a.allocate(0x8000), Ok(0xc000_8000));
        assert_eq!(a.allocate(0x1000), Ok(0xc001_0000));
        assert_eq!(a.allocate(0x10_0000).unwrap_err().size, 0x10_0000);
        assert!(a.allocate(0x3000).is_err(), "not a power of two");
        assert_eq!(a.allocate(0x2000), Ok(0xc001_2000));
    }
}
