//! Dirty-block tracking for a live migration that copies the disk (`--copy-disks`).
//!
//! While tracking is on, every write, discard and write-zeroes marks the blocks it touched
//! in a bitmap of [`BLOCK_SIZE`] blocks, *after* the operation returned from the host
//! file; the migration sender takes the bitmap (fetch-and-clear, word by word) and reads
//! those blocks from the file *after* taking it. So no write is lost:
//!
//! - a write whose mark lands before the take is in the taken bitmap, and its bytes are in
//!   the file before the sender reads them (the operation completed before the mark, the
//!   read starts after the take);
//! - a write whose mark lands after the take (including one still in flight while the
//!   bitmap was taken, whose bytes the sender may or may not have read) is in the next
//!   bitmap and is sent again;
//! - a write that completed before tracking started is in the file before the first pass
//!   reads the whole disk (the start and the check in [`DirtyBlocks::mark`] are sequentially
//!   consistent: a mark that saw tracking off precedes the start, and so its write
//!   precedes the first pass's reads).
//!
//! A failed operation marks its blocks too: it may have changed part of them.
//!
//! Why 64 KiB blocks: the bitmap stays small (4,096 bits, 512 bytes, for a 256 MiB disk;
//! 2 MiB for 1 TiB, taken once per pre-copy pass), a run of dirty blocks becomes one large
//! read and one frame, and a guest's scattered 4 KiB writes cost at most 16 times their
//! size on the wire, which only matters for a guest that rewrites random sectors faster
//! than the link (the convergence then throttles it, as it does memory writers). Smaller
//! blocks send less for scattered writes but grow the bitmap and the per-block work;
//! larger ones amplify more.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ray_memory::PageBitmap;

use super::request::{Op, Request, SECTOR};

/// Bytes per tracked block.
pub const BLOCK_SIZE: u64 = 64 << 10;

/// The written blocks of one disk since the last [`take`](Self::take).
#[derive(Debug)]
pub struct DirtyBlocks {
    size: u64,
    tracking: AtomicBool,
    words: Box<[AtomicU64]>,
}

impl DirtyBlocks {
    /// A tracker, off, for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        let blocks = size.div_ceil(BLOCK_SIZE) as usize;
        Self {
            size,
            tracking: AtomicBool::new(false),
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Blocks of the disk (the last one may be short).
    pub fn blocks(&self) -> usize {
        self.size.div_ceil(BLOCK_SIZE) as usize
    }

    pub fn disk_size(&self) -> u64 {
        self.size
    }

    /// Clears the bitmap and starts marking: every operation that completes from now on
    /// is in a later [`take`](Self::take).
    pub fn start(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::SeqCst);
        }
        self.tracking.store(true, Ordering::SeqCst);
    }

    /// Stops marking and clears the bitmap.
    pub fn stop(&self) {
        self.tracking.store(false, Ordering::SeqCst);
        for w in self.words.iter() {
            w.store(0, Ordering::SeqCst);
        }
    }

    pub fn is_tracking(&self) -> bool {
        self.tracking.load(Ordering::SeqCst)
    }

    /// Marks the blocks of `len` bytes at `offset`; called after the operation on the
    /// host file returned. Bytes past the disk's end are ignored.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.tracking.load(Ordering::SeqCst) || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        let mut b = first;
        while b <= last {
            let word = (b / 64) as usize;
            let bit = b % 64;
            let n = (last - b + 1).min(64 - bit);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[word].fetch_or(mask, Ordering::SeqCst);
            b += n;
        }
    }

    /// Marks what `request` may have changed on the disk (a write's bytes, the ranges of a
    /// discard or write-zeroes); reads, flushes and GET_ID change nothing.
    pub fn mark_request(&self, request: &Request) {
        if !self.tracking.load(Ordering::SeqCst) {
            return;
        }
        let at = request.sector * SECTOR;
        match &request.op {
            Op::Write(segs) => self.mark(at, segs.iter().map(|s| u64::from(s.len)).sum()),
            Op::Discard(ranges) | Op::WriteZeroes { ranges, .. } => {
                for &(sector, count) in ranges {
                    self.mark(sector * SECTOR, u64::from(count) * SECTOR);
                }
            }
            Op::Read(_) | Op::Flush | Op::GetId(_) => {}
        }
    }

    /// The blocks marked since the last take, cleared atomically word by word: a mark is
    /// in exactly one take.
    pub fn take(&self) -> PageBitmap {
        let words = self
            .words
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect();
        PageBitmap::from_words(words, self.blocks())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn marks_cover_exactly_the_touched_blocks() {
        let d = DirtyBlocks::new(10 * BLOCK_SIZE + 512);
        assert_eq!(d.blocks(), 11);
        d.mark(0, 4096);
        assert!(d.take().is_clean(), "nothing is marked before start");
        d.start();
        d.mark(0, 1);
        d.mark(BLOCK_SIZE - 1, 2); // straddles blocks 0 and 1
        d.mark(5 * BLOCK_SIZE, BLOCK_SIZE); // exactly block 5
        d.mark(10 * BLOCK_SIZE, 512); // the short last block
        d.mark(11 * BLOCK_SIZE, 512); // past the end: ignored
        d.mark(3 * BLOCK_SIZE, 0); // empty: nothing
        let t = d.take();
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![0, 1, 5, 10]);
        assert!(d.take().is_clean(), "a take clears");
        d.stop();
        d.mark(0, 512);
        assert!(d.take().is_clean(), "nothing is marked after stop");
    }

    #[test]
    fn long_ranges_set_whole_words() {
        let d = DirtyBlocks::new(300 * BLOCK_SIZE);
        d.start();
        d.mark(3 * BLOCK_SIZE + 7, 200 * BLOCK_SIZE);
        let t = d.take();
        assert_eq!(t.count(), 201);
        assert_eq!(t.iter().next(), Some(3));
        assert_eq!(t.iter().last(), Some(203));
        d.mark(0, u64::MAX);
        assert_eq!(d.take().count(), 300, "an overlong range stops at the end");
    }

    #[test]
    fn concurrent_marks_land_in_exactly_one_take() {
        // Writers mark their own distinct blocks once each while a reader keeps taking:
        // every block must show up in exactly one of the takes.
        let d = Arc::new(DirtyBlocks::new(4096 * BLOCK_SIZE));
        d.start();
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for b in (t..4096).step_by(4) {
                        d.mark(b * BLOCK_SIZE, 512);
                    }
                })
            })
            .collect();
        let mut seen = vec![0u32; 4096];
        let mut done = false;
        while !done {
            done = writers.iter().all(|w| w.is_finished());
            for b in d.take().iter() {
                seen[b] += 1;
            }
        }
        for w in writers {
            w.join().unwrap();
        }
        for b in d.take().iter() {
            seen[b] += 1;
        }
        assert!(
            seen.iter().all(|&n| n == 1),
            "{:?}",
            seen.iter().filter(|&&n| n != 1).count()
        );
    }
}
