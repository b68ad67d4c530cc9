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
use ray_migration::{CancelToken, CompatInfo, SourceVm, TargetVm, VmError};

use crate::controller::Message;
use crate::machine::MachineState;
use crate::memory::MemoryManager;
use crate::vstate::Flavour;

pub mod disks;
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

/// How this VMM lays out `config`'s RAM (node by node with guest NUMA), as the wire
/// describes regions.
fn regions(config: &VmConfig) -> Vec<MemoryRegion> {
    crate::numa::config_regions(config)
        .into_iter()
        .map(|(gpa, len, _)| MemoryRegion {
            gpa: gpa.0,
            size: len as u64,
        })
        .collect()
}

/// What the target must match: vCPUs, memory layout, CPUID and hypervisor flavour.
pub fn compat_info(config: &VmConfig, flavour: Flavour, cpu: &str) -> CompatInfo {
    CompatInfo {
        vcpus: u32::from(config.vcpus),
        page_size: PAGE_SIZE as u32,
        regions: regions(config),
        cpuid_fingerprint: *blake3::hash(cpu.as_bytes()).as_bytes(),
        flavour: format!("rayvisor-kvm-x86_64-{}/{STATE_FORMAT}", flavour.name()),
    }
}

/// The memory regions a source describes, as a target allocates them (guest-physical
/// start, length, backing): a source with guest NUMA nodes splits RAM at node
/// boundaries; each region gets its own memfd here (the nodes' binding arrives with the
/// VM's configuration at the switch-over).
pub fn source_regions(source: &CompatInfo) -> Vec<(vm_memory::GuestAddress, usize, usize)> {
    source
        .regions
        .iter()
        .enumerate()
        .map(|(i, r)| (vm_memory::GuestAddress(r.gpa), r.size as usize, i))
        .collect()
}

/// The vCPUs and memory (bytes) of the VM a source describes in its [`CompatInfo`]: what
/// a target that was not told the VM's shape allocates. Refused, naming what, when the
/// description is not one this VMM can build.
pub fn shape_of(source: &CompatInfo) -> Result<(u8, u64), String> {
    let vcpus = u8::try_from(source.vcpus)
        .ok()
        .filter(|&v| v > 0 && v <= crate::config::MAX_VCPUS)
        .ok_or_else(|| {
            format!(
                "the source's VM has {} vCPUs; this VMM supports 1 to {}",
                source.vcpus,
                crate::config::MAX_VCPUS
            )
        })?;
    if source.page_size != PAGE_SIZE as u32 {
        return Err(format!(
            "page size differs: source uses {} bytes, target uses {PAGE_SIZE}",
            source.page_size
        ));
    }
    let memory: u64 = source.regions.iter().map(|r| r.size).sum();
    let ours: Vec<MemoryRegion> = crate::boot::layout::ram_regions(memory)
        .into_iter()
        .map(|(gpa, len)| MemoryRegion {
            gpa: gpa.0,
            size: len as u64,
        })
        .collect();
    // Guest NUMA splits the plain layout at node boundaries: adjacent regions join back.
    let mut joined: Vec<MemoryRegion> = Vec::new();
    for r in &source.regions {
        match joined.last_mut() {
            Some(last) if last.gpa + last.size == r.gpa => last.size += r.size,
            _ => joined.push(*r),
        }
    }
    if ours != joined {
        return Err(format!(
            "memory layout differs: the source's {memory} bytes of memory are laid out as {:x?}, which is not how this VMM lays them out ({:x?})",
            source.regions.iter().map(|r| (r.gpa, r.size)).collect::<Vec<_>>(),
            ours.iter().map(|r| (r.gpa, r.size)).collect::<Vec<_>>(),
        ));
    }
    Ok((vcpus, memory))
}

/// `None` when the VM a source describes (`source`: vCPUs, memory bytes) is the one a
/// target was started for (`given`), else a sentence naming both values.
pub fn shape_mismatch(given: (u8, u64), source: (u8, u64)) -> Option<String> {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    if given.0 != source.0 {
        return Some(format!(
            "vCPU count differs: the source's VM has {} vCPUs, this target was started with {} (--vcpus; leave it out to take the source's)",
            source.0, given.0
        ));
    }
    if given.1 != source.1 {
        return Some(format!(
            "memory layout differs: the source's VM has {} bytes ({:.0} MiB) of memory, this target was started with {} bytes ({:.0} MiB) (--memory; leave it out to take the source's)",
            source.1,
            mib(source.1),
            given.1,
            mib(given.1)
        ));
    }
    None
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
    /// Target: allocate memory (and the KVM VM over it) for a VM of this configuration,
    /// once the source said what it sends.
    PrepareTarget(Box<VmConfig>, Vec<(vm_memory::GuestAddress, usize, usize)>),
    /// Target: the source copies these disks into these files (`copy_disks`).
    DisksArrived(Vec<(String, std::path::PathBuf)>),
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
            MigrationOp::PrepareTarget(..) => "prepare memory for the VM",
            MigrationOp::DisksArrived(_) => "take the copied disks",
        }
    }
}

