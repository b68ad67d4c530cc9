//! The PCI function a guest sees for a passthrough device: the device's identity and BAR
//! sizes, with BARs placed by us and an MSI-X capability we emulate (the table lives in
//! our BAR, each vector's eventfd is handed to the device, which signals it directly: on
//! KVM that eventfd is an irqfd). Every other BAR access and the command register go to
//! the device; its DMA reaches guest RAM at guest-physical addresses.
//!
//! The device signals its vectors' eventfds itself, so the mask bits are kept by holding
//! a vector back ([`DirectVectors::hold`]): while a vector is masked (its own bit or the
//! function's) its signals wait in the eventfd, the PBA shows them, and unmasking sends
//! one that waited (PCI 3.0 §6.8.3.4).
//!
//! A device that stops answering (its process died) is cut off: reads return all-ones,
//! writes are dropped, [`Health`] keeps the reason, and the VM carries on.
use std::os::fd::RawFd;
use std::sync::Arc;

use super::{AccessError, DeviceAccess, DmaRegion, Health};
use crate::interrupt::MsiInterrupts;
use crate::pci::config::{COMMAND, SIZE};
use crate::pci::msix::{Msix, CONTROL_ENABLE, ENTRY_SIZE};
use crate::pci::{BarMove, ConfigSpace, PciDevice, PciId};

const CAP_MSIX: u8 = 0x11;
const STATUS_CAPABILITIES: u16 = 1 << 4;

/// The interrupt side of a device that signals its vectors' eventfds itself.
pub trait DirectVectors: MsiInterrupts {
    /// While `held`, vector `vector`'s signals wait in its eventfd instead of reaching the
    /// guest; letting go sends one that waited.
    fn hold(&self, vector: u16, held: bool) -> Result<(), String>;
    /// Whether held vector `vector` has a signal waiting.
    fn waiting(&self, vector: u16) -> bool;
}

/// Where the VMM put things for the device.
pub trait Placement {
    /// A guest-physical address for a BAR of `size` bytes (a power of two), aligned to it.
    fn bar(&mut self, size: u64) -> Result<u64, String>;
    /// `count` MSI-X vectors: how the table's routes reach the interrupt controller, and
    /// the eventfd that raises each vector.
    fn vectors(&mut self, count: u16) -> Result<(Arc<dyn DirectVectors>, Vec<RawFd>), String>;
}

/// The emulated MSI-X capability and where its table and PBA are in the device's BARs.
struct MsixEmulation {
    cap: usize,
    msix: Msix,
    vectors: Arc<dyn DirectVectors>,
    /// Which vectors are held back now.
    held: Vec<bool>,
    fds: Vec<RawFd>,
    table: (usize, u64, u64),
    pba: (usize, u64, u64),
    on_device: bool,
}

