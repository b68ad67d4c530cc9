//! Simulator input: a cluster plus a time-ordered trace of VM arrivals and
//! departures and host failures, recoveries and drains. Read from YAML
//! ([`Scenario::from_yaml`]) or generated from a seed
//! ([`Scenario::generate`]). Pure: text in, data out.

use crate::error::ScenarioError;
use crate::model::{
    ClusterSnapshot, GpuDemand, GpuSlots, GroupPolicy, Host, HostId, HostRole, NumaNode,
    PlacementGroup, Pool, Quota, Tier, VmId, VmSpec,
};
use crate::status::HostStatus;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use std::collections::BTreeMap;

/// What happens at one point of the trace.
#[derive(Clone, Debug, PartialEq)]
pub enum TraceKind {
    /// A VM asks to be placed.
    Arrive(VmSpec),
    /// A VM goes away (or stops waiting, if still pending).
    Depart(VmId),
    /// A host fails; its VMs must restart elsewhere.
    Fail(HostId),
    /// A failed host recovers (Recover, then RejoinOk).
    Recover(HostId),
    /// A host is drained by live migration, then goes Offline.
    Drain(HostId),
    /// A host back from maintenance (PowerOn, then InitOk).
    Return(HostId),
}

/// One trace entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceEvent {
    /// Time, in abstract ticks.
    pub at: u64,
    /// What happens.
    pub kind: TraceKind,
}

/// A cluster and a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// Hosts, pools, groups, GPU models; no VMs placed.
    pub snapshot: ClusterSnapshot,
    /// Events sorted by time; at equal times departures, then host
    /// events, then arrivals, each in input order.
    pub trace: Vec<TraceEvent>,
    /// Seed from the file, if any.
    pub seed: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileYaml {
    #[serde(default)]
    seed: Option<u64>,
    hosts: Vec<HostYaml>,
    #[serde(default)]
    pools: Vec<PoolYaml>,
    #[serde(default)]
    groups: Vec<GroupYaml>,
    #[serde(default)]
    vms: Vec<VmYaml>,
    #[serde(default)]
    events: Vec<EventYaml>,
}

