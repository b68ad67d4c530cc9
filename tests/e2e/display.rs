//! The emulated and virtio GPUs end to end: our guest draws test patterns into its
//! framebuffers (or a virtio GPU's resources, sending the changed rectangle), and what
//! `ray gpu screenshot` saves, what a real VNC client (vncdotool) captures and what the
//! host recomputes from the pattern's definition are the same pixels; also after a
//! snapshot and restore and after a live migration. A garbage RFB client is dropped while
//! a viewer carries on. A virtio display's resize reaches the guest, which redraws.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ray_api::gpu::GpuList;
use ray_api::vmm::{MigrationStatus, VmInfo};
use ray_e2e::{python, Env, Vm};
use ray_guest_abi::display::{pattern_pixel, Pattern};

const READY: Duration = Duration::from_secs(20);
const GPU: &str = "emulated,width=640,height=480,displays=2";

/// A PNG's size and RGB pixels.
pub fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let rgb = match info.color_type {
        png::ColorType::Rgb => buf[..info.buffer_size()].to_vec(),
        png::ColorType::Rgba => buf[..info.buffer_size()]
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        other => panic!("{}: unexpected PNG colour type {other:?}", path.display()),
    };
    (info.width, info.height, rgb)
}

/// The pattern as the host computes it, as RGB.
pub(crate) fn expected(pattern: Pattern, seed: u32, w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let p = pattern_pixel(pattern, seed, x, y, w, h);
            out.extend_from_slice(&[(p >> 16) as u8, (p >> 8) as u8, p as u8]);
        }
    }
    out
}

/// Asserts a 640x480 PNG shows `pattern` exactly, naming the first pixel that differs.
fn assert_shows(path: &Path, pattern: Pattern, seed: u32) {
    assert_shows_at(path, pattern, seed, (640, 480));
}

/// Asserts a PNG of `size` shows `pattern` exactly, naming the first pixel that differs.
pub(crate) fn assert_shows_at(path: &Path, pattern: Pattern, seed: u32, size: (u32, u32)) {
    let (w, h, rgb) = decode(path);
    assert_eq!((w, h), size, "{}", path.display());
    let want = expected(pattern, seed, w, h);
    if let Some(i) = (0..rgb.len()).find(|&i| rgb[i] != want[i]) {
        let px = i / 3;
        panic!(
            "{}: pixel ({}, {}) is {:?}, the {pattern:?} pattern has {:?}",
            path.display(),
            px % w as usize,
            px / w as usize,
            &rgb[px * 3..px * 3 + 3],
            &want[px * 3..px * 3 + 3]
        );
    }
}

pub(crate) fn screenshot(env: &Env, id: &str, display: u32, name: &str) -> std::path::PathBuf {
    let out = env.runtime.join(name);
    env.ray_ok(&[
        "gpu",
        "screenshot",
        id,
        "--display",
        &display.to_string(),
        "-o",
        out.to_str().unwrap(),
    ]);
    out
}

/// vncdotool's `vncdo capture` through one of the VM's VNC sockets.
fn vnc_capture(env: &Env, socket: &Path, name: &str) -> std::path::PathBuf {
    let out = env.runtime.join(name);
    let vncdo = python().with_file_name("vncdo");
    let result = Command::new(&vncdo)
        .args([
            "-s",
            socket.to_str().unwrap(),
            "capture",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (scripts/setup installs it)",
                vncdo.display()
            )
        });
    ray_e2e::succeeded(result, "vncdo capture");
    out
}

fn gpus(vm: &Vm) -> GpuList {
    vm.client
        .call("GET", "/vm/gpus", None)
        .expect("GET /vm/gpus")
}

fn draw(vm: &mut Vm, pattern: &str, seed: u32, display: u32) {
    let line = format!("draw {pattern} {seed} {display}");
    let answer = vm.command(&line, "draw ");
    assert_eq!(
        answer,
        format!("draw {pattern} seed={seed} display={display} 640x480")
    );
}

fn boot_drawn(env: &Env) -> Vm {
    let mut vm = env.boot(&["--memory", "128M", "--gpu", GPU]);
    vm.expect_line("ready", READY);
    draw(&mut vm, "checker", 7, 0);
    draw(&mut vm, "gradient", 3, 1);
    vm
}

/// Pauses `vm`, snapshots it, stops it and restores the snapshot as VM `id`.
fn snapshot_and_restore(env: &Env, vm: &Vm, id: &str) -> Vm {
    env.ray_ok(&["vm", "pause", &vm.id]);
    let snap = env.runtime.join(format!("snap-{id}"));
    env.ray_ok(&["snapshot", "create", &vm.id, snap.to_str().unwrap()]);
    env.ray_ok(&["vm", "stop", &vm.id, "--timeout-ms", "0"]);
    let out = env.ray_ok(&[
        "snapshot",
        "restore",
        snap.to_str().unwrap(),
        "--id",
        id,
        "--detach",
        "--json",
    ]);
    let info: VmInfo = serde_json::from_str(&out).unwrap();
    env.attach(id, info.pid)
}

