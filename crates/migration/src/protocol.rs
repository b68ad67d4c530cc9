//! Commands and their payloads. Framing lives in [`crate::frame`].
//!
//! Conversation (source on the left; every request is answered before the next, except
//! that `MemoryPages` batches stream without answers until the `DirtyPass` marker):
//!
//! ```text
//!   ---- below every frame: the secure stream (crate::secure): Noise handshake, records ----
//! Hello{versions}               ->
//!                               <- Hello{[chosen]}
//! Compat{vcpus, regions, ..}    ->
//!                               <- Ack | Incompatible{reason}
//! MemoryPages* DirtyPass{n}     ->   (repeated per pre-copy pass)
//!                               <- Ack
//! MemoryPages* DirtyPass{last}  ->   (source paused)
//!                               <- Ack
//! State{blob}                   ->
//!                               <- Ack | Error{State}
//! VerifyHash{per-region hashes} ->
//!                               <- Ack | Error{VerifyMismatch}
//! Switchover                    ->   (source relinquishes the VM)
//!                               <- Resumed | Error{ResumeFailed}
//! Abort{reason}                 ->   (any time before Switchover)
//! ```
//!
//! With `--copy-disks` (protocol version 5, see [`crate::disk`]):
//!
//! ```text
//! Compat ...                    <- Ack
//! DiskList{id, size per disk}   ->
//!                               <- Ack | Error{Disk}        (the target made its files)
//! MemoryPages* DiskBlocks* DiskPass{n, bytes} DirtyPass{n}  ->   (each pass)
//! ...
//! State ...                     <- Ack
//! DiskVerify{digest per disk}   ->
//!                               <- Ack | Error{VerifyMismatch}
//! VerifyHash ...
//! ```

use crate::disk::DiskInfo;
use crate::frame::MAX_PAYLOAD;
use crate::ProtocolError;

/// Wire command numbers. Zero is never valid, so an all-zero header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    Invalid = 0,
    Hello = 1,
    // 2 was `Auth`, the proof of the key before the Noise handshake replaced it.
    Compat = 3,
    Incompatible = 4,
    MemoryPages = 5,
    DirtyPass = 6,
    State = 7,
    VerifyHash = 8,
    Switchover = 9,
    Resumed = 10,
    Abort = 11,
    Ack = 12,
    Error = 13,
    // Version 5: disks copied with the VM (crate::disk).
    DiskList = 14,
    DiskBlocks = 15,
    DiskPass = 16,
    DiskVerify = 17,
}

impl TryFrom<u16> for Command {
    type Error = ProtocolError;
    fn try_from(v: u16) -> Result<Self, ProtocolError> {
        Ok(match v {
            0 => return Err(ProtocolError::InvalidCommand),
            1 => Command::Hello,
            3 => Command::Compat,
            4 => Command::Incompatible,
            5 => Command::MemoryPages,
            6 => Command::DirtyPass,
            7 => Command::State,
            8 => Command::VerifyHash,
            9 => Command::Switchover,
            10 => Command::Resumed,
            11 => Command::Abort,
            12 => Command::Ack,
            13 => Command::Error,
            14 => Command::DiskList,
            15 => Command::DiskBlocks,
            16 => Command::DiskPass,
            17 => Command::DiskVerify,
            value => return Err(ProtocolError::UnknownCommand { value }),
        })
    }
}

/// Why a peer refused a request, carried in `Error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    AuthFailed = 1,
    Protocol = 2,
    Memory = 3,
    State = 4,
    VerifyMismatch = 5,
    ResumeFailed = 6,
    Internal = 7,
    Cancelled = 8,
    /// The target cannot take the disks (no disk directory, a file exists, a bad range).
    Disk = 9,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::AuthFailed,
            2 => Self::Protocol,
            3 => Self::Memory,
            4 => Self::State,
            5 => Self::VerifyMismatch,
            6 => Self::ResumeFailed,
            7 => Self::Internal,
            8 => Self::Cancelled,
            9 => Self::Disk,
            _ => return None,
        })
    }
}

/// One guest memory region on the wire ([`CompatInfo`]): guest-physical address and size
/// in bytes. Locally, guest memory is a [`ray_memory::MemoryLayout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryRegion {
    pub gpa: u64,
    pub size: u64,
}

impl From<ray_memory::Region> for MemoryRegion {
    fn from(r: ray_memory::Region) -> Self {
        MemoryRegion {
            gpa: r.gpa,
            size: r.len,
        }
    }
}

/// The wire form of `layout`'s regions, in its order.
pub fn regions_of(layout: &ray_memory::MemoryLayout) -> Vec<MemoryRegion> {
    layout.regions.iter().map(|&r| r.into()).collect()
}

