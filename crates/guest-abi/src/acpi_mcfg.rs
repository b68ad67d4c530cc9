//! Reading the ACPI MCFG table: where each PCI segment's configuration space is mapped
//! (ECAM). For rayvisor's guest, which reads configuration space through the window when
//! the table is there, and for the VMM's tests of the table it writes. Byte slices in,
//! values out: no allocation, no unsafe.

use crate::acpi_numa::HEADER_LEN;

/// One configuration space allocation: buses `start_bus..=end_bus` of PCI segment
/// `segment`, bus `b`'s 1 MiB at `base + (b << 20)` (the base is bus 0's address, also
/// when `start_bus` is not 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct McfgEntry {
    pub base: u64,
    pub segment: u16,
    pub start_bus: u8,
    pub end_bus: u8,
}

/// Where the allocations start: after the header and 8 reserved bytes.
const FIRST: usize = HEADER_LEN + 8;
const ENTRY_LEN: usize = 16;

/// The allocations an MCFG lists (a trailing partial entry is ignored).
pub fn mcfg_entries(mcfg: &[u8]) -> impl Iterator<Item = McfgEntry> + '_ {
    mcfg.get(FIRST..)
        .unwrap_or(&[])
        .chunks_exact(ENTRY_LEN)
        .map(|e| McfgEntry {
            base: u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]),
            segment: u16::from_le_bytes([e[8], e[9]]),
            start_bus: e[10],
            end_bus: e[11],
        })
}

/// The allocation holding bus 0 of segment 0, where rayvisor's guest looks for its bus.
pub fn segment0_bus0(mcfg: &[u8]) -> Option<McfgEntry> {
    mcfg_entries(mcfg).find(|e| e.segment == 0 && e.start_bus == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(u64, u16, u8, u8)], tail: usize) -> [u8; 128] {
        let mut t = [0u8; 128];
        t[..4].copy_from_slice(b"MCFG");
        let mut at = FIRST;
        for &(base, seg, start, end) in entries {
            t[at..at + 8].copy_from_slice(&base.to_le_bytes());
            t[at + 8..at + 10].copy_from_slice(&seg.to_le_bytes());
            t[at + 10] = start;
            t[at + 11] = end;
            at += ENTRY_LEN;
        }
        let len = (at + tail) as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t
    }

    #[test]
    fn entries_read_back_and_segment_0_bus_0_is_found() {
        let t = table(&[(0xe000_0000, 1, 0, 255), (0xfe00_0000, 0, 0, 0)], 0);
        let len = FIRST + 2 * ENTRY_LEN;
        let all: [McfgEntry; 2] = {
            let mut it = mcfg_entries(&t[..len]);
            [it.next().unwrap(), it.next().unwrap()]
        };
        assert_eq!(
            all[0],
            McfgEntry {
                base: 0xe000_0000,
                segment: 1,
                start_bus: 0,
                end_bus: 255
            }
        );
        assert_eq!(mcfg_entries(&t[..len]).count(), 2);
        assert_eq!(segment0_bus0(&t[..len]), Some(all[1]));
    }

    #[test]
    fn short_tables_and_partial_entries_give_nothing_wrong() {
        let t = table(&[(0xfe00_0000, 0, 0, 0)], 0);
        assert_eq!(mcfg_entries(&t[..FIRST + ENTRY_LEN - 1]).count(), 0);
        assert_eq!(mcfg_entries(&t[..HEADER_LEN]).count(), 0);
        assert_eq!(mcfg_entries(&t[..10]).count(), 0);
        // A bus range that does not start at 0 does not hold bus 0.
        let t = table(&[(0xfe00_0000, 0, 1, 4), (0xfd00_0000, 0, 0, 0)], 0);
        assert_eq!(
            segment0_bus0(&t[..FIRST + 2 * ENTRY_LEN]).unwrap().base,
            0xfd00_0000
        );
    }
}
