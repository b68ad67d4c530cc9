//! Framing: one fixed header, a payload, and an integrity trailer, over any `Read`/`Write`.
//!
//! ```text
//! offset size field
//!  0      4   magic        b"RYMG"
//!  4      2   version      protocol version, one of SUPPORTED_VERSIONS (2)
//!  6      2   command      `Command` number; 0 is Invalid and always refused
//!  8      2   flags        FLAG_RESPONSE | FLAG_LZ4; other bits refused
//! 10      2   reserved     must be 0
//! 12      4   header_crc   CRC32 of bytes 0..12 and 16..32, so a corrupted
//!                          length is caught before anything is allocated
//! 16      8   request_id   echoed by the response
//! 24      8   payload_len  bytes on the wire, at most MAX_PAYLOAD
//! 32      n   payload      lz4 block (u32 LE decompressed size first) if FLAG_LZ4
//! 32+n    4   trailer      CRC32 of header+payload
//! ```
//!
//! One exception: the CRC32 of an uncompressed `MemoryPages` frame covers the header, the
//! batch header and the page index, not the page data. Page data is checked once, at the
//! end, by the verification's page hashes ([`crate::vm::PageHashes`]), which both sides
//! compute anyway; checking it per frame too would cost a second pass over every byte.
//!
//! All integers are little-endian. The CRC catches corruption, not an attacker: integrity
//! and confidentiality come from the stream below ([`crate::secure`]), whose AEAD records
//! (counted per direction) refuse altered, replayed, dropped or reordered bytes.

use std::io::{self, IoSlice, Read, Write};

use ray_memory::{GuestMemory, GuestSpan, MemoryLayout};

use crate::protocol::{index_entry, BatchShape, Command, Message, BATCH_HEADER};
use crate::vm::{prefetch_write, PageHashes};
use crate::{MigrationError, ProtocolError};

/// `b"RYMG"`: rayvisor migration.
pub const MAGIC: [u8; 4] = *b"RYMG";
/// The newest protocol version this build speaks.
///
/// Version 2 moved the page index of `MemoryPages` payloads before the page data so the
/// receiver can read pages straight into guest memory; version 3 left page data out of
/// the page frames' CRC (it is verified by page hashes); version 4 runs over the
/// Noise-secured stream ([`crate::secure`]): no `Auth` frames, no MAC trailers, no nonce in
/// `Hello`. Older peers fail the secure stream's preamble. Version 5 adds the disk
/// commands of `--copy-disks` ([`crate::disk`]); frames are otherwise those of version 4,
/// and a source that copies no disks offers both.
pub const PROTOCOL_VERSION: u16 = 5;
/// Versions this build can negotiate, oldest first.
pub const SUPPORTED_VERSIONS: &[u16] = &[4, 5];
/// The version of the frames before negotiation (the `Hello` exchange): the oldest one
/// spoken, so a peer that knows no newer one can still read the offer and refuse it.
pub const HELLO_VERSION: u16 = 4;
/// Largest payload accepted, on the wire and after decompression.
pub const MAX_PAYLOAD: u64 = 64 << 20;
/// Header size in bytes.
pub const HEADER_LEN: usize = 32;
/// The frame answers a request.
pub const FLAG_RESPONSE: u16 = 1 << 0;
/// The payload is lz4-compressed.
pub const FLAG_LZ4: u16 = 1 << 2;
// Bit 1 flagged a MAC trailer before the secure stream took over integrity: refused now.
const KNOWN_FLAGS: u16 = FLAG_RESPONSE | FLAG_LZ4;

/// A decoded, validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub command: Command,
    pub flags: u16,
    pub request_id: u64,
    pub payload_len: u64,
}

impl FrameHeader {
    /// Serializes the header, computing its CRC.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&(self.command as u16).to_le_bytes());
        b[8..10].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.request_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.payload_len.to_le_bytes());
        let crc = header_crc(&b);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and validates a header; every field is checked before the payload is read.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { found: magic });
        }
        let found_crc = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let expected_crc = header_crc(b);
        if found_crc != expected_crc {
            return Err(ProtocolError::HeaderChecksum {
                expected: expected_crc,
                found: found_crc,
            });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(ProtocolError::UnsupportedVersion {
                found: version,
                supported: SUPPORTED_VERSIONS.to_vec(),
            });
        }
        let command = Command::try_from(u16::from_le_bytes([b[6], b[7]]))?;
        let flags = u16::from_le_bytes([b[8], b[9]]);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(ProtocolError::UnknownFlags { flags });
        }
        let reserved = u16::from_le_bytes([b[10], b[11]]);
        if reserved != 0 {
            return Err(ProtocolError::ReservedNonZero { value: reserved });
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[16..24]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&b[24..32]);
        let payload_len = u64::from_le_bytes(len);
        if payload_len > MAX_PAYLOAD {
            return Err(ProtocolError::Oversize {
                len: payload_len,
                max: MAX_PAYLOAD,
            });
        }
        Ok(Self {
            version,
            command,
            flags,
            request_id: u64::from_le_bytes(id),
            payload_len,
        })
    }
}

