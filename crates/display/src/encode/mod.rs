//! Encode sessions: a display of a VM encoded to a video stream, frame by frame while its
//! picture changes, by a thread of its own.
//!
//! Each session moves through the states of one transition table:
//!
//! ```text
//!  Starting --started--> Running --pause--> Paused --resume--> Running
//!  Starting --pause--> Paused
//!  Starting | Running | Paused --stop--> Stopped      (final)
//!  Starting | Running | Paused --fail--> Error        (final)
//! ```
//!
//! A session's thread wakes at most `fps` times a second, reads the display and encodes it
//! only when it differs from the last frame it encoded: an idle display costs no frames and
//! no bytes. The VM pausing pauses its sessions (the picture holds still); its end stops
//! them. Limits: [`MAX_SESSIONS_PER_DISPLAY`], [`MAX_SESSIONS_PER_VM`] and, over all VMs of
//! the host, [`MAX_SESSIONS_PER_HOST`] (slots held as `flock`s on files of a host-wide
//! directory, so a VMM that dies frees its slots).
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use ray_api::encode::{
    Codec, EncodeList, EncodeRequest, EncodeSessionInfo, EncodeStateName as SessionState,
    MAX_ENCODE_HEIGHT, MAX_ENCODE_WIDTH, MAX_SESSIONS_PER_DISPLAY, MAX_SESSIONS_PER_HOST,
    MAX_SESSIONS_PER_VM, MAX_WATCHERS_PER_SESSION,
};

use crate::{DisplayGeometry, FrameSource};

#[cfg(feature = "ffmpeg")]
pub mod ffmpeg;
pub mod h264;
pub mod watch;

pub use h264::{y_psnr, DecodedFrame, H264Decoder, H264Encoder};
pub use watch::Watch;

/// A session's encoder: openh264 for H.264, the host's FFmpeg for HEVC and VP9.
pub enum VideoEncoder {
    H264(Box<H264Encoder>),
    #[cfg(feature = "ffmpeg")]
    Ff(Box<ffmpeg::FfEncoder>),
}

impl VideoEncoder {
    /// An encoder of `codec` for `width` x `height` frames at `bitrate` and at most `fps`.
    pub fn new(
        codec: Codec,
        width: u32,
        height: u32,
        bitrate: u64,
        fps: u32,
    ) -> Result<Self, String> {
        match codec {
            Codec::H264 => H264Encoder::new(width, height, bitrate, fps)
                .map(|e| VideoEncoder::H264(Box::new(e))),
            #[cfg(feature = "ffmpeg")]
            Codec::Hevc | Codec::Vp9 => ffmpeg::FfEncoder::new(codec, width, height, bitrate, fps)
                .map(|e| VideoEncoder::Ff(Box::new(e))),
            #[cfg(not(feature = "ffmpeg"))]
            Codec::Hevc | Codec::Vp9 => Err(check_codec(codec)
                .err()
                .map_or_else(String::new, |e| e.to_string())),
        }
    }

    /// The size encoded (the frame's, cut to even numbers).
    pub fn size(&self) -> (u32, u32) {
        match self {
            VideoEncoder::H264(e) => e.size(),
            #[cfg(feature = "ffmpeg")]
            VideoEncoder::Ff(e) => e.size(),
        }
    }

    /// What the output file starts with (VP9: its IVF header; otherwise nothing).
    pub fn file_header(&self) -> Vec<u8> {
        match self {
            VideoEncoder::H264(_) => Vec::new(),
            #[cfg(feature = "ffmpeg")]
            VideoEncoder::Ff(e) => e.file_header(),
        }
    }

    /// Makes the next frame a key frame that a decoder can start from (parameter sets
    /// included).
    pub fn force_keyframe(&mut self) {
        match self {
            VideoEncoder::H264(e) => e.force_keyframe(),
            #[cfg(feature = "ffmpeg")]
            VideoEncoder::Ff(e) => e.force_keyframe(),
        }
    }

    /// Encodes one frame (`stride` bytes a line) and appends its output to `out`.
    pub fn encode(&mut self, frame: &[u8], stride: usize, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            VideoEncoder::H264(e) => e.encode(frame, stride, out),
            #[cfg(feature = "ffmpeg")]
            VideoEncoder::Ff(e) => e.encode(frame, stride, out),
        }
    }
}

