//! Self-fencing timing: the numbers that make "no VM runs twice" hold, and the proof.
//!
//! Let `t0` be when an agent *sent* its last keep-alive that etcd answered (agent clock),
//! `T` the lease time to live, `m` the local margin, `w` a VMM watchdog's check period,
//! `P` the longest pause of all vCPUs, `ρ` the clock-rate error between any two hosts'
//! monotonic clocks, `G` the controller's grace, `X` etcd's expiry check period.
//!
//! - The agent hands each of its VMMs a *local lease*: an absolute CLOCK_MONOTONIC deadline
//!   `t0 + T - m` (same host, same clock). A VMM whose deadline passes pauses its vCPUs
//!   by itself, whether or not the agent still lives: paused by `t0 + (T - m) + w + P`
//!   on the agent's clock, i.e. by real time `t0 + (T - m)(1 + ρ) + w + P`.
//! - etcd restarts the lease's countdown when it *receives* the keep-alive, after `t0`:
//!   the lease cannot end before real time `t0 + T(1 - ρ)`.
//! - The controller acts on the lease's end (the agent's `alive` key deleted) only after
//!   waiting `G` more, and a new host runs the VM only after the run-token fail-over
//!   transaction, which requires the old agent's key to be gone ([`crate::runtoken`]).
//!   So the VM runs elsewhere no earlier than `t0 + T(1 - ρ) + G`.
//!
//! No VM runs twice if the old copy is paused before the new one can run:
//!
//! ```text
//! (T - m)(1 + ρ) + w + P  <  T(1 - ρ) + G      <=>      G + m(1 + ρ)  >  2ρT + w + P
//! ```
//!
//! With the defaults (T 20 s, m 1 s, w 100 ms, P 100 ms, ρ 0.1 %, G 2 s) the left side
//! is 3.001 s and the right 0.24 s: the old copy is paused 2.76 s before the earliest
//! restart. The margin `m` alone already covers it; `G` keeps the proof true for a
//! controller that saw the key vanish early (a revoke) and for scheduling stalls up to
//! its size.
//!
//! Not covered by any finite `G`: a VMM process frozen as a whole (SIGSTOP, a host that
//! hangs) longer than that and later thawed runs guest code for up to `w` before its
//! watchdog, which checks the deadline first thing, pauses it. Storage written by the VM
//! must therefore also refuse writers of an older run-token epoch.
use std::time::Duration;

/// The timing of leases, fencing and fail-over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// `T`: the agent's etcd lease time to live.
    pub lease_ttl: Duration,
    /// How often the agent renews its lease when all is well.
    pub renew_every: Duration,
    /// How soon the agent tries again after a failed renewal.
    pub retry_every: Duration,
    /// `m`: a VMM's local lease ends this long before the agent's lease could.
    pub local_margin: Duration,
    /// `w`: how often a VMM's watchdog checks its local lease.
    pub watchdog_period: Duration,
    /// `P`: the longest a pause of all vCPUs takes.
    pub pause_bound: Duration,
    /// `ρ`: clock-rate error between hosts, parts per million.
    pub clock_error_ppm: u32,
    /// `G`: the controller's grace after a lease ends, before a fail-over.
    pub grace: Duration,
    /// `X`: how often etcd looks for expired leases (500 ms in etcd 3.4).
    pub expiry_check: Duration,
    /// How long a restore from a checkpoint on shared storage takes, at most.
    pub restore_bound: Duration,
    /// The agent writes its load into its status at most this often.
    pub load_report_every: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_ttl: Duration::from_secs(20),
            renew_every: Duration::from_secs(15),
            retry_every: Duration::from_millis(500),
            local_margin: Duration::from_secs(1),
            watchdog_period: Duration::from_millis(100),
            pause_bound: Duration::from_millis(100),
            clock_error_ppm: 1000,
            grace: Duration::from_secs(2),
            expiry_check: Duration::from_millis(500),
            restore_bound: Duration::from_secs(2),
            load_report_every: Duration::from_secs(60),
        }
    }
}

/// Timing that would let a VM run twice, or that cannot work.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum TimingError {
    #[error("unsafe timing: the old copy of a VM is paused {fenced:?} after the last renewal, but a fail-over may start it elsewhere at {restart:?}; raise the grace or the local margin")]
    Unsafe { fenced: Duration, restart: Duration },
    #[error("the agent renews every {renew:?}, which leaves less than the local margin {margin:?} plus two retries ({retry:?} each) of its {ttl:?} lease")]
    NoRoomToRetry {
        renew: Duration,
        margin: Duration,
        retry: Duration,
        ttl: Duration,
    },
}

/// Failover time from a host's death to its VM running elsewhere: the death comes at a
/// uniformly random point between two renewals.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Failover {
    pub best: Duration,
    pub median: Duration,
    pub worst: Duration,
}

fn scale(d: Duration, ppm: i64) -> Duration {
    let ns = d.as_nanos() as i128;
    Duration::from_nanos((ns + ns * i128::from(ppm) / 1_000_000).max(0) as u64)
}

