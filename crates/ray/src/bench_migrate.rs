//! `ray bench migrate`: live migration of a guest (1 GiB by default, part of it touched),
//! idle and under `dirty`, over loopback and over a veth pair between two network
//! namespaces. Raw TCP throughput is measured on the same path in the same run.
//!
//! The target is started with `--prefault` and the run waits until all of its memory is
//! populated, so neither the migration nor the raw TCP baseline pays for allocating pages.
//! Raw TCP is measured two ways, each end in its namespace:
//! - memory to memory (the baseline of the ratios): as many bytes as the guest touched, sent
//!   from a populated buffer of that size into a prefaulted buffer of that size. A
//!   migration must read guest memory on one end and write it on the other, so this is the
//!   most it could reach on the path.
//! - from and into one cache-hot 1 MiB buffer: the loopback's ceiling, reported alongside.
//!   It never leaves the L2 cache, which no migration of more than a few MiB can do.
//!
//! Each migration is bracketed by raw TCP measurements (one just before, one just after;
//! their mean is the run's baseline). Each path and mode starts with one migration that is
//! not counted (warm-up).
//!
//! Downtime is the guest's heartbeat gap: from the source's pause to the first heartbeat
//! the target saw (both VMMs are on this host, so their wall clocks agree).
//!
//! `idle` and `loaded` migrate in plaintext (`--insecure-plaintext`: the Noise handshake
//! proves the key, then frames go in the clear), the transport's own cost. `encrypted` is
//! the idle guest migrated the default way, every byte in AES-GCM records; besides raw TCP
//! it is compared with the cipher alone, measured right after each migration on as many
//! bytes as it sent. Both ends run on this host, so the cipher alone is what the two ends
//! must do together: seal every byte (the source stream's crypto workers, 4 MiB writes)
//! and open every byte (the target stream's threads, 4 MiB reads), in memory, one after
//! the other; `cipher_mib_s` is bytes over the sum of both times. Sealing alone on one
//! core is reported too (`cipher_seal_one_core_mib_s`). In a migration the source's
//! sealing and the target's opening run at the same time on the two cores, so the ratio
//! can pass 1 when the host has cores to spare. On a host whose cores also carry the TCP
//! stack of both ends, moving the bytes costs about as much as the cipher: there
//! `tcp_and_cipher_mib_s` (raw TCP and the cipher alone with their times added) is the
//! bound to compare with, and `tcp_and_cipher_ratio` above 1 says the pipeline overlaps them.
//! `cipher_ratio_at_raw_tcp` (raw TCP over the cipher alone) is the `cipher_ratio` a
//! migration would get if encrypting cost it nothing at all: when it is under the target,
//! no cipher pipeline can meet the target on that path.
//!
//! `copy-disks` gives the idle guest a sparse disk (`--disk-size`, `--disk-data` of it
//! written before boot, in 1 MiB pieces spread over the disk) and migrates it in plaintext
//! twice per run: with `--copy-disks` (into a target with `--disk-dir`) and, right
//! before, the same way with the disk on shared storage (the target opens the same file);
//! the ratios pair the two migrations of each run.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use ray::client::{ClientError, VmmClient};
use ray_api::vmm::{ConsoleInput, ConsoleTail, MigrateRequest, MigrationStatus, OnLimit, VmInfo};
use serde::Serialize;

use crate::bench::{print_row, Stats};

