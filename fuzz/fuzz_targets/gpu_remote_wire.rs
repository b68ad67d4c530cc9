//! A hostile peer of the remote GPU protocol: the bytes are frames a VMM or a back end
//! might send. Every frame decodes to a message that encodes back to the same bytes, or
//! is refused; a back end fed the bytes as its VMM answers only well-formed frames (each
//! request an Answer, Damage inside the scanouts it announced) and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ray_devices::virtio::gpu::backend::serve_conn;
use ray_devices::virtio::gpu::commands::Limits;
use ray_devices::virtio::gpu::wire::{self, Message};

struct Peer<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl std::io::Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    // The decoder: whatever it accepts round-trips.
    let mut input = data;
    while let Ok(m) = wire::recv(&mut input) {
        let bytes = m.encode();
        assert_eq!(Message::decode(&bytes).as_ref(), Ok(&m));
    }
    // The back end with the bytes as its VMM (small limits: a fuzzer's resources stay
    // small).
    let limits = Limits {
        host_bytes: 1 << 20,
        resources: 16,
        backing_entries: 16,
    };
    let mut peer = Peer {
        input: data,
        output: Vec::new(),
    };
    let _ = serve_conn(&mut peer, Some(b"fuzz-token-0123456789"), limits);
    let mut out = &peer.output[..];
    let mut modes = None;
    while !out.is_empty() {
        let m = wire::recv(&mut out).expect("the back end sends only well-formed frames");
        match m {
            Message::Welcome { .. } => modes = Some(()),
            Message::Damage { .. } => assert!(modes.is_some(), "damage before a welcome"),
            Message::Answer { .. } => {}
            other => panic!("a back end does not send {other:?}"),
        }
    }
});
