//! Guest memory filled lazily, block by block, from a source that checks each block before
//! handing it out (a snapshot's memory file and its block checksums): the guest runs at
//! once, and no byte reaches it, or anyone, unchecked.
//!
//! The memory's ranges are registered with a [`Userfault`] in missing mode, so a page no one
//! has placed yet cannot be read or written: the first access (a vCPU through KVM, the VMM,
//! a system call) waits while the fault thread reads the page's block from the source, which
//! checks its checksum, and copies it in (`UFFDIO_COPY`). Meanwhile a background thread at
//! the lowest CPU priority fills every other block the same way, so the whole image ends up
//! checked; then the ranges are unregistered and the memory is plain memory again.
//!
//! Each block is placed exactly once, by whoever claims it first (an atomic bit); the others
//! wait for it. Blocks whose checksum is that of zeros are not copied: their pages are
//! mapped as zeros when touched, or left to the kernel once the fill is over.
//!
//! A block that fails its check is never placed: the fill stops, the threads waiting on it
//! stay blocked, and `on_damage` (the VMM's fail-stop) is told which block and why.
//!
//! ```text
//!   Filling ──every block placed──▶ Complete (ranges unregistered, threads end)
//!      └──────a block fails its check───▶ Failed (nothing more is placed)
//! ```
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::uffd::Userfault;
use crate::PAGE_SIZE;

/// Where the blocks come from: each is checked before it is returned.
pub trait BlockSource: Send + Sync {
    /// Block size (a multiple of the page size); a region's last block may be shorter.
    fn block_bytes(&self) -> u64;
    /// Reads region `region`'s block `index` into `buf` (`block_bytes` long) and checks
    /// it: `Ok(None)` if it is all zeros (nothing read), `Ok(Some(n))` if `buf[..n]` holds
    /// it.
    fn read_block(
        &self,
        region: usize,
        index: usize,
        buf: &mut [u8],
    ) -> Result<Option<usize>, String>;
}

/// One range of memory to fill: region `i` of the source's layout, mapped at `host`.
#[derive(Debug, Clone, Copy)]
pub struct LazyRange {
    pub host: usize,
    pub len: usize,
}

/// Where the fill is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FillState {
    Filling,
    Complete,
    Failed(String),
}

/// Called once when a block fails its check, with the reason.
pub type OnDamage = Box<dyn FnOnce(String) + Send>;

struct Bits(Vec<AtomicU64>);

