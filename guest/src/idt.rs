//! The interrupt descriptor table. The guest never enables interrupts; the IDT exists so
//! that `rdmsr`/`wrmsr` of a missing MSR can be survived (the `#GP` fix-up in
//! [`crate::entry`]) and so that any other exception is reported on the console instead of
//! silently triple-faulting.

use core::arch::global_asm;
use core::cell::UnsafeCell;

use crate::{cpu, serial};

/// 256 gates of 16 bytes. Vector 13 is written by the boot code on every CPU; the BSP
/// fills vectors 0-31 (except 13) in [`init`] before it releases the APs.
#[repr(C, align(4096))]
pub struct Idt(UnsafeCell<[u64; 512]>);

// SAFETY: written only by the boot code (identical values on every CPU) and by the BSP in
// `init` before the APs leave their boot wait; read by the CPU through IDTR.
unsafe impl Sync for Idt {}

pub static IDT: Idt = Idt(UnsafeCell::new([0; 512]));

// Exception entry stubs: push a dummy error code where the CPU pushes none, push the
// vector, and call `exception` with a pointer to [vector, error, rip, cs, rflags, rsp, ss].
global_asm!(
    r#"
    .macro exc_stub n, err
    .balign 16
exc_stub_\n:
    .if \err == 0
    push $0
    .endif
    push $\n
    jmp exception_common
    .endm

    .text
    .global exception_common
exception_common:
    mov %rsp, %rdi
    and $-16, %rsp
    call {exception}
1:  cli
    hlt
    jmp 1b

    exc_stub 0, 0
    exc_stub 1, 0
    exc_stub 2, 0
    exc_stub 3, 0
    exc_stub 4, 0
    exc_stub 5, 0
    exc_stub 6, 0
    exc_stub 7, 0
    exc_stub 8, 1
    exc_stub 9, 0
    exc_stub 10, 1
    exc_stub 11, 1
    exc_stub 12, 1
    exc_stub 13, 1
    exc_stub 14, 1
    exc_stub 15, 0
    exc_stub 16, 0
    exc_stub 17, 1
    exc_stub 18, 0
    exc_stub 19, 0
    exc_stub 20, 0
    exc_stub 21, 1
    exc_stub 22, 0
    exc_stub 23, 0
    exc_stub 24, 0
    exc_stub 25, 0
    exc_stub 26, 0
    exc_stub 27, 0
    exc_stub 28, 0
    exc_stub 29, 1
    exc_stub 30, 1
    exc_stub 31, 0

    .section .rodata.exc_stubs, "a"
    .balign 8
    .global exception_stubs
exception_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_stub_\n
    .endr
    .text
"#,
    exception = sym exception,
    options(att_syntax)
);

extern "C" {
    /// Addresses of the 32 exception stubs above.
    static exception_stubs: [u64; 32];
}

/// Fill gates 0-31 (vector 13 keeps the boot code's `#GP` fix-up gate).
pub fn init() {
    let cs = crate::entry::KERNEL_CS;
    let gates = IDT.0.get().cast::<u64>();
    // SAFETY: `exception_stubs` is a constant table emitted by the assembly above.
    let stubs = unsafe { exception_stubs };
    for (vector, &handler) in stubs.iter().enumerate() {
        if vector == 13 {
            continue;
        }
        let low = (handler & 0xffff)
            | (u64::from(cs) << 16)
            | (0x8e00 << 32)
            | ((handler >> 16) & 0xffff) << 48;
        // SAFETY: the IDT is a static of 512 u64; only the BSP writes these gates, before
        // any AP is released (see the type's documentation).
        unsafe {
            gates.add(vector * 2).write_volatile(low);
            gates.add(vector * 2 + 1).write_volatile(handler >> 32);
        }
    }
}

/// Fatal exception: report it once and stop this CPU.
extern "C" fn exception(frame: *const u64) {
    // SAFETY: `exception_common` passes a pointer to the 7 words it and the CPU pushed.
    let f = unsafe { core::slice::from_raw_parts(frame, 7) };
    serial::print_fmt_raw(format_args!(
        "exception {} err={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} cr2={:#x}\n",
        f[0],
        f[1],
        f[2],
        f[3],
        f[4],
        f[5],
        cpu::read_cr2()
    ));
}
