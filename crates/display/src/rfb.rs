//! The RFB 3.8 wire format (RFC 6143), server side: the handshake, client messages parsed
//! into [`ClientMessage`] with every length and value checked, pixel format conversion and
//! framebuffer update encoding. No sockets here: [`crate::vnc`] drives these over a stream.
use std::io::{self, Read, Write};

use crate::auth::Password;

/// The version this server speaks.
pub const VERSION: &[u8; 12] = b"RFB 003.008\n";
/// Security types None and VNC authentication.
pub const SECURITY_NONE: u8 = 1;
pub const SECURITY_VNC_AUTH: u8 = 2;
/// Encodings.
pub const ENCODING_RAW: i32 = 0;
pub const ENCODING_COPYRECT: i32 = 1;
/// Open H.264 (as noVNC decodes it): a u32 length, u32 flags, then Annex-B access units.
pub const ENCODING_OPEN_H264: i32 = 50;
/// Its flags: the viewer drops its decoder for this rectangle and starts a new one.
pub const H264_RESET_CONTEXT: u32 = 1;
/// The quality-level pseudo-encodings: level N is -32 + N (0 to 9).
pub const QUALITY_LEVEL_0: i32 = -32;
pub const ENCODING_DESKTOP_SIZE: i32 = -223;
/// The ExtendedDesktopSize pseudo-encoding: screen layouts, and SetDesktopSize from viewers.
pub const ENCODING_EXTENDED_DESKTOP_SIZE: i32 = -308;
/// The client message that asks for a new framebuffer size and screen layout.
pub const MSG_SET_DESKTOP_SIZE: u8 = 251;
/// Longer edges than this no display could have: a SetDesktopSize asking for one is
/// hostile (sizes within it but beyond a display's caps are answered "invalid").
pub const MAX_DESKTOP_EDGE: u16 = 16384;
/// The longest cut-text a client may send; more is hostile.
pub const MAX_CUT_TEXT: u32 = 1 << 20;
/// The most encodings a client may list.
pub const MAX_ENCODINGS: u16 = 256;

/// A protocol violation by the client: the connection is closed with this as the reason.
#[derive(Debug, thiserror::Error)]
pub enum RfbError {
    #[error("{0}")]
    Protocol(String),
    #[error("connection: {0}")]
    Io(#[from] io::Error),
}

fn protocol(msg: impl Into<String>) -> RfbError {
    RfbError::Protocol(msg.into())
}

/// A true-colour pixel format (colour maps are refused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

impl PixelFormat {
    /// The framebuffer's own format: 32-bit little-endian XRGB8888 (no conversion needed).
    pub const NATIVE: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bits_per_pixel;
        b[1] = self.depth;
        b[2] = u8::from(self.big_endian);
        b[3] = 1; // true colour
        b[4..6].copy_from_slice(&self.red_max.to_be_bytes());
        b[6..8].copy_from_slice(&self.green_max.to_be_bytes());
        b[8..10].copy_from_slice(&self.blue_max.to_be_bytes());
        b[10] = self.red_shift;
        b[11] = self.green_shift;
        b[12] = self.blue_shift;
        b
    }

