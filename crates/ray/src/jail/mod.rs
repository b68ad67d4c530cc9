//! The jail of a VMM (`ray vm run --jail`, on by default for root; `--no-jail` or
//! `$RAY_JAIL=0` turn it off).
//!
//! `ray vm run` checks the request and turns it into a [`Plan`] (pure: nothing happens
//! yet), which travels to `ray vmm --jail PLAN`. That process, still root, is the
//! *keeper* ([`keeper`]): it creates the VM's cgroup, hands the files the VMM writes to
//! the VM's uid, and clones the VMM into new PID, mount, IPC, UTS and network namespaces.
//! The clone ([`inside`]) builds a private root (a tmpfs holding bind mounts of only what
//! it needs, each at its host path so every path the VMM and its clients use stays the
//! same), pivots into it, drops to the VM's uid with no capabilities and `no_new_privs`,
//! and goes on to run the VMM, whose threads then install their seccomp filters. The
//! keeper waits for it, passes on stop signals, then removes the cgroup, gives the disks
//! back to their owners and exits with the VMM's status.
//!
//! ```text
//!  ray vm run ──spawn──▶ ray vmm --jail (root: keeper) ──clone(NEWPID|NEWNS|..)──▶ VMM (uid N, pid 1)
//!       plan                  cgroup, chown, wait, clean up                   mounts, pivot_root, drop
//! ```
pub mod cgroup;
pub mod inside;
pub mod keeper;
pub mod outside;
pub mod taps;

/// Lending a directory to a jailed VMM's uid; in ray-vmm, which `ray web` shares.
pub use ray_vmm::acl;

use std::path::{Path, PathBuf};

use ray_api::vmm::VmConfig;
use serde::{Deserialize, Serialize};

/// Default uids (and gids) of jailed VMMs: each VM gets one, by its id.
pub const DEFAULT_UIDS: UidRange = UidRange {
    first: 400_000,
    last: 465_535,
};

/// Memory the VMM process needs beside guest memory (threads, heap, KVM's own page
/// tables and the page cache of the files it writes); measured, see README "Security".
pub const MEMORY_OVERHEAD: u64 = 96 << 20;

/// CFS period of the VM's CPU limit.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The directory, inside the VM's directory, the jail's root is mounted on (in the jail's
/// own mount namespace only: the host sees an empty directory).
pub const ROOT_DIR: &str = "jail-root";

/// `--jail`, `--no-jail`, `--jail-uids` (shared by `ray vm run`, `ray snapshot restore` and
/// `ray migrate receive`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct JailArgs {
    /// Run the VMM jailed (the default when ray runs as root; `$RAY_JAIL=0|1` sets a
    /// host-wide default): its own uid (from --jail-uids), PID/mount/IPC/UTS/network
    /// namespaces, a private root holding only its files, cgroup limits for CPU and
    /// memory, no capabilities, no_new_privs. Needs root. Its keeper (root, outside)
    /// opens for it only what the VM was started with: its disks, TCP listeners on the
    /// host's loopback (--api-tcp, --vnc), connections to remote or vfio-user GPU back
    /// ends, secret files; a migration target's TAPs and its shared disks under
    /// --shared-dir. What it cannot hold (a GPU on a host device) is refused naming
    /// --no-jail.
    #[arg(long, conflicts_with = "no_jail")]
    pub jail: bool,
    /// Run the VMM unjailed, as the calling user (the default for other users; beats
    /// `$RAY_JAIL`).
    #[arg(long)]
    pub no_jail: bool,
    /// The uids (and gids) jailed VMMs run as: FIRST-LAST, each VM gets one of them
    /// (default 400000-465535; 0 is refused).
    #[arg(long, value_name = "FIRST-LAST", env = "RAY_JAIL_UIDS", value_parser = UidRange::parse)]
    pub jail_uids: Option<UidRange>,
}

