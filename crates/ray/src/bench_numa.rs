//! `ray bench numa`: what NUMA access attribution costs, and what the page migration
//! policy achieves on a real two-node kernel.
//!
//! - Attribution overhead, on this host: rayvisor's guest with `--numa-attribution ring`
//!   rewrites a 64 MiB region at a steady rate (`dirty 64 RATE`); the figure is the CPU
//!   time of the VMM's `dirty-ring` harvester thread (`/proc/PID/task/TID/schedstat`, ns)
//!   over a window, as a percentage of one host CPU, next to the guest's measured dirty
//!   rate and the ring entries harvested per second.
//! - move_pages against memcpy, locality before/after, moved bytes and convergence time:
//!   from `scripts/numa-qemu-test` (QEMU 7.2 TCG with two NUMA nodes booting Debian's
//!   kernel with `numa-probe`: a region written from node 1's CPUs, the policy deciding,
//!   move_pages moving), run `--qemu-runs` times; each run prints one `NUMA-BENCH` JSON
//!   line. This host has one node, so pages cannot move between nodes here; and TCG
//!   emulates, so those speeds are the emulator's, compared with a memcpy under the same
//!   emulator in the same run.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use ray_api::vmm::{ConsoleInput, VmInfo};
use serde::Serialize;

use crate::bench::{print_row, BenchVmm, Stats};
use crate::vm::default_guest;

#[derive(Args)]
pub struct NumaBenchArgs {
    /// Runs of the attribution measurement (one VM boot each).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The guest's dirty rate, MiB/s.
    #[arg(long, default_value_t = 64)]
    pub rate: u64,
    /// How long each run is measured.
    #[arg(long, default_value = "3s", value_parser = ray::sizes::parse_duration)]
    pub window: Duration,
    /// Runs of the two-node QEMU test (~20 s each); 0 leaves those figures out.
    #[arg(long, default_value_t = 3)]
    pub qemu_runs: usize,
    /// The two-node test script.
    #[arg(long, default_value = "scripts/numa-qemu-test")]
    pub qemu_test: PathBuf,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct AttributionReport {
    runs: usize,
    window_s: f64,
    target_dirty_mib_s: u64,
    /// The harvester thread's CPU, % of one host CPU.
    harvester_cpu_percent: Stats,
    /// Wall time spent inside harvests (all threads, incl. vCPUs with a full ring), %.
    harvest_time_percent: Stats,
    /// What the guest actually wrote, MiB/s.
    guest_dirty_mib_s: Stats,
    /// Ring entries harvested per second. KVM pushes an entry each time it makes a page
    /// writable again after a reset, and on PVM's shadow paging that is more than once
    /// per guest write (~5 entries per rewritten page measured here).
    ring_entries_per_s: Stats,
    /// `ring_entries_per_s` over the guest's dirty pages per second.
    entries_per_dirty_page: Stats,
}

#[derive(Serialize)]
struct QemuReport {
    source: &'static str,
    runs: usize,
    move_gib_s: Stats,
    memcpy_gib_s: Stats,
    move_ratio: Stats,
    locality_before: Stats,
    locality_after: Stats,
    moved_bytes: Stats,
    converge_s: Stats,
}

#[derive(Serialize)]
struct NumaReport {
    build: &'static str,
    attribution: AttributionReport,
    /// Absent with `--qemu-runs 0`.
    #[serde(skip_serializing_if = "Option::is_none")]
    two_node_qemu: Option<QemuReport>,
}

/// CPU time (ns) of the thread named `name` of process `pid`.
fn thread_cpu_ns(pid: u32, name: &str) -> anyhow::Result<u64> {
    let tasks = format!("/proc/{pid}/task");
    for t in std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
        let dir = t?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let text = std::fs::read_to_string(dir.join("schedstat"))?;
        return text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("unexpected schedstat {text:?}"));
    }
    bail!("VMM {pid} has no thread {name}")
}

/// One attribution run: (harvester CPU %, harvest time %, guest MiB/s, ring entries/s).
fn attribution_run(
    runtime: &Path,
    guest: &Path,
    run: usize,
    a: &NumaBenchArgs,
) -> anyhow::Result<[f64; 4]> {
    let cfg = ray_api::vmm::VmConfig {
        kernel: guest.display().to_string(),
        initrd: None,
        cmdline: "console=ttyS0 ray.poll_ms=0".into(),
        vcpus: 1,
        memory_bytes: 256 << 20,
        devices: Default::default(),
        numa: Vec::new(),
        numa_attribution: ray_api::vmm::NumaAttribution::Ring,
        numa_migration: Default::default(),
    };
    let id = format!("bench-numa-{}-{run}", std::process::id());
    let vmm = BenchVmm::start(runtime, &id, &serde_json::to_string(&cfg)?)?;
    let client = ray::client::VmmClient::new(&ray::runtime::vm_dir(runtime, &id).join("api.sock"));
    let body = serde_json::to_vec(&ConsoleInput {
        data: format!("dirty 64 {}\n", a.rate),
    })?;
    let _: serde_json::Value = client.call("POST", "/vm/console", Some(body))?;
    // Past the region's first touches (page faults, not the steady state).
    std::thread::sleep(Duration::from_millis(1500));
    let sample = |info: &VmInfo| -> anyhow::Result<(u64, f64, u64)> {
        let att = info.attribution.as_ref().context("no attribution")?;
        let dirty = info.heartbeat.as_ref().map_or(0, |h| h.dirty_bytes);
        Ok((dirty, att.harvest_ms, att.vcpu_pages.iter().sum()))
    };
    let pid = vmm.pid();
    let c0 = thread_cpu_ns(pid, "dirty-ring")?;
    let s0 = sample(&client.call("GET", "/vm", None)?)?;
    let t0 = Instant::now();
    std::thread::sleep(a.window);
    let c1 = thread_cpu_ns(pid, "dirty-ring")?;
    let s1 = sample(&client.call("GET", "/vm", None)?)?;
    let wall = t0.elapsed().as_secs_f64();
    vmm.stop()?;
    Ok([
        (c1 - c0) as f64 / 1e9 / wall * 100.0,
        (s1.1 - s0.1) / 1e3 / wall * 100.0,
        (s1.0 - s0.0) as f64 / (1u64 << 20) as f64 / wall,
        (s1.2 - s0.2) as f64 / wall,
    ])
}

