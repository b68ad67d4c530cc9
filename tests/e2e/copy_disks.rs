//! Live migration with `--copy-disks`: our guest writes its disk before and during the
//! migration; the target, started with `--disk-dir`, ends up with a file equal to the
//! source's at the switch-over, runs on it, and a cancelled copy leaves nothing behind.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ray_api::vmm::{MigrationStatus, VmConfig, VmStateName};
use ray_e2e::{Env, Vm};

use crate::migration::{migration, run, wait_for_end, wait_for_pass, READY};

/// A sparse image of `mib` MiB in the test's directory.
fn image(env: &Env, name: &str, mib: u64) -> PathBuf {
    let p = env.runtime.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    p
}

/// The guest's `disk sum` checksum (FNV-1a) of the same bytes.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn ok(vm: &mut Vm, line: &str) {
    let r = vm.command(line, "disk ");
    assert!(r.contains(" ok"), "{line}: {r}");
}

/// Boots a guest with a 256 MiB sparse disk holding 1 MiB at 0 and 1 MiB at 128 MiB, and
/// a target waiting on loopback TCP (encrypted) with a disk directory. Returns the source,
/// the target, its address, the disk and the directory.
fn set_up(env: &Env, key: &str) -> (Vm, Vm, String, PathBuf, PathBuf) {
    let img = image(env, "src.img", 256);
    let mut src = env.boot(&["--memory", "256M", "--disk", img.to_str().unwrap()]);
    src.expect_line("ready", READY);
    ok(&mut src, "disk write 0 2048 0x11");
    ok(&mut src, "disk write 262144 2048 0x22");
    let dir = env.runtime.join("copies");
    std::fs::create_dir_all(&dir).unwrap();
    let dst = env.receive_on(
        "cd-dst",
        "127.0.0.1:0",
        key,
        &["--disk-dir", dir.to_str().unwrap()],
    );
    let listen = migration(&dst).peer;
    (src, dst, listen, img, dir)
}

/// Starts a migration with `--copy-disks` that cannot converge (a 1 ms budget is below the
/// fixed state cost, no throttling) until `max_time_ms` has passed: then `on_limit`.
fn start(env: &Env, src: &Vm, listen: &str, key: &str, max_time_ms: &str, on_limit: &str) {
    env.ray_ok(&[
        "migrate",
        "start",
        &src.id,
        "--to",
        listen,
        "--key-file",
        key,
        "--copy-disks",
        "--max-downtime-ms",
        "1",
        "--no-auto-converge",
        "--max-passes",
        "1000000",
        "--max-time-ms",
        max_time_ms,
        "--on-limit",
        on_limit,
        "--detach",
        "--json",
    ]);
}