#[derive(Args)]
pub struct MigrateBenchArgs {
    /// Measured migrations per path and mode (each set follows one uncounted warm-up).
    #[arg(long, default_value_t = 9)]
    pub runs: usize,
    /// Guest memory.
    #[arg(long, default_value = "1G", value_parser = ray::sizes::parse_size)]
    pub memory: u64,
    /// How much of it the guest writes before each migration.
    #[arg(long, default_value = "512M", value_parser = ray::sizes::parse_size)]
    pub touched: u64,
    /// The loaded guest's `dirty` rate, MiB/s (over a 128 MiB working set).
    #[arg(long, default_value_t = 64)]
    pub dirty_mib_s: u64,
    /// Longest acceptable pause, ms.
    #[arg(long, default_value_t = 30)]
    pub max_downtime_ms: u64,
    /// Paths to measure (comma-separated): loopback, veth.
    #[arg(long, value_delimiter = ',', default_value = "loopback,veth")]
    pub paths: Vec<BenchPath>,
    /// Guest modes to measure (comma-separated): idle, loaded (both plaintext), encrypted
    /// (the idle guest, encrypted), copy-disks (the idle guest with a disk, copied and on
    /// shared storage).
    #[arg(long, value_delimiter = ',', default_value = "idle,loaded,encrypted")]
    pub modes: Vec<GuestMode>,
    /// copy-disks: the disk's size.
    #[arg(long, default_value = "256M", value_parser = ray::sizes::parse_size)]
    pub disk_size: u64,
    /// copy-disks: how much of it holds data (the rest are holes).
    #[arg(long, default_value = "64M", value_parser = ray::sizes::parse_size)]
    pub disk_data: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum BenchPath {
    Loopback,
    Veth,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum GuestMode {
    Idle,
    Loaded,
    Encrypted,
    CopyDisks,
}

/// The disk of a `copy-disks` run: the source's image, and where the target puts its
/// copy (`None`: the disk is on shared storage, the target opens the same file).
struct Disk<'a> {
    image: &'a Path,
    copy_dir: Option<&'a Path>,
}

/// One way of moving the disk, over the runs.
#[derive(Serialize, Clone)]
struct DiskWay {
    /// Heartbeat gap, ms.
    downtime_ms: Stats,
    driver_downtime_ms: Stats,
    total_ms: Stats,
    /// Bytes on the wire (memory, disk, frames).
    bytes_sent: Stats,
    /// Disk data bytes sent (holes and ranges of zeros cost none), and of them those sent
    /// in the pause.
    disk_bytes_sent: Stats,
    disk_bytes_final: Stats,
}

/// The idle guest with a disk: copied (`--copy-disks`) against shared storage.
#[derive(Serialize, Clone)]
struct CopyDisks {
    path: &'static str,
    disk_bytes: u64,
    disk_data_bytes: u64,
    copy_disks: DiskWay,
    shared_storage: DiskWay,
    /// Each run's copy-disks total time over its shared-storage one.
    total_ratio: Stats,
    /// The same for the heartbeat gap.
    downtime_ratio: Stats,
}

#[derive(Serialize, Clone)]
struct Mode {
    path: &'static str,
    /// Heartbeat gap: source pause -> first heartbeat on the target, ms.
    downtime_ms: Stats,
    /// Source pause -> the target's `Resumed` (the driver's account), ms.
    driver_downtime_ms: Stats,
    total_ms: Stats,
    /// Median over the runs.
    bytes_sent: u64,
    /// Median over the runs (the stop-and-copy pass included).
    passes: u64,
    /// bytes_sent / total time, MiB/s.
    migration_mib_s: Stats,
    /// Raw TCP on the same path, memory to memory: the touched size from a populated buffer
    /// into a prefaulted one (median over the runs of the mean of one measurement just
    /// before and one just after the migration, both VMMs up), MiB/s. The baseline of the
    /// ratios.
    raw_tcp_mib_s: f64,
    /// Raw TCP on the same path from and into one cache-hot 1 MiB buffer (median, measured
    /// like `raw_tcp_mib_s`), MiB/s.
    raw_tcp_cached_mib_s: f64,
    /// Migration throughput (whole migration) over raw TCP memory to memory, each run's
    /// migration paired with the raw measurements that bracket it (the machine's speed
    /// drifts between runs; a pair shares its conditions): the median of the runs' ratios.
    throughput_ratio: f64,
    /// The runs' ratios, min/median/max.
    throughput_ratios: Stats,
    /// Median of the runs' migration throughput over cache-hot raw TCP.
    throughput_ratio_cached: f64,
    /// The first (bulk) pre-copy pass alone: its bytes over the time from its first page
    /// read to the target's acknowledgement, MiB/s.
    bulk_mib_s: Stats,
    /// Median of the runs' bulk-pass rate over raw TCP memory to memory.
    bulk_ratio: f64,
}

/// The idle guest migrated encrypted (the default between hosts).
#[derive(Serialize, Clone)]
struct Encrypted {
    path: &'static str,
    protocol: &'static str,
    /// Heartbeat gap, ms.
    downtime_ms: Stats,
    driver_downtime_ms: Stats,
    total_ms: Stats,
    migration_mib_s: Stats,
    /// Each run's migration throughput over the raw TCP measurements bracketing it.
    throughput_ratio: Stats,
    /// The cipher alone, as both ends on this host must run it: the bytes each migration
    /// sent, sealed (the source stream's crypto workers) and then opened (the target
    /// stream's threads) in memory right after it; bytes over the sum of both times, MiB/s.
    cipher_mib_s: Stats,
    /// Sealing alone, with the source stream's crypto workers, MiB/s.
    cipher_seal_mib_s: Stats,
    /// Opening alone, with the target stream's threads, MiB/s.
    cipher_open_mib_s: Stats,
    /// Sealing alone on one thread (one core), MiB/s.
    cipher_seal_one_core_mib_s: Stats,
    /// Crypto workers sealing beside the source's writing thread.
    seal_workers: usize,
    /// Threads opening each read's records on the target.
    open_threads: usize,
    /// Each run's migration throughput over its cipher-alone rate (target >= 0.8).
    cipher_ratio: Stats,
    /// Each run's raw TCP over its cipher-alone rate: the `cipher_ratio` of a migration
    /// that moved its bytes as fast as raw TCP moves plain memory, i.e. one whose
    /// encryption cost nothing. Below the target, the path (not the cipher) is what
    /// keeps `cipher_ratio` under it on this host.
    cipher_ratio_at_raw_tcp: Stats,
    /// Raw TCP and the cipher alone of each run with their times added: the rate of a host
    /// that moves the bytes and seals and opens them without overlapping the two, MiB/s.
    /// Both ends share this host's cores, so this, not the cipher alone, is its bound.
    tcp_and_cipher_mib_s: Stats,
    /// Each run's migration throughput over `tcp_and_cipher_mib_s` (above 1: the pipeline
    /// overlaps the transport and the crypto).
    tcp_and_cipher_ratio: Stats,
    raw_tcp_mib_s: f64,
}

#[derive(Serialize, Clone)]
struct PathReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    idle: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    loaded: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encrypted: Option<Encrypted>,
    #[serde(skip_serializing_if = "Option::is_none")]
    copy_disks: Option<CopyDisks>,
}

