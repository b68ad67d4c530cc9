//! What the VMM tells us through the Linux zero page (`struct boot_params`): the e820
//! memory map and the kernel command line. Both are copied out at boot.

use core::cell::UnsafeCell;

const E820_COUNT: u64 = 0x1e8;
const E820_TABLE: u64 = 0x2d0;
const E820_MAX: usize = 128;
const CMD_LINE_PTR: u64 = 0x228;
const EXT_CMD_LINE_PTR: u64 = 0x0c8;
const CMDLINE_MAX: usize = 2048;
const ACPI_RSDP_ADDR: u64 = 0x070;

pub const E820_USABLE: u32 = 1;

#[derive(Clone, Copy, Debug)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl E820Entry {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

pub struct BootInfo {
    e820: [E820Entry; E820_MAX],
    e820_len: usize,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    rsdp: u64,
}

impl BootInfo {
    /// The ACPI RSDP's guest-physical address (0: the VMM gave none).
    pub fn rsdp(&self) -> u64 {
        self.rsdp
    }

    pub fn e820(&self) -> &[E820Entry] {
        &self.e820[..self.e820_len]
    }

    pub fn usable(&self) -> impl Iterator<Item = &E820Entry> {
        self.e820().iter().filter(|e| e.kind == E820_USABLE)
    }

    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("<not utf-8>")
    }

    /// Value of `key` (e.g. "ray.poll_ms=") on the command line, as a number.
    pub fn cmdline_u64(&self, key: &str) -> Option<u64> {
        self.cmdline_str(key).and_then(crate::shell::parse_number)
    }

    /// The value of `key` (which ends in `=`) on the command line, if present.
    pub fn cmdline_str(&self, key: &str) -> Option<&str> {
        self.cmdline()
            .split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(key))
    }

    /// True if [addr, addr+len) lies inside one usable e820 entry.
    pub fn is_usable(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.usable().any(|e| e.addr <= addr && end <= e.end())
    }
}

struct BootInfoCell(UnsafeCell<BootInfo>);

// SAFETY: written once by the BSP in `parse` before anything reads it; read-only after.
unsafe impl Sync for BootInfoCell {}

static BOOT_INFO: BootInfoCell = BootInfoCell(UnsafeCell::new(BootInfo {
    e820: [E820Entry {
        addr: 0,
        size: 0,
        kind: 0,
    }; E820_MAX],
    e820_len: 0,
    cmdline: [0; CMDLINE_MAX],
    cmdline_len: 0,
    rsdp: 0,
}));

/// Read a little-endian value of `N` bytes at guest-physical `addr`.
///
/// # Safety
/// `addr..addr+N` must be mapped memory.
unsafe fn read<const N: usize>(addr: u64) -> [u8; N] {
    // SAFETY: guaranteed by the caller; unaligned reads are fine on x86.
    unsafe { core::ptr::read_unaligned(addr as *const [u8; N]) }
}

/// Copy the e820 table and command line out of the zero page at `zero_page`.
/// Call once, on the BSP, while the boot page tables (first 1 GiB) are loaded.
pub fn parse(zero_page: u64) -> &'static BootInfo {
    // SAFETY: called once by the BSP before any reader exists (see `BootInfoCell`).
    let info = unsafe { &mut *BOOT_INFO.0.get() };
    if zero_page != 0 {
        // SAFETY: the VMM put the zero page (4 KiB) at `zero_page`, inside mapped memory.
        let count = usize::from(unsafe { read::<1>(zero_page + E820_COUNT) }[0]).min(E820_MAX);
        for i in 0..count {
            // SAFETY: entries lie inside the zero page (0x2d0 + 128 * 20 < 4096).
            let raw = unsafe { read::<20>(zero_page + E820_TABLE + 20 * i as u64) };
            let word = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().unwrap());
            let kind = u32::from_le_bytes(raw[16..20].try_into().unwrap());
            info.e820[info.e820_len] = E820Entry {
                addr: word(0),
                size: word(8),
                kind,
            };
            info.e820_len += 1;
        }
        // SAFETY: the field lies inside the zero page.
        info.rsdp = u64::from_le_bytes(unsafe { read::<8>(zero_page + ACPI_RSDP_ADDR) });
        // SAFETY: both fields lie inside the zero page.
        let (lo, hi) = unsafe {
            (
                read::<4>(zero_page + CMD_LINE_PTR),
                read::<4>(zero_page + EXT_CMD_LINE_PTR),
            )
        };
        let ptr = u64::from(u32::from_le_bytes(hi)) << 32 | u64::from(u32::from_le_bytes(lo));
        if ptr != 0 && ptr < crate::paging::BOOT_MAP_END {
            while info.cmdline_len < CMDLINE_MAX {
                // SAFETY: the command line is a NUL-terminated string the VMM placed in
                // memory covered by the boot map (checked above).
                let b = unsafe { read::<1>(ptr + info.cmdline_len as u64) }[0];
                if b == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = b;
                info.cmdline_len += 1;
            }
        }
    }
    info
}

/// The boot information, after [`parse`].
pub fn get() -> &'static BootInfo {
    // SAFETY: read-only after `parse` (see `BootInfoCell`).
    unsafe { &*BOOT_INFO.0.get() }
}
