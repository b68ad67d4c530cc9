//! The keeper's side of what a jailed VMM asks for outside its jail ([`ray_outside`]):
//! connections to the back ends its plan names, TCP listeners on the addresses its plan
//! names, and for a migration target the shared disks under the directories it was given
//! and the TAPs of the VM a source sends. Anything else is refused, naming what was asked
//! and what the plan allows.
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use ray_outside::Request;
use serde::{Deserialize, Serialize};

/// How many TCP listeners one VMM may be given (its API and a VNC port per display).
const MAX_LISTENERS: usize = 32;

/// Ports above a planned one a VMM may listen on (VNC's display N is on port + N).
const PORT_SPAN: u16 = 16;

/// One back end a VMM may connect to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A disk of the VM, which its keeper opens for it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PlannedDisk {
    pub path: PathBuf,
    pub writable: bool,
}

/// What a jailed VMM may ask its keeper to open (part of its [`super::Plan`]).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Outside {
    /// Back ends it connects to: remote GPUs, vfio-user devices.
    #[serde(default)]
    pub connect: Vec<Endpoint>,
    /// Loopback addresses it listens on (port 0: any free port; else that port and the
    /// next [`PORT_SPAN`] - 1, one per display).
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    /// Files it reads (a VNC password file, a remote GPU's token file), left private to
    /// their owner.
    #[serde(default)]
    pub read: Vec<PathBuf>,
    /// The VM's disks (read-only ones only for reading).
    #[serde(default)]
    pub disks: Vec<PlannedDisk>,
    /// A migration target: directories holding the shared disks it may open.
    #[serde(default)]
    pub shared_dirs: Vec<PathBuf>,
    /// A migration target: it may attach to the TAPs of the VM a source sends.
    #[serde(default)]
    pub taps: bool,
    /// A VM whose NICs are in several network namespaces (its VMM is in one of its own):
    /// the TAPs it may attach to, each with its namespace (`None`: the host's).
    #[serde(default)]
    pub nics: Vec<(String, Option<String>)>,
    /// The VM's vsock socket when it is outside the jail: the keeper binds it and makes
    /// the guest's connections to the host listeners beside it (`<socket>_<port>`).
    #[serde(default)]
    pub vsock: Option<PathBuf>,
}

/// The keeper's end of the socket pair, with what it granted so far.
pub struct Keeper<'a> {
    socket: UnixDatagram,
    outside: &'a Outside,
    /// The VM's uid and gid: a TAP that exists is attached with their rights.
    owner: (u32, u32),
    /// Addresses of the listeners granted (the VMM may connect to its own, to wake a
    /// thread blocked in accept).
    listening: Vec<SocketAddr>,
}

impl<'a> Keeper<'a> {
    pub fn new(socket: UnixDatagram, outside: &'a Outside, owner: (u32, u32)) -> Self {
        Keeper {
            socket,
            outside,
            owner,
            listening: Vec::new(),
        }
    }

    pub fn socket(&self) -> &UnixDatagram {
        &self.socket
    }

