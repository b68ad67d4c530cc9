//! Saving and restoring the KVM state of a VM and its vCPUs.
//!
//! Everything KVM keeps for a vCPU is saved: registers, special registers, XSAVE area and
//! XCRs, LAPIC, every MSR in KVM's saveable list plus the flavour's extra MSRs (PVM's VIF
//! registration is not in the list, and without it a restored guest runs emulated), MP
//! state, pending events, debug registers and CPUID. For the VM: the three in-kernel
//! irqchips, the PIT and kvmclock. Restoring treats the state as untrusted input: KVM
//! validates each piece and every refusal names the piece.
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

pub use ray_devices::Persist;

/// A vCPU as the persist layer sees it: its fd, its index, and the MSRs to save.
pub struct KvmVcpu<'a> {
    pub fd: &'a VcpuFd,
    pub index: u8,
    pub msrs: &'a [u32],
}

impl Persist for KvmVcpu<'_> {
    type State = VcpuState;
    type Error = PersistError;

    fn save_state(&self) -> Result<VcpuState, PersistError> {
        save_vcpu(self.fd, self.index, self.msrs)
    }

    fn restore_state(&mut self, state: &VcpuState) -> Result<(), PersistError> {
        restore_vcpu(self.fd, state)
    }
}

/// The VM's own KVM state (irqchips, PIT if it has one, kvmclock) as the persist layer
/// sees it.
pub struct KvmVm<'a> {
    pub fd: &'a VmFd,
    pub pit: bool,
}

impl Persist for KvmVm<'_> {
    type State = VmKvmState;
    type Error = PersistError;

    fn save_state(&self) -> Result<VmKvmState, PersistError> {
        save_vm(self.fd, self.pit)
    }

    fn restore_state(&mut self, state: &VmKvmState) -> Result<(), PersistError> {
        restore_vm(self.fd, state)
    }
}

/// Most CPUID entries a saved vCPU may carry.
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// KVM_GET_MSRS takes at most this many entries per call.
const MSR_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot {op} {what} of vCPU {index}: {source}")]
    Vcpu {
        op: &'static str,
        what: &'static str,
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot {op} the VM's {what}: {source}")]
    Vm {
        op: &'static str,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(
        "vCPU {index}: KVM accepted only {set} of {total} MSRs (the first refused is {first:#x})"
    )]
    Msrs {
        index: u8,
        set: usize,
        total: usize,
        first: u32,
    },
    #[error(
        "vCPU {index}: the saved XSAVE area has {got} bytes; KVM_SET_XSAVE takes exactly 4096"
    )]
    XsaveSize { index: u8, got: usize },
    #[error("cannot save a device: {0}")]
    Device(String),
    #[error("vCPU {index}: saved state has {got} CPUID entries, more than the {max} KVM takes")]
    TooManyCpuid { index: u8, got: usize, max: usize },
}

/// Everything KVM keeps for one vCPU.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The legacy 4 KiB XSAVE area (KVM_GET_XSAVE), as 32-bit words.
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

/// What KVM keeps for the VM itself.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    /// `None` for a VM without the PIT (rayvisor's guest); a restore then creates none.
    /// States saved before the PIT was optional always have one.
    pub pit: Option<kvm_pit_state2>,
    pub clock: kvm_clock_data,
}

/// The MSRs to save for every vCPU: KVM's saveable list plus the flavour's extras.
pub fn msr_list(kvm: &kvm_ioctls::Kvm, extra: &[u32]) -> Result<Vec<u32>, PersistError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|source| PersistError::Vm {
            op: "read",
            what: "saveable MSR list",
            source,
        })?;
    let mut msrs: Vec<u32> = list.as_slice().to_vec();
    for m in extra {
        if !msrs.contains(m) {
            msrs.push(*m);
        }
    }
    Ok(msrs)
}

fn save_vcpu(fd: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<VcpuState, PersistError> {
    let err = |what: &'static str| {
        move |source| PersistError::Vcpu {
            op: "save",
            what,
            index,
            source,
        }
    };
    let cpuid = fd.get_cpuid2(MAX_CPUID_ENTRIES).map_err(err("CPUID"))?;
    let mut msrs = Vec::with_capacity(msr_indices.len());
    for chunk in msr_indices.chunks(MSR_BATCH) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut batch = Msrs::from_entries(&entries).expect("a batch of at most 64 MSRs fits");
        let n = fd.get_msrs(&mut batch).map_err(err("MSRs"))?;
        // KVM stops at the first MSR it cannot read; those MSRs don't exist on this host.
        msrs.extend_from_slice(&batch.as_slice()[..n]);
    }
    let xsave = fd.get_xsave().map_err(err("XSAVE area"))?;
    Ok(VcpuState {
        index,
        cpuid: cpuid.as_slice().to_vec(),
        msrs,
        regs: fd.get_regs().map_err(err("registers"))?,
        sregs: fd.get_sregs().map_err(err("special registers"))?,
        xsave: xsave.region.to_vec(),
        xcrs: fd.get_xcrs().map_err(err("XCRs"))?,
        lapic: fd.get_lapic().map_err(err("LAPIC"))?,
        mp_state: fd.get_mp_state().map_err(err("MP state"))?,
        events: fd.get_vcpu_events().map_err(err("pending events"))?,
        debugregs: fd.get_debug_regs().map_err(err("debug registers"))?,
    })
}

