//! `ray bench display [--gpu emulated|virtio]`: what a VNC viewer of a display sees,
//! measured with our own minimal RFB client on the display's Unix socket. With `virtio`
//! the display is a virtio GPU's scanout: the guest draws into its resource's backing and
//! sends the changed rectangle (transfer + flush) before the viewer can see it.
//!
//! * `update_latency_ms`: a `draw fill` command is sent to our guest's console; the time
//!   until the viewer has received the whole update showing the new colour. It includes
//!   the console path (API, serial, the guest drawing 1920x1080 pixels) and the server's
//!   10 ms change poll.
//! * `remote_update_latency_ms` (with `--gpu virtio`): the same for a remote GPU whose 2D
//!   work a `ray gpu backend` process does over a Unix socket, measured in the same run
//!   (after the in-VMM virtio GPU's VM has stopped), and `remote_latency_ratio`, its
//!   median over the in-VMM one's.
//! * `fullscreen_fps`: back-to-back non-incremental full-screen updates at 1920x1080
//!   (read from guest RAM, sent Raw over the socket), per second.
//! * `memcpy_ratio`: one full-screen update's time over a plain memcpy of the frame (the
//!   physical floor), medians of the same run.
//! * `frame_bytes`: bytes of one full-screen update in each encoding (Raw, ZRLE, Tight) for
//!   test patterns the guest draws, and ZRLE's and Tight's full-screen updates per second.
//! * `scroll_bytes` (emulated GPU): the guest scrolls a gradient by 16 lines; the bytes of
//!   the incremental update a viewer taking CopyRect then ZRLE gets, and one taking ZRLE only.
//! * `encode_fps.h264` (1280x800) and `encode_fps_1080p.h264` (1920x1080): frames a second
//!   the encode sessions' H.264 encoder (openh264, one thread) turns out on this thread,
//!   each frame a change of the one before (colour bars with a box moving 16 pixels a
//!   frame, the worst case for an encoder that only sees changed frames), and
//!   `encode_latency_ms` per frame (XRGB to YUV conversion included). `.hevc` and `.vp9`:
//!   the same through the host's FFmpeg (libx265 ultrafast + zerolatency, libvpx realtime
//!   at cpu-used 8, one thread each) in a build with the `ffmpeg` feature, else `null`.
//! * `change_detection` (emulated GPU): the VMM's CPU time (all its threads, from
//!   `/proc/PID/task/*/schedstat`) with one viewer waiting on an incremental request, in
//!   two VMMs of the same run: one finding changes through the dirty log, one comparing
//!   every tile (`RAY_DISPLAY_CHANGES=tile-compare`). `idle_cpu_pct`: while the guest draws
//!   nothing; `cpu_per_frame_us`: per frame of the guest filling a 64x64 square (`rect`),
//!   the viewer taking each update (the guest's drawing and the console path included);
//!   `tiles_examined_per_frame` from the display's counts; `viewer_*`: the same for the
//!   viewer's update thread alone (reading, comparing, encoding).
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use ray_display::encode::{check_codec, Codec, VideoEncoder};

use crate::bench::{print_row, BenchVmm, Stats};
use crate::vm::default_guest;

#[derive(Args)]
pub struct DisplayBenchArgs {
    /// Measurements of each kind.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The GPU type whose display is measured.
    #[arg(long, default_value = "emulated", value_parser = ["emulated", "virtio"])]
    pub gpu: String,
}

#[derive(Serialize)]
struct DisplayReport {
    gpu: String,
    runs: usize,
    width: u32,
    height: u32,
    build: &'static str,
    update_latency_ms: Stats,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_update_latency_ms: Option<Stats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_latency_ratio: Option<f64>,
    fullscreen_fps: Stats,
    memcpy_ms: Stats,
    memcpy_ratio: f64,
    frame_bytes: Vec<FrameBytes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scroll_bytes: Option<ScrollBytes>,
    encode_fps: EncodeFps,
    encode_fps_1080p: EncodeFps,
    encode_latency_ms: EncodeLatency,
    /// Bytes a frame at 2 Mbit/s, 1280x800.
    encode_frame_bytes: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    change_detection: Option<ChangeDetectionCpu>,
}

