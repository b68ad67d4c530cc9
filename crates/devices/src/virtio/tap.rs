//! Opening a TAP interface for a virtio-net device: /dev/net/tun with IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE, non-blocking, with the 12-byte header of
//! VERSION_1 devices. An interface that does not exist is created (it goes away with the
//! VMM; a TAP made without `multi_queue` is opened without it); one in another network namespace is opened from a short-lived thread that
//! enters that namespace, so the VMM itself stays where it is.
//!
//! Multi-queue lets a migration target attach to the interface while the source still
//! holds it: the target's queue stays detached (no packets) until it resumes, and the
//! source detaches its own when it pauses, so packets go to whichever VM runs.
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str, flags: libc::c_short) -> IfReq {
    let mut r = IfReq {
        name: [0; 16],
        flags,
        _pad: [0; 22],
    };
    let n = name.len().min(15);
    r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    r
}

fn io_err(what: &str, name: &str) -> String {
    format!("{what} TAP {name}: {}", std::io::Error::last_os_error())
}

/// Opens (or creates) TAP `name` in network namespace `netns` (a name under /run/netns;
/// None: ours). A process that already runs in that namespace (a jailed VMM, which may
/// not enter one) opens it directly.
pub fn open(name: &str, netns: Option<&str>) -> Result<File, String> {
    match netns {
        None => open_here(name),
        Some(ns) if in_netns(&format!("/run/netns/{ns}")) => open_here(name),
        Some(ns) => {
            let path = format!("/run/netns/{ns}");
            let ns_file = File::open(&path)
                .map_err(|e| format!("cannot open network namespace {ns} ({path}): {e}"))?;
            let tap = name.to_string();
            let inside = path.clone();
            std::thread::Builder::new()
                .name("netns".into())
                .spawn(move || {
                    // SAFETY: setns on this thread only, with a namespace descriptor we hold;
                    // the thread ends right after, so no other code runs in the namespace.
                    if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(format!(
                            "cannot enter network namespace {inside}: {}",
                            std::io::Error::last_os_error()
                        ));
                    }
                    open_here(&tap)
                })
                .map_err(|e| format!("cannot start a thread to enter {path}: {e}"))?
                .join()
                .map_err(|_| "the namespace thread panicked".to_string())?
        }
    }
}

/// Whether this thread's network namespace is the one bound at `path`.
fn in_netns(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    id(path).is_some() && id(path) == id("/proc/thread-self/ns/net")
}

fn open_here(name: &str) -> Result<File, String> {
    // SAFETY: a plain open of a NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io_err("cannot open /dev/net/tun for", name));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    let set = |flags| {
        let req = ifreq(name, flags);
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is.
        unsafe { libc::ioctl(fd, TUNSETIFF, &req) == 0 }
    };
    // A TAP made without multi_queue refuses IFF_MULTI_QUEUE: it still works, only not
    // for a hand-over to a migration target on the same host.
    if !set(flags | IFF_MULTI_QUEUE) && !set(flags) {
        return Err(io_err("cannot attach to", name));
    }
    let hdr: libc::c_int = 12;
    // SAFETY: TUNSETVNETHDRSZ reads one int.
    if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &hdr) } != 0 {
        return Err(io_err("cannot set the virtio header size of", name));
    }
    Ok(file)
}

/// Attaches or detaches this descriptor's queue: a detached queue gets no packets.
pub fn set_attached(tap: &File, attached: bool) -> Result<(), String> {
    let flags = if attached {
        IFF_ATTACH_QUEUE
    } else {
        IFF_DETACH_QUEUE
    };
    let req = ifreq("", flags);
    // SAFETY: TUNSETQUEUE reads one ifreq, which `req` is.
    if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETQUEUE, &req) } != 0 {
        return Err(format!(
            "cannot {} a TAP queue: {}",
            if attached { "attach" } else { "detach" },
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
