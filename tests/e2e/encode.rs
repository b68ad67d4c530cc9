//! Encode sessions on a running VM (seccomp in kill mode, the default): the guest draws a
//! known pattern, the session encodes it to H.264, the file decodes back to the screenshot
//! with Y PSNR >= 35 dB, and an idle display adds no frames.
use std::time::{Duration, Instant};

use ray_api::decode::{DecodeList, DecodeSessionInfo, DecodeSource, DecodeStateName};
use ray_api::encode::{EncodeList, EncodeSessionInfo, EncodeStateName};
use ray_display::encode::{y_psnr, H264Decoder};
use ray_e2e::Env;

fn sessions(env: &Env, id: &str) -> EncodeList {
    serde_json::from_str(&env.ray_ok(&["gpu", "encode", "list", id, "-o", "json"])).unwrap()
}

fn wait_frames(env: &Env, id: &str, at_least: u64) -> EncodeSessionInfo {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = sessions(env, id).sessions.remove(0);
        if s.frames >= at_least {
            return s;
        }
        assert!(Instant::now() < deadline, "no frame {at_least}: {s:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_encoded_pattern_decodes_back_and_an_idle_display_adds_no_frames() {
    let env = Env::new("encode");
    // Its stream goes beside the runtime directory, outside the VM's: the jailed VMM is
    // handed the file `ray gpu encode start` made (its root holds only its directory).
    let mut vm = env.boot(&[
        "--jail",
        "--memory",
        "128M",
        "--gpu",
        "emulated,width=640,height=480,displays=2",
    ]);
    vm.expect_line("ready", Duration::from_secs(20));
    let out = env.runtime.join("d0.h264");
    let started: EncodeSessionInfo = serde_json::from_str(&env.ray_ok(&[
        "gpu",
        "encode",
        "start",
        &vm.id,
        "--fps",
        "30",
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(started.display, 0);
    // The first look at the display is a frame; then the guest draws.
    wait_frames(&env, &vm.id, 1);
    let answer = vm.command("draw checker 7 0", "draw ");
    assert_eq!(answer, "draw checker seed=7 display=0 640x480");
    wait_frames(&env, &vm.id, 2);
    // A look may have caught the picture half drawn (a frame), and the next one the whole
    // of it (another): the count settles once a look finds the display unchanged.
    let mut after_draw = sessions(&env, &vm.id).sessions.remove(0);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = sessions(&env, &vm.id).sessions.remove(0);
        if now.frames == after_draw.frames {
            break;
        }
        after_draw = now;
    }
    // One second (30 looks at 30 fps) of a still display: no frame.
    std::thread::sleep(Duration::from_millis(1000));
    let idle = sessions(&env, &vm.id).sessions.remove(0);
    assert_eq!(idle.state, EncodeStateName::Running);
    assert_eq!(
        idle.frames, after_draw.frames,
        "an idle display is not encoded"
    );
    assert_eq!(idle.bytes, after_draw.bytes);
    // The same in /metrics, with its latency.
    let text =
        String::from_utf8_lossy(&vm.client.raw("GET", "/metrics", None).unwrap().body).into_owned();
    let labels = format!("{{session=\"{}\",display=\"0\",codec=\"h264\"}}", idle.id);
    for (name, want) in [
        ("ray_encode_frames_total", idle.frames as f64),
        ("ray_encode_bytes_total", idle.bytes as f64),
    ] {
        let line = format!("{name}{labels} {want}");
        assert!(text.lines().any(|l| l == line), "no `{line}` in {text}");
    }
    let latency: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("ray_encode_mean_latency_ms{labels} ")))
        .unwrap_or_else(|| panic!("no mean latency in {text}"))
        .parse()
        .unwrap();
    assert!(latency > 0.0, "{latency}");

    // Limits and codecs are refused with what is wrong (HEVC where ray is built without
    // the `ffmpeg` feature; with it, `hevc_and_vp9_sessions_decode_back_through_the_cli`).
    #[cfg(not(feature = "ffmpeg"))]
    let err = env.ray(&[
        "gpu",
        "encode",
        "start",
        &vm.id,
        "--codec",
        "hevc",
        "-o",
        "/tmp/x.hevc",
    ]);
    #[cfg(not(feature = "ffmpeg"))]
    {
        let msg = String::from_utf8_lossy(&err.stderr);
        assert!(!err.status.success() && msg.contains("`ffmpeg`"), "{msg}");
    }
    let err = env.ray(&[
        "gpu",
        "encode",
        "start",
        &vm.id,
        "--display",
        "7",
        "-o",
        "/tmp/x.h264",
    ]);
    let msg = String::from_utf8_lossy(&err.stderr);
    assert!(
        !err.status.success() && msg.contains("display 7 does not exist"),
        "{msg}"
    );

    let shot = env.runtime.join("d0.png");
    env.ray_ok(&["gpu", "screenshot", &vm.id, "-o", shot.to_str().unwrap()]);
    let status = env.ray_ok(&["gpu", "status", &vm.id]);
    assert!(
        status.contains("h264") && status.contains("running"),
        "{status}"
    );
    let stopped: EncodeSessionInfo = serde_json::from_str(&env.ray_ok(&[
        "gpu",
        "encode",
        "stop",
        &vm.id,
        &started.id.to_string(),
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(stopped.state, EncodeStateName::Stopped);

    let stream = std::fs::read(&out).unwrap();
    assert_eq!(stream.len() as u64, stopped.bytes);
    let mut last = None;
    let n = H264Decoder::new()
        .unwrap()
        .decode(&stream, |f| last = Some(f))
        .unwrap();
    assert_eq!(n as u64, stopped.frames);
    let last = last.unwrap();
    let (w, h, rgb) = crate::display::decode(&shot);
    assert_eq!((last.width, last.height), (w, h));
    let xrgb: Vec<u8> = rgb
        .chunks_exact(3)
        .flat_map(|p| [p[2], p[1], p[0], 0])
        .collect();
    let psnr = y_psnr(&xrgb, (w * 4) as usize, &last.y, w as usize, h as usize);
    assert!(psnr >= 35.0, "Y PSNR {psnr:.1} dB < 35 dB");

    // The CLI decodes it too.
    let png = env.runtime.join("last.png");
    let said = env.ray_ok(&[
        "gpu",
        "decode",
        out.to_str().unwrap(),
        "--last",
        "-o",
        png.to_str().unwrap(),
    ]);
    assert!(said.contains("640x480"), "{said}");
    assert_eq!(crate::display::decode(&png).0, 640);
}

/// With the `ffmpeg` feature (the README's test command builds with it): HEVC and VP9
/// sessions of a drawn display in a jailed VMM, each file decoded by `ray gpu decode` (through FFmpeg) to
/// a last picture within 30 dB RGB PSNR of the screenshot; `ray gpu status` lists them.
/// Decode sessions in the VMM do the same: live, of each encode session's stream, and of
/// each file (done, with every frame).
#[cfg(feature = "ffmpeg")]
#[test]
fn hevc_and_vp9_sessions_decode_back_through_the_cli() {
    let env = Env::new("encode-ff");
    // Jailed: its sessions write into the VM's own directory and claim the host's slots
    // through the jail's read-only view of them.
    let mut vm = env.boot(&[
        "--jail",
        "--memory",
        "128M",
        "--gpu",
        "emulated,width=640,height=480",
    ]);
    vm.expect_line("ready", Duration::from_secs(20));
    // A file elsewhere asked of the API alone is refused by name (`ray gpu encode start`
    // makes it and hands it over instead), and a hand-off nobody made is named.
    let outside = env.runtime.join("outside.hevc");
    let body = |extra: &str| {
        format!(
            r#"{{"codec":"hevc","path":"{}"{extra}}}"#,
            outside.display()
        )
        .into_bytes()
    };
    let refused = vm
        .client
        .raw("POST", "/vm/display/0/encode", Some(body("")))
        .unwrap();
    let err = String::from_utf8_lossy(&refused.body);
    assert_eq!(refused.status, 400, "a jailed VMM wrote {outside:?}: {err}");
    assert!(
        err.contains("jailed") && err.contains("encode session's output"),
        "{err}"
    );
    let refused = vm
        .client
        .raw(
            "POST",
            "/vm/display/0/encode",
            Some(body(r#","handoff":"nobody-made-it""#)),
        )
        .unwrap();
    let err = String::from_utf8_lossy(&refused.body);
    assert_eq!(refused.status, 400, "{err}");
    assert!(
        err.contains("nothing was handed to this VMM") && err.contains("nobody-made-it"),
        "{err}"
    );
    assert!(!outside.exists());
    let mut started = Vec::new();
    for (codec, file) in [("hevc", "d0.hevc"), ("vp9", "d0.ivf")] {
        let out = vm.dir.join(file);
        let s: EncodeSessionInfo = serde_json::from_str(&env.ray_ok(&[
            "gpu",
            "encode",
            "start",
            &vm.id,
            "--codec",
            codec,
            "--fps",
            "30",
            "-o",
            out.to_str().unwrap(),
            "--json",
        ]))
        .unwrap();
        started.push((s.id, out));
    }
    let status = env.ray_ok(&["gpu", "status", &vm.id]);
    assert!(
        status.contains("hevc") && status.contains("vp9"),
        "{status}"
    );
    let vm_id = vm.id.clone();
    let frames = |id: u32| {
        sessions(&env, &vm_id)
            .sessions
            .into_iter()
            .find(|s| s.id == id)
            .unwrap()
            .frames
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while started.iter().any(|(id, _)| frames(*id) < 1) {
        assert!(Instant::now() < deadline, "no first frames");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A live decode session of each (through FFmpeg, in the jailed VMM).
    let live: Vec<DecodeSessionInfo> = started
        .iter()
        .map(|(id, _)| decode_start(&env, &vm.id, &["--encode-session", &id.to_string()], false))
        .collect();
    vm.command("draw gradient 3 0", "draw ");
    while started.iter().any(|(id, _)| frames(*id) < 2) {
        assert!(Instant::now() < deadline, "no frames after the draw");
        std::thread::sleep(Duration::from_millis(50));
    }
    let shot = env.runtime.join("shot.png");
    env.ray_ok(&["gpu", "screenshot", &vm.id, "-o", shot.to_str().unwrap()]);
    for d in &live {
        let png = env.runtime.join(format!("live-{}.png", d.codec));
        let deadline = Instant::now() + Duration::from_secs(20);
        let psnr = loop {
            let got = env.ray(&[
                "gpu",
                "decode-session",
                "frame",
                &vm.id,
                &d.id.to_string(),
                "-o",
                png.to_str().unwrap(),
            ]);
            let psnr = if got.status.success() {
                rgb_psnr(&png, &shot)
            } else {
                0.0
            };
            if psnr >= 30.0 || Instant::now() > deadline {
                break psnr;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            psnr >= 30.0,
            "live {}: RGB PSNR {psnr:.1} dB < 30 dB",
            d.codec
        );
    }
    for ((id, out), d) in started.into_iter().zip(&live) {
        let stopped: EncodeSessionInfo = serde_json::from_str(&env.ray_ok(&[
            "gpu",
            "encode",
            "stop",
            &vm.id,
            &id.to_string(),
            "-o",
            "json",
        ]))
        .unwrap();
        assert_decodes_to(&env, &out, &shot);
        // The file by a decode session in the VMM: done, every frame, the same picture.
        let from_file = decode_start(&env, &vm.id, &["--file", out.to_str().unwrap()], true);
        assert_eq!(from_file.state, DecodeStateName::Done, "{from_file:?}");
        assert_eq!(from_file.codec, stopped.codec);
        assert_eq!(from_file.frames, stopped.frames, "{out:?}");
        let png = out.with_extension("session.png");
        env.ray_ok(&[
            "gpu",
            "decode-session",
            "frame",
            &vm.id,
            &from_file.id.to_string(),
            "-o",
            png.to_str().unwrap(),
        ]);
        let psnr = rgb_psnr(&png, &shot);
        assert!(psnr >= 30.0, "{out:?}: RGB PSNR {psnr:.1} dB < 30 dB");
        // Its encode session stopped: the live session's stream ended.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !decode_info(&env, &vm.id, d.id).state.is_final() {
            assert!(Instant::now() < deadline, "live {} never ended", d.codec);
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(decode_info(&env, &vm.id, d.id).state, DecodeStateName::Done);
    }
}

/// RGB PSNR of the PNG `a` against the PNG `b`, which must be the same size.
fn rgb_psnr(a: &std::path::Path, b: &std::path::Path) -> f64 {
    let (aw, ah, argb) = crate::display::decode(a);
    let (bw, bh, brgb) = crate::display::decode(b);
    assert_eq!(
        (aw, ah),
        (bw, bh),
        "{} against {}",
        a.display(),
        b.display()
    );
    let sse: f64 = argb
        .iter()
        .zip(&brgb)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum();
    10.0 * (255.0f64.powi(2) / (sse / argb.len() as f64).max(1e-9)).log10()
}

/// `ray gpu decode --last` of `stream` is within 30 dB RGB PSNR of the screenshot `shot`
/// (all three colours, 4:2:0 chroma included: a lower bar than the luma-only 35 dB).
fn assert_decodes_to(env: &Env, stream: &std::path::Path, shot: &std::path::Path) {
    let png = stream.with_extension("png");
    env.ray_ok(&[
        "gpu",
        "decode",
        stream.to_str().unwrap(),
        "--last",
        "-o",
        png.to_str().unwrap(),
    ]);
    let psnr = rgb_psnr(&png, shot);
    assert!(
        psnr >= 30.0,
        "{}: RGB PSNR {psnr:.1} dB < 30 dB",
        stream.display()
    );
    eprintln!("{}: RGB PSNR {psnr:.1} dB", stream.display());
}

/// A session without a file streams to its watchers only: nothing is encoded until
/// `ray gpu encode watch` connects, the watcher sees the guest's drawing live, and a
/// watcher that joins a still display starts at a key frame of its own; both streams
/// decode to the screenshot. A bad session number is refused by name.
#[test]
fn a_session_streams_live_to_its_watchers_from_a_key_frame() {
    let env = Env::new("encode-watch");
    let mut vm = env.boot(&["--memory", "128M", "--gpu", "emulated,width=640,height=480"]);
    vm.expect_line("ready", Duration::from_secs(20));
    let id = vm.id.clone();
    let mut codecs = vec![("h264", "h264")];
    if cfg!(feature = "ffmpeg") {
        codecs.push(("hevc", "hevc"));
    }
    for (codec, ext) in codecs {
        let s: EncodeSessionInfo = serde_json::from_str(&env.ray_ok(&[
            "gpu", "encode", "start", &id, "--codec", codec, "--fps", "30", "--json",
        ]))
        .unwrap();
        assert_eq!(s.path, None);
        let session = s.id.to_string();
        let info = |env: &Env| {
            sessions(env, &id)
                .sessions
                .into_iter()
                .find(|x| x.id == s.id)
                .unwrap()
        };
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            info(&env).frames,
            0,
            "{codec}: nobody watches, nothing encoded"
        );

        let live = env.runtime.join(format!("live.{ext}"));
        let late = env.runtime.join(format!("late.{ext}"));
        let shot = env.runtime.join(format!("shot-{codec}.png"));
        std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                env.ray(&[
                    "gpu",
                    "encode",
                    "watch",
                    &id,
                    &session,
                    "--seconds",
                    "6",
                    "-o",
                    live.to_str().unwrap(),
                ])
            });
            let deadline = Instant::now() + Duration::from_secs(20);
            while info(&env).watchers < 1 || info(&env).frames < 1 {
                assert!(
                    Instant::now() < deadline,
                    "{codec}: the watcher never joined"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            let seed = if codec == "h264" { "5" } else { "9" };
            vm.command(&format!("draw checker {seed} 0"), "draw ");
            while info(&env).frames < 2 {
                assert!(
                    Instant::now() < deadline,
                    "{codec}: the drawing was not encoded"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            // The display is still now: a second watcher gets a key frame of it at once.
            std::thread::sleep(Duration::from_millis(500));
            env.ray_ok(&["gpu", "screenshot", &id, "-o", shot.to_str().unwrap()]);
            let second = env.ray(&[
                "gpu",
                "encode",
                "watch",
                &id,
                &session,
                "--seconds",
                "2",
                "-o",
                late.to_str().unwrap(),
            ]);
            assert!(
                second.status.success(),
                "{}",
                String::from_utf8_lossy(&second.stderr)
            );
            let first = watcher.join().unwrap();
            assert!(
                first.status.success(),
                "{}",
                String::from_utf8_lossy(&first.stderr)
            );
        });
        for file in [&live, &late] {
            assert_decodes_to(&env, file, &shot);
        }
        env.ray_ok(&["gpu", "encode", "stop", &id, &session]);
    }
    let bad = env.ray(&["gpu", "encode", "watch", &id, "42", "-o", "/dev/null"]);
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && msg.contains("encode session 42 does not exist"),
        "{msg}"
    );
}

fn decode_info(env: &Env, id: &str, session: u32) -> DecodeSessionInfo {
    serde_json::from_str(&env.ray_ok(&[
        "gpu",
        "decode-session",
        "show",
        id,
        &session.to_string(),
        "-o",
        "json",
    ]))
    .unwrap()
}

/// Starts a decode session through the CLI (`--json`, and `--wait` when `wait`).
fn decode_start(env: &Env, id: &str, args: &[&str], wait: bool) -> DecodeSessionInfo {
    let mut all = vec!["gpu", "decode-session", "start", id, "--json"];
    if wait {
        all.push("--wait");
    }
    all.extend_from_slice(args);
    serde_json::from_str(&env.ray_ok(&all)).unwrap()
}

/// `ray gpu decode-session start` that must fail; its error message.
fn decode_refused(env: &Env, id: &str, args: &[&str]) -> String {
    let mut all = vec!["gpu", "decode-session", "start", id];
    all.extend_from_slice(args);
    let out = env.ray(&all);
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} was not refused: {msg}");
    msg
}

/// Y PSNR (BT.601 luma of each pixel) of the PNG `a` against the PNG `b`.
fn luma_psnr(a: &std::path::Path, b: &std::path::Path) -> f64 {
    let (aw, ah, argb) = crate::display::decode(a);
    let (bw, bh, brgb) = crate::display::decode(b);
    assert_eq!(
        (aw, ah),
        (bw, bh),
        "{} against {}",
        a.display(),
        b.display()
    );
    let luma =
        |p: &[u8]| 0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]);
    let sse: f64 = argb
        .chunks_exact(3)
        .zip(brgb.chunks_exact(3))
        .map(|(x, y)| (luma(x) - luma(y)).powi(2))
        .sum();
    10.0 * (255.0f64.powi(2) / (sse / f64::from(aw * ah)).max(1e-9)).log10()
}

/// Decode sessions in a VMM jailed as the harness runs them by default: the live stream of
/// an encode session of a display the guest drew on decodes to the screenshot (Y PSNR >=
/// 35 dB of the session's last picture as a PNG), shows in `ray gpu status` and
/// `/metrics`, and is done when its encode session stops; the file that session wrote in
/// the VM's directory decodes to done with every frame it encoded. Bad requests are
/// refused by name (unknown codec, missing file, a file outside the VM's directory, by
/// path or by a symbolic link, an unknown encode session, the VM's limit), a corrupt
/// stream fails its session with the decoder's error, and the VMM runs on.
#[test]
fn decode_sessions_turn_a_live_stream_and_a_file_back_into_the_picture() {
    let env = Env::new("decode");
    let mut vm = env.boot(&["--memory", "128M", "--gpu", "emulated,width=640,height=480"]);
    vm.expect_line("ready", Duration::from_secs(20));
    let id = vm.id.clone();
    let file = vm.dir.join("d0.h264");
    let enc: EncodeSessionInfo = serde_json::from_str(&env.ray_ok(&[
        "gpu",
        "encode",
        "start",
        &id,
        "--fps",
        "30",
        "-o",
        file.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    wait_frames(&env, &id, 1);
    let live = decode_start(&env, &id, &["--encode-session", &enc.id.to_string()], false);
    assert_eq!(live.codec, ray_api::encode::Codec::H264);
    assert_eq!(live.source, DecodeSource::EncodeSession(enc.id));
    assert!(!live.state.is_final(), "{live:?}");
    // The watcher's key frame: a picture at once, though the display is still.
    let deadline = Instant::now() + Duration::from_secs(20);
    while decode_info(&env, &id, live.id).frames < 1 {
        assert!(Instant::now() < deadline, "no picture decoded");
        std::thread::sleep(Duration::from_millis(50));
    }
    let answer = vm.command("draw checker 7 0", "draw ");
    assert_eq!(answer, "draw checker seed=7 display=0 640x480");
    // The session's last picture becomes the screenshot once the drawing is encoded.
    let shot = env.runtime.join("shot.png");
    let png = env.runtime.join("live.png");
    let deadline = Instant::now() + Duration::from_secs(20);
    let psnr = loop {
        env.ray_ok(&["gpu", "screenshot", &id, "-o", shot.to_str().unwrap()]);
        env.ray_ok(&[
            "gpu",
            "decode-session",
            "frame",
            &id,
            &live.id.to_string(),
            "-o",
            png.to_str().unwrap(),
        ]);
        let psnr = luma_psnr(&png, &shot);
        if psnr >= 35.0 || Instant::now() > deadline {
            break psnr;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(psnr >= 35.0, "live: Y PSNR {psnr:.1} dB < 35 dB");
    eprintln!("live decode: Y PSNR {psnr:.1} dB");
    let running = decode_info(&env, &id, live.id);
    assert_eq!(running.state, DecodeStateName::Running);
    assert!(running.frames >= 2, "{running:?}");
    assert_eq!((running.width, running.height), (640, 480));
    let status = env.ray_ok(&["gpu", "status", &id]);
    assert!(
        status.contains("DECODE") && status.contains(&format!("encode session {}", enc.id)),
        "{status}"
    );
    // /metrics counts its pictures (the display is still: the count holds).
    let text =
        String::from_utf8_lossy(&vm.client.raw("GET", "/metrics", None).unwrap().body).into_owned();
    let now = decode_info(&env, &id, live.id);
    let labels = format!(
        "{{session=\"{}\",codec=\"h264\",source=\"encode_session\"}}",
        live.id
    );
    let line = format!("ray_decode_frames_total{labels} {}", now.frames);
    assert!(text.lines().any(|l| l == line), "no `{line}` in {text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("ray_decode_fps{labels} "))),
        "{text}"
    );

    // The encode session stops: its stream ends, and the live decode session is done.
    let stopped: EncodeSessionInfo = serde_json::from_str(&env.ray_ok(&[
        "gpu",
        "encode",
        "stop",
        &id,
        &enc.id.to_string(),
        "-o",
        "json",
    ]))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = loop {
        let d = decode_info(&env, &id, live.id);
        if d.state.is_final() {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "the live session never ended: {d:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(done.state, DecodeStateName::Done, "{done:?}");

    // The file it wrote, by its path and by its name in the VM's directory: done, with
    // every frame the encode session made, the last one the screenshot.
    let from_file = decode_start(&env, &id, &["--file", file.to_str().unwrap()], true);
    assert_eq!(from_file.state, DecodeStateName::Done, "{from_file:?}");
    assert_eq!(from_file.frames, stopped.frames);
    assert_eq!(from_file.bytes, stopped.bytes);
    assert_eq!((from_file.width, from_file.height), (640, 480));
    let last = env.runtime.join("file.png");
    env.ray_ok(&[
        "gpu",
        "decode-session",
        "frame",
        &id,
        &from_file.id.to_string(),
        "-o",
        last.to_str().unwrap(),
    ]);
    let psnr = luma_psnr(&last, &shot);
    assert!(psnr >= 35.0, "file: Y PSNR {psnr:.1} dB < 35 dB");
    let answer = vm
        .client
        .raw(
            "POST",
            "/vm/decode",
            Some(br#"{"source":{"file":"d0.h264"}}"#.to_vec()),
        )
        .unwrap();
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let by_name: DecodeSessionInfo = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(
        by_name.source,
        DecodeSource::File(file.to_str().unwrap().to_string())
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !decode_info(&env, &id, by_name.id).state.is_final() {
        assert!(Instant::now() < deadline, "the file session never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(decode_info(&env, &id, by_name.id).frames, stopped.frames);

    // Bad requests, refused by name.
    let msg = decode_refused(&env, &id, &["--codec", "mpeg2", "--encode-session", "1"]);
    assert!(msg.contains("'mpeg2' is not a codec"), "{msg}");
    let answer = vm
        .client
        .raw(
            "POST",
            "/vm/decode",
            Some(br#"{"codec":"mpeg2","source":{"file":"d0.h264"}}"#.to_vec()),
        )
        .unwrap();
    let body = String::from_utf8_lossy(&answer.body);
    assert!(answer.status == 400 && body.contains("mpeg2"), "{body}");
    let missing = vm.dir.join("nope.h264");
    let msg = decode_refused(&env, &id, &["--file", missing.to_str().unwrap()]);
    assert!(msg.contains("nope.h264 does not exist"), "{msg}");
    let outside = env.runtime.join("outside.h264");
    std::fs::copy(&file, &outside).unwrap();
    let msg = decode_refused(&env, &id, &["--file", outside.to_str().unwrap()]);
    assert!(msg.contains("outside the VM's directory"), "{msg}");
    let link = vm.dir.join("link.h264");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let msg = decode_refused(&env, &id, &["--file", link.to_str().unwrap()]);
    assert!(msg.contains("outside the VM's directory"), "{msg}");
    let msg = decode_refused(&env, &id, &["--file", vm.dir.to_str().unwrap()]);
    assert!(msg.contains("not a regular file"), "{msg}");
    let msg = decode_refused(&env, &id, &["--encode-session", "42"]);
    assert!(msg.contains("encode session 42 does not exist"), "{msg}");
    let msg = decode_refused(&env, &id, &["--encode-session", &enc.id.to_string()]);
    assert!(msg.contains("it has no stream to decode"), "{msg}");
    #[cfg(not(feature = "ffmpeg"))]
    {
        let msg = decode_refused(&env, &id, &["--codec", "hevc", "--file", "d0.hevc"]);
        assert!(msg.contains("`ffmpeg`"), "{msg}");
    }
    // A corrupt stream: the session fails with the decoder's error.
    let junk = vm.dir.join("junk.h264");
    let mut bytes = vec![0, 0, 0, 1, 0x67];
    bytes.extend(std::iter::repeat_n(0xff, 64));
    bytes.extend([0, 0, 0, 1, 0x65]);
    bytes.extend(std::iter::repeat_n(0xa5, 4096));
    std::fs::write(&junk, &bytes).unwrap();
    let msg = decode_refused(&env, &id, &["--file", junk.to_str().unwrap(), "--wait"]);
    assert!(msg.contains("failed"), "{msg}");
    let list: DecodeList =
        serde_json::from_str(&env.ray_ok(&["gpu", "decode-session", "list", &id, "-o", "json"]))
            .unwrap();
    let failed = list.sessions.last().unwrap();
    assert_eq!(failed.state, DecodeStateName::Error, "{failed:?}");
    assert!(
        failed.error.as_deref().is_some_and(|e| msg.contains(e)),
        "{msg}"
    );

    // The VM's limit: 4 sessions that have not ended (here on a stream-only session).
    let watched: EncodeSessionInfo = serde_json::from_str(
        &env.ray_ok(&["gpu", "encode", "start", &id, "--fps", "30", "--json"]),
    )
    .unwrap();
    let w = watched.id.to_string();
    let four: Vec<DecodeSessionInfo> = (0..4)
        .map(|_| decode_start(&env, &id, &["--encode-session", &w], false))
        .collect();
    let msg = decode_refused(&env, &id, &["--encode-session", &w]);
    assert!(msg.contains("at most 4 a VM"), "{msg}");
    for s in &four {
        let out = env.ray_ok(&["gpu", "decode-session", "stop", &id, &s.id.to_string()]);
        assert!(out.contains("stopped"), "{out}");
        assert_eq!(decode_info(&env, &id, s.id).state, DecodeStateName::Stopped);
    }
    let again = env.ray(&[
        "gpu",
        "decode-session",
        "stop",
        &id,
        &four[0].id.to_string(),
    ]);
    let msg = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && msg.contains("is stopped"),
        "{msg}"
    );
    let msg = String::from_utf8_lossy(
        &env.ray(&[
            "gpu",
            "decode-session",
            "frame",
            &id,
            "99",
            "-o",
            "/dev/null",
        ])
        .stderr,
    )
    .into_owned();
    assert!(msg.contains("decode session 99 does not exist"), "{msg}");
    // And the VMM runs on.
    assert_eq!(vm.state(), ray_api::vmm::VmStateName::Running);
    let after = decode_start(&env, &id, &["--file", file.to_str().unwrap()], true);
    assert_eq!(after.state, DecodeStateName::Done);
}
