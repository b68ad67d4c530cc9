//! `ray numa ...`: the host's NUMA nodes and what each VM on this host does with them
//! (its guest nodes' binding and locality, the access attribution, the page migration
//! policy and its decision log). Everything per VM comes from its VMM's `GET /vm`.
use std::path::Path;

use clap::{Args, Subcommand};
use ray::output::{print_structured, table, OutputArgs};
use ray::runtime::{self, Presence};
use ray_api::vmm::{NumaMigrationMode, VmInfo};
use serde::Serialize;

#[derive(Subcommand)]
pub enum NumaCommand {
    /// This host's NUMA summary: nodes, memory, VMs with guest nodes, attribution, moves.
    Status(OutputArgs),
    /// This host's NUMA nodes: CPUs, memory total and free, distances.
    Nodes(OutputArgs),
    /// Each running VM's guest nodes: binding, locality, attribution, policy, pending moves.
    Vms(OutputArgs),
    /// One VM in detail: its nodes, what the rings attributed, and the policy's decisions.
    Explain(ExplainArgs),
}

#[derive(Args)]
pub struct ExplainArgs {
    /// The VM's id.
    pub id: String,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// One VM's NUMA at a glance (`ray numa vms`).
#[derive(Serialize)]
struct VmRow {
    id: String,
    /// Guest node -> host nodes and policy, e.g. `0->0(bind)`.
    binding: Vec<String>,
    /// Local share of the present pages over all guest nodes; none when none present.
    locality: Option<f64>,
    attribution: bool,
    /// Pages written by each guest node's vCPUs since boot.
    node_writes: Vec<u64>,
    migration: String,
    moved_bytes: u64,
    pending_moves: u64,
}

#[derive(Serialize)]
struct HostStatus {
    nodes: usize,
    cpus: usize,
    memory_total: u64,
    memory_free: u64,
    vms: usize,
    vms_with_guest_nodes: usize,
    vms_with_attribution: usize,
    vms_with_migration: usize,
    moved_bytes: u64,
    pending_moves: u64,
}

/// Every live VM's `GET /vm`.
fn live_vms(runtime: &Path) -> Vec<VmInfo> {
    runtime::list_ids(runtime)
        .into_iter()
        .filter_map(|id| {
            let dir = runtime::vm_dir(runtime, &id);
            match runtime::presence(&dir) {
                Presence::Live { .. } => ray::client::VmmClient::new(&dir.join("api.sock"))
                    .call::<VmInfo>("GET", "/vm", None)
                    .ok(),
                _ => None,
            }
        })
        .collect()
}

fn row(info: &VmInfo) -> VmRow {
    let (present, local) = info
        .numa
        .iter()
        .fold((0, 0), |(p, l), n| (p + n.present_pages, l + n.local_pages));
    let migration = info.numa_migration.as_ref();
    VmRow {
        id: info.id.clone(),
        binding: info
            .numa
            .iter()
            .map(|n| {
                format!(
                    "{}->{}({})",
                    n.node,
                    ray_numa::format_list(&n.host_nodes),
                    n.policy.name()
                )
            })
            .collect(),
        locality: (present > 0).then(|| local as f64 / present as f64),
        attribution: info.attribution.is_some(),
        node_writes: info
            .attribution
            .as_ref()
            .map(|a| a.node_pages.clone())
            .unwrap_or_default(),
        migration: match migration.map(|m| m.config.mode) {
            None | Some(NumaMigrationMode::Off) => "off",
            Some(NumaMigrationMode::DryRun) => "dry-run",
            Some(NumaMigrationMode::On) => "on",
        }
        .into(),
        moved_bytes: migration.map_or(0, |m| m.moved_bytes),
        pending_moves: migration.map_or(0, |m| m.pending_moves),
    }
}

fn or_dash(v: String) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v
    }
}

