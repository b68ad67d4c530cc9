//! Where a range's pages are: `move_pages` asked for a sample of them. What it can see:
//! the node of every page present (written or read at least once) in this process's
//! mapping. What it cannot: pages never touched (they are on no node yet), nor who uses
//! the pages (that is access attribution).
use std::io;

use crate::sys;

const PAGE: usize = 4096;

/// The nodes of a sample of a range's pages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Residency {
    /// Pages asked about.
    pub sampled: u64,
    /// Of those, pages present (on some node).
    pub present: u64,
    /// Present pages by node, as (node, pages), ascending by node.
    pub by_node: Vec<(u32, u64)>,
}

impl Residency {
    /// Present sampled pages on any of `nodes`.
    pub fn on(&self, nodes: &[u32]) -> u64 {
        self.by_node
            .iter()
            .filter(|(n, _)| nodes.contains(n))
            .map(|(_, c)| c)
            .sum()
    }

    /// Adds another sample's counts to this one.
    pub fn merge(&mut self, other: &Residency) {
        self.sampled += other.sampled;
        self.present += other.present;
        for &(node, count) in &other.by_node {
            match self.by_node.iter_mut().find(|(n, _)| *n == node) {
                Some(e) => e.1 += count,
                None => self.by_node.push((node, count)),
            }
        }
        self.by_node.sort_unstable();
    }
}

/// Asks where at most `max_samples` pages of `len` bytes at `base` are, spread evenly over
/// the range (every page when it has no more).
///
/// # Safety
/// `base..base + len` must be mapped by this process (contents are never touched).
pub unsafe fn residency(base: *mut u8, len: usize, max_samples: usize) -> io::Result<Residency> {
    let pages = len / PAGE;
    let n = pages.min(max_samples.max(1));
    if n == 0 {
        return Ok(Residency::default());
    }
    let stride = pages / n;
    let addrs: Vec<*mut u8> = (0..n)
        .map(|i| base.wrapping_add(i * stride * PAGE))
        .collect();
    // SAFETY: every address lies in the caller's mapping (see `# Safety`).
    let status = unsafe { sys::move_pages(&addrs, None) }?;
    let mut r = Residency {
        sampled: n as u64,
        ..Residency::default()
    };
    for s in status {
        if let Ok(node) = u32::try_from(s) {
            r.present += 1;
            r.merge(&Residency {
                sampled: 0,
                present: 0,
                by_node: vec![(node, 1)],
            });
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_pages_are_present_on_a_node_untouched_ones_on_none() {
        let len = 64 * PAGE;
        // SAFETY: a fresh anonymous mapping.
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
        let base = p.cast::<u8>();
        for i in 0..16 {
            // SAFETY: inside the mapping.
            unsafe { base.add(i * PAGE).write_volatile(1) };
        }
        // SAFETY: our mapping.
        let all = unsafe { residency(base, len, 1000) }.unwrap();
        assert_eq!((all.sampled, all.present), (64, 16));
        assert_eq!(all.on(&[0]), 16);
        // SAFETY: our mapping.
        let some = unsafe { residency(base, len, 8) }.unwrap();
        assert_eq!(
            (some.sampled, some.present),
            (8, 2),
            "every 8th page: 0 and 8"
        );
        let mut both = all.clone();
        both.merge(&some);
        assert_eq!(both.by_node, vec![(0, 18)]);
        // SAFETY: our mapping, unmapped once.
        unsafe { libc::munmap(p, len) };
    }
}
