//! The VMM's seccomp filters (crates/seccomp), its jail (`ray vm run --jail`) and API
//! access rules.
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

/// Each kind's forbidden call ends its own VMM and nothing else: a bystander VM on the
/// same host runs on through all of them.
#[test]
fn a_forbidden_call_from_each_thread_kind_stops_the_vmm_and_says_which() {
    let env = Env::new("seccomp-kinds");
    let mut bystander = env.boot(&["--memory", "64M"]);
    bystander.expect_line("ready", Duration::from_secs(20));
    for &(kind, extra, thread) in KINDS {
        let disk = env.runtime.join(format!("disk-{kind}.img"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let disk = disk.display().to_string();
        let id = format!("victim-{kind}");
        let mut args = vec!["vm", "run", "--detach", "--json", "--id", &id];
        args.extend(
            extra
                .iter()
                .map(|&a| if a == "DISK" { disk.as_str() } else { a }),
        );
        let out = env.ray_with(&args, &[("RAY_SECCOMP_TRIP", kind)]);
        check_reported(&env, out, &id, kind, thread);
        assert_eq!(
            bystander.command("echo alive", "alive"),
            "alive",
            "the bystander after {kind}"
        );
    }
    let listed = env.ray_ok(&["vm", "list"]);
    assert!(listed.contains(&bystander.id), "{listed}");
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

/// The uids the jail tests give their VMs.
const JAIL_UIDS: (u32, u32) = (470_000, 470_999);

/// `--jail --jail-uids ...` followed by `extra`.
fn jailed<'a>(uids: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--jail", "--jail-uids", uids];
    args.extend_from_slice(extra);
    args
}

/// Every file and directory under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all.extend(walk(&p));
        }
        all.push(p);
    }
    all
}

/// An extended attribute of `path`, if it has it.
fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 1024];
    // SAFETY: NUL-terminated strings and a buffer of its length, alive across the call.
    let got = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (got >= 0).then(|| buf[..got as usize].to_vec())
}

/// A field of /proc/PID/status.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// The VM's cgroup directories as /proc/PID/cgroup names them, with its memory limit in
/// bytes and its CPU quota and period (v2: memory.max, cpu.max; v1 hosts:
/// memory.limit_in_bytes, cpu.cfs_quota_us and cpu.cfs_period_us).
fn cgroup_of(pid: u32, id: &str) -> (Vec<std::path::PathBuf>, u64, u64, u64) {
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // (mount point, fstype, super options) of each cgroup mount.
    let cg_mounts: Vec<(String, String, String)> = mounts
        .lines()
        .filter_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            let mut t = tail.split(' ');
            let fstype = t.next()?.to_string();
            let opts = t.nth(1).unwrap_or("").to_string();
            fstype
                .starts_with("cgroup")
                .then(|| (head.split(' ').nth(4).unwrap().to_string(), fstype, opts))
        })
        .collect();
    let dir_for = |controller: &str| -> Option<std::path::PathBuf> {
        groups.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, list, path) = (f.next()?, f.next()?, f.next()?);
            let (mp, _, _) = cg_mounts.iter().find(|(_, t, o)| match list {
                "" => t == "cgroup2",
                _ => t == "cgroup" && o.split(',').any(|x| x == controller),
            })?;
            let in_list = list.is_empty() || list.split(',').any(|x| x == controller);
            let dir = Path::new(mp).join(path.trim_start_matches('/'));
            // `rayvisor/<id>.<hash of the VM's directory>`.
            let group = path.rsplit_once("rayvisor/").map(|(_, g)| g);
            let ours =
                group.is_some_and(|g| g.strip_prefix(id).is_some_and(|h| h.starts_with('.')));
            (in_list && ours).then_some(dir)
        })
    };
    let read = |p: std::path::PathBuf| std::fs::read_to_string(&p).unwrap().trim().to_string();
    let (memory, cpu) = (
        dir_for("memory").expect(&groups),
        dir_for("cpu").expect(&groups),
    );
    if memory.join("memory.max").exists() {
        let cpu_max = read(cpu.join("cpu.max"));
        let (q, p) = cpu_max.split_once(' ').unwrap();
        let limit = read(memory.join("memory.max")).parse().unwrap();
        (vec![memory], limit, q.parse().unwrap(), p.parse().unwrap())
    } else {
        let limit = read(memory.join("memory.limit_in_bytes")).parse().unwrap();
        let q = read(cpu.join("cpu.cfs_quota_us")).parse().unwrap();
        let p = read(cpu.join("cpu.cfs_period_us")).parse().unwrap();
        (vec![memory, cpu], limit, q, p)
    }
}

