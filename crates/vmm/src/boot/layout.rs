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
//! 0xc000_0000  MMIO hole up to 4 GiB: BARs (0xc000_0000-0xfe00_0000), the PCI ECAM
//!              window (0xfe00_0000, 1 MiB: bus 0), IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000  the rest of RAM
//! ```
use vm_memory::GuestAddress;

use super::BootError;

pub const PAGE_SIZE: u64 = 4096;
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
/// The ACPI tables end below 1 MiB, inside the range the e820 map reserves.
pub const ACPI_TABLES_END: u64 = HIMEM;
pub const HIMEM: u64 = 0x10_0000;
pub const MMIO_START: u64 = 0xc000_0000;
pub const MMIO_END: u64 = 1 << 32;
pub const IOAPIC: u64 = 0xfec0_0000;
pub const LAPIC: u64 = 0xfee0_0000;
/// PCI configuration space as memory (ECAM), described to the guest by the ACPI MCFG
/// table and reserved in the e820 map: 1 MiB per bus, for the one bus the VMM has. It is
/// part of the machine: it never moves, so snapshots and migrations find it in place.
pub const PCI_ECAM: u64 = 0xfe00_0000;
pub const PCI_ECAM_BUSES: u16 = 1;
pub const PCI_ECAM_SIZE: u64 = PCI_ECAM_BUSES as u64 * (1 << 20);

/// Below 32 MiB even rayvisor's guest has no room for its heap after the fixed areas.
pub const MIN_MEMORY: u64 = 32 << 20;
/// 1 TiB: the e820 map and the guest's own page tables are sized for no more.
pub const MAX_MEMORY: u64 = 1 << 40;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

// The fixed areas must not overlap, and the PML4 must be 8 KiB aligned (checked at build).
const _: () = assert!(PML4.is_multiple_of(0x2000));
const _: () = assert!(PDPT >= PML4 + 0x1000);
const _: () = assert!(PD + BOOT_MAP_GIB * 0x1000 <= CMDLINE);
const _: () = assert!(ZERO_PAGE + 0x1000 <= BOOT_STACK);
const _: () = assert!(PCI_ECAM >= MMIO_START && PCI_ECAM + PCI_ECAM_SIZE <= IOAPIC);
const _: () = assert!(PCI_ECAM.is_multiple_of(1 << 20));

/// Checks a guest memory size: whole pages, between [`MIN_MEMORY`] and [`MAX_MEMORY`].
pub fn check_memory(mem_bytes: u64) -> Result<(), BootError> {
    if !mem_bytes.is_multiple_of(PAGE_SIZE) {
        return Err(BootError::MemoryUnaligned(mem_bytes));
    }
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&mem_bytes) {
        return Err(BootError::MemorySize(mem_bytes));
    }
    Ok(())
}

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

/// The memory map the guest is told about: (start, length, type). The ECAM window is
/// reserved in it: Linux takes the MCFG table's window only if the firmware reserved it.
pub fn e820(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA, E820_RAM),
        (EBDA, HIMEM - EBDA, E820_RESERVED),
        (HIMEM, mem_bytes.min(MMIO_START) - HIMEM, E820_RAM),
        (PCI_ECAM, PCI_ECAM_SIZE, E820_RESERVED),
    ];
    if mem_bytes > MMIO_START {
        map.push((MMIO_END, mem_bytes - MMIO_START, E820_RAM));
    }
    map
}