impl Timing {
    /// The default timing's proportions for a lease of `ttl`: renew at 3/4 of it, local
    /// margin 1/20, grace 1/10, retries every 1/40 (the defaults are `for_lease(20 s)`).
    /// The watchdog period and the pause bound stay what they are; `check` says whether
    /// a short lease still leaves room for them.
    pub fn for_lease(ttl: Duration) -> Timing {
        let d = Timing::default();
        Timing {
            lease_ttl: ttl,
            renew_every: ttl * 3 / 4,
            retry_every: ttl / 40,
            local_margin: ttl / 20,
            grace: ttl / 10,
            ..d
        }
    }

    /// The local lease a VMM gets when the agent's renewal sent at `t0` succeeded: its
    /// deadline is `t0 + local_lease()`.
    pub fn local_lease(&self) -> Duration {
        self.lease_ttl.saturating_sub(self.local_margin)
    }

    /// Latest real time, after the last successful renewal, by which the old copy is paused.
    pub fn fenced_by(&self) -> Duration {
        scale(self.local_lease(), i64::from(self.clock_error_ppm))
            + self.watchdog_period
            + self.pause_bound
    }

    /// Earliest real time, after the last successful renewal, at which a fail-over may
    /// start the VM elsewhere.
    pub fn earliest_restart(&self) -> Duration {
        scale(self.lease_ttl, -i64::from(self.clock_error_ppm)) + self.grace
    }

    /// Checks the inequality of the module documentation and that renewals can be retried.
    pub fn check(&self) -> Result<Duration, TimingError> {
        let (fenced, restart) = (self.fenced_by(), self.earliest_restart());
        if fenced >= restart {
            return Err(TimingError::Unsafe { fenced, restart });
        }
        if self.renew_every + self.local_margin + 2 * self.retry_every > self.lease_ttl {
            return Err(TimingError::NoRoomToRetry {
                renew: self.renew_every,
                margin: self.local_margin,
                retry: self.retry_every,
                ttl: self.lease_ttl,
            });
        }
        Ok(restart - fenced)
    }

    /// Host death to VM running elsewhere. Death right after a renewal is the worst case
    /// (the whole lease runs out); right before the next one the best.
    pub fn failover(&self) -> Failover {
        let after_expiry = self.grace + self.restore_bound;
        let worst = self.lease_ttl + self.expiry_check + after_expiry;
        let best = self.lease_ttl.saturating_sub(self.renew_every) + after_expiry;
        Failover {
            best,
            median: (best + worst) / 2,
            worst,
        }
    }

    /// etcd requests per second per 100 hosts at steady state: one keep-alive per renewal
    /// and at most one status write per load report; nothing else is written while
    /// nothing changes.
    pub fn etcd_requests_per_s_per_100_hosts(&self) -> f64 {
        100.0 / self.renew_every.as_secs_f64() + 100.0 / self.load_report_every.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_safe_and_meet_the_targets() {
        let t = Timing::default();
        let slack = t.check().unwrap();
        // The README's numbers.
        assert_eq!(t.fenced_by(), Duration::from_millis(19_219));
        assert_eq!(t.earliest_restart(), Duration::from_millis(21_980));
        assert_eq!(slack, Duration::from_millis(2_761));
        let f = t.failover();
        assert_eq!(f.best, Duration::from_secs(9));
        assert_eq!(f.worst, Duration::from_millis(24_500));
        assert!(
            f.worst < Duration::from_secs(30),
            "target: running elsewhere within 30 s"
        );
        let load = t.etcd_requests_per_s_per_100_hosts();
        assert!((load - 8.333).abs() < 0.01 && load < 10.0, "{load}");
    }

    #[test]
    fn unsafe_timing_is_refused_naming_the_numbers() {
        // No margin and no grace: the old copy may still run when the new one starts.
        let t = Timing {
            local_margin: Duration::ZERO,
            grace: Duration::ZERO,
            ..Timing::default()
        };
        let e = t.check().unwrap_err();
        assert!(matches!(e, TimingError::Unsafe { .. }));
        assert!(e.to_string().contains("raise the grace"), "{e}");
        // Grace alone can make it safe again.
        let t = Timing {
            grace: Duration::from_millis(300),
            ..t
        };
        t.check().unwrap();
    }

    #[test]
    fn shorter_leases_keep_the_proportions_and_stay_safe_down_to_a_second_and_a_half() {
        assert_eq!(
            Timing::for_lease(Duration::from_secs(20)),
            Timing::default()
        );
        let t = Timing::for_lease(Duration::from_secs(4));
        assert_eq!(
            (t.renew_every, t.local_margin, t.grace),
            (
                Duration::from_secs(3),
                Duration::from_millis(200),
                Duration::from_millis(400)
            )
        );
        // Fenced by 3.8038 + 0.2 s, earliest restart 3.996 + 0.4 s.
        assert_eq!(t.check().unwrap(), Duration::from_micros(392_200));
        Timing::for_lease(Duration::from_millis(1500))
            .check()
            .unwrap();
        // Too short for a 100 ms watchdog and a 100 ms pause: refused, not run.
        let e = Timing::for_lease(Duration::from_millis(600))
            .check()
            .unwrap_err();
        assert!(matches!(e, TimingError::Unsafe { .. }), "{e}");
    }

    #[test]
    fn renewing_too_late_is_refused() {
        let t = Timing {
            renew_every: Duration::from_secs(19),
            ..Timing::default()
        };
        let e = t.check().unwrap_err();
        assert!(e.to_string().contains("renews every 19s"), "{e}");
    }
}
