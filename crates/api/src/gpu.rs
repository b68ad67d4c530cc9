//! A VM's GPUs in its configuration, the `--gpu` argument that names one, and what the
//! API reports about them. Checked here so that the CLI and the VMM refuse the same things
//! with the same words, before a VM starts.
//!
//! `--gpu emulated|virtio[,width=W][,height=H][,displays=N]`; `--gpu none` means no GPU;
//! `virtio` is the paravirt type (virtio-gpu 2D; `paravirt` is accepted too).
//! `--gpu emulated,device=bochs[,width=W][,height=H]` is an emulated GPU the guest finds on
//! PCI: a Bochs-display-style device (VRAM BAR, DISPI mode registers), one display.
//! `--gpu remote,socket=PATH|tcp=ADDR,token-file=F[,width=W]...` is the same virtio-gpu to
//! the guest with its 2D work done by a back end process (`ray gpu backend`);
//! `--gpu passthrough,vfio-user=SOCKET` (a device served by another process) or
//! `--gpu passthrough,host=BDF` (a host PCI device through VFIO).
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Most GPUs one VM has, unless its [`GpuLimits`] say otherwise.
pub const MAX_GPUS: u8 = 8;
/// Most displays one GPU drives, unless the VM's [`GpuLimits`] say otherwise.
pub const MAX_DISPLAYS_PER_GPU: u8 = 4;
/// Most displays one VM has over all its GPUs, unless its [`GpuLimits`] say otherwise.
pub const MAX_DISPLAYS_PER_VM: u8 = 16;
/// What [`GpuLimits`] may be raised to: what the devices can do. A VM's GPUs are PCI
/// devices on its one bus (32 slots, shared with its other devices); a virtio GPU has at
/// most 16 scanouts; guests find at most 16 displays in the display table.
pub const CEILING_GPUS: u8 = 16;
pub const CEILING_DISPLAYS_PER_GPU: u8 = 16;
pub const CEILING_DISPLAYS_PER_VM: u8 = 16;
/// Display sizes, in pixels: from VGA's smallest to 4K UHD.
pub const MIN_WIDTH: u32 = 320;
pub const MAX_WIDTH: u32 = 3840;
pub const MIN_HEIGHT: u32 = 200;
pub const MAX_HEIGHT: u32 = 2160;
/// The default display size.
pub const DEFAULT_WIDTH: u32 = 1024;
pub const DEFAULT_HEIGHT: u32 = 768;

/// The five GPU types of the GPU model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GpuType {
    /// No GPU.
    None,
    /// A framebuffer in guest RAM the VMM scans out (Linux sees a VESA linear framebuffer).
    Emulated,
    /// virtio-gpu 2D on PCI: the guest's driver sends its pictures to the host.
    Paravirt,
    /// A PCI GPU passed through: a host device over VFIO, or a device process over
    /// vfio-user.
    Passthrough,
    /// virtio-gpu 2D whose 2D work a back end in another process or host does.
    Remote,
}

impl GpuType {
    pub fn as_str(self) -> &'static str {
        match self {
            GpuType::None => "none",
            GpuType::Emulated => "emulated",
            GpuType::Paravirt => "paravirt",
            GpuType::Passthrough => "passthrough",
            GpuType::Remote => "remote",
        }
    }

    fn parse(s: &str) -> Option<GpuType> {
        [
            GpuType::None,
            GpuType::Emulated,
            GpuType::Paravirt,
            GpuType::Passthrough,
            GpuType::Remote,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
        .or((s == "virtio").then_some(GpuType::Paravirt))
    }
}

impl GpuType {
    /// Whether the guest sees a virtio-gpu device (paravirt and remote GPUs).
    pub fn is_virtio(self) -> bool {
        matches!(self, GpuType::Paravirt | GpuType::Remote)
    }
}

impl std::fmt::Display for GpuType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One GPU of the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    #[serde(rename = "type")]
    pub kind: GpuType,
    /// Width of each display, in pixels (320..=3840, a multiple of 8).
    #[schema(minimum = 320, maximum = 3840)]
    pub width: u32,
    /// Height of each display, in pixels (200..=2160).
    #[schema(minimum = 200, maximum = 2160)]
    pub height: u32,
    /// Displays of this GPU (1..=4).
    #[schema(minimum = 1, maximum = 4)]
    pub displays: u8,
    /// Where a passthrough GPU comes from (only for type passthrough, which has no
    /// displays of ours: width, height and displays are 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<PassthroughSource>,
    /// A remote GPU's back end: `unix:PATH` (an absolute path) or `tcp:ADDR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// A TCP back end's token: the file that holds it (an absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// How long the VMM waits for a passthrough device or a remote back end to answer
    /// one request, in milliseconds (100..=60000; by default 2000 for passthrough and
    /// 5000 for remote). Past it the GPU goes to Error and the VM runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 100, maximum = 60000)]
    pub timeout_ms: Option<u32>,
    /// How an emulated GPU shows itself to the guest: absent (or `framebuffer`) for a
    /// framebuffer in guest RAM, `bochs` for a Bochs-display-style PCI device (only for
    /// type emulated; one display).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<EmulatedDevice>,
}

