//! Keyboard and pointer input: the Linux input event codes virtio-input carries (virtio
//! 1.2 §5.8) and the US keyboard layout both sides use. The VMM turns a VNC viewer's X11
//! keysyms into key codes with [`key_of_char`]; our guest turns key codes back into
//! characters with [`char_of_key`]. One table, so the two cannot disagree.

/// Event types (`linux/input-event-codes.h`).
pub const EV_SYN: u16 = 0x00;
pub const EV_KEY: u16 = 0x01;
pub const EV_REL: u16 = 0x02;
pub const EV_ABS: u16 = 0x03;
pub const EV_REP: u16 = 0x14;
pub const EV_LED: u16 = 0x11;
pub const SYN_REPORT: u16 = 0;

/// Absolute axes of the tablet.
pub const ABS_X: u16 = 0x00;
pub const ABS_Y: u16 = 0x01;
/// The tablet's axes run 0..=ABS_MAX whatever the display's size.
pub const ABS_MAX: u32 = 0x7fff;
/// The wheel (VNC buttons 4 and 5).
pub const REL_WHEEL: u16 = 0x08;

/// Pointer buttons.
pub const BTN_LEFT: u16 = 0x110;
pub const BTN_RIGHT: u16 = 0x111;
pub const BTN_MIDDLE: u16 = 0x112;

/// LEDs a keyboard has (the driver reports them on the status queue).
pub const LED_NUML: u16 = 0;
pub const LED_CAPSL: u16 = 1;
pub const LED_SCROLLL: u16 = 2;
pub const LED_COUNT: u16 = 3;

/// Key codes the layout below does not cover.
pub const KEY_ESC: u16 = 1;
pub const KEY_BACKSPACE: u16 = 14;
pub const KEY_TAB: u16 = 15;
pub const KEY_ENTER: u16 = 28;
pub const KEY_LEFTCTRL: u16 = 29;
pub const KEY_LEFTSHIFT: u16 = 42;
pub const KEY_RIGHTSHIFT: u16 = 54;
pub const KEY_LEFTALT: u16 = 56;
pub const KEY_CAPSLOCK: u16 = 58;
/// The highest key code the keyboard announces.
pub const KEY_MAX_USED: u16 = 127;

/// A virtio-input event as it sits in a buffer: `le16 type, le16 code, le32 value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: u16,
    pub code: u16,
    pub value: u32,
}

impl Event {
    pub const LEN: usize = 8;

    pub const fn new(kind: u16, code: u16, value: u32) -> Event {
        Event { kind, code, value }
    }

    pub const fn syn() -> Event {
        Event::new(EV_SYN, SYN_REPORT, 0)
    }

    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..2].copy_from_slice(&self.kind.to_le_bytes());
        b[2..4].copy_from_slice(&self.code.to_le_bytes());
        b[4..].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    pub fn from_bytes(b: [u8; 8]) -> Event {
        Event {
            kind: u16::from_le_bytes([b[0], b[1]]),
            code: u16::from_le_bytes([b[2], b[3]]),
            value: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

/// The US layout: (key code, character without shift, character with shift).
const US: &[(u16, u8, u8)] = &[
    (2, b'1', b'!'),
    (3, b'2', b'@'),
    (4, b'3', b'#'),
    (5, b'4', b'$'),
    (6, b'5', b'%'),
    (7, b'6', b'^'),
    (8, b'7', b'&'),
    (9, b'8', b'*'),
    (10, b'9', b'('),
    (11, b'0', b')'),
    (12, b'-', b'_'),
    (13, b'=', b'+'),
    (15, b'\t', b'\t'),
    (16, b'q', b'Q'),
    (17, b'w', b'W'),
    (18, b'e', b'E'),
    (19, b'r', b'R'),
    (20, b't', b'T'),
    (21, b'y', b'Y'),
    (22, b'u', b'U'),
    (23, b'i', b'I'),
    (24, b'o', b'O'),
    (25, b'p', b'P'),
    (26, b'[', b'{'),
    (27, b']', b'}'),
    (28, b'\n', b'\n'),
    (30, b'a', b'A'),
    (31, b's', b'S'),
    (32, b'd', b'D'),
    (33, b'f', b'F'),
    (34, b'g', b'G'),
    (35, b'h', b'H'),
    (36, b'j', b'J'),
    (37, b'k', b'K'),
    (38, b'l', b'L'),
    (39, b';', b':'),
    (40, b'\'', b'"'),
    (41, b'`', b'~'),
    (43, b'\\', b'|'),
    (44, b'z', b'Z'),
    (45, b'x', b'X'),
    (46, b'c', b'C'),
    (47, b'v', b'V'),
    (48, b'b', b'B'),
    (49, b'n', b'N'),
    (50, b'm', b'M'),
    (51, b',', b'<'),
    (52, b'.', b'>'),
    (53, b'/', b'?'),
    (57, b' ', b' '),
];

/// The key that types `c` on a US keyboard and whether it needs shift.
pub fn key_of_char(c: u8) -> Option<(u16, bool)> {
    US.iter().find_map(|&(code, plain, shifted)| {
        if c == plain {
            Some((code, false))
        } else if c == shifted {
            Some((code, true))
        } else {
            None
        }
    })
}

/// The character key `code` types on a US keyboard (with `shift` held), if any.
pub fn char_of_key(code: u16, shift: bool) -> Option<u8> {
    US.iter()
        .find(|&&(c, ..)| c == code)
        .map(|&(_, plain, shifted)| if shift { shifted } else { plain })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_printable_ascii_character_round_trips() {
        for c in 0x20u8..0x7f {
            let (code, shift) = key_of_char(c).unwrap_or_else(|| panic!("{c:#x}"));
            assert_eq!(char_of_key(code, shift), Some(c), "{c:#x}");
        }
        assert_eq!(key_of_char(b'\n'), Some((KEY_ENTER, false)));
        assert_eq!(key_of_char(0x80), None);
        let e = Event::new(EV_ABS, ABS_Y, 0x1234);
        assert_eq!(Event::from_bytes(e.to_bytes()), e);
    }
}
