//! The target side: answers the source, writes pages, restores state, verifies, resumes.
//!
//! In two steps when the target needs them: [`authenticate`] runs the handshake on a new
//! connection (the Noise handshake of [`crate::secure`], which proves the pre-shared key
//! both ways, then the protocol version) and reads the source's
//! [`CompatInfo`] without answering it; [`Authenticated::receive`] then checks it against
//! the VM shell prepared here and receives the VM. In between, a target that was not told
//! the VM's shape can size its memory from what the source describes. A connection that
//! fails before proving the key ([`HandshakeFailure::authenticated`] false) may be
//! anyone's (a port scan, a stray HTTP request, a source with another key): nothing was
//! received and the target's memory is untouched, so the target drops it and waits for the
//! next one. [`receive_migration`] does both steps at once.

use std::io::{Read, Write};
use std::path::PathBuf;

use ray_memory::{GuestMemory, MemoryLayout};

use crate::auth::{self, PresharedKey};
use crate::disk::TargetDisks;
use crate::frame::{Channel, FrameStream, Received, SUPPORTED_VERSIONS};
use crate::progress::{CancelToken, ProgressHandle};
use crate::protocol::{parse_disk_blocks, Command, CompatInfo, ErrorCode, Message, PageBatchView};
use crate::secure::{accept_secure, Protection, SecureStream};
use crate::session::{Session, SessionEvent, SessionState};
use crate::vm::{PageHashes, TargetVm};
use crate::MigrationError;

/// Target settings.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub key: PresharedKey,
    /// What the source must ask for: a source asking for anything else is refused.
    pub protection: Protection,
    pub progress: ProgressHandle,
    /// Checked between frames; a cancelled target tears down and tells the source.
    pub cancel: CancelToken,
    /// Where disks the source copies (`--copy-disks`) go: `DIR/<id>.img`, created here
    /// (never overwritten) and removed again if the migration fails. `None`: a source
    /// that copies disks is refused.
    pub disk_dir: Option<PathBuf>,
    /// This target's name in the partial files of copied disks (`DIR/.<id>.img.<tag>.part`
    /// until the copy is complete, flushed and verified): the VM's id, so that a target
    /// of the same VM removes what a killed one left.
    pub disk_tag: String,
    /// The protocol versions this target accepts (default: every one this build speaks).
    pub versions: Vec<u16>,
}

impl ReceiverConfig {
    pub fn new(key: PresharedKey) -> Self {
        Self {
            key,
            protection: Protection::Encrypted,
            progress: ProgressHandle::new(),
            cancel: CancelToken::new(),
            disk_dir: None,
            disk_tag: "target".into(),
            versions: SUPPORTED_VERSIONS.to_vec(),
        }
    }
}

/// A completed migration, seen from the target: the VM runs here now.
#[derive(Debug, Clone)]
pub struct ReceiveReport {
    pub passes: u32,
    pub pages_received: u64,
    pub bytes_received: u64,
    pub state_bytes: usize,
    /// `(id, path)` of each disk copied here (`--copy-disks`): the VM runs on these now.
    pub disks: Vec<(String, PathBuf)>,
    pub session: Session,
}

/// A failed migration, seen from the target. Unless `owns_vm`, the half-built VM was
/// discarded and never ran.
#[derive(Debug, thiserror::Error)]
#[error("incoming migration failed in state {failed_in:?}: {error}")]
pub struct ReceiveFailure {
    #[source]
    pub error: MigrationError,
    pub failed_in: SessionState,
    /// True only if the failure came after `Switchover` and the VM was resumed here.
    pub owns_vm: bool,
    /// Whether the peer had proved the pre-shared key when it failed. A failure before
    /// that ([`HandshakeFailure::authenticated`] false) came from a connection that may be
    /// anyone's (a port scan, a stray HTTP request, a source with the wrong key): nothing
    /// was received and target memory was not touched, so a target may drop it and wait
    /// for the real source.
    pub authenticated: bool,
    pub session: Session,
}

