//! virtio-vsock (virtio 1.2 §5.10): stream sockets between the guest and host processes,
//! the host side on Unix sockets ([`muxer`]). Three queues: receive (device to guest),
//! transmit (guest to device) and event (transport resets); the guest's context id in
//! the configuration space.
//!
//! Everything runs on the device's own thread, which waits in epoll on the listener,
//! the connections and a wake-up eventfd: the notifier thread only queues the chains it
//! pops ([`Completion::Pending`]). Each pass takes every transmitted packet, then fills
//! as many receive buffers as there is data and credit for, completing each batch with
//! one interrupt at most.
//!
//! Host connections cannot move with the VM: a restored device (snapshot or migration)
//! starts with none and, once the guest runs, puts a TRANSPORT_RESET on the event queue
//! so that the driver drops the connections it had (the host processes of the old VM
//! saw EOF when it ended).
pub mod client;
pub mod muxer;
pub mod packet;

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use ray_memory::GuestMemory;
pub use ray_outside::Opener;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::completer::Used;
use super::queue::Chain;
use super::{Completion, DeviceContext, VirtioDevice, WarnLimit};
use muxer::{Event, Muxer};
use packet::{HDR_LEN, MAX_PAYLOAD};

pub const DEVICE_TYPE_VSOCK: u16 = 19;
pub const QUEUE_SIZE: u16 = 256;
/// The queues: receive, transmit, event.
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const EVENT: usize = 2;
/// Requests completed per batch (one interrupt at most each).
const BATCH: usize = 64;
/// virtio_vsock_event.id of a transport reset.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// The lowest context id a guest may have (0-2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;

/// What the device did, shared with whoever reports it.
#[derive(Debug, Default)]
pub struct VsockCounters {
    pub host_connects: AtomicU64,
    pub guest_connects: AtomicU64,
    pub resets: AtomicU64,
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
    /// Payload bytes to the guest and from it.
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Packets from the guest that were malformed and dropped.
    pub bad_packets: AtomicU64,
}

#[derive(Default)]
struct Held {
    rx: VecDeque<Chain>,
    tx: VecDeque<Chain>,
    event: VecDeque<Chain>,
    paused: bool,
    stop: bool,
    /// The driver reset the device: connections go.
    drop_connections: bool,
    /// The device was restored: the guest must hear of a transport reset.
    transport_reset: bool,
}

