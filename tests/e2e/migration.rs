//! Live migration between two VMM processes in two network namespaces joined by a veth
//! pair: the guest keeps running (`dirty`, `tick`) during the move and continues on the
//! target with its memory intact; each fault leaves the source running and the session
//! failed with a clear error.
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ray_api::vmm::{MigrationStatus, VmInfo, VmStateName};
use ray_e2e::{guest_bin, ray_bin, region_of, Env, Vm};

pub(crate) const READY: Duration = Duration::from_secs(20);

pub(crate) fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

fn ip_ok(args: &[&str]) {
    let what = format!(
        "`ip {}` (the migration tests need root and iproute2 with network namespaces)",
        args.join(" ")
    );
    ray_e2e::succeeded(ip(args), &what);
}

/// Two network namespaces ("hosts") joined by a veth pair with private addresses; both
/// are deleted (with the veth) on drop.
pub(crate) struct Net {
    pub(crate) a: String,
    pub(crate) b: String,
    pub(crate) veth_b: String,
    addr_b: String,
}

impl Net {
    pub(crate) fn new(tag: &str) -> Net {
        let n = std::process::id() % 100_000;
        let net = Net {
            a: format!("ray-{tag}-a-{n}"),
            b: format!("ray-{tag}-b-{n}"),
            veth_b: format!("rmb{n}"),
            addr_b: "10.231.7.2".into(),
        };
        let veth_a = format!("rma{n}");
        for ns in [&net.a, &net.b] {
            let _ = ip(&["netns", "del", ns]);
            ip_ok(&["netns", "add", ns]);
        }
        ip_ok(&[
            "link",
            "add",
            &veth_a,
            "netns",
            &net.a,
            "type",
            "veth",
            "peer",
            "name",
            &net.veth_b,
            "netns",
            &net.b,
        ]);
        ip_ok(&["-n", &net.a, "addr", "add", "10.231.7.1/24", "dev", &veth_a]);
        ip_ok(&[
            "-n",
            &net.b,
            "addr",
            "add",
            "10.231.7.2/24",
            "dev",
            &net.veth_b,
        ]);
        for (ns, dev) in [(&net.a, &veth_a), (&net.b, &net.veth_b)] {
            ip_ok(&["-n", ns, "link", "set", dev, "up"]);
            ip_ok(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }

    /// `ray <args>` inside namespace `ns`, with the test's runtime directory.
    pub(crate) fn ray(&self, env: &Env, ns: &str, args: &[&str]) -> Output {
        self.ray_with(env, ns, args, &[])
    }

    /// [`ray`](Self::ray) with more environment variables (for `ray` and the VMM it starts).
    fn ray_with(&self, env: &Env, ns: &str, args: &[&str], vars: &[(&str, &str)]) -> Output {
        // Only the network namespace (`ip netns exec` would also remount /sys, hiding the
        // cgroup hierarchy a jail needs). Jailed as every VM of the suite (as root): `ray`
        // makes the connections and listeners in the test's namespace and hands them over.
        run(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(ray_bin())
            .args(args)
            .env("RAY_RUNTIME_DIR", &env.runtime)
            .env("RAY_GUEST", guest_bin())
            .env("RAY_JAIL", ray_e2e::jail_setting())
            .envs(vars.iter().copied()))
    }

    pub(crate) fn ray_ok(&self, env: &Env, ns: &str, args: &[&str]) -> String {
        self.ray_ok_with(env, ns, args, &[])
    }

    fn ray_ok_with(&self, env: &Env, ns: &str, args: &[&str], vars: &[(&str, &str)]) -> String {
        let out = self.ray_with(env, ns, args, vars);
        ray_e2e::succeeded(out, &format!("ray {args:?} in {ns}"))
    }

    pub(crate) fn target_addr(&self, port: u16) -> String {
        format!("{}:{port}", self.addr_b)
    }

    /// Cuts the link: the target's end of the veth goes down.
    fn cut(&self) {
        ip_ok(&["-n", &self.b, "link", "set", &self.veth_b, "down"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// Boots the source VM in namespace A.
pub(crate) fn boot_source(env: &Env, net: &Net, memory: &str) -> Vm {
    let out = net.ray_ok(
        env,
        &net.a,
        &[
            "vm", "run", "--detach", "--json", "--id", "src", "--memory", memory, "--vcpus", "2",
        ],
    );
    let info: VmInfo = serde_json::from_str(&out).expect("vm run --json prints VmInfo");
    let mut vm = env.attach("src", info.pid);
    vm.expect_line("ready", READY);
    vm
}

/// A test's world: its runtime directory, two namespaces, a key file, the source VM
/// (`memory`, booted in namespace A) and a target waiting on `port` in namespace B.
fn source_and_target(tag: &str, net: &str, port: u16, memory: &str) -> (Env, Net, String, Vm, Vm) {
    let env = Env::new(tag);
    let net = Net::new(net);
    let key = env.key_file("key", "a pre-shared key of some length");
    let src = boot_source(&env, &net, memory);
    let dst = receive(&env, &net, port, &key, memory);
    (env, net, key, src, dst)
}

/// Starts a target VMM in namespace B waiting on port `port`.
fn receive(env: &Env, net: &Net, port: u16, key: &str, memory: &str) -> Vm {
    receive_with(env, net, port, key, memory, &[])
}

/// [`receive`] with more environment variables for the target VMM.
fn receive_with(
    env: &Env,
    net: &Net,
    port: u16,
    key: &str,
    memory: &str,
    vars: &[(&str, &str)],
) -> Vm {
    let out = net.ray_ok_with(
        env,
        &net.b,
        &[
            "migrate",
            "receive",
            "--listen",
            &net.target_addr(port),
            "--key-file",
            key,
            "--memory",
            memory,
            "--vcpus",
            "2",
            "--id",
            "dst",
            "--json",
        ],
        vars,
    );
    let info: VmInfo = serde_json::from_str(&out).expect("migrate receive --json prints VmInfo");
    assert_eq!(info.state, VmStateName::MigrationTarget);
    env.attach("dst", info.pid)
}

pub(crate) fn migration(vm: &Vm) -> MigrationStatus {
    vm.client
        .call("GET", "/vm/migration", None)
        .expect("GET /vm/migration")
}

/// Polls `GET /vm/migration` every 10 ms until `done` says the status is the one awaited
/// (`Ok`), or fails the test when it says it never will be (`Err`) or `secs` pass.
fn wait_migration(
    vm: &Vm,
    what: &str,
    secs: u64,
    mut done: impl FnMut(&MigrationStatus) -> Result<bool, String>,
) -> MigrationStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = migration(vm);
        match done(&s) {
            Ok(true) => return s,
            Ok(false) => {}
            Err(why) => panic!("{why}: {s:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {secs} s: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the source's migration is in pre-copy pass `pass` or later.
pub(crate) fn wait_for_pass(vm: &Vm, pass: u32) -> MigrationStatus {
    wait_migration(vm, &format!("pass {pass}"), 60, |s| {
        if s.vm != "migrating" {
            return Err(format!("the migration ended before pass {pass}"));
        }
        Ok(s.state == "pre_copy" && s.pass >= pass)
    })
}

/// Waits until the VMM recorded the migration's outcome.
pub(crate) fn wait_for_end(vm: &Vm) -> MigrationStatus {
    wait_migration(vm, "end of the migration", 60, |s| Ok(s.vm != "migrating"))
}

/// Starts a migration that cannot converge (1 ms budget, no throttling, the guest dirtying
/// fast) so pre-copy goes on until the test interferes.
fn start_endless(env: &Env, net: &Net, src: &mut Vm, port: u16, key: &str) {
    src.command("dirty 64 2000", "dirty on");
    start_ok(
        env,
        net,
        port,
        key,
        &[
            "--max-downtime-ms",
            "1",
            "--no-auto-converge",
            "--max-passes",
            "1000000",
            "--max-time-ms",
            "120000",
            "--on-limit",
            "abort",
            "--detach",
            "--json",
        ],
    );
}

/// `ray migrate start src` towards `port` in the target namespace, with `extra` options;
/// without `--detach` it runs to the migration's end.
pub(crate) fn start_to(env: &Env, net: &Net, port: u16, key: &str, extra: &[&str]) -> Output {
    let to = net.target_addr(port);
    let mut args = vec!["migrate", "start", "src", "--to", &to, "--key-file", key];
    args.extend_from_slice(extra);
    net.ray(env, &net.a, &args)
}

/// [`start_to`] that must succeed; its standard output.
pub(crate) fn start_ok(env: &Env, net: &Net, port: u16, key: &str, extra: &[&str]) -> String {
    ray_e2e::succeeded(start_to(env, net, port, key, extra), "migrate start")
}

/// The session failed and the source VM was given back (not paused, not gone).
pub(crate) fn assert_failed_and_running(s: &MigrationStatus) {
    assert_eq!(
        (s.state.as_str(), s.vm.as_str()),
        ("failed", "running"),
        "{s:?}"
    );
}

/// The source VM runs on after a failed migration: running state, heartbeat moving,
/// console answering.
pub(crate) fn assert_source_runs(src: &mut Vm) {
    let info = src.wait_for(
        "the source to be running again",
        Duration::from_secs(10),
        |i| i.state == VmStateName::Running,
    );
    let before = info.heartbeat.unwrap().counter;
    src.wait_for("the heartbeat to move", Duration::from_secs(5), |i| {
        i.heartbeat.as_ref().unwrap().counter > before
    });
    src.command("dirty stop", "dirty off");
    assert_eq!(src.command("echo still here", "still"), "still here");
}

#[test]
fn guest_moves_between_namespaces_while_dirtying_and_ticking() {
    let env = Env::new("mig-ok");
    let net = Net::new("ok");
    let key = env.key_file("key", "a pre-shared key of some length");
    let mut src = boot_source(&env, &net, "512M");

    // 48 MiB of guest data, written once and then left alone...
    let on = src.command("dirty 48 4000", "dirty on");
    let base = region_of(&on);
    let deadline = Instant::now() + Duration::from_secs(20);
    while src.info().heartbeat.unwrap().dirty_bytes < 48 << 20 {
        assert!(Instant::now() < deadline, "dirty did not cover 48 MiB");
        std::thread::sleep(Duration::from_millis(20));
    }
    src.command("dirty stop", "dirty off");
    // ...except its first 16 MiB, which the guest keeps rewriting during the migration.
    let still = (base + (16 << 20), 32u64 << 20);
    let before = src.sum(still.0, still.1);
    assert_eq!(region_of(&src.command("dirty 16 64", "dirty on")), base);
    src.command("tick 20", "tick on 20");
    src.expect_line("tick ", Duration::from_secs(5));

    let mut dst = receive(&env, &net, 7001, &key, "512M");
    // The paused source's memory is reread and compared with what was sent: the dirty log
    // (PVM's shadow paging here) must not have missed a write.
    let out = start_ok(&env, &net, 7001, &key, &["--recheck-memory", "--json"]);
    let s: MigrationStatus = serde_json::from_str(&out).unwrap();
    assert_eq!(s.state, "completed", "{s:?}");
    assert_eq!(s.vm, "migrated");
    assert!(s.error.is_none(), "{s:?}");
    assert!(s.bytes_sent > 0 && s.pass >= 2, "{s:?}");
    // The source is gone for good: its VMM ended and says why.
    src.wait_exit(Duration::from_secs(10));
    let gone = env.ray(&["vm", "status", "src"]);
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("migrated to 10.231.7.2:7001"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    let recorded: MigrationStatus =
        serde_json::from_str(&env.ray_ok(&["migrate", "status", "src", "--json"])).unwrap();
    assert_eq!(recorded.state, "completed");

    // The guest continues on the target: ticking, dirtying, answering.
    let t = migration(&dst);
    assert_eq!(
        (t.state.as_str(), t.vm.as_str()),
        ("completed", "running"),
        "{t:?}"
    );
    let info = dst.wait_for("heartbeat on the target", Duration::from_secs(5), |i| {
        i.state == VmStateName::Running && i.heartbeat.as_ref().is_some_and(|h| h.pvm)
    });
    assert_eq!(info.heartbeat.unwrap().cpus_online, 2);
    dst.expect_line("tick ", Duration::from_secs(5));
    let dirtied = dst.info().heartbeat.unwrap().dirty_bytes;
    dst.wait_for("dirty to go on", Duration::from_secs(5), |i| {
        i.heartbeat.as_ref().unwrap().dirty_bytes > dirtied
    });
    dst.command("dirty stop", "dirty off");
    assert_eq!(
        dst.sum(still.0, still.1),
        before,
        "guest memory the workload no longer touched differs after the migration"
    );
    assert_eq!(dst.command("echo moved", "moved"), "moved");

    // Downtime as the guest saw it: from the source's pause to the first heartbeat here.
    let t = wait_heartbeat_recorded(&dst);
    let paused = s.paused_at_unix_us.expect("the source records its pause");
    let first = t.first_heartbeat_unix_us.unwrap();
    assert!(
        first > paused,
        "heartbeat {first} before the pause {paused}"
    );
    eprintln!(
        "migration: {} passes, {:.1} MiB sent, downtime {:.2} ms (driver), heartbeat gap {:.2} ms, total {:.0} ms",
        s.pass,
        s.bytes_sent as f64 / (1 << 20) as f64,
        s.downtime_ms.unwrap(),
        (first - paused) as f64 / 1e3,
        s.total_ms.unwrap()
    );
    let events = env.ray_ok(&["vm", "events", "dst"]);
    assert!(events.contains("migrate:resumed here"), "{events}");

    // Each side's log has the migration's events in a `migration` span within its VM's.
    let log = |vm: &Vm| std::fs::read_to_string(vm.dir.join("vmm.log")).unwrap();
    let (src_log, dst_log) = (log(&src), log(&dst));
    for (log, span, end) in [
        (
            &src_log,
            "vm{id=src}:migration{direction=\"out\" peer=10.231.7.2:7001}",
            "migration ended",
        ),
        (
            &dst_log,
            "vm{id=dst}:migration{direction=\"in\"",
            "migration ended",
        ),
    ] {
        assert!(
            log.lines().any(|l| l.contains(span) && l.contains(end)),
            "no '{end}' in span {span}:\n{log}"
        );
    }
}

fn wait_heartbeat_recorded(dst: &Vm) -> MigrationStatus {
    wait_migration(dst, "heartbeat after resume", 10, |t| {
        Ok(t.first_heartbeat_unix_us.is_some())
    })
}

#[test]
fn killed_target_mid_pre_copy_leaves_the_source_running() {
    let (env, net, key, mut src, dst) = source_and_target("mig-kill", "kill", 7002, "256M");
    start_endless(&env, &net, &mut src, 7002, &key);
    wait_for_pass(&src, 3);
    // SAFETY: kill(2) of the target VMM this test started.
    unsafe {
        libc::kill(dst.pid as libc::pid_t, libc::SIGKILL);
    }
    let s = wait_for_end(&src);
    assert_failed_and_running(&s);
    // The connection ends between frames, mid-frame, or on a write: each says so.
    let err = s.error.unwrap();
    assert!(
        err.contains("peer closed the migration connection")
            || err.contains("migration connection failed")
            || err.contains("before the connection ended"),
        "{err}"
    );
    assert_source_runs(&mut src);
}

#[test]
fn cut_link_mid_transfer_leaves_the_source_running() {
    let (env, net, key, mut src, dst) = source_and_target("mig-cut", "cut", 7003, "256M");
    start_endless(&env, &net, &mut src, 7003, &key);
    wait_for_pass(&src, 3);
    net.cut();
    let s = wait_for_end(&src);
    assert_failed_and_running(&s);
    let err = s.error.unwrap();
    assert!(err.contains("migration connection failed"), "{err}");
    assert_source_runs(&mut src);
    // The target gave up too and tore its copy down: it never ran the VM.
    dst.wait_exit(Duration::from_secs(30));
    let t: MigrationStatus =
        serde_json::from_str(&env.ray_ok(&["migrate", "status", "dst", "--json"])).unwrap();
    assert_eq!(
        (t.state.as_str(), t.vm.as_str()),
        ("failed", "discarded"),
        "{t:?}"
    );
    assert!(t.resumed_at_unix_us.is_none());
}

#[test]
fn wrong_key_is_refused_before_any_memory_moves() {
    let env = Env::new("mig-key");
    let net = Net::new("key");
    let key = env.key_file("key", "a pre-shared key of some length");
    let other = env.key_file("other", "another key, just as long");
    let mut src = boot_source(&env, &net, "256M");
    let dst = receive(&env, &net, 7004, &other, "256M");
    let out = start_to(&env, &net, 7004, &key, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pre-shared key"), "{err}");
    let s = migration(&src);
    assert_failed_and_running(&s);
    assert_eq!(s.pages_sent, 0, "no page may move before authentication");
    assert_source_runs(&mut src);
    // A peer without the key may be anyone: the target drops it and keeps waiting for
    // its source (tests/e2e/robustness.rs has the rest of that story).
    assert_eq!(dst.state(), VmStateName::MigrationTarget);

    // A key file that is too short is refused by the API, naming the file.
    let short = env.key_file("short", "tiny");
    let out = net.ray(
        &env,
        &net.a,
        &[
            "migrate",
            "start",
            "src",
            "--to",
            "10.231.7.2:7004",
            "--key-file",
            &short,
        ],
    );
    assert_eq!(out.status.code(), Some(6), "bad request");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("short") && err.contains("at least 16"),
        "{err}"
    );
    assert_eq!(src.state(), VmStateName::Running);
}

#[test]
fn incompatible_target_is_refused_before_any_memory_moves() {
    let env = Env::new("mig-compat");
    let net = Net::new("compat");
    let key = env.key_file("key", "a pre-shared key of some length");
    let mut src = boot_source(&env, &net, "256M");
    let dst = receive(&env, &net, 7005, &key, "128M");
    let out = start_to(&env, &net, 7005, &key, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("incompatible") && err.contains("memory layout differs"),
        "{err}"
    );
    let s = migration(&src);
    assert_failed_and_running(&s);
    assert_eq!(s.pages_sent, 0);
    assert_source_runs(&mut src);
    dst.wait_exit(Duration::from_secs(10));
}

#[test]
fn cancel_mid_pre_copy_rolls_back() {
    let (env, net, key, mut src, dst) = source_and_target("mig-cancel", "cancel", 7006, "256M");
    start_endless(&env, &net, &mut src, 7006, &key);
    wait_for_pass(&src, 2);
    let out = env.ray_ok(&["migrate", "cancel", "src", "--json"]);
    let s: MigrationStatus = serde_json::from_str(&out).unwrap();
    assert_failed_and_running(&s);
    assert!(
        s.error
            .as_deref()
            .unwrap()
            .contains("the migration was cancelled"),
        "{s:?}"
    );
    assert_eq!(s.throttle_percent, 0);
    assert_source_runs(&mut src);
    // The target learnt of the abort and discarded its copy.
    dst.wait_exit(Duration::from_secs(30));
    // Nothing left to cancel; a second migration may start again later.
    let again = env.ray(&["migrate", "cancel", "src"]);
    assert_eq!(again.status.code(), Some(4));
    // Reclaiming is only for a source paused after the switch-over; this one runs.
    let reclaim = env.ray(&["migrate", "reclaim", "src", "--target-fenced"]);
    assert_eq!(reclaim.status.code(), Some(4));
    let err = String::from_utf8_lossy(&reclaim.stderr);
    assert!(err.contains("nothing to reclaim"), "{err}");
    assert_eq!(src.state(), VmStateName::Running);
    let sessions = env.ray_ok(&["migrate", "sessions"]);
    assert!(
        sessions.contains("src") && sessions.contains("failed"),
        "{sessions}"
    );
}

#[test]
fn auto_converge_throttles_the_vcpus_and_a_rollback_lifts_it() {
    let (env, net, key, mut src, dst) = source_and_target("mig-throttle", "thr", 7007, "256M");
    src.command("dirty 64 2000", "dirty on");
    start_ok(
        &env,
        &net,
        7007,
        &key,
        &[
            "--max-downtime-ms",
            "1",
            "--max-passes",
            "1000000",
            "--max-time-ms",
            "120000",
            "--on-limit",
            "abort",
            "--detach",
        ],
    );
    // A 1 ms budget cannot be met while the guest dirties memory: the throttle steps in.
    let s = wait_migration(&src, "throttle", 60, |s| {
        if s.vm != "migrating" {
            return Err("the migration ended before throttling".into());
        }
        Ok(s.throttle_percent > 0)
    });
    assert!(
        s.pass >= 2,
        "the throttle follows passes that did not converge: {s:?}"
    );
    let out = env.ray_ok(&["migrate", "cancel", "src", "--json"]);
    let s: MigrationStatus = serde_json::from_str(&out).unwrap();
    assert_failed_and_running(&s);
    assert_eq!(s.throttle_percent, 0, "the rollback lifts the throttle");
    assert_source_runs(&mut src);
    dst.wait_exit(Duration::from_secs(30));
}

#[test]
fn same_host_move_over_a_unix_socket() {
    let env = Env::new("mig-unix");
    let key = env.key_file("key", "a pre-shared key of some length");
    let mut src = env.boot(&["--memory", "128M"]);
    src.expect_line("ready", READY);
    src.command("tick 20", "tick on 20");
    let (mut dst, listen) = env.receive(
        "here",
        &key,
        &["--memory", "128M", "--vcpus", "1", "--prefault"],
    );
    assert_eq!(migration(&dst).peer, listen);
    wait_prefaulted(&dst, 128 << 20);
    let out = env.ray_ok(&[
        "migrate",
        "start",
        &src.id,
        "--to",
        &listen,
        "--key-file",
        &key,
        "--json",
    ]);
    let s: MigrationStatus = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (s.state.as_str(), s.vm.as_str()),
        ("completed", "migrated"),
        "{s:?}"
    );
    src.wait_exit(Duration::from_secs(10));
    dst.expect_line("tick ", Duration::from_secs(5));
    assert_eq!(dst.command("echo over unix", "over"), "over unix");
    assert!(
        !std::path::Path::new(listen.trim_start_matches("unix:")).exists(),
        "the listening socket is removed once used"
    );
    let t = migration(&dst);
    assert_eq!(t.prefault_bytes, Some(128 << 20), "{t:?}");
}

/// Waits until a target started with `--prefault` populated all `bytes` of its memory
/// (while its API keeps answering).
fn wait_prefaulted(dst: &Vm, bytes: u64) {
    wait_migration(dst, "end of the prefault", 30, |s| {
        if s.prefault_total_bytes != Some(bytes) || s.prefault_error.is_some() {
            return Err(format!("prefault of {bytes} bytes failed or is missing"));
        }
        Ok(s.prefault_bytes == Some(bytes))
    });
}

#[test]
fn target_dying_after_the_switchover_leaves_the_source_paused_until_reclaimed() {
    let env = Env::new("mig-split");
    let net = Net::new("split");
    let key = env.key_file("key", "a pre-shared key of some length");
    let mut src = boot_source(&env, &net, "128M");
    src.command("tick 20", "tick on 20");
    // A target that exits the moment the source has committed (it received `Switchover`)
    // and before it resumed or answered: from the source, indistinguishable from a target
    // that runs the VM and whose answer got lost.
    let dst = receive_with(
        &env,
        &net,
        7009,
        &key,
        "128M",
        &[("RAY_FAULT", "target-exit-at-switchover")],
    );

    let out = start_to(&env, &net, 7009, &key, &[]);
    assert!(!out.status.success(), "the migration cannot have completed");
    dst.wait_exit(Duration::from_secs(10));
    let s = migration(&src);
    assert_eq!(
        (s.state.as_str(), s.vm.as_str()),
        ("failed", "paused_ownership_uncertain"),
        "{s:?}"
    );
    // No split brain: the source stays paused on its own — its heartbeat does not move.
    assert_eq!(src.state(), VmStateName::MigrationSource);
    let frozen = src.info().heartbeat.unwrap().counter;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        src.info().heartbeat.unwrap().counter,
        frozen,
        "the source ran"
    );
    // Only the operator, having fenced the target, brings it back.
    let refused = env.ray(&["migrate", "reclaim", "src"]);
    assert!(!refused.status.success(), "reclaim without --target-fenced");
    let s: MigrationStatus = serde_json::from_str(&env.ray_ok(&[
        "migrate",
        "reclaim",
        "src",
        "--target-fenced",
        "--json",
    ]))
    .unwrap();
    assert_eq!(s.vm, "running", "{s:?}");
    src.wait_for("the source to run again", Duration::from_secs(5), |i| {
        i.state == VmStateName::Running && i.heartbeat.as_ref().unwrap().counter != frozen
    });
    src.expect_line("tick ", Duration::from_secs(5));
}
