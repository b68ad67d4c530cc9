//! `ray cluster ...` and `ray node ...`: the cluster as its store holds it, and the
//! operator's writes to it (desired VMs, cordons). The controller acts on those writes;
//! these commands never place anything themselves.
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ray::output::{print_structured, table, Format, OutputArgs};
use ray_cluster::controller::{leader, read_world};
use ray_cluster::decisions::{self, Entry};
use ray_cluster::keys;
use ray_cluster::runtoken;
use ray_cluster::spec::{HostSpec, VmSpec, POOLS};
use ray_cluster::store::{Commit, Cond, EtcdStore, Store, Txn};
use serde::Serialize;

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// The cluster at a glance: leader, hosts by state, VMs placed and pending.
    Status(StoreArgs),
    /// List the hosts: lease, state, inventory, VMs.
    Nodes(StoreArgs),
    /// List the cluster's VMs: the host their run token names, epoch, size.
    Vms(StoreArgs),
    /// List the resource pools: priority tier, VMs and what they hold.
    Pools(StoreArgs),
    /// The decision log: placements, refusals, preemptions, releases, recoveries.
    Events(EventsArgs),
    /// One VM: its spec, where it runs, and every decision about it.
    Explain(VmArgs),
    /// Create or delete a cluster VM (the controller places it, an agent runs it).
    #[command(subcommand)]
    Vm(ClusterVmCommand),
}

#[derive(Subcommand)]
pub enum ClusterVmCommand {
    /// Ask for a VM: the controller places it and its host's agent starts it.
    Create(CreateArgs),
    /// Delete a VM: the controller releases its run token and its host stops it.
    Delete(VmArgs),
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Give a host no new VMs; its own keep running.
    Cordon(HostArgs),
    /// Let a cordoned host take new VMs again.
    Uncordon(HostArgs),
}

#[derive(Args)]
pub struct StoreArgs {
    /// etcd endpoints, comma-separated, e.g. http://10.0.0.1:2379.
    #[arg(long, value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args)]
pub struct EventsArgs {
    /// Only this VM's decisions.
    #[arg(long)]
    pub vm: Option<String>,
    /// Only the last N.
    #[arg(long)]
    pub tail: Option<usize>,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Args)]
pub struct VmArgs {
    /// The VM's name.
    pub vm: String,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Args)]
pub struct HostArgs {
    /// The host's name.
    pub host: String,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Args)]
pub struct CreateArgs {
    /// The VM's name (1-63 letters, digits, '-', '_' or '.').
    pub vm: String,
    /// vCPUs (1-254).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// Resource pool: best-effort, standard, high or critical (its priority tier).
    #[arg(long, default_value = "standard")]
    pub pool: String,
    /// Anti-affinity group: members never share a host.
    #[arg(long)]
    pub group: Option<String>,
    /// Opt in to HA restart, with this priority (higher first).
    #[arg(long)]
    pub restart_priority: Option<u8>,
    /// Kernel to boot (rayvisor's own guest when absent).
    #[arg(long)]
    pub kernel: Option<String>,
    /// Kernel command line (the guest's default when absent).
    #[arg(long)]
    pub cmdline: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn mib(v: Option<u64>) -> String {
    opt(v.map(|m| format!("{m} MiB")))
}

/// Prints `rows` structured, or as a table of `header` and `cells`.
fn show<T: Serialize>(
    rows: &[T],
    format: Format,
    header: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    if !print_structured(&rows, format)? {
        let cells: Vec<Vec<String>> = rows.iter().map(cells).collect();
        print!("{}", table(header, &cells));
    }
    Ok(())
}

fn entry_cells(e: &Entry) -> Vec<String> {
    vec![
        e.seq.to_string(),
        format!("{:?}", e.kind).to_lowercase(),
        opt(e.vm.clone()),
        opt(e.host.clone()),
        e.message.clone(),
    ]
}

const EVENT_HEADER: [&str; 5] = ["SEQ", "KIND", "VM", "HOST", "MESSAGE"];

#[derive(Serialize)]
struct Status {
    leader: Option<String>,
    hosts: std::collections::BTreeMap<String, usize>,
    vms_placed: usize,
    vms_pending: usize,
}

#[derive(Serialize)]
struct PoolRow {
    pool: String,
    tier: String,
    vms: usize,
    vcpus: u64,
    memory_mib: u64,
}

#[derive(Serialize)]
struct Explained {
    vm: String,
    spec: Option<VmSpec>,
    host: Option<String>,
    epoch: Option<u64>,
    history: Vec<Entry>,
}

async fn connect(a: &StoreArgs) -> anyhow::Result<EtcdStore> {
    Ok(EtcdStore::connect(&a.etcd).await?)
}

pub fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    block_on(cluster(cmd))
}

