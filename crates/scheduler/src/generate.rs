//! Seeded synthetic scenarios (see [`crate::scenario::Scenario::generate`]).

use crate::model::{
    ClusterSnapshot, GpuDemand, GpuSlots, GroupPolicy, Host, HostId, HostRole, NumaNode,
    PlacementGroup, Pool, Quota, Tier, VmId, VmSpec,
};
use crate::scenario::{rng, sort_trace, weighted, Scenario, TraceKind};
use crate::status::HostStatus;
use rand::Rng;
use std::collections::BTreeMap;

const GIB: u64 = 1024;
const TICK: u64 = 10;

/// (vCPUs, GiB, weight) of the non-GPU VM catalog.
const SHAPES: &[((u32, u64), u32)] = &[
    ((1, 2), 10),
    ((2, 4), 15),
    ((2, 8), 10),
    ((4, 8), 15),
    ((4, 16), 15),
    ((8, 16), 8),
    ((8, 32), 10),
    ((16, 32), 4),
    ((16, 64), 6),
    ((32, 128), 2),
    ((4, 32), 3),
    ((2, 16), 2),
];

fn host(i: u32, kind: u32) -> Host {
    let zone = ["a", "b", "c"][(i % 3) as usize].to_string();
    let labels = BTreeMap::from([("zone".to_string(), zone)]);
    let two_nodes = |cpus: u32, mem: u64| {
        vec![
            NumaNode {
                cpus: cpus / 2,
                memory_mib: mem / 2,
            };
            2
        ]
    };
    let (role, cpus, ratio, mem, gpus) = match kind {
        0 => (HostRole::Worker, 24, 2.0, 192 * GIB, vec![]),
        1 => (HostRole::Worker, 32, 1.5, 160 * GIB, vec![]),
        2 => (
            HostRole::Worker,
            24,
            1.0,
            192 * GIB,
            vec![GpuSlots { model: 0, count: 4 }],
        ),
        _ => {
            let role = [
                HostRole::Controller,
                HostRole::Storage,
                HostRole::Monitor,
                HostRole::Gateway,
            ][(i % 4) as usize];
            (role, 16, 1.0, 64 * GIB, vec![])
        }
    };
    Host {
        name: format!("host-{i}"),
        role,
        status: HostStatus::Ready,
        cpus,
        cpu_overcommit: ratio,
        memory_mib: mem,
        gpus,
        numa: two_nodes(cpus, mem),
        labels,
    }
}

