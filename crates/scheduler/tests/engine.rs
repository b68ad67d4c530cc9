//! Engine behaviour on hand-built clusters.

mod common;
use common::*;
use ray_scheduler::*;

#[test]
fn best_fit_picks_tightest_host_then_lowest_id() {
    let snap = snapshot(vec![
        worker("big", 32, 65536),
        worker("tight", 8, 65536),
        worker("tight2", 8, 65536),
    ]);
    let mut s = session_pure(&snap);
    assert_eq!(placed_host(&s.place(&vm(1, 6, 1024)).expect("ok")), Some(1));
    // Host 1 now has 2 free: a 2-vCPU VM fits exactly there.
    assert_eq!(placed_host(&s.place(&vm(2, 2, 1024)).expect("ok")), Some(1));
    // Host 1 is full; host 2 (8 free) is tighter than host 0 (32 free).
    assert_eq!(placed_host(&s.place(&vm(3, 4, 1024)).expect("ok")), Some(2));
}

#[test]
fn default_engine_chooses_among_the_tightest_candidates() {
    // Five hosts of rising size; with 4 candidates the biggest is never
    // chosen for a small VM while smaller ones fit.
    let snap = snapshot(
        (0..5)
            .map(|i| worker(&format!("h{i}"), 4 + 4 * i, 65536))
            .collect(),
    );
    let mut s = session(&snap);
    let h = placed_host(&s.place(&vm(1, 2, 1024)).expect("ok")).expect("placed");
    assert!(h < 4, "picked host {h}");
}

#[test]
fn memory_dominant_vm_fits_on_memory() {
    let snap = snapshot(vec![
        worker("cpu-rich", 64, 16384),
        worker("mem-tight", 64, 9000),
    ]);
    let mut s = session_pure(&snap);
    assert_eq!(placed_host(&s.place(&vm(1, 1, 8192)).expect("ok")), Some(1));
}

#[test]
fn gpu_hosts_are_last_resort_for_plain_vms() {
    let mut g = worker("gpu", 8, 8192);
    g.gpus = vec![GpuSlots { model: 0, count: 1 }];
    let snap = snapshot(vec![g, worker("plain", 16, 16384)]);
    let mut s = session(&snap);
    assert_eq!(placed_host(&s.place(&vm(1, 4, 1024)).expect("ok")), Some(1));
    let mut gv = vm(2, 4, 1024);
    gv.gpu = Some(GpuDemand { model: 0, count: 1 });
    assert_eq!(placed_host(&s.place(&gv).expect("ok")), Some(0));
}

#[test]
fn hard_anti_affinity_spreads_and_then_pends() {
    let snap = snapshot(vec![worker("a", 8, 8192), worker("b", 8, 8192)]);
    let mut s = session(&snap);
    let mut hosts = vec![];
    for id in 0..3 {
        let mut v = vm(id, 1, 128);
        v.group = Some(0);
        hosts.push(placed_host(&s.place(&v).expect("ok")));
    }
    assert_eq!(hosts[2], None);
    assert_ne!(hosts[0], hosts[1]);
    let mut v = vm(9, 1, 128);
    v.group = Some(0);
    let e = s.explain(&v);
    assert_eq!(e.counts().get(&FilterKind::AntiAffinity), Some(&2));
}

#[test]
fn soft_anti_affinity_prefers_empty_host_but_allows_sharing() {
    let snap = snapshot(vec![worker("a", 8, 8192), worker("b", 8, 8192)]);
    let mut s = session(&snap);
    let mut got = vec![];
    for id in 0..3 {
        let mut v = vm(id, 1, 128);
        v.group = Some(1);
        got.push(placed_host(&s.place(&v).expect("ok")).expect("placed"));
    }
    assert_ne!(got[0], got[1]);
}

#[test]
fn affinity_follows_first_member() {
    let snap = snapshot(vec![worker("a", 8, 8192), worker("b", 4, 8192)]);
    let mut s = session(&snap);
    let mut v = vm(1, 1, 128);
    v.group = Some(2);
    let first = placed_host(&s.place(&v).expect("ok")).expect("placed");
    for id in 2..4 {
        let mut v = vm(id, 1, 128);
        v.group = Some(2);
        assert_eq!(placed_host(&s.place(&v).expect("ok")), Some(first));
    }
}

