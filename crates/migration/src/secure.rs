//! The migration stream's security layer: a Noise handshake keyed from the pre-shared key,
//! then (unless the migration is explicitly plaintext) every byte in AES-256-GCM records.
//!
//! ```text
//! source                                         target
//! preamble  b"RYMN" | 1 | protection | 0 0 ->
//!                                            <-  ack  status | the target's protection
//! Noise_NNpsk0_25519_AESGCM_SHA256, prologue = label | preamble:
//!           -> psk, e                        (target: proves the source holds the key)
//!                                            <-  e, ee   (source: proves the target does)
//! records   u16 BE length | ciphertext+tag, both directions, each under its own key
//! ```
//!
//! Why this shape:
//! - The handshake is Noise (a reviewed protocol), not a home-made one. `NNpsk0` needs no
//!   certificates: both ends prove the shared key in the first round trip, fresh
//!   ephemeral keys make every session's keys new (a recorded session replayed later
//!   fails), and Noise splits one key per direction.
//! - Records carry no nonce: each direction counts them, so a replayed, dropped or
//!   reordered record fails its tag. A record holds at most [`MAX_RECORD_PAYLOAD`] bytes
//!   (the Noise message limit of 65,535 less the tag); the migration frames of
//!   [`crate::frame`] run on top unchanged.
//! - Downgrade is impossible: the source's preamble (which names the protection) is the
//!   Noise prologue, so a preamble altered on the way breaks the handshake, and a target
//!   only accepts the protection it was configured with.
//! - [`Protection::Plaintext`] still runs the Noise handshake (the key is proved both
//!   ways) but then sends frames in the clear: for same-host `unix:` moves, where nobody
//!   is on the path, or an explicit `--insecure-plaintext` between hosts.
//! - Records are Noise transport messages, sealed and opened with ring's AES-256-GCM
//!   under the two keys of Noise's split (the test
//!   `records_are_noise_transport_messages_both_ways` checks them against snow's own):
//!   written plaintext is copied once, straight into the record layout the socket
//!   sends, and sealed there in place; a read opens each record straight into the
//!   caller's buffer.
//! - Sealing runs beside the caller: written plaintext is handed in jobs of at least
//!   [`SEAL_CHUNK`] bytes to persistent crypto workers (one per core beyond the caller's,
//!   at least one), each record under its own counter value, and the caller writes the
//!   sealed jobs to the socket in order while the next ones are sealed, so reading pages,
//!   sealing and sending overlap. A flush (or a read) seals and sends everything first.
//!   Reading decrypts every complete record that arrived in one go on several threads.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use ray_memory::GuestSpan;
use ring::aead::{self, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use snow::HandshakeState;

use crate::auth::PresharedKey;
use crate::frame::{write_all_vectored, FrameStream};

/// The Noise protocol of every migration.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Largest Noise message.
pub const MAX_RECORD: usize = 65_535;
/// The AEAD tag of every record.
pub const TAG_LEN: usize = 16;
/// Most plaintext bytes one record carries.
pub const MAX_RECORD_PAYLOAD: usize = MAX_RECORD - TAG_LEN;
/// Bytes before the Noise handshake: magic, layout version, protection, two zeros.
const PREAMBLE_MAGIC: [u8; 4] = *b"RYMN";
const PREAMBLE_VERSION: u8 = 1;
const PROLOGUE_LABEL: &[u8] = b"rayvisor migration secure stream v1 ";
/// A record's length prefix.
const LEN_PREFIX: usize = 2;
/// Plaintext buffered before it goes to a crypto worker without waiting for a flush.
pub const SEAL_CHUNK: usize = 1 << 20;
/// Sealing jobs handed to the workers and not yet written to the socket, at most.
const SEAL_DEPTH: usize = 3;
/// Fewer records than this are sealed or opened on the calling thread alone.
const PARALLEL_MIN_RECORDS: usize = 8;
/// Ciphertext read from the socket in one go, at most.
const READ_CHUNK: usize = 4 << 20;

/// What the stream after the handshake gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// Every byte in AES-256-GCM records (the default between hosts).
    Encrypted,
    /// Frames in the clear after the key was proved both ways: same-host moves, or an
    /// explicit `--insecure-plaintext`.
    Plaintext,
}

impl Protection {
    /// The default for an endpoint: encrypted over TCP, plaintext on a same-host Unix
    /// socket; `insecure_plaintext` asks for plaintext over TCP too.
    pub fn for_endpoint(at: &crate::Endpoint, insecure_plaintext: bool) -> Protection {
        match at {
            crate::Endpoint::Unix(_) => Protection::Plaintext,
            crate::Endpoint::Tcp(_) if insecure_plaintext => Protection::Plaintext,
            crate::Endpoint::Tcp(_) => Protection::Encrypted,
        }
    }

    fn byte(self) -> u8 {
        match self {
            Protection::Encrypted => 1,
            Protection::Plaintext => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Protection> {
        match b {
            1 => Some(Protection::Encrypted),
            2 => Some(Protection::Plaintext),
            _ => None,
        }
    }
}

impl std::fmt::Display for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protection::Encrypted => "encrypted",
            Protection::Plaintext => "insecure plaintext",
        })
    }
}

/// Why the secure stream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    #[error("the migration connection failed while {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the peer did not start a rayvisor migration: its first bytes are {found:02x?}, not b\"RYMN\" version 1")]
    NotAMigration { found: [u8; 8] },
    #[error("the source asked for an unknown protection (byte {found})")]
    UnknownProtection { found: u8 },
    #[error("the source asked for a {theirs} migration but this target is set to {ours}; both ends must agree (plaintext between hosts needs --insecure-plaintext on both)")]
    ProtectionMismatch {
        ours: Protection,
        theirs: Protection,
    },
    #[error("the target refused a {ours} migration: it is set to {theirs}; both ends must agree (plaintext between hosts needs --insecure-plaintext on both)")]
    RefusedByTarget {
        ours: Protection,
        theirs: Protection,
    },
    #[error("the target answered the preamble with {found:02x?}, which is not a rayvisor migration answer")]
    BadAck { found: [u8; 2] },
    #[error("the source does not hold this target's pre-shared key: its Noise handshake message fails authentication")]
    SourceKeyRefused,
    #[error("the target does not hold our pre-shared key: its Noise handshake message fails authentication")]
    TargetKeyRefused,
    #[error("the peer closed the connection during the Noise handshake (it holds another pre-shared key, or is not a rayvisor migration endpoint)")]
    ClosedInHandshake,
    #[error("the Noise handshake failed: {0}")]
    Noise(#[from] snow::Error),
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> SecureError {
    move |source| {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            SecureError::ClosedInHandshake
        } else {
            SecureError::Io { op, source }
        }
    }
}

