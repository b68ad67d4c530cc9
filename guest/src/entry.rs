//! The boot path: the 64-bit entry point every vCPU starts at, static boot page tables,
//! the boot IDT with its `#GP` fix-up, and PVM detection.
//!
//! Until a vCPU has registered its VIF area on PVM, every instruction it runs is emulated
//! (~10 µs each), so this path is a few dozen instructions of assembly:
//!
//! 1. read the initial APIC ID (CPUID leaf 1, EBX[31:24]) = our CPU index, claim it
//!    (leaf 1 is also handed to Rust: EBX[23:16] is the vCPU count the rayvisor VMM sets);
//! 2. load CR3 with the static page tables below (U/S=1 at every level, PML4 8 KiB aligned);
//! 3. enable SSE (Rust code uses it);
//! 4. switch to this CPU's stack, load our own GDT and segments, load the boot IDT (only
//!    `#GP` is populated);
//! 5. detect PVM and register this CPU's VIF area;
//! 6. call [`crate::rust_start`].
//!
//! **PVM detection, measured on this host (kvm_pvm on a 6.18 host, 2026-11-28):**
//! * CPUID cannot tell PVM apart: without `KVM_SET_CPUID2` every leaf reads 0, with the
//!   supported CPUID leaf 0x4000_0000 is the ordinary "KVMKVMKVM" and 0x4000_0001 has no
//!   PVM-specific bit. Worse, once the VIF area is registered CPUID is no longer virtualized
//!   by KVM: it runs natively (ring 3, AMD without CPUID faulting) and returns the *outer*
//!   host's values. So CPUID (our APIC ID included) must be read before step 5.
//! * `rdmsr 0x4b564d11` returns 0x4d5650 ("PVM") on PVM (before VIF registration, emulated);
//!   an unknown MSR raises `#GP` through the guest IDT. On VMX/SVM KVM (and Firecracker)
//!   0x4b564d11 does not exist and raises `#GP`.
//!
//! **Event delivery on PVM (measured):** PVM delivers exceptions and interrupts through the
//! guest IDT onto the current stack, but loads the gate's code segment descriptor from the
//! guest's GDT *in memory*. With the VMM's GDTR pointing at nothing useful (e.g. base 0 and
//! no descriptors there), the handler's first instruction raises `#GP` again, forever, until
//! the stack runs into something vital and the vCPU triple-faults. Hence our own GDT.
//!
//! So the entry installs a boot IDT whose `#GP` handler skips a faulting `rdmsr`/`wrmsr`
//! and zeroes ECX/EAX/EDX, then reads 0x4b564d11 and only writes the VIF MSR 0x4b564d10
//! if the value is exactly "PVM". This needs nothing from the VMM's CPUID set-up and is
//! also safe on hosts with `ignore_msrs` (those read 0). The same fix-up makes
//! [`crate::cpu::wrmsr_safe`] work later.

use core::arch::global_asm;

use crate::idt::IDT;
use ray_guest_abi::MAX_CPUS;

/// Bytes of stack per CPU.
pub const STACK_SIZE: usize = 16 * 1024;

/// Code and data selectors of the guest's own GDT (the layout GUEST.md's recipe uses).
pub const KERNEL_CS: u16 = 0x10;
const KERNEL_DS: u16 = 0x18;

const MSR_PVM_VIF: u32 = 0x4b56_4d10;
const MSR_PVM_SIGNATURE: u32 = 0x4b56_4d11;
const PVM_SIGNATURE: u32 = 0x4d_5650;