#[test]
fn numa_strict_vm_pinned_to_best_node() {
    let mut h = worker("n", 10, 8192);
    h.numa = vec![
        NumaNode {
            cpus: 4,
            memory_mib: 4096,
        },
        NumaNode {
            cpus: 4,
            memory_mib: 4096,
        },
    ];
    let mut s = session(&snapshot(vec![h]));
    let mut a = vm(1, 3, 1024);
    a.numa_strict = true;
    let mut b = vm(2, 1, 1024);
    b.numa_strict = true;
    let mut c = vm(3, 2, 1024);
    c.numa_strict = true;
    let numa = |d: Decision| match d {
        Decision::Placed { numa, .. } => numa,
        Decision::Pending(p) => panic!("pending: {p:?}"),
    };
    assert_eq!(numa(s.place(&a).expect("ok")), Some(0));
    assert_eq!(
        numa(s.place(&b).expect("ok")),
        Some(0),
        "best fit: node 0 has exactly 1 left"
    );
    assert_eq!(numa(s.place(&c).expect("ok")), Some(1));
    let mut d = vm(4, 3, 1024);
    d.numa_strict = true;
    assert_eq!(
        s.place(&d).expect("ok"),
        Decision::Pending(PendingReason::NoHost)
    );
    assert_eq!(s.explain(&d).hosts[0].reject.kind(), FilterKind::Numa);
}

#[test]
fn preemption_evicts_cheapest_lower_tier_set() {
    // Host 0: one best-effort 4-vCPU VM. Host 1: one standard 4-vCPU VM.
    // Host 2: two best-effort 2-vCPU VMs. A high-tier 4-vCPU VM should
    // evict the single best-effort VM on host 0 (lowest tier, fewest).
    let snap = snapshot(vec![
        worker("a", 4, 8192),
        worker("b", 4, 8192),
        worker("c", 4, 8192),
    ]);
    let mut s = session_pure(&snap);
    let place = |s: &mut Session, id, c, pool, want| {
        let mut v = vm(id, c, 1024);
        v.pool = pool;
        let d = s.place(&v).expect("ok");
        assert_eq!(placed_host(&d), want, "vm {id}");
        d
    };
    place(&mut s, 1, 2, 0, Some(0));
    place(&mut s, 2, 2, 0, Some(0));
    place(&mut s, 3, 4, 1, Some(1));
    place(&mut s, 4, 2, 0, Some(2));
    place(&mut s, 5, 2, 0, Some(2));
    // Make host 0 hold one 4-vCPU best-effort VM instead of two.
    s.release(1).expect("placed");
    s.release(2).expect("placed");
    place(&mut s, 6, 4, 0, Some(0));
    let d = place(&mut s, 7, 4, 2, Some(0));
    match d {
        Decision::Placed { evicted, .. } => {
            let ids: Vec<VmId> = evicted.iter().map(|e| e.vm.id).collect();
            assert_eq!(ids, vec![6]);
        }
        Decision::Pending(p) => panic!("{p:?}"),
    }
    // A standard VM may only evict the best-effort pair on host 2.
    let d = place(&mut s, 8, 4, 1, Some(2));
    assert!(matches!(d, Decision::Placed { ref evicted, .. } if evicted.len() == 2));
    // Now only standard and high VMs remain: same tier never preempts.
    let mut v = vm(9, 4, 1024);
    v.pool = 1;
    assert_eq!(
        s.place(&v).expect("ok"),
        Decision::Pending(PendingReason::NoHost)
    );
    assert_eq!(s.state().check_capacity(), Ok(()));
}

#[test]
fn plan_reads_snapshot_only_and_reports_pending_with_reasons() {
    let snap = snapshot(vec![worker("a", 4, 4096)]);
    let before = snap.clone();
    let vms = vec![vm(1, 4, 1024), vm(2, 1, 1024)];
    let p = plan(&snap, &vms, EngineConfig::default()).expect("ok");
    assert_eq!(snap, before);
    assert_eq!(p.placements.len(), 1);
    assert_eq!(p.pending.len(), 1);
    assert_eq!(p.pending[0].vm, 2);
    assert!(
        p.pending[0].summary.contains("0/1 hosts fit: 1 cpu"),
        "{}",
        p.pending[0].summary
    );
}

#[test]
fn plan_orders_by_tier_and_records_evictions() {
    let snap = snapshot(vec![worker("a", 4, 4096)]);
    let mut low = vm(1, 4, 1024);
    low.pool = 0;
    let mut high = vm(2, 4, 1024);
    high.pool = 3;
    let p = plan(&snap, &[low, high], EngineConfig::default()).expect("ok");
    assert_eq!(
        p.placements.iter().map(|x| x.vm).collect::<Vec<_>>(),
        vec![2]
    );
    assert!(
        p.evictions.is_empty(),
        "high tier went first, low stays pending"
    );
    assert_eq!(p.pending[0].vm, 1);
}

