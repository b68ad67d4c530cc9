//! Full-snapshot write speed against the disk's raw sequential write speed. Ignored by
//! default (it writes hundreds of MiB); run with
//! `cargo test --release -p ray-snapshot --test speed -- --ignored --nocapture`.
mod common;

use common::TempDir;
use ray_snapshot::{
    sequential_write_speed, CreateOptions, GuestMemory, MemoryLayout, OwnedMemory, SnapshotStore,
};

#[test]
#[ignore]
fn full_snapshot_write_speed_vs_raw() {
    let mib: u64 = std::env::var("RAY_SNAPSHOT_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let dir = TempDir::new("speed");
    let layout = MemoryLayout::new(&[(0, mib << 20)]).unwrap();
    let mem = OwnedMemory::zeroed(&layout).unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut block = vec![0u8; 4 << 20];
    for off in (0..mib << 20).step_by(block.len()) {
        let n = ((mib << 20) - off).min(block.len() as u64) as usize;
        for w in block[..n].chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        mem.write(off, &block[..n]).unwrap();
    }
    let store = SnapshotStore::open(dir.path().join("store")).unwrap();
    // Blocks freed by the previous round are reused by the next writer, raw or snapshot,
    // so alternating and deleting keeps both measuring the same kind of disk blocks (on a
    // thin-provisioned virtual disk, first-touch blocks are several times slower).
    for round in 0..3 {
        let raw = sequential_write_speed(store.root(), mib).unwrap();
        let start = std::time::Instant::now();
        let meta = common::meta(&format!("full{round}"));
        store
            .create_full(&meta, b"", &mem, &CreateOptions::default())
            .unwrap();
        let snap = (mib << 20) as f64 / start.elapsed().as_secs_f64();
        println!(
            "round {round}: raw {:.0} MiB/s, full snapshot {:.0} MiB/s, ratio {:.2}",
            raw.bytes_per_sec() / 1048576.0,
            snap / 1048576.0,
            snap / raw.bytes_per_sec()
        );
        store.delete(&format!("full{round}")).unwrap();
    }
}
