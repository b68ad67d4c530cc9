//! Our virtio-gpu model behind a vhost-user-gpu front end (QEMU's `vhost-user-gpu-pci`).
//!
//! The queues are served as for any model ([`crate::backend`]); what is particular is the
//! display: the front end keeps its own copy of each scanout and learns of the guest's
//! pictures only through the socket it hands over with VHOST_USER_GPU_SET_SOCKET (at each
//! DRIVER_OK). The model records the frame areas its commands change
//! ([`GpuDisplays::watch_damage`]); one sender thread turns them into that protocol's
//! messages, outside the model's and the session's locks (the front end may be waiting on
//! the session for a reply while it is not reading the display socket):
//!
//! ```text
//! scanout shown, not yet announced in its mode ─▶ SCANOUT(width, height), then UPDATE(whole frame)
//! frame area changed                            ─▶ UPDATE(bounding rectangle, XRGB8888)
//! scanout disabled (announced)                  ─▶ SCANOUT(0, 0)
//! new display socket or new model               ─▶ everything announced again
//! ```
//! The front end owns the configuration's event fields (QEMU answers them itself), so a
//! display change cannot be announced from the back end.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ray_devices::virtio::gpu::commands::Limits;
use ray_devices::virtio::gpu::{Damage, Gpu, GpuDisplays};
use ray_devices::virtio::VirtioDevice;
use vhost::vhost_user::gpu_message::{VhostUserGpuScanout, VhostUserGpuUpdate};
use vhost::vhost_user::GpuBackend;

use crate::backend::{GpuSocketHook, MakeDevice};

/// What the display side did, for `stats` and the session's log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuStats {
    /// Flushes that reached each scanout of the current model.
    pub flushes: Vec<u64>,
    /// Commands the current model refused.
    pub refused: u64,
    /// SCANOUT and UPDATE messages sent to the front end.
    pub scanouts_sent: u64,
    pub updates_sent: u64,
    /// Pixel bytes in those updates.
    pub update_bytes: u64,
    /// From the first to the last change the sender handled.
    pub busy: Duration,
}

#[derive(Default)]
struct Counters {
    scanouts: AtomicU64,
    updates: AtomicU64,
    bytes: AtomicU64,
}

struct Inner {
    modes: Vec<(u32, u32)>,
    /// The model the current front end drives (a new one at each reset).
    current: Mutex<Option<GpuDisplays>>,
    /// The current front end's display socket.
    socket: Mutex<Option<GpuBackend>>,
    /// Announce everything again at the next round.
    fresh: AtomicBool,
    changed: Mutex<Sender<()>>,
    counters: Counters,
    /// When the sender first and last had a change to send.
    span: Mutex<Option<(Instant, Instant)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn wake(&self) {
        let _ = lock(&self.changed).send(());
    }
}

/// The display side of a served GPU: makes the models, takes the front end's display
/// socket, sends the frames.
#[derive(Clone)]
pub struct GpuOutput {
    inner: Arc<Inner>,
}

