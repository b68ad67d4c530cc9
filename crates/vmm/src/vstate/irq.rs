//! Interrupt routing on KVM for devices with MSI-X: KVM's GSI routing table (the in-kernel
//! irqchip's default lines plus one MSI route per vector), an irqfd per vector, and
//! ioeventfds for queue notifications.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so [`IrqRouter`] keeps it: the 24
//! IOAPIC lines and 16 PIC lines KVM sets up with the irqchip (COM1, the PIT) stay as KVM
//! made them, and MSI routes come and go above them.
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::vm::Vm;
use crate::devices::passthrough::DirectVectors;
use crate::devices::{MsiInterrupts, MsiMessage};

/// GSIs below this are the irqchip's lines.
const FIRST_MSI_GSI: u32 = 24;
const IOAPIC_PINS: u32 = 24;
const PIC_PINS: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("cannot share the VM's file descriptor with the interrupt router: {0}")]
    Dup(#[source] std::io::Error),
    #[error("cannot open the VM for the interrupt router: {0}")]
    Open(#[source] kvm_ioctls::Error),
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot connect an irqfd to GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot register an ioeventfd at {addr:#x}: {source}")]
    Ioeventfd {
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error("no GSI left for another MSI vector")]
    NoGsi,
}

struct Table {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

/// The VM's GSI routing table and the irqfds/ioeventfds of its devices. Shared by the
/// vCPU threads (a guest programming an MSI-X entry changes a route) and the VMM.
pub struct IrqRouter {
    /// A second handle on the VM (a dup of its fd), so that routing works from any thread
    /// without borrowing the `Vm`.
    fd: VmFd,
    table: Mutex<Table>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    }
}

impl IrqRouter {
    pub fn new(vm: &Vm) -> Result<Arc<Self>, IrqError> {
        // SAFETY: dup of a descriptor we own; the result is checked below.
        let dup = unsafe { libc::dup(vm.fd.as_raw_fd()) };
        if dup < 0 {
            return Err(IrqError::Dup(std::io::Error::last_os_error()));
        }
        // SAFETY: `dup` is a fresh descriptor of this VM that nothing else owns; the VmFd
        // takes ownership of it and closes it when dropped.
        let fd = unsafe { vm.kvm.create_vmfd_from_rawfd(dup) }.map_err(IrqError::Open)?;
        Ok(Arc::new(Self {
            fd,
            table: Mutex::new(Table {
                msi: BTreeMap::new(),
                next_gsi: FIRST_MSI_GSI,
            }),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands out a GSI for one MSI vector.
    pub fn allocate_gsi(&self) -> Result<u32, IrqError> {
        let mut t = self.lock();
        if t.next_gsi as usize >= kvm_bindings::KVM_MAX_IRQ_ROUTES {
            return Err(IrqError::NoGsi);
        }
        t.next_gsi += 1;
        Ok(t.next_gsi - 1)
    }

    fn commit(&self, t: &Table) -> Result<(), String> {
        let mut entries: Vec<kvm_irq_routing_entry> = (0..IOAPIC_PINS)
            .map(|pin| irqchip(pin, KVM_IRQCHIP_IOAPIC, pin))
            .collect();
        entries.extend((0..PIC_PINS).map(|irq| {
            let chip = if irq < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            irqchip(irq, chip, irq % 8)
        }));
        entries.extend(t.msi.iter().map(|(&gsi, m)| kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            u: kvm_irq_routing_entry__bindgen_ty_1 {
                msi: kvm_irq_routing_msi {
                    address_lo: m.address as u32,
                    address_hi: (m.address >> 32) as u32,
                    data: m.data,
                    ..Default::default()
                },
            },
            ..Default::default()
        }));
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| format!("too many interrupt routes ({}): {e:?}", entries.len()))?;
        self.fd
            .set_gsi_routing(&routing)
            .map_err(|e| format!("KVM_SET_GSI_ROUTING failed: {e}"))
    }

    /// Routes `gsi` to `message`, or removes its route.
    pub fn set_msi(&self, gsi: u32, message: Option<MsiMessage>) -> Result<(), String> {
        let mut t = self.lock();
        let changed = match message {
            Some(m) => t.msi.insert(gsi, m) != Some(m),
            None => t.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&t)?;
        }
        Ok(())
    }

    pub fn connect_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| IrqError::Irqfd { gsi, source })
    }

    /// Undoes [`connect_irqfd`](Self::connect_irqfd): signals of `evt` stay in it.
    pub fn disconnect_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.fd
            .unregister_irqfd(evt, gsi)
            .map_err(|source| IrqError::Irqfd { gsi, source })
    }

    /// Makes guest writes (any size) at MMIO address `addr` signal `evt` inside KVM, with
    /// no exit to the VMM.
    pub fn register_ioeventfd(&self, evt: &EventFd, addr: u64) -> Result<(), IrqError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|source| IrqError::Ioeventfd { addr, source })
    }
}

