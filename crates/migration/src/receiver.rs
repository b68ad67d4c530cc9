//! The target side: answers the source, writes pages, restores state, verifies, resumes.

use std::io::{Read, Write};

use ray_memory::{GuestMemory, MemoryLayout};

use crate::auth::{self, PresharedKey, Side};
use crate::frame::{Channel, Received, SUPPORTED_VERSIONS};
use crate::progress::{CancelToken, ProgressHandle};
use crate::protocol::{Command, CompatInfo, ErrorCode, Message, PageBatchView};
use crate::session::{Session, SessionEvent, SessionState};
use crate::vm::{PageHashes, TargetVm};
use crate::MigrationError;

/// Target settings.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub key: PresharedKey,
    pub progress: ProgressHandle,
    /// Checked between frames; a cancelled target tears down and tells the source.
    pub cancel: CancelToken,
}

impl ReceiverConfig {
    pub fn new(key: PresharedKey) -> Self {
        Self {
            key,
            progress: ProgressHandle::new(),
            cancel: CancelToken::new(),
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
    pub session: Session,
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
    let mut r = Receiver {
        ch: Channel::new(stream),
        session: Session::new(),
        cfg,
        pages: 0,
        pass_pages: 0,
        passes: 0,
        state_bytes: 0,
        verified: false,
    };
    match r.run(mem, vm, local) {
        Ok(()) => Ok(ReceiveReport {
            passes: r.passes,
            pages_received: r.pages,
            bytes_received: r.ch.bytes_received(),
            state_bytes: r.state_bytes,
            session: r.session,
        }),
        Err(error) => Err(r.fail(vm, error)),
    }
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
}

impl<S: Read + Write> Receiver<'_, S> {
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
        let _ = self.reply(
            id,
            &Message::Error {
                code,
                message: err.to_string(),
            },
        );
        err
    }

    fn unexpected(&self, expected: &'static str, got: Command) -> MigrationError {
        MigrationError::Unexpected {
            state: self.session.state(),
            expected,
            got,
        }
    }

    fn handshake(&mut self, local: &CompatInfo) -> Result<(), MigrationError> {
        let (h, m) = self.ch.recv()?;
        let (theirs, ns) = match m {
            Message::Hello { versions, nonce } => (versions, nonce),
            other => return Err(self.unexpected("Hello", other.command())),
        };
        let Some(version) = SUPPORTED_VERSIONS
            .iter()
            .rev()
            .find(|v| theirs.contains(v))
            .copied()
        else {
            let err = MigrationError::NoCommonVersion {
                ours: SUPPORTED_VERSIONS.to_vec(),
                theirs,
            };
            return Err(self.refuse(h.request_id, ErrorCode::Protocol, err));
        };
        let nt = auth::fresh_nonce().map_err(MigrationError::Nonce)?;
        self.reply(
            h.request_id,
            &Message::Hello {
                versions: vec![version],
                nonce: nt,
            },
        )?;
        self.ch.set_version(version);

        let (h, m) = self.ch.recv()?;
        let mac = match m {
            Message::Auth { mac } => mac,
            other => return Err(self.unexpected("Auth", other.command())),
        };
        let key = &self.cfg.key;
        if !auth::verify_proof(key, Side::Source, version, &ns, &nt, &mac) {
            return Err(self.refuse(
                h.request_id,
                ErrorCode::AuthFailed,
                MigrationError::PeerAuthFailed,
            ));
        }
        let proof = auth::proof(key, Side::Target, version, &ns, &nt);
        let session_key = auth::derive_session_key(key, version, &ns, &nt);
        self.reply(h.request_id, &Message::Auth { mac: proof })?;
        self.ch.set_session_key(session_key);

        let (h, m) = self.ch.recv()?;
        let source = match m {
            Message::Compat(c) => c,
            other => return Err(self.unexpected("Compat", other.command())),
        };
        if let Some(reason) = local.mismatch(&source) {
            let _ = self.reply(
                h.request_id,
                &Message::Incompatible {
                    reason: reason.clone(),
                },
            );
            return Err(MigrationError::Incompatible { reason });
        }
        self.ack(h.request_id, Command::Compat)
    }

    fn run<M, V>(&mut self, mem: &M, vm: &mut V, local: &CompatInfo) -> Result<(), MigrationError>
    where
        M: GuestMemory + ?Sized,
        V: TargetVm + ?Sized,
    {
        self.handshake(local)?;
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
