//! Filters: each answers "can this host take this VM now?" and, when not,
//! says which filter refused and why, with numbers. The fast path calls
//! [`first_rejection`] on index candidates; the explain path runs it over
//! every host so a pending VM can be explained to a user.

use crate::model::{GroupPolicy, HostId, HostRole, PoolId, VmSpec};
use crate::state::{ClusterState, HostState};
use crate::status::HostStatus;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

/// Which filter refused a host. Order is the order filters run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterKind {
    /// Host is not a worker.
    Role,
    /// Host is not Ready.
    Status,
    /// Host labels do not match the VM's selector.
    Selector,
    /// A hard anti-affinity peer runs on the host.
    AntiAffinity,
    /// The VM's affinity group lives on another host.
    Affinity,
    /// Not enough free vCPUs.
    Cpu,
    /// Not enough free memory.
    Memory,
    /// Not enough free GPUs of the model.
    Gpu,
    /// No single NUMA node can hold a strict VM.
    Numa,
}

/// Why a host was refused, with the numbers that decided it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "filter", rename_all = "snake_case")]
pub enum Reject {
    /// Not a worker.
    Role {
        /// The host's role.
        role: HostRole,
    },
    /// Not Ready.
    Status {
        /// The host's state.
        status: HostStatus,
    },
    /// Label mismatch.
    Selector {
        /// Label key.
        key: String,
        /// Value the VM wants.
        want: String,
        /// Value the host has.
        have: Option<String>,
    },
    /// Hard anti-affinity peer present.
    AntiAffinity {
        /// Group name.
        group: String,
    },
    /// Affinity group is elsewhere.
    Affinity {
        /// Group name.
        group: String,
    },
    /// vCPUs short.
    Cpu {
        /// vCPUs asked.
        need: u32,
        /// vCPUs free.
        free: u32,
    },
    /// Memory short.
    Memory {
        /// MiB asked.
        need: u64,
        /// MiB free.
        free: u64,
    },
    /// GPUs short.
    Gpu {
        /// Model name.
        model: String,
        /// Devices asked.
        need: u32,
        /// Devices free.
        free: u32,
    },
    /// No NUMA node fits.
    Numa {
        /// vCPUs asked.
        need_vcpu: u32,
        /// MiB asked.
        need_mem: u64,
        /// Largest free vCPUs on one node.
        best_vcpu: u32,
        /// Largest free memory on one node, MiB.
        best_mem: u64,
    },
}

impl Reject {
    /// The filter that produced this rejection.
    pub fn kind(&self) -> FilterKind {
        match self {
            Reject::Role { .. } => FilterKind::Role,
            Reject::Status { .. } => FilterKind::Status,
            Reject::Selector { .. } => FilterKind::Selector,
            Reject::AntiAffinity { .. } => FilterKind::AntiAffinity,
            Reject::Affinity { .. } => FilterKind::Affinity,
            Reject::Cpu { .. } => FilterKind::Cpu,
            Reject::Memory { .. } => FilterKind::Memory,
            Reject::Gpu { .. } => FilterKind::Gpu,
            Reject::Numa { .. } => FilterKind::Numa,
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::Role { role } => write!(f, "role {role:?} does not run VMs"),
            Reject::Status { status } => write!(f, "status {status} takes no new VMs"),
            Reject::Selector { key, want, have } => match have {
                Some(h) => write!(f, "label {key}={h}, VM wants {key}={want}"),
                None => write!(f, "no label {key}, VM wants {key}={want}"),
            },
            Reject::AntiAffinity { group } => {
                write!(f, "runs a member of hard anti-affinity group {group}")
            }
            Reject::Affinity { group } => {
                write!(f, "affinity group {group} runs on another host")
            }
            Reject::Cpu { need, free } => write!(f, "needs {need} vCPUs, {free} free"),
            Reject::Memory { need, free } => write!(f, "needs {need} MiB, {free} MiB free"),
            Reject::Gpu { model, need, free } => {
                write!(f, "needs {need} {model} GPUs, {free} free")
            }
            Reject::Numa {
                need_vcpu,
                need_mem,
                best_vcpu,
                best_mem,
            } => write!(
                f,
                "needs {need_vcpu} vCPUs + {need_mem} MiB on one NUMA node, best node has {best_vcpu} vCPUs / {best_mem} MiB free"
            ),
        }
    }
}

/// Host must be a worker.
pub fn role(host: &HostState) -> Option<Reject> {
    (host.role != HostRole::Worker).then_some(Reject::Role { role: host.role })
}

/// Host must be Ready.
pub fn status(host: &HostState) -> Option<Reject> {
    (!host.status.schedulable()).then_some(Reject::Status {
        status: host.status,
    })
}

