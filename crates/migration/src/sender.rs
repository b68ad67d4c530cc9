//! The source side: handshake, pre-copy passes, stop-and-copy, verification, switch-over.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use std::sync::Arc;

use ray_memory::{is_zero, DirtyBitmap, GuestMemory, GuestSpan, PageBitmap};

use crate::auth::PresharedKey;
use crate::convergence::{decide, Decision, Estimator, PassSample, Policy, Stats};
use crate::disk::{block_len, BlockHashes, SourceDisk, BLOCK_SIZE, MAX_RUN_BLOCKS};
use crate::frame::{Channel, SUPPORTED_VERSIONS};
use crate::progress::{CancelToken, ProgressHandle};
use crate::protocol::{
    disk_blocks_header, Command, CompatInfo, ErrorCode, Message, PageBatchWriter,
};
use crate::secure::{connect_secure, Protection, SecureStream};
use crate::session::{Session, SessionEvent, SessionState};
use crate::vm::{prefetch_read, PageHashes, SourceVm};
use crate::MigrationError;

/// Source settings.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub key: PresharedKey,
    /// Encrypted (the default) or, for same-host moves and explicit
    /// `--insecure-plaintext`, plaintext after the Noise handshake; the target must be
    /// set to the same.
    pub protection: Protection,
    pub policy: Policy,
    /// lz4 each page batch (kept only when smaller). Pays off on slow links. After a batch
    /// that does not shrink, only every 16th batch is tried until one shrinks again, so
    /// incompressible memory costs little CPU.
    pub compress: bool,
    /// Pages per `MemoryPages` frame (default 1024, i.e. 4 MiB of 4 KiB pages: fewer
    /// frames and socket writes; 256 measured a little slower on loopback).
    pub batch_pages: usize,
    /// Pages go from guest memory straight to the socket (plaintext: the kernel's copy
    /// is the only one) or into the plaintext the stream seals (encrypted: one copy
    /// before the cipher); default true. False copies them into the batch first.
    pub zero_copy: bool,
    /// Before the verification, reread all of the paused VM's memory and check it against
    /// what was sent: proves that the dirty log missed no write, at the cost of one pass
    /// over memory inside the downtime (default false; tests turn it on).
    pub recheck_memory: bool,
    /// Disks to copy with the VM (`--copy-disks`, see [`crate::disk`]); empty: the target
    /// opens the same paths (shared storage). With `recheck_memory`, the paused source's
    /// disks are reread against what was sent too.
    pub disks: Vec<Arc<SourceDisk>>,
    pub cancel: CancelToken,
    pub progress: ProgressHandle,
}

impl SenderConfig {
    pub fn new(key: PresharedKey) -> Self {
        Self {
            key,
            protection: Protection::Encrypted,
            policy: Policy::default(),
            compress: false,
            batch_pages: 1024,
            zero_copy: true,
            recheck_memory: false,
            disks: Vec::new(),
            cancel: CancelToken::new(),
            progress: ProgressHandle::new(),
        }
    }
}

/// A completed migration, seen from the source. The source VM is paused and no longer
/// owned here: the caller moves it to `Terminated` and frees it.
#[derive(Debug, Clone)]
pub struct SendReport {
    /// One entry per pass, the stop-and-copy pass last.
    pub passes: Vec<Stats>,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    /// Disk data bytes sent (`--copy-disks`; ranges of zeros cost no data and are not
    /// counted), over all passes, and in the paused last pass.
    pub disk_bytes_sent: u64,
    pub disk_bytes_final: u64,
    /// From pause to the target's `Resumed`.
    pub downtime: Duration,
    pub total: Duration,
    /// Stop-and-copy was forced by the pass/time limit.
    pub forced: bool,
    pub session: Session,
}

/// What became of the source VM after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceVmAfterFailure {
    /// Rolled back: throttle lifted, dirty log off, running here.
    Running,
    /// The rollback itself failed; the VM is here but may be paused or throttled.
    RollbackFailed,
    /// The link failed after `Switchover`: the target may be running the VM. The source
    /// stays paused and must not be resumed until the target is known dead (fenced).
    PausedOwnershipUncertain,
}

