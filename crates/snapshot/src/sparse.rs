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

use crate::error::{io_err, FileError};
use crate::fsutil::has_data;
use crate::manifest::ChunkSums;
use crate::memory::{is_zero, target_range, MemoryLayout, MemorySource, PAGE_SIZE};

/// Chunk size for memory checksums and for copying: 4 MiB keeps the chunk table small
/// (256 entries per GiB) and the write calls large.
pub const CHUNK_BYTES: u64 = 4 << 20;

/// What writing the memory file produced.
pub(crate) struct SparseWritten {
    pub sums: ChunkSums,
    pub nonzero_pages: u64,
}

/// Writes `source` into a new sparse file at `path` and fsyncs it.
pub(crate) fn write(path: &Path, source: &dyn MemorySource) -> Result<SparseWritten, FileError> {
    let layout = source.layout();
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("create", path))?;
    file.set_len(layout.end()).map_err(io_err("size", path))?;
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    let mut sums = Vec::with_capacity(layout.regions.len());
    let mut nonzero_pages = 0;
    for r in &layout.regions {
        let mut region_sums = Vec::with_capacity(r.len.div_ceil(CHUNK_BYTES) as usize);
        let mut off = 0;
        while off < r.len {
            let n = (r.len - off).min(CHUNK_BYTES) as usize;
            if source.known_zero(r.gpa + off, n as u64) {
                region_sums.push(zero_crc(n));
                off += n as u64;
                continue;
            }
            let chunk: &[u8] = match source.borrow(r.gpa + off, n as u64) {
                Some(direct) => direct,
                None => {
                    let chunk = &mut buf[..n];
                    source
                        .read(r.gpa + off, chunk)
                        .map_err(io_err("read guest memory for", path))?;
                    chunk
                }
            };
            region_sums.push(crc32fast::hash(chunk));
            nonzero_pages += write_nonzero_runs(&file, path, chunk, r.gpa + off)?;
            off += n as u64;
        }
        sums.push(region_sums);
    }
    file.sync_all().map_err(io_err("fsync", path))?;
    Ok(SparseWritten {
        sums: ChunkSums {
            chunk_bytes: CHUNK_BYTES,
            crc32: sums,
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

/// Writes the runs of non-zero pages of `chunk` (guest address `gpa`) at offset `gpa`;
/// returns how many pages that was.
fn write_nonzero_runs(file: &File, path: &Path, chunk: &[u8], gpa: u64) -> Result<u64, FileError> {
    let page = PAGE_SIZE as usize;
    let mut pages = 0;
    let mut run_start: Option<usize> = None;
    let mut at = 0;
    while at <= chunk.len() {
        let nonzero = at < chunk.len() && !is_zero(&chunk[at..(at + page).min(chunk.len())]);
        match (nonzero, run_start) {
            (true, None) => run_start = Some(at),
            (false, Some(start)) => {
                file.write_all_at(&chunk[start..at], gpa + start as u64)
                    .map_err(io_err("write", path))?;
                pages += ((at - start) / page) as u64;
                run_start = None;
            }
            _ => {}
        }
        at += page;
    }
    Ok(pages)
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
/// the background after mapping.
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
    let off = index as u64 * sums.chunk_bytes;
    let n = (r.len - off).min(sums.chunk_bytes) as usize;
    buf.resize(n, 0);
    let file = File::open(path).map_err(io_err("open", path))?;
    read_chunk(&file, path, r.gpa + off, buf, expected)
}

fn read_chunk(
    file: &File,
    path: &Path,
    gpa: u64,
    buf: &mut [u8],
    expected: u32,
) -> Result<(), FileError> {
    file.read_exact_at(buf, gpa).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FileError::Truncated {
            path: path.to_path_buf(),
            at: gpa,
            what: format!(
                "the chunk at guest address {gpa:#x} needs {} bytes",
                buf.len()
            ),
        },
        _ => io_err("read", path)(e),
    })?;
    let got = crc32fast::hash(buf);
    if got != expected {
        return Err(FileError::Checksum {
            path: path.to_path_buf(),
            location: format!(" in guest memory {gpa:#x}..{:#x}", gpa + buf.len() as u64),
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

/// Calls `each(region, chunk, gpa, len, expected, is_hole)` for every chunk of the file.
fn for_each_chunk(
    path: &Path,
    layout: &MemoryLayout,
    sums: &ChunkSums,
    mut each: impl FnMut(u64, usize, u32, bool) -> Result<(), FileError>,
) -> Result<(), FileError> {
    check_size(path, layout)?;
    if sums.crc32.len() != layout.regions.len() {
        return Err(crate::error::invalid(
            path,
            format!(
                "{} regions of checksums for {} regions of memory",
                sums.crc32.len(),
                layout.regions.len()
            ),
        ));
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
            ));
        }
        for (ci, expected) in region_sums.iter().enumerate() {
            let off = ci as u64 * sums.chunk_bytes;
            let n = (r.len - off).min(sums.chunk_bytes);
            let gpa = r.gpa + off;
            let hole = !has_data(&file, gpa, n).map_err(io_err("look for data in", path))?;
            each(gpa, n as usize, *expected, hole)?;
        }
    }
    Ok(())
}

/// Verifies every chunk of the file. Costs a read of the file's data; holes are checked
/// without reading them.
pub fn verify(path: &Path, layout: &MemoryLayout, sums: &ChunkSums) -> Result<(), FileError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let mut buf = Vec::new();
    for_each_chunk(path, layout, sums, |gpa, n, expected, hole| {
        if hole {
            return check_hole(path, gpa, n as u64, expected);
        }
        buf.resize(n, 0);
        read_chunk(&file, path, gpa, &mut buf, expected)
    })
}

/// Verifies guest memory mapped from the file (`slices`: `(gpa, memory)` per region)
/// against the file's chunk checksums, without copying: chunks that are holes in the file
/// are checked without touching the mapping.
pub fn verify_mapped(
    path: &Path,
    layout: &MemoryLayout,
    sums: &ChunkSums,
    slices: &[(u64, &[u8])],
) -> Result<(), FileError> {
    for_each_chunk(path, layout, sums, |gpa, n, expected, hole| {
        if hole {
            return check_hole(path, gpa, n as u64, expected);
        }
        let bytes = slices
            .iter()
            .find_map(|(start, s)| {
                let off = gpa.checked_sub(*start)? as usize;
                s.get(off..off + n)
            })
            .ok_or_else(|| {
                crate::error::invalid(
                    path,
                    format!("guest memory {gpa:#x}..{:#x} is not mapped", gpa + n as u64),
                )
            })?;
        let got = crc32fast::hash(bytes);
        if got != expected {
            return Err(FileError::Checksum {
                path: path.to_path_buf(),
                location: format!(" in guest memory {gpa:#x}..{:#x}", gpa + n as u64),
                expected,
                got,
            });
        }
        Ok(())
    })
}

/// Reads the file into the caller's memory, checking every chunk as it goes.
pub(crate) fn read_into(
    path: &Path,
    layout: &MemoryLayout,
    sums: &ChunkSums,
    targets: &mut [(u64, &mut [u8])],
) -> Result<(), crate::error::StoreError> {
    check_size(path, layout)?;
    let file = File::open(path).map_err(io_err("open", path))?;
    for (r, region_sums) in layout.regions.iter().zip(&sums.crc32) {
        for (ci, expected) in region_sums.iter().enumerate() {
            let off = ci as u64 * sums.chunk_bytes;
            let n = (r.len - off).min(sums.chunk_bytes);
            let gpa = r.gpa + off;
            let dst = target_range(targets, gpa, n).ok_or_else(|| {
                crate::error::StoreError::MemoryMismatch(format!(
                    "guest memory {gpa:#x}..{:#x} of the snapshot is not in the memory given",
                    gpa + n
                ))
            })?;
            read_chunk(&file, path, gpa, dst, *expected)?;
        }
    }
    Ok(())
}
