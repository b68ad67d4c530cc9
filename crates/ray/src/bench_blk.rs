//! `ray bench blk`: our guest's virtio-blk throughput and latency on a pre-filled raw
//! file, against a host process doing the same pattern on the same file with O_DIRECT,
//! in the same run: sequential read and write in 1 MiB requests (4 in flight on both
//! sides by default, `--seq-qd`), 4 KiB random reads at queue depth 1 and 32; and the VMM
//! exits and interrupts each guest request costs. Both I/O engines are measured in the
//! same run, on two VMs whose passes alternate: per-engine figures, `uring_vs_pool`
//! ratios, and the default engine's figures at the top level.
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use ray_api::vmm::{DevicesConfig, DiskConfig, DiskEngine, VmConfig};
use serde::Serialize;

use crate::bench::{field, print_row, BenchVmm, GuestShell, Stats};
use crate::vm::{default_guest, DEFAULT_GUEST_CMDLINE};

#[derive(Args)]
pub struct BlkBenchArgs {
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Size of the disk image.
    #[arg(long, default_value = "1G", value_parser = ray::sizes::parse_size)]
    pub size: u64,
    /// Bytes each sequential pass moves.
    #[arg(long, default_value = "256M", value_parser = ray::sizes::parse_size)]
    pub seq: u64,
    /// Sequential requests in flight (guest and host alike; at most 4). A writer or
    /// reader of a big file keeps several requests queued; at 1 the per-request hand-offs
    /// (kick, wake, interrupt) of the guest's path are not overlapped with the I/O.
    #[arg(long, default_value_t = 4)]
    pub seq_qd: usize,
    /// 4 KiB random reads per QD1 pass (QD32 passes do 8 times as many).
    #[arg(long, default_value_t = 2000)]
    pub rand_ops: u64,
    /// Serve the guest's disk through the host page cache instead of O_DIRECT (the host
    /// baseline stays O_DIRECT).
    #[arg(long)]
    pub buffered: bool,
    /// Where the image goes (default: under the runtime directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

const MIB: f64 = (1 << 20) as f64;
const SEQ_REQ: usize = 1 << 20;
const RAND_REQ: usize = 4096;
const QD: usize = 32;

/// One engine's figures: the guest's, and its ratios to the host baseline of the same run.
#[derive(Serialize)]
struct EngineReport {
    seq_read_ratio: Stats,
    seq_write_ratio: Stats,
    rand_read_qd32_ratio: Stats,
    /// Guest 4 KiB random read at queue depth 1, µs per request.
    qd1_latency_us: Stats,
    guest_seq_read_mib_s: Stats,
    guest_seq_write_mib_s: Stats,
    guest_rand_read_qd32_iops: Stats,
    guest_rand_read_qd1_iops: Stats,
    /// VMM exits (all reasons, MMIO and port I/O included) per guest request, over every
    /// guest pass; the shell's own serial I/O is in it.
    exits_per_request: Stats,
    /// The guest's device interrupts per request.
    irqs_per_request: Stats,
    /// The guest's queue notifications (kicks: each a VM exit to KVM, served by an
    /// ioeventfd, so not in `exits_per_request`) per request.
    kicks_per_request: Stats,
    /// Interrupts and kicks per request of the queue-depth-32 random reads alone.
    qd32_irqs_per_request: Stats,
    qd32_kicks_per_request: Stats,
    /// CPU time of the whole VMM process (its vCPU running the guest, the notifier and the
    /// I/O threads) per request of the queue-depth-32 random reads, µs: what the path
    /// costs, whatever else the host runs.
    qd32_vmm_cpu_us_per_request: Stats,
    /// Context switches (voluntary and not, summed over the VMM's threads) per QD32 request.
    qd32_vmm_switches_per_request: Stats,
    /// `qd32_vmm_cpu_us_per_request` over the host baseline's `host_qd32_cpu_us_per_request`.
    qd32_cpu_ratio: Stats,
}

/// The io_uring engine's guest figures over the worker pool's, run by run (above 1:
/// io_uring is faster; for latency, below 1 is).
#[derive(Serialize)]
struct UringVsPool {
    seq_read: Stats,
    seq_write: Stats,
    rand_read_qd32: Stats,
    rand_read_qd1: Stats,
    qd1_latency: Stats,
}

#[derive(Serialize)]
struct Report {
    runs: usize,
    image_bytes: u64,
    /// Whether the guest's disk was opened with O_DIRECT (as the host baseline is).
    guest_direct: bool,
    /// Requests in flight in the sequential passes, guest and host alike.
    seq_qd: usize,
    /// The engine a disk gets without `engine=`: its figures are the top-level ones.
    default_engine: &'static str,
    /// The host's 1-minute load average before and after the run (2 cores here).
    load_average: [f64; 2],
    seq_read_ratio: Stats,
    seq_write_ratio: Stats,
    rand_read_qd32_ratio: Stats,
    qd1_latency_us: Stats,
    host_seq_read_mib_s: Stats,
    host_seq_write_mib_s: Stats,
    host_rand_read_qd32_iops: Stats,
    host_qd1_latency_us: Stats,
    /// CPU time of the host baseline's QD32 threads per request, µs, and their context
    /// switches per request.
    host_qd32_cpu_us_per_request: Stats,
    host_qd32_switches_per_request: Stats,
    pool: EngineReport,
    uring: EngineReport,
    uring_vs_pool: UringVsPool,
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// CPU time (ns) and context switches a set of threads had so far.
#[derive(Clone, Copy, Default)]
struct Cpu {
    ns: f64,
    switches: f64,
}

impl Cpu {
    /// Per request of `ops`, since `before`: (µs, switches).
    fn per_request(self, before: Cpu, ops: f64) -> (f64, f64) {
        (
            (self.ns - before.ns) / 1e3 / ops,
            (self.switches - before.switches) / ops,
        )
    }

