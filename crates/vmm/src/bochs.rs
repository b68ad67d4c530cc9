//! The VM's Bochs display devices on KVM (`--gpu emulated,device=bochs`): each one's VRAM
//! as a KVM memory slot of its own where the guest decodes its BAR 0, moved when the guest
//! moves the BAR and removed while memory decoding is off, and the slot's dirty log, which
//! the display reads to find what the guest drew.
//!
//! A slot is placed only inside the VMM's BAR window: a BAR the guest moves elsewhere (a
//! sizing write of all-ones would put 32 MiB over the ECAM window and the interrupt
//! controllers) is served by MMIO exits until it comes back.
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use ray_api::gpu::{GpuConfig, BOCHS_VRAM_BYTES};
use ray_devices::bochs::dispi::Limits;
use ray_devices::bochs::{BochsDisplay, BochsHandle, BochsState, VramPlacer, MMIO_BAR_BYTES};
use ray_devices::pci::BarAllocator;

use crate::pci::{BAR_WINDOW_END, BAR_WINDOW_START};
use crate::vstate::vm::Vm;

/// KVM slot numbers of the devices' VRAM: this plus the GPU's index (guest RAM takes the
/// slots from 0, a few per NUMA node).
const FIRST_SLOT: u32 = 400;

/// One Bochs device built for the VM.
/// Fields drop in order: the slot, then the device, then the last handle on the VRAM.
pub struct BochsGpu {
    /// Its index in the VM's GPU list.
    pub gpu: usize,
    pub slot: Arc<Mutex<VramSlot>>,
    pub device: Arc<Mutex<BochsDisplay>>,
    pub handle: BochsHandle,
    /// The configured display size, shown (black) while the guest has no mode enabled.
    pub size: (u32, u32),
}

/// A Bochs device's saved state, with the GPU it belongs to.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SavedBochs {
    pub gpu: usize,
    pub state: BochsState,
}

/// The VRAM's KVM memory slot.
pub struct VramSlot {
    fd: VmFd,
    slot: u32,
    host: u64,
    size: u64,
    /// Whether KVM logs the slot's dirty pages (not with the dirty rings, whose harvester
    /// knows only guest RAM's slots).
    logged: bool,
    /// Where it is mapped now.
    at: Option<u64>,
    /// Mapped since the last look at its log: every page counts as written.
    fresh: bool,
}

