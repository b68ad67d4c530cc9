//! The local lease: a VMM started by a cluster agent runs its guest only while the agent
//! keeps renewing it (`ray vmm --lease-ttl`, `PUT /vm/lease`). A watchdog thread of this
//! process checks the deadline every [`WATCHDOG_PERIOD`]; once it has passed, the VMM
//! pauses its own vCPUs (fenced), whether or not the agent still lives — Proxmox's
//! self-fencing watchdog, per VMM process and without a host reboot.
//!
//! ```text
//!            renew (PUT /vm/lease)             deadline passes
//!   leased ───────────────────────▶ leased ──────────────────────▶ fenced (vCPUs paused)
//!     ▲                                                              │ renew: still fenced
//!     └──── resume (PUT /vm/resume), allowed once renewed or cleared ┘
//! ```
//!
//! The agent renews only after its own etcd lease was renewed, with what is left of that
//! renewal's local deadline, so a VMM's deadline never outlasts its agent's
//! (`ray_cluster::timing` has the proof that no VM runs twice). Only an explicit resume —
//! by the agent after it confirmed the VM's run token, or by an operator who cleared the
//! lease (`DELETE /vm/lease`) — lets the guest run again.
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ray_api::vmm::LeaseInfo;

/// How often the watchdog looks at the deadline (`w` in `ray_cluster::timing`).
pub const WATCHDOG_PERIOD: Duration = Duration::from_millis(100);

/// Longest lease a renewal may ask for: past it a dead agent's VM would run unfenced for
/// longer than any fail-over waits.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// The lease's state, with every decision a pure function of `now`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseState {
    /// When the guest must stop running; `None`: no lease (never given, or cleared).
    deadline: Option<Instant>,
    /// The last renewal's time to live.
    ttl: Duration,
    /// Why the VM was fenced, while it is (cleared by a resume).
    fenced: Option<String>,
}

impl LeaseState {
    /// Checks a requested time to live.
    pub fn check_ttl(ttl: Duration) -> Result<(), String> {
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(format!(
                "lease ttl_ms {} is out of range: use 1 to {}",
                ttl.as_millis(),
                MAX_TTL.as_millis()
            ));
        }
        Ok(())
    }

    /// A renewal at `now`: the deadline moves to `now + ttl`. A fenced VM stays fenced
    /// (paused) until it is resumed.
    pub fn renew(&mut self, now: Instant, ttl: Duration) {
        self.deadline = Some(now + ttl);
        self.ttl = ttl;
    }

    /// The operator takes over: no deadline any more.
    pub fn clear(&mut self) {
        self.deadline = None;
    }

    /// How long ago the deadline passed, if it did.
    pub fn overdue(&self, now: Instant) -> Option<Duration> {
        let d = self.deadline?;
        (now >= d).then(|| now - d)
    }

    /// Whether the watchdog must fence now: the deadline passed and the VM is not fenced.
    pub fn must_fence(&self, now: Instant) -> bool {
        self.fenced.is_none() && self.overdue(now).is_some()
    }

    /// Records that the VM is fenced (its guest no longer runs), and why.
    pub fn fenced(&mut self, why: String) {
        self.fenced = Some(why);
    }

    /// The last renewal's time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.is_some()
    }

    /// Whether the guest may run (start or resume) at `now`: not while the deadline has
    /// passed. A resume that may go on clears the fence.
    pub fn may_run(&self, now: Instant) -> Result<(), String> {
        match self.overdue(now) {
            Some(late) => Err(format!(
                "the VM is fenced: its local lease expired {} ms ago; renew it (PUT /vm/lease) or clear it (DELETE /vm/lease) first",
                late.as_millis()
            )),
            None => Ok(()),
        }
    }

    /// Clears the fence after a resume went through.
    pub fn resumed(&mut self) {
        self.fenced = None;
    }

    /// What `GET /vm` shows; `None` without a lease and without a fence.
    pub fn info(&self, now: Instant) -> Option<LeaseInfo> {
        if self.deadline.is_none() && self.fenced.is_none() {
            return None;
        }
        Some(LeaseInfo {
            ttl_ms: self.ttl.as_millis() as u64,
            remaining_ms: self
                .deadline
                .map(|d| d.saturating_duration_since(now).as_millis() as u64),
            fenced: self.fenced.is_some(),
            fence_reason: self.fenced.clone(),
        })
    }
}

/// The lease shared by the API (renewals), the watchdog and the VMM thread.
#[derive(Debug, Default)]
pub struct Lease(Mutex<LeaseState>);

impl Lease {
    pub fn with<T>(&self, f: impl FnOnce(&mut LeaseState) -> T) -> T {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s)
    }
}