/// Every path in the jail's root (seen through /proc/PID/root), not descending into
/// `leaves` (its mounts), relative to the root.
fn jail_tree(pid: u32, leaves: &[String]) -> Vec<String> {
    let root = format!("/proc/{pid}/root");
    let mut out = Vec::new();
    let mut todo = vec![std::path::PathBuf::from("/")];
    while let Some(dir) = todo.pop() {
        let entries = std::fs::read_dir(format!("{root}{}", dir.display())).unwrap();
        for e in entries {
            let rel = dir.join(e.unwrap().file_name());
            let s = rel.display().to_string();
            if std::fs::metadata(format!("{root}{s}")).unwrap().is_dir() && !leaves.contains(&s) {
                todo.push(rel);
            }
            out.push(s);
        }
    }
    out.sort();
    out
}

/// A jailed VMM, seen from the host: its own uid with no capabilities, no_new_privs and
/// seccomp, its own namespaces, its cgroup with the stated limits, a root holding only
/// what it needs; the guest answers, its disk and vsock work, a snapshot in its directory
/// restores into a new jailed VMM; its disk, opened by its keeper, never changes owner;
/// once it ends its cgroup is gone.
#[test]
fn a_jailed_vmm_is_unprivileged_alone_limited_and_still_works() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new("jail");
    let disk = env.runtime.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    // Private to root: the VMM's uid could not open it; its keeper does.
    std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let disk_s = disk.display().to_string();
    let uids = format!("{}-{}", JAIL_UIDS.0, JAIL_UIDS.1);
    let extra = jailed(
        &uids,
        &["--disk", &disk_s, "--vsock", "cid=11", "--vcpus", "2"],
    );
    let mut vm = env.boot(&extra);
    vm.expect_line("ready", Duration::from_secs(30));
    let pid = vm.pid;
    // The jail shows the VMM the KVM flavour: on PVM the guest runs natively.
    let hb = vm.info().heartbeat.unwrap();
    assert_eq!(hb.pvm, Path::new("/sys/module/kvm_pvm").exists());

    // Who it is.
    let uid: Vec<u32> = status_field(pid, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert_eq!(uid.len(), 4);
    assert!(uid.iter().all(|&u| u == uid[0]), "{uid:?}");
    assert!((JAIL_UIDS.0..=JAIL_UIDS.1).contains(&uid[0]), "{uid:?}");
    let gid = status_field(pid, "Gid");
    assert!(
        gid.split_whitespace().all(|g| g == uid[0].to_string()),
        "{gid}"
    );
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    // Its own PID namespace, where it is pid 1.
    let nspid = status_field(pid, "NSpid");
    assert_eq!(nspid, format!("{pid}\t1"));
    for ns in ["mnt", "pid", "ipc", "net", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace");
    }

    // Its cgroup: guest memory + the measured overhead; two vCPUs + one for I/O.
    let (groups, memory_max, quota, period) = cgroup_of(pid, &vm.id);
    assert_eq!(memory_max, (128 << 20) + ray::jail::MEMORY_OVERHEAD);
    assert_eq!((quota, period), (300_000, 100_000));

    // Its root: the VM's directory, the kernel, two devices, /proc, the host facts it
    // reads, the host's encode slots and its own cgroup; nothing else (not its disk: its
    // keeper opens it).
    let guest = ray_e2e::guest_bin().display().to_string();
    let mut leaves = vec![
        "/dev/kvm".to_string(),
        "/dev/urandom".into(),
        "/proc".into(),
        vm.dir.display().to_string(),
        env.runtime.join("encode-slots").display().to_string(),
        guest,
    ];
    for host in ["/sys/module/kvm_pvm", "/sys/devices/system/node"] {
        if Path::new(host).exists() {
            leaves.push(host.into());
        }
    }
    // Its own cgroup's directories, read-only (it reads its limits there).
    leaves.extend(groups.iter().map(|g| g.display().to_string()));
    let tree = jail_tree(pid, &leaves);
    for path in &tree {
        let needed = leaves
            .iter()
            .any(|l| l == path || Path::new(l).starts_with(path));
        assert!(needed, "{path} is in the jail's root: {tree:#?}");
    }
    for leaf in &leaves {
        assert!(tree.contains(leaf), "{leaf} is missing from {tree:#?}");
    }
    // The same from inside: the VMM's own view of its jail (GET /vm/jail).
    let view: ray_api::vmm::JailView = vm.client.call("GET", "/vm/jail", None).unwrap();
    assert!(view.jailed);
    assert_eq!(
        (view.pid, view.host_pid),
        (1, pid),
        "pid 1 in its own PID namespace"
    );
    assert_eq!(view.uids, uid, "it is who the host says");
    assert!(view.gids.iter().all(|&g| g == uid[0]), "{:?}", view.gids);
    let kvm_gid = std::fs::metadata("/dev/kvm").unwrap().gid();
    assert_eq!(view.groups, vec![kvm_gid], "only /dev/kvm's group");
    assert_eq!(
        (view.cap_effective.as_str(), view.cap_bounding.as_str()),
        ("0000000000000000", "0000000000000000")
    );
    assert!(view.no_new_privs);
    assert_eq!(view.seccomp, 2, "the answering thread runs filtered");
    assert_eq!(view.hostname, vm.id, "a UTS namespace of its own");
    assert_eq!(
        view.interfaces,
        vec!["lo".to_string()],
        "no NIC: only its own loopback"
    );
    // Its limits as it reads them from its own cgroup's files.
    assert_eq!(view.memory_max, Some(memory_max));
    assert_eq!(
        (view.cpu_quota_us, view.cpu_period_us),
        (Some(quota), Some(period))
    );
    // What it sees in its root: the leaves above, each mounted, and their parents;
    // nothing else.
    for path in &view.paths {
        let needed = leaves
            .iter()
            .any(|l| l == path || Path::new(l).starts_with(path));
        assert!(
            needed,
            "{path} is in the jail's root, seen from inside: {view:#?}"
        );
    }
    for leaf in &leaves {
        assert!(
            view.paths.contains(leaf),
            "{leaf} is missing inside: {view:#?}"
        );
        assert!(
            view.mounts.contains(leaf),
            "{leaf} is not mounted: {view:#?}"
        );
    }
    // The root itself cannot be written, even by root in there.
    let mount_line = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_line = mount_line
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap();
    assert!(
        root_line.split(' ').nth(5).unwrap().starts_with("ro"),
        "{root_line}"
    );

    // It works: the guest answers, its disk keeps what it wrote, vsock exec and the API's
    // socket are where they were.
    assert_eq!(vm.command("echo alive", "alive"), "alive");
    assert!(vm.command("disk write 8 16 0x5a", "disk ").contains("ok"));
    // The disk kept its owner and mode while the VM writes it: no file on the host is
    // handed to the VM's uid, so no other VMM of the same disk can lose it.
    let m = std::fs::metadata(&disk).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o600));
    // "disk sum <hash> irqs=.. ns=..": the hash.
    let hash = |line: String| {
        line.split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_string()
    };
    let sum = hash(vm.command("disk sum 0 32", "disk "));
    let out = env.ray_ok(&["vm", "exec", &vm.id, "--", "echo", "through-vsock"]);
    assert!(out.contains("through-vsock"), "{out}");
    let list = env.ray_ok(&["vm", "list"]);
    assert!(list.contains(&pid.to_string()), "{list}");

    // A migration to nowhere fails in `ray`, which connects for the jailed VMM; the VM
    // runs on (a real move: a_jailed_vmm_migrates_out_over_the_connection_ray_hands_it).
    let key = env.key_file("key", "0123456789abcdef0123");
    let out = env.ray(&[
        "migrate",
        "start",
        &vm.id,
        "--to",
        "unix:/nowhere.sock",
        "--key-file",
        &key,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot connect to the target unix:/nowhere.sock"),
        "{err}"
    );
    assert_eq!(vm.command("echo still", "still"), "still");
    // Snapshots go to its directory, or to a store `ray` hands it (lent to its uid while
    // it writes: an ACL entry, gone afterwards; the files then belong to the store's
    // owner). An API client that hands nothing is refused, saying why.
    env.ray_ok(&["vm", "pause", &vm.id]);
    let outside = env.runtime.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let elsewhere = outside.join("snap").display().to_string();
    let body = serde_json::json!({"path": elsewhere}).to_string();
    let e = vm
        .client
        .call::<serde_json::Value>("PUT", "/vm/snapshot", Some(body.into_bytes()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("jailed") && e.contains(&elsewhere) && e.contains("--no-jail"),
        "{e}"
    );
    let mode_before = std::fs::metadata(&outside).unwrap().mode();
    env.ray_ok(&["snapshot", "create", &vm.id, &elsewhere]);
    let cps_out = env.runtime.join("cps-out").display().to_string();
    for kind in ["full", "incremental"] {
        let out = env.ray_ok(&["vm", "checkpoint", &vm.id, "--store", &cps_out, "--json"]);
        let info: ray_api::vmm::SnapshotInfo = serde_json::from_str(&out).unwrap();
        assert_eq!(info.kind.to_string(), kind, "{info:?}");
    }
    for store in [outside.clone(), std::path::PathBuf::from(&cps_out)] {
        for f in walk(&store) {
            let m = std::fs::symlink_metadata(&f).unwrap();
            assert_eq!(
                (m.uid(), m.gid()),
                (0, 0),
                "{} is the store owner's",
                f.display()
            );
        }
        let acl = xattr(&store, "system.posix_acl_access");
        assert!(acl.is_none(), "{} keeps an ACL: {acl:?}", store.display());
    }
    assert_eq!(std::fs::metadata(&outside).unwrap().mode(), mode_before);
    let out = env.ray_ok(&["snapshot", "verify", &elsewhere]);
    assert!(out.contains("every checksum matches"), "{out}");
    let snap = vm.dir.join("snaps").join("s1").display().to_string();
    env.ray_ok(&["snapshot", "create", &vm.id, &snap]);
    // A checkpoint store `ray` makes in the VM's directory is handed to the VM's user.
    let cps = vm.dir.join("cps").display().to_string();
    let out = env.ray_ok(&["vm", "checkpoint", &vm.id, "--store", &cps]);
    assert!(out.contains(&cps), "{out}");
    env.ray_ok(&["vm", "stop", &vm.id, "--timeout-ms", "0"]);
    vm.wait_exit(Duration::from_secs(10));

    // Once it has ended: no cgroup, the disk with its owner.
    let deadline = Instant::now() + Duration::from_secs(5);
    while groups.iter().any(|g| g.exists()) {
        assert!(Instant::now() < deadline, "{groups:?} outlived the VM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&disk).unwrap());
    assert_eq!(owner, 0, "the disk is still its owner's");

    // A jailed VMM that fails to start (a damaged copy of the snapshot) leaves nothing:
    // no VM, no cgroup, the disk with its owner.
    let store = env.runtime.join("store");
    std::fs::create_dir_all(store.join("s1")).unwrap();
    for f in std::fs::read_dir(&snap).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), store.join("s1").join(f.file_name())).unwrap();
    }
    let state = store.join("s1").join("state.bin");
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[..8].copy_from_slice(b"damaged!");
    std::fs::write(&state, bytes).unwrap();
    let bad = store.join("s1").display().to_string();
    let out = env.ray(&[
        "snapshot",
        "restore",
        &bad,
        "--id",
        "jail-bad",
        "--detach",
        "--jail",
        "--jail-uids",
        &uids,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("state.bin"), "{err}");
    assert!(!env.runtime.join("vms").join("jail-bad").exists());
    for g in &groups {
        let left: Vec<_> = std::fs::read_dir(g.parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("jail-bad."))
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "{left:?} is left");
    }
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&disk).unwrap());
    assert_eq!(
        owner, 0,
        "the disk is still its owner's after a failed start"
    );

    // Restored, jailed again: the same disk contents.
    let out = env.ray_ok(&[
        "snapshot",
        "restore",
        &snap,
        "--id",
        "jail-back",
        "--detach",
        "--json",
        "--jail",
        "--jail-uids",
        &uids,
    ]);
    let info: ray_api::vmm::VmInfo = serde_json::from_str(&out).unwrap();
    let mut back = env.attach("jail-back", info.pid);
    assert_ne!(status_field(back.pid, "Uid"), "0\t0\t0\t0");
    assert_eq!(status_field(back.pid, "CapEff"), "0000000000000000");
    assert_eq!(hash(back.command("disk sum 0 32", "disk ")), sum);
}