/// An inclusive range of uids that excludes root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    /// `FIRST-LAST`, with 0 < FIRST <= LAST < 2^32 - 1 (-1 means "no change" to setuid).
    pub fn parse(text: &str) -> Result<UidRange, String> {
        let bad = |why: &str| Err(format!("the jail uid range '{text}' {why}"));
        let Some((a, b)) = text.split_once('-') else {
            return bad("is not FIRST-LAST, e.g. 400000-465535");
        };
        let (Ok(first), Ok(last)) = (a.trim().parse::<u32>(), b.trim().parse::<u32>()) else {
            return bad("is not two numbers FIRST-LAST below 4294967295");
        };
        if first == 0 {
            return bad("includes uid 0 (root): a jailed VMM must not run as root");
        }
        if last < first {
            return bad("is empty: LAST is below FIRST");
        }
        if last == u32::MAX {
            return bad("includes 4294967295, which is no uid");
        }
        Ok(UidRange { first, last })
    }

    /// The uid for VM `id`: one picked by a hash of the id, skipping any that a running
    /// process uses (`busy`).
    pub fn pick(&self, id: &str, busy: impl Fn(u32) -> bool) -> Option<u32> {
        let size = u64::from(self.last - self.first) + 1;
        // FNV-1a: stable across builds and platforms.
        let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        (0..size.min(4096))
            .map(|i| self.first + ((hash + i) % size) as u32)
            .find(|&uid| !busy(uid))
    }
}

/// One host path the jail's root holds, at the same path.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    /// Mounted read-write (else read-only).
    pub writable: bool,
    /// A device node (the mount keeps device access).
    #[serde(default)]
    pub device: bool,
}

/// Everything the keeper and the jailed VMM need, decided (and checked) by `ray vm run`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the owner group of /dev/kvm).
    pub groups: Vec<u32>,
    /// Besides the VM's directory (always there, read-write and handed to `uid`).
    pub binds: Vec<Bind>,
    /// The cgroup's memory limit in bytes.
    pub memory_max: u64,
    /// The cgroup's CPU quota per [`CPU_PERIOD_US`].
    pub cpu_quota_us: u64,
    /// Which network namespace the VMM runs in.
    pub net: NetPlace,
    /// The TAPs of its NICs (in that namespace), made for its uid if missing.
    pub taps: Vec<String>,
    /// Directories lent to `uid` (a POSIX ACL entry, [`acl`]) while the VM runs: a
    /// migration target's disk directory, where it writes the disks a source copies. The
    /// files `uid` made there go to the directory's owner when the VM ends.
    #[serde(default)]
    pub lend: Vec<PathBuf>,
    /// A migration target's Unix listening socket, bound by `ray` outside the jail: the
    /// keeper removes its file once the VMM has let go of it (the VMM cannot see it).
    #[serde(default)]
    pub listen_socket: Option<PathBuf>,
    /// The host's encode-session slots (a directory of lock files): the keeper makes
    /// them, the jail holds them read-only (a `flock` needs no more).
    #[serde(default)]
    pub encode_slots: Option<PathBuf>,
    /// What the VMM may ask its keeper to open outside the jail.
    #[serde(default)]
    pub outside: outside::Outside,
}

/// The network namespace of a jailed VMM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NetPlace {
    /// One of its own, empty: a VM without NICs, or one whose NICs' TAPs are in several
    /// namespaces (its keeper opens each where it is, [`outside::Outside::nics`]).
    Private,
    /// The host's (its NICs' TAPs are there).
    Host,
    /// The named one its NICs' TAPs are in (`/run/netns/NAME`).
    Named(PathBuf),
}

/// Why a VM cannot be jailed (checked before anything starts).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(
        "--jail needs root (it changes user, mounts and cgroups): run as root or pass --no-jail"
    )]
    NotRoot,
    #[error("{0} cannot be used by a jailed VMM yet: {1}; pass --no-jail")]
    Unsupported(&'static str, String),
    #[error("no free uid for the jail in {}-{}: every one is in use", .0.first, .0.last)]
    NoUid(UidRange),
    #[error("cannot jail the VMM: {0}")]
    Host(String),
    #[error("$RAY_JAIL is '{0}': it must be 1 (jail), 0 (do not) or empty (jail when root)")]
    BadVariable(String),
}

