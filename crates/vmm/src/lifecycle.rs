//! The VM lifecycle: eight states, one transition table, and the audit trail.
//!
//! ```text
//!             configure
//!              ┌────┐
//!              ▼    │   start            pause
//!           Created ─┴──────▶ Running ◀────────▶ Paused
//!            │  │  migrate_in  │ ▲ │   resume      │ │
//!            │  ▼              │ │ └─suspend─┐     │ suspend
//!            │ MigrationTarget │ │           ▼     ▼
//!            │  │ migration_   │ │         Suspended ──resume──▶ Running
//!            │  │ complete ────┼─┘
//!            │  │              │ migrate_out
//!            │  │              ▼
//!            │  │       MigrationSource ── migration_complete ─▶ Terminated
//!            │  │              └── migration_abort ─▶ Running
//!            └──┴── stop / guest_poweroff (from any live state) ─▶ Terminated
//!   any state but Terminated ── fail ─▶ Error;  Error ── stop ─▶ Terminated
//! ```
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ray_api::vmm::LifecycleEvent;

use crate::sync_behind::SyncBehind;

/// The state of one VM: the API's own enum, so the two can never disagree.
pub use ray_api::vmm::VmStateName as VmState;

/// Everything that can move a VM from one state to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmAction {
    Configure,
    Start,
    Pause,
    Resume,
    Suspend,
    Stop,
    GuestPoweroff,
    MigrateOut,
    MigrateIn,
    MigrationComplete,
    MigrationAbort,
    Fail,
}

/// Whether guest code may be executing in `state`.
pub fn guest_runs(state: VmState) -> bool {
    matches!(state, VmState::Running | VmState::MigrationSource)
}

impl VmAction {
    pub const ALL: [VmAction; 12] = [
        VmAction::Configure,
        VmAction::Start,
        VmAction::Pause,
        VmAction::Resume,
        VmAction::Suspend,
        VmAction::Stop,
        VmAction::GuestPoweroff,
        VmAction::MigrateOut,
        VmAction::MigrateIn,
        VmAction::MigrationComplete,
        VmAction::MigrationAbort,
        VmAction::Fail,
    ];
}

impl std::fmt::Display for VmAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            VmAction::Configure => "configure",
            VmAction::Start => "start",
            VmAction::Pause => "pause",
            VmAction::Resume => "resume",
            VmAction::Suspend => "suspend",
            VmAction::Stop => "stop",
            VmAction::GuestPoweroff => "guest poweroff",
            VmAction::MigrateOut => "migrate out",
            VmAction::MigrateIn => "migrate in",
            VmAction::MigrationComplete => "complete a migration",
            VmAction::MigrationAbort => "abort a migration",
            VmAction::Fail => "fail",
        };
        f.write_str(s)
    }
}

/// A refused action: names the state the VM is in and what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a VM that is {state}")]
pub struct TransitionError {
    pub state: VmState,
    pub action: VmAction,
}

