//! virtio-gpu 2D (device type 16, virtio 1.2 §5.7): the paravirt GPU.
//!
//! Layers: [`protocol`] (wire format), [`commands`] (the 2D command set on host-side state),
//! and here the virtio device (two queues: control and cursor; the configuration's display
//! events) and [`GpuDisplays`], the VMM's handle that reads the scanouts' frames for
//! screenshots and VNC and changes a display's mode (which raises
//! [`protocol::EVENT_DISPLAY`] and a configuration interrupt, so the driver re-reads the
//! display information).
//!
//! Saved state holds the modes, resources (format, size, backing), scanouts and cursor, not
//! the resources' pixels: those are the guest's copy in the backing, in guest RAM that the
//! snapshot or migration carries, and a restore transfers them again. A guest that changed
//! its backing after its last transfer sees that change on the restored display.
pub mod backend;
pub mod commands;
pub mod hostile;
pub mod protocol;
pub mod remote;
pub mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use ray_memory::GuestMemory;
use serde::{Deserialize, Serialize};

use self::commands::{Core, Cursor, Limits, Refusal};
use self::protocol::*;
use self::remote::{Endpoint, Link, LinkState};
use super::queue::Chain;
use super::{Completer, Completion, DeviceContext, VirtioDevice};

pub const QUEUE_SIZE: u16 = 256;
/// The longest edge of a scanout's mode, in pixels.
pub const MAX_MODE_EDGE: u32 = 16384;

/// Refuses a mode with an empty or overlong edge.
fn check_mode(width: u32, height: u32) -> Result<(), String> {
    if (1..=MAX_MODE_EDGE).contains(&width) && (1..=MAX_MODE_EDGE).contains(&height) {
        Ok(())
    } else {
        Err(format!(
            "a {width}x{height} mode: each edge is 1 to {MAX_MODE_EDGE} pixels"
        ))
    }
}
/// Most bytes of a request the device reads: the header, the fixed part and the largest
/// backing list the limits allow.
const MAX_REQUEST: usize = HDR_LEN + 8 + MEM_ENTRY_LEN * 16384;

struct Shared {
    core: Mutex<Core>,
    /// How to raise a configuration interrupt, once the transport is shared.
    completer: Mutex<Option<Completer>>,
    /// A remote GPU's link to its back end (locked after `core`, never before).
    remote: Option<Mutex<Link>>,
    /// The device is gone: its link thread ends.
    stopped: AtomicBool,
    /// A remote GPU's requests go to its link thread (once the transport is shared), so
    /// that no vCPU or notifier thread waits on the back end.
    worker: Mutex<Option<std::sync::mpsc::Sender<(usize, Chain)>>>,
    /// The driver reset the device: the link thread tells the back end.
    reset_pending: AtomicBool,
    /// Told after each command that changed a frame, once [`GpuDisplays::watch_damage`]
    /// asked for it.
    damage_watch: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    /// Commands refused so far (each answered with an error response).
    refused: std::sync::atomic::AtomicU64,
    /// Commands served so far, and the time spent on them (ns): the GPU's busy time.
    commands: std::sync::atomic::AtomicU64,
    busy_ns: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn link(&self) -> Option<MutexGuard<'_, Link>> {
        self.remote
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// What a remote GPU's link is, for the GPU model and `ray gpu status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteStatus {
    /// `unix:PATH` or `tcp:ADDR`.
    pub backend: String,
    /// None while Ready; why not otherwise.
    pub error: Option<String>,
    /// Connections made so far (the first and each reconnection).
    pub connections: u64,
}

/// The device model behind the transport.
pub struct Gpu {
    shared: Arc<Shared>,
}

/// The VMM's side of one GPU: its scanouts' frames and their modes.
#[derive(Clone)]
pub struct GpuDisplays {
    shared: Arc<Shared>,
}

impl Gpu {
    /// A GPU with one scanout per entry of `modes` (1 to 16), each starting in that mode.
    pub fn new(modes: &[(u32, u32)], limits: Limits) -> Result<(Gpu, GpuDisplays), String> {
        Self::build(modes, limits, None)
    }

