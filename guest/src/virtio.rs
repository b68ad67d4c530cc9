//! The generic half of a virtio-pci driver (modern transport, virtio 1.2 §4.1): finding
//! the function and its capabilities, feature negotiation, split virtqueues with
//! event-index notification suppression, one MSI-X entry and APIC vector per queue, and
//! interrupt-driven waiting with a watchdog. Each device driver (rng, blk, ...) is the
//! device-specific rest on top.
//!
//! A request costs no exit to the VMM once set up: the kick is an MMIO write KVM turns
//! into an ioeventfd signal (and with event indices most are skipped), the interrupt comes
//! through KVM's irqfd, and the APIC accesses stay in KVM.
use core::cell::UnsafeCell;
use core::sync::atomic::{fence, Ordering::*};

use crate::{apic, clock, cpu, pci};

pub const VENDOR: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + the device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_EVENT_IDX: u64 = 1 << 29;
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const NEEDS_RESET: u8 = 0x40;
const NO_VECTOR: u16 = 0xffff;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// The one-shot APIC timer that ends a wait whose interrupt never came: 20 ms.
const WATCHDOG_NS: u32 = 20_000_000;

/// Common configuration registers.
const DFSELECT: usize = 0x00;
const DF: usize = 0x04;
const GFSELECT: usize = 0x08;
const GF: usize = 0x0c;
const MSIX_CONFIG: usize = 0x10;
#[allow(dead_code)] // read by drivers of multi-queue devices (blk, net, vsock)
const NUM_QUEUES: usize = 0x12;
const STATUS: usize = 0x14;
const Q_SELECT: usize = 0x16;
const Q_SIZE: usize = 0x18;
const Q_MSIX: usize = 0x1a;
const Q_ENABLE: usize = 0x1c;
const Q_NOTIFY_OFF: usize = 0x1e;
const Q_DESC: usize = 0x20;
const Q_AVAIL: usize = 0x28;
const Q_USED: usize = 0x30;

/// Most entries a queue of this driver has: its rings fit one 4 KiB page.
pub const MAX_QUEUE_SIZE: u16 = 128;

/// A driver's static state (rings, buffers, the device), touched only by the boot CPU: the
/// shell and its main loop, never re-entrantly. The device writes the pages behind it
/// through DMA, which every access tolerates (volatile accesses).
pub struct Shared<T>(pub UnsafeCell<T>);

// SAFETY: only the boot CPU uses a `Shared` (see above), so no two threads share one.
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }
}

/// A driver's device, found on first use and then remembered: ready, absent or failed.
#[allow(clippy::large_enum_variant)] // one static instance per driver, never moved
pub enum Probed<T> {
    Unprobed,
    Absent,
    Failed(&'static str),
    Ready(T),
}

impl<T> Probed<T> {
    /// The device, probing on the first call; `absent` is the error when there is none.
    pub fn get(
        &mut self,
        absent: &'static str,
        probe: impl FnOnce() -> Result<Option<T>, &'static str>,
    ) -> Result<&mut T, &'static str> {
        if let Probed::Unprobed = self {
            *self = match probe() {
                Ok(Some(d)) => Probed::Ready(d),
                Ok(None) => Probed::Absent,
                Err(e) => Probed::Failed(e),
            };
        }
        match self {
            Probed::Ready(d) => Ok(d),
            Probed::Absent => Err(absent),
            Probed::Failed(e) => Err(e),
            Probed::Unprobed => Err("not probed"),
        }
    }

    /// The device if it was found already.
    pub fn ready(&mut self) -> Option<&mut T> {
        match self {
            Probed::Ready(d) => Some(d),
            _ => None,
        }
    }
}

/// One page holding a queue's descriptor table, available ring and used ring.
#[repr(C, align(4096))]
pub struct RingPage(pub [u8; 4096]);

impl RingPage {
    pub const fn new() -> Self {
        Self([0; 4096])
    }
}

pub fn rd<T: Copy>(addr: usize) -> T {
    // SAFETY: callers pass an address inside a device's BAR (identity-mapped uncached,
    // 3-4 GiB) or inside a ring page or DMA buffer of this driver, aligned for T.
    unsafe { (addr as *const T).read_volatile() }
}

pub fn wr<T: Copy>(addr: usize, value: T) {
    // SAFETY: as for `rd`.
    unsafe { (addr as *mut T).write_volatile(value) }
}

