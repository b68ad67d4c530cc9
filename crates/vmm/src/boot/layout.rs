//! The x86-64 guest-physical layout rayvisor gives every guest.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0001_0000  boot PML4 (8 KiB aligned: PVM reads CR3 bit 12 as "user page table")
//! 0x0001_1000  boot PDPT
//! 0x0001_2000  4 boot PDs: 0..4 GiB identity-mapped with 2 MiB pages
//! 0x0002_0000  kernel command line (up to 4 KiB)
//! 0x0009_fc00  reserved: EBDA
//! 0x000e_0000  ACPI tables (RSDP first), reserved up to 1 MiB
//! 0x0010_0000  kernel (rayvisor's guest; a bzImage's protected-mode part; an ELF at its paddr)
//! ...          RAM up to 3 GiB; initrd at its top
//! 0xc000_0000  MMIO hole (IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000) up to 4 GiB
//! 0x1_0000_0000  the rest of RAM
//! ```
use vm_memory::GuestAddress;

pub const GDT: u64 = 0x500;
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4: u64 = 0x1_0000;
pub const PDPT: u64 = 0x1_1000;
pub const PD: u64 = 0x1_2000;
/// Page directories of the boot identity map: one per GiB.
pub const BOOT_MAP_GIB: u64 = 4;
pub const CMDLINE: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 4096;
pub const EBDA: u64 = 0x9_fc00;
pub const ACPI_TABLES: u64 = 0xe_0000;
pub const HIMEM: u64 = 0x10_0000;
pub const MMIO_START: u64 = 0xc000_0000;
pub const MMIO_END: u64 = 1 << 32;
pub const IOAPIC: u64 = 0xfec0_0000;
pub const LAPIC: u64 = 0xfee0_0000;

pub const MIN_MEMORY: u64 = 32 << 20;
pub const MAX_MEMORY: u64 = 1 << 40;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

// The fixed areas must not overlap, and the PML4 must be 8 KiB aligned (checked at build).
const _: () = assert!(PML4.is_multiple_of(0x2000));
const _: () = assert!(PDPT >= PML4 + 0x1000);
const _: () = assert!(PD + BOOT_MAP_GIB * 0x1000 <= CMDLINE);
const _: () = assert!(ZERO_PAGE + 0x1000 <= BOOT_STACK);

/// Guest RAM as (guest-physical start, length): below the MMIO hole, and the rest above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    if mem_bytes <= MMIO_START {
        vec![(GuestAddress(0), mem_bytes as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_START as usize),
            (GuestAddress(MMIO_END), (mem_bytes - MMIO_START) as usize),
        ]
    }
}

/// The memory map the guest is told about: (start, length, type).
pub fn e820(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA, E820_RAM),
        (EBDA, HIMEM - EBDA, E820_RESERVED),
        (HIMEM, mem_bytes.min(MMIO_START) - HIMEM, E820_RAM),
    ];
    if mem_bytes > MMIO_START {
        map.push((MMIO_END, mem_bytes - MMIO_START, E820_RAM));
    }
    map
}

/// The highest guest-physical address below the MMIO hole that is RAM, plus one.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region_and_three_e820_entries() {
        assert_eq!(ram_regions(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        assert_eq!(
            e820(128 << 20),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, (128 << 20) - 0x100000, E820_RAM),
            ]
        );
    }

    #[test]
    fn exactly_three_gib_stays_below_the_hole() {
        assert_eq!(ram_regions(3 << 30).len(), 1);
        assert_eq!(e820(3 << 30).len(), 3);
    }

    #[test]
    fn five_gib_continues_above_four() {
        assert_eq!(
            ram_regions(5 << 30),
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]
        );
        let map = e820(5 << 30);
        assert_eq!(map[2], (0x100000, (3 << 30) - 0x100000, E820_RAM));
        assert_eq!(map[3], (4 << 30, 2 << 30, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (5 << 30) - (HIMEM - EBDA));
    }
}
