//! The VMM's seccomp filters (crates/seccomp) and API access rules.
//!
//! Every other e2e test runs with the filters on (their default, `kill`), which proves the
//! normal paths need nothing they forbid. Here each thread kind is made to call `mount`
//! (the debug build's `RAY_SECCOMP_TRIP` hook): the filter must stop the VMM, and the
//! record it leaves must name the thread and its filter.
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use ray_e2e::Env;

/// `mount` on x86_64: what the hook calls.
const MOUNT: u32 = 165;

/// What `ray vm run` needs for the thread kind to exist, and the name its thread has.
const KINDS: &[(&str, &[&str], &str)] = &[
    ("main", &[], "main"),
    ("vcpu", &[], "vcpu"),
    ("api", &[], "api"),
    ("device-io", &["--vsock", "cid=7"], "virtio"),
    ("blk-worker", &["--disk", "DISK"], "blk-io"),
    ("display", &["--gpu", "emulated"], "vnc-"),
    ("harvester", &["--numa-attribution", "ring"], "dirty-ring"),
];

/// Waits until the VMM of `dir` is gone and returns the record its filter left.
fn killed_record(dir: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pid = std::fs::read_to_string(dir.join("vmm.pid")).unwrap_or_default();
        let gone = pid
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| !ray::runtime::pid_alive(pid));
        if gone {
            let text = std::fs::read_to_string(dir.join("seccomp.json"))
                .unwrap_or_else(|e| panic!("{}: no seccomp.json: {e}", dir.display()));
            return serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        }
        assert!(
            Instant::now() < deadline,
            "the VMM of {} is still running",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `text` reports thread `thread…` (a name prefix: which of several workers trips
/// first varies) of kind `kind` calling `mount`.
fn reports(text: &str, kind: &str, thread: &str) -> bool {
    let head = format!("the VMM was stopped by its seccomp filter: thread {thread}");
    let tail = format!(" (filter {kind}) made the forbidden system call {MOUNT}");
    text.match_indices(&head).any(|(at, _)| {
        text[at + head.len()..]
            .split_once(&tail)
            .is_some_and(|(rest, _)| rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    })
}

/// The starting command (`ray vm run`, `ray migrate receive`) either saw the VM start (the
/// thread kind starts later) or says why the VMM ended at start.
fn check_reported(env: &Env, start: Output, id: &str, kind: &str, thread: &str) {
    if !start.status.success() {
        let err = String::from_utf8_lossy(&start.stderr);
        assert!(
            err.contains("(exit status: 159)") && reports(&err, kind, thread),
            "{kind}: {err}"
        );
        return;
    }
    let dir = env.runtime.join("vms").join(id);
    let record = killed_record(&dir);
    let reason = record["reason"].as_str().unwrap_or_default().to_string();
    assert!(reports(&reason, kind, thread), "{kind}: {reason}");
    assert_eq!(record["state"], "error", "{kind}");
    assert_eq!(record["id"], id, "{kind}");
    // The client reports it as the VM's end.
    let out = env.ray(&["vm", "status", id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{kind}: {err}");
    assert!(
        err.contains("has ended (error: ") && reports(&err, kind, thread),
        "{kind}: {err}"
    );
    // The VMM's log says it too.
    let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
    assert!(
        reports(&log, kind, thread),
        "{kind}: vmm.log lacks it:\n{log}"
    );
}

#[test]
fn a_forbidden_call_from_each_thread_kind_stops_the_vmm_and_says_which() {
    for &(kind, extra, thread) in KINDS {
        let env = Env::new(&format!("seccomp-{kind}"));
        let disk = env.runtime.join("disk.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let disk = disk.display().to_string();
        let mut args = vec!["vm", "run", "--detach", "--json", "--id", "victim"];
        args.extend(
            extra
                .iter()
                .map(|&a| if a == "DISK" { disk.as_str() } else { a }),
        );
        let out = env.ray_with(&args, &[("RAY_SECCOMP_TRIP", kind)]);
        check_reported(&env, out, "victim", kind, thread);
    }
}

#[test]
fn a_forbidden_call_from_the_migration_thread_stops_the_target() {
    let env = Env::new("seccomp-migration");
    let key = env.key_file("key", "a secret of sufficient length");
    let listen = format!("unix:{}", env.runtime.join("in.sock").display());
    let out = env.ray_with(
        &[
            "migrate",
            "receive",
            "--listen",
            &listen,
            "--key-file",
            &key,
            "--id",
            "victim",
            "--json",
        ],
        &[("RAY_SECCOMP_TRIP", "migration")],
    );
    check_reported(&env, out, "victim", "migration", "migration-in");
}

/// With the filters off, or logging only, the same hook's call fails harmlessly and the
/// VM runs on: the stops above are the filter's doing.
#[test]
fn without_filters_or_in_log_mode_the_hook_is_harmless() {
    for mode in ["off", "log"] {
        let env = Env::new(&format!("seccomp-{mode}"));
        let out = env.ray_with(
            &["vm", "run", "--detach", "--json", "--seccomp", mode],
            &[("RAY_SECCOMP_TRIP", "vcpu")],
        );
        let info: ray_api::vmm::VmInfo =
            serde_json::from_str(&ray_e2e::succeeded(out, "vm run")).unwrap();
        let mut vm = env.attach(&info.id, info.pid);
        vm.expect_line("ready", Duration::from_secs(20));
        assert_eq!(vm.command("echo alive", "alive"), "alive", "{mode}");
        let record = std::fs::read_to_string(vm.dir.join("seccomp.json")).unwrap_or_default();
        assert!(record.is_empty(), "{mode}: {record}");
    }
}

/// Every thread of a running VMM is filtered (and has no_new_privs); the VMM thread has
/// one filter, and each thread of a kind two: the VMM thread's and its own.
#[test]
fn every_vmm_thread_runs_filtered_with_its_own_filter() {
    let env = Env::new("seccomp-threads");
    let disk = env.runtime.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let disk = disk.display().to_string();
    let mut vm = env.boot(&["--vsock", "cid=8", "--disk", &disk, "--gpu", "emulated"]);
    vm.expect_line("ready", Duration::from_secs(20));
    let mut seen = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", vm.pid)).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let comm = comm.trim().to_string();
        assert_eq!(field("Seccomp:"), "2", "{comm} is not filtered");
        assert_eq!(field("NoNewPrivs:"), "1", "{comm}");
        let own = ["vcpu", "api", "virtio", "blk-io", "vnc-"]
            .iter()
            .any(|p| comm.starts_with(p));
        let filters = field("Seccomp_filters:");
        if own {
            assert_eq!(filters, "2", "{comm}");
        }
        if task.ends_with(vm.pid.to_string()) {
            assert_eq!(filters, "1", "the VMM thread");
        }
        seen.push(comm);
    }
    for kind in ["vcpu0", "api", "virtio-vsock", "blk-io0", "vnc-0"] {
        assert!(
            seen.iter().any(|c| c == kind),
            "no {kind} thread in {seen:?}"
        );
    }
}

/// A bad mode is refused before any VMM starts, from the flag or the environment.
#[test]
fn a_bad_seccomp_mode_is_refused_naming_it() {
    let env = Env::new("seccomp-bad");
    for (args, vars) in [
        (&["vm", "run", "--seccomp", "strict"][..], &[][..]),
        (&["vm", "run"][..], &[("RAY_SECCOMP", "strict")][..]),
    ] {
        let out = env.ray_with(args, vars);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("'strict' is not a seccomp mode: use off, log or kill"),
            "{err}"
        );
    }
    assert!(!env.runtime.join("vms").exists());
}

/// The sockets that reach a VM (its API, its vsock host side) are its user's only.
#[test]
fn the_vms_sockets_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("sockets");
    let mut vm = env.boot(&["--vsock", "cid=9"]);
    vm.expect_line("ready", Duration::from_secs(20));
    for name in ["api.sock", "vsock.sock"] {
        let mode = std::fs::metadata(vm.dir.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name} has mode {mode:o}");
    }
}
