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
use std::sync::{Arc, Mutex};

use ray_api::vmm::{
    BrokenSnapshot, SnapshotEntry, SnapshotKindName, SnapshotList, SnapshotProgress,
    SnapshotStateName, VmConfig,
};
use ray_memory::{DirtyBitmap, GuestMemory};
use ray_snapshot::{
    CreateOptions, Manifest, NewSnapshot, RestorePlan, SnapshotStore, StoreError, TreeNode,
};
use vm_memory::GuestAddress;

use crate::machine::MachineState;
use crate::memory::MemoryManager;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The snapshot is in use and may not go (a suspended VM's image).
    #[error("{0}")]
    InUse(String),
}

/// The directory in a VM's directory where a suspended VM keeps its memory and state
/// (a snapshot with this id, in the VM's directory as its store).
pub const SUSPEND_DIR: &str = "suspended";

/// Why the snapshot `id` in `store` may not be deleted because a VM depends on it: the
/// suspend image of a VM that has not ended (suspended, or its VMM died meanwhile) is
/// the only copy of that VM.
fn in_use(store: &Path, id: &str) -> Option<String> {
    let vm_dir = store.join(crate::vmlock::LOCK_FILE).exists() || store.join("vmm.pid").exists();
    if id != SUSPEND_DIR || !vm_dir || store.join("exit.json").exists() {
        return None;
    }
    let vm = store.file_name().map_or_else(
        || store.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Some(format!(
        "cannot delete snapshot {}: it is the suspend image of VM '{vm}', the only copy of that VM while it is suspended; resume it (ray vm resume {vm}) or stop it (ray vm stop {vm}) instead",
        store.join(id).display()
    ))
}

/// How far the snapshot being written is; read by the API thread while the VMM thread
/// writes.
#[derive(Default)]
pub struct Meter {
    active: AtomicBool,
    done: Arc<AtomicU64>,
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

/// Writes a snapshot of a paused machine: its state (`MachineState` as JSON) and memory.
pub fn create(
    spec: &NewSnapshotSpec,
    payload: &[u8],
    mem: &MemoryManager,
    meter: &Meter,
) -> Result<Manifest, SnapshotError> {
    let (store_dir, id) = split_path(spec.path)?;
    let store = SnapshotStore::open(&store_dir)?
        .with_max_per_vm(spec.max_snapshots)
        .with_progress(meter.done.clone());
    // The memory of a lazily verified restore is all placed and checked first: a block
    // not placed yet is a hole of the memfd, but not zero.
    mem.wait_filled()?;
    // The VM is paused: the memfd's holes are memory the guest never touched, which the
    // store skips without reading (and so without allocating it).
    mem.track_zero_pages();
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
        None => mem.layout().total_bytes(),
    };
    meter.begin(&id, total);
    let result = match spec.parent {
        Some((parent, dirty)) => {
            store.create_incremental(parent, &meta, payload, mem, dirty, &opts)
        }
        None => store.create_full(&meta, payload, mem, &opts),
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
/// (`compat`, see [`compat_tag`]), the state file and the page maps.
pub fn load(path: &Path, compat: &str) -> Result<Loaded, SnapshotError> {
    let (store_dir, id) = split_path(path)?;
    if !store_dir.is_dir() {
        return Err(StoreError::NotFound(path.display().to_string()).into());
    }
    let store = SnapshotStore::for_reading(&store_dir);
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
    let expected: Vec<(u64, u64)> = crate::numa::config_regions(&config)
        .iter()
        .map(|(g, l, _)| (g.0, *l as u64))
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

/// How a restore checks guest memory against the snapshot's checksums.
pub enum Verify {
    /// Not at all (`--no-verify-memory`): the base is mapped privately, read on demand.
    No,
    /// All of the mapped base before the guest runs (one read of its data).
    Eager,
    /// Lazily: every 64 KiB block is checked before anyone can read it, on first touch or
    /// by a background fill (see [`MemoryManager::fill_lazily`]); a block that fails its
    /// check is never placed and the callback is told. Falls back to `Eager` where the
    /// snapshot has no block checksums (written before they existed) or userfaultfd is
    /// not available.
    Lazy(ray_memory::lazy::OnDamage),
}

/// Guest memory of a loaded snapshot: the full snapshot at the root mapped privately (or
/// filled lazily, or, compressed, decompressed into new memory), the incremental ones
/// written over it. `verify` says how the base is checked; page sets are always checked as
/// they are read.
///
/// Why lazy verification is safe: guest memory starts with no page present and registered
/// with userfaultfd, so no one (vCPU through KVM, VMM thread, system call) can read a page
/// before its block has been read from the file, checked against its CRC32 and copied in;
/// a failing block is never copied. A background fill checks every other block, so the
/// whole image is checked, and whatever enumerates memory by its holes (snapshots,
/// migration) waits for that first.
pub fn memory(loaded: &Loaded, verify: Verify) -> Result<MemoryManager, SnapshotError> {
    // The layout was checked against the configuration's in `load`; each guest NUMA node
    // gets its own memfd again.
    let split = crate::numa::config_regions(&loaded.config);
    let regions: Vec<(GuestAddress, usize)> = split.iter().map(|r| (r.0, r.1)).collect();
    let plan = &loaded.plan;
    let Some(path) = plan.mappable_memory() else {
        let mem = MemoryManager::create_split(&split)?;
        plan.materialize(&mem)?;
        return Ok(mem);
    };
    let eager = match verify {
        Verify::No => false,
        Verify::Eager => true,
        Verify::Lazy(on_damage) => match plan.base_blocks()? {
            Some(blocks) => match MemoryManager::fill_lazily(&split, Box::new(blocks), on_damage) {
                Ok(mem) => {
                    if !plan.overlays.is_empty() {
                        plan.apply_overlays(&mem)?;
                    }
                    return Ok(mem);
                }
                Err(crate::memory::MemoryError::Lazy(e)) => {
                    tracing::warn!(
                            "cannot verify guest memory lazily ({e}: userfaultfd needs CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1 or /dev/userfaultfd); verifying all of it first"
                        );
                    true
                }
                Err(e) => return Err(e.into()),
            },
            None => true,
        },
    };
    let mem = MemoryManager::from_file(&regions, path)?;
    if eager {
        plan.verify_mapped_base(&mem)?;
    }
    if !plan.overlays.is_empty() {
        plan.apply_overlays(&mem)?;
    }
    Ok(mem)
}

/// `<flavour>:<CPUID fingerprint>`: a snapshot restores only where this is the same.
pub fn compat_tag(flavour: crate::vstate::Flavour, cpu_fingerprint: &str) -> String {
    format!("{}:{cpu_fingerprint}", flavour.name())
}

/// A fingerprint of the CPU features KVM offers here, compared at restore. Only feature
/// leaves count: others (APIC IDs, cache topology) differ from one host CPU to the next.
/// Read from KVM once per process: what KVM supports does not change while it runs.
pub fn cpu_fingerprint(kvm: &kvm_ioctls::Kvm) -> String {
    static KNOWN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(f) = KNOWN.get() {
        return f.clone();
    }
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
    KNOWN
        .get_or_init(|| format!("{:08x}", h.finalize()))
        .clone()
}

/// A snapshot's kind as the API names it.
pub fn api_kind(kind: ray_snapshot::Kind) -> SnapshotKindName {
    match kind {
        ray_snapshot::Kind::Full => SnapshotKindName::Full,
        ray_snapshot::Kind::Incremental => SnapshotKindName::Incremental,
    }
}

fn api_state(state: ray_snapshot::SnapshotState) -> SnapshotStateName {
    use ray_snapshot::SnapshotState as S;
    match state {
        S::Idle => SnapshotStateName::Idle,
        S::Creating => SnapshotStateName::Creating,
        S::Verifying => SnapshotStateName::Verifying,
        S::Ready => SnapshotStateName::Ready,
        S::Restoring => SnapshotStateName::Restoring,
        S::RestoreVerify => SnapshotStateName::RestoreVerify,
        S::RestoreComplete => SnapshotStateName::RestoreComplete,
        S::Archived => SnapshotStateName::Archived,
        S::Error => SnapshotStateName::Error,
    }
}

/// The API's entry for a snapshot `depth` links below the root of its chain.
pub fn entry(n: &TreeNode, depth: u32) -> SnapshotEntry {
    SnapshotEntry {
        id: n.id.clone(),
        parent: n.parent.clone(),
        depth,
        vm_id: n.vm_id.clone(),
        kind: api_kind(n.kind),
        state: api_state(n.state),
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
    let tree = SnapshotStore::for_reading(dir).list()?;
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
    if let Some(why) = in_use(&store, &id) {
        return Err(SnapshotError::InUse(why));
    }
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
    Ok(SnapshotStore::for_reading(store).get(&id)?)
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn untouched_memory_is_known_zero_and_a_full_snapshot_never_touches_it() {
        let regions = [
            (GuestAddress(0), 8 << 20),
            (GuestAddress(16 << 20), 4 << 20),
        ];
        let mem = MemoryManager::create(&regions).unwrap();
        mem.ram()
            .write_obj(0x1111_u64, GuestAddress(0x3000))
            .unwrap();
        mem.ram()
            .write_obj(0x2222_u64, GuestAddress((16 << 20) + 0x5008))
            .unwrap();
        mem.track_zero_pages();
        assert!(mem.known_zero(4 << 20, 4 << 20));
        assert!(!mem.known_zero(0, 4 << 20));
        assert!(!mem.known_zero((16 << 20) + 0x5000, 4096));
        let dir = std::env::temp_dir().join(format!("ray-vmm-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = VmConfig {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            memory_bytes: 12 << 20,
            devices: Default::default(),
            numa: Vec::new(),
            numa_attribution: Default::default(),
            numa_migration: Default::default(),
        };
        let spec = NewSnapshotSpec {
            path: &dir.join("s1"),
            vm_id: "t",
            config: &config,
            compat: "test".into(),
            parent: None,
            compress: false,
            max_snapshots: 4,
        };
        let meter = Meter::default();
        let manifest = create(&spec, b"{}", &mem, &meter).unwrap();
        assert_eq!(manifest.memory_bytes, 12 << 20);
        assert_eq!(
            meter.get().done_bytes,
            12 << 20,
            "progress covers all of memory"
        );
        // Writing the snapshot never allocated the untouched pages.
        let allocated: u64 = mem.data_extents().iter().map(|e| e.1).sum();
        assert!(allocated <= 64 << 10, "{:x?}", mem.data_extents());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_suspended_vms_image_is_not_deleted() {
        let vm = std::env::temp_dir().join(format!("ray-vmm-susp-{}/vms/web", std::process::id()));
        let _ = std::fs::remove_dir_all(&vm);
        std::fs::create_dir_all(vm.join(SUSPEND_DIR)).unwrap();
        std::fs::write(vm.join("vmm.pid"), "1").unwrap();
        let e = delete(&vm.join(SUSPEND_DIR)).unwrap_err();
        assert!(matches!(e, SnapshotError::InUse(_)), "{e}");
        assert!(e.to_string().contains("suspend image of VM 'web'"), "{e}");
        assert!(vm.join(SUSPEND_DIR).is_dir(), "nothing was deleted");
        // Once the VM has ended, what it left behind may go.
        std::fs::write(vm.join("exit.json"), "{}").unwrap();
        assert!(in_use(&vm, SUSPEND_DIR).is_none());
        // Elsewhere, a snapshot may be called that.
        assert!(in_use(&std::env::temp_dir(), SUSPEND_DIR).is_none());
        let _ = std::fs::remove_dir_all(vm.parent().unwrap().parent().unwrap());
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
