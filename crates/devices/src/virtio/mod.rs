//! virtio 1.2 devices: the split virtqueue ([`queue`]), the modern PCI transport
//! ([`pci`]), completion of requests from other threads ([`completer`]) and the device
//! models behind it ([`rng`], [`blk`], [`net`], [`vsock`], [`gpu`], [`input`]).
pub mod blk;
pub mod completer;
pub mod gpu;
pub mod input;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
pub mod tap;
pub mod vsock;

use ray_memory::GuestMemory;

pub use completer::{Completer, DeviceContext, InFlight, Transport, Used};

use queue::{Chain, Queue, QueueError};

/// Feature bits the transport handles for every device.
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_RING_F_INDIRECT_DESC`: chains may use indirect descriptor tables (the queue's
/// walk follows them, so every device gets them).
pub const F_INDIRECT_DESC: u64 = 1 << 28;

/// Device status bits (§2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

pub const DEVICE_TYPE_RNG: u16 = 4;

/// What a device model does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Done: this many bytes were written into the chain's device-writable buffers.
    Done(u32),
    /// The request is malformed or could not be served; it is returned with nothing
    /// written, and the reason is logged.
    Failed(String),
    /// The device took the request and completes it later from another thread (a worker
    /// doing the I/O) through its [`Completer`]. Pausing the transport waits until every
    /// pending request is completed, so a saved state has none in flight.
    Pending,
}

/// A device model behind a virtio transport. It sees only validated chains; queue
/// bookkeeping, notification suppression and interrupts are the transport's.
pub trait VirtioDevice: Send {
    /// The virtio device type (4 = entropy source).
    fn device_type(&self) -> u16;
    /// Device-specific feature bits (the transport adds its own).
    fn features(&self) -> u64;
    /// The maximum size of each of its queues; their count is the number of queues.
    fn queue_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration (out-of-range bytes read zero).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    fn config_len(&self) -> u64 {
        0
    }
    /// The driver writes the device-specific configuration (most devices have nothing
    /// writable there: ignored).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Serves one request of queue `queue`. Called on the notifier thread with the
    /// transport locked: a device whose requests take long (disk or network I/O) returns
    /// [`Completion::Pending`] and completes them from its own threads.
    fn process(
        &mut self,
        queue: usize,
        chain: &Chain,
        memory: &(dyn GuestMemory + Send + Sync),
    ) -> Completion;
    /// While at least this many of a queue's requests are pending, the transport does not
    /// ask the driver for kicks: each completion takes the requests made available
    /// meanwhile instead (a deep queue always has a next completion coming), so a driver
    /// keeping many requests in flight adds them without a VM exit. 0 (the default): kicks
    /// are always asked for. Only for devices whose completions may serve the queue from
    /// their own threads ([`Completer::complete`] holds no lock of the device then).
    fn hold_kicks_at(&self) -> usize {
        0
    }
    /// Device reset: forget everything negotiated.
    fn reset(&mut self) {}
    /// Called once, when the transport is shared between threads: what a device needs to
    /// complete requests from its own threads (and to poll its own file descriptors there).
    fn activate(&mut self, context: DeviceContext) {
        let _ = context;
    }
    /// The VM is being paused: stop taking new work from host-side sources (a TAP, a
    /// socket) until [`resume`](Self::resume). Requests already pending still complete.
    fn pause(&mut self) {}
    fn resume(&mut self) {}
    /// What of the device's own set-up a saved state must agree with (a disk's size): saved
    /// with the transport's state, checked by [`check_device`](Self::check_device) on
    /// restore.
    fn save_device(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn check_device(&self, saved: &serde_json::Value) -> Result<(), String> {
        let _ = saved;
        Ok(())
    }
    /// Takes over the device's own saved part (checked as untrusted input); `memory` is the
    /// restored guest RAM. Default: [`check_device`](Self::check_device) only, for devices
    /// whose state is all in the transport.
    fn restore_device(
        &mut self,
        saved: &serde_json::Value,
        memory: &(dyn GuestMemory + Send + Sync),
    ) -> Result<(), String> {
        let _ = memory;
        self.check_device(saved)
    }
    /// Requests the device took ([`Completion::Pending`]) but does not work on (receive
    /// buffers waiting for a packet), as (queue, count): they must be the last `count`
    /// popped from that queue. On pause and reset the transport puts them back in the
    /// available ring, so that a saved state holds them as the driver's.
    fn give_back(&mut self) -> Vec<(usize, u16)> {
        Vec::new()
    }
    /// The transport took over a saved state (a restore or a migration's target): what
    /// lived only on the old host (a vsock device's connections) is gone.
    fn restored(&mut self) {}
}

/// Starts a device's I/O thread named `name`; if the thread cannot start, warns through
/// `warn` that the device stays silent and returns None.
pub fn spawn_io(
    name: &'static str,
    warn: &mut WarnLimit,
    run: impl FnOnce() + Send + 'static,
) -> Option<std::thread::JoinHandle<()>> {
    match std::thread::Builder::new()
        .name(name.into())
        .stack_size(256 << 10)
        .spawn(move || {
            ray_seccomp::enter(ray_seccomp::Kind::DeviceIo);
            run()
        }) {
        Ok(t) => Some(t),
        Err(e) => {
            warn.warn(
                name,
                format_args!("cannot start the I/O thread: {e}; the device stays silent"),
            );
            None
        }
    }
}

/// Logs warnings about one device's guest input, up to a limit, so that a guest cannot
/// fill the VMM's log.
#[derive(Debug, Default, Clone)]
pub struct WarnLimit {
    count: u32,
}

impl WarnLimit {
    const MAX: u32 = 32;

    pub fn warn(&mut self, device: &str, message: std::fmt::Arguments<'_>) {
        self.count = self.count.saturating_add(1);
        if self.count <= Self::MAX {
            tracing::warn!("{device}: {message}");
        }
        if self.count == Self::MAX {
            tracing::warn!("{device}: further warnings about this device are suppressed");
        }
    }
}

/// What [`serve_queue`] did: whether it put entries in the used ring (the caller decides
/// on an interrupt), and the queue fault that stopped it, if any.
#[derive(Debug, Default)]
pub struct Served {
    pub used: bool,
    pub fault: Option<QueueError>,
}

/// Serves every available request of `queue` (number `q`) with `device`: the one loop
/// every transport runs on a kick (virtio-pci, a vhost-user back end). Malformed chains and
/// failed requests are returned with nothing written and reported through `warn`; requests
/// the device keeps ([`Completion::Pending`]) are counted in `in_flight`. Stops at the
/// first fault of the queue as a whole, which the transport turns into a reset request.
pub fn serve_queue(
    queue: &mut Queue,
    q: usize,
    device: &mut dyn VirtioDevice,
    mem: &(dyn GuestMemory + Send + Sync),
    in_flight: &InFlight,
    warn: &mut dyn FnMut(std::fmt::Arguments<'_>),
) -> Served {
    serve_queue_holding(queue, q, device, mem, in_flight, warn, 0)
}

/// [`serve_queue`], leaving kicks off when the ring is empty while at least `hold_at`
/// requests are pending (see [`VirtioDevice::hold_kicks_at`]; 0: never).
pub fn serve_queue_holding(
    queue: &mut Queue,
    q: usize,
    device: &mut dyn VirtioDevice,
    mem: &(dyn GuestMemory + Send + Sync),
    in_flight: &InFlight,
    warn: &mut dyn FnMut(std::fmt::Arguments<'_>),
    hold_at: usize,
) -> Served {
    let mut served = Served::default();
    served.fault = loop {
        let popped = match queue.pop(mem) {
            Ok(Some(p)) => p,
            // A completion is coming, and it looks again.
            Ok(None) if hold_at > 0 && queue.pending_count() >= hold_at => break None,
            Ok(None) => match queue.enable_kicks(mem) {
                Ok(true) => continue,
                Ok(false) => break None,
                Err(e) => break Some(e),
            },
            Err(e) => break Some(e),
        };
        let (head, len) = match popped {
            Ok(chain) => match device.process(q, &chain, mem) {
                Completion::Done(n) => {
                    queue.settle(chain.head);
                    (chain.head, n)
                }
                Completion::Failed(why) => {
                    warn(format_args!("queue {q}: request failed: {why}"));
                    (chain.head, 0)
                }
                Completion::Pending => {
                    queue.note_pending(chain.head);
                    in_flight.add();
                    continue;
                }
            },
            Err((head, e)) => {
                warn(format_args!("queue {q}: request {head} failed: {e}"));
                (head, 0)
            }
        };
        if let Err(e) = queue.add_used(mem, head, len) {
            break Some(e);
        }
        served.used = true;
    };
    served
}
