//! A driver for the passthrough test GPU (`ray gpu-device serve`, vendor 1234 device
//! 5247): the shell's `gpupt SEED` finds it on the PCI bus, reads its configuration space
//! (identity, BAR sizes by the sizing protocol, MSI-X capability), programs MSI-X vector 0,
//! writes a pattern to a page of RAM, has the device copy it into VRAM by DMA (waiting for
//! the interrupt), reads VRAM back through BAR 0, has the device copy it back to another
//! page of RAM and compares both. One line answers: `gpupt ok ...` or `gpupt err ...`.
use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::apic;
use crate::pci::{self, Function};
use crate::virtio::{self, rd, wr, RingPage, Shared};

const VENDOR: u16 = 0x1234;
const DEVICE: u16 = 0x5247;
const MAGIC: u32 = 0x4750_5952;
const REG_ID: usize = 0x00;
const REG_DMA_ADDR_LO: usize = 0x10;
const REG_DMA_ADDR_HI: usize = 0x14;
const REG_DMA_LEN: usize = 0x18;
const REG_VRAM_OFFSET: usize = 0x1c;
const REG_COMMAND: usize = 0x20;
const REG_DOORBELL: usize = 0x24;
const REG_STATUS: usize = 0x28;
const REG_COMPLETED: usize = 0x2c;
const CMD_TO_VRAM: u32 = 1;
const CMD_FROM_VRAM: u32 = 2;
const STATUS_DONE: u32 = 1;
const VRAM_OFFSET: u32 = 0x1_0000;
const TIMEOUT_NS: u64 = 5_000_000_000;

static SRC: Shared<RingPage> = Shared::new(RingPage::new());
static DST: Shared<RingPage> = Shared::new(RingPage::new());
/// The APIC device vector of MSI-X vector 0, plus one (0: not set up yet).
static VECTOR: AtomicUsize = AtomicUsize::new(0);

/// BAR `bar`'s size by the sizing protocol (all-ones, read back, restore).
fn bar_size(f: Function, bar: u8) -> u32 {
    let reg = 0x10 + 4 * bar;
    let old = f.read32(reg);
    f.write32(reg, u32::MAX);
    let mask = f.read32(reg) & !0xf;
    f.write32(reg, old);
    (!mask).wrapping_add(1)
}

fn byte(seed: u64, i: usize) -> u8 {
    (i as u64)
        .wrapping_mul(7)
        .wrapping_add(seed.wrapping_mul(13)) as u8
}

/// Starts one DMA command.
fn start(regs: usize, cmd: u32, addr: u64) {
    wr::<u32>(regs + REG_DMA_ADDR_LO, addr as u32);
    wr::<u32>(regs + REG_DMA_ADDR_HI, (addr >> 32) as u32);
    wr::<u32>(regs + REG_DMA_LEN, 4096);
    wr::<u32>(regs + REG_VRAM_OFFSET, VRAM_OFFSET);
    wr::<u32>(regs + REG_COMMAND, cmd);
    wr::<u32>(regs + REG_DOORBELL, 1);
}

/// One DMA command; waits for its interrupt and returns the status.
fn dma(regs: usize, vector: usize, cmd: u32, addr: u64) -> Result<u32, &'static str> {
    let done = rd::<u32>(regs + REG_COMPLETED);
    let irqs = apic::device_irqs(vector);
    start(regs, cmd, addr);
    virtio::wait_until(TIMEOUT_NS, || apic::device_irqs(vector) != irqs)
        .map_err(|_| "no MSI-X interrupt came")?;
    if rd::<u32>(regs + REG_COMPLETED) == done {
        return Err("the interrupt came but no command completed");
    }
    Ok(rd::<u32>(regs + REG_STATUS))
}

/// A command run while vector 0 is masked (`mask` sets it, `unmask` clears it: the
/// vector's own bit or the function's): `IRQS/PBA/LATE/PBA2`, the interrupts that came
/// while masked (0), its pending bit then (1), the interrupts after unmasking (1), and the
/// pending bit after (0).
fn masked_command(
    regs: usize,
    pba: usize,
    vector: usize,
    addr: u64,
    mask: impl Fn(),
    unmask: impl Fn(),
) -> (u64, u32, u64, u32) {
    mask();
    let irqs = apic::device_irqs(vector);
    let done = rd::<u32>(regs + REG_COMPLETED);
    start(regs, CMD_TO_VRAM, addr);
    let _ = virtio::wait_until(TIMEOUT_NS, || rd::<u32>(regs + REG_COMPLETED) != done);
    // Time for an interrupt that should not come to come.
    let _ = virtio::wait_until(20_000_000, || apic::device_irqs(vector) != irqs);
    let masked = apic::device_irqs(vector) - irqs;
    let pending = rd::<u32>(pba) & 1;
    let before = apic::device_irqs(vector);
    unmask();
    let _ = virtio::wait_until(TIMEOUT_NS / 5, || apic::device_irqs(vector) != before);
    let _ = virtio::wait_until(20_000_000, || apic::device_irqs(vector) > before + 1);
    (
        masked,
        pending,
        apic::device_irqs(vector) - before,
        rd::<u32>(pba) & 1,
    )
}