    /// Answers every request waiting on the socket.
    pub fn serve(&mut self) {
        loop {
            let request = match ray_outside::receive(&self.socket) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("cannot read the jailed VMM's request: {e}");
                    return;
                }
            };
            let result = request.and_then(|r| {
                let what = r.describe();
                self.open(&r).inspect_err(|why| match r {
                    // The guest picks the port: a port nobody listens on is the guest's
                    // business (it gets a reset), not the host's.
                    Request::ConnectVsock { .. } => {
                        tracing::debug!("refused the jailed VMM {what}: {why}")
                    }
                    _ => tracing::warn!("refused the jailed VMM {what}: {why}"),
                })
            });
            if let Err(e) = ray_outside::answer(&self.socket, result) {
                tracing::warn!("cannot answer the jailed VMM: {e}");
                return;
            }
        }
    }

    /// Opens what `request` asks for if the plan allows it.
    pub fn open(&mut self, request: &Request) -> Result<OwnedFd, String> {
        match request {
            Request::ConnectUnix { path } => {
                if !self.outside.connect.contains(&Endpoint::Unix(path.clone())) {
                    return Err(self.not_planned(request));
                }
                ray_outside::connect_unix_within(path, ray_outside::CONNECT_TIMEOUT)
                    .map(OwnedFd::from)
                    .map_err(|e| format!("cannot connect to {}: {e}", path.display()))
            }
            Request::ConnectTcp { addr } => {
                if !self.outside.connect.contains(&Endpoint::Tcp(*addr))
                    && !self.listening.contains(addr)
                {
                    return Err(self.not_planned(request));
                }
                TcpStream::connect_timeout(addr, ray_outside::CONNECT_TIMEOUT)
                    .map(OwnedFd::from)
                    .map_err(|e| format!("cannot connect to {addr}: {e}"))
            }
            Request::ListenTcp { addr } => {
                if !self
                    .outside
                    .listen
                    .iter()
                    .any(|p| listen_allowed(*p, *addr))
                {
                    return Err(self.not_planned(request));
                }
                if self.listening.len() >= MAX_LISTENERS {
                    return Err(format!("it holds {MAX_LISTENERS} TCP listeners already"));
                }
                let l =
                    TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                let local = l.local_addr().map_err(|e| e.to_string())?;
                self.listening.push(local);
                Ok(l.into())
            }
            Request::OpenRead { path } => {
                if !self.outside.read.contains(path) {
                    return Err(self.not_planned(request));
                }
                std::fs::File::open(path)
                    .map(OwnedFd::from)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))
            }
            Request::OpenDisk {
                path,
                writable,
                direct,
            } => {
                let planned = self
                    .outside
                    .disks
                    .iter()
                    .find(|d| &d.path == path && (d.writable || !writable));
                match planned {
                    Some(_) => open_disk(path, *writable, *direct),
                    None if self.outside.shared_dirs.is_empty() && !self.outside.taps => {
                        Err(self.not_planned(request))
                    }
                    None => open_shared_disk(&self.outside.shared_dirs, path, *writable, *direct),
                }
            }
            Request::OpenTap { name, netns } => {
                let planned = self
                    .outside
                    .nics
                    .iter()
                    .any(|(t, ns)| t == name && ns == netns);
                if !self.outside.taps && !planned {
                    return Err(self.not_planned(request));
                }
                open_tap(name, netns.as_deref(), self.owner).map(OwnedFd::from)
            }
            Request::ListenVsock { path } => {
                if self.outside.vsock.as_ref() != Some(path) {
                    return Err(self.not_planned(request));
                }
                ray_outside::bind_private(path).map(OwnedFd::from)
            }
            Request::ConnectVsock { path, port } => {
                if self.outside.vsock.as_ref() != Some(path) {
                    return Err(self.not_planned(request));
                }
                let at = ray_outside::vsock_port_path(path, *port);
                ray_outside::connect_unix_within(&at, std::time::Duration::ZERO)
                    .map(OwnedFd::from)
                    .map_err(|e| format!("cannot connect to {}: {e}", at.display()))
            }
        }
    }

    fn not_planned(&self, request: &Request) -> String {
        let connect: Vec<String> = self
            .outside
            .connect
            .iter()
            .map(|e| match e {
                Endpoint::Unix(p) => p.display().to_string(),
                Endpoint::Tcp(a) => a.to_string(),
            })
            .collect();
        let listen: Vec<String> = self.outside.listen.iter().map(|a| a.to_string()).collect();
        let list = |v: &[String]| match v.is_empty() {
            true => "nothing".to_string(),
            false => v.join(", "),
        };
        let read: Vec<String> = self
            .outside
            .read
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!(
            "the VM's jail does not allow {} (it may connect to {}, listen on {}, read {}{}{})",
            request.describe(),
            list(&connect),
            list(&listen),
            list(&read),
            match &self.outside.vsock {
                Some(p) => format!(", serve the vsock socket {}", p.display()),
                None => String::new(),
            },
            match (self.outside.taps, self.outside.nics.is_empty()) {
                (true, _) => ", and attach to TAPs".to_string(),
                (false, false) => format!(
                    ", and attach to TAPs {}",
                    self.outside
                        .nics
                        .iter()
                        .map(|(t, ns)| format!("{t} in {}", ns.as_deref().unwrap_or("the host's")))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                (false, true) => String::new(),
            }
        )
    }
}

