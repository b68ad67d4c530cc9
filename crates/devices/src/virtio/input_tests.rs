//! The input model against guest memory and a recording transport.
use std::sync::{Arc, Mutex, Weak};

use ray_guest_abi::input::{EV_KEY, EV_LED, EV_SYN, KEY_ENTER, LED_CAPSL};
use ray_memory::mmap::SharedMappedMemory;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::completer::{Completer, InFlight, Transport};
use crate::virtio::queue::Descriptor;

#[derive(Default)]
struct Recorder(Vec<(u16, Vec<Used>)>);

impl Transport for Recorder {
    fn complete(&mut self, queue: u16, done: &[Used]) {
        self.0.push((queue, done.to_vec()));
    }
}

struct Rig {
    dev: Input,
    mem: Arc<dyn GuestMemory + Send + Sync>,
    transport: Arc<Mutex<Recorder>>,
}

fn rig(kind: Kind) -> Rig {
    let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_000)]).unwrap();
    let mem: Arc<dyn GuestMemory + Send + Sync> = Arc::new(SharedMappedMemory::new(Arc::new(mmap)));
    let transport = Arc::new(Mutex::new(Recorder::default()));
    let weak: Weak<Mutex<dyn Transport>> =
        Arc::downgrade(&(transport.clone() as Arc<Mutex<dyn Transport>>));
    let mut dev = Input::new(kind);
    dev.activate(DeviceContext {
        memory: mem.clone(),
        completer: Completer::new(weak, Arc::new(InFlight::default())),
    });
    Rig {
        dev,
        mem,
        transport,
    }
}

fn chain(head: u16, addr: u64, len: u32, writable: bool) -> Chain {
    Chain {
        head,
        descriptors: vec![Descriptor {
            addr,
            len,
            writable,
        }],
    }
}

impl Rig {
    fn give(&mut self, head: u16) -> Completion {
        let c = chain(head, 0x1000 + 8 * u64::from(head), 8, true);
        self.dev.process(EVENTQ, &c, &*self.mem)
    }

    fn event_at(&self, head: u16) -> Event {
        let mut b = [0u8; 8];
        self.mem.read(0x1000 + 8 * u64::from(head), &mut b).unwrap();
        Event::from_bytes(b)
    }

    fn config(&mut self, select: u8, subsel: u8) -> Vec<u8> {
        self.dev.write_config(0, &[select, subsel]);
        let mut size = [0u8];
        self.dev.read_config(2, &mut size);
        let mut data = vec![0u8; usize::from(size[0])];
        self.dev.read_config(DATA, &mut data);
        data
    }
}

#[test]
fn a_batch_fills_held_buffers_and_completes_them_together() {
    let mut r = rig(Kind::Keyboard);
    for head in 0..4 {
        assert_eq!(r.give(head), Completion::Pending);
    }
    let h = r.dev.handle();
    let batch = [
        Event::new(EV_KEY, KEY_ENTER, 1),
        Event::syn(),
        Event::new(EV_KEY, KEY_ENTER, 0),
        Event::syn(),
        Event::new(EV_KEY, 30, 1),
        Event::syn(),
    ];
    h.send(&batch);
    let done = std::mem::take(&mut r.transport.lock().unwrap().0);
    assert_eq!(
        done.len(),
        1,
        "one completion (one interrupt) for the batch"
    );
    assert_eq!(done[0].0, 0);
    assert_eq!(
        done[0]
            .1
            .iter()
            .map(|u| (u.head, u.len))
            .collect::<Vec<_>>(),
        vec![(0, 8), (1, 8), (2, 8), (3, 8)]
    );
    for (head, want) in batch[..4].iter().enumerate() {
        assert_eq!(r.event_at(head as u16), *want);
    }
    // The two events without a buffer go into the next buffers at once, in order.
    assert_eq!(r.give(9), Completion::Done(8));
    assert_eq!(r.event_at(9), batch[4]);
    assert_eq!(r.give(10), Completion::Done(8));
    assert_eq!(r.event_at(10).kind, EV_SYN);
    assert_eq!(r.give(11), Completion::Pending);
    let s = h.stats();
    assert_eq!((s.delivered, s.batches, s.dropped), (6, 1, 0));
    // Paused, events wait; held buffers go back to the driver.
    r.dev.pause();
    h.send(&[Event::new(EV_KEY, 30, 0), Event::syn()]);
    assert!(r.transport.lock().unwrap().0.is_empty());
    assert_eq!(r.dev.give_back(), vec![(EVENTQ, 1)]);
    r.dev.resume();
    assert_eq!(r.give(11), Completion::Done(8));
    assert_eq!(r.event_at(11), Event::new(EV_KEY, 30, 0));
}

