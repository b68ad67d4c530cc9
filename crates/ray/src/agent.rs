//! `ray agent`: one per host. The agent's logic is `ray_cluster::agent`; this file gives
//! it this host's VMMs: started with the `ray vm run` launch code (detached, so a VMM never
//! depends on the agent), found again by scanning the runtime directory, stopped, paused
//! and resumed through their own API.
//!
//! A VM the agent started has `cluster.json` (its run-token epoch) in its directory; VMs
//! started by hand have none and are left alone.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use ray_api::vmm::{LeaseRequest, StopRequest, VmConfig, VmInfo, VmStateName};
use ray_api::vmm::{MigrateRequest, MigrationRole, MigrationStatus};
use ray_api::vmm::{SnapshotInfo, SnapshotKind, SnapshotRequest};
use ray_cluster::agent::{
    Agent, AgentConfig, Checkpoint, CheckpointConfig, LocalLease, LocalVm, Vmms,
};
use ray_cluster::migration::{Phase, Progress};
use ray_cluster::runtoken::{Assignment, Origin};
use ray_cluster::spec::VmSpec;
use ray_cluster::timing::Timing;
use serde::{Deserialize, Serialize};

use ray::client::VmmClient;
use ray::runtime::{self, Presence};

use crate::vm::{self, VmmExtras};

#[derive(Args)]
pub struct AgentArgs {
    /// This host's name in the cluster (default: the kernel's host name).
    #[arg(long)]
    pub host: Option<String>,
    #[command(flatten)]
    pub store: crate::store_sel::StoreSel,
    /// Where the agent keeps its lease between runs and serves its API socket `api.sock`
    /// (default: <runtime-dir>/agent).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Also serve the agent API on TCP at this address (e.g. 0.0.0.0:7450); only with
    /// --api-token-file: every request over TCP must carry that token.
    #[arg(long, value_name = "ADDR", requires = "api_token_file")]
    pub api_tcp: Option<std::net::SocketAddr>,
    /// The bearer token of the TCP API: a file of mode 0600 holding one token of 16 to 256
    /// characters (A-Z a-z 0-9 - _ . ~ + / =).
    #[arg(long, value_name = "FILE", requires = "api_tcp")]
    pub api_token_file: Option<PathBuf>,
    /// The pre-shared key file of live migrations between this cluster's hosts (the same
    /// on every host; see `ray migrate`). Without it the host neither sends nor receives.
    #[arg(long)]
    pub migration_key_file: Option<PathBuf>,
    /// The address this host receives migrations on (a free port is picked per VM).
    #[arg(long, default_value = "127.0.0.1")]
    pub migration_address: std::net::IpAddr,
    /// A directory every host reaches (shared storage): the agent checkpoints each HA VM
    /// it runs there (`<dir>/<vm>/e<epoch>/`), and an HA restart elsewhere resumes from
    /// the latest. Without it, HA VMs restart by a fresh boot.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// How often each HA VM is checkpointed (its vCPUs stop for each); 0 turns it off.
    #[arg(long, value_name = "TIME", default_value = "10s", value_parser = ray::sizes::parse_duration)]
    pub checkpoint_interval: std::time::Duration,
    /// Checkpoints per chain (a full one, then incrementals): the next is full again and
    /// the older chain is deleted once the new one is named.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub checkpoint_chain: u32,
    /// The CPUs this host offers the cluster (the controller hands out 4 vCPUs per CPU),
    /// instead of all the kernel counts: less to keep some for the host, more to pack
    /// small, mostly idle VMs tighter.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub cpus: Option<u32>,
    #[command(flatten)]
    pub timing: TimingArgs,
    #[command(flatten)]
    pub jail: ray::jail::JailArgs,
}

/// The cluster's lease timing: the same on every agent and controller.
#[derive(Args)]
pub struct TimingArgs {
    /// The host lease's time to live (etcd): a host whose agent stays silent this long
    /// is failed. Renewals, the VMMs' local leases and the HA restart's grace are scaled
    /// from it (README "Self-fencing"); e.g. 20s (the default) or 4s.
    #[arg(long, value_name = "TIME", default_value = "20s", value_parser = ray::sizes::parse_duration)]
    pub lease_ttl: std::time::Duration,
}

