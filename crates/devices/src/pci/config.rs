//! One PCI function's 256-byte configuration space (type 0 header): plain registers with
//! per-byte write masks, 32-bit memory BARs with the sizing protocol, and a capability list.

/// Offsets in the type 0 header.
pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const CLASS_PROG_IF: usize = 0x09;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// The command bits a guest may change: I/O and memory decoding, bus mastering, INTx off.
const COMMAND_WRITABLE: u16 = 0x0407;
const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Capabilities start after the header.
const FIRST_CAPABILITY: usize = 0x40;
pub const SIZE: usize = 256;
/// A memory BAR's prefetchable bit (reads have no side effects: the guest may map it
/// write-combined).
pub const BAR_PREFETCHABLE: u32 = 1 << 3;
pub const BARS: usize = 6;

/// Identity of a function, as the header reports it.
#[derive(Debug, Clone, Copy)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
    /// Class, subclass, programming interface.
    pub class: [u8; 3],
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

impl PciId {
    /// A virtio-rng function's identity: what the unit tests put on their buses.
    #[cfg(test)]
    pub(crate) const TEST: PciId = PciId {
        vendor: 0x1af4,
        device: 0x1044,
        class: [0xff, 0, 0],
        revision: 1,
        subsystem_vendor: 0x1af4,
        subsystem: 0x40,
    };
}

/// A BAR's address changed (the guest programmed it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    pub bar: usize,
    pub from: u64,
    pub to: u64,
}

/// The configuration space. A guest's writes change only the bits masked writable: the
/// rest of the header is the device's identity, and capabilities expose their own
/// writable fields.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; SIZE],
    writable: [u8; SIZE],
    /// Size of each BAR (0 = not implemented); all are 32-bit memory BARs.
    bar_sizes: [u64; BARS],
    /// Each BAR's type bits (the low four): 0, or [`BAR_PREFETCHABLE`].
    bar_flags: [u32; BARS],
    last_capability: usize,
    next_free: usize,
}

