//! Host lifecycle: one enum of states, one enum of events, one transition
//! function.
//!
//! ```text
//!  Offline --PowerOn--> Initializing --InitOk--> Ready <--HealthRestored-- Degraded
//!                                                Ready ------Degrade-----> Degraded
//!  Ready | Degraded --Drain--> Draining --DrainComplete--> Offline
//!                              Draining --Undrain--------> Ready
//!  Initializing | Ready | Degraded | Draining | Rejoining --Fault--> Failed
//!  Failed | Offline --Recover--> Rejoining --RejoinOk--> Ready
//!  Initializing | Failed | Rejoining --PowerOff--> Offline
//! ```
//!
//! `Offline --Recover--> Rejoining` is a known host coming back from maintenance (after a
//! drain): like a failed host, it is checked (its VM directories reconciled with the
//! cluster's run tokens) before it takes VMs again. A host never seen goes through
//! `Initializing` instead.
//!
//! Only [`HostStatus::Ready`] hosts take new VMs. `Failed` and `Offline`
//! hosts run no VMs; `Degraded` and `Draining` hosts keep theirs but take no
//! new ones.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Lifecycle state of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    /// Powered off or out of the cluster.
    Offline,
    /// Booting the host agent; not yet schedulable.
    Initializing,
    /// Healthy; takes new VMs.
    Ready,
    /// Running with a health problem; keeps VMs, takes no new ones.
    Degraded,
    /// Lost; its VMs are gone and must be restarted elsewhere.
    Failed,
    /// Being emptied by live migration before maintenance.
    Draining,
    /// Coming back after a failure; not yet schedulable.
    Rejoining,
}

/// Something that happens to a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostEvent {
    /// Operator or automation powers the host on.
    PowerOn,
    /// Host agent finished initializing.
    InitOk,
    /// Health check reports a problem.
    Degrade,
    /// Health check is green again.
    HealthRestored,
    /// Host is lost (heartbeat timeout, hardware fault).
    Fault,
    /// Operator asks to empty the host.
    Drain,
    /// Operator cancels a drain.
    Undrain,
    /// Last VM left a draining host.
    DrainComplete,
    /// A failed host is reachable again, or a host back from maintenance.
    Recover,
    /// A rejoining host passed its checks.
    RejoinOk,
    /// Host is powered off.
    PowerOff,
}

impl HostStatus {
    /// Every state, for exhaustive tests and tables.
    pub const ALL: [HostStatus; 7] = [
        HostStatus::Offline,
        HostStatus::Initializing,
        HostStatus::Ready,
        HostStatus::Degraded,
        HostStatus::Failed,
        HostStatus::Draining,
        HostStatus::Rejoining,
    ];

    /// Whether a host in this state may receive new VMs.
    pub fn schedulable(self) -> bool {
        self == HostStatus::Ready
    }

    /// Whether VMs keep running on a host in this state.
    pub fn runs_vms(self) -> bool {
        matches!(
            self,
            HostStatus::Ready | HostStatus::Degraded | HostStatus::Draining
        )
    }
}

impl HostEvent {
    /// Every event, for exhaustive tests and tables.
    pub const ALL: [HostEvent; 11] = [
        HostEvent::PowerOn,
        HostEvent::InitOk,
        HostEvent::Degrade,
        HostEvent::HealthRestored,
        HostEvent::Fault,
        HostEvent::Drain,
        HostEvent::Undrain,
        HostEvent::DrainComplete,
        HostEvent::Recover,
        HostEvent::RejoinOk,
        HostEvent::PowerOff,
    ];
}

impl fmt::Display for HostStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl fmt::Display for HostEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A transition the table does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("host in state {from} cannot take event {event}")]
pub struct InvalidTransition {
    /// State the host was in.
    pub from: HostStatus,
    /// Event that was refused.
    pub event: HostEvent,
}

