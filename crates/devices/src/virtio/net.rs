//! virtio-net (§5.1) on a TAP: one receive and one transmit queue, the MAC in the
//! configuration space, the link always up.
//!
//! The TAP carries the virtio-net header itself (IFF_VNET_HDR with a 12-byte header), so
//! a frame crosses the device as one copy each way and checksum/TSO requests from the
//! driver (`CSUM`, `HOST_TSO4/6`) go to the host kernel unchanged. Guest-side offloads are
//! not offered: the TAP then hands us only complete, checksummed frames of at most the
//! MTU, which fit one receive buffer, so mergeable receive buffers are not needed either.
//!
//! Both directions run on the device's own thread: the notifier thread only queues the
//! chains it pops ([`Completion::Pending`]); the I/O thread writes transmitted frames to
//! the TAP and fills receive buffers when the TAP is readable, completing each batch with
//! one interrupt at most. Receive buffers waiting for a packet are handed back to the
//! available ring when the VM pauses, so that a snapshot holds them as the driver's.
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ray_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use super::completer::Used;
use super::queue::Chain;
use super::{Completion, DeviceContext, VirtioDevice, WarnLimit};
use crate::rate::RateLimiter;

pub const DEVICE_TYPE_NET: u16 = 1;
pub const F_CSUM: u64 = 1 << 0;
pub const F_MAC: u64 = 1 << 5;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_STATUS: u64 = 1 << 16;
pub const STATUS_LINK_UP: u16 = 1;

/// The virtio-net header of VERSION_1 devices (with `num_buffers`).
pub const HDR_LEN: u32 = 12;
/// The largest frame the driver may send with TSO: 64 KiB plus an Ethernet header.
pub const MAX_TX_FRAME: u32 = 65_550;
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Requests completed per batch (one interrupt at most each).
const BATCH: usize = 64;

/// Packet and byte counters, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames dropped: too large for the receive buffer, or the TAP refused them.
    pub rx_dropped: AtomicU64,
    pub tx_dropped: AtomicU64,
}

