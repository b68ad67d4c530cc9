//! Rebalancing: when host loads stay uneven, the one live migration that evens them out
//! most, if it is worth its cost. A pure function of the [`World`] like `decide`; the
//! controller logs what it recommends (`rebalance_recommended`) after the imbalance held
//! for [`RebalanceConfig::rounds`] passes in a row, and in automatic mode asks for that
//! migration (cause `rebalance`), one at a time and at most
//! [`RebalanceConfig::max_moves_per_hour`].
//!
//! - A host's load is the larger of its vCPU and memory use, each as a fraction of what
//!   the controller hands out there (vCPUs: CPUs x overcommit). Only Ready Workers that
//!   are not cordoned count: the ones a migration may use.
//! - Imbalance is the coefficient of variation of those loads (standard deviation over
//!   mean) divided by its largest possible value `sqrt(n - 1)`: 0 is even, 1 is all the
//!   load on one host.
//! - A move takes one VM off the most loaded host to one of the least loaded ones the
//!   placement engine accepts (anti-affinity, room; never by evicting: `target_for`).
//!   Its gain is the relative drop of the imbalance; it must reach `min_gain`.
//! - DRS-style cost: the migration's time, estimated as its memory over the migration
//!   bandwidth (one pre-copy pass plus a quarter for pages dirtied meanwhile), against
//!   the benefit, the gain held over the expected stable time. A move whose cost is
//!   larger is not recommended.
use serde_json::json;

use super::plan::{target_for, PlanConfig, World};

/// When a rebalancing move is recommended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RebalanceConfig {
    /// Imbalance (normalized coefficient of variation, 0-1) above which to look.
    pub threshold: f64,
    /// Passes in a row the imbalance must stay above the threshold.
    pub rounds: u32,
    /// Least relative drop of the imbalance a move must bring.
    pub min_gain: f64,
    /// How long the cluster is expected to stay as it is after the move, in seconds.
    pub stable_s: f64,
    /// Migration bandwidth for the cost estimate, MiB/s.
    pub bandwidth_mib_s: f64,
    /// Least loaded hosts tried as targets.
    pub candidates: usize,
    /// Carry the recommendation out (a migration request, cause `rebalance`) instead of
    /// only logging it.
    pub auto: bool,
    /// Automatic moves per hour at most; past it, moves are only recommended.
    pub max_moves_per_hour: usize,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            threshold: 0.2,
            rounds: 3,
            min_gain: 0.05,
            stable_s: 600.0,
            bandwidth_mib_s: 1000.0,
            candidates: 3,
            auto: false,
            max_moves_per_hour: 6,
        }
    }
}

/// One recommended move, with its numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct Move {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub before: f64,
    pub after: f64,
    /// `(before - after) / before`.
    pub gain: f64,
    /// Estimated migration time, s.
    pub cost_s: f64,
    /// `gain x stable_s`.
    pub benefit_s: f64,
}

impl Move {
    pub fn message(&self) -> String {
        format!(
            "rebalance: move VM {} from host {} to host {}: imbalance {:.3} -> {:.3} ({:.0} % better), migration ~{:.1} s against {:.0} s of benefit",
            self.vm,
            self.from,
            self.to,
            self.before,
            self.after,
            self.gain * 100.0,
            self.cost_s,
            self.benefit_s
        )
    }

    pub fn data(&self) -> serde_json::Value {
        json!({
            "from": self.from, "to": self.to, "imbalance_before": self.before,
            "imbalance_after": self.after, "gain": self.gain, "cost_s": self.cost_s,
            "benefit_s": self.benefit_s,
        })
    }
}

/// Whether another automatic move fits under the cap of `max` per hour, given the times
/// of the earlier ones (those older than an hour are dropped); if so, `now` is counted.
pub fn take_move(
    moves: &mut std::collections::VecDeque<std::time::Instant>,
    now: std::time::Instant,
    max: usize,
) -> bool {
    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);
    while moves
        .front()
        .is_some_and(|t| now.duration_since(*t) >= HOUR)
    {
        moves.pop_front();
    }
    if moves.len() >= max {
        return false;
    }
    moves.push_back(now);
    true
}

/// A host that counts, with what it holds and what it offers.
struct Load {
    name: String,
    used: (f64, f64),
    cap: (f64, f64),
}

impl Load {
    fn load(&self, extra: (f64, f64)) -> f64 {
        let v = (self.used.0 + extra.0) / self.cap.0;
        let m = (self.used.1 + extra.1) / self.cap.1;
        v.max(m)
    }
}

