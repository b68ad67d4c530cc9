//! KVM's per-vCPU dirty rings: which vCPU wrote which guest page, for NUMA access
//! attribution, and the VM's dirty log while they are on.
//!
//! With `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` each vCPU has a ring of `{flags, slot, offset}`
//! entries, shared with the VMM by `mmap` of the vCPU fd: the first write of a page after
//! its last reset pushes an entry on the ring of the vCPU that wrote it. The VMM reads the
//! rings from plain memory (no exit, no ioctl per page), marks the entries harvested and
//! asks KVM to re-protect the harvested pages (`KVM_RESET_DIRTY_RINGS`, one VM ioctl per
//! harvest). A vCPU whose ring is full exits (`KVM_EXIT_DIRTY_RING_FULL`) and harvests
//! itself before it runs on.
//!
//! KVM cannot keep its dirty bitmap while rings are on (this host lacks
//! `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`), so [`DirtyRings`] also keeps one bitmap per
//! memory slot and serves the memory manager's dirty log ([`KvmDirtyLog`]): snapshots and
//! migration see the same pages they would see from `KVM_GET_DIRTY_LOG`.
//!
//! What the rings see: guest *writes* (the first per page per harvest), by vCPU. What they
//! cannot see: reads, repeated writes to a page between two harvests, and writes by the
//! VMM or by devices (those reach the dirty log through the memory manager's own bitmap).
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::logging::SpawnInSpan;
use crate::memory::KvmDirtyLog;

/// Bytes of each vCPU's ring: 4096 entries, 81 ms of writes at 200 MiB/s per vCPU, well
/// over one harvest period.
pub const RING_BYTES: u32 = 64 << 10;
/// How often the harvester thread empties the rings.
pub const HARVEST_PERIOD: Duration = Duration::from_millis(20);
/// Guest memory is attributed in ranges of this size (the policy's unit: a huge page).
pub const RANGE_BYTES: u64 = 2 << 20;
/// `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xaec7;
const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("this host's KVM has no dirty ring with acquire/release ordering (KVM_CAP_DIRTY_LOG_RING_ACQ_REL); use --numa-attribution off")]
    Unsupported,
    #[error("cannot enable KVM's dirty ring of {bytes} bytes per vCPU: {source}")]
    Enable {
        bytes: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot map the dirty ring of vCPU {index}: {source}")]
    Map { index: u8, source: std::io::Error },
    #[error("cannot keep a handle on the VM for its dirty rings: {0}")]
    Dup(#[source] std::io::Error),
}

/// One vCPU's ring, mapped from its fd.
struct Ring {
    gfns: *mut kvm_dirty_gfn,
    entries: u32,
    /// Index of the next entry to harvest (KVM's and ours only grow; wrap by mask).
    next: u32,
}

// SAFETY: the mapping belongs to this Ring alone (the harvest holds the mutex around
// every access); KVM writes it concurrently, which the acquire/release protocol on
// `flags` orders.
unsafe impl Send for Ring {}

impl Ring {
    /// Takes every entry KVM published, calling `f(slot, page)` for each.
    fn harvest(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        loop {
            let i = (self.next & (self.entries - 1)) as usize;
            // SAFETY: i < entries, the ring's length; the mapping lives as long as self.
            let gfn = unsafe { self.gfns.add(i) };
            // SAFETY: `flags` is the first u32 of the entry, 4-byte aligned in the mapping;
            // KVM and we access it only atomically (KVM with release stores).
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*gfn).flags)) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                return n;
            }
            // SAFETY: KVM filled the entry before publishing DIRTY with release ordering,
            // and does not touch it again until we mark it harvested.
            let (slot, offset) = unsafe { ((*gfn).slot, (*gfn).offset) };
            f(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: gfns/len is exactly the mapping made in `DirtyRings::add_vcpu`.
        unsafe {
            libc::munmap(
                self.gfns.cast(),
                self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>(),
            );
        }
    }
}

/// What the rings saw since attribution was last taken.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attribution {
    /// Pages written, by vCPU index.
    pub per_vcpu: Vec<u64>,
    /// Per [`RANGE_BYTES`] range (by guest-physical start): pages written, by vCPU.
    pub ranges: BTreeMap<u64, Vec<u64>>,
    /// How long the window was.
    pub window: Duration,
}

/// Counters of the harvesting itself (its cost is the attribution's overhead).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HarvestStats {
    pub harvests: u64,
    pub entries: u64,
    /// Time spent harvesting, all threads.
    pub busy: Duration,
}

struct Harvest {
    rings: Vec<Ring>,
    /// Per memory slot: pages written since the dirty log last read the slot.
    bits: Vec<Vec<u64>>,
    per_vcpu: Vec<u64>,
    /// Pages written by each vCPU since the rings were turned on.
    totals: Vec<u64>,
    ranges: BTreeMap<u64, Vec<u64>>,
    since: Instant,
    stats: HarvestStats,
}

/// The dirty rings of one VM.
pub struct DirtyRings {
    /// A duplicate of the VM fd, for `KVM_RESET_DIRTY_RINGS` from any thread.
    vm: File,
    bytes: u32,
    /// Guest-physical start and page count of each memory slot, by slot number.
    slots: Vec<(u64, u64)>,
    inner: Mutex<Harvest>,
}

