//! `memory.sums`: CRC32s of the sparse memory file per 64 KiB block, for lazy verification.
//!
//! The manifest's chunk checksums (4 MiB) are what `ray snapshot verify` and an eager
//! restore check. A restore that verifies lazily (each block checked just before the guest
//! or the VMM first reads it, see the VMM's `lazy_fill`) needs smaller units: a guest's
//! first fault would otherwise wait for 4 MiB to be read and hashed. The file is a container
//! (see `container`) whose payload is
//!
//! ```text
//! block_bytes u64 | regions u32 | per region: blocks u32, then one CRC32 (u32) per block
//! ```
//!
//! (little endian); region `r`'s block `b` covers its bytes `b * block_bytes..`, the last one
//! shorter if the region ends first. A chunk's CRC is the combination of its blocks', so the
//! writer hashes every byte once. Snapshots written before this file existed have none;
//! restoring them verified falls back to the eager check of the chunks.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ray_memory::MemoryLayout;

use crate::container::{self, Magic};
use crate::error::{invalid, io_err, FileError};

/// Block size of lazy verification: small enough that a first touch costs ~20 µs of reading
/// and hashing, large enough that the table stays 64 KiB per GiB.
pub const BLOCK_BYTES: u64 = 64 << 10;

pub(crate) const BLOCKS_MAGIC: Magic = Magic {
    bytes: b"RAYBLKSM",
    name: "rayvisor block checksums",
};

/// The per-block CRC32s of a sparse memory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSums {
    pub block_bytes: u64,
    /// `crc32[r][b]`: region `r`, block `b`.
    pub crc32: Vec<Vec<u32>>,
}

impl BlockSums {
    /// Blocks of a `len`-byte region.
    pub fn blocks_of(&self, len: u64) -> usize {
        len.div_ceil(self.block_bytes) as usize
    }

    /// Checks that the blocks of every chunk combine to that chunk's CRC in `chunks` (the
    /// manifest's): the table describes the same bytes. Costs a CRC combination per block.
    pub fn check_against(
        &self,
        chunks: &crate::manifest::ChunkSums,
        layout: &MemoryLayout,
    ) -> Result<(), String> {
        if !chunks.chunk_bytes.is_multiple_of(self.block_bytes) {
            return Err(format!(
                "its block size {} does not divide the chunk size {}",
                self.block_bytes, chunks.chunk_bytes
            ));
        }
        let per_chunk = (chunks.chunk_bytes / self.block_bytes) as usize;
        for ((r, blocks), sums) in layout.regions.iter().zip(&self.crc32).zip(&chunks.crc32) {
            for (ci, expected) in sums.iter().enumerate() {
                let mut h = crc32fast::Hasher::new();
                for (bi, crc) in blocks
                    .iter()
                    .enumerate()
                    .skip(ci * per_chunk)
                    .take(per_chunk)
                {
                    let off = bi as u64 * self.block_bytes;
                    let len = (r.len - off).min(self.block_bytes);
                    h.combine(&crc32fast::Hasher::new_with_initial_len(*crc, len));
                }
                let got = h.finalize();
                if got != *expected {
                    return Err(format!(
                        "the blocks of chunk {ci} of region {:#x} add up to CRC {got:#010x}, the manifest says {expected:#010x}",
                        r.gpa
                    ));
                }
            }
        }
        Ok(())
    }

    /// The file's bytes (a container).
    pub fn encode(&self) -> Vec<u8> {
        let mut p =
            Vec::with_capacity(12 + self.crc32.iter().map(|r| 4 + 4 * r.len()).sum::<usize>());
        p.extend_from_slice(&self.block_bytes.to_le_bytes());
        p.extend_from_slice(&(self.crc32.len() as u32).to_le_bytes());
        for r in &self.crc32 {
            p.extend_from_slice(&(r.len() as u32).to_le_bytes());
            for c in r {
                p.extend_from_slice(&c.to_le_bytes());
            }
        }
        container::encode(BLOCKS_MAGIC, &p)
    }