impl GpuOutput {
    /// A GPU with one scanout per entry of `modes`; starts the sender thread.
    pub fn new(modes: Vec<(u32, u32)>) -> Result<Self, String> {
        // Checked once here, so that a bad mode is refused before any socket exists.
        drop(Gpu::new(&modes, Limits::default())?);
        let (tx, rx) = channel();
        let inner = Arc::new(Inner {
            modes,
            current: Mutex::new(None),
            socket: Mutex::new(None),
            fresh: AtomicBool::new(true),
            changed: Mutex::new(tx),
            counters: Counters::default(),
            span: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("gpu-display".into())
            .spawn(move || {
                let mut announced = Announced::new();
                while rx.recv().is_ok() {
                    let Some(inner) = weak.upgrade() else {
                        return;
                    };
                    send_round(&inner, &rx, &mut announced);
                }
            })
            .map_err(|e| format!("cannot start the display thread: {e}"))?;
        Ok(Self { inner })
    }

    /// Makes the model for each front end (and again at each reset).
    pub fn make_device(&self) -> MakeDevice {
        let inner = self.inner.clone();
        Arc::new(move || {
            let (gpu, displays) = Gpu::new(&inner.modes, Limits::default())?;
            displays.watch_damage(lock(&inner.changed).clone());
            *lock(&inner.current) = Some(displays);
            inner.fresh.store(true, Ordering::Relaxed);
            inner.wake();
            Ok(Box::new(gpu) as Box<dyn VirtioDevice>)
        })
    }

    /// Takes each display socket the front end hands over.
    pub fn socket_hook(&self) -> GpuSocketHook {
        let inner = self.inner.clone();
        Arc::new(move |socket| {
            tracing::info!("virtio-gpu: the front end handed over its display socket");
            *lock(&inner.socket) = Some(socket);
            inner.fresh.store(true, Ordering::Relaxed);
            inner.wake();
        })
    }

    /// The current model's displays (None before the first front end).
    pub fn displays(&self) -> Option<GpuDisplays> {
        lock(&self.inner.current).clone()
    }

    pub fn stats(&self) -> GpuStats {
        let c = &self.inner.counters;
        let (flushes, refused) = match self.displays() {
            Some(d) => (
                (0..self.inner.modes.len()).map(|i| d.flushes(i)).collect(),
                d.refused(),
            ),
            None => (vec![0; self.inner.modes.len()], 0),
        };
        GpuStats {
            flushes,
            refused,
            scanouts_sent: c.scanouts.load(Ordering::Relaxed),
            updates_sent: c.updates.load(Ordering::Relaxed),
            update_bytes: c.bytes.load(Ordering::Relaxed),
            busy: lock(&self.inner.span).map_or(Duration::ZERO, |(a, b)| b - a),
        }
    }
}

/// What the front end was last told of each scanout: None (disabled) or its mode.
type Announced = Vec<Option<(u32, u32)>>;

/// Sends what changed since the last round (every change queued meanwhile included).
fn send_round(inner: &Inner, rx: &Receiver<()>, announced: &mut Announced) {
    while rx.try_recv().is_ok() {}
    let now = Instant::now();
    {
        let mut span = lock(&inner.span);
        *span = Some(span.map_or((now, now), |(first, _)| (first, now)));
    }
    let fresh = inner.fresh.swap(false, Ordering::Relaxed);
    let Some(displays) = lock(&inner.current).clone() else {
        return;
    };
    let socket = lock(&inner.socket).clone();
    if fresh || announced.len() != inner.modes.len() {
        *announced = vec![None; inner.modes.len()];
    }
    let mut damage = displays.take_damage(fresh);
    let Some(socket) = socket else {
        // No display yet: what changed is sent whole once one comes.
        return;
    };
    let unannounced = damage
        .iter()
        .any(|d| d.shown && announced[d.scanout] != Some(d.mode));
    if unannounced && !fresh {
        damage = displays.take_damage(true);
    }
    if let Err(e) = send(inner, &socket, announced, &damage) {
        tracing::warn!(
            "virtio-gpu: cannot send to the front end's display: {e}; \
             no more updates until it hands over a new socket"
        );
        *lock(&inner.socket) = None;
    }
}

fn send(
    inner: &Inner,
    socket: &GpuBackend,
    announced: &mut Announced,
    damage: &[Damage],
) -> std::io::Result<()> {
    for d in damage {
        let id = d.scanout as u32;
        if !d.shown {
            if announced[d.scanout].is_some() {
                socket.set_scanout(&VhostUserGpuScanout {
                    scanout_id: id,
                    width: 0,
                    height: 0,
                })?;
                inner.counters.scanouts.fetch_add(1, Ordering::Relaxed);
                announced[d.scanout] = None;
            }
            continue;
        }
        if announced[d.scanout] != Some(d.mode) {
            socket.set_scanout(&VhostUserGpuScanout {
                scanout_id: id,
                width: d.mode.0,
                height: d.mode.1,
            })?;
            inner.counters.scanouts.fetch_add(1, Ordering::Relaxed);
            announced[d.scanout] = Some(d.mode);
        }
        if d.rect.is_empty() {
            continue;
        }
        socket.update_scanout(
            &VhostUserGpuUpdate {
                scanout_id: id,
                x: d.rect.x,
                y: d.rect.y,
                width: d.rect.width,
                height: d.rect.height,
            },
            &d.pixels,
        )?;
        inner.counters.updates.fetch_add(1, Ordering::Relaxed);
        inner
            .counters
            .bytes
            .fetch_add(d.pixels.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}
