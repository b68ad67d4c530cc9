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
use ray_devices::virtio::{Completion, VirtioDevice};
use ray_fuzz::guest;
use ray_memory::GuestMemory;
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

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mem = guest::memory(rest);
    let mut q = guest::queue(flags, &mem);
    let mut dev = disk(flags & 4 != 0)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    guest::serve_chains(&mut q, &mem, |chain| {
        let before = guest::bytes(&mem);
        let answer = dev.process(0, chain, &mem);
        let after = guest::bytes(&mem);
        let writable: u64 = chain
            .descriptors
            .iter()
            .filter(|d| d.writable)
            .map(|d| u64::from(d.len))
            .sum();
        for ((at, a), (_, b)) in before.iter().zip(&after) {
            if a != b {
                let at = *at;
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
        0
    });
});
