//! A hostile driver: replays any byte string as guest memory contents and a sequence of
//! requests (and host resizes, and save/restore round trips) on a virtio GPU, and checks
//! what must hold whatever the guest sends. The `virtio_gpu` fuzz target and a property
//! test share it.
//!
//! Input: a little-endian u16 `n`, then `n` bytes (at most 4 KiB) for the guest's backing
//! area, then records of
//! `[op, len_lo, len_hi, bytes...]`: op 0-3 sends `bytes` on the control queue, 4-5 on
//! the cursor queue (the op's low bits pick the room for the response), 6 resizes a
//! scanout, 7 saves the device and restores the state into a fresh one.
use ray_memory::{GuestMemory, MemoryLayout, OwnedMemory};

use super::commands::Limits;
use super::protocol::*;
use super::{Gpu, CONTROL_QUEUE, CURSOR_QUEUE};
use crate::virtio::queue::{Chain, Descriptor};
use crate::virtio::{Completion, VirtioDevice};

/// Guest RAM with a hole: 1 MiB at 0 and 64 KiB at 2 MiB.
const REGIONS: [(u64, u64); 2] = [(0, 1 << 20), (2 << 20, 64 << 10)];
const REQ: u64 = 0x1000;
const RESP: u64 = 0x8000;
const BACKING: u64 = 0x10000;
const MODES: [(u32, u32); 2] = [(32, 16), (16, 16)];
/// Small caps, so that the caps are reached.
const LIMITS: Limits = Limits {
    host_bytes: 256 << 10,
    resources: 16,
    backing_entries: 64,
};
const ROOMS: [u32; 4] = [0, HDR_LEN as u32, 64, 2048];
const KNOWN: [u32; 8] = [
    RESP_OK_NODATA,
    RESP_OK_DISPLAY_INFO,
    RESP_OK_EDID,
    RESP_ERR_UNSPEC,
    RESP_ERR_OUT_OF_MEMORY,
    RESP_ERR_INVALID_SCANOUT_ID,
    RESP_ERR_INVALID_RESOURCE_ID,
    RESP_ERR_INVALID_PARAMETER,
];

fn memory() -> OwnedMemory {
    OwnedMemory::zeroed(&MemoryLayout::new(&REGIONS).expect("a valid layout"))
        .expect("guest memory")
}

/// Replays `data`; panics if an invariant breaks. Returns how many requests succeeded
/// (the tests check that the seeds reach the device's inner paths).
pub fn replay(data: &[u8]) -> usize {
    let mem = memory();
    let n = match data {
        [lo, hi, ..] => usize::from(u16::from_le_bytes([*lo, *hi])),
        _ => return 0,
    };
    let mut ok = 0;
    let (backing, mut rest) = data[2..].split_at(n.min(4096).min(data.len() - 2));
    mem.write(BACKING, backing).expect("inside RAM");
    let (mut gpu, mut displays) = Gpu::new(&MODES, LIMITS).expect("two scanouts");
    while let [op, lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi]))
            .min(tail.len())
            .min(0x7000);
        let (bytes, next) = tail.split_at(len);
        rest = next;
        match op % 8 {
            op @ 0..=5 => {
                let queue = if op < 4 { CONTROL_QUEUE } else { CURSOR_QUEUE };
                let room = ROOMS[usize::from(op % 4)];
                mem.write(REQ, bytes).expect("inside RAM");
                mem.write(RESP, &[0xee; 4]).expect("inside RAM");
                let chain = Chain {
                    head: 0,
                    descriptors: vec![
                        Descriptor {
                            addr: REQ,
                            len: len as u32,
                            writable: false,
                        },
                        Descriptor {
                            addr: RESP,
                            len: room,
                            writable: true,
                        },
                    ],
                };
                match gpu.process(queue, &chain, &mem) {
                    Completion::Done(0) => assert_eq!(queue, CURSOR_QUEUE, "a response is owed"),
                    Completion::Done(n) => {
                        assert!(n <= room, "{n} bytes written into {room}");
                        let mut kind = [0u8; 4];
                        mem.read(RESP, &mut kind).expect("inside RAM");
                        let kind = u32::from_le_bytes(kind);
                        assert!(KNOWN.contains(&kind), "unknown response {kind:#x}");
                        ok += usize::from(kind < RESP_ERR_UNSPEC);
                    }
                    Completion::Failed(_) => {}
                    Completion::Pending => panic!("the GPU answers at once"),
                }
            }
            6 => {
                let scanout = usize::from(bytes.first().copied().unwrap_or(0) % 3);
                let width = 8 * u32::from(bytes.get(1).copied().unwrap_or(1) % 8 + 1);
                let resized = displays.resize(scanout, width, 8);
                assert_eq!(resized.is_ok(), scanout < MODES.len());
            }
            _ => {
                let saved = gpu.save_device();
                let (mut fresh, fresh_displays) = Gpu::new(&MODES, LIMITS).expect("two scanouts");
                fresh
                    .restore_device(&saved, &mem)
                    .expect("a state the guest reached restores");
                assert_eq!(fresh_displays.modes(), displays.modes());
                (gpu, displays) = (fresh, fresh_displays);
            }
        }
        for (i, (w, h)) in displays.modes().into_iter().enumerate() {
            let mut frame = vec![0; w as usize * h as usize * 4];
            assert!(
                displays.read(i, &mut frame),
                "scanout {i} keeps its frame size"
            );
        }
    }
    ok
}
