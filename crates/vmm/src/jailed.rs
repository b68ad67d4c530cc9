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
    /// It has a network namespace of its own (no TAP there): a migration target's NICs
    /// are TAPs its keeper opens ([`ray_outside::open_tap`]).
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

/// Whether this (jailed) VMM's keeper opens the disk at `path` for it: every disk but the
/// copies a migration target writes in its own directories (its keeper opens the VM's
/// disks, and a target's shared disks, so no file on the host changes owner).
pub fn disk_from_keeper(path: &Path) -> bool {
    get().is_some_and(|j| !j.writable.iter().any(|w| path.starts_with(w)))
}

/// Whether this (jailed) VMM's keeper opens its TAPs: it has a network namespace of its
/// own (a migration target).
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
