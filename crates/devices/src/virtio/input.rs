//! virtio-input (§5.8): a keyboard and a tablet (absolute pointer) fed by the host.
//!
//! The driver fills the event queue with 8-byte device-writable buffers; the device holds
//! them ([`Completion::Pending`]) until the host sends events through an [`InputHandle`]
//! (a VNC viewer's keys, `ray gpu type`). A batch of events (a key press and its
//! `SYN_REPORT`, a whole typed line) fills as many held buffers as it needs and completes
//! them together: one used-ring update and at most one interrupt per batch. Events that
//! find no buffer wait (up to [`MAX_WAITING`]) and go into the next buffers the driver
//! adds. The status queue carries the driver's LED changes; they are checked and kept.
//!
//! The configuration is a window the driver selects with `select`/`subsel` (offsets 0 and
//! 1): the name, the ids, the event types and codes the device sends, the axes' ranges.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use ray_guest_abi::input::{
    Event, ABS_MAX, ABS_X, ABS_Y, BTN_LEFT, BTN_MIDDLE, BTN_RIGHT, EV_ABS, EV_KEY, EV_LED, EV_REL,
    EV_REP, EV_SYN, KEY_MAX_USED, LED_COUNT, REL_WHEEL,
};
use ray_memory::GuestMemory;

use super::completer::Used;
use super::queue::Chain;
use super::{Completion, DeviceContext, VirtioDevice, WarnLimit};

pub const DEVICE_TYPE_INPUT: u16 = 18;
pub const QUEUE_SIZE: u16 = 64;
pub const EVENTQ: usize = 0;
pub const STATUSQ: usize = 1;
/// Events kept for a driver that has no buffer free; more are dropped (and counted).
pub const MAX_WAITING: usize = 4096;

/// Configuration selectors (§5.8.4).
pub mod select {
    pub const UNSET: u8 = 0;
    pub const ID_NAME: u8 = 1;
    pub const ID_SERIAL: u8 = 2;
    pub const ID_DEVIDS: u8 = 3;
    pub const PROP_BITS: u8 = 0x10;
    pub const EV_BITS: u8 = 0x11;
    pub const ABS_INFO: u8 = 0x12;
}

/// Offset of the selected data in the configuration; it is at most 128 bytes.
const DATA: u64 = 8;
const CONFIG_LEN: u64 = DATA + 128;
/// `BUS_VIRTUAL` in `linux/input.h`.
const BUS_VIRTUAL: u16 = 0x06;
/// Our ids in `ID_DEVIDS`: the vendor is rayvisor's own number.
const VENDOR: u16 = 0x5241;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Keyboard,
    Tablet,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Keyboard => "rayvisor keyboard",
            Kind::Tablet => "rayvisor tablet",
        }
    }

    /// The codes of event type `ev` this device sends.
    fn codes(self, ev: u16) -> Vec<u16> {
        match (self, ev) {
            (Kind::Keyboard, EV_KEY) => (1..=KEY_MAX_USED).collect(),
            (Kind::Keyboard, EV_LED) => (0..LED_COUNT).collect(),
            // Autorepeat is the driver's (an empty bitmap announces the type).
            (Kind::Keyboard, EV_REP) => Vec::new(),
            (Kind::Tablet, EV_KEY) => vec![BTN_LEFT, BTN_RIGHT, BTN_MIDDLE],
            (Kind::Tablet, EV_ABS) => vec![ABS_X, ABS_Y],
            (Kind::Tablet, EV_REL) => vec![REL_WHEEL],
            _ => Vec::new(),
        }
    }

    fn event_types(self) -> &'static [u16] {
        match self {
            Kind::Keyboard => &[EV_KEY, EV_LED, EV_REP],
            Kind::Tablet => &[EV_KEY, EV_ABS, EV_REL],
        }
    }
}

/// What the device and its handles count; read for the log and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InputStats {
    /// Events written into the driver's buffers.
    pub delivered: u64,
    /// Batches completed (each at most one interrupt).
    pub batches: u64,
    /// Events dropped because the driver left too many waiting.
    pub dropped: u64,
    /// The keyboard's LEDs as the driver last set them (bit n = LED n).
    pub leds: u32,
}

#[derive(Default)]
struct State {
    /// Event buffers the driver gave, oldest first.
    held: VecDeque<Chain>,
    /// Events waiting for a buffer.
    waiting: VecDeque<Event>,
    context: Option<DeviceContext>,
    paused: bool,
    stats: InputStats,
    warn: WarnLimit,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The host's end of one input device: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct InputHandle {
    kind: Kind,
    shared: Shared,
}