    /// A remote GPU: the same device to the guest, its 2D work done by the back end at
    /// `endpoint` (connected once the transport is shared, and again whenever lost),
    /// which has `timeout` to answer each request.
    pub fn new_remote(
        modes: &[(u32, u32)],
        limits: Limits,
        endpoint: Endpoint,
        timeout: std::time::Duration,
    ) -> Result<(Gpu, GpuDisplays), String> {
        Self::build(modes, limits, Some((endpoint, timeout)))
    }

    fn build(
        modes: &[(u32, u32)],
        limits: Limits,
        endpoint: Option<(Endpoint, std::time::Duration)>,
    ) -> Result<(Gpu, GpuDisplays), String> {
        if modes.is_empty() || modes.len() > MAX_SCANOUTS {
            return Err(format!(
                "a virtio GPU has 1 to {MAX_SCANOUTS} scanouts, not {}",
                modes.len()
            ));
        }
        for &(w, h) in modes {
            check_mode(w, h)?;
        }
        let core = if endpoint.is_some() {
            Core::new_ledger(modes, limits)
        } else {
            Core::new(modes, limits)
        };
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            completer: Mutex::new(None),
            remote: endpoint.map(|(e, t)| Mutex::new(Link::new(e, t))),
            stopped: AtomicBool::new(false),
            worker: Mutex::new(None),
            reset_pending: AtomicBool::new(false),
            damage_watch: Mutex::new(None),
            refused: Default::default(),
            commands: Default::default(),
            busy_ns: Default::default(),
        });
        Ok((
            Gpu {
                shared: shared.clone(),
            },
            GpuDisplays { shared },
        ))
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
    }
}

/// A remote GPU's link thread: serves the requests the device took (in order), pings a
/// Ready link, reconnects a broken one (with backoff) and replays the ledger; ends with
/// the device.
fn run_remote(
    shared: Weak<Shared>,
    memory: super::pci::Memory,
    completer: Completer,
    requests: std::sync::mpsc::Receiver<(usize, Chain)>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        let first = match requests.recv_timeout(remote::BACKOFF_MIN / 2) {
            Ok(r) => Some(r),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.stopped.load(Ordering::Relaxed) {
            return;
        }
        if shared.reset_pending.swap(false, Ordering::Relaxed) {
            let mut core = shared.core();
            if let Some(mut link) = shared.link() {
                if *link.state() == LinkState::Ready {
                    let _ = link.call(&mut core, &wire::Message::Reset);
                }
            }
        }
        if let Some(first) = first {
            // Everything the driver made available meanwhile, completed together.
            let mut done: [Vec<super::Used>; 2] = [Vec::new(), Vec::new()];
            for (queue, chain) in std::iter::once(first).chain(requests.try_iter()) {
                let len = match serve(&shared, queue, &chain, &*memory) {
                    Completion::Done(n) => n,
                    Completion::Failed(e) => {
                        tracing::debug!("virtio-gpu: request {} failed: {e}", chain.head);
                        0
                    }
                    Completion::Pending => 0,
                };
                done[queue.min(1)].push(super::Used {
                    head: chain.head,
                    len,
                });
            }
            for (queue, used) in done.iter().enumerate() {
                completer.complete(queue as u16, used);
            }
        }
        let endpoint = {
            let mut core = shared.core();
            let Some(mut link) = shared.link() else {
                return;
            };
            if link.ping_due() {
                link.ping(&mut core);
                None
            } else if link.reconnect_due() {
                Some((link.endpoint().clone(), link.timeout()))
            } else {
                None
            }
        };
        if let Some((endpoint, timeout)) = endpoint {
            let opened = Link::open(&endpoint, timeout);
            let mut core = shared.core();
            if let Some(mut link) = shared.link() {
                let _ = link.attach(opened, &mut core, &*memory);
            }
        }
    }
}

/// A frame area that changed, with its pixels: what a display front end that keeps its
/// own copy of the scanouts (vhost-user-gpu's) is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub scanout: usize,
    /// The scanout's mode, (width, height).
    pub mode: (u32, u32),
    /// Whether a resource is shown (a disabled scanout has no picture to send).
    pub shown: bool,
    /// The changed area, inside the mode.
    pub rect: Rect,
    /// Its pixels, XRGB8888, `rect.width * 4` bytes a line.
    pub pixels: Vec<u8>,
}

