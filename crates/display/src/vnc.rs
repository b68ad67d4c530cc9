//! The VNC server of one VM: per display, a Unix socket for read-write viewers and one for
//! view-only viewers in the VM's directory, any number of viewers on each.
//!
//! Each viewer has two threads: one reads and checks its messages ([`rfb::read_message`]),
//! the other answers update requests. An incremental request is answered once something in
//! its rectangle changed: the viewer's thread compares the display, 64x64 tile by tile,
//! with what that viewer was last sent and sends the changed tiles. When the source tracks
//! what was written ([`FrameSource::damage`]: the dirty log of guest memory), only the
//! tiles written since the viewer's previous look are read and compared, and an idle
//! display is neither read nor compared; otherwise every tile is. A viewer that breaks
//! the protocol is logged and disconnected; the others and the VM carry on.
use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::auth::Password;
use crate::copyrect;
use crate::damage::TileSet;
use crate::rfb::{self, ClientMessage, PixelFormat, Rect, ResizeReason, ResizeStatus, Screen};
use crate::tight::{Tight, ENCODING_TIGHT};
use crate::zrle::{Zrle, ENCODING_ZRLE};
use crate::{DisplayGeometry, FrameSource};

pub use crate::damage::TILE;
/// How often a pending incremental request looks for a change.
const POLL: Duration = Duration::from_millis(10);
/// Most ExtendedDesktopSize answers a viewer may have waiting for an update request.
const MAX_REPLIES: usize = 64;
/// H.264 is lossy: a viewer gets it only if it also lists a quality level of at most this.
pub const H264_MAX_QUALITY: i32 = 5;
/// A viewer's H.264 stream: bits a second and most frames a second.
const H264_BITRATE: u64 = 4_000_000;
const H264_FPS: u32 = 30;
/// A viewer must finish the handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a viewer may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sees the display and sends keyboard and pointer input.
    ReadWrite,
    /// Sees the display; its input is ignored.
    ViewOnly,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::ReadWrite => "read-write",
            Role::ViewOnly => "view-only",
        }
    }
}

/// One viewer connected now and what it was sent ([`VncServer::traffic`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewerTraffic {
    /// The viewer's number (from 1, in order of arrival).
    pub viewer: u64,
    pub display: usize,
    pub role: Role,
    /// Framebuffer updates sent, and their bytes.
    pub updates: u64,
    pub bytes: u64,
}

/// Framebuffer updates sent to viewers: per display (every viewer since the server
/// started, those gone included: updates, bytes) and per viewer connected now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub displays: std::collections::BTreeMap<usize, (u64, u64)>,
    pub viewers: std::collections::BTreeMap<u64, ViewerTraffic>,
}

/// Where keyboard and pointer input from read-write viewers goes.
pub trait InputSink: Send + Sync {
    /// An X11 keysym pressed (`down`) or released.
    fn key(&self, down: bool, keysym: u32);
    /// The pointer at (`x`, `y`) on `display` with `buttons` held (bit 0 left, 1 middle,
    /// 2 right, 3 and 4 the wheel).
    fn pointer(&self, display: &DisplayGeometry, buttons: u8, x: u16, y: u16) {
        let _ = (display, buttons, x, y);
    }
}

/// Why a viewer's SetDesktopSize was refused: the status it is answered with and a reason
/// for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResizeRefusal {
    /// The display cannot change size (an emulated GPU's), or not now.
    Prohibited(String),
    /// The size is not one the display can take.
    Invalid(String),
}

impl ResizeRefusal {
    fn status(&self) -> ResizeStatus {
        match self {
            ResizeRefusal::Prohibited(_) => ResizeStatus::Prohibited,
            ResizeRefusal::Invalid(_) => ResizeStatus::InvalidLayout,
        }
    }

    fn reason(&self) -> &str {
        match self {
            ResizeRefusal::Prohibited(r) | ResizeRefusal::Invalid(r) => r,
        }
    }
}

/// Changes a display's size for a read-write viewer (ExtendedDesktopSize's
/// SetDesktopSize); checks everything before any effect.
pub trait DisplayResizer: Send + Sync {
    fn resize(&self, display: usize, width: u32, height: u32) -> Result<(), ResizeRefusal>;
}

/// Who asked for a display's last size change, so that viewers are told why it changed.
#[derive(Clone, Copy, Debug)]
struct Origin {
    /// The viewer that asked, or None for the server (`ray gpu resize`).
    viewer: Option<u64>,
    width: u32,
    height: u32,
}

/// The socket of display `display` for viewers of `role` in the VM directory `dir`.
pub fn socket_path(dir: &Path, display: usize, role: Role) -> PathBuf {
    match role {
        Role::ReadWrite => dir.join(format!("vnc-{display}.sock")),
        Role::ViewOnly => dir.join(format!("vnc-{display}-view.sock")),
    }
}

/// Counts viewers and tells the owner when the count changes.
pub type ViewerHook = Arc<dyn Fn(u32) + Send + Sync>;

struct Shared {
    source: Arc<dyn FrameSource>,
    input: Option<Arc<dyn InputSink>>,
    stop: AtomicBool,
    viewers: AtomicU32,
    on_viewers: ViewerHook,
    name: String,
    /// Changes displays' sizes for viewers; without one, SetDesktopSize is prohibited.
    resizer: Mutex<Option<Arc<dyn DisplayResizer>>>,
    /// Per display: who asked for its last size change.
    origins: Mutex<HashMap<usize, Origin>>,
    /// Numbers the viewers (for [`Origin`]).
    next_viewer: AtomicU64,
    /// What was sent to whom.
    traffic: Mutex<Traffic>,
}

impl Shared {
    fn traffic(&self) -> std::sync::MutexGuard<'_, Traffic> {
        self.traffic.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Viewer `viewer` of `display` was sent an update of `bytes`.
    fn sent(&self, viewer: u64, display: usize, bytes: usize) {
        let mut t = self.traffic();
        let d = t.displays.entry(display).or_default();
        d.0 += 1;
        d.1 += bytes as u64;
        if let Some(v) = t.viewers.get_mut(&viewer) {
            v.updates += 1;
            v.bytes += bytes as u64;
        }
    }

    fn note_origin(&self, display: usize, origin: Option<Origin>) -> Option<Origin> {
        let mut o = self.origins.lock().unwrap_or_else(|e| e.into_inner());
        match origin {
            Some(v) => o.insert(display, v),
            None => o.remove(&display),
        }
    }

    fn origin(&self, display: usize) -> Option<Origin> {
        let o = self.origins.lock().unwrap_or_else(|e| e.into_inner());
        o.get(&display).copied()
    }
}

/// A running VNC server; dropping it closes every socket and viewer.
pub struct VncServer {
    shared: Arc<Shared>,
    sockets: Vec<PathBuf>,
    /// The TCP addresses listened on, display by display.
    tcp: Vec<SocketAddr>,
    listeners: Vec<JoinHandle<()>>,
}

/// A viewer's connection: a Unix socket in the VM directory or TCP on loopback.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => (&*s).read(buf),
            Conn::Tcp(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => (&*s).write(buf),
            Conn::Tcp(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => (&*s).flush(),
            Conn::Tcp(s) => (&*s).flush(),
        }
    }
}

/// Where viewers come from.
enum Listener {
    Unix(UnixListener),
    /// Viewers must know the password.
    Tcp(TcpListener, Password),
}

impl Listener {
    fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l, _) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
        }
    }

    fn password(&self) -> Option<&Password> {
        match self {
            Listener::Unix(_) => None,
            Listener::Tcp(_, p) => Some(p),
        }
    }
}

/// Why the VNC server cannot listen on TCP.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error(
        "VNC on {0} would be reachable from other hosts: only loopback addresses (127.0.0.1, \
         ::1) are served, as other addresses need TLS, which rayvisor's VNC server does not have"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen for VNC viewers on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Refuses an address other hosts could reach (there is no TLS to protect it).
pub fn check_tcp_address(addr: SocketAddr) -> Result<(), TcpError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(TcpError::NotLoopback(addr))
    }
}

impl VncServer {
    /// Listens for viewers of every display of `source`.
    pub fn start(
        dir: &Path,
        name: &str,
        source: Arc<dyn FrameSource>,
        input: Option<Arc<dyn InputSink>>,
        on_viewers: ViewerHook,
    ) -> io::Result<VncServer> {
        let shared = Arc::new(Shared {
            source,
            input,
            stop: AtomicBool::new(false),
            viewers: AtomicU32::new(0),
            on_viewers,
            name: name.to_string(),
            resizer: Mutex::new(None),
            origins: Mutex::new(HashMap::new()),
            next_viewer: AtomicU64::new(1),
            traffic: Mutex::new(Traffic::default()),
        });
        let mut server = VncServer {
            shared: shared.clone(),
            sockets: Vec::new(),
            tcp: Vec::new(),
            listeners: Vec::new(),
        };
        for d in shared.source.displays() {
            for role in [Role::ReadWrite, Role::ViewOnly] {
                let path = socket_path(dir, d.index, role);
                let _ = std::fs::remove_file(&path);
                let listener = UnixListener::bind(&path)?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                server.sockets.push(path);
                server.spawn(Listener::Unix(listener), d.index, role)?;
            }
        }
        Ok(server)
    }

