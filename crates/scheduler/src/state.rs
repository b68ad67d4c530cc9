//! The engine's private working copy of a cluster: per-host usage, VM
//! locations, group membership, pool usage, and the indexes that make
//! best-fit lookups O(log n). Built from an immutable
//! [`ClusterSnapshot`]; the snapshot itself is never touched.
//!
//! NUMA accounting: a `numa_strict` VM is charged to one node *and* to the
//! host totals; other VMs float and are charged to the host totals only.
//! So pinned usage never exceeds a node, and total usage never exceeds the
//! host.

use crate::error::EngineError;
use crate::filter;
use crate::model::{
    scaled_vcpus, ClusterSnapshot, GpuModelId, GroupId, GroupPolicy, HostId, HostRole, PlacedVm,
    PlacementGroup, Pool, Tier, VmId, VmSpec,
};
use crate::status::HostStatus;
use std::collections::{BTreeMap, BTreeSet};

/// Memory index buckets are 2^10 MiB = 1 GiB wide.
const MEM_BUCKET_SHIFT: u32 = 10;

/// GPUs of one model on a host, with usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuSlot {
    /// Model.
    pub model: GpuModelId,
    /// Devices installed.
    pub cap: u32,
    /// Devices in use.
    pub used: u32,
}

/// One NUMA node's capacity and pinned usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NumaSlot {
    /// vCPUs the node may hand out (node CPUs x overcommit).
    pub cap_vcpu: u32,
    /// Node memory, MiB.
    pub cap_mem: u64,
    /// vCPUs pinned by strict VMs.
    pub used_vcpu: u32,
    /// Memory pinned by strict VMs, MiB.
    pub used_mem: u64,
}

impl NumaSlot {
    /// Whether a strict VM of this size fits the node now.
    pub fn fits(&self, vcpus: u32, mem: u64) -> bool {
        self.cap_vcpu - self.used_vcpu >= vcpus && self.cap_mem - self.used_mem >= mem
    }
}

/// Resources summed over VMs of one tier on a host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierUse {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub mem: u64,
    /// GPUs of any model.
    pub gpus: u32,
}

/// A host as the engine sees it while planning.
#[derive(Clone, Debug, PartialEq)]
pub struct HostState {
    /// Name from the snapshot.
    pub name: String,
    /// Role.
    pub role: HostRole,
    /// Current lifecycle state.
    pub status: HostStatus,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// vCPU capacity (CPUs x overcommit).
    pub cap_vcpu: u32,
    /// Memory capacity, MiB.
    pub cap_mem: u64,
    /// vCPUs in use.
    pub used_vcpu: u32,
    /// Memory in use, MiB.
    pub used_mem: u64,
    /// GPUs by model.
    pub gpus: Vec<GpuSlot>,
    /// NUMA nodes (at least one).
    pub numa: Vec<NumaSlot>,
    /// VMs on the host, in arrival order.
    pub vms: Vec<VmId>,
    /// Usage per priority tier, indexed by [`Tier::index`].
    pub tier_use: [TierUse; 4],
}

impl HostState {
    /// Free vCPUs.
    pub fn free_vcpu(&self) -> u32 {
        self.cap_vcpu - self.used_vcpu
    }
    /// Free memory, MiB.
    pub fn free_mem(&self) -> u64 {
        self.cap_mem - self.used_mem
    }
    /// Free GPUs of `model`.
    pub fn free_gpus(&self, model: GpuModelId) -> u32 {
        self.gpus
            .iter()
            .find(|g| g.model == model)
            .map_or(0, |g| g.cap - g.used)
    }
    /// Whether a worker in this state takes new VMs.
    pub fn eligible(&self) -> bool {
        self.role == HostRole::Worker && self.status.schedulable()
    }
    /// Best-fit NUMA node for a strict VM: least vCPUs left over, then
    /// least memory left over, then lowest index.
    pub fn best_numa(&self, vcpus: u32, mem: u64) -> Option<u8> {
        self.numa
            .iter()
            .enumerate()
            .filter(|(_, n)| n.fits(vcpus, mem))
            .min_by_key(|(i, n)| {
                (
                    n.cap_vcpu - n.used_vcpu - vcpus,
                    n.cap_mem - n.used_mem - mem,
                    *i,
                )
            })
            .map(|(i, _)| i as u8)
    }
}

/// Pool usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// GPUs.
    pub gpus: u64,
}

