//! Decode sessions: a video stream turned back into pictures by a thread of its own, the
//! stream being a file (read from its start to its end) or the live stream of an encode
//! session (taken as a watcher takes it, until that session ends).
//!
//! Each session moves through the states of one transition table:
//!
//! ```text
//!  Starting --started--> Running
//!  Starting | Running --finished--> Done      (final: the stream ended, all of it decoded)
//!  Starting | Running --stop--> Stopped       (final)
//!  Starting | Running --fail--> Error         (final: the decoder's error, or a bad stream)
//! ```
//!
//! Limits: [`MAX_DECODE_SESSIONS_PER_VM`] sessions of a VM that have not ended, and over
//! all VMs of the host the encode sessions' slots ([`crate::encode::MAX_SESSIONS_PER_HOST`],
//! shared by both kinds of session); a session holds its slot until its thread ends.
use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use ray_api::decode::{
    DecodeList, DecodeRequest, DecodeSessionInfo, DecodeSource, DecodeStateName as DecodeState,
    MAX_DECODE_HEIGHT, MAX_DECODE_SESSIONS_PER_VM, MAX_DECODE_WIDTH,
};
use ray_api::encode::{Codec, MAX_SESSIONS_PER_HOST, MAX_WATCHERS_PER_SESSION};

use crate::encode::{DecodedFrame, EncodeError, HostSlot, Watch};

/// The longest NAL unit (or access unit) a stream may hold before the decoder refuses it:
/// bytes with no start code in sight are not an Annex-B stream.
pub const MAX_UNIT: usize = 16 << 20;
/// How much of a file is read at a time.
const READ_CHUNK: usize = 64 << 10;
/// How often a live session looks at its stop flag while no frame comes.
const LIVE_POLL: Duration = Duration::from_millis(100);

/// What happens to a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeEvent {
    Started,
    Finished,
    Stop,
    Fail,
}

impl DecodeEvent {
    pub const ALL: [DecodeEvent; 4] = [
        DecodeEvent::Started,
        DecodeEvent::Finished,
        DecodeEvent::Stop,
        DecodeEvent::Fail,
    ];
}

/// The one transition table: the next state, or None where `event` is refused in `state`.
pub fn next_state(state: DecodeState, event: DecodeEvent) -> Option<DecodeState> {
    use DecodeEvent as E;
    use DecodeState as S;
    match (state, event) {
        (S::Starting, E::Started) => Some(S::Running),
        (S::Starting | S::Running, E::Finished) => Some(S::Done),
        (S::Starting | S::Running, E::Stop) => Some(S::Stopped),
        (S::Starting | S::Running, E::Fail) => Some(S::Error),
        (S::Running | S::Done | S::Stopped | S::Error, E::Started)
        | (S::Done | S::Stopped | S::Error, E::Finished | E::Stop | E::Fail) => None,
    }
}

/// Why a decode session did not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeStartError {
    #[error("{0}")]
    Invalid(String),
    #[error("codec {codec} is not available: {why}")]
    Codec { codec: Codec, why: String },
    #[error(
        "encode session {session} encodes {has}, not {asked}: a decode session of it decodes {has}"
    )]
    CodecMismatch {
        session: u32,
        has: Codec,
        asked: Codec,
    },
    #[error("the VM has {MAX_DECODE_SESSIONS_PER_VM} decode sessions already (at most {MAX_DECODE_SESSIONS_PER_VM} a VM)")]
    PerVm,
    #[error("the host runs {MAX_SESSIONS_PER_HOST} encode and decode sessions already (at most {MAX_SESSIONS_PER_HOST} a host, over both kinds)")]
    PerHost,
    #[error("encode session {0} does not exist")]
    NoSuchEncodeSession(u32),
    #[error("encode session {id} is {state:?}: it has no stream to decode")]
    EncodeSessionEnded {
        id: u32,
        state: ray_api::encode::EncodeStateName,
    },
    #[error("encode session {0} has {MAX_WATCHERS_PER_SESSION} watchers already (at most {MAX_WATCHERS_PER_SESSION} a session; a decode session of it is one)")]
    Watchers(u32),
    #[error("the decode session's file {path} is outside the VM's directory {dir}: a decode session reads only files there (a jailed VMM sees nothing else)")]
    OutsideVmDir { path: String, dir: String },
    #[error("the decode session's file {path} does not exist")]
    NoSuchFile { path: String },
    #[error("the decode session's file {path} is not a regular file")]
    NotAFile { path: String },
    #[error("cannot read the decode session's file {path}: {why}")]
    File { path: String, why: String },
    #[error("{0}")]
    Setup(String),
}