fn preamble(p: Protection) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&PREAMBLE_MAGIC);
    b[4] = PREAMBLE_VERSION;
    b[5] = p.byte();
    b
}

/// Builds the Noise state of one side, keyed and bound to `preamble`.
fn handshake_state(
    key: &PresharedKey,
    preamble: &[u8; 8],
    initiator: bool,
) -> Result<HandshakeState, SecureError> {
    let mut prologue = PROLOGUE_LABEL.to_vec();
    prologue.extend_from_slice(preamble);
    let params = NOISE_PARAMS.parse()?;
    let b = snow::Builder::new(params)
        .prologue(&prologue)?
        .psk(0, key.bytes())?;
    Ok(if initiator {
        b.build_initiator()?
    } else {
        b.build_responder()?
    })
}

fn write_message<S: Write>(s: &mut S, msg: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(LEN_PREFIX + msg.len());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    s.write_all(&b)?;
    s.flush()
}

fn read_message<S: Read>(s: &mut S, buf: &mut [u8; MAX_RECORD]) -> io::Result<usize> {
    let mut len = [0u8; LEN_PREFIX];
    s.read_exact(&mut len)?;
    let n = usize::from(u16::from_be_bytes(len));
    s.read_exact(&mut buf[..n])?;
    Ok(n)
}

/// The source's side: preamble, then the Noise handshake as initiator.
pub fn connect_secure<S: Read + Write>(
    mut stream: S,
    key: &PresharedKey,
    protection: Protection,
) -> Result<SecureStream<S>, SecureError> {
    let pre = preamble(protection);
    stream
        .write_all(&pre)
        .and_then(|()| stream.flush())
        .map_err(io_err("sending the preamble"))?;
    let mut ack = [0u8; 2];
    stream
        .read_exact(&mut ack)
        .map_err(io_err("reading the target's answer to the preamble"))?;
    match (ack[0], Protection::from_byte(ack[1])) {
        (0, Some(p)) if p == protection => {}
        (1, Some(theirs)) => {
            return Err(SecureError::RefusedByTarget {
                ours: protection,
                theirs,
            })
        }
        _ => return Err(SecureError::BadAck { found: ack }),
    }
    let mut hs = handshake_state(key, &pre, true)?;
    let mut buf = [0u8; MAX_RECORD];
    let n = hs.write_message(&[], &mut buf)?;
    write_message(&mut stream, &buf[..n]).map_err(io_err("sending the Noise handshake"))?;
    let mut msg = [0u8; MAX_RECORD];
    let n = read_message(&mut stream, &mut msg).map_err(io_err("reading the Noise handshake"))?;
    hs.read_message(&msg[..n], &mut buf)
        .map_err(|_| SecureError::TargetKeyRefused)?;
    SecureStream::new(stream, hs, protection)
}

/// The target's side: checks the preamble against `protection`, then the Noise handshake
/// as responder. Every failure here comes from a peer that has not proved the key.
pub fn accept_secure<S: Read + Write>(
    mut stream: S,
    key: &PresharedKey,
    protection: Protection,
) -> Result<SecureStream<S>, SecureError> {
    let mut pre = [0u8; 8];
    stream
        .read_exact(&mut pre)
        .map_err(io_err("reading the preamble"))?;
    if pre[..4] != PREAMBLE_MAGIC || pre[4] != PREAMBLE_VERSION || pre[6..] != [0, 0] {
        return Err(SecureError::NotAMigration { found: pre });
    }
    let theirs =
        Protection::from_byte(pre[5]).ok_or(SecureError::UnknownProtection { found: pre[5] })?;
    if theirs != protection {
        // Told so the source can say why; nothing else happens on this connection.
        let _ = stream
            .write_all(&[1, protection.byte()])
            .and_then(|()| stream.flush());
        return Err(SecureError::ProtectionMismatch {
            ours: protection,
            theirs,
        });
    }
    stream
        .write_all(&[0, protection.byte()])
        .and_then(|()| stream.flush())
        .map_err(io_err("answering the preamble"))?;
    let mut hs = handshake_state(key, &pre, false)?;
    let mut msg = [0u8; MAX_RECORD];
    let mut buf = [0u8; MAX_RECORD];
    let n = read_message(&mut stream, &mut msg).map_err(io_err("reading the Noise handshake"))?;
    hs.read_message(&msg[..n], &mut buf)
        .map_err(|_| SecureError::SourceKeyRefused)?;
    let n = hs.write_message(&[], &mut buf)?;
    write_message(&mut stream, &buf[..n]).map_err(io_err("sending the Noise handshake"))?;
    SecureStream::new(stream, hs, protection)
}

/// A stream after the handshake: AES-GCM records, or the bare stream for plaintext.
pub struct SecureStream<S> {
    inner: S,
    cipher: Option<Cipher>,
}

/// One direction's AES-256-GCM key, used exactly as Noise transport messages use it
/// (the nonce is four zero bytes and the record's counter, big-endian; no associated
/// data), so every record is a Noise transport message. It seals in place: a record's
/// plaintext is copied once, into the buffer the socket then sends.
struct RecordKey(LessSafeKey);

impl RecordKey {
    fn new(raw: &[u8; 32]) -> io::Result<RecordKey> {
        UnboundKey::new(&aead::AES_256_GCM, raw)
            .map(|k| RecordKey(LessSafeKey::new(k)))
            .map_err(|_| io::Error::other("an AES-256-GCM key of the wrong length"))
    }

