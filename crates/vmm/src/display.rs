//! The VM's displays in the VMM: the GPU model following the VM's state, the framebuffers
//! read out of guest RAM (emulated GPUs) or out of the scanouts of virtio GPUs, the VNC
//! server and screenshots.
//!
//! Display numbers: the emulated GPUs' framebuffers first (the guest's display table
//! lists them in that order), then each virtio GPU's scanouts, GPU by GPU, then the Bochs
//! display devices (one display each), GPU by GPU.
//!
//! [`DisplayHub`] is shared by the VMM thread, which tells it of every state change
//! ([`DisplayHub::follow`]), and the API thread, which reads GPU status and screenshots
//! from it directly: a screenshot is a copy out of guest memory and never waits for the
//! VMM thread (nor stops the guest).
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use ray_api::gpu::{DisplayInfo, GpuConfig, GpuInfo, GpuList, GpuType, RemoteBackend};
use ray_api::vmm::{VmConfig, VmStateName as VmState};
use ray_devices::virtio::gpu::remote::Endpoint;
use ray_devices::virtio::gpu::{GpuDisplays, RemoteStatus};
use ray_devices::virtio::input::{InputHandle, Kind as InputKind};
use ray_display::auth::Password;
use ray_display::damage::{ChangeStats, Damage, TileClock, TileSet};
use ray_display::decode::{
    DecodeInput, DecodeList, DecodeRequest, DecodeSessionError, DecodeSessionInfo, DecodeSource,
    DecodeStartError, Decoders,
};
use ray_display::encode::{
    EncodeError, EncodeList, EncodeRequest, EncodeSessionInfo, Encoders, SharedSource,
};
use ray_display::keys::{self, Keyboard};
use ray_display::model::{GpuEvent, GpuModel};
use ray_display::vnc::{self, VncServer};
use ray_display::vnc::{DisplayResizer, InputSink, ResizeRefusal};
use ray_display::{DisplayGeometry, FrameSource, VramLayout};
use ray_memory::{ConsumerId, GuestMemory, PAGE_SIZE};

use crate::bochs::BochsGpu;
use crate::memory::{KvmDirtyLog, MemoryManager};
use crate::vstate::vm::Vm;

/// Looks at the displays closer together than this share one read of the dirty log.
const HARVEST_EVERY: std::time::Duration = std::time::Duration::from_millis(5);

/// A virtio GPU of the machine: its index in the VM's GPU list and its scanouts.
pub type VirtioGpu = (usize, GpuDisplays);

/// A remote GPU's back end as the device dials it: a TCP one's token is read from its
/// file now (checked before the VM starts too: [`check_remote_gpus`]).
pub fn remote_endpoint(g: &GpuConfig) -> Result<Endpoint, String> {
    Ok(match g.remote_backend()? {
        RemoteBackend::Unix(path) => Endpoint::Unix(path),
        RemoteBackend::Tcp(addr) => {
            let file = g.token_file.as_deref().unwrap_or_default();
            let token = ray_devices::virtio::gpu::backend::read_token(std::path::Path::new(file))?;
            Endpoint::Tcp { addr, token }
        }
    })
}

/// Checks every remote GPU's back end setting (and reads TCP tokens) before the VM
/// starts. The back end itself need not be up: the GPU is in error until it is.
pub fn check_remote_gpus(gpus: &[GpuConfig]) -> Result<(), String> {
    for (i, g) in gpus.iter().enumerate() {
        if g.kind == GpuType::Remote {
            remote_endpoint(g).map_err(|e| format!("GPU {i}: {e}"))?;
        }
    }
    Ok(())
}

/// The host's encode-session slots: `encode-slots` in the runtime directory that holds
/// `vms/<id>` (`vm_dir`), not among the VMs' directories, where it would look like one.
pub fn encode_slots_dir(vm_dir: &std::path::Path) -> Option<PathBuf> {
    vm_dir
        .parent()
        .and_then(|vms| vms.parent())
        .map(|runtime| runtime.join("encode-slots"))
}

/// The framebuffers of a running machine: emulated ones read straight from guest RAM,
/// virtio scanouts from their GPU.
struct GuestFrames {
    memory: MemoryManager,
    /// The emulated GPUs' displays.
    displays: Vec<DisplayGeometry>,
    virtio: Vec<VirtioGpu>,
    /// The emulated displays' change detection through the dirty log, if it could start.
    dirty: Option<FbDirty>,
    /// Per emulated display.
    stats: Vec<Arc<ChangeStats>>,
    /// The Bochs display devices, numbered after the virtio scanouts.
    bochs: Vec<crate::display_bochs::BochsView>,
}

/// The displays' consumer of the dirty log: each read of its pages becomes a generation
/// of written tiles per emulated display ([`TileClock`]), which every viewer takes from
/// at its own pace.
struct FbDirty {
    id: ConsumerId,
    log: Arc<dyn KvmDirtyLog + Send + Sync>,
    state: Mutex<DamageState>,
}

struct DamageState {
    clocks: Vec<TileClock>,
    last: Option<std::time::Instant>,
    /// The log could not be read (the consumer was removed): every tile is compared.
    failed: bool,
}

impl GuestFrames {
    fn new(
        memory: MemoryManager,
        displays: Vec<DisplayGeometry>,
        virtio: Vec<VirtioGpu>,
        bochs: &[BochsGpu],
    ) -> Self {
        let stats = displays
            .iter()
            .map(|d| {
                let s = crate::metrics::display_changes(d.index);
                s.dirty_log
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                s
            })
            .collect();
        let first = displays.len() + virtio.iter().map(|(_, g)| g.modes().len()).sum::<usize>();
        let tile_compare = std::env::var("RAY_DISPLAY_CHANGES").as_deref() == Ok("tile-compare");
        let bochs = bochs
            .iter()
            .enumerate()
            .map(|(k, b)| crate::display_bochs::BochsView::new(first + k, b, tile_compare))
            .collect();
        Self {
            memory,
            displays,
            virtio,
            dirty: None,
            stats,
            bochs,
        }
    }

