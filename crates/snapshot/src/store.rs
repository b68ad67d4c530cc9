//! The snapshot store: a directory with one directory per snapshot.
//!
//! ```text
//! <store>/<id>/manifest.json   a ready snapshot (see `manifest`)
//! <store>/.tmp-<id>/           a snapshot being written (never listed)
//! <store>/.del-<id>/           a snapshot being deleted (never listed)
//! ```
//!
//! Creating writes every file into `.tmp-<id>`, fsyncs them and the directory, renames it
//! to `<id>` and fsyncs the store. A crash at any point leaves either no snapshot or a
//! complete one, and never touches older snapshots: files are only ever created, never
//! modified in place (the manifest's state is changed by atomic replacement).
//!
//! One writer at a time: the store does not serialize concurrent creates or deletes of
//! the same chain. Readers (list, restore) may run alongside a writer.
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ray_memory::{DirtyBitmap, GuestMemory};
use serde::Serialize;

use crate::container::StateFile;
use crate::error::{io_err, FileError, StoreError};
use crate::fsutil::{allocated_bytes, replace_file, sync_dir, try_lock};
use crate::manifest::{
    Compression, FileInfo, Kind, Manifest, BLOCK_SUMS_FILE, FORMAT_VERSION, MANIFEST_FILE,
    MEMORY_FILE, PAGEMAP_FILE, PAGES_FILE, PAGES_ZST_FILE, STATE_FILE,
};
use crate::state_machine::{Event, SnapshotState};
use crate::{pages, sparse};

const TMP_PREFIX: &str = ".tmp-";
const DEL_PREFIX: &str = ".del-";

/// What the VMM says about a new snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSnapshot {
    pub id: String,
    pub vm_id: String,
    /// CPU compatibility fingerprint (e.g. a hash of the CPUID KVM supports).
    pub cpu: String,
    pub vm_config: serde_json::Value,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// zstd-compress memory. A compressed full snapshot cannot be mapped on restore: its
    /// memory is decompressed into the VMM's memory instead.
    pub compress: bool,
}

/// One snapshot in `list`'s tree.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TreeNode {
    pub id: String,
    pub parent: Option<String>,
    pub vm_id: String,
    pub kind: Kind,
    pub state: SnapshotState,
    pub created_ms: u64,
    pub memory_bytes: u64,
    pub dirty_pages: u64,
    /// Bytes its files occupy on disk (`Manifest::stored_bytes`).
    pub disk_bytes: u64,
    pub children: Vec<TreeNode>,
}

impl TreeNode {
    /// The node of one snapshot, without children.
    pub fn of(m: &Manifest) -> TreeNode {
        TreeNode {
            id: m.id.clone(),
            parent: m.parent.clone(),
            vm_id: m.vm_id.clone(),
            kind: m.kind,
            state: m.state,
            created_ms: m.created_ms,
            memory_bytes: m.memory_bytes,
            dirty_pages: m.dirty_pages,
            disk_bytes: m.stored_bytes(),
            children: Vec::new(),
        }
    }
}

/// A directory in the store that is not a readable snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Broken {
    pub id: String,
    pub error: String,
}

/// Every snapshot in the store, as trees of parents and children.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnapshotTree {
    /// Full snapshots (and incremental ones whose parent is unreadable), oldest first.
    pub roots: Vec<TreeNode>,
    pub broken: Vec<Broken>,
}

impl std::fmt::Display for SnapshotTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn node(f: &mut std::fmt::Formatter<'_>, n: &TreeNode, depth: usize) -> std::fmt::Result {
            writeln!(
                f,
                "{:indent$}{} {:?} {:?} vm={} dirty_pages={} disk={}B",
                "",
                n.id,
                n.kind,
                n.state,
                n.vm_id,
                n.dirty_pages,
                n.disk_bytes,
                indent = depth * 2
            )?;
            n.children.iter().try_for_each(|c| node(f, c, depth + 1))
        }
        self.roots.iter().try_for_each(|n| node(f, n, 0))?;
        self.broken
            .iter()
            .try_for_each(|b| writeln!(f, "{} BROKEN: {}", b.id, b.error))
    }
}

pub struct SnapshotStore {
    root: PathBuf,
    max_per_vm: usize,
    progress: Option<Arc<AtomicU64>>,
}

