//! rayvisor-guest: rayvisor's own guest kernel.
//!
//! A freestanding x86-64 ELF booted through the Linux 64-bit boot protocol (long mode,
//! identity map set up by the VMM, RSI = zero page). It runs natively on PVM (ring 3,
//! shadow paging) as well as on VMX/SVM KVM and Firecracker, and offers:
//!
//! * the heartbeat page of [`ray_guest_abi`] at 0x100000, kept current without exits;
//! * idling in `hlt` until the CPU's next deadline (heartbeat, `tick`, `dirty`) or an
//!   interrupt, when the VMM offers its wake interrupt; else through the VMM's idle port
//!   (an exit per 500 µs), else spinning;
//! * a line-oriented shell on COM1 (`echo`, `mem`, `cpus`, `tick`, `dirty`, `sum`, `rng`, `disk`,
//!   `net`, `displays`, `draw`, `vsock`, `seq`, `poweroff`), see [`shell`]; the same commands
//!   over vsock port 52 ([`virtio_vsock`], `ray vm exec`);
//! * virtio-pci drivers on [`virtio`] (MSI-X, a vector per queue): rng ([`virtio_rng`]),
//!   blk ([`virtio_blk`]), net ([`virtio_net`]) and gpu ([`virtio_gpu`]), set up on
//!   first use, and vsock
//!   ([`virtio_vsock`]), set up at boot so that its shell port listens;
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
mod acpi;
mod apic;
mod bochs;
mod bootparams;
mod clock;
mod cpu;
mod display;
mod entry;
mod fbcon;
mod gpupt;
mod heartbeat;
mod idt;
mod mem;
mod numa;
mod paging;
mod pci;
mod shell;
mod smp;
mod virtio;
mod virtio_blk;
mod virtio_gpu;
mod virtio_input;
mod virtio_net;
mod virtio_rng;
mod virtio_vsock;
mod workload;

use core::sync::atomic::Ordering::*;

use ray_guest_abi::{
    CMDLINE_IDLE, CMDLINE_POLL_MS, GUEST_IDLE_HLT, IDLE_PORT, MAX_CPUS, POWEROFF_PORT,
    POWEROFF_VALUE, VMM_FEATURE_IDLE_PORT, VMM_FEATURE_WAKE_IRQ,
};

use crate::shell::Shell;
use crate::workload::Workloads;

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION_MAJOR"),
    ".",
    env!("CARGO_PKG_VERSION_MINOR")
);
/// UART polling when the guest does not sleep in `hlt` (a doorbell may not come with an
/// exit to see it by); asleep in `hlt`, the VMM's wake interrupt brings the doorbell.
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
    idt::init_device_gates();
    let info = bootparams::parse(zero_page);
    choose_idle(info);
    let cr3 = paging::build(info);
    // SAFETY: the new tables identity-map all RAM, a superset of the boot map.
    unsafe { cpu::write_cr3(cr3) };
    if idle_mode() == IdleMode::Hlt {
        apic::init();
    }
    // Before the APs run: they read it to wait for interrupts the PVM way.
    heartbeat::pvm().store(u64::from(pvm), Relaxed);
    smp::release_aps(cr3);
    smp::mark_online(0);

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
        idle_mode().name(),
        info.cmdline()
    );
    if !clock::is_kvmclock() {
        println!("warning: no kvmclock, time is a TSC estimate");
    }
    virtio_net::init(info.cmdline_str(virtio_net::CMDLINE_IP));
    virtio_vsock::init();
    virtio_input::init();
    println!("ready");
    heartbeat::ready().store(1, Release);

    let default_poll = if idle_mode() == IdleMode::Hlt {
        0
    } else {
        DEFAULT_POLL_MS
    };
    let poll_ns = info
        .cmdline_u64(CMDLINE_POLL_MS)
        .unwrap_or(default_poll)
        .saturating_mul(1_000_000);
    main_loop(poll_ns)
}