/// The VMM's CPU for change detection, each way, measured in the same run.
#[derive(Serialize)]
struct ChangeDetectionCpu {
    dirty_log: ModeCpu,
    tile_compare: ModeCpu,
    /// tile_compare / dirty_log CPU per frame of the viewer's thread.
    frame_ratio: f64,
}

#[derive(Serialize)]
struct ModeCpu {
    /// VMM CPU time over wall time while idle, percent (one window a run).
    idle_cpu_pct: Stats,
    /// Framebuffer updates display 0 sent its viewers in each idle window (its viewer
    /// asking all along): an idle display costs none.
    idle_updates: Stats,
    /// The same, the viewer's update thread only (reads, compares, encodes).
    viewer_idle_cpu_pct: Stats,
    /// VMM CPU time per frame, microseconds.
    cpu_per_frame_us: f64,
    /// The same, the viewer's update thread only.
    viewer_cpu_per_frame_us: f64,
    tiles_examined_per_frame: f64,
}

/// Frames a second for each codec this build has.
#[derive(Serialize)]
struct EncodeFps {
    h264: Stats,
    /// `null` where this build or host has no such encoder (the `ffmpeg` feature, libx265).
    hevc: Option<Stats>,
    /// `null` where this build or host has no such encoder (the `ffmpeg` feature, libvpx).
    vp9: Option<Stats>,
}

#[derive(Serialize)]
struct EncodeLatency {
    h264: Stats,
    h264_1080p: Stats,
}

/// Encodes `runs` changed frames of `width` x `height` at 2 Mbit/s with a session's encoder
/// of `codec`: (fps of each, ms of each, mean bytes a frame). The first frame (the key
/// frame) is not counted.
fn encode_rate(
    codec: Codec,
    runs: usize,
    width: u32,
    height: u32,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, f64)> {
    let mut enc =
        VideoEncoder::new(codec, width, height, 2_000_000, 30).map_err(anyhow::Error::msg)?;
    let stride = width as usize * 4;
    let frame = |i: usize| -> Vec<u8> {
        const BARS: [u32; 8] = [
            0xffffff, 0xffff00, 0x00ffff, 0x00ff00, 0xff00ff, 0xff0000, 0x0000ff, 0x000000,
        ];
        let bx = (i as u32 * 16) % (width - 64);
        let mut px = Vec::with_capacity(stride * height as usize);
        for y in 0..height {
            for x in 0..width {
                let v = if (bx..bx + 64).contains(&x) && (y % 200) < 64 {
                    0x2080c0
                } else {
                    BARS[(x * 8 / width) as usize]
                };
                px.extend_from_slice(&v.to_le_bytes());
            }
        }
        px
    };
    let frames: Vec<Vec<u8>> = (0..runs.max(2) + 1).map(frame).collect();
    let mut out = Vec::new();
    enc.encode(&frames[0], stride, &mut out)
        .map_err(anyhow::Error::msg)?;
    let (mut fps, mut ms, mut bytes) = (Vec::new(), Vec::new(), 0usize);
    for f in &frames[1..] {
        out.clear();
        let t = Instant::now();
        enc.encode(f, stride, &mut out)
            .map_err(anyhow::Error::msg)?;
        let s = t.elapsed().as_secs_f64();
        fps.push(1.0 / s);
        ms.push(s * 1e3);
        bytes += out.len();
    }
    Ok((fps, ms, bytes as f64 / (frames.len() - 1) as f64))
}

/// One pattern's full-screen update in each encoding.
#[derive(Serialize)]
struct FrameBytes {
    pattern: &'static str,
    raw: u64,
    zrle: u64,
    /// raw / zrle.
    ratio: f64,
    zrle_fps: Stats,
    tight: u64,
    /// raw / tight.
    tight_ratio: f64,
    tight_fps: Stats,
}

/// One scroll's update with and without CopyRect.
#[derive(Serialize, Default)]
struct ScrollBytes {
    lines: u32,
    /// CopyRect then ZRLE for the lines that came in.
    copyrect: u64,
    copyrect_rects: u32,
    /// ZRLE only.
    zrle: u64,
    /// zrle / copyrect.
    ratio: f64,
}

