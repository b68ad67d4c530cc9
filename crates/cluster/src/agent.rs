//! The host agent's core: its lease, its registration, its status, its VMs and the
//! self-fence. Starting and stopping VMMs is the caller's (`ray agent` uses the `ray vm run`
//! launch code), behind [`Vmms`]; this module decides *when*.
//!
//! ```text
//! start:  reuse the lease of the previous run (state file) or grant one; write `alive`
//!         under it; scan the host's VMMs (adopt: a VMM outlives its agent); list own
//!         prefix; reconcile; watch own prefix from the listing's revision + 1
//! keeper: renew the lease every `renew_every` (retry every `retry_every` on failure), in a
//!         task of its own so that no event of the loop can delay it (`lease`)
//!         good renewal      -> renew every VMM's local lease to t0 + T - m (one call each)
//! loop:   assignment put    -> confirm the run token, then start (or adopt) the VM
//!         assignment delete -> stop the VM
//!         local deadline passed (t0 + T - m, t0 = send time of the last good renewal)
//!                           -> fence: pause every VM of the cluster on this host; each
//!                              VMM also pauses itself then (its local lease ran out)
//!         renewal good again, or a new lease after the old one lapsed
//!                           -> each fenced VM: confirm -> resume, refused -> stop
//!         status            -> written when it changes (and load at most once a minute)
//!         incoming put      -> start a receiver, report its address (`crate::migration`)
//!         outgoing put      -> send the VM to that address; delete -> cancel
//!         while either runs -> report progress when the phase or pass changes
//!         assignment put with origin Migration -> confirm, then adopt the arrived VM
//!         checkpoint tick   -> each HA VM here: hold its run token, checkpoint it (paused a
//!                              moment) into <dir>/<vm>/e<epoch>/, verified, then write
//!                              `observed` under the token's revision; refused: delete it
//! ```
//!
//! Every write the agent makes about a VM (its checkpoint, a migration's progress) goes
//! through [`runtoken::Held`]: it lands only while the token still names this host at the
//! agent's epoch (a receiver: while the controller's request stands) and its lease lives.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::keys;

mod lease;
use crate::migration::{self, Incoming, Outgoing, Phase, Progress};
use crate::runtoken::{self, Assignment, Origin, TokenError};
use crate::store::{Event, Kv, LeaseId, Revision, Store, StoreError, Txn, Watch};
use crate::timing::Timing;

/// Whether a migration's last report says it ended.
fn is_final(p: &Option<Progress>) -> bool {
    p.as_ref().is_some_and(|p| p.phase.is_final())
}

/// How often the agent looks at the migrations in flight on its host.
const MIGRATION_POLL: Duration = Duration::from_millis(250);

/// A VM of this host as its VMM reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalVm {
    pub id: String,
    /// The run-token epoch it was started with.
    pub epoch: u64,
    pub paused: bool,
    /// Paused by its own lease watchdog (its agent stopped renewing).
    pub fenced: bool,
}

/// A VMM's local lease: it runs its guest until `since + ttl` (same host, same clock),
/// then fences itself unless renewed. `since` is when the agent sent its last etcd
/// renewal that succeeded, `ttl` the local lease `T - m` ([`crate::timing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalLease {
    pub since: std::time::Instant,
    pub ttl: Duration,
}

/// What the agent asks of this host's VMMs. Blocking calls: the agent runs them off its
/// event loop.
pub trait Vmms: Send + Sync + 'static {
    /// VMs of the cluster whose VMM lives on this host now.
    fn scan(&self) -> Vec<LocalVm>;
    /// Starts `vm` as `assignment` says, with its spec (the JSON of `/ray/vms/<vm>/spec`)
    /// and its local lease.
    fn start(
        &self,
        vm: &str,
        spec: &[u8],
        assignment: &Assignment,
        lease: LocalLease,
    ) -> Result<(), String>;
    /// Renews `vm`'s local lease (after a good renewal of the agent's own).
    fn renew(&self, vm: &str, lease: LocalLease) -> Result<(), String>;
    /// Stops `vm`'s VMM (it is not this host's any more).
    fn stop(&self, vm: &str) -> Result<(), String>;
    /// Pauses every vCPU of `vm` (self-fence).
    fn pause(&self, vm: &str) -> Result<(), String>;
    /// Resumes `vm` after a fence.
    fn resume(&self, vm: &str) -> Result<(), String>;
    /// Starts a VMM that waits for `vm` to arrive by live migration; returns the address
    /// it listens on. (Hosts that cannot migrate keep the default: a refusal.)
    fn receive(&self, vm: &str, _spec: &[u8]) -> Result<String, String> {
        Err(format!(
            "this host cannot receive VM {vm}: it has no migration set-up"
        ))
    }
    /// Starts sending `vm` to the receiver at `addr`.
    fn send(&self, vm: &str, _addr: &str) -> Result<(), String> {
        Err(format!(
            "this host cannot send VM {vm}: it has no migration set-up"
        ))
    }
    /// Where the migration of `vm` (either direction) is; `host` is left to the caller.
    fn migration(&self, vm: &str) -> Result<Progress, String> {
        Err(format!("VM {vm} has no migration here"))
    }
    /// Cancels the outgoing migration of `vm` (a no-op past the switch-over).
    fn cancel(&self, vm: &str) -> Result<(), String> {
        Err(format!("VM {vm} has no migration here"))
    }
    /// Makes `vm`, arrived by migration, this host's at `epoch`.
    fn adopt(&self, vm: &str, _epoch: u64) -> Result<(), String> {
        Err(format!("VM {vm} did not arrive here by migration"))
    }
    /// Checkpoints `vm` into the new snapshot directory `path` (its vCPUs stopped for the
    /// write): full when `full`, else incremental on its previous checkpoint in the same
    /// store; returns once the snapshot is read back with every checksum matching.
    fn checkpoint(
        &self,
        vm: &str,
        _path: &std::path::Path,
        _full: bool,
    ) -> Result<Checkpoint, String> {
        Err(format!(
            "this host cannot checkpoint VM {vm}: it has no checkpoint set-up"
        ))
    }
}

