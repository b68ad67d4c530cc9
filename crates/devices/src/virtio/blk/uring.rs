//! The io_uring engine: one thread per disk owns a ring and keeps every request the
//! driver queued at the disk at once, without a thread per request.
//!
//! The notifier thread hands checked requests over a channel and bumps an eventfd; the
//! ring itself has a read of that eventfd outstanding, so new work and finished I/O wake
//! the one `io_uring_enter` the engine thread sleeps in. Reads and writes are
//! `IORING_OP_READV`/`WRITEV` whose I/O vectors point straight at guest pages (raw
//! pointers from the memory view's spans, never a `&[u8]`); flush is `FSYNC` with
//! `DATASYNC`; discard and write-zeroes are one `FALLOCATE` per range. A short transfer
//! (the kernel may stop early) is finished with blocking `preadv`/`pwritev` from where it
//! stopped. Completions found together go to the driver together, one
//! [`Completer::complete`](crate::virtio::Completer::complete) call per queue.
//!
//! Rate limits: a request the token buckets hold back waits in a list with its start
//! time, and the engine's wait times out at the earliest one.
//!
//! Guest memory stays mapped while operations are in flight: the engine thread holds the
//! device's memory view (an `Arc`) until it ends, it ends only once nothing is in flight,
//! and pausing the VM (snapshot, migration) waits until every request the device took is
//! completed (the transport's in-flight count), as for the worker pool.
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use ray_memory::GuestMemory;

use super::dirty::DirtyBlocks;
use super::io::{fallocate_mode, finish, iovecs, range_bytes, transfer, Buckets, Job};
use super::request::{Op, SECTOR};
use crate::rate::RateLimit;
use crate::virtio::completer::Used;
use crate::virtio::DeviceContext;

/// Submission queue entries. A disk has at most 2 x 256 requests in flight, a discard
/// takes one entry per range: a full queue is submitted and the push retried.
const ENTRIES: u32 = 256;
/// Completion queue entries: room for every request in flight, so that none overflows.
const CQ_ENTRIES: u32 = 1024;
/// The `user_data` of the eventfd read; requests use their slot + 1.
const WAKE: u64 = 0;

/// Checks that this kernel (and the calling thread's seccomp filter) gives us a ring: done
/// when a disk is opened with this engine, so that a host without io_uring refuses the
/// configuration before the VM starts.
pub fn probe() -> std::io::Result<()> {
    IoUring::new(2).map(drop)
}

thread_local! {
    /// On an engine's own thread: which engine (its [`Uring::id`]) and the requests handed
    /// to it from that thread. Completing a batch serves the queue again (new requests the
    /// driver added meanwhile), on the engine thread: those go here, into the next
    /// submission, without a channel message, an eventfd write and a wake-up each.
    static OWN: RefCell<(usize, Vec<Job>)> = const { RefCell::new((0, Vec::new())) };
}

