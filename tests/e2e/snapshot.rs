//! Full snapshots: take, restore into a new VMM, refuse damaged files, survive a crash.
use std::time::{Duration, Instant};

use ray_api::vmm::VmStateName;
use ray_e2e::{Env, Vm};

const READY: Duration = Duration::from_secs(20);

/// Boots a guest, dirties `mib` MiB and returns (vm, region start).
fn dirtied(env: &Env, memory: &str, mib: u64) -> (Vm, u64) {
    let mut vm = env.boot(&["--memory", memory, "--vcpus", "2"]);
    vm.expect_line("ready", READY);
    let on = vm.command(&format!("dirty {mib} 4000"), "dirty on");
    let region = ray_e2e::region_of(&on);
    // Let the workload touch the whole region at least once.
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm.info().heartbeat.unwrap().dirty_bytes < mib << 20 {
        assert!(Instant::now() < deadline, "dirty did not cover {mib} MiB");
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.command("dirty stop", "dirty off");
    (vm, region)
}

#[test]
fn restored_guest_continues_with_identical_memory() {
    let env = Env::new("snap-restore");
    let (mut vm, region) = dirtied(&env, "256M", 16);
    // The region no longer changes once `dirty` stopped; sum it, then pause.
    let before = vm.sum(region, 16 << 20);
    env.ray_ok(&["vm", "pause", &vm.id]);
    let hb_before = vm.info().heartbeat.unwrap();
    let path = env.runtime.join("snap-a");
    let path = path.to_str().unwrap();
    let out = env.ray_ok(&["snapshot", "create", &vm.id, path, "--json"]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!("snapshot: {info}");
    // Only what the guest touched is on disk: 16 MiB dirtied, 256 MiB of RAM.
    let on_disk = info["disk_bytes"].as_u64().unwrap();
    assert!((16 << 20..32 << 20).contains(&on_disk), "{info}");
    env.ray_ok(&["vm", "stop", &vm.id, "--timeout-ms", "0"]);

    let mut back = env.restore(path, "restored");
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
        back.sum(region, 16 << 20),
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
    // Damaged copies, each in a store of its own under the same id.
    let copy = |name: &str| {
        let dir = env.runtime.join(name).join("good");
        std::fs::create_dir_all(&dir).unwrap();
        for f in std::fs::read_dir(&good).unwrap() {
            let f = f.unwrap().file_name();
            std::fs::copy(good.join(&f), dir.join(&f)).unwrap();
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

    // Memory is verified lazily, block by block before anyone reads it: the restore may
    // start the guest, but the damaged block never reaches it; the VMM stops the VM in
    // state `error`, naming the file and the guest addresses.
    let memory = copy("bad-memory");
    flip(memory.join("memory.raw"), region + 12345);
    let out = env.ray(&[
        "snapshot",
        "restore",
        memory.to_str().unwrap(),
        "--detach",
        "--id",
        "bad-memory",
    ]);
    let mut err = String::from_utf8_lossy(&out.stderr).into_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while out.status.success() && std::time::Instant::now() < deadline {
        let list = json(&env.ray_ok(&["vm", "list", "-o", "json"]));
        let row = list
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == "bad-memory")
            .cloned()
            .unwrap();
        if row["state"] == "error" {
            err = row["reason"].as_str().unwrap_or_default().to_string();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        err.contains("memory.raw fails its checksum in guest memory"),
        "{err}"
    );

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

    // A snapshot from another host, or of another format version, is refused.
    let edit = |name: &str, from: &str, to: &str| {
        let dir = copy(name);
        let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
        assert!(text.contains(from), "{text}");
        std::fs::write(dir.join("manifest.json"), text.replacen(from, to, 1)).unwrap();
        let out = env.ray(&["snapshot", "restore", dir.to_str().unwrap(), "--detach"]);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = edit("other-cpu", "\"cpu\": \"", "\"cpu\": \"other-");
    assert!(err.contains("was taken on an incompatible host"), "{err}");
    let err = edit(
        "other-version",
        "\"format_version\": 1",
        "\"format_version\": 9",
    );
    assert!(err.contains("format version 9"), "{err}");

    // The original still restores, and the source VM was never disturbed.
    let back = env.restore(good.to_str().unwrap(), "from-good");
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
    let back = env.restore(older.to_str().unwrap(), "after-crash");
    assert_eq!(back.state(), VmStateName::Running);
}

/// Lets the running `dirty` workload rewrite its whole region once more.
fn rewrite_region(vm: &mut Vm, mib: u64) {
    let start = vm.info().heartbeat.unwrap().dirty_bytes;
    vm.command(&format!("dirty {mib} 4000"), "dirty on");
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm.info().heartbeat.unwrap().dirty_bytes < start + (mib << 20) {
        assert!(Instant::now() < deadline, "dirty did not rewrite {mib} MiB");
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.command("dirty stop", "dirty off");
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn incremental_chain_of_three_restores_each_checkpoint_and_merges() {
    let env = Env::new("snap-chain");
    let store = env.runtime.join("store");
    let at = |name: &str| store.join(name).to_str().unwrap().to_string();
    let (mut vm, region) = dirtied(&env, "256M", 8);
    let mut sums = vec![vm.sum(region, 8 << 20)];
    let full = json(&env.ray_ok(&["snapshot", "create", &vm.id, &at("c0"), "--pause", "--json"]));
    assert_eq!(full["kind"], "full", "{full}");
    for k in 1..=3 {
        rewrite_region(&mut vm, 8);
        sums.push(vm.sum(region, 8 << 20));
        assert_ne!(sums[k], sums[k - 1], "the workload must change memory");
        let path = at(&format!("c{k}"));
        let mut args = vec![
            "snapshot",
            "create",
            &vm.id,
            &path,
            "--pause",
            "--incremental",
            "--json",
        ];
        // The middle link is zstd-compressed: chains mix both.
        if k == 2 {
            args.push("--compress");
        }
        let info = json(&env.ray_ok(&args));
        assert_eq!(info["kind"], "incremental", "{info}");
        assert_eq!(info["compressed"], k == 2, "{info}");
        assert_eq!(info["parent"], format!("c{}", k - 1), "{info}");
        // The 8 MiB rewritten plus the few pages the guest kernel itself wrote.
        let stored = info["stored_pages"].as_u64().unwrap();
        assert!((2048..2048 + 256).contains(&stored), "{info}");
        let disk = info["disk_bytes"].as_u64().unwrap();
        assert!(disk < (8 << 20) * 11 / 10 + (256 << 10), "{info}");
        if k != 2 {
            assert!(disk >= 8 << 20, "{info}");
        }
    }
    assert_eq!(vm.state(), VmStateName::Running);
    env.ray_ok(&["vm", "stop", &vm.id, "--timeout-ms", "0"]);

    let list = json(&env.ray_ok(&["snapshot", "list", store.to_str().unwrap(), "--json"]));
    let entries: Vec<(String, u64)> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_string(),
                e["depth"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [("c0", 0), ("c1", 1), ("c2", 2), ("c3", 3)].map(|(i, d)| (i.to_string(), d)),
        "{list}"
    );

    // Every checkpoint restores to exactly its memory, and keeps running.
    for (k, expected) in sums.iter().enumerate() {
        let id = format!("back-{k}");
        let mut back = env.restore(&at(&format!("c{k}")), &id);
        assert_eq!(&back.sum(region, 8 << 20), expected, "c{k}");
        assert_eq!(back.command("echo alive", "alive"), "alive");
        if k == 3 {
            // A restored VM continues the chain: its next snapshot is incremental on c3.
            let info = json(&env.ray_ok(&[
                "snapshot",
                "create",
                &id,
                &at("c4"),
                "--pause",
                "--incremental",
                "--json",
            ]));
            assert_eq!(info["parent"], "c3", "{info}");
            // Not all of memory: what the restored guest wrote, plus (under PVM's shadow
            // paging) the pages `sum` read whose guest PTEs are dirty: KVM maps those
            // writable on the first read and logs them.
            assert!(
                info["stored_pages"].as_u64().unwrap() < 2048 + 256,
                "{info}"
            );
        }
        env.ray_ok(&["vm", "stop", &id, "--timeout-ms", "0"]);
    }
    let mut c4 = env.restore(&at("c4"), "back-4");
    assert_eq!(c4.sum(region, 8 << 20), sums[3], "c4");
    env.ray_ok(&["vm", "stop", "back-4", "--timeout-ms", "0"]);

    // A snapshot others depend on cannot be deleted.
    let out = env.ray(&["snapshot", "delete", &at("c1")]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("depend on it") && err.contains("c2"), "{err}");

    // Merge flattens the chain into a full snapshot that restores on its own.
    let merged = json(&env.ray_ok(&["snapshot", "merge", &at("c3"), "--into", "flat", "--json"]));
    assert_eq!(merged["kind"], "full", "{merged}");
    for k in [4, 3, 2, 1] {
        env.ray_ok(&["snapshot", "delete", &at(&format!("c{k}"))]);
    }
    let mut flat = env.restore(&at("flat"), "from-flat");
    assert_eq!(flat.sum(region, 8 << 20), sums[3]);
    let list = json(&env.ray_ok(&["snapshot", "list", store.to_str().unwrap(), "--json"]));
    let ids: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["c0", "flat"], "{list}");
}

#[test]
fn checkpoints_chain_themselves_and_the_api_lists_them() {
    let env = Env::new("snap-checkpoint");
    let mut vm = env.boot(&[]);
    vm.expect_line("ready", READY);
    // In the VM's directory: this test lists and deletes snapshots through the VMM's API,
    // and a jailed VMM sees no store elsewhere (`ray` hands it one only to write a
    // snapshot; `ray snapshot list/delete` read such stores on the host).
    let store = vm.dir.join("checkpoints");
    let store_s = store.to_str().unwrap();
    let first = json(&env.ray_ok(&["vm", "checkpoint", &vm.id, "--store", store_s, "--json"]));
    assert_eq!(first["kind"], "full", "{first}");
    vm.command("echo between", "between");
    let second = json(&env.ray_ok(&["vm", "checkpoint", &vm.id, "--store", store_s, "--json"]));
    assert_eq!(second["kind"], "incremental", "{second}");
    assert_eq!(second["parent"], first["id"], "{second}");
    // The per-VM limit is enforced by the store, naming it.
    let out = env.ray(&[
        "vm",
        "checkpoint",
        &vm.id,
        "--store",
        store_s,
        "--max-snapshots",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the limit is 2"), "{err}");
    assert_eq!(vm.state(), VmStateName::Running);
    // The VM knows its latest snapshot, and its API lists that store by default.
    let info = vm.info();
    assert_eq!(
        info.last_snapshot.as_deref(),
        second["path"].as_str(),
        "{info:?}"
    );
    let client = ray::client::VmmClient::new(&vm.dir.join("api.sock"));
    let list: ray_api::vmm::SnapshotList = client.call("GET", "/vm/snapshots", None).unwrap();
    assert_eq!(list.snapshots.len(), 2, "{list:?}");
    assert_eq!(list.snapshots[1].depth, 1);
    // Deleting the parent through the API is refused while the child exists.
    let body = serde_json::to_vec(&ray_api::vmm::SnapshotDelete {
        path: store
            .join(first["id"].as_str().unwrap())
            .display()
            .to_string(),
    })
    .unwrap();
    let err = client
        .call::<serde_json::Value>("PUT", "/vm/snapshot/delete", Some(body))
        .unwrap_err()
        .to_string();
    assert!(err.contains("depend on it"), "{err}");
    // An incremental snapshot into another store is refused, naming where it must go.
    let elsewhere = env.runtime.join("other").join("x");
    let out = env.ray(&[
        "snapshot",
        "create",
        &vm.id,
        elsewhere.to_str().unwrap(),
        "--pause",
        "--incremental",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("goes beside its parent"), "{err}");
    assert_eq!(vm.state(), VmStateName::Running);
}
