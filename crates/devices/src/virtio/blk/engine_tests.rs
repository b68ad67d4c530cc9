//! Both I/O engines (the worker pool and the io_uring) on an activated device over a real
//! temporary file: what each does to the file and to guest memory, the status bytes, and
//! the completions the transport gets.
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ray_memory::mmap::SharedMappedMemory;
use ray_memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::rate::RateLimit;
use crate::virtio::blk::io::Engine;
use crate::virtio::blk::request::*;
use crate::virtio::blk::{Block, BlockConfig};
use crate::virtio::completer::{Completer, InFlight, Transport, Used};
use crate::virtio::queue::{Chain, Descriptor};
use crate::virtio::{Completion, DeviceContext, VirtioDevice};

const MEM: usize = 0x40_0000;

#[derive(Default)]
struct Recorder(Vec<(u16, Vec<Used>)>);

impl Transport for Recorder {
    fn complete(&mut self, queue: u16, done: &[Used]) {
        self.0.push((queue, done.to_vec()));
    }
}

struct Rig {
    mmap: Arc<GuestMemoryMmap<()>>,
    mem: Arc<dyn GuestMemory + Send + Sync>,
    transport: Arc<Mutex<Recorder>>,
    in_flight: Arc<InFlight>,
    path: PathBuf,
    dev: Block,
}