global_asm!(
    r#"
    .section .text.boot, "ax"
    .code64
    .global _start
_start:
    cli
    mov %rsi, %r15                    /* boot_params (Linux 64-bit boot protocol) */

    /* 1. CPU index = initial APIC ID; a second CPU with the same ID (or one beyond
     *    MAX_CPUS) parks instead of sharing a stack. */
    mov $1, %eax
    cpuid
    mov %ebx, %r12d                   /* kept for rust_start: EBX[23:16] = vCPU count */
    mov %edx, %r10d                   /* EDX bit 28 (HTT): that count is meaningful */
    shr $24, %ebx
    cmp ${max_cpus}, %ebx
    jae park
    lock bts %rbx, boot_cpus_claimed(%rip)
    jc park
    mov %rbx, %r14

    /* 2. static boot page tables: first 1 GiB identity-mapped, U/S=1 everywhere */
    lea boot_pml4(%rip), %rax
    mov %rax, %cr3

    /* 3. SSE: CR0.EM=0, CR0.TS=0, CR0.MP=1; CR4.OSFXSR|OSXMMEXCPT */
    mov %cr0, %rax
    and $~0xc, %rax
    or $0x2, %rax
    mov %rax, %cr0
    mov %cr4, %rax
    or $0x600, %rax
    mov %rax, %cr4

    /* 4. stack of this CPU; our own GDT (PVM reads the gate's CS descriptor from the
     *    in-memory GDT when it delivers an event, so the VMM's may not do), reload the
     *    segment registers; boot IDT with the #GP fix-up gate (vector 13) */
    lea (%r14), %rax
    inc %rax
    imul ${stack_size}, %rax
    lea boot_stacks(%rip), %rsp
    add %rax, %rsp
    lgdt boot_gdtr(%rip)
    lea 3f(%rip), %rax
    push ${kernel_cs}
    push %rax
    lretq
3:
    mov ${kernel_ds}, %eax
    mov %eax, %ss
    mov %eax, %ds
    mov %eax, %es
    lea {idt}(%rip), %rdi
    lea gp_entry(%rip), %rax
    mov %ax, 13*16(%rdi)
    movw ${kernel_cs}, 13*16+2(%rdi)
    movw $0x8e00, 13*16+4(%rdi)
    shr $16, %rax
    mov %ax, 13*16+6(%rdi)
    shr $16, %rax
    mov %eax, 13*16+8(%rdi)
    lidt boot_idtr(%rip)

    /* 5. PVM? (see the module documentation) then register the VIF area */
    xor %r13d, %r13d
    mov ${msr_sig}, %ecx
    rdmsr
    cmp ${pvm_sig}, %eax
    jne 1f
    test %edx, %edx
    jne 1f
    mov %r14, %rax
    shl $12, %rax
    lea boot_vif_pages(%rip), %rdx
    lea 1(%rax,%rdx), %rax
    mov %rax, %rdx
    shr $32, %rdx
    mov ${msr_vif}, %ecx
    wrmsr
    test %ecx, %ecx                   /* the #GP fix-up zeroes ECX */
    setnz %r13b
1:
    /* 6. rust_start(boot_params, cpu, pvm, cpuid1_ebx, cpuid1_edx) */
    mov %r15, %rdi
    mov %r14, %rsi
    mov %r13, %rdx
    mov %r12, %rcx
    mov %r10, %r8
    xor %ebp, %ebp
    call {rust_start}
park:
    cli
    hlt
    jmp park

/* #GP: a faulting rdmsr/wrmsr is skipped with ECX=EAX=EDX=0; anything else is fatal. */
    .global gp_entry
gp_entry:
    push %rax
    mov 16(%rsp), %rax                /* faulting RIP (above the error code) */
    cmpw $0x320f, (%rax)              /* rdmsr */
    je 2f
    cmpw $0x300f, (%rax)              /* wrmsr */
    je 2f
    pop %rax
    push $13
    jmp exception_common
2:
    addq $2, 16(%rsp)
    pop %rax
    add $8, %rsp                      /* error code */
    xor %eax, %eax
    xor %edx, %edx
    xor %ecx, %ecx
    iretq

    .section .data.boot, "aw"
    .balign 16
boot_gdt:
    .quad 0                           /* null */
    .quad 0x00af9b000000ffff          /* 0x08: 64-bit code (unused; Firecracker's CS) */
    .quad 0x00af9b000000ffff          /* 0x10: 64-bit code, KERNEL_CS */
    .quad 0x00cf93000000ffff          /* 0x18: data, KERNEL_DS */
boot_gdt_end:
    .balign 16
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
    .balign 16
boot_idtr:
    .word 256*16-1
    .quad {idt}
    .balign 8
boot_cpus_claimed:
    .quad 0

/* PML4 (8 KiB aligned: CR3 bit 12 must be 0 on PVM) -> PDPT -> PD of 512 x 2 MiB pages.
 * Flags 0x7 = P|W|U, 0x87 = P|W|U|PS. */
    .section .data.boot_page_tables, "aw"
    .balign 8192
boot_pml4:
    .quad boot_pdpt + 0x7
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x7
    .fill 511, 8, 0
boot_pd:
    .set i, 0
    .rept 512
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .global boot_vif_pages
boot_vif_pages:                       /* one page per CPU: PVM wants a page-aligned GPA */
    .skip 4096 * {max_cpus}
boot_stacks:
    .skip {stack_size} * {max_cpus}
    .text
"#,
    max_cpus = const MAX_CPUS,
    stack_size = const STACK_SIZE,
    msr_sig = const MSR_PVM_SIGNATURE,
    pvm_sig = const PVM_SIGNATURE,
    msr_vif = const MSR_PVM_VIF,
    kernel_cs = const KERNEL_CS,
    kernel_ds = const KERNEL_DS,
    idt = sym IDT,
    rust_start = sym crate::rust_start,
    options(att_syntax)
);

// The rayvisor note (`ray_guest_abi::NOTE_NAME` / `NOTE_DIRECT_SMP`): a rayvisor VMM starts
// every vCPU at `_start` in long mode instead of leaving the APs waiting for INIT/SIPI.
core::arch::global_asm!(
    ".section .note.rayvisor, \"a\", @note",
    ".balign 4",
    ".long 9",          // namesz: "rayvisor\0"
    ".long 4",          // descsz
    ".long 0x52415901", // type: NOTE_DIRECT_SMP
    ".asciz \"rayvisor\"",
    ".balign 4",
    ".long 1", // ABI version
    ".balign 4",
    ".previous",
);
