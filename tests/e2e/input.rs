//! Keyboard and pointer end to end: a real VNC client (vncdotool) types into our guest's
//! shell through the VMM's virtio-input keyboard and moves its tablet; a view-only viewer's
//! input goes nowhere; `ray gpu type` types a whole line as one batch of events.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ray_e2e::{python, Env, Vm};

const READY: Duration = Duration::from_secs(20);

/// Runs `vncdo -s SOCKET ARGS...` and asserts it succeeded.
fn vncdo(socket: &Path, args: &[&str]) {
    let vncdo = python().with_file_name("vncdo");
    let mut all = vec!["-s", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = Command::new(&vncdo)
        .args(&all)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (scripts/setup installs it)",
                vncdo.display()
            )
        });
    ray_e2e::succeeded(out, &format!("vncdo {args:?}"));
}

/// `(events, irqs)` of the guest's keyboard, from its `input` command.
fn keyboard_counts(vm: &mut Vm) -> (u64, u64) {
    let line = vm.command("input", "input keyboard ");
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    (field("events="), field("irqs="))
}

fn boot(env: &Env) -> Vm {
    let mut vm = env.boot(&["--memory", "128M", "--gpu", "emulated,width=640,height=480"]);
    vm.expect_line("ready", READY);
    vm
}

#[test]
fn a_vnc_viewer_types_into_the_shell_and_a_view_only_one_does_not() {
    let env = Env::new("input-vnc");
    let mut vm = boot(&env);
    let rw = vm.dir.join("vnc-0.sock");
    let ro = vm.dir.join("vnc-0-view.sock");

    // The view-only viewer types and moves first: none of it may arrive.
    vncdo(
        &ro,
        &["type", "echo nope", "key", "enter", "move", "17", "19"],
    );
    vncdo(&rw, &["type", "echo Hi, VNC!", "key", "enter"]);
    assert_eq!(vm.expect_line("Hi", READY), "Hi, VNC!");
    let console = vm.console().data;
    assert!(
        !console.contains("nope"),
        "the view-only viewer's keys reached the guest:\n{console}"
    );
    assert_eq!(
        vm.command("pointer", "pointer "),
        "pointer x=0 y=0 buttons=0 abs=0,0",
        "the view-only viewer's pointer reached the guest"
    );

    // Pointer moves and a held button reach the tablet, in display pixels.
    vncdo(&rw, &["move", "320", "479", "mousedown", "1"]);
    let line = vm.command("pointer", "pointer ");
    assert!(line.starts_with("pointer x=320 y=479 buttons=1 "), "{line}");
    vncdo(&rw, &["move", "639", "0", "mouseup", "1"]);
    assert_eq!(
        vm.command("pointer", "pointer "),
        "pointer x=639 y=0 buttons=0 abs=32767,0"
    );
}

