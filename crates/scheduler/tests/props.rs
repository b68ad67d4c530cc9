//! Property tests over random small clusters and VM sequences.

mod common;
use common::*;
use proptest::prelude::*;
use ray_scheduler::filter;
use ray_scheduler::rebalance::validate_moves;
use ray_scheduler::{
    plan, ClusterSnapshot, Decision, EngineConfig, GpuDemand, GpuSlots, Host, HostEvent, HostId,
    HostStatus, MoveReason, NumaNode, PendingReason, RebalanceOptions, Session, Strategy as Pick,
    VmId, VmSpec,
};

fn arb_host() -> impl Strategy<Value = Host> {
    (
        1u32..=16,
        1u64..=16,
        0u32..=3,
        prop::bool::ANY,
        0usize..3,
        0usize..4,
    )
        .prop_map(|(cpus, gib, gpus, numa, zone, status)| {
            let mut h = worker("h", cpus, gib * 1024);
            h.cpu_overcommit = if cpus % 2 == 0 { 2.0 } else { 1.0 };
            if gpus > 0 {
                h.gpus = vec![GpuSlots {
                    model: 0,
                    count: gpus,
                }];
            }
            if numa && cpus >= 2 {
                h.numa = vec![
                    NumaNode {
                        cpus: cpus / 2,
                        memory_mib: gib * 512
                    };
                    2
                ];
            }
            h.labels.insert("zone".into(), ["a", "b", "c"][zone].into());
            h.status = [
                HostStatus::Ready,
                HostStatus::Ready,
                HostStatus::Ready,
                HostStatus::Degraded,
            ][status];
            h
        })
}

fn arb_vm() -> impl Strategy<Value = VmSpec> {
    (
        1u32..=8,
        1u64..=8,
        0u32..=2,
        prop::bool::ANY,
        0u32..6,
        0u32..4,
        0usize..8,
    )
        .prop_map(|(c, gib, gpu, strict, group, pool, sel)| {
            let mut v = vm(0, c, gib * 512);
            if gpu > 0 {
                v.gpu = Some(GpuDemand {
                    model: 0,
                    count: gpu,
                });
            }
            v.numa_strict = strict;
            v.group = (group < 3).then_some(group);
            v.pool = pool;
            if sel == 0 {
                v.selector = vec![("zone".into(), "a".into())];
            }
            v
        })
}

/// An operation on a session: place a VM or release the n-th placed one.
#[derive(Clone, Debug)]
enum Op {
    Place(VmSpec),
    Release(usize),
}

fn arb_ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![4 => arb_vm().prop_map(Op::Place), 1 => (0usize..64).prop_map(Op::Release)],
        1..60,
    )
}

fn cluster() -> impl Strategy<Value = ClusterSnapshot> {
    prop::collection::vec(arb_host(), 1..10).prop_map(|mut hosts| {
        for (i, h) in hosts.iter_mut().enumerate() {
            h.name = format!("h{i}");
        }
        snapshot(hosts)
    })
}

fn cfgs() -> Vec<EngineConfig> {
    [Pick::BestFit, Pick::FirstFit, Pick::Spread, Pick::Random]
        .into_iter()
        .map(|strategy| EngineConfig {
            strategy,
            seed: 7,
            ..EngineConfig::default()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Capacity and hard anti-affinity hold after every step; a VM is left
    /// pending only when no host passes every filter (and preemption found
    /// nothing); evicted VMs were strictly lower tier.
    #[test]
    fn invariants_hold(snap in cluster(), ops in arb_ops()) {
        for cfg in cfgs() {
            let mut s = Session::new(&snap, cfg).expect("valid");
            let mut placed: Vec<VmId> = vec![];
            for (i, op) in ops.iter().enumerate() {
                match op {
                    Op::Place(v) => {
                        let mut v = v.clone();
                        v.id = i as VmId;
                        let fits_before = s.explain(&v).fits;
                        match s.place(&v).expect("valid vm") {
                            Decision::Placed { host, evicted, .. } => {
                                let tier = snap.pools[v.pool as usize].tier;
                                for e in &evicted {
                                    prop_assert!(snap.pools[e.vm.pool as usize].tier < tier);
                                    placed.retain(|p| *p != e.vm.id);
                                }
                                if evicted.is_empty() {
                                    prop_assert!(fits_before.contains(&host), "placed on a host that failed a filter");
                                }
                                placed.push(v.id);
                            }
                            Decision::Pending(PendingReason::NoHost) => {
                                prop_assert!(fits_before.is_empty(), "pending although hosts {:?} fit", fits_before);
                            }
                            Decision::Pending(PendingReason::Quota(_)) => {}
                        }
                    }
                    Op::Release(n) => {
                        if !placed.is_empty() {
                            let id = placed.remove(n % placed.len());
                            s.release(id).expect("placed");
                        }
                    }
                }
                prop_assert_eq!(s.state().check_capacity(), Ok(()));
                prop_assert_eq!(s.state().anti_affinity_violations(), 0);
                if let Op::Place(v) = op {
                    for h in 0..snap.hosts.len() as HostId {
                        prop_assert_eq!(
                            filter::passes(s.state(), h, v),
                            filter::first_rejection(s.state(), h, v).is_none()
                        );
                    }
                }
            }
        }
    }

    /// Same snapshot and VMs -> same plan, for every strategy.
    #[test]
    fn plan_is_deterministic(snap in cluster(), vms in prop::collection::vec(arb_vm(), 1..40)) {
        let vms: Vec<VmSpec> = vms.into_iter().enumerate().map(|(i, mut v)| { v.id = i as VmId; v }).collect();
        for cfg in cfgs() {
            let a = plan(&snap, &vms, cfg).expect("valid");
            let b = plan(&snap, &vms, cfg).expect("valid");
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.placements.len() + a.pending.len() + a.evictions.len() >= vms.len(), true);
        }
    }

    /// Every planned migration is valid when replayed step by step, drains
    /// come first, and the bound on moves holds.
    #[test]
    fn rebalance_steps_valid(snap in cluster(), vms in prop::collection::vec(arb_vm(), 1..50), threshold in 1u8..=5, max_moves in 0usize..20, drain in 0usize..10) {
        let mut s = Session::new(&snap, EngineConfig::default()).expect("valid");
        for (i, v) in vms.iter().enumerate() {
            let mut v = v.clone();
            v.id = i as VmId;
            s.place(&v).expect("valid");
        }
        let h = (drain % snap.hosts.len()) as HostId;
        let _ = s.host_event(h, HostEvent::Drain);
        let p = s.rebalance_plan(&RebalanceOptions { threshold, max_moves });
        prop_assert!(p.moves.len() <= max_moves);
        prop_assert_eq!(validate_moves(s.state(), &p.moves), Ok(()));
        let first_balance = p.moves.iter().position(|m| m.reason == MoveReason::Balance).unwrap_or(p.moves.len());
        prop_assert!(p.moves[first_balance..].iter().all(|m| m.reason == MoveReason::Balance));
        if threshold == 1 {
            prop_assert_eq!(first_balance, p.moves.len());
        }
        for m in &p.moves[first_balance..] {
            prop_assert!(m.gain > 0.0);
        }
        // Applying through the session works too.
        for m in &p.moves {
            s.migrate(m.vm, m.to).expect("valid move");
        }
        prop_assert_eq!(s.state().check_capacity(), Ok(()));
    }
}
