//! Error types. Every message names the offending value.

use crate::model::{GpuModelId, GroupId, HostId, PoolId, VmId};
use crate::status::InvalidTransition;

/// A snapshot or VM that does not make sense.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// More hosts than ids.
    #[error("{0} hosts is more than the engine supports")]
    TooManyHosts(usize),
    /// Overcommit ratio out of range.
    #[error("host {host}: cpu_overcommit {ratio} is not in 1.0..=16.0")]
    Overcommit {
        /// Host name.
        host: String,
        /// Offending ratio.
        ratio: f64,
    },
    /// Too many NUMA nodes.
    #[error("host {host}: {nodes} NUMA nodes (at most 64)")]
    NumaNodes {
        /// Host name.
        host: String,
        /// Node count.
        nodes: usize,
    },
    /// NUMA nodes add up to more than the host.
    #[error("host {host}: NUMA nodes hold {cpus} CPUs and {memory_mib} MiB, more than the host")]
    NumaExceedsHost {
        /// Host name.
        host: String,
        /// Sum of node CPUs.
        cpus: u64,
        /// Sum of node memory.
        memory_mib: u64,
    },
    /// GPU model index out of range.
    #[error("GPU model id {0} is not in the snapshot's gpu_models")]
    UnknownGpuModel(GpuModelId),
    /// Pool index out of range.
    #[error("vm {vm}: pool id {pool} does not exist")]
    UnknownPool {
        /// VM id.
        vm: VmId,
        /// Offending pool id.
        pool: PoolId,
    },
    /// Group index out of range.
    #[error("vm {vm}: group id {group} does not exist")]
    UnknownGroup {
        /// VM id.
        vm: VmId,
        /// Offending group id.
        group: GroupId,
    },
    /// Host index out of range.
    #[error("vm {vm}: host id {host} does not exist")]
    UnknownHost {
        /// VM id.
        vm: VmId,
        /// Offending host id.
        host: HostId,
    },
    /// VM asks for nothing.
    #[error("vm {vm}: needs at least 1 vCPU and 1 MiB (asked {vcpus} vCPUs, {memory_mib} MiB)")]
    EmptyVm {
        /// VM id.
        vm: VmId,
        /// Asked vCPUs.
        vcpus: u32,
        /// Asked memory.
        memory_mib: u64,
    },
    /// GPU demand of zero devices.
    #[error("vm {vm}: GPU demand of 0 devices")]
    ZeroGpus {
        /// VM id.
        vm: VmId,
    },
}

/// Errors from the engine's working session.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// Bad snapshot or VM.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A VM id used twice.
    #[error("vm {0} is already placed")]
    DuplicateVm(VmId),
    /// A VM id that is not placed.
    #[error("vm {0} is not placed")]
    UnknownVm(VmId),
    /// Host index out of range.
    #[error("host id {0} does not exist")]
    UnknownHost(HostId),
    /// Refused host status change.
    #[error("host {host}: {source}")]
    Transition {
        /// Host id.
        host: HostId,
        /// The refused transition.
        source: InvalidTransition,
    },
    /// A migration the destination cannot take.
    #[error("vm {vm} cannot move to host {host}: {reason}")]
    InvalidMove {
        /// VM id.
        vm: VmId,
        /// Destination.
        host: HostId,
        /// First filter that refused it.
        reason: String,
    },
    /// A snapshot placement that overflows its host or breaks a hard rule.
    #[error("vm {vm} in the snapshot does not fit host {host}: {reason}")]
    InvalidPlacement {
        /// VM id.
        vm: VmId,
        /// Host.
        host: HostId,
        /// Why.
        reason: String,
    },
}

/// Errors reading a YAML scenario. Each names the field or item at fault.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// YAML syntax or shape (serde_yaml's message includes the path).
    #[error("scenario YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// A reference to a name that is not defined.
    #[error("{field}: unknown {kind} `{name}`")]
    UnknownName {
        /// Where the reference is, e.g. `vms[3].pool`.
        field: String,
        /// What kind of thing, e.g. `pool`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A name defined twice.
    #[error("{field}: duplicate {kind} name `{name}`")]
    Duplicate {
        /// Where.
        field: String,
        /// What kind of thing.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A number out of range.
    #[error("{field}: {value} is out of range ({expected})")]
    OutOfRange {
        /// Where.
        field: String,
        /// Offending value.
        value: String,
        /// What is allowed.
        expected: &'static str,
    },
    /// The resulting snapshot is inconsistent.
    #[error("scenario: {0}")]
    Model(#[from] ModelError),
}

/// Errors running the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Bad scenario.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// Engine refused something in the trace.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    /// Bad options.
    #[error("option {option}: {value} is out of range ({expected})")]
    Option {
        /// Option name.
        option: &'static str,
        /// Offending value.
        value: String,
        /// What is allowed.
        expected: &'static str,
    },
}
