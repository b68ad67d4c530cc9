//! A virtio-vsock driver on [`virtio`]: stream connections with credit flow control,
//! enough for two services.
//!
//! * Port 52 serves the shell: each connection carries one command line; the guest
//!   answers with the command's output, then a last line `ray-exit <status>` (0, or 1
//!   if the command printed an `err ...` line), then closes. The host's `ray vm exec`
//!   strips that line and exits with the status.
//! * `vsock connect PORT TEXT` connects to host port PORT, sends TEXT and a newline,
//!   and prints what comes back until the host closes.
//!
//! Queues: receive (64 buffers of 4 KiB), transmit (64 of 4 KiB), event (4). Packets are
//! handled when the main loop sees the receive queue move (its interrupt woke the CPU).
//! A TRANSPORT_RESET event (the VM was restored or migrated) drops every connection and
//! re-reads the context id.
use core::cell::UnsafeCell;

use crate::clock;
use crate::virtio::{self, Buffer, Queue, RingPage, Transport};

const DEVICE_TYPE: u16 = 19;
const QUEUE_SIZE: u16 = 64;
const EVENTS: u16 = 4;
const BUF: usize = 4096;
const HDR: usize = 44;
const HOST_CID: u64 = 2;
const EXEC_PORT: u32 = 52;
/// The receive space each connection offers the host.
const BUF_ALLOC: u32 = 64 << 10;
const CONNS: usize = 4;
const LINE: usize = 256;
/// The most output one command can give (more is cut, with a note).
const CAPTURE: usize = 512 << 10;
const TIMEOUT_NS: u64 = 5_000_000_000;

mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

struct Shared<T>(UnsafeCell<T>);
// SAFETY: used only by the boot CPU (the shell and its main loop); the device writes the
// buffers and rings through DMA, which every access tolerates (volatile accesses).
unsafe impl<T> Sync for Shared<T> {}

#[repr(C, align(4096))]
struct Buffers([[u8; BUF]; QUEUE_SIZE as usize]);

#[repr(C, align(4096))]
struct Capture([u8; CAPTURE]);

static RX_RING: Shared<RingPage> = Shared(UnsafeCell::new(RingPage::new()));
static TX_RING: Shared<RingPage> = Shared(UnsafeCell::new(RingPage::new()));
static EV_RING: Shared<RingPage> = Shared(UnsafeCell::new(RingPage::new()));
static EV_BUFS: Shared<RingPage> = Shared(UnsafeCell::new(RingPage::new()));
static RX_BUFS: Shared<Buffers> = Shared(UnsafeCell::new(Buffers([[0; BUF]; 64])));
static TX_BUFS: Shared<Buffers> = Shared(UnsafeCell::new(Buffers([[0; BUF]; 64])));
static OUTPUT: Shared<Capture> = Shared(UnsafeCell::new(Capture([0; CAPTURE])));
static STATE: Shared<State> = Shared(UnsafeCell::new(State::Unprobed));
/// While a command that came over vsock runs, the device is borrowed by [`poll`]: the
/// command's own `vsock` calls see this copy of the state instead, and cannot connect.
static BUSY: Shared<Option<(u64, usize, Counters)>> = Shared(UnsafeCell::new(None));