/// What the I/O thread and the notifier thread share.
#[derive(Default)]
struct Held {
    rx: VecDeque<Chain>,
    tx: VecDeque<Chain>,
    paused: bool,
    stop: bool,
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

pub struct Net {
    mac: [u8; 6],
    tap: Arc<File>,
    limits: (RateLimiter, RateLimiter),
    shared: Arc<Shared>,
    counters: Arc<NetCounters>,
    thread: Option<JoinHandle<()>>,
    /// Whether the TAP queue is attached (gets packets); None for a descriptor that is
    /// not a TAP (tests).
    attached: Option<bool>,
    warn: WarnLimit,
}

/// Bytes a receive chain can take: all its buffers must be device-writable and hold at
/// least the header.
pub fn rx_capacity(chain: &Chain) -> Result<u32, String> {
    if let Some(i) = chain.descriptors.iter().position(|d| !d.writable) {
        return Err(format!(
            "receive buffer {} has a device-readable part (descriptor {i})",
            chain.head
        ));
    }
    let total = chain
        .descriptors
        .iter()
        .fold(0u64, |t, d| t + u64::from(d.len));
    if total < u64::from(HDR_LEN) {
        return Err(format!(
            "receive buffer {} holds {total} bytes, less than the {HDR_LEN}-byte header",
            chain.head
        ));
    }
    Ok(total.min(u64::from(u32::MAX)) as u32)
}

/// Length of the header and frame a transmit chain carries: device-readable buffers
/// only, between the header and the header plus the largest frame.
pub fn tx_length(chain: &Chain) -> Result<u32, String> {
    if let Some(i) = chain.descriptors.iter().position(|d| d.writable) {
        return Err(format!(
            "transmit request {} has a device-writable part (descriptor {i})",
            chain.head
        ));
    }
    let total = chain
        .descriptors
        .iter()
        .fold(0u64, |t, d| t + u64::from(d.len));
    if total < u64::from(HDR_LEN) || total > u64::from(HDR_LEN + MAX_TX_FRAME) {
        return Err(format!(
            "transmit request {} is {total} bytes; a header and frame is {HDR_LEN} to {} bytes",
            chain.head,
            HDR_LEN + MAX_TX_FRAME
        ));
    }
    Ok(total as u32)
}

/// Copies a checked transmit chain into `buf` (at least [`tx_length`] long); returns the
/// bytes copied (header and frame).
pub fn gather(chain: &Chain, mem: &dyn GuestMemory, buf: &mut [u8]) -> Result<usize, String> {
    let mut at = 0;
    // A zero-length buffer moves nothing: its address is never touched (nor checked).
    for d in chain.descriptors.iter().filter(|d| d.len > 0) {
        let n = d.len as usize;
        mem.read(d.addr, &mut buf[at..at + n])
            .map_err(|e| e.to_string())?;
        at += n;
    }
    Ok(at)
}

/// Copies `data` into a checked receive chain that can hold it.
pub fn scatter(chain: &Chain, mem: &dyn GuestMemory, data: &[u8]) -> Result<(), String> {
    let mut at = 0;
    for d in chain.descriptors.iter().filter(|d| d.len > 0) {
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

impl Net {
    /// A NIC on `tap`, opened non-blocking with IFF_VNET_HDR and a 12-byte header (see
    /// [`super::tap`]); `limits` are (transmit, receive). `attached`: whether the TAP
    /// queue gets packets now (a migration target's is detached until it resumes); None
    /// for a packet socket that is not a TAP.
    pub fn new(
        mac: [u8; 6],
        tap: File,
        limits: (RateLimiter, RateLimiter),
        attached: Option<bool>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            mac,
            tap: Arc::new(tap),
            limits,
            shared: Arc::new(Shared {
                held: Mutex::default(),
                wake: EventFd::new(libc::EFD_NONBLOCK)?,
            }),
            counters: Arc::default(),
            thread: None,
            attached,
            warn: WarnLimit::default(),
        })
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn wake(&self) {
        let _ = self.shared.wake.write(1);
    }

    /// Attaches or detaches the TAP queue, so that packets go to a VM that runs (a
    /// migration's source and target share the TAP on one host).
    fn set_attached(&mut self, on: bool) {
        if self.attached == Some(!on) {
            match super::tap::set_attached(&self.tap, on) {
                Ok(()) => self.attached = Some(on),
                // A TAP made without multi_queue has one queue, always attached.
                Err(e) => tracing::debug!("virtio-net: {e}"),
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_NET
    }

    fn features(&self) -> u64 {
        F_MAC | F_STATUS | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6
    }

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config_len(&self) -> u64 {
        8
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
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
        let checked = match queue {
            RX => rx_capacity(chain).map(|_| ()),
            TX => tx_length(chain).map(|_| ()),
            _ => Err(format!("queue {queue} does not exist")),
        };
        if let Err(e) = checked {
            return Completion::Failed(e);
        }
        if self.thread.is_none() {
            return Completion::Failed("the device was not activated".into());
        }
        let mut held = self.shared.lock();
        let list = if queue == RX {
            &mut held.rx
        } else {
            &mut held.tx
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
        let io = Io {
            tap: self.tap.clone(),
            shared: self.shared.clone(),
            counters: self.counters.clone(),
            limits: self.limits.clone(),
            context,
            pending_frame: None,
            rx_buf: vec![0; 65_536 + HDR_LEN as usize],
            warn: WarnLimit::default(),
        };
        self.thread = super::spawn_io("virtio-net", &mut self.warn, move || io.run());
    }

    fn give_back(&mut self) -> Vec<(usize, u16)> {
        let mut held = self.shared.lock();
        let n = held.rx.len() as u16;
        held.rx.clear();
        if n == 0 {
            Vec::new()
        } else {
            vec![(RX, n)]
        }
    }

    fn reset(&mut self) {
        let mut held = self.shared.lock();
        held.rx.clear();
        held.tx.clear();
    }

    fn pause(&mut self) {
        self.shared.lock().paused = true;
        self.set_attached(false);
    }

    fn resume(&mut self) {
        self.set_attached(true);
        self.shared.lock().paused = false;
        self.wake();
    }
}

/// The device's I/O thread.
struct Io {
    tap: Arc<File>,
    shared: Arc<Shared>,
    counters: Arc<NetCounters>,
    /// (transmit, receive)
    limits: (RateLimiter, RateLimiter),
    context: DeviceContext,
    /// A frame read from the TAP that found no receive buffer (or was rate-limited).
    pending_frame: Option<Vec<u8>>,
    rx_buf: Vec<u8>,
    warn: WarnLimit,
}

impl Io {
    fn run(mut self) {
        let mut tx_buf = vec![0u8; (HDR_LEN + MAX_TX_FRAME) as usize];
        loop {
            let (stop, paused, rx_ready) = {
                let h = self.shared.lock();
                (h.stop, h.paused, !h.rx.is_empty())
            };
            if stop {
                return;
            }
            let tx_wait = self.transmit(&mut tx_buf);
            let rx_wait = if paused { None } else { self.receive() };
            let want_tap = !paused && rx_ready && rx_wait.is_none();
            let timeout = [tx_wait, rx_wait].into_iter().flatten().min();
            self.wait(want_tap, timeout);
        }
    }

    /// Sleeps until a kick, readable TAP (if `tap`), or `timeout`.
    fn wait(&self, tap: bool, timeout: Option<Duration>) {
        let mut fds = [
            libc::pollfd {
                fd: self.shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let n = if tap { 2 } else { 1 };
        let ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, 1000) as i32);
        // SAFETY: `fds` is a live array of at least `n` pollfd structures.
        unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
        let _ = self.shared.wake.read();
    }

    /// Writes queued transmit requests to the TAP; how long to wait if rate-limited.
    fn transmit(&mut self, buf: &mut [u8]) -> Option<Duration> {
        let mut done = Vec::new();
        let mut wait = None;
        loop {
            let Some(chain) = self.shared.lock().tx.front().cloned() else {
                break;
            };
            let len = tx_length(&chain).unwrap_or(0);
            if let Err(w) = self.limits.0.take(u64::from(len), Instant::now()) {
                wait = Some(w);
                break;
            }
            self.shared.lock().tx.pop_front();
            match gather(&chain, &*self.context.memory, buf) {
                Ok(n) => self.write_frame(&buf[..n]),
                Err(e) => self.warn.warn(
                    "virtio-net",
                    format_args!("transmit request {}: {e}", chain.head),
                ),
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
        wait
    }

    fn write_frame(&mut self, frame: &[u8]) {
        // SAFETY: writes `frame.len()` bytes from a live buffer to our TAP descriptor.
        let n = unsafe { libc::write(self.tap.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n == frame.len() as isize {
            self.counters.tx_packets.fetch_add(1, Relaxed);
            let bytes = frame.len() as u64 - u64::from(HDR_LEN);
            self.counters.tx_bytes.fetch_add(bytes, Relaxed);
        } else {
            // A full TAP queue drops, as a real NIC's wire would.
            self.counters.tx_dropped.fetch_add(1, Relaxed);
        }
    }

    /// Reads frames from the TAP into receive buffers, as many as both allow; how long
    /// to wait if rate-limited.
    fn receive(&mut self) -> Option<Duration> {
        let mut done = Vec::new();
        let mut wait = None;
        loop {
            let frame = match self.pending_frame.take() {
                Some(f) => f,
                None => {
                    if self.shared.lock().rx.is_empty() {
                        break;
                    }
                    let buf = &mut self.rx_buf;
                    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
                    let n = unsafe {
                        libc::read(self.tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                    };
                    if n < HDR_LEN as isize {
                        break;
                    }
                    buf[..n as usize].to_vec()
                }
            };
            if let Err(w) = self.limits.1.take(frame.len() as u64, Instant::now()) {
                self.pending_frame = Some(frame);
                wait = Some(w);
                break;
            }
            let capacity = match self.shared.lock().rx.front() {
                Some(c) => rx_capacity(c).unwrap_or(0) as usize,
                None => {
                    self.pending_frame = Some(frame);
                    break;
                }
            };
            if capacity < frame.len() {
                // Larger than the driver's buffers (an MTU raised on the host): dropped,
                // as a real NIC drops an oversized frame; the buffer stays for the next.
                self.counters.rx_dropped.fetch_add(1, Relaxed);
                continue;
            }
            let Some(chain) = self.shared.lock().rx.pop_front() else {
                self.pending_frame = Some(frame);
                break;
            };
            let mut frame = frame;
            // num_buffers: always one buffer per frame.
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            let len = match scatter(&chain, &*self.context.memory, &frame) {
                Ok(()) => {
                    self.counters.rx_packets.fetch_add(1, Relaxed);
                    let bytes = frame.len() as u64 - u64::from(HDR_LEN);
                    self.counters.rx_bytes.fetch_add(bytes, Relaxed);
                    frame.len() as u32
                }
                Err(e) => {
                    self.warn.warn(
                        "virtio-net",
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
        wait
    }
}

#[cfg(test)]
#[path = "net_tests.rs"]
mod tests;
