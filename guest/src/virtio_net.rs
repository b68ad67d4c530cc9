//! A virtio-net driver on [`virtio`] with just enough IPv4 for tests and benchmarks: ARP
//! (answers for its address, resolves peers), ICMP echo (answers, and `net ping`), a UDP
//! echo service on port 7, a UDP sink on port 9 that counts (for the receive benchmark)
//! and a UDP blast sender (`net blast`).
//!
//! One receive and one transmit queue of 128 entries, one 2 KiB buffer per descriptor
//! (the device offers no guest offloads, so a frame is at most 1514 bytes plus the
//! 12-byte header). Received frames are handled when the main loop sees the receive
//! queue's used ring move (its interrupt woke the CPU); the guest's address comes from
//! `ray.ip=A.B.C.D/N` on the command line or `net ip`.

use crate::clock;
use crate::virtio::{self, Buffer, Probed, Queue, RingPage, Shared, Transport};

const DEVICE_TYPE: u16 = 1;
const F_MAC: u64 = 1 << 5;
const QUEUE_SIZE: u16 = 128;
const BUF: usize = 2048;
const HDR: usize = 12;
const TIMEOUT_NS: u64 = 1_000_000_000;
pub const CMDLINE_IP: &str = "ray.ip=";
/// The UDP port whose datagrams are echoed back, and the one that counts and drops.
const ECHO_PORT: u16 = 7;
const SINK_PORT: u16 = 9;
/// A UDP payload can be at most this large in one 1514-byte frame.
pub const MAX_PAYLOAD: usize = 1472;

#[repr(C, align(4096))]
struct Buffers([[u8; BUF]; QUEUE_SIZE as usize]);

static RX_RING: Shared<RingPage> = Shared::new(RingPage::new());
static TX_RING: Shared<RingPage> = Shared::new(RingPage::new());
static RX_BUFS: Shared<Buffers> = Shared::new(Buffers([[0; BUF]; 128]));
static TX_BUFS: Shared<Buffers> = Shared::new(Buffers([[0; BUF]; 128]));
static STATE: Shared<Probed<Nic>> = Shared::new(Probed::Unprobed);

#[derive(Default, Clone, Copy)]
pub struct Counters {
    pub rx: u64,
    pub tx: u64,
    pub sink: u64,
    pub sink_bytes: u64,
    pub echoed: u64,
    pub dropped: u64,
}

struct Nic {
    rx: Queue,
    tx: Queue,
    mac: [u8; 6],
    ip: [u8; 4],
    prefix: u8,
    arp: [([u8; 4], [u8; 6]); 8],
    arp_next: usize,
    /// The echo reply `net ping` waits for: (id, seq) and when it came.
    ping_wait: (u16, u16),
    ping_got: Option<u64>,
    counters: Counters,
}

fn rx_buf(i: u16) -> usize {
    // SAFETY: only the address is taken.
    unsafe { (*RX_BUFS.0.get()).0.as_ptr().add(usize::from(i)) as usize }
}

fn tx_buf(i: u16) -> usize {
    // SAFETY: only the address is taken.
    unsafe { (*TX_BUFS.0.get()).0.as_ptr().add(usize::from(i)) as usize }
}

fn probe() -> Result<Option<Nic>, &'static str> {
    let Some(t) = Transport::probe(DEVICE_TYPE, F_MAC)? else {
        return Ok(None);
    };
    if t.features & F_MAC == 0 {
        return Err("the device has no MAC address");
    }
    let mut mac = [0u8; 6];
    for (i, m) in mac.iter_mut().enumerate() {
        *m = t.config(i);
    }
    let rx = t.setup_queue(0, RX_RING.0.get(), QUEUE_SIZE)?;
    let tx = t.setup_queue(1, TX_RING.0.get(), QUEUE_SIZE)?;
    let mut nic = Nic {
        rx,
        tx,
        mac,
        ip: [0; 4],
        prefix: 0,
        arp: [([0; 4], [0; 6]); 8],
        arp_next: 0,
        ping_wait: (0, 0),
        ping_got: None,
        counters: Counters::default(),
    };
    while let Some(head) = nic.rx.next_head() {
        nic.rx.add(&[Buffer {
            addr: rx_buf(head) as u64,
            len: BUF as u32,
            writable: true,
        }]);
    }
    t.start()?;
    nic.rx.publish();
    Ok(Some(nic))
}

fn nic() -> Result<&'static mut Nic, &'static str> {
    // SAFETY: only the boot CPU's shell and main loop call this (see `Shared`), never
    // re-entrantly.
    unsafe { &mut *STATE.0.get() }.get("no virtio-net device", probe)
}

