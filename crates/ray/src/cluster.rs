//! `ray cluster ...` and `ray node ...`: the cluster as its store holds it, and the
//! operator's writes to it (desired VMs, cordons). The controller acts on those writes;
//! these commands never place anything themselves.
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ray::output::{print_structured, table, Format, OutputArgs};
use ray_cluster::controller::{leader, read_world};
use ray_cluster::decisions::{self, Entry, Kind};
use ray_cluster::keys;
use ray_cluster::migration::{Progress, Request};
use ray_cluster::ops;
use ray_cluster::runtoken;
use ray_cluster::spec::{VmSpec, POOLS};
use ray_cluster::store::{AnyStore, Commit, Cond, Store, Txn};
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
    /// Live-migrate a VM to another host (the placement engine picks one unless --to),
    /// following its progress; --abort stops one under way.
    Migrate(MigrateArgs),
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The VM's name.
    pub vm: String,
    /// The target host (default: the placement engine's choice).
    #[arg(long, conflicts_with = "abort")]
    pub to: Option<String>,
    /// Abort the VM's migration under way (past the switch-over it completes).
    #[arg(long)]
    pub abort: bool,
    /// Ask and return; `ray cluster explain VM` shows the outcome.
    #[arg(long)]
    pub detach: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Give a host no new VMs; its own keep running.
    Cordon(HostArgs),
    /// Let a cordoned host take new VMs again (also ends a drain).
    Uncordon(HostArgs),
    /// Live-migrate every VM off a host (it takes no new ones), following the progress
    /// until it is Drained; --abort ends a drain.
    Drain(DrainArgs),
    /// A host as its agent sees it: inventory, health, lease (the agent API's GET /host).
    Status(NodeApiArgs),
    /// The cluster VMs whose VMM runs on a host (the agent API's GET /vms).
    Vms(NodeApiArgs),
}

#[derive(Args)]
pub struct NodeApiArgs {
    /// The host's name (checked against the agent's answer).
    pub host: String,
    /// The agent's API: unix:PATH or http://HOST:PORT (default: this host's agent,
    /// unix:<runtime-dir>/agent/api.sock).
    #[arg(long, value_name = "ADDR")]
    pub agent: Option<crate::agent_api::AgentAddr>,
    /// The agent's bearer token (its --api-token-file), needed over TCP.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args)]
pub struct DrainArgs {
    /// The host's name.
    pub host: String,
    /// End the drain: the migrations under way are aborted, the VMs left stay.
    #[arg(long)]
    pub abort: bool,
    /// Ask and return; `ray cluster status` shows the progress.
    #[arg(long)]
    pub detach: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Args)]
pub struct StoreArgs {
    #[command(flatten)]
    pub sel: crate::store_sel::StoreSel,
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
    /// HA: when its host fails, restart the VM on another host (from its latest
    /// checkpoint, else a fresh boot), never while the old copy could still run.
    #[arg(long)]
    pub ha: bool,
    /// With --ha: its restart priority, 0-255 (higher restarts first; default 0).
    #[arg(long, requires = "ha")]
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
    /// Draining (or drained) hosts: state and VMs left.
    drains: Vec<DrainRow>,
    /// Migrations under way: VM -> the latest report.
    migrations: std::collections::BTreeMap<String, String>,
}