/// Bytes of a payload its CRC trailer covers: all of it, except for uncompressed
/// `MemoryPages` frames, where it covers the batch header and the index (`first` is the
/// payload's first part; a payload too short or malformed to tell is covered whole and
/// then refused by the batch parser).
fn crc_covered(command: Command, flags: u16, first: &[u8], payload_len: usize) -> usize {
    if command != Command::MemoryPages || flags & FLAG_LZ4 != 0 || first.len() < BATCH_HEADER {
        return payload_len;
    }
    let mut bh = [0u8; BATCH_HEADER];
    bh.copy_from_slice(&first[..BATCH_HEADER]);
    match BatchShape::parse(&bh) {
        Ok(shape) => (BATCH_HEADER + shape.index_len()).min(payload_len),
        Err(_) => payload_len,
    }
}

fn header_crc(b: &[u8; HEADER_LEN]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[0..12]);
    h.update(&b[16..32]);
    h.finalize()
}

/// What [`Channel::recv_frame_placing`] received.
#[derive(Debug)]
pub enum Received<'a> {
    /// A frame, buffered and checked as by [`Channel::recv_frame`].
    Frame(Frame<'a>),
    /// A page frame whose `pages` pages were checked and written to guest memory.
    Placed { header: FrameHeader, pages: u64 },
}

/// Index of the region of `layout` holding the whole page at `gpa` (which must be page
/// aligned).
pub fn region_of(layout: &MemoryLayout, gpa: u64, page_size: usize) -> Option<usize> {
    if page_size == 0 || !gpa.is_multiple_of(page_size as u64) {
        return None;
    }
    layout.find(gpa, page_size as u64)
}

/// A received frame; the payload is borrowed from the channel's buffer (already decompressed).
#[derive(Debug)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Decodes the payload into a typed message.
    pub fn message(&self) -> Result<Message, ProtocolError> {
        Message::decode(self.header.command, self.payload)
    }
}

/// The byte stream under a [`Channel`]: besides `Write`, it takes a frame whose middle is
/// guest memory.
pub trait FrameStream: Read + Write {
    /// Writes `before`, the guest memory in `guest`, then `after`, all of it. By default
    /// in vectored writes: the kernel copies the guest memory straight from its mapping.
    /// A stream that must look at the bytes itself (an encrypting one) copies them out
    /// of guest memory first, as [`GuestSpan`] allows.
    fn write_with_guest(
        &mut self,
        before: &[&[u8]],
        guest: &[GuestSpan<'_>],
        after: &[u8],
    ) -> io::Result<()> {
        write_all_vectored(self, before, guest, after)
    }
}

impl FrameStream for std::net::TcpStream {}
impl FrameStream for std::os::unix::net::UnixStream {}
impl FrameStream for io::Cursor<Vec<u8>> {}

/// [`FrameStream::write_with_guest`] in vectored writes, for any writer.
pub fn write_all_vectored<W: Write + ?Sized>(
    w: &mut W,
    before: &[&[u8]],
    guest: &[GuestSpan<'_>],
    after: &[u8],
) -> io::Result<()> {
    let mut slices = Vec::with_capacity(before.len() + guest.len() + 1);
    slices.extend(before.iter().map(|p| IoSlice::new(p)));
    slices.extend(guest.iter().map(|g| g.io_slice()));
    slices.push(IoSlice::new(after));
    slices.retain(|s| !s.is_empty());
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the socket accepted no more bytes",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A framed duplex connection.
///
/// `S` is a socket (`TcpStream`, `UnixStream`) or any in-memory pipe. Buffers are reused
/// across frames so the page stream allocates nothing per batch.
pub struct Channel<S> {
    stream: S,
    version: u16,
    last_compressed: bool,
    rx: Vec<u8>,
    lz: Vec<u8>,
    tx: Vec<u8>,
    bytes_sent: u64,
    bytes_received: u64,
}

impl<S: FrameStream> Channel<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            version: HELLO_VERSION,
            last_compressed: false,
            rx: Vec::new(),
            lz: Vec::new(),
            tx: Vec::new(),
            bytes_sent: 0,
            bytes_received: 0,
        }
    }

    /// Uses `version` for every frame sent from now on (after negotiation).
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// Total bytes written and read, including headers and trailers.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Sends a typed message.
    pub fn send(
        &mut self,
        msg: &Message,
        request_id: u64,
        response: bool,
    ) -> Result<(), ProtocolError> {
        let mut payload = std::mem::take(&mut self.tx);
        payload.clear();
        msg.encode_payload(&mut payload);
        let flags = if response { FLAG_RESPONSE } else { 0 };
        let r = self.send_raw(msg.command(), request_id, flags, &payload, false);
        self.tx = payload;
        r
    }

    /// Sends an already-encoded payload; `compress` tries lz4 and keeps it if it is smaller.
    pub fn send_raw(
        &mut self,
        command: Command,
        request_id: u64,
        flags: u16,
        payload: &[u8],
        compress: bool,
    ) -> Result<(), ProtocolError> {
        self.send_parts(command, request_id, flags, &[payload], compress)
    }

    /// Sends a payload given as consecutive parts (e.g. a page batch's index and its page
    /// data), in one vectored write without joining them; `compress` joins them and tries
    /// lz4 (see [`send_raw`](Self::send_raw)).
    pub fn send_parts(
        &mut self,
        command: Command,
        request_id: u64,
        flags: u16,
        parts: &[&[u8]],
        compress: bool,
    ) -> Result<(), ProtocolError> {
        self.send_frame(command, request_id, flags, parts, &[], compress)
    }

