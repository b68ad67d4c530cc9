//! The PC leftovers a guest expects: the power-off port (ACPI PM1a control), the i8042
//! reset line, and nothing else.
use ray_guest_abi::{POWEROFF_PORT, POWEROFF_VALUE};

/// i8042 command/status port; writing 0xfe pulses the CPU reset line.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
/// PM1a control: SLP_EN (bit 13) with SLP_TYP (bits 10..12) = 5 means "enter S5", soft off.
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_MASK: u16 = 0b111 << 10;

/// A power event the guest asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// ACPI S5 through PM1a control.
    PowerOff,
    /// i8042 reset. rayvisor ends the VM on a reset request, as Firecracker does: a reboot
    /// is a new VM, started by whoever supervises this one.
    Reset,
}

/// The ACPI PM1 event and control blocks (the FADT names them): status, enable, control.
const PM1_PORTS: std::ops::RangeInclusive<u16> = 0x600..=(POWEROFF_PORT + 1);

pub fn read(port: u16, data: &mut [u8]) {
    match port {
        // i8042 status: output buffer empty, input buffer empty, so drivers don't wait.
        I8042_COMMAND => data.fill(0),
        // No PM1 event is ever pending or enabled, and the control register reads clear.
        p if PM1_PORTS.contains(&p) => data.fill(0),
        _ => data.fill(0xff),
    }
}

pub fn write(port: u16, data: &[u8]) -> Option<PowerEvent> {
    match (port, data) {
        (POWEROFF_PORT, [lo, hi]) => {
            let value = u16::from_le_bytes([*lo, *hi]);
            let s5 = POWEROFF_VALUE & SLP_TYP_MASK;
            (value & SLP_EN != 0 && value & SLP_TYP_MASK == s5).then_some(PowerEvent::PowerOff)
        }
        (I8042_COMMAND, [I8042_RESET]) => Some(PowerEvent::Reset),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_write_powers_off() {
        assert_eq!(
            write(POWEROFF_PORT, &POWEROFF_VALUE.to_le_bytes()),
            Some(PowerEvent::PowerOff)
        );
    }

    #[test]
    fn other_sleep_states_and_sizes_are_ignored() {
        // SLP_TYP = 1 (S1) with SLP_EN: not a power-off.
        assert_eq!(
            write(POWEROFF_PORT, &(SLP_EN | (1 << 10)).to_le_bytes()),
            None
        );
        // SLP_TYP = 5 without SLP_EN.
        assert_eq!(write(POWEROFF_PORT, &(5u16 << 10).to_le_bytes()), None);
        assert_eq!(write(POWEROFF_PORT, &[0x34]), None);
    }

    #[test]
    fn i8042_reset() {
        assert_eq!(write(I8042_COMMAND, &[0xfe]), Some(PowerEvent::Reset));
        assert_eq!(write(I8042_COMMAND, &[0xad]), None);
    }

    #[test]
    fn pm1_registers_read_zero() {
        for port in [0x600, 0x602, POWEROFF_PORT] {
            let mut b = [0xaau8; 2];
            read(port, &mut b);
            assert_eq!(b, [0, 0], "port {port:#x}");
        }
    }

    #[test]
    fn unknown_ports_read_all_ones() {
        let mut b = [0u8; 2];
        read(0x80, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