#[test]
fn copy_disks_moves_a_disk_written_during_the_migration() {
    let env = Env::new("copy-disks");
    let key = env.key_file("key", "a pre-shared key of some length");
    let (mut src, mut dst, listen, img, dir) = set_up(&env, &key);
    // Pre-copy goes on for 8 s, then the stop-and-copy is forced.
    start(&env, &src, &listen, &key, "8000", "force");
    // Pre-copy runs (its first pass sent the disk's data): the guest writes meanwhile,
    // into blocks that had data and into blocks that had none, and discards some.
    let s = wait_for_pass(&src, 2);
    assert!(s.disk_bytes_sent.unwrap_or(0) >= 2 << 20, "{s:?}");
    ok(&mut src, "disk write 8 8 0x44");
    ok(&mut src, "disk write 4096 128 0x33");
    ok(&mut src, "disk discard 262400 256");
    ok(&mut src, "disk write 500000 16 0x55");
    let s = migration(&src);
    assert!(
        s.vm == "migrating" && s.state == "pre_copy",
        "still in pre-copy: {s:?}"
    );
    // Followed to its end (the source's VMM ends with it: its record has the outcome).
    let out = env.ray_ok(&["migrate", "progress", &src.id, "--json"]);
    let s: MigrationStatus = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (s.state.as_str(), s.vm.as_str()),
        ("completed", "migrated"),
        "{s:?}"
    );
    src.wait_exit(Duration::from_secs(10));

    // The source's file is as it was at the switch-over; the copy equals it.
    let copy = dir.join("disk0.img");
    assert_eq!(
        sha256(&copy),
        sha256(&img),
        "the copy differs from the source"
    );
    let (a, b) = (std::fs::read(&img).unwrap(), std::fs::read(&copy).unwrap());
    assert_eq!(a.len(), 256 << 20);
    assert_eq!(
        &a[4096 * 512..4096 * 512 + (64 << 10)],
        &vec![0x33u8; 64 << 10][..]
    );
    assert!(a == b);
    // Holes stayed holes: about 2 MiB of data, not 256 MiB.
    let sent = s.disk_bytes_sent.unwrap();
    assert!(
        (2 << 20..64 << 20).contains(&sent),
        "sent {sent} disk bytes"
    );
    assert!(
        std::fs::metadata(&copy).unwrap().blocks() * 512 < 64 << 20,
        "the copy is sparse"
    );

    // The guest on the target reads the same bytes.
    let want = fnv(&a[..(1 << 20) + (64 << 10) * 40]);
    let sum = dst.command(
        &format!("disk sum 0 {}", ((1 << 20) + (64 << 10) * 40) / 512),
        "disk ",
    );
    assert_eq!(
        sum.split_whitespace().nth(2).unwrap(),
        format!("{want:016x}"),
        "{sum}"
    );
    let sum = dst.command("disk sum 262144 2048", "disk ");
    assert_eq!(
        sum.split_whitespace().nth(2).unwrap(),
        format!("{:016x}", fnv(&a[128 << 20..129 << 20])),
        "{sum}"
    );
    // The target's VM uses the copy; a write lands there and not in the source's file.
    let cfg: VmConfig =
        serde_json::from_str(&env.ray_ok(&["vm", "config", "cd-dst", "-o", "json"])).unwrap();
    assert_eq!(cfg.devices.disks[0].path, copy.display().to_string());
    ok(&mut dst, "disk write 520000 8 0x77");
    let off = 520000 * 512;
    assert_eq!(
        &std::fs::read(&copy).unwrap()[off..off + 4096],
        &[0x77; 4096][..]
    );
    assert_eq!(
        &std::fs::read(&img).unwrap()[off..off + 4096],
        &[0; 4096][..]
    );
}

#[test]
fn a_cancelled_copy_leaves_no_file_and_the_source_runs_on_its_disk() {
    let env = Env::new("copy-disks-cancel");
    let key = env.key_file("key", "a pre-shared key of some length");
    let (mut src, dst, listen, img, dir) = set_up(&env, &key);
    start(&env, &src, &listen, &key, "120000", "abort");
    wait_for_pass(&src, 2);
    // Made under a hidden partial name: nothing at the name a VM opens until the copy is
    // complete and flushed.
    let part = dir.join(format!(".disk0.img.{}.part", dst.id));
    assert!(part.exists(), "the copy is being made");
    assert!(
        !dir.join("disk0.img").exists(),
        "no copy under its final name yet"
    );
    let before = std::fs::read(&img).unwrap();
    env.ray_ok(&["migrate", "cancel", &src.id, "--json"]);
    let s = wait_for_end(&src);
    assert_eq!(s.vm, "running", "{s:?}");
    dst.wait_exit(Duration::from_secs(30));
    assert!(
        !dir.join("disk0.img").exists(),
        "the partial copy is removed"
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    src.wait_for("running again", Duration::from_secs(10), |i| {
        i.state == VmStateName::Running
    });
    src.command("dirty stop", "dirty off");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the source's disk is untouched"
    );
    ok(&mut src, "disk write 16 8 0x66");
    assert_eq!(
        &std::fs::read(&img).unwrap()[16 * 512..20 * 512],
        &[0x66; 2048][..]
    );
}
