//! Start-up stamps: CLOCK_MONOTONIC times of the steps of a VMM's start, so a benchmark
//! can break "new process -> guest answers" down into its parts.
//!
//! CLOCK_MONOTONIC is one clock for every process of the host, so a stamp taken here
//! compares with one the benchmark took before it spawned this process. Marks are atomic
//! stores (no allocation, no system call besides the vDSO's clock read); the file is
//! written only when asked for, and only at exit, so timing a start does not slow it.
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The steps of a start, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// `main` of the `ray` binary is entered (dynamic loading and the runtime's set-up
    /// are done).
    Main = 0,
    /// The VMM starts restoring a snapshot (arguments parsed, directory locked, files
    /// opened).
    RestoreBegin = 1,
    /// The snapshot's manifests and state are read and checked.
    Loaded = 2,
    /// Guest memory is mapped (and, for an eagerly verified restore, checked).
    Mapped = 3,
    /// The KVM VM and its vCPUs are built from the state and the vCPU threads run.
    Running = 4,
}

const MARKS: usize = 5;
const NAMES: [&str; MARKS] = ["main", "restore_begin", "loaded", "mapped", "running"];

static STAMPS: [AtomicU64; MARKS] = [const { AtomicU64::new(0) }; MARKS];

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer to a local.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Records that `m` happened now (the first time only: a step is timed where it starts).
pub fn mark(m: Mark) {
    let _ = STAMPS[m as usize].compare_exchange(0, now_ns(), Ordering::Relaxed, Ordering::Relaxed);
}

/// The stamps taken so far, as `(name, ns)`; steps not reached are left out.
pub fn stamps() -> Vec<(&'static str, u64)> {
    NAMES
        .iter()
        .zip(&STAMPS)
        .filter_map(|(n, s)| match s.load(Ordering::Relaxed) {
            0 => None,
            t => Some((*n, t)),
        })
        .collect()
}

/// Writes the stamps as one JSON object `{"<step>_ns": <CLOCK_MONOTONIC ns>, ...}`.
pub fn write(path: &Path) -> std::io::Result<()> {
    let map: serde_json::Map<String, serde_json::Value> = stamps()
        .into_iter()
        .map(|(n, t)| (format!("{n}_ns"), t.into()))
        .collect();
    std::fs::write(
        path,
        serde_json::to_vec(&map).map_err(std::io::Error::other)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_kept_once_and_in_order() {
        mark(Mark::Main);
        let first = stamps()[0];
        mark(Mark::Main);
        assert_eq!(
            stamps()[0],
            first,
            "a step is timed where it first happened"
        );
        mark(Mark::Loaded);
        let s = stamps();
        let loaded = s.iter().find(|(n, _)| *n == "loaded").unwrap().1;
        assert!(loaded >= first.1);
        let path = std::env::temp_dir().join(format!("ray-startup-{}.json", std::process::id()));
        write(&path).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["main_ns"], first.1);
        let _ = std::fs::remove_file(&path);
    }
}