/// A checkpoint a VMM wrote and read back.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Its directory (the snapshot path).
    pub path: PathBuf,
    /// A full snapshot (else incremental on the VM's previous one).
    pub full: bool,
    /// How long the vCPUs were stopped for it.
    pub paused_ms: f64,
}

/// Inventory of a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub cpus: u32,
    pub memory_mib: u64,
    /// NUMA nodes with memory (1 when the host does not say).
    pub numa_nodes: u32,
}

impl Inventory {
    /// This host's, from the kernel.
    pub fn read() -> Inventory {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kib| kib / 1024);
        let numa_nodes = std::fs::read_dir("/sys/devices/system/node")
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        let n = e.file_name();
                        let n = n.to_string_lossy();
                        n.starts_with("node") && n[4..].parse::<u32>().is_ok()
                    })
                    .count() as u32
            })
            .unwrap_or(0)
            .max(1);
        Inventory {
            cpus,
            memory_mib,
            numa_nodes,
        }
    }
}

/// `/ray/hosts/<host>/alive`: who holds the lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alive {
    pub pid: u32,
    /// The agent's TCP API, if it serves one.
    pub api: Option<String>,
}

/// `/ray/hosts/<host>/status`: written when it changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    pub inventory: Inventory,
    /// VMs running (or fenced) here, sorted.
    pub vms: Vec<String>,
    /// Whether the agent has fenced its VMs (its lease may have lapsed).
    pub fenced: bool,
    /// The rejoin request (`HostSpec::rejoin`) this report answers: written with a fresh
    /// inventory when the host's spec asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejoin: Option<u64>,
}

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub host: String,
    /// Holds the lease id between runs, so a restarted agent keeps its lease.
    pub state_dir: PathBuf,
    pub timing: Timing,
    pub api: Option<String>,
    /// Periodic checkpoints of the HA VMs it runs (`None`: none).
    pub checkpoints: Option<CheckpointConfig>,
    /// The CPUs the host offers the cluster, reported instead of the kernel's count
    /// (`None`: the kernel's).
    pub cpus: Option<u32>,
}

/// Where and how often the agent checkpoints its HA VMs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointConfig {
    /// A directory every host reaches (shared storage). A VM's checkpoints at run-token
    /// epoch E go to `<dir>/<vm>/e<E>/<vm>-<unix ms>`: a host that lost the VM writes only
    /// under its own, older epoch, never over the new holder's.
    pub dir: PathBuf,
    /// How often (not zero).
    pub every: Duration,
    /// Most links of a chain (a full checkpoint and its incrementals): the next one is
    /// full again, and once it is named in `observed` the older chain is deleted.
    pub chain: usize,
}

/// Milliseconds since the Unix epoch (the time a checkpoint was taken, compared across
/// hosts only to the second).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(String),
}

/// What the fence watchdog shares with the agent's loop: the watchdog must fire on time
/// even while the loop waits on a slow VMM start or a hung store request.
struct FenceState {
    /// When the VMs must be fenced unless a renewal succeeds first.
    deadline: Instant,
    fenced: bool,
    vms: Vec<String>,
}

type SharedFence = Arc<Mutex<FenceState>>;

fn lock(f: &SharedFence) -> MutexGuard<'_, FenceState> {
    f.lock().unwrap_or_else(|p| p.into_inner())
}

async fn pause_all<V: Vmms>(vmms: &Arc<V>, ids: Vec<String>) {
    tracing::warn!(
        vms = ids.len(),
        "lease deadline passed: fencing (pausing) every VM"
    );
    for id in ids {
        let (v, vm) = (Arc::clone(vmms), id.clone());
        match tokio::task::spawn_blocking(move || v.pause(&vm)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(vm = %id, "cannot pause: {e}"),
            Err(e) => tracing::warn!(vm = %id, "the pause call failed: {e}"),
        }
    }
}

/// Fences when the deadline passes, every `period`, until aborted.
/// The next event of `watch`, or never while there is none (the agent lists again).
async fn next_event<W: Watch>(watch: &mut Option<W>) -> Result<Event, StoreError> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

async fn watchdog<V: Vmms>(fence: SharedFence, vmms: Arc<V>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let ids = {
            let mut f = lock(&fence);
            if f.fenced || Instant::now() < f.deadline {
                continue;
            }
            f.fenced = true;
            f.vms.clone()
        };
        pause_all(&vmms, ids).await;
    }
}

/// What the agent's API shows of its lease: a view of the fence state the agent's loop
/// and watchdog share.
#[derive(Clone)]
pub struct LeaseProbe(SharedFence);

