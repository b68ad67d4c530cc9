//! The front end's messages pass through [`relay`] on their way to the protocol layer, so
//! that one ordering QEMU 7.2 uses does not end the session.
//!
//! When the back end offers the protocol extensions (VHOST_USER_F_PROTOCOL_FEATURES), QEMU
//! 7.2's net front end sends SET_VRING_ENABLE as soon as it knows the offer, before its
//! SET_FEATURES has accepted it. The specification says that message may only follow the
//! acceptance, and the protocol layer we build on (the vhost crate) refuses it and closes
//! the connection. QEMU sends it without asking for a reply, so holding it back until
//! SET_FEATURES has gone through changes nothing the front end can see; the relay does
//! exactly that and forwards every other message unchanged, file descriptors included.
//!
//! ```text
//! front end ──msgs+fds──▶ relay (holds early SET_VRING_ENABLE) ──▶ protocol layer
//! front end ◀──────────────── replies, byte for byte ───────────── protocol layer
//! ```
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::thread;

use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of a message header: request, flags, payload size (three little-endian u32).
const HEADER: usize = 12;
/// Largest payload accepted (the protocol's biggest, a memory table, is ~0.3 KiB; a
/// configuration space read is at most 256 bytes plus its header).
const MAX_PAYLOAD: usize = 4096;
/// Most file descriptors one message carries (a memory table: one per region, at most 8
/// without the extension that sends regions one at a time).
const MAX_FDS: usize = 32;
/// The flag a front end sets to ask for an acknowledgement (REPLY_ACK).
const NEED_REPLY: u32 = 1 << 3;

const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
/// Regions a memory table may hold (the protocol's limit without one-by-one regions).
const MAX_REGIONS: usize = 8;
const SET_VRING_ENABLE: u32 = 18;

/// One message from the front end: header, payload and the descriptors that came with it.
struct Message {
    header: [u8; HEADER],
    payload: Vec<u8>,
    fds: Vec<File>,
}

impl Message {
    /// The header's `i`th little-endian u32.
    fn word(&self, i: usize) -> u32 {
        let b = &self.header[4 * i..4 * i + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn request(&self) -> u32 {
        self.word(0)
    }

    fn flags(&self) -> u32 {
        self.word(1)
    }

    fn size(&self) -> usize {
        self.word(2) as usize
    }
}

/// Reads one message; `Ok(None)` when the front end closed the connection.
fn receive(from: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER,
    }];
    // SAFETY: the iovec points at `header`, which lives and is writable for the whole call
    // and is HEADER bytes long; `raw_fds` has room for MAX_FDS descriptors.
    let (got, fd_count) = unsafe { from.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<File> = raw_fds[..fd_count]
        .iter()
        // SAFETY: recvmsg gave us these descriptors; nothing else owns them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if got == 0 {
        return Ok(None);
    }
    (&*from)
        .read_exact(&mut header[got..])
        .map_err(|e| cut_short(e, "header"))?;
    let mut message = Message {
        header,
        payload: Vec::new(),
        fds,
    };
    let request = message.request();
    let name = FrontendReq::try_from(request).map_err(|_| {
        invalid(format!(
            "request {request} is not a vhost-user request this back end knows"
        ))
    })?;
    let size = message.size();
    if size > MAX_PAYLOAD {
        return Err(invalid(format!(
            "{name:?} announces a {size}-byte payload; at most {MAX_PAYLOAD} are accepted"
        )));
    }
    message.payload = vec![0; size];
    (&*from)
        .read_exact(&mut message.payload)
        .map_err(|e| cut_short(e, "payload"))?;
    if request == SET_MEM_TABLE {
        check_memory_table(&message)?;
    }
    Ok(Some(message))
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

fn cut_short(e: io::Error, part: &str) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        invalid(format!(
            "the front end left in the middle of a message {part}"
        ))
    } else {
        e
    }
}

/// A memory table: a region count, padding, then 32 bytes and one descriptor per region.
fn check_memory_table(message: &Message) -> io::Result<()> {
    let p = &message.payload;
    let regions = if p.len() >= 4 {
        u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize
    } else {
        0
    };
    let want = 8 + 32 * regions;
    if p.len() < 4 || regions == 0 || regions > MAX_REGIONS || p.len() != want {
        return Err(invalid(format!(
            "SET_MEM_TABLE names {regions} regions in a {}-byte payload (1 to {MAX_REGIONS} regions, 8 + 32 bytes each)",
            p.len()
        )));
    }
    if message.fds.len() != regions {
        return Err(invalid(format!(
            "SET_MEM_TABLE names {regions} regions but carries {} file descriptors",
            message.fds.len()
        )));
    }
    Ok(())
}

fn send(to: &UnixStream, message: &Message) -> io::Result<()> {
    let fds: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let bufs: [&[u8]; 2] = [&message.header, &message.payload];
    let total = HEADER + message.payload.len();
    let sent = to
        .send_with_fds(&bufs, &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent < HEADER {
        // The header did not go out whole: the protocol layer would misparse the rest.
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the protocol layer took only part of a message header",
        ));
    }
    if sent < total {
        (&*to).write_all(&message.payload[sent - HEADER..])?;
    }
    Ok(())
}

