//! A hostile VNC client: the first input byte picks what it attacks, the rest is what it
//! sends.
//!
//! - handshake: the server's side of the RFB handshake (version, security, ClientInit);
//! - messages: client messages after the handshake, read one after another until one is
//!   refused. An accepted pixel format re-encodes to itself and has 1, 2 or 4 bytes per
//!   pixel.
#![no_main]

use std::io::{Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use ray_display::rfb::{self, ClientMessage, PixelFormat};

/// A socket stand-in: reads from the input, swallows what the server writes.
struct Pipe(Cursor<Vec<u8>>);

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut pipe = Pipe(Cursor::new(rest.to_vec()));
    if mode % 2 == 0 {
        let _ = rfb::handshake(&mut pipe, 640, 480, "fuzz");
        return;
    }
    for _ in 0..256 {
        match rfb::read_message(&mut pipe) {
            Ok(ClientMessage::SetPixelFormat(pf)) => {
                assert_eq!(PixelFormat::from_bytes(&pf.to_bytes()).ok(), Some(pf));
                assert!((1..=4).contains(&pf.bytes_per_pixel()));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
});
