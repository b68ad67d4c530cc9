//! Preemption: when nothing fits, a VM may evict strictly lower-tier VMs.
//! For every host that passes the non-capacity filters, start from "evict
//! every lower-tier VM"; if the VM still does not fit, the host is out.
//! Otherwise give VMs back one at a time, highest tier and largest first,
//! keeping each one the VM still fits beside (the Kubernetes "reprieve"
//! idea). The cheapest host wins, by (highest evicted tier, number of
//! victims, evicted vCPUs, evicted memory, host id).
//!
//! Hosts are visited through an index keyed by "free vCPUs + vCPUs of
//! lower-tier VMs", tightest first, so hosts that cannot work even after
//! evicting everything below the tier are never touched; the cheapest of
//! the first [`VIEW`] viable hosts is chosen (exactly the cheapest overall
//! when fewer are viable).

use crate::filter;
use crate::model::{HostId, PlacedVm, Tier, VmId, VmSpec};
use crate::state::{ClusterState, HostState};
use std::cmp::Reverse;

/// What a host would have free after hypothetical evictions.
struct Avail {
    vcpu: u32,
    mem: u64,
    gpu: u32,
    numa: Vec<(u32, u64)>,
}

impl Avail {
    fn of(host: &HostState, vm: &VmSpec) -> Self {
        Avail {
            vcpu: host.free_vcpu(),
            mem: host.free_mem(),
            gpu: vm.gpu.map_or(0, |g| host.free_gpus(g.model)),
            numa: host
                .numa
                .iter()
                .map(|n| (n.cap_vcpu - n.used_vcpu, n.cap_mem - n.used_mem))
                .collect(),
        }
    }

    /// `sign` true releases the VM's resources, false charges them.
    fn apply(&mut self, p: &PlacedVm, want: &VmSpec, release: bool) {
        let gpus = match (p.vm.gpu, want.gpu) {
            (Some(a), Some(b)) if a.model == b.model => a.count,
            _ => 0,
        };
        if release {
            self.vcpu += p.vm.vcpus;
            self.mem += p.vm.memory_mib;
            self.gpu += gpus;
        } else {
            self.vcpu -= p.vm.vcpus;
            self.mem -= p.vm.memory_mib;
            self.gpu -= gpus;
        }
        if let Some(n) = p.numa {
            if let Some(node) = self.numa.get_mut(n as usize) {
                if release {
                    node.0 += p.vm.vcpus;
                    node.1 += p.vm.memory_mib;
                } else {
                    node.0 -= p.vm.vcpus;
                    node.1 -= p.vm.memory_mib;
                }
            }
        }
    }

    fn fits(&self, vm: &VmSpec) -> bool {
        self.vcpu >= vm.vcpus
            && self.mem >= vm.memory_mib
            && vm.gpu.is_none_or(|g| self.gpu >= g.count)
            && (!vm.numa_strict
                || self
                    .numa
                    .iter()
                    .any(|n| n.0 >= vm.vcpus && n.1 >= vm.memory_mib))
    }
}

/// A chosen preemption.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preemption {
    /// Host the VM goes to.
    pub host: HostId,
    /// VMs to evict, cheapest set found on that host.
    pub victims: Vec<VmId>,
}

/// Viable hosts compared before choosing; bounds the work per decision.
pub const VIEW: usize = 32;

type Cost = (usize, usize, u64, u64, HostId);

/// Finds the cheapest preemption for `vm`, or `None` if no host works even
/// after evicting every lower-tier VM. Reads the state only.
pub fn find(st: &ClusterState, vm: &VmSpec) -> Option<Preemption> {
    let tier = st.tier(vm).index();
    if tier == Tier::BestEffort.index() {
        return None;
    }
    let mut best: Option<(Cost, Preemption)> = None;
    let mut viable = 0;
    for h in st.evictable(st.tier(vm), vm.vcpus) {
        if viable >= VIEW {
            break;
        }
        let host = st.host(h);
        // Cheap bound from per-tier totals before touching VMs.
        let lower = host.tier_use[..tier]
            .iter()
            .fold((0u64, 0u64, 0u64), |a, t| {
                (
                    a.0 + u64::from(t.vcpus),
                    a.1 + t.mem,
                    a.2 + u64::from(t.gpus),
                )
            });
        if lower.0 == 0 && lower.1 == 0 {
            continue;
        }
        if u64::from(host.free_vcpu()) + lower.0 < u64::from(vm.vcpus)
            || host.free_mem() + lower.1 < vm.memory_mib
            || vm
                .gpu
                .is_some_and(|g| u64::from(host.free_gpus(g.model)) + lower.2 < u64::from(g.count))
        {
            continue;
        }
        if !filter::placement_passes(st, h, vm) {
            continue;
        }
        let mut cands: Vec<(&PlacedVm, usize)> = host
            .vms
            .iter()
            .filter_map(|id| st.vm(*id))
            .map(|p| (p, st.tier(&p.vm).index()))
            .filter(|(_, t)| *t < tier)
            .collect();
        let mut avail = Avail::of(host, vm);
        for (p, _) in &cands {
            avail.apply(p, vm, true);
        }
        if !avail.fits(vm) {
            continue;
        }
        cands.sort_by_key(|(p, t)| {
            (
                Reverse(*t),
                Reverse(p.vm.vcpus),
                Reverse(p.vm.memory_mib),
                p.vm.id,
            )
        });
        let mut victims = Vec::new();
        for (p, t) in cands {
            avail.apply(p, vm, false);
            if !avail.fits(vm) {
                avail.apply(p, vm, true);
                victims.push((p, t));
            }
        }
        viable += 1;
        let cost: Cost = (
            victims.iter().map(|(_, t)| *t).max().unwrap_or(0),
            victims.len(),
            victims.iter().map(|(p, _)| u64::from(p.vm.vcpus)).sum(),
            victims.iter().map(|(p, _)| p.vm.memory_mib).sum(),
            h,
        );
        if best.as_ref().is_none_or(|(c, _)| cost < *c) {
            best = Some((
                cost,
                Preemption {
                    host: h,
                    victims: victims.iter().map(|(p, _)| p.vm.id).collect(),
                },
            ));
        }
    }
    best.map(|(_, p)| p)
}