/// The guest's view of an emulated GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EmulatedDevice {
    /// Framebuffers in guest RAM, announced in the display table and the boot
    /// parameters (the default).
    Framebuffer,
    /// A PCI display device (vendor 0x1234, device 0x1111, like QEMU's `bochs-display`):
    /// VRAM in BAR 0, the DISPI mode registers in BAR 2. The guest sets the mode.
    Bochs,
}

impl EmulatedDevice {
    pub fn as_str(self) -> &'static str {
        match self {
            EmulatedDevice::Framebuffer => "framebuffer",
            EmulatedDevice::Bochs => "bochs",
        }
    }
}

/// Bytes of a Bochs display's VRAM: the largest display ([`MAX_WIDTH`] x [`MAX_HEIGHT`],
/// 4 bytes a pixel) rounded up to a power of two (a BAR's size).
pub const BOCHS_VRAM_BYTES: u64 = (MAX_WIDTH as u64 * MAX_HEIGHT as u64 * 4).next_power_of_two();

/// The bounds of [`GpuConfig::timeout_ms`].
pub const MIN_TIMEOUT_MS: u32 = 100;
pub const MAX_TIMEOUT_MS: u32 = 60_000;
/// A passthrough device's default bound on one request.
pub const PASSTHROUGH_TIMEOUT_MS: u32 = 2000;
/// A remote back end's default bound on one request.
pub const REMOTE_TIMEOUT_MS: u32 = 5000;

/// The device behind a passthrough GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PassthroughSource {
    /// A device served by another process over vfio-user on this Unix socket.
    VfioUser { socket: String },
    /// A host PCI device bound to vfio-pci, `DDDD:BB:DD.F`.
    Host { bdf: String },
}

impl std::fmt::Display for PassthroughSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PassthroughSource::VfioUser { socket } => write!(f, "vfio-user={socket}"),
            PassthroughSource::Host { bdf } => write!(f, "host={bdf}"),
        }
    }
}

impl GpuConfig {
    /// `--gpu passthrough,vfio-user=SOCKET` or `--gpu passthrough,host=BDF`.
    fn parse_passthrough(arg: &str, options: &[&str]) -> Result<GpuConfig, String> {
        let usage = "a passthrough GPU takes exactly one of vfio-user=SOCKET or host=BDF (its \
                     displays and size are the device's own), and optionally timeout-ms=N";
        let mut timeout_ms = None;
        let mut sources = Vec::new();
        for kv in options {
            match kv.split_once('=') {
                Some(("timeout-ms", v)) if timeout_ms.is_none() => {
                    timeout_ms =
                        Some(v.parse::<u32>().map_err(|_| {
                            format!("--gpu '{arg}': timeout-ms '{v}' is not a number")
                        })?)
                }
                Some(("vfio-user", v)) => {
                    sources.push(PassthroughSource::VfioUser { socket: v.into() })
                }
                Some(("host", v)) => sources.push(PassthroughSource::Host { bdf: v.into() }),
                _ => return Err(format!("--gpu '{arg}': '{kv}': {usage}")),
            }
        }
        if sources.len() != 1 {
            return Err(format!("--gpu '{arg}': {usage}"));
        }
        let source = sources.remove(0);
        let c = GpuConfig {
            kind: GpuType::Passthrough,
            width: 0,
            height: 0,
            displays: 0,
            passthrough: Some(source),
            backend: None,
            token_file: None,
            timeout_ms,
            device: None,
        };
        c.validate().map_err(|e| format!("--gpu '{arg}': {e}"))?;
        Ok(c)
    }
}

/// Where a remote GPU's back end is, from [`GpuConfig::backend`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteBackend {
    Unix(std::path::PathBuf),
    Tcp(std::net::SocketAddr),
}

