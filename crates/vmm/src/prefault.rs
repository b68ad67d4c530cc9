//! Prefault: allocating every page of guest memory up front (`MADV_POPULATE_WRITE`), as a
//! migration target may do while it waits for the source. The target then holds all of the
//! guest's memory at once, even pages the source never touched; in exchange the transfer
//! allocates no pages and the guest takes no first-touch faults after the switch-over.
//!
//! Populating never changes contents, so it may race with incoming pages.
use crate::logging::SpawnInSpan;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::memory::GuestMem;

/// Populated per step: progress shows and a stop takes effect between steps.
pub const CHUNK: usize = 64 << 20;

/// Progress of one prefault, shared with the thread doing it.
#[derive(Debug)]
pub struct Prefault {
    done: AtomicU64,
    total: u64,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Prefault {
    pub fn new(total: u64) -> Self {
        Self {
            done: AtomicU64::new(0),
            total,
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }

    /// Bytes populated so far.
    pub fn done_bytes(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Every page is allocated: writers need not populate anything themselves.
    pub fn is_complete(&self) -> bool {
        self.done_bytes() >= self.total
    }

    /// Why it gave up, if it did.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks the populating thread to stop after its current step.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn fail(&self, why: String) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

/// Populates every region of `mem`, `CHUNK` bytes at a time, until all is done or
/// `progress` is stopped.
pub fn populate_all(mem: &GuestMem, progress: &Prefault) -> Result<(), String> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    for r in mem.iter() {
        let base = r.get_host_address(MemoryRegionAddress(0)).map_err(|e| {
            format!(
                "guest memory at {:#x} has no mapping: {e}",
                r.start_addr().0
            )
        })?;
        let len = r.len() as usize;
        let mut off = 0;
        while off < len {
            if progress.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let n = CHUNK.min(len - off);
            // SAFETY: `base + off .. + n` lies inside this region's mapping, which `mem`
            // keeps alive; populating changes no contents.
            unsafe { populate_write(base.add(off), n) }?;
            off += n;
            progress.done.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Populates `mem` on a thread of its own; its progress is returned at once.
pub fn spawn(mem: GuestMem) -> Arc<Prefault> {
    let total = {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        mem.iter().map(|r| r.len()).sum()
    };
    let progress = Arc::new(Prefault::new(total));
    let p = progress.clone();
    let spawned = std::thread::Builder::new()
        .name("prefault".into())
        .stack_size(64 << 10)
        .spawn_in_span(move || {
            if let Err(why) = populate_all(&mem, &p) {
                p.fail(why);
            }
        });
    if let Err(e) = spawned {
        progress.fail(format!("cannot start the prefault thread: {e}"));
    }
    progress
}

/// `MADV_POPULATE_WRITE` over `len` bytes at `host` (page-aligned by the caller's region).
///
/// # Safety
/// The range must lie inside a writable mapping this process keeps alive for the call.
pub unsafe fn populate_write(host: *mut u8, len: usize) -> Result<(), String> {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    loop {
        // SAFETY: the caller vouches for the range; madvise only allocates its pages.
        let r = unsafe { libc::madvise(host.cast(), len, MADV_POPULATE_WRITE) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // Interrupted, or a transient shortage: the pages done so far stay, go again.
            Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
            Some(libc::EINVAL) => {
                return Err(format!(
                    "the kernel cannot populate memory (MADV_POPULATE_WRITE needs Linux 5.14): {e}"
                ))
            }
            _ => return Err(format!("cannot populate {len} bytes of guest memory: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    /// Resident pages of `len` bytes at `addr`, by mincore(2).
    fn resident_pages(addr: *mut u8, len: usize) -> usize {
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `addr..addr+len` is a live mapping of this test and `vec` has one byte
        // per page of it; mincore only writes `vec`.
        let r = unsafe { libc::mincore(addr.cast(), len, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|b| *b & 1 == 1).count()
    }

    #[test]
    fn populates_every_page_and_keeps_contents() {
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
        let len = CHUNK + (2 << 20);
        let mem = crate::memory::MemoryManager::create(&[
            (GuestAddress(0), len),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap()
        .ram()
        .clone();
        mem.write_slice(b"kept", GuestAddress(4096 * 3)).unwrap();
        let hosts: Vec<_> = mem
            .iter()
            .map(|r| {
                let a = r.get_host_address(MemoryRegionAddress(0)).unwrap();
                (a, r.len() as usize)
            })
            .collect();
        let before: usize = hosts.iter().map(|&(a, l)| resident_pages(a, l)).sum();
        assert!(before < 8, "fresh memory is not resident ({before} pages)");
        let p = Prefault::new(len as u64 + (1 << 20));
        populate_all(&mem, &p).unwrap();
        let after: usize = hosts.iter().map(|&(a, l)| resident_pages(a, l)).sum();
        assert_eq!(after, (len + (1 << 20)) / 4096, "every page is resident");
        assert_eq!(p.done_bytes(), p.total_bytes());
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(4096 * 3)).unwrap();
        assert_eq!(&buf, b"kept");
    }

    #[test]
    fn a_stop_ends_it_between_chunks() {
        let mem = crate::memory::MemoryManager::create(&[(GuestAddress(0), 2 * CHUNK)])
            .unwrap()
            .ram()
            .clone();
        let p = Prefault::new(2 * CHUNK as u64);
        p.stop();
        populate_all(&mem, &p).unwrap();
        assert_eq!(p.done_bytes(), 0);
    }
}