pub struct PassthroughPci {
    access: Box<dyn DeviceAccess>,
    name: String,
    config: ConfigSpace,
    /// Each BAR's region size on the device (0: none).
    region_sizes: [u64; 6],
    msix: Option<MsixEmulation>,
    dma: Vec<(u64, u64)>,
    health: Arc<Health>,
    failed: bool,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl PassthroughPci {
    /// Resets the device, reads its configuration space, places its memory BARs and MSI-X
    /// vectors through `place`, and maps `dma` (guest RAM) for it.
    pub fn new(
        mut access: Box<dyn DeviceAccess>,
        health: Arc<Health>,
        place: &mut dyn Placement,
        dma: &[DmaRegion],
    ) -> Result<Self, String> {
        let name = access.describe();
        let fail = |what: &str, e: AccessError| format!("{name}: {what}: {e}");
        access.reset().map_err(|e| fail("reset", e))?;
        let mut cfg = [0u8; SIZE];
        access
            .config_read(0, &mut cfg)
            .map_err(|e| fail("reading its configuration space", e))?;
        let vendor = u16_at(&cfg, 0);
        if vendor == 0xffff || vendor == 0 {
            return Err(format!(
                "{name}: no PCI function answers (vendor ID {vendor:#06x})"
            ));
        }
        let id = PciId {
            vendor,
            device: u16_at(&cfg, 2),
            class: [cfg[0x0b], cfg[0x0a], cfg[0x09]],
            revision: cfg[0x08],
            subsystem_vendor: u16_at(&cfg, 0x2c),
            subsystem: u16_at(&cfg, 0x2e),
        };
        let mut config = ConfigSpace::new(id);
        let mut region_sizes = [0u64; 6];
        let mut bar = 0;
        while bar < 6 {
            let raw = u32_at(&cfg, 0x10 + 4 * bar);
            let wide = raw & 1 == 0 && (raw >> 1) & 3 == 2;
            let size = access.region(bar as u32).map_or(0, |r| r.size);
            if size > 0 {
                if raw & 1 != 0 {
                    tracing::warn!(
                        "{name}: BAR {bar} is an I/O-port BAR, which is not passed through"
                    );
                } else {
                    if size > 1 << 31 {
                        return Err(format!(
                            "{name}: BAR {bar} has {size} bytes; BARs above 2 GiB are not supported"
                        ));
                    }
                    let ours = size.next_power_of_two().max(4096);
                    let at = place
                        .bar(ours)
                        .map_err(|e| format!("{name}: BAR {bar}: {e}"))?;
                    let at = u32::try_from(at)
                        .map_err(|_| format!("{name}: BAR {bar} placed above 4 GiB"))?;
                    config.add_bar(bar, ours, at);
                    region_sizes[bar] = size;
                }
            }
            bar += if wide { 2 } else { 1 };
        }

        let mut msix = None;
        if u16_at(&cfg, 0x06) & STATUS_CAPABILITIES != 0 {
            let mut at = usize::from(cfg[0x34] & 0xfc);
            let mut left = 48;
            while at >= 0x40 && at + 12 <= SIZE && left > 0 {
                left -= 1;
                if cfg[at] == CAP_MSIX {
                    let table_size = (u16_at(&cfg, at + 2) & 0x7ff) + 1;
                    let device_vectors = access
                        .msix_vectors()
                        .map_err(|e| fail("asking its MSI-X vectors", e))?;
                    let n = table_size.min(u16::try_from(device_vectors).unwrap_or(u16::MAX));
                    if n == 0 {
                        break;
                    }
                    let table = u32_at(&cfg, at + 4);
                    let pba = u32_at(&cfg, at + 8);
                    let (tbar, pbar) = ((table & 7) as usize, (pba & 7) as usize);
                    if tbar >= 6 || pbar >= 6 || region_sizes[tbar] == 0 || region_sizes[pbar] == 0
                    {
                        return Err(format!(
                            "{name}: its MSI-X table or PBA is in no memory BAR"
                        ));
                    }
                    let (irq, fds) = place
                        .vectors(n)
                        .map_err(|e| format!("{name}: MSI-X vectors: {e}"))?;
                    let mut body = vec![CAP_MSIX, 0];
                    body.extend_from_slice(&(n - 1).to_le_bytes());
                    body.extend_from_slice(&table.to_le_bytes());
                    body.extend_from_slice(&pba.to_le_bytes());
                    let cap =
                        config.add_capability(&body, &[0, 0, 0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]);
                    msix = Some(MsixEmulation {
                        cap,
                        msix: Msix::new(n, irq.clone()),
                        vectors: irq,
                        held: vec![false; usize::from(n)],
                        fds,
                        table: (tbar, u64::from(table & !7), u64::from(n) * ENTRY_SIZE),
                        pba: (pbar, u64::from(pba & !7), u64::from(n).div_ceil(64) * 8),
                        on_device: false,
                    });
                    break;
                }
                tracing::info!(
                    "{name}: capability {:#04x} at {at:#x} is not shown to the guest",
                    cfg[at]
                );
                at = usize::from(cfg[at + 1] & 0xfc);
            }
        }
        if msix.is_none() {
            tracing::warn!("{name}: no MSI-X capability; the device cannot interrupt the guest");
        }

        let mut mapped = Vec::new();
        for r in dma {
            access
                .dma_map(r)
                .map_err(|e| fail(&format!("mapping guest RAM at {:#x} for DMA", r.iova), e))?;
            mapped.push((r.iova, r.size));
        }
        tracing::info!(
            "{name}: PCI {:04x}:{:04x} class {:02x}{:02x}{:02x}, BARs {:?} bytes, {} MSI-X vector(s), {} DMA region(s)",
            id.vendor,
            id.device,
            id.class[0],
            id.class[1],
            id.class[2],
            region_sizes,
            msix.as_ref().map_or(0, |m| m.msix.vectors()),
            mapped.len()
        );
        let mut d = Self {
            access,
            name,
            config,
            region_sizes,
            msix,
            dma: mapped,
            health,
            failed: false,
        };
        // Every vector starts masked.
        d.sync_masks();
        Ok(d)
    }

    /// Holds back the vectors the guest masked, lets go of the others.
    fn sync_masks(&mut self) {
        let Some(m) = &mut self.msix else { return };
        for v in 0..m.held.len() {
            let want = m.msix.masked(v as u16);
            if want != m.held[v] {
                match m.vectors.hold(v as u16, want) {
                    Ok(()) => m.held[v] = want,
                    Err(e) => tracing::warn!(
                        "{}: cannot {} MSI-X vector {v}: {e}",
                        self.name,
                        if want { "hold back" } else { "let go of" }
                    ),
                }
            }
        }
    }

    /// The PBA: a vector's bit is set while it is held back with a signal waiting.
    fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let Some(m) = &self.msix else { return };
        for (k, byte) in data.iter_mut().enumerate() {
            let base = (offset as usize + k) * 8;
            *byte = (0..8)
                .filter(|bit| {
                    let v = base + bit;
                    m.held.get(v).copied().unwrap_or(false) && m.vectors.waiting(v as u16)
                })
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Asks the device for its vendor ID: a device that stopped answering is found out
    /// even when the guest leaves it alone.
    pub fn probe(&mut self) {
        if self.failed {
            return;
        }
        let mut id = [0u8; 2];
        if let Err(e) = self.access.config_read(0, &mut id) {
            self.fail(e);
        }
    }

    fn fail(&mut self, e: AccessError) {
        self.failed = true;
        self.health.fail(format!(
            "passthrough device {} stopped answering: {e}",
            self.name
        ));
    }

    fn sync_msix(&mut self) {
        let Some(m) = &mut self.msix else { return };
        let control = self.config.u16_at(m.cap + 2);
        m.msix.set_control(control);
        self.sync_masks();
        let Some(m) = &mut self.msix else { return };
        let want = control & CONTROL_ENABLE != 0;
        if want == m.on_device || self.failed {
            return;
        }
        let r = if want {
            self.access.enable_msix(&m.fds)
        } else {
            self.access.disable_msix()
        };
        match r {
            Ok(()) => m.on_device = want,
            Err(e) => self.fail(e),
        }
    }

    /// Whether `offset` in `bar` is in the emulated table (Some(true)) or PBA (Some(false)).
    fn msix_part(&self, bar: usize, offset: u64, len: u64) -> Option<(bool, u64)> {
        let m = self.msix.as_ref()?;
        let inside = |(b, start, size): (usize, u64, u64)| {
            (b == bar && offset >= start && offset + len <= start + size).then(|| offset - start)
        };
        inside(m.table)
            .map(|o| (true, o))
            .or_else(|| inside(m.pba).map(|o| (false, o)))
    }
}

impl PciDevice for PassthroughPci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) -> Option<BarMove> {
        let moved = self.config.write(offset, data);
        let end = offset + data.len();
        if offset < COMMAND + 2 && end > COMMAND && !self.failed {
            let command = self.config.command().to_le_bytes();
            if let Err(e) = self.access.config_write(COMMAND as u64, &command) {
                self.fail(e);
            }
        }
        if let Some(cap) = self.msix.as_ref().map(|m| m.cap) {
            if offset < cap + 4 && end > cap + 2 {
                self.sync_msix();
            }
        }
        moved
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        if let Some((table, off)) = self.msix_part(bar, offset, len) {
            if table {
                let m = &self.msix.as_ref().expect("msix_part found it").msix;
                m.read_table(off, data)
            } else {
                self.read_pba(off, data)
            }
            return;
        }
        data.fill(0xff);
        if self.failed || offset + len > self.region_sizes.get(bar).copied().unwrap_or(0) {
            return;
        }
        if let Err(e) = self.access.read(bar as u32, offset, data) {
            data.fill(0xff);
            self.fail(e);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if let Some((table, off)) = self.msix_part(bar, offset, len) {
            if table {
                let m = &mut self.msix.as_mut().expect("msix_part found it").msix;
                m.write_table(off, data);
                self.sync_masks();
            }
            return;
        }
        if self.failed || offset + len > self.region_sizes.get(bar).copied().unwrap_or(0) {
            return;
        }
        if let Err(e) = self.access.write(bar as u32, offset, data) {
            self.fail(e);
        }
    }
}

impl Drop for PassthroughPci {
    fn drop(&mut self) {
        if self.failed {
            return;
        }
        if self.msix.as_ref().is_some_and(|m| m.on_device) {
            let _ = self.access.disable_msix();
        }
        for (iova, size) in std::mem::take(&mut self.dma) {
            let _ = self.access.dma_unmap(iova, size);
        }
    }
}
