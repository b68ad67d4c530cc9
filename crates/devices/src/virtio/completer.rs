//! Completing requests off the notifier thread.
//!
//! The notifier thread pops requests and hands them to the device model with the
//! transport locked. A device doing slow I/O (a disk's worker pool, a TAP, a socket)
//! answers [`Completion::Pending`](super::Completion::Pending) and later, from its own
//! thread, calls [`Completer::complete`] with a batch of finished requests: they go into
//! the used ring together and cost the guest at most one interrupt.
//!
//! The transport counts pending requests ([`InFlight`]); pausing the VM waits for that
//! count to reach zero without holding the transport's lock, which the completing thread
//! needs.
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use super::pci::Memory;

/// A finished request: the chain's head and the bytes written into its device-writable
/// buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

/// How many requests a device has taken and not completed.
#[derive(Debug, Default)]
pub struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, usize> {
        self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add(&self) {
        *self.lock() += 1;
    }

    pub fn done(&self, n: usize) {
        let mut c = self.lock();
        *c = c.saturating_sub(n);
        if *c == 0 {
            self.idle.notify_all();
        }
    }

    pub fn count(&self) -> usize {
        *self.lock()
    }

    /// Waits until nothing is pending, at most `timeout`; returns what is left.
    pub fn wait_idle(&self, timeout: Duration) -> usize {
        let c = self.lock();
        let (c, _) = self
            .idle
            .wait_timeout_while(c, timeout, |c| *c > 0)
            .unwrap_or_else(|p| p.into_inner());
        *c
    }
}

/// What owns a device's queues and takes its finished requests: the virtio-pci transport,
/// or a vhost-user back end serving the same model to another VMM.
pub trait Transport: Send {
    /// Puts `done` into queue `queue`'s used ring and interrupts the driver if it wants;
    /// completions for a queue that was reset or stopped meanwhile are dropped.
    fn complete(&mut self, queue: u16, done: &[Used]);
    /// The device changed its configuration (a display's mode): tell the driver with a
    /// configuration interrupt. Default: nothing (a transport without one).
    fn config_changed(&mut self) {}
}

/// Puts finished requests into a queue's used ring and interrupts the driver if it wants.
/// Cheap to clone; safe to call from any thread except from inside
/// [`VirtioDevice::process`](super::VirtioDevice::process) (the transport is locked there).
#[derive(Clone)]
pub struct Completer {
    transport: Weak<Mutex<dyn Transport>>,
    in_flight: Arc<InFlight>,
}

impl Completer {
    pub fn new(transport: Weak<Mutex<dyn Transport>>, in_flight: Arc<InFlight>) -> Self {
        Self {
            transport,
            in_flight,
        }
    }

    /// Completes `done` (requests of queue `queue` the device answered `Pending` to).
    /// Once the transport is gone (the VM ended), this does nothing.
    pub fn complete(&self, queue: u16, done: &[Used]) {
        if done.is_empty() {
            return;
        }
        if let Some(t) = self.transport.upgrade() {
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .complete(queue, done);
        }
        self.in_flight.done(done.len());
    }

    /// Raises a configuration-change interrupt (see [`Transport::config_changed`]).
    pub fn config_changed(&self) {
        if let Some(t) = self.transport.upgrade() {
            t.lock().unwrap_or_else(|p| p.into_inner()).config_changed();
        }
    }
}

/// What a device gets when its transport is shared: guest memory to do its I/O on, and
/// the way to complete requests from its own threads.
#[derive(Clone)]
pub struct DeviceContext {
    pub memory: Memory,
    pub completer: Completer,
}
