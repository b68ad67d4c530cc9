//! A virtio-gpu 2D driver on [`virtio`]: one resource per scanout (B8G8R8X8, which is
//! XRGB8888 in memory), its backing one contiguous run of guest RAM taken from the top of
//! usable memory, shown on its scanout.
//!
//! Drawing is stores into the backing (no exits); then one batch of two requests,
//! TRANSFER_TO_HOST_2D and RESOURCE_FLUSH of only the rectangle that changed, made
//! available with one kick (an exit on PVM, but none to the VMM: an ioeventfd) and
//! completed with one interrupt. A draw that changes nothing sends nothing.
//!
//! A display event (the host resized a scanout) comes as a configuration interrupt; the
//! main loop sees its count move ([`poll`]), re-reads the display information, and
//! rebuilds the scanouts whose mode changed.
//!
//! Set up on first use (`displays`, `draw`); without the device the guest runs as before.

use crate::virtio::{self, Buffer, Probed, Queue, RingPage, Shared, Transport};
use crate::{apic, bootparams, paging};

const DEVICE_TYPE: u16 = 16;
const QUEUE_SIZE: u16 = 16;
const TIMEOUT_NS: u64 = 2_000_000_000;
/// Most scanouts this driver drives.
pub const MAX_SCANOUTS: usize = 4;

const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
const CMD_RESOURCE_UNREF: u32 = 0x0102;
const CMD_SET_SCANOUT: u32 = 0x0103;
const CMD_RESOURCE_FLUSH: u32 = 0x0104;
const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
const RESP_OK_NODATA: u32 = 0x1100;
const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
const FORMAT_B8G8R8X8: u32 = 2;
const EVENT_DISPLAY: u32 = 1;
/// Configuration: events_read, events_clear, num_scanouts.
const CONFIG_EVENTS_READ: usize = 0;
const CONFIG_EVENTS_CLEAR: usize = 4;
const CONFIG_NUM_SCANOUTS: usize = 8;
const HDR: usize = 24;
/// Requests of a batch sit this far apart in the request page, responses in theirs.
const SLOT: usize = 512;
const SLOTS: usize = 4096 / SLOT;

static RINGS: Shared<RingPage> = Shared::new(RingPage::new());
static REQUESTS: Shared<RingPage> = Shared::new(RingPage::new());
static RESPONSES: Shared<RingPage> = Shared::new(RingPage::new());
static STATE: Shared<Probed<Gpu>> = Shared::new(Probed::Unprobed);

/// A rectangle of a scanout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// One scanout as this driver set it up.
#[derive(Clone, Copy, Default)]
pub struct Scanout {
    pub width: u32,
    pub height: u32,
    /// Guest-physical address of the backing (`width * height * 4` bytes; 0: not set up).
    pub backing: u64,
    /// Bytes of the run of RAM the backing sits in: the largest mode the scanout had, so a
    /// smaller or equal mode reuses it.
    pub capacity: u64,
}

/// Most free runs of backing RAM kept; with at most [`MAX_SCANOUTS`] scanouts, each owning
/// one run, there are never more than that plus one after merging.
const MAX_FREE: usize = 2 * MAX_SCANOUTS;

/// The RAM the scanouts' backings come from: runs handed out below `top`, growing down to
/// `floor`, and runs given back, merged with their neighbours; a run given back at the
/// floor goes back to the unallocated space. Resizing a scanout any number of times thus
/// never takes more than the largest modes need.
#[derive(Clone, Copy)]
struct Backings {
    /// Lowest address handed out: new runs go below it.
    floor: u64,
    /// Free runs `(address, bytes)` above `floor`; `bytes == 0`: an empty entry.
    free: [(u64, u64); MAX_FREE],
}

impl Backings {
    fn new(top: u64) -> Self {
        Self {
            floor: top,
            free: [(0, 0); MAX_FREE],
        }
    }