/// What the target must match before any memory moves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CompatInfo {
    pub vcpus: u32,
    pub page_size: u32,
    pub regions: Vec<MemoryRegion>,
    /// Hash of the CPUID leaves the guest sees; the VMM computes it.
    pub cpuid_fingerprint: [u8; 32],
    /// Hypervisor flavour and state format, e.g. "rayvisor-kvm-x86_64/1".
    pub flavour: String,
}

impl CompatInfo {
    /// `None` when `source` can run here, else a sentence naming the first mismatch.
    pub fn mismatch(&self, source: &CompatInfo) -> Option<String> {
        if source.flavour != self.flavour {
            return Some(format!(
                "hypervisor flavour differs: source runs {:?}, target runs {:?}",
                source.flavour, self.flavour
            ));
        }
        if source.vcpus != self.vcpus {
            return Some(format!(
                "vCPU count differs: source has {}, target has {}",
                source.vcpus, self.vcpus
            ));
        }
        if source.page_size != self.page_size {
            return Some(format!(
                "page size differs: source uses {} bytes, target uses {}",
                source.page_size, self.page_size
            ));
        }
        if source.regions != self.regions {
            return Some(format!(
                "memory layout differs: source has {}, target has {}",
                fmt_regions(&source.regions),
                fmt_regions(&self.regions)
            ));
        }
        if source.cpuid_fingerprint != self.cpuid_fingerprint {
            return Some(format!(
                "CPUID differs: source fingerprint {}, target fingerprint {}",
                hex8(&source.cpuid_fingerprint),
                hex8(&self.cpuid_fingerprint)
            ));
        }
        None
    }
}

fn fmt_regions(r: &[MemoryRegion]) -> String {
    let parts: Vec<String> = r
        .iter()
        .map(|m| format!("{:#x}+{:#x}", m.gpa, m.size))
        .collect();
    format!("[{}]", parts.join(", "))
}

fn hex8(b: &[u8; 32]) -> String {
    b[..8].iter().map(|x| format!("{x:02x}")).collect()
}

/// BLAKE3 of one region's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionHash {
    pub gpa: u64,
    pub size: u64,
    pub hash: [u8; 32],
}

/// Owned form of a page batch (tests and small users; the drivers use
/// [`PageBatchWriter`] and [`PageBatchView`] to avoid copies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBatch {
    pub page_size: u32,
    /// `(gpa, None)` is a zero page.
    pub pages: Vec<(u64, Option<Vec<u8>>)>,
}

/// Every message, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello {
        versions: Vec<u16>,
    },
    Compat(CompatInfo),
    Incompatible {
        reason: String,
    },
    MemoryPages(PageBatch),
    DirtyPass {
        pass: u32,
        pages: u64,
        last: bool,
    },
    State(Vec<u8>),
    VerifyHash(Vec<RegionHash>),
    Switchover,
    Resumed,
    Abort {
        reason: String,
    },
    Ack {
        command: Command,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    DiskList(Vec<DiskInfo>),
    /// `len` bytes at `offset` of disk number `disk` (in `DiskList` order): `data`, or
    /// zeros when `None`.
    DiskBlocks {
        disk: u32,
        offset: u64,
        len: u64,
        data: Option<Vec<u8>>,
    },
    DiskPass {
        pass: u32,
        bytes: u64,
    },
    DiskVerify(Vec<[u8; 16]>),
}

/// `disk u32 | offset u64 | len u32 | data flag u8` at the start of a `DiskBlocks` payload.
pub const DISK_BLOCKS_HEADER: usize = 17;

/// The header of a `DiskBlocks` payload; the data (if `data`) follows it.
pub fn disk_blocks_header(
    disk: u32,
    offset: u64,
    len: u32,
    data: bool,
) -> [u8; DISK_BLOCKS_HEADER] {
    let mut h = [0u8; DISK_BLOCKS_HEADER];
    h[0..4].copy_from_slice(&disk.to_le_bytes());
    h[4..12].copy_from_slice(&offset.to_le_bytes());
    h[12..16].copy_from_slice(&len.to_le_bytes());
    h[16] = u8::from(data);
    h
}

/// A `DiskBlocks` payload, borrowed: `len` bytes at `offset` of disk `disk`, `data` or
/// zeros (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRange<'a> {
    pub disk: u32,
    pub offset: u64,
    pub len: u64,
    pub data: Option<&'a [u8]>,
}

