//! What a client in the host's namespaces (`ray`, `ray web`; root) opens for a jailed VMM
//! and hands it over its `handoff.sock` ([`crate::handoff`]) before the API request that
//! names the hand-off: a snapshot store outside the VM's directory, and for a migration
//! the connection to the target, the key file and a host-wide migration slot. A VMM
//! without `handoff.sock` is not jailed and opens them itself: then nothing is handed
//! (`None`).
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long connecting to a migration target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What kind of failure a hand-over met (a caller maps it to its exit code or status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The request is not valid: an address or a key file the VMM would refuse.
    Invalid,
    /// The migration target does not answer.
    Unreachable,
    /// The host refuses it now: every migration slot is taken, or a store cannot be lent.
    Refused,
    /// Anything else: a directory that cannot be created or opened, the hand-off itself.
    Failed,
}

/// A hand-over that did not happen, and why.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandOverError {
    pub failure: Failure,
    pub message: String,
}

fn fail(failure: Failure, message: impl Into<String>) -> HandOverError {
    HandOverError {
        failure,
        message: message.into(),
    }
}

/// The hand-off socket of the VMM of `vm_dir` and its owner (the VM's uid), when it is
/// jailed.
fn jailed_socket(vm_dir: &Path) -> Option<(PathBuf, std::fs::Metadata)> {
    let socket = vm_dir.join(crate::handoff::SOCKET);
    let meta = std::fs::metadata(&socket).ok()?;
    Some((socket, meta))
}

/// The hand-off socket and owner of the VMM of `vm_dir`, and `path` made absolute, when
/// that VMM is jailed and `path` is outside its directory (so it cannot open it itself).
fn jailed_and_outside(
    vm_dir: &Path,
    path: &Path,
) -> Result<Option<(PathBuf, std::fs::Metadata, PathBuf)>, HandOverError> {
    let dir = absolute(vm_dir)?;
    let path = absolute(path)?;
    Ok(jailed_socket(&dir)
        .filter(|_| !path.starts_with(&dir))
        .map(|(socket, owner)| (socket, owner, path)))
}

/// Sends `fds` to the VMM listening on `socket` under a fresh token; `what` names them
/// in an error.
fn hand(socket: &Path, fds: &[BorrowedFd<'_>], what: &str) -> Result<Handed, HandOverError> {
    let token = crate::handoff::token().map_err(|e| fail(Failure::Failed, e.to_string()))?;
    let conn = crate::handoff::send(socket, &token, fds).map_err(|e| {
        fail(
            Failure::Failed,
            format!("cannot hand {what} to the VMM ({}): {e}", socket.display()),
        )
    })?;
    Ok(Handed { token, _conn: conn })
}

fn absolute(p: &Path) -> Result<PathBuf, HandOverError> {
    std::path::absolute(p).map_err(|e| {
        fail(
            Failure::Invalid,
            format!("cannot resolve {}: {e}", p.display()),
        )
    })
}

/// A snapshot store outside a jailed VMM's directory, lent to the VM's uid (an ACL entry,
/// [`crate::acl`]) and handed to the VMM for one snapshot.
#[derive(Debug)]
pub struct LentStore {
    /// The hand-off to name in the request (`SnapshotRequest::handoff`).
    pub token: String,
    /// The store's owner, who gets the snapshot's files.
    owner: (u32, u32),
    _acl: crate::acl::Lent,
    /// Open until the VMM has answered.
    _conn: UnixStream,
}

impl LentStore {
    /// Ends the loan once the VMM answered; the snapshot written at `path` (if any) goes
    /// to the store's owner.
    pub fn give_back(self, path: &Path) -> Result<(), HandOverError> {
        let owner = self.owner;
        drop(self);
        if path.exists() {
            chown_tree(path, owner).map_err(|e| {
                fail(
                    Failure::Failed,
                    format!("cannot give {} to the store's owner: {e}", path.display()),
                )
            })?;
        }
        Ok(())
    }
}

fn chown_tree(path: &Path, (uid, gid): (u32, u32)) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), (uid, gid))?;
        }
    }
    Ok(())
}

