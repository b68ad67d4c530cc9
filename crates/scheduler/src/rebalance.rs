//! Rebalancing planner (in the spirit of vSphere DRS): from the current
//! placements, a bounded list of live migrations that first empties
//! draining hosts and then reduces the spread of host utilization.
//!
//! * Utilization of a host: `max(vCPU used / vCPU capacity, memory used /
//!   memory capacity)`, over Ready workers.
//! * Imbalance: population standard deviation of that utilization.
//! * Gain of a move: how much it lowers the sum of squared deviations from
//!   the mean utilization (utilization² units; a balance move between two
//!   hosts gains at most 2). Drain moves are mandatory and may have a
//!   negative gain; it is reported anyway.
//! * Threshold 1..=5 (1 conservative, 5 aggressive): 1 plans only drain
//!   moves; higher thresholds stop at a lower imbalance and accept smaller
//!   gains (see [`tolerance`] and [`min_gain`]).
//!
//! Moves are planned on a private copy and applied to it one by one, each
//! checked by the same filters as placement (capacity, NUMA, GPUs, hard
//! anti-affinity, status), so every intermediate state is valid. VMs in
//! affinity groups are never moved (moving one would split the group).

use crate::filter;
use crate::model::{GroupPolicy, HostId, VmId};
use crate::state::ClusterState;
use crate::status::HostStatus;
use serde::Serialize;
use std::collections::BTreeSet;

/// Planner settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RebalanceOptions {
    /// Aggressiveness, 1..=5 (clamped).
    pub threshold: u8,
    /// Upper bound on the number of moves.
    pub max_moves: usize,
}

impl Default for RebalanceOptions {
    fn default() -> Self {
        RebalanceOptions {
            threshold: 3,
            max_moves: 50,
        }
    }
}

/// Why a move was planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveReason {
    /// Emptying a draining host.
    Drain,
    /// Reducing imbalance.
    Balance,
}

/// One live migration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Move {
    /// VM to move.
    pub vm: VmId,
    /// Source host.
    pub from: HostId,
    /// Destination host.
    pub to: HostId,
    /// Why.
    pub reason: MoveReason,
    /// Reduction of the sum of squared deviations (may be negative for
    /// drain moves).
    pub gain: f64,
    /// Imbalance (standard deviation) after this move.
    pub imbalance_after: f64,
}

/// The planner's output.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RebalancePlan {
    /// Moves, to be executed in order.
    pub moves: Vec<Move>,
    /// Imbalance before any move.
    pub imbalance_before: f64,
    /// Imbalance after all moves.
    pub imbalance_after: f64,
    /// VMs on draining hosts that could not be moved.
    pub unmovable: Vec<VmId>,
}

/// Imbalance at which balancing stops, per threshold; `None` for 1
/// (drain only).
pub fn tolerance(threshold: u8) -> Option<f64> {
    match threshold.clamp(1, 5) {
        1 => None,
        2 => Some(0.25),
        3 => Some(0.15),
        4 => Some(0.08),
        _ => Some(0.03),
    }
}

/// Smallest gain a balance move must bring, per threshold.
pub fn min_gain(threshold: u8) -> f64 {
    match threshold.clamp(1, 5) {
        1 => f64::INFINITY,
        2 => 0.10,
        3 => 0.05,
        4 => 0.02,
        _ => 0.005,
    }
}

const KEY_SCALE: f64 = 1e9;
const SOURCES: usize = 4;
const DESTS: usize = 4;
const SCAN: usize = 64;

struct Balancer {
    st: ClusterState,
    util: Vec<f64>,
    order: BTreeSet<(u64, HostId)>,
    sum: f64,
    sumsq: f64,
}

fn host_util(st: &ClusterState, h: HostId) -> f64 {
    let x = st.host(h);
    let c = f64::from(x.used_vcpu) / f64::from(x.cap_vcpu.max(1));
    let m = x.used_mem as f64 / x.cap_mem.max(1) as f64;
    c.max(m)
}

