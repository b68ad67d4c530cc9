use super::*;

/// A display in a plain buffer whose pixels the test changes.
struct Screen {
    geometry: DisplayGeometry,
    pixels: Mutex<Vec<u8>>,
}

impl FrameSource for Screen {
    fn displays(&self) -> Vec<DisplayGeometry> {
        vec![self.geometry]
    }
    fn read(&self, index: usize, out: &mut [u8]) -> bool {
        let p = self.pixels.lock().unwrap();
        if index != 0 || out.len() != p.len() {
            return false;
        }
        out.copy_from_slice(&p);
        true
    }
}

fn geometry(width: u32, height: u32) -> DisplayGeometry {
    DisplayGeometry {
        index: 0,
        gpu: 0,
        gpa: 0,
        width,
        height,
        stride: width * 4,
    }
}

/// Colour bars over the top half, a grey ramp below with a box at (`bx`, 300): a picture
/// like the guest's `draw` pattern, with sharp edges.
pub(crate) fn pattern(width: u32, height: u32, bx: u32) -> Vec<u8> {
    const BARS: [u32; 8] = [
        0xffffff, 0xffff00, 0x00ffff, 0x00ff00, 0xff00ff, 0xff0000, 0x0000ff, 0x000000,
    ];
    let mut px = Vec::with_capacity((width * height * 4) as usize);
    for y in 0..height {
        for x in 0..width {
            let v = if y < height / 2 {
                BARS[(x * 8 / width) as usize]
            } else if (bx..bx + 64).contains(&x) && (300..364).contains(&y) {
                0x2080c0
            } else {
                let g = x * 255 / width;
                (g << 16) | (g << 8) | g
            };
            px.extend_from_slice(&v.to_le_bytes());
        }
    }
    px
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn request(path: &Path) -> EncodeRequest {
    EncodeRequest {
        codec: Codec::H264,
        bitrate: 2_000_000,
        fps: 60,
        path: Some(path.display().to_string()),
        handoff: None,
    }
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ray-encode-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_state_and_event_pair_has_its_answer() {
    use SessionEvent as E;
    use SessionState as S;
    let states = [S::Starting, S::Running, S::Paused, S::Stopped, S::Error];
    let allowed = [
        (S::Starting, E::Started, S::Running),
        (S::Starting, E::Pause, S::Paused),
        (S::Running, E::Pause, S::Paused),
        (S::Paused, E::Pause, S::Paused),
        (S::Paused, E::Resume, S::Running),
    ];
    for s in states {
        for e in SessionEvent::ALL {
            let live = matches!(s, S::Starting | S::Running | S::Paused);
            let expect = match e {
                E::Stop if live => Some(S::Stopped),
                E::Fail if live => Some(S::Error),
                _ => allowed
                    .iter()
                    .find(|(fs, fe, _)| *fs == s && *fe == e)
                    .map(|a| a.2),
            };
            assert_eq!(next_state(s, e), expect, "{s:?} x {e:?}");
        }
    }
}

#[test]
fn an_idle_display_costs_no_frames_and_a_change_decodes_back() {
    let (w, h) = (640, 480);
    let screen = Arc::new(Screen {
        geometry: geometry(w, h),
        pixels: Mutex::new(pattern(w, h, 100)),
    });
    let source: SharedSource = Arc::new(Mutex::new(Some(screen.clone() as Arc<dyn FrameSource>)));
    let enc = Encoders::new(source, None);
    let dir = tmp("idle");
    let out = dir.join("out.h264");
    let info = enc.start(geometry(w, h), &request(&out)).unwrap();
    let id = info.id;
    let frames = || enc.list().sessions[0].frames;
    let polls = || enc.with_session(id, Session::polls).unwrap();
    wait_until("the first frame", || frames() == 1);
    assert_eq!(enc.list().sessions[0].state, SessionState::Running);
    // Thirty more looks at an unchanged display: no frame.
    let p = polls();
    wait_until("30 polls", || polls() >= p + 30);
    assert_eq!(frames(), 1, "an idle display is not encoded");
    let bytes_idle = enc.list().sessions[0].bytes;

    // A change: one more frame, then idle again.
    *screen.pixels.lock().unwrap() = pattern(w, h, 400);
    wait_until("the second frame", || frames() == 2);
    let p = polls();
    wait_until("30 polls", || polls() >= p + 30);
    assert_eq!(frames(), 2);

    // Paused with its VM: a change is not encoded until the VM runs again.
    enc.set_paused(true);
    assert_eq!(enc.list().sessions[0].state, SessionState::Paused);
    *screen.pixels.lock().unwrap() = pattern(w, h, 200);
    let p = polls();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(polls(), p, "a paused session does not look at the display");
    assert_eq!(frames(), 2);
    enc.set_paused(false);
    wait_until("the frame after resume", || frames() == 3);

    let done = enc.stop(id).unwrap();
    assert_eq!(done.state, SessionState::Stopped);
    assert!(done.bytes > bytes_idle);
    let e = enc.stop(id).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("encode session {id} is Stopped: Stop is not allowed in that state")
    );

    // The file decodes to the three pictures; the last is the screen now.
    let stream = std::fs::read(&out).unwrap();
    assert_eq!(stream.len() as u64, done.bytes);
    let mut decoded = Vec::new();
    H264Decoder::new()
        .unwrap()
        .decode(&stream, |f| decoded.push(f))
        .unwrap();
    assert_eq!(decoded.len(), 3);
    let last = decoded.last().unwrap();
    assert_eq!((last.width, last.height), (w, h));
    let now = screen.pixels.lock().unwrap().clone();
    let psnr = y_psnr(&now, (w * 4) as usize, &last.y, w as usize, h as usize);
    assert!(psnr >= 35.0, "Y PSNR {psnr:.1} dB < 35 dB");
    eprintln!("Y PSNR of the last frame: {psnr:.1} dB");
    // The first picture is not the last one's.
    let first = y_psnr(
        &now,
        (w * 4) as usize,
        &decoded[0].y,
        w as usize,
        h as usize,
    );
    assert!(first < psnr, "first {first:.1} dB, last {psnr:.1} dB");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Everything `rx` holds now, in order.
fn drain(rx: &Watch) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(unit) = rx.try_recv() {
        out.extend_from_slice(&unit);
    }
    out
}

#[test]
fn a_stream_only_session_encodes_for_its_watchers_and_each_starts_at_a_key_frame() {
    let (w, h) = (640, 480);
    let screen = Arc::new(Screen {
        geometry: geometry(w, h),
        pixels: Mutex::new(pattern(w, h, 10)),
    });
    let source: SharedSource = Arc::new(Mutex::new(Some(screen.clone() as Arc<dyn FrameSource>)));
    let enc = Encoders::new(source, None);
    let req = EncodeRequest {
        path: None,
        ..request(Path::new("/unused"))
    };
    let id = enc.start(geometry(w, h), &req).unwrap().id;
    let frames = || enc.list().sessions[0].frames;
    let polls = || enc.with_session(id, Session::polls).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(polls(), 0, "nobody watches: the display is not even read");
    assert_eq!(frames(), 0, "nobody watches: nothing is encoded");

    // The first watcher gets a picture of the still display at once.
    let a = enc.watch(id).unwrap();
    wait_until("the first watcher's frame", || frames() == 1);
    assert_eq!(enc.list().sessions[0].watchers, 1);
    // A change, then a second watcher joins: it starts at a key frame of its own.
    *screen.pixels.lock().unwrap() = pattern(w, h, 200);
    wait_until("the change", || frames() == 2);
    let b = enc.watch(id).unwrap();
    wait_until("the second watcher's frame", || frames() == 3);
    let decode = |stream: &[u8]| {
        let mut pictures = Vec::new();
        H264Decoder::new()
            .unwrap()
            .decode(stream, |f| pictures.push(f))
            .unwrap();
        pictures
    };
    let now = screen.pixels.lock().unwrap().clone();
    for (who, rx, count) in [("first", &a, 3), ("second", &b, 1)] {
        let pictures = decode(&drain(rx));
        assert_eq!(pictures.len(), count, "{who} watcher's pictures");
        let last = pictures.last().unwrap();
        let psnr = y_psnr(&now, (w * 4) as usize, &last.y, w as usize, h as usize);
        assert!(psnr >= 35.0, "{who} watcher: Y PSNR {psnr:.1} dB < 35 dB");
    }

    // One that goes away is dropped at the next frame; the stream ends with the session.
    drop(b);
    *screen.pixels.lock().unwrap() = pattern(w, h, 100);
    wait_until("the watcher that left to be dropped", || {
        enc.list().sessions[0].watchers == 1
    });
    let done = enc.stop(id).unwrap();
    assert_eq!(done.path, None);
    let _ = drain(&a);
    assert!(a.recv().is_err(), "the stream ends with its session");
    let e = enc.watch(id).unwrap_err();
    assert!(e.to_string().contains("no stream to watch"), "{e}");
    assert_eq!(enc.watch(99).unwrap_err(), EncodeError::NoSuchSession(99));
}

#[test]
fn limits_and_codecs_are_refused_with_what_is_wrong() {
    let (w, h) = (320, 240);
    let screen = Arc::new(Screen {
        geometry: geometry(w, h),
        pixels: Mutex::new(pattern(w, h, 10)),
    });
    let source: SharedSource = Arc::new(Mutex::new(Some(screen as Arc<dyn FrameSource>)));
    let dir = tmp("limits");
    let slots = dir.join("slots");
    let enc = Encoders::new(source.clone(), Some(slots.clone()));
    let req = |n: &str| request(&dir.join(n));
    let mut other = geometry(w, h);
    other.index = 1;
    enc.start(geometry(w, h), &req("a")).unwrap();
    enc.start(geometry(w, h), &req("b")).unwrap();
    let e = enc.start(geometry(w, h), &req("c")).unwrap_err();
    assert_eq!(e, EncodeError::PerDisplay { display: 0 });
    assert!(e.to_string().contains("at most 2 a display"), "{e}");
    enc.start(other, &req("c")).unwrap();
    let mut third = geometry(w, h);
    third.index = 2;
    enc.start(third, &req("d")).unwrap();
    let mut fourth = geometry(w, h);
    fourth.index = 3;
    let e = enc.start(fourth, &req("e")).unwrap_err();
    assert_eq!(e, EncodeError::PerVm);
    assert!(!dir.join("e").exists(), "refused before the file is made");
    // A stopped session frees its place.
    enc.stop(1).unwrap();
    enc.start(fourth, &req("e")).unwrap();

    // The host's slots: another VM's sessions share them.
    let others: Vec<Encoders> = (0..4)
        .map(|_| Encoders::new(source.clone(), Some(slots.clone())))
        .collect();
    let mut started = 4;
    'fill: for o in &others {
        for d in 0..4 {
            let mut g = geometry(w, h);
            g.index = d;
            match o.start(g, &req(&format!("h{started}"))) {
                Ok(_) => started += 1,
                Err(e) => {
                    assert_eq!(e, EncodeError::PerHost);
                    assert!(e.to_string().contains("at most 16 a host"), "{e}");
                    break 'fill;
                }
            }
        }
    }
    assert_eq!(started, MAX_SESSIONS_PER_HOST);

    let e = enc
        .start(geometry(4000, 2000), &req("big"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("4000x2000") && e.contains("at most 2560x1600"),
        "{e}"
    );
    #[cfg(not(feature = "ffmpeg"))]
    for codec in [Codec::Hevc, Codec::Vp9] {
        let e = enc
            .start(geometry(w, h), &EncodeRequest { codec, ..req("x") })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("codec {codec} is not available")) && e.contains("`ffmpeg`"),
            "{e}"
        );
    }
    let e = enc
        .start(
            geometry(w, h),
            &EncodeRequest {
                fps: 100,
                ..req("x")
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("frame rate 100"), "{e}");
    drop(others);
    drop(enc);
    std::fs::remove_dir_all(dir).unwrap();
}

