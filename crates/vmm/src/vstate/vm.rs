//! The KVM VM: guest memory slots, the in-kernel irqchip and PIT, interrupt lines.
use crate::logging::SpawnInSpan;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use ray_memory::{ConsumerId, DirtyBitmap};
use vmm_sys_util::eventfd::EventFd;

use super::dirty_ring::{DirtyRings, RingError};
use super::Flavour;
use crate::memory::{KvmDirtyLog, MemoryManager};
use std::os::fd::AsRawFd;
use std::sync::Arc;

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
    #[error("cannot send an MSI to the guest: {0}")]
    Msi(#[source] kvm_ioctls::Error),
    #[error("cannot read KVM's dirty-page log of memory slot {slot}: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("dirty log: {0}")]
    Dirty(String),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("the thread creating the KVM VM ended without a result")]
    PrepThread,
}

/// One KVM VM with its memory registered.
pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub flavour: Flavour,
    pub memory: MemoryManager,
    /// Whether the VM has the in-kernel PIT (not for rayvisor's guest, which never uses it).
    pub pit: bool,
    slots: u32,
    dirty_logging: bool,
    /// Per-vCPU dirty rings (NUMA access attribution), when on: they then are the dirty
    /// log too, and KVM logs every slot for as long as the VM lives.
    pub rings: Option<Arc<DirtyRings>>,
}

/// A KVM VM without its memory yet: KVM checked, the VM created. Nothing in it depends on
/// the guest, so a restore builds it while it reads the snapshot ([`ShellPrep`]). The
/// irqchip and PIT come after the memory ([`Vm::with_memory`]): each of those steps ends
/// with an SRCU grace period of the VM, and a memory slot registered right after the
/// irqchip's waits for several (4-6 ms instead of 0.5 here, measured on PVM).
pub struct VmShell {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub flavour: Flavour,
}

impl VmShell {
    pub fn create(flavour: Flavour) -> Result<Self, VmError> {
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
        // VMX needs a TSS page inside guest-physical space; PVM has no such thing and may
        // refuse the call, which is harmless there.
        if let Err(e) = fd.set_tss_address(KVM_TSS_ADDRESS) {
            if flavour == Flavour::VmxSvm {
                return Err(VmError::CreateVm(e));
            }
        }
        Ok(Self { kvm, fd, flavour })
    }
}

/// A [`VmShell`] and this host's CPU fingerprint, made on a thread of their own: KVM work
/// (`KVM_CREATE_VM`, `KVM_GET_SUPPORTED_CPUID`, ~0.5 ms here) that a restore does while it
/// starts up and reads the snapshot instead of after.
pub struct ShellPrep(Prep);

enum Prep {
    Running(std::thread::JoinHandle<Result<(VmShell, String), VmError>>),
    /// No thread could be started: the work was done at once.
    Done(Result<(VmShell, String), VmError>),
}

impl ShellPrep {
    pub fn start(flavour: Flavour) -> Self {
        let work = move || {
            let shell = VmShell::create(flavour)?;
            let cpu = crate::snapshot::cpu_fingerprint(&shell.kvm);
            Ok((shell, cpu))
        };
        match std::thread::Builder::new()
            .name("kvm-prep".into())
            .stack_size(256 << 10)
            .spawn_in_span(work)
        {
            Ok(t) => Self(Prep::Running(t)),
            Err(_) => Self(Prep::Done(work())),
        }
    }

    /// The shell and the CPU fingerprint.
    pub fn finish(self) -> Result<(VmShell, String), VmError> {
        match self.0 {
            Prep::Running(t) => t.join().unwrap_or(Err(VmError::PrepThread)),
            Prep::Done(r) => r,
        }
    }
}

/// KVM's dirty log of this VM's slots, as the memory manager reads it.
struct SlotLog<'a>(&'a VmFd);

