//! Runs the simulator the way `ray sim` does.
//!
//! `cargo run --release -p ray-scheduler --example sim -- [hosts] [vms] [seed] [--json] [--no-baselines] [scenario.yaml]`

use ray_scheduler::{run_sim, SimOptions};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let no_baselines = args.iter().any(|a| a == "--no-baselines");
    let mut nums = args.iter().filter_map(|a| a.parse::<u64>().ok());
    let file = args
        .iter()
        .find(|a| a.ends_with(".yaml") || a.ends_with(".yml"));
    let mut opts = SimOptions::default();
    if let Some(h) = nums.next() {
        opts.hosts = u32::try_from(h).unwrap_or(u32::MAX);
    }
    if let Some(v) = nums.next() {
        opts.vms = u32::try_from(v).unwrap_or(u32::MAX);
    }
    if let Some(s) = nums.next() {
        opts.seed = s;
    }
    opts.baselines = !no_baselines;
    // Tuning knob: RAY_SIM_WEIGHTS="fit,balance,strand,candidates".
    if let Ok(w) = std::env::var("RAY_SIM_WEIGHTS") {
        let v: Vec<f64> = w.split(',').filter_map(|x| x.parse().ok()).collect();
        if let [fit, balance, strand, k] = v[..] {
            opts.weights.fit = fit;
            opts.weights.balance = balance;
            opts.weights.strand = strand;
            opts.candidates = k as usize;
        }
    }
    if let Some(f) = file {
        match std::fs::read_to_string(f) {
            Ok(t) => opts.scenario = Some(t),
            Err(e) => {
                eprintln!("{f}: {e}");
                std::process::exit(2);
            }
        }
    }
    let start = Instant::now();
    let clock = move || start.elapsed().as_nanos() as u64;
    match run_sim(&opts, &clock) {
        Ok(r) if json => println!("{}", serde_json::to_string(&r).unwrap_or_default()),
        Ok(r) => {
            print!("{}", r.render_table());
            if let Some(p) = &r.engine.pending_example {
                println!("example pending: {p}");
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
    eprintln!("wall {:.2}s", start.elapsed().as_secs_f64());
}