    /// Sends a payload of the `head` parts followed by the guest memory `guest` (a page
    /// batch's index, then its non-zero pages straight from guest memory). The spans go to
    /// the kernel as I/O vectors, which copies them into the socket as they are at that
    /// moment; nothing is copied here. A frame that is to be compressed copies the spans
    /// into one buffer first instead.
    pub fn send_guest_parts(
        &mut self,
        command: Command,
        request_id: u64,
        flags: u16,
        head: &[&[u8]],
        guest: &[GuestSpan<'_>],
        compress: bool,
    ) -> Result<(), ProtocolError> {
        self.send_frame(command, request_id, flags, head, guest, compress)
    }

    fn send_frame(
        &mut self,
        command: Command,
        request_id: u64,
        mut flags: u16,
        head: &[&[u8]],
        guest: &[GuestSpan<'_>],
        compress: bool,
    ) -> Result<(), ProtocolError> {
        let total: u64 = head.iter().map(|p| p.len() as u64).sum::<u64>()
            + guest.iter().map(|g| g.len() as u64).sum::<u64>();
        if total > MAX_PAYLOAD {
            return Err(ProtocolError::Oversize {
                len: total,
                max: MAX_PAYLOAD,
            });
        }
        self.last_compressed = false;
        if !compress {
            return self.write_frame(command, request_id, flags, head, guest);
        }
        let mut joined = std::mem::take(&mut self.tx);
        let mut lz = std::mem::take(&mut self.lz);
        let payload: &[u8] = if let ([p], []) = (head, guest) {
            p
        } else {
            // Resized, not cleared: batches of one size reuse the buffer without zeroing it.
            joined.resize(total as usize, 0);
            let mut at = 0;
            for p in head {
                joined[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            for g in guest {
                g.copy_to(&mut joined[at..at + g.len()]);
                at += g.len();
            }
            &joined
        };
        if compress {
            let max = lz4_flex::block::get_maximum_output_size(payload.len()) + 4;
            lz.resize(max, 0);
            lz[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            if let Ok(n) = lz4_flex::block::compress_into(payload, &mut lz[4..]) {
                if n + 4 < payload.len() {
                    lz.truncate(n + 4);
                    flags |= FLAG_LZ4;
                    self.last_compressed = true;
                }
            }
        }
        let body = if self.last_compressed {
            &lz[..]
        } else {
            payload
        };
        let r = self.write_frame(command, request_id, flags, &[body], &[]);
        self.tx = joined;
        self.lz = lz;
        r
    }

    /// True when the last frame sent with `compress` was actually lz4-compressed (the
    /// sender stops trying for a while on incompressible memory).
    pub fn last_compressed(&self) -> bool {
        self.last_compressed
    }

    /// Writes one frame whose payload is `head` then `guest`.
    fn write_frame(
        &mut self,
        command: Command,
        request_id: u64,
        flags: u16,
        head: &[&[u8]],
        guest: &[GuestSpan<'_>],
    ) -> Result<(), ProtocolError> {
        let body_len: usize = head.iter().map(|p| p.len()).sum::<usize>()
            + guest.iter().map(|g| g.len()).sum::<usize>();
        let header = FrameHeader {
            version: self.version,
            command,
            flags,
            request_id,
            payload_len: body_len as u64,
        }
        .encode();
        let io = |e| ProtocolError::Io {
            op: "sending a frame",
            source: e,
        };
        let first = head.first().copied().unwrap_or_default();
        let mut left = crc_covered(command, flags, first, body_len);
        let mut h = crc32fast::Hasher::new();
        h.update(&header);
        for p in head {
            let n = left.min(p.len());
            h.update(&p[..n]);
            left -= n;
        }
        for g in guest {
            let n = left.min(g.len());
            if let Some(covered) = g.sub(0, n) {
                covered.crc32_update(&mut h);
            }
            left -= n;
        }
        let trailer = h.finalize().to_le_bytes();
        // One vectored write per frame: fewer syscalls and segments than one per part.
        let mut before = Vec::with_capacity(head.len() + 1);
        before.push(&header[..]);
        before.extend_from_slice(head);
        self.stream
            .write_with_guest(&before, guest, &trailer)
            .map_err(io)?;
        // Bulk frames (page batches, disk blocks) are always followed by another frame,
        // at the latest the pass marker, whose flush sends them: an encrypted stream seals
        // them in the background meanwhile instead of waiting for each one.
        if !matches!(command, Command::MemoryPages | Command::DiskBlocks) {
            self.stream.flush().map_err(io)?;
        }
        self.bytes_sent += (HEADER_LEN + body_len + trailer.len()) as u64;
        Ok(())
    }

    /// Reads one frame, verifying header, length and CRC.
    pub fn recv_frame(&mut self) -> Result<Frame<'_>, ProtocolError> {
        let (hb, header) = self.recv_header()?;
        self.recv_body(hb, header)
    }

    fn recv_body(
        &mut self,
        hb: [u8; HEADER_LEN],
        header: FrameHeader,
    ) -> Result<Frame<'_>, ProtocolError> {
        let len = header.payload_len as usize;
        self.rx.resize(len, 0);
        read_full(&mut self.stream, &mut self.rx, "payload", false)?;
        let mut crc = [0u8; 4];
        read_full(&mut self.stream, &mut crc, "CRC trailer", false)?;
        let covered = crc_covered(header.command, header.flags, &self.rx, len);
        let mut h = crc32fast::Hasher::new();
        h.update(&hb);
        h.update(&self.rx[..covered]);
        let expected = h.finalize();
        let found = u32::from_le_bytes(crc);
        if expected != found {
            return Err(ProtocolError::Checksum {
                command: header.command,
                expected,
                found,
            });
        }
        self.bytes_received += (HEADER_LEN + len + crc.len()) as u64;
        if header.flags & FLAG_LZ4 != 0 {
            decompress(&self.rx, &mut self.lz, header.command)?;
            return Ok(Frame {
                header,
                payload: &self.lz,
            });
        }
        Ok(Frame {
            header,
            payload: &self.rx,
        })
    }

    fn recv_header(&mut self) -> Result<([u8; HEADER_LEN], FrameHeader), ProtocolError> {
        let mut hb = [0u8; HEADER_LEN];
        read_full(&mut self.stream, &mut hb, "header", true)?;
        let header = FrameHeader::decode(&hb)?;
        Ok((hb, header))
    }

    /// Like [`recv_frame`](Self::recv_frame), but an uncompressed `MemoryPages`
    /// frame is not buffered: its index is read and checked first (page size, every page
    /// whole and inside `mem`'s layout), then each run of consecutive pages is read from
    /// the socket straight into guest memory and hashed into `hashes` piece by piece as it
    /// lands; zero pages are written as zeros ([`GuestMemory::write_zeros`], which leaves
    /// memory known to be zero untouched). The CRC trailer (header and index) is checked
    /// at the end. Compressed page frames, and every other frame, are returned as
    /// a [`Frame`].
    ///
    /// `mem` must be memory no vCPU runs on (a migration target before its switch-over),
    /// with this receiver its only writer: pages are read into it through a slice.
    pub fn recv_frame_placing<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        hashes: &mut PageHashes,
        page_size: usize,
    ) -> Result<Received<'_>, MigrationError> {
        let (hb, header) = self.recv_header()?;
        if header.command != Command::MemoryPages || header.flags & FLAG_LZ4 != 0 {
            return Ok(Received::Frame(self.recv_body(hb, header)?));
        }
        let pages = self.place_pages(&hb, &header, mem, hashes, page_size)?;
        Ok(Received::Placed { header, pages })
    }

    fn place_pages<M: GuestMemory + ?Sized>(
        &mut self,
        hb: &[u8; HEADER_LEN],
        header: &FrameHeader,
        mem: &M,
        hashes: &mut PageHashes,
        page_size: usize,
    ) -> Result<u64, MigrationError> {
        let mut crc = crc32fast::Hasher::new();
        crc.update(hb);
        let len = header.payload_len;
        let mut bh = [0u8; BATCH_HEADER];
        if len < BATCH_HEADER as u64 {
            return Err(ProtocolError::Malformed {
                command: Command::MemoryPages,
                reason: format!("it is {len} bytes, shorter than its 8-byte header"),
            }
            .into());
        }
        read_full(&mut self.stream, &mut bh, "payload", false)?;
        crc.update(&bh);
        let shape = BatchShape::parse(&bh)?;
        let index_len = shape.index_len();
        if len - (BATCH_HEADER as u64) < index_len as u64 {
            return Err(ProtocolError::Malformed {
                command: Command::MemoryPages,
                reason: format!(
                    "it holds {} bytes after the header, too few for the index of {} pages ({index_len} bytes)",
                    len - BATCH_HEADER as u64,
                    shape.count
                ),
            }
            .into());
        }
        let mut index = std::mem::take(&mut self.rx);
        index.resize(index_len, 0);
        let r = self.place_indexed(&mut crc, &mut index, header, shape, mem, hashes, page_size);
        self.rx = index;
        let trailer = r?;
        let expected = crc.finalize();
        if expected != trailer {
            return Err(ProtocolError::Checksum {
                command: Command::MemoryPages,
                expected,
                found: trailer,
            }
            .into());
        }
        self.bytes_received += HEADER_LEN as u64 + len + 4;
        Ok(shape.count as u64)
    }

    /// Reads and checks the index into `index`, then the page data into place; returns
    /// the CRC trailer as found on the wire.
    #[allow(clippy::too_many_arguments)]
    fn place_indexed<M: GuestMemory + ?Sized>(
        &mut self,
        crc: &mut crc32fast::Hasher,
        index: &mut [u8],
        header: &FrameHeader,
        shape: BatchShape,
        mem: &M,
        hashes: &mut PageHashes,
        page_size: usize,
    ) -> Result<u32, MigrationError> {
        let layout = mem.layout();
        read_full(&mut self.stream, index, "payload", false)?;
        crc.update(index);
        let data_len = shape.data_len(index)?;
        let have = header.payload_len - (BATCH_HEADER + index.len()) as u64;
        if have != data_len {
            return Err(ProtocolError::Malformed {
                command: Command::MemoryPages,
                reason: format!(
                    "it carries {have} data bytes where its index announces {data_len} ({} bytes per non-zero page)",
                    shape.page_size
                ),
            }
            .into());
        }
        // Every address is checked before a byte of page data is read.
        let n = shape.count;
        for i in 0..n {
            let (gpa, _) = index_entry(index, n, i);
            if shape.page_size != page_size || region_of(layout, gpa, page_size).is_none() {
                return Err(MigrationError::PageOutOfRange {
                    gpa,
                    len: shape.page_size,
                });
            }
        }
        let mut i = 0;
        while i < n {
            let (gpa, nonzero) = index_entry(index, n, i);
            if !nonzero {
                mem.write_zeros(gpa, page_size as u64)?;
                hashes.record_zero(gpa);
                i += 1;
                continue;
            }
            // A run: consecutive non-zero pages at consecutive addresses in one region.
            let region = region_of(layout, gpa, page_size);
            let mut run = 1;
            while i + run < n {
                let (next, nz) = index_entry(index, n, i + run);
                if !nz
                    || next != gpa + (run * page_size) as u64
                    || region_of(layout, next, page_size) != region
                {
                    break;
                }
                run += 1;
            }
            let len = run * page_size;
            let span = mem.span(gpa, len as u64)?;
            // Lets the backend allocate the run's pages in one call instead of one fault
            // per page as the socket fills them.
            mem.prepare_write(gpa, len as u64);
            // Walk the run's pages now, many at once: the kernel's copy from the socket then
            // finds their translations cached instead of stalling on one TLB walk per page.
            for page in span.chunks(page_size) {
                prefetch_write(page.as_ptr());
            }
            // Read in pieces of up to HASH_AFTER bytes (one read call per socket wake-up
            // within a piece: small reads cost ACK processing), each hashed from guest
            // memory right after it landed, while it is still in the L2 cache.
            let piece = (HASH_AFTER / page_size).max(1) * page_size;
            let mut at = gpa;
            for part in span.chunks(piece) {
                {
                    // SAFETY: this is a migration target's memory before the switch-over:
                    // its vCPUs have not run and do not run until the sender relinquishes
                    // the VM, and the receiver is its only writer, one piece at a time; no
                    // other slice or span access overlaps this one while it lives (it ends
                    // at this block's end, before the piece is reported and hashed).
                    let dst = unsafe { part.as_mut_slice() };
                    read_full(&mut self.stream, dst, "payload", false)?;
                }
                mem.note_write(at, part.len() as u64);
                hashes.record(at, part);
                at += part.len() as u64;
            }
            i += run;
        }
        let mut trailer = [0u8; 4];
        read_full(&mut self.stream, &mut trailer, "CRC trailer", false)?;
        Ok(u32::from_le_bytes(trailer))
    }
    /// Reads one frame and decodes its message.
    pub fn recv(&mut self) -> Result<(FrameHeader, Message), ProtocolError> {
        let frame = self.recv_frame()?;
        let msg = frame.message()?;
        Ok((frame.header, msg))
    }
}

fn decompress(src: &[u8], dst: &mut Vec<u8>, command: Command) -> Result<(), ProtocolError> {
    let malformed = |reason: String| ProtocolError::Decompress { command, reason };
    if src.len() < 4 {
        return Err(malformed(format!(
            "the compressed payload is {} bytes, shorter than its 4-byte size prefix",
            src.len()
        )));
    }
    let size = u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as u64;
    if size > MAX_PAYLOAD {
        return Err(ProtocolError::Oversize {
            len: size,
            max: MAX_PAYLOAD,
        });
    }
    dst.resize(size as usize, 0);
    let n = lz4_flex::block::decompress_into(&src[4..], dst)
        .map_err(|e| malformed(format!("lz4 rejected the block: {e}")))?;
    if n as u64 != size {
        return Err(malformed(format!(
            "the block decompressed to {n} bytes but its prefix announced {size}"
        )));
    }
    Ok(())
}

/// Page data is hashed after at most this many bytes of it arrived (fits the L2 cache).
const HASH_AFTER: usize = 256 << 10;

/// `read_exact` that tells a clean close (no byte of a header) from a truncated frame.
fn read_full<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    part: &'static str,
    frame_start: bool,
) -> Result<(), ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && frame_start => return Err(ProtocolError::PeerClosed),
            Ok(0) => {
                return Err(ProtocolError::Truncated {
                    part,
                    expected: buf.len(),
                    got,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(ProtocolError::Io {
                    op: "receiving a frame",
                    source: e,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A loop-back "stream": writes go to `out`, reads come from `input`.
    struct Pipe {
        input: Cursor<Vec<u8>>,
        out: Vec<u8>,
    }
    impl Read for Pipe {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Pipe {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.out.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl FrameStream for Pipe {}
    fn pipe(input: Vec<u8>) -> Channel<Pipe> {
        Channel::new(Pipe {
            input: Cursor::new(input),
            out: Vec::new(),
        })
    }

    fn one_frame(msg: &Message) -> Vec<u8> {
        let mut c = pipe(Vec::new());
        c.send(msg, 7, false).unwrap();
        c.into_inner().out
    }

    #[test]
    fn header_round_trips() {
        let h = FrameHeader {
            version: PROTOCOL_VERSION,
            command: Command::State,
            flags: FLAG_RESPONSE,
            request_id: 99,
            payload_len: 1234,
        };
        assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn every_malformed_frame_is_a_typed_error() {
        let good = one_frame(&Message::Abort { reason: "x".into() });
        let recv = |bytes: Vec<u8>| pipe(bytes).recv().map(|_| ()).unwrap_err();

        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(recv(b), ProtocolError::BadMagic { .. }));

        let mut b = good.clone();
        b[20] ^= 1; // request id: covered by the header CRC
        assert!(matches!(recv(b), ProtocolError::HeaderChecksum { .. }));

        let mut b = good.clone();
        b[6..8].copy_from_slice(&999u16.to_le_bytes());
        let crc = header_crc(b[..32].try_into().unwrap());
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            recv(b),
            ProtocolError::UnknownCommand { value: 999 }
        ));

        let mut b = good.clone();
        b[6..8].copy_from_slice(&0u16.to_le_bytes());
        let crc = header_crc(b[..32].try_into().unwrap());
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(recv(b), ProtocolError::InvalidCommand));

        let mut b = good.clone();
        b[24..32].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        let crc = header_crc(b[..32].try_into().unwrap());
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        let e = recv(b);
        assert!(matches!(e, ProtocolError::Oversize { .. }), "{e}");
        assert!(e.to_string().contains(&(MAX_PAYLOAD + 1).to_string()));

        let mut b = good.clone();
        b[8..10].copy_from_slice(&0x80u16.to_le_bytes());
        let crc = header_crc(b[..32].try_into().unwrap());
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            recv(b),
            ProtocolError::UnknownFlags { flags: 0x80 }
        ));

        let mut b = good.clone();
        b[4..6].copy_from_slice(&77u16.to_le_bytes());
        let crc = header_crc(b[..32].try_into().unwrap());
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            recv(b),
            ProtocolError::UnsupportedVersion { found: 77, .. }
        ));

        let mut b = good.clone();
        let last = b.len() - 5;
        b[last] ^= 0xff; // payload byte
        assert!(matches!(recv(b), ProtocolError::Checksum { .. }));

        let b = good[..good.len() - 2].to_vec();
        assert!(matches!(
            recv(b),
            ProtocolError::Truncated {
                part: "CRC trailer",
                ..
            }
        ));
        let b = good[..10].to_vec();
        assert!(matches!(
            recv(b),
            ProtocolError::Truncated { part: "header", .. }
        ));
        assert!(matches!(recv(Vec::new()), ProtocolError::PeerClosed));
    }

