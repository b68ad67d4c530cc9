//! The VMM thread: owns the VM's state and is the only code that changes it. The API
//! thread and the vCPU threads talk to it through one channel of typed messages.
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ray_api::vmm::{LifecycleEvent, SnapshotInfo, SnapshotRequest, VmConfig, VmInfo};
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

    /// Writes a full snapshot. A running VM is refused unless `pause` asks to pause it for
    /// the snapshot (and resume it after, whatever the outcome).
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
        if path.exists() {
            return Err(RequestError::bad_request(format!(
                "snapshot path {} already exists; a snapshot never overwrites another",
                path.display()
            )));
        }
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
        let result = {
            let machine = self.machine()?;
            let id = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "snapshot".into());
            let meta = crate::snapshot::SnapshotMeta {
                id: &id,
                vm_id: &self.id,
                config: &config,
                hypervisor: self.flavour.name(),
                cpu_fingerprint: crate::snapshot::cpu_fingerprint(&machine.vm.kvm),
            };
            machine
                .save()
                .map_err(|e| e.to_string())
                .and_then(|state| {
                    crate::snapshot::create(&path, meta, &state, &machine.vm.memory)
                        .map_err(|e| e.to_string())
                })
                .map(|m| (id, m))
        };
        let write_ms = t_write.elapsed().as_secs_f64() * 1e3;
        if running {
            self.machine()?.resume();
            self.apply(VmAction::Resume, "api:snapshot")?;
        }
        let paused_ms = t_pause.elapsed().as_secs_f64() * 1e3;
        let (id, manifest) =
            result.map_err(|e| RequestError::internal(format!("snapshot failed: {e}")))?;
        Ok(SnapshotInfo {
            id,
            path: req.path,
            memory_bytes: manifest.memory_bytes,
            memory_allocated_bytes: manifest.memory_allocated_bytes,
            state_bytes: manifest.state_bytes,
            paused_ms,
            write_ms,
        })
    }

    /// Brings a snapshot back to life in this (new, unconfigured) VMM.
    pub fn restore(&mut self, dir: &Path, verify_memory: bool) -> Result<(), RequestError> {
        self.check(VmAction::Start)?;
        let manifest = self.rebuild(dir, verify_memory)?;
        self.config = Some(manifest.config);
        self.started = Some(Instant::now());
        self.apply(VmAction::Start, &format!("restore:{}", manifest.id))?;
        Ok(())
    }

    /// Builds the machine of the snapshot in `dir` and starts its vCPUs.
    fn rebuild(
        &mut self,
        dir: &Path,
        verify_memory: bool,
    ) -> Result<crate::snapshot::Manifest, RequestError> {
        let bad = |e: crate::snapshot::SnapshotError| {
            RequestError::bad_request(format!("cannot restore {}: {e}", dir.display()))
        };
        let (manifest, state) = crate::snapshot::load(dir).map_err(bad)?;
        if manifest.hypervisor != self.flavour.name() {
            return Err(RequestError::bad_request(format!(
                "cannot restore {}: it was taken on a {} host and this host is {}",
                dir.display(),
                manifest.hypervisor,
                self.flavour.name()
            )));
        }
        let regions = crate::boot::layout::ram_regions(manifest.memory_bytes);
        let memory = crate::memory::from_file(&regions, &dir.join("memory.raw")).map_err(|e| {
            RequestError::bad_request(format!("cannot restore {}: {e}", dir.display()))
        })?;
        if verify_memory {
            crate::snapshot::verify_memory(dir, &manifest, &memory).map_err(bad)?;
        }
        let kvm = kvm_ioctls::Kvm::new()
            .map_err(|e| RequestError::internal(format!("cannot open /dev/kvm: {e}")))?;
        let here = crate::snapshot::cpu_fingerprint(&kvm);
        if manifest.cpu_fingerprint != here {
            return Err(RequestError::bad_request(format!(
                "cannot restore {}: its CPU (CPUID fingerprint {}) differs from this host's ({here})",
                dir.display(),
                manifest.cpu_fingerprint
            )));
        }
        drop(kvm);
        let sinks = self.console_sinks()?;
        let inbox = self.vcpu_events.clone();
        let events: EventSink = Arc::new(move |e| {
            let _ = inbox.send(Message::Vcpu(e));
        });
        let machine =
            Machine::restore(memory, &state, self.flavour, sinks, events).map_err(|e| {
                RequestError::internal(format!("cannot restore {}: {e}", dir.display()))
            })?;
        self.machine = Some(machine);
        Ok(manifest)
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
        self.snapshot(SnapshotRequest {
            path: dir.display().to_string(),
            pause: false,
        })?;
        if let Some(mut m) = self.machine.take() {
            m.shutdown();
        }
        self.apply(VmAction::Suspend, "api:suspend")?;
        Ok(())
    }

    /// Resume from Suspended: the suspend snapshot becomes the machine again.
    fn resume_suspended(&mut self) -> Result<(), RequestError> {
        let dir = self.suspend_dir();
        self.rebuild(&dir, true)?;
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