    /// Display `index`'s change-detection counts, if it is an emulated one.
    fn change_stats(&self, index: usize) -> Option<&Arc<ChangeStats>> {
        self.stats
            .get(index)
            .or_else(|| self.bochs_view(index).map(|b| b.stats()))
    }

    /// The Bochs device display `index` is, if it is one.
    fn bochs_view(&self, index: usize) -> Option<&crate::display_bochs::BochsView> {
        self.bochs.iter().find(|b| b.index() == index)
    }

    /// Starts the emulated displays' change detection on `vm`'s dirty log (as consumer
    /// "display"); without it, every tile is compared.
    fn track(&mut self, vm: &mut Vm) {
        if self.displays.is_empty() {
            return;
        }
        // For `ray bench display`, which measures both ways in one run.
        if std::env::var("RAY_DISPLAY_CHANGES").as_deref() == Ok("tile-compare") {
            tracing::info!("RAY_DISPLAY_CHANGES=tile-compare: every tile is compared");
            return;
        }
        let started = vm.dirty_log_handle().and_then(|log| {
            let id = vm.add_dirty_consumer("display", None)?;
            Ok((id, log))
        });
        match started {
            Ok((id, log)) => {
                self.dirty = Some(FbDirty {
                    id,
                    log,
                    state: Mutex::new(DamageState {
                        clocks: self.displays.iter().map(TileClock::new).collect(),
                        last: None,
                        failed: false,
                    }),
                });
                for s in &self.stats {
                    s.dirty_log
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!(
                "no dirty log for the displays ({e}); every tile is compared at each look"
            ),
        }
    }
}

/// Drops the machine's framebuffers; their dirty-log consumer goes with them if `vm` is
/// still the machine they read (viewers still holding them fall back to comparing tiles).
fn release(frames: &mut Option<Arc<GuestFrames>>, vm: Option<&mut Vm>) {
    let Some(f) = frames.take() else { return };
    if let (Some(d), Some(vm)) = (&f.dirty, vm) {
        if f.memory.same(&vm.memory) {
            if let Err(e) = vm.remove_dirty_consumer(d.id) {
                tracing::warn!("cannot remove the displays' dirty-log consumer: {e}");
            }
        }
    }
}

/// The displays of `virtio`'s scanouts, numbered on from `first`: `modes` gives each GPU's
/// scanout sizes.
fn virtio_displays(
    first: usize,
    gpus: impl Iterator<Item = (usize, Vec<(u32, u32)>)>,
) -> Vec<DisplayGeometry> {
    let mut out = Vec::new();
    for (gpu, modes) in gpus {
        for (width, height) in modes {
            out.push(DisplayGeometry {
                index: first + out.len(),
                gpu,
                gpa: 0,
                width,
                height,
                stride: width * 4,
            });
        }
    }
    out
}

impl GuestFrames {
    /// Reads the dirty log (at most every [`HARVEST_EVERY`]) into the tile clocks.
    fn harvest(&self, d: &FbDirty, st: &mut DamageState) {
        let now = std::time::Instant::now();
        if st
            .last
            .is_some_and(|t| now.duration_since(t) < HARVEST_EVERY)
        {
            return;
        }
        st.last = Some(now);
        let pages = match self.memory.take_dirty(d.id, d.log.as_ref()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("the displays' dirty log failed ({e}); every tile is compared");
                st.failed = true;
                for s in &self.stats {
                    s.dirty_log
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                }
                return;
            }
        };
        let layout = self.memory.layout();
        for ((g, clock), stats) in self.displays.iter().zip(&mut st.clocks).zip(&self.stats) {
            let first = g.gpa / PAGE_SIZE * PAGE_SIZE;
            let end = g.gpa + g.bytes() as u64;
            let written = (0..(end - first).div_ceil(PAGE_SIZE))
                .map(|k| first + k * PAGE_SIZE)
                .filter(|&gpa| {
                    layout
                        .locate(gpa)
                        .is_some_and(|(r, page)| pages.is_dirty(r, page))
                });
            let mut tiles = TileSet::empty(g.width, g.height);
            let mut n = 0u64;
            tiles.mark_pages(g, written.inspect(|_| n += 1), PAGE_SIZE);
            stats
                .dirty_pages
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            clock.advance(&tiles);
        }
    }

    /// Which GPU and scanout display `index` is, if it is a virtio one.
    fn scanout(&self, index: usize) -> Option<(&GpuDisplays, usize)> {
        let mut i = index.checked_sub(self.displays.len())?;
        for (_, g) in &self.virtio {
            let n = g.modes().len();
            if i < n {
                return Some((g, i));
            }
            i -= n;
        }
        None
    }
}

impl FrameSource for GuestFrames {
    fn displays(&self) -> Vec<DisplayGeometry> {
        let mut all = self.displays.clone();
        all.extend(virtio_displays(
            all.len(),
            self.virtio.iter().map(|(i, g)| (*i, g.modes())),
        ));
        all.extend(self.bochs.iter().map(|b| b.geometry()));
        all
    }

    fn read(&self, index: usize, out: &mut [u8]) -> bool {
        if let Some((gpu, scanout)) = self.scanout(index) {
            return gpu.read(scanout, out);
        }
        if let Some(b) = self.bochs_view(index) {
            return b.read(out);
        }
        match self.displays.get(index) {
            Some(d) if out.len() == d.bytes() => self.memory.read(d.gpa, out).is_ok(),
            _ => false,
        }
    }