fn key(u: f64) -> u64 {
    (u.clamp(0.0, 4.0) * KEY_SCALE).round() as u64
}

impl Balancer {
    fn new(st: &ClusterState) -> Self {
        let st = st.clone();
        let mut b = Balancer {
            util: vec![0.0; st.hosts().len()],
            order: BTreeSet::new(),
            sum: 0.0,
            sumsq: 0.0,
            st,
        };
        for h in 0..b.util.len() as HostId {
            if b.st.host(h).eligible() {
                let u = host_util(&b.st, h);
                b.util[h as usize] = u;
                b.order.insert((key(u), h));
                b.sum += u;
                b.sumsq += u * u;
            }
        }
        b
    }

    fn n(&self) -> f64 {
        self.order.len().max(1) as f64
    }

    fn ssd(&self, sum: f64, sumsq: f64) -> f64 {
        sumsq - sum * sum / self.n()
    }

    fn imbalance(&self) -> f64 {
        (self.ssd(self.sum, self.sumsq) / self.n()).max(0.0).sqrt()
    }

    fn in_set(&self, h: HostId) -> bool {
        self.order.contains(&(key(self.util[h as usize]), h))
    }

    /// Utilization of `h` after adding (sign 1) or removing (-1) the VM.
    fn util_with(&self, h: HostId, vm: VmId, sign: i64) -> f64 {
        let x = self.st.host(h);
        let Some(p) = self.st.vm(vm) else {
            return self.util[h as usize];
        };
        let c = (i64::from(x.used_vcpu) + sign * i64::from(p.vm.vcpus)) as f64
            / f64::from(x.cap_vcpu.max(1));
        let m =
            (x.used_mem as i64 + sign * p.vm.memory_mib as i64) as f64 / x.cap_mem.max(1) as f64;
        c.max(m)
    }

    fn gain(&self, vm: VmId, from: HostId, to: HostId) -> f64 {
        let (mut sum, mut sumsq) = (self.sum, self.sumsq);
        if self.in_set(from) {
            let (old, new) = (self.util[from as usize], self.util_with(from, vm, -1));
            sum += new - old;
            sumsq += new * new - old * old;
        }
        let (old, new) = (self.util[to as usize], self.util_with(to, vm, 1));
        sum += new - old;
        sumsq += new * new - old * old;
        self.ssd(self.sum, self.sumsq) - self.ssd(sum, sumsq)
    }

    fn refresh(&mut self, h: HostId) {
        if !self.in_set(h) {
            return;
        }
        let old = self.util[h as usize];
        self.order.remove(&(key(old), h));
        let new = host_util(&self.st, h);
        self.util[h as usize] = new;
        self.order.insert((key(new), h));
        self.sum += new - old;
        self.sumsq += new * new - old * old;
    }

    fn movable(&self, vm: VmId) -> bool {
        self.st.vm(vm).is_some_and(|p| {
            !matches!(
                self.st.group_policy(&p.vm),
                Some((_, GroupPolicy::Affinity))
            )
        })
    }

    fn apply(&mut self, vm: VmId, to: HostId, reason: MoveReason, out: &mut RebalancePlan) {
        let gain = match self.st.vm(vm) {
            Some(p) => self.gain(vm, p.host, to),
            None => return,
        };
        let Some(p) = self.st.remove(vm) else { return };
        let from = p.host;
        let numa = if p.vm.numa_strict {
            self.st.host(to).best_numa(p.vm.vcpus, p.vm.memory_mib)
        } else {
            None
        };
        self.st.add(p.vm, to, numa);
        self.refresh(from);
        self.refresh(to);
        out.moves.push(Move {
            vm,
            from,
            to,
            reason,
            gain,
            imbalance_after: self.imbalance(),
        });
    }