    /// Parses and checks a client's SetPixelFormat.
    pub fn from_bytes(b: &[u8; 16]) -> Result<PixelFormat, RfbError> {
        let pf = PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            red_max: u16::from_be_bytes([b[4], b[5]]),
            green_max: u16::from_be_bytes([b[6], b[7]]),
            blue_max: u16::from_be_bytes([b[8], b[9]]),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        };
        if b[3] == 0 {
            return Err(protocol(
                "SetPixelFormat asks for a colour map; only true colour is served",
            ));
        }
        if ![8, 16, 32].contains(&pf.bits_per_pixel) {
            return Err(protocol(format!(
                "SetPixelFormat: {} bits per pixel (8, 16 or 32 are valid)",
                pf.bits_per_pixel
            )));
        }
        for (name, max, shift) in [
            ("red", pf.red_max, pf.red_shift),
            ("green", pf.green_max, pf.green_shift),
            ("blue", pf.blue_max, pf.blue_shift),
        ] {
            let bits = 16 - max.leading_zeros();
            if max == 0
                || !(max as u32 + 1).is_power_of_two()
                || u32::from(shift) + bits > u32::from(pf.bits_per_pixel)
            {
                return Err(protocol(format!(
                    "SetPixelFormat: {name} max {max} with shift {shift} does not fit {} bits per pixel",
                    pf.bits_per_pixel
                )));
            }
        }
        Ok(pf)
    }

    pub fn bytes_per_pixel(self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }

    /// Appends the native pixel `xrgb` (`0x00RRGGBB`) in this format.
    pub fn put(self, xrgb: u32, out: &mut Vec<u8>) {
        if self == Self::NATIVE {
            out.extend_from_slice(&xrgb.to_le_bytes());
            return;
        }
        let scale = |v: u32, max: u16| v * u32::from(max) / 255;
        let v = (scale((xrgb >> 16) & 0xff, self.red_max) << self.red_shift)
            | (scale((xrgb >> 8) & 0xff, self.green_max) << self.green_shift)
            | (scale(xrgb & 0xff, self.blue_max) << self.blue_shift);
        match (self.bits_per_pixel, self.big_endian) {
            (8, _) => out.push(v as u8),
            (16, false) => out.extend_from_slice(&(v as u16).to_le_bytes()),
            (16, true) => out.extend_from_slice(&(v as u16).to_be_bytes()),
            (_, false) => out.extend_from_slice(&v.to_le_bytes()),
            (_, true) => out.extend_from_slice(&v.to_be_bytes()),
        }
    }
}

/// A rectangle of the framebuffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x: u16,
    pub y: u16,
    pub w: u16,
    pub h: u16,
}

/// One screen of a layout (SetDesktopSize, ExtendedDesktopSize).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Screen {
    pub id: u32,
    pub x: u16,
    pub y: u16,
    pub w: u16,
    pub h: u16,
    pub flags: u32,
}

impl Screen {
    fn parse(b: &[u8; 16]) -> Screen {
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        Screen {
            id: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            x: u16_at(4),
            y: u16_at(6),
            w: u16_at(8),
            h: u16_at(10),
            flags: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_be_bytes());
        for v in [self.x, self.y, self.w, self.h] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&self.flags.to_be_bytes());
    }
}

/// Why an ExtendedDesktopSize rectangle is sent (its x field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeReason {
    /// The server changed the size (`ray gpu resize`), or announces the layout.
    Server = 0,
    /// This viewer asked (the answer to its SetDesktopSize).
    ThisClient = 1,
    /// Another viewer asked.
    OtherClient = 2,
}

/// How a SetDesktopSize went (the y field of the ExtendedDesktopSize answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeStatus {
    Ok = 0,
    /// Resizing is not allowed (a view-only viewer, a display that cannot change size).
    Prohibited = 1,
    OutOfResources = 2,
    /// The size or layout is not one the display can take.
    InvalidLayout = 3,
}

/// An ExtendedDesktopSize rectangle: the framebuffer is `w` x `h` with `screens`.
pub fn extended_desktop_size_rect(
    reason: ResizeReason,
    status: ResizeStatus,
    w: u16,
    h: u16,
    screens: &[Screen],
    out: &mut Vec<u8>,
) {
    rect_header(
        Rect {
            x: reason as u16,
            y: status as u16,
            w,
            h,
        },
        ENCODING_EXTENDED_DESKTOP_SIZE,
        out,
    );
    out.extend_from_slice(&[screens.len() as u8, 0, 0, 0]);
    for s in screens {
        s.put(out);
    }
}

/// What a client may send after the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientMessage {
    SetPixelFormat(PixelFormat),
    SetEncodings(Vec<i32>),
    UpdateRequest {
        incremental: bool,
        rect: Rect,
    },
    Key {
        down: bool,
        keysym: u32,
    },
    Pointer {
        buttons: u8,
        x: u16,
        y: u16,
    },
    CutText(Vec<u8>),
    /// SetDesktopSize: a new framebuffer size and its screens (at least one).
    SetDesktopSize {
        width: u16,
        height: u16,
        screens: Vec<Screen>,
    },
}

