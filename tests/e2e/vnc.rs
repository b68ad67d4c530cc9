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
