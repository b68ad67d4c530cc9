//! Sockets for migration, in one place: endpoints (`HOST:PORT` for TCP between hosts,
//! `unix:PATH` for same-host moves), connecting, a listener for one incoming migration, and
//! the pre-shared key file.
//!
//! Streams get read and write timeouts so a peer that goes silent (killed host, cut cable)
//! turns into an error the drivers can roll back from, not a hang. [`Listener::accept`]
//! sleeps in poll(2) on the listening socket and an eventfd, nothing else: a [`Canceller`]
//! (or the migration's [`CancelToken`]) writes the eventfd and the accept returns at once;
//! an optional wait bounds it.
//!
//! A `unix:PATH` listener replaces only a stale socket at `PATH` (one nobody listens on:
//! connecting to it is refused); any other file there is an error and is left alone, and
//! the listener removes the socket when dropped only if it is still the one it bound.

use std::fs::{FileType, Metadata};
use std::io::{self, IoSlice, IoSliceMut, Read, Seek, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{KeyTooShort, PresharedKey};
use crate::progress::CancelToken;

/// Default read/write timeout on migration sockets.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest pre-shared key file [`read_key_file`] reads.
pub const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Where a migration goes to or listens on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `HOST:PORT` (a name or an address; `[v6]:port` works too).
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

/// A migration address that is neither `HOST:PORT` nor `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("migration address {address:?} names no socket path")]
    NoSocketPath { address: String },
    #[error("migration address {address:?} is neither HOST:PORT nor unix:/path")]
    Unrecognized { address: String },
    #[error("migration address {address:?} is neither HOST:PORT (port 0-65535) nor unix:/path")]
    BadHostOrPort { address: String },
}

impl From<EndpointError> for String {
    fn from(e: EndpointError) -> String {
        e.to_string()
    }
}

impl Endpoint {
    /// `unix:/path` or `HOST:PORT`.
    pub fn parse(s: &str) -> Result<Endpoint, EndpointError> {
        let address = || s.to_string();
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(EndpointError::NoSocketPath { address: address() });
            }
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(EndpointError::Unrecognized { address: address() });
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(EndpointError::BadHostOrPort { address: address() });
        }
        Ok(Endpoint::Tcp(s.to_string()))
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        Endpoint::parse(s)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => f.write_str(a),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A socket operation that failed; each names the endpoint or path and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot resolve {endpoint}: {source}")]
    Resolve {
        endpoint: Endpoint,
        source: io::Error,
    },
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: Endpoint,
        source: io::Error,
    },
    #[error("cannot listen on {endpoint}: {source}")]
    Bind {
        endpoint: Endpoint,
        source: io::Error,
    },
    #[error("cannot listen on unix:{}: it is a {kind}, not a socket; it was left in place", path.display())]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("cannot listen on unix:{}: a process is listening on that socket already", path.display())]
    SocketInUse { path: PathBuf },
    #[error("cannot listen on unix:{}: the socket there may be in use (connecting to it failed with: {source}); it was left in place", path.display())]
    SocketUnknown { path: PathBuf, source: io::Error },
    #[error("cannot remove the stale socket unix:{}: {source}", path.display())]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot set up {what} for {endpoint}: {source}")]
    Setup {
        endpoint: Endpoint,
        what: &'static str,
        source: io::Error,
    },
    #[error("waiting for a migration on {endpoint} was cancelled")]
    Cancelled { endpoint: Endpoint },
    #[error("no migration arrived on {endpoint} within {timeout:?}")]
    TimedOut {
        endpoint: Endpoint,
        timeout: Duration,
    },
    #[error("accepting a migration on {endpoint} failed: {source}")]
    Accept {
        endpoint: Endpoint,
        source: io::Error,
    },
}

