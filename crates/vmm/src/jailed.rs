//! What a VMM knows about the jail it runs in (`ray vm run --jail`, set up by `ray vmm`
//! before [`crate::run`]): its pid as the host sees it (inside its own PID namespace it is
//! pid 1), and the only places it may write (its root holds nothing else, so a request to
//! write elsewhere is refused with a sentence saying why instead of a bare ENOENT).
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A jailed VMM's view of its jail.
#[derive(Debug, Clone)]
pub struct Jailed {
    /// This process's pid in the host's PID namespace.
    pub host_pid: u32,
    /// Directories the VMM may create files under (its VM directory).
    pub writable: Vec<PathBuf>,
    /// It has a network namespace of its own (no TAP there): the NICs of a migration
    /// target, or of a VM whose TAPs are in several namespaces, are TAPs its keeper opens
    /// ([`ray_outside::open_tap`]).
    pub own_network: bool,
    /// A migration target: directories of shared disks its keeper opens for it
    /// ([`ray_outside::open_disk`]).
    pub shared_dirs: Vec<PathBuf>,
}

static JAIL: OnceLock<Jailed> = OnceLock::new();

/// Records that this process now runs jailed; once, before [`crate::run`].
pub fn set(jail: Jailed) {
    let _ = JAIL.set(jail);
}

/// The jail this VMM runs in, if any.
pub fn get() -> Option<&'static Jailed> {
    JAIL.get()
}

/// This VMM's pid as the host (and every `ray` command) sees it.
pub fn host_pid() -> u32 {
    get().map_or_else(std::process::id, |j| j.host_pid)
}