/// [`e820`] with `[start, start + len)` (inside the RAM below the MMIO hole: the display
/// framebuffers) marked reserved, so no kernel takes it for its own.
pub fn e820_reserving(mem_bytes: u64, start: u64, len: u64) -> Vec<(u64, u64, u32)> {
    let mut map = Vec::new();
    for (addr, size, kind) in e820(mem_bytes) {
        let end = addr + size;
        if kind != E820_RAM || start >= end || start + len <= addr {
            map.push((addr, size, kind));
            continue;
        }
        if start > addr {
            map.push((addr, start - addr, E820_RAM));
        }
        map.push((start, len, E820_RESERVED));
        if start + len < end {
            map.push((start + len, end - start - len, E820_RAM));
        }
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
                (0xfe00_0000, 1 << 20, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn exactly_three_gib_stays_below_the_hole() {
        assert_eq!(ram_regions(3 << 30), vec![(GuestAddress(0), 3 << 30)]);
        let map = e820(3 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2], (HIMEM, (3 << 30) - HIMEM, E820_RAM));
        assert_eq!(
            map[2].0 + map[2].1,
            MMIO_START,
            "RAM ends where the hole starts"
        );
    }

    #[test]
    fn memory_sizes_are_checked_and_the_value_named() {
        assert!(check_memory(MIN_MEMORY).is_ok());
        assert!(check_memory(MAX_MEMORY).is_ok());
        assert_eq!(
            check_memory((64 << 20) + 512).unwrap_err().to_string(),
            "guest memory of 67109376 bytes is not a whole number of 4 KiB pages"
        );
        assert_eq!(
            check_memory(16 << 20).unwrap_err().to_string(),
            "guest memory must be between 32 MiB and 1 TiB, got 16777216 bytes"
        );
        assert!(check_memory(MAX_MEMORY + PAGE_SIZE).is_err());
    }

    #[test]
    fn e820_and_regions_agree_on_ram_for_many_sizes() {
        for mem in [
            MIN_MEMORY,
            128 << 20,
            (3 << 30) - PAGE_SIZE,
            3 << 30,
            (3 << 30) + PAGE_SIZE,
            5 << 30,
        ] {
            let regions: u64 = ram_regions(mem).iter().map(|r| r.1 as u64).sum();
            assert_eq!(regions, mem);
            let map = e820(mem);
            // Every e820 entry but the ECAM window lies inside a RAM region (the reserved
            // low area too: it is backed, just not for the kernel's use); the window lies
            // in the hole, outside every region.
            for &(start, len, _) in &map {
                let in_ram = ram_regions(mem)
                    .iter()
                    .any(|r| start >= r.0 .0 && start + len <= r.0 .0 + r.1 as u64);
                assert_eq!(in_ram, start != PCI_ECAM, "{start:#x}");
            }
            assert!(map.contains(&(PCI_ECAM, PCI_ECAM_SIZE, E820_RESERVED)));
            // Entries are sorted and do not overlap.
            for w in map.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0, "{map:x?}");
            }
        }
    }

    #[test]
    fn video_memory_is_carved_out_of_low_ram() {
        let map = e820_reserving(128 << 20, 126 << 20, 2 << 20);
        assert_eq!(
            &map[2..],
            &[
                (HIMEM, (126 << 20) - HIMEM, E820_RAM),
                (126 << 20, 2 << 20, E820_RESERVED),
                (PCI_ECAM, PCI_ECAM_SIZE, E820_RESERVED),
            ]
        );
        let big = e820_reserving(5 << 30, (3 << 30) - (4 << 20), 2 << 20);
        assert_eq!(big[3], ((3 << 30) - (4 << 20), 2 << 20, E820_RESERVED));
        assert_eq!(big[4], ((3 << 30) - (2 << 20), 2 << 20, E820_RAM));
        assert_eq!(big[5], (PCI_ECAM, PCI_ECAM_SIZE, E820_RESERVED));
        assert_eq!(big[6], (4 << 30, 2 << 30, E820_RAM));
    }

    #[test]
    fn five_gib_continues_above_four() {
        assert_eq!(
            ram_regions(5 << 30),
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]
        );
        let map = e820(5 << 30);
        assert_eq!(map[2], (0x100000, (3 << 30) - 0x100000, E820_RAM));
        assert_eq!(map[3], (PCI_ECAM, PCI_ECAM_SIZE, E820_RESERVED));
        assert_eq!(map[4], (4 << 30, 2 << 30, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (5 << 30) - (HIMEM - EBDA));
    }
}