/// The smallest rectangle holding both.
fn bounding(a: Rect, b: Rect) -> Rect {
    if a.is_empty() {
        return b;
    }
    if b.is_empty() {
        return a;
    }
    let (x, y) = (a.x.min(b.x), a.y.min(b.y));
    let right = (a.x + a.width).max(b.x + b.width);
    let bottom = (a.y + a.height).max(b.y + b.height);
    Rect {
        x,
        y,
        width: right - x,
        height: bottom - y,
    }
}

impl GpuDisplays {
    /// Records the frame areas that change from now on; after each command that changed
    /// one, `changed` is sent `()` (outside the device's locks), and
    /// [`GpuDisplays::take_damage`] hands them over.
    pub fn watch_damage(&self, changed: std::sync::mpsc::Sender<()>) {
        let mut core = self.shared.core();
        if core.damage.is_none() {
            core.damage = Some(Vec::new());
        }
        *self
            .shared
            .damage_watch
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(changed);
    }

    /// The frame areas that changed since the last call, one bounding rectangle per
    /// scanout (in scanout order), with their pixels as they are now. With `all`, each
    /// scanout's whole frame instead (for a front end that has seen nothing yet).
    pub fn take_damage(&self, all: bool) -> Vec<Damage> {
        let mut core = self.shared.core();
        let recorded = core.damage.as_mut().map(std::mem::take).unwrap_or_default();
        let mut areas: Vec<Rect> = vec![Rect::default(); core.scanouts.len()];
        if all {
            for (i, s) in core.scanouts.iter().enumerate() {
                areas[i] = Rect {
                    x: 0,
                    y: 0,
                    width: s.width,
                    height: s.height,
                };
            }
        } else {
            for (i, r) in recorded {
                if let Some(a) = areas.get_mut(i) {
                    *a = bounding(*a, r);
                }
            }
        }
        let mut out = Vec::new();
        for (i, (s, rect)) in core.scanouts.iter().zip(areas).enumerate() {
            if rect.is_empty() && !all {
                continue;
            }
            let rect = rect.intersect(&Rect {
                x: 0,
                y: 0,
                width: s.width,
                height: s.height,
            });
            let line = rect.width as usize * 4;
            let mut pixels = Vec::with_capacity(line * rect.height as usize);
            for row in rect.y..rect.y + rect.height {
                let at = (row as usize * s.width as usize + rect.x as usize) * 4;
                pixels.extend_from_slice(&s.frame[at..at + line]);
            }
            out.push(Damage {
                scanout: i,
                mode: (s.width, s.height),
                shown: s.resource != 0,
                rect,
                pixels,
            });
        }
        out
    }

    /// A remote GPU's link: its back end and whether it is Ready; None for a local GPU.
    pub fn remote(&self) -> Option<RemoteStatus> {
        let link = self.shared.link()?;
        Some(RemoteStatus {
            backend: link.endpoint().to_string(),
            error: match link.state() {
                LinkState::Ready => None,
                LinkState::Error(why) => Some(why.clone()),
            },
            connections: link.connections,
        })
    }

    /// Whether both are the handle of the same GPU.
    pub fn same(&self, other: &GpuDisplays) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Each scanout's mode, (width, height).
    pub fn modes(&self) -> Vec<(u32, u32)> {
        let core = self.shared.core();
        core.scanouts.iter().map(|s| (s.width, s.height)).collect()
    }

    /// Copies scanout `index`'s frame (XRGB8888, `width * 4` bytes a line) into `out`,
    /// which must hold it exactly. False if there is no such scanout or `out` is of
    /// another size (the mode changed).
    pub fn read(&self, index: usize, out: &mut [u8]) -> bool {
        let core = self.shared.core();
        match core.scanouts.get(index) {
            Some(s) if s.frame.len() == out.len() => {
                out.copy_from_slice(&s.frame);
                true
            }
            _ => false,
        }
    }

    /// Flushes that reached scanout `index` so far.
    pub fn flushes(&self, index: usize) -> u64 {
        self.shared
            .core()
            .scanouts
            .get(index)
            .map_or(0, |s| s.flushes)
    }

