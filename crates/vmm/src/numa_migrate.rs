//! The access-driven page migration policy acting on a running VM: every window, the
//! dirty rings' attribution ([`crate::vstate::dirty_ring`]) becomes one observation per
//! 2 MiB range ([`observe`]: where its pages are, which host node's vCPUs wrote it),
//! [`ray_numa::policy::decide`] decides, and the moves are made with `move_pages`. Every
//! decision with evidence is kept for `ray numa explain` and every move and window
//! summary goes to the decision log (and `vmm.log`).
//!
//! A vCPU's host node is the first host node of its guest node; a range's node is where
//! most of a sample of its present pages are. Without guest NUMA nodes a VM has no host
//! node per vCPU, and nothing is decided.
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ray_api::vmm::{NumaMigrationConfig, NumaMigrationMode, NumaMigrationReport};
use ray_numa::policy::{decide, Decision, PolicyConfig, RangeObservation};

use crate::logging::SpawnInSpan;
use crate::memory::{MemoryManager, WeakMemory};
use crate::numa::GuestNuma;
use crate::vstate::dirty_ring::{Attribution, DirtyRings, RANGE_BYTES};

/// Lines of the decision log kept.
const LOG_LINES: usize = 256;
/// Pages of a range asked about to find its node.
const RANGE_SAMPLES: usize = 64;
const PAGE: u64 = 4096;

/// One window's observations: each range with attributed writes, its node (from
/// `range_node`), the writes by host node (each vCPU's from `vcpu_node`; vCPUs with no
/// node are left out) and the windows since it last moved (`moved`).
pub fn observe(
    att: &Attribution,
    vcpu_node: &[Option<u32>],
    range_node: impl Fn(u64) -> Option<u32>,
    moved: &BTreeMap<u64, u32>,
) -> Vec<RangeObservation> {
    att.ranges
        .iter()
        .filter_map(|(&gpa, per_vcpu)| {
            let node = range_node(gpa)?;
            let mut accesses: Vec<(u32, u64)> = Vec::new();
            for (v, &n) in per_vcpu.iter().enumerate() {
                let Some(host) = vcpu_node.get(v).copied().flatten() else {
                    continue;
                };
                match accesses.iter_mut().find(|a| a.0 == host) {
                    Some(a) => a.1 += n,
                    None => accesses.push((host, n)),
                }
            }
            accesses.retain(|a| a.1 > 0);
            accesses.sort_unstable();
            (!accesses.is_empty()).then(|| RangeObservation {
                gpa,
                bytes: RANGE_BYTES,
                node,
                accesses,
                windows_since_move: moved.get(&gpa).copied(),
            })
        })
        .collect()
}

/// The share of `obs`'s accesses made by a node other than the range's.
pub fn remote_share(obs: &[RangeObservation]) -> (f64, u64) {
    let total: u64 = obs.iter().flat_map(|o| &o.accesses).map(|a| a.1).sum();
    let remote: u64 = obs
        .iter()
        .flat_map(|o| o.accesses.iter().filter(move |a| a.0 != o.node))
        .map(|a| a.1)
        .sum();
    (remote as f64 / total.max(1) as f64, total)
}

/// The policy's settings for `cfg`.
pub fn policy_config(cfg: &NumaMigrationConfig) -> PolicyConfig {
    PolicyConfig {
        enabled: cfg.mode != NumaMigrationMode::Off,
        dry_run: cfg.mode == NumaMigrationMode::DryRun,
        rate_limit_mib_s: cfg.rate_limit_mib_s,
        window_s: cfg.window_ms as f64 / 1e3,
        ..PolicyConfig::default()
    }
}

#[derive(Default)]
struct State {
    windows: u64,
    moved_bytes: u64,
    pending: u64,
    /// Windows since each moved range moved.
    moved: BTreeMap<u64, u32>,
    last_window: Vec<String>,
    log: VecDeque<String>,
}

/// The policy of one VM, deciding on a thread of its own every window.
pub struct Migrator {
    vm: String,
    /// The settings, changed at run time by `PUT /vm/numa/policy`.
    cfg: Mutex<NumaMigrationConfig>,
    vcpu_node: Vec<Option<u32>>,
    rings: Weak<DirtyRings>,
    memory: WeakMemory,
    state: Mutex<State>,
}

