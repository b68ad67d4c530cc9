//! The files of a snapshot as a restore reads them, damaged or forged. The first input byte
//! picks the file; the rest is its content:
//!
//! 0. `manifest.json` (parsed and checked);
//! 1. `state.bin` as found on disk (container header, length, CRC), then its payload as the
//!    VMM's machine state;
//! 2. a well-formed `state.bin` around the input, so the fuzzer reaches the state decoder;
//! 3. the page map of an incremental snapshot, against a two-region layout;
//! 4. `memory.sums`, the per-block checksums of a full snapshot.
//!
//! Every one must be refused with an error, or accepted; nothing may panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ray_memory::{MemoryLayout, PAGE_SIZE};
use ray_snapshot::{BlockSums, Manifest, StateFile};
use ray_vmm::machine::MachineState;

/// A scratch file of this process for the file under test.
fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| ray_fuzz::scratch_file("snapshot"))
}

fn state(payload: &[u8]) {
    let _ = serde_json::from_slice::<MachineState>(payload);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, content)) = data.split_first() else {
        return;
    };
    let layout = MemoryLayout::new(&[(0, 64 * PAGE_SIZE), (1 << 30, 64 * PAGE_SIZE)])
        .expect("a valid layout");
    let path = path();
    match which % 5 {
        0 => {
            if let Ok(m) = serde_json::from_slice::<Manifest>(content) {
                let _ = m.check();
            }
        }
        1 => {
            std::fs::write(path, content).expect("scratch write");
            if let Ok(payload) = StateFile::read(path, 1 << 20) {
                state(&payload);
            }
        }
        2 => {
            StateFile::write(path, content).expect("scratch write");
            let payload = StateFile::read(path, 1 << 20).expect("a file just written reads back");
            assert_eq!(payload, content);
            state(&payload);
        }
        3 => {
            std::fs::write(path, content).expect("scratch write");
            let _ = ray_snapshot::pages::read_map(path, &layout);
        }
        _ => {
            std::fs::write(path, content).expect("scratch write");
            let _ = BlockSums::read(path, &layout);
        }
    }
});
