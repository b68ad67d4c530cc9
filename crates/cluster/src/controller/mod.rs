//! The controller: turns desired VMs into run tokens on hosts.
//!
//! ```text
//! campaign ──won──▶ recover: finish or undo every operation a predecessor recorded
//!    ▲                 │
//!    │                 ▼
//!    │     ┌──▶ read the world (two listings) ─▶ plan::decide ─▶ apply each action:
//!    │     │        record /ray/ops/<op> ─▶ act (run-token transaction) ─▶ log ─▶ delete op
//!    │     └── a change under /ray/hosts/ or /ray/vms/, or every `resync`
//!    └──── lost the lead (lease ended, or a write failed the leader fence)
//! ```
//!
//! Agents act on what the controller writes: an assignment appears under their host, they
//! confirm the run token and start the VMM. Every write goes through [`leader::Led`], so
//! a controller that lost the lead cannot change anything. Operations are recorded before
//! they act and are idempotent, so whatever a controller that died mid-way left behind,
//! its successor finishes (the token is there: log it) or undoes (it is not: the VM is
//! simply decided again).
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::agent::{AbortOnDrop, HostReport};
use crate::decisions::{self, Entry, Kind};
use crate::keys;
use crate::runtoken::{self, Origin, RunToken, TokenError, Transfer};
use crate::spec::{HostSpec, VmSpec};
use crate::store::{Commit, Store, StoreError, Txn, Watch};
use crate::timing::Timing;

pub mod drain;
pub mod leader;
mod migrate;
pub mod plan;
pub mod rebalance;
pub mod rejoin;

pub use plan::{decide, Action, HostView, MigrationView, PlanConfig, VmView, World};

/// How a controller runs.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Its name in the leader key and the log.
    pub id: String,
    /// The leader lease's time to live: how long the cluster waits for a dead leader.
    pub leader_ttl: Duration,
    /// How often the leader renews it.
    pub renew_every: Duration,
    /// How often a standby looks whether the leader is gone.
    pub poll: Duration,
    /// A full pass even when nothing changed (a missed event costs at most this).
    pub resync: Duration,
    pub plan: PlanConfig,
    /// The cluster's lease timing (the same on every agent): gives the HA restart's
    /// grace, checked at start-up to exceed what the self-fence needs.
    pub timing: Timing,
    /// Rebalancing recommendations (logged, not carried out); `None`: off.
    pub rebalance: Option<rebalance::RebalanceConfig>,
}