/// Whether the VMM is to be jailed, with which uids; `--jail-uids` is checked either way
/// (by its parser). `--no-jail` beats `--jail`, which beats `$RAY_JAIL`; without any,
/// root's VMMs are jailed and other users' are not.
pub fn wanted(args: &JailArgs) -> Result<Option<UidRange>, JailError> {
    let var = std::env::var("RAY_JAIL").ok();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    Ok(decide(args, var.as_deref(), root)?.then(|| args.jail_uids.unwrap_or(DEFAULT_UIDS)))
}

/// [`wanted`]'s decision, from the flags, `$RAY_JAIL` (`var`) and whether ray runs as
/// root.
fn decide(args: &JailArgs, var: Option<&str>, root: bool) -> Result<bool, JailError> {
    if args.no_jail {
        return Ok(false);
    }
    let asked = if args.jail {
        Some(true)
    } else {
        match var.map(str::trim).map(str::to_ascii_lowercase).as_deref() {
            None | Some("") => None,
            Some("1" | "true" | "yes" | "on") => Some(true),
            Some("0" | "false" | "no" | "off") => Some(false),
            Some(_) => return Err(JailError::BadVariable(var.unwrap_or_default().into())),
        }
    };
    match asked {
        Some(true) if !root => Err(JailError::NotRoot),
        Some(jail) => Ok(jail),
        None => Ok(root),
    }
}

/// The devices every jailed VMM needs.
const DEVICES: &[&str] = &["/dev/kvm", "/dev/urandom"];

/// Host facts the VMM reads, where present: the KVM flavour (PVM), the NUMA topology.
const HOST_INFO: &[&str] = &["/sys/module/kvm_pvm", "/sys/devices/system/node"];

/// What a VMM serves on the host beside its devices: TCP listeners on the host's loopback
/// (`--api-tcp`, `--vnc`; its keeper binds them) and the files they read (the VNC password
/// file; its keeper opens it, so it stays private to its owner).
#[derive(Clone, Debug, Default)]
pub struct Listeners {
    pub tcp: Vec<std::net::SocketAddr>,
    pub files: Vec<PathBuf>,
}

/// The jail of a VM that boots (or restores) with `cfg` in `vm_dir`; `store` is the
/// snapshot store a restore reads. Refuses what a jailed VMM cannot do. No side effects.
pub fn plan(
    id: &str,
    vm_dir: &Path,
    uids: UidRange,
    cfg: &VmConfig,
    store: Option<&Path>,
    listeners: &Listeners,
) -> Result<Plan, JailError> {
    // A restore reads the kernel from the snapshot, not the file.
    plan_for(id, vm_dir, uids, cfg, store, listeners, store.is_none())
}