    use crate::memvm::MemGuest;
    use crate::protocol::{PageBatchView, PageBatchWriter};
    use ray_memory::{page_hash, OwnedMemory};

    const PS: usize = 4096;

    fn page_layout() -> MemoryLayout {
        MemoryLayout::new(&[
            (0, 4 * PS as u64),
            (4 * PS as u64, 2 * PS as u64),
            (0x10_0000, 2 * PS as u64),
        ])
        .unwrap()
    }

    fn guest() -> MemGuest {
        MemGuest::new(&page_layout()).unwrap()
    }

    /// A page frame from the real writer; `fill` 0 is a zero page.
    fn page_frame(pages: &[(u64, u8)]) -> Vec<u8> {
        let mut w = PageBatchWriter::new(PS, pages.len().max(1));
        for &(gpa, fill) in pages {
            w.slot().fill(fill);
            w.commit(gpa);
        }
        let mut c = pipe(Vec::new());
        let (index, data) = w.finish_parts();
        c.send_parts(Command::MemoryPages, 5, 0, &[index, data], false)
            .unwrap();
        c.into_inner().out
    }

    /// A CRC-framed `MemoryPages` frame around an arbitrary payload.
    fn raw_page_frame(payload: &[u8]) -> Vec<u8> {
        let mut c = pipe(Vec::new());
        c.send_raw(Command::MemoryPages, 5, 0, payload, false)
            .unwrap();
        c.into_inner().out
    }

