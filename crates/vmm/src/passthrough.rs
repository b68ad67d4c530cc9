//! Passthrough GPUs on the VM's PCI bus: each `--gpu passthrough,...` becomes a
//! [`PassthroughPci`] function over VFIO (a host device) or vfio-user (a device process),
//! with BARs from the bus's allocator, MSI-X vectors as KVM irqfds the device signals
//! directly (taken off their GSIs while masked), and guest RAM (the memfd) mapped for its DMA at guest-physical addresses.
//!
//! The functions built for the VM are kept here, so that `ray gpu status` reports each
//! one's health: a device that stopped answering makes its GPU Error, with the reason.
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ray_api::gpu::{GpuConfig, PassthroughSource};
use ray_devices::passthrough::vfio::HostDevice;
use ray_devices::passthrough::vfio_user::UserDevice;
use ray_devices::passthrough::{
    DeviceAccess, DirectVectors, DmaRegion, Health, PassthroughPci, Placement,
};
use ray_devices::pci::BarAllocator;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::MemoryManager;
use crate::vstate::irq::{IrqRouter, KvmMsiVectors};

pub type SharedPassthrough = Arc<Mutex<PassthroughPci>>;

/// One passthrough GPU built for the VM.
pub struct Built {
    /// Its index in the VM's GPU list.
    pub gpu: usize,
    pub device: SharedPassthrough,
    pub health: Arc<Health>,
}

/// What the registry keeps of a function: not the function itself, which lives and ends
/// with the machine's bus.
struct Entry {
    gpu: usize,
    device: Weak<Mutex<PassthroughPci>>,
    health: Arc<Health>,
}

static BUILT: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

fn built() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    BUILT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forgets the functions of an earlier machine (a new one is being built).
pub fn clear() {
    built().clear();
}

/// What GPU `gpu` is, if it is a passthrough one: its device's name, and why it failed.
/// The device is asked for its vendor ID first, so a device process that died is found
/// out even while the guest leaves it alone.
pub fn status(gpu: usize) -> Option<(String, Option<String>)> {
    let (device, health) = built()
        .iter()
        .find(|b| b.gpu == gpu)
        .map(|b| (b.device.upgrade(), b.health.clone()))?;
    let device = device?;
    let mut d = device.lock().unwrap_or_else(|e| e.into_inner());
    d.probe();
    Some((d.name().to_string(), health.error()))
}

/// Opens the device behind `source`.
fn open(source: &PassthroughSource, timeout: Duration) -> Result<Box<dyn DeviceAccess>, String> {
    Ok(match source {
        PassthroughSource::VfioUser { socket } => {
            Box::new(UserDevice::connect(Path::new(socket), timeout).map_err(|e| e.0)?)
        }
        PassthroughSource::Host { bdf } => Box::new(HostDevice::open(bdf).map_err(|e| e.0)?),
    })
}

/// The power the host PCI device `bdf` draws, in milliwatts, as its hwmon reports it
/// (none where it reports none).
pub fn power_mw(bdf: &str) -> Option<u64> {
    hwmon_power(&Path::new("/sys/bus/pci/devices").join(bdf))
}

/// `power1_average` (else `power1_input`, microwatts) of the first hwmon of the device at
/// `device` (its sysfs directory) that has one.
fn hwmon_power(device: &Path) -> Option<u64> {
    let mut hwmons: Vec<_> = std::fs::read_dir(device.join("hwmon"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    hwmons.sort();
    hwmons.iter().find_map(|h| {
        ["power1_average", "power1_input"].iter().find_map(|f| {
            let uw: u64 = std::fs::read_to_string(h.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some(uw / 1000)
        })
    })
}

/// Checks what can be checked before a VM starts: a host device's IOMMU, VFIO and driver.
pub fn check(gpus: &[GpuConfig]) -> Result<(), String> {
    for (i, g) in gpus.iter().enumerate() {
        if let Some(PassthroughSource::Host { bdf }) = &g.passthrough {
            ray_devices::passthrough::vfio::check_host_device(bdf)
                .map_err(|e| format!("GPU {i}: {e}"))?;
        }
    }
    Ok(())
}

struct VmPlacement<'a> {
    bars: &'a mut BarAllocator,
    router: Arc<IrqRouter>,
}

impl Placement for VmPlacement<'_> {
    fn bar(&mut self, size: u64) -> Result<u64, String> {
        self.bars.allocate(size).map_err(|e| e.to_string())
    }

    fn vectors(&mut self, count: u16) -> Result<(Arc<dyn DirectVectors>, Vec<RawFd>), String> {
        let v =
            Arc::new(KvmMsiVectors::new(self.router.clone(), count).map_err(|e| e.to_string())?);
        // The descriptors stay open as long as `v`, which the function keeps.
        let fds = v.eventfds().map(|e| e.as_raw_fd()).collect();
        Ok((v, fds))
    }
}

/// Guest RAM as DMA regions: every region must be a shared memfd mapping.
fn dma_regions(memory: &MemoryManager) -> Result<Vec<DmaRegion>, String> {
    if !memory.is_shared_memfd() {
        return Err(
            "guest RAM is not a shared memfd (a restored snapshot maps its file privately), so \
             a passthrough device cannot reach it"
                .into(),
        );
    }
    memory
        .ram()
        .iter()
        .map(|r| {
            let fo = r
                .file_offset()
                .ok_or("a guest RAM region has no file behind it")?;
            Ok(DmaRegion {
                iova: r.start_addr().0,
                size: r.len(),
                fd: fo.file().as_raw_fd(),
                fd_offset: fo.start(),
                host: r.as_ptr() as usize,
            })
        })
        .collect()
}

/// Builds GPU `gpu`'s passthrough function from `source`.
pub fn build(
    gpu: usize,
    source: &PassthroughSource,
    timeout: Duration,
    memory: &MemoryManager,
    bars: &mut BarAllocator,
    router: Arc<IrqRouter>,
) -> Result<Built, String> {
    let dma = dma_regions(memory)?;
    let access = open(source, timeout)?;
    let health = Arc::new(Health::default());
    let mut place = VmPlacement { bars, router };
    let device = PassthroughPci::new(access, health.clone(), &mut place, &dma)?;
    let b = Built {
        gpu,
        device: Arc::new(Mutex::new(device)),
        health,
    };
    built().push(Entry {
        gpu,
        device: Arc::downgrade(&b.device),
        health: b.health.clone(),
    });
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_is_what_a_hwmon_reports_or_nothing() {
        let dev = std::env::temp_dir().join(format!("ray-hwmon-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dev);
        std::fs::create_dir_all(&dev).unwrap();
        assert_eq!(hwmon_power(&dev), None, "no hwmon: no figure");
        let h = dev.join("hwmon/hwmon3");
        std::fs::create_dir_all(&h).unwrap();
        std::fs::write(h.join("name"), "amdgpu\n").unwrap();
        assert_eq!(hwmon_power(&dev), None, "a hwmon without power");
        std::fs::write(h.join("power1_input"), "41250000\n").unwrap();
        assert_eq!(hwmon_power(&dev), Some(41_250));
        std::fs::write(h.join("power1_average"), "40000000\n").unwrap();
        assert_eq!(hwmon_power(&dev), Some(40_000), "the average first");
        std::fs::write(h.join("power1_average"), "n/a\n").unwrap();
        assert_eq!(
            hwmon_power(&dev),
            Some(41_250),
            "an unreadable average: the input"
        );
        let _ = std::fs::remove_dir_all(&dev);
    }
}
