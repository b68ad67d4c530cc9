//! [`DeviceAccess`] over vfio-user: the device lives in another process, reached through
//! a Unix socket; guest memory is shared with it by file descriptor (the guest RAM memfd).
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

use super::{AccessError, DeviceAccess, DmaRegion, RegionInfo, MSIX_IRQ};

/// Largest transfer in one message (the protocol's default limit is 1 MiB).
const MAX_TRANSFER: usize = 64 << 10;

pub struct UserDevice {
    client: vfio_user::Client,
    socket: PathBuf,
}

impl UserDevice {
    /// Connects to the device server at `socket` and learns its regions.
    pub fn connect(socket: &Path) -> Result<Self, AccessError> {
        let client = vfio_user::Client::new(socket).map_err(|e| {
            AccessError(format!(
                "cannot reach the vfio-user device at {}: {e}",
                socket.display()
            ))
        })?;
        Ok(Self {
            client,
            socket: socket.to_path_buf(),
        })
    }

    fn err(&self, what: &str, e: vfio_user::Error) -> AccessError {
        AccessError(format!(
            "the vfio-user device at {} did not answer {what}: {e}",
            self.socket.display()
        ))
    }
}

impl DeviceAccess for UserDevice {
    fn describe(&self) -> String {
        format!("vfio-user {}", self.socket.display())
    }

    fn region(&self, index: u32) -> Option<RegionInfo> {
        let r = self.client.region(index)?;
        Some(RegionInfo {
            size: r.size,
            readable: r.flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: r.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mappable: r.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && r.file_offset.is_some(),
        })
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), AccessError> {
        let mut at = offset;
        for chunk in data.chunks_mut(MAX_TRANSFER) {
            self.client
                .region_read(region, at, chunk)
                .map_err(|e| self.err(&format!("a read of region {region}"), e))?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        let mut at = offset;
        for chunk in data.chunks(MAX_TRANSFER) {
            self.client
                .region_write(region, at, chunk)
                .map_err(|e| self.err(&format!("a write to region {region}"), e))?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    fn msix_vectors(&mut self) -> Result<u32, AccessError> {
        let info = self
            .client
            .get_irq_info(MSIX_IRQ)
            .map_err(|e| self.err("the MSI-X information request", e))?;
        Ok(info.count)
    }

    fn enable_msix(&mut self, fds: &[RawFd]) -> Result<(), AccessError> {
        self.client
            .set_irqs(
                MSIX_IRQ,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                fds.len() as u32,
                fds,
            )
            .map_err(|e| self.err("the MSI-X set-up", e))
    }

    fn disable_msix(&mut self) -> Result<(), AccessError> {
        self.client
            .set_irqs(
                MSIX_IRQ,
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                0,
                &[],
            )
            .map_err(|e| self.err("the MSI-X tear-down", e))
    }

    fn dma_map(&mut self, r: &DmaRegion) -> Result<(), AccessError> {
        self.client
            .dma_map(r.fd_offset, r.iova, r.size, r.fd)
            .map_err(|e| self.err("a DMA map", e))
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), AccessError> {
        self.client
            .dma_unmap(iova, size)
            .map_err(|e| self.err("a DMA unmap", e))
    }

    fn reset(&mut self) -> Result<(), AccessError> {
        // The client's own `resettable()` reports the opposite of the server's flag, so
        // the reset is simply asked for; a device without one answers anyway.
        self.client.reset().map_err(|e| self.err("a reset", e))
    }
}

impl Drop for UserDevice {
    fn drop(&mut self) {
        let _ = self.client.shutdown();
    }
}