/// [`plan`], binding the kernel and initrd when `kernel`.
fn plan_for(
    id: &str,
    vm_dir: &Path,
    uids: UidRange,
    cfg: &VmConfig,
    store: Option<&Path>,
    listeners: &Listeners,
    kernel: bool,
) -> Result<Plan, JailError> {
    let net = net_place(cfg)?;
    // A vsock socket outside the VM's directory: its keeper binds it and connects the
    // guest to the listeners beside it.
    let vsock = cfg
        .devices
        .vsock
        .as_ref()
        .and_then(|v| v.socket.as_ref())
        .map(PathBuf::from)
        .filter(|p| !p.starts_with(vm_dir));
    // Back ends outside the jail: its keeper connects to them (and to nothing else).
    let mut connect = Vec::new();
    let mut read = listeners.files.clone();
    for g in &cfg.devices.gpus {
        use ray_api::gpu::{GpuType, PassthroughSource, RemoteBackend};
        match g.kind {
            GpuType::Remote => match g.remote_backend().map_err(JailError::Host)? {
                RemoteBackend::Unix(p) => connect.push(outside::Endpoint::Unix(p)),
                RemoteBackend::Tcp(a) => {
                    connect.push(outside::Endpoint::Tcp(a));
                    read.extend(g.token_file.iter().map(PathBuf::from));
                }
            },
            GpuType::Passthrough => match &g.passthrough {
                Some(PassthroughSource::VfioUser { socket }) => {
                    connect.push(outside::Endpoint::Unix(socket.into()))
                }
                Some(PassthroughSource::Host { .. }) | None => {
                    return Err(JailError::Unsupported(
                        "a passthrough GPU on a host device",
                        "VFIO's device files are not in a jailed VMM's root".into(),
                    ))
                }
            },
            _ => {}
        }
    }
    cgroup::Hierarchy::detect().map_err(JailError::Host)?;
    let ro = |p: &str| Bind {
        path: PathBuf::from(p),
        writable: false,
        device: false,
    };
    let mut binds: Vec<Bind> = DEVICES
        .iter()
        .map(|d| Bind {
            path: d.into(),
            writable: true,
            device: true,
        })
        .collect();
    binds.extend(
        HOST_INFO
            .iter()
            .filter(|p| Path::new(p).exists())
            .map(|p| ro(p)),
    );
    if kernel {
        binds.push(ro(&cfg.kernel));
        binds.extend(cfg.initrd.iter().map(|p| ro(p)));
    }
    binds.extend(store.map(|s| Bind {
        path: s.to_path_buf(),
        writable: false,
        device: false,
    }));
    if net != NetPlace::Private {
        binds.push(Bind {
            path: "/dev/net/tun".into(),
            writable: true,
            device: true,
        });
    }
    if let NetPlace::Named(ns) = &net {
        binds.push(Bind {
            path: ns.clone(),
            writable: false,
            device: false,
        });
    }
    // The disks are not in the jail: its keeper opens them, so no file on the host changes
    // owner (two VMMs of the same disk, one ending as the other starts, cannot take it
    // from each other).
    let mut disks = Vec::new();
    for disk in &cfg.devices.disks {
        disks.push(outside::PlannedDisk {
            path: PathBuf::from(&disk.path),
            writable: !disk.readonly,
        });
    }
    for b in &binds {
        if !b.path.is_absolute() || !b.path.exists() {
            return Err(JailError::Host(format!(
                "{} must be an existing absolute path to be mounted in the jail",
                b.path.display()
            )));
        }
    }
    // NICs in one namespace: their TAPs are made up front there (the VMM runs in it).
    // In several: the keeper opens each TAP in its own when the VMM asks (making a
    // missing one that goes with the VMM's descriptor).
    let (taps, nics) = match net {
        NetPlace::Private => (
            Vec::new(),
            cfg.devices
                .net
                .iter()
                .map(|n| (n.tap.clone(), n.netns.clone()))
                .collect(),
        ),
        NetPlace::Host | NetPlace::Named(_) => (
            cfg.devices.net.iter().map(|n| n.tap.clone()).collect(),
            Vec::new(),
        ),
    };
    let uid = uids.pick(id, uid_in_use).ok_or(JailError::NoUid(uids))?;
    let kvm_group = std::fs::metadata("/dev/kvm")
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .map_err(|e| JailError::Host(format!("cannot stat /dev/kvm: {e}")))?;
    Ok(Plan {
        uid,
        gid: uid,
        groups: vec![kvm_group],
        binds,
        memory_max: cfg.memory_bytes + MEMORY_OVERHEAD,
        cpu_quota_us: (u64::from(cfg.vcpus) + 1) * CPU_PERIOD_US,
        taps,
        net,
        lend: Vec::new(),
        listen_socket: None,
        encode_slots: ray_vmm::display::encode_slots_dir(vm_dir),
        outside: outside::Outside {
            connect,
            listen: listeners.tcp.clone(),
            read,
            disks,
            shared_dirs: Vec::new(),
            taps: false,
            nics,
            vsock,
        },
    })
}