#[derive(Serialize)]
struct Report {
    runs: usize,
    /// Migrations run first in each path and mode and not counted.
    warmup_runs: usize,
    memory_bytes: u64,
    touched_bytes: u64,
    dirty_mib_s: u64,
    max_downtime_ms: u64,
    build: &'static str,
    /// Over the veth pair (two namespaces: the "two hosts" case), or over loopback when
    /// only that path was measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    idle: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    loaded: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encrypted: Option<Encrypted>,
    #[serde(skip_serializing_if = "Option::is_none")]
    copy_disks: Option<CopyDisks>,
    paths: std::collections::BTreeMap<&'static str, PathReport>,
}

/// Two network namespaces joined by a veth pair; deleted on drop.
struct Veth {
    a: String,
    b: String,
}

/// Migrations run first in each path and mode and not counted.
const WARMUP_RUNS: usize = 1;

const VETH_A: &str = "10.231.9.1";
const VETH_B: &str = "10.231.9.2";

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2 is needed for the veth path)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {} (the veth path needs root and network namespaces)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Veth {
    fn new() -> anyhow::Result<Veth> {
        let n = std::process::id() % 100_000;
        let v = Veth {
            a: format!("ray-bench-a-{n}"),
            b: format!("ray-bench-b-{n}"),
        };
        let (va, vb) = (format!("rba{n}"), format!("rbb{n}"));
        ip(&["netns", "add", &v.a])?;
        ip(&["netns", "add", &v.b])?;
        ip(&[
            "link", "add", &va, "netns", &v.a, "type", "veth", "peer", "name", &vb, "netns", &v.b,
        ])?;
        ip(&[
            "-n",
            &v.a,
            "addr",
            "add",
            &format!("{VETH_A}/24"),
            "dev",
            &va,
        ])?;
        ip(&[
            "-n",
            &v.b,
            "addr",
            "add",
            &format!("{VETH_B}/24"),
            "dev",
            &vb,
        ])?;
        for (ns, dev) in [(&v.a, &va), (&v.b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(v)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// Moves the calling thread into network namespace `ns` (sockets it creates live there).
fn enter_netns(ns: &str) -> anyhow::Result<()> {
    let path = Path::new("/var/run/netns").join(ns);
    let f =
        std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: setns on a namespace fd we hold open; CLONE_NEWNET changes only the calling
    // thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "cannot enter network namespace {ns}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// How raw TCP moves its bytes.
#[derive(Clone, Copy, PartialEq)]
enum RawBuffer {
    /// From a populated buffer of the whole size into a prefaulted one of the whole size.
    Memory,
    /// From and into one 1 MiB buffer on each end, over and over (cache-hot).
    Cached,
}

/// A buffer of `len` bytes with every page written (non-zero), so no page faults while used.
fn populated(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
        .collect()
}

/// Raw TCP throughput of `bytes` in 4 MiB (memory) or 1 MiB (cache-hot) writes and 256 KiB
/// reads from `from` to a listener at `to_ip`, each
/// end in its namespace (None: this one), MiB/s. Both buffers are ready before the
/// connection, so the time is the transfer's alone.
fn raw_tcp(
    from: Option<&str>,
    to: Option<&str>,
    to_ip: &str,
    bytes: u64,
    how: RawBuffer,
) -> anyhow::Result<f64> {
    // The calls a migration makes: 4 MiB writes (a page frame) and reads of up to 256 KiB
    // (the receiver's pieces), so the comparison isolates what the protocol adds.
    let (len, step, read_step) = match how {
        RawBuffer::Memory => (bytes as usize, 4 << 20, 256 << 10),
        RawBuffer::Cached => (1 << 20, 1 << 20, 256 << 10),
    };
    let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<u16>>();
    let to = to.map(str::to_string);
    let ip_addr = to_ip.to_string();
    let sink = std::thread::spawn(move || -> anyhow::Result<()> {
        if let Some(ns) = &to {
            enter_netns(ns)?;
        }
        // Populated before the port is handed out, so the source's clock starts after it.
        let mut buf = populated(len);
        let l = match TcpListener::bind((ip_addr.as_str(), 0)) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(e.into()));
                return Ok(());
            }
        };
        let _ = tx.send(Ok(l.local_addr()?.port()));
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut off = 0;
        loop {
            if off == len {
                off = 0;
            }
            let end = (off + read_step).min(len);
            match s.read(&mut buf[off..end])? {
                0 => break,
                n => off += n,
            }
        }
        Ok(())
    });
    let port = rx.recv().context("the TCP sink died")??;
    let from = from.map(str::to_string);
    let to_ip = to_ip.to_string();
    let source = std::thread::spawn(move || -> anyhow::Result<Duration> {
        if let Some(ns) = &from {
            enter_netns(ns)?;
        }
        let buf = populated(len);
        let mut s = TcpStream::connect((to_ip.as_str(), port))?;
        // As the migration's sockets: no Nagle wait for each write's last segment.
        s.set_nodelay(true)?;
        let t = Instant::now();
        let (mut left, mut off) = (bytes as usize, 0);
        while left > 0 {
            if off == len {
                off = 0;
            }
            let n = left.min(step).min(len - off);
            s.write_all(&buf[off..off + n])?;
            off += n;
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut end = [0u8; 1];
        let _ = s.read(&mut end);
        Ok(t.elapsed())
    });
    let elapsed = source
        .join()
        .map_err(|_| anyhow::anyhow!("TCP source panicked"))??;
    sink.join()
        .map_err(|_| anyhow::anyhow!("TCP sink panicked"))??;
    Ok(bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64())
}

/// A VM of the benchmark: a VMM process driven through its socket; killed on drop.
struct Guest {
    id: String,
    pid: u32,
    dir: PathBuf,
    client: VmmClient,
    seen: u64,
}

impl Guest {
    fn send(&self, line: &str) -> anyhow::Result<()> {
        let body = serde_json::to_vec(&ConsoleInput {
            data: format!("{line}\n"),
        })?;
        let _: serde_json::Value = self.client.call("POST", "/vm/console", Some(body))?;
        Ok(())
    }

    /// Waits for a console line starting with `prefix` after what was already seen.
    fn expect(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let tail: ConsoleTail = self.client.call("GET", "/vm/console?bytes=65536", None)?;
            let start = tail.total_bytes - tail.data.len() as u64;
            let skip = self.seen.saturating_sub(start) as usize;
            let fresh = tail.data.get(skip..).unwrap_or("");
            let mut off = 0;
            for line in fresh.split_inclusive('\n') {
                off += line.len();
                if !line.ends_with('\n') {
                    break;
                }
                if line.starts_with(prefix) {
                    self.seen = start + (skip + off) as u64;
                    return Ok(line.trim_end().to_string());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "VM {}: no console line {prefix:?} within {timeout:?}",
                    self.id
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn info(&self) -> anyhow::Result<VmInfo> {
        Ok(self.client.call("GET", "/vm", None)?)
    }

    /// Waits until the target populated all of its memory (`--prefault`).
    fn wait_prefaulted(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.migration()?;
            if let Some(e) = s.prefault_error {
                bail!("VM {}: prefault failed: {e}", self.id);
            }
            match (s.prefault_bytes, s.prefault_total_bytes) {
                (Some(done), Some(total)) if done == total => return Ok(()),
                (None, _) | (_, None) => bail!("VM {} reports no prefault", self.id),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("VM {}: prefault not done within {timeout:?}", self.id);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The migration status, or the record the VMM left when it ended.
    fn migration(&self) -> anyhow::Result<MigrationStatus> {
        match self.client.call("GET", "/vm/migration", None) {
            Ok(s) => Ok(s),
            Err(ClientError::Unreachable { .. }) => {
                let path = self.dir.join("migration.json");
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("VM {} ended without {}", self.id, path.display()))?;
                Ok(serde_json::from_str(&text)?)
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if ray::runtime::pid_alive(self.pid) {
            // SAFETY: kill(2) of a VMM this benchmark started.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

struct Bench<'a> {
    exe: PathBuf,
    runtime: PathBuf,
    key: PathBuf,
    a: &'a MigrateBenchArgs,
}

impl Bench<'_> {
    fn ray(&self, ns: Option<&str>, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        let out = cmd
            .args(args)
            .env("RAY_RUNTIME_DIR", &self.runtime)
            .output()?;
        if !out.status.success() {
            bail!(
                "ray {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    fn guest(&self, info: &VmInfo) -> Guest {
        let dir = ray::runtime::vm_dir(&self.runtime, &info.id);
        Guest {
            id: info.id.clone(),
            pid: info.pid,
            client: VmmClient::new(&dir.join("api.sock")),
            dir,
            seen: 0,
        }
    }

    /// One migration into a prefaulted target; also measures raw TCP on the same path just
    /// before and just after it, with both VMMs up, so both compete for the same CPUs.
    /// Encrypted, it also times the cipher alone on as many bytes as were sent.
    fn once(
        &self,
        ns: (Option<&str>, Option<&str>),
        listen: &str,
        target_ip: &str,
        (loaded, encrypted): (bool, bool),
        i: usize,
        disk: Option<&Disk>,
    ) -> anyhow::Result<Run> {
        let mem = self.a.memory.to_string();
        let src_id = format!("bench-mig-src-{i}");
        let image = disk.map(|d| d.image.display().to_string());
        // Unjailed, both ends: the bench drives the source's API itself (a jailed source
        // needs `ray migrate start` to hand it the connection) and the target receives
        // shared disks; the jail adds nothing to the data path measured here.
        let out = self.ray(
            ns.0,
            &[
                "vm",
                "run",
                "--detach",
                "--json",
                "--id",
                &src_id,
                "--memory",
                &mem,
                "--vcpus",
                "1",
                "--no-jail",
            ]
            .into_iter()
            .chain(
                image
                    .as_deref()
                    .map(|i| ["--disk", i])
                    .into_iter()
                    .flatten(),
            )
            .collect::<Vec<_>>(),
        )?;
        let mut src = self.guest(&serde_json::from_slice(&out.stdout)?);
        src.expect("ready", Duration::from_secs(30))?;
        let touched = self.a.touched >> 20;
        src.send(&format!("dirty {touched} 4000"))?;
        src.expect("dirty on", Duration::from_secs(10))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while src.info()?.heartbeat.map_or(0, |h| h.dirty_bytes) < self.a.touched {
            if Instant::now() > deadline {
                bail!("the guest did not touch {touched} MiB within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        src.send("dirty stop")?;
        src.expect("dirty off", Duration::from_secs(10))?;
        if loaded {
            src.send(&format!("dirty 128 {}", self.a.dirty_mib_s))?;
            src.expect("dirty on", Duration::from_secs(10))?;
            std::thread::sleep(Duration::from_millis(300));
        }
        let dst_id = format!("bench-mig-dst-{i}");
        let copy_dir = disk
            .and_then(|d| d.copy_dir)
            .map(|d| d.display().to_string());
        let out = self.ray(
            ns.1,
            &[
                "migrate",
                "receive",
                "--no-jail",
                "--listen",
                listen,
                "--key-file",
                &self.key.display().to_string(),
                "--memory",
                &mem,
                "--vcpus",
                "1",
                "--id",
                &dst_id,
                "--prefault",
                "--json",
            ]
            .into_iter()
            .chain((!encrypted).then_some("--insecure-plaintext"))
            .chain(
                copy_dir
                    .as_deref()
                    .map(|d| ["--disk-dir", d])
                    .into_iter()
                    .flatten(),
            )
            .collect::<Vec<_>>(),
        )?;
        let dst = self.guest(&serde_json::from_slice(&out.stdout)?);
        dst.wait_prefaulted(Duration::from_secs(120))?;
        let to = dst.migration()?.peer;
        let raw_tcp_pair = || -> anyhow::Result<(f64, f64)> {
            Ok((
                raw_tcp(ns.0, ns.1, target_ip, self.a.touched, RawBuffer::Memory)?,
                raw_tcp(ns.0, ns.1, target_ip, self.a.touched, RawBuffer::Cached)?,
            ))
        };
        let (raw_before, cached_before) = raw_tcp_pair()?;
        let req = MigrateRequest {
            copy_disks: copy_dir.is_some(),
            to,
            key_file: self.key.display().to_string(),
            handoff: None,
            max_downtime_ms: self.a.max_downtime_ms,
            on_limit: OnLimit::Force,
            max_passes: None,
            max_time_ms: None,
            auto_converge: true,
            compress: false,
            insecure_plaintext: !encrypted,
            recheck_memory: false,
            max_concurrent: None,
        };
        let _: MigrationStatus =
            src.client
                .call("PUT", "/vm/migration", Some(serde_json::to_vec(&req)?))?;
        let deadline = Instant::now() + Duration::from_secs(300);
        let s = loop {
            let s = src.migration()?;
            if s.vm != "migrating" {
                break s;
            }
            if Instant::now() > deadline {
                bail!("the migration did not end within 300 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if s.state != "completed" {
            bail!(
                "the migration failed: {}",
                s.error.unwrap_or_else(|| s.state.to_string())
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let first = loop {
            if let Some(t) = dst.migration()?.first_heartbeat_unix_us {
                break t;
            }
            if Instant::now() > deadline {
                bail!("no heartbeat on the target after the migration");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let paused = s
            .paused_at_unix_us
            .context("the source did not record its pause")?;
        let gap = first.saturating_sub(paused) as f64 / 1e3;
        // Raw TCP again right after, so that the pair brackets the migration: the host's
        // speed drifts within seconds.
        let (raw_after, cached_after) = raw_tcp_pair()?;
        let (raw, cached) = (
            (raw_before + raw_after) / 2.0,
            (cached_before + cached_after) / 2.0,
        );
        let cipher = if encrypted {
            let data = populated(s.bytes_sent as usize);
            Some(ray_migration::secure::cipher_alone(&data)?)
        } else {
            None
        };
        drop(dst);
        drop(src);
        for id in [&src_id, &dst_id] {
            let _ = std::fs::remove_dir_all(ray::runtime::vm_dir(&self.runtime, id));
        }
        if let Some(dir) = disk.and_then(|d| d.copy_dir) {
            let copy = dir.join("disk0.img");
            if !copy.exists() {
                bail!("the target made no copy of the disk at {}", copy.display());
            }
            std::fs::remove_file(copy)?;
        }
        Ok(Run {
            gap,
            raw,
            cached,
            cipher,
            status: s,
        })
    }

    fn mode(
        &self,
        path: &'static str,
        ns: (Option<&str>, Option<&str>),
        listen: &str,
        target_ip: &str,
        kind: (bool, bool),
        ciphers: &mut Vec<(f64, ray_migration::secure::CipherTimes)>,
    ) -> anyhow::Result<(Mode, Vec<f64>, Vec<f64>)> {
        let (loaded, _) = kind;
        let (mut bulk, mut cached) = (Vec::new(), Vec::new());
        let (mut gap, mut driver, mut total, mut bytes, mut passes, mut rate, mut raw) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        // Warm-up migrations first, not counted: the first of a mode ran up to a third slower
        // than the rest (memory the host had just taken back, cold caches), a start-up cost
        // of the machine rather than of the migration.
        for i in 0..WARMUP_RUNS {
            self.once(ns, listen, target_ip, kind, self.a.runs + i, None)?;
        }
        for i in 0..self.a.runs {
            let Run {
                gap: g,
                raw: r,
                cached: c,
                cipher,
                status: s,
            } = self.once(ns, listen, target_ip, kind, i, None)?;
            ciphers.extend(cipher.map(|c| (s.bytes_sent as f64, c)));
            raw.push(r);
            cached.push(c);
            let t = s.total_ms.unwrap_or(f64::NAN);
            gap.push(g);
            driver.push(s.downtime_ms.unwrap_or(f64::NAN));
            total.push(t);
            bytes.push(s.bytes_sent as f64);
            passes.push(f64::from(s.pass));
            rate.push(s.bytes_sent as f64 / (1 << 20) as f64 / (t / 1e3));
            bulk.push(s.bulk_mib_s.unwrap_or(f64::NAN));
            if !self.a.json {
                eprintln!(
                    "  {path} {} run {}: downtime {g:.2} ms, total {t:.0} ms, {:.0} MiB in {} passes, raw TCP {r:.0} MiB/s (cache-hot {c:.0})",
                    if loaded { "loaded" } else { "idle" },
                    i + 1,
                    s.bytes_sent as f64 / (1 << 20) as f64,
                    s.pass,
                );
            }
        }
        let migration_mib_s = Stats::of(&rate);
        let raw_tcp_mib_s = Stats::of(&raw).median;
        let raw_tcp_cached_mib_s = Stats::of(&cached).median;
        let bulk_mib_s = Stats::of(&bulk);
        let paired = |num: &[f64], den: &[f64]| {
            let r: Vec<f64> = num.iter().zip(den).map(|(n, d)| n / d).collect();
            Stats::of(&r)
        };
        let throughput_ratios = paired(&rate, &raw);
        let mode = Mode {
            path,
            downtime_ms: Stats::of(&gap),
            driver_downtime_ms: Stats::of(&driver),
            total_ms: Stats::of(&total),
            bytes_sent: Stats::of(&bytes).median as u64,
            passes: Stats::of(&passes).median as u64,
            migration_mib_s,
            raw_tcp_mib_s,
            raw_tcp_cached_mib_s,
            throughput_ratio: throughput_ratios.median,
            throughput_ratios,
            throughput_ratio_cached: paired(&rate, &cached).median,
            bulk_mib_s,
            bulk_ratio: paired(&bulk, &raw).median,
        };
        Ok((mode, rate, raw))
    }

    /// The idle guest with a disk, copied and on shared storage, each run both ways.
    fn copy_disks(
        &self,
        path: &'static str,
        ns: (Option<&str>, Option<&str>),
        listen: &str,
        target_ip: &str,
    ) -> anyhow::Result<CopyDisks> {
        let (size, data) = (self.a.disk_size, self.a.disk_data);
        let image = self.runtime.join(format!("disk-{path}.img"));
        let f = std::fs::File::create(&image)?;
        f.set_len(size)?;
        // 1 MiB pieces spread evenly over the disk.
        let pieces = (data >> 20).max(1);
        let stride = (size / pieces) & !((1 << 20) - 1);
        let piece = populated(1 << 20);
        for k in 0..pieces {
            std::os::unix::fs::FileExt::write_all_at(&f, &piece, k * stride.max(1 << 20))?;
        }
        f.sync_all()?;
        drop(f);
        let dir = self.runtime.join(format!("copies-{path}"));
        std::fs::create_dir_all(&dir)?;
        let shared = Disk {
            image: &image,
            copy_dir: None,
        };
        let copied = Disk {
            image: &image,
            copy_dir: Some(&dir),
        };
        let kind = (false, false);
        for i in 0..WARMUP_RUNS {
            self.once(
                ns,
                listen,
                target_ip,
                kind,
                2 * (self.a.runs + i),
                Some(&copied),
            )?;
        }
        let mut runs: [Vec<MigrationStatus>; 2] = [Vec::new(), Vec::new()];
        let mut gaps: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for i in 0..self.a.runs {
            for (w, disk) in [&shared, &copied].into_iter().enumerate() {
                let r = self.once(ns, listen, target_ip, kind, 2 * i + w, Some(disk))?;
                if !self.a.json {
                    eprintln!(
                        "  {path} {} run {}: downtime {:.2} ms, total {:.0} ms, {:.1} MiB of disk sent ({:.2} MiB paused)",
                        ["shared-storage", "copy-disks"][w],
                        i + 1,
                        r.gap,
                        r.status.total_ms.unwrap_or(f64::NAN),
                        r.status.disk_bytes_sent.unwrap_or(0) as f64 / (1 << 20) as f64,
                        r.status.disk_bytes_final.unwrap_or(0) as f64 / (1 << 20) as f64,
                    );
                }
                gaps[w].push(r.gap);
                runs[w].push(r.status);
            }
        }
        let way = |w: usize| {
            let of = |f: &dyn Fn(&MigrationStatus) -> f64| {
                Stats::of(&runs[w].iter().map(f).collect::<Vec<_>>())
            };
            DiskWay {
                downtime_ms: Stats::of(&gaps[w]),
                driver_downtime_ms: of(&|s| s.downtime_ms.unwrap_or(f64::NAN)),
                total_ms: of(&|s| s.total_ms.unwrap_or(f64::NAN)),
                bytes_sent: of(&|s| s.bytes_sent as f64),
                disk_bytes_sent: of(&|s| s.disk_bytes_sent.unwrap_or(0) as f64),
                disk_bytes_final: of(&|s| s.disk_bytes_final.unwrap_or(0) as f64),
            }
        };
        let ratio = |f: &dyn Fn(usize, usize) -> f64| {
            Stats::of(
                &(0..self.a.runs)
                    .map(|i| f(1, i) / f(0, i))
                    .collect::<Vec<_>>(),
            )
        };
        let report = CopyDisks {
            path,
            disk_bytes: size,
            disk_data_bytes: pieces << 20,
            copy_disks: way(1),
            shared_storage: way(0),
            total_ratio: ratio(&|w, i| runs[w][i].total_ms.unwrap_or(f64::NAN)),
            downtime_ratio: ratio(&|w, i| gaps[w][i]),
        };
        let _ = std::fs::remove_file(&image);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(report)
    }

    /// The idle guest, encrypted, against raw TCP and the cipher alone.
    fn encrypted(
        &self,
        path: &'static str,
        ns: (Option<&str>, Option<&str>),
        listen: &str,
        target_ip: &str,
    ) -> anyhow::Result<Encrypted> {
        let mut times = Vec::new();
        let (m, rates, raws) = self.mode(path, ns, listen, target_ip, (false, true), &mut times)?;
        let mib_s = |bytes: f64, d: Duration| bytes / (1 << 20) as f64 / d.as_secs_f64();
        let of = |f: &dyn Fn(f64, &ray_migration::secure::CipherTimes) -> f64| {
            times.iter().map(|(b, t)| f(*b, t)).collect::<Vec<f64>>()
        };
        let ciphers = of(&|b, t| mib_s(b, t.seal + t.open));
        let ratios: Vec<f64> = rates.iter().zip(&ciphers).map(|(r, c)| r / c).collect();
        let ceilings: Vec<f64> = raws.iter().zip(&ciphers).map(|(t, c)| t / c).collect();
        let both: Vec<f64> = raws
            .iter()
            .zip(&ciphers)
            .map(|(t, c)| 1.0 / (1.0 / t + 1.0 / c))
            .collect();
        let both_ratios: Vec<f64> = rates.iter().zip(&both).map(|(r, b)| r / b).collect();
        if !self.a.json {
            eprintln!(
                "  {path} encrypted: cipher alone (seal + open) {:.0} MiB/s (median)",
                Stats::of(&ciphers).median,
            );
        }
        let (seal_workers, open_threads) = times
            .first()
            .map_or((0, 0), |(_, t)| (t.seal_workers, t.open_threads));
        Ok(Encrypted {
            path,
            protocol: ray_migration::secure::NOISE_PARAMS,
            downtime_ms: m.downtime_ms,
            driver_downtime_ms: m.driver_downtime_ms,
            total_ms: m.total_ms,
            migration_mib_s: m.migration_mib_s,
            throughput_ratio: m.throughput_ratios,
            cipher_mib_s: Stats::of(&ciphers),
            cipher_seal_mib_s: Stats::of(&of(&|b, t| mib_s(b, t.seal))),
            cipher_open_mib_s: Stats::of(&of(&|b, t| mib_s(b, t.open))),
            cipher_seal_one_core_mib_s: Stats::of(&of(&|b, t| mib_s(b, t.seal_one_core))),
            seal_workers,
            open_threads,
            cipher_ratio: Stats::of(&ratios),
            cipher_ratio_at_raw_tcp: Stats::of(&ceilings),
            tcp_and_cipher_mib_s: Stats::of(&both),
            tcp_and_cipher_ratio: Stats::of(&both_ratios),
            raw_tcp_mib_s: m.raw_tcp_mib_s,
        })
    }
}

/// One migration of [`Bench::once`].
struct Run {
    /// Heartbeat gap, ms.
    gap: f64,
    /// Raw TCP memory to memory, MiB/s.
    raw: f64,
    /// Raw TCP cache-hot, MiB/s.
    cached: f64,
    /// The cipher alone on as many bytes (encrypted runs).
    cipher: Option<ray_migration::secure::CipherTimes>,
    /// The source's final status.
    status: MigrationStatus,
}

fn print_encrypted(e: &Encrypted) {
    println!("{} encrypted ({}):", e.path, e.protocol);
    print_row("downtime (heartbeat gap)", e.downtime_ms, "ms");
    print_row("downtime (driver)", e.driver_downtime_ms, "ms");
    print_row("migration throughput", e.migration_mib_s, "MiB/s");
    print_row("cipher alone (seal+open)", e.cipher_mib_s, "MiB/s");
    print_row("  seal", e.cipher_seal_mib_s, "MiB/s");
    print_row("  open", e.cipher_open_mib_s, "MiB/s");
    print_row("seal on one core", e.cipher_seal_one_core_mib_s, "MiB/s");
    print_row("migration / raw TCP", e.throughput_ratio, "");
    print_row("migration / cipher", e.cipher_ratio, "(target >= 0.8)");
    print_row(
        "raw TCP / cipher",
        e.cipher_ratio_at_raw_tcp,
        "(its ceiling)",
    );
    print_row(
        "raw TCP + cipher, times added",
        e.tcp_and_cipher_mib_s,
        "MiB/s",
    );
    print_row("migration / (TCP + cipher)", e.tcp_and_cipher_ratio, "");
    println!(
        "  {:<26} {} seal worker(s), {} open thread(s)",
        "crypto threads", e.seal_workers, e.open_threads
    );
    println!("  {:<26} < 5 ms", "downtime target");
}

fn print_mode(m: &Mode, name: &str, max_downtime: u64) {
    println!("{} {name}:", m.path);
    print_row("downtime (heartbeat gap)", m.downtime_ms, "ms");
    print_row("downtime (driver)", m.driver_downtime_ms, "ms");
    print_row("total", m.total_ms, "ms");
    print_row("migration throughput", m.migration_mib_s, "MiB/s");
    print_row("bulk pass throughput", m.bulk_mib_s, "MiB/s");
    println!(
        "  {:<26} {:.1} MiB (median), {} passes (median)",
        "sent",
        m.bytes_sent as f64 / (1 << 20) as f64,
        m.passes
    );
    println!(
        "  {:<30} {:.0} MiB/s; migration/raw = {:.2} (runs {:.2}..{:.2}), bulk pass/raw = {:.2} (target >= 0.70)",
        "raw TCP memory->memory",
        m.raw_tcp_mib_s,
        m.throughput_ratio,
        m.throughput_ratios.min,
        m.throughput_ratios.max,
        m.bulk_ratio
    );
    println!(
        "  {:<30} {:.0} MiB/s; migration/raw = {:.2}",
        "raw TCP cache-hot 1 MiB buffer", m.raw_tcp_cached_mib_s, m.throughput_ratio_cached
    );
    let target = if name == "idle" {
        "< 5 ms".to_string()
    } else {
        format!("<= {max_downtime} ms")
    };
    println!("  {:<26} {target}", "downtime target");
}

pub fn run(a: &MigrateBenchArgs, runtime: &Path) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if a.paths.is_empty() || a.modes.is_empty() {
        bail!("--paths and --modes must each name at least one");
    }
    if a.touched >= a.memory / 4 * 3 || a.touched < 128 << 20 {
        bail!("--touched must be at least 128M and below three quarters of --memory");
    }
    let runtime = runtime.join(format!("bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&runtime)?;
    let key = runtime.join("migration.key");
    let secret: String = (0..48)
        .map(|i| char::from(b'a' + ((std::process::id() as usize * 31 + i * 7) % 26) as u8))
        .collect();
    std::fs::write(&key, secret)?;
    let b = Bench {
        exe: std::env::current_exe()?,
        runtime: runtime.clone(),
        key,
        a,
    };
    let result = (|| -> anyhow::Result<Report> {
        let mut paths = std::collections::BTreeMap::new();
        let modes = |path, ns: (Option<&str>, Option<&str>), listen: &str, ip: &str| {
            let mode = |m: GuestMode| {
                a.modes
                    .contains(&m)
                    .then(|| {
                        let kind = (m == GuestMode::Loaded, false);
                        b.mode(path, ns, listen, ip, kind, &mut Vec::new())
                            .map(|(m, _, _)| m)
                    })
                    .transpose()
            };
            anyhow::Ok(PathReport {
                idle: mode(GuestMode::Idle)?,
                loaded: mode(GuestMode::Loaded)?,
                encrypted: a
                    .modes
                    .contains(&GuestMode::Encrypted)
                    .then(|| b.encrypted(path, ns, listen, ip))
                    .transpose()?,
                copy_disks: a
                    .modes
                    .contains(&GuestMode::CopyDisks)
                    .then(|| b.copy_disks(path, ns, listen, ip))
                    .transpose()?,
            })
        };
        if a.paths.contains(&BenchPath::Loopback) {
            let r = modes("loopback", (None, None), "127.0.0.1:0", "127.0.0.1")?;
            paths.insert("loopback", r);
        }
        if a.paths.contains(&BenchPath::Veth) {
            let veth = Veth::new()?;
            let ns = (Some(veth.a.as_str()), Some(veth.b.as_str()));
            let r = modes("veth", ns, &format!("{VETH_B}:0"), VETH_B)?;
            paths.insert("veth", r);
        }
        let main = paths
            .get("veth")
            .or_else(|| paths.get("loopback"))
            .cloned()
            .context("--paths names no path")?;
        Ok(Report {
            runs: a.runs,
            warmup_runs: WARMUP_RUNS,
            memory_bytes: a.memory,
            touched_bytes: a.touched,
            dirty_mib_s: a.dirty_mib_s,
            max_downtime_ms: a.max_downtime_ms,
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            idle: main.idle,
            loaded: main.loaded,
            encrypted: main.encrypted,
            copy_disks: main.copy_disks,
            paths,
        })
    })();
    let _ = std::fs::remove_dir_all(&runtime);
    let report = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "migrate: {} MiB guest, {} MiB touched, loaded = dirty 128 MiB at {} MiB/s, {} runs after {WARMUP_RUNS} warm-up per mode ({} build)",
        a.memory >> 20,
        a.touched >> 20,
        a.dirty_mib_s,
        a.runs,
        report.build
    );
    for p in report.paths.values() {
        for (m, name) in [(&p.idle, "idle"), (&p.loaded, "loaded")] {
            if let Some(m) = m {
                print_mode(m, name, a.max_downtime_ms);
            }
        }
        if let Some(e) = &p.encrypted {
            print_encrypted(e);
        }
        if let Some(c) = &p.copy_disks {
            print_copy_disks(c);
        }
    }
    Ok(())
}

fn print_copy_disks(c: &CopyDisks) {
    println!(
        "{} copy-disks ({} MiB disk, {} MiB of data):",
        c.path,
        c.disk_bytes >> 20,
        c.disk_data_bytes >> 20
    );
    for (w, name) in [(&c.copy_disks, "copied"), (&c.shared_storage, "shared")] {
        print_row(&format!("{name}: downtime (gap)"), w.downtime_ms, "ms");
        print_row(&format!("{name}: total"), w.total_ms, "ms");
        let mib = |s: Stats| Stats {
            min: s.min / (1 << 20) as f64,
            median: s.median / (1 << 20) as f64,
            max: s.max / (1 << 20) as f64,
        };
        print_row(&format!("{name}: disk sent"), mib(w.disk_bytes_sent), "MiB");
        print_row(
            &format!("{name}: disk sent paused"),
            mib(w.disk_bytes_final),
            "MiB",
        );
    }
    print_row("total copied / shared", c.total_ratio, "");
    print_row("downtime copied / shared", c.downtime_ratio, "");
}