impl LeaseProbe {
    /// Whether the agent has fenced (paused) its VMs: its lease was not renewed in time.
    pub fn fenced(&self) -> bool {
        lock(&self.0).fenced
    }

    /// Time left before the agent fences its VMs unless a renewal succeeds first.
    pub fn fence_in(&self) -> Duration {
        lock(&self.0)
            .deadline
            .saturating_duration_since(Instant::now())
    }
}

/// Deletes a snapshot directory: renamed first, so a crash half-way leaves a `.del-`
/// directory and never a snapshot with half its files.
fn remove_snapshot(path: &std::path::Path) {
    let Some(name) = path.file_name() else {
        return;
    };
    let doomed = path.with_file_name(format!(".del-{}", name.to_string_lossy()));
    let gone = std::fs::rename(path, &doomed).and_then(|()| std::fs::remove_dir_all(&doomed));
    if let Err(e) = gone {
        tracing::warn!(path = %path.display(), "cannot delete a checkpoint: {e}");
    }
}

/// Deletes every checkpoint under `vm_dir` (`e<epoch>/<id>`) of epochs up to `epoch`
/// except `keep`.
fn prune(vm_dir: &std::path::Path, epoch: u64, keep: &std::path::Path) {
    let Ok(epochs) = std::fs::read_dir(vm_dir) else {
        return;
    };
    for e in epochs.flatten() {
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix('e'))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if n > epoch {
            continue;
        }
        let Ok(snaps) = std::fs::read_dir(e.path()) else {
            continue;
        };
        for snap in snaps.flatten() {
            if snap.path() != keep && !snap.file_name().to_string_lossy().starts_with('.') {
                remove_snapshot(&snap.path());
            }
        }
        if n < epoch {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// Aborts a task when dropped.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One agent. [`Agent::run`] drives it until the store fails for good.
pub struct Agent<S: Store, V: Vmms> {
    store: S,
    vmms: Arc<V>,
    cfg: AgentConfig,
    keeper: Arc<lease::Keeper>,
    fence: SharedFence,
    /// VMs of this host: id -> epoch.
    vms: BTreeMap<String, u64>,
    last_status: Vec<u8>,
    /// The host spec's rejoin request, answered in the status.
    rejoin: Option<u64>,
    /// Migrations in flight here, by VM: the last progress reported (`None`: none yet).
    receiving: BTreeMap<String, Option<Progress>>,
    sending: BTreeMap<String, Option<Progress>>,
    /// Whether each VM here is HA (read from its spec once).
    ha: BTreeMap<String, bool>,
}

fn lease_file(cfg: &AgentConfig) -> PathBuf {
    cfg.state_dir.join("lease")
}

/// A host's assignments from a listing of its `vms/` prefix.
fn assignments(kvs: &[Kv]) -> BTreeMap<String, Assignment> {
    kvs.iter()
        .filter_map(|kv| {
            let vm = kv.key.rsplit('/').next()?;
            match serde_json::from_slice::<Assignment>(&kv.value) {
                Ok(a) => Some((vm.to_string(), a)),
                Err(e) => {
                    tracing::warn!(key = %kv.key, "ignoring an invalid assignment: {e}");
                    None
                }
            }
        })
        .collect()
}

impl<S: Store + Clone, V: Vmms> Agent<S, V> {
    /// Registers the host: keeps the previous run's lease if it is still alive (VMs keep
    /// running through an agent restart), else takes a new one.
    pub async fn join(store: S, vmms: V, cfg: AgentConfig) -> Result<Self, AgentError> {
        keys::check_name("host", &cfg.host).map_err(AgentError::Config)?;
        cfg.timing
            .check()
            .map_err(|e| AgentError::Config(e.to_string()))?;
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
            AgentError::Config(format!("cannot create {}: {e}", cfg.state_dir.display()))
        })?;
        let sent = Instant::now();
        let previous = std::fs::read_to_string(lease_file(&cfg))
            .ok()
            .and_then(|s| s.trim().parse::<LeaseId>().ok());
        let lease = match previous {
            Some(id) if store.keep_alive(id).await.is_ok() => {
                tracing::info!(lease = id, "kept the lease of the previous run");
                id
            }
            _ => {
                let id = store.grant(cfg.timing.lease_ttl).await?;
                std::fs::write(lease_file(&cfg), id.to_string()).map_err(|e| {
                    AgentError::Config(format!("cannot write {}: {e}", lease_file(&cfg).display()))
                })?;
                id
            }
        };
        let agent = Agent {
            store,
            vmms: Arc::new(vmms),
            fence: Arc::new(Mutex::new(FenceState {
                deadline: sent + cfg.timing.local_lease(),
                fenced: false,
                vms: Vec::new(),
            })),
            cfg,
            keeper: lease::Keeper::new(lease),
            vms: BTreeMap::new(),
            last_status: Vec::new(),
            rejoin: None,
            receiving: BTreeMap::new(),
            sending: BTreeMap::new(),
            ha: BTreeMap::new(),
        };
        agent.register().await?;
        tracing::info!(host = %agent.cfg.host, lease, "registered");
        Ok(agent)
    }

    /// A view of the lease's state for the agent's API.
    pub fn lease_probe(&self) -> LeaseProbe {
        LeaseProbe(Arc::clone(&self.fence))
    }

    /// The agent's lease.
    pub fn lease(&self) -> LeaseId {
        self.keeper.lease()
    }

    async fn register(&self) -> Result<(), StoreError> {
        lease::register(&self.store, &self.cfg, self.keeper.lease()).await
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&V) -> T + Send + 'static) -> T {
        let vmms = Arc::clone(&self.vmms);
        match tokio::task::spawn_blocking(move || f(&vmms)).await {
            Ok(t) => t,
            // The closure panicked; with panic = abort this is unreachable.
            Err(e) => panic!("a VMM call failed: {e}"),
        }
    }

    fn fenced(&self) -> bool {
        lock(&self.fence).fenced
    }

    /// The local lease of the last good renewal; `None` once it ran out (fenced).
    fn local_lease(&self) -> Option<LocalLease> {
        lease::local_lease(&self.fence, &self.cfg)
    }

    /// Renews every VMM's local lease (the keeper does after each good renewal).
    async fn renew_vmms(&self) {
        lease::renew_vmms(&self.vmms, &self.fence, &self.cfg).await;
    }

    fn set_vms(&mut self, vms: BTreeMap<String, u64>) {
        lock(&self.fence).vms = vms.keys().cloned().collect();
        self.vms = vms;
    }

    fn add_vm(&mut self, vm: &str, epoch: u64) {
        let mut vms = std::mem::take(&mut self.vms);
        vms.insert(vm.to_string(), epoch);
        self.set_vms(vms);
    }

    fn remove_vm(&mut self, vm: &str) {
        let mut vms = std::mem::take(&mut self.vms);
        vms.remove(vm);
        self.set_vms(vms);
        self.ha.remove(vm);
    }

    /// Writes the status if it changed since the last write.
    async fn report(&mut self) -> Result<(), StoreError> {
        let inventory = Inventory::read();
        let report = HostReport {
            inventory: Inventory {
                cpus: self.cfg.cpus.unwrap_or(inventory.cpus),
                ..inventory
            },
            vms: self.vms.keys().cloned().collect(),
            fenced: self.fenced(),
            rejoin: self.rejoin,
        };
        let value = serde_json::to_vec(&report).unwrap_or_default();
        if value != self.last_status {
            self.store
                .commit(Txn::new().put(keys::host_status(&self.cfg.host), value.clone()))
                .await?;
            self.last_status = value;
        }
        Ok(())
    }

    /// Makes this host run exactly what its assignments say, adopting running VMMs; returns
    /// the revision to watch from.
    async fn reconcile(&mut self) -> Result<Revision, StoreError> {
        let listing = self.store.list(&keys::host_vms(&self.cfg.host)).await?;
        let assigned = assignments(&listing.kvs);
        let local = self.blocking(|v| v.scan()).await;
        self.set_vms(local.iter().map(|l| (l.id.clone(), l.epoch)).collect());
        for l in &local {
            if assigned.get(&l.id).is_some_and(|a| a.epoch == l.epoch) {
                tracing::info!(vm = %l.id, epoch = l.epoch, "adopted a running VMM");
                if l.fenced {
                    // Fenced while no agent renewed its lease (this one's predecessor
                    // died): it runs again if the run token is still this host's.
                    self.resume_if_ours(&l.id, l.epoch).await?;
                }
                continue;
            }
            self.stop_vm(&l.id, "it is not assigned to this host at that epoch")
                .await;
        }
        for (vm, a) in assigned {
            if !self.vms.contains_key(&vm) {
                self.start_vm(&vm, a).await?;
            }
        }
        Ok(listing.revision)
    }

    async fn start_vm(&mut self, vm: &str, a: Assignment) -> Result<(), StoreError> {
        if self.fenced() {
            tracing::warn!(
                vm,
                "not starting while fenced; the reconcile after the fence will"
            );
            return Ok(());
        }
        match runtoken::confirm(&self.store, vm, &self.cfg.host, a.epoch).await {
            Ok(_) => {}
            Err(TokenError::Store(e)) => return Err(e),
            Err(e) => {
                tracing::warn!(vm, "not starting: {e}");
                return Ok(());
            }
        }
        if let Origin::Migration { from } = &a.origin {
            // The VMM is here already (it received the VM): it becomes this host's.
            let (id, epoch, from) = (vm.to_string(), a.epoch, from.clone());
            let lease = self.local_lease();
            let adopted = self.blocking(move |v| {
                v.adopt(&id, epoch)?;
                // It arrived without a local lease: it gets this host's at once.
                if let Some(Err(e)) = lease.map(|l| v.renew(&id, l)) {
                    tracing::warn!(vm = %id, "cannot give the arrived VM its local lease: {e}");
                }
                Ok::<(), String>(())
            });
            match adopted.await {
                Ok(()) => {
                    tracing::info!(vm, epoch, from, "adopted the VM that arrived by migration");
                    self.receiving.remove(vm);
                    self.add_vm(vm, epoch);
                }
                Err(e) => tracing::warn!(vm, "cannot adopt the migrated VM: {e}"),
            }
            return Ok(());
        }
        let Some(lease) = self.local_lease() else {
            tracing::warn!(vm, "not starting: the local lease ran out");
            return Ok(());
        };
        let spec = self.spec(vm).await?;
        let (id, epoch) = (vm.to_string(), a.epoch);
        match self.blocking(move |v| v.start(&id, &spec, &a, lease)).await {
            Ok(()) => {
                tracing::info!(vm, epoch, "started");
                self.add_vm(vm, epoch);
            }
            Err(e) => tracing::warn!(vm, "cannot start: {e}"),
        }
        Ok(())
    }

    async fn spec(&self, vm: &str) -> Result<Vec<u8>, StoreError> {
        Ok(self
            .store
            .get(&keys::vm_spec(vm))
            .await?
            .map(|kv| kv.value)
            .unwrap_or_default())
    }

    /// Writes one side's migration report, only while this host still has a say: the
    /// sender while the run token names it at `epoch`, the receiver (`epoch` None) while
    /// the controller's request stands. A late report is refused, logged, and dropped.
    async fn report_migration(
        &self,
        vm: &str,
        epoch: Option<u64>,
        p: &Progress,
    ) -> Result<(), StoreError> {
        let host = &self.cfg.host;
        let (held, key) = match epoch {
            Some(e) => (
                runtoken::hold(&self.store, vm, host, e).await,
                keys::sender(vm),
            ),
            None => (
                runtoken::hold_incoming(&self.store, vm, host).await,
                keys::receiver(vm),
            ),
        };
        let written = match held {
            Ok(h) => h.put(&self.store, key, migration::json(p)).await.map(drop),
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => Ok(()),
            Err(TokenError::Store(e)) => Err(e),
            Err(e) => {
                tracing::warn!(vm, "migration report not written: {e}");
                Ok(())
            }
        }
    }

    /// The controller asks for a receiver for `vm`.
    async fn on_incoming(&mut self, vm: &str, inc: Incoming) -> Result<(), StoreError> {
        if self.receiving.get(vm).is_some_and(|p| !is_final(p)) || self.vms.contains_key(vm) {
            return Ok(());
        }
        let spec = self.spec(vm).await?;
        let id = vm.to_string();
        let mut p = Progress::new(&self.cfg.host, Phase::Waiting);
        match self.blocking(move |v| v.receive(&id, &spec)).await {
            Ok(addr) => {
                tracing::info!(vm, from = %inc.from, addr, "waiting for the VM");
                p.addr = Some(addr);
            }
            Err(e) => {
                tracing::warn!(vm, "cannot receive: {e}");
                p.phase = Phase::Failed;
                p.error = Some(e);
            }
        }
        self.report_migration(vm, None, &p).await?;
        self.receiving.insert(vm.to_string(), Some(p));
        Ok(())
    }

    /// The controller asks to send `vm` to a waiting receiver.
    async fn on_outgoing(&mut self, vm: &str, out: Outgoing) -> Result<(), StoreError> {
        if self.sending.get(vm).is_some_and(|p| !is_final(p)) {
            return Ok(());
        }
        let result = match self.vms.get(vm) {
            Some(&e) if e == out.epoch && !self.fenced() => {
                let (id, addr) = (vm.to_string(), out.addr.clone());
                self.blocking(move |v| v.send(&id, &addr)).await
            }
            _ => Err(format!(
                "VM {vm} does not run on host {} at epoch {} (or the host is fenced)",
                self.cfg.host, out.epoch
            )),
        };
        match result {
            Ok(()) => {
                tracing::info!(vm, to = %out.to, addr = %out.addr, "sending the VM");
                self.sending.insert(vm.to_string(), None);
            }
            Err(e) => {
                tracing::warn!(vm, "cannot send: {e}");
                let mut p = Progress::new(&self.cfg.host, Phase::Failed);
                p.error = Some(e);
                self.report_migration(vm, Some(out.epoch), &p).await?;
                self.sending.insert(vm.to_string(), Some(p));
            }
        }
        Ok(())
    }

    /// Reports the progress of every migration in flight here that changed.
    async fn poll_migrations(&mut self) -> Result<(), StoreError> {
        for receiving in [true, false] {
            let map = if receiving {
                &self.receiving
            } else {
                &self.sending
            };
            let open: Vec<(String, Option<Progress>)> = map
                .iter()
                .filter(|(_, p)| !is_final(p))
                .map(|(k, p)| (k.clone(), p.clone()))
                .collect();
            for (vm, last) in open {
                let id = vm.clone();
                let mut p = match self.blocking(move |v| v.migration(&id)).await {
                    Ok(p) => p,
                    Err(e) => {
                        let mut p = Progress::new(&self.cfg.host, Phase::Failed);
                        p.error = Some(e);
                        p
                    }
                };
                p.host = self.cfg.host.clone();
                if receiving && p.addr.is_none() {
                    p.addr = last.as_ref().and_then(|l| l.addr.clone());
                }
                if last.as_ref().is_some_and(|l| !l.differs(&p)) {
                    continue;
                }
                let epoch = if receiving {
                    None
                } else {
                    match self.vms.get(&vm) {
                        Some(&e) => Some(e),
                        None => {
                            tracing::info!(vm, "not reporting: the VM is not this host's now");
                            self.sending.insert(vm, Some(p));
                            continue;
                        }
                    }
                };
                self.report_migration(&vm, epoch, &p).await?;
                let map = if receiving {
                    &mut self.receiving
                } else {
                    &mut self.sending
                };
                map.insert(vm, Some(p));
            }
        }
        Ok(())
    }

    fn migrating(&self) -> bool {
        let open = |m: &BTreeMap<String, Option<Progress>>| m.values().any(|p| !is_final(p));
        open(&self.receiving) || open(&self.sending)
    }

    async fn stop_vm(&mut self, vm: &str, why: &str) {
        let id = vm.to_string();
        if let Err(e) = self.blocking(move |v| v.stop(&id)).await {
            tracing::warn!(vm, "cannot stop: {e}");
        }
        tracing::info!(vm, "stopped: {why}");
        self.remove_vm(vm);
    }

    /// Whether `vm` opted into HA (its spec names a restart priority); read once.
    async fn is_ha(&mut self, vm: &str) -> Result<bool, StoreError> {
        if let Some(&ha) = self.ha.get(vm) {
            return Ok(ha);
        }
        let spec = self.spec(vm).await?;
        let ha = crate::spec::VmSpec::parse(&spec).is_ok_and(|s| s.restart_priority.is_some());
        self.ha.insert(vm.to_string(), ha);
        Ok(ha)
    }

    /// The HA VMs running here to checkpoint now (not fenced, not migrating), with their
    /// epochs.
    async fn checkpoint_round(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut round = Vec::new();
        if self.fenced() {
            return Ok(round);
        }
        let vms: Vec<(String, u64)> = self.vms.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for (vm, epoch) in vms {
            let migrating = self.sending.get(&vm).is_some_and(|p| !is_final(p))
                || self.receiving.get(&vm).is_some_and(|p| !is_final(p));
            if !migrating && self.is_ha(&vm).await? {
                round.push((vm, epoch));
            }
        }
        Ok(round)
    }

    /// After a good renewal: each fenced VM gets its local lease back and resumes if this
    /// host still holds its token, else it stops; then everything is reconciled again.
    async fn unfence(&mut self) -> Result<Revision, StoreError> {
        lock(&self.fence).fenced = false;
        let vms: Vec<(String, u64)> = self.vms.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for (vm, epoch) in vms {
            self.resume_if_ours(&vm, epoch).await?;
        }
        self.reconcile().await
    }

    /// A fenced VM: confirms its run token; if this host still holds it at `epoch`, the
    /// VMM gets its local lease back and resumes, else it stops.
    async fn resume_if_ours(&mut self, vm: &str, epoch: u64) -> Result<(), StoreError> {
        match runtoken::confirm(&self.store, vm, &self.cfg.host, epoch).await {
            Ok(_) => {
                let Some(lease) = self.local_lease() else {
                    tracing::warn!(vm, "not resumed: the local lease ran out again");
                    return Ok(());
                };
                let id = vm.to_string();
                let resumed = self.blocking(move |v| {
                    v.renew(&id, lease)?;
                    v.resume(&id)
                });
                match resumed.await {
                    Ok(()) => tracing::info!(vm, epoch, "resumed after the fence"),
                    Err(e) => tracing::warn!(vm, "cannot resume: {e}"),
                }
            }
            Err(TokenError::Store(e)) => return Err(e),
            Err(e) => self.stop_vm(vm, &e.to_string()).await,
        }
        Ok(())
    }

    /// Runs the agent: reconcile, then follow the store and keep the lease.
    pub async fn run(mut self) -> Result<(), AgentError> {
        let timing = self.cfg.timing;
        let _watchdog = AbortOnDrop(tokio::spawn(watchdog(
            Arc::clone(&self.fence),
            Arc::clone(&self.vmms),
            timing.watchdog_period,
        )));
        let _keeper = AbortOnDrop(tokio::spawn(lease::keep(
            self.store.clone(),
            Arc::clone(&self.vmms),
            Arc::clone(&self.fence),
            self.cfg.clone(),
            Arc::clone(&self.keeper),
        )));
        let revision = self.reconcile().await?;
        self.rejoin = self
            .store
            .get(&keys::host_spec(&self.cfg.host))
            .await?
            .and_then(|kv| crate::spec::HostSpec::parse(Some(&kv.value)).ok())
            .and_then(|s| s.rejoin);
        // Adopted VMMs get this run's lease at once (the last one's may be nearly out).
        self.renew_vmms().await;
        self.report().await?;
        let mut watch = Some(
            self.store
                .watch(&keys::host(&self.cfg.host), revision + 1)
                .await?,
        );
        let mut progress = tokio::time::interval(MIGRATION_POLL);
        let every = self
            .cfg
            .checkpoints
            .as_ref()
            .map_or(Duration::from_secs(3600), |c| c.every);
        let mut checkpoints = tokio::time::interval_at(Instant::now() + every, every);
        checkpoints.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (checkpointer, _checkpoint_task) = match self.cfg.checkpoints.clone() {
            Some(cfg) => {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let task = Checkpointer {
                    store: self.store.clone(),
                    vmms: Arc::clone(&self.vmms),
                    host: self.cfg.host.clone(),
                    cfg,
                    fence: Arc::clone(&self.fence),
                    chains: BTreeMap::new(),
                };
                (Some(tx), Some(AbortOnDrop(tokio::spawn(task.run(rx)))))
            }
            None => (None, None),
        };
        // From here on a store failure (a member of the etcd cluster dying, an election)
        // ends nothing: the watch is dropped and the agent lists again once the store
        // answers, renewing its lease meanwhile; if it cannot renew, the fence acts.
        loop {
            tokio::select! {
                _ = checkpoints.tick(), if checkpointer.is_some() => {
                    match self.checkpoint_round().await {
                        Ok(round) if round.is_empty() => {}
                        Ok(round) => {
                            if let Some(tx) = &checkpointer {
                                // Busy with the last round: skip this one.
                                let _ = tx.try_send(round);
                            }
                        }
                        Err(e) => tracing::warn!("cannot checkpoint: {e}"),
                    }
                }
                _ = progress.tick(), if self.migrating() => {
                    if let Err(e) = self.poll_migrations().await {
                        tracing::warn!("cannot report a migration's progress: {e}");
                    }
                }
                ev = next_event(&mut watch) => {
                    let handled = match ev {
                        Ok(ev) => self.on_event(ev).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = handled {
                        // Whatever changed meanwhile is in a fresh listing.
                        tracing::warn!("{e}; listing again");
                        watch = self.relist().await;
                    }
                },
                _ = tokio::time::sleep(timing.retry_every), if watch.is_none() => {
                    watch = self.relist().await;
                }
                _ = self.keeper.renewed.notified() => {
                    if self.keeper.good() && self.fenced() {
                        // Each VMM gets a lease again only once its run token is
                        // confirmed (`unfence`).
                        watch = match self.unfence().await {
                            Ok(revision) => self.watch_from(revision).await,
                            Err(e) => {
                                // Fenced again, whole: the next good renewal tries
                                // again.
                                tracing::warn!("cannot unfence: {e}");
                                self.refence().await;
                                None
                            }
                        };
                    }
                    if let Err(e) = self.report().await {
                        tracing::warn!("cannot write the host status: {e}");
                    }
                }
            }
        }
    }

    /// Reconciles with a fresh listing and watches from there; `None` (logged) if the
    /// store fails meanwhile: the caller tries again later.
    async fn relist(&mut self) -> Option<<S as Store>::Watch> {
        match self.reconcile().await {
            Ok(revision) => self.watch_from(revision).await,
            Err(e) => {
                tracing::warn!("cannot list this host's keys: {e}; trying again");
                None
            }
        }
    }

    /// Watches this host's keys after `revision`; `None` (logged) if the store fails.
    async fn watch_from(&self, revision: Revision) -> Option<<S as Store>::Watch> {
        match self
            .store
            .watch(&keys::host(&self.cfg.host), revision + 1)
            .await
        {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("cannot watch this host's keys: {e}; trying again");
                None
            }
        }
    }

    /// Marks the host fenced and pauses its VMs (an unfence that failed half-way).
    async fn refence(&mut self) {
        let ids = {
            let mut f = lock(&self.fence);
            f.fenced = true;
            f.vms.clone()
        };
        pause_all(&self.vmms, ids).await;
    }

    async fn on_event(&mut self, ev: Event) -> Result<(), StoreError> {
        let Some((_, rest)) = keys::split_host_key(ev.key()) else {
            return Ok(());
        };
        if let Some(vm) = rest.strip_prefix("incoming/") {
            let vm = vm.to_string();
            match ev {
                Event::Put(kv) => match serde_json::from_slice::<Incoming>(&kv.value) {
                    Ok(inc) => self.on_incoming(&vm, inc).await?,
                    Err(e) => tracing::warn!(vm, "ignoring an invalid incoming key: {e}"),
                },
                Event::Delete { .. } => {
                    // Ended without the VM here: the receiver's copy goes. One that
                    // reported the VM running here stays (the token decides about it).
                    let last = self.receiving.remove(&vm);
                    let arrived = last
                        .as_ref()
                        .is_some_and(|p| p.as_ref().is_some_and(|p| p.phase == Phase::Done));
                    if last.is_some() && !arrived && !self.vms.contains_key(&vm) {
                        let id = vm.clone();
                        if let Err(e) = self.blocking(move |v| v.stop(&id)).await {
                            tracing::info!(vm, "the receiver is gone already: {e}");
                        }
                    }
                }
            }
            return Ok(());
        }
        if let Some(vm) = rest.strip_prefix("outgoing/") {
            let vm = vm.to_string();
            match ev {
                Event::Put(kv) => match serde_json::from_slice::<Outgoing>(&kv.value) {
                    Ok(out) => self.on_outgoing(&vm, out).await?,
                    Err(e) => tracing::warn!(vm, "ignoring an invalid outgoing key: {e}"),
                },
                Event::Delete { .. } => {
                    if self.sending.get(&vm).is_some_and(|p| !is_final(p)) {
                        // Aborted: cancel, and keep reporting until the source says
                        // how it ended (rolled back, or past the switch-over).
                        let id = vm.clone();
                        match self.blocking(move |v| v.cancel(&id)).await {
                            Ok(()) => tracing::info!(vm, "migration cancelled"),
                            Err(e) => tracing::warn!(vm, "cannot cancel: {e}"),
                        }
                    } else {
                        self.sending.remove(&vm);
                    }
                }
            }
            return Ok(());
        }
        if rest == "spec" {
            // A rejoin request: the status is written again, inventory read afresh.
            if let Event::Put(kv) = &ev {
                self.rejoin = crate::spec::HostSpec::parse(Some(&kv.value))
                    .ok()
                    .and_then(|s| s.rejoin);
            }
            return self.report().await;
        }
        let Some(vm) = rest.strip_prefix("vms/") else {
            return Ok(());
        };
        let vm = vm.to_string();
        match ev {
            Event::Put(kv) => match serde_json::from_slice::<Assignment>(&kv.value) {
                Ok(a) if self.vms.get(&vm) != Some(&a.epoch) => {
                    if self.vms.contains_key(&vm) {
                        self.stop_vm(&vm, "assigned again at a new epoch").await;
                    }
                    self.start_vm(&vm, a).await?;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(vm, "ignoring an invalid assignment: {e}"),
            },
            Event::Delete { .. } => {
                if self.vms.contains_key(&vm) {
                    self.stop_vm(&vm, "its assignment was removed").await;
                }
            }
        }
        self.report().await
    }
}