impl DirtyRings {
    /// Turns the rings on for `vm`, whose memory slots are `slots` (guest-physical start,
    /// bytes). Must come before the first vCPU is created.
    pub fn enable(vm: &VmFd, slots: &[(u64, u64)]) -> Result<Arc<Self>, RingError> {
        let max = vm.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING_ACQ_REL));
        if max <= 0 {
            return Err(RingError::Unsupported);
        }
        let bytes = RING_BYTES.min(max as u32);
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
            ..Default::default()
        };
        cap.args[0] = u64::from(bytes);
        vm.enable_cap(&cap)
            .map_err(|source| RingError::Enable { bytes, source })?;
        // SAFETY: dup of a live fd we borrow; the new fd is owned by the File alone.
        let fd = unsafe { libc::dup(vm.as_raw_fd()) };
        if fd < 0 {
            return Err(RingError::Dup(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by dup and is owned by nothing else.
        let vm = unsafe { File::from_raw_fd(fd) };
        Ok(Arc::new(Self {
            vm,
            bytes,
            slots: slots.iter().map(|&(g, b)| (g, b / PAGE)).collect(),
            inner: Mutex::new(Harvest {
                rings: Vec::new(),
                bits: slots
                    .iter()
                    .map(|&(_, b)| vec![0; (b / PAGE).div_ceil(64) as usize])
                    .collect(),
                per_vcpu: Vec::new(),
                totals: Vec::new(),
                ranges: BTreeMap::new(),
                since: Instant::now(),
                stats: HarvestStats::default(),
            }),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Harvest> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps the ring of vCPU `index` (created in index order, right after `fd`).
    pub fn add_vcpu(&self, index: u8, fd: &VcpuFd) -> Result<(), RingError> {
        let page = 4096i64;
        // SAFETY: mapping KVM's ring of a live vCPU fd at the offset KVM documents; the
        // result is checked and owned by the Ring, which unmaps it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(RingError::Map {
                index,
                source: std::io::Error::last_os_error(),
            });
        }
        let mut h = self.lock();
        h.rings.push(Ring {
            gfns: p.cast(),
            entries: self.bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32,
            next: 0,
        });
        h.per_vcpu.push(0);
        h.totals.push(0);
        Ok(())
    }

    /// Empties every ring into the slot bitmaps and the attribution counts, then has KVM
    /// re-protect the harvested pages. Returns the entries taken.
    pub fn harvest(&self) -> u64 {
        let t = Instant::now();
        let mut guard = self.lock();
        let h = &mut *guard;
        let mut total = 0u64;
        let vcpus = h.rings.len();
        for (v, ring) in h.rings.iter_mut().enumerate() {
            let (bits, ranges, slots) = (&mut h.bits, &mut h.ranges, &self.slots);
            let n = ring.harvest(|slot, page| {
                // Address space 0 only (bits 16+: SMM's), and slots we registered.
                let Some(&(gpa, pages)) = slots.get(slot as usize).filter(|_| slot >> 16 == 0)
                else {
                    return;
                };
                if page >= pages {
                    return;
                }
                bits[slot as usize][(page / 64) as usize] |= 1 << (page % 64);
                let range = (gpa + page * PAGE) & !(RANGE_BYTES - 1);
                ranges.entry(range).or_insert_with(|| vec![0; vcpus])[v] += 1;
            });
            h.per_vcpu[v] += u64::from(n);
            h.totals[v] += u64::from(n);
            total += u64::from(n);
        }
        if total > 0 {
            // SAFETY: an argument-less ioctl on the VM fd we own; KVM re-protects the
            // entries we marked harvested.
            unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS) };
        }
        h.stats.harvests += 1;
        h.stats.entries += total;
        h.stats.busy += t.elapsed();
        total
    }

    /// The attribution since the previous take (harvesting first), starting a new window.
    pub fn take_attribution(&self) -> Attribution {
        self.harvest();
        let mut h = self.lock();
        let window = h.since.elapsed();
        h.since = Instant::now();
        let vcpus = h.per_vcpu.len();
        Attribution {
            per_vcpu: std::mem::replace(&mut h.per_vcpu, vec![0; vcpus]),
            ranges: std::mem::take(&mut h.ranges),
            window,
        }
    }

    /// Pages written by each vCPU since the rings were turned on (as last harvested).
    pub fn totals(&self) -> Vec<u64> {
        self.lock().totals.clone()
    }

    pub fn stats(&self) -> HarvestStats {
        self.lock().stats
    }

    /// Harvests every `period` on a thread of its own until the rings are dropped (with
    /// the VM): vCPUs then rarely fill their rings (and exit).
    pub fn start_harvester(self: &Arc<Self>, period: Duration) -> std::io::Result<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("dirty-ring".into())
            .stack_size(128 << 10)
            .spawn_in_span(move || {
                crate::seccomp::enter(crate::seccomp::Kind::Harvester);
                loop {
                    std::thread::sleep(period);
                    match weak.upgrade() {
                        Some(r) => r.harvest(),
                        None => return,
                    };
                }
            })
            .map(|_| ())
    }
}

impl KvmDirtyLog for DirtyRings {
    /// The slot's pages written since the previous read: the rings' entries (harvested
    /// now) instead of `KVM_GET_DIRTY_LOG`, which KVM refuses while rings are on.
    fn read_slot(&self, slot: u32, bytes: u64) -> Result<Vec<u64>, String> {
        self.harvest();
        let mut h = self.lock();
        let words = h
            .bits
            .get_mut(slot as usize)
            .ok_or_else(|| format!("the dirty rings know no memory slot {slot}"))?;
        let mut out = std::mem::replace(words, vec![0; words.len()]);
        out.resize((bytes / PAGE).div_ceil(64) as usize, 0);
        Ok(out)
    }
}