fn rig(engine: Engine, name: &str, size: u64, direct: bool, rate: RateLimit) -> Rig {
    let mmap = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap());
    let mem: Arc<dyn GuestMemory + Send + Sync> = Arc::new(SharedMappedMemory::new(mmap.clone()));
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        "ray-blk-engine-{}-{name}-{}",
        engine.name(),
        std::process::id()
    ));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let mut dev = Block::open(BlockConfig {
        path: path.clone(),
        readonly: false,
        direct,
        serial: "engine".into(),
        queues: 2,
        rate,
        engine,
    })
    .unwrap();
    let transport = Arc::new(Mutex::new(Recorder::default()));
    let weak: Weak<Mutex<dyn Transport>> =
        Arc::downgrade(&(transport.clone() as Arc<Mutex<dyn Transport>>));
    let in_flight = Arc::new(InFlight::default());
    dev.activate(DeviceContext {
        memory: mem.clone(),
        completer: Completer::new(weak, in_flight.clone()),
    });
    Rig {
        mmap,
        mem,
        transport,
        in_flight,
        path,
        dev,
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn d(addr: u64, len: u32, writable: bool) -> Descriptor {
    Descriptor {
        addr,
        len,
        writable,
    }
}

/// Request `i`'s header and status live at 0x1000 + 32 * i.
fn hdr(i: u16) -> u64 {
    0x1000 + 32 * u64::from(i)
}

fn status_at(i: u16) -> u64 {
    hdr(i) + 16
}

impl Rig {
    /// Queues request `head` on `queue`: a header of `kind` at `sector`, the data buffers,
    /// a status byte. Returns what the device answered at once.
    fn queue(
        &mut self,
        queue: usize,
        head: u16,
        kind: u32,
        sector: u64,
        data: &[Descriptor],
    ) -> Completion {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mmap.write_slice(&h, GuestAddress(hdr(head))).unwrap();
        self.mmap
            .write_obj(0xffu8, GuestAddress(status_at(head)))
            .unwrap();
        self.in_flight.add();
        let mut descriptors = vec![d(hdr(head), 16, false)];
        descriptors.extend_from_slice(data);
        descriptors.push(d(status_at(head), 1, true));
        let c = self
            .dev
            .process(queue, &Chain { head, descriptors }, &*self.mem);
        if c != Completion::Pending {
            self.in_flight.done(1);
        }
        c
    }

    /// Waits for every queued request; returns the completions by head.
    fn wait(&self) -> Vec<(u16, Used)> {
        assert_eq!(self.in_flight.wait_idle(Duration::from_secs(20)), 0);
        let mut all: Vec<(u16, Used)> = std::mem::take(&mut self.transport.lock().unwrap().0)
            .into_iter()
            .flat_map(|(q, v)| v.into_iter().map(move |u| (q, u)))
            .collect();
        all.sort_by_key(|(_, u)| u.head);
        all
    }

    fn status(&self, head: u16) -> u8 {
        self.mmap.read_obj(GuestAddress(status_at(head))).unwrap()
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

const ENGINES: [Engine; 2] = [Engine::Pool, Engine::Uring];

#[test]
fn writes_reads_and_flushes_land_on_both_engines() {
    for engine in ENGINES {
        let mut r = rig(engine, "rw", 1 << 20, false, RateLimit::default());
        // Eight 4 KiB writes of distinct bytes, each from two guest buffers, on both
        // queues, all queued before any completes.
        for i in 0..8u16 {
            let at = 0x10_0000 + 0x2000 * u64::from(i);
            r.mmap
                .write_slice(&[i as u8 + 1; 4096], GuestAddress(at))
                .unwrap();
            let data = [d(at, 1024, false), d(at + 1024, 3072, false)];
            let c = r.queue(usize::from(i % 2), i, T_OUT, 8 * u64::from(i), &data);
            assert_eq!(c, Completion::Pending, "{}", engine.name());
        }
        let done = r.wait();
        assert_eq!(done.len(), 8);
        for (i, (q, u)) in done.iter().enumerate() {
            assert_eq!((u.head, u.len, *q), (i as u16, 1, i as u16 % 2));
            assert_eq!(r.status(i as u16), S_OK);
        }
        let file = r.file();
        for i in 0..8usize {
            assert!(
                file[i * 4096..(i + 1) * 4096]
                    .iter()
                    .all(|&b| b == i as u8 + 1),
                "{}: block {i}",
                engine.name()
            );
        }
        // Read them back into other buffers, split at odd places.
        for i in 0..8u16 {
            let at = 0x30_0000 + 0x2000 * u64::from(i);
            let data = [d(at, 512, true), d(at + 512, 3584, true)];
            assert_eq!(
                r.queue(0, i, T_IN, 8 * u64::from(i), &data),
                Completion::Pending
            );
        }
        let done = r.wait();
        assert!(done.iter().all(|(_, u)| u.len == 4097), "{done:?}");
        for i in 0..8u16 {
            let mut back = [0u8; 4096];
            r.mmap
                .read_slice(&mut back, GuestAddress(0x30_0000 + 0x2000 * u64::from(i)))
                .unwrap();
            assert!(back.iter().all(|&b| b == i as u8 + 1));
            assert_eq!(r.status(i), S_OK);
        }
        assert_eq!(r.queue(1, 3, T_FLUSH, 0, &[]), Completion::Pending);
        assert_eq!(r.wait().len(), 1);
        assert_eq!(r.status(3), S_OK);
    }
}

/// A discard or write-zeroes payload of (sector, sectors, flags) ranges at `at`.
fn ranges(r: &Rig, at: u64, list: &[(u64, u32, u32)]) -> Descriptor {
    let mut b = Vec::new();
    for &(s, n, f) in list {
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&f.to_le_bytes());
    }
    r.mmap.write_slice(&b, GuestAddress(at)).unwrap();
    d(at, b.len() as u32, false)
}

#[test]
fn discard_and_write_zeroes_on_both_engines() {
    for engine in ENGINES {
        let size = 4u64 << 20;
        let mut r = rig(engine, "dz", size, false, RateLimit::default());
        std::fs::write(&r.path, vec![7u8; size as usize]).unwrap();
        let before = std::fs::metadata(&r.path).unwrap().blocks();
        // Discard two ranges (1 MiB at 0, 512 KiB at 2 MiB), in one request.
        let payload = ranges(&r, 0x20_0000, &[(0, 2048, 0), (4096, 1024, 0)]);
        assert_eq!(r.queue(0, 0, T_DISCARD, 0, &[payload]), Completion::Pending);
        // Write-zeroes without UNMAP (zero the range in place) and with it (a hole).
        let payload = ranges(&r, 0x20_1000, &[(6144, 8, 0)]);
        assert_eq!(
            r.queue(1, 1, T_WRITE_ZEROES, 0, &[payload]),
            Completion::Pending
        );
        let payload = ranges(&r, 0x20_2000, &[(7000, 16, 1)]);
        assert_eq!(
            r.queue(0, 2, T_WRITE_ZEROES, 0, &[payload]),
            Completion::Pending
        );
        let done = r.wait();
        assert_eq!(done.len(), 3);
        assert!(done.iter().all(|(_, u)| u.len == 1));
        assert_eq!([r.status(0), r.status(1), r.status(2)], [S_OK; 3]);
        let file = r.file();
        let zero = |a: usize, b: usize| file[a..b].iter().all(|&x| x == 0);
        let seven = |a: usize, b: usize| file[a..b].iter().all(|&x| x == 7);
        let (mib, sec) = (1usize << 20, 512usize);
        assert!(zero(0, mib) && seven(mib, 2 * mib), "{}", engine.name());
        assert!(zero(2 * mib, 2 * mib + mib / 2) && seven(2 * mib + mib / 2, 6144 * sec));
        assert!(zero(6144 * sec, 6152 * sec) && seven(6152 * sec, 7000 * sec));
        assert!(zero(7000 * sec, 7016 * sec) && seven(7016 * sec, size as usize));
        let after = std::fs::metadata(&r.path).unwrap().blocks();
        assert!(after + 3 * 1024 <= before, "blocks {before} -> {after}");
    }
}

#[test]
fn io_errors_answer_ioerr_on_both_engines() {
    for engine in ENGINES {
        // A file that shrank under the device: a read past its end finds no bytes.
        let mut r = rig(engine, "short", 1 << 20, false, RateLimit::default());
        std::fs::File::options()
            .write(true)
            .open(&r.path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // Half inside the file (the kernel moves 4 KiB, the rest finds the end).
        let data = [d(0x10_0000, 8192, true)];
        assert_eq!(r.queue(0, 0, T_IN, 0, &data), Completion::Pending);
        let done = r.wait();
        assert_eq!(done[0].1.len, 1, "{}: only the status", engine.name());
        assert_eq!(r.status(0), S_IOERR, "{}", engine.name());

        // O_DIRECT with a guest buffer off 512-byte alignment: the kernel refuses both
        // directions (EINVAL) on allocated blocks (a read of a hole may just zero it).
        let mut r = rig(engine, "direct", 1 << 20, true, RateLimit::default());
        std::fs::write(&r.path, vec![3u8; 1 << 20]).unwrap();
        let data = [d(0x10_0001, 4096, true)];
        assert_eq!(r.queue(0, 0, T_IN, 0, &data), Completion::Pending);
        let data = [d(0x10_0001, 4096, false)];
        assert_eq!(r.queue(1, 1, T_OUT, 0, &data), Completion::Pending);
        // An aligned one still works beside them.
        let data = [d(0x20_0000, 4096, true)];
        assert_eq!(r.queue(0, 2, T_IN, 0, &data), Completion::Pending);
        let done = r.wait();
        assert_eq!(done.len(), 3);
        assert_eq!(
            [r.status(0), r.status(1), r.status(2)],
            [S_IOERR, S_IOERR, S_OK],
            "{}",
            engine.name()
        );
    }
}

#[test]
fn rate_limits_pace_the_uring_engine() {
    // 20 requests a second with a bucket of one second's worth: 30 requests need about
    // half a second more than the first 20 took.
    let rate = RateLimit {
        bytes_per_sec: None,
        ops_per_sec: Some(20),
    };
    let mut r = rig(Engine::Uring, "rate", 1 << 20, false, rate);
    let t = std::time::Instant::now();
    for i in 0..30u16 {
        let data = [d(0x10_0000 + 0x1000 * u64::from(i), 512, true)];
        assert_eq!(r.queue(0, i, T_IN, 0, &data), Completion::Pending);
    }
    let done = r.wait();
    assert_eq!(done.len(), 30);
    assert!((0..30).all(|i| r.status(i) == S_OK));
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn the_uring_engine_ends_with_the_device() {
    let mut r = rig(Engine::Uring, "end", 1 << 20, false, RateLimit::default());
    let data = [d(0x10_0000, 4096, true)];
    assert_eq!(r.queue(0, 0, T_IN, 0, &data), Completion::Pending);
    // Dropping the device waits for the engine thread, which first finishes what it took.
    let dev = std::mem::replace(
        &mut r.dev,
        Block::open(BlockConfig {
            path: r.path.clone(),
            readonly: true,
            direct: false,
            serial: String::new(),
            queues: 1,
            rate: RateLimit::default(),
            engine: Engine::Pool,
        })
        .unwrap(),
    );
    drop(dev);
    assert_eq!(r.in_flight.count(), 0);
    assert_eq!(r.wait().len(), 1);
    assert_eq!(r.status(0), S_OK);
}