impl GpuConfig {
    /// Parses a `--gpu` argument: `None` for `--gpu none`.
    pub fn parse(arg: &str) -> Result<Option<GpuConfig>, String> {
        let mut parts = arg.split(',');
        let name = parts.next().unwrap_or_default();
        let Some(kind) = GpuType::parse(name) else {
            return Err(format!(
                "--gpu '{arg}': unknown GPU type '{name}' (known: none, emulated, virtio (paravirt), passthrough, remote)"
            ));
        };
        if kind == GpuType::Passthrough {
            return Self::parse_passthrough(arg, &parts.collect::<Vec<_>>()).map(Some);
        }
        let mut c = GpuConfig {
            kind,
            width: DEFAULT_WIDTH,
            height: DEFAULT_HEIGHT,
            displays: 1,
            passthrough: None,
            backend: None,
            token_file: None,
            timeout_ms: None,
            device: None,
        };
        // Paths as the CLI's user means them: from the current directory.
        let absolute = |v: &str| {
            let p = std::path::Path::new(v);
            if p.is_absolute() {
                v.to_string()
            } else {
                std::env::current_dir()
                    .map(|d| d.join(p).display().to_string())
                    .unwrap_or_else(|_| v.to_string())
            }
        };
        for kv in parts {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(format!("--gpu '{arg}': '{kv}' is not KEY=VALUE"));
            };
            let number = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("--gpu '{arg}': {k} '{v}' is not a number"))
            };
            match k {
                "width" => c.width = number(v)?,
                "height" => c.height = number(v)?,
                "displays" => {
                    c.displays = u8::try_from(number(v)?).unwrap_or(u8::MAX);
                }
                "socket" if !v.is_empty() => c.backend = Some(format!("unix:{}", absolute(v))),
                "tcp" => c.backend = Some(format!("tcp:{v}")),
                "token-file" if !v.is_empty() => c.token_file = Some(absolute(v)),
                "timeout-ms" => c.timeout_ms = Some(number(v)?),
                "device" => {
                    c.device = Some(match v {
                        "framebuffer" => EmulatedDevice::Framebuffer,
                        "bochs" => EmulatedDevice::Bochs,
                        _ => {
                            return Err(format!(
                                "--gpu '{arg}': unknown device '{v}' (known: framebuffer, bochs)"
                            ))
                        }
                    })
                }
                _ => {
                    return Err(format!(
                        "--gpu '{arg}': unknown key '{k}' (known: width, height, displays; \
                         for emulated: device; for remote: socket, tcp, token-file, timeout-ms)"
                    ))
                }
            }
        }
        if kind == GpuType::None {
            return if arg == "none" {
                Ok(None)
            } else {
                Err(format!("--gpu '{arg}': the type none takes no options"))
            };
        }
        c.validate().map_err(|e| format!("--gpu '{arg}': {e}"))?;
        Ok(Some(c))
    }

    /// Checks the type (built in this build?), the size and the display count.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = self.timeout_ms {
            if !matches!(self.kind, GpuType::Passthrough | GpuType::Remote) {
                return Err(format!(
                    "a {} GPU has no device outside the VMM to wait for: timeout-ms is for \
                     passthrough and remote GPUs",
                    self.kind
                ));
            }
            if !(MIN_TIMEOUT_MS..=MAX_TIMEOUT_MS).contains(&t) {
                return Err(format!(
                    "timeout-ms {t} is out of range ({MIN_TIMEOUT_MS}..={MAX_TIMEOUT_MS})"
                ));
            }
        }
        if let Some(d) = self.device {
            if self.kind != GpuType::Emulated {
                return Err(format!(
                    "a {} GPU has no device= choice: device=framebuffer|bochs is for emulated GPUs",
                    self.kind
                ));
            }
            if d == EmulatedDevice::Bochs && self.displays != 1 {
                return Err(format!(
                    "{} displays asked for; a Bochs display device drives exactly one (give \
                     the VM one GPU per display)",
                    self.displays
                ));
            }
        }
        if self.kind == GpuType::Passthrough || self.passthrough.is_some() {
            return self.validate_passthrough();
        }
        match self.kind {
            GpuType::Emulated | GpuType::Paravirt => {
                if self.backend.is_some() || self.token_file.is_some() {
                    return Err(format!(
                        "a {} GPU has no back end: socket, tcp and token-file are for remote GPUs",
                        self.kind
                    ));
                }
            }
            GpuType::Remote => {
                self.remote_backend()?;
            }
            GpuType::None => {
                return Err("a GPU of type none is no GPU: leave it out of the list".into())
            }
            other => {
                return Err(format!(
                "GPU type {other} is not implemented in this build (available: emulated, virtio, remote, passthrough)"
            ))
            }
        }
        check_size(self.width, self.height)?;
        if !(1..=CEILING_DISPLAYS_PER_GPU).contains(&self.displays) {
            return Err(format!(
                "{} displays asked for; a GPU has 1 to {CEILING_DISPLAYS_PER_GPU}",
                self.displays
            ));
        }
        Ok(())
    }

    fn validate_passthrough(&self) -> Result<(), String> {
        if self.kind != GpuType::Passthrough {
            return Err(format!(
                "a GPU of type {} has no passthrough source",
                self.kind
            ));
        }
        if (self.width, self.height, self.displays) != (0, 0, 0) {
            return Err(
                "a passthrough GPU has no displays of the VMM: width, height and displays are 0"
                    .into(),
            );
        }
        match &self.passthrough {
            None => Err("a passthrough GPU needs its device: vfio-user=SOCKET or host=BDF".into()),
            Some(PassthroughSource::VfioUser { socket }) if socket.is_empty() => {
                Err("vfio-user: the socket path is empty".into())
            }
            Some(PassthroughSource::Host { bdf }) if bdf.is_empty() => {
                Err("host: the PCI address is empty".into())
            }
            Some(_) => Ok(()),
        }
    }

    /// A remote GPU's back end, checked: a Unix socket's absolute path (no token), or a
    /// TCP address with a token file.
    pub fn remote_backend(&self) -> Result<RemoteBackend, String> {
        let Some(b) = &self.backend else {
            return Err(
                "a remote GPU needs its back end: socket=PATH or tcp=ADDR,token-file=FILE".into(),
            );
        };
        if let Some(path) = b.strip_prefix("unix:") {
            let p = std::path::PathBuf::from(path);
            if !p.is_absolute() {
                return Err(format!(
                    "the back end's socket {path} is not an absolute path"
                ));
            }
            if self.token_file.is_some() {
                return Err("a back end on a Unix socket takes no token-file (the socket is private to its user)".into());
            }
            return Ok(RemoteBackend::Unix(p));
        }
        if let Some(addr) = b.strip_prefix("tcp:") {
            let a: std::net::SocketAddr = addr
                .parse()
                .map_err(|_| format!("the back end's address '{addr}' is not IP:PORT"))?;
            if a.port() == 0 {
                return Err(format!("the back end's address {a} has no port"));
            }
            match &self.token_file {
                Some(f) if std::path::Path::new(f).is_absolute() => {}
                Some(f) => return Err(format!("the token file {f} is not an absolute path")),
                None => {
                    return Err(format!(
                    "a back end on TCP ({a}) needs token-file=FILE: TCP back ends ask for a token"
                ))
                }
            }
            return Ok(RemoteBackend::Tcp(a));
        }
        Err(format!(
            "the back end '{b}' is neither unix:PATH nor tcp:ADDR"
        ))
    }

    /// Whether the guest sees this GPU as a Bochs display device on PCI.
    pub fn is_bochs(&self) -> bool {
        self.kind == GpuType::Emulated && self.device == Some(EmulatedDevice::Bochs)
    }

    /// Whether this GPU's displays are framebuffers in guest RAM.
    pub fn in_ram(&self) -> bool {
        self.kind == GpuType::Emulated && !self.is_bochs()
    }

    /// Bytes of one display's pixels (4 bytes a pixel, no padding between lines).
    pub fn frame_bytes(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height) * 4
    }
}

