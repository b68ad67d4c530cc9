//! The GPU model: each GPU of a VM moves through six states in one transition table.
//!
//! ```text
//!  Offline --power_on--> Initializing --initialized--> Ready <--last_viewer_left-- InUse
//!     ^                                                  |  \--viewer_connected-->  |
//!     |                                                  |                          |
//!     +--------power_off (from any but Offline)          +--suspend--> Suspended <--+
//!                                                        Ready <--resume-- Suspended
//!  any state --fail--> Error --reset--> Offline
//!                      Error --recover--> Ready   (a remote GPU's back end is back)
//! ```
//!
//! The state follows the VM: its GPUs are Suspended while it is paused (also for a
//! snapshot or a migration's last copy), and Ready again when it runs (after a resume, a
//! restore or on a migration's target); a viewer connecting makes a Ready GPU InUse.
use ray_api::gpu::{GpuConfig, GpuLimits, GpuStateName};

pub type GpuState = GpuStateName;

/// What happens to a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuEvent {
    PowerOn,
    Initialized,
    ViewerConnected,
    LastViewerLeft,
    Suspend,
    Resume,
    Fail,
    /// A remote GPU's back end is back (reconnected and replayed).
    Recover,
    Reset,
    PowerOff,
}

impl GpuEvent {
    pub const ALL: [GpuEvent; 10] = [
        GpuEvent::PowerOn,
        GpuEvent::Initialized,
        GpuEvent::ViewerConnected,
        GpuEvent::LastViewerLeft,
        GpuEvent::Suspend,
        GpuEvent::Resume,
        GpuEvent::Fail,
        GpuEvent::Recover,
        GpuEvent::Reset,
        GpuEvent::PowerOff,
    ];
}

/// An event the current state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("GPU {gpu} is {state:?}: {event:?} is not allowed in that state")]
pub struct TransitionError {
    pub gpu: usize,
    pub state: GpuState,
    pub event: GpuEvent,
}

/// The one transition table: the next state, or None where `event` is refused in `state`.
pub fn next_state(state: GpuState, event: GpuEvent) -> Option<GpuState> {
    use GpuEvent as E;
    use GpuState as S;
    match (state, event) {
        (S::Offline, E::PowerOn) => Some(S::Initializing),
        (S::Initializing, E::Initialized) => Some(S::Ready),
        (S::Ready | S::InUse, E::ViewerConnected) => Some(S::InUse),
        (S::InUse, E::LastViewerLeft) => Some(S::Ready),
        (S::Ready | S::InUse | S::Suspended, E::Suspend) => Some(S::Suspended),
        (S::Suspended, E::Resume) => Some(S::Ready),
        (S::Offline | S::Initializing | S::Ready | S::InUse | S::Suspended | S::Error, E::Fail) => {
            Some(S::Error)
        }
        (S::Error, E::Reset) => Some(S::Offline),
        (S::Error, E::Recover) => Some(S::Ready),
        (S::Initializing | S::Ready | S::InUse | S::Suspended | S::Error, E::PowerOff) => {
            Some(S::Offline)
        }
        (S::Initializing | S::Ready | S::InUse | S::Suspended | S::Error, E::PowerOn)
        | (S::Offline | S::Ready | S::InUse | S::Suspended | S::Error, E::Initialized)
        | (S::Offline | S::Initializing | S::Suspended | S::Error, E::ViewerConnected)
        | (S::Offline | S::Initializing | S::Ready | S::Suspended | S::Error, E::LastViewerLeft)
        | (S::Offline | S::Initializing | S::Error, E::Suspend)
        | (S::Offline | S::Initializing | S::Ready | S::InUse | S::Error, E::Resume)
        | (S::Offline | S::Initializing | S::Ready | S::InUse | S::Suspended, E::Reset)
        | (S::Offline | S::Initializing | S::Ready | S::InUse | S::Suspended, E::Recover)
        | (S::Offline, E::PowerOff) => None,
    }
}

/// One GPU: its configuration and state.
#[derive(Clone, Debug)]
pub struct Gpu {
    pub config: GpuConfig,
    pub state: GpuState,
}

/// The GPUs of one VM.
#[derive(Clone, Debug, Default)]
pub struct GpuModel {
    gpus: Vec<Gpu>,
}

impl GpuModel {
    /// The VM's GPUs, all Offline, if the list passes [`ray_api::gpu::check_gpus`] with
    /// `limits`.
    pub fn new(configs: &[GpuConfig], limits: &GpuLimits) -> Result<Self, String> {
        ray_api::gpu::check_gpus(configs, limits)?;
        Ok(Self {
            gpus: configs
                .iter()
                .map(|c| Gpu {
                    config: c.clone(),
                    state: GpuState::Offline,
                })
                .collect(),
        })
    }

    pub fn gpus(&self) -> &[Gpu] {
        &self.gpus
    }

