//! The kernel's NUMA system calls, which neither libc nor nix wrap: `mbind` (a memory
//! policy for a range of our address space), `move_pages` (where pages are, and moving
//! them), and thread CPU affinity.
use std::io;

/// How a range's pages are placed (`mbind` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Only on the given nodes; allocation fails (the guest gets no page) when they are
    /// full.
    Bind,
    /// On the given node while it has room, elsewhere when it is full: the mode for
    /// overcommitted hosts.
    Preferred,
    /// Round-robin over the given nodes, page by page.
    Interleave,
}

const MPOL_PREFERRED: libc::c_int = 1;
const MPOL_BIND: libc::c_int = 2;
const MPOL_INTERLEAVE: libc::c_int = 3;
/// Move pages already present that do not follow the new policy.
const MPOL_MF_MOVE: libc::c_uint = 1 << 1;
/// `move_pages`: move pages mapped by this process only.
const MPOL_MF_MOVE_PAGES: libc::c_int = 1 << 1;

/// A node mask as the kernel reads it: one bit per node in `c_ulong` words.
fn node_mask(nodes: &[u32]) -> Vec<libc::c_ulong> {
    let bits = libc::c_ulong::BITS;
    let top = nodes.iter().copied().max().unwrap_or(0);
    let mut mask = vec![0 as libc::c_ulong; (top / bits + 1) as usize];
    for &n in nodes {
        mask[(n / bits) as usize] |= 1 << (n % bits);
    }
    mask
}

/// Sets the memory policy of `len` bytes at `addr` (page-aligned) to `mode` over `nodes`,
/// moving pages already present that do not follow it.
///
/// # Safety
/// `addr..addr + len` must be mapped by this process; the call changes only where its
/// pages live, never their contents.
pub unsafe fn mbind(addr: *mut u8, len: usize, mode: Mode, nodes: &[u32]) -> io::Result<()> {
    if nodes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a memory policy needs at least one node",
        ));
    }
    let mask = node_mask(nodes);
    let mode = match mode {
        Mode::Bind => MPOL_BIND,
        Mode::Preferred => MPOL_PREFERRED,
        Mode::Interleave => MPOL_INTERLEAVE,
    };
    // maxnode counts bits; the kernel reads (maxnode - 1) of them, hence the + 1.
    let maxnode = mask.len() as libc::c_ulong * libc::c_ulong::from(libc::c_ulong::BITS) + 1;
    // SAFETY: the mask lives for the call and is `maxnode - 1` bits long; the range is the
    // caller's (see `# Safety`); mbind reads no other memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            mode,
            mask.as_ptr(),
            maxnode,
            MPOL_MF_MOVE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where a page is: its node, or why it has none (`-ENOENT`: not present; `-EFAULT`:
/// not mapped), as `move_pages` reports.
pub type PageStatus = i32;

/// `move_pages` over `pages` (page-aligned addresses of ours): with `to`, moves page `i`
/// to node `to[i]`; without, only reports where each page is. Returns each page's status
/// afterwards: its node, or a negative errno (`-ENOENT` for a page not present).
///
/// # Safety
/// Every address must lie in memory this process maps (the kernel checks the mapping and
/// reports `-EFAULT` for pages that are not; contents never change).
pub unsafe fn move_pages(pages: &[*mut u8], to: Option<&[i32]>) -> io::Result<Vec<PageStatus>> {
    if let Some(to) = to {
        if to.len() != pages.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} target nodes for {} pages", to.len(), pages.len()),
            ));
        }
    }
    let mut status = vec![0 as libc::c_int; pages.len()];
    let nodes = to.map_or(std::ptr::null(), |t| t.as_ptr());
    // SAFETY: `pages`, `nodes` (if any) and `status` are arrays of `pages.len()` entries
    // that live for the call; pid 0 is this process.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            pages.len() as libc::c_ulong,
            pages.as_ptr(),
            nodes,
            status.as_mut_ptr(),
            MPOL_MF_MOVE_PAGES,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(status)
}

/// Moves `pages` to `node`, retrying up to `attempts` times those the kernel reports busy
/// (`-EBUSY`, `-EAGAIN`: a page locked or in flight at that moment, which a real run meets
/// now and then). Returns each page's final status.
///
/// # Safety
/// As for [`move_pages`].
pub unsafe fn move_to(pages: &[*mut u8], node: i32, attempts: u32) -> io::Result<Vec<PageStatus>> {
    let to = vec![node; pages.len()];
    // SAFETY: the caller's pages (see `# Safety`).
    let mut status = unsafe { move_pages(pages, Some(&to)) }?;
    for _ in 1..attempts.max(1) {
        let busy: Vec<usize> = (0..status.len())
            .filter(|&i| status[i] == -libc::EBUSY || status[i] == -libc::EAGAIN)
            .collect();
        if busy.is_empty() {
            break;
        }
        let again: Vec<*mut u8> = busy.iter().map(|&i| pages[i]).collect();
        // SAFETY: a subset of the caller's pages.
        let st = unsafe { move_pages(&again, Some(&to[..again.len()])) }?;
        for (k, &i) in busy.iter().enumerate() {
            status[i] = st[k];
        }
    }
    Ok(status)
}