/// A jailed VMM cannot reach a migration target from its own network namespace nor open a
/// key file outside its root: `ray migrate start` connects and opens them in the host's
/// namespaces and hands both over `handoff.sock` (0600, the VM's uid). An API client that
/// hands nothing is refused, naming the way.
#[test]
fn a_jailed_vmm_migrates_out_over_the_connection_ray_hands_it() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new("jail-out");
    let uids = format!("{}-{}", JAIL_UIDS.0, JAIL_UIDS.1);
    let mut src = env.boot(&jailed(&uids, &["--memory", "128M"]));
    src.expect_line("ready", Duration::from_secs(30));
    src.command("tick 20", "tick on 20");
    let socket = std::fs::metadata(src.dir.join("handoff.sock")).unwrap();
    assert_eq!(socket.mode() & 0o777, 0o600);
    assert_eq!(
        socket.uid().to_string(),
        status_field(src.pid, "Uid").split('\t').next().unwrap()
    );
    let key = env.key_file("key", "a pre-shared key of some length");
    let (mut dst, listen) = env.receive("there", &key, &["--memory", "128M", "--vcpus", "1"]);

    let body = serde_json::json!({"to": listen, "key_file": key}).to_string();
    let e = src
        .client
        .call::<serde_json::Value>("PUT", "/vm/migration", Some(body.into_bytes()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("jailed") && e.contains("ray migrate start") && e.contains(&listen),
        "{e}"
    );
    let body = serde_json::json!({"to": listen, "key_file": key, "handoff": "made-up"}).to_string();
    let e = src
        .client
        .call::<serde_json::Value>("PUT", "/vm/migration", Some(body.into_bytes()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothing was handed"), "{e}");
    assert_eq!(src.command("echo still here", "still"), "still here");

    let out = env.migrate_start(&src.id, &listen, &key);
    let out = ray_e2e::succeeded(out, "migrate start of a jailed VMM");
    let s: ray_api::vmm::MigrationStatus = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (s.state.as_str(), s.vm.as_str()),
        ("completed", "migrated"),
        "{s:?}"
    );
    src.wait_exit(Duration::from_secs(10));
    dst.expect_line("tick ", Duration::from_secs(10));
    assert_eq!(dst.command("echo moved", "moved"), "moved");
}

/// A jail that cannot be is refused before any VM directory or VMM exists, naming why.
#[test]
fn a_bad_jail_is_refused_before_anything_starts() {
    let env = Env::new("jail-bad");
    for (args, vars, code, says) in [
        (
            &["vm", "run", "--jail", "--jail-uids", "0-100"][..],
            &[][..],
            2,
            "the jail uid range '0-100' includes uid 0 (root)",
        ),
        (
            &["vm", "run", "--jail"][..],
            &[("RAY_JAIL_UIDS", "0-0")][..],
            2,
            "includes uid 0 (root)",
        ),
        (
            &["vm", "run", "--jail", "--jail-uids", "9-3"][..],
            &[][..],
            2,
            "'9-3' is empty",
        ),
        (
            &[
                "vm",
                "run",
                "--jail",
                "--net",
                "tap=rayj0",
                "--net",
                "tap=rayj1,netns=ray-jail-none",
            ][..],
            &[][..],
            6,
            "cannot open network namespace ray-jail-none: there is no /run/netns/ray-jail-none",
        ),
    ] {
        let out = env.ray_with(args, vars);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(!env.runtime.join("vms").exists());
}

/// Root's VMMs are jailed by default; `$RAY_JAIL=0` turns that off, `--jail` beats the
/// variable and `--no-jail` beats both; a variable that says neither is refused.
#[test]
fn roots_vmms_are_jailed_by_default_and_the_flags_beat_the_variable() {
    let env = Env::new("jail-default");
    let uid_of = |out: Output| {
        let info: ray_api::vmm::VmInfo =
            serde_json::from_str(&ray_e2e::succeeded(out, "vm run")).unwrap();
        let uid = status_field(info.pid, "Uid");
        env.ray_ok(&["vm", "stop", &info.id, "--timeout-ms", "0"]);
        uid.split_whitespace().next().unwrap().to_string()
    };
    let run = ["vm", "run", "--detach", "--json"];
    let with = |extra: &[&str], jail_var: &str| {
        let args: Vec<&str> = run.iter().chain(extra).copied().collect();
        uid_of(env.ray_with(&args, &[("RAY_JAIL", jail_var)]))
    };
    assert_ne!(with(&[], ""), "0", "root's VMM is jailed by default");
    assert_eq!(with(&[], "0"), "0", "RAY_JAIL=0 does not jail");
    assert_ne!(with(&["--jail"], "0"), "0", "--jail beats RAY_JAIL=0");
    assert_eq!(with(&["--no-jail"], "1"), "0", "--no-jail beats RAY_JAIL=1");
    let out = env.ray_with(&run, &[("RAY_JAIL", "sometimes")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("RAY_JAIL is 'sometimes'"), "{err}");
}

/// The guest's `disk sum` checksum (FNV-1a) of the same bytes.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Every uid (real, effective, saved, filesystem) of `pid`, each in the jail's range.
fn jailed_uid(pid: u32) -> u32 {
    let uids: Vec<u32> = status_field(pid, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert_eq!(uids.len(), 4, "{uids:?}");
    assert!(uids.iter().all(|&u| u == uids[0]), "{uids:?}");
    assert!((JAIL_UIDS.0..=JAIL_UIDS.1).contains(&uids[0]), "{uids:?}");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    uids[0]
}

/// A jailed migration target (`ray migrate receive --jail`): `ray` binds its listener on
/// the host's loopback, opens the key file and takes the migration slot, and the VMM in
/// its own network namespace and root inherits them. It holds only disks copied into its
/// `--disk-dir` (lent to its uid): a source whose disk is shared storage is refused before
/// the switch-over, naming `--no-jail`, and runs on; with `--copy-disks` the VM moves,
/// its disk reads the same in the guest, and after the VM the copy is the directory
/// owner's again and the directory's ACL is as before.
#[test]
fn a_jailed_target_receives_a_vm_whose_disk_is_copied_into_its_disk_dir() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new("jail-in");
    let uids = format!("{}-{}", JAIL_UIDS.0, JAIL_UIDS.1);
    let img = env.runtime.join("src.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut src = env.boot(&jailed(
        &uids,
        &["--memory", "128M", "--disk", img.to_str().unwrap()],
    ));
    src.expect_line("ready", Duration::from_secs(30));
    let w = src.command("disk write 0 2048 0x11", "disk ");
    assert!(w.contains(" ok"), "{w}");
    let w = src.command("disk write 65536 16 0x22", "disk ");
    assert!(w.contains(" ok"), "{w}");
    let key = env.key_file("key", "a pre-shared key of some length");
    let receive = |id: &str, extra: &[&str]| {
        let args: Vec<&str> = ["--jail", "--jail-uids", &uids]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        let dst = env.receive_on(id, "127.0.0.1:0", &key, &args);
        let listen = crate::migration::migration(&dst).peer;
        assert!(
            listen.starts_with("127.0.0.1:") && !listen.ends_with(":0"),
            "{listen}"
        );
        (dst, listen)
    };

    // Shared storage: the jail cannot hold the source's disk.
    let (shared, listen) = receive("jail-in-shared", &[]);
    jailed_uid(shared.pid);
    let out = env.migrate_start(&src.id, &listen, &key);
    assert!(!out.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("jailed") && said.contains("--no-jail") && said.contains("disk0"),
        "{said}"
    );
    shared.wait_exit(Duration::from_secs(30));
    assert_eq!(src.command("echo still here", "still"), "still here");

    // Copied into a disk directory lent to the target's uid.
    let dir = env.runtime.join("copies");
    std::fs::create_dir_all(&dir).unwrap();
    let mode = std::fs::metadata(&dir).unwrap().mode();
    let (mut dst, listen) = receive("jail-in-dst", &["--disk-dir", dir.to_str().unwrap()]);
    let uid = jailed_uid(dst.pid);
    assert_ne!(
        std::fs::read_link(format!("/proc/{}/ns/net", dst.pid)).unwrap(),
        std::fs::read_link("/proc/self/ns/net").unwrap(),
        "the target has a network namespace of its own"
    );
    let out = env.ray(&[
        "migrate",
        "start",
        &src.id,
        "--to",
        &listen,
        "--key-file",
        &key,
        "--copy-disks",
        "--json",
    ]);
    let out = ray_e2e::succeeded(out, "migrate start --copy-disks to a jailed target");
    let s: ray_api::vmm::MigrationStatus = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (s.state.as_str(), s.vm.as_str()),
        ("completed", "migrated"),
        "{s:?}"
    );
    src.wait_exit(Duration::from_secs(10));
    let copy = dir.join("disk0.img");
    assert_eq!(std::fs::metadata(&copy).unwrap().uid(), uid);
    let bytes = std::fs::read(&copy).unwrap();
    assert_eq!(
        bytes,
        std::fs::read(&img).unwrap(),
        "the copy equals the disk"
    );
    assert_eq!(&bytes[..1 << 20], &vec![0x11u8; 1 << 20][..]);
    for (sector, count) in [(0, 2048), (65536, 16)] {
        let sum = dst.command(&format!("disk sum {sector} {count}"), "disk ");
        let want = fnv(&bytes[sector * 512..(sector + count) * 512]);
        assert_eq!(
            sum.split_whitespace().nth(2).unwrap(),
            format!("{want:016x}"),
            "{sum}"
        );
    }
    assert_eq!(
        jailed_uid(dst.pid),
        uid,
        "still jailed after the switch-over"
    );
    env.ray_ok(&["vm", "stop", "jail-in-dst", "--timeout-ms", "0"]);
    dst.wait_exit(Duration::from_secs(30));
    // The keeper gives the copy to the directory's owner and takes the loan back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&copy).unwrap().uid() == uid {
        assert!(Instant::now() < deadline, "the copy is still uid {uid}'s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let owner = std::fs::metadata(&dir).unwrap();
    assert_eq!(std::fs::metadata(&copy).unwrap().uid(), owner.uid());
    assert_eq!(owner.mode(), mode, "the directory's mode is as before");
    let acl = xattr(&dir, "system.posix_acl_access");
    assert!(acl.is_none(), "{} keeps an ACL: {acl:?}", dir.display());
}