/// Checks a display size: a width that is a multiple of 8 and a height, in range.
pub fn check_size(width: u32, height: u32) -> Result<(), String> {
    if !(MIN_WIDTH..=MAX_WIDTH).contains(&width) || !width.is_multiple_of(8) {
        return Err(format!(
            "width {width} is not a multiple of 8 between {MIN_WIDTH} and {MAX_WIDTH}"
        ));
    }
    if !(MIN_HEIGHT..=MAX_HEIGHT).contains(&height) {
        return Err(format!(
            "height {height} is not between {MIN_HEIGHT} and {MAX_HEIGHT}"
        ));
    }
    Ok(())
}

/// A display's new size (`PUT /vm/display/{n}/size`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisplaySize {
    pub width: u32,
    pub height: u32,
}

/// Limits on a VM's GPUs and displays (`--gpu-limits`, `devices.gpu_limits`), checked
/// with its GPU list. Each is 1 or more and at most its ceiling ([`CEILING_GPUS`], ...);
/// the defaults are [`MAX_GPUS`], [`MAX_DISPLAYS_PER_GPU`] and [`MAX_DISPLAYS_PER_VM`].
/// An operator lowers them to bound what a VM may ask for, or raises them for a guest that
/// drives more (Linux's virtio-gpu driver takes 16 scanouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GpuLimits {
    #[schema(minimum = 1, maximum = 16)]
    pub gpus: u8,
    #[schema(minimum = 1, maximum = 16)]
    pub displays_per_gpu: u8,
    #[schema(minimum = 1, maximum = 16)]
    pub displays: u8,
}

