//! What the fuzz targets share.
use std::path::PathBuf;

/// A scratch file of this process named after `what` (on tmpfs when there is one): targets
/// that feed a file-reading parser write the input there.
pub fn scratch_file(what: &str) -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("ray-fuzz-{what}-{}", std::process::id()))
}

/// A virtqueue in guest memory, as the device-chain targets build it from their input.
pub mod guest {
    use ray_devices::virtio::queue::{Chain, Queue};
    use ray_memory::{GuestMemory, MemoryLayout, OwnedMemory};

    /// Guest memory: two regions with a hole between them.
    pub const REGIONS: [(u64, u64); 2] = [(0, 0x8000), (0x10000, 0x8000)];
    pub const QUEUE_SIZE: u16 = 16;
    /// Where the rings are: the descriptor table, the available and the used ring.
    pub const DESC: u64 = 0;
    pub const AVAIL: u64 = 0x100;
    pub const USED: u64 = 0x200;

    /// [`REGIONS`] of guest memory holding `bytes` in order (the rest zero).
    pub fn memory(mut bytes: &[u8]) -> OwnedMemory {
        let layout = MemoryLayout::new(&REGIONS).expect("a valid layout");
        let mem = OwnedMemory::zeroed(&layout).expect("64 KiB of memory");
        for &(base, size) in &REGIONS {
            let n = bytes.len().min(size as usize);
            mem.write(base, &bytes[..n]).expect("inside the region");
            bytes = &bytes[n..];
        }
        mem
    }

    /// A ready queue of [`QUEUE_SIZE`] on the fixed rings in `mem`, with EVENT_IDX (bit 0
    /// of `flags`) and indirect descriptors (bit 1) as the driver negotiated them.
    pub fn queue(flags: u8, mem: &dyn GuestMemory) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE);
        q.desc = DESC;
        q.avail = AVAIL;
        q.used = USED;
        q.event_idx = flags & 1 != 0;
        q.indirect = flags & 2 != 0;
        q.validate(mem).expect("the fixed rings fit");
        q.ready = true;
        q
    }

    /// Pops up to twice the queue's size of chains, gives each one the queue's walk
    /// accepts to `serve` (which says how many bytes it wrote) and returns it to the used
    /// ring; a chain the walk refuses goes back with 0 bytes.
    pub fn serve_chains(
        q: &mut Queue,
        mem: &dyn GuestMemory,
        mut serve: impl FnMut(&Chain) -> u32,
    ) {
        for _ in 0..2 * QUEUE_SIZE {
            let (head, written) = match q.pop(mem) {
                Ok(None) | Err(_) => return,
                Ok(Some(Err((head, _)))) => (head, 0),
                Ok(Some(Ok(chain))) => (chain.head, serve(&chain)),
            };
            if q.add_used(mem, head, written).is_err() {
                return;
            }
        }
    }

    /// Every byte of guest memory with its address.
    pub fn bytes(mem: &OwnedMemory) -> Vec<(u64, u8)> {
        let mut all = Vec::new();
        for &(base, size) in &REGIONS {
            let mut b = vec![0u8; size as usize];
            mem.read(base, &mut b).expect("inside");
            all.extend(b.into_iter().enumerate().map(|(i, v)| (base + i as u64, v)));
        }
        all
    }
}
