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

use crate::devices::{ConsoleRing, PowerEvent};
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
    Stop { timeout: Duration },
    Snapshot(SnapshotRequest),
    Events,
    ConsoleInput(Vec<u8>),
    Migrate(MigrateRequest),
    MigrationStatus,
    MigrationCancel,
    MigrationReclaim,
}

#[derive(Debug)]
pub enum Response {
    Info(Box<VmInfo>),
    Snapshot(SnapshotInfo),
    Events(Vec<LifecycleEvent>),
    Migration(Box<MigrationStatus>),
    Done,
}

/// A refused or failed request: an HTTP status and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub status: u16,
    pub message: String,
}

impl RequestError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: 409,
            message: message.into(),
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: message.into(),
        }
    }
}

impl From<TransitionError> for RequestError {
    fn from(e: TransitionError) -> Self {
        RequestError::conflict(e.to_string())
    }
}

pub type Reply = Box<dyn FnOnce(Result<Response, RequestError>) + Send>;

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
}

/// Files of one VM in the runtime directory.
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
    /// Target: the KVM VM (memory slots registered, with dirty logging) created over the
    /// guest memory of an incoming migration; the state goes onto it at the switch-over.
    incoming_vm: Option<Vm>,
    /// Target: the source's checked state, applied at the switch-over.
    incoming_state: Option<Box<mig::MigrationState>>,
    /// The store and id of this VM's latest snapshot: the parent of the next incremental.
    last_snapshot: Option<(PathBuf, String)>,
    /// Pages written since `last_snapshot` that were already taken from the dirty log.
    dirty_since_snapshot: Option<ray_snapshot::DirtyBitmap>,
    /// `dirty_since_snapshot` kept across a suspend.
    suspended_dirty: Option<ray_snapshot::DirtyBitmap>,
    /// Progress of the snapshot being written, shared with the API thread.
    pub meter: Arc<crate::snapshot::Meter>,
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
            id,
            paths,
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
            incoming_vm: None,
            incoming_state: None,
            last_snapshot: None,
            dirty_since_snapshot: None,
            suspended_dirty: None,
            meter: Arc::default(),
        }
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    /// Moves to the state `action` leads to, recording it; refuses with the current state.
    fn apply(&mut self, action: VmAction, cause: &str) -> Result<(), TransitionError> {
        let next = transition(self.state, action)?;
        let from = std::mem::replace(&mut self.state, next);
        if let Err(e) = self.audit.record(from, next, cause) {
            eprintln!("ray vmm {}: cannot append to the audit file: {e}", self.id);
        }
        Ok(())
    }

    /// Checks that `action` is allowed now without applying it.
    fn check(&self, action: VmAction) -> Result<(), RequestError> {
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
            pid: std::process::id(),
            config: self.config.clone(),
            hypervisor: self.flavour.name().into(),
            heartbeat: memory.and_then(heartbeat::read),
            exit_reason: self.exit_reason.clone(),
            last_snapshot: self
                .last_snapshot
                .as_ref()
                .map(|(store, id)| store.join(id).display().to_string()),
        }
    }

    /// Handles one request. `inbox` lets a graceful stop wait for the guest's power-off.
    pub fn handle(
        &mut self,
        request: Request,
        inbox: &Receiver<Message>,
    ) -> Result<Response, RequestError> {
        match request {
            Request::Info => Ok(Response::Info(Box::new(self.info()))),
            Request::Events => Ok(Response::Events(self.audit.events().cloned().collect())),
            Request::Configure(cfg) => {
                self.check(VmAction::Configure)?;
                config::validate(&cfg, config::host_memory())
                    .map_err(|e| RequestError::bad_request(e.to_string()))?;
                self.apply(VmAction::Configure, "api:configure")?;
                self.config = Some(cfg);
                Ok(Response::Info(Box::new(self.info())))
            }
            Request::Start => {
                self.check(VmAction::Start)?;
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
                if self.state == VmState::Suspended {
                    self.resume_suspended()?;
                    return Ok(Response::Info(Box::new(self.info())));
                }
                self.machine()?.resume();
                self.apply(VmAction::Resume, "api:resume")?;
                Ok(Response::Info(Box::new(self.info())))
            }
            Request::Suspend => {
                self.suspend()?;
                Ok(Response::Info(Box::new(self.info())))
            }
            Request::Snapshot(req) => self.snapshot(req).map(Response::Snapshot),
            Request::Stop { timeout } => {
                self.check(VmAction::Stop)?;
                self.stop(timeout, inbox, "api:stop");
                Ok(Response::Info(Box::new(self.info())))
            }
            Request::ConsoleInput(data) => {
                if !guest_runs(self.state) && self.state != VmState::Paused {
                    return Err(RequestError::conflict(format!(
                        "cannot send console input to a VM that is {}",
                        self.state
                    )));
                }
                if self.migration.as_ref().is_some_and(|h| h.paused_for_copy()) {
                    // Its device state may already be on its way: input queued now could
                    // be lost with the source copy. Refused, so the sender knows to retry.
                    return Err(RequestError::conflict(
                        "the VM is paused for the last copy of its migration; retry in a few ms (on the target if it moved)",
                    ));
                }
                let machine = self.machine()?;
                machine
                    .bus
                    .lock_console()
                    .queue_input(&data)
                    .map_err(|e| RequestError::conflict(e.to_string()))?;
                heartbeat::raise(&machine.vm.memory, offset::INPUT_DOORBELL);
                machine.wake_idle();
                Ok(Response::Done)
            }
            Request::Migrate(req) => self
                .migrate_out(req)
                .map(|s| Response::Migration(Box::new(s))),
            Request::MigrationStatus => {
                let h = self.migration_handle()?;
                Ok(Response::Migration(Box::new(h.status())))
            }
            Request::MigrationCancel => {
                let h = self.migration_handle()?;
                if h.is_finished() {
                    return Err(RequestError::conflict(format!(
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

    /// The operator fenced the target of a migration whose link failed after the
    /// switch-over: the paused source copy runs again here.
    fn reclaim(&mut self) -> Result<MigrationStatus, RequestError> {
        let h = self.migration_handle()?.clone();
        let status = h.status();
        if status.vm != "paused_ownership_uncertain" || self.state != VmState::MigrationSource {
            return Err(RequestError::conflict(format!(
                "nothing to reclaim: the migration of VM '{}' left it {} (the VM is {}); reclaim is only for a source paused after the switch-over",
                self.id, status.vm, self.state
            )));
        }
        self.check(VmAction::MigrationAbort)?;
        let keep_log = self.dirty_since_snapshot.is_some();
        let m = self.machine.as_mut().ok_or_else(|| {
            RequestError::conflict(format!("the VM is {} and has no machine", self.state))
        })?;
        m.throttle(0);
        if !keep_log {
            let _ = m.vm.set_dirty_logging(false);
        }
        m.resume();
        self.apply(
            VmAction::MigrationAbort,
            "migrate:reclaimed by the operator after fencing the target",
        )?;
        h.update(|r| r.vm = "running");
        if let Ok(json) = serde_json::to_vec_pretty(&h.status()) {
            let _ = std::fs::write(self.paths.migration_record(), json);
        }
        Ok(h.status())
    }

    fn migration_handle(&self) -> Result<&mig::Handle, RequestError> {
        self.migration.as_ref().ok_or_else(|| {
            RequestError::not_found(format!(
                "VM '{}' has no migration; start one with PUT /vm/migration",
                self.id
            ))
        })
    }

    /// Starts migrating this running VM to `req.to` on a migration thread.
    fn migrate_out(&mut self, req: MigrateRequest) -> Result<MigrationStatus, RequestError> {
        self.check(VmAction::MigrateOut)?;
        let to = mig::Endpoint::parse(&req.to).map_err(RequestError::bad_request)?;
        let key = mig::read_key(Path::new(&req.key_file)).map_err(RequestError::bad_request)?;
        if req.max_downtime_ms == 0 {
            return Err(RequestError::bad_request(
                "max_downtime_ms is 0; it must be at least 1",
            ));
        }
        if req.max_passes == Some(0) {
            return Err(RequestError::bad_request(
                "max_passes is 0; it must be at least 1",
            ));
        }
        let limit = req
            .max_concurrent
            .unwrap_or(ray_migration::progress::DEFAULT_MAX_CONCURRENT as u32);
        if limit == 0 {
            return Err(RequestError::bad_request(
                "max_concurrent is 0; it must be at least 1",
            ));
        }
        let config = self
            .config
            .clone()
            .ok_or_else(|| RequestError::conflict("the VM has no configuration"))?;
        let slot =
            mig::acquire_slot(&self.paths.runtime(), limit).map_err(RequestError::conflict)?;
        let machine = self.machine()?;
        let compat = mig::compat_info(
            config.vcpus,
            config.memory_bytes,
            self.flavour,
            &crate::snapshot::cpu_fingerprint(&machine.vm.kvm),
        );
        let mem = Arc::new(mig::MemAccess::new(&machine.vm.memory));
        let mut policy = ray_migration::Policy {
            max_downtime: Duration::from_millis(req.max_downtime_ms),
            auto_converge: req.auto_converge,
            on_limit: match req.on_limit {
                OnLimit::Force => ray_migration::LimitAction::ForceStopAndCopy,
                OnLimit::Abort => ray_migration::LimitAction::Abort,
            },
            ..Default::default()
        };
        if let Some(n) = req.max_passes {
            policy.max_passes = n;
        }
        if let Some(ms) = req.max_time_ms {
            policy.max_time = Duration::from_millis(ms);
        }
        let handle = mig::Handle::new(MigrationRole::Source, to.to_string());
        let mut cfg = ray_migration::SenderConfig::new(key);
        cfg.policy = policy;
        cfg.compress = req.compress;
        cfg.crc_pages = !req.mac_pages;
        cfg.recheck_memory = req.recheck_memory;
        cfg.cancel = handle.cancel.clone();
        cfg.progress = handle.progress.clone();
        self.apply(VmAction::MigrateOut, &format!("api:migrate to {to}"))?;
        self.migration = Some(handle.clone());
        let inbox = self.vcpu_events.clone();
        let spawned = std::thread::Builder::new()
            .name("migration-out".into())
            .spawn(move || {
                let _slot = slot;
                let result = mig::connect(&to, MIGRATION_IO_TIMEOUT)
                    .map_err(|e| {
                        mig::SourceError::Setup(format!("cannot connect to the target {to}: {e}"))
                    })
                    .and_then(|stream| {
                        let mut link =
                            mig::Link::new(inbox.clone(), &mem).with_source_mem(mem.clone());
                        ray_migration::send_migration(stream, &*mem, &mut link, &compat, &cfg)
                            .map_err(|f| mig::SourceError::Driver(Box::new(f)))
                    });
                let _ = inbox.send(Message::MigrationEnded(Ended::Source(result)));
            });
        if let Err(e) = spawned {
            let why = format!("cannot start the migration thread: {e}");
            self.end_migration(None, "running", Some(why.clone()));
            let _ = self.apply(VmAction::MigrationAbort, "migration:failed to start");
            return Err(RequestError::internal(why));
        }
        Ok(handle.status())
    }

    /// Target: takes the vCPUs and memory of the VM to receive. The kernel and command
    /// line are not needed (the machine comes from the source's state) and arrive with it.
    pub fn configure_incoming(&mut self, cfg: VmConfig) -> Result<(), RequestError> {
        self.check(VmAction::Configure)?;
        config::validate_shape(&cfg, config::host_memory())
            .map_err(|e| RequestError::bad_request(e.to_string()))?;
        self.apply(VmAction::Configure, "migrate:configure")?;
        self.config = Some(cfg);
        Ok(())
    }

    /// Target: allocates memory for the configured VM, listens on `at` and waits (on a
    /// migration thread) for one incoming migration. With `prefault`, another thread
    /// populates all of the memory meanwhile (until the migration ends). Returns the bound
    /// address.
    pub fn listen_incoming(
        &mut self,
        at: &str,
        key_file: &Path,
        max_concurrent: u32,
        prefault: bool,
    ) -> Result<String, RequestError> {
        self.check(VmAction::MigrateIn)?;
        let config = self.config.clone().ok_or_else(|| {
            RequestError::conflict("an incoming migration needs a configuration (vCPUs, memory)")
        })?;
        config::validate_shape(&config, config::host_memory())
            .map_err(|e| RequestError::bad_request(e.to_string()))?;
        let endpoint = mig::Endpoint::parse(at).map_err(RequestError::bad_request)?;
        let key = mig::read_key(key_file).map_err(RequestError::bad_request)?;
        if max_concurrent == 0 {
            return Err(RequestError::bad_request(
                "max_concurrent is 0; it must be at least 1",
            ));
        }
        let slot = mig::acquire_slot(&self.paths.runtime(), max_concurrent)
            .map_err(RequestError::conflict)?;
        let regions = crate::boot::layout::ram_regions(config.memory_bytes);
        let memory =
            crate::memory::create(&regions).map_err(|e| RequestError::internal(e.to_string()))?;
        let vm = Vm::with_dirty_logging(memory.clone(), self.flavour)
            .map_err(|e| RequestError::internal(format!("cannot create the VM: {e}")))?;
        let kvm = kvm_ioctls::Kvm::new()
            .map_err(|e| RequestError::internal(format!("cannot open /dev/kvm: {e}")))?;
        let compat = mig::compat_info(
            config.vcpus,
            config.memory_bytes,
            self.flavour,
            &crate::snapshot::cpu_fingerprint(&kvm),
        );
        drop(kvm);
        let listener = mig::Listener::bind(&endpoint)
            .map_err(|e| RequestError::bad_request(format!("cannot listen on {endpoint}: {e}")))?;
        let local = listener.local();
        let handle = mig::Handle::new(MigrationRole::Target, local.clone());
        let mut cfg = ray_migration::ReceiverConfig::new(key);
        cfg.progress = handle.progress.clone();
        cfg.cancel = handle.cancel.clone();
        self.apply(VmAction::MigrateIn, &format!("migrate:listen on {local}"))?;
        let prefault = prefault.then(|| crate::prefault::spawn(memory.clone()));
        if let Some(p) = &prefault {
            handle.update(|r| r.prefault = Some(p.clone()));
        }
        let mem = Arc::new(mig::MemAccess::new(&memory).with_prefault(prefault));
        mem.track_target_writes();
        self.incoming_vm = Some(vm);
        self.migration = Some(handle.clone());
        let inbox = self.vcpu_events.clone();
        std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || {
                let _slot = slot;
                let result = listener
                    .accept(&cfg.cancel, MIGRATION_IO_TIMEOUT)
                    .map_err(|e| {
                        mig::TargetError::Setup(format!("no migration arrived on {local}: {e}"))
                    })
                    .and_then(|stream| {
                        drop(listener);
                        let mut link = mig::Link::new(inbox.clone(), &mem);
                        ray_migration::receive_migration(stream, &*mem, &mut link, &compat, &cfg)
                            .map_err(|f| mig::TargetError::Driver(Box::new(f)))
                    });
                let _ = inbox.send(Message::MigrationEnded(Ended::Target(result)));
            })
            .map_err(|e| {
                RequestError::internal(format!("cannot start the migration thread: {e}"))
            })?;
        Ok(handle.status().peer)
    }

    /// Carries out one request of the migration thread.
    pub fn migration_op(&mut self, op: MigrationOp) -> OpResult {
        // `RAY_MIGRATION_TRACE=1` in the VMM's environment logs each step's duration.
        let trace = std::env::var_os("RAY_MIGRATION_TRACE").is_some();
        let name: String = match &op {
            MigrationOp::RestoreState(blob) => format!("RestoreState({} bytes)", blob.len()),
            op => format!("{op:?}").chars().take(24).collect(),
        };
        let t = Instant::now();
        let r = self.migration_op_inner(op);
        if trace {
            eprintln!("{} {name} took {:?}", mig::unix_us(), t.elapsed());
        }
        r
    }

    fn migration_op_inner(&mut self, op: MigrationOp) -> OpResult {
        let source = matches!(
            op,
            MigrationOp::StartDirtyLog
                | MigrationOp::DirtyLog
                | MigrationOp::StopDirtyLog
                | MigrationOp::Pause
                | MigrationOp::Resume
                | MigrationOp::Throttle(_)
                | MigrationOp::SaveState
        );
        let want = if source {
            VmState::MigrationSource
        } else {
            VmState::MigrationTarget
        };
        if self.state != want && !matches!(op, MigrationOp::Discard) {
            return Err(format!("the VM is {}, not {want}", self.state));
        }
        let now = self.state;
        let gone = move || format!("the VM is {now} and has no machine");
        match op {
            // Dirty logging may already be on for incremental snapshots: every page the
            // migration takes from the log is also kept for the next snapshot, and the log
            // stays on after the migration if snapshots need it.
            MigrationOp::StartDirtyLog => {
                let m = self.machine.as_mut().ok_or_else(gone)?;
                let was_on = m.vm.dirty_logging();
                m.vm.set_dirty_logging(true).map_err(|e| e.to_string())?;
                if was_on {
                    let words = m.vm.take_dirty_pages().map_err(|e| e.to_string())?;
                    self.keep_for_snapshots(words);
                }
                Ok(OpReply::Done)
            }
            MigrationOp::StopDirtyLog => {
                if self.dirty_since_snapshot.is_none() {
                    let m = self.machine.as_mut().ok_or_else(gone)?;
                    m.vm.set_dirty_logging(false).map_err(|e| e.to_string())?;
                }
                Ok(OpReply::Done)
            }
            MigrationOp::DirtyLog => {
                let m = self.machine.as_ref().ok_or_else(gone)?;
                let words = m.vm.take_dirty_pages().map_err(|e| e.to_string())?;
                self.keep_for_snapshots(words.clone());
                Ok(OpReply::Dirty(words))
            }
            MigrationOp::Pause => {
                // The guest's heartbeat stops when the pause begins.
                let t = mig::unix_us();
                self.machine.as_ref().ok_or_else(gone)?.pause();
                if let Some(h) = &self.migration {
                    h.update(|r| r.paused_at_unix_us = Some(t));
                }
                Ok(OpReply::Done)
            }
            MigrationOp::Resume => {
                self.machine.as_ref().ok_or_else(gone)?.resume();
                if let Some(h) = &self.migration {
                    h.update(|r| r.paused_at_unix_us = None);
                }
                Ok(OpReply::Done)
            }
            MigrationOp::Throttle(p) => {
                self.machine.as_ref().ok_or_else(gone)?.throttle(p);
                Ok(OpReply::Done)
            }
            MigrationOp::SaveState => {
                let m = self.machine.as_ref().ok_or_else(gone)?;
                let machine = m.save().map_err(|e| e.to_string())?;
                let state = mig::MigrationState {
                    config: self.config.clone().ok_or("the VM has no configuration")?,
                    uptime_ms: self.started.map_or(0, |t| t.elapsed().as_millis() as u64),
                    machine,
                };
                serde_json::to_vec(&state)
                    .map(OpReply::State)
                    .map_err(|e| format!("cannot encode the VM state: {e}"))
            }
            MigrationOp::RestoreState(blob) => {
                self.accept_incoming_state(&blob).map(|_| OpReply::Done)
            }
            MigrationOp::TargetResume => {
                if mig::fault_injected("target-exit-at-switchover") {
                    // Test hook: the target dies between the source's commit point and
                    // its own resume; the source must not come back by itself.
                    eprintln!("RAY_FAULT=target-exit-at-switchover: exiting");
                    std::process::exit(86);
                }
                self.start_incoming()?;
                let m = self.machine.as_ref().ok_or_else(gone)?;
                let mem = m.vm.memory.clone();
                // The guest's heartbeat as it stopped on the source: the first change
                // after the start below is the end of the downtime the guest saw.
                let baseline = heartbeat::sample(&mem).map(|(c, _)| c);
                let t = mig::unix_us();
                m.resume();
                if let Some(h) = &self.migration {
                    h.update(|r| r.resumed_at_unix_us = Some(t));
                    mig::watch_heartbeat(mem, baseline, h.clone());
                }
                // The lifecycle transition (and its audit record) follows the reply:
                // see `finish_target_resume`.
                Ok(OpReply::Done)
            }
            MigrationOp::Discard => {
                self.stop_prefault();
                if let Some(mut m) = self.machine.take() {
                    m.shutdown();
                }
                self.incoming_vm = None;
                self.incoming_state = None;
                Ok(OpReply::Done)
            }
        }
    }

    /// Target, right after the driver learnt that the VM runs here: the lifecycle state
    /// follows (off the downtime's critical path: the audit record goes to disk).
    pub fn finish_target_resume(&mut self) {
        if self.state == VmState::MigrationTarget && self.machine.is_some() {
            let _ = self.apply(VmAction::MigrationComplete, "migrate:resumed here");
        }
    }

    /// Adds pages taken from the dirty log to what the next incremental snapshot holds.
    fn keep_for_snapshots(&mut self, words: Vec<Vec<u64>>) {
        if let Some(held) = &mut self.dirty_since_snapshot {
            held.merge(&ray_snapshot::DirtyBitmap { regions: words });
        }
    }

    /// Target: checks the source's state blob and keeps it. The machine is built from it
    /// only when the source relinquished the VM ([`Self::start_incoming`]): restoring vCPU
    /// state makes KVM write guest memory (kvmclock, PVM's shared page), which must not
    /// happen before both sides compared their memory.
    fn accept_incoming_state(&mut self, blob: &[u8]) -> Result<(), String> {
        let st: mig::MigrationState = serde_json::from_slice(blob)
            .map_err(|e| format!("the source's VM state is not valid: {e}"))?;
        let ours = self.config.as_ref().ok_or("the VM has no configuration")?;
        if (st.config.vcpus, st.config.memory_bytes) != (ours.vcpus, ours.memory_bytes)
            || st.machine.vcpus.len() != usize::from(ours.vcpus)
        {
            return Err(format!(
                "the source's VM state describes {} vCPUs ({} saved) and {} bytes of RAM; this VM has {} vCPUs and {} bytes",
                st.config.vcpus,
                st.machine.vcpus.len(),
                st.config.memory_bytes,
                ours.vcpus,
                ours.memory_bytes
            ));
        }
        if st.machine.flavour != self.flavour.name() {
            return Err(format!(
                "the source's VM state was saved on a {} host and this host is {}",
                st.machine.flavour,
                self.flavour.name()
            ));
        }
        if self.incoming_state.is_some() || self.machine.is_some() {
            return Err("the VM state arrived twice".into());
        }
        self.incoming_state = Some(Box::new(st));
        Ok(())
    }

    /// Target, after `Switchover`: builds the machine over the received memory and starts it.
    fn start_incoming(&mut self) -> Result<(), String> {
        let st = self
            .incoming_state
            .take()
            .ok_or("no VM state arrived before the switch-over")?;
        let vm = self
            .incoming_vm
            .take()
            .ok_or("the incoming guest memory is gone")?;
        let sinks = self.console_sinks().map_err(|e| e.message)?;
        let inbox = self.vcpu_events.clone();
        let events: EventSink = Arc::new(move |e| {
            let _ = inbox.send(Message::Vcpu(e));
        });
        let machine =
            Machine::restore_on(vm, &st.machine, sinks, events).map_err(|e| e.to_string())?;
        self.machine = Some(machine);
        self.config = Some(st.config);
        self.started = Instant::now().checked_sub(Duration::from_millis(st.uptime_ms));
        Ok(())
    }

    /// Target: the memory is no longer waited for (the migration ended, or the target's
    /// memory is discarded): its prefault, if any, stops after its current step.
    fn stop_prefault(&self) {
        if let Some(h) = &self.migration {
            h.update(|r| {
                if let Some(p) = &r.prefault {
                    p.stop();
                }
            });
        }
    }

    /// Records the end of the migration and leaves its status in the VM's directory.
    fn end_migration(
        &mut self,
        state: Option<ray_migration::SessionState>,
        vm: &'static str,
        error: Option<String>,
    ) {
        self.stop_prefault();
        let Some(h) = &self.migration else { return };
        h.update(|r| {
            r.finished = Some(r.started.elapsed());
            if state.is_some() {
                r.state_override = state;
            }
            r.vm = vm;
            r.error = error;
        });
        if let Ok(json) = serde_json::to_vec_pretty(&h.status()) {
            let _ = std::fs::write(self.paths.migration_record(), json);
        }
    }

    /// The migration thread ended: move the VM where the outcome says.
    pub fn on_migration_ended(&mut self, ended: Ended) {
        use ray_migration::{SessionState as S, SourceVmAfterFailure as After};
        match ended {
            Ended::Source(Ok(report)) => {
                if let Some(h) = &self.migration {
                    h.update(|r| {
                        r.downtime_ms = Some(report.downtime.as_secs_f64() * 1e3);
                        r.total_ms = Some(report.total.as_secs_f64() * 1e3);
                        r.bulk_mib_s = report
                            .passes
                            .first()
                            .map(|p| p.bandwidth_bps / (1 << 20) as f64);
                        r.forced = report.forced;
                        r.passes = Some(report.passes.len() as u32);
                        r.bytes_sent = Some(report.bytes_sent);
                    });
                }
                let peer = self
                    .migration
                    .as_ref()
                    .map(|h| h.status().peer)
                    .unwrap_or_default();
                self.end_migration(Some(S::Completed), "migrated", None);
                self.terminate(
                    VmAction::MigrationComplete,
                    &format!("migrate:completed to {peer}"),
                    Some(format!("migrated to {peer}")),
                );
            }
            Ended::Source(Err(mig::SourceError::Setup(why))) => {
                self.end_migration(Some(S::Failed), "running", Some(why.clone()));
                let _ = self.apply(VmAction::MigrationAbort, &format!("migrate:failed: {why}"));
            }
            Ended::Source(Err(mig::SourceError::Driver(f))) => {
                let why = format!("{} (failed in {})", f.error, mig::state_name(f.failed_in));
                match f.vm {
                    After::Running => {
                        self.end_migration(Some(f.session.state()), "running", Some(why.clone()));
                        let _ = self.apply(
                            VmAction::MigrationAbort,
                            &format!("migrate:rolled back: {why}"),
                        );
                    }
                    After::RollbackFailed => {
                        self.end_migration(
                            Some(f.session.state()),
                            "rollback_failed",
                            Some(why.clone()),
                        );
                        let _ =
                            self.apply(VmAction::Fail, &format!("migrate:rollback failed: {why}"));
                        self.exit_reason = Some(format!("the migration's rollback failed: {why}"));
                    }
                    After::PausedOwnershipUncertain => {
                        // The split-brain rule: the target may run the VM; stay paused.
                        self.end_migration(
                            Some(f.session.state()),
                            "paused_ownership_uncertain",
                            Some(why),
                        );
                    }
                }
            }
            Ended::Target(Ok(_)) => {
                self.end_migration(Some(S::Completed), "running", None);
                self.incoming_vm = None;
            }
            Ended::Target(Err(e)) => {
                let (why, state, owns) = match e {
                    mig::TargetError::Setup(why) => (why, S::Failed, false),
                    mig::TargetError::Driver(f) => (
                        format!("{} (failed in {})", f.error, mig::state_name(f.failed_in)),
                        f.session.state(),
                        f.owns_vm,
                    ),
                };
                if owns {
                    self.end_migration(Some(state), "running", Some(why));
                    return;
                }
                self.end_migration(Some(state), "discarded", Some(why.clone()));
                self.incoming_vm = None;
                self.terminate(
                    VmAction::MigrationAbort,
                    &format!("migrate:incoming failed: {why}"),
                    Some(format!("incoming migration failed: {why}")),
                );
            }
        }
    }

    /// Writes a snapshot. A running VM is refused unless `pause` asks to pause it for the
    /// snapshot (and resume it after, whatever the outcome). An incremental snapshot holds
    /// the pages written since this VM's previous snapshot, which becomes its parent.
    fn snapshot(&mut self, req: SnapshotRequest) -> Result<SnapshotInfo, RequestError> {
        let running = self.state == VmState::Running;
        if running && !req.pause {
            return Err(RequestError::conflict(
                "cannot snapshot a VM that is running: pause it first, or ask for pause (--pause)",
            ));
        }
        if !running && self.state != VmState::Paused {
            return Err(RequestError::conflict(format!(
                "cannot snapshot a VM that is {}",
                self.state
            )));
        }
        let path = PathBuf::from(&req.path);
        if !path.is_absolute() {
            return Err(RequestError::bad_request(format!(
                "snapshot path {} must be absolute (it is resolved by the VMM)",
                path.display()
            )));
        }
        if path.exists() {
            return Err(RequestError::bad_request(format!(
                "snapshot path {} already exists; a snapshot never overwrites another",
                path.display()
            )));
        }
        let (store, id) = crate::snapshot::split_path(&path)
            .map_err(|e| RequestError::bad_request(e.to_string()))?;
        let parent =
            match (req.kind, &self.last_snapshot) {
                (SnapshotKind::Full, _) => None,
                (SnapshotKind::Incremental | SnapshotKind::Auto, Some((s, p))) if *s == store => {
                    Some(p.clone())
                }
                (SnapshotKind::Auto, _) => None,
                (SnapshotKind::Incremental, Some((s, p))) => {
                    return Err(RequestError::bad_request(format!(
                        "an incremental snapshot goes beside its parent {}: use a path in {}",
                        s.join(p).display(),
                        s.display()
                    )))
                }
                (SnapshotKind::Incremental, None) => return Err(RequestError::conflict(
                    "this VM has no earlier snapshot to be incremental on: take a full one first",
                )),
            };
        let config = self
            .config
            .clone()
            .ok_or_else(|| RequestError::conflict("the VM has no configuration"))?;
        let t_pause = Instant::now();
        if running {
            self.machine()?.pause();
            self.apply(VmAction::Pause, "api:snapshot")?;
        }
        let t_write = Instant::now();
        let max = req
            .max_snapshots
            .map_or(ray_snapshot::SnapshotStore::DEFAULT_MAX_PER_VM, |m| {
                m as usize
            });
        if max == 0 {
            return Err(RequestError::bad_request(
                "max_snapshots must be at least 1",
            ));
        }
        let result = self.write_snapshot(&path, &config, parent.as_deref(), req.compress, max);
        let write_ms = t_write.elapsed().as_secs_f64() * 1e3;
        if running {
            self.machine()?.resume();
            self.apply(VmAction::Resume, "api:snapshot")?;
        }
        let paused_ms = t_pause.elapsed().as_secs_f64() * 1e3;
        let (manifest, _) = result?;
        self.last_snapshot = Some((store, id.clone()));
        Ok(SnapshotInfo {
            id,
            path: req.path,
            parent: manifest.parent.clone(),
            kind: match manifest.kind {
                ray_snapshot::Kind::Full => "full".into(),
                ray_snapshot::Kind::Incremental => "incremental".into(),
            },
            compressed: req.compress,
            memory_bytes: manifest.memory_bytes,
            stored_pages: manifest.dirty_pages,
            disk_bytes: manifest.stored_bytes(),
            state_bytes: manifest.files.get("state.bin").map_or(0, |f| f.bytes),
            paused_ms,
            write_ms,
        })
    }

    /// Saves the paused machine and writes it to `path`. The pages written since the last
    /// snapshot stay accounted for until a snapshot succeeds, so a failed incremental one
    /// loses nothing for the next.
    fn write_snapshot(
        &mut self,
        path: &Path,
        config: &VmConfig,
        parent: Option<&str>,
        compress: bool,
        max_snapshots: usize,
    ) -> Result<(ray_snapshot::Manifest, Option<ray_snapshot::DirtyBitmap>), RequestError> {
        let failed = |e: String| RequestError::internal(format!("snapshot failed: {e}"));
        let machine = self.machine.as_mut().ok_or_else(|| {
            RequestError::conflict(format!("the VM is {} and has no machine", self.state))
        })?;
        let dirty = match machine.vm.dirty_logging() {
            true => Some(
                machine
                    .vm
                    .take_dirty_pages()
                    .map_err(|e| failed(e.to_string()))?,
            ),
            false => None,
        };
        if let Some(words) = dirty {
            match &mut self.dirty_since_snapshot {
                Some(held) => held.merge(&ray_snapshot::DirtyBitmap { regions: words }),
                None => {
                    self.dirty_since_snapshot = Some(ray_snapshot::DirtyBitmap { regions: words })
                }
            }
        }
        let state = machine.save().map_err(|e| failed(e.to_string()))?;
        let compat = crate::snapshot::compat_tag(self.flavour, &machine.vm.kvm);
        let parent = match parent {
            Some(p) => Some((
                p,
                self.dirty_since_snapshot.as_ref().ok_or_else(|| {
                    RequestError::internal(
                        "snapshot failed: no dirty-page log since the parent snapshot",
                    )
                })?,
            )),
            None => None,
        };
        let spec = crate::snapshot::NewSnapshotSpec {
            path,
            vm_id: &self.id,
            config,
            compat,
            parent,
            compress,
            max_snapshots,
        };
        let manifest = crate::snapshot::create(&spec, &state, &machine.vm.memory, &self.meter)
            .map_err(|e| match e {
                crate::snapshot::SnapshotError::Store(
                    ray_snapshot::StoreError::LimitReached { .. }
                    | ray_snapshot::StoreError::AlreadyExists(_)
                    | ray_snapshot::StoreError::NotFound(_)
                    | ray_snapshot::StoreError::WrongState { .. },
                ) => RequestError::conflict(format!("snapshot refused: {e}")),
                e => failed(e.to_string()),
            })?;
        // From now on, count the pages written since this snapshot.
        let clean = restart_dirty_log(&mut machine.vm).map_err(|e| failed(e.to_string()))?;
        let consumed = self.dirty_since_snapshot.replace(clean);
        Ok((manifest, consumed))
    }

    /// Brings a snapshot back to life in this (new, unconfigured) VMM.
    pub fn restore(&mut self, path: &Path, verify_memory: bool) -> Result<(), RequestError> {
        self.check(VmAction::Start)?;
        let config = self.rebuild(path, verify_memory)?;
        self.config = Some(config);
        self.started = Some(Instant::now());
        let id = self.last_snapshot.as_ref().map_or("", |s| s.1.as_str());
        let cause = format!("restore:{id}");
        self.apply(VmAction::Start, &cause)?;
        Ok(())
    }

    /// Builds the machine of the snapshot at `path` and starts its vCPUs. The snapshot
    /// becomes the parent of this VM's next incremental snapshot.
    fn rebuild(&mut self, path: &Path, verify_memory: bool) -> Result<VmConfig, RequestError> {
        let bad = |e: crate::snapshot::SnapshotError| {
            RequestError::bad_request(format!("cannot restore {}: {e}", path.display()))
        };
        let kvm = kvm_ioctls::Kvm::new()
            .map_err(|e| RequestError::internal(format!("cannot open /dev/kvm: {e}")))?;
        let compat = crate::snapshot::compat_tag(self.flavour, &kvm);
        drop(kvm);
        let loaded = crate::snapshot::load(path, &compat).map_err(bad)?;
        let memory = crate::snapshot::memory(&loaded, verify_memory).map_err(bad)?;
        let sinks = self.console_sinks()?;
        let inbox = self.vcpu_events.clone();
        let events: EventSink = Arc::new(move |e| {
            let _ = inbox.send(Message::Vcpu(e));
        });
        let mut machine = Machine::restore(memory, &loaded.state, self.flavour, sinks, events)
            .map_err(|e| {
                RequestError::internal(format!("cannot restore {}: {e}", path.display()))
            })?;
        // Pages written from here on are what an incremental snapshot on top holds.
        match restart_dirty_log(&mut machine.vm) {
            Ok(clean) => {
                self.dirty_since_snapshot = Some(clean);
                self.last_snapshot = Some((loaded.store.clone(), loaded.id.clone()));
            }
            Err(e) => {
                eprintln!(
                    "ray vmm {}: no dirty-page log ({e}); the next snapshot will be full",
                    self.id
                );
                self.last_snapshot = None;
            }
        }
        self.machine = Some(machine);
        Ok(loaded.config)
    }

    /// Where a suspended VM keeps its memory and state.
    fn suspend_dir(&self) -> PathBuf {
        self.paths.dir.join("suspended")
    }

    /// Suspend: a snapshot to the VM's directory, then the machine and its memory go.
    fn suspend(&mut self) -> Result<(), RequestError> {
        self.check(VmAction::Suspend)?;
        let dir = self.suspend_dir();
        let _ = std::fs::remove_dir_all(&dir);
        if self.state == VmState::Running {
            self.machine()?.pause();
            self.apply(VmAction::Pause, "api:suspend")?;
        }
        // Paused now: the snapshot is of exactly the state the VM will resume from. If it
        // fails, the VM stays paused with its memory, and nothing is lost.
        let config = self
            .config
            .clone()
            .ok_or_else(|| RequestError::conflict("the VM has no configuration"))?;
        let (_, carried) = self.write_snapshot(&dir, &config, None, false, 1)?;
        // The suspend image is not a checkpoint: after resume, the next incremental
        // snapshot still builds on the VM's last one, with every page written since.
        self.suspended_dirty = carried;
        if let Some(mut m) = self.machine.take() {
            m.shutdown();
        }
        self.apply(VmAction::Suspend, "api:suspend")?;
        Ok(())
    }

    /// Resume from Suspended: the suspend snapshot becomes the machine again.
    fn resume_suspended(&mut self) -> Result<(), RequestError> {
        let dir = self.suspend_dir();
        let last = self.last_snapshot.clone();
        self.rebuild(&dir, true)?;
        self.last_snapshot = last;
        match (self.suspended_dirty.take(), &mut self.dirty_since_snapshot) {
            (Some(carried), Some(now)) => now.merge(&carried),
            _ => self.last_snapshot = None,
        }
        self.apply(VmAction::Resume, "api:resume")?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    fn console_sinks(&self) -> Result<ConsoleSinks, RequestError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.paths.serial_log())
            .map_err(|e| {
                RequestError::internal(format!(
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

    fn machine(&self) -> Result<&Machine, RequestError> {
        self.machine.as_ref().ok_or_else(|| {
            RequestError::conflict(format!("the VM is {} and has no machine", self.state))
        })
    }

    fn start(&mut self) -> Result<(), RequestError> {
        let cfg = self.config.clone().ok_or_else(|| {
            RequestError::conflict(
                "cannot start: the VM has no configuration yet (PUT /vm/config first)",
            )
        })?;
        let spec = config::validate(&cfg, config::host_memory())
            .map_err(|e| RequestError::bad_request(e.to_string()))?;
        let sinks = self.console_sinks()?;
        let inbox = self.vcpu_events.clone();
        let events: EventSink = Arc::new(move |e| {
            let _ = inbox.send(Message::Vcpu(e));
        });
        let machine = Machine::boot(&spec, self.flavour, sinks, events)
            .map_err(|e| RequestError::internal(format!("cannot start the VM: {e}")))?;
        self.machine = Some(machine);
        self.started = Some(Instant::now());
        self.apply(VmAction::Start, "api:start")?;
        Ok(())
    }

    /// Stops the VM: asks the guest to power off and waits up to `timeout` for it, then
    /// stops it by force. Ends in Terminated either way.
    fn stop(&mut self, timeout: Duration, inbox: &Receiver<Message>, cause: &str) {
        let asked = guest_runs(self.state)
            && !timeout.is_zero()
            && self
                .machine
                .as_ref()
                .is_some_and(|m| heartbeat::raise(&m.vm.memory, offset::SHUTDOWN_REQUEST));
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
                    Ok(Message::Api(_, reply)) => reply(Err(RequestError::conflict(
                        "the VM is stopping; try again when it has stopped",
                    ))),
                    Ok(Message::Migration(_, reply)) => {
                        let _ = reply.send(Err("the VM is stopping".into()));
                    }
                    Ok(Message::MigrationEnded(e)) => self.on_migration_ended(e),
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
        if self.apply(action, cause).is_ok() {
            self.exit_reason = Some(reason.unwrap_or_else(|| cause.to_string()));
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

/// Turns dirty logging on (if it is not) and clears the log: the pages written from now on
/// are what the next incremental snapshot holds. Returns an all-clean bitmap of the log's
/// shape, to accumulate them in.
fn restart_dirty_log(
    vm: &mut crate::vstate::vm::Vm,
) -> Result<ray_snapshot::DirtyBitmap, crate::vstate::vm::VmError> {
    vm.set_dirty_logging(true)?;
    let cleared = vm.take_dirty_pages()?;
    Ok(ray_snapshot::DirtyBitmap {
        regions: cleared.iter().map(|w| vec![0; w.len()]).collect(),
    })
}
