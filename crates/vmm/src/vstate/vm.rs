//! The KVM VM: guest memory slots, the in-kernel irqchip and PIT, interrupt lines.
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
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
    #[error("cannot read KVM's dirty-page log of memory slot {slot}: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// One KVM VM with its memory registered.
pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub flavour: Flavour,
    pub memory: GuestMem,
    slots: u32,
    dirty_logging: bool,
}

impl Vm {
    /// Creates the VM, registers `memory` and creates the in-kernel irqchip and PIT.
    pub fn new(memory: GuestMem, flavour: Flavour) -> Result<Self, VmError> {
        Self::create(memory, flavour, false)
    }

    /// `new` with dirty-page logging on from the start: registering the slots with it costs
    /// nothing, while turning it on later is a memory-slot update KVM makes every running
    /// vCPU wait for (milliseconds on PVM).
    pub fn with_dirty_logging(memory: GuestMem, flavour: Flavour) -> Result<Self, VmError> {
        Self::create(memory, flavour, true)
    }

    fn create(memory: GuestMem, flavour: Flavour, dirty_logging: bool) -> Result<Self, VmError> {
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
            dirty_logging,
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
        self.slots = 0;
        let flags = if self.dirty_logging {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for region in self.memory.iter() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .expect("offset 0 lies inside every mapped region");
            let slot = kvm_userspace_memory_region {
                slot: self.slots,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `self.memory`, which lives as
            // long as the VM fd (both are fields of `self`, and the fd is dropped first
            // only when the whole Vm is dropped), and slots never overlap: the regions of a
            // GuestMemoryMmap are disjoint. Registering an existing slot again with the same
            // address and size only changes its flags.
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

    /// Turns KVM's dirty-page logging on or off for every slot. Turning it on also forgets
    /// the writes the VMM made before, so the next `take_dirty_pages` reports exactly the
    /// pages written from now on.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmError> {
        if self.dirty_logging == on {
            return Ok(());
        }
        self.dirty_logging = on;
        if let Err(e) = self.register_memory() {
            self.dirty_logging = !on;
            return Err(e);
        }
        if on {
            for region in self.memory.iter() {
                std::ops::Deref::deref(region).bitmap().reset();
            }
        }
        Ok(())
    }

    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// The pages written since dirty logging was turned on or since the last call, one
    /// bitmap per memory region (bit `i` of word `i / 64` = page `i`, KVM's layout): KVM's
    /// log of guest writes ORed with the VMM's own writes. Both logs are cleared.
    pub fn take_dirty_pages(&self) -> Result<Vec<Vec<u64>>, VmError> {
        if !self.dirty_logging {
            return Err(VmError::DirtyLog {
                slot: 0,
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        self.memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let slot = slot as u32;
                let mut words = self
                    .fd
                    .get_dirty_log(slot, region.len() as usize)
                    .map_err(|source| VmError::DirtyLog { slot, source })?;
                let ours = std::ops::Deref::deref(region).bitmap().get_and_reset();
                for (w, o) in words.iter_mut().zip(ours) {
                    *w |= o;
                }
                Ok(words)
            })
            .collect()
    }

    /// Connects `evt` to interrupt line `gsi`: each write to it raises the line.
    pub fn connect_irq(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn dirty_log_reports_vmm_writes_once_and_only_while_on() {
        let regions = [(GuestAddress(0), 2 << 20), (GuestAddress(4 << 20), 1 << 20)];
        let memory = crate::memory::create(&regions).unwrap();
        memory.write_obj(1u64, GuestAddress(0x1000)).unwrap();
        let mut vm = Vm::new(memory, Flavour::detect()).unwrap();
        assert!(vm.take_dirty_pages().is_err(), "logging is off");
        vm.set_dirty_logging(true).unwrap();
        // The write before logging started is forgotten.
        let clean = vm.take_dirty_pages().unwrap();
        assert_eq!(clean.len(), 2);
        assert!(clean.iter().flatten().all(|w| *w == 0), "{clean:?}");
        vm.memory.write_obj(2u64, GuestAddress(0x3008)).unwrap();
        vm.memory
            .write_obj(3u64, GuestAddress((4 << 20) + 0x41000))
            .unwrap();
        let dirty = vm.take_dirty_pages().unwrap();
        assert_eq!(dirty[0].len(), (2 << 20) / 4096 / 64);
        assert_eq!(dirty[0][0], 1 << 3);
        assert_eq!(dirty[1][1], 1 << 1, "page 0x41 of region 1");
        let again = vm.take_dirty_pages().unwrap();
        assert!(again.iter().flatten().all(|w| *w == 0), "the log clears");
        vm.set_dirty_logging(false).unwrap();
        assert!(!vm.dirty_logging());
    }
}
