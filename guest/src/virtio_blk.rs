//! A virtio-blk driver on [`virtio`]: queue 0 of 128 entries, up to [`MAX_QD`] requests
//! in flight (header, data, status: three descriptors each), completions taken in
//! batches after the queue's interrupt. Shell commands: `disk`, `disk read|write|sum|
//! flush|discard`, `disk bench`.
//!
//! Set up on first use: without a disk the guest runs as before and `disk` says so.

use crate::clock;
use crate::virtio::{self, Buffer, Probed, Queue, RingPage, Shared, Transport, Watchdog};

const DEVICE_TYPE: u16 = 2;
const QUEUE_SIZE: u16 = 128;
pub const SECTOR: u64 = 512;
/// Requests in flight at most (3 descriptors each).
pub const MAX_QD: usize = 32;
/// The data buffer: 4 MiB, as [`MAX_QD`] slots of [`SLOT`] bytes for small requests or
/// 4 slots of 1 MiB for large ones.
const BUFFER: usize = 4 << 20;
pub const MAX_REQUEST: usize = 1 << 20;
const TIMEOUT_NS: u64 = 10_000_000_000;
/// How long the driver polls the used ring before it sleeps for an interrupt: about a
/// host O_DIRECT 4 KiB read and the path's hand-offs. A completion found polling costs no
/// interrupt, no `hlt` and no APIC accesses (each an exit on PVM); a longer wait (a 1 MiB
/// transfer) sleeps after it.
const POLL_NS: u64 = 200_000;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;

#[repr(C, align(4096))]
struct Data([u8; BUFFER]);
/// Per slot: a 16-byte header, then (at 16) the status byte; 32 bytes a slot.
#[repr(C, align(4096))]
struct Headers([u8; 32 * MAX_QD]);

static RINGS: Shared<RingPage> = Shared::new(RingPage::new());
static DATA: Shared<Data> = Shared::new(Data([0; BUFFER]));
static HEADERS: Shared<Headers> = Shared::new(Headers([0; 32 * MAX_QD]));
static STATE: Shared<Probed<Disk>> = Shared::new(Probed::Unprobed);

pub struct Disk {
    q: Queue,
    pub capacity: u64,
    pub readonly: bool,
    pub queues: u16,
    pub id: [u8; 20],
    /// The slot of each descriptor head in flight.
    slot_of: [u8; QUEUE_SIZE as usize],
    /// Free slots, as a bit set.
    free: u64,
}

fn data() -> usize {
    DATA.0.get() as usize
}

fn header(slot: usize) -> usize {
    HEADERS.0.get() as usize + 32 * slot
}

/// One request to issue.
#[derive(Clone, Copy)]
pub struct Req {
    pub kind: u32,
    pub sector: u64,
    /// Guest-physical address and length of the data (len 0: none).
    pub addr: u64,
    pub len: u32,
}

fn probe() -> Result<Option<Disk>, &'static str> {
    let Some(t) = Transport::probe(DEVICE_TYPE, F_RO | F_FLUSH | F_MQ | F_DISCARD)? else {
        return Ok(None);
    };
    let q = t.setup_queue(0, RINGS.0.get(), QUEUE_SIZE)?;
    t.start()?;
    let capacity = t.config::<u32>(0) as u64 | (t.config::<u32>(4) as u64) << 32;
    let queues = if t.features & F_MQ != 0 {
        t.config::<u16>(34)
    } else {
        1
    };
    let mut disk = Disk {
        q,
        capacity,
        readonly: t.features & F_RO != 0,
        queues,
        id: [0; 20],
        slot_of: [0; QUEUE_SIZE as usize],
        free: (1u64 << MAX_QD) - 1,
    };
    let buf = data() as u64;
    disk.run(
        &mut core::iter::once(Req {
            kind: T_GET_ID,
            sector: 0,
            addr: buf,
            len: 20,
        }),
        1,
    )?;
    for (i, b) in disk.id.iter_mut().enumerate() {
        *b = virtio::rd(buf as usize + i);
    }
    Ok(Some(disk))
}