/// Ids become directory names: keep them to a safe alphabet.
pub fn check_id(id: &str) -> Result<(), StoreError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidId(id.to_string()))
    }
}

/// Why `m`'s chain of parents does not reach a full snapshot (`by_id`: the readable
/// snapshots; `unreadable`: directories whose manifest cannot be read).
fn chain_problem(
    m: &Manifest,
    by_id: &BTreeMap<&str, &Manifest>,
    unreadable: &HashSet<String>,
) -> String {
    let mut cur = m;
    let mut visited = HashSet::new();
    loop {
        visited.insert(cur.id.as_str());
        let Some(p) = cur.parent.as_deref() else {
            // Unreachable for a snapshot `list` did not place: its root would have been.
            return "it is not in any chain".into();
        };
        let whose = if cur.id == m.id {
            "its parent".to_string()
        } else {
            format!("its ancestor (the parent of {})", cur.id)
        };
        match by_id.get(p) {
            _ if visited.contains(p) => {
                return "its chain of parents loops back to itself; it cannot be restored".into()
            }
            Some(next) => cur = next,
            None if unreadable.contains(p) => {
                return format!("{whose} {p} is unreadable; it cannot be restored")
            }
            None => {
                return format!(
                    "{whose} {p} is missing; it cannot be restored (delete it, or bring {p} back)"
                )
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl SnapshotStore {
    pub const DEFAULT_MAX_PER_VM: usize = 256;

    /// Opens (creating if needed) the store at `root`, removing what crashed writers and
    /// deleters left behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<SnapshotStore, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io_err("create", &root))?;
        let store = SnapshotStore {
            root,
            max_per_vm: Self::DEFAULT_MAX_PER_VM,
            progress: None,
        };
        store.clean_up()?;
        Ok(store)
    }

    /// The store at `root` for reading only (listing, manifests, restore): nothing is
    /// created and nothing cleaned up, so a read has no side effect on the directory it
    /// names, and a restore does not scan the store for leftovers first.
    pub fn for_reading(root: impl Into<PathBuf>) -> SnapshotStore {
        SnapshotStore {
            root: root.into(),
            max_per_vm: Self::DEFAULT_MAX_PER_VM,
            progress: None,
        }
    }

    /// Sets the most checkpoints one VM may have.
    pub fn with_max_per_vm(mut self, max: usize) -> Self {
        self.max_per_vm = max;
        self
    }

    /// Counts progress of the snapshots this store writes: each adds to `done` the bytes
    /// of guest memory it has covered (all of memory for a full snapshot, the dirty pages
    /// for an incremental one), memory known to be zero included.
    pub fn with_progress(mut self, done: Arc<AtomicU64>) -> Self {
        self.progress = Some(done);
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of snapshot `id`.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Removes abandoned `.tmp-*` directories (those no live writer holds locked) and
    /// `.del-*` ones.
    fn clean_up(&self) -> Result<(), StoreError> {
        let entries = std::fs::read_dir(&self.root).map_err(io_err("list", &self.root))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if name.starts_with(TMP_PREFIX) {
                let abandoned = File::open(&path)
                    .and_then(|f| try_lock(&f))
                    .unwrap_or(false);
                if abandoned {
                    let _ = std::fs::remove_dir_all(&path);
                }
            } else if name.starts_with(DEL_PREFIX) {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
        Ok(())
    }

    /// The manifest of snapshot `id`.
    pub fn get(&self, id: &str) -> Result<Manifest, StoreError> {
        check_id(id)?;
        let dir = self.dir(id);
        if !dir.join(MANIFEST_FILE).exists() {
            return Err(StoreError::NotFound(id.to_string()));
        }
        let m = Manifest::read(&dir)?;
        if m.id != id {
            return Err(FileError::Invalid {
                path: dir.join(MANIFEST_FILE),
                reason: format!(
                    "it describes snapshot {}, not {id} (a snapshot's id is its directory name)",
                    m.id
                ),
            }
            .into());
        }
        Ok(m)
    }

    /// Every readable manifest, and the directories that are not readable snapshots.
    fn scan(&self) -> Result<(Vec<Manifest>, Vec<Broken>), StoreError> {
        let entries = std::fs::read_dir(&self.root).map_err(io_err("list", &self.root))?;
        let mut ok = Vec::new();
        let mut broken = Vec::new();
        for e in entries {
            let e = e.map_err(io_err("list", &self.root))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !e.path().is_dir() {
                continue;
            }
            match Manifest::read(&e.path()) {
                Ok(m) if m.id == name => ok.push(m),
                Ok(m) => broken.push(Broken {
                    error: format!("its manifest says it is snapshot {}", m.id),
                    id: name,
                }),
                Err(err) => broken.push(Broken {
                    id: name,
                    error: err.to_string(),
                }),
            }
        }
        ok.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        broken.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((ok, broken))
    }

    /// All snapshots as trees. An incremental snapshot whose chain does not reach a full
    /// snapshot (a parent deleted or unreadable, parents in a loop) cannot be restored: it
    /// is listed as broken, naming the snapshot that is missing, never as a tree.
    pub fn list(&self) -> Result<SnapshotTree, StoreError> {
        let (manifests, mut broken) = self.scan()?;
        let unreadable: HashSet<String> = broken.iter().map(|b| b.id.clone()).collect();
        let by_id: BTreeMap<&str, &Manifest> =
            manifests.iter().map(|m| (m.id.as_str(), m)).collect();
        let mut children: BTreeMap<&str, Vec<&Manifest>> = BTreeMap::new();
        let mut roots = Vec::new();
        for m in &manifests {
            match m.parent.as_deref() {
                Some(p) => children.entry(p).or_default().push(m),
                None => roots.push(m),
            }
        }
        let mut seen = HashSet::new();
        fn build<'a>(
            m: &'a Manifest,
            children: &BTreeMap<&str, Vec<&'a Manifest>>,
            seen: &mut HashSet<&'a str>,
        ) -> TreeNode {
            seen.insert(m.id.as_str());
            let kids = children
                .get(m.id.as_str())
                .map_or(&[][..], |v| v.as_slice());
            let mut nodes = Vec::new();
            for k in kids {
                if !seen.contains(k.id.as_str()) {
                    nodes.push(build(k, children, seen));
                }
            }
            TreeNode {
                children: nodes,
                ..TreeNode::of(m)
            }
        }
        let roots: Vec<TreeNode> = roots
            .into_iter()
            .map(|m| build(m, &children, &mut seen))
            .collect();
        for m in &manifests {
            if !seen.contains(m.id.as_str()) {
                broken.push(Broken {
                    id: m.id.clone(),
                    error: chain_problem(m, &by_id, &unreadable),
                });
            }
        }
        broken.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(SnapshotTree { roots, broken })
    }

    /// Writes a full snapshot: VM state plus all of memory. The VM must be paused: memory is
    /// read in place, and a chunk's checksum and its data are read separately. Memory the
    /// view knows to be zero (`GuestMemory::known_zero`) is not read.
    pub fn create_full(
        &self,
        meta: &NewSnapshot,
        state: &[u8],
        memory: &dyn GuestMemory,
        opts: &CreateOptions,
    ) -> Result<Manifest, StoreError> {
        self.create(meta, None, state, memory, None, opts)
    }

    /// Writes an incremental snapshot on top of `parent`: VM state plus the pages `dirty`
    /// marks (KVM's dirty log since `parent` was taken, ORed with the VMM's own writes).
    /// `dirty` has one bitmap per region of `memory`'s layout. The VM must be paused.
    pub fn create_incremental(
        &self,
        parent: &str,
        meta: &NewSnapshot,
        state: &[u8],
        memory: &dyn GuestMemory,
        dirty: &DirtyBitmap,
        opts: &CreateOptions,
    ) -> Result<Manifest, StoreError> {
        self.create(meta, Some(parent), state, memory, Some(dirty), opts)
    }

    fn create(
        &self,
        meta: &NewSnapshot,
        parent: Option<&str>,
        state: &[u8],
        memory: &dyn GuestMemory,
        dirty: Option<&DirtyBitmap>,
        opts: &CreateOptions,
    ) -> Result<Manifest, StoreError> {
        check_id(&meta.id)?;
        let layout = memory.layout();
        layout
            .check()
            .map_err(|e| StoreError::MemoryMismatch(e.to_string()))?;
        let final_dir = self.dir(&meta.id);
        if final_dir.exists() {
            return Err(StoreError::AlreadyExists(meta.id.clone()));
        }
        let (existing, _) = self.scan()?;
        let count = existing.iter().filter(|m| m.vm_id == meta.vm_id).count();
        if count >= self.max_per_vm {
            return Err(StoreError::LimitReached {
                vm_id: meta.vm_id.clone(),
                count,
                limit: self.max_per_vm,
            });
        }
        if let (Some(parent), Some(dirty)) = (parent, dirty) {
            let p = existing
                .iter()
                .find(|m| m.id == parent)
                .ok_or_else(|| StoreError::NotFound(parent.to_string()))?;
            if !matches!(p.state, SnapshotState::Ready | SnapshotState::Archived) {
                return Err(StoreError::WrongState {
                    id: parent.to_string(),
                    state: p.state,
                    action: "an incremental snapshot on top of it",
                    needs: "ready or archived",
                });
            }
            if p.layout != *layout {
                return Err(StoreError::MemoryMismatch(format!(
                    "guest memory is laid out as {:?}, parent {parent} as {:?}",
                    layout.regions, p.layout.regions
                )));
            }
            dirty.check(layout).map_err(StoreError::MemoryMismatch)?;
        }

        let mut sm = SnapshotState::Idle.apply(Event::Create)?;
        let tmp = self.root.join(format!("{TMP_PREFIX}{}", meta.id));
        std::fs::create_dir(&tmp).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => StoreError::AlreadyExists(meta.id.clone()),
            _ => io_err("create", &tmp)(e).into(),
        })?;
        // Held until this function returns, so `open` elsewhere leaves the directory alone.
        let lock = File::open(&tmp).map_err(io_err("open", &tmp))?;
        if !try_lock(&lock).map_err(io_err("lock", &tmp))? {
            return Err(StoreError::AlreadyExists(meta.id.clone()));
        }
        let result = self.write_files(&tmp, meta, parent, state, memory, dirty, opts, &mut sm);
        let manifest = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = sm.apply(Event::Fail);
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let publish = || -> Result<(), FileError> {
            sync_dir(&tmp)?;
            std::fs::rename(&tmp, &final_dir).map_err(io_err("rename into place", &final_dir))?;
            sync_dir(&self.root)
        };
        if let Err(e) = publish() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.into());
        }
        drop(lock);
        Ok(manifest)
    }

    /// Writes state, memory and manifest into `tmp` and checks what was written.
    #[allow(clippy::too_many_arguments)]
    fn write_files(
        &self,
        tmp: &Path,
        meta: &NewSnapshot,
        parent: Option<&str>,
        state: &[u8],
        memory: &dyn GuestMemory,
        dirty: Option<&DirtyBitmap>,
        opts: &CreateOptions,
        sm: &mut SnapshotState,
    ) -> Result<Manifest, StoreError> {
        let layout = memory.layout();
        let mut files = BTreeMap::new();
        let state_path = tmp.join(STATE_FILE);
        let (state_bytes, state_crc) = StateFile::write(&state_path, state)?;
        files.insert(
            STATE_FILE.to_string(),
            FileInfo {
                bytes: state_bytes,
                allocated_bytes: allocated_bytes(&state_path)?,
                crc32: Some(state_crc),
            },
        );
        let mut memory_chunks = None;
        let stored_pages;
        if parent.is_none() && !opts.compress {
            let path = tmp.join(MEMORY_FILE);
            let written = sparse::write(&path, memory, self.progress.as_deref())?;
            files.insert(
                MEMORY_FILE.to_string(),
                FileInfo {
                    bytes: layout.end(),
                    allocated_bytes: allocated_bytes(&path)?,
                    crc32: None,
                },
            );
            memory_chunks = Some(written.sums);
            stored_pages = written.nonzero_pages;
            let sums_path = tmp.join(BLOCK_SUMS_FILE);
            let encoded = written.blocks.encode();
            crate::fsutil::write_synced(&sums_path, &encoded)?;
            files.insert(
                BLOCK_SUMS_FILE.to_string(),
                FileInfo {
                    bytes: encoded.len() as u64,
                    allocated_bytes: allocated_bytes(&sums_path)?,
                    crc32: Some(crc32fast::hash(&encoded)),
                },
            );
        } else {
            let data_name = if opts.compress {
                PAGES_ZST_FILE
            } else {
                PAGES_FILE
            };
            let written = pages::write(
                tmp,
                memory,
                dirty,
                data_name,
                opts.compress,
                self.progress.as_deref(),
            )?;
            files.insert(PAGEMAP_FILE.to_string(), written.map);
            files.insert(data_name.to_string(), written.data);
            stored_pages = written.pages;
        }
        *sm = sm.apply(Event::Written)?;

        // Read back what is cheap to read (state file, page map): a bad disk or a bug in
        // this writer shows up now rather than at restore.
        StateFile::read(&state_path, state.len() as u64)?;
        if files.contains_key(PAGEMAP_FILE) {
            pages::read_map(&tmp.join(PAGEMAP_FILE), layout)?;
        }
        *sm = sm.apply(Event::Verified)?;

        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            id: meta.id.clone(),
            parent: parent.map(str::to_string),
            vm_id: meta.vm_id.clone(),
            created_ms: now_ms(),
            kind: if parent.is_some() {
                Kind::Incremental
            } else {
                Kind::Full
            },
            compression: if opts.compress {
                Compression::Zstd
            } else {
                Compression::None
            },
            state: *sm,
            memory_bytes: layout.total_bytes(),
            dirty_pages: stored_pages,
            layout: layout.clone(),
            cpu: meta.cpu.clone(),
            vm_config: meta.vm_config.clone(),
            files,
            memory_chunks,
        };
        manifest
            .check()
            .map_err(|r| crate::error::invalid(&tmp.join(MANIFEST_FILE), r))?;
        let json = manifest
            .to_json()
            .map_err(|r| crate::error::invalid(&tmp.join(MANIFEST_FILE), r))?;
        crate::fsutil::write_synced(&tmp.join(MANIFEST_FILE), &json)?;
        Ok(manifest)
    }

    /// Deletes snapshot `id`, refusing if other snapshots depend on it.
    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.get(id)?;
        let (manifests, _) = self.scan()?;
        let children: Vec<String> = manifests
            .iter()
            .filter(|m| m.parent.as_deref() == Some(id))
            .map(|m| m.id.clone())
            .collect();
        if !children.is_empty() {
            return Err(StoreError::HasChildren {
                id: id.to_string(),
                children,
            });
        }
        // Rename first: a crash mid-removal leaves a `.del-` directory, never a snapshot
        // with half its files.
        let doomed = self.root.join(format!("{DEL_PREFIX}{id}"));
        let dir = self.dir(id);
        std::fs::rename(&dir, &doomed).map_err(io_err("rename for deletion", &dir))?;
        sync_dir(&self.root)?;
        std::fs::remove_dir_all(&doomed).map_err(io_err("remove", &doomed))?;
        Ok(())
    }

    /// Moves `id` through `event` and records the new state in its manifest.
    pub(crate) fn transition(&self, id: &str, event: Event) -> Result<Manifest, StoreError> {
        let mut m = self.get(id)?;
        m.state = m.state.apply(event)?;
        let path = self.dir(id).join(MANIFEST_FILE);
        let json = m.to_json().map_err(|r| crate::error::invalid(&path, r))?;
        replace_file(&path, &json)?;
        Ok(m)
    }

    /// Keeps `id` (e.g. for its children) but stops offering it for restore.
    pub fn archive(&self, id: &str) -> Result<Manifest, StoreError> {
        self.transition(id, Event::Archive)
    }

    pub fn unarchive(&self, id: &str) -> Result<Manifest, StoreError> {
        self.transition(id, Event::Unarchive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;
    use ray_memory::{MemoryLayout, OwnedMemory};

    fn meta(id: &str) -> NewSnapshot {
        NewSnapshot {
            id: id.into(),
            vm_id: "vm".into(),
            cpu: "cpu".into(),
            vm_config: serde_json::json!({}),
        }
    }

    /// A store with the chain a <- b <- c (one page written before each snapshot).
    fn chain(tag: &str) -> (TempDir, SnapshotStore) {
        let dir = TempDir::new(tag);
        let store = SnapshotStore::open(dir.path()).unwrap();
        let layout = MemoryLayout::new(&[(0, 1 << 20)]).unwrap();
        let mem = OwnedMemory::zeroed(&layout).unwrap();
        mem.write(0x3000, &[7; 4096]).unwrap();
        let plain = CreateOptions::default();
        store.create_full(&meta("a"), b"s", &mem, &plain).unwrap();
        for (id, parent, gpa) in [("b", "a", 0x5000), ("c", "b", 0x6000)] {
            mem.write(gpa, &[9; 4096]).unwrap();
            let mut dirty = DirtyBitmap::clean(&layout);
            dirty.mark(&layout, gpa, 4096);
            store
                .create_incremental(parent, &meta(id), b"s", &mem, &dirty, &plain)
                .unwrap();
        }
        (dir, store)
    }

    #[test]
    fn an_incremental_whose_parent_is_gone_is_broken_naming_it() {
        let (dir, store) = chain("orphan");
        assert_eq!(store.list().unwrap().broken, vec![]);
        // What a parent removed behind the store's back (or by an older release) leaves.
        std::fs::remove_dir_all(dir.path().join("b")).unwrap();
        let tree = store.list().unwrap();
        let ids: Vec<&str> = tree.roots.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a"], "c is no root: it cannot be restored");
        assert!(tree.roots[0].children.is_empty());
        assert_eq!(tree.broken.len(), 1, "{:?}", tree.broken);
        assert_eq!(tree.broken[0].id, "c");
        assert!(
            tree.broken[0].error.contains("its parent b is missing"),
            "{}",
            tree.broken[0].error
        );
    }

    #[test]
    fn descendants_of_a_broken_link_name_the_missing_ancestor() {
        let (dir, store) = chain("ancestor");
        std::fs::write(dir.path().join("a").join(MANIFEST_FILE), "{ not json").unwrap();
        let tree = store.list().unwrap();
        assert!(tree.roots.is_empty());
        let broken: Vec<(&str, &str)> = tree
            .broken
            .iter()
            .map(|b| (b.id.as_str(), b.error.as_str()))
            .collect();
        assert_eq!(broken.len(), 3, "{broken:?}");
        assert!(
            broken[1].1.contains("its parent a is unreadable"),
            "{broken:?}"
        );
        assert!(
            broken[2]
                .1
                .contains("its ancestor (the parent of b) a is unreadable"),
            "{broken:?}"
        );
    }

    #[test]
    fn a_verify_that_passes_makes_an_error_snapshot_ready_again() {
        let (dir, store) = chain("reverify");
        let pages = dir.path().join("c").join(PAGES_FILE);
        let good = std::fs::read(&pages).unwrap();
        let mut bad = good.clone();
        bad[100] ^= 1;
        std::fs::write(&pages, &bad).unwrap();
        assert!(store.verify("c").is_err());
        assert_eq!(store.get("c").unwrap().state, SnapshotState::Error);
        // Still damaged: still error.
        assert!(store.verify("c").is_err());
        assert_eq!(store.get("c").unwrap().state, SnapshotState::Error);
        // Repaired (the file restored from a backup): the next verify says so.
        std::fs::write(&pages, &good).unwrap();
        store.verify("c").unwrap();
        assert_eq!(store.get("c").unwrap().state, SnapshotState::Ready);
        let tree = store.list().unwrap();
        assert_eq!(
            tree.roots[0].children[0].children[0].state,
            SnapshotState::Ready
        );
    }

    #[test]
    fn reading_a_store_changes_nothing_in_it() {
        let dir = TempDir::new("read-only");
        let tmp = dir.path().join(format!("{TMP_PREFIX}abandoned"));
        let del = dir.path().join(format!("{DEL_PREFIX}gone"));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::create_dir_all(&del).unwrap();
        let reader = SnapshotStore::for_reading(dir.path());
        assert!(reader.list().unwrap().roots.is_empty());
        assert!(matches!(reader.get("x"), Err(StoreError::NotFound(_))));
        assert!(tmp.exists() && del.exists(), "a read cleans nothing up");
        let missing = SnapshotStore::for_reading(dir.path().join("none"));
        assert!(missing.list().is_err(), "and creates nothing");
        assert!(!dir.path().join("none").exists());
        SnapshotStore::open(dir.path()).unwrap();
        assert!(!tmp.exists() && !del.exists(), "a writer's open cleans up");
    }
}