fn read_n<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// Reads one client message; a message the protocol does not allow is an error that names
/// what was wrong.
pub fn read_message(r: &mut impl Read) -> Result<ClientMessage, RfbError> {
    let [kind] = read_n::<1>(r)?;
    Ok(match kind {
        0 => {
            let _pad = read_n::<3>(r)?;
            ClientMessage::SetPixelFormat(PixelFormat::from_bytes(&read_n::<16>(r)?)?)
        }
        2 => {
            let b = read_n::<3>(r)?;
            let n = u16::from_be_bytes([b[1], b[2]]);
            if n > MAX_ENCODINGS {
                return Err(protocol(format!(
                    "SetEncodings lists {n} encodings (at most {MAX_ENCODINGS})"
                )));
            }
            let mut list = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                list.push(i32::from_be_bytes(read_n::<4>(r)?));
            }
            ClientMessage::SetEncodings(list)
        }
        3 => {
            let b = read_n::<9>(r)?;
            let u = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
            ClientMessage::UpdateRequest {
                incremental: b[0] != 0,
                rect: Rect {
                    x: u(1),
                    y: u(3),
                    w: u(5),
                    h: u(7),
                },
            }
        }
        4 => {
            let b = read_n::<7>(r)?;
            ClientMessage::Key {
                down: b[0] != 0,
                keysym: u32::from_be_bytes([b[3], b[4], b[5], b[6]]),
            }
        }
        5 => {
            let b = read_n::<5>(r)?;
            ClientMessage::Pointer {
                buttons: b[0],
                x: u16::from_be_bytes([b[1], b[2]]),
                y: u16::from_be_bytes([b[3], b[4]]),
            }
        }
        6 => {
            let b = read_n::<7>(r)?;
            let len = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
            if len > MAX_CUT_TEXT {
                return Err(protocol(format!(
                    "ClientCutText of {len} bytes (at most {MAX_CUT_TEXT})"
                )));
            }
            let mut text = vec![0; len as usize];
            r.read_exact(&mut text)?;
            ClientMessage::CutText(text)
        }
        MSG_SET_DESKTOP_SIZE => {
            // padding, width, height, number of screens, padding
            let b = read_n::<7>(r)?;
            let width = u16::from_be_bytes([b[1], b[2]]);
            let height = u16::from_be_bytes([b[3], b[4]]);
            let n = b[5];
            if n == 0 {
                return Err(protocol("SetDesktopSize lists no screens"));
            }
            if width == 0 || height == 0 || width > MAX_DESKTOP_EDGE || height > MAX_DESKTOP_EDGE {
                return Err(protocol(format!(
                    "SetDesktopSize asks for a {width}x{height} framebuffer"
                )));
            }
            let mut screens = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                screens.push(Screen::parse(&read_n::<16>(r)?));
            }
            ClientMessage::SetDesktopSize {
                width,
                height,
                screens,
            }
        }
        other => return Err(protocol(format!("unknown client message type {other}"))),
    })
}

