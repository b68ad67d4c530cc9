//! Scenario parsing and simulator runs.

mod common;
use common::fake_clock;
use ray_scheduler::*;

const EXAMPLE: &str = include_str!("../examples/scenario.yaml");

#[test]
fn example_scenario_parses() {
    let s = Scenario::from_yaml(EXAMPLE).expect("example parses");
    assert_eq!(s.snapshot.hosts.len(), 9);
    assert_eq!(s.snapshot.hosts[1].name, "w-0");
    assert_eq!(s.snapshot.gpu_models, vec!["a100".to_string()]);
    assert_eq!(s.arrivals(), 3 + 6 + 2 + 1 + 20 + 1 + 40);
    assert!(s.trace.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(s.seed, Some(42));
}

#[test]
fn example_scenario_runs_clean() {
    let opts = SimOptions {
        scenario: Some(EXAMPLE.to_string()),
        rebalance_every: Some(10),
        ..SimOptions::default()
    };
    let r = run_sim(&opts, &fake_clock()).expect("runs");
    for x in [
        &r.engine,
        &r.baselines.first_fit,
        &r.baselines.spread,
        &r.baselines.random,
    ] {
        assert_eq!(x.anti_affinity_violations, 0);
        assert!(x.capacity_ok);
        assert!(x.placements > 0);
    }
    // Host w-1 failed with VMs on it, w-2 was drained.
    assert!(r.engine.failovers > 0 || r.engine.migrations > 0);
    assert!(r.render_table().contains("first_fit"));
}

#[test]
fn scenario_errors_name_the_field() {
    let cases = [
        ("hosts: []", "hosts: 0 is out of range"),
        ("hosts: [{name: a, cpus: 0, memory_mib: 1}]", "hosts[0].cpus: 0 is out of range"),
        ("hosts: [{name: a, cpus: 1, memory_mib: 1, cpu_overcommit: 99}]", "hosts[0].cpu_overcommit: 99"),
        ("hosts: [{name: a, cpus: 1, memory_mib: 1}]\nvms: [{name: v, vcpus: 1, memory_mib: 1, pool: gold}]", "vms[0].pool: unknown pool `gold`"),
        ("hosts: [{name: a, cpus: 1, memory_mib: 1}]\nvms: [{name: v, vcpus: 1, memory_mib: 1, group: g}]", "vms[0].group: unknown group `g`"),
        ("hosts: [{name: a, cpus: 1, memory_mib: 1}]\nvms: [{name: v, vcpus: 1, memory_mib: 1, arrive: 5, depart: 5}]", "vms[0].depart: 5"),
        ("hosts: [{name: a, cpus: 1, memory_mib: 1}, {name: a, cpus: 1, memory_mib: 1}]", "duplicate host name `a`"),
        ("hosts: [{name: a, cpus: 1, memory_mib: 1}]\nevents: [{at: 1, host: b, event: fail}]", "events[0].host: unknown host `b`"),
        ("hosts: [{name: a, cpu: 1, memory_mib: 1}]", "unknown field `cpu`"),
        ("hosts: [{name: a, cpus: 1, memory_mib: 1, role: boss}]", "unknown variant `boss`"),
    ];
    for (yaml, want) in cases {
        let err = Scenario::from_yaml(yaml).expect_err(yaml).to_string();
        assert!(err.contains(want), "{yaml}\n  got: {err}\n  want: {want}");
    }
}

fn strip_timing(mut r: StrategyReport) -> StrategyReport {
    r.placements_per_s = 0.0;
    r.p50_us = 0.0;
    r.p99_us = 0.0;
    r.engine_ms = 0.0;
    r
}

#[test]
fn same_seed_same_result() {
    let opts = SimOptions {
        hosts: 60,
        vms: 800,
        seed: 9,
        rebalance_every: Some(100),
        ..SimOptions::default()
    };
    let a = run_sim(&opts, &fake_clock()).expect("runs");
    let b = run_sim(&opts, &fake_clock()).expect("runs");
    assert_eq!(a, b, "fake clock makes even timings equal");
    let c = run_sim(&opts, &|| 0).expect("runs");
    assert_eq!(
        strip_timing(a.engine.clone()),
        strip_timing(c.engine.clone())
    );
    assert_eq!(
        strip_timing(a.baselines.random.clone()),
        strip_timing(c.baselines.random)
    );
    assert_eq!(a.engine.anti_affinity_violations, 0);
    assert!(a.engine.capacity_ok && a.baselines.first_fit.capacity_ok);
    let other = run_sim(&SimOptions { seed: 10, ..opts }, &fake_clock()).expect("runs");
    assert_ne!(strip_timing(a.engine), strip_timing(other.engine));
}

#[test]
fn json_has_the_required_keys() {
    let opts = SimOptions {
        hosts: 20,
        vms: 200,
        ..SimOptions::default()
    };
    let r = run_sim(&opts, &fake_clock()).expect("runs");
    let v = serde_json::to_value(&r).expect("serializes");
    let keys = [
        "placements_per_s",
        "p50_us",
        "p99_us",
        "pending",
        "stranded",
        "anti_affinity_violations",
    ];
    for k in keys {
        assert!(v.get(k).is_some(), "top level lacks {k}");
        for b in ["first_fit", "spread", "random"] {
            assert!(v["baselines"][b].get(k).is_some(), "{b} lacks {k}");
        }
    }
    assert!(v["ratios"]["stranded_vs_first_fit"].is_number());
}

#[test]
fn bad_options_are_refused() {
    let e = run_sim(
        &SimOptions {
            rebalance_threshold: 9,
            ..SimOptions::default()
        },
        &|| 0,
    )
    .expect_err("bad");
    assert_eq!(
        e.to_string(),
        "option rebalance_threshold: 9 is out of range (1 to 5)"
    );
}

/// The benchmark's quality target at test size: the engine strands no more
/// capacity than first fit on the same trace.
#[test]
fn engine_strands_no_more_than_first_fit() {
    for seed in [1, 2] {
        let opts = SimOptions {
            hosts: 200,
            vms: 2000,
            seed,
            ..SimOptions::default()
        };
        let r = run_sim(&opts, &fake_clock()).expect("runs");
        assert!(
            r.ratios.stranded_vs_first_fit <= 1.0,
            "seed {seed}: {}",
            r.render_table()
        );
    }
}