impl ConfigSpace {
    pub fn new(id: PciId) -> Self {
        let mut c = Self {
            bytes: [0; SIZE],
            writable: [0; SIZE],
            bar_sizes: [0; BARS],
            bar_flags: [0; BARS],
            last_capability: 0,
            next_free: FIRST_CAPABILITY,
        };
        c.put(VENDOR_ID, &id.vendor.to_le_bytes());
        c.put(DEVICE_ID, &id.device.to_le_bytes());
        c.bytes[REVISION] = id.revision;
        c.bytes[CLASS_PROG_IF] = id.class[2];
        c.bytes[CLASS_PROG_IF + 1] = id.class[1];
        c.bytes[CLASS_PROG_IF + 2] = id.class[0];
        c.bytes[HEADER_TYPE] = 0;
        c.put(SUBSYSTEM_VENDOR_ID, &id.subsystem_vendor.to_le_bytes());
        c.put(SUBSYSTEM_ID, &id.subsystem.to_le_bytes());
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    fn put(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    pub fn u32_at(&self, offset: usize) -> u32 {
        let b = &self.bytes[offset..offset + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Declares BAR `bar` as a 32-bit memory BAR of `size` bytes (a power of two, at least
    /// 4 KiB so that a BAR never shares a page with another) at `address`.
    pub fn add_bar(&mut self, bar: usize, size: u64, address: u32) {
        assert!(bar < BARS && size.is_power_of_two() && (4096..=1 << 31).contains(&size));
        assert!(
            u64::from(address).is_multiple_of(size),
            "a BAR is naturally aligned"
        );
        self.bar_sizes[bar] = size;
        self.put(BAR0 + 4 * bar, &address.to_le_bytes());
    }

    /// [`add_bar`](Self::add_bar) for a prefetchable 32-bit memory BAR (memory without
    /// read side effects, such as a display's VRAM).
    pub fn add_prefetchable_bar(&mut self, bar: usize, size: u64, address: u32) {
        self.add_bar(bar, size, address);
        self.bar_flags[bar] = BAR_PREFETCHABLE;
        self.put(BAR0 + 4 * bar, &(address | BAR_PREFETCHABLE).to_le_bytes());
    }

    /// BAR `bar`'s base address, if the BAR exists.
    pub fn bar_address(&self, bar: usize) -> Option<u64> {
        (bar < BARS && self.bar_sizes[bar] != 0)
            .then(|| u64::from(self.u32_at(BAR0 + 4 * bar) & !0xf))
    }

    pub fn bar_size(&self, bar: usize) -> u64 {
        self.bar_sizes.get(bar).copied().unwrap_or(0)
    }

    /// The BAR and offset in it that `addr` falls into, while memory decoding is on.
    pub fn bar_at(&self, addr: u64, len: u64) -> Option<(usize, u64)> {
        if !self.memory_enabled() {
            return None;
        }
        (0..BARS).find_map(|bar| {
            let base = self.bar_address(bar)?;
            let size = self.bar_sizes[bar];
            let off = addr.checked_sub(base)?;
            (off < size && off + len <= size).then_some((bar, off))
        })
    }

    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Appends a capability: `body` starts with its ID; the next-pointer byte (body[1]) is
    /// filled in. `writable` masks the bytes a guest may change (same length as `body`, or
    /// empty for none). Returns the capability's offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> usize {
        let offset = self.next_free;
        assert!(
            body.len() >= 2 && offset + body.len() <= SIZE,
            "capability space full"
        );
        assert!(writable.is_empty() || writable.len() == body.len());
        self.put(offset, body);
        self.bytes[offset + 1] = 0;
        if !writable.is_empty() {
            self.writable[offset..offset + body.len()].copy_from_slice(writable);
        }
        if self.last_capability == 0 {
            self.bytes[CAPABILITIES_POINTER] = offset as u8;
            let status = self.u16_at(STATUS) | STATUS_CAPABILITIES;
            self.put(STATUS, &status.to_le_bytes());
        } else {
            self.bytes[self.last_capability + 1] = offset as u8;
        }
        self.last_capability = offset;
        // Capabilities are dword aligned.
        self.next_free = (offset + body.len() + 3) & !3;
        offset
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the end read as all-ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// A guest's write at `offset`. BARs follow the sizing protocol: the bits below the
    /// BAR's size read back as zero, so writing all-ones and reading back gives the size.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Option<BarMove> {
        let end = offset.checked_add(data.len())?;
        if end > SIZE {
            return None;
        }
        let bars = BAR0..BAR0 + 4 * BARS;
        if bars.contains(&offset) {
            let bar = (offset - BAR0) / 4;
            let size = self.bar_sizes[bar];
            if size == 0 {
                return None;
            }
            let reg = BAR0 + 4 * bar;
            let before = self.bar_address(bar)?;
            let mut value = self.u32_at(reg).to_le_bytes();
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = value.get_mut(offset - reg + i) {
                    *slot = *b;
                }
            }
            // Memory, 32-bit: the low four bits are type bits (fixed by the BAR).
            let mask = !(size as u32 - 1);
            let value = u32::from_le_bytes(value) & mask | self.bar_flags[bar];
            self.put(reg, &value.to_le_bytes());
            let after = u64::from(value & !0xf);
            return (after != before).then_some(BarMove {
                bar,
                from: before,
                to: after,
            });
        }
        for (i, b) in data.iter().enumerate() {
            let at = offset + i;
            let mask = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (b & mask);
        }
        None
    }

    /// The bytes a guest may have changed, for saving: (offset, value) of every writable
    /// byte plus the BAR registers.
    pub fn guest_bytes(&self) -> Vec<(u8, u8)> {
        (0..SIZE)
            .filter(|&i| {
                self.writable[i] != 0
                    || ((BAR0..BAR0 + 4 * BARS).contains(&i) && self.bar_sizes[(i - BAR0) / 4] != 0)
            })
            .map(|i| (i as u8, self.bytes[i]))
            .collect()
    }

    /// Puts saved guest bytes back; bytes the guest could never write are refused.
    pub fn restore_guest_bytes(&mut self, saved: &[(u8, u8)]) -> Result<(), String> {
        for &(offset, value) in saved {
            let at = usize::from(offset);
            if (BAR0..BAR0 + 4 * BARS).contains(&at) {
                let bar = (at - BAR0) / 4;
                if self.bar_sizes[bar] == 0 {
                    return Err(format!("saved BAR {bar} does not exist on this device"));
                }
                self.bytes[at] = value;
                continue;
            }
            let mask = self.writable[at];
            if mask == 0 {
                return Err(format!(
                    "saved configuration byte {at:#x} is not one a guest can write"
                ));
            }
            self.bytes[at] = (self.bytes[at] & !mask) | (value & mask);
        }
        for bar in 0..BARS {
            let size = self.bar_sizes[bar];
            if size != 0 {
                let reg = BAR0 + 4 * bar;
                let v = self.u32_at(reg) & !(size as u32 - 1) | self.bar_flags[bar];
                self.put(reg, &v.to_le_bytes());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        let mut c = ConfigSpace::new(PciId::TEST);
        c.add_bar(0, 0x8000, 0xc000_0000);
        c
    }

    fn read32(c: &ConfigSpace, off: usize) -> u32 {
        let mut b = [0; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn a_prefetchable_bar_keeps_its_type_bit_through_sizing_moves_and_restores() {
        let mut c = ConfigSpace::new(PciId::TEST);
        c.add_prefetchable_bar(0, 32 << 20, 0xc000_0000);
        assert_eq!(read32(&c, BAR0), 0xc000_0008);
        c.write(BAR0, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&c, BAR0), !((32u32 << 20) - 1) | BAR_PREFETCHABLE);
        let moved = c.write(BAR0, &0xd000_0000u32.to_le_bytes()).unwrap();
        assert_eq!((moved.from, moved.to), (0xfe00_0000, 0xd000_0000));
        assert_eq!(read32(&c, BAR0), 0xd000_0008);
        assert_eq!(c.bar_address(0), Some(0xd000_0000));
        let saved = c.guest_bytes();
        let mut d = ConfigSpace::new(PciId::TEST);
        d.add_prefetchable_bar(0, 32 << 20, 0xc000_0000);
        d.restore_guest_bytes(&saved).unwrap();
        assert_eq!(read32(&d, BAR0), 0xd000_0008);
    }

    #[test]
    fn identity_is_read_only_and_command_is_masked() {
        let mut c = space();
        assert_eq!(read32(&c, 0), 0x1044_1af4);
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(read32(&c, 0), 0x1044_1af4);
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), COMMAND_WRITABLE);
        assert!(c.memory_enabled() && c.bus_master());
        assert_eq!(c.u16_at(0x0a), 0xff00, "class ff, subclass 0");
    }

    #[test]
    fn bar_sizing_protocol_and_moves() {
        let mut c = space();
        assert_eq!(read32(&c, BAR0), 0xc000_0000);
        assert_eq!(
            c.write(BAR0, &u32::MAX.to_le_bytes()).unwrap().to,
            0xffff_8000
        );
        assert_eq!(read32(&c, BAR0), 0xffff_8000, "size 32 KiB");
        let moved = c.write(BAR0, &0xc000_0000u32.to_le_bytes()).unwrap();
        assert_eq!(moved.to, 0xc000_0000);
        // Unaligned addresses lose their low bits; absent BARs read zero and ignore writes.
        c.write(BAR0, &0xd000_1234u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xd000_0000));
        assert_eq!(c.write(BAR0 + 4, &u32::MAX.to_le_bytes()), None);
        assert_eq!(read32(&c, BAR0 + 4), 0);
        // Decoding is off until the guest turns it on.
        assert_eq!(c.bar_at(0xd000_0010, 4), None);
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar_at(0xd000_0010, 4), Some((0, 0x10)));
        assert_eq!(c.bar_at(0xd000_7ffe, 4), None, "straddles the end");
    }

    #[test]
    fn capabilities_chain_and_mask_writes() {
        let mut c = space();
        let a = c.add_capability(&[0x09, 0, 4, 1], &[]);
        let b = c.add_capability(&[0x11, 0, 0, 0], &[0, 0, 0, 0xc0]);
        assert_eq!(c.u16_at(STATUS) & STATUS_CAPABILITIES, STATUS_CAPABILITIES);
        assert_eq!(usize::from(c.bytes[CAPABILITIES_POINTER]), a);
        assert_eq!(usize::from(c.bytes[a + 1]), b);
        assert_eq!(c.bytes[b + 1], 0);
        c.write(b, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(read32(&c, b), 0xc000_0011 | ((c.bytes[b + 1] as u32) << 8));
        // Reads past the end are all-ones; writes there are ignored.
        let mut tail = [0; 4];
        c.read(254, &mut tail);
        assert_eq!(tail[2..], [0xff, 0xff]);
        assert_eq!(c.write(254, &[1, 2, 3, 4]), None);
    }

    #[test]
    fn saved_guest_bytes_round_trip_and_foreign_bytes_are_refused() {
        let mut c = space();
        c.write(COMMAND, &6u16.to_le_bytes());
        c.write(INTERRUPT_LINE, &[9]);
        c.write(BAR0, &0xe000_0000u32.to_le_bytes());
        let saved = c.guest_bytes();
        let mut d = space();
        d.restore_guest_bytes(&saved).unwrap();
        assert_eq!(d.command(), 6);
        assert_eq!(d.bar_address(0), Some(0xe000_0000));
        assert!(d.restore_guest_bytes(&[(0, 0x12)]).is_err());
        assert!(
            d.restore_guest_bytes(&[(0x14, 0x12)]).is_err(),
            "BAR 1 absent"
        );
    }
}
