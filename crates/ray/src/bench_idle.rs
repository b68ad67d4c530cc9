//! `ray bench idle`: the host CPU an idle guest costs, for each way it can wait.
//!
//! The same guest boots three times per run: asleep in `hlt` between its timer deadlines
//! (the default: woken by the VMM's interrupt for input), idling through the VMM's idle
//! port (one exit per 500 µs), and spinning (the baseline: a host CPU per vCPU). The figure
//! is the CPU time of every thread of the VMM process (`/proc/PID/task/*/schedstat`, in
//! ns) over a window once the guest is `ready`, as a percentage of one host CPU.
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use crate::bench::{print_row, BenchVmm, Stats};
use crate::vm::default_guest;

#[derive(Args)]
pub struct IdleBenchArgs {
    /// Runs; each boots the guest once per idle mode.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    /// How long each idle guest is measured.
    #[arg(long, default_value = "3s", value_parser = ray::sizes::parse_duration)]
    pub window: Duration,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `3s`, `500ms` or a plain number of seconds.
const MODES: [&str; 3] = ["hlt", "port", "spin"];

#[derive(Serialize)]
struct IdleReport {
    runs: usize,
    vcpus: u8,
    window_s: f64,
    build: &'static str,
    /// Host CPU of the whole VMM process with the guest asleep in `hlt`, % of one CPU.
    hlt_cpu_percent: Stats,
    /// The same idling through the VMM's idle port.
    port_cpu_percent: Stats,
    /// The same spinning: about `vcpus` x 100 %.
    spin_cpu_percent: Stats,
    /// `hlt` over `spin`, per run.
    hlt_vs_spin_ratio: Stats,
    /// `hlt` over `port`, per run.
    hlt_vs_port_ratio: Stats,
    /// Heartbeats per second of the boot CPU asleep in `hlt` (it wakes for its deadlines).
    hlt_beats_per_s: Stats,
}

/// CPU time of every thread of `pid` so far, ns (the first field of each schedstat).
fn process_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let tasks = format!("/proc/{pid}/task");
    let mut total = 0;
    for t in std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
        let path = t?.path().join("schedstat");
        // A thread that ended since the listing has no schedstat left: it counts zero.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("unexpected {}: {text:?}", path.display()))?;
    }
    Ok(total)
}

/// The boot CPU's heartbeat counter, read through the VM's API.
fn beats(runtime: &Path, id: &str) -> anyhow::Result<u64> {
    let client = ray::client::VmmClient::new(&ray::runtime::vm_dir(runtime, id).join("api.sock"));
    let info: ray_api::vmm::VmInfo = client.call("GET", "/vm", None)?;
    info.heartbeat
        .map(|h| h.counter)
        .context("the guest keeps no heartbeat")
}

pub fn run(a: &IdleBenchArgs, runtime: &Path) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if a.vcpus == 0 {
        bail!("--vcpus must be at least 1");
    }
    let guest = default_guest()?;
    let mut cpu: [Vec<f64>; 3] = Default::default();
    let mut hlt_beats = Vec::new();
    for run in 0..a.runs {
        for (m, mode) in MODES.iter().enumerate() {
            let cfg = ray_api::vmm::VmConfig {
                kernel: guest.display().to_string(),
                initrd: None,
                cmdline: format!("console=ttyS0 ray.poll_ms=0 ray.idle={mode}"),
                vcpus: a.vcpus,
                memory_bytes: 128 << 20,
                devices: Default::default(),
                numa: Vec::new(),
                numa_attribution: Default::default(),
                numa_migration: Default::default(),
            };
            let id = format!("bench-idle-{}-{run}-{mode}", std::process::id());
            let vmm = BenchVmm::start(runtime, &id, &serde_json::to_string(&cfg)?)
                .with_context(|| format!("run {run}, {mode}"))?;
            // Past the boot's own work (APs coming online, the API thread's start).
            std::thread::sleep(Duration::from_millis(200));
            let measured = (|| {
                let (c0, b0, t0) = (
                    process_cpu_ns(vmm.pid())?,
                    beats(runtime, &id)?,
                    Instant::now(),
                );
                std::thread::sleep(a.window);
                let (c1, b1, wall) = (
                    process_cpu_ns(vmm.pid())?,
                    beats(runtime, &id)?,
                    t0.elapsed(),
                );
                let wall_ns = wall.as_nanos() as f64;
                anyhow::Ok((
                    (c1 - c0) as f64 * 100.0 / wall_ns,
                    (b1 - b0) as f64 * 1e9 / wall_ns,
                ))
            })();
            vmm.stop()?;
            let (percent, beats_per_s) = measured?;
            cpu[m].push(percent);
            if *mode == "hlt" {
                hlt_beats.push(beats_per_s);
            }
        }
    }
    let ratio = |over: usize| -> Vec<f64> {
        cpu[0]
            .iter()
            .zip(&cpu[over])
            .map(|(h, o)| h / o.max(f64::MIN_POSITIVE))
            .collect()
    };
    let report = IdleReport {
        runs: a.runs,
        vcpus: a.vcpus,
        window_s: a.window.as_secs_f64(),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        hlt_cpu_percent: Stats::of(&cpu[0]),
        port_cpu_percent: Stats::of(&cpu[1]),
        spin_cpu_percent: Stats::of(&cpu[2]),
        hlt_vs_spin_ratio: Stats::of(&ratio(2)),
        hlt_vs_port_ratio: Stats::of(&ratio(1)),
        hlt_beats_per_s: Stats::of(&hlt_beats),
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "idle guest ({} runs, {} vCPUs, {:.1} s windows, {} build): host CPU of the VMM, % of one CPU",
            report.runs, report.vcpus, report.window_s, report.build
        );
        print_row("asleep in hlt", report.hlt_cpu_percent, "%");
        print_row("idle port", report.port_cpu_percent, "%");
        print_row("spinning", report.spin_cpu_percent, "%");
        print_row("hlt / spin", report.hlt_vs_spin_ratio, "");
        print_row("hlt / port", report.hlt_vs_port_ratio, "");
        print_row("hlt heartbeats", report.hlt_beats_per_s, "/s");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_with_units_and_refuse_nonsense() {
        assert_eq!(
            ray::sizes::parse_duration("3s").unwrap(),
            Duration::from_secs(3)
        );
        assert_eq!(
            ray::sizes::parse_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            ray::sizes::parse_duration("2").unwrap(),
            Duration::from_secs(2)
        );
        for bad in ["0", "-1s", "soon", "", "1h"] {
            let e = ray::sizes::parse_duration(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}
