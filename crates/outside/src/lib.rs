//! What a jailed VMM asks for outside its jail.
//!
//! A jailed VMM sees only its own files and, without NICs, has a network namespace of its
//! own. Some of what a VM is configured with lives outside: the Unix socket or TCP address
//! of a remote GPU's back end or a vfio-user device, a TCP listener on the host's loopback
//! (`--api-tcp`, `--vnc`), and on a migration target the shared disks and TAPs of the VM
//! a source sends. Its keeper (`ray vmm --jail`, root, in the host's namespaces) holds the
//! other end of a datagram socket pair: the VMM sends one [`Request`], the keeper checks it
//! against what the VM was started with (its plan) and answers with a [`Reply`] and, when
//! granted, the opened descriptor (`SCM_RIGHTS`). The keeper never opens what the plan does
//! not name, so a VMM taken over by its guest gains nothing it was not given.
//!
//! Unjailed, every function here opens the thing itself, as the VMM always did.
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Largest request or reply, in bytes (paths and a reason fit many times over).
pub const MAX_MESSAGE: usize = 8192;

/// How long the VMM waits for its keeper's answer (a TCP connect is bounded below it).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a connect to a back end may take (TCP, or a Unix socket whose listener's
/// backlog is full).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One thing the VMM asks its keeper to open.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// A connection to a Unix socket (a remote GPU's back end, a vfio-user device).
    ConnectUnix { path: PathBuf },
    /// A TCP connection (a remote GPU's back end).
    ConnectTcp { addr: SocketAddr },
    /// A listening TCP socket on the host's loopback (`--api-tcp`, `--vnc`).
    ListenTcp { addr: SocketAddr },
    /// A file to read (a VNC password file, a remote GPU's token file).
    OpenRead { path: PathBuf },
    /// A migration target's shared disk (the source's path).
    OpenDisk {
        path: PathBuf,
        writable: bool,
        direct: bool,
    },
    /// A migration target's TAP, in the host's network namespace or a named one.
    OpenTap { name: String, netns: Option<String> },
    /// The listening socket of the VM's vsock device at `path` (outside the jail).
    ListenVsock { path: PathBuf },
    /// A guest's connection to host port `port` of the vsock device listening at `path`:
    /// to the listener at `<path>_<port>` ([`vsock_port_path`]), without waiting.
    ConnectVsock { path: PathBuf, port: u32 },
}

impl Request {
    /// The request in a sentence, for errors and logs.
    pub fn describe(&self) -> String {
        match self {
            Request::ConnectUnix { path } => format!("a connection to {}", path.display()),
            Request::ConnectTcp { addr } => format!("a connection to {addr}"),
            Request::ListenTcp { addr } => format!("a TCP listener on {addr}"),
            Request::OpenRead { path } => format!("reading {}", path.display()),
            Request::OpenDisk { path, writable, .. } => format!(
                "disk {} ({})",
                path.display(),
                if *writable { "read-write" } else { "read-only" }
            ),
            Request::OpenTap { name, netns } => match netns {
                Some(ns) => format!("TAP {name} in network namespace {ns}"),
                None => format!("TAP {name}"),
            },
            Request::ListenVsock { path } => format!("the vsock socket {}", path.display()),
            Request::ConnectVsock { path, port } => format!(
                "a guest's vsock connection to {}",
                vsock_port_path(path, *port).display()
            ),
        }
    }
}

/// The keeper's answer: granted (the descriptor comes with it) or refused, saying why.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    Granted,
    Refused(String),
}

static KEEPER: OnceLock<Mutex<UnixDatagram>> = OnceLock::new();

/// Records this (jailed) process's end of the socket pair to its keeper; once, before
/// anything asks.
pub fn set_keeper(socket: UnixDatagram) -> io::Result<()> {
    socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    KEEPER
        .set(Mutex::new(socket))
        .map_err(|_| io::Error::other("the keeper's socket was set already"))
}

/// Whether this process asks a keeper (it is jailed).
pub fn has_keeper() -> bool {
    KEEPER.get().is_some()
}

/// Asks the keeper for `request`: the descriptor it opened, or why not.
fn ask(request: &Request) -> io::Result<OwnedFd> {
    let Some(keeper) = KEEPER.get() else {
        return Err(io::Error::other("this VMM has no keeper"));
    };
    let socket = keeper.lock().unwrap_or_else(|e| e.into_inner());
    let message = serde_json::to_vec(request).map_err(io::Error::other)?;
    socket.send(&message)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (n, file) = socket
        .recv_with_fd(&mut buf)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let reply: Reply = serde_json::from_slice(&buf[..n]).map_err(|e| {
        io::Error::other(format!(
            "the keeper's answer to {} is not one: {e}",
            request.describe()
        ))
    })?;
    match (reply, file) {
        (Reply::Granted, Some(f)) => Ok(f.into()),
        (Reply::Granted, None) => Err(io::Error::other(format!(
            "the keeper granted {} but sent no descriptor",
            request.describe()
        ))),
        (Reply::Refused(why), _) => Err(io::Error::new(io::ErrorKind::PermissionDenied, why)),
    }
}

