//! The full, uncompressed memory file: guest RAM laid out by guest-physical address
//! (file offset = gpa), zero pages left as holes.
//!
//! This layout is what makes restore cheap: the VMM maps each region of the file
//! `MAP_PRIVATE` at offset `gpa`, pages fault in from the page cache on demand, and the
//! guest's writes stay private. The file is created with `set_len` and only non-zero pages
//! are written, so a mostly idle 4 GiB guest costs what it uses.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::AtomicU64;

use ray_memory::{GuestMemory, MemoryLayout, PAGE_SIZE};

use crate::blocks::{BlockHasher, BlockSums, BLOCK_BYTES};
use crate::error::{io_err, FileError, StoreError};
use crate::fsutil::has_data;
use crate::guest::{self, for_each_run, WriteAt, COPY_BYTES};
use crate::manifest::ChunkSums;

/// Chunk size for memory checksums and for copying: 4 MiB keeps the chunk table small
/// (256 entries per GiB) and the write calls large.
pub const CHUNK_BYTES: u64 = 4 << 20;

/// What writing the memory file produced.
pub(crate) struct SparseWritten {
    pub sums: ChunkSums,
    /// The same bytes' CRC32s per `BLOCK_BYTES` block (for `memory.sums`).
    pub blocks: BlockSums,
    pub nonzero_pages: u64,
}

/// Writes `memory` into a new sparse file at `path` and fsyncs it: each chunk's non-zero
/// page runs go straight from guest memory to their offset in the file. Memory the view
/// knows to be zero is not read. `progress` counts the guest bytes done.
pub(crate) fn write(
    path: &Path,
    memory: &dyn GuestMemory,
    progress: Option<&AtomicU64>,
) -> Result<SparseWritten, FileError> {
    let layout = memory.layout();
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("create", path))?;
    file.set_len(layout.end()).map_err(io_err("size", path))?;
    let mut sums = Vec::with_capacity(layout.regions.len());
    let mut block_sums = Vec::with_capacity(layout.regions.len());
    let mut nonzero_pages = 0;
    for r in &layout.regions {
        let mut region_sums = Vec::with_capacity(r.len.div_ceil(CHUNK_BYTES) as usize);
        let mut blocks = BlockHasher::new(BLOCK_BYTES, r.len);
        let mut off = 0;
        while off < r.len {
            let n = (r.len - off).min(CHUNK_BYTES);
            let gpa = r.gpa + off;
            if memory.known_zero(gpa, n) {
                region_sums.push(zero_crc(n as usize));
                blocks.zero_chunk(n);
            } else {
                // Each byte is hashed once, into its block; the chunk's CRC combines them.
                let mut h = crc32fast::Hasher::new();
                for_each_run(memory, path, gpa, n, |run_gpa, len, data| {
                    if let Some(span) = &data {
                        let mut at = WriteAt {
                            file: &file,
                            offset: run_gpa,
                        };
                        span.write_all_to(&mut at).map_err(io_err("write", path))?;
                        nonzero_pages += len / PAGE_SIZE;
                    }
                    blocks.feed(&mut h, len, data);
                    Ok(())
                })?;
                if off + n == r.len {
                    blocks.end_region(&mut h);
                }
                region_sums.push(h.finalize());
            }
            guest::advance(progress, n);
            off += n;
        }
        sums.push(region_sums);
        block_sums.push(blocks.sums);
    }
    file.sync_all().map_err(io_err("fsync", path))?;
    Ok(SparseWritten {
        sums: ChunkSums {
            chunk_bytes: CHUNK_BYTES,
            crc32: sums,
        },
        blocks: BlockSums {
            block_bytes: BLOCK_BYTES,
            crc32: block_sums,
        },
        nonzero_pages,
    })
}

/// The CRC32 of `len` zero bytes (a chunk that is a hole), computed once per length.
pub(crate) fn zero_crc(len: usize) -> u32 {
    use std::sync::Mutex;
    static CACHE: Mutex<Vec<(usize, u32)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = cache.iter().find(|(l, _)| *l == len) {
        return *c;
    }
    let c = crc32fast::hash(&vec![0u8; len]);
    cache.push((len, c));
    c
}