    fn place(wire: Vec<u8>, mem: &dyn GuestMemory) -> Result<u64, MigrationError> {
        place_hashed(wire, mem).map(|(n, _)| n)
    }

    /// Places one frame; every page of guest memory must then hash as recorded.
    fn place_hashed(
        wire: Vec<u8>,
        mem: &dyn GuestMemory,
    ) -> Result<(u64, PageHashes), MigrationError> {
        let mut c = pipe(wire);
        let mut hashes = fresh_hashes();
        let n = match c.recv_frame_placing(mem, &mut hashes, PS)? {
            Received::Placed { pages, .. } => pages,
            Received::Frame(f) => panic!("not placed: {:?}", f.header),
        };
        for r in page_layout().regions {
            for gpa in (r.gpa..r.end()).step_by(PS) {
                let mut b = vec![0; PS];
                mem.read(gpa, &mut b).unwrap();
                let placed_or_zero = hashes.get(gpa) == Some(page_hash(&b))
                    || hashes.get(gpa) == Some(page_hash(&[0; PS]));
                assert!(placed_or_zero, "page {gpa:#x} hashed wrong");
            }
        }
        Ok((n, hashes))
    }

    fn fresh_hashes() -> PageHashes {
        PageHashes::new(&page_layout(), PS)
    }

