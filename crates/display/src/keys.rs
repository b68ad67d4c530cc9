//! Viewer input as Linux input events: X11 keysyms (what RFB KeyEvents carry) to key codes
//! on a US layout, typed text to key strokes, and VNC pointer positions to the tablet's
//! absolute axes. Each keyboard action ends with a `SYN_REPORT`, so a batch is whole.
use ray_guest_abi::input::{
    char_of_key, key_of_char, Event, ABS_MAX, ABS_X, ABS_Y, BTN_LEFT, BTN_MIDDLE, BTN_RIGHT,
    EV_ABS, EV_KEY, EV_REL, KEY_BACKSPACE, KEY_CAPSLOCK, KEY_ENTER, KEY_ESC, KEY_LEFTALT,
    KEY_LEFTCTRL, KEY_LEFTSHIFT, KEY_RIGHTSHIFT, KEY_TAB, REL_WHEEL,
};

/// Keysyms of keys that type no character (`X11/keysymdef.h`) and their key codes.
const SPECIAL: &[(u32, u16)] = &[
    (0xff08, KEY_BACKSPACE),
    (0xff09, KEY_TAB),
    (0xff0d, KEY_ENTER),
    (0xff8d, KEY_ENTER), // KP_Enter
    (0xff1b, KEY_ESC),
    (0xffe1, KEY_LEFTSHIFT),
    (0xffe2, KEY_RIGHTSHIFT),
    (0xffe3, KEY_LEFTCTRL),
    (0xffe4, 97), // Control_R
    (0xffe9, KEY_LEFTALT),
    (0xffea, 100), // Alt_R
    (0xffe5, KEY_CAPSLOCK),
    (0xff50, 102), // Home
    (0xff51, 105), // Left
    (0xff52, 103), // Up
    (0xff53, 106), // Right
    (0xff54, 108), // Down
    (0xff55, 104), // Page_Up
    (0xff56, 109), // Page_Down
    (0xff57, 107), // End
    (0xff63, 110), // Insert
    (0xffff, 111), // Delete
    (0xffeb, 125), // Super_L
];

/// The key of `keysym` and whether it needs shift (`false` for keys typing no character).
pub fn key_of_keysym(keysym: u32) -> Option<(u16, bool)> {
    if let Some(&(_, code)) = SPECIAL.iter().find(|(k, _)| *k == keysym) {
        return Some((code, false));
    }
    // Latin-1 keysyms of printable ASCII are the characters themselves.
    match u8::try_from(keysym) {
        Ok(c @ 0x20..=0x7e) => key_of_char(c),
        // F1..F12
        _ if (0xffbe..=0xffc7).contains(&keysym) => Some((59 + (keysym - 0xffbe) as u16, false)),
        _ if keysym == 0xffc8 || keysym == 0xffc9 => Some((87 + (keysym - 0xffc8) as u16, false)),
        _ => None,
    }
}

/// One viewer's (or the API's) keyboard: a character that needs shift gets a shift press
/// around it unless shift is already held.
#[derive(Debug, Default)]
pub struct Keyboard {
    shift_held: bool,
    /// Keys pressed with a shift press of ours, released with them.
    shifted: Vec<u16>,
}

impl Keyboard {
    /// The events of a KeyEvent; empty for a keysym with no key on a US keyboard.
    pub fn key(&mut self, down: bool, keysym: u32) -> Vec<Event> {
        let Some((code, shift)) = key_of_keysym(keysym) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(4);
        if code == KEY_LEFTSHIFT || code == KEY_RIGHTSHIFT {
            self.shift_held = down;
        }
        if down {
            if shift && !self.shift_held && !self.shifted.contains(&code) {
                out.push(Event::new(EV_KEY, KEY_LEFTSHIFT, 1));
                self.shifted.push(code);
            }
            out.push(Event::new(EV_KEY, code, 1));
        } else {
            out.push(Event::new(EV_KEY, code, 0));
            if let Some(i) = self.shifted.iter().position(|&c| c == code) {
                self.shifted.swap_remove(i);
                out.push(Event::new(EV_KEY, KEY_LEFTSHIFT, 0));
            }
        }
        out.push(Event::syn());
        out
    }
}

/// Key strokes that type `text` (`\n` is Enter); refuses a character a US keyboard cannot
/// type, naming it and where it is.
pub fn type_text(text: &str) -> Result<Vec<Event>, String> {
    let mut kb = Keyboard::default();
    let mut out = Vec::with_capacity(text.len() * 6);
    for (i, c) in text.chars().enumerate() {
        let keysym = match c {
            '\n' => 0xff0d,
            '\t' => 0xff09,
            c if (' '..='~').contains(&c) => c as u32,
            c => {
                return Err(format!(
                    "character {i} ({c:?}) cannot be typed on a US keyboard (printable ASCII, \
                     tab and newline can)"
                ))
            }
        };
        out.extend(kb.key(true, keysym));
        out.extend(kb.key(false, keysym));
    }
    Ok(out)
}

