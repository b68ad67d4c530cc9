//! VNC encodings end to end: a real client (vncdotool) that asks for ZRLE gets the same
//! pixels as the PNG screenshot, through the server's ZRLE encoder and zlib stream.
use std::process::Command;
use std::time::Duration;

use ray_e2e::{python, Env};

use crate::display::decode;

#[test]
fn a_zrle_viewer_sees_the_screenshot_pixel_for_pixel() {
    let env = Env::new("vnc-zrle");
    let mut vm = env.boot(&["--memory", "128M", "--gpu", "emulated,width=640,height=480"]);
    vm.expect_line("ready", Duration::from_secs(20));
    // Many colours (gradient) on top, few (checker) below: every kind of ZRLE tile.
    assert!(vm
        .command("draw gradient 5 0", "draw ")
        .starts_with("draw gradient"));
    let shot = env.runtime.join("shot.png");
    env.ray_ok(&["gpu", "screenshot", &vm.id, "-o", shot.to_str().unwrap()]);
    let script = r#"
import sys
from vncdotool import api, client, rfb
client.VNCDoToolClient.encoding = rfb.Encoding.ZRLE
viewer = api.connect(sys.argv[1])
viewer.captureScreen(sys.argv[2])
viewer.captureScreen(sys.argv[3])
viewer.disconnect()
api.shutdown()
"#;
    let (v1, v2) = (env.runtime.join("z1.png"), env.runtime.join("z2.png"));
    let out = Command::new(python())
        .args(["-c", script, vm.dir.join("vnc-0.sock").to_str().unwrap()])
        .args([v1.to_str().unwrap(), v2.to_str().unwrap()])
        .output()
        .unwrap();
    ray_e2e::succeeded(out, "vncdotool with ZRLE");
    let (w, h, want) = decode(&shot);
    assert_eq!((w, h), (640, 480));
    for png in [&v1, &v2] {
        let (gw, gh, got) = decode(png);
        assert_eq!((gw, gh), (w, h));
        if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
            let px = i / 3;
            panic!(
                "{}: pixel ({}, {}) differs from the screenshot",
                png.display(),
                px % 640,
                px / 640
            );
        }
    }
    // The server did use ZRLE, and far fewer bytes than Raw's 640x480x4.
    // (Logged when the server notices the viewer left.)
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let line = loop {
        let log = std::fs::read_to_string(vm.dir.join("vmm.log")).unwrap();
        if let Some(l) = log.lines().find(|l| l.contains("VNC viewer's updates")) {
            break l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the VMM logs what a viewer was sent"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(line.contains("encoding=\"zrle\""), "{line}");
    let bytes: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("bytes="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(bytes < 640 * 480 * 4, "{line}");
}

