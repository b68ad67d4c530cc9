//! The transport driven as a guest driver would, with virtio-rng behind it.
use std::sync::Arc;

use ray_memory::mmap::MappedMemory;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::interrupt::test_util::Recorder;
use crate::pci::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use crate::pci::msix::CONTROL_ENABLE;
use crate::virtio::completer::Used;
use crate::virtio::queue::tests::{desc, indirect_table, used_elem, used_idx, USED};
use crate::virtio::queue::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio::rng::Rng;
use crate::virtio::Completion;

type Mem = GuestMemoryMmap<()>;

struct Rig {
    mem: &'static Mem,
    /// The transport until [`Rig::share`]; then `shared`.
    dev: Option<VirtioPci>,
    shared: Option<Arc<std::sync::Mutex<VirtioPci>>>,
    irq: Arc<Recorder>,
}

fn rig() -> Rig {
    rig_with(Box::new(Rng))
}

fn rig_with(device: Box<dyn VirtioDevice>) -> Rig {
    let mem: &'static Mem = Box::leak(Box::new(
        Mem::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap(),
    ));
    let irq = Arc::new(Recorder::default());
    let view: Memory = Arc::new(MappedMemory::new(mem));
    let dev = VirtioPci::new("virtio-test", device, view, irq.clone(), 0xc000_0000);
    Rig {
        mem,
        dev: Some(dev),
        shared: None,
        irq,
    }
}

impl Rig {
    fn dev(&mut self) -> &mut VirtioPci {
        self.dev.as_mut().expect("the transport is shared")
    }

    /// Shares the transport (activating the device); register accesses go through the
    /// shared transport from then on.
    fn share(&mut self) -> Arc<std::sync::Mutex<VirtioPci>> {
        let shared = self.dev.take().expect("shared once").share();
        self.shared = Some(shared.clone());
        shared
    }

    fn with<R>(&mut self, f: impl FnOnce(&mut VirtioPci) -> R) -> R {
        match &self.shared {
            Some(s) => f(&mut s.lock().unwrap()),
            None => f(self.dev()),
        }
    }