/// A checked `DiskBlocks` payload. Ranges are checked against the disks by the receiver
/// ([`crate::disk::TargetDisks::write`]).
pub fn parse_disk_blocks(payload: &[u8]) -> Result<DiskRange<'_>, ProtocolError> {
    let bad = |reason: String| ProtocolError::Malformed {
        command: Command::DiskBlocks,
        reason,
    };
    let Some((h, rest)) = payload.split_first_chunk::<DISK_BLOCKS_HEADER>() else {
        return Err(bad(format!(
            "it is {} bytes, shorter than its {DISK_BLOCKS_HEADER}-byte header",
            payload.len()
        )));
    };
    let disk = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let mut o = [0u8; 8];
    o.copy_from_slice(&h[4..12]);
    let offset = u64::from_le_bytes(o);
    let len = u64::from(u32::from_le_bytes([h[12], h[13], h[14], h[15]]));
    let max = crate::disk::MAX_RUN_BLOCKS * crate::disk::BLOCK_SIZE;
    if len == 0 || len > max {
        return Err(bad(format!(
            "it covers {len} bytes; 1 to {max} are allowed"
        )));
    }
    let data = match h[16] {
        0 if rest.is_empty() => None,
        0 => {
            return Err(bad(format!(
                "it is a range of zeros but carries {} data bytes",
                rest.len()
            )))
        }
        1 if rest.len() as u64 == len => Some(rest),
        1 => {
            return Err(bad(format!(
                "it announces {len} data bytes and carries {}",
                rest.len()
            )))
        }
        v => return Err(bad(format!("its data flag is {v}, not 0 or 1"))),
    };
    Ok(DiskRange {
        disk,
        offset,
        len,
        data,
    })
}

const MAX_STRING: usize = 64 << 10;
const MAX_LIST: usize = 4096;
/// Most pages in one batch.
pub const MAX_BATCH_PAGES: u32 = 1 << 16;

impl Message {
    pub fn command(&self) -> Command {
        match self {
            Message::Hello { .. } => Command::Hello,
            Message::Compat(_) => Command::Compat,
            Message::Incompatible { .. } => Command::Incompatible,
            Message::MemoryPages(_) => Command::MemoryPages,
            Message::DirtyPass { .. } => Command::DirtyPass,
            Message::State(_) => Command::State,
            Message::VerifyHash(_) => Command::VerifyHash,
            Message::Switchover => Command::Switchover,
            Message::Resumed => Command::Resumed,
            Message::Abort { .. } => Command::Abort,
            Message::Ack { .. } => Command::Ack,
            Message::Error { .. } => Command::Error,
            Message::DiskList(_) => Command::DiskList,
            Message::DiskBlocks { .. } => Command::DiskBlocks,
            Message::DiskPass { .. } => Command::DiskPass,
            Message::DiskVerify(_) => Command::DiskVerify,
        }
    }

    /// Appends the payload to `out`.
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello { versions } => {
                out.extend_from_slice(&(versions.len() as u16).to_le_bytes());
                for v in versions {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Message::Compat(c) => {
                out.extend_from_slice(&c.vcpus.to_le_bytes());
                out.extend_from_slice(&c.page_size.to_le_bytes());
                out.extend_from_slice(&(c.regions.len() as u32).to_le_bytes());
                for r in &c.regions {
                    out.extend_from_slice(&r.gpa.to_le_bytes());
                    out.extend_from_slice(&r.size.to_le_bytes());
                }
                out.extend_from_slice(&c.cpuid_fingerprint);
                put_str(out, &c.flavour);
            }
            Message::Incompatible { reason } | Message::Abort { reason } => put_str(out, reason),
            Message::MemoryPages(b) => {
                let mut w = PageBatchWriter::new(b.page_size as usize, b.pages.len().max(1));
                for (gpa, data) in &b.pages {
                    match data {
                        Some(d) => w.slot().copy_from_slice(d),
                        None => w.slot().fill(0),
                    }
                    w.commit(*gpa);
                }
                out.extend_from_slice(w.finish());
            }
            Message::DirtyPass { pass, pages, last } => {
                out.extend_from_slice(&pass.to_le_bytes());
                out.extend_from_slice(&pages.to_le_bytes());
                out.push(u8::from(*last));
            }
            Message::State(blob) => out.extend_from_slice(blob),
            Message::VerifyHash(hs) => {
                out.extend_from_slice(&(hs.len() as u32).to_le_bytes());
                for h in hs {
                    out.extend_from_slice(&h.gpa.to_le_bytes());
                    out.extend_from_slice(&h.size.to_le_bytes());
                    out.extend_from_slice(&h.hash);
                }
            }
            Message::Switchover | Message::Resumed => {}
            Message::Ack { command } => out.extend_from_slice(&(*command as u16).to_le_bytes()),
            Message::Error { code, message } => {
                out.extend_from_slice(&(*code as u16).to_le_bytes());
                put_str(out, message);
            }
            Message::DiskList(disks) => {
                out.extend_from_slice(&(disks.len() as u32).to_le_bytes());
                for d in disks {
                    put_str(out, &d.id);
                    out.extend_from_slice(&d.size.to_le_bytes());
                }
            }
            Message::DiskBlocks {
                disk,
                offset,
                len,
                data,
            } => {
                out.extend_from_slice(&disk_blocks_header(
                    *disk,
                    *offset,
                    *len as u32,
                    data.is_some(),
                ));
                if let Some(d) = data {
                    out.extend_from_slice(d);
                }
            }
            Message::DiskPass { pass, bytes } => {
                out.extend_from_slice(&pass.to_le_bytes());
                out.extend_from_slice(&bytes.to_le_bytes());
            }
            Message::DiskVerify(digests) => {
                out.extend_from_slice(&(digests.len() as u32).to_le_bytes());
                for d in digests {
                    out.extend_from_slice(d);
                }
            }
        }
    }

