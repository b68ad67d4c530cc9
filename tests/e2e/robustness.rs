//! Robustness (issue 13): bad input is refused with a clear error naming what was wrong,
//! before any side effect; no VM or data is lost; the VMM keeps running. Each test is the
//! regression test of one defect.
use std::io::{Read, Write};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use ray_api::vmm::{MigrationStatus, VmInfo, VmStateName};
use ray_e2e::{Env, Vm};

const READY: Duration = Duration::from_secs(20);

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that `out` failed with exit code `code` and returns its stderr.
fn failed(out: &Output, code: i32, what: &str) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: {}{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

fn migration(vm: &Vm) -> MigrationStatus {
    vm.client
        .call("GET", "/vm/migration", None)
        .expect("GET /vm/migration")
}

/// Boots rayvisor's guest with `--id id` and waits for its shell.
fn boot(env: &Env, id: &str, extra: &[&str]) -> Vm {
    let mut args = vec!["--id", id];
    args.extend_from_slice(extra);
    let mut vm = env.boot(&args);
    vm.expect_line("ready", READY);
    vm
}

/// Ids of the VMs `ray vm list` shows.
fn listed(env: &Env) -> Vec<String> {
    let list: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["vm", "list", "--json"])).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// Pids of the live VMM processes of VM directory `dir` (from /proc).
fn vmm_pids(dir: &Path) -> Vec<u32> {
    let dir = dir.display().to_string();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_vmm = args.get(1).is_some_and(|a| a == "vmm")
            && args.windows(2).any(|w| w[0] == "--dir" && w[1] == dir);
        if is_vmm && ray::runtime::pid_alive(pid) {
            pids.push(pid);
        }
    }
    // A jail's keeper (`ray vmm --jail`) has the VMM's command line too: it is the parent
    // of the VMM, not a second one.
    let parent = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
    };
    let keepers: Vec<u32> = pids.iter().filter_map(|&p| parent(p)).collect();
    pids.retain(|p| !keepers.contains(p));
    pids
}

/// Issue 13.1: four concurrent `ray vm run --id dup` started 3-4 VMMs, and only the last
/// owned `api.sock`. Exactly one may start; the others are refused, naming the id and the
/// live VMM's pid. A reused id starts with fresh logs (the old ones become `*.1`).
#[test]
fn concurrent_runs_of_one_id_start_exactly_one_vmm() {
    let env = Env::new("rb-dup");
    let outs: Vec<Output> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| env.ray(&["vm", "run", "--detach", "--json", "--id", "dup"])))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let winners: Vec<&Output> = outs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one run may succeed: {:?}",
        outs.iter().map(stderr).collect::<Vec<_>>()
    );
    let info: VmInfo = serde_json::from_slice(&winners[0].stdout).unwrap();
    for o in outs.iter().filter(|o| !o.status.success()) {
        let err = failed(o, 4, "a refused duplicate");
        assert!(
            err.contains("VM 'dup' is already running")
                && err.contains(&format!("pid {}", info.pid)),
            "{err}"
        );
    }
    let mut vm = env.attach("dup", info.pid);
    vm.expect_line("ready", READY);
    assert_eq!(vmm_pids(&vm.dir), vec![info.pid], "one VMM, the winner");
    assert_eq!(vm.info().pid, info.pid, "api.sock is the winner's");
    // Another run while it lives is refused too, and changes nothing.
    let again = env.ray(&["vm", "run", "--detach", "--id", "dup"]);
    let err = failed(&again, 4, "a run while the VM lives");
    assert!(err.contains(&format!("pid {}", info.pid)), "{err}");
    assert_eq!(vm.command("echo first-life", "first-life"), "first-life");
    env.ray_ok(&["vm", "stop", "dup", "--timeout-ms", "0"]);
    vm.wait_exit(Duration::from_secs(5));

    // The id again, after the old VM ended: its own logs and audit trail, the old ones
    // kept beside them once.
    let mut second = boot(&env, "dup", &[]);
    assert_ne!(second.pid, info.pid);
    let serial = std::fs::read_to_string(second.dir.join("serial.log")).unwrap();
    assert!(!serial.contains("first-life"), "serial.log was appended to");
    let old = std::fs::read_to_string(second.dir.join("serial.log.1")).unwrap();
    assert!(old.contains("first-life"), "{old}");
    let events = env.ray_ok(&["vm", "events", "dup", "--json"]);
    let events: Vec<serde_json::Value> = serde_json::from_str(&events).unwrap();
    assert_eq!(events.len(), 2, "created and started only: {events:?}");
    assert!(std::fs::read_to_string(second.dir.join("events.jsonl.1"))
        .unwrap()
        .contains("api:stop"));
    assert_eq!(
        second.command("echo second-life", "second-life"),
        "second-life"
    );
}

