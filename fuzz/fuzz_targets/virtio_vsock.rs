//! virtio-vsock chains from a hostile driver: the input is guest memory holding a queue
//! (descriptor table, available ring; indirect tables when byte 0 negotiates them); byte 1
//! picks the queue (receive, transmit, event) and bytes 2-3 the length of the packet a
//! receive or event chain is given. Each chain goes through the device's check
//! (`check_chain`); a transmit chain that passes is gathered and parsed as the I/O thread
//! does, a receive or event chain that passes and can hold the packet is filled.
//! Checked beyond "no panic": a checked chain has only the right kind of buffers and a
//! length in bounds; the gathered bytes are its buffers' bytes in order, and whatever the
//! parser accepts has the guest's and the host's addresses and a payload inside them; a
//! packet fills only the chain's writable buffers, in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ray_devices::virtio::vsock::packet::{self, HDR_LEN, HOST_CID, MAX_PAYLOAD};
use ray_devices::virtio::vsock::{check_chain, gather, scatter, EVENT, RX, TX};
use ray_fuzz::guest;
use ray_memory::GuestMemory;

const GUEST_CID: u64 = 3;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let queue = [RX, TX, EVENT][usize::from(data[1] % 3)];
    let flags = data[0];
    let packet_len = u16::from_le_bytes([data[2], data[3]]);
    let mem = guest::memory(&data[4..]);
    // What a receive or event chain gets: the input's own bytes, repeated to its length.
    let packet: Vec<u8> = (0..usize::from(packet_len) % (HDR_LEN + 4096) + 1)
        .map(|i| data[i % data.len()])
        .collect();
    let mut q = guest::queue(flags, &mem);
    let mut buf = Vec::new();
    guest::serve_chains(&mut q, &mem, |chain| {
        let mut written = 0;
        if check_chain(queue, chain).is_ok() {
            let total: u64 = chain.descriptors.iter().map(|d| u64::from(d.len)).sum();
            if queue == TX {
                assert!(chain.descriptors.iter().all(|d| !d.writable));
                assert!(
                    (HDR_LEN as u64..=(HDR_LEN as u64 + u64::from(MAX_PAYLOAD))).contains(&total)
                );
                gather(chain, &mem, &mut buf).expect("a checked chain reads");
                assert_eq!(buf.len() as u64, total);
                let mut at = 0;
                for d in &chain.descriptors {
                    let mut part = vec![0u8; d.len as usize];
                    mem.read(d.addr, &mut part).expect("inside");
                    assert_eq!(&buf[at..at + part.len()], &part[..]);
                    at += part.len();
                }
                if let Ok((h, payload)) = packet::parse_tx(&buf, GUEST_CID) {
                    assert_eq!((h.src_cid, h.dst_cid), (GUEST_CID, HOST_CID));
                    assert_eq!(payload.len(), h.len as usize);
                    assert!(HDR_LEN + payload.len() <= buf.len());
                }
            } else {
                assert!(chain.descriptors.iter().all(|d| d.writable));
                if packet.len() as u64 <= total {
                    let before = guest::bytes(&mem);
                    scatter(chain, &mem, &packet).expect("a checked chain takes the packet");
                    let after = guest::bytes(&mem);
                    let mut room = std::collections::HashSet::new();
                    let mut at = 0usize;
                    for d in &chain.descriptors {
                        for k in 0..u64::from(d.len) {
                            if at == packet.len() {
                                break;
                            }
                            room.insert(d.addr + k);
                            at += 1;
                        }
                    }
                    for ((gpa, a), (_, b)) in before.iter().zip(&after) {
                        if !room.contains(gpa) {
                            assert_eq!(a, b, "byte {gpa:#x} outside the packet's room");
                        }
                    }
                    written = packet.len() as u32;
                }
            }
        }
        written
    });
});
