//! Lending a directory to a jailed VMM's uid for one request: a POSIX ACL entry
//! `user:UID:rwx` on it (the `system.posix_acl_access` extended attribute), removed again
//! afterwards. Used for a snapshot store outside the VM's directory, which `ray` or
//! `ray web` hands to the VMM as an open directory ([`crate::hand_over`]): the VMM writes
//! there as its own uid, and the entry lets it create the snapshot's directory beside the
//! others without changing the store's owner or mode for anyone else.
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const NAME: &[u8] = b"system.posix_acl_access\0";
const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const NO_ID: u32 = u32::MAX;

/// One ACL entry: (tag, permissions, id).
type Entry = (u16, u16, u32);

fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{} has a NUL byte", p.display()))
}

/// The directory's access ACL: its extended attribute, or the one its mode means.
fn read(dir: &Path) -> Result<Vec<Entry>, String> {
    let c = cpath(dir)?;
    let mut buf = vec![0u8; 4 + 8 * 64];
    // SAFETY: NUL-terminated strings and a buffer of the given length, alive across the call.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            NAME.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENODATA) {
            return Err(format!("cannot read the ACL of {}: {e}", dir.display()));
        }
        let mode = std::fs::metadata(dir)
            .map_err(|e| format!("cannot stat {}: {e}", dir.display()))?
            .mode() as u16;
        return Ok(vec![
            (USER_OBJ, (mode >> 6) & 7, NO_ID),
            (GROUP_OBJ, (mode >> 3) & 7, NO_ID),
            (OTHER, mode & 7, NO_ID),
        ]);
    }
    let buf = &buf[..n as usize];
    if buf.len() < 4 || u32::from_le_bytes(buf[..4].try_into().unwrap_or_default()) != VERSION {
        return Err(format!(
            "the ACL of {} is not one this reads",
            dir.display()
        ));
    }
    Ok(buf[4..]
        .chunks_exact(8)
        .map(|e| {
            (
                u16::from_le_bytes([e[0], e[1]]),
                u16::from_le_bytes([e[2], e[3]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            )
        })
        .collect())
}

/// Writes `entries` back (with the mask they need), or the plain mode when only the three
/// base entries are left.
fn write(dir: &Path, mut entries: Vec<Entry>) -> Result<(), String> {
    entries.retain(|e| e.0 != MASK);
    let named = entries.iter().any(|e| e.0 == USER || e.0 == GROUP);
    let c = cpath(dir)?;
    if !named {
        // SAFETY: NUL-terminated strings alive across the call.
        let rc = unsafe { libc::removexattr(c.as_ptr(), NAME.as_ptr().cast()) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENODATA) {
                return Err(format!("cannot remove the ACL of {}: {e}", dir.display()));
            }
        }
        // The group bits showed the mask: back to the owning group's permissions.
        let perm = |tag| {
            entries
                .iter()
                .find(|e| e.0 == tag)
                .map_or(0, |e| e.1 as u32)
        };
        let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mode =
            (meta.mode() & !0o777) | perm(USER_OBJ) << 6 | perm(GROUP_OBJ) << 3 | perm(OTHER);
        return std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot restore the mode of {}: {e}", dir.display()));
    }
    let mask = entries
        .iter()
        .filter(|e| matches!(e.0, USER | GROUP | GROUP_OBJ))
        .fold(0, |m, e| m | e.1);
    entries.push((MASK, mask, NO_ID));
    entries.sort_by_key(|e| (e.0, e.2));
    let mut buf = VERSION.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        buf.extend(tag.to_le_bytes());
        buf.extend(perm.to_le_bytes());
        buf.extend(id.to_le_bytes());
    }
    // SAFETY: NUL-terminated strings and a buffer of the given length, alive across the call.
    let rc = unsafe {
        libc::setxattr(
            c.as_ptr(),
            NAME.as_ptr().cast(),
            buf.as_ptr().cast(),
            buf.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot set the ACL of {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// `dir` lent to `uid` (read, write, search) until dropped.
#[derive(Debug)]
pub struct Lent {
    dir: PathBuf,
    uid: u32,
    /// It had an entry for `uid` already (another request lent it): left as it was.
    had: bool,
}

/// Lends `dir` to `uid`.
pub fn lend(dir: &Path, uid: u32) -> Result<Lent, String> {
    let mut entries = read(dir)?;
    let had = entries.iter().any(|e| e.0 == USER && e.2 == uid);
    if !had {
        entries.push((USER, 7, uid));
        write(dir, entries)?;
    }
    Ok(Lent {
        dir: dir.to_path_buf(),
        uid,
        had,
    })
}

impl Drop for Lent {
    fn drop(&mut self) {
        if self.had {
            return;
        }
        let undo = read(&self.dir).and_then(|mut entries| {
            entries.retain(|e| !(e.0 == USER && e.2 == self.uid));
            write(&self.dir, entries)
        });
        if let Err(e) = undo {
            tracing::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lent_directory_is_writable_by_the_uid_and_back_as_it_was_after() {
        let dir = std::env::temp_dir().join(format!("ray-acl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        let before = read(&dir).unwrap();
        let lent = lend(&dir, 471_234).unwrap();
        let acl = read(&dir).unwrap();
        assert!(acl.contains(&(USER, 7, 471_234)), "{acl:?}");
        assert!(acl.contains(&(MASK, 7, NO_ID)), "{acl:?}");
        assert!(acl.contains(&(USER_OBJ, 7, NO_ID)) && acl.contains(&(OTHER, 0, NO_ID)));
        // Lending it again while lent changes nothing, and its end leaves the first.
        drop(lend(&dir, 471_234).unwrap());
        assert!(read(&dir).unwrap().contains(&(USER, 7, 471_234)));
        drop(lent);
        assert_eq!(read(&dir).unwrap(), before);
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o750);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
