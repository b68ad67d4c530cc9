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
use ray_devices::virtio::queue::Queue;
use ray_devices::virtio::vsock::packet::{self, HDR_LEN, HOST_CID, MAX_PAYLOAD};
use ray_devices::virtio::vsock::{check_chain, gather, scatter, EVENT, RX, TX};
use ray_memory::{GuestMemory, MemoryLayout, OwnedMemory};

const REGIONS: [(u64, u64); 2] = [(0, 0x8000), (0x10000, 0x8000)];
const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const GUEST_CID: u64 = 3;

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
    let queue = [RX, TX, EVENT][usize::from(data[1] % 3)];
    let flags = data[0];
    let packet_len = u16::from_le_bytes([data[2], data[3]]);
    let layout = MemoryLayout::new(&REGIONS).expect("a valid layout");
    let mem = OwnedMemory::zeroed(&layout).expect("64 KiB of memory");
    let mut rest = &data[4..];
    for &(base, size) in &REGIONS {
        let n = rest.len().min(size as usize);
        mem.write(base, &rest[..n]).expect("inside the region");
        rest = &rest[n..];
    }
    // What a receive or event chain gets: the input's own bytes, repeated to its length.
    let packet: Vec<u8> = (0..usize::from(packet_len) % (HDR_LEN + 4096) + 1)
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
    let mut buf = Vec::new();
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
        if check_chain(queue, &chain).is_ok() {
            let total: u64 = chain.descriptors.iter().map(|d| u64::from(d.len)).sum();
            if queue == TX {
                assert!(chain.descriptors.iter().all(|d| !d.writable));
                assert!(
                    (HDR_LEN as u64..=(HDR_LEN as u64 + u64::from(MAX_PAYLOAD))).contains(&total)
                );
                gather(&chain, &mem, &mut buf).expect("a checked chain reads");
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
                    let before = snapshot(&mem);
                    scatter(&chain, &mem, &packet).expect("a checked chain takes the packet");
                    let after = snapshot(&mem);
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
        if q.add_used(&mem, chain.head, written).is_err() {
            break;
        }
    }
});
