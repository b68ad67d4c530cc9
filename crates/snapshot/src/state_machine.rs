//! A snapshot's own lifecycle, as one enum and one transition table.
//!
//! ```text
//! Idle ─Create─▶ Creating ─Written─▶ Verifying ─Verified─▶ Ready ─Archive─▶ Archived
//!                                                          ▲  │  ◀─Unarchive─┘
//!                                                     Abort│  │Restore
//!                                                          │  ▼
//!   RestoreComplete ◀─Verified─ RestoreVerify ◀─Loaded─ Restoring
//!     │ Restore ─▶ Restoring;  Archive ─▶ Archived
//!
//! Fail ─▶ Error from Creating, Verifying, Ready, Restoring, RestoreVerify, Archived.
//! Abort ─▶ Ready from Restoring and RestoreVerify. Error ─Verified─▶ Ready.
//! ```
//!
//! `Ready`, `Archived` and `Error` are what the manifest on disk can say (a snapshot being
//! written is in a `.tmp-` directory and is never listed). The restore states live in the
//! process doing the restore: restoring does not modify the snapshot, so many processes
//! may restore one snapshot at once. `Abort` is a restore refused for a reason that is not
//! the snapshot's fault (an incompatible host CPU): the snapshot stays usable. `Error`
//! means a check found the snapshot damaged: it is not restored, and only a later full
//! verification that passes (`Verified`: every file read back and every checksum good,
//! e.g. after the storage was repaired) makes it `Ready` again.
use serde::{Deserialize, Serialize};

use crate::error::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    Idle,
    Creating,
    Verifying,
    Ready,
    Restoring,
    RestoreVerify,
    RestoreComplete,
    /// Kept (for history, or because children depend on it) but not offered for restore.
    Archived,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Start writing the snapshot's files.
    Create,
    /// All files are written and fsynced.
    Written,
    /// Checksums and structure were checked and are good.
    Verified,
    /// Start restoring from this snapshot.
    Restore,
    /// The chain's files are read and memory is laid out (or mapped).
    Loaded,
    Archive,
    Unarchive,
    /// A step failed in a way that means the snapshot is damaged.
    Fail,
    /// A restore was refused for a reason outside the snapshot (e.g. the host's CPU).
    Abort,
}

impl SnapshotState {
    pub const ALL: [SnapshotState; 9] = [
        SnapshotState::Idle,
        SnapshotState::Creating,
        SnapshotState::Verifying,
        SnapshotState::Ready,
        SnapshotState::Restoring,
        SnapshotState::RestoreVerify,
        SnapshotState::RestoreComplete,
        SnapshotState::Archived,
        SnapshotState::Error,
    ];

    /// The one transition table. Every pair is spelled out, so adding a state or an event
    /// fails to compile until its row is decided.
    pub fn next(self, event: Event) -> Option<SnapshotState> {
        use Event as E;
        use SnapshotState as S;
        match (self, event) {
            (S::Idle, E::Create) => Some(S::Creating),
            (
                S::Idle,
                E::Written
                | E::Verified
                | E::Restore
                | E::Loaded
                | E::Archive
                | E::Unarchive
                | E::Fail
                | E::Abort,
            ) => None,

            (S::Creating, E::Written) => Some(S::Verifying),
            (S::Creating, E::Fail) => Some(S::Error),
            (
                S::Creating,
                E::Create
                | E::Verified
                | E::Restore
                | E::Loaded
                | E::Archive
                | E::Unarchive
                | E::Abort,
            ) => None,

            (S::Verifying, E::Verified) => Some(S::Ready),
            (S::Verifying, E::Fail) => Some(S::Error),
            (
                S::Verifying,
                E::Create
                | E::Written
                | E::Restore
                | E::Loaded
                | E::Archive
                | E::Unarchive
                | E::Abort,
            ) => None,

            (S::Ready, E::Restore) => Some(S::Restoring),
            (S::Ready, E::Archive) => Some(S::Archived),
            (S::Ready, E::Fail) => Some(S::Error),
            (
                S::Ready,
                E::Create | E::Written | E::Verified | E::Loaded | E::Unarchive | E::Abort,
            ) => None,

            (S::Restoring, E::Loaded) => Some(S::RestoreVerify),
            (S::Restoring, E::Fail) => Some(S::Error),
            (S::Restoring, E::Abort) => Some(S::Ready),
            (
                S::Restoring,
                E::Create | E::Written | E::Verified | E::Restore | E::Archive | E::Unarchive,
            ) => None,

            (S::RestoreVerify, E::Verified) => Some(S::RestoreComplete),
            (S::RestoreVerify, E::Fail) => Some(S::Error),
            (S::RestoreVerify, E::Abort) => Some(S::Ready),
            (
                S::RestoreVerify,
                E::Create | E::Written | E::Restore | E::Loaded | E::Archive | E::Unarchive,
            ) => None,

            (S::RestoreComplete, E::Restore) => Some(S::Restoring),
            (S::RestoreComplete, E::Archive) => Some(S::Archived),
            (
                S::RestoreComplete,
                E::Create
                | E::Written
                | E::Verified
                | E::Loaded
                | E::Unarchive
                | E::Fail
                | E::Abort,
            ) => None,

            (S::Archived, E::Unarchive) => Some(S::Ready),
            (S::Archived, E::Fail) => Some(S::Error),
            (
                S::Archived,
                E::Create
                | E::Written
                | E::Verified
                | E::Restore
                | E::Loaded
                | E::Archive
                | E::Abort,
            ) => None,

            (S::Error, E::Verified) => Some(S::Ready),
            (
                S::Error,
                E::Create
                | E::Written
                | E::Restore
                | E::Loaded
                | E::Archive
                | E::Unarchive
                | E::Fail
                | E::Abort,
            ) => None,
        }
    }