fn one() -> u32 {
    1
}
fn one_f() -> f64 {
    1.0
}
fn worker() -> HostRole {
    HostRole::Worker
}
fn ready() -> HostStatus {
    HostStatus::Ready
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostYaml {
    name: String,
    #[serde(default = "worker")]
    role: HostRole,
    #[serde(default = "ready")]
    status: HostStatus,
    cpus: u32,
    #[serde(default = "one_f")]
    cpu_overcommit: f64,
    memory_mib: u64,
    #[serde(default)]
    gpus: BTreeMap<String, u32>,
    #[serde(default)]
    numa: Vec<NumaNode>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "one")]
    count: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolYaml {
    name: String,
    tier: Tier,
    #[serde(default)]
    quota: Option<QuotaYaml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaYaml {
    #[serde(default = "unlimited")]
    vcpus: u64,
    #[serde(default = "unlimited")]
    memory_mib: u64,
    #[serde(default = "unlimited")]
    gpus: u64,
}

fn unlimited() -> u64 {
    u64::MAX
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupYaml {
    name: String,
    policy: GroupPolicy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuYaml {
    model: String,
    #[serde(default = "one")]
    count: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmYaml {
    name: String,
    vcpus: u32,
    memory_mib: u64,
    #[serde(default)]
    gpus: Option<GpuYaml>,
    #[serde(default)]
    numa_strict: bool,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    arrive: u64,
    #[serde(default)]
    depart: Option<u64>,
    #[serde(default = "one")]
    count: u32,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum EventYamlKind {
    Fail,
    Recover,
    Drain,
    Return,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventYaml {
    at: u64,
    host: String,
    event: EventYamlKind,
}

fn range_err(field: String, value: impl ToString, expected: &'static str) -> ScenarioError {
    ScenarioError::OutOfRange {
        field,
        value: value.to_string(),
        expected,
    }
}

fn lookup<T: Copy>(
    map: &BTreeMap<String, T>,
    name: &str,
    field: String,
    kind: &'static str,
) -> Result<T, ScenarioError> {
    map.get(name)
        .copied()
        .ok_or_else(|| ScenarioError::UnknownName {
            field,
            kind,
            name: name.to_string(),
        })
}

fn insert_unique<T>(
    map: &mut BTreeMap<String, T>,
    name: &str,
    v: T,
    field: String,
    kind: &'static str,
) -> Result<(), ScenarioError> {
    if map.insert(name.to_string(), v).is_some() {
        return Err(ScenarioError::Duplicate {
            field,
            kind,
            name: name.to_string(),
        });
    }
    Ok(())
}

impl Scenario {
    /// Parses and checks a YAML scenario. Errors name the field, e.g.
    /// `vms[2].pool: unknown pool `gold``.
    pub fn from_yaml(text: &str) -> Result<Scenario, ScenarioError> {
        let f: FileYaml = serde_yaml::from_str(text)?;
        let mut snap = ClusterSnapshot::default();
        let mut models: BTreeMap<String, u16> = BTreeMap::new();
        let mut host_ids: BTreeMap<String, HostId> = BTreeMap::new();
        if f.hosts.is_empty() {
            return Err(range_err("hosts".into(), 0, "at least one host"));
        }
        for (i, h) in f.hosts.iter().enumerate() {
            let field = |s: &str| format!("hosts[{i}].{s}");
            if h.cpus == 0 {
                return Err(range_err(field("cpus"), h.cpus, "at least 1"));
            }
            if h.memory_mib == 0 {
                return Err(range_err(field("memory_mib"), h.memory_mib, "at least 1"));
            }
            if !(h.cpu_overcommit.is_finite() && (1.0..=16.0).contains(&h.cpu_overcommit)) {
                return Err(range_err(
                    field("cpu_overcommit"),
                    h.cpu_overcommit,
                    "1.0 to 16.0",
                ));
            }
            if h.count == 0 || h.count > 1_000_000 {
                return Err(range_err(field("count"), h.count, "1 to 1000000"));
            }
            let mut gpus = Vec::new();
            for (m, c) in &h.gpus {
                let next = models.len();
                if next > usize::from(u16::MAX) {
                    return Err(range_err(field("gpus"), next, "at most 65535 GPU models"));
                }
                let id = *models.entry(m.clone()).or_insert(next as u16);
                gpus.push(GpuSlots {
                    model: id,
                    count: *c,
                });
            }
            for k in 0..h.count {
                let name = if h.count == 1 {
                    h.name.clone()
                } else {
                    format!("{}-{k}", h.name)
                };
                insert_unique(
                    &mut host_ids,
                    &name,
                    snap.hosts.len() as HostId,
                    field("name"),
                    "host",
                )?;
                snap.hosts.push(Host {
                    name,
                    role: h.role,
                    status: h.status,
                    cpus: h.cpus,
                    cpu_overcommit: h.cpu_overcommit,
                    memory_mib: h.memory_mib,
                    gpus: gpus.clone(),
                    numa: h.numa.clone(),
                    labels: h.labels.clone(),
                });
            }
        }
        let mut names: Vec<(String, u16)> = models.iter().map(|(k, v)| (k.clone(), *v)).collect();
        names.sort_by_key(|x| x.1);
        snap.gpu_models = names.into_iter().map(|x| x.0).collect();

        let mut pool_ids: BTreeMap<String, u32> = BTreeMap::new();
        if f.pools.is_empty() {
            snap.pools.push(Pool {
                name: "default".into(),
                tier: Tier::Standard,
                quota: None,
            });
            pool_ids.insert("default".into(), 0);
        }
        for (i, p) in f.pools.iter().enumerate() {
            insert_unique(
                &mut pool_ids,
                &p.name,
                i as u32,
                format!("pools[{i}].name"),
                "pool",
            )?;
            snap.pools.push(Pool {
                name: p.name.clone(),
                tier: p.tier,
                quota: p.quota.as_ref().map(|q| Quota {
                    vcpus: q.vcpus,
                    memory_mib: q.memory_mib,
                    gpus: q.gpus,
                }),
            });
        }
        let mut group_ids: BTreeMap<String, u32> = BTreeMap::new();
        for (i, g) in f.groups.iter().enumerate() {
            insert_unique(
                &mut group_ids,
                &g.name,
                i as u32,
                format!("groups[{i}].name"),
                "group",
            )?;
            snap.groups.push(PlacementGroup {
                name: g.name.clone(),
                policy: g.policy,
            });
        }

        let mut trace: Vec<(u64, u8, usize, TraceKind)> = Vec::new();
        let mut vm_names: BTreeMap<String, ()> = BTreeMap::new();
        let mut next_id: VmId = 0;
        for (i, v) in f.vms.iter().enumerate() {
            let field = |s: &str| format!("vms[{i}].{s}");
            if v.vcpus == 0 {
                return Err(range_err(field("vcpus"), v.vcpus, "at least 1"));
            }
            if v.memory_mib == 0 {
                return Err(range_err(field("memory_mib"), v.memory_mib, "at least 1"));
            }
            if v.count == 0 || v.count > 10_000_000 {
                return Err(range_err(field("count"), v.count, "1 to 10000000"));
            }
            if let Some(d) = v.depart {
                if d <= v.arrive {
                    return Err(range_err(field("depart"), d, "later than arrive"));
                }
            }
            let pool = match &v.pool {
                Some(p) => lookup(&pool_ids, p, field("pool"), "pool")?,
                None => 0,
            };
            let group = match &v.group {
                Some(g) => Some(lookup(&group_ids, g, field("group"), "group")?),
                None => None,
            };
            let gpu = match &v.gpus {
                Some(g) => {
                    if g.count == 0 {
                        return Err(range_err(field("gpus.count"), 0, "at least 1"));
                    }
                    Some(GpuDemand {
                        model: lookup(&models, &g.model, field("gpus.model"), "GPU model")?,
                        count: g.count,
                    })
                }
                None => None,
            };
            for k in 0..v.count {
                let name = if v.count == 1 {
                    v.name.clone()
                } else {
                    format!("{}-{k}", v.name)
                };
                insert_unique(&mut vm_names, &name, (), field("name"), "vm")?;
                let spec = VmSpec {
                    id: next_id,
                    vcpus: v.vcpus,
                    memory_mib: v.memory_mib,
                    gpu,
                    numa_strict: v.numa_strict,
                    group,
                    pool,
                    selector: v
                        .selector
                        .iter()
                        .map(|(a, b)| (a.clone(), b.clone()))
                        .collect(),
                };
                let seq = trace.len();
                trace.push((v.arrive, 2, seq, TraceKind::Arrive(spec)));
                if let Some(d) = v.depart {
                    trace.push((d, 0, seq, TraceKind::Depart(next_id)));
                }
                next_id += 1;
            }
        }
        for (i, e) in f.events.iter().enumerate() {
            let h = lookup(&host_ids, &e.host, format!("events[{i}].host"), "host")?;
            let kind = match e.event {
                EventYamlKind::Fail => TraceKind::Fail(h),
                EventYamlKind::Recover => TraceKind::Recover(h),
                EventYamlKind::Drain => TraceKind::Drain(h),
                EventYamlKind::Return => TraceKind::Return(h),
            };
            let seq = trace.len();
            trace.push((e.at, 1, seq, kind));
        }
        snap.validate()?;
        Ok(Scenario {
            snapshot: snap,
            trace: sort_trace(trace),
            seed: f.seed,
        })
    }

    /// Distinct (vCPUs, memory) shapes of the VMs without GPUs in the
    /// trace, reduced to those not dominated by a smaller one.
    pub fn shapes(&self) -> Vec<(u32, u64)> {
        let mut all: Vec<(u32, u64)> = self
            .trace
            .iter()
            .filter_map(|e| match &e.kind {
                TraceKind::Arrive(v) if v.gpu.is_none() => Some((v.vcpus, v.memory_mib)),
                _ => None,
            })
            .collect();
        all.sort_unstable();
        all.dedup();
        let mut min: Vec<(u32, u64)> = Vec::new();
        for s in all {
            if !min.iter().any(|m| m.0 <= s.0 && m.1 <= s.1) {
                min.push(s);
            }
        }
        min
    }

    /// Number of arrivals in the trace.
    pub fn arrivals(&self) -> usize {
        self.trace
            .iter()
            .filter(|e| matches!(e.kind, TraceKind::Arrive(_)))
            .count()
    }

    /// A synthetic scenario, fully determined by the arguments: `hosts`
    /// hosts (3% non-workers, 7% with GPUs), `vms` arrivals sized so the
    /// cluster ends near full on vCPUs, departures, a few host failures
    /// and drains, four pools of different tiers (one with a quota),
    /// hard/soft anti-affinity and affinity groups, NUMA-strict and
    /// label-constrained VMs.
    pub fn generate(hosts: u32, vms: u32, seed: u64) -> Scenario {
        crate::generate::generate(hosts, vms, seed)
    }
}

pub(crate) fn sort_trace(mut trace: Vec<(u64, u8, usize, TraceKind)>) -> Vec<TraceEvent> {
    trace.sort_by_key(|t| (t.0, t.1, t.2));
    trace
        .into_iter()
        .map(|(at, _, _, kind)| TraceEvent { at, kind })
        .collect()
}

/// Random generator used by [`Scenario::generate`].
pub(crate) fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform pick with weights.
pub(crate) fn weighted<'a, T>(r: &mut ChaCha8Rng, items: &'a [(T, u32)]) -> &'a T {
    let total: u32 = items.iter().map(|x| x.1).sum();
    let mut k = r.gen_range(0..total.max(1));
    for (item, w) in items {
        if k < *w {
            return item;
        }
        k -= w;
    }
    &items[items.len() - 1].0
}
