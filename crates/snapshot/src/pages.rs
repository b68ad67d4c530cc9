//! Page sets: a page map (`pages.map`) and page data (`pages.bin`, or `pages.zst` when
//! compressed). Incremental snapshots keep the pages dirtied since their parent this way,
//! and compressed full snapshots keep all non-zero pages.
//!
//! The page map is a container (see `container`) whose payload is a list of runs, each
//! `gpa u64 | pages u32 | flags u32 | crc32 u32` (little endian, 20 bytes), sorted by
//! address. Flag bit 0 means "zero run": the pages were dirtied but are now zero, and have
//! no data. Other runs' data follows in the data file in map order, with its CRC32 in the
//! run, so a damaged byte is reported with its guest address. Runs are at most
//! `MAX_RUN_PAGES` long, which bounds both the map's overhead (20 bytes per run) and how
//! far apart checks are.
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::AtomicU64;

use ray_memory::{DirtyBitmap, GuestMemory, MemoryLayout, PAGE_SIZE};

use crate::container::{self, PAGEMAP_MAGIC};
use crate::error::{invalid, io_err, FileError, StoreError};
use crate::fsutil::{allocated_bytes, write_synced};
use crate::guest::{self, for_each_run};
use crate::manifest::FileInfo;

/// Longest run in the map (1 MiB of data).
pub const MAX_RUN_PAGES: u32 = 256;
const RUN_BYTES: usize = 20;
const FLAG_ZERO: u32 = 1;
/// zstd level 1: several hundred MB/s per core, and guest memory compresses well enough.
const ZSTD_LEVEL: i32 = 1;

/// One run of consecutive pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub gpa: u64,
    pub pages: u32,
    /// The pages are zero and have no data in the data file.
    pub zero: bool,
    /// CRC32 of the run's data (0 for a zero run).
    pub crc32: u32,
}

impl PageRun {
    pub fn bytes(&self) -> u64 {
        u64::from(self.pages) * PAGE_SIZE
    }
}

/// What writing a page set produced.
pub(crate) struct PagesWritten {
    pub map: FileInfo,
    pub data: FileInfo,
    /// Pages recorded (zero runs included).
    pub pages: u64,
}

/// Counts and hashes the bytes written through it, so the data file's CRC costs no
/// second pass, compressed or not.
struct CrcWriter<W> {
    inner: W,
    hasher: crc32fast::Hasher,
    bytes: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the page set of `memory` into `dir`.
///
/// With `dirty`, only dirty pages are recorded, zero ones as zero runs (the parent may
/// hold data there). Without, every non-zero page is recorded (a compressed full snapshot,
/// restored onto zeroed memory). Memory the view knows to be zero is not read; `progress`
/// counts the guest bytes done.
pub(crate) fn write(
    dir: &Path,
    memory: &dyn GuestMemory,
    dirty: Option<&DirtyBitmap>,
    data_name: &str,
    compress: bool,
    progress: Option<&AtomicU64>,
) -> Result<PagesWritten, FileError> {
    let layout = memory.layout();
    let data_path = dir.join(data_name);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&data_path)
        .map_err(io_err("create", &data_path))?;
    let counted = CrcWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: crc32fast::Hasher::new(),
        bytes: 0,
    };
    let mut out: Box<dyn Write> = if compress {
        let mut enc = zstd::stream::Encoder::new(counted, ZSTD_LEVEL)
            .map_err(io_err("start compressing", &data_path))?;
        enc.include_checksum(true)
            .map_err(io_err("start compressing", &data_path))?;
        Box::new(enc.auto_finish())
    } else {
        Box::new(counted)
    };
    let mut map = Vec::new();
    let mut pages = 0u64;
    let max_run = u64::from(MAX_RUN_PAGES);
    for (ri, r) in layout.regions.iter().enumerate() {
        // The selected pages as runs (first page, count) of this region.
        let selected: Box<dyn Iterator<Item = (u64, u64)>> = match dirty {
            Some(d) => match d.regions.get(ri) {
                Some(bits) => Box::new(bits.runs().map(|(p, n)| (p as u64, n as u64))),
                None => Box::new(std::iter::empty()),
            },
            None => Box::new(std::iter::once((0, r.pages()))),
        };
        for (first, count) in selected {
            // Dirty bits past the region's end (a bitmap built for another layout) are
            // not pages of it.
            let count = count.min(r.pages().saturating_sub(first));
            let mut p = first;
            while p < first + count {
                let n = (first + count - p).min(max_run);
                let gpa = r.gpa + p * PAGE_SIZE;
                pages += emit_runs(
                    memory,
                    &mut map,
                    &mut *out,
                    &data_path,
                    gpa,
                    n * PAGE_SIZE,
                    dirty.is_some(),
                )?;
                guest::advance(progress, n * PAGE_SIZE);
                p += n;
            }
        }
    }
    out.flush().map_err(io_err("write", &data_path))?;
    drop(out);
    // The writer chain is dropped (zstd finished its frame); reopen to fsync and measure.
    let file = File::open(&data_path).map_err(io_err("open", &data_path))?;
    file.sync_all().map_err(io_err("fsync", &data_path))?;
    let data_bytes = file.metadata().map_err(io_err("stat", &data_path))?.len();
    let data_crc = crc_file(&data_path)?;

    let map_path = dir.join(crate::manifest::PAGEMAP_FILE);
    let encoded = container::encode(PAGEMAP_MAGIC, &map);
    write_synced(&map_path, &encoded)?;
    Ok(PagesWritten {
        map: FileInfo {
            bytes: encoded.len() as u64,
            allocated_bytes: allocated_bytes(&map_path)?,
            crc32: Some(crc32fast::hash(&encoded)),
        },
        data: FileInfo {
            bytes: data_bytes,
            allocated_bytes: allocated_bytes(&data_path)?,
            crc32: Some(data_crc),
        },
        pages,
    })
}

