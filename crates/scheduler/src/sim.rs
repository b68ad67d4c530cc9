//! Simulator: replays a [`Scenario`] trace against the engine and three
//! baselines (first fit, spread, random) in the same run and reports
//! throughput, latency, pending VMs, stranded capacity, anti-affinity
//! violations and migrations. Time comes from a caller-supplied clock, so
//! the crate itself reads no clock; results other than timings are fully
//! determined by the scenario and seed.
//!
//! * `placements_per_s`: successful placements divided by the time spent
//!   inside the engine's placement calls (first attempts, retries of
//!   pending VMs and restarts after failures).
//! * `p50_us` / `p99_us`: per-decision latency percentiles.
//! * `pending`: VMs still waiting at the end of the trace.
//! * `stranded`: mean over samples taken through the trace of the free
//!   capacity on Ready workers where no VM shape of the workload fits, as
//!   a fraction of their capacity (mean of the vCPU and memory fractions).
//! * `anti_affinity_violations`: hard anti-affinity members sharing a
//!   host, counted from VM locations at the end (must be 0).
//! * `migrations`: live migrations applied for drains and rebalancing.

use crate::engine::{Decision, EngineConfig, Session, Strategy};
use crate::error::SimError;
use crate::model::{HostId, VmSpec};
use crate::rebalance::RebalanceOptions;
use crate::scenario::{Scenario, TraceKind};
use crate::score::Weights;
use crate::status::{HostEvent, HostStatus};
use serde::Serialize;
use std::collections::{BTreeSet, VecDeque};

/// Simulator options (what `ray sim` passes).
#[derive(Clone, Debug, PartialEq)]
pub struct SimOptions {
    /// Hosts of a generated scenario (ignored with `scenario`).
    pub hosts: u32,
    /// Arrivals of a generated scenario (ignored with `scenario`).
    pub vms: u32,
    /// Seed of the generator and of the random baseline.
    pub seed: u64,
    /// YAML scenario text; when set, replaces the generated one.
    pub scenario: Option<String>,
    /// Rebalancing aggressiveness 1..=5.
    pub rebalance_threshold: u8,
    /// Rebalance after this many arrivals; `None`: a tenth of the
    /// arrivals; `Some(0)`: never (drains are still handled).
    pub rebalance_every: Option<u64>,
    /// Upper bound on moves per rebalancing round.
    pub max_moves: usize,
    /// Run the three baselines too.
    pub baselines: bool,
    /// Feasible hosts the engine scores per decision.
    pub candidates: usize,
    /// Scorer weights of the engine.
    pub weights: Weights,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            hosts: 1000,
            vms: 10_000,
            seed: 1,
            scenario: None,
            rebalance_threshold: 3,
            rebalance_every: None,
            max_moves: 50,
            baselines: true,
            candidates: 4,
            weights: Weights::default(),
        }
    }
}

/// Results of one strategy.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StrategyReport {
    /// Successful placements per second of engine time.
    pub placements_per_s: f64,
    /// Median decision latency, µs.
    pub p50_us: f64,
    /// 99th percentile decision latency, µs.
    pub p99_us: f64,
    /// VMs still pending at the end.
    pub pending: u64,
    /// Stranded capacity, fraction of Ready worker capacity.
    pub stranded: f64,
    /// Hard anti-affinity violations at the end (must be 0).
    pub anti_affinity_violations: u64,
    /// Successful placements (including restarts and evicted VMs placed
    /// again).
    pub placements: u64,
    /// Placement decisions taken.
    pub decisions: u64,
    /// Lower-tier VMs evicted by preemption.
    pub evictions: u64,
    /// VMs restarted because their host failed.
    pub failovers: u64,
    /// Live migrations applied (drains and rebalancing).
    pub migrations: u64,
    /// Host events the state machine refused (e.g. failing a failed host).
    pub ignored_host_events: u64,
    /// Whether the final state passed the independent capacity check.
    pub capacity_ok: bool,
    /// Total engine time in placement calls, ms.
    pub engine_ms: f64,
    /// Why the first VM still pending at the end waits (the filter
    /// explanation a user would see), if any.
    pub pending_example: Option<String>,
}

