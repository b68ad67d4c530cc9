//! One front end's session with a device model: the vhost-user-backend crate parses the
//! protocol and maps the front end's memory table; [`Backend`] answers its questions from
//! the model (features, queue count and size, configuration space) and [`Session`] serves
//! the model's queues with the same code the virtio-pci transport runs
//! ([`serve_queue`]), on guest memory seen through [`SharedMappedMemory`].
//!
//! ```text
//! queue q:  stopped ─first kick (rings checked)─▶ started ─GET_VRING_BASE─▶ stopped
//!                        │ rings outside memory        │ ring fault
//!                        ▼                             ▼
//!                      failed ◀────────────────────────┘   (until the ring is stopped)
//! ```
//! The crate keeps each ring's addresses (already translated to guest-physical ones) and
//! its base index; on the first kick the session copies them into our [`Queue`], serves it
//! from then on, and writes its position back so that GET_VRING_BASE reports it.
//! Interrupts go out through the ring's call eventfd, with our queue's EVENT_IDX decision.
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use ray_devices::virtio::queue::Queue;
use ray_devices::virtio::{
    serve_queue, Completer, DeviceContext, InFlight, Transport, Used, VirtioDevice, WarnLimit,
    F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1,
};
use ray_memory::mmap::SharedMappedMemory;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::GpuBackend;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Takes the socket a vhost-user-gpu front end hands over (VHOST_USER_GPU_SET_SOCKET, at
/// each DRIVER_OK) for the back end's scanout and update messages.
pub type GpuSocketHook = Arc<dyn Fn(GpuBackend) + Send + Sync>;

/// Makes a fresh, not yet activated device model: one per front end, and again when a
/// front end resets the device or replaces its memory table.
pub type MakeDevice = Arc<dyn Fn() -> Result<Box<dyn VirtioDevice>, String> + Send + Sync>;

type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// How long stopping a ring waits for the model's requests in flight (a disk's I/O).
const STOP_WAIT: Duration = Duration::from_secs(10);

fn io_error(message: String) -> io::Error {
    io::Error::other(message)
}

/// Where one ring is in its life (see the module diagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ring {
    Stopped,
    Started,
    Failed,
}

/// The transport side of one front end's session.
pub struct Session {
    name: &'static str,
    make: MakeDevice,
    device: Box<dyn VirtioDevice>,
    activated: bool,
    memory: Option<ray_devices::virtio::pci::Memory>,
    queues: Vec<Queue>,
    rings: Vec<Ring>,
    /// The crate's rings (call eventfds, base indices), known from the first kick.
    vrings: Vec<VringRwLock>,
    event_idx: bool,
    /// The front end accepted VIRTIO_RING_F_INDIRECT_DESC.
    indirect: bool,
    in_flight: Arc<InFlight>,
    warn: WarnLimit,
    me: Weak<Mutex<Session>>,
}

impl Session {
    fn new(name: &'static str, make: MakeDevice) -> Result<Arc<Mutex<Self>>, String> {
        let device = make()?;
        let queues: Vec<Queue> = device
            .queue_sizes()
            .iter()
            .map(|&s| Queue::new(s))
            .collect();
        Ok(Arc::new_cyclic(|me| {
            Mutex::new(Session {
                name,
                make,
                device,
                activated: false,
                memory: None,
                rings: vec![Ring::Stopped; queues.len()],
                queues,
                vrings: Vec::new(),
                event_idx: false,
                indirect: false,
                in_flight: Arc::default(),
                warn: WarnLimit::default(),
                me: me.clone(),
            })
        }))
    }

    fn warn(&mut self, message: std::fmt::Arguments<'_>) {
        self.warn.warn(self.name, message);
    }

    /// Replaces an activated model by a fresh one (a reset, or new memory under it) and
    /// stops every ring. Returns the old model, to be dropped with the lock released: its
    /// threads may be completing requests, which takes the lock.
    fn renew(&mut self) -> Result<Option<Box<dyn VirtioDevice>>, String> {
        self.rings.iter_mut().for_each(|r| *r = Ring::Stopped);
        if !self.activated {
            self.device.reset();
            return Ok(None);
        }
        let fresh = (self.make)()?;
        self.activated = false;
        Ok(Some(std::mem::replace(&mut self.device, fresh)))
    }

