//! The VM's PCI devices on KVM: the bus behind ports 0xcf8-0xcff, the ECAM window and the
//! BAR MMIO exits,
//! BARs placed by the allocator in the MMIO hole, MSI-X vectors as irqfds on routed GSIs,
//! and queue notifications as ioeventfds served by one notifier thread, so that a guest's
//! kick never exits to the VMM.
//!
//! The devices come from the VM configuration ([`DevicesConfig`]): each gets its own slot,
//! BAR, MSI-X vectors and ioeventfds, and a stable id under which its state travels in
//! snapshots and migrations. Until a driver uses them they cost one notifier thread that
//! sleeps, and no exits. Devices doing slow I/O complete requests from their own threads
//! (see [`ray_devices::virtio::completer`]).
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use ray_api::gpu::GpuType;
use ray_api::vmm::{DevicesConfig, DiskConfig, DiskEngine};
use ray_devices::virtio::blk::io::Engine;

use ray_devices::pci::{BarAllocator, EcamWindow, PciBus, SlotBarMove};
use ray_devices::rate::RateLimit;
use ray_devices::virtio::blk::{Block, BlockConfig};
use ray_devices::virtio::gpu::commands::Limits as GpuLimits;
use ray_devices::virtio::gpu::Gpu;
use ray_devices::virtio::input::{Input, Kind as InputKind};
use ray_devices::virtio::pci::{VirtioPci, VirtioPciState, BAR_SIZE, NOTIFY, NOTIFY_MULTIPLIER};
use ray_devices::virtio::rng::Rng;
use ray_devices::virtio::vsock::Vsock;

use crate::display::VirtioGpu;
use crate::metrics::DeviceCounters;
use ray_devices::virtio::VirtioDevice;
use ray_devices::Persist;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::layout;
use crate::logging::SpawnInSpan;
use crate::vstate::irq::{IrqError, IrqRouter, KvmMsiVectors};
use crate::vstate::vm::Vm;

/// Where BARs go: the MMIO hole below the ECAM window and the IOAPIC (guests map it
/// uncached).
pub const BAR_WINDOW_START: u64 = 0xc000_0000;
pub const BAR_WINDOW_END: u64 = 0xfe00_0000;
const _: () = assert!(BAR_WINDOW_END <= layout::PCI_ECAM);

/// The ECAM window of every VM (the MCFG table describes it, the e820 map reserves it).
pub fn ecam_window() -> EcamWindow {
    EcamWindow {
        base: layout::PCI_ECAM,
        buses: layout::PCI_ECAM_BUSES,
    }
}

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
    #[error("cannot set up device {id}: {why}")]
    Device { id: String, why: String },
    #[error("cannot start the device notifier thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The PCI devices' share of a snapshot or migration: each device's state under its id,
/// in bus order, and where the bus's ECAM window was.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PciState {
    pub devices: Vec<DeviceState>,
    /// The ECAM window the guest may have found in its MCFG table. Absent in states saved
    /// before the window existed: such a guest was never told of it and uses the ports,
    /// so it restores fine; a state naming another window is refused.
    #[serde(default)]
    pub ecam: Option<EcamWindow>,
    /// The Bochs display devices (registers and VRAM), by GPU.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bochs: Vec<crate::bochs::SavedBochs>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    /// Stable across snapshots and migrations: `rng`, a disk's id, ...
    pub id: String,
    pub state: VirtioPciState,
}

/// One device the configuration asks for, before it is put on the bus.
pub struct DeviceSpec {
    pub id: String,
    /// For log lines: `virtio-rng`, `virtio-blk`, ...
    pub name: &'static str,
    pub device: Box<dyn VirtioDevice>,
}

/// The devices of `config`, in bus order. Adding a device kind is one entry here.
/// `restoring`: the devices take over a saved state and stay paused until resumed.
pub fn devices_of(config: &DevicesConfig, restoring: bool) -> Result<Vec<DeviceSpec>, PciError> {
    Ok(devices_and_gpus(config, restoring)?.0)
}

