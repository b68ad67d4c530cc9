//! In-memory VMs: a guest on [`OwnedMemory`], a source with a dirtier thread, a target.
//!
//! Test doubles for the VMM side of the traits, used by the crate's tests and by the
//! throughput benchmark. The protocol, sockets and policy they run against are the real ones.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use ray_memory::{
    DirtyBitmap, GuestMemory, GuestSpan, MemoryError, MemoryLayout, OwnedMemory, PAGE_SIZE,
};

use crate::vm::{SourceVm, TargetVm, VmError};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Guest memory on the heap ([`OwnedMemory`]) with a dirty bitmap that every write through
/// the [`GuestMemory`] view marks (4 KiB pages, like KVM's log).
#[derive(Debug)]
pub struct MemGuest {
    mem: OwnedMemory,
    dirty: Mutex<DirtyBitmap>,
}

impl MemGuest {
    /// Zeroed memory for `layout`, all clean.
    pub fn new(layout: &MemoryLayout) -> Result<Self, MemoryError> {
        Ok(Self {
            mem: OwnedMemory::zeroed(layout)?,
            dirty: Mutex::new(DirtyBitmap::clean(layout)),
        })
    }

    /// Fills `percent_nonzero` % of the pages with pseudo-random bytes from `seed` (without
    /// marking them dirty: this is the guest before the migration).
    pub fn fill(&self, seed: u64, percent_nonzero: u64) {
        let ps = PAGE_SIZE as usize;
        let mut x = seed | 1;
        let mut buf = vec![0u8; ps];
        for r in &self.mem.layout().regions {
            let Ok(region) = self.mem.span(r.gpa, r.len) else {
                continue;
            };
            for page in region.chunks(ps) {
                x = xorshift(x);
                if x % 100 < percent_nonzero {
                    let bytes = &mut buf[..page.len()];
                    for w in bytes.chunks_mut(8) {
                        x = xorshift(x);
                        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
                    }
                    page.copy_from(bytes);
                }
            }
        }
    }

    /// Touches every page so the kernel backs it now, as a VMM does for a target's memory
    /// (otherwise the first write to each page pays a page fault during the transfer).
    pub fn prefault(&self) {
        for r in &self.mem.layout().regions {
            let Ok(region) = self.mem.span(r.gpa, r.len) else {
                continue;
            };
            for page in region.chunks(PAGE_SIZE as usize) {
                let b: u8 = page.load(0).unwrap_or_default();
                page.store(0, std::hint::black_box(b));
            }
        }
    }

    /// A copy of every region, for byte-for-byte comparison.
    pub fn contents(&self) -> Vec<Vec<u8>> {
        self.mem
            .layout()
            .regions
            .iter()
            .map(|r| {
                let mut b = vec![0u8; r.len as usize];
                if let Ok(s) = self.mem.span(r.gpa, r.len) {
                    s.copy_to(&mut b);
                }
                b
            })
            .collect()
    }

    /// Gets and clears the dirty bitmap.
    pub fn take_dirty(&self) -> DirtyBitmap {
        lock(&self.dirty).take()
    }
}

impl GuestMemory for MemGuest {
    fn layout(&self) -> &MemoryLayout {
        self.mem.layout()
    }

    fn span(&self, gpa: u64, len: u64) -> Result<GuestSpan<'_>, MemoryError> {
        self.mem.span(gpa, len)
    }

    fn note_write(&self, gpa: u64, len: u64) {
        if len != 0 {
            lock(&self.dirty).mark(self.mem.layout(), gpa, len);
        }
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
            let regions = guest.layout().regions.clone();
            let ps = PAGE_SIZE;
            let total: u64 = regions.iter().map(|r| r.len / ps).sum();
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
                                    let pages = r.len / ps;
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
    fn dirty_log(&mut self) -> Result<DirtyBitmap, VmError> {
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