pub fn run_node(cmd: NodeCommand) -> anyhow::Result<()> {
    block_on(node(cmd))
}

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?
        .block_on(f)
}

async fn cluster(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Status(a) => {
            let s = connect(&a).await?;
            let world = read_world(&s).await?;
            let mut hosts = std::collections::BTreeMap::new();
            for h in &world.hosts {
                let state = if h.spec.cordon && h.alive {
                    "Cordoned".to_string()
                } else {
                    h.status().to_string()
                };
                *hosts.entry(state).or_insert(0) += 1;
            }
            let desired = world.vms.iter().filter(|v| v.spec.is_some());
            let placed = desired.clone().filter(|v| v.token.is_some()).count();
            let status = Status {
                leader: leader::current(&s).await?.map(|l| l.id),
                hosts,
                vms_placed: placed,
                vms_pending: desired.count() - placed,
            };
            if !print_structured(&status, a.out.format())? {
                println!("leader: {}", opt(status.leader));
                let hosts: Vec<String> = status
                    .hosts
                    .iter()
                    .map(|(k, n)| format!("{n} {k}"))
                    .collect();
                println!("hosts:  {}", hosts.join(", "));
                println!(
                    "vms:    {} placed, {} pending",
                    status.vms_placed, status.vms_pending
                );
            }
        }
        ClusterCommand::Nodes(a) => {
            let s = connect(&a).await?;
            let (rows, _) = ray_cluster::view::nodes(&s).await?;
            show(
                &rows,
                a.out.format(),
                &["HOST", "STATE", "CPUS", "MEMORY", "VMS"],
                |r| {
                    vec![
                        r.host.clone(),
                        r.state.clone(),
                        opt(r.cpus),
                        mib(r.memory_mib),
                        r.vms.len().to_string(),
                    ]
                },
            )?;
        }
        ClusterCommand::Vms(a) => {
            let s = connect(&a).await?;
            let (rows, _) = ray_cluster::view::vms(&s).await?;
            show(
                &rows,
                a.out.format(),
                &["VM", "HOST", "EPOCH", "VCPUS", "MEMORY", "PROBLEM"],
                |r| {
                    vec![
                        r.vm.clone(),
                        opt(r.host.clone()),
                        opt(r.epoch),
                        opt(r.vcpus),
                        mib(r.memory_mib),
                        r.problem.clone().unwrap_or_default(),
                    ]
                },
            )?;
        }
        ClusterCommand::Pools(a) => {
            let s = connect(&a).await?;
            let world = read_world(&s).await?;
            let rows: Vec<PoolRow> = POOLS
                .iter()
                .map(|(name, tier)| {
                    let vms: Vec<&VmSpec> = world
                        .vms
                        .iter()
                        .filter(|v| v.token.is_some())
                        .filter_map(|v| v.spec.as_ref()?.as_ref().ok())
                        .filter(|s| s.pool == *name)
                        .collect();
                    PoolRow {
                        pool: (*name).into(),
                        tier: format!("{tier:?}"),
                        vms: vms.len(),
                        vcpus: vms.iter().map(|s| u64::from(s.vcpus)).sum(),
                        memory_mib: vms.iter().map(|s| s.memory_mib).sum(),
                    }
                })
                .collect();
            show(
                &rows,
                a.out.format(),
                &["POOL", "TIER", "VMS", "VCPUS", "MEMORY"],
                |r| {
                    vec![
                        r.pool.clone(),
                        r.tier.clone(),
                        r.vms.to_string(),
                        r.vcpus.to_string(),
                        mib(Some(r.memory_mib)),
                    ]
                },
            )?;
        }
        ClusterCommand::Events(a) => {
            let s = connect(&a.store).await?;
            let mut log = decisions::read(&s, a.vm.as_deref()).await?;
            if let Some(n) = a.tail {
                log.drain(..log.len().saturating_sub(n));
            }
            show(&log, a.store.out.format(), &EVENT_HEADER, entry_cells)?;
        }
        ClusterCommand::Explain(a) => {
            let s = connect(&a.store).await?;
            keys::check_name("VM", &a.vm).map_err(anyhow::Error::msg)?;
            let spec = s.get(&keys::vm_spec(&a.vm)).await?;
            let token = runtoken::read(&s, &a.vm).await?;
            let history = decisions::read(&s, Some(&a.vm)).await?;
            if spec.is_none() && token.is_none() && history.is_empty() {
                bail!("VM {} is not known to the cluster", a.vm);
            }
            let e = Explained {
                vm: a.vm.clone(),
                spec: spec.and_then(|kv| VmSpec::parse(&kv.value).ok()),
                host: token.as_ref().map(|(t, _)| t.host.clone()),
                epoch: token.as_ref().map(|(t, _)| t.epoch),
                history,
            };
            if !print_structured(&e, a.store.out.format())? {
                let where_ = match (&e.host, e.epoch) {
                    (Some(h), Some(ep)) => format!("runs on host {h} (run token epoch {ep})"),
                    _ if e.spec.is_none() => "deleted".into(),
                    _ => "pending: no host yet".into(),
                };
                println!("VM {}: {where_}", e.vm);
                print!(
                    "{}",
                    table(
                        &EVENT_HEADER,
                        &e.history.iter().map(entry_cells).collect::<Vec<_>>()
                    )
                );
            }
        }
        ClusterCommand::Vm(ClusterVmCommand::Create(a)) => {
            keys::check_name("VM", &a.vm).map_err(anyhow::Error::msg)?;
            let spec = VmSpec {
                vcpus: a.vcpus,
                memory_mib: a.memory_mib,
                kernel: a.kernel,
                cmdline: a.cmdline,
                pool: a.pool,
                group: a.group,
                restart_priority: a.restart_priority,
            };
            spec.check().map_err(anyhow::Error::msg)?;
            let s = connect(&a.store).await?;
            let txn = Txn::new()
                .when(keys::vm_spec(&a.vm), Cond::Absent)
                .put(keys::vm_spec(&a.vm), spec.to_json());
            if s.commit(txn).await? == Commit::Conflict {
                bail!("VM {} exists already: delete it first", a.vm);
            }
            println!("{}", a.vm);
        }
        ClusterCommand::Vm(ClusterVmCommand::Delete(a)) => {
            keys::check_name("VM", &a.vm).map_err(anyhow::Error::msg)?;
            let s = connect(&a.store).await?;
            let txn = Txn::new()
                .when(keys::vm_spec(&a.vm), Cond::Present)
                .delete(keys::vm_spec(&a.vm));
            if s.commit(txn).await? == Commit::Conflict {
                bail!("VM {} does not exist", a.vm);
            }
            println!("{}", a.vm);
        }
    }
    Ok(())
}

