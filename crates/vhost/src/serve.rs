//! The listening socket: one front end at a time, each with a fresh device model and a
//! fresh session. A front end that leaves, or that the protocol layer refuses (a malformed
//! message, a bad memory table, a queue index out of range), ends its session with one log
//! line saying why; the socket then takes the next front end. Each front end's messages
//! reach the protocol layer through [`crate::order::relay`].
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{Backend, GpuSocketHook, MakeDevice};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {path}: {reason}")]
    Listen { path: String, reason: String },
    #[error("cannot accept a front end on {path}: {reason}")]
    Accept { path: String, reason: String },
    #[error("{0}")]
    Device(String),
}

/// Serves `make`'s model on the Unix socket `socket` (replaced if it exists), one front end
/// after another; returns only when the socket fails.
pub fn serve(name: &'static str, socket: &Path, make: MakeDevice) -> Result<(), ServeError> {
    serve_with(name, socket, make, None)
}

/// [`serve`], with `gpu_socket` taking the display socket of a vhost-user-gpu front end.
pub fn serve_with(
    name: &'static str,
    socket: &Path,
    make: MakeDevice,
    gpu_socket: Option<GpuSocketHook>,
) -> Result<(), ServeError> {
    let path = socket.display().to_string();
    let listener = Listener::new(socket, true).map_err(|e| ServeError::Listen {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    tracing::info!("{name}: serving on {path}; waiting for a front end");
    let mut served = 0usize;
    loop {
        let backend = Backend::new(name, make.clone())
            .map_err(ServeError::Device)?
            .with_gpu_socket(gpu_socket.clone());
        let mut daemon = VhostUserDaemon::new(
            name.to_string(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Device(format!("cannot start a session: {e}")))?;
        let accept_error = |e: std::io::Error| ServeError::Accept {
            path: path.clone(),
            reason: e.to_string(),
        };
        let front = accept(&listener).map_err(accept_error)?;
        let (mut inner, back) = private_pair().map_err(accept_error)?;
        daemon.start(&mut inner).map_err(|e| ServeError::Accept {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let relay = std::thread::Builder::new()
            .name(format!("{name}-relay"))
            .spawn(move || crate::order::relay(front, back))
            .map_err(accept_error)?;
        served += 1;
        tracing::info!("{name}: front end {served} connected");
        match daemon.wait() {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => tracing::info!("{name}: front end {served} left"),
            Err(e) => tracing::warn!("{name}: front end {served} refused and disconnected: {e}"),
        }
        match relay.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{name}: front end {served}: {e}"),
            Err(_) => tracing::warn!("{name}: front end {served}: the relay thread panicked"),
        }
        // Dropping the session stops its threads and the model's, and unmaps its memory.
        drop(daemon);
        tracing::info!("{name}: waiting for the next front end on {path}");
    }
}

/// The next front end on `listener`.
fn accept(listener: &Listener) -> std::io::Result<UnixStream> {
    loop {
        match listener.accept() {
            Ok(Some(stream)) => return Ok(stream),
            Ok(None) => continue,
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
    }
}

/// A listener only this process knows (an abstract socket name, nothing on disk) and a
/// stream already connected to it: the protocol layer accepts the stream, the relay writes
/// into it.
fn private_pair() -> std::io::Result<(Listener, UnixStream)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "ray-vhost-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let stream = UnixStream::connect_addr(&addr)?;
    Ok((Listener::from(listener), stream))
}
