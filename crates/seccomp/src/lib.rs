//! seccomp filters for the VMM's threads.
//!
//! A VMM feeds guest-controlled input to its device models; should one of them be subverted,
//! the seccomp filter of the thread it runs on bounds what it can ask of the host kernel.
//! Each kind of thread ([`Kind`]) has its own allow-list ([`lists`]), built from traces of
//! the end-to-end suite, and installs it itself as it starts ([`enter`]).
//!
//! Filters stack: a thread runs under its parent's filter and its own, so a thread that
//! starts others must allow their system calls too ([`Kind::starts`]). The VMM's first
//! thread starts every other kind: its filter is the union of all lists, installed by
//! [`install`] on every thread then alive, and each later thread narrows it to its kind.
//!
//! Nothing is filtered until [`install`] sets a policy: the same device models running
//! outside a VMM (vhost-user back ends, unit tests) are not affected.
//!
//! In `kill` mode a forbidden call raises SIGSYS; the handler ([`report`]) writes which
//! thread made which call to stderr and, as the VM's exit record, to `seccomp.json` in the
//! VM's directory, then ends the process with [`KILLED_EXIT_CODE`].
pub mod lists;
mod report;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use report::{KILLED_EXIT_CODE, KILLED_REASON, RECORD_FILE};

/// The kinds of thread a VMM runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The VMM thread (the controller) and the helpers it starts without a kind of their
    /// own (signals, stdin, prefault, lazy memory, sync-behind, KVM preparation).
    Main,
    /// A vCPU: KVM_RUN and the exits it handles (port and MMIO devices).
    Vcpu,
    /// The API server (HTTP on the Unix socket and optional TCP) and its blocking helpers.
    Api,
    /// A virtio device's I/O thread (net, vsock, the PCI transport's event thread).
    DeviceIo,
    /// A virtio-blk worker: reads and writes the disk file.
    BlkWorker,
    /// Live migration: sender, receiver and the migration heartbeat.
    Migration,
    /// VNC servers and viewers of the VM's displays.
    Display,
    /// The NUMA page-migration policy thread (harvests the dirty ring, moves pages).
    Harvester,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Main,
        Kind::Vcpu,
        Kind::Api,
        Kind::DeviceIo,
        Kind::BlkWorker,
        Kind::Migration,
        Kind::Display,
        Kind::Harvester,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Main => "main",
            Kind::Vcpu => "vcpu",
            Kind::Api => "api",
            Kind::DeviceIo => "device-io",
            Kind::BlkWorker => "blk-worker",
            Kind::Migration => "migration",
            Kind::Display => "display",
            Kind::Harvester => "harvester",
        }
    }

    /// The kinds of thread this kind starts that install a filter of their own (the traces
    /// show every device, migration, display and harvester thread started by the VMM
    /// thread; the API and VNC threads start helpers that keep their filter).
    pub fn starts(self) -> &'static [Kind] {
        match self {
            Kind::Main => &Kind::ALL,
            _ => &[],
        }
    }

    /// Every system call this kind's filter allows: its own lists and those of the kinds
    /// it starts.
    pub fn syscalls(self) -> BTreeSet<i64> {
        let mut all: BTreeSet<i64> = lists::of(self).iter().copied().collect();
        for &child in self.starts() {
            if child != self {
                all.extend(child.syscalls());
            }
        }
        all
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a filter does with a call its list does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No filters.
    Off,
    /// Allow the call and have the kernel log it (the audit log; `dmesg` shows
    /// `type=1326` lines naming the thread and the call): for building lists.
    Log,
    /// End the VMM, recording which thread made which call.
    Kill,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Log => "log",
            Mode::Kill => "kill",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Mode::Off),
            "log" => Ok(Mode::Log),
            "kill" => Ok(Mode::Kill),
            _ => Err(format!("'{s}' is not a seccomp mode: use off, log or kill")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {kind} threads: {source}")]
    Build {
        kind: Kind,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of the {kind} threads: {source}")]
    Apply {
        kind: Kind,
        source: seccompiler::Error,
    },
    #[error("cannot set up the seccomp violation report: {0}")]
    Report(std::io::Error),
    #[error("seccomp filters are installed already")]
    Twice,
}

/// The filters of this process, one per kind (in [`Kind::ALL`] order), once installed.
static FILTERS: OnceLock<Vec<BpfProgram>> = OnceLock::new();

/// Builds the filter of `kind` for `mode` (not [`Mode::Off`]).
pub fn build(kind: Kind, mode: Mode) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        Mode::Kill | Mode::Off => SeccompAction::Trap,
    };
    let rules = kind.syscalls().into_iter().map(|nr| (nr, vec![])).collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|source| SeccompError::Build { kind, source })?;
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .and_then(BpfProgram::try_from)
        .map_err(|source| SeccompError::Build { kind, source })
}

/// Sets this process's policy: builds every kind's filter and installs the [`Kind::Main`]
/// one on every thread now alive (the calling thread being the VMM thread). With
/// [`Mode::Off`] nothing happens and [`enter`] stays a no-op.
pub fn install(mode: Mode) -> Result<(), SeccompError> {
    if mode == Mode::Off {
        return Ok(());
    }
    let filters = Kind::ALL
        .iter()
        .map(|&k| build(k, mode))
        .collect::<Result<Vec<_>, _>>()?;
    if mode == Mode::Kill {
        report::catch_sigsys().map_err(SeccompError::Report)?;
    }
    FILTERS.set(filters).map_err(|_| SeccompError::Twice)?;
    report::set_thread(Kind::Main);
    seccompiler::apply_filter_all_threads(filter(Kind::Main)).map_err(|source| {
        SeccompError::Apply {
            kind: Kind::Main,
            source,
        }
    })?;
    Ok(())
}