/// A set-up function: where its regions are, and what was negotiated.
#[derive(Clone, Copy)]
pub struct Transport {
    common: usize,
    notify: usize,
    multiplier: usize,
    device_config: usize,
    msix_table: usize,
    pub features: u64,
}

impl Transport {
    /// Finds the first function of virtio device type `device_type`, resets it and
    /// negotiates VERSION_1, EVENT_IDX if offered, and whichever of `wanted` it offers.
    /// None if there is no such device.
    pub fn probe(device_type: u16, wanted: u64) -> Result<Option<Transport>, &'static str> {
        Self::probe_nth(device_type, wanted, 0)
    }

    /// As [`probe`](Self::probe), for the `nth` device of the type (0-based).
    pub fn probe_nth(
        device_type: u16,
        wanted: u64,
        nth: usize,
    ) -> Result<Option<Transport>, &'static str> {
        let Some(f) = pci::find(VENDOR, DEVICE_ID_BASE + device_type, nth) else {
            return Ok(None);
        };
        let bar = f.bar(0) as usize;
        if !(0xc000_0000..0xfe00_0000).contains(&bar) {
            return Err("its BAR is outside the MMIO hole");
        }
        let (mut common, mut notify, mut multiplier, mut device, mut msix) =
            (None, None, 0, 0, None);
        for (at, id) in f.capabilities() {
            match id {
                0x09 => {
                    let kind = (f.read32(at) >> 24) as u8;
                    let bar_no = f.read32(at + 4) as u8;
                    let offset = f.read32(at + 8) as usize;
                    if bar_no != 0 {
                        continue;
                    }
                    match kind {
                        1 => common = Some(bar + offset),
                        2 => {
                            notify = Some(bar + offset);
                            multiplier = f.read32(at + 16) as usize;
                        }
                        4 => device = bar + offset,
                        _ => {}
                    }
                }
                0x11 => msix = Some(at),
                _ => {}
            }
        }
        let (Some(common), Some(notify), Some(msix_cap)) = (common, notify, msix) else {
            return Err("it lacks the common, notify or MSI-X capability");
        };
        let table = f.read32(msix_cap + 4);
        if table & 7 != 0 {
            return Err("its MSI-X table is not in BAR 0");
        }
        f.write32(
            pci::COMMAND,
            f.read32(pci::COMMAND) | pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER,
        );

        // Reset, then ACKNOWLEDGE and DRIVER, then the features.
        wr::<u8>(common + STATUS, 0);
        while rd::<u8>(common + STATUS) != 0 {}
        wr::<u8>(common + STATUS, ACKNOWLEDGE);
        wr::<u8>(common + STATUS, ACKNOWLEDGE | DRIVER);
        let mut offered = 0u64;
        for select in 0..2u32 {
            wr(common + DFSELECT, select);
            offered |= u64::from(rd::<u32>(common + DF)) << (32 * select);
        }
        if offered & F_VERSION_1 == 0 {
            return Err("it does not offer VIRTIO_F_VERSION_1");
        }
        let chosen = F_VERSION_1 | (offered & (F_EVENT_IDX | wanted));
        for select in 0..2u32 {
            wr(common + GFSELECT, select);
            wr(common + GF, (chosen >> (32 * select)) as u32);
        }
        wr::<u8>(common + STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if rd::<u8>(common + STATUS) & FEATURES_OK == 0 {
            return Err("it refused our features");
        }
        apic::init();
        wr::<u16>(common + MSIX_CONFIG, NO_VECTOR);
        let control = f.read32(msix_cap);
        f.write32(msix_cap, control | 1 << 31);
        Ok(Some(Transport {
            common,
            notify,
            multiplier,
            device_config: device,
            msix_table: bar + (table & !7) as usize,
            features: chosen,
        }))
    }

    /// A value of the device-specific configuration (0 if the device has none).
    #[allow(dead_code)] // rng has no configuration; blk, net and vsock do
    pub fn config<T: Copy + Default>(&self, offset: usize) -> T {
        if self.device_config == 0 {
            return T::default();
        }
        rd(self.device_config + offset)
    }

    /// Writes a value of the device-specific configuration (nothing if it has none).
    pub fn config_write<T: Copy>(&self, offset: usize, value: T) {
        if self.device_config != 0 {
            wr(self.device_config + offset, value);
        }
    }

    /// How many queues the device has.
    #[allow(dead_code)] // for multi-queue devices
    pub fn queue_count(&self) -> u16 {
        rd(self.common + NUM_QUEUES)
    }

    /// Sets up queue `index` with `size` entries in `page`, its own MSI-X entry (number
    /// `index`) and APIC vector on this CPU.
    pub fn setup_queue(
        &self,
        index: u16,
        page: *mut RingPage,
        size: u16,
    ) -> Result<Queue, &'static str> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err("a queue size must be a power of two up to 128");
        }
        let c = self.common;
        wr::<u16>(c + Q_SELECT, index);
        if rd::<u16>(c + Q_SIZE) < size {
            return Err("its queue is too small");
        }
        let vector = apic::alloc_vector().ok_or("no APIC vector is left for the queue")?;
        self.msix_entry(index, vector);
        wr::<u16>(c + Q_SIZE, size);
        wr::<u16>(c + Q_MSIX, index);
        if rd::<u16>(c + Q_MSIX) != index {
            return Err("it refused an MSI-X vector for a queue");
        }
        let base = page as usize;
        // SAFETY: `page` is a ring page of the caller's, given to this queue alone.
        unsafe { (*page).0.fill(0) };
        let avail = base + 16 * usize::from(size);
        let used = (avail + 6 + 2 * usize::from(size) + 63) & !63;
        wr::<u64>(c + Q_DESC, base as u64);
        wr::<u64>(c + Q_AVAIL, avail as u64);
        wr::<u64>(c + Q_USED, used as u64);
        let notify = self.notify + self.multiplier * usize::from(rd::<u16>(c + Q_NOTIFY_OFF));
        wr::<u16>(c + Q_ENABLE, 1);
        let mut q = Queue {
            desc: base,
            avail,
            used,
            size,
            notify,
            event_idx: self.features & F_EVENT_IDX != 0,
            vector,
            next_avail: 0,
            published: 0,
            used_seen: 0,
            free_head: 0,
            free: size,
            next: [0; MAX_QUEUE_SIZE as usize],
            kicks: 0,
        };
        for i in 0..size {
            q.next[usize::from(i)] = i + 1;
        }
        Ok(q)
    }

    /// Points MSI-X entry `entry` at device vector `vector` on this CPU.
    fn msix_entry(&self, entry: u16, vector: usize) {
        let entry = self.msix_table + 16 * usize::from(entry);
        wr::<u32>(entry, 0xfee0_0000 | apic::id() << 12);
        wr::<u32>(entry + 4, 0);
        wr::<u32>(entry + 8, (apic::DEVICE_VECTOR_BASE + vector) as u32);
        wr::<u32>(entry + 12, 0);
    }

    /// Routes configuration-change interrupts to MSI-X entry `entry` and a device vector
    /// of their own; returns that vector (count its interrupts with `apic::device_irqs`).
    #[allow(dead_code)] // for devices whose configuration changes (gpu)
    pub fn config_interrupt(&self, entry: u16) -> Result<usize, &'static str> {
        let vector = apic::alloc_vector().ok_or("no APIC vector is left for the configuration")?;
        self.msix_entry(entry, vector);
        wr::<u16>(self.common + MSIX_CONFIG, entry);
        if rd::<u16>(self.common + MSIX_CONFIG) != entry {
            return Err("it refused an MSI-X vector for configuration changes");
        }
        Ok(vector)
    }

    /// Writes a value of the device-specific configuration.
    #[allow(dead_code)] // for devices with a writable configuration (gpu)
    pub fn set_config<T: Copy>(&self, offset: usize, value: T) {
        if self.device_config != 0 {
            wr(self.device_config + offset, value);
        }
    }

    /// DRIVER_OK: the device may now use the queues.
    pub fn start(&self) -> Result<(), &'static str> {
        wr::<u8>(
            self.common + STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        if rd::<u8>(self.common + STATUS) & NEEDS_RESET != 0 {
            return Err("it needs a reset after set-up");
        }
        Ok(())
    }
}

