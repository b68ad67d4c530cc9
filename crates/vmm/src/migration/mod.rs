//! Live migration in the VMM: the KVM side of `ray-migration`'s drivers.
//!
//! The drivers run on a migration thread of their own. Guest memory is read (source) and
//! written (target) directly from that thread through the [`crate::memory::MemoryManager`]
//! (as `ray_memory::GuestMemory`); everything else —
//! dirty logging, pause, resume, throttle, saving and restoring the machine — goes to the
//! controller thread as a typed [`MigrationOp`] through [`Link`], which waits for the
//! answer. The controller therefore stays the single owner of VM state, and keeps
//! answering the API (`GET /vm`, `GET /vm/migration`) during a migration.
//!
//! # Split brain
//!
//! The VMM follows the rule in `ray_migration`'s crate docs. On the source the VM sits in
//! `MigrationSource` until the driver returns: `Completed` moves it to `Terminated` (its
//! vCPUs are never resumed: the process ends), a failure before the `Switchover` frame
//! moves it back to `Running` (the driver already lifted the throttle and resumed it), and
//! a failure after `Switchover` without the target's explicit refusal leaves it *paused*
//! in `MigrationSource` ("paused_ownership_uncertain"): the target may be running it, so
//! only an operator who fenced the target may bring it back (`ray vm stop` discards it).
//! On the target the state blob is only checked when it arrives; the machine is built and
//! its vCPUs started by [`TargetVm::resume`], which the driver calls after `Switchover`.
use std::sync::mpsc::{self, Sender};
use std::time::{SystemTime, UNIX_EPOCH};

use ray_api::vmm::VmConfig;
use ray_memory::DirtyBitmap;
use ray_migration::protocol::MemoryRegion;
use ray_migration::{CompatInfo, SourceVm, TargetVm, VmError};

use crate::controller::Message;
use crate::machine::MachineState;
use crate::vstate::Flavour;

mod slots;
mod status;

pub use slots::{acquire_slot, Slot};
pub use status::{api_state, watch_heartbeat, Ended, Handle, Record, SourceError, TargetError};

use ray_memory::PAGE_SIZE;
/// Version of the state blob ([`MigrationState`] as JSON); part of the flavour string.
const STATE_FORMAT: u32 = 1;

/// Wall clock in µs since the Unix epoch (comparable between two VMMs on one host).
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What the target must match: vCPUs, memory layout, CPUID and hypervisor flavour.
pub fn compat_info(vcpus: u8, memory_bytes: u64, flavour: Flavour, cpu: &str) -> CompatInfo {
    CompatInfo {
        vcpus: u32::from(vcpus),
        page_size: PAGE_SIZE as u32,
        regions: crate::boot::layout::ram_regions(memory_bytes)
            .into_iter()
            .map(|(gpa, len)| MemoryRegion {
                gpa: gpa.0,
                size: len as u64,
            })
            .collect(),
        cpuid_fingerprint: *blake3::hash(cpu.as_bytes()).as_bytes(),
        flavour: format!("rayvisor-kvm-x86_64-{}/{STATE_FORMAT}", flavour.name()),
    }
}

/// The state blob: everything but guest memory.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct MigrationState {
    pub config: VmConfig,
    pub uptime_ms: u64,
    pub machine: MachineState,
}

/// Whether the environment variable `RAY_FAULT` names `point`: failure injection for the
/// end-to-end tests, at points no outside action can hit deterministically.
pub fn fault_injected(point: &str) -> bool {
    std::env::var("RAY_FAULT").is_ok_and(|v| v.split(',').any(|p| p == point))
}

/// What the migration thread asks of the controller.
#[derive(Debug)]
pub enum MigrationOp {
    StartDirtyLog,
    DirtyLog,
    StopDirtyLog,
    Pause,
    Resume,
    Throttle(u8),
    SaveState,
    RestoreState(Vec<u8>),
    TargetResume,
    Discard,
}

impl MigrationOp {
    fn verb(&self) -> &'static str {
        match self {
            MigrationOp::StartDirtyLog => "start dirty logging",
            MigrationOp::DirtyLog => "read the dirty log",
            MigrationOp::StopDirtyLog => "stop dirty logging",
            MigrationOp::Pause => "pause",
            MigrationOp::Resume => "resume",
            MigrationOp::Throttle(_) => "throttle its vCPUs",
            MigrationOp::SaveState => "save its state",
            MigrationOp::RestoreState(_) => "restore the state",
            MigrationOp::TargetResume => "resume",
            MigrationOp::Discard => "discard",
        }
    }
}

#[derive(Debug)]
pub enum OpReply {
    Done,
    Dirty(DirtyBitmap),
    State(Vec<u8>),
}

pub type OpResult = Result<OpReply, String>;

/// The migration thread's handle on the controller: each call is one typed request.
pub struct Link {
    inbox: Sender<Message>,
}

impl Link {
    pub fn new(inbox: Sender<Message>) -> Self {
        Self { inbox }
    }

    fn call(&self, op: MigrationOp) -> Result<OpReply, VmError> {
        let verb = op.verb();
        let (tx, rx) = mpsc::channel();
        let gone = || VmError {
            op: verb,
            reason: "the VMM is shutting down".into(),
        };
        self.inbox
            .send(Message::Migration(op, tx))
            .map_err(|_| gone())?;
        rx.recv()
            .map_err(|_| gone())?
            .map_err(|reason| VmError { op: verb, reason })
    }

    fn done(&self, op: MigrationOp) -> Result<(), VmError> {
        self.call(op).map(|_| ())
    }
}

impl SourceVm for Link {
    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        self.done(MigrationOp::StartDirtyLog)
    }

    fn dirty_log(&mut self) -> Result<DirtyBitmap, VmError> {
        match self.call(MigrationOp::DirtyLog)? {
            OpReply::Dirty(pages) => Ok(pages),
            _ => Err(VmError {
                op: "read the dirty log",
                reason: "the controller answered with something else".into(),
            }),
        }
    }

    fn stop_dirty_log(&mut self) -> Result<(), VmError> {
        self.done(MigrationOp::StopDirtyLog)
    }

    fn pause(&mut self) -> Result<(), VmError> {
        self.done(MigrationOp::Pause)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.done(MigrationOp::Resume)
    }

    fn throttle(&mut self, percent: u8) -> Result<(), VmError> {
        self.done(MigrationOp::Throttle(percent))
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        match self.call(MigrationOp::SaveState)? {
            OpReply::State(s) => Ok(s),
            _ => Err(VmError {
                op: "save its state",
                reason: "the controller answered with something else".into(),
            }),
        }
    }
}

impl TargetVm for Link {
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.done(MigrationOp::RestoreState(state.to_vec()))
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.done(MigrationOp::TargetResume)
    }

    fn discard(&mut self) {
        let _ = self.done(MigrationOp::Discard);
    }
}