impl IrqRouter {
    /// Undoes [`register_ioeventfd`](Self::register_ioeventfd).
    pub fn unregister_ioeventfd(&self, evt: &EventFd, addr: u64) -> Result<(), IrqError> {
        self.fd
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|source| IrqError::Ioeventfd { addr, source })
    }
}

/// A device's MSI-X vectors on KVM: vector `i` is an irqfd on its own GSI, whose route
/// follows what the guest programs into the table.
pub struct KvmMsiVectors {
    router: Arc<IrqRouter>,
    vectors: Vec<(EventFd, u32)>,
}

impl KvmMsiVectors {
    pub fn new(router: Arc<IrqRouter>, count: u16) -> Result<Self, IrqError> {
        let mut vectors = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(IrqError::EventFd)?;
            let gsi = router.allocate_gsi()?;
            router.connect_irqfd(&evt, gsi)?;
            vectors.push((evt, gsi));
        }
        Ok(Self { router, vectors })
    }

    /// Each vector's irqfd, for a device that raises them itself (a passthrough device).
    pub fn eventfds(&self) -> impl Iterator<Item = &EventFd> {
        self.vectors.iter().map(|(evt, _)| evt)
    }
}

/// A passthrough device signals the irqfds itself; a masked vector's irqfd is taken off
/// its GSI, so that the device's signals wait in the eventfd's counter.
impl DirectVectors for KvmMsiVectors {
    fn hold(&self, vector: u16, held: bool) -> Result<(), String> {
        let (evt, gsi) = self
            .vectors
            .get(usize::from(vector))
            .ok_or_else(|| format!("no MSI-X vector {vector}"))?;
        if held {
            return self
                .router
                .disconnect_irqfd(evt, *gsi)
                .map_err(|e| e.to_string());
        }
        // What waited is taken out first and sent once through the irqfd, so that a
        // signal that waited is delivered exactly once.
        let waited = evt.read().is_ok_and(|n| n > 0);
        self.router
            .connect_irqfd(evt, *gsi)
            .map_err(|e| e.to_string())?;
        if waited {
            let _ = evt.write(1);
        }
        Ok(())
    }

    fn waiting(&self, vector: u16) -> bool {
        let Some((evt, _)) = self.vectors.get(usize::from(vector)) else {
            return false;
        };
        // Read and put back: the counter is only looked at.
        match evt.read() {
            Ok(n) if n > 0 => {
                let _ = evt.write(n);
                true
            }
            _ => false,
        }
    }
}

impl MsiInterrupts for KvmMsiVectors {
    fn route(&self, vector: u16, message: Option<MsiMessage>) -> Result<(), String> {
        let (_, gsi) = self
            .vectors
            .get(usize::from(vector))
            .ok_or_else(|| format!("no MSI-X vector {vector}"))?;
        self.router.set_msi(*gsi, message)
    }

    fn trigger(&self, vector: u16) {
        if let Some((evt, _)) = self.vectors.get(usize::from(vector)) {
            // An eventfd write fails only when its counter would overflow, i.e. the
            // interrupt is pending anyway.
            let _ = evt.write(1);
        }
    }
}