    fn nonce(counter: u64) -> io::Result<Nonce> {
        // Noise reserves the last counter value; a stream never gets near it.
        if counter == u64::MAX {
            return Err(io::Error::other("the record counter is exhausted"));
        }
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&counter.to_be_bytes());
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Seals `in_out` in place under record counter `counter`; returns its tag.
    fn seal(&self, counter: u64, in_out: &mut [u8]) -> io::Result<Tag> {
        self.0
            .seal_in_place_separate_tag(Self::nonce(counter)?, Aad::empty(), in_out)
            .map_err(|_| io::Error::other(format!("sealing record {counter}")))
    }

    /// Opens `record` (ciphertext then tag) into `out`, which has the plaintext's length.
    fn open_into(&self, counter: u64, record: &[u8], out: &mut [u8]) -> io::Result<()> {
        let (body, tag) = record.split_at(record.len().saturating_sub(TAG_LEN));
        let tag = Tag::try_from(tag).map_err(|_| tampered(counter))?;
        if body.len() != out.len() {
            return Err(tampered(counter));
        }
        out.copy_from_slice(body);
        self.0
            .open_in_place_separate_tag(Self::nonce(counter)?, Aad::empty(), tag, out, 0..)
            .map(drop)
            .map_err(|_| tampered(counter))
    }
}

/// The per-direction state of an encrypted stream.
struct Cipher {
    send: Arc<RecordKey>,
    recv: RecordKey,
    send_nonce: u64,
    recv_nonce: u64,
    /// Plaintext written and not sealed yet, already laid out as records (a length
    /// prefix, the plaintext, room for the tag) so the crypto workers seal it in place.
    pending: Vec<u8>,
    /// Plaintext bytes in `pending`.
    pending_plain: usize,
    /// The crypto workers sealing written plaintext (started at the first job).
    sealers: Option<Sealers>,
    /// A sealing job or a socket write failed: the stream cannot go on.
    broken: bool,
    /// Ciphertext read and not opened yet: `rx[rx_start..rx_end]` (allocated once, never
    /// zeroed again).
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    /// Opened plaintext not yet returned (`plain_start..`).
    plain: Vec<u8>,
    plain_start: usize,
}

impl<S> std::fmt::Debug for SecureStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureStream")
            .field("encrypted", &self.cipher.is_some())
            .finish()
    }
}

impl<S> SecureStream<S> {
    fn new(
        inner: S,
        mut hs: HandshakeState,
        protection: Protection,
    ) -> Result<SecureStream<S>, SecureError> {
        if !hs.is_handshake_finished() {
            return Err(SecureError::Noise(snow::Error::State(
                snow::error::StateProblem::HandshakeNotFinished,
            )));
        }
        if protection == Protection::Plaintext {
            return Ok(SecureStream {
                inner,
                cipher: None,
            });
        }
        // Noise's split: the initiator (source) sends under the first key.
        let (first, second) = hs.dangerously_get_raw_split();
        let (send, recv) = match hs.is_initiator() {
            true => (first, second),
            false => (second, first),
        };
        let keyed = |raw: &[u8; 32]| {
            RecordKey::new(raw).map_err(|source| SecureError::Io {
                op: "keying the stream",
                source,
            })
        };
        let cipher = Some(Cipher {
            send: Arc::new(keyed(&send)?),
            recv: keyed(&recv)?,
            send_nonce: 0,
            recv_nonce: 0,
            pending: Vec::new(),
            pending_plain: 0,
            sealers: None,
            broken: false,
            rx: Vec::new(),
            rx_start: 0,
            rx_end: 0,
            plain: Vec::new(),
            plain_start: 0,
        });
        Ok(SecureStream { inner, cipher })
    }

    /// What the stream after the handshake gets.
    pub fn protection(&self) -> Protection {
        if self.cipher.is_some() {
            Protection::Encrypted
        } else {
            Protection::Plaintext
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

fn tampered(nonce: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("integrity check failed: encrypted record {nonce} does not authenticate (it was altered, replayed, reordered or forged on the way)"),
    )
}

/// Threads that open a read's records together: the host's cores, at most 4.
pub fn open_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
}

/// Crypto workers sealing beside the writing thread: one per core beyond the writer's
/// (at most 3), and at least one.
pub fn seal_workers() -> usize {
    open_threads().saturating_sub(1).max(1)
}

/// Seals in place the records laid out in `records` (each a length prefix, its
/// plaintext and room for its tag; all full but the last), the first under `nonce`.
fn seal_records(key: &RecordKey, nonce: u64, records: &mut [u8]) -> io::Result<()> {
    for (i, r) in records.chunks_mut(LEN_PREFIX + MAX_RECORD).enumerate() {
        let len = r.len() - LEN_PREFIX;
        let (prefix, rest) = r.split_at_mut(LEN_PREFIX);
        prefix.copy_from_slice(&(len as u16).to_be_bytes());
        let (body, tag) = rest.split_at_mut(len - TAG_LEN);
        tag.copy_from_slice(key.seal(nonce + i as u64, body)?.as_ref());
    }
    Ok(())
}

/// One sealing job: records laid out in `records`, sealed in place (the buffer goes
/// back and forth).
struct SealJob {
    nonce: u64,
    records: Vec<u8>,
    result: io::Result<()>,
}

/// Persistent crypto workers of one stream; jobs go round robin and come back in order.
struct Sealers {
    jobs: Vec<mpsc::Sender<SealJob>>,
    done: Vec<mpsc::Receiver<SealJob>>,
    threads: Vec<JoinHandle<()>>,
    /// The worker of the next job.
    next: usize,
    /// The worker of each job not yet written, oldest first.
    in_flight: VecDeque<usize>,
    /// Buffers of written jobs, for the next ones.
    spare: Vec<Vec<u8>>,
}

impl Sealers {
    fn start(key: &Arc<RecordKey>, workers: usize) -> io::Result<Sealers> {
        let mut s = Sealers {
            jobs: Vec::new(),
            done: Vec::new(),
            threads: Vec::new(),
            next: 0,
            in_flight: VecDeque::new(),
            spare: Vec::new(),
        };
        for i in 0..workers.max(1) {
            let (job_tx, job_rx) = mpsc::channel::<SealJob>();
            let (done_tx, done_rx) = mpsc::channel::<SealJob>();
            let key = key.clone();
            let t = std::thread::Builder::new()
                .name(format!("ray-mig-seal{i}"))
                .spawn(move || {
                    for mut job in job_rx {
                        job.result = seal_records(&key, job.nonce, &mut job.records);
                        if done_tx.send(job).is_err() {
                            return;
                        }
                    }
                })?;
            s.jobs.push(job_tx);
            s.done.push(done_rx);
            s.threads.push(t);
        }
        Ok(s)
    }

