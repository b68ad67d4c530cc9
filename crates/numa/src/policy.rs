//! The access-driven page migration policy: which guest memory ranges to move to which
//! host node, from the accesses attributed to each node's vCPUs over one window. A pure
//! function of its inputs ([`decide`]), so every rule is unit-tested and every decision
//! explains itself in plain words and numbers ([`Decision::explain`]).
//!
//! The rules, in order:
//! 1. Off for the VM: nothing moves.
//! 2. Too few attributed accesses in the window (`min_accesses`): no evidence, it stays.
//! 3. The node with the most accesses must make more than `remote_threshold` (0.5: the
//!    majority) of them and not be where the range is; a range moved within the last
//!    `cooldown_windows` windows needs `remote_threshold + hysteresis`, so it does not
//!    ping-pong between two nodes that share it.
//! 4. Gain (the share of accesses that become local minus the share local now) must be
//!    at least `min_gain`.
//! 5. Rate limit: ranges are taken by expected gain in accesses; those beyond the window's
//!    byte budget (`rate_limit_mib_s` x window) are deferred to a later window.
//! 6. Dry run: the decisions are the same, nothing is moved ([`Decision::Move::dry_run`]).

/// What the policy knows about one range of guest memory over the window.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeObservation {
    /// Guest-physical start of the range.
    pub gpa: u64,
    pub bytes: u64,
    /// The host node its pages are on now.
    pub node: u32,
    /// Accesses attributed to each host node's vCPUs over the window, as (node, count).
    pub accesses: Vec<(u32, u64)>,
    /// Windows since this range was last moved (`None`: never).
    pub windows_since_move: Option<u32>,
}

/// The policy's settings for one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// The per-VM off switch.
    pub enabled: bool,
    pub dry_run: bool,
    /// Share of accesses a node must exceed to attract a range (0.5: the majority).
    pub remote_threshold: f64,
    /// Added to the threshold for a range moved within `cooldown_windows`.
    pub hysteresis: f64,
    pub cooldown_windows: u32,
    /// Least gain in local share worth a move.
    pub min_gain: f64,
    /// Fewest attributed accesses that count as evidence.
    pub min_accesses: u64,
    /// Most bytes moved per second of window.
    pub rate_limit_mib_s: f64,
    pub window_s: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dry_run: false,
            remote_threshold: 0.5,
            hysteresis: 0.15,
            cooldown_windows: 3,
            min_gain: 0.2,
            min_accesses: 64,
            rate_limit_mib_s: 256.0,
            window_s: 5.0,
        }
    }
}

/// What happens to one range, and why.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Move {
        gpa: u64,
        bytes: u64,
        from: u32,
        to: u32,
        /// Share of the window's accesses from `to`'s vCPUs.
        share: f64,
        /// Share that becomes local minus the share local now.
        gain: f64,
        accesses: u64,
        dry_run: bool,
    },
    Stay {
        gpa: u64,
        bytes: u64,
        node: u32,
        reason: String,
    },
    /// Worth moving, but beyond this window's rate budget.
    Deferred {
        gpa: u64,
        bytes: u64,
        from: u32,
        to: u32,
        share: f64,
    },
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

impl Decision {
    /// The decision log's line for VM `vm`, over a window of `window_s` seconds.
    pub fn explain(&self, vm: &str, window_s: f64) -> String {
        match self {
            Decision::Move {
                gpa,
                bytes,
                from,
                to,
                share,
                gain,
                accesses,
                dry_run,
            } => format!(
                "VM {vm}: {:.0}% of {accesses} accesses to {gpa:#x} (+{:.1} MiB) over {window_s} s came from host node {to}'s vCPUs, {:.0}% remote on node {from} -> {} to node {to} (local share +{:.0} points)",
                share * 100.0,
                mib(*bytes),
                share * 100.0,
                if *dry_run { "would move (dry run)" } else { "move" },
                gain * 100.0
            ),
            Decision::Stay { gpa, bytes, node, reason } => format!(
                "VM {vm}: {gpa:#x} (+{:.1} MiB) stays on host node {node}: {reason}",
                mib(*bytes)
            ),
            Decision::Deferred { gpa, bytes, from, to, share } => format!(
                "VM {vm}: {gpa:#x} (+{:.1} MiB) on host node {from}, {:.0}% of accesses from node {to}: deferred, over this window's rate limit",
                mib(*bytes),
                share * 100.0
            ),
        }
    }
}

