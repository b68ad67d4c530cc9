//! Live migration through the cluster: what the operator, the controller and the two
//! agents write to each other. The controller drives it (`controller/migrate.rs`); the
//! agents only act on their own keys and report (`agent.rs`); the VMMs move the VM with
//! the existing migration protocol.
//!
//! ```text
//! operator  /ray/vms/<vm>/migrate {to?}                       (ray cluster vm migrate)
//! controller records /ray/ops/migrate-<vm>, then
//!           /ray/hosts/<to>/incoming/<vm> {from, epoch}       target agent starts a receiver
//! target    /ray/vms/<vm>/receiver {waiting, addr}
//! controller /ray/hosts/<from>/outgoing/<vm> {to, addr}       source agent starts sending
//! source    /ray/vms/<vm>/sender {copying, pass, bytes...}    progress
//! target    /ray/vms/<vm>/receiver {done}                     the VM runs on the target
//! controller hands the run token over (epoch E+1, assignment moves to <to>), clears the rest
//! ```
//!
//! The VMMs' own protocol makes sure only one copy runs (the source pauses for good before
//! the target resumes); the target's report of that switch-over is what moves the token.
//! A failure or an abort (the operator sets `abort`; the controller takes the outgoing key
//! away, the source cancels, which past the switch-over it cannot) ends with the VM on
//! whichever side the VMMs say, and the token there.
use serde::{Deserialize, Serialize};

/// `/ray/vms/<vm>/migrate`: the operator's request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The target host; the placement engine picks one when absent.
    #[serde(default)]
    pub to: Option<String>,
    /// Stop a migration under way (the VM stays where it is, unless the switch-over is
    /// already past).
    #[serde(default)]
    pub abort: bool,
    /// Who asked: `operator`, or `drain <host>`.
    #[serde(default)]
    pub cause: Option<String>,
}

/// `/ray/hosts/<to>/incoming/<vm>`: prepare a receiver for `vm`, coming from `from`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    pub from: String,
    /// The run-token epoch on the source.
    pub epoch: u64,
}

/// `/ray/hosts/<from>/outgoing/<vm>`: send `vm` to the receiver at `addr` on `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    pub to: String,
    pub addr: String,
    pub epoch: u64,
}

/// Where one side of a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Receiver: listening for its source.
    Waiting,
    /// Pages are moving.
    Copying,
    /// Receiver: the VM runs here. Sender: the VM left.
    Done,
    /// The VM did not move: the receiver discarded its copy, or the sender rolled back.
    Failed,
    /// Sender: the link failed after the switch-over; the source stays paused and the
    /// receiver's report decides where the VM is.
    Uncertain,
}

impl Phase {
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }
}

/// `/ray/vms/<vm>/receiver` and `/ray/vms/<vm>/sender`: one side's report, written by its
/// agent when the phase or the pass changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The host reporting.
    pub host: String,
    pub phase: Phase,
    /// Receiver: the address it listens on.
    #[serde(default)]
    pub addr: Option<String>,
    #[serde(default)]
    pub pass: u32,
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub expected_downtime_ms: f64,
    #[serde(default)]
    pub downtime_ms: Option<f64>,
    #[serde(default)]
    pub elapsed_ms: u64,
    #[serde(default)]
    pub error: Option<String>,
}

impl Progress {
    pub fn new(host: &str, phase: Phase) -> Progress {
        Progress {
            host: host.into(),
            phase,
            addr: None,
            pass: 0,
            bytes_sent: 0,
            expected_downtime_ms: 0.0,
            downtime_ms: None,
            elapsed_ms: 0,
            error: None,
        }
    }

    /// Whether `other` is worth another write: a new phase, pass or outcome (bytes alone
    /// move on every poll).
    pub fn differs(&self, other: &Progress) -> bool {
        (self.phase, self.pass, &self.addr, &self.error)
            != (other.phase, other.pass, &other.addr, &other.error)
    }

    /// One line for a person.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{} {:?}: pass {}, {:.1} MiB sent, expected downtime {:.1} ms, {} ms",
            self.host,
            self.phase,
            self.pass,
            self.bytes_sent as f64 / (1 << 20) as f64,
            self.expected_downtime_ms,
            self.elapsed_ms
        );
        if let Some(e) = &self.error {
            s.push_str(&format!(" ({e})"));
        }
        s
    }
}

pub(crate) fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain structs of strings and numbers: serializing cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_refuse_unknown_fields() {
        let r: Request = serde_json::from_slice(br#"{"to":"h2"}"#).unwrap();
        assert_eq!((r.to.as_deref(), r.abort), (Some("h2"), false));
        let e = serde_json::from_slice::<Request>(br#"{"too":"h2"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `too`"), "{e}");
    }

    #[test]
    fn progress_is_rewritten_on_phase_or_pass_only() {
        let a = Progress::new("h1", Phase::Copying);
        let mut b = a.clone();
        b.bytes_sent = 1 << 20;
        assert!(!a.differs(&b));
        b.pass = 2;
        assert!(a.differs(&b));
        assert!(Phase::Done.is_final() && !Phase::Uncertain.is_final());
    }
}