impl Default for GpuLimits {
    fn default() -> Self {
        Self {
            gpus: MAX_GPUS,
            displays_per_gpu: MAX_DISPLAYS_PER_GPU,
            displays: MAX_DISPLAYS_PER_VM,
        }
    }
}

impl GpuLimits {
    /// Each limit between 1 and its ceiling.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value, ceiling) in [
            ("gpus", self.gpus, CEILING_GPUS),
            (
                "displays-per-gpu",
                self.displays_per_gpu,
                CEILING_DISPLAYS_PER_GPU,
            ),
            ("displays", self.displays, CEILING_DISPLAYS_PER_VM),
        ] {
            if !(1..=ceiling).contains(&value) {
                return Err(format!(
                    "GPU limit {name}={value} is out of range: 1 to {ceiling}"
                ));
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for GpuLimits {
    type Err = String;

    /// `gpus=N,displays-per-gpu=N,displays=N`, any of them; the others keep their
    /// defaults.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut limits = GpuLimits::default();
        for part in s.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("'{part}' is not KEY=N (keys: gpus, displays-per-gpu, displays)")
            })?;
            let n: u8 = value
                .parse()
                .map_err(|_| format!("{key}={value}: not a whole number from 1 to 16"))?;
            match key {
                "gpus" => limits.gpus = n,
                "displays-per-gpu" => limits.displays_per_gpu = n,
                "displays" => limits.displays = n,
                _ => {
                    return Err(format!(
                        "unknown GPU limit '{key}' (keys: gpus, displays-per-gpu, displays)"
                    ))
                }
            }
        }
        limits.validate()?;
        Ok(limits)
    }
}

/// Checks a VM's GPU list against its `limits`: each GPU on its own, at most
/// `limits.gpus` of them, `limits.displays_per_gpu` displays on each and
/// `limits.displays` over all. Refusals name the limit and how to set it.
pub fn check_gpus(gpus: &[GpuConfig], limits: &GpuLimits) -> Result<(), String> {
    limits.validate()?;
    if gpus.len() > usize::from(limits.gpus) {
        return Err(format!(
            "{} GPUs asked for; the VM's limit is {} (--gpu-limits gpus=N, up to {CEILING_GPUS})",
            gpus.len(),
            limits.gpus
        ));
    }
    for (i, g) in gpus.iter().enumerate() {
        g.validate().map_err(|e| format!("GPU {i}: {e}"))?;
        if g.displays > limits.displays_per_gpu {
            return Err(format!(
                "GPU {i}: {} displays asked for; the VM's limit is {} a GPU \
                 (--gpu-limits displays-per-gpu=N, up to {CEILING_DISPLAYS_PER_GPU})",
                g.displays, limits.displays_per_gpu
            ));
        }
    }
    let displays: usize = gpus.iter().map(|g| usize::from(g.displays)).sum();
    if displays > usize::from(limits.displays) {
        return Err(format!(
            "{displays} displays asked for over all GPUs; the VM's limit is {} \
             (--gpu-limits displays=N, up to {CEILING_DISPLAYS_PER_VM})",
            limits.displays
        ));
    }
    Ok(())
}

/// A GPU's state (the GPU model's six states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GpuStateName {
    Offline,
    Initializing,
    Ready,
    InUse,
    Suspended,
    Error,
}

/// One display as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DisplayInfo {
    /// The display's number in the VM (0-based, over all GPUs): the `{n}` of
    /// `/vm/display/{n}/screenshot.png`.
    pub index: u32,
    /// The GPU it belongs to.
    pub gpu: u32,
    pub width: u32,
    pub height: u32,
    /// Guest-physical address of the framebuffer.
    pub framebuffer_gpa: u64,
    /// `xrgb8888`.
    pub format: String,
    /// How changes of an emulated display are found and what that cost, while it shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<ChangeDetection>,
}