    /// `next`, as an error naming the state and the event when there is no transition.
    pub fn apply(self, event: Event) -> Result<SnapshotState, StoreError> {
        self.next(event)
            .ok_or(StoreError::InvalidTransition { from: self, event })
    }
}

impl Event {
    pub const ALL: [Event; 9] = [
        Event::Create,
        Event::Written,
        Event::Verified,
        Event::Restore,
        Event::Loaded,
        Event::Archive,
        Event::Unarchive,
        Event::Fail,
        Event::Abort,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event as E;
    use SnapshotState as S;

    /// The expected table, written independently of `next` as a list of allowed edges.
    const EDGES: &[(S, E, S)] = &[
        (S::Idle, E::Create, S::Creating),
        (S::Creating, E::Written, S::Verifying),
        (S::Creating, E::Fail, S::Error),
        (S::Verifying, E::Verified, S::Ready),
        (S::Verifying, E::Fail, S::Error),
        (S::Ready, E::Restore, S::Restoring),
        (S::Ready, E::Archive, S::Archived),
        (S::Ready, E::Fail, S::Error),
        (S::Restoring, E::Loaded, S::RestoreVerify),
        (S::Restoring, E::Fail, S::Error),
        (S::Restoring, E::Abort, S::Ready),
        (S::RestoreVerify, E::Verified, S::RestoreComplete),
        (S::RestoreVerify, E::Fail, S::Error),
        (S::RestoreVerify, E::Abort, S::Ready),
        (S::RestoreComplete, E::Restore, S::Restoring),
        (S::RestoreComplete, E::Archive, S::Archived),
        (S::Archived, E::Unarchive, S::Ready),
        (S::Archived, E::Fail, S::Error),
        (S::Error, E::Verified, S::Ready),
    ];

    #[test]
    fn every_state_event_pair() {
        let mut allowed = 0;
        for s in S::ALL {
            for e in E::ALL {
                let want = EDGES
                    .iter()
                    .find(|(from, ev, _)| *from == s && *ev == e)
                    .map(|(_, _, to)| *to);
                assert_eq!(s.next(e), want, "{s:?} + {e:?}");
                match want {
                    Some(to) => {
                        allowed += 1;
                        assert_eq!(s.apply(e).unwrap(), to);
                    }
                    None => {
                        let msg = s.apply(e).unwrap_err().to_string();
                        assert!(msg.contains(&format!("{s:?}")) && msg.contains(&format!("{e:?}")));
                    }
                }
            }
        }
        assert_eq!(allowed, EDGES.len());
    }

    #[test]
    fn happy_paths() {
        let mut s = S::Idle;
        for e in [
            E::Create,
            E::Written,
            E::Verified,
            E::Restore,
            E::Loaded,
            E::Verified,
        ] {
            s = s.apply(e).unwrap();
        }
        assert_eq!(s, S::RestoreComplete);
        assert_eq!(
            s.apply(E::Archive).unwrap().apply(E::Unarchive).unwrap(),
            S::Ready
        );
    }

    #[test]
    fn serializes_as_snake_case() {
        assert_eq!(
            serde_json::to_string(&S::RestoreVerify).unwrap(),
            "\"restore_verify\""
        );
    }
}
