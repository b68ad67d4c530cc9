//! The cluster model the engine reads: hosts, VMs, placement groups,
//! resource pools. Plain data, no behaviour beyond validation.

use crate::error::ModelError;
use crate::status::HostStatus;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Index of a host in [`ClusterSnapshot::hosts`].
pub type HostId = u32;
/// Caller-chosen VM identifier, unique in a snapshot.
pub type VmId = u64;
/// Index of a group in [`ClusterSnapshot::groups`].
pub type GroupId = u32;
/// Index of a pool in [`ClusterSnapshot::pools`].
pub type PoolId = u32;
/// Index of a GPU model name in [`ClusterSnapshot::gpu_models`].
pub type GpuModelId = u16;

/// What a host is for. Only workers run VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostRole {
    /// Runs the control plane.
    Controller,
    /// Runs VMs.
    Worker,
    /// Serves block/object storage.
    Storage,
    /// Runs monitoring.
    Monitor,
    /// Terminates external network traffic.
    Gateway,
}

/// Priority tier of a resource pool. Higher tiers may preempt lower ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Runs on spare capacity; evicted first.
    BestEffort = 0,
    /// Ordinary workloads.
    Standard = 1,
    /// Production workloads.
    High = 2,
    /// Never evicted by anything.
    Critical = 3,
}

impl Tier {
    /// Tier as an index 0..4.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One NUMA node of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaNode {
    /// Physical CPUs on the node.
    pub cpus: u32,
    /// Memory on the node, MiB.
    pub memory_mib: u64,
}

/// GPUs of one model on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSlots {
    /// Model, index into [`ClusterSnapshot::gpu_models`].
    pub model: GpuModelId,
    /// Number of devices.
    pub count: u32,
}

/// A physical host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Host {
    /// Human name, used in explanations.
    pub name: String,
    /// What the host is for.
    pub role: HostRole,
    /// Lifecycle state.
    pub status: HostStatus,
    /// Physical CPUs.
    pub cpus: u32,
    /// vCPUs per physical CPU the host may hand out (1.0 ..= 16.0).
    pub cpu_overcommit: f64,
    /// Memory, MiB (never overcommitted).
    pub memory_mib: u64,
    /// GPUs by model.
    pub gpus: Vec<GpuSlots>,
    /// NUMA nodes; empty means one node holding the whole host.
    pub numa: Vec<NumaNode>,
    /// Free-form labels matched by VM selectors.
    pub labels: BTreeMap<String, String>,
}

impl Host {
    /// vCPUs the host may hand out: `floor(cpus * cpu_overcommit)`.
    pub fn vcpu_capacity(&self) -> u32 {
        scaled_vcpus(self.cpus, self.cpu_overcommit)
    }
}

/// `floor(cpus * ratio)`, saturating.
pub(crate) fn scaled_vcpus(cpus: u32, ratio: f64) -> u32 {
    let v = (f64::from(cpus) * ratio).floor();
    if v >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        v as u32
    }
}

/// GPUs a VM needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDemand {
    /// Model, index into [`ClusterSnapshot::gpu_models`].
    pub model: GpuModelId,
    /// Number of devices (at least 1).
    pub count: u32,
}

/// A VM to place (or already placed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Unique id.
    pub id: VmId,
    /// vCPUs (at least 1).
    pub vcpus: u32,
    /// Memory, MiB (at least 1).
    pub memory_mib: u64,
    /// GPUs, if any.
    pub gpu: Option<GpuDemand>,
    /// Whether vCPUs and memory must come from a single NUMA node.
    pub numa_strict: bool,
    /// Placement group, if any.
    pub group: Option<GroupId>,
    /// Resource pool (gives the priority tier and quota).
    pub pool: PoolId,
    /// Host labels the VM requires (all must match).
    pub selector: Vec<(String, String)>,
}

/// How members of a placement group relate to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupPolicy {
    /// Members never share a host (a filter).
    HardAntiAffinity,
    /// Members prefer distinct hosts (a scorer).
    SoftAntiAffinity,
    /// Members share one host: the host of the first placed member.
    Affinity,
}