impl TimingArgs {
    /// The timing, refused when it would let a VM run twice.
    pub fn timing(&self) -> anyhow::Result<Timing> {
        let t = Timing::for_lease(self.lease_ttl);
        t.check()
            .map_err(|e| anyhow::anyhow!("--lease-ttl {:?}: {e}", self.lease_ttl))?;
        Ok(t)
    }
}

/// The file that marks a VM directory as the cluster's.
const MARK: &str = "cluster.json";

#[derive(Serialize, Deserialize)]
struct Mark {
    epoch: u64,
}

/// The run-token epoch a VM directory is marked with, if the VM is the cluster's.
pub fn marked_epoch(dir: &Path) -> Option<u64> {
    let mark: Mark = serde_json::from_slice(&std::fs::read(dir.join(MARK)).ok()?).ok()?;
    Some(mark.epoch)
}

/// This host's VMMs, as the agent sees them.
struct HostVmms {
    runtime: PathBuf,
    /// Where receivers listen, and the migration key file.
    migration: Option<(std::net::IpAddr, PathBuf)>,
    /// Its VMMs are jailed with uids from this range (root's default, as `ray vm run`).
    jail: Option<ray::jail::UidRange>,
}

impl HostVmms {
    fn client(&self, vm: &str) -> Result<VmmClient, String> {
        vm::client(&self.runtime, vm).map_err(|e| format!("{e:#}"))
    }

    fn put(&self, vm: &str, path: &str, body: Option<Vec<u8>>) -> Result<(), String> {
        self.client(vm)?
            .call::<VmInfo>("PUT", path, body)
            .map(drop)
            .map_err(|e| format!("{path} of VM {vm}: {e}"))
    }
}

/// The VMM configuration of a cluster VM.
fn vm_config(spec: &VmSpec) -> anyhow::Result<VmConfig> {
    let (kernel, default_cmdline) = match &spec.kernel {
        Some(k) => (PathBuf::from(k), "console=ttyS0"),
        None => (vm::default_guest()?, vm::DEFAULT_GUEST_CMDLINE),
    };
    let cfg = VmConfig {
        kernel: kernel.display().to_string(),
        initrd: None,
        cmdline: spec
            .cmdline
            .clone()
            .unwrap_or_else(|| default_cmdline.into()),
        vcpus: spec.vcpus,
        memory_bytes: spec.memory_mib << 20,
        devices: Default::default(),
        numa: Vec::new(),
        numa_attribution: Default::default(),
        numa_migration: Default::default(),
    };
    ray_vmm::config::validate(&cfg, ray_vmm::config::host_memory())
        .map_err(|e| anyhow::anyhow!("invalid VM configuration: {e}"))?;
    Ok(cfg)
}

impl Vmms for HostVmms {
    fn scan(&self) -> Vec<LocalVm> {
        runtime::list_ids(&self.runtime)
            .into_iter()
            .filter_map(|id| {
                let dir = runtime::vm_dir(&self.runtime, &id);
                let epoch = marked_epoch(&dir)?;
                if !matches!(runtime::presence(&dir), Presence::Live { .. }) {
                    return None;
                }
                let info = VmmClient::new(&dir.join("api.sock"))
                    .call::<VmInfo>("GET", "/vm", None)
                    .ok();
                let paused = info
                    .as_ref()
                    .is_some_and(|i| i.state == VmStateName::Paused);
                let fenced = info.and_then(|i| i.lease).is_some_and(|l| l.fenced);
                Some(LocalVm {
                    id,
                    epoch,
                    paused,
                    fenced,
                })
            })
            .collect()
    }

    fn start(
        &self,
        vm: &str,
        spec: &[u8],
        a: &Assignment,
        lease: LocalLease,
    ) -> Result<(), String> {
        let spec = VmSpec::parse(spec).map_err(|e| format!("VM {vm}: {e}"))?;
        let cfg = vm_config(&spec).map_err(|e| format!("VM {vm}: {e:#}"))?;
        let extras = VmmExtras {
            lease: Some((lease.ttl, ray_vmm::lease::monotonic_ns_of(lease.since))),
            jail: self.jail,
            ..VmmExtras::default()
        };
        let origin = match &a.origin {
            Origin::Boot => vm::Origin::Boot(&cfg),
            // An HA restart: the VM's latest checkpoint, on storage every host reaches.
            Origin::Checkpoint { path } => vm::Origin::Restore {
                snapshot: Path::new(path),
                verify_memory: true,
            },
            Origin::Migration { from } => {
                return Err(format!(
                    "VM {vm} arrives by migration from host {from}: it is adopted, not started"
                ))
            }
        };
        vm::start_vmm(&self.runtime, Some(vm.to_string()), &origin, &extras)
            .map_err(|e| format!("{e:#}"))?;
        mark(&self.runtime, vm, a.epoch)
    }

