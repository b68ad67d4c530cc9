//! `ray bench cluster`: the cluster control plane's load on a real etcd.
//!
//! Measured so far: etcd requests per second per 100 hosts at steady state, from `hosts`
//! simulated agents (the real agent core, `ray_cluster::agent`, each with its own lease,
//! registration, status and watch, on a VM-less host) against a real etcd started here on
//! 127.0.0.1. Every request the agents send is counted; each sample is one renewal period
//! after all have registered. Create latency, drain time, failover time and placements/s
//! need the controller and are not measured yet (null in the JSON).
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ray_cluster::agent::{Agent, AgentConfig, LocalVm, Vmms};
use ray_cluster::runtoken::Assignment;
use ray_cluster::store::EtcdStore;
use ray_cluster::testing::Etcd;
use ray_cluster::timing::Timing;
use serde::Serialize;

use crate::bench::{print_row, Stats};

#[derive(Args)]
pub struct ClusterBenchArgs {
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    pub hosts: usize,
    /// Samples, each one renewal period (15 s) long.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long)]
    pub json: bool,
}

/// A host with no VMs: the agent's core runs as on a real host, with nothing to start.
struct NoVmms;

impl Vmms for NoVmms {
    fn scan(&self) -> Vec<LocalVm> {
        Vec::new()
    }
    fn start(&self, vm: &str, _: &[u8], _: &Assignment) -> Result<(), String> {
        Err(format!(
            "a simulated host runs no VMs (asked to start {vm})"
        ))
    }
    fn stop(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
    fn pause(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
    fn resume(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Serialize)]
struct Report {
    hosts: usize,
    sample_s: f64,
    renew_every_s: f64,
    lease_ttl_s: f64,
    /// Requests to register every agent (lease, `alive`, status, listing, watch).
    registration_requests: u64,
    etcd_requests_per_s_per_100_hosts: Stats,
    /// What the design predicts (README: 8.3; no status changes here, so 6.7).
    predicted_per_s_per_100_hosts: f64,
    target_per_s_per_100_hosts: f64,
    create_ms: Option<Stats>,
    failover_ms: Option<Stats>,
    drain_ms: Option<Stats>,
    placements_per_s: Option<f64>,
}

pub fn run(args: &ClusterBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.hosts > 0 && args.runs > 0,
        "--hosts and --runs must be at least 1"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    rt.block_on(measure(args))
}

async fn measure(args: &ClusterBenchArgs) -> anyhow::Result<()> {
    let timing = Timing::default();
    let etcd = Etcd::start("bench-cluster").await;
    let store = EtcdStore::connect(&etcd.endpoints()).await?;
    let state = std::env::temp_dir().join(format!("ray-bench-cluster-{}", std::process::id()));
    let mut tasks = Vec::new();
    for i in 0..args.hosts {
        let cfg = AgentConfig {
            host: format!("sim-{i:05}"),
            state_dir: state.join(i.to_string()),
            timing,
            api: None,
        };
        let agent = Agent::join(store.clone(), NoVmms, cfg).await?;
        tasks.push(tokio::spawn(agent.run()));
    }
    // Each agent lists, reports and watches once it runs: let that settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let registration = store.requests();
    let mut samples = Vec::new();
    for _ in 0..args.runs {
        let (before, t) = (store.requests(), Instant::now());
        tokio::time::sleep(timing.renew_every).await;
        let per_s = (store.requests() - before) as f64 / t.elapsed().as_secs_f64();
        samples.push(per_s * 100.0 / args.hosts as f64);
    }
    let _ = std::fs::remove_dir_all(&state);
    for t in tasks {
        if t.is_finished() {
            match t.await {
                Ok(Err(e)) => anyhow::bail!("a simulated agent failed: {e}"),
                Ok(Ok(())) => anyhow::bail!("a simulated agent ended"),
                Err(e) => anyhow::bail!("a simulated agent failed: {e}"),
            }
        }
        t.abort();
    }
    let report = Report {
        hosts: args.hosts,
        sample_s: timing.renew_every.as_secs_f64(),
        renew_every_s: timing.renew_every.as_secs_f64(),
        lease_ttl_s: timing.lease_ttl.as_secs_f64(),
        registration_requests: registration,
        etcd_requests_per_s_per_100_hosts: Stats::of(&samples),
        predicted_per_s_per_100_hosts: 100.0 / timing.renew_every.as_secs_f64(),
        target_per_s_per_100_hosts: 10.0,
        create_ms: None,
        failover_ms: None,
        drain_ms: None,
        placements_per_s: None,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "cluster: {} simulated agents on a real etcd, {} samples of {:?}",
            args.hosts, args.runs, timing.renew_every
        );
        print_row(
            "etcd requests/s/100 hosts",
            report.etcd_requests_per_s_per_100_hosts,
            "(target < 10)",
        );
    }
    Ok(())
}
