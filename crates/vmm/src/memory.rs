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
