//! The placement pipeline. A [`Session`] is the engine's private working
//! copy of one snapshot: filters -> candidate lookup through the indexes ->
//! scorers -> choice, with preemption when nothing fits. [`plan`] runs a
//! batch against a snapshot and returns a [`Plan`]; the snapshot is only
//! read.
//!
//! Best fit: the VM's *dominant resource* is GPUs if it asks for any, else
//! whichever of vCPU and memory is the larger fraction of a mean worker.
//! Eligible hosts are kept in ordered sets keyed by (free amount, host id)
//! per resource, so the hosts with the least room that is still enough
//! come first; the first `candidates` hosts that pass every filter are
//! scored and the best total wins (ties: earlier in that order, i.e. less
//! leftover, then lower host id). Cost is O(log n + hosts skipped).

use crate::error::EngineError;
use crate::filter::{self, Explanation, QuotaReject};
use crate::model::{ClusterSnapshot, GroupPolicy, HostId, PlacedVm, VmId, VmSpec};
use crate::preempt;
use crate::rebalance::{self, RebalanceOptions, RebalancePlan};
use crate::score::{self, Weights};
use crate::state::ClusterState;
use crate::status::{transition, HostEvent, HostStatus};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// How a session chooses among feasible hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The engine: indexed best fit on the dominant resource plus scorers.
    BestFit,
    /// Baseline: lowest host id that passes the filters.
    FirstFit,
    /// Baseline: most free room on the dominant resource (least allocated).
    Spread,
    /// Baseline: a uniformly random feasible host.
    Random,
}

/// Engine settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineConfig {
    /// Choice rule.
    pub strategy: Strategy,
    /// Feasible hosts scored per decision (best fit), at least 1.
    pub candidates: usize,
    /// Whether higher tiers may evict lower tiers.
    pub preemption: bool,
    /// Seed of the random baseline.
    pub seed: u64,
    /// Scorer weights.
    pub weights: Weights,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            strategy: Strategy::BestFit,
            candidates: 4,
            preemption: true,
            seed: 0,
            weights: Weights::default(),
        }
    }
}

/// Why a VM stays pending. Call [`Session::explain`] for per-host detail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingReason {
    /// The VM's pool quota is exhausted.
    Quota(QuotaReject),
    /// No host passes the filters, and preemption found nothing.
    NoHost,
}

/// Outcome of placing one VM.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Placed; `evicted` lists lower-tier VMs removed to make room.
    Placed {
        /// Host.
        host: HostId,
        /// NUMA node (strict VMs).
        numa: Option<u8>,
        /// VMs evicted, with where they were.
        evicted: Vec<PlacedVm>,
    },
    /// Not placed.
    Pending(PendingReason),
}

/// The engine's working session over one snapshot.
#[derive(Clone, Debug)]
pub struct Session {
    st: ClusterState,
    cfg: EngineConfig,
    rng: ChaCha8Rng,
    /// Smallest vCPUs and memory of any VM asked for so far (the
    /// stranding scorer's idea of "too small to use").
    min_shape: (u32, u64),
}

enum Dominant {
    Cpu,
    Mem,
    Gpu(u16),
}

impl Session {
    /// Builds a session from a snapshot (which is only read).
    pub fn new(snapshot: &ClusterSnapshot, cfg: EngineConfig) -> Result<Self, EngineError> {
        Ok(Session {
            st: ClusterState::from_snapshot(snapshot)?,
            cfg,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            min_shape: (u32::MAX, u64::MAX),
        })
    }

    /// Read access to the working state.
    pub fn state(&self) -> &ClusterState {
        &self.st
    }

    /// Settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Turns preemption on or off for later decisions.
    pub fn set_preemption(&mut self, on: bool) {
        self.cfg.preemption = on;
    }

