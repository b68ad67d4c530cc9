//! A virtio-rng driver over the modern virtio-pci transport: one split virtqueue of 16
//! entries, MSI-X vector 0 on the boot CPU's [`apic::DEVICE_VECTOR`], event-index
//! notification suppression when the device offers it, and interrupt-driven completion
//! (the CPU sleeps in `hlt` until the device's interrupt).
//!
//! Set up on first use: without the device the guest runs as before and `rng` says so.
//! Once set up, a request costs no exit to the VMM: the kick is an MMIO write KVM turns
//! into an ioeventfd signal, the interrupt comes through KVM's irqfd, and the APIC
//! accesses stay in KVM.
use core::cell::UnsafeCell;
use core::sync::atomic::{fence, Ordering::*};

use crate::{apic, clock, cpu, pci};

const VENDOR: u16 = 0x1af4;
const DEVICE: u16 = 0x1044;
const QUEUE_SIZE: u16 = 16;
pub const MAX_REQUEST: usize = 1024;

const F_VERSION_1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const NO_VECTOR: u16 = 0xffff;
const DESC_F_WRITE: u16 = 2;
/// The one-shot APIC timer that ends a wait whose interrupt never came: 20 ms.
const WATCHDOG_NS: u32 = 20_000_000;

/// Common configuration registers.
const DFSELECT: usize = 0x00;
const DF: usize = 0x04;
const GFSELECT: usize = 0x08;
const GF: usize = 0x0c;
const MSIX_CONFIG: usize = 0x10;
const STATUS: usize = 0x14;
const Q_SELECT: usize = 0x16;
const Q_SIZE: usize = 0x18;
const Q_MSIX: usize = 0x1a;
const Q_ENABLE: usize = 0x1c;
const Q_NOTIFY_OFF: usize = 0x1e;
const Q_DESC: usize = 0x20;
const Q_AVAIL: usize = 0x28;
const Q_USED: usize = 0x30;

/// The ring page: descriptors at 0, available ring at 256, used ring at 512.
#[repr(C, align(4096))]
struct Rings([u8; 4096]);
const AVAIL: usize = 256;
const USED: usize = 512;

struct Shared<T>(UnsafeCell<T>);
// SAFETY: used only by the boot CPU (the shell); the device writes the pages through DMA,
// which every access here tolerates (volatile accesses).
unsafe impl<T> Sync for Shared<T> {}

static RINGS: Shared<Rings> = Shared(UnsafeCell::new(Rings([0; 4096])));
static BUFFER: Shared<Rings> = Shared(UnsafeCell::new(Rings([0; 4096])));
static STATE: Shared<State> = Shared(UnsafeCell::new(State::Unprobed));