impl Migrator {
    /// Starts deciding for VM `vm` every `cfg.window_ms`; the thread ends when the
    /// returned handle, the rings or the memory go.
    pub fn start(
        vm: &str,
        cfg: &NumaMigrationConfig,
        numa: &GuestNuma,
        vcpus: u8,
        rings: &Arc<DirtyRings>,
        memory: &MemoryManager,
    ) -> std::io::Result<Arc<Self>> {
        let vcpu_node = (0..vcpus)
            .map(|v| {
                numa.nodes
                    .iter()
                    .find(|n| n.cpus.contains(&v))
                    .and_then(|n| n.host_nodes.first().copied())
            })
            .collect();
        let me = Arc::new(Self {
            vm: vm.to_string(),
            cfg: Mutex::new(cfg.clone()),
            vcpu_node,
            rings: Arc::downgrade(rings),
            memory: memory.downgrade(),
            state: Mutex::default(),
        });
        // A fresh window from now: writes before the policy started are not evidence.
        rings.take_attribution();
        let weak = Arc::downgrade(&me);
        std::thread::Builder::new()
            .name("numa-policy".into())
            .stack_size(256 << 10)
            .spawn_in_span(move || {
                crate::seccomp::enter(crate::seccomp::Kind::Harvester);
                // The window is read again before each sleep: a change takes effect
                // from the next window on.
                let mut window = Duration::from_millis(cfg_window(&weak));
                loop {
                    std::thread::sleep(window);
                    match weak.upgrade() {
                        Some(m) => {
                            if !m.window() {
                                return;
                            }
                            window = Duration::from_millis(m.config().window_ms);
                        }
                        None => return,
                    }
                }
            })?;
        Ok(me)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The settings in force.
    pub fn config(&self) -> NumaMigrationConfig {
        self.cfg.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `cfg` in force from the next window on (checked by the caller) and records
    /// the change, said by `by`, in the decision log. Leaving `off` starts a fresh window:
    /// writes made while the policy was off are not evidence.
    pub fn set_config(&self, cfg: &NumaMigrationConfig, by: &str) {
        let old = {
            let mut c = self.cfg.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *c, cfg.clone())
        };
        if old.mode == NumaMigrationMode::Off && cfg.mode != NumaMigrationMode::Off {
            if let Some(rings) = self.rings.upgrade() {
                rings.take_attribution();
            }
        }
        let line = format!(
            "VM {}: policy changed by {by}: {}",
            self.vm,
            describe_change(&old, cfg)
        );
        tracing::info!("{line}");
        self.push_log(line);
    }

    /// Adds `what` about this VM to the decision log (and `vmm.log`).
    pub fn record(&self, what: &str) {
        let line = format!("VM {}: {what}", self.vm);
        tracing::info!("{line}");
        self.push_log(line);
    }

    fn push_log(&self, line: String) {
        let mut st = self.lock();
        st.log.push_back(line);
        while st.log.len() > LOG_LINES {
            st.log.pop_front();
        }
    }

    /// Decides (and acts on) one window; false once the VM's rings or memory are gone.
    fn window(&self) -> bool {
        let (Some(rings), Some(memory)) = (self.rings.upgrade(), self.memory.upgrade()) else {
            return false;
        };
        let cfg = self.config();
        if cfg.mode == NumaMigrationMode::Off {
            // The per-VM off switch: nothing decided, nothing counted as a window.
            return true;
        }
        let att = rings.take_attribution();
        let policy = policy_config(&cfg);
        let moved = self.lock().moved.clone();
        let obs = observe(
            &att,
            &self.vcpu_node,
            |gpa| range_node(&memory, gpa),
            &moved,
        );
        let decisions = decide(&policy, &obs);
        let window_s = att.window.as_secs_f64();
        let (remote_before, writes) = remote_share(&obs);
        let started = Instant::now();
        let mut moved_now = 0u64;
        let mut after = obs.clone();
        let mut lines = Vec::with_capacity(decisions.len());
        let mut log = Vec::new();
        for d in &decisions {
            let mut line = d.explain(&self.vm, round(window_s));
            if let Decision::Move {
                gpa,
                bytes,
                to,
                dry_run: false,
                ..
            } = *d
            {
                match move_range(&memory, gpa, bytes, to) {
                    Ok(pages) => {
                        moved_now += pages * PAGE;
                        if let Some(o) = after.iter_mut().find(|o| o.gpa == gpa) {
                            o.node = to;
                        }
                        line.push_str(&format!(": moved {pages} pages"));
                    }
                    Err(e) => line.push_str(&format!(": the move failed: {e}")),
                }
                log.push(line.clone());
            }
            lines.push(line);
        }
        let took = started.elapsed().as_secs_f64();
        let (remote_after, _) = remote_share(&after);
        let pending = decisions
            .iter()
            .filter(|d| matches!(d, Decision::Deferred { .. }))
            .count() as u64;
        let wanted = decisions
            .iter()
            .filter(|d| matches!(d, Decision::Move { .. }))
            .count();
        if wanted > 0 || pending > 0 {
            let verb = if cfg.mode == NumaMigrationMode::DryRun {
                format!("would move {wanted} ranges (dry run)")
            } else {
                format!("moved {:.1} MiB in {took:.2} s", mib(moved_now))
            };
            log.push(format!(
                "VM {}: {:.0}% remote of {writes} writes over {} s on {} ranges -> {verb}, remote now {:.0}%{}",
                self.vm,
                remote_before * 100.0,
                round(window_s),
                obs.len(),
                remote_after * 100.0,
                if pending > 0 {
                    format!(", {pending} ranges deferred by the rate limit")
                } else {
                    String::new()
                }
            ));
        }
        for l in &log {
            tracing::info!("{l}");
        }
        let mut st = self.lock();
        st.windows += 1;
        st.moved_bytes += moved_now;
        st.pending = pending;
        for w in st.moved.values_mut() {
            *w = w.saturating_add(1);
        }
        for d in &decisions {
            if let Decision::Move {
                gpa,
                dry_run: false,
                ..
            } = d
            {
                st.moved.insert(*gpa, 0);
            }
        }
        st.last_window = lines;
        st.log.extend(log);
        while st.log.len() > LOG_LINES {
            st.log.pop_front();
        }
        true
    }

    pub fn report(&self) -> NumaMigrationReport {
        let st = self.lock();
        NumaMigrationReport {
            config: self.config(),
            windows: st.windows,
            moved_bytes: st.moved_bytes,
            pending_moves: st.pending,
            last_window: st.last_window.clone(),
            log: st.log.iter().cloned().collect(),
        }
    }
}

/// The window of the policy behind `weak` (its thread starts before the first window).
fn cfg_window(weak: &Weak<Migrator>) -> u64 {
    weak.upgrade().map_or(1000, |m| m.config().window_ms)
}

/// `old -> new` for each setting that differs, e.g. `mode dry-run -> on, window 5000 ms
/// -> 1000 ms`; `no change` when none does.
pub fn describe_change(old: &NumaMigrationConfig, new: &NumaMigrationConfig) -> String {
    let mut parts = Vec::new();
    if old.mode != new.mode {
        parts.push(format!(
            "mode {} -> {}",
            mode_name(old.mode),
            mode_name(new.mode)
        ));
    }
    if old.window_ms != new.window_ms {
        parts.push(format!(
            "window {} ms -> {} ms",
            old.window_ms, new.window_ms
        ));
    }
    if old.rate_limit_mib_s != new.rate_limit_mib_s {
        parts.push(format!(
            "rate limit {} MiB/s -> {} MiB/s",
            old.rate_limit_mib_s, new.rate_limit_mib_s
        ));
    }
    if parts.is_empty() {
        "no change".into()
    } else {
        parts.join(", ")
    }
}

/// The mode as `ray numa policy --migrate` spells it.
pub fn mode_name(mode: NumaMigrationMode) -> &'static str {
    match mode {
        NumaMigrationMode::Off => "off",
        NumaMigrationMode::DryRun => "dry-run",
        NumaMigrationMode::On => "on",
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Seconds to 0.1 s, for the log.
fn round(s: f64) -> f64 {
    (s * 10.0).round() / 10.0
}

/// The host address of guest-physical `gpa`, with the bytes of its slot from there.
fn host_of(memory: &MemoryManager, gpa: u64) -> Option<(u64, u64)> {
    memory
        .slots()
        .find(|&(g, _, len)| gpa >= g && gpa - g < len)
        .map(|(g, host, len)| (host + (gpa - g), len - (gpa - g)))
}

/// The host node most of the range's present sampled pages are on; none when no page is.
fn range_node(memory: &MemoryManager, gpa: u64) -> Option<u32> {
    let (host, left) = host_of(memory, gpa)?;
    let len = left.min(RANGE_BYTES) as usize;
    // SAFETY: [host, host + len) lies inside a slot `memory` keeps mapped (the caller
    // holds it); move_pages only reports where pages are.
    let r = unsafe { ray_numa::locality::residency(host as *mut u8, len, RANGE_SAMPLES) }.ok()?;
    r.by_node.iter().max_by_key(|(_, c)| *c).map(|(n, _)| *n)
}

/// Moves the pages of `bytes` at `gpa` to host node `to`; returns how many are there now.
fn move_range(memory: &MemoryManager, gpa: u64, bytes: u64, to: u32) -> std::io::Result<u64> {
    let (host, left) = host_of(memory, gpa).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{gpa:#x} is not guest RAM"),
        )
    })?;
    let pages: Vec<*mut u8> = (0..bytes.min(left) / PAGE)
        .map(|k| (host + k * PAGE) as *mut u8)
        .collect();
    // SAFETY: the pages lie in a slot `memory` keeps mapped; move_pages keeps contents.
    let status = unsafe { ray_numa::sys::move_to(&pages, to as i32, 5) }?;
    Ok(status.iter().filter(|&&s| s == to as i32).count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two vCPUs on host nodes 0 and 1; ranges by where vCPU 1 wrote.
    fn window() -> Attribution {
        let mut ranges = BTreeMap::new();
        ranges.insert(0, vec![900, 100]); // mostly vCPU 0: stays on node 0
        ranges.insert(RANGE_BYTES, vec![10, 990]); // vCPU 1 on node 0's memory: moves
        ranges.insert(2 * RANGE_BYTES, vec![0, 20]); // too little evidence
        ranges.insert(3 * RANGE_BYTES, vec![0, 0]); // no writes: not observed
        Attribution {
            per_vcpu: vec![910, 1110],
            ranges,
            window: Duration::from_secs(5),
        }
    }

    #[test]
    fn observations_sum_each_host_nodes_vcpus_and_skip_what_has_no_node() {
        let moved = BTreeMap::from([(RANGE_BYTES, 4)]);
        let obs = observe(&window(), &[Some(0), Some(1)], |_| Some(0), &moved);
        assert_eq!(obs.len(), 3, "{obs:?}");
        assert_eq!(obs[1].accesses, vec![(0, 10), (1, 990)]);
        assert_eq!(obs[1].windows_since_move, Some(4));
        assert_eq!(obs[2].accesses, vec![(1, 20)]);
        // Two vCPUs of one host node count together; a vCPU without one not at all.
        let obs = observe(&window(), &[Some(1), Some(1)], |_| Some(0), &moved);
        assert_eq!(obs[0].accesses, vec![(1, 1000)]);
        let obs = observe(
            &window(),
            &[None, Some(1)],
            |g| (g != 0).then_some(0),
            &moved,
        );
        assert_eq!(obs.len(), 2, "range 0 has no node, vCPU 0 none either");
        assert_eq!(obs[0].accesses, vec![(1, 990)]);
    }

    #[test]
    fn a_window_decides_and_explains_each_range_in_dry_run() {
        let cfg = NumaMigrationConfig {
            mode: NumaMigrationMode::DryRun,
            ..NumaMigrationConfig::default()
        };
        let obs = observe(
            &window(),
            &[Some(0), Some(1)],
            |_| Some(0),
            &BTreeMap::new(),
        );
        let d: Vec<String> = decide(&policy_config(&cfg), &obs)
            .iter()
            .map(|d| d.explain("web", 5.0))
            .collect();
        assert_eq!(
            d,
            vec![
                "VM web: 99% of 1000 accesses to 0x200000 (+2.0 MiB) over 5 s came from host node 1's vCPUs, 99% remote on node 0 -> would move (dry run) to node 1 (local share +98 points)",
                "VM web: 0x0 (+2.0 MiB) stays on host node 0: 90% of 1000 accesses are local",
                "VM web: 0x400000 (+2.0 MiB) stays on host node 0: 20 attributed accesses, fewer than the 64 that count as evidence",
            ]
        );
        assert_eq!(remote_share(&obs), (1110.0 / 2020.0, 2020));
    }
}
