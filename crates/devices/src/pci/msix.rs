//! The MSI-X table and pending-bit array of one function (PCI 3.0 §6.8.2): the guest
//! programs each vector's message; the device fires vectors; a masked vector's interrupt
//! waits in the PBA and is sent when the guest unmasks it.
use std::sync::Arc;

use crate::interrupt::{MsiInterrupts, MsiMessage};

pub const ENTRY_SIZE: u64 = 16;
/// Message control bits of the capability.
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub address_lo: u32,
    pub address_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl Default for Entry {
    /// Every vector starts masked.
    fn default() -> Self {
        Self {
            address_lo: 0,
            address_hi: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

impl Entry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_hi) << 32 | u64::from(self.address_lo),
            data: self.data,
        }
    }

    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

/// The saved form of [`Msix`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    pub entries: Vec<Entry>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_masked: bool,
}

pub struct Msix {
    state: MsixState,
    irq: Arc<dyn MsiInterrupts>,
}

impl Msix {
    pub fn new(vectors: u16, irq: Arc<dyn MsiInterrupts>) -> Self {
        let n = usize::from(vectors);
        Self {
            state: MsixState {
                entries: vec![Entry::default(); n],
                pending: vec![false; n],
                enabled: false,
                function_masked: false,
            },
            irq,
        }
    }

    pub fn vectors(&self) -> u16 {
        self.state.entries.len() as u16
    }

    pub fn enabled(&self) -> bool {
        self.state.enabled
    }

    /// Whether vector `v` is masked, by its own bit or the function's (a vector this
    /// table does not have counts as masked).
    pub fn masked(&self, v: u16) -> bool {
        self.state.function_masked
            || self
                .state
                .entries
                .get(usize::from(v))
                .is_none_or(|e| e.masked())
    }

    /// Tells the interrupt side where vector `v` goes now.
    fn route(&self, v: usize) {
        let message = self.state.enabled.then(|| self.state.entries[v].message());
        if let Err(e) = self.irq.route(v as u16, message) {
            tracing::warn!("cannot route MSI-X vector {v}: {e}");
        }
    }

    fn route_all(&self) {
        for v in 0..self.state.entries.len() {
            self.route(v);
        }
    }

    /// Sends the vectors whose interrupts waited and may go now.
    fn flush_pending(&mut self) {
        if !self.state.enabled || self.state.function_masked {
            return;
        }
        for v in 0..self.state.entries.len() {
            if self.state.pending[v] && !self.state.entries[v].masked() {
                self.state.pending[v] = false;
                self.irq.trigger(v as u16);
            }
        }
    }