/// The three baselines.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Baselines {
    /// Lowest host id that fits.
    pub first_fit: StrategyReport,
    /// Least allocated.
    pub spread: StrategyReport,
    /// Uniformly random feasible host.
    pub random: StrategyReport,
}

/// Engine results relative to each baseline on the same trace.
/// Placements/s ratios: higher is better. Stranded ratios: lower is
/// better, at most 1 vs first fit is the target; 1 when both are 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Ratios {
    /// Engine placements/s divided by first fit's.
    pub placements_per_s_vs_first_fit: f64,
    /// Engine stranded divided by first fit's.
    pub stranded_vs_first_fit: f64,
    /// Engine placements/s divided by spread's.
    pub placements_per_s_vs_spread: f64,
    /// Engine stranded divided by spread's.
    pub stranded_vs_spread: f64,
    /// Engine placements/s divided by random's.
    pub placements_per_s_vs_random: f64,
    /// Engine stranded divided by random's.
    pub stranded_vs_random: f64,
}

/// Everything `ray sim --json` prints.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SimReport {
    /// Hosts in the scenario.
    pub hosts: usize,
    /// Arrivals in the trace.
    pub vms: usize,
    /// Seed used.
    pub seed: u64,
    /// The engine's results.
    #[serde(flatten)]
    pub engine: StrategyReport,
    /// Baselines on the same trace (zeros if not run).
    pub baselines: Baselines,
    /// Engine vs first fit.
    pub ratios: Ratios,
}

impl SimReport {
    /// Human-readable table.
    pub fn render_table(&self) -> String {
        let mut s = format!(
            "ray sim: {} hosts, {} VMs, seed {}\n{:<10} {:>12} {:>9} {:>9} {:>8} {:>9} {:>6} {:>10} {:>9} {:>10}\n",
            self.hosts, self.vms, self.seed, "strategy", "placements/s", "p50 µs", "p99 µs", "pending", "stranded", "AA-vio", "migrations", "evictions", "placements"
        );
        let rows = [
            ("engine", &self.engine),
            ("first_fit", &self.baselines.first_fit),
            ("spread", &self.baselines.spread),
            ("random", &self.baselines.random),
        ];
        for (name, r) in rows {
            s.push_str(&format!(
                "{:<10} {:>12.0} {:>9.2} {:>9.2} {:>8} {:>8.2}% {:>6} {:>10} {:>9} {:>10}\n",
                name,
                r.placements_per_s,
                r.p50_us,
                r.p99_us,
                r.pending,
                r.stranded * 100.0,
                r.anti_affinity_violations,
                r.migrations,
                r.evictions,
                r.placements
            ));
        }
        let r = &self.ratios;
        for (name, p, st) in [
            (
                "first_fit",
                r.placements_per_s_vs_first_fit,
                r.stranded_vs_first_fit,
            ),
            ("spread", r.placements_per_s_vs_spread, r.stranded_vs_spread),
            ("random", r.placements_per_s_vs_random, r.stranded_vs_random),
        ] {
            s.push_str(&format!(
                "engine vs {name}: placements/s x{p:.2}, stranded x{st:.2}\n"
            ));
        }
        s
    }
}

