//! `memory.sums`: block checksums written with a full snapshot, read for lazy verification,
//! checked by `verify`; snapshots without the file still restore.
mod common;

use std::os::unix::fs::FileExt;

use common::{layout, memory, meta, Rng, TempDir};
use ray_snapshot::manifest::{BLOCK_SUMS_FILE, MEMORY_FILE};
use ray_snapshot::{Block, BlockSums, CreateOptions, GuestMemory, SnapshotStore, BLOCK_BYTES};

const PLAIN: CreateOptions = CreateOptions { compress: false };

fn flip(path: &std::path::Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, offset).unwrap();
}

#[test]
fn every_block_reads_back_checked_and_matches_memory() {
    let dir = TempDir::new("blocks");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let layout = layout();
    let mem = memory(&layout, &mut Rng(11), 3);
    let m = store
        .create_full(&meta("a"), b"state", &mem, &PLAIN)
        .unwrap();
    assert!(m.files.contains_key(BLOCK_SUMS_FILE));
    let plan = store.restore_plan("a", "cpu-abc").unwrap();
    let blocks = plan
        .base_blocks()
        .unwrap()
        .expect("a full snapshot has block sums");
    assert_eq!(blocks.block_bytes(), BLOCK_BYTES);
    let mut buf = vec![0u8; BLOCK_BYTES as usize];
    let mut zero_blocks = 0;
    for (ri, r) in layout.regions.iter().enumerate() {
        for b in 0..r.len.div_ceil(BLOCK_BYTES) as usize {
            let gpa = r.gpa + b as u64 * BLOCK_BYTES;
            let len = (r.len - b as u64 * BLOCK_BYTES).min(BLOCK_BYTES) as usize;
            let mut want = vec![0u8; len];
            mem.read(gpa, &mut want).unwrap();
            match blocks.read_block(ri, b, &mut buf).unwrap() {
                Block::Zero => {
                    zero_blocks += 1;
                    assert!(want.iter().all(|x| *x == 0), "block at {gpa:#x}");
                }
                Block::Data(n) => assert_eq!(&buf[..n], &want[..], "block at {gpa:#x}"),
            }
        }
    }
    assert!(zero_blocks > 0, "sparse memory has zero blocks");
    // The table agrees with the manifest's chunk sums.
    store.verify("a").unwrap();
}

#[test]
fn a_damaged_block_is_refused_and_verify_catches_a_damaged_table() {
    let dir = TempDir::new("blocks-bad");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let layout = layout();
    let mem = memory(&layout, &mut Rng(12), 16);
    store
        .create_full(&meta("a"), b"state", &mem, &PLAIN)
        .unwrap();
    let gpa = (4 << 20) + 3 * BLOCK_BYTES + 17;
    flip(&store.dir("a").join(MEMORY_FILE), gpa);
    let plan = store.restore_plan("a", "cpu-abc").unwrap();
    let blocks = plan.base_blocks().unwrap().unwrap();
    let mut buf = vec![0u8; BLOCK_BYTES as usize];
    let err = blocks.read_block(1, 3, &mut buf).unwrap_err().to_string();
    assert!(err.contains("0x430000..0x440000"), "{err}");
    blocks.read_block(1, 4, &mut buf).unwrap();

    // A damaged table: its container CRC catches it on restore, `verify` too.
    let dir = TempDir::new("blocks-table");
    let store = SnapshotStore::open(dir.path()).unwrap();
    store
        .create_full(&meta("b"), b"state", &mem, &PLAIN)
        .unwrap();
    flip(&store.dir("b").join(BLOCK_SUMS_FILE), 40);
    let plan = store.restore_plan("b", "cpu-abc").unwrap();
    let err = plan.base_blocks().err().expect("damaged table").to_string();
    assert!(err.contains(BLOCK_SUMS_FILE), "{err}");
    let err = store.verify("b").unwrap_err().to_string();
    assert!(err.contains(BLOCK_SUMS_FILE), "{err}");
}

#[test]
fn snapshots_without_block_sums_restore_and_table_shape_is_checked() {
    let dir = TempDir::new("blocks-old");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let layout = layout();
    let mem = memory(&layout, &mut Rng(13), 4);
    store
        .create_full(&meta("a"), b"state", &mem, &PLAIN)
        .unwrap();
    // As written before memory.sums existed: no file, not in the manifest.
    let mdir = store.dir("a");
    std::fs::remove_file(mdir.join(BLOCK_SUMS_FILE)).unwrap();
    let text = std::fs::read_to_string(mdir.join("manifest.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["files"].as_object_mut().unwrap().remove(BLOCK_SUMS_FILE);
    std::fs::write(mdir.join("manifest.json"), serde_json::to_vec(&v).unwrap()).unwrap();
    let plan = store.restore_plan("a", "cpu-abc").unwrap();
    assert!(plan.base_blocks().unwrap().is_none());
    plan.verify_base_memory().unwrap();
    store.verify("a").unwrap();

    // A table for another layout is refused with the reason.
    let sums = BlockSums {
        block_bytes: BLOCK_BYTES,
        crc32: vec![vec![0; 3]],
    };
    let path = dir.path().join("other.sums");
    std::fs::write(&path, sums.encode()).unwrap();
    let err = BlockSums::read(&path, &layout).unwrap_err().to_string();
    assert!(err.contains("regions"), "{err}");
}