/// The `NUMA-BENCH` JSON of one run of the two-node test.
fn qemu_run(script: &Path) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(script)
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{} failed: {text}", script.display());
    }
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("NUMA-BENCH: "))
        .with_context(|| format!("{} printed no NUMA-BENCH line: {text}", script.display()))?;
    Ok(serde_json::from_str(line)?)
}

pub fn run(a: &NumaBenchArgs, runtime: &Path) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if a.qemu_runs > 0 && !a.qemu_test.is_file() {
        bail!(
            "{} does not exist: run from the repository's root, give --qemu-test, or --qemu-runs 0 to leave the two-node figures out",
            a.qemu_test.display()
        );
    }
    let guest = default_guest()?;
    let mut att: [Vec<f64>; 4] = Default::default();
    for run in 0..a.runs {
        let r = attribution_run(runtime, &guest, run, a).with_context(|| format!("run {run}"))?;
        for (v, x) in att.iter_mut().zip(r) {
            v.push(x);
        }
    }
    let mut q: [Vec<f64>; 7] = Default::default();
    const KEYS: [&str; 7] = [
        "move_gib_s",
        "memcpy_gib_s",
        "move_ratio",
        "locality_before",
        "locality_after",
        "moved_bytes",
        "converge_s",
    ];
    for run in 0..a.qemu_runs {
        let v = qemu_run(&a.qemu_test).with_context(|| format!("two-node run {run}"))?;
        for (k, out) in KEYS.iter().zip(q.iter_mut()) {
            out.push(
                v[k].as_f64()
                    .with_context(|| format!("NUMA-BENCH has no {k}: {v}"))?,
            );
        }
    }
    let report = NumaReport {
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        attribution: AttributionReport {
            runs: a.runs,
            window_s: a.window.as_secs_f64(),
            target_dirty_mib_s: a.rate,
            harvester_cpu_percent: Stats::of(&att[0]),
            harvest_time_percent: Stats::of(&att[1]),
            guest_dirty_mib_s: Stats::of(&att[2]),
            ring_entries_per_s: Stats::of(&att[3]),
            entries_per_dirty_page: Stats::of(
                &att[3]
                    .iter()
                    .zip(&att[2])
                    .map(|(e, mib)| e / (mib * 256.0).max(f64::MIN_POSITIVE))
                    .collect::<Vec<_>>(),
            ),
        },
        two_node_qemu: (a.qemu_runs > 0).then(|| QemuReport {
            source: "scripts/numa-qemu-test: QEMU 7.2 TCG, 2 nodes, numa-probe (emulated speeds)",
            runs: a.qemu_runs,
            move_gib_s: Stats::of(&q[0]),
            memcpy_gib_s: Stats::of(&q[1]),
            move_ratio: Stats::of(&q[2]),
            locality_before: Stats::of(&q[3]),
            locality_after: Stats::of(&q[4]),
            moved_bytes: Stats::of(&q[5]),
            converge_s: Stats::of(&q[6]),
        }),
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let r = &report.attribution;
    println!(
        "NUMA attribution ({} runs, {:.1} s windows, guest dirtying at {} MiB/s, {} build):",
        r.runs, r.window_s, r.target_dirty_mib_s, report.build
    );
    print_row("harvester CPU", r.harvester_cpu_percent, "% of a CPU");
    print_row("time in harvests", r.harvest_time_percent, "%");
    print_row("guest dirty rate", r.guest_dirty_mib_s, "MiB/s");
    print_row("ring entries", r.ring_entries_per_s, "/s");
    print_row("entries per dirty page", r.entries_per_dirty_page, "");
    if let Some(q) = &report.two_node_qemu {
        println!("two-node QEMU ({} runs; {}):", q.runs, q.source);
        print_row("move_pages", q.move_gib_s, "GiB/s");
        print_row("memcpy", q.memcpy_gib_s, "GiB/s");
        print_row("move_ratio", q.move_ratio, "");
        print_row("locality before", q.locality_before, "");
        print_row("locality after", q.locality_after, "");
        print_row("moved", q.moved_bytes, "bytes");
        print_row("converge", q.converge_s, "s");
    }
    Ok(())
}
