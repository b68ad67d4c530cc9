//! Lifecycle: pause/resume with the heartbeat, stop, guest power-off, events, dead VMMs.
use std::time::Duration;

use ray_api::vmm::{LifecycleEvent, VmStateName};
use ray_e2e::Env;

const READY: Duration = Duration::from_secs(20);

fn heartbeat(vm: &ray_e2e::Vm) -> (u64, u64) {
    let hb = vm.info().heartbeat.expect("the guest keeps a heartbeat");
    (hb.counter, hb.time_ns)
}

#[test]
fn pause_stops_the_heartbeat_and_resume_continues_it() {
    let env = Env::new("pause");
    let mut vm = env.boot(&["--vcpus", "2"]);
    vm.expect_line("ready", READY);
    let (c0, _) = heartbeat(&vm);
    // An idle guest beats at least every 50 ms (asleep in hlt between deadlines).
    vm.wait_for("the heartbeat to move", Duration::from_secs(5), |i| {
        i.heartbeat.as_ref().is_some_and(|h| h.counter > c0)
    });
    let (_, t1) = heartbeat(&vm);

    let out = env.ray_ok(&["vm", "pause", &vm.id, "--json"]);
    assert!(out.contains("\"state\": \"paused\""), "{out}");
    let (p0, pt0) = heartbeat(&vm);
    std::thread::sleep(Duration::from_millis(300));
    let (p1, pt1) = heartbeat(&vm);
    assert_eq!(p0, p1, "heartbeat moved while paused");
    assert_eq!(pt0, pt1);
    let cpus = vm.info().heartbeat.unwrap().per_cpu_counter;
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        cpus,
        vm.info().heartbeat.unwrap().per_cpu_counter,
        "an AP ran while paused"
    );

    // Pausing again is refused, naming the state, and changes nothing.
    let again = env.ray(&["vm", "pause", &vm.id]);
    assert_eq!(again.status.code(), Some(4));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("cannot pause a VM that is paused"), "{err}");
    assert_eq!(vm.state(), VmStateName::Paused);

    env.ray_ok(&["vm", "resume", &vm.id]);
    let info = vm.wait_for("heartbeat to move", Duration::from_secs(5), |i| {
        i.heartbeat.as_ref().is_some_and(|h| h.counter > p1)
    });
    assert_eq!(info.state, VmStateName::Running);
    let (_, t2) = heartbeat(&vm);
    // Guest time (kvmclock) keeps flowing across a pause, as wall-clock time does.
    let gap_ms = (t2 - t1) as f64 / 1e6;
    eprintln!("guest time across a 400 ms pause advanced {gap_ms:.1} ms");
    assert!(gap_ms >= 300.0, "guest clock advanced only {gap_ms} ms");
    assert_eq!(vm.command("echo alive", "alive"), "alive");
}

#[test]
fn stop_asks_the_guest_then_terminates() {
    let env = Env::new("stop");
    let mut vm = env.boot(&[]);
    vm.expect_line("ready", READY);
    let out = env.ray_ok(&["vm", "stop", &vm.id, "--json"]);
    assert!(out.contains("\"state\": \"terminated\""), "{out}");
    assert!(
        out.contains("guest:poweroff"),
        "the guest should have powered off on request: {out}"
    );
    vm.wait_exit(Duration::from_secs(5));
    // The audit trail outlives the VMM.
    let events: Vec<LifecycleEvent> =
        serde_json::from_str(&env.ray_ok(&["vm", "events", &vm.id, "--json"])).unwrap();
    let path: Vec<_> = events.iter().map(|e| (e.from, e.to)).collect();
    assert_eq!(
        path,
        vec![
            (VmStateName::Created, VmStateName::Created),
            (VmStateName::Created, VmStateName::Running),
            (VmStateName::Running, VmStateName::Terminated),
        ],
        "{events:?}"
    );
    let list = env.ray_ok(&["vm", "list"]);
    assert!(list.contains("terminated"), "{list}");
}

#[test]
fn forced_stop_with_zero_timeout() {
    let env = Env::new("forcestop");
    let mut vm = env.boot(&[]);
    vm.expect_line("ready", READY);
    let out = env.ray_ok(&["vm", "stop", &vm.id, "--timeout-ms", "0", "--json"]);
    assert!(out.contains("\"state\": \"terminated\""), "{out}");
    assert!(out.contains("api:stop"), "{out}");
    vm.wait_exit(Duration::from_secs(5));
}