impl VramSlot {
    fn region(&self, gpa: u64, size: u64) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            flags: if self.logged {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.host,
        }
    }

    fn remove(&mut self) {
        let Some(gpa) = self.at.take() else { return };
        // SAFETY: a size of 0 deletes slot `self.slot`, which maps only this device's
        // VRAM; no guest RAM is affected.
        if let Err(e) = unsafe { self.fd.set_user_memory_region(self.region(gpa, 0)) } {
            tracing::error!(
                "cannot remove the Bochs VRAM slot {} at {gpa:#x}: {e}",
                self.slot
            );
        }
    }

    /// Maps the VRAM at `at` (or nowhere).
    fn place(&mut self, at: Option<u64>) {
        self.remove();
        let Some(gpa) = at else {
            tracing::info!("bochs display: VRAM unmapped (memory decoding off)");
            return;
        };
        let fits = gpa >= BAR_WINDOW_START
            && gpa
                .checked_add(self.size)
                .is_some_and(|end| end <= BAR_WINDOW_END);
        if !fits {
            tracing::warn!(
                "bochs display: BAR 0 at {gpa:#x} is outside the BAR window \
                 {BAR_WINDOW_START:#x}-{BAR_WINDOW_END:#x}: its VRAM is reached by MMIO \
                 exits there"
            );
            return;
        }
        // SAFETY: `host..host + size` is the device's VRAM mapping, which lives as long as
        // the device's shared state; this slot is removed before the VM (and the device)
        // go (see `Drop`), and the BAR window holds no guest RAM, so it overlaps no slot.
        match unsafe { self.fd.set_user_memory_region(self.region(gpa, self.size)) } {
            Ok(()) => {
                self.at = Some(gpa);
                self.fresh = true;
                tracing::info!("bochs display: VRAM mapped at {gpa:#x}");
            }
            Err(e) => tracing::warn!(
                "KVM refused the Bochs VRAM slot at {gpa:#x} ({e}): its VRAM is reached by \
                 MMIO exits"
            ),
        }
    }

    /// Pages of VRAM (by offset from its start) written since the last look, as a bitmap
    /// of 64 pages a word; None when that cannot be known (not mapped, or not logged: the
    /// display compares every tile), all ones after the slot was (re)mapped.
    pub fn take_dirty(&mut self) -> Option<Vec<u64>> {
        let words = (self.size / ray_memory::PAGE_SIZE).div_ceil(64) as usize;
        if !self.logged || self.at.is_none() {
            return None;
        }
        let log = self.fd.get_dirty_log(self.slot, self.size as usize);
        if std::mem::take(&mut self.fresh) {
            return Some(vec![u64::MAX; words]);
        }
        match log {
            Ok(bits) => Some(bits),
            Err(e) => {
                tracing::warn!(
                    "cannot read the Bochs VRAM's dirty log ({e}); every tile is compared"
                );
                None
            }
        }
    }

    /// Whether its dirty log is kept.
    pub fn logged(&self) -> bool {
        self.logged
    }

    /// Where the VRAM is in the guest now.
    pub fn address(&self) -> Option<u64> {
        self.at
    }
}

impl Drop for VramSlot {
    fn drop(&mut self) {
        self.remove();
    }
}

struct Placer(Arc<Mutex<VramSlot>>);

impl VramPlacer for Placer {
    fn place(&mut self, at: Option<u64>) {
        lock(&self.0).place(at);
    }
}

pub fn lock(s: &Arc<Mutex<VramSlot>>) -> MutexGuard<'_, VramSlot> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// The limits of every Bochs device: the display sizes of the API, its VRAM.
pub fn limits() -> Limits {
    Limits {
        min_width: ray_api::gpu::MIN_WIDTH,
        min_height: ray_api::gpu::MIN_HEIGHT,
        max_width: ray_api::gpu::MAX_WIDTH,
        max_height: ray_api::gpu::MAX_HEIGHT,
        vram: BOCHS_VRAM_BYTES,
    }
}

/// Builds GPU `gpu`'s Bochs device over `vm`, its BARs from `bars`; with `state`, it takes
/// that over (a restore or a migration target).
pub fn build(
    gpu: usize,
    config: &GpuConfig,
    vm: &Vm,
    bars: &mut BarAllocator,
    state: Option<&BochsState>,
) -> Result<BochsGpu, String> {
    let vram_bar = bars.allocate(BOCHS_VRAM_BYTES).map_err(|e| e.to_string())?;
    let mmio_bar = bars.allocate(MMIO_BAR_BYTES).map_err(|e| e.to_string())?;
    let fd = vm.clone_fd().map_err(|e| e.to_string())?;
    let slot = Arc::new(Mutex::new(VramSlot {
        fd,
        slot: FIRST_SLOT + gpu as u32,
        host: 0,
        size: BOCHS_VRAM_BYTES,
        logged: vm.rings.is_none(),
        at: None,
        fresh: false,
    }));
    let mut device = BochsDisplay::new(
        limits(),
        vram_bar as u32,
        mmio_bar as u32,
        Box::new(Placer(slot.clone())),
    )?;
    let handle = device.handle();
    lock(&slot).host = handle.vram_host_address();
    if let Some(s) = state {
        device.restore(s)?;
    }
    Ok(BochsGpu {
        gpu,
        handle,
        slot,
        device: Arc::new(Mutex::new(device)),
        size: (config.width, config.height),
    })
}