/// A connected migration stream.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Blocking, with `timeout` on every read and write (and no Nagle delay on TCP:
    /// request/response frames are small and latency bound; page batches are large anyway).
    fn prepare(self, timeout: Duration) -> io::Result<Stream> {
        match &self {
            Stream::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
            }
            Stream::Unix(s) => s.set_nonblocking(false)?,
        }
        self.set_io_timeout(Some(timeout))?;
        Ok(self)
    }

    /// Sets the read and the write timeout (`None`: wait forever).
    pub fn set_io_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    /// Another handle on the same connection (e.g. one thread reads, another writes).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read_vectored(bufs),
            Stream::Unix(s) => s.read_vectored(bufs),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    /// Forwarded, not the default (which writes the first slice only): the sender puts a
    /// whole page batch, index and guest memory, into one `writev`.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// Connects to a migration target; the stream gets `timeout` for the connect (TCP) and for
/// every read and write.
pub fn connect(to: &Endpoint, timeout: Duration) -> Result<Stream, TransportError> {
    let failed = |source| TransportError::Connect {
        endpoint: to.clone(),
        source,
    };
    let stream = match to {
        Endpoint::Tcp(a) => {
            let addrs = a
                .as_str()
                .to_socket_addrs()
                .map_err(|source| TransportError::Resolve {
                    endpoint: to.clone(),
                    source,
                })?;
            let mut last = None;
            let mut connected = None;
            for addr in addrs {
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => {
                        connected = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            match connected {
                Some(s) => Stream::Tcp(s),
                None => {
                    return Err(failed(last.unwrap_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "the address resolved to nothing",
                        )
                    })))
                }
            }
        }
        Endpoint::Unix(p) => Stream::Unix(UnixStream::connect(p).map_err(failed)?),
    };
    stream
        .prepare(timeout)
        .map_err(|source| TransportError::Setup {
            endpoint: to.clone(),
            what: "the connection's options",
            source,
        })
}

/// A connection to `to` made by someone else (`ray` hands a jailed VMM the connection it
/// made in the host's network namespace): the descriptor must be a connected socket of
/// `to`'s kind; it gets `timeout` for every read and write, as [`connect`]'s do.
pub fn adopt(to: &Endpoint, fd: OwnedFd, timeout: Duration) -> Result<Stream, TransportError> {
    let setup = |source| TransportError::Setup {
        endpoint: to.clone(),
        what: "the handed connection",
        source,
    };
    let stream = match to {
        Endpoint::Tcp(_) => Stream::Tcp(TcpStream::from(fd)),
        Endpoint::Unix(_) => Stream::Unix(UnixStream::from(fd)),
    };
    // A descriptor of another kind, or not connected, fails here.
    let connected = match &stream {
        Stream::Tcp(s) => s.peer_addr().map(drop),
        Stream::Unix(s) => s.peer_addr().map(drop),
    };
    connected.map_err(setup)?;
    stream.prepare(timeout).map_err(setup)
}

/// An eventfd that turns readable, for good, when cancelled.
#[derive(Debug)]
struct Wake {
    fd: OwnedFd,
    cancelled: AtomicBool,
}