    /// Places one VM: quota, filters, scorers, then preemption if needed.
    pub fn place(&mut self, vm: &VmSpec) -> Result<Decision, EngineError> {
        self.check_vm(vm)?;
        self.min_shape = (
            self.min_shape.0.min(vm.vcpus),
            self.min_shape.1.min(vm.memory_mib),
        );
        if let Some(q) = filter::quota(&self.st, vm) {
            return Ok(Decision::Pending(PendingReason::Quota(q)));
        }
        if let Some(h) = self.choose(vm) {
            let numa = self.numa_for(h, vm);
            self.st.add(vm.clone(), h, numa);
            return Ok(Decision::Placed {
                host: h,
                numa,
                evicted: Vec::new(),
            });
        }
        if self.cfg.preemption {
            if let Some(p) = preempt::find(&self.st, vm) {
                let evicted: Vec<PlacedVm> = p
                    .victims
                    .iter()
                    .filter_map(|id| self.st.remove(*id))
                    .collect();
                if filter::first_rejection(&self.st, p.host, vm).is_none() {
                    let numa = self.numa_for(p.host, vm);
                    self.st.add(vm.clone(), p.host, numa);
                    return Ok(Decision::Placed {
                        host: p.host,
                        numa,
                        evicted,
                    });
                }
                // Cannot happen if preempt::find simulates correctly; undo.
                for e in evicted {
                    self.st.add(e.vm, e.host, e.numa);
                }
            }
        }
        Ok(Decision::Pending(PendingReason::NoHost))
    }

    /// Removes a VM (it departed). Returns where it was.
    pub fn release(&mut self, vm: VmId) -> Result<PlacedVm, EngineError> {
        self.st.remove(vm).ok_or(EngineError::UnknownVm(vm))
    }

    /// Applies a host lifecycle event. If the host no longer runs VMs
    /// (Failed, Offline), its VMs are removed and returned for restart.
    pub fn host_event(
        &mut self,
        h: HostId,
        event: HostEvent,
    ) -> Result<Vec<PlacedVm>, EngineError> {
        let host = self
            .st
            .hosts()
            .get(h as usize)
            .ok_or(EngineError::UnknownHost(h))?;
        let next = transition(host.status, event)
            .map_err(|source| EngineError::Transition { host: h, source })?;
        self.st.set_status(h, next);
        if next.runs_vms() {
            return Ok(Vec::new());
        }
        let ids = self.st.host(h).vms.clone();
        Ok(ids
            .into_iter()
            .filter_map(|id| self.st.remove(id))
            .collect())
    }

    /// Current status of a host.
    pub fn host_status(&self, h: HostId) -> Option<HostStatus> {
        self.st.hosts().get(h as usize).map(|x| x.status)
    }

    /// Live-migrates a VM after checking every filter on the destination.
    pub fn migrate(&mut self, vm: VmId, to: HostId) -> Result<(), EngineError> {
        let p = self.st.vm(vm).ok_or(EngineError::UnknownVm(vm))?;
        if to as usize >= self.st.hosts().len() {
            return Err(EngineError::UnknownHost(to));
        }
        if p.host == to {
            return Err(EngineError::InvalidMove {
                vm,
                host: to,
                reason: "already there".into(),
            });
        }
        if let Some(r) = filter::first_rejection(&self.st, to, &p.vm) {
            return Err(EngineError::InvalidMove {
                vm,
                host: to,
                reason: r.to_string(),
            });
        }
        let spec = p.vm.clone();
        self.st.remove(vm);
        let numa = self.numa_for(to, &spec);
        self.st.add(spec, to, numa);
        Ok(())
    }

    /// Plans live migrations (drains and DRS-like balancing) without
    /// applying them.
    pub fn rebalance_plan(&self, opts: &RebalanceOptions) -> RebalancePlan {
        rebalance::plan(&self.st, opts)
    }

    /// The slow path: why every host refuses `vm`.
    pub fn explain(&self, vm: &VmSpec) -> Explanation {
        filter::explain(&self.st, vm)
    }

    fn check_vm(&self, vm: &VmSpec) -> Result<(), EngineError> {
        if self.st.vm(vm.id).is_some() {
            return Err(EngineError::DuplicateVm(vm.id));
        }
        let e = |err| Err(EngineError::Model(err));
        use crate::error::ModelError as M;
        if vm.vcpus == 0 || vm.memory_mib == 0 {
            return e(M::EmptyVm {
                vm: vm.id,
                vcpus: vm.vcpus,
                memory_mib: vm.memory_mib,
            });
        }
        if vm.pool as usize >= self.st.pools().len() {
            return e(M::UnknownPool {
                vm: vm.id,
                pool: vm.pool,
            });
        }
        if let Some(g) = vm.group.filter(|g| *g as usize >= self.st.groups().len()) {
            return e(M::UnknownGroup {
                vm: vm.id,
                group: g,
            });
        }
        if let Some(g) = vm.gpu {
            if g.model as usize >= self.st.gpu_models().len() {
                return e(M::UnknownGpuModel(g.model));
            }
            if g.count == 0 {
                return e(M::ZeroGpus { vm: vm.id });
            }
        }
        Ok(())
    }