async fn node(cmd: NodeCommand) -> anyhow::Result<()> {
    let (a, cordon) = match cmd {
        NodeCommand::Cordon(a) => (a, true),
        NodeCommand::Uncordon(a) => (a, false),
    };
    keys::check_name("host", &a.host).map_err(anyhow::Error::msg)?;
    let s = connect(&a.store).await?;
    if s.get(&keys::host_alive(&a.host)).await?.is_none()
        && s.get(&keys::host_status(&a.host)).await?.is_none()
    {
        bail!(
            "host {} is not known to the cluster (it never registered)",
            a.host
        );
    }
    // Revision-checked, so a concurrent change of the role is not lost.
    let current = s.get(&keys::host_spec(&a.host)).await?;
    let mut spec = HostSpec::parse(current.as_ref().map(|kv| kv.value.as_slice()))
        .map_err(anyhow::Error::msg)?;
    spec.cordon = cordon;
    let cond = match &current {
        Some(kv) => Cond::ModRevision(kv.mod_revision),
        None => Cond::Absent,
    };
    let txn = Txn::new()
        .when(keys::host_spec(&a.host), cond)
        .put(keys::host_spec(&a.host), spec.to_json());
    if s.commit(txn).await? == Commit::Conflict {
        bail!("the spec of host {} changed meanwhile: try again", a.host);
    }
    println!("{}", a.host);
    Ok(())
}