/// Sets the device up at boot if there is one, with the command line's address.
pub fn init(ip: Option<&str>) {
    if let Ok(n) = nic() {
        if let Some(Ok((ip, prefix))) = ip.map(parse_cidr) {
            n.ip = ip;
            n.prefix = prefix;
        }
    }
}

/// Handles received frames, if any; called from the main loop. No exits unless a frame
/// needs an answer (a kick, if the device asked for one).
pub fn poll() {
    // SAFETY: as in `nic`.
    if let Some(n) = unsafe { &mut *STATE.0.get() }.ready() {
        n.receive();
    }
}

pub fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut ip {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

pub fn parse_cidr(s: &str) -> Result<([u8; 4], u8), &'static str> {
    let (ip, prefix) = s.split_once('/').unwrap_or((s, "24"));
    let ip = parse_ip(ip).ok_or("not an IPv4 address")?;
    match prefix.parse::<u8>() {
        Ok(p) if (1..=32).contains(&p) => Ok((ip, p)),
        _ => Err("the prefix length must be 1 to 32"),
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

const ETH: usize = 14;
const IP: usize = 20;
const UDP: usize = 8;

/// Who this NIC is: what every frame it builds starts from.
#[derive(Clone, Copy)]
struct Me {
    mac: [u8; 6],
    ip: [u8; 4],
}

impl Me {
    fn eth(self, f: &mut [u8], dst: [u8; 6], ethertype: u16) {
        f[0..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&self.mac);
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    }

    fn arp_frame(self, f: &mut [u8], op: u16, dst_mac: [u8; 6], dst_ip: [u8; 4]) -> usize {
        let eth_dst = if op == 1 { [0xff; 6] } else { dst_mac };
        self.eth(f, eth_dst, 0x0806);
        let a = &mut f[ETH..];
        a[0..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, op as u8]);
        a[8..14].copy_from_slice(&self.mac);
        a[14..18].copy_from_slice(&self.ip);
        a[18..24].copy_from_slice(&dst_mac);
        a[24..28].copy_from_slice(&dst_ip);
        f[ETH + 28..60].fill(0);
        60
    }

    /// An IPv4 header for `payload` bytes of protocol `proto` to `dst`.
    fn ip_header(self, f: &mut [u8], proto: u8, dst: [u8; 4], payload: usize) {
        let h = &mut f[ETH..ETH + IP];
        let total = (IP + payload) as u16;
        h[0] = 0x45;
        h[1] = 0;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..8].copy_from_slice(&[0, 0, 0x40, 0]);
        h[8] = 64;
        h[9] = proto;
        h[10..12].fill(0);
        h[12..16].copy_from_slice(&self.ip);
        h[16..20].copy_from_slice(&dst);
        let c = checksum(h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
    }

    /// Builds a UDP datagram (checksum 0: none, allowed over IPv4); returns the frame length.
    #[allow(clippy::too_many_arguments)]
    fn udp_frame(
        self,
        f: &mut [u8],
        mac: [u8; 6],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        payload: &[u8],
        len: usize,
    ) -> usize {
        self.eth(f, mac, 0x0800);
        self.ip_header(f, 17, dst, UDP + len);
        let u = &mut f[ETH + IP..];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&((UDP + len) as u16).to_be_bytes());
        u[6..8].fill(0);
        let n = payload.len().min(len);
        u[UDP..UDP + n].copy_from_slice(&payload[..n]);
        (ETH + IP + UDP + len).max(60)
    }
}

impl Nic {
    fn me(&self) -> Me {
        Me {
            mac: self.mac,
            ip: self.ip,
        }
    }

    fn arp_lookup(&self, ip: [u8; 4]) -> Option<[u8; 6]> {
        self.arp
            .iter()
            .find(|e| e.0 == ip && e.1 != [0; 6])
            .map(|e| e.1)
    }

    fn arp_learn(&mut self, ip: [u8; 4], mac: [u8; 6]) {
        if let Some(e) = self.arp.iter_mut().find(|e| e.0 == ip) {
            e.1 = mac;
            return;
        }
        self.arp[self.arp_next] = (ip, mac);
        self.arp_next = (self.arp_next + 1) % self.arp.len();
    }

    /// Takes back finished transmit buffers.
    fn reclaim(&mut self) {
        while self.tx.pop_used().is_some() {}
    }

