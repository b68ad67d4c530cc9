//! virtio-blk: our guest's driver against the device model on real image files, across
//! snapshots and live migration; the host checks the bytes in the files.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ray_api::vmm::VmStateName;
use ray_e2e::{Env, Vm};

use crate::devices::delta;

const READY: Duration = Duration::from_secs(20);

/// A sparse image of `mib` MiB in the test's directory.
fn image(env: &Env, name: &str, mib: u64) -> PathBuf {
    let p = env.runtime.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    p
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn read_at(path: &Path, offset: usize, len: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[offset..offset + len].to_vec()
}

fn boot_with(env: &Env, disk: &str) -> Vm {
    let mut vm = env.boot(&["--disk", disk]);
    vm.expect_line("ready", READY);
    vm
}

#[test]
fn guest_writes_land_in_the_file_and_host_bytes_reach_the_guest_without_exits() {
    let env = Env::new("blk-rw");
    let img = image(&env, "d.img", 16);
    let mut vm = boot_with(&env, img.to_str().unwrap());
    let info = vm.command("disk", "disk ");
    assert_eq!(info, "disk capacity=32768 ro=0 queues=2 id=disk0");

    let w = vm.command("disk write 8 16 0x5a", "disk ");
    assert!(w.starts_with("disk write ok"), "{w}");
    assert_eq!(read_at(&img, 8 * 512, 16 * 512), vec![0x5a; 16 * 512]);
    assert_eq!(read_at(&img, 0, 8 * 512), vec![0; 8 * 512]);
    assert_eq!(read_at(&img, 24 * 512, 512), vec![0; 512]);

    // The host writes; the guest reads and sums the same bytes.
    let pattern: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 31 % 251) as u8).collect();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern, 100 * 512).unwrap();
    let sum = vm.command("disk sum 100 24", "disk ");
    assert_eq!(
        sum.split_whitespace().nth(2).unwrap(),
        format!("{:016x}", fnv(&pattern))
    );

    // A request costs no exit: the kick is an ioeventfd, the completion an irqfd.
    let t0 = vm.exits();
    let r = vm.command("disk read 0 64", "disk ");
    let t1 = vm.exits();
    let e = vm.command("echo x", "x");
    assert_eq!(e, "x");
    let t2 = vm.exits();
    let (req, base) = (delta(&t0, &t1), delta(&t1, &t2));
    eprintln!("exits: disk read {req:?}; echo {base:?}; {r}");
    assert!(r.starts_with("disk read ok"), "{r}");
    // At most one interrupt per request (event indices): a device that finished before
    // the guest's wait leaves its interrupt pending, taken at the next `hlt`, so ten
    // requests see at most 11.
    let irqs: u64 = (0..10)
        .map(|_| {
            let r = vm.command("disk read 0 8", "disk ");
            r.split_whitespace()
                .find_map(|w| w.strip_prefix("irqs="))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{r}"))
        })
        .sum();
    eprintln!("{irqs} interrupts taken during 10 requests");
    assert!(irqs <= 11, "{irqs} interrupts for 10 requests");
    assert_eq!(req["mmio"], 0, "{req:?}");

    // Past the end: refused by the guest's driver; the device refuses what gets by.
    let bad = vm.command("disk read 32760 16", "err");
    assert!(bad.contains("beyond the disk's capacity"), "{bad}");
}

#[test]
fn a_read_only_disk_refuses_writes_and_flush_and_discard_work() {
    let env = Env::new("blk-ro");
    let img = image(&env, "ro.img", 4);
    std::fs::write(&img, vec![7u8; 4 << 20]).unwrap();
    let mut vm = boot_with(&env, &format!("{},ro", img.display()));
    assert!(vm.command("disk", "disk ").contains("ro=1"));
    let w = vm.command("disk write 0 8 1", "err");
    assert_eq!(w, "err disk: the device answered IOERR");
    assert_eq!(read_at(&img, 0, 4096), vec![7; 4096]);
    let s = vm.command("disk sum 0 8", "disk ");
    assert_eq!(
        s.split_whitespace().nth(2).unwrap(),
        format!("{:016x}", fnv(&[7; 4096]))
    );
    drop(vm);

    let rw = image(&env, "rw.img", 4);
    std::fs::write(&rw, vec![7u8; 4 << 20]).unwrap();
    let mut vm = boot_with(&env, rw.to_str().unwrap());
    let before = std::fs::metadata(&rw).unwrap().blocks();
    let d = vm.command("disk discard 0 4096", "disk ");
    assert!(d.starts_with("disk discard ok"), "{d}");
    let after = std::fs::metadata(&rw).unwrap().blocks();
    assert!(
        after + 4096 <= before,
        "st_blocks {before} -> {after}: no hole"
    );
    assert_eq!(read_at(&rw, 0, 4096), vec![0; 4096]);
    assert_eq!(read_at(&rw, 2 << 20, 4096), vec![7; 4096]);
    let f = vm.command("disk flush", "disk ");
    assert!(f.starts_with("disk flush ok"), "{f}");
}