/// Issue 13.2: a key file that is no key file (/dev/zero made the VMM read until OOM; a
/// FIFO blocked the VMM thread) is refused at once, naming it, by `migrate start` and
/// `migrate receive`; the VM keeps running.
#[test]
fn key_files_that_are_not_regular_files_are_refused_and_the_vm_runs_on() {
    let env = Env::new("rb-keys");
    let vm = boot(&env, "src", &[]);
    let fifo = env.runtime.join("key.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path, which outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let dir = env.runtime.join("key-dir");
    std::fs::create_dir(&dir).unwrap();
    let to = format!("unix:{}", env.runtime.join("nowhere.sock").display());
    for (n, (path, kind)) in [
        (Path::new("/dev/zero"), "character device"),
        (fifo.as_path(), "FIFO"),
        (dir.as_path(), "directory"),
    ]
    .into_iter()
    .enumerate()
    {
        let path = path.to_str().unwrap();
        let t = Instant::now();
        let out = env.ray(&["migrate", "start", "src", "--to", &to, "--key-file", path]);
        let err = failed(&out, 6, "migrate start with a bad key file");
        assert!(
            err.contains(&format!(
                "the key file {path} is a {kind}, not a regular file"
            )),
            "{err}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
        let id = format!("dst-{n}");
        let listen = format!(
            "unix:{}",
            env.runtime.join(format!("in-{n}.sock")).display()
        );
        let out = env.ray(&[
            "migrate",
            "receive",
            "--listen",
            &listen,
            "--key-file",
            path,
            "--id",
            &id,
        ]);
        let err = failed(&out, 6, "migrate receive with a bad key file");
        assert!(
            err.contains(&format!(
                "the key file {path} is a {kind}, not a regular file"
            )),
            "{err}"
        );
        assert!(!listed(&env).contains(&id), "a refused target leaves no VM");
        // The source VM is untouched: running, answering.
        let status = env.ray_ok(&["vm", "status", "src", "--json"]);
        let info: VmInfo = serde_json::from_str(&status).unwrap();
        assert_eq!(info.state, VmStateName::Running);
    }
    assert!(vm.process_alive());
    assert!(vm.info().heartbeat.is_some());
}

/// Issue 13.3: `snapshot create --pause --max-snapshots 0` answered 400 but left the VM
/// paused. It is refused before the pause; the VM runs on.
#[test]
fn a_refused_snapshot_leaves_the_vm_running() {
    let env = Env::new("rb-snap");
    let mut vm = boot(&env, "v", &[]);
    let path = env.runtime.join("store").join("s1");
    let out = env.ray(&[
        "snapshot",
        "create",
        "v",
        path.to_str().unwrap(),
        "--pause",
        "--max-snapshots",
        "0",
    ]);
    let err = failed(&out, 6, "max-snapshots 0");
    assert!(err.contains("max_snapshots is 0"), "{err}");
    assert_eq!(vm.state(), VmStateName::Running);
    assert!(!path.exists());
    let before = vm.info().heartbeat.unwrap().counter;
    vm.wait_for("the heartbeat to move", Duration::from_secs(5), |i| {
        i.heartbeat.as_ref().is_some_and(|h| h.counter > before)
    });
    assert_eq!(vm.command("echo still", "still"), "still");
}

/// Issue 13 (smaller): `GET /vm` was not answered while a snapshot was written (seconds
/// for GiBs). Status reads are answered during the write; other requests wait for it, in
/// order, and the snapshot is whole.
#[test]
fn status_reads_are_answered_while_a_snapshot_is_written() {
    let env = Env::new("rb-snapread");
    let mut vm = boot(&env, "v", &["--memory", "1G"]);
    // Enough guest data that writing it takes a while (a full snapshot writes every
    // non-zero page and syncs it).
    vm.command("dirty 384 100000", "dirty on");
    vm.wait_for("the guest to write 384 MiB", Duration::from_secs(30), |i| {
        i.heartbeat
            .as_ref()
            .is_some_and(|h| h.dirty_bytes >= 384 << 20)
    });
    vm.command("dirty stop", "dirty off");
    let path = env.runtime.join("store").join("big");
    let mut snapshot = std::process::Command::new(ray_e2e::ray_bin())
        .args([
            "snapshot",
            "create",
            "v",
            path.to_str().unwrap(),
            "--pause",
            "--json",
        ])
        .env("RAY_RUNTIME_DIR", &env.runtime)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the VM is paused for the snapshot, then read its status while the
    // snapshot is still being written.
    let mut answered_during = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while snapshot.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the snapshot did not finish");
        let info = vm.info();
        let events: serde_json::Value = vm.client.call("GET", "/vm/events", None).unwrap();
        if info.state == VmStateName::Paused && snapshot.try_wait().unwrap().is_none() {
            assert!(events.as_array().is_some_and(|e| !e.is_empty()), "{events}");
            answered_during += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(snapshot.wait().unwrap().success());
    let mut out = String::new();
    snapshot
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let written: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        answered_during > 0,
        "no status read was answered during a {} ms snapshot write",
        written["write_ms"]
    );
    assert_eq!(vm.state(), VmStateName::Running);
    env.ray_ok(&["snapshot", "verify", path.to_str().unwrap()]);
    assert_eq!(vm.command("echo after", "after"), "after");
}

/// Issue 13.4: `migrate receive --listen unix:PATH` deleted a regular file at PATH. It is
/// refused, naming PATH, and the file stays.
#[test]
fn a_file_at_the_listen_path_is_left_alone() {
    let env = Env::new("rb-listen");
    let key = env.key_file("key", "a pre-shared key of some length");
    let path = env.runtime.join("precious.txt");
    std::fs::write(&path, "do not delete").unwrap();
    let listen = format!("unix:{}", path.display());
    let out = env.ray(&[
        "migrate",
        "receive",
        "--listen",
        &listen,
        "--key-file",
        &key,
        "--id",
        "dst",
    ]);
    let err = failed(&out, 6, "listening on a regular file");
    assert!(
        err.contains(&format!(
            "cannot listen on {listen}: it is a regular file, not a socket"
        )),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "do not delete");
    assert!(!listed(&env).contains(&"dst".to_string()));
}

/// Issue 13.5: one stray TCP connection (an HTTP GET) to a waiting `migrate receive`
/// terminated the target, and the real source then found nobody. Connections that fail
/// before proving the key are dropped and logged; the real migration then succeeds.
/// Also 13.7 (the VM's configuration travels with the migration): this target is not told
/// the VM's vCPUs and memory; one that is, and differs, refuses naming both values.
#[test]
fn a_stray_connection_does_not_end_a_waiting_target() {
    let env = Env::new("rb-stray");
    let key = env.key_file("key", "a pre-shared key of some length");
    let wrong = env.key_file("wrong", "another key of some length");
    let mut src = boot(&env, "src", &["--vcpus", "2", "--memory", "256M"]);
    src.command("tick 20", "tick on 20");

    // A target started for another shape refuses the source, naming both values.
    let told = env.receive_on(
        "told",
        "127.0.0.1:0",
        &key,
        &["--vcpus", "1", "--memory", "256M"],
    );
    let addr = migration(&told).peer;
    let out = env.ray(&["migrate", "start", "src", "--to", &addr, "--key-file", &key]);
    let err = failed(&out, 1, "a migration to a target told another shape");
    assert!(
        err.contains(
            "vCPU count differs: the source's VM has 2 vCPUs, this target was started with 1"
        ),
        "{err}"
    );
    assert_eq!(src.state(), VmStateName::Running);
    told.wait_exit(Duration::from_secs(10));

    let dst = env.receive_on("dst", "127.0.0.1:0", &key, &[]);
    let addr = migration(&dst).peer;
    assert!(
        dst.info().config.is_none(),
        "the shape comes from the source"
    );
    // An HTTP request: answered with nothing, the connection closed.
    let mut http = std::net::TcpStream::connect(&addr).unwrap();
    http.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: target\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = http.read_to_end(&mut answer);
    // Garbage, then a source with the wrong key (which learns why it was refused).
    let mut junk = std::net::TcpStream::connect(&addr).unwrap();
    junk.write_all(&[0xde; 100]).unwrap();
    drop(junk);
    let out = env.ray(&[
        "migrate",
        "start",
        "src",
        "--to",
        &addr,
        "--key-file",
        &wrong,
    ]);
    let err = failed(&out, 1, "a migration with the wrong key");
    assert!(err.contains("pre-shared key"), "{err}");
    assert_eq!(src.state(), VmStateName::Running);
    // The target still waits, and logged what it dropped.
    assert!(dst.process_alive());
    assert_eq!(dst.state(), VmStateName::MigrationTarget);
    let log = std::fs::read_to_string(dst.dir.join("vmm.log")).unwrap();
    assert!(log.matches("dropped a connection").count() >= 3, "{log}");

    let out = env.ray_ok(&[
        "migrate",
        "start",
        "src",
        "--to",
        &addr,
        "--key-file",
        &key,
        "--recheck-memory",
        "--json",
    ]);
    let s: MigrationStatus = serde_json::from_str(&out).unwrap();
    assert!(s.state == "completed" && s.vm == "migrated", "{s:?}");
    src.wait_exit(Duration::from_secs(10));
    // 13.7: the recheck of the paused source's memory is priced into the downtime budget.
    let events = env.ray_ok(&["vm", "events", "src"]);
    assert!(
        events.contains("memory recheck of ~") && events.contains("counted in the downtime"),
        "{events}"
    );
    let mut dst = dst;
    let info = dst.wait_for(
        "the VM to run on the target",
        Duration::from_secs(10),
        |i| i.state == VmStateName::Running,
    );
    let config = info.config.expect("the source's configuration arrived");
    assert_eq!((config.vcpus, config.memory_bytes), (2, 256 << 20));
    dst.expect_line("tick ", Duration::from_secs(5));
    assert_eq!(dst.command("echo moved", "moved"), "moved");
}

/// Issue 13.6: `ray vm stop` of a source in its paused final copy exited 0 but left the VM
/// in `error` (`rollback_failed`) with its VMM running. The stop cancels the migration,
/// waits for its rollback, then stops the VM cleanly.
#[test]
fn stop_during_the_paused_final_copy_cancels_the_migration_then_stops() {
    let env = Env::new("rb-stopmig");
    let key = env.key_file("key", "a pre-shared key of some length");
    // The source holds the migration right after pausing the guest (a test hook).
    let out = env.ray_with(
        &[
            "vm", "run", "--detach", "--json", "--id", "src", "--memory", "128M",
        ],
        &[("RAY_FAULT", "source-hold-paused")],
    );
    let info: VmInfo = serde_json::from_str(&ray_e2e::succeeded(out, "vm run")).unwrap();
    let mut src = env.attach("src", info.pid);
    src.expect_line("ready", READY);
    let listen = format!("unix:{}", env.runtime.join("in.sock").display());
    let dst = env.receive_on("dst", &listen, &key, &[]);
    env.ray_ok(&[
        "migrate",
        "start",
        "src",
        "--to",
        &listen,
        "--key-file",
        &key,
        "--detach",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = migration(&src);
        if s.paused_at_unix_us.is_some() && s.vm == "migrating" {
            break;
        }
        assert!(
            s.vm == "migrating",
            "the migration ended before its final copy: {s:?}"
        );
        assert!(Instant::now() < deadline, "the source never paused: {s:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = env.ray_ok(&["vm", "stop", "src", "--json"]);
    let stopped: VmInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(stopped.state, VmStateName::Terminated, "{out}");
    src.wait_exit(Duration::from_secs(10));
    let events: Vec<serde_json::Value> =
        serde_json::from_str(&env.ray_ok(&["vm", "events", "src", "--json"])).unwrap();
    assert!(
        events.iter().all(|e| e["to"] != "error"),
        "the VM went through error: {events:?}"
    );
    assert!(
        events.iter().any(|e| e["cause"]
            .as_str()
            .unwrap()
            .starts_with("migrate:rolled back")),
        "{events:?}"
    );
    let s: MigrationStatus =
        serde_json::from_str(&env.ray_ok(&["migrate", "status", "src", "--json"])).unwrap();
    assert_eq!(s.state, "failed", "{s:?}");
    assert!(
        s.error
            .as_deref()
            .unwrap()
            .contains("the migration was cancelled"),
        "{s:?}"
    );
    // The target learnt of the abort and discarded its copy.
    dst.wait_exit(Duration::from_secs(30));
}

/// Issue 13.7: a failed `vm run` (bad configuration) left a `dead` row and exited 1; an id
/// such as `-x` got through. Both are invalid requests (exit 6) that leave nothing behind.
#[test]
fn invalid_runs_exit_6_and_leave_no_vm_behind() {
    let env = Env::new("rb-invalid");
    for (args, says) in [
        (
            vec!["--id", "bad", "--vcpus", "0"],
            "vcpus must be between 1 and",
        ),
        (
            vec!["--id", "bad", "--kernel", "/nonexistent/vmlinux"],
            "kernel file /nonexistent/vmlinux does not exist",
        ),
        (
            vec!["--id=-x"],
            "VM id '-x' is not valid: it starts with '-'",
        ),
        (
            vec!["--id", "a/b"],
            "VM id 'a/b' is not valid: it contains '/'",
        ),
    ] {
        let mut all = vec!["vm", "run", "--detach"];
        all.extend_from_slice(&args);
        let out = env.ray(&all);
        let err = failed(&out, 6, &format!("vm run {args:?}"));
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(listed(&env).is_empty(), "{:?}", listed(&env));
    assert!(!ray::runtime::vm_dir(&env.runtime, "bad").exists());
    // The same for the other commands that start a VMM.
    let key = env.key_file("key", "a pre-shared key of some length");
    let out = env.ray(&[
        "migrate",
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--key-file",
        &key,
        "--id=-x",
    ]);
    failed(&out, 6, "migrate receive --id=-x");
    // Sizes as QEMU takes them: decimal, in whole pages.
    let vm = boot(&env, "half", &["--memory", "96.5M"]);
    assert_eq!(vm.info().config.unwrap().memory_bytes, 193 << 19);
    let out = env.ray(&["vm", "run", "--detach", "--memory", "96.3M"]);
    let err = failed(&out, 2, "a memory size that is no whole number of bytes");
    assert!(
        err.contains("'96.3M' is not a whole number of bytes"),
        "{err}"
    );
    let out = env.ray(&["vm", "run", "--detach", "--memory", "100.5K"]);
    let err = failed(&out, 2, "a memory size that is no whole number of pages");
    assert!(
        err.contains("not a whole number of 4096-byte pages"),
        "{err}"
    );
    assert_eq!(listed(&env), ["half"]);
}

/// Issue 13.7: `snapshot delete` removed a suspended VM's suspend image (the only copy of
/// the VM). It is refused; the VM resumes with its memory. Stopping a suspended VM takes
/// its image along.
#[test]
fn a_suspend_image_is_not_deleted_while_its_vm_needs_it() {
    let env = Env::new("rb-suspend");
    let mut vm = boot(&env, "s", &[]);
    // A region the guest wrote once and leaves alone from then on.
    let on = vm.command("dirty 4 4000", "dirty on");
    let region = ray_e2e::region_of(&on);
    vm.wait_for("dirty to cover its region", Duration::from_secs(20), |i| {
        i.heartbeat
            .as_ref()
            .is_some_and(|h| h.dirty_bytes >= 4 << 20)
    });
    vm.command("dirty stop", "dirty off");
    let sum = vm.sum(region, 4 << 20);
    env.ray_ok(&["vm", "suspend", "s"]);
    let image = vm.dir.join("suspended");
    let out = env.ray(&["snapshot", "delete", image.to_str().unwrap()]);
    let err = failed(&out, 4, "deleting a suspend image");
    assert!(err.contains("it is the suspend image of VM 's'"), "{err}");
    assert!(image.join("manifest.json").is_file());
    env.ray_ok(&["vm", "resume", "s"]);
    assert_eq!(
        vm.sum(region, 4 << 20),
        sum,
        "memory changed across suspend/resume"
    );
    env.ray_ok(&["vm", "suspend", "s"]);
    env.ray_ok(&["vm", "stop", "s"]);
    vm.wait_exit(Duration::from_secs(5));
    assert!(!image.exists(), "the image of a stopped VM is left behind");
}