/// The jail of a migration target (`ray migrate receive`), made before it knows the VM
/// it receives: a network namespace of its own (the listener comes from `ray`; its keeper
/// opens the TAPs of the source's NICs), no kernel, `disk_dir` (where the disks a source
/// copies go) lent to its uid, and shared disks opened by its keeper under `shared_dirs`.
/// Its cgroup's limits come from the shape it was told (`--vcpus`/`--memory`); without
/// one they are those of the largest VM this host allows (all its memory and vCPUs), the
/// source's shape being unknown until it connects. What the source's VM needs beyond that
/// (other disks, sockets elsewhere) the target refuses before the switch-over
/// (`ray_vmm::jailed::check_incoming`). No side effects.
#[allow(clippy::too_many_arguments)]
pub fn plan_incoming(
    id: &str,
    vm_dir: &Path,
    uids: UidRange,
    shape: Option<&VmConfig>,
    disk_dir: Option<&Path>,
    shared_dirs: &[PathBuf],
    listen_socket: Option<&Path>,
    listeners: &Listeners,
) -> Result<Plan, JailError> {
    let mut cfg = shape.cloned().unwrap_or_else(|| VmConfig {
        kernel: String::new(),
        initrd: None,
        cmdline: String::new(),
        vcpus: ray_vmm::config::MAX_VCPUS,
        memory_bytes: ray_vmm::config::host_memory(),
        devices: Default::default(),
        numa: Vec::new(),
        numa_attribution: Default::default(),
        numa_migration: Default::default(),
    });
    cfg.devices = Default::default();
    // The kernel comes with the source's memory.
    let mut p = plan_for(id, vm_dir, uids, &cfg, None, listeners, false)?;
    if let Some(dir) = disk_dir {
        if !dir.is_absolute() || !dir.is_dir() {
            return Err(JailError::Host(format!(
                "the disk directory {} must be an existing absolute directory to be lent to the jail",
                dir.display()
            )));
        }
        p.binds.push(Bind {
            path: dir.to_path_buf(),
            writable: true,
            device: false,
        });
        p.lend.push(dir.to_path_buf());
    }
    for dir in shared_dirs {
        if !dir.is_absolute() || !dir.is_dir() {
            return Err(JailError::Host(format!(
                "the shared directory {} must be an existing absolute directory",
                dir.display()
            )));
        }
    }
    p.outside.shared_dirs = shared_dirs.to_vec();
    p.outside.taps = true;
    p.listen_socket = listen_socket.map(Path::to_path_buf);
    Ok(p)
}

/// Where a jailed VMM's network is: with no NIC a namespace of its own; with NICs whose
/// TAPs are all in one namespace, that one (a process has one); with TAPs in several, a
/// namespace of its own again, its keeper opening each TAP in its namespace.
fn net_place(cfg: &VmConfig) -> Result<NetPlace, JailError> {
    net_place_where(cfg, |p| p.exists())
}

/// [`net_place`] with `exists` saying which namespace files exist.
fn net_place_where(cfg: &VmConfig, exists: impl Fn(&Path) -> bool) -> Result<NetPlace, JailError> {
    let named = |ns: &str| {
        let path = PathBuf::from("/run/netns").join(ns);
        match exists(&path) {
            true => Ok(path),
            false => Err(JailError::Host(format!(
                "cannot open network namespace {ns}: there is no {}",
                path.display()
            ))),
        }
    };
    for ns in cfg.devices.net.iter().filter_map(|n| n.netns.as_deref()) {
        named(ns)?;
    }
    let Some(first) = cfg.devices.net.first() else {
        return Ok(NetPlace::Private);
    };
    if cfg.devices.net.iter().any(|n| n.netns != first.netns) {
        return Ok(NetPlace::Private);
    }
    Ok(match &first.netns {
        None => NetPlace::Host,
        Some(ns) => NetPlace::Named(named(ns)?),
    })
}

