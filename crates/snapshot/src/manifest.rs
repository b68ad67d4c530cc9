//! `manifest.json`: the human-readable description of one snapshot.
//!
//! It is written last, inside the temporary directory, so a snapshot directory with a
//! manifest has all its files. Everything in it is checked on read: it is untrusted input
//! that sizes files and buffers.
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use ray_memory::{MemoryLayout, PAGE_SIZE};

use crate::error::{invalid, io_err, FileError};
use crate::state_machine::SnapshotState;

/// The snapshot format version (manifest and file set) this build writes and restores.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const STATE_FILE: &str = "state.bin";
/// Full uncompressed memory, sparse, laid out by guest-physical address.
pub const MEMORY_FILE: &str = "memory.raw";
/// CRC32s of `memory.raw` per 64 KiB block, for lazy verification (optional: snapshots
/// written before it existed have none).
pub const BLOCK_SUMS_FILE: &str = "memory.sums";
/// Page runs (address, length, checksum) of a page set.
pub const PAGEMAP_FILE: &str = "pages.map";
/// Page data of a page set, in page-map order.
pub const PAGES_FILE: &str = "pages.bin";
/// Page data of a page set, zstd-compressed.
pub const PAGES_ZST_FILE: &str = "pages.zst";
/// Largest manifest accepted: chunk checksums of 1 TiB of memory fit easily.
const MANIFEST_LIMIT: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// All of memory: restores on its own.
    Full,
    /// Only the pages written since `parent`.
    Incremental,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    None,
    Zstd,
}

/// Size and checksum of one file of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInfo {
    /// Length of the file (for a sparse file, including holes).
    pub bytes: u64,
    /// Bytes allocated on disk (holes excluded), for reporting.
    pub allocated_bytes: u64,
    /// CRC32 of the whole file, for files that are read whole on restore. The sparse
    /// memory file has chunk checksums instead (`memory_chunks`).
    pub crc32: Option<u32>,
}

/// Checksums of the sparse memory file, per fixed-size chunk of each region.
///
/// One hash over a multi-GiB file would force restore to read all of it before running
/// the guest, defeating the private mapping. With per-chunk CRC32s, verification can run
/// in the background or chunk by chunk, and an error names the damaged address range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkSums {
    pub chunk_bytes: u64,
    /// `crc32[r][c]` is the CRC32 of region `r`'s bytes `c * chunk_bytes..` (the last chunk
    /// may be shorter), zero pages included.
    pub crc32: Vec<Vec<u32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub id: String,
    pub parent: Option<String>,
    pub vm_id: String,
    pub created_ms: u64,
    pub kind: Kind,
    pub compression: Compression,
    pub state: SnapshotState,
    /// Guest RAM size: the sum of the layout's regions.
    pub memory_bytes: u64,
    /// Pages stored: dirty pages for an incremental snapshot, non-zero ones for a full one.
    pub dirty_pages: u64,
    pub layout: MemoryLayout,
    /// Opaque CPU compatibility fingerprint from the VMM (e.g. a hash of CPUID); restore
    /// refuses a host whose fingerprint differs.
    pub cpu: String,
    /// Opaque VM configuration from the VMM.
    pub vm_config: serde_json::Value,
    /// Every file of the snapshot but the manifest, by name.
    pub files: BTreeMap<String, FileInfo>,
    /// Present for a full uncompressed snapshot (`memory.raw`).
    pub memory_chunks: Option<ChunkSums>,
}

impl Manifest {
    /// Reads and checks `<dir>/manifest.json`. A different `format_version` is reported by
    /// the caller (restore), so that `list` can still show such snapshots.
    pub fn read(dir: &Path) -> Result<Manifest, FileError> {
        let path = dir.join(MANIFEST_FILE);
        let meta = std::fs::metadata(&path).map_err(io_err("stat", &path))?;
        if meta.len() > MANIFEST_LIMIT {
            return Err(FileError::TooLarge {
                path,
                got: meta.len(),
                limit: MANIFEST_LIMIT,
            });
        }
        let text = std::fs::read(&path).map_err(io_err("read", &path))?;
        let m: Manifest =
            serde_json::from_slice(&text).map_err(|e| invalid(&path, e.to_string()))?;
        m.check().map_err(|reason| invalid(&path, reason))?;
        Ok(m)
    }

