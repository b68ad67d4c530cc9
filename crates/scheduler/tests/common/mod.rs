//! Builders shared by the integration tests.
#![allow(dead_code)]

use ray_scheduler::*;
use std::collections::BTreeMap;

pub fn worker(name: &str, cpus: u32, mem: u64) -> Host {
    Host {
        name: name.into(),
        role: HostRole::Worker,
        status: HostStatus::Ready,
        cpus,
        cpu_overcommit: 1.0,
        memory_mib: mem,
        gpus: vec![],
        numa: vec![],
        labels: BTreeMap::new(),
    }
}

pub fn vm(id: VmId, vcpus: u32, mem: u64) -> VmSpec {
    VmSpec {
        id,
        vcpus,
        memory_mib: mem,
        gpu: None,
        numa_strict: false,
        group: None,
        pool: 0,
        selector: vec![],
    }
}

/// Pools: 0 best_effort, 1 standard, 2 high, 3 critical (no quotas).
pub fn snapshot(hosts: Vec<Host>) -> ClusterSnapshot {
    ClusterSnapshot {
        hosts,
        gpu_models: vec!["a100".into()],
        groups: vec![
            PlacementGroup {
                name: "hard".into(),
                policy: GroupPolicy::HardAntiAffinity,
            },
            PlacementGroup {
                name: "soft".into(),
                policy: GroupPolicy::SoftAntiAffinity,
            },
            PlacementGroup {
                name: "aff".into(),
                policy: GroupPolicy::Affinity,
            },
        ],
        pools: [Tier::BestEffort, Tier::Standard, Tier::High, Tier::Critical]
            .into_iter()
            .map(|tier| Pool {
                name: format!("{tier:?}"),
                tier,
                quota: None,
            })
            .collect(),
        placements: vec![],
    }
}

pub fn session(snap: &ClusterSnapshot) -> Session {
    Session::new(snap, EngineConfig::default()).expect("valid snapshot")
}

/// Pure best fit: one candidate, so scorers cannot reorder.
pub fn session_pure(snap: &ClusterSnapshot) -> Session {
    let cfg = EngineConfig {
        candidates: 1,
        ..EngineConfig::default()
    };
    Session::new(snap, cfg).expect("valid snapshot")
}

pub fn placed_host(d: &Decision) -> Option<HostId> {
    match d {
        Decision::Placed { host, .. } => Some(*host),
        Decision::Pending(_) => None,
    }
}

/// A fake clock advancing 100 ns per call.
pub fn fake_clock() -> impl Fn() -> u64 {
    let t = std::cell::Cell::new(0u64);
    move || {
        t.set(t.get() + 100);
        t.get()
    }
}