/// The transition table: the one place that says which action is allowed in which state.
pub fn transition(state: VmState, action: VmAction) -> Result<VmState, TransitionError> {
    use VmAction as A;
    use VmState as S;
    let next = match state {
        S::Created => match action {
            A::Configure => Some(S::Created),
            A::Start => Some(S::Running),
            A::MigrateIn => Some(S::MigrationTarget),
            A::Stop => Some(S::Terminated),
            A::Fail => Some(S::Error),
            A::Pause
            | A::Resume
            | A::Suspend
            | A::GuestPoweroff
            | A::MigrateOut
            | A::MigrationComplete
            | A::MigrationAbort => None,
        },
        S::Running => match action {
            A::Pause => Some(S::Paused),
            A::Suspend => Some(S::Suspended),
            A::Stop | A::GuestPoweroff => Some(S::Terminated),
            A::MigrateOut => Some(S::MigrationSource),
            A::Fail => Some(S::Error),
            A::Configure
            | A::Start
            | A::Resume
            | A::MigrateIn
            | A::MigrationComplete
            | A::MigrationAbort => None,
        },
        S::Paused => match action {
            A::Resume => Some(S::Running),
            A::Suspend => Some(S::Suspended),
            A::Stop => Some(S::Terminated),
            A::Fail => Some(S::Error),
            A::Pause
            | A::Configure
            | A::Start
            | A::GuestPoweroff
            | A::MigrateOut
            | A::MigrateIn
            | A::MigrationComplete
            | A::MigrationAbort => None,
        },
        S::Suspended => match action {
            A::Resume => Some(S::Running),
            A::Stop => Some(S::Terminated),
            A::Fail => Some(S::Error),
            A::Configure
            | A::Start
            | A::Pause
            | A::Suspend
            | A::GuestPoweroff
            | A::MigrateOut
            | A::MigrateIn
            | A::MigrationComplete
            | A::MigrationAbort => None,
        },
        S::MigrationSource => match action {
            // The guest keeps running during pre-copy, so it may power off meanwhile.
            A::MigrationComplete | A::Stop | A::GuestPoweroff => Some(S::Terminated),
            A::MigrationAbort => Some(S::Running),
            A::Fail => Some(S::Error),
            A::Configure
            | A::Start
            | A::Pause
            | A::Resume
            | A::Suspend
            | A::MigrateOut
            | A::MigrateIn => None,
        },
        S::MigrationTarget => match action {
            A::MigrationComplete => Some(S::Running),
            A::MigrationAbort | A::Stop => Some(S::Terminated),
            A::Fail => Some(S::Error),
            A::Configure
            | A::Start
            | A::Pause
            | A::Resume
            | A::Suspend
            | A::GuestPoweroff
            | A::MigrateOut
            | A::MigrateIn => None,
        },
        S::Terminated => match action {
            A::Configure
            | A::Start
            | A::Pause
            | A::Resume
            | A::Suspend
            | A::Stop
            | A::GuestPoweroff
            | A::MigrateOut
            | A::MigrateIn
            | A::MigrationComplete
            | A::MigrationAbort
            | A::Fail => None,
        },
        S::Error => match action {
            A::Stop => Some(S::Terminated),
            A::Configure
            | A::Start
            | A::Pause
            | A::Resume
            | A::Suspend
            | A::GuestPoweroff
            | A::MigrateOut
            | A::MigrateIn
            | A::MigrationComplete
            | A::MigrationAbort
            | A::Fail => None,
        },
    };
    next.ok_or(TransitionError { state, action })
}

/// Appends `line` to the audit file at `path` and syncs it, outside any [`AuditTrail`]
/// (a fail-stop on another thread); errors are only reported.
pub fn append_synced(path: &Path, line: &[u8]) {
    let done = OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line).and_then(|()| f.sync_data()));
    if let Err(e) = done {
        tracing::error!("cannot append to {}: {e}", path.display());
    }
}

/// How many events the in-memory audit trail keeps.
pub const AUDIT_CAPACITY: usize = 512;

/// The audit trail: a bounded ring in memory, mirrored to an append-only JSON-lines file
/// that outlives the VMM process.
///
/// Crash safety: each event is appended with one `write(2)` before `record` returns, so
/// a crash of the VMM loses nothing and readers see it at once; `fdatasync` follows on a
/// thread of its own ([`SyncBehind`]), so a transition (a restore's start above all)
/// does not wait for the disk. A host crash can lose only the events of the last
/// moments, never reorder or tear earlier ones (one appending file, each sync covering
/// every write before it); the VMM waits for the last sync when it ends.
pub struct AuditTrail {
    ring: VecDeque<LifecycleEvent>,
    file: Option<(File, SyncBehind)>,
}

