//! The VMM thread: owns the VM's state and is the only code that changes it. The API
//! thread and the vCPU threads talk to it through one channel of typed messages.
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ray_api::vmm::{
    LifecycleEvent, MigrateRequest, MigrationRole, MigrationStatus, OnLimit, SnapshotInfo,
    SnapshotKind, SnapshotRequest, VmConfig, VmInfo,
};
use ray_guest_abi::offset;
use ray_memory::{ConsumerId, DirtyBitmap};

use crate::devices::{ConsoleRing, PowerEvent};
use crate::lease::LeaseState;
use crate::lifecycle::{guest_runs, transition, AuditTrail, TransitionError, VmAction, VmState};
use crate::machine::{ConsoleSinks, Machine};
use crate::migration::{self as mig, Ended, MigrationOp, OpReply, OpResult};
use crate::vstate::vcpu::{EventSink, VcpuEvent};
use crate::vstate::vm::Vm;
use crate::vstate::Flavour;
use crate::{config, heartbeat};

/// A request from the API (or the CLI flags) to the VMM thread.
#[derive(Debug)]
pub enum Request {
    Info,
    Configure(VmConfig),
    Start,
    Pause,
    Resume,
    Suspend,
    Stop {
        timeout: Duration,
    },
    Snapshot(SnapshotRequest),
    Events,
    ConsoleInput(Vec<u8>),
    Migrate(MigrateRequest),
    MigrationStatus,
    MigrationCancel,
    MigrationReclaim,
    /// Renew the local lease (`PUT /vm/lease`): this long from then (default: now); or
    /// clear it (`None`).
    Lease(Option<(Duration, Option<u64>)>),
    /// The lease watchdog found the deadline passed: fence (pause the vCPUs).
    Fence,
    /// Change the NUMA policy of the running VM (`PUT /vm/numa/policy`).
    NumaPolicy(ray_api::vmm::NumaPolicyRequest),
    /// The one descriptor a client handed this (jailed) VMM under a token, for a request
    /// served off this thread (an encode session's output file).
    TakeHandoff(String),
}

impl Request {
    /// Whether this only reads the VM's status (or renews its lease, which touches
    /// nothing of the VM): answered at once, even while long work (a snapshot being
    /// written) keeps the VMM thread busy, so a renewal is never late for it.
    pub fn is_status_read(&self) -> bool {
        matches!(
            self,
            Request::Info | Request::Events | Request::MigrationStatus | Request::Lease(_)
        )
    }
}

#[derive(Debug)]
pub enum Response {
    Info(Box<VmInfo>),
    Snapshot(SnapshotInfo),
    Events(Vec<LifecycleEvent>),
    Migration(Box<MigrationStatus>),
    Handed(std::os::fd::OwnedFd),
    Done,
}

mod migrations;
mod snapshots;

/// A refused or failed request. Only the API layer turns its kind into an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    /// The request itself is wrong (a bad value, a path that may not be used).
    #[error("{0}")]
    Invalid(String),
    /// The request is fine but the VM's state (or the host's) does not allow it now.
    #[error("{0}")]
    Refused(String),
    /// Refused for a moment only: the same request succeeds once the guest or a migration
    /// has moved on (console input while the guest's input queue is full, or while a
    /// migration's last copy runs). The API answers it as [`ControllerError::Refused`];
    /// the VMM's own callers wait and retry.
    #[error("{0}")]
    Busy(String),
    /// What the request names does not exist (no migration, no snapshot).
    #[error("{0}")]
    NotFound(String),
    /// The request was valid and allowed, and carrying it out failed.
    #[error("{0}")]
    Failed(String),
}

impl ControllerError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }
    pub fn refused(message: impl Into<String>) -> Self {
        Self::Refused(message.into())
    }
    pub fn failed(message: impl Into<String>) -> Self {
        Self::Failed(message.into())
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(message.into())
    }
}

impl From<TransitionError> for ControllerError {
    fn from(e: TransitionError) -> Self {
        ControllerError::refused(e.to_string())
    }
}

pub type Reply = Box<dyn FnOnce(Result<Response, ControllerError>) + Send>;

