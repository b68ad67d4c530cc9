//! virtio-net chains from a hostile driver: the input is guest memory holding a queue
//! (descriptor table, available ring; indirect tables when byte 0 negotiates them) and,
//! after byte 1's choice of queue, the chains go through the device's checks: transmit
//! chains (`tx_length`: virtio-net header plus frame, device-readable only) are gathered
//! as the I/O thread sends them; receive chains (`rx_capacity`: device-writable, room for
//! the header) are filled with a frame from the input as the I/O thread fills them.
//! Checked beyond "no panic": a gathered request is exactly as long as its check said and
//! equals its buffers' bytes; a frame fills only the chain's writable buffers, in order,
//! and is never written into a chain too small for it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ray_devices::virtio::net::{gather, rx_capacity, scatter, tx_length, HDR_LEN, MAX_TX_FRAME};
use ray_devices::virtio::queue::Queue;
use ray_memory::{GuestMemory, MemoryLayout, OwnedMemory};

const REGIONS: [(u64, u64); 2] = [(0, 0x8000), (0x10000, 0x8000)];
const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;

fn snapshot(mem: &OwnedMemory) -> Vec<(u64, u8)> {
    let mut all = Vec::new();
    for &(base, size) in &REGIONS {
        let mut b = vec![0u8; size as usize];
        mem.read(base, &mut b).expect("inside");
        all.extend(b.into_iter().enumerate().map(|(i, v)| (base + i as u64, v)));
    }
    all
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (flags, rx, frame_len) = (
        data[0],
        data[1] & 1 != 0,
        u16::from_le_bytes([data[2], data[3]]),
    );
    let layout = MemoryLayout::new(&REGIONS).expect("a valid layout");
    let mem = OwnedMemory::zeroed(&layout).expect("64 KiB of memory");
    let mut rest = &data[4..];
    for &(base, size) in &REGIONS {
        let n = rest.len().min(size as usize);
        mem.write(base, &rest[..n]).expect("inside the region");
        rest = &rest[n..];
    }
    // The frame a receive chain gets: the input's own bytes, repeated to its length.
    let frame: Vec<u8> = (0..usize::from(frame_len) % (HDR_LEN + MAX_TX_FRAME) as usize + 1)
        .map(|i| data[i % data.len()])
        .collect();
    let mut q = Queue::new(QUEUE_SIZE);
    q.desc = DESC;
    q.avail = AVAIL;
    q.used = USED;
    q.event_idx = flags & 1 != 0;
    q.indirect = flags & 2 != 0;
    q.validate(&mem).expect("the fixed rings fit");
    q.ready = true;
    let mut buf = vec![0u8; (HDR_LEN + MAX_TX_FRAME) as usize];
    for _ in 0..2 * QUEUE_SIZE {
        let chain = match q.pop(&mem) {
            Ok(None) | Err(_) => break,
            Ok(Some(Err((head, _)))) => {
                let _ = q.add_used(&mem, head, 0);
                continue;
            }
            Ok(Some(Ok(chain))) => chain,
        };
        let mut written = 0;
        if rx {
            if let Ok(capacity) = rx_capacity(&chain) {
                assert!(chain.descriptors.iter().all(|d| d.writable));
                if frame.len() <= capacity as usize {
                    let before = snapshot(&mem);
                    scatter(&chain, &mem, &frame).expect("a checked chain takes the frame");
                    let after = snapshot(&mem);
                    // Where each frame byte should have gone, in chain order.
                    let mut want = std::collections::HashMap::new();
                    let mut at = 0usize;
                    for d in &chain.descriptors {
                        for k in 0..u64::from(d.len) {
                            if at == frame.len() {
                                break;
                            }
                            want.insert(d.addr + k, frame[at]);
                            at += 1;
                        }
                    }
                    for ((gpa, a), (_, b)) in before.iter().zip(&after) {
                        match want.get(gpa) {
                            // Buffers may overlap: a later byte may land on an earlier one.
                            Some(_) => {}
                            None => assert_eq!(a, b, "byte {gpa:#x} outside the frame's room"),
                        }
                    }
                    written = frame.len() as u32;
                }
            }
        } else if let Ok(len) = tx_length(&chain) {
            assert!(chain.descriptors.iter().all(|d| !d.writable));
            assert!((HDR_LEN..=HDR_LEN + MAX_TX_FRAME).contains(&len));
            let n = gather(&chain, &mem, &mut buf).expect("a checked chain reads");
            assert_eq!(n, len as usize);
            let mut at = 0;
            for d in chain.descriptors.iter().filter(|d| d.len > 0) {
                let mut part = vec![0u8; d.len as usize];
                mem.read(d.addr, &mut part).expect("inside");
                assert_eq!(&buf[at..at + part.len()], &part[..]);
                at += part.len();
            }
        }
        if q.add_used(&mem, chain.head, written).is_err() {
            break;
        }
    }
});
