//! `ray numa ...`: the host's NUMA nodes and what each VM on this host does with them
//! (its guest nodes' binding and locality, the access attribution, the page migration
//! policy and its decision log). Everything per VM comes from its VMM's `GET /vm`.
use std::path::Path;

use clap::{Args, Subcommand};
use ray::output::{print_structured, table, OutputArgs};
use ray::runtime::{self, Presence};
use ray_api::agent::{
    NumaDamon, NumaHostNode, NumaHostStatus as HostStatus, NumaHostVm as VmRow, NumaHugePages,
};
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
    /// Change a running VM's migration policy (PUT /vm/numa/policy); `--migrate off` is
    /// the per-VM off switch. Options left out keep their value.
    Policy(PolicyArgs),
}

#[derive(Args)]
pub struct PolicyArgs {
    /// The VM's id.
    pub id: String,
    /// off, dry-run or on.
    #[arg(long, value_parser = parse_mode)]
    pub migrate: Option<NumaMigrationMode>,
    /// Length of one window (e.g. 5s, 500ms; at least 100 ms).
    #[arg(long, value_parser = parse_window)]
    pub window: Option<u64>,
    /// Most MiB moved per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// ring or off: only the VM's own is accepted (the rings live from boot to end).
    #[arg(long, value_parser = parse_attribution)]
    pub attribution: Option<ray_api::vmm::NumaAttribution>,
    #[command(flatten)]
    pub out: OutputArgs,
}

fn parse_mode(text: &str) -> Result<NumaMigrationMode, String> {
    match text {
        "off" => Ok(NumaMigrationMode::Off),
        "dry-run" => Ok(NumaMigrationMode::DryRun),
        "on" => Ok(NumaMigrationMode::On),
        other => Err(format!("'{other}' is not off, dry-run or on")),
    }
}

fn parse_window(text: &str) -> Result<u64, String> {
    ray::sizes::parse_duration(text).map(|d| d.as_millis() as u64)
}

fn parse_attribution(text: &str) -> Result<ray_api::vmm::NumaAttribution, String> {
    match text {
        "ring" => Ok(ray_api::vmm::NumaAttribution::Ring),
        "off" => Ok(ray_api::vmm::NumaAttribution::Off),
        other => Err(format!("'{other}' is not ring or off")),
    }
}

#[derive(Args)]
pub struct ExplainArgs {
    /// The VM's id.
    pub id: String,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// Every live VM's `GET /vm`.
pub fn live_vms(runtime: &Path) -> Vec<VmInfo> {
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

pub fn row(info: &VmInfo) -> VmRow {
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

/// This host's online NUMA nodes (`ray numa nodes`, the agent's `GET /numa/nodes`).
pub fn host_nodes() -> anyhow::Result<Vec<NumaHostNode>> {
    let t = ray_numa::Topology::host()?;
    Ok(t.nodes
        .into_iter()
        .map(|n| NumaHostNode {
            id: n.id,
            cpus: n.cpus,
            memory_total: n.memory_total,
            memory_free: n.memory_free,
            distances: n.distances,
            huge_pages: n
                .huge_pages
                .into_iter()
                .map(|h| NumaHugePages {
                    page_bytes: h.page_bytes,
                    total: h.total,
                    free: h.free,
                    surplus: h.surplus,
                })
                .collect(),
        })
        .collect())
}

/// This host's NUMA summary over its live VMs (`ray numa status`, `GET /numa/status`).
pub fn host_status(runtime: &Path) -> anyhow::Result<HostStatus> {
    let t = ray_numa::Topology::host()?;
    let rows: Vec<VmRow> = live_vms(runtime).iter().map(row).collect();
    Ok(HostStatus {
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
        damon: {
            let d = ray_numa::damon::DamonStatus::host();
            NumaDamon {
                present: d.present,
                operations: d.operations.clone(),
                kdamonds: d.kdamonds.len(),
                kdamonds_on: d.kdamonds.iter().filter(|k| k.on).count(),
                unavailable: d.unavailable(),
            }
        },
    })
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
            let nodes = host_nodes()?;
            if print_structured(&nodes, out.format())? {
                return Ok(());
            }
            let cells: Vec<Vec<String>> = nodes
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
            let s = host_status(runtime)?;
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
            let d = &s.damon;
            println!(
                "DAMON: {}",
                if d.present {
                    format!(
                        "present, operations {}, {} kdamonds ({} on){}",
                        or_dash(d.operations.join(",")),
                        d.kdamonds,
                        d.kdamonds_on,
                        d.unavailable
                            .as_ref()
                            .map_or_else(String::new, |w| format!(": {w}"))
                    )
                } else {
                    d.unavailable.clone().unwrap_or_default()
                }
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
        NumaCommand::Policy(p) => {
            let req = ray_api::vmm::NumaPolicyRequest {
                mode: p.migrate,
                window_ms: p.window,
                rate_limit_mib_s: p.rate,
                attribution: p.attribution,
            };
            if req == ray_api::vmm::NumaPolicyRequest::default() {
                anyhow::bail!(
                    "nothing to change: give --migrate, --window, --rate or --attribution"
                );
            }
            let info: VmInfo = crate::vm::client(runtime, &p.id)?.call(
                "PUT",
                "/vm/numa/policy",
                Some(serde_json::to_vec(&req)?),
            )?;
            let report = info.numa_migration.as_ref();
            if print_structured(&report, p.out.format())? {
                return Ok(());
            }
            match report {
                Some(m) => {
                    println!(
                        "VM {}: migration policy {}, window {} ms, rate limit {} MiB/s",
                        info.id,
                        match m.config.mode {
                            NumaMigrationMode::Off => "off",
                            NumaMigrationMode::DryRun => "dry-run",
                            NumaMigrationMode::On => "on",
                        },
                        m.config.window_ms,
                        m.config.rate_limit_mib_s
                    );
                    if let Some(l) = m.log.last() {
                        println!("{l}");
                    }
                }
                None => println!("VM {}: migration policy off", info.id),
            }
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