    /// Commands the device refused so far (answered with an error response).
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Commands served so far and the time they took (the GPU's busy time: its 2D work,
    /// or a remote GPU's round trips to its back end).
    pub fn busy(&self) -> (u64, std::time::Duration) {
        (
            self.shared.commands.load(Ordering::Relaxed),
            std::time::Duration::from_nanos(self.shared.busy_ns.load(Ordering::Relaxed)),
        )
    }

    /// Where the cursor is.
    pub fn cursor(&self) -> Cursor {
        self.shared.core().cursor
    }

    /// Gives scanout `index` the mode `width` x `height` and tells the driver
    /// (EVENT_DISPLAY and a configuration interrupt). The frame goes dark until the
    /// driver shows something in the new mode.
    pub fn resize(&self, index: usize, width: u32, height: u32) -> Result<(), String> {
        check_mode(width, height)?;
        {
            let mut core = self.shared.core();
            core.set_mode(index, width, height)?;
            core.events_read |= EVENT_DISPLAY;
            if let Some(mut link) = self.shared.link() {
                let m = wire::Message::SetMode {
                    scanout: index as u32,
                    width,
                    height,
                };
                // A link that fails here is in Error; its reconnection says the new mode.
                if let Ok(Err(r)) = link.call(&mut core, &m) {
                    tracing::warn!("the remote GPU's back end refused the new mode: {}", r.why);
                }
            }
        }
        // Not under the core's lock: the transport, locked here, locks the core to serve.
        let completer = self
            .shared
            .completer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(c) = completer {
            c.config_changed();
        }
        Ok(())
    }
}

/// Gathers a request's device-readable bytes (at most [`MAX_REQUEST`]).
fn read_request(chain: &Chain, mem: &(dyn GuestMemory + Send + Sync)) -> Result<Vec<u8>, String> {
    let mut req = Vec::new();
    for d in chain.descriptors.iter().filter(|d| !d.writable) {
        let n = (d.len as usize).min(MAX_REQUEST - req.len());
        let at = req.len();
        req.resize(at + n, 0);
        mem.read(d.addr, &mut req[at..])
            .map_err(|e| e.to_string())?;
        if req.len() == MAX_REQUEST {
            break;
        }
    }
    Ok(req)
}

/// Writes `resp` into the chain's device-writable buffers; the bytes written.
fn write_response(
    chain: &Chain,
    mem: &(dyn GuestMemory + Send + Sync),
    resp: &[u8],
) -> Result<u32, String> {
    let mut done = 0;
    for d in chain.descriptors.iter().filter(|d| d.writable) {
        let n = (d.len as usize).min(resp.len() - done);
        mem.write(d.addr, &resp[done..done + n])
            .map_err(|e| e.to_string())?;
        done += n;
        if done == resp.len() {
            return Ok(done as u32);
        }
    }
    Err(format!(
        "request {} has room for {done} response bytes; the response has {}",
        chain.head,
        resp.len()
    ))
}

/// Serves one request: on the device's own state (paravirt), or on the ledger and the
/// back end (remote).
fn serve(
    shared: &Shared,
    queue: usize,
    chain: &Chain,
    memory: &(dyn GuestMemory + Send + Sync),
) -> Completion {
    let req = match read_request(chain, memory) {
        Ok(r) => r,
        Err(e) => return Completion::Failed(e),
    };
    let Some(hdr) = Header::parse(&req) else {
        return Completion::Failed(format!(
            "request {} has {} readable bytes, less than a command header",
            chain.head,
            req.len()
        ));
    };
    let started = std::time::Instant::now();
    let (result, changed) = {
        let mut core = shared.core();
        tracing::trace!("virtio-gpu: command {:#x} on queue {queue}", hdr.kind);
        let result = match (shared.link(), queue == CURSOR_QUEUE) {
            (None, true) => core
                .cursor_command(&hdr, &req)
                .map(|()| (RESP_OK_NODATA, Vec::new())),
            (None, false) => core.command(&hdr, &req, memory),
            (Some(mut link), true) => remote::cursor_command(&mut core, &mut link, &hdr, &req)
                .map(|()| (RESP_OK_NODATA, Vec::new())),
            (Some(mut link), false) => remote::command(&mut core, &mut link, &hdr, &req, memory),
        };
        let changed = core.damage.as_ref().is_some_and(|d| !d.is_empty());
        (result, changed)
    };
    shared.commands.fetch_add(1, Ordering::Relaxed);
    shared
        .busy_ns
        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    if changed {
        let watch = shared
            .damage_watch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(w) = watch {
            let _ = w.send(());
        }
    }
    let (kind, body) = match result {
        Ok(r) => r,
        Err(Refusal { code, why }) => {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("virtio-gpu: command {:#x} refused: {why}", hdr.kind);
            (code, Vec::new())
        }
    };
    // The cursor queue's requests usually have no room for a response: none is owed.
    if queue == CURSOR_QUEUE && !chain.descriptors.iter().any(|d| d.writable) {
        return Completion::Done(0);
    }
    let mut resp = hdr.response(kind);
    resp.extend_from_slice(&body);
    match write_response(chain, memory, &resp) {
        Ok(n) => Completion::Done(n),
        Err(e) => Completion::Failed(e),
    }
}

pub const CONTROL_QUEUE: usize = 0;
pub const CURSOR_QUEUE: usize = 1;

impl VirtioDevice for Gpu {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_GPU
    }

