//! Full snapshots: take, restore into a new VMM, refuse damaged files, survive a crash.
use std::time::{Duration, Instant};

use ray_api::vmm::VmStateName;
use ray_e2e::{Env, Vm};

const READY: Duration = Duration::from_secs(20);

fn sum_of(vm: &mut Vm, addr: u64, len: u64) -> String {
    let line = vm.command(&format!("sum {addr:#x} {len}"), "sum ");
    line.split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("{line}"))
        .to_string()
}

/// Boots a guest, dirties `mib` MiB and returns (vm, region start).
fn dirtied(env: &Env, memory: &str, mib: u64) -> (Vm, u64) {
    let mut vm = env.boot(&["--memory", memory, "--vcpus", "2"]);
    vm.expect_line("ready", READY);
    let on = vm.command(&format!("dirty {mib} 4000"), "dirty on");
    let region = on
        .split_whitespace()
        .find_map(|w| w.strip_prefix("region=0x"))
        .map(|r| u64::from_str_radix(r, 16).unwrap())
        .unwrap_or_else(|| panic!("{on}"));
    // Let the workload touch the whole region at least once.
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm.info().heartbeat.unwrap().dirty_bytes < mib << 20 {
        assert!(Instant::now() < deadline, "dirty did not cover {mib} MiB");
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.command("dirty stop", "dirty off");
    (vm, region)
}

fn restore(env: &Env, path: &str, id: &str) -> Vm {
    let out = env.ray_ok(&[
        "snapshot", "restore", path, "--id", id, "--detach", "--json",
    ]);
    let info: ray_api::vmm::VmInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(info.state, VmStateName::Running);
    env.attach(id, info.pid)
}

#[test]
fn restored_guest_continues_with_identical_memory() {
    let env = Env::new("snap-restore");
    let (mut vm, region) = dirtied(&env, "256M", 16);
    // The region no longer changes once `dirty` stopped; sum it, then pause.
    let before = sum_of(&mut vm, region, 16 << 20);
    env.ray_ok(&["vm", "pause", &vm.id]);
    let hb_before = vm.info().heartbeat.unwrap();
    let path = env.runtime.join("snap-a");
    let path = path.to_str().unwrap();
    let out = env.ray_ok(&["snapshot", "create", &vm.id, path, "--json"]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!("snapshot: {info}");
    // Only what the guest touched is on disk: 16 MiB dirtied, 256 MiB of RAM.
    let on_disk = info["memory_allocated_bytes"].as_u64().unwrap();
    assert!((16 << 20..32 << 20).contains(&on_disk), "{info}");
    env.ray_ok(&["vm", "stop", &vm.id, "--timeout-ms", "0"]);

    let mut back = restore(&env, path, "restored");
    let hb = back
        .wait_for("heartbeat after restore", Duration::from_secs(5), |i| {
            i.heartbeat
                .as_ref()
                .is_some_and(|h| h.counter > hb_before.counter)
        })
        .heartbeat
        .unwrap();
    assert!(
        hb.pvm,
        "the restored guest must run natively (PVM VIF restored)"
    );
    assert_eq!(hb.cpus_online, 2);
    assert_eq!(
        sum_of(&mut back, region, 16 << 20),
        before,
        "memory differs after restore"
    );
    assert_eq!(back.command("echo still here", "still"), "still here");
    let events = env.ray_ok(&["vm", "events", "restored"]);
    assert!(events.contains("restore:snap-a"), "{events}");
}

#[test]
fn running_vm_needs_pause_and_with_pause_keeps_running() {
    let env = Env::new("snap-running");
    let mut vm = env.boot(&[]);
    vm.expect_line("ready", READY);
    let path = env.runtime.join("snap-r");
    let path = path.to_str().unwrap();
    let out = env.ray(&["snapshot", "create", &vm.id, path]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot snapshot a VM that is running"),
        "{err}"
    );
    assert!(!std::path::Path::new(path).exists());
    assert_eq!(vm.state(), VmStateName::Running);
    env.ray_ok(&["snapshot", "create", &vm.id, path, "--pause"]);
    assert_eq!(vm.state(), VmStateName::Running);
    let again = env.ray(&["snapshot", "create", &vm.id, path, "--pause"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

#[test]
fn damaged_snapshots_are_refused_with_the_file_named() {
    let env = Env::new("snap-damaged");
    let (vm, region) = dirtied(&env, "128M", 4);
    let good = env.runtime.join("good");
    env.ray_ok(&[
        "snapshot",
        "create",
        &vm.id,
        good.to_str().unwrap(),
        "--pause",
    ]);
    let copy = |name: &str| {
        let dir = env.runtime.join(name);
        std::fs::create_dir(&dir).unwrap();
        for f in ["manifest.json", "state.bin", "memory.raw"] {
            std::fs::copy(good.join(f), dir.join(f)).unwrap();
        }
        dir
    };
    let flip = |path: std::path::PathBuf, at: u64| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    };
    let state = copy("bad-state");
    flip(state.join("state.bin"), 200);
    let out = env.ray(&["snapshot", "restore", state.to_str().unwrap(), "--detach"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("state.bin fails its checksum"), "{err}");

    let memory = copy("bad-memory");
    flip(memory.join("memory.raw"), region + 12345);
    let out = env.ray(&["snapshot", "restore", memory.to_str().unwrap(), "--detach"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("memory.raw is damaged: checksum"), "{err}");

    let manifest = copy("bad-manifest");
    std::fs::write(manifest.join("manifest.json"), b"{\"format_version\": 1}").unwrap();
    let out = env.ray(&[
        "snapshot",
        "restore",
        manifest.to_str().unwrap(),
        "--detach",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("manifest.json is invalid: missing field"),
        "{err}"
    );

    // The original still restores, and the source VM was never disturbed.
    let back = restore(&env, good.to_str().unwrap(), "from-good");
    assert_eq!(back.state(), VmStateName::Running);
    assert_eq!(vm.state(), VmStateName::Running);
}

#[test]
fn kill_during_a_snapshot_leaves_no_snapshot_and_older_ones_intact() {
    let env = Env::new("snap-kill");
    let (vm, _) = dirtied(&env, "1G", 384);
    let older = env.runtime.join("older");
    env.ray_ok(&[
        "snapshot",
        "create",
        &vm.id,
        older.to_str().unwrap(),
        "--pause",
    ]);
    let target = env.runtime.join("interrupted");
    let mut child = std::process::Command::new(ray_e2e::ray_bin())
        .args([
            "snapshot",
            "create",
            &vm.id,
            target.to_str().unwrap(),
            "--pause",
        ])
        .env("RAY_RUNTIME_DIR", &env.runtime)
        .spawn()
        .unwrap();
    // Kill the VMM once the snapshot is being written (its temporary directory exists).
    let tmp = env.runtime.join(".tmp-interrupted");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tmp.exists() {
        assert!(Instant::now() < deadline, "the snapshot never started");
        std::thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: kill(2) of the VMM this test started.
    unsafe {
        libc::kill(vm.pid as libc::pid_t, libc::SIGKILL);
    }
    let _ = child.wait();
    assert!(
        !target.exists(),
        "a killed snapshot must not appear under its name"
    );
    let status = env.ray(&["snapshot", "status", target.to_str().unwrap()]);
    assert!(!status.status.success());
    // The older snapshot restores and runs.
    let back = restore(&env, older.to_str().unwrap(), "after-crash");
    assert_eq!(back.state(), VmStateName::Running);
}