impl ControllerConfig {
    pub fn new(id: String) -> ControllerConfig {
        ControllerConfig {
            id,
            leader_ttl: Duration::from_secs(5),
            renew_every: Duration::from_secs(1),
            poll: Duration::from_millis(500),
            resync: Duration::from_secs(10),
            plan: PlanConfig::default(),
            timing: Timing::default(),
            rebalance: Some(rebalance::RebalanceConfig::default()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("this controller lost the lead: {0}")]
    LostLead(String),
    #[error("the cluster's timing is refused: {0}")]
    Timing(#[from] crate::timing::TimingError),
}

/// Placements recorded, logged and cleared per transaction (etcd allows 128 operations
/// in one; a chunk's log entries take two each: the compare and the put).
const BATCH: usize = 32;

/// An operation recorded under `/ray/ops/<kind>-<vm>` before it acts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Operation {
    /// Give `vm` its first token on `host`.
    Place { vm: String, host: String },
    /// Take `vm`'s token (on `host`) away: deleted, or evicted.
    Release { vm: String, host: String },
    /// HA restart: move `vm`'s token from `from` (lease lapsed) to `to`.
    FailOver {
        vm: String,
        from: String,
        to: String,
    },
    /// Live-migrate `vm` (run token at `epoch` on `from`) to `to`; carried on by every
    /// pass, not by recovery (`migrate.rs`).
    Migrate {
        vm: String,
        from: String,
        to: String,
        epoch: u64,
    },
}

impl Operation {
    fn key(&self) -> String {
        match self {
            Operation::Place { vm, .. } => keys::op(&format!("place-{vm}")),
            Operation::Release { vm, .. } => keys::op(&format!("release-{vm}")),
            Operation::Migrate { vm, .. } => keys::op(&format!("migrate-{vm}")),
            Operation::FailOver { vm, .. } => keys::op(&format!("failover-{vm}")),
        }
    }
}

/// Reads the world in two listings: hosts, then VMs.
pub async fn read_world<S: Store>(s: &S) -> Result<World, StoreError> {
    let hosts = s.list(keys::HOSTS).await?;
    let mut hv: BTreeMap<String, HostView> = BTreeMap::new();
    for kv in &hosts.kvs {
        let Some((host, rest)) = keys::split_host_key(&kv.key) else {
            continue;
        };
        let h = hv.entry(host.to_string()).or_insert_with(|| HostView {
            name: host.to_string(),
            alive: false,
            report: None,
            spec: HostSpec::default(),
        });
        match rest {
            "alive" => h.alive = true,
            "status" => h.report = serde_json::from_slice::<HostReport>(&kv.value).ok(),
            "spec" => match HostSpec::parse(Some(&kv.value)) {
                Ok(spec) => h.spec = spec,
                Err(e) => tracing::warn!(host, "ignoring the host's spec: {e}"),
            },
            _ => {}
        }
    }
    let vms = s.list(keys::VMS).await?;
    let mut vv: BTreeMap<String, VmView> = BTreeMap::new();
    let mut migrations: BTreeMap<String, MigrationView> = BTreeMap::new();
    for kv in &vms.kvs {
        let Some((vm, what)) = keys::split_vm_key(&kv.key) else {
            continue;
        };
        let v = vv.entry(vm.to_string()).or_insert_with(|| VmView {
            name: vm.to_string(),
            spec: None,
            token: None,
            checkpoint: None,
        });
        match what {
            "spec" => v.spec = Some(VmSpec::parse(&kv.value)),
            "token" => v.token = serde_json::from_slice::<RunToken>(&kv.value).ok(),
            "observed" => {
                v.checkpoint = serde_json::from_slice::<Observed>(&kv.value)
                    .ok()
                    .and_then(|o| o.checkpoint)
            }
            "migrate" => match serde_json::from_slice(&kv.value) {
                Ok(r) => migrations.entry(vm.to_string()).or_default().request = Some(r),
                Err(e) => tracing::warn!(vm, "ignoring a migration request: {e}"),
            },
            "receiver" => {
                migrations.entry(vm.to_string()).or_default().receiver =
                    serde_json::from_slice(&kv.value).ok()
            }
            "sender" => {
                migrations.entry(vm.to_string()).or_default().sender =
                    serde_json::from_slice(&kv.value).ok()
            }
            _ => {}
        }
    }
    Ok(World {
        hosts: hv.into_values().collect(),
        vms: vv.into_values().collect(),
        migrations,
        lapsed: Default::default(),
    })
}

/// `/ray/vms/<vm>/observed`: what is known of a VM beyond its host. `checkpoint` is its
/// latest checkpoint on storage every host reaches; an HA restart resumes from it. The
/// agent writes it only while it holds the VM's run token at `epoch`
/// ([`crate::runtoken::Held`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// When it was taken (Unix ms, the taking host's clock).
    #[serde(default)]
    pub taken_at_ms: Option<u64>,
    /// Who took it, at which run-token epoch.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub epoch: Option<u64>,
    /// How long the VM's vCPUs were stopped for it.
    #[serde(default)]
    pub paused_ms: Option<f64>,
}

/// Carries out the controller's actions on a store, recording each before it acts and
/// logging each decision. Used by `ray controller` (through [`leader::Led`]) and by the
/// simulation.
pub struct Applier {
    log: decisions::Writer,
    /// The last refusal logged per VM, so an unchanged one is not logged again.
    refused: BTreeMap<String, String>,
    /// When a VM's last migration failed (a drain waits before asking again).
    migration_failed: BTreeMap<String, std::time::Instant>,
    /// Draining hosts whose completion is logged.
    drained: std::collections::BTreeSet<String>,
    /// Rejoining hosts: the request and the last wait logged (`rejoin.rs`).
    rejoins: BTreeMap<String, (u64, String)>,
    /// How long a drain waits before asking again for a VM whose migration failed.
    drain_retry: Duration,
    /// `G`: how long after a host's lease lapsed its HA VMs may restart elsewhere.
    grace: Duration,
    /// Hosts seen without a lease, and since when (this controller's clock).
    lapsed_at: BTreeMap<String, std::time::Instant>,
    /// Steady passes in a row with the imbalance above the threshold.
    uneven: u32,
    /// The last rebalancing move recommended (VM, target), so it is logged once.
    recommended: Option<(String, String)>,
    /// When the automatic rebalancing moves of the last hour were asked for.
    rebalanced: std::collections::VecDeque<std::time::Instant>,
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub placed: usize,
    pub evicted: usize,
    pub released: usize,
    pub refused: usize,
    /// HA restarts: VMs of failed hosts now on others.
    pub restarted: usize,
    /// Actions the store refused (a token changed meanwhile): decided again next pass.
    pub conflicts: usize,
}

impl Default for Applier {
    fn default() -> Self {
        Applier::new()
    }
}

impl Applier {
    pub fn new() -> Applier {
        Applier {
            log: decisions::Writer::default(),
            refused: BTreeMap::new(),
            migration_failed: BTreeMap::new(),
            drained: Default::default(),
            rejoins: BTreeMap::new(),
            drain_retry: drain::RETRY,
            grace: Timing::default().grace,
            lapsed_at: BTreeMap::new(),
            uneven: 0,
            recommended: None,
            rebalanced: Default::default(),
        }
    }

