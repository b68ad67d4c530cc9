//! One VMM per VM directory: an exclusive `flock` on `<dir>/vmm.lock`, held for the VMM's
//! whole life (the kernel drops it when the process ends, however it ends).
//!
//! `ray vm run` takes the lock before it touches the directory and hands it to the VMM
//! it starts (the descriptor is inherited; a `flock` belongs to the open file, so both
//! hold the same lock and no one else can take it in between). A VMM started without an
//! inherited lock takes it itself. Whoever holds it writes its pid into the file, so one
//! that is refused can name the VMM that runs.
//!
//! Everything a VMM removes or replaces in its directory (`api.sock`, the logs, the exit
//! record) it touches only while holding the lock: a live VMM's socket is never removed
//! from under it, and a stale one (no holder) is simply replaced.
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The lock file in a VM's directory.
pub const LOCK_FILE: &str = "vmm.lock";

/// A held lock on a VM directory.
#[derive(Debug)]
pub struct VmLock {
    file: File,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("VM '{id}' is already running: its VMM (pid {pid}) holds {}", path.display())]
    Held { id: String, pid: u32, path: PathBuf },
    #[error("VM '{id}' is being started by another process, which holds {}", path.display())]
    Starting { id: String, path: PathBuf },
    #[error("cannot lock the VM directory ({}): {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("descriptor {fd} is not a lock on {}: {reason}", path.display())]
    NotOurs {
        fd: RawFd,
        path: PathBuf,
        reason: String,
    },
}

/// How long a refused caller waits for the holder to write its pid (it takes the lock
/// first and writes right after).
const PID_WAIT: Duration = Duration::from_secs(2);

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

impl VmLock {
    /// Takes the lock of the VM directory `dir` (VM `id`), or says who holds it (waiting a
    /// moment for a holder that has not named itself yet).
    pub fn acquire(dir: &Path, id: &str) -> Result<VmLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        if ray_snapshot::try_lock(&file).map_err(io)? {
            // A previous holder's pid goes; the new holder names itself with `set_owner`
            // (a VMM at once, `ray vm run` once it started the VMM it passes the lock to).
            file.set_len(0).map_err(io)?;
            return Ok(VmLock { file, path });
        }
        let deadline = Instant::now() + PID_WAIT;
        loop {
            if let Some(pid) = read_pid(&mut file) {
                return Err(LockError::Held {
                    id: id.to_string(),
                    pid,
                    path,
                });
            }
            if Instant::now() >= deadline {
                return Err(LockError::Starting {
                    id: id.to_string(),
                    path,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Takes over a lock inherited as descriptor `fd` (from `ray vm run`): checks that it
    /// is the lock file of `dir` and that it is held through it.
    pub fn inherit(fd: RawFd, dir: &Path) -> Result<VmLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let not_ours = |reason: String| LockError::NotOurs {
            fd,
            path: path.clone(),
            reason,
        };
        // SAFETY: fcntl(F_GETFD) only queries the descriptor table; it fails with EBADF
        // (checked) if `fd` is not open, so the File below never takes a closed number.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(not_ours(std::io::Error::last_os_error().to_string()));
        }
        // SAFETY: `fd` is open (checked above) and was handed to this process to own: the
        // parent passed its number on the command line for exactly this.
        let file = unsafe { File::from_raw_fd(fd) };
        let ours = file.metadata().map_err(|e| not_ours(e.to_string()))?;
        let on_disk = std::fs::metadata(&path).map_err(|e| not_ours(e.to_string()))?;
        if (ours.dev(), ours.ino()) != (on_disk.dev(), on_disk.ino()) {
            return Err(not_ours("it is another file".into()));
        }
        // Held through this open file already: taking it again is a no-op that succeeds.
        match ray_snapshot::try_lock(&file) {
            Ok(true) => {}
            Ok(false) => return Err(not_ours("another process holds that lock".into())),
            Err(e) => return Err(not_ours(e.to_string())),
        }
        // SAFETY: F_SETFD on a descriptor `file` owns; sets close-on-exec so nothing this
        // process might start inherits the lock.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        let lock = VmLock { file, path };
        lock.set_owner(crate::jailed::host_pid());
        Ok(lock)
    }

    /// Records `pid` as the holder (what a refused caller names).
    pub fn set_owner(&self, pid: u32) {
        let mut f = &self.file;
        let _ = self.file.set_len(0);
        let _ = f.seek(SeekFrom::Start(0));
        let _ = f.write_all(format!("{pid}\n").as_bytes());
    }

    /// The descriptor to hand to a child process (which must clear its close-on-exec
    /// flag before exec, then take it with [`VmLock::inherit`]).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Moves the logs a previous VM of the same id left in `dir` to `<name>.1` (replacing
/// older ones), so this VM's start fresh. Call while holding the lock.
pub fn rotate(dir: &Path, names: &[&str]) {
    for name in names {
        let from = dir.join(name);
        if from.exists() {
            let _ = std::fs::rename(&from, dir.join(format!("{name}.1")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ray-vmlock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_second_holder_is_refused_naming_the_first() {
        let d = dir("second");
        let first = VmLock::acquire(&d, "dup").unwrap();
        let e = VmLock::acquire(&d, "dup").unwrap_err();
        assert!(
            matches!(e, LockError::Starting { .. }),
            "not named yet: {e}"
        );
        first.set_owner(std::process::id());
        let e = VmLock::acquire(&d, "dup").unwrap_err();
        let me = std::process::id();
        assert!(matches!(e, LockError::Held { pid, .. } if pid == me), "{e}");
        assert!(e.to_string().contains("VM 'dup' is already running"), "{e}");
        assert!(e.to_string().contains(&format!("pid {me}")), "{e}");
        first.set_owner(4242);
        let e = VmLock::acquire(&d, "dup").unwrap_err();
        assert!(e.to_string().contains("pid 4242"), "{e}");
        drop(first);
        // Released with its file: the next one gets it.
        let again = VmLock::acquire(&d, "dup").unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_inherited_lock_is_checked() {
        let d = dir("inherit");
        let held = VmLock::acquire(&d, "x").unwrap();
        // SAFETY: dup of a descriptor `held` owns; the copy is owned by `inherit` below.
        let copy = unsafe { libc::dup(held.raw_fd()) };
        assert!(copy >= 0);
        let inherited = VmLock::inherit(copy, &d).unwrap();
        // Both handles are one lock: still held after the first goes.
        drop(held);
        assert!(VmLock::acquire(&d, "x").is_err());
        drop(inherited);
        assert!(VmLock::acquire(&d, "x").is_ok());
        // A descriptor of another file, or a closed one, is refused.
        let other = File::open(&d).unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(other);
        let e = VmLock::inherit(fd, &d).unwrap_err();
        assert!(e.to_string().contains("another file"), "{e}");
        assert!(VmLock::inherit(1_000_000, &d).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn rotation_keeps_one_previous_generation() {
        let d = dir("rotate");
        std::fs::write(d.join("serial.log"), "old").unwrap();
        rotate(&d, &["serial.log", "events.jsonl"]);
        assert!(!d.join("serial.log").exists());
        assert_eq!(
            std::fs::read_to_string(d.join("serial.log.1")).unwrap(),
            "old"
        );
        assert!(!d.join("events.jsonl.1").exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