/// Splits `gpa..gpa + len` into zero and non-zero runs, writes the non-zero data to
/// `out` straight from guest memory and appends the runs to `map`. Zero runs are recorded
/// only if `keep_zero`. Returns the pages recorded.
fn emit_runs(
    memory: &dyn GuestMemory,
    map: &mut Vec<u8>,
    out: &mut dyn Write,
    path: &Path,
    gpa: u64,
    len: u64,
    keep_zero: bool,
) -> Result<u64, FileError> {
    let mut recorded = 0;
    for_each_run(memory, path, gpa, len, |run_gpa, run_len, data| {
        let zero = data.is_none();
        let pages = (run_len / PAGE_SIZE) as u32;
        if !zero || keep_zero {
            let crc = data.map_or(0, |span| span.crc32());
            map.extend_from_slice(&run_gpa.to_le_bytes());
            map.extend_from_slice(&pages.to_le_bytes());
            map.extend_from_slice(&(if zero { FLAG_ZERO } else { 0 }).to_le_bytes());
            map.extend_from_slice(&crc.to_le_bytes());
            recorded += u64::from(pages);
        }
        if let Some(span) = data {
            span.write_all_to(&mut &mut *out)
                .map_err(io_err("write", path))?;
        }
        Ok(())
    })?;
    Ok(recorded)
}