#[test]
fn a_disk_write_after_snapshot_restore_lands() {
    let env = Env::new("blk-snap");
    let img = image(&env, "s.img", 8);
    let mut vm = boot_with(&env, img.to_str().unwrap());
    assert!(vm.command("disk write 0 8 0x11", "disk ").contains("ok"));
    let mut back = env.snapshot_and_restore(&vm, "snap-blk", "blk-back");
    let t0 = back.exits();
    let w = back.command("disk write 16 8 0x22", "disk ");
    let t1 = back.exits();
    assert!(w.starts_with("disk write ok"), "{w}");
    assert_eq!(delta(&t0, &t1)["mmio"], 0, "the driver's set-up came back");
    assert_eq!(read_at(&img, 0, 4096), vec![0x11; 4096]);
    assert_eq!(read_at(&img, 16 * 512, 4096), vec![0x22; 4096]);
}

#[test]
fn a_disk_write_after_a_live_migration_lands_and_a_missing_disk_refuses_it() {
    let env = Env::new("blk-mig");
    let key = &env.key_file("key", "a pre-shared key of some length");
    let img = image(&env, "m.img", 8);
    let mut src = env.boot(&["--memory", "128M", "--disk", img.to_str().unwrap()]);
    src.expect_line("ready", READY);
    assert!(src.command("disk write 0 8 0x33", "disk ").contains("ok"));

    let src_id = src.id.clone();
    let migrate = |id: &str| {
        // Shared storage (the target opens the source's path): jailed as by default, its
        // keeper opens the disk under the directory it was given.
        let shared = env.runtime.to_str().unwrap();
        let (dst, listen) = env.receive(id, key, &["--shared-dir", shared]);
        (dst, env.migrate_start(&src_id, &listen, key))
    };

    // The disk is not where the source has it: the target refuses, the source goes on.
    let moved = env.runtime.join("m.moved");
    std::fs::rename(&img, &moved).unwrap();
    let (_, refused) = migrate("blk-nodisk");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!refused.status.success(), "{text}");
    assert!(text.contains("m.img"), "the refusal names the disk: {text}");
    std::fs::rename(&moved, &img).unwrap();
    src.wait_for("running again", Duration::from_secs(10), |i| {
        i.state == VmStateName::Running
    });
    assert!(src.command("disk write 8 8 0x44", "disk ").contains("ok"));

    // A jailed target given no shared directory opens no shared disk: refused before the
    // switch-over, naming the disk and --shared-dir; the source goes on.
    let (_, refused) = {
        let (dst, listen) = env.receive("blk-unshared", key, &["--jail"]);
        (dst, env.migrate_start(&src_id, &listen, key))
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!refused.status.success(), "{text}");
    assert!(
        text.contains("m.img") && text.contains("--shared-dir"),
        "{text}"
    );
    src.wait_for("running again", Duration::from_secs(10), |i| {
        i.state == VmStateName::Running
    });

    let (mut dst, started) = migrate("blk-dst");
    assert!(started.status.success(), "{started:?}");
    src.wait_exit(Duration::from_secs(10));
    let w = dst.command("disk write 16 8 0x55", "disk ");
    assert!(w.starts_with("disk write ok"), "{w}");
    assert_eq!(read_at(&img, 0, 4096), vec![0x33; 4096]);
    assert_eq!(read_at(&img, 8 * 512, 4096), vec![0x44; 4096]);
    assert_eq!(read_at(&img, 16 * 512, 4096), vec![0x55; 4096]);
}