    /// Every thread of process `pid`, from /proc (`schedstat`'s time on a CPU, `status`'s
    /// context switches): a VMM's threads all live as long as its VM.
    fn of_process(pid: u32) -> anyhow::Result<Cpu> {
        let mut cpu = Cpu::default();
        let dir = format!("/proc/{pid}/task");
        for t in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
            let t = t?.path();
            // A thread may end between the listing and the reads: skip it.
            let (Ok(sched), Ok(status)) = (
                std::fs::read_to_string(t.join("schedstat")),
                std::fs::read_to_string(t.join("status")),
            ) else {
                continue;
            };
            cpu.ns += sched
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("unexpected {}/schedstat: {sched}", t.display()))?;
            cpu.switches += status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .sum::<f64>();
        }
        Ok(cpu)
    }

    /// This process, threads that ended included (`getrusage`).
    fn of_self() -> Cpu {
        // SAFETY: an all-zero rusage is a valid value to be overwritten.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes only into `u`.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
        let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
        Cpu {
            ns: (us(u.ru_utime) + us(u.ru_stime)) * 1e3,
            switches: (u.ru_nvcsw + u.ru_nivcsw) as f64,
        }
    }
}

/// Writes `size` bytes of a non-zero pattern, so reads hit real blocks.
fn prefill(path: &Path, size: u64) -> anyhow::Result<()> {
    let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let chunk: Vec<u8> = (0..SEQ_REQ).map(|i| (i * 13 % 251) as u8 | 1).collect();
    let mut at = 0;
    while at < size {
        let n = (size - at).min(SEQ_REQ as u64) as usize;
        f.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("valid layout");
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Self { ptr, len }
    }
    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `len` bytes this struct owns.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

fn direct(path: &Path, write: bool) -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("cannot open {} with O_DIRECT", path.display()))
}

