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

/// Most CPUs the guest runs on (the online mask's width).
const MAX_CPUS: usize = 64;

/// A page-writing job for one AP (`touch`): base and length, posted by the BSP; the AP
/// zeroes `TOUCH_LEN` when done. The AP looks at it whenever it wakes (at most every
/// `HLT_MAX_NS`), so posting needs no IPI.
static TOUCH_BASE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static TOUCH_LEN: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Counts `touch` jobs, so each writes values the previous did not.
static TOUCH_SEQ: AtomicU64 = AtomicU64::new(1);

/// Writes one word (its address and the job's number) into every 4 KiB page of
/// [base, base + len), from this CPU.
///
/// # Safety
/// The range must be usable RAM inside the identity map that nothing else uses.
pub unsafe fn touch_pages(base: u64, len: u64) -> u64 {
    let seq = TOUCH_SEQ.fetch_add(1, Relaxed) << 40;
    let mut pages = 0;
    let mut at = base;
    while at < base + len {
        // SAFETY: the caller guarantees the range; `at` is page-aligned inside it.
        unsafe { (at as *mut u64).write_volatile(at ^ seq) };
        at += 4096;
        pages += 1;
    }
    pages
}

/// Has CPU `cpu` write every page of [base, base + len) and waits up to `timeout_ns`;
/// true when it did.
///
/// # Safety
/// As for [`touch_pages`].
pub unsafe fn touch_on(cpu: usize, base: u64, len: u64, timeout_ns: u64) -> bool {
    if cpu == 0 {
        // SAFETY: as the caller guarantees.
        unsafe { touch_pages(base, len) };
        return true;
    }
    TOUCH_BASE[cpu].store(base, Relaxed);
    TOUCH_LEN[cpu].store(len, Release);
    let deadline = clock::now().saturating_add(timeout_ns);
    while TOUCH_LEN[cpu].load(Acquire) != 0 {
        let now = clock::now();
        if now > deadline {
            // Withdraw the job if the AP has not taken it yet.
            return TOUCH_LEN[cpu].swap(0, AcqRel) == u64::MAX;
        }
        heartbeat::beat(now);
        cpu::pause();
    }
    true
}

/// AP: runs a posted `touch` job, if any.
fn run_touch_job(cpu: usize) {
    let len = TOUCH_LEN[cpu].load(Acquire);
    if len == 0 || len == u64::MAX {
        return;
    }
    // Taken: the BSP can no longer withdraw it.
    if TOUCH_LEN[cpu]
        .compare_exchange(len, u64::MAX, AcqRel, Acquire)
        .is_err()
    {
        return;
    }
    let base = TOUCH_BASE[cpu].load(Relaxed);
    // SAFETY: the BSP's `touch` command checked the range before posting it.
    unsafe { touch_pages(base, len) };
    TOUCH_LEN[cpu].store(0, Release);
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
        if cpu < MAX_CPUS {
            run_touch_job(cpu);
        }
        let now = clock::now_on(cpu);
        time.store(now, Relaxed);
        crate::idle_until(cpu, now, now.saturating_add(crate::HLT_MAX_NS));
    }
}
