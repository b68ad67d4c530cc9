//! Application processors. The VMM starts every vCPU at the ELF entry with the same boot
//! state; the boot code tells them apart by initial APIC ID (0 = boot CPU). An AP waits
//! (natively, `pause`) until the BSP has built the full page tables, loads them, marks
//! itself online and then updates its heartbeat slot, idling in between (see `idle`).

use core::sync::atomic::{AtomicU64, Ordering::*};

use crate::{clock, cpu, heartbeat};

/// CR3 of the full page tables once the BSP has built them (0 until then).
static KERNEL_CR3: AtomicU64 = AtomicU64::new(0);
/// Bit i set once CPU i is online.
static ONLINE: AtomicU64 = AtomicU64::new(0);

/// BSP: publish the full page tables, releasing the APs.
pub fn release_aps(cr3: u64) {
    KERNEL_CR3.store(cr3, Release);
}

/// Count `cpu` as online (heartbeat `cpus_online` and the online mask).
pub fn mark_online(cpu: usize) {
    ONLINE.fetch_or(1 << cpu, AcqRel);
    heartbeat::cpus_online().fetch_add(1, AcqRel);
}

/// BSP: wait until `expected` CPUs are online, or `timeout_ns` passed.
pub fn wait_for_aps(expected: u32, timeout_ns: u64) {
    let deadline = clock::now().saturating_add(timeout_ns);
    while heartbeat::cpus_online().load(Acquire) < expected && clock::now() < deadline {
        cpu::pause();
    }
}

pub fn online_mask() -> u64 {
    ONLINE.load(Acquire)
}

pub fn ap_main(cpu: usize) -> ! {
    let cr3 = loop {
        let cr3 = KERNEL_CR3.load(Acquire);
        if cr3 != 0 {
            break cr3;
        }
        cpu::pause();
    };
    // SAFETY: the BSP built these tables to identity-map all RAM, a superset of the boot map.
    unsafe { cpu::write_cr3(cr3) };
    clock::init_cpu(cpu);
    if crate::idle_mode() == crate::IdleMode::Hlt {
        crate::apic::init();
    }
    mark_online(cpu);
    let (counter, time) = (heartbeat::cpu_counter(cpu), heartbeat::cpu_time_ns(cpu));
    let mut n: u64 = 0;
    loop {
        n += 1;
        counter.store(n, Relaxed);
        let now = clock::now_on(cpu);
        time.store(now, Relaxed);
        crate::idle_until(cpu, now, now.saturating_add(crate::HLT_MAX_NS));
    }
}