fn run(seed: u64) -> Result<(), &'static str> {
    let f = pci::find(VENDOR, DEVICE, 0).ok_or("no passthrough GPU 1234:5247 on the PCI bus")?;
    let id = f.read32(0);
    let class = f.read32(8) >> 8;
    let (size0, size2) = (bar_size(f, 0), bar_size(f, 2));
    let cap = f
        .capabilities()
        .find(|&(_, id)| id == 0x11)
        .map(|(at, _)| at)
        .ok_or("it has no MSI-X capability")?;
    let control = f.read32(cap) >> 16;
    let vectors = (control & 0x7ff) + 1;
    let table = f.read32(cap + 4);
    let pba = f.read32(cap + 8);
    // Memory decoding and bus mastering (left alone when already on: the first access
    // to the device itself is then the ID register's read).
    let command = f.read32(4);
    if command & 0x6 != 0x6 {
        f.write32(4, command | 0x6);
    }
    let (vram, regs) = (f.bar(0) as usize, f.bar(2) as usize);
    if table & 7 != 2 {
        return Err("its MSI-X table is not in BAR 2");
    }
    let magic = rd::<u32>(regs + REG_ID);
    if magic != MAGIC {
        println!("gpupt err the device does not answer (id register {magic:#x})");
        return Err("");
    }
    let vector = match VECTOR.load(Relaxed) {
        0 => {
            let v = apic::alloc_vector().ok_or("no APIC vector is left")?;
            VECTOR.store(v + 1, Relaxed);
            v
        }
        v => v - 1,
    };
    let entry = regs + (table & !7) as usize;
    wr::<u32>(entry, 0xfee0_0000 | apic::id() << 12);
    wr::<u32>(entry + 4, 0);
    wr::<u32>(entry + 8, (apic::DEVICE_VECTOR_BASE + vector) as u32);
    wr::<u32>(entry + 12, 0);
    f.write32(cap, f.read32(cap) | 1 << 31);

    let (src, dst) = (SRC.0.get() as usize, DST.0.get() as usize);
    for i in 0..4096 {
        wr::<u8>(src + i, byte(seed, i));
        wr::<u8>(dst + i, 0);
    }
    let irqs0 = apic::device_irqs(vector);
    if dma(regs, vector, CMD_TO_VRAM, src as u64)? != STATUS_DONE {
        return Err("the copy to VRAM failed");
    }
    let mut vram_bad = 0;
    for i in (0..4096).step_by(4) {
        let want = u32::from_le_bytes([
            byte(seed, i),
            byte(seed, i + 1),
            byte(seed, i + 2),
            byte(seed, i + 3),
        ]);
        if rd::<u32>(vram + VRAM_OFFSET as usize + i) != want {
            vram_bad += 1;
        }
    }
    if dma(regs, vector, CMD_FROM_VRAM, dst as u64)? != STATUS_DONE {
        return Err("the copy from VRAM failed");
    }
    let back_bad = (0..4096)
        .filter(|&i| rd::<u8>(dst + i) != byte(seed, i))
        .count();
    let sum = (0..4096).fold(0u32, |s, i| {
        s.wrapping_mul(31)
            .wrapping_add(u32::from(rd::<u8>(dst + i)))
    });
    let irqs = apic::device_irqs(vector) - irqs0;

    // The mask bits: vector 0's own, then the function's.
    if pba & 7 != 2 {
        return Err("its MSI-X PBA is not in BAR 2");
    }
    let pba = regs + (pba & !7) as usize;
    let (m1, p1, l1, q1) = masked_command(
        regs,
        pba,
        vector,
        src as u64,
        || wr::<u32>(entry + 12, 1),
        || wr::<u32>(entry + 12, 0),
    );
    let (m2, p2, l2, q2) = masked_command(
        regs,
        pba,
        vector,
        src as u64,
        || f.write32(cap, f.read32(cap) | 1 << 30),
        || f.write32(cap, f.read32(cap) & !(1 << 30)),
    );
    println!(
        "gpupt ok id={:04x}:{:04x} class={class:06x} bar0={vram:#x}/{size0} bar2={regs:#x}/{size2} msix={vectors} irqs={irqs} vram_mismatch={vram_bad} back_mismatch={back_bad} sum={sum:08x} mask={m1}/{p1}/{l1}/{q1} fmask={m2}/{p2}/{l2}/{q2}",
        id & 0xffff,
        id >> 16,
    );
    Ok(())
}

/// `gpupt SEED`.
pub fn command(seed: u64) {
    match run(seed) {
        Ok(()) | Err("") => {}
        Err(e) => println!("gpupt err {e}"),
    }
}