impl Bits {
    fn new(n: usize) -> Self {
        Self((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    /// Sets bit `i`; true if this call set it.
    fn set(&self, i: usize) -> bool {
        let bit = 1 << (i % 64);
        self.0[i / 64].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }
    fn get(&self, i: usize) -> bool {
        self.0[i / 64].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }
}

struct Shared {
    uffd: Userfault,
    source: Box<dyn BlockSource>,
    ranges: Vec<LazyRange>,
    block: usize,
    /// Index of each range's first block among all blocks.
    first_block: Vec<usize>,
    claimed: Bits,
    done: Bits,
    zero: Bits,
    remaining: AtomicUsize,
    stopping: AtomicBool,
    /// The background fill was started.
    background: AtomicBool,
    state: Mutex<FillState>,
    changed: Condvar,
    on_damage: Mutex<Option<OnDamage>>,
    /// Written to end the fault thread's wait.
    wake_fd: std::os::fd::OwnedFd,
}

/// A lazy fill in progress (or over); dropping it stops its threads.
pub struct LazyFill {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for LazyFill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyFill")
            .field("state", &*self.shared.lock())
            .finish()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FillState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The block holding host address `addr`: (range, block in range, global index).
    fn locate(&self, addr: usize) -> Option<(usize, usize, usize)> {
        self.ranges.iter().enumerate().find_map(|(r, x)| {
            (addr >= x.host && addr < x.host + x.len).then(|| {
                let b = (addr - x.host) / self.block;
                (r, b, self.first_block[r] + b)
            })
        })
    }

    fn failed(&self) -> bool {
        matches!(*self.lock(), FillState::Failed(_))
    }

    /// Places block `b` of range `r` (global index `g`) if no one has claimed it: returns
    /// false if someone else had. A failed check marks the fill failed.
    fn place(&self, r: usize, b: usize, g: usize, buf: &mut [u8]) -> bool {
        if !self.claimed.set(g) {
            return false;
        }
        match self.source.read_block(r, b, buf) {
            Ok(None) => {
                self.zero.set(g);
            }
            Ok(Some(n)) => {
                let range = self.ranges[r];
                let at = range.host + b * self.block;
                let len = n.min(range.len - b * self.block);
                if let Err(e) = self.uffd.copy(at, &buf[..len]) {
                    // Not placed: the memory is gone (VM torn down) or the kernel refused.
                    if !self.stopping.load(Ordering::Acquire) {
                        self.fail(format!(
                            "cannot place guest memory block {b} of region {r}: {e}"
                        ));
                    }
                    return true;
                }
            }
            Err(why) => {
                self.fail(why);
                return true;
            }
        }
        self.done.set(g);
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.complete();
        }
        self.changed.notify_all();
        true
    }

    fn fail(&self, why: String) {
        {
            let mut st = self.lock();
            if *st != FillState::Filling {
                return;
            }
            *st = FillState::Failed(why.clone());
        }
        self.changed.notify_all();
        let callback = self
            .on_damage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(f) = callback {
            f(why);
        }
    }

    /// Every block is placed: the memory becomes plain memory.
    fn complete(&self) {
        {
            let mut st = self.lock();
            if *st != FillState::Filling {
                return;
            }
            for x in &self.ranges {
                // Waiting threads (on pages of zero blocks) retry as ordinary faults.
                let _ = self.uffd.unregister(x.host, x.len);
            }
            *st = FillState::Complete;
        }
        self.changed.notify_all();
        self.wake_fault_thread();
    }

    fn wake_fault_thread(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) of 8 bytes from a local array to our eventfd.
        unsafe {
            libc::write(self.wake_fd.as_raw_fd(), one.as_ptr().cast(), one.len());
        }
    }

    /// Waits until block `g` is placed (or the fill ends otherwise).
    fn wait_done(&self, g: usize) {
        let mut st = self.lock();
        while !self.done.get(g)
            && *st == FillState::Filling
            && !self.stopping.load(Ordering::Acquire)
        {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Resolves a fault at `addr`.
    fn serve(&self, addr: usize, buf: &mut [u8]) {
        let Some((r, b, g)) = self.locate(addr) else {
            return;
        };
        if self.failed() {
            // Nothing more reaches the guest; the faulting thread waits for the end.
            return;
        }
        if !self.place(r, b, g, buf) {
            self.wait_done(g);
        }
        if !self.done.get(g) {
            return;
        }
        let page = addr & !(PAGE_SIZE as usize - 1);
        if self.zero.get(g) {
            // A zero block is never copied: map zeros where it is touched.
            let _ = self.uffd.zero(page, PAGE_SIZE as usize);
        } else {
            // Placed by another thread: its copy woke the waiters of that moment; this
            // fault may have come after.
            let _ = self.uffd.wake(page, PAGE_SIZE as usize);
        }
    }

    /// Places every block not placed yet (the background fill, or a waiter helping it).
    fn fill_all(&self, buf: &mut [u8]) {
        for (r, x) in self.ranges.iter().enumerate() {
            for b in 0..x.len.div_ceil(self.block) {
                if self.stopping.load(Ordering::Acquire) || self.failed() {
                    return;
                }
                let g = self.first_block[r] + b;
                if !self.claimed.get(g) {
                    self.place(r, b, g, buf);
                }
            }
        }
    }
}

fn fault_thread(s: &Shared) {
    // A vCPU (or the VMM) waits on every fault this thread serves: where allowed (root,
    // CAP_SYS_NICE), it runs ahead of ordinary threads on a busy host.
    // SAFETY: setpriority(2) of this thread only (a thread id on Linux).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10);
    }
    let mut buf = vec![0u8; s.block];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: s.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: s.wake_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll(2) on two pollfds in a local array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            return;
        }
        match s.uffd.read_faults(16) {
            Ok(addrs) => {
                for a in addrs {
                    s.serve(a, &mut buf);
                }
            }
            Err(_) => return,
        }
    }
}

