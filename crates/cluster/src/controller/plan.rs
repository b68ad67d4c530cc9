//! The controller's decisions, as a pure function: the cluster as the store holds it (a
//! [`World`]) in, the [`Action`]s to take out. No I/O and no clock, so the same code runs
//! in `ray controller` and in the 1,000-host simulation.
//!
//! The world becomes a placement-engine snapshot (crates/scheduler): each host with its
//! role, state and inventory, each placed VM on the host its run token names, one hard
//! anti-affinity group per group name, the four pools of [`crate::spec::POOLS`]. Pending
//! VMs go through the engine by tier, highest first; a refusal is turned into one sentence
//! ("no host: 3 lack memory, 1 is Draining, 2 would break anti-affinity group web").
use std::collections::{BTreeMap, BTreeSet};

use ray_scheduler::status::{transition, HostEvent};
use ray_scheduler::{
    filter::Explanation, ClusterSnapshot, Decision, EngineConfig, EngineError, GroupPolicy, Host,
    HostStatus, PendingReason, PlacedVm, PlacementGroup, Pool, Reject, Session, VmSpec as EngineVm,
};
use serde_json::json;

use crate::agent::HostReport;
use crate::runtoken::RunToken;
use crate::spec::{pool_index, HostSpec, VmSpec, POOLS};

/// A host as the store holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostView {
    pub name: String,
    /// Its agent's lease is alive (`alive` key present).
    pub alive: bool,
    /// Its agent's last status, if it wrote one.
    pub report: Option<HostReport>,
    pub spec: HostSpec,
}

impl HostView {
    /// The host's state for placement: no lease is Failed, no status yet is
    /// Initializing, a host that fenced its VMs is Degraded.
    pub fn status(&self) -> HostStatus {
        let base = match (&self.report, self.alive) {
            (_, false) => HostStatus::Failed,
            (None, true) => HostStatus::Initializing,
            (Some(r), true) if r.fenced => HostStatus::Degraded,
            (Some(_), true) => HostStatus::Ready,
        };
        // A host back from maintenance is Rejoining until the controller checked it
        // (`rejoin.rs`): Offline -> Rejoining, through the one transition table.
        if self.spec.rejoin.is_some() && self.alive {
            return transition(HostStatus::Offline, HostEvent::Recover).unwrap_or(base);
        }
        // A drain asked for moves Ready or Degraded on to Draining, through the one
        // transition table; any other state keeps what it is.
        if self.spec.drain {
            transition(base, HostEvent::Drain).unwrap_or(base)
        } else {
            base
        }
    }

    /// The state to show, knowing how many VMs the host still holds: a draining host
    /// with none left has completed its drain (Offline: maintenance, shown as Drained).
    pub fn state(&self, vms: usize) -> String {
        let status = self.status();
        if status == HostStatus::Draining && vms == 0 {
            if let Ok(done) = transition(status, HostEvent::DrainComplete) {
                return format!("Drained ({done}: maintenance)");
            }
        }
        status.to_string()
    }
}

/// A VM as the store holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct VmView {
    pub name: String,
    /// Its spec; `None` when the operator deleted it, `Some(Err)` when it does not parse.
    pub spec: Option<Result<VmSpec, String>>,
    pub token: Option<RunToken>,
    /// Its latest checkpoint on shared storage (`/ray/vms/<vm>/observed`), if any: an HA
    /// restart resumes from it.
    pub checkpoint: Option<String>,
}

/// A VM's migration keys as the store holds them (`crate::migration`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MigrationView {
    pub request: Option<crate::migration::Request>,
    pub receiver: Option<crate::migration::Progress>,
    pub sender: Option<crate::migration::Progress>,
}

/// The cluster as the store holds it, sorted by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct World {
    pub hosts: Vec<HostView>,
    pub vms: Vec<VmView>,
    /// VMs with migration keys, by name.
    pub migrations: BTreeMap<String, MigrationView>,
    /// Hosts whose lease lapsed at least the grace ago ([`crate::timing`]): their HA VMs
    /// may be restarted elsewhere. The controller fills it from its own clock
    /// (`Applier::observe`); a bare listing leaves it empty.
    pub lapsed: BTreeSet<String>,
}

