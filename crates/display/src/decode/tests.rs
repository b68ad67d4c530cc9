use super::*;
use crate::encode::watch::Watchers;
use crate::encode::{y_psnr, VideoEncoder};

/// Colour bars over the top half, a grey ramp below with a box at (`bx`, `height` / 2 + 20):
/// sharp edges, like the guest's `draw` patterns.
fn pattern(width: u32, height: u32, bx: u32) -> Vec<u8> {
    const BARS: [u32; 8] = [
        0xffffff, 0xffff00, 0x00ffff, 0x00ff00, 0xff00ff, 0xff0000, 0x0000ff, 0x000000,
    ];
    let by = height / 2 + 20;
    let mut px = Vec::with_capacity((width * height * 4) as usize);
    for y in 0..height {
        for x in 0..width {
            let v = if y < height / 2 {
                BARS[(x * 8 / width) as usize]
            } else if (bx..bx + 32).contains(&x) && (by..by + 32).contains(&y) {
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

const W: u32 = 320;
const H: u32 = 240;

/// `n` frames of a moving box encoded with `codec`: the stream as one file would hold it
/// (header included), each frame's units, and the last picture.
fn encoded(codec: Codec, n: u32) -> (Vec<u8>, Vec<Vec<u8>>, Vec<u8>) {
    let mut enc = VideoEncoder::new(codec, W, H, 2_000_000, 30).unwrap();
    let mut file = enc.file_header();
    let mut units = Vec::new();
    let mut last = Vec::new();
    for i in 0..n {
        let px = pattern(W, H, 10 + i * 20);
        let mut au = Vec::new();
        enc.encode(&px, (W * 4) as usize, &mut au).unwrap();
        assert!(!au.is_empty(), "{codec}: frame {i} skipped");
        file.extend_from_slice(&au);
        units.push(au);
        last = px;
    }
    (file, units, last)
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ray-decode-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn wait_final(d: &Decoders, id: u32) -> DecodeSessionInfo {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = d.info(id).unwrap();
        if info.state.is_final() {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "session {id} never ended: {info:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn file_input(path: &std::path::Path) -> impl FnOnce() -> Result<DecodeInput, DecodeStartError> {
    let file = File::open(path).unwrap();
    move || Ok(DecodeInput::File(file))
}

fn file_source(path: &std::path::Path) -> DecodeSource {
    DecodeSource::File(path.display().to_string())
}

/// The last picture's luma against the pattern it came from.
fn last_psnr(d: &Decoders, id: u32, want: &[u8]) -> f64 {
    let f = d.with_session(id, Session::last_frame).unwrap().unwrap();
    assert_eq!((f.width, f.height), (W, H));
    y_psnr(want, (W * 4) as usize, &f.y, W as usize, H as usize)
}

#[test]
fn every_state_and_event_pair_has_its_answer() {
    use DecodeEvent as E;
    use DecodeState as S;
    for s in [S::Starting, S::Running, S::Done, S::Stopped, S::Error] {
        for e in DecodeEvent::ALL {
            let expect = match (s, e) {
                (S::Starting, E::Started) => Some(S::Running),
                (S::Starting | S::Running, E::Finished) => Some(S::Done),
                (S::Starting | S::Running, E::Stop) => Some(S::Stopped),
                (S::Starting | S::Running, E::Fail) => Some(S::Error),
                _ => None,
            };
            assert_eq!(next_state(s, e), expect, "{s:?} x {e:?}");
            if s.is_final() {
                assert_eq!(next_state(s, e), None, "{s:?} is final");
            }
        }
    }
}

#[test]
fn a_file_decodes_to_done_with_every_frame_in_any_cut() {
    let (file, _, last) = encoded(Codec::H264, 6);
    // Cut anywhere (a byte at a time, across start codes): the same pictures.
    for chunk in [1, 7, 4096, file.len()] {
        let mut dec = StreamDecoder::new(Codec::H264, Framing::Bytes).unwrap();
        let mut n = 0;
        let mut count = |_: DecodedFrame, _: Duration| -> Result<(), String> {
            n += 1;
            Ok(())
        };
        for c in file.chunks(chunk) {
            dec.push(c, &mut count).unwrap();
        }
        dec.finish(&mut count).unwrap();
        assert_eq!(n, 6, "cut every {chunk} bytes");
    }
    let dir = tmp("file");
    let path = dir.join("d.h264");
    std::fs::write(&path, &file).unwrap();
    let d = Decoders::new(None);
    let info = d
        .start(Codec::H264, file_source(&path), file_input(&path))
        .unwrap();
    assert_eq!(info.id, 1);
    let done = wait_final(&d, info.id);
    assert_eq!(done.state, DecodeState::Done, "{done:?}");
    assert_eq!(done.frames, 6);
    assert_eq!(done.bytes, file.len() as u64);
    assert_eq!((done.width, done.height), (W, H));
    assert!(done.fps > 0.0 && done.mean_latency_ms > 0.0, "{done:?}");
    let psnr = last_psnr(&d, info.id, &last);
    assert!(psnr >= 35.0, "Y PSNR {psnr:.1} dB");
    let png = d.frame_png(info.id).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    // Ended by itself: a stop is refused, naming the state.
    let e = d.stop(info.id).unwrap_err();
    assert!(e.to_string().contains("is done"), "{e}");
    assert_eq!(d.stop(9).unwrap_err(), DecodeSessionError::NoSuchSession(9));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_corrupt_or_empty_stream_fails_the_session_with_the_decoders_error() {
    let dir = tmp("corrupt");
    let d = Decoders::new(None);
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("empty.h264", Vec::new(), "holds no h264 picture"),
        (
            "text.h264",
            b"hello, not a stream".repeat(100),
            "holds no h264 picture",
        ),
        (
            "junk.h264",
            // A sequence parameter set of garbage, then a slice of garbage.
            [
                &[0, 0, 0, 1, 0x67][..],
                &[0xff; 64],
                &[0, 0, 0, 1, 0x65],
                &[0xa5; 512],
            ]
            .concat(),
            "",
        ),
    ];
    for (name, bytes, says) in cases {
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let info = d
            .start(Codec::H264, file_source(&path), file_input(&path))
            .unwrap();
        let end = wait_final(&d, info.id);
        assert_eq!(end.state, DecodeState::Error, "{name}: {end:?}");
        let why = end.error.unwrap();
        assert!(why.contains(says), "{name}: {why}");
        assert_eq!(
            d.frame_png(info.id).unwrap_err(),
            DecodeSessionError::NoFrame {
                id: info.id,
                state: DecodeState::Error
            }
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_live_stream_decodes_as_it_comes_and_ends_with_its_encode_session() {
    let (_, units, last) = encoded(Codec::H264, 4);
    let d = Decoders::new(None);
    // The stream ends with its session (done); or while its session runs: the watcher was
    // dropped (an error saying so).
    for session_ended in [true, false] {
        let watchers = Watchers::default();
        let watch = watchers.add(b"").unwrap();
        let info = d
            .start(Codec::H264, DecodeSource::EncodeSession(1), || {
                Ok(DecodeInput::Live {
                    watch,
                    ended: Box::new(move || session_ended),
                })
            })
            .unwrap();
        for (i, u) in units.iter().enumerate() {
            watchers.send(u, i == 0, 1);
            let deadline = Instant::now() + Duration::from_secs(20);
            // Each access unit is a picture at once: none waits for the next.
            while d.info(info.id).unwrap().frames < i as u64 + 1 {
                assert!(Instant::now() < deadline, "picture {i} never came");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let running = d.info(info.id).unwrap();
        assert_eq!(running.state, DecodeState::Running);
        let psnr = last_psnr(&d, info.id, &last);
        assert!(psnr >= 35.0, "Y PSNR {psnr:.1} dB");
        watchers.close();
        let end = wait_final(&d, info.id);
        assert_eq!(end.frames, 4);
        if session_ended {
            assert_eq!(end.state, DecodeState::Done, "{end:?}");
        } else {
            assert_eq!(end.state, DecodeState::Error);
            assert!(end.error.unwrap().contains("fell"));
        }
    }
}

#[test]
fn limits_are_refused_by_name_and_a_session_that_ends_frees_its_slot() {
    let dir = tmp("limits");
    let slots = dir.join("slots");
    let d = Decoders::new(Some(slots.clone()));
    // Each live session's stream stays open (its sender kept here) until it is stopped.
    let mut open_streams = Vec::new();
    let mut live = |d: &Decoders| {
        let watchers = Watchers::default();
        let watch = watchers.add(b"").unwrap();
        open_streams.push(watchers);
        d.start(Codec::H264, DecodeSource::EncodeSession(1), || {
            Ok(DecodeInput::Live {
                watch,
                ended: Box::new(|| true),
            })
        })
    };
    let ids: Vec<u32> = (0..MAX_DECODE_SESSIONS_PER_VM)
        .map(|_| live(&d).unwrap().id)
        .collect();
    let e = live(&d).unwrap_err();
    assert_eq!(e, DecodeStartError::PerVm);
    assert!(e.to_string().contains("at most 4 a VM"), "{e}");
    // A refusal opens nothing: the input's opener is not called.
    let e = d
        .start(Codec::H264, DecodeSource::EncodeSession(1), || {
            panic!("opened past a limit")
        })
        .unwrap_err();
    assert_eq!(e, DecodeStartError::PerVm);
    let stopped = d.stop(ids[0]).unwrap();
    assert_eq!(stopped.state, DecodeState::Stopped);
    assert!(d
        .stop(ids[0])
        .unwrap_err()
        .to_string()
        .contains("is stopped"));
    live(&d).unwrap();

    // The host's slots, shared with encode sessions: all taken, a session is refused.
    d.stop_all();
    assert!(d
        .list()
        .sessions
        .iter()
        .all(|s| s.state == DecodeState::Stopped));
    let held: Vec<HostSlot> = (0..MAX_SESSIONS_PER_HOST)
        .map(|_| HostSlot::claim(&slots).unwrap())
        .collect();
    let e = live(&d).unwrap_err();
    assert_eq!(e, DecodeStartError::PerHost);
    assert!(e.to_string().contains("encode and decode sessions"), "{e}");
    drop(held);
    // A file session that ends by itself gives its slot back when its thread ends.
    let (file, _, _) = encoded(Codec::H264, 2);
    let path = dir.join("d.h264");
    std::fs::write(&path, &file).unwrap();
    let held: Vec<HostSlot> = (0..MAX_SESSIONS_PER_HOST - 1)
        .map(|_| HostSlot::claim(&slots).unwrap())
        .collect();
    let info = d
        .start(Codec::H264, file_source(&path), file_input(&path))
        .unwrap();
    assert_eq!(wait_final(&d, info.id).state, DecodeState::Done);
    let deadline = Instant::now() + Duration::from_secs(20);
    let slot = loop {
        match HostSlot::claim(&slots) {
            Ok(s) => break s,
            Err(_) => assert!(Instant::now() < deadline, "the done session kept its slot"),
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    drop((held, slot));
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(not(feature = "ffmpeg"))]
#[test]
fn hevc_and_vp9_need_the_ffmpeg_feature() {
    for codec in [Codec::Hevc, Codec::Vp9] {
        let e = Decoders::new(None)
            .start(codec, DecodeSource::EncodeSession(1), || panic!("opened"))
            .unwrap_err();
        assert!(e.to_string().contains("`ffmpeg`"), "{e}");
    }
}

#[cfg(feature = "ffmpeg")]
#[test]
fn hevc_and_vp9_files_and_streams_decode_back() {
    let dir = tmp("ff");
    let d = Decoders::new(None);
    for (codec, name) in [(Codec::Hevc, "d.hevc"), (Codec::Vp9, "d.ivf")] {
        let (file, units, last) = encoded(codec, 5);
        let path = dir.join(name);
        std::fs::write(&path, &file).unwrap();
        let info = d
            .start(codec, file_source(&path), file_input(&path))
            .unwrap();
        let done = wait_final(&d, info.id);
        assert_eq!(done.state, DecodeState::Done, "{codec}: {done:?}");
        assert_eq!(done.frames, 5, "{codec}");
        let psnr = last_psnr(&d, info.id, &last);
        assert!(psnr >= 35.0, "{codec}: Y PSNR {psnr:.1} dB");
        // Live: each unit a picture at once (VP9: the IVF header first, as a watcher gets it).
        let mut dec = StreamDecoder::new(codec, Framing::Units).unwrap();
        let mut n = 0;
        let mut count = |_: DecodedFrame, _: Duration| -> Result<(), String> {
            n += 1;
            Ok(())
        };
        if codec == Codec::Vp9 {
            dec.push(&file[..32], &mut count).unwrap();
        }
        for u in &units {
            dec.push(u, &mut count).unwrap();
        }
        assert_eq!(n, 5, "{codec}: a picture for each unit, without waiting");
        // A file of the other codec's bytes is refused by the decoder.
        let wrong = dir.join(format!("wrong-{name}"));
        std::fs::write(&wrong, b"DKIF garbage, not a stream at all").unwrap();
        let info = d
            .start(codec, file_source(&wrong), file_input(&wrong))
            .unwrap();
        let end = wait_final(&d, info.id);
        assert_eq!(end.state, DecodeState::Error, "{codec}: {end:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
