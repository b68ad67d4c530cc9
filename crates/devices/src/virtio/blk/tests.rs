//! The block device model driven with hand-made and random descriptor chains over a real
//! file; not activated, so requests run on the calling thread.
use std::os::unix::fs::MetadataExt;

use proptest::prelude::*;
use ray_memory::mmap::MappedMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::*;
use super::*;
use crate::virtio::queue::Descriptor;

const MEM: usize = 0x10_0000;

struct Rig {
    mem: &'static GuestMemoryMmap<()>,
    view: MappedMemory<'static, ()>,
    path: PathBuf,
    dev: Block,
}

fn rig(name: &str, size: u64, readonly: bool) -> Rig {
    let mem: &'static GuestMemoryMmap<()> = Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap(),
    ));
    let path = std::env::temp_dir().join(format!("ray-blk-{name}-{}", std::process::id()));
    let f = File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let dev = Block::open(BlockConfig {
        path: path.clone(),
        readonly,
        direct: false,
        serial: "disk-serial-0123456789abc".into(),
        queues: 2,
        rate: RateLimit::default(),
        engine: Engine::Pool,
    })
    .unwrap();
    Rig {
        mem,
        view: MappedMemory::new(mem),
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

impl Rig {
    fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn run(&mut self, descriptors: Vec<Descriptor>) -> Completion {
        let chain = Chain {
            head: 0,
            descriptors,
        };
        self.dev.process(0, &chain, &self.view)
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// A request with header at 0x1000, data at 0x2000 (`len` bytes), status at 0x100.
    fn rw(&mut self, kind: u32, sector: u64, len: u32) -> (Completion, u8) {
        self.header(0x1000, kind, sector);
        self.mem.write_obj(0xffu8, GuestAddress(0x100)).unwrap();
        let c = self.run(vec![
            d(0x1000, 16, false),
            d(0x2000, len, kind != T_OUT),
            d(0x100, 1, true),
        ]);
        (c, self.status(0x100))
    }
}

#[test]
fn writes_land_in_the_file_and_reads_come_back() {
    let mut r = rig("rw", 1 << 20, false);
    r.mem
        .write_slice(&[0xab; 4096], GuestAddress(0x2000))
        .unwrap();
    assert_eq!(r.rw(T_OUT, 8, 4096), (Completion::Done(1), S_OK));
    let file = std::fs::read(&r.path).unwrap();
    assert_eq!(&file[8 * 512..8 * 512 + 4096], &[0xab; 4096][..]);
    assert_eq!(file[8 * 512 - 1], 0);
    r.mem
        .write_slice(&[0u8; 4096], GuestAddress(0x2000))
        .unwrap();
    assert_eq!(r.rw(T_IN, 8, 4096), (Completion::Done(4097), S_OK));
    let mut back = [0u8; 4096];
    r.mem.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
    assert_eq!(back, [0xab; 4096]);
    assert_eq!(r.rw(T_FLUSH, 0, 0).1, S_OK);
}

#[test]
fn bad_requests_fail_alone_with_the_right_status() {
    let mut r = rig("bad", 1 << 20, false);
    // Beyond the capacity (2048 sectors).
    assert_eq!(r.rw(T_IN, 2047, 1024).1, S_IOERR);
    assert_eq!(r.rw(T_IN, u64::MAX / 2, 512).1, S_IOERR);
    // Not whole sectors.
    assert_eq!(r.rw(T_IN, 0, 100).1, S_IOERR);
    // Oversized segment.
    r.header(0x1000, T_IN, 0);
    let c = r.run(vec![
        d(0x1000, 16, false),
        d(0x2000, SIZE_MAX + 512, true),
        d(0x100, 1, true),
    ]);
    assert_eq!((c, r.status(0x100)), (Completion::Done(1), S_IOERR));
    // Unknown type.
    assert_eq!(r.rw(99, 0, 512).1, S_UNSUPP);
    // Wrong direction: a read whose data the device would read.
    r.header(0x1000, T_IN, 0);
    r.run(vec![
        d(0x1000, 16, false),
        d(0x2000, 512, false),
        d(0x100, 1, true),
    ]);
    assert_eq!(r.status(0x100), S_IOERR);
    // Short header.
    r.run(vec![d(0x1000, 8, false), d(0x100, 1, true)]);
    assert_eq!(r.status(0x100), S_IOERR);
    // No writable status byte: returned unanswered.
    assert!(matches!(
        r.run(vec![d(0x1000, 16, false), d(0x2000, 512, false)]),
        Completion::Failed(_)
    ));
}

#[test]
fn a_read_only_disk_refuses_writes_discards_and_advertises_ro() {
    let mut r = rig("ro", 1 << 20, true);
    assert_ne!(r.dev.features() & F_RO, 0);
    r.mem.write_slice(&[1; 512], GuestAddress(0x2000)).unwrap();
    assert_eq!(r.rw(T_OUT, 0, 512).1, S_IOERR);
    assert_eq!(std::fs::read(&r.path).unwrap()[..512], [0; 512]);
    assert_eq!(r.rw(T_IN, 0, 512).1, S_OK);
}

#[test]
fn get_id_answers_the_serial_and_config_has_the_capacity() {
    let mut r = rig("id", 1 << 20, false);
    let (c, s) = r.rw(T_GET_ID, 0, 20);
    assert_eq!((c, s), (Completion::Done(21), S_OK));
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(0x2000)).unwrap();
    assert_eq!(&id, b"disk-serial-01234567");
    let mut cap = [0u8; 8];
    r.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    let mut q = [0u8; 2];
    r.dev.read_config(34, &mut q);
    assert_eq!(u16::from_le_bytes(q), 2, "num_queues");
}

#[test]
fn discard_punches_a_hole() {
    let size = 4 << 20;
    let mut r = rig("discard", size, false);
    std::fs::write(&r.path, vec![7u8; size as usize]).unwrap();
    let before = std::fs::metadata(&r.path).unwrap().blocks();
    // One range: sectors 0..4096 (2 MiB).
    r.header(0x1000, T_DISCARD, 0);
    let mut range = [0u8; 16];
    range[8..12].copy_from_slice(&4096u32.to_le_bytes());
    r.mem.write_slice(&range, GuestAddress(0x3000)).unwrap();
    r.run(vec![
        d(0x1000, 16, false),
        d(0x3000, 16, false),
        d(0x100, 1, true),
    ]);
    assert_eq!(r.status(0x100), S_OK);
    let after = std::fs::metadata(&r.path).unwrap().blocks();
    assert!(after + 2048 <= before, "blocks {before} -> {after}");
    let data = std::fs::read(&r.path).unwrap();
    assert!(data[..2 << 20].iter().all(|&b| b == 0));
    assert!(data[2 << 20..].iter().all(|&b| b == 7));
}

#[test]
fn tracked_writes_discards_and_zeroes_mark_their_blocks_reads_do_not() {
    use super::dirty::BLOCK_SIZE;
    let mut r = rig("dirty", 1 << 20, false);
    let dirty = r.dev.dirty_blocks();
    r.mem.write_slice(&[5; 4096], GuestAddress(0x2000)).unwrap();
    assert_eq!(r.rw(T_OUT, 0, 4096).1, S_OK);
    assert!(dirty.take().is_clean(), "not tracking yet");
    dirty.start();
    // A write straddling blocks 1 and 2.
    let sector = (2 * BLOCK_SIZE - 512) / 512;
    assert_eq!(r.rw(T_OUT, sector, 1024).1, S_OK);
    assert_eq!(r.rw(T_IN, 0, 4096).1, S_OK);
    assert_eq!(r.rw(T_FLUSH, 0, 0).1, S_OK);
    assert_eq!(dirty.take().iter().collect::<Vec<_>>(), vec![1, 2]);
    // Write-zeroes of block 9, then a discard of blocks 12..14.
    for (kind, first, blocks) in [(T_WRITE_ZEROES, 9u64, 1u64), (T_DISCARD, 12, 2)] {
        r.header(0x1000, kind, 0);
        let mut range = [0u8; 16];
        range[0..8].copy_from_slice(&(first * BLOCK_SIZE / 512).to_le_bytes());
        range[8..12].copy_from_slice(&((blocks * BLOCK_SIZE / 512) as u32).to_le_bytes());
        r.mem.write_slice(&range, GuestAddress(0x3000)).unwrap();
        r.run(vec![
            d(0x1000, 16, false),
            d(0x3000, 16, false),
            d(0x100, 1, true),
        ]);
        assert_eq!(r.status(0x100), S_OK);
    }
    assert_eq!(dirty.take().iter().collect::<Vec<_>>(), vec![9, 12, 13]);
    // A refused write (past the end) changed nothing and marks nothing.
    assert_eq!(r.rw(T_OUT, 2047, 1024).1, S_IOERR);
    assert!(dirty.take().is_clean());
    dirty.stop();
}

#[test]
fn a_disk_of_another_size_is_refused_on_restore() {
    let r = rig("restore", 1 << 20, false);
    let saved = r.dev.save_device();
    assert!(r.dev.check_device(&saved).is_ok());
    let other = rig("restore-other", 2 << 20, false);
    let err = other.dev.check_device(&saved).unwrap_err();
    assert!(
        err.contains("2097152 bytes here") && err.contains("had 1048576"),
        "{err}"
    );
}

fn chain_strategy() -> impl Strategy<Value = (Vec<(u64, u32, bool)>, u32, u64)> {
    let desc = (0u64..(MEM as u64 - 0x2000), 0u32..0x3000, any::<bool>());
    (
        prop::collection::vec(desc, 1..6),
        prop::sample::select(vec![
            T_IN,
            T_OUT,
            T_FLUSH,
            T_GET_ID,
            T_DISCARD,
            T_WRITE_ZEROES,
            77,
        ]),
        0u64..4200,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Whatever the chain, the device writes only into its device-writable buffers.
    #[test]
    fn nothing_is_written_outside_the_requests_writable_buffers(
        (descs, kind, sector) in chain_strategy()
    ) {
        let mut r = rig("prop", 2 << 20, false);
        // The header sits in the first readable buffer, if there is one of 16 bytes.
        let mut descs: Vec<Descriptor> = descs.into_iter().map(|(a, l, w)| d(a, l, w)).collect();
        // Readable before writable, as the queue guarantees.
        descs.sort_by_key(|d| d.writable);
        let pattern: Vec<u8> = (0..MEM).map(|i| (i * 7 + 3) as u8).collect();
        r.mem.write_slice(&pattern, GuestAddress(0)).unwrap();
        if let Some(h) = descs.iter().find(|d| !d.writable && d.len >= 16) {
            r.header(h.addr, kind, sector);
        }
        let before: Vec<u8> = {
            let mut b = vec![0u8; MEM];
            r.mem.read_slice(&mut b, GuestAddress(0)).unwrap();
            b
        };
        r.run(descs.clone());
        let mut after = vec![0u8; MEM];
        r.mem.read_slice(&mut after, GuestAddress(0)).unwrap();
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            if a != b {
                let i = i as u64;
                prop_assert!(
                    descs.iter().any(|d| d.writable && d.addr <= i && i < d.addr + u64::from(d.len)),
                    "byte {i:#x} changed outside every writable buffer"
                );
            }
        }
    }
}

#[test]
fn a_request_in_an_indirect_table_is_served() {
    use crate::virtio::queue::tests::{desc, indirect_table, queue_of, used_elem, used_idx};
    use crate::virtio::queue::{Queue, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
    use crate::virtio::{serve_queue, InFlight};
    use virtio_queue::mock::MockSplitQueue;

    let mem = crate::virtio::queue::tests::memory();
    let view = MappedMemory::new(&mem);
    let path = std::env::temp_dir().join(format!("ray-blk-indirect-{}", std::process::id()));
    std::fs::write(&path, vec![0x3cu8; 1 << 20]).unwrap();
    let mut dev = Block::open(BlockConfig {
        path: path.clone(),
        readonly: false,
        direct: false,
        serial: "ind".into(),
        queues: 1,
        rate: RateLimit::default(),
        engine: Engine::Pool,
    })
    .unwrap();
    let mock = MockSplitQueue::new(&mem, 8);
    let mut q: Queue = queue_of(&mock, 8);
    q.indirect = true;
    // A read of 1 KiB at sector 2 into two buffers, all in one indirect table.
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&2u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(0x10_0000)).unwrap();
    indirect_table(
        &mem,
        0x18_0000,
        &[
            (0x10_0000, 16, DESC_F_NEXT, 1),
            (0x11_0000, 512, DESC_F_WRITE | DESC_F_NEXT, 2),
            (0x12_0000, 512, DESC_F_WRITE | DESC_F_NEXT, 3),
            (0x10_0100, 1, DESC_F_WRITE, 0),
        ],
    );
    mock.add_desc_chains(&[desc(0x18_0000, 64, DESC_F_INDIRECT, 0)], 0)
        .unwrap();
    let served = serve_queue(&mut q, 0, &mut dev, &view, &InFlight::default(), &mut |m| {
        panic!("{m}")
    });
    assert!(served.used && served.fault.is_none());
    assert_eq!(used_idx(&mem), 1);
    assert_eq!(used_elem(&mem, 0), (0, 1025));
    let mut data = [0u8; 512];
    for at in [0x11_0000, 0x12_0000] {
        mem.read_slice(&mut data, GuestAddress(at)).unwrap();
        assert_eq!(data, [0x3c; 512]);
    }
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0100)).unwrap(), S_OK);
    let _ = std::fs::remove_file(&path);
}
