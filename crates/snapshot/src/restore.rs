//! Restoring: from a snapshot id to a checked plan of which files make up memory, and
//! helpers that lay memory out from the plan. Also `merge` and `verify`, which read
//! chains the same way.
//!
//! A plan's base is either the sparse `memory.raw` of a full uncompressed snapshot, which
//! the VMM maps `MAP_PRIVATE` (cost independent of memory size), or a page set (compressed
//! full snapshot) laid onto zeroed memory. Incremental snapshots on the chain are overlays,
//! oldest first, written on top.
//!
//! Memory is written through a `GuestMemory` view's spans, only while no vCPU runs on it.
//! Those writes place the snapshot's own contents, so they are not reported to the view's
//! `note_write`: they are no change since the snapshot.
use std::path::{Path, PathBuf};

use ray_memory::{GuestMemory, MemoryLayout, OwnedMemory};

use crate::blocks::{BlockSums, SparseBlocks};
use crate::container::StateFile;
use crate::error::{FileError, StoreError};
use crate::manifest::{
    ChunkSums, Compression, FileInfo, Manifest, BLOCK_SUMS_FILE, FORMAT_VERSION, MEMORY_FILE,
    PAGEMAP_FILE, STATE_FILE,
};
use crate::pages::{self, PageRun};
use crate::sparse;
use crate::state_machine::{Event, SnapshotState};
use crate::store::{CreateOptions, NewSnapshot, SnapshotStore};

/// Pages of one snapshot to write over what is below them.
#[derive(Debug, Clone, PartialEq)]
pub struct Overlay {
    pub id: String,
    pub map_path: PathBuf,
    pub data_path: PathBuf,
    pub compressed: bool,
    pub runs: Vec<PageRun>,
    data: FileInfo,
}

impl Overlay {
    fn apply(&self, memory: Option<&dyn GuestMemory>, fresh: bool) -> Result<(), StoreError> {
        pages::apply(
            &self.data_path,
            self.compressed,
            &self.runs,
            &self.data,
            memory,
            fresh,
        )
    }
}

/// The bottom of the chain.
#[derive(Debug, Clone, PartialEq)]
pub enum BaseMemory {
    /// Map each region `(gpa, len)` of `path` at file offset `gpa`, `MAP_PRIVATE`.
    Sparse {
        id: String,
        path: PathBuf,
        sums: ChunkSums,
        /// `memory.sums` and its CRC32 from the manifest, if the snapshot has one.
        blocks: Option<(PathBuf, Option<u32>)>,
    },
    /// A compressed full snapshot: apply onto zeroed memory.
    Pages(Overlay),
}

/// Everything needed to restore one snapshot, with the cheap checks done: manifests of
/// the whole chain (format version, CPU, layout), the state file, the page maps, file
/// sizes. Memory data is checked as it is read (`materialize`, `apply_overlays`), or for
/// a mapped base, by `verify_base_memory`.
#[derive(Debug, Clone, PartialEq)]
pub struct RestorePlan {
    pub manifest: Manifest,
    /// The VM state payload, checked.
    pub state: Vec<u8>,
    pub layout: MemoryLayout,
    pub base: BaseMemory,
    /// Incremental snapshots, oldest first.
    pub overlays: Vec<Overlay>,
    /// Where this restore is in the snapshot state machine: `RestoreComplete` once built.
    pub phase: SnapshotState,
}

impl RestorePlan {
    /// The file to map privately, if the base can be mapped (full, uncompressed).
    pub fn mappable_memory(&self) -> Option<&Path> {
        match &self.base {
            BaseMemory::Sparse { path, .. } => Some(path),
            BaseMemory::Pages(_) => None,
        }
    }

