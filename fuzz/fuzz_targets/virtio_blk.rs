//! virtio-blk requests from a hostile driver: the input is guest memory holding a queue
//! (descriptor table, available ring; indirect tables when byte 0 negotiates them) whose
//! chains go through the queue's walk and the device's request parser, then run against
//! a small scratch disk (not activated: on this thread, with the worker pool's code).
//! Checked beyond "no panic": a request changes guest memory only inside its chain's
//! device-writable buffers, answers with a length no larger than they hold, and its status
//! is a known code.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use ray_devices::rate::RateLimit;
use ray_devices::virtio::blk::io::Engine;
use ray_devices::virtio::blk::{Block, BlockConfig};
use ray_devices::virtio::queue::Queue;
use ray_devices::virtio::{Completion, VirtioDevice};
use ray_memory::{GuestMemory, MemoryLayout, OwnedMemory};

/// Guest memory: two regions with a hole between them.
const REGIONS: [(u64, u64); 2] = [(0, 0x8000), (0x10000, 0x8000)];
const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
/// 128 sectors.
const DISK_BYTES: u64 = 64 << 10;

fn disk(readonly: bool) -> &'static Mutex<Block> {
    static DISKS: OnceLock<[Mutex<Block>; 2]> = OnceLock::new();
    let disks = DISKS.get_or_init(|| {
        let path = ray_fuzz::scratch_file("virtio_blk");
        let f = std::fs::File::create(&path).expect("a scratch disk");
        f.set_len(DISK_BYTES).expect("its size");
        let open = |readonly| {
            Mutex::new(
                Block::open(BlockConfig {
                    path: path.clone(),
                    readonly,
                    direct: false,
                    serial: "fuzz".into(),
                    queues: 1,
                    rate: RateLimit::default(),
                    engine: Engine::Pool,
                })
                .expect("the scratch disk opens"),
            )
        };
        [open(false), open(true)]
    });
    &disks[usize::from(readonly)]
}

fn snapshot(mem: &OwnedMemory) -> Vec<u8> {
    let mut all = Vec::new();
    for &(base, size) in &REGIONS {
        let mut b = vec![0u8; size as usize];
        mem.read(base, &mut b).expect("inside");
        all.extend_from_slice(&b);
    }
    all
}

/// The guest address of byte `i` of a [`snapshot`].
fn gpa(i: usize) -> u64 {
    let first = REGIONS[0].1 as usize;
    if i < first {
        REGIONS[0].0 + i as u64
    } else {
        REGIONS[1].0 + (i - first) as u64
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let layout = MemoryLayout::new(&REGIONS).expect("a valid layout");
    let mem = OwnedMemory::zeroed(&layout).expect("64 KiB of memory");
    let mut rest = rest;
    for &(base, size) in &REGIONS {
        let n = rest.len().min(size as usize);
        mem.write(base, &rest[..n]).expect("inside the region");
        rest = &rest[n..];
    }
    let mut q = Queue::new(QUEUE_SIZE);
    q.desc = DESC;
    q.avail = AVAIL;
    q.used = USED;
    q.event_idx = flags & 1 != 0;
    q.indirect = flags & 2 != 0;
    q.validate(&mem).expect("the fixed rings fit");
    q.ready = true;
    let mut dev = disk(flags & 4 != 0)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for _ in 0..2 * QUEUE_SIZE {
        let chain = match q.pop(&mem) {
            Ok(None) | Err(_) => break,
            Ok(Some(Err((head, _)))) => {
                let _ = q.add_used(&mem, head, 0);
                continue;
            }
            Ok(Some(Ok(chain))) => chain,
        };
        let before = snapshot(&mem);
        let answer = dev.process(0, &chain, &mem);
        let after = snapshot(&mem);
        let writable: u64 = chain
            .descriptors
            .iter()
            .filter(|d| d.writable)
            .map(|d| u64::from(d.len))
            .sum();
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            if a != b {
                let at = gpa(i);
                assert!(
                    chain
                        .descriptors
                        .iter()
                        .any(|d| d.writable && d.addr <= at && at < d.addr + u64::from(d.len)),
                    "byte {at:#x} changed outside the request's writable buffers"
                );
            }
        }
        match answer {
            Completion::Done(n) => {
                assert!(u64::from(n) <= writable, "answered {n} of {writable} bytes");
                // The status byte is the last writable byte: a known code.
                let last = chain.descriptors.last().expect("a chain has buffers");
                let mut status = [0u8];
                mem.read(last.addr + u64::from(last.len) - 1, &mut status)
                    .expect("inside");
                assert!(status[0] <= 2, "status {}", status[0]);
            }
            Completion::Failed(_) => {}
            Completion::Pending => panic!("a device that was not activated kept a request"),
        }
        if q.add_used(&mem, chain.head, 0).is_err() {
            break;
        }
    }
});