/// A failed migration, seen from the source.
#[derive(Debug, thiserror::Error)]
#[error("migration failed in state {failed_in:?} ({vm:?}): {error}")]
pub struct SendFailure {
    #[source]
    pub error: MigrationError,
    pub failed_in: SessionState,
    pub vm: SourceVmAfterFailure,
    pub session: Session,
}

/// Migrates the VM out over `stream` (TCP or Unix socket, already connected).
///
/// Set read/write timeouts on the socket first ([`crate::transport`] does) so a silent
/// peer becomes an error instead of a hang.
pub fn send_migration<S, M, V>(
    stream: S,
    mem: &M,
    vm: &mut V,
    local: &CompatInfo,
    cfg: &SenderConfig,
) -> Result<SendReport, SendFailure>
where
    S: Read + Write,
    M: GuestMemory + ?Sized,
    V: SourceVm + ?Sized,
{
    let stream = match connect_secure(stream, &cfg.key, cfg.protection) {
        Ok(s) => s,
        Err(e) => {
            // Nothing was touched: the VM runs on as before.
            let mut session = Session::new();
            let _ = session.apply(SessionEvent::Fault);
            return Err(SendFailure {
                error: e.into(),
                failed_in: SessionState::Idle,
                vm: SourceVmAfterFailure::Running,
                session,
            });
        }
    };
    let mut s = Sender {
        // Pages go from guest memory straight to the kernel (plaintext) or into the
        // plaintext the stream seals (encrypted: copied out of guest memory, which the
        // cipher must not read through a Rust slice while a vCPU may write it).
        direct: cfg.zero_copy,
        ch: Channel::new(stream),
        hashes: PageHashes::new(mem.layout(), local.page_size as usize),
        runs: Vec::new(),
        mem,
        vm,
        cfg,
        session: Session::new(),
        next_id: 0,
        paused: false,
        throttle: 0,
        logging: false,
        compress_skip: 0,
        disk_hashes: cfg
            .disks
            .iter()
            .map(|d| BlockHashes::new(d.blocks()))
            .collect(),
        tracking: false,
        disk_buf: Vec::new(),
        disk_bytes: 0,
    };
    match s.run(local) {
        Ok(r) => Ok(r),
        Err(e) => Err(s.fail(e)),
    }
}

struct Sender<'a, S, M: ?Sized, V: ?Sized> {
    ch: Channel<SecureStream<S>>,
    /// What each page was when last sent: the verification compares these.
    hashes: PageHashes,
    /// Pages go from guest memory to the stream without a batch buffer in between.
    direct: bool,
    /// Direct mode: the guest memory that follows the batch's index on the wire, in order.
    runs: Vec<GuestSpan<'a>>,
    mem: &'a M,
    vm: &'a mut V,
    cfg: &'a SenderConfig,
    session: Session,
    next_id: u64,
    paused: bool,
    throttle: u8,
    logging: bool,
    /// Batches left to send uncompressed before lz4 is tried again.
    compress_skip: u32,
    /// Per copied disk, what each block was when last sent.
    disk_hashes: Vec<BlockHashes>,
    /// The copied disks' trackers are on.
    tracking: bool,
    disk_buf: Vec<u8>,
    /// Disk data bytes sent so far.
    disk_bytes: u64,
}

/// After a batch that lz4 could not shrink, every this many batches is tried again.
const COMPRESS_RETRY: u32 = 16;

