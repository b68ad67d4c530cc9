//! Guest memory's one owner: the [`MemoryManager`].
//!
//! It maps guest RAM (a memfd, or a snapshot's memory file mapped privately), keeps the
//! zero map (pages known never to have been written, which readers skip without faulting
//! them in), and owns the dirty log: KVM's log is read in one place and fanned out to named
//! consumers (incremental snapshots, a migration, a display), each taking its own set
//! ([`ray_memory::DirtyFanout`]). Pages the VMM writes itself (loaders, device DMA, a
//! migration target placing pages) are marked in vm-memory's `AtomicBitmap` and join the
//! same fan-out. Snapshot, migration, devices and display see memory only through
//! [`ray_memory::GuestMemory`], which the manager implements.
//!
//! Regions are the RAM layout's, split at guest NUMA node boundaries, each node backed by
//! its own memfd ([`MemoryManager::create_split`]); device regions (framebuffers) will be
//! further entries of the same layout, so callers do not change when they arrive.
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ray_memory::{
    BlockSource, ConsumerId, DirtyBitmap, DirtyFanout, FillState, GuestMemory, GuestSpan, LazyFill,
    LazyRange, MemoryError as ViewError, MemoryLayout, PAGE_SIZE,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory as vm-memory maps it. The bitmap records every write the VMM itself makes
/// through vm-memory (loader, heartbeat doorbells) or through the manager's view.
pub type GuestMem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Name of the memfd behind guest RAM; `/proc/<pid>/smaps` shows it as
/// `/memfd:ray-guest-ram`, which is how the VMM's own footprint is told apart from guest pages.
pub const GUEST_RAM_NAME: &str = "ray-guest-ram";

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the memfd for {bytes} bytes of guest RAM: {source}")]
    Memfd { bytes: u64, source: std::io::Error },
    #[error("cannot map {bytes} bytes of guest RAM: {reason}")]
    Map { bytes: u64, reason: String },
    #[error("cannot fill guest RAM lazily: {0}")]
    Lazy(#[source] std::io::Error),
    /// A block of a lazily filled image failed its check: nothing of it was placed.
    #[error("guest memory is damaged: {0}")]
    Damaged(String),
}

/// A new empty memfd named [`GUEST_RAM_NAME`] (`bytes`: the guest's size, for errors).
fn new_memfd(bytes: u64) -> Result<File, MemoryError> {
    let name = c"ray-guest-ram";
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new fd or
    // -1; no memory of ours is touched.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd {
            bytes,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// KVM's half of the dirty log, as the VM provides it: the manager never calls KVM.
pub trait KvmDirtyLog {
    /// KVM's dirty bits of memory slot `slot` (`bytes` long), cleared as they are read.
    fn read_slot(&self, slot: u32, bytes: u64) -> Result<Vec<u64>, String>;
}

/// The dirty log's bookkeeping: consumers and whether KVM logs.
#[derive(Debug)]
struct DirtyState {
    fanout: DirtyFanout,
}

/// Per-page "may hold data" bits; a clear bit means the page is known to be zero. Valid
/// while `enabled`: from the moment the manager learnt which pages hold data (the memfd's
/// extents, or fresh memory on a migration target), kept up to date by every dirty-log read
/// and every write of the VMM.
#[derive(Debug)]
struct ZeroMap {
    enabled: AtomicBool,
    bits: Vec<Vec<AtomicU64>>,
}

impl ZeroMap {
    fn new(layout: &MemoryLayout) -> Self {
        Self {
            enabled: AtomicBool::new(false),
            bits: layout
                .regions
                .iter()
                .map(|r| {
                    (0..r.pages().div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
        }
    }

    fn set_pages(&self, region: usize, first: u64, n: u64) {
        let Some(words) = self.bits.get(region) else {
            return;
        };
        for p in first..first + n {
            if let Some(w) = words.get((p / 64) as usize) {
                w.fetch_or(1 << (p % 64), Ordering::Release);
            }
        }
    }

    fn clear(&self) {
        self.bits
            .iter()
            .flatten()
            .for_each(|w| w.store(0, Ordering::Relaxed));
    }

    fn any_set(&self, region: usize, first: u64, n: u64) -> bool {
        let Some(words) = self.bits.get(region) else {
            return true;
        };
        (first..first + n).any(|p| {
            words
                .get((p / 64) as usize)
                .is_none_or(|w| w.load(Ordering::Acquire) & (1 << (p % 64)) != 0)
        })
    }
}

struct Inner {
    /// The lazy fill of a verified restore while it runs ([`MemoryManager::fill_lazily`]).
    /// First, so it is dropped first: its threads stop before the mappings go.
    fill: Mutex<Option<Arc<LazyFill>>>,
    ram: GuestMem,
    layout: MemoryLayout,
    /// Host address of each region's first byte, in layout order.
    hosts: Vec<usize>,
    /// Whether the regions are shared memfd mappings (their holes are known zero).
    memfd: bool,
    zero: ZeroMap,
    dirty: Mutex<DirtyState>,
    /// A prefault populating this memory (migration target), if one runs.
    prefault: Mutex<Option<Arc<crate::prefault::Prefault>>>,
}

/// A handle on guest memory that does not keep it mapped (a background policy thread's).
#[derive(Clone)]
pub struct WeakMemory(std::sync::Weak<Inner>);

impl WeakMemory {
    /// The memory, while anyone else still holds it.
    pub fn upgrade(&self) -> Option<MemoryManager> {
        self.0.upgrade().map(|inner| MemoryManager { inner })
    }
}

/// The owner of guest memory; a cheap handle (clones share it).
#[derive(Clone)]
pub struct MemoryManager {
    inner: Arc<Inner>,
}

// SAFETY: `hosts` are addresses into mappings owned by `ram` (kept alive by `Inner`); all
// access through them goes through `GuestSpan`, which tolerates concurrent writers (vCPUs
// write guest memory while the VMM reads it; see ray_memory::span).
unsafe impl Send for Inner {}
// SAFETY: as for Send; shared state is atomic or behind a mutex.
unsafe impl Sync for Inner {}

impl MemoryManager {
    fn wrap(ram: GuestMem, memfd: bool) -> Self {
        let layout = ray_memory::mmap::layout_of(&ram);
        let hosts = ram
            .iter()
            .map(|r| {
                r.get_host_address(vm_memory::MemoryRegionAddress(0))
                    .map_or(0, |p| p as usize)
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                zero: ZeroMap::new(&layout),
                dirty: Mutex::new(DirtyState {
                    fanout: DirtyFanout::new(layout.clone()),
                }),
                prefault: Mutex::new(None),
                fill: Mutex::new(None),
                hosts,
                memfd,
                layout,
                ram,
            }),
        }
    }

    /// Whether `other` is a handle on the same memory.
    pub fn same(&self, other: &MemoryManager) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// A handle that does not keep the memory mapped.
    pub fn downgrade(&self) -> WeakMemory {
        WeakMemory(Arc::downgrade(&self.inner))
    }

    /// Allocates guest RAM for `regions` (guest-physical start, length), backed by one
    /// memfd laid out region after region. Pages are allocated on first touch.
    pub fn create(regions: &[(GuestAddress, usize)]) -> Result<Self, MemoryError> {
        let one: Vec<_> = regions.iter().map(|&(g, l)| (g, l, 0)).collect();
        Self::create_split(&one)
    }

    /// Allocates guest RAM for `regions` (guest-physical start, length, backing): regions
    /// with the same backing number share one memfd, laid out region after region, and
    /// each backing has its own (one per guest NUMA node, so each node's pages can be
    /// placed on its own host node). All are named [`GUEST_RAM_NAME`].
    pub fn create_split(regions: &[(GuestAddress, usize, usize)]) -> Result<Self, MemoryError> {
        let bytes: u64 = regions.iter().map(|r| r.1 as u64).sum();
        let mut files: Vec<(usize, File, u64)> = Vec::new();
        let mut ranges = Vec::with_capacity(regions.len());
        for &(gpa, len, backing) in regions {
            let at = match files.iter().position(|f| f.0 == backing) {
                Some(i) => i,
                None => {
                    files.push((backing, new_memfd(bytes)?, 0));
                    files.len() - 1
                }
            };
            let (_, file, offset) = &mut files[at];
            file.set_len(*offset + len as u64)
                .map_err(|source| MemoryError::Memfd { bytes, source })?;
            let f = file
                .try_clone()
                .map_err(|source| MemoryError::Memfd { bytes, source })?;
            ranges.push((gpa, len, Some(FileOffset::new(f, *offset))));
            *offset += len as u64;
        }
        let ram = GuestMem::from_ranges_with_files(ranges).map_err(|e| MemoryError::Map {
            bytes,
            reason: e.to_string(),
        })?;
        Ok(Self::wrap(ram, true))
    }

    /// Guest RAM (a memfd, as [`create`](Self::create)) filled lazily from `blocks`, each
    /// block checked before anyone can read it: on first touch (the faulting vCPU or VMM
    /// thread waits ~20 µs for its block) or by a background thread at the lowest priority.
    /// `on_damage` is called once if a block fails its check; it is then never placed.
    ///
    /// Everything that enumerates guest memory by the memfd's holes (the zero map, full
    /// snapshots, migration) first waits for the fill ([`wait_filled`](Self::wait_filled)):
    /// a page not placed yet is a hole but not zero. Reads through the mapping need no
    /// care: they fault and wait for their block.
    pub fn fill_lazily(
        regions: &[(GuestAddress, usize, usize)],
        blocks: Box<dyn BlockSource>,
        on_damage: ray_memory::lazy::OnDamage,
    ) -> Result<Self, MemoryError> {
        let mem = Self::create_split(regions)?;
        let ranges = mem
            .inner
            .hosts
            .iter()
            .zip(&mem.inner.layout.regions)
            .map(|(&host, r)| LazyRange {
                host,
                len: r.len as usize,
            })
            .collect();
        let fill = LazyFill::start(ranges, blocks, on_damage).map_err(MemoryError::Lazy)?;
        *mem.inner.fill.lock().unwrap_or_else(|e| e.into_inner()) = Some(fill);
        Ok(mem)
    }

    /// The lazy fill of this memory, while one runs.
    fn lazy_fill(&self) -> Option<Arc<LazyFill>> {
        self.inner
            .fill
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until a lazy fill (if any) has placed and checked all of memory, helping it at
    /// this thread's priority. Returns at once for memory that is not filled lazily.
    pub fn wait_filled(&self) -> Result<(), MemoryError> {
        let Some(fill) = self.lazy_fill() else {
            return Ok(());
        };
        fill.complete().map_err(MemoryError::Damaged)?;
        // Over: the memory is plain memory, and the fill's threads can go.
        self.inner
            .fill
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        Ok(())
    }

    /// Starts the background part of a lazy fill (if any): every block no one touched is
    /// placed and checked at the lowest CPU priority.
    pub fn fill_in_background(&self) -> Result<(), MemoryError> {
        match self.lazy_fill() {
            Some(f) => f.fill_in_background().map_err(MemoryError::Lazy),
            None => Ok(()),
        }
    }

    /// Whether a lazy fill still runs.
    pub fn filling(&self) -> bool {
        self.inner
            .fill
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|f| f.state() == FillState::Filling)
    }

    /// Maps guest RAM privately from a file laid out by guest-physical address (a
    /// snapshot's memory file): pages are read on first touch and copied on first write, so
    /// the cost of restoring does not grow with the guest's size.
    pub fn from_file(
        regions: &[(GuestAddress, usize)],
        path: &std::path::Path,
    ) -> Result<Self, MemoryError> {
        use vm_memory::bitmap::NewBitmap;
        use vm_memory::mmap::{GuestRegionMmap, MmapRegionBuilder};
        let bytes: u64 = regions.iter().map(|r| r.1 as u64).sum();
        let file = File::open(path).map_err(|source| MemoryError::Memfd { bytes, source })?;
        let mut mapped = Vec::with_capacity(regions.len());
        for &(gpa, len) in regions {
            let f = file
                .try_clone()
                .map_err(|source| MemoryError::Memfd { bytes, source })?;
            let region = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
                .with_file_offset(FileOffset::new(f, gpa.0))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| MemoryError::Map {
                    bytes,
                    reason: e.to_string(),
                })?;
            let region = GuestRegionMmap::new(region, gpa).ok_or_else(|| MemoryError::Map {
                bytes,
                reason: format!("region at {:#x} overflows the address space", gpa.0),
            })?;
            mapped.push(region);
        }
        let ram = GuestMem::from_regions(mapped).map_err(|e| MemoryError::Map {
            bytes,
            reason: e.to_string(),
        })?;
        Ok(Self::wrap(ram, false))
    }

    /// The vm-memory map, for the loaders and small typed accesses (vm-memory's `Bytes`;
    /// writes through it are marked in its bitmap and so reach the dirty log).
    pub fn ram(&self) -> &GuestMem {
        &self.inner.ram
    }

    /// Whether guest RAM is shared memfd mappings (another process may map it by fd).
    pub fn is_shared_memfd(&self) -> bool {
        self.inner.memfd
    }

    /// Each region as (guest-physical address, host address, length): what KVM's memory
    /// slots are registered with. Slot `i` is region `i` of the layout.
    pub fn slots(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.inner
            .layout
            .regions
            .iter()
            .zip(&self.inner.hosts)
            .map(|(r, &h)| (r.gpa, h as u64, r.len))
    }

    // ---- zero map -------------------------------------------------------------------

    /// Learns which pages may hold data from the memfd's extents (SEEK_DATA/SEEK_HOLE),
    /// and from here on keeps that up to date from the dirty log and the VMM's writes. Call
    /// with the dirty log on (or the VM paused): pages written later are known through it.
    /// Memory that is not a shared memfd is taken as holding data everywhere.
    pub fn track_zero_pages(&self) {
        let z = &self.inner.zero;
        z.clear();
        for (gpa, len) in self.data_extents() {
            if let Some((r, p)) = self.inner.layout.locate(gpa) {
                z.set_pages(r, p, len.div_ceil(PAGE_SIZE));
            }
        }
        z.enabled.store(true, Ordering::SeqCst);
    }

    /// Fresh memory (a migration target's): every page is zero until written through this
    /// manager.
    pub fn track_fresh(&self) {
        self.inner.zero.clear();
        self.inner.zero.enabled.store(true, Ordering::SeqCst);
    }

    /// Stops treating any page as known zero (the guest runs on memory whose writes no
    /// dirty log reports).
    pub fn untrack_zero_pages(&self) {
        self.inner.zero.enabled.store(false, Ordering::SeqCst);
    }

    /// The parts of guest RAM that may hold data, as (guest-physical address, length), in
    /// address order: the memfd's data extents, so pages the guest never touched are
    /// skipped without being read. A private file mapping is returned whole. Waits for a
    /// lazy fill first (its missing pages are holes that are not zero); if the fill failed,
    /// all of memory is returned.
    pub fn data_extents(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if self.wait_filled().is_err() {
            return self
                .inner
                .ram
                .iter()
                .map(|r| (r.start_addr().0, r.len()))
                .collect();
        }
        for r in self.inner.ram.iter() {
            let (gpa, len) = (r.start_addr().0, r.len());
            let shared_file = r
                .file_offset()
                .filter(|_| self.inner.memfd && r.flags() & libc::MAP_SHARED != 0);
            let Some(fo) = shared_file else {
                out.push((gpa, len));
                continue;
            };
            let fd = fo.file().as_raw_fd();
            let (start, end) = (fo.start(), fo.start() + len);
            let mut at = start;
            while at < end {
                // SAFETY: lseek on a file descriptor we own (through the region's
                // FileOffset) only moves its offset; the mapping does not depend on it.
                let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
                if data < 0 || data as u64 >= end {
                    break;
                }
                // SAFETY: as above.
                let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
                let hole = if hole < 0 {
                    end
                } else {
                    (hole as u64).min(end)
                };
                out.push((gpa + (data as u64 - start), hole - data as u64));
                at = hole;
            }
        }
        out
    }

    fn mark_data(&self, gpa: u64, len: u64) {
        if let Some((r, first)) = self.inner.layout.locate(gpa) {
            let last = (gpa + len.max(1) - 1 - self.inner.layout.regions[r].gpa) / PAGE_SIZE;
            self.inner.zero.set_pages(r, first, last - first + 1);
        }
    }

    // ---- prefault -------------------------------------------------------------------

    /// Target: `p` is allocating all of this memory ahead of the pages.
    pub fn set_prefault(&self, p: Option<Arc<crate::prefault::Prefault>>) {
        *self
            .inner
            .prefault
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = p;
    }

    // ---- dirty log ------------------------------------------------------------------

    fn dirty(&self) -> std::sync::MutexGuard<'_, DirtyState> {
        self.inner.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any consumer needs the dirty log (the VM keeps KVM's logging on while so).
    pub fn dirty_log_wanted(&self) -> bool {
        self.dirty().fanout.is_active()
    }

    /// Names of the dirty log's consumers.
    pub fn dirty_consumers(&self) -> Vec<String> {
        self.dirty()
            .fanout
            .names()
            .into_iter()
            .map(String::from)
            .collect()
    }

    /// Reads KVM's log and the VMM's own writes once and gives them to every consumer.
    fn collect(&self, st: &mut DirtyState, kvm: &dyn KvmDirtyLog) -> Result<(), String> {
        if !st.fanout.is_active() {
            return Ok(());
        }
        let mut words = Vec::with_capacity(self.inner.layout.regions.len());
        for (slot, (region, r)) in self
            .inner
            .ram
            .iter()
            .zip(&self.inner.layout.regions)
            .enumerate()
        {
            let mut w = kvm.read_slot(slot as u32, r.len)?;
            let ours = std::ops::Deref::deref(region).bitmap().get_and_reset();
            w.resize(w.len().max(ours.len()), 0);
            for (a, b) in w.iter_mut().zip(ours) {
                *a |= b;
            }
            words.push(w);
        }
        let fresh = DirtyBitmap::from_words(&self.inner.layout, words);
        crate::metrics::dirty_pages_collected(fresh.count());
        if self.inner.zero.enabled.load(Ordering::Acquire) {
            for (r, bits) in fresh.regions.iter().enumerate() {
                for (first, n) in bits.runs() {
                    self.inner.zero.set_pages(r, first as u64, n as u64);
                }
            }
        }
        st.fanout.distribute(&fresh);
        Ok(())
    }

    /// Adds a dirty-log consumer that sees every page written from now on (plus `owed`,
    /// pages it is owed already). The VM turns KVM's logging on before the first consumer
    /// and calls this right after; the pages logged before are the other consumers'.
    pub fn add_consumer(
        &self,
        name: &str,
        owed: Option<DirtyBitmap>,
        kvm: &dyn KvmDirtyLog,
    ) -> Result<ConsumerId, String> {
        let mut st = self.dirty();
        if st.fanout.is_active() {
            self.collect(&mut st, kvm)?;
        } else {
            // Logging just started: nothing before this moment is anyone's.
            crate::metrics::dirty_log_started();
            for r in self.inner.ram.iter() {
                std::ops::Deref::deref(r).bitmap().reset();
            }
            for (slot, r) in self.inner.layout.regions.iter().enumerate() {
                kvm.read_slot(slot as u32, r.len)?;
            }
        }
        Ok(match owed {
            Some(p) => st.fanout.register_with(name, p),
            None => st.fanout.register(name),
        })
    }

    /// The pages written since consumer `id`'s previous take (or since it was added).
    pub fn take_dirty(&self, id: ConsumerId, kvm: &dyn KvmDirtyLog) -> Result<DirtyBitmap, String> {
        let mut st = self.dirty();
        self.collect(&mut st, kvm)?;
        st.fanout
            .take(id)
            .ok_or_else(|| "no such dirty-log consumer (it was removed)".to_string())
    }

    /// Returns pages a consumer took but could not use: its next take has them again.
    pub fn give_back(&self, id: ConsumerId, pages: &DirtyBitmap) {
        self.dirty().fanout.give_back(id, pages);
    }

    /// Removes a consumer; returns the pages it had not taken. Pages logged so far are
    /// handed to the others first. The VM turns KVM's logging off when none remain.
    pub fn remove_consumer(
        &self,
        id: ConsumerId,
        kvm: &dyn KvmDirtyLog,
    ) -> Result<Option<DirtyBitmap>, String> {
        let mut st = self.dirty();
        self.collect(&mut st, kvm)?;
        Ok(st.fanout.unregister(id))
    }
}

impl GuestMemory for MemoryManager {
    fn layout(&self) -> &MemoryLayout {
        &self.inner.layout
    }

    fn span(&self, gpa: u64, len: u64) -> Result<GuestSpan<'_>, ViewError> {
        let (i, off) = ray_memory::view::locate(&self.inner.layout, gpa, len)?;
        // SAFETY: `off..off + len` lies inside region `i`, mapped at `hosts[i]` for as long
        // as `self.inner.ram` lives, which outlives the borrow of `self`.
        Ok(unsafe {
            GuestSpan::new(
                (self.inner.hosts[i] as *mut u8).add(off as usize),
                len as usize,
            )
        })
    }

    fn known_zero(&self, gpa: u64, len: u64) -> bool {
        let z = &self.inner.zero;
        if !z.enabled.load(Ordering::Acquire) {
            return false;
        }
        let Some((r, first)) = self.inner.layout.locate(gpa) else {
            return false;
        };
        let last = (gpa + len.max(1) - 1 - self.inner.layout.regions[r].gpa) / PAGE_SIZE;
        !z.any_set(r, first, last - first + 1)
    }

    fn note_write(&self, gpa: u64, len: u64) {
        ray_memory::mmap::mark_in(&self.inner.ram, &self.inner.layout, gpa, len);
        if self.inner.zero.enabled.load(Ordering::Acquire) {
            self.mark_data(gpa, len);
        }
    }

    fn prepare_write(&self, gpa: u64, len: u64) {
        let done = self
            .inner
            .prefault
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|p| p.is_complete());
        if done {
            return;
        }
        let Ok(span) = self.span(gpa, len) else {
            return;
        };
        // Allocates the run's pages in one call instead of one fault per page as the socket
        // fills them. Best effort: without it the copy faults them in.
        let start = span.as_ptr() as usize & !(PAGE_SIZE as usize - 1);
        let end = (span.as_ptr() as usize + span.len()).next_multiple_of(PAGE_SIZE as usize);
        // SAFETY: [start, end) lies inside guest memory (the span, widened to whole pages of
        // the same page-aligned mapping), kept alive by `self`.
        let _ = unsafe { crate::prefault::populate_write(start as *mut u8, end - start) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use vm_memory::{Bytes, GuestAddress};

    /// A stand-in for KVM's log: pages "the vCPUs wrote", returned once.
    #[derive(Default)]
    struct FakeKvm {
        written: RefCell<Vec<(u32, usize)>>,
    }
    impl FakeKvm {
        fn guest_writes(&self, slot: u32, page: usize) {
            self.written.borrow_mut().push((slot, page));
        }
    }
    impl KvmDirtyLog for FakeKvm {
        fn read_slot(&self, slot: u32, bytes: u64) -> Result<Vec<u64>, String> {
            let mut w = vec![0u64; (bytes / PAGE_SIZE).div_ceil(64) as usize];
            self.written.borrow_mut().retain(|&(s, p)| {
                if s == slot {
                    w[p / 64] |= 1 << (p % 64);
                }
                s != slot
            });
            Ok(w)
        }
    }

    fn two_regions() -> MemoryManager {
        MemoryManager::create(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 20)])
            .unwrap()
    }

    #[test]
    fn regions_are_backed_and_writable_across_the_hole() {
        let m = two_regions();
        assert_eq!(m.layout().regions.len(), 2);
        m.write((1 << 32) + 8, &0xdead_beef_u64.to_le_bytes())
            .unwrap();
        assert_eq!(m.load::<u64>((1 << 32) + 8).unwrap(), 0xdead_beef);
        assert_eq!(
            m.ram()
                .read_obj::<u64>(GuestAddress((1 << 32) + 8))
                .unwrap(),
            0xdead_beef
        );
        assert!(m.load::<u64>(2 << 20).is_err());
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(maps.contains("/memfd:ray-guest-ram"), "{maps}");
        assert_eq!(m.slots().count(), 2);
    }

    #[test]
    fn zero_map_follows_extents_the_log_and_vmm_writes() {
        let m = two_regions();
        m.write(0x5000, &[1]).unwrap();
        assert!(
            !m.known_zero(0x6000, 4096),
            "no zero map yet: nothing is known"
        );
        m.track_zero_pages();
        assert!(m.known_zero(0x6000, 4096));
        assert!(!m.known_zero(0x5000, 4096), "holds data (a memfd extent)");
        m.write((1 << 32) + 0x3000, &[1]).unwrap();
        assert!(
            !m.known_zero((1 << 32) + 0x3000, 1),
            "the VMM's write is known"
        );
        let kvm = FakeKvm::default();
        let id = m.add_consumer("t", None, &kvm).unwrap();
        kvm.guest_writes(0, 9);
        assert!(m.known_zero(0x9000, 1), "not read from the log yet");
        m.take_dirty(id, &kvm).unwrap();
        assert!(!m.known_zero(0x9000, 1), "the log marked it");
        m.track_fresh();
        assert!(
            m.known_zero(0x5000, 4096),
            "fresh memory: all zero until written"
        );
        m.write_zeros(0x5000, 4096).unwrap();
        assert!(
            m.known_zero(0x5000, 4096),
            "zeros into zero memory change nothing"
        );
    }

    #[test]
    fn consumers_each_get_every_page_written_since_their_own_take() {
        let m = two_regions();
        let kvm = FakeKvm::default();
        let snap = m.add_consumer("snapshot", None, &kvm).unwrap();
        kvm.guest_writes(0, 1);
        let mig = m.add_consumer("migration", None, &kvm).unwrap();
        kvm.guest_writes(1, 2);
        m.write(0x7000, &[1]).unwrap(); // the VMM's own write
        let disp = m.add_consumer("display", None, &kvm).unwrap();
        kvm.guest_writes(0, 3);
        let gpas = |b: DirtyBitmap| b.gpas(m.layout()).collect::<Vec<_>>();
        assert_eq!(
            gpas(m.take_dirty(snap, &kvm).unwrap()),
            vec![0x1000, 0x3000, 0x7000, (1 << 32) + 0x2000]
        );
        assert_eq!(
            gpas(m.take_dirty(mig, &kvm).unwrap()),
            vec![0x3000, 0x7000, (1 << 32) + 0x2000]
        );
        assert_eq!(gpas(m.take_dirty(disp, &kvm).unwrap()), vec![0x3000]);
        kvm.guest_writes(0, 4);
        assert_eq!(gpas(m.take_dirty(mig, &kvm).unwrap()), vec![0x4000]);
        let left = m.remove_consumer(snap, &kvm).unwrap().unwrap();
        assert_eq!(gpas(left), vec![0x4000], "handed over when removed");
        assert!(m.take_dirty(snap, &kvm).is_err());
        assert_eq!(m.dirty_consumers(), vec!["migration", "display"]);
        let taken = m.take_dirty(disp, &kvm).unwrap();
        m.give_back(disp, &taken);
        assert_eq!(gpas(m.take_dirty(disp, &kvm).unwrap()), vec![0x4000]);
        assert!(m.dirty_log_wanted());
    }
}
