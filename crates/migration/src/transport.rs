//! Sockets for migration: TCP between hosts, Unix sockets for same-host moves.
//!
//! Both get read and write timeouts so a peer that goes silent (killed host, cut cable)
//! turns into an error the drivers can roll back from, not a hang.

use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// Default read/write timeout on migration sockets.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to a target and prepares the socket for bulk transfer.
pub fn connect_tcp<A: ToSocketAddrs>(addr: A, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return prepare_tcp(s, timeout),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolved to nothing",
        )
    }))
}

/// Accepts one incoming migration.
pub fn accept_tcp(listener: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    let (s, _) = listener.accept()?;
    prepare_tcp(s, timeout)
}

fn prepare_tcp(s: TcpStream, timeout: Duration) -> io::Result<TcpStream> {
    // Request/response frames are small and latency bound; page batches are large anyway.
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

pub fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

pub fn accept_unix(listener: &UnixListener, timeout: Duration) -> io::Result<UnixStream> {
    let (s, _) = listener.accept()?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}
