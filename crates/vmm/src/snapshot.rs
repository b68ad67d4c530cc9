//! Snapshots of a paused VM in a `ray_snapshot::SnapshotStore`, and restoring them into a
//! new VMM process.
//!
//! A snapshot's path is `<store>/<id>`: its parent directory is the store (shared by the
//! snapshots of a chain), its name the id. The store owns the format (manifest, state
//! file, sparse memory file or page set) and crash safety; this module supplies what only
//! the VMM knows:
//! - guest memory as a `MemorySource` that never reads pages the guest did not touch (the
//!   memfd's holes), so a full snapshot's cost follows used memory, not RAM size;
//! - the machine state (vCPUs, VM, devices) as the state payload;
//! - a compatibility tag (`<flavour>:<CPUID fingerprint>`) restore compares with the host;
//! - restoring: the full snapshot at the root of the chain is mapped privately (restore
//!   cost independent of RAM size), incremental snapshots above it are written over it.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use ray_api::vmm::{BrokenSnapshot, SnapshotEntry, SnapshotList, SnapshotProgress, VmConfig};
use ray_snapshot::{
    CreateOptions, DirtyBitmap, Manifest, MemoryLayout, MemorySource, NewSnapshot, RestorePlan,
    SnapshotStore, StoreError, TreeNode,
};
use vm_memory::GuestAddress;

use crate::machine::MachineState;
use crate::memory::GuestMem;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
}

/// How far the snapshot being written is; read by the API thread while the VMM thread
/// writes.
#[derive(Default)]
pub struct Meter {
    active: AtomicBool,
    done: AtomicU64,
    total: AtomicU64,
    id: Mutex<Option<String>>,
}

impl Meter {
    fn begin(&self, id: &str, total: u64) {
        *self.id.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.to_string());
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.active.store(true, Ordering::Release);
    }

    fn end(&self) {
        self.active.store(false, Ordering::Release);
    }

    pub fn get(&self) -> SnapshotProgress {
        let active = self.active.load(Ordering::Acquire);
        SnapshotProgress {
            active,
            id: if active {
                self.id.lock().unwrap_or_else(|p| p.into_inner()).clone()
            } else {
                None
            },
            done_bytes: self.done.load(Ordering::Relaxed),
            total_bytes: self.total.load(Ordering::Relaxed),
        }
    }
}

/// Guest memory as the store reads it: ranges outside `extents` (memory the guest never
/// touched) read as zeros without touching the mapping, which would allocate them.
struct VmMemory<'a> {
    slices: Vec<(u64, &'a [u8])>,
    /// Sorted, disjoint `(gpa, len)` ranges that may hold data.
    extents: Vec<(u64, u64)>,
    meter: &'a Meter,
}

impl VmMemory<'_> {
    /// The extents overlapping `gpa..gpa + len`, clipped to it.
    fn data_in(&self, gpa: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = gpa + len;
        let first = self.extents.partition_point(|(g, l)| g + l <= gpa);
        self.extents[first..]
            .iter()
            .take_while(move |(g, _)| *g < end)
            .map(move |(g, l)| {
                let s = (*g).max(gpa);
                (s, (g + l).min(end) - s)
            })
    }
}

impl MemorySource for VmMemory<'_> {
    fn layout(&self) -> MemoryLayout {
        MemoryLayout {
            regions: self
                .slices
                .iter()
                .map(|(gpa, s)| ray_snapshot::memory::Region {
                    gpa: *gpa,
                    len: s.len() as u64,
                })
                .collect(),
        }
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let len = buf.len() as u64;
        let (start, slice) = self
            .slices
            .iter()
            .find(|(start, s)| *start <= gpa && gpa + len <= start + s.len() as u64)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{len} bytes at {gpa:#x} are not inside one memory region"),
                )
            })?;
        buf.fill(0);
        for (g, l) in self.data_in(gpa, len) {
            let (src, dst) = ((g - start) as usize, (g - gpa) as usize);
            buf[dst..dst + l as usize].copy_from_slice(&slice[src..src + l as usize]);
        }
        self.meter.done.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Chunks that lie wholly in one data extent are lent from the mapping: no copy.
    fn borrow(&self, gpa: u64, len: u64) -> Option<&[u8]> {
        let mut data = self.data_in(gpa, len);
        match (data.next(), data.next()) {
            (Some((g, l)), None) if g == gpa && l == len => {}
            _ => return None,
        }
        let (start, slice) = self
            .slices
            .iter()
            .find(|(start, s)| *start <= gpa && gpa + len <= start + s.len() as u64)?;
        let from = (gpa - start) as usize;
        self.meter.done.fetch_add(len, Ordering::Relaxed);
        slice.get(from..from + len as usize)
    }

    fn known_zero(&self, gpa: u64, len: u64) -> bool {
        let zero = self.data_in(gpa, len).next().is_none();
        if zero {
            self.meter.done.fetch_add(len, Ordering::Relaxed);
        }
        zero
    }
}