/// Whether a VMM planned to listen on `planned` may listen on `asked`.
fn listen_allowed(planned: SocketAddr, asked: SocketAddr) -> bool {
    planned.ip() == asked.ip()
        && match planned.port() {
            0 => asked.port() == 0,
            p => (p..p.saturating_add(PORT_SPAN)).contains(&asked.port()),
        }
}

/// Opens `path` for a migration target if it is a regular file or block device under one
/// of `dirs` (symbolic links resolved first, so none leads out).
fn open_shared_disk(
    dirs: &[PathBuf],
    path: &Path,
    writable: bool,
    direct: bool,
) -> Result<OwnedFd, String> {
    let real = std::fs::canonicalize(path)
        .map_err(|e| format!("cannot resolve the shared disk {}: {e}", path.display()))?;
    let inside = dirs.iter().any(|d| {
        std::fs::canonicalize(d)
            .map(|d| real.starts_with(d))
            .unwrap_or(false)
    });
    if !inside {
        return Err(format!(
            "the shared disk {} is not under a directory the target was given ({}; `ray migrate receive --shared-dir DIR`)",
            path.display(),
            match dirs.is_empty() {
                true => "none".to_string(),
                false => dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        ));
    }
    open_disk(&real, writable, direct)
}

/// Opens the disk at `path` (no symbolic link as its last part), which must be a regular
/// file or a block device.
fn open_disk(path: &Path, writable: bool, direct: bool) -> Result<OwnedFd, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NOFOLLOW | if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .map_err(|e| format!("cannot open disk {}: {e}", path.display()))?;
    let kind = file.metadata().map_err(|e| e.to_string())?.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(format!(
            "disk {} is neither a file nor a block device",
            path.display()
        ));
    }
    Ok(file.into())
}