/// What happens to a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    Started,
    Pause,
    Resume,
    Stop,
    Fail,
}

impl SessionEvent {
    pub const ALL: [SessionEvent; 5] = [
        SessionEvent::Started,
        SessionEvent::Pause,
        SessionEvent::Resume,
        SessionEvent::Stop,
        SessionEvent::Fail,
    ];
}

/// The one transition table: the next state, or None where `event` is refused in `state`.
pub fn next_state(state: SessionState, event: SessionEvent) -> Option<SessionState> {
    use SessionEvent as E;
    use SessionState as S;
    match (state, event) {
        (S::Starting, E::Started) => Some(S::Running),
        (S::Starting | S::Running | S::Paused, E::Pause) => Some(S::Paused),
        (S::Paused, E::Resume) => Some(S::Running),
        (S::Starting | S::Running | S::Paused, E::Stop) => Some(S::Stopped),
        (S::Starting | S::Running | S::Paused, E::Fail) => Some(S::Error),
        (S::Running | S::Paused | S::Stopped | S::Error, E::Started)
        | (S::Stopped | S::Error, E::Pause)
        | (S::Starting | S::Running | S::Stopped | S::Error, E::Resume)
        | (S::Stopped | S::Error, E::Stop | E::Fail) => None,
    }
}

/// Why a session could not start or change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("encode session {id} is {state:?}: {event:?} is not allowed in that state")]
    Transition {
        id: u32,
        state: SessionState,
        event: SessionEvent,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("codec {codec} is not available: {why}")]
    Codec { codec: Codec, why: String },
    #[error("display {display} has {MAX_SESSIONS_PER_DISPLAY} encode sessions already (at most {MAX_SESSIONS_PER_DISPLAY} a display)")]
    PerDisplay { display: usize },
    #[error("the VM has {MAX_SESSIONS_PER_VM} encode sessions already (at most {MAX_SESSIONS_PER_VM} a VM)")]
    PerVm,
    #[error("the host runs {MAX_SESSIONS_PER_HOST} encode and decode sessions already (at most {MAX_SESSIONS_PER_HOST} a host, over both kinds)")]
    PerHost,
    #[error("display {display} is {width}x{height}: encode sessions take at most {MAX_ENCODE_WIDTH}x{MAX_ENCODE_HEIGHT}")]
    TooLarge {
        display: usize,
        width: u32,
        height: u32,
    },
    #[error("encode session {0} does not exist")]
    NoSuchSession(u32),
    #[error("encode session {0} has {MAX_WATCHERS_PER_SESSION} watchers already (at most {MAX_WATCHERS_PER_SESSION} a session)")]
    Watchers(u32),
    #[error("{0}")]
    Setup(String),
}

/// Whether `codec` can be encoded by this build on this host; the error says what is
/// missing.
pub fn check_codec(codec: Codec) -> Result<(), EncodeError> {
    match codec {
        Codec::H264 => Ok(()),
        #[cfg(feature = "ffmpeg")]
        Codec::Hevc | Codec::Vp9 => {
            ffmpeg::available(codec).map_err(|why| EncodeError::Codec { codec, why })
        }
        #[cfg(not(feature = "ffmpeg"))]
        Codec::Hevc | Codec::Vp9 => Err(EncodeError::Codec {
            codec,
            why: "HEVC and VP9 come from the host's FFmpeg libraries (libavcodec with \
                  libx265 / libvpx), which need rayvisor built with the `ffmpeg` cargo feature"
                .into(),
        }),
    }
}

/// Where sessions read their display: replaced when the VM's machine is (a restore).
pub type SharedSource = Arc<Mutex<Option<Arc<dyn FrameSource>>>>;

/// A slot of the host's session limit: a `flock` held on one of the slot files (decode
/// sessions take theirs from the same files).
pub(crate) struct HostSlot {
    _file: File,
}

