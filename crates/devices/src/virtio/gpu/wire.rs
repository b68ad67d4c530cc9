//! The remote GPU protocol: what a VMM and a GPU back end (`ray gpu backend`) say to each
//! other over a Unix socket or TCP. Versioned, length-prefixed frames; every field is
//! checked when a frame is decoded (each side is untrusted by the other), and what the
//! fields mean (a rectangle inside its resource, damage inside its scanout) is checked by
//! the side that uses them.
//!
//! A frame is a little-endian `u32` length (1 to [`MAX_FRAME`]) and that many bytes: a
//! kind byte and the message's fields, little-endian, with nothing left over.
//!
//! The VMM opens with [`Message::Hello`] (protocol version, the token a TCP back end
//! asks for, the scanouts' modes); the back end answers [`Message::Welcome`] or an
//! [`Message::Answer`] with an error and closes. Then each request of the VMM gets zero
//! or more [`Message::Damage`] frames (frame areas that changed, their pixels) and one
//! [`Message::Answer`] (a virtio-gpu response code: `RESP_OK_NODATA` or an error).
use std::io::{Read, Write};

use super::protocol::{Rect, MAX_SCANOUTS};

/// "RGPU": the first bytes of a Hello.
pub const MAGIC: [u8; 4] = *b"RGPU";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Most bytes of one frame after its length: room for a band of pixels and its fields.
pub const MAX_FRAME: usize = (16 << 20) + 64;
/// Most pixel bytes one Transfer or Damage carries (larger ones are sent in bands).
pub const MAX_PIXELS: usize = 16 << 20;
/// Longest token a Hello carries.
pub const MAX_TOKEN: usize = 256;
/// Longest reason an Answer carries.
pub const MAX_WHY: usize = 1024;

/// Message kinds, as the frame's first byte.
mod kind {
    pub const HELLO: u8 = 1;
    pub const RESET: u8 = 2;
    pub const CREATE: u8 = 3;
    pub const UNREF: u8 = 4;
    pub const TRANSFER: u8 = 5;
    pub const SET_SCANOUT: u8 = 6;
    pub const FLUSH: u8 = 7;
    pub const CURSOR: u8 = 8;
    pub const SET_MODE: u8 = 9;
    pub const PING: u8 = 10;
    pub const WELCOME: u8 = 64;
    pub const DAMAGE: u8 = 65;
    pub const ANSWER: u8 = 66;
}

/// One message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// VMM: the version it speaks, the token (empty on a Unix socket), each scanout's mode.
    Hello {
        version: u16,
        token: Vec<u8>,
        modes: Vec<(u32, u32)>,
    },
    /// VMM: forget every resource; scanouts dark, cursor hidden (before a replay).
    Reset,
    Create {
        id: u32,
        format: u32,
        width: u32,
        height: u32,
    },
    Unref {
        id: u32,
    },
    /// VMM: pixels for `rect` of resource `id`, `rect.width * 4` bytes a line, as the
    /// guest's backing holds them.
    Transfer {
        id: u32,
        rect: Rect,
        pixels: Vec<u8>,
    },
    SetScanout {
        scanout: u32,
        id: u32,
        rect: Rect,
    },
    Flush {
        id: u32,
        rect: Rect,
    },
    /// VMM: a cursor command (`CMD_UPDATE_CURSOR` or `CMD_MOVE_CURSOR`) and its fields.
    Cursor {
        command: u32,
        fields: [u32; 7],
    },
    /// VMM: scanout `scanout` has a new mode.
    SetMode {
        scanout: u32,
        width: u32,
        height: u32,
    },
    Ping,
    /// Back end: the Hello is accepted; the version it speaks.
    Welcome {
        version: u16,
    },
    /// Back end: `rect` of scanout `scanout`'s frame is now `pixels` (XRGB8888).
    Damage {
        scanout: u32,
        rect: Rect,
        pixels: Vec<u8>,
    },
    /// Back end: the request is done (`RESP_OK_NODATA`) or refused (an error code, why).
    Answer {
        code: u32,
        why: String,
    },
}

