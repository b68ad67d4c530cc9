//! The runtime directory: one sub-directory per VM holding its API socket, serial log,
//! audit trail and, once it has ended, its exit record.
use std::path::{Path, PathBuf};

use ray_vmm::ExitRecord;

/// Where VMs live: `--runtime-dir`, else `$RAY_RUNTIME_DIR`, else `/run/rayvisor` for root
/// and `$XDG_RUNTIME_DIR/rayvisor` (or `/tmp/rayvisor-<uid>`) for others.
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RAY_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/rayvisor");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(x) => PathBuf::from(x).join("rayvisor"),
        None => PathBuf::from(format!("/tmp/rayvisor-{uid}")),
    }
}

pub fn vms_dir(runtime: &Path) -> PathBuf {
    runtime.join("vms")
}

pub fn vm_dir(runtime: &Path, id: &str) -> PathBuf {
    vms_dir(runtime).join(id)
}

/// What the runtime directory says about one VM, before asking its VMM anything.
pub enum Presence {
    /// A VMM process is alive (pid) and its socket exists.
    Live { pid: u32 },
    /// The VMM ended cleanly and left its exit record.
    Ended(ExitRecord),
    /// The VMM is gone without an exit record (killed or crashed).
    Dead { pid: Option<u32> },
}

/// Whether `pid` is a running process (a zombie has ended: it only awaits its parent).
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the parenthesised command name, which may contain spaces.
            let after = stat.rsplit_once(')')?.1;
            after
                .split_whitespace()
                .next()
                .map(|state| state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

pub fn presence(dir: &Path) -> Presence {
    if let Some(record) = std::fs::read(dir.join("exit.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<ExitRecord>(&b).ok())
    {
        return Presence::Ended(record);
    }
    let pid = std::fs::read_to_string(dir.join("vmm.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match pid {
        Some(pid) if pid_alive(pid) && dir.join("api.sock").exists() => Presence::Live { pid },
        _ => Presence::Dead { pid },
    }
}

/// Ids of every VM directory, sorted.
pub fn list_ids(runtime: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(vms_dir(runtime))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    ids.sort();
    ids
}

/// A fresh VM id: `vm-` and 8 hex digits from the clock and pid.
pub fn new_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mix = (nanos ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("vm-{:08x}", (mix >> 32) as u32)
}

/// An id must be a plain file name: it becomes a directory name.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "VM id '{id}' is not valid: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("vm-1a2b").is_ok());
        assert!(check_id("../etc").unwrap_err().contains("'../etc'"));
        assert!(check_id("").is_err());
        assert!(check_id(".hidden").is_err());
    }

    #[test]
    fn own_process_is_alive_and_pid_zero_is_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
    }

    #[test]
    fn new_ids_are_valid() {
        let id = new_id();
        assert!(check_id(&id).is_ok(), "{id}");
        assert_eq!(id.len(), 11);
    }
}