/// Runs the simulator. `clock` returns monotonic nanoseconds (e.g. from
/// `std::time::Instant`); it is only used for timings.
pub fn run_sim(opts: &SimOptions, clock: &dyn Fn() -> u64) -> Result<SimReport, SimError> {
    if !(1..=5).contains(&opts.rebalance_threshold) {
        return Err(SimError::Option {
            option: "rebalance_threshold",
            value: opts.rebalance_threshold.to_string(),
            expected: "1 to 5",
        });
    }
    if opts.candidates == 0 {
        return Err(SimError::Option {
            option: "candidates",
            value: "0".into(),
            expected: "at least 1",
        });
    }
    let (scn, seed) = match &opts.scenario {
        Some(text) => {
            let s = Scenario::from_yaml(text)?;
            let seed = s.seed.unwrap_or(opts.seed);
            (s, seed)
        }
        None => {
            if opts.hosts == 0 {
                return Err(SimError::Option {
                    option: "hosts",
                    value: "0".into(),
                    expected: "at least 1",
                });
            }
            (
                Scenario::generate(opts.hosts, opts.vms, opts.seed),
                opts.seed,
            )
        }
    };
    let engine = run_strategy(&scn, Strategy::BestFit, seed, opts, clock)?;
    let baselines = if opts.baselines {
        Baselines {
            first_fit: run_strategy(&scn, Strategy::FirstFit, seed, opts, clock)?,
            spread: run_strategy(&scn, Strategy::Spread, seed, opts, clock)?,
            random: run_strategy(&scn, Strategy::Random, seed, opts, clock)?,
        }
    } else {
        Baselines::default()
    };
    let (ff, sp, rn) = (&baselines.first_fit, &baselines.spread, &baselines.random);
    let ratios = Ratios {
        placements_per_s_vs_first_fit: ratio(engine.placements_per_s, ff.placements_per_s),
        stranded_vs_first_fit: ratio(engine.stranded, ff.stranded),
        placements_per_s_vs_spread: ratio(engine.placements_per_s, sp.placements_per_s),
        stranded_vs_spread: ratio(engine.stranded, sp.stranded),
        placements_per_s_vs_random: ratio(engine.placements_per_s, rn.placements_per_s),
        stranded_vs_random: ratio(engine.stranded, rn.stranded),
    };
    Ok(SimReport {
        hosts: scn.snapshot.hosts.len(),
        vms: scn.arrivals(),
        seed,
        engine,
        baselines,
        ratios,
    })
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        if a == 0.0 {
            1.0
        } else {
            f64::INFINITY
        }
    } else {
        a / b
    }
}

/// Pending VMs retried after each departure or host return.
const RETRIES: usize = 4;
/// Stranded-capacity samples over the trace.
const SAMPLES: usize = 50;

struct Runner<'a> {
    session: Session,
    clock: &'a dyn Fn() -> u64,
    pending: VecDeque<VmSpec>,
    gone: BTreeSet<u64>,
    lat: Vec<u64>,
    rep: StrategyReport,
    engine_ns: u64,
}

