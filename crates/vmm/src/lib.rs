//! rayvisor VMM: one process per VM on KVM.
//!
//! Threads: the VMM thread (the caller of [`run`]) owns all VM state and reacts to
//! messages; the API thread parses HTTP requests into typed requests; one thread per vCPU
//! runs KVM_RUN; a signal thread turns SIGINT/SIGTERM into a stop.
pub mod acl;
pub mod api_server;
pub mod bochs;
pub mod boot;
pub mod config;
pub mod console_attach;
pub mod controller;
pub mod display;
pub mod display_bochs;
pub mod hand_over;
pub mod handoff;
pub mod heartbeat;
pub mod jailed;
pub mod lease;
pub mod lifecycle;
pub mod logging;
pub mod machine;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod net;
pub mod numa;
pub mod numa_migrate;
pub mod passthrough;
pub mod pci;
pub mod prefault;
/// seccomp filters per thread kind (their own crate: device models install them too).
pub use ray_seccomp as seccomp;
pub mod snapshot;
pub mod startup;
pub mod sync_behind;
pub mod vmlock;
pub mod vsock;
pub mod vstate;

/// The device models (their own crate, with no KVM dependency).
pub use ray_devices as devices;

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ray_api::vmm::VmConfig;

use controller::{Controller, Message, Request, Response, VmPaths};
use lifecycle::{AuditTrail, VmState};
use logging::SpawnInSpan;

/// How `ray vmm` was asked to run.
pub struct VmmOptions {
    pub id: String,
    /// The VM's directory in the runtime directory (socket, logs, events).
    pub dir: PathBuf,
    /// Console on stdin/stdout.
    pub attach: bool,
    /// Configure at once (as `PUT /vm/config` would).
    pub config: Option<VmConfig>,
    /// Start at once (needs `config`).
    pub start: bool,
    /// Restore this snapshot directory at once instead of booting.
    pub restore: Option<PathBuf>,
    /// With `restore`: check guest memory against the snapshot's checksums first (the one
    /// restore step whose cost grows with memory size).
    pub verify_memory: bool,
    /// Wait for an incoming live migration instead of booting (`config`, if given, is
    /// what the source's VM must match; without it the VM takes the source's shape).
    pub incoming: Option<Incoming>,
    /// The lock on `dir` ([`vmlock`]), inherited as this descriptor from the process that
    /// started this VMM; without it the VMM takes the lock itself.
    pub lock_fd: Option<std::os::fd::RawFd>,
    /// Also serve the API on this loopback TCP address (port 0: any free port).
    pub api_tcp: Option<std::net::SocketAddr>,
    /// Write the start-up stamps ([`startup`]) to this file when the VMM ends.
    pub timings: Option<PathBuf>,
    /// The threads' seccomp filters ([`seccomp`]).
    pub seccomp: seccomp::Mode,
    /// Fence (pause the vCPUs) unless the local lease is renewed ([`lease`]): its time
    /// to live, from a CLOCK_MONOTONIC time in ns (default: now). A cluster agent's VMMs
    /// have one.
    pub lease: Option<(Duration, Option<u64>)>,
    /// Also serve VNC on this loopback TCP address, with the password in this file.
    pub vnc_tcp: Option<(std::net::SocketAddr, PathBuf)>,
}

impl VmmOptions {
    /// Where the VM comes from, as the log says it.
    fn origin_name(&self) -> &'static str {
        match (&self.incoming, &self.restore, self.start) {
            (Some(_), _, _) => "incoming migration",
            (None, Some(_), _) => "restore",
            (None, None, true) => "boot",
            (None, None, false) => "configure over the API",
        }
    }
}

/// Where and how a migration target waits for its VM.
pub struct Incoming {
    /// `HOST:PORT` or `unix:/path`.
    pub listen: String,
    pub key_file: PathBuf,
    /// Host-wide cap on concurrent migrations.
    pub max_concurrent: u32,
    /// Populate all of guest memory while waiting (see [`prefault`]).
    pub prefault: bool,
    /// Accept the VM unencrypted over TCP (`--insecure-plaintext`).
    pub insecure_plaintext: bool,
    /// Where disks a source copies (`copy_disks`) go: `DIR/<disk id>.img`.
    pub disk_dir: Option<PathBuf>,
    /// What `ray migrate receive` opened for a jailed target (which cannot itself).
    pub handed: Option<HandedIncoming>,
}