/// Puts `state` into a freshly created vCPU. The order matters: CPUID before anything
/// that depends on features, special registers before registers, MSRs after SREGS (EFER),
/// LAPIC before pending events.
fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), PersistError> {
    let index = state.index;
    let err = |what: &'static str| {
        move |source| PersistError::Vcpu {
            op: "restore",
            what,
            index,
            source,
        }
    };
    if state.cpuid.len() > MAX_CPUID_ENTRIES {
        return Err(PersistError::TooManyCpuid {
            index,
            got: state.cpuid.len(),
            max: MAX_CPUID_ENTRIES,
        });
    }
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| PersistError::TooManyCpuid {
        index,
        got: state.cpuid.len(),
        max: MAX_CPUID_ENTRIES,
    })?;
    fd.set_cpuid2(&cpuid).map_err(err("CPUID"))?;
    fd.set_sregs(&state.sregs)
        .map_err(err("special registers"))?;
    fd.set_regs(&state.regs).map_err(err("registers"))?;
    let mut xsave = kvm_bindings::kvm_xsave::default();
    if state.xsave.len() != xsave.region.len() {
        return Err(PersistError::XsaveSize {
            index,
            got: state.xsave.len() * 4,
        });
    }
    xsave.region.copy_from_slice(&state.xsave);
    // SAFETY: `xsave` is a complete legacy kvm_xsave. KVM reads more than its 4 KiB only for
    // dynamically enabled features (AMX), which need an arch_prctl permission the VMM never
    // requests, so KVM reads nothing past the struct.
    unsafe { fd.set_xsave(&xsave) }.map_err(err("XSAVE area"))?;
    fd.set_xcrs(&state.xcrs).map_err(err("XCRs"))?;
    for chunk in state.msrs.chunks(MSR_BATCH) {
        let batch = Msrs::from_entries(chunk).expect("a batch of at most 64 MSRs fits");
        let set = fd.set_msrs(&batch).map_err(err("MSRs"))?;
        if set != chunk.len() {
            return Err(PersistError::Msrs {
                index,
                set,
                total: chunk.len(),
                first: chunk[set].index,
            });
        }
    }
    fd.set_lapic(&state.lapic).map_err(err("LAPIC"))?;
    fd.set_mp_state(state.mp_state).map_err(err("MP state"))?;
    fd.set_vcpu_events(&state.events)
        .map_err(err("pending events"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(err("debug registers"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, PersistError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|source| PersistError::Vm {
            op: "save",
            what,
            source,
        })?;
    Ok(chip)
}

fn save_vm(vm: &VmFd, pit: bool) -> Result<VmKvmState, PersistError> {
    let err = |what: &'static str| {
        move |source| PersistError::Vm {
            op: "save",
            what,
            source,
        }
    };
    Ok(VmKvmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "master PIC")?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "slave PIC")?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC, "IOAPIC")?,
        pit: if pit {
            Some(vm.get_pit2().map_err(err("PIT"))?)
        } else {
            None
        },
        clock: vm.get_clock().map_err(err("kvmclock"))?,
    })
}

fn restore_vm(vm: &VmFd, state: &VmKvmState) -> Result<(), PersistError> {
    let err = |what: &'static str| {
        move |source| PersistError::Vm {
            op: "restore",
            what,
            source,
        }
    };
    vm.set_irqchip(&state.pic_master)
        .map_err(err("master PIC"))?;
    vm.set_irqchip(&state.pic_slave).map_err(err("slave PIC"))?;
    vm.set_irqchip(&state.ioapic).map_err(err("IOAPIC"))?;
    if let Some(pit) = &state.pit {
        vm.set_pit2(pit).map_err(err("PIT"))?;
    }
    // Only the clock value moves; the flags say which fields KVM filled and must not be
    // echoed back (KVM_SET_CLOCK refuses unknown flags).
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(err("kvmclock"))?;
    Ok(())
}
