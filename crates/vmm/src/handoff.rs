//! Descriptors handed to a jailed VMM by `ray` (root, in the host's namespaces): what the
//! VMM cannot open itself from inside its jail, such as a connection to a migration target
//! in the host's network namespace, or a key file outside its root.
//!
//! A jailed VMM listens on `handoff.sock` in its VM directory (mode 0600, its own uid: only
//! it and root may connect). A client connects, sends one message holding a token (a
//! random name it picked) with the descriptors attached (`SCM_RIGHTS`), keeps the
//! connection open, and then makes the API request naming the token. The VMM takes the
//! descriptors named by the token when it handles the request: everything was queued on the
//! socket before the request, so nothing waits.
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// The hand-off socket's name in the VM directory.
pub const SOCKET: &str = "handoff.sock";

/// At most this many descriptors in one hand-off.
pub const MAX_FDS: usize = 4;

/// Longest token.
const MAX_TOKEN: usize = 64;

/// Hand-offs received while looking for another token, kept for their own request.
const MAX_PENDING: usize = 8;

/// A fresh token: 16 random bytes in hex.
pub fn token() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    // SAFETY: writes at most `bytes.len()` bytes into `bytes`, which outlives the call.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(io::Error::other("getrandom gave no token"));
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Client side: connects to the hand-off socket `socket` and sends `fds` under `token`.
/// Keep the returned connection open until the request naming the token was answered.
pub fn send(socket: &Path, token: &str, fds: &[BorrowedFd<'_>]) -> io::Result<UnixStream> {
    if token.is_empty() || token.len() > MAX_TOKEN || fds.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a hand-off holds a token of 1 to 64 bytes and 1 to 4 descriptors",
        ));
    }
    let stream = UnixStream::connect(socket)?;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let data_len = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: token.as_ptr() as *mut libc::c_void,
        iov_len: token.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no buffers); the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `control`, which has room for one header and `data_len`
    // bytes of data (CMSG_SPACE); the header and data pointers stay inside it.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(cmsg).cast(), raw.len());
        libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != token.len() {
        return Err(io::Error::other("the hand-off was sent in part"));
    }
    Ok(stream)
}

/// Receives one hand-off from `stream` without waiting: its token and descriptors.
fn receive(stream: &UnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut buf = [0u8; MAX_TOKEN];
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` describes `buf` and `control`, both alive across the call.
    let n = unsafe {
        libc::recvmsg(
            stream.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen; CMSG_FIRSTHDR/NXTHDR stay
    // within it, and each SCM_RIGHTS payload is an array of descriptors now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(
            "more descriptors than a hand-off may hold",
        ));
    }
    let token = std::str::from_utf8(&buf[..n as usize])
        .map_err(|_| io::Error::other("the hand-off's token is not text"))?;
    Ok((token.to_string(), fds))
}

/// The VMM's side: the listening socket and hand-offs received for other requests.
#[derive(Debug)]
pub struct Inbox {
    listener: UnixListener,
    pending: HashMap<String, Vec<OwnedFd>>,
}

impl Inbox {
    /// Listens on `<dir>/handoff.sock`, mode 0600 (an old socket there is replaced).
    pub fn bind(dir: &Path) -> io::Result<Inbox> {
        let path = dir.join(SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Inbox {
            listener,
            pending: HashMap::new(),
        })
    }

    /// The descriptors handed over under `token` (exactly `count` of them), taken once.
    pub fn take(&mut self, token: &str, count: usize) -> Result<Vec<OwnedFd>, String> {
        loop {
            if let Some(fds) = self.pending.remove(token) {
                if fds.len() != count {
                    return Err(format!(
                        "hand-off {token} holds {} descriptors, not {count}",
                        fds.len()
                    ));
                }
                return Ok(fds);
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(format!(
                        "nothing was handed to this VMM as {token:?} (connect to {SOCKET} in its directory and send the descriptors first)"
                    ))
                }
                Err(e) => return Err(format!("cannot take a hand-off from {SOCKET}: {e}")),
            };
            // A client that sent nothing yet, or garbage, is dropped.
            if let Ok((t, fds)) = receive(&stream) {
                if self.pending.len() >= MAX_PENDING {
                    self.pending.clear();
                }
                self.pending.insert(t, fds);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_go_across_under_their_token_and_only_once() {
        let dir = std::env::temp_dir().join(format!("ray-handoff-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut inbox = Inbox::bind(&dir).unwrap();
        let mode = std::fs::metadata(dir.join(SOCKET)).unwrap().permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);
        let (mut a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let t1 = token().unwrap();
        let t2 = token().unwrap();
        assert_ne!(t1, t2);
        assert_eq!(t1.len(), 32);
        let _c2 = send(&dir.join(SOCKET), &t2, &[file.as_fd()]).unwrap();
        let _c1 = send(&dir.join(SOCKET), &t1, &[b.as_fd(), file.as_fd()]).unwrap();
        drop(b);
        let e = inbox.take(&t2, 2).unwrap_err();
        assert!(e.contains("holds 1 descriptors, not 2"), "{e}");
        let fds = inbox.take(&t1, 2).unwrap();
        // The first is the other end of `a`.
        let mut got = UnixStream::from(fds.into_iter().next().unwrap());
        a.write_all(b"over").unwrap();
        let mut buf = [0u8; 4];
        got.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"over");
        let e = inbox.take(&t1, 2).unwrap_err();
        assert!(e.contains("nothing was handed"), "{e}");
        let e = send(&dir.join(SOCKET), "", &[file.as_fd()]).unwrap_err();
        assert!(e.to_string().contains("token of 1 to 64 bytes"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
