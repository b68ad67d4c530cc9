//! Which tiles of a display may have changed: the dirty log's pages mapped onto the
//! [`TILE`]-pixel grid of a framebuffer in guest memory.
//!
//! A framebuffer of `height` lines of `stride` bytes (`width` pixels of 4 bytes used in each)
//! lies at `gpa`. A page written since the last look covers a range of its bytes; those
//! bytes are pixels of one or more lines, and the tiles holding those pixels are the ones a
//! viewer must compare again. Bytes of a line's padding (past `width` pixels) are no
//! pixel: a page holding only padding marks nothing.
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::layout::DisplayGeometry;
use crate::rfb::Rect;

/// Edge of the tiles change detection compares, in pixels.
pub const TILE: u16 = 64;

/// A set of tiles of one display, row-major over its `cols` x `rows` grid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TileSet {
    cols: u32,
    rows: u32,
    words: Vec<u64>,
}

impl TileSet {
    /// No tile of a `width` x `height` display.
    pub fn empty(width: u32, height: u32) -> Self {
        let cols = width.div_ceil(u32::from(TILE));
        let rows = height.div_ceil(u32::from(TILE));
        Self {
            cols,
            rows,
            words: vec![0; (cols as usize * rows as usize).div_ceil(64)],
        }
    }

    /// Every tile of a `width` x `height` display.
    pub fn full(width: u32, height: u32) -> Self {
        let mut s = Self::empty(width, height);
        for i in 0..s.len() {
            s.words[i / 64] |= 1 << (i % 64);
        }
        s
    }

