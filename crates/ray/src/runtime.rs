//! The runtime directory: one sub-directory per VM holding its API socket, serial log,
//! audit trail and, once it has ended, its exit record.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use ray_vmm::vmlock::{LockError, VmLock};
use ray_vmm::ExitRecord;

use crate::exit::{self, coded};

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

/// Whether `pid` is a running process (a zombie whose threads are all gone has ended: it
/// only awaits its parent).
pub fn pid_alive(pid: u32) -> bool {
    // A killed process's first thread turns zombie before the others are gone (a vCPU
    // leaves KVM_RUN first), and its files (the VM directory's lock) close with the last
    // thread: the process lives while any of its threads does.
    task_alive(&format!("/proc/{pid}/stat"))
        || std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
            tasks
                .flatten()
                .any(|t| task_alive(&t.path().join("stat").to_string_lossy()))
        })
}

/// Whether the thread whose `stat` file this is exists and is neither a zombie nor dead.
fn task_alive(stat: &str) -> bool {
    std::fs::read_to_string(stat)
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
    // A VMM its seccomp filter stopped left its record in a file of its own.
    if let Some(record) = ["exit.json", ray_vmm::seccomp::RECORD_FILE]
        .iter()
        .filter_map(|f| std::fs::read(dir.join(f)).ok())
        .find_map(|b| serde_json::from_slice::<ExitRecord>(&b).ok())
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

/// Ids of every VM directory, sorted: directories named as a VM id may be (an earlier
/// version kept its encode slots in `vms/.encode-slots`).
pub fn list_ids(runtime: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(vms_dir(runtime))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|id| check_id(id).is_ok())
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

/// Longest VM id.
pub const MAX_ID_LEN: usize = 64;

/// An id must be a plain file name (it becomes a directory name) that no command line
/// mistakes for an option: 1-64 letters, digits, '-', '_' or '.', not starting with '-'
/// or '.'.
pub fn check_id(id: &str) -> Result<(), String> {
    let bad = |why: String| {
        Err(format!(
            "VM id '{id}' is not valid: {why} (use 1-{MAX_ID_LEN} letters, digits, '-', '_' or '.', not starting with '-' or '.')"
        ))
    };
    if id.is_empty() {
        return bad("it is empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return bad(format!("it is {} bytes long", id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
    {
        return bad(format!("it contains {c:?}"));
    }
    if id.starts_with('-') || id.starts_with('.') {
        return bad(format!("it starts with '{}'", &id[..1]));
    }
    Ok(())
}

/// Whether the VMM of `dir` ended before its VM was up (it left an exit record saying
/// so, or none at all: then it never got as far as writing one).
pub fn failed_at_start(dir: &Path) -> bool {
    match std::fs::read(dir.join("exit.json")) {
        Ok(b) => serde_json::from_slice::<ExitRecord>(&b).is_ok_and(|r| {
            r.reason
                .is_some_and(|why| why.starts_with(ray_vmm::FAILED_TO_START))
        }),
        Err(_) => !dir.join("events.jsonl").exists(),
    }
}

/// A VM directory claimed for a new VMM: its lock ([`ray_vmm::vmlock`]) is held, so no
/// other VMM runs or starts there, and the previous VM's `vmm.log` became `vmm.log.1`.
/// The VMM started for it inherits the lock ([`Claim::inheritable_fd`]) and holds it for
/// its life.
pub struct Claim {
    pub id: String,
    pub dir: PathBuf,
    /// This claim created the directory (it did not hold an earlier VM of this id).
    pub fresh: bool,
    lock: VmLock,
    inherit: Option<OwnedFd>,
}

/// Claims `<runtime>/vms/<id>` for a new VMM, creating it if needed. Refused (exit code
/// 4) while a VMM runs or starts there, naming it; nothing in the directory is touched
/// before the claim holds.
pub fn claim(runtime: &Path, id: &str) -> anyhow::Result<Claim> {
    check_id(id).map_err(|e| coded(exit::INVALID, e))?;
    let vms = vms_dir(runtime);
    std::fs::create_dir_all(&vms)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", vms.display()))?;
    let dir = vm_dir(runtime, id);
    let fresh = match std::fs::create_dir(&dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => false,
        Err(e) => anyhow::bail!("cannot create {}: {e}", dir.display()),
    };
    // A holder whose VMM has ended is a jail's keeper cleaning up after it (or the VMM's
    // last threads going): the lock is free in a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let lock = loop {
        match VmLock::acquire(&dir, id) {
            Err(LockError::Held { pid, .. })
                if !pid_alive(pid) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => break other,
        }
    }
    .map_err(|e| match e {
        LockError::Held { .. } | LockError::Starting { .. } => coded(exit::REFUSED, e.to_string()),
        e => e.into(),
    })?;
    ray_vmm::vmlock::rotate(&dir, &["vmm.log"]);
    Ok(Claim {
        id: id.to_string(),
        dir,
        fresh,
        lock,
        inherit: None,
    })
}

impl Claim {
    /// A copy of the lock's descriptor that a child process inherits (no close-on-exec),
    /// to pass as `ray vmm --lock-fd`; closed here by [`Claim::spawned`].
    pub fn inheritable_fd(&mut self) -> std::io::Result<RawFd> {
        if let Some(fd) = &self.inherit {
            return Ok(fd.as_raw_fd());
        }
        // SAFETY: dup of a descriptor the lock owns; the copy (without FD_CLOEXEC, which
        // dup never copies) is owned by the OwnedFd below.
        let fd = unsafe { libc::dup(self.lock.raw_fd()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by dup and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = owned.as_raw_fd();
        self.inherit = Some(owned);
        Ok(raw)
    }

    /// The VMM (`pid`) was started and holds the lock now: the inherited copy closes here,
    /// and the lock names the VMM. A jail's keeper (`pid: None`) names the VMM it clones
    /// itself.
    pub fn spawned(&mut self, pid: Option<u32>) {
        self.inherit = None;
        if let Some(pid) = pid {
            self.lock.set_owner(pid);
        }
    }

    /// The VMM did not get its VM running: a directory this claim created goes again (no
    /// row is left in `ray vm list`); an earlier VM's directory stays, with the failed
    /// VMM's exit record.
    pub fn abandon(self) {
        if self.fresh {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        drop(self.lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("vm-1a2b").is_ok());
        assert!(check_id("a.b_c-9").is_ok());
        assert!(check_id(&"x".repeat(MAX_ID_LEN)).is_ok());
        let e = check_id("../etc").unwrap_err();
        assert!(e.contains("'../etc'") && e.contains("contains '/'"), "{e}");
        assert!(check_id("").unwrap_err().contains("it is empty"));
        assert!(check_id(".hidden").unwrap_err().contains("starts with '.'"));
        // Taken for an option by every command that names the VM.
        let e = check_id("-x").unwrap_err();
        assert!(e.contains("'-x'") && e.contains("starts with '-'"), "{e}");
        let e = check_id(&"x".repeat(MAX_ID_LEN + 1)).unwrap_err();
        assert!(e.contains("65 bytes long"), "{e}");
        assert!(check_id("a b").unwrap_err().contains("contains ' '"));
        assert!(check_id("é").is_err());
    }

    #[test]
    fn a_claimed_directory_is_refused_to_a_second_claim() {
        let rt = std::env::temp_dir().join(format!("ray-claim-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&rt);
        let mut first = claim(&rt, "dup").unwrap();
        assert!(first.fresh);
        let fd = first.inheritable_fd().unwrap();
        assert!(fd >= 0);
        first.spawned(Some(4242));
        let e = claim(&rt, "dup").err().unwrap();
        assert_eq!(exit::code_of(&e), exit::REFUSED);
        assert!(
            e.to_string().contains("'dup'") && e.to_string().contains("pid 4242"),
            "{e}"
        );
        // Abandoning a fresh claim leaves no directory (no row in `vm list`).
        first.abandon();
        assert!(!vm_dir(&rt, "dup").exists());
        let again = claim(&rt, "dup").unwrap();
        assert!(again.fresh);
        drop(again);
        let reused = claim(&rt, "dup").unwrap();
        assert!(!reused.fresh, "the directory stays when not abandoned");
        reused.abandon();
        assert!(vm_dir(&rt, "dup").is_dir(), "a reused directory is kept");
        let _ = std::fs::remove_dir_all(&rt);
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
