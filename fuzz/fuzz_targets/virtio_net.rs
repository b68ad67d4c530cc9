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
use ray_fuzz::guest;
use ray_memory::GuestMemory;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (flags, rx, frame_len) = (
        data[0],
        data[1] & 1 != 0,
        u16::from_le_bytes([data[2], data[3]]),
    );
    let mem = guest::memory(&data[4..]);
    // The frame a receive chain gets: the input's own bytes, repeated to its length.
    let frame: Vec<u8> = (0..usize::from(frame_len) % (HDR_LEN + MAX_TX_FRAME) as usize + 1)
        .map(|i| data[i % data.len()])
        .collect();
    let mut q = guest::queue(flags, &mem);
    let mut buf = vec![0u8; (HDR_LEN + MAX_TX_FRAME) as usize];
    guest::serve_chains(&mut q, &mem, |chain| {
        let mut written = 0;
        if rx {
            if let Ok(capacity) = rx_capacity(chain) {
                assert!(chain.descriptors.iter().all(|d| d.writable));
                if frame.len() <= capacity as usize {
                    let before = guest::bytes(&mem);
                    scatter(chain, &mem, &frame).expect("a checked chain takes the frame");
                    let after = guest::bytes(&mem);
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
        } else if let Ok(len) = tx_length(chain) {
            assert!(chain.descriptors.iter().all(|d| !d.writable));
            assert!((HDR_LEN..=HDR_LEN + MAX_TX_FRAME).contains(&len));
            let n = gather(chain, &mem, &mut buf).expect("a checked chain reads");
            assert_eq!(n, len as usize);
            let mut at = 0;
            for d in chain.descriptors.iter().filter(|d| d.len > 0) {
                let mut part = vec![0u8; d.len as usize];
                mem.read(d.addr, &mut part).expect("inside");
                assert_eq!(&buf[at..at + part.len()], &part[..]);
                at += part.len();
            }
        }
        written
    });
});
