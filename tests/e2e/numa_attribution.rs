//! NUMA access attribution on this (one-node) host: with `--numa-attribution ring`, KVM's
//! per-vCPU dirty rings say which vCPU (hence which guest node) wrote which pages, and the
//! same rings serve incremental snapshots and live migration in place of KVM's bitmap.
use std::time::Duration;

use ray_api::vmm::{AttributionInfo, MigrationStatus, NumaMigrationMode};
use ray_e2e::{Env, Vm};

const READY: Duration = Duration::from_secs(20);
/// Two guest nodes of 64 MiB (node 1 from 0x4000000), one vCPU each, on host node 0.
const TWO_NODES: [&str; 8] = [
    "--vcpus",
    "2",
    "--numa",
    "node=0,cpus=0,memory=64M,host-node=0",
    "--numa",
    "node=1,cpus=1,memory=64M,host-node=0",
    "--numa-attribution",
    "ring",
];
/// Pages a guest's own bookkeeping (heartbeat, stacks, page tables) may write besides a
/// `touch`, per vCPU, over the second or so one takes.
const SLACK: u64 = 512;

fn attribution(vm: &Vm) -> AttributionInfo {
    vm.info()
        .attribution
        .expect("a VM run with --numa-attribution ring reports attribution")
}

/// Has vCPU `cpu` write `len` bytes at `addr` and returns how many pages each vCPU was
/// seen writing meanwhile.
fn touch(vm: &mut Vm, cpu: u8, addr: u64, len: u64) -> Vec<u64> {
    let before = attribution(vm);
    let line = vm.command(&format!("touch {cpu} {addr:#x} {len}"), "touch ");
    assert_eq!(
        line,
        format!("touch cpu={cpu} addr={addr:#x} pages={}", len / 4096)
    );
    let after = attribution(vm);
    after
        .vcpu_pages
        .iter()
        .zip(&before.vcpu_pages)
        .map(|(a, b)| a - b)
        .collect()
}

#[test]
fn dirty_rings_attribute_each_vcpus_writes_to_its_guest_node() {
    let env = Env::new("numa-attr");
    let mut vm = env.boot(&TWO_NODES);
    vm.expect_line("ready", READY);
    // vCPU 1 (guest node 1) writes 8 MiB of node 1: 2048 pages.
    let d = touch(&mut vm, 1, 0x440_0000, 8 << 20);
    assert!((2048..2048 + SLACK).contains(&d[1]), "vCPU 1 wrote {d:?}");
    assert!(d[0] < SLACK, "vCPU 0 wrote only its bookkeeping: {d:?}");
    // vCPU 0 (node 0) writes 4 MiB of node 0, then 4 MiB of node 1: writes count for
    // the vCPU that makes them, wherever the page lives.
    let d = touch(&mut vm, 0, 0x200_0000, 4 << 20);
    assert!((1024..1024 + SLACK).contains(&d[0]), "vCPU 0 wrote {d:?}");
    assert!(d[1] < SLACK, "{d:?}");
    let d = touch(&mut vm, 0, 0x440_0000, 4 << 20);
    assert!((1024..1024 + SLACK).contains(&d[0]), "vCPU 0 wrote {d:?}");
    let a = attribution(&vm);
    assert_eq!(a.node_pages, a.vcpu_pages, "one vCPU per node: {a:?}");
    assert!(a.harvests > 0 && a.harvest_ms > 0.0, "{a:?}");
    // A bad request is refused by the guest, not attributed.
    assert_eq!(
        vm.command("touch 7 0x4400000 4096", "err touch"),
        "err touch: cpu 7 is not online"
    );
}