/// Who opens a vsock device's host sockets: the VMM itself, or its keeper (a jailed VMM
/// whose device listens outside the jail).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opener {
    Own,
    Keeper,
}

/// Where the host listener of guest connections to `port` is, for a vsock device
/// listening at `path` (the hybrid convention): `<path>_<port>`.
pub fn vsock_port_path(path: &Path, port: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// Binds the Unix socket `path` for its owner alone (mode 0600: whoever connects reaches
/// the guest's services), non-blocking, replacing a stale socket file left by an ended
/// VMM (or the source of a migration on this host); anything else at the path is an
/// error.
pub fn bind_private(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the old {}: {e}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot make {} private: {e}", path.display()))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("cannot make {} non-blocking: {e}", path.display()))?;
    Ok(l)
}

/// The non-blocking listener of a vsock device at `path` ([`bind_private`]), bound by
/// `opener`.
pub fn listen_vsock(path: &Path, opener: Opener) -> Result<UnixListener, String> {
    let l = match opener {
        Opener::Own => return bind_private(path),
        Opener::Keeper => ask(&Request::ListenVsock {
            path: path.to_path_buf(),
        })
        .map(UnixListener::from)
        .map_err(|e| format!("the VMM's keeper cannot listen on {}: {e}", path.display()))?,
    };
    l.set_nonblocking(true)
        .map_err(|e| format!("cannot make {} non-blocking: {e}", path.display()))?;
    Ok(l)
}

/// A guest's connection to host port `port` of the vsock device listening at `path`,
/// made by `opener`, non-blocking. It does not wait: a listener whose backlog is full
/// refuses, as an absent one does, so the device's thread never stalls.
pub fn connect_vsock(path: &Path, port: u32, opener: Opener) -> io::Result<UnixStream> {
    let stream = match opener {
        Opener::Own => connect_unix_within(&vsock_port_path(path, port), Duration::ZERO)?,
        Opener::Keeper => ask(&Request::ConnectVsock {
            path: path.to_path_buf(),
            port,
        })
        .map(UnixStream::from)?,
    };
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// A connection to the Unix socket at `path`: the keeper's when jailed. Bounded by
/// [`CONNECT_TIMEOUT`] either way ([`connect_unix_within`]).
pub fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    if !has_keeper() {
        return connect_unix_within(path, CONNECT_TIMEOUT);
    }
    ask(&Request::ConnectUnix {
        path: path.to_path_buf(),
    })
    .map(UnixStream::from)
}

/// A connection to the Unix socket at `path` that gives up after `timeout` if the
/// listener's backlog stays full (a plain `connect` would wait until it accepts, for ever
/// if it never does: a keeper serves one request at a time); a zero `timeout` tries once.
/// Refused or missing sockets fail at once, as with `connect`.
pub fn connect_unix_within(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let name = path.as_os_str().as_bytes();
    if name.is_empty() || name.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: a Unix socket path is 1 to {} bytes",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of the size passed; `sock` is open.
        let r = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        // A non-blocking Unix connect says EAGAIN while the backlog is full.
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} accepted no connection in {} s (its backlog is full)",
                    path.display(),
                    timeout.as_secs_f64()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stream = UnixStream::from(sock);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// A TCP connection to `addr`: the keeper's when jailed (made in the host's network
/// namespace, bounded by [`CONNECT_TIMEOUT`]).
pub fn connect_tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    if !has_keeper() {
        return TcpStream::connect(addr);
    }
    ask(&Request::ConnectTcp { addr }).map(TcpStream::from)
}

/// A TCP listener on `addr`: the keeper's when jailed (bound in the host's network
/// namespace, so its loopback is the host's).
pub fn listen_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    if !has_keeper() {
        return TcpListener::bind(addr);
    }
    ask(&Request::ListenTcp { addr }).map(TcpListener::from)
}

/// A file opened for reading: by the keeper when jailed (a secret the host keeps private
/// to root, such as a VNC password or a back end's token file).
pub fn open_read(path: &Path) -> io::Result<File> {
    if !has_keeper() {
        return File::open(path);
    }
    ask(&Request::OpenRead {
        path: path.to_path_buf(),
    })
    .map(File::from)
}

/// A disk file outside the jail, opened by the keeper (jailed only: an unjailed VMM opens
/// its disks itself).
pub fn open_disk(path: &Path, writable: bool, direct: bool) -> io::Result<File> {
    ask(&Request::OpenDisk {
        path: path.to_path_buf(),
        writable,
        direct,
    })
    .map(File::from)
}

/// A TAP opened by the keeper in the host's namespace or `netns` (jailed only).
pub fn open_tap(name: &str, netns: Option<&str>) -> io::Result<File> {
    ask(&Request::OpenTap {
        name: name.to_string(),
        netns: netns.map(str::to_string),
    })
    .map(File::from)
}