struct Shared {
    held: Mutex<Held>,
    wake: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Vsock {
    cid: u64,
    socket: PathBuf,
    opener: Opener,
    listener: Option<UnixListener>,
    shared: Arc<Shared>,
    counters: Arc<VsockCounters>,
    thread: Option<JoinHandle<()>>,
    warn: WarnLimit,
}

fn total(chain: &Chain) -> u64 {
    chain.descriptors.iter().map(|d| u64::from(d.len)).sum()
}

/// Checks a chain of queue `queue`: receive and event buffers are device-writable and
/// hold a header (an event); transmitted packets are device-readable, a header and at
/// most the largest payload.
pub fn check_chain(queue: usize, chain: &Chain) -> Result<(), String> {
    let (writable, min, max, what) = match queue {
        RX => (true, HDR_LEN as u64, u64::MAX, "receive buffer"),
        TX => (
            false,
            HDR_LEN as u64,
            (HDR_LEN as u32 + MAX_PAYLOAD).into(),
            "transmitted packet",
        ),
        EVENT => (true, 4, u64::MAX, "event buffer"),
        _ => return Err(format!("queue {queue} does not exist")),
    };
    if let Some(i) = chain
        .descriptors
        .iter()
        .position(|d| d.writable != writable)
    {
        let kind = if writable {
            "device-readable"
        } else {
            "device-writable"
        };
        return Err(format!(
            "{what} {} has a {kind} part (descriptor {i})",
            chain.head
        ));
    }
    let n = total(chain);
    if n < min || n > max {
        return Err(format!(
            "{what} {} holds {n} bytes; it must hold {min} to {max}",
            chain.head
        ));
    }
    Ok(())
}

/// Copies a checked transmit chain into `buf`.
pub fn gather(chain: &Chain, mem: &dyn GuestMemory, buf: &mut Vec<u8>) -> Result<(), String> {
    buf.clear();
    for d in &chain.descriptors {
        let at = buf.len();
        buf.resize(at + d.len as usize, 0);
        mem.read(d.addr, &mut buf[at..])
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Copies `data` into a checked receive chain that can hold it.
pub fn scatter(chain: &Chain, mem: &dyn GuestMemory, data: &[u8]) -> Result<(), String> {
    let mut at = 0;
    for d in &chain.descriptors {
        if at == data.len() {
            break;
        }
        let n = (d.len as usize).min(data.len() - at);
        mem.write(d.addr, &data[at..at + n])
            .map_err(|e| e.to_string())?;
        at += n;
    }
    Ok(())
}

impl Vsock {
    /// A device for guest `cid` (>= 3) whose host side listens on `socket` (bound now by
    /// `opener`, so that a bad path fails before the VM starts; a stale socket file is
    /// replaced).
    pub fn new(cid: u64, socket: PathBuf, opener: Opener) -> Result<Self, String> {
        if cid < MIN_GUEST_CID || cid > u64::from(u32::MAX) {
            return Err(format!(
                "guest cid {cid} is reserved or too large (3 to 4294967295)"
            ));
        }
        let listener = ray_outside::listen_vsock(&socket, opener)?;
        Ok(Self {
            cid,
            socket,
            opener,
            listener: Some(listener),
            shared: Arc::new(Shared {
                held: Mutex::default(),
                wake: EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| format!("cannot create the device's wake-up eventfd: {e}"))?,
            }),
            counters: Arc::default(),
            thread: None,
            warn: WarnLimit::default(),
        })
    }

    pub fn counters(&self) -> Arc<VsockCounters> {
        self.counters.clone()
    }

    fn wake(&self) {
        let _ = self.shared.wake.write(1);
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_VSOCK
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config_len(&self) -> u64 {
        8
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn process(
        &mut self,
        queue: usize,
        chain: &Chain,
        _memory: &(dyn GuestMemory + Send + Sync),
    ) -> Completion {
        if let Err(e) = check_chain(queue, chain) {
            return Completion::Failed(e);
        }
        if self.thread.is_none() {
            return Completion::Failed("the device was not activated".into());
        }
        let mut held = self.shared.lock();
        let list = match queue {
            RX => &mut held.rx,
            TX => &mut held.tx,
            _ => &mut held.event,
        };
        let was_empty = list.is_empty();
        list.push_back(chain.clone());
        drop(held);
        if was_empty {
            self.wake();
        }
        Completion::Pending
    }

    fn activate(&mut self, context: DeviceContext) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let muxer = match Muxer::new(
            self.cid,
            self.socket.clone(),
            listener,
            self.opener,
            self.counters.clone(),
        ) {
            Ok(m) => m,
            Err(e) => {
                self.warn
                    .warn("virtio-vsock", format_args!("cannot start: {e}"));
                return;
            }
        };
        let wake = self.shared.wake.as_raw_fd();
        if let Err(e) = muxer.epoll().ctl(
            ControlOperation::Add,
            wake,
            EpollEvent::new(EventSet::IN, wake as u64),
        ) {
            self.warn.warn(
                "virtio-vsock",
                format_args!("cannot watch the wake-up eventfd: {e}"),
            );
            return;
        }
        let io = Io {
            muxer,
            shared: self.shared.clone(),
            counters: self.counters.clone(),
            context,
            warn: WarnLimit::default(),
        };
        self.thread = crate::virtio::spawn_io("virtio-vsock", &mut self.warn, move || io.run());
    }

    fn give_back(&mut self) -> Vec<(usize, u16)> {
        let mut held = self.shared.lock();
        let (rx, event) = (
            std::mem::take(&mut held.rx),
            std::mem::take(&mut held.event),
        );
        [(RX, rx.len()), (EVENT, event.len())]
            .into_iter()
            .filter(|&(_, n)| n > 0)
            .map(|(q, n)| (q, n as u16))
            .collect()
    }

    fn reset(&mut self) {
        let mut held = self.shared.lock();
        held.rx.clear();
        held.tx.clear();
        held.event.clear();
        held.drop_connections = true;
        drop(held);
        self.wake();
    }

    fn pause(&mut self) {
        self.shared.lock().paused = true;
    }

    fn resume(&mut self) {
        self.shared.lock().paused = false;
        self.wake();
    }

    fn save_device(&self) -> serde_json::Value {
        serde_json::json!({ "cid": self.cid })
    }

    fn check_device(&self, saved: &serde_json::Value) -> Result<(), String> {
        match saved.get("cid").and_then(|c| c.as_u64()) {
            Some(c) if c == self.cid => Ok(()),
            Some(c) => Err(format!(
                "the saved guest had vsock cid {c}; this VM's is {} (a guest's cid cannot change under it)",
                self.cid
            )),
            None => Err("the saved state has no vsock cid".into()),
        }
    }

    fn restored(&mut self) {
        self.shared.lock().transport_reset = true;
    }
}

/// The device's I/O thread.
struct Io {
    muxer: Muxer,
    shared: Arc<Shared>,
    counters: Arc<VsockCounters>,
    context: DeviceContext,
    warn: WarnLimit,
}

impl Io {
    fn run(mut self) {
        let mut buf = Vec::with_capacity(HDR_LEN + MAX_PAYLOAD as usize);
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let (tx, paused, reset) = {
                let mut h = self.shared.lock();
                if h.stop {
                    return;
                }
                if std::mem::take(&mut h.drop_connections) {
                    self.muxer.drop_all();
                }
                (
                    std::mem::take(&mut h.tx),
                    h.paused,
                    h.transport_reset && !h.paused,
                )
            };
            self.transmit(tx, &mut buf);
            if !paused {
                if reset {
                    self.transport_reset();
                }
                self.receive(&mut buf);
            }
            let n = match self.muxer.epoll().wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    tracing::error!("virtio-vsock: cannot wait: {e}; the device stops");
                    return;
                }
            };
            for ev in &events[..n] {
                if let Event::Other(_) = self.muxer.handle(ev) {
                    let _ = self.shared.wake.read();
                }
            }
        }
    }