    /// Decodes a payload; every inconsistency is a `Malformed` error naming the command.
    pub fn decode(command: Command, payload: &[u8]) -> Result<Message, ProtocolError> {
        let mut r = Reader {
            command,
            buf: payload,
        };
        let msg = match command {
            Command::Invalid => return Err(ProtocolError::InvalidCommand),
            Command::Hello => {
                let n = r.u16()? as usize;
                if n == 0 || n > 64 {
                    return Err(r.bad(format!("it offers {n} versions; 1 to 64 are allowed")));
                }
                let mut versions = Vec::with_capacity(n);
                for _ in 0..n {
                    versions.push(r.u16()?);
                }
                Message::Hello { versions }
            }
            Command::Compat => {
                let vcpus = r.u32()?;
                let page_size = r.u32()?;
                let n = r.u32()? as usize;
                if n > MAX_LIST {
                    return Err(r.bad(format!("it lists {n} regions; at most {MAX_LIST}")));
                }
                let mut regions = Vec::with_capacity(n);
                for _ in 0..n {
                    regions.push(MemoryRegion {
                        gpa: r.u64()?,
                        size: r.u64()?,
                    });
                }
                Message::Compat(CompatInfo {
                    vcpus,
                    page_size,
                    regions,
                    cpuid_fingerprint: r.array()?,
                    flavour: r.string()?,
                })
            }
            Command::Incompatible => Message::Incompatible {
                reason: r.string()?,
            },
            Command::Abort => Message::Abort {
                reason: r.string()?,
            },
            Command::MemoryPages => {
                let view = PageBatchView::parse(payload)?;
                let pages = view
                    .iter()
                    .map(|(gpa, d)| (gpa, d.map(<[u8]>::to_vec)))
                    .collect();
                r.buf = &[];
                Message::MemoryPages(PageBatch {
                    page_size: view.page_size() as u32,
                    pages,
                })
            }
            Command::DirtyPass => {
                let pass = r.u32()?;
                let pages = r.u64()?;
                let last = match r.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(r.bad(format!("its last-pass flag is {v}, not 0 or 1"))),
                };
                Message::DirtyPass { pass, pages, last }
            }
            Command::State => {
                r.buf = &[];
                Message::State(payload.to_vec())
            }
            Command::VerifyHash => {
                let n = r.u32()? as usize;
                if n > MAX_LIST {
                    return Err(r.bad(format!("it lists {n} region hashes; at most {MAX_LIST}")));
                }
                let mut hs = Vec::with_capacity(n);
                for _ in 0..n {
                    hs.push(RegionHash {
                        gpa: r.u64()?,
                        size: r.u64()?,
                        hash: r.array()?,
                    });
                }
                Message::VerifyHash(hs)
            }
            Command::Switchover => Message::Switchover,
            Command::Resumed => Message::Resumed,
            Command::Ack => {
                let v = r.u16()?;
                Message::Ack {
                    command: Command::try_from(v).map_err(|_| {
                        r.bad(format!(
                            "it acknowledges command {v}, which is not a command"
                        ))
                    })?,
                }
            }
            Command::Error => {
                let v = r.u16()?;
                let code = ErrorCode::from_u16(v)
                    .ok_or_else(|| r.bad(format!("its error code {v} is unknown")))?;
                Message::Error {
                    code,
                    message: r.string()?,
                }
            }
            Command::DiskList => {
                let n = r.u32()? as usize;
                if n > crate::disk::MAX_DISKS {
                    return Err(r.bad(format!(
                        "it lists {n} disks; at most {}",
                        crate::disk::MAX_DISKS
                    )));
                }
                let mut disks = Vec::with_capacity(n);
                for _ in 0..n {
                    disks.push(DiskInfo {
                        id: r.string()?,
                        size: r.u64()?,
                    });
                }
                Message::DiskList(disks)
            }
            Command::DiskBlocks => {
                let DiskRange {
                    disk,
                    offset,
                    len,
                    data,
                } = parse_disk_blocks(payload)?;
                r.buf = &[];
                Message::DiskBlocks {
                    disk,
                    offset,
                    len,
                    data: data.map(<[u8]>::to_vec),
                }
            }
            Command::DiskPass => Message::DiskPass {
                pass: r.u32()?,
                bytes: r.u64()?,
            },
            Command::DiskVerify => {
                let n = r.u32()? as usize;
                if n > crate::disk::MAX_DISKS {
                    return Err(r.bad(format!(
                        "it lists {n} disk digests; at most {}",
                        crate::disk::MAX_DISKS
                    )));
                }
                let mut ds = Vec::with_capacity(n);
                for _ in 0..n {
                    ds.push(r.array()?);
                }
                Message::DiskVerify(ds)
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = if s.len() > MAX_STRING {
        // Cut on a char boundary so the peer still gets valid UTF-8.
        let mut end = MAX_STRING;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        &s[..end]
    } else {
        s
    };
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    command: Command,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bad(&self, reason: String) -> ProtocolError {
        ProtocolError::Malformed {
            command: self.command,
            reason,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.bad(format!(
                "it ends after {} more bytes where {n} were needed",
                self.buf.len()
            )));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String, ProtocolError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(self.bad(format!("a string is {n} bytes; at most {MAX_STRING}")));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("a string is not UTF-8".into()))
    }
    fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.bad(format!("{} bytes are left over", self.buf.len())))
        }
    }
}

