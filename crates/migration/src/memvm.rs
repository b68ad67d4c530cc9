//! In-memory VMs: a `Vec<u8>` guest, a source with a dirtier thread, a target.
//!
//! Test doubles for the VMM side of the traits, used by the crate's tests and by the
//! throughput benchmark. The protocol, sockets and policy they run against are the real ones.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::protocol::MemoryRegion;
use crate::vm::{DirtyBitmap, GuestMemoryAccess, MemoryError, SourceVm, TargetVm, VmError};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Guest memory in `Vec<u8>`s with a dirty bitmap that every write marks.
#[derive(Debug)]
pub struct MemGuest {
    regions: Vec<MemoryRegion>,
    data: Vec<Mutex<Vec<u8>>>,
    dirty: Mutex<Vec<DirtyBitmap>>,
    page_size: u64,
}

impl MemGuest {
    pub fn new(regions: Vec<MemoryRegion>, page_size: u64) -> Self {
        let data = regions
            .iter()
            .map(|r| Mutex::new(vec![0; r.size as usize]))
            .collect();
        let dirty = regions
            .iter()
            .map(|r| DirtyBitmap::new((r.size / page_size) as usize))
            .collect();
        Self {
            regions,
            data,
            dirty: Mutex::new(dirty),
            page_size,
        }
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Fills `percent_nonzero` % of the pages with pseudo-random bytes from `seed`.
    pub fn fill(&self, seed: u64, percent_nonzero: u64) {
        let mut x = seed | 1;
        for region in &self.data {
            let mut d = lock(region);
            for page in d.chunks_mut(self.page_size as usize) {
                x = xorshift(x);
                if x % 100 < percent_nonzero {
                    for w in page.chunks_mut(8) {
                        x = xorshift(x);
                        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
                    }
                }
            }
        }
    }

    /// Touches every page so the kernel backs it now, as a VMM does for a target's memory
    /// (otherwise the first write to each page pays a page fault during the transfer).
    pub fn prefault(&self) {
        for region in &self.data {
            let mut d = lock(region);
            for page in d.chunks_mut(self.page_size as usize) {
                page[0] = std::hint::black_box(page[0]);
            }
        }
    }

    /// A copy of every region, for byte-for-byte comparison.
    pub fn contents(&self) -> Vec<Vec<u8>> {
        self.data.iter().map(|d| lock(d).clone()).collect()
    }

    /// Gets and clears the dirty bitmaps.
    pub fn take_dirty(&self) -> Vec<DirtyBitmap> {
        let mut d = lock(&self.dirty);
        let fresh = d.iter().map(|b| DirtyBitmap::new(b.pages())).collect();
        std::mem::replace(&mut *d, fresh)
    }

    fn mark_dirty(&self, region: usize, off: usize, len: usize) {
        if len != 0 {
            let ps = self.page_size as usize;
            let mut d = lock(&self.dirty);
            for p in off / ps..=(off + len - 1) / ps {
                d[region].set(p);
            }
        }
    }

    fn locate(&self, gpa: u64, len: usize) -> Result<(usize, usize), MemoryError> {
        for (i, r) in self.regions.iter().enumerate() {
            if gpa >= r.gpa && gpa - r.gpa + len as u64 <= r.size {
                return Ok((i, (gpa - r.gpa) as usize));
            }
        }
        Err(MemoryError {
            gpa,
            len,
            reason: "the range is not inside one guest memory region".into(),
        })
    }
}

impl GuestMemoryAccess for MemGuest {
    fn regions(&self) -> Vec<MemoryRegion> {
        self.regions.clone()
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let (i, off) = self.locate(gpa, buf.len())?;
        buf.copy_from_slice(&lock(&self.data[i])[off..off + buf.len()]);
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let (i, off) = self.locate(gpa, data.len())?;
        lock(&self.data[i])[off..off + data.len()].copy_from_slice(data);
        self.mark_dirty(i, off, data.len());
        Ok(())
    }