    /// A run of at least `bytes` (page multiple): the smallest free run that fits, else
    /// new RAM below the floor, not below `bottom`. Returns its address and size.
    fn take(&mut self, bytes: u64, bottom: u64) -> Option<(u64, u64)> {
        let fit = (0..MAX_FREE)
            .filter(|&i| self.free[i].1 >= bytes)
            .min_by_key(|&i| self.free[i].1);
        if let Some(i) = fit {
            let run = self.free[i];
            self.free[i] = (0, 0);
            return Some(run);
        }
        let at = self.floor.checked_sub(bytes).filter(|&a| a >= bottom)?;
        self.floor = at;
        Some((at, bytes))
    }

    /// Gives run `(at, bytes)` back: merged with free neighbours, and returned to the
    /// unallocated space if it then starts at the floor.
    fn give(&mut self, mut at: u64, mut bytes: u64) {
        if bytes == 0 {
            return;
        }
        loop {
            let next = (0..MAX_FREE).find(|&i| {
                let (a, n) = self.free[i];
                n != 0 && (a + n == at || at + bytes == a)
            });
            let Some(i) = next else { break };
            let (a, n) = self.free[i];
            self.free[i] = (0, 0);
            at = at.min(a);
            bytes += n;
        }
        if at == self.floor {
            self.floor += bytes;
        } else if let Some(slot) = self.free.iter_mut().find(|r| r.1 == 0) {
            *slot = (at, bytes);
        }
        // A full list (impossible with MAX_FREE) would only lose the run.
    }
}

pub struct Gpu {
    t: Transport,
    q: Queue,
    config_vector: usize,
    config_irqs: u64,
    pub scanouts: [Scanout; MAX_SCANOUTS],
    pub count: usize,
    /// Where the backings come from.
    backings: Backings,
    /// Requests sent so far.
    pub requests: u64,
    /// Display events handled so far.
    pub events: u64,
}

/// One request of a batch: its bytes; the response's length.
struct Request<'a> {
    bytes: &'a [u8],
    response: usize,
}

fn le(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// A command: the header (type `kind`) and `fields`, little-endian, into `buf`.
fn command<'a>(buf: &'a mut [u8], kind: u32, fields: &[u32]) -> &'a [u8] {
    buf[..HDR].fill(0);
    le(buf, 0, kind);
    for (i, f) in fields.iter().enumerate() {
        le(buf, HDR + 4 * i, *f);
    }
    &buf[..HDR + 4 * fields.len()]
}

/// The first 2 MiB-aligned top of usable RAM inside the identity map, and the floor the
/// backings may not pass (the kernel's end, or the region's start).
fn top_of_ram() -> Option<(u64, u64)> {
    let floor = paging::kernel_end();
    bootparams::get()
        .usable()
        .filter_map(|e| {
            let top = e.end().min(paging::mapped_end()) & !((2 << 20) - 1);
            let bottom = e.addr.max(floor);
            (top > bottom).then_some((top, bottom))
        })
        .max_by_key(|&(top, _)| top)
}

fn probe() -> Result<Option<Gpu>, &'static str> {
    let Some(t) = Transport::probe(DEVICE_TYPE, 0)? else {
        return Ok(None);
    };
    let q = t.setup_queue(0, RINGS.0.get(), QUEUE_SIZE)?;
    // Entry 2: after the control and cursor queues' entries.
    let config_vector = t.config_interrupt(2)?;
    t.start()?;
    let (top, _) = top_of_ram().ok_or("no usable RAM for the framebuffers")?;
    let mut gpu = Gpu {
        t,
        q,
        config_vector,
        config_irqs: apic::device_irqs(config_vector),
        scanouts: [Scanout::default(); MAX_SCANOUTS],
        count: 0,
        backings: Backings::new(top),
        requests: 0,
        events: 0,
    };
    gpu.count = (gpu.t.config::<u32>(CONFIG_NUM_SCANOUTS) as usize).min(MAX_SCANOUTS);
    gpu.follow_modes()?;
    Ok(Some(gpu))
}