    fn submit(&mut self, job: SealJob) -> io::Result<()> {
        let w = self.next;
        self.next = (w + 1) % self.jobs.len();
        self.jobs[w]
            .send(job)
            .map_err(|_| io::Error::other("a crypto worker is gone"))?;
        self.in_flight.push_back(w);
        Ok(())
    }

    /// The oldest job, sealed; waits for it unless `wait` is false.
    fn oldest(&mut self, wait: bool) -> io::Result<Option<SealJob>> {
        let Some(&w) = self.in_flight.front() else {
            return Ok(None);
        };
        let job = if wait {
            self.done[w].recv().ok()
        } else {
            match self.done[w].try_recv() {
                Ok(j) => Some(j),
                Err(mpsc::TryRecvError::Empty) => return Ok(None),
                Err(mpsc::TryRecvError::Disconnected) => None,
            }
        };
        self.in_flight.pop_front();
        job.map(Some)
            .ok_or_else(|| io::Error::other("a crypto worker stopped (it panicked)"))
    }
}

impl Drop for Sealers {
    fn drop(&mut self) {
        self.jobs.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs `f` on every job, on up to as many threads as the host has cores.
fn run_parallel<J: Send>(jobs: Vec<J>, f: impl Fn(J) -> io::Result<()> + Sync) -> io::Result<()> {
    let threads = open_threads();
    if threads < 2 || jobs.len() < PARALLEL_MIN_RECORDS {
        return jobs.into_iter().try_for_each(f);
    }
    let per = jobs.len().div_ceil(threads);
    let mut groups: Vec<Vec<J>> = Vec::with_capacity(threads);
    let mut it = jobs.into_iter().peekable();
    while it.peek().is_some() {
        groups.push(it.by_ref().take(per).collect());
    }
    let f = &f;
    std::thread::scope(|s| {
        let mut groups = groups.into_iter();
        let mine = groups.next().unwrap_or_default();
        let others: Vec<_> = groups
            .map(|g| s.spawn(move || g.into_iter().try_for_each(f)))
            .collect();
        let first = mine.into_iter().try_for_each(f);
        others.into_iter().fold(first, |acc, h| {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a crypto thread panicked")));
            acc.and(r)
        })
    })
}

impl Cipher {
    /// Appends `len` plaintext bytes to the pending records: `piece(at, n, v)` appends
    /// bytes `at..at + n` of them to `v`. Each record gets its length prefix and the
    /// room for its tag around its plaintext, filled in when it is sealed.
    fn append(&mut self, len: usize, mut piece: impl FnMut(usize, usize, &mut Vec<u8>)) {
        let mut at = 0;
        while at < len {
            let in_record = self.pending_plain % MAX_RECORD_PAYLOAD;
            if in_record == 0 {
                self.pending.extend_from_slice(&[0; LEN_PREFIX]);
            }
            let n = (MAX_RECORD_PAYLOAD - in_record).min(len - at);
            piece(at, n, &mut self.pending);
            at += n;
            self.pending_plain += n;
            if self.pending_plain.is_multiple_of(MAX_RECORD_PAYLOAD) {
                self.pending.extend_from_slice(&[0; TAG_LEN]);
            }
        }
    }

    /// The pending records (the last one closed) and the counter of the first, with
    /// `next` as the new pending buffer; `None` when nothing is pending.
    fn take_records(&mut self, mut next: Vec<u8>) -> Option<(u64, Vec<u8>)> {
        if self.pending_plain == 0 {
            return None;
        }
        if !self.pending_plain.is_multiple_of(MAX_RECORD_PAYLOAD) {
            self.pending.extend_from_slice(&[0; TAG_LEN]);
        }
        next.clear();
        let records = std::mem::replace(&mut self.pending, next);
        let nonce = self.send_nonce;
        self.send_nonce += self.pending_plain.div_ceil(MAX_RECORD_PAYLOAD) as u64;
        self.pending_plain = 0;
        Some((nonce, records))
    }
}

/// What [`Cipher::open`] did.
enum Opened {
    /// Not one record is complete yet.
    Nothing,
    /// The records' plaintext went straight into the caller's buffer: this many bytes.
    Direct(usize),
    /// The records' plaintext is in `plain` (the caller's buffer was too small).
    Buffered,
}

impl Cipher {
    /// Opens every complete record in `rx[rx_start..rx_end]`: into `direct` when their
    /// plaintext fits there (no copy through `plain`), else into `plain` (all of which
    /// was returned).
    fn open(&mut self, direct: &mut [u8]) -> io::Result<Opened> {
        let mut spans = Vec::new();
        let mut at = self.rx_start;
        let mut out_len = 0;
        while self.rx_end - at >= LEN_PREFIX {
            let len = usize::from(u16::from_be_bytes([self.rx[at], self.rx[at + 1]]));
            if len < TAG_LEN {
                return Err(tampered(self.recv_nonce + spans.len() as u64));
            }
            if self.rx_end - at - LEN_PREFIX < len {
                break;
            }
            spans.push((at + LEN_PREFIX, len));
            at += LEN_PREFIX + len;
            out_len += len - TAG_LEN;
        }
        if spans.is_empty() {
            return Ok(Opened::Nothing);
        }
        let fits = out_len <= direct.len();
        let mut rest = if fits {
            &mut direct[..out_len]
        } else {
            self.plain.resize(out_len, 0);
            self.plain_start = 0;
            &mut self.plain[..]
        };
        let first = self.recv_nonce;
        let key = &self.recv;
        let rx = &self.rx;
        let mut jobs = Vec::with_capacity(spans.len());
        for (i, (off, len)) in spans.iter().enumerate() {
            let (mine, tail) = rest.split_at_mut(len - TAG_LEN);
            rest = tail;
            jobs.push((first + i as u64, &rx[*off..off + len], mine));
        }
        run_parallel(jobs, |(nonce, c, p)| key.open_into(nonce, c, p))?;
        self.recv_nonce += spans.len() as u64;
        self.rx_start = at;
        Ok(match fits {
            true => Opened::Direct(out_len),
            false => Opened::Buffered,
        })
    }
}

impl<S: Read> Read for SecureStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(c) = &mut self.cipher else {
            return self.inner.read(buf);
        };
        while c.plain_start == c.plain.len() {
            match c.open(buf)? {
                Opened::Direct(n) if n > 0 || buf.is_empty() => return Ok(n),
                // Records of no plaintext leave nothing: look again.
                Opened::Direct(_) | Opened::Buffered => continue,
                Opened::Nothing => {}
            }
            // Keep the incomplete record at the front, then read more after it.
            c.rx.copy_within(c.rx_start..c.rx_end, 0);
            let have = c.rx_end - c.rx_start;
            (c.rx_start, c.rx_end) = (0, have);
            if c.rx.is_empty() {
                c.rx.resize(READ_CHUNK + LEN_PREFIX + MAX_RECORD, 0);
            }
            let n = loop {
                match self.inner.read(&mut c.rx[have..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            }?;
            c.rx_end = have + n;
            if n == 0 {
                if have == 0 {
                    return Ok(0);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed in the middle of an encrypted record",
                ));
            }
        }
        let n = buf.len().min(c.plain.len() - c.plain_start);
        buf[..n].copy_from_slice(&c.plain[c.plain_start..c.plain_start + n]);
        c.plain_start += n;
        Ok(n)
    }
}

impl<S: Write> SecureStream<S> {
    /// Hands the pending plaintext to the crypto workers as one job.
    fn submit(&mut self) -> io::Result<()> {
        let Some(c) = &mut self.cipher else {
            return Ok(());
        };
        if c.sealers.is_none() {
            c.sealers = Some(Sealers::start(&c.send, seal_workers())?);
        }
        let next = c.sealers.as_mut().and_then(|s| s.spare.pop());
        let Some((nonce, records)) = c.take_records(next.unwrap_or_default()) else {
            return Ok(());
        };
        let Some(sealers) = &mut c.sealers else {
            return Ok(());
        };
        sealers.submit(SealJob {
            nonce,
            records,
            result: Ok(()),
        })
    }

