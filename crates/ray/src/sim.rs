//! `ray sim`: the placement engine against a trace, beside three baselines.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use ray_scheduler::{run_sim, SimOptions};

#[derive(Args)]
pub struct SimArgs {
    /// Hosts of a generated scenario.
    #[arg(long, default_value_t = 1000)]
    pub hosts: u32,
    /// VM arrivals of a generated scenario.
    #[arg(long, default_value_t = 10_000)]
    pub vms: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A YAML scenario (hosts, arrivals/departures, failures, drains) instead of a generated one.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// Rebalancing aggressiveness, 1 (only large gains) to 5.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub rebalance_threshold: u8,
    /// Rebalance after every N arrivals (0: only when draining; default: a tenth of them).
    #[arg(long)]
    pub rebalance_every: Option<u64>,
    /// Skip the first-fit, spread and random baselines.
    #[arg(long)]
    pub no_baselines: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: SimArgs) -> anyhow::Result<()> {
    let scenario = a
        .scenario
        .as_ref()
        .map(|p| {
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the scenario {}", p.display()))
        })
        .transpose()?;
    let opts = SimOptions {
        hosts: a.hosts,
        vms: a.vms,
        seed: a.seed,
        scenario,
        rebalance_threshold: a.rebalance_threshold,
        rebalance_every: a.rebalance_every,
        baselines: !a.no_baselines,
        ..SimOptions::default()
    };
    let origin = Instant::now();
    let clock = move || origin.elapsed().as_nanos() as u64;
    let report = run_sim(&opts, &clock)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.render_table());
    }
    Ok(())
}
