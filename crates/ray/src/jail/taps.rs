//! The TAPs of a jailed VMM's NICs. Making a TAP needs CAP_NET_ADMIN, which the VMM no
//! longer has: the keeper makes a missing one, persistent and owned by the VM's uid (the
//! VMM can then attach to it), and removes it after the VMM ends, as an unjailed VMM's
//! own TAP goes with it. A TAP that exists is used as it is (it must be unowned or owned by
//! the VM's uid).
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use ray_devices::virtio::tap;

const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;

/// TAPs the keeper made.
pub struct MadeTaps(Vec<String>);

fn set(
    file: &File,
    request: libc::c_ulong,
    value: libc::c_ulong,
    what: &str,
    name: &str,
) -> Result<(), String> {
    // SAFETY: TUNSETPERSIST and TUNSETOWNER take their value as the argument itself.
    if unsafe { libc::ioctl(file.as_raw_fd(), request, value) } != 0 {
        return Err(format!(
            "cannot {what} TAP {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Enters the network namespace bound at `path` (the keeper is single-threaded: the
/// whole process moves, and the VMM it clones is born there).
pub fn enter_netns(path: &Path) -> Result<(), String> {
    let ns = File::open(path)
        .map_err(|e| format!("cannot open network namespace {}: {e}", path.display()))?;
    // SAFETY: setns with a namespace descriptor we hold.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "cannot enter network namespace {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Makes each of `names` that is missing in this network namespace, for `uid`.
pub fn make_missing(names: &[String], uid: u32) -> Result<MadeTaps, String> {
    let mut made = MadeTaps(Vec::new());
    for name in names {
        let c = std::ffi::CString::new(name.as_str())
            .map_err(|_| format!("TAP name {name:?} has a NUL byte"))?;
        // SAFETY: a NUL-terminated name.
        if unsafe { libc::if_nametoindex(c.as_ptr()) } != 0 {
            continue;
        }
        let result = tap::open(name, None).and_then(|file| {
            set(
                &file,
                TUNSETOWNER,
                libc::c_ulong::from(uid),
                "hand over",
                name,
            )?;
            set(&file, TUNSETPERSIST, 1, "keep", name)
        });
        if let Err(e) = result {
            made.remove();
            return Err(e);
        }
        made.0.push(name.clone());
    }
    Ok(made)
}

impl MadeTaps {
    /// Removes the TAPs made here (no longer persistent, they go with the last file).
    pub fn remove(self) {
        for name in self.0 {
            if let Err(e) =
                tap::open(&name, None).and_then(|f| set(&f, TUNSETPERSIST, 0, "remove", &name))
            {
                tracing::warn!("{e}");
            }
        }
    }
}
