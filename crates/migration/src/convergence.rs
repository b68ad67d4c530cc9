//! Pre-copy convergence: pure policy, no I/O.
//!
//! After each pass the sender records a [`PassSample`]; the [`Estimator`] smooths dirty
//! rate and bandwidth with exponential moving averages and predicts the downtime of a
//! stop-and-copy right now: `remaining dirty bytes / bandwidth + fixed state cost`.
//! [`decide`] turns that into the next step.

use std::time::Duration;

/// What to do when pre-copy hits its pass or time limit without converging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LimitAction {
    /// Pause anyway and accept a longer downtime.
    ForceStopAndCopy,
    /// Give up; the source keeps running.
    Abort,
}

/// Convergence settings; `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    /// Largest acceptable pause (default 30 ms).
    pub max_downtime: Duration,
    /// Fixed cost of sending vCPU/device state and verifying, added to every estimate (5 ms).
    pub state_transfer_cost: Duration,
    /// EMA weight of the newest sample, in (0, 1] (0.5).
    pub ema_alpha: f64,
    /// Throttle vCPUs when pre-copy does not converge (true).
    pub auto_converge: bool,
    /// First pass after which throttling may start (2).
    pub throttle_after_passes: u32,
    /// First throttle step in percent (20), then `throttle_step` more per pass (10),
    /// never above `throttle_max` (99).
    pub throttle_initial: u8,
    pub throttle_step: u8,
    pub throttle_max: u8,
    /// Pass and time limits (30 passes, [`DEFAULT_MAX_TIME`]) and what happens at them.
    pub max_passes: u32,
    pub max_time: Duration,
    pub on_limit: LimitAction,
}

/// Pre-copy time before the limit action applies, unless a migration says otherwise.
pub const DEFAULT_MAX_TIME: Duration = Duration::from_secs(60);

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(30),
            state_transfer_cost: Duration::from_millis(5),
            ema_alpha: 0.5,
            auto_converge: true,
            throttle_after_passes: 2,
            throttle_initial: 20,
            throttle_step: 10,
            throttle_max: 99,
            max_passes: 30,
            max_time: DEFAULT_MAX_TIME,
            on_limit: LimitAction::ForceStopAndCopy,
        }
    }
}

/// What one finished pass measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassSample {
    pub pass: u32,
    pub pages_sent: u64,
    /// Bytes on the wire for the pass.
    pub bytes_sent: u64,
    /// From the first page read to the receiver's acknowledgement of the pass.
    pub duration: Duration,
    /// Pages dirtied while the pass ran: what the next pass (or stop-and-copy) must send.
    pub dirty_pages: u64,
    pub page_size: u64,
    /// Bytes of copied disks (`--copy-disks`) dirtied while the pass ran: sent by the next
    /// pass too, so they count with the pages.
    pub dirty_disk_bytes: u64,
}

/// Smoothed view after a pass; also what the progress display shows.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Stats {
    pub pass: u32,
    pub elapsed: Duration,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    pub dirty_pages: u64,
    /// Dirty bytes of copied disks (part of `remaining_bytes`).
    pub dirty_disk_bytes: u64,
    /// Dirty memory and disk bytes the next pass must send.
    pub remaining_bytes: u64,
    /// Bytes dirtied per second (EMA).
    pub dirty_rate_bps: f64,
    /// Bytes sent per second (EMA).
    pub bandwidth_bps: f64,
    pub expected_downtime: Duration,
    /// Throttle in force during the pass.
    pub throttle_percent: u8,
}

/// Next step after a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Continue,
    /// Set the vCPU throttle to this percentage, then run another pass.
    Throttle(u8),
    /// Pause and send the rest; `forced` when the limit, not convergence, decided it.
    StopAndCopy {
        forced: bool,
    },
    Abort(String),
}

/// Exponential moving averages of dirty rate and bandwidth.
#[derive(Debug, Clone, Default)]
pub struct Estimator {
    dirty_rate: Option<f64>,
    bandwidth: Option<f64>,
}