/// Every selector label must match.
pub fn selector(host: &HostState, vm: &VmSpec) -> Option<Reject> {
    for (k, v) in &vm.selector {
        let have = host.labels.get(k);
        if have != Some(v) {
            return Some(Reject::Selector {
                key: k.clone(),
                want: v.clone(),
                have: have.cloned(),
            });
        }
    }
    None
}

/// No member of the VM's hard anti-affinity group may run on the host.
pub fn anti_affinity(st: &ClusterState, h: HostId, vm: &VmSpec) -> Option<Reject> {
    let (g, policy) = st.group_policy(vm)?;
    (policy == GroupPolicy::HardAntiAffinity && st.members_on(g, h) > 0).then(|| {
        Reject::AntiAffinity {
            group: st.groups()[g as usize].name.clone(),
        }
    })
}

/// If members of the VM's affinity group run somewhere, the host must be
/// that place.
pub fn affinity(st: &ClusterState, h: HostId, vm: &VmSpec) -> Option<Reject> {
    let (g, policy) = st.group_policy(vm)?;
    let hosts = st.group_hosts(g);
    (policy == GroupPolicy::Affinity && !hosts.is_empty() && !hosts.contains_key(&h)).then(|| {
        Reject::Affinity {
            group: st.groups()[g as usize].name.clone(),
        }
    })
}

/// Enough free vCPUs.
pub fn cpu(host: &HostState, vm: &VmSpec) -> Option<Reject> {
    (host.free_vcpu() < vm.vcpus).then(|| Reject::Cpu {
        need: vm.vcpus,
        free: host.free_vcpu(),
    })
}

/// Enough free memory.
pub fn memory(host: &HostState, vm: &VmSpec) -> Option<Reject> {
    (host.free_mem() < vm.memory_mib).then(|| Reject::Memory {
        need: vm.memory_mib,
        free: host.free_mem(),
    })
}

/// Enough free GPUs of the wanted model. `model_name` resolves ids for the
/// message.
pub fn gpu(host: &HostState, vm: &VmSpec, model_name: &dyn Fn(u16) -> String) -> Option<Reject> {
    let g = vm.gpu?;
    let free = host.free_gpus(g.model);
    (free < g.count).then(|| Reject::Gpu {
        model: model_name(g.model),
        need: g.count,
        free,
    })
}

/// A strict VM needs one NUMA node with room for all of it.
pub fn numa(host: &HostState, vm: &VmSpec) -> Option<Reject> {
    if !vm.numa_strict || host.numa.iter().any(|n| n.fits(vm.vcpus, vm.memory_mib)) {
        return None;
    }
    Some(Reject::Numa {
        need_vcpu: vm.vcpus,
        need_mem: vm.memory_mib,
        best_vcpu: host
            .numa
            .iter()
            .map(|n| n.cap_vcpu - n.used_vcpu)
            .max()
            .unwrap_or(0),
        best_mem: host
            .numa
            .iter()
            .map(|n| n.cap_mem - n.used_mem)
            .max()
            .unwrap_or(0),
    })
}

/// Capacity filters only (vCPU, memory, GPU, NUMA).
pub fn capacity_rejection(host: &HostState, vm: &VmSpec) -> Option<Reject> {
    cpu(host, vm)
        .or_else(|| memory(host, vm))
        .or_else(|| gpu(host, vm, &|m| format!("model#{m}")))
        .or_else(|| numa(host, vm))
}

/// Non-capacity filters (role, status, selector, anti-affinity, affinity).
pub fn placement_rejection(st: &ClusterState, h: HostId, vm: &VmSpec) -> Option<Reject> {
    let host = st.host(h);
    role(host)
        .or_else(|| status(host))
        .or_else(|| selector(host, vm))
        .or_else(|| anti_affinity(st, h, vm))
        .or_else(|| affinity(st, h, vm))
}

/// Fast path: whether every filter passes, without building reasons.
/// Always equal to `first_rejection(st, h, vm).is_none()`.
pub fn passes(st: &ClusterState, h: HostId, vm: &VmSpec) -> bool {
    let host = st.host(h);
    host.free_vcpu() >= vm.vcpus
        && host.free_mem() >= vm.memory_mib
        && placement_passes(st, h, vm)
        && vm.gpu.is_none_or(|g| host.free_gpus(g.model) >= g.count)
        && (!vm.numa_strict || host.numa.iter().any(|n| n.fits(vm.vcpus, vm.memory_mib)))
}

