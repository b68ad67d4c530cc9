//! `ray cluster ...`: the cluster as its store holds it (read-only so far; creating,
//! deleting and moving VMs comes with the controller).
use anyhow::Context;
use clap::{Args, Subcommand};
use ray::output::{print_structured, table, OutputArgs};
use ray_cluster::store::EtcdStore;

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// List the hosts: lease, state, inventory, VMs.
    Nodes(StoreArgs),
    /// List the cluster's VMs: the host their run token names, epoch, size.
    Vms(StoreArgs),
}

#[derive(Args)]
pub struct StoreArgs {
    /// etcd endpoints, comma-separated, e.g. http://10.0.0.1:2379.
    #[arg(long, value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
    #[command(flatten)]
    pub out: OutputArgs,
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

pub fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    match cmd {
        ClusterCommand::Nodes(a) => {
            let store = rt.block_on(EtcdStore::connect(&a.etcd))?;
            let (rows, _) = rt.block_on(ray_cluster::view::nodes(&store))?;
            if print_structured(&rows, a.out.format())? {
                return Ok(());
            }
            let cells: Vec<Vec<String>> = rows
                .into_iter()
                .map(|r| {
                    vec![
                        r.host,
                        r.state,
                        opt(r.cpus),
                        opt(r.memory_mib.map(|m| format!("{m} MiB"))),
                        r.vms.len().to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["HOST", "STATE", "CPUS", "MEMORY", "VMS"], &cells)
            );
        }
        ClusterCommand::Vms(a) => {
            let store = rt.block_on(EtcdStore::connect(&a.etcd))?;
            let (rows, _) = rt.block_on(ray_cluster::view::vms(&store))?;
            if print_structured(&rows, a.out.format())? {
                return Ok(());
            }
            let cells: Vec<Vec<String>> = rows
                .into_iter()
                .map(|r| {
                    vec![
                        r.vm,
                        opt(r.host),
                        opt(r.epoch),
                        opt(r.vcpus),
                        opt(r.memory_mib.map(|m| format!("{m} MiB"))),
                        r.problem.unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["VM", "HOST", "EPOCH", "VCPUS", "MEMORY", "PROBLEM"],
                    &cells
                )
            );
        }
    }
    Ok(())
}
