//! virtio-net on a TAP inside a network namespace the test creates: the namespace pings
//! the guest, a UDP echo round trip, the guest pings the namespace; after a snapshot
//! restore and a live migration too; bad `--net` arguments are refused.
use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::time::Duration;

use ray::netns::Netns;
use ray_e2e::{Env, Vm};

const READY: Duration = Duration::from_secs(20);
const HOST: &str = "10.77.0.1";
const GUEST: &str = "10.77.0.2";

/// A namespace with TAP `rt0` at 10.77.0.1/24.
fn netns(name: &str) -> Netns {
    let ns = Netns::new(&format!("ray-e2e-{name}-{}", std::process::id())).unwrap();
    ns.add_tap("rt0", &format!("{HOST}/24")).unwrap();
    ns
}

fn boot(env: &Env, ns: &Netns) -> Vm {
    let net = format!("tap=rt0,netns={}", ns.name);
    let cmdline = format!("console=ttyS0 ray.poll_ms=0 ray.ip={GUEST}/24");
    let mut vm = env.boot(&["--net", &net, "--cmdline", &cmdline]);
    vm.expect_line("ready", READY);
    vm
}

/// What `/proc/PID/ns/net` of a process in `ns` reads.
fn netns_link(ns: &Netns) -> String {
    let ino = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(format!("/run/netns/{}", ns.name)).unwrap(),
    );
    format!("net:[{ino}]")
}

/// `ping -c n` from the namespace; asserts every reply came.
fn ping_guest(ns: &Netns, n: u32) {
    let out = ns
        .command("ping")
        .args(["-c", &n.to_string(), "-i", "0.05", "-W", "2", GUEST])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping failed: {text}");
    assert!(
        text.contains(&format!("{n} packets transmitted, {n} received")),
        "{text}"
    );
}