/// The "VNC viewer's updates" line the VMM logs when a viewer leaves.
fn viewer_log_line(vm: &ray_e2e::Vm) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(vm.dir.join("vmm.log")).unwrap();
        if let Some(l) = log.lines().find(|l| l.contains("VNC viewer's updates")) {
            return l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the VMM logs what a viewer was sent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `key=N` number of a log line.
fn logged(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

#[test]
fn a_scrolling_guest_goes_to_a_copyrect_viewer_as_copies_and_the_picture_stays_exact() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let env = Env::new("vnc-copyrect");
    let mut vm = env.boot(&["--memory", "128M", "--gpu", "emulated,width=640,height=480"]);
    vm.expect_line("ready", Duration::from_secs(20));
    assert!(vm
        .command("draw gradient 9 0", "draw ")
        .starts_with("draw gradient"));
    // vncdotool decodes CopyRect but leaves applying it to its user: this viewer copies
    // within its picture (PIL), asks for CopyRect then ZRLE, and after each scroll takes
    // incremental updates until its picture equals the screenshot it is given.
    let script = r#"
import sys
from PIL import Image
from vncdotool import api, client, rfb
def connected(self):
    self.setImageMode()
    self.setEncodings([rfb.Encoding.COPY_RECTANGLE, rfb.Encoding.ZRLE])
    self.factory.clientConnectionMade(self)
def copy(self, sx, sy, x, y, w, h):
    self.screen.paste(self.screen.crop((sx, sy, sx + w, sy + h)), (x, y))
client.VNCDoToolClient.vncConnectionMade = connected
client.VNCDoToolClient.copyRectangle = copy
viewer = api.connect(sys.argv[1], timeout=60)
viewer.captureScreen(sys.argv[2])
print("ready", flush=True)
for line in sys.stdin:
    want_path, out = line.split()
    want = Image.open(want_path).convert("RGB").tobytes()
    for _ in range(50):
        viewer.captureScreen(out, incremental=True)
        if Image.open(out).convert("RGB").tobytes() == want:
            break
    else:
        sys.exit(f"{out} never equalled {want_path}")
    print("matched", flush=True)
viewer.disconnect()
api.shutdown()
"#;
    let first = env.runtime.join("c0.png");
    let mut child = Command::new(python())
        .args(["-c", script, vm.dir.join("vnc-0.sock").to_str().unwrap()])
        .arg(&first)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the viewer connected");
    for (i, lines) in [16, 40, 7].into_iter().enumerate() {
        let answer = vm.command(&format!("scroll {lines} 0"), "scroll ");
        assert_eq!(answer, format!("scroll {lines} display=0 640x480"));
        let shot = env.runtime.join(format!("shot{i}.png"));
        env.ray_ok(&["gpu", "screenshot", &vm.id, "-o", shot.to_str().unwrap()]);
        let got = env.runtime.join(format!("c{}.png", i + 1));
        writeln!(stdin, "{} {}", shot.display(), got.display()).unwrap();
        line.clear();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "matched", "after scroll {lines}");
        // And checked here too: the viewer's picture is the screenshot.
        let ((w, h, want), (gw, gh, px)) = (decode(&shot), decode(&got));
        assert_eq!((gw, gh), (w, h));
        assert!(
            px == want,
            "after scroll {lines}: the viewer's picture differs"
        );
    }
    drop(stdin);
    assert!(
        child.wait().unwrap().success(),
        "the viewer script ended well"
    );
    let line = viewer_log_line(&vm);
    // Each of the three scrolls went (at least partly) as CopyRect.
    assert!(logged(&line, "copyrect") >= 3, "{line}");
    assert!(line.contains("encoding=\"zrle\""), "{line}");
}

/// A raw RFB viewer that takes Raw and ExtendedDesktopSize, as the test drives it.
struct RawViewer(std::os::unix::net::UnixStream);

/// An ExtendedDesktopSize rectangle: (reason, status, width, height).
type ExtRect = (u16, u16, u16, u16);
/// A Raw rectangle: x, y, width, height and its XRGB pixels.
type RawRect = (u16, u16, u16, u16, Vec<u8>);

impl RawViewer {
    fn connect(socket: &std::path::Path) -> RawViewer {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut b = [0u8; 24];
        s.read_exact(&mut b[..12]).unwrap();
        s.write_all(b"RFB 003.008\n").unwrap();
        s.read_exact(&mut b[..2]).unwrap();
        assert_eq!(b[..2], [1, 1], "security type None");
        s.write_all(&[1]).unwrap();
        s.read_exact(&mut b[..4]).unwrap();
        s.write_all(&[1]).unwrap();
        s.read_exact(&mut b).unwrap();
        let mut name = vec![0u8; u32::from_be_bytes(b[20..24].try_into().unwrap()) as usize];
        s.read_exact(&mut name).unwrap();
        // SetEncodings: Raw, ExtendedDesktopSize (-308).
        s.write_all(&[2, 0, 0, 2, 0, 0, 0, 0, 0xff, 0xff, 0xfe, 0xcc])
            .unwrap();
        RawViewer(s)
    }

