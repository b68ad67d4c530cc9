//! A GPU-like PCI device served over vfio-user from its own process (`ray gpu-device
//! serve`): a display controller with a VRAM BAR (BAR 0), a register BAR (BAR 2, with the
//! MSI-X table and PBA at its end) and a DMA engine that copies between guest memory and
//! VRAM. A doorbell starts the copy; MSI-X vector 0 tells the guest it is done.
//!
//! Registers (BAR 2, 32-bit): see the `REG_*` constants. Guest addresses are checked
//! against the DMA mappings the VMM gave; a bad command ends in an error status, never in
//! an access outside a mapping or outside VRAM.
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{IrqInfo, Server, ServerBackend, ServerRegion};

use super::{CONFIG_REGION, MSIX_IRQ};

pub const VENDOR: u16 = 0x1234;
pub const DEVICE: u16 = 0x5247;
/// Display controller, "other".
pub const CLASS: [u8; 3] = [0x03, 0x80, 0x00];
pub const VRAM_BAR: u32 = 0;
pub const REGS_BAR: u32 = 2;
pub const VRAM_SIZE: u64 = 1 << 20;
pub const REGS_SIZE: u64 = 4096;
pub const MSIX_VECTORS: u32 = 2;
pub const MSIX_TABLE: u32 = 0x800;
pub const MSIX_PBA: u32 = 0xc00;

/// Reads as [`MAGIC`].
pub const REG_ID: u64 = 0x00;
pub const MAGIC: u32 = 0x4750_5952;
pub const REG_VRAM_SIZE: u64 = 0x04;
pub const REG_WIDTH: u64 = 0x08;
pub const REG_HEIGHT: u64 = 0x0c;
pub const REG_DMA_ADDR_LO: u64 = 0x10;
pub const REG_DMA_ADDR_HI: u64 = 0x14;
pub const REG_DMA_LEN: u64 = 0x18;
pub const REG_VRAM_OFFSET: u64 = 0x1c;
/// [`CMD_TO_VRAM`] or [`CMD_FROM_VRAM`].
pub const REG_COMMAND: u64 = 0x20;
/// Any write runs the command.
pub const REG_DOORBELL: u64 = 0x24;
/// [`STATUS_DONE`] or an `STATUS_ERR_*` code.
pub const REG_STATUS: u64 = 0x28;
/// Commands completed (done or failed).
pub const REG_COMPLETED: u64 = 0x2c;
pub const CMD_TO_VRAM: u32 = 1;
pub const CMD_FROM_VRAM: u32 = 2;
pub const STATUS_DONE: u32 = 1;
pub const STATUS_ERR_GUEST_RANGE: u32 = 0x8000_0001;
pub const STATUS_ERR_VRAM_RANGE: u32 = 0x8000_0002;
pub const STATUS_ERR_COMMAND: u32 = 0x8000_0003;
const REGS: usize = 16;

/// One DMA mapping: guest-physical `iova`, mapped here at `ptr`.
struct Mapping {
    iova: u64,
    size: u64,
    ptr: *mut u8,
}

/// The device's state.
pub struct GpuDevice {
    config: [u8; 256],
    regs: [u32; REGS],
    vram: Vec<u8>,
    maps: Vec<Mapping>,
    irqs: Vec<File>,
}

fn config_space() -> [u8; 256] {
    let mut c = [0u8; 256];
    c[0..2].copy_from_slice(&VENDOR.to_le_bytes());
    c[2..4].copy_from_slice(&DEVICE.to_le_bytes());
    c[6] = 1 << 4; // status: capability list
    c[9] = CLASS[2];
    c[0x0a] = CLASS[1];
    c[0x0b] = CLASS[0];
    c[0x2c..0x2e].copy_from_slice(&VENDOR.to_le_bytes());
    c[0x2e..0x30].copy_from_slice(&DEVICE.to_le_bytes());
    c[0x34] = 0x40;
    // MSI-X: table and PBA at the end of the register BAR.
    c[0x40] = 0x11;
    c[0x42..0x44].copy_from_slice(&(MSIX_VECTORS as u16 - 1).to_le_bytes());
    c[0x44..0x48].copy_from_slice(&(MSIX_TABLE | REGS_BAR).to_le_bytes());
    c[0x48..0x4c].copy_from_slice(&(MSIX_PBA | REGS_BAR).to_le_bytes());
    c
}

