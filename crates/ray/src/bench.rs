//! `ray bench ...`: benchmarks reported as min/median/max over repeated runs.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::vm::{default_guest, DEFAULT_GUEST_CMDLINE};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Process start -> `ready` on the serial console, and the VMM's memory overhead.
    Boot(BootArgs),
    /// Full snapshot write time and size, and restore-to-running latency.
    Snapshot(SnapshotBenchArgs),
    /// Live migration over loopback and a veth pair: downtime, total time, throughput vs
    /// raw TCP on the same path.
    Migrate(crate::bench_migrate::MigrateBenchArgs),
}

#[derive(Args)]
pub struct SnapshotBenchArgs {
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Guest memory.
    #[arg(long, default_value = "1G", value_parser = ray::sizes::parse_size)]
    pub memory: u64,
    /// How much of it the guest touches before the snapshots.
    #[arg(long, default_value = "256M", value_parser = ray::sizes::parse_size)]
    pub touched: u64,
    /// How much the guest writes between the full snapshot and the incremental one.
    #[arg(long, default_value = "16M", value_parser = ray::sizes::parse_size)]
    pub dirtied: u64,
    /// Where snapshots are written (default: under the runtime directory).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BootArgs {
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    #[arg(long, default_value = "128M", value_parser = ray::sizes::parse_size)]
    pub memory: u64,
    #[arg(long)]
    pub json: bool,
}

/// min / median / max of a sample.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

/// Prints one `name  min .. median .. max unit` line of a benchmark table.
pub fn print_row(name: &str, s: Stats, unit: &str) {
    println!(
        "  {name:<26} min {:>8.2}  median {:>8.2}  max {:>8.2} {unit}",
        s.min, s.median, s.max
    );
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stats {
            min: v.first().copied().unwrap_or(f64::NAN),
            median,
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[derive(Serialize)]
struct BootReport {
    runs: usize,
    vcpus: u8,
    memory_bytes: u64,
    build: &'static str,
    boot_ms: Stats,
    /// VMM RSS minus resident guest RAM (shared libraries counted in full).
    overhead_mib: Stats,
    /// The VMM's private pages (`Private_Clean` + `Private_Dirty` of
    /// /proc/PID/smaps_rollup) minus those of the guest-RAM mapping.
    overhead_private_mib: Stats,
    /// The same figure as `overhead_private_mib`, under the name earlier reports used.
    private_overhead_mib: Stats,
    /// The anonymous part of `overhead_private_mib` (`Anonymous` of smaps_rollup minus the
    /// guest-RAM mapping's): heap, stacks, written data. The rest of the private figure
    /// is pages of the `ray` binary and its libraries that no other process happens to map
    /// (another VMM of the same binary would share them); this part no one can share.
    overhead_anon_mib: Stats,
    guest_resident_mib: Stats,
}

const MIB: f64 = (1 << 20) as f64;

pub fn run(cmd: BenchCommand, runtime: &Path) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Boot(a) => boot(&a, runtime),
        BenchCommand::Snapshot(a) => crate::bench_snapshot::run(&a, runtime),
        BenchCommand::Migrate(a) => crate::bench_migrate::run(&a, runtime),
    }
}

/// Resident memory of a VMM, split into guest RAM and the VMM's own pages.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Everything resident (RSS), bytes.
    pub rss: u64,
    /// Resident guest RAM, bytes.
    pub guest: u64,
    /// Pages of the process no other process maps (Private_Clean + Private_Dirty of
    /// smaps_rollup), guest RAM included, bytes.
    pub private: u64,
    /// The guest-RAM mapping's share of `private`, bytes.
    pub guest_private: u64,
    /// Anonymous pages of the process (`Anonymous` of smaps_rollup), bytes.
    pub anon: u64,
    /// The guest-RAM mapping's share of `anon` (none for a memfd), bytes.
    pub guest_anon: u64,
}

impl Footprint {
    /// RSS minus resident guest RAM, bytes.
    pub fn overhead_rss(&self) -> u64 {
        self.rss.saturating_sub(self.guest)
    }

    /// Private pages minus the guest's: what one more VM really costs, bytes. (The two
    /// files are read one after the other; a guest page faulted in between could make
    /// the difference negative, hence the saturation.)
    pub fn overhead_private(&self) -> u64 {
        self.private.saturating_sub(self.guest_private)
    }

