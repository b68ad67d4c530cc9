//! What DAMON (the kernel's data access monitor) offers on this host, read from its sysfs
//! admin tree without writing anything: whether it is there, which operation sets it
//! has (`vaddr`: a process's virtual addresses; `paddr`: physical memory), and its
//! kdamonds (monitoring threads), each on or off.
//!
//! Read heat for guest memory needs a kdamond of one's own: the kernel adds kdamonds only
//! while none runs (writing `nr_kdamonds` recreates them all), so a host whose only
//! kdamond is on for someone else has none to give. [`DamonStatus::unavailable`] says so.
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where the kernel keeps DAMON's admin tree.
pub const ADMIN: &str = "/sys/kernel/mm/damon/admin";

/// One kdamond as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kdamond {
    pub index: u32,
    /// `state` reads `on`.
    pub on: bool,
    /// The monitoring thread's pid, while on.
    pub pid: Option<u32>,
}

/// DAMON on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamonStatus {
    /// The admin tree exists (a kernel with `CONFIG_DAMON_SYSFS`).
    pub present: bool,
    /// Operation sets the kernel offers (`avail_operations` of a context), when a
    /// context exists to say.
    pub operations: Vec<String>,
    pub kdamonds: Vec<Kdamond>,
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

impl DamonStatus {
    /// Reads the admin tree under `root` (normally [`ADMIN`]).
    pub fn read(root: &Path) -> DamonStatus {
        let kd = root.join("kdamonds");
        let Some(n) = read(&kd.join("nr_kdamonds")).and_then(|n| n.parse::<u32>().ok()) else {
            return DamonStatus {
                present: false,
                operations: Vec::new(),
                kdamonds: Vec::new(),
            };
        };
        let mut operations = Vec::new();
        let kdamonds = (0..n)
            .map(|i| {
                let dir = kd.join(i.to_string());
                if operations.is_empty() {
                    if let Some(ops) = read(&dir.join("contexts/0/avail_operations")) {
                        operations = ops.split_whitespace().map(str::to_string).collect();
                    }
                }
                let on = read(&dir.join("state")).is_some_and(|s| s == "on");
                Kdamond {
                    index: i,
                    on,
                    pid: read(&dir.join("pid"))
                        .and_then(|p| p.parse::<i64>().ok())
                        .filter(|&p| on && p > 0)
                        .map(|p| p as u32),
                }
            })
            .collect();
        DamonStatus {
            present: true,
            operations,
            kdamonds,
        }
    }

    /// This host's DAMON.
    pub fn host() -> DamonStatus {
        DamonStatus::read(Path::new(ADMIN))
    }

    /// Why a VM cannot have a kdamond of its own here, or `None` when one is idle.
    pub fn unavailable(&self) -> Option<String> {
        if !self.present {
            return Some(format!(
                "DAMON is absent: no {ADMIN}/kdamonds (a kernel without CONFIG_DAMON_SYSFS)"
            ));
        }
        if self.kdamonds.is_empty() {
            return Some(
                "DAMON has no kdamond (nr_kdamonds is 0): an operator adds some while none runs"
                    .into(),
            );
        }
        if self.kdamonds.iter().any(|k| !k.on) {
            return None;
        }
        let busy: Vec<String> = self
            .kdamonds
            .iter()
            .map(|k| match k.pid {
                Some(p) => format!("kdamond {} is on (thread {p})", k.index),
                None => format!("kdamond {} is on", k.index),
            })
            .collect();
        Some(format!(
            "DAMON is busy: {}, for another user; the kernel adds kdamonds only while none runs",
            busy.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_without_damon_is_absent_and_says_why() {
        let s = DamonStatus::read(Path::new("/nonexistent/damon/admin"));
        assert!(!s.present);
        let why = s.unavailable().unwrap();
        assert!(why.starts_with("DAMON is absent: no "), "{why}");
    }

    /// This host's tree, read twice the same way (the kdamonds' states are files).
    #[test]
    fn this_hosts_damon_matches_its_sysfs() {
        let s = DamonStatus::host();
        let nr = std::fs::read_to_string(format!("{ADMIN}/kdamonds/nr_kdamonds")).ok();
        assert_eq!(s.present, nr.is_some());
        let Some(nr) = nr else { return };
        assert_eq!(s.kdamonds.len(), nr.trim().parse::<usize>().unwrap());
        for k in &s.kdamonds {
            let state = std::fs::read_to_string(format!("{ADMIN}/kdamonds/{}/state", k.index));
            assert_eq!(k.on, state.unwrap().trim() == "on", "{k:?}");
            assert_eq!(
                k.pid.is_some(),
                k.on,
                "a running kdamond has a thread: {k:?}"
            );
        }
        match s.unavailable() {
            None => assert!(s.kdamonds.iter().any(|k| !k.on)),
            Some(why) => assert!(
                why.starts_with("DAMON is busy: kdamond ") || why.starts_with("DAMON has no"),
                "{why}"
            ),
        }
    }
}
