//! The boot identity map: the first 4 GiB mapped 1:1 with 2 MiB pages, so the kernel can
//! run in long mode from its first instruction wherever it was loaded below 4 GiB.
use vm_memory::{Bytes, GuestAddress};

use super::layout::{BOOT_MAP_GIB, PAGE_SIZE, PD, PDPT, PML4};
use super::BootError;
use crate::memory::GuestMem;

pub const PRESENT: u64 = 1;
pub const WRITABLE: u64 = 1 << 1;
/// U/S = 1 on every level: PVM runs a guest natively only if all its mappings are
/// user-accessible (its kernel runs in hardware ring 3). VMX/SVM guests don't mind.
pub const USER: u64 = 1 << 2;
/// PS in a PDE: the entry maps a 2 MiB page instead of pointing at a page table.
pub const HUGE: u64 = 1 << 7;
const TABLE: u64 = PRESENT | WRITABLE | USER;
const ENTRIES: u64 = 512;

/// One 4 KiB table from its entries (the rest zero).
fn table(entries: impl Iterator<Item = u64>) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for (slot, entry) in page.chunks_exact_mut(8).zip(entries) {
        slot.copy_from_slice(&entry.to_le_bytes());
    }
    page
}

/// Writes PML4, PDPT and the page directories. Whole pages are written, so nothing left
/// over from an earlier boot in the same memory survives.
pub fn write_page_tables(mem: &GuestMem) -> Result<(), BootError> {
    let write = |page: Vec<u8>, at: u64| {
        mem.write_slice(&page, GuestAddress(at))
            .map_err(|_| BootError::Write {
                what: "boot page tables",
                addr: at,
            })
    };
    write(table(std::iter::once(PDPT | TABLE)), PML4)?;
    write(
        table((0..BOOT_MAP_GIB).map(|gib| (PD + gib * PAGE_SIZE) | TABLE)),
        PDPT,
    )?;
    for gib in 0..BOOT_MAP_GIB {
        let pages = (0..ENTRIES).map(|i| ((gib * ENTRIES + i) << 21) | TABLE | HUGE);
        write(table(pages), PD + gib * PAGE_SIZE)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(mem: &GuestMem, at: u64) -> u64 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Walks the tables as the MMU does: PML4 -> PDPT -> PD -> 2 MiB page.
    fn translate(mem: &GuestMem, va: u64) -> Option<(u64, u64)> {
        let mut flags = u64::MAX;
        let mut table = PML4;
        for (level, shift) in [(4, 39), (3, 30), (2, 21)] {
            let e = entry(mem, table + ((va >> shift) & 511) * 8);
            if e & PRESENT == 0 {
                return None;
            }
            flags &= e;
            if level == 2 {
                assert_eq!(e & HUGE, HUGE, "PDEs map 2 MiB pages");
                return Some(((e & !0x1f_ffff & ((1 << 52) - 1)) | (va & 0x1f_ffff), flags));
            }
            assert_eq!(e & HUGE, 0, "no 1 GiB pages");
            table = e & !0xfff & ((1 << 52) - 1);
        }
        None
    }

    #[test]
    fn the_first_4_gib_are_identity_mapped_user_writable_at_every_level() {
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 32 << 20)])
            .unwrap()
            .ram()
            .clone();
        write_page_tables(&mem).unwrap();
        for va in [
            0u64,
            0x1000,
            0x10_0000,
            0x20_1234,
            0xbfff_ffff,
            0xfee0_0000,
            (4 << 30) - 1,
        ] {
            let (pa, flags) = translate(&mem, va).unwrap_or_else(|| panic!("{va:#x} unmapped"));
            assert_eq!(pa, va, "identity");
            // `flags` is the AND over all levels: U/S and R/W must be set on each one.
            assert_eq!(flags & (USER | WRITABLE), USER | WRITABLE, "{va:#x}");
        }
        assert!(translate(&mem, 4 << 30).is_none(), "nothing above 4 GiB");
        assert!(translate(&mem, 0xffff_8000_0000_0000).is_none());
    }

    #[test]
    fn the_pml4_is_8_kib_aligned_and_stale_entries_are_cleared() {
        assert_eq!(
            PML4 % 0x2000,
            0,
            "PVM reads CR3 bit 12 as the user-page-table flag"
        );
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 32 << 20)])
            .unwrap()
            .ram()
            .clone();
        mem.write_obj(0xdead_b007u64, GuestAddress(PML4 + 8 * 300))
            .unwrap();
        mem.write_obj(0xdead_b007u64, GuestAddress(PDPT + 8 * 7))
            .unwrap();
        write_page_tables(&mem).unwrap();
        assert_eq!(entry(&mem, PML4 + 8 * 300), 0);
        assert_eq!(entry(&mem, PDPT + 8 * 7), 0);
    }
}
