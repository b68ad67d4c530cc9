//! rayvisor's device models, with no KVM dependency: the port-I/O bus that routes vCPU
//! exits to them, the 16550 console and its paravirtual path, the power-off port, the PCI
//! bus ([`pci`]) with virtio-pci devices ([`virtio`]) and a Bochs-style display
//! ([`bochs`]), and [`Persist`], how each saves and restores its state. Interrupts reach
//! KVM through eventfds the VMM connects (MSI-X through [`MsiInterrupts`]); guest memory
//! is reached through [`ray_memory::GuestMemory`].
pub mod bochs;
pub mod console;
pub mod interrupt;
pub mod legacy;
pub mod passthrough;
pub mod pci;
pub mod persist;
pub mod rate;
pub mod virtio;

use std::sync::{Arc, Mutex};

use ray_guest_abi::{
    PV_CONSOLE_IN_PORT, PV_CONSOLE_OUT_GPA, PV_CONSOLE_OUT_LEN, PV_CONSOLE_OUT_PORT,
};
use ray_memory::GuestMemory;

pub use console::{Console, ConsoleRing};
pub use interrupt::{MsiInterrupts, MsiMessage};
pub use legacy::PowerEvent;
pub use pci::PciBus;
pub use persist::Persist;

/// COM1's first port and its register count.
pub const COM1_BASE: u16 = 0x3f8;
const COM1_END: u16 = COM1_BASE + 8;

/// What a port access asks of the VMM beyond the device's own reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusEvent {
    None,
    Power(PowerEvent),
    /// The guest has nothing to do for up to this many µs ([`ray_guest_abi::IDLE_PORT`]).
    Idle(u32),
}

/// Guest memory as the bus reads it (the paravirtual console's output buffer).
pub type BusMemory = Arc<dyn GuestMemory + Send + Sync>;

/// The port-I/O bus: every port the VMM emulates in user space. The in-kernel irqchip
/// and PIT handle 0x20/0xa0/0x40.. themselves; unknown ports read as all-ones and ignore
/// writes, as on a PC.
pub struct IoBus {
    pub console: Mutex<Console>,
    /// Guest memory, for the paravirtual console's output; without it the paravirtual
    /// console ports are unknown ports.
    memory: Option<BusMemory>,
    /// The PCI bus: configuration ports 0xcf8-0xcff, the ECAM window and the BARs' MMIO.
    pci: Option<Arc<PciBus>>,
}

impl IoBus {
    pub fn new(console: Console) -> Self {
        Self {
            console: Mutex::new(console),
            memory: None,
            pci: None,
        }
    }

    /// A bus that also serves the paravirtual console
    /// ([`ray_guest_abi::VMM_FEATURE_PV_CONSOLE`]) over `memory`.
    pub fn with_memory(console: Console, memory: BusMemory) -> Self {
        Self {
            console: Mutex::new(console),
            memory: Some(memory),
            pci: None,
        }
    }

    /// Adds the PCI bus: its configuration ports and the MMIO of its BARs.
    pub fn with_pci(mut self, pci: Arc<PciBus>) -> Self {
        self.pci = Some(pci);
        self
    }

    pub fn pci(&self) -> Option<&Arc<PciBus>> {
        self.pci.as_ref()
    }

    /// An MMIO read no memory slot backs: configuration space (ECAM), a BAR's register,
    /// or all-ones.
    pub fn read_mmio(&self, addr: u64, data: &mut [u8]) {
        if !self.pci.as_ref().is_some_and(|p| p.read_mmio(addr, data)) {
            data.fill(0xff);
        }
    }

