//! vCPUs: boot-state set-up, one thread each, and the pause/resume/exit control that the
//! VMM thread drives.
//!
//! ```text
//!   Run ──pause──▶ Pause (parked on a condvar, counted) ──resume──▶ Run
//!    └───────────────────────exit──────────────────────────▶ Exit (thread ends)
//! ```
//! A vCPU inside KVM_RUN is brought out by a signal (`SIGRTMIN`, whose handler does nothing:
//! its only job is to make KVM_RUN return EINTR). The controller repeats the signal until
//! every vCPU has parked, which closes the window where a signal lands just before a vCPU
//! enters KVM_RUN.
//!
//! A rayvisor guest idles by writing to [`ray_guest_abi::IDLE_PORT`]: its vCPU thread then
//! waits on the same condvar, so a pause, an exit or console input ends the idle at once
//! ([`Vcpus::wake_idle`]). Before a vCPU parks, a port access its last exit left half done
//! is completed (see [`PendingIo`]).
//!
//! Throttling (live migration's auto-converge): with a throttle of `p` %, each vCPU runs at
//! most `100 - p` % of every [`THROTTLE_PERIOD`] and waits out the rest before its next
//! KVM_RUN. A kicker thread signals the vCPUs once per period, so a guest spinning without
//! exits is brought out of KVM_RUN and throttled too.
use crate::logging::SpawnInSpan;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::dirty_ring::DirtyRings;
use super::persist::{KvmVcpu, Persist, PersistError, VcpuState};
use super::vm::Vm;
use crate::boot::BootImage;
use crate::devices::{BusEvent, IoBus, PowerEvent};
use crate::metrics::ExitReason;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// Local APIC register offsets and delivery modes for LINT0/LINT1 (PC wiring: the PIC on
/// LINT0 as ExtINT, NMI on LINT1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up vCPU {index} ({what}): {source}")]
    Setup {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Restore(#[from] PersistError),
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
}

/// Where vCPU threads report their events.
pub type EventSink = Arc<dyn Fn(VcpuEvent) + Send + Sync>;

/// What a vCPU thread tells the VMM thread.
#[derive(Debug)]
pub enum VcpuEvent {
    /// The guest asked to power off or reset.
    Power(PowerEvent),
    /// The vCPU cannot go on (triple fault, KVM error); the VM is in trouble.
    Failed { index: u8, reason: String },
}

/// Creates vCPU `index` and puts it in the 64-bit boot state of `boot`.
pub fn create(vm: &Vm, index: u8, count: u8, boot: &BootImage) -> Result<VcpuFd, VcpuError> {
    let vcpu = vm
        .fd
        .create_vcpu(u64::from(index))
        .map_err(|source| VcpuError::Create { index, source })?;
    let setup = |what: &'static str| {
        move |source| VcpuError::Setup {
            index,
            what,
            source,
        }
    };

    let mut cpuid = vm
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(setup("KVM_GET_SUPPORTED_CPUID"))?;
    patch_cpuid(&mut cpuid, index, count);
    vcpu.set_cpuid2(&cpuid).map_err(setup("KVM_SET_CPUID2"))?;

    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .expect("one MSR entry fits the MSR list");
    vcpu.set_msrs(&msrs).map_err(setup("KVM_SET_MSRS"))?;

    let mut sregs = vcpu.get_sregs().map_err(setup("KVM_GET_SREGS"))?;
    crate::boot::long_mode_sregs(&mut sregs);
    sregs.cr3 = boot.pml4.0;
    vcpu.set_sregs(&sregs).map_err(setup("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rip: boot.entry.0,
        rsp: boot.stack.0,
        rbp: boot.stack.0,
        rsi: boot.boot_params.0,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(setup("KVM_SET_REGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(setup("KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(setup("KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(setup("KVM_SET_LAPIC"))?;

    // A kernel with rayvisor's direct-SMP note has every vCPU start at its entry in long
    // mode (it tells them apart by APIC ID): no INIT/SIPI and real-mode trampoline, which
    // PVM cannot run natively. Any other kernel gets a PC: APs wait for INIT/SIPI.
    if index == 0 || boot.direct_smp {
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(setup("KVM_SET_MP_STATE"))?;
    }
    Ok(vcpu)
}

/// Creates a vCPU and puts the saved `state` into it.
pub fn restore(vm: &Vm, state: &VcpuState) -> Result<VcpuFd, VcpuError> {
    let index = state.index;
    let vcpu = vm
        .fd
        .create_vcpu(u64::from(index))
        .map_err(|source| VcpuError::Create { index, source })?;
    KvmVcpu {
        fd: &vcpu,
        index,
        msrs: &[],
    }
    .restore_state(state)?;
    Ok(vcpu)
}

/// Gives vCPU `index` of `count` its APIC ID and topology in CPUID.
fn patch_cpuid(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(count) << 16) | (u32::from(index) << 24);
                // Hypervisor present; HTT so the logical count above is honoured.
                entry.ecx |= 1 << 31;
                entry.edx |= 1 << 28;
            }
            0xb | 0x1f => entry.edx = u32::from(index),
            _ => {}
        }
    }
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// The period a throttled vCPU's run/sleep split applies to.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

struct Ctl {
    want: Want,
    /// vCPUs currently parked (paused) or gone.
    parked: usize,
    /// Set while the VMM collects vCPU state: the MSRs to save.
    save_msrs: Option<Arc<Vec<u32>>>,
    /// Each parked vCPU saves its own state here (KVM wants vCPU ioctls from its thread).
    saved: Vec<Option<Result<VcpuState, PersistError>>>,
    /// Percent of each throttle period the vCPUs must not run (0 = unthrottled, max 99).
    throttle: u8,
}

/// Shared between the VMM thread and the vCPU threads.
pub struct VcpuControl {
    ctl: Mutex<Ctl>,
    changed: Condvar,
    /// The VM's dirty rings, if on: a vCPU whose ring is full harvests them.
    rings: Option<Arc<DirtyRings>>,
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running vCPU threads of one VM.
pub struct Vcpus {
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
    /// Kicks the vCPUs once per throttle period while a throttle is set.
    kicker: Mutex<Option<Kicker>>,
}

struct Kicker {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Kicker {
    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

fn kick_handler_installed() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        // Failure here means a libc that cannot install signal handlers at all; pausing
        // would then hang, so fail loudly at start-up instead.
        register_signal_handler(SIGRTMIN(), noop).expect("cannot install the vCPU kick handler");
    });
}

impl Vcpus {
    /// Starts one thread per vCPU. They run until paused or told to exit. With `rings`
    /// (the VM's dirty rings), a vCPU whose ring is full empties them and runs on.
    pub fn start(
        fds: Vec<VcpuFd>,
        bus: Arc<IoBus>,
        events: EventSink,
        rings: Option<Arc<DirtyRings>>,
    ) -> Result<Self, VcpuError> {
        kick_handler_installed();
        let control = Arc::new(VcpuControl {
            ctl: Mutex::new(Ctl {
                want: Want::Run,
                parked: 0,
                save_msrs: None,
                saved: (0..fds.len()).map(|_| None).collect(),
                throttle: 0,
            }),
            changed: Condvar::new(),
            rings,
        });
        let mut threads = Vec::with_capacity(fds.len());
        for (i, fd) in fds.into_iter().enumerate() {
            let index = i as u8;
            let (control, bus, events) = (control.clone(), bus.clone(), events.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .stack_size(256 << 10)
                .spawn_in_span(move || {
                    crate::seccomp::enter(crate::seccomp::Kind::Vcpu);
                    run(index, fd, &control, &bus, &events)
                })
                .map_err(|source| VcpuError::Spawn { index, source })?;
            threads.push(thread);
        }
        Ok(Self {
            control,
            threads,
            kicker: Mutex::new(None),
        })
    }

    /// Limits every vCPU to `100 - percent` % of its run time (`percent` is capped at 99);
    /// 0 lifts the throttle.
    pub fn set_throttle(&self, percent: u8) {
        let percent = percent.min(99);
        {
            let mut ctl = self.control.lock();
            ctl.throttle = percent;
            self.control.changed.notify_all();
        }
        let mut kicker = self.kicker.lock().unwrap_or_else(|p| p.into_inner());
        if percent == 0 {
            if let Some(k) = kicker.take() {
                k.stop();
            }
            return;
        }
        if kicker.is_some() {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let pthreads: Vec<libc::pthread_t> =
            self.threads.iter().map(|t| t.as_pthread_t()).collect();
        let flag = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .stack_size(64 << 10)
            .spawn_in_span(move || {
                while !flag.load(Ordering::SeqCst) {
                    std::thread::sleep(THROTTLE_PERIOD);
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    for &t in &pthreads {
                        // SAFETY: the vCPU threads are joined only after this thread was
                        // stopped and joined (`exit` and `drop` stop the kicker first), so
                        // every handle is live; SIGRTMIN has a no-op handler installed.
                        unsafe {
                            libc::pthread_kill(t, SIGRTMIN());
                        }
                    }
                }
            });
        // Without the kicker only vCPUs that exit on their own are throttled; still better
        // than failing the migration.
        if let Ok(thread) = spawned {
            *kicker = Some(Kicker { stop, thread });
        }
    }

    /// How many vCPUs run.
    pub fn count(&self) -> usize {
        self.threads.len()
    }

    /// Restricts vCPU `index`'s thread to host CPUs `cpus` (its guest NUMA node's host
    /// node).
    pub fn pin(&self, index: usize, cpus: &[u32]) -> std::io::Result<()> {
        let t = self.threads.get(index).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("there is no vCPU {index} to pin"),
            )
        })?;
        ray_numa::sys::set_affinity(t.as_pthread_t(), cpus)
    }

    /// The host CPUs vCPU `index`'s thread may run on.
    pub fn affinity(&self, index: usize) -> std::io::Result<Vec<u32>> {
        let t = self.threads.get(index).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("there is no vCPU {index}"),
            )
        })?;
        ray_numa::sys::affinity(t.as_pthread_t())
    }

    /// The current throttle, percent.
    pub fn throttle(&self) -> u8 {
        self.control.lock().throttle
    }

    fn stop_kicker(&self) {
        let k = self.kicker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(k) = k {
            k.stop();
        }
    }

    /// Stops every vCPU at its next instruction boundary and waits until all are parked.
    pub fn pause(&self) {
        self.set_and_wait(Want::Pause);
    }

    /// Collects the state of every vCPU. The vCPUs must be paused.
    pub fn save_state(&self, msrs: Vec<u32>) -> Result<Vec<VcpuState>, PersistError> {
        let mut ctl = self.control.lock();
        debug_assert_eq!(ctl.want, Want::Pause, "save_state needs paused vCPUs");
        ctl.save_msrs = Some(Arc::new(msrs));
        self.control.changed.notify_all();
        while ctl.saved.iter().any(Option::is_none) {
            ctl = self
                .control
                .changed
                .wait(ctl)
                .unwrap_or_else(|p| p.into_inner());
        }
        ctl.save_msrs = None;
        ctl.saved
            .iter_mut()
            .map(|s| s.take().expect("checked above"))
            .collect()
    }

    /// Ends every idle wait now (the guest has input to read): an idle vCPU goes back to
    /// the guest at once instead of after the rest of its idle time.
    pub fn wake_idle(&self) {
        let _ctl = self.control.lock();
        self.control.changed.notify_all();
    }

    pub fn resume(&self) {
        let mut ctl = self.control.lock();
        ctl.want = Want::Run;
        self.control.changed.notify_all();
    }

    /// Ends every vCPU thread.
    pub fn exit(mut self) {
        self.stop_kicker();
        self.set_and_wait(Want::Exit);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    fn set_and_wait(&self, want: Want) {
        let n = self.threads.len();
        let mut ctl = self.control.lock();
        ctl.want = want;
        self.control.changed.notify_all();
        while ctl.parked < n {
            drop(ctl);
            self.kick();
            ctl = self.control.lock();
            if ctl.parked < n {
                ctl = self
                    .control
                    .changed
                    .wait_timeout(ctl, Duration::from_millis(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }

    fn kick(&self) {
        for t in &self.threads {
            // SAFETY: the pthread handle belongs to a thread we spawned and have not joined
            // (joining consumes `threads`), and SIGRTMIN has a handler installed, so the
            // signal cannot terminate the process.
            unsafe {
                libc::pthread_kill(t.as_pthread_t(), SIGRTMIN());
            }
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop_kicker();
    }
}

/// Waits while paused, saving this vCPU's state when asked, and waits out the throttle;
/// returns false when the thread should end. `period` is when this vCPU's current throttle
/// period began.
fn checkpoint(
    index: u8,
    fd: &mut VcpuFd,
    control: &VcpuControl,
    period: &mut Instant,
    io: &mut PendingIo<'_>,
) -> bool {
    let mut ctl = control.lock();
    while ctl.want == Want::Run {
        if ctl.throttle == 0 {
            return true;
        }
        let pct = u32::from(ctl.throttle);
        if period.elapsed() < THROTTLE_PERIOD * (100 - pct) / 100 {
            return true;
        }
        // Off time; a pause, exit or throttle change wakes us early.
        ctl = control
            .changed
            .wait_timeout(ctl, THROTTLE_PERIOD * pct / 100)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        *period = Instant::now();
    }
    io.finish(fd);
    ctl.parked += 1;
    control.changed.notify_all();
    loop {
        if let Some(msrs) = ctl.save_msrs.clone() {
            if ctl.saved[usize::from(index)].is_none() {
                ctl.saved[usize::from(index)] = Some(
                    KvmVcpu {
                        fd,
                        index,
                        msrs: &msrs,
                    }
                    .save_state(),
                );
                control.changed.notify_all();
            }
        }
        match ctl.want {
            Want::Run => {
                ctl.parked -= 1;
                return true;
            }
            // Stay counted as parked: the thread is gone.
            Want::Exit => return false,
            Want::Pause => {
                ctl = control.changed.wait(ctl).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

fn run(index: u8, mut fd: VcpuFd, control: &VcpuControl, bus: &IoBus, events: &EventSink) {
    let fail = |reason: String| {
        events(VcpuEvent::Failed { index, reason });
    };
    let mut period = Instant::now();
    let mut io = PendingIo {
        bus,
        pending: false,
    };
    let exits = crate::metrics::vcpu(index);
    while checkpoint(index, &mut fd, control, &mut period, &mut io) {
        let exit = match fd.run() {
            Ok(exit) => {
                exits.count(exit_reason(&exit));
                serve_access(bus, exit)
            }
            Err(e) => {
                io.pending = false;
                if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN {
                    exits.count(ExitReason::Signal);
                    fd.set_kvm_immediate_exit(0);
                } else {
                    exits.count(ExitReason::Other);
                    fail(format!("KVM_RUN failed: {e}"));
                    park_until_told(control);
                }
                continue;
            }
        };
        io.pending = exit.is_ok();
        match exit {
            Ok(BusEvent::Power(p)) => {
                events(VcpuEvent::Power(p));
                park_until_told(control);
            }
            Ok(BusEvent::Idle(us)) => idle(control, us),
            Ok(BusEvent::None) | Err(VcpuExit::Hlt) | Err(VcpuExit::Intr) => {}
            Err(VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL))
                if control.rings.is_some() =>
            {
                if let Some(r) = &control.rings {
                    r.harvest();
                }
            }
            Err(VcpuExit::Shutdown) => {
                fail("the guest triple-faulted (KVM_EXIT_SHUTDOWN)".into());
                park_until_told(control);
            }
            Err(VcpuExit::SystemEvent(kind, _)) => {
                let event = if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                    PowerEvent::Reset
                } else {
                    PowerEvent::PowerOff
                };
                events(VcpuEvent::Power(event));
                park_until_told(control);
            }
            Err(other) => {
                fail(format!("unexpected KVM exit {other:?}"));
                park_until_told(control);
            }
        }
    }
}

/// The metrics' name for an exit.
fn exit_reason(exit: &VcpuExit<'_>) -> ExitReason {
    match exit {
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => ExitReason::Io,
        VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => ExitReason::Mmio,
        VcpuExit::Hlt => ExitReason::Hlt,
        VcpuExit::Intr => ExitReason::Intr,
        VcpuExit::Shutdown => ExitReason::Shutdown,
        VcpuExit::SystemEvent(..) => ExitReason::SystemEvent,
        _ => ExitReason::Other,
    }
}

/// Serves an exit that is a port or MMIO access (MMIO goes to the PCI bus's BARs; reads of
/// unknown MMIO return all-ones, writes are dropped) and says what it asks of the VMM; any
/// other exit comes back as is.
fn serve_access<'a>(bus: &IoBus, exit: VcpuExit<'a>) -> Result<BusEvent, VcpuExit<'a>> {
    match exit {
        VcpuExit::IoOut(port, data) => Ok(bus.write(port, data)),
        VcpuExit::IoIn(port, data) => {
            bus.read(port, data);
            Ok(BusEvent::None)
        }
        VcpuExit::MmioRead(addr, data) => {
            bus.read_mmio(addr, data);
            Ok(BusEvent::None)
        }
        VcpuExit::MmioWrite(addr, data) => {
            bus.write_mmio(addr, data);
            Ok(BusEvent::None)
        }
        other => Err(other),
    }
}

/// A port or MMIO access the guest's instruction still waits on: KVM completes it, and
/// steps past the instruction, at the start of the next KVM_RUN.
struct PendingIo<'a> {
    bus: &'a IoBus,
    pending: bool,
}

impl PendingIo<'_> {
    /// Completes the pending access without running guest code (KVM_RUN with
    /// `immediate_exit`), so that state saved while this vCPU is parked never holds a
    /// half-done instruction: restored, it would run again (a second console byte, a
    /// second idle).
    fn finish(&mut self, fd: &mut VcpuFd) {
        if !std::mem::take(&mut self.pending) {
            return;
        }
        fd.set_kvm_immediate_exit(1);
        // Completing a string instruction may exit again for its next element.
        for _ in 0..64 {
            let Ok(exit) = fd.run() else { break };
            if serve_access(self.bus, exit).is_err() {
                break;
            }
        }
        fd.set_kvm_immediate_exit(0);
    }
}

/// The guest idles for up to `us` µs ([`ray_guest_abi::IDLE_PORT`]): this thread waits off
/// the CPU, and wakes early when the VMM wants the vCPU (pause, exit, throttle change) or
/// the guest has input ([`Vcpus::wake_idle`]).
fn idle(control: &VcpuControl, us: u32) {
    let ctl = control.lock();
    if ctl.want == Want::Run {
        let d = Duration::from_micros(u64::from(us.min(ray_guest_abi::IDLE_MAX_US)));
        let _ = control.changed.wait_timeout(ctl, d);
    }
}

/// After a terminal guest event the vCPU must not run on; it waits for the VMM's verdict.
fn park_until_told(control: &VcpuControl) {
    let mut ctl = control.lock();
    if ctl.want == Want::Run {
        ctl.want = Want::Pause;
    }
    control.changed.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_bits_are_replaced_and_the_rest_kept() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x10u8 as std::os::raw::c_char; // vector bits
        regs[APIC_LVT0 + 1] = 0x07u8 as std::os::raw::c_char; // old mode bits
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT0] as u8, 0x10);
        assert_eq!(regs[APIC_LVT0 + 1] as u8 & 0x7, 0x4);
    }
}
