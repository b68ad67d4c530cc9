//! A virtio-blk request (§5.2.6) read out of a descriptor chain and checked against the
//! disk: a pure function of the chain and the guest's header bytes, so that every way a
//! guest can get a request wrong is decided here, before any I/O.
//!
//! Layout: a 16-byte device-readable header (type, reserved, sector), then the data
//! (device-readable for writes, discard and write-zeroes ranges; device-writable for
//! reads and GET_ID), then one device-writable status byte, the chain's last.
use ray_memory::GuestMemory;

use crate::virtio::queue::{Chain, Descriptor};

pub const SECTOR: u64 = 512;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// GET_ID answers at most this many bytes.
pub const ID_BYTES: u32 = 20;
/// A discard or write-zeroes range: sector, sector count, flags.
const RANGE_BYTES: u64 = 16;
const WZ_F_UNMAP: u32 = 1;

/// What the device advertises and enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub capacity_sectors: u64,
    /// Data segments (descriptors) per request.
    pub seg_max: u32,
    /// Bytes per segment.
    pub size_max: u32,
    /// Sectors per discard or write-zeroes range, and ranges per request.
    pub max_range_sectors: u32,
    pub max_ranges: u32,
    pub readonly: bool,
}

/// A guest memory buffer of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Read(Vec<Segment>),
    Write(Vec<Segment>),
    Flush,
    GetId(Vec<Segment>),
    /// (sector, sectors) ranges.
    Discard(Vec<(u64, u32)>),
    WriteZeroes {
        ranges: Vec<(u64, u32)>,
        unmap: bool,
    },
}

/// A checked request: its operation on the disk at `sector`, and where its status goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub sector: u64,
    pub status: u64,
}

impl Request {
    /// Bytes the operation moves (for rate limits).
    pub fn bytes(&self) -> u64 {
        let sum = |s: &[Segment]| s.iter().map(|s| u64::from(s.len)).sum();
        match &self.op {
            Op::Read(s) | Op::Write(s) => sum(s),
            _ => 0,
        }
    }
}

/// Why a request is refused. With a status byte the request completes with `status`;
/// without one ([`Refused::NoStatus`]) it is returned unanswered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    NoStatus(String),
    Status { status: u64, code: u8, why: String },
}

impl Refused {
    pub fn why(&self) -> &str {
        match self {
            Refused::NoStatus(w) | Refused::Status { why: w, .. } => w,
        }
    }
}

fn segments(descs: &[Descriptor]) -> Vec<Segment> {
    descs
        .iter()
        .filter(|d| d.len > 0)
        .map(|d| Segment {
            addr: d.addr,
            len: d.len,
        })
        .collect()
}

/// Reads `len` bytes at byte `offset` of the concatenated `descs`.
fn gather(
    mem: &(dyn GuestMemory + Send + Sync),
    descs: &[Descriptor],
    mut offset: u64,
    out: &mut [u8],
) -> Option<()> {
    let mut done = 0;
    for d in descs {
        let len = u64::from(d.len);
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = ((len - offset) as usize).min(out.len() - done);
        mem.read(d.addr + offset, &mut out[done..done + n]).ok()?;
        done += n;
        offset = 0;
        if done == out.len() {
            return Some(());
        }
    }
    (done == out.len()).then_some(())
}

/// Splits `descs` after the first `skip` bytes.
fn after(descs: &[Descriptor], skip: u64) -> Vec<Descriptor> {
    let mut left = skip;
    let mut out = Vec::new();
    for d in descs {
        let len = u64::from(d.len);
        if left >= len {
            left -= len;
            continue;
        }
        out.push(Descriptor {
            addr: d.addr + left,
            len: (len - left) as u32,
            writable: d.writable,
        });
        left = 0;
    }
    out
}