/// The one transition table. Every (state, event) pair is listed; there is
/// no catch-all arm, so adding a state or event fails to compile until the
/// table is extended.
pub fn transition(from: HostStatus, event: HostEvent) -> Result<HostStatus, InvalidTransition> {
    use HostEvent as E;
    use HostStatus as S;
    let bad = Err(InvalidTransition { from, event });
    match from {
        S::Offline => match event {
            E::PowerOn => Ok(S::Initializing),
            E::Recover => Ok(S::Rejoining),
            E::InitOk
            | E::Degrade
            | E::HealthRestored
            | E::Fault
            | E::Drain
            | E::Undrain
            | E::DrainComplete
            | E::RejoinOk
            | E::PowerOff => bad,
        },
        S::Initializing => match event {
            E::InitOk => Ok(S::Ready),
            E::Fault => Ok(S::Failed),
            E::PowerOff => Ok(S::Offline),
            E::PowerOn
            | E::Degrade
            | E::HealthRestored
            | E::Drain
            | E::Undrain
            | E::DrainComplete
            | E::Recover
            | E::RejoinOk => bad,
        },
        S::Ready => match event {
            E::Degrade => Ok(S::Degraded),
            E::Fault => Ok(S::Failed),
            E::Drain => Ok(S::Draining),
            E::PowerOn
            | E::InitOk
            | E::HealthRestored
            | E::Undrain
            | E::DrainComplete
            | E::Recover
            | E::RejoinOk
            | E::PowerOff => bad,
        },
        S::Degraded => match event {
            E::HealthRestored => Ok(S::Ready),
            E::Fault => Ok(S::Failed),
            E::Drain => Ok(S::Draining),
            E::PowerOn
            | E::InitOk
            | E::Degrade
            | E::Undrain
            | E::DrainComplete
            | E::Recover
            | E::RejoinOk
            | E::PowerOff => bad,
        },
        S::Failed => match event {
            E::Recover => Ok(S::Rejoining),
            E::PowerOff => Ok(S::Offline),
            E::PowerOn
            | E::InitOk
            | E::Degrade
            | E::HealthRestored
            | E::Fault
            | E::Drain
            | E::Undrain
            | E::DrainComplete
            | E::RejoinOk => bad,
        },
        S::Draining => match event {
            E::DrainComplete => Ok(S::Offline),
            E::Undrain => Ok(S::Ready),
            E::Fault => Ok(S::Failed),
            E::PowerOn
            | E::InitOk
            | E::Degrade
            | E::HealthRestored
            | E::Drain
            | E::Recover
            | E::RejoinOk
            | E::PowerOff => bad,
        },
        S::Rejoining => match event {
            E::RejoinOk => Ok(S::Ready),
            E::Fault => Ok(S::Failed),
            E::PowerOff => Ok(S::Offline),
            E::PowerOn
            | E::InitOk
            | E::Degrade
            | E::HealthRestored
            | E::Drain
            | E::Undrain
            | E::DrainComplete
            | E::Recover => bad,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HostEvent as E;
    use HostStatus as S;

    /// The allowed transitions, written independently of `transition`.
    const ALLOWED: &[(S, E, S)] = &[
        (S::Offline, E::PowerOn, S::Initializing),
        (S::Offline, E::Recover, S::Rejoining),
        (S::Initializing, E::InitOk, S::Ready),
        (S::Initializing, E::Fault, S::Failed),
        (S::Initializing, E::PowerOff, S::Offline),
        (S::Ready, E::Degrade, S::Degraded),
        (S::Ready, E::Fault, S::Failed),
        (S::Ready, E::Drain, S::Draining),
        (S::Degraded, E::HealthRestored, S::Ready),
        (S::Degraded, E::Fault, S::Failed),
        (S::Degraded, E::Drain, S::Draining),
        (S::Failed, E::Recover, S::Rejoining),
        (S::Failed, E::PowerOff, S::Offline),
        (S::Draining, E::DrainComplete, S::Offline),
        (S::Draining, E::Undrain, S::Ready),
        (S::Draining, E::Fault, S::Failed),
        (S::Rejoining, E::RejoinOk, S::Ready),
        (S::Rejoining, E::Fault, S::Failed),
        (S::Rejoining, E::PowerOff, S::Offline),
    ];

    #[test]
    fn every_state_event_pair() {
        let mut checked = 0;
        for from in S::ALL {
            for event in E::ALL {
                let want = ALLOWED
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event)
                    .map(|(_, _, to)| *to);
                match (transition(from, event), want) {
                    (Ok(got), Some(to)) => assert_eq!(got, to, "{from} + {event}"),
                    (Err(err), None) => {
                        assert_eq!(err, InvalidTransition { from, event });
                        assert!(err.to_string().contains(&from.to_string()));
                    }
                    (got, want) => panic!("{from} + {event}: got {got:?}, want {want:?}"),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 77);
    }

    #[test]
    fn only_ready_is_schedulable() {
        for s in S::ALL {
            assert_eq!(s.schedulable(), s == S::Ready);
        }
        assert!(!S::Failed.runs_vms());
        assert!(S::Draining.runs_vms());
    }

    #[test]
    fn failure_and_rejoin_cycle() {
        let mut s = S::Offline;
        for e in [E::PowerOn, E::InitOk, E::Fault, E::Recover, E::RejoinOk] {
            s = transition(s, e).expect("valid cycle");
        }
        assert_eq!(s, S::Ready);
    }

    #[test]
    fn drain_maintenance_and_rejoin_cycle() {
        let mut s = S::Ready;
        for e in [E::Drain, E::DrainComplete, E::Recover, E::RejoinOk] {
            s = transition(s, e).expect("valid cycle");
        }
        assert_eq!(s, S::Ready);
    }
}
