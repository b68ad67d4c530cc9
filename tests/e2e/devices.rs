//! PCI devices: virtio-rng over virtio-pci with MSI-X, driven by the guest's own driver.
use std::collections::BTreeMap;
use std::time::Duration;

use ray_e2e::{Env, Vm};

const READY: Duration = Duration::from_secs(20);

pub(crate) fn delta(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    b.iter().map(|(k, v)| (k.clone(), v - a[k])).collect()
}

/// `rng <n>`: the hex bytes and the guest's count of device interrupts so far.
fn rng(vm: &mut Vm, n: usize) -> (String, u64) {
    let line = vm.command(&format!("rng {n}"), "rng ");
    let mut words = line.split_whitespace().skip(1);
    let hex = words.next().unwrap_or_else(|| panic!("{line}")).to_string();
    assert_eq!(hex.len(), 2 * n, "{line}");
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{line}");
    let irqs = words
        .find_map(|w| w.strip_prefix("irqs="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    (hex, irqs)
}

#[test]
fn rng_bytes_come_from_the_device_by_interrupt_without_exits_to_the_vmm() {
    let env = Env::new("rng");
    let mut vm = env.boot(&[]);
    vm.expect_line("ready", READY);

    // The first request also finds and sets up the device (PCI probing: port exits; the
    // transport's registers: MMIO exits).
    let t0 = vm.exits();
    let (a, irqs_a) = rng(&mut vm, 32);
    let t1 = vm.exits();
    let (b, irqs_b) = rng(&mut vm, 32);
    let t2 = vm.exits();
    let echo = vm.command("echo x", "x");
    assert_eq!(echo, "x");
    let t3 = vm.exits();
    let (setup, steady, baseline) = (delta(&t0, &t1), delta(&t1, &t2), delta(&t2, &t3));
    let times: Vec<String> = (0..5)
        .map(|_| vm.command("rng 32", "rng "))
        .map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("ns="))
                .unwrap_or("ns=?")
                .to_string()
        })
        .collect();
    eprintln!("request times: {times:?}");
    eprintln!("exits: first rng {setup:?}; second rng {steady:?}; echo {baseline:?}");

    assert_ne!(a, b, "two requests gave the same bytes");
    assert_ne!(a, "0".repeat(64));
    // Each request completes by one device interrupt.
    assert_eq!((irqs_a, irqs_b), (1, 2));
    assert!(setup["mmio"] > 0, "set-up reads the transport's registers");
    // The kick is an ioeventfd and the completion an irqfd: no MMIO exit reaches the VMM.
    assert_eq!(steady["mmio"], 0, "{steady:?}");
    assert_eq!(
        steady["hlt"], 0,
        "hlt stays in KVM with the in-kernel irqchip"
    );

    // Bad requests are refused by the guest's shell; the device is untouched.
    let bad = vm.command("rng 0", "err");
    assert!(bad.contains("between 1 and 1024"), "{bad}");
    let (big, _) = rng(&mut vm, 1024);
    assert_ne!(big[..64], a);
}

#[test]
fn rng_works_after_snapshot_restore_with_its_device_state() {
    let env = Env::new("rng-snap");
    let mut vm = env.boot(&[]);
    vm.expect_line("ready", READY);
    let (before, _) = rng(&mut vm, 32);
    let mut back = env.snapshot_and_restore(&vm, "snap-rng", "rng-back");
    // The driver set up before the snapshot goes on: queue position, MSI-X routes and the
    // ioeventfd all came back.
    let t0 = back.exits();
    let (after, irqs) = rng(&mut back, 32);
    let t1 = back.exits();
    assert_ne!(before, after);
    assert_eq!(irqs, 2, "one interrupt before the snapshot, one after");
    assert_eq!(delta(&t0, &t1)["mmio"], 0, "no set-up again after restore");
}

#[test]
fn rng_works_after_a_live_migration() {
    let env = Env::new("rng-mig");
    let mut src = env.boot(&["--memory", "128M"]);
    src.expect_line("ready", READY);
    let (before, _) = rng(&mut src, 32);
    let mut dst = env.migrate_here(&src, "rng-dst");
    let t0 = dst.exits();
    let (after, irqs) = rng(&mut dst, 32);
    let t1 = dst.exits();
    assert_ne!(before, after);
    assert_eq!(irqs, 2, "one interrupt on each host");
    assert_eq!(
        delta(&t0, &t1)["mmio"],
        0,
        "the driver's set-up moved with the VM"
    );
}

#[test]
fn a_vm_without_rng_has_no_such_device_and_says_so() {
    let env = Env::new("no-rng");
    let mut vm = env.boot(&["--no-rng"]);
    vm.expect_line("ready", READY);
    let line = vm.command("rng 4", "err");
    assert_eq!(line, "err rng: no virtio-rng device");
    let info: serde_json::Value = vm.client.call("GET", "/vm", None).unwrap();
    assert_eq!(info["config"]["devices"]["rng"], false, "{info}");
}