/// The keeper's side: receives one request from `socket`, without waiting. `None` when
/// nothing is there; a message that is no request is answered as refused.
pub fn receive(socket: &UnixDatagram) -> io::Result<Option<Result<Request, String>>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    // SAFETY: MSG_DONTWAIT recv into our own buffer; descriptors a VMM may have attached
    // are not asked for (no control buffer), so the kernel discards them.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_TRUNC,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        };
    }
    let n = n as usize;
    if n > buf.len() {
        return Ok(Some(Err(format!(
            "a request of {n} bytes (at most {MAX_MESSAGE})"
        ))));
    }
    Ok(Some(
        serde_json::from_slice(&buf[..n]).map_err(|e| format!("not a request: {e}")),
    ))
}

/// The keeper's side: answers the last request, with `fd` when granted.
pub fn answer(socket: &UnixDatagram, result: Result<OwnedFd, String>) -> io::Result<()> {
    let (reply, fd) = match result {
        Ok(fd) => (Reply::Granted, Some(fd)),
        Err(why) => (Reply::Refused(why), None),
    };
    let mut message = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    message.truncate(MAX_MESSAGE);
    let fds: Vec<_> = fd.iter().map(AsRawFd::as_raw_fd).collect();
    socket
        .send_with_fds(&[&message[..]], &fds)
        .map(drop)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_connect_gives_up_on_a_full_backlog_and_fails_at_once_on_no_socket() {
        let dir = std::env::temp_dir().join(format!("ray-outside-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("full.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // SAFETY: listen() on a socket this test owns.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        // Nobody accepts: the backlog fills, then a connect waits and gives up.
        let mut held = Vec::new();
        let err = loop {
            match connect_unix_within(&path, Duration::from_millis(100)) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(
                held.len() < 16,
                "a backlog of 0 held {} connections",
                held.len()
            );
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("full.sock"), "{err}");
        // Once the listener accepts, a connection goes through and is blocking.
        drop(listener.accept().unwrap());
        let s = connect_unix_within(&path, Duration::from_secs(5)).unwrap();
        // SAFETY: F_GETFL on a descriptor the test owns.
        let flags = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "flags {flags:#x}");
        let missing = connect_unix_within(&dir.join("none.sock"), Duration::from_secs(5));
        assert_eq!(missing.unwrap_err().kind(), io::ErrorKind::NotFound);
        let long = dir.join("x".repeat(200));
        assert_eq!(
            connect_unix_within(&long, Duration::from_secs(5))
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidInput
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn requests_and_answers_cross_a_socket_pair_with_their_descriptor() {
        let (vmm, keeper) = UnixDatagram::pair().unwrap();
        let asked = Request::OpenDisk {
            path: "/srv/disks/a.img".into(),
            writable: true,
            direct: false,
        };
        vmm.send(&serde_json::to_vec(&asked).unwrap()).unwrap();
        assert_eq!(receive(&keeper).unwrap(), Some(Ok(asked.clone())));
        assert_eq!(receive(&keeper).unwrap(), None, "nothing more");
        // Granted: the descriptor arrives and is the file the keeper opened.
        let f = File::open("/proc/self/exe").unwrap();
        answer(&keeper, Ok(f.into())).unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (n, got) = vmm.recv_with_fd(&mut buf).unwrap();
        assert_eq!(
            serde_json::from_slice::<Reply>(&buf[..n]).unwrap(),
            Reply::Granted
        );
        assert!(got.unwrap().metadata().unwrap().len() > 0);
        // Refused: the reason, no descriptor.
        answer(&keeper, Err("not in the plan".into())).unwrap();
        let (n, got) = vmm.recv_with_fd(&mut buf).unwrap();
        assert_eq!(
            serde_json::from_slice::<Reply>(&buf[..n]).unwrap(),
            Reply::Refused("not in the plan".into())
        );
        assert!(got.is_none());
    }

    #[test]
    fn a_message_that_is_no_request_is_named_not_obeyed() {
        let (vmm, keeper) = UnixDatagram::pair().unwrap();
        for bad in [
            &br#"{"op":"format_disk","path":"/"}"#[..],
            br#"{"op":"connect_unix","path":"/x","extra":1}"#,
            b"\xff\xfe",
        ] {
            vmm.send(bad).unwrap();
            let got = receive(&keeper).unwrap().unwrap();
            assert!(got.unwrap_err().starts_with("not a request"));
        }
        vmm.send(&vec![b' '; MAX_MESSAGE + 10]).unwrap();
        let e = receive(&keeper).unwrap().unwrap().unwrap_err();
        assert!(e.contains(&format!("{} bytes", MAX_MESSAGE + 10)), "{e}");
    }

    #[test]
    fn unjailed_everything_is_opened_here() {
        assert!(!has_keeper());
        let l = listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        connect_tcp(addr).unwrap();
        let e = open_disk(Path::new("/dev/null"), false, false).unwrap_err();
        assert!(e.to_string().contains("no keeper"), "{e}");
    }
}