/// What the controller does next.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Give `vm` its first run token, on `host`.
    Place {
        vm: String,
        host: String,
        data: serde_json::Value,
    },
    /// Take `vm`'s run token away from `host` (its agent stops it) so `by`, of a higher
    /// tier, fits; `vm` stays desired and is placed again when room appears.
    Evict {
        vm: String,
        host: String,
        by: String,
        data: serde_json::Value,
    },
    /// `vm` was deleted: release its run token (its agent stops it).
    Release { vm: String, host: String },
    /// HA restart: `vm`, held by `from` whose lease lapsed more than the grace ago, runs
    /// on `to` from now on (from its checkpoint if it has one).
    FailOver {
        vm: String,
        from: String,
        to: String,
        checkpoint: Option<String>,
        data: serde_json::Value,
    },
    /// `vm` stays pending.
    Refuse {
        vm: String,
        reason: String,
        data: serde_json::Value,
    },
}

/// Placement settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlanConfig {
    /// vCPUs per host CPU the controller hands out.
    pub cpu_overcommit: f64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            cpu_overcommit: 4.0,
        }
    }
}

/// The engine's view of one cluster VM (the id is the VM's index in the world).
fn engine_vm(id: usize, spec: &VmSpec, groups: &BTreeMap<String, u32>) -> EngineVm {
    EngineVm {
        id: id as u64,
        vcpus: u32::from(spec.vcpus),
        memory_mib: spec.memory_mib,
        gpu: None,
        numa_strict: false,
        group: spec.group.as_ref().and_then(|g| groups.get(g).copied()),
        // `VmSpec::parse` checked the pool; an unknown one cannot reach here.
        pool: pool_index(&spec.pool).unwrap_or(1) as u32,
        selector: Vec::new(),
    }
}