    /// The mapped base's blocks, each checked as it is read, for verifying lazily: `None`
    /// when the base is not a sparse file or has no block checksums (written before
    /// `memory.sums` existed; such a snapshot is verified eagerly instead).
    pub fn base_blocks(&self) -> Result<Option<SparseBlocks>, StoreError> {
        let BaseMemory::Sparse {
            path,
            blocks: Some((sums_path, crc)),
            ..
        } = &self.base
        else {
            return Ok(None);
        };
        let sums = BlockSums::read(sums_path, &self.layout)?;
        let got = crc32fast::hash(&sums.encode());
        if let Some(expected) = crc.filter(|e| *e != got) {
            return Err(FileError::Checksum {
                path: sums_path.clone(),
                location: " (compared with the manifest)".into(),
                expected,
                got,
            }
            .into());
        }
        Ok(Some(SparseBlocks::open(path, &self.layout, sums)?))
    }

    /// Reads the whole mapped base file and checks its chunk checksums. Its cost follows
    /// memory size; a VMM may run it before resuming the guest, or in the background.
    pub fn verify_base_memory(&self) -> Result<(), StoreError> {
        match &self.base {
            BaseMemory::Sparse { path, sums, .. } => Ok(sparse::verify(path, &self.layout, sums)?),
            BaseMemory::Pages(o) => o.apply(None, false),
        }
    }

    /// Checks `memory`, mapped from `mappable_memory`, against the base's checksums without
    /// copying it. Call before the guest or `apply_overlays` writes to it.
    pub fn verify_mapped_base(&self, memory: &dyn GuestMemory) -> Result<(), StoreError> {
        match &self.base {
            BaseMemory::Sparse { path, sums, .. } => {
                Ok(sparse::verify_mapped(path, &self.layout, sums, memory)?)
            }
            BaseMemory::Pages(o) => o.apply(None, false),
        }
    }

    /// Writes the overlays into `memory`, which already holds the base (e.g. the private
    /// mapping of `mappable_memory`). No vCPU may run on `memory` meanwhile.
    pub fn apply_overlays(&self, memory: &dyn GuestMemory) -> Result<(), StoreError> {
        for o in &self.overlays {
            o.apply(Some(memory), false)?;
        }
        Ok(())
    }

    /// Lays the whole chain into `memory` (which must cover the layout; what it held is
    /// overwritten), checking every checksum. For when the base cannot or should not be
    /// mapped. No vCPU may run on `memory` meanwhile.
    pub fn materialize(&self, memory: &dyn GuestMemory) -> Result<(), StoreError> {
        self.materialize_into(memory, false)
    }

    /// `materialize`, where `fresh` says `memory` is all zero already (nothing then writes
    /// zeros, so pages the snapshot holds as zeros are never touched).
    fn materialize_into(&self, memory: &dyn GuestMemory, fresh: bool) -> Result<(), StoreError> {
        match &self.base {
            BaseMemory::Sparse { path, sums, .. } => {
                sparse::read_into(path, &self.layout, sums, memory, fresh)?
            }
            BaseMemory::Pages(o) => {
                if !fresh {
                    crate::guest::zero_all(memory)
                        .map_err(|e| StoreError::MemoryMismatch(e.to_string()))?;
                }
                o.apply(Some(memory), fresh)?;
            }
        }
        self.apply_overlays(memory)
    }

    /// `materialize` into newly mapped memory (zero and unallocated until written, so it
    /// costs the pages the snapshot holds data in).
    pub fn materialize_owned(&self) -> Result<OwnedMemory, StoreError> {
        let mem = OwnedMemory::zeroed(&self.layout)
            .map_err(|e| StoreError::MemoryMismatch(e.to_string()))?;
        self.materialize_into(&mem, true)?;
        Ok(mem)
    }
}