impl DecodeStartError {
    /// The decode side of an encode session's refusal to be watched.
    pub fn from_watch(e: EncodeError) -> Self {
        match e {
            EncodeError::NoSuchSession(id) => DecodeStartError::NoSuchEncodeSession(id),
            EncodeError::Watchers(id) => DecodeStartError::Watchers(id),
            EncodeError::Invalid(why) => DecodeStartError::Invalid(why),
            other => DecodeStartError::Setup(other.to_string()),
        }
    }
}

/// Why a decode session could not be stopped or shown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeSessionError {
    #[error("decode session {0} does not exist")]
    NoSuchSession(u32),
    #[error("decode session {id} is {state}: {event:?} is not allowed in that state")]
    Transition {
        id: u32,
        state: DecodeState,
        event: DecodeEvent,
    },
    #[error("decode session {id} has decoded no picture yet (it is {state})")]
    NoFrame { id: u32, state: DecodeState },
    #[error("cannot make a PNG of decode session {id}'s picture: {why}")]
    Png { id: u32, why: String },
}

/// Whether `codec` can be decoded by this build on this host; the error says what is
/// missing.
pub fn check_codec(codec: Codec) -> Result<(), DecodeStartError> {
    match codec {
        Codec::H264 => Ok(()),
        #[cfg(feature = "ffmpeg")]
        Codec::Hevc | Codec::Vp9 => crate::encode::ffmpeg::decoder_available(codec)
            .map_err(|why| DecodeStartError::Codec { codec, why }),
        #[cfg(not(feature = "ffmpeg"))]
        Codec::Hevc | Codec::Vp9 => Err(DecodeStartError::Codec {
            codec,
            why: "HEVC and VP9 are decoded by the host's FFmpeg libraries (libavcodec), which \
                  need rayvisor built with the `ffmpeg` cargo feature"
                .into(),
        }),
    }
}

/// How a stream comes: whole units at a time (a live stream: each chunk is one or more
/// complete access units, decoded at once) or as bytes cut anywhere (a file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Units,
    Bytes,
}

/// Called with each picture and the decode time spent on it.
pub type OnFrame<'a> = dyn FnMut(DecodedFrame, Duration) -> Result<(), String> + 'a;

enum Engine {
    H264(Box<openh264::decoder::Decoder>),
    #[cfg(feature = "ffmpeg")]
    Ff(Box<crate::encode::ffmpeg::FfDecoder>),
}

/// An incremental decoder of one codec's stream as rayvisor's encoders write it: H.264 or
/// HEVC Annex-B, VP9 in IVF.
pub struct StreamDecoder {
    codec: Codec,
    framing: Framing,
    engine: Engine,
    /// Bytes not decoded yet (a file's incomplete last unit; VP9: an incomplete frame).
    buf: Vec<u8>,
    /// How far `buf` was searched for start codes.
    scanned: usize,
    /// HEVC from a file: the NAL units of the access unit being gathered, and whether it
    /// has a picture's slice yet.
    au: Vec<u8>,
    au_vcl: bool,
    /// VP9: the IVF file header was read.
    ivf_header: bool,
    /// Decode time since the last picture came out.
    pending: Duration,
    /// Units given to the decoder, for its error messages.
    units: u64,
}

// SAFETY: the decoders (openh264's and FFmpeg's) are used by one thread at a time: the
// session's thread owns the decoder after it is made; neither keeps thread-local state
// between calls.
unsafe impl Send for StreamDecoder {}