/// The io_uring engine behind the same guest driver, under the VMM's seccomp filters
/// (kill mode, the default): writes, reads, discard and flush land, `ray vm config` names
/// the engine, and a write after a snapshot's restore lands too.
#[test]
fn the_uring_engine_serves_the_guest_and_survives_a_restore() {
    let env = Env::new("blk-uring");
    let img = image(&env, "u.img", 8);
    std::fs::write(&img, vec![7u8; 8 << 20]).unwrap();
    let mut vm = boot_with(&env, &format!("{},engine=uring", img.display()));
    let config = env.ray_ok(&["vm", "config", &vm.id, "-o", "json"]);
    assert!(
        config.contains("\"engine\"") && config.contains("\"uring\""),
        "{config}"
    );
    let w = vm.command("disk write 8 16 0x5a", "disk ");
    assert!(w.starts_with("disk write ok"), "{w}");
    assert_eq!(read_at(&img, 8 * 512, 16 * 512), vec![0x5a; 16 * 512]);
    let s = vm.command("disk sum 0 24", "disk ");
    let mut want = vec![7u8; 24 * 512];
    want[8 * 512..].fill(0x5a);
    assert_eq!(
        s.split_whitespace().nth(2).unwrap(),
        format!("{:016x}", fnv(&want))
    );
    let d = vm.command("disk discard 2048 2048", "disk ");
    assert!(d.starts_with("disk discard ok"), "{d}");
    assert_eq!(read_at(&img, 1 << 20, 1 << 20), vec![0; 1 << 20]);
    assert_eq!(read_at(&img, 2 << 20, 4096), vec![7; 4096]);
    let f = vm.command("disk flush", "disk ");
    assert!(f.starts_with("disk flush ok"), "{f}");
    let mut back = env.snapshot_and_restore(&vm, "snap-uring", "blk-uring-back");
    let w = back.command("disk write 64 8 0x66", "disk ");
    assert!(w.starts_with("disk write ok"), "{w}");
    assert_eq!(read_at(&img, 64 * 512, 4096), vec![0x66; 4096]);
}

#[test]
fn bad_disk_arguments_are_refused_naming_what_was_wrong() {
    let env = Env::new("blk-args");
    let img = image(&env, "a.img", 1);
    let odd = env.runtime.join("odd.img");
    std::fs::write(&odd, [0u8; 1000]).unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--disk", "/nonexistent/disk.img"],
            "/nonexistent/disk.img",
        ),
        (
            &["--disk", &format!("{},rw", img.display())],
            "unknown disk option 'rw'",
        ),
        (
            &["--disk", &format!("{},iops=0", img.display())],
            "above zero",
        ),
        (
            &[
                "--disk",
                &format!("{},id=x", img.display()),
                "--disk",
                &format!("{},id=x", img.display()),
            ],
            "two disks have this id",
        ),
        (&["--disk", odd.to_str().unwrap()], "512-byte sectors"),
        (
            &["--disk", &format!("{},engine=aio", img.display())],
            "the disk engines are pool and uring",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["vm", "run", "--detach"];
        all.extend_from_slice(args);
        let out = env.ray(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn a_rate_limited_disk_paces_the_guest() {
    let env = Env::new("blk-rate");
    let img = image(&env, "r.img", 8);
    let mut vm = boot_with(&env, &format!("{},rate=1M", img.display()));
    // The bucket starts with one second's worth (1 MiB); 3 MiB more take 3 s.
    let w = vm.command("disk write 0 8192 0x66", "disk ");
    let ns: u64 = w
        .split_whitespace()
        .find_map(|x| x.strip_prefix("ns="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{w}"));
    eprintln!("4 MiB at 1 MiB/s: {} ms", ns / 1_000_000);
    assert!(ns >= 2_800_000_000, "{w}");
    assert_eq!(read_at(&img, (4 << 20) - 4096, 4096), vec![0x66; 4096]);
}

#[test]
fn pause_drains_requests_in_flight_and_the_restored_guest_finishes_its_writes() {
    let env = Env::new("blk-drain");
    let img = image(&env, "q.img", 8);
    let vm = boot_with(&env, &format!("{},rate=1M", img.display()));
    // Four 1 MiB writes paced at 1 MiB/s: the pause comes while one is at the disk.
    vm.send("disk write 0 8192 0x77");
    std::thread::sleep(Duration::from_millis(1500));
    env.ray_ok(&["vm", "pause", &vm.id]);
    let path = env.runtime.join("snap-drain");
    let path = path.to_str().unwrap();
    env.ray_ok(&["snapshot", "create", &vm.id, path]);
    env.ray_ok(&["vm", "stop", &vm.id, "--timeout-ms", "0"]);
    let done_before = std::fs::read(&img).unwrap()[..4 << 20]
        .chunks(1 << 20)
        .filter(|c| c.iter().all(|&b| b == 0x77))
        .count();
    assert!(
        (1..4).contains(&done_before),
        "{done_before} MiB written before the pause"
    );

    let out = env.ray_ok(&[
        "snapshot",
        "restore",
        path,
        "--id",
        "drain-back",
        "--detach",
        "--json",
    ]);
    let info: ray_api::vmm::VmInfo = serde_json::from_str(&out).unwrap();
    let mut back = env.attach("drain-back", info.pid);
    let line = back.expect_line("disk write", Duration::from_secs(20));
    assert!(line.starts_with("disk write ok"), "{line}");
    assert!(std::fs::read(&img).unwrap()[..4 << 20]
        .iter()
        .all(|&b| b == 0x77));
}
