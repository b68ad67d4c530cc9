//! The soak: several VMs under a random mix of lifecycle, snapshot, migration and device
//! traffic with injected faults (VMMs killed, migration targets killed, cancelled
//! migrations, garbage API bodies, CLI arguments and migration streams) for
//! `$RAY_SOAK_SECS` seconds (`scripts/soak SECS`; the test suite runs a short one), then
//! the invariants: every VM runs exactly once, none is lost, its memory and disk hold what
//! was written, and a VMM that lived through it all holds as many file descriptors and
//! about as much memory as before. `$RAY_SOAK_SEED` replays a run.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ray_api::vmm::{VmInfo, VmStateName};
use ray_e2e::{succeeded, Env, Vm};

const READY: Duration = Duration::from_secs(30);
/// VMs in the soak; the first is the steady one whose VMM is never replaced.
const VMS: usize = 3;
/// Disk chunks the soak writes: 4 KiB (8 sectors) each.
const CHUNKS: u64 = 32;
/// How much a steady VMM's resident memory may grow over the soak.
const RSS_SLACK_KIB: u64 = 16 * 1024;

/// The soak's random choices, reproducible from the printed seed.
struct Rng(ChaCha8Rng);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.gen()
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0.gen_range(0..n)
    }
}

/// One VM as the user sees it, across the VMMs that ran it (restores and migrations give
/// it a new id: `NAME-GEN`).
struct Logical {
    name: String,
    gen: u32,
    vm: Vm,
    steady: bool,
    disk: PathBuf,
    /// The guest's `pattern` region and its checksum right after it was written.
    pattern: (u64, u64, String),
    /// Chunk -> (byte written, the guest's `disk sum` of it right after).
    chunks: BTreeMap<u64, (u8, String)>,
    /// The newest checkpoint of the current VMM, if any.
    checkpoint: Option<String>,
    checkpoints: u32,
}

impl Logical {
    fn id(&self) -> String {
        format!("{}-{}", self.name, self.gen)
    }
}

#[derive(Default)]
struct Counts(BTreeMap<&'static str, u64>);

impl Counts {
    fn add(&mut self, what: &'static str) {
        *self.0.entry(what).or_default() += 1;
    }
}

fn soak_secs() -> u64 {
    match std::env::var("RAY_SOAK_SECS") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("RAY_SOAK_SECS={s:?} is not a number of seconds")),
        Err(_) => 45,
    }
}

fn seed() -> u64 {
    match std::env::var("RAY_SOAK_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("RAY_SOAK_SEED={s:?} is not a number")),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            t.as_nanos() as u64
        }
    }
}

/// Open file descriptors and resident KiB of a process.
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("fds of VMM {pid}: {e}"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for VMM {pid}"));
    (fds, rss)
}