    /// Reads and checks `path` against `layout`: block size, region and block counts.
    pub fn read(path: &Path, layout: &MemoryLayout) -> Result<Self, FileError> {
        let blocks: u64 = layout
            .regions
            .iter()
            .map(|r| r.len.div_ceil(BLOCK_BYTES))
            .sum();
        // Generous: any block size at least a page gives at most 16x the entries.
        let limit = 12 + 4 * layout.regions.len() as u64 + 4 * 16 * blocks;
        let p = container::read(path, BLOCKS_MAGIC, limit)?;
        let bad = |why: String| invalid(path, why);
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], FileError> {
            let s = p
                .get(at..at + n)
                .ok_or_else(|| bad(format!("it ends at byte {at} of its payload")))?;
            at += n;
            Ok(s)
        };
        let u32_of = |s: &[u8]| u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        let mut b8 = [0u8; 8];
        b8.copy_from_slice(take(8)?);
        let block_bytes = u64::from_le_bytes(b8);
        if block_bytes < ray_memory::PAGE_SIZE || !block_bytes.is_multiple_of(ray_memory::PAGE_SIZE)
        {
            return Err(bad(format!(
                "its block size {block_bytes} is not a multiple of 4096"
            )));
        }
        let regions = u32_of(take(4)?) as usize;
        if regions != layout.regions.len() {
            return Err(bad(format!(
                "it has {regions} regions, guest memory {}",
                layout.regions.len()
            )));
        }
        let mut crc32 = Vec::with_capacity(regions);
        for r in &layout.regions {
            let n = u32_of(take(4)?) as usize;
            if n as u64 != r.len.div_ceil(block_bytes) {
                return Err(bad(format!(
                    "region {:#x} has {n} block checksums for {} bytes",
                    r.gpa, r.len
                )));
            }
            let raw = take(4 * n)?;
            crc32.push(raw.chunks_exact(4).map(u32_of).collect());
        }
        if at != p.len() {
            return Err(bad(format!(
                "{} bytes follow its last checksum",
                p.len() - at
            )));
        }
        Ok(Self { block_bytes, crc32 })
    }
}

/// The blocks of one sparse memory file, each checked against its CRC32 as it is read:
/// what a lazily verified restore fills guest memory from.
pub struct SparseBlocks {
    path: PathBuf,
    file: File,
    layout: MemoryLayout,
    sums: BlockSums,
    zero_crc: u32,
}

/// One block as [`SparseBlocks::read_block`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// All zeros (its checksum is that of zeros): nothing to read or copy.
    Zero,
    /// This many bytes of the buffer hold the block, checked.
    Data(usize),
}

impl SparseBlocks {
    pub(crate) fn open(
        path: &Path,
        layout: &MemoryLayout,
        sums: BlockSums,
    ) -> Result<Self, FileError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            layout: layout.clone(),
            zero_crc: crate::sparse::zero_crc(sums.block_bytes as usize),
            sums,
        })
    }

    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    pub fn block_bytes(&self) -> u64 {
        self.sums.block_bytes
    }

    /// Reads region `region`'s block `index` into `buf` (at least `block_bytes` long) and
    /// checks it. A block whose checksum is that of zeros is reported as [`Block::Zero`]
    /// without reading the file: zeros are then exactly what was checksummed.
    pub fn read_block(
        &self,
        region: usize,
        index: usize,
        buf: &mut [u8],
    ) -> Result<Block, FileError> {
        let (r, expected) = match (self.layout.regions.get(region), self.sums.crc32.get(region)) {
            (Some(r), Some(c)) => match c.get(index) {
                Some(e) => (r, *e),
                None => {
                    return Err(invalid(
                        &self.path,
                        format!("region {region} has no block {index}"),
                    ))
                }
            },
            _ => {
                return Err(invalid(
                    &self.path,
                    format!("guest memory has no region {region}"),
                ))
            }
        };
        let off = index as u64 * self.sums.block_bytes;
        let len = (r.len - off).min(self.sums.block_bytes);
        let gpa = r.gpa + off;
        if len == self.sums.block_bytes && expected == self.zero_crc {
            return Ok(Block::Zero);
        }
        let piece = buf.get_mut(..len as usize).ok_or_else(|| {
            invalid(
                &self.path,
                format!("a {len}-byte block does not fit the buffer"),
            )
        })?;
        self.file
            .read_exact_at(piece, gpa)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => FileError::Truncated {
                    path: self.path.clone(),
                    at: gpa,
                    what: format!("the block at guest address {gpa:#x} needs {len} bytes"),
                },
                _ => io_err("read", &self.path)(e),
            })?;
        let got = crc32fast::hash(piece);
        if got != expected {
            return Err(FileError::Checksum {
                path: self.path.clone(),
                location: format!(" in guest memory {gpa:#x}..{:#x}", gpa + len),
                expected,
                got,
            });
        }
        Ok(Block::Data(len as usize))
    }
}