impl LazyFill {
    /// Registers `ranges` (range `i` is the source's region `i`, none of it placed yet: fresh
    /// shared or anonymous memory) and starts the fault thread; the background fill starts
    /// with [`fill_in_background`](Self::fill_in_background).
    pub fn start(
        ranges: Vec<LazyRange>,
        source: Box<dyn BlockSource>,
        on_damage: OnDamage,
    ) -> std::io::Result<Arc<Self>> {
        let block = source.block_bytes() as usize;
        if block == 0 || !block.is_multiple_of(PAGE_SIZE as usize) {
            return Err(std::io::Error::other(format!(
                "block size {block} is not a multiple of the page size"
            )));
        }
        let uffd = Userfault::new()?;
        let mut first_block = Vec::with_capacity(ranges.len());
        let mut blocks = 0;
        for x in &ranges {
            first_block.push(blocks);
            blocks += x.len.div_ceil(block);
            uffd.register(x.host, x.len)?;
        }
        // SAFETY: eventfd(2) returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `efd` is a new descriptor owned by nothing else.
        let wake_fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(efd) };
        let shared = Arc::new(Shared {
            uffd,
            source,
            first_block,
            block,
            claimed: Bits::new(blocks),
            done: Bits::new(blocks),
            zero: Bits::new(blocks),
            remaining: AtomicUsize::new(blocks),
            stopping: AtomicBool::new(false),
            background: AtomicBool::new(false),
            state: Mutex::new(FillState::Filling),
            changed: Condvar::new(),
            on_damage: Mutex::new(Some(on_damage)),
            wake_fd,
            ranges,
        });
        if blocks == 0 {
            shared.complete();
        }
        let fill = Arc::new(Self {
            shared: shared.clone(),
            threads: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let faults = std::thread::Builder::new()
            .name("mem-faults".into())
            .stack_size(128 << 10)
            .spawn(move || fault_thread(&s))?;
        fill.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(faults);
        Ok(fill)
    }

    /// Starts the background fill (once; later calls do nothing). Left to the caller so
    /// that it does not compete with the restore it belongs to: on a small host, a
    /// thread placing blocks slows everyone else's page faults and allocations.
    pub fn fill_in_background(&self) -> std::io::Result<()> {
        if self.shared.background.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let s = self.shared.clone();
        let background = std::thread::Builder::new()
            .name("mem-fill".into())
            .stack_size(128 << 10)
            .spawn(move || {
                // The lowest priority: this thread only uses CPU time no one else wants
                // (the guest's own faults are served by the fault thread).
                // SAFETY: setpriority(2) of this thread only (a thread id on Linux).
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
                }
                let mut buf = vec![0u8; s.block];
                s.fill_all(&mut buf);
            })?;
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(background);
        Ok(())
    }

    pub fn state(&self) -> FillState {
        self.shared.lock().clone()
    }