fn boot(env: &Env, name: &str, steady: bool, rng: &mut Rng) -> Logical {
    let disk = env.runtime.join(format!("{name}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(CHUNKS * 4096)
        .unwrap();
    let id = format!("{name}-0");
    let disk_arg = disk.display().to_string();
    let mut vm = env.boot(&["--id", &id, "--memory", "128M", "--disk", &disk_arg]);
    vm.expect_line("ready", READY);
    let word = format!("{name}{:x}", rng.next());
    let line = vm.command(&format!("pattern 4 {word}"), "pattern ");
    let base = ray_e2e::region_of(&line);
    let len = 4 << 20;
    let sum = vm.sum(base, len);
    Logical {
        name: name.to_string(),
        gen: 0,
        vm,
        steady,
        disk,
        pattern: (base, len, sum),
        chunks: BTreeMap::new(),
        checkpoint: None,
        checkpoints: 0,
    }
}

/// Every VM still answers its shell.
fn all_answer(vms: &mut [Logical]) {
    for l in vms.iter_mut() {
        assert_eq!(l.vm.state(), VmStateName::Running, "{}", l.id());
        l.vm.command("echo alive", "alive");
    }
}

fn disk_write(l: &mut Logical, rng: &mut Rng) {
    let chunk = rng.below(CHUNKS);
    let byte = (rng.below(255) + 1) as u8;
    let w =
        l.vm.command(&format!("disk write {} 8 {byte:#x}", chunk * 8), "disk ");
    assert!(w.starts_with("disk write ok"), "{}: {w}", l.id());
    let s = disk_sum(&mut l.vm, chunk);
    l.chunks.insert(chunk, (byte, s));
}

fn disk_sum(vm: &mut Vm, chunk: u64) -> String {
    let s = vm.command(&format!("disk sum {} 8", chunk * 8), "disk ");
    s.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("disk sum answered {s}"))
        .to_string()
}

fn checkpoint(env: &Env, l: &mut Logical) {
    // A fresh store every 100 checkpoints keeps chains well below the store's limit.
    let store = env
        .runtime
        .join(format!("ckpt-{}-{}", l.id(), l.checkpoints / 100));
    let out = env.ray_ok(&[
        "vm",
        "checkpoint",
        &l.vm.id,
        "--store",
        store.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    l.checkpoint = Some(v["path"].as_str().unwrap().to_string());
    l.checkpoints += 1;
}

/// Replaces `l`'s VMM with `next` (a restore or a migration target).
fn replace(l: &mut Logical, next: Vm) {
    l.gen += 1;
    assert_eq!(next.id, l.id());
    l.vm = next;
    l.checkpoint = None;
}

fn snapshot_restore(env: &Env, l: &mut Logical) {
    let next_id = format!("{}-{}", l.name, l.gen + 1);
    let next = env.snapshot_and_restore(&l.vm, &format!("{next_id}.snap"), &next_id);
    replace(l, next);
}

/// Migration targets run jailed as ray's default has them (as root); these VMs' disks are
/// shared storage (the same path on both ends), in this directory, which each target is
/// given (`--shared-dir`) for its jail's keeper to open them from.
fn shared_dir(env: &Env) -> String {
    env.runtime.display().to_string()
}

fn migrate(env: &Env, l: &mut Logical) {
    let next_id = format!("{}-{}", l.name, l.gen + 1);
    let next = env.migrate_here_with(&l.vm, &next_id, &["--shared-dir", &shared_dir(env)]);
    replace(l, next);
}

/// A migration started in the background and cancelled at once: either the cancel wins
/// (the source runs on, the target ends) or the migration had already finished (the
/// target runs, the source ended). Never both, never neither.
fn cancelled_migration(env: &Env, l: &mut Logical, counts: &mut Counts) {
    let next_id = format!("{}-{}", l.name, l.gen + 1);
    let key = env.key_file(&format!("{next_id}.key"), "a pre-shared key of some length");
    let (target, listen) = env.receive(&next_id, &key, &["--shared-dir", &shared_dir(env)]);
    let started = env.ray(&[
        "migrate",
        "start",
        &l.vm.id,
        "--to",
        &listen,
        "--key-file",
        &key,
        "--detach",
        "--json",
    ]);
    succeeded(started, "migrate start --detach");
    let cancel = env.ray(&["migrate", "cancel", &l.vm.id]);
    if cancel.status.success() {
        target.wait_exit(Duration::from_secs(30));
        // The source may still be rolling back: it must come back to running.
        l.vm.wait_for("the source running after a cancel", READY, |i| {
            i.state == VmStateName::Running
        });
        counts.add("fault: migration cancelled");
    } else {
        // Nothing left to cancel: it had finished or was finishing.
        l.vm.wait_exit(Duration::from_secs(30));
        target.wait_for("the target running", READY, |i| {
            i.state == VmStateName::Running
        });
        replace(l, target);
        counts.add("migration finished before its cancel");
    }
}

/// A migration to a target killed before the source connects: the source runs on.
fn dead_target(env: &Env, l: &mut Logical) {
    let id = format!("{}-dead", l.name);
    let key = env.key_file(&format!("{id}.key"), "a pre-shared key of some length");
    let (target, listen) = env.receive(&id, &key, &["--shared-dir", &shared_dir(env)]);
    // SAFETY: kill(2) of a VMM this test started.
    unsafe { libc::kill(target.pid as libc::pid_t, libc::SIGKILL) };
    target.wait_exit(Duration::from_secs(30));
    let out = env.migrate_start(&l.vm.id, &listen, &key);
    assert!(
        !out.status.success(),
        "a migration to a dead target succeeded"
    );
    l.vm.wait_for("the source running after a dead target", READY, |i| {
        i.state == VmStateName::Running
    });
    env.ray_ok(&["vm", "rm", &id]);
}

/// A VMM killed with SIGKILL; the VM comes back from its newest checkpoint.
fn kill_and_recover(env: &Env, l: &mut Logical) {
    let path = l.checkpoint.clone().expect("a checkpoint to recover from");
    // SAFETY: kill(2) of a VMM this test started.
    unsafe { libc::kill(l.vm.pid as libc::pid_t, libc::SIGKILL) };
    l.vm.wait_exit(Duration::from_secs(30));
    let next_id = format!("{}-{}", l.name, l.gen + 1);
    let next = env.restore(&path, &next_id);
    replace(l, next);
}

/// Raw HTTP over a VM's API socket; returns the status line.
fn raw_http(vm: &Vm, request: &[u8]) -> String {
    let mut s = UnixStream::connect(vm.dir.join("api.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// One kind of bad input, refused with an error, with no VM touched.
fn bad_input(env: &Env, l: &mut Logical, rng: &mut Rng, counts: &mut Counts) {
    match rng.below(4) {
        0 => {
            let body = b"{\"path\": 17, ";
            let mut req = format!(
                "PUT /vm/snapshot HTTP/1.1\r\nHost: vm\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(body);
            let status = raw_http(&l.vm, &req);
            assert!(status.contains(" 400 "), "garbage JSON answered {status:?}");
            counts.add("bad input: API body");
        }
        1 => {
            let status = raw_http(&l.vm, b"BREW /vm HTTP/1.1\r\nHost: vm\r\n\r\n");
            assert!(
                status.contains(" 405 ") || status.contains(" 404 ") || status.contains(" 400 "),
                "an unknown method answered {status:?}"
            );
            counts.add("bad input: API method");
        }
        2 => {
            let out = env.ray(&["vm", "run", "--memory", "0", "--detach"]);
            assert!(!out.status.success(), "`--memory 0` started a VM");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("memory"), "{err}");
            counts.add("bad input: CLI");
        }
        _ => {
            // A garbage migration stream into a waiting target: refused, the target may
            // wait on or end, and nothing else notices.
            let id = format!("{}-junk", l.name);
            let key = env.key_file(&format!("{id}.key"), "a pre-shared key of some length");
            let (target, listen) = env.receive(&id, &key, &[]);
            let path = listen.strip_prefix("unix:").unwrap();
            let mut s = UnixStream::connect(path).unwrap();
            let junk: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
            let _ = s.write_all(&junk);
            drop(s);
            let _ = env.ray(&["vm", "stop", &id, "--timeout-ms", "0"]);
            target.wait_exit(Duration::from_secs(30));
            let _ = env.ray(&["vm", "rm", &id]);
            counts.add("bad input: migration stream");
        }
    }
}

#[test]
fn soak_keeps_every_vm_once_with_its_memory_and_disk() {
    let secs = soak_secs();
    let seed = seed();
    eprintln!("soak: {secs} s, RAY_SOAK_SEED={seed}");
    let mut rng = Rng(ChaCha8Rng::seed_from_u64(seed));
    let env = Env::new("soak");
    let mut vms: Vec<Logical> = (0..VMS)
        .map(|i| boot(&env, &format!("s{i}"), i == 0, &mut rng))
        .collect();
    let mut counts = Counts::default();
    // Warm the steady VMM up on every path it will see before measuring it.
    checkpoint(&env, &mut vms[0]);
    disk_write(&mut vms[0], &mut rng);
    dead_target(&env, &mut vms[0]);
    vms[0].vm.command("rng 16", "rng ");
    let steady_pid = vms[0].vm.pid;
    let (fds_before, rss_before) = fds_and_rss(steady_pid);
    let mut kills = 0;

    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        let i = rng.below(VMS as u64) as usize;
        let l = &mut vms[i];
        let op = rng.below(10);
        eprintln!(
            "soak {:>7.3} s: {} op {op}",
            start.elapsed().as_secs_f64(),
            l.id()
        );
        match op {
            0 => {
                env.ray_ok(&["vm", "pause", &l.vm.id]);
                env.ray_ok(&["vm", "resume", &l.vm.id]);
                counts.add("pause/resume");
            }
            1 => {
                checkpoint(&env, l);
                counts.add("checkpoint");
            }
            2 | 3 => {
                disk_write(l, &mut rng);
                counts.add("disk write");
            }
            4 => {
                let r = l.vm.command("rng 32", "rng ");
                assert!(!r.starts_with("rng err"), "{r}");
                counts.add("rng");
            }
            5 if !l.steady => {
                snapshot_restore(&env, l);
                counts.add("snapshot + restore");
            }
            6 if !l.steady => {
                migrate(&env, l);
                counts.add("live migration");
            }
            7 if !l.steady => cancelled_migration(&env, l, &mut counts),
            8 if !l.steady && l.checkpoint.is_some() => {
                kill_and_recover(&env, l);
                kills += 1;
                counts.add("fault: VMM killed, restored from its checkpoint");
            }
            8 => {
                dead_target(&env, l);
                counts.add("fault: migration target killed");
            }
            _ => bad_input(&env, l, &mut rng, &mut counts),
        }
        ops += 1;
        all_answer(&mut vms);
    }

    // Invariants. Every VM runs exactly once: one running VMM per name, the current one.
    let list: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["vm", "list", "--json"])).unwrap();
    let rows = list.as_array().unwrap();
    let running: Vec<&str> = rows
        .iter()
        .filter(|r| r["state"] == "running")
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    let mut expected: Vec<String> = vms.iter().map(Logical::id).collect();
    expected.sort();
    let mut got: Vec<String> = running.iter().map(|s| s.to_string()).collect();
    got.sort();
    assert_eq!(got, expected, "running VMs: {list}");
    let dead = rows.iter().filter(|r| r["state"] == "dead").count();
    assert_eq!(
        dead, kills,
        "only the VMMs the soak killed are dead: {list}"
    );
    for l in &mut vms {
        let info: VmInfo = l.vm.info();
        assert_eq!(info.pid, l.vm.pid, "{}", l.id());
        // Memory: the pattern written at boot survived every move.
        let (base, len, ref sum) = l.pattern;
        let sum = sum.clone();
        assert_eq!(l.vm.sum(base, len), sum, "{}: guest memory changed", l.id());
        // Disk: the guest reads what it wrote, and so does the host.
        let file = std::fs::File::open(&l.disk).unwrap();
        for (&chunk, (byte, s)) in l.chunks.clone().iter() {
            assert_eq!(&disk_sum(&mut l.vm, chunk), s, "{} chunk {chunk}", l.id());
            let mut buf = vec![0u8; 4096];
            file.read_exact_at(&mut buf, chunk * 4096).unwrap();
            assert!(
                buf.iter().all(|b| b == byte),
                "{} chunk {chunk}: the file does not hold {byte:#x}",
                l.id()
            );
        }
    }
    // No leak in the VMM that lived through it all.
    assert_eq!(vms[0].vm.pid, steady_pid);
    let (fds_after, rss_after) = fds_and_rss(steady_pid);
    assert_eq!(
        fds_after, fds_before,
        "the steady VMM's open files went from {fds_before} to {fds_after}"
    );
    assert!(
        rss_after <= rss_before + RSS_SLACK_KIB,
        "the steady VMM grew from {rss_before} to {rss_after} KiB"
    );
    let summary = serde_json::json!({
        "seconds": start.elapsed().as_secs_f64(),
        "seed": seed,
        "operations": ops,
        "counts": counts.0,
        "incarnations": vms.iter().map(|l| (l.name.clone(), l.gen + 1)).collect::<BTreeMap<_, _>>(),
        "checkpoints": vms.iter().map(|l| l.checkpoints).sum::<u32>(),
        "steady_vmm": {"fds_before": fds_before, "fds_after": fds_after,
                       "rss_kib_before": rss_before, "rss_kib_after": rss_after},
        "invariants": "held",
    });
    println!("{summary}");
}