/// xorshift64: the same sequence shape as the guest's.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Host sequential pass with `qd` requests in flight (`qd` threads taking the next 1 MiB
/// in turn, as the guest's driver keeps `qd` sequential requests queued): MiB/s.
fn host_seq(path: &Path, bytes: u64, write: bool, qd: usize) -> anyhow::Result<f64> {
    let f = direct(path, write)?;
    let next_chunk = std::sync::atomic::AtomicU64::new(0);
    let chunks = bytes / SEQ_REQ as u64;
    let t = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..qd)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    let mut buf = Aligned::new(SEQ_REQ);
                    buf.slice().fill(0x5a);
                    loop {
                        let c = next_chunk.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if c >= chunks {
                            return Ok(());
                        }
                        let at = c * SEQ_REQ as u64;
                        if write {
                            f.write_all_at(buf.slice(), at)?;
                        } else {
                            f.read_exact_at(buf.slice(), at)?;
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a host I/O thread panicked"))??;
        }
        Ok(())
    })?;
    if write {
        f.sync_data()?;
    }
    Ok(bytes as f64 / MIB / t.elapsed().as_secs_f64())
}

/// Host 4 KiB random reads with `qd` threads: IOPS.
fn host_rand(path: &Path, size: u64, ops: u64, qd: usize) -> anyhow::Result<f64> {
    let blocks = size / RAND_REQ as u64;
    let t = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..qd)
            .map(|w| {
                s.spawn(move || -> anyhow::Result<()> {
                    let f = direct(path, false)?;
                    let mut buf = Aligned::new(RAND_REQ);
                    let mut x = 0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1);
                    for _ in 0..ops / qd as u64 {
                        let b = next(&mut x) % blocks;
                        f.read_exact_at(buf.slice(), b * RAND_REQ as u64)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a host I/O thread panicked"))??;
        }
        Ok(())
    })?;
    Ok((ops / qd as u64 * qd as u64) as f64 / t.elapsed().as_secs_f64())
}

/// The VM of the benchmark, driven through its API.
/// One guest pass: (ops, bytes, seconds, irqs, exits).
struct Pass {
    ops: f64,
    bytes: f64,
    secs: f64,
    irqs: f64,
    kicks: f64,
    exits: f64,
    /// The VMM's CPU before and after.
    cpu0: Cpu,
    cpu: Cpu,
}

/// One pass of `disk bench` in the guest of the VMM `pid`.
fn pass(
    g: &mut GuestShell,
    pid: u32,
    mode: &str,
    count: u64,
    kib: usize,
    qd: usize,
) -> anyhow::Result<Pass> {
    let e0 = g.exits()?;
    let c0 = Cpu::of_process(pid)?;
    let line = g.command(
        &format!("disk bench {mode} {count} {kib} {qd}"),
        "disk bench",
    )?;
    let c1 = Cpu::of_process(pid)?;
    let e1 = g.exits()?;
    Ok(Pass {
        cpu: c1,
        cpu0: c0,
        ops: field(&line, "ops")?,
        bytes: field(&line, "bytes")?,
        secs: field(&line, "ns")? / 1e9,
        irqs: field(&line, "irqs")?,
        kicks: field(&line, "kicks")?,
        exits: e1.saturating_sub(e0) as f64,
    })
}

