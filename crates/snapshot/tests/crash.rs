//! kill -9 in the middle of writing snapshots: no half-written snapshot is ever listed,
//! and the ones written before are intact. The test binary re-runs itself as the writer.
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TempDir;
use ray_snapshot::{
    CreateOptions, GuestMemory, MemoryLayout, NewSnapshot, OwnedMemory, SnapshotStore,
};

const WRITER_ENV: &str = "RAY_SNAPSHOT_CRASH_WRITER";
const TEST_NAME: &str = "kill_9_mid_write_leaves_no_ready_snapshot";

fn layout() -> MemoryLayout {
    MemoryLayout::new(&[(0, 8 << 20), (16 << 20, 8 << 20)]).unwrap()
}

/// The memory snapshot `seq` holds: non-zero everywhere, different for each `seq`.
fn memory_for(seq: u64) -> OwnedMemory {
    let layout = layout();
    let m = OwnedMemory::zeroed(&layout).unwrap();
    for r in &layout.regions {
        let mut bytes = vec![0u8; r.len as usize];
        for (i, w) in bytes.chunks_exact_mut(8).enumerate() {
            let v = (r.gpa + i as u64 * 8) ^ (seq.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
            w.copy_from_slice(&v.to_le_bytes());
        }
        m.write(r.gpa, &bytes).unwrap();
    }
    m
}

fn meta(seq: u64) -> NewSnapshot {
    NewSnapshot {
        id: format!("w{seq}"),
        vm_id: "vm".into(),
        cpu: "cpu".into(),
        vm_config: serde_json::Value::Null,
    }
}

/// The child: writes snapshots w1, w2, ... (alternating full and zstd) until killed.
fn writer(dir: &str) {
    let store = SnapshotStore::open(dir).unwrap().with_max_per_vm(10_000);
    for seq in 1.. {
        let mem = memory_for(seq);
        let opts = CreateOptions {
            compress: seq % 2 == 0,
        };
        store
            .create_full(&meta(seq), &seq.to_le_bytes(), &mem, &opts)
            .unwrap();
    }
}

#[test]
fn kill_9_mid_write_leaves_no_ready_snapshot() {
    if let Ok(dir) = std::env::var(WRITER_ENV) {
        writer(&dir);
        return;
    }
    let dir = TempDir::new("crash");
    let store = SnapshotStore::open(dir.path()).unwrap();
    store
        .create_full(
            &meta(0),
            &0u64.to_le_bytes(),
            &memory_for(0),
            &CreateOptions::default(),
        )
        .unwrap();
    for (round, delay_ms) in [0u64, 7, 30].into_iter().enumerate() {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(WRITER_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until the writer is inside a snapshot (a `.tmp-` directory exists).
        let start = Instant::now();
        let in_flight = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        };
        while !in_flight() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the writer never started"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let store = SnapshotStore::open(dir.path()).unwrap();
        let tree = store.list().unwrap();
        assert!(tree.broken.is_empty(), "round {round}: {:?}", tree.broken);
        assert!(
            tree.roots.iter().any(|n| n.id == "w0"),
            "round {round}: w0 is gone"
        );
        for node in &tree.roots {
            let seq: u64 = node.id[1..].parse().unwrap();
            let plan = store.restore_plan(&node.id, "cpu").unwrap();
            assert_eq!(plan.state, seq.to_le_bytes());
            assert!(
                common::same(&plan.materialize_owned().unwrap(), &memory_for(seq)),
                "{} differs",
                node.id
            );
            store.verify(&node.id).unwrap();
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(
            leftovers.is_empty(),
            "round {round}: {leftovers:?} left behind"
        );
        // The next round's writer starts over at w1: remove what this one finished.
        for node in &tree.roots {
            if node.id != "w0" {
                store.delete(&node.id).unwrap();
            }
        }
    }
}
