//! PCI configuration space through the ECAM window the ACPI MCFG table describes: our
//! guest takes it instead of ports 0xcf8/0xcfc (one MMIO exit per register instead of two
//! port exits), its drivers set their devices up through it, and the window is in place
//! after a snapshot is restored and after a live migration.
use std::collections::BTreeMap;
use std::time::Duration;

use ray_e2e::{Env, Vm};

const READY: Duration = Duration::from_secs(20);

/// `ray_pci_config_accesses_total` by mechanism (`ports`, `ecam`) and the bad ECAM
/// accesses (`bad`), from `GET /metrics`.
fn pci_config(vm: &Vm) -> BTreeMap<String, u64> {
    let a = vm.client.raw("GET", "/metrics", None).unwrap();
    let text = String::from_utf8_lossy(&a.body).into_owned();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let value = || line.rsplit(' ').next().unwrap().parse::<u64>().unwrap();
        if let Some(rest) = line.strip_prefix("ray_pci_config_accesses_total{mechanism=\"") {
            let mechanism = rest.split('"').next().unwrap();
            out.insert(mechanism.to_string(), value());
        } else if line.starts_with("ray_pci_config_bad_accesses_total ") {
            out.insert("bad".to_string(), value());
        }
    }
    assert_eq!(out.len(), 3, "{text}");
    out
}

/// `rng N` answers with N random bytes.
fn rng_works(vm: &mut Vm) {
    let line = vm.command("rng 16", "rng ");
    let hex = line.split_whitespace().nth(1).unwrap_or_default();
    assert_eq!(hex.len(), 32, "{line}");
}

/// The `pci` command's lines: the mechanism, then `pci 00:SS.0 VVVV:DDDD` per function.
fn pci_listing(vm: &mut Vm) -> (String, Vec<String>) {
    let head = vm.command("pci", "pci config=");
    let mut functions = Vec::new();
    // The host bridge, rng, one disk and vsock: four functions.
    for _ in 0..4 {
        functions.push(vm.expect_line("pci 00:", Duration::from_secs(5)));
    }
    (head, functions)
}

fn disk_image(env: &Env, name: &str) -> String {
    let p = env.runtime.join(name);
    std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
    p.display().to_string()
}

#[test]
fn the_guest_reads_configuration_space_through_ecam_with_half_the_exits_of_the_ports() {
    let env = Env::new("ecam");
    let img = disk_image(&env, "d.img");
    let devices = ["--disk", &img, "--vsock", "cid=3"];

    let mut vm = env.boot(&devices);
    vm.expect_line("ready", READY);
    // Boot: the vsock driver's probe scanned bus 0 and set its device up.
    let boot = pci_config(&vm);
    eprintln!("ECAM boot: {boot:?}");
    assert_eq!(boot["ports"], 0, "no 0xcf8/0xcfc exit with ECAM: {boot:?}");
    assert!(boot["ecam"] > 32, "a scan of bus 0 and a set-up: {boot:?}");
    assert_eq!(boot["bad"], 0);
    let (head, functions) = pci_listing(&mut vm);
    assert_eq!(head, "pci config=ecam base=0xfe000000");
    assert_eq!(
        functions,
        [
            "pci 00:00.0 1b36:0008",
            "pci 00:01.0 1af4:1044",
            "pci 00:02.0 1af4:1042",
            "pci 00:03.0 1af4:1053"
        ]
    );
    // Two more drivers set up through the window, and they work.
    rng_works(&mut vm);
    let disk = vm.command("disk", "disk ");
    assert!(disk.starts_with("disk capacity=8192 "), "{disk}");
    let w = vm.command("disk write 0 8 0x5a", "disk ");
    assert!(w.starts_with("disk write ok"), "{w}");
    let after = pci_config(&vm);
    assert_eq!(after["ports"], 0, "{after:?}");
    assert!(after["ecam"] > boot["ecam"], "{after:?}");

    // The same guest told to use the ports: the same registers, two exits each.
    let img2 = disk_image(&env, "d2.img");
    let mut ports = env.boot(&[
        "--disk",
        &img2,
        "--vsock",
        "cid=4",
        "--cmdline",
        "console=ttyS0 ray.poll_ms=0 ray.pci=ports",
    ]);
    ports.expect_line("ready", READY);
    let boot_ports = pci_config(&ports);
    eprintln!("ports boot: {boot_ports:?}");
    assert_eq!(boot_ports["ecam"], 0, "{boot_ports:?}");
    assert_eq!(
        boot_ports["ports"],
        2 * boot["ecam"],
        "address and data port per register, against one ECAM access"
    );
    let (head, functions_by_ports) = pci_listing(&mut ports);
    assert_eq!(head, "pci config=ports");
    assert_eq!(functions_by_ports, functions);
    rng_works(&mut ports);
}

#[test]
fn the_ecam_window_is_in_place_after_restore_and_migration() {
    let env = Env::new("ecam-move");
    let img = disk_image(&env, "d.img");
    let mut vm = env.boot(&["--disk", &img, "--memory", "128M"]);
    vm.expect_line("ready", READY);
    assert!(pci_config(&vm)["ecam"] > 0);

    // Restored: the rng driver, first used now, sets its device up through the window
    // of the new VMM.
    let mut back = env.snapshot_and_restore(&vm, "snap-ecam", "ecam-back");
    let before = pci_config(&back);
    rng_works(&mut back);
    let after = pci_config(&back);
    assert_eq!(after["ports"], before["ports"], "{after:?}");
    assert!(after["ecam"] > before["ecam"], "{before:?} -> {after:?}");

    // Migrated: the disk driver, first used now, does the same on the target.
    // Its disk is shared storage: the jailed target's keeper opens it.
    let shared = env.runtime.to_str().unwrap();
    let mut dst = env.migrate_here_with(&back, "ecam-dst", &["--shared-dir", shared]);
    let before = pci_config(&dst);
    let w = dst.command("disk write 0 8 0x5a", "disk ");
    assert!(w.starts_with("disk write ok"), "{w}");
    let after = pci_config(&dst);
    assert_eq!(after["ports"], before["ports"], "{after:?}");
    assert!(after["ecam"] > before["ecam"], "{before:?} -> {after:?}");
    assert_eq!(after["bad"], 0);
}