#[test]
fn incremental_snapshots_take_their_pages_from_the_rings() {
    let env = Env::new("numa-attr-snap");
    let mut vm = env.boot(&TWO_NODES);
    vm.expect_line("ready", READY);
    let store = env.runtime.join("store");
    let at = |name: &str| store.join(name).to_str().unwrap().to_string();
    let region = 0x440_0000;
    touch(&mut vm, 1, region, 8 << 20);
    let first = vm.sum(region, 8 << 20);
    env.ray_ok(&["snapshot", "create", &vm.id, &at("c0"), "--pause"]);
    touch(&mut vm, 1, region, 8 << 20);
    let second = vm.sum(region, 8 << 20);
    assert_ne!(first, second, "the touch changes memory");
    let out = env.ray_ok(&[
        "snapshot",
        "create",
        &vm.id,
        &at("c1"),
        "--pause",
        "--incremental",
        "--json",
    ]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["kind"], "incremental", "{info}");
    // The 8 MiB vCPU 1 rewrote, plus the guest's own few pages: what the rings saw.
    let stored = info["stored_pages"].as_u64().unwrap();
    assert!((2048..2048 + SLACK).contains(&stored), "{info}");
    env.ray_ok(&["vm", "stop", &vm.id, "--timeout-ms", "0"]);
    let mut back = env.restore(&at("c1"), "back");
    assert_eq!(back.sum(region, 8 << 20), second);
    // The restored VM attributes again (its own rings, from zero).
    let d = touch(&mut back, 1, region, 8 << 20);
    assert!(
        (2048..2048 + SLACK).contains(&d[1]),
        "restored: vCPU 1 wrote {d:?}"
    );
}

#[test]
fn a_live_migration_takes_its_dirty_pages_from_the_rings() {
    let env = Env::new("numa-attr-mig");
    let key = env.key_file("key", "a pre-shared key of some length");
    let mut src = env.boot(&["--memory", "128M", "--numa-attribution", "ring"]);
    src.expect_line("ready", READY);
    // The guest rewrites 16 MiB at 32 MiB/s during the migration: each pass must find
    // those pages in the rings, or the target's memory differs.
    let line = src.command("dirty 16 32", "dirty on");
    let region = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("region="))
        .and_then(|r| u64::from_str_radix(r.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| panic!("{line}"));
    let (mut dst, listen) = env.receive("here", &key, &["--memory", "128M", "--vcpus", "1"]);
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
    assert!(s.pass >= 2, "pre-copy saw dirty pages: {s:?}");
    // `completed` means the target's memory hashed the same as the source's at the
    // switch-over (the protocol's VerifyHash): a page the rings missed would have failed
    // the migration with a mismatch.
    src.wait_exit(Duration::from_secs(10));
    dst.command("dirty stop", "dirty off");
    assert_ne!(dst.sum(region, 16 << 20), "", "the region reads back");
    // The target keeps attributing: its own rings.
    let d = touch(&mut dst, 0, region, 4 << 20);
    assert!(
        (1024..1024 + SLACK).contains(&d[0]),
        "target: vCPU 0 wrote {d:?}"
    );
    assert_eq!(dst.command("echo alive", "alive"), "alive");
}