/// What a key code types, for tests and logs: the US layout's character.
pub fn char_of(code: u16, shift: bool) -> Option<char> {
    char_of_key(code, shift).map(char::from)
}

/// `v` (0..len) on the tablet's 0..=ABS_MAX axis, rounded.
pub fn to_abs(v: u16, len: u32) -> u32 {
    let last = len.saturating_sub(1).max(1);
    let v = u32::from(v).min(last);
    (v * ABS_MAX + last / 2) / last
}

/// The tablet's events for a VNC PointerEvent at (x, y) on a `w` x `h` display with
/// `buttons` (bit 0 left, 1 middle, 2 right, 3 and 4 the wheel), after `before`.
pub fn pointer_events(before: u8, buttons: u8, x: u16, y: u16, w: u32, h: u32) -> Vec<Event> {
    let mut out = vec![
        Event::new(EV_ABS, ABS_X, to_abs(x, w)),
        Event::new(EV_ABS, ABS_Y, to_abs(y, h)),
    ];
    for (bit, code) in [(0, BTN_LEFT), (1, BTN_MIDDLE), (2, BTN_RIGHT)] {
        let (was, is) = (before >> bit & 1, buttons >> bit & 1);
        if was != is {
            out.push(Event::new(EV_KEY, code, u32::from(is)));
        }
    }
    // A wheel "button" press is one notch.
    if buttons & 8 != 0 && before & 8 == 0 {
        out.push(Event::new(EV_REL, REL_WHEEL, 1));
    }
    if buttons & 16 != 0 && before & 16 == 0 {
        out.push(Event::new(EV_REL, REL_WHEEL, -1i32 as u32));
    }
    out.push(Event::syn());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ray_guest_abi::input::EV_SYN;

    #[test]
    fn keysyms_become_key_codes_with_shift_where_needed() {
        let mut kb = Keyboard::default();
        assert_eq!(
            kb.key(true, u32::from(b'!')),
            vec![
                Event::new(EV_KEY, KEY_LEFTSHIFT, 1),
                Event::new(EV_KEY, 2, 1),
                Event::syn()
            ]
        );
        assert_eq!(
            kb.key(false, u32::from(b'!')),
            vec![
                Event::new(EV_KEY, 2, 0),
                Event::new(EV_KEY, KEY_LEFTSHIFT, 0),
                Event::syn()
            ]
        );
        // A viewer holding shift itself gets no extra shift.
        kb.key(true, 0xffe1);
        assert_eq!(kb.key(true, u32::from(b'A')).len(), 2);
        assert_eq!(key_of_keysym(0xff0d), Some((KEY_ENTER, false)));
        assert_eq!(key_of_keysym(0xffbe), Some((59, false)));
        assert_eq!(key_of_keysym(0x20ac), None, "the euro sign has no US key");
        assert!(kb.key(true, 0x20ac).is_empty());
    }

    #[test]
    fn typed_text_round_trips_through_the_layout() {
        let events = type_text("echo Hi!\n").unwrap();
        let mut shift = false;
        let mut typed = String::new();
        for e in &events {
            match (e.kind, e.code, e.value) {
                (EV_KEY, KEY_LEFTSHIFT, v) => shift = v == 1,
                (EV_KEY, code, 1) => typed.push(char_of(code, shift).unwrap()),
                _ => {}
            }
        }
        assert_eq!(typed, "echo Hi!\n");
        assert_eq!(events.iter().filter(|e| e.kind == EV_SYN).count(), 18);
        let e = type_text("caf\u{e9}").unwrap_err();
        assert!(e.contains("character 3 ('é')"), "{e}");
    }

    #[test]
    fn pointer_positions_scale_to_the_tablet_and_buttons_change_once() {
        assert_eq!(to_abs(0, 640), 0);
        assert_eq!(to_abs(639, 640), ABS_MAX);
        assert_eq!(to_abs(5000, 640), ABS_MAX);
        // Every pixel comes back from its axis value.
        for x in 0..640u32 {
            let a = to_abs(x as u16, 640);
            assert_eq!((a * 639 + ABS_MAX / 2) / ABS_MAX, x);
        }
        let e = pointer_events(0, 1, 10, 20, 640, 480);
        assert_eq!(e[2], Event::new(EV_KEY, BTN_LEFT, 1));
        assert_eq!(e.len(), 4);
        let e = pointer_events(1, 1 | 8, 10, 20, 640, 480);
        assert_eq!(e[2], Event::new(EV_REL, REL_WHEEL, 1));
        assert_eq!(e.len(), 4);
    }
}