    /// An MMIO write no memory slot backs: configuration space (ECAM), a BAR's register,
    /// or dropped.
    pub fn write_mmio(&self, addr: u64, data: &[u8]) {
        if let Some(p) = &self.pci {
            p.write_mmio(addr, data);
        }
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            _ if PciBus::owns_port(port) && self.pci.is_some() => {
                if let Some(p) = &self.pci {
                    p.read_port(port, data);
                }
            }
            // Any length: `rep insb` hands the whole buffer over in one exit.
            PV_CONSOLE_IN_PORT if self.memory.is_some() => self.lock_console().pv_read(data),
            COM1_BASE..COM1_END if data.len() == 1 => {
                data[0] = self.lock_console().read((port - COM1_BASE) as u8);
            }
            _ => legacy::read(port, data),
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> BusEvent {
        match port {
            _ if PciBus::owns_port(port) && self.pci.is_some() => {
                if let Some(p) = &self.pci {
                    p.write_port(port, data);
                }
                BusEvent::None
            }
            COM1_BASE..COM1_END if data.len() == 1 => {
                self.lock_console().write((port - COM1_BASE) as u8, data[0]);
                BusEvent::None
            }
            ray_guest_abi::IDLE_PORT => match data {
                &[a, b, c, d] => BusEvent::Idle(u32::from_le_bytes([a, b, c, d])),
                _ => BusEvent::None,
            },
            PV_CONSOLE_OUT_PORT if self.memory.is_some() => {
                if let &[a, b, c, d] = data {
                    self.pv_console_out(u32::from_le_bytes([a, b, c, d]));
                }
                BusEvent::None
            }
            _ => legacy::write(port, data).map_or(BusEvent::None, BusEvent::Power),
        }
    }

    /// Prints the first `len` bytes of the guest's output buffer with one console write.
    /// The length is the guest's word (untrusted): zero or more than the buffer holds
    /// prints nothing.
    fn pv_console_out(&self, len: u32) {
        let (Some(memory), Ok(len)) = (&self.memory, usize::try_from(len)) else {
            return;
        };
        if len == 0 || len > PV_CONSOLE_OUT_LEN {
            return;
        }
        let mut buf = [0u8; PV_CONSOLE_OUT_LEN];
        if memory.read(PV_CONSOLE_OUT_GPA, &mut buf[..len]).is_ok() {
            self.lock_console().pv_write(&buf[..len]);
        }
    }

    pub fn lock_console(&self) -> std::sync::MutexGuard<'_, Console> {
        // A panic while holding the console lock aborts the process (panic=abort), so the
        // lock can never be observed poisoned in practice; recover the data regardless.
        self.console.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ray_guest_abi::{IDLE_PORT, POWEROFF_PORT, POWEROFF_VALUE};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    #[test]
    fn port_writes_become_the_events_they_ask_for() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let bus = IoBus::new(Console::new(irq, None, false, Arc::default()));
        assert_eq!(
            bus.write(IDLE_PORT, &500u32.to_le_bytes()),
            BusEvent::Idle(500)
        );
        // Only a 32-bit write idles; anything else at the port is ignored.
        assert_eq!(bus.write(IDLE_PORT, &[5, 0]), BusEvent::None);
        assert_eq!(bus.write(IDLE_PORT, &[5]), BusEvent::None);
        assert_eq!(
            bus.write(POWEROFF_PORT, &POWEROFF_VALUE.to_le_bytes()),
            BusEvent::Power(PowerEvent::PowerOff)
        );
        assert_eq!(bus.write(COM1_BASE, b"x"), BusEvent::None);
    }

    fn pv_bus(memory: &Arc<ray_memory::OwnedMemory>) -> IoBus {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        IoBus::with_memory(
            Console::new(irq, None, false, Arc::default()),
            memory.clone(),
        )
    }

    fn guest_memory() -> Arc<ray_memory::OwnedMemory> {
        let layout = ray_memory::MemoryLayout::new(&[(0, 4 << 20)]).unwrap();
        Arc::new(ray_memory::OwnedMemory::zeroed(&layout).unwrap())
    }

    fn printed(bus: &IoBus) -> Vec<u8> {
        bus.lock_console().ring().tail(usize::MAX).1
    }

    #[test]
    fn pv_output_prints_the_buffer_in_one_write() {
        let mem = guest_memory();
        let bus = pv_bus(&mem);
        mem.write(PV_CONSOLE_OUT_GPA, b"hello\nworld").unwrap();
        assert_eq!(
            bus.write(PV_CONSOLE_OUT_PORT, &6u32.to_le_bytes()),
            BusEvent::None
        );
        assert_eq!(printed(&bus), b"hello\n");
        // A full buffer is fine.
        mem.write(PV_CONSOLE_OUT_GPA, &[b'z'; PV_CONSOLE_OUT_LEN])
            .unwrap();
        bus.write(
            PV_CONSOLE_OUT_PORT,
            &(PV_CONSOLE_OUT_LEN as u32).to_le_bytes(),
        );
        assert_eq!(printed(&bus).len(), 6 + PV_CONSOLE_OUT_LEN);
    }

