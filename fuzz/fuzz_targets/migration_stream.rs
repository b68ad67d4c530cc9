//! A migration target reading a hostile stream. The first input byte picks the mode:
//!
//! - raw: the rest is the byte stream as it comes off the socket (headers, lengths,
//!   checksums, truncation: everything a peer can get wrong before it is authenticated);
//! - framed: the rest is a list of frames (command, flags, payload) that the project's own
//!   sender encodes, so the fuzzer gets past the checksums to the payload decoders and to
//!   page placement into guest memory;
//! - handshake: the rest is what a source sends a target that waits for it, after a valid
//!   preamble asking for an encrypted migration: the Noise handshake and the records after
//!   it, read by the target's side of the secure stream.
//!
//! Nothing may panic, and a placed page must land inside guest memory (the placement is
//! checked against the layout, and [`OwnedMemory`] faults outside it). `DiskBlocks`
//! frames (`--copy-disks`) go to the target's disk files as the receiver writes them:
//! a range outside a disk, of a disk that was not announced, or not of whole blocks is
//! refused, and no file ever grows past its disk's size.
#![no_main]

use std::io::{Cursor, Read, Write};
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use ray_memory::{MemoryLayout, OwnedMemory, PAGE_SIZE};
use ray_migration::auth;
use ray_migration::disk::{part_path, DiskInfo, TargetDisks, BLOCK_SIZE};
use ray_migration::frame::{Channel, FrameStream, Received, FLAG_RESPONSE};
use ray_migration::protocol::{parse_disk_blocks, Command};
use ray_migration::secure::{accept_secure, Protection};
use ray_migration::vm::PageHashes;

/// A socket stand-in: reads from the input, swallows what the receiver writes back.
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

impl FrameStream for Pipe {}

/// The frames of `data` as the project's sender writes them: each is a command byte, a
/// flags byte (bit 0: response, bit 1: try lz4), a 16-bit length and that much payload.
fn encode(data: &[u8]) -> Vec<u8> {
    let mut tx = Channel::new(Cursor::new(Vec::new()));
    let mut rest = data;
    while rest.len() >= 4 {
        let Ok(command) = Command::try_from(u16::from(rest[0] % 18)) else {
            rest = &rest[4..];
            continue;
        };
        let flags = if rest[1] & 1 != 0 { FLAG_RESPONSE } else { 0 };
        let compress = rest[1] & 2 != 0;
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]])).min(rest.len() - 4);
        let payload = &rest[4..4 + len];
        if tx.send_raw(command, 7, flags, payload, compress).is_err() {
            break;
        }
        rest = &rest[4 + len..];
    }
    tx.into_inner().into_inner()
}

/// The disks a copying source announced: two files in a directory of this process.
const DISK_SIZES: [u64; 2] = [16 * BLOCK_SIZE, 3 * BLOCK_SIZE + 512];

fn disks() -> &'static Mutex<TargetDisks> {
    static DISKS: OnceLock<Mutex<TargetDisks>> = OnceLock::new();
    DISKS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ray-fuzz-disks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for the disks");
        let list: Vec<DiskInfo> = DISK_SIZES
            .iter()
            .enumerate()
            .map(|(i, &size)| DiskInfo {
                id: format!("disk{i}"),
                size,
            })
            .collect();
        Mutex::new(TargetDisks::create(&dir, "fuzz", &list).expect("the disk files"))
    })
}

/// Writes a `DiskBlocks` payload as the receiver does, then checks no file grew.
fn write_disk_blocks(payload: &[u8]) {
    let Ok(r) = parse_disk_blocks(payload) else {
        return;
    };
    let mut disks = disks().lock().unwrap_or_else(|p| p.into_inner());
    let _ = disks.write(r.disk, r.offset, r.len, r.data);
    for ((id, path), size) in disks.paths().iter().zip(DISK_SIZES) {
        // Written under the partial name until a commit, which the fuzz target never does.
        let path = &part_path(path.parent().expect("a directory"), id, "fuzz");
        let now = std::fs::metadata(path).expect("the disk file").len();
        assert_eq!(
            now,
            size,
            "a disk blocks frame changed the size of {}",
            path.display()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let layout = MemoryLayout::new(&[(0, 16 * PAGE_SIZE), (1 << 20, 16 * PAGE_SIZE)])
        .expect("a valid layout");
    let stream = match mode % 3 {
        0 => rest.to_vec(),
        1 => encode(rest),
        _ => {
            let psk = auth::PresharedKey::new(b"fuzzing key of some length").expect("long enough");
            let mut wire = b"RYMN\x01\x01\x00\x00".to_vec();
            wire.extend_from_slice(rest);
            let pipe = Pipe(Cursor::new(wire));
            // Forging the handshake needs the key: an accepted one would be a finding.
            if accept_secure(pipe, &psk, Protection::Encrypted).is_ok() {
                panic!("a handshake without the key was accepted");
            }
            return;
        }
    };
    let mut rx = Channel::new(Pipe(Cursor::new(stream)));
    let mem = OwnedMemory::zeroed(&layout).expect("memory");
    let mut hashes = PageHashes::new(&layout, PAGE_SIZE as usize);
    for _ in 0..64 {
        match rx.recv_frame_placing(&mem, &mut hashes, PAGE_SIZE as usize) {
            Ok(Received::Frame(f)) => {
                let _ = f.message();
                if f.header.command == Command::DiskBlocks {
                    write_disk_blocks(f.payload);
                }
            }
            Ok(Received::Placed { .. }) => {}
            Err(_) => break,
        }
    }
});
