//! The Bochs display device (PCI 1234:1111): VRAM in BAR 0, the DISPI mode registers at
//! 0x500 of the MMIO BAR 2 (16-bit each). Both BARs lie in the identity-mapped MMIO hole
//! (U/S=1, uncached: [`crate::paging`]), so drawing is plain stores into the VRAM, which
//! the VMM maps as memory: no exits. Setting a mode is a few register writes (one MMIO
//! exit each).
//!
//! Its display is numbered after the framebuffers and the virtio scanouts
//! ([`crate::display`]); its size is the mode we set.
//!
//! Shell: `bochs` tells what was found and the mode; `bochs mode W H [BPP]` sets a mode
//! (disable, depth, size, virtual width, enable with the linear framebuffer) and reads it
//! back; `bochs off` disables it; `bochs reg INDEX [VALUE]` reads (or writes, then reads)
//! one DISPI register, so that refused writes can be seen to change nothing.
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::pci;

const VENDOR: u16 = 0x1234;
const DEVICE: u16 = 0x1111;
const DISPI: u64 = 0x500;
const XRES: u16 = 1;
const YRES: u16 = 2;
const BPP: u16 = 3;
const ENABLE: u16 = 4;
const VIRT_WIDTH: u16 = 6;
const X_OFFSET: u16 = 8;
const Y_OFFSET: u16 = 9;
const ENABLED: u16 = 0x01;
const LFB_ENABLED: u16 = 0x40;

/// The device as found: 0 until looked for, 1 if there is none.
static VRAM: AtomicU64 = AtomicU64::new(0);
static VRAM_SIZE: AtomicU64 = AtomicU64::new(0);
static MMIO: AtomicU64 = AtomicU64::new(0);
const ABSENT: u64 = 1;

#[derive(Clone, Copy)]
pub struct Device {
    pub vram: u64,
    pub vram_size: u64,
    mmio: u64,
}

/// Whether `base..base + len` lies in the identity-mapped MMIO hole.
fn in_hole(base: u64, len: u64) -> bool {
    base >= crate::paging::MMIO_START
        && base
            .checked_add(len)
            .is_some_and(|end| end <= crate::paging::MMIO_END)
}

/// The device, found on the first call: memory decoding on, VRAM size from BAR 0's
/// sizing (with decoding off while its register holds all-ones).
pub fn get() -> Option<Device> {
    match VRAM.load(Relaxed) {
        ABSENT => return None,
        0 => {}
        vram => {
            return Some(Device {
                vram,
                vram_size: VRAM_SIZE.load(Relaxed),
                mmio: MMIO.load(Relaxed),
            })
        }
    }
    let Some(f) = pci::find(VENDOR, DEVICE, 0) else {
        VRAM.store(ABSENT, Relaxed);
        return None;
    };
    let command = f.read32(pci::COMMAND);
    f.write32(pci::COMMAND, command & !pci::COMMAND_MEMORY);
    let bar0 = f.read32(0x10);
    f.write32(0x10, u32::MAX);
    let size = u64::from(!(f.read32(0x10) & !0xf)) + 1;
    f.write32(0x10, bar0);
    f.write32(pci::COMMAND, command | pci::COMMAND_MEMORY);
    let (vram, mmio) = (u64::from(f.bar(0)), u64::from(f.bar(2)));
    if vram == 0 || !in_hole(vram, size) || !in_hole(mmio, 4096) {
        println!("bochs: BARs at {vram:#x} (+{size:#x}) and {mmio:#x} are not in the MMIO hole");
        VRAM.store(ABSENT, Relaxed);
        return None;
    }
    VRAM_SIZE.store(size, Relaxed);
    MMIO.store(mmio, Relaxed);
    VRAM.store(vram, Relaxed);
    Some(Device {
        vram,
        vram_size: size,
        mmio,
    })
}

impl Device {
    fn register(&self, index: u16) -> *mut u16 {
        (self.mmio + DISPI + 2 * u64::from(index)) as *mut u16
    }