    fn numa_for(&self, h: HostId, vm: &VmSpec) -> Option<u8> {
        if vm.numa_strict {
            self.st.host(h).best_numa(vm.vcpus, vm.memory_mib)
        } else {
            None
        }
    }

    fn dominant(&self, vm: &VmSpec) -> Dominant {
        if let Some(g) = vm.gpu {
            return Dominant::Gpu(g.model);
        }
        let c = f64::from(vm.vcpus) / self.st.ref_vcpu();
        let m = vm.memory_mib as f64 / self.st.ref_mem();
        if c >= m {
            Dominant::Cpu
        } else {
            Dominant::Mem
        }
    }

    fn feasible(&self, h: HostId, vm: &VmSpec) -> bool {
        filter::passes(&self.st, h, vm)
    }

    fn choose(&mut self, vm: &VmSpec) -> Option<HostId> {
        // Affinity with members already placed: only their hosts qualify.
        if let Some((g, GroupPolicy::Affinity)) = self.st.group_policy(vm) {
            let hosts = self.st.group_hosts(g);
            if !hosts.is_empty() {
                return hosts.keys().copied().find(|h| self.feasible(*h, vm));
            }
        }
        match self.cfg.strategy {
            Strategy::BestFit => self.best_fit(vm),
            Strategy::FirstFit => (0..self.st.hosts().len() as HostId).find(|h| {
                let host = self.st.host(*h);
                host.free_vcpu() >= vm.vcpus
                    && host.free_mem() >= vm.memory_mib
                    && self.feasible(*h, vm)
            }),
            Strategy::Spread => self.spread(vm),
            Strategy::Random => self.random(vm),
        }
    }

    fn best_fit(&self, vm: &VmSpec) -> Option<HostId> {
        let k = self.cfg.candidates.max(1);
        let soft = matches!(
            self.st.group_policy(vm),
            Some((_, GroupPolicy::SoftAntiAffinity))
        );
        match self.dominant(vm) {
            Dominant::Cpu => self.pick(vm, self.st.cpu_major(vm.vcpus, vm.memory_mib), k, soft),
            Dominant::Mem => self.pick(vm, self.st.mem_major(vm.vcpus, vm.memory_mib), k, soft),
            Dominant::Gpu(m) => {
                let count = vm.gpu.map_or(1, |g| g.count);
                let it = self.st.by_gpu(m).range((count, 0)..).map(|e| e.1);
                self.pick(vm, it, k, soft)
            }
        }
    }