/// The page migration policy in dry run on this one-node host: a scripted pattern (vCPU 1
/// writes four 2 MiB ranges of guest node 1) gives one decision per range, with the
/// attributed counts, and every range stays (host node 0 is where everything runs).
#[test]
fn the_policy_in_dry_run_explains_a_scripted_pattern_window_by_window() {
    let env = Env::new("numa-policy-dry");
    let mut args = TWO_NODES.to_vec();
    args.extend(["--numa-migrate", "dry-run,window=1s"]);
    let mut vm = env.boot(&args);
    vm.expect_line("ready", READY);
    let windows = |vm: &Vm| vm.info().numa_migration.expect("a report").windows;
    // Start right after a window closes, so the touch falls into one window.
    let w0 = windows(&vm);
    vm.wait_for("a window to close", Duration::from_secs(5), |i| {
        i.numa_migration.as_ref().unwrap().windows > w0
    });
    let w1 = windows(&vm);
    vm.command("touch 1 0x4400000 8388608", "touch cpu=1");
    let info = vm.wait_for("the touch's window", Duration::from_secs(5), |i| {
        i.numa_migration.as_ref().unwrap().windows > w1
    });
    let report = info.numa_migration.unwrap();
    assert_eq!(report.windows, w1 + 1, "{report:?}");
    // 512 pages each; now and then one page is counted twice (513 seen here: the ring
    // reports a page again when a harvest re-protected it mid-touch).
    for gpa in [0x440_0000u64, 0x460_0000, 0x480_0000, 0x4a0_0000] {
        let head = format!(
            "VM {}: {gpa:#x} (+2.0 MiB) stays on host node 0: 100% of ",
            vm.id
        );
        let count = report
            .last_window
            .iter()
            .find_map(|l| l.strip_prefix(&head)?.strip_suffix(" accesses are local"))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{head}... in {report:#?}"));
        assert!(
            (512..520).contains(&count),
            "{count} for {gpa:#x}: {report:#?}"
        );
    }
    assert_eq!(report.moved_bytes, 0, "{report:?}");
    assert_eq!(report.pending_moves, 0, "{report:?}");
    assert!(report.log.is_empty(), "nothing to move: {report:?}");
    assert_eq!(report.config.window_ms, 1000);

    // The same through `ray numa ...`.
    let vms: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["numa", "vms", "-o", "json"])).unwrap();
    let row = &vms[0];
    assert_eq!(row["id"], vm.id.as_str(), "{vms}");
    assert_eq!(
        row["binding"],
        serde_json::json!(["0->0(bind)", "1->0(bind)"])
    );
    assert_eq!(row["locality"], 1.0, "{row}");
    assert_eq!(
        (row["attribution"].as_bool(), row["migration"].as_str()),
        (Some(true), Some("dry-run"))
    );
    assert!(row["node_writes"][1].as_u64().unwrap() >= 2048, "{row}");
    let explained = env.ray_ok(&["numa", "explain", &vm.id]);
    assert!(
        explained.contains(&format!(
            "  VM {}: 0x4400000 (+2.0 MiB) stays on host node 0",
            vm.id
        )) || windows(&vm) > w1 + 1,
        "the window's decisions (unless a later window replaced them): {explained}"
    );
    assert!(
        explained.contains("migration policy: DryRun, window 1000 ms"),
        "{explained}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["numa", "status", "--json"])).unwrap();
    assert_eq!(
        (
            status["vms_with_attribution"].as_u64(),
            status["vms_with_migration"].as_u64()
        ),
        (Some(1), Some(1)),
        "{status}"
    );
    let nodes: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["numa", "nodes", "-o", "json"])).unwrap();
    assert_eq!(nodes[0]["id"], 0, "{nodes}");
}