impl KvmDirtyLog for SlotLog<'_> {
    fn read_slot(&self, slot: u32, bytes: u64) -> Result<Vec<u64>, String> {
        self.0
            .get_dirty_log(slot, bytes as usize)
            .map_err(|source| VmError::DirtyLog { slot, source }.to_string())
    }
}

/// [`SlotLog`] over a VM descriptor of its own.
struct OwnedSlotLog(VmFd);

impl KvmDirtyLog for OwnedSlotLog {
    fn read_slot(&self, slot: u32, bytes: u64) -> Result<Vec<u64>, String> {
        SlotLog(&self.0).read_slot(slot, bytes)
    }
}

impl Vm {
    /// Creates the VM, registers `memory` and creates the in-kernel irqchip and PIT.
    pub fn new(memory: MemoryManager, flavour: Flavour) -> Result<Self, VmError> {
        Self::with_memory(VmShell::create(flavour)?, memory, false, true)
    }

    /// [`new`](Self::new) without the PIT, for a guest known not to use it (rayvisor's:
    /// its clock is kvmclock and its timer the local APIC's). Creating the PIT costs a
    /// kernel thread and two SRCU grace periods of the VM, 0.1 to 2 ms here.
    pub fn without_pit(memory: MemoryManager, flavour: Flavour) -> Result<Self, VmError> {
        Self::with_memory(VmShell::create(flavour)?, memory, false, false)
    }

    /// `new` with dirty-page logging on from the start: registering the slots with it costs
    /// nothing, while turning it on later is a memory-slot update KVM makes every running
    /// vCPU wait for (milliseconds on PVM).
    pub fn with_dirty_logging(memory: MemoryManager, flavour: Flavour) -> Result<Self, VmError> {
        Self::create(memory, flavour, true)
    }

    fn create(
        memory: MemoryManager,
        flavour: Flavour,
        dirty_logging: bool,
    ) -> Result<Self, VmError> {
        Self::with_memory(VmShell::create(flavour)?, memory, dirty_logging, true)
    }

    /// Gives `shell` its memory, irqchip and (with `pit`) PIT: the VM is complete. With
    /// `dirty_logging`, KVM logs the guest's writes from the first (see
    /// [`with_dirty_logging`](Self::with_dirty_logging)).
    pub fn with_memory(
        shell: VmShell,
        memory: MemoryManager,
        dirty_logging: bool,
        pit: bool,
    ) -> Result<Self, VmError> {
        let VmShell { kvm, fd, flavour } = shell;
        let mut vm = Vm {
            kvm,
            fd,
            flavour,
            memory,
            pit,
            slots: 0,
            dirty_logging,
            rings: None,
        };
        vm.register_memory()?;
        vm.fd.create_irq_chip().map_err(VmError::Irqchip)?;
        if pit {
            let config = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.fd.create_pit2(config).map_err(VmError::Pit)?;
        }
        Ok(vm)
    }