/// A frame that is not a message of this protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("an empty frame")]
    Empty,
    #[error("a frame of {0} bytes (at most {MAX_FRAME})")]
    TooLong(usize),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("message kind {kind} ends after {len} bytes, inside its fields")]
    Short { kind: u8, len: usize },
    #[error("message kind {kind} has {extra} bytes after its fields")]
    Trailing { kind: u8, extra: usize },
    #[error("a Hello without the protocol's magic")]
    Magic,
    #[error("a token of {0} bytes (at most {MAX_TOKEN})")]
    Token(usize),
    #[error("{0} scanouts (1 to {MAX_SCANOUTS})")]
    Scanouts(usize),
    #[error("{got} bytes of pixels for a {width}x{height} rectangle (at most {MAX_PIXELS})")]
    Pixels { got: usize, width: u32, height: u32 },
    #[error("a reason of {0} bytes (at most {MAX_WHY}, UTF-8)")]
    Why(usize),
}

struct Fields<'a> {
    buf: &'a [u8],
    at: usize,
    kind: u8,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(WireError::Short {
                kind: self.kind,
                len: self.buf.len(),
            });
        };
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn rect(&mut self) -> Result<Rect, WireError> {
        Ok(Rect {
            x: self.u32()?,
            y: self.u32()?,
            width: self.u32()?,
            height: self.u32()?,
        })
    }
    /// The rest of the frame as `rect`'s pixels.
    fn pixels(&mut self, rect: Rect) -> Result<Vec<u8>, WireError> {
        let rest = &self.buf[self.at..];
        self.at = self.buf.len();
        let want = u64::from(rect.width) * u64::from(rect.height) * 4;
        if rest.len() > MAX_PIXELS || want != rest.len() as u64 {
            return Err(WireError::Pixels {
                got: rest.len(),
                width: rect.width,
                height: rect.height,
            });
        }
        Ok(rest.to_vec())
    }
    fn end(self) -> Result<(), WireError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            extra => Err(WireError::Trailing {
                kind: self.kind,
                extra,
            }),
        }
    }
}