#[test]
fn the_policy_without_attribution_or_nodes_is_refused() {
    let env = Env::new("numa-policy-refused");
    let refused = |args: &[&str], want: &str| {
        let mut all = vec!["vm", "run", "--detach"];
        all.extend_from_slice(args);
        let out = env.ray(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    refused(
        &["--numa", "node=0,cpus=0,memory=64M", "--numa-migrate", "on"],
        "numa_migration: it needs numa_attribution ring (--numa-attribution ring)",
    );
    refused(
        &["--numa-attribution", "ring", "--numa-migrate", "dry-run"],
        "numa_migration: it needs guest NUMA nodes",
    );
    refused(
        &["--numa-attribution", "ring", "--numa-migrate", "sometimes"],
        "'sometimes' in --numa-migrate 'sometimes' is not off, dry-run or on",
    );
    refused(
        &["--numa-attribution", "rings"],
        "'rings' is not ring or off",
    );
}

/// `PUT /vm/numa/policy` (`ray numa policy VM ...`) on a running VM: a VM started with the
/// policy off gets it in dry run, bad values are refused before anything changes, the
/// attribution cannot change, the per-VM off switch stops the windows, and each change
/// is in the decision log.
#[test]
fn a_running_vms_policy_changes_at_run_time_and_the_log_records_each_change() {
    let env = Env::new("numa-policy-put");
    let mut vm = env.boot(&TWO_NODES);
    vm.expect_line("ready", READY);
    assert!(vm.info().numa_migration.is_none(), "off since boot");

    // Off -> dry run with a 500 ms window.
    let out = env.ray_ok(&[
        "numa",
        "policy",
        &vm.id,
        "--migrate",
        "dry-run",
        "--window",
        "500ms",
    ]);
    let changed = format!(
        "VM {}: policy changed by the API: mode off -> dry-run, window 5000 ms -> 500 ms",
        vm.id
    );
    assert!(
        out.contains("migration policy dry-run, window 500 ms"),
        "{out}"
    );
    assert!(out.contains(&changed), "{out}");
    let info = vm.wait_for("two windows", Duration::from_secs(20), |i| {
        i.numa_migration.as_ref().unwrap().windows >= 2
    });
    let report = info.numa_migration.unwrap();
    assert_eq!(report.log.first(), Some(&changed), "{report:?}");
    let cfg = info.config.expect("a config").numa_migration;
    assert_eq!(
        (cfg.mode, cfg.window_ms),
        (NumaMigrationMode::DryRun, 500),
        "the VM's configuration follows"
    );
    // A window in the new mode decides about vCPU 1's writes.
    vm.command("touch 1 0x4400000 2097152", "touch cpu=1");
    let head = format!("VM {}: 0x4400000 (+2.0 MiB) stays on host node 0", vm.id);
    vm.wait_for("the touch's decision", Duration::from_secs(20), |i| {
        let r = i.numa_migration.as_ref().unwrap();
        r.last_window.iter().any(|l| l.starts_with(&head))
    });

    // Bad values are refused, naming them, and change nothing.
    let refused = |args: &[&str], want: &str| {
        let mut all = vec!["numa", "policy", vm.id.as_str()];
        all.extend_from_slice(args);
        let out = env.ray(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was taken");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    refused(
        &["--migrate", "on", "--window", "50ms"],
        "window_ms 50 is shorter than 100",
    );
    refused(
        &["--rate", "0"],
        "rate_limit_mib_s 0 is not a positive number",
    );
    refused(
        &["--attribution", "off"],
        "this VM runs with attribution ring, which cannot change while it runs",
    );
    refused(
        &["--migrate", "sideways"],
        "'sideways' is not off, dry-run or on",
    );
    refused(&[], "nothing to change");
    let a = vm
        .client
        .raw(
            "PUT",
            "/vm/numa/policy",
            Some(br#"{"mode":"on","window":3}"#.to_vec()),
        )
        .unwrap();
    assert_eq!(a.status, 400, "{:?}", String::from_utf8_lossy(&a.body));
    assert!(
        String::from_utf8_lossy(&a.body).contains("window"),
        "unknown field named"
    );
    let report = vm.info().numa_migration.unwrap();
    assert_eq!(
        (report.config.mode, report.config.window_ms),
        (NumaMigrationMode::DryRun, 500),
        "nothing changed: {report:?}"
    );
    assert_eq!(report.log, vec![changed.clone()], "only the first change");

    // The off switch: the windows stop (one already under way may still close).
    let out = env.ray_ok(&["numa", "policy", &vm.id, "--migrate", "off"]);
    assert!(out.contains("migration policy off"), "{out}");
    let w = vm.info().numa_migration.unwrap().windows;
    std::thread::sleep(Duration::from_millis(2000));
    let report = vm.info().numa_migration.unwrap();
    assert!(
        report.windows <= w + 1,
        "{} windows after {w}: {report:?}",
        report.windows
    );
    assert_eq!(
        report.log.last().map(String::as_str),
        Some(
            format!(
                "VM {}: policy changed by the API: mode dry-run -> off",
                vm.id
            )
            .as_str()
        )
    );
    assert_eq!(
        vm.info().config.unwrap().numa_migration.mode,
        NumaMigrationMode::Off
    );
    // And back on: windows resume.
    env.ray_ok(&["numa", "policy", &vm.id, "--migrate", "dry-run"]);
    let w = vm.info().numa_migration.unwrap().windows;
    vm.wait_for("windows again", Duration::from_secs(20), |i| {
        i.numa_migration.as_ref().unwrap().windows > w
    });
}

/// A VM without guest nodes has nothing for the policy to act on: refused at run time
/// as at boot.
#[test]
fn a_policy_for_a_vm_without_guest_nodes_is_refused_at_run_time() {
    let env = Env::new("numa-policy-put-refused");
    let mut vm = env.boot(&["--numa-attribution", "ring"]);
    vm.expect_line("ready", READY);
    let out = env.ray(&["numa", "policy", &vm.id, "--migrate", "dry-run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("it needs guest NUMA nodes (--numa)"), "{err}");
    assert!(vm.info().numa_migration.is_none());
}

/// The host-level NUMA API: `ray agent` serves `GET /numa/nodes`, `/numa/vms` and
/// `/numa/status` over every live VM on its host, the same as `ray numa ... -o json`.
#[test]
fn the_agent_serves_the_hosts_numa_nodes_and_each_vms_numa() {
    let env = Env::new("numa-agent-api");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = rt.block_on(ray_cluster::testing::Etcd::start("e2e-numa-agent"));
    let mut args = TWO_NODES.to_vec();
    args.extend(["--numa-migrate", "dry-run,window=1s"]);
    let mut vm = env.boot(&args);
    vm.expect_line("ready", READY);
    vm.command("touch 1 0x4400000 2097152", "touch cpu=1");

    let log = std::fs::File::create(env.runtime.join("agent.log")).unwrap();
    let url = etcd.endpoints().join(",");
    let mut agent = std::process::Command::new(ray_e2e::ray_bin())
        .args(["agent", "--host", "h1", "--etcd", &url])
        .env("RAY_RUNTIME_DIR", &env.runtime)
        .env("RAY_GUEST", ray_e2e::guest_bin())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("cannot start ray agent");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Kill(&mut agent);
    let api = ray::client::VmmClient::new(&env.runtime.join("agent/api.sock"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let nodes: serde_json::Value = loop {
        match api.call("GET", "/numa/nodes", None) {
            Ok(v) => break v,
            Err(e) => {
                let log = std::fs::read_to_string(env.runtime.join("agent.log"));
                assert!(
                    std::time::Instant::now() < deadline,
                    "the agent's API did not answer: {e}; {log:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    // The same nodes as this host's sysfs says (and `ray numa nodes`).
    let mut online: Vec<u64> = std::fs::read_dir("/sys/devices/system/node")
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("node")?.parse().ok()
        })
        .collect();
    online.sort_unstable();
    let ids: Vec<u64> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, online, "{nodes}");
    assert!(nodes[0]["memory_total"].as_u64().unwrap() > 0, "{nodes}");
    let cli: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["numa", "nodes", "-o", "json"])).unwrap();
    assert_eq!(cli[0]["id"], nodes[0]["id"]);
    assert_eq!(cli[0]["cpus"], nodes[0]["cpus"]);
    assert_eq!(cli[0]["distances"], nodes[0]["distances"]);

    // The VM: its binding, locality, writes by guest node and policy.
    let vms: serde_json::Value = api.call("GET", "/numa/vms", None).unwrap();
    let row = &vms[0];
    assert_eq!(row["id"], vm.id.as_str(), "{vms}");
    assert_eq!(
        row["binding"],
        serde_json::json!(["0->0(bind)", "1->0(bind)"])
    );
    assert_eq!(row["locality"], 1.0, "{row}");
    assert_eq!(row["attribution"], true, "{row}");
    assert_eq!(row["migration"], "dry-run", "{row}");
    assert!(row["node_writes"][1].as_u64().unwrap() >= 512, "{row}");
    let status: serde_json::Value = api.call("GET", "/numa/status", None).unwrap();
    assert_eq!(
        (
            status["vms"].as_u64(),
            status["vms_with_guest_nodes"].as_u64(),
            status["vms_with_migration"].as_u64(),
            status["nodes"].as_u64()
        ),
        (Some(1), Some(1), Some(1), Some(online.len() as u64)),
        "{status}"
    );
    // DAMON as this host's sysfs says: present or not, and why no kdamond is free.
    let damon = &status["damon"];
    let present = std::path::Path::new("/sys/kernel/mm/damon/admin/kdamonds").exists();
    assert_eq!(damon["present"], present, "{status}");
    if present {
        let on = damon["kdamonds_on"].as_u64().unwrap();
        let all = damon["kdamonds"].as_u64().unwrap();
        assert!(on <= all, "{damon}");
        assert_eq!(
            damon["unavailable"].is_string(),
            on == all,
            "a reason exactly when no kdamond is idle: {damon}"
        );
    }
    // A policy change shows in the host view.
    env.ray_ok(&["numa", "policy", &vm.id, "--migrate", "off"]);
    let vms: serde_json::Value = api.call("GET", "/numa/vms", None).unwrap();
    assert_eq!(vms[0]["migration"], "off", "{vms}");
}