/// Everything the VMM thread reacts to.
pub enum Message {
    Api(Request, Reply),
    Vcpu(VcpuEvent),
    /// SIGINT/SIGTERM reached the process: stop at once.
    Signal(i32),
    /// The migration thread asks the VMM thread to act on the VM.
    Migration(MigrationOp, std::sync::mpsc::Sender<OpResult>),
    /// The migration thread ended.
    MigrationEnded(Ended),
    /// Long work the VMM thread waits for (a snapshot being written) is done.
    Wake,
}

/// Files of one VM in the runtime directory.
#[derive(Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    pub fn events(&self) -> PathBuf {
        self.dir.join("events.jsonl")
    }
    pub fn exit_record(&self) -> PathBuf {
        self.dir.join("exit.json")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("vmm.pid")
    }
    /// The last migration's final status, left behind when the VMM ends.
    pub fn migration_record(&self) -> PathBuf {
        self.dir.join("migration.json")
    }
    /// The runtime directory (`<runtime>/vms/<id>` → `<runtime>`).
    pub fn runtime(&self) -> PathBuf {
        self.dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(&self.dir)
            .to_path_buf()
    }
}

/// Read/write timeout on migration sockets: a silent peer fails the migration after it.
const MIGRATION_IO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Controller {
    pub id: String,
    pub paths: VmPaths,
    pub attach: bool,
    pub flavour: Flavour,
    state: VmState,
    audit: AuditTrail,
    config: Option<VmConfig>,
    machine: Option<Machine>,
    started: Option<Instant>,
    exit_reason: Option<String>,
    pub ring: Arc<ConsoleRing>,
    vcpu_events: Sender<Message>,
    /// The current or last migration of this VM.
    migration: Option<mig::Handle>,
    /// The log span of the current (or last) migration: its events and steps, on the
    /// migration thread and on this one, carry its direction and peer.
    migration_span: tracing::Span,
    /// Messages that arrived while long work ran and were not status reads: handled, in
    /// order, before the next new message ([`Controller::take_deferred`]).
    deferred: std::collections::VecDeque<Message>,
    /// Target: the KVM VM (memory slots registered, with dirty logging) created over the
    /// guest memory of an incoming migration; the state goes onto it at the switch-over.
    incoming_vm: Option<Vm>,
    /// Target: the source's checked state, applied at the switch-over.
    incoming_state: Option<Box<mig::MigrationState>>,
    /// Target: the disks the source copies here (`copy_disks`), id and file.
    copied_disks: Vec<(String, std::path::PathBuf)>,
    /// The store and id of this VM's latest snapshot: the parent of the next incremental.
    last_snapshot: Option<(PathBuf, String)>,
    /// The dirty-log consumer of incremental snapshots: pages written since `last_snapshot`.
    snapshot_log: Option<ConsumerId>,
    /// The migration's dirty-log consumer while a migration (source) runs.
    migration_log: Option<ConsumerId>,
    /// Pages owed to the next incremental snapshot across a suspend (the machine, and so
    /// its dirty log, is gone meanwhile).
    suspended_owed: Option<DirtyBitmap>,
    /// Progress of the snapshot being written, shared with the API thread.
    pub meter: Arc<crate::snapshot::Meter>,
    /// Set once a restored VM started: what a lazily verified restore's fail-stop (on
    /// another thread) records as the state it failed from.
    restored: Arc<std::sync::atomic::AtomicBool>,
    /// Where the running machine's guest NUMA nodes are placed on this host (none without
    /// `numa`, or when they could not be placed here).
    numa: Option<crate::numa::GuestNuma>,
    /// The page migration policy of the running machine, when on or in dry run.
    numa_migrator: Option<Arc<crate::numa_migrate::Migrator>>,
    /// The GPUs, framebuffers and VNC server, shared with the API thread.
    pub displays: Arc<crate::display::DisplayHub>,
    /// The local lease (`crate::lease`), shared with its watchdog.
    pub lease: Arc<crate::lease::Lease>,
    /// Where `ray` hands a jailed VMM what it cannot open itself (`crate::handoff`).
    pub handoff: Option<crate::handoff::Inbox>,
}