#[test]
fn host_failure_returns_vms_and_blocks_placement() {
    let snap = snapshot(vec![worker("a", 4, 4096), worker("b", 4, 4096)]);
    let mut s = session(&snap);
    let h = placed_host(&s.place(&vm(1, 4, 1024)).expect("ok")).expect("placed");
    let lost = s.host_event(h, HostEvent::Fault).expect("valid");
    assert_eq!(lost.iter().map(|p| p.vm.id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(s.host_status(h), Some(HostStatus::Failed));
    let err = s
        .host_event(h, HostEvent::Drain)
        .expect_err("Failed cannot drain");
    assert!(err.to_string().contains("Failed"), "{err}");
    let again = placed_host(&s.place(&vm(1, 4, 1024)).expect("ok"));
    assert_eq!(again, Some(1 - h));
}

#[test]
fn errors_name_the_value() {
    let snap = snapshot(vec![worker("a", 4, 4096)]);
    let mut s = session(&snap);
    let mut v = vm(1, 1, 1);
    v.pool = 9;
    assert_eq!(
        s.place(&v).expect_err("bad pool").to_string(),
        "vm 1: pool id 9 does not exist"
    );
    s.place(&vm(2, 1, 1)).expect("ok");
    assert_eq!(
        s.place(&vm(2, 1, 1)).expect_err("dup").to_string(),
        "vm 2 is already placed"
    );
    assert_eq!(
        s.release(5).expect_err("unknown").to_string(),
        "vm 5 is not placed"
    );
    let mut bad = snapshot(vec![worker("x", 4, 4096)]);
    bad.hosts[0].cpu_overcommit = 40.0;
    let e = Session::new(&bad, EngineConfig::default()).expect_err("bad ratio");
    assert!(e.to_string().contains("host x: cpu_overcommit 40"), "{e}");
}

#[test]
fn drain_plan_empties_host_and_balance_reduces_imbalance() {
    let snap = snapshot(
        (0..4)
            .map(|i| worker(&format!("h{i}"), 16, 16384))
            .collect(),
    );
    let mut s = Session::new(
        &snap,
        EngineConfig {
            strategy: Strategy::FirstFit,
            ..EngineConfig::default()
        },
    )
    .expect("ok");
    for id in 0..8 {
        s.place(&vm(id, 4, 2048)).expect("ok");
    }
    // First fit packed hosts 0 and 1.
    let p = s.rebalance_plan(&RebalanceOptions {
        threshold: 5,
        max_moves: 100,
    });
    assert!(p.imbalance_after < p.imbalance_before, "{p:?}");
    assert!(p
        .moves
        .iter()
        .all(|m| m.gain > 0.0 && m.reason == MoveReason::Balance));
    let none = s.rebalance_plan(&RebalanceOptions {
        threshold: 1,
        max_moves: 100,
    });
    assert!(none.moves.is_empty());
    s.host_event(0, HostEvent::Drain).expect("valid");
    let d = s.rebalance_plan(&RebalanceOptions {
        threshold: 1,
        max_moves: 100,
    });
    assert_eq!(d.moves.len(), 4);
    assert!(d
        .moves
        .iter()
        .all(|m| m.from == 0 && m.reason == MoveReason::Drain));
    for m in &d.moves {
        s.migrate(m.vm, m.to).expect("valid");
    }
    assert!(s.state().host(0).vms.is_empty());
    s.host_event(0, HostEvent::DrainComplete).expect("valid");
    let bounded = s.rebalance_plan(&RebalanceOptions {
        threshold: 5,
        max_moves: 1,
    });
    assert!(bounded.moves.len() <= 1);
}

#[test]
fn snapshot_placements_are_checked() {
    let mut snap = snapshot(vec![worker("a", 4, 4096)]);
    snap.placements = vec![
        PlacedVm {
            vm: vm(1, 3, 1024),
            host: 0,
            numa: None,
        },
        PlacedVm {
            vm: vm(2, 3, 1024),
            host: 0,
            numa: None,
        },
    ];
    let e = Session::new(&snap, EngineConfig::default()).expect_err("over capacity");
    assert!(
        e.to_string()
            .contains("vm 2 in the snapshot does not fit host 0"),
        "{e}"
    );
    snap.placements.pop();
    snap.hosts[0].status = HostStatus::Failed;
    let e = Session::new(&snap, EngineConfig::default()).expect_err("failed host");
    assert!(e.to_string().contains("runs no VMs"), "{e}");
    snap.hosts[0].status = HostStatus::Degraded;
    let s = Session::new(&snap, EngineConfig::default()).expect("degraded keeps VMs");
    assert_eq!(s.state().host(0).used_vcpu, 3);
}