/// Opens TAP `name` (in network namespace `netns`, else the keeper's) for the VMM: one
/// that exists with the VM's rights (`owner`), so the kernel refuses a TAP owned by
/// someone else as it would the VMM itself; a missing one is made (it goes with the
/// VMM's descriptor, as an unjailed target's would).
fn open_tap(name: &str, netns: Option<&str>, owner: (u32, u32)) -> Result<std::fs::File, String> {
    if name.is_empty() || name.len() > 15 || name.contains(['/', '\0']) || name.trim() != name {
        return Err(format!("'{name}' is no TAP name"));
    }
    let ns = match netns {
        Some(ns) if ns.is_empty() || ns.contains(['/', '\0']) || ns == "." || ns == ".." => {
            return Err(format!("'{ns}' is no network namespace name"))
        }
        Some(ns) => Some(PathBuf::from("/run/netns").join(ns)),
        None => None,
    };
    let name = name.to_string();
    let (uid, gid) = owner;
    // Its own thread: entering a namespace and changing credentials affect the calling
    // thread only (raw system calls, not libc's process-wide wrappers), and it ends after.
    std::thread::Builder::new()
        .name("tap".into())
        .spawn(move || {
            if let Some(ns) = &ns {
                super::taps::enter_netns(ns)?;
            }
            let c = std::ffi::CString::new(name.as_str()).map_err(|e| e.to_string())?;
            // SAFETY: a NUL-terminated name.
            let exists = unsafe { libc::if_nametoindex(c.as_ptr()) } != 0;
            if exists {
                // SAFETY: per-thread credential changes with plain integer arguments;
                // -1 leaves the real and saved ids as they are.
                let dropped = unsafe {
                    libc::syscall(libc::SYS_setresgid, -1i64, i64::from(gid), -1i64) == 0
                        && libc::syscall(libc::SYS_setresuid, -1i64, i64::from(uid), -1i64) == 0
                };
                if !dropped {
                    return Err(format!(
                        "cannot take the VM's uid to attach to TAP {name}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            }
            ray_devices::virtio::tap::open(&name, None)
        })
        .map_err(|e| format!("cannot start a thread to open a TAP: {e}"))?
        .join()
        .map_err(|_| "the TAP thread panicked".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keeper(outside: &Outside) -> Keeper<'_> {
        let (a, _b) = UnixDatagram::pair().unwrap();
        Keeper::new(a, outside, (400_123, 400_123))
    }

    #[test]
    fn only_planned_back_ends_and_listeners_are_given() {
        let dir = std::env::temp_dir().join(format!("ray-outside-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("gpu.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let outside = Outside {
            connect: vec![Endpoint::Unix(sock.clone())],
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            read: vec![sock.clone()],
            ..Default::default()
        };
        let mut k = keeper(&outside);
        k.open(&Request::ConnectUnix { path: sock.clone() })
            .unwrap();
        let e = k
            .open(&Request::ConnectUnix {
                path: "/run/other.sock".into(),
            })
            .unwrap_err();
        assert!(
            e.contains("does not allow a connection to /run/other.sock")
                && e.contains(&sock.display().to_string()),
            "{e}"
        );
        // A listener on the planned address; the VMM may wake its own accept.
        let l = TcpListener::from(
            k.open(&Request::ListenTcp {
                addr: "127.0.0.1:0".parse().unwrap(),
            })
            .unwrap(),
        );
        let at = l.local_addr().unwrap();
        k.open(&Request::ConnectTcp { addr: at }).unwrap();
        for asked in ["127.0.0.1:8080", "0.0.0.0:0"] {
            let e = k
                .open(&Request::ListenTcp {
                    addr: asked.parse().unwrap(),
                })
                .unwrap_err();
            assert!(e.contains(&format!("a TCP listener on {asked}")), "{e}");
        }
        let e = k
            .open(&Request::OpenRead {
                path: "/etc/shadow".into(),
            })
            .unwrap_err();
        assert!(e.contains("does not allow reading /etc/shadow"), "{e}");
        let e = k
            .open(&Request::OpenTap {
                name: "tap0".into(),
                netns: None,
            })
            .unwrap_err();
        assert!(e.contains("does not allow TAP tap0"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_vm_with_nics_in_several_namespaces_gets_its_taps_and_no_other() {
        let outside = Outside {
            nics: vec![
                ("rt9".into(), Some("ray-outside-no-such-ns".into())),
                ("rt8".into(), None),
            ],
            ..Default::default()
        };
        let mut k = keeper(&outside);
        for (name, netns) in [
            ("rt7", None),
            ("rt9", None),
            ("rt8", Some("ray-outside-no-such-ns")),
        ] {
            let e = k
                .open(&Request::OpenTap {
                    name: name.into(),
                    netns: netns.map(String::from),
                })
                .unwrap_err();
            assert!(
                e.contains(&format!("does not allow TAP {name}"))
                    && e.contains(
                        "attach to TAPs rt9 in ray-outside-no-such-ns, rt8 in the host's"
                    ),
                "{e}"
            );
        }
        // The planned one passes the policy: opening it then fails on the namespace.
        let e = k
            .open(&Request::OpenTap {
                name: "rt9".into(),
                netns: Some("ray-outside-no-such-ns".into()),
            })
            .unwrap_err();
        assert!(!e.contains("does not allow"), "{e}");
        assert!(e.contains("ray-outside-no-such-ns"), "{e}");
    }

    #[test]
    fn the_planned_vsock_socket_is_bound_and_only_its_port_listeners_are_reached() {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("ray-outside-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("v.sock");
        // A stale socket file is replaced; the new one is its owner's only.
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let outside = Outside {
            vsock: Some(sock.clone()),
            ..Default::default()
        };
        let mut k = keeper(&outside);
        let l = std::os::unix::net::UnixListener::from(
            k.open(&Request::ListenVsock { path: sock.clone() })
                .unwrap(),
        );
        let m = std::fs::symlink_metadata(&sock).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        std::os::unix::net::UnixStream::connect(&sock).unwrap();
        assert!(l.accept().is_ok(), "the granted listener is the bound one");
        // A guest's connection to port 5000 reaches <socket>_5000; a port nobody listens
        // on is refused at once.
        let beside = std::os::unix::net::UnixListener::bind(dir.join("v.sock_5000")).unwrap();
        k.open(&Request::ConnectVsock {
            path: sock.clone(),
            port: 5000,
        })
        .unwrap();
        assert!(beside.accept().is_ok());
        let e = k
            .open(&Request::ConnectVsock {
                path: sock.clone(),
                port: 5001,
            })
            .unwrap_err();
        assert!(e.contains("v.sock_5001"), "{e}");
        // Any other socket, or another device's ports, are not the plan's.
        let other = dir.join("other.sock");
        let e = k
            .open(&Request::ListenVsock {
                path: other.clone(),
            })
            .unwrap_err();
        assert!(
            e.contains("does not allow the vsock socket")
                && e.contains(&format!("serve the vsock socket {}", sock.display())),
            "{e}"
        );
        assert!(!other.exists(), "nothing was bound");
        let e = k
            .open(&Request::ConnectVsock {
                path: other,
                port: 5000,
            })
            .unwrap_err();
        assert!(
            e.contains("does not allow a guest's vsock connection"),
            "{e}"
        );
        // A file that is not a socket is never replaced.
        let file = dir.join("file");
        std::fs::write(&file, b"keep").unwrap();
        let planned = Outside {
            vsock: Some(file.clone()),
            ..Default::default()
        };
        let e = keeper(&planned)
            .open(&Request::ListenVsock { path: file.clone() })
            .unwrap_err();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn display_ports_follow_a_planned_port_and_no_further() {
        let p: SocketAddr = "127.0.0.1:5900".parse().unwrap();
        assert!(listen_allowed(p, p));
        assert!(listen_allowed(p, "127.0.0.1:5915".parse().unwrap()));
        assert!(!listen_allowed(p, "127.0.0.1:5916".parse().unwrap()));
        assert!(!listen_allowed(p, "127.0.0.1:0".parse().unwrap()));
        assert!(!listen_allowed(p, "127.0.0.2:5900".parse().unwrap()));
    }

    #[test]
    fn shared_disks_are_opened_only_under_the_given_directories() {
        let base = std::env::temp_dir().join(format!("ray-shared-{}", std::process::id()));
        let shared = base.join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        let disk = shared.join("d.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let secret = base.join("secret");
        std::fs::write(&secret, b"no").unwrap();
        std::os::unix::fs::symlink(&secret, shared.join("link.img")).unwrap();
        let dirs = vec![shared.clone()];
        let f = std::fs::File::from(open_shared_disk(&dirs, &disk, true, false).unwrap());
        assert_eq!(f.metadata().unwrap().len(), 4096);
        for (path, says) in [
            (
                secret.clone(),
                "is not under a directory the target was given",
            ),
            (shared.join("link.img"), "is not under"),
            (shared.join("../secret"), "is not under"),
            (shared.join("missing.img"), "cannot resolve"),
            (shared.clone(), "neither a file nor a block device"),
        ] {
            let e = open_shared_disk(&dirs, &path, false, false).unwrap_err();
            assert!(e.contains(says), "{}: {e}", path.display());
        }
        let e = open_shared_disk(&[], &disk, false, false).unwrap_err();
        assert!(e.contains("(none;") && e.contains("--shared-dir"), "{e}");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn tap_and_namespace_names_are_checked_before_anything_opens() {
        for bad in ["", "a/b", "sixteen-chars-xx", " tap"] {
            let e = open_tap(bad, None, (1, 1)).unwrap_err();
            assert!(e.contains("is no TAP name"), "{bad}: {e}");
        }
        for bad in ["..", "a/b", ""] {
            let e = open_tap("t0", Some(bad), (1, 1)).unwrap_err();
            assert!(e.contains("is no network namespace name"), "{bad}: {e}");
        }
    }
}
