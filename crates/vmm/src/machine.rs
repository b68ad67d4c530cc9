//! A booted machine: KVM VM, memory, devices and running vCPUs. Built from a validated
//! configuration in one step, torn down by dropping it.
use std::fs::File;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use ray_api::vmm::DevicesConfig;

use crate::boot::{self, BootSpec};
use crate::devices::console::ConsoleState;
use crate::devices::{Console, ConsoleRing, IoBus};
use crate::memory::MemoryManager;
use crate::pci::{PciDevices, PciError, PciState};
use crate::vstate::persist::{self, Persist, PersistError, VcpuState, VmKvmState};
use crate::vstate::vcpu::{self, EventSink, Vcpus};
use crate::vstate::vm::{Vm, VmShell};
use crate::vstate::Flavour;

/// The legacy interrupt line of COM1.
const COM1_IRQ: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error("cannot restore: {0}")]
    Incompatible(String),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("cannot create the serial interrupt eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot write the VMM's features into the guest's heartbeat page: {0}")]
    Features(#[source] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("guest NUMA: {0}")]
    Numa(#[source] std::io::Error),
}

/// Everything of a paused machine except guest memory: what a snapshot or a migration
/// carries besides the pages.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    /// The hypervisor flavour the state was taken on (`pvm`, `vmx_svm`).
    pub flavour: String,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmKvmState,
    pub console: ConsoleState,
    /// The PCI devices, by id. Absent in states saved before the bus existed: such a
    /// guest never saw the devices and gets them fresh.
    #[serde(default)]
    pub pci: Option<PciState>,
}

pub struct Machine {
    pub vm: Vm,
    pub bus: Arc<IoBus>,
    pub vcpus: Option<Vcpus>,
    pub pci: PciDevices,
}

/// COM1's interrupt line: an eventfd KVM turns into IRQ 4.
fn serial_irq(vm: &Vm) -> Result<EventFd, BuildError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.connect_irq(&irq, COM1_IRQ)?;
    Ok(irq)
}

/// The port-I/O bus of `vm`: COM1 and the paravirtual console over the VM's memory, and
/// the PCI bus. Both consoles are always served: a guest keeps the console mode it chose
/// at boot, also across snapshots and migrations between VMMs that announce different
/// features.
fn bus_over(vm: &Vm, console: Console, pci: &PciDevices) -> IoBus {
    IoBus::with_memory(console, Arc::new(vm.memory.clone())).with_pci(pci.bus.clone())
}

/// Maps each vCPU's dirty ring, if the VM has rings.
fn map_rings(vm: &Vm, fds: &[kvm_ioctls::VcpuFd]) -> Result<(), BuildError> {
    if let Some(rings) = &vm.rings {
        for (i, fd) in fds.iter().enumerate() {
            rings
                .add_vcpu(i as u8, fd)
                .map_err(crate::vstate::vm::VmError::from)?;
        }
    }
    Ok(())
}

/// Where the console goes.
pub struct ConsoleSinks {
    pub log: Option<File>,
    pub stdout: bool,
    pub ring: Arc<ConsoleRing>,
}

impl Machine {
    /// Builds and starts the machine described by `spec`.
    pub fn boot(
        spec: &BootSpec,
        flavour: Flavour,
        sinks: ConsoleSinks,
        events: EventSink,
    ) -> Result<Machine, BuildError> {
        let regions = match &spec.numa {
            Some(numa) => numa.regions(),
            None => crate::numa::node_regions(&[spec.mem_bytes]),
        };
        let memory = MemoryManager::create_split(&regions)?;
        if let Some(numa) = &spec.numa {
            crate::numa::bind_memory(&memory, numa).map_err(BuildError::Numa)?;
        }
        let image = boot::load(memory.ram(), spec)?;
        // Linux guests keep the PIT (they calibrate and may tick with it); rayvisor's guest
        // (its ELF note) never uses it.
        let vm = if image.direct_smp {
            Vm::without_pit(memory, flavour)?
        } else {
            Vm::new(memory, flavour)?
        };
        if image.direct_smp {
            // A rayvisor guest (its ELF note): its heartbeat page is in place.
            crate::heartbeat::announce_features(vm.memory.ram()).map_err(BuildError::Features)?;
            if let Some(v) = boot::vram(&spec.devices, spec.mem_bytes)? {
                crate::heartbeat::announce_displays(vm.memory.ram(), v.start)
                    .map_err(BuildError::Features)?;
            }
        }

        let mut vm = vm;
        if spec.attribution {
            vm.enable_dirty_rings()?;
        }
        let console = Console::new(serial_irq(&vm)?, sinks.log, sinks.stdout, sinks.ring);
        let pci = PciDevices::create(&vm, &spec.devices, None)?;
        let bus = Arc::new(bus_over(&vm, console, &pci));

        let fds = (0..spec.vcpus)
            .map(|i| vcpu::create(&vm, i, spec.vcpus, &image))
            .collect::<Result<Vec<_>, _>>()?;
        map_rings(&vm, &fds)?;
        let machine = Machine::start(vm, bus, pci, fds, events)?;
        if let Some(numa) = &spec.numa {
            machine.pin_vcpus(numa)?;
        }
        Ok(machine)
    }