    fn spawn(&mut self, listener: Listener, index: usize, role: Role) -> io::Result<()> {
        let shared = self.shared.clone();
        // The VMM's log span (the VM's id) follows into every VNC thread.
        let span = tracing::Span::current();
        self.listeners.push(
            std::thread::Builder::new()
                .name(format!("vnc-{index}"))
                .spawn(move || {
                    // Its viewer threads inherit the filter.
                    ray_seccomp::enter(ray_seccomp::Kind::Display);
                    let _span = span.enter();
                    accept_loop(listener, shared, index, role)
                })?,
        );
        Ok(())
    }

    /// Also listens on TCP: display N on `addr`'s port + N (port 0: any free ports), for
    /// read-write viewers that know `password` (VNC authentication). Only loopback
    /// addresses are served. Returns the addresses, display by display.
    pub fn listen_tcp(
        &mut self,
        addr: SocketAddr,
        password: Password,
    ) -> Result<Vec<SocketAddr>, TcpError> {
        check_tcp_address(addr)?;
        for d in self.shared.source.displays() {
            let mut at = addr;
            if addr.port() != 0 {
                at.set_port(addr.port().saturating_add(d.index as u16));
            }
            let bind = |source| TcpError::Bind { addr: at, source };
            // Jailed, the keeper binds it in the host's network namespace.
            let listener = ray_outside::listen_tcp(at).map_err(bind)?;
            let local = listener.local_addr().map_err(bind)?;
            self.tcp.push(local);
            self.spawn(
                Listener::Tcp(listener, password.clone()),
                d.index,
                Role::ReadWrite,
            )
            .map_err(bind)?;
        }
        Ok(self.tcp.clone())
    }

    /// Lets read-write viewers change displays' sizes through `resizer`.
    pub fn set_resizer(&self, resizer: Arc<dyn DisplayResizer>) {
        *self
            .shared
            .resizer
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(resizer);
    }

    /// The server is about to change `display` to `width` x `height` (not a viewer):
    /// viewers are told so with ExtendedDesktopSize's reason "server".
    pub fn server_resize(&self, display: usize, width: u32, height: u32) {
        self.shared.note_origin(
            display,
            Some(Origin {
                viewer: None,
                width,
                height,
            }),
        );
    }

    /// The TCP addresses listened on, display by display.
    pub fn tcp_addresses(&self) -> &[SocketAddr] {
        &self.tcp
    }

    /// Updates sent per display and per viewer connected now.
    pub fn traffic(&self) -> Traffic {
        self.shared.traffic().clone()
    }

    /// Viewers connected now.
    pub fn viewers(&self) -> u32 {
        self.shared.viewers.load(Ordering::Relaxed)
    }

    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }
}