    fn w(&mut self, off: u64, bytes: &[u8]) {
        self.with(|d| d.write_bar(0, off, bytes));
    }
    fn w8(&mut self, off: u64, v: u8) {
        self.w(off, &[v]);
    }
    fn w16(&mut self, off: u64, v: u16) {
        self.w(off, &v.to_le_bytes());
    }
    fn w32(&mut self, off: u64, v: u32) {
        self.w(off, &v.to_le_bytes());
    }
    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.with(|d| d.read_bar(0, off, &mut b[..len]));
        u64::from_le_bytes(b)
    }
    fn status(&mut self) -> u8 {
        self.r(0x14, 1) as u8
    }

    /// Walks the capability list: (cfg_type, offset) of each virtio capability, and the
    /// MSI-X capability's offset.
    fn capabilities(&mut self) -> (Vec<(u8, u32)>, usize) {
        let c = self.dev().config();
        let mut at = c.u16_at(0x34) as usize & 0xff;
        let (mut virtio, mut msix) = (Vec::new(), 0);
        while at != 0 {
            let mut hdr = [0u8; 16];
            c.read(at, &mut hdr);
            match hdr[0] {
                0x09 => virtio.push((hdr[3], c.u32_at(at + 8))),
                0x11 => msix = at,
                other => panic!("unexpected capability {other:#x}"),
            }
            at = usize::from(hdr[1]);
        }
        (virtio, msix)
    }

    /// What a driver does up to the queue set-up: decoding on, MSI-X on with vectors 0
    /// (config) and 1 (queue) unmasked, features negotiated.
    fn negotiate(&mut self, features: u64) {
        self.dev().write_config(
            COMMAND,
            &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        let (_, msix) = self.capabilities();
        self.dev()
            .write_config(msix + 2, &CONTROL_ENABLE.to_le_bytes());
        for v in 0..2u64 {
            self.w32(MSIX_TABLE + v * 16, 0xfee0_0000);
            self.w32(MSIX_TABLE + v * 16 + 8, 0x40 + v as u32);
            self.w32(MSIX_TABLE + v * 16 + 12, 0);
        }
        self.negotiate_again(features);
    }

    /// The virtio part of [`Rig::negotiate`], what a driver does again after a reset
    /// (PCI decoding and MSI-X stay as they were).
    fn negotiate_again(&mut self, features: u64) {
        self.w8(0x14, status::ACKNOWLEDGE);
        self.w8(0x14, status::ACKNOWLEDGE | status::DRIVER);
        self.w32(0x08, 0);
        self.w32(0x0c, features as u32);
        self.w32(0x08, 1);
        self.w32(0x0c, (features >> 32) as u32);
        self.w8(
            0x14,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.w16(0x10, 0);
    }

    fn setup_queue(&mut self, mock: &MockSplitQueue<'_, Mem>, size: u16) {
        self.setup_queue_at(0, mock, size, USED);
    }

    /// Sets up queue `q` on `mock`'s descriptor table and available ring, with its used
    /// ring at `used` and MSI-X vector 1.
    fn setup_queue_at(&mut self, q: u16, mock: &MockSplitQueue<'_, Mem>, size: u16, used: u64) {
        self.w16(0x16, q);
        self.w16(0x1a, 1);
        self.w16(0x18, size);
        self.w32(0x20, mock.desc_table_addr().0 as u32);
        self.w32(0x24, 0);
        self.w32(0x28, mock.avail_addr().0 as u32);
        self.w32(0x2c, 0);
        self.w(0x30, &used.to_le_bytes());
        self.w16(0x1c, 1);
    }

    fn driver_ok(&mut self) {
        let s = self.status();
        self.w8(0x14, s | status::DRIVER_OK);
    }

    fn kick(&mut self) {
        self.w16(NOTIFY, 0);
    }

    fn bytes(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }
}

fn used(r: &Rig, i: u64) -> (u32, u32) {
    used_elem(r.mem, i)
}

#[test]
fn capabilities_describe_the_bar_layout() {
    let mut r = rig();
    let (virtio, msix) = r.capabilities();
    assert_eq!(
        virtio,
        vec![
            (CAP_COMMON, COMMON as u32),
            (CAP_NOTIFY, NOTIFY as u32),
            (CAP_ISR, ISR as u32)
        ]
    );
    let c = r.dev().config();
    assert_eq!(c.u16_at(msix + 2), 1, "2 vectors: table size - 1");
    assert_eq!(c.u32_at(msix + 4), MSIX_TABLE as u32);
    assert_eq!(c.u32_at(msix + 8), MSIX_PBA as u32);
    assert_eq!(c.u16_at(2), 0x1044);
    assert_eq!(c.bar_address(0), Some(0xc000_0000));
    assert_eq!(r.dev().notify_address(0), 0xc000_3000);
}

#[test]
fn rng_requests_are_filled_in_a_batch_with_one_interrupt() {
    let mut r = rig();
    let mock = MockSplitQueue::new(r.mem, 16);
    r.negotiate(F_VERSION_1 | F_EVENT_IDX);
    assert_eq!(r.status() & status::FEATURES_OK, status::FEATURES_OK);
    assert_eq!(r.r(0x12, 2), 1, "one queue");
    assert_eq!(r.r(0x18, 2), 256, "maximum size offered");
    r.setup_queue(&mock, 16);
    r.driver_ok();
    mock.add_desc_chains(
        &[
            desc(0x10_0000, 32, DESC_F_WRITE, 0),
            desc(0x10_1000, 32, DESC_F_WRITE, 0),
            desc(0x10_2000, 16, DESC_F_WRITE | DESC_F_NEXT, 3),
            desc(0x10_3000, 16, DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    r.kick();
    assert_eq!(used_idx(r.mem), 3);
    assert_eq!(used(&r, 0), (0, 32));
    assert_eq!(used(&r, 1), (1, 32));
    assert_eq!(used(&r, 2), (2, 32));
    let (a, b) = (r.bytes(0x10_0000, 32), r.bytes(0x10_1000, 32));
    assert_ne!(a, vec![0; 32]);
    assert_ne!(a, b, "two requests get different bytes");
    assert_ne!(
        r.bytes(0x10_3000, 16),
        vec![0; 16],
        "both buffers of a chain"
    );
    assert_eq!(r.irq.take_fired(), vec![1], "one interrupt for the batch");
    assert_eq!(r.r(ISR, 1), 1, "ISR: queue interrupt, cleared by reading");
    assert_eq!(r.r(ISR, 1), 0);
    // The device asks to be kicked at the next entry.
    let avail_event = USED + 4 + 8 * 16;
    assert_eq!(r.mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(), 3);

    // The driver holds its interrupt back until used index 5: the next request is served
    // without one.
    let used_event = mock.avail_addr().0 + 4 + 2 * 16;
    r.mem.write_obj(5u16, GuestAddress(used_event)).unwrap();
    mock.add_desc_chains(&[desc(0x10_4000, 8, DESC_F_WRITE, 0)], 4)
        .unwrap();
    r.kick();
    assert_eq!(used_idx(r.mem), 4);
    assert!(r.irq.take_fired().is_empty());
}

#[test]
fn requests_larger_than_the_cap_are_cut() {
    let mut r = rig();
    let mock = MockSplitQueue::new(r.mem, 16);
    r.negotiate(F_VERSION_1);
    r.setup_queue(&mock, 16);
    r.driver_ok();
    mock.add_desc_chains(&[desc(0x10_0000, 0x10_0000, DESC_F_WRITE, 0)], 0)
        .unwrap();
    r.kick();
    assert_eq!(used(&r, 0), (0, crate::virtio::rng::MAX_REQUEST));
    assert_eq!(r.irq.take_fired(), vec![1]);
}

#[test]
fn malformed_requests_fail_alone() {
    let mut r = rig();
    let mock = MockSplitQueue::new(r.mem, 16);
    r.negotiate(F_VERSION_1);
    r.setup_queue(&mock, 16);
    r.driver_ok();
    mock.add_desc_chains(
        &[
            // A device-readable buffer: not an entropy request.
            desc(0x10_0000, 32, 0, 0),
            // Past the end of guest memory.
            desc(0x1f_fff0, 64, DESC_F_WRITE, 0),
            // A good one among them.
            desc(0x10_1000, 8, DESC_F_WRITE, 0),
            // Loops onto itself.
            desc(0x10_0000, 8, DESC_F_WRITE | DESC_F_NEXT, 3),
        ],
        0,
    )
    .unwrap();
    r.kick();
    assert_eq!(used_idx(r.mem), 4);
    assert_eq!(
        (0..4).map(|i| used(&r, i)).collect::<Vec<_>>(),
        vec![(0, 0), (1, 0), (2, 8), (3, 0)]
    );
    assert_eq!(r.bytes(0x10_0000, 32), vec![0; 32], "nothing written");
    assert_eq!(r.status() & status::NEEDS_RESET, 0, "the device goes on");
}

#[test]
fn bad_feature_negotiation_is_refused() {
    for features in [0, F_EVENT_IDX, F_VERSION_1 | 1 << 40, F_VERSION_1 | 1] {
        let mut r = rig();
        r.negotiate(features);
        assert_eq!(r.status() & status::FEATURES_OK, 0, "{features:#x}");
        // DRIVER_OK without FEATURES_OK: the device needs a reset and says so.
        r.driver_ok();
        let s = r.status();
        assert_eq!(s & status::DRIVER_OK, 0);
        assert_eq!(s & status::NEEDS_RESET, status::NEEDS_RESET);
        assert_eq!(r.irq.take_fired(), vec![0], "configuration-change vector");
        assert_eq!(r.r(0x15, 1), 1, "config generation moved");
        // A reset brings it back.
        r.w8(0x14, 0);
        assert_eq!(r.status(), 0);
        r.negotiate(F_VERSION_1);
        assert_eq!(r.status() & status::FEATURES_OK, status::FEATURES_OK);
    }
}

#[test]
fn queue_faults_need_a_reset_and_the_reset_recovers() {
    let mut r = rig();
    let mock = MockSplitQueue::new(r.mem, 16);
    r.negotiate(F_VERSION_1);
    // Rings outside guest memory: enabling fails.
    r.w16(0x18, 16);
    r.w32(0x20, 0);
    r.w32(0x24, 0x10);
    r.w16(0x1c, 1);
    assert_eq!(r.r(0x1c, 2), 0);
    assert_eq!(r.status() & status::NEEDS_RESET, status::NEEDS_RESET);
    r.w8(0x14, 0);

    // A size that is not a power of two.
    r.negotiate(F_VERSION_1);
    r.setup_queue(&mock, 12);
    assert_eq!(r.status() & status::NEEDS_RESET, status::NEEDS_RESET);
    r.w8(0x14, 0);

    // A runaway available index.
    r.negotiate(F_VERSION_1);
    r.setup_queue(&mock, 16);
    r.driver_ok();
    mock.avail().idx().store(100);
    r.kick();
    assert_eq!(r.status() & status::NEEDS_RESET, status::NEEDS_RESET);
    assert_eq!(used_idx(r.mem), 0);
    // Further kicks are ignored until the reset.
    r.kick();
    r.w8(0x14, 0);
    assert_eq!(r.r(0x1c, 2), 0, "queue disabled by the reset");
    assert_eq!(r.r(0x1a, 2), u64::from(NO_VECTOR));
    // Queue changes while enabled are ignored; vectors beyond the table read NO_VECTOR.
    mock.avail().idx().store(0);
    r.negotiate(F_VERSION_1);
    r.setup_queue(&mock, 16);
    r.w16(0x18, 8);
    assert_eq!(r.r(0x18, 2), 16);
    r.w16(0x1a, 7);
    assert_eq!(r.r(0x1a, 2), u64::from(NO_VECTOR));
}

#[test]
fn kicks_while_paused_are_served_on_resume() {
    let mut r = rig();
    let mock = MockSplitQueue::new(r.mem, 16);
    r.negotiate(F_VERSION_1);
    r.setup_queue(&mock, 16);
    r.driver_ok();
    r.dev().pause();
    mock.add_desc_chains(&[desc(0x10_0000, 8, DESC_F_WRITE, 0)], 0)
        .unwrap();
    r.kick();
    assert_eq!(used_idx(r.mem), 0);
    r.dev().resume();
    assert_eq!(used_idx(r.mem), 1);
}

#[test]
fn state_round_trips_and_bad_state_is_refused() {
    let mut r = rig();
    let mock = MockSplitQueue::new(r.mem, 16);
    r.negotiate(F_VERSION_1 | F_EVENT_IDX);
    r.setup_queue(&mock, 16);
    r.driver_ok();
    mock.add_desc_chains(&[desc(0x10_0000, 8, DESC_F_WRITE, 0)], 0)
        .unwrap();
    r.kick();
    r.irq.take_fired();
    let saved = r.dev().save_state().unwrap();

    // A new device over the same memory takes the state and goes on where it was.
    let irq = Arc::new(Recorder::default());
    let view: Memory = Arc::new(MappedMemory::new(r.mem));
    let mut back = VirtioPci::new("virtio-rng", Box::new(Rng), view, irq.clone(), 0xd000_0000);
    back.restore_state(&saved).unwrap();
    assert_eq!(back.save_state().unwrap(), saved);
    assert_eq!(
        back.bar_address(),
        0xc000_0000,
        "the guest's BAR address is kept"
    );
    assert_eq!(
        irq.last_route(1).unwrap().unwrap().data,
        0x41,
        "vectors re-routed"
    );
    mock.add_desc_chains(&[desc(0x10_1000, 8, DESC_F_WRITE, 0)], 1)
        .unwrap();
    let used_event = mock.avail_addr().0 + 4 + 2 * 16;
    r.mem.write_obj(1u16, GuestAddress(used_event)).unwrap();
    back.resume();
    assert_eq!(used_idx(r.mem), 2, "the request queued across the move");
    assert_eq!(irq.fired(), vec![1]);

    let refuse = |s: VirtioPciState, what: &str| {
        let view: Memory = Arc::new(MappedMemory::new(r.mem));
        let mut d = VirtioPci::new("virtio-rng", Box::new(Rng), view, irq.clone(), 0xc000_0000);
        let e = d.restore_state(&s).unwrap_err();
        assert!(e.contains(what), "{e}");
    };
    refuse(
        VirtioPciState {
            device_type: 2,
            ..saved.clone()
        },
        "type 2",
    );
    let mut s = saved.clone();
    s.queues.push(s.queues[0].clone());
    refuse(s, "2 queues");
    let mut s = saved.clone();
    s.registers.driver_features |= 1 << 50;
    refuse(s, "unoffered");
    let mut s = saved.clone();
    s.registers.queue_vectors[0] = 9;
    refuse(s, "vector");
    let mut s = saved.clone();
    s.queues[0].used = 1 << 40;
    refuse(s, "used ring");
    let mut s = saved.clone();
    s.queues[0].max_size = 1024;
    refuse(s, "maximum size");
    let mut s = saved.clone();
    s.config.push((0, 0x12));
    refuse(s, "not one a guest can write");
}

/// Answers every request `Pending` and hands its context and the heads to the test, as a
/// device with a worker pool would.
struct Deferred {
    taken: Arc<std::sync::Mutex<Vec<u16>>>,
    context: Arc<std::sync::Mutex<Option<DeviceContext>>>,
    /// Its `hold_kicks_at`.
    hold: usize,
}

impl VirtioDevice for Deferred {
    fn device_type(&self) -> u16 {
        crate::virtio::DEVICE_TYPE_RNG
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_sizes(&self) -> &[u16] {
        &[16]
    }
    fn process(
        &mut self,
        _queue: usize,
        chain: &crate::virtio::queue::Chain,
        _memory: &(dyn GuestMemory + Send + Sync),
    ) -> Completion {
        self.taken.lock().unwrap().push(chain.head);
        Completion::Pending
    }
    fn activate(&mut self, context: DeviceContext) {
        *self.context.lock().unwrap() = Some(context);
    }
    fn hold_kicks_at(&self) -> usize {
        self.hold
    }
}

/// A rig around [`Deferred`], and the heads it takes and its context once activated.
type Taken = Arc<std::sync::Mutex<Vec<u16>>>;
type Context = Arc<std::sync::Mutex<Option<DeviceContext>>>;

fn deferred_rig() -> (Rig, Taken, Context) {
    deferred_rig_holding(0)
}

fn deferred_rig_holding(hold: usize) -> (Rig, Taken, Context) {
    let taken = Arc::default();
    let context = Arc::default();
    let r = rig_with(Box::new(Deferred {
        taken: Arc::clone(&taken),
        context: Arc::clone(&context),
        hold,
    }));
    (r, taken, context)
}

#[test]
fn a_busy_device_that_holds_kicks_takes_new_requests_at_completions() {
    let (mut r, taken, context) = deferred_rig_holding(2);
    let mock = MockSplitQueue::new(r.mem, 16);
    r.negotiate(F_VERSION_1 | F_EVENT_IDX);
    r.setup_queue(&mock, 16);
    r.driver_ok();
    let mem = r.mem;
    let shared = r.share();
    let completer = completer_of(&context);
    let avail_event = || {
        mem.read_obj::<u16>(GuestAddress(USED + 4 + 8 * 16))
            .unwrap()
    };
    let chain = |i: u16| desc(0x10_0000 + 0x1000 * u64::from(i), 32, DESC_F_WRITE, 0);
    mock.add_desc_chains(&[chain(0), chain(1), chain(2)], 0)
        .unwrap();
    r.kick();
    assert_eq!(*taken.lock().unwrap(), vec![0, 1, 2]);
    // Three pending, two or more hold kicks back: the driver is not asked to kick.
    assert_eq!(avail_event(), 0, "no kick asked for while busy");

    // The driver adds a request without kicking; the next completion takes it.
    mock.add_desc_chains(&[chain(3)], 3).unwrap();
    completer.complete(0, &[Used { head: 0, len: 32 }]);
    assert_eq!(*taken.lock().unwrap(), vec![0, 1, 2, 3]);
    assert_eq!(used_idx(mem), 1);
    assert_eq!(avail_event(), 0);
    completer.complete(0, &[Used { head: 1, len: 32 }]);
    assert_eq!(avail_event(), 0, "two still pending");
    // One left pending: kicks are asked for again, from the next request on.
    completer.complete(0, &[Used { head: 2, len: 32 }]);
    assert_eq!(avail_event(), 4);
    completer.complete(0, &[Used { head: 3, len: 32 }]);
    assert_eq!(used_idx(mem), 4);
    assert_eq!(shared.lock().unwrap().in_flight().count(), 0);

    // Paused, completions serve nothing; resuming serves what came meanwhile.
    mock.add_desc_chains(&[chain(4), chain(5), chain(6)], 4)
        .unwrap();
    r.kick();
    assert_eq!(taken.lock().unwrap().len(), 7);
    shared.lock().unwrap().pause();
    mock.add_desc_chains(&[chain(7)], 7).unwrap();
    completer.complete(0, &[Used { head: 4, len: 32 }]);
    assert_eq!(taken.lock().unwrap().len(), 7, "nothing taken while paused");
    shared.lock().unwrap().resume();
    assert_eq!(*taken.lock().unwrap().last().unwrap(), 7);
}

fn completer_of(context: &std::sync::Mutex<Option<DeviceContext>>) -> Completer {
    context
        .lock()
        .unwrap()
        .clone()
        .expect("activated")
        .completer
}

#[test]
fn pending_requests_complete_from_another_thread_in_one_batch_and_pause_waits_for_them() {
    let (mut r, taken, context) = deferred_rig();
    let mock = MockSplitQueue::new(r.mem, 16);
    r.negotiate(F_VERSION_1 | F_EVENT_IDX);
    r.setup_queue(&mock, 16);
    r.driver_ok();
    let (mem, irq) = (r.mem, r.irq.clone());
    let shared = r.share();
    let completer = completer_of(&context);
    mock.add_desc_chains(
        &[
            desc(0x10_0000, 32, DESC_F_WRITE, 0),
            desc(0x10_1000, 32, DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    shared.lock().unwrap().notify(0);
    assert_eq!(*taken.lock().unwrap(), vec![0, 1]);
    assert_eq!(used_idx(mem), 0, "nothing used yet");
    let in_flight = shared.lock().unwrap().in_flight();
    assert_eq!(in_flight.count(), 2);
    shared.lock().unwrap().pause();

    let worker = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        completer.complete(0, &[Used { head: 1, len: 7 }, Used { head: 0, len: 32 }]);
    });
    // Pausing waits without the transport's lock, which the completing thread takes.
    assert_eq!(in_flight.wait_idle(std::time::Duration::from_secs(5)), 0);
    worker.join().unwrap();
    assert_eq!(used_idx(mem), 2);
    assert_eq!(used_elem(mem, 0), (1, 7));
    assert_eq!(used_elem(mem, 1), (0, 32));
    assert_eq!(irq.take_fired(), vec![1], "one interrupt for the batch");
}

#[test]
fn completions_from_before_a_reset_are_dropped() {
    let (mut r, taken, context) = deferred_rig();
    let mock = MockSplitQueue::new(r.mem, 16);
    r.negotiate(F_VERSION_1);
    r.setup_queue(&mock, 16);
    r.driver_ok();
    let shared = r.share();
    let completer = completer_of(&context);
    mock.add_desc_chains(&[desc(0x10_0000, 32, DESC_F_WRITE, 0)], 0)
        .unwrap();
    r.kick();
    assert_eq!(*taken.lock().unwrap(), vec![0]);

    // The driver resets the device and sets up fresh rings while head 0 is with the
    // device; the old request's completion arrives only now.
    r.w8(0x14, 0);
    let mock = MockSplitQueue::create(r.mem, GuestAddress(0x8_0000), 16);
    r.mem.write_slice(&[0; 4], GuestAddress(USED)).unwrap();
    r.negotiate_again(F_VERSION_1);
    r.setup_queue(&mock, 16);
    r.driver_ok();
    completer.complete(0, &[Used { head: 0, len: 32 }]);
    assert_eq!(
        used_idx(r.mem),
        0,
        "a completion from before the reset is dropped"
    );
    assert_eq!(shared.lock().unwrap().in_flight().count(), 0);

    // A completion naming a head the device never took is dropped too; a real one lands.
    completer.complete(0, &[Used { head: 5, len: 1 }]);
    assert_eq!(used_idx(r.mem), 0);
    mock.add_desc_chains(&[desc(0x10_1000, 32, DESC_F_WRITE, 0)], 0)
        .unwrap();
    r.kick();
    let head = *taken.lock().unwrap().last().unwrap();
    completer.complete(0, &[Used { head, len: 9 }]);
    assert_eq!(used_idx(r.mem), 1);
    assert_eq!(used_elem(r.mem, 0), (u32::from(head), 9));
}

#[test]
fn a_virtio_gpu_answers_through_the_transport_and_signals_a_resize() {
    use crate::virtio::gpu::commands::Limits;
    use crate::virtio::gpu::protocol::{
        CMD_RESOURCE_FLUSH, EVENT_DISPLAY, HDR_LEN, RESP_ERR_INVALID_RESOURCE_ID,
    };
    use crate::virtio::gpu::Gpu;

    let (gpu, displays) = Gpu::new(&[(64, 32)], Limits::default()).unwrap();
    let mut r = rig_with(Box::new(gpu));
    let mock = MockSplitQueue::new(r.mem, 16);
    r.negotiate(F_VERSION_1);
    r.setup_queue(&mock, 16);
    r.driver_ok();
    r.share();
    // A flush of a resource that does not exist: an error answer, the queue goes on.
    let mut req = vec![0u8; HDR_LEN + 24];
    req[..4].copy_from_slice(&CMD_RESOURCE_FLUSH.to_le_bytes());
    req[HDR_LEN + 16..HDR_LEN + 20].copy_from_slice(&9u32.to_le_bytes());
    r.mem.write_slice(&req, GuestAddress(0x10_0000)).unwrap();
    mock.add_desc_chains(
        &[
            desc(0x10_0000, req.len() as u32, DESC_F_NEXT, 1),
            desc(0x10_1000, 64, DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    r.kick();
    assert_eq!(used(&r, 0), (0, HDR_LEN as u32));
    assert_eq!(
        r.bytes(0x10_1000, 4),
        RESP_ERR_INVALID_RESOURCE_ID.to_le_bytes()
    );
    assert_eq!(r.irq.take_fired(), vec![1]);
    assert_eq!(r.r(ISR, 1), 1, "a queue interrupt");

    // The host resizes: a configuration interrupt (vector 0), the ISR's config bit, a new
    // configuration generation and EVENT_DISPLAY until the driver clears it.
    let generation = r.r(0x15, 1);
    displays.resize(0, 128, 64).unwrap();
    assert_eq!(r.irq.take_fired(), vec![0]);
    assert_eq!(r.r(ISR, 1), 2);
    assert_ne!(r.r(0x15, 1), generation);
    assert_eq!(r.r(DEVICE_CONFIG, 4), u64::from(EVENT_DISPLAY));
    assert_eq!(r.r(DEVICE_CONFIG + 8, 4), 1, "one scanout");
    r.w32(DEVICE_CONFIG + 4, EVENT_DISPLAY);
    assert_eq!(r.r(DEVICE_CONFIG, 4), 0);
}

// Indirect descriptor tables (VIRTIO_RING_F_INDIRECT_DESC, offered by the transport to
// every device) with virtio-rng, virtio-net and virtio-vsock behind the transport: a good
// chain in an indirect table is served, malformed tables fail their chain alone.

/// Where queue `q` of these tests lives: the mock's descriptor table and available ring
/// from `RINGS + q * 0x2000`, its used ring 0x1000 above them.
const RINGS: u64 = 0x4_0000;

fn ring_of(r: &Rig, q: u16) -> (MockSplitQueue<'static, Mem>, u64) {
    let base = RINGS + u64::from(q) * 0x2000;
    (
        MockSplitQueue::create(r.mem, GuestAddress(base), 16),
        base + 0x1000,
    )
}

/// (used index, entries as (head, len)) of the used ring at `used`.
fn used_ring(mem: &Mem, used: u64) -> (u16, Vec<(u32, u32)>) {
    let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    let entries = (0..u64::from(idx).min(16))
        .map(|i| {
            let at = used + 4 + 8 * i;
            (
                mem.read_obj(GuestAddress(at)).unwrap(),
                mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        })
        .collect();
    (idx, entries)
}

/// Polls the used ring at `used` until it holds `n` entries (devices with an I/O thread
/// complete from there), at most 10 s; returns them sorted by head.
fn wait_used(mem: &Mem, used: u64, n: u16) -> Vec<(u32, u32)> {
    let t0 = std::time::Instant::now();
    loop {
        let (idx, mut entries) = used_ring(mem, used);
        if idx >= n {
            assert_eq!(idx, n, "more used entries than requests: {entries:?}");
            entries.sort();
            return entries;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "{idx} of {n} requests used after 10 s: {entries:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A buffer that a malformed chain names and that must stay untouched.
const UNTOUCHED: u64 = 0x15_0000;

/// Makes three malformed indirect chains available at heads `first..first + 3`: a table
/// that names another table (nested), a table reaching past the end of guest memory, and
/// a table whose length is no whole number of descriptors. Each table (or the nested
/// one) names [`UNTOUCHED`] as a device-writable buffer.
fn add_bad_indirect_chains(r: &Rig, mock: &MockSplitQueue<'_, Mem>, first: u16) {
    indirect_table(r.mem, 0x17_0000, &[(0x17_1000, 16, DESC_F_INDIRECT, 0)]);
    indirect_table(r.mem, 0x17_1000, &[(UNTOUCHED, 4096, DESC_F_WRITE, 0)]);
    indirect_table(
        r.mem,
        0x17_2000,
        &[
            (UNTOUCHED, 2048, DESC_F_WRITE | DESC_F_NEXT, 1),
            (UNTOUCHED + 2048, 2048, DESC_F_WRITE, 0),
        ],
    );
    let end = 0x20_0000u64;
    for (i, d) in [
        desc(0x17_0000, 16, DESC_F_INDIRECT, 0),
        desc(end - 16, 32, DESC_F_INDIRECT, 0),
        desc(0x17_2000, 24, DESC_F_INDIRECT, 0),
    ]
    .into_iter()
    .enumerate()
    {
        mock.add_desc_chains(&[d], first + i as u16).unwrap();
    }
}

/// What [`add_bad_indirect_chains`] must leave: each chain used with nothing written, the
/// untouched buffer zero, and the device not in NEEDS_RESET.
fn assert_bad_chains_failed_alone(r: &mut Rig, used: &[(u32, u32)], first: u16) {
    for h in first..first + 3 {
        assert!(
            used.contains(&(u32::from(h), 0)),
            "malformed chain {h} is used with 0 bytes: {used:?}"
        );
    }
    assert_eq!(r.bytes(UNTOUCHED, 4096), vec![0; 4096], "nothing written");
    assert_eq!(r.status() & status::NEEDS_RESET, 0, "the device goes on");
}

fn kick_queue(r: &mut Rig, q: u16) {
    r.w16(NOTIFY + u64::from(q) * NOTIFY_MULTIPLIER, 0);
}

#[test]
fn rng_serves_indirect_chains_and_fails_malformed_tables_alone() {
    let mut r = rig();
    r.negotiate(F_VERSION_1 | F_INDIRECT_DESC);
    assert_eq!(r.status() & status::FEATURES_OK, status::FEATURES_OK);
    let (mock, used) = ring_of(&r, 0);
    r.setup_queue_at(0, &mock, 16, used);
    r.driver_ok();
    indirect_table(
        r.mem,
        0x18_0000,
        &[
            (0x10_0000, 16, DESC_F_WRITE | DESC_F_NEXT, 1),
            (0x10_1000, 48, DESC_F_WRITE, 0),
        ],
    );
    mock.add_desc_chains(&[desc(0x18_0000, 32, DESC_F_INDIRECT, 0)], 0)
        .unwrap();
    add_bad_indirect_chains(&r, &mock, 1);
    // A good chain after the bad ones: the queue goes on.
    indirect_table(r.mem, 0x18_1000, &[(0x10_2000, 8, DESC_F_WRITE, 0)]);
    mock.add_desc_chains(&[desc(0x18_1000, 16, DESC_F_INDIRECT, 0)], 4)
        .unwrap();
    kick_queue(&mut r, 0);
    let got = wait_used(r.mem, used, 5);
    assert!(got.contains(&(0, 64)) && got.contains(&(4, 8)), "{got:?}");
    assert_ne!(r.bytes(0x10_0000, 16), vec![0; 16]);
    assert_ne!(r.bytes(0x10_1000, 48), vec![0; 48]);
    assert_ne!(r.bytes(0x10_2000, 8), vec![0; 8]);
    assert_bad_chains_failed_alone(&mut r, &got, 1);
}

#[test]
fn net_serves_indirect_chains_both_ways_and_fails_malformed_tables_alone() {
    use crate::virtio::net::Net;
    use std::os::unix::net::UnixDatagram;

    // The NIC's backend: one end of a datagram socket pair (a packet per datagram, as a
    // TAP gives), the test holding the other.
    let (tap, wire) = UnixDatagram::pair().unwrap();
    tap.set_nonblocking(true).unwrap();
    wire.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let net = Net::new(
        [2, 0, 0, 0, 0, 7],
        std::fs::File::from(std::os::fd::OwnedFd::from(tap)),
        Default::default(),
        None,
    )
    .unwrap();
    let mut r = rig_with(Box::new(net));
    r.negotiate(F_VERSION_1 | F_INDIRECT_DESC);
    assert_eq!(r.status() & status::FEATURES_OK, status::FEATURES_OK);
    let (rx, rx_used) = ring_of(&r, 0);
    let (tx, tx_used) = ring_of(&r, 1);
    r.setup_queue_at(0, &rx, 16, rx_used);
    r.setup_queue_at(1, &tx, 16, tx_used);
    r.driver_ok();
    r.share();

    // Transmit: the 12-byte header and a 60-byte frame, both in one indirect table.
    let frame: Vec<u8> = (0..60u8).collect();
    r.mem
        .write_slice(&[0; 12], GuestAddress(0x11_0000))
        .unwrap();
    r.mem.write_slice(&frame, GuestAddress(0x11_1000)).unwrap();
    indirect_table(
        r.mem,
        0x18_0000,
        &[(0x11_0000, 12, DESC_F_NEXT, 1), (0x11_1000, 60, 0, 0)],
    );
    tx.add_desc_chains(&[desc(0x18_0000, 32, DESC_F_INDIRECT, 0)], 0)
        .unwrap();
    kick_queue(&mut r, 1);
    let mut got = [0u8; 256];
    let n = wire.recv(&mut got).unwrap();
    assert_eq!(&got[..12], &[0; 12]);
    assert_eq!(&got[12..n], &frame[..]);
    assert_eq!(wait_used(r.mem, tx_used, 1), vec![(0, 0)]);

    // Receive: a header buffer and a frame buffer in one indirect table; malformed tables
    // around it on the same queue.
    indirect_table(
        r.mem,
        0x18_1000,
        &[
            (0x12_0000, 12, DESC_F_WRITE | DESC_F_NEXT, 1),
            (0x12_1000, 1514, DESC_F_WRITE, 0),
        ],
    );
    rx.add_desc_chains(&[desc(0x18_1000, 32, DESC_F_INDIRECT, 0)], 0)
        .unwrap();
    add_bad_indirect_chains(&r, &rx, 1);
    kick_queue(&mut r, 0);
    let mut packet = vec![0u8; 12];
    packet.extend((0..100u8).map(|b| b ^ 0x5a));
    wire.send(&packet).unwrap();
    let used = wait_used(r.mem, rx_used, 4);
    assert!(used.contains(&(0, 112)), "{used:?}");
    assert_eq!(r.bytes(0x12_1000, 100), packet[12..]);
    assert_bad_chains_failed_alone(&mut r, &used, 1);
}

#[test]
fn vsock_serves_indirect_chains_and_fails_malformed_tables_alone() {
    use crate::virtio::vsock::packet::{op, Header, HDR_LEN};
    use crate::virtio::vsock::Vsock;
    use std::io::Write;

    let dir = std::env::temp_dir().join(format!("ray-vsock-indirect-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("v.sock");
    let mut r = rig_with(Box::new(
        Vsock::new(3, socket.clone(), crate::virtio::vsock::Opener::Own).unwrap(),
    ));
    r.negotiate(F_VERSION_1 | F_INDIRECT_DESC);
    assert_eq!(r.status() & status::FEATURES_OK, status::FEATURES_OK);
    let rings: Vec<_> = (0..3).map(|q| ring_of(&r, q)).collect();
    for (q, (mock, used)) in rings.iter().enumerate() {
        r.setup_queue_at(q as u16, mock, 16, *used);
    }
    r.driver_ok();
    r.share();
    let (rx, rx_used) = &rings[0];

    // A receive buffer split over an indirect table: the packet header (44 bytes) and
    // room for data.
    indirect_table(
        r.mem,
        0x18_0000,
        &[
            (0x12_0000, HDR_LEN as u32, DESC_F_WRITE | DESC_F_NEXT, 1),
            (0x12_1000, 4096, DESC_F_WRITE, 0),
        ],
    );
    rx.add_desc_chains(&[desc(0x18_0000, 32, DESC_F_INDIRECT, 0)], 0)
        .unwrap();
    add_bad_indirect_chains(&r, rx, 1);
    kick_queue(&mut r, 0);
    // A host process connects to guest port 5000: the device writes the guest a REQUEST
    // into the indirect buffer.
    let mut host = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    host.write_all(b"CONNECT 5000\n").unwrap();
    let used = wait_used(r.mem, *rx_used, 4);
    assert!(used.contains(&(0, HDR_LEN as u32)), "{used:?}");
    let h = Header::parse(&r.bytes(0x12_0000, HDR_LEN)).unwrap();
    assert_eq!((h.op, h.dst_cid, h.dst_port), (op::REQUEST, 3, 5000));
    assert_bad_chains_failed_alone(&mut r, &used, 1);
    drop(host);
    drop(r);
    let _ = std::fs::remove_dir_all(&dir);
}
