//! rayvisor-guest: rayvisor's own guest kernel.
//!
//! A freestanding x86-64 ELF booted through the Linux 64-bit boot protocol (long mode,
//! identity map set up by the VMM, RSI = zero page). It runs natively on PVM (ring 3,
//! shadow paging) as well as on VMX/SVM KVM and Firecracker, and offers:
//!
//! * the heartbeat page of [`ray_guest_abi`] at 0x100000, kept current without exits;
//! * idling through the VMM's idle port when it offers one (an exit per 500 µs instead of
//!   a host CPU per vCPU);
//! * a line-oriented shell on COM1 (`echo`, `mem`, `cpus`, `tick`, `dirty`, `sum`, `rng`,
//!   `poweroff`), see [`shell`];
//! * a virtio-rng driver over virtio-pci with MSI-X ([`virtio_rng`]), set up on first use;
//! * SMP: every vCPU enters at the ELF entry, APs update their heartbeat slots and idle;
//!   at most [`MAX_CPUS`] of them: the others park, and the boot CPU says so on COM1
//!   (`rayvisor-guest: 70 vCPUs offered, this kernel supports 64; running on 64`).
//!
//! Boot order: entry.rs (assembly, mostly emulated on PVM until the VIF area is
//! registered) -> [`rust_start`] -> [`bsp_main`] / [`smp::ap_main`].
#![no_std]
#![no_main]

#[macro_use]
mod serial;
mod apic;
mod bootparams;
mod clock;
mod cpu;
mod entry;
mod heartbeat;
mod idt;
mod mem;
mod numa;
mod paging;
mod pci;
mod shell;
mod smp;
mod virtio_rng;
mod workload;

use core::sync::atomic::Ordering::*;

use ray_guest_abi::{
    CMDLINE_IDLE, CMDLINE_POLL_MS, IDLE_PORT, MAX_CPUS, POWEROFF_PORT, POWEROFF_VALUE,
    VMM_FEATURE_IDLE_PORT,
};

use crate::shell::Shell;
use crate::workload::Workloads;

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION_MAJOR"),
    ".",
    env!("CARGO_PKG_VERSION_MINOR")
);
const DEFAULT_POLL_MS: u64 = 10;
/// How long the BSP waits for the vCPUs CPUID announces before printing the banner. A VMM
/// that starts only the BSP (Firecracker) costs this once; normally APs take microseconds.
const AP_WAIT_NS: u64 = 200_000_000;

/// Called by entry.rs on every CPU, on its own stack, with SSE on and (on PVM) the VIF
/// area registered.
/// `cpuid1_ebx`/`cpuid1_edx` are CPUID leaf 1 as the VMM set it up (read before the VIF
/// registration, after which CPUID on PVM returns the outer host's values).
extern "C" fn rust_start(
    zero_page: u64,
    cpu: u64,
    pvm: u64,
    cpuid1_ebx: u32,
    cpuid1_edx: u32,
) -> ! {
    if cpu == 0 {
        let offered_cpus = if cpuid1_edx & (1 << 28) != 0 {
            (cpuid1_ebx >> 16) & 0xff
        } else {
            1
        };
        bsp_main(zero_page, pvm != 0, offered_cpus.max(1))
    } else {
        smp::ap_main(cpu as usize)
    }
}

/// `offered_cpus`: how many vCPUs the VMM started (CPUID leaf 1 EBX[23:16]). Those with an
/// APIC ID of [`MAX_CPUS`] or more parked in entry.rs; the boot CPU waits for the others
/// and says so on the console when it had to leave some out.
fn bsp_main(zero_page: u64, pvm: bool, offered_cpus: u32) -> ! {
    clock::init_cpu(0);
    serial::init();
    idt::init();
    let info = bootparams::parse(zero_page);
    choose_idle(info);
    let cr3 = paging::build(info);
    // SAFETY: the new tables identity-map all RAM, a superset of the boot map.
    unsafe { cpu::write_cr3(cr3) };
    smp::release_aps(cr3);
    smp::mark_online(0);

    heartbeat::pvm().store(u64::from(pvm), Relaxed);
    let loop_rate = measure_loop_rate();
    heartbeat::loop_rate().store(loop_rate, Relaxed);
    heartbeat::publish();
    let supported = MAX_CPUS as u32;
    smp::wait_for_aps(offered_cpus.min(supported), AP_WAIT_NS);
    if offered_cpus > supported {
        println!(
            "rayvisor-guest: {offered_cpus} vCPUs offered, this kernel supports {supported}; running on {}",
            heartbeat::cpus_online().load(Relaxed)
        );
    }

    let usable: u64 = info.usable().map(|e| e.size).sum();
    println!(
        "rayvisor-guest {VERSION}: cpus={} mem={}MiB pvm={} loop={}M/s idle={} cmdline=\"{}\"",
        heartbeat::cpus_online().load(Relaxed),
        (usable + (1 << 19)) >> 20,
        u8::from(pvm),
        loop_rate / 1_000_000,
        if IDLE_THROUGH_PORT.load(Relaxed) {
            "port"
        } else {
            "spin"
        },
        info.cmdline()
    );
    if !clock::is_kvmclock() {
        println!("warning: no kvmclock, time is a TSC estimate");
    }
    println!("ready");
    heartbeat::ready().store(1, Release);

    let poll_ns = info
        .cmdline_u64(CMDLINE_POLL_MS)
        .unwrap_or(DEFAULT_POLL_MS)
        .saturating_mul(1_000_000);
    main_loop(poll_ns)
}

