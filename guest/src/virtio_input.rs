//! A virtio-input driver on [`virtio`] for the VMM's keyboard and tablet (virtio 1.2
//! §5.8), set up at boot so that keys typed at a VNC viewer reach the shell.
//!
//! Each device's event queue holds [`BUFFERS`] 8-byte buffers. The main loop polls the used
//! rings (plain memory reads, no exits); the VMM completes a batch of events (a typed line)
//! at once with one interrupt, which wakes the loop from `hlt`. Taken buffers go back in
//! one publish: at most one kick per batch.
//!
//! Key codes become characters on the US layout ([`ray_guest_abi::input`]) and go into the
//! shell's input like serial bytes; the tablet's position and buttons are kept for the
//! `pointer` command. `input` shows what each device delivered.

use ray_guest_abi::input::{
    char_of_key, Event, ABS_MAX, ABS_X, ABS_Y, BTN_LEFT, BTN_MIDDLE, BTN_RIGHT, EV_ABS, EV_KEY,
    KEY_BACKSPACE, KEY_CAPSLOCK, KEY_LEFTSHIFT, KEY_RIGHTSHIFT,
};

use crate::virtio::{self, Buffer, Queue, RingPage, Shared, Transport};

const DEVICE_TYPE: u16 = 18;
const BUFFERS: u16 = 64;
/// Configuration: select, subsel, size, then the data at 8.
const CFG_SELECT: usize = 0;
const CFG_SUBSEL: usize = 1;
const CFG_SIZE: usize = 2;
const SELECT_EV_BITS: u8 = 0x11;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Keyboard,
    Tablet,
}

struct Device {
    kind: Kind,
    queue: Queue,
    /// Where each descriptor's buffer is (head -> address).
    buffers: [u64; BUFFERS as usize],
    events: u64,
}

#[derive(Default)]
struct Keys {
    shift: bool,
    caps: bool,
    typed: u64,
}

#[derive(Default)]
struct Pointer {
    abs: (u32, u32),
    buttons: u8,
}

struct State {
    devices: [Option<Device>; 2],
    keys: Keys,
    pointer: Pointer,
}

static RINGS: [Shared<RingPage>; 2] = [Shared::new(RingPage::new()), Shared::new(RingPage::new())];
static EVENTS: Shared<RingPage> = Shared::new(RingPage::new());
static STATE: Shared<State> = Shared::new(State {
    devices: [None, None],
    keys: Keys {
        shift: false,
        caps: false,
        typed: 0,
    },
    pointer: Pointer {
        abs: (0, 0),
        buttons: 0,
    },
});

/// Whether the device sends absolute axes (a tablet) rather than keys only.
fn kind_of(t: &Transport) -> Kind {
    t.config_write(CFG_SELECT, SELECT_EV_BITS);
    t.config_write(CFG_SUBSEL, EV_ABS as u8);
    let abs = t.config::<u8>(CFG_SIZE) > 0;
    t.config_write(CFG_SELECT, 0u8);
    if abs {
        Kind::Tablet
    } else {
        Kind::Keyboard
    }
}

fn probe(nth: usize) -> Result<Option<Device>, &'static str> {
    let Some(t) = Transport::probe_nth(DEVICE_TYPE, 0, nth)? else {
        return Ok(None);
    };
    let kind = kind_of(&t);
    let queue = t.setup_queue(0, RINGS[nth].0.get(), BUFFERS)?;
    let mut d = Device {
        kind,
        queue,
        buffers: [0; BUFFERS as usize],
        events: 0,
    };
    let base = EVENTS.0.get() as u64 + nth as u64 * 2048;
    for i in 0..u64::from(BUFFERS) {
        let addr = base + i * Event::LEN as u64;
        let head = d
            .queue
            .add(&[Buffer {
                addr,
                len: Event::LEN as u32,
                writable: true,
            }])
            .ok_or("no free descriptor")?;
        d.buffers[usize::from(head)] = addr;
    }
    t.start()?;
    d.queue.publish();
    Ok(Some(d))
}

/// Finds the input devices and gives them their buffers.
pub fn init() {
    // SAFETY: only the boot CPU's main loop and shell use the state (see `Shared`).
    let s = unsafe { &mut *STATE.0.get() };
    for (nth, slot) in s.devices.iter_mut().enumerate() {
        match probe(nth) {
            Ok(d) => *slot = d,
            Err(e) => println!("err virtio-input {nth}: {e}"),
        }
    }
}