    /// After a steady pass: counts how long the loads have stayed uneven and, once for
    /// `r.rounds` passes in a row, logs the move that would even them out most (each
    /// distinct recommendation once). Returns it.
    pub async fn rebalance<S: Store>(
        &mut self,
        s: &S,
        world: &World,
        cfg: PlanConfig,
        r: rebalance::RebalanceConfig,
    ) -> Result<Option<rebalance::Move>, ControllerError> {
        if rebalance::current(world, cfg) <= r.threshold {
            self.uneven = 0;
            return Ok(None);
        }
        self.uneven += 1;
        if self.uneven < r.rounds {
            return Ok(None);
        }
        let Some(m) = rebalance::recommend(world, cfg, r) else {
            return Ok(None);
        };
        let key = (m.vm.clone(), m.to.clone());
        let now = std::time::Instant::now();
        // One automatic move at a time: none while any migration is under way.
        let auto = r.auto
            && world.migrations.is_empty()
            && rebalance::take_move(&mut self.rebalanced, now, r.max_moves_per_hour);
        if auto {
            let req = crate::migration::Request {
                to: Some(m.to.clone()),
                abort: false,
                cause: Some("rebalance".into()),
            };
            let txn = Txn::new()
                .when(keys::migrate_request(&m.vm), crate::store::Cond::Absent)
                .put(keys::migrate_request(&m.vm), crate::migration::json(&req));
            if let Commit::Done(_) = s.commit(txn).await? {
                let msg = format!("{} (asked for: automatic mode)", m.message());
                let data = merge(m.data(), json!({"auto": true}));
                let e = Entry::new(Kind::RebalanceRecommended, Some(&m.vm), Some(&m.to), msg);
                self.log(s, e.with(data)).await?;
                // The imbalance must hold again, measured after this move.
                self.uneven = 0;
                self.recommended = Some(key);
                return Ok(Some(m));
            }
        }
        if self.recommended.as_ref() != Some(&key) {
            let why = if r.auto && !world.migrations.is_empty() {
                " (not asked for: a migration is under way)"
            } else if r.auto {
                " (not asked for: the cap of automatic moves per hour is reached)"
            } else {
                ""
            };
            let msg = format!("{}{why}", m.message());
            let e = Entry::new(Kind::RebalanceRecommended, Some(&m.vm), Some(&m.to), msg)
                .with(m.data());
            self.log(s, e).await?;
            self.recommended = Some(key);
        }
        Ok(Some(m))
    }

    /// With another grace before an HA restart (the controller's timing; the simulation
    /// runs without one).
    pub fn with_grace(mut self, grace: Duration) -> Applier {
        self.grace = grace;
        self
    }

