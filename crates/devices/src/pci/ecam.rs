//! The enhanced configuration access mechanism (ECAM): every function's configuration
//! space as 4 KiB of memory at `base + (bus << 20 | slot << 15 | function << 12)`, so that
//! one MMIO access reads or writes a register where mechanism #1 takes two port accesses
//! (the address latch, then the data port). The guest learns the window from the ACPI
//! MCFG table; the bus decodes it into the same [`ConfigAddress`] the ports decode to.
use std::sync::atomic::{AtomicU64, Ordering};

/// Configuration space of one function in the window.
pub const FUNCTION_SIZE: u64 = 4096;
/// One bus: 32 slots of 8 functions.
pub const BUS_SIZE: u64 = 1 << 20;

/// One register access's target, whichever mechanism carried it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigAddress {
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
    /// Byte offset in the function's configuration space (0..4096).
    pub offset: u16,
}

/// Where the window lies: buses `0..buses`, 1 MiB each, from `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EcamWindow {
    pub base: u64,
    pub buses: u16,
}

/// Why an access inside the window selects no register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadAccess {
    #[error("a {len}-byte access (only 1, 2 and 4 bytes are registers)")]
    Size { len: usize },
    #[error("a {len}-byte access at offset {offset:#x}, not aligned to its size")]
    Unaligned { len: usize, offset: u64 },
}

impl EcamWindow {
    /// A window of `buses` buses (1..=256) at `base`, which must be aligned to the
    /// window's 1 MiB granule (MCFG gives bus 0's address).
    pub fn new(base: u64, buses: u16) -> Result<Self, String> {
        if !(1..=256).contains(&buses) {
            return Err(format!("an ECAM window holds 1 to 256 buses, not {buses}"));
        }
        if !base.is_multiple_of(BUS_SIZE) {
            return Err(format!(
                "an ECAM window starts on a 1 MiB boundary, not at {base:#x}"
            ));
        }
        let w = Self { base, buses };
        if base.checked_add(w.size()).is_none() {
            return Err(format!(
                "an ECAM window of {buses} buses at {base:#x} passes the end of the address space"
            ));
        }
        Ok(w)
    }

    pub fn size(&self) -> u64 {
        u64::from(self.buses) * BUS_SIZE
    }

    /// The last bus the window covers (MCFG's end bus number).
    pub fn end_bus(&self) -> u8 {
        (self.buses - 1) as u8
    }

    pub fn contains(&self, addr: u64) -> bool {
        addr.checked_sub(self.base).is_some_and(|o| o < self.size())
    }

    /// The register a `len`-byte access at `addr` (inside the window) selects. A register
    /// access is 1, 2 or 4 bytes, naturally aligned, so it never spans two registers or
    /// two functions.
    pub fn decode(&self, addr: u64, len: usize) -> Result<ConfigAddress, BadAccess> {
        let at = addr - self.base;
        if !matches!(len, 1 | 2 | 4) {
            return Err(BadAccess::Size { len });
        }
        if !at.is_multiple_of(len as u64) {
            return Err(BadAccess::Unaligned { len, offset: at });
        }
        Ok(ConfigAddress {
            bus: (at >> 20) as u8,
            slot: ((at >> 15) & 0x1f) as u8,
            function: ((at >> 12) & 0x7) as u8,
            offset: (at & 0xfff) as u16,
        })
    }
}

/// Configuration accesses the bus served, by mechanism: each is one exit of a vCPU (a
/// port or an MMIO exit), which is what makes the mechanisms differ in cost.
#[derive(Debug, Default)]
pub struct ConfigCounters {
    /// Accesses to ports 0xcf8-0xcff.
    pub ports: AtomicU64,
    /// Accesses inside the ECAM window, well-formed or not.
    pub ecam: AtomicU64,
    /// ECAM accesses that selected no register (wrong size or alignment).
    pub bad: AtomicU64,
}

impl ConfigCounters {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub(crate) fn bump(c: &AtomicU64) -> u64 {
        c.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Whether the `n`th bad access (1-based) gets a log line: the first eight, then every
/// power of two, so a guest hammering the window cannot flood the log.
pub(crate) fn worth_logging(n: u64) -> bool {
    n <= 8 || n.is_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_decode_to_bus_slot_function_and_offset() {
        let w = EcamWindow::new(0xfe00_0000, 2).unwrap();
        assert_eq!(w.size(), 2 << 20);
        assert_eq!(w.end_bus(), 1);
        assert!(w.contains(0xfe00_0000) && w.contains(0xfe1f_ffff));
        assert!(!w.contains(0xfdff_ffff) && !w.contains(0xfe20_0000));
        let a = w.decode(0xfe00_0000 | 1 << 20 | 3 << 15 | 5 << 12 | 0x44, 4);
        assert_eq!(
            a,
            Ok(ConfigAddress {
                bus: 1,
                slot: 3,
                function: 5,
                offset: 0x44
            })
        );
        assert_eq!(w.decode(0xfe00_0ffe, 2).unwrap().offset, 0xffe);
        assert_eq!(w.decode(0xfe00_0fff, 1).unwrap().offset, 0xfff);
    }

    #[test]
    fn odd_sizes_and_unaligned_accesses_select_nothing() {
        let w = EcamWindow::new(0xfe00_0000, 1).unwrap();
        assert_eq!(
            w.decode(0xfe00_0002, 4),
            Err(BadAccess::Unaligned { len: 4, offset: 2 })
        );
        assert_eq!(
            w.decode(0xfe00_0001, 2),
            Err(BadAccess::Unaligned { len: 2, offset: 1 })
        );
        assert_eq!(w.decode(0xfe00_0000, 8), Err(BadAccess::Size { len: 8 }));
        assert_eq!(w.decode(0xfe00_0000, 3), Err(BadAccess::Size { len: 3 }));
        assert_eq!(w.decode(0xfe00_0000, 0), Err(BadAccess::Size { len: 0 }));
    }

    #[test]
    fn windows_are_checked() {
        assert!(EcamWindow::new(0xfe00_0000, 0).is_err());
        assert!(EcamWindow::new(0xfe00_0000, 257).is_err());
        assert_eq!(
            EcamWindow::new(0xfe08_0000, 1).unwrap_err(),
            "an ECAM window starts on a 1 MiB boundary, not at 0xfe080000"
        );
        assert!(EcamWindow::new(u64::MAX - (1 << 20) + 1, 2).is_err());
        assert!(EcamWindow::new(0xe000_0000, 256).is_ok());
    }

    #[test]
    fn bad_accesses_are_logged_sparingly() {
        let logged: Vec<u64> = (1..=5000).filter(|&n| worth_logging(n)).collect();
        assert_eq!(
            logged,
            vec![1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
        );
    }
}