    /// The capability's message control as the guest last wrote it.
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let masked = control & CONTROL_FUNCTION_MASK != 0;
        let was_enabled = self.state.enabled;
        self.state.enabled = enabled;
        self.state.function_masked = masked;
        if enabled != was_enabled {
            self.route_all();
        }
        self.flush_pending();
    }

    /// Fires vector `v`: sent now, or left pending while masked. False if MSI-X is off or
    /// `v` is not a vector of this table (the device then has no way to interrupt).
    pub fn fire(&mut self, v: u16) -> bool {
        let i = usize::from(v);
        if !self.state.enabled || i >= self.state.entries.len() {
            return false;
        }
        if self.state.function_masked || self.state.entries[i].masked() {
            self.state.pending[i] = true;
        } else {
            self.irq.trigger(v);
        }
        true
    }

    /// A read of the table; only aligned 4- and 8-byte reads are defined, others read
    /// all-ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let value = |off: u64| -> Option<u32> {
            let e = self
                .state
                .entries
                .get(usize::try_from(off / ENTRY_SIZE).ok()?)?;
            Some(match off % ENTRY_SIZE {
                0 => e.address_lo,
                4 => e.address_hi,
                8 => e.data,
                _ => e.control,
            })
        };
        data.fill(0xff);
        match data.len() {
            4 if offset.is_multiple_of(4) => {
                if let Some(v) = value(offset) {
                    data.copy_from_slice(&v.to_le_bytes());
                }
            }
            8 if offset.is_multiple_of(8) => {
                if let (Some(a), Some(b)) = (value(offset), value(offset + 4)) {
                    data[..4].copy_from_slice(&a.to_le_bytes());
                    data[4..].copy_from_slice(&b.to_le_bytes());
                }
            }
            _ => {}
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        match *data {
            [a, b, c, d] if offset.is_multiple_of(4) => {
                self.write_dword(offset, u32::from_le_bytes([a, b, c, d]))
            }
            [a, b, c, d, e, f, g, h] if offset.is_multiple_of(8) => {
                self.write_dword(offset, u32::from_le_bytes([a, b, c, d]));
                self.write_dword(offset + 4, u32::from_le_bytes([e, f, g, h]));
            }
            _ => {}
        }
    }

    fn write_dword(&mut self, offset: u64, value: u32) {
        let Ok(i) = usize::try_from(offset / ENTRY_SIZE) else {
            return;
        };
        let Some(e) = self.state.entries.get_mut(i) else {
            return;
        };
        let before = *e;
        match offset % ENTRY_SIZE {
            0 => e.address_lo = value,
            4 => e.address_hi = value,
            8 => e.data = value,
            _ => e.control = value & VECTOR_MASKED,
        }
        if e.message() != before.message() && self.state.enabled {
            self.route(i);
        }
        if before.masked() && !self.state.entries[i].masked() {
            self.flush_pending();
        }
    }

    /// The pending-bit array: one bit per vector, read-only.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (k, byte) in data.iter_mut().enumerate() {
            let base = (offset as usize + k) * 8;
            *byte = (0..8)
                .filter(|bit| self.state.pending.get(base + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }

    pub fn state(&self) -> MsixState {
        self.state.clone()
    }

    /// Puts saved state back (checked against this table's size) and re-routes every
    /// vector, as the interrupt side of a new VMM knows none of them.
    pub fn restore(&mut self, state: &MsixState) -> Result<(), String> {
        let n = self.state.entries.len();
        if state.entries.len() != n || state.pending.len() != n {
            return Err(format!(
                "saved MSI-X table has {} entries and {} pending bits; this device has {n} vectors",
                state.entries.len(),
                state.pending.len()
            ));
        }
        self.state = state.clone();
        self.route_all();
        Ok(())
    }

    /// Back to the power-on state (every vector masked, MSI-X off).
    pub fn reset(&mut self) {
        let was_enabled = self.state.enabled;
        let n = self.state.entries.len() as u16;
        self.state = Self::new(n, self.irq.clone()).state;
        if was_enabled {
            self.route_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::test_util::Recorder;

    fn table() -> (Msix, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (Msix::new(4, rec.clone()), rec)
    }

    fn program(m: &mut Msix, v: u64, address: u32, data: u32) {
        m.write_table(v * 16, &address.to_le_bytes());
        m.write_table(v * 16 + 4, &0u32.to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
    }

    #[test]
    fn vectors_start_masked_and_fire_only_when_enabled_and_unmasked() {
        let (mut m, rec) = table();
        assert!(!m.fire(0), "MSI-X off");
        m.set_control(CONTROL_ENABLE);
        assert_eq!(rec.last_route(0), Some(Some(MsiMessage::default())));
        program(&mut m, 1, 0xfee0_0000, 0x41);
        assert_eq!(
            rec.last_route(1),
            Some(Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            }))
        );
        assert!(m.fire(1));
        assert!(rec.fired().is_empty(), "masked: pending");
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        // Unmasking sends the pending interrupt once.
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(rec.take_fired(), vec![1]);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert!(m.fire(1));
        assert_eq!(rec.take_fired(), vec![1]);
        // The function mask holds every vector back; lifting it sends them.
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.fire(1);
        assert!(rec.fired().is_empty());
        m.set_control(CONTROL_ENABLE);
        assert_eq!(rec.take_fired(), vec![1]);
        assert!(!m.fire(4), "no such vector");
        // Disabling MSI-X withdraws the routes.
        m.set_control(0);
        assert_eq!(rec.last_route(1), Some(None));
    }

    #[test]
    fn table_reads_and_odd_accesses() {
        let (mut m, _) = table();
        program(&mut m, 2, 0xfee0_1000, 0x55);
        let mut d = [0; 4];
        m.read_table(2 * 16 + 8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x55);
        let mut q = [0; 8];
        m.read_table(2 * 16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
        // Unaligned, odd-sized or out-of-table accesses are ignored / read all-ones.
        m.write_table(2 * 16 + 2, &[1, 2, 3, 4]);
        m.write_table(2 * 16, &[1, 2]);
        m.write_table(64, &[1, 2, 3, 4]);
        m.read_table(2 * 16, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xfee0_1000);
        m.read_table(64, &mut d);
        assert_eq!(d, [0xff; 4]);
        m.read_table(1, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Control keeps only the mask bit.
        m.write_table(2 * 16 + 12, &u32::MAX.to_le_bytes());
        m.read_table(2 * 16 + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
    }

    #[test]
    fn state_round_trips_and_reroutes_and_bad_sizes_are_refused() {
        let (mut m, _) = table();
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 3, 0xfee0_0000, 0x42);
        let saved = m.state();
        let (mut n, rec) = table();
        n.restore(&saved).unwrap();
        assert_eq!(rec.last_route(3).unwrap().unwrap().data, 0x42);
        assert_eq!(n.state(), saved);
        let (mut small, _) = (Msix::new(2, rec.clone()), ());
        assert!(small.restore(&saved).unwrap_err().contains("4 entries"));
    }
}