fn page_set(dir: &Path, m: &Manifest) -> Result<Overlay, StoreError> {
    let map_path = dir.join(PAGEMAP_FILE);
    let data_name = m.pages_file().ok_or_else(|| StoreError::BrokenChain {
        id: m.id.clone(),
        reason: "it has no page data file".into(),
    })?;
    let data_path = dir.join(data_name);
    let data = m
        .files
        .get(data_name)
        .cloned()
        .ok_or_else(|| StoreError::BrokenChain {
            id: m.id.clone(),
            reason: format!("its manifest lacks {data_name}"),
        })?;
    let runs = pages::read_map(&map_path, &m.layout)?;
    Ok(Overlay {
        id: m.id.clone(),
        map_path,
        data_path,
        compressed: m.compression == Compression::Zstd,
        runs,
        data,
    })
}

impl SnapshotStore {
    /// The manifests from `target` (read already) back to its full snapshot, newest
    /// first, checked to form one consistent chain.
    fn chain_from(&self, target: Manifest) -> Result<Vec<Manifest>, StoreError> {
        let id = target.id.clone();
        let id = id.as_str();
        let mut chain = vec![target];
        loop {
            let cur = chain
                .last()
                .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
            if cur.format_version != FORMAT_VERSION {
                return Err(StoreError::IncompatibleVersion {
                    id: cur.id.clone(),
                    got: cur.format_version,
                    supported: FORMAT_VERSION,
                });
            }
            let Some(parent) = cur.parent.clone() else {
                return Ok(chain);
            };
            let broken = |reason: String| StoreError::BrokenChain {
                id: id.to_string(),
                reason,
            };
            if chain.iter().any(|m| m.id == parent) || chain.len() > 65536 {
                return Err(broken(format!("its parents loop back to {parent}")));
            }
            let p = match self.get(&parent) {
                Ok(p) => p,
                Err(StoreError::NotFound(_)) => {
                    return Err(broken(format!("parent {parent} of {} is missing", cur.id)))
                }
                Err(e) => return Err(e),
            };
            if p.layout != cur.layout {
                return Err(broken(format!(
                    "{} and its parent {parent} have different memory layouts",
                    cur.id
                )));
            }
            if p.state == SnapshotState::Error {
                return Err(broken(format!(
                    "its ancestor {parent} is damaged (state error)"
                )));
            }
            chain.push(p);
        }
    }

    /// Checks snapshot `id` and its chain and returns how to restore it on a host whose
    /// CPU fingerprint is `host_cpu`.
    pub fn restore_plan(&self, id: &str, host_cpu: &str) -> Result<RestorePlan, StoreError> {
        let target = self.get(id)?;
        let mut phase = target
            .state
            .apply(Event::Restore)
            .map_err(|_| StoreError::WrongState {
                id: id.to_string(),
                state: target.state,
                action: "restoring",
                needs: "ready (unarchive an archived one first)",
            })?;
        if target.cpu != host_cpu {
            let _ = phase.apply(Event::Abort);
            return Err(StoreError::IncompatibleCpu {
                id: id.to_string(),
                snapshot: target.cpu.clone(),
                host: host_cpu.to_string(),
            });
        }
        let chain = self.chain_from(target.clone())?;
        let dir = self.dir(id);
        let state_path = dir.join(STATE_FILE);
        let state = StateFile::read(&state_path, StateFile::DEFAULT_LIMIT)?;
        check_whole_file_crc(&state_path, &state, &target)?;

        let mut overlays = Vec::new();
        let mut base = None;
        for m in chain.iter().rev() {
            let mdir = self.dir(&m.id);
            if m.parent.is_none() {
                base = Some(
                    match (&m.memory_chunks, m.files.contains_key(MEMORY_FILE)) {
                        (Some(sums), true) => {
                            let path = mdir.join(MEMORY_FILE);
                            sparse::check_size(&path, &m.layout)?;
                            BaseMemory::Sparse {
                                id: m.id.clone(),
                                path,
                                sums: sums.clone(),
                                blocks: m
                                    .files
                                    .get(BLOCK_SUMS_FILE)
                                    .map(|f| (mdir.join(BLOCK_SUMS_FILE), f.crc32)),
                            }
                        }
                        _ => BaseMemory::Pages(page_set(&mdir, m)?),
                    },
                );
            } else {
                overlays.push(page_set(&mdir, m)?);
            }
        }
        let base = base.ok_or_else(|| StoreError::BrokenChain {
            id: id.to_string(),
            reason: "it has no full snapshot at its root".into(),
        })?;
        phase = phase.apply(Event::Loaded)?;
        phase = phase.apply(Event::Verified)?;
        Ok(RestorePlan {
            layout: target.layout.clone(),
            manifest: target,
            state,
            base,
            overlays,
            phase,
        })
    }

