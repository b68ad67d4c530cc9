//! Throughput benchmark: migrate N MiB over loopback TCP vs a raw TCP copy of the same bytes.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ray_memory::{GuestMemory, MemoryError, MemoryLayout};

use crate::auth::PresharedKey;
use crate::memvm::{InMemorySource, InMemoryTarget, MemGuest};
use crate::progress::CancelToken;
use crate::protocol::{regions_of, CompatInfo};
use crate::receiver::{receive_migration, ReceiveFailure, ReceiverConfig};
use crate::sender::{send_migration, SendFailure, SenderConfig};
use crate::transport::{connect, Endpoint, Listener, TransportError};

/// Both rates in MiB/s; `ratio` is migration / raw.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BenchResult {
    pub mib: u64,
    /// Bulk pre-copy pass: pages read, framed, MACed, sent, written, acknowledged.
    pub migration_mib_s: f64,
    /// Whole migration including handshake, both-side hashing and switch-over.
    pub end_to_end_mib_s: f64,
    pub raw_tcp_mib_s: f64,
    pub ratio: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("the benchmark socket failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the benchmark could not connect: {0}")]
    Transport(#[from] TransportError),
    #[error("the benchmark guest memory failed: {0}")]
    Memory(#[from] MemoryError),
    #[error("the benchmark migration failed on the source: {0}")]
    Send(#[from] Box<SendFailure>),
    #[error("the benchmark migration failed on the target: {0}")]
    Receive(#[from] Box<ReceiveFailure>),
    #[error("the benchmark receiver thread panicked")]
    Panicked,
}

const TIMEOUT: Duration = Duration::from_secs(60);

/// Pumps `mib` MiB of random (incompressible, all non-zero) pages both ways and compares.
pub fn bench_migrate(mib: u64, compress: bool) -> Result<BenchResult, BenchError> {
    let size = mib.max(1) << 20;
    let layout = MemoryLayout::new(&[(0, size)]).map_err(|e| MemoryError {
        gpa: 0,
        len: size,
        reason: e.to_string(),
    })?;
    let src = Arc::new(MemGuest::new(&layout)?);
    src.fill(0x5eed, 100);
    let raw = raw_tcp(&*src, size)?;

    let dst = Arc::new(MemGuest::new(&layout)?);
    dst.prefault();
    let compat = CompatInfo {
        vcpus: 1,
        page_size: 4096,
        regions: regions_of(&layout),
        cpuid_fingerprint: [0; 32],
        flavour: "bench".into(),
    };
    let key = PresharedKey::new(b"rayvisor-benchmark-key")
        .map_err(|e| BenchError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let listener = Listener::bind(&loopback())?;
    let addr = listener.endpoint().clone();
    let (rkey, rcompat, rdst) = (key.clone(), compat.clone(), dst.clone());
    let receiver = std::thread::spawn(move || -> Result<(), BenchError> {
        let s = listener.accept(&CancelToken::new(), Some(TIMEOUT), TIMEOUT)?;
        let mut vm = InMemoryTarget::default();
        receive_migration(s, &*rdst, &mut vm, &rcompat, &ReceiverConfig::new(rkey))
            .map_err(Box::new)?;
        Ok(())
    });
    let stream = connect(&addr, TIMEOUT)?;
    let mut vm = InMemorySource::new(src.clone(), vec![1; 4096]);
    let mut cfg = SenderConfig::new(key);
    cfg.compress = compress;
    let t = Instant::now();
    let report = send_migration(stream, &*src, &mut vm, &compat, &cfg).map_err(Box::new)?;
    let total = t.elapsed();
    receiver.join().map_err(|_| BenchError::Panicked)??;
    let first = report.passes.first().map(|p| p.bytes_sent).unwrap_or(0);
    let bw = report
        .passes
        .first()
        .map(|p| p.bandwidth_bps)
        .unwrap_or(0.0);
    let _ = first;
    let migration = bw / (1 << 20) as f64;
    Ok(BenchResult {
        mib,
        migration_mib_s: migration,
        end_to_end_mib_s: mib as f64 / total.as_secs_f64().max(1e-9),
        raw_tcp_mib_s: raw,
        ratio: if raw > 0.0 { migration / raw } else { 0.0 },
    })
}

/// Copies `size` bytes of guest memory through a loopback socket in 1 MiB writes.
fn raw_tcp<M: GuestMemory + ?Sized>(mem: &M, size: u64) -> Result<f64, BenchError> {
    let listener = Listener::bind(&loopback())?;
    let addr = listener.endpoint().clone();
    let reader = std::thread::spawn(move || -> Result<u64, BenchError> {
        let mut s = listener.accept(&CancelToken::new(), Some(TIMEOUT), TIMEOUT)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(n),
                k => n += k as u64,
            }
        }
    });
    let mut s = connect(&addr, TIMEOUT)?;
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        mem.read(off, &mut buf[..n])?;
        s.write_all(&buf[..n])?;
        off += n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let got = reader.join().map_err(|_| BenchError::Panicked)??;
    let secs = t.elapsed().as_secs_f64().max(1e-9);
    Ok(got as f64 / secs / (1 << 20) as f64)
}

/// Any free port on the loopback interface.
fn loopback() -> Endpoint {
    Endpoint::Tcp("127.0.0.1:0".into())
}