fn ema(prev: Option<f64>, sample: f64, alpha: f64) -> f64 {
    match prev {
        Some(p) => alpha * sample + (1.0 - alpha) * p,
        None => sample,
    }
}

/// `remaining / bandwidth + fixed`; an unknown (zero) bandwidth with bytes left is "forever".
pub fn expected_downtime(remaining_bytes: u64, bandwidth_bps: f64, fixed: Duration) -> Duration {
    if remaining_bytes == 0 {
        return fixed;
    }
    if bandwidth_bps <= 0.0 || !bandwidth_bps.is_finite() {
        return Duration::MAX;
    }
    let secs = remaining_bytes as f64 / bandwidth_bps;
    Duration::try_from_secs_f64(secs)
        .map(|d| d.saturating_add(fixed))
        .unwrap_or(Duration::MAX)
}

impl Estimator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one pass in and returns the smoothed view.
    pub fn record(
        &mut self,
        s: &PassSample,
        elapsed: Duration,
        throttle_percent: u8,
        policy: &Policy,
    ) -> Stats {
        let secs = s.duration.as_secs_f64().max(1e-6);
        let alpha = policy.ema_alpha.clamp(0.01, 1.0);
        let remaining = s
            .dirty_pages
            .saturating_mul(s.page_size)
            .saturating_add(s.dirty_disk_bytes);
        let dirty_rate = ema(self.dirty_rate, remaining as f64 / secs, alpha);
        let bandwidth = ema(self.bandwidth, s.bytes_sent as f64 / secs, alpha);
        self.dirty_rate = Some(dirty_rate);
        self.bandwidth = Some(bandwidth);
        Stats {
            pass: s.pass,
            elapsed,
            pages_sent: s.pages_sent,
            bytes_sent: s.bytes_sent,
            dirty_pages: s.dirty_pages,
            dirty_disk_bytes: s.dirty_disk_bytes,
            remaining_bytes: remaining,
            dirty_rate_bps: dirty_rate,
            bandwidth_bps: bandwidth,
            expected_downtime: expected_downtime(remaining, bandwidth, policy.state_transfer_cost),
            throttle_percent,
        }
    }
}

/// The next step: converge if the predicted pause fits (unless one more pass would more
/// than halve the data left, see [`another_pass_pays`]), else enforce limits, else throttle.
pub fn decide(stats: &Stats, policy: &Policy) -> Decision {
    if stats.expected_downtime <= policy.max_downtime {
        if another_pass_pays(stats, policy) {
            return Decision::Continue;
        }
        return Decision::StopAndCopy { forced: false };
    }
    let over_passes = stats.pass >= policy.max_passes;
    let over_time = stats.elapsed >= policy.max_time;
    if over_passes || over_time {
        let why = if over_passes {
            format!(
                "{} passes reached the limit of {}",
                stats.pass, policy.max_passes
            )
        } else {
            format!(
                "{:.1} s reached the limit of {:.1} s",
                stats.elapsed.as_secs_f64(),
                policy.max_time.as_secs_f64()
            )
        };
        return match policy.on_limit {
            LimitAction::ForceStopAndCopy => Decision::StopAndCopy { forced: true },
            LimitAction::Abort => Decision::Abort(format!(
                "{why}; expected downtime {:.1} ms is still above the {:.1} ms maximum (dirty rate {:.1} MiB/s, bandwidth {:.1} MiB/s, throttle {}%)",
                ms(stats.expected_downtime),
                ms(policy.max_downtime),
                stats.dirty_rate_bps / MIB,
                stats.bandwidth_bps / MIB,
                stats.throttle_percent
            )),
        };
    }
    if policy.auto_converge && stats.pass >= policy.throttle_after_passes {
        let max = policy.throttle_max.min(99);
        let next = if stats.throttle_percent == 0 {
            policy.throttle_initial.min(max)
        } else {
            stats
                .throttle_percent
                .saturating_add(policy.throttle_step)
                .min(max)
        };
        if next > stats.throttle_percent {
            return Decision::Throttle(next);
        }
    }
    Decision::Continue
}