    fn features(&self) -> u64 {
        F_EDID
    }

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    /// events_read, events_clear (reads 0), num_scanouts, num_capsets (0).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let core = self.shared.core();
        let mut c = [0u8; 16];
        c[0..4].copy_from_slice(&core.events_read.to_le_bytes());
        c[8..12].copy_from_slice(&(core.scanouts.len() as u32).to_le_bytes());
        data.fill(0);
        if let Some(src) = c.get(offset as usize..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn config_len(&self) -> u64 {
        16
    }

    /// Writing events_clear clears those events.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.len() == 4 {
            let clear = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.shared.core().events_read &= !clear;
        }
    }

    fn process(
        &mut self,
        queue: usize,
        chain: &Chain,
        memory: &(dyn GuestMemory + Send + Sync),
    ) -> Completion {
        let worker = self
            .shared
            .worker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(w) = worker {
            if w.send((queue, chain.clone())).is_ok() {
                return Completion::Pending;
            }
        }
        serve(&self.shared, queue, chain, memory)
    }

    fn reset(&mut self) {
        let mut core = self.shared.core();
        core.reset();
        let threaded = self
            .shared
            .worker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if threaded {
            // Not here: a vCPU may be the caller, and it does no socket I/O.
            self.shared.reset_pending.store(true, Ordering::Relaxed);
        } else if let Some(mut link) = self.shared.link() {
            if *link.state() == LinkState::Ready {
                let _ = link.call(&mut core, &wire::Message::Reset);
            }
        }
    }

    fn activate(&mut self, context: DeviceContext) {
        if self.shared.remote.is_some() {
            // The first attempt now, so that a back end that is up serves the guest's
            // first commands.
            {
                let mut core = self.shared.core();
                if let Some(mut link) = self.shared.link() {
                    let _ = link.connect(&mut core, &*context.memory);
                }
            }
            let weak = Arc::downgrade(&self.shared);
            let memory = context.memory.clone();
            let completer = context.completer.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            let started = std::thread::Builder::new()
                .name("gpu-remote".into())
                .stack_size(256 << 10)
                .spawn(move || {
                    ray_seccomp::enter(ray_seccomp::Kind::DeviceIo);
                    run_remote(weak, memory, completer, rx)
                });
            match started {
                Ok(_) => {
                    *self.shared.worker.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
                }
                Err(e) => {
                    tracing::error!(
                        "cannot start the remote GPU's link thread: {e}; requests are served inline"
                    );
                }
            }
        }
        *self
            .shared
            .completer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(context.completer);
    }

    fn save_device(&self) -> serde_json::Value {
        let core = self.shared.core();
        let saved = Saved {
            modes: core.scanouts.iter().map(|s| (s.width, s.height)).collect(),
            events_read: core.events_read,
            resources: core
                .resources
                .iter()
                .map(|(&id, r)| SavedResource {
                    id,
                    format: r.format,
                    width: r.width,
                    height: r.height,
                    backing: r.backing.clone(),
                })
                .collect(),
            scanouts: core
                .scanouts
                .iter()
                .map(|s| SavedScanout {
                    resource: s.resource,
                    rect: s.rect,
                })
                .collect(),
            cursor: core.cursor,
        };
        serde_json::to_value(saved).unwrap_or(serde_json::Value::Null)
    }

    fn check_device(&self, saved: &serde_json::Value) -> Result<(), String> {
        let s: Saved = serde_json::from_value(saved.clone())
            .map_err(|e| format!("the saved virtio-gpu state is malformed: {e}"))?;
        let n = self.shared.core().scanouts.len();
        if s.modes.len() != n || s.scanouts.len() != n {
            return Err(format!(
                "the saved virtio-gpu state has {} scanouts; this GPU has {n}",
                s.modes.len()
            ));
        }
        Ok(())
    }

    fn restore_device(
        &mut self,
        saved: &serde_json::Value,
        memory: &(dyn GuestMemory + Send + Sync),
    ) -> Result<(), String> {
        self.check_device(saved)?;
        let s: Saved = serde_json::from_value(saved.clone())
            .map_err(|e| format!("the saved virtio-gpu state is malformed: {e}"))?;
        let limits = self.shared.core().limits;
        let ledger = self.shared.remote.is_some();
        let mut core = self.shared.core();
        *core = rebuild(&s, limits, ledger, memory)?;
        // A remote GPU's back end gets the restored state now if it is there, else when
        // the link comes back.
        if let Some(mut link) = self.shared.link() {
            if *link.state() == LinkState::Ready {
                let _ = link.replay(&mut core, memory);
            }
        }
        Ok(())
    }
}