#[derive(Debug)]
pub enum OpReply {
    Done,
    Dirty(DirtyBitmap),
    State(Vec<u8>),
    Prepared(Prepared),
}

/// Target: guest memory ready for the pages, and what the source must match.
pub struct Prepared {
    pub memory: MemoryManager,
    pub compat: CompatInfo,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("compat", &self.compat)
            .finish_non_exhaustive()
    }
}

pub type OpResult = Result<OpReply, String>;

/// The migration thread's handle on the controller: each call is one typed request.
pub struct Link {
    inbox: Sender<Message>,
    /// The migration's cancel token (ends the `source-hold-paused` test hold).
    cancel: CancelToken,
}

/// Longest a `RAY_FAULT=source-hold-paused` source stays paused before going on.
const HOLD_PAUSED: std::time::Duration = std::time::Duration::from_secs(30);

impl Link {
    pub fn new(inbox: Sender<Message>, cancel: CancelToken) -> Self {
        Self { inbox, cancel }
    }

    /// Target: asks the controller for memory (and a KVM VM) for a VM of `config`.
    pub fn prepare(
        &self,
        config: VmConfig,
        regions: Vec<(vm_memory::GuestAddress, usize, usize)>,
    ) -> Result<Prepared, VmError> {
        match self.call(MigrationOp::PrepareTarget(Box::new(config), regions))? {
            OpReply::Prepared(p) => Ok(p),
            _ => Err(VmError {
                op: "prepare memory for the VM",
                reason: "the controller answered with something else".into(),
            }),
        }
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
        self.done(MigrationOp::Pause)?;
        if fault_injected("source-hold-paused") {
            // Test hook: hold the migration in its paused final copy (until it is
            // cancelled), so a test can act on a source in exactly that phase.
            let until = std::time::Instant::now() + HOLD_PAUSED;
            while !self.cancel.is_cancelled() && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        Ok(())
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

    fn disks_arrived(&mut self, disks: &[(String, std::path::PathBuf)]) -> Result<(), VmError> {
        self.done(MigrationOp::DisksArrived(disks.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_takes_the_shape_the_source_describes() {
        let vm = |vcpus, memory_bytes| VmConfig {
            kernel: String::new(),
            initrd: None,
            cmdline: String::new(),
            vcpus,
            memory_bytes,
            devices: Default::default(),
            numa: Vec::new(),
            numa_attribution: Default::default(),
            numa_migration: Default::default(),
        };
        let src = compat_info(&vm(2, 256 << 20), Flavour::Pvm, "cpu");
        assert_eq!(shape_of(&src), Ok((2, 256 << 20)));
        // Above the MMIO hole too: the regions add up to the memory size.
        let big = compat_info(&vm(1, 4 << 30), Flavour::Pvm, "cpu");
        assert_eq!(shape_of(&big), Ok((1, 4 << 30)));
        // Guest NUMA nodes split the layout; the shape is the same.
        let mut numa = vm(2, 4 << 30);
        numa.numa = (0..2)
            .map(|n| ray_api::vmm::NumaNodeConfig {
                node: n,
                cpus: vec![n as u8],
                memory_bytes: 2 << 30,
                host_nodes: vec![],
                policy: ray_api::vmm::NumaPolicy::Bind,
            })
            .collect();
        let split = compat_info(&numa, Flavour::Pvm, "cpu");
        assert_eq!(split.regions.len(), 3);
        assert_eq!(shape_of(&split), Ok((2, 4 << 30)));
        assert_eq!(source_regions(&split).len(), 3);
        let mut odd = src.clone();
        odd.regions[0].gpa = 0x1000;
        assert!(shape_of(&odd)
            .unwrap_err()
            .contains("memory layout differs"));
        let mut many = src.clone();
        many.vcpus = 300;
        assert!(shape_of(&many).unwrap_err().contains("300 vCPUs"));
        let mut pages = src;
        pages.page_size = 2 << 20;
        assert!(shape_of(&pages).unwrap_err().contains("page size differs"));
    }

    #[test]
    fn a_mismatch_names_both_values() {
        assert_eq!(shape_mismatch((2, 1 << 30), (2, 1 << 30)), None);
        let e = shape_mismatch((1, 1 << 30), (2, 1 << 30)).unwrap();
        assert!(
            e.contains("has 2 vCPUs") && e.contains("started with 1"),
            "{e}"
        );
        let e = shape_mismatch((2, 128 << 20), (2, 256 << 20)).unwrap();
        assert!(
            e.contains("268435456 bytes (256 MiB)") && e.contains("134217728 bytes (128 MiB)"),
            "{e}"
        );
    }
}
