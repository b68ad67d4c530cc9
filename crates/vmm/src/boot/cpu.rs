//! The long-mode register state every vCPU starts in: control registers, EFER, segments,
//! GDTR, and CR3 on the boot identity map. The values live here, in one place.
use kvm_bindings::{kvm_segment, kvm_sregs};

use super::gdt::{self, GDT_LIMIT};
use super::layout::{GDT, PML4};

/// PG | AM | WP | NE | ET | MP | PE.
pub const CR0: u64 = 0x8005_0033;
/// PAE only: PVM refuses PCIDE, and SMEP would fault on the all-user mappings PVM needs;
/// the kernel turns on what else it wants.
pub const CR4: u64 = 0x20;
/// NXE | LMA | LME | SCE.
pub const EFER: u64 = 0xd01;

/// Puts `sregs` in 64-bit long mode on the boot page tables and GDT. Fields not named here
/// (APIC base, interrupt bitmap, CR2, CR8) keep what KVM_GET_SREGS returned.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let data = gdt::data_segment();
    sregs.cs = gdt::code_segment();
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::tss_segment();
    // A null LDT (not present).
    sregs.ldt = kvm_segment::default();
    sregs.gdt.base = GDT;
    sregs.gdt.limit = GDT_LIMIT;
    // No IDT: an exception before the kernel loads its own is a triple fault, which KVM
    // reports as a shutdown exit rather than running garbage.
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
    fn sregs_are_long_mode_without_pcide_and_cr3_bit_12_clear() {
        let mut s = kvm_sregs::default();
        long_mode_sregs(&mut s);
        assert_eq!(s.cr3, 0x1_0000);
        assert_eq!(s.cr3 & (1 << 12), 0);
        assert_eq!(s.cr4 & (1 << 17), 0, "PCIDE");
        assert_eq!(s.cr4 & (1 << 5), 1 << 5, "PAE");
        assert_eq!(s.cr0 & (1 << 31 | 1), 1 << 31 | 1, "PG|PE");
        assert_eq!(s.efer & 0x500, 0x500, "LME|LMA");
        assert_eq!((s.cs.selector, s.cs.l), (0x10, 1));
        assert_eq!(
            (s.ss.selector, s.ds.selector, s.gs.selector),
            (0x18, 0x18, 0x18)
        );
        assert_eq!((s.tr.selector, s.tr.type_), (0x20, 11));
        assert_eq!((s.gdt.base, s.gdt.limit), (0x500, 47));
    }
}