    fn page_of(g: &dyn GuestMemory, gpa: u64) -> Vec<u8> {
        let mut b = vec![0; PS];
        g.read(gpa, &mut b).unwrap();
        b
    }

    #[test]
    fn page_frames_are_placed_straight_into_guest_memory() {
        // Runs, a gap, zero pages, a run crossing from region 0 into region 1, region 2.
        let pages = [
            (0, 1),
            (PS as u64, 2),
            (3 * PS as u64, 3),
            (4 * PS as u64, 4),
            (5 * PS as u64, 0),
            (0x10_0000, 5),
            (0x10_1000, 6),
        ];
        // Two backends: the test guest (which logs the receiver's writes) and bare owned
        // memory (which does not).
        for logged in [true, false] {
            let g = guest();
            g.write(5 * PS as u64, &[9; PS]).unwrap();
            g.take_dirty();
            let owned = OwnedMemory::zeroed(&page_layout()).unwrap();
            owned.write(5 * PS as u64, &[9; PS]).unwrap();
            let mem: &dyn GuestMemory = if logged { &g } else { &owned };
            assert_eq!(place(page_frame(&pages), mem).unwrap(), 7);
            for &(gpa, fill) in &pages {
                assert_eq!(page_of(mem, gpa), vec![fill; PS], "page {gpa:#x}");
            }
            assert_eq!(page_of(mem, 2 * PS as u64), vec![0; PS], "untouched page");
            if logged {
                // Every page written, the zeroed one included, is reported as written.
                let dirty = g.take_dirty();
                let gpas: Vec<u64> = dirty.gpas(&page_layout()).collect();
                let mut want: Vec<u64> = pages.iter().map(|&(gpa, _)| gpa).collect();
                want.sort_unstable();
                assert_eq!(gpas, want);
            }
        }
    }