    fn fill_in_place(
        &self,
        gpa: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<bool, MemoryError> {
        let (i, off) = self.locate(gpa, len)?;
        fill(&mut lock(&self.data[i])[off..off + len]);
        self.mark_dirty(i, off, len);
        Ok(true)
    }
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Run state shared by the source double and its dirtier thread.
#[derive(Debug, Default)]
pub struct VmFlags {
    /// Held by the dirtier while it writes, so `pause` returning means no more writes.
    paused: Mutex<bool>,
    pub throttle: AtomicU8,
    pub stop: AtomicBool,
    pub pauses: AtomicU64,
    pub resumes: AtomicU64,
    pub pages_dirtied: AtomicU64,
}

impl VmFlags {
    pub fn is_paused(&self) -> bool {
        *lock(&self.paused)
    }
}

/// The source double: pause/resume/throttle drive the dirtier; state is a fixed blob.
#[derive(Debug)]
pub struct InMemorySource {
    pub guest: Arc<MemGuest>,
    pub flags: Arc<VmFlags>,
    pub state: Vec<u8>,
    pub logging: bool,
}

impl InMemorySource {
    pub fn new(guest: Arc<MemGuest>, state: Vec<u8>) -> Self {
        Self {
            guest,
            flags: Arc::new(VmFlags::default()),
            state,
            logging: false,
        }
    }

    /// Starts a "vCPU" that writes `pages_per_ms` random pages each millisecond while
    /// running, slowed by the throttle; it returns how many pages it wrote.
    pub fn spawn_dirtier(&self, pages_per_ms: u64, seed: u64) -> JoinHandle<u64> {
        let guest = self.guest.clone();
        let flags = self.flags.clone();
        std::thread::spawn(move || {
            let regions = guest.regions();
            let ps = guest.page_size();
            let total: u64 = regions.iter().map(|r| r.size / ps).sum();
            let mut x = seed | 1;
            let mut written = 0;
            let mut page = vec![0u8; ps as usize];
            while !flags.stop.load(Ordering::SeqCst) {
                {
                    let paused = lock(&flags.paused);
                    if !*paused {
                        for _ in 0..pages_per_ms {
                            x = xorshift(x);
                            let mut n = x % total.max(1);
                            let gpa = regions
                                .iter()
                                .find_map(|r| {
                                    let pages = r.size / ps;
                                    if n < pages {
                                        Some(r.gpa + n * ps)
                                    } else {
                                        n -= pages;
                                        None
                                    }
                                })
                                .unwrap_or(0);
                            page.fill((x >> 8) as u8 | 1);
                            let _ = guest.write(gpa, &page);
                            written += 1;
                        }
                        flags.pages_dirtied.store(written, Ordering::SeqCst);
                    }
                }
                let t = u64::from(flags.throttle.load(Ordering::SeqCst).min(99));
                std::thread::sleep(Duration::from_micros(1000 * 100 / (100 - t)));
            }
            written
        })
    }
}

impl SourceVm for InMemorySource {
    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        self.guest.take_dirty();
        self.logging = true;
        Ok(())
    }
    fn dirty_log(&mut self) -> Result<Vec<DirtyBitmap>, VmError> {
        Ok(self.guest.take_dirty())
    }
    fn stop_dirty_log(&mut self) -> Result<(), VmError> {
        self.logging = false;
        Ok(())
    }
    fn pause(&mut self) -> Result<(), VmError> {
        *lock(&self.flags.paused) = true;
        self.flags.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        *lock(&self.flags.paused) = false;
        self.flags.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn throttle(&mut self, percent: u8) -> Result<(), VmError> {
        self.flags.throttle.store(percent, Ordering::SeqCst);
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        Ok(self.state.clone())
    }
}

/// The target double: records what happened to it.
#[derive(Debug, Default)]
pub struct InMemoryTarget {
    pub restored: Option<Vec<u8>>,
    pub running: bool,
    pub discarded: bool,
    /// Makes `resume` fail, to test the explicit-refusal path.
    pub fail_resume: bool,
}

impl TargetVm for InMemoryTarget {
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.restored = Some(state.to_vec());
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        if self.fail_resume {
            return Err(VmError {
                op: "resume",
                reason: "the test asked resume to fail".into(),
            });
        }
        self.running = true;
        Ok(())
    }
    fn discard(&mut self) {
        self.discarded = true;
        self.running = false;
    }
}
