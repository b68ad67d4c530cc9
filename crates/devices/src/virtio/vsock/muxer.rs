//! The host side of virtio-vsock: stream connections between guest ports and Unix
//! sockets, with credit flow control both ways.
//!
//! Host-initiated (the hybrid convention): a process connects to the device's socket,
//! writes `CONNECT <port>\n`; the device sends the guest a REQUEST from a fresh host
//! port and, on the guest's RESPONSE, answers `OK <hostport>\n`; then the bytes flow.
//! Guest-initiated: a REQUEST to host port P connects to `<socket>_P`; RESPONSE if
//! something listens there, RST otherwise.
//!
//! ```text
//! host CONNECT ─▶ Connecting ─RESPONSE─▶ Established ─SHUTDOWN both / RST / error─▶ gone
//! guest REQUEST ─connect ok─▶ Established           ─host EOF─▶ SHUTDOWN(SEND) to guest
//! ```
//! Credit: the device reads from a host socket only as much as the guest's buffer space
//! allows (`buf_alloc - (rx_cnt - fwd_cnt)`), and tells the guest it has [`BUF_ALLOC`]
//! bytes of its own, updating `fwd_cnt` as the guest's bytes reach the host socket. A
//! guest that sends beyond its credit is reset. All sockets are non-blocking, watched
//! edge-triggered by the device thread's epoll: nothing is read that cannot be sent, and
//! nothing spins.
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use ray_outside::Opener;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{self, op, Header, HDR_LEN, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::VsockCounters;
use crate::virtio::WarnLimit;

/// The receive buffer the device offers the guest per connection.
pub const BUF_ALLOC: u32 = 256 << 10;
/// Host ports of host-initiated connections start here (guest-side ports of Linux's
/// ephemeral range are far below).
const FIRST_HOST_PORT: u32 = 1 << 30;
/// The longest `CONNECT <port>\n` line.
const CONNECT_MAX: usize = 32;
/// One RW packet carries at most this much (one page of the guest's buffers, typically).
const MAX_CHUNK: usize = 64 << 10;

/// (host port, guest port)
type Key = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A host process asked for a guest port; the REQUEST went out.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// The host closed its side (read EOF): SHUTDOWN(SEND) went to the guest.
    host_eof: bool,
    /// The guest's SHUTDOWN flags so far.
    guest_shut: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest, and bytes of the guest's written to the host (wrapping).
    rx_cnt: u32,
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard of.
    fwd_told: u32,
    to_host: VecDeque<u8>,
    /// Bytes at the front of `to_host` that are the device's own (the `OK` line), not
    /// the guest's: they do not count in `fwd_cnt`.
    own: usize,
    readable: bool,
    writable: bool,
    credit_update_queued: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            host_eof: false,
            guest_shut: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_told: 0,
            to_host: VecDeque::new(),
            own: 0,
            readable: false,
            writable: true,
            credit_update_queued: false,
        }
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A host process that connected and has not finished its `CONNECT` line.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    guest_cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    /// Who opens its connections to host listeners (a jailed VMM's keeper, when the
    /// socket is outside the jail).
    opener: Opener,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    by_fd: HashMap<RawFd, Key>,
    pending: HashMap<RawFd, Pending>,
    /// Packets without payload waiting for a receive buffer.
    control: VecDeque<Header>,
    next_port: u32,
    counters: Arc<VsockCounters>,
    warn: WarnLimit,
}

/// What an epoll event was about.
pub enum Event {
    /// The device's own wake-up eventfd (or anything not a socket of the muxer's).
    Other(u64),
    Handled,
}

fn epoll_add(epoll: &Epoll, fd: RawFd, events: EventSet) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(events, fd as u64),
    )
}

const STREAM_EVENTS: EventSet = EventSet::IN
    .union(EventSet::OUT)
    .union(EventSet::EDGE_TRIGGERED)
    .union(EventSet::READ_HANG_UP);

