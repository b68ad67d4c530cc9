//! A split virtqueue driven by a hostile driver: the input sets the queue's size and ring
//! addresses and fills guest memory; the device pops, completes and decides interrupts
//! until the queue is empty or faults (indirect tables included when bit 1 of byte 8
//! negotiates them). Every chain it accepts must lie inside guest
//! memory (but for empty ones), be no longer than the queue, and keep device-readable
//! buffers first.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ray_devices::virtio::queue::Queue;
use ray_memory::{GuestMemory, MemoryLayout, OwnedMemory};

/// Guest memory: two regions with a hole between them, so that "inside memory" matters.
const REGIONS: [(u64, u64); 2] = [(0, 0x8000), (0x10000, 0x8000)];

/// Zero-length buffers are accepted wherever they point (the queue's choice: nothing can
/// be read or written through them).
fn inside(addr: u64, len: u32) -> bool {
    if len == 0 {
        return true;
    }
    let end = addr.checked_add(u64::from(len));
    REGIONS
        .iter()
        .any(|&(base, size)| addr >= base && end.is_some_and(|e| e <= base + size))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let word = |i: usize| u16::from_le_bytes([data[i], data[i + 1]]);
    let layout = MemoryLayout::new(&REGIONS).expect("a valid layout");
    let mem = OwnedMemory::zeroed(&layout).expect("64 KiB of memory");
    // The rest of the input is the guest's memory, region by region.
    let mut rest = &data[12..];
    for &(base, size) in &REGIONS {
        let n = rest.len().min(size as usize);
        mem.write(base, &rest[..n]).expect("inside the region");
        rest = &rest[n..];
    }

    let mut q = Queue::new(256);
    q.size = word(0) & 0x1ff;
    // Ring addresses anywhere in the first 128 KiB, holes and misalignment included.
    q.desc = u64::from(word(2)) * 2;
    q.avail = u64::from(word(4)) * 2;
    q.used = u64::from(word(6)) * 2;
    q.event_idx = data[8] & 1 != 0;
    q.indirect = data[8] & 2 != 0;
    q.next_avail = word(9);
    q.next_used = q.next_avail;
    if q.validate(&mem).is_err() {
        return;
    }
    q.ready = true;
    for _ in 0..2 * u32::from(q.size) + 2 {
        match q.pop(&mem) {
            Ok(None) | Err(_) => break,
            Ok(Some(Err((head, _)))) => {
                assert!(head < q.size);
                let _ = q.add_used(&mem, head, 0);
            }
            Ok(Some(Ok(chain))) => {
                assert!(chain.head < q.size);
                assert!(!chain.descriptors.is_empty());
                assert!(chain.descriptors.len() <= usize::from(q.size));
                let mut seen_writable = false;
                for d in &chain.descriptors {
                    assert!(inside(d.addr, d.len), "{d:?} outside guest memory");
                    assert!(!seen_writable || d.writable, "readable after writable");
                    seen_writable |= d.writable;
                }
                if q.add_used(&mem, chain.head, 0).is_err() {
                    break;
                }
            }
        }
        let _ = q.needs_interrupt(&mem);
    }
});