/// [`devices_of`], and the display side of each virtio GPU among them.
fn devices_and_gpus(
    config: &DevicesConfig,
    restoring: bool,
) -> Result<(Vec<DeviceSpec>, Vec<VirtioGpu>), PciError> {
    let mut specs = Vec::new();
    if config.rng {
        specs.push(DeviceSpec {
            id: "rng".into(),
            name: "virtio-rng",
            device: Box::new(Rng),
        });
    }
    for disk in &config.disks {
        let device = open_disk(disk)?;
        crate::migration::disks::disk_built(&disk.id, device.dirty_blocks());
        specs.push(DeviceSpec {
            id: disk.id.clone(),
            name: "virtio-blk",
            device: Box::new(device),
        });
    }
    for (net, id) in config.net.iter().zip(net_ids(config)) {
        let device = crate::net::device(net, restoring).map_err(|why| PciError::Device {
            id: id.clone(),
            why,
        })?;
        crate::metrics::device_built(&id, DeviceCounters::Net(device.counters()));
        specs.push(DeviceSpec {
            device: Box::new(device),
            id,
            name: "virtio-net",
        });
    }
    if let Some(v) = &config.vsock {
        let id = VSOCK_ID.to_string();
        let bad = |why: String| PciError::Device {
            id: id.clone(),
            why,
        };
        v.validate().map_err(bad)?;
        let socket = v
            .socket
            .clone()
            .ok_or_else(|| bad("the socket path was not settled (crate::vsock::settle)".into()))?;
        let opener = crate::jailed::vsock_opener(std::path::Path::new(&socket));
        let device = Vsock::new(v.cid, socket.into(), opener).map_err(bad)?;
        crate::metrics::device_built(&id, DeviceCounters::Vsock(device.counters()));
        specs.push(DeviceSpec {
            device: Box::new(device),
            id,
            name: "virtio-vsock",
        });
    }
    let mut gpus = Vec::new();
    for (i, id) in gpu_ids(config) {
        let g = &config.gpus[i];
        let modes = vec![(g.width, g.height); usize::from(g.displays)];
        let built = match g.kind {
            GpuType::Remote => crate::display::remote_endpoint(g).and_then(|e| {
                let timeout = std::time::Duration::from_millis(u64::from(
                    g.timeout_ms.unwrap_or(ray_api::gpu::REMOTE_TIMEOUT_MS),
                ));
                Gpu::new_remote(&modes, GpuLimits::default(), e, timeout)
            }),
            _ => Gpu::new(&modes, GpuLimits::default()),
        };
        let (device, displays) = built.map_err(|why| PciError::Device {
            id: id.clone(),
            why,
        })?;
        gpus.push((i, displays));
        specs.push(DeviceSpec {
            device: Box::new(device),
            id,
            name: "virtio-gpu",
        });
    }
    if config.input_enabled() {
        for (id, kind) in INPUT_IDS {
            let device = Input::new(kind);
            crate::display::input_built(device.handle());
            specs.push(DeviceSpec {
                device: Box::new(device),
                id: id.into(),
                name: "virtio-input",
            });
        }
    }
    Ok((specs, gpus))
}

/// Each virtio GPU's index in the GPU list and device id: `gpu0`, `gpu2`, ...
fn gpu_ids(config: &DevicesConfig) -> impl Iterator<Item = (usize, String)> + '_ {
    config
        .gpus
        .iter()
        .enumerate()
        .filter(|(_, g)| g.kind.is_virtio())
        .map(|(i, _)| (i, format!("gpu{i}")))
}

/// A NIC's device id: `net0`, `net1`, ... in bus order.
fn net_ids(config: &DevicesConfig) -> impl Iterator<Item = String> {
    (0..config.net.len()).map(|i| format!("net{i}"))
}

/// The ids of `config`'s devices in bus order, without building any.
fn ids_of(config: &DevicesConfig) -> Vec<String> {
    let rng = config.rng.then(|| "rng".to_string());
    rng.into_iter()
        .chain(config.disks.iter().map(|d| d.id.clone()))
        .chain(net_ids(config))
        .chain(config.vsock.as_ref().map(|_| VSOCK_ID.to_string()))
        .chain(gpu_ids(config).map(|(_, id)| id))
        .chain(
            INPUT_IDS
                .iter()
                .filter(|_| config.input_enabled())
                .map(|(id, _)| id.to_string()),
        )
        .collect()
}

