//! `ray bench snapshot`: full snapshots of a guest with part of its memory touched, the
//! disk's own sequential write speed measured in the same run, and restore latency from a
//! new process to the guest answering on its console.
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ray::client::VmmClient;
use ray_api::vmm::{ConsoleInput, SnapshotInfo, SnapshotKind, SnapshotRequest, VmConfig, VmInfo};
use serde::Serialize;

use crate::bench::{print_row, SnapshotBenchArgs, Stats};
use crate::vm::{default_guest, DEFAULT_GUEST_CMDLINE};

#[derive(Serialize)]
struct Report {
    runs: usize,
    memory_bytes: u64,
    touched_bytes: u64,
    build: &'static str,
    /// Write time of a full snapshot (state + memory, fsync included), ms.
    full_ms: Stats,
    /// Bytes of the full snapshot on disk (zero pages are holes).
    full_bytes: u64,
    /// Sequential write speed of the snapshot disk (same size, fsync), MiB/s.
    disk_mib_s: Stats,
    /// Full snapshot write speed over the disk's, median to median.
    full_speed_ratio: f64,
    /// Write time of an incremental snapshot on top of the full one after the guest
    /// rewrote `dirtied_bytes` of memory, ms.
    incremental_ms: Stats,
    /// Bytes of the incremental snapshot on disk, manifest excluded (median over runs).
    incremental_bytes: u64,
    /// Bytes of its manifest.
    incremental_manifest_bytes: u64,
    /// Memory the guest's workload rewrote between the two snapshots.
    dirtied_bytes: u64,
    /// incremental_bytes / dirtied_bytes.
    incremental_ratio: f64,
    /// New VMM process -> the restored guest answers on its console, ms (memory verified).
    restore_ms: Stats,
    /// The same without verifying memory checksums, ms.
    restore_unverified_ms: Stats,
    /// New VMM process -> guest answers, restoring the incremental snapshot (its chain:
    /// the full one mapped, the incremental one written over it), memory verified, ms.
    restore_incremental_ms: Stats,
    /// Where the time of `restore_unverified_ms` and `restore_ms` goes.
    restore_phases: PhaseReport,
}

/// The steps of a restore, each in ms, from CLOCK_MONOTONIC stamps the bench and the
/// VMM take (`ray vmm --timings`, see `ray_vmm::startup`).
#[derive(Serialize)]
struct PhaseReport {
    unverified: PhaseStats,
    verified: PhaseStats,
}

#[derive(Serialize)]
struct PhaseStats {
    /// Spawn -> `main` of the new process (exec, dynamic loading, runtime set-up).
    process_start: Stats,
    /// `main` -> restore begins (arguments, the VM directory's lock, its files).
    vmm_setup: Stats,
    /// Reading and checking the snapshot's manifests and state (and the host's CPU
    /// fingerprint they are compared with).
    load: Stats,
    /// Mapping guest memory (with eager verification, checking it too).
    memory_map: Stats,
    /// KVM: the VM, its memory slots, irqchip, vCPUs, their state; the vCPU threads start.
    kvm_setup: Stats,
    /// vCPUs running -> the guest's answer is read by the bench.
    first_answer: Stats,
}

/// One restore's steps, ms.
#[derive(Default)]
struct Phases {
    process_start: Vec<f64>,
    vmm_setup: Vec<f64>,
    load: Vec<f64>,
    memory_map: Vec<f64>,
    kvm_setup: Vec<f64>,
    first_answer: Vec<f64>,
}