/// How long an idle vCPU gives its host CPU back per idle exit, µs: the heartbeat's
/// resolution while idle. An exit costs a few µs natively and tens on PVM, so an idle
/// vCPU takes a few percent of a host CPU instead of all of it.
const IDLE_US: u32 = 500;

/// Set at boot: idle through the VMM's idle port (it offers one and the command line does
/// not say `ray.idle=spin`).
static IDLE_THROUGH_PORT: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);

fn choose_idle(info: &bootparams::BootInfo) {
    let offered = heartbeat::vmm_features().load(Relaxed) & VMM_FEATURE_IDLE_PORT != 0;
    let spin = info.cmdline_str(CMDLINE_IDLE) == Some("spin");
    IDLE_THROUGH_PORT.store(offered && !spin, Relaxed);
}

/// Nothing to do on this CPU for now: give the host CPU back for a while, or spin on.
pub fn idle() {
    if IDLE_THROUGH_PORT.load(Relaxed) {
        cpu::outl(IDLE_PORT, IDLE_US);
    } else {
        cpu::pause();
    }
}

/// The boot CPU's loop: heartbeat, serial input, workloads. No exits unless there is
/// input to read, output to write, a UART poll is due, or nothing to do (an idle exit).
fn main_loop(poll_ns: u64) -> ! {
    let mut shell = Shell::new();
    let mut work = Workloads::default();
    let mut next_poll = clock::now().saturating_add(poll_ns);
    loop {
        let now = clock::now();
        heartbeat::beat(now);

        let mut read_uart = heartbeat::input_doorbell().load(Relaxed) != 0
            && heartbeat::input_doorbell().swap(0, SeqCst) != 0;
        if poll_ns != 0 && now >= next_poll {
            next_poll = now.saturating_add(poll_ns);
            read_uart = true;
        }
        if read_uart {
            serial::drain(|b| shell.input(b, &mut work));
        }
        let behind = work.poll(now);
        if heartbeat::shutdown_request().load(Relaxed) != 0 {
            poweroff();
        }
        if !behind {
            // Output without a final newline is not left waiting in the buffer.
            serial::flush();
            idle();
        }
    }
}

/// Iterations per second of a counted add/dec/jnz loop, timed over >= 1 ms of kvmclock.
/// ~1e9/s native, ~1e5/s under PVM's instruction emulator. Short probes grow the count
/// until one takes >= 50 µs; then one run sized for ~1 ms is timed.
fn measure_loop_rate() -> u64 {
    const PROBE_NS: u64 = 50_000;
    const TARGET_NS: u64 = 1_000_000;
    let timed = |n: u64| {
        let t0 = clock::now();
        cpu::spin_loop_count(n);
        clock::now().saturating_sub(t0).max(1)
    };
    let mut n: u64 = 1000;
    let mut dt = timed(n);
    while dt < PROBE_NS && n < 1 << 36 {
        n *= 8;
        dt = timed(n);
    }
    if dt < TARGET_NS {
        n = (u128::from(n) * u128::from(TARGET_NS) / u128::from(dt)) as u64;
        dt = timed(n);
    }
    (u128::from(n) * 1_000_000_000 / u128::from(dt)) as u64
}

/// Print `poweroff`, ask the VMM to power off (ACPI PM1a port), then try the i8042 reset
/// (what Firecracker treats as shutdown), then halt.
pub fn poweroff() -> ! {
    println!("poweroff");
    cpu::outw(POWEROFF_PORT, POWEROFF_VALUE);
    cpu::outb(0x64, 0xfe);
    cpu::halt_forever()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    serial::print_fmt_raw(format_args!("panic: {info}\n"));
    cpu::halt_forever()
}

/// The precompiled `core` references the unwinding personality routine; with
/// panic=abort nothing ever calls it.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