    /// The manifest's own consistency: layout, file set for its kind, chunk table shape.
    pub fn check(&self) -> Result<(), String> {
        self.layout.check().map_err(|e| e.to_string())?;
        if self.layout.total_bytes() != self.memory_bytes {
            return Err(format!(
                "memory_bytes is {} but the layout adds up to {}",
                self.memory_bytes,
                self.layout.total_bytes()
            ));
        }
        if (self.kind == Kind::Full) != self.parent.is_none() {
            return Err(format!(
                "a {:?} snapshot with parent {:?} is contradictory",
                self.kind, self.parent
            ));
        }
        if self.parent.as_deref() == Some(self.id.as_str()) {
            return Err(format!("snapshot {} names itself as its parent", self.id));
        }
        let need: &[&str] = match (self.kind, self.compression) {
            (Kind::Full, Compression::None) => &[STATE_FILE, MEMORY_FILE],
            (_, Compression::Zstd) => &[STATE_FILE, PAGEMAP_FILE, PAGES_ZST_FILE],
            (Kind::Incremental, Compression::None) => &[STATE_FILE, PAGEMAP_FILE, PAGES_FILE],
        };
        for name in need {
            if !self.files.contains_key(*name) {
                return Err(format!("the file list lacks {name}"));
            }
        }
        let optional: &[&str] = match (self.kind, self.compression) {
            (Kind::Full, Compression::None) => &[BLOCK_SUMS_FILE],
            _ => &[],
        };
        if let Some(extra) = self
            .files
            .keys()
            .find(|k| !need.contains(&k.as_str()) && !optional.contains(&k.as_str()))
        {
            return Err(format!("the file list names an unexpected file {extra:?}"));
        }
        if self.files.contains_key(MEMORY_FILE) {
            let sums = self
                .memory_chunks
                .as_ref()
                .ok_or("memory_chunks is missing for memory.raw")?;
            if sums.chunk_bytes == 0 || !sums.chunk_bytes.is_multiple_of(PAGE_SIZE) {
                return Err(format!(
                    "chunk_bytes {} is not a positive multiple of 4096",
                    sums.chunk_bytes
                ));
            }
            if sums.crc32.len() != self.layout.regions.len() {
                return Err(format!(
                    "memory_chunks has {} regions, the layout {}",
                    sums.crc32.len(),
                    self.layout.regions.len()
                ));
            }
            for (i, (c, r)) in sums.crc32.iter().zip(&self.layout.regions).enumerate() {
                if c.len() as u64 != r.len.div_ceil(sums.chunk_bytes) {
                    return Err(format!(
                        "memory_chunks region {i} has {} checksums for {} bytes",
                        c.len(),
                        r.len
                    ));
                }
            }
        }
        Ok(())
    }

    /// Serializes for writing; pretty, since people read it.
    pub fn to_json(&self) -> Result<Vec<u8>, String> {
        let mut v = serde_json::to_vec_pretty(self)
            .map_err(|e| format!("manifest of {} cannot be serialized: {e}", self.id))?;
        v.push(b'\n');
        Ok(v)
    }

    /// The file holding this snapshot's page data, if it is a page set.
    /// Bytes the snapshot's files occupy on disk, manifest excluded, as recorded when they
    /// were written (no file is read or stat-ed).
    pub fn stored_bytes(&self) -> u64 {
        self.files.values().map(|f| f.allocated_bytes).sum()
    }

    pub fn pages_file(&self) -> Option<&'static str> {
        if self.files.contains_key(PAGES_ZST_FILE) {
            Some(PAGES_ZST_FILE)
        } else if self.files.contains_key(PAGES_FILE) {
            Some(PAGES_FILE)
        } else {
            None
        }
    }
}