#[test]
fn ray_gpu_type_sends_a_line_as_one_batch() {
    let env = Env::new("input-type");
    let mut vm = boot(&env);
    let (events0, irqs0) = keyboard_counts(&mut vm);
    let exits0 = vm.exits_total();
    let out = env.ray_ok(&["gpu", "type", &vm.id, "echo typed: a+b=C\\n"]);
    assert_eq!(out.trim(), "typed 78 events");
    assert_eq!(vm.expect_line("typed:", READY), "typed: a+b=C");
    let exits = vm.exits_total() - exits0;
    let (events, irqs) = keyboard_counts(&mut vm);
    // 18 characters (press, report, release, report), 3 of them with a shift press and
    // release around them.
    assert_eq!(events - events0, 18 * 4 + 3 * 2, "{events0} -> {events}");
    // The line is one batch: the 64 buffers the guest holds take it in two interrupts at
    // most (the rest goes into refilled buffers without one).
    assert!(
        irqs - irqs0 <= 3,
        "{irqs0} -> {irqs} interrupts for one typed line"
    );
    eprintln!(
        "typed line: {} events, {} interrupts, {exits} exits",
        events - events0,
        irqs - irqs0
    );

    // Text a US keyboard cannot type is refused before anything is sent.
    let bad = env.ray(&["gpu", "type", &vm.id, "caf\u{e9}"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("character 3 ('é') cannot be typed"), "{err}");
    // A VM without input devices says so.
    let mut plain = env.boot(&["--memory", "64M"]);
    plain.expect_line("ready", READY);
    let out = env.ray(&["gpu", "type", &plain.id, "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the VM has no keyboard"), "{err}");
}

/// A password file with `mode`.
fn password_file(env: &Env, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = env.runtime.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn vnc_over_tcp_needs_loopback_and_the_password() {
    let env = Env::new("input-tcp");
    let good = password_file(&env, "vnc.pw", "s3cret\n", 0o600);
    let good = good.to_str().unwrap();
    let open = password_file(&env, "open.pw", "s3cret\n", 0o644);
    let gpu = ["--memory", "128M", "--gpu", "emulated,width=640,height=480"];
    // Refused before anything starts: another host's address, no password, a password
    // file others may read.
    for (extra, why) in [
        (
            vec!["--vnc", "0.0.0.0:5900", "--vnc-password-file", good],
            "only loopback addresses",
        ),
        (
            vec!["--vnc", "127.0.0.1:0"],
            "without authentication is refused",
        ),
        (
            vec![
                "--vnc",
                "127.0.0.1:0",
                "--vnc-password-file",
                open.to_str().unwrap(),
            ],
            "has mode 644: others may read it",
        ),
    ] {
        let mut args = vec!["vm", "run", "--detach"];
        args.extend_from_slice(&gpu);
        args.extend_from_slice(&extra);
        let out = env.ray(&args);
        assert!(!out.status.success(), "{extra:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{extra:?}: {err}");
    }

    // Jailed as by default: its keeper binds the listener on the host's loopback and
    // opens the password file, which stays private to root.
    let mut args = gpu.to_vec();
    args.extend_from_slice(&["--vnc", "127.0.0.1:0", "--vnc-password-file", good]);
    let mut vm = env.boot(&args);
    vm.expect_line("ready", READY);
    let list: ray_api::gpu::GpuList = vm.client.call("GET", "/vm/gpus", None).unwrap();
    assert_eq!(list.vnc_tcp.len(), 1, "{list:?}");
    let addr: std::net::SocketAddr = list.vnc_tcp[0].parse().unwrap();
    assert!(addr.ip().is_loopback());
    let server = format!("127.0.0.1::{}", addr.port());

    // The right password types and captures.
    let vncdo = python().with_file_name("vncdo");
    let png = env.runtime.join("tcp.png");
    let out = Command::new(&vncdo)
        .args([
            "-s",
            &server,
            "-p",
            "s3cret",
            "type",
            "echo over tcp",
            "key",
            "enter",
        ])
        .args(["capture", png.to_str().unwrap()])
        .output()
        .unwrap();
    ray_e2e::succeeded(out, "vncdo with the password");
    assert_eq!(vm.expect_line("over", READY), "over tcp");
    assert!(std::fs::metadata(&png).unwrap().len() > 0);

    // A wrong password is turned away, with a log line; the VM carries on. (vncdo itself
    // exits 0 when the server refuses it: what it typed must not arrive.)
    let _ = Command::new(&vncdo)
        .args([
            "-s", &server, "-p", "wrong", "-t", "10", "type", "echo bad", "key", "enter",
        ])
        .output()
        .unwrap();
    let log = std::fs::read_to_string(vm.dir.join("vmm.log")).unwrap();
    assert!(
        log.contains("VNC authentication failed"),
        "the VMM logs the failed authentication"
    );
    assert_eq!(vm.command("echo still here", "still"), "still here");
    assert!(!vm.console().data.contains("\nbad\n"));
}