#[test]
fn guest_poweroff_terminates_the_vm() {
    let env = Env::new("poweroff");
    let mut vm = env.boot(&[]);
    vm.expect_line("ready", READY);
    vm.send("poweroff");
    vm.wait_exit(Duration::from_secs(10));
    let status = env.ray(&["vm", "status", &vm.id]);
    assert_eq!(
        status.status.code(),
        Some(4),
        "an ended VM is reported as such"
    );
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(
        err.contains("has ended (terminated: guest:poweroff)"),
        "{err}"
    );
    let events = std::fs::read_to_string(vm.dir.join("events.jsonl")).unwrap();
    assert!(
        events
            .lines()
            .last()
            .unwrap()
            .contains("\"cause\":\"guest:poweroff\""),
        "{events}"
    );
}

#[test]
fn killed_vmm_is_listed_as_dead() {
    let env = Env::new("dead");
    let mut vm = env.boot(&[]);
    vm.expect_line("ready", READY);
    // SAFETY: kill(2) of the VMM this test started.
    unsafe {
        libc::kill(vm.pid as libc::pid_t, libc::SIGKILL);
    }
    vm.wait_exit(Duration::from_secs(5));
    let list: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["vm", "list", "--json"])).unwrap();
    assert_eq!(list[0]["state"], "dead", "{list}");
    let status = env.ray(&["vm", "status", &vm.id]);
    assert_eq!(status.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&status.stderr).contains("is dead"));
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    let env = Env::new("sigterm");
    let mut vm = env.boot(&[]);
    vm.expect_line("ready", READY);
    // SAFETY: kill(2) of the VMM this test started.
    unsafe {
        libc::kill(vm.pid as libc::pid_t, libc::SIGTERM);
    }
    vm.wait_exit(Duration::from_secs(5));
    let record = std::fs::read_to_string(vm.dir.join("exit.json")).unwrap();
    assert!(record.contains("\"state\": \"terminated\""), "{record}");
    assert!(record.contains("signal:15"), "{record}");
    assert!(!vm.dir.join("api.sock").exists(), "socket left behind");
}

#[test]
fn suspend_releases_memory_and_resume_continues() {
    let env = Env::new("suspend");
    let mut vm = env.boot(&["--memory", "256M"]);
    vm.expect_line("ready", READY);
    let on = vm.command("dirty 8 4000", "dirty on");
    let region = on
        .split_whitespace()
        .find_map(|w| w.strip_prefix("region="))
        .unwrap_or_else(|| panic!("{on}"))
        .to_string();
    std::thread::sleep(Duration::from_millis(200));
    vm.command("dirty stop", "dirty off");
    let sum_cmd = format!("sum {region} {}", 8 << 20);
    let before = vm.command(&sum_cmd, "sum ");
    let (c0, _) = heartbeat(&vm);
    let out = env.ray_ok(&["vm", "suspend", &vm.id, "--json"]);
    assert!(out.contains("\"state\": \"suspended\""), "{out}");
    let info = vm.info();
    assert!(
        info.heartbeat.is_none(),
        "a suspended VM has no memory to read"
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vm.pid)).unwrap();
    assert!(
        !maps.contains("ray-guest-ram"),
        "guest RAM still mapped while suspended"
    );
    assert!(vm.dir.join("suspended/memory.raw").is_file());
    // Pausing a suspended VM is refused, naming the state.
    let err = env.ray(&["vm", "pause", &vm.id]);
    assert!(String::from_utf8_lossy(&err.stderr).contains("cannot pause a VM that is suspended"));
    env.ray_ok(&["vm", "resume", &vm.id]);
    let info = vm.wait_for("heartbeat after resume", Duration::from_secs(5), |i| {
        i.heartbeat.as_ref().is_some_and(|h| h.counter > c0)
    });
    assert_eq!(info.state, VmStateName::Running);
    assert_eq!(
        vm.command(&sum_cmd, "sum "),
        before,
        "memory changed across suspend/resume"
    );
    assert!(
        !vm.dir.join("suspended").exists(),
        "the suspend image is removed after resume"
    );
    let events = env.ray_ok(&["vm", "events", &vm.id]);
    assert!(
        events.contains("api:suspend") && events.contains("suspended"),
        "{events}"
    );
}
