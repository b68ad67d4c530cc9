//! rayvisor's device models, with no KVM dependency: the port-I/O bus that routes vCPU
//! exits to them, the 16550 console, the power-off port, and [`Persist`], how each saves
//! and restores its state. Interrupts reach KVM through eventfds the VMM connects.
pub mod console;
pub mod legacy;
pub mod persist;

use std::sync::Mutex;

pub use console::{Console, ConsoleRing};
pub use legacy::PowerEvent;
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

/// The port-I/O bus: every port the VMM emulates in user space. The in-kernel irqchip
/// and PIT handle 0x20/0xa0/0x40.. themselves; unknown ports read as all-ones and ignore
/// writes, as on a PC.
pub struct IoBus {
    pub console: Mutex<Console>,
}

impl IoBus {
    pub fn new(console: Console) -> Self {
        Self {
            console: Mutex::new(console),
        }
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..COM1_END if data.len() == 1 => {
                data[0] = self.lock_console().read((port - COM1_BASE) as u8);
            }
            _ => legacy::read(port, data),
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> BusEvent {
        match port {
            COM1_BASE..COM1_END if data.len() == 1 => {
                self.lock_console().write((port - COM1_BASE) as u8, data[0]);
                BusEvent::None
            }
            ray_guest_abi::IDLE_PORT => match data {
                &[a, b, c, d] => BusEvent::Idle(u32::from_le_bytes([a, b, c, d])),
                _ => BusEvent::None,
            },
            _ => legacy::write(port, data).map_or(BusEvent::None, BusEvent::Power),
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
}
