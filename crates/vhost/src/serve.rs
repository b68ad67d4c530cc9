//! The listening socket: one front end at a time, each with a fresh device model and a
//! fresh session. A front end that leaves, or that the protocol layer refuses (a malformed
//! message, a bad memory table, a queue index out of range), ends its session with one log
//! line saying why; the socket then takes the next front end.
use std::path::Path;

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{Backend, MakeDevice};

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
    let path = socket.display().to_string();
    let mut listener = Listener::new(socket, true).map_err(|e| ServeError::Listen {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    tracing::info!("{name}: serving on {path}; waiting for a front end");
    let mut served = 0usize;
    loop {
        let backend = Backend::new(name, make.clone()).map_err(ServeError::Device)?;
        let mut daemon = VhostUserDaemon::new(
            name.to_string(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Device(format!("cannot start a session: {e}")))?;
        daemon
            .start(&mut listener)
            .map_err(|e| ServeError::Accept {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        served += 1;
        tracing::info!("{name}: front end {served} connected");
        match daemon.wait() {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => tracing::info!("{name}: front end {served} left"),
            Err(e) => tracing::warn!("{name}: front end {served} refused and disconnected: {e}"),
        }
        // Dropping the session stops its threads and the model's, and unmaps its memory.
        drop(daemon);
        tracing::info!("{name}: waiting for the next front end on {path}");
    }
}