/// The engine's working copy of a cluster.
#[derive(Clone, Debug)]
pub struct ClusterState {
    hosts: Vec<HostState>,
    vms: BTreeMap<VmId, PlacedVm>,
    groups: Vec<PlacementGroup>,
    pools: Vec<Pool>,
    gpu_models: Vec<String>,
    group_hosts: Vec<BTreeMap<HostId, u32>>,
    pool_used: Vec<Usage>,
    /// Per class (0: hosts without GPUs, 1: hosts with GPUs): free vCPUs
    /// -> (free memory, id).
    cpu_mem: [BTreeMap<u32, BTreeSet<(u64, HostId)>>; 2],
    /// Per class: free GiB -> (free vCPUs, id).
    mem_cpu: [BTreeMap<u64, BTreeSet<(u32, HostId)>>; 2],
    evictable: [BTreeSet<(u32, HostId)>; 3],
    by_gpu: Vec<BTreeSet<(u32, HostId)>>,
    ref_vcpu: f64,
    ref_mem: f64,
}

impl ClusterState {
    /// Builds the working copy; checks the snapshot and every existing
    /// placement (capacity, NUMA, GPUs, hard anti-affinity).
    pub fn from_snapshot(snap: &ClusterSnapshot) -> Result<Self, EngineError> {
        snap.validate()?;
        let hosts: Vec<HostState> = snap
            .hosts
            .iter()
            .map(|h| {
                let numa = if h.numa.is_empty() {
                    vec![NumaSlot {
                        cap_vcpu: h.vcpu_capacity(),
                        cap_mem: h.memory_mib,
                        used_vcpu: 0,
                        used_mem: 0,
                    }]
                } else {
                    h.numa
                        .iter()
                        .map(|n| NumaSlot {
                            cap_vcpu: scaled_vcpus(n.cpus, h.cpu_overcommit),
                            cap_mem: n.memory_mib,
                            used_vcpu: 0,
                            used_mem: 0,
                        })
                        .collect()
                };
                HostState {
                    name: h.name.clone(),
                    role: h.role,
                    status: h.status,
                    labels: h.labels.clone(),
                    cap_vcpu: h.vcpu_capacity(),
                    cap_mem: h.memory_mib,
                    used_vcpu: 0,
                    used_mem: 0,
                    gpus: h
                        .gpus
                        .iter()
                        .map(|g| GpuSlot {
                            model: g.model,
                            cap: g.count,
                            used: 0,
                        })
                        .collect(),
                    numa,
                    vms: Vec::new(),
                    tier_use: [TierUse::default(); 4],
                }
            })
            .collect();
        let workers: Vec<&HostState> = hosts
            .iter()
            .filter(|h| h.role == HostRole::Worker)
            .collect();
        let n = workers.len().max(1) as f64;
        let ref_vcpu = (workers.iter().map(|h| f64::from(h.cap_vcpu)).sum::<f64>() / n).max(1.0);
        let ref_mem = (workers.iter().map(|h| h.cap_mem as f64).sum::<f64>() / n).max(1.0);
        let mut st = ClusterState {
            hosts,
            vms: BTreeMap::new(),
            groups: snap.groups.clone(),
            pools: snap.pools.clone(),
            gpu_models: snap.gpu_models.clone(),
            group_hosts: vec![BTreeMap::new(); snap.groups.len()],
            pool_used: vec![Usage::default(); snap.pools.len()],
            cpu_mem: Default::default(),
            mem_cpu: Default::default(),
            evictable: Default::default(),
            by_gpu: vec![BTreeSet::new(); snap.gpu_models.len()],
            ref_vcpu,
            ref_mem,
        };
        for h in 0..st.hosts.len() as HostId {
            st.index_insert(h);
        }
        for p in &snap.placements {
            if st.vms.contains_key(&p.vm.id) {
                return Err(EngineError::DuplicateVm(p.vm.id));
            }
            let host = &st.hosts[p.host as usize];
            if !host.status.runs_vms() {
                return Err(EngineError::InvalidPlacement {
                    vm: p.vm.id,
                    host: p.host,
                    reason: format!("host is {} and runs no VMs", host.status),
                });
            }
            let bad = filter::capacity_rejection(host, &p.vm)
                .or_else(|| filter::anti_affinity(&st, p.host, &p.vm));
            if let Some(r) = bad {
                return Err(EngineError::InvalidPlacement {
                    vm: p.vm.id,
                    host: p.host,
                    reason: r.to_string(),
                });
            }
            let numa = if p.vm.numa_strict {
                match p.numa {
                    Some(n)
                        if host
                            .numa
                            .get(n as usize)
                            .is_some_and(|s| s.fits(p.vm.vcpus, p.vm.memory_mib)) =>
                    {
                        Some(n)
                    }
                    Some(n) => {
                        return Err(EngineError::InvalidPlacement {
                            vm: p.vm.id,
                            host: p.host,
                            reason: format!("NUMA node {n} missing or too small"),
                        })
                    }
                    None => host.best_numa(p.vm.vcpus, p.vm.memory_mib),
                }
            } else {
                None
            };
            st.add(p.vm.clone(), p.host, numa);
        }
        Ok(st)
    }