/// Forwards the front end's messages to `back` until either side closes, holding back a
/// SET_VRING_ENABLE that arrives before SET_FEATURES (see the module documentation).
fn forward(front: &UnixStream, back: &UnixStream) -> io::Result<()> {
    let mut features_set = false;
    let mut held: Vec<Message> = Vec::new();
    while let Some(message) = receive(front)? {
        let request = message.request();
        tracing::debug!(
            "front end: request {request}, flags {:#x}, {} bytes, {} fds",
            message.flags(),
            message.size(),
            message.fds.len()
        );
        if request == SET_VRING_ENABLE && !features_set && message.flags() & NEED_REPLY == 0 {
            held.push(message);
            continue;
        }
        send(back, &message)?;
        if request == SET_FEATURES {
            features_set = true;
            for early in held.drain(..) {
                send(back, &early)?;
            }
        }
    }
    Ok(())
}

/// Relays between a front end and the protocol layer's end of a socket pair until either
/// side closes; then shuts both down so the other direction ends too.
pub fn relay(front: UnixStream, back: UnixStream) -> io::Result<()> {
    let (front_reply, back_reply) = (front.try_clone()?, back.try_clone()?);
    let replies = thread::Builder::new()
        .name("vhost-replies".into())
        .spawn(move || {
            let _ = io::copy(&mut &back_reply, &mut &front_reply);
            let _ = front_reply.shutdown(std::net::Shutdown::Both);
            let _ = back_reply.shutdown(std::net::Shutdown::Both);
        })?;
    let result = forward(&front, &back);
    let _ = back.shutdown(std::net::Shutdown::Both);
    let _ = front.shutdown(std::net::Shutdown::Both);
    let _ = replies.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn requests(mut bytes: &[u8]) -> Vec<u32> {
        let mut out = Vec::new();
        while bytes.len() >= HEADER {
            out.push(u32::from_le_bytes(bytes[..4].try_into().unwrap()));
            let size = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
            bytes = &bytes[HEADER + size..];
        }
        out
    }

    #[test]
    fn an_early_vring_enable_follows_set_features() {
        let (front_end, front) = UnixStream::pair().unwrap();
        let (back, protocol) = UnixStream::pair().unwrap();
        let relay = thread::spawn(move || relay(front, back));
        let mut sent = Vec::new();
        sent.extend(message(1, 1, &[])); // GET_FEATURES
        sent.extend(message(SET_VRING_ENABLE, 1, &[0; 8]));
        sent.extend(message(SET_VRING_ENABLE, 1, &[1, 0, 0, 0, 0, 0, 0, 0]));
        sent.extend(message(SET_FEATURES, 1, &[0; 8]));
        sent.extend(message(SET_VRING_ENABLE, 1, &[0, 0, 0, 0, 1, 0, 0, 0]));
        (&front_end).write_all(&sent).unwrap();
        drop(front_end);
        let mut got = Vec::new();
        (&protocol).read_to_end(&mut got).unwrap();
        relay.join().unwrap().unwrap();
        assert_eq!(
            requests(&got),
            [
                1,
                SET_FEATURES,
                SET_VRING_ENABLE,
                SET_VRING_ENABLE,
                SET_VRING_ENABLE
            ]
        );
        assert_eq!(got.len(), sent.len(), "every byte was forwarded");
    }

    #[test]
    fn descriptors_travel_with_their_message() {
        let (front_end, front) = UnixStream::pair().unwrap();
        let (back, protocol) = UnixStream::pair().unwrap();
        let relay = thread::spawn(move || relay(front, back));
        let file = File::open("/dev/null").unwrap();
        let kick = message(12, 1, &[0; 8]); // SET_VRING_KICK
        front_end
            .send_with_fds(&[&kick[..]], &[file.as_raw_fd()])
            .unwrap();
        let mut header = [0u8; HEADER];
        let mut fds = [-1; 4];
        let mut iov = [libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: HEADER,
        }];
        // SAFETY: the iovec points at `header`, alive and writable for the call.
        let (n, count) = unsafe { protocol.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!((n, count), (HEADER, 1));
        // SAFETY: the descriptor was just received and is ours.
        drop(unsafe { File::from_raw_fd(fds[0]) });
        assert_eq!(&header[..], &kick[..HEADER]);
        drop(front_end);
        relay.join().unwrap().unwrap();
    }

    #[test]
    fn an_oversized_payload_is_refused_with_its_size() {
        let (front_end, front) = UnixStream::pair().unwrap();
        let (back, _protocol) = UnixStream::pair().unwrap();
        (&front_end)
            .write_all(&message(5, 1, &[])[..8])
            .and_then(|_| (&front_end).write_all(&100_000u32.to_le_bytes()))
            .unwrap();
        let err = relay(front, back).unwrap_err();
        assert!(
            err.to_string()
                .contains("SET_MEM_TABLE announces a 100000-byte payload"),
            "{err}"
        );
    }
}