impl HostSlot {
    /// Takes a free slot of `dir`. The slot files are opened read-only when they exist (a
    /// `flock` needs no more), so a jailed VMM, whose view of the directory is read-only,
    /// claims the files its keeper made ([`make_host_slots`]).
    pub(crate) fn claim(dir: &Path) -> Result<HostSlot, EncodeError> {
        for i in 0..MAX_SESSIONS_PER_HOST {
            let path = dir.join(format!("slot-{i}"));
            let file = match File::open(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    make_host_slots(dir)?;
                    File::open(&path)
                }
                opened => opened,
            }
            .map_err(|e| EncodeError::Setup(format!("cannot open {}: {e}", path.display())))?;
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                return Ok(HostSlot { _file: file });
            }
        }
        Err(EncodeError::PerHost)
    }
}

/// Makes the host's encode-slot directory `dir` and its slot files, where missing, and
/// lets every user read them whatever the umask: a jailed VMM opens them as its own uid.
pub fn make_host_slots(dir: &Path) -> Result<(), EncodeError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        EncodeError::Setup(format!(
            "cannot make the host's encode-slot directory {}: {e}",
            dir.display()
        ))
    })?;
    readable_by_all(dir, 0o555)?;
    for i in 0..MAX_SESSIONS_PER_HOST {
        let path = dir.join(format!("slot-{i}"));
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| EncodeError::Setup(format!("cannot make {}: {e}", path.display())))?;
        readable_by_all(&path, 0o444)?;
    }
    Ok(())
}

/// Adds the permission bits `bits` to `path` where it lacks some.
fn readable_by_all(path: &Path, bits: u32) -> Result<(), EncodeError> {
    use std::os::unix::fs::PermissionsExt;
    let cannot = |e: std::io::Error| {
        EncodeError::Setup(format!(
            "cannot let every user read {} (a jailed VMM opens it as its own uid): {e}",
            path.display()
        ))
    };
    let mode = std::fs::metadata(path)
        .map_err(cannot)?
        .permissions()
        .mode();
    if mode & bits != bits {
        std::fs::set_permissions(
            path,
            std::fs::Permissions::from_mode((mode | bits) & 0o7777),
        )
        .map_err(cannot)?;
    }
    Ok(())
}

#[derive(Default)]
struct Stats {
    frames: u64,
    bytes: u64,
    last_latency: Duration,
    total_latency: Duration,
    /// When the last frames were encoded (the last 5 s).
    recent: VecDeque<Instant>,
    width: u32,
    height: u32,
}

/// How far back the frame rate looks.
const FPS_WINDOW: Duration = Duration::from_secs(5);

struct Shared {
    id: u32,
    state: Mutex<(SessionState, Option<String>)>,
    stats: Mutex<Stats>,
    stop: AtomicBool,
    paused: AtomicBool,
    /// Times the thread looked at the display.
    polls: AtomicU64,
    started: Instant,
    /// Viewers of the live stream.
    watchers: watch::Watchers,
    /// What the stream starts with (VP9: its IVF header), for each new watcher.
    header: Vec<u8>,
}

impl Shared {
    fn apply(&self, event: SessionEvent) -> Result<SessionState, EncodeError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let next = next_state(s.0, event).ok_or(EncodeError::Transition {
            id: self.id,
            state: s.0,
            event,
        })?;
        s.0 = next;
        Ok(next)
    }

    fn fail(&self, why: String) {
        tracing::error!(session = self.id, "encode session failed: {why}");
        if self.apply(SessionEvent::Fail).is_ok() {
            self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(why);
        }
    }
}

/// The settings of a session.
#[derive(Clone, Debug)]
pub struct SessionParams {
    pub codec: Codec,
    pub bitrate: u64,
    pub fps: u32,
    /// The output file (None: only the watchers get the stream).
    pub path: Option<String>,
}

