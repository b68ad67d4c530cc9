//! Guest NUMA on this (one-node) host: two guest nodes bound to host node 0, what the
//! guest reads from the SRAT/SLIT, the memory policy and vCPU pinning the VMM applied,
//! both again after a snapshot restore, and refusals of bindings that cannot work.
use std::time::Duration;

use ray_e2e::{Env, Vm};

const READY: Duration = Duration::from_secs(20);
const TWO_NODES: [&str; 6] = [
    "--vcpus",
    "2",
    "--numa",
    "node=0,cpus=0,memory=64M,host-node=0",
    "--numa",
    "node=1,cpus=1,memory=64M,host-node=0,policy=preferred",
];

/// The guest's `numa` output, line by line.
fn guest_numa(vm: &mut Vm) -> Vec<String> {
    vm.send("numa");
    let mut lines = vec![vm.expect_line("numa nodes=", Duration::from_secs(5))];
    for prefix in [
        "numa node=0",
        "numa node=1",
        "numa distances node=0",
        "numa distances node=1",
    ] {
        lines.push(vm.expect_line(prefix, Duration::from_secs(5)));
    }
    lines
}

/// The memory policies of the VMM's guest RAM mappings (`bind:0`, `prefer:0`, ...), from
/// /proc/PID/numa_maps.
fn guest_ram_policies(pid: u32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/numa_maps")).unwrap();
    maps.lines()
        // Guest RAM is a memfd, or after a restore without userfaultfd (a jailed VMM has
        // no CAP_SYS_PTRACE) a private mapping of the snapshot's memory file.
        .filter(|l| l.contains("memfd:ray-guest-ram") || l.contains("/memory.raw"))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// The CPUs each vCPU thread of VMM `pid` may run on, by thread name.
fn vcpu_affinity(pid: u32, name: &str) -> String {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap();
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_string();
        }
    }
    panic!("VMM {pid} has no thread {name}");
}

fn check_placement(vm: &mut Vm) {
    assert_eq!(
        guest_numa(vm),
        vec![
            "numa nodes=2",
            "numa node=0 cpus=0 memory=67108864 ranges=0x0-0x4000000",
            "numa node=1 cpus=1 memory=67108864 ranges=0x4000000-0x8000000",
            // Both on host node 0 (distance 10): the SLIT says 20, as ACPI wants more
            // than 10 between distinct nodes.
            "numa distances node=0 10,20",
            "numa distances node=1 20,10",
        ]
    );
    let mut policies = guest_ram_policies(vm.pid);
    policies.sort();
    assert_eq!(
        policies,
        vec!["bind:0", "prefer:0"],
        "one memfd mapping per node"
    );
    // Both nodes' pages the guest touched are on host node 0 (the second node's first
    // MiB is read here, so it has some).
    vm.sum(0x400_0000, 1 << 20);
    let status = vm.info().numa;
    assert_eq!(status.len(), 2, "{status:?}");
    for n in &status {
        assert_eq!(n.host_nodes, vec![0], "{n:?}");
        assert!(n.present_pages > 0 && n.sampled_pages <= 4096, "{n:?}");
        assert_eq!(n.local_pages, n.present_pages, "{n:?}");
        assert_eq!(n.locality, Some(1.0), "{n:?}");
    }
    let node0 = std::fs::read_to_string("/sys/devices/system/node/node0/cpulist").unwrap();
    for v in ["vcpu0", "vcpu1"] {
        assert_eq!(vcpu_affinity(vm.pid, v), node0.trim(), "{v}");
    }
}

#[test]
fn two_guest_nodes_are_described_bound_and_pinned_and_survive_a_restore() {
    let env = Env::new("numa-two");
    let mut vm = env.boot(&TWO_NODES);
    vm.expect_line("ready", READY);
    check_placement(&mut vm);
    let config = env.ray_ok(&["vm", "config", &vm.id, "-o", "json"]);
    assert!(config.contains("\"host_nodes\""), "{config}");

    // Memory in the second node's range holds what the guest wrote across a restore.
    let before = vm.sum(0x400_0000, 1 << 20);
    let mut back = env.snapshot_and_restore(&vm, "snap-numa", "back");
    assert_eq!(back.sum(0x400_0000, 1 << 20), before);
    check_placement(&mut back);
}