impl Controller {
    pub fn new(
        id: String,
        paths: VmPaths,
        attach: bool,
        audit: AuditTrail,
        vcpu_events: Sender<Message>,
    ) -> Self {
        Self {
            attach,
            flavour: Flavour::detect(),
            state: VmState::Created,
            audit,
            config: None,
            machine: None,
            started: None,
            exit_reason: None,
            ring: Arc::default(),
            vcpu_events,
            migration: None,
            migration_span: tracing::Span::none(),
            deferred: Default::default(),
            incoming_vm: None,
            incoming_state: None,
            copied_disks: Vec::new(),
            last_snapshot: None,
            snapshot_log: None,
            migration_log: None,
            suspended_owed: None,
            meter: Arc::default(),
            restored: Arc::default(),
            numa: None,
            numa_migrator: None,
            displays: crate::display::DisplayHub::new(&id, paths.dir.clone()),
            lease: Arc::default(),
            handoff: None,
            id,
            paths,
        }
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    /// Moves to the state `action` leads to, recording it; refuses with the current state.
    fn apply(&mut self, action: VmAction, cause: &str) -> Result<(), TransitionError> {
        let next = transition(self.state, action)?;
        let from = std::mem::replace(&mut self.state, next);
        tracing::info!(%from, to = %next, ?action, cause, "state changed");
        if let Err(e) = self.audit.record(from, next, cause) {
            tracing::error!("cannot append to the audit file: {e}");
        }
        self.follow_displays();
        Ok(())
    }

    /// The displays follow the VM's configuration, state and machine.
    fn follow_displays(&mut self) {
        let (vm, gpus, bochs) = match self.machine.as_mut() {
            Some(m) => (Some(&mut m.vm), &m.pci.gpus[..], &m.pci.bochs[..]),
            None => (None, &[][..], &[][..]),
        };
        self.displays
            .follow(self.state, self.config.as_ref(), vm, gpus, bochs);
    }

    /// The oldest message deferred while long work ran: the VMM thread handles these
    /// before it takes new ones.
    pub fn take_deferred(&mut self) -> Option<Message> {
        self.deferred.pop_front()
    }

    /// Runs `work` on a thread of its own while this thread goes on answering status reads
    /// (`GET /vm`, events, the migration's status), so they never wait on long work such as
    /// writing a snapshot of GiBs. Every other message waits its turn (deferred, in order)
    /// and is handled once the work is done. Returns what `work` returned.
    pub(super) fn answering_reads<T: Send>(
        &self,
        inbox: &Receiver<Message>,
        work: impl FnOnce() -> T + Send,
    ) -> (T, Vec<Message>) {
        let wake = self.vcpu_events.clone();
        let mut deferred = Vec::new();
        let out = std::thread::scope(|s| {
            // The job's last act, also if it panics: wake this thread to join it.
            struct WakeOnDrop(Sender<Message>);
            impl Drop for WakeOnDrop {
                fn drop(&mut self) {
                    let _ = self.0.send(Message::Wake);
                }
            }
            let job = s.spawn(move || {
                let _wake = WakeOnDrop(wake);
                work()
            });
            loop {
                match inbox.recv() {
                    // The job is done (or returning): join it.
                    Ok(Message::Wake) => break,
                    Ok(Message::Api(r, reply)) if r.is_status_read() => reply(self.read(r)),
                    Ok(other) => deferred.push(other),
                    Err(_) => break,
                }
            }
            job.join()
        });
        match out {
            Ok(out) => (out, deferred),
            // The work panicked: the VMM cannot go on from a half-done state.
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// Answers a status read ([`Request::is_status_read`]) without changing anything.
    fn read(&self, request: Request) -> Result<Response, ControllerError> {
        match request {
            Request::Info => Ok(Response::Info(Box::new(self.info()))),
            Request::Events => Ok(Response::Events(self.audit.events().cloned().collect())),
            Request::MigrationStatus => {
                let h = self.migration_handle()?;
                Ok(Response::Migration(Box::new(h.status())))
            }
            Request::Lease(ttl) => {
                match ttl {
                    Some((ttl, since)) => {
                        LeaseState::check_ttl(ttl).map_err(ControllerError::Invalid)?;
                        let since = match since {
                            Some(ns) => {
                                crate::lease::instant_of(ns).map_err(ControllerError::Invalid)?
                            }
                            None => Instant::now(),
                        };
                        self.lease.with(|l| l.renew(since, ttl));
                    }
                    None => {
                        self.lease.with(|l| l.clear());
                        tracing::warn!(
                            "the local lease was cleared: this VM no longer fences itself"
                        );
                    }
                }
                Ok(Response::Info(Box::new(self.info())))
            }
            other => Err(ControllerError::failed(format!(
                "{other:?} is not a status read"
            ))),
        }
    }

    /// The one descriptor a client handed this VMM under `token` (`crate::handoff`), taken
    /// once; refused when this VMM is not jailed (it takes no hand-offs).
    pub(crate) fn take_handoff(
        &mut self,
        token: &str,
    ) -> Result<std::os::fd::OwnedFd, ControllerError> {
        let inbox = self.handoff.as_mut().ok_or_else(|| {
            ControllerError::refused(format!(
                "this VMM takes no hand-offs ({token:?} names one): only a jailed VMM listens on {}",
                crate::handoff::SOCKET
            ))
        })?;
        inbox
            .take(token, 1)
            .map_err(ControllerError::invalid)?
            .pop()
            .ok_or_else(|| ControllerError::invalid("a hand-off lost its descriptor"))
    }

    /// Checks that `action` is allowed now without applying it.
    fn check(&self, action: VmAction) -> Result<(), ControllerError> {
        transition(self.state, action)
            .map(|_| ())
            .map_err(Into::into)
    }

    pub fn info(&self) -> VmInfo {
        let memory = self.machine.as_ref().map(|m| &m.vm.memory);
        VmInfo {
            id: self.id.clone(),
            state: self.state,
            uptime_ms: self.started.map_or(0, |t| t.elapsed().as_millis() as u64),
            pid: crate::jailed::host_pid(),
            config: self.config.clone(),
            hypervisor: self.flavour.name().into(),
            heartbeat: memory.and_then(|m| heartbeat::read(m.ram())),
            exit_reason: self.exit_reason.clone(),
            last_snapshot: self
                .last_snapshot
                .as_ref()
                .map(|(store, id)| store.join(id).display().to_string()),
            numa: match (memory, &self.numa) {
                (Some(m), Some(n)) => crate::numa::status(m, n),
                _ => Vec::new(),
            },
            attribution: self.machine.as_ref().and_then(|m| {
                let rings = m.vm.rings.as_ref()?;
                Some(crate::numa::attribution(rings, self.numa.as_ref()))
            }),
            numa_migration: self
                .machine
                .as_ref()
                .and(self.numa_migrator.as_ref())
                .map(|m| m.report()),
            // The API layer fills in where it listens.
            api_tcp: None,
            lease: self.lease.with(|l| l.info(Instant::now())),
        }
    }

    /// Handles one request. `inbox` lets a graceful stop wait for the guest's power-off.
    pub fn handle(
        &mut self,
        request: Request,
        inbox: &Receiver<Message>,
    ) -> Result<Response, ControllerError> {
        match request {
            r
            @ (Request::Info | Request::Events | Request::MigrationStatus | Request::Lease(_)) => {
                self.read(r)
            }
            Request::Fence => self.fence().map(|_| Response::Done),
            Request::TakeHandoff(token) => self.take_handoff(&token).map(Response::Handed),
            Request::NumaPolicy(req) => {
                self.change_numa_policy(&req)?;
                Ok(Response::Info(Box::new(self.info())))
            }
            Request::Configure(cfg) => {
                self.check(VmAction::Configure)?;
                config::validate(&cfg, config::host_memory())
                    .map_err(|e| ControllerError::invalid(e.to_string()))?;
                self.apply(VmAction::Configure, "api:configure")?;
                self.config = Some(cfg);
                self.follow_displays();
                Ok(Response::Info(Box::new(self.info())))
            }
            Request::Start => {
                self.check(VmAction::Start)?;
                self.may_run()?;
                self.start()?;
                Ok(Response::Info(Box::new(self.info())))
            }
            Request::Pause => {
                self.check(VmAction::Pause)?;
                self.machine()?.pause();
                self.apply(VmAction::Pause, "api:pause")?;
                Ok(Response::Info(Box::new(self.info())))
            }
            Request::Resume => {
                self.check(VmAction::Resume)?;
                self.may_run()?;
                if self.state == VmState::Suspended {
                    self.resume_suspended()?;
                } else {
                    self.machine()?.resume();
                    self.apply(VmAction::Resume, "api:resume")?;
                }
                self.lease.with(|l| l.resumed());
                Ok(Response::Info(Box::new(self.info())))
            }
            Request::Suspend => {
                self.suspend(inbox)?;
                Ok(Response::Info(Box::new(self.info())))
            }
            Request::Snapshot(req) => self.snapshot(req, inbox).map(Response::Snapshot),
            Request::Stop { timeout } => {
                self.check(VmAction::Stop)?;
                // A migration in flight is cancelled first and its rollback awaited, so
                // the stop acts on a VM that runs here again (never on one the migration
                // thread is still pausing, copying or resuming).
                self.settle_migration(inbox);
                if self.state == VmState::Terminated {
                    // The migration completed before it could be cancelled: the VM runs
                    // on the target now, and nothing is left here to stop.
                    return Ok(Response::Info(Box::new(self.info())));
                }
                self.check(VmAction::Stop)?;
                self.stop(timeout, inbox, "api:stop");
                Ok(Response::Info(Box::new(self.info())))
            }
            Request::ConsoleInput(data) => {
                if !guest_runs(self.state) && self.state != VmState::Paused {
                    return Err(ControllerError::refused(format!(
                        "cannot send console input to a VM that is {}",
                        self.state
                    )));
                }
                if self.migration.as_ref().is_some_and(|h| h.paused_for_copy()) {
                    // Its device state may already be on its way: input queued now could
                    // be lost with the source copy. Refused, so the sender knows to retry.
                    return Err(ControllerError::Busy(
                        "the VM is paused for the last copy of its migration; retry in a few ms (on the target if it moved)".into(),
                    ));
                }
                let machine = self.machine()?;
                machine
                    .bus
                    .lock_console()
                    .queue_input(&data)
                    .map_err(|e| ControllerError::Busy(e.to_string()))?;
                heartbeat::raise(machine.vm.memory.ram(), offset::INPUT_DOORBELL);
                machine.wake_idle();
                Ok(Response::Done)
            }
            Request::Migrate(req) => self
                .migrate_out(req)
                .map(|s| Response::Migration(Box::new(s))),
            Request::MigrationCancel => {
                let h = self.migration_handle()?;
                if h.is_finished() {
                    return Err(ControllerError::refused(format!(
                        "the migration of VM '{}' already ended ({}); nothing to cancel",
                        self.id,
                        h.status().state
                    )));
                }
                h.cancel.cancel();
                Ok(Response::Migration(Box::new(h.status())))
            }
            Request::MigrationReclaim => self.reclaim().map(|s| Response::Migration(Box::new(s))),
        }
    }

    /// Refuses to let the guest run while the local lease has expired.
    fn may_run(&self) -> Result<(), ControllerError> {
        self.lease
            .with(|l| l.may_run(Instant::now()))
            .map_err(ControllerError::Refused)
    }

    /// The watchdog found the lease expired: pauses the vCPUs of a running VM and records
    /// why. A migration source's migration is cancelled first (its rollback makes it
    /// Running; the watchdog's next look pauses it). A VM whose guest does not run is
    /// only marked fenced, so it cannot start or resume without a renewal.
    fn fence(&mut self) -> Result<(), ControllerError> {
        let now = Instant::now();
        let due = self.lease.with(|l| {
            let late = l.overdue(now).filter(|_| l.must_fence(now))?;
            Some(crate::lease::fence_cause(late, l.ttl()))
        });
        let Some(cause) = due else {
            return Ok(()); // renewed meanwhile, or fenced already
        };
        match self.state {
            VmState::Running => {
                self.machine()?.pause();
                self.apply(VmAction::Pause, &cause)?;
            }
            VmState::MigrationSource => {
                if let Some(h) = self.migration.as_ref().filter(|h| !h.is_finished()) {
                    tracing::warn!(
                        "local lease expired: cancelling the outgoing migration to fence"
                    );
                    h.cancel.cancel();
                }
                return Ok(());
            }
            VmState::Created
            | VmState::Paused
            | VmState::Suspended
            | VmState::MigrationTarget
            | VmState::Terminated
            | VmState::Error => {}
        }
        tracing::warn!(cause, state = %self.state, "fenced: the guest runs again only after a renewal and a resume");
        self.lease.with(|l| l.fenced(cause));
        Ok(())
    }

    fn console_sinks(&self) -> Result<ConsoleSinks, ControllerError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.paths.serial_log())
            .map_err(|e| {
                ControllerError::failed(format!(
                    "cannot open the serial log {}: {e}",
                    self.paths.serial_log().display()
                ))
            })?;
        Ok(ConsoleSinks {
            log: Some(log),
            stdout: self.attach,
            ring: self.ring.clone(),
        })
    }

    /// Starts the page migration policy of `machine` (booted, restored or migrated in)
    /// when `cfg` asks for it and the machine has guest nodes placed here and rings.
    fn start_numa_policy(
        &mut self,
        machine: &Machine,
        cfg: &VmConfig,
    ) -> Result<(), ControllerError> {
        self.numa_migrator = None;
        let (Some(numa), Some(rings)) = (&self.numa, &machine.vm.rings) else {
            return Ok(());
        };
        if cfg.numa_migration.mode == ray_api::vmm::NumaMigrationMode::Off {
            return Ok(());
        }
        let m = crate::numa_migrate::Migrator::start(
            &self.id,
            &cfg.numa_migration,
            numa,
            cfg.vcpus,
            rings,
            &machine.vm.memory,
        )
        .map_err(|e| ControllerError::failed(format!("cannot start the NUMA policy: {e}")))?;
        self.numa_migrator = Some(m);
        Ok(())
    }

    /// `PUT /vm/numa/policy`: checks the whole request against the running VM (the same
    /// checks as at boot, and attribution unchanged) before anything changes, then puts it
    /// in force (starting the policy's thread if it was off since boot) and records the
    /// change in the decision log. The VM's configuration follows, so a snapshot or a
    /// migration carries the new policy.
    fn change_numa_policy(
        &mut self,
        req: &ray_api::vmm::NumaPolicyRequest,
    ) -> Result<(), ControllerError> {
        use ray_api::vmm::{NumaAttribution, NumaMigrationMode};
        if !matches!(self.state, VmState::Running | VmState::Paused) || self.machine.is_none() {
            return Err(ControllerError::refused(format!(
                "cannot change the NUMA policy of a VM that is {}: it applies to a running VM (a stopped VM takes --numa-migrate when it is started)",
                self.state
            )));
        }
        let Some(cfg) = self.config.clone() else {
            return Err(ControllerError::refused("the VM has no configuration"));
        };
        if let Some(a) = req.attribution {
            if a != cfg.numa_attribution {
                let name = |a: NumaAttribution| match a {
                    NumaAttribution::Off => "off",
                    NumaAttribution::Ring => "ring",
                };
                return Err(ControllerError::invalid(format!(
                    "attribution {}: this VM runs with attribution {}, which cannot change while it runs (KVM's dirty rings are set up before the vCPUs exist and serve as its dirty log); start it again with --numa-attribution {}",
                    name(a),
                    name(cfg.numa_attribution),
                    name(a)
                )));
            }
        }
        let mut new = cfg.clone();
        let m = &mut new.numa_migration;
        if let Some(mode) = req.mode {
            m.mode = mode;
        }
        if let Some(w) = req.window_ms {
            m.window_ms = w;
        }
        if let Some(r) = req.rate_limit_mib_s {
            m.rate_limit_mib_s = r;
        }
        config::check_numa_migration(&new).map_err(|e| ControllerError::invalid(e.to_string()))?;
        let machine = self.machine.as_ref().expect("checked above");
        if new.numa_migration.mode != NumaMigrationMode::Off
            && (self.numa.is_none() || machine.vm.rings.is_none())
        {
            return Err(ControllerError::refused(
                "this VM has no guest NUMA nodes placed on this host or no dirty rings: the policy has nothing to act on",
            ));
        }
        let by = "the API";
        match &self.numa_migrator {
            Some(m) => m.set_config(&new.numa_migration, by),
            None if new.numa_migration.mode != NumaMigrationMode::Off => {
                let machine = self.machine.take().expect("checked above");
                let started = self.start_numa_policy(&machine, &new);
                self.machine = Some(machine);
                started?;
                if let Some(m) = &self.numa_migrator {
                    m.record(&format!(
                        "policy changed by {by}: {}",
                        crate::numa_migrate::describe_change(
                            &cfg.numa_migration,
                            &new.numa_migration
                        )
                    ));
                }
            }
            // Off and staying off: nothing runs, nothing to record it in but the config.
            None => tracing::info!(
                "NUMA policy: {}",
                crate::numa_migrate::describe_change(&cfg.numa_migration, &new.numa_migration)
            ),
        }
        self.config = Some(new);
        Ok(())
    }

    fn machine(&self) -> Result<&Machine, ControllerError> {
        self.machine.as_ref().ok_or_else(|| {
            ControllerError::refused(format!("the VM is {} and has no machine", self.state))
        })
    }

    fn start(&mut self) -> Result<(), ControllerError> {
        let cfg = self.config.clone().ok_or_else(|| {
            ControllerError::refused(
                "cannot start: the VM has no configuration yet (PUT /vm/config first)",
            )
        })?;
        let spec = config::validate(&cfg, config::host_memory())
            .map_err(|e| ControllerError::invalid(e.to_string()))?;
        let mut spec = spec;
        spec.devices = crate::vsock::settle(&spec.devices, &self.paths.dir);
        let sinks = self.console_sinks()?;
        let inbox = self.vcpu_events.clone();
        let events: EventSink = Arc::new(move |e| {
            let _ = inbox.send(Message::Vcpu(e));
        });
        let machine = Machine::boot(&spec, self.flavour, sinks, events)
            .map_err(|e| ControllerError::failed(format!("cannot start the VM: {e}")))?;
        if let Some(numa) = &spec.numa {
            crate::numa::log_placement(numa);
        }
        self.numa = spec.numa.clone();
        self.start_numa_policy(&machine, &cfg)?;
        self.machine = Some(machine);
        self.started = Some(Instant::now());
        self.apply(VmAction::Start, "api:start")?;
        Ok(())
    }

    /// Source: cancels the migration in flight, if any, and carries out the migration
    /// thread's requests (the rollback: lift the throttle, stop dirty logging, resume)
    /// until it ends, for at most the migration's I/O timeout and a margin. Past its
    /// commit point a migration cannot be cancelled: then this waits for its outcome
    /// (the VM moved, or stays paused with its ownership uncertain). API requests that
    /// only read are answered meanwhile; others are refused.
    pub(super) fn settle_migration(&mut self, inbox: &Receiver<Message>) {
        let Some(h) = self.migration.clone() else {
            return;
        };
        if h.is_finished() || self.state != VmState::MigrationSource {
            return;
        }
        h.cancel.cancel();
        let deadline = Instant::now() + MIGRATION_IO_TIMEOUT + Duration::from_secs(5);
        while !h.is_finished() {
            let left = deadline.saturating_duration_since(Instant::now());
            match inbox.recv_timeout(left) {
                Ok(Message::Migration(op, reply)) => {
                    let _ = reply.send(self.migration_op(op));
                }
                Ok(Message::MigrationEnded(e)) => self.on_migration_ended(e),
                Ok(Message::Vcpu(event)) => self.on_vcpu_event(event),
                Ok(Message::Api(r, reply)) if r.is_status_read() => reply(self.read(r)),
                Ok(Message::Wake) => {}
                Ok(Message::Api(_, reply)) => reply(Err(ControllerError::refused(
                    "the VM is stopping: its migration is being cancelled first; try again when it has stopped",
                ))),
                Ok(Message::Signal(_)) | Err(_) => break,
            }
        }
    }

    /// Stops the VM: asks the guest to power off and waits up to `timeout` for it, then
    /// stops it by force. Ends in Terminated either way.
    fn stop(&mut self, timeout: Duration, inbox: &Receiver<Message>, cause: &str) {
        // A source left paused after its migration's switch-over cannot power off.
        let held = self.migration.as_ref().is_some_and(|h| {
            h.status().vm == ray_api::vmm::MigrationVmOutcome::PausedOwnershipUncertain
        });
        let asked = guest_runs(self.state)
            && !held
            && !timeout.is_zero()
            && self.machine.as_ref().is_some_and(|m| {
                let rung = heartbeat::raise(m.vm.memory.ram(), offset::SHUTDOWN_REQUEST);
                if rung {
                    m.wake_idle();
                }
                rung
            });
        if asked {
            let deadline = Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match inbox.recv_timeout(left) {
                    Ok(Message::Vcpu(VcpuEvent::Power(_))) => {
                        self.terminate(
                            VmAction::GuestPoweroff,
                            "guest:poweroff (asked by api:stop)",
                            None,
                        );
                        return;
                    }
                    Ok(Message::Vcpu(event)) => self.on_vcpu_event(event),
                    Ok(Message::Api(_, reply)) => reply(Err(ControllerError::refused(
                        "the VM is stopping; try again when it has stopped",
                    ))),
                    Ok(Message::Migration(_, reply)) => {
                        let _ = reply.send(Err("the VM is stopping".into()));
                    }
                    Ok(Message::MigrationEnded(e)) => self.on_migration_ended(e),
                    Ok(Message::Wake) => {}
                    Ok(Message::Signal(_)) | Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
                if self.state == VmState::Terminated || self.state == VmState::Error {
                    return;
                }
            }
        }
        let why = if asked {
            format!("{cause} (forced after {} ms)", timeout.as_millis())
        } else {
            cause.to_string()
        };
        self.terminate(VmAction::Stop, &why, None);
    }

    /// Tears the machine down and moves to the state `action` leads to.
    fn terminate(&mut self, action: VmAction, cause: &str, reason: Option<String>) {
        if let Some(h) = &self.migration {
            if !h.is_finished() {
                h.cancel.cancel();
            }
        }
        if let Some(mut m) = self.machine.take() {
            m.shutdown();
        }
        let was = self.state;
        if self.apply(action, cause).is_ok() {
            self.exit_reason = Some(reason.unwrap_or_else(|| cause.to_string()));
            if was == VmState::Suspended {
                // The VM is gone for good: its suspend image with it.
                let _ = std::fs::remove_dir_all(self.suspend_dir());
            }
        }
    }

    pub fn on_vcpu_event(&mut self, event: VcpuEvent) {
        match event {
            VcpuEvent::Power(p) => {
                let cause = match p {
                    PowerEvent::PowerOff => "guest:poweroff",
                    PowerEvent::Reset => "guest:reset",
                };
                if transition(self.state, VmAction::GuestPoweroff).is_ok() {
                    self.terminate(VmAction::GuestPoweroff, cause, None);
                }
            }
            VcpuEvent::Failed { index, reason } => {
                if transition(self.state, VmAction::Fail).is_ok() {
                    let why = format!("vCPU {index}: {reason}");
                    if let Some(m) = &self.machine {
                        m.pause();
                    }
                    let _ = self.apply(VmAction::Fail, &format!("vcpu:{index}"));
                    self.exit_reason = Some(why);
                }
            }
        }
    }

    pub fn on_signal(&mut self, signal: i32, inbox: &Receiver<Message>) {
        if transition(self.state, VmAction::Stop).is_ok() {
            self.stop(Duration::ZERO, inbox, &format!("signal:{signal}"));
        }
    }
}

#[cfg(test)]
mod tests;
