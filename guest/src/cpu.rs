//! Thin wrappers around privileged and special instructions.
//!
//! On PVM every port access, MSR access, CR write and CPUID is an exit (tens of µs);
//! `rdtsc`, `pause` and ordinary memory accesses are native.

use core::arch::asm;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory-safety effect on this guest.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn outw(port: u16, value: u16) {
    // SAFETY: port I/O has no memory-safety effect on this guest.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: port I/O has no memory-safety effect on this guest.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// `outl` that the compiler treats as reading memory: every store before it is done
/// (in program order) when the port write happens, so the VMM may read what it names.
pub fn outl_after_stores(port: u16, value: u32) {
    // SAFETY: port I/O has no memory-safety effect on this guest; without `nomem` the
    // compiler keeps earlier stores before it.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    }
}

/// `rep insb`: `buf.len()` bytes from `port` into `buf`. One exit under KVM when `buf`
/// stays inside one page (KVM's emulator hands the whole count to the VMM at once).
pub fn rep_insb(port: u16, buf: &mut [u8]) {
    // SAFETY: writes exactly `buf.len()` bytes at `buf`, which is ours to write; DF is
    // clear (the Rust ABI guarantees it on entry to asm blocks).
    unsafe {
        asm!("rep insb", in("dx") port, inout("rdi") buf.as_mut_ptr() => _,
             inout("rcx") buf.len() => _, options(nostack, preserves_flags))
    }
}

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: port I/O has no memory-safety effect on this guest.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// [`wait_for_interrupt_on`] the boot CPU.
pub fn wait_for_interrupt(pvm: bool) {
    wait_for_interrupt_on(0, pvm)
}

/// Waits for an interrupt on CPU `cpu` (the caller's), with interrupts enabled only for
/// the wait.
///
/// On VMX/SVM: `sti; hlt; cli`. On PVM, `sti` in the guest's ring 3 does not let
/// interrupts in: the virtual IF is the first byte of this CPU's VIF area, and an interrupt
/// that came while it was 0 waits (the area's `pending` byte says so) until the next exit
/// with it set, here the `hlt`. Measured on this host: `sti` alone left a pending MSI in
/// the APIC's IRR; VIF `if_ = 1` then `hlt` took it at once.
///
/// An interrupt taken after the caller's last check but before `hlt` would leave the CPU
/// halted with nothing to wake it (PVM has no `sti` shadow): the interrupt stub steps over
/// the `hlt` when it interrupted exactly there ([`crate::idt`], `guest_wait_hlt`).
/// Handlers run inside this block only: every caller-saved register counts as clobbered
/// (`clobber_abi`), and no `nostack` (the interrupt frame is pushed below RSP, so no
/// red-zone data may live there).
// The stub compares the interrupted RIP with `guest_wait_hlt`, so the label must be global;
// the function is never inlined, so it is emitted once.
#[inline(never)]
#[allow(named_asm_labels)]
pub fn wait_for_interrupt_on(cpu: usize, pvm: bool) {
    let vif = vif_area(cpu);
    // SAFETY: interrupt handlers preserve the registers the C ABI makes callee-saved and
    // return with `iretq`; interrupts are off again before the block ends. `vif` is this
    // CPU's VIF area (its first byte is the virtual IF), written only on PVM.
    unsafe {
        asm!(
            "test {pvm}, {pvm}",
            "jz 2f",
            "mov byte ptr [{vif}], 1",
            "jmp 3f",
            "2:",
            "sti",
            "3:",
            ".global guest_wait_hlt",
            "guest_wait_hlt:",
            "hlt",
            "test {pvm}, {pvm}",
            "jz 4f",
            "mov byte ptr [{vif}], 0",
            "jmp 5f",
            "4:",
            "cli",
            "5:",
            pvm = in(reg_byte) u8::from(pvm),
            vif = in(reg) vif,
            clobber_abi("C"),
        )
    }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O has no memory-safety effect on this guest.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// `wrmsr` that survives a missing MSR: returns false if it raised `#GP` (the boot IDT's
/// fix-up skips the instruction and zeroes ECX). No `nostack`: the exception frame is pushed
/// below RSP, so the compiler must not keep red-zone data there.
///
/// # Safety
/// The MSR write must not break memory safety (e.g. it may name guest memory the
/// hypervisor will write to: that memory must be reserved for it).
pub unsafe fn wrmsr_safe(msr: u32, value: u64) -> bool {
    let ecx: u32;
    // SAFETY: the caller vouches for the MSR's effect; a #GP is fixed up by the IDT.
    unsafe {
        asm!("wrmsr", inout("ecx") msr => ecx, inout("eax") value as u32 => _,
             inout("edx") (value >> 32) as u32 => _)
    }
    ecx != 0
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    u64::from(hi) << 32 | u64::from(lo)
}

pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: cpuid only reads identification registers; RBX is saved around it because
    // LLVM reserves it.
    unsafe {
        asm!("mov {tmp:r}, rbx", "cpuid", "xchg {tmp:r}, rbx", tmp = out(reg) b,
             inout("eax") leaf => a, inout("ecx") subleaf => c, out("edx") d,
             options(nomem, nostack, preserves_flags))
    }
    [a, b, c, d]
}

pub fn pause() {
    core::hint::spin_loop();
}

/// Load CR3.
///
/// # Safety
/// `pml4` must be a valid page-table root that maps all memory in use (code, stacks,
/// data) the way it is mapped now.
pub unsafe fn write_cr3(pml4: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) }
}

pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Stop this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli; hlt only stops this CPU (on PVM the first hlt after the VIF
        // registration returns at once, hence the loop).
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// The counted loop used to measure native speed: `add $1,(mem); dec; jnz` x `n`.
pub fn spin_loop_count(n: u64) {
    let mut sink: u64 = 0;
    let p = &raw mut sink;
    // SAFETY: the loop only writes `sink`, a local.
    unsafe {
        asm!("2:", "add qword ptr [{p}], 1", "dec {n}", "jnz 2b",
             p = in(reg) p, n = inout(reg) n.max(1) => _, options(nostack))
    }
    core::hint::black_box(sink);
}

extern "C" {
    static boot_vif_pages: u8;
}

/// CPU `cpu`'s PVM virtual-interrupt-flag area (entry.rs registers one page per CPU).
pub fn vif_area(cpu: usize) -> *mut u8 {
    (&raw const boot_vif_pages)
        .cast_mut()
        .wrapping_add(cpu * 4096)
}