    /// Notes which hosts lost their lease since the last look (logged once each) and
    /// fills `world.lapsed` with those that lost it at least the grace ago. A controller
    /// that just took the lead counts the grace from its own first look: later, never
    /// earlier, than the lease's end. Returns when the next host's grace ends.
    pub async fn observe<S: Store>(
        &mut self,
        s: &S,
        world: &mut World,
    ) -> Result<Option<std::time::Instant>, ControllerError> {
        let now = std::time::Instant::now();
        let held: BTreeMap<&str, usize> = world.vms.iter().fold(BTreeMap::new(), |mut m, v| {
            if let Some(t) = &v.token {
                *m.entry(t.host.as_str()).or_default() += 1;
            }
            m
        });
        self.lapsed_at
            .retain(|h, _| world.hosts.iter().any(|w| w.name == *h && !w.alive));
        let mut next = None;
        for h in world.hosts.iter().filter(|h| !h.alive) {
            if !self.lapsed_at.contains_key(&h.name) {
                self.lapsed_at.insert(h.name.clone(), now);
                let n = held.get(h.name.as_str()).copied().unwrap_or(0);
                if n > 0 {
                    let msg = format!(
                        "host {}'s lease lapsed: its {n} VMs fenced themselves; HA VMs restart elsewhere after the grace of {} ms",
                        h.name,
                        self.grace.as_millis()
                    );
                    let data = json!({"vms": n, "grace_ms": self.grace.as_millis() as u64});
                    let e = Entry::new(Kind::LeaseLapsed, None, Some(&h.name), msg).with(data);
                    self.log(s, e).await?;
                }
            }
            let due = self.lapsed_at[&h.name] + self.grace;
            if due <= now {
                world.lapsed.insert(h.name.clone());
            } else {
                next = Some(next.map_or(due, |n: std::time::Instant| n.min(due)));
            }
        }
        Ok(next)
    }

    /// With another wait before a drain retries a failed migration (the simulation runs
    /// without one).
    pub fn with_drain_retry(mut self, d: Duration) -> Applier {
        self.drain_retry = d;
        self
    }

    /// Appends one decision to the log.
    pub async fn log<S: Store>(&mut self, s: &S, e: Entry) -> Result<(), StoreError> {
        self.log.append(s, e).await.map(drop)
    }

    async fn record<S: Store>(&self, s: &S, op: &Operation) -> Result<bool, StoreError> {
        let value = serde_json::to_vec(op).unwrap_or_default();
        Ok(matches!(
            s.commit(Txn::new().put(op.key(), value)).await?,
            Commit::Done(_)
        ))
    }

    async fn done<S: Store>(&self, s: &S, op: &Operation) -> Result<(), StoreError> {
        s.commit(Txn::new().delete(op.key())).await.map(drop)
    }

    /// Applies `actions`; a conflict (another writer changed a token first) is counted
    /// and left for the next pass.
    pub async fn apply<S: Store>(
        &mut self,
        s: &S,
        actions: Vec<Action>,
    ) -> Result<Pass, ControllerError> {
        let mut pass = Pass::default();
        // Releases and evictions first: the room they free is what placements count on.
        let mut places = Vec::new();
        for a in actions {
            match a {
                Action::Place { vm, host, data } => places.push((vm, host, data)),
                Action::Evict { vm, host, by, data } => {
                    let why = format!(
                        "evicted from host {host} to make room for VM {by} of a higher tier; placed again when room appears"
                    );
                    if self
                        .release(s, &vm, &host, Kind::Preempted, why, data)
                        .await?
                    {
                        pass.evicted += 1;
                    } else {
                        pass.conflicts += 1;
                    }
                }
                Action::Release { vm, host } => {
                    let why = format!("deleted: run token released, host {host} stops it");
                    if self
                        .release(s, &vm, &host, Kind::Released, why, serde_json::Value::Null)
                        .await?
                    {
                        pass.released += 1;
                        self.refused.remove(&vm);
                    } else {
                        pass.conflicts += 1;
                    }
                }
                Action::FailOver {
                    vm,
                    from,
                    to,
                    checkpoint,
                    data,
                } => {
                    if self.fail_over(s, &vm, &from, &to, checkpoint, data).await? {
                        pass.restarted += 1;
                        self.refused.remove(&vm);
                    } else {
                        pass.conflicts += 1;
                    }
                }
                Action::Refuse { vm, reason, data } => {
                    pass.refused += 1;
                    if self.refused.get(&vm) != Some(&reason) {
                        self.refused.insert(vm.clone(), reason.clone());
                        self.log(
                            s,
                            Entry::new(Kind::Refused, Some(&vm), None, reason).with(data),
                        )
                        .await?;
                    }
                }
            }
        }
        for chunk in places.chunks(BATCH) {
            self.place_chunk(s, chunk, &mut pass).await?;
        }
        Ok(pass)
    }

