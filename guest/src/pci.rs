//! PCI configuration space of bus 0, function 0. With the ACPI MCFG table, through its
//! ECAM window: a register is one MMIO access (one exit). Without it, or with `ray.pci=ports`
//! on the command line, through mechanism #1: the address port 0xcf8, then the data port
//! 0xcfc (two port exits). Either way each access is an exit: enumerate once, keep what
//! was found.
use crate::cpu;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use ray_guest_abi::acpi_mcfg;

const ADDRESS: u16 = 0xcf8;
const DATA: u16 = 0xcfc;
pub const COMMAND: u8 = 0x04;
pub const CAPABILITIES: u8 = 0x34;
pub const COMMAND_MEMORY: u32 = 1 << 1;
pub const COMMAND_BUS_MASTER: u32 = 1 << 2;

/// The command line's choice of mechanism: `ray.pci=ports` ignores the MCFG table.
const CMDLINE_KEY: &str = "ray.pci=";

/// Bus 0's ECAM window: 32 slots of 8 functions of 4 KiB.
const BUS_SIZE: u64 = 1 << 20;

/// How configuration space is reached, decided at the first access.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mechanism {
    Ports,
    /// Bus 0's base in the ECAM window.
    Ecam(u64),
}

/// 0: not decided yet; [`PORTS`]: mechanism #1; anything else: the ECAM base.
static MECHANISM: AtomicU64 = AtomicU64::new(0);
const PORTS: u64 = 1;

fn mechanism() -> Mechanism {
    match MECHANISM.load(Relaxed) {
        0 => {
            let m = choose();
            let word = match m {
                Mechanism::Ports => PORTS,
                Mechanism::Ecam(base) => base,
            };
            MECHANISM.store(word, Relaxed);
            m
        }
        PORTS => Mechanism::Ports,
        base => Mechanism::Ecam(base),
    }
}

/// ECAM if the MCFG table has bus 0 of segment 0 inside the MMIO hole (identity-mapped
/// uncached, U/S=1 as PVM wants: [`crate::paging`]) and the command line does not say
/// `ray.pci=ports`; the ports otherwise.
fn choose() -> Mechanism {
    if crate::bootparams::get().cmdline_str(CMDLINE_KEY) == Some("ports") {
        return Mechanism::Ports;
    }
    let Some(bus0) = crate::acpi::find(b"MCFG").and_then(acpi_mcfg::segment0_bus0) else {
        return Mechanism::Ports;
    };
    let hole = crate::paging::MMIO_START..=crate::paging::MMIO_END - BUS_SIZE;
    if !bus0.base.is_multiple_of(BUS_SIZE) || !hole.contains(&bus0.base) {
        println!(
            "pci: the MCFG window at {:#x} is not in the MMIO hole; using ports 0xcf8/0xcfc",
            bus0.base
        );
        return Mechanism::Ports;
    }
    Mechanism::Ecam(bus0.base)
}

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

/// The register's address in the ECAM window at `base`.
fn ecam_register(base: u64, f: Function, offset: u8) -> *mut u32 {
    (base + (u64::from(f.slot & 0x1f) << 15) + u64::from(offset & 0xfc)) as *mut u32
}

impl Function {
    pub fn read32(self, offset: u8) -> u32 {
        match mechanism() {
            // SAFETY: the register lies in bus 0's 1 MiB of the ECAM window, which
            // `choose` checked lies in the identity-mapped uncached MMIO hole; it is
            // dword aligned.
            Mechanism::Ecam(base) => unsafe { ecam_register(base, self, offset).read_volatile() },
            Mechanism::Ports => {
                select(self, offset);
                cpu::inl(DATA)
            }
        }
    }

    pub fn write32(self, offset: u8, value: u32) {
        match mechanism() {
            // SAFETY: as for `read32`.
            Mechanism::Ecam(base) => unsafe {
                ecam_register(base, self, offset).write_volatile(value)
            },
            Mechanism::Ports => {
                select(self, offset);
                cpu::outl(DATA, value);
            }
        }
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

/// Vendor and device ID dword of each slot of bus 0, read once (a full scan is 32 exits
/// through ECAM, 64 through the ports, ~6 ms on PVM: every driver's probe shares it). The
/// bus does not change while the guest runs (no hot-plug), also not across a snapshot or
/// a migration.
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

/// The `pci` command: `pci config=ecam base=0x...` or `pci config=ports`, then
/// `pci 00:SS.0 VVVV:DDDD` per function found on bus 0.
pub fn command() {
    match mechanism() {
        Mechanism::Ecam(base) => println!("pci config=ecam base={base:#x}"),
        Mechanism::Ports => println!("pci config=ports"),
    }
    for slot in 0..32u8 {
        let id = id_of(slot);
        if id != u32::MAX {
            println!("pci 00:{slot:02x}.0 {:04x}:{:04x}", id & 0xffff, id >> 16);
        }
    }
}