    /// A kick of queue `q`: start the ring if it is not yet, then serve it.
    fn kick(&mut self, q: usize) {
        let Some(memory) = self.memory.clone() else {
            self.warn(format_args!(
                "queue {q} kicked before the front end sent its memory table; ignored"
            ));
            return;
        };
        if !self.activated {
            let completer = Completer::new(self.me.clone(), self.in_flight.clone());
            self.device.activate(DeviceContext {
                memory: memory.clone(),
                completer,
            });
            self.activated = true;
        }
        match self.rings[q] {
            Ring::Failed => return,
            Ring::Started => {}
            Ring::Stopped => {
                if let Err(e) = self.start(q, &memory) {
                    self.rings[q] = Ring::Failed;
                    self.warn(format_args!(
                        "queue {q} cannot start: {e}; it stays off until the front end stops it"
                    ));
                    return;
                }
                self.rings[q] = Ring::Started;
            }
        }
        let served = serve_queue(
            &mut self.queues[q],
            q,
            &mut *self.device,
            &*memory,
            &self.in_flight,
            &mut |m| self.warn.warn(self.name, m),
        );
        self.vrings[q].set_queue_next_avail(self.queues[q].next_avail);
        if served.used {
            self.interrupt_if_wanted(q);
        }
        if let Some(e) = served.fault {
            self.rings[q] = Ring::Failed;
            self.warn(format_args!(
                "queue {q}: {e}; it stays off until the front end stops it"
            ));
        }
    }

    /// Copies ring `q`'s configuration from the crate's ring into our queue and checks it.
    fn start(&mut self, q: usize, memory: &ray_devices::virtio::pci::Memory) -> Result<(), String> {
        let state = self.vrings[q].get_ref();
        let theirs = state.get_queue();
        let queue = &mut self.queues[q];
        queue.reset();
        queue.size = theirs.size();
        queue.desc = theirs.desc_table();
        queue.avail = theirs.avail_ring();
        queue.used = theirs.used_ring();
        queue.next_avail = theirs.next_avail();
        queue.next_used = theirs.next_used();
        queue.event_idx = self.event_idx;
        queue.indirect = self.indirect;
        queue.validate(&**memory).map_err(|e| e.to_string())?;
        queue.ready = true;
        Ok(())
    }

    fn interrupt_if_wanted(&mut self, q: usize) {
        let Some(memory) = self.memory.clone() else {
            return;
        };
        match self.queues[q].needs_interrupt(&*memory) {
            Ok(true) => {
                if let Err(e) = self.vrings[q].signal_used_queue() {
                    self.warn(format_args!("queue {q}: cannot signal the front end: {e}"));
                }
            }
            Ok(false) => {}
            Err(e) => {
                self.rings[q] = Ring::Failed;
                self.warn(format_args!("queue {q}: {e}"));
            }
        }
    }

    /// Takes back the requests the model holds idle (receive buffers) so that the rings'
    /// positions are the driver's view; rings that keep running are served again.
    fn take_back(&mut self) {
        for (q, n) in self.device.give_back() {
            if let Some(queue) = self.queues.get_mut(q) {
                queue.rewind(n);
                if let Some(v) = self.vrings.get(q) {
                    v.set_queue_next_avail(queue.next_avail);
                }
            }
            self.in_flight.done(usize::from(n));
        }
    }
}

impl Transport for Session {
    fn complete(&mut self, queue: u16, done: &[Used]) {
        let q = usize::from(queue);
        let Some(memory) = self.memory.clone() else {
            return;
        };
        if self.rings.get(q) != Some(&Ring::Started) {
            return;
        }
        match self.queues[q].add_completed(&*memory, done) {
            Ok(true) => self.interrupt_if_wanted(q),
            Ok(false) => {}
            Err(e) => {
                self.rings[q] = Ring::Failed;
                self.warn(format_args!("queue {q}: {e}"));
            }
        }
    }
}

/// The vhost-user back end of one device model for one front end.
#[derive(Clone)]
pub struct Backend {
    session: Arc<Mutex<Session>>,
    features: u64,
    queue_count: usize,
    max_queue_size: usize,
    exit: Arc<(EventConsumer, EventNotifier)>,
    gpu_socket: Option<GpuSocketHook>,
}