    fn damage(&self, index: usize, since: u64) -> Option<Damage> {
        if let Some(b) = self.bochs_view(index) {
            return b.damage(since);
        }
        let d = self.dirty.as_ref()?;
        if index >= self.displays.len() {
            return None;
        }
        let mut st = d.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.failed {
            return None;
        }
        self.harvest(d, &mut st);
        if st.failed {
            return None;
        }
        Some(st.clocks[index].since(since))
    }

    fn note_compare(&self, index: usize, examined: u32, changed: u32) {
        if let Some(s) = self.change_stats(index) {
            s.look(examined, changed);
        }
    }
}

/// The VM's input devices, as the PCI set-up last built them (a restore rebuilds them).
static INPUTS: Mutex<Vec<InputHandle>> = Mutex::new(Vec::new());

/// Registers an input device built for the VM; it replaces one of the same kind.
pub fn input_built(handle: InputHandle) {
    let mut inputs = INPUTS.lock().unwrap_or_else(|e| e.into_inner());
    inputs.retain(|h| h.kind() != handle.kind());
    inputs.push(handle);
}

fn input_of(kind: InputKind) -> Option<InputHandle> {
    let inputs = INPUTS.lock().unwrap_or_else(|e| e.into_inner());
    inputs.iter().find(|h| h.kind() == kind).cloned()
}

/// Viewers' and the API's input, as events on the virtio-input keyboard and tablet.
#[derive(Default)]
struct GuestInput {
    keyboard: Mutex<Keyboard>,
    buttons: Mutex<u8>,
}

impl InputSink for GuestInput {
    fn key(&self, down: bool, keysym: u32) {
        let events = self
            .keyboard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .key(down, keysym);
        match input_of(InputKind::Keyboard) {
            Some(k) if !events.is_empty() => k.send(&events),
            Some(_) => tracing::debug!(keysym, "a keysym with no US key ignored"),
            None => tracing::debug!(keysym, "no keyboard: key ignored"),
        }
    }

    fn pointer(&self, d: &DisplayGeometry, buttons: u8, x: u16, y: u16) {
        let mut held = self.buttons.lock().unwrap_or_else(|e| e.into_inner());
        let events = keys::pointer_events(*held, buttons, x, y, d.width, d.height);
        *held = buttons;
        if let Some(t) = input_of(InputKind::Tablet) {
            t.send(&events);
        }
    }
}

/// Why text could not be typed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypeError {
    #[error("the VM has no keyboard (its devices have input off)")]
    NoKeyboard,
    #[error("the VM is {0}: it takes keys only while it runs")]
    NotRunning(VmState),
    #[error("cannot type the text: {0}")]
    Text(String),
}

/// Why a screenshot or a display could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DisplayError {
    #[error("display {index} does not exist: the VM has {count} display(s)")]
    NoSuchDisplay { index: usize, count: usize },
    #[error("the VM is {0}: its displays show nothing until it runs")]
    NotRunning(VmState),
    #[error("cannot encode the screenshot: {0}")]
    Encode(String),
    #[error("cannot resize: {0}")]
    Resize(String),
}

/// Why an encode session did not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeStartError {
    #[error(transparent)]
    Display(#[from] DisplayError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl Inner {
    /// The displays now: the machine's, or before it runs, those of the configuration.
    fn displays(&self) -> Vec<DisplayGeometry> {
        if let Some(f) = &self.frames {
            return f.displays();
        }
        let mut all = self
            .layout
            .as_ref()
            .map_or_else(Vec::new, |l| l.displays.clone());
        let virtio = self
            .configs
            .iter()
            .enumerate()
            .filter(|(_, c)| c.kind.is_virtio());
        all.extend(virtio_displays(
            all.len(),
            virtio.map(|(i, c)| (i, vec![(c.width, c.height); usize::from(c.displays)])),
        ));
        let bochs = self
            .configs
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_bochs());
        let first = all.len();
        all.extend(bochs.enumerate().map(|(k, (gpu, c))| DisplayGeometry {
            index: first + k,
            gpu,
            gpa: 0,
            width: c.width,
            height: c.height,
            stride: c.width * 4,
        }));
        all
    }
}

#[derive(Default)]
struct Inner {
    configs: Vec<GpuConfig>,
    limits: ray_api::gpu::GpuLimits,
    layout: Option<VramLayout>,
    frames: Option<Arc<GuestFrames>>,
    vnc: Option<VncServer>,
    state: Option<VmState>,
    /// Where VNC also listens on TCP, and the password viewers there must know.
    tcp: Option<(std::net::SocketAddr, Password)>,
}

/// Checks a `--vnc` TCP address (loopback only) and reads its password file; before the
/// VM starts, so that a bad one stops it there.
pub fn check_vnc_tcp(
    addr: std::net::SocketAddr,
    password_file: &std::path::Path,
) -> Result<Password, String> {
    vnc::check_tcp_address(addr).map_err(|e| e.to_string())?;
    Password::from_file(password_file).map_err(|e| e.to_string())
}

/// The displays of one VM.
pub struct DisplayHub {
    /// Itself, for the VNC server's resizer.
    me: Weak<DisplayHub>,
    id: String,
    dir: PathBuf,
    model: Arc<Mutex<GpuModel>>,
    inner: Mutex<Inner>,
    /// What the encode sessions read: the machine's framebuffers while there are some.
    source: SharedSource,
    encoders: Encoders,
    decoders: Decoders,
}