    /// Writes sealed jobs to the socket in order: every one (`all`), or those already
    /// sealed and then the oldest ones until at most [`SEAL_DEPTH`] are left.
    fn send_sealed(&mut self, all: bool) -> io::Result<()> {
        let Some(c) = &mut self.cipher else {
            return Ok(());
        };
        let Some(sealers) = &mut c.sealers else {
            return Ok(());
        };
        loop {
            let left = sealers.in_flight.len();
            if left == 0 {
                return Ok(());
            }
            let Some(mut job) = sealers.oldest(all || left > SEAL_DEPTH)? else {
                return Ok(());
            };
            std::mem::replace(&mut job.result, Ok(()))?;
            self.inner.write_all(&job.records)?;
            job.records.clear();
            sealers.spare.push(job.records);
        }
    }

    /// Hands the pending plaintext to the crypto workers once it is [`SEAL_CHUNK`] bytes
    /// or more, and writes out what they sealed.
    fn seal_full(&mut self) -> io::Result<()> {
        if self
            .cipher
            .as_ref()
            .is_some_and(|c| c.pending_plain >= SEAL_CHUNK)
        {
            self.guarded(|s| {
                s.submit()?;
                s.send_sealed(false)
            })?;
        }
        Ok(())
    }

    /// Seals and sends everything written so far.
    fn send_all(&mut self) -> io::Result<()> {
        self.submit()?;
        self.send_sealed(true)
    }

    /// Marks the stream broken on an error: records after a lost one could not open.
    fn guarded(&mut self, f: impl FnOnce(&mut Self) -> io::Result<()>) -> io::Result<()> {
        if self.cipher.as_ref().is_some_and(|c| c.broken) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the encrypted stream failed earlier and cannot go on",
            ));
        }
        let r = f(self);
        if r.is_err() {
            if let Some(c) = &mut self.cipher {
                c.broken = true;
            }
        }
        r
    }
}

impl<S: Write> Write for SecureStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// Encrypted, the parts are buffered; once [`SEAL_CHUNK`] bytes wait they go to the
    /// crypto workers and sealed jobs are written out (a flush sends everything);
    /// plaintext goes straight to the socket.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(c) = &mut self.cipher else {
            return self.inner.write_vectored(bufs);
        };
        let mut n = 0;
        for b in bufs {
            c.append(b.len(), |at, len, v| v.extend_from_slice(&b[at..at + len]));
            n += b.len();
        }
        self.seal_full()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.guarded(Self::send_all)?;
        self.inner.flush()
    }
}