impl Muxer {
    pub fn new(
        guest_cid: u64,
        socket: PathBuf,
        listener: UnixListener,
        opener: Opener,
        counters: Arc<VsockCounters>,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll_add(&epoll, listener.as_raw_fd(), EventSet::IN)?;
        Ok(Self {
            guest_cid,
            socket,
            listener,
            opener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            control: VecDeque::new(),
            next_port: FIRST_HOST_PORT,
            counters,
            warn: WarnLimit::default(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Answers a refused packet of the guest's (see [`packet::rst_worthy`]) with a RST,
    /// ending the connection it names if there is one.
    pub fn refuse(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        if self.conns.contains_key(&key) {
            self.reset(key);
        } else {
            self.counters.resets.fetch_add(1, Relaxed);
            self.queue(key, op::RST, 0);
        }
    }

    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Forgets every connection (the driver reset the device, or the guest was told of
    /// a transport reset): host sockets are closed, so their processes see EOF.
    pub fn drop_all(&mut self) {
        for (_, c) in self.conns.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.by_fd.clear();
        self.control.clear();
    }

    fn queue(&mut self, key: Key, op: u16, flags: u32) {
        let mut h = packet::to_guest(self.guest_cid, key.0, key.1, op);
        h.flags = flags;
        self.control.push_back(h);
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.by_fd.remove(&fd);
        }
    }

    /// Ends a connection with a RST to the guest.
    fn reset(&mut self, key: Key) {
        self.remove(key);
        self.counters.resets.fetch_add(1, Relaxed);
        self.queue(key, op::RST, 0);
    }

    fn add(&mut self, key: Key, conn: Conn) -> std::io::Result<()> {
        let fd = conn.stream.as_raw_fd();
        epoll_add(&self.epoll, fd, STREAM_EVENTS)?;
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        Ok(())
    }

    /// Acts on one packet the guest sent (already checked by [`packet::parse_tx`]).
    pub fn from_guest(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        let state = self.conns.get(&key).map(|c| c.state);
        match (h.op, state) {
            (op::RST, _) => self.remove(key),
            (op::REQUEST, None) => self.guest_connect(key, h),
            (op::RESPONSE, Some(State::Connecting)) => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                c.state = State::Established;
                c.readable = true;
                let ok = format!("OK {}\n", key.0);
                c.own = ok.len();
                c.to_host.extend(ok.bytes());
                self.flush(key);
            }
            (op::RW, Some(State::Established)) => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if c.to_host.len() - c.own + payload.len() > BUF_ALLOC as usize {
                    self.warn.warn(
                        "virtio-vsock",
                        format_args!(
                            "guest port {} sent beyond its credit ({} bytes waiting, {} more); connection reset",
                            key.1,
                            c.to_host.len(),
                            payload.len()
                        ),
                    );
                    self.reset(key);
                    return;
                }
                c.to_host.extend(payload);
                self.flush(key);
            }
            (op::SHUTDOWN, Some(_)) => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.guest_shut |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                }
                self.flush(key);
            }
            (op::CREDIT_UPDATE, Some(_)) => {}
            (op::CREDIT_REQUEST, Some(_)) => self.credit_update(key),
            (_, Some(_)) => {
                self.warn.warn(
                    "virtio-vsock",
                    format_args!(
                        "operation {} on guest port {} out of turn; connection reset",
                        h.op, key.1
                    ),
                );
                self.reset(key);
            }
            (_, None) => {
                // A packet for no connection: a RST tells the guest so.
                self.counters.resets.fetch_add(1, Relaxed);
                self.queue(key, op::RST, 0);
            }
        }
    }

