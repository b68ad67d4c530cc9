//! `ray web`: a dashboard and browser consoles for the VMs of one host, and (given the
//! cluster store) a page of the cluster's hosts with cordon and drain (`hosts.rs`); a
//! low-bandwidth viewer gets a display's H.264 stream (`h264.rs`).
//!
//! The server is a client of the existing per-VM APIs (each VMM's `api.sock`): it lists
//! VMs from the runtime directory, relays reads and actions to their VMMs, bridges
//! WebSockets to the VNC sockets and the serial console stream, and starts VMMs for
//! actions that need a new one (create, restore, migration target) by running this same
//! `ray` binary. It keeps no state of its own beyond the migrations it started.
//!
//! Access: a login with a token from the tokens file ([`tokens`]) sets an HttpOnly,
//! SameSite=Strict cookie; every `/api` request is checked against the user's role here,
//! on the server. Without TLS only loopback addresses are served and requests whose `Host`
//! is not a loopback name are refused (DNS rebinding); any other address needs a
//! certificate and key ([`tls`]), and then the server speaks HTTPS and WSS only.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ray_api::vmm::VmStateName;

mod actions;
mod api;
mod assets;
mod bridge;
mod h264;
mod hosts;
pub mod tls;
pub mod tokens;
mod vmm;

pub use tls::TlsFiles;
pub use tokens::{Role, Tokens, User};

/// What the runtime directory says about one VM (the `ray` binary reads it).
#[derive(Clone, Debug)]
pub enum Presence {
    /// Its VMM runs and has an API socket.
    Live,
    /// Its VMM ended and left an exit record.
    Ended {
        state: VmStateName,
        reason: Option<String>,
    },
    /// Its VMM is gone without a record.
    Dead,
}

/// One VM directory.
#[derive(Clone, Debug)]
pub struct VmEntry {
    pub id: String,
    pub dir: PathBuf,
    pub presence: Presence,
}

/// The VMs of the runtime directory, as `ray vm list` sees them.
pub trait Inventory: Send + Sync + 'static {
    fn vms(&self) -> Vec<VmEntry>;
}

/// How `ray web` runs.
pub struct WebOptions {
    pub listen: SocketAddr,
    pub tokens: Tokens,
    pub inventory: Arc<dyn Inventory>,
    /// The `ray` binary, run for actions that start a VMM.
    pub ray_exe: PathBuf,
    /// The runtime directory those `ray` runs use.
    pub runtime_dir: PathBuf,
    /// Where snapshots taken from the page go (one store per VM) and migration keys live.
    pub state_dir: PathBuf,
    /// Serve HTTPS with this certificate and key (required beyond loopback).
    pub tls: Option<TlsFiles>,
    /// The cluster store, for the hosts page (`None`: this host's VMs only).
    pub cluster: Option<ray_cluster::store::AnyStore>,
}

/// Why `ray web` could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("ray web serves {0}, which is not a loopback address (127.0.0.0/8, ::1), only over TLS: give --tls-cert PEM and --tls-key PEM")]
    NotLoopback(SocketAddr),
    #[error("{flag} {path}: {reason}")]
    Tls {
        flag: &'static str,
        path: String,
        reason: String,
    },
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("cannot create the state directory {path}: {reason}")]
    StateDir { path: String, reason: String },
    #[error("the web server stopped: {0}")]
    Serve(String),
}

/// Checks the options (the address, the TLS files), binds and calls `ready` with the bound
/// address (port 0 picks one), then serves until the process ends.
pub async fn serve(opts: WebOptions, ready: impl FnOnce(SocketAddr)) -> Result<(), WebError> {
    if !opts.listen.ip().is_loopback() && opts.tls.is_none() {
        return Err(WebError::NotLoopback(opts.listen));
    }
    let tls = opts.tls.as_ref().map(tls::server_config).transpose()?;
    std::fs::create_dir_all(&opts.state_dir).map_err(|e| WebError::StateDir {
        path: opts.state_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| WebError::Listen {
            addr: opts.listen,
            reason: e.to_string(),
        })?;
    let addr = listener.local_addr().map_err(|e| WebError::Listen {
        addr: opts.listen,
        reason: e.to_string(),
    })?;
    let app = api::router(Arc::new(api::Web::new(opts)));
    let served = match tls {
        Some(config) => {
            let listener =
                tls::TlsListener::new(listener, config).map_err(|e| WebError::Listen {
                    addr,
                    reason: e.to_string(),
                })?;
            ready(addr);
            axum::serve(listener, app).await
        }
        None => {
            ready(addr);
            axum::serve(listener, app).await
        }
    };
    served.map_err(|e| WebError::Serve(e.to_string()))
}