/// Normalized coefficient of variation of `loads`: 0 even, 1 everything on one host.
pub fn imbalance(loads: &[f64]) -> f64 {
    let n = loads.len() as f64;
    let mean = loads.iter().sum::<f64>() / n;
    if loads.len() < 2 || mean <= 0.0 {
        return 0.0;
    }
    let var = loads.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n;
    (var.sqrt() / mean) / (n - 1.0).sqrt()
}

fn loads(world: &World, cfg: PlanConfig) -> Vec<Load> {
    let mut out: Vec<Load> = world
        .hosts
        .iter()
        .filter(|h| {
            h.status() == ray_scheduler::HostStatus::Ready
                && h.spec.role == ray_scheduler::HostRole::Worker
                && !h.spec.cordon
        })
        .filter_map(|h| {
            let inv = &h.report.as_ref()?.inventory;
            (inv.cpus > 0 && inv.memory_mib > 0).then(|| Load {
                name: h.name.clone(),
                used: (0.0, 0.0),
                cap: (
                    f64::from(inv.cpus) * cfg.cpu_overcommit,
                    inv.memory_mib as f64,
                ),
            })
        })
        .collect();
    for v in &world.vms {
        let (Some(t), Some(Ok(spec))) = (&v.token, &v.spec) else {
            continue;
        };
        if let Some(l) = out.iter_mut().find(|l| l.name == t.host) {
            l.used.0 += f64::from(spec.vcpus);
            l.used.1 += spec.memory_mib as f64;
        }
    }
    out
}

/// The imbalance of `world` now.
pub fn current(world: &World, cfg: PlanConfig) -> f64 {
    let l: Vec<f64> = loads(world, cfg)
        .iter()
        .map(|l| l.load((0.0, 0.0)))
        .collect();
    imbalance(&l)
}

/// The move that evens the loads out most, if the imbalance is above the threshold and
/// a move is worth it. VMs in a migration already are left alone.
pub fn recommend(world: &World, cfg: PlanConfig, r: RebalanceConfig) -> Option<Move> {
    let hosts = loads(world, cfg);
    let now: Vec<f64> = hosts.iter().map(|l| l.load((0.0, 0.0))).collect();
    let before = imbalance(&now);
    if before <= r.threshold {
        return None;
    }
    let from = (0..hosts.len()).max_by(|&a, &b| now[a].total_cmp(&now[b]))?;
    let mut order: Vec<usize> = (0..hosts.len()).filter(|&i| i != from).collect();
    order.sort_by(|&a, &b| now[a].total_cmp(&now[b]));
    order.truncate(r.candidates);
    // Every move that makes things more even, the most even (then cheapest) first; the
    // placement engine is asked about them in that order (one engine run, mostly).
    let mut moves: Vec<(f64, f64, &str, usize)> = Vec::new();
    for v in &world.vms {
        let (Some(t), Some(Ok(spec))) = (&v.token, &v.spec) else {
            continue;
        };
        if t.host != hosts[from].name || world.migrations.contains_key(&v.name) {
            continue;
        }
        let size = (f64::from(spec.vcpus), spec.memory_mib as f64);
        for &to in &order {
            let mut after = now.clone();
            after[from] = hosts[from].load((-size.0, -size.1));
            after[to] = hosts[to].load(size);
            let after = imbalance(&after);
            if after < before {
                moves.push((after, size.1 * 1.25 / r.bandwidth_mib_s, &v.name, to));
            }
        }
    }
    moves.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let (after, cost_s, vm, to) = moves
        .into_iter()
        .find(|(_, _, vm, to)| target_for(world, vm, Some(&hosts[*to].name), cfg).is_ok())?;
    let gain = (before - after) / before;
    let m = Move {
        vm: vm.to_string(),
        from: hosts[from].name.clone(),
        to: hosts[to].name.clone(),
        before,
        after,
        gain,
        cost_s,
        benefit_s: gain * r.stable_s,
    };
    (m.gain >= r.min_gain && m.benefit_s > m.cost_s).then_some(m)
}

#[cfg(test)]
mod tests {
    use super::super::plan::{HostView, VmView};
    use super::*;
    use crate::agent::{HostReport, Inventory};
    use crate::runtoken::RunToken;
    use crate::spec::{HostSpec, VmSpec};

    fn host(name: &str) -> HostView {
        HostView {
            name: name.into(),
            alive: true,
            report: Some(HostReport {
                inventory: Inventory {
                    cpus: 4,
                    memory_mib: 8192,
                    numa_nodes: 1,
                },
                vms: Vec::new(),
                fenced: false,
                rejoin: None,
            }),
            spec: HostSpec::default(),
        }
    }