impl StreamDecoder {
    pub fn new(codec: Codec, framing: Framing) -> Result<Self, DecodeStartError> {
        check_codec(codec)?;
        let engine = match codec {
            Codec::H264 => {
                let d = openh264::decoder::Decoder::with_api_config(
                    openh264::OpenH264API::from_source(),
                    openh264::decoder::DecoderConfig::new(),
                )
                .map_err(|e| {
                    DecodeStartError::Setup(format!("cannot set up the H.264 decoder: {e}"))
                })?;
                Engine::H264(Box::new(d))
            }
            #[cfg(feature = "ffmpeg")]
            Codec::Hevc | Codec::Vp9 => Engine::Ff(Box::new(
                crate::encode::ffmpeg::FfDecoder::new(codec).map_err(DecodeStartError::Setup)?,
            )),
            #[cfg(not(feature = "ffmpeg"))]
            Codec::Hevc | Codec::Vp9 => unreachable!("check_codec refused it"),
        };
        Ok(Self {
            codec,
            framing,
            engine,
            buf: Vec::new(),
            scanned: 0,
            au: Vec::new(),
            au_vcl: false,
            ivf_header: false,
            pending: Duration::ZERO,
            units: 0,
        })
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Decodes what `chunk` completes and calls `each` with every picture.
    pub fn push(&mut self, chunk: &[u8], each: &mut OnFrame<'_>) -> Result<(), String> {
        if self.codec == Codec::Vp9 {
            self.buf.extend_from_slice(chunk);
            return self.ivf_frames(each);
        }
        match self.framing {
            Framing::Units => {
                let nals: Vec<&[u8]> = openh264::nal_units(chunk).collect();
                self.units_of(&nals, true, each)
            }
            Framing::Bytes => {
                self.buf.extend_from_slice(chunk);
                let cut = last_start_code(&self.buf, self.scanned.saturating_sub(3));
                self.scanned = self.buf.len();
                let Some(cut) = cut.filter(|&c| c > 0) else {
                    if self.buf.len() > MAX_UNIT {
                        return Err(format!(
                            "no {} unit ends within {} bytes: not an Annex-B stream",
                            self.codec,
                            self.buf.len()
                        ));
                    }
                    return Ok(());
                };
                let rest = self.buf.split_off(cut);
                let done = std::mem::replace(&mut self.buf, rest);
                self.scanned = self.buf.len();
                let nals: Vec<&[u8]> = openh264::nal_units(&done).collect();
                self.units_of(&nals, false, each)
            }
        }
    }

    /// The end of the stream: decodes what is left and every picture the decoder holds.
    pub fn finish(&mut self, each: &mut OnFrame<'_>) -> Result<(), String> {
        if self.codec == Codec::Vp9 {
            self.ivf_frames(each)?;
            if !self.buf.is_empty() {
                return Err(format!(
                    "the VP9 (IVF) stream ends inside a frame ({} bytes left over)",
                    self.buf.len()
                ));
            }
        } else {
            let rest = std::mem::take(&mut self.buf);
            let nals: Vec<&[u8]> = openh264::nal_units(&rest).collect();
            self.units_of(&nals, false, each)?;
            if !self.au.is_empty() {
                let au = std::mem::take(&mut self.au);
                self.decode_unit(&au, each)?;
            }
        }
        let t0 = Instant::now();
        let mut frames = Vec::new();
        match &mut self.engine {
            Engine::H264(d) => {
                for p in d
                    .flush_remaining()
                    .map_err(|e| format!("the H.264 stream does not decode at its end: {e}"))?
                {
                    frames.push(crate::encode::h264::frame_of(&p));
                }
            }
            #[cfg(feature = "ffmpeg")]
            Engine::Ff(d) => d.finish(&mut |f| frames.push(f))?,
        }
        self.pending += t0.elapsed();
        for f in frames {
            each(f, std::mem::take(&mut self.pending))?;
        }
        Ok(())
    }

    /// Decodes NAL units: H.264 one at a time; HEVC a whole chunk at once (`whole`: a live
    /// stream's access unit) or gathered into access units (a file).
    fn units_of(
        &mut self,
        nals: &[&[u8]],
        whole: bool,
        each: &mut OnFrame<'_>,
    ) -> Result<(), String> {
        match self.codec {
            Codec::H264 => {
                for nal in nals {
                    self.decode_unit(nal, each)?;
                }
            }
            _ if whole => {
                let mut au = Vec::new();
                for nal in nals {
                    au.extend_from_slice(&[0, 0, 0, 1]);
                    au.extend_from_slice(strip_start_code(nal));
                }
                if !au.is_empty() {
                    self.decode_unit(&au, each)?;
                }
            }
            _ => {
                for nal in nals {
                    let body = strip_start_code(nal);
                    let Some(&first) = body.first() else { continue };
                    let kind = (first >> 1) & 0x3f;
                    let vcl = kind <= 31;
                    // A new access unit: parameter sets, an AUD or prefix SEI, or a
                    // picture's first slice, after the current one has a picture.
                    let first_slice = vcl && body.get(2).is_some_and(|b| b & 0x80 != 0);
                    let starts = matches!(kind, 32..=35 | 39 | 41..=44 | 48..=55) || first_slice;
                    if starts && self.au_vcl {
                        let au = std::mem::take(&mut self.au);
                        self.au_vcl = false;
                        self.decode_unit(&au, each)?;
                    }
                    self.au.extend_from_slice(&[0, 0, 0, 1]);
                    self.au.extend_from_slice(body);
                    self.au_vcl |= vcl;
                    if self.au.len() > MAX_UNIT {
                        return Err(format!(
                            "an HEVC access unit grew past {MAX_UNIT} bytes: not a stream rayvisor's encoder wrote"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// VP9 in IVF: the file header once, then each complete frame.
    fn ivf_frames(&mut self, each: &mut OnFrame<'_>) -> Result<(), String> {
        let mut at = 0;
        if !self.ivf_header {
            if self.buf.len() < 32 {
                return Ok(());
            }
            if &self.buf[..4] != b"DKIF" {
                return Err("the VP9 stream is not IVF: it does not start with DKIF".into());
            }
            if &self.buf[8..12] != b"VP90" {
                return Err(format!(
                    "the IVF stream holds {}, not VP9 (VP90)",
                    String::from_utf8_lossy(&self.buf[8..12])
                ));
            }
            let header = usize::from(u16::from_le_bytes([self.buf[6], self.buf[7]]));
            if !(32..=1024).contains(&header) {
                return Err(format!("the IVF header claims {header} bytes"));
            }
            if self.buf.len() < header {
                return Ok(());
            }
            self.ivf_header = true;
            at = header;
        }
        while self.buf.len() - at >= 12 {
            let size = u32::from_le_bytes([
                self.buf[at],
                self.buf[at + 1],
                self.buf[at + 2],
                self.buf[at + 3],
            ]) as usize;
            if size > MAX_UNIT {
                return Err(format!(
                    "IVF frame {} claims {size} bytes (at most {MAX_UNIT})",
                    self.units
                ));
            }
            if self.buf.len() - at - 12 < size {
                break;
            }
            let frame = self.buf[at + 12..at + 12 + size].to_vec();
            at += 12 + size;
            self.decode_unit(&frame, each)?;
        }
        self.buf.drain(..at);
        Ok(())
    }

    /// Gives the decoder one unit (an H.264 NAL unit, an HEVC access unit, a VP9 frame)
    /// and passes on the pictures it gives back.
    fn decode_unit(&mut self, unit: &[u8], each: &mut OnFrame<'_>) -> Result<(), String> {
        let n = self.units;
        self.units += 1;
        let t0 = Instant::now();
        let mut frames = Vec::new();
        match &mut self.engine {
            Engine::H264(d) => {
                let picture = d
                    .decode(unit)
                    .map_err(|e| format!("the H.264 stream does not decode (NAL unit {n}): {e}"))?;
                if let Some(p) = picture {
                    frames.push(crate::encode::h264::frame_of(&p));
                }
            }
            #[cfg(feature = "ffmpeg")]
            Engine::Ff(d) => d.decode(unit, &mut |f| frames.push(f)).map_err(|e| {
                format!("the {} stream does not decode (unit {n}): {e}", self.codec)
            })?,
        }
        self.pending += t0.elapsed();
        for f in frames {
            each(f, std::mem::take(&mut self.pending))?;
        }
        Ok(())
    }
}

/// A NAL unit without its start code.
fn strip_start_code(nal: &[u8]) -> &[u8] {
    let zeros = nal.iter().take_while(|&&b| b == 0).count();
    if zeros >= 2 && nal.get(zeros) == Some(&1) {
        &nal[zeros + 1..]
    } else {
        nal
    }
}

/// Where the last start code of `buf` (searched from `from`) begins, its leading zero
/// included when it has four bytes; None when there is none.
fn last_start_code(buf: &[u8], from: usize) -> Option<usize> {
    let at = buf.get(from..)?.windows(3).rposition(|w| w == [0, 0, 1])? + from;
    Some(if at > 0 && buf[at - 1] == 0 {
        at - 1
    } else {
        at
    })
}

/// Where a session's stream comes from, opened.
pub enum DecodeInput {
    /// A file, open for reading.
    File(File),
    /// An encode session's live stream; `ended` says whether that session has ended (its
    /// stream closing while it runs means this watcher fell behind and was dropped).
    Live {
        watch: Watch,
        ended: Box<dyn Fn() -> bool + Send>,
    },
}

#[derive(Default)]
struct Stats {
    frames: u64,
    bytes: u64,
    last_latency: Duration,
    total_latency: Duration,
    /// When the last pictures were decoded (the last 5 s).
    recent: VecDeque<Instant>,
    width: u32,
    height: u32,
    /// When the thread started reading, and when it stopped.
    began: Option<Instant>,
    ended: Option<Instant>,
}

/// How far back the frame rate looks while a session runs.
const FPS_WINDOW: Duration = Duration::from_secs(5);

struct Shared {
    id: u32,
    state: Mutex<(DecodeState, Option<String>)>,
    stats: Mutex<Stats>,
    last: Mutex<Option<Arc<DecodedFrame>>>,
    stop: AtomicBool,
}

impl Shared {
    fn apply(&self, event: DecodeEvent) -> Result<DecodeState, DecodeSessionError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let next = next_state(s.0, event).ok_or(DecodeSessionError::Transition {
            id: self.id,
            state: s.0,
            event,
        })?;
        s.0 = next;
        Ok(next)
    }

    fn fail(&self, why: String) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(next) = next_state(s.0, DecodeEvent::Fail) {
            tracing::error!(session = self.id, "decode session failed: {why}");
            *s = (next, Some(why));
        }
    }

    fn state(&self) -> DecodeState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

/// One decode session and its thread.
pub struct Session {
    codec: Codec,
    source: DecodeSource,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Session {
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    pub fn state(&self) -> DecodeState {
        self.shared.state()
    }

    pub fn info(&self) -> DecodeSessionInfo {
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
        let fps = match (state, st.began, st.ended) {
            (DecodeState::Running, Some(began), _) => {
                let window = now.duration_since(began).min(FPS_WINDOW).as_secs_f64();
                st.recent.len() as f64 / window.max(1e-3)
            }
            (_, Some(began), Some(ended)) if st.frames > 0 => {
                st.frames as f64 / ended.duration_since(began).as_secs_f64().max(1e-6)
            }
            _ => 0.0,
        };
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        DecodeSessionInfo {
            id: self.shared.id,
            codec: self.codec,
            source: self.source.clone(),
            state,
            width: st.width,
            height: st.height,
            frames: st.frames,
            fps,
            bytes: st.bytes,
            latency_ms: ms(st.last_latency),
            mean_latency_ms: if st.frames == 0 {
                0.0
            } else {
                ms(st.total_latency) / st.frames as f64
            },
            error,
        }
    }

    /// The last picture, if there is one.
    pub fn last_frame(&self) -> Option<Arc<DecodedFrame>> {
        self.shared
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops the thread (if it still runs) and waits for it.
    fn finish(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl crate::sessions::TableEntry for Session {
    fn number(&self) -> u32 {
        self.id()
    }
    fn ended(&self) -> bool {
        self.state().is_final()
    }
    fn reap(&mut self) {
        self.finish()
    }
}

#[derive(Default)]
struct Registry {
    sessions: Vec<Session>,
    next: u32,
}

/// The decode sessions of one VM.
pub struct Decoders {
    /// The host-wide directory of session slots, shared with the encode sessions (None: no
    /// host limit, in tests).
    slots: Option<PathBuf>,
    reg: Mutex<Registry>,
}

impl Decoders {
    pub fn new(slots: Option<PathBuf>) -> Self {
        Self {
            slots,
            reg: Mutex::default(),
        }
    }

    /// Starts a session decoding `codec` from `source`: the limits are checked and the
    /// decoder made before `open` opens the input (a live stream's watcher) and the thread
    /// starts.
    pub fn start(
        &self,
        codec: Codec,
        source: DecodeSource,
        open: impl FnOnce() -> Result<DecodeInput, DecodeStartError>,
    ) -> Result<DecodeSessionInfo, DecodeStartError> {
        check_codec(codec)?;
        let mut reg = self.reg.lock().unwrap_or_else(|e| e.into_inner());
        let active = reg
            .sessions
            .iter()
            .filter(|s| !s.state().is_final())
            .count();
        if active >= MAX_DECODE_SESSIONS_PER_VM {
            return Err(DecodeStartError::PerVm);
        }
        let slot = self
            .slots
            .as_deref()
            .map(HostSlot::claim)
            .transpose()
            .map_err(|e| match e {
                EncodeError::PerHost => DecodeStartError::PerHost,
                other => DecodeStartError::Setup(other.to_string()),
            })?;
        let framing = match source {
            DecodeSource::File(_) => Framing::Bytes,
            DecodeSource::EncodeSession(_) => Framing::Units,
        };
        let decoder = StreamDecoder::new(codec, framing)?;
        let input = open()?;
        reg.next += 1;
        let id = reg.next;
        let shared = Arc::new(Shared {
            id,
            state: Mutex::new((DecodeState::Starting, None)),
            stats: Mutex::default(),
            last: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let worker = Worker {
            shared: shared.clone(),
            decoder,
            input,
            _slot: slot,
        };
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name(format!("decode-{id}"))
            .spawn(move || {
                ray_seccomp::enter(ray_seccomp::Kind::Display);
                let _span = span.enter();
                worker.run();
            })
            .map_err(|e| {
                DecodeStartError::Setup(format!("cannot start the decoder thread: {e}"))
            })?;
        let session = Session {
            codec,
            source,
            shared,
            thread: Some(thread),
        };
        let info = session.info();
        tracing::info!(session = id, %codec, source = %session.source, "decode session started");
        crate::sessions::push(&mut reg.sessions, session);
        Ok(info)
    }

    /// Stops session `id` and waits for its thread.
    pub fn stop(&self, id: u32) -> Result<DecodeSessionInfo, DecodeSessionError> {
        let mut reg = self.reg.lock().unwrap_or_else(|e| e.into_inner());
        let s = crate::sessions::find_mut(&mut reg.sessions, id)
            .ok_or(DecodeSessionError::NoSuchSession(id))?;
        s.shared.apply(DecodeEvent::Stop)?;
        s.finish();
        tracing::info!(session = id, "decode session stopped");
        Ok(s.info())
    }

    /// Stops every session that runs (the VM ended).
    pub fn stop_all(&self) {
        let mut reg = self.reg.lock().unwrap_or_else(|e| e.into_inner());
        for s in &mut reg.sessions {
            let _ = s.shared.apply(DecodeEvent::Stop);
            s.finish();
        }
    }

    /// Every session, oldest first.
    pub fn list(&self) -> DecodeList {
        let reg = self.reg.lock().unwrap_or_else(|e| e.into_inner());
        DecodeList {
            sessions: reg.sessions.iter().map(Session::info).collect(),
        }
    }

    /// Session `id`.
    pub fn info(&self, id: u32) -> Result<DecodeSessionInfo, DecodeSessionError> {
        self.with_session(id, Session::info)
            .ok_or(DecodeSessionError::NoSuchSession(id))
    }

    /// Session `id`'s last picture as a PNG.
    pub fn frame_png(&self, id: u32) -> Result<Vec<u8>, DecodeSessionError> {
        let (frame, state) = self
            .with_session(id, |s| (s.last_frame(), s.state()))
            .ok_or(DecodeSessionError::NoSuchSession(id))?;
        let f = frame.ok_or(DecodeSessionError::NoFrame { id, state })?;
        let xrgb: Vec<u8> = f
            .rgb
            .chunks_exact(3)
            .flat_map(|p| [p[2], p[1], p[0], 0])
            .collect();
        crate::png::encode(&xrgb, f.width, f.height, f.width * 4)
            .map_err(|why| DecodeSessionError::Png { id, why })
    }

    /// Runs `f` on session `id`.
    pub fn with_session<T>(&self, id: u32, f: impl FnOnce(&Session) -> T) -> Option<T> {
        let reg = self.reg.lock().unwrap_or_else(|e| e.into_inner());
        crate::sessions::find(&reg.sessions, id).map(f)
    }
}

impl Drop for Decoders {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// A session's thread: its decoder and input; it holds its host slot until it ends.
struct Worker {
    shared: Arc<Shared>,
    decoder: StreamDecoder,
    input: DecodeInput,
    _slot: Option<HostSlot>,
}

impl Worker {
    fn run(mut self) {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .began = Some(Instant::now());
        let _ = self.shared.apply(DecodeEvent::Started);
        let result = self.decode_loop();
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ended = Some(Instant::now());
        match result {
            Ok(true) => {
                if self.shared.apply(DecodeEvent::Finished).is_ok() {
                    tracing::info!(session = self.shared.id, "decode session done");
                }
            }
            Ok(false) => {}
            Err(e) => self.shared.fail(e),
        }
    }

    /// Decodes until the stream ends (true) or the session is stopped (false).
    fn decode_loop(&mut self) -> Result<bool, String> {
        let shared = self.shared.clone();
        let mut on_frame = move |f: DecodedFrame, took: Duration| -> Result<(), String> {
            if f.width > MAX_DECODE_WIDTH || f.height > MAX_DECODE_HEIGHT {
                return Err(format!(
                    "a picture of {}x{}: decode sessions take at most {MAX_DECODE_WIDTH}x{MAX_DECODE_HEIGHT}",
                    f.width, f.height
                ));
            }
            {
                let mut st = shared.stats.lock().unwrap_or_else(|e| e.into_inner());
                st.frames += 1;
                st.last_latency = took;
                st.total_latency += took;
                st.recent.push_back(Instant::now());
                if st.recent.len() > 600 {
                    st.recent.pop_front();
                }
                (st.width, st.height) = (f.width, f.height);
            }
            *shared.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(f));
            Ok(())
        };
        let add_bytes = |n: usize| {
            self.shared
                .stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .bytes += n as u64;
        };
        match &mut self.input {
            DecodeInput::File(file) => {
                let mut chunk = vec![0; READ_CHUNK];
                loop {
                    if self.shared.stop.load(Ordering::SeqCst) {
                        return Ok(false);
                    }
                    let n = match file.read(&mut chunk) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(format!("cannot read the file: {e}")),
                    };
                    if n == 0 {
                        break;
                    }
                    add_bytes(n);
                    self.decoder.push(&chunk[..n], &mut on_frame)?;
                }
                self.decoder.finish(&mut on_frame)?;
                let st = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
                if st.frames == 0 {
                    return Err(format!(
                        "the file holds no {} picture ({} bytes read)",
                        self.decoder.codec(),
                        st.bytes
                    ));
                }
                Ok(true)
            }
            DecodeInput::Live { watch, ended } => {
                loop {
                    if self.shared.stop.load(Ordering::SeqCst) {
                        return Ok(false);
                    }
                    match watch.recv_timeout(LIVE_POLL) {
                        Ok(unit) => {
                            add_bytes(unit.len());
                            self.decoder.push(&unit, &mut on_frame)?;
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                if self.shared.stop.load(Ordering::SeqCst) {
                    return Ok(false);
                }
                if !ended() {
                    return Err(format!(
                        "the decoder fell {} frames behind the encode session's stream, which dropped it",
                        crate::encode::watch::WATCH_QUEUE
                    ));
                }
                self.decoder.finish(&mut on_frame)?;
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests;