    fn set_desktop_size(&mut self, w: u16, h: u16) {
        use std::io::Write;
        let mut m = vec![251, 0];
        m.extend_from_slice(&w.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        m.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        m.extend_from_slice(&w.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        self.0.write_all(&m).unwrap();
    }

    /// Asks for an update of (0, 0, w, h) and reads it: its ExtendedDesktopSize
    /// rectangles, and the pixels of its Raw rectangles (x, y, w, h, XRGB bytes).
    fn update(&mut self, incremental: bool, w: u16, h: u16) -> (Vec<ExtRect>, Vec<RawRect>) {
        self.request(incremental, w, h);
        self.reply()
    }

    /// Sends an update request for (0, 0, w, h).
    fn request(&mut self, incremental: bool, w: u16, h: u16) {
        use std::io::Write;
        let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
        m.extend_from_slice(&w.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        self.0.write_all(&m).unwrap();
    }

    /// Reads the answer to a request (see [`RawViewer::update`]).
    fn reply(&mut self) -> (Vec<ExtRect>, Vec<RawRect>) {
        use std::io::Read;
        let mut hdr = [0u8; 4];
        self.0.read_exact(&mut hdr).unwrap();
        assert_eq!(hdr[0], 0, "a FramebufferUpdate");
        let (mut ext, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..u16::from_be_bytes([hdr[2], hdr[3]]) {
            let mut r = [0u8; 12];
            self.0.read_exact(&mut r).unwrap();
            let f = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]);
            match i32::from_be_bytes(r[8..12].try_into().unwrap()) {
                -308 => {
                    let mut n = [0u8; 4];
                    self.0.read_exact(&mut n).unwrap();
                    assert_eq!(n[0], 1, "one screen a display");
                    let mut screen = [0u8; 16];
                    self.0.read_exact(&mut screen).unwrap();
                    assert_eq!(&screen[8..12], &r[4..8], "the screen is the framebuffer");
                    ext.push((f(0), f(2), f(4), f(6)));
                }
                0 => {
                    let mut px = vec![0u8; usize::from(f(4)) * usize::from(f(6)) * 4];
                    self.0.read_exact(&mut px).unwrap();
                    raw.push((f(0), f(2), f(4), f(6), px));
                }
                other => panic!("unexpected encoding {other}"),
            }
        }
        (ext, raw)
    }

    /// Sends incremental requests until an ExtendedDesktopSize rectangle comes; returns it.
    fn next_ext(&mut self, w: u16, h: u16) -> ExtRect {
        for _ in 0..100 {
            let (ext, _) = self.update(true, w, h);
            if let Some(e) = ext.first() {
                return *e;
            }
        }
        panic!("no ExtendedDesktopSize rectangle in 100 updates");
    }
}

#[test]
fn set_desktop_size_resizes_a_virtio_display_and_every_viewer_sees_it() {
    use crate::display::{assert_shows_at, draw_virtio, expected, screenshot};
    use ray_guest_abi::display::Pattern;
    let env = Env::new("vnc-setsize");
    // Display 0 is the emulated GPU's, display 1 the virtio GPU's.
    let mut vm = env.boot(&[
        "--memory",
        "128M",
        "--gpu",
        "emulated,width=640,height=480",
        "--gpu",
        "virtio,width=640,height=480",
    ]);
    vm.expect_line("ready", Duration::from_secs(20));
    draw_virtio(&mut vm, "gradient", 4, 1);
    let mut rw = RawViewer::connect(&vm.dir.join("vnc-1.sock"));
    let mut other = RawViewer::connect(&vm.dir.join("vnc-1.sock"));
    let mut view = RawViewer::connect(&vm.dir.join("vnc-1-view.sock"));
    let mut emulated = RawViewer::connect(&vm.dir.join("vnc-0.sock"));
    // Each is first told the layout (reason 0: server, status 0) with the picture.
    for v in [&mut rw, &mut other, &mut view, &mut emulated] {
        let (ext, raw) = v.update(false, 640, 480);
        assert_eq!(ext, [(0, 0, 640, 480)]);
        assert_eq!(raw.len(), 1);
    }
    // Refusals change nothing: a view-only viewer and an emulated display are
    // prohibited (status 1), a size outside the GPU's caps is invalid (status 3).
    view.set_desktop_size(800, 600);
    assert_eq!(view.next_ext(640, 480), (1, 1, 640, 480));
    emulated.set_desktop_size(800, 600);
    assert_eq!(emulated.next_ext(640, 480), (1, 1, 640, 480));
    rw.set_desktop_size(100, 600);
    assert_eq!(rw.next_ext(640, 480), (1, 3, 640, 480));
    rw.set_desktop_size(4000, 600);
    assert_eq!(rw.next_ext(640, 480), (1, 3, 640, 480));
    let sizes = |vm: &ray_e2e::Vm| -> Vec<(u32, u32)> {
        let list: ray_api::gpu::GpuList = vm.client.call("GET", "/vm/gpus", None).unwrap();
        list.gpus
            .iter()
            .flat_map(|g| g.displays.iter().map(|d| (d.width, d.height)))
            .collect()
    };
    assert_eq!(sizes(&vm), [(640, 480), (640, 480)]);

    // A valid request: success for the requester (reason 1), the guest gets the
    // display event and redraws at the new size, the others are told (reason 2).
    rw.set_desktop_size(800, 600);
    assert_eq!(rw.next_ext(640, 480), (1, 0, 800, 600));
    let line = vm.expect_line("gpu display event: scanout 0", Duration::from_secs(20));
    assert_eq!(line, "gpu display event: scanout 0 is 800x600 events=1");
    assert_eq!(sizes(&vm), [(640, 480), (800, 600)]);
    assert_eq!(other.next_ext(640, 480), (2, 0, 800, 600));
    assert_eq!(view.next_ext(640, 480), (2, 0, 800, 600));
    let (changed, _, _) = draw_virtio(&mut vm, "checker", 6, 1);
    assert_eq!(changed, "800x600+0+0");
    assert_shows_at(
        &screenshot(&env, &vm.id, 1, "resized.png"),
        Pattern::Checker,
        6,
        (800, 600),
    );
    // The viewer's own picture at the new size is the guest's pattern.
    let (_, raw) = rw.update(false, 800, 600);
    assert_eq!(raw.len(), 1);
    let (x, y, w, h, px) = &raw[0];
    assert_eq!((*x, *y, *w, *h), (0, 0, 800, 600));
    let rgb: Vec<u8> = px
        .chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect();
    assert!(
        rgb == expected(Pattern::Checker, 6, 800, 600),
        "the viewer's pixels are the checker pattern"
    );
    // `ray gpu resize` is the server's doing (reason 0).
    env.ray_ok(&["gpu", "resize", &vm.id, "--display", "1", "1024x768"]);
    assert_eq!(rw.next_ext(800, 600), (0, 0, 1024, 768));
    assert_eq!(other.next_ext(800, 600), (0, 0, 1024, 768));
    vm.expect_line(
        "gpu display event: scanout 0 is 1024x768",
        Duration::from_secs(20),
    );

    // A broken SetDesktopSize (no screens) closes that viewer only, with a log line.
    {
        use std::io::{Read, Write};
        other.0.write_all(&[251, 0, 3, 32, 2, 88, 0, 0]).unwrap();
        let mut rest = Vec::new();
        let _ = other.0.read_to_end(&mut rest);
    }
    assert_eq!(view.next_ext(800, 600), (0, 0, 1024, 768));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(vm.dir.join("vmm.log"))
        .unwrap()
        .contains("VNC viewer closed: SetDesktopSize lists no screens")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the VMM logs why it closed the viewer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(vm.command("echo still here", "still"), "still here");

    // The traffic in /metrics: per display, and per viewer connected now (the closed
    // one is gone); each viewer had at least one whole 640x480 picture in Raw.
    let m = metrics(&vm);
    let picture = 640.0 * 480.0 * 4.0;
    // Viewers are numbered as the server accepts them, over all displays and sockets:
    // found here by display and role. Display 1 has two left (the closed one is gone).
    for role in ["read-write", "view-only"] {
        let of = |name: &str| -> Vec<f64> {
            m.iter()
                .filter(|(k, _)| {
                    k.starts_with(&format!("{name}{{display=\"1\",viewer="))
                        && k.ends_with(&format!(",role=\"{role}\"}}"))
                })
                .map(|(_, v)| *v)
                .collect()
        };
        let (bytes, updates) = (
            of("ray_vnc_viewer_bytes_total"),
            of("ray_vnc_viewer_updates_total"),
        );
        assert_eq!(
            (bytes.len(), updates.len()),
            (1, 1),
            "one {role} viewer: {m:#?}"
        );
        assert!(bytes[0] > picture, "{m:#?}");
        assert!(updates[0] >= 1.0, "{m:#?}");
    }
    assert!(m["ray_vnc_updates_total{display=\"1\"}"] >= 4.0, "{m:#?}");
    assert!(
        m["ray_vnc_bytes_total{display=\"1\"}"] > 3.0 * picture,
        "{m:#?}"
    );
    assert!(m["ray_vnc_updates_total{display=\"0\"}"] >= 1.0, "{m:#?}");
    // The virtio GPU (GPU 1) served the guest's commands, in measurable time.
    assert!(m["ray_gpu_commands_total{gpu=\"1\"}"] >= 3.0, "{m:#?}");
    assert!(m["ray_gpu_busy_seconds_total{gpu=\"1\"}"] > 0.0, "{m:#?}");
}

/// `GET /metrics` as (name{labels}, value).
fn metrics(vm: &ray_e2e::Vm) -> std::collections::BTreeMap<String, f64> {
    let a = vm.client.raw("GET", "/metrics", None).unwrap();
    String::from_utf8_lossy(&a.body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The emulated display's change-detection counts, as `ray gpu status -o json` shows.
fn changes(env: &Env, id: &str) -> ray_api::gpu::ChangeDetection {
    let out = env.ray_ok(&["gpu", "status", id, "-o", "json"]);
    let list: ray_api::gpu::GpuList = serde_json::from_str(&out).unwrap();
    list.gpus[0].displays[0]
        .changes
        .clone()
        .unwrap_or_else(|| panic!("no change detection in {out}"))
}

/// The emulated display's changes are found through the dirty log: while the guest
/// draws nothing, a waiting viewer costs no tile compare; a small rectangle the guest
/// fills has only the tiles of its pages compared (a tile row of ten here, of 80), the
/// one tile it covers is sent, and the viewer's picture is the screenshot's.
#[test]
fn a_small_rectangle_is_found_through_the_dirty_log_and_an_idle_display_costs_no_compare() {
    use crate::display::screenshot;
    let env = Env::new("vnc-dirty");
    let mut vm = env.boot(&["--memory", "128M", "--gpu", "emulated,width=640,height=480"]);
    vm.expect_line("ready", Duration::from_secs(20));
    vm.command("draw checker 7 0", "draw ");
    let mut viewer = RawViewer::connect(&vm.dir.join("vnc-0.sock"));
    let (_, raw) = viewer.update(false, 640, 480);
    assert_eq!(raw.len(), 1);
    let mut picture = raw.into_iter().next().unwrap().4;
    let start = changes(&env, &vm.id);
    assert_eq!(start.mode, "dirty-log", "{start:?}");
    // A pending incremental request: the viewer looks every 10 ms; nothing is written.
    viewer.request(true, 640, 480);
    std::thread::sleep(Duration::from_millis(1500));
    let idle = changes(&env, &vm.id);
    assert_eq!(
        (idle.tiles_examined, idle.looks),
        (start.tiles_examined, start.looks),
        "an idle display was compared: {idle:?}"
    );
    let answer = vm.command("rect 100 100 20 10 0xff0000 0", "rect ");
    assert_eq!(answer, "rect display=0 20x10+100+100");
    let (_, raw) = viewer.reply();
    // The tile (64, 64)-(128, 128) holds the whole rectangle.
    assert_eq!(
        raw.iter().map(|r| (r.0, r.1, r.2, r.3)).collect::<Vec<_>>(),
        [(64, 64, 64, 64)]
    );
    for (x, y, w, h, px) in &raw {
        for row in 0..usize::from(*h) {
            let a = ((usize::from(*y) + row) * 640 + usize::from(*x)) * 4;
            let b = row * usize::from(*w) * 4;
            picture[a..a + usize::from(*w) * 4].copy_from_slice(&px[b..b + usize::from(*w) * 4]);
        }
    }
    let after = changes(&env, &vm.id);
    let examined = after.tiles_examined - idle.tiles_examined;
    let changed = after.tiles_changed - idle.tiles_changed;
    // The rectangle's lines are in pages of the tile row 64..128 only; a look may fall
    // in the middle of the drawing and the row be compared twice.
    assert!(
        (1..=20).contains(&examined) && (1..=2).contains(&changed),
        "{examined} tiles examined, {changed} changed: {after:?}"
    );
    assert!(after.dirty_pages > idle.dirty_pages, "{after:?}");
    // The viewer's picture is the screenshot, pixel for pixel.
    let (w, h, rgb) = decode(&screenshot(&env, &vm.id, 0, "dirty.png"));
    assert_eq!((w, h), (640, 480));
    let mine: Vec<u8> = picture
        .chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect();
    assert!(
        mine == rgb,
        "the viewer's picture differs from the screenshot"
    );
    assert_eq!(&rgb[(105 * 640 + 105) * 3..][..3], &[0xff, 0, 0]);
}

/// The guest sets a new mode on its Bochs display: a connected viewer is told the new
/// size (ExtendedDesktopSize, reason server) and its picture at that size is what the
/// guest drew into the VRAM.
#[test]
fn a_bochs_mode_set_by_the_guest_resizes_a_connected_viewer() {
    use crate::display::expected;
    use ray_guest_abi::display::Pattern;
    let env = Env::new("vnc-bochs");
    let mut vm = env.boot(&[
        "--memory",
        "128M",
        "--gpu",
        "emulated,device=bochs,width=640,height=480",
    ]);
    vm.expect_line("ready", Duration::from_secs(20));
    let mut rw = RawViewer::connect(&vm.dir.join("vnc-0.sock"));
    let (ext, raw) = rw.update(false, 640, 480);
    assert_eq!(ext, [(0, 0, 640, 480)], "no mode yet: the configured size");
    assert_eq!(raw.len(), 1);
    let answer = vm.command("bochs mode 800 600", "bochs mode ");
    assert_eq!(answer, "bochs mode 800x600 bpp=32 stride=3200");
    assert_eq!(rw.next_ext(640, 480), (0, 0, 800, 600));
    let answer = vm.command("draw gradient 5 0", "draw ");
    assert_eq!(answer, "draw gradient seed=5 display=0 800x600");
    let (_, raw) = rw.update(false, 800, 600);
    assert_eq!(raw.len(), 1);
    let (x, y, w, h, px) = &raw[0];
    assert_eq!((*x, *y, *w, *h), (0, 0, 800, 600));
    let rgb: Vec<u8> = px
        .chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect();
    assert!(
        rgb == expected(Pattern::Gradient, 5, 800, 600),
        "the viewer's pixels are the gradient pattern"
    );
    // A mode the device refuses turns the display off: the configured size again.
    let err = vm.command("bochs mode 800 600 24", "err bochs");
    assert!(err.contains("refused"), "{err}");
    assert_eq!(rw.next_ext(800, 600), (0, 0, 640, 480));
}

/// A connected viewer's incremental updates carry what the guest draws into a Bochs
/// display's VRAM: found through the VRAM slot's dirty log, or by comparing every tile
/// with `RAY_DISPLAY_CHANGES=tile-compare`; `ray gpu status` names the way.
fn bochs_changes_reach_a_connected_viewer(tile_compare: bool) {
    use crate::display::expected;
    use ray_guest_abi::display::Pattern;
    let env = Env::new(if tile_compare {
        "vnc-bochs-tiles"
    } else {
        "vnc-bochs-dirty"
    });
    let vars: &[(&str, &str)] = if tile_compare {
        &[("RAY_DISPLAY_CHANGES", "tile-compare")]
    } else {
        &[]
    };
    let out = ray_e2e::succeeded(
        env.ray_with(
            &[
                "vm",
                "run",
                "--detach",
                "--json",
                "--memory",
                "128M",
                "--gpu",
                "emulated,device=bochs,width=640,height=480",
            ],
            vars,
        ),
        "vm run",
    );
    let info: ray_api::vmm::VmInfo = serde_json::from_str(&out).unwrap();
    let mut vm = env.attach(&info.id, info.pid);
    vm.expect_line("ready", Duration::from_secs(20));
    vm.command("bochs mode 640 480", "bochs mode ");
    vm.command("draw checker 3 0", "draw ");
    let mut rw = RawViewer::connect(&vm.dir.join("vnc-0.sock"));
    let (_, raw) = rw.update(false, 640, 480);
    let mut frame = raw[0].4.clone();
    let rgb = |frame: &[u8]| -> Vec<u8> {
        frame
            .chunks_exact(4)
            .flat_map(|p| [p[2], p[1], p[0]])
            .collect()
    };
    assert!(rgb(&frame) == expected(Pattern::Checker, 3, 640, 480));
    vm.command("draw fill 0x123456 0", "draw ");
    let want = expected(Pattern::Fill, 0x123456, 640, 480);
    for _ in 0..100 {
        if rgb(&frame) == want {
            break;
        }
        let (_, raw) = rw.update(true, 640, 480);
        for (x, y, w, h, px) in raw {
            let (x, y, w) = (usize::from(x), usize::from(y), usize::from(w));
            for row in 0..usize::from(h) {
                let at = ((y + row) * 640 + x) * 4;
                frame[at..at + w * 4].copy_from_slice(&px[row * w * 4..(row + 1) * w * 4]);
            }
        }
    }
    assert!(
        rgb(&frame) == want,
        "the viewer's picture is the fill the guest drew"
    );
    let list: ray_api::gpu::GpuList = vm.client.call("GET", "/vm/gpus", None).unwrap();
    let changes = list.gpus[0].displays[0].changes.clone().unwrap();
    let mode = if tile_compare {
        "tile-compare"
    } else {
        "dirty-log"
    };
    assert_eq!(changes.mode, mode);
    assert!(changes.tiles_changed > 0, "{changes:?}");
    if tile_compare {
        assert_eq!(changes.dirty_pages, 0, "{changes:?}");
    } else {
        assert!(changes.dirty_pages > 0, "{changes:?}");
    }
}

#[test]
fn a_bochs_display_s_changes_reach_a_viewer_through_the_vram_dirty_log() {
    bochs_changes_reach_a_connected_viewer(false);
}

#[test]
fn a_bochs_display_s_changes_reach_a_viewer_by_tile_compare_without_the_log() {
    bochs_changes_reach_a_connected_viewer(true);
}