/// Decides what to do about `world`.
pub fn decide(world: &World, cfg: PlanConfig) -> Vec<Action> {
    let mut actions = Vec::new();
    let host_ids: BTreeMap<&str, u32> = world
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.name.as_str(), i as u32))
        .collect();
    let cordoned: BTreeSet<u32> = world
        .hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| h.spec.cordon)
        .map(|(i, _)| i as u32)
        .collect();
    let groups: BTreeMap<String, u32> = world
        .vms
        .iter()
        .filter_map(|v| v.spec.as_ref()?.as_ref().ok()?.group.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .enumerate()
        .map(|(i, g)| (g, i as u32))
        .collect();
    let mut snap = ClusterSnapshot {
        hosts: world
            .hosts
            .iter()
            .map(|h| {
                let status = h.status();
                Host {
                    name: h.name.clone(),
                    role: h.spec.role,
                    // The engine has no cordon: a cordoned Ready host takes no new VMs
                    // but keeps its own, which is what Degraded means to it.
                    status: if h.spec.cordon && status == HostStatus::Ready {
                        HostStatus::Degraded
                    } else {
                        status
                    },
                    cpus: h.report.as_ref().map_or(0, |r| r.inventory.cpus),
                    cpu_overcommit: cfg.cpu_overcommit,
                    memory_mib: h.report.as_ref().map_or(0, |r| r.inventory.memory_mib),
                    gpus: Vec::new(),
                    numa: Vec::new(),
                    labels: BTreeMap::new(),
                }
            })
            .collect(),
        gpu_models: Vec::new(),
        groups: groups
            .keys()
            .map(|g| PlacementGroup {
                name: g.clone(),
                policy: GroupPolicy::HardAntiAffinity,
            })
            .collect(),
        pools: POOLS
            .iter()
            .map(|(name, tier)| Pool {
                name: (*name).into(),
                tier: *tier,
                quota: None,
            })
            .collect(),
        placements: Vec::new(),
    };
    let mut pending = Vec::new();
    // HA VMs of lapsed hosts, by engine id: the host they leave.
    let mut failing: BTreeMap<u64, String> = BTreeMap::new();
    for (i, v) in world.vms.iter().enumerate() {
        match (&v.spec, &v.token) {
            (None, Some(t)) => actions.push(Action::Release {
                vm: v.name.clone(),
                host: t.host.clone(),
            }),
            (None, None) => {}
            (Some(Err(e)), None) => actions.push(Action::Refuse {
                vm: v.name.clone(),
                reason: format!("not placed: {e}"),
                data: serde_json::Value::Null,
            }),
            // A placed VM whose spec went bad keeps running; nothing to decide.
            (Some(Err(_)), Some(_)) => {}
            (Some(Ok(spec)), Some(t)) => {
                // A VM on a host that runs none (its lease lapsed) is not counted: it is
                // the HA restart's to handle, not the placement's.
                if let Some(&h) = host_ids.get(t.host.as_str()) {
                    if snap.hosts[h as usize].status.runs_vms() {
                        snap.placements.push(PlacedVm {
                            vm: engine_vm(i, spec, &groups),
                            host: h,
                            numa: None,
                        });
                    } else if spec.restart_priority.is_some()
                        && world.lapsed.contains(&t.host)
                        && !world.hosts[h as usize].alive
                    {
                        failing.insert(i as u64, t.host.clone());
                        pending.push(engine_vm(i, spec, &groups));
                    }
                }
            }
            (Some(Ok(spec)), None) => pending.push(engine_vm(i, spec, &groups)),
        }
    }
    if pending.is_empty() {
        return actions;
    }
    let mut session = match session(&mut snap) {
        Ok(s) => s,
        Err(e) => {
            for vm in &pending {
                actions.push(Action::Refuse {
                    vm: world.vms[vm.id as usize].name.clone(),
                    reason: format!("not placed: the cluster's state is inconsistent: {e}"),
                    data: serde_json::Value::Null,
                });
            }
            return actions;
        }
    };
    // Highest tier first; within a tier, the highest restart priority (HA restarts
    // before new VMs); then by name.
    let priority = |vm: &EngineVm| {
        let spec = world.vms[vm.id as usize].spec.as_ref();
        let p = spec.and_then(|s| s.as_ref().ok()?.restart_priority);
        (failing.contains_key(&vm.id), p)
    };
    pending.sort_by_key(|vm| std::cmp::Reverse((POOLS[vm.pool as usize].1, priority(vm))));
    let placed_before: BTreeSet<u64> = snap.placements.iter().map(|p| p.vm.id).collect();
    for vm in pending {
        let name = world.vms[vm.id as usize].name.clone();
        let tier = POOLS[vm.pool as usize].1;
        match session.place(&vm) {
            Ok(Decision::Placed { host, evicted, .. }) => {
                let h = session.state().host(host);
                let data = json!({
                    "vcpus": vm.vcpus, "memory_mib": vm.memory_mib, "tier": tier,
                    "host_free_vcpus_after": h.free_vcpu(),
                    "host_free_memory_mib_after": h.free_mem(),
                    "evicted": evicted.len(),
                });
                for e in evicted {
                    let victim = world.vms[e.vm.id as usize].name.clone();
                    if placed_before.contains(&e.vm.id) {
                        actions.push(Action::Evict {
                            vm: victim,
                            host: world.hosts[e.host as usize].name.clone(),
                            by: name.clone(),
                            data: json!({
                                "victim_tier": POOLS[e.vm.pool as usize].1,
                                "by_tier": tier,
                            }),
                        });
                    } else {
                        // Placed earlier in this round: just not placed after all.
                        actions.retain(|a| {
                            !matches!(a, Action::Place { vm, .. } | Action::FailOver { vm, .. }
                                if *vm == victim)
                        });
                    }
                }
                let to = world.hosts[host as usize].name.clone();
                match failing.get(&vm.id) {
                    Some(from) => actions.push(Action::FailOver {
                        checkpoint: world.vms[vm.id as usize].checkpoint.clone(),
                        vm: name,
                        from: from.clone(),
                        to,
                        data,
                    }),
                    None => actions.push(Action::Place {
                        vm: name,
                        host: to,
                        data,
                    }),
                }
            }
            Ok(Decision::Pending(PendingReason::Quota(q))) => actions.push(Action::Refuse {
                vm: name,
                reason: format!("no host: {q}"),
                data: serde_json::Value::Null,
            }),
            Ok(Decision::Pending(PendingReason::NoHost)) => {
                let expl = session.explain(&vm);
                let lost = failing.get(&vm.id).map_or(String::new(), |h| {
                    format!("not restarted after host {h} failed: ")
                });
                // Counts, not the host-by-host list: an entry stays small at 1,000 hosts.
                actions.push(Action::Refuse {
                    vm: name,
                    reason: format!("{lost}{}", refusal(&expl, &cordoned)),
                    data: json!({"refusals": expl.counts(), "fits": expl.fits.len()}),
                });
            }
            Err(e) => actions.push(Action::Refuse {
                vm: name,
                reason: format!("not placed: {e}"),
                data: serde_json::Value::Null,
            }),
        }
    }
    actions
}