/// The server's side of the handshake up to and including ServerInit: version, security
/// (None, or VNC authentication with `password`), ClientInit. Returns whether the client
/// asked to share the desktop.
pub fn handshake(
    s: &mut (impl Read + Write),
    width: u16,
    height: u16,
    name: &str,
    password: Option<&Password>,
) -> Result<bool, RfbError> {
    s.write_all(VERSION)?;
    let v = read_n::<12>(s)?;
    let minor = match &v {
        b"RFB 003.003\n" => 3,
        b"RFB 003.007\n" => 7,
        b"RFB 003.008\n" => 8,
        // Viewers that speak a later version than 3.8 fall back to it (RFC 6143, 7.1.1).
        _ if v.starts_with(b"RFB 003.") && v[11] == b'\n' => 8,
        _ => {
            return Err(protocol(format!(
                "the client's version {:?} is not RFB 3.x",
                String::from_utf8_lossy(&v)
            )))
        }
    };
    let offered = if password.is_some() {
        SECURITY_VNC_AUTH
    } else {
        SECURITY_NONE
    };
    if minor == 3 {
        s.write_all(&u32::from(offered).to_be_bytes())?;
    } else {
        s.write_all(&[1, offered])?;
        let [chosen] = read_n::<1>(s)?;
        if chosen != offered {
            if minor == 8 {
                refuse(s, "security type not offered")?;
            }
            return Err(protocol(format!(
                "the client chose security type {chosen}, which was not offered"
            )));
        }
    }
    if let Some(password) = password {
        let challenge = crate::auth::challenge()?;
        s.write_all(&challenge)?;
        s.flush()?;
        let answer = read_n::<16>(s)?;
        if !password.verify(&challenge, &answer) {
            if minor == 8 {
                refuse(s, "authentication failed")?;
            } else {
                s.write_all(&1u32.to_be_bytes())?;
            }
            return Err(protocol(
                "VNC authentication failed: the viewer's answer does not match the password",
            ));
        }
        s.write_all(&0u32.to_be_bytes())?;
    } else if minor == 8 {
        s.write_all(&0u32.to_be_bytes())?;
    }
    let [shared] = read_n::<1>(s)?;
    let mut init = Vec::with_capacity(24 + name.len());
    init.extend_from_slice(&width.to_be_bytes());
    init.extend_from_slice(&height.to_be_bytes());
    init.extend_from_slice(&PixelFormat::NATIVE.to_bytes());
    init.extend_from_slice(&(name.len() as u32).to_be_bytes());
    init.extend_from_slice(name.as_bytes());
    s.write_all(&init)?;
    s.flush()?;
    Ok(shared != 0)
}

/// The header of a FramebufferUpdate with `rects` rectangles.
pub fn update_header(rects: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&rects.to_be_bytes());
}

/// A failed SecurityResult with its reason (RFB 3.8).
fn refuse(s: &mut impl Write, reason: &str) -> io::Result<()> {
    s.write_all(&1u32.to_be_bytes())?;
    s.write_all(&(reason.len() as u32).to_be_bytes())?;
    s.write_all(reason.as_bytes())?;
    s.flush()
}

/// A rectangle's header.
pub fn rect_header(r: Rect, encoding: i32, out: &mut Vec<u8>) {
    for v in [r.x, r.y, r.w, r.h] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&encoding.to_be_bytes());
}