impl AuditTrail {
    /// An audit trail appending to `path` (created if missing).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let sync = SyncBehind::start(file.try_clone()?, path.display().to_string())?;
        Ok(Self {
            ring: VecDeque::with_capacity(AUDIT_CAPACITY),
            file: Some((file, sync)),
        })
    }

    /// An audit trail kept in memory only.
    pub fn in_memory() -> Self {
        Self {
            ring: VecDeque::with_capacity(AUDIT_CAPACITY),
            file: None,
        }
    }

    /// Waits until every recorded event is on disk.
    pub fn sync(&self) {
        if let Some((_, sync)) = &self.file {
            sync.wait(sync.request());
        }
    }

    /// Records one transition. A failing write to the file is reported but the in-memory
    /// record is kept: losing the disk must not stop the VM.
    pub fn record(&mut self, from: VmState, to: VmState, cause: &str) -> std::io::Result<()> {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let event = LifecycleEvent {
            time_ms,
            from,
            to,
            cause: cause.to_string(),
        };
        if self.ring.len() == AUDIT_CAPACITY {
            self.ring.pop_front();
        }
        self.ring.push_back(event.clone());
        if let Some((file, sync)) = self.file.as_mut() {
            let mut line = serde_json::to_vec(&event).map_err(std::io::Error::other)?;
            line.push(b'\n');
            file.write_all(&line)?;
            sync.request();
        }
        Ok(())
    }

    pub fn events(&self) -> impl Iterator<Item = &LifecycleEvent> {
        self.ring.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmAction as A;
    use VmState as S;

    /// The expected table, written out pair by pair (independently of `transition`).
    fn expected(state: VmState, action: VmAction) -> Option<VmState> {
        let allowed: &[(VmState, VmAction, VmState)] = &[
            (S::Created, A::Configure, S::Created),
            (S::Created, A::Start, S::Running),
            (S::Created, A::MigrateIn, S::MigrationTarget),
            (S::Created, A::Stop, S::Terminated),
            (S::Created, A::Fail, S::Error),
            (S::Running, A::Pause, S::Paused),
            (S::Running, A::Suspend, S::Suspended),
            (S::Running, A::Stop, S::Terminated),
            (S::Running, A::GuestPoweroff, S::Terminated),
            (S::Running, A::MigrateOut, S::MigrationSource),
            (S::Running, A::Fail, S::Error),
            (S::Paused, A::Resume, S::Running),
            (S::Paused, A::Suspend, S::Suspended),
            (S::Paused, A::Stop, S::Terminated),
            (S::Paused, A::Fail, S::Error),
            (S::Suspended, A::Resume, S::Running),
            (S::Suspended, A::Stop, S::Terminated),
            (S::Suspended, A::Fail, S::Error),
            (S::MigrationSource, A::MigrationComplete, S::Terminated),
            (S::MigrationSource, A::Stop, S::Terminated),
            (S::MigrationSource, A::GuestPoweroff, S::Terminated),
            (S::MigrationSource, A::MigrationAbort, S::Running),
            (S::MigrationSource, A::Fail, S::Error),
            (S::MigrationTarget, A::MigrationComplete, S::Running),
            (S::MigrationTarget, A::MigrationAbort, S::Terminated),
            (S::MigrationTarget, A::Stop, S::Terminated),
            (S::MigrationTarget, A::Fail, S::Error),
            (S::Error, A::Stop, S::Terminated),
        ];
        allowed
            .iter()
            .find(|(s, a, _)| *s == state && *a == action)
            .map(|(_, _, to)| *to)
    }

    #[test]
    fn every_state_action_pair_matches_the_table() {
        let mut allowed = 0;
        for state in VmState::ALL {
            for action in VmAction::ALL {
                match (transition(state, action), expected(state, action)) {
                    (Ok(to), Some(want)) => {
                        assert_eq!(to, want, "{state:?} --{action:?}-->");
                        allowed += 1;
                    }
                    (Err(e), None) => {
                        assert_eq!(e, TransitionError { state, action });
                        assert!(e.to_string().contains(&state.to_string()), "{e}");
                    }
                    (got, want) => panic!("{state:?} --{action:?}--> got {got:?}, want {want:?}"),
                }
            }
        }
        assert_eq!(allowed, 28);
    }

    #[test]
    fn refusal_names_the_current_state() {
        let err = transition(S::Paused, A::Pause).unwrap_err();
        assert_eq!(err.to_string(), "cannot pause a VM that is paused");
        let err = transition(S::Terminated, A::Start).unwrap_err();
        assert_eq!(err.to_string(), "cannot start a VM that is terminated");
    }

    #[test]
    fn terminated_is_final() {
        for action in VmAction::ALL {
            assert!(transition(S::Terminated, action).is_err());
        }
    }

    #[test]
    fn audit_ring_is_bounded_and_file_keeps_everything() {
        let dir = std::env::temp_dir().join(format!("ray-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut trail = AuditTrail::open(&path).unwrap();
        for i in 0..(AUDIT_CAPACITY + 10) {
            let (from, to) = if i % 2 == 0 {
                (S::Running, S::Paused)
            } else {
                (S::Paused, S::Running)
            };
            trail.record(from, to, &format!("test:{i}")).unwrap();
        }
        assert_eq!(trail.events().count(), AUDIT_CAPACITY);
        assert_eq!(trail.events().next().unwrap().cause, "test:10");
        trail.sync();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), AUDIT_CAPACITY + 10);
        let first: LifecycleEvent = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first.from, VmState::Running);
        assert_eq!(first.to, VmState::Paused);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