/// Fast path of the non-capacity filters. Always equal to
/// `placement_rejection(st, h, vm).is_none()`.
pub fn placement_passes(st: &ClusterState, h: HostId, vm: &VmSpec) -> bool {
    let host = st.host(h);
    if !host.eligible() {
        return false;
    }
    if !vm
        .selector
        .iter()
        .all(|(k, v)| host.labels.get(k) == Some(v))
    {
        return false;
    }
    if let Some((g, policy)) = st.group_policy(vm) {
        match policy {
            GroupPolicy::HardAntiAffinity => {
                if st.members_on(g, h) > 0 {
                    return false;
                }
            }
            GroupPolicy::Affinity => {
                let hosts = st.group_hosts(g);
                if !hosts.is_empty() && !hosts.contains_key(&h) {
                    return false;
                }
            }
            GroupPolicy::SoftAntiAffinity => {}
        }
    }
    true
}

/// Runs every filter in order; the first refusal, or `None` if the host
/// can take the VM.
pub fn first_rejection(st: &ClusterState, h: HostId, vm: &VmSpec) -> Option<Reject> {
    let host = st.host(h);
    placement_rejection(st, h, vm)
        .or_else(|| cpu(host, vm))
        .or_else(|| memory(host, vm))
        .or_else(|| gpu(host, vm, &|m| model_name(st, m)))
        .or_else(|| numa(host, vm))
}

fn model_name(st: &ClusterState, m: u16) -> String {
    st.gpu_models()
        .get(m as usize)
        .cloned()
        .unwrap_or_else(|| format!("model#{m}"))
}

/// A pool quota the VM would exceed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QuotaReject {
    /// Pool id.
    pub pool: PoolId,
    /// Pool name.
    pub pool_name: String,
    /// `vcpus`, `memory_mib` or `gpus`.
    pub resource: &'static str,
    /// Asked.
    pub need: u64,
    /// Already used by the pool.
    pub used: u64,
    /// Quota.
    pub limit: u64,
}

impl fmt::Display for QuotaReject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pool {} quota: needs {} {}, {} of {} used",
            self.pool_name, self.need, self.resource, self.used, self.limit
        )
    }
}

/// Cluster-level filter: the VM's pool quota.
pub fn quota(st: &ClusterState, vm: &VmSpec) -> Option<QuotaReject> {
    let pool = &st.pools()[vm.pool as usize];
    let q = pool.quota?;
    let used = st.pool_usage(vm.pool as usize);
    let gpus = u64::from(vm.gpu.map_or(0, |g| g.count));
    let checks = [
        ("vcpus", u64::from(vm.vcpus), used.vcpus, q.vcpus),
        ("memory_mib", vm.memory_mib, used.memory_mib, q.memory_mib),
        ("gpus", gpus, used.gpus, q.gpus),
    ];
    checks
        .into_iter()
        .find(|(_, need, used, limit)| used.saturating_add(*need) > *limit)
        .map(|(resource, need, used, limit)| QuotaReject {
            pool: vm.pool,
            pool_name: pool.name.clone(),
            resource,
            need,
            used,
            limit,
        })
}

/// One host's refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostRejection {
    /// Host id.
    pub host: HostId,
    /// Host name.
    pub name: String,
    /// Why.
    pub reject: Reject,
}

/// Why a VM cannot be placed: the quota refusal, or every host's first
/// refusal. Hosts that would take the VM are listed in `fits`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// Pool quota refusal, if any (then no host was tried).
    pub quota: Option<QuotaReject>,
    /// Per-host refusals, by host id.
    pub hosts: Vec<HostRejection>,
    /// Hosts that pass every filter.
    pub fits: Vec<HostId>,
}

impl Explanation {
    /// Counts of refusals per filter.
    pub fn counts(&self) -> BTreeMap<FilterKind, usize> {
        let mut m = BTreeMap::new();
        for r in &self.hosts {
            *m.entry(r.reject.kind()).or_insert(0) += 1;
        }
        m
    }

    /// One line for a user, e.g. `0/3 hosts fit: 2 cpu, 1 status`.
    pub fn summary(&self) -> String {
        if let Some(q) = &self.quota {
            return q.to_string();
        }
        let total = self.hosts.len() + self.fits.len();
        let parts: Vec<String> = self
            .counts()
            .iter()
            .map(|(k, n)| format!("{n} {}", format!("{k:?}").to_lowercase()))
            .collect();
        format!(
            "{}/{} hosts fit: {}",
            self.fits.len(),
            total,
            parts.join(", ")
        )
    }
}

/// The slow explain path: every filter over every host.
pub fn explain(st: &ClusterState, vm: &VmSpec) -> Explanation {
    if let Some(q) = quota(st, vm) {
        return Explanation {
            quota: Some(q),
            ..Explanation::default()
        };
    }
    let mut e = Explanation::default();
    for h in 0..st.hosts().len() as HostId {
        match first_rejection(st, h, vm) {
            Some(reject) => e.hosts.push(HostRejection {
                host: h,
                name: st.host(h).name.clone(),
                reject,
            }),
            None => e.fits.push(h),
        }
    }
    e
}