    /// Tiles in the grid.
    pub fn len(&self) -> usize {
        self.cols as usize * self.rows as usize
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// (columns, rows) of the grid.
    pub fn grid(&self) -> (u32, u32) {
        (self.cols, self.rows)
    }

    pub fn count(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    pub fn insert(&mut self, col: u32, row: u32) {
        if col < self.cols && row < self.rows {
            let i = (row * self.cols + col) as usize;
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    pub fn remove(&mut self, col: u32, row: u32) {
        if col < self.cols && row < self.rows {
            let i = (row * self.cols + col) as usize;
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }

    pub fn contains(&self, col: u32, row: u32) -> bool {
        col < self.cols && row < self.rows && {
            let i = (row * self.cols + col) as usize;
            self.words[i / 64] & (1 << (i % 64)) != 0
        }
    }

    /// Adds columns `c0..=c1` of row `row` (clipped to the grid).
    fn insert_cols(&mut self, row: u32, c0: u32, c1: u32) {
        for c in c0..=c1.min(self.cols.saturating_sub(1)) {
            self.insert(c, row);
        }
    }

    /// Adds `other`'s tiles; false (nothing added) if its grid is not this one's.
    pub fn union(&mut self, other: &TileSet) -> bool {
        if (other.cols, other.rows) != (self.cols, self.rows) {
            return false;
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        true
    }

    /// Removes every tile that lies wholly inside `r`.
    pub fn remove_within(&mut self, r: Rect, width: u32, height: u32) {
        let t = u32::from(TILE);
        for row in 0..self.rows {
            for col in 0..self.cols {
                let (x0, y0) = (col * t, row * t);
                let (x1, y1) = ((x0 + t).min(width), (y0 + t).min(height));
                let inside = x0 >= u32::from(r.x)
                    && y0 >= u32::from(r.y)
                    && x1 <= u32::from(r.x) + u32::from(r.w)
                    && y1 <= u32::from(r.y) + u32::from(r.h);
                if inside {
                    self.remove(col, row);
                }
            }
        }
    }

    /// Whether any tile of the set touches `r`.
    pub fn touches(&self, r: Rect) -> bool {
        if r.w == 0 || r.h == 0 {
            return false;
        }
        let t = u32::from(TILE);
        let (c0, c1) = (
            u32::from(r.x) / t,
            (u32::from(r.x) + u32::from(r.w) - 1) / t,
        );
        let (r0, r1) = (
            u32::from(r.y) / t,
            (u32::from(r.y) + u32::from(r.h) - 1) / t,
        );
        (r0..=r1).any(|row| (c0..=c1).any(|col| self.contains(col, row)))
    }

    /// Adds every tile that `r` touches.
    pub fn insert_rect(&mut self, r: Rect) {
        if r.w == 0 || r.h == 0 {
            return;
        }
        let t = u32::from(TILE);
        let (c0, c1) = (
            u32::from(r.x) / t,
            (u32::from(r.x) + u32::from(r.w) - 1) / t,
        );
        for row in u32::from(r.y) / t..=(u32::from(r.y) + u32::from(r.h) - 1) / t {
            if row < self.rows {
                self.insert_cols(row, c0, c1);
            }
        }
    }

    /// Marks the tiles holding pixels of bytes `offset..offset + len` of `g`'s framebuffer
    /// (offsets from its first byte; bytes outside it are ignored).
    pub fn mark_bytes(&mut self, g: &DisplayGeometry, offset: u64, len: u64) {
        let stride = u64::from(g.stride);
        let line = u64::from(g.width) * 4;
        let total = stride * u64::from(g.height);
        if len == 0 || stride == 0 || line == 0 || offset >= total {
            return;
        }
        let end = (offset + len).min(total);
        let t = u64::from(TILE);
        let (y0, y1) = (offset / stride, (end - 1) / stride);
        // The first and last lines may be touched in part; the lines between wholly.
        let mark_line_part = |set: &mut TileSet, y: u64, from: u64, to: u64| {
            // Bytes `from..to` of line `y` (to exclusive); the pixels among them.
            let to = to.min(line);
            if from >= to {
                return;
            }
            set.insert_cols(
                (y / t) as u32,
                (from / 4 / t) as u32,
                ((to - 1) / 4 / t) as u32,
            );
        };
        if y0 == y1 {
            mark_line_part(self, y0, offset % stride, (end - 1) % stride + 1);
            return;
        }
        mark_line_part(self, y0, offset % stride, stride);
        mark_line_part(self, y1, 0, (end - 1) % stride + 1);
        let cols = self.cols;
        // Tile rows wholly covered by the lines between (each such line: every column).
        let (first, last) = (y0 + 1, y1 - 1);
        if first <= last {
            for row in first / t..=last / t {
                self.insert_cols(row as u32, 0, cols.saturating_sub(1));
            }
        }
    }

    /// Marks the tiles of `g` that page-aligned pages at `gpas` (guest-physical, each
    /// `page` bytes) hold pixels of.
    pub fn mark_pages(&mut self, g: &DisplayGeometry, gpas: impl Iterator<Item = u64>, page: u64) {
        let start = g.gpa;
        let end = g.gpa + g.bytes() as u64;
        for p in gpas {
            if p + page <= start || p >= end {
                continue;
            }
            let from = p.max(start) - start;
            let to = (p + page).min(end) - start;
            self.mark_bytes(g, from, to - from);
        }
    }
}

/// What may have changed on a display since a generation a viewer saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The generation now: pass it as `since` next time.
    pub generation: u64,
    /// Tiles written after `since`.
    pub tiles: TileSet,
}

/// Per-tile generations of one display: the source's side of [`Damage`]. Generation 0
/// means "never looked": every tile is damaged for it.
#[derive(Clone, Debug)]
pub struct TileClock {
    generation: u64,
    cols: u32,
    rows: u32,
    /// Generation at which each tile was last written.
    tiles: Vec<u64>,
}

impl TileClock {
    /// A clock for `g`: every tile written at generation 1.
    pub fn new(g: &DisplayGeometry) -> Self {
        let set = TileSet::empty(g.width, g.height);
        let (cols, rows) = set.grid();
        Self {
            generation: 1,
            cols,
            rows,
            tiles: vec![1; set.len()],
        }
    }

    /// A clock for `g` that goes on from a clock (of another size) at `generation`: every
    /// tile written in the generation after it, so that no viewer misses one.
    pub fn after(g: &DisplayGeometry, generation: u64) -> Self {
        let mut c = Self::new(g);
        c.generation = generation.max(1) + 1;
        c.tiles.fill(c.generation);
        c
    }

    /// The generation now.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Starts a new generation in which the tiles of `written` were written.
    pub fn advance(&mut self, written: &TileSet) {
        self.generation += 1;
        if written.grid() != (self.cols, self.rows) {
            self.tiles.fill(self.generation);
            return;
        }
        for row in 0..self.rows {
            for col in 0..self.cols {
                if written.contains(col, row) {
                    self.tiles[(row * self.cols + col) as usize] = self.generation;
                }
            }
        }
    }

    /// The tiles written after generation `since`.
    pub fn since(&self, since: u64) -> Damage {
        let mut tiles = TileSet {
            cols: self.cols,
            rows: self.rows,
            words: vec![0; (self.cols as usize * self.rows as usize).div_ceil(64)],
        };
        for row in 0..self.rows {
            for col in 0..self.cols {
                if self.tiles[(row * self.cols + col) as usize] > since {
                    tiles.insert(col, row);
                }
            }
        }
        Damage {
            generation: self.generation,
            tiles,
        }
    }
}

/// One display's change-detection counts (metrics and `ray gpu status`).
#[derive(Debug, Default)]
pub struct ChangeStats {
    /// Whether the dirty log drives it (else every tile is compared).
    pub dirty_log: AtomicBool,
    pub dirty_pages: AtomicU64,
    pub looks: AtomicU64,
    pub tiles_examined: AtomicU64,
    pub tiles_changed: AtomicU64,
    pub last_examined: AtomicU32,
    pub last_changed: AtomicU32,
}

impl ChangeStats {
    /// Counts one look that compared `examined` tiles, `changed` of which differed.
    pub fn look(&self, examined: u32, changed: u32) {
        if examined == 0 {
            return;
        }
        self.looks.fetch_add(1, Ordering::Relaxed);
        self.tiles_examined
            .fetch_add(u64::from(examined), Ordering::Relaxed);
        self.tiles_changed
            .fetch_add(u64::from(changed), Ordering::Relaxed);
        self.last_examined.store(examined, Ordering::Relaxed);
        self.last_changed.store(changed, Ordering::Relaxed);
    }

    pub fn report(&self) -> ray_api::gpu::ChangeDetection {
        ray_api::gpu::ChangeDetection {
            mode: if self.dirty_log.load(Ordering::Relaxed) {
                "dirty-log"
            } else {
                "tile-compare"
            }
            .into(),
            dirty_pages: self.dirty_pages.load(Ordering::Relaxed),
            looks: self.looks.load(Ordering::Relaxed),
            tiles_examined: self.tiles_examined.load(Ordering::Relaxed),
            tiles_changed: self.tiles_changed.load(Ordering::Relaxed),
            last_tiles_examined: self.last_examined.load(Ordering::Relaxed),
            last_tiles_changed: self.last_changed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(width: u32, height: u32, stride: u32) -> DisplayGeometry {
        DisplayGeometry {
            index: 0,
            gpu: 0,
            gpa: 0x10_0000,
            width,
            height,
            stride,
        }
    }

    #[test]
    fn a_clock_after_a_resize_shows_every_tile_to_every_viewer() {
        let mut old = TileClock::new(&geometry(640, 480, 2560));
        for _ in 0..5 {
            old.advance(&TileSet::empty(640, 480));
        }
        let seen = old.generation();
        let new = TileClock::after(&geometry(800, 600, 3200), seen);
        assert!(new.generation() > seen);
        let d = new.since(seen);
        assert_eq!(d.tiles.grid(), TileSet::empty(800, 600).grid());
        assert_eq!(d.tiles.count() as usize, d.tiles.len(), "every tile");
        assert!(new.since(new.generation()).tiles.is_empty());
    }

    fn tiles(s: &TileSet) -> Vec<(u32, u32)> {
        let (cols, rows) = s.grid();
        (0..rows)
            .flat_map(|r| (0..cols).map(move |c| (c, r)))
            .filter(|&(c, r)| s.contains(c, r))
            .collect()
    }

    #[test]
    fn a_page_maps_to_the_tiles_of_its_pixels_at_edges_and_strides() {
        // 640x480, no padding: a line is 2560 bytes, a page 1.6 lines.
        let g = geometry(640, 480, 2560);
        let mut s = TileSet::empty(640, 480);
        assert_eq!(s.grid(), (10, 8));
        s.mark_pages(&g, std::iter::once(g.gpa), 4096);
        // Line 0 whole, line 1 up to byte 1535 (pixel 383): tiles 0..=9 of tile row 0.
        assert_eq!(tiles(&s), (0..10).map(|c| (c, 0)).collect::<Vec<_>>());
        // The framebuffer's last page: the end of the last line, in the last tile row.
        let mut s = TileSet::empty(640, 480);
        let last = g.gpa + (g.bytes() as u64 - 1) / 4096 * 4096;
        s.mark_pages(&g, std::iter::once(last), 4096);
        assert!(tiles(&s).iter().all(|&(_, r)| r == 7), "{:?}", tiles(&s));
        assert!(s.contains(9, 7));
        // Pages before and after the framebuffer mark nothing.
        let mut s = TileSet::empty(640, 480);
        s.mark_pages(
            &g,
            [
                g.gpa - 4096,
                g.gpa + g.bytes().next_multiple_of(4096) as u64,
            ]
            .into_iter(),
            4096,
        );
        assert!(s.is_empty());

        // 100x300 with a stride of 4096 (padding of 3696 bytes a line): a page is one line,
        // pixels 0..99 only: tile (0, row) and (1, row).
        let g = geometry(100, 300, 4096);
        let mut s = TileSet::empty(100, 300);
        s.mark_pages(&g, std::iter::once(g.gpa + 70 * 4096), 4096);
        assert_eq!(tiles(&s), vec![(0, 1), (1, 1)]);
        // Bytes of padding only mark nothing; a byte of pixel 64 marks tile column 1.
        let mut s = TileSet::empty(100, 300);
        s.mark_bytes(&g, 400, 3000);
        assert!(s.is_empty());
        s.mark_bytes(&g, 4096 * 5 + 64 * 4, 1);
        assert_eq!(tiles(&s), vec![(1, 0)]);

        // A range over three lines: the middle one wholly; partial first and last lines.
        let g = geometry(256, 256, 1024);
        let mut s = TileSet::empty(256, 256);
        s.mark_bytes(&g, 63 * 1024 + 1020, 1024 + 8);
        assert_eq!(tiles(&s), vec![(3, 0), (0, 1), (1, 1), (2, 1), (3, 1)]);
        // A framebuffer not starting on a page: a page straddling its start.
        let mut g = geometry(64, 64, 256);
        g.gpa = 0x10_0800;
        let mut s = TileSet::empty(64, 64);
        s.mark_pages(&g, std::iter::once(0x10_0000), 4096);
        assert_eq!(tiles(&s), vec![(0, 0)]);
    }

    #[test]
    fn the_clock_hands_every_viewer_the_tiles_written_since_its_own_look() {
        let g = geometry(256, 128, 1024);
        let mut clock = TileClock::new(&g);
        let first = clock.since(0);
        assert_eq!(first.tiles.count(), 8, "a first look sees everything");
        let a = first.generation;
        let mut w = TileSet::empty(256, 128);
        w.insert(1, 0);
        clock.advance(&w);
        let b = clock.since(a).generation;
        let mut w2 = TileSet::empty(256, 128);
        w2.insert(3, 1);
        clock.advance(&w2);
        // A viewer that looked at `a` gets both; one that looked at `b` the second only.
        assert_eq!(tiles(&clock.since(a).tiles), vec![(1, 0), (3, 1)]);
        assert_eq!(tiles(&clock.since(b).tiles), vec![(3, 1)]);
        let now = clock.since(b).generation;
        clock.advance(&TileSet::empty(256, 128));
        assert!(clock.since(now).tiles.is_empty(), "idle: nothing");
        // A written set of another grid (a resize) damages everything.
        let now = clock.since(0).generation;
        clock.advance(&TileSet::empty(64, 64));
        assert_eq!(clock.since(now).tiles.count(), 8);
    }

    #[test]
    fn tile_sets_union_and_clear_by_rectangle() {
        let mut s = TileSet::full(200, 100);
        assert_eq!((s.grid(), s.count()), ((4, 2), 8));
        s.remove_within(
            Rect {
                x: 0,
                y: 0,
                w: 200,
                h: 64,
            },
            200,
            100,
        );
        assert_eq!(tiles(&s), vec![(0, 1), (1, 1), (2, 1), (3, 1)]);
        // A rectangle covering a tile in part leaves it.
        s.remove_within(
            Rect {
                x: 0,
                y: 64,
                w: 128,
                h: 36,
            },
            200,
            100,
        );
        assert_eq!(tiles(&s), vec![(2, 1), (3, 1)]);
        let mut t = TileSet::empty(200, 100);
        t.insert_rect(Rect {
            x: 63,
            y: 0,
            w: 2,
            h: 1,
        });
        assert_eq!(tiles(&t), vec![(0, 0), (1, 0)]);
        assert!(t.touches(Rect {
            x: 64,
            y: 63,
            w: 1,
            h: 1
        }));
        assert!(!t.touches(Rect {
            x: 128,
            y: 0,
            w: 72,
            h: 100
        }));
        assert!(s.union(&t));
        assert_eq!(s.count(), 4);
        assert!(!s.union(&TileSet::empty(64, 64)), "another grid");
    }
}
