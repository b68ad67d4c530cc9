//! The disk's I/O, off the vCPU and notifier threads, by one of two engines
//! ([`Engine`]), chosen per disk:
//!
//! - **pool**: a pool of workers takes checked requests from a shared queue, one each, so
//!   that as many requests as there are workers are at the disk at once (a guest at queue
//!   depth 32 needs that with O_DIRECT), and moves data between the file and guest memory
//!   with `preadv`/`pwritev` straight on guest pages (no bounce buffer). Idle workers
//!   wait on the queue's condition variable, so a request wakes exactly one of them.
//! - **uring**: one thread per disk owns an io_uring ([`super::uring`]) and submits the
//!   same operations (readv/writev on guest pages, fsync, fallocate) without blocking, so
//!   the whole queue depth is at the disk from one thread.
//!
//! Either way completions reach the driver through the device's [`Completer`], batched by
//! event indices: the transport interrupts only when the used index passes the driver's
//! `used_event`, which our driver re-arms only after it took every completion. Which
//! engine is the default, and why, is measured by `ray bench blk` (README).
//!
//! [`Completer`]: crate::virtio::Completer
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use ray_memory::GuestMemory;

use super::dirty::DirtyBlocks;
use super::request::{Op, Request, Segment, SECTOR, S_IOERR, S_OK};
use crate::rate::{RateLimit, TokenBucket};
use crate::virtio::completer::Used;
use crate::virtio::DeviceContext;

/// How a disk's requests reach the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// A pool of [`WORKERS`] blocking threads.
    #[default]
    Pool,
    /// One thread driving an io_uring.
    Uring,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Pool => "pool",
            Engine::Uring => "uring",
        }
    }
}

/// I/O workers per disk of the pool engine: requests at the disk at once.
pub const WORKERS: usize = 32;

/// A disk's running engine.
pub enum Backend {
    Pool(Workers),
    Uring(super::uring::Uring),
}

impl Backend {
    /// Starts `engine` for `file`; its threads are named after `name`.
    pub fn start(
        engine: Engine,
        name: &str,
        file: Arc<File>,
        context: DeviceContext,
        limit: RateLimit,
        dirty: Arc<DirtyBlocks>,
    ) -> std::io::Result<Self> {
        Ok(match engine {
            Engine::Pool => {
                Backend::Pool(Workers::start(name, WORKERS, file, context, limit, dirty)?)
            }
            Engine::Uring => Backend::Uring(super::uring::Uring::start(
                name, file, context, limit, dirty,
            )?),
        })
    }

    /// Hands `job` to the engine; gives it back if the engine is gone.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        match self {
            Backend::Pool(w) => w.submit(job),
            Backend::Uring(u) => u.submit(job),
        }
    }
}

pub struct Job {
    pub queue: u16,
    pub head: u16,
    pub request: Request,
}

pub(super) struct Buckets {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl Buckets {
    pub(super) fn new(limit: RateLimit) -> Self {
        Self {
            bytes: limit.bytes_per_sec.map(TokenBucket::new),
            ops: limit.ops_per_sec.map(TokenBucket::new),
        }
    }

