//! `ray bench ...`: benchmarks reported as min/median/max over repeated runs.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ray::client::VmmClient;
use ray_api::vmm::{ConsoleInput, ConsoleTail};
use ray_vmm::metrics::Footprint;
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
    /// Host CPU used by an idle guest: asleep in `hlt`, idling through the VMM's idle
    /// port, spinning.
    Idle(crate::bench_idle::IdleBenchArgs),
    /// The cluster control plane on a real etcd: steady load per 100 hosts from simulated
    /// agents (create, drain and failover times come with the controller).
    Cluster(crate::bench_cluster::ClusterBenchArgs),
    /// virtio-blk from our guest vs a host O_DIRECT process on the same file: sequential
    /// 1 MiB read/write, 4 KiB random read at QD1 and QD32, exits per request.
    Blk(crate::bench_blk::BlkBenchArgs),
    /// virtio-net on a TAP vs a veth pair between two namespaces: UDP both ways at 64 and
    /// 1514-byte frames, ping round trips, exits per packet.
    Net(crate::bench_net::NetBenchArgs),
    /// NUMA: dirty-ring attribution's host CPU at a guest dirty rate, and move_pages vs
    /// memcpy, locality before/after and convergence from the two-node QEMU test.
    Numa(crate::bench_numa::NumaBenchArgs),
    /// An emulated 1920x1080 display over VNC: guest draw -> pixels at a viewer, full-screen
    /// updates per second, against a memcpy of the frame.
    Display(crate::bench_display::DisplayBenchArgs),
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
    /// Run the VMMs from this `ray` binary instead of this one (to compare two builds
    /// under the same benchmark).
    #[arg(long, hide = true, value_name = "PATH")]
    pub vmm_exe: Option<std::path::PathBuf>,
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
    /// How the guest reaches PCI configuration space: the ECAM window of the MCFG table
    /// (the guest's default), ports 0xcf8/0xcfc (`ray.pci=ports` on its command line), or
    /// both, run by run in turn, with ports as the baseline.
    #[arg(long, value_enum, default_value_t = PciConfig::Ecam)]
    pub pci_config: PciConfig,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum PciConfig {
    Ecam,
    Ports,
    Both,
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
    /// The mechanism of the runs above: `ecam` or `ports`.
    pci_config: &'static str,
    /// PCI configuration accesses until `ready` (each one vCPU exit).
    pci_config_exits: Stats,
    /// With `--pci-config both`: the same boot through the ports, in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    ports_baseline: Option<PortsBaseline>,
}

#[derive(Serialize)]
struct PortsBaseline {
    boot_ms: Stats,
    pci_config_exits: Stats,
    /// Median boot time through ECAM over the median through the ports.
    boot_ms_ratio: f64,
    /// The same for the PCI configuration exits.
    pci_config_exits_ratio: f64,
}

/// PCI configuration accesses the VMM served so far (`GET /metrics`), both mechanisms.
fn pci_config_exits(client: &VmmClient) -> anyhow::Result<u64> {
    let a = client.raw("GET", "/metrics", None)?;
    let lines: Vec<u64> = String::from_utf8_lossy(&a.body)
        .lines()
        .filter(|l| l.starts_with("ray_pci_config_accesses_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    if lines.is_empty() {
        bail!("the VMM's /metrics has no ray_pci_config_accesses_total");
    }
    Ok(lines.iter().sum())
}

const MIB: f64 = (1 << 20) as f64;

pub fn run(cmd: BenchCommand, runtime: &Path) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Boot(a) => boot(&a, runtime),
        BenchCommand::Snapshot(a) => crate::bench_snapshot::run(&a, runtime),
        BenchCommand::Migrate(a) => crate::bench_migrate::run(&a, runtime),
        BenchCommand::Idle(a) => crate::bench_idle::run(&a, runtime),
        BenchCommand::Cluster(a) => crate::bench_cluster::run(&a),
        BenchCommand::Blk(a) => crate::bench_blk::run(&a, runtime),
        BenchCommand::Net(a) => crate::bench_net::run(&a, runtime),
        BenchCommand::Numa(a) => crate::bench_numa::run(&a, runtime),
        BenchCommand::Display(a) => crate::bench_display::run(&a, runtime),
    }
}

/// The footprint of the VMM `pid` (one read of /proc/PID/smaps), which must map guest RAM.
fn footprint(pid: u32) -> anyhow::Result<Footprint> {
    let f = Footprint::of_pid(pid).with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    if f.guest_size == 0 {
        bail!("no guest RAM (/memfd:ray-guest-ram) in /proc/{pid}/smaps: is {pid} a running VMM?");
    }
    Ok(f)
}