pub(crate) fn generate(hosts: u32, vms: u32, seed: u64) -> Scenario {
    let mut r = rng(seed);
    let mut snap = ClusterSnapshot {
        gpu_models: vec!["a100".into()],
        ..ClusterSnapshot::default()
    };
    for i in 0..hosts {
        let kind = *weighted(&mut r, &[(0u32, 60), (1, 30), (2, 7), (3, 3)]);
        snap.hosts.push(host(i, kind));
    }
    let cap_vcpu: u64 = snap
        .hosts
        .iter()
        .filter(|h| h.role == HostRole::Worker)
        .map(|h| u64::from(h.vcpu_capacity()))
        .sum();
    snap.pools = vec![
        Pool {
            name: "critical".into(),
            tier: Tier::Critical,
            quota: None,
        },
        Pool {
            name: "prod".into(),
            tier: Tier::High,
            quota: None,
        },
        Pool {
            name: "dev".into(),
            tier: Tier::Standard,
            quota: Some(Quota {
                vcpus: cap_vcpu * 45 / 100,
                memory_mib: u64::MAX,
                gpus: u64::MAX,
            }),
        },
        Pool {
            name: "batch".into(),
            tier: Tier::BestEffort,
            quota: None,
        },
    ];
    let groups_each = (vms / 200).max(1);
    for (k, policy) in [
        (0, GroupPolicy::HardAntiAffinity),
        (1, GroupPolicy::SoftAntiAffinity),
        (2, GroupPolicy::Affinity),
    ] {
        let n = if policy == GroupPolicy::Affinity {
            (vms / 1000).max(1)
        } else {
            groups_each
        };
        for g in 0..n {
            snap.groups.push(PlacementGroup {
                name: format!("g{k}-{g}"),
                policy,
            });
        }
    }
    let hard = 0..groups_each;
    let soft = groups_each..2 * groups_each;
    let aff = 2 * groups_each..snap.groups.len() as u32;

    let total: u32 = SHAPES.iter().map(|s| s.1).sum();
    let mean_vcpu = SHAPES.iter().map(|s| f64::from(s.0 .0 * s.1)).sum::<f64>() / f64::from(total);
    let demand = mean_vcpu * f64::from(vms);
    let depart_p = (1.0 - 0.97 * cap_vcpu as f64 / demand.max(1.0)).clamp(0.05, 0.6);
    let has_gpu_hosts = snap.hosts.iter().any(|h| !h.gpus.is_empty());

    let mut trace: Vec<(u64, u8, usize, TraceKind)> = Vec::new();
    let end = u64::from(vms) * TICK;
    for i in 0..vms {
        let at = u64::from(i) * TICK;
        let id = VmId::from(i);
        let pool = *weighted(&mut r, &[(0u32, 5), (1, 25), (2, 50), (3, 20)]);
        let mut vm = if has_gpu_hosts && r.gen_bool(0.02) {
            let big = r.gen_bool(0.3);
            VmSpec {
                id,
                vcpus: if big { 16 } else { 8 },
                memory_mib: if big { 128 } else { 64 } * GIB,
                gpu: Some(GpuDemand {
                    model: 0,
                    count: if big { 2 } else { 1 },
                }),
                numa_strict: false,
                group: None,
                pool,
                selector: vec![],
            }
        } else {
            let (v, m) = *weighted(&mut r, SHAPES);
            VmSpec {
                id,
                vcpus: v,
                memory_mib: m * GIB,
                gpu: None,
                numa_strict: v <= 16 && r.gen_bool(0.10),
                group: None,
                pool,
                selector: vec![],
            }
        };
        let roll: f64 = r.gen();
        vm.group = if roll < 0.03 {
            Some(r.gen_range(hard.clone()))
        } else if roll < 0.06 {
            Some(r.gen_range(soft.clone()))
        } else if roll < 0.065 && !aff.is_empty() {
            Some(r.gen_range(aff.clone()))
        } else {
            None
        };
        if r.gen_bool(0.05) {
            let zone = ["a", "b", "c"][r.gen_range(0..3)];
            vm.selector = vec![("zone".into(), zone.into())];
        }
        let seq = trace.len();
        trace.push((at, 2, seq, TraceKind::Arrive(vm)));
        if r.gen_bool(depart_p) {
            let life = r.gen_range(1..=(end - at).max(1));
            trace.push((at + life, 0, seq, TraceKind::Depart(id)));
        }
    }
    let churn = (hosts / 500).max(1);
    for _ in 0..churn {
        let h: HostId = r.gen_range(0..hosts.max(1));
        let at = r.gen_range(0..end.max(1));
        let seq = trace.len();
        trace.push((at, 1, seq, TraceKind::Fail(h)));
        if r.gen_bool(0.7) {
            let back = at + r.gen_range(1..=end.max(2) / 4);
            trace.push((back, 1, seq + 1, TraceKind::Recover(h)));
        }
        let h: HostId = r.gen_range(0..hosts.max(1));
        let at = r.gen_range(0..end.max(1));
        trace.push((at, 1, seq + 2, TraceKind::Drain(h)));
        let back = at + r.gen_range(1..=end.max(2) / 4);
        trace.push((back, 1, seq + 3, TraceKind::Return(h)));
    }
    Scenario {
        snapshot: snap,
        trace: sort_trace(trace),
        seed: Some(seed),
    }
}