/// Restricts thread `thread` to `cpus`.
pub fn set_affinity(thread: libc::pthread_t, cpus: &[u32]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain bits; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c as usize >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "CPU {c} is beyond the {} a CPU set holds",
                    libc::CPU_SETSIZE
                ),
            ));
        }
        // SAFETY: `c` is below CPU_SETSIZE (checked above), so the bit lies inside `set`.
        unsafe { libc::CPU_SET(c as usize, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; the caller owns `thread`
    // (a live thread of this process).
    let r = unsafe { libc::pthread_setaffinity_np(thread, std::mem::size_of_val(&set), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// The CPUs thread `thread` may run on.
pub fn affinity(thread: libc::pthread_t) -> io::Result<Vec<u32>> {
    // SAFETY: as in `set_affinity`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed; `thread` is live.
    let r = unsafe { libc::pthread_getaffinity_np(thread, std::mem::size_of_val(&set), &mut set) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok((0..libc::CPU_SETSIZE as u32)
        // SAFETY: every `c` is below CPU_SETSIZE, inside `set`.
        .filter(|&c| unsafe { libc::CPU_ISSET(c as usize, &set) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An anonymous private mapping of `pages` pages, unmapped on drop.
    struct Anon(*mut u8, usize);
    impl Anon {
        fn new(pages: usize) -> Self {
            let len = pages * 4096;
            // SAFETY: a fresh anonymous mapping; no memory of ours is touched.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Anon(p.cast(), len)
        }
        fn pages(&self) -> Vec<*mut u8> {
            (0..self.1 / 4096)
                .map(|i| self.0.wrapping_add(i * 4096))
                .collect()
        }
    }
    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: our own mapping, unmapped once.
            unsafe { libc::munmap(self.0.cast(), self.1) };
        }
    }

    #[test]
    fn masks_have_one_bit_per_node_and_no_limit() {
        assert_eq!(node_mask(&[0]), vec![1]);
        assert_eq!(node_mask(&[1, 3]), vec![0b1010]);
        let m = node_mask(&[130]);
        assert_eq!(m.len(), 3);
        assert_eq!(m[2], 1 << 2);
    }

    #[test]
    fn bind_to_node_0_places_touched_pages_there_and_a_missing_node_is_refused() {
        let m = Anon::new(16);
        // SAFETY: our mapping.
        unsafe { mbind(m.0, m.1, Mode::Bind, &[0]) }.unwrap();
        // SAFETY: as above.
        let before = unsafe { move_pages(&m.pages(), None) }.unwrap();
        assert!(before.iter().all(|&s| s == -libc::ENOENT), "{before:?}");
        for p in m.pages() {
            // SAFETY: inside our mapping.
            unsafe { p.write_volatile(1) };
        }
        // SAFETY: as above.
        let after = unsafe { move_pages(&m.pages(), None) }.unwrap();
        assert!(after.iter().all(|&s| s == 0), "{after:?}");
        let missing = crate::Topology::host().unwrap().nodes.last().unwrap().id + 1;
        for mode in [Mode::Bind, Mode::Preferred, Mode::Interleave] {
            // SAFETY: as above.
            let err = unsafe { mbind(m.0, m.1, mode, &[missing]) }.unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{mode:?}");
        }
        // SAFETY: as above.
        let moved = unsafe { move_pages(&m.pages(), Some(&[0; 16])) }.unwrap();
        assert!(moved.iter().all(|&s| s == 0), "{moved:?}");
        // SAFETY: as above.
        let moved = unsafe { move_to(&m.pages(), 0, 3) }.unwrap();
        assert!(moved.iter().all(|&s| s == 0), "{moved:?}");
    }

    #[test]
    fn affinity_round_trips() {
        // SAFETY: pthread_self is always valid.
        let me = unsafe { libc::pthread_self() };
        let before = affinity(me).unwrap();
        set_affinity(me, &before[..1]).unwrap();
        assert_eq!(affinity(me).unwrap(), before[..1]);
        set_affinity(me, &before).unwrap();
        assert!(set_affinity(me, &[1 << 20]).is_err());
    }
}