/// A connection that did not get through the handshake ([`authenticate`]).
#[derive(Debug, thiserror::Error)]
#[error("{}: {error}", if *.authenticated { "the authenticated source failed the handshake" } else { "a connection failed before authenticating" })]
pub struct HandshakeFailure {
    #[source]
    pub error: MigrationError,
    /// False when the failure came before the peer proved the pre-shared key: the
    /// connection may be anyone's, and the target should drop it and keep waiting.
    pub authenticated: bool,
}

impl From<HandshakeFailure> for ReceiveFailure {
    fn from(f: HandshakeFailure) -> Self {
        let mut session = Session::new();
        let _ = session.apply(SessionEvent::Fault);
        ReceiveFailure {
            error: f.error,
            failed_in: SessionState::Idle,
            owns_vm: false,
            authenticated: f.authenticated,
            session,
        }
    }
}

/// A source that proved the pre-shared key and described its VM ([`CompatInfo`]), which
/// is not answered yet: the target may prepare the VM shell for it (e.g. size memory
/// from [`source`](Self::source)), then [`receive`](Self::receive) or
/// [`refuse`](Self::refuse) it.
pub struct Authenticated<S> {
    ch: Channel<SecureStream<S>>,
    compat_request: u64,
    source: CompatInfo,
    version: u16,
}

impl<S: Read + Write> Authenticated<S> {
    /// What the source says its VM is: vCPUs, memory regions, CPU, flavour.
    pub fn source(&self) -> &CompatInfo {
        &self.source
    }

    /// The connection (e.g. to change its timeouts once authenticated).
    pub fn get_ref(&self) -> &S {
        self.ch.get_ref().get_ref()
    }

    /// Tells the source this target cannot take its VM (`reason` names what differs),
    /// and returns the failure.
    pub fn refuse(mut self, reason: String) -> ReceiveFailure {
        let _ = self.ch.send(
            &Message::Incompatible {
                reason: reason.clone(),
            },
            self.compat_request,
            true,
        );
        HandshakeFailure {
            error: MigrationError::Incompatible { reason },
            authenticated: true,
        }
        .into()
    }

    /// Checks the source against `local` (refusing it, naming the first difference, if
    /// it cannot run here), then receives the VM into `mem`: see [`receive_migration`].
    pub fn receive<M, V>(
        self,
        mem: &M,
        vm: &mut V,
        local: &CompatInfo,
        cfg: &ReceiverConfig,
    ) -> Result<ReceiveReport, ReceiveFailure>
    where
        M: GuestMemory + ?Sized,
        V: TargetVm + ?Sized,
    {
        if let Some(reason) = local.mismatch(&self.source) {
            return Err(self.refuse(reason));
        }
        let mut r = Receiver {
            ch: self.ch,
            session: Session::new(),
            cfg,
            pages: 0,
            pass_pages: 0,
            passes: 0,
            state_bytes: 0,
            verified: false,
            version: self.version,
            disks: None,
            disk_pass: 0,
            disks_verified: false,
        };
        let accepted = r.ack(self.compat_request, Command::Compat);
        match accepted.and_then(|()| r.run(mem, vm, local)) {
            Ok(()) => Ok(ReceiveReport {
                passes: r.passes,
                pages_received: r.pages,
                bytes_received: r.ch.bytes_received(),
                state_bytes: r.state_bytes,
                disks: r.disks.take().map(TargetDisks::keep).unwrap_or_default(),
                session: r.session,
            }),
            Err(error) => Err(r.fail(vm, error)),
        }
    }
}

/// The target's half of the handshake on a new connection: protocol version, mutual
/// proof of the pre-shared key, and the source's [`CompatInfo`] (read, not answered).
/// Nothing of the target's VM is touched. A failure says whether the peer had proved the
/// key ([`HandshakeFailure::authenticated`]); one that had not is not a migration at all.
pub fn authenticate<S: Read + Write>(
    stream: S,
    cfg: &ReceiverConfig,
) -> Result<Authenticated<S>, HandshakeFailure> {
    let failed = |error, authenticated| HandshakeFailure {
        error,
        authenticated,
    };
    let secure = accept_secure(stream, &cfg.key, cfg.protection)
        .map_err(|e| failed(MigrationError::Secure(e), false))?;
    let mut ch = Channel::new(secure);
    let version = handshake(&mut ch, &cfg.versions).map_err(|e| failed(e, true))?;
    let (h, m) = ch
        .recv()
        .map_err(|e| failed(MigrationError::Protocol(e), true))?;
    let source = match m {
        Message::Compat(c) => c,
        other => {
            let err = MigrationError::Unexpected {
                state: SessionState::Idle,
                expected: "Compat",
                got: other.command(),
            };
            return Err(failed(
                refuse(&mut ch, h.request_id, ErrorCode::Protocol, err),
                true,
            ));
        }
    };
    Ok(Authenticated {
        ch,
        compat_request: h.request_id,
        source,
        version,
    })
}