/// One buffer of a request.
#[derive(Clone, Copy)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    /// The device writes it (else reads it).
    pub writable: bool,
}

/// The driver side of a split virtqueue: descriptors from a free list, requests made
/// available in batches ([`publish`](Self::publish): one kick at most), completions
/// taken from the used ring.
pub struct Queue {
    desc: usize,
    avail: usize,
    used: usize,
    size: u16,
    notify: usize,
    event_idx: bool,
    /// Index into the APIC's device vectors.
    vector: usize,
    next_avail: u16,
    /// The available index the device was last told of.
    published: u16,
    used_seen: u16,
    free_head: u16,
    free: u16,
    /// The driver's own copy of the descriptor links (the device cannot change it).
    next: [u16; MAX_QUEUE_SIZE as usize],
    /// Notifications written (each a VM exit on PVM, if not to the VMM).
    kicks: u64,
}

impl Queue {
    /// Free descriptors.
    #[allow(dead_code)] // for drivers with several requests in flight
    pub fn free(&self) -> u16 {
        self.free
    }

    /// The descriptor a one-buffer request added now would use as its head, if one is
    /// free: a driver with a buffer per descriptor fills that buffer first.
    #[allow(dead_code)] // for drivers with a buffer per descriptor (net)
    pub fn next_head(&self) -> Option<u16> {
        (self.free > 0).then_some(self.free_head)
    }