impl Backend {
    /// A back end for a fresh model from `make`; `name` prefixes its log lines.
    pub fn new(name: &'static str, make: MakeDevice) -> Result<Self, String> {
        let session = Session::new(name, make)?;
        let (features, queue_count, max_queue_size) = {
            let s = lock(&session);
            let sizes = s.device.queue_sizes();
            (
                s.device.features()
                    | F_VERSION_1
                    | F_EVENT_IDX
                    | F_INDIRECT_DESC
                    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
                sizes.len(),
                usize::from(sizes.iter().copied().max().unwrap_or(0)),
            )
        };
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK)
            .map_err(|e| format!("cannot create the exit eventfd: {e}"))?;
        Ok(Self {
            session,
            features,
            queue_count,
            max_queue_size,
            exit: Arc::new(exit),
            gpu_socket: None,
        })
    }

    /// Accepts a vhost-user-gpu front end's display socket, handing it to `hook`;
    /// without one, VHOST_USER_GPU_SET_SOCKET is refused.
    pub fn with_gpu_socket(mut self, hook: Option<GpuSocketHook>) -> Self {
        self.gpu_socket = hook;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Session> {
        lock(&self.session)
    }
}

fn lock(session: &Mutex<Session>) -> MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(|p| p.into_inner())
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queue_count
    }

    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        self.lock().indirect = features & F_INDIRECT_DESC != 0;
        if features & F_VERSION_1 == 0 {
            self.lock().warn(format_args!(
                "the front end did not accept VERSION_1 (features {features:#x}); legacy drivers are not served"
            ));
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        let old = {
            let mut s = self.lock();
            match s.renew() {
                Ok(old) => old,
                Err(e) => {
                    s.warn(format_args!("cannot renew the device on reset: {e}"));
                    None
                }
            }
        };
        drop(old);
    }

    fn set_gpu_socket(&self, gpu_backend: GpuBackend) -> io::Result<()> {
        match &self.gpu_socket {
            Some(hook) => {
                hook(gpu_backend);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: VHOST_USER_GPU_SET_SOCKET is for a GPU back end",
                    self.lock().name
                ),
            )),
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.lock().event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let s = self.lock();
        let len = s.device.config_len();
        // Bytes past the model's configuration read zero, as through virtio-pci.
        let mut data = vec![0u8; size.min(256) as usize];
        if u64::from(offset) < len {
            s.device.read_config(u64::from(offset), &mut data);
        }
        data
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        let view = SharedMappedMemory::new(mem.memory().into_inner());
        let old = {
            let mut s = self.lock();
            s.memory = Some(Arc::new(view));
            s.renew().map_err(io_error)?
        };
        drop(old);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1u64 << self.queue_count) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = queue_index as usize;
        let in_flight = {
            let mut s = self.lock();
            if q >= s.queues.len() {
                return Err(io_error(format!("queue {q} does not exist")));
            }
            s.take_back();
            s.in_flight.clone()
        };
        // Requests being done complete into the ring before it stops (the lock is free).
        let left = in_flight.wait_idle(STOP_WAIT);
        let mut s = self.lock();
        if left > 0 {
            s.warn(format_args!(
                "queue {q} stopped with {left} requests still in flight"
            ));
        }
        if s.rings[q] != Ring::Stopped {
            let next = s.queues[q].next_avail;
            if let Some(v) = s.vrings.get(q) {
                v.set_queue_next_avail(next);
            }
        }
        s.rings[q] = Ring::Stopped;
        // The other rings' held buffers were taken back: serve them again.
        for other in 0..s.queues.len() {
            if other != q && s.rings[other] == Ring::Started {
                s.kick(other);
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let q = usize::from(device_event);
        let mut s = self.lock();
        if evset != EventSet::IN {
            s.warn(format_args!("unexpected event {evset:?} on queue {q}"));
            return Ok(());
        }
        if s.vrings.is_empty() {
            s.vrings = vrings.to_vec();
        }
        if q >= s.queues.len() {
            s.warn(format_args!("event for queue {q}, which does not exist"));
            return Ok(());
        }
        s.kick(q);
        Ok(())
    }
}