/// For a snapshot to be written at `path` by the VMM of `vm_dir`: a jailed VMM sees only
/// its own directory, so a store elsewhere (`path`'s parent, created if missing) is
/// opened here and handed to it, lent to the VM's uid while it writes. `None` when the
/// VMM is not jailed or `path` is inside its directory. Call
/// [`LentStore::give_back`] once the VMM answered.
pub fn snapshot_store(vm_dir: &Path, path: &Path) -> Result<Option<LentStore>, HandOverError> {
    let Some((socket, vmm, path)) = jailed_and_outside(vm_dir, path)? else {
        return Ok(None);
    };
    let Some(store) = path.parent() else {
        return Ok(None);
    };
    let failed = |what: &str, e: std::io::Error| {
        fail(
            Failure::Failed,
            format!("cannot {what} the snapshot store {}: {e}", store.display()),
        )
    };
    std::fs::create_dir_all(store).map_err(|e| failed("create", e))?;
    let meta = std::fs::metadata(store).map_err(|e| failed("read", e))?;
    let acl = crate::acl::lend(store, vmm.uid()).map_err(|e| fail(Failure::Refused, e))?;
    let opened = std::fs::File::open(store).map_err(|e| failed("open", e))?;
    let what = format!("the snapshot store {}", store.display());
    let Handed { token, _conn: conn } = hand(&socket, &[opened.as_fd()], &what)?;
    Ok(Some(LentStore {
        token,
        owner: (meta.uid(), meta.gid()),
        _acl: acl,
        _conn: conn,
    }))
}

/// Descriptors handed to a jailed VMM: a migration's (source side), an encode session's
/// output file.
#[derive(Debug)]
pub struct Handed {
    /// The hand-off to name in the request (`MigrateRequest::handoff`,
    /// `EncodeRequest::handoff`).
    pub token: String,
    /// Open until the VMM has answered.
    _conn: UnixStream,
}

/// For an encode session's output file `path`, written by the VMM of `vm_dir`: a jailed
/// VMM writes only in its own directory, so a file elsewhere is created (or truncated)
/// here, as the caller, and handed to it. `None` when the VMM is not jailed or `path` is
/// inside its directory. Keep the result until the VMM answered the request naming its
/// token.
pub fn output_file(vm_dir: &Path, path: &Path) -> Result<Option<Handed>, HandOverError> {
    let Some((socket, _, path)) = jailed_and_outside(vm_dir, path)? else {
        return Ok(None);
    };
    let file = std::fs::File::create(&path).map_err(|e| {
        fail(
            Failure::Invalid,
            format!("cannot create the output file {}: {e}", path.display()),
        )
    })?;
    let what = format!("the output file {}", path.display());
    hand(&socket, &[file.as_fd()], &what).map(Some)
}

/// Opens a migration key file to hand to a jailed VMM (source or target), refusing one
/// the VMM would refuse before anything connects or listens.
pub fn open_key_file(key_file: &Path) -> Result<std::fs::File, HandOverError> {
    // Not blocking on a FIFO; the VMM checks what the file is.
    let key = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(key_file)
        .map_err(|e| {
            fail(
                Failure::Invalid,
                format!("cannot open the key file {}: {e}", key_file.display()),
            )
        })?;
    let copy = key.try_clone().map_err(|e| {
        fail(
            Failure::Failed,
            format!("cannot read the key file {}: {e}", key_file.display()),
        )
    })?;
    ray_migration::read_key_from(copy, key_file)
        .map_err(|e| fail(Failure::Invalid, e.to_string()))?;
    Ok(key)
}