/// What a jailed migration target cannot open itself, from its own network namespace
/// and private root: `ray migrate receive` (in the host's) binds the listener, opens the
/// key file and takes the host-wide migration slot, and the VMM inherits the three.
pub struct HandedIncoming {
    /// The listening socket, bound on [`Incoming::listen`].
    pub listener: std::os::fd::OwnedFd,
    /// The key file, opened (checked again here).
    pub key: std::fs::File,
    /// The migration slot's locked file (the lock goes with the open file).
    pub slot: std::fs::File,
}

/// Why a VMM ended before its VM was up; `ray vmm` turns the kind into its exit code.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another VMM runs (or is starting) this VM: nothing here was touched.
    #[error(transparent)]
    Locked(#[from] vmlock::LockError),
    /// The request or the VM's state refused it, or carrying it out failed.
    #[error(transparent)]
    Controller(#[from] controller::ControllerError),
}

/// Files a previous VM of the same id left in its directory: moved to `<name>.1` when a
/// new VMM takes the directory, so the new VM's logs and audit trail start fresh.
pub const ROTATED_FILES: &[&str] = &["serial.log", "events.jsonl", "migration.json"];

/// The record a VMM leaves behind when it ends.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct ExitRecord {
    pub id: String,
    pub state: ray_api::vmm::VmStateName,
    pub reason: Option<String>,
    pub pid: u32,
}

fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it fully, and
    // pthread_sigmask only changes this thread's mask (threads spawned later inherit it,
    // which is the point: only the signal thread takes SIGINT/SIGTERM).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn spawn_signal_thread(set: libc::sigset_t, inbox: mpsc::Sender<Message>) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 << 10)
        .spawn_in_span(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialised signal set and `sig` a valid out pointer;
            // the signals are blocked in every thread, so sigwait is the only taker.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0
                && inbox.send(Message::Signal(sig)).is_err()
            {
                break;
            }
        });
}

fn spawn_stdin_thread(inbox: mpsc::Sender<Message>) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .stack_size(64 << 10)
        .spawn_in_span(move || {
            let stdin = std::io::stdin();
            let mut line = Vec::new();
            while stdin.lock().read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                let reply = Box::new(|r: Result<_, controller::ControllerError>| {
                    if let Err(e) = r {
                        tracing::warn!("console input dropped: {e}");
                    }
                });
                let data = std::mem::take(&mut line);
                if inbox
                    .send(Message::Api(Request::ConsoleInput(data), reply))
                    .is_err()
                {
                    break;
                }
            }
        });
}

/// How the exit record of a VMM whose VM never came up starts its reason.
pub const FAILED_TO_START: &str = "the VMM failed to start: ";

/// The exit record of a VMM whose VM never came up: `error`, with why.
fn failed_to_start(ctl: &Controller, id: &str, e: &controller::ControllerError) {
    let record = ExitRecord {
        id: id.to_string(),
        state: VmState::Error,
        reason: Some(format!("{FAILED_TO_START}{e}")),
        pid: jailed::host_pid(),
    };
    if let Ok(json) = serde_json::to_vec_pretty(&record) {
        let _ = std::fs::write(ctl.paths.exit_record(), json);
    }
}

