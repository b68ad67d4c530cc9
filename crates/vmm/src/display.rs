//! The VM's displays in the VMM: the GPU model following the VM's state, the framebuffers
//! read out of guest RAM, the VNC server and screenshots.
//!
//! [`DisplayHub`] is shared by the VMM thread, which tells it of every state change
//! ([`DisplayHub::follow`]), and the API thread, which reads GPU status and screenshots
//! from it directly: a screenshot is a copy out of guest memory and never waits for the
//! VMM thread (nor stops the guest).
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ray_api::gpu::{DisplayInfo, GpuConfig, GpuInfo, GpuList};
use ray_api::vmm::{VmConfig, VmStateName as VmState};
use ray_devices::virtio::input::{InputHandle, Kind as InputKind};
use ray_display::auth::Password;
use ray_display::keys::{self, Keyboard};
use ray_display::model::{GpuEvent, GpuModel};
use ray_display::vnc::InputSink;
use ray_display::vnc::{self, VncServer};
use ray_display::{DisplayGeometry, FrameSource, VramLayout};
use ray_memory::GuestMemory;

use crate::memory::MemoryManager;

/// The framebuffers of a running machine, read straight from guest RAM.
struct GuestFrames {
    memory: MemoryManager,
    displays: Vec<DisplayGeometry>,
}

impl FrameSource for GuestFrames {
    fn displays(&self) -> Vec<DisplayGeometry> {
        self.displays.clone()
    }

    fn read(&self, index: usize, out: &mut [u8]) -> bool {
        match self.displays.get(index) {
            Some(d) if out.len() == d.bytes() => self.memory.read(d.gpa, out).is_ok(),
            _ => false,
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
}

#[derive(Default)]
struct Inner {
    configs: Vec<GpuConfig>,
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
    id: String,
    dir: PathBuf,
    model: Arc<Mutex<GpuModel>>,
    inner: Mutex<Inner>,
}

impl DisplayHub {
    pub fn new(id: &str, dir: PathBuf) -> Self {
        Self {
            id: id.to_string(),
            dir,
            model: Arc::default(),
            inner: Mutex::default(),
        }
    }

    /// Serves VNC on TCP too (from the next start of the VNC server on): display N on
    /// `addr`'s port + N, for viewers that know `password`.
    pub fn serve_tcp(&self, addr: std::net::SocketAddr, password: Password) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).tcp = Some((addr, password));
    }

    /// Brings the GPUs, framebuffers and VNC server in line with the VM: its
    /// configuration, its state, and its machine's memory (while there is a machine).
    pub fn follow(
        &self,
        state: VmState,
        config: Option<&VmConfig>,
        memory: Option<&MemoryManager>,
    ) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut model = self.model.lock().unwrap_or_else(|e| e.into_inner());
        let gpus = config.map_or(&[][..], |c| c.devices.gpus.as_slice());
        if inner.configs != gpus {
            // A configuration is checked before it is taken; a bad one here gets no GPUs.
            *model = GpuModel::new(gpus).unwrap_or_default();
            inner.layout = config
                .and_then(|c| crate::boot::vram(gpus, c.memory_bytes).ok())
                .flatten();
            inner.configs = gpus.to_vec();
            inner.vnc = None;
            inner.frames = None;
        }
        inner.state = Some(state);
        match state {
            VmState::Running | VmState::MigrationSource => {
                if let (None, Some(mem), Some(layout)) = (&inner.frames, memory, &inner.layout) {
                    inner.frames = Some(Arc::new(GuestFrames {
                        memory: mem.clone(),
                        displays: layout.displays.clone(),
                    }));
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
                inner.frames = None;
            }
            VmState::Created | VmState::MigrationTarget => {}
            VmState::Terminated => {
                model.apply_all(GpuEvent::PowerOff);
                inner.vnc = None;
                inner.frames = None;
            }
            VmState::Error => model.apply_all(GpuEvent::Fail),
        }
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

    /// The GPUs with their states and displays.
    pub fn list(&self) -> GpuList {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let model = self.model.lock().unwrap_or_else(|e| e.into_inner());
        let viewers = inner.vnc.as_ref().map_or(0, |v| v.viewers());
        let displays = inner.layout.as_ref().map_or(&[][..], |l| &l.displays[..]);
        GpuList {
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
                            format: "xrgb8888".into(),
                        })
                        .collect(),
                    viewers,
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

    /// Display `index`'s pixels now (XRGB8888) and its geometry.
    pub fn pixels(&self, index: usize) -> Result<(Vec<u8>, DisplayGeometry), DisplayError> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let count = inner.layout.as_ref().map_or(0, |l| l.displays.len());
        let Some(d) = inner
            .layout
            .as_ref()
            .and_then(|l| l.displays.get(index))
            .copied()
        else {
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