impl Keys {
    fn event(&mut self, code: u16, value: u32, input: &mut dyn FnMut(u8)) {
        match (code, value) {
            (KEY_LEFTSHIFT | KEY_RIGHTSHIFT, v) => self.shift = v != 0,
            (KEY_CAPSLOCK, 1) => self.caps = !self.caps,
            // Presses and autorepeat type; releases do not.
            (KEY_BACKSPACE, 1 | 2) => input(0x08),
            (code, 1 | 2) => {
                if let Some(mut c) = char_of_key(code, self.shift) {
                    if self.caps && c.is_ascii_alphabetic() {
                        c ^= 0x20;
                    }
                    self.typed += 1;
                    input(c);
                }
            }
            _ => {}
        }
    }
}

impl Pointer {
    fn event(&mut self, e: Event) {
        match (e.kind, e.code) {
            (EV_ABS, ABS_X) => self.abs.0 = e.value.min(ABS_MAX),
            (EV_ABS, ABS_Y) => self.abs.1 = e.value.min(ABS_MAX),
            (EV_KEY, code @ (BTN_LEFT | BTN_RIGHT | BTN_MIDDLE)) => {
                // As VNC numbers them: left 1, middle 2, right 4.
                let bit = match code {
                    BTN_LEFT => 1,
                    BTN_MIDDLE => 2,
                    _ => 4,
                };
                if e.value != 0 {
                    self.buttons |= bit;
                } else {
                    self.buttons &= !bit;
                }
            }
            _ => {}
        }
    }
}

/// Takes every event the devices delivered, typing keys into `input`, and gives the
/// buffers back in one publish per device.
pub fn poll(input: &mut dyn FnMut(u8)) {
    // SAFETY: as in `init`.
    let s = unsafe { &mut *STATE.0.get() };
    for d in s.devices.iter_mut().flatten() {
        if !d.queue.has_used() {
            continue;
        }
        while let Some((head, len)) = d.queue.pop_used() {
            let addr = d.buffers[usize::from(head)];
            if len as usize >= Event::LEN && addr != 0 {
                let e = Event::from_bytes(virtio::rd::<[u8; 8]>(addr as usize));
                d.events += 1;
                match d.kind {
                    Kind::Keyboard if e.kind == EV_KEY => s.keys.event(e.code, e.value, input),
                    Kind::Keyboard => {}
                    Kind::Tablet => s.pointer.event(e),
                }
            }
            let again = d.queue.add(&[Buffer {
                addr,
                len: Event::LEN as u32,
                writable: true,
            }]);
            if let Some(h) = again {
                d.buffers[usize::from(h)] = addr;
            }
        }
        d.queue.publish();
    }
}

/// `input`: each device with the events and interrupts it delivered.
pub fn show() {
    // SAFETY: as in `init`.
    let s = unsafe { &mut *STATE.0.get() };
    let mut any = false;
    for d in s.devices.iter().flatten() {
        any = true;
        let name = match d.kind {
            Kind::Keyboard => "keyboard",
            Kind::Tablet => "tablet",
        };
        println!("input {name} events={} irqs={}", d.events, d.queue.irqs());
    }
    if !any {
        println!("err input: no virtio-input device");
        return;
    }
    println!("input typed={}", s.keys.typed);
}

/// `pointer`: the tablet's last position (on display 0's pixels, and raw), and buttons.
pub fn pointer() {
    // SAFETY: as in `init`.
    let s = unsafe { &mut *STATE.0.get() };
    if !s.devices.iter().flatten().any(|d| d.kind == Kind::Tablet) {
        println!("err pointer: no virtio-input tablet");
        return;
    }
    let p = &s.pointer;
    let (w, h) = crate::display::size(0).unwrap_or((ABS_MAX + 1, ABS_MAX + 1));
    let px = |v: u32, len: u32| (v * (len - 1) + ABS_MAX / 2) / ABS_MAX;
    println!(
        "pointer x={} y={} buttons={} abs={},{}",
        px(p.abs.0, w),
        px(p.abs.1, h),
        p.buttons,
        p.abs.0,
        p.abs.1
    );
}