/// The input devices' ids, in bus order (after every other device).
const INPUT_IDS: [(&str, InputKind); 2] = [
    ("keyboard", InputKind::Keyboard),
    ("tablet", InputKind::Tablet),
];

/// The vsock device's id (there is one at most).
const VSOCK_ID: &str = "vsock";

fn open_disk(disk: &DiskConfig) -> Result<Block, PciError> {
    let failed = |why: String| PciError::Device {
        id: disk.id.clone(),
        why,
    };
    let config = block_config(disk, DISK_QUEUES);
    let file = crate::jailed::open_disk(&config.path, !disk.readonly, disk.direct)
        .map_err(|e| failed(format!("cannot open {}: {e}", disk.path)))?;
    Block::with_file(config, file).map_err(|e| failed(e.to_string()))
}

/// The model's configuration of `disk` with `queues` queues (a vhost-user back end serves
/// the same disk with as many queues as its front end asks for).
pub fn block_config(disk: &DiskConfig, queues: u16) -> BlockConfig {
    BlockConfig {
        path: disk.path.clone().into(),
        readonly: disk.readonly,
        direct: disk.direct,
        serial: disk.id.clone(),
        queues,
        rate: RateLimit {
            bytes_per_sec: disk.rate_bytes,
            ops_per_sec: disk.rate_ops,
        },
        engine: match disk.engine {
            DiskEngine::Pool => Engine::Pool,
            DiskEngine::Uring => Engine::Uring,
        },
    }
}

/// Queues of each disk (VIRTIO_BLK_F_MQ).
const DISK_QUEUES: u16 = 2;

/// Checks, before anything is built, that the devices of `config` can take `state` over:
/// the same device list, and each device's own part (a disk's size). A migration target
/// runs it when the state arrives, so that a missing or different disk refuses the
/// migration while the source still runs.
pub fn check_state(config: &DevicesConfig, state: &PciState) -> Result<(), PciError> {
    check_ids(state, &ids_of(config))?;
    check_ecam(state, ecam_window())?;
    check_bochs(config, state)?;
    // Only a disk has something to check on this side (its file and size); NICs and the
    // rng are not opened here (a TAP is taken over when the devices are built).
    for saved in &state.devices {
        if let Some(disk) = config.disks.iter().find(|d| d.id == saved.id) {
            open_disk(disk)?
                .check_device(&saved.state.device)
                .map_err(|why| PciError::Device {
                    id: disk.id.clone(),
                    why,
                })?;
        }
    }
    Ok(())
}

/// Refuses a saved device list that is not the configured one, naming both.
fn check_ids(saved: &PciState, ours: &[String]) -> Result<(), PciError> {
    let saved: Vec<&str> = saved.devices.iter().map(|d| d.id.as_str()).collect();
    if saved != ours.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(PciError::Restore(format!(
            "the saved state has the devices [{}] but this VM's configuration has [{}]",
            saved.join(", "),
            ours.join(", ")
        )));
    }
    Ok(())
}

/// Refuses a state whose Bochs displays are not the configured ones (by GPU index).
fn check_bochs(config: &DevicesConfig, saved: &PciState) -> Result<(), PciError> {
    let ours: Vec<usize> = bochs_gpus(config).collect();
    let theirs: Vec<usize> = saved.bochs.iter().map(|b| b.gpu).collect();
    if ours != theirs {
        return Err(PciError::Restore(format!(
            "the saved state has Bochs displays on GPUs {theirs:?} but this VM's \
             configuration has them on GPUs {ours:?}"
        )));
    }
    Ok(())
}

/// The indices of the GPUs that are Bochs display devices.
fn bochs_gpus(config: &DevicesConfig) -> impl Iterator<Item = usize> + '_ {
    config
        .gpus
        .iter()
        .enumerate()
        .filter(|(_, g)| g.is_bochs())
        .map(|(i, _)| i)
}