impl DisplayHub {
    pub fn new(id: &str, dir: PathBuf) -> Arc<Self> {
        let source: SharedSource = Arc::default();
        let slots = encode_slots_dir(&dir);
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            id: id.to_string(),
            dir,
            model: Arc::default(),
            inner: Mutex::default(),
            encoders: Encoders::new(source.clone(), slots.clone()),
            decoders: Decoders::new(slots),
            source,
        })
    }

    /// Serves VNC on TCP too (from the next start of the VNC server on): display N on
    /// `addr`'s port + N, for viewers that know `password`.
    pub fn serve_tcp(&self, addr: std::net::SocketAddr, password: Password) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).tcp = Some((addr, password));
    }

    /// Brings the GPUs, framebuffers and VNC server in line with the VM: its
    /// configuration, its state, and its machine's memory and virtio GPUs (while there is
    /// a machine).
    pub fn follow(
        &self,
        state: VmState,
        config: Option<&VmConfig>,
        mut vm: Option<&mut Vm>,
        virtio: &[VirtioGpu],
        bochs: &[BochsGpu],
    ) {
        let memory = vm.as_ref().map(|v| v.memory.clone());
        let memory = memory.as_ref();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut model = self.model.lock().unwrap_or_else(|e| e.into_inner());
        let gpus = config.map_or(&[][..], |c| c.devices.gpus.as_slice());
        let limits = config.map(|c| c.devices.gpu_limits()).unwrap_or_default();
        if inner.configs != gpus || inner.limits != limits {
            // A configuration is checked before it is taken; a bad one here gets no GPUs.
            *model = GpuModel::new(gpus, &limits).unwrap_or_default();
            inner.limits = limits;
            inner.layout = config
                .and_then(|c| crate::boot::vram(&c.devices, c.memory_bytes).ok())
                .flatten();
            inner.configs = gpus.to_vec();
            inner.vnc = None;
            release(&mut inner.frames, vm.as_deref_mut());
        }
        inner.state = Some(state);
        // A new machine (a restore in this process) brings new virtio GPUs and memory.
        let stale = inner.frames.as_ref().is_some_and(|f| {
            f.virtio.len() != virtio.len()
                || f.virtio.iter().zip(virtio).any(|(a, b)| !a.1.same(&b.1))
                || f.bochs.len() != bochs.len()
                || f.bochs.iter().zip(bochs).any(|(a, b)| !a.shows(b))
                || memory.is_some_and(|m| !m.same(&f.memory))
        });
        if stale {
            inner.vnc = None;
            release(&mut inner.frames, vm.as_deref_mut());
        }
        match state {
            VmState::Running | VmState::MigrationSource => {
                let any = inner.layout.is_some() || !virtio.is_empty() || !bochs.is_empty();
                if let (None, Some(mem), true) = (&inner.frames, memory, any) {
                    let mut frames = GuestFrames::new(
                        mem.clone(),
                        inner
                            .layout
                            .as_ref()
                            .map_or_else(Vec::new, |l| l.displays.clone()),
                        virtio.to_vec(),
                        bochs,
                    );
                    if let Some(vm) = vm.as_deref_mut() {
                        frames.track(vm);
                    }
                    inner.frames = Some(Arc::new(frames));
                }
                if inner.vnc.is_none() {
                    if let Some(frames) = inner.frames.clone() {
                        inner.vnc = self.start_vnc(frames, inner.tcp.clone());
                    }
                }
                model.apply_all(GpuEvent::PowerOn);
                model.apply_all(GpuEvent::Initialized);
                model.apply_all(GpuEvent::Resume);
                if inner.vnc.as_ref().is_some_and(|v| v.viewers() > 0) {
                    model.apply_all(GpuEvent::ViewerConnected);
                }
            }
            VmState::Paused => model.apply_all(GpuEvent::Suspend),
            // The machine (and its memory) is gone; the pictures are in the suspend image.
            VmState::Suspended => {
                model.apply_all(GpuEvent::Suspend);
                inner.vnc = None;
                release(&mut inner.frames, vm);
            }
            VmState::Created | VmState::MigrationTarget => {}
            VmState::Terminated => {
                model.apply_all(GpuEvent::PowerOff);
                inner.vnc = None;
                release(&mut inner.frames, vm);
            }
            VmState::Error => model.apply_all(GpuEvent::Fail),
        }
        drop(model);
        *self.source.lock().unwrap_or_else(|e| e.into_inner()) =
            inner.frames.clone().map(|f| f as Arc<dyn FrameSource>);
        drop(inner);
        match state {
            VmState::Running | VmState::MigrationSource => self.encoders.set_paused(false),
            VmState::Paused | VmState::Suspended => self.encoders.set_paused(true),
            VmState::Terminated | VmState::Error => {
                self.decoders.stop_all();
                self.encoders.stop_all();
            }
            VmState::Created | VmState::MigrationTarget => {}
        }
    }

    /// Starts an encode session on display `index`.
    pub fn encode_start(
        &self,
        index: usize,
        req: &EncodeRequest,
        handed: Option<std::fs::File>,
    ) -> Result<EncodeSessionInfo, EncodeStartError> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let displays = inner.displays();
        let count = displays.len();
        let Some(d) = displays.get(index).copied() else {
            return Err(DisplayError::NoSuchDisplay { index, count }.into());
        };
        let state = inner.state.unwrap_or(VmState::Created);
        if inner.frames.is_none() {
            return Err(DisplayError::NotRunning(state).into());
        }
        drop(inner);
        Ok(self.encoders.start_into(d, req, handed)?)
    }

    /// Stops encode session `id`.
    pub fn encode_stop(&self, id: u32) -> Result<EncodeSessionInfo, EncodeError> {
        self.encoders.stop(id)
    }

    /// A live view of encode session `id`'s stream, and its codec.
    pub fn encode_watch(
        &self,
        id: u32,
    ) -> Result<(ray_api::encode::Codec, ray_display::encode::Watch), EncodeError> {
        let watch = self.encoders.watch(id)?;
        let codec = self
            .encoders
            .list()
            .sessions
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.codec)
            .ok_or(EncodeError::NoSuchSession(id))?;
        Ok((codec, watch))
    }

    /// The encode sessions.
    pub fn encode_list(&self) -> EncodeList {
        self.encoders.list()
    }

    /// Starts a decode session: of a file in the VM's directory, or of one of the VM's
    /// encode sessions' live stream (as one of its watchers). Everything is checked before
    /// a watcher joins or a thread starts.
    pub fn decode_start(&self, req: &DecodeRequest) -> Result<DecodeSessionInfo, DecodeStartError> {
        req.validate().map_err(DecodeStartError::Invalid)?;
        if let Some(codec) = req.codec {
            ray_display::decode::check_codec(codec)?;
        }
        match &req.source {
            DecodeSource::File(given) => {
                let (file, path) = self.decode_file(given)?;
                let codec = match req.codec {
                    Some(c) => c,
                    None => {
                        use std::os::unix::fs::FileExt;
                        let mut head = [0u8; 4];
                        let n = file.read_at(&mut head, 0).unwrap_or(0);
                        ray_api::decode::guess_codec(&path, &head[..n])
                    }
                };
                self.decoders
                    .start(codec, DecodeSource::File(path), move || {
                        Ok(DecodeInput::File(file))
                    })
            }
            &DecodeSource::EncodeSession(id) => {
                let session = self
                    .encoders
                    .list()
                    .sessions
                    .into_iter()
                    .find(|s| s.id == id)
                    .ok_or(DecodeStartError::NoSuchEncodeSession(id))?;
                use ray_display::encode::SessionState as E;
                if matches!(session.state, E::Stopped | E::Error) {
                    return Err(DecodeStartError::EncodeSessionEnded {
                        id,
                        state: session.state,
                    });
                }
                let codec = match req.codec {
                    Some(asked) if asked != session.codec => {
                        return Err(DecodeStartError::CodecMismatch {
                            session: id,
                            has: session.codec,
                            asked,
                        })
                    }
                    _ => session.codec,
                };
                self.decoders
                    .start(codec, DecodeSource::EncodeSession(id), || {
                        let watch = self
                            .encoders
                            .watch(id)
                            .map_err(DecodeStartError::from_watch)?;
                        let me = self.me.clone();
                        let ended = move || {
                            me.upgrade().is_none_or(|hub| {
                                !hub.encoders.list().sessions.iter().any(|s| {
                                    s.id == id && !matches!(s.state, E::Stopped | E::Error)
                                })
                            })
                        };
                        Ok(DecodeInput::Live {
                            watch,
                            ended: Box::new(ended),
                        })
                    })
            }
        }
    }

    /// Opens the file `given` names (absolute, or relative to the VM's directory) for a
    /// decode session: a regular file inside the VM's directory, symbolic links resolved
    /// (a jailed VMM sees nothing else, and an unjailed one reads nothing else for a
    /// session). Returns it with its resolved path.
    fn decode_file(&self, given: &str) -> Result<(std::fs::File, String), DecodeStartError> {
        use std::path::Path;
        let lexical = lexically_normal(&self.dir.join(given));
        let dir = std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
        let outside = |p: &Path| DecodeStartError::OutsideVmDir {
            path: p.display().to_string(),
            dir: self.dir.display().to_string(),
        };
        let inside = |p: &Path| p.starts_with(&self.dir) || p.starts_with(&dir);
        if !inside(&lexical) {
            return Err(outside(&lexical));
        }
        // A symbolic link to a file outside: a jailed VMM does not see its target at all,
        // and says so rather than that it does not exist.
        if let Ok(target) = std::fs::read_link(&lexical) {
            let target = lexically_normal(&lexical.parent().unwrap_or(&dir).join(target));
            if !inside(&target) {
                return Err(outside(&target));
            }
        }
        let real = std::fs::canonicalize(&lexical).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DecodeStartError::NoSuchFile {
                path: lexical.display().to_string(),
            },
            _ => DecodeStartError::File {
                path: lexical.display().to_string(),
                why: e.to_string(),
            },
        })?;
        if !real.starts_with(&dir) {
            return Err(outside(&real));
        }
        let path = real.display().to_string();
        let meta = std::fs::metadata(&real).map_err(|e| DecodeStartError::File {
            path: path.clone(),
            why: e.to_string(),
        })?;
        if !meta.is_file() {
            return Err(DecodeStartError::NotAFile { path });
        }
        let file = std::fs::File::open(&real).map_err(|e| DecodeStartError::File {
            path: path.clone(),
            why: e.to_string(),
        })?;
        Ok((file, path))
    }

    /// Stops decode session `id`.
    pub fn decode_stop(&self, id: u32) -> Result<DecodeSessionInfo, DecodeSessionError> {
        self.decoders.stop(id)
    }

    /// The decode sessions.
    pub fn decode_list(&self) -> DecodeList {
        self.decoders.list()
    }

    /// Decode session `id`.
    pub fn decode_info(&self, id: u32) -> Result<DecodeSessionInfo, DecodeSessionError> {
        self.decoders.info(id)
    }

    /// Decode session `id`'s last picture as a PNG.
    pub fn decode_frame_png(&self, id: u32) -> Result<Vec<u8>, DecodeSessionError> {
        self.decoders.frame_png(id)
    }

    fn start_vnc(
        &self,
        frames: Arc<GuestFrames>,
        tcp: Option<(std::net::SocketAddr, Password)>,
    ) -> Option<VncServer> {
        let model = self.model.clone();
        let hook: vnc::ViewerHook = Arc::new(move |viewers| {
            let mut m = model.lock().unwrap_or_else(|e| e.into_inner());
            m.apply_all(if viewers > 0 {
                GpuEvent::ViewerConnected
            } else {
                GpuEvent::LastViewerLeft
            });
        });
        let input: Arc<dyn InputSink> = Arc::new(GuestInput::default());
        match VncServer::start(&self.dir, &self.id, frames, Some(input), hook) {
            Ok(mut v) => {
                tracing::info!(sockets = ?v.sockets(), "VNC server listening");
                v.set_resizer(Arc::new(ViewerResizer(self.me.clone())));
                if let Some((addr, password)) = tcp {
                    match v.listen_tcp(addr, password) {
                        Ok(addrs) => {
                            tracing::info!(?addrs, "VNC listening on TCP (VNC authentication)")
                        }
                        Err(e) => tracing::error!("{e}; VNC is served on the Unix sockets only"),
                    }
                }
                Some(v)
            }
            Err(e) => {
                tracing::error!("cannot start the VNC server: {e}; the displays have no viewers");
                None
            }
        }
    }

    /// The displays' part of `GET /metrics`: framebuffer updates and their bytes sent to
    /// VNC viewers per display and per viewer connected now, each encode session's
    /// frames, bytes, frame rate and latency, each decode session's pictures, bytes, rate
    /// and mean decode time, and each virtio GPU's commands and busy time.
    pub fn render_metrics(&self, out: &mut String) {
        use crate::metrics::family;
        use std::fmt::Write as _;
        let (traffic, virtio) = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let virtio: Vec<(usize, u64, std::time::Duration, u64)> = inner
                .frames
                .as_ref()
                .map(|f| {
                    f.virtio
                        .iter()
                        .map(|(i, g)| {
                            let (n, busy) = g.busy();
                            (*i, n, busy, g.refused())
                        })
                        .collect()
                })
                .unwrap_or_default();
            (inner.vnc.as_ref().map(VncServer::traffic), virtio)
        };
        if let Some(t) = traffic {
            for (name, help, pick) in [
                (
                    "ray_vnc_updates_total",
                    "Framebuffer updates sent to VNC viewers of each display (rate: frames a second).",
                    0,
                ),
                (
                    "ray_vnc_bytes_total",
                    "Bytes of framebuffer updates sent to VNC viewers of each display.",
                    1,
                ),
            ] {
                family(out, name, "counter", help);
                for (d, (updates, bytes)) in &t.displays {
                    let v = if pick == 0 { updates } else { bytes };
                    let _ = writeln!(out, "{name}{{display=\"{d}\"}} {v}");
                }
            }
            for (name, help, pick) in [
                (
                    "ray_vnc_viewer_updates_total",
                    "Framebuffer updates sent to each VNC viewer connected now.",
                    0,
                ),
                (
                    "ray_vnc_viewer_bytes_total",
                    "Bytes of framebuffer updates sent to each VNC viewer connected now.",
                    1,
                ),
            ] {
                family(out, name, "counter", help);
                for v in t.viewers.values() {
                    let n = if pick == 0 { v.updates } else { v.bytes };
                    let _ = writeln!(
                        out,
                        "{name}{{display=\"{}\",viewer=\"{}\",role=\"{}\"}} {n}",
                        v.display,
                        v.viewer,
                        v.role.name()
                    );
                }
            }
        }
        let sessions = self.encode_list().sessions;
        if !sessions.is_empty() {
            type Value = fn(&ray_api::encode::EncodeSessionInfo) -> f64;
            let families: [(&str, &str, &str, Value); 5] = [
                (
                    "ray_encode_frames_total",
                    "counter",
                    "Frames each encode session encoded (one per change of its display).",
                    |s| s.frames as f64,
                ),
                (
                    "ray_encode_bytes_total",
                    "counter",
                    "Bytes of stream each encode session produced.",
                    |s| s.bytes as f64,
                ),
                (
                    "ray_encode_fps",
                    "gauge",
                    "Frames a second each encode session encoded over the last few seconds.",
                    |s| s.fps,
                ),
                (
                    "ray_encode_latency_ms",
                    "gauge",
                    "Encode latency (frame read to stream written) of each session's last frame, ms.",
                    |s| s.latency_ms,
                ),
                (
                    "ray_encode_mean_latency_ms",
                    "gauge",
                    "Mean encode latency of each session, ms.",
                    |s| s.mean_latency_ms,
                ),
            ];
            for (name, kind, help, value) in families {
                family(out, name, kind, help);
                for s in &sessions {
                    let _ = writeln!(
                        out,
                        "{name}{{session=\"{}\",display=\"{}\",codec=\"{}\"}} {}",
                        s.id,
                        s.display,
                        s.codec.as_str(),
                        value(s)
                    );
                }
            }
        }
        let decodes = self.decode_list().sessions;
        if !decodes.is_empty() {
            type Value = fn(&DecodeSessionInfo) -> f64;
            let families: [(&str, &str, &str, Value); 4] = [
                (
                    "ray_decode_frames_total",
                    "counter",
                    "Pictures each decode session decoded.",
                    |s| s.frames as f64,
                ),
                (
                    "ray_decode_bytes_total",
                    "counter",
                    "Bytes of stream each decode session read.",
                    |s| s.bytes as f64,
                ),
                (
                    "ray_decode_fps",
                    "gauge",
                    "Pictures a second each decode session decoded (the last few seconds while it runs, its whole run once it ended).",
                    |s| s.fps,
                ),
                (
                    "ray_decode_mean_latency_ms",
                    "gauge",
                    "Mean decode time of each decode session's pictures, ms.",
                    |s| s.mean_latency_ms,
                ),
            ];
            for (name, kind, help, value) in families {
                family(out, name, kind, help);
                for s in &decodes {
                    let source = match s.source {
                        DecodeSource::File(_) => "file",
                        DecodeSource::EncodeSession(_) => "encode_session",
                    };
                    let _ = writeln!(
                        out,
                        "{name}{{session=\"{}\",codec=\"{}\",source=\"{source}\"}} {}",
                        s.id,
                        s.codec.as_str(),
                        value(s)
                    );
                }
            }
        }
        if !virtio.is_empty() {
            family(
                out,
                "ray_gpu_commands_total",
                "counter",
                "Commands each virtio GPU served (control and cursor queues).",
            );
            for (i, n, _, _) in &virtio {
                let _ = writeln!(out, "ray_gpu_commands_total{{gpu=\"{i}\"}} {n}");
            }
            family(
                out,
                "ray_gpu_busy_seconds_total",
                "counter",
                "Time each virtio GPU spent serving commands (its 2D work, or a remote GPU's round trips to its back end).",
            );
            for (i, _, busy, _) in &virtio {
                let _ = writeln!(
                    out,
                    "ray_gpu_busy_seconds_total{{gpu=\"{i}\"}} {}",
                    busy.as_secs_f64()
                );
            }
            family(
                out,
                "ray_gpu_refused_commands_total",
                "counter",
                "Commands each virtio GPU refused (answered with an error response).",
            );
            for (i, _, _, refused) in &virtio {
                let _ = writeln!(
                    out,
                    "ray_gpu_refused_commands_total{{gpu=\"{i}\"}} {refused}"
                );
            }
        }
        let powered: Vec<(u32, u64)> = self
            .list()
            .gpus
            .iter()
            .filter_map(|g| Some((g.index, g.power_mw?)))
            .collect();
        if !powered.is_empty() {
            family(
                out,
                "ray_gpu_power_watts",
                "gauge",
                "Power a passthrough GPU draws as its hwmon reports it (only where it does).",
            );
            for (i, mw) in powered {
                let _ = writeln!(
                    out,
                    "ray_gpu_power_watts{{gpu=\"{i}\"}} {}",
                    mw as f64 / 1000.0
                );
            }
        }
    }

    /// The GPUs with their states and displays.
    pub fn list(&self) -> GpuList {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut model = self.model.lock().unwrap_or_else(|e| e.into_inner());
        // A passthrough GPU whose device stopped answering goes to Error.
        let passthrough: Vec<Option<(String, Option<String>)>> = (0..model.gpus().len())
            .map(crate::passthrough::status)
            .collect();
        for (i, p) in passthrough.iter().enumerate() {
            if let Some((_, Some(_))) = p {
                let _ = model.apply(i, GpuEvent::Fail);
            }
        }
        let remote = Self::follow_remote(&inner, &mut model);
        let viewers = inner.vnc.as_ref().map_or(0, |v| v.viewers());
        let displays = inner.displays();
        GpuList {
            limits: inner.limits,
            gpus: model
                .gpus()
                .iter()
                .enumerate()
                .map(|(i, g)| GpuInfo {
                    index: i as u32,
                    kind: g.config.kind,
                    state: g.state,
                    displays: displays
                        .iter()
                        .filter(|d| d.gpu == i)
                        .map(|d| DisplayInfo {
                            index: d.index as u32,
                            gpu: i as u32,
                            width: d.width,
                            height: d.height,
                            framebuffer_gpa: d.gpa,
                            format: if g.config.kind.is_virtio() {
                                "virtio-gpu scanout (xrgb8888)".into()
                            } else {
                                "xrgb8888".into()
                            },
                            changes: inner
                                .frames
                                .as_ref()
                                .and_then(|f| f.change_stats(d.index))
                                .map(|s| s.report()),
                        })
                        .collect(),
                    viewers,
                    device: passthrough[i].as_ref().map(|p| p.0.clone()),
                    error: passthrough[i]
                        .as_ref()
                        .and_then(|p| p.1.clone())
                        .or_else(|| {
                            remote
                                .iter()
                                .find(|(gpu, _)| *gpu == i)
                                .and_then(|(_, r)| r.error.clone())
                        }),
                    backend: remote
                        .iter()
                        .find(|(gpu, _)| *gpu == i)
                        .map(|(_, r)| r.backend.clone())
                        .or_else(|| g.config.backend.clone()),
                    power_mw: match &g.config.passthrough {
                        Some(ray_api::gpu::PassthroughSource::Host { bdf }) => {
                            crate::passthrough::power_mw(bdf)
                        }
                        _ => None,
                    },
                })
                .collect(),
            vnc_tcp: inner.vnc.as_ref().map_or(Vec::new(), |v| {
                v.tcp_addresses().iter().map(|a| a.to_string()).collect()
            }),
            vnc_socket: inner.vnc.as_ref().map(|_| {
                vnc::socket_path(&self.dir, 0, vnc::Role::ReadWrite)
                    .display()
                    .to_string()
            }),
        }
    }

    /// Brings the remote GPUs' states in line with their links: a lost back end puts the
    /// GPU in Error, its return (while the VM runs) makes it Ready again. Returns each
    /// remote GPU's link.
    fn follow_remote(inner: &Inner, model: &mut GpuModel) -> Vec<(usize, RemoteStatus)> {
        let Some(frames) = &inner.frames else {
            return Vec::new();
        };
        let running = matches!(
            inner.state,
            Some(VmState::Running | VmState::MigrationSource)
        );
        let mut out = Vec::new();
        for (gpu, displays) in &frames.virtio {
            let Some(status) = displays.remote() else {
                continue;
            };
            let state = model.gpus().get(*gpu).map(|g| g.state);
            let event = match (&status.error, state) {
                (Some(_), Some(s)) if s != ray_api::gpu::GpuStateName::Error => {
                    Some(GpuEvent::Fail)
                }
                (None, Some(ray_api::gpu::GpuStateName::Error)) if running => {
                    Some(GpuEvent::Recover)
                }
                _ => None,
            };
            if let Some(e) = event {
                match model.apply(*gpu, e) {
                    Ok(s) => tracing::info!(gpu, state = ?s, reason = ?status.error, "remote GPU"),
                    Err(e) => tracing::debug!("{e}"),
                }
            }
            out.push((*gpu, status));
        }
        out
    }

    /// Display `index`'s pixels now (XRGB8888) and its geometry.
    pub fn pixels(&self, index: usize) -> Result<(Vec<u8>, DisplayGeometry), DisplayError> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let displays = inner.displays();
        let count = displays.len();
        let Some(d) = displays.get(index).copied() else {
            return Err(DisplayError::NoSuchDisplay { index, count });
        };
        let state = inner.state.unwrap_or(VmState::Created);
        let Some(frames) = inner.frames.clone() else {
            return Err(DisplayError::NotRunning(state));
        };
        drop(inner);
        let mut out = vec![0; d.bytes()];
        if !frames.read(index, &mut out) {
            return Err(DisplayError::NotRunning(state));
        }
        Ok((out, d))
    }

    /// Gives display `index` (a virtio GPU's scanout) the size `width` x `height`: the
    /// guest's driver gets a display event and re-reads the display information. VNC
    /// viewers are told the server changed the size.
    pub fn resize(&self, index: usize, width: u32, height: u32) -> Result<(), DisplayError> {
        self.resize_for(index, width, height, false)
            .map_err(|(_, e)| e)
    }

    /// The one resize path, for the API and for VNC viewers (`by_viewer`); an error
    /// says whether the request was prohibited (true) or invalid (false).
    fn resize_for(
        &self,
        index: usize,
        width: u32,
        height: u32,
        by_viewer: bool,
    ) -> Result<(), (bool, DisplayError)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let count = inner.displays().len();
        if index >= count {
            return Err((false, DisplayError::NoSuchDisplay { index, count }));
        }
        let state = inner.state.unwrap_or(VmState::Created);
        // Not while paused: a saved state must hold still.
        let (VmState::Running, Some(frames)) = (state, inner.frames.clone()) else {
            return Err((true, DisplayError::NotRunning(state)));
        };
        if frames.bochs_view(index).is_some() {
            return Err((
                true,
                DisplayError::Resize(format!(
                    "display {index} is a Bochs display device's, whose size its guest sets \
                     (the DISPI mode registers); only a virtio GPU's displays change size here"
                )),
            ));
        }
        let Some((gpu, scanout)) = frames.scanout(index) else {
            return Err((
                true,
                DisplayError::Resize(format!(
                    "display {index} belongs to an emulated GPU, whose size the configuration \
                     fixes; only a virtio GPU's displays change size"
                )),
            ));
        };
        ray_api::gpu::check_size(width, height).map_err(|e| (false, DisplayError::Resize(e)))?;
        if !by_viewer {
            if let Some(v) = &inner.vnc {
                v.server_resize(index, width, height);
            }
        }
        drop(inner);
        gpu.resize(scanout, width, height)
            .map_err(|e| (false, DisplayError::Resize(e)))
    }

    /// Types `text` on the VM's keyboard as one batch of key strokes; returns how many
    /// events were sent.
    pub fn type_text(&self, text: &str) -> Result<usize, TypeError> {
        let events = keys::type_text(text).map_err(TypeError::Text)?;
        let state = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state
            .unwrap_or(VmState::Created);
        if !matches!(state, VmState::Running | VmState::MigrationSource) {
            return Err(TypeError::NotRunning(state));
        }
        let keyboard = input_of(InputKind::Keyboard).ok_or(TypeError::NoKeyboard)?;
        keyboard.send(&events);
        Ok(events.len())
    }

    /// Display `index` as a PNG.
    pub fn screenshot(&self, index: usize) -> Result<Vec<u8>, DisplayError> {
        let (px, d) = self.pixels(index)?;
        ray_display::png::encode(&px, d.width, d.height, d.stride).map_err(DisplayError::Encode)
    }
}