/// How long an idle vCPU gives its host CPU back per idle exit, µs: the heartbeat's
/// resolution while idle. An exit costs a few µs natively and tens on PVM, so an idle
/// vCPU takes a few percent of a host CPU instead of all of it.
/// Longest idle-port slice: the port mode's heartbeat granularity.
const IDLE_PORT_MAX_US: u64 = 500;
/// Longest sleep in `hlt`: an idle CPU still beats its heartbeat slot this often. Each
/// wake costs ~0.1 ms of host CPU on PVM (timer interrupt, APIC accesses emulated).
pub const HLT_MAX_NS: u64 = 50_000_000;
/// Shorter waits spin: arming the timer and taking its interrupt costs more than this.
const HLT_MIN_NS: u64 = 20_000;

/// How an idle CPU waits, chosen once at boot ([`choose_idle`]).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IdleMode {
    /// `pause` in a loop: one host CPU per vCPU.
    Spin = 0,
    /// Slices of at most [`IDLE_PORT_MAX_US`] off the CPU, one exit each.
    Port = 1,
    /// `hlt` until the next deadline (APIC timer) or an interrupt: no exit to the VMM.
    Hlt = 2,
}

impl IdleMode {
    fn name(self) -> &'static str {
        match self {
            IdleMode::Spin => "spin",
            IdleMode::Port => "port",
            IdleMode::Hlt => "hlt",
        }
    }
}

static IDLE_MODE: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);

pub fn idle_mode() -> IdleMode {
    match IDLE_MODE.load(Relaxed) {
        2 => IdleMode::Hlt,
        1 => IdleMode::Port,
        _ => IdleMode::Spin,
    }
}

/// `hlt` when the VMM offers its wake interrupt (else input could wait for the next
/// deadline), the idle port when it offers that, else spin; `ray.idle=` narrows the choice.
fn choose_idle(info: &bootparams::BootInfo) {
    let features = heartbeat::vmm_features().load(Relaxed);
    let wanted = info.cmdline_str(CMDLINE_IDLE);
    let mode = if features & VMM_FEATURE_WAKE_IRQ != 0 && matches!(wanted, None | Some("hlt")) {
        IdleMode::Hlt
    } else if features & VMM_FEATURE_IDLE_PORT != 0 && wanted != Some("spin") {
        IdleMode::Port
    } else {
        IdleMode::Spin
    };
    IDLE_MODE.store(mode as u8, Relaxed);
    if mode == IdleMode::Hlt {
        // From now on the VMM may raise the wake vector (its gate is in place).
        heartbeat::guest_idle().store(GUEST_IDLE_HLT, Release);
    }
}

/// Nothing to do on CPU `cpu` (the caller's) until `deadline` (kvmclock ns, `now` is the
/// time): give the host CPU back until then, or until an interrupt comes, or spin on.
pub fn idle_until(cpu: usize, now: u64, deadline: u64) {
    let wait = deadline.saturating_sub(now);
    match idle_mode() {
        IdleMode::Hlt if wait >= HLT_MIN_NS => {
            apic::set_timer(wait.min(HLT_MAX_NS) as u32);
            cpu::wait_for_interrupt_on(cpu, heartbeat::pvm().load(Relaxed) != 0);
            apic::set_timer(0);
        }
        IdleMode::Port if wait >= 1000 => {
            cpu::outl(IDLE_PORT, (wait / 1000).min(IDLE_PORT_MAX_US) as u32);
        }
        _ => cpu::pause(),
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
        virtio_net::poll();
        virtio_gpu::poll();
        virtio_input::poll(&mut |b| shell.input(b, &mut work));
        virtio_vsock::poll(&mut |line| shell::run_line(line, &mut work));
        fbcon::flush();
        let behind = work.poll(now);
        if heartbeat::shutdown_request().load(Relaxed) != 0 {
            poweroff();
        }
        if !behind {
            // Output without a final newline is not left waiting in the buffer.
            serial::flush();
            let mut deadline = work.next_deadline(now).min(now.saturating_add(HLT_MAX_NS));
            if poll_ns != 0 {
                deadline = deadline.min(next_poll);
            }
            // Input that came while this iteration ran: no sleep.
            if heartbeat::input_doorbell().load(Relaxed) == 0 {
                idle_until(0, clock::now(), deadline);
            }
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
