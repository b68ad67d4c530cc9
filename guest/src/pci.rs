//! PCI configuration space through mechanism #1 (ports 0xcf8/0xcfc), bus 0, function 0.
//! Each access is two port exits: enumerate once, keep what was found.
use crate::cpu;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};

const ADDRESS: u16 = 0xcf8;
const DATA: u16 = 0xcfc;
pub const COMMAND: u8 = 0x04;
pub const CAPABILITIES: u8 = 0x34;
pub const COMMAND_MEMORY: u32 = 1 << 1;
pub const COMMAND_BUS_MASTER: u32 = 1 << 2;

#[derive(Clone, Copy, Debug)]
pub struct Function {
    pub slot: u8,
}

fn select(f: Function, offset: u8) {
    cpu::outl(
        ADDRESS,
        1 << 31 | u32::from(f.slot) << 11 | u32::from(offset & 0xfc),
    );
}

impl Function {
    pub fn read32(self, offset: u8) -> u32 {
        select(self, offset);
        cpu::inl(DATA)
    }

    pub fn write32(self, offset: u8, value: u32) {
        select(self, offset);
        cpu::outl(DATA, value);
    }

    /// The base of 32-bit memory BAR `bar`.
    pub fn bar(self, bar: u8) -> u32 {
        self.read32(0x10 + 4 * bar) & !0xf
    }

    /// Walks the capability list: (offset, ID) of each, at most 48 (a list that loops
    /// ends there).
    pub fn capabilities(self) -> impl Iterator<Item = (u8, u8)> {
        let mut at = (self.read32(CAPABILITIES) & 0xfc) as u8;
        let mut left = 48;
        core::iter::from_fn(move || {
            if at == 0 || left == 0 {
                return None;
            }
            left -= 1;
            let head = self.read32(at);
            let here = at;
            at = ((head >> 8) & 0xfc) as u8;
            Some((here, head as u8))
        })
    }
}

/// Vendor and device ID dword of each slot of bus 0, read once (a full scan is 64 port
/// exits, ~6 ms on PVM: every driver's probe shares it). The bus does not change while the
/// guest runs (no hot-plug), also not across a snapshot or a migration.
static IDS: [AtomicU32; 32] = [const { AtomicU32::new(0) }; 32];
static SCANNED: AtomicBool = AtomicBool::new(false);

fn id_of(slot: u8) -> u32 {
    if !SCANNED.load(Relaxed) {
        for (s, id) in (0..32u8).zip(&IDS) {
            id.store(Function { slot: s }.read32(0), Relaxed);
        }
        SCANNED.store(true, Relaxed);
    }
    IDS[usize::from(slot)].load(Relaxed)
}

/// The `nth` function (0-based) on bus 0 with this vendor and device ID.
pub fn find(vendor: u16, device: u16, nth: usize) -> Option<Function> {
    let want = u32::from(device) << 16 | u32::from(vendor);
    (0..32u8)
        .filter(|&slot| id_of(slot) == want)
        .map(|slot| Function { slot })
        .nth(nth)
}