/// The host-side state again from a saved one, checked as a guest's commands are: the
/// same refusals, named. The pixels come from the backing.
fn rebuild(
    s: &Saved,
    limits: Limits,
    ledger: bool,
    memory: &(dyn GuestMemory + Send + Sync),
) -> Result<Core, String> {
    let bad = |what: String, r: Refusal| format!("the saved virtio-gpu state: {what}: {}", r.why);
    for &(w, h) in &s.modes {
        check_mode(w, h).map_err(|e| format!("the saved virtio-gpu state has {e}"))?;
    }
    let mut core = if ledger {
        Core::new_ledger(&s.modes, limits)
    } else {
        Core::new(&s.modes, limits)
    };
    for r in &s.resources {
        core.create_2d(r.id, r.format as u32, r.width, r.height)
            .map_err(|e| bad(format!("resource {}", r.id), e))?;
        if r.backing.len() > limits.backing_entries as usize {
            return Err(format!(
                "the saved virtio-gpu state: resource {} has {} backing entries",
                r.id,
                r.backing.len()
            ));
        }
        for &(addr, len) in &r.backing {
            if len == 0 || memory.span(addr, u64::from(len)).is_err() {
                return Err(format!(
                    "the saved virtio-gpu state: resource {}'s backing ({addr:#x}, {len} bytes) is not inside guest RAM",
                    r.id
                ));
            }
        }
        if let Some(res) = core.resources.get_mut(&r.id) {
            res.backing = r.backing.clone();
        }
        let whole = Rect {
            x: 0,
            y: 0,
            width: r.width,
            height: r.height,
        };
        // A backing too short for the whole image (allowed: a guest may transfer parts)
        // leaves the resource black.
        if !r.backing.is_empty() {
            let _ = core.transfer(r.id, whole, 0, memory);
        }
    }
    for (i, sc) in s.scanouts.iter().enumerate() {
        if sc.resource != 0 {
            core.set_scanout(i as u32, sc.resource, sc.rect)
                .map_err(|e| bad(format!("scanout {i}"), e))?;
        }
    }
    if s.cursor.resource != 0 && !core.resources.contains_key(&s.cursor.resource) {
        return Err(format!(
            "the saved virtio-gpu state: the cursor shows resource {}, which does not exist",
            s.cursor.resource
        ));
    }
    core.cursor = s.cursor;
    core.events_read = s.events_read;
    Ok(core)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    modes: Vec<(u32, u32)>,
    events_read: u32,
    resources: Vec<SavedResource>,
    scanouts: Vec<SavedScanout>,
    cursor: Cursor,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedResource {
    id: u32,
    format: Format,
    width: u32,
    height: u32,
    backing: Vec<(u64, u32)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedScanout {
    resource: u32,
    rect: Rect,
}

#[cfg(test)]
mod tests;