/// Splits a snapshot path into its store and id.
pub fn split_path(path: &Path) -> Result<(PathBuf, String), SnapshotError> {
    let id = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            SnapshotError::Invalid(format!(
                "{} does not name a snapshot directory",
                path.display()
            ))
        })?;
    ray_snapshot::store::check_id(&id)?;
    let store = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((store, id))
}

/// What a new snapshot is.
pub struct NewSnapshotSpec<'a> {
    pub path: &'a Path,
    pub vm_id: &'a str,
    pub config: &'a VmConfig,
    /// `compat_tag` of this host.
    pub compat: String,
    /// The parent's id (in the same store) and the pages written since it was taken.
    pub parent: Option<(&'a str, &'a DirtyBitmap)>,
    pub compress: bool,
    /// Most snapshots of this VM in the store.
    pub max_snapshots: usize,
}

/// Writes a snapshot of a paused machine.
pub fn create(
    spec: &NewSnapshotSpec,
    state: &MachineState,
    mem: &GuestMem,
    meter: &Meter,
) -> Result<Manifest, SnapshotError> {
    let (store_dir, id) = split_path(spec.path)?;
    let store = SnapshotStore::open(&store_dir)?.with_max_per_vm(spec.max_snapshots);
    let payload = serde_json::to_vec(state).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    // SAFETY: the VM is paused while its snapshot is written: nothing writes its memory.
    let slices = unsafe { crate::memory::host_slices(mem) };
    let source = VmMemory {
        slices,
        extents: crate::memory::data_extents(mem),
        meter,
    };
    let meta = NewSnapshot {
        id: id.clone(),
        vm_id: spec.vm_id.to_string(),
        cpu: spec.compat.clone(),
        vm_config: serde_json::to_value(spec.config)
            .map_err(|e| SnapshotError::Invalid(e.to_string()))?,
    };
    let opts = CreateOptions {
        compress: spec.compress,
    };
    let total = match spec.parent {
        Some((_, dirty)) => dirty.count() * ray_snapshot::PAGE_SIZE,
        None => source.layout().total_bytes(),
    };
    meter.begin(&id, total);
    let result = match spec.parent {
        Some((parent, dirty)) => {
            store.create_incremental(parent, &meta, &payload, &source, dirty, &opts)
        }
        None => store.create_full(&meta, &payload, &source, &opts),
    };
    meter.end();
    Ok(result?)
}

/// A snapshot read back, checked, and ready to become a machine.
pub struct Loaded {
    pub plan: RestorePlan,
    pub state: MachineState,
    pub config: VmConfig,
    pub store: PathBuf,
    pub id: String,
}

/// Reads the snapshot at `path` and its chain, checking format versions, the host
/// (`compat`), the state file and the page maps.
pub fn load(path: &Path, compat: &str) -> Result<Loaded, SnapshotError> {
    let (store_dir, id) = split_path(path)?;
    if !store_dir.is_dir() {
        return Err(StoreError::NotFound(path.display().to_string()).into());
    }
    let store = SnapshotStore::open(&store_dir)?;
    let plan = store.restore_plan(&id, compat)?;
    let state: MachineState = serde_json::from_slice(&plan.state).map_err(|e| {
        SnapshotError::Invalid(format!("the state of snapshot {id} cannot be decoded: {e}"))
    })?;
    let config: VmConfig =
        serde_json::from_value(plan.manifest.vm_config.clone()).map_err(|e| {
            SnapshotError::Invalid(format!(
                "the VM configuration in snapshot {id}'s manifest is invalid: {e}"
            ))
        })?;
    let expected: Vec<(u64, u64)> = crate::boot::layout::ram_regions(config.memory_bytes)
        .iter()
        .map(|(g, l)| (g.0, *l as u64))
        .collect();
    let got: Vec<(u64, u64)> = plan.layout.regions.iter().map(|r| (r.gpa, r.len)).collect();
    if expected != got {
        return Err(SnapshotError::Invalid(format!(
            "snapshot {id} lays memory out as {got:x?}, but {} bytes of RAM are laid out as {expected:x?}",
            config.memory_bytes
        )));
    }
    if state.vcpus.len() != usize::from(config.vcpus) {
        return Err(SnapshotError::Invalid(format!(
            "snapshot {id} holds {} vCPUs but its configuration says {}",
            state.vcpus.len(),
            config.vcpus
        )));
    }
    Ok(Loaded {
        plan,
        state,
        config,
        store: store_dir,
        id,
    })
}