impl Default for GpuDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl GpuDevice {
    pub fn new() -> Self {
        let mut d = Self {
            config: config_space(),
            regs: [0; REGS],
            vram: vec![0; VRAM_SIZE as usize],
            maps: Vec::new(),
            irqs: Vec::new(),
        };
        d.reset_registers();
        d
    }

    fn reset_registers(&mut self) {
        self.regs = [0; REGS];
        self.regs[(REG_ID / 4) as usize] = MAGIC;
        self.regs[(REG_VRAM_SIZE / 4) as usize] = VRAM_SIZE as u32;
        self.regs[(REG_WIDTH / 4) as usize] = 640;
        self.regs[(REG_HEIGHT / 4) as usize] = 400;
        self.vram.fill(0);
    }

    fn reg(&self, r: u64) -> u32 {
        self.regs[(r / 4) as usize]
    }

    /// Where guest range [addr, addr+len) is mapped here, if one mapping holds all of it.
    fn guest(&self, addr: u64, len: u64) -> Option<*mut u8> {
        let end = addr.checked_add(len)?;
        self.maps.iter().find_map(|m| {
            (addr >= m.iova && end <= m.iova + m.size)
                // SAFETY: the offset is inside the mapping of `m.size` bytes.
                .then(|| unsafe { m.ptr.add((addr - m.iova) as usize) })
        })
    }

    /// Runs the programmed command; returns the status.
    fn run(&mut self) -> u32 {
        let addr =
            u64::from(self.reg(REG_DMA_ADDR_HI)) << 32 | u64::from(self.reg(REG_DMA_ADDR_LO));
        let len = u64::from(self.reg(REG_DMA_LEN));
        let voff = u64::from(self.reg(REG_VRAM_OFFSET));
        let cmd = self.reg(REG_COMMAND);
        if cmd != CMD_TO_VRAM && cmd != CMD_FROM_VRAM {
            return STATUS_ERR_COMMAND;
        }
        if voff.checked_add(len).is_none_or(|e| e > VRAM_SIZE) {
            return STATUS_ERR_VRAM_RANGE;
        }
        let Some(guest) = self.guest(addr, len) else {
            return STATUS_ERR_GUEST_RANGE;
        };
        let vram = self.vram[voff as usize..(voff + len) as usize].as_mut_ptr();
        // SAFETY: `guest` starts `len` bytes of a live shared mapping of guest RAM
        // (checked by `guest`), `vram` `len` bytes of our own VRAM; they do not overlap.
        // Guest RAM is only reached through this raw copy, never through a reference.
        unsafe {
            if cmd == CMD_TO_VRAM {
                std::ptr::copy_nonoverlapping(guest, vram, len as usize);
            } else {
                std::ptr::copy_nonoverlapping(vram, guest, len as usize);
            }
        }
        STATUS_DONE
    }

    fn doorbell(&mut self) {
        let status = self.run();
        self.regs[(REG_STATUS / 4) as usize] = status;
        let done = &mut self.regs[(REG_COMPLETED / 4) as usize];
        *done = done.wrapping_add(1);
        if let Some(irq) = self.irqs.first_mut() {
            if let Err(e) = irq.write_all(&1u64.to_le_bytes()) {
                tracing::warn!("cannot raise MSI-X vector 0: {e}");
            }
        }
    }