impl<S: Read + Write> FrameStream for SecureStream<S> {
    /// Encrypted, guest memory is copied straight into the records being built (no batch
    /// buffer in between), a [`SEAL_CHUNK`] at a time, the pending records handed to the
    /// crypto workers whenever they hold that much, so sealing starts while the rest is
    /// still copied.
    fn write_with_guest(
        &mut self,
        before: &[&[u8]],
        guest: &[GuestSpan<'_>],
        after: &[u8],
    ) -> io::Result<()> {
        if self.cipher.is_none() {
            return write_all_vectored(self, before, guest, after);
        }
        for p in before {
            self.write_all(p)?;
        }
        for piece in guest.iter().flat_map(|g| g.chunks(SEAL_CHUNK)) {
            if let Some(c) = &mut self.cipher {
                c.append(piece.len(), |at, n, v| {
                    if let Some(p) = piece.sub(at, n) {
                        p.append_to(v);
                    }
                });
            }
            self.seal_full()?;
        }
        self.write_all(after)
    }
}

/// What the cipher alone takes on some bytes (`ray bench migrate`'s `cipher_ratio`),
/// measured as a migration uses it: both ends run on this host, so the work is sealing
/// AND opening every byte.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CipherTimes {
    /// Sealing every byte through a source stream: 4 MiB writes (one page batch each),
    /// sealed by the stream's [`seal_workers`] crypto workers, the records collected in
    /// memory.
    pub seal: std::time::Duration,
    /// Opening those records through a target stream, 4 MiB reads (one page batch
    /// each), each read's records on [`open_threads`] threads.
    pub open: std::time::Duration,
    /// Sealing every byte on the calling thread alone, record after record.
    pub seal_one_core: std::time::Duration,
    pub seal_workers: usize,
    pub open_threads: usize,
}