/// Tells the peer why we stop (best effort), then returns the local error.
fn refuse<S: FrameStream>(
    ch: &mut Channel<S>,
    id: u64,
    code: ErrorCode,
    err: MigrationError,
) -> MigrationError {
    let _ = ch.send(
        &Message::Error {
            code,
            message: err.to_string(),
        },
        id,
        true,
    );
    err
}

/// Version negotiation, over the stream the Noise handshake secured: the newest version
/// both speak (of `ours`), or a refusal naming both lists.
fn handshake<S: FrameStream>(ch: &mut Channel<S>, ours: &[u16]) -> Result<u16, MigrationError> {
    let (h, m) = ch.recv()?;
    let theirs = match m {
        Message::Hello { versions } => versions,
        other => {
            return Err(MigrationError::Unexpected {
                state: SessionState::Idle,
                expected: "Hello",
                got: other.command(),
            })
        }
    };
    let Some(version) = ours
        .iter()
        .rev()
        .find(|v| theirs.contains(v) && SUPPORTED_VERSIONS.contains(v))
        .copied()
    else {
        let err = MigrationError::NoCommonVersion {
            ours: ours.to_vec(),
            theirs,
        };
        return Err(refuse(ch, h.request_id, ErrorCode::Protocol, err));
    };
    ch.send(
        &Message::Hello {
            versions: vec![version],
        },
        h.request_id,
        true,
    )?;
    ch.set_version(version);
    Ok(version)
}

/// Receives a VM over `stream`. `local` describes the VM shell prepared here; the source
/// must match it exactly.
///
/// `mem` is the target's guest memory: no vCPU may run on it until the driver calls
/// [`TargetVm::resume`] (after the switch-over), and nothing but this receiver writes it
/// meanwhile: pages are read from the socket straight into it. Its writes are reported
/// through [`GuestMemory::note_write`]; zero pages go through
/// [`GuestMemory::write_zeros`], so memory [`known_zero`](GuestMemory::known_zero) is not
/// touched.
pub fn receive_migration<S, M, V>(
    stream: S,
    mem: &M,
    vm: &mut V,
    local: &CompatInfo,
    cfg: &ReceiverConfig,
) -> Result<ReceiveReport, ReceiveFailure>
where
    S: Read + Write,
    M: GuestMemory + ?Sized,
    V: TargetVm + ?Sized,
{
    authenticate(stream, cfg)?.receive(mem, vm, local, cfg)
}

struct Receiver<'a, S> {
    ch: Channel<S>,
    session: Session,
    cfg: &'a ReceiverConfig,
    pages: u64,
    pass_pages: u64,
    passes: u32,
    state_bytes: usize,
    verified: bool,
    version: u16,
    /// The files of the disks the source copies, once it announced them.
    disks: Option<TargetDisks>,
    /// The last pass whose disk blocks were announced complete (`DiskPass`).
    disk_pass: u32,
    disks_verified: bool,
}