    fn read_regs(&self, offset: u64, data: &mut [u8]) {
        let bytes: Vec<u8> = self.regs.iter().flat_map(|r| r.to_le_bytes()).collect();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_regs(&mut self, offset: u64, data: &[u8]) {
        let mut bytes: Vec<u8> = self.regs.iter().flat_map(|r| r.to_le_bytes()).collect();
        for (i, b) in data.iter().enumerate() {
            let at = offset as usize + i;
            // Read-only: ID, VRAM size, status, completed.
            let reg = (at / 4) as u64 * 4;
            if at < bytes.len()
                && ![REG_ID, REG_VRAM_SIZE, REG_STATUS, REG_COMPLETED].contains(&reg)
            {
                bytes[at] = *b;
            }
        }
        for (r, chunk) in self.regs.iter_mut().zip(bytes.chunks(4)) {
            *r = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        let end = offset + data.len() as u64;
        if offset < REG_DOORBELL + 4 && end > REG_DOORBELL {
            self.doorbell();
        }
    }

    fn unmap_all(&mut self) {
        for m in self.maps.drain(..) {
            // SAFETY: `m.ptr` is a mapping of `m.size` bytes this device made and nothing
            // uses any longer.
            unsafe { libc::munmap(m.ptr.cast(), m.size as usize) };
        }
    }
}

impl Drop for GpuDevice {
    fn drop(&mut self) {
        self.unmap_all();
    }
}

impl ServerBackend for GpuDevice {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        // Out-of-range reads give all-ones (an error reply would not be understood by the
        // client for region accesses).
        data.fill(0xff);
        let end = offset.saturating_add(data.len() as u64);
        match region {
            CONFIG_REGION if end <= 256 => {
                data.copy_from_slice(&self.config[offset as usize..end as usize])
            }
            VRAM_BAR if end <= VRAM_SIZE => {
                data.copy_from_slice(&self.vram[offset as usize..end as usize])
            }
            REGS_BAR if end <= REGS_SIZE => self.read_regs(offset, data),
            _ => {}
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = offset.saturating_add(data.len() as u64);
        match region {
            // Only the command register is the guest's to change here.
            CONFIG_REGION if offset >= 4 && end <= 6 => {
                self.config[offset as usize..end as usize].copy_from_slice(data)
            }
            VRAM_BAR if end <= VRAM_SIZE => {
                self.vram[offset as usize..end as usize].copy_from_slice(data)
            }
            REGS_BAR if end <= REGS_SIZE => self.write_regs(offset, data),
            _ => {}
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: vfio_user::DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        let fd = fd.ok_or_else(|| std::io::Error::other("a DMA map without a file descriptor"))?;
        let len = usize::try_from(size).map_err(std::io::Error::other)?;
        // SAFETY: a new shared mapping of `fd`, placed by the kernel; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        tracing::info!("DMA map: guest {address:#x}, {size} bytes");
        self.maps.push(Mapping {
            iova: address,
            size,
            ptr: ptr.cast(),
        });
        Ok(())
    }

    fn dma_unmap(
        &mut self,
        _flags: vfio_user::DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> std::io::Result<()> {
        if let Some(i) = self
            .maps
            .iter()
            .position(|m| m.iova == address && m.size == size)
        {
            let m = self.maps.remove(i);
            // SAFETY: our own mapping, no longer in the list.
            unsafe { libc::munmap(m.ptr.cast(), m.size as usize) };
        }
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        self.reset_registers();
        self.irqs.clear();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        _start: u32,
        _count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        if index == MSIX_IRQ {
            self.irqs = if flags & VFIO_IRQ_SET_DATA_EVENTFD != 0 {
                fds
            } else {
                Vec::new()
            };
            tracing::info!("MSI-X: {} vector(s) connected", self.irqs.len());
        }
        Ok(())
    }
}

pub(crate) fn regions() -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = match index {
                VRAM_BAR => VRAM_SIZE,
                REGS_BAR => REGS_SIZE,
                CONFIG_REGION => 256,
                _ => 0,
            };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    index,
                    size,
                    flags: if size > 0 {
                        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
                    } else {
                        0
                    },
                    ..Default::default()
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

pub(crate) fn irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| IrqInfo {
            index,
            count: if index == MSIX_IRQ { MSIX_VECTORS } else { 0 },
            flags: if index == MSIX_IRQ {
                VFIO_IRQ_INFO_EVENTFD
            } else {
                0
            },
        })
        .collect()
}

/// Listens on `socket` and serves one VMM after another (each gets a freshly reset
/// device), until the process ends.
pub fn serve(socket: &Path, ready: impl FnOnce()) -> Result<(), String> {
    let server = Server::new(socket, true, irqs(), regions())
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    ready();
    loop {
        let mut device = GpuDevice::new();
        match server.run(&mut device) {
            Ok(()) => tracing::info!("the VMM disconnected; serving the next one"),
            Err(e @ vfio_user::Error::SocketAccept(_)) => return Err(e.to_string()),
            Err(e) => tracing::warn!("the VMM's connection ended: {e}"),
        }
    }
}