fn crc_file(path: &Path) -> Result<u32, FileError> {
    let mut f = BufReader::with_capacity(1 << 20, File::open(path).map_err(io_err("open", path))?);
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// Reads and checks a page map against the guest memory layout it applies to.
pub fn read_map(path: &Path, layout: &MemoryLayout) -> Result<Vec<PageRun>, FileError> {
    let total_pages = layout.total_bytes() / PAGE_SIZE;
    let payload = container::read(path, PAGEMAP_MAGIC, total_pages * RUN_BYTES as u64)?;
    if !payload.len().is_multiple_of(RUN_BYTES) {
        return Err(invalid(
            path,
            format!(
                "its {} payload bytes are not whole 20-byte runs",
                payload.len()
            ),
        ));
    }
    let mut runs = Vec::with_capacity(payload.len() / RUN_BYTES);
    let mut prev_end = 0u64;
    for (i, b) in payload.chunks_exact(RUN_BYTES).enumerate() {
        let le32 = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut g = [0u8; 8];
        g.copy_from_slice(&b[..8]);
        let run = PageRun {
            gpa: u64::from_le_bytes(g),
            pages: le32(8),
            zero: le32(12) & FLAG_ZERO != 0,
            crc32: le32(16),
        };
        let flags = le32(12);
        let bad = if flags & !FLAG_ZERO != 0 {
            Some(format!("unknown flags {flags:#x}"))
        } else if run.pages == 0 || run.pages > MAX_RUN_PAGES {
            Some(format!(
                "{} pages (1 to {MAX_RUN_PAGES} allowed)",
                run.pages
            ))
        } else if !run.gpa.is_multiple_of(PAGE_SIZE) {
            Some("an address that is not 4 KiB aligned".into())
        } else if i > 0 && run.gpa < prev_end {
            Some(format!(
                "an address before the previous run's end {prev_end:#x}"
            ))
        } else if layout.find(run.gpa, run.bytes()).is_none() {
            Some("pages outside guest memory".into())
        } else {
            None
        };
        if let Some(why) = bad {
            return Err(invalid(
                path,
                format!("run {i} at guest address {:#x} has {why}", run.gpa),
            ));
        }
        prev_end = run.gpa + run.bytes();
        runs.push(run);
    }
    Ok(runs)
}

/// Reads a page set's data, checking each run's CRC and the data file's, and writes the
/// pages into `memory`, or only checks them if it is `None`. A run is written only once its
/// CRC has been checked; on error the memory is partly written. `fresh` says `memory` is
/// all zero already: zero pages are then not written at all.
pub(crate) fn apply(
    data_path: &Path,
    compressed: bool,
    runs: &[PageRun],
    expect: &FileInfo,
    memory: Option<&dyn GuestMemory>,
    fresh: bool,
) -> Result<(), StoreError> {
    let file = File::open(data_path).map_err(io_err("open", data_path))?;
    let mut counted = CrcReader {
        inner: BufReader::with_capacity(1 << 20, file),
        hasher: crc32fast::Hasher::new(),
    };
    let damaged = |e: std::io::Error, at: u64| -> FileError {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FileError::Truncated {
                path: data_path.to_path_buf(),
                at,
                what: "its page map lists more page data".into(),
            }
        } else if compressed {
            invalid(
                data_path,
                format!("its zstd data is damaged near uncompressed byte {at}: {e}"),
            )
        } else {
            io_err("read", data_path)(e)
        }
    };
    let mut scratch = vec![0u8; (u64::from(MAX_RUN_PAGES) * PAGE_SIZE) as usize];
    let mut pos = 0u64;
    {
        let mut input: Box<dyn Read + '_> = if compressed {
            Box::new(zstd::stream::Decoder::with_buffer(&mut counted).map_err(|e| damaged(e, 0))?)
        } else {
            Box::new(&mut counted)
        };
        for run in runs {
            let dst = match memory {
                Some(m) => Some(m.span(run.gpa, run.bytes()).map_err(|_| {
                    StoreError::MemoryMismatch(format!(
                        "the run at {:#x} ({} pages) in {} is not in the memory given",
                        run.gpa,
                        run.pages,
                        data_path.display()
                    ))
                })?),
                None => None,
            };
            if run.zero {
                if let (Some(m), Some(dst), false) = (memory, &dst, fresh) {
                    guest::zero(m, run.gpa, dst);
                }
                continue;
            }
            let n = run.bytes() as usize;
            if scratch.len() < n {
                scratch.resize(n, 0);
            }
            let data = &mut scratch[..n];
            input.read_exact(data).map_err(|e| damaged(e, pos))?;
            pos += run.bytes();
            let got = crc32fast::hash(data);
            if got != run.crc32 {
                return Err(FileError::Checksum {
                    path: data_path.to_path_buf(),
                    location: format!(" in the pages at guest address {:#x}", run.gpa),
                    expected: run.crc32,
                    got,
                }
                .into());
            }
            if let Some(dst) = &dst {
                guest::place(dst, data, fresh);
            }
        }
        let mut extra = [0u8; 1];
        match input.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => {
                return Err(invalid(
                    data_path,
                    format!("it has data beyond the {pos} bytes its page map lists"),
                )
                .into())
            }
            Err(e) => return Err(damaged(e, pos).into()),
        }
    }
    // Drain what the decoder did not need (zstd may stop at the frame's end), then compare
    // the whole file's CRC with the manifest's.
    std::io::copy(&mut counted, &mut std::io::sink()).map_err(io_err("read", data_path))?;
    let got = counted.hasher.finalize();
    if let Some(expected) = expect.crc32 {
        if got != expected {
            return Err(FileError::Checksum {
                path: data_path.to_path_buf(),
                location: String::new(),
                expected,
                got,
            }
            .into());
        }
    }
    Ok(())
}

struct CrcReader<R> {
    inner: R,
    hasher: crc32fast::Hasher,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl<R: std::io::BufRead> std::io::BufRead for CrcReader<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        if let Ok(b) = self.inner.fill_buf() {
            let n = amt.min(b.len());
            self.hasher.update(&b[..n]);
        }
        self.inner.consume(amt);
    }
}
