//! The virtio-pci modern transport (virtio 1.2 §4.1): one 32-bit memory BAR holding the
//! common configuration, ISR, device configuration, notification and MSI-X regions, each
//! described by a vendor capability in configuration space. Interrupts are MSI-X only (no
//! INTx pin).
//!
//! ```text
//! status:  0 ─ACKNOWLEDGE─▶ 1 ─DRIVER─▶ 3 ─FEATURES_OK (checked)─▶ 11 ─DRIVER_OK─▶ 15
//!          any state ─write 0─▶ reset; a fault of the guest's making ─▶ | NEEDS_RESET
//! ```
//! Guest mistakes (unoffered features, DRIVER_OK before FEATURES_OK, a queue whose rings
//! are not in guest memory, a runaway available index) log a warning and set
//! NEEDS_RESET with a configuration-change interrupt; malformed requests fail alone.
use std::sync::{Arc, Mutex};

use ray_memory::GuestMemory;

use super::completer::{Completer, DeviceContext, InFlight, Transport, Used};
use super::queue::Queue;
use super::{
    serve_queue_holding, status, VirtioDevice, WarnLimit, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1,
};
use crate::interrupt::MsiInterrupts;
use crate::pci::config::{ConfigSpace, PciId};
use crate::pci::msix::{Msix, MsixState};
use crate::pci::{BarMove, PciDevice};
use crate::persist::Persist;

pub const VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + the virtio device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;
pub const NO_VECTOR: u16 = 0xffff;

/// The BAR and its regions; each region has its own page.
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
pub const ISR: u64 = 0x1000;
pub const DEVICE_CONFIG: u64 = 0x2000;
pub const NOTIFY: u64 = 0x3000;
/// Queue `q` is notified by a write at `NOTIFY + q * NOTIFY_MULTIPLIER`.
pub const NOTIFY_MULTIPLIER: u64 = 4;
pub const MSIX_TABLE: u64 = 0x4000;
pub const MSIX_PBA: u64 = 0x5000;
const REGION_LEN: u64 = 0x1000;

/// Capability types (`cfg_type`).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;

/// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// The transport's registers as the guest set them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Registers {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub queue_select: u16,
    pub msix_config: u16,
    pub queue_vectors: Vec<u16>,
    pub config_generation: u8,
    pub isr: u8,
}

impl Registers {
    fn new(queues: usize) -> Self {
        Self {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            msix_config: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; queues],
            config_generation: 0,
            isr: 0,
        }
    }
}

/// Everything of a virtio-pci function a snapshot or migration carries.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioPciState {
    pub device_type: u16,
    /// Configuration-space bytes the guest can change (command, BARs, MSI-X control, ...).
    pub config: Vec<(u8, u8)>,
    pub registers: Registers,
    pub queues: Vec<Queue>,
    pub msix: MsixState,
    /// The device model's own part ([`VirtioDevice::save_device`]).
    #[serde(default)]
    pub device: serde_json::Value,
}

pub type Memory = Arc<dyn GuestMemory + Send + Sync>;

pub struct VirtioPci {
    name: &'static str,
    config: ConfigSpace,
    msix_cap: usize,
    device: Box<dyn VirtioDevice>,
    memory: Memory,
    msix: Msix,
    regs: Registers,
    queues: Vec<Queue>,
    /// While paused (the VM is being saved) kicks are remembered, not served.
    paused: bool,
    kicked: Vec<bool>,
    warn: WarnLimit,
    /// Requests the device answered `Pending` to and has not completed.
    in_flight: Arc<InFlight>,
}

fn virtio_cap(cfg_type: u8, offset: u64, len: u64, extra: Option<u32>) -> Vec<u8> {
    let cap_len = if extra.is_some() { 20 } else { 16 };
    let mut c = vec![CAP_VENDOR, 0, cap_len, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(len as u32).to_le_bytes());
    if let Some(x) = extra {
        c.extend_from_slice(&x.to_le_bytes());
    }
    c
}

