//! The PCI bus: one bus of 32 slots, function 0 only, its configuration space reached by
//! mechanism #1 (ports 0xcf8/0xcfc) and by ECAM (a memory window, [`ecam`]) through one
//! path ([`ConfigAddress`] in, the device's [`ConfigSpace`] out), and the routing of BAR
//! accesses (MMIO exits) to the device that decodes them.
pub mod alloc;
pub mod config;
pub mod ecam;
pub mod msix;

use std::sync::{Arc, Mutex, MutexGuard};

pub use alloc::BarAllocator;
pub use config::{BarMove, ConfigSpace, PciId};
pub use ecam::{ConfigAddress, ConfigCounters, EcamWindow};

/// The configuration address port and the first of the four data ports.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
pub const CONFIG_DATA: u16 = 0xcfc;
const CONFIG_ENABLE: u32 = 1 << 31;
pub const SLOTS: usize = 32;

/// One PCI function.
pub trait PciDevice: Send {
    fn config(&self) -> &ConfigSpace;
    /// A guest's configuration write; reports a BAR the guest moved.
    fn write_config(&mut self, offset: usize, data: &[u8]) -> Option<BarMove>;
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn PciDevice>>;

fn lock(d: &SharedDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    // panic=abort: a poisoned lock cannot be observed; recover the data regardless.
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// The host bridge at 00:00.0: only an identity, so that guests find a PCI bus.
pub struct HostBridge(ConfigSpace);

impl Default for HostBridge {
    fn default() -> Self {
        Self(ConfigSpace::new(PciId {
            vendor: 0x1b36,
            device: 0x0008,
            class: [0x06, 0x00, 0x00],
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        }))
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.0
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) -> Option<BarMove> {
        self.0.write(offset, data)
    }
    fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// A BAR move that the VMM may need to follow (e.g. ioeventfds registered at the old
/// address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotBarMove {
    pub slot: usize,
    pub moved: BarMove,
}

/// Called when the guest moves a BAR (e.g. so that the VMM moves its ioeventfds along).
pub type BarMoveHook = Box<dyn Fn(SlotBarMove) + Send + Sync>;

/// Bus 0.
pub struct PciBus {
    address: Mutex<u32>,
    slots: Vec<Option<SharedDevice>>,
    on_bar_move: Option<BarMoveHook>,
    ecam: Option<EcamWindow>,
    counters: Arc<ConfigCounters>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with the host bridge in slot 0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<SharedDevice>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::default())));
        Self {
            address: Mutex::new(0),
            slots,
            on_bar_move: None,
            ecam: None,
            counters: Arc::default(),
        }
    }

    /// Serves configuration space in `window` too (MMIO), besides the ports. The window
    /// takes precedence over a BAR a guest moved on top of it.
    pub fn set_ecam(&mut self, window: EcamWindow) {
        self.ecam = Some(window);
    }

    pub fn ecam(&self) -> Option<EcamWindow> {
        self.ecam
    }

    /// Configuration accesses served so far, by mechanism.
    pub fn counters(&self) -> &Arc<ConfigCounters> {
        &self.counters
    }

    /// `hook` hears of every BAR the guest moves, after the move.
    pub fn on_bar_move(&mut self, hook: BarMoveHook) {
        self.on_bar_move = Some(hook);
    }

    /// Plugs `device` into the first free slot and returns the slot.
    pub fn add(&mut self, device: SharedDevice) -> Option<usize> {
        let slot = self.slots.iter().position(Option::is_none)?;
        self.slots[slot] = Some(device);
        Some(slot)
    }

    fn latch(&self) -> MutexGuard<'_, u32> {
        self.address.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The register the latched address and data port `port` select, if enabled.
    fn selected(&self, port: u16) -> Option<ConfigAddress> {
        let address = *self.latch();
        if address & CONFIG_ENABLE == 0 {
            return None;
        }
        Some(ConfigAddress {
            bus: (address >> 16) as u8,
            slot: ((address >> 11) & 0x1f) as u8,
            function: ((address >> 8) & 0x7) as u8,
            offset: (address & 0xfc) as u16 + (port - CONFIG_DATA),
        })
    }

    /// The function at `at`, if one is plugged in: bus 0, function 0 of a slot.
    fn function(&self, at: ConfigAddress) -> Option<&SharedDevice> {
        if at.bus != 0 || at.function != 0 {
            return None;
        }
        self.slots.get(usize::from(at.slot))?.as_ref()
    }

    /// Reads a register, for either mechanism; absent functions read as all-ones.
    pub fn read_config(&self, at: ConfigAddress, data: &mut [u8]) {
        match self.function(at) {
            Some(device) => lock(device).config().read(usize::from(at.offset), data),
            None => data.fill(0xff),
        }
    }

    /// Writes a register, for either mechanism; writes to absent functions are dropped.
    /// A BAR the write moved is logged, handed to the [`on_bar_move`](Self::on_bar_move)
    /// hook and returned.
    pub fn write_config(&self, at: ConfigAddress, data: &[u8]) -> Option<SlotBarMove> {
        let device = self.function(at)?;
        let moved = lock(device).write_config(usize::from(at.offset), data)?;
        let event = SlotBarMove {
            slot: usize::from(at.slot),
            moved,
        };
        tracing::info!(
            "the guest moved BAR {} of PCI slot {} from {:#x} to {:#x}",
            moved.bar,
            event.slot,
            moved.from,
            moved.to
        );
        if let Some(hook) = &self.on_bar_move {
            hook(event);
        }
        Some(event)
    }

    /// Whether `port` is one of the bus's ports.
    pub fn owns_port(port: u16) -> bool {
        (CONFIG_ADDRESS..CONFIG_DATA + 4).contains(&port)
    }

    pub fn read_port(&self, port: u16, data: &mut [u8]) {
        ConfigCounters::bump(&self.counters.ports);
        match port {
            CONFIG_ADDRESS if data.len() == 4 => {
                data.copy_from_slice(&self.latch().to_le_bytes());
            }
            CONFIG_DATA..=0xcff => match self.selected(port) {
                Some(at) => self.read_config(at, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    pub fn write_port(&self, port: u16, data: &[u8]) -> Option<SlotBarMove> {
        ConfigCounters::bump(&self.counters.ports);
        match port {
            CONFIG_ADDRESS => {
                if let &[a, b, c, d] = data {
                    *self.latch() = u32::from_le_bytes([a, b, c, d]);
                }
                None
            }
            CONFIG_DATA..=0xcff => self.write_config(self.selected(port)?, data),
            _ => None,
        }
    }

    /// The register an access inside the ECAM window selects; a malformed access is
    /// counted and logged (sparingly) and selects none.
    fn ecam_register(&self, window: EcamWindow, addr: u64, len: usize) -> Option<ConfigAddress> {
        ConfigCounters::bump(&self.counters.ecam);
        match window.decode(addr, len) {
            Ok(at) => Some(at),
            Err(why) => {
                let n = ConfigCounters::bump(&self.counters.bad);
                if ecam::worth_logging(n) {
                    tracing::warn!(
                        "the guest made {why} in the PCI ECAM window at {addr:#x}: reads \
                         all-ones, writes ignored ({n} such accesses so far)"
                    );
                }
                None
            }
        }
    }

    /// Serves an MMIO read if the ECAM window or a BAR decodes `addr`; false if none
    /// does.
    pub fn read_mmio(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some(w) = self.ecam.filter(|w| w.contains(addr)) {
            match self.ecam_register(w, addr, data.len()) {
                Some(at) => self.read_config(at, data),
                None => data.fill(0xff),
            }
            return true;
        }
        for device in self.slots.iter().flatten() {
            let mut d = lock(device);
            if let Some((bar, offset)) = d.config().bar_at(addr, data.len() as u64) {
                d.read_bar(bar, offset, data);
                return true;
            }
        }
        false
    }

    /// Serves an MMIO write if the ECAM window or a BAR decodes `addr`; false if none
    /// does.
    pub fn write_mmio(&self, addr: u64, data: &[u8]) -> bool {
        if let Some(w) = self.ecam.filter(|w| w.contains(addr)) {
            if let Some(at) = self.ecam_register(w, addr, data.len()) {
                self.write_config(at, data);
            }
            return true;
        }
        for device in self.slots.iter().flatten() {
            let mut d = lock(device);
            if let Some((bar, offset)) = d.config().bar_at(addr, data.len() as u64) {
                d.write_bar(bar, offset, data);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Probe {
        config: ConfigSpace,
        writes: Vec<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Probe {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) -> Option<BarMove> {
            self.config.write(offset, data)
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) ^ offset as u8);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.writes.push((bar, offset, data.to_vec()));
        }
    }

    fn address(slot: u32, function: u32, offset: u32) -> [u8; 4] {
        (CONFIG_ENABLE | slot << 11 | function << 8 | offset).to_le_bytes()
    }

    fn bus_with_probe() -> (PciBus, Arc<Mutex<Probe>>) {
        let mut config = ConfigSpace::new(PciId::TEST);
        config.add_bar(0, 0x4000, 0xc000_0000);
        let probe = Arc::new(Mutex::new(Probe {
            config,
            writes: Vec::new(),
        }));
        let mut bus = PciBus::new();
        assert_eq!(bus.add(probe.clone()), Some(1));
        (bus, probe)
    }

    #[test]
    fn config_mechanism_one_finds_devices_and_absent_slots_read_all_ones() {
        let (bus, _) = bus_with_probe();
        let mut id = [0; 4];
        bus.write_port(CONFIG_ADDRESS, &address(0, 0, 0));
        bus.read_port(CONFIG_DATA, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36, "host bridge");
        bus.write_port(CONFIG_ADDRESS, &address(1, 0, 0));
        bus.read_port(CONFIG_DATA, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
        // Byte and word reads at the data port's other addresses.
        let mut hi = [0; 2];
        bus.read_port(CONFIG_DATA + 2, &mut hi);
        assert_eq!(u16::from_le_bytes(hi), 0x1044);
        for (slot, function) in [(2, 0), (1, 1), (31, 7)] {
            bus.write_port(CONFIG_ADDRESS, &address(slot, function, 0));
            bus.read_port(CONFIG_DATA, &mut id);
            assert_eq!(id, [0xff; 4], "slot {slot} function {function}");
        }
        // Without the enable bit nothing is selected.
        bus.write_port(CONFIG_ADDRESS, &(1u32 << 11).to_le_bytes());
        bus.read_port(CONFIG_DATA, &mut id);
        assert_eq!(id, [0xff; 4]);
        let mut latch = [0; 4];
        bus.read_port(CONFIG_ADDRESS, &mut latch);
        assert_eq!(u32::from_le_bytes(latch), 1 << 11);
    }

    #[test]
    fn bar_accesses_reach_the_device_only_while_decoding() {
        let (mut bus, probe) = bus_with_probe();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        bus.on_bar_move(Box::new(move |m| h.lock().unwrap().push(m)));
        let mut b = [0; 4];
        assert!(!bus.read_mmio(0xc000_0010, &mut b), "memory decoding off");
        bus.write_port(CONFIG_ADDRESS, &address(1, 0, 4));
        bus.write_port(CONFIG_DATA, &2u16.to_le_bytes());
        assert!(bus.read_mmio(0xc000_0010, &mut b));
        assert_eq!(b, [0x10; 4]);
        assert!(bus.write_mmio(0xc000_3000, &[1, 2]));
        assert!(!bus.write_mmio(0xc000_4000, &[1]));
        assert_eq!(probe.lock().unwrap().writes, vec![(0, 0x3000, vec![1, 2])]);
        // Moving the BAR is reported and followed.
        bus.write_port(CONFIG_ADDRESS, &address(1, 0, 0x10));
        let moved = bus.write_port(CONFIG_DATA, &0xd000_0000u32.to_le_bytes());
        assert_eq!(
            moved,
            Some(SlotBarMove {
                slot: 1,
                moved: BarMove {
                    bar: 0,
                    from: 0xc000_0000,
                    to: 0xd000_0000
                }
            })
        );
        assert!(bus.read_mmio(0xd000_0000, &mut b));
        assert!(!bus.read_mmio(0xc000_0000, &mut b));
        assert_eq!(*heard.lock().unwrap(), vec![moved.unwrap()]);
    }

    const ECAM: u64 = 0xfe00_0000;

    fn ecam(slot: u64, function: u64, offset: u64) -> u64 {
        ECAM | slot << 15 | function << 12 | offset
    }

    fn bus_with_ecam() -> (PciBus, Arc<Mutex<Probe>>) {
        let (mut bus, probe) = bus_with_probe();
        bus.set_ecam(EcamWindow::new(ECAM, 1).unwrap());
        (bus, probe)
    }

    #[test]
    fn ecam_reads_what_the_ports_read_in_one_access() {
        let (bus, _) = bus_with_ecam();
        for slot in [0u32, 1, 2, 31] {
            for offset in (0..256u32).step_by(4) {
                let mut by_port = [0; 4];
                bus.write_port(CONFIG_ADDRESS, &address(slot, 0, offset));
                bus.read_port(CONFIG_DATA, &mut by_port);
                let mut by_ecam = [0; 4];
                assert!(bus.read_mmio(ecam(slot.into(), 0, offset.into()), &mut by_ecam));
                assert_eq!(by_ecam, by_port, "slot {slot} offset {offset:#x}");
            }
        }
        let mut id = [0; 4];
        bus.read_mmio(ecam(1, 0, 0), &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
        // Byte and word reads, other functions, and the extended space past 256 bytes.
        let mut w = [0; 2];
        bus.read_mmio(ecam(1, 0, 2), &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1044);
        let mut b = [0; 1];
        bus.read_mmio(ecam(0, 0, 0xb), &mut b);
        assert_eq!(b, [0x06], "host bridge class");
        for addr in [
            ecam(1, 1, 0),
            ecam(2, 0, 0),
            ecam(1, 0, 0x100),
            ecam(31, 7, 0xffc),
        ] {
            bus.read_mmio(addr, &mut id);
            assert_eq!(id, [0xff; 4], "{addr:#x}");
        }
        let c = bus.counters();
        assert_eq!(
            ConfigCounters::get(&c.ports),
            2 * 4 * 64,
            "latch + data per read"
        );
        assert_eq!(ConfigCounters::get(&c.ecam), 4 * 64 + 1 + 1 + 1 + 4);
        assert_eq!(ConfigCounters::get(&c.bad), 0);
    }

    #[test]
    fn ecam_writes_take_the_port_path_bar_moves_included() {
        let (mut bus, probe) = bus_with_ecam();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        bus.on_bar_move(Box::new(move |m| h.lock().unwrap().push(m)));
        // Memory decoding on through ECAM: the BAR answers.
        assert!(bus.write_mmio(ecam(1, 0, 4), &2u16.to_le_bytes()));
        let mut b = [0; 4];
        assert!(bus.read_mmio(0xc000_0010, &mut b));
        assert_eq!(probe.lock().unwrap().config.command(), 2);
        // BAR sizing through ECAM, then a move.
        bus.write_mmio(ecam(1, 0, 0x10), &u32::MAX.to_le_bytes());
        bus.read_mmio(ecam(1, 0, 0x10), &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xffff_c000, "16 KiB");
        bus.write_mmio(ecam(1, 0, 0x10), &0xd000_0000u32.to_le_bytes());
        assert!(bus.read_mmio(0xd000_0000, &mut b));
        let heard = heard.lock().unwrap();
        assert_eq!(heard.len(), 2);
        assert_eq!(
            heard[1],
            SlotBarMove {
                slot: 1,
                moved: BarMove {
                    bar: 0,
                    from: 0xffff_c000,
                    to: 0xd000_0000
                }
            }
        );
        // Writes to absent functions go nowhere.
        bus.write_mmio(ecam(1, 3, 4), &2u16.to_le_bytes());
        bus.write_mmio(ecam(5, 0, 4), &2u16.to_le_bytes());
        assert_eq!(ConfigCounters::get(&bus.counters().ports), 0);
    }

    #[test]
    fn malformed_ecam_accesses_read_all_ones_and_change_nothing() {
        let (bus, probe) = bus_with_ecam();
        let mut four = [0; 4];
        assert!(
            bus.read_mmio(ecam(1, 0, 2), &mut four),
            "the window claims it"
        );
        assert_eq!(four, [0xff; 4], "unaligned");
        let mut eight = [0; 8];
        bus.read_mmio(ecam(1, 0, 0), &mut eight);
        assert_eq!(eight, [0xff; 8], "8 bytes");
        bus.write_mmio(ecam(1, 0, 3), &0x0202u16.to_le_bytes());
        bus.write_mmio(ecam(1, 0, 4), &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(probe.lock().unwrap().config.command(), 0);
        assert_eq!(ConfigCounters::get(&bus.counters().bad), 4);
        // Past the window: not ours (a BAR, or nothing).
        assert!(!bus.read_mmio(ECAM + (1 << 20), &mut four));
        assert!(probe.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn without_a_window_its_addresses_are_plain_mmio() {
        let (bus, _) = bus_with_probe();
        let mut id = [0; 4];
        assert!(!bus.read_mmio(ecam(1, 0, 0), &mut id));
        assert!(!bus.write_mmio(ecam(1, 0, 4), &[2, 0]));
        assert_eq!(ConfigCounters::get(&bus.counters().ecam), 0);
    }
}