#[test]
fn nodes_without_a_host_node_are_placed_and_the_log_says_where() {
    let env = Env::new("numa-auto");
    let mut vm = env.boot(&[
        "--numa",
        "node=0,cpus=0,memory=64M",
        "--numa",
        "node=1,cpus=1,memory=64M,policy=interleave",
    ]);
    vm.expect_line("ready", READY);
    // Where the VMM says it placed each node is where the memory policy points.
    let log = std::fs::read_to_string(vm.dir.join("vmm.log")).unwrap();
    let placed = |node: u32, policy: &str| {
        let at = format!("guest node {node}: 67108864 bytes on host nodes ");
        let rest = &log[log.find(&at).unwrap_or_else(|| panic!("{at} in {log}")) + at.len()..];
        let host = rest.split_whitespace().next().unwrap().to_string();
        assert!(
            rest.starts_with(&format!("{host} ({policy}), vCPUs [{node}]")),
            "{rest}"
        );
        host
    };
    let (h0, h1) = (placed(0, "bind"), placed(1, "interleave"));
    let mut policies = guest_ram_policies(vm.pid);
    policies.sort();
    assert_eq!(
        policies,
        vec![format!("bind:{h0}"), format!("interleave:{h1}")]
    );
    // The guest was told two nodes, whatever the host has.
    assert_eq!(guest_numa(&mut vm)[0], "numa nodes=2");
}

#[test]
fn impossible_bindings_are_refused_before_anything_starts() {
    let env = Env::new("numa-refused");
    let refused = |args: &[&str], want: &str| {
        let mut all = vec!["vm", "run", "--detach"];
        all.extend_from_slice(args);
        let out = env.ray(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    refused(
        &["--numa", "node=0,cpus=0,memory=64M,host-node=999"],
        "guest node 0: host node 999 does not exist (this host's nodes: 0",
    );
    refused(
        &["--vcpus", "2", "--numa", "node=0,cpus=0-2,memory=64M"],
        "guest node 0: vCPU 2 does not exist (the VM has vCPUs 0-1)",
    );
    refused(
        &["--vcpus", "2", "--numa", "node=0,cpus=0,memory=64M"],
        "vCPUs 1 are in no guest node",
    );
    refused(
        &["--memory", "256M", "--numa", "node=0,cpus=0,memory=64M"],
        "the guest nodes' memory adds up to 67108864 bytes, but the VM has 268435456",
    );
    refused(
        &["--numa", "node=0,cpus=0,memory=1T,host-node=0"],
        "bound to host nodes 0 do not fit",
    );
    refused(
        &["--numa", "node=0,cpus=0,memory=64M,policy=fast"],
        "policy 'fast'",
    );
    // Nothing was left behind by the refusals.
    let vms = env.ray_ok(&["vm", "list", "-o", "json"]);
    assert_eq!(vms.trim(), "[]", "{vms}");
}

#[test]
fn a_migrated_vm_keeps_its_nodes_and_the_target_binds_them() {
    let env = Env::new("numa-migrate");
    let mut src = env.boot(&TWO_NODES);
    src.expect_line("ready", READY);
    let before = src.sum(0x400_0000, 1 << 20);
    // A target not told the VM's shape allocates the source's node-split layout.
    let mut dst = env.migrate_here(&src, "there");
    dst.wait_for(
        "the VM to run on the target",
        Duration::from_secs(10),
        |i| i.state == ray_api::vmm::VmStateName::Running,
    );
    assert_eq!(dst.sum(0x400_0000, 1 << 20), before);
    check_placement(&mut dst);
}
