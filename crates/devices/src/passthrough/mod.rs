//! PCI passthrough: one device-access trait ([`DeviceAccess`]: configuration space,
//! regions, MSI-X to eventfds, DMA of guest memory, reset) with two implementations, a
//! host device through the kernel's VFIO ([`vfio::HostDevice`]) and a device served by
//! another process over vfio-user ([`vfio_user::UserDevice`]); the PCI function the guest
//! sees on our bus is built on the trait ([`device::PassthroughPci`]). [`gpu_server`] is
//! a GPU-like device served over vfio-user, the device of the tests.
pub mod device;
pub mod gpu_server;
pub mod link;
pub mod vfio;
pub mod vfio_user;

use std::os::fd::RawFd;
use std::sync::Mutex;

pub use device::{DirectVectors, PassthroughPci, Placement};

/// Region indices of a VFIO PCI device: BARs 0..=5, then the expansion ROM and the
/// configuration space.
pub const CONFIG_REGION: u32 = 7;
/// The IRQ index of MSI-X.
pub const MSIX_IRQ: u32 = 2;

/// An access the device did not complete; the text says what and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AccessError(pub String);

/// What a region offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionInfo {
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    /// The region can be mapped into our address space.
    pub mappable: bool,
}

/// One range of guest memory the device may reach by DMA: guest-physical `iova`, backed
/// by `fd` at `fd_offset` and mapped in this process at `host`.
#[derive(Debug, Clone, Copy)]
pub struct DmaRegion {
    pub iova: u64,
    pub size: u64,
    pub fd: RawFd,
    pub fd_offset: u64,
    pub host: usize,
}

/// How the VMM reaches a PCI device that is not its own model.
pub trait DeviceAccess: Send {
    /// For messages: `vfio-user /run/gpu.sock`, `VFIO 0000:01:00.0`.
    fn describe(&self) -> String;
    /// Region `index`'s size and abilities; `None` if the device has no such region.
    fn region(&self, index: u32) -> Option<RegionInfo>;
    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), AccessError>;
    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), AccessError>;
    /// MSI-X vectors the device has.
    fn msix_vectors(&mut self) -> Result<u32, AccessError>;
    /// The device signals vector `i` by writing to `fds[i]`.
    fn enable_msix(&mut self, fds: &[RawFd]) -> Result<(), AccessError>;
    fn disable_msix(&mut self) -> Result<(), AccessError>;
    /// Lets the device reach `region` by DMA at its guest-physical address.
    fn dma_map(&mut self, region: &DmaRegion) -> Result<(), AccessError>;
    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), AccessError>;
    fn reset(&mut self) -> Result<(), AccessError>;

    fn config_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), AccessError> {
        self.read(CONFIG_REGION, offset, data)
    }
    fn config_write(&mut self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        self.write(CONFIG_REGION, offset, data)
    }
}

/// Whether a passthrough device still answers: the first failure is kept, with the
/// device's name, for the GPU's state and `ray gpu status`.
#[derive(Debug, Default)]
pub struct Health {
    error: Mutex<Option<String>>,
}

impl Health {
    pub fn fail(&self, why: String) {
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            tracing::error!("{why}; the VM keeps running without the device");
            *e = Some(why);
        }
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests;