    fn register_memory(&mut self) -> Result<(), VmError> {
        self.slots = 0;
        let flags = if self.dirty_logging {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (gpa, host, size) in self.memory.slots() {
            let slot = kvm_userspace_memory_region {
                slot: self.slots,
                flags,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: the region is a live mapping owned by `self.memory`, which lives as
            // long as the VM fd (both are fields of `self`, and the fd is dropped first
            // only when the whole Vm is dropped), and slots never overlap: the regions of a
            // layout are disjoint. Registering an existing slot again with the same
            // address and size only changes its flags.
            unsafe { self.fd.set_user_memory_region(slot) }.map_err(|source| {
                VmError::MemorySlot {
                    slot: self.slots,
                    gpa,
                    size,
                    source,
                }
            })?;
            self.slots += 1;
        }
        Ok(())
    }

    /// Turns the per-vCPU dirty rings on (before any vCPU exists), and with them KVM's
    /// dirty logging of every slot for good: the rings serve the dirty log's consumers
    /// from then on, and a harvester thread empties them every
    /// [`HARVEST_PERIOD`](super::dirty_ring::HARVEST_PERIOD).
    pub fn enable_dirty_rings(&mut self) -> Result<Arc<DirtyRings>, VmError> {
        let slots: Vec<(u64, u64)> = self.memory.slots().map(|(g, _, len)| (g, len)).collect();
        let rings = DirtyRings::enable(&self.fd, &slots)?;
        self.set_dirty_logging(true)?;
        rings
            .start_harvester(super::dirty_ring::HARVEST_PERIOD)
            .map_err(|e| VmError::Dirty(format!("cannot start the dirty-ring harvester: {e}")))?;
        self.rings = Some(rings.clone());
        Ok(rings)
    }

    /// The dirty log's source as a handle other threads may keep (a display's change
    /// detection takes its pages from its viewers' threads): the rings when on, else a
    /// second descriptor of the VM for `KVM_GET_DIRTY_LOG`. Every read still goes through
    /// the memory manager, which fans it out to every consumer.
    pub fn dirty_log_handle(&self) -> Result<Arc<dyn KvmDirtyLog + Send + Sync>, VmError> {
        if let Some(r) = &self.rings {
            return Ok(r.clone());
        }
        Ok(Arc::new(OwnedSlotLog(self.clone_fd()?)))
    }

    /// A second descriptor of this VM, for a part of the VMM that outlives a borrow of
    /// it (its dirty log, a device's own memory slot).
    pub fn clone_fd(&self) -> Result<VmFd, VmError> {
        // SAFETY: dup of the VM fd we own; the result is checked and owned by the VmFd
        // made from it below.
        let fd = unsafe { libc::dup(self.fd.as_raw_fd()) };
        if fd < 0 {
            return Err(VmError::Dirty(format!(
                "cannot keep a handle on the VM: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` is a fresh duplicate of this VM's fd, owned by nothing else.
        unsafe { self.kvm.create_vmfd_from_rawfd(fd) }
            .map_err(|e| VmError::Dirty(format!("cannot wrap the VM's descriptor: {e}")))
    }

    /// Runs `f` on the dirty log's source: the rings when on, else KVM's bitmap.
    fn with_log<R>(&self, f: impl FnOnce(&dyn KvmDirtyLog) -> R) -> R {
        match &self.rings {
            Some(r) => f(r.as_ref()),
            None => f(&SlotLog(&self.fd)),
        }
    }

    /// Turns KVM's dirty-page logging of every slot on or off (with rings: always on).
    fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmError> {
        let on = on || self.rings.is_some();
        if self.dirty_logging == on {
            return Ok(());
        }
        self.dirty_logging = on;
        if let Err(e) = self.register_memory() {
            self.dirty_logging = !on;
            return Err(e);
        }
        Ok(())
    }

    /// Whether KVM logs dirty pages now (while any consumer of the log is registered).
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// Registers a consumer of the dirty log (turning KVM's logging on for the first): it
    /// sees every page written from now on, plus `owed`.
    pub fn add_dirty_consumer(
        &mut self,
        name: &str,
        owed: Option<DirtyBitmap>,
    ) -> Result<ConsumerId, VmError> {
        self.set_dirty_logging(true)?;
        self.with_log(|log| self.memory.add_consumer(name, owed, log))
            .map_err(VmError::Dirty)
    }

    /// The pages written since consumer `id`'s previous take: KVM's log of guest writes
    /// and the VMM's own writes, read once for every consumer.
    pub fn take_dirty(&self, id: ConsumerId) -> Result<DirtyBitmap, VmError> {
        self.with_log(|log| self.memory.take_dirty(id, log))
            .map_err(VmError::Dirty)
    }

    /// Removes a consumer, returning the pages it had not taken; the last one turns KVM's
    /// logging off.
    pub fn remove_dirty_consumer(
        &mut self,
        id: ConsumerId,
    ) -> Result<Option<DirtyBitmap>, VmError> {
        let left = self
            .with_log(|log| self.memory.remove_consumer(id, log))
            .map_err(VmError::Dirty)?;
        if !self.memory.dirty_log_wanted() {
            self.set_dirty_logging(false)?;
        }
        Ok(left)
    }

    /// Sends `vector` to the local APIC with ID `apic_id` as an MSI (fixed delivery,
    /// physical destination) through the in-kernel irqchip.
    pub fn signal_msi(&self, apic_id: u8, vector: u8) -> Result<(), VmError> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: 0xfee0_0000 | u32::from(apic_id) << 12,
            data: u32::from(vector),
            ..Default::default()
        };
        self.fd.signal_msi(msi).map(|_| ()).map_err(VmError::Msi)
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
    fn dirty_log_reports_vmm_writes_to_each_consumer_only_while_one_is_registered() {
        let regions = [(GuestAddress(0), 2 << 20), (GuestAddress(4 << 20), 1 << 20)];
        let memory = MemoryManager::create(&regions).unwrap();
        memory.ram().write_obj(1u64, GuestAddress(0x1000)).unwrap();
        let mut vm = Vm::new(memory, Flavour::detect()).unwrap();
        assert!(!vm.dirty_logging());
        let a = vm.add_dirty_consumer("a", None).unwrap();
        assert!(vm.dirty_logging());
        // The write before logging started is forgotten.
        assert_eq!(vm.take_dirty(a).unwrap().count(), 0);
        vm.memory
            .ram()
            .write_obj(2u64, GuestAddress(0x3008))
            .unwrap();
        let b = vm.add_dirty_consumer("b", None).unwrap();
        vm.memory
            .ram()
            .write_obj(3u64, GuestAddress((4 << 20) + 0x41000))
            .unwrap();
        let dirty = vm.take_dirty(a).unwrap();
        assert_eq!(dirty.regions[0].pages(), (2 << 20) / 4096);
        assert_eq!(dirty.regions[0].words()[0], 1 << 3);
        assert_eq!(dirty.regions[1].words()[1], 1 << 1, "page 0x41 of region 1");
        assert_eq!(vm.take_dirty(a).unwrap().count(), 0, "the log clears");
        assert_eq!(
            vm.take_dirty(b).unwrap().count(),
            1,
            "b: only since it joined"
        );
        vm.remove_dirty_consumer(a).unwrap();
        assert!(vm.dirty_logging(), "b still needs it");
        vm.remove_dirty_consumer(b).unwrap();
        assert!(!vm.dirty_logging());
    }

    #[test]
    fn with_dirty_rings_the_log_stays_on_and_still_reports_vmm_writes() {
        let regions = [(GuestAddress(0), 2 << 20)];
        let memory = MemoryManager::create(&regions).unwrap();
        let mut vm = Vm::new(memory, Flavour::detect()).unwrap();
        let rings = vm.enable_dirty_rings().unwrap();
        assert!(vm.dirty_logging(), "rings need KVM to log every slot");
        let fd = vm.fd.create_vcpu(0).unwrap();
        rings.add_vcpu(0, &fd).unwrap();
        let a = vm.add_dirty_consumer("a", None).unwrap();
        vm.memory
            .ram()
            .write_obj(2u64, GuestAddress(0x5000))
            .unwrap();
        let dirty = vm.take_dirty(a).unwrap();
        assert_eq!(dirty.regions[0].words()[0], 1 << 5);
        vm.remove_dirty_consumer(a).unwrap();
        assert!(vm.dirty_logging(), "still on for the rings");
        assert_eq!(rings.totals(), vec![0], "no guest ran: nothing attributed");
        assert!(
            matches!(
                vm.enable_dirty_rings(),
                Err(VmError::Ring(RingError::Enable { .. }))
            ),
            "a second time, after a vCPU exists, KVM refuses"
        );
    }
}