    /// Builds a frame with `fill(buffer)` (returning its length) and queues it; the
    /// caller publishes. False if the transmit queue stays full.
    fn queue_frame(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) -> bool {
        self.reclaim();
        let head = match self.tx.next_head() {
            Some(h) => h,
            None => {
                self.tx.publish();
                if self.tx.wait_used(TIMEOUT_NS).is_err() {
                    return false;
                }
                self.reclaim();
                match self.tx.next_head() {
                    Some(h) => h,
                    None => return false,
                }
            }
        };
        let addr = tx_buf(head);
        // SAFETY: the buffer of a free descriptor: the device does not use it now.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, BUF) };
        buf[..HDR].fill(0);
        let len = fill(&mut buf[HDR..]);
        self.tx.add(&[Buffer {
            addr: addr as u64,
            len: (HDR + len) as u32,
            writable: false,
        }]);
        self.counters.tx += 1;
        true
    }

    fn send(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) -> bool {
        let ok = self.queue_frame(fill);
        self.tx.publish();
        ok
    }

    fn receive(&mut self) {
        let mut any = false;
        while let Some((head, len)) = self.rx.pop_used() {
            any = true;
            let addr = rx_buf(head);
            let len = (len as usize).min(BUF);
            if len > HDR {
                let mut frame = [0u8; BUF];
                for (i, b) in frame[..len - HDR].iter_mut().enumerate() {
                    *b = virtio::rd(addr + HDR + i);
                }
                self.counters.rx += 1;
                self.handle(&frame[..len - HDR]);
            }
            self.rx.add(&[Buffer {
                addr: addr as u64,
                len: BUF as u32,
                writable: true,
            }]);
        }
        if any {
            self.rx.publish();
            self.tx.publish();
        }
    }

    fn handle(&mut self, f: &[u8]) {
        if f.len() < ETH + 28 {
            return;
        }
        let ethertype = u16::from_be_bytes([f[12], f[13]]);
        let src_mac: [u8; 6] = f[6..12].try_into().unwrap_or([0; 6]);
        match ethertype {
            0x0806 => self.handle_arp(&f[ETH..]),
            0x0800 => self.handle_ip(src_mac, &f[ETH..]),
            _ => self.counters.dropped += 1,
        }
    }

    fn handle_arp(&mut self, a: &[u8]) {
        let op = u16::from_be_bytes([a[6], a[7]]);
        let mut sha = [0u8; 6];
        sha.copy_from_slice(&a[8..14]);
        let mut spa = [0u8; 4];
        spa.copy_from_slice(&a[14..18]);
        if self.ip == [0; 4] || a[24..28] != self.ip {
            return;
        }
        self.arp_learn(spa, sha);
        if op == 1 {
            let me = self.me();
            self.queue_frame(|f| me.arp_frame(f, 2, sha, spa));
        }
    }

    fn handle_ip(&mut self, src_mac: [u8; 6], p: &[u8]) {
        let ihl = usize::from(p[0] & 0xf) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        if p[0] >> 4 != 4 || ihl < IP || total > p.len() || total < ihl || p[16..20] != self.ip {
            self.counters.dropped += 1;
            return;
        }
        let mut src = [0u8; 4];
        src.copy_from_slice(&p[12..16]);
        let body = &p[ihl..total];
        let me = self.me();
        match p[9] {
            1 if body.len() >= 8 => match body[0] {
                8 => {
                    self.queue_frame(|f| {
                        me.eth(f, src_mac, 0x0800);
                        me.ip_header(f, 1, src, body.len());
                        let i = &mut f[ETH + IP..ETH + IP + body.len()];
                        i.copy_from_slice(body);
                        i[0] = 0;
                        i[2..4].fill(0);
                        let c = checksum(i);
                        i[2..4].copy_from_slice(&c.to_be_bytes());
                        (ETH + IP + body.len()).max(60)
                    });
                }
                0 => {
                    let id = u16::from_be_bytes([body[4], body[5]]);
                    let seq = u16::from_be_bytes([body[6], body[7]]);
                    if (id, seq) == self.ping_wait {
                        self.ping_got = Some(clock::now());
                    }
                }
                _ => self.counters.dropped += 1,
            },
            17 if body.len() >= UDP => {
                let sport = u16::from_be_bytes([body[0], body[1]]);
                let dport = u16::from_be_bytes([body[2], body[3]]);
                let len = usize::from(u16::from_be_bytes([body[4], body[5]]));
                if len < UDP || len > body.len() {
                    self.counters.dropped += 1;
                    return;
                }
                let data = &body[UDP..len];
                match dport {
                    ECHO_PORT => {
                        self.counters.echoed += 1;
                        self.queue_frame(|f| {
                            me.udp_frame(f, src_mac, src, ECHO_PORT, sport, data, data.len())
                        });
                    }
                    SINK_PORT => {
                        self.counters.sink += 1;
                        self.counters.sink_bytes += data.len() as u64;
                    }
                    _ => self.counters.dropped += 1,
                }
            }
            _ => self.counters.dropped += 1,
        }
    }