impl Gpu {
    /// Sends `batch` (made available together: one kick at most) and waits until all are
    /// used; each response must be `want`.
    fn send(&mut self, batch: &[Request<'_>], want: u32) -> Result<(), &'static str> {
        let req = REQUESTS.0.get() as usize;
        let resp = RESPONSES.0.get() as usize;
        if batch.len() > SLOTS {
            return Err("too many requests in one batch");
        }
        for (i, r) in batch.iter().enumerate() {
            let at = req + i * SLOT;
            for (k, b) in r.bytes.iter().enumerate() {
                virtio::wr(at + k, *b);
            }
            let out = resp + i * SLOT;
            virtio::wr::<u32>(out, 0);
            self.q
                .add(&[
                    Buffer {
                        addr: at as u64,
                        len: r.bytes.len() as u32,
                        writable: false,
                    },
                    Buffer {
                        addr: out as u64,
                        len: r.response as u32,
                        writable: true,
                    },
                ])
                .ok_or("no free descriptor")?;
        }
        self.q.publish();
        self.requests += batch.len() as u64;
        let mut done = 0;
        while done < batch.len() {
            self.q.wait_used(TIMEOUT_NS)?;
            while self.q.pop_used().is_some() {
                done += 1;
            }
        }
        for i in 0..batch.len() {
            if virtio::rd::<u32>(resp + i * SLOT) != want {
                return Err("the device refused a command");
            }
        }
        Ok(())
    }

    fn one(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        self.send(
            &[Request {
                bytes,
                response: HDR,
            }],
            RESP_OK_NODATA,
        )
    }

    /// GET_DISPLAY_INFO: each scanout's mode (0x0 when disabled).
    fn display_info(&mut self) -> Result<[(u32, u32); MAX_SCANOUTS], &'static str> {
        let mut buf = [0u8; HDR];
        let bytes = command(&mut buf, CMD_GET_DISPLAY_INFO, &[]);
        self.send(
            &[Request {
                bytes,
                response: HDR + 16 * 24,
            }],
            RESP_OK_DISPLAY_INFO,
        )?;
        let resp = RESPONSES.0.get() as usize;
        let mut modes = [(0, 0); MAX_SCANOUTS];
        for (i, m) in modes.iter_mut().enumerate() {
            let at = resp + HDR + 24 * i;
            let enabled = virtio::rd::<u32>(at + 16) != 0;
            if enabled {
                *m = (virtio::rd(at + 8), virtio::rd(at + 12));
            }
        }
        Ok(modes)
    }

    /// Brings every scanout to the device's current mode: a scanout whose mode changed
    /// gets a new resource and backing, cleared and shown.
    fn follow_modes(&mut self) -> Result<(), &'static str> {
        let modes = self.display_info()?;
        for (i, &(w, h)) in modes.iter().enumerate().take(self.count) {
            let s = self.scanouts[i];
            if (s.width, s.height) == (w, h) && s.backing != 0 {
                continue;
            }
            if w == 0 || h == 0 {
                continue;
            }
            self.setup_scanout(i, w, h)?;
        }
        Ok(())
    }

