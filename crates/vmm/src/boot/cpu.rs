//! The boot CPU state: identity page tables, the GDT, and the long-mode segment and
//! control-register values every vCPU starts with.
use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{BOOT_MAP_GIB, GDT, PD, PDPT, PML4};
use super::BootError;
use crate::memory::GuestMem;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
/// U/S = 1 on every level: PVM runs a guest natively only if all its mappings are
/// user-accessible (its kernel runs in ring 3). VMX/SVM guests don't mind.
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const TABLE: u64 = PRESENT | WRITABLE | USER;

/// PG | AM | WP | NE | ET | MP | PE.
pub const CR0: u64 = 0x8005_0033;
/// PAE only: PCIDE is refused by PVM; the guest enables what else it wants.
pub const CR4: u64 = 0x20;
/// NXE | LMA | LME | SCE.
pub const EFER: u64 = 0xd01;

pub const CODE_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;

/// null, null, 64-bit code (0x10), data (0x18), TSS (0x20).
const GDT_ENTRIES: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
];

/// Writes the identity map of the first 4 GiB (2 MiB pages) and the GDT.
pub fn write_boot_tables(mem: &GuestMem) -> Result<(), BootError> {
    let w = |value: u64, at: u64| {
        mem.write_obj(value, GuestAddress(at))
            .map_err(|_| BootError::Write {
                what: "boot page tables",
                addr: at,
            })
    };
    w(PDPT | TABLE, PML4)?;
    for gib in 0..BOOT_MAP_GIB {
        let pd = PD + gib * 0x1000;
        w(pd | TABLE, PDPT + gib * 8)?;
        for i in 0..512u64 {
            w((((gib << 9) + i) << 21) | TABLE | HUGE, pd + i * 8)?;
        }
    }
    for (i, entry) in GDT_ENTRIES.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT + i as u64 * 8))
            .map_err(|_| BootError::Write {
                what: "GDT",
                addr: GDT,
            })?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xf_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// Puts `sregs` in 64-bit long mode on the boot page tables and GDT.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let data = segment(DATA_SELECTOR, 3, false);
    sregs.cs = segment(CODE_SELECTOR, 11, true);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        selector: TSS_SELECTOR,
        limit: 0x67,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment::default();
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4;
    sregs.efer = EFER;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_is_user_accessible_and_the_map_is_identity() {
        let mem = crate::memory::create(&[(GuestAddress(0), 64 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4)).unwrap();
        assert_eq!(pml4e & USER, USER);
        for gib in 0..BOOT_MAP_GIB {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPT + gib * 8)).unwrap();
            assert_eq!(pdpte & !0xfff, PD + gib * 0x1000);
            assert_eq!(pdpte & USER, USER);
            for i in [0u64, 1, 511] {
                let pde: u64 = mem
                    .read_obj(GuestAddress(PD + gib * 0x1000 + i * 8))
                    .unwrap();
                assert_eq!(pde & !0xfff, (gib << 30) + (i << 21), "identity");
                assert_eq!(pde & (USER | HUGE | PRESENT), USER | HUGE | PRESENT);
            }
        }
    }

    #[test]
    fn sregs_are_long_mode_without_pcide_and_cr3_bit_12_clear() {
        let mut s = kvm_sregs::default();
        long_mode_sregs(&mut s);
        assert_eq!(s.cr3 & (1 << 12), 0);
        assert_eq!(s.cr4 & (1 << 17), 0, "PCIDE");
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.efer & 0x500, 0x500, "LME|LMA");
        assert_eq!(s.gdt.limit, 39);
    }
}
