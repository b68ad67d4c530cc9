//! How a device model raises message-signalled interrupts without knowing who delivers
//! them: the VMM implements [`MsiInterrupts`] (an irqfd per vector, routed by KVM's GSI
//! table), tests implement it with a recorder.

/// An MSI message as the guest programmed it into an MSI-X table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The interrupt side of a device with MSI-X vectors.
pub trait MsiInterrupts: Send + Sync {
    /// Vector `vector` now sends `message`, or nothing (`None`: the guest disabled MSI-X or
    /// has not programmed the entry). Called whenever the guest changes either; repeating
    /// an unchanged route is allowed and cheap for the implementor to ignore.
    fn route(&self, vector: u16, message: Option<MsiMessage>) -> Result<(), String>;

    /// Sends vector `vector`'s message now (it was routed, unmasked and enabled).
    fn trigger(&self, vector: u16);
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::Mutex;

    use super::*;

    /// Records routes and triggers.
    #[derive(Default)]
    pub struct Recorder {
        pub routes: Mutex<Vec<(u16, Option<MsiMessage>)>>,
        pub fired: Mutex<Vec<u16>>,
    }

    impl Recorder {
        pub fn fired(&self) -> Vec<u16> {
            self.fired.lock().unwrap().clone()
        }
        pub fn take_fired(&self) -> Vec<u16> {
            std::mem::take(&mut *self.fired.lock().unwrap())
        }
        pub fn last_route(&self, vector: u16) -> Option<Option<MsiMessage>> {
            let routes = self.routes.lock().unwrap();
            routes.iter().rev().find(|r| r.0 == vector).map(|r| r.1)
        }
    }

    impl MsiInterrupts for Recorder {
        fn route(&self, vector: u16, message: Option<MsiMessage>) -> Result<(), String> {
            self.routes.lock().unwrap().push((vector, message));
            Ok(())
        }
        fn trigger(&self, vector: u16) {
            self.fired.lock().unwrap().push(vector);
        }
    }
}