/// `path` with its `.` and `..` resolved by name (not through the file system).
fn lexically_normal(path: &std::path::Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// SetDesktopSize from a read-write VNC viewer, through the same path as `ray gpu resize`.
struct ViewerResizer(Weak<DisplayHub>);

impl DisplayResizer for ViewerResizer {
    fn resize(&self, display: usize, width: u32, height: u32) -> Result<(), ResizeRefusal> {
        let Some(hub) = self.0.upgrade() else {
            return Err(ResizeRefusal::Prohibited("the VM is going away".into()));
        };
        hub.resize_for(display, width, height, true)
            .map_err(|(prohibited, e)| {
                if prohibited {
                    ResizeRefusal::Prohibited(e.to_string())
                } else {
                    ResizeRefusal::Invalid(e.to_string())
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decode session reads a regular file in the VM's directory only: by its path or
    /// its name there; a path that leaves it (by `..`, or by a symbolic link) is refused
    /// as outside before anything is opened, and a missing file or a directory by name.
    #[test]
    fn decode_files_are_checked_against_the_vm_directory() {
        let root = std::env::temp_dir().join(format!("ray-decode-dir-{}", std::process::id()));
        let dir = root.join("vms").join("v");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(root.join("outside.h264"), b"x").unwrap();
        std::fs::write(dir.join("in.h264"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("outside.h264"), dir.join("link.h264")).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        let hub = DisplayHub::new("v", dir.clone());
        let inside = dir.join("in.h264").display().to_string();
        for given in ["in.h264", inside.as_str(), "sub/../in.h264"] {
            let (_, path) = hub.decode_file(given).unwrap();
            assert_eq!(path, inside, "{given}");
        }
        for given in [
            "../../outside.h264",
            "link.h264",
            "/etc/passwd",
            "sub/../../x",
        ] {
            let e = hub.decode_file(given).unwrap_err();
            assert!(
                matches!(e, DecodeStartError::OutsideVmDir { .. }),
                "{given}: {e}"
            );
            assert!(e.to_string().contains("outside the VM's directory"), "{e}");
        }
        let e = hub.decode_file("nope.h264").unwrap_err();
        assert!(e.to_string().ends_with("nope.h264 does not exist"), "{e}");
        let e = hub.decode_file("sub").unwrap_err();
        assert!(matches!(e, DecodeStartError::NotAFile { .. }), "{e}");
        let _ = std::fs::remove_dir_all(root);
    }
}
