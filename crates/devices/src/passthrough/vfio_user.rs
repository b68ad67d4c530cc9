//! [`DeviceAccess`] over vfio-user: the device lives in another process, reached through
//! a Unix socket ([`Link`], every request bounded in time); guest memory is shared with it
//! by file descriptor (the guest RAM memfd).
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

use super::link::{Link, LinkError};
use super::{AccessError, DeviceAccess, DmaRegion, RegionInfo, MSIX_IRQ};

/// Largest transfer in one message (the protocol's default limit is 1 MiB).
const MAX_TRANSFER: usize = 64 << 10;

pub struct UserDevice {
    link: Link,
    socket: PathBuf,
}

impl UserDevice {
    /// Connects to the device server at `socket` and learns its regions; the device has
    /// `timeout` to answer each request.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, AccessError> {
        let link = Link::connect(socket, timeout).map_err(|e| {
            AccessError(format!(
                "cannot reach the vfio-user device at {}: {e}",
                socket.display()
            ))
        })?;
        Ok(Self {
            link,
            socket: socket.to_path_buf(),
        })
    }

    fn err(&self, what: &str, e: LinkError) -> AccessError {
        let at = self.socket.display();
        AccessError(match e {
            LinkError::Timeout(t) => format!(
                "the vfio-user device at {at} did not answer {what} within {} ms (the link is closed)",
                t.as_millis()
            ),
            e => format!("the vfio-user device at {at} did not answer {what}: {e}"),
        })
    }

    /// The link, for what the trait does not cover (the regions' files).
    pub fn link(&self) -> &Link {
        &self.link
    }
}

impl DeviceAccess for UserDevice {
    fn describe(&self) -> String {
        format!("vfio-user {}", self.socket.display())
    }

    fn region(&self, index: u32) -> Option<RegionInfo> {
        let r = self.link.region(index)?;
        Some(RegionInfo {
            size: r.size,
            readable: r.flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: r.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mappable: r.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && r.file.is_some(),
        })
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), AccessError> {
        let mut at = offset;
        for chunk in data.chunks_mut(MAX_TRANSFER) {
            if let Err(e) = self.link.region_read(region, at, chunk) {
                return Err(self.err(&format!("a read of region {region} at {at:#x}"), e));
            }
            at += chunk.len() as u64;
        }
        Ok(())
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        let mut at = offset;
        for chunk in data.chunks(MAX_TRANSFER) {
            if let Err(e) = self.link.region_write(region, at, chunk) {
                return Err(self.err(&format!("a write to region {region} at {at:#x}"), e));
            }
            at += chunk.len() as u64;
        }
        Ok(())
    }

    fn msix_vectors(&mut self) -> Result<u32, AccessError> {
        self.link
            .irq_count(MSIX_IRQ)
            .map_err(|e| self.err("the MSI-X information request", e))
    }

    fn enable_msix(&mut self, fds: &[RawFd]) -> Result<(), AccessError> {
        self.link
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
        self.link
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
        self.link
            .dma_map(r.fd_offset, r.iova, r.size, r.fd)
            .map_err(|e| self.err("a DMA map", e))
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), AccessError> {
        self.link
            .dma_unmap(iova, size)
            .map_err(|e| self.err("a DMA unmap", e))
    }

    fn reset(&mut self) -> Result<(), AccessError> {
        self.link.reset().map_err(|e| self.err("a reset", e))
    }
}