impl<S: FrameStream> Receiver<'_, S> {
    fn event(&mut self, e: SessionEvent) -> Result<(), MigrationError> {
        let to = self.session.apply(e)?;
        self.cfg.progress.update(|p| p.state = to);
        Ok(())
    }

    fn count_pages(&mut self, n: u64) {
        self.pages += n;
        self.pass_pages += n;
        self.cfg.progress.update(|p| p.pages_sent += n);
    }

    fn reply(&mut self, id: u64, msg: &Message) -> Result<(), MigrationError> {
        Ok(self.ch.send(msg, id, true)?)
    }

    fn ack(&mut self, id: u64, command: Command) -> Result<(), MigrationError> {
        self.reply(id, &Message::Ack { command })
    }

    /// Tells the source why we stop, then returns the local error.
    fn refuse(&mut self, id: u64, code: ErrorCode, err: MigrationError) -> MigrationError {
        refuse(&mut self.ch, id, code, err)
    }

    fn unexpected(&self, expected: &'static str, got: Command) -> MigrationError {
        MigrationError::Unexpected {
            state: self.session.state(),
            expected,
            got,
        }
    }

    fn run<M, V>(&mut self, mem: &M, vm: &mut V, local: &CompatInfo) -> Result<(), MigrationError>
    where
        M: GuestMemory + ?Sized,
        V: TargetVm + ?Sized,
    {
        self.event(SessionEvent::Start)?;
        let layout = mem.layout();
        let page_size = local.page_size as usize;
        // What each page is in our memory, hashed as it was placed.
        let mut hashes = PageHashes::new(layout, page_size);
        loop {
            if self.cfg.cancel.is_cancelled() {
                let _ = self.reply(
                    0,
                    &Message::Abort {
                        reason: "the target cancelled the migration".into(),
                    },
                );
                return Err(MigrationError::Cancelled);
            }
            let state = self.session.state();
            let pages_expected = matches!(state, SessionState::PreCopy | SessionState::StopAndCopy);
            let frame = if pages_expected {
                match self.ch.recv_frame_placing(mem, &mut hashes, page_size)? {
                    Received::Placed { pages, .. } => {
                        self.count_pages(pages);
                        continue;
                    }
                    Received::Frame(f) => f,
                }
            } else {
                self.ch.recv_frame()?
            };
            let id = frame.header.request_id;
            let command = frame.header.command;
            if pages_expected && command == Command::DiskBlocks {
                let written = match (&mut self.disks, parse_disk_blocks(frame.payload)) {
                    (Some(disks), Ok(r)) => disks.write(r.disk, r.offset, r.len, r.data),
                    (None, _) => {
                        Err("the source sent disk blocks without announcing its disks".into())
                    }
                    (_, Err(e)) => Err(e.to_string()),
                };
                if let Err(reason) = written {
                    let err = MigrationError::Disk { reason };
                    return Err(self.refuse(id, ErrorCode::Disk, err));
                }
                continue;
            }
            if pages_expected && command == Command::MemoryPages {
                // MACed or compressed: checked as a whole, then copied into place.
                let view = PageBatchView::parse(frame.payload)?;
                for (gpa, data) in view.iter() {
                    let len = data.map_or(page_size, <[u8]>::len);
                    if len != page_size || !inside(layout, gpa, len) {
                        return Err(MigrationError::PageOutOfRange { gpa, len });
                    }
                    match data {
                        Some(data) => mem.write(gpa, data)?,
                        None => mem.write_zeros(gpa, len as u64)?,
                    }
                    hashes.record_from(mem, gpa, len as u64)?;
                }
                let n = view.len() as u64;
                self.count_pages(n);
                continue;
            }
            let msg = frame.message()?;
            match (state, msg) {
                (SessionState::PreCopy, Message::DiskList(list))
                    if self.disks.is_none() && self.passes == 0 && self.pass_pages == 0 =>
                {
                    if self.version < 5 {
                        let err = self
                            .unexpected("no disk list in protocol version 4", Command::DiskList);
                        return Err(self.refuse(id, ErrorCode::Protocol, err));
                    }
                    let made = match &self.cfg.disk_dir {
                        None => Err(format!(
                            "the source copies {} disk(s) ({}) but this target was started without a disk directory (ray migrate receive --disk-dir DIR)",
                            list.len(),
                            list.iter().map(|d| d.id.as_str()).collect::<Vec<_>>().join(", ")
                        )),
                        Some(dir) => TargetDisks::create(dir, &self.cfg.disk_tag, &list),
                    };
                    let disks = match made {
                        Ok(d) => d,
                        Err(reason) => {
                            let err = MigrationError::DiskCopyRefused { reason };
                            return Err(self.refuse(id, ErrorCode::Disk, err));
                        }
                    };
                    // Kept from here on, so a failure below removes the files.
                    let paths = disks.paths();
                    self.disks = Some(disks);
                    if let Err(e) = vm.disks_arrived(&paths) {
                        let err = MigrationError::DiskCopyRefused {
                            reason: e.to_string(),
                        };
                        return Err(self.refuse(id, ErrorCode::Disk, err));
                    }
                    self.ack(id, Command::DiskList)?;
                }
                (SessionState::PreCopy, Message::DiskPass { pass, bytes })
                    if self.disks.is_some() =>
                {
                    let received = self.disks.as_mut().map_or(0, TargetDisks::end_pass);
                    if received != bytes {
                        let err = MigrationError::DiskPassMismatch {
                            pass,
                            announced: bytes,
                            received,
                        };
                        return Err(self.refuse(id, ErrorCode::Disk, err));
                    }
                    self.disk_pass = pass;
                }
                (SessionState::PreCopy, Message::DirtyPass { pass, .. })
                    if self.disks.is_some() && self.disk_pass != pass =>
                {
                    let err = MigrationError::Disk {
                        reason: format!("pass {pass} ended without its disk blocks (DiskPass)"),
                    };
                    return Err(self.refuse(id, ErrorCode::Disk, err));
                }
                (SessionState::Verification, Message::DiskVerify(theirs))
                    if self.disks.is_some() && !self.disks_verified =>
                {
                    let disks = self.disks.as_ref().expect("checked by the guard");
                    let ours = disks.digests();
                    let differ = if theirs.len() != ours.len() {
                        Some(format!(
                            "the source sent digests of {} disks; {} were copied",
                            theirs.len(),
                            ours.len()
                        ))
                    } else {
                        theirs.iter().zip(&ours).position(|(t, o)| t != o).map(|i| {
                            format!(
                                "disk {} hashes differently on source and target",
                                disks.id(i)
                            )
                        })
                    };
                    if let Some(detail) = differ {
                        let err = MigrationError::DiskVerifyMismatch { detail };
                        let err = self.refuse(id, ErrorCode::VerifyMismatch, err);
                        self.event(SessionEvent::VerifyMismatch)?;
                        return Err(err);
                    }
                    self.disks_verified = true;
                    self.ack(id, Command::DiskVerify)?;
                }
                (SessionState::Verification, Message::VerifyHash(_))
                    if self.disks.is_some() && !self.disks_verified =>
                {
                    let err = self.unexpected("DiskVerify before VerifyHash", Command::VerifyHash);
                    return Err(self.refuse(id, ErrorCode::Protocol, err));
                }
                (SessionState::PreCopy, Message::DirtyPass { pass, pages, last }) => {
                    if pages != self.pass_pages {
                        return Err(MigrationError::PassCountMismatch {
                            pass,
                            announced: pages,
                            received: self.pass_pages,
                        });
                    }
                    self.pass_pages = 0;
                    self.passes = pass;
                    self.cfg.progress.update(|p| p.pass = pass);
                    self.ack(id, Command::DirtyPass)?;
                    if last {
                        self.event(SessionEvent::StopVm)?;
                    } else {
                        self.event(SessionEvent::PassDone)?;
                    }
                }
                (SessionState::StopAndCopy, Message::State(blob)) => {
                    // Every disk block is here (the passes ended, the last one paused): the
                    // copies are flushed and get their own names before the VM's devices
                    // open them and before anything is acknowledged. A later failure (the
                    // digests) still removes them.
                    if let Err(reason) = self.disks.as_mut().map_or(Ok(()), TargetDisks::commit) {
                        let err = MigrationError::Disk { reason };
                        return Err(self.refuse(id, ErrorCode::Disk, err));
                    }
                    if let Err(e) = vm.restore_state(&blob) {
                        return Err(self.refuse(id, ErrorCode::State, e.into()));
                    }
                    self.state_bytes = blob.len();
                    self.ack(id, Command::State)?;
                    self.event(SessionEvent::FinalCopyDone)?;
                }
                (SessionState::Verification, Message::VerifyHash(theirs)) if !self.verified => {
                    let ours = hashes.digests();
                    if let Some(detail) = compare_hashes(&theirs, &ours) {
                        let err = MigrationError::VerifyMismatch { detail };
                        let err = self.refuse(id, ErrorCode::VerifyMismatch, err);
                        self.event(SessionEvent::VerifyMismatch)?;
                        return Err(err);
                    }
                    self.verified = true;
                    self.ack(id, Command::VerifyHash)?;
                }
                (SessionState::Verification, Message::Switchover) if self.verified => {
                    // The source relinquished the VM: from here it is ours to run.
                    self.event(SessionEvent::Switchover)?;
                    if let Err(e) = vm.resume() {
                        let err = self.refuse(id, ErrorCode::ResumeFailed, e.into());
                        self.event(SessionEvent::ResumeFailed)?;
                        return Err(err);
                    }
                    // If this reply is lost the source stays paused (it cannot tell), and
                    // we keep running: one copy runs, never two.
                    let _ = self.reply(id, &Message::Resumed);
                    self.event(SessionEvent::TargetResumed)?;
                    return Ok(());
                }
                (_, Message::Abort { reason }) => {
                    return Err(MigrationError::PeerAborted { reason })
                }
                (_, other) => {
                    let err = self.unexpected("the next migration step", other.command());
                    return Err(self.refuse(id, ErrorCode::Protocol, err));
                }
            }
        }
    }

    fn fail<V: TargetVm + ?Sized>(mut self, vm: &mut V, error: MigrationError) -> ReceiveFailure {
        let failed_in = self.session.state();
        let ev = if matches!(error, MigrationError::Cancelled) {
            SessionEvent::Cancel
        } else {
            SessionEvent::Fault
        };
        // VerifyMismatch/ResumeFailed already moved us to RollingBack.
        if self.session.state() != SessionState::RollingBack {
            let _ = self.event(ev);
        }
        if self.session.state() == SessionState::RollingBack {
            vm.discard();
            let _ = self.event(SessionEvent::RolledBack);
        }
        ReceiveFailure {
            error,
            failed_in,
            owns_vm: false,
            authenticated: true,
            session: self.session,
        }
    }
}