    /// Places a chunk of VMs: their operations recorded in one transaction, one run-token
    /// transaction each, their log entries in one, their records cleared in one (four
    /// round trips per VM would bound a pass at the store's write latency).
    async fn place_chunk<S: Store>(
        &mut self,
        s: &S,
        chunk: &[(String, String, serde_json::Value)],
        pass: &mut Pass,
    ) -> Result<(), ControllerError> {
        let ops: Vec<Operation> = chunk
            .iter()
            .map(|(vm, host, _)| Operation::Place {
                vm: vm.clone(),
                host: host.clone(),
            })
            .collect();
        let record = ops.iter().fold(Txn::new(), |t, op| {
            t.put(op.key(), serde_json::to_vec(op).unwrap_or_default())
        });
        self.fenced(matches!(s.commit(record).await?, Commit::Done(_)))?;
        let mut entries = Vec::new();
        for (vm, host, data) in chunk {
            match runtoken::place(s, vm, host, Origin::Boot).await {
                Ok(g) => {
                    pass.placed += 1;
                    self.refused.remove(vm);
                    let msg = format!("placed on host {host} (run token epoch 1)");
                    let data = merge(data.clone(), json!({"revision": g.revision}));
                    entries.push(Entry::new(Kind::Placed, Some(vm), Some(host), msg).with(data));
                }
                Err(e) => pass.conflicts += conflict(vm, e)?,
            }
        }
        let logged = self.log.append_all(s, entries).await?.is_some();
        self.fenced(logged)?;
        let clear = ops.iter().fold(Txn::new(), |t, op| t.delete(op.key()));
        s.commit(clear).await?;
        Ok(())
    }

    /// Releases `vm`'s token if it still names `host`; false if it changed meanwhile.
    async fn release<S: Store>(
        &mut self,
        s: &S,
        vm: &str,
        host: &str,
        kind: Kind,
        why: String,
        data: serde_json::Value,
    ) -> Result<bool, ControllerError> {
        let op = Operation::Release {
            vm: vm.into(),
            host: host.into(),
        };
        self.fenced(self.record(s, &op).await?)?;
        let ok = match runtoken::read(s, vm).await {
            Ok(Some((t, kv))) if t.host == host => match runtoken::release(s, vm, &kv).await {
                Ok(_) => true,
                Err(e) => conflict(vm, e)? == 0,
            },
            Ok(_) => false,
            Err(e) => conflict(vm, e)? == 0,
        };
        if ok {
            self.log(s, Entry::new(kind, Some(vm), Some(host), why).with(data))
                .await?;
        }
        self.done(s, &op).await?;
        Ok(ok)
    }