    /// Applies `event` to GPU `gpu`; refuses, naming the state, where the table does.
    pub fn apply(&mut self, gpu: usize, event: GpuEvent) -> Result<GpuState, TransitionError> {
        let g = &mut self.gpus[gpu];
        let next = next_state(g.state, event).ok_or(TransitionError {
            gpu,
            state: g.state,
            event,
        })?;
        g.state = next;
        Ok(next)
    }

    /// Applies `event` to every GPU that allows it (a VM-wide event: pause, resume,
    /// viewers); the others keep their state.
    pub fn apply_all(&mut self, event: GpuEvent) {
        for g in &mut self.gpus {
            if let Some(next) = next_state(g.state, event) {
                g.state = next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ray_api::gpu::GpuType;

    const STATES: [GpuState; 6] = [
        GpuState::Offline,
        GpuState::Initializing,
        GpuState::Ready,
        GpuState::InUse,
        GpuState::Suspended,
        GpuState::Error,
    ];

    #[test]
    fn every_state_and_event_pair_has_its_answer() {
        use GpuEvent as E;
        use GpuState as S;
        let allowed = [
            (S::Offline, E::PowerOn, S::Initializing),
            (S::Initializing, E::Initialized, S::Ready),
            (S::Ready, E::ViewerConnected, S::InUse),
            (S::InUse, E::ViewerConnected, S::InUse),
            (S::InUse, E::LastViewerLeft, S::Ready),
            (S::Ready, E::Suspend, S::Suspended),
            (S::InUse, E::Suspend, S::Suspended),
            (S::Suspended, E::Suspend, S::Suspended),
            (S::Suspended, E::Resume, S::Ready),
            (S::Error, E::Reset, S::Offline),
            (S::Error, E::Recover, S::Ready),
        ];
        for s in STATES {
            for e in GpuEvent::ALL {
                let expect = if e == E::Fail {
                    Some(S::Error)
                } else if e == E::PowerOff {
                    (s != S::Offline).then_some(S::Offline)
                } else {
                    allowed
                        .iter()
                        .find(|(fs, fe, _)| *fs == s && *fe == e)
                        .map(|a| a.2)
                };
                assert_eq!(next_state(s, e), expect, "{s:?} x {e:?}");
            }
        }
    }

    #[test]
    fn a_refusal_names_the_gpu_and_its_state() {
        let c = GpuConfig {
            kind: GpuType::Emulated,
            width: 640,
            height: 480,
            displays: 1,
            passthrough: None,
            backend: None,
            token_file: None,
            timeout_ms: None,
            device: None,
        };
        let mut m = GpuModel::new(&[c], &GpuLimits::default()).unwrap();
        let e = m.apply(0, GpuEvent::Resume).unwrap_err();
        assert_eq!(
            e.to_string(),
            "GPU 0 is Offline: Resume is not allowed in that state"
        );
        m.apply(0, GpuEvent::PowerOn).unwrap();
        m.apply(0, GpuEvent::Initialized).unwrap();
        m.apply_all(GpuEvent::Suspend);
        assert_eq!(m.gpus()[0].state, GpuState::Suspended);
        m.apply_all(GpuEvent::ViewerConnected);
        assert_eq!(m.gpus()[0].state, GpuState::Suspended, "refused: kept");
        m.apply_all(GpuEvent::Resume);
        assert_eq!(m.gpus()[0].state, GpuState::Ready);
    }

    #[test]
    fn the_model_enforces_the_limits() {
        let c = GpuConfig {
            kind: GpuType::Emulated,
            width: 640,
            height: 480,
            displays: 1,
            passthrough: None,
            backend: None,
            token_file: None,
            timeout_ms: None,
            device: None,
        };
        let nine = vec![c.clone(); 9];
        let e = GpuModel::new(&nine, &GpuLimits::default()).unwrap_err();
        assert!(e.contains("9 GPUs asked for; the VM's limit is 8"), "{e}");
        let raised: GpuLimits = "gpus=9".parse().unwrap();
        assert_eq!(GpuModel::new(&nine, &raised).unwrap().gpus.len(), 9);
        // Lowered: two displays on one GPU, three over all, are over.
        let two = GpuConfig {
            displays: 2,
            ..c.clone()
        };
        let lowered: GpuLimits = "displays-per-gpu=1,displays=3".parse().unwrap();
        let e = GpuModel::new(&[c.clone(), two.clone()], &lowered).unwrap_err();
        assert!(
            e.contains("GPU 1: 2 displays asked for; the VM's limit is 1 a GPU"),
            "{e}"
        );
        let e = GpuModel::new(&[two.clone(), two], &GpuLimits::default()).map(|_| ());
        assert!(e.is_ok());
        let e = GpuModel::new(&[c.clone(), c.clone(), c.clone(), c], &lowered).unwrap_err();
        assert!(
            e.contains("4 displays asked for over all GPUs; the VM's limit is 3"),
            "{e}"
        );
    }
}