pub fn run(a: &BlkBenchArgs, runtime: &Path) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if a.size < (64 << 20) || !a.size.is_multiple_of(1 << 20) {
        bail!("--size must be whole MiB, at least 64 MiB");
    }
    if a.seq == 0 || a.seq > a.size || !a.seq.is_multiple_of(1 << 20) {
        bail!("--seq must be whole MiB, at most --size");
    }
    if a.seq_qd == 0 || a.seq_qd > 4 {
        bail!("--seq-qd must be 1 to 4 (the guest's buffer holds 4 requests of 1 MiB)");
    }
    if a.rand_ops < QD as u64 {
        bail!("--rand-ops must be at least {QD}");
    }
    let dir = a.dir.clone().unwrap_or_else(|| runtime.join("bench-blk"));
    std::fs::create_dir_all(&dir)?;
    let image = dir.join(format!("bench-{}.img", std::process::id()));
    prefill(&image, a.size)?;
    let config = |engine: DiskEngine| -> anyhow::Result<String> {
        let cfg = VmConfig {
            kernel: default_guest()?.display().to_string(),
            initrd: None,
            cmdline: DEFAULT_GUEST_CMDLINE.into(),
            vcpus: 1,
            memory_bytes: 256 << 20,
            numa: Vec::new(),
            numa_attribution: Default::default(),
            numa_migration: Default::default(),
            devices: DevicesConfig {
                rng: false,
                disks: vec![DiskConfig {
                    id: "bench".into(),
                    path: image.display().to_string(),
                    readonly: false,
                    direct: !a.buffered,
                    rate_bytes: None,
                    rate_ops: None,
                    engine,
                }],
                ..Default::default()
            },
        };
        Ok(serde_json::to_string(&cfg)?)
    };
    // One VM per engine on the same image, both up for the whole run: their passes
    // alternate, so that both engines see the same moments of a busy host.
    let pid = std::process::id();
    let result = (|| {
        let pool = BenchVmm::start(
            runtime,
            &format!("bench-blk-pool-{pid}"),
            &config(DiskEngine::Pool)?,
        )?;
        let uring = BenchVmm::start(
            runtime,
            &format!("bench-blk-uring-{pid}"),
            &config(DiskEngine::Uring)?,
        )?;
        let report = measure(
            a,
            &image,
            (&mut pool.shell(), pool.pid()),
            (&mut uring.shell(), uring.pid()),
        );
        pool.stop()?;
        uring.stop()?;
        report
    })();
    let _ = std::fs::remove_file(&image);
    let report = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "virtio-blk, {} runs on a {} MiB pre-filled raw file (guest {} vs host O_DIRECT), \
             sequential QD{}, load average {:.1} -> {:.1}:",
            report.runs,
            report.image_bytes >> 20,
            if report.guest_direct {
                "O_DIRECT"
            } else {
                "buffered"
            },
            report.seq_qd,
            report.load_average[0],
            report.load_average[1],
        );
        let rows: [(&str, Stats, &str); 6] = [
            ("host seq read", report.host_seq_read_mib_s, "MiB/s"),
            ("host seq write", report.host_seq_write_mib_s, "MiB/s"),
            ("host rand QD32", report.host_rand_read_qd32_iops, "IOPS"),
            ("host QD1 latency", report.host_qd1_latency_us, "us"),
            (
                "host QD32 CPU/request",
                report.host_qd32_cpu_us_per_request,
                "us",
            ),
            (
                "host QD32 switches/req",
                report.host_qd32_switches_per_request,
                "",
            ),
        ];
        for (name, s, unit) in rows {
            print_row(name, s, unit);
        }
        for (engine, e) in [("pool", &report.pool), ("uring", &report.uring)] {
            let default = if engine == report.default_engine {
                " (default)"
            } else {
                ""
            };
            println!(" engine {engine}{default}:");
            let rows: [(&str, Stats, &str); 16] = [
                ("seq read ratio", e.seq_read_ratio, "x"),
                ("seq write ratio", e.seq_write_ratio, "x"),
                ("rand read QD32 ratio", e.rand_read_qd32_ratio, "x"),
                ("guest QD1 latency", e.qd1_latency_us, "us"),
                ("guest seq read", e.guest_seq_read_mib_s, "MiB/s"),
                ("guest seq write", e.guest_seq_write_mib_s, "MiB/s"),
                ("guest rand QD32", e.guest_rand_read_qd32_iops, "IOPS"),
                ("guest rand QD1", e.guest_rand_read_qd1_iops, "IOPS"),
                ("exits per request", e.exits_per_request, ""),
                ("irqs per request", e.irqs_per_request, ""),
                ("kicks per request", e.kicks_per_request, ""),
                ("QD32 irqs per request", e.qd32_irqs_per_request, ""),
                ("QD32 kicks per request", e.qd32_kicks_per_request, ""),
                ("QD32 VMM CPU/request", e.qd32_vmm_cpu_us_per_request, "us"),
                ("QD32 VMM switches/req", e.qd32_vmm_switches_per_request, ""),
                ("QD32 CPU vs host", e.qd32_cpu_ratio, "x"),
            ];
            for (name, s, unit) in rows {
                print_row(name, s, unit);
            }
        }
        println!(" uring vs pool (guest figures):");
        let u = &report.uring_vs_pool;
        for (name, s) in [
            ("seq read", u.seq_read),
            ("seq write", u.seq_write),
            ("rand read QD32", u.rand_read_qd32),
            ("rand read QD1", u.rand_read_qd1),
            ("QD1 latency", u.qd1_latency),
        ] {
            print_row(name, s, "x");
        }
    }
    Ok(())
}