    /// Flattens the chain of `id` into a new full snapshot `new_id` with the same state,
    /// CPU and configuration. Holds the chain's memory in this process while it works (only
    /// the pages holding data are allocated).
    pub fn merge(
        &self,
        id: &str,
        new_id: &str,
        opts: &CreateOptions,
    ) -> Result<Manifest, StoreError> {
        let target = self.get(id)?;
        let plan = self.restore_plan(id, &target.cpu)?;
        let mem = plan.materialize_owned()?;
        let meta = NewSnapshot {
            id: new_id.to_string(),
            vm_id: target.vm_id.clone(),
            cpu: target.cpu.clone(),
            vm_config: target.vm_config.clone(),
        };
        self.create_full(&meta, &plan.state, &mem, opts)
    }

    /// Reads every file of snapshot `id` (not its ancestors) and checks every checksum. A
    /// snapshot found damaged is marked `error` in its manifest, so `list` shows it; one
    /// marked `error` by an earlier check that passes now is `ready` again.
    pub fn verify(&self, id: &str) -> Result<(), StoreError> {
        let m = self.get(id)?;
        let result = self.verify_files(&m);
        match &result {
            Err(StoreError::File(e))
                if !matches!(e, FileError::Io { .. }) && m.state != SnapshotState::Error =>
            {
                let _ = self.transition(id, Event::Fail);
            }
            Ok(()) if m.state == SnapshotState::Error => {
                self.transition(id, Event::Verified)?;
            }
            _ => {}
        }
        result
    }

    fn verify_files(&self, m: &Manifest) -> Result<(), StoreError> {
        let dir = self.dir(&m.id);
        let state_path = dir.join(STATE_FILE);
        let state = StateFile::read(&state_path, StateFile::DEFAULT_LIMIT)?;
        check_whole_file_crc(&state_path, &state, m)?;
        match &m.memory_chunks {
            Some(sums) => {
                sparse::verify(&dir.join(MEMORY_FILE), &m.layout, sums)?;
                if let Some(f) = m.files.get(BLOCK_SUMS_FILE) {
                    // The block table must describe the data the chunk sums just vouched for.
                    let path = dir.join(BLOCK_SUMS_FILE);
                    let blocks = BlockSums::read(&path, &m.layout)?;
                    let got = crc32fast::hash(&blocks.encode());
                    if let Some(expected) = f.crc32.filter(|e| *e != got) {
                        return Err(FileError::Checksum {
                            path,
                            location: " (compared with the manifest)".into(),
                            expected,
                            got,
                        }
                        .into());
                    }
                    blocks
                        .check_against(sums, &m.layout)
                        .map_err(|why| crate::error::invalid(&path, why))?;
                }
            }
            None => page_set(&dir, m)?.apply(None, false)?,
        }
        Ok(())
    }
}

/// Compares the state file's CRC with the manifest's, catching a state file swapped in
/// from another snapshot (which its own checksum would not).
fn check_whole_file_crc(path: &Path, payload: &[u8], m: &Manifest) -> Result<(), StoreError> {
    let encoded = crate::container::encode(crate::container::STATE_MAGIC, payload);
    let got = crc32fast::hash(&encoded);
    match m.files.get(STATE_FILE).and_then(|f| f.crc32) {
        Some(expected) if expected != got => Err(FileError::Checksum {
            path: path.to_path_buf(),
            location: " (compared with the manifest)".into(),
            expected,
            got,
        }
        .into()),
        _ => Ok(()),
    }
}