    /// Collects the first `k` feasible hosts in index order (for soft
    /// anti-affinity, keeps looking a bounded while for a host without a
    /// group member) and returns the best-scoring one.
    fn pick(
        &self,
        vm: &VmSpec,
        hosts: impl Iterator<Item = HostId>,
        k: usize,
        soft: bool,
    ) -> Option<HostId> {
        const SOFT_EXTRA: usize = 64;
        let group = vm.group;
        let mut cands: Vec<HostId> = Vec::with_capacity(k + 1);
        let mut clean = false;
        let mut extra = 0;
        for h in hosts {
            if cands.len() >= k {
                if !soft || clean || extra >= SOFT_EXTRA {
                    break;
                }
                extra += 1;
            }
            if !self.feasible(h, vm) {
                continue;
            }
            let has_members = group.is_some_and(|g| self.st.members_on(g, h) > 0);
            if cands.len() < k {
                clean |= !has_members;
                cands.push(h);
            } else if !has_members {
                clean = true;
                cands.push(h);
            }
        }
        let mut best: Option<(f64, HostId)> = None;
        for h in cands {
            let s = self.score(h, vm, soft);
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, h));
            }
        }
        best.map(|(_, h)| h)
    }

    /// Weighted total of the scorers for placing `vm` on `h`.
    fn score(&self, h: HostId, vm: &VmSpec, soft: bool) -> f64 {
        let host = self.st.host(h);
        let w = &self.cfg.weights;
        let cpu_used = f64::from(host.used_vcpu + vm.vcpus) / f64::from(host.cap_vcpu.max(1));
        let mem_used = (host.used_mem + vm.memory_mib) as f64 / host.cap_mem.max(1) as f64;
        let leftover = match self.dominant(vm) {
            Dominant::Cpu => 1.0 - cpu_used,
            Dominant::Mem => 1.0 - mem_used,
            Dominant::Gpu(m) => {
                let slot = host.gpus.iter().find(|g| g.model == m);
                slot.map_or(0.0, |g| {
                    f64::from(g.cap - g.used - vm.gpu.map_or(0, |d| d.count))
                        / f64::from(g.cap.max(1))
                })
            }
        };
        let mut s =
            w.fit * score::best_fit(leftover) + w.balance * score::balance(cpu_used, mem_used);
        if soft {
            let members = vm.group.map_or(0, |g| self.st.members_on(g, h));
            s += w.soft_anti_affinity * score::soft_anti_affinity(members);
        }
        let (fc, fm) = (host.free_vcpu() - vm.vcpus, host.free_mem() - vm.memory_mib);
        let exhausted = fc < self.min_shape.0 || fm < self.min_shape.1;
        let stranded = (1.0 - cpu_used + 1.0 - mem_used) / 2.0;
        s += w.strand * score::strand(exhausted, stranded);
        if !vm.numa_strict {
            let fits = host.numa.iter().any(|n| n.fits(vm.vcpus, vm.memory_mib));
            s += w.numa * score::numa_locality(fits);
        }
        s
    }

    fn spread(&self, vm: &VmSpec) -> Option<HostId> {
        match self.dominant(vm) {
            Dominant::Cpu => self.st.cpu_major_rev().find(|h| self.feasible(*h, vm)),
            Dominant::Mem => self.st.mem_major_rev().find(|h| self.feasible(*h, vm)),
            Dominant::Gpu(m) => self
                .st
                .by_gpu(m)
                .iter()
                .rev()
                .map(|e| e.1)
                .find(|h| self.feasible(*h, vm)),
        }
    }

    fn random(&mut self, vm: &VmSpec) -> Option<HostId> {
        let n = self.st.hosts().len() as HostId;
        if n == 0 {
            return None;
        }
        for _ in 0..32 {
            let h = self.rng.gen_range(0..n);
            if self.feasible(h, vm) {
                return Some(h);
            }
        }
        let all: Vec<HostId> = self
            .st
            .cpu_major(vm.vcpus, vm.memory_mib)
            .filter(|h| self.feasible(*h, vm))
            .collect();
        if all.is_empty() {
            return None;
        }
        Some(all[self.rng.gen_range(0..all.len())])
    }
}

/// A placement in a [`Plan`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanPlacement {
    /// VM.
    pub vm: VmId,
    /// Host.
    pub host: HostId,
    /// NUMA node (strict VMs).
    pub numa: Option<u8>,
}

/// An eviction in a [`Plan`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanEviction {
    /// Evicted VM.
    pub vm: VmId,
    /// Host it ran on.
    pub host: HostId,
    /// Higher-tier VM that took its place.
    pub by: VmId,
}

/// A VM the plan could not place, with the reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanPending {
    /// VM.
    pub vm: VmId,
    /// One-line reason for a user.
    pub summary: String,
    /// Per-host detail.
    pub explanation: Explanation,
}

/// What the engine decided for a batch. Applying it is the caller's job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Placements, in decision order.
    pub placements: Vec<PlanPlacement>,
    /// Evictions, in decision order.
    pub evictions: Vec<PlanEviction>,
    /// VMs left pending.
    pub pending: Vec<PlanPending>,
}

/// Plans a batch of VMs against a snapshot. Higher tiers are decided
/// first; within a tier, input order. The snapshot is not modified.
pub fn plan(
    snapshot: &ClusterSnapshot,
    vms: &[VmSpec],
    cfg: EngineConfig,
) -> Result<Plan, EngineError> {
    let mut s = Session::new(snapshot, cfg)?;
    let mut order: Vec<&VmSpec> = vms.iter().collect();
    for vm in &order {
        s.check_vm(vm)?;
    }
    order.sort_by_key(|vm| std::cmp::Reverse(s.st.pools()[vm.pool as usize].tier));
    let mut out = Plan::default();
    for vm in order {
        match s.place(vm)? {
            Decision::Placed {
                host,
                numa,
                evicted,
            } => {
                out.placements.push(PlanPlacement {
                    vm: vm.id,
                    host,
                    numa,
                });
                for e in evicted {
                    out.placements.retain(|p| p.vm != e.vm.id);
                    out.evictions.push(PlanEviction {
                        vm: e.vm.id,
                        host: e.host,
                        by: vm.id,
                    });
                }
            }
            Decision::Pending(_) => {
                let explanation = s.explain(vm);
                out.pending.push(PlanPending {
                    vm: vm.id,
                    summary: explanation.summary(),
                    explanation,
                });
            }
        }
    }
    Ok(out)
}