/// Checks the file's size against the layout before anything reads or maps it.
pub(crate) fn check_size(path: &Path, layout: &MemoryLayout) -> Result<(), FileError> {
    let len = std::fs::metadata(path).map_err(io_err("stat", path))?.len();
    if len < layout.end() {
        return Err(FileError::Truncated {
            path: path.to_path_buf(),
            at: len,
            what: format!("guest memory ends at {:#x}", layout.end()),
        });
    }
    Ok(())
}

/// Verifies one chunk: region `region`, chunk `index`. Lets a VMM verify lazily or in
/// the background after mapping. `buf` is scratch space, reused between calls.
pub fn verify_chunk(
    path: &Path,
    layout: &MemoryLayout,
    sums: &ChunkSums,
    region: usize,
    index: usize,
    buf: &mut Vec<u8>,
) -> Result<(), FileError> {
    let (r, expected) = match (layout.regions.get(region), sums.crc32.get(region)) {
        (Some(r), Some(c)) => match c.get(index) {
            Some(e) => (r, *e),
            None => {
                return Err(crate::error::invalid(
                    path,
                    format!("region {region} has no chunk {index}"),
                ))
            }
        },
        _ => {
            return Err(crate::error::invalid(
                path,
                format!("guest memory has no region {region}"),
            ))
        }
    };
    let off = (index as u64)
        .checked_mul(sums.chunk_bytes)
        .filter(|off| *off < r.len)
        .ok_or_else(|| {
            crate::error::invalid(path, format!("region {region} has no chunk {index}"))
        })?;
    let n = (r.len - off).min(sums.chunk_bytes);
    let file = File::open(path).map_err(io_err("open", path))?;
    read_chunk(&file, path, r.gpa + off, n, expected, buf, |_, _| {})
}

/// Reads the `len`-byte chunk at `gpa` from `file` through `buf` (a piece of at most
/// `COPY_BYTES` at a time), hands each piece to `sink(offset in the chunk, bytes)`, and
/// checks the chunk's CRC32 against `expected` once all of it is read.
fn read_chunk(
    file: &File,
    path: &Path,
    gpa: u64,
    len: u64,
    expected: u32,
    buf: &mut Vec<u8>,
    mut sink: impl FnMut(usize, &[u8]),
) -> Result<(), FileError> {
    buf.resize((len as usize).min(COPY_BYTES), 0);
    let mut h = crc32fast::Hasher::new();
    let mut off = 0u64;
    while off < len {
        let piece = &mut buf[..(len - off).min(COPY_BYTES as u64) as usize];
        file.read_exact_at(piece, gpa + off)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => FileError::Truncated {
                    path: path.to_path_buf(),
                    at: gpa,
                    what: format!("the chunk at guest address {gpa:#x} needs {len} bytes"),
                },
                _ => io_err("read", path)(e),
            })?;
        h.update(piece);
        sink(off as usize, piece);
        off += piece.len() as u64;
    }
    let got = h.finalize();
    if got != expected {
        return Err(FileError::Checksum {
            path: path.to_path_buf(),
            location: format!(" in guest memory {gpa:#x}..{:#x}", gpa + len),
            expected,
            got,
        });
    }
    Ok(())
}

/// Checks a chunk that is a hole in the file: it must have been all zeros when written.
fn check_hole(path: &Path, gpa: u64, len: u64, expected: u32) -> Result<(), FileError> {
    let got = zero_crc(len as usize);
    if got != expected {
        return Err(FileError::Checksum {
            path: path.to_path_buf(),
            location: format!(
                " in guest memory {gpa:#x}..{:#x} (the file has a hole there)",
                gpa + len
            ),
            expected,
            got,
        });
    }
    Ok(())
}

