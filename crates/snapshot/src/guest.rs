//! How snapshots walk guest memory: through a `GuestMemory` view and its spans, in large
//! pieces, never reading what the view knows to be zero.
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use ray_memory::{GuestMemory, GuestSpan, MemoryError, PAGE_SIZE};

use crate::error::FileError;

/// What restores copy through at a time: a file read and its checksum stay in cache
/// before the bytes go on to guest memory.
pub(crate) const COPY_BYTES: usize = 1 << 20;

/// Zeros to feed checksums for memory that is not read (known to be zero).
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Feeds `len` zero bytes to `h`.
pub(crate) fn crc_zeros(h: &mut crc32fast::Hasher, mut len: u64) {
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// A guest memory access that failed while reading it for the file at `path`.
pub(crate) fn read_err(path: &Path) -> impl FnOnce(MemoryError) -> FileError + '_ {
    move |e| FileError::Io {
        op: "read guest memory for",
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    }
}

/// Splits `gpa..gpa + len` (whole pages inside one region) into its maximal runs of zero
/// pages and of non-zero pages, in order, calling `each(gpa, len, span)`: `span` is `None`
/// for a zero run, and the run's memory for a data run.
///
/// Pages `mem` knows to be zero are neither spanned nor read; every other page is read
/// once here for its zero check (and again by whoever consumes its data run).
pub(crate) fn for_each_run<'m>(
    mem: &'m dyn GuestMemory,
    path: &Path,
    gpa: u64,
    len: u64,
    mut each: impl FnMut(u64, u64, Option<GuestSpan<'m>>) -> Result<(), FileError>,
) -> Result<(), FileError> {
    if mem.known_zero(gpa, len) {
        return each(gpa, len, None);
    }
    let end = gpa + len;
    let page = PAGE_SIZE as usize;
    // The pending zero run's start: zero runs go on across known-zero pages and read ones.
    let mut zero_from: Option<u64> = None;
    let mut p = gpa;
    let mut p_known = None;
    while p < end {
        let known = p_known
            .take()
            .unwrap_or_else(|| mem.known_zero(p, PAGE_SIZE.min(end - p)));
        if known {
            zero_from.get_or_insert(p);
            p += PAGE_SIZE;
            continue;
        }
        // A stretch of pages that must be read: up to the next known-zero page.
        let mut q = p + PAGE_SIZE;
        while q < end {
            if mem.known_zero(q, PAGE_SIZE.min(end - q)) {
                p_known = Some(true);
                break;
            }
            q += PAGE_SIZE;
        }
        let q = q.min(end);
        let span = mem.span(p, q - p).map_err(read_err(path))?;
        let mut data_from: Option<usize> = None;
        let mut off = 0;
        while off < span.len() {
            let n = page.min(span.len() - off);
            let zero = span.sub(off, n).is_none_or(|s| s.is_zero());
            if zero {
                if let Some(d) = data_from.take() {
                    each(p + d as u64, (off - d) as u64, span.sub(d, off - d))?;
                }
                zero_from.get_or_insert(p + off as u64);
            } else {
                if let Some(z) = zero_from.take() {
                    each(z, p + off as u64 - z, None)?;
                }
                data_from.get_or_insert(off);
            }
            off += n;
        }
        if let Some(d) = data_from {
            each(
                p + d as u64,
                (span.len() - d) as u64,
                span.sub(d, span.len() - d),
            )?;
        }
        p = q;
    }
    if let Some(z) = zero_from {
        each(z, end - z, None)?;
    }
    Ok(())
}

/// Makes `span` (at `gpa` in `mem`) zero, leaving memory `mem` knows to be zero untouched
/// (not faulted in).
///
/// Restores write through spans, not `GuestMemory::write`: placing a snapshot's own
/// contents is not a change since that snapshot, so it is not reported to `note_write`.
pub(crate) fn zero(mem: &dyn GuestMemory, gpa: u64, span: &GuestSpan<'_>) {
    if !mem.known_zero(gpa, span.len() as u64) {
        span.fill(0);
    }
}

/// Makes all of `mem`'s regions zero, piece by piece so untouched parts stay untouched.
pub(crate) fn zero_all(mem: &dyn GuestMemory) -> Result<(), MemoryError> {
    let piece = (COPY_BYTES as u64) * 4;
    for r in &mem.layout().regions {
        let mut off = 0;
        while off < r.len {
            let n = piece.min(r.len - off);
            zero(mem, r.gpa + off, &mem.span(r.gpa + off, n)?);
            off += n;
        }
    }
    Ok(())
}

