//! The boot GDT and the segment registers that match it. The descriptors in guest memory
//! are encoded from the same `kvm_segment` values the vCPU layer loads, so the two cannot
//! disagree (a guest that reloads a selector gets what KVM was told).
use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress};

use super::layout::GDT;
use super::BootError;
use crate::memory::GuestMem;

pub const CODE_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;
/// null, null, code, data, and the 16-byte TSS descriptor of long mode (two slots).
pub const GDT_ENTRIES: usize = 6;
/// The GDTR limit: the last byte of the table.
pub const GDT_LIMIT: u16 = (GDT_ENTRIES * 8 - 1) as u16;

const TYPE_CODE_EXEC_READ_ACCESSED: u8 = 11;
const TYPE_DATA_READ_WRITE_ACCESSED: u8 = 3;
/// A 64-bit TSS that is busy: what TR must hold (VMX refuses an "available" TSS in TR).
const TYPE_TSS_BUSY: u8 = 11;

/// CS: 64-bit code, ring 0.
pub fn code_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE_SELECTOR,
        type_: TYPE_CODE_EXEC_READ_ACCESSED,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    }
}

/// DS, ES, FS, GS and SS: flat read/write data.
pub fn data_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: DATA_SELECTOR,
        type_: TYPE_DATA_READ_WRITE_ACCESSED,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    }
}

/// TR: a minimal 104-byte TSS at 0. KVM needs a valid TR to enter the guest; kernels load
/// their own before they need one (interrupt stacks).
pub fn tss_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0x67,
        selector: TSS_SELECTOR,
        type_: TYPE_TSS_BUSY,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        ..Default::default()
    }
}

/// The 8-byte descriptor for `seg` (for a system segment, its low half).
pub fn descriptor(seg: &kvm_segment) -> u64 {
    // With G=1 the descriptor holds the limit in 4 KiB units; kvm_segment holds bytes.
    let limit = u64::from(if seg.g != 0 {
        seg.limit >> 12
    } else {
        seg.limit
    });
    let access = u64::from(
        (seg.type_ & 0xf) | (seg.s & 1) << 4 | (seg.dpl & 3) << 5 | (seg.present & 1) << 7,
    );
    let flags = u64::from((seg.avl & 1) | (seg.l & 1) << 1 | (seg.db & 1) << 2 | (seg.g & 1) << 3);
    (limit & 0xffff)
        | (seg.base & 0xff_ffff) << 16
        | access << 40
        | ((limit >> 16) & 0xf) << 48
        | flags << 52
        | ((seg.base >> 24) & 0xff) << 56
}

/// The table as written to guest memory.
pub fn entries() -> [u64; GDT_ENTRIES] {
    let tss = tss_segment();
    [
        0,
        0,
        descriptor(&code_segment()),
        descriptor(&data_segment()),
        descriptor(&tss),
        tss.base >> 32, // upper half of the TSS descriptor: base bits 63..32
    ]
}

pub fn write_gdt(mem: &GuestMem) -> Result<(), BootError> {
    let mut bytes = Vec::with_capacity(GDT_ENTRIES * 8);
    for e in entries() {
        bytes.extend_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(GDT))
        .map_err(|_| BootError::Write {
            what: "GDT",
            addr: GDT,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_the_classic_long_mode_ones() {
        let e = entries();
        assert_eq!(e[0], 0);
        assert_eq!(e[(CODE_SELECTOR / 8) as usize], 0x00af_9b00_0000_ffff);
        assert_eq!(e[(DATA_SELECTOR / 8) as usize], 0x00cf_9300_0000_ffff);
        assert_eq!(e[(TSS_SELECTOR / 8) as usize], 0x0000_8b00_0000_0067);
        assert_eq!(e[(TSS_SELECTOR / 8) as usize + 1], 0);
        assert!(usize::from(TSS_SELECTOR) + 16 <= usize::from(GDT_LIMIT) + 1);
    }

    #[test]
    fn segments_have_the_values_the_vcpu_layer_needs() {
        let cs = code_segment();
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.dpl),
            (0x10, 11, 1, 0, 0)
        );
        assert_eq!((cs.present, cs.s, cs.g), (1, 1, 1));
        let ds = data_segment();
        assert_eq!(
            (ds.selector, ds.type_, ds.db, ds.l, ds.s),
            (0x18, 3, 1, 0, 1)
        );
        let tr = tss_segment();
        assert_eq!(
            (tr.selector, tr.type_, tr.present, tr.limit, tr.s),
            (0x20, 11, 1, 0x67, 0)
        );
    }

    #[test]
    fn the_gdt_lands_at_its_address() {
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 32 << 20)])
            .unwrap()
            .ram()
            .clone();
        write_gdt(&mem).unwrap();
        let code: u64 = mem
            .read_obj(GuestAddress(GDT + u64::from(CODE_SELECTOR)))
            .unwrap();
        assert_eq!(code, descriptor(&code_segment()));
    }
}