/// Runs one VMM until its VM ends. Returns the final state.
pub fn run(opts: VmmOptions) -> anyhow::Result<VmState> {
    one_malloc_arena();
    // Before any thread starts that could inherit no filter.
    seccomp::install(opts.seccomp)?;
    // Every event of this process, on every thread started with spawn_in_span, belongs
    // to this VM.
    let vm_span = tracing::info_span!("vm", id = %opts.id);
    let _in_vm = vm_span.enter();
    let signals = block_stop_signals();
    // A restore's KVM VM needs nothing from the snapshot or this VM's directory: it is
    // created meanwhile (dropped unused if the VMM cannot go on).
    let prep = (opts.restore.is_some() && opts.incoming.is_none())
        .then(|| vstate::vm::ShellPrep::start(vstate::Flavour::detect()));
    std::fs::create_dir_all(&opts.dir)?;
    // First of all: only the holder of the directory's lock touches anything in it.
    let lock = match opts.lock_fd {
        Some(fd) => vmlock::VmLock::inherit(fd, &opts.dir),
        None => vmlock::VmLock::acquire(&opts.dir, &opts.id),
    }
    .map_err(StartError::from)?;
    lock.set_owner(jailed::host_pid());
    // A record an earlier VMM's filter left is stale from here on.
    let _ = std::fs::remove_file(opts.dir.join(seccomp::RECORD_FILE));
    if seccomp::active() {
        seccomp::record_to(&opts.dir, &opts.id)?;
    }
    tracing::info!(
        pid = jailed::host_pid(),
        origin = opts.origin_name(),
        "VMM started"
    );
    let paths = VmPaths {
        dir: opts.dir.clone(),
    };
    let _ = std::fs::remove_file(paths.exit_record());
    vmlock::rotate(&opts.dir, ROTATED_FILES);
    std::fs::write(paths.pid_file(), jailed::host_pid().to_string())?;
    let audit = AuditTrail::open(&paths.events())?;
    let (tx, rx) = mpsc::channel::<Message>();
    let mut ctl = Controller::new(opts.id.clone(), paths, opts.attach, audit, tx.clone());
    if let Some((addr, file)) = &opts.vnc_tcp {
        let password = display::check_vnc_tcp(*addr, file).map_err(anyhow::Error::msg)?;
        ctl.displays.serve_tcp(*addr, password);
    }
    spawn_signal_thread(signals, tx.clone());
    if let Some((ttl, since)) = opts.lease {
        lease::LeaseState::check_ttl(ttl).map_err(|e| anyhow::anyhow!("--lease-ttl: {e}"))?;
        let since = match since {
            Some(ns) => {
                lease::instant_of(ns).map_err(|e| anyhow::anyhow!("--lease-since-ns: {e}"))?
            }
            None => Instant::now(),
        };
        ctl.lease.with(|l| l.renew(since, ttl));
        let inbox = tx.clone();
        lease::spawn_watchdog(ctl.lease.clone(), move |done| {
            let reply: controller::Reply = Box::new(move |_| done());
            inbox.send(Message::Api(Request::Fence, reply)).is_ok()
        })?;
    }

    if let Some(cfg) = opts.config {
        let configured = match opts.incoming {
            Some(_) => ctl.configure_incoming(cfg).map(|_| Response::Done),
            None => ctl.handle(Request::Configure(cfg), &rx),
        };
        if let Err(e) = configured {
            failed_to_start(&ctl, &opts.id, &e);
            return Err(StartError::from(e).into());
        }
    }
    // The API's sockets exist from here on (a client finds a live VMM and its requests
    // wait), but serving them starts once the VM runs: building the router is start-up
    // work the restored guest need not wait for.
    let listeners = api_server::ApiListeners::bind(&ctl.paths.socket(), opts.api_tcp)?;
    // A jailed VMM takes what it cannot open itself from `ray` (`handoff`); an old socket
    // would tell clients this VMM is one.
    let _ = std::fs::remove_file(ctl.paths.dir.join(handoff::SOCKET));
    if jailed::get().is_some() {
        ctl.handoff = Some(handoff::Inbox::bind(&ctl.paths.dir)?);
    }
    if opts.attach {
        // Console input typed before the VM runs waits in the inbox.
        spawn_stdin_thread(tx.clone());
    }
    let started = match (&opts.restore, opts.incoming) {
        (_, Some(inc)) => ctl.listen_incoming(inc).map(|_| Response::Done),
        (Some(dir), None) => ctl
            .restore(dir, opts.verify_memory, prep)
            .map(|_| Response::Done),
        (None, None) if opts.start => ctl.handle(Request::Start, &rx),
        (None, None) => Ok(Response::Done),
    };
    if let Err(e) = started {
        drop(listeners);
        let _ = std::fs::remove_file(ctl.paths.socket());
        failed_to_start(&ctl, &opts.id, &e);
        return Err(StartError::from(e).into());
    }
    // Start-up work the guest's first answers need not wait for happens once the VMM
    // thread has been idle a moment: serving the API (its requests wait in the socket's
    // backlog until then) and returning the heap start-up freed (malloc_trim holds the
    // allocator's lock).
    let mut api = Some((listeners, tx));
    let mut server = None;
    let mut api_start = Deferred::new(API_AFTER_IDLE, API_AT_LATEST);
    let mut trim = Deferred::new(TRIM_AFTER_IDLE, TRIM_AT_LATEST);
    let mut fill = Deferred::new(FILL_AFTER_IDLE, FILL_AT_LATEST);
    while !matches!(ctl.state(), VmState::Terminated) {
        let next = [api_start.at, trim.at, fill.at].into_iter().flatten().min();
        // Messages deferred while long work ran come first, in order.
        let received = match (ctl.take_deferred(), next) {
            (Some(msg), _) => Ok(msg),
            (None, Some(at)) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            (None, None) => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        let msg = match received {
            Ok(msg) => {
                api_start.postpone();
                trim.postpone();
                fill.postpone();
                msg
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if api_start.due() {
                    if let Some((listeners, tx)) = api.take() {
                        server = Some(api_server::ApiServer::start(
                            listeners,
                            tx,
                            ctl.ring.clone(),
                            ctl.meter.clone(),
                            ctl.displays.clone(),
                        )?);
                    }
                }
                if trim.due() {
                    release_freed_heap();
                }
                if fill.due() {
                    ctl.fill_in_background();
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        match msg {
            Message::Api(request, reply) => reply(ctl.handle(request, &rx)),
            Message::Vcpu(event) => ctl.on_vcpu_event(event),
            Message::Signal(sig) => ctl.on_signal(sig, &rx),
            Message::Migration(op, reply) => {
                let resumed = matches!(op, migration::MigrationOp::TargetResume);
                let result = ctl.migration_op(op);
                let ok = result.is_ok();
                let _ = reply.send(result);
                if resumed && ok {
                    ctl.finish_target_resume();
                }
            }
            Message::MigrationEnded(ended) => ctl.on_migration_ended(ended),
            Message::Wake => {}
        }
    }
    // Answer whatever is still queued so no client hangs, then let in-flight responses
    // flush before the socket goes away.
    while let Ok(msg) = rx.recv_timeout(Duration::from_millis(5)) {
        if let Message::Api(request, reply) = msg {
            reply(ctl.handle(request, &rx));
        }
    }
    // Later requests are answered "shutting down" (their replies drop with the inbox), so
    // no connection keeps the server from stopping.
    drop(rx);
    drop(api);
    if let Some(mut server) = server {
        server.stop();
    }
    let info = ctl.info();
    let record = ExitRecord {
        id: opts.id,
        state: info.state,
        reason: info.exit_reason,
        pid: jailed::host_pid(),
    };
    let _ = std::fs::write(ctl.paths.exit_record(), serde_json::to_vec_pretty(&record)?);
    let _ = std::fs::remove_file(ctl.paths.socket());
    if let Some(path) = &opts.timings {
        if let Err(e) = startup::write(path) {
            tracing::warn!("cannot write the start-up times to {}: {e}", path.display());
        }
    }
    tracing::info!(state = ?info.state, reason = record.reason.as_deref().unwrap_or(""), "VMM ended");
    drop(lock);
    Ok(ctl.state())
}

/// One malloc arena for the whole VMM, set before any thread starts. glibc gives each thread
/// that allocates an arena of its own (API, vCPU, signal threads), each with pages of its
/// own; the VMM's threads allocate little, so one arena saves private memory (`ray bench
/// boot`: anonymous part 0.52 -> 0.41 MiB) at no measurable boot-time cost.
fn one_malloc_arena() {
    // SAFETY: mallopt only tunes the allocator; no allocation is moved or freed.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// How long the VMM thread must have had nothing to do before the API is served...
const API_AFTER_IDLE: Duration = Duration::from_millis(1);
/// ... or this long after the VM started, however busy it is.
const API_AT_LATEST: Duration = Duration::from_millis(50);
/// The same for the background check of a lazily verified restore's memory...
const FILL_AFTER_IDLE: Duration = Duration::from_millis(10);
const FILL_AT_LATEST: Duration = Duration::from_millis(200);
/// ... and for [`release_freed_heap`].
const TRIM_AFTER_IDLE: Duration = Duration::from_millis(20);
const TRIM_AT_LATEST: Duration = Duration::from_secs(1);

/// One piece of work done once, when the VMM thread has been idle `idle` (every message
/// postpones it), or at the latest `latest` after it was planned.
struct Deferred {
    at: Option<Instant>,
    latest: Instant,
    idle: Duration,
}

impl Deferred {
    fn new(idle: Duration, latest: Duration) -> Self {
        let now = Instant::now();
        Self {
            at: Some(now + idle),
            latest: now + latest,
            idle,
        }
    }

    fn postpone(&mut self) {
        if let Some(at) = self.at.as_mut() {
            *at = (Instant::now() + self.idle).min(self.latest);
        }
    }

    /// Whether it is time (then it is done: later calls say no).
    fn due(&mut self) -> bool {
        match self.at {
            Some(at) if at <= Instant::now() => {
                self.at = None;
                true
            }
            _ => false,
        }
    }
}

/// Gives the heap pages that start-up allocated and freed (argument parsing builds the
/// command tree; configuration, boot) back to the kernel once the VM runs.
fn release_freed_heap() {
    // SAFETY: malloc_trim only returns free heap pages to the kernel; live allocations
    // are untouched.
    unsafe {
        libc::malloc_trim(0);
    }
}
