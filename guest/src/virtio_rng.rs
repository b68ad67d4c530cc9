//! A virtio-rng driver on [`virtio`]: one queue of 16 entries, one request at a time,
//! completed by the queue's interrupt.
//!
//! Set up on first use: without the device the guest runs as before and `rng` says so.

use crate::virtio::{self, Buffer, Probed, Queue, RingPage, Shared, Transport};

const DEVICE_TYPE: u16 = 4;
const QUEUE_SIZE: u16 = 16;
pub const MAX_REQUEST: usize = 1024;
const TIMEOUT_NS: u64 = 2_000_000_000;

static RINGS: Shared<RingPage> = Shared::new(RingPage::new());
static BUFFER: Shared<RingPage> = Shared::new(RingPage::new());
static STATE: Shared<Probed<Queue>> = Shared::new(Probed::Unprobed);

fn probe() -> Result<Option<Queue>, &'static str> {
    let Some(t) = Transport::probe(DEVICE_TYPE, 0)? else {
        return Ok(None);
    };
    let q = t.setup_queue(0, RINGS.0.get(), QUEUE_SIZE)?;
    t.start()?;
    Ok(Some(q))
}

/// One request, one kick (if the device wants it), one interrupt: waits until the used
/// index moved and the interrupt for it was taken (a device faster than this CPU leaves it
/// pending; the first wait then takes it at once), so none is left over for the next
/// request. Returns how many bytes the device wrote.
fn request(q: &mut Queue, out: &mut [u8]) -> Result<usize, &'static str> {
    let len = out.len().min(MAX_REQUEST);
    let buffer = BUFFER.0.get() as usize;
    q.add(&[Buffer {
        addr: buffer as u64,
        len: len as u32,
        writable: true,
    }])
    .ok_or("no free descriptor")?;
    let irqs = q.irqs();
    q.publish();
    virtio::wait_until(TIMEOUT_NS, || q.has_used() && q.irqs() != irqs)?;
    let (_, written) = q.pop_used().ok_or("the used ring is empty")?;
    let n = (written as usize).min(len);
    for (i, b) in out[..n].iter_mut().enumerate() {
        *b = virtio::rd(buffer + i);
    }
    Ok(n)
}

/// Fills `out` from the virtio-rng device, setting it up on first use.
pub fn read(out: &mut [u8]) -> Result<usize, &'static str> {
    // SAFETY: only the boot CPU's shell calls this (see `Shared`).
    let q = unsafe { &mut *STATE.0.get() }.get("no virtio-rng device", probe)?;
    request(q, out)
}

/// (interrupts of the rng's queue, watchdog timer interrupts) taken so far.
pub fn interrupts() -> (u64, u64) {
    // SAFETY: as in `read`.
    let irqs = unsafe { &mut *STATE.0.get() }
        .ready()
        .map_or(0, |q| q.irqs());
    (irqs, virtio::watchdog_irqs())
}
