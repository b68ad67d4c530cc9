//! [`Persist`]: how every component with state is saved and brought back.

use serde::Serialize;

/// One component's share of a snapshot or a migration: its state, saved while the VM is
/// paused, and put back into a newly built component of the same kind. Every component
/// with state implements it: devices here, and in the VMM the vCPUs and the VM (irqchips,
/// PIT, kvmclock), which `Machine` composes. Guest memory is the snapshot store's and the
/// migration stream's business. It lives with the devices, below the VMM, so device models
/// implement it without depending on the VMM.
pub trait Persist {
    type State: Serialize + serde::de::DeserializeOwned;
    type Error;
    fn save_state(&self) -> Result<Self::State, Self::Error>;
    /// `state` is untrusted input: a refusal names what was wrong.
    fn restore_state(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}