impl InputHandle {
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Sends `events` as one batch. With no driver (yet) they wait, up to [`MAX_WAITING`].
    pub fn send(&self, events: &[Event]) {
        let mut s = lock(&self.shared);
        if s.waiting.len() + events.len() > MAX_WAITING {
            s.stats.dropped += events.len() as u64;
            let name = self.kind.name();
            s.warn.warn(
                name,
                format_args!("the driver takes no events: {} dropped", events.len()),
            );
            return;
        }
        s.waiting.extend(events.iter().copied());
        deliver(s);
    }

    pub fn stats(&self) -> InputStats {
        lock(&self.shared).stats
    }
}

/// Writes waiting events into held buffers and completes those together. Takes the lock
/// and drops it before completing (the completer locks the transport, which holds the
/// transport's lock while it calls into the device).
fn deliver(mut s: MutexGuard<'_, State>) {
    if s.paused {
        return;
    }
    let Some(context) = s.context.clone() else {
        return;
    };
    let mut done = Vec::new();
    while !s.waiting.is_empty() {
        let Some(chain) = s.held.pop_front() else {
            break;
        };
        let event = s.waiting.pop_front().unwrap_or_else(Event::syn);
        let d = chain.descriptors[0];
        let len = match context.memory.write(d.addr, &event.to_bytes()) {
            Ok(()) => Event::LEN as u32,
            Err(e) => {
                // Checked when it was taken: a changed memory map. The event is lost.
                s.warn
                    .warn("virtio-input", format_args!("cannot write an event: {e}"));
                0
            }
        };
        done.push(Used {
            head: chain.head,
            len,
        });
    }
    if done.is_empty() {
        return;
    }
    s.stats.delivered += done.iter().filter(|u| u.len > 0).count() as u64;
    s.stats.batches += 1;
    drop(s);
    context.completer.complete(EVENTQ as u16, &done);
}

pub struct Input {
    kind: Kind,
    select: u8,
    subsel: u8,
    shared: Shared,
}

impl Input {
    pub fn new(kind: Kind) -> Input {
        Input {
            kind,
            select: select::UNSET,
            subsel: 0,
            shared: Shared::default(),
        }
    }

    pub fn handle(&self) -> InputHandle {
        InputHandle {
            kind: self.kind,
            shared: self.shared.clone(),
        }
    }

    /// The bytes the current selection shows (at most 128).
    fn selected(&self) -> Vec<u8> {
        match self.select {
            select::ID_NAME if self.subsel == 0 => self.kind.name().as_bytes().to_vec(),
            select::ID_DEVIDS if self.subsel == 0 => {
                let product = match self.kind {
                    Kind::Keyboard => 1u16,
                    Kind::Tablet => 2,
                };
                [BUS_VIRTUAL, VENDOR, product, 1]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect()
            }
            select::EV_BITS if self.subsel == 0 => bitmap(self.kind.event_types().iter().copied()),
            select::EV_BITS => {
                let ev = u16::from(self.subsel);
                if !self.kind.event_types().contains(&ev) {
                    return Vec::new();
                }
                let b = bitmap(self.kind.codes(ev).into_iter());
                // A type with no codes still announces itself with one zero byte.
                if b.is_empty() {
                    vec![0]
                } else {
                    b
                }
            }
            select::ABS_INFO
                if self.kind == Kind::Tablet && [ABS_X, ABS_Y].contains(&self.subsel.into()) =>
            {
                // min, max, fuzz, flat, res
                [0, ABS_MAX, 0, 0, 0]
                    .iter()
                    .flat_map(|v: &u32| v.to_le_bytes())
                    .collect()
            }
            _ => Vec::new(),
        }
    }
}

/// A bitmap with bit `c` set for each code (empty if there are none).
fn bitmap(codes: impl Iterator<Item = u16>) -> Vec<u8> {
    let mut b = Vec::new();
    for c in codes {
        let (byte, bit) = (usize::from(c / 8), c % 8);
        if byte >= 128 {
            continue;
        }
        if b.len() <= byte {
            b.resize(byte + 1, 0);
        }
        b[byte] |= 1 << bit;
    }
    b
}

