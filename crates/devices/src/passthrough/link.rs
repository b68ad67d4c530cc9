//! Our vfio-user client: the link to a device process over its Unix socket, with a bound
//! on every request. The device process is not trusted to answer, nor to answer well: a
//! request that gets no whole reply within the bound fails, and so does a reply that does
//! not match its request (message ID, command, size). Either failure closes the link for
//! good: the byte stream may be out of step, and a late answer must not be taken for the
//! answer to a later request.
//!
//! Messages follow the vfio-user protocol (a 16-byte header: message ID, command, size,
//! flags, error; then the command's fields, little-endian). Region information brings
//! the region's file descriptor and its sparse mmap areas when the device offers them.
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HEADER: usize = 16;
const FLAG_REPLY: u32 = 1;
const FLAG_TYPE: u32 = 0xf;
const FLAG_ERROR: u32 = 1 << 5;
/// The largest reply taken: a 1 MiB transfer and its header.
const MAX_REPLY: usize = (1 << 20) + 4096;
const REGION_INFO: usize = 32;
const CAP_SPARSE_MMAP: u16 = 1;
const DEVICE_FLAGS_PCI: u32 = 1 << 1;
/// More regions or interrupt kinds than any PCI device has are refused.
const MAX_REGIONS: u32 = 64;
const MAX_SPARSE_AREAS: u32 = 64;

/// The bound on one request when none is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    GetInfo = 4,
    GetRegionInfo = 5,
    GetIrqInfo = 7,
    SetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    Reset = 13,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// No whole reply came within the bound; the link is now closed.
    Timeout(Duration),
    /// The link was closed by an earlier failure (its text).
    Closed(String),
    /// The device refused the request (its errno).
    Refused(u32),
    /// The socket failed or the reply broke the protocol.
    Broken(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Timeout(t) => write!(
                f,
                "no answer within {} ms (the link is closed)",
                t.as_millis()
            ),
            LinkError::Closed(why) => write!(f, "the link was closed earlier: {why}"),
            LinkError::Refused(errno) => write!(f, "the device refused it (errno {errno})"),
            LinkError::Broken(why) => f.write_str(why),
        }
    }
}

/// One region of the device as it described it.
#[derive(Debug)]
pub struct Region {
    pub index: u32,
    pub flags: u32,
    pub size: u64,
    /// The region's file and where the region starts in it, if the device offers one to
    /// map.
    pub file: Option<(File, u64)>,
    /// The parts of the region that may be mapped (offset, size), from its sparse mmap
    /// capability.
    pub sparse: Vec<(u64, u64)>,
}

pub struct Link {
    stream: UnixStream,
    next_id: u16,
    timeout: Duration,
    /// The socket's receive timeout as last set.
    read_timeout: Duration,
    closed: Option<String>,
    regions: Vec<Region>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn io_error(e: std::io::Error, what: &str) -> LinkError {
    LinkError::Broken(format!("{what}: {e}"))
}

impl Link {
    /// Connects to the device at `socket`, agrees on the protocol version and learns its
    /// regions; every request, these first ones included, is bounded by `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, LinkError> {
        // Jailed, through the keeper (the socket is outside the jail).
        let stream =
            ray_outside::connect_unix(socket).map_err(|e| io_error(e, "cannot connect"))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| io_error(e, "cannot bound the socket's waits"))?;
        let mut link = Self {
            stream,
            next_id: 0,
            timeout,
            read_timeout: timeout,
            closed: None,
            regions: Vec::new(),
        };
        link.negotiate()?;
        link.regions = link.learn_regions()?;
        Ok(link)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn region(&self, index: u32) -> Option<&Region> {
        self.regions.iter().find(|r| r.index == index)
    }