/// One engine's guest passes of a run, into `v` under `engine`'s keys.
fn guest_passes(
    a: &BlkBenchArgs,
    (g, pid): (&mut GuestShell, u32),
    engine: &str,
    v: &mut BTreeMap<String, Vec<f64>>,
) -> anyhow::Result<()> {
    let seq_count = a.seq / SEQ_REQ as u64;
    let (mut exits, mut reqs, mut irqs, mut kicks) = (0.0, 0.0, 0.0, 0.0);
    let mut guest = |mode: &str, count: u64, kib: usize, qd: usize| -> anyhow::Result<Pass> {
        let p = pass(g, pid, mode, count, kib, qd)?;
        exits += p.exits;
        reqs += p.ops;
        irqs += p.irqs;
        kicks += p.kicks;
        Ok(p)
    };
    let gr = guest("seq-read", seq_count, SEQ_REQ / 1024, a.seq_qd)?;
    let gw = guest("seq-write", seq_count, SEQ_REQ / 1024, a.seq_qd)?;
    let g1 = guest("rand-read", a.rand_ops, RAND_REQ / 1024, 1)?;
    let g32 = guest("rand-read", a.rand_ops * 8, RAND_REQ / 1024, QD)?;
    let mib_s = |p: &Pass| p.bytes / MIB / p.secs;
    let iops = |p: &Pass| p.ops / p.secs;
    let mut push = |k: &str, x: f64| v.entry(format!("{engine}.{k}")).or_default().push(x);
    push("gr", mib_s(&gr));
    push("gw", mib_s(&gw));
    push("g1", iops(&g1));
    push("g32", iops(&g32));
    push("lat", 1e6 / iops(&g1));
    push("exits", exits / reqs);
    push("irqs", irqs / reqs);
    push("kicks", kicks / reqs);
    push("irqs32", g32.irqs / g32.ops);
    push("kicks32", g32.kicks / g32.ops);
    let (us, switches) = g32.cpu.per_request(g32.cpu0, g32.ops);
    push("cpu32", us);
    push("csw32", switches);
    Ok(())
}