#[derive(Clone, Copy)]
enum State {
    Unprobed,
    Absent,
    Failed(&'static str),
    Ready(Device),
}

#[derive(Clone, Copy)]
struct Device {
    notify: usize,
    event_idx: bool,
    next_avail: u16,
    /// Used index already consumed.
    used_seen: u16,
}

fn rings() -> *mut u8 {
    RINGS.0.get().cast()
}

fn ring16(offset: usize) -> *mut u16 {
    // SAFETY (for callers' dereference): offsets stay inside the ring page.
    rings().wrapping_add(offset).cast()
}

fn rd<T: Copy>(addr: usize) -> T {
    // SAFETY: `addr` is inside the device's BAR (identity-mapped uncached, 3-4 GiB) or the
    // ring page, aligned for T.
    unsafe { (addr as *const T).read_volatile() }
}

fn wr<T: Copy>(addr: usize, value: T) {
    // SAFETY: as for `rd`.
    unsafe { (addr as *mut T).write_volatile(value) }
}

impl Device {
    fn probe() -> Result<Option<Device>, &'static str> {
        let Some(f) = pci::find(VENDOR, DEVICE) else {
            return Ok(None);
        };
        let bar = f.bar(0) as usize;
        if !(0xc000_0000..0xfe00_0000).contains(&bar) {
            return Err("its BAR is outside the MMIO hole");
        }
        let (mut common, mut notify, mut multiplier, mut msix) = (None, None, 0, None);
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
                        _ => {}
                    }
                }
                0x11 => msix = Some(at),
                _ => {}
            }
        }
        let (Some(common), Some(notify), Some(msix)) = (common, notify, msix) else {
            return Err("it lacks the common, notify or MSI-X capability");
        };
        let table = f.read32(msix + 4);
        if table & 7 != 0 {
            return Err("its MSI-X table is not in BAR 0");
        }
        let table = bar + (table & !7) as usize;
        f.write32(
            pci::COMMAND,
            f.read32(pci::COMMAND) | pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER,
        );

        // Reset, then ACKNOWLEDGE and DRIVER.
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
        let chosen = F_VERSION_1 | (offered & F_EVENT_IDX);
        for select in 0..2u32 {
            wr(common + GFSELECT, select);
            wr(common + GF, (chosen >> (32 * select)) as u32);
        }
        wr::<u8>(common + STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if rd::<u8>(common + STATUS) & FEATURES_OK == 0 {
            return Err("it refused our features");
        }

        // MSI-X: vector 0 to this CPU's device vector, then enabled.
        apic::init();
        wr::<u32>(table, 0xfee0_0000 | apic::id() << 12);
        wr::<u32>(table + 4, 0);
        wr::<u32>(table + 8, apic::DEVICE_VECTOR as u32);
        wr::<u32>(table + 12, 0);
        let control = f.read32(msix);
        f.write32(msix, control | 1 << 31);
        wr::<u16>(common + MSIX_CONFIG, NO_VECTOR);

        // Queue 0.
        wr::<u16>(common + Q_SELECT, 0);
        if rd::<u16>(common + Q_SIZE) < QUEUE_SIZE {
            return Err("its queue is too small");
        }
        wr::<u16>(common + Q_SIZE, QUEUE_SIZE);
        wr::<u16>(common + Q_MSIX, 0);
        if rd::<u16>(common + Q_MSIX) != 0 {
            return Err("it refused MSI-X vector 0 for its queue");
        }
        let base = rings() as u64;
        wr::<u64>(common + Q_DESC, base);
        wr::<u64>(common + Q_AVAIL, base + AVAIL as u64);
        wr::<u64>(common + Q_USED, base + USED as u64);
        let notify = notify + multiplier * usize::from(rd::<u16>(common + Q_NOTIFY_OFF));
        wr::<u16>(common + Q_ENABLE, 1);
        wr::<u8>(
            common + STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        if rd::<u8>(common + STATUS) & 0x40 != 0 {
            return Err("it needs a reset after set-up");
        }
        Ok(Some(Device {
            notify,
            event_idx: chosen & F_EVENT_IDX != 0,
            next_avail: 0,
            used_seen: 0,
        }))
    }

    /// Fills `out` with the device's bytes: one request, one kick (if the device wants
    /// it), one interrupt. Returns how many bytes the device wrote.
    fn read(&mut self, out: &mut [u8]) -> Result<usize, &'static str> {
        let len = out.len().min(MAX_REQUEST);
        let buffer = BUFFER.0.get() as u64;
        let slot = usize::from(self.next_avail % QUEUE_SIZE);
        // Descriptor `slot`: the buffer, device-writable, alone.
        let d = rings().wrapping_add(16 * slot);
        wr::<u64>(d as usize, buffer);
        wr::<u32>(d as usize + 8, len as u32);
        wr::<u16>(d as usize + 12, DESC_F_WRITE);
        wr::<u16>(d as usize + 14, 0);
        wr(ring16(AVAIL + 4 + 2 * slot) as usize, slot as u16);
        let old = self.next_avail;
        self.next_avail = self.next_avail.wrapping_add(1);
        if self.event_idx {
            // Interrupt me as soon as this one is used.
            wr(
                ring16(AVAIL + 4 + 2 * usize::from(QUEUE_SIZE)) as usize,
                self.used_seen,
            );
        }
        fence(SeqCst);
        wr(ring16(AVAIL + 2) as usize, self.next_avail);
        fence(SeqCst);
        let kick = if self.event_idx {
            let event: u16 = rd(ring16(USED + 4 + 8 * usize::from(QUEUE_SIZE)) as usize);
            // vring_need_event: did the index pass the device's avail_event?
            self.next_avail.wrapping_sub(event).wrapping_sub(1) < self.next_avail.wrapping_sub(old)
        } else {
            rd::<u16>(ring16(USED) as usize) & 1 == 0
        };
        if kick {
            wr::<u16>(self.notify, 0);
        }

        // Completion is the device's interrupt: wait until the used index moved and the
        // interrupt for it was taken (a device faster than this CPU leaves it pending; the
        // first wait then takes it at once), so none is left over for the next request.
        let pvm = crate::heartbeat::pvm().load(Relaxed) != 0;
        let irqs = apic::DEVICE_IRQS.load(Relaxed);
        apic::set_timer(WATCHDOG_NS);
        let t0 = clock::now();
        while rd::<u16>(ring16(USED + 2) as usize) == self.used_seen
            || apic::DEVICE_IRQS.load(Relaxed) == irqs
        {
            if clock::now().saturating_sub(t0) > 2_000_000_000 {
                apic::set_timer(0);
                return Err("the device did not answer within 2 s");
            }
            let timer = apic::TIMER_IRQS.load(Relaxed);
            cpu::wait_for_interrupt(pvm);
            if apic::TIMER_IRQS.load(Relaxed) != timer {
                // The watchdog ended this wait; arm it for the next.
                apic::set_timer(WATCHDOG_NS);
            }
        }
        apic::set_timer(0);
        fence(Acquire);
        let elem = USED + 4 + 8 * usize::from(self.used_seen % QUEUE_SIZE);
        let written: u32 = rd(rings() as usize + elem + 4);
        self.used_seen = self.used_seen.wrapping_add(1);
        let n = (written as usize).min(len);
        for (i, b) in out[..n].iter_mut().enumerate() {
            *b = rd(buffer as usize + i);
        }
        Ok(n)
    }
}

/// Fills `out` from the virtio-rng device, setting it up on first use.
pub fn read(out: &mut [u8]) -> Result<usize, &'static str> {
    // SAFETY: only the boot CPU's shell calls this (see `Shared`).
    let state = unsafe { &mut *STATE.0.get() };
    if let State::Unprobed = state {
        *state = match Device::probe() {
            Ok(Some(d)) => State::Ready(d),
            Ok(None) => State::Absent,
            Err(e) => State::Failed(e),
        };
    }
    match state {
        State::Ready(d) => d.read(out),
        State::Absent => Err("no virtio-rng device"),
        State::Failed(e) => Err(e),
        State::Unprobed => Err("not probed"),
    }
}

/// (device interrupts, watchdog timer interrupts) taken so far.
pub fn interrupts() -> (u64, u64) {
    (
        apic::DEVICE_IRQS.load(Relaxed),
        apic::TIMER_IRQS.load(Relaxed),
    )
}