#[test]
fn a_driver_that_takes_nothing_loses_events_beyond_the_limit() {
    let r = rig(Kind::Tablet);
    let h = r.dev.handle();
    let many = vec![Event::syn(); MAX_WAITING];
    h.send(&many);
    h.send(&[Event::syn(); 3]);
    assert_eq!(h.stats().dropped, 3);
}

#[test]
fn bad_buffers_and_status_events_are_refused() {
    let mut r = rig(Kind::Keyboard);
    let bad = chain(0, 0x1000, 4, true);
    let Completion::Failed(why) = r.dev.process(EVENTQ, &bad, &*r.mem) else {
        panic!("a 4-byte event buffer is taken");
    };
    assert!(why.contains("at least 8 bytes"), "{why}");
    let readable = chain(1, 0x1000, 8, false);
    assert!(matches!(
        r.dev.process(EVENTQ, &readable, &*r.mem),
        Completion::Failed(_)
    ));
    // Caps Lock on through the status queue.
    r.mem
        .write(0x2000, &Event::new(EV_LED, LED_CAPSL, 1).to_bytes())
        .unwrap();
    let status = chain(2, 0x2000, 8, false);
    assert_eq!(
        r.dev.process(STATUSQ, &status, &*r.mem),
        Completion::Done(0)
    );
    assert_eq!(r.dev.handle().stats().leds, 1 << LED_CAPSL);
    r.mem
        .write(0x2000, &Event::new(EV_LED, 9, 1).to_bytes())
        .unwrap();
    let Completion::Failed(why) = r.dev.process(STATUSQ, &status, &*r.mem) else {
        panic!("LED 9 is taken");
    };
    assert!(why.contains("not an LED the device has"), "{why}");
    let odd = chain(3, 0x2000, 5, false);
    assert!(matches!(
        r.dev.process(STATUSQ, &odd, &*r.mem),
        Completion::Failed(_)
    ));
    assert!(matches!(
        r.dev.process(2, &status, &*r.mem),
        Completion::Failed(_)
    ));
}

#[test]
fn the_configuration_describes_each_device() {
    let mut k = rig(Kind::Keyboard);
    assert_eq!(k.config(select::ID_NAME, 0), b"rayvisor keyboard");
    let ev = k.config(select::EV_BITS, 0);
    assert_eq!(ev[0] & (1 << EV_KEY), 1 << EV_KEY);
    assert_eq!(ev[2] & (1 << (EV_LED - 16)), 1 << (EV_LED - 16));
    let keys = k.config(select::EV_BITS, EV_KEY as u8);
    assert_eq!(keys.len(), 16);
    assert_eq!(keys[3] & (1 << 4), 1 << 4, "KEY_ENTER (28)");
    assert!(k.config(select::ABS_INFO, 0).is_empty());
    assert!(k.config(select::EV_BITS, EV_ABS as u8).is_empty());
    let ids = k.config(select::ID_DEVIDS, 0);
    assert_eq!(&ids[..2], &BUS_VIRTUAL.to_le_bytes());

    let mut t = rig(Kind::Tablet);
    assert_eq!(t.config(select::ID_NAME, 0), b"rayvisor tablet");
    let abs = t.config(select::ABS_INFO, ABS_Y as u8);
    assert_eq!(abs.len(), 20);
    assert_eq!(&abs[4..8], &ABS_MAX.to_le_bytes());
    let buttons = t.config(select::EV_BITS, EV_KEY as u8);
    assert_eq!(buttons.len(), 0x112 / 8 + 1);
    assert!(t.config(select::UNSET, 0).is_empty());
    // The read-only part ignores writes.
    t.dev.write_config(2, &[99]);
    let mut size = [0u8];
    t.dev.read_config(2, &mut size);
    assert_eq!(size[0], 0);
}