/// A Raw rectangle of `frame` (native pixels, `stride` bytes a line) in format `pf`.
pub fn raw_rect(frame: &[u8], stride: usize, r: Rect, pf: PixelFormat, out: &mut Vec<u8>) {
    rect_header(r, ENCODING_RAW, out);
    out.reserve(usize::from(r.w) * usize::from(r.h) * pf.bytes_per_pixel());
    for y in r.y..r.y + r.h {
        let start = usize::from(y) * stride + usize::from(r.x) * 4;
        let line = &frame[start..start + usize::from(r.w) * 4];
        if pf == PixelFormat::NATIVE {
            out.extend_from_slice(line);
        } else {
            for px in line.chunks_exact(4) {
                pf.put(u32::from_le_bytes([px[0], px[1], px[2], px[3]]), out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that reads from a script and records what is written.
    struct Duplex<'a> {
        input: &'a [u8],
        output: Vec<u8>,
    }
    impl Read for Duplex<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Duplex<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn handshake_3_8_offers_none_and_describes_the_framebuffer() {
        let mut s = Duplex {
            input: b"RFB 003.008\n\x01\x01",
            output: Vec::new(),
        };
        assert!(handshake(&mut s, 640, 480, "vm", None).unwrap());
        let o = &s.output;
        assert_eq!(&o[..12], VERSION);
        assert_eq!(&o[12..14], &[1, 1], "one type: None");
        assert_eq!(&o[14..18], &[0, 0, 0, 0], "SecurityResult OK");
        assert_eq!(&o[18..22], &[2, 128, 1, 224], "640x480");
        assert_eq!(&o[22..38], &PixelFormat::NATIVE.to_bytes());
        assert_eq!(&o[38..44], &[0, 0, 0, 2, b'v', b'm']);
    }

    #[test]
    fn handshake_refusals_name_what_was_wrong() {
        let mut s = Duplex {
            input: b"HTTP/1.1 200",
            output: Vec::new(),
        };
        let e = handshake(&mut s, 8, 8, "x", None).unwrap_err().to_string();
        assert!(e.contains("is not RFB 3.x"), "{e}");
        let mut s = Duplex {
            input: b"RFB 003.008\n\x02",
            output: Vec::new(),
        };
        let e = handshake(&mut s, 8, 8, "x", None).unwrap_err().to_string();
        assert_eq!(e, "the client chose security type 2, which was not offered");
        let mut s = Duplex {
            input: b"RFB 003.003\n\x00",
            output: Vec::new(),
        };
        assert!(!handshake(&mut s, 8, 8, "x", None).unwrap());
        assert_eq!(&s.output[12..16], &[0, 0, 0, 1]);
    }

    /// A stream whose input is computed from what was written: a viewer that answers
    /// the challenge with `password`.
    struct AuthViewer {
        password: Password,
        output: Vec<u8>,
        input: Vec<u8>,
    }
    impl Read for AuthViewer {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.input.is_empty() && self.output.len() == 14 + 16 {
                let challenge: [u8; 16] = self.output[14..].try_into().unwrap();
                self.input = self.password.response(&challenge).to_vec();
                self.input.push(1);
            }
            let n = buf.len().min(self.input.len());
            buf[..n].copy_from_slice(&self.input[..n]);
            self.input.drain(..n);
            Ok(n)
        }
    }
    impl Write for AuthViewer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn vnc_authentication_takes_the_right_password_only() {
        let right = Password::new(b"pw");
        let mut v = AuthViewer {
            password: right.clone(),
            output: Vec::new(),
            input: b"RFB 003.008\n\x02".to_vec(),
        };
        assert!(handshake(&mut v, 8, 8, "x", Some(&right)).unwrap());
        assert_eq!(&v.output[12..14], &[1, SECURITY_VNC_AUTH]);
        assert_eq!(&v.output[30..34], &[0, 0, 0, 0], "SecurityResult OK");
        let mut v = AuthViewer {
            password: Password::new(b"wrong"),
            output: Vec::new(),
            input: b"RFB 003.008\n\x02".to_vec(),
        };
        let e = handshake(&mut v, 8, 8, "x", Some(&right))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("VNC authentication failed"), "{e}");
        assert_eq!(&v.output[30..34], &[0, 0, 0, 1], "SecurityResult failed");
        assert!(v.output.ends_with(b"authentication failed"));
        // Choosing None when authentication is offered is refused.
        let mut s = Duplex {
            input: b"RFB 003.008\n\x01",
            output: Vec::new(),
        };
        let e = handshake(&mut s, 8, 8, "x", Some(&right))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "the client chose security type 1, which was not offered");
    }

    #[test]
    fn messages_parse_and_hostile_ones_are_refused() {
        let mut ok: &[u8] = &[
            3, 1, 0, 1, 0, 2, 0, 3, 0, 4, // update request
            4, 1, 0, 0, 0, 0, 0, 0x61, // key 'a' down
            5, 1, 0, 9, 0, 8, // pointer
            2, 0, 0, 2, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x21, // encodings raw, desktop size
            6, 0, 0, 0, 0, 0, 0, 2, b'h', b'i',
        ];
        let mut got = Vec::new();
        while !ok.is_empty() {
            got.push(read_message(&mut ok).unwrap());
        }
        assert_eq!(
            got,
            vec![
                ClientMessage::UpdateRequest {
                    incremental: true,
                    rect: Rect {
                        x: 1,
                        y: 2,
                        w: 3,
                        h: 4
                    }
                },
                ClientMessage::Key {
                    down: true,
                    keysym: 0x61
                },
                ClientMessage::Pointer {
                    buttons: 1,
                    x: 9,
                    y: 8
                },
                ClientMessage::SetEncodings(vec![0, ENCODING_DESKTOP_SIZE]),
                ClientMessage::CutText(b"hi".to_vec()),
            ]
        );
        for (bytes, msg) in [
            (&[9u8][..], "unknown client message type 9"),
            (
                &[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
                "ClientCutText of 4294967295 bytes",
            ),
            (&[2, 0, 0xff, 0xff], "SetEncodings lists 65535 encodings"),
            (
                &[
                    0, 0, 0, 0, 32, 24, 0, 0, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
                ],
                "colour map",
            ),
            (
                &[
                    0, 0, 0, 0, 12, 12, 0, 1, 0, 15, 0, 15, 0, 15, 8, 4, 0, 0, 0, 0,
                ],
                "12 bits per pixel",
            ),
            (
                &[
                    0, 0, 0, 0, 16, 16, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
                ],
                "red max 255 with shift 16",
            ),
        ] {
            let mut r = bytes;
            let e = read_message(&mut r).unwrap_err().to_string();
            assert!(e.contains(msg), "{e}");
        }
        // A truncated message is a connection error, not a parse of garbage.
        let mut r: &[u8] = &[3, 0, 0];
        assert!(matches!(read_message(&mut r), Err(RfbError::Io(_))));
    }

    #[test]
    fn set_desktop_size_parses_and_broken_ones_are_refused() {
        let mut ok: &[u8] = &[
            251, 0, 0x03, 0x20, 0x02, 0x58, 1, 0, // 800x600, one screen
            0, 0, 0, 7, 0, 0, 0, 0, 0x03, 0x20, 0x02, 0x58, 0, 0, 0, 0,
        ];
        assert_eq!(
            read_message(&mut ok).unwrap(),
            ClientMessage::SetDesktopSize {
                width: 800,
                height: 600,
                screens: vec![Screen {
                    id: 7,
                    x: 0,
                    y: 0,
                    w: 800,
                    h: 600,
                    flags: 0
                }]
            }
        );
        assert!(ok.is_empty());
        let mut r: &[u8] = &[251, 0, 0x03, 0x20, 0x02, 0x58, 0, 0];
        let e = read_message(&mut r).unwrap_err().to_string();
        assert_eq!(e, "SetDesktopSize lists no screens");
        let mut r: &[u8] = &[251, 0, 0, 0, 0x02, 0x58, 1, 0];
        let e = read_message(&mut r).unwrap_err().to_string();
        assert_eq!(e, "SetDesktopSize asks for a 0x600 framebuffer");
        let mut r: &[u8] = &[251, 0, 0xff, 0xff, 0x02, 0x58, 1, 0];
        let e = read_message(&mut r).unwrap_err().to_string();
        assert_eq!(e, "SetDesktopSize asks for a 65535x600 framebuffer");
        // Two screens announced, one sent: truncated.
        let mut r: &[u8] = &[
            251, 0, 0x03, 0x20, 0x02, 0x58, 2, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0x03, 0x20, 0x02, 0x58,
            0, 0, 0, 0,
        ];
        assert!(matches!(read_message(&mut r), Err(RfbError::Io(_))));
    }

    #[test]
    fn extended_desktop_size_rectangles_carry_reason_status_and_screens() {
        let mut out = Vec::new();
        let s = Screen {
            id: 1,
            x: 0,
            y: 0,
            w: 640,
            h: 480,
            flags: 0,
        };
        extended_desktop_size_rect(
            ResizeReason::OtherClient,
            ResizeStatus::Ok,
            640,
            480,
            &[s],
            &mut out,
        );
        let mut want = vec![
            0, 2, 0, 0, 2, 128, 1, 224, 0xff, 0xff, 0xfe, 0xcc, 1, 0, 0, 0,
        ];
        want.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 2, 128, 1, 224, 0, 0, 0, 0]);
        assert_eq!(out, want);
    }

    #[test]
    fn raw_rectangles_convert_pixel_formats() {
        // 2x1 frame: red, blue.
        let frame = [0, 0, 0xff, 0, 0xff, 0, 0, 0];
        let r = Rect {
            x: 0,
            y: 0,
            w: 2,
            h: 1,
        };
        let mut out = Vec::new();
        raw_rect(&frame, 8, r, PixelFormat::NATIVE, &mut out);
        assert_eq!(&out[12..], &frame);
        let rgb565 = PixelFormat {
            bits_per_pixel: 16,
            depth: 16,
            big_endian: false,
            red_max: 31,
            green_max: 63,
            blue_max: 31,
            red_shift: 11,
            green_shift: 5,
            blue_shift: 0,
        };
        let mut out = Vec::new();
        raw_rect(&frame, 8, r, rgb565, &mut out);
        assert_eq!(&out[12..], &[0x00, 0xf8, 0x1f, 0x00]);
    }
}
