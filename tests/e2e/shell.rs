//! The guest's shell: the commands every later end-to-end test relies on.
use std::time::Duration;

use ray_e2e::Env;

const READY: Duration = Duration::from_secs(20);

fn hex_field(line: &str, index: usize) -> u64 {
    let f = line
        .split_whitespace()
        .nth(index)
        .unwrap_or_else(|| panic!("field {index} of {line}"));
    u64::from_str_radix(f.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("{f} in {line}"))
}

#[test]
fn shell_commands_answer() {
    let env = Env::new("shell");
    let mut vm = env.boot(&["--memory", "256M"]);
    vm.expect_line("ready", READY);
    assert_eq!(vm.command("echo hello rayvisor", "hello"), "hello rayvisor");

    vm.send("mem");
    vm.expect_line("e820 0x", Duration::from_secs(5));
    let total = vm.expect_line("mem total=", Duration::from_secs(5));
    assert!(total.contains("total=268435456"), "{total}");

    let unknown = vm.command("frobnicate", "err");
    assert!(
        unknown.contains("unknown command 'frobnicate'"),
        "{unknown}"
    );
    let bad = vm.command("sum 0x0 zzz", "err");
    assert!(bad.contains("zzz"), "{bad}");
    let outside = vm.command("sum 0x40000000 4096", "err");
    assert!(outside.contains("0x40000000"), "{outside}");
}

#[test]
fn sum_is_stable_and_follows_memory_changes() {
    let env = Env::new("sum");
    let mut vm = env.boot(&["--memory", "256M"]);
    vm.expect_line("ready", READY);
    let on = vm.command("dirty 8 64", "dirty on");
    let region = on
        .split_whitespace()
        .find_map(|w| w.strip_prefix("region="))
        .map(|r| u64::from_str_radix(r.trim_start_matches("0x"), 16).unwrap())
        .unwrap_or_else(|| panic!("{on}"));
    std::thread::sleep(Duration::from_millis(300));
    let off = vm.command("dirty stop", "dirty off");
    let written: u64 = off
        .trim_start_matches("dirty off bytes=")
        .parse()
        .unwrap_or_else(|_| panic!("{off}"));
    assert!(
        written >= 4 << 20,
        "dirty wrote only {written} bytes in 300 ms at 64 MiB/s: {off}"
    );
    let cmd = format!("sum {region:#x} {}", 8 << 20);
    let a = hex_field(&vm.command(&cmd, "sum "), 3);
    let b = hex_field(&vm.command(&cmd, "sum "), 3);
    assert_eq!(a, b, "memory changed while no workload ran");
    vm.command("dirty 8 64", "dirty on");
    std::thread::sleep(Duration::from_millis(100));
    vm.command("dirty stop", "dirty off");
    let c = hex_field(&vm.command(&cmd, "sum "), 3);
    assert_ne!(a, c, "the workload did not change the region");
    assert!(vm.info().heartbeat.unwrap().dirty_bytes >= written);
}

#[test]
fn tick_stream_is_monotonic_and_stoppable() {
    let env = Env::new("tick");
    let mut vm = env.boot(&[]);
    vm.expect_line("ready", READY);
    vm.command("tick 10", "tick on");
    let mut last = (0u64, 0u64);
    let mut first_ns = 0;
    for _ in 0..10 {
        let line = vm.expect_line("tick ", Duration::from_secs(5));
        let mut f = line.split_whitespace().skip(1);
        let seq: u64 = f.next().unwrap().parse().unwrap();
        let ns: u64 = f.next().unwrap().parse().unwrap();
        assert!(seq > last.0 && ns > last.1, "{line} after {last:?}");
        if first_ns == 0 {
            first_ns = ns;
        }
        last = (seq, ns);
    }
    // Ticks are due every 10 ms of guest time; a late one is followed by an early one, so
    // the check is on the mean period.
    let mean_ms = (last.1 - first_ns) as f64 / 9.0 / 1e6;
    assert!(
        (8.0..50.0).contains(&mean_ms),
        "mean tick period {mean_ms:.2} ms"
    );
    vm.command("tick 0", "tick off");
    let ticks = vm.info().heartbeat.unwrap().ticks;
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        vm.info().heartbeat.unwrap().ticks,
        ticks,
        "ticks continued after tick 0"
    );
}

/// Port-I/O exits of all vCPUs so far, from `GET /metrics`; None if the VMM does not
/// count them.
fn io_exits(vm: &ray_e2e::Vm) -> Option<u64> {
    let answer = vm
        .client
        .raw("GET", "/metrics", None)
        .expect("GET /metrics");
    if answer.status != 200 {
        return None;
    }
    let text = String::from_utf8_lossy(&answer.body).into_owned();
    let counts: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("ray_vcpu_exits_total{") && l.contains("reason=\"io\""))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("bad metric line {l}"))
        })
        .collect();
    (!counts.is_empty()).then(|| counts.iter().sum())
}

/// The paravirtual console: a shell round trip costs a few exits, not one or two per byte
/// (COM1 would take ~20 for `echo hi`: LSR + RBR per input byte, one per output byte).
#[test]
fn shell_round_trip_costs_few_port_exits() {
    let env = Env::new("pvcon");
    // No UART polls and no idle exits: every port exit is the console's.
    let mut vm = env.boot(&["--cmdline", "console=ttyS0 ray.poll_ms=0 ray.idle=spin"]);
    vm.expect_line("ready", READY);
    assert_eq!(vm.command("echo warm", "warm"), "warm");
    std::thread::sleep(Duration::from_millis(200));
    let before = io_exits(&vm).expect("the VMM serves per-vCPU exit counters");
    assert_eq!(vm.command("echo hi", "hi"), "hi");
    std::thread::sleep(Duration::from_millis(200));
    let exits = io_exits(&vm).expect("exit counters") - before;
    assert!(
        (1..=6).contains(&exits),
        "`echo hi` cost {exits} port-I/O exits"
    );
}