impl Runner<'_> {
    fn place(&mut self, vm: VmSpec, preempt: bool) -> Result<(), SimError> {
        self.session.set_preemption(preempt);
        let t0 = (self.clock)();
        let d = self.session.place(&vm)?;
        let dt = (self.clock)().saturating_sub(t0);
        self.lat.push(dt);
        self.engine_ns += dt;
        self.rep.decisions += 1;
        match d {
            Decision::Placed { evicted, .. } => {
                self.rep.placements += 1;
                self.rep.evictions += evicted.len() as u64;
                self.pending.extend(evicted.into_iter().map(|e| e.vm));
            }
            Decision::Pending(_) => self.pending.push_back(vm),
        }
        Ok(())
    }

    fn retry(&mut self) -> Result<(), SimError> {
        for _ in 0..RETRIES.min(self.pending.len()) {
            let Some(vm) = self.pending.pop_front() else {
                break;
            };
            if self.gone.remove(&vm.id) {
                continue;
            }
            self.place(vm, false)?;
        }
        Ok(())
    }

    fn event(&mut self, h: HostId, e: HostEvent) -> Result<bool, SimError> {
        match self.session.host_event(h, e) {
            Ok(lost) => {
                self.rep.failovers += lost.len() as u64;
                for p in lost {
                    self.place(p.vm, true)?;
                }
                Ok(true)
            }
            Err(crate::EngineError::Transition { .. }) => {
                self.rep.ignored_host_events += 1;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn rebalance(&mut self, threshold: u8, max_moves: usize) -> Result<(), SimError> {
        let plan = self.session.rebalance_plan(&RebalanceOptions {
            threshold,
            max_moves,
        });
        for m in &plan.moves {
            self.session.migrate(m.vm, m.to)?;
            self.rep.migrations += 1;
        }
        let drained: Vec<HostId> = (0..self.session.state().hosts().len() as HostId)
            .filter(|h| {
                let x = self.session.state().host(*h);
                x.status == HostStatus::Draining && x.vms.is_empty()
            })
            .collect();
        for h in drained {
            self.event(h, HostEvent::DrainComplete)?;
        }
        Ok(())
    }

    fn stranded(&self, shapes: &[(u32, u64)]) -> f64 {
        let st = self.session.state();
        let (mut cap_v, mut cap_m, mut sv, mut sm) = (0u64, 0u64, 0u64, 0u64);
        for h in st.hosts().iter().filter(|h| h.eligible()) {
            cap_v += u64::from(h.cap_vcpu);
            cap_m += h.cap_mem;
            let (fv, fm) = (h.free_vcpu(), h.free_mem());
            if !shapes.iter().any(|s| s.0 <= fv && s.1 <= fm) {
                sv += u64::from(fv);
                sm += fm;
            }
        }
        if cap_v == 0 || cap_m == 0 {
            return 0.0;
        }
        (sv as f64 / cap_v as f64 + sm as f64 / cap_m as f64) / 2.0
    }
}

fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// Runs one strategy over the whole trace.
pub fn run_strategy(
    scn: &Scenario,
    strategy: Strategy,
    seed: u64,
    opts: &SimOptions,
    clock: &dyn Fn() -> u64,
) -> Result<StrategyReport, SimError> {
    let cfg = EngineConfig {
        strategy,
        candidates: opts.candidates,
        weights: opts.weights,
        seed,
        ..EngineConfig::default()
    };
    let mut r = Runner {
        session: Session::new(&scn.snapshot, cfg).map_err(SimError::Engine)?,
        clock,
        pending: VecDeque::new(),
        gone: BTreeSet::new(),
        lat: Vec::with_capacity(scn.trace.len()),
        rep: StrategyReport::default(),
        engine_ns: 0,
    };
    let shapes = scn.shapes();
    let sample_every = (scn.trace.len() / SAMPLES).max(1);
    let (mut stranded_sum, mut samples) = (0.0, 0u32);
    let mut since_rebalance = 0u64;
    let every = opts
        .rebalance_every
        .unwrap_or((scn.arrivals() as u64 / 10).max(1));
    for (i, ev) in scn.trace.iter().enumerate() {
        match &ev.kind {
            TraceKind::Arrive(vm) => {
                r.place(vm.clone(), true)?;
                since_rebalance += 1;
                if since_rebalance == every {
                    since_rebalance = 0;
                    r.rebalance(opts.rebalance_threshold, opts.max_moves)?;
                }
            }
            TraceKind::Depart(id) => {
                if r.session.state().vm(*id).is_some() {
                    let t0 = clock();
                    r.session.release(*id)?;
                    r.engine_ns += clock().saturating_sub(t0);
                    r.retry()?;
                } else {
                    r.gone.insert(*id);
                }
            }
            TraceKind::Fail(h) => {
                r.event(*h, HostEvent::Fault)?;
            }
            TraceKind::Recover(h) => {
                if r.event(*h, HostEvent::Recover)? && r.event(*h, HostEvent::RejoinOk)? {
                    r.retry()?;
                }
            }
            TraceKind::Drain(h) => {
                if r.event(*h, HostEvent::Drain)? {
                    r.rebalance(1, usize::MAX)?;
                }
            }
            TraceKind::Return(h) => {
                if r.event(*h, HostEvent::PowerOn)? && r.event(*h, HostEvent::InitOk)? {
                    r.retry()?;
                }
            }
        }
        if (i + 1) % sample_every == 0 {
            stranded_sum += r.stranded(&shapes);
            samples += 1;
        }
    }
    let gone = std::mem::take(&mut r.gone);
    r.rep.pending = r.pending.iter().filter(|v| !gone.contains(&v.id)).count() as u64;
    r.rep.pending_example = r
        .pending
        .iter()
        .find(|v| !gone.contains(&v.id))
        .map(|v| format!("vm {}: {}", v.id, r.session.explain(v).summary()));
    let st = r.session.state();
    r.rep.anti_affinity_violations = st.anti_affinity_violations();
    r.rep.capacity_ok = st.check_capacity().is_ok();
    r.rep.stranded = if samples == 0 {
        r.stranded(&shapes)
    } else {
        stranded_sum / f64::from(samples)
    };
    r.lat.sort_unstable();
    r.rep.p50_us = percentile_us(&r.lat, 0.50);
    r.rep.p99_us = percentile_us(&r.lat, 0.99);
    r.rep.engine_ms = r.engine_ns as f64 / 1e6;
    r.rep.placements_per_s = if r.engine_ns == 0 {
        0.0
    } else {
        r.rep.placements as f64 * 1e9 / r.engine_ns as f64
    };
    Ok(r.rep)
}
