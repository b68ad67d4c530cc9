//! [`DeviceAccess`] through the kernel's VFIO (a host PCI device bound to vfio-pci, its
//! IOMMU group in a VFIO container), and what this host offers for it: passthrough needs
//! an IOMMU (`/sys/kernel/iommu_groups` not empty), the VFIO container device
//! (`/dev/vfio/vfio`) and the vfio-pci driver, with the device bound to it.
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use vfio_bindings::bindings::vfio::{
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioContainer, VfioDevice};
use vmm_sys_util::eventfd::EventFd;

use super::{AccessError, DeviceAccess, DmaRegion, RegionInfo, MSIX_IRQ};

const SYS_PCI: &str = "/sys/bus/pci/devices";
const IOMMU_GROUPS: &str = "/sys/kernel/iommu_groups";
const VFIO_CONTAINER: &str = "/dev/vfio/vfio";
const VFIO_PCI_DRIVER: &str = "/sys/bus/pci/drivers/vfio-pci";

/// What the host offers for VFIO passthrough.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HostSupport {
    pub iommu_groups: usize,
    pub vfio_container: bool,
    pub vfio_pci_driver: bool,
    /// Each missing piece, in words naming where it was looked for.
    pub missing: Vec<String>,
}

impl HostSupport {
    pub fn detect() -> Self {
        let iommu_groups = std::fs::read_dir(IOMMU_GROUPS).map_or(0, |d| d.count());
        let vfio_container = Path::new(VFIO_CONTAINER).exists();
        let vfio_pci_driver = Path::new(VFIO_PCI_DRIVER).is_dir();
        let mut missing = Vec::new();
        if iommu_groups == 0 {
            missing.push(format!(
                "no IOMMU ({IOMMU_GROUPS} is empty: the host has no IOMMU or it is off, \
                 e.g. intel_iommu=on / amd_iommu=on)"
            ));
        }
        if !vfio_container {
            missing.push(format!(
                "no VFIO container device ({VFIO_CONTAINER}: the vfio module is not loaded)"
            ));
        }
        if !vfio_pci_driver {
            missing.push(format!(
                "no vfio-pci driver ({VFIO_PCI_DRIVER}: the vfio-pci module is not loaded)"
            ));
        }
        Self {
            iommu_groups,
            vfio_container,
            vfio_pci_driver,
            missing,
        }
    }

    pub fn ready(&self) -> bool {
        self.missing.is_empty()
    }
}

/// A host PCI function as `ray gpu list --host` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HostPciDevice {
    pub bdf: String,
    pub vendor: String,
    pub device: String,
    pub class: String,
    pub driver: Option<String>,
    pub iommu_group: Option<String>,
}

/// The host's display controllers (PCI class 0x03).
pub fn host_gpus() -> Vec<HostPciDevice> {
    let Ok(dir) = std::fs::read_dir(SYS_PCI) else {
        return Vec::new();
    };
    let read = |p: &Path, f: &str| {
        std::fs::read_to_string(p.join(f))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let link = |p: &Path, f: &str| {
        std::fs::read_link(p.join(f))
            .ok()
            .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    let mut out: Vec<HostPciDevice> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| read(p, "class").starts_with("0x03"))
        .map(|p| HostPciDevice {
            bdf: p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            vendor: read(&p, "vendor"),
            device: read(&p, "device"),
            class: read(&p, "class"),
            driver: link(&p, "driver"),
            iommu_group: link(&p, "iommu_group"),
        })
        .collect();
    out.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    out
}

/// `DDDD:BB:DD.F` (or `BB:DD.F`, domain 0) in canonical form.
pub fn parse_bdf(s: &str) -> Result<String, String> {
    let bad = || format!("'{s}' is not a PCI address (DDDD:BB:DD.F, e.g. 0000:01:00.0)");
    let full = if s.matches(':').count() == 1 {
        format!("0000:{s}")
    } else {
        s.to_string()
    };
    let (domain, rest) = full.split_once(':').ok_or_else(bad)?;
    let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
    let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |t: &str, len: usize, max: u32| {
        (t.len() == len && t.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(t, 16).ok())
            .flatten()
            .filter(|v| *v <= max)
            .ok_or_else(bad)
    };
    let (d, b, v, f) = (
        hex(domain, 4, 0xffff)?,
        hex(bus, 2, 0xff)?,
        hex(dev, 2, 0x1f)?,
        hex(func, 1, 7)?,
    );
    Ok(format!("{d:04x}:{b:02x}:{v:02x}.{f:x}"))
}

/// Checks, before a VM starts, that host device `bdf` can be passed through: the host's
/// IOMMU and VFIO, the device, its IOMMU group and its driver. The error names every
/// missing piece.
pub fn check_host_device(bdf: &str) -> Result<PathBuf, String> {
    let bdf = parse_bdf(bdf)?;
    let host = HostSupport::detect();
    let mut missing = host.missing.clone();
    let path = Path::new(SYS_PCI).join(&bdf);
    if !path.exists() {
        missing.push(format!(
            "no PCI device {bdf} on this host ({})",
            path.display()
        ));
    } else {
        if host.iommu_groups > 0 && !path.join("iommu_group").exists() {
            missing.push(format!("{bdf} is in no IOMMU group"));
        }
        let driver = std::fs::read_link(path.join("driver"))
            .ok()
            .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()));
        if driver.as_deref() != Some("vfio-pci") {
            missing.push(format!(
                "{bdf} is bound to {} rather than vfio-pci",
                driver.as_deref().unwrap_or("no driver")
            ));
        }
    }
    if missing.is_empty() {
        Ok(path)
    } else {
        Err(format!(
            "GPU passthrough of host device {bdf} is not possible here: {}",
            missing.join("; ")
        ))
    }
}