    /// Guest memory that records the receiver's write hints.
    struct Hinted(MemGuest, std::sync::Mutex<Vec<(u64, u64)>>);
    impl GuestMemory for Hinted {
        fn layout(&self) -> &MemoryLayout {
            self.0.layout()
        }
        fn span(&self, gpa: u64, len: u64) -> Result<GuestSpan<'_>, ray_memory::MemoryError> {
            self.0.span(gpa, len)
        }
        fn prepare_write(&self, gpa: u64, len: u64) {
            self.1.lock().unwrap().push((gpa, len));
        }
    }

    #[test]
    fn each_run_is_announced_before_it_is_filled() {
        let pages = [(0, 1), (PS as u64, 2), (3 * PS as u64, 0), (0x10_0000, 5)];
        let h = Hinted(guest(), Default::default());
        assert_eq!(place(page_frame(&pages), &h).unwrap(), 4);
        let hints = h.1.lock().unwrap().clone();
        assert_eq!(
            hints,
            vec![(0, 2 * PS as u64), (0x10_0000, PS as u64)],
            "one hint per run of data pages, none for zero pages"
        );
    }

    #[test]
    fn guest_parts_go_out_as_they_are_in_memory() {
        let mem = OwnedMemory::zeroed(&page_layout()).unwrap();
        mem.write(0, &[1; PS]).unwrap();
        mem.write(PS as u64, &[2; PS]).unwrap();
        mem.write(0x10_0000, &[3; PS]).unwrap();
        let mut w = PageBatchWriter::new(PS, 4);
        for (gpa, zero) in [(0, false), (PS as u64, false), (2 * PS as u64, true)] {
            w.commit_external(gpa, zero);
        }
        w.commit_external(0x10_0000, false);
        let spans = [
            mem.span(0, 2 * PS as u64).unwrap(),
            mem.span(0x10_0000, PS as u64).unwrap(),
        ];
        // Straight (the spans go to the kernel), or compressed (copied first).
        for compress in [false, true] {
            let mut tx = pipe(Vec::new());
            let (index, _) = w.finish_parts();
            tx.send_guest_parts(Command::MemoryPages, 1, 0, &[index], &spans, compress)
                .unwrap();
            assert_eq!(tx.last_compressed(), compress);
            let sent = tx.bytes_sent();
            let wire = tx.into_inner().out;
            assert_eq!(sent, wire.len() as u64);
            let mut rx = pipe(wire);
            let f = rx.recv_frame().unwrap();
            let view = PageBatchView::parse(f.payload).unwrap();
            let got: Vec<(u64, Option<u8>)> =
                view.iter().map(|(gpa, d)| (gpa, d.map(|d| d[0]))).collect();
            assert_eq!(
                got,
                vec![
                    (0, Some(1)),
                    (PS as u64, Some(2)),
                    (2 * PS as u64, None),
                    (0x10_0000, Some(3))
                ]
            );
        }
    }

    #[test]
    fn other_frames_are_not_placed() {
        let g = guest();
        let mut c = pipe(one_frame(&Message::Switchover));
        assert!(matches!(
            c.recv_frame_placing(&g, &mut fresh_hashes(), PS).unwrap(),
            Received::Frame(Frame {
                header: FrameHeader {
                    command: Command::Switchover,
                    ..
                },
                ..
            })
        ));
    }

    #[test]
    fn malformed_page_frames_are_typed_errors_and_bad_addresses_write_nothing() {
        let g = guest();
        let untouched = |g: &MemGuest| g.contents().iter().all(|r| r.iter().all(|&b| b == 0));

        // Outside every region, misaligned, or straddling the end of a region.
        for gpa in [6 * PS as u64, 0x800, 0x10_2000, u64::MAX - 0xfff] {
            let e = place(page_frame(&[(0, 1), (gpa, 2)]), &g).unwrap_err();
            assert!(
                matches!(e, MigrationError::PageOutOfRange { gpa: x, .. } if x == gpa),
                "{gpa:#x}: {e}"
            );
            assert!(
                untouched(&g),
                "{gpa:#x}: memory written before the index was checked"
            );
        }

        // Page size other than the target's.
        let mut w = PageBatchWriter::new(8192, 1);
        w.slot().fill(1);
        w.commit(0);
        let e = place(raw_page_frame(w.finish()), &g).unwrap_err();
        assert!(
            matches!(e, MigrationError::PageOutOfRange { len: 8192, .. }),
            "{e}"
        );
        assert!(untouched(&g));

        let good = page_frame(&[(0, 1), (PS as u64, 0)]);
        let payload = &good[HEADER_LEN..good.len() - 4];
        let malformed = |p: &[u8]| {
            let e = place(raw_page_frame(p), &g).unwrap_err();
            assert!(
                matches!(
                    e,
                    MigrationError::Protocol(ProtocolError::Malformed {
                        command: Command::MemoryPages,
                        ..
                    })
                ),
                "{e}"
            );
            e.to_string()
        };
        assert!(malformed(&payload[..5]).contains("shorter than its 8-byte header"));
        let mut p = payload.to_vec();
        p[0..4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(malformed(&p).contains("page size 1000"));
        let mut p = payload.to_vec();
        p[4..8].copy_from_slice(&(MAX_BATCH_PAGES_FOR_TEST + 1).to_le_bytes());
        assert!(malformed(&p).contains("at most"));
        // Index shorter than announced.
        let mut p = payload[..8].to_vec();
        p[4..8].copy_from_slice(&100u32.to_le_bytes());
        assert!(malformed(&p).contains("too few for the index"));
        // Zero bitmap marks page 2 of a 2-page batch.
        let mut p = payload.to_vec();
        p[8 + 16] |= 0b100;
        assert!(malformed(&p).contains("past the end"));
        // Data length disagrees with the bitmap: one byte short, one byte over, a page over.
        assert!(malformed(&payload[..payload.len() - 1]).contains("data bytes"));
        let mut p = payload.to_vec();
        p.push(0);
        assert!(malformed(&p).contains("data bytes"));
        let mut p = payload.to_vec();
        p[8 + 16] = 0; // page 1 no longer zero, but its data is missing
        assert!(malformed(&p).contains("data bytes"));
        assert!(untouched(&g));

        // A flipped index byte (the zero bitmap): the CRC catches it at the end.
        let mut b = good.clone();
        let at = HEADER_LEN + BATCH_HEADER + 16;
        b[at] ^= 0b10;
        let e = place(b, &g).unwrap_err();
        assert!(
            matches!(
                e,
                MigrationError::Protocol(ProtocolError::Malformed { .. })
                    | MigrationError::Protocol(ProtocolError::Checksum {
                        command: Command::MemoryPages,
                        ..
                    })
            ),
            "{e}"
        );
        let mut b = good.clone();
        b[HEADER_LEN + BATCH_HEADER + 1] ^= 0x10; // a gpa byte, still a page in range
        let e = place(b, &g).unwrap_err();
        assert!(
            matches!(
                e,
                MigrationError::Protocol(ProtocolError::Checksum {
                    command: Command::MemoryPages,
                    ..
                })
            ),
            "{e}"
        );
        // A flipped data byte is not the CRC's (it covers header and index): the page
        // lands, and its hash, which the verification compares, is not the sent page's.
        let mut b = good.clone();
        let at = b.len() - 10;
        b[at] ^= 1;
        let h = guest();
        let (_, hashes) = place_hashed(b, &h).unwrap();
        let (_, clean) = place_hashed(good.clone(), &guest()).unwrap();
        assert_ne!(hashes.digests(), clean.digests());

        // Cut in the index, in the data, in the trailer.
        for (cut, part) in [
            (HEADER_LEN + 12, "payload"),
            (HEADER_LEN + 100, "payload"),
            (good.len() - 2, "CRC trailer"),
        ] {
            let e = place(good[..cut].to_vec(), &g).unwrap_err();
            assert!(
                matches!(e, MigrationError::Protocol(ProtocolError::Truncated { part: p, .. }) if p == part),
                "cut at {cut}: {e}"
            );
        }
        assert!(matches!(
            place(Vec::new(), &g).unwrap_err(),
            MigrationError::Protocol(ProtocolError::PeerClosed)
        ));
    }

    const MAX_BATCH_PAGES_FOR_TEST: u32 = crate::protocol::MAX_BATCH_PAGES;

    #[test]
    fn lz4_payloads_round_trip() {
        let payload = vec![7u8; 100_000];
        let mut c = pipe(Vec::new());
        c.send_raw(Command::State, 3, 0, &payload, true).unwrap();
        let wire = c.into_inner().out;
        assert!(
            wire.len() < 10_000,
            "compressible payload was not compressed"
        );
        let mut rx = pipe(wire);
        let f = rx.recv_frame().unwrap();
        assert_eq!(f.payload, &payload[..]);
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut c = pipe(bytes);
            while c.recv().is_ok() {}
        }

        #[test]
        fn arbitrary_bytes_after_a_valid_header_never_panic(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256), cmd in 1u16..13, lz in proptest::prelude::any::<bool>()) {
            let command = Command::try_from(if cmd >= 2 { cmd + 1 } else { cmd }).unwrap();
            let h = FrameHeader { version: PROTOCOL_VERSION, command, flags: if lz { FLAG_LZ4 } else { 0 }, request_id: 1, payload_len: tail.len() as u64 };
            let mut bytes = h.encode().to_vec();
            let mut crc = crc32fast::Hasher::new();
            crc.update(&bytes);
            crc.update(&tail);
            bytes.extend_from_slice(&tail);
            bytes.extend_from_slice(&crc.finalize().to_le_bytes());
            let _ = pipe(bytes).recv();
        }
    }
}