/// HEVC and VP9 sessions (the `ffmpeg` feature, the host's libx265 and libvpx): a frame
/// only when the display changed, and the file (Annex-B, IVF) decodes back through
/// FFmpeg to the pictures, the last within 35 dB Y PSNR of the screen.
#[cfg(feature = "ffmpeg")]
#[test]
fn hevc_and_vp9_sessions_decode_back() {
    let (w, h) = (640, 480);
    for (codec, name) in [(Codec::Hevc, "out.hevc"), (Codec::Vp9, "out.ivf")] {
        let screen = Arc::new(Screen {
            geometry: geometry(w, h),
            pixels: Mutex::new(pattern(w, h, 100)),
        });
        let source: SharedSource =
            Arc::new(Mutex::new(Some(screen.clone() as Arc<dyn FrameSource>)));
        let enc = Encoders::new(source, None);
        let dir = tmp(name);
        let out = dir.join(name);
        let req = EncodeRequest {
            codec,
            ..request(&out)
        };
        let id = enc.start(geometry(w, h), &req).unwrap().id;
        let frames = || enc.list().sessions[0].frames;
        let polls = || enc.with_session(id, Session::polls).unwrap();
        wait_until("the first frame", || frames() == 1);
        let p = polls();
        wait_until("30 polls", || polls() >= p + 30);
        assert_eq!(frames(), 1, "{codec}: an idle display is not encoded");
        *screen.pixels.lock().unwrap() = pattern(w, h, 400);
        wait_until("the second frame", || frames() == 2);
        let done = enc.stop(id).unwrap();
        assert_eq!(done.state, SessionState::Stopped);
        let mut decoded = Vec::new();
        let n = ffmpeg::decode_file(&out, |f| decoded.push(f)).unwrap();
        assert_eq!(n, 2, "{codec}: pictures in {}", out.display());
        let last = decoded.last().unwrap();
        assert_eq!((last.width, last.height), (w, h));
        let now = screen.pixels.lock().unwrap().clone();
        let psnr = y_psnr(&now, (w * 4) as usize, &last.y, w as usize, h as usize);
        assert!(psnr >= 35.0, "{codec}: Y PSNR {psnr:.1} dB < 35 dB");
        eprintln!(
            "{codec}: Y PSNR of the last frame {psnr:.1} dB, {} bytes",
            done.bytes
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Slot files made under a strict umask (or left so by one) are opened up for reading by
/// every user: a jailed VMM opens them read-only as its own uid.
#[test]
fn host_slots_are_readable_by_every_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp("slot-modes").join("slots");
    std::fs::create_dir_all(&dir).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let first = dir.join("slot-0");
    std::fs::write(&first, b"").unwrap();
    std::fs::set_permissions(&first, std::fs::Permissions::from_mode(0o600)).unwrap();
    make_host_slots(&dir).unwrap();
    assert_eq!(mode(&dir), 0o755);
    for i in 0..MAX_SESSIONS_PER_HOST {
        let m = mode(&dir.join(format!("slot-{i}")));
        assert_eq!(m & 0o444, 0o444, "slot-{i}: {m:o}");
    }
    assert_eq!(mode(&first), 0o644);
}

/// Four displays of one size that a test changes.
struct Resizable {
    size: Mutex<(u32, u32)>,
}

impl FrameSource for Resizable {
    fn displays(&self) -> Vec<DisplayGeometry> {
        let (w, h) = *self.size.lock().unwrap();
        (0..4)
            .map(|i| DisplayGeometry {
                index: i,
                ..geometry(w, h)
            })
            .collect()
    }
    fn read(&self, _index: usize, out: &mut [u8]) -> bool {
        out.fill(0x40);
        true
    }
}

#[test]
fn a_session_that_fails_on_its_own_frees_its_host_slot() {
    let screen = Arc::new(Resizable {
        size: Mutex::new((320, 240)),
    });
    let source: SharedSource = Arc::new(Mutex::new(Some(screen.clone() as Arc<dyn FrameSource>)));
    let dir = tmp("slot-free");
    let slots = dir.join("slots");
    let vms: Vec<Encoders> = (0..MAX_SESSIONS_PER_HOST / 4)
        .map(|_| Encoders::new(source.clone(), Some(slots.clone())))
        .collect();
    for (v, enc) in vms.iter().enumerate() {
        for d in 0..4 {
            let g = DisplayGeometry {
                index: d,
                ..geometry(320, 240)
            };
            enc.start(g, &request(&dir.join(format!("{v}-{d}"))))
                .unwrap();
        }
    }
    let late = Encoders::new(source.clone(), Some(slots.clone()));
    let e = late
        .start(geometry(320, 240), &request(&dir.join("late")))
        .unwrap_err();
    assert_eq!(e, EncodeError::PerHost);
    // Every display grows beyond what a session encodes: each session fails by itself.
    *screen.size.lock().unwrap() = (4000, 2000);
    let deadline = Instant::now() + Duration::from_secs(30);
    while vms
        .iter()
        .flat_map(|v| v.list().sessions)
        .any(|s| s.state != SessionState::Error)
    {
        assert!(Instant::now() < deadline, "the sessions did not fail");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nobody stopped them, and their slots are free for another VM's session.
    *screen.size.lock().unwrap() = (320, 240);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match late.start(geometry(320, 240), &request(&dir.join("late"))) {
            Ok(_) => break,
            // A failed session's thread may still be ending.
            Err(EncodeError::PerHost) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    }
}