const ENCODING_RAW: i32 = 0;
const ENCODING_ZRLE: i32 = ray_display::zrle::ENCODING_ZRLE;
const ENCODING_TIGHT: i32 = ray_display::tight::ENCODING_TIGHT;
const ENCODING_COPYRECT: i32 = ray_display::rfb::ENCODING_COPYRECT;

const W: u16 = 1920;
const H: u16 = 1080;

/// An RFB 3.8 viewer with security None, in the server's own pixel format. It keeps the
/// last pixel of the screen: the guest draws row by row, so once that pixel has a new
/// colour the whole screen has.
struct Viewer(UnixStream, u32);

impl Viewer {
    fn connect(path: &Path) -> anyhow::Result<Viewer> {
        let mut s = UnixStream::connect(path)
            .with_context(|| format!("cannot connect to {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf)?;
        s.write_all(b"RFB 003.008\n")?;
        let mut types = [0u8; 2];
        s.read_exact(&mut types)?;
        s.write_all(&[1])?;
        let mut result = [0u8; 4];
        s.read_exact(&mut result)?;
        s.write_all(&[1])?;
        let mut init = [0u8; 24];
        s.read_exact(&mut init)?;
        let mut name = vec![0u8; u32::from_be_bytes(init[20..24].try_into()?) as usize];
        s.read_exact(&mut name)?;
        if init[..4] != [(W >> 8) as u8, W as u8, (H >> 8) as u8, H as u8] {
            bail!("the display is not {W}x{H}");
        }
        Ok(Viewer(s, 0))
    }

    /// Asks for the whole screen; returns the colour of its last pixel now.
    fn update(&mut self, incremental: bool) -> anyhow::Result<u32> {
        self.request(incremental)?;
        self.reply()
    }

    /// Sends a request for the whole screen.
    fn request(&mut self, incremental: bool) -> anyhow::Result<()> {
        let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
        m.extend_from_slice(&W.to_be_bytes());
        m.extend_from_slice(&H.to_be_bytes());
        Ok(self.0.write_all(&m)?)
    }

    /// Reads the answer to a request (Raw); returns the colour of the last pixel now.
    fn reply(&mut self) -> anyhow::Result<u32> {
        let mut hdr = [0u8; 4];
        self.0.read_exact(&mut hdr)?;
        let mut px = Vec::new();
        for _ in 0..u16::from_be_bytes([hdr[2], hdr[3]]) {
            let mut r = [0u8; 12];
            self.0.read_exact(&mut r)?;
            let (x, y) = (
                u16::from_be_bytes([r[0], r[1]]),
                u16::from_be_bytes([r[2], r[3]]),
            );
            let w = usize::from(u16::from_be_bytes([r[4], r[5]]));
            let h = usize::from(u16::from_be_bytes([r[6], r[7]]));
            px.resize(w * h * 4, 0);
            self.0.read_exact(&mut px)?;
            if usize::from(x) + w == usize::from(W) && usize::from(y) + h == usize::from(H) {
                let last = px.len() - 4;
                self.1 = u32::from_le_bytes(px[last..].try_into()?) & 0xff_ffff;
            }
        }
        Ok(self.1)
    }

    /// Switches to `encoding` and takes one full-screen update: the bytes it took.
    fn frame_bytes(&mut self, encoding: i32) -> anyhow::Result<u64> {
        self.set_encodings(&[encoding])?;
        Ok(self.take_update(false)?.0)
    }

    fn set_encodings(&mut self, list: &[i32]) -> anyhow::Result<()> {
        let mut m = vec![2, 0];
        m.extend_from_slice(&(list.len() as u16).to_be_bytes());
        for e in list {
            m.extend_from_slice(&e.to_be_bytes());
        }
        Ok(self.0.write_all(&m)?)
    }

    fn byte(&mut self) -> anyhow::Result<u8> {
        let mut b = [0u8; 1];
        self.0.read_exact(&mut b)?;
        Ok(b[0])
    }

    /// Asks for a full-screen update and reads it: (bytes, CopyRect rectangles).
    fn take_update(&mut self, incremental: bool) -> anyhow::Result<(u64, u32)> {
        let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
        m.extend_from_slice(&W.to_be_bytes());
        m.extend_from_slice(&H.to_be_bytes());
        self.0.write_all(&m)?;
        let mut hdr = [0u8; 4];
        self.0.read_exact(&mut hdr)?;
        let (mut bytes, mut copies) = (4u64, 0);
        let mut body = Vec::new();
        for _ in 0..u16::from_be_bytes([hdr[2], hdr[3]]) {
            let mut r = [0u8; 12];
            self.0.read_exact(&mut r)?;
            bytes += 12;
            let w = usize::from(u16::from_be_bytes([r[4], r[5]]));
            let h = usize::from(u16::from_be_bytes([r[6], r[7]]));
            let len = match i32::from_be_bytes(r[8..12].try_into()?) {
                ENCODING_RAW => w * h * 4,
                ENCODING_COPYRECT => {
                    copies += 1;
                    4
                }
                ENCODING_ZRLE => {
                    let mut l = [0u8; 4];
                    self.0.read_exact(&mut l)?;
                    bytes += 4;
                    u32::from_be_bytes(l) as usize
                }
                ENCODING_TIGHT => {
                    // Lossless Tight as this server sends it (3-byte pixels).
                    let ctl = self.byte()?;
                    bytes += 1;
                    if ctl >> 4 == 8 {
                        3
                    } else {
                        let mut raw = w * h * 3;
                        if ctl & 0x40 != 0 {
                            let (_filter, n) = (self.byte()?, usize::from(self.byte()?) + 1);
                            body.resize(n * 3, 0);
                            self.0.read_exact(&mut body)?;
                            bytes += 2 + body.len() as u64;
                            raw = if n == 2 { w.div_ceil(8) * h } else { w * h };
                        }
                        if raw < 12 {
                            raw
                        } else {
                            let mut len = 0;
                            for k in 0..3 {
                                let b = self.byte()?;
                                bytes += 1;
                                len |= usize::from(b & 0x7f) << (7 * k);
                                if b & 0x80 == 0 {
                                    break;
                                }
                            }
                            len
                        }
                    }
                }
                other => bail!("the server sent encoding {other}"),
            };
            body.resize(len, 0);
            self.0.read_exact(&mut body)?;
            bytes += len as u64;
        }
        Ok((bytes, copies))
    }
}

pub fn run(a: &DisplayBenchArgs, runtime: &Path) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let cfg = ray_api::vmm::VmConfig {
        kernel: default_guest()?.display().to_string(),
        initrd: None,
        cmdline: crate::vm::DEFAULT_GUEST_CMDLINE.into(),
        vcpus: 1,
        memory_bytes: 256 << 20,
        numa: Vec::new(),
        numa_attribution: Default::default(),
        numa_migration: Default::default(),
        devices: ray_api::vmm::DevicesConfig {
            gpus: vec![ray_api::gpu::GpuConfig {
                kind: if a.gpu == "virtio" {
                    ray_api::gpu::GpuType::Paravirt
                } else {
                    ray_api::gpu::GpuType::Emulated
                },
                width: W.into(),
                height: H.into(),
                displays: 1,
                passthrough: None,
                backend: None,
                token_file: None,
                timeout_ms: None,
                device: None,
            }],
            ..Default::default()
        },
    };
    let id = format!("bench-display-{}", std::process::id());
    let vmm = BenchVmm::start(runtime, &id, &serde_json::to_string(&cfg)?)?;
    let dir = ray::runtime::vm_dir(runtime, &id);
    let measured = measure(a.runs, &dir);
    let encoded = measured
        .as_ref()
        .ok()
        .map(|_| encodings(a.runs, &dir))
        .transpose();
    let scrolled = match (&measured, a.gpu.as_str()) {
        (Ok(_), "emulated") => Some(scroll_bytes(&dir)),
        _ => None,
    }
    .transpose();
    vmm.stop()?;
    let (latency, fps, update_ms) = measured?;
    let change_detection = if a.gpu == "emulated" {
        let mode = |name: &str, env: &[(&str, &str)]| -> anyhow::Result<ModeCpu> {
            let id = format!("bench-display-{name}-{}", std::process::id());
            let vmm = BenchVmm::start_with_env(runtime, &id, &serde_json::to_string(&cfg)?, env)?;
            let dir = ray::runtime::vm_dir(runtime, &id);
            let out = change_cpu(a.runs, vmm.pid(), &dir, name);
            vmm.stop()?;
            out
        };
        let dirty_log = mode("dirty-log", &[])?;
        let tile_compare = mode("tile-compare", &[("RAY_DISPLAY_CHANGES", "tile-compare")])?;
        Some(ChangeDetectionCpu {
            frame_ratio: tile_compare.viewer_cpu_per_frame_us / dirty_log.viewer_cpu_per_frame_us,
            dirty_log,
            tile_compare,
        })
    } else {
        None
    };
    let remote = match a.gpu.as_str() {
        "virtio" => Some(remote_latency(a.runs, runtime, &cfg)?),
        _ => None,
    };
    let frame_bytes = encoded?.unwrap_or_default();
    let scroll_bytes = scrolled?;

    let frame = vec![0x5au8; usize::from(W) * usize::from(H) * 4];
    let mut copy = vec![0u8; frame.len()];
    let memcpy: Vec<f64> = (0..a.runs)
        .map(|_| {
            let t = Instant::now();
            copy.copy_from_slice(std::hint::black_box(&frame));
            std::hint::black_box(&copy);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let memcpy_ms = Stats::of(&memcpy);
    let (fps800, ms800, frame_bytes800) = encode_rate(Codec::H264, a.runs, 1280, 800)?;
    let (fps1080, ms1080, _) = encode_rate(Codec::H264, a.runs, 1920, 1080)?;
    // HEVC and VP9 where this build and host have them (else null).
    let other = |codec: Codec, width: u32, height: u32| -> anyhow::Result<Option<Stats>> {
        if check_codec(codec).is_err() {
            return Ok(None);
        }
        Ok(Some(Stats::of(
            &encode_rate(codec, a.runs, width, height)?.0,
        )))
    };
    let report = DisplayReport {
        gpu: a.gpu.clone(),
        runs: a.runs,
        width: W.into(),
        height: H.into(),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        update_latency_ms: Stats::of(&latency),
        remote_update_latency_ms: remote.as_deref().map(Stats::of),
        remote_latency_ratio: remote
            .as_deref()
            .map(|r| Stats::of(r).median / Stats::of(&latency).median),
        fullscreen_fps: Stats::of(&fps),
        memcpy_ratio: Stats::of(&update_ms).median / memcpy_ms.median,
        memcpy_ms,
        frame_bytes,
        scroll_bytes,
        encode_fps: EncodeFps {
            h264: Stats::of(&fps800),
            hevc: other(Codec::Hevc, 1280, 800)?,
            vp9: other(Codec::Vp9, 1280, 800)?,
        },
        encode_fps_1080p: EncodeFps {
            h264: Stats::of(&fps1080),
            hevc: other(Codec::Hevc, 1920, 1080)?,
            vp9: other(Codec::Vp9, 1920, 1080)?,
        },
        encode_latency_ms: EncodeLatency {
            h264: Stats::of(&ms800),
            h264_1080p: Stats::of(&ms1080),
        },
        encode_frame_bytes: frame_bytes800,
        change_detection,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} display {}x{} over VNC ({} runs, {} build)",
            report.gpu, report.width, report.height, report.runs, report.build
        );
        print_row("guest draw -> viewer", report.update_latency_ms, "ms");
        if let (Some(r), Some(ratio)) =
            (report.remote_update_latency_ms, report.remote_latency_ratio)
        {
            print_row("remote GPU: guest draw -> viewer", r, "ms");
            println!("  remote / in-VMM virtio GPU     {ratio:.2}");
        }
        print_row("full-screen updates", report.fullscreen_fps, "/s");
        print_row("memcpy of a frame", report.memcpy_ms, "ms");
        println!("  full-screen update / memcpy  {:.1}", report.memcpy_ratio);
        for f in &report.frame_bytes {
            println!(
                "  {:<9} raw {} B, zrle {} B ({:.1}x smaller)",
                f.pattern, f.raw, f.zrle, f.ratio
            );
            print_row("  zrle full-screen updates", f.zrle_fps, "/s");
            println!(
                "  {:<9} tight {} B ({:.1}x smaller than raw)",
                f.pattern, f.tight, f.tight_ratio
            );
            print_row("  tight full-screen updates", f.tight_fps, "/s");
        }
        if let Some(s) = &report.scroll_bytes {
            println!(
                "  scroll by {} lines: copyrect+zrle {} B ({} copies), zrle {} B ({:.1}x)",
                s.lines, s.copyrect, s.copyrect_rects, s.zrle, s.ratio
            );
        }
        print_row("H.264 encode 1280x800", report.encode_fps.h264, "fps");
        for (name, fps) in [
            ("HEVC", report.encode_fps.hevc),
            ("VP9", report.encode_fps.vp9),
        ] {
            match fps {
                Some(fps) => print_row(&format!("{name} encode 1280x800"), fps, "fps"),
                None => println!("{name} encode: not in this build or host (the `ffmpeg` feature)"),
            }
        }
        print_row(
            "H.264 encode 1920x1080",
            report.encode_fps_1080p.h264,
            "fps",
        );
        print_row(
            "H.264 encode latency 1280x800",
            report.encode_latency_ms.h264,
            "ms",
        );
        if let Some(c) = &report.change_detection {
            for (name, m) in [
                ("dirty log", &c.dirty_log),
                ("tile compare", &c.tile_compare),
            ] {
                print_row(&format!("idle VMM CPU, {name}"), m.idle_cpu_pct, "%");
                print_row(
                    &format!("idle display updates a second, {name}"),
                    m.idle_updates,
                    "",
                );
                print_row(
                    &format!("idle viewer thread CPU, {name}"),
                    m.viewer_idle_cpu_pct,
                    "%",
                );
                println!(
                    "  CPU per frame, {name}: VMM {:.0} us, viewer thread {:.0} us ({:.1} tiles examined)",
                    m.cpu_per_frame_us, m.viewer_cpu_per_frame_us, m.tiles_examined_per_frame
                );
            }
        }
    }
    Ok(())
}

/// The update latencies of a remote GPU like `cfg`'s virtio one, its back end a `ray gpu
/// backend` process started here.
fn remote_latency(
    runs: usize,
    runtime: &Path,
    cfg: &ray_api::vmm::VmConfig,
) -> anyhow::Result<Vec<f64>> {
    let runtime = std::path::absolute(runtime)?;
    let socket = runtime.join(format!("bench-gpu-backend-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut back = std::process::Command::new(std::env::current_exe()?)
        .args(["gpu", "backend", "--socket"])
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start ray gpu backend")?;
    let r = (|| {
        let t = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the back end never listened on {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut cfg = cfg.clone();
        let g = &mut cfg.devices.gpus[0];
        g.kind = ray_api::gpu::GpuType::Remote;
        g.backend = Some(format!("unix:{}", socket.display()));
        let id = format!("bench-display-remote-{}", std::process::id());
        let vmm = BenchVmm::start(&runtime, &id, &serde_json::to_string(&cfg)?)?;
        let dir = ray::runtime::vm_dir(&runtime, &id);
        let client = ray::client::VmmClient::new(&dir.join("api.sock"));
        let ready = (|| {
            let t = Instant::now();
            loop {
                let list: ray_api::gpu::GpuList = client.call("GET", "/vm/gpus", None)?;
                if list.gpus[0].state == ray_api::gpu::GpuStateName::Ready {
                    return Ok(());
                }
                if t.elapsed() > Duration::from_secs(30) {
                    bail!("the remote GPU never got ready: {:?}", list.gpus[0].error);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })();
        let measured = ready.and_then(|()| measure(runs, &dir));
        vmm.stop()?;
        Ok(measured?.0)
    })();
    let _ = back.kill();
    let _ = back.wait();
    let _ = std::fs::remove_file(&socket);
    r
}

/// (latencies ms, full-screen updates per second, full-screen update times ms).
fn measure(runs: usize, dir: &Path) -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let client = ray::client::VmmClient::new(&dir.join("api.sock"));
    let mut v = Viewer::connect(&ray_display::vnc::socket_path(
        dir,
        0,
        ray_display::vnc::Role::ViewOnly,
    ))?;
    v.update(false)?;
    let mut latency = Vec::new();
    for i in 0..runs {
        let colour = 0x10_2030 + i as u32 * 0x01_0101;
        let body = serde_json::to_vec(&ray_api::vmm::ConsoleInput {
            data: format!("draw fill {colour}\n"),
        })?;
        let t = Instant::now();
        client.call::<serde_json::Value>("POST", "/vm/console", Some(body))?;
        while v.update(true)? != colour {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("the viewer never saw colour {colour:#x}");
            }
        }
        latency.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (mut fps, mut each) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        v.update(false)?;
        let s = t.elapsed().as_secs_f64();
        fps.push(1.0 / s);
        each.push(s * 1e3);
    }
    Ok((latency, fps, each))
}

/// The guest scrolls a gradient by 16 lines twice: the update of a viewer that takes
/// CopyRect then ZRLE, then of one that takes ZRLE only.
fn scroll_bytes(dir: &Path) -> anyhow::Result<ScrollBytes> {
    let client = ray::client::VmmClient::new(&dir.join("api.sock"));
    let console = |line: &str| -> anyhow::Result<()> {
        let body = serde_json::to_vec(&ray_api::vmm::ConsoleInput {
            data: format!("{line}\n"),
        })?;
        client.call::<serde_json::Value>("POST", "/vm/console", Some(body))?;
        // The guest draws or moves 1920x1080 pixels in well under this.
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    };
    let mut v = Viewer::connect(&ray_display::vnc::socket_path(
        dir,
        0,
        ray_display::vnc::Role::ViewOnly,
    ))?;
    console("draw gradient 2")?;
    let mut one = |list: &[i32]| -> anyhow::Result<(u64, u32)> {
        v.set_encodings(list)?;
        v.take_update(false)?;
        console("scroll 16")?;
        v.take_update(true)
    };
    let (copyrect, copyrect_rects) = one(&[ENCODING_COPYRECT, ENCODING_ZRLE])?;
    let (zrle, _) = one(&[ENCODING_ZRLE])?;
    Ok(ScrollBytes {
        lines: 16,
        copyrect,
        copyrect_rects,
        zrle,
        ratio: zrle as f64 / copyrect as f64,
    })
}

/// Full-screen update sizes in Raw and ZRLE for test patterns the guest draws, and ZRLE's
/// updates per second (its zlib stream runs on, as with a real viewer).
fn encodings(runs: usize, dir: &Path) -> anyhow::Result<Vec<FrameBytes>> {
    let client = ray::client::VmmClient::new(&dir.join("api.sock"));
    let mut v = Viewer::connect(&ray_display::vnc::socket_path(
        dir,
        0,
        ray_display::vnc::Role::ViewOnly,
    ))?;
    let mut out = Vec::new();
    for pattern in ["gradient", "checker", "bars"] {
        let body = serde_json::to_vec(&ray_api::vmm::ConsoleInput {
            data: format!("draw {pattern} 1\n"),
        })?;
        client.call::<serde_json::Value>("POST", "/vm/console", Some(body))?;
        // The guest draws 1920x1080 in well under this.
        std::thread::sleep(Duration::from_millis(500));
        let raw = v.frame_bytes(ENCODING_RAW)?;
        let zrle = v.frame_bytes(ENCODING_ZRLE)?;
        let mut fps = |encoding| -> anyhow::Result<Vec<f64>> {
            (0..runs)
                .map(|_| {
                    let t = Instant::now();
                    v.frame_bytes(encoding)
                        .map(|_| 1.0 / t.elapsed().as_secs_f64())
                })
                .collect()
        };
        let (zrle_fps, tight_fps) = (fps(ENCODING_ZRLE)?, fps(ENCODING_TIGHT)?);
        let tight = v.frame_bytes(ENCODING_TIGHT)?;
        out.push(FrameBytes {
            pattern,
            raw,
            zrle,
            ratio: raw as f64 / zrle as f64,
            zrle_fps: Stats::of(&zrle_fps),
            tight,
            tight_ratio: raw as f64 / tight as f64,
            tight_fps: Stats::of(&tight_fps),
        });
    }
    Ok(out)
}

/// CPU time so far (scheduler run time) of every thread of process `pid`, and of its VNC
/// viewers' threads (named `vnc-N-viewer`).
fn process_cpu(pid: u32) -> anyhow::Result<(Duration, Duration)> {
    let (mut ns, mut vnc) = (0u64, 0u64);
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let t = t?.path();
        let Ok(stat) = std::fs::read_to_string(t.join("schedstat")) else {
            continue; // the thread ended meanwhile
        };
        let viewer = std::fs::read_to_string(t.join("comm"))
            .is_ok_and(|c| c.starts_with("vnc-") && c.trim_end().ends_with("-viewer"));
        let run = stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        ns += run;
        if viewer {
            vnc += run;
        }
    }
    Ok((Duration::from_nanos(ns), Duration::from_nanos(vnc)))
}

/// Framebuffer updates display 0 has sent its viewers (`ray_vnc_updates_total` in the
/// VMM's `/metrics`).
fn updates_sent(client: &ray::client::VmmClient) -> anyhow::Result<u64> {
    let answer = client.raw("GET", "/metrics", None)?;
    let text = String::from_utf8_lossy(&answer.body);
    text.lines()
        .find_map(|l| l.strip_prefix("ray_vnc_updates_total{display=\"0\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("the VMM's /metrics has no ray_vnc_updates_total of display 0")
}

/// The VMM `pid`'s CPU with one viewer of display 0 waiting: idle, then per frame of the
/// guest filling a 64x64 square.
fn change_cpu(runs: usize, pid: u32, dir: &Path, expect: &str) -> anyhow::Result<ModeCpu> {
    let client = ray::client::VmmClient::new(&dir.join("api.sock"));
    let examined = || -> anyhow::Result<(u64, String)> {
        let list: ray_api::gpu::GpuList = client.call("GET", "/vm/gpus", None)?;
        let c = list
            .gpus
            .first()
            .and_then(|g| g.displays.first())
            .and_then(|d| d.changes.clone())
            .context("the display reports no change detection")?;
        Ok((c.tiles_examined, c.mode))
    };
    let mut v = Viewer::connect(&ray_display::vnc::socket_path(
        dir,
        0,
        ray_display::vnc::Role::ViewOnly,
    ))?;
    v.update(false)?;
    v.request(true)?;
    let (mut idle, mut idle_vnc, mut idle_updates) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs.clamp(1, 5) {
        let (c, t, u) = (process_cpu(pid)?, Instant::now(), updates_sent(&client)?);
        std::thread::sleep(Duration::from_secs(1));
        let now = process_cpu(pid)?;
        let secs = t.elapsed().as_secs_f64();
        idle.push(now.0.saturating_sub(c.0).as_secs_f64() / secs * 100.0);
        idle_vnc.push(now.1.saturating_sub(c.1).as_secs_f64() / secs * 100.0);
        idle_updates.push(updates_sent(&client)?.saturating_sub(u) as f64);
    }
    let (before, _) = examined()?;
    let cpu = process_cpu(pid)?;
    for i in 0..runs {
        let colour = 0x20_4060 + i as u32 * 0x01_0101;
        let (x, y) = (64 * (i as u32 % 28) + 32, 64 * (i as u32 / 28 % 15) + 32);
        let body = serde_json::to_vec(&ray_api::vmm::ConsoleInput {
            data: format!("rect {x} {y} 64 64 {colour}\n"),
        })?;
        client.call::<serde_json::Value>("POST", "/vm/console", Some(body))?;
        v.reply()?;
        v.request(true)?;
    }
    let now = process_cpu(pid)?;
    let per_frame =
        |a: Duration, b: Duration| a.saturating_sub(b).as_secs_f64() * 1e6 / runs as f64;
    let (after, mode) = examined()?;
    if mode != expect {
        bail!("the display's changes are found by {mode}, not {expect}");
    }
    Ok(ModeCpu {
        idle_cpu_pct: Stats::of(&idle),
        idle_updates: Stats::of(&idle_updates),
        viewer_idle_cpu_pct: Stats::of(&idle_vnc),
        cpu_per_frame_us: per_frame(now.0, cpu.0),
        viewer_cpu_per_frame_us: per_frame(now.1, cpu.1),
        tiles_examined_per_frame: (after - before) as f64 / runs as f64,
    })
}