/// Starts the watchdog: every [`WATCHDOG_PERIOD`] it looks at the deadline and, once it
/// passed, calls `fence` (which asks the VMM thread to pause the vCPUs) until the VM is
/// fenced or renewed. `fence` returns false once the VMM is gone, which ends the thread.
/// A fence asked for and not yet carried out is not asked for again.
pub fn spawn_watchdog(
    lease: std::sync::Arc<Lease>,
    fence: impl Fn(Box<dyn FnOnce() + Send>) -> bool + Send + 'static,
) -> std::io::Result<()> {
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::Builder::new()
        .name("lease-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(WATCHDOG_PERIOD);
            use std::sync::atomic::Ordering::SeqCst;
            if !lease.with(|l| l.must_fence(Instant::now())) || asked.swap(true, SeqCst) {
                continue;
            }
            let done = std::sync::Arc::clone(&asked);
            if !fence(Box::new(move || done.store(false, SeqCst))) {
                return;
            }
        })
        .map(drop)
}

/// The [`Instant`] of a CLOCK_MONOTONIC time (what `Instant` counts on Linux), or why it
/// cannot be a lease's start: it is in the future.
pub fn instant_of(monotonic_ns: u64) -> Result<Instant, String> {
    let (now, now_ns) = (Instant::now(), crate::startup::now_ns());
    if monotonic_ns > now_ns {
        return Err(format!(
            "since_monotonic_ns {monotonic_ns} is {} ns in the future",
            monotonic_ns - now_ns
        ));
    }
    now.checked_sub(Duration::from_nanos(now_ns - monotonic_ns))
        .ok_or_else(|| format!("since_monotonic_ns {monotonic_ns} is before this host booted"))
}

/// The CLOCK_MONOTONIC time (ns) of `t`, for [`instant_of`] in another process.
pub fn monotonic_ns_of(t: Instant) -> u64 {
    let (now, now_ns) = (Instant::now(), crate::startup::now_ns());
    now_ns.saturating_sub(now.saturating_duration_since(t).as_nanos() as u64)
}

/// The reason recorded when the watchdog fences: how late, and the lease it had.
pub fn fence_cause(late: Duration, ttl: Duration) -> String {
    format!(
        "lease:expired (not renewed within its {} ms; fenced {} ms after the deadline)",
        ttl.as_millis(),
        late.as_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_lease_fences_once_its_deadline_passes_and_renewals_push_it_back() {
        let t0 = Instant::now();
        let mut l = LeaseState::default();
        assert!(
            !l.must_fence(t0) && l.info(t0).is_none(),
            "no lease: never fenced"
        );
        l.renew(t0, 300 * MS);
        assert!(!l.must_fence(t0 + 299 * MS));
        assert!(l.may_run(t0 + 299 * MS).is_ok());
        // Renewed at 200 ms: the deadline is 500 ms.
        l.renew(t0 + 200 * MS, 300 * MS);
        assert!(!l.must_fence(t0 + 499 * MS));
        assert!(l.must_fence(t0 + 500 * MS));
        assert_eq!(l.overdue(t0 + 520 * MS), Some(20 * MS));
        let info = l.info(t0 + 400 * MS).unwrap();
        assert_eq!((info.ttl_ms, info.remaining_ms), (300, Some(100)));
        assert!(!info.fenced);
    }

    #[test]
    fn a_fenced_vm_runs_again_only_after_a_renewal_or_a_clear_and_a_resume() {
        let t0 = Instant::now();
        let mut l = LeaseState::default();
        l.renew(t0, 100 * MS);
        let now = t0 + 150 * MS;
        assert!(l.must_fence(now));
        l.fenced(fence_cause(l.overdue(now).unwrap(), l.ttl));
        assert!(!l.must_fence(now), "fenced once, not again");
        let e = l.may_run(now).unwrap_err();
        assert!(
            e.contains("expired 50 ms ago") && e.contains("PUT /vm/lease"),
            "{e}"
        );
        let info = l.info(now).unwrap();
        assert!(info.fenced && info.remaining_ms == Some(0));
        assert!(info.fence_reason.unwrap().contains("within its 100 ms"));
        // A renewal alone does not unfence: the VM stays paused until resumed.
        l.renew(now, 100 * MS);
        assert!(l.is_fenced() && l.may_run(now).is_ok());
        l.resumed();
        assert!(!l.is_fenced());
        // An operator's clear: no deadline, never fenced again.
        l.clear();
        assert!(!l.must_fence(now + Duration::from_secs(3600)));
        assert!(l.may_run(now + Duration::from_secs(3600)).is_ok());
    }

    #[test]
    fn monotonic_times_convert_both_ways() {
        let t = Instant::now() - Duration::from_millis(250);
        let back = instant_of(monotonic_ns_of(t)).unwrap();
        let diff = if back > t { back - t } else { t - back };
        assert!(diff < Duration::from_millis(5), "{diff:?}");
        let future = crate::startup::now_ns() + 1_000_000_000;
        let e = instant_of(future).unwrap_err();
        assert!(e.contains("in the future"), "{e}");
    }

    #[test]
    fn bad_ttls_are_refused_naming_the_value() {
        assert!(LeaseState::check_ttl(MS).is_ok());
        assert!(LeaseState::check_ttl(MAX_TTL).is_ok());
        for bad in [Duration::ZERO, MAX_TTL + MS] {
            let e = LeaseState::check_ttl(bad).unwrap_err();
            assert!(e.contains(&format!("ttl_ms {}", bad.as_millis())), "{e}");
        }
    }
}