    /// How long to wait before a request of `bytes`.
    pub(super) fn take(&mut self, bytes: u64) -> std::time::Duration {
        let b = self
            .bytes
            .as_mut()
            .map_or_else(Default::default, |t| t.take(bytes));
        let o = self
            .ops
            .as_mut()
            .map_or_else(Default::default, |t| t.take(1));
        b.max(o)
    }
}

pub struct Workers {
    queue: Arc<JobQueue>,
    threads: Vec<JoinHandle<()>>,
}

/// The pool's requests not yet taken by a worker. Idle workers wait on `ready` (which
/// releases the lock), so handing one request over wakes one worker, and a worker holds
/// the lock only to take a request, never while it waits.
struct JobQueue {
    jobs: Mutex<Queued>,
    ready: Condvar,
}

struct Queued {
    jobs: VecDeque<Job>,
    /// The disk goes away: workers end once the queue is empty.
    closed: bool,
}

impl JobQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next request, waiting for one; `None` once closed and empty.
    fn take(&self) -> Option<Job> {
        let mut q = self.lock();
        loop {
            if let Some(j) = q.jobs.pop_front() {
                return Some(j);
            }
            if q.closed {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Workers {
    pub fn start(
        name: &str,
        count: usize,
        file: Arc<File>,
        context: DeviceContext,
        limit: RateLimit,
        dirty: Arc<DirtyBlocks>,
    ) -> std::io::Result<Self> {
        let queue = Arc::new(JobQueue {
            jobs: Mutex::new(Queued {
                jobs: VecDeque::with_capacity(256),
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let limited = limit.bytes_per_sec.is_some() || limit.ops_per_sec.is_some();
        let buckets = Arc::new(Mutex::new(Buckets::new(limit)));
        let mut threads = Vec::new();
        for i in 0..count {
            let (queue, file, ctx, buckets, dirty) = (
                queue.clone(),
                file.clone(),
                context.clone(),
                buckets.clone(),
                dirty.clone(),
            );
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-io{i}"))
                    .stack_size(256 << 10)
                    .spawn(move || {
                        ray_seccomp::enter(ray_seccomp::Kind::BlkWorker);
                        worker(&queue, &file, &ctx, &buckets, &dirty, limited)
                    })?,
            );
        }
        Ok(Self { queue, threads })
    }

    pub fn submit(&self, job: Job) -> Result<(), Job> {
        let mut q = self.queue.lock();
        if q.closed {
            return Err(job);
        }
        q.jobs.push_back(job);
        drop(q);
        self.queue.ready.notify_one();
        Ok(())
    }
}

impl Drop for Workers {
    /// Ends the workers once they finished what they hold. A worker may itself drop the
    /// last reference to the device (completing a request as the VM goes away): it is not
    /// joined, it ends on its own.
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

fn worker(
    queue: &JobQueue,
    file: &File,
    ctx: &DeviceContext,
    buckets: &Mutex<Buckets>,
    dirty: &DirtyBlocks,
    limited: bool,
) {
    while let Some(job) = queue.take() {
        // Without limits the buckets never hold a request back: no lock to take.
        if limited {
            let wait = buckets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(job.request.bytes());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        let len = execute(&job.request, file, &*ctx.memory, dirty);
        ctx.completer.complete(
            job.queue,
            &[Used {
                head: job.head,
                len,
            }],
        );
    }
}

/// Does `request` on `file` and writes its status; returns the bytes written into the
/// guest's buffers (data and status).
pub fn execute(
    request: &Request,
    file: &File,
    mem: &(dyn GuestMemory + Send + Sync),
    dirty: &DirtyBlocks,
) -> u32 {
    let offset = request.sector * super::request::SECTOR;
    let result = match &request.op {
        Op::Read(segs) => transfer(file, mem, segs, offset, false, 0).map_err(|e| ("read", e)),
        Op::Write(segs) => transfer(file, mem, segs, offset, true, 0).map_err(|e| ("write", e)),
        // SAFETY: fdatasync on an open descriptor.
        Op::Flush => match unsafe { libc::fdatasync(file.as_raw_fd()) } {
            0 => Ok(0),
            _ => Err(("flush", std::io::Error::last_os_error())),
        },
        Op::GetId(_) => Ok(0),
        Op::Discard(ranges) | Op::WriteZeroes { ranges, .. } => {
            let mode = fallocate_mode(&request.op);
            ranges
                .iter()
                .try_for_each(|&(sector, count)| {
                    let (off, len) = range_bytes(sector, count);
                    // SAFETY: fallocate on an open descriptor with plain integer arguments.
                    match unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) } {
                        0 => Ok(()),
                        _ => Err(std::io::Error::last_os_error()),
                    }
                })
                .map(|()| 0)
                .map_err(|e| ("fallocate", e))
        }
    };
    finish(request, mem, dirty, result)
}

/// Ends `request` with the outcome of its I/O (the data bytes it moved): notes the guest
/// pages a read filled, writes the status byte, and returns the bytes written into the
/// guest's buffers (data and status). An error is logged and answers IOERR. Every engine
/// ends its requests here, so this is where the disk's changed blocks are marked: after
/// the file changed, before the guest hears of it (see [`DirtyBlocks`]).
pub fn finish(
    request: &Request,
    mem: &(dyn GuestMemory + Send + Sync),
    dirty: &DirtyBlocks,
    result: Result<u32, (&str, std::io::Error)>,
) -> u32 {
    dirty.mark_request(request);
    let (status, written) = match result {
        Ok(n) => {
            if let Op::Read(segs) = &request.op {
                for s in segs {
                    mem.note_write(s.addr, u64::from(s.len));
                }
                (S_OK, n)
            } else {
                (S_OK, 0)
            }
        }
        Err((what, e)) => (io_error(what, e), 0),
    };
    let _ = mem.write(request.status, &[status]);
    written + 1
}

/// The `fallocate` mode of a discard or write-zeroes request: discard and write-zeroes
/// with UNMAP punch holes, plain write-zeroes zeroes the range in place.
pub fn fallocate_mode(op: &Op) -> libc::c_int {
    match op {
        Op::WriteZeroes { unmap: false, .. } => {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        }
        _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    }
}

/// A (sector, sectors) range as (byte offset, byte length); the parser bounded both by
/// the disk's capacity.
pub fn range_bytes(sector: u64, count: u32) -> (libc::off_t, libc::off_t) {
    (
        (sector * SECTOR) as libc::off_t,
        (u64::from(count) * SECTOR) as libc::off_t,
    )
}

fn io_error(what: &str, e: std::io::Error) -> u8 {
    tracing::warn!("virtio-blk: {what} failed: {e}");
    S_IOERR
}

/// The I/O vector of `segs` (raw pointers into guest memory), without its first `skip`
/// bytes.
pub fn iovecs(
    mem: &(dyn GuestMemory + Send + Sync),
    segs: &[Segment],
    skip: usize,
) -> std::io::Result<Vec<libc::iovec>> {
    let mut iov = Vec::with_capacity(segs.len());
    for s in segs {
        let span = mem
            .span(s.addr, u64::from(s.len))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        iov.push(libc::iovec {
            iov_base: span.as_ptr().cast(),
            iov_len: span.len(),
        });
    }
    let mut first = 0;
    advance(&mut iov, &mut first, skip);
    iov.drain(..first);
    Ok(iov)
}

/// Steps `iov[first..]` over `n` bytes that moved.
fn advance(iov: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while *first < iov.len() && n >= iov[*first].iov_len {
        n -= iov[*first].iov_len;
        *first += 1;
    }
    if n > 0 && *first < iov.len() {
        iov[*first].iov_base = iov[*first].iov_base.wrapping_add(n);
        iov[*first].iov_len -= n;
    }
}

/// Moves the bytes of `segs` after the first `skip` from or to the file at `offset +
/// skip`, blocking; returns the request's total count (`skip` included).
pub fn transfer(
    file: &File,
    mem: &(dyn GuestMemory + Send + Sync),
    segs: &[Segment],
    offset: u64,
    write: bool,
    skip: usize,
) -> std::io::Result<u32> {
    let mut iov = iovecs(mem, segs, skip)?;
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    let mut done = 0usize;
    let mut first = 0usize;
    while done < total {
        let at = (offset + (skip + done) as u64) as libc::off_t;
        let n = iov.len() - first;
        let cnt = n.min(1024) as libc::c_int;
        // SAFETY: every iovec points into a span of guest memory that stays mapped while
        // `mem` lives; the kernel reads (pwritev) or writes (preadv) only those bytes,
        // which are never seen as a Rust reference.
        let r = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), iov[first..].as_ptr(), cnt, at)
            } else {
                libc::preadv(file.as_raw_fd(), iov[first..].as_ptr(), cnt, at)
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file ended inside the request",
            ));
        }
        done += r as usize;
        advance(&mut iov, &mut first, r as usize);
    }
    Ok((skip + total) as u32)
}