impl Phases {
    /// Adds one restore: `spawn` and `answered` are the bench's stamps, `vmm` the VMM's.
    fn add(&mut self, spawn: u64, answered: u64, vmm: &serde_json::Value) -> anyhow::Result<()> {
        let at = |name: &str| {
            vmm[format!("{name}_ns")]
                .as_u64()
                .with_context(|| format!("the VMM's start-up times lack {name}: {vmm}"))
        };
        let ms = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e6;
        let (main, begin, loaded) = (at("main")?, at("restore_begin")?, at("loaded")?);
        let (mapped, running) = (at("mapped")?, at("running")?);
        self.process_start.push(ms(spawn, main));
        self.vmm_setup.push(ms(main, begin));
        self.load.push(ms(begin, loaded));
        self.memory_map.push(ms(loaded, mapped));
        self.kvm_setup.push(ms(mapped, running));
        self.first_answer.push(ms(running, answered));
        Ok(())
    }

    fn stats(&self) -> PhaseStats {
        PhaseStats {
            process_start: Stats::of(&self.process_start),
            vmm_setup: Stats::of(&self.vmm_setup),
            load: Stats::of(&self.load),
            memory_map: Stats::of(&self.memory_map),
            kvm_setup: Stats::of(&self.kvm_setup),
            first_answer: Stats::of(&self.first_answer),
        }
    }
}

/// Sequential write speed of the disk under `dir` for as many bytes as a snapshot wrote, MiB/s.
fn disk_speed(dir: &Path, bytes: u64) -> anyhow::Result<f64> {
    let speed = ray_snapshot::sequential_write_speed(dir, bytes.div_ceil(1 << 20).max(1))?;
    Ok(speed.bytes_per_sec() / (1 << 20) as f64)
}

/// Starts a VMM restoring `snapshot` and returns the time until the guest echoed a line;
/// with `phases`, adds where the time went.
fn restore_latency(
    exe: &Path,
    runtime: &Path,
    snapshot: &Path,
    verify: bool,
    i: usize,
    phases: Option<&mut Phases>,
) -> anyhow::Result<Duration> {
    let id = format!("bench-restore-{}-{i}-{verify}", std::process::id());
    let dir = ray::runtime::vm_dir(runtime, &id);
    std::fs::create_dir_all(&dir)?;
    // Outside the VM's directory, which the VMM rotates and cleans.
    let timings = runtime.join(format!("{id}-timings.json"));
    let _ = std::fs::remove_file(&timings);
    let mut cmd = Command::new(exe);
    cmd.args(["vmm", "--id", &id, "--attach", "--restore"])
        .arg(snapshot)
        .arg("--dir")
        .arg(&dir)
        .arg("--timings")
        .arg(&timings)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if !verify {
        cmd.arg("--no-verify-memory");
    }
    let spawned = ray_vmm::startup::now_ns();
    let t = Instant::now();
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().context("no stdin pipe")?;
    stdin.write_all(b"echo restored-and-answering\n")?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut answered = None;
    let mut answered_ns = 0;
    for line in BufReader::new(stdout).lines() {
        if line?.trim_end() == "restored-and-answering" {
            answered_ns = ray_vmm::startup::now_ns();
            answered = Some(t.elapsed());
            break;
        }
    }
    // SAFETY: kill(2) of our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    drop(stdin);
    child.wait()?;
    let _ = std::fs::remove_dir_all(&dir);
    let answered = answered.context("the restored guest never answered")?;
    if let Some(phases) = phases {
        let text = std::fs::read(&timings)
            .with_context(|| format!("the VMM left no start-up times in {}", timings.display()))?;
        phases.add(spawned, answered_ns, &serde_json::from_slice(&text)?)?;
    }
    let _ = std::fs::remove_file(&timings);
    Ok(answered)
}