/// Where `vm` (placed now) could live instead: a host the placement engine accepts, other
/// than its own; only `to` when given. Evicting others is not worth a migration, so a host
/// that would need it does not count. Err: one sentence saying why there is none.
pub fn target_for(
    world: &World,
    vm: &str,
    to: Option<&str>,
    cfg: PlanConfig,
) -> Result<String, String> {
    let Some(v) = world.vms.iter().find(|v| v.name == vm) else {
        return Err(format!("VM {vm} does not exist"));
    };
    let Some(from) = v.token.as_ref().map(|t| t.host.clone()) else {
        return Err(format!("VM {vm} is not placed yet: nothing to migrate"));
    };
    if to == Some(from.as_str()) {
        return Err(format!("VM {vm} runs on host {from} already"));
    }
    if let Some(to) = to {
        if !world.hosts.iter().any(|h| h.name == to && h.alive) {
            return Err(format!("host {to} has no live agent"));
        }
    }
    // The world as if `vm` were pending and the hosts it may not go to cordoned; the other
    // pending VMs are left out so they do not compete for the room.
    let mut w = world.clone();
    w.vms.retain(|o| o.token.is_some() || o.name == vm);
    for o in &mut w.vms {
        if o.name == vm {
            o.token = None;
        }
    }
    for h in &mut w.hosts {
        if h.name == from || to.is_some_and(|t| t != h.name) {
            h.spec.cordon = true;
        }
    }
    for a in decide(&w, cfg) {
        match a {
            Action::Place { vm: p, host, data } if p == vm => {
                if data["evicted"].as_u64().unwrap_or(0) > 0 {
                    return Err(format!(
                        "no host: host {host} would have to evict VMs of a lower tier, which a migration does not do"
                    ));
                }
                return Ok(host);
            }
            Action::Refuse { vm: p, reason, .. } if p == vm => {
                return Err(format!(
                    "{reason} (host {from}, its own, is counted as cordoned)"
                ))
            }
            _ => {}
        }
    }
    Err(format!(
        "no host for VM {vm}: the placement engine decided nothing"
    ))
}

/// A session over `snap`; a placement the engine finds invalid (a host that reports
/// less memory than its VMs hold) is left out rather than stopping every decision.
fn session(snap: &mut ClusterSnapshot) -> Result<Session, EngineError> {
    loop {
        match Session::new(snap, EngineConfig::default()) {
            Err(EngineError::InvalidPlacement { vm, .. }) => {
                snap.placements.retain(|p| p.vm.id != vm);
            }
            other => return other,
        }
    }
}

/// One sentence from an explanation: refusals grouped by what they say, the most common
/// first, e.g. "no host: 3 lack memory, 1 is Draining, 2 would break anti-affinity group
/// web".
pub fn refusal(expl: &Explanation, cordoned: &BTreeSet<u32>) -> String {
    if let Some(q) = &expl.quota {
        return format!("no host: {q}");
    }
    if expl.hosts.is_empty() {
        return "no host: the cluster has no hosts yet".into();
    }
    // Refusals that read alike are counted together (free amounts differ per host).
    let mut groups: BTreeMap<String, (usize, &Reject, bool)> = BTreeMap::new();
    for r in &expl.hosts {
        let c = cordoned.contains(&r.host);
        groups
            .entry(phrase(&r.reject, false, c))
            .or_insert((0, &r.reject, c))
            .0 += 1;
    }
    let mut parts: Vec<(usize, String)> = groups
        .into_values()
        .map(|(n, r, c)| (n, phrase(r, n == 1, c)))
        .collect();
    parts.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let text: Vec<String> = parts.iter().map(|(n, p)| format!("{n} {p}")).collect();
    format!("no host: {}", text.join(", "))
}

/// What a refusal says of `n` hosts (`one`: n is 1).
fn phrase(r: &Reject, one: bool, cordoned: bool) -> String {
    let (is, lack) = if one {
        ("is", "lacks")
    } else {
        ("are", "lack")
    };
    match r {
        Reject::Role { role } => format!("{is} {role:?}, not Worker (only Workers run VMs)"),
        Reject::Status { .. } if cordoned => format!("{is} cordoned"),
        Reject::Status {
            status: HostStatus::Failed,
        } => format!("{is} Failed (no agent lease)"),
        Reject::Status { status } => format!("{is} {status}"),
        Reject::Selector { key, want, .. } => format!("{lack} label {key}={want}"),
        Reject::AntiAffinity { group } => format!("would break anti-affinity group {group}"),
        Reject::Affinity { group } => format!("{is} not the host of affinity group {group}"),
        Reject::Cpu { .. } => format!("{lack} vCPUs"),
        Reject::Memory { .. } => format!("{lack} memory"),
        Reject::Gpu { model, .. } => format!("{lack} {model} GPUs"),
        Reject::Numa { .. } => format!("{lack} a NUMA node big enough"),
    }
}

#[cfg(test)]
mod tests;