/// A named placement group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementGroup {
    /// Name, used in explanations.
    pub name: String,
    /// Relationship between members.
    pub policy: GroupPolicy,
}

/// Upper bounds on what a pool's VMs may hold in total.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// GPUs of any model.
    pub gpus: u64,
}

/// A resource pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Name, used in explanations.
    pub name: String,
    /// Priority tier of every VM in the pool.
    pub tier: Tier,
    /// Optional quota.
    pub quota: Option<Quota>,
}

/// A VM already running somewhere.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacedVm {
    /// The VM.
    pub vm: VmSpec,
    /// Host it runs on.
    pub host: HostId,
    /// NUMA node it is pinned to (strict VMs only).
    pub numa: Option<u8>,
}

/// Immutable input of the engine.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterSnapshot {
    /// Hosts; a [`HostId`] is an index here.
    pub hosts: Vec<Host>,
    /// GPU model names; a [`GpuModelId`] is an index here.
    pub gpu_models: Vec<String>,
    /// Placement groups; a [`GroupId`] is an index here.
    pub groups: Vec<PlacementGroup>,
    /// Resource pools; a [`PoolId`] is an index here.
    pub pools: Vec<Pool>,
    /// VMs already running.
    pub placements: Vec<PlacedVm>,
}

impl ClusterSnapshot {
    /// Checks ids and numbers a hand-built snapshot could get wrong.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.hosts.len() > u32::MAX as usize / 2 {
            return Err(ModelError::TooManyHosts(self.hosts.len()));
        }
        for h in &self.hosts {
            if !(h.cpu_overcommit.is_finite() && (1.0..=16.0).contains(&h.cpu_overcommit)) {
                return Err(ModelError::Overcommit {
                    host: h.name.clone(),
                    ratio: h.cpu_overcommit,
                });
            }
            if h.numa.len() > 64 {
                return Err(ModelError::NumaNodes {
                    host: h.name.clone(),
                    nodes: h.numa.len(),
                });
            }
            let numa_cpus: u64 = h.numa.iter().map(|n| u64::from(n.cpus)).sum();
            let numa_mem: u64 = h.numa.iter().map(|n| n.memory_mib).sum();
            if numa_cpus > u64::from(h.cpus) || numa_mem > h.memory_mib {
                return Err(ModelError::NumaExceedsHost {
                    host: h.name.clone(),
                    cpus: numa_cpus,
                    memory_mib: numa_mem,
                });
            }
            for g in &h.gpus {
                self.check_gpu_model(g.model)?;
            }
        }
        for p in &self.placements {
            self.validate_vm(&p.vm)?;
            if p.host as usize >= self.hosts.len() {
                return Err(ModelError::UnknownHost {
                    vm: p.vm.id,
                    host: p.host,
                });
            }
        }
        Ok(())
    }

    /// Checks a VM's ids and sizes against this snapshot.
    pub fn validate_vm(&self, vm: &VmSpec) -> Result<(), ModelError> {
        if vm.vcpus == 0 || vm.memory_mib == 0 {
            return Err(ModelError::EmptyVm {
                vm: vm.id,
                vcpus: vm.vcpus,
                memory_mib: vm.memory_mib,
            });
        }
        if vm.pool as usize >= self.pools.len() {
            return Err(ModelError::UnknownPool {
                vm: vm.id,
                pool: vm.pool,
            });
        }
        if let Some(g) = vm.group {
            if g as usize >= self.groups.len() {
                return Err(ModelError::UnknownGroup {
                    vm: vm.id,
                    group: g,
                });
            }
        }
        if let Some(g) = vm.gpu {
            self.check_gpu_model(g.model)?;
            if g.count == 0 {
                return Err(ModelError::ZeroGpus { vm: vm.id });
            }
        }
        Ok(())
    }

    fn check_gpu_model(&self, model: GpuModelId) -> Result<(), ModelError> {
        if model as usize >= self.gpu_models.len() {
            return Err(ModelError::UnknownGpuModel(model));
        }
        Ok(())
    }
}