fn inside(layout: &MemoryLayout, gpa: u64, len: usize) -> bool {
    crate::frame::region_of(layout, gpa, len).is_some()
}

fn compare_hashes(
    theirs: &[crate::protocol::RegionHash],
    ours: &[crate::protocol::RegionHash],
) -> Option<String> {
    if theirs.len() != ours.len() {
        return Some(format!(
            "the source hashed {} regions, the target has {}",
            theirs.len(),
            ours.len()
        ));
    }
    for (t, o) in theirs.iter().zip(ours) {
        if (t.gpa, t.size) != (o.gpa, o.size) {
            return Some(format!(
                "the source hashed region {:#x}+{:#x} where the target has {:#x}+{:#x}",
                t.gpa, t.size, o.gpa, o.size
            ));
        }
        if !auth::ct_eq(&t.hash, &o.hash) {
            return Some(format!(
                "region {:#x}+{:#x} hashes differently on source and target",
                t.gpa, t.size
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memvm::{InMemorySource, InMemoryTarget, MemGuest};
    use crate::protocol::{regions_of, MemoryRegion};
    use crate::sender::{send_migration, SenderConfig};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    fn layout() -> MemoryLayout {
        MemoryLayout::new(&[(0, 1 << 20)]).unwrap()
    }

    fn compat(layout: &MemoryLayout) -> CompatInfo {
        CompatInfo {
            vcpus: 2,
            page_size: 4096,
            regions: regions_of(layout),
            cpuid_fingerprint: [1; 32],
            flavour: "test/1".into(),
        }
    }

    fn key(s: &str) -> PresharedKey {
        PresharedKey::new(s.as_bytes()).unwrap()
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
        }
        (a, b)
    }

    #[test]
    fn a_stray_connection_fails_before_authentication() {
        let cfg = ReceiverConfig::new(key("the target's pre-shared key"));
        // An HTTP request, then the connection closes.
        let (mut a, b) = pair();
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        drop(a);
        let f = authenticate(b, &cfg).err().unwrap();
        assert!(!f.authenticated, "{f}");
        assert!(f.to_string().contains("before authenticating"), "{f}");
        // A connection that closes at once.
        let (a, b) = pair();
        drop(a);
        let f = ReceiveFailure::from(authenticate(b, &cfg).err().unwrap());
        assert!(!f.authenticated);
        assert_eq!(f.failed_in, SessionState::Idle);
        assert_eq!(f.session.state(), SessionState::Failed);
    }

    #[test]
    fn a_source_with_the_wrong_key_is_not_authenticated_and_learns_why() {
        let l = layout();
        let (a, b) = pair();
        let target = std::thread::spawn(move || {
            authenticate(b, &ReceiverConfig::new(key("the target's pre-shared key"))).err()
        });
        let g = Arc::new(MemGuest::new(&l).unwrap());
        let mut vm = InMemorySource::new(g.clone(), vec![1]);
        let sent = send_migration(
            a,
            &*g,
            &mut vm,
            &compat(&l),
            &SenderConfig::new(key("another key of some length")),
        );
        let f = target.join().unwrap().unwrap();
        assert!(!f.authenticated);
        assert!(
            matches!(
                f.error,
                MigrationError::Secure(crate::SecureError::SourceKeyRefused)
            ),
            "{f}"
        );
        let e = sent.err().unwrap();
        assert!(e.to_string().contains("pre-shared key"), "{e}");
    }

    #[test]
    fn an_authenticated_source_can_be_sized_then_received_or_refused() {
        let l = layout();
        let k = "a pre-shared key of some length";
        let run = |target_compat: Option<CompatInfo>| {
            let (a, b) = pair();
            let t = std::thread::spawn(move || {
                let cfg = ReceiverConfig::new(key(k));
                let auth = authenticate(b, &cfg).map_err(ReceiveFailure::from)?;
                // The target learns the VM's shape before it has any memory for it.
                let seen = auth.source().clone();
                let dst = MemGuest::new(&MemoryLayout::new(&[(0, 1 << 20)]).unwrap()).unwrap();
                let mut vm = InMemoryTarget::default();
                match target_compat {
                    Some(c) => auth.receive(&dst, &mut vm, &c, &cfg).map(|_| seen),
                    None => Err(auth.refuse("this target says no".into())),
                }
            });
            let g = Arc::new(MemGuest::new(&l).unwrap());
            g.fill(3, 50);
            let mut vm = InMemorySource::new(g.clone(), vec![1]);
            let sent = send_migration(a, &*g, &mut vm, &compat(&l), &SenderConfig::new(key(k)));
            (sent, t.join().unwrap())
        };
        let (sent, got) = run(Some(compat(&l)));
        assert!(sent.is_ok(), "{:?}", sent.err());
        let seen = got.unwrap();
        assert_eq!(
            (seen.vcpus, seen.regions.clone()),
            (
                2,
                vec![MemoryRegion {
                    gpa: 0,
                    size: 1 << 20
                }]
            )
        );

        let (sent, got) = run(None);
        let f = got.err().unwrap();
        assert!(f.authenticated);
        assert!(f.to_string().contains("this target says no"), "{f}");
        let e = sent.err().unwrap();
        assert!(e.to_string().contains("this target says no"), "{e}");

        let mut other = compat(&l);
        other.vcpus = 4;
        let (sent, got) = run(Some(other));
        let f = got.err().unwrap();
        assert!(f.authenticated);
        assert!(
            f.to_string()
                .contains("vCPU count differs: source has 2, target has 4"),
            "{f}"
        );
        assert!(sent.is_err());
    }

    #[test]
    fn pages_must_be_whole_and_inside_a_region() {
        let r = MemoryLayout::new(&[(0, 0x4000), (0x10000, 0x1000)]).unwrap();
        assert!(inside(&r, 0x3000, 0x1000));
        assert!(inside(&r, 0x10000, 0x1000));
        assert!(!inside(&r, 0x4000, 0x1000));
        assert!(!inside(&r, 0x800, 0x1000));
        assert!(!inside(&r, u64::MAX - 0xfff, 0x1000));
    }
}