    fn renew(&self, vm: &str, lease: LocalLease) -> Result<(), String> {
        let req = LeaseRequest {
            ttl_ms: lease.ttl.as_millis() as u64,
            since_monotonic_ns: Some(ray_vmm::lease::monotonic_ns_of(lease.since)),
        };
        self.put(
            vm,
            "/vm/lease",
            Some(serde_json::to_vec(&req).unwrap_or_default()),
        )
    }

    fn stop(&self, vm: &str) -> Result<(), String> {
        let dir = runtime::vm_dir(&self.runtime, vm);
        // Not the cluster's any more, whatever the stop does.
        let _ = std::fs::remove_file(dir.join(MARK));
        let body = serde_json::to_vec(&StopRequest { timeout_ms: 2000 }).unwrap_or_default();
        self.put(vm, "/vm/stop", Some(body))
    }

    fn pause(&self, vm: &str) -> Result<(), String> {
        self.put(vm, "/vm/pause", None)
    }

    fn resume(&self, vm: &str) -> Result<(), String> {
        self.put(vm, "/vm/resume", None)
    }

    fn receive(&self, vm: &str, spec: &[u8]) -> Result<String, String> {
        let (ip, key_file) = self.migration_set_up(vm)?;
        VmSpec::parse(spec).map_err(|e| format!("VM {vm}: {e}"))?;
        // A jailed target has a network namespace of its own: the listener (on a free
        // port), the key file and a migration slot are opened here and handed to it, as
        // `ray migrate receive` does.
        let opened = match self.jail {
            Some(_) => Some(
                crate::migrate::open_for_jail(&self.runtime, &format!("{ip}:0"), 8, key_file)
                    .map_err(|e| format!("cannot receive VM {vm}: {e:#}"))?,
            ),
            None => None,
        };
        let listen = match &opened {
            Some(o) => o.endpoint.to_string(),
            None => {
                // A free port: the VMM binds it again at once (the window for another
                // process to take it is the VMM's start-up).
                let port = std::net::TcpListener::bind((ip, 0))
                    .and_then(|l| l.local_addr())
                    .map_err(|e| format!("no free port on {ip} to receive VM {vm}: {e}"))?
                    .port();
                std::net::SocketAddr::new(ip, port).to_string()
            }
        };
        vm::start_vmm(
            &self.runtime,
            Some(vm.to_string()),
            &vm::Origin::Incoming {
                // The source's shape comes with the migration.
                config: None,
                listen: &listen,
                key_file,
                max_concurrent: 8,
                prefault: false,
                // Agents move VMs between hosts: encrypted, as by default.
                insecure_plaintext: false,
                disk_dir: None,
                shared_dirs: &[],
                handed: opened.as_ref().map(crate::migrate::Opened::raw),
            },
            &VmmExtras {
                jail: self.jail,
                ..VmmExtras::default()
            },
        )
        .map_err(|e| format!("{e:#}"))?;
        Ok(listen)
    }

    fn send(&self, vm: &str, addr: &str) -> Result<(), String> {
        let (_, key_file) = self.migration_set_up(vm)?;
        // A jailed VMM is handed the connection, the key file and a slot (`None`
        // unjailed); open until it answered.
        let handed = ray_vmm::hand_over::migration(
            &runtime::vm_dir(&self.runtime, vm),
            &self.runtime,
            addr,
            key_file,
            None,
        )
        .map_err(|e| format!("cannot migrate VM {vm}: {e}"))?;
        let req = MigrateRequest {
            copy_disks: false,
            to: addr.to_string(),
            key_file: key_file.display().to_string(),
            handoff: handed.as_ref().map(|h| h.token.clone()),
            max_downtime_ms: 30,
            on_limit: Default::default(),
            max_passes: None,
            max_time_ms: None,
            auto_converge: true,
            compress: false,
            insecure_plaintext: false,
            recheck_memory: false,
            max_concurrent: None,
        };
        let body = serde_json::to_vec(&req).unwrap_or_default();
        let answered = self
            .client(vm)?
            .call::<MigrationStatus>("PUT", "/vm/migration", Some(body));
        drop(handed);
        answered
            .map(drop)
            .map_err(|e| format!("/vm/migration of VM {vm}: {e}"))
    }

