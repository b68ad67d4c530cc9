//! The VM's PCI devices on KVM: the bus behind ports 0xcf8-0xcff and the BAR MMIO exits,
//! BARs placed by the allocator in the MMIO hole, MSI-X vectors as irqfds on routed GSIs,
//! and queue notifications as ioeventfds served by one notifier thread, so that a guest's
//! kick never exits to the VMM.
//!
//! Today the bus holds one device, virtio-rng, always present: until a driver uses it, it
//! costs one thread that sleeps and no exits.
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use ray_devices::pci::{BarAllocator, PciBus, SlotBarMove};
use ray_devices::virtio::pci::{VirtioPci, VirtioPciState, BAR_SIZE, NOTIFY, NOTIFY_MULTIPLIER};
use ray_devices::virtio::rng::Rng;
use ray_devices::Persist;
use vmm_sys_util::eventfd::EventFd;

use crate::logging::SpawnInSpan;
use crate::vstate::irq::{IrqError, IrqRouter, KvmMsiVectors};
use crate::vstate::vm::Vm;

/// Where BARs go: the MMIO hole below the IOAPIC (guests map it uncached).
pub const BAR_WINDOW_START: u64 = 0xc000_0000;
pub const BAR_WINDOW_END: u64 = 0xfe00_0000;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error(transparent)]
    Irq(#[from] IrqError),
    #[error("cannot place a BAR: {0}")]
    Bar(#[from] ray_devices::pci::alloc::NoRoom),
    #[error("the PCI bus has no free slot")]
    BusFull,
    #[error("cannot restore the PCI devices: {0}")]
    Restore(String),
    #[error("cannot start the device notifier thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The PCI devices' share of a snapshot or migration.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PciState {
    pub rng: VirtioPciState,
}

type Transport = Arc<Mutex<VirtioPci>>;

fn lock(t: &Transport) -> MutexGuard<'_, VirtioPci> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits on the ioeventfds of every queue and serves each kick on the device.
struct Notifier {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Notifier {
    fn start(kicks: Vec<(EventFd, Transport, u16)>) -> Result<Self, PciError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(PciError::Thread)?;
        let stop_fd = stop.try_clone().map_err(PciError::Thread)?;
        let thread = std::thread::Builder::new()
            .name("virtio".into())
            .stack_size(128 << 10)
            .spawn_in_span(move || notifier_loop(&stop_fd, &kicks))
            .map_err(PciError::Thread)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn notifier_loop(stop: &EventFd, kicks: &[(EventFd, Transport, u16)]) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(stop.as_raw_fd())
        .chain(kicks.iter().map(|(e, _, _)| e.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(
                "the virtio notifier cannot wait: {}; queue kicks are no longer served",
                std::io::Error::last_os_error()
            );
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        for (pfd, (evt, transport, queue)) in fds[1..].iter().zip(kicks) {
            if pfd.revents & libc::POLLIN != 0 && evt.read().is_ok() {
                lock(transport).notify(*queue);
            }
        }
    }
}

/// Moves the ioeventfds of the device in `slot` along when the guest moves its BAR 0.
/// Should KVM refuse, kicks at the new address still work, as MMIO exits.
fn follow_bar(
    router: Arc<IrqRouter>,
    slot: usize,
    kicks: Vec<EventFd>,
) -> ray_devices::pci::BarMoveHook {
    Box::new(move |m: SlotBarMove| {
        if m.slot != slot || m.moved.bar != 0 {
            return;
        }
        for (q, evt) in kicks.iter().enumerate() {
            let at = |base: u64| base + NOTIFY + NOTIFY_MULTIPLIER * q as u64;
            if let Err(e) = router.unregister_ioeventfd(evt, at(m.moved.from)) {
                tracing::warn!("{e}");
            }
            if let Err(e) = router.register_ioeventfd(evt, at(m.moved.to)) {
                tracing::warn!("{e}; kicks of queue {q} will exit to the VMM");
            }
        }
    })
}

/// The bus and its devices.
pub struct PciDevices {
    pub bus: Arc<PciBus>,
    rng: Transport,
    /// Whether queue kicks stay inside KVM (ioeventfd) or arrive as MMIO exits.
    pub kicks_in_kernel: bool,
    _router: Arc<IrqRouter>,
    _notifier: Option<Notifier>,
}

impl PciDevices {
    /// Builds the bus with its devices over `vm`; with `state`, the devices take it over
    /// (a restore or a migration target) and stay paused until [`resume`](Self::resume).
    pub fn create(vm: &Vm, state: Option<&PciState>) -> Result<Self, PciError> {
        let router = IrqRouter::new(vm)?;
        let mut bars = BarAllocator::new(BAR_WINDOW_START, BAR_WINDOW_END);
        let bar = bars.allocate(BAR_SIZE)?;
        let rng_queues = 1u16;
        let vectors = Arc::new(KvmMsiVectors::new(router.clone(), rng_queues + 1)?);
        let mut rng = VirtioPci::new(
            "virtio-rng",
            Box::new(Rng),
            Arc::new(vm.memory.clone()),
            vectors,
            bar as u32,
        );
        if let Some(s) = state {
            rng.restore_state(&s.rng).map_err(PciError::Restore)?;
        }
        let notify: Vec<u64> = (0..rng.queue_count())
            .map(|q| rng.notify_address(q))
            .collect();
        let rng = Arc::new(Mutex::new(rng));
        let mut bus = PciBus::new();
        let slot = bus.add(rng.clone()).ok_or(PciError::BusFull)?;

        // Queue kicks as ioeventfds: KVM signals the eventfd and resumes the guest without
        // an exit to the VMM. If KVM refuses, kicks still work, as MMIO exits.
        let mut kicks = Vec::new();
        let mut in_kernel = true;
        for (q, addr) in notify.into_iter().enumerate() {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(IrqError::EventFd)?;
            match router.register_ioeventfd(&evt, addr) {
                Ok(()) => kicks.push((evt, rng.clone(), q as u16)),
                Err(e) => {
                    tracing::warn!("{e}; virtio-rng's queue kicks will exit to the VMM");
                    in_kernel = false;
                }
            }
        }
        let fds = kicks
            .iter()
            .map(|(e, _, _)| e.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(IrqError::EventFd)?;
        bus.on_bar_move(follow_bar(router.clone(), slot, fds));
        let notifier = if kicks.is_empty() {
            None
        } else {
            Some(Notifier::start(kicks)?)
        };
        Ok(Self {
            bus: Arc::new(bus),
            rng,
            kicks_in_kernel: in_kernel,
            _router: router,
            _notifier: notifier,
        })
    }

    /// Stops serving queues (kicks are remembered) so that a saved state holds still.
    pub fn pause(&self) {
        lock(&self.rng).pause();
    }

    /// Serves queues again, including kicks that came while paused.
    pub fn resume(&self) {
        lock(&self.rng).resume();
    }

    pub fn save(&self) -> Result<PciState, String> {
        Ok(PciState {
            rng: lock(&self.rng).save_state()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use ray_devices::pci::{CONFIG_ADDRESS, CONFIG_DATA};
    use vm_memory::GuestAddress;

    use super::*;
    use crate::memory::MemoryManager;
    use crate::vstate::Flavour;

    #[test]
    fn ioeventfds_follow_a_moved_bar() {
        let memory = MemoryManager::create(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let vm = Vm::new(memory, Flavour::detect()).unwrap();
        let pci = PciDevices::create(&vm, None).unwrap();
        assert!(pci.kicks_in_kernel);
        let old = lock(&pci.rng).notify_address(0);
        assert_eq!(old, BAR_WINDOW_START + NOTIFY);
        // KVM refuses a second ioeventfd at an address that has one: that is the probe.
        let probe = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(pci._router.register_ioeventfd(&probe, old).is_err());

        let new_bar = 0xd000_0000u32;
        pci.bus
            .write_port(CONFIG_ADDRESS, &(1u32 << 31 | 1 << 11 | 0x10).to_le_bytes());
        pci.bus.write_port(CONFIG_DATA, &new_bar.to_le_bytes());
        let new = lock(&pci.rng).notify_address(0);
        assert_eq!(new, u64::from(new_bar) + NOTIFY);
        assert!(
            pci._router.register_ioeventfd(&probe, new).is_err(),
            "moved here"
        );
        pci._router.register_ioeventfd(&probe, old).unwrap();
    }
}