/// The agent's checkpoint task: takes the rounds the agent's loop hands it, one at a time,
/// so a slow checkpoint (a large VM, slow shared storage) never holds up a lease renewal.
/// A round that comes while one is under way is skipped (the next tick brings another).
struct Checkpointer<S: Store, V: Vmms> {
    store: S,
    vmms: Arc<V>,
    host: String,
    cfg: CheckpointConfig,
    fence: SharedFence,
    /// Each HA VM's current checkpoint chain, oldest first, with the epoch it is of.
    chains: BTreeMap<String, (u64, Vec<PathBuf>)>,
}

impl<S: Store, V: Vmms> Checkpointer<S, V> {
    async fn run(mut self, mut rounds: tokio::sync::mpsc::Receiver<Vec<(String, u64)>>) {
        while let Some(round) = rounds.recv().await {
            // A VM gone from the round (stopped, moved, migrating) starts a new chain
            // when it is back.
            self.chains
                .retain(|vm, (epoch, _)| round.contains(&(vm.clone(), *epoch)));
            for (vm, epoch) in round {
                if lock(&self.fence).fenced {
                    break;
                }
                if let Err(e) = self.checkpoint_vm(&vm, epoch).await {
                    tracing::warn!(vm, "cannot checkpoint: {e}");
                }
            }
        }
    }