    /// The anonymous part of [`Footprint::overhead_private`], bytes.
    pub fn overhead_anon(&self) -> u64 {
        self.anon.saturating_sub(self.guest_anon)
    }
}

/// Reads the footprint of `pid` from /proc/<pid>/smaps_rollup and /proc/<pid>/smaps.
pub fn footprint(pid: u32) -> anyhow::Result<Footprint> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps_rollup"))?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    parse_footprint(&rollup, &smaps)
        .with_context(|| format!("in /proc/{pid}/smaps: is {pid} a running VMM?"))
}

/// The size in bytes of a `Field:   123 kB` line's value.
fn kib(rest: &str) -> u64 {
    rest.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .unwrap_or(0)
        * 1024
}

/// `Private_Clean` + `Private_Dirty` of one smaps entry (or of smaps_rollup), if `line` is
/// one of the two.
fn private_kib(line: &str) -> Option<u64> {
    line.strip_prefix("Private_Clean:")
        .or_else(|| line.strip_prefix("Private_Dirty:"))
        .map(kib)
}

/// A footprint from the text of smaps_rollup (the process's private pages) and smaps
/// (RSS, and the guest-RAM mapping `/memfd:ray-guest-ram`).
fn parse_footprint(rollup: &str, smaps: &str) -> anyhow::Result<Footprint> {
    let anon_kib = |line: &str| line.strip_prefix("Anonymous:").map(kib);
    let mut f = Footprint {
        private: rollup.lines().filter_map(private_kib).sum(),
        anon: rollup.lines().filter_map(anon_kib).sum(),
        ..Footprint::default()
    };
    let (mut in_guest, mut found) = (false, false);
    for line in smaps.lines() {
        if is_vma_header(line) {
            in_guest = line.contains("/memfd:ray-guest-ram");
            found |= in_guest;
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            f.rss += kib(rest);
            if in_guest {
                f.guest += kib(rest);
            }
        } else if let Some(private) = private_kib(line).filter(|_| in_guest) {
            f.guest_private += private;
        } else if let Some(anon) = anon_kib(line).filter(|_| in_guest) {
            f.guest_anon += anon;
        }
    }
    if !found {
        bail!("no guest RAM (/memfd:ray-guest-ram)");
    }
    Ok(f)
}

/// A VMA header line of smaps starts with `start-end` in hex.
fn is_vma_header(line: &str) -> bool {
    line.split_whitespace().next().is_some_and(|range| {
        range.split_once('-').is_some_and(|(a, b)| {
            !a.is_empty() && a.chars().chain(b.chars()).all(|c| c.is_ascii_hexdigit())
        })
    })
}

