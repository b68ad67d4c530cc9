//! The PCI bus: configuration mechanism #1 (ports 0xcf8/0xcfc), one bus of 32 slots,
//! function 0 only, and the routing of BAR accesses (MMIO exits) to the device that
//! decodes them.
pub mod alloc;
pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex, MutexGuard};

pub use alloc::BarAllocator;
pub use config::{BarMove, ConfigSpace, PciId};

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
        }
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

    /// The device and register offset the latched address selects, if any.
    fn selected(&self, port: u16) -> Option<(&SharedDevice, usize)> {
        let address = *self.latch();
        if address & CONFIG_ENABLE == 0 {
            return None;
        }
        let bus = (address >> 16) & 0xff;
        let slot = ((address >> 11) & 0x1f) as usize;
        let function = (address >> 8) & 0x7;
        if bus != 0 || function != 0 {
            return None;
        }
        let offset = (address & 0xfc) as usize + usize::from(port - CONFIG_DATA);
        Some((self.slots[slot].as_ref()?, offset))
    }

    /// Whether `port` is one of the bus's ports.
    pub fn owns_port(port: u16) -> bool {
        (CONFIG_ADDRESS..CONFIG_DATA + 4).contains(&port)
    }

    pub fn read_port(&self, port: u16, data: &mut [u8]) {
        match port {
            CONFIG_ADDRESS if data.len() == 4 => {
                data.copy_from_slice(&self.latch().to_le_bytes());
            }
            CONFIG_DATA..=0xcff => match self.selected(port) {
                Some((device, offset)) => lock(device).config().read(offset, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    pub fn write_port(&self, port: u16, data: &[u8]) -> Option<SlotBarMove> {
        match port {
            CONFIG_ADDRESS => {
                if let &[a, b, c, d] = data {
                    *self.latch() = u32::from_le_bytes([a, b, c, d]);
                }
                None
            }
            CONFIG_DATA..=0xcff => {
                let (device, offset) = self.selected(port)?;
                let moved = lock(device).write_config(offset, data)?;
                let slot = self
                    .slots
                    .iter()
                    .position(|s| s.as_ref().is_some_and(|s| Arc::ptr_eq(s, device)))?;
                let event = SlotBarMove { slot, moved };
                if let Some(hook) = &self.on_bar_move {
                    hook(event);
                }
                Some(event)
            }
            _ => None,
        }
    }

    /// Serves an MMIO read if a BAR decodes `addr`; false if none does.
    pub fn read_mmio(&self, addr: u64, data: &mut [u8]) -> bool {
        for device in self.slots.iter().flatten() {
            let mut d = lock(device);
            if let Some((bar, offset)) = d.config().bar_at(addr, data.len() as u64) {
                d.read_bar(bar, offset, data);
                return true;
            }
        }
        false
    }

    /// Serves an MMIO write if a BAR decodes `addr`; false if none does.
    pub fn write_mmio(&self, addr: u64, data: &[u8]) -> bool {
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
}
