//! The versioned binary container used for the state file and the page map:
//!
//! ```text
//! magic (8 bytes) | format version (u32 LE) | payload length (u64 LE) | payload | CRC32 (u32 LE)
//! ```
//!
//! The CRC covers everything before it, so a flipped bit in the header is caught too. A
//! reader gives a size limit: the file is untrusted, and its length field must not make us
//! allocate gigabytes before the checksum has had a chance to fail.
use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{io_err, FileError};
use crate::fsutil::write_synced;

/// The container format version this build writes and reads.
pub const CONTAINER_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8;
const TRAILER: usize = 4;

/// Which kind of container a file is; its magic says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Magic {
    pub bytes: &'static [u8; 8],
    pub name: &'static str,
}

pub(crate) const STATE_MAGIC: Magic = Magic {
    bytes: b"RAYSTATE",
    name: "rayvisor state",
};
pub(crate) const PAGEMAP_MAGIC: Magic = Magic {
    bytes: b"RAYPGMAP",
    name: "rayvisor page map",
};

/// Encodes `payload` in a container with `magic`.
pub(crate) fn encode(magic: Magic, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len() + TRAILER);
    out.extend_from_slice(magic.bytes);
    out.extend_from_slice(&CONTAINER_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Reads and checks a container file, returning its payload.
pub(crate) fn read(path: &Path, magic: Magic, limit: u64) -> Result<Vec<u8>, FileError> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut header = [0u8; HEADER];
    let got = read_full(&mut f, &mut header).map_err(io_err("read", path))?;
    if got >= 8 && &header[..8] != magic.bytes {
        return Err(FileError::BadMagic {
            path: path.to_path_buf(),
            expected: magic.name,
            got: String::from_utf8_lossy(&header[..8]).into_owned(),
        });
    }
    if got < HEADER {
        return Err(FileError::Truncated {
            path: path.to_path_buf(),
            at: got as u64,
            what: format!("the header needs {HEADER} bytes"),
        });
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != CONTAINER_VERSION {
        return Err(FileError::UnsupportedVersion {
            path: path.to_path_buf(),
            got: version,
            supported: CONTAINER_VERSION,
        });
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[12..20]);
    let len = u64::from_le_bytes(len_bytes);
    if len > limit {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            got: len,
            limit,
        });
    }
    // `len <= limit`, and the limit is what the caller accepts to allocate.
    let mut rest = vec![0u8; len as usize + TRAILER];
    let got = read_full(&mut f, &mut rest).map_err(io_err("read", path))?;
    if got < rest.len() {
        return Err(FileError::Truncated {
            path: path.to_path_buf(),
            at: (HEADER + got) as u64,
            what: format!(
                "the header declares {} bytes in all",
                HEADER as u64 + len + TRAILER as u64
            ),
        });
    }
    let mut extra = [0u8; 1];
    if read_full(&mut f, &mut extra).map_err(io_err("read", path))? != 0 {
        return Err(crate::error::invalid(
            path,
            format!(
                "it has bytes after the {} the header declares",
                HEADER as u64 + len + TRAILER as u64
            ),
        ));
    }
    let body = len as usize;
    let expected = u32::from_le_bytes([rest[body], rest[body + 1], rest[body + 2], rest[body + 3]]);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header);
    hasher.update(&rest[..body]);
    let got = hasher.finalize();
    if got != expected {
        return Err(FileError::Checksum {
            path: path.to_path_buf(),
            location: String::new(),
            expected,
            got,
        });
    }
    rest.truncate(body);
    Ok(rest)
}

/// Reads until `buf` is full or the file ends; returns how many bytes were read.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The VM state file: an opaque payload (the VMM's serialized vCPU, VM and device state).
pub struct StateFile;

impl StateFile {
    /// Default read limit: VM state is kilobytes to a few megabytes, never near this.
    pub const DEFAULT_LIMIT: u64 = 64 << 20;

    /// Writes `payload` to `path` as a state file and fsyncs it; returns the file's bytes
    /// and the CRC32 of the whole file (recorded in the manifest).
    pub fn write(path: &Path, payload: &[u8]) -> Result<(u64, u32), FileError> {
        let data = encode(STATE_MAGIC, payload);
        write_synced(path, &data)?;
        Ok((data.len() as u64, crc32fast::hash(&data)))
    }

    /// Reads a state file, refusing payloads larger than `limit` bytes.
    pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
        read(path, STATE_MAGIC, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;

    #[test]
    fn round_trip_and_every_flipped_byte_is_caught() {
        let dir = TempDir::new("container");
        let path = dir.path().join("state.bin");
        let payload: Vec<u8> = (0..200u32).map(|i| (i * 7) as u8).collect();
        StateFile::write(&path, &payload).unwrap();
        assert_eq!(StateFile::read(&path, 1 << 20).unwrap(), payload);
        let good = std::fs::read(&path).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            let err = StateFile::read(&path, 1 << 20).unwrap_err();
            assert!(err.to_string().contains("state.bin"), "{err}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let dir = TempDir::new("container-errors");
        let path = dir.path().join("state.bin");
        let good = encode(STATE_MAGIC, b"hello");

        std::fs::write(&path, b"NOTSTATE0000000000000000").unwrap();
        let e = StateFile::read(&path, 100).unwrap_err().to_string();
        assert!(e.contains("is not a rayvisor state file"), "{e}");

        let mut v2 = good.clone();
        v2[8] = 2;
        std::fs::write(&path, &v2).unwrap();
        let e = StateFile::read(&path, 100).unwrap_err().to_string();
        assert!(
            e.contains("unsupported format version 2 (supported: 1)"),
            "{e}"
        );

        std::fs::write(&path, &good[..good.len() - 2]).unwrap();
        let e = StateFile::read(&path, 100).unwrap_err().to_string();
        assert!(e.contains("truncated at byte 27"), "{e}");

        std::fs::write(&path, &good[..10]).unwrap();
        let e = StateFile::read(&path, 100).unwrap_err().to_string();
        assert!(e.contains("truncated at byte 10"), "{e}");

        std::fs::write(&path, &good).unwrap();
        let e = StateFile::read(&path, 4).unwrap_err().to_string();
        assert!(
            e.contains("5-byte payload, more than the limit of 4"),
            "{e}"
        );

        let mut bad = good.clone();
        bad[21] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let e = StateFile::read(&path, 100).unwrap_err().to_string();
        assert!(e.contains("fails its checksum: expected"), "{e}");

        let mut long = good;
        long.push(0);
        std::fs::write(&path, &long).unwrap();
        let e = StateFile::read(&path, 100).unwrap_err().to_string();
        assert!(e.contains("bytes after"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn any_payload_round_trips(payload in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let dir = TempDir::new("container-prop");
            let path = dir.path().join("s.bin");
            StateFile::write(&path, &payload).unwrap();
            proptest::prop_assert_eq!(StateFile::read(&path, 512).unwrap(), payload);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let dir = TempDir::new("container-fuzz");
            let path = dir.path().join("s.bin");
            std::fs::write(&path, &data).unwrap();
            let _ = StateFile::read(&path, 1 << 20);
        }
    }
}