/// Refuses a state whose guest was told of an ECAM window other than `ours`: it would
/// read its configuration space where this VMM serves none.
fn check_ecam(saved: &PciState, ours: EcamWindow) -> Result<(), PciError> {
    match saved.ecam {
        Some(w) if w != ours => Err(PciError::Restore(format!(
            "the saved state's PCI ECAM window is {} bus(es) at {:#x}, but this VMM's is {} \
             bus(es) at {:#x}: the guest would lose its configuration space",
            w.buses, w.base, ours.buses, ours.base
        ))),
        _ => Ok(()),
    }
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
            .spawn_in_span(move || {
                crate::seccomp::enter(crate::seccomp::Kind::DeviceIo);
                notifier_loop(&stop_fd, &kicks)
            })
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

/// Moves the ioeventfds of a device along when the guest moves its BAR 0. Should KVM
/// refuse, kicks at the new address still work, as MMIO exits.
fn follow_bars(
    router: Arc<IrqRouter>,
    slots: Vec<(usize, Vec<EventFd>)>,
) -> ray_devices::pci::BarMoveHook {
    Box::new(move |m: SlotBarMove| {
        if m.moved.bar != 0 {
            return;
        }
        let Some((_, kicks)) = slots.iter().find(|(s, _)| *s == m.slot) else {
            return;
        };
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

/// A device on the bus.
struct Plugged {
    id: String,
    transport: Transport,
}

/// How long pausing waits for devices to finish the requests they are working on.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The bus and its devices.
pub struct PciDevices {
    pub bus: Arc<PciBus>,
    devices: Vec<Plugged>,
    /// Whether queue kicks stay inside KVM (ioeventfd) or arrive as MMIO exits.
    pub kicks_in_kernel: bool,
    /// The virtio GPUs' scanouts, for the displays.
    pub gpus: Vec<VirtioGpu>,
    /// The passthrough GPUs' functions.
    passthrough: Vec<crate::passthrough::Built>,
    /// The Bochs display devices.
    pub bochs: Vec<crate::bochs::BochsGpu>,
    _router: Arc<IrqRouter>,
    _notifier: Option<Notifier>,
}

impl PciDevices {
    /// Builds the bus with the devices of `config` over `vm`; with `state`, the devices
    /// take it over (a restore or a migration target) and stay paused until
    /// [`resume`](Self::resume). A state whose device list differs is refused.
    pub fn create(
        vm: &Vm,
        config: &DevicesConfig,
        state: Option<&PciState>,
    ) -> Result<Self, PciError> {
        if let Some(s) = state {
            check_ids(s, &ids_of(config))?;
            check_ecam(s, ecam_window())?;
            check_bochs(config, s)?;
        }
        let (specs, gpus) = devices_and_gpus(config, state.is_some())?;
        let router = IrqRouter::new(vm)?;
        let mut bars = BarAllocator::new(BAR_WINDOW_START, BAR_WINDOW_END);
        let mut bus = PciBus::new();
        bus.set_ecam(ecam_window());
        crate::metrics::pci_bus_built(bus.counters().clone());
        let mut kicks = Vec::new();
        let mut moves = Vec::new();
        let mut devices = Vec::new();
        let mut in_kernel = true;
        for (i, spec) in specs.into_iter().enumerate() {
            let bar = bars.allocate(BAR_SIZE)?;
            let queues = spec.device.queue_sizes().len() as u16;
            let vectors = Arc::new(KvmMsiVectors::new(router.clone(), queues + 1)?);
            let mut dev = VirtioPci::new(
                spec.name,
                spec.device,
                Arc::new(vm.memory.clone()),
                vectors,
                bar as u32,
            );
            if let Some(s) = state {
                dev.restore_state(&s.devices[i].state)
                    .map_err(PciError::Restore)?;
            }
            let notify: Vec<u64> = (0..dev.queue_count())
                .map(|q| dev.notify_address(q))
                .collect();
            let transport = dev.share();
            let slot = bus.add(transport.clone()).ok_or(PciError::BusFull)?;

            // Queue kicks as ioeventfds: KVM signals the eventfd and resumes the guest
            // without an exit to the VMM. If KVM refuses, kicks still work, as MMIO exits.
            let mut fds = Vec::new();
            for (q, addr) in notify.into_iter().enumerate() {
                let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(IrqError::EventFd)?;
                match router.register_ioeventfd(&evt, addr) {
                    Ok(()) => {
                        fds.push(evt.try_clone().map_err(IrqError::EventFd)?);
                        kicks.push((evt, transport.clone(), q as u16));
                    }
                    Err(e) => {
                        tracing::warn!("{e}; {}'s queue kicks will exit to the VMM", spec.id);
                        in_kernel = false;
                    }
                }
            }
            moves.push((slot, fds));
            devices.push(Plugged {
                id: spec.id,
                transport,
            });
        }
        let mut bochs = Vec::new();
        for i in bochs_gpus(config) {
            let saved = state
                .and_then(|s| s.bochs.iter().find(|b| b.gpu == i))
                .map(|b| &b.state);
            let b =
                crate::bochs::build(i, &config.gpus[i], vm, &mut bars, saved).map_err(|why| {
                    PciError::Device {
                        id: format!("gpu{i}"),
                        why,
                    }
                })?;
            bus.add(b.device.clone()).ok_or(PciError::BusFull)?;
            bochs.push(b);
        }
        crate::passthrough::clear();
        let mut passthrough = Vec::new();
        for (i, g) in config.gpus.iter().enumerate() {
            let Some(source) = &g.passthrough else {
                continue;
            };
            let id = format!("gpu{i}");
            if state.is_some() {
                return Err(PciError::Restore(format!(
                    "{id} is a passthrough GPU ({source}): its device's state was never saved"
                )));
            }
            let timeout = std::time::Duration::from_millis(u64::from(
                g.timeout_ms.unwrap_or(ray_api::gpu::PASSTHROUGH_TIMEOUT_MS),
            ));
            let b = crate::passthrough::build(
                i,
                source,
                timeout,
                &vm.memory,
                &mut bars,
                router.clone(),
            )
            .map_err(|why| PciError::Device { id, why })?;
            bus.add(b.device.clone()).ok_or(PciError::BusFull)?;
            passthrough.push(b);
        }
        bus.on_bar_move(follow_bars(router.clone(), moves));
        let notifier = if kicks.is_empty() {
            None
        } else {
            Some(Notifier::start(kicks)?)
        };
        Ok(Self {
            bus: Arc::new(bus),
            devices,
            kicks_in_kernel: in_kernel,
            gpus,
            passthrough,
            bochs,
            _router: router,
            _notifier: notifier,
        })
    }

    /// Stops serving queues (kicks are remembered) and waits until the devices finished
    /// the requests they had taken, so that a saved state holds still.
    pub fn pause(&self) {
        for d in &self.devices {
            lock(&d.transport).pause();
        }
        for d in &self.devices {
            let in_flight = lock(&d.transport).in_flight();
            let left = in_flight.wait_idle(DRAIN_TIMEOUT);
            if left > 0 {
                tracing::error!(
                    "device {} still has {left} requests in flight after {DRAIN_TIMEOUT:?}",
                    d.id
                );
            }
        }
    }

    /// Serves queues again, including kicks that came while paused.
    pub fn resume(&self) {
        for d in &self.devices {
            lock(&d.transport).resume();
        }
    }

    pub fn save(&self) -> Result<PciState, String> {
        if let Some(b) = self.passthrough.first() {
            return Err(format!(
                "GPU {} is a passthrough GPU: a device outside the VMM holds state the VMM \
                 cannot save, so this VM cannot be snapshotted or migrated",
                b.gpu
            ));
        }
        let devices = self
            .devices
            .iter()
            .map(|d| {
                Ok(DeviceState {
                    id: d.id.clone(),
                    state: lock(&d.transport).save_state()?,
                })
            })
            .collect::<Result<_, String>>()?;
        let bochs = self
            .bochs
            .iter()
            .map(|b| crate::bochs::SavedBochs {
                gpu: b.gpu,
                state: b.device.lock().unwrap_or_else(|e| e.into_inner()).save(),
            })
            .collect();
        Ok(PciState {
            devices,
            ecam: self.bus.ecam(),
            bochs,
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
    fn a_saved_device_list_must_match_the_configured_one() {
        let specs = devices_of(&DevicesConfig::default(), false).unwrap();
        let saved = |ids: &[&str]| PciState {
            ecam: None,
            bochs: Vec::new(),
            devices: ids
                .iter()
                .map(|id| DeviceState {
                    id: id.to_string(),
                    state: lock(
                        &VirtioPci::new(
                            "virtio-rng",
                            Box::new(Rng),
                            Arc::new(
                                MemoryManager::create(&[(GuestAddress(0), 2 << 20)])
                                    .unwrap()
                                    .clone(),
                            ),
                            Arc::new(NoIrq),
                            0,
                        )
                        .share(),
                    )
                    .save_state()
                    .unwrap(),
                })
                .collect(),
        };
        let ids: Vec<String> = specs.iter().map(|d| d.id.clone()).collect();
        assert_eq!(ids, ids_of(&DevicesConfig::default()));
        assert!(check_ids(&saved(&["rng"]), &ids).is_ok());
        let err = check_ids(&saved(&["rng", "disk0"]), &ids).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot restore the PCI devices: the saved state has the devices [rng, disk0] but \
             this VM's configuration has [rng]"
        );
        let none = ids_of(&DevicesConfig {
            rng: false,
            ..Default::default()
        });
        assert!(check_ids(&saved(&["rng"]), &none).is_err());
    }

    #[test]
    fn states_from_before_the_ecam_window_restore_and_other_windows_are_refused() {
        // A state saved before the window existed has no `ecam` field.
        let old: PciState = serde_json::from_str(r#"{"devices": []}"#).unwrap();
        assert_eq!(old.ecam, None);
        assert!(check_ecam(&old, ecam_window()).is_ok());
        let same = PciState {
            devices: vec![],
            ecam: Some(ecam_window()),
            bochs: vec![],
        };
        assert!(check_ecam(&same, ecam_window()).is_ok());
        let elsewhere = PciState {
            devices: vec![],
            ecam: Some(EcamWindow {
                base: 0xb000_0000,
                buses: 256,
            }),
            bochs: vec![],
        };
        assert_eq!(
            check_ecam(&elsewhere, ecam_window())
                .unwrap_err()
                .to_string(),
            "cannot restore the PCI devices: the saved state's PCI ECAM window is 256 bus(es) \
             at 0xb0000000, but this VMM's is 1 bus(es) at 0xfe000000: the guest would lose \
             its configuration space"
        );
        let back: PciState = serde_json::from_str(&serde_json::to_string(&same).unwrap()).unwrap();
        assert_eq!(back.ecam, Some(ecam_window()));
    }

    #[test]
    fn a_bochs_vram_slot_follows_memory_decoding_and_its_bar() {
        let memory = MemoryManager::create(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let vm = Vm::new(memory, Flavour::detect()).unwrap();
        let config = DevicesConfig {
            gpus: vec![ray_api::gpu::GpuConfig::parse("emulated,device=bochs")
                .unwrap()
                .unwrap()],
            ..Default::default()
        };
        let pci = PciDevices::create(&vm, &config, None).unwrap();
        let b = &pci.bochs[0];
        let at = || crate::bochs::lock(&b.slot).address();
        let select = |slot: u32, offset: u32| {
            pci.bus.write_port(
                CONFIG_ADDRESS,
                &(1u32 << 31 | slot << 11 | offset).to_le_bytes(),
            );
        };
        let slot = (1..32u32)
            .find(|&s| {
                select(s, 0);
                let mut id = [0; 4];
                pci.bus.read_port(CONFIG_DATA, &mut id);
                u32::from_le_bytes(id) == 0x1111_1234
            })
            .expect("the Bochs display is on the bus");
        let write = |offset: u32, data: &[u8]| {
            select(slot, offset);
            pci.bus.write_port(CONFIG_DATA, data);
        };
        let bar = lock_bar(&pci, slot);
        assert!((BAR_WINDOW_START..BAR_WINDOW_END).contains(&bar));
        assert_eq!(at(), None, "no memory decoding yet");
        write(0x04, &2u16.to_le_bytes());
        assert_eq!(at(), Some(bar));
        write(0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(at(), Some(0xd000_0000));
        // Sizing with decoding on puts the BAR over the ECAM window: no slot there.
        write(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(at(), None);
        write(0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(at(), Some(0xd000_0000));
        assert!(
            crate::bochs::lock(&b.slot)
                .take_dirty()
                .is_some_and(|d| d.iter().all(|w| *w == u64::MAX)),
            "a slot just mapped counts as all written"
        );
        assert!(
            crate::bochs::lock(&b.slot)
                .take_dirty()
                .is_some_and(|d| d.iter().all(|w| *w == 0)),
            "then only what the guest writes"
        );
        write(0x04, &0u16.to_le_bytes());
        assert_eq!(at(), None);
        assert_eq!(crate::bochs::lock(&b.slot).take_dirty(), None);
        let saved = pci.save().unwrap();
        assert_eq!(saved.bochs.len(), 1);
        assert_eq!(saved.bochs[0].gpu, 0);
        // A state without the device is refused by name.
        let without = PciState {
            bochs: vec![],
            ..saved.clone()
        };
        assert!(check_bochs(&config, &without)
            .unwrap_err()
            .to_string()
            .contains(
                "Bochs displays on GPUs [] but this VM's configuration has them on GPUs [0]"
            ));
    }

    fn lock_bar(pci: &PciDevices, slot: u32) -> u64 {
        pci.bus.write_port(
            CONFIG_ADDRESS,
            &(1u32 << 31 | slot << 11 | 0x10).to_le_bytes(),
        );
        let mut v = [0; 4];
        pci.bus.read_port(CONFIG_DATA, &mut v);
        u64::from(u32::from_le_bytes(v) & !0xf)
    }

    struct NoIrq;
    impl ray_devices::interrupt::MsiInterrupts for NoIrq {
        fn route(
            &self,
            _: u16,
            _: Option<ray_devices::interrupt::MsiMessage>,
        ) -> Result<(), String> {
            Ok(())
        }
        fn trigger(&self, _: u16) {}
    }

    #[test]
    fn ioeventfds_follow_a_moved_bar() {
        let memory = MemoryManager::create(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let vm = Vm::new(memory, Flavour::detect()).unwrap();
        let pci = PciDevices::create(&vm, &DevicesConfig::default(), None).unwrap();
        assert!(pci.kicks_in_kernel);
        let rng = &pci.devices[0].transport;
        let old = lock(rng).notify_address(0);
        assert_eq!(old, BAR_WINDOW_START + NOTIFY);
        // KVM refuses a second ioeventfd at an address that has one: that is the probe.
        let probe = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(pci._router.register_ioeventfd(&probe, old).is_err());

        let new_bar = 0xd000_0000u32;
        pci.bus
            .write_port(CONFIG_ADDRESS, &(1u32 << 31 | 1 << 11 | 0x10).to_le_bytes());
        pci.bus.write_port(CONFIG_DATA, &new_bar.to_le_bytes());
        let new = lock(rng).notify_address(0);
        assert_eq!(new, u64::from(new_bar) + NOTIFY);
        assert!(
            pci._router.register_ioeventfd(&probe, new).is_err(),
            "moved here"
        );
        pci._router.register_ioeventfd(&probe, old).unwrap();

        // The same register through the ECAM window: the BAR moves back, the ioeventfds
        // follow, and a saved state names the window.
        pci._router.unregister_ioeventfd(&probe, old).unwrap();
        let ecam = layout::PCI_ECAM | 1 << 15 | 0x10;
        assert!(pci
            .bus
            .write_mmio(ecam, &BAR_WINDOW_START.to_le_bytes()[..4]));
        assert_eq!(lock(rng).notify_address(0), old);
        assert!(
            pci._router.register_ioeventfd(&probe, old).is_err(),
            "back here"
        );
        assert!(
            pci._router.register_ioeventfd(&probe, new).is_ok(),
            "gone from there"
        );
        assert_eq!(pci.save().unwrap().ecam, Some(ecam_window()));
    }
}