    fn checkpoint(&self, vm: &str, path: &Path, full: bool) -> Result<Checkpoint, String> {
        // A jailed VMM is lent the checkpoint store (`None` unjailed).
        let lent = ray_vmm::hand_over::snapshot_store(&runtime::vm_dir(&self.runtime, vm), path)
            .map_err(|e| format!("cannot checkpoint VM {vm}: {e}"))?;
        let req = SnapshotRequest {
            handoff: lent.as_ref().map(|l| l.token.clone()),
            path: path.display().to_string(),
            pause: true,
            kind: if full {
                SnapshotKind::Full
            } else {
                SnapshotKind::Auto
            },
            compress: false,
            max_snapshots: None,
        };
        let body = serde_json::to_vec(&req).unwrap_or_default();
        let answered = self
            .client(vm)?
            .call::<SnapshotInfo>("PUT", "/vm/snapshot", Some(body));
        if let Some(lent) = lent {
            lent.give_back(path)
                .map_err(|e| format!("checkpoint of VM {vm}: {e}"))?;
        }
        let info = answered.map_err(|e| format!("/vm/snapshot of VM {vm}: {e}"))?;
        // Named only once every file reads back with its checksums.
        let (store, id) = ray_vmm::snapshot::split_path(path).map_err(|e| e.to_string())?;
        ray_snapshot::SnapshotStore::open(&store)
            .and_then(|s| s.verify(&id))
            .map_err(|e| {
                format!(
                    "checkpoint {} of VM {vm} does not verify: {e}",
                    path.display()
                )
            })?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            full: info.parent.is_none(),
            paused_ms: info.paused_ms,
        })
    }

    fn migration(&self, vm: &str) -> Result<Progress, String> {
        let s = crate::migrate::status(&self.runtime, vm).map_err(|e| format!("{e:#}"))?;
        Ok(progress(&s))
    }

    fn cancel(&self, vm: &str) -> Result<(), String> {
        self.client(vm)?
            .call::<MigrationStatus>("PUT", "/vm/migration/cancel", None)
            .map(drop)
            .map_err(|e| format!("/vm/migration/cancel of VM {vm}: {e}"))
    }

    fn adopt(&self, vm: &str, epoch: u64) -> Result<(), String> {
        let info = self.client(vm)?.call::<VmInfo>("GET", "/vm", None);
        match info {
            Ok(i) if matches!(i.state, VmStateName::Running | VmStateName::Paused) => {
                mark(&self.runtime, vm, epoch)
            }
            Ok(i) => Err(format!(
                "VM {vm} here is {}, not running: it did not arrive",
                vm::state_name(i.state)
            )),
            Err(e) => Err(format!("VM {vm} does not answer here: {e}")),
        }
    }
}

impl HostVmms {
    fn migration_set_up(&self, vm: &str) -> Result<(std::net::IpAddr, &Path), String> {
        self.migration
            .as_ref()
            .map(|(ip, key)| (*ip, key.as_path()))
            .ok_or_else(|| {
                format!("cannot migrate VM {vm}: this agent runs without --migration-key-file")
            })
    }
}

/// Marks `vm`'s directory as the cluster's, at `epoch`.
fn mark(runtime: &Path, vm: &str, epoch: u64) -> Result<(), String> {
    let mark = serde_json::to_vec(&Mark { epoch }).unwrap_or_default();
    let dir = runtime::vm_dir(runtime, vm);
    std::fs::write(dir.join(MARK), mark)
        .map_err(|e| format!("cannot write {}: {e}", dir.join(MARK).display()))
}

