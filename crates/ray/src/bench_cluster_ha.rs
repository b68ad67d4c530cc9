//! `ray bench cluster`'s failover and drain figures, on real parts: two `ray agent`
//! processes (this binary; each host a runtime directory of its own on loopback), a
//! controller in this process, real VMMs running our guest, all on an etcd of their own.
//!
//! - `failover_ms`: an HA VM runs on one host; its agent is killed (`kill -9`) at a moment
//!   unrelated to its renewals; from then until the guest's heartbeat page answers on the
//!   other host: the lease running out, etcd's expiry check, the grace, the fail-over
//!   transaction, the other agent's start and the guest's boot. (The first host's copy
//!   fences itself meanwhile; the agent, started again, removes it before the next run.)
//!   With `--checkpoint-interval` (not 0) the agents checkpoint HA VMs into a directory
//!   both reach, the kill waits for the VM's first two checkpoints, and the other host
//!   restores the latest instead of booting.
//! - `checkpoint_ms`: how long each of those periodic checkpoints stopped the VM's vCPUs
//!   (the VMM's own `paused_ms`, as the agent wrote it into `/ray/vms/<vm>/observed`).
//! - `drain_ms`: a host holding `--drain-vms` VMs is drained (`ray node drain`'s spec
//!   change); from then until no run token names it, divided by the VMs it held: the
//!   drain time per VM (live migrations, two at a time).
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use ray::client::VmmClient;
use ray_api::vmm::VmInfo;
use ray_cluster::agent::AbortOnDrop;
use ray_cluster::controller::{Controller, ControllerConfig};
use ray_cluster::keys;
use ray_cluster::runtoken;
use ray_cluster::spec::{HostSpec, VmSpec};
use ray_cluster::store::{EtcdStore, Store, Txn};
use ray_cluster::testing::Etcd;
use ray_cluster::timing::Timing;

const HOSTS: [&str; 2] = ["ha-a", "ha-b"];

/// One host: its runtime directory and its agent process.
struct Host {
    name: &'static str,
    runtime: PathBuf,
    agent: Option<Child>,
}