/// Checks one status event from the driver: only LED changes of LEDs the device has.
fn status_event(kind: Kind, e: Event) -> Result<Option<(u16, bool)>, String> {
    match (e.kind, e.code, e.value) {
        (EV_SYN, _, _) => Ok(None),
        (EV_LED, code, value) if kind == Kind::Keyboard && code < LED_COUNT && value <= 1 => {
            Ok(Some((code, value == 1)))
        }
        (kind_, code, value) => Err(format!(
            "status event type {kind_:#x} code {code} value {value} is not an LED the device has"
        )),
    }
}

impl VirtioDevice for Input {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_INPUT
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config_len(&self) -> u64 {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let payload = self.selected();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = match at {
                0 => self.select,
                1 => self.subsel,
                2 => payload.len() as u8,
                DATA..CONFIG_LEN => payload.get((at - DATA) as usize).copied().unwrap_or(0),
                _ => 0,
            };
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            match offset + i as u64 {
                0 => self.select = b,
                1 => self.subsel = b,
                // The rest is read-only.
                _ => {}
            }
        }
    }

    fn process(
        &mut self,
        queue: usize,
        chain: &Chain,
        memory: &(dyn GuestMemory + Send + Sync),
    ) -> Completion {
        match queue {
            EVENTQ => {
                let d = chain.descriptors[0];
                if chain.descriptors.len() != 1 || !d.writable || (d.len as usize) < Event::LEN {
                    return Completion::Failed(format!(
                        "event buffer {} must be one device-writable buffer of at least {} \
                         bytes",
                        chain.head,
                        Event::LEN
                    ));
                }
                let mut s = lock(&self.shared);
                if s.context.is_none() {
                    return Completion::Failed("the device was not activated".into());
                }
                // An event waiting for a buffer goes into this one at once.
                if !s.paused {
                    if let Some(e) = s.waiting.pop_front() {
                        if let Err(e) = memory.write(d.addr, &e.to_bytes()) {
                            return Completion::Failed(e.to_string());
                        }
                        s.stats.delivered += 1;
                        return Completion::Done(Event::LEN as u32);
                    }
                }
                s.held.push_back(chain.clone());
                Completion::Pending
            }
            STATUSQ => {
                let mut bytes = Vec::new();
                for d in &chain.descriptors {
                    if d.writable {
                        return Completion::Failed(format!(
                            "status request {} has a device-writable buffer",
                            chain.head
                        ));
                    }
                    let mut b = vec![0; d.len.min(64 * Event::LEN as u32) as usize];
                    if let Err(e) = memory.read(d.addr, &mut b) {
                        return Completion::Failed(e.to_string());
                    }
                    bytes.extend(b);
                }
                if bytes.is_empty() || bytes.len() % Event::LEN != 0 {
                    return Completion::Failed(format!(
                        "status request {} holds {} bytes, not whole events of {}",
                        chain.head,
                        bytes.len(),
                        Event::LEN
                    ));
                }
                let mut leds = lock(&self.shared).stats.leds;
                for e in bytes.chunks_exact(Event::LEN) {
                    let e = Event::from_bytes(e.try_into().unwrap_or([0; 8]));
                    match status_event(self.kind, e) {
                        Ok(Some((led, on))) if on => leds |= 1 << led,
                        Ok(Some((led, _))) => leds &= !(1 << led),
                        Ok(None) => {}
                        Err(why) => return Completion::Failed(why),
                    }
                }
                lock(&self.shared).stats.leds = leds;
                Completion::Done(0)
            }
            _ => Completion::Failed(format!("queue {queue} does not exist")),
        }
    }

    fn activate(&mut self, context: DeviceContext) {
        lock(&self.shared).context = Some(context);
    }

    fn reset(&mut self) {
        let mut s = lock(&self.shared);
        s.held.clear();
        s.waiting.clear();
        self.select = select::UNSET;
        self.subsel = 0;
    }

    fn pause(&mut self) {
        lock(&self.shared).paused = true;
    }

    fn resume(&mut self) {
        let mut s = lock(&self.shared);
        s.paused = false;
        deliver(s);
    }

    fn give_back(&mut self) -> Vec<(usize, u16)> {
        let mut s = lock(&self.shared);
        let n = s.held.len() as u16;
        s.held.clear();
        if n == 0 {
            Vec::new()
        } else {
            vec![(EVENTQ, n)]
        }
    }
}

#[cfg(test)]
#[path = "input_tests.rs"]
mod tests;
