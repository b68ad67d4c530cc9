//! Reading the guest's heartbeat page (see `ray-guest-abi`): no exits, no guest help.
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ray_api::vmm::HeartbeatInfo;
use ray_guest_abi::{offset, HEARTBEAT_GPA, HEARTBEAT_MAGIC, MAX_CPUS};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

fn load(mem: &GuestMem, off: u64) -> Option<u64> {
    mem.load::<u64>(GuestAddress(HEARTBEAT_GPA + off), Ordering::Acquire)
        .ok()
}

/// A consistent (counter, time) pair, read under the guest's sequence lock.
///
/// A writer that stays inside its critical section (odd `seq`) is not running: its vCPU is
/// paused, or descheduled by the host. After a short wait the pair is taken as it stands;
/// it is then at most one update apart, which no caller can tell from a stopped heartbeat.
pub fn sample(mem: &GuestMem) -> Option<(u64, u64)> {
    if load(mem, offset::MAGIC)? != HEARTBEAT_MAGIC {
        return None;
    }
    let deadline = Instant::now() + Duration::from_millis(2);
    loop {
        let seq = load(mem, offset::SEQ)?;
        let counter = load(mem, offset::COUNTER)?;
        let time = load(mem, offset::TIME_NS)?;
        let again = load(mem, offset::SEQ)?;
        let stable = again == seq;
        if stable && (seq & 1 == 0 || Instant::now() >= deadline) {
            return Some((counter, time));
        }
        std::thread::yield_now();
    }
}

/// Everything the heartbeat page says, or None if the guest keeps none.
pub fn read(mem: &GuestMem) -> Option<HeartbeatInfo> {
    let (counter, time_ns) = sample(mem)?;
    let word = |off| load(mem, off).unwrap_or(0);
    let cpus_online = (word(offset::CPUS_ONLINE & !7) >> ((offset::CPUS_ONLINE & 7) * 8)) as u32;
    let n = (cpus_online as usize).clamp(1, MAX_CPUS);
    Some(HeartbeatInfo {
        counter,
        time_ns,
        cpus_online,
        ready: word(offset::READY) == 1,
        loop_rate: word(offset::LOOP_RATE),
        pvm: word(offset::PVM) == 1,
        dirty_bytes: word(offset::DIRTY_BYTES),
        ticks: word(offset::TICKS),
        per_cpu_counter: (0..n as u64)
            .map(|i| word(offset::CPU_COUNTER + 8 * i))
            .collect(),
    })
}

/// Tells a rayvisor guest, before it starts, what this VMM offers
/// ([`ray_guest_abi::Heartbeat::vmm_features`]).
pub fn announce_features(mem: &GuestMem) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_obj(
        ray_guest_abi::VMM_FEATURE_IDLE_PORT
            | ray_guest_abi::VMM_FEATURE_PV_CONSOLE
            | ray_guest_abi::VMM_FEATURE_WAKE_IRQ,
        GuestAddress(HEARTBEAT_GPA + offset::VMM_FEATURES),
    )
}

/// Tells a rayvisor guest, before it starts, where its display table is
/// ([`ray_guest_abi::Heartbeat::display_table`]).
pub fn announce_displays(mem: &GuestMem, table: u64) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_obj(table, GuestAddress(HEARTBEAT_GPA + offset::DISPLAY_TABLE))
}

/// Whether the guest sleeps in `hlt` and asked for the wake interrupt
/// ([`ray_guest_abi::GUEST_IDLE_HLT`]).
pub fn wants_wake_irq(mem: &GuestMem) -> bool {
    load(mem, offset::MAGIC) == Some(HEARTBEAT_MAGIC)
        && load(mem, offset::GUEST_IDLE) == Some(ray_guest_abi::GUEST_IDLE_HLT)
}

/// Sets a VMM-written flag in the heartbeat page (doorbell, shutdown request). Returns
/// false when the guest keeps no heartbeat page.
pub fn raise(mem: &GuestMem, off: u64) -> bool {
    if load(mem, offset::MAGIC) != Some(HEARTBEAT_MAGIC) {
        return false;
    }
    mem.store(1u64, GuestAddress(HEARTBEAT_GPA + off), Ordering::Release)
        .is_ok()
}