impl<'a, S: Read + Write, M: GuestMemory + ?Sized, V: SourceVm + ?Sized> Sender<'a, S, M, V> {
    fn event(&mut self, e: SessionEvent) -> Result<(), MigrationError> {
        let to = self.session.apply(e)?;
        self.cfg.progress.update(|p| p.state = to);
        Ok(())
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cfg.cancel.is_cancelled() {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Sends a request and returns the peer's answer, turning error frames into errors.
    fn request(&mut self, msg: &Message) -> Result<Message, MigrationError> {
        self.next_id += 1;
        let id = self.next_id;
        self.ch.send(msg, id, false)?;
        self.response(id)
    }

    fn response(&mut self, id: u64) -> Result<Message, MigrationError> {
        let (h, m) = self.ch.recv()?;
        match m {
            Message::Error { code, message } => {
                return Err(MigrationError::PeerError { code, message })
            }
            Message::Abort { reason } => return Err(MigrationError::PeerAborted { reason }),
            Message::Incompatible { reason } => {
                return Err(MigrationError::Incompatible { reason })
            }
            _ => {}
        }
        if h.request_id != id {
            return Err(MigrationError::RequestIdMismatch {
                expected: id,
                got: h.request_id,
            });
        }
        Ok(m)
    }

    fn expect_ack(&mut self, msg: &Message) -> Result<(), MigrationError> {
        let want = msg.command();
        match self.request(msg)? {
            Message::Ack { command } if command == want => Ok(()),
            other => Err(self.unexpected("an Ack", other.command())),
        }
    }

    fn unexpected(&self, expected: &'static str, got: Command) -> MigrationError {
        MigrationError::Unexpected {
            state: self.session.state(),
            expected,
            got,
        }
    }

    fn handshake(&mut self, local: &CompatInfo) -> Result<(), MigrationError> {
        // Copied disks need version 5: a target that knows only older versions refuses
        // the offer, and the source says why.
        let offer: Vec<u16> = if self.cfg.disks.is_empty() {
            SUPPORTED_VERSIONS.to_vec()
        } else {
            vec![DISKS_VERSION]
        };
        let hello = Message::Hello {
            versions: offer.clone(),
        };
        let answer = match self.request(&hello) {
            Err(MigrationError::PeerError {
                code: ErrorCode::Protocol,
                message,
            }) if !self.cfg.disks.is_empty() => {
                return Err(MigrationError::DiskCopyRefused {
                    reason: format!(
                        "copying disks needs migration protocol version {DISKS_VERSION}, which the target does not speak ({message})"
                    ),
                })
            }
            other => other?,
        };
        let version = match answer {
            Message::Hello { versions } => match versions.as_slice() {
                [v] if offer.contains(v) => *v,
                _ => {
                    return Err(MigrationError::NoCommonVersion {
                        ours: offer,
                        theirs: versions,
                    })
                }
            },
            other => return Err(self.unexpected("Hello", other.command())),
        };
        self.ch.set_version(version);
        self.expect_ack(&Message::Compat(local.clone()))
    }

    fn run(&mut self, local: &CompatInfo) -> Result<SendReport, MigrationError> {
        let started = Instant::now();
        self.handshake(local)?;
        self.event(SessionEvent::Start)?;
        let ps = u64::from(local.page_size.max(1));
        let pages_per_region: Vec<usize> = self
            .mem
            .layout()
            .regions
            .iter()
            .map(|r| (r.len / ps) as usize)
            .collect();
        self.vm.start_dirty_log()?;
        self.logging = true;
        let mut disks_to_send = self.start_disks()?;

        let mut batch = PageBatchWriter::new(ps as usize, self.cfg.batch_pages.max(1));
        let mut est = Estimator::new();
        let mut passes = Vec::new();
        let mut to_send = DirtyBitmap {
            regions: pages_per_region
                .iter()
                .map(|&n| PageBitmap::full(n))
                .collect(),
        };
        let mut pass = 1u32;
        let mut totals = (0u64, 0u64);
        let forced = loop {
            let t = Instant::now();
            let (pages, bytes) =
                self.send_pass(&mut batch, &to_send, &disks_to_send, pass, false)?;
            totals = (totals.0 + pages, totals.1 + bytes);
            let duration = t.elapsed();
            to_send = self.dirty_log(&pages_per_region)?;
            disks_to_send = self.dirty_blocks();
            let dirty_disk_bytes = dirty_bytes(&disks_to_send);
            let dirty = to_send.count();
            let sample = PassSample {
                pass,
                pages_sent: pages,
                bytes_sent: bytes,
                duration,
                dirty_pages: dirty,
                page_size: ps,
                dirty_disk_bytes,
            };
            let stats = est.record(&sample, started.elapsed(), self.throttle, &self.cfg.policy);
            passes.push(stats);
            self.cfg.progress.update(|p| {
                p.pass = pass;
                p.pages_sent = totals.0;
                p.bytes_sent = totals.1;
                p.dirty_pages = dirty;
                p.dirty_disk_bytes = dirty_disk_bytes;
                p.dirty_rate_bps = stats.dirty_rate_bps;
                p.bandwidth_bps = stats.bandwidth_bps;
                p.expected_downtime = stats.expected_downtime;
            });
            match decide(&stats, &self.cfg.policy) {
                Decision::StopAndCopy { forced } => break forced,
                Decision::Abort(reason) => return Err(MigrationError::NotConverged { reason }),
                Decision::Throttle(pct) => {
                    self.vm.throttle(pct)?;
                    self.throttle = pct;
                    self.cfg.progress.update(|p| p.throttle_percent = pct);
                }
                Decision::Continue => {}
            }
            self.check_cancel()?;
            self.event(SessionEvent::PassDone)?;
            pass += 1;
        };

        // Stop-and-copy: from here the guest is paused until the target or a rollback resumes it.
        self.event(SessionEvent::StopVm)?;
        let paused_at = Instant::now();
        // Marked first so a half-done pause is still undone by the rollback.
        self.paused = true;
        self.vm.pause()?;
        to_send.union(&self.dirty_log(&pages_per_region)?);
        // The devices are drained: every write is in the file and marked.
        for (set, more) in disks_to_send.iter_mut().zip(self.dirty_blocks()) {
            set.union(&more);
        }
        pass += 1;
        let t = Instant::now();
        let disk_bytes_before = self.disk_bytes;
        let (pages, bytes) = self.send_pass(&mut batch, &to_send, &disks_to_send, pass, true)?;
        let disk_bytes_final = self.disk_bytes - disk_bytes_before;
        totals = (totals.0 + pages, totals.1 + bytes);
        let state = self.vm.save_state()?;
        self.expect_ack(&Message::State(state))?;
        let stats = est.record(
            &PassSample {
                pass,
                pages_sent: pages,
                bytes_sent: bytes,
                duration: t.elapsed(),
                dirty_pages: 0,
                page_size: ps,
                dirty_disk_bytes: 0,
            },
            started.elapsed(),
            self.throttle,
            &self.cfg.policy,
        );
        passes.push(stats);
        self.check_cancel()?;
        self.event(SessionEvent::FinalCopyDone)?;

        if self.cfg.recheck_memory {
            if let Some(gpa) = self.hashes.first_difference(self.mem)? {
                return Err(MigrationError::VerifyMismatch {
                    detail: format!(
                        "the page at {gpa:#x} of the paused source is not what was sent last: \
                         a write the dirty log did not report"
                    ),
                });
            }
        }
        self.verify_disks()?;
        let hashes = self.hashes.digests();
        match self.request(&Message::VerifyHash(hashes)) {
            Ok(Message::Ack {
                command: Command::VerifyHash,
            }) => {}
            Ok(other) => return Err(self.unexpected("an Ack of VerifyHash", other.command())),
            Err(MigrationError::PeerError {
                code: ErrorCode::VerifyMismatch,
                message,
            }) => return Err(MigrationError::VerifyMismatch { detail: message }),
            Err(e) => return Err(e),
        }
        self.check_cancel()?;

        // Commit point: after this frame leaves, only an explicit ResumeFailed lets us resume.
        self.event(SessionEvent::Switchover)?;
        self.next_id += 1;
        let id = self.next_id;
        self.ch.send(&Message::Switchover, id, false)?;
        match self.response(id)? {
            Message::Resumed => {}
            other => return Err(self.unexpected("Resumed", other.command())),
        }
        self.event(SessionEvent::TargetResumed)?;
        let downtime = paused_at.elapsed();
        // The dirty log is left on: the VM is the target's now and its copy here is freed
        // (turning logging off costs a memory-slot update, ~5 ms on PVM, for nothing).
        self.logging = false;
        self.stop_disks();
        self.cfg.progress.update(|p| {
            p.pages_sent = totals.0;
            p.bytes_sent = totals.1;
        });
        Ok(SendReport {
            passes,
            pages_sent: totals.0,
            bytes_sent: self.ch.bytes_sent(),
            disk_bytes_sent: self.disk_bytes,
            disk_bytes_final,
            downtime,
            total: started.elapsed(),
            forced,
            session: self.session.clone(),
        })
    }

    fn dirty_log(&mut self, shape: &[usize]) -> Result<DirtyBitmap, MigrationError> {
        let log = self.vm.dirty_log()?;
        if log.regions.len() != shape.len()
            || log.regions.iter().zip(shape).any(|(b, &n)| b.pages() != n)
        {
            return Err(MigrationError::DirtyLogShape {
                got: log.regions.len(),
                regions: shape.len(),
            });
        }
        Ok(log)
    }

    /// Streams every page set in `set`, then the pass marker; returns (pages, wire bytes).
    fn send_pass(
        &mut self,
        batch: &mut PageBatchWriter,
        set: &DirtyBitmap,
        disks: &[PageBitmap],
        pass: u32,
        last: bool,
    ) -> Result<(u64, u64), MigrationError> {
        let before = self.ch.bytes_sent();
        let mem: &'a M = self.mem;
        let ps = batch.page_size();
        let mut pages = 0u64;
        self.runs.clear();
        batch.reset();
        for (r, bits) in mem.layout().regions.iter().zip(&set.regions) {
            let mut dirty = bits.iter().peekable();
            while let Some(first) = dirty.next() {
                // Consecutive dirty pages are handled (read, or referenced) as one run.
                let mut n = 1;
                while n < batch.room() && dirty.peek() == Some(&(first + n)) {
                    dirty.next();
                    n += 1;
                }
                let gpa = r.gpa + (first * ps) as u64;
                if self.direct {
                    self.reference_run(batch, gpa, n)?;
                } else {
                    self.copy_run(batch, gpa, n)?;
                }
                pages += n as u64;
                if batch.is_full() {
                    self.flush(batch)?;
                }
            }
        }
        if !batch.is_empty() {
            self.flush(batch)?;
        }
        if !self.cfg.disks.is_empty() {
            self.send_disk_blocks(disks, pass)?;
        }
        self.expect_ack(&Message::DirtyPass { pass, pages, last })?;
        Ok((pages, self.ch.bytes_sent() - before))
    }

    /// Copies `n` pages at `gpa` into the batch, in stretches between pages known to be
    /// zero, which are neither read (reading never-touched guest memory would fault it in)
    /// nor sent.
    fn copy_run(
        &mut self,
        batch: &mut PageBatchWriter,
        gpa: u64,
        n: usize,
    ) -> Result<(), MigrationError> {
        let ps = batch.page_size() as u64;
        let mut k = 0;
        while k < n {
            let at = gpa + k as u64 * ps;
            if self.mem.known_zero(at, ps) {
                self.hashes.record_zero(at);
                batch.commit_zero(at);
                k += 1;
                continue;
            }
            let mut m = 1;
            while k + m < n && !self.mem.known_zero(at + m as u64 * ps, ps) {
                m += 1;
            }
            let slots = batch.slots(m);
            self.mem.read(at, slots)?;
            self.hashes.record_bytes(at, slots);
            batch.commit_run(at, m);
            k += m;
        }
        Ok(())
    }

    /// Adds `n` pages at `gpa` to the batch without copying them: each is checked for
    /// zeros and hashed in place, and the non-zero stretches are queued in `runs` for the
    /// vectored write. Pages known to be zero are not read at all. Each byte is read once
    /// here (zero check, hash) and once by the kernel; a page a vCPU changes meanwhile is
    /// in the next dirty log and is sent (and hashed) again.
    fn reference_run(
        &mut self,
        batch: &mut PageBatchWriter,
        gpa: u64,
        n: usize,
    ) -> Result<(), MigrationError> {
        let ps = batch.page_size();
        let mem: &'a M = self.mem;
        let span = mem.span(gpa, (n * ps) as u64)?;
        let mut stretch: Option<usize> = None;
        for (k, page) in span.chunks(ps).enumerate() {
            if k + PREFETCH_AHEAD < n {
                prefetch_read(span.as_ptr().wrapping_add((k + PREFETCH_AHEAD) * ps));
            }
            let at = gpa + (k * ps) as u64;
            if mem.known_zero(at, ps as u64) || page.is_zero() {
                if let Some(s) = stretch.take() {
                    self.runs.extend(span.sub(s, k * ps - s));
                }
                self.hashes.record_zero(at);
                batch.commit_external(at, true);
            } else {
                stretch.get_or_insert(k * ps);
                self.hashes.record(at, page);
                batch.commit_external(at, false);
            }
        }
        if let Some(s) = stretch {
            self.runs.extend(span.sub(s, n * ps - s));
        }
        Ok(())
    }

    fn flush(&mut self, batch: &mut PageBatchWriter) -> Result<(), MigrationError> {
        self.check_cancel()?;
        self.next_id += 1;
        // lz4 is tried on every batch until one fails to shrink, then only on every
        // COMPRESS_RETRY-th batch: incompressible memory costs almost nothing extra.
        let compress = self.cfg.compress && self.compress_skip == 0;
        self.compress_skip = self.compress_skip.saturating_sub(1);
        let (index, data) = batch.finish_parts();
        let id = self.next_id;
        if self.direct {
            self.ch.send_guest_parts(
                Command::MemoryPages,
                id,
                0,
                &[index],
                &self.runs,
                compress,
            )?;
        } else {
            self.ch
                .send_parts(Command::MemoryPages, id, 0, &[index, data], compress)?;
        }
        if compress && !self.ch.last_compressed() {
            self.compress_skip = COMPRESS_RETRY - 1;
        }
        self.runs.clear();
        batch.reset();
        Ok(())
    }

    /// Announces the copied disks (the target creates its files), starts their trackers,
    /// and returns what the first pass sends of each: every block holding data. The
    /// tracker starts before the disk is looked at, so a write from then on is in a later
    /// take even if this pass read the block before it.
    fn start_disks(&mut self) -> Result<Vec<PageBitmap>, MigrationError> {
        let cfg = self.cfg;
        if cfg.disks.is_empty() {
            return Ok(Vec::new());
        }
        let list = cfg.disks.iter().map(|d| d.info()).collect();
        match self.request(&Message::DiskList(list)) {
            Ok(Message::Ack {
                command: Command::DiskList,
            }) => {}
            Ok(other) => return Err(self.unexpected("an Ack of DiskList", other.command())),
            Err(MigrationError::PeerError {
                code: ErrorCode::Disk,
                message,
            }) => return Err(MigrationError::DiskCopyRefused { reason: message }),
            Err(e) => return Err(e),
        }
        self.tracking = true;
        for d in &cfg.disks {
            d.tracker.start();
        }
        Ok(cfg.disks.iter().map(|d| d.data_blocks()).collect())
    }

    /// Blocks written since the last take, per copied disk.
    fn dirty_blocks(&mut self) -> Vec<PageBitmap> {
        self.cfg.disks.iter().map(|d| d.tracker.take()).collect()
    }

    fn stop_disks(&mut self) {
        if self.tracking {
            for d in &self.cfg.disks {
                d.tracker.stop();
            }
            self.tracking = false;
        }
    }

    /// Sends the blocks of `sets` of every copied disk, read from its file now, in runs of
    /// at most [`MAX_RUN_BLOCKS`]: each stretch of blocks holding data is one frame, each
    /// stretch of zeros one frame without data. Then the `DiskPass` marker with the bytes
    /// the ranges covered.
    fn send_disk_blocks(&mut self, sets: &[PageBitmap], pass: u32) -> Result<(), MigrationError> {
        let cfg = self.cfg;
        let mut covered = 0u64;
        let mut buf = std::mem::take(&mut self.disk_buf);
        for (i, (disk, set)) in cfg.disks.iter().zip(sets).enumerate() {
            for (first, n) in set.runs() {
                let (mut b, end) = (first as u64, (first + n) as u64);
                while b < end {
                    let k = (end - b).min(MAX_RUN_BLOCKS);
                    let offset = b * BLOCK_SIZE;
                    let len = (k * BLOCK_SIZE).min(disk.size - offset) as usize;
                    buf.resize(len, 0);
                    disk.read(offset, &mut buf)
                        .map_err(|e| MigrationError::Disk {
                            reason: format!("cannot read disk {} at {offset}: {e}", disk.id),
                        })?;
                    // Stretches of data blocks and of zero blocks.
                    let mut at = 0usize;
                    while at < len {
                        let blk = |x: usize| {
                            let l = block_len(disk.size, (offset + x as u64) / BLOCK_SIZE) as usize;
                            (l, is_zero(&buf[x..x + l]))
                        };
                        let (l0, zero) = blk(at);
                        let mut stretch = l0;
                        while at + stretch < len && blk(at + stretch).1 == zero {
                            stretch += blk(at + stretch).0;
                        }
                        let mut x = at;
                        while x < at + stretch {
                            let (l, _) = blk(x);
                            let bi = ((offset + x as u64) / BLOCK_SIZE) as usize;
                            self.disk_hashes[i].record(bi, &buf[x..x + l]);
                            x += l;
                        }
                        let data = (!zero).then(|| &buf[at..at + stretch]);
                        self.send_disk_range(i as u32, offset + at as u64, stretch, data)?;
                        covered += stretch as u64;
                        at += stretch;
                    }
                    b += k;
                }
            }
        }
        self.disk_buf = buf;
        self.next_id += 1;
        self.ch.send(
            &Message::DiskPass {
                pass,
                bytes: covered,
            },
            self.next_id,
            false,
        )?;
        Ok(())
    }

    fn send_disk_range(
        &mut self,
        disk: u32,
        offset: u64,
        len: usize,
        data: Option<&[u8]>,
    ) -> Result<(), MigrationError> {
        self.check_cancel()?;
        self.next_id += 1;
        let header = disk_blocks_header(disk, offset, len as u32, data.is_some());
        let parts: &[&[u8]] = match data {
            Some(d) => &[&header, d],
            None => &[&header],
        };
        self.ch.send_parts(
            Command::DiskBlocks,
            self.next_id,
            0,
            parts,
            self.cfg.compress,
        )?;
        if data.is_some() {
            self.disk_bytes += len as u64;
            self.cfg
                .progress
                .update(|p| p.disk_bytes_sent += len as u64);
        }
        Ok(())
    }

    /// With `recheck_memory`, rereads every block of the paused source's disks against
    /// what was sent (proves the tracker missed no write); then has the target compare
    /// the digests of its files with what was sent.
    fn verify_disks(&mut self) -> Result<(), MigrationError> {
        let cfg = self.cfg;
        if cfg.disks.is_empty() {
            return Ok(());
        }
        if cfg.recheck_memory {
            let mut buf = vec![0u8; BLOCK_SIZE as usize];
            for (disk, hashes) in cfg.disks.iter().zip(&self.disk_hashes) {
                for b in 0..disk.blocks() {
                    let l = block_len(disk.size, b as u64) as usize;
                    disk.read(b as u64 * BLOCK_SIZE, &mut buf[..l])
                        .map_err(|e| MigrationError::Disk {
                            reason: format!("cannot reread disk {}: {e}", disk.id),
                        })?;
                    if !hashes.matches(b, &buf[..l]) {
                        return Err(MigrationError::DiskVerifyMismatch {
                            detail: format!(
                                "block {b} (offset {}) of the paused source's disk {} is not what was sent last: a write the dirty-block tracking did not report",
                                b as u64 * BLOCK_SIZE,
                                disk.id
                            ),
                        });
                    }
                }
            }
        }
        let digests = self.disk_hashes.iter().map(BlockHashes::digest).collect();
        match self.request(&Message::DiskVerify(digests)) {
            Ok(Message::Ack {
                command: Command::DiskVerify,
            }) => Ok(()),
            Ok(other) => Err(self.unexpected("an Ack of DiskVerify", other.command())),
            Err(MigrationError::PeerError {
                code: ErrorCode::VerifyMismatch,
                message,
            }) => Err(MigrationError::DiskVerifyMismatch { detail: message }),
            Err(e) => Err(e),
        }
    }

    /// Applies the failure rules; see the crate docs for why `Completing` never rolls back.
    fn fail(&mut self, error: MigrationError) -> SendFailure {
        let failed_in = self.session.state();
        let committed = failed_in == SessionState::Completing;
        let explicit_refusal = matches!(
            error,
            MigrationError::PeerError {
                code: ErrorCode::ResumeFailed,
                ..
            }
        );
        let vm = if committed && !explicit_refusal {
            let _ = self.event(SessionEvent::Fault);
            SourceVmAfterFailure::PausedOwnershipUncertain
        } else {
            let ev = if committed {
                SessionEvent::ResumeFailed
            } else if matches!(error, MigrationError::Cancelled) {
                SessionEvent::Cancel
            } else {
                SessionEvent::Fault
            };
            if !committed && !peer_already_gone(&error) {
                // Tell the target to tear down; it would also notice the closed socket.
                self.next_id += 1;
                let _ = self.ch.send(
                    &Message::Abort {
                        reason: error.to_string(),
                    },
                    self.next_id,
                    false,
                );
            }
            let _ = self.event(ev);
            if self.session.state() == SessionState::RollingBack {
                if self.rollback() {
                    let _ = self.event(SessionEvent::RolledBack);
                    SourceVmAfterFailure::Running
                } else {
                    let _ = self.event(SessionEvent::Fault);
                    SourceVmAfterFailure::RollbackFailed
                }
            } else {
                // Failed from Idle: nothing was touched.
                SourceVmAfterFailure::Running
            }
        };
        SendFailure {
            error,
            failed_in,
            vm,
            session: self.session.clone(),
        }
    }

    /// Undoes throttle, dirty logging and pause; true when all of it worked.
    fn rollback(&mut self) -> bool {
        let mut ok = true;
        if self.throttle != 0 {
            ok &= self.vm.throttle(0).is_ok();
            self.throttle = 0;
            self.cfg.progress.update(|p| p.throttle_percent = 0);
        }
        if self.logging {
            ok &= self.vm.stop_dirty_log().is_ok();
            self.logging = false;
        }
        self.stop_disks();
        if self.paused {
            let resumed = self.vm.resume().is_ok();
            self.paused = !resumed;
            ok &= resumed;
        }
        ok
    }
}

/// The protocol version that carries copied disks.
const DISKS_VERSION: u16 = 5;

/// Bytes of the blocks set in `sets` (whole blocks).
fn dirty_bytes(sets: &[PageBitmap]) -> u64 {
    sets.iter().map(|s| s.count() * BLOCK_SIZE).sum()
}

/// Pages ahead of the one being checked and hashed whose first line is prefetched: the
/// first touch of each page of guest memory waits for a TLB walk and a memory read, which
/// the hardware prefetchers do not start across page boundaries.
const PREFETCH_AHEAD: usize = 4;

fn peer_already_gone(e: &MigrationError) -> bool {
    matches!(
        e,
        MigrationError::PeerAborted { .. }
            | MigrationError::Secure(_)
            | MigrationError::Incompatible { .. }
            | MigrationError::Protocol(crate::ProtocolError::PeerClosed)
            | MigrationError::Protocol(crate::ProtocolError::Io { .. })
    )
}