impl Wake {
    fn new() -> io::Result<Wake> {
        // SAFETY: eventfd takes no pointers; it returns a new descriptor or -1 (checked).
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Wake {
            // SAFETY: `fd` was just created by eventfd and nothing else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            cancelled: AtomicBool::new(false),
        })
    }

    fn wake(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`, which outlives the call, to the eventfd this
        // value owns. It fails only with EAGAIN when the counter is saturated, and then the
        // eventfd is readable already.
        let _ = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

/// Aborts a [`Listener::accept`] at once, from any thread: a blocked accept returns
/// [`TransportError::Cancelled`] within microseconds, and so does every later one (a
/// cancel is final). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Canceller(Arc<Wake>);

impl Canceller {
    pub fn cancel(&self) {
        self.0.wake();
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// A listener for one incoming migration.
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    /// As bound: the real port when asked for port 0.
    endpoint: Endpoint,
    wake: Arc<Wake>,
}

#[derive(Debug)]
enum Socket {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// (device, inode) of the socket file we bound: removed on drop only if still it.
        id: (u64, u64),
    },
}

impl Listener {
    /// Listens on `at`. For `unix:PATH`, an existing socket at `PATH` is replaced only if
    /// it is stale (connecting to it is refused: its listener is gone); a live socket or a
    /// file of any other kind (regular file, directory, symbolic link, FIFO, ...) is an
    /// error naming the path, and is left in place. (The probe of a live socket is a
    /// connection, closed at once, that its listener will accept.)
    pub fn bind(at: &Endpoint) -> Result<Listener, TransportError> {
        let setup = |what, source| TransportError::Setup {
            endpoint: at.clone(),
            what,
            source,
        };
        let wake = Arc::new(Wake::new().map_err(|e| setup("the cancel eventfd", e))?);
        let bind_failed = |source| TransportError::Bind {
            endpoint: at.clone(),
            source,
        };
        let (socket, endpoint) = match at {
            Endpoint::Tcp(a) => {
                let l = TcpListener::bind(a.as_str()).map_err(bind_failed)?;
                l.set_nonblocking(true)
                    .map_err(|e| setup("a non-blocking listener", e))?;
                let local = l.local_addr().map_err(|e| setup("the bound address", e))?;
                (Socket::Tcp(l), Endpoint::Tcp(local.to_string()))
            }
            Endpoint::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path).map_err(bind_failed)?;
                // From here the socket file is ours: removed again if setting up fails.
                let finish = || -> io::Result<(u64, u64)> {
                    listener.set_nonblocking(true)?;
                    // Only the VM's user may offer it a VM (the key is checked too).
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                    let m = std::fs::symlink_metadata(path)?;
                    Ok((m.dev(), m.ino()))
                };
                let id = match finish() {
                    Ok(id) => id,
                    Err(e) => {
                        drop(listener);
                        let _ = std::fs::remove_file(path);
                        return Err(setup("the bound socket", e));
                    }
                };
                (
                    Socket::Unix {
                        listener,
                        path: path.clone(),
                        id,
                    },
                    at.clone(),
                )
            }
        };
        Ok(Listener {
            socket,
            endpoint,
            wake,
        })
    }

    /// The listening socket, to hand to another process (a jailed migration target, which
    /// cannot bind in the host's network namespace nor see the host's paths): this side
    /// lets go of it without removing a Unix socket's file.
    pub fn into_handed(self) -> (OwnedFd, Endpoint) {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so each field is read out exactly once and
        // dropped (or returned) here; the Unix socket's file stays for the new holder.
        let (socket, endpoint, wake) = unsafe {
            (
                std::ptr::read(&this.socket),
                std::ptr::read(&this.endpoint),
                std::ptr::read(&this.wake),
            )
        };
        drop(wake);
        let fd = match socket {
            Socket::Tcp(l) => OwnedFd::from(l),
            Socket::Unix { listener, .. } => OwnedFd::from(listener),
        };
        (fd, endpoint)
    }

    /// A listener another process bound on `endpoint` and handed over as `fd`
    /// ([`Listener::into_handed`]). Its kind must match the endpoint's. A Unix socket's
    /// file is left where it is when this is dropped unless this process sees it.
    pub fn adopt(fd: OwnedFd, endpoint: Endpoint) -> Result<Listener, TransportError> {
        let setup = |what, source| TransportError::Setup {
            endpoint: endpoint.clone(),
            what,
            source,
        };
        let wake = Arc::new(Wake::new().map_err(|e| setup("the cancel eventfd", e))?);
        let mut ty: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let mut domain: libc::c_int = 0;
        let mut dlen = len;
        // SAFETY: getsockopt writes at most `len` bytes into the integers passed, which
        // live across the calls; `fd` is open (owned here).
        let ok = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut ty as *mut libc::c_int).cast(),
                &mut len,
            ) == 0
                && libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_DOMAIN,
                    (&mut domain as *mut libc::c_int).cast(),
                    &mut dlen,
                ) == 0
        };
        if !ok || ty != libc::SOCK_STREAM {
            return Err(setup(
                "the handed listener (not a stream socket)",
                io::Error::other("the descriptor handed over is not a listening stream socket"),
            ));
        }
        let socket = match (&endpoint, domain) {
            (Endpoint::Tcp(_), libc::AF_INET | libc::AF_INET6) => {
                let l = TcpListener::from(fd);
                l.set_nonblocking(true)
                    .map_err(|e| setup("a non-blocking listener", e))?;
                Socket::Tcp(l)
            }
            (Endpoint::Unix(path), libc::AF_UNIX) => {
                let listener = UnixListener::from(fd);
                listener
                    .set_nonblocking(true)
                    .map_err(|e| setup("a non-blocking listener", e))?;
                // The file may be out of sight (a jailed target): then its (0, 0) matches
                // nothing and it is not removed here.
                let id = std::fs::symlink_metadata(path).map_or((0, 0), |m| (m.dev(), m.ino()));
                Socket::Unix {
                    listener,
                    path: path.clone(),
                    id,
                }
            }
            _ => {
                return Err(setup(
                    "the handed listener",
                    io::Error::other(format!(
                        "the descriptor handed over is not a socket of {endpoint}'s kind"
                    )),
                ))
            }
        };
        Ok(Listener {
            socket,
            endpoint,
            wake,
        })
    }

    /// The bound endpoint (the real port when asked for port 0).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The bound endpoint as text: `HOST:PORT` or `unix:PATH`.
    pub fn local(&self) -> String {
        self.endpoint.to_string()
    }

    /// A handle that aborts this listener's accept from another thread.
    pub fn canceller(&self) -> Canceller {
        Canceller(self.wake.clone())
    }

    fn raw_fd(&self) -> RawFd {
        match &self.socket {
            Socket::Tcp(l) => l.as_raw_fd(),
            Socket::Unix { listener, .. } => listener.as_raw_fd(),
        }
    }

    /// Waits for one connection, blocked in poll(2) until one arrives, `cancel` (or a
    /// [`canceller`](Self::canceller)) is cancelled, or `wait` (if any) passes; the
    /// stream gets `io_timeout` for every read and write.
    pub fn accept(
        &self,
        cancel: &CancelToken,
        wait: Option<Duration>,
        io_timeout: Duration,
    ) -> Result<Stream, TransportError> {
        let _linked = cancel.wake_on_cancel(&self.canceller());
        let started = Instant::now();
        let failed = |source| TransportError::Accept {
            endpoint: self.endpoint.clone(),
            source,
        };
        loop {
            if self.wake.is_cancelled() || cancel.is_cancelled() {
                return Err(TransportError::Cancelled {
                    endpoint: self.endpoint.clone(),
                });
            }
            let accepted = match &self.socket {
                Socket::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                Socket::Unix { listener, .. } => listener.accept().map(|(s, _)| Stream::Unix(s)),
            };
            match accepted {
                Ok(s) => {
                    return s.prepare(io_timeout).map_err(|e| TransportError::Setup {
                        endpoint: self.endpoint.clone(),
                        what: "the connection's options",
                        source: e,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if retry_accept(&e) => continue,
                Err(e) => return Err(failed(e)),
            }
            let timeout_ms = match wait {
                None => -1,
                Some(w) => {
                    let left = w.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(TransportError::TimedOut {
                            endpoint: self.endpoint.clone(),
                            timeout: w,
                        });
                    }
                    // Rounded up, so the wait never ends a little early and spins.
                    left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32
                }
            };
            let mut fds = [
                libc::pollfd {
                    fd: self.raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll reads and writes only the two pollfds passed, which live on this
            // stack frame for the call; both descriptors are owned by `self` and stay open.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(failed(e));
                }
            }
        }
    }
}

/// Errors of accept(2) that concern one connection, not the listener: try the next one.
fn retry_accept(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
        || matches!(
            e.raw_os_error(),
            Some(
                libc::ECONNABORTED
                    | libc::EPROTO
                    | libc::ENETDOWN
                    | libc::ENOPROTOOPT
                    | libc::EHOSTDOWN
                    | libc::ENONET
                    | libc::EHOSTUNREACH
                    | libc::ENETUNREACH
            )
        )
}

/// Makes way for a socket at `path`: nothing there is fine; a stale socket is removed;
/// anything else is refused and left alone.
fn remove_stale_socket(path: &Path) -> Result<(), TransportError> {
    let found = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(TransportError::Bind {
                endpoint: Endpoint::Unix(path.to_path_buf()),
                source,
            })
        }
    };
    if !found.file_type().is_socket() {
        return Err(TransportError::NotASocket {
            path: path.to_path_buf(),
            kind: file_kind(found.file_type()),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => {
            return Err(TransportError::SocketInUse {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
        Err(source) => {
            return Err(TransportError::SocketUnknown {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    // Still the stale socket we probed (not replaced meanwhile)? Then it goes.
    match std::fs::symlink_metadata(path) {
        Ok(m) if same_file(&m, &found) => {
            std::fs::remove_file(path).map_err(|source| TransportError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(m) if !m.file_type().is_socket() => Err(TransportError::NotASocket {
            path: path.to_path_buf(),
            kind: file_kind(m.file_type()),
        }),
        Ok(_) => Err(TransportError::SocketInUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TransportError::Bind {
            endpoint: Endpoint::Unix(path.to_path_buf()),
            source,
        }),
    }
}

fn same_file(a: &Metadata, b: &Metadata) -> bool {
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Socket::Unix { path, id, .. } = &self.socket {
            let ours = std::fs::symlink_metadata(path)
                .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == *id);
            if ours {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// What a file is, as error messages name it.
fn file_kind(t: FileType) -> &'static str {
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_socket() {
        "socket"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// A pre-shared key file that could not be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot open the key file {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("the key file {} is a {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("the key file {} is {size} bytes, more than the {MAX_KEY_FILE_BYTES} a key file may have", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error("cannot read the key file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("the key file {}: {source}", path.display())]
    BadKey { path: PathBuf, source: KeyTooShort },
}

impl From<KeyFileError> for String {
    fn from(e: KeyFileError) -> String {
        e.to_string()
    }
}

/// A key file must be a regular file of at most [`MAX_KEY_FILE_BYTES`].
fn check_key_file(m: &Metadata, path: &Path) -> Result<(), KeyFileError> {
    if !m.file_type().is_file() {
        return Err(KeyFileError::NotRegular {
            path: path.to_path_buf(),
            kind: file_kind(m.file_type()),
        });
    }
    if m.len() > MAX_KEY_FILE_BYTES {
        return Err(KeyFileError::TooLarge {
            path: path.to_path_buf(),
            size: m.len(),
        });
    }
    Ok(())
}

/// Reads a pre-shared key file (surrounding ASCII whitespace is trimmed). Only a regular
/// file of at most [`MAX_KEY_FILE_BYTES`] is read; a FIFO, a device, a directory is
/// refused without reading from it, and nothing here blocks (the file is opened with
/// `O_NONBLOCK`, so even a FIFO swapped in after the first check does not wait for a writer).
pub fn read_key_file(path: &Path) -> Result<PresharedKey, KeyFileError> {
    let check = |m: &Metadata| check_key_file(m, path);
    // Checked before opening (opening some devices has effects), and again on what was
    // opened (the path may have changed in between).
    let before = std::fs::metadata(path).map_err(|source| KeyFileError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    check(&before)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| KeyFileError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    read_key_from(file, path)
}

/// Reads a pre-shared key from `file`, opened by someone else (`ray` hands a jailed VMM the
/// key file it opened), named `path` in errors; the same checks as [`read_key_file`].
pub fn read_key_from(file: std::fs::File, path: &Path) -> Result<PresharedKey, KeyFileError> {
    let check = |m: &Metadata| check_key_file(m, path);
    let read_failed = |source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    check(&file.metadata().map_err(read_failed)?)?;
    // A handed file may have been read already (its offset is shared with every copy).
    (&file).seek(io::SeekFrom::Start(0)).map_err(read_failed)?;
    let mut secret = Vec::with_capacity(MAX_KEY_FILE_BYTES as usize + 1);
    (&file)
        .take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut secret)
        .map_err(read_failed)?;
    if secret.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(KeyFileError::TooLarge {
            path: path.to_path_buf(),
            size: secret.len() as u64,
        });
    }
    let key = PresharedKey::new(secret.trim_ascii()).map_err(|source| KeyFileError::BadKey {
        path: path.to_path_buf(),
        source,
    });
    secret.fill(0);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    const T: Duration = Duration::from_secs(10);

    /// A fresh, empty directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ray-transport-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn echo_once(mut a: Stream, mut b: Stream) {
        a.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        let parts = [IoSlice::new(b"po"), IoSlice::new(b""), IoSlice::new(b"ng")];
        let n = b.write_vectored(&parts).unwrap();
        assert_eq!(n, 4, "a vectored write goes out whole");
        a.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[test]
    fn a_handed_listener_accepts_where_it_was_bound_and_its_kind_is_checked() {
        let dir = scratch("handed");
        let path = dir.join("m.sock");
        let unix = Listener::bind(&Endpoint::Unix(path.clone())).unwrap();
        let (fd, at) = unix.into_handed();
        assert!(
            path.exists(),
            "handing a listener over keeps its socket file"
        );
        let adopted = Listener::adopt(fd, at.clone()).unwrap();
        let client = connect(&at, T).unwrap();
        let served = adopted.accept(&CancelToken::new(), Some(T), T).unwrap();
        echo_once(client, served);
        drop(adopted);
        assert!(!path.exists(), "the adopter that sees the file removes it");

        let tcp = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into())).unwrap();
        let (fd, at) = tcp.into_handed();
        assert!(
            matches!(&at, Endpoint::Tcp(a) if !a.ends_with(":0")),
            "{at}"
        );
        let e = Listener::adopt(fd, Endpoint::Unix(path.clone())).unwrap_err();
        assert!(e.to_string().contains("kind"), "{e}");
        let file = std::fs::File::create(dir.join("f")).unwrap();
        let e = Listener::adopt(OwnedFd::from(file), at).unwrap_err();
        assert!(e.to_string().contains("not a"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn endpoints_parse_or_say_what_is_wrong() {
        assert_eq!(
            Endpoint::parse("10.0.0.2:7000").unwrap(),
            Endpoint::Tcp("10.0.0.2:7000".into())
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/m.sock".into())
        );
        for s in ["10.0.0.2:7000", "unix:/run/m.sock", "[::1]:80"] {
            assert_eq!(Endpoint::parse(s).unwrap().to_string(), s);
        }
        let e = Endpoint::parse("10.0.0.2").unwrap_err();
        assert!(e.to_string().contains("neither HOST:PORT"), "{e}");
        assert!(e.to_string().contains("\"10.0.0.2\""), "{e}");
        let e: String = Endpoint::parse("h:99999").unwrap_err().into();
        assert!(e.contains("65535") && e.contains("h:99999"), "{e}");
        assert!(Endpoint::parse(":80").is_err());
        let e = Endpoint::parse("unix:").unwrap_err();
        assert!(e.to_string().contains("no socket path"), "{e}");
    }

    #[test]
    fn tcp_connects_accepts_and_carries_bytes_both_ways() {
        let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into())).unwrap();
        let at = l.endpoint().clone();
        assert!(!l.local().ends_with(":0"), "the real port: {}", l.local());
        let a = connect(&at, T).unwrap();
        let b = l.accept(&CancelToken::new(), Some(T), T).unwrap();
        let Stream::Tcp(t) = &b else {
            panic!("not TCP")
        };
        assert!(t.nodelay().unwrap());
        assert_eq!(t.read_timeout().unwrap(), Some(T));
        echo_once(a, b);
        // Nobody listens there any more.
        drop(l);
        let e = connect(&at, T).unwrap_err();
        assert!(matches!(e, TransportError::Connect { .. }), "{e}");
        assert!(e.to_string().contains(&at.to_string()), "{e}");
    }

    #[test]
    fn unix_sockets_carry_bytes_and_are_removed_when_dropped() {
        let dir = scratch("unix");
        let at = Endpoint::Unix(dir.join("m.sock"));
        let l = Listener::bind(&at).unwrap();
        assert_eq!(l.local(), format!("unix:{}", dir.join("m.sock").display()));
        let a = connect(&at, T).unwrap();
        let b = l.accept(&CancelToken::new(), None, T).unwrap();
        echo_once(a, b);
        drop(l);
        assert!(!dir.join("m.sock").exists(), "our socket is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced_but_a_live_one_is_not() {
        let dir = scratch("stale");
        let path = dir.join("m.sock");
        // A listener that died without cleaning up: the file stays, connecting is refused.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let l = Listener::bind(&Endpoint::Unix(path.clone())).unwrap();
        let a = connect(&Endpoint::Unix(path.clone()), T).unwrap();
        let b = l.accept(&CancelToken::new(), Some(T), T).unwrap();
        echo_once(a, b);
        // While `l` listens, a second bind is refused and leaves `l` working (its probe is
        // a connection, queued behind the one that came first).
        let a = connect(&Endpoint::Unix(path.clone()), T).unwrap();
        let e = Listener::bind(&Endpoint::Unix(path.clone())).unwrap_err();
        assert!(matches!(e, TransportError::SocketInUse { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert!(path.exists());
        let b = l.accept(&CancelToken::new(), Some(T), T).unwrap();
        echo_once(a, b);
        drop(l);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn other_files_at_the_socket_path_are_refused_and_left_alone() {
        let dir = scratch("not-a-socket");
        let file = dir.join("precious");
        std::fs::write(&file, b"do not delete").unwrap();
        let e = Listener::bind(&Endpoint::Unix(file.clone())).unwrap_err();
        assert!(
            matches!(
                e,
                TransportError::NotASocket {
                    kind: "regular file",
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&file.display().to_string()) && msg.contains("regular file"),
            "{msg}"
        );
        assert_eq!(
            std::fs::read(&file).unwrap(),
            b"do not delete",
            "the file survives"
        );

        let sub = dir.join("a-directory");
        std::fs::create_dir(&sub).unwrap();
        let e = Listener::bind(&Endpoint::Unix(sub.clone())).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        assert!(sub.is_dir());

        // A link to a stale socket is a link, not a socket: refused, and the link and its
        // target both stay.
        let sock = dir.join("stale.sock");
        drop(UnixListener::bind(&sock).unwrap());
        let link = dir.join("link");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        let e = Listener::bind(&Endpoint::Unix(link.clone())).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(link.symlink_metadata().is_ok() && sock.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dropping_a_listener_leaves_a_socket_that_replaced_its_own() {
        let dir = scratch("replaced");
        let path = dir.join("m.sock");
        let ours = Listener::bind(&Endpoint::Unix(path.clone())).unwrap();
        std::fs::remove_file(&path).unwrap();
        let theirs = UnixListener::bind(&path).unwrap();
        drop(ours);
        assert!(path.exists(), "another listener's socket was removed");
        let _c = UnixStream::connect(&path).unwrap();
        assert!(theirs.accept().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Blocks in accept on another thread; returns how long after `cancel` it returned.
    fn cancel_wakes(cancel: impl FnOnce(&Listener, &CancelToken)) -> (TransportError, Duration) {
        let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into())).unwrap();
        let token = CancelToken::new();
        let (tx, rx) = mpsc::channel();
        thread::scope(|s| {
            let (l, token) = (&l, &token);
            s.spawn(move || {
                let r = l.accept(token, None, T);
                tx.send((r.map(|_| ()), Instant::now())).unwrap();
            });
            // Let it block in poll.
            thread::sleep(Duration::from_millis(50));
            assert!(rx.try_recv().is_err(), "accept returned before the cancel");
            let t = Instant::now();
            cancel(l, token);
            let (r, woke) = rx
                .recv_timeout(T)
                .expect("the cancel did not wake the accept");
            (r.unwrap_err(), woke.saturating_duration_since(t))
        })
    }

    #[test]
    fn a_canceller_wakes_a_blocked_accept_at_once() {
        let (e, after) = cancel_wakes(|l, _| l.canceller().cancel());
        assert!(matches!(e, TransportError::Cancelled { .. }), "{e}");
        assert!(e.to_string().contains("127.0.0.1:"), "{e}");
        assert!(
            after < Duration::from_millis(20),
            "woke {after:?} after the cancel"
        );
    }

    #[test]
    fn the_migrations_cancel_token_wakes_a_blocked_accept_at_once() {
        let (e, after) = cancel_wakes(|_, token| token.cancel());
        assert!(matches!(e, TransportError::Cancelled { .. }), "{e}");
        assert!(
            after < Duration::from_millis(20),
            "woke {after:?} after the cancel"
        );
    }

    #[test]
    fn a_cancel_before_the_accept_is_not_lost() {
        let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into())).unwrap();
        let token = CancelToken::new();
        token.cancel();
        let e = l.accept(&token, None, T).unwrap_err();
        assert!(matches!(e, TransportError::Cancelled { .. }), "{e}");
        let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into())).unwrap();
        let c = l.canceller();
        c.cancel();
        assert!(c.is_cancelled());
        let e = l.accept(&CancelToken::new(), Some(T), T).unwrap_err();
        assert!(matches!(e, TransportError::Cancelled { .. }), "{e}");
    }

    #[test]
    fn an_accept_that_waits_too_long_names_the_timeout() {
        let dir = scratch("deadline");
        let at = Endpoint::Unix(dir.join("m.sock"));
        let l = Listener::bind(&at).unwrap();
        let t = Instant::now();
        let e = l
            .accept(&CancelToken::new(), Some(Duration::from_millis(30)), T)
            .unwrap_err();
        let took = t.elapsed();
        assert!(matches!(e, TransportError::TimedOut { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("within 30ms") && msg.contains(&at.to_string()),
            "{msg}"
        );
        assert!(
            took >= Duration::from_millis(30) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // A connection waiting already is taken even with no time left to wait.
        let _a = connect(&at, T).unwrap();
        assert!(l
            .accept(&CancelToken::new(), Some(Duration::ZERO), T)
            .is_ok());
        drop(l);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Runs `read_key_file` on another thread so that a regression that blocks fails the
    /// test instead of hanging it.
    fn read_key_quickly(path: &Path) -> Result<PresharedKey, KeyFileError> {
        let (tx, rx) = mpsc::channel();
        let p = path.to_path_buf();
        thread::spawn(move || {
            let _ = tx.send(read_key_file(&p));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("read_key_file blocked")
    }

    #[test]
    fn key_files_must_be_small_regular_files() {
        let dir = scratch("keys");
        let good = dir.join("good");
        std::fs::write(&good, b"  correct horse battery staple\n").unwrap();
        let k = read_key_quickly(&good).unwrap();
        let same = PresharedKey::new(b"correct horse battery staple").unwrap();
        assert_eq!(
            k.bytes(),
            same.bytes(),
            "whitespace around the key is trimmed"
        );

        let short = dir.join("short");
        std::fs::write(&short, b"tiny\n").unwrap();
        let e = read_key_quickly(&short).unwrap_err();
        assert!(matches!(e, KeyFileError::BadKey { .. }), "{e}");
        assert!(e.to_string().contains(&short.display().to_string()), "{e}");

        let big = dir.join("big");
        std::fs::write(&big, vec![b'k'; MAX_KEY_FILE_BYTES as usize + 1]).unwrap();
        let e = read_key_quickly(&big).unwrap_err();
        assert!(
            matches!(e, KeyFileError::TooLarge { size: 4097, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("4097 bytes"), "{e}");

        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, which lives across the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_key_quickly(&fifo).unwrap_err();
        assert!(
            matches!(e, KeyFileError::NotRegular { kind: "FIFO", .. }),
            "{e}"
        );
        assert!(e.to_string().contains(&fifo.display().to_string()), "{e}");

        let e = read_key_quickly(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the key file /dev/zero is a character device, not a regular file"
        );

        let e = read_key_quickly(&dir).unwrap_err();
        assert!(
            matches!(
                e,
                KeyFileError::NotRegular {
                    kind: "directory",
                    ..
                }
            ),
            "{e}"
        );

        let e = read_key_quickly(&dir.join("missing")).unwrap_err();
        assert!(matches!(e, KeyFileError::Open { .. }), "{e}");
        let msg: String = e.into();
        assert!(msg.contains("missing"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