    fn negotiate(&mut self) -> Result<(), LinkError> {
        let caps = br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}"#;
        let mut body = Vec::with_capacity(4 + caps.len() + 1);
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(caps);
        body.push(0);
        let (reply, _) = self.request(Command::Version, &[&body], &[])?;
        if reply.len() < 4 {
            return Err(self.broken("its version reply is too short".into()));
        }
        Ok(())
    }

    fn learn_regions(&mut self) -> Result<Vec<Region>, LinkError> {
        let mut body = [0u8; 16];
        body[..4].copy_from_slice(&16u32.to_le_bytes());
        let (info, _) = self.request(Command::GetInfo, &[&body], &[])?;
        if info.len() < 16 {
            return Err(self.broken("its device information is too short".into()));
        }
        if u32_at(&info, 4) & DEVICE_FLAGS_PCI == 0 {
            return Err(self.broken("it is not a PCI device".into()));
        }
        let count = u32_at(&info, 8);
        if count > MAX_REGIONS {
            return Err(self.broken(format!("it claims {count} regions")));
        }
        (0..count).map(|i| self.region_info(i)).collect()
    }

    fn region_info(&mut self, index: u32) -> Result<Region, LinkError> {
        let ask = |argsz: u32| {
            let mut b = [0u8; REGION_INFO];
            b[..4].copy_from_slice(&argsz.to_le_bytes());
            b[8..12].copy_from_slice(&index.to_le_bytes());
            b
        };
        let (mut reply, mut fd) = self.request(Command::GetRegionInfo, &[&ask(32)], &[])?;
        if reply.len() < REGION_INFO {
            return Err(self.broken(format!("region {index}: its information is too short")));
        }
        let argsz = u32_at(&reply, 0);
        if argsz as usize > REGION_INFO {
            // The region has capabilities: ask again with room for them.
            if argsz as usize > 64 << 10 {
                return Err(self.broken(format!(
                    "region {index}: {argsz} bytes of capabilities claimed"
                )));
            }
            (reply, fd) = self.request(Command::GetRegionInfo, &[&ask(argsz)], &[])?;
            if reply.len() < REGION_INFO {
                return Err(self.broken(format!("region {index}: its information is too short")));
            }
        }
        let (flags, cap_offset) = (u32_at(&reply, 4), u32_at(&reply, 12) as usize);
        let (size, offset) = (u64_at(&reply, 16), u64_at(&reply, 24));
        let mut sparse = Vec::new();
        let mut next = if reply.len() > REGION_INFO {
            cap_offset
        } else {
            0
        };
        let mut hops = 0;
        while next != 0 {
            hops += 1;
            if hops > 16 || next < REGION_INFO || next + 8 > reply.len() {
                return Err(self.broken(format!(
                    "region {index}: a capability at {next} is outside its {} bytes",
                    reply.len()
                )));
            }
            let (id, after) = (u16_at(&reply, next), u32_at(&reply, next + 4) as usize);
            if id == CAP_SPARSE_MMAP {
                if next + 16 > reply.len() {
                    return Err(self.broken(format!(
                        "region {index}: a truncated sparse mmap capability"
                    )));
                }
                let n = u32_at(&reply, next + 8);
                let areas = next + 16;
                if n > MAX_SPARSE_AREAS || areas + 16 * n as usize > reply.len() {
                    return Err(self.broken(format!(
                        "region {index}: {n} sparse mmap areas do not fit its capability"
                    )));
                }
                for k in 0..n as usize {
                    let (o, s) = (
                        u64_at(&reply, areas + 16 * k),
                        u64_at(&reply, areas + 16 * k + 8),
                    );
                    if o.checked_add(s).is_none_or(|end| end > size) || s == 0 {
                        return Err(self.broken(format!(
                            "region {index}: sparse mmap area {o:#x}+{s:#x} is outside its {size} bytes"
                        )));
                    }
                    sparse.push((o, s));
                }
            }
            if after != 0 && after <= next {
                return Err(self.broken(format!("region {index}: its capability list loops")));
            }
            next = after;
        }
        Ok(Region {
            index: u32_at(&reply, 8),
            flags,
            size,
            file: fd.map(|f| (f, offset)),
            sparse,
        })
    }

    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), LinkError> {
        let head = access(region, offset, data.len());
        let (reply, _) = self.request(Command::RegionRead, &[&head], &[])?;
        if reply.len() != 16 + data.len() || u32_at(&reply, 12) as usize != data.len() {
            return Err(self.broken(format!(
                "it answered a {}-byte read with {} bytes",
                data.len(),
                reply.len().saturating_sub(16)
            )));
        }
        data.copy_from_slice(&reply[16..]);
        Ok(())
    }

    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), LinkError> {
        let head = access(region, offset, data.len());
        self.request(Command::RegionWrite, &[&head, data], &[])?;
        Ok(())
    }

    /// The number of interrupts of kind `index`.
    pub fn irq_count(&mut self, index: u32) -> Result<u32, LinkError> {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&16u32.to_le_bytes());
        b[8..12].copy_from_slice(&index.to_le_bytes());
        let (reply, _) = self.request(Command::GetIrqInfo, &[&b], &[])?;
        if reply.len() < 16 {
            return Err(self.broken("its interrupt information is too short".into()));
        }
        Ok(u32_at(&reply, 12))
    }

    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
    ) -> Result<(), LinkError> {
        let mut b = [0u8; 20];
        for (k, v) in [20u32, flags, index, start, count].into_iter().enumerate() {
            b[4 * k..4 * k + 4].copy_from_slice(&v.to_le_bytes());
        }
        self.request(Command::SetIrqs, &[&b], fds)?;
        Ok(())
    }

    pub fn dma_map(
        &mut self,
        fd_offset: u64,
        iova: u64,
        size: u64,
        fd: RawFd,
    ) -> Result<(), LinkError> {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&32u32.to_le_bytes());
        // Readable and writable by the device.
        b[4..8].copy_from_slice(&3u32.to_le_bytes());
        b[8..16].copy_from_slice(&fd_offset.to_le_bytes());
        b[16..24].copy_from_slice(&iova.to_le_bytes());
        b[24..32].copy_from_slice(&size.to_le_bytes());
        self.request(Command::DmaMap, &[&b], &[fd])?;
        Ok(())
    }

    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), LinkError> {
        let mut b = [0u8; 24];
        b[..4].copy_from_slice(&24u32.to_le_bytes());
        b[8..16].copy_from_slice(&iova.to_le_bytes());
        b[16..24].copy_from_slice(&size.to_le_bytes());
        self.request(Command::DmaUnmap, &[&b], &[])?;
        Ok(())
    }

    pub fn reset(&mut self) -> Result<(), LinkError> {
        self.request(Command::Reset, &[], &[])?;
        Ok(())
    }

    /// Closes the link for good; later requests fail at once with `why`.
    pub fn close(&mut self, why: String) {
        if self.closed.is_none() {
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
            self.closed = Some(why);
        }
    }

    fn broken(&mut self, why: String) -> LinkError {
        self.close(why.clone());
        LinkError::Broken(why)
    }

    /// Sends one command and takes its reply (the bytes after the header, and a file
    /// descriptor if one came), all within the bound; any failure closes the link.
    fn request(
        &mut self,
        command: Command,
        body: &[&[u8]],
        fds: &[RawFd],
    ) -> Result<(Vec<u8>, Option<File>), LinkError> {
        if let Some(why) = &self.closed {
            return Err(LinkError::Closed(why.clone()));
        }
        let r = self.exchange(command, body, fds);
        match &r {
            // A refusal is a whole reply: the stream is still in step.
            Err(LinkError::Refused(_)) | Ok(_) => {}
            Err(e) => self.close(e.to_string()),
        }
        r
    }

    fn remaining(&self, deadline: Instant) -> Result<Duration, LinkError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(LinkError::Timeout(self.timeout))
        } else {
            Ok(left)
        }
    }

    /// Waits at most until `deadline` in the next receive (the socket's timeout is only
    /// changed when less than the whole bound is left).
    fn bound_read(&mut self, deadline: Instant) -> Result<(), LinkError> {
        let left = self.remaining(deadline)?;
        let want = if left >= self.timeout {
            self.timeout
        } else {
            left
        };
        if want != self.read_timeout {
            self.stream
                .set_read_timeout(Some(want))
                .map_err(|e| io_error(e, "cannot bound the socket's wait"))?;
            self.read_timeout = want;
        }
        Ok(())
    }

    fn timed_out(&self, e: &std::io::Error) -> bool {
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
    }

    fn exchange(
        &mut self,
        command: Command,
        body: &[&[u8]],
        fds: &[RawFd],
    ) -> Result<(Vec<u8>, Option<File>), LinkError> {
        let deadline = Instant::now() + self.timeout;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let size = HEADER + body.iter().map(|b| b.len()).sum::<usize>();
        let mut message = Vec::with_capacity(size);
        message.extend_from_slice(&id.to_le_bytes());
        message.extend_from_slice(&(command as u16).to_le_bytes());
        message.extend_from_slice(&(size as u32).to_le_bytes());
        message.extend_from_slice(&[0; 8]);
        for b in body {
            message.extend_from_slice(b);
        }

        // Send: the descriptors ride with the first bytes; the write timeout set at connect
        // bounds each send.
        let mut sent = 0;
        if !fds.is_empty() {
            sent = self
                .stream
                .send_with_fds(&[&message[..]], fds)
                .map_err(|e| {
                    let e = std::io::Error::from_raw_os_error(e.errno());
                    if self.timed_out(&e) {
                        LinkError::Timeout(self.timeout)
                    } else {
                        io_error(e, "cannot send")
                    }
                })?;
        }
        while sent < message.len() {
            self.remaining(deadline)?;
            match self.stream.write(&message[sent..]) {
                Ok(0) => return Err(LinkError::Broken("the device closed the link".into())),
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if self.timed_out(&e) => return Err(LinkError::Timeout(self.timeout)),
                Err(e) => return Err(io_error(e, "cannot send")),
            }
        }

        // The reply's header (a descriptor may come with its first bytes).
        let mut head = [0u8; HEADER];
        let mut got = 0;
        let mut file = None;
        while got < HEADER {
            self.bound_read(deadline)?;
            match self.stream.recv_with_fd(&mut head[got..]) {
                Ok((0, _)) => return Err(LinkError::Broken("the device closed the link".into())),
                Ok((n, f)) => {
                    got += n;
                    if f.is_some() {
                        file = f;
                    }
                }
                Err(e) => {
                    let e = std::io::Error::from_raw_os_error(e.errno());
                    match e.kind() {
                        ErrorKind::Interrupted => {}
                        _ if self.timed_out(&e) => return Err(LinkError::Timeout(self.timeout)),
                        _ => return Err(io_error(e, "cannot receive")),
                    }
                }
            }
        }
        let (rid, rcommand) = (u16_at(&head, 0), u16_at(&head, 2));
        let (rsize, flags, errno) = (
            u32_at(&head, 4) as usize,
            u32_at(&head, 8),
            u32_at(&head, 12),
        );
        if flags & FLAG_TYPE != FLAG_REPLY || rid != id || rcommand != command as u16 {
            return Err(LinkError::Broken(format!(
                "its reply (ID {rid}, command {rcommand}, flags {flags:#x}) is not the reply to \
                 request {id} ({command:?})"
            )));
        }
        if !(HEADER..=MAX_REPLY).contains(&rsize) {
            return Err(LinkError::Broken(format!("its reply claims {rsize} bytes")));
        }
        let mut rest = vec![0u8; rsize - HEADER];
        let mut got = 0;
        while got < rest.len() {
            self.bound_read(deadline)?;
            match self.stream.read(&mut rest[got..]) {
                Ok(0) => return Err(LinkError::Broken("the device closed the link".into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if self.timed_out(&e) => return Err(LinkError::Timeout(self.timeout)),
                Err(e) => return Err(io_error(e, "cannot receive")),
            }
        }
        if flags & FLAG_ERROR != 0 {
            return Err(LinkError::Refused(errno));
        }
        Ok((rest, file))
    }
}

/// A region access's fields: offset, region, count.
fn access(region: u32, offset: u64, len: usize) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&offset.to_le_bytes());
    b[8..12].copy_from_slice(&region.to_le_bytes());
    b[12..16].copy_from_slice(&(len as u32).to_le_bytes());
    b
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