/// Guest memory of a loaded snapshot: the full snapshot at the root mapped privately (or,
/// compressed, decompressed into new memory), the incremental ones written over it.
/// `verify` checks the mapped base against its checksums (a read of its data); page sets
/// are always checked as they are read.
pub fn memory(loaded: &Loaded, verify: bool) -> Result<GuestMem, SnapshotError> {
    let regions: Vec<(GuestAddress, usize)> = loaded
        .plan
        .layout
        .regions
        .iter()
        .map(|r| (GuestAddress(r.gpa), r.len as usize))
        .collect();
    let plan = &loaded.plan;
    match plan.mappable_memory() {
        Some(path) => {
            let mem = crate::memory::from_file(&regions, path)?;
            if verify {
                // SAFETY: the VM does not exist yet: nothing writes this memory.
                let slices = unsafe { crate::memory::host_slices(&mem) };
                plan.verify_mapped_base(&slices)?;
            }
            if !plan.overlays.is_empty() {
                // SAFETY: as above, and these are the only slices of `mem` alive.
                let mut slices = unsafe { crate::memory::host_slices_mut(&mem) };
                plan.apply_overlays(&mut slices)?;
            }
            Ok(mem)
        }
        None => {
            let mem = crate::memory::create(&regions)?;
            // SAFETY: as above.
            let mut slices = unsafe { crate::memory::host_slices_mut(&mem) };
            plan.materialize(&mut slices)?;
            Ok(mem)
        }
    }
}

/// `<flavour>:<CPUID fingerprint>`: a snapshot restores only where this is the same.
pub fn compat_tag(flavour: crate::vstate::Flavour, kvm: &kvm_ioctls::Kvm) -> String {
    format!("{}:{}", flavour.name(), cpu_fingerprint(kvm))
}

/// A fingerprint of the CPU features KVM offers here, compared at restore. Only feature
/// leaves count: others (APIC IDs, cache topology) differ from one host CPU to the next.
pub fn cpu_fingerprint(kvm: &kvm_ioctls::Kvm) -> String {
    let Ok(cpuid) = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES) else {
        return "unknown".into();
    };
    let mut h = crc32fast::Hasher::new();
    for e in cpuid.as_slice() {
        let words: &[u32] = match (e.function, e.index) {
            (1, _) => &[e.ecx, e.edx],
            (7, 0) => &[e.ebx, e.ecx, e.edx],
            (0xd, 0 | 1) => &[e.eax],
            (0x8000_0001, _) => &[e.ecx, e.edx],
            _ => continue,
        };
        h.update(&e.function.to_le_bytes());
        for w in words {
            h.update(&w.to_le_bytes());
        }
    }
    format!("{:08x}", h.finalize())
}

fn kind_name(kind: ray_snapshot::Kind) -> &'static str {
    match kind {
        ray_snapshot::Kind::Full => "full",
        ray_snapshot::Kind::Incremental => "incremental",
    }
}

fn state_name(state: ray_snapshot::SnapshotState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{state:?}"))
}

/// The API's entry for a snapshot `depth` links below the root of its chain.
pub fn entry(n: &TreeNode, depth: u32) -> SnapshotEntry {
    SnapshotEntry {
        id: n.id.clone(),
        parent: n.parent.clone(),
        depth,
        vm_id: n.vm_id.clone(),
        kind: kind_name(n.kind).into(),
        state: state_name(n.state),
        created_ms: n.created_ms,
        memory_bytes: n.memory_bytes,
        stored_pages: n.dirty_pages,
        disk_bytes: n.disk_bytes,
    }
}

