//! What the VMM knows of a migration beyond the driver's progress: the record behind
//! `GET /vm/migration`, how the migration thread ended, and the heartbeat watch that
//! measures the downtime the guest saw.
use crate::logging::SpawnInSpan;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ray_api::vmm::{MigrationRole, MigrationState, MigrationStatus, MigrationVmOutcome};
use ray_migration::{CancelToken, ProgressHandle, SessionState};

use super::unix_us;
use crate::memory::MemoryManager;

/// A session state as the API names it.
pub fn api_state(s: SessionState) -> MigrationState {
    match s {
        SessionState::Idle => MigrationState::Idle,
        SessionState::PreCopy => MigrationState::PreCopy,
        SessionState::StopAndCopy => MigrationState::StopAndCopy,
        SessionState::Verification => MigrationState::Verification,
        SessionState::Completing => MigrationState::Completing,
        SessionState::Completed => MigrationState::Completed,
        SessionState::Failed => MigrationState::Failed,
        SessionState::RollingBack => MigrationState::RollingBack,
    }
}

/// What the controller knows of this VM's migration besides the driver's progress.
#[derive(Debug, Clone)]
pub struct Record {
    pub role: MigrationRole,
    pub peer: String,
    pub started: Instant,
    pub finished: Option<Duration>,
    pub state_override: Option<SessionState>,
    pub error: Option<String>,
    pub vm: MigrationVmOutcome,
    pub downtime_ms: Option<f64>,
    pub total_ms: Option<f64>,
    pub bulk_mib_s: Option<f64>,
    pub forced: bool,
    pub passes: Option<u32>,
    pub bytes_sent: Option<u64>,
    pub paused_at_unix_us: Option<u64>,
    pub resumed_at_unix_us: Option<u64>,
    pub first_heartbeat_unix_us: Option<u64>,
    /// Target: guest memory being populated ahead of the transfer.
    pub prefault: Option<Arc<crate::prefault::Prefault>>,
    /// Source: the disks are copied (`copy_disks`).
    pub copy_disks: bool,
    pub disk_bytes_final: Option<u64>,
}

/// One migration of this VM: shared by the controller and the migration thread.
#[derive(Clone)]
pub struct Handle {
    pub record: Arc<Mutex<Record>>,
    pub progress: ProgressHandle,
    pub cancel: CancelToken,
}

impl Handle {
    pub fn new(role: MigrationRole, peer: String) -> Self {
        Self {
            record: Arc::new(Mutex::new(Record {
                role,
                peer,
                started: Instant::now(),
                finished: None,
                state_override: None,
                error: None,
                vm: MigrationVmOutcome::Migrating,
                downtime_ms: None,
                total_ms: None,
                bulk_mib_s: None,
                forced: false,
                passes: None,
                bytes_sent: None,
                paused_at_unix_us: None,
                resumed_at_unix_us: None,
                first_heartbeat_unix_us: None,
                prefault: None,
                copy_disks: false,
                disk_bytes_final: None,
            })),
            progress: ProgressHandle::new(),
            cancel: CancelToken::new(),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut Record)) {
        let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut r);
    }

    /// Source: the vCPUs are stopped for the stop-and-copy (until the target resumes or a
    /// rollback resumes them here).
    pub fn paused_for_copy(&self) -> bool {
        let r = self.record.lock().unwrap_or_else(|p| p.into_inner());
        r.paused_at_unix_us.is_some() && r.finished.is_none()
    }

    pub fn is_finished(&self) -> bool {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finished
            .is_some()
    }

    pub fn status(&self) -> MigrationStatus {
        let p = self.progress.get();
        let r = self
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let state = r.state_override.unwrap_or(p.state);
        MigrationStatus {
            role: r.role,
            peer: r.peer,
            state: api_state(state),
            pass: r.passes.unwrap_or(p.pass),
            pages_sent: p.pages_sent,
            bytes_sent: r.bytes_sent.unwrap_or(p.bytes_sent),
            dirty_pages: p.dirty_pages,
            dirty_rate_mib_s: p.dirty_rate_bps / (1u64 << 20) as f64,
            bandwidth_mib_s: p.bandwidth_bps / (1u64 << 20) as f64,
            expected_downtime_ms: p.expected_downtime.as_secs_f64() * 1e3,
            throttle_percent: p.throttle_percent,
            elapsed_ms: r
                .finished
                .unwrap_or_else(|| r.started.elapsed())
                .as_millis() as u64,
            error: r.error,
            vm: r.vm,
            downtime_ms: r.downtime_ms,
            total_ms: r.total_ms,
            bulk_mib_s: r.bulk_mib_s,
            forced: r.forced,
            paused_at_unix_us: r.paused_at_unix_us,
            resumed_at_unix_us: r.resumed_at_unix_us,
            first_heartbeat_unix_us: r.first_heartbeat_unix_us,
            prefault_bytes: r.prefault.as_ref().map(|p| p.done_bytes()),
            prefault_total_bytes: r.prefault.as_ref().map(|p| p.total_bytes()),
            prefault_error: r.prefault.as_ref().and_then(|p| p.error()),
            disk_bytes_sent: r.copy_disks.then_some(p.disk_bytes_sent),
            disk_bytes_final: r.disk_bytes_final,
        }
    }
}

/// How a migration thread ended.
pub enum Ended {
    Source(Result<ray_migration::SendReport, SourceError>),
    Target(Result<ray_migration::ReceiveReport, TargetError>),
}

pub enum SourceError {
    /// Nothing was touched (no connection): the VM runs on.
    Setup(String),
    Driver(Box<ray_migration::SendFailure>),
}

pub enum TargetError {
    Setup(String),
    Driver(Box<ray_migration::ReceiveFailure>),
}

/// Polls the heartbeat page after a resume and records when the counter first moves.
/// `baseline` is the counter read before the vCPUs started.
pub fn watch_heartbeat(mem: MemoryManager, baseline: Option<u64>, handle: Handle) {
    let Some(start) = baseline else { return };
    let _ = std::thread::Builder::new()
        .name("migration-heartbeat".into())
        .stack_size(64 << 10)
        .spawn_in_span(move || {
            crate::seccomp::enter(crate::seccomp::Kind::Migration);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Some((c, _)) = crate::heartbeat::sample(mem.ram()) {
                    if c != start {
                        let t = unix_us();
                        handle.update(|r| r.first_heartbeat_unix_us = Some(t));
                        return;
                    }
                }
                std::thread::sleep(Duration::from_micros(20));
            }
        });
}