pub fn run(a: &SnapshotBenchArgs, runtime: &Path) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if a.touched > a.memory / 2 {
        bail!("--touched must be at most half of --memory");
    }
    if a.dirtied == 0 || a.dirtied > a.touched || !a.dirtied.is_multiple_of(1 << 20) {
        bail!("--dirtied must be whole MiB, at least 1 MiB and at most --touched");
    }
    let exe = match &a.vmm_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe()?,
    };
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| runtime.join("bench-snapshots"));
    std::fs::create_dir_all(&dir)?;
    let id = format!("bench-snap-{}", std::process::id());
    let vm_dir = ray::runtime::vm_dir(runtime, &id);
    std::fs::create_dir_all(&vm_dir)?;
    let cfg = VmConfig {
        kernel: default_guest()?.display().to_string(),
        initrd: None,
        cmdline: DEFAULT_GUEST_CMDLINE.into(),
        vcpus: 1,
        memory_bytes: a.memory,
        devices: Default::default(),
        numa: Vec::new(),
        numa_attribution: Default::default(),
        numa_migration: Default::default(),
    };
    let mut vmm = Command::new(&exe)
        .args([
            "vmm",
            "--id",
            &id,
            "--start",
            "--config-json",
            &serde_json::to_string(&cfg)?,
        ])
        .arg("--dir")
        .arg(&vm_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let client = VmmClient::new(&vm_dir.join("api.sock"));
    let result = (|| -> anyhow::Result<Report> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(info) = client.call::<VmInfo>("GET", "/vm", None) {
                if info.heartbeat.is_some_and(|h| h.ready) {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("the benchmark guest did not become ready");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let send = |line: &str| -> anyhow::Result<()> {
            let body = serde_json::to_vec(&ConsoleInput {
                data: format!("{line}\n"),
            })?;
            let _: serde_json::Value = client.call("POST", "/vm/console", Some(body))?;
            Ok(())
        };
        send(&format!("dirty {} 100000", a.touched >> 20))?;
        while client
            .call::<VmInfo>("GET", "/vm", None)?
            .heartbeat
            .map_or(0, |h| h.dirty_bytes)
            < a.touched
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        send("dirty stop")?;
        std::thread::sleep(Duration::from_millis(50));
        let _: VmInfo = client.call("PUT", "/vm/pause", None)?;
        let (mut full, mut disk, mut restore, mut restore_nv) = (vec![], vec![], vec![], vec![]);
        let (mut incr, mut incr_bytes, mut restore_incr) = (vec![], vec![], vec![]);
        let (mut phases, mut phases_nv) = (Phases::default(), Phases::default());
        let mut full_bytes = 0;
        let mut manifest_bytes = 0;
        let snapshot = |path: &Path, kind: SnapshotKind| -> anyhow::Result<SnapshotInfo> {
            let req = SnapshotRequest {
                handoff: None,
                path: path.display().to_string(),
                pause: false,
                kind,
                compress: false,
                max_snapshots: None,
            };
            Ok(client.call("PUT", "/vm/snapshot", Some(serde_json::to_vec(&req)?))?)
        };
        for i in 0..a.runs {
            let path = dir.join(format!("{id}-{i}"));
            let incr_path = dir.join(format!("{id}-{i}-incr"));
            let _ = std::fs::remove_dir_all(&path);
            let _ = std::fs::remove_dir_all(&incr_path);
            let info = snapshot(&path, SnapshotKind::Full)?;
            full.push(info.write_ms);
            full_bytes = info.disk_bytes;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            // Which restore comes first alternates: the first one after a snapshot write
            // meets the host still busy with it, and neither should always pay for that.
            for verify in [i % 2 == 0, i % 2 != 0] {
                let (times, phases) = if verify {
                    (&mut restore, &mut phases)
                } else {
                    (&mut restore_nv, &mut phases_nv)
                };
                times.push(ms(restore_latency(
                    &exe,
                    runtime,
                    &path,
                    verify,
                    i,
                    Some(phases),
                )?));
            }

            // The guest rewrites `dirtied` bytes of its memory once, then the incremental.
            let _: VmInfo = client.call("PUT", "/vm/resume", None)?;
            let before = client
                .call::<VmInfo>("GET", "/vm", None)?
                .heartbeat
                .map_or(0, |h| h.dirty_bytes);
            send(&format!("dirty {} 100000", a.dirtied >> 20))?;
            while client
                .call::<VmInfo>("GET", "/vm", None)?
                .heartbeat
                .map_or(0, |h| h.dirty_bytes)
                < before + a.dirtied
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            send("dirty stop")?;
            std::thread::sleep(Duration::from_millis(20));
            let _: VmInfo = client.call("PUT", "/vm/pause", None)?;
            let info = snapshot(&incr_path, SnapshotKind::Incremental)?;
            incr.push(info.write_ms);
            manifest_bytes = std::fs::metadata(incr_path.join("manifest.json"))?.len();
            incr_bytes.push(info.disk_bytes);
            restore_incr.push(ms(restore_latency(
                &exe, runtime, &incr_path, true, i, None,
            )?));
            std::fs::remove_dir_all(&incr_path)?;
            std::fs::remove_dir_all(&path)?;
            // The disk on its own, with as many bytes as the full snapshot wrote.
            disk.push(disk_speed(&dir, full_bytes)?);
        }
        incr_bytes.sort_unstable();
        let incremental_bytes = incr_bytes[incr_bytes.len() / 2];
        let full_ms = Stats::of(&full);
        let disk_mib_s = Stats::of(&disk);
        let full_mib_s = full_bytes as f64 / (1 << 20) as f64 / (full_ms.median / 1e3);
        Ok(Report {
            runs: a.runs,
            memory_bytes: a.memory,
            touched_bytes: a.touched,
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            full_ms,
            full_bytes,
            disk_mib_s,
            full_speed_ratio: full_mib_s / disk_mib_s.median,
            incremental_ms: Stats::of(&incr),
            incremental_bytes,
            incremental_manifest_bytes: manifest_bytes,
            dirtied_bytes: a.dirtied,
            incremental_ratio: incremental_bytes as f64 / a.dirtied as f64,
            restore_incremental_ms: Stats::of(&restore_incr),
            restore_ms: Stats::of(&restore),
            restore_unverified_ms: Stats::of(&restore_nv),
            restore_phases: PhaseReport {
                unverified: phases_nv.stats(),
                verified: phases.stats(),
            },
        })
    })();
    let _ = vmm.kill();
    let _ = vmm.wait();
    let _ = std::fs::remove_dir_all(&vm_dir);
    let r = result?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "snapshot ({} runs, {} MiB guest, {} MiB touched, {} build)",
            r.runs,
            r.memory_bytes >> 20,
            r.touched_bytes >> 20,
            r.build
        );
        print_row("full snapshot write", r.full_ms, "ms");
        print_row("disk sequential write", r.disk_mib_s, "MiB/s");
        print_row("restore -> answers", r.restore_ms, "ms");
        print_row("restore (unverified)", r.restore_unverified_ms, "ms");
        for (name, p) in [
            ("unverified", &r.restore_phases.unverified),
            ("verified", &r.restore_phases.verified),
        ] {
            println!("  restore steps ({name}):");
            print_row("  process start", p.process_start, "ms");
            print_row("  VMM set-up", p.vmm_setup, "ms");
            print_row("  load state", p.load, "ms");
            print_row("  map memory", p.memory_map, "ms");
            print_row("  KVM set-up", p.kvm_setup, "ms");
            print_row("  vCPUs run -> answer", p.first_answer, "ms");
        }
        print_row("incremental snapshot write", r.incremental_ms, "ms");
        print_row("restore incremental", r.restore_incremental_ms, "ms");
        println!(
            "  full snapshot size          {} MiB; speed {:.0}% of the disk's",
            r.full_bytes >> 20,
            r.full_speed_ratio * 100.0
        );
        println!(
            "  incremental size            {:.2} MiB + {} B manifest for {} MiB dirtied: x{:.3}",
            r.incremental_bytes as f64 / (1 << 20) as f64,
            r.incremental_manifest_bytes,
            r.dirtied_bytes >> 20,
            r.incremental_ratio
        );
    }
    Ok(())
}
