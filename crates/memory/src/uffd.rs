//! A minimal userfaultfd: missing-page faults of registered ranges are reported on a file
//! descriptor and resolved by copying a page range in (`UFFDIO_COPY`) or mapping zeros
//! (`UFFDIO_ZEROPAGE`). Faults from the kernel (KVM reading guest memory for a vCPU, a
//! `write(2)` from guest memory) are reported like the process's own.
//!
//! The kernel ABI (`linux/userfaultfd.h`) is written out here: the `libc` crate has the
//! system call number but not the structures.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFD_API: u64 = 0xaa;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// `_IOWR(0xaa, 0x3f, struct uffdio_api)`
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xaa, 0x00, struct uffdio_register)`
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOR(0xaa, 0x01, struct uffdio_range)`
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
/// `_IOR(0xaa, 0x02, struct uffdio_range)`
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
/// `_IOWR(0xaa, 0x03, struct uffdio_copy)`
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
/// `_IOWR(0xaa, 0x04, struct uffdio_zeropage)`
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
/// `_IO(0xaa, 0x00)` on /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes; for a page fault, `arg` holds flags, address, thread id.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

/// One userfaultfd.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
}

/// How resolving a range ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The whole range was placed.
    Done,
    /// Part or all of the range was present already (placed by someone else); the rest
    /// was placed page by page.
    SomePresent,
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Userfault {
    /// A non-blocking userfaultfd that also sees faults taken in the kernel (needs
    /// CAP_SYS_PTRACE, `vm.unprivileged_userfaultfd = 1`, or access to /dev/userfaultfd).
    pub fn new() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the system call takes flags and returns a new descriptor or -1.
        let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
        if fd < 0 {
            let first = io::Error::last_os_error();
            // SAFETY: open(2) of a device path given as a C string literal.
            let dev =
                unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            if dev < 0 {
                return Err(first);
            }
            // SAFETY: `dev` was just opened and is owned by nothing else.
            let dev = unsafe { OwnedFd::from_raw_fd(dev) };
            // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags as its argument.
            fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            if fd < 0 {
                return Err(first);
            }
        }
        // SAFETY: `fd` is a new descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let uffd = Self { fd };
        let fd = uffd.fd.as_raw_fd();
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `api` is.
        check(unsafe { libc::ioctl(fd, UFFDIO_API, &mut api) })?;
        Ok(uffd)
    }

    /// Reports missing-page faults in `[start, start + len)` (page aligned, mapped).
    pub fn register(&self, start: usize, len: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`; it only
        // changes how faults of the range are handled.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) })
    }

    /// Stops reporting faults of the range; threads waiting on one retry it as an ordinary
    /// fault.
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let range = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &range) })
    }

    /// Wakes threads waiting on faults of the range (resolved by someone else).
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let range = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &range) })
    }

    /// Places `src` at `dst` (page aligned; `src.len()` a whole number of pages) in the
    /// registered range and wakes the threads waiting there. Pages present already are
    /// left as they are.
    pub fn copy(&self, dst: usize, src: &[u8]) -> io::Result<Resolved> {
        match self.copy_range(dst, src) {
            Ok(()) => Ok(Resolved::Done),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let page = crate::PAGE_SIZE as usize;
                for (i, p) in src.chunks(page).enumerate() {
                    match self.copy_range(dst + i * page, p) {
                        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
                        _ => {}
                    }
                }
                Ok(Resolved::SomePresent)
            }
            Err(e) => Err(e),
        }
    }

    fn copy_range(&self, dst: usize, src: &[u8]) -> io::Result<()> {
        loop {
            let mut c = UffdioCopy {
                dst: dst as u64,
                src: src.as_ptr() as u64,
                len: src.len() as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `len` bytes at `src` (a live slice of that length)
            // into the registered range at `dst`; it writes only `c` in our memory.
            let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) };
            if ret == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                // The address space changed under the copy: whatever was copied stays;
                // the rest is tried again.
                continue;
            }
            return Err(e);
        }
    }

    /// Maps zeros at `[dst, dst + len)` (page aligned) and wakes the threads waiting there.
    pub fn zero(&self, dst: usize, len: usize) -> io::Result<()> {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: dst as u64,
                len: len as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one `struct uffdio_zeropage`.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) };
        match check(ret) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// The addresses of the page faults queued now (at most `max`); empty if none is.
    pub fn read_faults(&self, max: usize) -> io::Result<Vec<usize>> {
        let mut msgs = vec![
            UffdMsg {
                event: 0,
                reserved1: 0,
                reserved2: 0,
                reserved3: 0,
                arg: [0; 3],
            };
            max.max(1)
        ];
        let size = std::mem::size_of::<UffdMsg>();
        // SAFETY: read(2) into `msgs`, a buffer of `msgs.len() * size` bytes we own; the
        // kernel writes whole messages only.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                msgs.len() * size,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(Vec::new()),
                _ => Err(e),
            };
        }
        Ok(msgs[..n as usize / size]
            .iter()
            .filter(|m| m.event == UFFD_EVENT_PAGEFAULT)
            .map(|m| m.arg[1] as usize)
            .collect())
    }
}

impl AsRawFd for Userfault {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_and_argument_layouts_match_the_kernels() {
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
        assert_eq!(std::mem::size_of::<UffdioRange>(), 16);
    }
}