    /// HA restart of `vm` from `from` (lease lapsed, grace over) on `to`: recorded, then
    /// one revision-checked transaction moves the token only if it still names `from`
    /// and `from` still has no lease. False if it changed meanwhile.
    async fn fail_over<S: Store>(
        &mut self,
        s: &S,
        vm: &str,
        from: &str,
        to: &str,
        checkpoint: Option<String>,
        data: serde_json::Value,
    ) -> Result<bool, ControllerError> {
        let op = Operation::FailOver {
            vm: vm.into(),
            from: from.into(),
            to: to.into(),
        };
        self.fenced(self.record(s, &op).await?)?;
        // The latest checkpoint, read now: an agent may have named a newer one since the
        // pass read the world (never one of an epoch after the token read below: the
        // agent's write requires the token it held).
        let observed = s
            .get(&keys::vm_observed(vm))
            .await?
            .and_then(|kv| serde_json::from_slice::<Observed>(&kv.value).ok())
            .filter(|o| o.checkpoint.is_some());
        let checkpoint = observed
            .as_ref()
            .and_then(|o| o.checkpoint.clone())
            .or(checkpoint);
        let origin = match &checkpoint {
            Some(path) => Origin::Checkpoint { path: path.clone() },
            None => Origin::Boot,
        };
        let moved = match runtoken::read(s, vm).await {
            Ok(Some((t, kv))) if t.host == from => {
                match runtoken::transfer(s, vm, &kv, to, origin, Transfer::FailOver).await {
                    Ok(g) => Some(g),
                    Err(e) => {
                        conflict(vm, e)?;
                        None
                    }
                }
            }
            Ok(_) => None,
            Err(e) => {
                conflict(vm, e)?;
                None
            }
        };
        if let Some(g) = &moved {
            let waited = self
                .lapsed_at
                .get(from)
                .map_or(0, |t| t.elapsed().as_millis() as u64);
            // The checkpoint's age when the lease lapse was seen (the taking host's clock
            // against this one's: the same to well under a second with NTP).
            let lapsed_unix_ms = crate::agent::unix_ms().saturating_sub(waited);
            let age_ms = observed
                .as_ref()
                .filter(|o| o.checkpoint == checkpoint)
                .and_then(|o| o.taken_at_ms)
                .map(|t| lapsed_unix_ms.saturating_sub(t));
            let how = match (&checkpoint, age_ms) {
                (Some(p), Some(age)) => format!(
                    "from its checkpoint {p} taken {:.1} s before the host's lease lapse was seen",
                    age as f64 / 1000.0
                ),
                (Some(p), None) => format!("from its checkpoint {p}"),
                (None, _) => "by a fresh boot (no checkpoint)".into(),
            };
            let msg = format!(
                "HA restart: host {from}'s lease lapsed {waited} ms ago (past the grace of {} ms, longer than its self-fence takes); restarted on host {to} {how}, run token epoch {}",
                self.grace.as_millis(),
                g.token.epoch
            );
            let data = merge(
                data,
                json!({
                    "from": from, "epoch": g.token.epoch, "revision": g.revision,
                    "lapsed_ms_ago": waited, "grace_ms": self.grace.as_millis() as u64,
                    "checkpoint": checkpoint,
                    "checkpoint_age_ms": age_ms,
                }),
            );
            self.log(
                s,
                Entry::new(Kind::Restarted, Some(vm), Some(to), msg).with(data),
            )
            .await?;
        }
        self.done(s, &op).await?;
        Ok(moved.is_some())
    }

    fn fenced(&self, written: bool) -> Result<(), ControllerError> {
        if written {
            Ok(())
        } else {
            Err(ControllerError::LostLead(
                "another controller leads now (the leader fence refused a write)".into(),
            ))
        }
    }

    /// Takes the next step of every migration asked for or under way, and asks for the
    /// next ones of every drain; returns how many moved on.
    pub async fn migrations<S: Store>(
        &mut self,
        s: &S,
        world: &World,
        cfg: PlanConfig,
    ) -> Result<usize, ControllerError> {
        let rejoined = rejoin::step(s, world, self).await?;
        Ok(rejoined
            + migrate::step(s, world, self, cfg).await?
            + drain::step(s, world, self).await?)
    }