    /// Notifications sent so far.
    #[allow(dead_code)] // reported by drivers that count their exits (gpu)
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// Device interrupts of this queue so far.
    pub fn irqs(&self) -> u64 {
        apic::device_irqs(self.vector)
    }

    /// Puts a request in the available ring (not yet visible to the device): its head,
    /// or None if there are not enough free descriptors.
    pub fn add(&mut self, bufs: &[Buffer]) -> Option<u16> {
        let n = bufs.len() as u16;
        if n == 0 || n > self.free {
            return None;
        }
        let head = self.free_head;
        let mut i = head;
        for (k, b) in bufs.iter().enumerate() {
            let d = self.desc + 16 * usize::from(i);
            let last = k + 1 == bufs.len();
            let next = self.next[usize::from(i)];
            wr::<u64>(d, b.addr);
            wr::<u32>(d + 8, b.len);
            let flags =
                if b.writable { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            wr::<u16>(d + 12, flags);
            wr::<u16>(d + 14, if last { 0 } else { next });
            if last {
                self.free_head = next;
            } else {
                i = next;
            }
        }
        self.free -= n;
        let slot = usize::from(self.next_avail % self.size);
        wr::<u16>(self.avail + 4 + 2 * slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        Some(head)
    }

    /// Makes the added requests visible and kicks the device if it asked for it; asks for
    /// an interrupt at the next completion.
    pub fn publish(&mut self) {
        self.publish_as(true)
    }

    /// [`publish`](Self::publish) for a driver that polls the used ring first
    /// ([`wait_used_polling`](Self::wait_used_polling)): asks for no interrupt (one coming
    /// while it polls would only end its next `hlt` for nothing).
    pub fn publish_polling(&mut self) {
        self.publish_as(false)
    }

    fn publish_as(&mut self, interrupt: bool) {
        let old = self.published;
        if old == self.next_avail {
            if !interrupt {
                self.disarm();
            }
            return;
        }
        if interrupt {
            self.arm();
        } else {
            self.disarm();
        }
        wr::<u16>(self.avail + 2, self.next_avail);
        self.published = self.next_avail;
        fence(SeqCst);
        let kick = if self.event_idx {
            let event: u16 = rd(self.used + 4 + 8 * usize::from(self.size));
            // vring_need_event: did the index pass the device's avail_event?
            self.next_avail.wrapping_sub(event).wrapping_sub(1) < self.next_avail.wrapping_sub(old)
        } else {
            rd::<u16>(self.used) & 1 == 0
        };
        if kick {
            wr::<u16>(self.notify, 0);
            self.kicks += 1;
        }
    }

    fn used_idx(&self) -> u16 {
        rd(self.used + 2)
    }

    /// Whether the device used a request the driver has not taken.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.used_seen
    }

    /// Asks for an interrupt at the next used entry.
    fn arm(&self) {
        if self.event_idx {
            wr::<u16>(self.avail + 4 + 2 * usize::from(self.size), self.used_seen);
        }
        fence(SeqCst);
    }

    /// Asks for no interrupt until the next [`arm`](Self::arm): the used event index goes
    /// half the index space ahead, where completions do not reach before the driver arms.
    fn disarm(&self) {
        if self.event_idx {
            let far = self.used_seen.wrapping_add(0x8000);
            wr::<u16>(self.avail + 4 + 2 * usize::from(self.size), far);
        }
        fence(SeqCst);
    }

    /// Takes the next completed request: (head, bytes the device wrote), and frees its
    /// descriptors.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        fence(Acquire);
        let elem = self.used + 4 + 8 * usize::from(self.used_seen % self.size);
        let id: u32 = rd(elem);
        let len: u32 = rd(elem + 4);
        self.used_seen = self.used_seen.wrapping_add(1);
        let head = (id as u16) % self.size;
        // Free the chain by our own links (a device cannot make us loop).
        let mut i = head;
        let mut n = 1;
        while rd::<u16>(self.desc + 16 * usize::from(i) + 12) & DESC_F_NEXT != 0 && n < self.size {
            i = self.next[usize::from(i)];
            n += 1;
        }
        self.next[usize::from(i)] = self.free_head;
        self.free_head = head;
        self.free += n;
        Some((head, len))
    }

