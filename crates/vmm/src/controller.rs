//! The VMM thread: owns the VM's state and is the only code that changes it. The API
//! thread and the vCPU threads talk to it through one channel of typed messages.
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ray_api::vmm::{LifecycleEvent, SnapshotInfo, SnapshotKind, SnapshotRequest, VmConfig, VmInfo};
use ray_guest_abi::offset;

use crate::devices::{ConsoleRing, PowerEvent};
use crate::lifecycle::{guest_runs, transition, AuditTrail, TransitionError, VmAction, VmState};
use crate::machine::{ConsoleSinks, Machine};
use crate::vstate::vcpu::{EventSink, VcpuEvent};
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
}

#[derive(Debug)]
pub enum Response {
    Info(Box<VmInfo>),
    Snapshot(SnapshotInfo),
    Events(Vec<LifecycleEvent>),
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
}

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
                let machine = self.machine()?;
                machine
                    .bus
                    .lock_console()
                    .queue_input(&data)
                    .map_err(|e| RequestError::conflict(e.to_string()))?;
                heartbeat::raise(&machine.vm.memory, offset::INPUT_DOORBELL);
                Ok(Response::Done)
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
            disk_bytes: crate::snapshot::disk_bytes(&manifest),
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
        machine
            .vm
            .set_dirty_logging(true)
            .map_err(|e| failed(e.to_string()))?;
        let clean = machine
            .vm
            .take_dirty_pages()
            .map_err(|e| failed(e.to_string()))?;
        let consumed = self
            .dirty_since_snapshot
            .replace(ray_snapshot::DirtyBitmap {
                regions: clean.into_iter().map(|w| vec![0; w.len()]).collect(),
            });
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
        let logging = machine.vm.set_dirty_logging(true).and_then(|()| {
            let clean = machine.vm.take_dirty_pages()?;
            Ok(clean.into_iter().map(|w| vec![0; w.len()]).collect())
        });
        match logging {
            Ok(regions) => {
                self.dirty_since_snapshot = Some(ray_snapshot::DirtyBitmap { regions });
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
