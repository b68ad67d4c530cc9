//! Guest memory owned by this process (anonymous mappings): what snapshot merge and restore
//! checks materialize into, and what tests use as a guest.
use crate::layout::MemoryLayout;
use crate::span::GuestSpan;
use crate::view::{locate, GuestMemory, MemoryError};

/// Guest memory in anonymous private mappings, one per region: zero and unallocated until
/// written, so a large layout costs only the pages used.
#[derive(Debug)]
pub struct OwnedMemory {
    layout: MemoryLayout,
    maps: Vec<(*mut u8, usize)>,
}

// SAFETY: the mappings are owned by this value and only reached through spans, whose
// accesses are raw copies (see `span`); sharing them across threads is what `GuestMemory`
// (Sync) promises for guest memory.
unsafe impl Send for OwnedMemory {}
// SAFETY: as for Send.
unsafe impl Sync for OwnedMemory {}

impl OwnedMemory {
    /// Zeroed memory for `layout`, refusing (instead of aborting) if it cannot be mapped.
    pub fn zeroed(layout: &MemoryLayout) -> Result<OwnedMemory, MemoryError> {
        let mut mem = OwnedMemory {
            layout: layout.clone(),
            maps: Vec::with_capacity(layout.regions.len()),
        };
        for r in &layout.regions {
            let len = usize::try_from(r.len).map_err(|_| MemoryError::outside(r.gpa, r.len))?;
            // SAFETY: a fresh anonymous mapping; no existing memory is affected.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(MemoryError {
                    gpa: r.gpa,
                    len: r.len,
                    reason: format!("cannot map: {}", std::io::Error::last_os_error()),
                });
            }
            mem.maps.push((ptr.cast(), len));
        }
        Ok(mem)
    }

    /// A copy of `src`'s contents (pages `src` knows to be zero are skipped).
    pub fn copy_of(src: &dyn GuestMemory) -> Result<OwnedMemory, MemoryError> {
        let mem = OwnedMemory::zeroed(src.layout())?;
        for r in &src.layout().regions {
            let chunk = 1u64 << 20;
            let mut off = 0;
            while off < r.len {
                let n = chunk.min(r.len - off);
                if !src.known_zero(r.gpa + off, n) {
                    mem.span(r.gpa + off, n)?
                        .copy_from_span(&src.span(r.gpa + off, n)?);
                }
                off += n;
            }
        }
        Ok(mem)
    }

    /// Every byte, region after region: for tests comparing two memories.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.layout.total_bytes() as usize];
        let mut at = 0;
        for r in &self.layout.regions {
            let n = r.len as usize;
            if let Ok(s) = self.span(r.gpa, r.len) {
                s.copy_to(&mut out[at..at + n]);
            }
            at += n;
        }
        out
    }
}

impl Drop for OwnedMemory {
    fn drop(&mut self) {
        for &(ptr, len) in &self.maps {
            // SAFETY: each mapping was made by `zeroed` with this length and is unmapped
            // once; no span outlives `self` (spans borrow it).
            unsafe { libc::munmap(ptr.cast(), len) };
        }
    }
}

impl GuestMemory for OwnedMemory {
    fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    fn span(&self, gpa: u64, len: u64) -> Result<GuestSpan<'_>, MemoryError> {
        let (i, off) = locate(&self.layout, gpa, len)?;
        let (ptr, _) = self.maps[i];
        // SAFETY: `off..off + len` lies inside region `i`, mapped at `ptr` for as long as
        // `self` lives, which bounds the span's lifetime.
        Ok(unsafe { GuestSpan::new(ptr.add(off as usize), len as usize) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_memory_reads_writes_and_copies() {
        let layout = MemoryLayout::new(&[(0, 0x4000), (1 << 32, 0x2000)]).unwrap();
        let m = OwnedMemory::zeroed(&layout).unwrap();
        m.write((1 << 32) + 8, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 3];
        m.read((1 << 32) + 8, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert!(m.read(0x4000, &mut b).is_err(), "in the hole");
        assert!(m.write(0x3fff, &[0, 0]).is_err(), "crosses a region's end");
        // Nothing copied: fine wherever (a driver's empty buffer; the vsock fuzz target
        // found a device failing on one).
        m.read(0x0060_0001_0000, &mut []).unwrap();
        m.write(u64::MAX, &[]).unwrap();
        m.store(0x10, 0xfeed_u64).unwrap();
        assert_eq!(m.load::<u64>(0x10).unwrap(), 0xfeed);
        let c = OwnedMemory::copy_of(&m).unwrap();
        assert_eq!(c.to_vec(), m.to_vec());
        m.write_zeros(1 << 32, 0x1000).unwrap();
        assert_ne!(c.to_vec(), m.to_vec());
    }
}