pub fn run(cmd: NumaCommand, runtime: &Path) -> anyhow::Result<()> {
    match cmd {
        NumaCommand::Nodes(out) => {
            let t = ray_numa::Topology::host()?;
            if print_structured(&t.nodes, out.format())? {
                return Ok(());
            }
            let cells: Vec<Vec<String>> = t
                .nodes
                .iter()
                .map(|n| {
                    vec![
                        n.id.to_string(),
                        or_dash(ray_numa::format_list(&n.cpus)),
                        format!("{} MiB", n.memory_total >> 20),
                        format!("{} MiB", n.memory_free >> 20),
                        n.distances
                            .iter()
                            .map(|d| d.1.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["NODE", "CPUS", "MEMORY", "FREE", "DISTANCES"], &cells)
            );
        }
        NumaCommand::Status(out) => {
            let t = ray_numa::Topology::host()?;
            let rows: Vec<VmRow> = live_vms(runtime).iter().map(row).collect();
            let s = HostStatus {
                nodes: t.nodes.len(),
                cpus: t.nodes.iter().map(|n| n.cpus.len()).sum(),
                memory_total: t.nodes.iter().map(|n| n.memory_total).sum(),
                memory_free: t.nodes.iter().map(|n| n.memory_free).sum(),
                vms: rows.len(),
                vms_with_guest_nodes: rows.iter().filter(|r| !r.binding.is_empty()).count(),
                vms_with_attribution: rows.iter().filter(|r| r.attribution).count(),
                vms_with_migration: rows.iter().filter(|r| r.migration != "off").count(),
                moved_bytes: rows.iter().map(|r| r.moved_bytes).sum(),
                pending_moves: rows.iter().map(|r| r.pending_moves).sum(),
            };
            if print_structured(&s, out.format())? {
                return Ok(());
            }
            println!(
                "host: {} NUMA nodes, {} CPUs, {} MiB memory ({} MiB free)",
                s.nodes,
                s.cpus,
                s.memory_total >> 20,
                s.memory_free >> 20
            );
            println!(
                "VMs: {} running, {} with guest nodes, {} with access attribution, {} with the migration policy",
                s.vms, s.vms_with_guest_nodes, s.vms_with_attribution, s.vms_with_migration
            );
            println!(
                "moves: {:.1} MiB moved, {} pending",
                s.moved_bytes as f64 / (1u64 << 20) as f64,
                s.pending_moves
            );
        }
        NumaCommand::Vms(out) => {
            let rows: Vec<VmRow> = live_vms(runtime).iter().map(row).collect();
            if print_structured(&rows, out.format())? {
                return Ok(());
            }
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        or_dash(r.binding.join(" ")),
                        r.locality
                            .map_or_else(|| "-".into(), |l| format!("{:.0}%", l * 100.0)),
                        if r.attribution {
                            or_dash(
                                r.node_writes
                                    .iter()
                                    .map(u64::to_string)
                                    .collect::<Vec<_>>()
                                    .join(","),
                            )
                        } else {
                            "off".into()
                        },
                        r.migration.clone(),
                        format!("{:.1} MiB", r.moved_bytes as f64 / (1u64 << 20) as f64),
                        r.pending_moves.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "VM",
                        "BINDING",
                        "LOCALITY",
                        "NODE WRITES",
                        "POLICY",
                        "MOVED",
                        "PENDING"
                    ],
                    &cells
                )
            );
        }
        NumaCommand::Explain(a) => {
            let info: VmInfo = crate::vm::client(runtime, &a.id)?.call("GET", "/vm", None)?;
            #[derive(Serialize)]
            struct Explained<'a> {
                id: &'a str,
                numa: &'a [ray_api::vmm::NumaNodeStatus],
                attribution: Option<&'a ray_api::vmm::AttributionInfo>,
                numa_migration: Option<&'a ray_api::vmm::NumaMigrationReport>,
            }
            let e = Explained {
                id: &info.id,
                numa: &info.numa,
                attribution: info.attribution.as_ref(),
                numa_migration: info.numa_migration.as_ref(),
            };
            if print_structured(&e, a.out.format())? {
                return Ok(());
            }
            explain_text(&info);
        }
    }
    Ok(())
}

fn explain_text(info: &VmInfo) {
    println!("VM {}", info.id);
    if info.numa.is_empty() {
        println!("guest nodes: none (one node, unbound)");
    }
    for n in &info.numa {
        println!(
            "guest node {}: vCPUs {}, {} MiB on host nodes {} ({}), {} of {} sampled pages present, {}",
            n.node,
            or_dash(ray_numa::format_list(
                &n.cpus.iter().map(|&c| u32::from(c)).collect::<Vec<_>>()
            )),
            n.memory_bytes >> 20,
            or_dash(ray_numa::format_list(&n.host_nodes)),
            n.policy.name(),
            n.present_pages,
            n.sampled_pages,
            n.locality.map_or_else(
                || "locality unknown".into(),
                |l| format!("{:.0}% local", l * 100.0)
            )
        );
    }
    match &info.attribution {
        None => println!("attribution: off (ray vm run --numa-attribution ring)"),
        Some(a) => println!(
            "attribution (dirty rings, since boot): pages written by vCPU {:?}, by guest node {:?}; {} harvests took {:.1} ms",
            a.vcpu_pages, a.node_pages, a.harvests, a.harvest_ms
        ),
    }
    let Some(m) = &info.numa_migration else {
        println!("migration policy: off (ray vm run --numa-migrate dry-run|on)");
        return;
    };
    println!(
        "migration policy: {:?}, window {} ms, rate limit {} MiB/s; {} windows, {} bytes moved, {} pending",
        m.config.mode, m.config.window_ms, m.config.rate_limit_mib_s, m.windows, m.moved_bytes, m.pending_moves
    );
    println!("last window:");
    for l in &m.last_window {
        println!("  {l}");
    }
    println!("decision log:");
    for l in &m.log {
        println!("  {l}");
    }
}