#[derive(Serialize)]
struct DrainRow {
    host: String,
    state: String,
    vms_left: usize,
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

async fn connect(a: &StoreArgs) -> anyhow::Result<AnyStore> {
    a.sel.connect().await
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
            let mut drains = Vec::new();
            for h in &world.hosts {
                let left = ops::vms_on(&world, &h.name).len();
                let state = ops::host_state(&world, &h.name).unwrap_or_default();
                if h.spec.drain {
                    drains.push(DrainRow {
                        host: h.name.clone(),
                        state: state.clone(),
                        vms_left: left,
                    });
                }
                *hosts.entry(state).or_insert(0) += 1;
            }
            let migrations = world
                .migrations
                .iter()
                .map(|(vm, m)| {
                    let report = m.sender.as_ref().or(m.receiver.as_ref());
                    let line = report.map_or_else(|| "asked for".into(), |p| p.line());
                    (vm.clone(), line)
                })
                .collect();
            let desired = world.vms.iter().filter(|v| v.spec.is_some());
            let placed = desired.clone().filter(|v| v.token.is_some()).count();
            let status = Status {
                leader: leader::current(&s).await?.map(|l| l.id),
                hosts,
                vms_placed: placed,
                vms_pending: desired.count() - placed,
                drains,
                migrations,
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
                for d in &status.drains {
                    println!(
                        "drain:  host {}: {}, {} VMs left",
                        d.host, d.state, d.vms_left
                    );
                }
                for (vm, line) in &status.migrations {
                    println!("moving: {vm}: {line}");
                }
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
            let format = a.out.format();
            let wide = matches!(format, Format::Wide);
            let mut header = vec!["VM", "HOST", "EPOCH", "VCPUS", "MEMORY"];
            if wide {
                header.extend(["CHECKPOINT", "AGE", "PAUSED"]);
            }
            header.push("PROBLEM");
            show(&rows, format, &header, |r| {
                let mut cells = vec![
                    r.vm.clone(),
                    opt(r.host.clone()),
                    opt(r.epoch),
                    opt(r.vcpus),
                    mib(r.memory_mib),
                ];
                if wide {
                    cells.extend([
                        opt(r.checkpoint.clone()),
                        opt(r.checkpoint_age_s.map(|s| format!("{s:.1}s"))),
                        opt(r.checkpoint_paused_ms.map(|m| format!("{m:.1}ms"))),
                    ]);
                }
                cells.push(r.problem.clone().unwrap_or_default());
                cells
            })?;
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
                restart_priority: a.ha.then_some(a.restart_priority.unwrap_or(0)),
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
        ClusterCommand::Vm(ClusterVmCommand::Migrate(a)) => migrate(a).await?,
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

/// `ray cluster vm migrate`: checks, writes the request, follows it to its outcome.
async fn migrate(a: MigrateArgs) -> anyhow::Result<()> {
    keys::check_name("VM", &a.vm).map_err(anyhow::Error::msg)?;
    if let Some(to) = &a.to {
        keys::check_name("host", to).map_err(anyhow::Error::msg)?;
    }
    let s = connect(&a.store).await?;
    let Some((token, _)) = runtoken::read(&s, &a.vm).await? else {
        bail!(
            "VM {} is not placed (no run token): nothing to migrate",
            a.vm
        );
    };
    let request = keys::migrate_request(&a.vm);
    let under_way = s
        .get(&keys::op(&format!("migrate-{}", a.vm)))
        .await?
        .is_some();
    let txn = if a.abort {
        if !under_way && s.get(&request).await?.is_none() {
            bail!("VM {} has no migration under way to abort", a.vm);
        }
        Txn::new().put(
            request.clone(),
            serde_json::to_vec(&Request {
                abort: true,
                ..Request::default()
            })?,
        )
    } else {
        if let Some(to) = &a.to {
            if *to == token.host {
                bail!("VM {} runs on host {to} already", a.vm);
            }
            if s.get(&keys::host_alive(to)).await?.is_none() {
                bail!("host {to} has no live agent: it cannot receive VM {}", a.vm);
            }
        }
        if under_way {
            bail!("VM {} is being migrated already: wait, or --abort it", a.vm);
        }
        let req = Request {
            to: a.to.clone(),
            abort: false,
            cause: Some("operator".into()),
        };
        Txn::new()
            .when(request.clone(), Cond::Absent)
            .put(request.clone(), serde_json::to_vec(&req)?)
    };
    if s.commit(txn).await? == Commit::Conflict {
        bail!("VM {} has a migration asked for already", a.vm);
    }
    if a.detach {
        println!("{}", a.vm);
        return Ok(());
    }
    // Follow: progress from the agents' reports until the controller clears the request.
    let since = decisions::read(&s, Some(&a.vm))
        .await?
        .last()
        .map_or(0, |e| e.seq);
    let mut last = String::new();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        for key in [keys::sender(&a.vm), keys::receiver(&a.vm)] {
            if let Some(kv) = s.get(&key).await? {
                if let Ok(p) = serde_json::from_slice::<Progress>(&kv.value) {
                    let line = p.line();
                    if line != last && !a.store.out.json {
                        eprintln!("{line}");
                        last = line;
                    }
                }
            }
        }
        if s.get(&request).await?.is_some() {
            continue;
        }
        let ended = decisions::read(&s, Some(&a.vm))
            .await?
            .into_iter()
            .find(|e| e.seq > since && matches!(e.kind, Kind::Migrated | Kind::MigrationFailed));
        let Some(e) = ended else {
            continue;
        };
        if !print_structured(&e, a.store.out.format())? {
            println!("{}", e.message);
        }
        if e.kind == Kind::MigrationFailed {
            return Err(anyhow::anyhow!("VM {}: {}", a.vm, e.message));
        }
        return Ok(());
    }
}

async fn node(cmd: NodeCommand) -> anyhow::Result<()> {
    let a = match cmd {
        NodeCommand::Cordon(a) => a,
        NodeCommand::Uncordon(a) => return uncordon(a).await,
        NodeCommand::Drain(d) => return drain(d).await,
        // The agent API's client runs its own runtime: off this one's thread.
        NodeCommand::Status(a) => {
            return tokio::task::spawn_blocking(move || node_status(a, false)).await?
        }
        NodeCommand::Vms(a) => {
            return tokio::task::spawn_blocking(move || node_status(a, true)).await?
        }
    };
    let s = connect(&a.store).await?;
    ops::cordon(&s, &a.host).await?;
    println!("{}", a.host);
    Ok(())
}

/// `ray node uncordon`: the host takes new VMs again. A Drained host (its maintenance
/// over) goes through Rejoining first: the controller checks it before it is Ready.
async fn uncordon(a: HostArgs) -> anyhow::Result<()> {
    let s = connect(&a.store).await?;
    if ops::uncordon(&s, &a.host).await? == ops::Uncordoned::Rejoining {
        eprintln!(
            "host {}: Rejoining: it takes VMs once the controller checked it (`ray cluster events`)",
            a.host
        );
    }
    println!("{}", a.host);
    Ok(())
}

/// `ray node drain`: sets (or clears) the drain and follows it.
async fn drain(a: DrainArgs) -> anyhow::Result<()> {
    let s = connect(&a.store).await?;
    if a.abort {
        for vm in ops::drain_abort(&s, &a.host).await? {
            eprintln!("aborting the migration of VM {vm}");
        }
        println!("{}", a.host);
        return Ok(());
    }
    ops::drain(&s, &a.host).await?;
    if a.detach {
        println!("{}", a.host);
        return Ok(());
    }
    let mut last = String::new();
    loop {
        let world = read_world(&s).await?;
        let Some(h) = world.hosts.iter().find(|h| h.name == a.host) else {
            bail!("host {} left the cluster during its drain", a.host);
        };
        if !h.spec.drain {
            bail!("the drain of host {} was aborted", a.host);
        }
        let left = ops::vms_on(&world, &a.host).len();
        let line = format!("host {}: {}, {left} VMs left", a.host, h.state(left));
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        if left == 0 {
            println!("{}", h.state(0));
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// `ray node status|vms HOST`: asks the host's agent through its API.
fn node_status(a: NodeApiArgs, vms: bool) -> anyhow::Result<()> {
    use crate::agent_api::{AgentAddr, AgentClient, Token};
    use ray_api::agent::{HostInfo, HostVm};
    keys::check_name("host", &a.host).map_err(anyhow::Error::msg)?;
    let token = a.token_file.as_deref().map(Token::load).transpose()?;
    let addr = a.agent.clone().unwrap_or_else(|| {
        let runtime = crate::store_sel::runtime_dir();
        AgentAddr::Unix(runtime.join("agent").join(crate::agent_api::SOCKET))
    });
    if matches!(addr, AgentAddr::Tcp(_)) && token.is_none() {
        bail!("--agent {addr} is TCP: pass the agent's token with --token-file");
    }
    let client = AgentClient::new(addr.clone(), token);
    let call_err = |e: ray::client::ClientError| anyhow::anyhow!("the agent at {addr}: {e}");
    let info: HostInfo = client.call("GET", "/host").map_err(call_err)?;
    if info.host != a.host {
        bail!(
            "the agent at {addr} serves host {}, not {}: pass --agent with host {}'s API",
            info.host,
            a.host,
            a.host
        );
    }
    let format = a.out.format();
    if vms {
        let rows: Vec<HostVm> = client.call("GET", "/vms").map_err(call_err)?;
        return show(
            &rows,
            format,
            &["VM", "EPOCH", "STATE", "PID", "FENCED"],
            |v| {
                vec![
                    v.id.clone(),
                    v.epoch.to_string(),
                    v.state
                        .map_or_else(|| opt(v.problem.clone()), |s| s.to_string()),
                    opt(v.pid),
                    if v.fenced { "yes" } else { "no" }.into(),
                ]
            },
        );
    }
    if !print_structured(&info, format)? {
        let lease = match info.lease.state {
            ray_api::agent::LeaseState::Fresh => format!(
                "fresh (fences in {} ms unless renewed; TTL {} ms)",
                info.lease.fence_in_ms, info.lease.ttl_ms
            ),
            ray_api::agent::LeaseState::Fenced => "fenced: its VMs are paused".into(),
        };
        let gpus: Vec<String> = info
            .inventory
            .gpus
            .iter()
            .map(|g| format!("{} ({})", g.address, g.id))
            .collect();
        println!("host:    {} (agent {})", info.host, info.version);
        println!(
            "cpus:    {}, memory {} MiB, {} NUMA node(s)",
            info.inventory.cpus, info.inventory.memory_mib, info.inventory.numa_nodes
        );
        println!(
            "gpus:    {}",
            if gpus.is_empty() {
                "-".into()
            } else {
                gpus.join(", ")
            }
        );
        println!(
            "health:  {}",
            if info.health.ok {
                "ok".to_string()
            } else {
                info.health.problems.join("; ")
            }
        );
        println!("lease:   {lease}");
        println!("vms:     {}", info.vms);
    }
    Ok(())
}