/// Reads and checks the request in `chain`.
pub fn parse(
    chain: &Chain,
    mem: &(dyn GuestMemory + Send + Sync),
    limits: &Limits,
) -> Result<Request, Refused> {
    let descs = &chain.descriptors;
    let last = descs
        .last()
        .ok_or_else(|| Refused::NoStatus("the chain is empty".into()))?;
    if !last.writable || last.len == 0 {
        return Err(Refused::NoStatus(
            "the status byte (the chain's last buffer) is not device-writable".into(),
        ));
    }
    let status = last.addr + u64::from(last.len) - 1;
    let fail = |code: u8, why: String| Refused::Status { status, code, why };
    let readable: Vec<Descriptor> = descs.iter().filter(|d| !d.writable).copied().collect();
    // The writable buffers without the status byte.
    let mut writable: Vec<Descriptor> = descs.iter().filter(|d| d.writable).copied().collect();
    if let Some(w) = writable.last_mut() {
        w.len -= 1;
    }
    let mut header = [0u8; 16];
    if gather(mem, &readable, 0, &mut header).is_none() {
        return Err(fail(
            S_IOERR,
            "the request header is shorter than 16 bytes or not device-readable".into(),
        ));
    }
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let payload = after(&readable, 16);
    let data_in = segments(&writable);
    let data_out = segments(&payload);
    let op = match kind {
        T_IN | T_GET_ID if !data_out.is_empty() => {
            return Err(fail(
                S_IOERR,
                format!("a type {kind} request has device-readable data (wrong direction)"),
            ))
        }
        T_OUT | T_FLUSH | T_DISCARD | T_WRITE_ZEROES if !data_in.is_empty() => {
            return Err(fail(
                S_IOERR,
                format!("a type {kind} request has device-writable data (wrong direction)"),
            ))
        }
        T_IN => Op::Read(data_in),
        T_OUT => Op::Write(data_out),
        T_FLUSH => Op::Flush,
        T_GET_ID => Op::GetId(data_in),
        T_DISCARD | T_WRITE_ZEROES => {
            let bytes: u64 = data_out.iter().map(|s| u64::from(s.len)).sum();
            if bytes == 0
                || !bytes.is_multiple_of(RANGE_BYTES)
                || bytes / RANGE_BYTES > u64::from(limits.max_ranges)
            {
                return Err(fail(
                    S_IOERR,
                    format!(
                        "a discard/write-zeroes request carries {bytes} bytes of ranges: a \
                         multiple of 16, 1 to {} ranges",
                        limits.max_ranges
                    ),
                ));
            }
            let mut ranges = Vec::new();
            let mut unmap = false;
            for i in 0..bytes / RANGE_BYTES {
                let mut r = [0u8; 16];
                gather(mem, &payload, i * RANGE_BYTES, &mut r)
                    .ok_or_else(|| fail(S_IOERR, "a range cannot be read".into()))?;
                let start = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
                let count = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
                let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
                if count > limits.max_range_sectors {
                    return Err(fail(
                        S_IOERR,
                        format!(
                            "a range of {count} sectors is more than the {} advertised",
                            limits.max_range_sectors
                        ),
                    ));
                }
                check_extent(limits, start, u64::from(count) * SECTOR)
                    .map_err(|w| fail(S_IOERR, w))?;
                unmap |= flags & WZ_F_UNMAP != 0;
                ranges.push((start, count));
            }
            if kind == T_DISCARD {
                Op::Discard(ranges)
            } else {
                Op::WriteZeroes { ranges, unmap }
            }
        }
        other => {
            return Err(fail(
                S_UNSUPP,
                format!("request type {other} is not supported"),
            ))
        }
    };
    if let Op::Read(s) | Op::Write(s) = &op {
        if s.len() > limits.seg_max as usize {
            return Err(fail(
                S_IOERR,
                format!(
                    "{} data segments, more than the {} advertised",
                    s.len(),
                    limits.seg_max
                ),
            ));
        }
        if let Some(big) = s.iter().find(|s| s.len > limits.size_max) {
            return Err(fail(
                S_IOERR,
                format!(
                    "a segment of {} bytes, more than the {} advertised",
                    big.len, limits.size_max
                ),
            ));
        }
        let bytes: u64 = s.iter().map(|s| u64::from(s.len)).sum();
        if !bytes.is_multiple_of(SECTOR) {
            return Err(fail(
                S_IOERR,
                format!("{bytes} data bytes are not whole sectors"),
            ));
        }
        check_extent(limits, sector, bytes).map_err(|w| fail(S_IOERR, w))?;
    }
    let writes = matches!(op, Op::Write(_) | Op::Discard(_) | Op::WriteZeroes { .. });
    if writes && limits.readonly {
        return Err(fail(S_IOERR, "the disk is read-only".into()));
    }
    Ok(Request { op, sector, status })
}

fn check_extent(limits: &Limits, sector: u64, bytes: u64) -> Result<(), String> {
    let end = sector
        .checked_mul(SECTOR)
        .and_then(|start| start.checked_add(bytes));
    match end {
        Some(end) if end <= limits.capacity_sectors * SECTOR => Ok(()),
        _ => Err(format!(
            "sectors {sector}+{} reach beyond the capacity of {} sectors",
            bytes / SECTOR,
            limits.capacity_sectors
        )),
    }
}