/// One side of a migration as the cluster sees it, from its VMM's status.
fn progress(s: &MigrationStatus) -> Progress {
    let phase = match s.role {
        MigrationRole::Target if s.vm == "running" => Phase::Done,
        MigrationRole::Target if s.vm == "discarded" || s.state == "failed" => Phase::Failed,
        MigrationRole::Target if s.state == "idle" => Phase::Waiting,
        MigrationRole::Source if s.vm == "migrated" => Phase::Done,
        MigrationRole::Source if s.vm == "paused_ownership_uncertain" => Phase::Uncertain,
        MigrationRole::Source if s.vm == "running" || s.vm == "rollback_failed" => Phase::Failed,
        _ => Phase::Copying,
    };
    let mut p = Progress::new("", phase);
    p.pass = s.pass;
    p.bytes_sent = s.bytes_sent;
    p.expected_downtime_ms = s.expected_downtime_ms;
    p.downtime_ms = s.downtime_ms;
    p.elapsed_ms = s.elapsed_ms;
    p.error = s.error.clone();
    p
}

/// The checkpoint set-up of `--checkpoint-dir` (none without it, or with an interval 0).
fn checkpoints(args: &AgentArgs) -> anyhow::Result<Option<CheckpointConfig>> {
    let Some(dir) = &args.checkpoint_dir else {
        return Ok(None);
    };
    if args.checkpoint_interval.is_zero() {
        return Ok(None);
    }
    if args.checkpoint_interval < std::time::Duration::from_millis(100) {
        anyhow::bail!(
            "--checkpoint-interval {:?} is too short: use at least 100ms (or 0 for none)",
            args.checkpoint_interval
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--checkpoint-dir {}: cannot create it", dir.display()))?;
    let dir = std::path::absolute(dir)
        .with_context(|| format!("--checkpoint-dir {}: cannot resolve it", dir.display()))?;
    Ok(Some(CheckpointConfig {
        dir,
        every: args.checkpoint_interval,
        chain: args.checkpoint_chain as usize,
    }))
}

pub fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cannot read this host's name; pass --host")?;
    Ok(name.trim().to_string())
}

/// `ray agent`: runs until the store fails for good (then the VMs fence themselves).
pub fn run(args: AgentArgs, runtime: &Path) -> anyhow::Result<()> {
    let checkpoints = checkpoints(&args)?;
    let host = match args.host {
        Some(h) => h,
        None => hostname()?,
    };
    // Everything the command line names is checked before anything is started.
    let tcp = match (args.api_tcp, &args.api_token_file) {
        (Some(addr), Some(file)) => Some((addr, crate::agent_api::Token::load(file)?)),
        (Some(addr), None) => anyhow::bail!(
            "--api-tcp {addr} needs --api-token-file: the agent API is never served on TCP without a token"
        ),
        _ => None,
    };
    let timing = args.timing.timing()?;
    let state_dir = args.state_dir.unwrap_or_else(|| runtime.join("agent"));
    let mut cfg = AgentConfig {
        host: host.clone(),
        state_dir: state_dir.clone(),
        timing,
        api: None,
        checkpoints,
        cpus: args.cpus,
    };
    let migration = match args.migration_key_file {
        Some(k) => Some((
            args.migration_address,
            std::path::absolute(&k).with_context(|| format!("cannot resolve {}", k.display()))?,
        )),
        None => None,
    };
    let vmms = HostVmms {
        runtime: runtime.to_path_buf(),
        migration,
        // As `ray vm run`: jailed by default as root (--no-jail or $RAY_JAIL=0 turn it off).
        jail: ray::jail::wanted(&args.jail)?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the agent's runtime")?;
    rt.block_on(async {
        let listeners = crate::agent_api::Listeners::bind(&state_dir, tcp)?;
        cfg.api = listeners.tcp_addr().map(|a| a.to_string());
        let store = args.store.connect().await?;
        let agent = Agent::join(store, vmms, cfg).await?;
        let probe = agent.lease_probe();
        let api = crate::agent_api::AgentApi {
            host,
            runtime: runtime.to_path_buf(),
            lease: std::sync::Arc::new(move || (probe.fenced(), probe.fence_in())),
            lease_ttl: timing.lease_ttl,
            cpus: args.cpus,
        };
        tokio::spawn(listeners.serve(api));
        agent.run().await?;
        Ok(())
    })
}