/// Decides, for every range of `ranges`, whether it moves this window (see the module's
/// rules). Moves come first in the result, by expected gain in accesses.
pub fn decide(cfg: &PolicyConfig, ranges: &[RangeObservation]) -> Vec<Decision> {
    let stay = |r: &RangeObservation, reason: String| Decision::Stay {
        gpa: r.gpa,
        bytes: r.bytes,
        node: r.node,
        reason,
    };
    let mut out = Vec::new();
    // (expected gain in accesses, move)
    let mut wanted: Vec<(f64, Decision)> = Vec::new();
    for r in ranges {
        if !cfg.enabled {
            out.push(stay(r, "migration is off for this VM".into()));
            continue;
        }
        let total: u64 = r.accesses.iter().map(|a| a.1).sum();
        if total < cfg.min_accesses {
            out.push(stay(
                r,
                format!(
                    "{total} attributed accesses, fewer than the {} that count as evidence",
                    cfg.min_accesses
                ),
            ));
            continue;
        }
        let count = |node: u32| {
            r.accesses
                .iter()
                .filter(|a| a.0 == node)
                .map(|a| a.1)
                .sum::<u64>()
        };
        let (top, top_count) = r
            .accesses
            .iter()
            .fold((r.node, count(r.node)), |best, &(n, _)| {
                let c = count(n);
                if c > best.1 || (c == best.1 && n < best.0 && n != r.node) {
                    (n, c)
                } else {
                    best
                }
            });
        let share = top_count as f64 / total as f64;
        let local = count(r.node) as f64 / total as f64;
        if top == r.node {
            out.push(stay(
                r,
                format!("{:.0}% of {total} accesses are local", local * 100.0),
            ));
            continue;
        }
        let recent = r
            .windows_since_move
            .is_some_and(|w| w < cfg.cooldown_windows);
        let threshold = cfg.remote_threshold + if recent { cfg.hysteresis } else { 0.0 };
        if share <= threshold {
            out.push(stay(
                r,
                format!(
                    "node {top} makes {:.0}% of {total} accesses, not more than {:.0}%{}",
                    share * 100.0,
                    threshold * 100.0,
                    if recent {
                        " (moved recently: hysteresis)"
                    } else {
                        ""
                    }
                ),
            ));
            continue;
        }
        let gain = share - local;
        if gain < cfg.min_gain {
            out.push(stay(
                r,
                format!(
                    "moving to node {top} would make {:.0} points more local, less than {:.0}",
                    gain * 100.0,
                    cfg.min_gain * 100.0
                ),
            ));
            continue;
        }
        wanted.push((
            gain * total as f64,
            Decision::Move {
                gpa: r.gpa,
                bytes: r.bytes,
                from: r.node,
                to: top,
                share,
                gain,
                accesses: total,
                dry_run: cfg.dry_run,
            },
        ));
    }
    wanted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut budget = (cfg.rate_limit_mib_s * cfg.window_s * (1u64 << 20) as f64) as u64;
    let mut moves = Vec::new();
    for (_, d) in wanted {
        let Decision::Move {
            gpa,
            bytes,
            from,
            to,
            share,
            ..
        } = d
        else {
            continue;
        };
        if bytes <= budget {
            budget -= bytes;
            moves.push(d);
        } else {
            out.push(Decision::Deferred {
                gpa,
                bytes,
                from,
                to,
                share,
            });
        }
    }
    moves.extend(out);
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn range(gpa: u64, node: u32, accesses: &[(u32, u64)]) -> RangeObservation {
        RangeObservation {
            gpa,
            bytes: 2 * MIB,
            node,
            accesses: accesses.to_vec(),
            windows_since_move: None,
        }
    }

    fn moved(d: &[Decision]) -> Vec<(u64, u32)> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Move { gpa, to, .. } => Some((*gpa, *to)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_remote_majority_moves_the_range_and_says_why() {
        let cfg = PolicyConfig::default();
        let d = decide(&cfg, &[range(0x4000_0000, 0, &[(0, 200), (1, 800)])]);
        assert_eq!(moved(&d), vec![(0x4000_0000, 1)]);
        assert_eq!(
            d[0].explain("web", 5.0),
            "VM web: 80% of 1000 accesses to 0x40000000 (+2.0 MiB) over 5 s came from host node 1's vCPUs, 80% remote on node 0 -> move to node 1 (local share +60 points)"
        );
    }

    #[test]
    fn exactly_half_is_not_more_than_half() {
        let cfg = PolicyConfig {
            min_gain: 0.0,
            ..PolicyConfig::default()
        };
        let d = decide(&cfg, &[range(0, 0, &[(0, 500), (1, 500)])]);
        assert!(moved(&d).is_empty());
        let d = decide(&cfg, &[range(0, 0, &[(0, 499), (1, 501)])]);
        assert_eq!(moved(&d), vec![(0, 1)]);
    }

    #[test]
    fn local_ranges_stay_and_little_evidence_is_no_evidence() {
        let cfg = PolicyConfig::default();
        let d = decide(
            &cfg,
            &[
                range(0, 1, &[(1, 900), (0, 100)]),
                range(4096, 0, &[(1, 10)]),
            ],
        );
        assert!(moved(&d).is_empty());
        assert!(d[0]
            .explain("v", 5.0)
            .ends_with("stays on host node 1: 90% of 1000 accesses are local"));
        assert!(d[1]
            .explain("v", 5.0)
            .contains("10 attributed accesses, fewer than the 64"));
    }

    #[test]
    fn hysteresis_keeps_a_recently_moved_range_from_ping_ponging() {
        let cfg = PolicyConfig::default();
        let mut r = range(0, 1, &[(0, 650), (1, 350)]);
        assert_eq!(moved(&decide(&cfg, &[r.clone()])), vec![(0, 0)]);
        r.windows_since_move = Some(1);
        let d = decide(&cfg, &[r.clone()]);
        assert!(moved(&d).is_empty());
        assert!(d[0]
            .explain("v", 5.0)
            .contains("not more than 65% (moved recently: hysteresis)"));
        r.accesses = vec![(0, 700), (1, 300)];
        assert_eq!(
            moved(&decide(&cfg, &[r.clone()])),
            vec![(0, 0)],
            "a clear majority still wins"
        );
        r.accesses = vec![(0, 650), (1, 350)];
        r.windows_since_move = Some(3);
        assert_eq!(
            moved(&decide(&cfg, &[r])),
            vec![(0, 0)],
            "after the cooldown"
        );
    }

    #[test]
    fn a_small_gain_is_not_worth_a_move() {
        // Three nodes: node 2 has the majority, but node 0 (where it is) is close behind.
        let cfg = PolicyConfig {
            min_gain: 0.2,
            ..PolicyConfig::default()
        };
        let d = decide(&cfg, &[range(0, 0, &[(0, 420), (2, 510), (1, 70)])]);
        assert!(moved(&d).is_empty());
        assert!(d[0]
            .explain("v", 5.0)
            .contains("9 points more local, less than 20"));
    }

    #[test]
    fn the_rate_limit_takes_the_biggest_gains_first_and_defers_the_rest() {
        // 1 MiB/s over a 5 s window: two 2 MiB ranges fit, the third waits.
        let cfg = PolicyConfig {
            rate_limit_mib_s: 1.0,
            ..PolicyConfig::default()
        };
        let d = decide(
            &cfg,
            &[
                range(0, 0, &[(1, 700), (0, 300)]),
                range(1 << 21, 0, &[(1, 1000)]),
                range(2 << 21, 0, &[(1, 900), (0, 100)]),
            ],
        );
        assert_eq!(moved(&d), vec![(1 << 21, 1), (2 << 21, 1)]);
        assert!(matches!(d[2], Decision::Deferred { gpa: 0, .. }));
        assert!(d[2]
            .explain("v", 5.0)
            .contains("deferred, over this window's rate limit"));
    }

    #[test]
    fn off_moves_nothing_and_dry_run_decides_the_same_without_moving() {
        let r = [range(0, 0, &[(1, 1000)])];
        let off = PolicyConfig {
            enabled: false,
            ..PolicyConfig::default()
        };
        let d = decide(&off, &r);
        assert!(moved(&d).is_empty());
        assert!(d[0]
            .explain("v", 5.0)
            .ends_with("migration is off for this VM"));
        let dry = PolicyConfig {
            dry_run: true,
            ..PolicyConfig::default()
        };
        let d = decide(&dry, &r);
        assert_eq!(moved(&d), vec![(0, 1)]);
        assert!(matches!(d[0], Decision::Move { dry_run: true, .. }));
        assert!(d[0]
            .explain("v", 5.0)
            .contains("-> would move (dry run) to node 1"));
    }
}