/// Live-migrates `from` over a Unix socket to a second VMM on this host, VM `to`; waits
/// until `from` has ended.
fn migrate(env: &Env, from: &Vm, to: &str) -> Vm {
    let key = env.runtime.join("key");
    std::fs::write(&key, "a pre-shared key of some length").unwrap();
    let listen = format!("unix:{}", env.runtime.join("incoming.sock").display());
    let key = key.to_str().unwrap();
    let out = env.ray_ok(&[
        "migrate",
        "receive",
        "--listen",
        &listen,
        "--key-file",
        key,
        "--memory",
        "128M",
        "--vcpus",
        "1",
        "--id",
        to,
        "--json",
    ]);
    let info: VmInfo = serde_json::from_str(&out).unwrap();
    let moved = env.attach(to, info.pid);
    let out = env.ray_ok(&[
        "migrate",
        "start",
        &from.id,
        "--to",
        &listen,
        "--key-file",
        key,
        "--json",
    ]);
    let s: MigrationStatus = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (s.state.as_str(), s.vm.as_str()),
        ("completed", "migrated"),
        "{s:?}"
    );
    from.wait_exit(Duration::from_secs(10));
    moved
}

#[test]
fn vnc_capture_screenshot_and_pattern_agree_pixel_for_pixel() {
    let env = Env::new("disp-vnc");
    let mut vm = boot_drawn(&env);
    let list = gpus(&vm);
    assert_eq!(list.gpus.len(), 1);
    assert_eq!(list.gpus[0].displays.len(), 2);
    assert_eq!(serde_json::to_value(list.gpus[0].state).unwrap(), "ready");
    // Our guest and the VMM agree on where the framebuffers are.
    let listed = vm.command("displays", "displays ");
    assert_eq!(listed, "displays 2");

    let shot0 = screenshot(&env, &vm.id, 0, "s0.png");
    let shot1 = screenshot(&env, &vm.id, 1, "s1.png");
    assert_shows(&shot0, Pattern::Checker, 7);
    assert_shows(&shot1, Pattern::Gradient, 3);
    let vnc0 = vnc_capture(&env, &vm.dir.join("vnc-0.sock"), "v0.png");
    let vnc1 = vnc_capture(&env, &vm.dir.join("vnc-1-view.sock"), "v1.png");
    assert_shows(&vnc0, Pattern::Checker, 7);
    assert_shows(&vnc1, Pattern::Gradient, 3);

    // A new picture reaches a new capture.
    draw(&mut vm, "bars", 0, 0);
    assert_shows(
        &vnc_capture(&env, &vm.dir.join("vnc-0.sock"), "v2.png"),
        Pattern::Bars,
        0,
    );

    // The GPU follows the VM: suspended while paused, ready again after resume.
    env.ray_ok(&["vm", "pause", &vm.id]);
    let state = serde_json::to_value(gpus(&vm).gpus[0].state).unwrap();
    assert_eq!(state, "suspended");
    env.ray_ok(&["vm", "resume", &vm.id]);
    let state = serde_json::to_value(gpus(&vm).gpus[0].state).unwrap();
    assert_eq!(state, "ready");

    // A display that does not exist is named in the refusal.
    let out = env.ray(&[
        "gpu",
        "screenshot",
        &vm.id,
        "--display",
        "2",
        "-o",
        "/dev/null",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("display 2 does not exist: the VM has 2 display(s)"),
        "{err}"
    );
}

#[test]
fn a_garbage_rfb_client_is_dropped_and_another_viewer_carries_on() {
    let env = Env::new("disp-garbage");
    let mut vm = boot_drawn(&env);
    // One viewer stays connected through vncdotool's API while a garbage client comes
    // and goes; then the viewer captures the picture drawn after that.
    let script = r#"
import socket, sys, time
from vncdotool import api
rw, png = sys.argv[1], sys.argv[2]
viewer = api.connect(rw)
viewer.refreshScreen()
bad = socket.socket(socket.AF_UNIX)
bad.connect(rw)
bad.recv(12)
bad.sendall(b"RFB 003.008\n\x01\x01" + bytes([0xee] * 64))
bad.settimeout(10)
while True:
    data = bad.recv(65536)
    if not data:
        break
print("garbage client dropped", flush=True)
sys.stdout.flush()
input()
viewer.captureScreen(png)
viewer.disconnect()
api.shutdown()
print("captured", flush=True)
"#;
    let png = env.runtime.join("after.png");
    let mut child = Command::new(python())
        .args([
            "-c",
            script,
            vm.dir.join("vnc-0.sock").to_str().unwrap(),
            png.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "garbage client dropped");
    draw(&mut vm, "fill", 0x123456, 0);
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"\n").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    assert_shows(&png, Pattern::Fill, 0x123456);
    let log = std::fs::read_to_string(vm.dir.join("vmm.log")).unwrap();
    assert!(
        log.contains("VNC viewer closed: unknown client message type 238"),
        "the VMM logs why it closed the garbage client"
    );
    // The VM is unharmed.
    assert_eq!(vm.command("echo still here", "still"), "still here");
}

#[test]
fn pictures_survive_snapshot_restore_and_live_migration() {
    let env = Env::new("disp-persist");
    let vm = boot_drawn(&env);
    let back = snapshot_and_restore(&env, &vm, "back");
    assert_eq!(
        serde_json::to_value(gpus(&back).gpus[0].state).unwrap(),
        "ready"
    );
    assert_shows(&screenshot(&env, "back", 0, "r0.png"), Pattern::Checker, 7);
    assert_shows(&screenshot(&env, "back", 1, "r1.png"), Pattern::Gradient, 3);
    assert_shows(
        &vnc_capture(&env, &back.dir.join("vnc-1.sock"), "rv1.png"),
        Pattern::Gradient,
        3,
    );

    // Live migration over a Unix socket to a second VMM on this host.
    let mut moved = migrate(&env, &back, "moved");
    assert_eq!(
        serde_json::to_value(gpus(&moved).gpus[0].state).unwrap(),
        "ready"
    );
    assert_shows(&screenshot(&env, "moved", 0, "m0.png"), Pattern::Checker, 7);
    assert_shows(
        &vnc_capture(&env, &moved.dir.join("vnc-1.sock"), "mv1.png"),
        Pattern::Gradient,
        3,
    );
    // The guest draws on where it left off.
    draw(&mut moved, "bars", 0, 1);
    assert_shows(&screenshot(&env, "moved", 1, "m1.png"), Pattern::Bars, 0);
}

#[test]
fn gpu_requests_are_checked_before_the_vm_starts() {
    let env = Env::new("disp-args");
    for (args, msg) in [
        (
            &["--gpu", "passthrough"][..],
            "a passthrough GPU takes exactly one of vfio-user=SOCKET or host=BDF",
        ),
        (&["--gpu", "remote"], "a remote GPU needs its back end"),
        (
            &[
                "--gpu",
                "remote,tcp=127.0.0.1:9,token-file=/nonexistent/token",
            ],
            "cannot read the token file /nonexistent/token",
        ),
        (
            &["--gpu", "emulated,displays=5"],
            "GPU 0: 5 displays asked for; the VM's limit is 4 a GPU \
             (--gpu-limits displays-per-gpu=N, up to 16)",
        ),
        (
            &[
                "--gpu-limits",
                "gpus=1",
                "--gpu",
                "emulated",
                "--gpu",
                "virtio",
            ],
            "2 GPUs asked for; the VM's limit is 1 (--gpu-limits gpus=N, up to 16)",
        ),
        (
            &["--gpu-limits", "gpus=20", "--gpu", "emulated"],
            "GPU limit gpus=20 is out of range: 1 to 16",
        ),
        (
            &["--gpu-limits", "screens=2", "--gpu", "emulated"],
            "unknown GPU limit 'screens' (keys: gpus, displays-per-gpu, displays)",
        ),
        (
            &["--gpu", "emulated,width=100"],
            "width 100 is not a multiple of 8 between 320 and 3840",
        ),
        (
            &[
                "--gpu",
                "emulated,displays=4",
                "--gpu",
                "emulated,displays=4",
                "--gpu",
                "emulated,displays=4",
                "--gpu",
                "emulated,displays=4",
                "--gpu",
                "emulated",
            ],
            "17 displays asked for over all GPUs; the VM's limit is 16",
        ),
        (
            &[
                "--memory",
                "64M",
                "--gpu",
                "emulated,width=3840,height=2160,displays=4",
            ],
            "more than half of the 67108864 bytes below 3 GiB",
        ),
    ] {
        let mut all = vec!["vm", "run", "--detach"];
        all.extend_from_slice(args);
        let out = env.ray(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(msg), "{args:?}: {err}");
    }
    // Nothing was started.
    let list = env.ray_ok(&["vm", "list", "-o", "json"]);
    assert_eq!(list.trim(), "[]", "{list}");
}

const VIRTIO_GPU: &str = "virtio,width=640,height=480,displays=2";

/// `draw` on a virtio display: the rectangle it sent, and how many requests and kicks.
pub(crate) fn draw_virtio(
    vm: &mut Vm,
    pattern: &str,
    seed: u32,
    display: u32,
) -> (String, u32, u32) {
    let answer = vm.command(&format!("draw {pattern} {seed} {display}"), "draw ");
    let field = |key: &str| {
        answer
            .split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in '{answer}'"))
            .to_string()
    };
    let number = |key: &str| field(key).parse::<u32>().unwrap();
    (field("changed="), number("requests="), number("kicks="))
}

#[test]
fn virtio_scanouts_show_what_the_guest_flushed_also_after_restore_and_migration() {
    let env = Env::new("disp-virtio");
    let mut vm = env.boot(&["--memory", "128M", "--gpu", VIRTIO_GPU]);
    vm.expect_line("ready", READY);
    let listed = vm.command("displays", "displays ");
    assert_eq!(listed, "displays 2");
    // A whole new picture: one transfer and one flush, made available with at most one
    // kick (none if the device is still busy with the queue).
    let (changed, requests, kicks) = draw_virtio(&mut vm, "checker", 7, 0);
    assert_eq!((changed.as_str(), requests), ("640x480+0+0", 2));
    assert!(kicks <= 1, "{kicks} kicks for one frame");
    draw_virtio(&mut vm, "gradient", 3, 1);
    // The same picture again changes nothing and sends nothing.
    let (changed, requests, kicks) = draw_virtio(&mut vm, "gradient", 3, 1);
    assert_eq!((changed.as_str(), requests, kicks), ("none", 0, 0));

    let list = gpus(&vm);
    assert_eq!(list.gpus.len(), 1);
    assert_eq!(serde_json::to_value(list.gpus[0].kind).unwrap(), "paravirt");
    assert_eq!(serde_json::to_value(list.gpus[0].state).unwrap(), "ready");
    assert_eq!(list.gpus[0].displays.len(), 2);
    assert_shows(&screenshot(&env, &vm.id, 0, "s0.png"), Pattern::Checker, 7);
    assert_shows(&screenshot(&env, &vm.id, 1, "s1.png"), Pattern::Gradient, 3);
    assert_shows(
        &vnc_capture(&env, &vm.dir.join("vnc-1-view.sock"), "v1.png"),
        Pattern::Gradient,
        3,
    );
    // A flush drives a new VNC picture.
    draw_virtio(&mut vm, "bars", 0, 0);
    assert_shows(
        &vnc_capture(&env, &vm.dir.join("vnc-0.sock"), "v0.png"),
        Pattern::Bars,
        0,
    );

    // The GPU follows the VM as the emulated one does.
    env.ray_ok(&["vm", "pause", &vm.id]);
    let state = serde_json::to_value(gpus(&vm).gpus[0].state).unwrap();
    assert_eq!(state, "suspended");
    env.ray_ok(&["vm", "resume", &vm.id]);

    let back = snapshot_and_restore(&env, &vm, "back");
    assert_eq!(
        serde_json::to_value(gpus(&back).gpus[0].state).unwrap(),
        "ready"
    );
    assert_shows(&screenshot(&env, "back", 0, "r0.png"), Pattern::Bars, 0);
    assert_shows(&screenshot(&env, "back", 1, "r1.png"), Pattern::Gradient, 3);

    let mut moved = migrate(&env, &back, "moved");
    assert_shows(&screenshot(&env, "moved", 0, "m0.png"), Pattern::Bars, 0);
    assert_shows(
        &vnc_capture(&env, &moved.dir.join("vnc-1.sock"), "mv1.png"),
        Pattern::Gradient,
        3,
    );
    // The guest's driver carries on where it left off: only what changes is sent.
    let (changed, requests, _) = draw_virtio(&mut moved, "fill", 0x123456, 1);
    assert_eq!((changed.as_str(), requests), ("640x480+0+0", 2));
    assert_shows(
        &screenshot(&env, "moved", 1, "m1.png"),
        Pattern::Fill,
        0x123456,
    );
}

#[test]
fn a_virtio_display_resize_reaches_the_guest_which_redraws() {
    let env = Env::new("disp-resize");
    let mut vm = env.boot(&["--memory", "128M", "--gpu", VIRTIO_GPU]);
    vm.expect_line("ready", READY);
    assert_eq!(vm.command("displays", "displays "), "displays 2");
    env.ray_ok(&["gpu", "resize", &vm.id, "--display", "1", "800x600"]);
    // The configuration interrupt reaches the guest, which re-reads the display
    // information and rebuilds that scanout.
    let line = vm.expect_line("gpu display event: scanout 1", READY);
    assert_eq!(line, "gpu display event: scanout 1 is 800x600 events=1");
    let list = gpus(&vm);
    let sizes: Vec<_> = list.gpus[0]
        .displays
        .iter()
        .map(|d| (d.width, d.height))
        .collect();
    assert_eq!(sizes, [(640, 480), (800, 600)]);
    let (changed, _, _) = draw_virtio(&mut vm, "gradient", 9, 1);
    assert_eq!(changed, "800x600+0+0");
    assert_shows_at(
        &screenshot(&env, &vm.id, 1, "big.png"),
        Pattern::Gradient,
        9,
        (800, 600),
    );
    // Sizes out of range, and displays that do not exist, are refused by name.
    let out = env.ray(&["gpu", "resize", &vm.id, "--display", "1", "100x600"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("width 100 is not a multiple of 8"), "{err}");
    let out = env.ray(&["gpu", "resize", &vm.id, "--display", "2", "800x600"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("display 2 does not exist"), "{err}");
}

/// Fifty resizes of two scanouts through sizes that need 4-8 MiB each: the guest's
/// driver reuses its backings (it used to take new RAM on every resize and ran out after
/// about fifteen of these in 128 MiB), and the last size shows what the guest draws.
#[test]
fn fifty_resizes_reuse_the_guest_backings_and_the_display_still_works() {
    let env = Env::new("disp-resize50");
    let mut vm = env.boot(&["--memory", "128M", "--gpu", VIRTIO_GPU]);
    vm.expect_line("ready", READY);
    assert_eq!(vm.command("displays", "displays "), "displays 2");
    const SIZES: [(u32, u32); 3] = [(1920, 1080), (1280, 800), (1024, 768)];
    let mut last = [(640, 480); 2];
    for i in 0..50 {
        let display = i % 2;
        let (w, h) = SIZES[(i / 2) % SIZES.len()];
        env.ray_ok(&[
            "gpu",
            "resize",
            &vm.id,
            "--display",
            &display.to_string(),
            &format!("{w}x{h}"),
        ]);
        last[display] = (w, h);
        // Each event lists every scanout, in order.
        let lines: Vec<String> = (0..2)
            .map(|k| vm.expect_line(&format!("gpu display event: scanout {k}"), READY))
            .collect();
        let want = format!("gpu display event: scanout {display} is {w}x{h} ");
        assert!(lines[display].starts_with(&want), "resize {i}: {lines:?}");
    }
    for (display, &(w, h)) in last.iter().enumerate() {
        let (changed, _, _) = draw_virtio(&mut vm, "gradient", 5 + display as u32, display as u32);
        assert_eq!(changed, format!("{w}x{h}+0+0"));
        assert_shows_at(
            &screenshot(&env, &vm.id, display as u32, &format!("last{display}.png")),
            Pattern::Gradient,
            5 + display as u32,
            (w, h),
        );
    }
    assert_shows_at(
        &vnc_capture(&env, &vm.dir.join("vnc-1.sock"), "vnc1.png"),
        Pattern::Gradient,
        6,
        last[1],
    );
}

#[test]
fn emulated_and_virtio_displays_are_numbered_alike_by_guest_and_host() {
    let env = Env::new("disp-mixed");
    // The virtio GPU first: display numbers still put the emulated displays first, in the
    // guest as on the host.
    let mut vm = env.boot(&[
        "--memory",
        "128M",
        "--gpu",
        "virtio,width=640,height=480",
        "--gpu",
        "emulated,width=640,height=480",
    ]);
    vm.expect_line("ready", READY);
    assert_eq!(vm.command("displays", "displays "), "displays 2");
    draw(&mut vm, "checker", 5, 0);
    // Bars on a black scanout: the last bar is black, so only the other seven are sent.
    let (changed, requests, _) = draw_virtio(&mut vm, "bars", 0, 1);
    assert_eq!((changed.as_str(), requests), ("560x480+0+0", 2));
    assert_shows(&screenshot(&env, &vm.id, 0, "e.png"), Pattern::Checker, 5);
    assert_shows(&screenshot(&env, &vm.id, 1, "v.png"), Pattern::Bars, 0);
    let list = gpus(&vm);
    let numbers: Vec<_> = list
        .gpus
        .iter()
        .map(|g| g.displays.iter().map(|d| d.index).collect::<Vec<_>>())
        .collect();
    assert_eq!(numbers, [vec![1], vec![0]], "GPU 0 is the virtio one");
    // Only a virtio display changes size.
    let out = env.ray(&["gpu", "resize", &vm.id, "--display", "0", "800x600"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to an emulated GPU"), "{err}");
}

#[test]
fn raised_gpu_limits_give_a_gpu_more_displays_and_status_shows_them() {
    let env = Env::new("disp-limits");
    let mut vm = env.boot(&[
        "--memory",
        "128M",
        "--gpu-limits",
        "displays-per-gpu=6,gpus=2",
        "--gpu",
        "emulated,width=640,height=480,displays=6",
    ]);
    vm.expect_line("ready", READY);
    assert_eq!(vm.command("displays", "displays "), "displays 6");
    draw(&mut vm, "checker", 9, 5);
    assert_shows(&screenshot(&env, &vm.id, 5, "d5.png"), Pattern::Checker, 9);
    let list = gpus(&vm);
    assert_eq!(list.gpus[0].displays.len(), 6);
    let l = list.limits;
    assert_eq!((l.gpus, l.displays_per_gpu, l.displays), (2, 6, 16));
    let status = env.ray_ok(&["gpu", "status", &vm.id]);
    assert!(
        status.contains("limits: 2 GPUs, 6 displays a GPU, 16 displays (--gpu-limits)"),
        "{status}"
    );
}

/// The text a screenshot of a console shows, row by row (`ray_guest_abi::text`).
fn console_text(path: &Path) -> Vec<String> {
    let (w, h, rgb) = decode(path);
    let pixel = |x: u32, y: u32| {
        let i = ((y * w + x) * 3) as usize;
        u32::from_be_bytes([0, rgb[i], rgb[i + 1], rgb[i + 2]])
    };
    let (cols, rows) = ray_guest_abi::text::grid(w, h);
    (0..rows)
        .map(|row| {
            let mut line = String::new();
            ray_guest_abi::text::read_row(pixel, cols, row, |c| line.push(c));
            line
        })
        .collect()
}

/// The guest's text console: `console 0` mirrors the shell on the emulated display; what
/// a real VNC viewer types is echoed there and the command's output follows. Both `ray
/// gpu screenshot` and the viewer's own capture read back, cell by cell, as exactly that
/// text (every other cell blank). A full screen scrolls by whole rows. On a virtio
/// scanout the same console arrives through the GPU's transfer and flush.
#[test]
fn the_shell_shows_on_the_text_console_and_what_a_viewer_types_reaches_it() {
    let env = Env::new("disp-console");
    let mut vm = env.boot(&[
        "--memory",
        "128M",
        "--gpu",
        "emulated,width=640,height=480",
        "--gpu",
        "virtio,width=640,height=480",
    ]);
    vm.expect_line("ready", READY);
    assert_eq!(
        vm.command("console 0", "console "),
        "console on display=0 53x26"
    );
    let rw = vm.dir.join("vnc-0.sock");
    let vncdo = python().with_file_name("vncdo");
    let typed = Command::new(&vncdo)
        .args([
            "-s",
            rw.to_str().unwrap(),
            "type",
            "echo Hi, console!",
            "key",
            "enter",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", vncdo.display()));
    ray_e2e::succeeded(typed, "vncdo type");
    assert_eq!(vm.expect_line("Hi,", READY), "Hi, console!");
    let want = [
        "console on display=0 53x26",
        "echo Hi, console!",
        "Hi, console!",
    ];
    for shot in [
        screenshot(&env, &vm.id, 0, "console.png"),
        vnc_capture(&env, &rw, "console-vnc.png"),
    ] {
        let rows = console_text(&shot);
        assert_eq!(rows.len(), 26, "{}", shot.display());
        assert_eq!(&rows[..3], &want, "{}", shot.display());
        assert!(
            rows[3..].iter().all(|r| r.is_empty()),
            "{}: {rows:?}",
            shot.display()
        );
    }

    // 30 more lines (the command and its 29 numbers) on 26 rows: the first rows scrolled
    // away, the last one holds the cursor.
    vm.send("seq 29");
    vm.expect_line("29", READY);
    let rows = console_text(&screenshot(&env, &vm.id, 0, "scrolled.png"));
    let mut expected: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    expected.push("seq 29".into());
    expected.extend((1..=29).map(|i| i.to_string()));
    expected.push(String::new());
    assert_eq!(rows, expected[expected.len() - 26..], "after scrolling");

    // The virtio scanout: sent by the main loop after the command, so look until it shows.
    assert_eq!(
        vm.command("console 1", "console "),
        "console on display=1 53x26"
    );
    vm.command("echo on virtio", "on virtio");
    let deadline = std::time::Instant::now() + READY;
    loop {
        let rows = console_text(&screenshot(&env, &vm.id, 1, "virtio.png"));
        if rows[..2] == ["console on display=1 53x26", "echo on virtio"] && rows[2] == "on virtio" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the virtio console shows {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(vm.command("console off", "console "), "console off");
    assert_eq!(
        vm.command("console 9", "err "),
        "err console: no such display"
    );
}

/// Every `{min, median, max}` figure in `v`, with its path.
fn figures<'a>(
    v: &'a serde_json::Value,
    path: String,
    out: &mut Vec<(String, &'a serde_json::Value)>,
) {
    match v {
        serde_json::Value::Object(m) if m.contains_key("median") => out.push((path, v)),
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                figures(x, format!("{path}.{k}"), out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                figures(x, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_display_benchmark_reports_its_figures_and_an_idle_display_sends_nothing() {
    let env = Env::new("disp-bench");
    let out = env.ray_ok(&["bench", "display", "--runs", "2", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let mut all = Vec::new();
    figures(&r, String::new(), &mut all);
    assert!(all.len() >= 20, "{} figures in {out}", all.len());
    for (path, f) in &all {
        let n = |k: &str| f[k].as_f64().unwrap_or_else(|| panic!("{path}.{k} in {f}"));
        let (min, median, max) = (n("min"), n("median"), n("max"));
        assert!(
            0.0 <= min && min <= median && median <= max && max.is_finite(),
            "{path}: {f}"
        );
    }
    for path in [
        "/update_latency_ms",
        "/fullscreen_fps",
        "/encode_fps/h264",
        "/encode_fps_1080p/h264",
    ] {
        assert!(
            r.pointer(path).unwrap()["min"].as_f64().unwrap() > 0.0,
            "{path}: {out}"
        );
    }
    // HEVC and VP9 are there when ray has FFmpeg (scripts/test builds it so).
    for codec in ["hevc", "vp9"] {
        let f = &r["encode_fps"][codec];
        assert_eq!(f.is_object(), cfg!(feature = "ffmpeg"), "{codec}: {f}");
    }
    // The issue's target that is not a speed: an idle display sends no frames, whichever
    // way its changes are found.
    for mode in ["dirty_log", "tile_compare"] {
        let idle = &r["change_detection"][mode]["idle_updates"];
        assert_eq!(idle["max"].as_f64(), Some(0.0), "{mode}: {idle}");
    }
    // Each encoding is smaller than raw pixels, and a scroll goes as CopyRect.
    for f in r["frame_bytes"].as_array().unwrap() {
        let raw = f["raw"].as_u64().unwrap();
        assert!(
            f["zrle"].as_u64().unwrap() < raw && f["tight"].as_u64().unwrap() < raw,
            "{f}"
        );
    }
    let scroll = &r["scroll_bytes"];
    assert!(
        scroll["copyrect"].as_u64().unwrap() < scroll["zrle"].as_u64().unwrap(),
        "{scroll}"
    );
    assert!(r["memcpy_ratio"].as_f64().unwrap() > 0.0);
}

const BOCHS: &str = "emulated,device=bochs,width=640,height=480";

/// Sets a mode on the guest's Bochs device and checks the answer.
fn bochs_mode(vm: &mut Vm, w: u32, h: u32) {
    let answer = vm.command(&format!("bochs mode {w} {h}"), "bochs mode ");
    assert_eq!(
        answer,
        format!("bochs mode {w}x{h} bpp=32 stride={}", w * 4)
    );
}

/// Draws on display 0 of a VM whose only display is a Bochs device in mode `size`.
fn draw_bochs(vm: &mut Vm, pattern: &str, seed: u32, size: (u32, u32)) {
    let answer = vm.command(&format!("draw {pattern} {seed} 0"), "draw ");
    assert_eq!(
        answer,
        format!("draw {pattern} seed={seed} display=0 {}x{}", size.0, size.1)
    );
}

#[test]
fn a_bochs_display_shows_the_mode_and_picture_its_guest_driver_sets() {
    let env = Env::new("disp-bochs");
    let mut vm = env.boot(&["--memory", "128M", "--gpu", BOCHS]);
    vm.expect_line("ready", READY);
    // The guest's driver found 1234:1111 on PCI and sized its VRAM BAR (32 MiB).
    let listing = vm.command("bochs", "bochs ");
    assert!(
        listing.starts_with("bochs id=0xb0c5 vram=0x")
            && listing.ends_with("size=0x2000000 mode=off"),
        "{listing}"
    );
    assert_eq!(vm.command("displays", "displays "), "displays 1");
    // No mode yet: the configured size, black.
    let (w, h, rgb) = decode(&screenshot(&env, &vm.id, 0, "off.png"));
    assert_eq!((w, h), (640, 480));
    assert!(rgb.iter().all(|&b| b == 0), "black until a mode is set");

    bochs_mode(&mut vm, 640, 480);
    draw_bochs(&mut vm, "checker", 7, (640, 480));
    assert_shows(&screenshot(&env, &vm.id, 0, "b0.png"), Pattern::Checker, 7);
    assert_shows(
        &vnc_capture(&env, &vm.dir.join("vnc-0.sock"), "bv0.png"),
        Pattern::Checker,
        7,
    );
    let list = gpus(&vm);
    let d = &list.gpus[0].displays[0];
    assert_eq!((d.index, d.width, d.height), (0, 640, 480));
    assert!(d.framebuffer_gpa >= 0xc000_0000, "{:#x}", d.framebuffer_gpa);
    assert_eq!(
        d.changes.as_ref().map(|c| c.mode.as_str()),
        Some("dirty-log")
    );

    // The guest changes the resolution: the display follows.
    bochs_mode(&mut vm, 800, 600);
    draw_bochs(&mut vm, "gradient", 3, (800, 600));
    assert_shows_at(
        &screenshot(&env, &vm.id, 0, "b1.png"),
        Pattern::Gradient,
        3,
        (800, 600),
    );
    assert_shows_at(
        &vnc_capture(&env, &vm.dir.join("vnc-0.sock"), "bv1.png"),
        Pattern::Gradient,
        3,
        (800, 600),
    );
    let d = &gpus(&vm).gpus[0].displays[0];
    assert_eq!((d.width, d.height), (800, 600));
    // A new picture reaches a new capture.
    draw_bochs(&mut vm, "bars", 0, (800, 600));
    assert_shows_at(
        &vnc_capture(&env, &vm.dir.join("vnc-0.sock"), "bv2.png"),
        Pattern::Bars,
        0,
        (800, 600),
    );

    // Bad requests: refused, the mode left off, nothing read back that was not taken.
    let err = vm.command("bochs mode 640 480 16", "err bochs");
    assert!(err.contains("mode 640x480 at 16 bits refused"), "{err}");
    let err = vm.command("bochs mode 4096 480", "err bochs");
    assert!(err.contains("refused"), "{err}");
    assert_eq!(
        vm.command("bochs reg 12 5", "bochs reg"),
        "bochs reg 12 = 0x0000"
    );
    // VRAM size in 64 KiB units, read-only (Linux's driver checks it against BAR 0).
    assert_eq!(
        vm.command("bochs reg 10 1", "bochs reg"),
        "bochs reg 10 = 0x0200"
    );
    assert_eq!(
        vm.command("bochs reg 0 4660", "bochs reg"),
        "bochs reg 0 = 0xb0c5"
    );
    let (w, h, rgb) = decode(&screenshot(&env, &vm.id, 0, "refused.png"));
    assert_eq!((w, h), (640, 480), "mode off: the configured size");
    assert!(rgb.iter().all(|&b| b == 0));
    let log = std::fs::read_to_string(vm.dir.join("vmm.log")).unwrap();
    assert!(
        log.contains("DISPI mode 640x480 at 16 bits per pixel refused"),
        "the VMM logs why"
    );
    assert!(log.contains("DISPI register 12 does not exist"));
    // The VM is unharmed and the device takes a good mode again.
    bochs_mode(&mut vm, 640, 480);
    draw_bochs(&mut vm, "fill", 0x123456, (640, 480));
    assert_shows(
        &screenshot(&env, &vm.id, 0, "b2.png"),
        Pattern::Fill,
        0x123456,
    );
    // The text console draws into the VRAM too.
    assert_eq!(
        vm.command("console 0", "console "),
        "console on display=0 53x26"
    );
    assert_eq!(vm.command("echo on the VRAM", "on the"), "on the VRAM");
    let rows = console_text(&screenshot(&env, &vm.id, 0, "console.png"));
    assert_eq!(
        &rows[..3],
        &[
            "console on display=0 53x26",
            "echo on the VRAM",
            "on the VRAM"
        ]
    );
}

#[test]
fn a_bochs_display_survives_snapshot_restore_and_live_migration() {
    let env = Env::new("disp-bochs-persist");
    let mut vm = env.boot(&["--memory", "128M", "--gpu", BOCHS]);
    vm.expect_line("ready", READY);
    bochs_mode(&mut vm, 800, 600);
    draw_bochs(&mut vm, "checker", 11, (800, 600));
    let back = snapshot_and_restore(&env, &vm, "back");
    assert_shows_at(
        &screenshot(&env, "back", 0, "r.png"),
        Pattern::Checker,
        11,
        (800, 600),
    );
    let mut moved = migrate(&env, &back, "moved");
    assert_shows_at(
        &screenshot(&env, "moved", 0, "m.png"),
        Pattern::Checker,
        11,
        (800, 600),
    );
    assert_shows_at(
        &vnc_capture(&env, &moved.dir.join("vnc-0.sock"), "mv.png"),
        Pattern::Checker,
        11,
        (800, 600),
    );
    // The guest's driver goes on drawing into the VRAM where it left it.
    let listing = moved.command("bochs", "bochs ");
    assert!(listing.contains("mode=800x600"), "{listing}");
    draw_bochs(&mut moved, "bars", 0, (800, 600));
    assert_shows_at(
        &screenshot(&env, "moved", 0, "m2.png"),
        Pattern::Bars,
        0,
        (800, 600),
    );
}