fn boot(a: &BootArgs, runtime: &Path) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let guest = default_guest()?;
    let cfg = ray_api::vmm::VmConfig {
        kernel: guest.display().to_string(),
        initrd: None,
        cmdline: DEFAULT_GUEST_CMDLINE.into(),
        vcpus: a.vcpus,
        memory_bytes: a.memory,
    };
    let cfg_json = serde_json::to_string(&cfg)?;
    let exe = std::env::current_exe()?;
    let bar = (!a.json).then(|| {
        let b = indicatif::ProgressBar::new(a.runs as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("boot {bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let (mut boot_ms, mut overhead, mut private, mut anon, mut guest_res) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.runs {
        let id = format!("bench-boot-{}-{i}", std::process::id());
        let dir = ray::runtime::vm_dir(runtime, &id);
        std::fs::create_dir_all(&dir)?;
        let t0 = Instant::now();
        let mut child = Command::new(&exe)
            .args([
                "vmm",
                "--id",
                &id,
                "--start",
                "--attach",
                "--config-json",
                &cfg_json,
            ])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = loop {
            match lines.next() {
                Some(Ok(l)) if l.trim_end() == "ready" => break Some(t0.elapsed()),
                Some(Ok(_)) => continue,
                _ => break None,
            }
        };
        let Some(ready) = ready else {
            let _ = child.kill();
            bail!(
                "run {i}: the guest never printed `ready` (see {})",
                dir.join("serial.log").display()
            );
        };
        // Let the VMM settle (API thread up, vCPU loops steady) before sampling memory.
        std::thread::sleep(Duration::from_millis(50));
        let fp = footprint(child.id());
        // SAFETY: plain kill(2) of our own child process; done before `?` so that a failed
        // measurement never leaves a VM running.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let fp = fp?;
        // Drain the rest of the output so the VMM never blocks on a full pipe.
        for _ in lines {}
        child.wait()?;
        let _ = std::fs::remove_dir_all(&dir);
        boot_ms.push(ready.as_secs_f64() * 1e3);
        overhead.push(fp.overhead_rss() as f64 / MIB);
        private.push(fp.overhead_private() as f64 / MIB);
        anon.push(fp.overhead_anon() as f64 / MIB);
        guest_res.push(fp.guest as f64 / MIB);
        if let Some(b) = &bar {
            b.set_message(format!("{:.1} ms", ready.as_secs_f64() * 1e3));
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let report = BootReport {
        runs: a.runs,
        vcpus: a.vcpus,
        memory_bytes: a.memory,
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        boot_ms: Stats::of(&boot_ms),
        overhead_mib: Stats::of(&overhead),
        overhead_private_mib: Stats::of(&private),
        private_overhead_mib: Stats::of(&private),
        overhead_anon_mib: Stats::of(&anon),
        guest_resident_mib: Stats::of(&guest_res),
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "boot ({} runs, {} vCPU, {} MiB, {} build)",
            report.runs,
            report.vcpus,
            report.memory_bytes >> 20,
            report.build
        );
        print_row("start -> ready", report.boot_ms, "ms");
        print_row("VMM overhead (RSS)", report.overhead_mib, "MiB");
        print_row("VMM overhead (private)", report.overhead_private_mib, "MiB");
        print_row("  of which anonymous", report.overhead_anon_mib, "MiB");
        print_row("guest resident", report.guest_resident_mib, "MiB");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_odd_and_even_samples() {
        let s = Stats::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        let s = Stats::of(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!(s.median, 2.5);
    }

    #[test]
    fn own_smaps_without_guest_ram_is_an_error() {
        let err = footprint(std::process::id()).unwrap_err();
        assert!(format!("{err:#}").contains("no guest RAM"), "{err:#}");
    }

    const ROLLUP: &str = "\
55d0c0000000-7ffd00000000 ---p 00000000 00:00 0                          [rollup]
Rss:                6100 kB
Pss:                4322 kB
Shared_Clean:       2012 kB
Shared_Dirty:          0 kB
Private_Clean:      3000 kB
Private_Dirty:      1088 kB
Anonymous:           600 kB
Private_Hugetlb:       0 kB
";

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fe:00 10011169                   /usr/bin/ray
Size:               1024 kB
Rss:                1000 kB
Shared_Clean:        100 kB
Private_Clean:       900 kB
Private_Dirty:         0 kB
7f5733612000-7f573b612000 rw-s 00000000 00:01 1066                       /memfd:ray-guest-ram (deleted)
Size:             131072 kB
Rss:                 148 kB
Shared_Dirty:         20 kB
Private_Clean:         8 kB
Private_Dirty:       120 kB
Anonymous:             0 kB
Private_Hugetlb:       0 kB
7ffc27d8d000-7ffc27dae000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  36 kB
Private_Dirty:        36 kB
Anonymous:            36 kB
";

    #[test]
    fn footprint_takes_private_pages_from_the_rollup_minus_the_guest_mapping() {
        let f = parse_footprint(ROLLUP, SMAPS).unwrap();
        let k = 1024;
        assert_eq!(f.rss, (1000 + 148 + 36) * k);
        assert_eq!(f.guest, 148 * k);
        assert_eq!(f.private, (3000 + 1088) * k);
        assert_eq!(f.guest_private, (8 + 120) * k);
        assert_eq!(f.overhead_rss(), (1000 + 36) * k);
        assert_eq!(f.overhead_private(), (3000 + 1088 - 128) * k);
        assert_eq!(f.anon, 600 * k);
        assert_eq!(f.guest_anon, 0);
        assert_eq!(f.overhead_anon(), 600 * k);
    }

    #[test]
    fn footprint_never_goes_negative_and_needs_guest_ram() {
        let f = Footprint {
            private: 1,
            guest_private: 2,
            ..Footprint::default()
        };
        assert_eq!(f.overhead_private(), 0);
        let no_guest = SMAPS.replace("/memfd:ray-guest-ram", "/memfd:other");
        let err = parse_footprint(ROLLUP, &no_guest).unwrap_err();
        assert!(err.to_string().contains("no guest RAM"), "{err}");
    }
}