    #[test]
    fn pv_output_refuses_bad_lengths_and_writes() {
        let mem = guest_memory();
        let bus = pv_bus(&mem);
        mem.write(PV_CONSOLE_OUT_GPA, b"secret").unwrap();
        for len in [0, PV_CONSOLE_OUT_LEN as u32 + 1, 1 << 20, u32::MAX] {
            assert_eq!(
                bus.write(PV_CONSOLE_OUT_PORT, &len.to_le_bytes()),
                BusEvent::None
            );
        }
        // Only a 32-bit write is a length.
        bus.write(PV_CONSOLE_OUT_PORT, &[3]);
        bus.write(PV_CONSOLE_OUT_PORT, &[3, 0]);
        bus.write(PV_CONSOLE_OUT_PORT, &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert!(printed(&bus).is_empty());
    }

    #[test]
    fn pv_output_outside_guest_memory_prints_nothing() {
        // Guest memory that does not reach the buffer: refused, no panic.
        let layout = ray_memory::MemoryLayout::new(&[(0, 0x10_0000)]).unwrap();
        let mem = Arc::new(ray_memory::OwnedMemory::zeroed(&layout).unwrap());
        let bus = pv_bus(&mem);
        bus.write(PV_CONSOLE_OUT_PORT, &5u32.to_le_bytes());
        assert!(printed(&bus).is_empty());
    }

    #[test]
    fn pv_input_is_zero_padded_in_order_and_empty_reads_zeros() {
        let mem = guest_memory();
        let bus = pv_bus(&mem);
        let mut buf = [0xaa; 64];
        bus.read(PV_CONSOLE_IN_PORT, &mut buf);
        assert_eq!(buf, [0; 64], "no input: all zeros");

        // More than the UART's FIFO holds, so both the FIFO and the pending queue drain.
        let input: Vec<u8> = (0..100u32).map(|i| b'a' + (i % 26) as u8).collect();
        bus.lock_console().queue_input(&input).unwrap();
        let mut buf = [0xaa; 256];
        bus.read(PV_CONSOLE_IN_PORT, &mut buf);
        assert_eq!(&buf[..100], &input[..]);
        assert!(buf[100..].iter().all(|&b| b == 0));
        assert!(!bus.lock_console().has_pending_input());

        // A short read takes what fits; the rest waits, in order, also for COM1.
        bus.lock_console().queue_input(b"abcdef\0gh").unwrap();
        let mut one = [0; 1];
        bus.read(PV_CONSOLE_IN_PORT, &mut one);
        assert_eq!(&one, b"a");
        let mut three = [0; 3];
        bus.read(PV_CONSOLE_IN_PORT, &mut three);
        assert_eq!(&three, b"bcd");
        let mut lsr = [0];
        bus.read(COM1_BASE + 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1);
        let mut rbr = [0];
        bus.read(COM1_BASE, &mut rbr);
        assert_eq!(&rbr, b"e");
        // The NUL is dropped, not taken as the end.
        let mut rest = [0xaa; 8];
        bus.read(PV_CONSOLE_IN_PORT, &mut rest);
        assert_eq!(&rest, b"fgh\0\0\0\0\0");
    }

    #[test]
    fn pending_pv_input_survives_save_and_restore() {
        let mem = guest_memory();
        let bus = pv_bus(&mem);
        let input = vec![b'q'; 300];
        bus.lock_console().queue_input(&input).unwrap();
        let mut first = [0; 10];
        bus.read(PV_CONSOLE_IN_PORT, &mut first);
        let state = bus.lock_console().save_state().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let back = IoBus::with_memory(
            Console::from_state(&state, irq, None, false, Arc::default()).unwrap(),
            mem.clone(),
        );
        let mut rest = [0; 512];
        back.read(PV_CONSOLE_IN_PORT, &mut rest);
        assert!(rest[..290].iter().all(|&b| b == b'q'));
        assert!(rest[290..].iter().all(|&b| b == 0));
    }

    #[test]
    fn pci_ports_and_bar_mmio_reach_the_pci_bus_only_when_it_is_there() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let plain = IoBus::new(Console::new(irq, None, false, Arc::default()));
        let mut id = [0; 4];
        plain.write(pci::CONFIG_ADDRESS, &(1u32 << 31).to_le_bytes());
        plain.read(pci::CONFIG_DATA, &mut id);
        assert_eq!(id, [0xff; 4], "no PCI bus: unknown ports");
        let mut m = [0; 4];
        plain.read_mmio(0xc000_0000, &mut m);
        assert_eq!(m, [0xff; 4]);

        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let bus = IoBus::new(Console::new(irq, None, false, Arc::default()))
            .with_pci(Arc::new(PciBus::new()));
        bus.write(pci::CONFIG_ADDRESS, &(1u32 << 31).to_le_bytes());
        bus.read(pci::CONFIG_DATA, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36, "the host bridge");
        bus.read_mmio(0xc000_0000, &mut m);
        assert_eq!(m, [0xff; 4], "no BAR there");
    }

    #[test]
    fn pv_ports_are_unknown_without_guest_memory() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let bus = IoBus::new(Console::new(irq, None, false, Arc::default()));
        bus.lock_console().queue_input(b"x").unwrap();
        let mut buf = [0; 4];
        bus.read(PV_CONSOLE_IN_PORT, &mut buf);
        assert_eq!(buf, [0xff; 4]);
        assert_eq!(
            bus.write(PV_CONSOLE_OUT_PORT, &1u32.to_le_bytes()),
            BusEvent::None
        );
        assert!(printed(&bus).is_empty());
    }
}
