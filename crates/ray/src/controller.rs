//! `ray controller`: runs one controller (`ray_cluster::controller`). Against etcd, run
//! three, on three hosts, for a controller that survives the loss of one: they elect a
//! leader through the store and the others stand by. Without etcd it owns the single-host
//! store (a redb file) and serves it to the host's agent and to `ray cluster`.
use anyhow::Context;
use clap::Args;
use ray_cluster::controller::rebalance::RebalanceConfig;
use ray_cluster::controller::{Controller, ControllerConfig};

#[derive(Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub store: crate::store_sel::StoreSel,
    /// This controller's name in the leader key and the decision log (default: the
    /// host's name and this process's id).
    #[arg(long)]
    pub id: Option<String>,
    #[command(flatten)]
    pub timing: crate::agent::TimingArgs,
    /// Rebalancing: `recommend` logs the live migration that would even out host loads
    /// once they stayed uneven for 3 passes (`ray cluster events`); `auto` also asks for
    /// it (one at a time, at most --rebalance-max-moves-per-hour); `off` does not look.
    #[arg(long, default_value = "recommend", value_parser = ["recommend", "auto", "off"])]
    pub rebalance: String,
    /// With --rebalance auto: automatic moves per hour at most.
    #[arg(long, default_value_t = 6)]
    pub rebalance_max_moves_per_hour: usize,
    /// A full pass this often even when nothing changed (a pass also follows every
    /// change); rebalancing counts passes, so this paces it on a quiet cluster.
    #[arg(long, value_name = "TIME", default_value = "10s", value_parser = ray::sizes::parse_duration)]
    pub resync: std::time::Duration,
}

pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.resync >= std::time::Duration::from_millis(100),
        "--resync {:?} is too short: at least 100ms",
        args.resync
    );
    let id = match args.id {
        Some(id) => id,
        None => format!("{}-{}", crate::agent::hostname()?, std::process::id()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the controller's runtime")?;
    rt.block_on(async {
        let mut cfg = ControllerConfig::new(id);
        cfg.timing = args.timing.timing()?;
        cfg.resync = args.resync;
        cfg.rebalance = match args.rebalance.as_str() {
            "off" => None,
            mode => cfg.rebalance.map(|r| RebalanceConfig {
                auto: mode == "auto",
                max_moves_per_hour: args.rebalance_max_moves_per_hour,
                ..r
            }),
        };
        let store = args.store.own().await?;
        Controller::new(store, cfg).run().await?;
        Ok(())
    })
}