    /// Places a restored or migrated-in machine on this host's nodes: binds each guest
    /// node's memory (moving pages already present) and pins its vCPUs.
    pub fn place(&self, numa: &crate::numa::GuestNuma) -> Result<(), BuildError> {
        crate::numa::bind_memory(&self.vm.memory, numa).map_err(BuildError::Numa)?;
        self.pin_vcpus(numa)
    }

    /// Pins each vCPU's thread to the host CPUs of its guest NUMA node (vCPUs of unbound
    /// nodes keep every CPU).
    pub fn pin_vcpus(&self, numa: &crate::numa::GuestNuma) -> Result<(), BuildError> {
        let Some(vcpus) = &self.vcpus else {
            return Ok(());
        };
        let n = u8::try_from(vcpus.count()).unwrap_or(u8::MAX);
        for (i, cpus) in numa.vcpu_cpus(n).iter().enumerate() {
            if !cpus.is_empty() {
                vcpus.pin(i, cpus).map_err(BuildError::Numa)?;
            }
        }
        Ok(())
    }

    /// Starts the vCPU threads of a built machine, then its devices (restored ones wait
    /// until the vCPUs' interrupt controllers hold their saved state, or an interrupt they
    /// raise would be lost).
    fn start(
        vm: Vm,
        bus: Arc<IoBus>,
        pci: PciDevices,
        fds: Vec<kvm_ioctls::VcpuFd>,
        events: EventSink,
    ) -> Result<Machine, BuildError> {
        let rings = vm.rings.clone();
        let vcpus = Vcpus::start(fds, bus.clone(), events, rings)?;
        pci.resume();
        let machine = Machine {
            vm,
            bus,
            vcpus: Some(vcpus),
            pci,
        };
        // A restored guest asleep in `hlt` beats at once, not at its next timer deadline.
        machine.wake_idle();
        Ok(machine)
    }

    /// Saves the state of the machine. The vCPUs must be paused.
    pub fn save(&self) -> Result<MachineState, PersistError> {
        let msrs = persist::msr_list(&self.vm.kvm, self.vm.flavour.extra_msrs())?;
        let vcpus = match &self.vcpus {
            Some(v) => v.save_state(msrs)?,
            None => Vec::new(),
        };
        Ok(MachineState {
            flavour: self.vm.flavour.name().to_string(),
            vcpus,
            vm: persist::KvmVm {
                fd: &self.vm.fd,
                pit: self.vm.pit,
            }
            .save_state()?,
            console: self
                .bus
                .lock_console()
                .save_state()
                .map_err(PersistError::Device)?,
            pci: Some(self.pci.save().map_err(PersistError::Device)?),
        })
    }

    /// Rebuilds a machine from `state` over `memory` (already holding the guest's pages)
    /// and starts it, with the devices of `devices` (the VM's configuration, which the
    /// saved device list must match) and, with `attribution`, per-vCPU dirty rings. The
    /// state is untrusted: the flavour must match and KVM checks the rest.
    pub fn restore(
        shell: VmShell,
        memory: MemoryManager,
        state: &MachineState,
        devices: &DevicesConfig,
        attribution: bool,
        sinks: ConsoleSinks,
        events: EventSink,
    ) -> Result<Machine, BuildError> {
        // A restored VM logs dirty pages from its first instruction: its next snapshot can
        // be incremental on the one it came from.
        let vm = Vm::with_memory(shell, memory, true, state.vm.pit.is_some())?;
        Machine::restore_on(vm, state, devices, attribution, sinks, events)
    }

