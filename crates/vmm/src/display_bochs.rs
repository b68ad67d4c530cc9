//! A Bochs display device as one of the VM's displays: its size is the mode the guest
//! enabled (the configured size, black, while none is), its pixels are read out of its
//! VRAM, and its changes are found through the VRAM slot's dirty log (every tile is
//! compared while the log cannot tell: the slot unmapped, the dirty rings on, or
//! `RAY_DISPLAY_CHANGES=tile-compare`).
use std::sync::{Arc, Mutex};

use ray_devices::bochs::dispi::Mode;
use ray_devices::bochs::BochsHandle;
use ray_display::damage::{ChangeStats, Damage, TileClock, TileSet};
use ray_display::DisplayGeometry;
use ray_memory::PAGE_SIZE;

use crate::bochs::{BochsGpu, VramSlot};

pub struct BochsView {
    index: usize,
    gpu: usize,
    handle: BochsHandle,
    slot: Arc<Mutex<VramSlot>>,
    size: (u32, u32),
    stats: Arc<ChangeStats>,
    /// The tile clock and the mode it counts tiles of; None without the dirty log.
    clock: Option<Mutex<(Option<Mode>, TileClock)>>,
}

impl BochsView {
    /// Display `index`, of `b`; `tile_compare`: never ask the dirty log.
    pub fn new(index: usize, b: &BochsGpu, tile_compare: bool) -> Self {
        let stats = crate::metrics::display_changes(index);
        let logged = !tile_compare && crate::bochs::lock(&b.slot).logged();
        stats
            .dirty_log
            .store(logged, std::sync::atomic::Ordering::Relaxed);
        let mut view = Self {
            index,
            gpu: b.gpu,
            handle: b.handle.clone(),
            slot: b.slot.clone(),
            size: b.size,
            stats,
            clock: None,
        };
        if logged {
            let g = view.geometry();
            view.clock = Some(Mutex::new((b.handle.mode(), TileClock::new(&g))));
        }
        view
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn stats(&self) -> &Arc<ChangeStats> {
        &self.stats
    }

    /// Whether this view shows device `b`.
    pub fn shows(&self, b: &BochsGpu) -> bool {
        self.handle.same(&b.handle)
    }

    fn geometry_of(&self, mode: Option<Mode>) -> DisplayGeometry {
        let (width, height) = mode.map_or(self.size, |m| (m.width, m.height));
        let gpa = match (mode, crate::bochs::lock(&self.slot).address()) {
            (Some(m), Some(at)) => at + m.offset,
            _ => 0,
        };
        DisplayGeometry {
            index: self.index,
            gpu: self.gpu,
            gpa,
            width,
            height,
            stride: width * 4,
        }
    }

    pub fn geometry(&self) -> DisplayGeometry {
        self.geometry_of(self.handle.mode())
    }

    /// The picture now; black while no mode is enabled. False if `out` is not the size of
    /// the display now (it changed since the caller looked).
    pub fn read(&self, out: &mut [u8]) -> bool {
        match self.handle.mode() {
            Some(m) => self.handle.read(&m, out),
            None if out.len() == self.size.0 as usize * self.size.1 as usize * 4 => {
                out.fill(0);
                true
            }
            None => false,
        }
    }

    /// The tiles written since generation `since`, from the VRAM slot's dirty log.
    pub fn damage(&self, since: u64) -> Option<Damage> {
        let clock = self.clock.as_ref()?;
        let mut c = clock.lock().unwrap_or_else(|e| e.into_inner());
        let mode = self.handle.mode();
        let g = self.geometry_of(mode);
        if c.0 != mode {
            // A new mode: a new grid, every tile new to every viewer.
            *c = (mode, TileClock::after(&g, c.1.generation()));
        }
        let dirty = crate::bochs::lock(&self.slot).take_dirty();
        let Some(m) = mode else {
            // Black: nothing to find.
            c.1.advance(&TileSet::empty(g.width, g.height));
            return Some(c.1.since(since));
        };
        let bits = dirty?;
        // The picture's bytes in VRAM, as a geometry over VRAM offsets.
        let vram = DisplayGeometry {
            gpa: m.offset,
            stride: m.stride,
            ..g
        };
        let pages = bits.iter().enumerate().flat_map(|(w, &word)| {
            (0..64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| (w as u64 * 64 + b) * PAGE_SIZE)
        });
        let mut n = 0u64;
        let mut tiles = TileSet::empty(g.width, g.height);
        tiles.mark_pages(&vram, pages.inspect(|_| n += 1), PAGE_SIZE);
        self.stats
            .dirty_pages
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        c.1.advance(&tiles);
        Some(c.1.since(since))
    }
}