/// A UDP datagram to the guest's echo port comes back unchanged.
fn udp_echo(ns: &Netns, payload: Vec<u8>) {
    let back = ns
        .run(move || {
            let s = UdpSocket::bind((HOST, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(&payload, (GUEST, 7)).unwrap();
            let mut buf = [0u8; 2048];
            let (n, from) = s.recv_from(&mut buf).expect("no UDP echo from the guest");
            assert_eq!(from.to_string(), format!("{GUEST}:7"));
            (buf[..n].to_vec(), payload)
        })
        .unwrap();
    assert_eq!(back.0, back.1);
}

fn guest_pings_host(vm: &mut Vm) {
    let line = vm.command(&format!("net ping {HOST} 3"), "net ping");
    assert!(line.starts_with("net ping replies=3/3"), "{line}");
}

fn counters(vm: &mut Vm) -> BTreeMap<String, String> {
    let line = vm.command("net", "net ");
    line.split_whitespace()
        .skip(1)
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Everything the network of a running guest should do.
fn check_all(vm: &mut Vm, ns: &Netns) {
    ping_guest(ns, 3);
    udp_echo(ns, b"hello from the namespace".to_vec());
    udp_echo(ns, vec![0xa5; 1400]);
    guest_pings_host(vm);
}

#[test]
fn net_namespace_and_guest_reach_each_other_over_a_tap() {
    let env = Env::new("net");
    let ns = netns("net");
    let mut vm = boot(&env, &ns);
    let c = counters(&mut vm);
    assert_eq!(c["ip"], format!("{GUEST}/24"));
    assert!(c["mac"].starts_with("02:"), "{c:?}");
    check_all(&mut vm, &ns);

    // Exits per packet: 20 pings (40 packets through the device).
    let e0 = vm.exits_total();
    ping_guest(&ns, 20);
    let e1 = vm.exits_total();
    eprintln!("exits per packet (ping): {:.2}", (e1 - e0) as f64 / 40.0);
    let c = counters(&mut vm);
    assert!(c["rx"].parse::<u64>().unwrap() >= 25, "{c:?}");
    assert_eq!(c["echoed"], "2", "{c:?}");

    // The guest's shell refuses bad arguments; the NIC goes on working.
    let bad = vm.command("net ping 10.77.0", "err");
    assert!(bad.contains("not an IPv4 address"), "{bad}");
    let bad = vm.command("net ping 10.99.0.1", "err");
    assert!(bad.contains("not on this NIC's subnet"), "{bad}");
    ping_guest(&ns, 1);
}

#[test]
fn net_works_after_snapshot_restore() {
    let env = Env::new("net-snap");
    let ns = netns("net-snap");
    let mut vm = boot(&env, &ns);
    check_all(&mut vm, &ns);
    let mut back = env.snapshot_and_restore(&vm, "snap-net", "net-back");
    check_all(&mut back, &ns);
}

#[test]
fn net_works_after_a_live_migration_on_the_same_tap() {
    let env = Env::new("net-mig");
    let ns = netns("net-mig");
    let mut src = boot(&env, &ns);
    check_all(&mut src, &ns);
    // The target opens the same TAP while the source still holds it: its queue stays
    // detached until it resumes.
    // Jailed as by default, the target has a network namespace of its own: its keeper
    // opens the TAP in the test's namespace (with the VM's uid's rights).
    let mut dst = env.migrate_here_with(&src, "net-dst", &[]);
    check_all(&mut dst, &ns);
}

/// A jailed VMM runs in its NICs' network namespace (not a private one): the TAP that
/// exists is used as it is, a missing one is made for the VM's uid by the jail's keeper
/// and goes when the VM ends.
#[test]
fn net_works_from_a_jailed_vmm_in_its_taps_namespace() {
    let env = Env::new("net-jail");
    let ns = netns("net-jail");
    let existing = format!("tap=rt0,netns={}", ns.name);
    let made = format!("tap=rjt1,netns={}", ns.name);
    let cmdline = format!("console=ttyS0 ray.poll_ms=0 ray.ip={GUEST}/24");
    let mut vm = env.boot(&[
        "--jail",
        "--net",
        &existing,
        "--net",
        &made,
        "--cmdline",
        &cmdline,
    ]);
    vm.expect_line("ready", READY);
    let uids = ray_e2e::process_uids(vm.pid);
    assert!(!uids.contains(&0), "the VMM is jailed: uids {uids:?}");
    let theirs = std::fs::read_link(format!("/proc/{}/ns/net", vm.pid)).unwrap();
    assert_eq!(theirs.display().to_string(), netns_link(&ns));
    check_all(&mut vm, &ns);
    // The TAP the keeper made belongs to the VM's uid while it runs.
    let owner = || {
        let out = ns
            .command("cat")
            .arg("/sys/class/net/rjt1/owner")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(owner(), uids[0].to_string());
    env.ray_ok(&["vm", "stop", &vm.id, "--timeout-ms", "0"]);
    vm.wait_exit(Duration::from_secs(10));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ns.ip(&["link", "show", "rjt1"]).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "TAP rjt1 outlived the VM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ns.ip(&["link", "show", "rt0"])
        .expect("the TAP that was there stays");
}

/// A jailed VMM whose NICs are in two network namespaces runs in one of its own, and its
/// keeper opens each TAP in its namespace (both are called `rt0` here): the guest's network
/// works from the first namespace, and each TAP has its carrier (a queue attached) while
/// the VM runs and loses it after.
#[test]
fn a_jailed_vmm_with_nics_in_two_namespaces_gets_each_tap_in_its_own() {
    let env = Env::new("net-2ns");
    let a = netns("net-2ns-a");
    let b = Netns::new(&format!("ray-e2e-net-2ns-b-{}", std::process::id())).unwrap();
    b.add_tap("rt0", "10.78.0.1/24").unwrap();
    let nic = |ns: &Netns| format!("tap=rt0,netns={}", ns.name);
    let cmdline = format!("console=ttyS0 ray.poll_ms=0 ray.ip={GUEST}/24");
    let mut vm = env.boot(&[
        "--jail",
        "--net",
        &nic(&a),
        "--net",
        &nic(&b),
        "--cmdline",
        &cmdline,
    ]);
    vm.expect_line("ready", READY);
    let uids = ray_e2e::process_uids(vm.pid);
    assert!(!uids.contains(&0), "the VMM is jailed: uids {uids:?}");
    let net_of = |path: String| std::fs::read_link(path).unwrap().display().to_string();
    let theirs = net_of(format!("/proc/{}/ns/net", vm.pid));
    for other in [
        net_of("/proc/self/ns/net".into()),
        netns_link(&a),
        netns_link(&b),
    ] {
        assert_ne!(theirs, other, "the VMM has a network namespace of its own");
    }
    check_all(&mut vm, &a);
    let carrier = |ns: &Netns| {
        let out = ns
            .command("ip")
            .args(["-o", "link", "show", "rt0"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{text}");
        !text.contains("NO-CARRIER") && text.contains("LOWER_UP")
    };
    assert!(carrier(&a) && carrier(&b), "both TAPs attached");
    env.ray_ok(&["vm", "stop", &vm.id, "--timeout-ms", "0"]);
    vm.wait_exit(Duration::from_secs(10));
    assert!(!carrier(&a) && !carrier(&b), "both TAPs let go");
}

#[test]
fn bad_net_arguments_are_refused_before_a_vm_starts() {
    let env = Env::new("net-bad");
    let cases = [
        ("tap=", "tap '' is not an interface name"),
        ("tap=rt0,mac=ff:00:00:00:00:01", "multicast"),
        ("tap=rt0,rate=fast", "rate 'fast' is not a positive number"),
        ("tap=rt0,colour=red", "unknown key 'colour'"),
        (
            "tap=rt0,netns=ray-e2e-no-such-ns",
            "cannot open network namespace ray-e2e-no-such-ns",
        ),
    ];
    for (arg, want) in cases {
        let out = env.ray(&["vm", "run", "--detach", "--net", arg]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--net {arg} was accepted");
        assert!(err.contains(want), "--net {arg}: {err}");
    }
    let out = env.ray_ok(&["vm", "list", "--json"]);
    assert!(!out.contains("running"), "no VM was left running: {out}");
}