/// A host device through VFIO.
pub struct HostDevice {
    bdf: String,
    container: Arc<VfioContainer>,
    device: VfioDevice,
    msix: Vec<EventFd>,
}

impl HostDevice {
    pub fn open(bdf: &str) -> Result<Self, AccessError> {
        let path = check_host_device(bdf).map_err(AccessError)?;
        let err = |what: &str, e: vfio_ioctls::VfioError| {
            AccessError(format!("VFIO {bdf}: cannot {what}: {e}"))
        };
        let container =
            Arc::new(VfioContainer::new(None).map_err(|e| err("open the container", e))?);
        let device = VfioDevice::new(&path, container.clone(), false)
            .map_err(|e| err("open the device", e))?;
        Ok(Self {
            bdf: bdf.to_string(),
            container,
            device,
            msix: Vec::new(),
        })
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> AccessError {
        AccessError(format!("VFIO {}: {what}: {e}", self.bdf))
    }
}

impl DeviceAccess for HostDevice {
    fn describe(&self) -> String {
        format!("VFIO {}", self.bdf)
    }

    fn region(&self, index: u32) -> Option<RegionInfo> {
        let size = self.device.get_region_size(index);
        let flags = self.device.get_region_flags(index);
        (size > 0).then_some(RegionInfo {
            size,
            readable: flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mappable: flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
        })
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), AccessError> {
        self.device.region_read(region, data, offset);
        Ok(())
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        self.device.region_write(region, data, offset);
        Ok(())
    }

    fn msix_vectors(&mut self) -> Result<u32, AccessError> {
        Ok(self.device.get_irq_info(MSIX_IRQ).map_or(0, |i| i.count))
    }

    fn enable_msix(&mut self, fds: &[RawFd]) -> Result<(), AccessError> {
        let mut events = Vec::with_capacity(fds.len());
        for &fd in fds {
            // SAFETY: `dup` of a descriptor the caller keeps open; the duplicate is owned
            // by the EventFd built from it, and closed with it.
            let dup = unsafe { libc::dup(fd) };
            if dup < 0 {
                return Err(self.err(
                    "cannot duplicate an MSI-X eventfd",
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: `dup` is a fresh descriptor of an eventfd that nothing else owns.
            events.push(unsafe { EventFd::from_raw_fd(dup) });
        }
        self.device
            .enable_msix(events.iter().collect())
            .map_err(|e| self.err("cannot enable MSI-X", e))?;
        self.msix = events;
        Ok(())
    }

    fn disable_msix(&mut self) -> Result<(), AccessError> {
        self.device
            .disable_msix()
            .map_err(|e| self.err("cannot disable MSI-X", e))?;
        self.msix.clear();
        Ok(())
    }

    fn dma_map(&mut self, r: &DmaRegion) -> Result<(), AccessError> {
        // SAFETY: `r.host` maps `r.size` bytes of guest RAM that stay mapped while the VM
        // (and this device, which the VM owns) lives; the VMM reaches them only through
        // volatile accesses, as the device may write them at any time.
        unsafe {
            self.container
                .vfio_dma_map(r.iova, r.size as usize, r.host as *mut u8)
        }
        .map_err(|e| self.err("cannot map guest memory for DMA", e))
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), AccessError> {
        self.container
            .vfio_dma_unmap(iova, size as usize)
            .map_err(|e| self.err("cannot unmap guest memory", e))
    }

    fn reset(&mut self) -> Result<(), AccessError> {
        self.device.reset();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_parse_or_say_what_is_wrong() {
        assert_eq!(parse_bdf("0000:01:00.0").unwrap(), "0000:01:00.0");
        assert_eq!(parse_bdf("01:1f.7").unwrap(), "0000:01:1f.7");
        assert_eq!(parse_bdf("0000:0A:00.1").unwrap(), "0000:0a:00.1");
        for bad in [
            "",
            "01:00",
            "0000:01:20.0",
            "0000:01:00.8",
            "zz:00.0",
            "0:1:0.0",
        ] {
            assert!(
                parse_bdf(bad).unwrap_err().contains("is not a PCI address"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_host_device_request_names_what_this_host_lacks() {
        let host = HostSupport::detect();
        let e = check_host_device("0000:7f:1f.7").unwrap_err();
        assert!(
            e.starts_with("GPU passthrough of host device 0000:7f:1f.7 is not possible here: "),
            "{e}"
        );
        for m in &host.missing {
            assert!(e.contains(m.as_str()), "{e} lacks {m}");
        }
        assert!(e.contains("no PCI device 0000:7f:1f.7 on this host"), "{e}");
    }
}
