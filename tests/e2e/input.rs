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