    /// Finishes or undoes every operation a predecessor recorded and did not clear.
    pub async fn recover<S: Store>(&mut self, s: &S) -> Result<usize, ControllerError> {
        let ops = s.list(keys::OPS).await?;
        let mut n = 0;
        for kv in &ops.kvs {
            let Ok(op) = serde_json::from_slice::<Operation>(&kv.value) else {
                tracing::warn!(key = %kv.key, "removing an operation record that does not parse");
                self.fenced(matches!(
                    s.commit(Txn::new().delete(kv.key.clone())).await?,
                    Commit::Done(_)
                ))?;
                continue;
            };
            let (vm, host, msg) = match &op {
                // Carried on by the passes, from what the store holds.
                Operation::Migrate { .. } => continue,
                Operation::FailOver { vm, from, to } => {
                    let token = runtoken::read(s, vm).await.ok().flatten();
                    let msg = if token.is_some_and(|(t, _)| t.host == *to) {
                        format!("a predecessor's HA restart from host {from} on host {to} was complete: finished")
                    } else {
                        format!("a predecessor's HA restart from host {from} on host {to} never happened: undone, the VM is decided again")
                    };
                    (vm, to, msg)
                }
                Operation::Place { vm, host } => {
                    let token = runtoken::read(s, vm).await.ok().flatten();
                    let msg = if token.is_some_and(|(t, _)| t.host == *host) {
                        format!("a predecessor's placement on host {host} was complete: finished")
                    } else {
                        format!("a predecessor's placement on host {host} never happened: undone, the VM is decided again")
                    };
                    (vm, host, msg)
                }
                Operation::Release { vm, host } => {
                    let msg = match runtoken::read(s, vm).await {
                        Ok(Some((t, kv))) if t.host == *host => {
                            runtoken::release(s, vm, &kv)
                                .await
                                .map_err(|e| ControllerError::LostLead(e.to_string()))?;
                            format!("a predecessor's release from host {host}: finished now")
                        }
                        _ => format!("a predecessor's release from host {host} was complete"),
                    };
                    (vm, host, msg)
                }
            };
            self.log(s, Entry::new(Kind::Recovered, Some(vm), Some(host), msg))
                .await?;
            self.done(s, &op).await?;
            n += 1;
        }
        Ok(n)
    }
}

/// A refused token change is a conflict (1) to retry next pass; a store failure is an
/// error.
fn conflict(vm: &str, e: TokenError) -> Result<usize, ControllerError> {
    match e {
        TokenError::Store(e) => Err(e.into()),
        e => {
            tracing::info!(vm, "not applied, decided again next pass: {e}");
            Ok(1)
        }
    }
}

fn merge(mut a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    if let (Some(a), serde_json::Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// One controller. [`Controller::run`] campaigns, leads, and campaigns again when it
/// loses the lead; it returns only when the store fails.
pub struct Controller<S: Store + Clone> {
    store: S,
    cfg: ControllerConfig,
}

impl<S: Store + Clone> Controller<S> {
    pub fn new(store: S, cfg: ControllerConfig) -> Self {
        Controller { store, cfg }
    }

    pub async fn run(self) -> Result<(), ControllerError> {
        // No HA restart may come before the old copy has fenced itself.
        let slack = self.cfg.timing.check()?;
        tracing::info!(
            lease_ttl_ms = self.cfg.timing.lease_ttl.as_millis() as u64,
            grace_ms = self.cfg.timing.grace.as_millis() as u64,
            fenced_by_ms = self.cfg.timing.fenced_by().as_millis() as u64,
            earliest_restart_ms = self.cfg.timing.earliest_restart().as_millis() as u64,
            slack_ms = slack.as_millis() as u64,
            "HA timing checked: a failed host's VMs are paused before any restart elsewhere"
        );
        let me = leader::LeaderRecord {
            id: self.cfg.id.clone(),
            pid: std::process::id(),
        };
        loop {
            tracing::info!(id = %me.id, "campaigning for the lead");
            let term = match leader::campaign(&self.store, &me, self.cfg.leader_ttl, self.cfg.poll)
                .await
            {
                Ok(term) => term,
                Err(e @ StoreError::BadTtl(_)) => return Err(e.into()),
                Err(e) => {
                    // One etcd member down, an election: the store comes back.
                    tracing::warn!("cannot campaign: {e}; trying again");
                    tokio::time::sleep(self.cfg.poll).await;
                    continue;
                }
            };
            tracing::info!(id = %me.id, revision = term.revision, "leading");
            let led = leader::Led {
                inner: self.store.clone(),
                term,
            };
            match self.lead(&led).await {
                Err(ControllerError::LostLead(why)) => {
                    tracing::warn!("{why}; campaigning again");
                    let _ = self.store.revoke(term.lease).await;
                }
                Err(e) => return Err(e),
                Ok(()) => {}
            }
        }
    }

    async fn lead(&self, s: &leader::Led<S>) -> Result<(), ControllerError> {
        // The lease is renewed beside the work, so a long pass never lets it lapse; when
        // it is lost, the work in flight is dropped (what it recorded, a successor
        // finishes or undoes).
        let keeper = keep_lead(
            s.inner.clone(),
            s.term.lease,
            self.cfg.renew_every,
            self.cfg.leader_ttl,
        );
        // A store failure while leading (an etcd member dying, an election) ends the work
        // in flight, not the lead: while the lease holds, the work starts again with a
        // recovery, which finishes or undoes whatever the failed work had recorded.
        let work = async {
            let msg = format!("controller {} leads", self.cfg.id);
            let mut logged = false;
            loop {
                let r = async {
                    if !logged {
                        let mut applier = Applier::new();
                        applier
                            .log(s, Entry::new(Kind::Leader, None, None, msg.clone()))
                            .await?;
                        logged = true;
                    }
                    self.work(s).await
                };
                match r.await {
                    Err(ControllerError::Store(e)) if !matches!(e, StoreError::BadTtl(_)) => {
                        tracing::warn!("the store failed under the work: {e}; recovering");
                        tokio::time::sleep(self.cfg.poll).await;
                    }
                    r => return r,
                }
            }
        };
        tokio::select! {
            why = keeper => Err(ControllerError::LostLead(why)),
            r = work => r,
        }
    }

    /// What a leader does: recover, then passes.
    async fn work(&self, s: &leader::Led<S>) -> Result<(), ControllerError> {
        let mut applier = Applier::new().with_grace(self.cfg.timing.grace);
        let recovered = applier.recover(s).await?;
        if recovered > 0 {
            tracing::info!(recovered, "finished or undid a predecessor's operations");
        }
        let changed = Arc::new(tokio::sync::Notify::new());
        let mut watchers = Vec::new();
        for prefix in [keys::HOSTS, keys::VMS] {
            let mut w = self.store.watch(prefix, 0).await?;
            let changed = Arc::clone(&changed);
            watchers.push(AbortOnDrop(tokio::spawn(async move {
                while w.next().await.is_ok() {
                    changed.notify_one();
                }
                // The watch ended: the periodic pass keeps things moving.
            })));
        }
        self.passes(s, &mut applier, &changed).await
    }

    /// Passes until an error: one after every change (a burst settles into one) and one
    /// every `resync`.
    async fn passes(
        &self,
        s: &leader::Led<S>,
        applier: &mut Applier,
        changed: &tokio::sync::Notify,
    ) -> Result<(), ControllerError> {
        let mut resync = tokio::time::interval(self.cfg.resync);
        loop {
            let mut world = read_world(s).await?;
            let grace_ends = applier.observe(s, &mut world).await?;
            let actions = decide(&world, self.cfg.plan);
            let pass = applier.apply(s, actions).await?;
            let moved = applier.migrations(s, &world, self.cfg.plan).await?;
            let acted = pass.placed + pass.evicted + pass.released + pass.restarted;
            if acted + pass.conflicts + moved > 0 {
                tracing::info!(?pass, "applied");
                if pass.conflicts > 0 {
                    // Someone else wrote first; give their change a moment to land.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // What it wrote may allow more (an eviction frees room): look again.
                continue;
            }
            if let Some(r) = self.cfg.rebalance {
                applier.rebalance(s, &world, self.cfg.plan, r).await?;
            }
            // A lapsed host's grace ending is a change too.
            let grace_over = async {
                match grace_ends {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = changed.notified() => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ = resync.tick() => {}
                _ = grace_over => {}
            }
        }
    }
}

/// Renews the leader lease every `every`; returns why the lead is lost: the lease ended,
/// or no renewal succeeded for `ttl`.
async fn keep_lead<S: Store>(
    s: S,
    lease: crate::store::LeaseId,
    every: Duration,
    ttl: Duration,
) -> String {
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        match s.keep_alive(lease).await {
            Ok(_) => last = tokio::time::Instant::now(),
            Err(StoreError::NoLease(_)) => return "its leader lease ended".into(),
            Err(e) if last.elapsed() > ttl => {
                return format!("no renewal of its leader lease for {ttl:?}: {e}")
            }
            Err(e) => tracing::warn!("leader lease renewal failed, retrying: {e}"),
        }
    }
}

#[cfg(test)]
mod tests;