    /// The MAC of `ip` (on our subnet), asking by ARP if it is not known.
    fn resolve(&mut self, ip: [u8; 4]) -> Result<[u8; 6], &'static str> {
        if self.ip == [0; 4] {
            return Err("no address (net ip A.B.C.D/N or ray.ip= on the command line)");
        }
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        if u32::from_be_bytes(ip) & mask != u32::from_be_bytes(self.ip) & mask {
            return Err("the address is not on this NIC's subnet (there are no routes)");
        }
        for _ in 0..3 {
            if let Some(mac) = self.arp_lookup(ip) {
                return Ok(mac);
            }
            let me = self.me();
            self.send(|f| me.arp_frame(f, 1, [0; 6], ip));
            let t0 = clock::now();
            while clock::now().saturating_sub(t0) < TIMEOUT_NS / 3 {
                self.receive();
                if self.arp_lookup(ip).is_some() {
                    break;
                }
                let _ = self.rx.wait_used(TIMEOUT_NS / 3);
            }
        }
        self.arp_lookup(ip).ok_or("no ARP reply")
    }

    /// One echo request and its reply's round trip in ns.
    fn ping_once(&mut self, mac: [u8; 6], ip: [u8; 4], seq: u16) -> Option<u64> {
        let id = 0x7261;
        self.ping_wait = (id, seq);
        self.ping_got = None;
        let me = self.me();
        let t0 = clock::now();
        self.send(|f| {
            me.eth(f, mac, 0x0800);
            me.ip_header(f, 1, ip, 64);
            let i = &mut f[ETH + IP..ETH + IP + 64];
            i.fill(0);
            i[0] = 8;
            i[4..6].copy_from_slice(&id.to_be_bytes());
            i[6..8].copy_from_slice(&seq.to_be_bytes());
            let c = checksum(i);
            i[2..4].copy_from_slice(&c.to_be_bytes());
            ETH + IP + 64
        });
        while clock::now().saturating_sub(t0) < TIMEOUT_NS {
            self.receive();
            if let Some(t) = self.ping_got {
                return Some(t.saturating_sub(t0));
            }
            let _ = self.rx.wait_used(TIMEOUT_NS);
        }
        None
    }
}

/// (mac, ip, prefix, counters) of the NIC.
pub type Info = ([u8; 6], [u8; 4], u8, Counters);

pub fn info() -> Result<Info, &'static str> {
    let n = nic()?;
    n.receive();
    Ok((n.mac, n.ip, n.prefix, n.counters))
}

pub fn set_ip(ip: [u8; 4], prefix: u8) -> Result<(), &'static str> {
    let n = nic()?;
    n.ip = ip;
    n.prefix = prefix;
    n.arp = [([0; 4], [0; 6]); 8];
    Ok(())
}

/// `count` pings of `ip`: (replies, min, sum, max round trip in ns).
pub fn ping(ip: [u8; 4], count: u16) -> Result<(u16, u64, u64, u64), &'static str> {
    let n = nic()?;
    let mac = n.resolve(ip)?;
    let (mut got, mut min, mut sum, mut max) = (0, u64::MAX, 0, 0);
    for seq in 0..count {
        if let Some(rtt) = n.ping_once(mac, ip, seq) {
            got += 1;
            min = min.min(rtt);
            max = max.max(rtt);
            sum += rtt;
        }
    }
    Ok((got, min, sum, max))
}

/// Sends `count` UDP datagrams of `size` payload bytes to `ip:port` as fast as the queue
/// takes them: (sent, ns taken).
pub fn blast(ip: [u8; 4], port: u16, count: u64, size: usize) -> Result<(u64, u64), &'static str> {
    let n = nic()?;
    let mac = n.resolve(ip)?;
    let me = n.me();
    let t0 = clock::now();
    let mut sent = 0;
    while sent < count {
        let seq = sent.to_be_bytes();
        if !n.queue_frame(|f| me.udp_frame(f, mac, ip, 9000, port, &seq, size)) {
            return Err("the transmit queue stayed full");
        }
        sent += 1;
        if sent % 32 == 0 {
            n.tx.publish();
        }
    }
    n.tx.publish();
    // Wait until the device took them all, so the time covers the sending.
    let _ = virtio::wait_until(TIMEOUT_NS, || {
        n.reclaim();
        n.tx.free() == QUEUE_SIZE
    });
    Ok((sent, clock::now().saturating_sub(t0)))
}