/// Every snapshot in the store at `dir`, parents before children.
pub fn list(dir: &Path) -> Result<SnapshotList, SnapshotError> {
    if !dir.is_dir() {
        return Err(SnapshotError::Invalid(format!(
            "{} is not a snapshot store (no such directory)",
            dir.display()
        )));
    }
    let tree = SnapshotStore::open(dir)?.list()?;
    fn walk(n: &TreeNode, depth: u32, out: &mut Vec<SnapshotEntry>) {
        out.push(entry(n, depth));
        for c in &n.children {
            walk(c, depth + 1, out);
        }
    }
    let mut snapshots = Vec::new();
    for r in &tree.roots {
        walk(r, 0, &mut snapshots);
    }
    Ok(SnapshotList {
        store: dir.display().to_string(),
        snapshots,
        broken: tree
            .broken
            .into_iter()
            .map(|b| BrokenSnapshot {
                id: b.id,
                error: b.error,
            })
            .collect(),
    })
}

/// Deletes the snapshot at `path`; refused while others depend on it.
pub fn delete(path: &Path) -> Result<(), SnapshotError> {
    let (store, id) = split_path(path)?;
    Ok(SnapshotStore::open(store)?.delete(&id)?)
}

/// Flattens the chain of the snapshot at `path` into a new full snapshot `into` beside it.
pub fn merge(path: &Path, into: &str, compress: bool) -> Result<SnapshotEntry, SnapshotError> {
    let (store, id) = split_path(path)?;
    let m = SnapshotStore::open(store)?.merge(&id, into, &CreateOptions { compress })?;
    Ok(entry(&TreeNode::of(&m), 0))
}

/// The manifest of the snapshot at `path`.
pub fn manifest(path: &Path) -> Result<Manifest, SnapshotError> {
    let (store, id) = split_path(path)?;
    if !store.is_dir() {
        return Err(StoreError::NotFound(path.display().to_string()).into());
    }
    Ok(SnapshotStore::open(store)?.get(&id)?)
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn untouched_memory_reads_as_zero_without_being_touched() {
        let regions = [
            (GuestAddress(0), 8 << 20),
            (GuestAddress(16 << 20), 4 << 20),
        ];
        let mem = crate::memory::create(&regions).unwrap();
        mem.write_obj(0x1111_u64, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0x2222_u64, GuestAddress((16 << 20) + 0x5008))
            .unwrap();
        let meter = Meter::default();
        // SAFETY: nothing else uses the memory.
        let slices = unsafe { crate::memory::host_slices(&mem) };
        let src = VmMemory {
            slices,
            extents: crate::memory::data_extents(&mem),
            meter: &meter,
        };
        assert!(src.known_zero(4 << 20, 4 << 20));
        assert!(!src.known_zero(0, 4 << 20));
        let mut buf = vec![0xffu8; 8192];
        src.read(0x2000, &mut buf).unwrap();
        assert_eq!(
            u64::from_le_bytes(buf[4096..4104].try_into().unwrap()),
            0x1111
        );
        assert!(buf[..4096].iter().all(|b| *b == 0));
        src.read((16 << 20) + 0x5000, &mut buf[..4096]).unwrap();
        assert_eq!(u64::from_le_bytes(buf[8..16].try_into().unwrap()), 0x2222);
        assert!(
            src.read((8 << 20) - 4096, &mut buf).is_err(),
            "crosses a region"
        );
        // Only ranges wholly inside data are lent without a copy.
        let page = src.borrow(0x3000, 4096).expect("a touched page is lent");
        assert_eq!(u64::from_le_bytes(page[..8].try_into().unwrap()), 0x1111);
        assert!(
            src.borrow(0x2000, 8192).is_none(),
            "part hole: read, not lent"
        );
        assert!(src.borrow(4 << 20, 4096).is_none(), "hole: never lent");
        // Reading never allocated the untouched pages.
        let extents = crate::memory::data_extents(&mem);
        let allocated: u64 = extents.iter().map(|e| e.1).sum();
        assert!(allocated <= 64 << 10, "{extents:x?}");
    }

    #[test]
    fn snapshot_paths_split_into_store_and_id() {
        let (store, id) = split_path(Path::new("/var/snaps/web-1")).unwrap();
        assert_eq!(
            (store.as_path(), id.as_str()),
            (Path::new("/var/snaps"), "web-1")
        );
        assert!(split_path(Path::new("/var/snaps/.hidden")).is_err());
        assert!(split_path(Path::new("/")).is_err());
    }
}