/// Builds a `MemoryPages` payload in place: the driver reads guest memory straight into
/// [`slot`](Self::slot) (or [`slots`](Self::slots) for a run of pages), so each page is
/// copied once on its way to the socket.
///
/// Layout (protocol version 2): `page_size u32 | count u32 | gpa u64 * count |
/// zero bitmap (bit i set = page i is all zeros, not sent) | non-zero page data`. The index
/// comes first so the receiver can check every address and then read the page data
/// straight into guest memory. The writer keeps index and data in separate buffers and
/// the sender writes both with one vectored write ([`finish_parts`](Self::finish_parts)).
pub struct PageBatchWriter {
    data: Vec<u8>,
    page_size: usize,
    capacity: usize,
    data_end: usize,
    gpas: Vec<u64>,
    zero: Vec<u8>,
    index: Vec<u8>,
    joined: Vec<u8>,
    nonzero: usize,
}

/// `page_size u32 | count u32` at the start of every `MemoryPages` payload.
pub const BATCH_HEADER: usize = 8;

impl PageBatchWriter {
    pub fn new(page_size: usize, capacity: usize) -> Self {
        let capacity = capacity.clamp(1, MAX_BATCH_PAGES as usize);
        Self {
            data: vec![0; capacity * page_size],
            page_size,
            capacity,
            data_end: 0,
            gpas: Vec::with_capacity(capacity),
            zero: vec![0; capacity.div_ceil(8)],
            index: Vec::with_capacity(BATCH_HEADER + capacity * 8 + capacity.div_ceil(8)),
            joined: Vec::new(),
            nonzero: 0,
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn is_full(&self) -> bool {
        self.gpas.len() >= self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.gpas.is_empty()
    }

    pub fn len(&self) -> usize {
        self.gpas.len()
    }

    /// Pages that still fit.
    pub fn room(&self) -> usize {
        self.capacity - self.gpas.len()
    }

    /// Non-zero pages in the batch.
    pub fn nonzero_pages(&self) -> usize {
        self.nonzero
    }

    /// Where the next page's bytes go.
    pub fn slot(&mut self) -> &mut [u8] {
        self.slots(1)
    }

    /// Where the next `n` pages' bytes go, contiguous; `n` is capped at [`room`](Self::room).
    pub fn slots(&mut self, n: usize) -> &mut [u8] {
        let n = n.min(self.room());
        &mut self.data[self.data_end..self.data_end + n * self.page_size]
    }

    /// Records the page just written to [`slot`](Self::slot); an all-zero page costs one bit.
    pub fn commit(&mut self, gpa: u64) {
        self.commit_run(gpa, 1);
    }

    /// Records `n` pages at `gpa, gpa + page_size, ..` just written to
    /// [`slots(n)`](Self::slots). All-zero pages are dropped from the data (later pages of
    /// the run move down) and cost one bit each.
    pub fn commit_run(&mut self, gpa: u64, n: usize) {
        let n = n.min(self.room());
        let ps = self.page_size;
        let run_end = self.data_end + n * ps;
        let mut src = self.data_end;
        for k in 0..n {
            let i = self.gpas.len();
            self.gpas.push(gpa + (k * ps) as u64);
            if is_zero(&self.data[src..src + ps]) {
                self.zero[i / 8] |= 1 << (i % 8);
            } else {
                if src != self.data_end {
                    self.data.copy_within(src..src + ps, self.data_end);
                }
                self.data_end += ps;
                self.nonzero += 1;
            }
            src += ps;
        }
        debug_assert!(src == run_end);
    }

    /// Records a page known to be zero without reading it: one bit, no data.
    pub fn commit_zero(&mut self, gpa: u64) {
        if self.is_full() {
            return;
        }
        let i = self.gpas.len();
        self.gpas.push(gpa);
        self.zero[i / 8] |= 1 << (i % 8);
    }

    /// Records a page whose bytes the caller sends itself, after the index (straight from
    /// guest memory: [`ray_memory::GuestSpan::io_slice`]); an all-zero page (`zero`)
    /// costs one bit and sends nothing. A batch holds either such pages or copied ones.
    pub fn commit_external(&mut self, gpa: u64, zero: bool) {
        debug_assert!(
            self.data_end == 0,
            "a batch mixes copied and external pages"
        );
        if self.is_full() {
            return;
        }
        let i = self.gpas.len();
        self.gpas.push(gpa);
        if zero {
            self.zero[i / 8] |= 1 << (i % 8);
        } else {
            self.nonzero += 1;
        }
    }

    /// Completes the payload as `(batch header and index, page data)`; the payload is the
    /// two concatenated. Valid until the next [`reset`](Self::reset).
    pub fn finish_parts(&mut self) -> (&[u8], &[u8]) {
        let n = self.gpas.len();
        self.index.clear();
        self.index
            .extend_from_slice(&(self.page_size as u32).to_le_bytes());
        self.index.extend_from_slice(&(n as u32).to_le_bytes());
        for g in &self.gpas {
            self.index.extend_from_slice(&g.to_le_bytes());
        }
        self.index.extend_from_slice(&self.zero[..n.div_ceil(8)]);
        (&self.index, &self.data[..self.data_end])
    }

    /// Completes the payload in one buffer (an extra copy; the drivers use
    /// [`finish_parts`](Self::finish_parts)). Valid until the next [`reset`](Self::reset).
    pub fn finish(&mut self) -> &[u8] {
        let mut joined = std::mem::take(&mut self.joined);
        joined.clear();
        let (index, data) = self.finish_parts();
        joined.extend_from_slice(index);
        joined.extend_from_slice(data);
        self.joined = joined;
        &self.joined
    }

    pub fn reset(&mut self) {
        self.data_end = 0;
        self.gpas.clear();
        self.zero.fill(0);
        self.nonzero = 0;
    }
}

/// True when every byte is zero: ray-memory's check, the one every zero page test uses.
pub use ray_memory::is_zero;

/// The validated start of a `MemoryPages` payload: page size, page count and the length
/// of the index that follows the 8-byte batch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    pub page_size: usize,
    pub count: usize,
}

impl BatchShape {
    /// Checks the 8-byte batch header.
    pub fn parse(header: &[u8; BATCH_HEADER]) -> Result<Self, ProtocolError> {
        let page_size = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let count = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if !page_size.is_power_of_two() || !(512..=(2 << 20)).contains(&page_size) {
            return Err(malformed_batch(format!(
                "its page size {page_size} is not a power of two between 512 bytes and 2 MiB"
            )));
        }
        if count > MAX_BATCH_PAGES {
            return Err(malformed_batch(format!(
                "it holds {count} pages; at most {MAX_BATCH_PAGES}"
            )));
        }
        Ok(Self {
            page_size: page_size as usize,
            count: count as usize,
        })
    }

