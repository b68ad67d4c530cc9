//! What a progress display polls, and how an operator cancels.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::session::SessionState;
use crate::transport::Canceller;

/// A snapshot of a running migration.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Progress {
    pub state: SessionState,
    pub pass: u32,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    /// Pages still dirty after the last pass.
    pub dirty_pages: u64,
    pub dirty_rate_bps: f64,
    pub bandwidth_bps: f64,
    pub expected_downtime: Duration,
    pub throttle_percent: u8,
    /// Disk data bytes sent (`--copy-disks`), and dirty disk bytes after the last pass.
    pub disk_bytes_sent: u64,
    pub dirty_disk_bytes: u64,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            state: SessionState::Idle,
            pass: 0,
            pages_sent: 0,
            bytes_sent: 0,
            dirty_pages: 0,
            dirty_rate_bps: 0.0,
            bandwidth_bps: 0.0,
            expected_downtime: Duration::ZERO,
            throttle_percent: 0,
            disk_bytes_sent: 0,
            dirty_disk_bytes: 0,
        }
    }
}

/// Shared, cheaply cloned progress cell: the driver writes, a CLI or API polls.
#[derive(Debug, Clone, Default)]
pub struct ProgressHandle(Arc<Mutex<Progress>>);

impl ProgressHandle {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self) -> Progress {
        match self.0.lock() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Progress)) {
        match self.0.lock() {
            Ok(mut p) => f(&mut p),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

/// Cancels a migration from another thread; checked between page batches, and wakes a
/// [`Listener::accept`](crate::transport::Listener::accept) waiting for the migration at once.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<CancelState>);

#[derive(Debug, Default)]
struct CancelState {
    cancelled: AtomicBool,
    /// Blocked waits to wake on cancel, by registration number.
    wakers: Mutex<Vec<(u64, Canceller)>>,
    next: AtomicU64,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        for (_, w) in lock(&self.0.wakers).iter() {
            w.cancel();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Cancels `c` too when this token is cancelled (at once if it is already), until the
    /// returned guard drops.
    pub(crate) fn wake_on_cancel(&self, c: &Canceller) -> WakeOnCancel<'_> {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.0.wakers).push((id, c.clone()));
        // A cancel that ran before the push did not see `c`; its flag is visible now (the
        // lock orders the two).
        if self.is_cancelled() {
            c.cancel();
        }
        WakeOnCancel { token: self, id }
    }
}

/// Keeps a [`Canceller`] linked to a [`CancelToken`]; unlinks it when dropped.
pub(crate) struct WakeOnCancel<'a> {
    token: &'a CancelToken,
    id: u64,
}

impl Drop for WakeOnCancel<'_> {
    fn drop(&mut self) {
        lock(&self.token.0.wakers).retain(|(id, _)| *id != self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Default cap on concurrent migrations per host.
pub const DEFAULT_MAX_CONCURRENT: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this host already runs {limit} migrations, its limit; retry when one finishes")]
pub struct TooManyMigrations {
    pub limit: usize,
}

/// Counts migrations in flight on this host (both directions) against a settable limit.
#[derive(Debug, Clone)]
pub struct MigrationSlots {
    limit: usize,
    active: Arc<AtomicUsize>,
}

impl Default for MigrationSlots {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CONCURRENT)
    }
}

impl MigrationSlots {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Takes a slot, released when the guard drops.
    pub fn try_acquire(&self) -> Result<SlotGuard, TooManyMigrations> {
        self.active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .map(|_| SlotGuard(self.active.clone()))
            .map_err(|_| TooManyMigrations { limit: self.limit })
    }
}

/// One migration slot; dropping it frees the slot.
#[derive(Debug)]
pub struct SlotGuard(Arc<AtomicUsize>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_concurrency_and_free_on_drop() {
        let s = MigrationSlots::new(2);
        let a = s.try_acquire().unwrap();
        let _b = s.try_acquire().unwrap();
        let e = s.try_acquire().unwrap_err();
        assert!(e.to_string().contains("2 migrations"));
        drop(a);
        assert_eq!(s.active(), 1);
        assert!(s.try_acquire().is_ok());
        assert_eq!(MigrationSlots::default().limit, 8);
    }

    #[test]
    fn cancel_and_progress_are_shared() {
        let c = CancelToken::new();
        c.clone().cancel();
        assert!(c.is_cancelled());
        let p = ProgressHandle::new();
        p.clone().update(|x| x.pass = 3);
        assert_eq!(p.get().pass, 3);
    }
}