    /// Least-utilized feasible destinations for `vm`, at most `want`.
    fn destinations(&self, vm: VmId, from: HostId, want: usize, limit: usize) -> Vec<HostId> {
        let Some(p) = self.st.vm(vm) else {
            return Vec::new();
        };
        self.order
            .iter()
            .map(|e| e.1)
            .filter(|h| *h != from)
            .take(limit)
            .filter(|h| filter::first_rejection(&self.st, *h, &p.vm).is_none())
            .take(want)
            .collect()
    }
}

/// Plans migrations on a copy of `st`; `st` is not modified.
pub fn plan(st: &ClusterState, opts: &RebalanceOptions) -> RebalancePlan {
    let mut b = Balancer::new(st);
    let mut out = RebalancePlan {
        imbalance_before: b.imbalance(),
        ..RebalancePlan::default()
    };
    // 1. Drains (mandatory).
    let draining: Vec<HostId> = (0..st.hosts().len() as HostId)
        .filter(|h| st.host(*h).status == HostStatus::Draining)
        .collect();
    for h in draining {
        for vm in b.st.host(h).vms.clone() {
            if out.moves.len() >= opts.max_moves {
                break;
            }
            let dest = if b.movable(vm) {
                b.destinations(vm, h, 1, usize::MAX).first().copied()
            } else {
                None
            };
            match dest {
                Some(to) => b.apply(vm, to, MoveReason::Drain, &mut out),
                None => out.unmovable.push(vm),
            }
        }
    }
    // 2. Balance.
    if let Some(tol) = tolerance(opts.threshold) {
        let floor = min_gain(opts.threshold);
        while out.moves.len() < opts.max_moves && b.imbalance() > tol {
            let sources: Vec<HostId> = b.order.iter().rev().take(SOURCES).map(|e| e.1).collect();
            let mut best: Option<(f64, VmId, HostId)> = None;
            for src in sources {
                for vm in b.st.host(src).vms.clone() {
                    if !b.movable(vm) {
                        continue;
                    }
                    for to in b.destinations(vm, src, DESTS, SCAN) {
                        let g = b.gain(vm, src, to);
                        if best.is_none_or(|(bg, _, _)| g > bg) {
                            best = Some((g, vm, to));
                        }
                    }
                }
            }
            match best {
                Some((g, vm, to)) if g >= floor => b.apply(vm, to, MoveReason::Balance, &mut out),
                _ => break,
            }
        }
    }
    out.imbalance_after = b.imbalance();
    out
}

/// Replays `moves` on a copy of `st`, checking before each step that the
/// destination passes every filter, and after each step that no host is
/// over capacity and no hard anti-affinity group is broken.
pub fn validate_moves(st: &ClusterState, moves: &[Move]) -> Result<(), String> {
    let mut s = st.clone();
    for (i, m) in moves.iter().enumerate() {
        let p = s
            .vm(m.vm)
            .ok_or(format!("step {i}: vm {} not placed", m.vm))?;
        if p.host != m.from {
            return Err(format!(
                "step {i}: vm {} is on {}, not {}",
                m.vm, p.host, m.from
            ));
        }
        if let Some(r) = filter::first_rejection(&s, m.to, &p.vm) {
            return Err(format!("step {i}: host {} refuses vm {}: {r}", m.to, m.vm));
        }
        let Some(p) = s.remove(m.vm) else {
            return Err(format!("step {i}: vm {} vanished", m.vm));
        };
        let numa = if p.vm.numa_strict {
            s.host(m.to).best_numa(p.vm.vcpus, p.vm.memory_mib)
        } else {
            None
        };
        s.add(p.vm, m.to, numa);
        s.check_capacity().map_err(|e| format!("step {i}: {e}"))?;
        let v = s.anti_affinity_violations();
        if v != 0 {
            return Err(format!("step {i}: {v} anti-affinity violations"));
        }
    }
    Ok(())
}
