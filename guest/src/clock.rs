//! Time: kvmclock (pvclock) per vCPU, with a TSC estimate as the fallback.
//!
//! Each vCPU writes MSR_KVM_SYSTEM_TIME_NEW with the address of its own 32-byte pvclock
//! area; reading the time is then `rdtsc` plus arithmetic, no exits.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};

use ray_guest_abi::MAX_CPUS;

use crate::cpu;

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// `struct pvclock_vcpu_time_info`.
#[repr(C, align(32))]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

struct PvClocks(UnsafeCell<[PvClock; MAX_CPUS]>);

// SAFETY: each vCPU's area is written by the hypervisor and read with the version seqlock.
unsafe impl Sync for PvClocks {}

const ZERO: PvClock = PvClock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};
static PVCLOCK: PvClocks = PvClocks(UnsafeCell::new([ZERO; MAX_CPUS]));

/// True once the boot CPU saw its pvclock area filled in.
static KVMCLOCK: AtomicBool = AtomicBool::new(false);
/// Fallback: TSC at boot and TSC frequency in kHz.
static TSC_ORIGIN: AtomicU64 = AtomicU64::new(0);
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

fn area(cpu: usize) -> *mut PvClock {
    assert!(cpu < MAX_CPUS);
    // SAFETY: `cpu < MAX_CPUS`, so the offset stays inside the static array.
    unsafe { PVCLOCK.0.get().cast::<PvClock>().add(cpu) }
}

/// Register this vCPU's pvclock area. The boot CPU (`cpu == 0`) also decides between
/// kvmclock and the TSC fallback for everyone.
pub fn init_cpu(cpu: usize) {
    let pv = area(cpu);
    // SAFETY: the area is a static reserved for the hypervisor's pvclock updates of this vCPU.
    let ok = unsafe { cpu::wrmsr_safe(MSR_KVM_SYSTEM_TIME_NEW, pv as u64 | 1) };
    if cpu != 0 {
        return;
    }
    // KVM fills the area before re-entering the guest after the wrmsr exit.
    // SAFETY: `pv` points into the static array; the hypervisor writes it concurrently,
    // hence the volatile read.
    let version = unsafe { core::ptr::addr_of!((*pv).version).read_volatile() };
    if ok && version != 0 {
        KVMCLOCK.store(true, Release);
    } else {
        TSC_KHZ.store(tsc_khz_estimate(), Relaxed);
        TSC_ORIGIN.store(cpu::rdtsc(), Release);
    }
}

pub fn is_kvmclock() -> bool {
    KVMCLOCK.load(Relaxed)
}

/// TSC frequency from CPUID 0x15/0x16, else a guess of 2 GHz (only without kvmclock).
fn tsc_khz_estimate() -> u64 {
    let max = cpu::cpuid(0, 0)[0];
    if max >= 0x15 {
        let [den, num, crystal_hz, _] = cpu::cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal_hz != 0 {
            return u64::from(crystal_hz) * u64::from(num) / u64::from(den) / 1000;
        }
    }
    if max >= 0x16 {
        let mhz = cpu::cpuid(0x16, 0)[0];
        if mhz != 0 {
            return u64::from(mhz) * 1000;
        }
    }
    2_000_000
}

/// Nanoseconds of guest time, read on vCPU `cpu` (each vCPU must read its own area).
pub fn now_on(cpu: usize) -> u64 {
    if !KVMCLOCK.load(Relaxed) {
        let khz = TSC_KHZ.load(Relaxed).max(1);
        let ticks = cpu::rdtsc().wrapping_sub(TSC_ORIGIN.load(Relaxed));
        return (u128::from(ticks) * 1_000_000 / u128::from(khz)) as u64;
    }
    let pv = area(cpu);
    loop {
        // SAFETY: `pv` points into the static array; fields are read volatile under the
        // pvclock version seqlock (odd = update in progress).
        let (v1, ts, sys, mul, shift, tsc, v2) = unsafe {
            let v1 = core::ptr::addr_of!((*pv).version).read_volatile();
            core::sync::atomic::compiler_fence(Acquire);
            let ts = core::ptr::addr_of!((*pv).tsc_timestamp).read_volatile();
            let sys = core::ptr::addr_of!((*pv).system_time).read_volatile();
            let mul = core::ptr::addr_of!((*pv).tsc_to_system_mul).read_volatile();
            let shift = core::ptr::addr_of!((*pv).tsc_shift).read_volatile();
            let tsc = cpu::rdtsc();
            core::sync::atomic::compiler_fence(Acquire);
            let v2 = core::ptr::addr_of!((*pv).version).read_volatile();
            (v1, ts, sys, mul, shift, tsc, v2)
        };
        if v1 & 1 != 0 || v1 != v2 {
            cpu::pause();
            continue;
        }
        let mut delta = tsc.wrapping_sub(ts);
        if (delta as i64) < 0 {
            delta = 0;
        }
        if shift >= 0 {
            delta <<= shift;
        } else {
            delta >>= -shift;
        }
        return sys.wrapping_add(((u128::from(delta) * u128::from(mul)) >> 32) as u64);
    }
}

/// Time on the boot CPU (everything but the AP loops runs there).
pub fn now() -> u64 {
    now_on(0)
}
