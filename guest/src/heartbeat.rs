//! The heartbeat page at [`ray_guest_abi::HEARTBEAT_GPA`], shared with the VMM without
//! exits. Every access is an atomic (plain `mov` on x86) so the VMM, the APs and the BSP
//! can all touch it.

use core::cell::UnsafeCell;
use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering::*};

use ray_guest_abi::{
    Heartbeat, HEARTBEAT_MAGIC, HEARTBEAT_VERSION, MAX_CPUS, PV_CONSOLE_OUT_LEN,
    PV_CONSOLE_OUT_OFFSET,
};

/// The whole page, all of it shared with the VMM: the [`Heartbeat`] fields, then unused
/// bytes up to the paravirtual console's output buffer.
#[repr(C)]
pub struct Page {
    hb: Heartbeat,
    gap: [u8; PV_CONSOLE_OUT_OFFSET as usize - size_of::<Heartbeat>()],
    console_out: [u8; PV_CONSOLE_OUT_LEN],
}

#[repr(C, align(4096))]
pub struct HeartbeatPage(UnsafeCell<Page>);

const _: () = assert!(size_of::<HeartbeatPage>() == 4096);
const _: () = assert!(core::mem::offset_of!(Page, console_out) == PV_CONSOLE_OUT_OFFSET as usize);

// SAFETY: all accesses go through the atomics handed out below, except the console output
// buffer, which only the boot CPU writes (serial.rs) and no CPU reads.
unsafe impl Sync for HeartbeatPage {}

/// Placed by linker.ld at exactly 0x100000. Zero in the image; the guest never clears
/// it at run time (the VMM may already have rung the doorbell).
#[link_section = ".heartbeat"]
#[used]
pub static HEARTBEAT: HeartbeatPage = HeartbeatPage(UnsafeCell::new(Page {
    hb: Heartbeat {
        magic: 0,
        version: 0,
        cpus_online: 0,
        seq: 0,
        counter: 0,
        time_ns: 0,
        ready: 0,
        loop_rate: 0,
        pvm: 0,
        dirty_bytes: 0,
        dirty_rate: 0,
        commands: 0,
        input_doorbell: 0,
        ticks: 0,
        shutdown_request: 0,
        vmm_features: 0,
        guest_idle: 0,
        display_table: 0,
        reserved: [0; 14],
        cpu_counter: [0; MAX_CPUS],
        cpu_time_ns: [0; MAX_CPUS],
    },
    gap: [0; PV_CONSOLE_OUT_OFFSET as usize - size_of::<Heartbeat>()],
    console_out: [0; PV_CONSOLE_OUT_LEN],
}));

/// The paravirtual console's output buffer ([`PV_CONSOLE_OUT_LEN`] bytes): written by the
/// boot CPU only, with volatile stores, read by the VMM on a flush.
pub fn console_out() -> *mut u8 {
    let page = HEARTBEAT.0.get();
    // SAFETY: only computes the address of a field of the static page.
    unsafe { core::ptr::addr_of_mut!((*page).console_out).cast::<u8>() }
}

macro_rules! fields64 {
    ($($name:ident),*) => {$(
        pub fn $name() -> &'static AtomicU64 {
            let page = HEARTBEAT.0.get();
            // SAFETY: the page is a static; the field is a naturally aligned u64 only ever
            // accessed atomically.
            unsafe { AtomicU64::from_ptr(core::ptr::addr_of_mut!((*page).hb.$name)) }
        }
    )*};
}

fields64!(
    magic,
    seq,
    counter,
    time_ns,
    ready,
    loop_rate,
    pvm,
    dirty_bytes,
    dirty_rate
);
fields64!(
    commands,
    input_doorbell,
    ticks,
    shutdown_request,
    vmm_features,
    guest_idle,
    display_table
);

pub fn cpus_online() -> &'static AtomicU32 {
    let page = HEARTBEAT.0.get();
    // SAFETY: as for the u64 fields.
    unsafe { AtomicU32::from_ptr(core::ptr::addr_of_mut!((*page).hb.cpus_online)) }
}

fn version() -> &'static AtomicU32 {
    let page = HEARTBEAT.0.get();
    // SAFETY: as for the u64 fields.
    unsafe { AtomicU32::from_ptr(core::ptr::addr_of_mut!((*page).hb.version)) }
}

pub fn cpu_counter(cpu: usize) -> &'static AtomicU64 {
    let page = HEARTBEAT.0.get();
    // SAFETY: as for the u64 fields; the index is bounds-checked.
    unsafe { AtomicU64::from_ptr(core::ptr::addr_of_mut!((*page).hb.cpu_counter[cpu])) }
}

pub fn cpu_time_ns(cpu: usize) -> &'static AtomicU64 {
    let page = HEARTBEAT.0.get();
    // SAFETY: as for the u64 fields; the index is bounds-checked.
    unsafe { AtomicU64::from_ptr(core::ptr::addr_of_mut!((*page).hb.cpu_time_ns[cpu])) }
}

/// Publish the layout version and magic (after the other boot fields are set).
pub fn publish() {
    version().store(HEARTBEAT_VERSION, Relaxed);
    magic().store(HEARTBEAT_MAGIC, Release);
}

/// One beat of the boot CPU (only the boot CPU may call this): `counter` + 1 and `time_ns`
/// under the sequence lock. Called every main-loop iteration, and also from inside long
/// operations (serial output, `sum`, `dirty`) so that gaps in `time_ns` mean the vCPU really
/// did not run (pause, snapshot, migration), not that the guest was busy. Asleep in `hlt`,
/// an idle guest beats at least every [`crate::HLT_MAX_NS`]; the VMM wakes it when it
/// resumes the vCPUs, so the first beat after a pause comes at once.
pub fn beat(now_ns: u64) {
    let s = seq().load(Relaxed);
    let count = counter().load(Relaxed).wrapping_add(1);
    seq().store(s.wrapping_add(1), Relaxed);
    fence(Release);
    counter().store(count, Relaxed);
    time_ns().store(now_ns, Relaxed);
    seq().store(s.wrapping_add(2), Release);
    cpu_counter(0).store(count, Relaxed);
    cpu_time_ns(0).store(now_ns, Relaxed);
}