/// From now on a violation is also recorded as the exit record of VM `id`, in `dir`.
pub fn record_to(dir: &Path, id: &str) -> Result<(), SeccompError> {
    report::record_to(dir, id).map_err(SeccompError::Report)?;
    // The VMM thread's test hook waits for the record, so that a test can read it.
    trip(Kind::Main);
    Ok(())
}

/// Whether filters are installed in this process.
pub fn active() -> bool {
    FILTERS.get().is_some()
}

fn filter(kind: Kind) -> &'static BpfProgram {
    // Only called once FILTERS is set; every kind has its entry.
    &FILTERS.get().expect("filters installed")[kind as usize]
}

/// Called first thing by every thread of kind `kind`: installs its filter (when a policy
/// is set). A thread that cannot filter itself must not run: the process aborts.
pub fn enter(kind: Kind) {
    if !active() {
        return;
    }
    report::set_thread(kind);
    if let Err(e) = seccompiler::apply_filter(filter(kind)) {
        tracing::error!("cannot install the seccomp filter of the {kind} threads: {e}");
        std::process::abort();
    }
    trip(kind);
}

/// Called first thing by a thread that keeps the filter of the `kind` thread that started
/// it (the API's and the VNC server's helpers): names it for the violation report only.
pub fn inherit(kind: Kind) {
    if active() {
        report::set_thread(kind);
    }
}

/// Test hook (debug builds only): when `RAY_SECCOMP_TRIP` names this kind, the thread makes
/// a call no filter allows (`mount` with null arguments, which fails harmlessly when
/// unfiltered), so that a test can see the filter stop it.
#[cfg(debug_assertions)]
fn trip(kind: Kind) {
    if std::env::var("RAY_SECCOMP_TRIP").is_ok_and(|k| k == kind.name()) {
        // SAFETY: mount with null pointers only reads its arguments, and fails with EFAULT
        // when no filter stops it.
        unsafe {
            libc::syscall(
                libc::SYS_mount,
                std::ptr::null::<u8>(),
                std::ptr::null::<u8>(),
                std::ptr::null::<u8>(),
                0,
                std::ptr::null::<u8>(),
            );
        }
    }
}

#[cfg(not(debug_assertions))]
fn trip(_kind: Kind) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds_and_main_allows_every_kinds_calls() {
        let main = Kind::Main.syscalls();
        for kind in Kind::ALL {
            assert!(!build(kind, Mode::Kill).unwrap().is_empty());
            assert!(kind.syscalls().is_subset(&main), "{kind}");
        }
    }

    #[test]
    fn no_list_allows_what_a_vmm_never_needs() {
        for kind in Kind::ALL {
            let calls = kind.syscalls();
            for forbidden in [
                libc::SYS_mount,
                libc::SYS_ptrace,
                libc::SYS_execve,
                libc::SYS_setuid,
                libc::SYS_init_module,
                libc::SYS_kexec_load,
                libc::SYS_bpf,
            ] {
                assert!(!calls.contains(&forbidden), "{kind} allows {forbidden}");
            }
        }
    }

    #[test]
    fn starting_threads_keeps_the_started_kinds_calls() {
        for kind in Kind::ALL {
            for &child in kind.starts() {
                assert!(
                    child.syscalls().is_subset(&kind.syscalls()),
                    "{kind} {child}"
                );
            }
        }
        // A vCPU opens no files and makes no connections; a disk worker opens no files.
        for call in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_clone3,
        ] {
            assert!(!Kind::Vcpu.syscalls().contains(&call), "{call}");
        }
        assert!(!Kind::BlkWorker.syscalls().contains(&libc::SYS_openat));
        // The disk's io_uring engine sets up and enters its ring on its own thread.
        for call in [libc::SYS_io_uring_setup, libc::SYS_io_uring_enter] {
            assert!(Kind::BlkWorker.syscalls().contains(&call), "{call}");
            assert!(!Kind::Vcpu.syscalls().contains(&call), "{call}");
        }
    }

    #[test]
    fn modes_parse_and_bad_ones_are_named() {
        for m in [Mode::Off, Mode::Log, Mode::Kill] {
            assert_eq!(m.name().parse::<Mode>().unwrap(), m);
        }
        assert!("strict".parse::<Mode>().unwrap_err().contains("'strict'"));
    }

    /// In a child process (fork: filters cannot be removed), a filtered thread that makes
    /// a forbidden call ends the process with the documented code.
    #[test]
    fn a_forbidden_call_ends_the_process_with_the_code() {
        let f = build(Kind::BlkWorker, Mode::Kill).unwrap();
        // SAFETY: the child only installs a filter and makes system calls before _exit
        // (no allocation: other test threads may hold the allocator's lock).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let armed = report::catch_sigsys().is_ok() && seccompiler::apply_filter(&f).is_ok();
            if armed {
                // SAFETY: PTRACE_TRACEME has no pointer arguments; the filter stops it.
                unsafe { libc::syscall(libc::SYS_ptrace, 0, 0, 0, 0) };
            }
            // SAFETY: ends the forked child at once.
            unsafe { libc::_exit(1) };
        }
        let mut status = 0;
        // SAFETY: pid is our child; status a valid out pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), KILLED_EXIT_CODE);
    }
}