impl Drop for VncServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake each listener blocked in accept.
        for path in &self.sockets {
            let _ = UnixStream::connect(path);
        }
        for addr in &self.tcp {
            let _ = ray_outside::connect_tcp(*addr);
        }
        for t in self.listeners.drain(..) {
            let _ = t.join();
        }
        for path in &self.sockets {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn accept_loop(listener: Listener, shared: Arc<Shared>, screen: usize, role: Role) {
    let listener = Arc::new(listener);
    loop {
        let stream = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let shared = shared.clone();
        let listener = listener.clone();
        let span = tracing::Span::current();
        let spawned = std::thread::Builder::new()
            .name(format!("vnc-{screen}-viewer"))
            .spawn(move || {
                ray_seccomp::inherit(ray_seccomp::Kind::Display);
                let _span = span.enter();
                let n = shared.viewers.fetch_add(1, Ordering::SeqCst) + 1;
                (shared.on_viewers)(n);
                match serve_viewer(stream, &shared, screen, role, listener.password()) {
                    Ok(()) => tracing::info!(screen, ?role, "VNC viewer left"),
                    Err(e) => tracing::warn!(screen, ?role, "VNC viewer closed: {e}"),
                }
                let n = shared.viewers.fetch_sub(1, Ordering::SeqCst) - 1;
                (shared.on_viewers)(n);
            });
        if let Err(e) = spawned {
            tracing::warn!(screen, "cannot start a VNC viewer thread: {e}");
        }
    }
}

/// One viewer, from handshake to disconnect.
fn serve_viewer(
    stream: Conn,
    shared: &Shared,
    screen: usize,
    role: Role,
    password: Option<&Password>,
) -> Result<(), rfb::RfbError> {
    let geometry = shared
        .source
        .displays()
        .into_iter()
        .find(|d| d.index == screen)
        .ok_or_else(|| rfb::RfbError::Protocol(format!("display {screen} is gone")))?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut s = &stream;
    let name = format!("{} display {screen}", shared.name);
    rfb::handshake(
        &mut s,
        geometry.width as u16,
        geometry.height as u16,
        &name,
        password,
    )?;
    stream.set_read_timeout(None)?;
    tracing::info!(screen, ?role, "VNC viewer connected");

    let (tx, rx) = mpsc::channel();
    let reader_stream = stream.try_clone()?;
    let reader = std::thread::Builder::new()
        .name(format!("vnc-{screen}-read"))
        .spawn(move || {
            ray_seccomp::inherit(ray_seccomp::Kind::Display);
            let mut r = BufReader::new(&reader_stream);
            loop {
                match rfb::read_message(&mut r) {
                    Ok(m) => {
                        if tx.send(Ok(m)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        })?;
    let mut viewer = Viewer {
        geometry,
        role,
        format: PixelFormat::NATIVE,
        pending: None,
        last: None,
        frame: vec![0; geometry.bytes()],
        encoding: rfb::ENCODING_RAW,
        zrle: None,
        tight: None,
        h264: None,
        lossy: false,
        copyrect: false,
        copied: 0,
        frames: 0,
        sent: 0,
        desktop_size: false,
        extended: false,
        replies: Vec::new(),
        seen: 0,
        owed: None,
        id: shared.next_viewer.fetch_add(1, Ordering::Relaxed),
    };
    shared.traffic().viewers.insert(
        viewer.id,
        ViewerTraffic {
            viewer: viewer.id,
            display: screen,
            role,
            updates: 0,
            bytes: 0,
        },
    );
    let result = viewer.run(&stream, shared, &rx);
    shared.traffic().viewers.remove(&viewer.id);
    let encoding = match viewer.encoding {
        ENCODING_ZRLE => "zrle",
        ENCODING_TIGHT => "tight",
        rfb::ENCODING_OPEN_H264 => "h264",
        _ => "raw",
    };
    tracing::info!(
        screen,
        encoding,
        bytes = viewer.sent,
        copyrect = viewer.copied,
        h264_frames = viewer.frames,
        "VNC viewer's updates"
    );
    // Ends the reader too (its read fails).
    stream.shutdown();
    let _ = reader.join();
    result
}

struct Viewer {
    geometry: DisplayGeometry,
    role: Role,
    format: PixelFormat,
    /// The update request not answered yet.
    pending: Option<(bool, Rect)>,
    /// What this viewer was last sent of the whole display (native pixels), if anything.
    last: Option<Vec<u8>>,
    frame: Vec<u8>,
    /// The encoding the viewer prefers of those served (Raw, ZRLE or Tight).
    encoding: i32,
    /// Its ZRLE stream, once it asked for ZRLE (one zlib stream per connection).
    zrle: Option<Zrle>,
    /// Its Tight streams, once it asked for Tight (four zlib streams per connection).
    tight: Option<Tight>,
    /// The viewer takes CopyRect: scrolled bands go as copies of its own pixels.
    copyrect: bool,
    /// CopyRect rectangles sent.
    copied: u64,
    /// Its H.264 encoder, once it gets Open H.264 (a new one after a resize).
    h264: Option<crate::encode::H264Encoder>,
    /// The viewer listed a quality level low enough for lossy H.264.
    lossy: bool,
    /// H.264 frames sent.
    frames: u64,
    /// Bytes sent in framebuffer updates.
    sent: u64,
    /// The viewer takes DesktopSize (the display's size may change under it).
    desktop_size: bool,
    /// The viewer takes ExtendedDesktopSize (and may send SetDesktopSize).
    extended: bool,
    /// ExtendedDesktopSize rectangles owed to the viewer with the current size: the
    /// layout announcement and answers to its SetDesktopSize.
    replies: Vec<(ResizeReason, ResizeStatus)>,
    /// This viewer's number.
    id: u64,
    /// The source's damage generation this viewer last took ([`FrameSource::damage`]).
    seen: u64,
    /// Tiles written since they were last compared for this viewer; None while the source
    /// cannot tell (then every tile is compared).
    owed: Option<TileSet>,
}

impl Viewer {
    fn run(
        &mut self,
        stream: &Conn,
        shared: &Shared,
        rx: &mpsc::Receiver<Result<ClientMessage, rfb::RfbError>>,
    ) -> Result<(), rfb::RfbError> {
        let mut out = BufWriter::with_capacity(256 << 10, stream);
        loop {
            if shared.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            match rx.recv_timeout(POLL) {
                Ok(Ok(m)) => self.handle(m, shared)?,
                // A clean end of the stream is the viewer leaving.
                Ok(Err(rfb::RfbError::Io(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(())
                }
                Ok(Err(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if self.pending.is_some() {
                let mut msg = Vec::new();
                if self.update(shared, &mut msg)? {
                    out.write_all(&msg)?;
                    out.flush()?;
                    shared.sent(self.id, self.geometry.index, msg.len());
                }
            }
        }
    }

    fn handle(&mut self, m: ClientMessage, shared: &Shared) -> Result<(), rfb::RfbError> {
        match m {
            ClientMessage::SetPixelFormat(pf) => {
                self.format = pf;
                // Everything goes out again in the new format.
                self.last = None;
            }
            ClientMessage::SetEncodings(list) => {
                self.desktop_size = list.contains(&rfb::ENCODING_DESKTOP_SIZE);
                self.copyrect = list.contains(&rfb::ENCODING_COPYRECT);
                self.lossy = list.iter().any(|&e| {
                    (rfb::QUALITY_LEVEL_0..=rfb::QUALITY_LEVEL_0 + H264_MAX_QUALITY).contains(&e)
                });
                let g = self.geometry;
                // H.264 needs an even size (4:2:0) of at least 16x16.
                let h264 = self.lossy
                    && g.width.is_multiple_of(2)
                    && g.height.is_multiple_of(2)
                    && g.width >= 16
                    && g.height >= 16;
                let before = self.encoding;
                let extended = list.contains(&rfb::ENCODING_EXTENDED_DESKTOP_SIZE);
                if extended && !self.extended {
                    // The layout, so the viewer knows the server takes SetDesktopSize.
                    self.replies.push((ResizeReason::Server, ResizeStatus::Ok));
                }
                self.extended = extended;
                // The client lists its encodings best first; Raw is always understood.
                self.encoding = list
                    .into_iter()
                    .find(|&e| {
                        [rfb::ENCODING_RAW, ENCODING_ZRLE, ENCODING_TIGHT].contains(&e)
                            || (h264 && e == rfb::ENCODING_OPEN_H264)
                    })
                    .unwrap_or(rfb::ENCODING_RAW);
                // The viewer's pixels are not what H.264 was given: to or from it, the
                // whole picture goes again.
                let is_h264 = |e: i32| e == rfb::ENCODING_OPEN_H264;
                if is_h264(before) != is_h264(self.encoding) {
                    self.last = None;
                    self.h264 = None;
                }
            }
            ClientMessage::UpdateRequest { incremental, rect } => {
                let g = &self.geometry;
                let clipped = clip(rect, g.width as u16, g.height as u16).ok_or_else(|| {
                    rfb::RfbError::Protocol(format!(
                        "update request for {}x{} at ({}, {}) lies outside the {}x{} display",
                        rect.w, rect.h, rect.x, rect.y, g.width, g.height
                    ))
                })?;
                self.pending = Some((incremental, clipped));
            }
            ClientMessage::Key { down, keysym } => {
                if self.role == Role::ReadWrite {
                    if let Some(input) = &shared.input {
                        input.key(down, keysym);
                    }
                } else {
                    tracing::debug!(keysym, "key from a view-only viewer ignored");
                }
            }
            ClientMessage::Pointer { buttons, x, y } => {
                if self.role == Role::ReadWrite {
                    if let Some(input) = &shared.input {
                        input.pointer(&self.geometry, buttons, x, y);
                    }
                }
            }
            ClientMessage::CutText(_) => {}
            ClientMessage::SetDesktopSize {
                width,
                height,
                screens,
            } => {
                let status = match self.set_desktop_size(shared, width, height, &screens) {
                    Ok(changed) => {
                        tracing::info!(
                            display = self.geometry.index,
                            width,
                            height,
                            "a VNC viewer resized the display"
                        );
                        // A change is told with the new size once it shows.
                        (!changed).then_some(ResizeStatus::Ok)
                    }
                    Err(refusal) => {
                        tracing::info!(
                            display = self.geometry.index,
                            width,
                            height,
                            status = ?refusal.status(),
                            "a VNC viewer's SetDesktopSize refused: {}",
                            refusal.reason()
                        );
                        Some(refusal.status())
                    }
                };
                if let (Some(status), true) = (status, self.extended) {
                    if self.replies.len() >= MAX_REPLIES {
                        return Err(rfb::RfbError::Protocol(format!(
                            "more than {MAX_REPLIES} SetDesktopSize messages without an \
                             update request to answer them"
                        )));
                    }
                    self.replies.push((ResizeReason::ThisClient, status));
                }
            }
        }
        Ok(())
    }

    /// Checks a SetDesktopSize and, if the display can take it, has it resized. Ok(true)
    /// if the size changes.
    fn set_desktop_size(
        &mut self,
        shared: &Shared,
        width: u16,
        height: u16,
        screens: &[Screen],
    ) -> Result<bool, ResizeRefusal> {
        if self.role == Role::ViewOnly {
            return Err(ResizeRefusal::Prohibited(
                "a view-only viewer cannot change the display's size".into(),
            ));
        }
        check_layout(width, height, screens)?;
        let g = self.geometry;
        let (width, height) = (u32::from(width), u32::from(height));
        let Some(resizer) = shared
            .resizer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return Err(ResizeRefusal::Prohibited(
                "this display cannot change size".into(),
            ));
        };
        if (width, height) == (g.width, g.height) {
            return Ok(false);
        }
        let before = shared.note_origin(
            g.index,
            Some(Origin {
                viewer: Some(self.id),
                width,
                height,
            }),
        );
        resizer.resize(g.index, width, height).inspect_err(|_| {
            shared.note_origin(g.index, before);
        })?;
        Ok(true)
    }

    /// Writes the ExtendedDesktopSize rectangles owed to the viewer; how many.
    fn put_replies(&mut self, msg: &mut Vec<u8>) -> u16 {
        let g = self.geometry;
        let screen = Screen {
            id: g.index as u32,
            x: 0,
            y: 0,
            w: g.width as u16,
            h: g.height as u16,
            flags: 0,
        };
        let n = self.replies.len() as u16;
        for (reason, status) in self.replies.drain(..) {
            rfb::extended_desktop_size_rect(
                reason,
                status,
                g.width as u16,
                g.height as u16,
                &[screen],
                msg,
            );
        }
        n
    }

    /// Answers the pending request into `msg` if there is something to send.
    fn update(&mut self, shared: &Shared, msg: &mut Vec<u8>) -> Result<bool, rfb::RfbError> {
        let Some((incremental, rect)) = self.pending else {
            return Ok(false);
        };
        if let Some(reason) = self.resized(shared)? {
            if self.extended {
                self.replies.push((reason, ResizeStatus::Ok));
                let mut rects = Vec::new();
                let n = self.put_replies(&mut rects);
                rfb::update_header(n, msg);
                msg.extend_from_slice(&rects);
            } else {
                rfb::update_header(1, msg);
                rfb::rect_header(full(&self.geometry), rfb::ENCODING_DESKTOP_SIZE, msg);
            }
            self.pending = None;
            return Ok(true);
        }
        self.take_damage(shared);
        let g = self.geometry;
        // Nothing written where the viewer looks: no read, no compare.
        if let (Some(owed), Some(_), true) = (&self.owed, &self.last, incremental) {
            let look = if self.encoding == rfb::ENCODING_OPEN_H264 {
                full(&g)
            } else {
                rect
            };
            if !owed.touches(look) && self.replies.is_empty() {
                return Ok(false);
            }
        }
        if !shared.source.read(self.geometry.index, &mut self.frame) {
            return Ok(false);
        }
        let stride = g.stride as usize;
        if self.encoding == rfb::ENCODING_OPEN_H264 {
            return self.update_h264(shared, incremental, msg);
        }
        let mut bands = Vec::new();
        let index = g.index;
        let rects = match (&mut self.last, incremental) {
            (Some(last), true) => {
                let look = compare(last, &self.frame, stride, rect, self.owed.as_ref());
                let mut rects = look.rects;
                shared
                    .source
                    .note_compare(index, look.examined, look.changed);
                // Scrolled bands (whole lines) go as copies of what the viewer has; the
                // model applies the same copies, then the rest is compared again.
                if self.copyrect && !rects.is_empty() && rect == full(&g) {
                    let (w, h) = (g.width as u16, g.height as u16);
                    bands = copyrect::find_scroll(last, &self.frame, stride, w, h);
                    if !bands.is_empty() {
                        for b in &bands {
                            copyrect::apply(last, stride, w, *b);
                            // The copy changed the model there: compare those tiles too.
                            if let Some(o) = &mut self.owed {
                                o.insert_rect(Rect {
                                    x: 0,
                                    y: b.y,
                                    w,
                                    h: b.h,
                                });
                            }
                        }
                        let again = compare(last, &self.frame, stride, rect, self.owed.as_ref());
                        shared
                            .source
                            .note_compare(index, again.examined, again.changed);
                        rects = again.rects;
                    }
                }
                rects
            }
            _ => vec![rect],
        };
        // Every tile inside the request was compared or is sent whole.
        if let Some(o) = &mut self.owed {
            o.remove_within(rect, g.width, g.height);
        }
        if rects.is_empty() && bands.is_empty() && self.replies.is_empty() {
            return Ok(false);
        }
        let mut body = Vec::new();
        let mut count = usize::from(self.put_replies(&mut body)) + bands.len();
        for b in &bands {
            copyrect::put(*b, g.width as u16, &mut body);
        }
        self.copied += bands.len() as u64;
        for r in &rects {
            match self.encoding {
                ENCODING_ZRLE => {
                    let z = self.zrle.get_or_insert_with(Zrle::default);
                    z.rect(&self.frame, stride, *r, self.format, &mut body);
                    count += 1;
                }
                ENCODING_TIGHT => {
                    let t = self.tight.get_or_insert_with(Tight::default);
                    count += usize::from(t.rects(&self.frame, stride, *r, self.format, &mut body));
                }
                _ => {
                    rfb::raw_rect(&self.frame, stride, *r, self.format, &mut body);
                    count += 1;
                }
            }
        }
        let count = u16::try_from(count).map_err(|_| {
            rfb::RfbError::Protocol(format!(
                "an update of {count} rectangles does not fit a FramebufferUpdate"
            ))
        })?;
        rfb::update_header(count, msg);
        msg.extend_from_slice(&body);
        self.sent += msg.len() as u64;
        match &mut self.last {
            Some(last) => {
                for r in &rects {
                    copy_rect(&self.frame, last, stride, *r);
                }
            }
            None if rect == full(&g) => self.last = Some(self.frame.clone()),
            None => {}
        }
        self.pending = None;
        Ok(true)
    }

    /// Answers the pending request of an H.264 viewer: the whole display as one Open H.264
    /// rectangle when it changed (its first with the reset flag and a key frame).
    fn update_h264(
        &mut self,
        shared: &Shared,
        incremental: bool,
        msg: &mut Vec<u8>,
    ) -> Result<bool, rfb::RfbError> {
        let g = self.geometry;
        let stride = g.stride as usize;
        let changed = match (&self.last, incremental) {
            (Some(last), true) => {
                let look = compare(last, &self.frame, stride, full(&g), self.owed.as_ref());
                shared
                    .source
                    .note_compare(g.index, look.examined, look.changed);
                !look.rects.is_empty()
            }
            _ => true,
        };
        if !changed && self.replies.is_empty() {
            return Ok(false);
        }
        let mut body = Vec::new();
        let mut count = self.put_replies(&mut body);
        if changed {
            let reset = self.h264.is_none();
            let encoder = match &mut self.h264 {
                Some(e) => e,
                None => self.h264.insert(
                    crate::encode::H264Encoder::new(g.width, g.height, H264_BITRATE, H264_FPS)
                        .map_err(rfb::RfbError::Protocol)?,
                ),
            };
            if reset {
                encoder.force_keyframe();
            }
            let mut au = Vec::new();
            encoder
                .encode(&self.frame, stride, &mut au)
                .map_err(rfb::RfbError::Protocol)?;
            if !au.is_empty() {
                let (w, h) = encoder.size();
                let r = Rect {
                    x: 0,
                    y: 0,
                    w: w as u16,
                    h: h as u16,
                };
                rfb::rect_header(r, rfb::ENCODING_OPEN_H264, &mut body);
                body.extend_from_slice(&(au.len() as u32).to_be_bytes());
                let flags = if reset { rfb::H264_RESET_CONTEXT } else { 0 };
                body.extend_from_slice(&flags.to_be_bytes());
                body.extend_from_slice(&au);
                count += 1;
                self.frames += 1;
                match &mut self.last {
                    Some(last) => last.copy_from_slice(&self.frame),
                    None => self.last = Some(self.frame.clone()),
                }
                if let Some(o) = &mut self.owed {
                    o.remove_within(full(&g), g.width, g.height);
                }
            } else if reset {
                // Skipped by the rate control before any picture: start again next time.
                self.h264 = None;
            }
        } else if let Some(o) = &mut self.owed {
            // Compared: nothing changed.
            o.remove_within(full(&g), g.width, g.height);
        }
        // A frame the rate control skipped is offered again at the next poll.
        if count == 0 {
            return Ok(false);
        }
        rfb::update_header(count, msg);
        msg.extend_from_slice(&body);
        self.sent += msg.len() as u64;
        self.pending = None;
        Ok(true)
    }

    /// Takes what the source knows was written since this viewer's last look into `owed`.
    fn take_damage(&mut self, shared: &Shared) {
        let g = self.geometry;
        match shared.source.damage(g.index, self.seen) {
            Some(d) if d.tiles.grid() == TileSet::empty(g.width, g.height).grid() => {
                self.seen = d.generation;
                match &mut self.owed {
                    Some(o) => {
                        o.union(&d.tiles);
                    }
                    None => self.owed = Some(d.tiles),
                }
            }
            _ => {
                self.seen = 0;
                self.owed = None;
            }
        }
    }

    /// Whether the display changed its size since this viewer last looked, and why: then
    /// the viewer takes the new one (ExtendedDesktopSize or DesktopSize) or, if it cannot,
    /// is closed.
    fn resized(&mut self, shared: &Shared) -> Result<Option<ResizeReason>, rfb::RfbError> {
        let g = self.geometry;
        let Some(now) = shared
            .source
            .displays()
            .into_iter()
            .find(|d| d.index == g.index)
        else {
            return Ok(None);
        };
        if (now.width, now.height, now.stride) == (g.width, g.height, g.stride) {
            return Ok(None);
        }
        if !self.desktop_size && !self.extended {
            return Err(rfb::RfbError::Protocol(format!(
                "display {} changed to {}x{} and the viewer does not take DesktopSize",
                g.index, now.width, now.height
            )));
        }
        let reason = match shared.origin(g.index) {
            Some(o) if (o.width, o.height) == (now.width, now.height) => match o.viewer {
                Some(v) if v == self.id => ResizeReason::ThisClient,
                Some(_) => ResizeReason::OtherClient,
                None => ResizeReason::Server,
            },
            _ => ResizeReason::Server,
        };
        tracing::info!(
            display = g.index,
            now.width,
            now.height,
            ?reason,
            "display resized"
        );
        self.geometry = now;
        self.frame = vec![0; now.bytes()];
        self.last = None;
        self.h264 = None;
        self.seen = 0;
        self.owed = None;
        Ok(Some(reason))
    }
}

/// Checks a SetDesktopSize layout: a display is one screen, which covers the framebuffer
/// (whether the display takes the size is its resizer's to say).
pub fn check_layout(width: u16, height: u16, screens: &[Screen]) -> Result<(), ResizeRefusal> {
    let [s] = screens else {
        return Err(ResizeRefusal::Invalid(format!(
            "{} screens: a display is one screen",
            screens.len()
        )));
    };
    if (s.x, s.y, s.w, s.h) != (0, 0, width, height) {
        return Err(ResizeRefusal::Invalid(format!(
            "the screen ({}x{} at {}, {}) does not cover the {width}x{height} framebuffer",
            s.w, s.h, s.x, s.y
        )));
    }
    Ok(())
}

fn full(g: &DisplayGeometry) -> Rect {
    Rect {
        x: 0,
        y: 0,
        w: g.width as u16,
        h: g.height as u16,
    }
}

/// `r` cut to a `w` x `h` display; None if nothing of it is inside or it is empty.
fn clip(r: Rect, w: u16, h: u16) -> Option<Rect> {
    if r.x >= w || r.y >= h || r.w == 0 || r.h == 0 {
        return None;
    }
    Some(Rect {
        x: r.x,
        y: r.y,
        w: r.w.min(w - r.x),
        h: r.h.min(h - r.y),
    })
}

fn copy_rect(from: &[u8], to: &mut [u8], stride: usize, r: Rect) {
    for y in r.y..r.y + r.h {
        let a = usize::from(y) * stride + usize::from(r.x) * 4;
        let b = a + usize::from(r.w) * 4;
        to[a..b].copy_from_slice(&from[a..b]);
    }
}

/// What one look at a display found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Look {
    /// Changed tiles, runs in a tile row merged.
    pub rects: Vec<Rect>,
    /// Tiles compared.
    pub examined: u32,
    /// Tiles that differed.
    pub changed: u32,
}

/// Compares `within` of `prev` and `cur`: only the tiles of `owed` (of the display's
/// [`TILE`] grid) if given, else every tile.
pub fn compare(
    prev: &[u8],
    cur: &[u8],
    stride: usize,
    within: Rect,
    owed: Option<&TileSet>,
) -> Look {
    let Some(owed) = owed else {
        let rects = changed_tiles(prev, cur, stride, within);
        let examined = u32::from(within.w.div_ceil(TILE)) * u32::from(within.h.div_ceil(TILE));
        let changed = rects.iter().map(|r| u32::from(r.w.div_ceil(TILE))).sum();
        return Look {
            rects,
            examined,
            changed,
        };
    };
    changed_tiles_among(prev, cur, stride, within, owed)
}

/// The tiles of the grid in `tiles` (cut to `within`) where `cur` differs from `prev`,
/// runs of adjacent changed tiles in a tile row merged.
pub fn changed_tiles_among(
    prev: &[u8],
    cur: &[u8],
    stride: usize,
    within: Rect,
    tiles: &TileSet,
) -> Look {
    let mut look = Look::default();
    if within.w == 0 || within.h == 0 {
        return look;
    }
    let t = u32::from(TILE);
    let (x_end, y_end) = (
        u32::from(within.x) + u32::from(within.w),
        u32::from(within.y) + u32::from(within.h),
    );
    for row in u32::from(within.y) / t..=(y_end - 1) / t {
        let y0 = (row * t).max(u32::from(within.y));
        let y1 = ((row + 1) * t).min(y_end);
        let mut run: Option<Rect> = None;
        for col in u32::from(within.x) / t..=(x_end - 1) / t {
            if !tiles.contains(col, row) {
                look.rects.extend(run.take());
                continue;
            }
            let x0 = (col * t).max(u32::from(within.x));
            let x1 = ((col + 1) * t).min(x_end);
            look.examined += 1;
            let changed = (y0..y1).any(|y| {
                let a = y as usize * stride + x0 as usize * 4;
                let b = y as usize * stride + x1 as usize * 4;
                prev[a..b] != cur[a..b]
            });
            if !changed {
                look.rects.extend(run.take());
                continue;
            }
            look.changed += 1;
            match &mut run {
                Some(r) => r.w += (x1 - x0) as u16,
                None => {
                    run = Some(Rect {
                        x: x0 as u16,
                        y: y0 as u16,
                        w: (x1 - x0) as u16,
                        h: (y1 - y0) as u16,
                    })
                }
            }
        }
        look.rects.extend(run);
    }
    look
}

/// The tiles of `within` where `cur` differs from `prev` (native pixels, `stride` bytes a
/// line), with runs of changed tiles in a tile row merged into one rectangle.
pub fn changed_tiles(prev: &[u8], cur: &[u8], stride: usize, within: Rect) -> Vec<Rect> {
    let mut out = Vec::new();
    let (x_end, y_end) = (within.x + within.w, within.y + within.h);
    let mut ty = within.y;
    while ty < y_end {
        let th = TILE.min(y_end - ty);
        let mut run: Option<Rect> = None;
        let mut tx = within.x;
        while tx < x_end {
            let tw = TILE.min(x_end - tx);
            let changed = (ty..ty + th).any(|y| {
                let a = usize::from(y) * stride + usize::from(tx) * 4;
                let b = a + usize::from(tw) * 4;
                prev[a..b] != cur[a..b]
            });
            match (&mut run, changed) {
                (Some(r), true) => r.w += tw,
                (None, true) => {
                    run = Some(Rect {
                        x: tx,
                        y: ty,
                        w: tw,
                        h: th,
                    })
                }
                (Some(_), false) => out.extend(run.take()),
                (None, false) => {}
            }
            tx += tw;
        }
        out.extend(run);
        ty += th;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::Mutex;

    #[test]
    fn only_owed_tiles_are_compared_on_the_display_grid() {
        let (w, h) = (200u16, 130u16);
        let stride = usize::from(w) * 4;
        let prev = vec![0u8; stride * usize::from(h)];
        let mut cur = prev.clone();
        // Changes in tiles (0,0), (1,0) and (3,2).
        cur[10 * stride + 4 * 5] = 1;
        cur[63 * stride + 4 * 100] = 1;
        cur[129 * stride + 4 * 199 + 2] = 1;
        let all = Rect { x: 0, y: 0, w, h };
        // Without owed tiles: all 12 compared, as changed_tiles does.
        let every = compare(&prev, &cur, stride, all, None);
        assert_eq!((every.examined, every.changed), (12, 3));
        assert_eq!(every.rects, changed_tiles(&prev, &cur, stride, all));
        // Owed (0,0), (1,0) and (2,1): three compared, two changed and merged; the change
        // in (3,2) is not owed, so not looked at.
        let mut owed = TileSet::empty(200, 130);
        owed.insert(0, 0);
        owed.insert(1, 0);
        owed.insert(2, 1);
        let look = compare(&prev, &cur, stride, all, Some(&owed));
        assert_eq!((look.examined, look.changed), (3, 2));
        assert_eq!(
            look.rects,
            vec![Rect {
                x: 0,
                y: 0,
                w: 128,
                h: 64
            }]
        );
        // A request not on the grid: tiles are cut to it, still on the display's grid.
        let part = Rect {
            x: 100,
            y: 5,
            w: 10,
            h: 100,
        };
        let look = compare(&prev, &cur, stride, part, Some(&owed));
        assert_eq!(
            (look.examined, look.changed),
            (1, 1),
            "only (1,0) is owed there"
        );
        assert_eq!(
            look.rects,
            vec![Rect {
                x: 100,
                y: 5,
                w: 10,
                h: 59
            }]
        );
        // Nothing owed: nothing compared.
        let none = compare(&prev, &cur, stride, all, Some(&TileSet::empty(200, 130)));
        assert_eq!(none, Look::default());
    }

    #[test]
    fn changed_tiles_finds_and_merges_changes() {
        let (w, h) = (200u16, 130u16);
        let stride = usize::from(w) * 4;
        let prev = vec![0u8; stride * usize::from(h)];
        let mut cur = prev.clone();
        let all = Rect { x: 0, y: 0, w, h };
        assert!(changed_tiles(&prev, &cur, stride, all).is_empty());
        // Pixels in tiles (0,0), (1,0) and (3,2).
        cur[10 * stride + 4 * 5] = 1;
        cur[63 * stride + 4 * 100] = 1;
        cur[129 * stride + 4 * 199 + 2] = 1;
        assert_eq!(
            changed_tiles(&prev, &cur, stride, all),
            vec![
                Rect {
                    x: 0,
                    y: 0,
                    w: 128,
                    h: 64
                },
                Rect {
                    x: 192,
                    y: 128,
                    w: 8,
                    h: 2
                }
            ]
        );
        // Only what lies inside the requested rectangle counts.
        let part = Rect {
            x: 64,
            y: 0,
            w: 100,
            h: 100,
        };
        assert_eq!(
            changed_tiles(&prev, &cur, stride, part),
            vec![Rect {
                x: 64,
                y: 0,
                w: 64,
                h: 64
            }]
        );
        assert_eq!(
            clip(
                Rect {
                    x: 190,
                    y: 0,
                    w: 50,
                    h: 500
                },
                w,
                h
            ),
            Some(Rect {
                x: 190,
                y: 0,
                w: 10,
                h: 130
            })
        );
        assert_eq!(
            clip(
                Rect {
                    x: 200,
                    y: 0,
                    w: 1,
                    h: 1
                },
                w,
                h
            ),
            None
        );
    }

    struct Fake {
        g: DisplayGeometry,
        pixels: Mutex<Vec<u8>>,
    }
    impl FrameSource for Fake {
        fn displays(&self) -> Vec<DisplayGeometry> {
            vec![self.g]
        }
        fn read(&self, index: usize, out: &mut [u8]) -> bool {
            index == 0 && {
                out.copy_from_slice(&self.pixels.lock().unwrap());
                true
            }
        }
    }

    struct Keys(Mutex<Vec<u32>>);
    impl InputSink for Keys {
        fn key(&self, down: bool, keysym: u32) {
            if down {
                self.0.lock().unwrap().push(keysym);
            }
        }
        fn pointer(&self, _: &DisplayGeometry, buttons: u8, x: u16, y: u16) {
            self.0
                .lock()
                .unwrap()
                .push(u32::from_be_bytes([0xee, buttons, x as u8, y as u8]));
        }
    }

    fn connect(path: &Path) -> UnixStream {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut v = [0u8; 12];
        s.read_exact(&mut v).unwrap();
        s.write_all(b"RFB 003.008\n").unwrap();
        let mut types = [0u8; 2];
        s.read_exact(&mut types).unwrap();
        s.write_all(&[1]).unwrap();
        let mut result = [0u8; 4];
        s.read_exact(&mut result).unwrap();
        s.write_all(&[1]).unwrap();
        let mut init = [0u8; 24];
        s.read_exact(&mut init).unwrap();
        let mut name = vec![0u8; u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize];
        s.read_exact(&mut name).unwrap();
        s
    }

    fn request(s: &mut UnixStream, incremental: bool, w: u16, h: u16) -> Vec<u8> {
        let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
        m.extend_from_slice(&w.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        s.write_all(&m).unwrap();
        let mut hdr = [0u8; 4];
        s.read_exact(&mut hdr).unwrap();
        let n = u16::from_be_bytes([hdr[2], hdr[3]]);
        let mut pixels = Vec::new();
        for _ in 0..n {
            let mut r = [0u8; 12];
            s.read_exact(&mut r).unwrap();
            let rw = u16::from_be_bytes([r[4], r[5]]);
            let rh = u16::from_be_bytes([r[6], r[7]]);
            let mut px = vec![0u8; usize::from(rw) * usize::from(rh) * 4];
            s.read_exact(&mut px).unwrap();
            pixels.extend(px);
        }
        pixels
    }

    #[test]
    fn viewers_get_updates_roles_and_a_bad_viewer_goes_alone() {
        let dir = std::env::temp_dir().join(format!("ray-vnc-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let g = DisplayGeometry {
            index: 0,
            gpu: 0,
            gpa: 0,
            width: 16,
            height: 8,
            stride: 64,
        };
        let src = Arc::new(Fake {
            g,
            pixels: Mutex::new(vec![7; 16 * 8 * 4]),
        });
        let keys = Arc::new(Keys(Mutex::new(Vec::new())));
        let counts = Arc::new(Mutex::new(Vec::new()));
        let c2 = counts.clone();
        let server = VncServer::start(
            &dir,
            "t",
            src.clone(),
            Some(keys.clone()),
            Arc::new(move |n| c2.lock().unwrap().push(n)),
        )
        .unwrap();
        let mut rw = connect(&socket_path(&dir, 0, Role::ReadWrite));
        let mut ro = connect(&socket_path(&dir, 0, Role::ViewOnly));
        assert_eq!(request(&mut rw, false, 16, 8), vec![7; 512]);
        assert_eq!(request(&mut ro, false, 16, 8), vec![7; 512]);
        // A change reaches an incremental request: only the changed tile's pixels.
        src.pixels.lock().unwrap()[0] = 9;
        let got = request(&mut rw, true, 16, 8);
        assert_eq!((got.len(), got[0]), (512, 9));
        // Keys: the read-write viewer's arrive, the view-only viewer's do not.
        ro.write_all(&[4, 1, 0, 0, 0, 0, 0, b'x']).unwrap();
        rw.write_all(&[4, 1, 0, 0, 0, 0, 0, b'y']).unwrap();
        // So does the pointer.
        ro.write_all(&[5, 1, 0, 1, 0, 1]).unwrap();
        rw.write_all(&[5, 4, 0, 2, 0, 3]).unwrap();
        // A garbage viewer is dropped; the others go on.
        let mut bad = connect(&socket_path(&dir, 0, Role::ReadWrite));
        bad.write_all(&[0xee; 16]).unwrap();
        let mut sink = Vec::new();
        let _ = bad.read_to_end(&mut sink);
        src.pixels.lock().unwrap()[4] = 3;
        assert_eq!(request(&mut ro, true, 16, 8)[4], 3);
        assert_eq!(
            *keys.0.lock().unwrap(),
            vec![u32::from(b'y'), u32::from_be_bytes([0xee, 4, 2, 3])]
        );
        drop(server);
        assert!(!socket_path(&dir, 0, Role::ReadWrite).exists());
        assert!(counts.lock().unwrap().iter().max() >= Some(&2));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod resize_tests {
    use super::*;
    use std::sync::Mutex;

    /// A display whose size the test changes.
    struct Resizable(Mutex<DisplayGeometry>);
    impl FrameSource for Resizable {
        fn displays(&self) -> Vec<DisplayGeometry> {
            vec![*self.0.lock().unwrap()]
        }
        fn read(&self, _: usize, out: &mut [u8]) -> bool {
            out.len() == self.0.lock().unwrap().bytes() && {
                out.fill(5);
                true
            }
        }
    }

    fn geometry(width: u32, height: u32) -> DisplayGeometry {
        DisplayGeometry {
            index: 0,
            gpu: 0,
            gpa: 0,
            width,
            height,
            stride: width * 4,
        }
    }

    #[test]
    fn a_resize_reaches_desktop_size_viewers_and_closes_the_others() {
        let src = Arc::new(Resizable(Mutex::new(geometry(8, 4))));
        let shared = Shared {
            source: src.clone(),
            input: None,
            stop: AtomicBool::new(false),
            viewers: AtomicU32::new(0),
            on_viewers: Arc::new(|_| {}),
            name: "t".into(),
            resizer: Mutex::new(None),
            origins: Mutex::new(HashMap::new()),
            next_viewer: AtomicU64::new(1),
            traffic: Mutex::new(Traffic::default()),
        };
        let viewer = |desktop_size| Viewer {
            geometry: geometry(8, 4),
            role: Role::ViewOnly,
            format: PixelFormat::NATIVE,
            pending: None,
            last: None,
            frame: vec![0; 8 * 4 * 4],
            encoding: rfb::ENCODING_RAW,
            zrle: None,
            tight: None,
            h264: None,
            lossy: false,
            copyrect: false,
            copied: 0,
            frames: 0,
            sent: 0,
            desktop_size,
            extended: false,
            replies: Vec::new(),
            id: 1,
            seen: 0,
            owed: None,
        };
        let all = Rect {
            x: 0,
            y: 0,
            w: 8,
            h: 4,
        };
        let mut v = viewer(true);
        v.pending = Some((false, all));
        let mut msg = Vec::new();
        assert!(v.update(&shared, &mut msg).unwrap());
        assert_eq!(msg.len(), 4 + 12 + 8 * 4 * 4);
        *src.0.lock().unwrap() = geometry(16, 2);
        v.pending = Some((true, all));
        msg.clear();
        assert!(v.update(&shared, &mut msg).unwrap());
        let mut want = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 16, 0, 2];
        want.extend_from_slice(&rfb::ENCODING_DESKTOP_SIZE.to_be_bytes());
        assert_eq!(msg, want);
        // Then the whole new display.
        v.pending = Some((
            false,
            Rect {
                x: 0,
                y: 0,
                w: 16,
                h: 2,
            },
        ));
        msg.clear();
        assert!(v.update(&shared, &mut msg).unwrap());
        assert_eq!(msg.len(), 4 + 12 + 16 * 2 * 4);

        let mut old = viewer(false);
        old.pending = Some((false, all));
        let e = old
            .update(&shared, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not take DesktopSize"), "{e}");
    }
}

#[cfg(test)]
mod tcp_tests {
    use super::*;
    use std::sync::Mutex;

    struct Blank(DisplayGeometry);
    impl FrameSource for Blank {
        fn displays(&self) -> Vec<DisplayGeometry> {
            vec![self.0]
        }
        fn read(&self, _: usize, out: &mut [u8]) -> bool {
            out.fill(0);
            true
        }
    }

    #[test]
    fn tcp_is_loopback_only_and_needs_the_password() {
        let dir = std::env::temp_dir().join(format!("ray-vnc-tcp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let g = DisplayGeometry {
            index: 0,
            gpu: 0,
            gpa: 0,
            width: 8,
            height: 8,
            stride: 32,
        };
        let counts = Arc::new(Mutex::new(Vec::new()));
        let c2 = counts.clone();
        let mut server = VncServer::start(
            &dir,
            "t",
            Arc::new(Blank(g)),
            None,
            Arc::new(move |n| c2.lock().unwrap().push(n)),
        )
        .unwrap();
        let pw = Password::new(b"pw");
        let e = server
            .listen_tcp("0.0.0.0:0".parse().unwrap(), pw.clone())
            .unwrap_err();
        assert!(e.to_string().contains("only loopback addresses"), "{e}");
        let addrs = server
            .listen_tcp("127.0.0.1:0".parse().unwrap(), pw.clone())
            .unwrap();
        assert_eq!(addrs.len(), 1);
        // The right answer to the challenge gets ServerInit; a wrong one a failure.
        for (password, ok) in [(pw.clone(), true), (Password::new(b"nope"), false)] {
            let mut s = TcpStream::connect(addrs[0]).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut v = [0u8; 12];
            s.read_exact(&mut v).unwrap();
            s.write_all(b"RFB 003.008\n").unwrap();
            let mut types = [0u8; 2];
            s.read_exact(&mut types).unwrap();
            assert_eq!(types, [1, rfb::SECURITY_VNC_AUTH]);
            s.write_all(&[rfb::SECURITY_VNC_AUTH]).unwrap();
            let mut challenge = [0u8; 16];
            s.read_exact(&mut challenge).unwrap();
            s.write_all(&password.response(&challenge)).unwrap();
            let mut result = [0u8; 4];
            s.read_exact(&mut result).unwrap();
            assert_eq!(result == [0; 4], ok);
            if ok {
                s.write_all(&[1]).unwrap();
                let mut init = [0u8; 4];
                s.read_exact(&mut init).unwrap();
                assert_eq!(init, [0, 8, 0, 8]);
            } else {
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
                assert!(rest.ends_with(b"authentication failed"));
            }
        }
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod extended_tests {
    use super::*;
    use std::io::Read;

    /// A display the resizer (or the test, as the server) changes.
    struct Screen0(Mutex<DisplayGeometry>);
    impl FrameSource for Screen0 {
        fn displays(&self) -> Vec<DisplayGeometry> {
            vec![*self.0.lock().unwrap()]
        }
        fn read(&self, _: usize, out: &mut [u8]) -> bool {
            out.len() == self.0.lock().unwrap().bytes() && {
                out.fill(1);
                true
            }
        }
    }
    impl Screen0 {
        fn set(&self, width: u32, height: u32) {
            let mut g = self.0.lock().unwrap();
            g.width = width;
            g.height = height;
            g.stride = width * 4;
        }
    }
    struct Resizer(Arc<Screen0>);
    impl DisplayResizer for Resizer {
        fn resize(&self, _: usize, width: u32, height: u32) -> Result<(), ResizeRefusal> {
            if width > 100 {
                return Err(ResizeRefusal::Invalid(format!("width {width} > 100")));
            }
            self.0.set(width, height);
            Ok(())
        }
    }

    fn connect(path: &Path) -> UnixStream {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut v = [0u8; 12];
        s.read_exact(&mut v).unwrap();
        s.write_all(b"RFB 003.008\n").unwrap();
        let mut b = [0u8; 6];
        s.read_exact(&mut b[..2]).unwrap();
        s.write_all(&[1]).unwrap();
        s.read_exact(&mut b[..4]).unwrap();
        s.write_all(&[1]).unwrap();
        let mut init = [0u8; 24];
        s.read_exact(&mut init).unwrap();
        let mut name = vec![0u8; u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize];
        s.read_exact(&mut name).unwrap();
        // Raw and ExtendedDesktopSize.
        let mut m = vec![2, 0, 0, 2, 0, 0, 0, 0];
        m.extend_from_slice(&rfb::ENCODING_EXTENDED_DESKTOP_SIZE.to_be_bytes());
        s.write_all(&m).unwrap();
        s
    }

    /// An ExtendedDesktopSize rectangle: reason, status, width, height, screen id.
    type Ext = (u16, u16, u16, u16, u32);

    /// Sends an incremental request for (w, h) and reads the update: its
    /// ExtendedDesktopSize rectangles as (reason, status, w, h, screen id) and the
    /// number of pixel rectangles.
    fn update(s: &mut UnixStream, w: u16, h: u16) -> (Vec<Ext>, usize) {
        let mut m = vec![3, 1, 0, 0, 0, 0];
        m.extend_from_slice(&w.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        s.write_all(&m).unwrap();
        let mut hdr = [0u8; 4];
        s.read_exact(&mut hdr).unwrap();
        let (mut ext, mut pixels) = (Vec::new(), 0);
        for _ in 0..u16::from_be_bytes([hdr[2], hdr[3]]) {
            let mut r = [0u8; 12];
            s.read_exact(&mut r).unwrap();
            let f = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]);
            let enc = i32::from_be_bytes(r[8..12].try_into().unwrap());
            if enc == rfb::ENCODING_EXTENDED_DESKTOP_SIZE {
                let mut n = [0u8; 4];
                s.read_exact(&mut n).unwrap();
                assert_eq!(n[0], 1, "one screen");
                let mut screen = [0u8; 16];
                s.read_exact(&mut screen).unwrap();
                // The screen lies at (0, 0) and has the framebuffer's size.
                assert_eq!(&screen[4..8], &[0, 0, 0, 0]);
                assert_eq!(&screen[8..12], &r[4..8]);
                ext.push((
                    f(0),
                    f(2),
                    f(4),
                    f(6),
                    u32::from_be_bytes(screen[..4].try_into().unwrap()),
                ));
            } else {
                assert_eq!(enc, rfb::ENCODING_RAW);
                let mut px = vec![0u8; usize::from(f(4)) * usize::from(f(6)) * 4];
                s.read_exact(&mut px).unwrap();
                pixels += 1;
            }
        }
        (ext, pixels)
    }

    fn set_size(s: &mut UnixStream, w: u16, h: u16, screens: u8) {
        let mut m = vec![251, 0];
        m.extend_from_slice(&w.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        m.extend_from_slice(&[screens, 0]);
        for _ in 0..screens {
            m.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
            m.extend_from_slice(&w.to_be_bytes());
            m.extend_from_slice(&h.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0, 0]);
        }
        s.write_all(&m).unwrap();
    }

    #[test]
    fn set_desktop_size_resizes_and_every_viewer_is_told_why() {
        let dir = std::env::temp_dir().join(format!("ray-vnc-ext-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = Arc::new(Screen0(Mutex::new(DisplayGeometry {
            index: 0,
            gpu: 0,
            gpa: 0,
            width: 16,
            height: 8,
            stride: 64,
        })));
        let server = VncServer::start(&dir, "t", src.clone(), None, Arc::new(|_| {})).unwrap();
        let mut a = connect(&socket_path(&dir, 0, Role::ReadWrite));
        let mut b = connect(&socket_path(&dir, 0, Role::ReadWrite));
        let mut ro = connect(&socket_path(&dir, 0, Role::ViewOnly));
        // Each first gets the layout (reason server) with the first picture.
        for s in [&mut a, &mut b, &mut ro] {
            assert_eq!(update(s, 16, 8), (vec![(0, 0, 16, 8, 0)], 1));
        }
        // Without a resizer the display cannot change size: prohibited.
        set_size(&mut a, 32, 8, 1);
        assert_eq!(update(&mut a, 16, 8), (vec![(1, 1, 16, 8, 0)], 0));
        server.set_resizer(Arc::new(Resizer(src.clone())));
        // A view-only viewer is prohibited; a size the display refuses is invalid, and
        // so are two screens; none of them changes anything.
        set_size(&mut ro, 32, 8, 1);
        assert_eq!(update(&mut ro, 16, 8), (vec![(1, 1, 16, 8, 0)], 0));
        set_size(&mut a, 200, 8, 1);
        assert_eq!(update(&mut a, 16, 8), (vec![(1, 3, 16, 8, 0)], 0));
        set_size(&mut a, 32, 8, 2);
        assert_eq!(update(&mut a, 16, 8), (vec![(1, 3, 16, 8, 0)], 0));
        assert_eq!(src.displays()[0].width, 16);
        // A valid request: the requester is told "this client", the others "other client".
        set_size(&mut a, 32, 4, 1);
        assert_eq!(update(&mut a, 16, 8), (vec![(1, 0, 32, 4, 0)], 0));
        assert_eq!(update(&mut b, 16, 8), (vec![(2, 0, 32, 4, 0)], 0));
        assert_eq!(update(&mut ro, 16, 8), (vec![(2, 0, 32, 4, 0)], 0));
        // Then the whole new picture.
        assert_eq!(update(&mut a, 32, 4), (vec![], 1));
        // The server's own resize: reason "server".
        server.server_resize(0, 24, 6);
        src.set(24, 6);
        assert_eq!(update(&mut a, 32, 4), (vec![(0, 0, 24, 6, 0)], 0));
        assert_eq!(update(&mut b, 32, 4), (vec![(0, 0, 24, 6, 0)], 0));
        // So does a flood of SetDesktopSize with no update request to answer them.
        let mut flood = connect(&socket_path(&dir, 0, Role::ViewOnly));
        for _ in 0..=MAX_REPLIES {
            set_size(&mut flood, 32, 4, 1);
        }
        let mut rest = Vec::new();
        let _ = flood.read_to_end(&mut rest);
        // A broken SetDesktopSize (no screens) closes that viewer only.
        set_size(&mut b, 32, 4, 0);
        let mut rest = Vec::new();
        let _ = b.read_to_end(&mut rest);
        assert_eq!(update(&mut ro, 24, 6), (vec![(0, 0, 24, 6, 0)], 0));
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod copyrect_tests {
    use super::*;
    use std::io::Read;

    struct Frames {
        g: DisplayGeometry,
        pixels: Mutex<Vec<u8>>,
    }
    impl FrameSource for Frames {
        fn displays(&self) -> Vec<DisplayGeometry> {
            vec![self.g]
        }
        fn read(&self, _: usize, out: &mut [u8]) -> bool {
            out.copy_from_slice(&self.pixels.lock().unwrap());
            true
        }
    }

    /// A frame `w` pixels wide whose line y shows `y + offset` (every line distinct).
    fn lines(w: usize, h: usize, offset: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(w * h * 4);
        for y in 0..h {
            for x in 0..w {
                let p = ((y + offset) as u32).wrapping_mul(2654435761) ^ x as u32;
                v.extend_from_slice(&(p & 0xff_ffff).to_le_bytes());
            }
        }
        v
    }

    /// A viewer that takes `encodings` and keeps its own framebuffer from Raw and
    /// CopyRect rectangles.
    struct Client {
        s: UnixStream,
        fb: Vec<u8>,
        w: usize,
    }
    impl Client {
        fn connect(path: &Path, w: usize, h: usize, encodings: &[i32]) -> Client {
            let mut s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut b = [0u8; 24];
            s.read_exact(&mut b[..12]).unwrap();
            s.write_all(b"RFB 003.008\n").unwrap();
            s.read_exact(&mut b[..2]).unwrap();
            s.write_all(&[1]).unwrap();
            s.read_exact(&mut b[..4]).unwrap();
            s.write_all(&[1]).unwrap();
            s.read_exact(&mut b).unwrap();
            let mut name = vec![0u8; u32::from_be_bytes(b[20..24].try_into().unwrap()) as usize];
            s.read_exact(&mut name).unwrap();
            let mut m = vec![2, 0];
            m.extend_from_slice(&(encodings.len() as u16).to_be_bytes());
            for e in encodings {
                m.extend_from_slice(&e.to_be_bytes());
            }
            s.write_all(&m).unwrap();
            Client {
                s,
                fb: vec![0; w * h * 4],
                w,
            }
        }

        /// One update of the whole display; the number of CopyRect rectangles in it.
        fn update(&mut self, incremental: bool, h: usize) -> usize {
            let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
            m.extend_from_slice(&(self.w as u16).to_be_bytes());
            m.extend_from_slice(&(h as u16).to_be_bytes());
            self.s.write_all(&m).unwrap();
            let mut hdr = [0u8; 4];
            self.s.read_exact(&mut hdr).unwrap();
            let mut copies = 0;
            for _ in 0..u16::from_be_bytes([hdr[2], hdr[3]]) {
                let mut r = [0u8; 12];
                self.s.read_exact(&mut r).unwrap();
                let f = |i: usize| usize::from(u16::from_be_bytes([r[i], r[i + 1]]));
                let (x, y, w, h) = (f(0), f(2), f(4), f(6));
                let line = |y: usize| (y * self.w + x) * 4;
                match i32::from_be_bytes(r[8..12].try_into().unwrap()) {
                    rfb::ENCODING_RAW => {
                        for row in y..y + h {
                            let a = line(row);
                            self.s.read_exact(&mut self.fb[a..a + w * 4]).unwrap();
                        }
                    }
                    rfb::ENCODING_COPYRECT => {
                        let mut src = [0u8; 4];
                        self.s.read_exact(&mut src).unwrap();
                        let (sx, sy) = (
                            usize::from(u16::from_be_bytes([src[0], src[1]])),
                            usize::from(u16::from_be_bytes([src[2], src[3]])),
                        );
                        let copy: Vec<Vec<u8>> = (sy..sy + h)
                            .map(|row| {
                                let a = (row * self.w + sx) * 4;
                                self.fb[a..a + w * 4].to_vec()
                            })
                            .collect();
                        for (i, c) in copy.iter().enumerate() {
                            let a = line(y + i);
                            self.fb[a..a + w * 4].copy_from_slice(c);
                        }
                        copies += 1;
                    }
                    other => panic!("encoding {other} was not asked for"),
                }
            }
            copies
        }
    }

    #[test]
    fn a_scroll_goes_as_copyrect_to_viewers_that_take_it_and_pictures_stay_exact() {
        let dir = std::env::temp_dir().join(format!("ray-vnc-copy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (w, h) = (96usize, 80usize);
        let g = DisplayGeometry {
            index: 0,
            gpu: 0,
            gpa: 0,
            width: w as u32,
            height: h as u32,
            stride: w as u32 * 4,
        };
        let src = Arc::new(Frames {
            g,
            pixels: Mutex::new(lines(w, h, 0)),
        });
        let server = VncServer::start(&dir, "t", src.clone(), None, Arc::new(|_| {})).unwrap();
        let path = socket_path(&dir, 0, Role::ViewOnly);
        let mut copy = Client::connect(&path, w, h, &[rfb::ENCODING_COPYRECT, rfb::ENCODING_RAW]);
        let mut raw = Client::connect(&path, w, h, &[rfb::ENCODING_RAW]);
        for c in [&mut copy, &mut raw] {
            assert_eq!(c.update(false, h), 0);
            assert_eq!(c.fb, lines(w, h, 0));
        }
        // Scroll up by 3, then 20, then down by 11: the copying viewer gets CopyRect each
        // time, the other never; both end with the display's pixels.
        for offset in [3, 23, 12] {
            *src.pixels.lock().unwrap() = lines(w, h, offset);
            assert_eq!(copy.update(true, h), 1, "scroll to offset {offset}");
            assert_eq!(raw.update(true, h), 0);
            for c in [&copy, &raw] {
                assert!(c.fb == lines(w, h, offset), "offset {offset}");
            }
        }
        // A change that is no scroll goes as pixels.
        src.pixels.lock().unwrap()[5] ^= 0xff;
        assert_eq!(copy.update(true, h), 0);
        assert!(copy.fb == *src.pixels.lock().unwrap());
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod h264_tests {
    use super::*;
    use crate::encode::{y_psnr, H264Decoder};
    use std::io::Read;

    struct Frames {
        g: DisplayGeometry,
        pixels: Mutex<Vec<u8>>,
    }
    impl FrameSource for Frames {
        fn displays(&self) -> Vec<DisplayGeometry> {
            vec![self.g]
        }
        fn read(&self, _: usize, out: &mut [u8]) -> bool {
            out.copy_from_slice(&self.pixels.lock().unwrap());
            true
        }
    }

    /// Colour bars with a box at `at`.
    fn picture(w: usize, h: usize, at: usize) -> Vec<u8> {
        let bars = [
            0xffffffu32,
            0xffff00,
            0x00ffff,
            0x00ff00,
            0xff00ff,
            0xff0000,
            0x0000ff,
            0,
        ];
        let mut v = Vec::with_capacity(w * h * 4);
        for y in 0..h {
            for x in 0..w {
                let inside = (at..at + 32).contains(&x) && (16..48).contains(&y);
                let p = if inside { 0x808080 } else { bars[x * 8 / w] };
                v.extend_from_slice(&p.to_le_bytes());
            }
        }
        v
    }

    fn connect(path: &Path, encodings: &[i32]) -> UnixStream {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 24];
        s.read_exact(&mut b[..12]).unwrap();
        s.write_all(b"RFB 003.008\n").unwrap();
        s.read_exact(&mut b[..2]).unwrap();
        s.write_all(&[1]).unwrap();
        s.read_exact(&mut b[..4]).unwrap();
        s.write_all(&[1]).unwrap();
        s.read_exact(&mut b).unwrap();
        let mut name = vec![0u8; u32::from_be_bytes(b[20..24].try_into().unwrap()) as usize];
        s.read_exact(&mut name).unwrap();
        let mut m = vec![2, 0];
        m.extend_from_slice(&(encodings.len() as u16).to_be_bytes());
        for e in encodings {
            m.extend_from_slice(&e.to_be_bytes());
        }
        s.write_all(&m).unwrap();
        s
    }

    /// One update of (w, h): each rectangle's encoding, and the H.264 ones' flags and
    /// access units.
    fn update(s: &mut UnixStream, incremental: bool, w: u16, h: u16) -> Vec<(i32, u32, Vec<u8>)> {
        let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
        m.extend_from_slice(&w.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        s.write_all(&m).unwrap();
        let mut hdr = [0u8; 4];
        s.read_exact(&mut hdr).unwrap();
        let mut out = Vec::new();
        for _ in 0..u16::from_be_bytes([hdr[2], hdr[3]]) {
            let mut r = [0u8; 12];
            s.read_exact(&mut r).unwrap();
            let (rw, rh) = (
                usize::from(u16::from_be_bytes([r[4], r[5]])),
                usize::from(u16::from_be_bytes([r[6], r[7]])),
            );
            let enc = i32::from_be_bytes(r[8..12].try_into().unwrap());
            let (flags, body) = match enc {
                rfb::ENCODING_OPEN_H264 => {
                    assert_eq!(
                        (rw, rh),
                        (usize::from(w), usize::from(h)),
                        "the whole display"
                    );
                    let mut lf = [0u8; 8];
                    s.read_exact(&mut lf).unwrap();
                    let mut au = vec![0; u32::from_be_bytes(lf[..4].try_into().unwrap()) as usize];
                    s.read_exact(&mut au).unwrap();
                    (u32::from_be_bytes(lf[4..].try_into().unwrap()), au)
                }
                rfb::ENCODING_RAW => {
                    let mut px = vec![0; rw * rh * 4];
                    s.read_exact(&mut px).unwrap();
                    (0, px)
                }
                other => panic!("encoding {other}"),
            };
            out.push((enc, flags, body));
        }
        out
    }

    #[test]
    fn a_lossy_viewer_gets_open_h264_of_changes_only_and_it_decodes_to_the_display() {
        let dir = std::env::temp_dir().join(format!("ray-vnc-h264-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (w, h) = (160usize, 96usize);
        let g = DisplayGeometry {
            index: 0,
            gpu: 0,
            gpa: 0,
            width: w as u32,
            height: h as u32,
            stride: w as u32 * 4,
        };
        let src = Arc::new(Frames {
            g,
            pixels: Mutex::new(picture(w, h, 0)),
        });
        let server = VncServer::start(&dir, "t", src.clone(), None, Arc::new(|_| {})).unwrap();
        let path = socket_path(&dir, 0, Role::ViewOnly);
        let quality = |n: i32| rfb::QUALITY_LEVEL_0 + n;
        // H.264 first, quality 2: H.264. Quality 6 (or none): the next encoding, Raw.
        let mut lossy = connect(
            &path,
            &[rfb::ENCODING_OPEN_H264, rfb::ENCODING_RAW, quality(2)],
        );
        let mut fine = connect(
            &path,
            &[rfb::ENCODING_OPEN_H264, rfb::ENCODING_RAW, quality(6)],
        );
        assert_eq!(
            update(&mut fine, false, w as u16, h as u16)[0].0,
            rfb::ENCODING_RAW
        );
        let mut decoder = H264Decoder::new().unwrap();
        let mut check = |au: &[u8], want: &[u8]| {
            let mut pictures = 0;
            decoder
                .decode(au, |f| {
                    assert_eq!((f.width, f.height), (w as u32, h as u32));
                    let psnr = y_psnr(want, w * 4, &f.y, w, h);
                    assert!(psnr >= 35.0, "Y PSNR {psnr:.1} dB");
                    pictures += 1;
                })
                .unwrap();
            assert_eq!(pictures, 1);
        };
        let first = update(&mut lossy, false, w as u16, h as u16);
        assert_eq!(first.len(), 1);
        let (enc, flags, au) = &first[0];
        assert_eq!(
            (*enc, *flags),
            (rfb::ENCODING_OPEN_H264, rfb::H264_RESET_CONTEXT)
        );
        check(au, &picture(w, h, 0));
        // Nothing changed: an incremental request waits (no frame is sent).
        lossy
            .write_all(&[3, 1, 0, 0, 0, 0, 0, w as u8, 0, h as u8])
            .unwrap();
        lossy
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut nothing = [0u8; 1];
        assert!(
            lossy.read(&mut nothing).is_err(),
            "no update without a change"
        );
        lossy
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        // The waiting request is answered by the next change; then more changes.
        *src.pixels.lock().unwrap() = picture(w, h, 8);
        let mut hdr = [0u8; 4];
        lossy.read_exact(&mut hdr).unwrap();
        assert_eq!(u16::from_be_bytes([hdr[2], hdr[3]]), 1);
        let mut r = [0u8; 20];
        lossy.read_exact(&mut r).unwrap();
        assert_eq!(
            i32::from_be_bytes(r[8..12].try_into().unwrap()),
            rfb::ENCODING_OPEN_H264
        );
        let mut au = vec![0; u32::from_be_bytes(r[12..16].try_into().unwrap()) as usize];
        lossy.read_exact(&mut au).unwrap();
        check(&au, &picture(w, h, 8));
        // A change: one more frame, no reset; it decodes after the first.
        for at in [16, 48] {
            *src.pixels.lock().unwrap() = picture(w, h, at);
            let next = update(&mut lossy, true, w as u16, h as u16);
            assert_eq!(next.len(), 1);
            assert_eq!((next[0].0, next[0].1), (rfb::ENCODING_OPEN_H264, 0));
            check(&next[0].2, &picture(w, h, at));
        }
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