    /// Bytes of gpas and zero bitmap after the batch header.
    pub fn index_len(&self) -> usize {
        self.count * 8 + self.count.div_ceil(8)
    }

    /// Checks the zero bitmap of `index` (exactly [`index_len`](Self::index_len) bytes)
    /// and returns the number of page data bytes that must follow it.
    pub fn data_len(&self, index: &[u8]) -> Result<u64, ProtocolError> {
        debug_assert_eq!(index.len(), self.index_len());
        let n = self.count;
        let zero = &index[n * 8..];
        if !n.is_multiple_of(8) && zero.last().is_some_and(|b| b >> (n % 8) != 0) {
            return Err(malformed_batch(
                "its zero bitmap marks pages past the end of the batch".into(),
            ));
        }
        let zeros: usize = zero.iter().map(|b| b.count_ones() as usize).sum();
        Ok((n - zeros) as u64 * self.page_size as u64)
    }
}

fn malformed_batch(reason: String) -> ProtocolError {
    ProtocolError::Malformed {
        command: Command::MemoryPages,
        reason,
    }
}

/// `(gpa, non-zero)` of page `i` of a checked index.
pub fn index_entry(index: &[u8], count: usize, i: usize) -> (u64, bool) {
    let mut g = [0u8; 8];
    g.copy_from_slice(&index[i * 8..i * 8 + 8]);
    let zero = index[count * 8 + i / 8] & (1 << (i % 8)) != 0;
    (u64::from_le_bytes(g), !zero)
}

/// A validated, borrowed `MemoryPages` payload.
#[derive(Debug)]
pub struct PageBatchView<'a> {
    page_size: usize,
    count: usize,
    data: &'a [u8],
    index: &'a [u8],
}

