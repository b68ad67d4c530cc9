//! The migration session state machine, shared by both sides.
//!
//! ```text
//!            Start              StopVm             FinalCopyDone          Switchover
//!   Idle ──────────▶ PreCopy ──────────▶ StopAndCopy ──────────▶ Verification ──────────▶ Completing
//!    │              │  ▲ PassDone          │                       │                       │    │
//!    │              └──┘                   │                       │ VerifyMismatch        │    │ TargetResumed
//!    │ Fault/Cancel     Fault/Cancel       │ Fault/Cancel          │ Fault/Cancel          │    ▼
//!    │              └───────────┬──────────┴───────────────────────┘        ResumeFailed   │  Completed
//!    │                          ▼                                      ┌───────────────────┘
//!    │                     RollingBack ◀───────────────────────────────┘
//!    │                          │ RolledBack / Fault                    Completing ──Fault──▶ Failed
//!    └─────────────────────────▶ Failed ◀──────┘                        (no rollback: see below)
//! ```
//!
//! `Completing` is the commit point: the source entered it by sending `Switchover`, the
//! target by receiving it. A `Fault` there goes straight to `Failed`, never `RollingBack`,
//! because the source cannot know whether the target already runs the VM. Only the
//! target's explicit `ResumeFailed` report (the target has not run and will not run the VM)
//! lets the source roll back. `Cancel` is refused once `Completing` is reached.

use std::time::{Duration, Instant};

/// Where a migration is. See the module diagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SessionState {
    Idle,
    PreCopy,
    StopAndCopy,
    Verification,
    Completing,
    Completed,
    Failed,
    RollingBack,
}

impl SessionState {
    pub const ALL: [SessionState; 8] = [
        SessionState::Idle,
        SessionState::PreCopy,
        SessionState::StopAndCopy,
        SessionState::Verification,
        SessionState::Completing,
        SessionState::Completed,
        SessionState::Failed,
        SessionState::RollingBack,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, SessionState::Completed | SessionState::Failed)
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SessionEvent {
    /// Handshake, authentication and compatibility check passed.
    Start,
    /// A pre-copy pass ended and another one follows.
    PassDone,
    /// Converged (or forced): the source VM is paused.
    StopVm,
    /// Last dirty pages and device state are across.
    FinalCopyDone,
    /// Hashes matched and the source relinquished the VM.
    Switchover,
    /// Hashes differ.
    VerifyMismatch,
    /// The target reported the VM running.
    TargetResumed,
    /// The target reported it could not resume and tore the VM down.
    ResumeFailed,
    /// An error: I/O, protocol, VM, policy abort.
    Fault,
    /// The operator cancelled.
    Cancel,
    /// Rollback finished (source resumed, or target torn down).
    RolledBack,
}

impl SessionEvent {
    pub const ALL: [SessionEvent; 11] = [
        SessionEvent::Start,
        SessionEvent::PassDone,
        SessionEvent::StopVm,
        SessionEvent::FinalCopyDone,
        SessionEvent::Switchover,
        SessionEvent::VerifyMismatch,
        SessionEvent::TargetResumed,
        SessionEvent::ResumeFailed,
        SessionEvent::Fault,
        SessionEvent::Cancel,
        SessionEvent::RolledBack,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the migration session cannot take event {event:?} in state {from:?}")]
pub struct InvalidTransition {
    pub from: SessionState,
    pub event: SessionEvent,
}

/// The one transition table.
pub fn transition(
    from: SessionState,
    event: SessionEvent,
) -> Result<SessionState, InvalidTransition> {
    use SessionEvent as E;
    use SessionState as S;
    let refuse = Err(InvalidTransition { from, event });
    match from {
        S::Idle => match event {
            E::Start => Ok(S::PreCopy),
            E::Fault | E::Cancel => Ok(S::Failed),
            E::PassDone
            | E::StopVm
            | E::FinalCopyDone
            | E::Switchover
            | E::VerifyMismatch
            | E::TargetResumed
            | E::ResumeFailed
            | E::RolledBack => refuse,
        },
        S::PreCopy => match event {
            E::PassDone => Ok(S::PreCopy),
            E::StopVm => Ok(S::StopAndCopy),
            E::Fault | E::Cancel => Ok(S::RollingBack),
            E::Start
            | E::FinalCopyDone
            | E::Switchover
            | E::VerifyMismatch
            | E::TargetResumed
            | E::ResumeFailed
            | E::RolledBack => refuse,
        },
        S::StopAndCopy => match event {
            E::FinalCopyDone => Ok(S::Verification),
            E::Fault | E::Cancel => Ok(S::RollingBack),
            E::Start
            | E::PassDone
            | E::StopVm
            | E::Switchover
            | E::VerifyMismatch
            | E::TargetResumed
            | E::ResumeFailed
            | E::RolledBack => refuse,
        },
        S::Verification => match event {
            E::Switchover => Ok(S::Completing),
            E::VerifyMismatch | E::Fault | E::Cancel => Ok(S::RollingBack),
            E::Start
            | E::PassDone
            | E::StopVm
            | E::FinalCopyDone
            | E::TargetResumed
            | E::ResumeFailed
            | E::RolledBack => refuse,
        },
        S::Completing => match event {
            E::TargetResumed => Ok(S::Completed),
            E::ResumeFailed => Ok(S::RollingBack),
            // Split-brain rule: past the commit point an error never rolls back.
            E::Fault => Ok(S::Failed),
            E::Start
            | E::PassDone
            | E::StopVm
            | E::FinalCopyDone
            | E::Switchover
            | E::VerifyMismatch
            | E::Cancel
            | E::RolledBack => refuse,
        },
        S::RollingBack => match event {
            E::RolledBack | E::Fault => Ok(S::Failed),
            E::Start
            | E::PassDone
            | E::StopVm
            | E::FinalCopyDone
            | E::Switchover
            | E::VerifyMismatch
            | E::TargetResumed
            | E::ResumeFailed
            | E::Cancel => refuse,
        },
        S::Completed | S::Failed => match event {
            E::Start
            | E::PassDone
            | E::StopVm
            | E::FinalCopyDone
            | E::Switchover
            | E::VerifyMismatch
            | E::TargetResumed
            | E::ResumeFailed
            | E::Fault
            | E::Cancel
            | E::RolledBack => refuse,
        },
    }
}

/// One recorded transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub from: SessionState,
    pub event: SessionEvent,
    pub to: SessionState,
    pub at: Duration,
}

/// A session: current state plus the history of how it got there.
#[derive(Debug, Clone)]
pub struct Session {
    state: SessionState,
    started: Instant,
    history: Vec<Step>,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    pub fn new() -> Self {
        Self {
            state: SessionState::Idle,
            started: Instant::now(),
            history: Vec::new(),
        }
    }