/// Builds block checksums while a chunk's bytes stream past: feed it the chunk's bytes in
/// order (data or zeros), and it hands each finished block's CRC to the table and to the
/// chunk's own hasher.
pub(crate) struct BlockHasher {
    block_bytes: u64,
    /// Bytes of the current block hashed so far.
    filled: u64,
    cur: crc32fast::Hasher,
    pub sums: Vec<u32>,
}

impl BlockHasher {
    pub fn new(block_bytes: u64, region_len: u64) -> Self {
        Self {
            block_bytes,
            filled: 0,
            cur: crc32fast::Hasher::new(),
            sums: Vec::with_capacity(region_len.div_ceil(block_bytes) as usize),
        }
    }

    /// Hashes `len` bytes: `data`'s, or zeros when `data` is `None`. `chunk` receives each
    /// completed block (blocks never straddle chunks: a chunk is a whole number of blocks).
    pub fn feed(
        &mut self,
        chunk: &mut crc32fast::Hasher,
        mut len: u64,
        mut data: Option<ray_memory::GuestSpan<'_>>,
    ) {
        while len > 0 {
            let n = len.min(self.block_bytes - self.filled);
            match &data {
                Some(span) => {
                    if let Some(s) = span.sub(0, n as usize) {
                        s.crc32_update(&mut self.cur);
                    }
                    data = span.sub(n as usize, span.len() - n as usize);
                }
                None => crate::guest::crc_zeros(&mut self.cur, n),
            }
            self.filled += n;
            len -= n;
            if self.filled == self.block_bytes {
                self.finish_block(chunk);
            }
        }
    }

    /// A whole chunk of `len` bytes known to be zero: its blocks' CRCs without hashing.
    /// Call at a chunk's start (every block before it is finished).
    pub fn zero_chunk(&mut self, len: u64) {
        let mut left = len;
        while left > 0 {
            let n = left.min(self.block_bytes);
            self.sums.push(crate::sparse::zero_crc(n as usize));
            left -= n;
        }
    }

    /// Ends the region's last chunk: a partial last block is finished as it is.
    pub fn end_region(&mut self, chunk: &mut crc32fast::Hasher) {
        if self.filled > 0 {
            self.finish_block(chunk);
        }
    }

    fn finish_block(&mut self, chunk: &mut crc32fast::Hasher) {
        let done = std::mem::replace(&mut self.cur, crc32fast::Hasher::new());
        chunk.combine(&done);
        self.sums.push(done.finalize());
        self.filled = 0;
    }
}

impl ray_memory::BlockSource for SparseBlocks {
    fn block_bytes(&self) -> u64 {
        self.sums.block_bytes
    }

    fn read_block(
        &self,
        region: usize,
        index: usize,
        buf: &mut [u8],
    ) -> Result<Option<usize>, String> {
        match SparseBlocks::read_block(self, region, index, buf) {
            Ok(Block::Zero) => Ok(None),
            Ok(Block::Data(n)) => Ok(Some(n)),
            Err(e) => Err(e.to_string()),
        }
    }
}