/// Whether any process of this host runs as `uid` (another jailed VMM).
fn uid_in_use(uid: u32) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        std::os::unix::fs::MetadataExt::uid(&match p.metadata() {
            Ok(m) => m,
            Err(_) => return false,
        }) == uid
            && p.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_jailed_by_default_and_the_flags_and_variable_decide_otherwise() {
        let args = |jail, no_jail| JailArgs {
            jail,
            no_jail,
            jail_uids: None,
        };
        let d = |a: &JailArgs, var, root| decide(a, var, root).map_err(|e| e.to_string());
        // (--jail, --no-jail, $RAY_JAIL, root) -> jailed
        for (jail, no_jail, var, root, want) in [
            (false, false, None, true, true),
            (false, false, Some(""), true, true),
            (false, false, None, false, false),
            (false, false, Some("0"), true, false),
            (false, false, Some(" off "), true, false),
            (false, false, Some("1"), true, true),
            (false, false, Some("YES"), true, true),
            (true, false, Some("0"), true, true),
            (false, true, Some("1"), true, false),
            (false, true, None, false, false),
            (false, false, Some("0"), false, false),
        ] {
            assert_eq!(
                d(&args(jail, no_jail), var, root),
                Ok(want),
                "--jail {jail} --no-jail {no_jail} RAY_JAIL {var:?} root {root}"
            );
        }
        let e = d(&args(true, false), None, false).unwrap_err();
        assert!(e.contains("needs root") && e.contains("--no-jail"), "{e}");
        let e = d(&args(false, false), Some("1"), false).unwrap_err();
        assert!(e.contains("needs root"), "{e}");
        let e = d(&args(false, false), Some("maybe"), true).unwrap_err();
        assert!(e.contains("RAY_JAIL") && e.contains("'maybe'"), "{e}");
    }

    #[test]
    fn uid_ranges_are_checked() {
        assert_eq!(
            UidRange::parse("10-20"),
            Ok(UidRange {
                first: 10,
                last: 20
            })
        );
        let e = UidRange::parse("0-100").unwrap_err();
        assert!(e.contains("'0-100'") && e.contains("uid 0 (root)"), "{e}");
        assert!(UidRange::parse("0-0").unwrap_err().contains("root"));
        assert!(UidRange::parse("20-10").unwrap_err().contains("empty"));
        assert!(UidRange::parse("12").unwrap_err().contains("FIRST-LAST"));
        assert!(UidRange::parse("a-b").unwrap_err().contains("two numbers"));
        assert!(UidRange::parse("1-4294967295")
            .unwrap_err()
            .contains("no uid"));
    }

    #[test]
    fn a_vm_gets_a_stable_uid_in_range_that_is_not_busy() {
        let r = UidRange {
            first: 1000,
            last: 1009,
        };
        let a = r.pick("vm-a", |_| false).unwrap();
        assert!((1000..=1009).contains(&a));
        assert_eq!(r.pick("vm-a", |_| false), Some(a), "stable");
        let b = r.pick("vm-a", |u| u == a).unwrap();
        assert_ne!(a, b);
        assert!((1000..=1009).contains(&b));
        assert_eq!(r.pick("vm-a", |_| true), None);
    }

    fn config(disk: &Path) -> VmConfig {
        serde_json::from_value(serde_json::json!({
            "kernel": "/proc/self/exe",
            "cmdline": "",
            "vcpus": 2,
            "memory_bytes": 256u64 << 20,
            "devices": {"disks": [{"path": disk, "readonly": false, "id": "disk0"}]},
        }))
        .unwrap()
    }

    #[test]
    fn nics_put_the_vmm_in_their_namespace_or_in_its_own_when_they_are_in_several() {
        let disk = Path::new("/dev/null");
        let mut cfg = config(disk);
        assert_eq!(net_place(&cfg).unwrap(), NetPlace::Private);
        let nic = |spec: &str| ray_api::net::NetConfig::parse(spec).unwrap();
        cfg.devices.net = vec![nic("tap=a"), nic("tap=b")];
        assert_eq!(net_place(&cfg).unwrap(), NetPlace::Host);
        // Two namespaces: one of its own; its keeper opens each TAP in its namespace, and
        // nothing is made up front.
        cfg.devices.net = vec![nic("tap=a"), nic("tap=b,netns=blue")];
        let e = net_place(&cfg).unwrap_err().to_string();
        assert!(e.contains("there is no /run/netns/blue"), "{e}");
        let blue_and_red = |p: &Path| p.ends_with("blue") || p.ends_with("red");
        assert_eq!(
            net_place_where(&cfg, blue_and_red).unwrap(),
            NetPlace::Private
        );
        cfg.devices.net = vec![nic("tap=a,netns=red"), nic("tap=b,netns=blue")];
        assert_eq!(
            net_place_where(&cfg, blue_and_red).unwrap(),
            NetPlace::Private
        );
        cfg.devices.net = vec![nic("tap=a,netns=red"), nic("tap=b,netns=red")];
        assert_eq!(
            net_place_where(&cfg, blue_and_red).unwrap(),
            NetPlace::Named("/run/netns/red".into())
        );
        // Every namespace must exist, the first NIC's or another's.
        for (first, second) in [("red", "ray-no-such-ns"), ("ray-no-such-ns", "red")] {
            cfg.devices.net = vec![
                nic(&format!("tap=a,netns={first}")),
                nic(&format!("tap=b,netns={second}")),
            ];
            let e = net_place_where(&cfg, blue_and_red).unwrap_err().to_string();
            assert!(e.contains("there is no /run/netns/ray-no-such-ns"), "{e}");
        }
    }

    #[test]
    fn a_plan_binds_what_the_vm_needs_and_refuses_what_it_cannot_do() {
        let disk = std::env::temp_dir().join(format!("ray-jail-plan-{}", std::process::id()));
        std::fs::write(&disk, b"").unwrap();
        let cfg = config(&disk);
        let uids = UidRange {
            first: 500_000,
            last: 500_100,
        };
        let none = Listeners::default();
        let p = plan("vm-x", Path::new("/run/x"), uids, &cfg, None, &none).unwrap();
        assert!((500_000..=500_100).contains(&p.uid));
        assert_eq!(p.memory_max, (256 << 20) + MEMORY_OVERHEAD);
        assert_eq!(p.cpu_quota_us, 3 * CPU_PERIOD_US);
        assert!(
            p.binds.iter().all(|b| b.path != disk),
            "the keeper opens it"
        );
        assert!(p
            .binds
            .iter()
            .any(|b| b.path == Path::new("/proc/self/exe") && !b.writable));
        assert!(p
            .binds
            .iter()
            .any(|b| b.path == Path::new("/dev/kvm") && b.device));
        assert_eq!(
            p.outside.disks,
            vec![outside::PlannedDisk {
                path: disk.clone(),
                writable: true
            }]
        );
        assert!(p.outside.connect.is_empty() && p.outside.listen.is_empty());
        // A TCP listener (its keeper binds it) and the file it reads.
        let vnc = Listeners {
            tcp: vec!["127.0.0.1:5900".parse().unwrap()],
            files: vec![disk.clone()],
        };
        let p = plan("vm-x", Path::new("/run/x"), uids, &cfg, None, &vnc).unwrap();
        assert_eq!(p.outside.listen, vnc.tcp);
        assert_eq!(p.outside.read, vnc.files);
        // A vsock socket in the VM's directory is the VMM's own; elsewhere its keeper's.
        let vsock_at = |socket: &str| {
            let mut c = cfg.clone();
            c.devices.vsock = Some(ray_api::vsock::VsockConfig {
                cid: 3,
                socket: Some(socket.into()),
            });
            plan("vm-x", Path::new("/run/x"), uids, &c, None, &none).unwrap()
        };
        assert_eq!(vsock_at("/run/x/v.sock").outside.vsock, None);
        let p = vsock_at("/tmp/v.sock");
        assert_eq!(p.outside.vsock, Some(PathBuf::from("/tmp/v.sock")));
        // A passthrough GPU on a host device is refused: its VFIO files are not there.
        let mut host = cfg.clone();
        host.devices.gpus = vec![
            ray_api::gpu::GpuConfig::parse("passthrough,host=0000:01:00.0")
                .unwrap()
                .unwrap(),
        ];
        let e = plan("vm-x", Path::new("/run/x"), uids, &host, None, &none).unwrap_err();
        assert!(
            e.to_string().contains("host device") && e.to_string().contains("--no-jail"),
            "{e}"
        );
        let _ = std::fs::remove_file(&disk);
    }

    #[test]
    fn a_migration_target_binds_no_kernel_lends_its_disk_dir_and_gets_shared_disks_and_taps() {
        let none = Listeners::default();
        let uids = UidRange {
            first: 500_000,
            last: 500_100,
        };
        let dir = std::env::temp_dir().join(format!("ray-jail-in-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("m.sock");
        let p = plan_incoming(
            "vm-in",
            Path::new("/run/x"),
            uids,
            None,
            Some(&dir),
            std::slice::from_ref(&dir),
            Some(&sock),
            &none,
        )
        .unwrap();
        assert_eq!(p.outside.shared_dirs, vec![dir.clone()]);
        assert!(p.outside.taps);
        assert_eq!(p.net, NetPlace::Private);
        assert_eq!(p.lend, vec![dir.clone()]);
        assert_eq!(p.listen_socket.as_deref(), Some(sock.as_path()));
        assert!(p.binds.iter().any(|b| b.path == dir && b.writable));
        assert!(p.outside.disks.is_empty() && p.taps.is_empty());
        // Not told the shape: the largest VM the host allows.
        assert_eq!(
            p.memory_max,
            ray_vmm::config::host_memory() + MEMORY_OVERHEAD
        );
        let shape = config(Path::new("/dev/null"));
        let p = plan_incoming(
            "vm-in",
            Path::new("/run/x"),
            uids,
            Some(&shape),
            None,
            &[],
            None,
            &none,
        )
        .unwrap();
        assert_eq!(p.memory_max, (256 << 20) + MEMORY_OVERHEAD);
        assert_eq!(p.cpu_quota_us, 3 * CPU_PERIOD_US);
        assert!(
            p.binds
                .iter()
                .all(|b| b.path != Path::new("/proc/self/exe")),
            "no kernel"
        );
        assert!(
            p.binds.iter().all(|b| b.path != Path::new("/dev/null")),
            "no disk yet"
        );
        let e = plan_incoming(
            "vm-in",
            Path::new("/run/x"),
            uids,
            None,
            Some(Path::new("/no/such/dir")),
            &[],
            None,
            &none,
        )
        .unwrap_err();
        assert!(e.to_string().contains("/no/such/dir"), "{e}");
        let e = plan_incoming(
            "vm-in",
            Path::new("/run/x"),
            uids,
            None,
            None,
            &[PathBuf::from("relative/dir")],
            None,
            &none,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("shared directory relative/dir"),
            "{e}"
        );
        let mut remote = config(Path::new("/dev/null"));
        remote.devices.gpus = vec![ray_api::gpu::GpuConfig::parse("remote,socket=/tmp/g.sock")
            .unwrap()
            .unwrap()];
        // Its keeper connects to the back end for it.
        let p = plan("vm-x", Path::new("/run/x"), uids, &remote, None, &none).unwrap();
        assert_eq!(
            p.outside.connect,
            vec![outside::Endpoint::Unix("/tmp/g.sock".into())]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