/// Times the cipher alone on `data` under fresh keys (see [`CipherTimes`]). Every
/// buffer is touched before the clock starts, so no page fault is counted.
pub fn cipher_alone(data: &[u8]) -> Result<CipherTimes, SecureError> {
    let (a, b) = std::os::unix::net::UnixStream::pair().map_err(|source| SecureError::Io {
        op: "creating a socket pair",
        source,
    })?;
    let key = PresharedKey::new(b"rayvisor cipher benchmark key").map_err(|e| SecureError::Io {
        op: "making a key",
        source: io::Error::other(e.to_string()),
    })?;
    let target = {
        let key = key.clone();
        std::thread::spawn(move || accept_secure(b, &key, Protection::Encrypted))
    };
    let source = connect_secure(a, &key, Protection::Encrypted)?;
    let target = target
        .join()
        .map_err(|_| SecureError::ClosedInHandshake)??;
    let failed = |op| move |source| SecureError::Io { op, source };
    const BATCH: usize = 4 << 20;
    let records = data.len().div_ceil(MAX_RECORD_PAYLOAD);
    let mut wire = vec![1u8; data.len() + records * (LEN_PREFIX + TAG_LEN) + MAX_RECORD];
    wire.clear();
    let mut sealer = SecureStream {
        inner: wire,
        cipher: source.cipher,
    };
    let t = std::time::Instant::now();
    for batch in data.chunks(BATCH) {
        sealer
            .write_all(batch)
            .map_err(failed("sealing in memory"))?;
    }
    sealer.flush().map_err(failed("sealing in memory"))?;
    let seal = t.elapsed();
    let SecureStream {
        inner: wire,
        cipher,
    } = sealer;
    let mut opener = SecureStream {
        inner: io::Cursor::new(wire),
        cipher: target.cipher,
    };
    let mut out = vec![1u8; BATCH.min(data.len())];
    // The target stream's own buffers, touched too.
    if let Some(c) = &mut opener.cipher {
        c.rx.resize(READ_CHUNK + LEN_PREFIX + MAX_RECORD, 1);
        c.plain.resize(READ_CHUNK, 1);
        c.plain.clear();
    }
    let t = std::time::Instant::now();
    let mut left = data.len();
    while left > 0 {
        let n = left.min(out.len());
        opener
            .read_exact(&mut out[..n])
            .map_err(failed("opening in memory"))?;
        left -= n;
    }
    let open = t.elapsed();
    let mut c = cipher.ok_or_else(|| SecureError::Io {
        op: "sealing in memory",
        source: io::Error::other("the stream is not encrypted"),
    })?;
    // As a stream seals, on this thread alone: copy into records, seal them in place.
    let mut one =
        vec![1u8; BATCH + BATCH / MAX_RECORD_PAYLOAD * (LEN_PREFIX + TAG_LEN) + MAX_RECORD];
    let t = std::time::Instant::now();
    for batch in data.chunks(BATCH) {
        c.append(batch.len(), |at, len, v| {
            v.extend_from_slice(&batch[at..at + len])
        });
        let taken = c.take_records(std::mem::take(&mut one));
        if let Some((nonce, mut records)) = taken {
            seal_records(&c.send, nonce, &mut records).map_err(failed("sealing on one core"))?;
            one = records;
        }
    }
    let seal_one_core = t.elapsed();
    Ok(CipherTimes {
        seal,
        open,
        seal_one_core,
        seal_workers: seal_workers(),
        open_threads: open_threads(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::thread;

    fn key(s: &str) -> PresharedKey {
        PresharedKey::new(s.as_bytes()).unwrap()
    }

    /// A source and a target stream over a socket pair, after the handshake.
    fn pair(p: Protection) -> (SecureStream<UnixStream>, SecureStream<UnixStream>) {
        let (a, b) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || accept_secure(b, &key("a shared key of length"), p));
        let s = connect_secure(a, &key("a shared key of length"), p).unwrap();
        (s, t.join().unwrap().unwrap())
    }

    #[test]
    fn bytes_cross_encrypted_both_ways_in_records_of_any_size() {
        let (mut s, mut t) = pair(Protection::Encrypted);
        assert_eq!(s.protection(), Protection::Encrypted);
        let big: Vec<u8> = (0..3 * MAX_RECORD_PAYLOAD + 17)
            .map(|i| (i * 7) as u8)
            .collect();
        let w = thread::spawn(move || {
            s.write_all(b"hello").unwrap();
            s.flush().unwrap();
            s.write_all(&vec![5u8; 20 << 20]).unwrap();
            s.flush().unwrap();
            s
        });
        let mut got = [0u8; 5];
        t.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        let mut got = vec![0u8; 20 << 20];
        t.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&b| b == 5));
        let mut s = w.join().unwrap();
        t.write_all(&big).unwrap();
        t.flush().unwrap();
        let mut got = vec![0u8; big.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, big);
    }

    /// `m` sealed into records under the next counter values, as a stream sends them.
    fn seal_now(c: &mut Cipher, m: &[u8]) -> Vec<u8> {
        c.append(m.len(), |at, n, v| v.extend_from_slice(&m[at..at + n]));
        let (nonce, mut wire) = c.take_records(Vec::new()).unwrap();
        seal_records(&c.send, nonce, &mut wire).unwrap();
        wire
    }

    #[test]
    fn records_are_noise_transport_messages_both_ways() {
        // One session handshaken in memory: the source as our stream, the target as
        // snow's own transport state. Each opens what the other sealed.
        let pre = preamble(Protection::Encrypted);
        let k = key("a shared key of length");
        let mut i = handshake_state(&k, &pre, true).unwrap();
        let mut r = handshake_state(&k, &pre, false).unwrap();
        let (mut m, mut p) = ([0u8; MAX_RECORD], [0u8; MAX_RECORD]);
        let n = i.write_message(&[], &mut m).unwrap();
        r.read_message(&m[..n], &mut p).unwrap();
        let n = r.write_message(&[], &mut m).unwrap();
        i.read_message(&m[..n], &mut p).unwrap();
        let mut ours = SecureStream::new((), i, Protection::Encrypted)
            .unwrap()
            .cipher
            .unwrap();
        let theirs = r.into_stateless_transport_mode().unwrap();
        let msg: Vec<u8> = (0..MAX_RECORD_PAYLOAD + 100).map(|b| b as u8).collect();
        let wire = seal_now(&mut ours, &msg);
        let mut got = Vec::new();
        let mut at = 0;
        for nonce in 0..2 {
            let len = usize::from(u16::from_be_bytes([wire[at], wire[at + 1]]));
            let n = theirs
                .read_message(nonce, &wire[at + 2..at + 2 + len], &mut p)
                .unwrap();
            got.extend_from_slice(&p[..n]);
            at += 2 + len;
        }
        assert_eq!((got, at), (msg, wire.len()));
        let n = theirs.write_message(0, b"from the target", &mut m).unwrap();
        let mut out = [0u8; 15];
        ours.recv.open_into(0, &m[..n], &mut out).unwrap();
        assert_eq!(&out, b"from the target");
        assert!(ours.recv.open_into(1, &m[..n], &mut out).is_err());
    }

    /// Sealed records as the source would send them, and a fresh target to open them.
    fn sealed_records(msgs: &[&[u8]]) -> (Vec<Vec<u8>>, SecureStream<io::Cursor<Vec<u8>>>) {
        let (s, t) = pair(Protection::Encrypted);
        let (mut s, t) = (s.cipher.unwrap(), t.cipher.unwrap());
        let out = msgs.iter().map(|m| seal_now(&mut s, m)).collect();
        let target = SecureStream {
            inner: io::Cursor::new(Vec::new()),
            cipher: Some(t),
        };
        (out, target)
    }

    fn read_all(mut t: SecureStream<io::Cursor<Vec<u8>>>, wire: Vec<u8>) -> io::Result<Vec<u8>> {
        t.inner = io::Cursor::new(wire);
        let mut got = Vec::new();
        t.read_to_end(&mut got)?;
        Ok(got)
    }

    #[test]
    fn unflushed_writes_are_sealed_in_the_background_and_arrive_in_order_at_the_flush() {
        // Many jobs in flight at once (more than SEAL_DEPTH), of several sizes, none
        // flushed until the end: every byte arrives once, in order.
        let (mut s, mut t) = pair(Protection::Encrypted);
        let sizes = [
            SEAL_CHUNK + 3,
            17,
            4 << 20,
            SEAL_CHUNK - 1,
            1,
            3 * SEAL_CHUNK,
            5,
        ];
        let mut sent = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            sent.extend((0..*n).map(|k| (k * 13 + i * 101) as u8));
        }
        let total = sent.len();
        let parts = sent.clone();
        let w = thread::spawn(move || {
            let mut at = 0;
            for n in sizes {
                s.write_all(&parts[at..at + n]).unwrap();
                at += n;
            }
            assert!(
                s.cipher.as_ref().unwrap().sealers.is_some(),
                "big writes went to the crypto workers"
            );
            s.flush().unwrap();
            s
        });
        let mut got = vec![0u8; total];
        t.read_exact(&mut got).unwrap();
        assert!(got == sent, "the bytes arrived altered or out of order");
        let s = w.join().unwrap();
        let c = s.cipher.as_ref().unwrap();
        assert!(c.pending.is_empty());
        assert!(c.sealers.as_ref().unwrap().in_flight.is_empty());
    }

    #[test]
    fn a_failed_socket_write_leaves_the_stream_refusing_further_writes() {
        let (mut s, t) = pair(Protection::Encrypted);
        drop(t);
        let big = vec![9u8; 2 * SEAL_CHUNK];
        let mut failed = None;
        for _ in 0..64 {
            if let Err(e) = s.write_all(&big).and_then(|()| s.flush()) {
                failed = Some(e);
                break;
            }
        }
        assert!(
            failed.is_some(),
            "writing into a closed socket kept succeeding"
        );
        let e = s.write_all(&big).and_then(|()| s.flush()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
        assert!(e.to_string().contains("failed earlier"), "{e}");
    }

    #[test]
    fn records_in_order_open() {
        let (r, t) = sealed_records(&[b"one", b"two"]);
        assert_eq!(read_all(t, r.concat()).unwrap(), b"onetwo");
    }

    #[test]
    fn writes_ending_on_and_around_record_boundaries_open_whole() {
        let m = |n: usize, b: u8| vec![b; n];
        let parts = [
            m(MAX_RECORD_PAYLOAD, 1),
            m(2 * MAX_RECORD_PAYLOAD, 2),
            m(MAX_RECORD_PAYLOAD - 1, 3),
            m(1, 4),
            m(MAX_RECORD_PAYLOAD + 1, 5),
        ];
        let msgs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
        let (r, t) = sealed_records(&msgs);
        // Each write's records: full ones, then its rest; every one a prefix, its
        // plaintext and a tag.
        let lens: Vec<usize> = r.iter().map(Vec::len).collect();
        let rec = LEN_PREFIX + MAX_RECORD;
        assert_eq!(
            lens,
            [
                rec,
                2 * rec,
                rec - 1,
                LEN_PREFIX + 1 + TAG_LEN,
                rec + LEN_PREFIX + 1 + TAG_LEN
            ]
        );
        assert_eq!(read_all(t, r.concat()).unwrap(), parts.concat());
    }

    #[test]
    fn a_replayed_record_is_refused() {
        let (r, t) = sealed_records(&[b"one", b"two"]);
        let wire = [r[0].clone(), r[0].clone(), r[1].clone()].concat();
        let e = read_all(t, wire).unwrap_err();
        assert!(
            e.to_string().contains("record 1 does not authenticate"),
            "{e}"
        );
    }

    #[test]
    fn reordered_records_are_refused() {
        let (r, t) = sealed_records(&[b"one", b"two"]);
        let e = read_all(t, [r[1].clone(), r[0].clone()].concat()).unwrap_err();
        assert!(
            e.to_string().contains("record 0 does not authenticate"),
            "{e}"
        );
    }

    #[test]
    fn a_dropped_record_is_refused() {
        let (r, t) = sealed_records(&[b"one", b"two", b"three"]);
        let e = read_all(t, [r[0].clone(), r[2].clone()].concat()).unwrap_err();
        assert!(
            e.to_string().contains("record 1 does not authenticate"),
            "{e}"
        );
    }

    #[test]
    fn one_flipped_bit_is_refused() {
        let (r, t) = sealed_records(&[b"some page data"]);
        let mut wire = r.concat();
        wire[5] ^= 1;
        let e = read_all(t, wire).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("integrity check failed"), "{e}");
    }

    #[test]
    fn a_record_cut_short_is_an_error_not_an_end() {
        let (r, t) = sealed_records(&[b"some page data"]);
        let mut wire = r.concat();
        wire.pop();
        let e = read_all(t, wire).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn records_from_another_direction_do_not_open() {
        // The target's own sealing key is not the source's: a record reflected back to
        // its sender fails.
        let (s, t) = pair(Protection::Encrypted);
        let mut tc = t.cipher.unwrap();
        let wire = seal_now(&mut tc, b"reflected");
        let mut back = SecureStream {
            inner: io::Cursor::new(wire),
            cipher: Some(tc),
        };
        let _ = s;
        let e = {
            let mut got = Vec::new();
            back.read_to_end(&mut got).unwrap_err()
        };
        assert!(e.to_string().contains("does not authenticate"), "{e}");
    }

    #[test]
    fn a_wrong_key_is_refused_by_both_ends() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || {
            accept_secure(b, &key("the target's own key"), Protection::Encrypted).map(drop)
        });
        let s = connect_secure(a, &key("another key, not it"), Protection::Encrypted);
        let t = t.join().unwrap().unwrap_err();
        assert!(matches!(t, SecureError::SourceKeyRefused), "{t}");
        let s = s.unwrap_err();
        assert!(matches!(s, SecureError::ClosedInHandshake), "{s}");
    }

    #[test]
    fn protections_must_match_and_say_so() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || {
            accept_secure(b, &key("a shared key of length"), Protection::Encrypted).map(drop)
        });
        let s = connect_secure(a, &key("a shared key of length"), Protection::Plaintext);
        let t = t.join().unwrap().unwrap_err();
        assert!(
            t.to_string()
                .contains("insecure plaintext migration but this target is set to encrypted"),
            "{t}"
        );
        let s = s.unwrap_err();
        assert!(matches!(s, SecureError::RefusedByTarget { .. }), "{s}");
        assert!(s.to_string().contains("--insecure-plaintext"), "{s}");
    }

    #[test]
    fn an_altered_preamble_breaks_the_handshake() {
        // A man in the middle rewrites "plaintext" to "encrypted" in the preamble to
        // get past the target's check: the prologue then differs and the keys with it.
        let (a, b) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || {
            accept_secure(b, &key("a shared key of length"), Protection::Encrypted).map(drop)
        });
        let mut a = a;
        let mut pre = preamble(Protection::Plaintext);
        pre[5] = Protection::Encrypted.byte();
        a.write_all(&pre).unwrap();
        let mut ack = [0u8; 2];
        a.read_exact(&mut ack).unwrap();
        let mut hs = handshake_state(
            &key("a shared key of length"),
            &preamble(Protection::Plaintext),
            true,
        )
        .unwrap();
        let mut buf = [0u8; MAX_RECORD];
        let n = hs.write_message(&[], &mut buf).unwrap();
        write_message(&mut a, &buf[..n]).unwrap();
        let t = t.join().unwrap().unwrap_err();
        assert!(matches!(t, SecureError::SourceKeyRefused), "{t}");
    }

    #[test]
    fn garbage_is_not_a_migration() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let e =
            accept_secure(b, &key("a shared key of length"), Protection::Encrypted).unwrap_err();
        assert!(matches!(e, SecureError::NotAMigration { .. }), "{e}");
    }

    #[test]
    fn the_cipher_alone_seals_and_opens_every_byte() {
        let t = cipher_alone(&vec![7u8; 8 << 20]).unwrap();
        assert!(t.seal > std::time::Duration::ZERO, "{t:?}");
        assert!(t.open > std::time::Duration::ZERO, "{t:?}");
        assert!(t.seal_one_core > std::time::Duration::ZERO, "{t:?}");
        assert_eq!(t.seal_workers, seal_workers());
    }

    #[test]
    fn plaintext_passes_bytes_through_after_the_handshake() {
        let (mut s, mut t) = pair(Protection::Plaintext);
        assert_eq!(t.protection(), Protection::Plaintext);
        s.write_all(b"clear").unwrap();
        s.flush().unwrap();
        let mut got = [0u8; 5];
        t.inner.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"clear", "the bytes are on the wire as written");
    }
}