    /// Resource `i + 1` for scanout `i`, `w` x `h`, backed by the scanout's run of RAM if
    /// it is large enough, else by another ([`Backings`]).
    fn setup_scanout(&mut self, i: usize, w: u32, h: u32) -> Result<(), &'static str> {
        let id = i as u32 + 1;
        let mut buf = [0u8; 64];
        let old = self.scanouts[i];
        if old.backing != 0 {
            self.one(command(
                &mut buf,
                CMD_SET_SCANOUT,
                &[0, 0, 0, 0, i as u32, 0],
            ))?;
            self.one(command(&mut buf, CMD_RESOURCE_UNREF, &[id, 0]))?;
            self.scanouts[i] = Scanout::default();
        }
        let bytes = u64::from(w) * u64::from(h) * 4;
        let (backing, capacity) = if old.backing != 0 && old.capacity >= bytes {
            (old.backing, old.capacity)
        } else {
            self.backings.give(old.backing, old.capacity);
            let (_, bottom) = top_of_ram().ok_or("no usable RAM for the framebuffers")?;
            self.backings
                .take(bytes.next_multiple_of(4096), bottom)
                .ok_or("no room in RAM for the framebuffer")?
        };
        // SAFETY: [backing, backing+bytes) lies in a run of usable RAM inside the identity
        // map (checked against `top_of_ram` when first handed out), above the kernel, that
        // this driver owns and that no other scanout uses.
        unsafe { core::ptr::write_bytes(backing as *mut u8, 0, bytes as usize) };
        self.one(command(
            &mut buf,
            CMD_RESOURCE_CREATE_2D,
            &[id, FORMAT_B8G8R8X8, w, h],
        ))?;
        let attach = command(
            &mut buf,
            CMD_RESOURCE_ATTACH_BACKING,
            &[
                id,
                1,
                backing as u32,
                (backing >> 32) as u32,
                bytes as u32,
                0,
            ],
        );
        self.one(attach)?;
        self.one(command(
            &mut buf,
            CMD_SET_SCANOUT,
            &[0, 0, w, h, i as u32, id],
        ))?;
        self.scanouts[i] = Scanout {
            width: w,
            height: h,
            backing,
            capacity,
        };
        self.update(
            i,
            Rect {
                x: 0,
                y: 0,
                width: w,
                height: h,
            },
        )
    }

    /// Sends rectangle `r` of scanout `i` to the host and shows it: one batch of two
    /// requests.
    pub fn update(&mut self, i: usize, r: Rect) -> Result<(), &'static str> {
        let s = self.scanouts[i];
        let id = i as u32 + 1;
        let offset = (u64::from(r.y) * u64::from(s.width) + u64::from(r.x)) * 4;
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        let transfer = command(
            &mut a,
            CMD_TRANSFER_TO_HOST_2D,
            &[
                r.x,
                r.y,
                r.width,
                r.height,
                offset as u32,
                (offset >> 32) as u32,
                id,
                0,
            ],
        );
        let flush = command(
            &mut b,
            CMD_RESOURCE_FLUSH,
            &[r.x, r.y, r.width, r.height, id, 0],
        );
        self.send(
            &[
                Request {
                    bytes: transfer,
                    response: HDR,
                },
                Request {
                    bytes: flush,
                    response: HDR,
                },
            ],
            RESP_OK_NODATA,
        )
    }

    pub fn kicks(&self) -> u64 {
        self.q.kicks()
    }

    /// Handles a display event if the configuration interrupt came: re-reads the modes,
    /// clears the event. True if there was one.
    fn handle_event(&mut self) -> Result<bool, &'static str> {
        let irqs = apic::device_irqs(self.config_vector);
        if irqs == self.config_irqs {
            return Ok(false);
        }
        self.config_irqs = irqs;
        let events: u32 = self.t.config(CONFIG_EVENTS_READ);
        if events & EVENT_DISPLAY == 0 {
            return Ok(false);
        }
        self.t.set_config::<u32>(CONFIG_EVENTS_CLEAR, EVENT_DISPLAY);
        self.follow_modes()?;
        self.events += 1;
        Ok(true)
    }
}

/// The driver, set up on first use; an error if there is no virtio GPU.
pub fn get() -> Result<&'static mut Gpu, &'static str> {
    // SAFETY: only the boot CPU's shell and main loop call this (see `Shared`).
    unsafe { &mut *STATE.0.get() }.get("no virtio GPU", probe)
}

/// The driver if it was set up already (no probing).
fn ready() -> Option<&'static mut Gpu> {
    // SAFETY: as in `get`.
    unsafe { &mut *STATE.0.get() }.ready()
}

/// From the main loop: follows a display event (no exit unless the configuration
/// interrupt came).
pub fn poll() {
    let Some(gpu) = ready() else { return };
    match gpu.handle_event() {
        Ok(false) => {}
        Ok(true) => {
            for (i, s) in gpu.scanouts[..gpu.count].iter().enumerate() {
                println!(
                    "gpu display event: scanout {i} is {}x{} events={}",
                    s.width, s.height, gpu.events
                );
            }
        }
        Err(e) => println!("err gpu display event: {e}"),
    }
}

const _: () = assert!(MAX_SCANOUTS <= ray_guest_abi::display::MAX_DISPLAYS);
const _: () = assert!(SLOT >= HDR + 16 * 24);
