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