    /// Places every block not placed yet on this thread too (at its priority), and waits
    /// until the fill is over: `Ok` once all of memory is placed and checked.
    pub fn complete(&self) -> Result<(), String> {
        let s = &self.shared;
        let mut buf = vec![0u8; s.block];
        s.fill_all(&mut buf);
        let mut st = s.lock();
        loop {
            match &*st {
                FillState::Complete => return Ok(()),
                FillState::Failed(why) => return Err(why.clone()),
                FillState::Filling if s.stopping.load(Ordering::Acquire) => {
                    return Err("the fill was stopped".into())
                }
                FillState::Filling => {
                    st = s.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }
}

impl Drop for LazyFill {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.changed.notify_all();
        self.shared.wake_fault_thread();
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    const BLOCK: usize = 64 << 10;

    /// Region `r`'s block `b`: bytes from (r, b), block 1 of every region zero, and the
    /// block in `bad` failing its check.
    struct Pattern {
        lens: Vec<usize>,
        bad: Option<(usize, usize)>,
    }

    fn byte(r: usize, b: usize, i: usize) -> u8 {
        (r * 31 + b * 7 + i / 4096) as u8 | 1
    }

    impl BlockSource for Pattern {
        fn block_bytes(&self) -> u64 {
            BLOCK as u64
        }
        fn read_block(&self, r: usize, b: usize, buf: &mut [u8]) -> Result<Option<usize>, String> {
            if self.bad == Some((r, b)) {
                return Err(format!("block {b} of region {r} fails its checksum"));
            }
            if b == 1 {
                return Ok(None);
            }
            let n = (self.lens[r] - b * BLOCK).min(BLOCK);
            for (i, x) in buf[..n].iter_mut().enumerate() {
                *x = byte(r, b, i);
            }
            Ok(Some(n))
        }
    }

    /// Anonymous memory for `lens`, unmapped on drop.
    struct Anon(Vec<LazyRange>);

    impl Anon {
        fn new(lens: &[usize]) -> Self {
            Self(
                lens.iter()
                    .map(|&len| {
                        // SAFETY: a fresh anonymous mapping; nothing else is affected.
                        let p = unsafe {
                            libc::mmap(
                                std::ptr::null_mut(),
                                len,
                                libc::PROT_READ | libc::PROT_WRITE,
                                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                                -1,
                                0,
                            )
                        };
                        assert_ne!(p, libc::MAP_FAILED);
                        LazyRange {
                            host: p as usize,
                            len,
                        }
                    })
                    .collect(),
            )
        }
        fn read(&self, r: usize, off: usize) -> u8 {
            assert!(off < self.0[r].len);
            // SAFETY: inside a live mapping of ours; a volatile read, as guest memory is
            // read (the fault thread places the page first).
            unsafe { std::ptr::read_volatile((self.0[r].host + off) as *const u8) }
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            for x in &self.0 {
                // SAFETY: unmapping what `new` mapped, after every user is done.
                unsafe {
                    libc::munmap(x.host as *mut libc::c_void, x.len);
                }
            }
        }
    }

    /// A fill over `lens`, or `None` where userfaultfd is not allowed (the test then
    /// proves nothing here and says so).
    fn start(
        lens: &[usize],
        bad: Option<(usize, usize)>,
    ) -> Option<(Anon, Arc<LazyFill>, mpsc::Receiver<String>)> {
        let mem = Anon::new(lens);
        let (tx, rx) = mpsc::channel();
        let source = Pattern {
            lens: lens.to_vec(),
            bad,
        };
        let on_damage: OnDamage = Box::new(move |why| {
            let _ = tx.send(why);
        });
        match LazyFill::start(mem.0.clone(), Box::new(source), on_damage) {
            Ok(fill) => Some((mem, fill, rx)),
            Err(e) => {
                eprintln!("skipped: no userfaultfd here ({e})");
                None
            }
        }
    }

    #[test]
    fn first_touch_places_checked_blocks_and_the_fill_completes() {
        let lens = [4 * BLOCK, 2 * BLOCK + 8192];
        let Some((mem, fill, damage)) = start(&lens, None) else {
            return;
        };
        // Touches in any order, from this thread: each waits for its block.
        assert_eq!(mem.read(1, 2 * BLOCK + 4096), byte(1, 2, 4096));
        assert_eq!(mem.read(0, 3 * BLOCK + 5), byte(0, 3, 5));
        assert_eq!(mem.read(0, BLOCK + 100), 0, "zero blocks read as zeros");
        assert_eq!(fill.state(), FillState::Filling);
        fill.fill_in_background().unwrap();
        fill.complete().unwrap();
        assert_eq!(fill.state(), FillState::Complete);
        // Every byte is there, the zero blocks' pages too (ordinary faults now).
        for (r, len) in lens.iter().enumerate() {
            for off in (0..*len).step_by(4096) {
                let want = if off / BLOCK == 1 {
                    0
                } else {
                    byte(r, off / BLOCK, off % BLOCK)
                };
                assert_eq!(mem.read(r, off), want, "region {r} offset {off:#x}");
            }
        }
        assert!(damage.try_recv().is_err());
        drop(fill);
    }

    #[test]
    fn a_block_failing_its_check_is_never_placed_and_is_reported_once() {
        let lens = [6 * BLOCK];
        let Some((mem, fill, damage)) = start(&lens, Some((0, 4))) else {
            return;
        };
        assert_eq!(mem.read(0, 5), byte(0, 0, 5));
        let err = fill.complete().unwrap_err();
        assert!(err.contains("block 4 of region 0"), "{err}");
        assert_eq!(damage.recv().unwrap(), err);
        assert!(damage.try_recv().is_err(), "reported once");
        assert!(matches!(fill.state(), FillState::Failed(_)));
        // Stopping the fill leaves the unplaced pages to the kernel again only when the
        // memory goes: the test never touches block 4.
        drop(fill);
        drop(mem);
    }
}