    /// [`restore`](Self::restore) onto a VM created earlier (a migration target creates
    /// it while pages arrive: creating it writes no guest memory, and takes ~1 ms of KVM
    /// work that would otherwise fall into the downtime).
    pub fn restore_on(
        mut vm: Vm,
        state: &MachineState,
        devices: &DevicesConfig,
        attribution: bool,
        sinks: ConsoleSinks,
        events: EventSink,
    ) -> Result<Machine, BuildError> {
        let flavour = vm.flavour;
        if state.flavour != flavour.name() {
            return Err(BuildError::Incompatible(format!(
                "the state was saved on a {} host and this host is {}",
                state.flavour,
                flavour.name()
            )));
        }
        if state.vcpus.is_empty() || state.vcpus.len() > usize::from(crate::config::MAX_VCPUS) {
            return Err(BuildError::Incompatible(format!(
                "the state has {} vCPUs; 1 to {} are possible",
                state.vcpus.len(),
                crate::config::MAX_VCPUS
            )));
        }
        if state.vm.pit.is_some() && !vm.pit {
            return Err(BuildError::Incompatible(
                "the state has a PIT and this VM has none".into(),
            ));
        }
        persist::KvmVm {
            fd: &vm.fd,
            pit: vm.pit,
        }
        .restore_state(&state.vm)?;
        if attribution {
            vm.enable_dirty_rings()?;
        }
        let console = Console::from_state(
            &state.console,
            serial_irq(&vm)?,
            sinks.log,
            sinks.stdout,
            sinks.ring,
        )
        .map_err(BuildError::Incompatible)?;
        let pci = PciDevices::create(&vm, devices, state.pci.as_ref())?;
        // Whatever the restored guest was told at its boot, both console paths work.
        let bus = Arc::new(bus_over(&vm, console, &pci));
        let fds = state
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if usize::from(s.index) != i {
                    return Err(BuildError::Incompatible(format!(
                        "vCPU state {i} claims to be vCPU {}",
                        s.index
                    )));
                }
                Ok(vcpu::restore(&vm, s)?)
            })
            .collect::<Result<Vec<_>, _>>()?;
        map_rings(&vm, &fds)?;
        Machine::start(vm, bus, pci, fds, events)
    }

    /// Limits the vCPUs to `100 - percent` % of their run time; 0 lifts the throttle.
    pub fn throttle(&self, percent: u8) {
        if let Some(v) = &self.vcpus {
            v.set_throttle(percent);
        }
    }

    /// Stops the vCPUs, then the devices: nothing changes guest memory or device state
    /// until [`resume`](Self::resume).
    pub fn pause(&self) {
        if let Some(v) = &self.vcpus {
            v.pause();
        }
        self.pci.pause();
    }

    /// Brings an idle guest back to its loop now: ends the vCPUs' idle-port waits (see
    /// [`Vcpus::wake_idle`]) and, to a guest asleep in `hlt`, sends its wake interrupt
    /// ([`ray_guest_abi::VMM_FEATURE_WAKE_IRQ`]; the boot CPU reads the doorbells).
    pub fn wake_idle(&self) {
        if let Some(v) = &self.vcpus {
            v.wake_idle();
        }
        if crate::heartbeat::wants_wake_irq(self.vm.memory.ram()) {
            if let Err(e) = self.vm.signal_msi(0, ray_guest_abi::WAKE_VECTOR) {
                tracing::warn!("{e}; the guest wakes at its next timer deadline");
            }
        }
    }

    pub fn resume(&self) {
        self.pci.resume();
        if let Some(v) = &self.vcpus {
            v.resume();
        }
        self.wake_idle();
    }

    /// Ends the vCPU threads; the memory goes when the machine is dropped.
    pub fn shutdown(&mut self) {
        if let Some(v) = self.vcpus.take() {
            v.exit();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
