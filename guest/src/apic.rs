//! The local APIC (xAPIC, MMIO at 0xfee00000), just enough for device interrupts and
//! sleeping: software enable, end of interrupt, and a one-shot timer that ends an idle
//! `hlt` at the CPU's next deadline (or a device wait whose interrupt was lost). With KVM's
//! in-kernel APIC these accesses never reach the VMM.
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

const BASE: usize = 0xfee0_0000;
const ID: usize = 0x20;
const EOI: usize = 0xb0;
const SVR: usize = 0xf0;
const LVT_TIMER: usize = 0x320;
const TIMER_INITIAL: usize = 0x380;
const TIMER_DIVIDE: usize = 0x3e0;
const SVR_ENABLE: u32 = 1 << 8;

/// Device interrupts: each device queue that wants interrupts gets its own vector of
/// `DEVICE_VECTOR_BASE..+DEVICE_VECTORS` ([`alloc_vector`]) and its own count.
pub const DEVICE_VECTOR_BASE: usize = 0x50;
pub const DEVICE_VECTORS: usize = 12;
pub const TIMER_VECTOR: usize = 0x41;
/// The VMM's wake interrupt (doorbells, resume): it only ends a `hlt`.
pub const WAKE_VECTOR: usize = ray_guest_abi::WAKE_VECTOR as usize;
pub const SPURIOUS_VECTOR: usize = 0xff;

/// Interrupts taken, by device vector, and of the timer.
static DEVICE_IRQS: [AtomicU64; DEVICE_VECTORS] = [const { AtomicU64::new(0) }; DEVICE_VECTORS];
pub static TIMER_IRQS: AtomicU64 = AtomicU64::new(0);
pub static WAKE_IRQS: AtomicU64 = AtomicU64::new(0);
static NEXT_VECTOR: AtomicUsize = AtomicUsize::new(0);

/// A device vector of its own (an index: the APIC vector is `DEVICE_VECTOR_BASE +` it),
/// or None when all are taken.
pub fn alloc_vector() -> Option<usize> {
    let i = NEXT_VECTOR.fetch_add(1, Relaxed);
    (i < DEVICE_VECTORS).then_some(i)
}

/// Interrupts taken on device vector `index` so far.
pub fn device_irqs(index: usize) -> u64 {
    DEVICE_IRQS.get(index).map_or(0, |c| c.load(Relaxed))
}

fn reg(offset: usize) -> *mut u32 {
    (BASE + offset) as *mut u32
}

fn write(offset: usize, value: u32) {
    // SAFETY: the APIC page is identity-mapped uncached (paging.rs maps 3-4 GiB so) and
    // its registers take aligned 32-bit accesses.
    unsafe { reg(offset).write_volatile(value) }
}

fn read(offset: usize) -> u32 {
    // SAFETY: as for `write`.
    unsafe { reg(offset).read_volatile() }
}

/// This CPU's APIC ID (where MSI messages for it are addressed).
pub fn id() -> u32 {
    read(ID) >> 24
}

/// Software-enables this CPU's APIC (KVM drops interrupts to a disabled one) and sets its
/// timer up one-shot, stopped. The gates are in place since boot
/// ([`crate::idt::init_device_gates`]); interrupts stay off in RFLAGS.
pub fn init() {
    write(SVR, SVR_ENABLE | SPURIOUS_VECTOR as u32);
    write(TIMER_DIVIDE, 0xb);
    write(LVT_TIMER, TIMER_VECTOR as u32);
}

/// Starts (or, with 0, stops) the one-shot timer: `ticks` APIC bus cycles (1 ns each on
/// KVM).
pub fn set_timer(ticks: u32) {
    write(TIMER_INITIAL, ticks);
}

/// Called by the interrupt stubs of idt.rs.
pub extern "C" fn interrupt(vector: u64) {
    let v = vector as usize;
    match DEVICE_IRQS.get(v.wrapping_sub(DEVICE_VECTOR_BASE)) {
        Some(count) => count.fetch_add(1, Relaxed),
        None if v == WAKE_VECTOR => WAKE_IRQS.fetch_add(1, Relaxed),
        None => TIMER_IRQS.fetch_add(1, Relaxed),
    };
    write(EOI, 0);
}