/// How a display's changes are found for viewers, and the counts so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ChangeDetection {
    /// `dirty-log`: only tiles holding pages the dirty log reported written are compared;
    /// `tile-compare`: every tile at each look (no dirty log).
    pub mode: String,
    /// Framebuffer pages the dirty log reported written.
    pub dirty_pages: u64,
    /// Looks at the display that compared tiles (a look finding nothing written compares
    /// none and is not counted).
    pub looks: u64,
    pub tiles_examined: u64,
    pub tiles_changed: u64,
    /// Tiles compared and changed at the last look.
    pub last_tiles_examined: u32,
    pub last_tiles_changed: u32,
}

/// One GPU as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GpuInfo {
    pub index: u32,
    #[serde(rename = "type")]
    pub kind: GpuType,
    pub state: GpuStateName,
    pub displays: Vec<DisplayInfo>,
    /// VNC viewers connected now (all displays of the VM).
    pub viewers: u32,
    /// A passthrough GPU's device (`vfio-user /run/gpu.sock`, `VFIO 0000:01:00.0`),
    /// while the VM has one built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Why the GPU is in the Error state, where known (a passthrough device that stopped
    /// answering, a remote GPU's back end that is gone or broke the protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A remote GPU's back end (`unix:PATH` or `tcp:ADDR`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The power a passthrough GPU on a host device draws, in milliwatts, as its
    /// driver's hwmon reports it (`power1_average` or `power1_input`); none where the
    /// hardware reports none (never estimated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_mw: Option<u64>,
}

/// `GET /vm/gpus`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GpuList {
    pub gpus: Vec<GpuInfo>,
    /// What the GPU list was checked against (`--gpu-limits`).
    #[serde(default)]
    pub limits: GpuLimits,
    /// The VNC server's Unix socket, once the VM runs with a display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_socket: Option<String>,
    /// The TCP addresses VNC listens on (display by display; VNC authentication), if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vnc_tcp: Vec<String>,
}

/// `POST /vm/keyboard/type` body: text typed on the VM's virtio-input keyboard (US
/// layout: printable ASCII, tab and newline, at most [`MAX_TYPED`] characters).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TypeText {
    pub text: String,
}

/// The longest text one request types.
pub const MAX_TYPED: usize = 4096;

