//! The interrupt descriptor table. The IDT exists so that `rdmsr`/`wrmsr` of a missing MSR
//! can be survived (the `#GP` fix-up in [`crate::entry`]), so that any other exception is
//! reported on the console instead of silently triple-faulting, and for the few device
//! interrupts the guest takes ([`crate::apic`]): interrupts are enabled only while a CPU
//! waits for one ([`crate::cpu::wait_for_interrupt`]).

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

// Device interrupt stubs: save the caller-saved registers, step over the `hlt` of
// `cpu::wait_for_interrupt` if the interrupt came just before it (see there), call
// `interrupt(vector)` on a 16-byte aligned stack, restore, `iretq`. The spurious vector
// returns at once (no EOI).
global_asm!(
    r#"
    .text
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11
    .balign 16
irq_stub_device_\n:
    push $({device} + \n)
    jmp irq_common
    .endr
    .section .rodata.device_stubs, "a"
    .balign 8
    .global device_stubs
device_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11
    .quad irq_stub_device_\n
    .endr
    .text
    .balign 16
    .global irq_stub_timer
irq_stub_timer:
    push ${timer}
    jmp irq_common
    .balign 16
    .global irq_stub_wake
irq_stub_wake:
    push ${wake}
    jmp irq_common
    .balign 16
    .global irq_stub_spurious
irq_stub_spurious:
    iretq
irq_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    push %rbx
    lea guest_wait_hlt(%rip), %rax
    cmp %rax, 88(%rsp)
    jne 1f
    incq 88(%rsp)
1:
    mov 80(%rsp), %rdi
    mov %rsp, %rbx
    and $-16, %rsp
    cld
    call {interrupt}
    mov %rbx, %rsp
    pop %rbx
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $8, %rsp
    iretq
"#,
    device = const crate::apic::DEVICE_VECTOR_BASE,
    timer = const crate::apic::TIMER_VECTOR,
    wake = const crate::apic::WAKE_VECTOR,
    interrupt = sym crate::apic::interrupt,
    options(att_syntax)
);

extern "C" {
    /// Addresses of the 32 exception stubs above.
    static exception_stubs: [u64; 32];
    /// Addresses of the device interrupt stubs, one per device vector.
    static device_stubs: [u64; crate::apic::DEVICE_VECTORS];
    fn irq_stub_timer();
    fn irq_stub_wake();
    fn irq_stub_spurious();
}

/// Writes an interrupt gate for `vector` to `handler`.
fn set_gate(vector: usize, handler: u64) {
    let cs = crate::entry::KERNEL_CS;
    let gates = IDT.0.get().cast::<u64>();
    let low = (handler & 0xffff)
        | (u64::from(cs) << 16)
        | (0x8e00 << 32)
        | ((handler >> 16) & 0xffff) << 48;
    // SAFETY: the IDT is a static of 512 u64 and `vector` < 256; gates are written by the
    // BSP only, before any AP is released and while the vector cannot be raised yet (its
    // source is not set up).
    unsafe {
        gates.add(vector * 2).write_volatile(low);
        gates.add(vector * 2 + 1).write_volatile(handler >> 32);
    }
}

/// Installs the device, timer, wake and spurious interrupt gates: at boot, before any AP
/// runs and before any source of them is enabled.
pub fn init_device_gates() {
    set_gate(crate::apic::WAKE_VECTOR, irq_stub_wake as *const () as u64);
    // SAFETY: `device_stubs` is a constant table emitted by the assembly above.
    let stubs = unsafe { device_stubs };
    for (i, &handler) in stubs.iter().enumerate() {
        set_gate(crate::apic::DEVICE_VECTOR_BASE + i, handler);
    }
    set_gate(
        crate::apic::TIMER_VECTOR,
        irq_stub_timer as *const () as u64,
    );
    set_gate(
        crate::apic::SPURIOUS_VECTOR,
        irq_stub_spurious as *const () as u64,
    );
}

/// Fill gates 0-31 (vector 13 keeps the boot code's `#GP` fix-up gate).
pub fn init() {
    // SAFETY: `exception_stubs` is a constant table emitted by the assembly above.
    let stubs = unsafe { exception_stubs };
    for (vector, &handler) in stubs.iter().enumerate() {
        if vector != 13 {
            set_gate(vector, handler);
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