/// Whether this VMM may write `path` (always, unjailed); otherwise a sentence naming
/// `what` and where a jailed VMM may write.
pub fn check_writable(path: &Path, what: &str) -> Result<(), String> {
    let Some(jail) = get() else { return Ok(()) };
    if jail.writable.iter().any(|w| path.starts_with(w)) {
        return Ok(());
    }
    Err(format!(
        "this VM's VMM is jailed: it cannot write {what} {} (it may write only under {}; `ray snapshot create` and `ray vm checkpoint` hand it a store elsewhere, or start the VM with --no-jail)",
        path.display(),
        jail.writable
            .iter()
            .map(|w| w.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Refuses what a jailed VMM cannot do at all, naming it.
pub fn refuse_if_jailed(what: &str) -> Result<(), String> {
    match get() {
        None => Ok(()),
        Some(_) => Err(format!(
            "this VM's VMM is jailed and cannot {what} (its private root and network namespace hold no way out); start the VM with --no-jail for that"
        )),
    }
}

/// Opens the disk at `path` (read-write when `writable`, `O_DIRECT` when `direct`). A
/// jailed VMM's keeper opens every disk but the copies a migration target writes in its
/// own directories (the VM's disks and a target's shared disks: no file on the host
/// changes owner); unjailed, or a copy, it is opened here.
pub fn open_disk(path: &Path, writable: bool, direct: bool) -> std::io::Result<std::fs::File> {
    if from_keeper(path) {
        return ray_outside::open_disk(path, writable, direct);
    }
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
}

/// Whether `path` is outside this jailed VMM's directories, so its keeper opens it
/// (never, unjailed).
pub fn from_keeper(path: &Path) -> bool {
    get().is_some_and(|j| !j.writable.iter().any(|w| path.starts_with(w)))
}

/// Who opens the host sockets of a vsock device listening at `path`: its keeper when
/// the VMM is jailed and `path` is outside its directory.
pub fn vsock_opener(path: &Path) -> ray_outside::Opener {
    match from_keeper(path) {
        true => ray_outside::Opener::Keeper,
        false => ray_outside::Opener::Own,
    }
}

/// Whether this (jailed) VMM's keeper opens its TAPs: it has a network namespace of its
/// own (a migration target, or a VM whose TAPs are in several namespaces).
pub fn taps_from_keeper() -> bool {
    get().is_some_and(|j| j.own_network)
}

/// Whether this VMM can see `path` (always, unjailed); otherwise a sentence naming `what`
/// and what a jailed VMM sees.
pub fn check_visible(path: &Path, what: &str) -> Result<(), String> {
    let Some(jail) = get() else { return Ok(()) };
    if jail.writable.iter().any(|w| path.starts_with(w)) {
        return Ok(());
    }
    Err(format!(
        "this VM's VMM is jailed: {what} {} is outside its root (it sees only its own directory and files); use `ray snapshot list/delete/merge` on the host, or start the VM with --no-jail",
        path.display()
    ))
}

/// Whether a jailed migration target can hold the devices of the VM a source sends
/// (`devices` as this target would open them: copied disks at their copies, the vsock
/// socket in this VM's directory). Its jail was made before it knew them: it sees only
/// its own directory and its disk directory, and has a network namespace of its own; its
/// keeper opens shared disks under the directories it was given (`--shared-dir`) and
/// the NICs' TAPs. Otherwise a sentence naming the first device it cannot hold; checked
/// before the switch-over, so the source runs on.
pub fn check_incoming(devices: &ray_api::vmm::DevicesConfig) -> Result<(), String> {
    let Some(jail) = get() else { return Ok(()) };
    let seen = |p: &str| jail.writable.iter().any(|w| Path::new(p).starts_with(w));
    let refuse = |what: String| {
        Err(format!(
            "this migration target's VMM is jailed and cannot hold {what}; receive with --no-jail for that"
        ))
    };
    let shared = |p: &str| jail.shared_dirs.iter().any(|d| Path::new(p).starts_with(d));
    if let Some(d) = devices
        .disks
        .iter()
        .find(|d| !seen(&d.path) && !shared(&d.path))
    {
        return Err(format!(
            "this migration target's VMM is jailed and cannot hold the source's disk {} at {}: it opens shared storage only under the directories it was given (`ray migrate receive --shared-dir DIR`; given: {}), and disks the source copies into its disk directory (`ray migrate start --copy-disks` to `ray migrate receive --disk-dir DIR`); or receive with --no-jail",
            d.id,
            d.path,
            match jail.shared_dirs.is_empty() {
                true => "none".to_string(),
                false => jail
                    .shared_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        ));
    }
    if let Some(s) = devices
        .vsock
        .as_ref()
        .and_then(|v| v.socket.as_deref())
        .filter(|s| !seen(s))
    {
        return refuse(format!("a vsock socket outside its directory ({s})"));
    }
    if let Some(g) = devices.gpus.iter().find(|g| {
        matches!(
            g.kind,
            ray_api::gpu::GpuType::Remote | ray_api::gpu::GpuType::Passthrough
        )
    }) {
        return refuse(format!(
            "the source's {} GPU: its back end is a socket or device outside the jail",
            g.kind.as_str()
        ));
    }
    Ok(())
}

/// Most paths [`view`] lists.
const MAX_PATHS: usize = 4096;

/// This VMM's jail as it sees it from inside ([`ray_api::vmm::JailView`]): its
/// `/proc/thread-self/status`, host name, network interfaces, the paths of its root (not
/// walked into its mounts; only when jailed: unjailed, its root is the host's) and the
/// cgroup limits it can read.
pub fn view() -> ray_api::vmm::JailView {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let numbers = |name: &str| -> Vec<u32> {
        field(name)
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    let jailed = get().is_some();
    // Unjailed, its root and mounts are the host's and its cgroup is not among them.
    let (mut paths, mut points, mut memory_max, mut cpu) = (Vec::new(), Vec::new(), None, None);
    if jailed {
        let mounts = mounts();
        let at: std::collections::HashSet<&Path> =
            mounts.iter().map(|m| m.point.as_path()).collect();
        walk(Path::new("/"), &at, &mut paths);
        paths.sort();
        points = mounts
            .iter()
            .map(|m| m.point.display().to_string())
            .collect();
        points.sort();
        points.dedup();
        (memory_max, cpu) = cgroup_limits(&mounts);
    }
    ray_api::vmm::JailView {
        jailed,
        pid: std::process::id(),
        host_pid: host_pid(),
        uids: numbers("Uid"),
        gids: numbers("Gid"),
        groups: numbers("Groups"),
        cap_effective: field("CapEff"),
        cap_bounding: field("CapBnd"),
        no_new_privs: field("NoNewPrivs") == "1",
        seccomp: field("Seccomp").parse().unwrap_or(0),
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .to_string(),
        interfaces: std::fs::read_to_string("/proc/net/dev")
            .unwrap_or_default()
            .lines()
            .skip(2)
            .filter_map(|l| Some(l.split_once(':')?.0.trim().to_string()))
            .collect(),
        paths,
        mounts: points,
        memory_max,
        cpu_quota_us: cpu.map(|c| c.0),
        cpu_period_us: cpu.map(|c| c.1),
    }
}

/// One line of `/proc/self/mountinfo`.
struct Mount {
    point: PathBuf,
    fs: String,
    options: String,
}

fn mounts() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?.replace("\\040", " ");
            let mut r = right.split(' ');
            let fs = r.next()?.to_string();
            let options = r.nth(1).unwrap_or_default().to_string();
            Some(Mount {
                point: PathBuf::from(point),
                fs,
                options,
            })
        })
        .collect()
}

/// Every path under `dir`, not walking into mount points, at most [`MAX_PATHS`].
fn walk(dir: &Path, mounts: &std::collections::HashSet<&Path>, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if out.len() >= MAX_PATHS {
            return;
        }
        let path = e.path();
        out.push(path.display().to_string());
        if !mounts.contains(path.as_path()) && e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&path, mounts, out);
        }
    }
}

/// The memory limit and the CPU quota and period of the cgroup files among `mounts`
/// (v2's `memory.max`/`cpu.max`, v1's `memory.limit_in_bytes`/`cpu.cfs_*_us`); `None`
/// where none is mounted or there is no limit.
fn cgroup_limits(mounts: &[Mount]) -> (Option<u64>, Option<(u64, u64)>) {
    let read = |m: &Mount, file: &str| {
        std::fs::read_to_string(m.point.join(file))
            .ok()
            .map(|t| t.trim().to_string())
    };
    let mut memory = None;
    let mut cpu = None;
    for m in mounts {
        match m.fs.as_str() {
            "cgroup2" => {
                // "max" (no limit) does not parse: None.
                memory = memory.or_else(|| read(m, "memory.max")?.parse().ok());
                cpu = cpu.or_else(|| {
                    let text = read(m, "cpu.max")?;
                    let (q, p) = text.split_once(' ')?;
                    Some((q.parse().ok()?, p.parse().ok()?))
                });
            }
            "cgroup" if m.options.split(',').any(|o| o == "memory") => {
                memory = memory.or_else(|| read(m, "memory.limit_in_bytes")?.parse().ok());
            }
            "cgroup" if m.options.split(',').any(|o| o == "cpu") => {
                cpu = cpu.or_else(|| {
                    Some((
                        read(m, "cpu.cfs_quota_us")?.parse().ok()?,
                        read(m, "cpu.cfs_period_us")?.parse().ok()?,
                    ))
                });
            }
            _ => {}
        }
    }
    (memory, cpu)
}
