//! The per-host agent API: served by `ray agent` on the Unix socket `api.sock` in its
//! state directory, and on TCP (`--api-tcp`, with a bearer token) when asked.
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::vmm::VmStateName;

/// Version of the agent API (the OpenAPI document's `info.version`).
pub const API_VERSION: &str = "1.0.0";

/// `GET /host`: this host as its agent sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    /// The host's name in the cluster.
    pub host: String,
    /// rayvisor's version (the `ray` binary running the agent).
    pub version: String,
    /// This API's version.
    pub api_version: String,
    pub inventory: HostInventory,
    pub health: HostHealth,
    pub lease: HostLease,
    /// Cluster VMs whose VMM lives on this host now.
    pub vms: usize,
}

/// What the host has.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostInventory {
    pub cpus: u32,
    pub memory_mib: u64,
    /// NUMA nodes (1 when the host does not say).
    pub numa_nodes: u32,
    /// Display controllers on the PCI bus (class 03): GPUs the host could pass through.
    pub gpus: Vec<HostGpu>,
}

/// One display controller of the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostGpu {
    /// PCI address, e.g. `0000:01:00.0`.
    pub address: String,
    /// `vendor:device`, hexadecimal, e.g. `10de:2684`.
    pub id: String,
}

/// The host's health checks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostHealth {
    /// Every check passed.
    pub ok: bool,
    /// `/dev/kvm` opens for reading and writing.
    pub kvm: bool,
    /// The runtime directory (where VMMs keep their sockets) is writable.
    pub runtime_dir: bool,
    /// One sentence per failed check.
    pub problems: Vec<String>,
}

/// Whether the host's lease in the store is current.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Renewed in time: the host's VMs may run.
    Fresh,
    /// Not renewed in time: the agent paused (fenced) its VMs until a renewal succeeds.
    Fenced,
}

/// The agent's lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostLease {
    pub state: LeaseState,
    /// Time left before the agent fences its VMs unless a renewal succeeds; 0 once fenced.
    pub fence_in_ms: u64,
    /// The lease's time to live in the store.
    pub ttl_ms: u64,
}

/// `GET /vms` item and `GET /vms/{id}`: one cluster VM whose VMM lives on this host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostVm {
    pub id: String,
    /// The run-token epoch it runs at.
    pub epoch: u64,
    /// Its VMM's state (absent when the VMM does not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmStateName>,
    /// Its VMM's process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Paused by its own local lease (the agent stopped renewing it).
    pub fenced: bool,
    /// Why the VMM did not answer, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// `POST /vms/{id}/stop` body (optional).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostVmStop {
    /// How long the guest gets to power off before its VMM ends it, in ms (default 2000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `GET /numa/nodes` (and `ray numa nodes -o json`): one online NUMA node of this host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NumaHostNode {
    pub id: u32,
    /// Online CPUs, ascending; empty for a memory-only node.
    pub cpus: Vec<u32>,
    pub memory_total: u64,
    pub memory_free: u64,
    /// Distance to each online node as `[node, distance]`; 10 is the node itself.
    pub distances: Vec<(u32, u32)>,
    /// Huge page pools by ascending page size.
    pub huge_pages: Vec<NumaHugePages>,
}

/// One node's pool of huge pages of one size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NumaHugePages {
    pub page_bytes: u64,
    pub total: u64,
    pub free: u64,
    pub surplus: u64,
}

/// `GET /numa/vms` (and `ray numa vms -o json`): one running VM's NUMA at a glance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NumaHostVm {
    pub id: String,
    /// Guest node -> host nodes and policy, e.g. `0->0(bind)`.
    pub binding: Vec<String>,
    /// Local share of the present sampled pages over all guest nodes; none when none is
    /// present.
    pub locality: Option<f64>,
    /// Dirty-ring attribution is on.
    pub attribution: bool,
    /// Pages written by each guest node's vCPUs since boot.
    pub node_writes: Vec<u64>,
    /// The migration policy's mode: `off`, `dry-run` or `on`.
    pub migration: String,
    pub moved_bytes: u64,
    /// Ranges worth moving that the rate limit deferred in the last window.
    pub pending_moves: u64,
}

/// `GET /numa/status` (and `ray numa status --json`): this host's NUMA summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NumaHostStatus {
    pub nodes: usize,
    pub cpus: usize,
    pub memory_total: u64,
    pub memory_free: u64,
    pub vms: usize,
    pub vms_with_guest_nodes: usize,
    pub vms_with_attribution: usize,
    pub vms_with_migration: usize,
    pub moved_bytes: u64,
    pub pending_moves: u64,
    /// The kernel's data access monitor on this host (read heat's source).
    pub damon: NumaDamon,
}

/// DAMON on this host, as its sysfs admin tree says (read only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NumaDamon {
    /// `/sys/kernel/mm/damon/admin` exists.
    pub present: bool,
    /// Operation sets offered (`vaddr`, `paddr`), when a context says.
    pub operations: Vec<String>,
    pub kdamonds: usize,
    /// kdamonds that are on (each for someone: rayvisor starts none).
    pub kdamonds_on: usize,
    /// Why no kdamond is free for a VM; absent when one is idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}
