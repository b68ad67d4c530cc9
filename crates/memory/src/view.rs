//! [`GuestMemory`]: the one view of guest memory that snapshot, migration, devices and
//! display use, whoever owns the memory (the VMM's `MemoryManager`, a heap copy, a test).
use crate::layout::MemoryLayout;
use crate::span::GuestSpan;

/// A guest memory access outside the map, or one the backend refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("guest memory access of {len} bytes at {gpa:#x} failed: {reason}")]
pub struct MemoryError {
    pub gpa: u64,
    pub len: u64,
    pub reason: String,
}

impl MemoryError {
    pub fn outside(gpa: u64, len: u64) -> Self {
        MemoryError {
            gpa,
            len,
            reason: "the range is not inside one region of guest memory".into(),
        }
    }
}

/// Guest memory, shared with running vCPUs (hence `&self` and `Sync`).
///
/// Implementors provide the layout and spans; reads, writes and zero fills come with it.
/// Writes through this view are the VMM's own (a device's DMA, a loader, a migration
/// target placing pages): KVM's dirty log does not see them, so they are reported through
/// [`note_write`](Self::note_write) for the dirty-log consumers.
pub trait GuestMemory: Sync {
    /// Every region, in a fixed order; dirty bitmaps follow the same order.
    fn layout(&self) -> &MemoryLayout;

    /// The host span over `gpa..gpa + len`, which must lie inside one region.
    fn span(&self, gpa: u64, len: u64) -> Result<GuestSpan<'_>, MemoryError>;

    /// Whether `gpa..gpa + len` is known to hold only zeros without reading it (memory the
    /// guest never touched). Readers skip such ranges, so they are never faulted in.
    /// `false` is always correct.
    fn known_zero(&self, gpa: u64, len: u64) -> bool {
        let _ = (gpa, len);
        false
    }

    /// Records that the VMM wrote `gpa..gpa + len` (not a vCPU; the dirty log misses it).
    fn note_write(&self, gpa: u64, len: u64) {
        let _ = (gpa, len);
    }

    /// A hint that `gpa..gpa + len` is about to be written wholesale (a migration target
    /// filling a run of pages from the socket): a backend may allocate the pages in one
    /// call instead of one fault each. Default: nothing.
    fn prepare_write(&self, gpa: u64, len: u64) {
        let _ = (gpa, len);
    }

    /// Copies `buf.len()` bytes at `gpa` into `buf`. Copying nothing succeeds at any
    /// address (a driver's zero-length buffer may name any).
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.span(gpa, buf.len() as u64)?.copy_to(buf);
        Ok(())
    }

    /// Copies `data` to `gpa`; like [`GuestMemory::read`], nothing at any address.
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        if data.is_empty() {
            return Ok(());
        }
        self.span(gpa, data.len() as u64)?.copy_from(data);
        self.note_write(gpa, data.len() as u64);
        Ok(())
    }

    /// Makes `gpa..gpa + len` zero. Memory known to be zero already is left untouched (not
    /// faulted in).
    fn write_zeros(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let span = self.span(gpa, len)?;
        if !self.known_zero(gpa, len) {
            span.fill(0);
            self.note_write(gpa, len);
        }
        Ok(())
    }

    /// Reads one plain value at `gpa` (volatile; it may straddle no region boundary).
    fn load<T: crate::span::Pod>(&self, gpa: u64) -> Result<T, MemoryError>
    where
        Self: Sized,
    {
        let len = std::mem::size_of::<T>() as u64;
        self.span(gpa, len)?
            .load(0)
            .ok_or_else(|| MemoryError::outside(gpa, len))
    }

    /// Writes one plain value at `gpa` (volatile).
    fn store<T: crate::span::Pod>(&self, gpa: u64, value: T) -> Result<(), MemoryError>
    where
        Self: Sized,
    {
        let len = std::mem::size_of::<T>() as u64;
        self.span(gpa, len)?.store(0, value);
        self.note_write(gpa, len);
        Ok(())
    }
}

/// A reference or a shared pointer to guest memory is guest memory too.
macro_rules! forward {
    ($($t:ty => [$($bound:tt)+]),*) => { $(
        impl<M: $($bound)+ + ?Sized> GuestMemory for $t {
            fn layout(&self) -> &MemoryLayout {
                (**self).layout()
            }
            fn span(&self, gpa: u64, len: u64) -> Result<GuestSpan<'_>, MemoryError> {
                (**self).span(gpa, len)
            }
            fn known_zero(&self, gpa: u64, len: u64) -> bool {
                (**self).known_zero(gpa, len)
            }
            fn note_write(&self, gpa: u64, len: u64) {
                (**self).note_write(gpa, len)
            }
            fn prepare_write(&self, gpa: u64, len: u64) {
                (**self).prepare_write(gpa, len)
            }
        }
    )* };
}
forward!(&M => [GuestMemory], std::sync::Arc<M> => [GuestMemory + Send]);

/// Finds the region of `layout` holding `gpa..gpa + len` and returns (region index, offset
/// into it): the lookup every implementor of [`GuestMemory::span`] starts with.
pub fn locate(layout: &MemoryLayout, gpa: u64, len: u64) -> Result<(usize, u64), MemoryError> {
    layout
        .find(gpa, len)
        .map(|i| (i, gpa - layout.regions[i].gpa))
        .ok_or_else(|| MemoryError::outside(gpa, len))
}