    /// One checkpoint of `vm`, held at `epoch`: nothing is written (not even files) unless
    /// the run token names this host at that epoch; `observed` names the checkpoint only
    /// after the VMM wrote and verified it, in a transaction conditioned on the token's
    /// revision read before. Refused there (the VM moved meanwhile): the files go again.
    async fn checkpoint_vm(&mut self, vm: &str, epoch: u64) -> Result<(), StoreError> {
        let cfg = self.cfg.clone();
        let held = match runtoken::hold(&self.store, vm, &self.host, epoch).await {
            Ok(h) => h,
            Err(TokenError::Store(e)) => return Err(e),
            Err(e) => {
                tracing::warn!(vm, "no checkpoint: {e}");
                return Ok(());
            }
        };
        let links = self
            .chains
            .get(vm)
            .filter(|(e, _)| *e == epoch)
            .map_or(0, |(_, c)| c.len());
        let full = links == 0 || links >= cfg.chain;
        let taken_at_ms = unix_ms();
        let epoch_dir = cfg.dir.join(vm).join(format!("e{epoch}"));
        let path = epoch_dir.join(format!("{vm}-{taken_at_ms}"));
        let (id, p) = (vm.to_string(), path.clone());
        let vmms = Arc::clone(&self.vmms);
        let made = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(p.parent().unwrap_or(&p))
                .map_err(|e| format!("cannot create {}: {e}", p.display()))?;
            vmms.checkpoint(&id, &p, full)
        })
        .await
        .unwrap_or_else(|e| Err(format!("the checkpoint call failed: {e}")));
        let ck = match made {
            Ok(ck) => ck,
            Err(e) => {
                tracing::warn!(vm, "checkpoint failed: {e}");
                return Ok(());
            }
        };
        let observed = crate::controller::Observed {
            checkpoint: Some(ck.path.display().to_string()),
            taken_at_ms: Some(taken_at_ms),
            host: Some(self.host.clone()),
            epoch: Some(epoch),
            paused_ms: Some(ck.paused_ms),
        };
        let value = serde_json::to_vec(&observed).unwrap_or_default();
        match held.put(&self.store, keys::vm_observed(vm), value).await {
            Ok(_) => {}
            Err(TokenError::Store(e)) => return Err(e),
            Err(e) => {
                tracing::warn!(
                    vm,
                    "{e}; deleting the checkpoint written at {}",
                    ck.path.display()
                );
                remove_snapshot(&ck.path);
                self.chains.remove(vm);
                return Ok(());
            }
        }
        tracing::info!(
            vm,
            epoch,
            path = %ck.path.display(),
            full = ck.full,
            paused_ms = ck.paused_ms,
            "checkpoint taken"
        );
        let chain = self
            .chains
            .entry(vm.to_string())
            .or_insert_with(|| (epoch, Vec::new()));
        if !ck.full {
            chain.1.push(ck.path);
            return Ok(());
        }
        // A new chain is named: every other checkpoint of this VM up to this epoch goes
        // (the holder of a later epoch writes only under its own directory).
        *chain = (epoch, vec![ck.path.clone()]);
        prune(&cfg.dir.join(vm), epoch, &ck.path);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