fn measure(
    a: &BlkBenchArgs,
    image: &Path,
    pool: (&mut GuestShell, u32),
    uring: (&mut GuestShell, u32),
) -> anyhow::Result<Report> {
    let (pool, pool_pid) = pool;
    let (uring, uring_pid) = uring;
    let load0 = load_average();
    pool.command("disk", "disk capacity")?;
    uring.command("disk", "disk capacity")?;
    let mut v: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for run in 0..a.runs {
        // Alternate which engine goes first.
        if run % 2 == 0 {
            guest_passes(a, (pool, pool_pid), "pool", &mut v)?;
            guest_passes(a, (uring, uring_pid), "uring", &mut v)?;
        } else {
            guest_passes(a, (uring, uring_pid), "uring", &mut v)?;
            guest_passes(a, (pool, pool_pid), "pool", &mut v)?;
        }
        let hr = host_seq(image, a.seq, false, a.seq_qd)?;
        let hw = host_seq(image, a.seq, true, a.seq_qd)?;
        let h1 = host_rand(image, a.size, a.rand_ops, 1)?;
        let c0 = Cpu::of_self();
        let h32 = host_rand(image, a.size, a.rand_ops * 8, QD)?;
        let (h32_us, h32_switches) = Cpu::of_self().per_request(c0, (a.rand_ops * 8) as f64);
        let last = |v: &BTreeMap<String, Vec<f64>>, k: &str| {
            v.get(k).and_then(|x| x.last().copied()).unwrap_or(f64::NAN)
        };
        let mut add: Vec<(String, f64)> = vec![
            ("hr".into(), hr),
            ("hw".into(), hw),
            ("h32".into(), h32),
            ("hlat".into(), 1e6 / h1),
            ("hcpu32".into(), h32_us),
            ("hcsw32".into(), h32_switches),
        ];
        for e in ["pool", "uring"] {
            add.push((format!("{e}.rr"), last(&v, &format!("{e}.gr")) / hr));
            add.push((format!("{e}.rw"), last(&v, &format!("{e}.gw")) / hw));
            add.push((format!("{e}.r32"), last(&v, &format!("{e}.g32")) / h32));
            add.push((
                format!("{e}.cpur"),
                last(&v, &format!("{e}.cpu32")) / h32_us,
            ));
        }
        for k in ["gr", "gw", "g32", "g1", "lat"] {
            let r = last(&v, &format!("uring.{k}")) / last(&v, &format!("pool.{k}"));
            add.push((format!("uvp.{k}"), r));
        }
        for (k, x) in add {
            v.entry(k).or_default().push(x);
        }
    }
    let s = |k: &str| Stats::of(v.get(k).map_or(&[][..], |x| &x[..]));
    let engine = |e: &str| {
        let s = |k: &str| s(&format!("{e}.{k}"));
        EngineReport {
            seq_read_ratio: s("rr"),
            seq_write_ratio: s("rw"),
            rand_read_qd32_ratio: s("r32"),
            qd1_latency_us: s("lat"),
            guest_seq_read_mib_s: s("gr"),
            guest_seq_write_mib_s: s("gw"),
            guest_rand_read_qd32_iops: s("g32"),
            guest_rand_read_qd1_iops: s("g1"),
            exits_per_request: s("exits"),
            irqs_per_request: s("irqs"),
            kicks_per_request: s("kicks"),
            qd32_irqs_per_request: s("irqs32"),
            qd32_kicks_per_request: s("kicks32"),
            qd32_vmm_cpu_us_per_request: s("cpu32"),
            qd32_vmm_switches_per_request: s("csw32"),
            qd32_cpu_ratio: s("cpur"),
        }
    };
    let default_engine = DiskEngine::default().name();
    let d = engine(default_engine);
    Ok(Report {
        runs: a.runs,
        image_bytes: a.size,
        guest_direct: !a.buffered,
        seq_qd: a.seq_qd,
        default_engine,
        load_average: [load0, load_average()],
        seq_read_ratio: d.seq_read_ratio,
        seq_write_ratio: d.seq_write_ratio,
        rand_read_qd32_ratio: d.rand_read_qd32_ratio,
        qd1_latency_us: d.qd1_latency_us,
        host_seq_read_mib_s: s("hr"),
        host_seq_write_mib_s: s("hw"),
        host_rand_read_qd32_iops: s("h32"),
        host_qd1_latency_us: s("hlat"),
        host_qd32_cpu_us_per_request: s("hcpu32"),
        host_qd32_switches_per_request: s("hcsw32"),
        pool: engine("pool"),
        uring: engine("uring"),
        uring_vs_pool: UringVsPool {
            seq_read: s("uvp.gr"),
            seq_write: s("uvp.gw"),
            rand_read_qd32: s("uvp.g32"),
            rand_read_qd1: s("uvp.g1"),
            qd1_latency: s("uvp.lat"),
        },
    })
}