    /// Sleeps until the device used a request the driver has not taken, at most `timeout_ns`.
    #[allow(dead_code)] // for drivers with several requests in flight
    pub fn wait_used(&self, timeout_ns: u64) -> Result<(), &'static str> {
        if self.has_used() {
            return Ok(());
        }
        self.wait_used_watched(&mut Watchdog::arm(), timeout_ns)
    }

    /// [`wait_used`](Self::wait_used) under a watchdog the caller keeps armed.
    fn wait_used_watched(&self, dog: &mut Watchdog, timeout_ns: u64) -> Result<(), &'static str> {
        dog.wait_until(timeout_ns, || {
            if self.has_used() {
                return true;
            }
            self.arm();
            self.has_used()
        })
    }
}

impl Queue {
    /// Polls the used ring for up to `spin_ns` (no exit, no interrupt: a completion that
    /// comes meanwhile costs nothing), then arms the interrupt and sleeps as
    /// [`wait_used`](Self::wait_used) does, at most `timeout_ns`, under the watchdog in
    /// `dog` (armed at the first sleep: a driver waiting many times keeps one armed
    /// watchdog, see [`Watchdog`]).
    pub fn wait_used_polling(
        &self,
        spin_ns: u64,
        timeout_ns: u64,
        dog: &mut Option<Watchdog>,
    ) -> Result<(), &'static str> {
        let t0 = clock::now();
        loop {
            if self.has_used() {
                return Ok(());
            }
            if clock::now().saturating_sub(t0) >= spin_ns {
                let dog = dog.get_or_insert_with(Watchdog::arm);
                return self.wait_used_watched(dog, timeout_ns);
            }
            core::hint::spin_loop();
        }
    }
}

/// The one-shot APIC timer armed as a watchdog ([`WATCHDOG_NS`]) for waits on interrupts,
/// stopped when dropped. Each timer access is an exit on PVM (~as costly as the rest of a
/// wake-up): a driver that waits many times in a row (a disk at queue depth 32 wakes once
/// per ~30 requests) keeps one watchdog armed for all its waits, re-armed only after it
/// fired, instead of starting and stopping the timer around each wait.
pub struct Watchdog {
    timer_irqs: u64,
}

impl Watchdog {
    pub fn arm() -> Self {
        apic::set_timer(WATCHDOG_NS);
        Self {
            timer_irqs: apic::TIMER_IRQS.load(Relaxed),
        }
    }

    /// Sleeps in `hlt` until `done()` holds, waking on every interrupt; the watchdog ends
    /// waits whose interrupt never came. Fails after `timeout_ns`.
    pub fn wait_until(
        &mut self,
        timeout_ns: u64,
        mut done: impl FnMut() -> bool,
    ) -> Result<(), &'static str> {
        let pvm = crate::heartbeat::pvm().load(Relaxed) != 0;
        let t0 = clock::now();
        while !done() {
            if clock::now().saturating_sub(t0) > timeout_ns {
                return Err("the device did not answer in time");
            }
            let timer = apic::TIMER_IRQS.load(Relaxed);
            if timer != self.timer_irqs {
                // The watchdog fired (it ended the last wait, or ran out between waits):
                // arm it again before sleeping.
                self.timer_irqs = timer;
                apic::set_timer(WATCHDOG_NS);
            }
            cpu::wait_for_interrupt(pvm);
        }
        Ok(())
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        apic::set_timer(0);
    }
}

/// Sleeps in `hlt` until `done()` holds, waking on every interrupt; a one-shot APIC timer
/// (the watchdog) ends waits whose interrupt never came. Fails after `timeout_ns`.
pub fn wait_until(timeout_ns: u64, mut done: impl FnMut() -> bool) -> Result<(), &'static str> {
    if done() {
        return Ok(());
    }
    Watchdog::arm().wait_until(timeout_ns, done)
}

/// Watchdog wake-ups so far (a lost interrupt shows here).
pub fn watchdog_irqs() -> u64 {
    apic::TIMER_IRQS.load(Relaxed)
}