    fn vm(name: &str, on: &str, memory_mib: u64, group: Option<&str>) -> VmView {
        VmView {
            name: name.into(),
            spec: Some(Ok(VmSpec {
                vcpus: 1,
                memory_mib,
                kernel: None,
                cmdline: None,
                pool: "standard".into(),
                group: group.map(String::from),
                restart_priority: None,
            })),
            token: Some(RunToken {
                host: on.into(),
                epoch: 1,
            }),
            checkpoint: None,
        }
    }

    #[test]
    fn imbalance_is_zero_when_even_and_one_when_all_on_one_host() {
        assert_eq!(imbalance(&[0.5, 0.5, 0.5]), 0.0);
        assert!((imbalance(&[0.9, 0.0, 0.0]) - 1.0).abs() < 1e-9);
        assert_eq!(imbalance(&[0.7]), 0.0);
        assert_eq!(imbalance(&[0.0, 0.0]), 0.0);
    }

    #[test]
    fn the_best_move_goes_to_an_empty_host_the_engine_accepts_and_small_gains_are_not_worth_it() {
        let world = World {
            hosts: vec![host("a"), host("b"), host("c")],
            vms: vec![
                vm("big", "a", 4096, Some("g")),
                vm("small", "a", 1024, None),
                vm("other", "b", 1024, Some("g")),
            ],
            ..World::default()
        };
        let cfg = PlanConfig::default();
        let r = RebalanceConfig::default();
        let m = recommend(&world, cfg, r).unwrap();
        // Moving either VM of a to the empty host c evens things equally: the smaller
        // migration wins.
        assert_eq!(
            (m.vm.as_str(), m.from.as_str(), m.to.as_str()),
            ("small", "a", "c")
        );
        assert!(m.after < m.before && m.gain >= r.min_gain, "{m:?}");
        assert!((m.before - current(&world, cfg)).abs() < 1e-12);
        assert!(
            m.message().contains("from host a to host c"),
            "{}",
            m.message()
        );
        // Below the threshold nothing is recommended.
        let calm = RebalanceConfig {
            threshold: m.before,
            ..r
        };
        assert_eq!(recommend(&world, cfg, calm), None);
        // A move whose migration costs more than its benefit over the stable time is not.
        let brief = RebalanceConfig {
            stable_s: 1.0,
            bandwidth_mib_s: 10.0,
            ..r
        };
        assert_eq!(recommend(&world, cfg, brief), None);
        // Nor one that brings too little.
        let picky = RebalanceConfig {
            min_gain: 0.99,
            ..r
        };
        assert_eq!(recommend(&world, cfg, picky), None);
    }

    #[test]
    fn anti_affinity_and_room_bar_targets() {
        // a's only VM is in group g like b's: b, the least loaded, may not take it, and c
        // has no room for it.
        let world = World {
            hosts: vec![host("a"), host("b"), host("c")],
            vms: vec![
                vm("big", "a", 6144, Some("g")),
                vm("other", "b", 512, Some("g")),
                vm("filler", "c", 3072, None),
            ],
            ..World::default()
        };
        let cfg = PlanConfig::default();
        assert!(current(&world, cfg) > RebalanceConfig::default().threshold);
        assert_eq!(recommend(&world, cfg, RebalanceConfig::default()), None);
    }

    #[test]
    fn automatic_moves_are_capped_per_hour() {
        use std::time::{Duration, Instant};
        let mut moves = std::collections::VecDeque::new();
        let t0 = Instant::now();
        assert!(take_move(&mut moves, t0, 2));
        assert!(take_move(&mut moves, t0 + Duration::from_secs(60), 2));
        assert!(!take_move(&mut moves, t0 + Duration::from_secs(120), 2));
        // An hour after the first, one fits again.
        assert!(take_move(&mut moves, t0 + Duration::from_secs(3600), 2));
        assert!(!take_move(&mut moves, t0 + Duration::from_secs(3601), 2));
        assert!(!take_move(&mut moves, t0, 0), "a cap of 0 never moves");
    }

    #[test]
    fn an_even_cluster_needs_nothing() {
        let world = World {
            hosts: vec![host("a"), host("b")],
            vms: vec![vm("x", "a", 2048, None), vm("y", "b", 2048, None)],
            ..World::default()
        };
        assert_eq!(
            recommend(&world, PlanConfig::default(), RebalanceConfig::default()),
            None
        );
    }
}