fn put_rect(out: &mut Vec<u8>, r: &Rect) {
    for v in [r.x, r.y, r.width, r.height] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

impl Message {
    /// The message's bytes (kind and fields), without the frame's length.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let u32s = |out: &mut Vec<u8>, k: u8, vs: &[u32]| {
            out.push(k);
            for v in vs {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
        match self {
            Message::Hello {
                version,
                token,
                modes,
            } => {
                out.push(kind::HELLO);
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&(token.len() as u16).to_le_bytes());
                out.extend_from_slice(token);
                out.push(modes.len() as u8);
                for (w, h) in modes {
                    out.extend_from_slice(&w.to_le_bytes());
                    out.extend_from_slice(&h.to_le_bytes());
                }
            }
            Message::Reset => out.push(kind::RESET),
            Message::Create {
                id,
                format,
                width,
                height,
            } => u32s(&mut out, kind::CREATE, &[*id, *format, *width, *height]),
            Message::Unref { id } => u32s(&mut out, kind::UNREF, &[*id]),
            Message::Transfer { id, rect, pixels } => {
                u32s(&mut out, kind::TRANSFER, &[*id]);
                put_rect(&mut out, rect);
                out.extend_from_slice(pixels);
            }
            Message::SetScanout { scanout, id, rect } => {
                u32s(&mut out, kind::SET_SCANOUT, &[*scanout, *id]);
                put_rect(&mut out, rect);
            }
            Message::Flush { id, rect } => {
                u32s(&mut out, kind::FLUSH, &[*id]);
                put_rect(&mut out, rect);
            }
            Message::Cursor { command, fields } => {
                u32s(&mut out, kind::CURSOR, &[*command]);
                for v in fields {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Message::SetMode {
                scanout,
                width,
                height,
            } => u32s(&mut out, kind::SET_MODE, &[*scanout, *width, *height]),
            Message::Ping => out.push(kind::PING),
            Message::Welcome { version } => {
                out.push(kind::WELCOME);
                out.extend_from_slice(&version.to_le_bytes());
            }
            Message::Damage {
                scanout,
                rect,
                pixels,
            } => {
                u32s(&mut out, kind::DAMAGE, &[*scanout]);
                put_rect(&mut out, rect);
                out.extend_from_slice(pixels);
            }
            Message::Answer { code, why } => {
                // A reason longer than a frame may carry (one naming a long input) is cut
                // at a character boundary: every frame sent decodes.
                let mut n = why.len().min(MAX_WHY);
                while !why.is_char_boundary(n) {
                    n -= 1;
                }
                let why = &why[..n];
                u32s(&mut out, kind::ANSWER, &[*code]);
                out.extend_from_slice(&(why.len() as u16).to_le_bytes());
                out.extend_from_slice(why.as_bytes());
            }
        }
        out
    }

    /// A message out of a frame's bytes (after its length), every field checked.
    pub fn decode(buf: &[u8]) -> Result<Message, WireError> {
        if buf.is_empty() {
            return Err(WireError::Empty);
        }
        if buf.len() > MAX_FRAME {
            return Err(WireError::TooLong(buf.len()));
        }
        let mut f = Fields {
            buf,
            at: 1,
            kind: buf[0],
        };
        let m = match buf[0] {
            kind::HELLO => {
                if f.take(4)? != MAGIC {
                    return Err(WireError::Magic);
                }
                let version = f.u16()?;
                let n = usize::from(f.u16()?);
                if n > MAX_TOKEN {
                    return Err(WireError::Token(n));
                }
                let token = f.take(n)?.to_vec();
                let count = usize::from(f.u8()?);
                if !(1..=MAX_SCANOUTS).contains(&count) {
                    return Err(WireError::Scanouts(count));
                }
                let mut modes = Vec::with_capacity(count);
                for _ in 0..count {
                    modes.push((f.u32()?, f.u32()?));
                }
                Message::Hello {
                    version,
                    token,
                    modes,
                }
            }
            kind::RESET => Message::Reset,
            kind::CREATE => Message::Create {
                id: f.u32()?,
                format: f.u32()?,
                width: f.u32()?,
                height: f.u32()?,
            },
            kind::UNREF => Message::Unref { id: f.u32()? },
            kind::TRANSFER => {
                let id = f.u32()?;
                let rect = f.rect()?;
                let pixels = f.pixels(rect)?;
                Message::Transfer { id, rect, pixels }
            }
            kind::SET_SCANOUT => Message::SetScanout {
                scanout: f.u32()?,
                id: f.u32()?,
                rect: f.rect()?,
            },
            kind::FLUSH => Message::Flush {
                id: f.u32()?,
                rect: f.rect()?,
            },
            kind::CURSOR => {
                let command = f.u32()?;
                let mut fields = [0; 7];
                for v in &mut fields {
                    *v = f.u32()?;
                }
                Message::Cursor { command, fields }
            }
            kind::SET_MODE => Message::SetMode {
                scanout: f.u32()?,
                width: f.u32()?,
                height: f.u32()?,
            },
            kind::PING => Message::Ping,
            kind::WELCOME => Message::Welcome { version: f.u16()? },
            kind::DAMAGE => {
                let scanout = f.u32()?;
                let rect = f.rect()?;
                let pixels = f.pixels(rect)?;
                Message::Damage {
                    scanout,
                    rect,
                    pixels,
                }
            }
            kind::ANSWER => {
                let code = f.u32()?;
                let n = usize::from(f.u16()?);
                if n > MAX_WHY {
                    return Err(WireError::Why(n));
                }
                let why = std::str::from_utf8(f.take(n)?)
                    .map_err(|_| WireError::Why(n))?
                    .to_string();
                Message::Answer { code, why }
            }
            other => return Err(WireError::UnknownKind(other)),
        };
        f.end()?;
        Ok(m)
    }
}

/// Writes `m` as one frame.
pub fn send(w: &mut impl Write, m: &Message) -> std::io::Result<()> {
    let body = m.encode();
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()
}

/// Why a frame could not be had.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer broke the protocol: {0}")]
    Wire(#[from] WireError),
}

/// Reads one frame and decodes it; a length out of range is refused before anything of
/// that size is allocated.
pub fn recv(r: &mut impl Read) -> Result<Message, RecvError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 {
        return Err(WireError::Empty.into());
    }
    if len > MAX_FRAME {
        return Err(WireError::TooLong(len).into());
    }
    let mut buf = vec![0; len];
    r.read_exact(&mut buf)?;
    Ok(Message::decode(&buf)?)
}

/// Whether two tokens are equal, in a time that depends on their lengths only.
pub fn same_token(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Message> {
        let rect = Rect {
            x: 1,
            y: 2,
            width: 3,
            height: 2,
        };
        vec![
            Message::Hello {
                version: VERSION,
                token: b"secret".to_vec(),
                modes: vec![(640, 480), (800, 600)],
            },
            Message::Reset,
            Message::Create {
                id: 1,
                format: 2,
                width: 3,
                height: 4,
            },
            Message::Unref { id: 9 },
            Message::Transfer {
                id: 1,
                rect,
                pixels: vec![7; 24],
            },
            Message::SetScanout {
                scanout: 0,
                id: 1,
                rect,
            },
            Message::Flush { id: 1, rect },
            Message::Cursor {
                command: 0x300,
                fields: [1, 2, 3, 4, 5, 6, 7],
            },
            Message::SetMode {
                scanout: 1,
                width: 1024,
                height: 768,
            },
            Message::Ping,
            Message::Welcome { version: VERSION },
            Message::Damage {
                scanout: 1,
                rect,
                pixels: vec![9; 24],
            },
            Message::Answer {
                code: 0x1203,
                why: "resource 4 does not exist".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_through_a_frame() {
        for m in every_kind() {
            let mut buf = Vec::new();
            send(&mut buf, &m).unwrap();
            assert_eq!(recv(&mut &buf[..]).unwrap(), m);
        }
    }

    #[test]
    fn every_shortened_or_lengthened_message_is_refused_by_name() {
        for m in every_kind() {
            let bytes = m.encode();
            for cut in 1..bytes.len() {
                assert!(
                    Message::decode(&bytes[..cut]).is_err(),
                    "{m:?} cut at {cut}"
                );
            }
            let mut long = bytes.clone();
            long.push(0);
            assert!(Message::decode(&long).is_err(), "{m:?} with a byte more");
        }
    }

    #[test]
    fn bad_fields_are_refused_naming_them() {
        let e = Message::decode(&[200]).unwrap_err();
        assert_eq!(e.to_string(), "unknown message kind 200");
        let mut hello = Message::Hello {
            version: 1,
            token: vec![],
            modes: vec![(1, 1)],
        }
        .encode();
        hello[1] = b'X';
        assert_eq!(Message::decode(&hello).unwrap_err(), WireError::Magic);
        let mut none = vec![kind::HELLO];
        none.extend_from_slice(&MAGIC);
        none.extend_from_slice(&[1, 0, 0, 0, 0]);
        assert_eq!(Message::decode(&none).unwrap_err(), WireError::Scanouts(0));
        let mut damage = vec![kind::DAMAGE];
        for v in [0u32, 0, 0, 0x10000, 0x10000] {
            damage.extend_from_slice(&v.to_le_bytes());
        }
        assert!(matches!(
            Message::decode(&damage).unwrap_err(),
            WireError::Pixels { got: 0, .. }
        ));
        let mut len = (MAX_FRAME as u32 + 1).to_le_bytes().to_vec();
        len.push(kind::PING);
        assert!(matches!(
            recv(&mut &len[..]).unwrap_err(),
            RecvError::Wire(WireError::TooLong(_))
        ));
        let why = vec![kind::ANSWER, 0, 0x11, 0, 0, 2, 0, 0xff, 0xfe];
        assert_eq!(Message::decode(&why).unwrap_err(), WireError::Why(2));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"abc", b"abc"));
        assert!(same_token(b"", b""));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"abc", b"abcd"));
        assert!(!same_token(b"abc\0", b"abc"));
    }

    #[test]
    fn a_long_reason_is_cut_so_that_the_answer_still_decodes() {
        let long = Message::Answer {
            code: 1,
            why: "é".repeat(MAX_WHY),
        };
        let bytes = long.encode();
        match Message::decode(&bytes) {
            Ok(Message::Answer { code: 1, why }) => {
                assert!(
                    why.len() <= MAX_WHY && why.len() >= MAX_WHY - 1,
                    "{}",
                    why.len()
                );
                assert!(why.chars().all(|c| c == 'é'));
            }
            other => panic!("{other:?}"),
        }
    }
}