    /// All hosts, indexed by [`HostId`].
    pub fn hosts(&self) -> &[HostState] {
        &self.hosts
    }
    /// One host.
    pub fn host(&self, h: HostId) -> &HostState {
        &self.hosts[h as usize]
    }
    /// Where a VM runs.
    pub fn vm(&self, id: VmId) -> Option<&PlacedVm> {
        self.vms.get(&id)
    }
    /// Every placed VM, by id.
    pub fn vms(&self) -> impl Iterator<Item = &PlacedVm> {
        self.vms.values()
    }
    /// Number of placed VMs.
    pub fn vm_count(&self) -> usize {
        self.vms.len()
    }
    /// Placement groups.
    pub fn groups(&self) -> &[PlacementGroup] {
        &self.groups
    }
    /// Pools.
    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }
    /// GPU model names.
    pub fn gpu_models(&self) -> &[String] {
        &self.gpu_models
    }
    /// Usage of a pool.
    pub fn pool_usage(&self, pool: usize) -> Usage {
        self.pool_used[pool]
    }
    /// Tier of a VM (through its pool).
    pub fn tier(&self, vm: &VmSpec) -> Tier {
        self.pools[vm.pool as usize].tier
    }
    /// Policy of a VM's group, if any.
    pub fn group_policy(&self, vm: &VmSpec) -> Option<(GroupId, GroupPolicy)> {
        vm.group.map(|g| (g, self.groups[g as usize].policy))
    }
    /// Hosts holding members of a group, with member counts.
    pub fn group_hosts(&self, g: GroupId) -> &BTreeMap<HostId, u32> {
        &self.group_hosts[g as usize]
    }
    /// Members of group `g` on host `h`.
    pub fn members_on(&self, g: GroupId, h: HostId) -> u32 {
        self.group_hosts[g as usize].get(&h).copied().unwrap_or(0)
    }
    /// Mean vCPU capacity of a worker (normalizes the dominant resource).
    pub fn ref_vcpu(&self) -> f64 {
        self.ref_vcpu
    }
    /// Mean memory capacity of a worker, MiB.
    pub fn ref_mem(&self) -> f64 {
        self.ref_mem
    }

    /// Eligible hosts with at least `cpu` free vCPUs and `mem` free MiB,
    /// ordered by (free vCPUs, free memory, id): best fit on vCPUs. Hosts
    /// without GPUs come first, so GPU hosts are a last resort for VMs
    /// that need no GPU.
    pub(crate) fn cpu_major(&self, cpu: u32, mem: u64) -> impl Iterator<Item = HostId> + '_ {
        self.cpu_mem.iter().flat_map(move |class| {
            class
                .range(cpu..)
                .flat_map(move |(_, set)| set.range((mem, 0)..).map(|e| e.1))
        })
    }

    /// Eligible hosts with at least `cpu` free vCPUs and about `mem` free
    /// MiB (bucket granularity; the memory filter makes it exact), ordered
    /// by (free GiB, free vCPUs, id): best fit on memory. GPU hosts last.
    pub(crate) fn mem_major(&self, cpu: u32, mem: u64) -> impl Iterator<Item = HostId> + '_ {
        self.mem_cpu.iter().flat_map(move |class| {
            class
                .range(mem >> MEM_BUCKET_SHIFT..)
                .flat_map(move |(_, set)| set.range((cpu, 0)..).map(|e| e.1))
        })
    }

    /// Eligible hosts, most free vCPUs first. GPU hosts last.
    pub(crate) fn cpu_major_rev(&self) -> impl Iterator<Item = HostId> + '_ {
        self.cpu_mem.iter().flat_map(|class| {
            class
                .values()
                .rev()
                .flat_map(|set| set.iter().rev().map(|e| e.1))
        })
    }

    /// Eligible hosts, most free memory first. GPU hosts last.
    pub(crate) fn mem_major_rev(&self) -> impl Iterator<Item = HostId> + '_ {
        self.mem_cpu.iter().flat_map(|class| {
            class
                .values()
                .rev()
                .flat_map(|set| set.iter().rev().map(|e| e.1))
        })
    }

    /// Eligible hosts whose free vCPUs plus the vCPUs of VMs below `tier`
    /// reach `cpu`, tightest first (preemption candidates).
    pub(crate) fn evictable(&self, tier: Tier, cpu: u32) -> impl Iterator<Item = HostId> + '_ {
        let i = tier.index().clamp(1, 3) - 1;
        self.evictable[i].range((cpu, 0)..).map(|e| e.1)
    }

    /// Eligible hosts with GPUs of `model`, ordered by (free GPUs, id).
    pub(crate) fn by_gpu(&self, model: GpuModelId) -> &BTreeSet<(u32, HostId)> {
        &self.by_gpu[model as usize]
    }

    fn evictable_key(host: &HostState, i: usize) -> u32 {
        host.free_vcpu() + host.tier_use[..=i].iter().map(|t| t.vcpus).sum::<u32>()
    }

    fn index_insert(&mut self, h: HostId) {
        let host = &self.hosts[h as usize];
        if !host.eligible() {
            return;
        }
        let (c, m) = (host.free_vcpu(), host.free_mem());
        let k = usize::from(!host.gpus.is_empty());
        self.cpu_mem[k].entry(c).or_default().insert((m, h));
        self.mem_cpu[k]
            .entry(m >> MEM_BUCKET_SHIFT)
            .or_default()
            .insert((c, h));
        for i in 0..3 {
            self.evictable[i].insert((Self::evictable_key(host, i), h));
        }
        for g in &host.gpus {
            self.by_gpu[g.model as usize].insert((g.cap - g.used, h));
        }
    }

    fn index_remove(&mut self, h: HostId) {
        let host = &self.hosts[h as usize];
        if !host.eligible() {
            return;
        }
        let (c, m) = (host.free_vcpu(), host.free_mem());
        let k = usize::from(!host.gpus.is_empty());
        if let Some(set) = self.cpu_mem[k].get_mut(&c) {
            set.remove(&(m, h));
            if set.is_empty() {
                self.cpu_mem[k].remove(&c);
            }
        }
        let b = m >> MEM_BUCKET_SHIFT;
        if let Some(set) = self.mem_cpu[k].get_mut(&b) {
            set.remove(&(c, h));
            if set.is_empty() {
                self.mem_cpu[k].remove(&b);
            }
        }
        for i in 0..3 {
            self.evictable[i].remove(&(Self::evictable_key(host, i), h));
        }
        for g in &host.gpus {
            self.by_gpu[g.model as usize].remove(&(g.cap - g.used, h));
        }
    }

    /// Charges a VM to a host. The caller has checked the filters.
    pub(crate) fn add(&mut self, vm: VmSpec, h: HostId, numa: Option<u8>) {
        self.index_remove(h);
        let tier = self.pools[vm.pool as usize].tier.index();
        let host = &mut self.hosts[h as usize];
        host.used_vcpu += vm.vcpus;
        host.used_mem += vm.memory_mib;
        let gpus = vm.gpu.map_or(0, |g| g.count);
        if let Some(g) = vm.gpu {
            if let Some(slot) = host.gpus.iter_mut().find(|s| s.model == g.model) {
                slot.used += g.count;
            }
        }
        if let Some(n) = numa {
            let node = &mut host.numa[n as usize];
            node.used_vcpu += vm.vcpus;
            node.used_mem += vm.memory_mib;
        }
        let t = &mut host.tier_use[tier];
        t.vcpus += vm.vcpus;
        t.mem += vm.memory_mib;
        t.gpus += gpus;
        host.vms.push(vm.id);
        self.index_insert(h);
        if let Some(g) = vm.group {
            *self.group_hosts[g as usize].entry(h).or_insert(0) += 1;
        }
        let pu = &mut self.pool_used[vm.pool as usize];
        pu.vcpus += u64::from(vm.vcpus);
        pu.memory_mib += vm.memory_mib;
        pu.gpus += u64::from(gpus);
        self.vms.insert(vm.id, PlacedVm { vm, host: h, numa });
    }

    /// Releases a VM; returns where it was.
    pub(crate) fn remove(&mut self, id: VmId) -> Option<PlacedVm> {
        let p = self.vms.remove(&id)?;
        let h = p.host;
        self.index_remove(h);
        let vm = &p.vm;
        let tier = self.pools[vm.pool as usize].tier.index();
        let host = &mut self.hosts[h as usize];
        host.used_vcpu -= vm.vcpus;
        host.used_mem -= vm.memory_mib;
        let gpus = vm.gpu.map_or(0, |g| g.count);
        if let Some(g) = vm.gpu {
            if let Some(slot) = host.gpus.iter_mut().find(|s| s.model == g.model) {
                slot.used -= g.count;
            }
        }
        if let Some(n) = p.numa {
            let node = &mut host.numa[n as usize];
            node.used_vcpu -= vm.vcpus;
            node.used_mem -= vm.memory_mib;
        }
        let t = &mut host.tier_use[tier];
        t.vcpus -= vm.vcpus;
        t.mem -= vm.memory_mib;
        t.gpus -= gpus;
        if let Some(pos) = host.vms.iter().position(|v| *v == id) {
            host.vms.remove(pos);
        }
        self.index_insert(h);
        if let Some(g) = vm.group {
            let map = &mut self.group_hosts[g as usize];
            if let Some(c) = map.get_mut(&h) {
                *c -= 1;
                if *c == 0 {
                    map.remove(&h);
                }
            }
        }
        let pu = &mut self.pool_used[vm.pool as usize];
        pu.vcpus -= u64::from(vm.vcpus);
        pu.memory_mib -= vm.memory_mib;
        pu.gpus -= u64::from(gpus);
        Some(p)
    }

    /// Sets a host's status, keeping the indexes in step.
    pub(crate) fn set_status(&mut self, h: HostId, status: HostStatus) {
        self.index_remove(h);
        self.hosts[h as usize].status = status;
        self.index_insert(h);
    }

    /// Hard anti-affinity violations: for every hard group, members beyond
    /// the first on each host. Counted from VM locations, not from the
    /// indexes, so it checks the bookkeeping independently.
    pub fn anti_affinity_violations(&self) -> u64 {
        let mut per: BTreeMap<(GroupId, HostId), u64> = BTreeMap::new();
        for p in self.vms.values() {
            if let Some(g) = p.vm.group {
                if self.groups[g as usize].policy == GroupPolicy::HardAntiAffinity {
                    *per.entry((g, p.host)).or_insert(0) += 1;
                }
            }
        }
        per.values().map(|c| c - 1).sum()
    }

    /// Recomputes every host's usage from VM locations and reports the
    /// first host over capacity on any resource (vCPU, memory, GPU, NUMA
    /// node), or a mismatch with the running totals.
    pub fn check_capacity(&self) -> Result<(), String> {
        // (vCPUs, memory, GPUs by model, pinned (vCPUs, memory) per node)
        type Tally = (u64, u64, BTreeMap<GpuModelId, u64>, Vec<(u64, u64)>);
        let mut used: Vec<Tally> = self
            .hosts
            .iter()
            .map(|h| (0, 0, BTreeMap::new(), vec![(0, 0); h.numa.len()]))
            .collect();
        for p in self.vms.values() {
            let u = &mut used[p.host as usize];
            u.0 += u64::from(p.vm.vcpus);
            u.1 += p.vm.memory_mib;
            if let Some(g) = p.vm.gpu {
                *u.2.entry(g.model).or_insert(0) += u64::from(g.count);
            }
            if let Some(n) = p.numa {
                let Some(node) = u.3.get_mut(n as usize) else {
                    return Err(format!("vm {} pinned to missing NUMA node {n}", p.vm.id));
                };
                node.0 += u64::from(p.vm.vcpus);
                node.1 += p.vm.memory_mib;
            } else if p.vm.numa_strict {
                return Err(format!("strict vm {} has no NUMA node", p.vm.id));
            }
        }
        for (i, (h, u)) in self.hosts.iter().zip(&used).enumerate() {
            if u.0 > u64::from(h.cap_vcpu) || u.1 > h.cap_mem {
                return Err(format!("host {i} over capacity: {} vCPU, {} MiB", u.0, u.1));
            }
            if u.0 != u64::from(h.used_vcpu) || u.1 != h.used_mem {
                return Err(format!("host {i} usage bookkeeping drifted"));
            }
            for (m, c) in &u.2 {
                let cap = h.gpus.iter().find(|g| g.model == *m).map_or(0, |g| g.cap);
                if *c > u64::from(cap) {
                    return Err(format!("host {i} over GPU capacity for model {m}"));
                }
            }
            for (n, (node, nu)) in h.numa.iter().zip(&u.3).enumerate() {
                if nu.0 > u64::from(node.cap_vcpu) || nu.1 > node.cap_mem {
                    return Err(format!("host {i} NUMA node {n} over capacity"));
                }
            }
            if !h.vms.is_empty() && !h.status.runs_vms() {
                return Err(format!("host {i} is {} but runs VMs", h.status));
            }
        }
        Ok(())
    }
}