/// Checks the file's size and chunk table against the layout, then calls
/// `each(file, gpa, len, expected, is_hole)` for every chunk of the file.
fn for_each_chunk<E: From<FileError>>(
    path: &Path,
    layout: &MemoryLayout,
    sums: &ChunkSums,
    mut each: impl FnMut(&File, u64, u64, u32, bool) -> Result<(), E>,
) -> Result<(), E> {
    check_size(path, layout)?;
    if sums.crc32.len() != layout.regions.len() {
        return Err(crate::error::invalid(
            path,
            format!(
                "{} regions of checksums for {} regions of memory",
                sums.crc32.len(),
                layout.regions.len()
            ),
        )
        .into());
    }
    if sums.chunk_bytes == 0 {
        return Err(crate::error::invalid(path, "its chunk size is 0").into());
    }
    let file = File::open(path).map_err(io_err("open", path))?;
    for (r, region_sums) in layout.regions.iter().zip(&sums.crc32) {
        let chunks = r.len.div_ceil(sums.chunk_bytes) as usize;
        if region_sums.len() != chunks {
            return Err(crate::error::invalid(
                path,
                format!(
                    "region {:#x} has {} chunk checksums, needs {chunks}",
                    r.gpa,
                    region_sums.len()
                ),
            )
            .into());
        }
        for (ci, expected) in region_sums.iter().enumerate() {
            let off = ci as u64 * sums.chunk_bytes;
            let n = (r.len - off).min(sums.chunk_bytes);
            let gpa = r.gpa + off;
            let hole = !has_data(&file, gpa, n).map_err(io_err("look for data in", path))?;
            each(&file, gpa, n, *expected, hole)?;
        }
    }
    Ok(())
}

/// Verifies every chunk of the file. Costs a read of the file's data; holes are checked
/// without reading them.
pub fn verify(path: &Path, layout: &MemoryLayout, sums: &ChunkSums) -> Result<(), FileError> {
    let mut buf = Vec::new();
    for_each_chunk(path, layout, sums, |file, gpa, n, expected, hole| {
        if hole {
            return check_hole(path, gpa, n, expected);
        }
        read_chunk(file, path, gpa, n, expected, &mut buf, |_, _| {})
    })
}

/// Verifies guest memory mapped from the file against the file's chunk checksums,
/// without copying: chunks that are holes in the file are checked without touching the
/// mapping.
pub fn verify_mapped(
    path: &Path,
    layout: &MemoryLayout,
    sums: &ChunkSums,
    memory: &dyn GuestMemory,
) -> Result<(), FileError> {
    for_each_chunk(path, layout, sums, |_, gpa, n, expected, hole| {
        if hole {
            return check_hole(path, gpa, n, expected);
        }
        let span = memory.span(gpa, n).map_err(|_| {
            crate::error::invalid(
                path,
                format!("guest memory {gpa:#x}..{:#x} is not mapped", gpa + n),
            )
        })?;
        let got = span.crc32();
        if got != expected {
            return Err(FileError::Checksum {
                path: path.to_path_buf(),
                location: format!(" in guest memory {gpa:#x}..{:#x}", gpa + n),
                expected,
                got,
            });
        }
        Ok(())
    })
}

/// Reads the file into `memory`, checking every chunk as it goes; on error `memory` is
/// partly written. Chunks that are holes in the file are made zero without reading them.
/// `fresh` says `memory` is all zero already: zero pages are then not written at all.
pub(crate) fn read_into(
    path: &Path,
    layout: &MemoryLayout,
    sums: &ChunkSums,
    memory: &dyn GuestMemory,
    fresh: bool,
) -> Result<(), StoreError> {
    let mut buf = Vec::new();
    for_each_chunk(path, layout, sums, |file, gpa, n, expected, hole| {
        let span = memory.span(gpa, n).map_err(|_| {
            StoreError::MemoryMismatch(format!(
                "guest memory {gpa:#x}..{:#x} of the snapshot is not in the memory given",
                gpa + n
            ))
        })?;
        if hole {
            check_hole(path, gpa, n, expected)?;
            if !fresh {
                guest::zero(memory, gpa, &span);
            }
            return Ok(());
        }
        read_chunk(file, path, gpa, n, expected, &mut buf, |off, piece| {
            if let Some(dst) = span.sub(off, piece.len()) {
                guest::place(&dst, piece, fresh);
            }
        })?;
        Ok(())
    })
}