    /// Acts on the packets the guest sent; a malformed one is dropped (with a RST if it
    /// names a connection) and logged.
    fn transmit(&mut self, tx: VecDeque<Chain>, buf: &mut Vec<u8>) {
        let cid = self.guest_cid();
        let mut done = Vec::new();
        for chain in tx {
            let parsed = gather(&chain, &*self.context.memory, buf)
                .and_then(|()| packet::parse_tx(buf, cid).map_err(|e| e.to_string()));
            match parsed {
                Ok((h, payload)) => {
                    self.counters.tx_packets.fetch_add(1, Relaxed);
                    self.muxer.from_guest(&h, payload);
                }
                Err(e) => {
                    self.counters.bad_packets.fetch_add(1, Relaxed);
                    self.warn.warn(
                        "virtio-vsock",
                        format_args!("packet {} dropped: {e}", chain.head),
                    );
                    if let Some(h) = packet::rst_worthy(buf, cid) {
                        self.muxer.refuse(&h);
                    }
                }
            }
            done.push(Used {
                head: chain.head,
                len: 0,
            });
            if done.len() == BATCH {
                self.context.completer.complete(TX as u16, &done);
                done.clear();
            }
        }
        self.context.completer.complete(TX as u16, &done);
    }

    fn guest_cid(&self) -> u64 {
        self.muxer.guest_cid()
    }

    /// Fills receive buffers with what the host side has for the guest.
    fn receive(&mut self, buf: &mut Vec<u8>) {
        let mut done = Vec::new();
        loop {
            let cap = match self.shared.lock().rx.front() {
                Some(c) => total(c).min(usize::MAX as u64) as usize,
                None => break,
            };
            if !self.muxer.next_for_guest(cap, buf) {
                break;
            }
            let Some(chain) = self.shared.lock().rx.pop_front() else {
                break;
            };
            let len = match scatter(&chain, &*self.context.memory, buf) {
                Ok(()) => {
                    self.counters.rx_packets.fetch_add(1, Relaxed);
                    buf.len() as u32
                }
                Err(e) => {
                    self.warn.warn(
                        "virtio-vsock",
                        format_args!("receive buffer {}: {e}", chain.head),
                    );
                    0
                }
            };
            done.push(Used {
                head: chain.head,
                len,
            });
            if done.len() == BATCH {
                self.context.completer.complete(RX as u16, &done);
                done.clear();
            }
        }
        self.context.completer.complete(RX as u16, &done);
    }

    /// Tells the guest its connections are gone, once it has an event buffer.
    fn transport_reset(&mut self) {
        let Some(chain) = self.shared.lock().event.pop_front() else {
            return;
        };
        self.muxer.drop_all();
        let len = match scatter(
            &chain,
            &*self.context.memory,
            &EVENT_TRANSPORT_RESET.to_le_bytes(),
        ) {
            Ok(()) => 4,
            Err(e) => {
                self.warn.warn(
                    "virtio-vsock",
                    format_args!("event buffer {}: {e}", chain.head),
                );
                0
            }
        };
        self.shared.lock().transport_reset = false;
        self.context.completer.complete(
            EVENT as u16,
            &[Used {
                head: chain.head,
                len,
            }],
        );
    }
}

#[cfg(test)]
mod tests;
