//! Guest memory: the VMM's view of guest RAM.
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress};

/// Guest memory as the VMM holds it. The bitmap records every write the VMM itself makes
/// (device DMA, loader, doorbells) so snapshots and migration can merge it with KVM's log.
pub type GuestMem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Name of the memfd behind guest RAM; `/proc/<pid>/smaps` shows it as
/// `/memfd:ray-guest-ram`, which is how the VMM's own footprint is told apart from guest pages.
pub const GUEST_RAM_NAME: &str = "ray-guest-ram";

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the memfd for {bytes} bytes of guest RAM: {source}")]
    Memfd { bytes: u64, source: std::io::Error },
    #[error("cannot map {bytes} bytes of guest RAM: {reason}")]
    Map { bytes: u64, reason: String },
}

/// Allocates guest RAM for `regions` (guest-physical start, length), backed by one memfd
/// laid out region after region. Pages are allocated on first touch.
pub fn create(regions: &[(GuestAddress, usize)]) -> Result<GuestMem, MemoryError> {
    let bytes: u64 = regions.iter().map(|r| r.1 as u64).sum();
    let name = c"ray-guest-ram";
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new fd or -1;
    // no memory of ours is touched.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd {
            bytes,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(bytes)
        .map_err(|source| MemoryError::Memfd { bytes, source })?;
    let mut offset = 0u64;
    let mut ranges = Vec::with_capacity(regions.len());
    for &(gpa, len) in regions {
        let f = file
            .try_clone()
            .map_err(|source| MemoryError::Memfd { bytes, source })?;
        ranges.push((gpa, len, Some(FileOffset::new(f, offset))));
        offset += len as u64;
    }
    GuestMem::from_ranges_with_files(ranges).map_err(|e| MemoryError::Map {
        bytes,
        reason: e.to_string(),
    })
}

/// The host view of every guest RAM region: (guest-physical start, host slice).
///
/// # Safety
/// The caller must ensure no vCPU writes guest memory while the slices are used (the VM is
/// paused), or accept reading pages mid-write (as pre-copy migration does, and re-sends).
pub unsafe fn host_slices(mem: &GuestMem) -> Vec<(u64, &[u8])> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    mem.iter()
        .map(|r| {
            let ptr = r
                .get_host_address(MemoryRegionAddress(0))
                .expect("offset 0 lies inside every mapped region");
            // SAFETY: the region maps `len` bytes at `ptr` for as long as `mem` lives, which
            // bounds the returned lifetime; the caller vouches for concurrent writers.
            let slice = unsafe { std::slice::from_raw_parts(ptr as *const u8, r.len() as usize) };
            (r.start_addr().0, slice)
        })
        .collect()
}

/// Like `host_slices`, writable: for laying a snapshot's pages into memory.
///
/// # Safety
/// Nothing else may read or write guest memory while the slices live (no vCPU runs, no
/// other slices of `mem` exist).
#[allow(clippy::mut_from_ref)]
pub unsafe fn host_slices_mut(mem: &GuestMem) -> Vec<(u64, &mut [u8])> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    mem.iter()
        .map(|r| {
            let ptr = r
                .get_host_address(MemoryRegionAddress(0))
                .expect("offset 0 lies inside every mapped region");
            // SAFETY: the region maps `len` writable bytes at `ptr` for as long as `mem`
            // lives; the caller guarantees these are the only references to it.
            let slice = unsafe { std::slice::from_raw_parts_mut(ptr, r.len() as usize) };
            (r.start_addr().0, slice)
        })
        .collect()
}

/// Maps guest RAM privately from a file laid out by guest-physical address (a snapshot's
/// memory file): pages are read on first touch and copied on first write, so the cost of
/// restoring does not grow with the guest's size.
pub fn from_file(
    regions: &[(GuestAddress, usize)],
    path: &std::path::Path,
) -> Result<GuestMem, MemoryError> {
    use vm_memory::mmap::{GuestRegionMmap, MmapRegionBuilder};
    let bytes: u64 = regions.iter().map(|r| r.1 as u64).sum();
    let file = File::open(path).map_err(|source| MemoryError::Memfd { bytes, source })?;
    let mut mapped = Vec::with_capacity(regions.len());
    for &(gpa, len) in regions {
        let f = file
            .try_clone()
            .map_err(|source| MemoryError::Memfd { bytes, source })?;
        use vm_memory::bitmap::NewBitmap;
        let region = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(FileOffset::new(f, gpa.0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Map {
                bytes,
                reason: e.to_string(),
            })?;
        let region = GuestRegionMmap::new(region, gpa).ok_or_else(|| MemoryError::Map {
            bytes,
            reason: format!("region at {:#x} overflows the address space", gpa.0),
        })?;
        mapped.push(region);
    }
    GuestMem::from_regions(mapped).map_err(|e| MemoryError::Map {
        bytes,
        reason: e.to_string(),
    })
}

/// The parts of guest RAM that may hold data, as (guest-physical address, length), in
/// address order. For RAM on a shared memfd these are the memfd's data extents
/// (SEEK_DATA/SEEK_HOLE): pages the guest never touched are skipped without being read, so
/// the cost of saving memory follows what the guest used, not its size. Other mappings
/// (a restored snapshot's private file mapping) are returned whole.
pub fn data_extents(mem: &GuestMem) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut out = Vec::new();
    for r in mem.iter() {
        let (gpa, len) = (r.start_addr().0, r.len());
        let shared_file = r
            .file_offset()
            .filter(|_| r.flags() & libc::MAP_SHARED != 0);
        let Some(fo) = shared_file else {
            out.push((gpa, len));
            continue;
        };
        let fd = fo.file().as_raw_fd();
        let (start, end) = (fo.start(), fo.start() + len);
        let mut at = start;
        while at < end {
            // SAFETY: lseek on a file descriptor we own (through the region's FileOffset)
            // only moves its offset; the mapping does not depend on it.
            let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
            if data < 0 || data as u64 >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            out.push((gpa + (data as u64 - start), hole - data as u64));
            at = hole;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn regions_are_backed_and_writable_across_the_hole() {
        let mem = create(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 20)]).unwrap();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xdead_beef_u64, GuestAddress((1 << 32) + 8))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress((1 << 32) + 8)).unwrap(),
            0xdead_beef
        );
        assert!(mem.read_obj::<u64>(GuestAddress(2 << 20)).is_err());
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(maps.contains("/memfd:ray-guest-ram"), "{maps}");
    }
}