    fn credit_update(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.credit_update_queued {
                c.credit_update_queued = true;
                self.queue(key, op::CREDIT_UPDATE, 0);
            }
        }
    }

    fn guest_connect(&mut self, key: Key, h: &Header) {
        match ray_outside::connect_vsock(&self.socket, key.0, self.opener) {
            Ok(stream) => {
                let mut c = Conn::new(stream, State::Established);
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                c.readable = true;
                match self.add(key, c) {
                    Ok(()) => {
                        self.counters.guest_connects.fetch_add(1, Relaxed);
                        self.queue(key, op::RESPONSE, 0);
                    }
                    Err(e) => {
                        self.warn.warn(
                            "virtio-vsock",
                            format_args!("cannot watch a connection: {e}"),
                        );
                        self.reset(key);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(
                    "virtio-vsock: guest connect to {}: {e}",
                    ray_outside::vsock_port_path(&self.socket, key.0).display()
                );
                self.counters.resets.fetch_add(1, Relaxed);
                self.queue(key, op::RST, 0);
            }
        }
    }

    /// Writes what the guest sent to the host socket, as far as it takes it; finishes a
    /// connection the guest shut down once its bytes are out.
    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut failed = false;
        while c.writable && !c.to_host.is_empty() {
            let (a, _) = c.to_host.as_slices();
            match c.stream.write(a) {
                Ok(n) => {
                    c.to_host.drain(..n);
                    let own = n.min(c.own);
                    c.own -= own;
                    let guests = (n - own) as u32;
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(guests);
                    self.counters.tx_bytes.fetch_add(guests.into(), Relaxed);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => c.writable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.reset(key);
            return;
        }
        let drained = c.to_host.is_empty();
        let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
        if drained && c.guest_shut & both == both {
            self.reset(key);
            return;
        }
        if drained && c.guest_shut & SHUTDOWN_SEND != 0 {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        if c.fwd_cnt.wrapping_sub(c.fwd_told) >= BUF_ALLOC / 2 {
            self.credit_update(key);
        }
    }

    /// Serves one epoll event; events not about the muxer's sockets are returned.
    pub fn handle(&mut self, event: &EpollEvent) -> Event {
        let fd = event.data() as RawFd;
        let set = event.event_set();
        if fd == self.listener.as_raw_fd() {
            self.accept();
            return Event::Handled;
        }
        if self.pending.contains_key(&fd) {
            self.read_connect(fd);
            return Event::Handled;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return Event::Other(event.data());
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return Event::Handled;
        };
        if set
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            c.readable = true;
        }
        if set.contains(EventSet::OUT) {
            c.writable = true;
        }
        if c.state == State::Connecting
            && set.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP)
        {
            // The host process gave up before the guest answered.
            self.reset(key);
            return Event::Handled;
        }
        self.flush(key);
        Event::Handled
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if epoll_add(&self.epoll, fd, EventSet::IN | EventSet::EDGE_TRIGGERED).is_ok() {
                        self.pending.insert(
                            fd,
                            Pending {
                                stream,
                                line: Vec::new(),
                            },
                        );
                        self.read_connect(fd);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads a host process's `CONNECT <port>\n` a byte at a time (nothing after the
    /// line may be taken before the guest accepts).
    fn read_connect(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let line = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break String::from_utf8_lossy(&p.line).into_owned(),
                Ok(1) if p.line.len() < CONNECT_MAX => p.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // EOF, an error or an overlong line.
                _ => {
                    self.drop_pending(fd);
                    return;
                }
            }
        };
        let Some(mut p) = self.drop_pending(fd) else {
            return;
        };
        let port = line
            .strip_prefix("CONNECT ")
            .and_then(|n| n.trim_end_matches('\r').parse::<u32>().ok());
        let Some(port) = port else {
            let _ = p.stream.write_all(b"ERR expected CONNECT <port>\n");
            return;
        };
        let host_port = self.fresh_port(port);
        let key = (host_port, port);
        let mut req = packet::to_guest(self.guest_cid, key.0, key.1, op::REQUEST);
        req.flags = 0;
        if self
            .add(key, Conn::new(p.stream, State::Connecting))
            .is_ok()
        {
            self.counters.host_connects.fetch_add(1, Relaxed);
            self.control.push_back(req);
        }
    }

    fn drop_pending(&mut self, fd: RawFd) -> Option<Pending> {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.pending.remove(&fd)
    }

    fn fresh_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.wrapping_add(1).max(FIRST_HOST_PORT);
            if !self.conns.contains_key(&(p, guest_port)) {
                return p;
            }
        }
    }

    /// Whether [`next_for_guest`](Self::next_for_guest) may have something.
    pub fn has_work(&self) -> bool {
        !self.control.is_empty()
            || self.conns.values().any(|c| {
                c.state == State::Established && c.readable && !c.host_eof && c.peer_credit() > 0
            })
    }

    /// The next packet for the guest, header and payload, into `out` (at most `cap`
    /// bytes, at least the header): control packets first, then data of readable
    /// connections the guest has credit for. False when there is nothing to send.
    pub fn next_for_guest(&mut self, cap: usize, out: &mut Vec<u8>) -> bool {
        out.clear();
        while let Some(mut h) = self.control.pop_front() {
            let key = (h.src_port, h.dst_port);
            if let Some(c) = self.conns.get_mut(&key) {
                if h.op == op::CREDIT_UPDATE {
                    c.credit_update_queued = false;
                }
                h.buf_alloc = BUF_ALLOC;
                h.fwd_cnt = c.fwd_cnt;
                c.fwd_told = c.fwd_cnt;
            } else if h.op != op::RST {
                continue;
            }
            out.extend_from_slice(&h.to_bytes());
            return true;
        }
        let room = cap.saturating_sub(HDR_LEN).min(MAX_CHUNK);
        if room == 0 {
            return false;
        }
        let keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == State::Established
                    && c.readable
                    && !c.host_eof
                    && c.guest_shut & SHUTDOWN_RCV == 0
            })
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let n = room.min(c.peer_credit() as usize);
            if n == 0 {
                continue;
            }
            out.resize(HDR_LEN + n, 0);
            match c.stream.read(&mut out[HDR_LEN..]) {
                Ok(0) => {
                    c.host_eof = true;
                    out.clear();
                    let h = self.header(key, op::SHUTDOWN, SHUTDOWN_SEND);
                    out.extend_from_slice(&h.to_bytes());
                    return true;
                }
                Ok(got) => {
                    c.rx_cnt = c.rx_cnt.wrapping_add(got as u32);
                    self.counters.rx_bytes.fetch_add(got as u64, Relaxed);
                    out.truncate(HDR_LEN + got);
                    let mut h = self.header(key, op::RW, 0);
                    h.len = got as u32;
                    out[..HDR_LEN].copy_from_slice(&h.to_bytes());
                    return true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => c.readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.reset(key),
            }
            out.clear();
        }
        // A reset above queued a RST.
        if !self.control.is_empty() {
            return self.next_for_guest(cap, out);
        }
        false
    }

    /// A header of connection `key` carrying our credit.
    fn header(&mut self, key: Key, op: u16, flags: u32) -> Header {
        let mut h = packet::to_guest(self.guest_cid, key.0, key.1, op);
        h.flags = flags;
        h.buf_alloc = BUF_ALLOC;
        if let Some(c) = self.conns.get_mut(&key) {
            h.fwd_cnt = c.fwd_cnt;
            c.fwd_told = c.fwd_cnt;
        }
        h
    }
}
