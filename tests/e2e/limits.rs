//! vCPU limits: the VMM's own (254), and a guest that supports fewer vCPUs than it is given.
use std::time::Duration;

use ray_api::vmm::VmInfo;
use ray_e2e::Env;

/// Generous: 70 or 254 vCPU threads share this machine's 2 host CPUs.
const READY: Duration = Duration::from_secs(30);

/// The vCPU threads of VMM `pid` (each is named `vcpu<i>`).
fn vcpu_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|t| {
            let comm = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|c| c.starts_with("vcpu"))
        })
        .count()
}

/// Boots `vcpus` (more than rayvisor's guest supports) and checks that the guest says so,
/// runs on the vCPUs it supports and still answers its shell.
fn boot_beyond_the_guest(name: &str, vcpus: usize) {
    let supported = ray_guest_abi::MAX_CPUS;
    assert!(vcpus > supported);
    let env = Env::new(name);
    let n = vcpus.to_string();
    let out = env.ray(&["vm", "run", "--detach", "--json", "--vcpus", &n]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("more than this host's KVM allows") {
        // The VMM's refusal names the host's numbers; nothing to boot here.
        eprintln!("skipped: {stderr}");
        return;
    }
    let info: VmInfo = serde_json::from_str(&ray_e2e::succeeded(out, "ray vm run"))
        .expect("vm run --json prints VmInfo");
    let mut vm = env.attach(&info.id, info.pid);
    let line = vm.expect_line("rayvisor-guest: ", READY);
    let prefix = format!(
        "rayvisor-guest: {vcpus} vCPUs offered, this kernel supports {supported}; running on "
    );
    let running: usize = line
        .strip_prefix(&prefix)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line:?} is not {prefix:?}<n>"));
    // The boot CPU waits at most 200 ms for the others before it prints this: on a loaded
    // host a few may come online just after.
    assert!((1..=supported).contains(&running), "{line}");
    vm.expect_line("ready", READY);
    assert_eq!(
        vcpu_threads(vm.pid),
        vcpus,
        "the VMM runs every vCPU it was given"
    );

    let want = format!("cpus online={supported} ");
    let deadline = std::time::Instant::now() + READY;
    let cpus = loop {
        let line = vm.command("cpus", "cpus ");
        if line.starts_with(&want) || std::time::Instant::now() > deadline {
            break line;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(cpus.starts_with(&want), "{cpus}");
    let info = vm.info();
    assert_eq!(info.config.map(|c| usize::from(c.vcpus)), Some(vcpus));
    let hb = info.heartbeat.expect("heartbeat");
    assert_eq!(hb.cpus_online as usize, supported);
    assert_eq!(vm.command("echo still-here", "still-"), "still-here");
}

#[test]
fn seventy_vcpus_boot_and_the_guest_runs_on_the_64_it_supports() {
    boot_beyond_the_guest("vcpus70", 70);
}

#[test]
fn the_vmms_limit_of_254_vcpus_boots() {
    boot_beyond_the_guest("vcpus254", 254);
}

#[test]
fn more_than_254_vcpus_are_refused_with_the_vmms_limit() {
    let env = Env::new("vcpus255");
    let out = env.ray(&["vm", "run", "--detach", "--vcpus", "255"]);
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("vcpus must be between 1 and 254, got 255"),
        "{stderr}"
    );
}
