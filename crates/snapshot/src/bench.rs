//! Raw sequential write speed of the store's disk, so a full snapshot's write speed can be
//! reported as a fraction of what the disk can do.
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{io_err, FileError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteSpeed {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl WriteSpeed {
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Writes `mib` MiB of non-zero, incompressible-looking data to a scratch file in `dir`
/// in 4 MiB writes (the size a full snapshot writes), fsyncs, and removes the file. The
/// time includes the fsync, as a snapshot's does.
///
/// On thin-provisioned virtual disks, blocks written for the first time are several times
/// slower than reused ones (measured here: ~340 MiB/s vs ~2 GiB/s). Compare like with like:
/// measure right after deleting a snapshot of similar size, or run this twice and take the
/// second result.
pub fn sequential_write_speed(dir: &Path, mib: u64) -> Result<WriteSpeed, FileError> {
    let path = dir.join(format!(".bench-{}", std::process::id()));
    let mut block = vec![0u8; 4 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in block.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    let total = mib << 20;
    let start = Instant::now();
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        let mut written = 0;
        while written < total {
            let n = (total - written).min(block.len() as u64) as usize;
            f.write_all(&block[..n]).map_err(io_err("write", &path))?;
            written += n as u64;
        }
        f.sync_all().map_err(io_err("fsync", &path))
    })();
    let elapsed = start.elapsed();
    let _ = std::fs::remove_file(&path);
    result?;
    Ok(WriteSpeed {
        bytes: total,
        elapsed,
    })
}
