//! virtio-rng and virtio-input chains from a hostile driver. Byte 0 picks the device
//! (rng, keyboard or tablet), the queue (an input device's event or status queue) and
//! whether EVENT_IDX and indirect tables are negotiated; bytes 1-2 are what the driver
//! writes to an input device's configuration selector (select, subsel), byte 3 how many
//! host events wait for the event queue; the rest fills guest memory holding the queue.
//! Checked beyond "no panic": nothing outside a chain's device-writable buffers changes
//! (nothing at all for a status request), an entropy request gets no more bytes than its
//! buffers hold nor than the per-request cap, an event buffer gets exactly one event, and
//! the configuration's size byte never claims more than its payload.
#![no_main]

use std::sync::{Arc, Mutex, Weak};

use libfuzzer_sys::fuzz_target;
use ray_devices::virtio::input::{Input, Kind, EVENTQ, STATUSQ};
use ray_devices::virtio::queue::Chain;
use ray_devices::virtio::rng::{Rng, MAX_REQUEST};
use ray_devices::virtio::{
    Completer, Completion, DeviceContext, InFlight, Transport, Used, VirtioDevice,
};
use ray_fuzz::guest::{self, QUEUE_SIZE, REGIONS};
use ray_guest_abi::input::Event;
use ray_memory::{GuestMemory, OwnedMemory};

/// The input device's configuration: select, subsel, size, 5 reserved, 128 payload bytes.
const CONFIG_LEN: usize = 136;
const PAYLOAD: usize = 8;

/// Completions of requests a device finishes later (an event buffer held for an event).
struct Ignore;

impl Transport for Ignore {
    fn complete(&mut self, _: u16, _: &[Used]) {}
}

fn snapshot(mem: &OwnedMemory) -> Vec<u8> {
    let mut all = Vec::new();
    for &(base, size) in &REGIONS {
        let mut b = vec![0u8; size as usize];
        mem.read(base, &mut b).expect("inside");
        all.extend(b);
    }
    all
}

/// Offset in [`snapshot`] of guest address `gpa` (inside a region).
fn index(gpa: u64) -> Option<usize> {
    let mut at = 0;
    for &(base, size) in &REGIONS {
        if (base..base + size).contains(&gpa) {
            return Some(at + (gpa - base) as usize);
        }
        at += size as usize;
    }
    None
}

/// Which bytes the device may write for `chain`: its device-writable buffers.
fn writable(chain: &Chain) -> Vec<bool> {
    let mut may = vec![false; REGIONS.iter().map(|r| r.1 as usize).sum()];
    for d in chain.descriptors.iter().filter(|d| d.writable) {
        for k in 0..u64::from(d.len) {
            if let Some(i) = index(d.addr + k) {
                may[i] = true;
            }
        }
    }
    may
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let flags = data[0];
    let mem = Arc::new(guest::memory(&data[4..]));
    let transport: Arc<Mutex<dyn Transport>> = Arc::new(Mutex::new(Ignore));
    let weak: Weak<Mutex<dyn Transport>> = Arc::downgrade(&transport);
    let context = DeviceContext {
        memory: mem.clone(),
        completer: Completer::new(weak, Arc::new(InFlight::default())),
    };
    let (mut dev, queue): (Box<dyn VirtioDevice>, usize) = match flags & 3 {
        0 | 3 => (Box::new(Rng), 0),
        kind => {
            let kind = if kind == 1 {
                Kind::Keyboard
            } else {
                Kind::Tablet
            };
            let mut input = Input::new(kind);
            // What the driver selects, then every configuration byte read back.
            input.write_config(0, &data[1..3]);
            let mut config = [0u8; CONFIG_LEN];
            input.read_config(0, &mut config);
            assert_eq!(&config[..2], &data[1..3]);
            let size = usize::from(config[2]);
            assert!(size <= CONFIG_LEN - PAYLOAD, "size {size}");
            assert!(config[PAYLOAD + size..].iter().all(|&b| b == 0));
            let handle = input.handle();
            input.activate(context);
            let events: Vec<Event> = (0..data[3] % 8)
                .map(|i| Event::new(1, u16::from(i), u32::from(data[3])))
                .collect();
            handle.send(&events);
            let queue = if flags & 4 != 0 { STATUSQ } else { EVENTQ };
            (Box::new(input), queue)
        }
    };
    // Bits 3 and 4 negotiate EVENT_IDX and indirect descriptors.
    let mut q = guest::queue(flags >> 3, &*mem);
    for _ in 0..2 * QUEUE_SIZE {
        let chain = match q.pop(&*mem) {
            Ok(None) | Err(_) => break,
            Ok(Some(Err((head, _)))) => {
                let _ = q.add_used(&*mem, head, 0);
                continue;
            }
            Ok(Some(Ok(chain))) => chain,
        };
        let before = snapshot(&mem);
        let done = dev.process(queue, &chain, &*mem);
        let after = snapshot(&mem);
        let may = if queue == STATUSQ && flags & 3 != 0 && flags & 3 != 3 {
            vec![false; before.len()]
        } else {
            writable(&chain)
        };
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            assert!(
                a == b || may[i],
                "byte {i} outside the chain's writable buffers changed"
            );
        }
        let room: u64 = chain
            .descriptors
            .iter()
            .filter(|d| d.writable)
            .map(|d| u64::from(d.len))
            .sum();
        let written = match done {
            Completion::Done(n) => {
                assert!(u64::from(n) <= room, "{n} bytes written into {room}");
                if flags & 3 == 0 || flags & 3 == 3 {
                    assert!(n <= MAX_REQUEST);
                } else if queue == EVENTQ {
                    assert_eq!(n as usize, Event::LEN);
                } else {
                    assert_eq!(n, 0);
                }
                n
            }
            Completion::Failed(_) => {
                assert_eq!(before, after, "a failed request wrote");
                0
            }
            // An event buffer held until an event comes.
            Completion::Pending => continue,
        };
        if q.add_used(&*mem, chain.head, written).is_err() {
            break;
        }
    }
});