pub struct Uring {
    tx: Option<Sender<Job>>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd with plain flags; a non-negative result is a descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bump(fd: &OwnedFd) {
    let one = 1u64;
    // SAFETY: writes the 8 bytes of `one` to an eventfd we hold open.
    let _ = unsafe { libc::write(fd.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
}

impl Uring {
    /// Starts the engine thread for `file`; fails if the ring cannot be set up.
    pub fn start(
        name: &str,
        file: Arc<File>,
        context: DeviceContext,
        limit: RateLimit,
        dirty: Arc<DirtyBlocks>,
    ) -> std::io::Result<Self> {
        let wake = Arc::new(eventfd()?);
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<std::io::Result<()>>(1);
        let thread_wake = wake.clone();
        let id = Self::id_of(&wake);
        let thread = std::thread::Builder::new()
            .name(format!("{name}-uring"))
            .stack_size(256 << 10)
            .spawn(move || {
                ray_seccomp::enter(ray_seccomp::Kind::BlkWorker);
                // Only this thread submits and reaps: completions' task work runs when it
                // waits, not by interrupting it (single issuer, deferred task work).
                let ring = IoUring::builder()
                    .setup_cqsize(CQ_ENTRIES)
                    .setup_single_issuer()
                    .setup_defer_taskrun()
                    .build(ENTRIES);
                match ring {
                    Ok(ring) => {
                        OWN.with(|o| o.borrow_mut().0 = id);
                        let _ = ready_tx.send(Ok(()));
                        Engine {
                            ring,
                            file,
                            ctx: context,
                            rx,
                            wake: thread_wake,
                            wake_buf: Box::new(0),
                            slots: Vec::new(),
                            free: Vec::new(),
                            in_flight: 0,
                            held: VecDeque::new(),
                            buckets: Buckets::new(limit),
                            dirty,
                            closing: false,
                        }
                        .run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                tx: Some(tx),
                wake,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(std::io::Error::other(
                    "the io_uring thread ended at its start",
                ))
            }
        }
    }

    /// What tells this engine's thread from others: the address of its eventfd, unique
    /// while the engine lives.
    fn id_of(wake: &Arc<OwnedFd>) -> usize {
        Arc::as_ptr(wake) as usize
    }

    pub fn submit(&self, job: Job) -> Result<(), Job> {
        let Some(tx) = &self.tx else {
            return Err(job);
        };
        let id = Self::id_of(&self.wake);
        let job = OWN.with(|o| {
            let mut o = o.borrow_mut();
            if o.0 == id {
                o.1.push(job);
                None
            } else {
                Some(job)
            }
        });
        if let Some(job) = job {
            tx.send(job).map_err(|e| e.0)?;
            bump(&self.wake);
        }
        Ok(())
    }
}

impl Drop for Uring {
    /// Ends the engine once what it holds is done. The engine thread may itself drop the
    /// last reference to the device (completing a request as the VM goes away): it is not
    /// joined then, it ends on its own.
    fn drop(&mut self) {
        self.tx = None;
        bump(&self.wake);
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// A request at the ring: its job, the I/O vector the kernel reads (it must not move or
/// be freed until the last of its entries completes: a `Vec`'s buffer stays put when the
/// slot moves), and its entries still in flight.
struct Slot {
    job: Job,
    iov: Vec<libc::iovec>,
    parts: u32,
    /// The bytes moved (reads and writes), or the first error.
    result: Result<u32, (&'static str, std::io::Error)>,
}

struct Engine {
    /// Declared first, dropped first: closing the ring cancels nothing we still own
    /// (the engine ends only with no request in flight and no eventfd read armed).
    ring: IoUring,
    file: Arc<File>,
    ctx: DeviceContext,
    rx: Receiver<Job>,
    wake: Arc<OwnedFd>,
    /// Where the armed eventfd read puts its count (boxed: its address is in the ring).
    wake_buf: Box<u64>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Requests the token buckets hold back, with the time each may start.
    held: VecDeque<(Instant, Job)>,
    buckets: Buckets,
    /// The disk's changed blocks, marked as requests end (`--copy-disks`).
    dirty: Arc<DirtyBlocks>,
    /// The device went away: finish what is in flight, then end.
    closing: bool,
}

impl Engine {
    fn run(mut self) {
        self.arm_wake();
        loop {
            self.release_held();
            self.take_own();
            let timeout = self
                .held
                .front()
                .map(|(at, _)| at.saturating_duration_since(Instant::now()));
            let r = match timeout {
                Some(t) => {
                    let ts = types::Timespec::from(t.max(Duration::from_micros(1)));
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(1, &args)
                }
                None => self.ring.submit_and_wait(1),
            };
            if let Err(e) = r {
                match e.raw_os_error() {
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
                    _ => {
                        tracing::error!("virtio-blk: io_uring_enter failed: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            let done: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            let mut used: Vec<(u16, Used)> = Vec::new();
            let mut woken = false;
            for (data, res) in done {
                if data == WAKE {
                    woken = true;
                } else if let Some(u) = self.completed(data as usize - 1, res) {
                    used.push(u);
                }
            }
            self.complete(&mut used);
            if woken {
                self.take_new();
                if !self.closing {
                    self.arm_wake();
                }
            }
            let own_empty = OWN.with(|o| o.borrow().1.is_empty());
            if self.closing && self.in_flight == 0 && self.held.is_empty() && own_empty {
                return;
            }
        }
    }

    /// Puts `sqe` in the submission queue, submitting what is queued if it is full.
    fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every entry built here points only at memory that outlives its
            // operation: the eventfd read at `wake_buf` (owned by the engine, which ends
            // with no read armed) and I/O vectors in a slot kept until its last entry
            // completes, whose iovecs point at guest memory mapped while the engine holds
            // the memory view (see the module docs).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) {
                    tracing::error!("virtio-blk: io_uring submit failed: {e}");
                }
                std::thread::yield_now();
            }
        }
    }

    fn arm_wake(&mut self) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let sqe = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(WAKE);
        self.push(sqe);
    }

    /// Starts `job`, or holds it back for the token buckets.
    fn accept(&mut self, job: Job) {
        let wait = self.buckets.take(job.request.bytes());
        if wait.is_zero() && self.held.is_empty() {
            self.start(job);
        } else {
            self.held.push_back((Instant::now() + wait, job));
        }
    }

    /// Takes the requests handed over on this thread (completing requests served the
    /// queue again), until none are left: starting one may complete another at once.
    fn take_own(&mut self) {
        loop {
            let jobs = OWN.with(|o| std::mem::take(&mut o.borrow_mut().1));
            if jobs.is_empty() {
                return;
            }
            for job in jobs {
                self.accept(job);
            }
        }
    }

    /// Takes the requests the notifier thread sent since the last wake-up.
    fn take_new(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(job) => self.accept(job),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.closing = true;
                    return;
                }
            }
        }
    }

    /// Starts the held requests whose time came, in order.
    fn release_held(&mut self) {
        let now = Instant::now();
        while self.held.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, job)) = self.held.pop_front() {
                self.start(job);
            }
        }
    }

    /// Puts `job`'s operations in the ring (or completes it at once if it cannot start).
    fn start(&mut self, job: Job) {
        let fd = types::Fd(self.file.as_raw_fd());
        let offset = job.request.sector * SECTOR;
        let mut slot = Slot {
            job,
            iov: Vec::new(),
            parts: 0,
            result: Ok(0),
        };
        let mut sqes = Vec::new();
        match &slot.job.request.op {
            Op::Read(segs) | Op::Write(segs) => {
                let write = matches!(slot.job.request.op, Op::Write(_));
                match iovecs(&*self.ctx.memory, segs, 0) {
                    Ok(iov) => slot.iov = iov,
                    Err(e) => {
                        slot.result = Err((if write { "write" } else { "read" }, e));
                        return self.finish_now(slot);
                    }
                }
                let (ptr, len) = (slot.iov.as_ptr(), slot.iov.len() as u32);
                sqes.push(if write {
                    opcode::Writev::new(fd, ptr, len).offset(offset).build()
                } else {
                    opcode::Readv::new(fd, ptr, len).offset(offset).build()
                });
            }
            Op::Flush => sqes.push(
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
            ),
            Op::GetId(_) => return self.finish_now(slot),
            Op::Discard(ranges) | Op::WriteZeroes { ranges, .. } => {
                let mode = fallocate_mode(&slot.job.request.op);
                for &(sector, count) in ranges {
                    let (off, len) = range_bytes(sector, count);
                    sqes.push(
                        opcode::Fallocate::new(fd, len as u64)
                            .offset(off as u64)
                            .mode(mode)
                            .build(),
                    );
                }
            }
        }
        if sqes.is_empty() {
            return self.finish_now(slot);
        }
        slot.parts = sqes.len() as u32;
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[index] = Some(slot);
        self.in_flight += 1;
        for sqe in sqes {
            self.push(sqe.user_data(index as u64 + 1));
        }
    }

    /// Completes a request that needs no (more) ring operation.
    fn finish_now(&mut self, slot: Slot) {
        let len = finish(
            &slot.job.request,
            &*self.ctx.memory,
            &self.dirty,
            slot.result,
        );
        self.ctx.completer.complete(
            slot.job.queue,
            &[Used {
                head: slot.job.head,
                len,
            }],
        );
    }

    /// One entry of slot `index` completed with `res`; returns the request's used entry
    /// once its last entry did.
    fn completed(&mut self, index: usize, res: i32) -> Option<(u16, Used)> {
        let slot = self.slots.get_mut(index)?.as_mut()?;
        slot.parts = slot.parts.saturating_sub(1);
        let what = match slot.job.request.op {
            Op::Read(_) => "read",
            Op::Write(_) => "write",
            Op::Flush => "flush",
            _ => "fallocate",
        };
        if slot.result.is_ok() {
            slot.result = if res < 0 {
                Err((what, std::io::Error::from_raw_os_error(-res)))
            } else {
                Ok(res as u32)
            };
        }
        if slot.parts > 0 {
            return None;
        }
        let mut slot = self.slots[index].take()?;
        self.free.push(index);
        self.in_flight -= 1;
        if let (Op::Read(segs) | Op::Write(segs), Ok(n)) = (&slot.job.request.op, &slot.result) {
            // A short transfer: the rest, blocking, from where the kernel stopped.
            let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
            if u64::from(*n) < total {
                let write = matches!(slot.job.request.op, Op::Write(_));
                let offset = slot.job.request.sector * SECTOR;
                slot.result = transfer(
                    &self.file,
                    &*self.ctx.memory,
                    segs,
                    offset,
                    write,
                    *n as usize,
                )
                .map_err(|e| (what, e));
            }
        }
        let mem: &(dyn GuestMemory + Send + Sync) = &*self.ctx.memory;
        let len = finish(&slot.job.request, mem, &self.dirty, slot.result);
        Some((
            slot.job.queue,
            Used {
                head: slot.job.head,
                len,
            },
        ))
    }

    /// Hands the finished requests to the driver, one batch per queue.
    fn complete(&mut self, used: &mut Vec<(u16, Used)>) {
        used.sort_by_key(|(q, _)| *q);
        let mut at = 0;
        while at < used.len() {
            let q = used[at].0;
            let end = at + used[at..].iter().take_while(|(x, _)| *x == q).count();
            let batch: Vec<Used> = used[at..end].iter().map(|(_, u)| *u).collect();
            self.ctx.completer.complete(q, &batch);
            at = end;
        }
        used.clear();
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