impl Host {
    fn kill(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
        // VMMs outlive their agents by design: end them here.
        for id in ray::runtime::list_ids(&self.runtime) {
            let pid = std::fs::read_to_string(self.runtime.join("vms").join(&id).join("vmm.pid"));
            if let Some(pid) = pid.ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) of a VMM process this bench's agents started.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// The set-up shared by both figures.
struct Rig {
    store: EtcdStore,
    hosts: Vec<Host>,
    exe: PathBuf,
    url: String,
    key: PathBuf,
    ttl: Duration,
    /// Where the agents checkpoint HA VMs, and how often (`None`: they do not).
    checkpoints: Option<(PathBuf, Duration)>,
}

impl Rig {
    fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let h = &mut self.hosts[i];
        std::fs::create_dir_all(&h.runtime)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(h.runtime.join("agent.log"))?;
        let ttl = format!("{:.3}s", self.ttl.as_secs_f64());
        let mut cmd = Command::new(&self.exe);
        cmd.args(["agent", "--host", h.name, "--etcd", &self.url])
            .args(["--lease-ttl", &ttl, "--migration-key-file"])
            .arg(&self.key);
        if let Some((dir, every)) = &self.checkpoints {
            cmd.arg("--checkpoint-dir").arg(dir);
            cmd.args(["--checkpoint-interval", &format!("{}ms", every.as_millis())]);
        }
        let child = cmd
            .env("RAY_RUNTIME_DIR", &h.runtime)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start a ray agent")?;
        h.agent = Some(child);
        Ok(())
    }

    async fn alive(&self, host: &str) -> anyhow::Result<bool> {
        Ok(self.store.get(&keys::host_alive(host)).await?.is_some())
    }

    async fn token_host(&self, vm: &str) -> anyhow::Result<Option<String>> {
        Ok(runtoken::read(&self.store, vm).await?.map(|(t, _)| t.host))
    }

    fn index(&self, host: &str) -> usize {
        self.hosts.iter().position(|h| h.name == host).unwrap_or(0)
    }

    async fn create(&self, vm: &str, ha: bool) -> anyhow::Result<()> {
        let spec = VmSpec {
            vcpus: 1,
            memory_mib: 128,
            kernel: None,
            cmdline: None,
            pool: "standard".into(),
            group: None,
            restart_priority: ha.then_some(0),
        };
        self.store
            .commit(Txn::new().put(keys::vm_spec(vm), spec.to_json()))
            .await?;
        Ok(())
    }

    /// Deletes `vm` and waits until no host runs it.
    async fn delete(&self, vm: &str) -> anyhow::Result<()> {
        self.store
            .commit(Txn::new().delete(keys::vm_spec(vm)))
            .await?;
        let p = patience(format!("VM {vm} stopped"), Duration::from_secs(60));
        for h in &self.hosts {
            while heartbeat(&h.runtime, vm).await.is_some() {
                p.wait().await?;
            }
        }
        Ok(())
    }

    async fn set_drain(&self, host: &str, drain: bool) -> anyhow::Result<()> {
        let spec = HostSpec {
            drain,
            ..HostSpec::default()
        };
        self.store
            .commit(Txn::new().put(keys::host_spec(host), spec.to_json()))
            .await?;
        Ok(())
    }
}

/// The guest heartbeat of `vm` in `runtime`, once its guest is up (the VMM client
/// blocks: off the runtime's threads).
async fn heartbeat(runtime: &Path, vm: &str) -> Option<u64> {
    let sock = runtime.join("vms").join(vm).join("api.sock");
    tokio::task::spawn_blocking(move || {
        let info: VmInfo = VmmClient::new(&sock).call("GET", "/vm", None).ok()?;
        info.heartbeat.filter(|h| h.ready).map(|h| h.counter)
    })
    .await
    .ok()
    .flatten()
}

/// Waiting for something, for at most a limit: `while !done { p.wait().await? }`.
struct Patience {
    what: String,
    since: Instant,
    limit: Duration,
}

fn patience(what: String, limit: Duration) -> Patience {
    Patience {
        what,
        since: Instant::now(),
        limit,
    }
}

impl Patience {
    /// Sleeps 10 ms, or fails naming what did not happen once the limit has passed.
    async fn wait(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.since.elapsed() < self.limit,
            "{}: not within {:?}",
            self.what,
            self.limit
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(())
    }
}

/// What [`measure`] found, in ms.
pub struct Figures {
    pub failover: Vec<f64>,
    /// Fail-overs whose VM the other host restored from a checkpoint (not booted).
    pub restored: usize,
    pub drain: Vec<f64>,
    /// The vCPU stop of each periodic checkpoint taken meanwhile.
    pub checkpoint: Vec<f64>,
}

/// Measures `runs` fail-overs and `runs` drains of `drain_vms` VMs, with host leases of
/// `ttl`, the agents checkpointing HA VMs every `checkpoint_every` (zero: never).
pub async fn measure(
    runs: usize,
    drain_vms: usize,
    ttl: Duration,
    checkpoint_every: Duration,
) -> anyhow::Result<Figures> {
    let timing = Timing::for_lease(ttl);
    timing
        .check()
        .map_err(|e| anyhow::anyhow!("--lease-ttl {ttl:?}: {e}"))?;
    let etcd = Etcd::start("bench-cluster-ha").await;
    let store = EtcdStore::connect(&etcd.endpoints()).await?;
    let dir = std::env::temp_dir().join(format!("ray-bench-ha-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("migration.key");
    let secret: String = (0..48)
        .map(|i| char::from(b'a' + ((std::process::id() as usize * 17 + i * 11) % 26) as u8))
        .collect();
    std::fs::write(&key, secret)?;
    let mut rig = Rig {
        store: store.clone(),
        hosts: HOSTS
            .iter()
            .map(|h| Host {
                name: h,
                runtime: dir.join(h),
                agent: None,
            })
            .collect(),
        exe: std::env::current_exe()?,
        url: etcd.endpoints().join(","),
        key,
        ttl,
        checkpoints: (!checkpoint_every.is_zero()).then(|| (dir.join("shared"), checkpoint_every)),
    };
    let result = run(&mut rig, runs, drain_vms, timing).await;
    drop(rig);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Collects the `paused_ms` of every checkpoint an agent names in `/ray/vms/*/observed`.
async fn watch_checkpoints(
    store: &EtcdStore,
    into: std::sync::Arc<std::sync::Mutex<Vec<f64>>>,
) -> anyhow::Result<AbortOnDrop> {
    use ray_cluster::controller::Observed;
    use ray_cluster::store::{Event, Watch};
    let from = store.list(keys::VMS).await?.revision + 1;
    let mut watch = store.watch(keys::VMS, from).await?;
    Ok(AbortOnDrop(tokio::spawn(async move {
        while let Ok(ev) = watch.next().await {
            if let Event::Put(kv) = ev {
                if !kv.key.ends_with("/observed") {
                    continue;
                }
                let o = serde_json::from_slice::<Observed>(&kv.value).ok();
                if let (Some(ms), Ok(mut v)) = (o.and_then(|o| o.paused_ms), into.lock()) {
                    v.push(ms);
                }
            }
        }
    })))
}

/// How many checkpoints of `vm` at `epoch` are named so far (the agent writes `observed`
/// once per checkpoint; counted by their distinct times).
async fn checkpoints_of(
    store: &EtcdStore,
    vm: &str,
    seen: &mut std::collections::BTreeSet<u64>,
) -> anyhow::Result<usize> {
    use ray_cluster::controller::Observed;
    if let Some(kv) = store.get(&keys::vm_observed(vm)).await? {
        if let Ok(Observed {
            taken_at_ms: Some(t),
            ..
        }) = serde_json::from_slice::<Observed>(&kv.value)
        {
            seen.insert(t);
        }
    }
    Ok(seen.len())
}

async fn run(
    rig: &mut Rig,
    runs: usize,
    drain_vms: usize,
    timing: Timing,
) -> anyhow::Result<Figures> {
    let paused = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let _watch = watch_checkpoints(&rig.store, paused.clone()).await?;
    let mut restored = 0;
    let mut cfg = ControllerConfig::new("bench-ha".into());
    cfg.timing = timing;
    let ctl = Controller::new(rig.store.clone(), cfg);
    let _ctl = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = ctl.run().await {
            tracing::error!("the bench's controller failed: {e}");
        }
    }));
    for i in 0..HOSTS.len() {
        rig.start_agent(i)?;
    }
    for h in HOSTS {
        let p = patience(format!("host {h} registered"), Duration::from_secs(30));
        while !rig.alive(h).await? {
            p.wait().await?;
        }
    }
    let limit = timing.lease_ttl * 2 + Duration::from_secs(60);
    let mut failover = Vec::new();
    for run in 0..runs {
        let vm = format!("fo-{run}");
        rig.create(&vm, true).await?;
        let p = patience(format!("VM {vm} placed"), Duration::from_secs(30));
        let on = loop {
            match rig.token_host(&vm).await? {
                Some(h) => break h,
                None => p.wait().await?,
            }
        };
        let from = rig.index(&on);
        let to = 1 - from;
        let (src, dst) = (
            rig.hosts[from].runtime.clone(),
            rig.hosts[to].runtime.clone(),
        );
        let p = patience(format!("VM {vm} running"), Duration::from_secs(60));
        while heartbeat(&src, &vm).await.is_none() {
            p.wait().await?;
        }
        if let Some((_, every)) = rig.checkpoints {
            // A full checkpoint and an incremental one on it, before the host dies.
            let p = patience(
                format!("VM {vm} checkpointed twice"),
                every * 4 + Duration::from_secs(30),
            );
            let mut seen = std::collections::BTreeSet::new();
            while checkpoints_of(&rig.store, &vm, &mut seen).await? < 2 {
                p.wait().await?;
            }
        }
        // Deaths fall anywhere between two renewals.
        let offset = timing.renew_every.mul_f64((run as f64 + 0.5) / runs as f64);
        tokio::time::sleep(offset).await;
        let killed = Instant::now();
        rig.hosts[from].kill();
        let p = patience(format!("VM {vm} answering on the other host"), limit);
        while heartbeat(&dst, &vm).await.is_none() {
            p.wait().await?;
        }
        failover.push(killed.elapsed().as_secs_f64() * 1000.0);
        let to_name = rig.hosts[to].name;
        let how = rig.store.get(&keys::assignment(to_name, &vm)).await?;
        let how = how.and_then(|kv| serde_json::from_slice::<runtoken::Assignment>(&kv.value).ok());
        if how.is_some_and(|a| matches!(a.origin, runtoken::Origin::Checkpoint { .. })) {
            restored += 1;
        }
        // The killed host's agent comes back and removes its fenced copy.
        rig.start_agent(from)?;
        rig.delete(&vm).await?;
        let name = rig.hosts[from].name;
        let p = patience(format!("host {name} back"), limit);
        while !rig.alive(name).await? {
            p.wait().await?;
        }
    }
    let mut drain = Vec::new();
    for run in 0..runs {
        let vms: Vec<String> = (0..drain_vms).map(|i| format!("dr-{run}-{i}")).collect();
        for vm in &vms {
            rig.create(vm, false).await?;
        }
        for vm in &vms {
            let p = patience(format!("VM {vm} running"), Duration::from_secs(60));
            loop {
                if let Some(h) = rig.token_host(vm).await? {
                    if heartbeat(&rig.hosts[rig.index(&h)].runtime, vm)
                        .await
                        .is_some()
                    {
                        break;
                    }
                }
                p.wait().await?;
            }
        }
        let host = rig.token_host(&vms[0]).await?.unwrap_or_default();
        let mut held = 0;
        for vm in &vms {
            held += usize::from(rig.token_host(vm).await?.as_deref() == Some(host.as_str()));
        }
        let t = Instant::now();
        rig.set_drain(&host, true).await?;
        let p = patience(format!("host {host} drained"), limit);
        'drained: loop {
            for vm in &vms {
                if rig.token_host(vm).await?.as_deref() == Some(host.as_str()) {
                    p.wait().await?;
                    continue 'drained;
                }
            }
            break;
        }
        drain.push(t.elapsed().as_secs_f64() * 1000.0 / held as f64);
        rig.set_drain(&host, false).await?;
        for vm in &vms {
            rig.delete(vm).await?;
        }
    }
    let checkpoint = paused.lock().map(|v| v.clone()).unwrap_or_default();
    Ok(Figures {
        failover,
        restored,
        drain,
        checkpoint,
    })
}