impl<'a> PageBatchView<'a> {
    /// Checks sizes and counts; gpas are checked against the memory map by the receiver.
    pub fn parse(payload: &'a [u8]) -> Result<Self, ProtocolError> {
        if MAX_PAYLOAD < payload.len() as u64 {
            return Err(ProtocolError::Oversize {
                len: payload.len() as u64,
                max: MAX_PAYLOAD,
            });
        }
        let Some((head, body)) = payload.split_first_chunk::<BATCH_HEADER>() else {
            return Err(malformed_batch(format!(
                "it is {} bytes, shorter than its 8-byte header",
                payload.len()
            )));
        };
        let shape = BatchShape::parse(head)?;
        let index_len = shape.index_len();
        if body.len() < index_len {
            return Err(malformed_batch(format!(
                "it holds {} bytes after the header, too few for the index of {} pages ({index_len} bytes)",
                body.len(),
                shape.count
            )));
        }
        let (index, data) = body.split_at(index_len);
        let want = shape.data_len(index)?;
        if data.len() as u64 != want {
            return Err(malformed_batch(format!(
                "it carries {} data bytes where its index announces {want} ({} bytes per non-zero page)",
                data.len(),
                shape.page_size
            )));
        }
        Ok(Self {
            page_size: shape.page_size,
            count: shape.count,
            data,
            index,
        })
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// `(gpa, Some(bytes))` for a sent page, `(gpa, None)` for a zero page.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Option<&'a [u8]>)> + '_ {
        let mut data = self.data;
        let ps = self.page_size;
        (0..self.count).map(move |i| {
            let (gpa, nonzero) = index_entry(self.index, self.count, i);
            if nonzero {
                let (page, rest) = data.split_at(ps);
                data = rest;
                (gpa, Some(page))
            } else {
                (gpa, None)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn compat() -> CompatInfo {
        CompatInfo {
            vcpus: 4,
            page_size: 4096,
            regions: vec![
                MemoryRegion {
                    gpa: 0,
                    size: 1 << 30,
                },
                MemoryRegion {
                    gpa: 1 << 32,
                    size: 1 << 30,
                },
            ],
            cpuid_fingerprint: [9; 32],
            flavour: "rayvisor-kvm-x86_64/1".into(),
        }
    }

    fn every_message() -> Vec<Message> {
        vec![
            Message::Hello {
                versions: vec![1, 2],
            },
            Message::Compat(compat()),
            Message::Incompatible {
                reason: "vCPU count differs".into(),
            },
            Message::MemoryPages(PageBatch {
                page_size: 4096,
                pages: vec![
                    (0x1000, Some(vec![1; 4096])),
                    (0x2000, None),
                    (0x5000, Some(vec![2; 4096])),
                ],
            }),
            Message::DirtyPass {
                pass: 3,
                pages: 77,
                last: true,
            },
            Message::State(vec![1, 2, 3]),
            Message::VerifyHash(vec![RegionHash {
                gpa: 0,
                size: 4096,
                hash: [5; 32],
            }]),
            Message::Switchover,
            Message::Resumed,
            Message::Abort {
                reason: "cancelled".into(),
            },
            Message::Ack {
                command: Command::State,
            },
            Message::Error {
                code: ErrorCode::VerifyMismatch,
                message: "region 0 differs".into(),
            },
            Message::DiskList(vec![DiskInfo {
                id: "disk0".into(),
                size: 1 << 30,
            }]),
            Message::DiskBlocks {
                disk: 0,
                offset: 1 << 16,
                len: 1024,
                data: Some(vec![3; 1024]),
            },
            Message::DiskPass {
                pass: 2,
                bytes: 1 << 20,
            },
            Message::DiskVerify(vec![[7; 16], [8; 16]]),
        ]
    }

    #[test]
    fn every_command_round_trips() {
        let msgs = every_message();
        assert_eq!(
            msgs.len(),
            16,
            "one message per command (2, once Auth, is retired)"
        );
        assert!(matches!(
            Command::try_from(2),
            Err(ProtocolError::UnknownCommand { value: 2 })
        ));
        for m in msgs {
            let mut p = Vec::new();
            m.encode_payload(&mut p);
            assert_eq!(Message::decode(m.command(), &p).unwrap(), m);
            assert_eq!(Command::try_from(m.command() as u16).unwrap(), m.command());
        }
    }

    #[test]
    fn truncated_and_padded_payloads_are_refused() {
        for m in every_message() {
            let mut p = Vec::new();
            m.encode_payload(&mut p);
            if !matches!(m, Message::State(_)) {
                let mut longer = p.clone();
                longer.push(0);
                let e = Message::decode(m.command(), &longer).unwrap_err();
                assert!(matches!(e, ProtocolError::Malformed { .. }), "{m:?}: {e}");
            }
            if !p.is_empty() && !matches!(m, Message::State(_)) {
                let e = Message::decode(m.command(), &p[..p.len() - 1]).unwrap_err();
                assert!(matches!(e, ProtocolError::Malformed { .. }), "{m:?}: {e}");
            }
        }
    }

    #[test]
    fn incompatibility_names_the_mismatch() {
        let t = compat();
        let mut s = compat();
        assert_eq!(t.mismatch(&s), None);
        s.vcpus = 8;
        assert_eq!(
            t.mismatch(&s).unwrap(),
            "vCPU count differs: source has 8, target has 4"
        );
        let mut s = compat();
        s.regions.pop();
        assert!(t.mismatch(&s).unwrap().starts_with("memory layout differs"));
        let mut s = compat();
        s.cpuid_fingerprint[0] = 0;
        assert!(t.mismatch(&s).unwrap().starts_with("CPUID differs"));
        let mut s = compat();
        s.flavour = "other".into();
        assert!(t.mismatch(&s).unwrap().contains("\"other\""));
        let mut s = compat();
        s.page_size = 2 << 20;
        assert!(t.mismatch(&s).unwrap().starts_with("page size differs"));
    }

    #[test]
    fn zero_check_sees_every_byte() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        for i in [0, 63, 64, 4095] {
            p[i] = 1;
            assert!(!is_zero(&p));
            p[i] = 0;
        }
        assert!(!is_zero(&[0, 0, 1]));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_payloads_never_panics(cmd in 0u16..20, bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(c) = Command::try_from(cmd) {
                let _ = Message::decode(c, &bytes);
            }
        }

        #[test]
        fn runs_are_committed_like_single_pages(fills in proptest::collection::vec(0u8..3, 1..40), cap in 1usize..48) {
            // fill 0 is a zero page; runs are cut wherever the batch fills up.
            let mut one = PageBatchWriter::new(512, cap);
            let mut run = PageBatchWriter::new(512, cap);
            let mut i = 0;
            while i < fills.len() {
                let n = (fills.len() - i).min(run.room());
                for (k, f) in fills[i..i + n].iter().enumerate() {
                    run.slots(n)[k * 512..(k + 1) * 512].fill(*f);
                    one.slot().fill(*f);
                    one.commit(((i + k) * 512) as u64);
                }
                run.commit_run((i * 512) as u64, n);
                prop_assert_eq!(one.finish_parts(), run.finish_parts());
                prop_assert_eq!(one.nonzero_pages(), run.nonzero_pages());
                let view = PageBatchView::parse(run.finish()).unwrap();
                let got: Vec<_> = view.iter().map(|(g, d)| (g, d.map(|d| d[0]))).collect();
                let want: Vec<_> = (i..i + n).map(|j| ((j * 512) as u64, (fills[j] != 0).then_some(fills[j]))).collect();
                prop_assert_eq!(got, want);
                one.reset();
                run.reset();
                i += n;
            }
        }

        #[test]
        fn page_batches_round_trip(pages in proptest::collection::vec((any::<u32>(), any::<bool>(), any::<u8>()), 0..40)) {
            let batch = PageBatch {
                page_size: 512,
                pages: pages.iter().map(|&(g, z, b)| (u64::from(g) << 9, if z || b == 0 { None } else { Some(vec![b; 512]) })).collect(),
            };
            let m = Message::MemoryPages(batch);
            let mut p = Vec::new();
            m.encode_payload(&mut p);
            prop_assert_eq!(Message::decode(Command::MemoryPages, &p).unwrap(), m);
        }
    }
}