/// Copies `data` into `span`. Into `fresh` (all-zero) memory only non-zero pages are
/// copied, so pages the snapshot holds as zeros are not faulted in.
pub(crate) fn place(span: &GuestSpan<'_>, data: &[u8], fresh: bool) {
    if !fresh {
        span.copy_from(data);
        return;
    }
    let page = PAGE_SIZE as usize;
    let mut off = 0;
    while off < data.len() {
        let n = page.min(data.len() - off);
        let bytes = &data[off..off + n];
        if !ray_memory::is_zero(bytes) {
            if let Some(dst) = span.sub(off, n) {
                dst.copy_from(bytes);
            }
        }
        off += n;
    }
}

/// A `Write` at a position of a file, moving on as it writes: lets a span write itself
/// where its guest address says.
pub(crate) struct WriteAt<'f> {
    pub file: &'f File,
    pub offset: u64,
}

impl Write for WriteAt<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Adds to a progress counter, if there is one.
pub(crate) fn advance(progress: Option<&AtomicU64>, bytes: u64) {
    if let Some(p) = progress {
        p.fetch_add(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ray_memory::{MemoryLayout, OwnedMemory};

    /// Owned memory whose pages from `zero_from` on are known to be zero; spans over them
    /// are counted.
    struct Holey {
        inner: OwnedMemory,
        zero_from: u64,
        spanned: AtomicU64,
    }

    impl GuestMemory for Holey {
        fn layout(&self) -> &MemoryLayout {
            self.inner.layout()
        }
        fn span(&self, gpa: u64, len: u64) -> Result<GuestSpan<'_>, MemoryError> {
            if gpa + len > self.zero_from {
                self.spanned.fetch_add(1, Ordering::Relaxed);
            }
            self.inner.span(gpa, len)
        }
        fn known_zero(&self, gpa: u64, _len: u64) -> bool {
            gpa >= self.zero_from
        }
    }

    fn runs(mem: &dyn GuestMemory, gpa: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        for_each_run(mem, Path::new("x"), gpa, len, |g, l, s| {
            if let Some(s) = &s {
                assert_eq!(s.len() as u64, l);
                assert!(!s.sub(0, 4096).is_some_and(|p| p.is_zero()));
            }
            out.push((g, l, s.is_some()));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn runs_alternate_and_known_zero_pages_are_not_spanned() {
        let layout = MemoryLayout::new(&[(0x10000, 16 * 4096)]).unwrap();
        let mem = Holey {
            inner: OwnedMemory::zeroed(&layout).unwrap(),
            zero_from: 0x10000 + 12 * 4096,
            spanned: AtomicU64::new(0),
        };
        for page in [1u64, 2, 5, 11] {
            mem.inner.write(0x10000 + page * 4096 + 7, &[1]).unwrap();
        }
        let page = |p: u64| 0x10000 + p * 4096;
        assert_eq!(
            runs(&mem, 0x10000, 16 * 4096),
            vec![
                (page(0), 4096, false),
                (page(1), 2 * 4096, true),
                (page(3), 2 * 4096, false),
                (page(5), 4096, true),
                (page(6), 5 * 4096, false),
                (page(11), 4096, true),
                (page(12), 4 * 4096, false),
            ]
        );
        assert_eq!(mem.spanned.load(Ordering::Relaxed), 0);
        assert_eq!(
            runs(&mem, page(12), 4 * 4096),
            vec![(page(12), 4 * 4096, false)]
        );
        assert_eq!(runs(&mem, page(5), 4096), vec![(page(5), 4096, true)]);
        assert_eq!(mem.spanned.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn zero_crc_feeding_and_placing_into_fresh_memory() {
        let mut h = crc32fast::Hasher::new();
        crc_zeros(&mut h, 200_000);
        assert_eq!(h.finalize(), crc32fast::hash(&vec![0u8; 200_000]));
        let layout = MemoryLayout::new(&[(0, 4 * 4096)]).unwrap();
        let mem = OwnedMemory::zeroed(&layout).unwrap();
        let mut data = vec![0u8; 3 * 4096];
        data[4096 + 9] = 3;
        place(&mem.span(4096, 3 * 4096).unwrap(), &data, true);
        let mut want = vec![0u8; 4 * 4096];
        want[2 * 4096 + 9] = 3;
        assert_eq!(mem.to_vec(), want);
        mem.write(0, &[9; 4096 * 4]).unwrap();
        place(&mem.span(4096, 3 * 4096).unwrap(), &data, false);
        want[..4096].fill(9);
        assert_eq!(mem.to_vec(), want);
        zero_all(&mem).unwrap();
        assert_eq!(mem.to_vec(), vec![0u8; 4 * 4096]);
    }
}