    pub fn read(&self, index: u16) -> u16 {
        // SAFETY: a 16-bit register in the device's MMIO BAR, which `get` checked lies in
        // the identity-mapped uncached MMIO hole; any index reads (the device answers 0
        // for those it lacks).
        unsafe { self.register(index).read_volatile() }
    }

    pub fn write(&self, index: u16, value: u16) {
        // SAFETY: as for `read`; the device refuses writes it does not take.
        unsafe { self.register(index).write_volatile(value) }
    }

    /// The mode in force: (address of its first pixel, stride, width, height).
    pub fn mode(&self) -> Option<(u64, u32, u32, u32)> {
        if self.read(ENABLE) & ENABLED == 0 {
            return None;
        }
        let stride = u32::from(self.read(VIRT_WIDTH)) * 4;
        let (w, h) = (u32::from(self.read(XRES)), u32::from(self.read(YRES)));
        let offset =
            u64::from(self.read(Y_OFFSET)) * u64::from(stride) + u64::from(self.read(X_OFFSET)) * 4;
        let end = offset + u64::from(stride) * u64::from(h);
        (w > 0 && h > 0 && stride >= w * 4 && end <= self.vram_size).then_some((
            self.vram + offset,
            stride,
            w,
            h,
        ))
    }
}

/// The display's surface, if the device is there with a mode set.
pub fn surface() -> Option<(u64, u32, u32, u32)> {
    get()?.mode()
}

/// The `bochs` command.
pub fn command(mut args: core::str::SplitAsciiWhitespace) {
    let Some(d) = get() else {
        println!("err bochs: no Bochs display device (PCI {VENDOR:04x}:{DEVICE:04x})");
        return;
    };
    let sub = args.next();
    let mut numbers = [None; 3];
    for (slot, s) in numbers.iter_mut().zip(args.by_ref()) {
        match crate::shell::parse_number(s).filter(|&n| n <= 0xffff) {
            Some(n) => *slot = Some(n as u16),
            None => {
                println!("err bochs: bad number '{s}' (0 to 0xffff)");
                return;
            }
        }
    }
    if let Some(extra) = args.next() {
        println!("err bochs: unexpected argument '{extra}'");
        return;
    }
    match (sub, numbers) {
        (None, [None, None, None]) => show(&d),
        (Some("off"), [None, None, None]) => {
            d.write(ENABLE, 0);
            show(&d);
        }
        (Some("mode"), [Some(w), Some(h), bpp]) => set_mode(&d, w, h, bpp.unwrap_or(32)),
        (Some("reg"), [Some(index), value, None]) => {
            if let Some(v) = value {
                d.write(index, v);
            }
            println!("bochs reg {index} = {:#06x}", d.read(index));
        }
        _ => println!(
            "err bochs: usage: bochs | bochs mode W H [BPP] | bochs off | bochs reg INDEX [VALUE]"
        ),
    }
}

/// Sets a mode as a driver does: off, depth, size, virtual width, offsets, on.
fn set_mode(d: &Device, w: u16, h: u16, bpp: u16) {
    d.write(ENABLE, 0);
    d.write(BPP, bpp);
    d.write(XRES, w);
    d.write(YRES, h);
    d.write(VIRT_WIDTH, w);
    d.write(X_OFFSET, 0);
    d.write(Y_OFFSET, 0);
    d.write(ENABLE, ENABLED | LFB_ENABLED);
    match d.mode() {
        Some((_, stride, mw, mh)) => {
            println!("bochs mode {mw}x{mh} bpp={} stride={stride}", d.read(BPP))
        }
        None => println!("err bochs: mode {w}x{h} at {bpp} bits refused (the device left it off)"),
    }
}

fn show(d: &Device) {
    match d.mode() {
        Some((at, stride, w, h)) => println!(
            "bochs id={:#06x} vram={:#x} size={:#x} mode={w}x{h} stride={stride} at {at:#x}",
            d.read(0),
            d.vram,
            d.vram_size
        ),
        None => println!(
            "bochs id={:#06x} vram={:#x} size={:#x} mode=off",
            d.read(0),
            d.vram,
            d.vram_size
        ),
    }
}
