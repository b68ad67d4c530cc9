//! The KVM VM: guest memory slots, the in-kernel irqchip and PIT, interrupt lines.
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use super::Flavour;
use crate::memory::GuestMem;

/// Where KVM may put its three-page TSS on VMX (inside the MMIO hole, below the IOAPIC).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM loaded and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("/dev/kvm speaks API version {0}; rayvisor needs 12")]
    ApiVersion(i32),
    #[error("KVM lacks the capability {0:?}, which rayvisor needs")]
    MissingCap(Cap),
    #[error("cannot create the KVM VM: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error(
        "cannot register guest memory slot {slot} at {gpa:#x} ({size} bytes) with KVM: {source}"
    )]
    MemorySlot {
        slot: u32,
        gpa: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
    #[error("cannot create the in-kernel interrupt controller: {0}")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT: {0}")]
    Pit(#[source] kvm_ioctls::Error),
    #[error("cannot connect interrupt line {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
}

/// One KVM VM with its memory registered.
pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub flavour: Flavour,
    pub memory: GuestMem,
    slots: u32,
}

impl Vm {
    /// Creates the VM, registers `memory` and creates the in-kernel irqchip and PIT.
    pub fn new(memory: GuestMem, flavour: Flavour) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        for cap in [Cap::Irqchip, Cap::UserMemory, Cap::Pit2] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let mut vm = Vm {
            kvm,
            fd,
            flavour,
            memory,
            slots: 0,
        };
        vm.register_memory()?;
        // VMX needs a TSS page inside guest-physical space; PVM has no such thing and may
        // refuse the call, which is harmless there.
        if let Err(e) = vm.fd.set_tss_address(KVM_TSS_ADDRESS) {
            if flavour == Flavour::VmxSvm {
                return Err(VmError::CreateVm(e));
            }
        }
        vm.fd.create_irq_chip().map_err(VmError::Irqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd.create_pit2(pit).map_err(VmError::Pit)?;
        Ok(vm)
    }

    fn register_memory(&mut self) -> Result<(), VmError> {
        for region in self.memory.iter() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .expect("offset 0 lies inside every mapped region");
            let slot = kvm_userspace_memory_region {
                slot: self.slots,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `self.memory`, which lives as
            // long as the VM fd (both are fields of `self`, and the fd is dropped first
            // only when the whole Vm is dropped), and slots never overlap: the regions of a
            // GuestMemoryMmap are disjoint.
            unsafe { self.fd.set_user_memory_region(slot) }.map_err(|source| {
                VmError::MemorySlot {
                    slot: self.slots,
                    gpa: region.start_addr().0,
                    size: region.len(),
                    source,
                }
            })?;
            self.slots += 1;
        }
        Ok(())
    }

    /// Connects `evt` to interrupt line `gsi`: each write to it raises the line.
    pub fn connect_irq(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }
}
