//! [`GuestMemory`] over vm-memory's `GuestMemoryMmap`, the mapping the VMM holds.
//!
//! With vm-memory's `AtomicBitmap` backend, writes made through this view are marked in the
//! region's bitmap, which is how the VMM's own writes reach the dirty-log consumers.
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::layout::{MemoryLayout, Region};
use crate::span::GuestSpan;
use crate::view::{locate, GuestMemory, MemoryError};

/// The layout of a vm-memory map, region by region in address order.
pub fn layout_of<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> MemoryLayout {
    MemoryLayout {
        regions: mem
            .iter()
            .map(|r| Region {
                gpa: r.start_addr().0,
                len: r.len(),
            })
            .collect(),
    }
}

/// A view of a vm-memory map: its layout computed once, spans straight from its regions.
pub struct MappedMemory<'m, B: Bitmap + 'static> {
    mem: &'m GuestMemoryMmap<B>,
    layout: MemoryLayout,
}

impl<'m, B: Bitmap + 'static> MappedMemory<'m, B> {
    pub fn new(mem: &'m GuestMemoryMmap<B>) -> Self {
        Self {
            layout: layout_of(mem),
            mem,
        }
    }
}

/// The span of `gpa..gpa + len` in `mem` (whose layout is `layout`).
pub fn span_in<'m, B: Bitmap + 'static>(
    mem: &'m GuestMemoryMmap<B>,
    layout: &MemoryLayout,
    gpa: u64,
    len: u64,
) -> Result<GuestSpan<'m>, MemoryError> {
    let (i, off) = locate(layout, gpa, len)?;
    let region = mem
        .iter()
        .nth(i)
        .ok_or_else(|| MemoryError::outside(gpa, len))?;
    let base = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|e| MemoryError {
            gpa,
            len,
            reason: e.to_string(),
        })?;
    // SAFETY: `off..off + len` lies inside region `i`, which stays mapped as long as `mem`
    // is borrowed ('m).
    Ok(unsafe { GuestSpan::new(base.add(off as usize), len as usize) })
}

/// Marks `gpa..gpa + len` in the bitmap of the region of `mem` that holds it.
pub fn mark_in<B: Bitmap + 'static>(
    mem: &GuestMemoryMmap<B>,
    layout: &MemoryLayout,
    gpa: u64,
    len: u64,
) {
    if let Ok((i, off)) = locate(layout, gpa, len) {
        if let Some(r) = mem.iter().nth(i) {
            r.bitmap()
                .slice_at(0)
                .mark_dirty(off as usize, len as usize);
        }
    }
}

impl<B: Bitmap + Send + Sync + 'static> GuestMemory for MappedMemory<'_, B> {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }
    fn span(&self, gpa: u64, len: u64) -> Result<GuestSpan<'_>, MemoryError> {
        span_in(self.mem, &self.layout, gpa, len)
    }
    fn note_write(&self, gpa: u64, len: u64) {
        mark_in(self.mem, &self.layout, gpa, len)
    }
}

/// A view that shares ownership of its map: for a map its maker may replace while devices
/// still work on the old one (a vhost-user front end sending a new memory table). The
/// regions stay mapped until the last view is dropped.
pub struct SharedMappedMemory<B: Bitmap + 'static> {
    mem: Arc<GuestMemoryMmap<B>>,
    layout: MemoryLayout,
}

impl<B: Bitmap + 'static> SharedMappedMemory<B> {
    pub fn new(mem: Arc<GuestMemoryMmap<B>>) -> Self {
        Self {
            layout: layout_of(&mem),
            mem,
        }
    }
}

impl<B: Bitmap + Send + Sync + 'static> GuestMemory for SharedMappedMemory<B> {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }
    fn span(&self, gpa: u64, len: u64) -> Result<GuestSpan<'_>, MemoryError> {
        span_in(&self.mem, &self.layout, gpa, len)
    }
    fn note_write(&self, gpa: u64, len: u64) {
        mark_in(&self.mem, &self.layout, gpa, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::GuestAddress;

    #[test]
    fn writes_through_the_view_land_and_are_marked() {
        let mem: GuestMemoryMmap<AtomicBitmap> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(1 << 32), 0x4000),
        ])
        .unwrap();
        let view = MappedMemory::new(&mem);
        assert_eq!(view.layout().total_bytes(), 0x14000);
        view.write((1 << 32) + 0x1000, &[5u8; 16]).unwrap();
        let mut b = [0u8; 16];
        view.read((1 << 32) + 0x1000, &mut b).unwrap();
        assert_eq!(b, [5u8; 16]);
        let r = mem.iter().nth(1).unwrap();
        assert!(r.bitmap().dirty_at(0x1000), "the VMM's write is marked");
        assert!(!r.bitmap().dirty_at(0x2000));
        assert!(view.span(0x10000, 1).is_err());
    }

    #[test]
    fn a_shared_view_keeps_its_map_after_the_maker_drops_it() {
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x2000)]).unwrap(),
        );
        let view = SharedMappedMemory::new(mem.clone());
        drop(mem);
        view.write(0x2ff0, &[7u8; 16]).unwrap();
        let mut b = [0u8; 16];
        view.read(0x2ff0, &mut b).unwrap();
        assert_eq!(b, [7u8; 16]);
        assert!(view.span(0x0, 1).is_err(), "below the region");
        assert!(view.span(0x2ff0, 17).is_err(), "past the region's end");
    }
}