/// A VMM started for a benchmark (`ray vmm --start --attach`), its console on a pipe that
/// a thread drains once the guest is `ready` (so the VMM never blocks on a full pipe);
/// stopped and its directory removed when dropped.
pub struct BenchVmm {
    dir: std::path::PathBuf,
    child: std::process::Child,
    drain: Option<std::thread::JoinHandle<()>>,
    /// Process start -> `ready` on the console.
    pub ready: Duration,
}

impl BenchVmm {
    pub fn start(runtime: &Path, id: &str, cfg_json: &str) -> anyhow::Result<Self> {
        Self::start_with_env(runtime, id, cfg_json, &[])
    }

    /// [`start`](Self::start) with `env` set for the VMM process.
    pub fn start_with_env(
        runtime: &Path,
        id: &str,
        cfg_json: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let dir = ray::runtime::vm_dir(runtime, id);
        std::fs::create_dir_all(&dir)?;
        let t0 = Instant::now();
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "vmm",
                "--id",
                id,
                "--start",
                "--attach",
                "--config-json",
                cfg_json,
            ])
            .arg("--dir")
            .arg(&dir)
            // The VMM's own log lines would mix with the report.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let mut vmm = BenchVmm {
            dir,
            child,
            drain: None,
            ready: Duration::ZERO,
        };
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.trim_end() == "ready" => break,
                Some(Ok(_)) => continue,
                _ => bail!(
                    "the guest never printed `ready` (see {})",
                    vmm.dir.join("serial.log").display()
                ),
            }
        }
        vmm.ready = t0.elapsed();
        vmm.drain = Some(std::thread::spawn(move || lines.for_each(drop)));
        Ok(vmm)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The guest's shell through the VMM's API (console input, answers from its output).
    pub fn shell(&self) -> GuestShell {
        GuestShell {
            client: VmmClient::new(&self.dir.join("api.sock")),
            seen: 0,
        }
    }

    /// Stops the VMM (SIGTERM) and removes its directory.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.end()
    }

    fn end(&mut self) -> anyhow::Result<()> {
        let Some(drain) = self.drain.take() else {
            return Ok(());
        };
        // SAFETY: plain kill(2) of our own child process.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.child.wait()?;
        let _ = drain.join();
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

impl Drop for BenchVmm {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

/// A benchmark guest's shell, driven over the VMM's API.
pub struct GuestShell {
    pub client: VmmClient,
    /// Console offset up to which answers have been read.
    seen: u64,
}

impl GuestShell {
    /// All vCPU exits so far (every reason), from `GET /metrics`.
    pub fn exits(&self) -> anyhow::Result<u64> {
        let a = self.client.raw("GET", "/metrics", None)?;
        Ok(String::from_utf8_lossy(&a.body)
            .lines()
            .filter(|l| l.starts_with("ray_vcpu_exits_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum())
    }

    /// Sends `line` and waits (up to 10 minutes) for the guest's answer starting with
    /// `prefix`; an answer starting with `err` is an error.
    pub fn command(&mut self, line: &str, prefix: &str) -> anyhow::Result<String> {
        let body = serde_json::to_vec(&ConsoleInput {
            data: format!("{line}\n"),
        })?;
        let _: serde_json::Value = self.client.call("POST", "/vm/console", Some(body))?;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let tail: ConsoleTail = self.client.call("GET", "/vm/console?bytes=65536", None)?;
            let start = tail.total_bytes - tail.data.len() as u64;
            let skip = self.seen.saturating_sub(start) as usize;
            let fresh = tail.data.get(skip..).unwrap_or_default();
            let mut used = 0;
            for l in fresh.split_inclusive('\n') {
                if !l.ends_with('\n') {
                    break;
                }
                used += l.len();
                let l = l.trim();
                if l.starts_with(prefix) || l.starts_with("err") {
                    self.seen = start + (skip + used) as u64;
                    if l.starts_with("err") {
                        bail!("the guest answered `{line}` with: {l}");
                    }
                    return Ok(l.to_string());
                }
            }
            self.seen = start + (skip + used) as u64;
            if Instant::now() > deadline {
                bail!("the guest did not answer `{line}`");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The number after `name=` in a guest answer such as `disk bench ops=10 ns=2000`.
pub fn field(line: &str, name: &str) -> anyhow::Result<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {name}= in the guest's answer: {line}"))
}

fn boot(a: &BootArgs, runtime: &Path) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let guest = default_guest()?;
    let config = |cmdline: String| -> anyhow::Result<String> {
        Ok(serde_json::to_string(&ray_api::vmm::VmConfig {
            kernel: guest.display().to_string(),
            initrd: None,
            cmdline,
            vcpus: a.vcpus,
            memory_bytes: a.memory,
            devices: Default::default(),
            numa: Vec::new(),
            numa_attribution: Default::default(),
            numa_migration: Default::default(),
        })?)
    };
    let ecam_json = config(DEFAULT_GUEST_CMDLINE.into())?;
    let ports_json = config(format!("{DEFAULT_GUEST_CMDLINE} ray.pci=ports"))?;
    // (mechanism, configuration) of each run, in turn with `both`.
    let kinds: Vec<(&str, &String)> = match a.pci_config {
        PciConfig::Ecam => vec![("ecam", &ecam_json)],
        PciConfig::Ports => vec![("ports", &ports_json)],
        PciConfig::Both => vec![("ecam", &ecam_json), ("ports", &ports_json)],
    };
    let total = a.runs * kinds.len();
    let bar = (!a.json).then(|| {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("boot {bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let (mut boot_ms, mut overhead, mut private, mut anon, mut guest_res, mut exits) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let (mut ports_ms, mut ports_exits) = (Vec::new(), Vec::new());
    for i in 0..total {
        let (kind, cfg_json) = kinds[i % kinds.len()];
        let id = format!("bench-boot-{}-{i}", std::process::id());
        let vmm = BenchVmm::start(runtime, &id, cfg_json).with_context(|| format!("run {i}"))?;
        let ready = vmm.ready;
        // Read at `ready`: the guest has done all its boot-time probing then.
        let pci = pci_config_exits(&vmm.shell().client);
        // Let the VMM settle (API thread up, vCPU loops steady) before sampling memory.
        std::thread::sleep(Duration::from_millis(50));
        // Stopped before `?`, so that a failed measurement never leaves a VM running.
        let fp = footprint(vmm.pid());
        vmm.stop()?;
        let fp = fp?;
        let pci = pci? as f64;
        if kind == "ports" && a.pci_config == PciConfig::Both {
            ports_ms.push(ready.as_secs_f64() * 1e3);
            ports_exits.push(pci);
        } else {
            boot_ms.push(ready.as_secs_f64() * 1e3);
            exits.push(pci);
            overhead.push(fp.vmm_rss() as f64 / MIB);
            private.push(fp.vmm_private() as f64 / MIB);
            anon.push(fp.vmm_anon() as f64 / MIB);
            guest_res.push(fp.guest_resident as f64 / MIB);
        }
        if let Some(b) = &bar {
            b.set_message(format!("{kind} {:.1} ms", ready.as_secs_f64() * 1e3));
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let ports_baseline = (a.pci_config == PciConfig::Both).then(|| {
        let (ms, ex) = (Stats::of(&ports_ms), Stats::of(&ports_exits));
        PortsBaseline {
            boot_ms: ms,
            pci_config_exits: ex,
            boot_ms_ratio: Stats::of(&boot_ms).median / ms.median,
            pci_config_exits_ratio: Stats::of(&exits).median / ex.median,
        }
    });
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
        pci_config: kinds[0].0,
        pci_config_exits: Stats::of(&exits),
        ports_baseline,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "boot ({} runs, {} vCPU, {} MiB, {} build, PCI configuration through {})",
            report.runs,
            report.vcpus,
            report.memory_bytes >> 20,
            report.build,
            report.pci_config
        );
        print_row("start -> ready", report.boot_ms, "ms");
        print_row("PCI config exits", report.pci_config_exits, "");
        print_row("VMM overhead (RSS)", report.overhead_mib, "MiB");
        print_row("VMM overhead (private)", report.overhead_private_mib, "MiB");
        print_row("  of which anonymous", report.overhead_anon_mib, "MiB");
        print_row("guest resident", report.guest_resident_mib, "MiB");
        if let Some(p) = &report.ports_baseline {
            println!("ports 0xcf8/0xcfc, same run (baseline)");
            print_row("start -> ready", p.boot_ms, "ms");
            print_row("PCI config exits", p.pci_config_exits, "");
            println!(
                "  ecam / ports: boot time x{:.3}, PCI config exits x{:.3} (medians)",
                p.boot_ms_ratio, p.pci_config_exits_ratio
            );
        }
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
}
