//! The jailed side: what the VMM process does, as root in its new namespaces, before it
//! becomes an unprivileged VMM. Runs single-threaded, right after the keeper's clone.
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{Bind, Plan, ROOT_DIR};

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{} has a NUL byte", p.display()))
}

fn os_err(what: String) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// mount(2) with optional source, type and target.
fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let src_c = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype_c = fstype.map(|t| CString::new(t).unwrap_or_default());
    let data_c = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives across the call.
    let rc = unsafe {
        libc::mount(
            ptr(&src_c),
            target_c.as_ptr(),
            ptr(&fstype_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    if rc != 0 {
        return Err(os_err(format!(
            "cannot mount {} on {}",
            src.map_or_else(
                || fstype.unwrap_or("").to_string(),
                |s| s.display().to_string()
            ),
            target.display()
        )));
    }
    Ok(())
}

/// `path` as seen from the host, re-rooted under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Bind-mounts `bind.path` at the same path under `root`: read-only unless writable, no
/// set-uid or exec, and no device access unless it is a device node.
fn bind(root: &Path, b: &Bind) -> Result<(), String> {
    let target = under(root, &b.path);
    let parent = target.parent().unwrap_or(root);
    std::fs::create_dir_all(parent)
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    // A path under an earlier (read-only) bind is there already: mounted over as it is.
    let made = if b.path.is_dir() {
        std::fs::create_dir_all(&target)
    } else if std::fs::symlink_metadata(&target).is_ok() {
        Ok(())
    } else {
        std::fs::File::create(&target).map(drop)
    };
    made.map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    mount(Some(&b.path), &target, None, libc::MS_BIND, None)?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NOEXEC;
    if !b.writable {
        flags |= libc::MS_RDONLY;
    }
    if !b.device {
        flags |= libc::MS_NODEV;
    }
    mount(None, &target, None, flags, None)
}

/// Builds the private root and pivots into it: a tmpfs on `<vm dir>/jail-root` (mounted in
/// this namespace only) holding the VM's directory, `plan.binds` and a /proc of the new PID
/// namespace; then the tmpfs goes read-only.
pub fn enter_root(plan: &Plan, vm_dir: &Path) -> Result<(), String> {
    // Nothing mounted from here on propagates back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let root = vm_dir.join(ROOT_DIR);
    mount(
        None,
        &root,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some("mode=0755,size=1m"),
    )?;
    let vm = Bind {
        path: vm_dir.to_path_buf(),
        writable: true,
        device: false,
    };
    // Parents before what is under them: a restore's store may hold the VM's directory
    // (read-only over read-write would hide it), a disk may be in the VM's directory.
    let slots = plan.encode_slots.as_ref().map(|path| Bind {
        path: path.clone(),
        writable: false,
        device: false,
    });
    let mut binds: Vec<&Bind> = std::iter::once(&vm)
        .chain(&plan.binds)
        .chain(&slots)
        .collect();
    binds.sort_by_key(|b| b.path.components().count());
    for b in binds {
        bind(&root, b)?;
    }
    let proc_dir = root.join("proc");
    std::fs::create_dir(&proc_dir)
        .map_err(|e| format!("cannot create {}: {e}", proc_dir.display()))?;
    mount(
        None,
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    std::env::set_current_dir(&root)
        .map_err(|e| format!("cannot enter {}: {e}", root.display()))?;
    // pivot_root(".", "."): the old root ends up under the new one, and is detached at once.
    // SAFETY: two NUL-terminated strings that live across the call.
    if unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } != 0 {
        return Err(os_err(format!("cannot pivot_root into {}", root.display())));
    }
    // SAFETY: a NUL-terminated string; MNT_DETACH lazily unmounts the old root.
    if unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(os_err("cannot detach the host's root".into()));
    }
    std::env::set_current_dir("/").map_err(|e| format!("cannot enter the jail's root: {e}"))?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
        None,
    )
}

/// Becomes `plan.uid`/`plan.gid` with no capabilities (bounding, ambient and inheritable
/// sets emptied too) and `no_new_privs`; checks that the effective set is empty.
pub fn drop_privileges(plan: &Plan) -> Result<(), String> {
    // The bounding set goes first: dropping from it needs CAP_SETPCAP, lost with the uid.
    let mut cap = 0;
    // SAFETY: PR_CAPBSET_READ/DROP take a capability number; EINVAL past the last one.
    while unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } >= 0 {
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return Err(os_err(format!(
                "cannot drop capability {cap} from the bounding set"
            )));
        }
        cap += 1;
    }
    // SAFETY: the group list is a valid slice of gid_t for its length.
    if unsafe { libc::setgroups(plan.groups.len(), plan.groups.as_ptr()) } != 0 {
        return Err(os_err(format!("cannot set the groups {:?}", plan.groups)));
    }
    // SAFETY: plain ids.
    if unsafe { libc::setresgid(plan.gid, plan.gid, plan.gid) } != 0 {
        return Err(os_err(format!("cannot become gid {}", plan.gid)));
    }
    // Leaving uid 0 for good empties the permitted and effective sets.
    // SAFETY: plain ids.
    if unsafe { libc::setresuid(plan.uid, plan.uid, plan.uid) } != 0 {
        return Err(os_err(format!("cannot become uid {}", plan.uid)));
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    clear_inheritable()?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(os_err("cannot set no_new_privs".into()));
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    match status.lines().find_map(|l| l.strip_prefix("CapEff:")) {
        Some(v) if v.trim().chars().all(|c| c == '0') => Ok(()),
        other => Err(format!(
            "capabilities are left after dropping them: CapEff {other:?}"
        )),
    }
}

/// capset(2) with every set empty (the inheritable set survives a change of uid).
fn clear_inheritable() -> Result<(), String> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: a v3 header and the two data words it requires, both live across the call.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(os_err("cannot clear the capability sets".into()));
    }
    Ok(())
}

/// This process's pid in the host's PID namespace (read before /proc is the jail's own).
pub fn host_pid() -> Result<u32, String> {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse().ok())
        .ok_or_else(|| "cannot read this process's pid from /proc/self".into())
}

/// Names the jail's UTS namespace after the VM.
pub fn set_hostname(id: &str) -> Result<(), String> {
    // SAFETY: a valid pointer and its length.
    if unsafe { libc::sethostname(id.as_ptr().cast(), id.len()) } != 0 {
        return Err(os_err(format!("cannot set the hostname to {id}")));
    }
    Ok(())
}