#[allow(clippy::large_enum_variant)] // one static instance, never moved
enum State {
    Unprobed,
    Absent,
    Failed(&'static str),
    Ready(Dev),
}

#[derive(Default, Clone, Copy)]
pub struct Counters {
    pub rx: u64,
    pub tx: u64,
    pub execs: u64,
    pub resets: u64,
    pub transport_resets: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A host connection to the shell port.
    Exec,
    /// Ours, to a host port (`vsock connect`).
    Client,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Our REQUEST went out (clients).
    Connecting,
    Open,
    /// The peer reset it, or we shut it down: the slot is freed by its owner.
    Closed,
}

#[derive(Clone, Copy)]
struct Conn {
    kind: Kind,
    phase: Phase,
    local: u32,
    peer: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    fwd_told: u32,
    peer_shut: bool,
    line: [u8; LINE],
    len: usize,
}

impl Conn {
    fn new(kind: Kind, phase: Phase, local: u32, peer: u32) -> Self {
        Conn {
            kind,
            phase,
            local,
            peer,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_told: 0,
            peer_shut: false,
            line: [0; LINE],
            len: 0,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

struct Dev {
    t: Transport,
    rx: Queue,
    tx: Queue,
    ev: Queue,
    cid: u64,
    conns: [Option<Conn>; CONNS],
    next_port: u32,
    counters: Counters,
}

fn buf(bufs: &Shared<Buffers>, i: u16) -> usize {
    // SAFETY: only the address is taken.
    unsafe { (*bufs.0.get()).0.as_ptr().add(usize::from(i)) as usize }
}

fn ev_buf(i: u16) -> usize {
    // SAFETY: only the address is taken.
    unsafe { (*EV_BUFS.0.get()).0.as_ptr().add(16 * usize::from(i)) as usize }
}

fn probe() -> Result<Option<Dev>, &'static str> {
    let Some(t) = Transport::probe(DEVICE_TYPE, 0)? else {
        return Ok(None);
    };
    let rx = t.setup_queue(0, RX_RING.0.get(), QUEUE_SIZE)?;
    let tx = t.setup_queue(1, TX_RING.0.get(), QUEUE_SIZE)?;
    let ev = t.setup_queue(2, EV_RING.0.get(), EVENTS)?;
    let cid = t.config::<u64>(0);
    let mut d = Dev {
        t,
        rx,
        tx,
        ev,
        cid,
        conns: [None; CONNS],
        next_port: 49152,
        counters: Counters::default(),
    };
    while let Some(head) = d.rx.next_head() {
        d.rx.add(&[Buffer {
            addr: buf(&RX_BUFS, head) as u64,
            len: BUF as u32,
            writable: true,
        }]);
    }
    while let Some(head) = d.ev.next_head() {
        d.ev.add(&[Buffer {
            addr: ev_buf(head) as u64,
            len: 4,
            writable: true,
        }]);
    }
    d.t.start()?;
    d.rx.publish();
    d.ev.publish();
    Ok(Some(d))
}

fn dev() -> Result<&'static mut Dev, &'static str> {
    // SAFETY: only the boot CPU's shell and main loop call this (see `Shared`), never
    // re-entrantly.
    let state = unsafe { &mut *STATE.0.get() };
    if let State::Unprobed = state {
        *state = match probe() {
            Ok(Some(d)) => State::Ready(d),
            Ok(None) => State::Absent,
            Err(e) => State::Failed(e),
        };
    }
    match state {
        State::Ready(d) => Ok(d),
        State::Absent => Err("no virtio-vsock device"),
        State::Failed(e) => Err(e),
        State::Unprobed => Err("not probed"),
    }
}

/// Sets the device up at boot if there is one, so that port 52 listens.
pub fn init() {
    let _ = dev();
}

/// Handles received packets and runs the commands that arrived on port 52; called from
/// the main loop with the shell's command runner.
pub fn poll(run: &mut dyn FnMut(&str)) {
    // SAFETY: as in `dev`.
    let State::Ready(d) = (unsafe { &mut *STATE.0.get() }) else {
        return;
    };
    d.receive();
    for i in 0..CONNS {
        let Some(c) = d.conns[i] else { continue };
        if c.kind != Kind::Exec {
            continue;
        }
        match c.phase {
            Phase::Closed => d.conns[i] = None,
            Phase::Open => {
                if let Some(n) = c.line[..c.len].iter().position(|&b| b == b'\n') {
                    d.exec(i, &c.line[..n], run);
                } else if c.peer_shut || c.len == LINE {
                    d.close(i);
                }
            }
            Phase::Connecting => {}
        }
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from(u32_at(b, i)) | u64::from(u32_at(b, i + 4)) << 32
}

impl Dev {
    fn find(&self, local: u32, peer: u32) -> Option<usize> {
        self.conns.iter().position(|c| {
            c.is_some_and(|c| c.local == local && c.peer == peer && c.phase != Phase::Closed)
        })
    }

    /// Sends one packet (header fields, payload), waiting for a free transmit buffer.
    fn send(
        &mut self,
        local: u32,
        peer: u32,
        op: u16,
        flags: u32,
        payload: &[u8],
        credit: (u32, u32),
    ) -> bool {
        while self.tx.pop_used().is_some() {}
        if self.tx.next_head().is_none() {
            self.tx.publish();
            if self.tx.wait_used(TIMEOUT_NS).is_err() {
                return false;
            }
            while self.tx.pop_used().is_some() {}
        }
        let Some(head) = self.tx.next_head() else {
            return false;
        };
        let addr = buf(&TX_BUFS, head);
        // SAFETY: the buffer of a free descriptor: the device does not use it now.
        let b = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, BUF) };
        let n = payload.len().min(BUF - HDR);
        b[0..8].copy_from_slice(&self.cid.to_le_bytes());
        b[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
        b[16..20].copy_from_slice(&local.to_le_bytes());
        b[20..24].copy_from_slice(&peer.to_le_bytes());
        b[24..28].copy_from_slice(&(n as u32).to_le_bytes());
        b[28..30].copy_from_slice(&1u16.to_le_bytes());
        b[30..32].copy_from_slice(&op.to_le_bytes());
        b[32..36].copy_from_slice(&flags.to_le_bytes());
        b[36..40].copy_from_slice(&credit.0.to_le_bytes());
        b[40..44].copy_from_slice(&credit.1.to_le_bytes());
        b[HDR..HDR + n].copy_from_slice(&payload[..n]);
        self.tx.add(&[Buffer {
            addr: addr as u64,
            len: (HDR + n) as u32,
            writable: false,
        }]);
        self.tx.publish();
        self.counters.tx += 1;
        true
    }

    /// Sends a packet of connection `i`, carrying its credit.
    fn send_on(&mut self, i: usize, op: u16, flags: u32, payload: &[u8]) -> bool {
        let Some(c) = self.conns[i].as_mut() else {
            return false;
        };
        c.fwd_told = c.fwd_cnt;
        let (local, peer, fwd) = (c.local, c.peer, c.fwd_cnt);
        self.send(local, peer, op, flags, payload, (BUF_ALLOC, fwd))
    }

    fn rst(&mut self, local: u32, peer: u32) {
        self.counters.resets += 1;
        self.send(local, peer, op::RST, 0, &[], (0, 0));
    }

    /// Takes every received packet and event, and gives the buffers back.
    fn receive(&mut self) {
        let mut any = false;
        while let Some((head, len)) = self.rx.pop_used() {
            any = true;
            let addr = buf(&RX_BUFS, head);
            let len = (len as usize).min(BUF);
            let mut p = [0u8; BUF];
            for (i, b) in p[..len].iter_mut().enumerate() {
                *b = virtio::rd(addr + i);
            }
            self.counters.rx += 1;
            if len >= HDR {
                self.handle(&p[..len]);
            }
            self.rx.add(&[Buffer {
                addr: addr as u64,
                len: BUF as u32,
                writable: true,
            }]);
        }
        if any {
            self.rx.publish();
        }
        let mut events = false;
        while let Some((head, len)) = self.ev.pop_used() {
            events = true;
            if len >= 4 && virtio::rd::<u32>(ev_buf(head)) == 0 {
                // TRANSPORT_RESET: the host side of every connection is gone, and the
                // context id may have changed.
                self.counters.transport_resets += 1;
                for c in self.conns.iter_mut().flatten() {
                    c.phase = Phase::Closed;
                }
                self.cid = self.t.config::<u64>(0);
            }
            self.ev.add(&[Buffer {
                addr: ev_buf(head) as u64,
                len: 4,
                writable: true,
            }]);
        }
        if events {
            self.ev.publish();
        }
    }

    fn handle(&mut self, p: &[u8]) {
        let (src_cid, dst_cid) = (u64_at(p, 0), u64_at(p, 8));
        let (src, dst) = (u32_at(p, 16), u32_at(p, 20));
        let len = (u32_at(p, 24) as usize).min(p.len() - HDR);
        let (kind, op) = (u16_at(p, 28), u16_at(p, 30));
        if src_cid != HOST_CID || dst_cid != self.cid || kind != 1 {
            return;
        }
        let Some(i) = self.find(dst, src) else {
            match op {
                op::REQUEST if dst == EXEC_PORT => self.accept(dst, src, p),
                op::RST => {}
                _ => self.rst(dst, src),
            }
            return;
        };
        let Some(c) = self.conns[i].as_mut() else {
            return;
        };
        c.peer_buf_alloc = u32_at(p, 36);
        c.peer_fwd_cnt = u32_at(p, 40);
        match op {
            op::RESPONSE if c.phase == Phase::Connecting => c.phase = Phase::Open,
            op::RST => c.phase = Phase::Closed,
            op::SHUTDOWN => c.peer_shut = true,
            op::RW if c.phase == Phase::Open => {
                let take = len.min(LINE - c.len);
                c.line[c.len..c.len + take].copy_from_slice(&p[HDR..HDR + take]);
                c.len += take;
                c.fwd_cnt = c.fwd_cnt.wrapping_add(len as u32);
                if c.fwd_cnt.wrapping_sub(c.fwd_told) >= BUF_ALLOC / 2 {
                    self.send_on(i, op::CREDIT_UPDATE, 0, &[]);
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                self.send_on(i, op::CREDIT_UPDATE, 0, &[]);
            }
            _ => {
                c.phase = Phase::Closed;
                self.rst(dst, src);
            }
        }
    }

    fn accept(&mut self, local: u32, peer: u32, p: &[u8]) {
        let Some(slot) = self.conns.iter().position(|c| c.is_none()) else {
            self.rst(local, peer);
            return;
        };
        let mut c = Conn::new(Kind::Exec, Phase::Open, local, peer);
        c.peer_buf_alloc = u32_at(p, 36);
        c.peer_fwd_cnt = u32_at(p, 40);
        self.conns[slot] = Some(c);
        self.send_on(slot, op::RESPONSE, 0, &[]);
    }

    /// Shuts connection `i` down both ways; the host answers with a RST.
    fn close(&mut self, i: usize) {
        self.send_on(i, op::SHUTDOWN, 3, &[]);
        self.conns[i] = None;
    }

    /// Sends `data` on connection `i` within the host's credit, waiting for credit
    /// updates (asking after a while); false if the connection ends or stalls.
    fn write_all(&mut self, i: usize, data: &[u8]) -> bool {
        let mut off = 0;
        let mut asked = false;
        let mut t0 = clock::now();
        while off < data.len() {
            let Some(c) = self.conns[i] else { return false };
            if c.phase != Phase::Open {
                return false;
            }
            let n = (c.credit() as usize).min(BUF - HDR).min(data.len() - off);
            if n == 0 {
                if clock::now().saturating_sub(t0) > TIMEOUT_NS {
                    return false;
                }
                if !asked && clock::now().saturating_sub(t0) > TIMEOUT_NS / 50 {
                    asked = true;
                    self.send_on(i, op::CREDIT_REQUEST, 0, &[]);
                }
                let _ = self.rx.wait_used(TIMEOUT_NS / 10);
                self.receive();
                continue;
            }
            if !self.send_on(i, op::RW, 0, &data[off..off + n]) {
                return false;
            }
            if let Some(c) = self.conns[i].as_mut() {
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
            }
            off += n;
            asked = false;
            t0 = clock::now();
        }
        true
    }

    /// Runs one command line of connection `i` with its output captured, sends the
    /// output and the status line, and closes.
    fn exec(&mut self, i: usize, line: &[u8], run: &mut dyn FnMut(&str)) {
        self.counters.execs += 1;
        let mut text = [0u8; LINE];
        let n = line.len().min(LINE);
        text[..n].copy_from_slice(&line[..n]);
        let cmd = core::str::from_utf8(&text[..n]).unwrap_or("").trim();
        // SAFETY: the capture buffer is the boot CPU's alone; `serial` writes it only
        // between `capture_start` and `capture_end`.
        let out = unsafe { &mut (*OUTPUT.0.get()).0 };
        crate::serial::capture_start(out.as_mut_ptr(), CAPTURE - 64);
        let open = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.phase != Phase::Closed)
            .count();
        // SAFETY: the boot CPU's alone, see `BUSY`.
        unsafe { *BUSY.0.get() = Some((self.cid, open, self.counters)) };
        if cmd.is_empty() {
            println!("err empty command");
        } else {
            run(cmd);
        }
        // SAFETY: as above.
        unsafe { *BUSY.0.get() = None };
        let (mut len, lost) = crate::serial::capture_end();
        let failed = out[..len]
            .split(|&b| b == b'\n')
            .any(|l| l.starts_with(b"err "));
        let mut w = crate::serial::Cursor::new(&mut out[len..]);
        if lost > 0 {
            let _ = core::fmt::Write::write_fmt(
                &mut w,
                format_args!("(output cut: {lost} bytes more)\n"),
            );
        }
        let _ =
            core::fmt::Write::write_fmt(&mut w, format_args!("ray-exit {}\n", u8::from(failed)));
        len += w.len();
        if self.write_all(i, &out[..len]) {
            self.close(i);
        } else if let Some(c) = self.conns[i].take() {
            self.rst(c.local, c.peer);
        }
    }

    /// `vsock connect`: a connection to host port `port`, `text` and a newline sent,
    /// the answer (up to 255 bytes) read until the host closes.
    fn connect(&mut self, port: u32, text: &str) -> Result<([u8; LINE], usize), &'static str> {
        let Some(slot) = self.conns.iter().position(|c| c.is_none()) else {
            return Err("every connection slot is in use");
        };
        let local = self.next_port;
        self.next_port = if local >= 65535 { 49152 } else { local + 1 };
        self.conns[slot] = Some(Conn::new(Kind::Client, Phase::Connecting, local, port));
        self.send_on(slot, op::REQUEST, 0, &[]);
        let result = self.converse(slot, text);
        if let Some(c) = self.conns[slot].take() {
            if c.phase != Phase::Closed {
                self.rst(c.local, c.peer);
            }
        }
        result
    }

    fn converse(&mut self, slot: usize, text: &str) -> Result<([u8; LINE], usize), &'static str> {
        let phase = |d: &Dev| d.conns[slot].map_or(Phase::Closed, |c| c.phase);
        let t0 = clock::now();
        while phase(self) == Phase::Connecting {
            if clock::now().saturating_sub(t0) > TIMEOUT_NS {
                return Err("the host did not answer");
            }
            let _ = self.rx.wait_used(TIMEOUT_NS / 10);
            self.receive();
        }
        if phase(self) != Phase::Open {
            return Err("refused (nothing listens on that host port)");
        }
        if !self.write_all(slot, text.as_bytes()) || !self.write_all(slot, b"\n") {
            return Err("the connection ended while sending");
        }
        let t0 = clock::now();
        loop {
            let Some(c) = self.conns[slot] else {
                return Err("the connection is gone");
            };
            if c.peer_shut || c.phase == Phase::Closed || c.len == LINE {
                return Ok((c.line, c.len));
            }
            if clock::now().saturating_sub(t0) > TIMEOUT_NS {
                return Err("the host did not close the connection");
            }
            let _ = self.rx.wait_used(TIMEOUT_NS / 10);
            self.receive();
        }
    }
}

/// (cid, open connections, counters)
pub fn info() -> Result<(u64, usize, Counters), &'static str> {
    // SAFETY: the boot CPU's alone, see `BUSY`.
    if let Some(snapshot) = unsafe { *BUSY.0.get() } {
        return Ok(snapshot);
    }
    let d = dev()?;
    d.receive();
    let open = d
        .conns
        .iter()
        .flatten()
        .filter(|c| c.phase != Phase::Closed)
        .count();
    Ok((d.cid, open, d.counters))
}

/// `vsock connect PORT TEXT`: the reply.
pub fn connect(port: u32, text: &str) -> Result<([u8; LINE], usize), &'static str> {
    // SAFETY: the boot CPU's alone, see `BUSY`.
    if unsafe { (*BUSY.0.get()).is_some() } {
        return Err("not from a command that came over vsock");
    }
    dev()?.connect(port, text)
}