impl Disk {
    /// Issues the requests of `reqs`, keeping up to `qd` in flight, and waits for all.
    /// Returns how many completed; the first error status fails the run.
    pub fn run(
        &mut self,
        reqs: &mut dyn Iterator<Item = Req>,
        qd: usize,
    ) -> Result<u64, &'static str> {
        let qd = qd.clamp(1, MAX_QD);
        let mut in_flight = 0;
        let mut done = 0u64;
        let mut failed = None;
        let mut more = true;
        // Armed at the first sleep, stopped when the run ends: one pair of timer accesses
        // (exits on PVM) per run, not per wake-up.
        let mut dog: Option<Watchdog> = None;
        loop {
            while more && in_flight < qd {
                let Some(r) = reqs.next() else {
                    more = false;
                    break;
                };
                let slot = self.free.trailing_zeros() as usize;
                self.free &= !(1 << slot);
                let h = header(slot);
                virtio::wr::<u32>(h, r.kind);
                virtio::wr::<u32>(h + 4, 0);
                virtio::wr::<u64>(h + 8, r.sector);
                virtio::wr::<u8>(h + 16, 0xff);
                let hdr = Buffer {
                    addr: h as u64,
                    len: 16,
                    writable: false,
                };
                let status = Buffer {
                    addr: h as u64 + 16,
                    len: 1,
                    writable: true,
                };
                let data = Buffer {
                    addr: r.addr,
                    len: r.len,
                    writable: r.kind == T_IN || r.kind == T_GET_ID,
                };
                let head = if r.len > 0 {
                    self.q.add(&[hdr, data, status])
                } else {
                    self.q.add(&[hdr, status])
                }
                .ok_or("no free descriptors")?;
                self.slot_of[usize::from(head)] = slot as u8;
                in_flight += 1;
            }
            self.q.publish_polling();
            if in_flight == 0 {
                break;
            }
            // Deeper queues sleep at once: the device's threads need the host CPU the
            // polling would take, and a wake-up finds many completions.
            let poll = if in_flight == 1 { POLL_NS } else { 0 };
            self.q.wait_used_polling(poll, TIMEOUT_NS, &mut dog)?;
            while let Some((head, _)) = self.q.pop_used() {
                let slot = usize::from(self.slot_of[usize::from(head)]);
                let s: u8 = virtio::rd(header(slot) + 16);
                if s != 0 && failed.is_none() {
                    failed = Some(match s {
                        1 => "the device answered IOERR",
                        2 => "the device answered UNSUPP",
                        _ => "the device left the status unset",
                    });
                }
                self.free |= 1 << slot;
                in_flight -= 1;
                done += 1;
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// `count` sectors from `sector` in requests of up to 1 MiB, one at a time, each
    /// handed to `each` (read) or filled by it (write) in the data buffer.
    fn chunks(
        &mut self,
        kind: u32,
        sector: u64,
        count: u64,
        mut each: impl FnMut(usize, usize),
    ) -> Result<(), &'static str> {
        if sector
            .checked_add(count)
            .is_none_or(|end| end > self.capacity)
        {
            return Err("the range reaches beyond the disk's capacity");
        }
        let per = MAX_REQUEST as u64 / SECTOR;
        let mut at = sector;
        while at < sector + count {
            let n = per.min(sector + count - at);
            let len = (n * SECTOR) as usize;
            if kind == T_OUT {
                each(data(), len);
            }
            self.run(
                &mut core::iter::once(Req {
                    kind,
                    sector: at,
                    addr: data() as u64,
                    len: len as u32,
                }),
                1,
            )?;
            if kind == T_IN {
                each(data(), len);
            }
            at += n;
        }
        Ok(())
    }
}

/// FNV-1a 64 over bytes, continued from `h` (start with [`FNV_START`]).
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;
fn fnv(mut h: u64, addr: usize, len: usize) -> u64 {
    for i in 0..len {
        h ^= u64::from(virtio::rd::<u8>(addr + i));
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn disk() -> Result<&'static mut Disk, &'static str> {
    // SAFETY: only the boot CPU's shell calls this (see `Shared`).
    unsafe { &mut *STATE.0.get() }.get("no virtio-blk device", probe)
}

fn number(word: Option<&str>) -> Option<u64> {
    let w = word?;
    match w.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => w.parse().ok(),
    }
}

/// A small xorshift for random sectors.
struct Rand(u64);
impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The `disk ...` shell commands.
pub fn command(mut args: core::str::SplitAsciiWhitespace) {
    let sub = args.next();
    if sub == Some("bench") {
        let mode = args.next().unwrap_or_default();
        match (
            number(args.next()),
            number(args.next()),
            number(args.next()),
            args.next(),
        ) {
            (Some(n), Some(kib), Some(qd), None) => bench(mode, n, kib, qd),
            _ => {
                println!("err disk bench: use disk bench seq-read|seq-write|rand-read COUNT KiB QD")
            }
        }
        return;
    }
    let d = match disk() {
        Ok(d) => d,
        Err(e) => {
            println!("err disk: {e}");
            return;
        }
    };
    let a = number(args.next());
    let b = number(args.next());
    let c = number(args.next());
    let irqs0 = d.q.irqs();
    let t0 = clock::now();
    let result = match (sub, a, b, c) {
        (None, _, _, _) => {
            let id = core::str::from_utf8(&d.id)
                .unwrap_or("?")
                .trim_end_matches('\0');
            println!(
                "disk capacity={} ro={} queues={} id={id}",
                d.capacity,
                u8::from(d.readonly),
                d.queues
            );
            return;
        }
        (Some("read"), Some(s), Some(n), None) => d.chunks(T_IN, s, n, |_, _| {}).map(|_| 0),
        (Some("sum"), Some(s), Some(n), None) => {
            let mut h = FNV_START;
            d.chunks(T_IN, s, n, |at, len| h = fnv(h, at, len))
                .map(|_| h)
        }
        (Some("write"), Some(s), Some(n), Some(byte)) if byte <= 0xff => d
            .chunks(T_OUT, s, n, |at, len| {
                for i in 0..len {
                    virtio::wr::<u8>(at + i, byte as u8);
                }
            })
            .map(|_| 0),
        (Some("flush"), None, None, None) => d
            .run(
                &mut core::iter::once(Req {
                    kind: T_FLUSH,
                    sector: 0,
                    addr: 0,
                    len: 0,
                }),
                1,
            )
            .map(|_| 0),
        (Some("discard"), Some(s), Some(n), None) => {
            let r = data();
            virtio::wr::<u64>(r, s);
            virtio::wr::<u32>(r + 8, n as u32);
            virtio::wr::<u32>(r + 12, 0);
            d.run(
                &mut core::iter::once(Req {
                    kind: T_DISCARD,
                    sector: 0,
                    addr: r as u64,
                    len: 16,
                }),
                1,
            )
            .map(|_| 0)
        }
        _ => {
            println!(
                "err disk: use disk | disk read|sum SECTOR COUNT | disk write SECTOR COUNT BYTE | \
                 disk flush | disk discard SECTOR COUNT | disk bench seq-read|seq-write|rand-read COUNT KiB QD"
            );
            return;
        }
    };
    let ns = clock::now().saturating_sub(t0);
    let irqs = d.q.irqs() - irqs0;
    match (result, sub) {
        (Ok(h), Some("sum")) => println!("disk sum {h:016x} irqs={irqs} ns={ns}"),
        (Ok(_), Some(s)) => println!("disk {s} ok irqs={irqs} ns={ns}"),
        (Err(e), _) => println!("err disk: {e}"),
        (Ok(_), None) => {}
    }
}

/// `disk bench MODE COUNT KiB QD`: COUNT requests of KiB each, QD in flight; sequential
/// from sector 0 (wrapping at the capacity) or random 4 KiB-aligned. Prints the time.
pub fn bench(mode: &str, count: u64, kib: u64, qd: u64) {
    let d = match disk() {
        Ok(d) => d,
        Err(e) => {
            println!("err disk: {e}");
            return;
        }
    };
    let len = kib * 1024;
    let qd = (qd as usize).clamp(1, MAX_QD);
    // Each in-flight request gets its own piece of the buffer.
    if len == 0
        || !len.is_multiple_of(SECTOR)
        || len as usize > MAX_REQUEST
        || len as usize * qd > BUFFER
    {
        println!("err disk bench: KiB * QD must fit 4 MiB, at most 1 MiB a request");
        return;
    }
    let (kind, random) = match mode {
        "seq-read" => (T_IN, false),
        "seq-write" => (T_OUT, false),
        "rand-read" => (T_IN, true),
        _ => {
            println!("err disk bench: MODE is seq-read, seq-write or rand-read");
            return;
        }
    };
    let sectors = len / SECTOR;
    let span = (d.capacity / sectors).max(1);
    let mut rng = Rand(0x9e37_79b9_7f4a_7c15);
    let mut i = 0u64;
    let mut reqs = core::iter::from_fn(|| {
        if i == count {
            return None;
        }
        let k = if random { rng.next() % span } else { i % span };
        let slot = (i as usize) % qd;
        i += 1;
        Some(Req {
            kind,
            sector: k * sectors,
            addr: (data() + slot * len as usize) as u64,
            len: len as u32,
        })
    });
    let (irqs0, kicks0) = (d.q.irqs(), d.q.kicks());
    let t0 = clock::now();
    let r = d.run(&mut reqs, qd);
    let ns = clock::now().saturating_sub(t0);
    match r {
        Ok(n) => println!(
            "disk bench {mode} ops={n} bytes={} ns={ns} irqs={} kicks={}",
            n * len,
            d.q.irqs() - irqs0,
            d.q.kicks() - kicks0
        ),
        Err(e) => println!("err disk bench: {e}"),
    }
}
