//! `ray sim` through the real binary: the machine-readable report and determinism.
use ray_e2e::Env;

#[test]
fn sim_json_has_the_documented_keys_and_is_deterministic() {
    let env = Env::new("sim");
    let run = || -> serde_json::Value {
        let out = env.ray_ok(&[
            "sim", "--hosts", "60", "--vms", "600", "--seed", "7", "--json",
        ]);
        serde_json::from_str(&out).unwrap()
    };
    let (a, b) = (run(), run());
    for key in [
        "placements_per_s",
        "p50_us",
        "p99_us",
        "pending",
        "stranded",
        "anti_affinity_violations",
    ] {
        assert!(a.get(key).is_some(), "{key} missing: {a}");
        for base in ["first_fit", "spread", "random"] {
            assert!(
                a["baselines"][base].get(key).is_some(),
                "baselines.{base}.{key} missing: {a}"
            );
        }
    }
    assert_eq!(a["anti_affinity_violations"], 0);
    // Timings differ between runs; decisions must not.
    for key in [
        "pending",
        "stranded",
        "placements",
        "migrations",
        "evictions",
    ] {
        assert_eq!(
            a[key], b[key],
            "{key} differs between two runs with the same seed"
        );
    }
    let bad = env.ray(&["sim", "--rebalance-threshold", "9"]);
    assert_eq!(bad.status.code(), Some(2));
}