/// For the VMM of `vm_dir` to migrate to `to` with the key in `key_file`: a jailed VMM
/// cannot reach the target from its own network namespace, open the key file outside its
/// root, nor take a slot of the host-wide cap on migrations (`max_concurrent`, the VMM's
/// default when `None`; a lock on a file of `runtime`). They are checked, opened here and
/// handed over. `None` when the VMM is not jailed. Keep the result until the VMM answered
/// the request naming its token.
pub fn migration(
    vm_dir: &Path,
    runtime: &Path,
    to: &str,
    key_file: &Path,
    max_concurrent: Option<u32>,
) -> Result<Option<Handed>, HandOverError> {
    let Some((socket, _)) = jailed_socket(&absolute(vm_dir)?) else {
        return Ok(None);
    };
    let to =
        ray_migration::Endpoint::parse(to).map_err(|e| fail(Failure::Invalid, e.to_string()))?;
    let key = open_key_file(key_file)?;
    let stream = ray_migration::connect(&to, CONNECT_TIMEOUT).map_err(|e| {
        fail(
            Failure::Unreachable,
            format!("cannot connect to the target {to}: {e}"),
        )
    })?;
    // The lock goes with the open file: the VMM holds the slot once it has the file.
    let limit = max_concurrent
        .unwrap_or(ray_migration::progress::DEFAULT_MAX_CONCURRENT as u32)
        .max(1);
    let slot =
        crate::migration::acquire_slot(runtime, limit).map_err(|e| fail(Failure::Refused, e))?;
    let fds = [stream.as_fd(), key.as_fd(), slot.file().as_fd()];
    hand(&socket, &fds, "the connection").map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ray-hand-over-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_unjailed_vmm_is_handed_nothing() {
        let base = scratch("unjailed");
        let vm = base.join("vm");
        std::fs::create_dir_all(&vm).unwrap();
        let store = base.join("store");
        assert!(snapshot_store(&vm, &store.join("s1")).unwrap().is_none());
        assert!(!store.exists(), "nothing is created for an unjailed VMM");
        let handed = migration(&vm, &base, "unix:/nonexistent", &base.join("key"), None).unwrap();
        assert!(handed.is_none());
        assert!(output_file(&vm, &base.join("out.h264")).unwrap().is_none());
        assert!(!base.join("out.h264").exists(), "the VMM creates it itself");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_jailed_vmm_is_handed_the_store_and_the_migration_under_their_tokens() {
        use std::os::unix::fs::MetadataExt;
        let base = scratch("jailed");
        let vm = base.join("vm");
        std::fs::create_dir_all(&vm).unwrap();
        let mut inbox = crate::handoff::Inbox::bind(&vm).unwrap();

        // A snapshot inside the VM's directory needs no store handed.
        assert!(snapshot_store(&vm, &vm.join("s0")).unwrap().is_none());
        let store = base.join("store");
        let lent = snapshot_store(&vm, &store.join("s1")).unwrap().unwrap();
        let fds = inbox.take(&lent.token, 1).unwrap();
        let handed = std::fs::File::from(fds.into_iter().next().unwrap());
        let (got, want) = (
            handed.metadata().unwrap(),
            std::fs::metadata(&store).unwrap(),
        );
        assert!(got.is_dir());
        assert_eq!((got.dev(), got.ino()), (want.dev(), want.ino()));
        std::fs::create_dir(store.join("s1")).unwrap();
        lent.give_back(&store.join("s1")).unwrap();

        // An output file elsewhere is created and handed over; one inside is not.
        assert!(output_file(&vm, &vm.join("in.h264")).unwrap().is_none());
        let out = base.join("out.h264");
        std::fs::write(&out, b"old bytes").unwrap();
        let h = output_file(&vm, &out).unwrap().unwrap();
        let mut f = std::fs::File::from(inbox.take(&h.token, 1).unwrap().pop().unwrap());
        std::io::Write::write_all(&mut f, b"new").unwrap();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"new",
            "truncated, then written"
        );
        let e = output_file(&vm, &base.join("no-dir/out.h264")).unwrap_err();
        assert_eq!(e.failure, Failure::Invalid);
        assert!(e.message.contains("cannot create the output file"), "{e}");

        // The migration: a key the VMM would take, a target that listens.
        let key = base.join("key");
        std::fs::write(&key, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let target = base.join("target.sock");
        let listener = std::os::unix::net::UnixListener::bind(&target).unwrap();
        let to = format!("unix:{}", target.display());
        let handed = migration(&vm, &base, &to, &key, Some(1)).unwrap().unwrap();
        assert_eq!(inbox.take(&handed.token, 3).unwrap().len(), 3);
        listener.accept().unwrap();
        drop(handed);

        let missing = format!("unix:{}", base.join("nobody.sock").display());
        let e = migration(&vm, &base, &missing, &key, None).unwrap_err();
        assert_eq!(e.failure, Failure::Unreachable, "{e}");
        assert!(e.message.starts_with("cannot connect to the target"), "{e}");
        let e = migration(&vm, &base, &to, &base.join("nokey"), None).unwrap_err();
        assert_eq!(e.failure, Failure::Invalid, "{e}");
        assert!(e.message.contains("cannot open the key file"), "{e}");
        let e = migration(&vm, &base, "nowhere", &key, None).unwrap_err();
        assert_eq!(e.failure, Failure::Invalid, "{e}");
        let _ = std::fs::remove_dir_all(&base);
    }
}