/// One encode session and its thread.
pub struct Session {
    display: usize,
    params: SessionParams,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Session {
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    pub fn display(&self) -> usize {
        self.display
    }

    pub fn state(&self) -> SessionState {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// How many times the thread looked at the display (encoded or not).
    pub fn polls(&self) -> u64 {
        self.shared.polls.load(Ordering::SeqCst)
    }

    fn active(&self) -> bool {
        !matches!(self.state(), SessionState::Stopped | SessionState::Error)
    }

    pub fn info(&self) -> EncodeSessionInfo {
        let (state, error) = self
            .shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut st = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while st
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > FPS_WINDOW)
        {
            st.recent.pop_front();
        }
        let window = now
            .duration_since(self.shared.started)
            .min(FPS_WINDOW)
            .as_secs_f64()
            .max(1e-3);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        EncodeSessionInfo {
            id: self.shared.id,
            display: self.display as u32,
            codec: self.params.codec,
            state,
            width: st.width,
            height: st.height,
            bitrate: self.params.bitrate,
            fps_limit: self.params.fps,
            frames: st.frames,
            fps: if matches!(state, SessionState::Running) {
                st.recent.len() as f64 / window
            } else {
                0.0
            },
            bytes: st.bytes,
            latency_ms: ms(st.last_latency),
            mean_latency_ms: if st.frames == 0 {
                0.0
            } else {
                ms(st.total_latency) / st.frames as f64
            },
            path: self.params.path.clone(),
            watchers: self.shared.watchers.count() as u32,
            error,
        }
    }

    /// Stops the thread and waits for it; the file is complete after this.
    fn finish(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl crate::sessions::TableEntry for Session {
    fn number(&self) -> u32 {
        self.id()
    }
    fn ended(&self) -> bool {
        !self.active()
    }
    fn reap(&mut self) {
        self.finish()
    }
}

#[derive(Default)]
struct Registry {
    sessions: Vec<Session>,
    next: u32,
    paused: bool,
}

/// The encode sessions of one VM.
pub struct Encoders {
    source: SharedSource,
    /// The host-wide directory of session slots (None: no host limit, in tests).
    slots: Option<PathBuf>,
    reg: Mutex<Registry>,
}

impl Encoders {
    /// Sessions reading from `source`, with the host's slots in `slots`.
    pub fn new(source: SharedSource, slots: Option<PathBuf>) -> Self {
        Self {
            source,
            slots,
            reg: Mutex::default(),
        }
    }

    /// Starts a session on `display` (now `geometry`) writing to `req.path`: every limit
    /// and setting is checked before the file is made or a thread starts.
    pub fn start(
        &self,
        geometry: DisplayGeometry,
        req: &EncodeRequest,
    ) -> Result<EncodeSessionInfo, EncodeError> {
        self.start_into(geometry, req, None)
    }

    /// [`Encoders::start`], writing to `handed` (the file `req.path` names, created by a
    /// client and handed over) instead of creating `req.path`.
    pub fn start_into(
        &self,
        geometry: DisplayGeometry,
        req: &EncodeRequest,
        handed: Option<File>,
    ) -> Result<EncodeSessionInfo, EncodeError> {
        req.validate().map_err(EncodeError::Invalid)?;
        check_codec(req.codec)?;
        let display = geometry.index;
        if geometry.width > MAX_ENCODE_WIDTH || geometry.height > MAX_ENCODE_HEIGHT {
            return Err(EncodeError::TooLarge {
                display,
                width: geometry.width,
                height: geometry.height,
            });
        }
        let mut reg = self.reg.lock().unwrap_or_else(|e| e.into_inner());
        let active: Vec<&Session> = reg.sessions.iter().filter(|s| s.active()).collect();
        if active.iter().filter(|s| s.display == display).count() >= MAX_SESSIONS_PER_DISPLAY {
            return Err(EncodeError::PerDisplay { display });
        }
        if active.len() >= MAX_SESSIONS_PER_VM {
            return Err(EncodeError::PerVm);
        }
        let slot = self.slots.as_deref().map(HostSlot::claim).transpose()?;
        let encoder = VideoEncoder::new(
            req.codec,
            geometry.width,
            geometry.height,
            req.bitrate,
            req.fps,
        )
        .map_err(EncodeError::Setup)?;
        let header = encoder.file_header();
        let file = match &req.path {
            Some(path) => {
                let mut file = match handed {
                    Some(f) => f,
                    None => File::create(path).map_err(|e| {
                        EncodeError::Invalid(format!("cannot create the output file {path}: {e}"))
                    })?,
                };
                file.write_all(&header).map_err(|e| {
                    EncodeError::Invalid(format!("cannot write the output file {path}: {e}"))
                })?;
                Some(file)
            }
            None => None,
        };
        reg.next += 1;
        let id = reg.next;
        let shared = Arc::new(Shared {
            id,
            state: Mutex::new((SessionState::Starting, None)),
            stats: Mutex::default(),
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(reg.paused),
            polls: AtomicU64::new(0),
            started: Instant::now(),
            watchers: watch::Watchers::default(),
            header,
        });
        if reg.paused {
            let _ = shared.apply(SessionEvent::Pause);
        }
        let params = SessionParams {
            codec: req.codec,
            bitrate: req.bitrate,
            fps: req.fps,
            path: req.path.clone(),
        };
        let worker = Worker {
            shared: shared.clone(),
            source: self.source.clone(),
            display,
            geometry,
            params: params.clone(),
            encoder,
            out: file,
        };
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name(format!("encode-{id}"))
            .spawn(move || {
                ray_seccomp::enter(ray_seccomp::Kind::Display);
                let _span = span.enter();
                // The host's slot is the thread's: a session that fails on its own frees
                // it as its thread ends, not when someone stops or prunes it.
                let _slot = slot;
                worker.run();
            })
            .map_err(|e| EncodeError::Setup(format!("cannot start the encoder thread: {e}")))?;
        let session = Session {
            display,
            params,
            shared,
            thread: Some(thread),
        };
        let info = session.info();
        tracing::info!(session = id, screen = geometry.index, codec = %req.codec, path = ?req.path, "encode session started");
        crate::sessions::push(&mut reg.sessions, session);
        Ok(info)
    }

    /// Stops session `id`; its file is complete when this returns.
    pub fn stop(&self, id: u32) -> Result<EncodeSessionInfo, EncodeError> {
        let mut reg = self.reg.lock().unwrap_or_else(|e| e.into_inner());
        let s = crate::sessions::find_mut(&mut reg.sessions, id)
            .ok_or(EncodeError::NoSuchSession(id))?;
        s.shared.apply(SessionEvent::Stop)?;
        s.finish();
        tracing::info!(session = id, "encode session stopped");
        Ok(s.info())
    }

    /// A live view of session `id`'s stream: its header, then every access unit from the
    /// next key frame on, until the session ends (the receiver then disconnects).
    pub fn watch(&self, id: u32) -> Result<Watch, EncodeError> {
        let reg = self.reg.lock().unwrap_or_else(|e| e.into_inner());
        let s = crate::sessions::find(&reg.sessions, id).ok_or(EncodeError::NoSuchSession(id))?;
        let state = s.state();
        if !s.active() {
            return Err(EncodeError::Invalid(format!(
                "encode session {id} is {state:?}: it has no stream to watch"
            )));
        }
        let rx = s
            .shared
            .watchers
            .add(&s.shared.header)
            .ok_or(EncodeError::Watchers(id))?;
        if let Some(t) = &s.thread {
            t.thread().unpark();
        }
        tracing::info!(session = id, "a watcher joined the stream");
        Ok(rx)
    }

    /// Stops every session (the VM ended).
    pub fn stop_all(&self) {
        let mut reg = self.reg.lock().unwrap_or_else(|e| e.into_inner());
        for s in &mut reg.sessions {
            if s.shared.apply(SessionEvent::Stop).is_ok() {
                s.finish();
            }
        }
    }

    /// The VM paused (`true`) or runs again: its sessions follow.
    pub fn set_paused(&self, paused: bool) {
        let mut reg = self.reg.lock().unwrap_or_else(|e| e.into_inner());
        reg.paused = paused;
        for s in &reg.sessions {
            let event = if paused {
                SessionEvent::Pause
            } else {
                SessionEvent::Resume
            };
            if s.shared.apply(event).is_ok() {
                s.shared.paused.store(paused, Ordering::SeqCst);
                if let Some(t) = &s.thread {
                    t.thread().unpark();
                }
            }
        }
    }

    /// Every session, oldest first.
    pub fn list(&self) -> EncodeList {
        let reg = self.reg.lock().unwrap_or_else(|e| e.into_inner());
        EncodeList {
            sessions: reg.sessions.iter().map(Session::info).collect(),
        }
    }

    /// Runs `f` on session `id` (tests look at its counters).
    pub fn with_session<T>(&self, id: u32, f: impl FnOnce(&Session) -> T) -> Option<T> {
        let reg = self.reg.lock().unwrap_or_else(|e| e.into_inner());
        crate::sessions::find(&reg.sessions, id).map(f)
    }
}

impl Drop for Encoders {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// A session's thread: its encoder, output and display.
struct Worker {
    shared: Arc<Shared>,
    source: SharedSource,
    display: usize,
    /// The display's geometry the encoder was made for.
    geometry: DisplayGeometry,
    params: SessionParams,
    encoder: VideoEncoder,
    /// The output file, if the session has one.
    out: Option<File>,
}

impl Worker {
    fn run(mut self) {
        if let Err(e) = self.encode_loop() {
            self.shared.fail(e);
        }
        self.shared.watchers.close();
        if let Some(out) = &mut self.out {
            let _ = out.flush();
        }
    }

    fn encode_loop(&mut self) -> Result<(), String> {
        let interval = Duration::from_secs(1) / self.params.fps;
        let mut next = Instant::now();
        let mut frame: Vec<u8> = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        let mut geometry = Some(self.geometry);
        let mut au = Vec::new();
        loop {
            let now = Instant::now();
            if next > now {
                std::thread::park_timeout(next - now);
            }
            if self.shared.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if Instant::now() < next {
                continue; // woken early (pause or resume): keep the pace
            }
            next = (next + interval).max(Instant::now());
            if self.shared.paused.load(Ordering::SeqCst) {
                continue;
            }
            let _ = self.shared.apply(SessionEvent::Started);
            let source = self
                .source
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let Some(source) = source else { continue };
            let Some(g) = source
                .displays()
                .into_iter()
                .find(|d| d.index == self.display)
            else {
                continue;
            };
            if geometry
                .is_some_and(|o| (o.width, o.height, o.stride) != (g.width, g.height, g.stride))
            {
                if g.width > MAX_ENCODE_WIDTH || g.height > MAX_ENCODE_HEIGHT {
                    return Err(format!(
                        "display {} became {}x{}: encode sessions take at most {MAX_ENCODE_WIDTH}x{MAX_ENCODE_HEIGHT}",
                        self.display, g.width, g.height
                    ));
                }
                // A new size: a new sequence (parameter sets, a key frame) in the same stream.
                self.encoder = VideoEncoder::new(
                    self.params.codec,
                    g.width,
                    g.height,
                    self.params.bitrate,
                    self.params.fps,
                )?;
                last = None;
            }
            geometry = Some(g);
            let key = self.shared.watchers.take_key_request();
            if key {
                // A new watcher starts here: a key frame, even of an unchanged display.
                self.encoder.force_keyframe();
                last = None;
            } else if self.out.is_none() && self.shared.watchers.count() == 0 {
                continue; // a stream nobody watches: nothing to encode
            }
            frame.resize(g.bytes(), 0);
            self.shared.polls.fetch_add(1, Ordering::SeqCst);
            if !source.read(self.display, &mut frame) {
                continue;
            }
            if last.as_deref() == Some(&frame[..]) {
                continue; // the display is idle: no frame
            }
            let t0 = Instant::now();
            au.clear();
            self.encoder.encode(&frame, g.stride as usize, &mut au)?;
            if au.is_empty() {
                if key {
                    self.shared.watchers.want_key();
                }
                continue; // skipped by the rate control: offered again next time
            }
            if let (Some(out), Some(path)) = (&mut self.out, &self.params.path) {
                out.write_all(&au)
                    .map_err(|e| format!("cannot write {path}: {e}"))?;
            }
            self.shared.watchers.send(&au, key, self.shared.id);
            let took = t0.elapsed();
            {
                let mut st = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
                st.frames += 1;
                st.bytes += au.len() as u64;
                st.last_latency = took;
                st.total_latency += took;
                st.recent.push_back(t0);
                if st.recent.len() > 600 {
                    st.recent.pop_front();
                }
                (st.width, st.height) = self.encoder.size();
            }
            match &mut last {
                Some(l) => std::mem::swap(l, &mut frame),
                None => last = Some(frame.clone()),
            }
        }
    }
}

#[cfg(test)]
mod tests;