impl VirtioPci {
    /// A function for `device` with its BAR at `bar_address` (from the BAR allocator).
    pub fn new(
        name: &'static str,
        device: Box<dyn VirtioDevice>,
        memory: Memory,
        irq: Arc<dyn MsiInterrupts>,
        bar_address: u32,
    ) -> Self {
        let queues: Vec<Queue> = device
            .queue_sizes()
            .iter()
            .map(|&s| Queue::new(s))
            .collect();
        let vectors = queues.len() as u16 + 1;
        let mut config = ConfigSpace::new(PciId {
            vendor: VENDOR_ID,
            device: DEVICE_ID_BASE + device.device_type(),
            class: [0xff, 0x00, 0x00],
            revision: 1,
            subsystem_vendor: VENDOR_ID,
            subsystem: 0x40,
        });
        config.add_bar(0, BAR_SIZE, bar_address);
        config.add_capability(&virtio_cap(CAP_COMMON, COMMON, COMMON_LEN, None), &[]);
        config.add_capability(
            &virtio_cap(
                CAP_NOTIFY,
                NOTIFY,
                NOTIFY_MULTIPLIER * queues.len() as u64,
                Some(NOTIFY_MULTIPLIER as u32),
            ),
            &[],
        );
        config.add_capability(&virtio_cap(CAP_ISR, ISR, 1, None), &[]);
        if device.config_len() > 0 {
            config.add_capability(
                &virtio_cap(CAP_DEVICE, DEVICE_CONFIG, device.config_len(), None),
                &[],
            );
        }
        let mut msix = vec![CAP_MSIX, 0];
        msix.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes());
        msix.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        let msix_cap = config.add_capability(&msix, &[0, 0, 0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let n = queues.len();
        Self {
            name,
            config,
            msix_cap,
            device,
            memory,
            msix: Msix::new(vectors, irq),
            regs: Registers::new(n),
            queues,
            paused: false,
            kicked: vec![false; n],
            warn: WarnLimit::default(),
            in_flight: Arc::default(),
        }
    }

    /// Shares the transport between the vCPU (MMIO), notifier and device threads, and
    /// hands the device its [`DeviceContext`].
    pub fn share(self) -> Arc<Mutex<VirtioPci>> {
        let in_flight = self.in_flight.clone();
        let memory = self.memory.clone();
        let shared = Arc::new(Mutex::new(self));
        let weak = Arc::downgrade(&shared);
        let completer = Completer::new(weak, in_flight);
        shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .device
            .activate(DeviceContext { memory, completer });
        shared
    }

    /// The count of requests the device is still working on (pausing waits for zero).
    pub fn in_flight(&self) -> Arc<InFlight> {
        self.in_flight.clone()
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The BAR's base address (where the guest or the allocator put it).
    pub fn bar_address(&self) -> u64 {
        self.config.bar_address(0).unwrap_or(0)
    }

    /// Where the guest writes to notify queue `q` (an ioeventfd can catch it there).
    pub fn notify_address(&self, q: usize) -> u64 {
        self.bar_address() + NOTIFY + NOTIFY_MULTIPLIER * q as u64
    }

    pub fn status(&self) -> u8 {
        self.regs.status
    }

    fn offered(&self) -> u64 {
        self.device.features() | F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC
    }

    fn warn(&mut self, message: std::fmt::Arguments<'_>) {
        self.warn.warn(self.name, message);
    }

    /// A fault of the guest's making: the device stops until the driver resets it.
    fn needs_reset(&mut self, why: std::fmt::Arguments<'_>) {
        self.warn(format_args!("{why}; the device needs a reset"));
        if self.regs.status & status::NEEDS_RESET == 0 {
            self.regs.status |= status::NEEDS_RESET;
            self.regs.config_generation = self.regs.config_generation.wrapping_add(1);
            self.regs.isr |= ISR_CONFIG;
            let v = self.regs.msix_config;
            self.fire(v);
        }
    }

    /// Without MSI-X enabled (or a vector) there is no way to interrupt, as there is no
    /// INTx pin; the ISR still says why, for a polling driver.
    fn fire(&mut self, vector: u16) {
        if vector != NO_VECTOR {
            self.msix.fire(vector);
        }
    }

    fn reset(&mut self) {
        self.take_back();
        self.regs = Registers::new(self.queues.len());
        for q in &mut self.queues {
            q.reset();
        }
        self.kicked.iter_mut().for_each(|k| *k = false);
        self.device.reset();
    }

    fn set_status(&mut self, value: u8) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.regs.status;
        if value & old != old {
            self.warn(format_args!(
                "the driver cleared status bits ({old:#x} -> {value:#x}) without a reset; ignored"
            ));
            return;
        }
        let mut value = value;
        let new = value & !old;
        if new & FEATURES_OK != 0 {
            let (chose, offered) = (self.regs.driver_features, self.offered());
            if chose & !offered != 0 || chose & F_VERSION_1 == 0 {
                self.warn(format_args!(
                    "feature negotiation refused: the driver chose {chose:#x}, offered {offered:#x} (VERSION_1 is required)"
                ));
                value &= !FEATURES_OK;
            }
        }
        if new & DRIVER_OK != 0 && value & FEATURES_OK == 0 {
            self.regs.status = value & !DRIVER_OK;
            self.needs_reset(format_args!("the driver set DRIVER_OK before FEATURES_OK"));
            return;
        }
        self.regs.status = value;
        if new & DRIVER_OK != 0 {
            // Buffers made available before DRIVER_OK are served now.
            for q in 0..self.queues.len() {
                self.notify(q as u16);
            }
        }
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.regs.queue_select))
    }

    fn common_read(&self, offset: u64, len: usize) -> u64 {
        let r = &self.regs;
        let q = self.selected();
        let features = |select: u32, f: u64| match select {
            0 => f & 0xffff_ffff,
            1 => f >> 32,
            _ => 0,
        };
        let addr = |f: fn(&Queue) -> u64| q.map_or(0, f);
        match (offset, len) {
            (0x00, 4) => u64::from(r.device_feature_select),
            (0x04, 4) => features(r.device_feature_select, self.offered()),
            (0x08, 4) => u64::from(r.driver_feature_select),
            (0x0c, 4) => features(r.driver_feature_select, r.driver_features),
            (0x10, 2) => u64::from(r.msix_config),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(r.status),
            (0x15, 1) => u64::from(r.config_generation),
            (0x16, 2) => u64::from(r.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size)),
            (0x1a, 2) => r
                .queue_vectors
                .get(usize::from(r.queue_select))
                .map_or(u64::from(NO_VECTOR), |&v| u64::from(v)),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.ready)),
            (0x1e, 2) => q.map_or(0, |_| u64::from(r.queue_select)),
            (0x20, 8) => addr(|q| q.desc),
            (0x20, 4) => addr(|q| q.desc) & 0xffff_ffff,
            (0x24, 4) => addr(|q| q.desc) >> 32,
            (0x28, 8) => addr(|q| q.avail),
            (0x28, 4) => addr(|q| q.avail) & 0xffff_ffff,
            (0x2c, 4) => addr(|q| q.avail) >> 32,
            (0x30, 8) => addr(|q| q.used),
            (0x30, 4) => addr(|q| q.used) & 0xffff_ffff,
            (0x34, 4) => addr(|q| q.used) >> 32,
            _ => 0,
        }
    }

    /// A vector the guest chose: one of the table's, or NO_VECTOR (which the driver reads
    /// back to learn that its choice was refused).
    fn vector(&self, v: u64) -> u16 {
        match u16::try_from(v) {
            Ok(v) if v < self.msix.vectors() => v,
            _ => NO_VECTOR,
        }
    }

    fn common_write(&mut self, offset: u64, len: usize, value: u64) {
        let driver_ok = self.regs.status & status::DRIVER_OK != 0;
        let sel = usize::from(self.regs.queue_select);
        match (offset, len) {
            (0x00, 4) => self.regs.device_feature_select = value as u32,
            (0x08, 4) => self.regs.driver_feature_select = value as u32,
            (0x0c, 4) => {
                if self.regs.status & status::FEATURES_OK != 0 {
                    self.warn(format_args!(
                        "the driver changed features after FEATURES_OK; ignored"
                    ));
                    return;
                }
                let f = &mut self.regs.driver_features;
                match self.regs.driver_feature_select {
                    0 => *f = (*f & !0xffff_ffff) | value,
                    1 => *f = (*f & 0xffff_ffff) | value << 32,
                    _ => {}
                }
            }
            (0x10, 2) => self.regs.msix_config = self.vector(value),
            (0x14, 1) => self.set_status(value as u8),
            (0x16, 2) => self.regs.queue_select = value as u16,
            (0x1a, 2) => {
                let v = self.vector(value);
                if let Some(slot) = self.regs.queue_vectors.get_mut(sel) {
                    *slot = v;
                }
            }
            (0x18, 2) | (0x1c, 2) | (0x20..=0x37, _) => {
                let Some(q) = self.queues.get_mut(sel) else {
                    return;
                };
                if q.ready || driver_ok {
                    self.warn(format_args!(
                        "the driver changed queue {sel} at {offset:#x} while it is enabled; ignored"
                    ));
                    return;
                }
                let set = |field: &mut u64| match (offset % 8, len) {
                    (0, 8) => *field = value,
                    (0, 4) => *field = (*field & !0xffff_ffff) | value,
                    (4, 4) => *field = (*field & 0xffff_ffff) | value << 32,
                    _ => {}
                };
                match offset {
                    0x18 => q.size = value as u16,
                    0x1c if value == 1 => self.enable_queue(sel),
                    0x20..=0x27 => set(&mut q.desc),
                    0x28..=0x2f => set(&mut q.avail),
                    0x30..=0x37 => set(&mut q.used),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn enable_queue(&mut self, sel: usize) {
        let event_idx = self.regs.driver_features & F_EVENT_IDX != 0;
        let indirect = self.regs.driver_features & F_INDIRECT_DESC != 0;
        let q = &mut self.queues[sel];
        q.event_idx = event_idx;
        q.indirect = indirect;
        match q.validate(&*self.memory) {
            Ok(()) => q.ready = true,
            Err(e) => self.needs_reset(format_args!("queue {sel} cannot be enabled: {e}")),
        }
    }

    /// The guest notified queue `q` (an MMIO write, or the ioeventfd of its address).
    pub fn notify(&mut self, q: u16) {
        let q = usize::from(q);
        if q >= self.queues.len() {
            self.warn(format_args!(
                "notification of queue {q}, which does not exist"
            ));
            return;
        }
        if self.paused {
            self.kicked[q] = true;
            return;
        }
        let live = status::DRIVER_OK;
        if self.regs.status & (live | status::NEEDS_RESET) != live || !self.queues[q].ready {
            return;
        }
        if !self.config.bus_master() {
            self.warn(format_args!(
                "queue {q} notified while bus mastering is off; ignored"
            ));
            return;
        }
        self.process(q);
    }

    /// Serves every available request of queue `q`, then interrupts once if the driver
    /// wants it: a batch of requests costs one interrupt.
    fn process(&mut self, q: usize) {
        if self.serve(q) {
            self.interrupt_if_wanted(q);
        }
    }

    /// Serves every available request of queue `q` (a ring fault needs a reset); says
    /// whether used entries were added.
    fn serve(&mut self, q: usize) -> bool {
        let memory = self.memory.clone();
        let hold_at = self.device.hold_kicks_at();
        let served = serve_queue_holding(
            &mut self.queues[q],
            q,
            &mut *self.device,
            &*memory,
            &self.in_flight,
            &mut |m| self.warn.warn(self.name, m),
            hold_at,
        );
        if let Some(e) = served.fault {
            self.needs_reset(format_args!("queue {q}: {e}"));
        }
        served.used
    }

    /// Interrupts the driver for the used entries of queue `q` if it asked for them.
    fn interrupt_if_wanted(&mut self, q: usize) {
        match self.queues[q].needs_interrupt(&*self.memory) {
            Ok(true) => {
                self.regs.isr |= ISR_QUEUE;
                let v = self.regs.queue_vectors[q];
                self.fire(v);
            }
            Ok(false) => {}
            Err(e) => self.needs_reset(format_args!("queue {q}: {e}")),
        }
    }

    /// Publishes requests the device completed on its own thread (see [`Completer`]):
    /// one batch, at most one interrupt. Completions for a queue the driver has reset
    /// meanwhile, or for requests taken before a reset, are dropped.
    fn complete_used(&mut self, queue: u16, done: &[Used]) {
        let q = usize::from(queue);
        let live =
            self.regs.status & (status::DRIVER_OK | status::NEEDS_RESET) == status::DRIVER_OK;
        if !live || !self.queues.get(q).is_some_and(|q| q.ready) {
            return;
        }
        let mut used = match self.queues[q].add_completed(&*self.memory, done) {
            Ok(used) => used,
            Err(e) => return self.needs_reset(format_args!("queue {q}: {e}")),
        };
        // A device that holds kicks back while busy takes what the driver added since
        // (see `VirtioDevice::hold_kicks_at`), with the same interrupt as the completions.
        if self.device.hold_kicks_at() > 0 {
            if self.paused {
                self.kicked[q] = true;
            } else if self.config.bus_master() {
                used |= self.serve(q);
            }
        }
        if used {
            self.interrupt_if_wanted(q);
        }
    }

    /// Stops serving kicks (they are remembered) while the VM's state is saved.
    /// Requests already pending still complete: see [`in_flight`](Self::in_flight).
    pub fn pause(&mut self) {
        self.paused = true;
        self.device.pause();
        self.take_back();
    }

    /// Puts the requests the device holds idle back in the available ring; they are
    /// popped again when the queue is next served.
    fn take_back(&mut self) {
        for (q, n) in self.device.give_back() {
            if let Some(queue) = self.queues.get_mut(q) {
                queue.rewind(n);
                self.kicked[q] = true;
            }
            self.in_flight.done(usize::from(n));
        }
    }

    /// Serves the kicks that came while paused.
    pub fn resume(&mut self) {
        self.paused = false;
        self.device.resume();
        for q in 0..self.queues.len() {
            if std::mem::take(&mut self.kicked[q]) {
                self.notify(q as u16);
            }
        }
    }
}

impl Transport for VirtioPci {
    fn complete(&mut self, queue: u16, done: &[Used]) {
        self.complete_used(queue, done)
    }

    fn config_changed(&mut self) {
        self.regs.config_generation = self.regs.config_generation.wrapping_add(1);
        self.regs.isr |= ISR_CONFIG;
        let v = self.regs.msix_config;
        self.fire(v);
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) -> Option<BarMove> {
        let moved = self.config.write(offset, data);
        let control = self.msix_cap + 2;
        if offset < control + 2 && offset + data.len() > control {
            self.msix.set_control(self.config.u16_at(control));
        }
        moved
    }

    fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        let region = offset & !(REGION_LEN - 1);
        let off = offset - region;
        match region {
            COMMON => {
                let v = self.common_read(off, data.len()).to_le_bytes();
                let n = data.len().min(8);
                data[..n].copy_from_slice(&v[..n]);
            }
            ISR => {
                data.fill(0);
                // Reading the ISR acknowledges it.
                data[0] = std::mem::take(&mut self.regs.isr);
            }
            DEVICE_CONFIG => self.device.read_config(off, data),
            MSIX_TABLE => self.msix.read_table(off, data),
            MSIX_PBA => self.msix.read_pba(off, data),
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        let region = offset & !(REGION_LEN - 1);
        let off = offset - region;
        match region {
            COMMON if data.len() <= 8 => {
                let mut v = [0u8; 8];
                v[..data.len()].copy_from_slice(data);
                self.common_write(off, data.len(), u64::from_le_bytes(v));
            }
            NOTIFY if off.is_multiple_of(NOTIFY_MULTIPLIER) => {
                if let Ok(q) = u16::try_from(off / NOTIFY_MULTIPLIER) {
                    self.notify(q);
                }
            }
            MSIX_TABLE => self.msix.write_table(off, data),
            DEVICE_CONFIG => self.device.write_config(off, data),
            _ => {}
        }
    }
}

impl Persist for VirtioPci {
    type State = VirtioPciState;
    type Error = String;

    fn save_state(&self) -> Result<VirtioPciState, String> {
        Ok(VirtioPciState {
            device_type: self.device.device_type(),
            config: self.config.guest_bytes(),
            registers: self.regs.clone(),
            queues: self.queues.clone(),
            msix: self.msix.state(),
            device: self.device.save_device(),
        })
    }

    /// Checks `state` against this device (type, queues, features, vectors, rings in guest
    /// memory), then takes it over. The device comes back paused with every enabled queue
    /// marked kicked: [`resume`](VirtioPci::resume), once the vCPUs are back, serves
    /// whatever the guest queued meanwhile.
    fn restore_state(&mut self, s: &VirtioPciState) -> Result<(), String> {
        let name = self.name;
        if s.device_type != self.device.device_type() {
            return Err(format!(
                "{name}: saved state is of virtio device type {}, this is type {}",
                s.device_type,
                self.device.device_type()
            ));
        }
        if s.queues.len() != self.queues.len()
            || s.registers.queue_vectors.len() != self.queues.len()
        {
            return Err(format!(
                "{name}: saved state has {} queues; this device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        let unknown = s.registers.driver_features & !self.offered();
        if unknown != 0 {
            return Err(format!(
                "{name}: saved features include unoffered bits {unknown:#x}"
            ));
        }
        for (i, (q, mine)) in s.queues.iter().zip(&self.queues).enumerate() {
            if q.max_size != mine.max_size {
                return Err(format!(
                    "{name}: saved queue {i} has maximum size {}; this device's is {}",
                    q.max_size, mine.max_size
                ));
            }
            if q.ready {
                q.validate(&*self.memory)
                    .map_err(|e| format!("{name}: saved queue {i}: {e}"))?;
            }
        }
        let vectors = self.msix.vectors();
        let bad = |v: u16| v != NO_VECTOR && v >= vectors;
        if bad(s.registers.msix_config) || s.registers.queue_vectors.iter().any(|&v| bad(v)) {
            return Err(format!(
                "{name}: saved state names an MSI-X vector beyond {vectors}"
            ));
        }
        self.device
            .check_device(&s.device)
            .map_err(|e| format!("{name}: {e}"))?;
        let mut config = self.config.clone();
        config
            .restore_guest_bytes(&s.config)
            .map_err(|e| format!("{name}: {e}"))?;
        self.msix
            .restore(&s.msix)
            .map_err(|e| format!("{name}: {e}"))?;
        self.device
            .restore_device(&s.device, &*self.memory)
            .map_err(|e| format!("{name}: {e}"))?;
        self.config = config;
        self.regs = s.registers.clone();
        self.queues = s.queues.clone();
        self.paused = true;
        self.kicked = self.queues.iter().map(|q| q.ready).collect();
        self.device.restored();
        Ok(())
    }
}

#[cfg(test)]
#[path = "pci_tests.rs"]
mod tests;