/// Whether one more pre-copy pass, though the pause already fits, is worth it: the dirty
/// pages left would take over [`MIN_WORTH_SAVING`] to send in the pause, and the guest is
/// predicted to dirty less than half of that while they are sent instead. A guest writing
/// 64 MiB/s then pauses for a few ms instead of just under `max_downtime`, for one short
/// pass more. Never past the pass or time limit.
pub fn another_pass_pays(stats: &Stats, policy: &Policy) -> bool {
    if stats.pass >= policy.max_passes || stats.elapsed >= policy.max_time {
        return false;
    }
    if stats.remaining_bytes == 0 || stats.bandwidth_bps <= 0.0 || !stats.bandwidth_bps.is_finite()
    {
        return false;
    }
    let send_secs = stats.remaining_bytes as f64 / stats.bandwidth_bps;
    let dirtied_meanwhile = stats.dirty_rate_bps * send_secs;
    send_secs > MIN_WORTH_SAVING.as_secs_f64()
        && dirtied_meanwhile < stats.remaining_bytes as f64 / 2.0
}

/// Pause time below which another pass is not worth its round trips.
pub const MIN_WORTH_SAVING: Duration = Duration::from_millis(2);

const MIB: f64 = 1024.0 * 1024.0;

fn ms(d: Duration) -> f64 {
    if d == Duration::MAX {
        f64::INFINITY
    } else {
        d.as_secs_f64() * 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(pass: u32, downtime_ms: u64, throttle: u8, elapsed_s: u64) -> Stats {
        Stats {
            pass,
            elapsed: Duration::from_secs(elapsed_s),
            expected_downtime: Duration::from_millis(downtime_ms),
            throttle_percent: throttle,
            ..Stats::default()
        }
    }

    #[test]
    fn decisions_table() {
        let def = Policy::default();
        let abort = Policy {
            on_limit: LimitAction::Abort,
            ..Policy::default()
        };
        let no_throttle = Policy {
            auto_converge: false,
            ..Policy::default()
        };
        let cases: &[(&str, Stats, &Policy, Decision)] = &[
            (
                "fits",
                stats(1, 30, 0, 0),
                &def,
                Decision::StopAndCopy { forced: false },
            ),
            (
                "fits even at the limit",
                stats(30, 10, 99, 999),
                &abort,
                Decision::StopAndCopy { forced: false },
            ),
            (
                "first pass too slow: wait",
                stats(1, 31, 0, 0),
                &def,
                Decision::Continue,
            ),
            (
                "second pass: start throttling",
                stats(2, 100, 0, 1),
                &def,
                Decision::Throttle(20),
            ),
            (
                "then step up",
                stats(3, 100, 20, 1),
                &def,
                Decision::Throttle(30),
            ),
            (
                "capped at 99",
                stats(9, 100, 95, 1),
                &def,
                Decision::Throttle(99),
            ),
            (
                "at 99 nothing more to do",
                stats(10, 100, 99, 1),
                &def,
                Decision::Continue,
            ),
            (
                "auto-converge off",
                stats(5, 100, 0, 1),
                &no_throttle,
                Decision::Continue,
            ),
            (
                "pass limit forces",
                stats(30, 100, 99, 1),
                &def,
                Decision::StopAndCopy { forced: true },
            ),
            (
                "time limit forces",
                stats(4, 100, 40, 300),
                &def,
                Decision::StopAndCopy { forced: true },
            ),
        ];
        for (name, s, p, want) in cases {
            assert_eq!(&decide(s, p), want, "{name}");
        }
        match decide(&stats(30, 100, 99, 1), &abort) {
            Decision::Abort(r) => {
                assert!(r.contains("30 passes reached the limit of 30"), "{r}");
                assert!(r.contains("100.0 ms"), "{r}");
            }
            d => panic!("want Abort, got {d:?}"),
        }
    }

    #[test]
    fn one_more_pass_when_it_more_than_halves_the_pause() {
        let p = Policy::default();
        let mib = 1u64 << 20;
        // 21 MiB left at 1.5 GiB/s (14 ms) while the guest writes 64 MiB/s: ~0.9 MiB
        // would be dirtied meanwhile. The pause fits, but another pass cuts it to ~1 ms.
        let busy = Stats {
            pass: 1,
            remaining_bytes: 21 * mib,
            bandwidth_bps: 1536.0 * mib as f64,
            dirty_rate_bps: 64.0 * mib as f64,
            expected_downtime: Duration::from_millis(19),
            ..Stats::default()
        };
        assert!(another_pass_pays(&busy, &p));
        assert_eq!(decide(&busy, &p), Decision::Continue);
        // Almost nothing left: not worth the round trips.
        let idle = Stats {
            remaining_bytes: 64 << 10,
            expected_downtime: Duration::from_millis(5),
            ..busy
        };
        assert_eq!(decide(&idle, &p), Decision::StopAndCopy { forced: false });
        // The guest would dirty as much again: another pass gains nothing.
        let hot = Stats {
            dirty_rate_bps: 1200.0 * mib as f64,
            ..busy
        };
        assert_eq!(decide(&hot, &p), Decision::StopAndCopy { forced: false });
        // Never past the limits.
        let last = Stats {
            pass: p.max_passes,
            ..busy
        };
        assert_eq!(decide(&last, &p), Decision::StopAndCopy { forced: false });
    }

    #[test]
    fn downtime_estimates() {
        let fixed = Duration::from_millis(5);
        let cases: &[(u64, f64, Duration)] = &[
            (0, 0.0, fixed),
            (
                1 << 20,
                (1 << 30) as f64,
                Duration::from_micros(976) + fixed + Duration::from_nanos(562),
            ),
            (1, 0.0, Duration::MAX),
            (u64::MAX, 1e-300, Duration::MAX),
        ];
        for &(rem, bw, want) in cases {
            let got = expected_downtime(rem, bw, fixed);
            let diff = got.abs_diff(want);
            assert!(
                diff < Duration::from_micros(2),
                "{rem} B at {bw} B/s: {got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn estimator_smooths_with_ema() {
        let p = Policy::default();
        let mut e = Estimator::new();
        let mk = |bytes: u64, dirty: u64| PassSample {
            pass: 1,
            pages_sent: 0,
            bytes_sent: bytes,
            duration: Duration::from_secs(1),
            dirty_pages: dirty,
            page_size: 4096,
            dirty_disk_bytes: 0,
        };
        let s1 = e.record(&mk(1000, 10), Duration::ZERO, 0, &p);
        assert_eq!(s1.bandwidth_bps, 1000.0);
        assert_eq!(s1.dirty_rate_bps, 40960.0);
        let s2 = e.record(&mk(3000, 0), Duration::ZERO, 0, &p);
        assert_eq!(s2.bandwidth_bps, 2000.0);
        assert_eq!(s2.dirty_rate_bps, 20480.0);
        assert_eq!(s2.expected_downtime, p.state_transfer_cost);
        let s3 = e.record(&mk(2000, 1), Duration::ZERO, 0, &p);
        assert_eq!(s3.remaining_bytes, 4096);
        assert_eq!(
            s3.expected_downtime,
            Duration::from_millis(2048) + p.state_transfer_cost
        );
        // Dirty disk bytes count like dirty pages.
        let s4 = e.record(
            &PassSample {
                dirty_disk_bytes: 65536,
                ..mk(2000, 1)
            },
            Duration::ZERO,
            0,
            &p,
        );
        assert_eq!(s4.remaining_bytes, 4096 + 65536);
        assert_eq!(s4.dirty_disk_bytes, 65536);
        assert!(s4.expected_downtime > s3.expected_downtime);
    }
}