/// `POST /vm/keyboard/type` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Typed {
    /// Input events sent (key presses, releases and reports).
    pub events: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_argument_parses_or_says_what_is_wrong() {
        let c = GpuConfig::parse("emulated,width=640,height=480,displays=2")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.kind, c.width, c.height, c.displays),
            (GpuType::Emulated, 640, 480, 2)
        );
        let d = GpuConfig::parse("emulated").unwrap().unwrap();
        assert_eq!((d.width, d.height, d.displays), (1024, 768, 1));
        assert!(d.in_ram() && !d.is_bochs() && d.device.is_none());
        let b = GpuConfig::parse("emulated,device=bochs,width=800,height=600")
            .unwrap()
            .unwrap();
        assert!(b.is_bochs() && !b.in_ram());
        assert_eq!((b.width, b.height, b.displays), (800, 600, 1));
        let json = serde_json::to_string(&b).unwrap();
        assert!(json.contains(r#""device":"bochs""#), "{json}");
        assert_eq!(serde_json::from_str::<GpuConfig>(&json).unwrap(), b);
        assert!(!serde_json::to_string(&d).unwrap().contains("device"));
        let f = GpuConfig::parse("emulated,device=framebuffer")
            .unwrap()
            .unwrap();
        assert!(f.in_ram());
        assert_eq!(BOCHS_VRAM_BYTES, 32 << 20);
        assert_eq!(GpuConfig::parse("none").unwrap(), None);
        let v = GpuConfig::parse("virtio,displays=4").unwrap().unwrap();
        assert_eq!((v.kind, v.displays), (GpuType::Paravirt, 4));
        assert_eq!(
            GpuConfig::parse("paravirt").unwrap().unwrap().kind,
            GpuType::Paravirt
        );
        let r = GpuConfig::parse("remote,socket=/run/g.sock,displays=2")
            .unwrap()
            .unwrap();
        assert_eq!(
            r.remote_backend().unwrap(),
            RemoteBackend::Unix("/run/g.sock".into())
        );
        let t = GpuConfig::parse("remote,tcp=127.0.0.1:7000,token-file=/etc/t")
            .unwrap()
            .unwrap();
        assert_eq!(
            (t.remote_backend().unwrap(), t.token_file.as_deref()),
            (
                RemoteBackend::Tcp("127.0.0.1:7000".parse().unwrap()),
                Some("/etc/t")
            )
        );
        for (arg, msg) in [
            (
                "passthrough",
                "a passthrough GPU takes exactly one of vfio-user=SOCKET or host=BDF",
            ),
            (
                "passthrough,width=640",
                "'width=640': a passthrough GPU takes",
            ),
            (
                "passthrough,host=01:00.0,vfio-user=/s",
                "a passthrough GPU takes exactly one",
            ),
            (
                "passthrough,vfio-user=",
                "vfio-user: the socket path is empty",
            ),
            ("remote", "a remote GPU needs its back end"),
            (
                "remote,socket=/r/g.sock,token-file=/t",
                "takes no token-file",
            ),
            ("remote,tcp=127.0.0.1:7000", "needs token-file=FILE"),
            (
                "remote,tcp=localhost:7000,token-file=/t",
                "'localhost:7000' is not IP:PORT",
            ),
            ("virtio,socket=/r/g.sock", "a paravirt GPU has no back end"),
            ("vga", "unknown GPU type 'vga'"),
            ("emulated,width=641", "width 641 is not a multiple of 8"),
            (
                "emulated,width=4096",
                "width 4096 is not a multiple of 8 between",
            ),
            (
                "emulated,height=100",
                "height 100 is not between 200 and 2160",
            ),
            (
                "emulated,displays=17",
                "17 displays asked for; a GPU has 1 to 16",
            ),
            ("emulated,displays=0", "0 displays asked for"),
            ("emulated,displays=300", "255 displays asked for"),
            ("emulated,depth=8", "unknown key 'depth'"),
            ("emulated,width", "'width' is not KEY=VALUE"),
            ("emulated,width=x", "width 'x' is not a number"),
            ("none,width=640", "the type none takes no options"),
            (
                "emulated,device=vga",
                "unknown device 'vga' (known: framebuffer, bochs)",
            ),
            (
                "emulated,device=bochs,displays=2",
                "2 displays asked for; a Bochs display device drives exactly one",
            ),
            (
                "virtio,device=bochs",
                "a paravirt GPU has no device= choice",
            ),
            (
                "emulated,device=bochs,width=4000",
                "width 4000 is not a multiple of 8",
            ),
        ] {
            let e = GpuConfig::parse(arg).unwrap_err();
            assert!(e.contains(msg), "{arg}: {e}");
            assert!(e.starts_with(&format!("--gpu '{arg}'")), "{e}");
        }
    }

    #[test]
    fn the_bound_on_an_outside_device_is_settable_and_checked() {
        let c = GpuConfig::parse("passthrough,vfio-user=/run/gpu.sock,timeout-ms=500")
            .unwrap()
            .unwrap();
        assert_eq!(c.timeout_ms, Some(500));
        let c = GpuConfig::parse("passthrough,timeout-ms=700,host=0000:01:00.0")
            .unwrap()
            .unwrap();
        assert_eq!(c.timeout_ms, Some(700));
        let r = GpuConfig::parse("remote,socket=/run/g.sock,timeout-ms=1500")
            .unwrap()
            .unwrap();
        assert_eq!(r.timeout_ms, Some(1500));
        for (arg, msg) in [
            (
                "passthrough,vfio-user=/g.sock,timeout-ms=50",
                "timeout-ms 50 is out of range (100..=60000)",
            ),
            (
                "remote,socket=/g.sock,timeout-ms=70000",
                "timeout-ms 70000 is out of range",
            ),
            (
                "passthrough,vfio-user=/g.sock,timeout-ms=x",
                "timeout-ms 'x' is not a number",
            ),
            (
                "passthrough,timeout-ms=500",
                "exactly one of vfio-user=SOCKET or host=BDF",
            ),
            (
                "emulated,timeout-ms=500",
                "timeout-ms is for passthrough and remote GPUs",
            ),
        ] {
            let e = GpuConfig::parse(arg).unwrap_err();
            assert!(e.contains(msg), "{arg}: {e}");
        }
    }

    #[test]
    fn a_passthrough_gpu_names_its_device_and_has_no_displays_of_ours() {
        let c = GpuConfig::parse("passthrough,vfio-user=/run/gpu.sock")
            .unwrap()
            .unwrap();
        assert_eq!(
            c.passthrough,
            Some(PassthroughSource::VfioUser {
                socket: "/run/gpu.sock".into()
            })
        );
        assert_eq!((c.width, c.height, c.displays), (0, 0, 0));
        let h = GpuConfig::parse("passthrough,host=0000:01:00.0")
            .unwrap()
            .unwrap();
        assert_eq!(
            h.passthrough.as_ref().unwrap().to_string(),
            "host=0000:01:00.0"
        );
        // Eight passthrough GPUs and sixteen displays elsewhere fit.
        let e = GpuConfig::parse("emulated,width=320,height=200,displays=4")
            .unwrap()
            .unwrap();
        let mut all = vec![e; 4];
        all.extend(vec![c.clone(); 4]);
        assert!(check_gpus(&all, &GpuLimits::default()).is_ok());
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.contains(r#""passthrough":{"vfio_user":{"socket":"/run/gpu.sock"}}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<GpuConfig>(&json).unwrap(), c);
        let virtio = GpuConfig::parse("virtio").unwrap().unwrap();
        assert!(!serde_json::to_string(&virtio)
            .unwrap()
            .contains("passthrough"));
        let bad = GpuConfig {
            passthrough: None,
            ..c
        };
        assert!(bad.validate().unwrap_err().contains("needs its device"));
    }

    #[test]
    fn vm_wide_limits_name_the_count() {
        let d = GpuLimits::default();
        let g = GpuConfig::parse("emulated,width=320,height=200,displays=4")
            .unwrap()
            .unwrap();
        assert!(check_gpus(&vec![g.clone(); 4], &d).is_ok());
        assert_eq!(
            check_gpus(&vec![g.clone(); 5], &d).unwrap_err(),
            "20 displays asked for over all GPUs; the VM's limit is 16 \
             (--gpu-limits displays=N, up to 16)"
        );
        let one = GpuConfig {
            displays: 1,
            ..g.clone()
        };
        assert_eq!(
            check_gpus(&vec![one.clone(); 9], &d).unwrap_err(),
            "9 GPUs asked for; the VM's limit is 8 (--gpu-limits gpus=N, up to 16)"
        );
        let eight = GpuConfig {
            displays: 8,
            ..g.clone()
        };
        assert_eq!(
            check_gpus(std::slice::from_ref(&eight), &d).unwrap_err(),
            "GPU 0: 8 displays asked for; the VM's limit is 4 a GPU \
             (--gpu-limits displays-per-gpu=N, up to 16)"
        );
        let raised: GpuLimits = "displays-per-gpu=8".parse().unwrap();
        assert!(check_gpus(&[eight.clone(), eight.clone()], &raised).is_ok());
        let seventeen = GpuConfig { displays: 17, ..g };
        assert!(check_gpus(&[seventeen], &raised)
            .unwrap_err()
            .contains("a GPU has 1 to 16"));
        let bad = GpuConfig {
            kind: GpuType::Passthrough,
            ..one
        };
        // A passthrough GPU has no displays of ours: its own check names the GPU.
        assert!(check_gpus(&[bad], &d)
            .unwrap_err()
            .starts_with("GPU 0: a passthrough GPU has no displays of the VMM"));
    }

    #[test]
    fn gpu_limits_parse_with_defaults_and_refuse_what_the_devices_cannot_do() {
        let d = GpuLimits::default();
        assert_eq!((d.gpus, d.displays_per_gpu, d.displays), (8, 4, 16));
        let l: GpuLimits = "gpus=2,displays=3".parse().unwrap();
        assert_eq!((l.gpus, l.displays_per_gpu, l.displays), (2, 4, 3));
        for (arg, says) in [
            ("gpus=17", "GPU limit gpus=17 is out of range: 1 to 16"),
            (
                "displays=0",
                "GPU limit displays=0 is out of range: 1 to 16",
            ),
            (
                "displays-per-gpu=300",
                "displays-per-gpu=300: not a whole number",
            ),
            ("screens=2", "unknown GPU limit 'screens'"),
            ("gpus", "'gpus' is not KEY=N"),
        ] {
            let e = arg.parse::<GpuLimits>().unwrap_err();
            assert!(e.contains(says), "{arg}: {e}");
        }
        // A body with limits beyond the ceilings is refused by the check as well.
        let over = GpuLimits { gpus: 40, ..d };
        assert!(check_gpus(&[], &over).unwrap_err().contains("gpus=40"));
        let json: GpuLimits =
            serde_json::from_str(r#"{"gpus":1,"displays_per_gpu":2,"displays":2}"#).unwrap();
        assert_eq!(json.displays_per_gpu, 2);
        // What a body leaves out keeps its default.
        let one: GpuLimits = serde_json::from_str(r#"{"gpus":1}"#).unwrap();
        assert_eq!((one.gpus, one.displays_per_gpu, one.displays), (1, 4, 16));
        assert!(serde_json::from_str::<GpuLimits>(r#"{"screens":1}"#).is_err());
    }
}