    pub fn state(&self) -> SessionState {
        self.state
    }

    pub fn history(&self) -> &[Step] {
        &self.history
    }

    /// Applies `event` through [`transition`]; the state is unchanged on refusal.
    pub fn apply(&mut self, event: SessionEvent) -> Result<SessionState, InvalidTransition> {
        let to = transition(self.state, event)?;
        self.history.push(Step {
            from: self.state,
            event,
            to,
            at: self.started.elapsed(),
        });
        self.state = to;
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SessionEvent as E;
    use SessionState as S;

    /// Every allowed pair, written independently of the table; all others must be refused.
    const ALLOWED: &[(S, E, S)] = &[
        (S::Idle, E::Start, S::PreCopy),
        (S::Idle, E::Fault, S::Failed),
        (S::Idle, E::Cancel, S::Failed),
        (S::PreCopy, E::PassDone, S::PreCopy),
        (S::PreCopy, E::StopVm, S::StopAndCopy),
        (S::PreCopy, E::Fault, S::RollingBack),
        (S::PreCopy, E::Cancel, S::RollingBack),
        (S::StopAndCopy, E::FinalCopyDone, S::Verification),
        (S::StopAndCopy, E::Fault, S::RollingBack),
        (S::StopAndCopy, E::Cancel, S::RollingBack),
        (S::Verification, E::Switchover, S::Completing),
        (S::Verification, E::VerifyMismatch, S::RollingBack),
        (S::Verification, E::Fault, S::RollingBack),
        (S::Verification, E::Cancel, S::RollingBack),
        (S::Completing, E::TargetResumed, S::Completed),
        (S::Completing, E::ResumeFailed, S::RollingBack),
        (S::Completing, E::Fault, S::Failed),
        (S::RollingBack, E::RolledBack, S::Failed),
        (S::RollingBack, E::Fault, S::Failed),
    ];

    #[test]
    fn every_state_event_pair() {
        let mut checked = 0;
        for from in S::ALL {
            for event in E::ALL {
                let expected = ALLOWED
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event)
                    .map(|(_, _, to)| *to);
                match (transition(from, event), expected) {
                    (Ok(to), Some(want)) => assert_eq!(to, want, "{from:?} + {event:?}"),
                    (Err(e), None) => {
                        assert_eq!(e, InvalidTransition { from, event });
                        assert!(e.to_string().contains(&format!("{from:?}")));
                    }
                    (got, want) => panic!("{from:?} + {event:?}: got {got:?}, want {want:?}"),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 8 * 11);
    }

    #[test]
    fn no_path_rolls_back_after_the_commit_point_without_an_explicit_target_refusal() {
        for event in E::ALL {
            if let Ok(S::RollingBack) = transition(S::Completing, event) {
                assert_eq!(event, E::ResumeFailed);
            }
        }
        assert!(transition(S::Completing, E::Cancel).is_err());
    }

    #[test]
    fn terminal_states_accept_nothing() {
        for s in S::ALL.into_iter().filter(|s| s.is_terminal()) {
            for e in E::ALL {
                assert!(transition(s, e).is_err());
            }
        }
    }

    #[test]
    fn session_records_history_and_keeps_state_on_refusal() {
        let mut s = Session::new();
        s.apply(E::Start).unwrap();
        s.apply(E::PassDone).unwrap();
        assert!(s.apply(E::TargetResumed).is_err());
        assert_eq!(s.state(), S::PreCopy);
        s.apply(E::Cancel).unwrap();
        s.apply(E::RolledBack).unwrap();
        assert_eq!(s.state(), S::Failed);
        assert_eq!(s.history().len(), 4);
    }
}
