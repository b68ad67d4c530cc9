//! `ray gpu status|list|displays|screenshot|resize|type|encode|decode-session ID`: a VM's
//! GPUs, displays, encode and decode sessions through its API; `ray gpu decode FILE`
//! turns a stream back into pictures here, and `ray gpu backend` serves remote GPUs' 2D
//! work.
//!
//! Decode sessions (in the VMM) are `decode-session`, not subcommands of `decode`: `ray
//! gpu decode FILE` stays as it was, and a file named `start` or `list` cannot be taken
//! for a subcommand.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use ray_api::decode::{DecodeList, DecodeRequest, DecodeSessionInfo, DecodeSource};
use ray_api::encode::{EncodeList, EncodeRequest, EncodeSessionInfo};
use ray_api::gpu::GpuList;
use ray_display::encode::{DecodedFrame, H264Decoder};

use ray::client::api_error;
use ray::output::{print_structured, table, OutputArgs};

use crate::vm::client;

#[derive(Subcommand)]
pub enum GpuCommand {
    /// Each GPU's type, state and displays, and the VNC socket.
    Status(IdArgs),
    /// One line per GPU of a VM; with --host, what this host offers for passthrough.
    List(ListArgs),
    /// One line per display.
    Displays(IdArgs),
    /// Save a display as a PNG.
    Screenshot(ScreenshotArgs),
    /// Give a virtio GPU's display a new size (the guest is told and redraws).
    Resize(ResizeArgs),
    /// Type text on the VM's keyboard (virtio-input, US layout; `\n` in TEXT is Enter).
    Type(TypeArgs),
    /// Encode sessions: a display to a video file, a frame each time it changes.
    #[command(subcommand)]
    Encode(EncodeCommand),
    /// Decode an H.264 (Annex-B) file into PNG pictures.
    Decode(DecodeArgs),
    /// Decode sessions in the VMM: a file in the VM's directory, or an encode session's
    /// live stream, back into pictures.
    #[command(subcommand)]
    DecodeSession(DecodeSessionCommand),
    /// Serve remote GPUs (`--gpu remote,...`): their resources, transfers, scanouts and
    /// cursor, with frames sent back to each VMM. Runs until stopped.
    Backend(BackendArgs),
}

#[derive(Args)]
pub struct BackendArgs {
    /// A Unix socket to listen on (made 0600; no token asked).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// A TCP address to listen on (IP:PORT, port 0: a free one, printed); needs
    /// --token-file. Only the address given: 127.0.0.1 keeps it on this host.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// The file holding the token every VMM on TCP must present (16 to 256 bytes).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum EncodeCommand {
    /// Start encoding a display into a file (the VMM writes it), or only for watchers.
    Start(EncodeStartArgs),
    /// Watch a session's stream live: into a file, or `-o -` to standard output.
    Watch(EncodeWatchArgs),
    /// Stop a session; its file is complete when this returns.
    Stop(EncodeStopArgs),
    /// The VM's sessions: state, codec, frames, fps, bytes, latency.
    List(IdArgs),
}

#[derive(Args)]
pub struct EncodeStartArgs {
    /// The VM.
    pub id: String,
    /// Which display (0-based over all GPUs).
    #[arg(long, default_value_t = 0)]
    pub display: u32,
    /// h264, or hevc / vp9 (a build with the `ffmpeg` feature).
    #[arg(long, default_value = "h264", value_parser = ray_api::encode::Codec::parse)]
    pub codec: ray_api::encode::Codec,
    /// Target bit rate: bits a second, or with k / M (2M).
    #[arg(long, default_value = "2M", value_parser = ray_api::encode::parse_bitrate)]
    pub bitrate: u64,
    /// At most this many frames a second (fewer while the display is still).
    #[arg(long, default_value_t = ray_api::encode::DEFAULT_FPS)]
    pub fps: u32,
    /// The stream file (a jailed VMM outside its directory is handed the file, made
    /// here). Without it the stream goes only to watchers (`ray gpu encode watch`, `GET
    /// /vm/encode/{session}/stream`) and is encoded only while watched.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print the session as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct EncodeWatchArgs {
    /// The VM.
    pub id: String,
    /// The session's number (`ray gpu encode list`).
    pub session: u32,
    /// Where the stream goes: a file, or `-` for standard output (e.g. into a player).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    /// Stop after this many seconds (default: until the session ends or Ctrl-C).
    #[arg(long, value_parser = parse_seconds)]
    pub seconds: Option<f64>,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "'{s}' is not a number of seconds (more than 0, at most 86400)"
        )),
    }
}

#[derive(Args)]
pub struct EncodeStopArgs {
    /// The VM.
    pub id: String,
    /// The session's number (`ray gpu encode list`).
    pub session: u32,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Subcommand)]
pub enum DecodeSessionCommand {
    /// Start decoding a file in the VM's directory or an encode session's live stream.
    Start(DecodeStartArgs),
    /// The VM's decode sessions: state, codec, source, pictures, fps, decode time.
    List(IdArgs),
    /// One decode session, and why it failed when it did.
    Show(DecodeSessionArgs),
    /// Save a decode session's last picture as a PNG.
    Frame(DecodeFrameArgs),
    /// Stop a decode session.
    Stop(DecodeSessionArgs),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["file", "encode_session"])))]
pub struct DecodeStartArgs {
    /// The VM.
    pub id: String,
    /// h264, hevc or vp9 (the last two: a build with the `ffmpeg` feature). Default: the
    /// encode session's codec, or for a file VP9 for IVF, HEVC for .hevc/.h265, else H.264.
    #[arg(long, value_parser = ray_api::encode::Codec::parse)]
    pub codec: Option<ray_api::encode::Codec>,
    /// A stream file in the VM's directory (a relative path is taken from here; the VMM
    /// reads nothing outside that directory).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// One of the VM's encode sessions: its live stream, until it ends.
    #[arg(long, value_name = "SESSION")]
    pub encode_session: Option<u32>,
    /// Wait until the session ends (a file's end, or the encode session's); fail if it
    /// failed.
    #[arg(long)]
    pub wait: bool,
    /// Print the session as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DecodeSessionArgs {
    /// The VM.
    pub id: String,
    /// The decode session's number (`ray gpu decode-session list`).
    pub session: u32,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args)]
pub struct DecodeFrameArgs {
    /// The VM.
    pub id: String,
    /// The decode session's number (`ray gpu decode-session list`).
    pub session: u32,
    /// Where to write the PNG.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Args)]
pub struct DecodeArgs {
    /// The stream `ray gpu encode` wrote: H.264 or HEVC (Annex-B, `.hevc`) or VP9 (IVF).
    pub input: PathBuf,
    /// The directory for the pictures (frame-00000.png, ...), or with --last the PNG file.
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    pub output: PathBuf,
    /// Only the last picture, written to the output file.
    #[arg(long)]
    pub last: bool,
}

#[derive(Args)]
pub struct ResizeArgs {
    /// The VM.
    pub id: String,
    /// Which display (0-based over all GPUs).
    #[arg(long, default_value_t = 0)]
    pub display: u32,
    /// The new size, WIDTHxHEIGHT.
    #[arg(value_parser = parse_size)]
    pub size: (u32, u32),
}

pub(crate) fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("'{s}' is not WIDTHxHEIGHT (1024x768)");
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let (w, h) = (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    ray_api::gpu::check_size(w, h)?;
    Ok((w, h))
}

#[derive(Args)]
pub struct TypeArgs {
    /// The VM.
    pub id: String,
    /// What to type; the two characters `\n` are a newline (Enter).
    pub text: String,
}

#[derive(Args)]
pub struct ListArgs {
    /// The VM.
    #[arg(required_unless_present = "host", conflicts_with = "host")]
    pub id: Option<String>,
    /// This host's GPUs and whether it can pass them through (IOMMU, VFIO, vfio-pci).
    #[arg(long)]
    pub host: bool,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `ray gpu-device`: devices served to VMs from their own process.
#[derive(Subcommand)]
pub enum GpuDeviceCommand {
    /// Serve a GPU-like PCI device over vfio-user on a Unix socket (VRAM BAR, register
    /// BAR, DMA engine, MSI-X), for `ray vm run --gpu passthrough,vfio-user=SOCKET`.
    Serve(ServeArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// The Unix socket to listen on (must not exist).
    #[arg(long)]
    pub socket: PathBuf,
}

/// Serves until the process is ended; one VMM at a time.
pub fn run_device(cmd: GpuDeviceCommand) -> anyhow::Result<()> {
    match cmd {
        GpuDeviceCommand::Serve(a) => {
            ray_devices::passthrough::gpu_server::serve(&a.socket, || {
                println!("serving a vfio-user GPU on {}", a.socket.display());
            })
            .map_err(anyhow::Error::msg)
        }
    }
}

#[derive(serde::Serialize)]
struct HostReport {
    passthrough: bool,
    #[serde(flatten)]
    support: ray_devices::passthrough::vfio::HostSupport,
    gpus: Vec<ray_devices::passthrough::vfio::HostPciDevice>,
}

fn host_list(out: &OutputArgs) -> anyhow::Result<()> {
    use ray_devices::passthrough::vfio::{host_gpus, HostSupport};
    let support = HostSupport::detect();
    let report = HostReport {
        passthrough: support.ready(),
        gpus: host_gpus(),
        support,
    };
    if print_structured(&report, out.format())? {
        return Ok(());
    }
    let s = &report.support;
    if s.ready() {
        println!("passthrough: possible (IOMMU groups: {})", s.iommu_groups);
    } else {
        println!("passthrough: not possible on this host");
        for m in &s.missing {
            println!("  missing: {m}");
        }
    }
    println!("vfio-user devices (--gpu passthrough,vfio-user=SOCKET) need none of these");
    let rows: Vec<Vec<String>> = report
        .gpus
        .iter()
        .map(|g| {
            vec![
                g.bdf.clone(),
                format!(
                    "{}:{}",
                    g.vendor.trim_start_matches("0x"),
                    g.device.trim_start_matches("0x")
                ),
                g.class.clone(),
                g.driver.clone().unwrap_or_else(|| "-".into()),
                g.iommu_group.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("host GPUs: none (no PCI display controller)");
    } else {
        println!();
        print!(
            "{}",
            table(&["BDF", "ID", "CLASS", "DRIVER", "IOMMU GROUP"], &rows)
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct IdArgs {
    /// The VM.
    pub id: String,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args)]
pub struct ScreenshotArgs {
    /// The VM.
    pub id: String,
    /// Which display (0-based over all GPUs).
    #[arg(long, default_value_t = 0)]
    pub display: u32,
    /// Where to write the PNG.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
}

pub fn run(cmd: GpuCommand, runtime: &Path) -> anyhow::Result<()> {
    match cmd {
        GpuCommand::Status(a) => show(runtime, &a, View::Status),
        GpuCommand::List(a) if a.host => host_list(&a.out),
        GpuCommand::List(a) => show(
            runtime,
            &IdArgs {
                id: a.id.unwrap_or_default(),
                out: a.out,
            },
            View::List,
        ),
        GpuCommand::Displays(a) => show(runtime, &a, View::Displays),
        GpuCommand::Screenshot(a) => screenshot(runtime, &a),
        GpuCommand::Resize(a) => resize(runtime, &a),
        GpuCommand::Type(a) => type_text(runtime, &a),
        GpuCommand::Encode(EncodeCommand::Start(a)) => encode_start(runtime, &a),
        GpuCommand::Encode(EncodeCommand::Stop(a)) => encode_stop(runtime, &a),
        GpuCommand::Encode(EncodeCommand::Watch(a)) => encode_watch(runtime, &a),
        GpuCommand::Encode(EncodeCommand::List(a)) => encode_list(runtime, &a),
        GpuCommand::Decode(a) => decode(&a),
        GpuCommand::DecodeSession(DecodeSessionCommand::Start(a)) => decode_start(runtime, &a),
        GpuCommand::DecodeSession(DecodeSessionCommand::List(a)) => decode_list(runtime, &a),
        GpuCommand::DecodeSession(DecodeSessionCommand::Show(a)) => decode_show(runtime, &a),
        GpuCommand::DecodeSession(DecodeSessionCommand::Frame(a)) => decode_frame(runtime, &a),
        GpuCommand::DecodeSession(DecodeSessionCommand::Stop(a)) => decode_stop(runtime, &a),
        GpuCommand::Backend(a) => backend(&a),
    }
}

fn backend(a: &BackendArgs) -> anyhow::Result<()> {
    use ray_devices::virtio::gpu::backend::{read_token, serve, BackendConfig};
    let token = match (&a.listen, &a.token_file) {
        (Some(_), Some(f)) => Some(read_token(f).map_err(anyhow::Error::msg)?),
        (Some(addr), None) => anyhow::bail!(
            "--listen {addr} needs --token-file: a TCP back end asks every VMM for a token"
        ),
        (None, Some(_)) => anyhow::bail!("--token-file is for --listen (TCP) only"),
        (None, None) => None,
    };
    serve(BackendConfig {
        socket: a.socket.clone(),
        listen: a.listen,
        token,
        limits: Default::default(),
    })
    .map_err(anyhow::Error::msg)
}

enum View {
    Status,
    List,
    Displays,
}

fn show(runtime: &Path, a: &IdArgs, view: View) -> anyhow::Result<()> {
    let list: GpuList = client(runtime, &a.id)?.call("GET", "/vm/gpus", None)?;
    if print_structured(&list, a.out.format())? {
        return Ok(());
    }
    let gpus = |list: &GpuList| {
        list.gpus
            .iter()
            .map(|g| {
                vec![
                    g.index.to_string(),
                    g.kind.to_string(),
                    wire_name(g.state),
                    g.displays.len().to_string(),
                    g.viewers.to_string(),
                ]
            })
            .collect::<Vec<_>>()
    };
    let displays = |list: &GpuList| {
        list.gpus
            .iter()
            .flat_map(|g| &g.displays)
            .map(|d| {
                vec![
                    d.index.to_string(),
                    d.gpu.to_string(),
                    format!("{}x{}", d.width, d.height),
                    d.format.clone(),
                    format!("{:#x}", d.framebuffer_gpa),
                ]
            })
            .collect::<Vec<_>>()
    };
    const GPU_HEADER: &[&str] = &["GPU", "TYPE", "STATE", "DISPLAYS", "VIEWERS"];
    const DISPLAY_HEADER: &[&str] = &["DISPLAY", "GPU", "SIZE", "FORMAT", "FRAMEBUFFER"];
    match view {
        View::List => print!("{}", table(GPU_HEADER, &gpus(&list))),
        View::Displays => print!("{}", table(DISPLAY_HEADER, &displays(&list))),
        View::Status => {
            if list.gpus.is_empty() {
                println!("{}: no GPU", a.id);
                return Ok(());
            }
            print!("{}", table(GPU_HEADER, &gpus(&list)));
            let l = &list.limits;
            println!(
                "limits: {} GPUs, {} displays a GPU, {} displays (--gpu-limits)",
                l.gpus, l.displays_per_gpu, l.displays
            );
            for g in &list.gpus {
                if let Some(d) = &g.device {
                    println!("GPU {}: {d}", g.index);
                }
                if let Some(e) = &g.error {
                    println!("GPU {} error: {e}", g.index);
                }
            }
            println!();
            print!("{}", table(DISPLAY_HEADER, &displays(&list)));
            for d in list.gpus.iter().flat_map(|g| &g.displays) {
                if let Some(c) = &d.changes {
                    println!(
                        "display {} changes: {}, {} dirty pages, {} looks, {} tiles examined, \
                         {} changed (last look: {} examined, {} changed)",
                        d.index,
                        c.mode,
                        c.dirty_pages,
                        c.looks,
                        c.tiles_examined,
                        c.tiles_changed,
                        c.last_tiles_examined,
                        c.last_tiles_changed
                    );
                }
            }
            match &list.vnc_socket {
                Some(s) => {
                    println!("\nVNC: {s} (display N: vnc-N.sock, view-only: vnc-N-view.sock)")
                }
                None if list.gpus.iter().all(|g| g.displays.is_empty()) => {
                    println!("\nVNC: none (no GPU of this VM has a display of the VMM)")
                }
                None => println!("\nVNC: not listening (the VM does not run)"),
            }
            for (i, a) in list.vnc_tcp.iter().enumerate() {
                println!("VNC display {i}: {a} (TCP, VNC authentication)");
            }
            for g in &list.gpus {
                if let Some(b) = &g.backend {
                    match &g.error {
                        Some(why) => println!("GPU {} back end {b}: error: {why}", g.index),
                        None => println!("GPU {} back end {b}: connected", g.index),
                    }
                }
            }
            let sessions: EncodeList = client(runtime, &a.id)?.call("GET", "/vm/encode", None)?;
            if !sessions.sessions.is_empty() {
                println!();
                print!("{}", session_table(&sessions.sessions));
            }
            let decodes: DecodeList = client(runtime, &a.id)?.call("GET", "/vm/decode", None)?;
            if !decodes.sessions.is_empty() {
                println!();
                print!("{}", decode_table(&decodes.sessions));
            }
        }
    }
    Ok(())
}

fn screenshot(runtime: &Path, a: &ScreenshotArgs) -> anyhow::Result<()> {
    let answer = client(runtime, &a.id)?.raw(
        "GET",
        &format!("/vm/display/{}/screenshot.png", a.display),
        None,
    )?;
    if answer.status >= 400 {
        return Err(api_error(answer.status, &answer.body).into());
    }
    std::fs::write(&a.output, &answer.body)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    println!("{}", a.output.display());
    Ok(())
}

fn resize(runtime: &Path, a: &ResizeArgs) -> anyhow::Result<()> {
    let (width, height) = a.size;
    let body = serde_json::to_vec(&ray_api::gpu::DisplaySize { width, height })?;
    let answer = client(runtime, &a.id)?.raw(
        "PUT",
        &format!("/vm/display/{}/size", a.display),
        Some(body),
    )?;
    if answer.status >= 400 {
        return Err(api_error(answer.status, &answer.body).into());
    }
    println!("display {} is now {width}x{height}", a.display);
    Ok(())
}

fn type_text(runtime: &Path, a: &TypeArgs) -> anyhow::Result<()> {
    let body = ray_api::gpu::TypeText {
        text: a.text.replace("\\n", "\n"),
    };
    let typed: ray_api::gpu::Typed = client(runtime, &a.id)?.call(
        "POST",
        "/vm/keyboard/type",
        Some(serde_json::to_vec(&body)?),
    )?;
    println!("typed {} events", typed.events);
    Ok(())
}

/// A state as the API spells it (its serde name), for tables.
fn wire_name(state: impl serde::Serialize) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

fn session_table(sessions: &[EncodeSessionInfo]) -> String {
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.display.to_string(),
                s.codec.to_string(),
                wire_name(s.state),
                format!("{}x{}", s.width, s.height),
                s.frames.to_string(),
                format!("{:.1}", s.fps),
                s.bytes.to_string(),
                format!("{:.2}", s.mean_latency_ms),
                {
                    let to = stream_target(s);
                    match &s.error {
                        Some(e) => format!("{to} ({e})"),
                        None => to,
                    }
                },
            ]
        })
        .collect();
    table(
        &[
            "SESSION",
            "DISPLAY",
            "CODEC",
            "STATE",
            "SIZE",
            "FRAMES",
            "FPS",
            "BYTES",
            "LATENCY_MS",
            "FILE",
        ],
        &rows,
    )
}

/// Where a session's stream goes, for people.
fn stream_target(s: &EncodeSessionInfo) -> String {
    let watchers = match s.watchers {
        0 => String::new(),
        1 => "1 watcher".into(),
        n => format!("{n} watchers"),
    };
    match (&s.path, watchers.is_empty()) {
        (Some(p), true) => p.clone(),
        (Some(p), false) => format!("{p} + {watchers}"),
        (None, true) => "watchers only (none now)".into(),
        (None, false) => watchers,
    }
}

fn encode_start(runtime: &Path, a: &EncodeStartArgs) -> anyhow::Result<()> {
    let path = a
        .output
        .as_ref()
        .map(|o| {
            std::path::absolute(o)
                .with_context(|| format!("cannot make {} absolute", o.display()))
                .map(|p| p.display().to_string())
        })
        .transpose()?;
    let mut req = EncodeRequest {
        codec: a.codec,
        bitrate: a.bitrate,
        fps: a.fps,
        path,
        handoff: None,
    };
    // Checked here too, so that a bad setting is named before the VM is asked.
    req.validate().map_err(anyhow::Error::msg)?;
    // A jailed VMM writes only in its own directory: a file elsewhere is made here and
    // handed to it (held until it answered).
    let handed = match &req.path {
        Some(p) => {
            ray_vmm::hand_over::output_file(&ray::runtime::vm_dir(runtime, &a.id), Path::new(p))?
        }
        None => None,
    };
    req.handoff = handed.as_ref().map(|h| h.token.clone());
    let info: EncodeSessionInfo = client(runtime, &a.id)?.call(
        "POST",
        &format!("/vm/display/{}/encode", a.display),
        Some(serde_json::to_vec(&req)?),
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&info)?);
        return Ok(());
    }
    match &info.path {
        Some(p) => println!(
            "encode session {} on display {}: {} to {p}",
            info.id, info.display, info.codec
        ),
        None => println!(
            "encode session {} on display {}: {} for watchers (ray gpu encode watch {} {})",
            info.id, info.display, info.codec, a.id, info.id
        ),
    }
    Ok(())
}

fn encode_watch(runtime: &Path, a: &EncodeWatchArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out: Box<dyn Write> = if a.output.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&a.output)
                .with_context(|| format!("cannot create {}", a.output.display()))?,
        ))
    };
    let until = a
        .seconds
        .map(|s| std::time::Instant::now() + std::time::Duration::from_secs_f64(s));
    let mut failed = None;
    let bytes = client(runtime, &a.id)?.stream(
        &format!("/vm/encode/{}/stream", a.session),
        until,
        |data| match out.write_all(data) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        },
    )?;
    if let Some(e) = failed {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).with_context(|| format!("cannot write {}", a.output.display()));
        }
    }
    out.flush()
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    if a.output.as_os_str() != "-" {
        eprintln!(
            "{bytes} bytes of encode session {} written to {}",
            a.session,
            a.output.display()
        );
    }
    Ok(())
}

fn encode_stop(runtime: &Path, a: &EncodeStopArgs) -> anyhow::Result<()> {
    let info: EncodeSessionInfo =
        client(runtime, &a.id)?.call("DELETE", &format!("/vm/encode/{}", a.session), None)?;
    if print_structured(&info, a.out.format())? {
        return Ok(());
    }
    println!(
        "encode session {} stopped: {} frames, {} bytes to {}",
        info.id,
        info.frames,
        info.bytes,
        stream_target(&info)
    );
    Ok(())
}

fn encode_list(runtime: &Path, a: &IdArgs) -> anyhow::Result<()> {
    list_sessions(runtime, a, "encode", |l: &EncodeList| {
        (!l.sessions.is_empty()).then(|| session_table(&l.sessions))
    })
}

/// Prints the VM's `kind` (encode, decode) sessions from `GET /vm/KIND`: structured, or
/// the table `table` makes (None: there are none).
fn list_sessions<L: serde::Serialize + serde::de::DeserializeOwned>(
    runtime: &Path,
    a: &IdArgs,
    kind: &str,
    table: impl Fn(&L) -> Option<String>,
) -> anyhow::Result<()> {
    let list: L = client(runtime, &a.id)?.call("GET", &format!("/vm/{kind}"), None)?;
    if print_structured(&list, a.out.format())? {
        return Ok(());
    }
    match table(&list) {
        Some(t) => print!("{t}"),
        None => println!("{}: no {kind} session", a.id),
    }
    Ok(())
}

fn decode_table(sessions: &[DecodeSessionInfo]) -> String {
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.codec.to_string(),
                s.state.to_string(),
                format!("{}x{}", s.width, s.height),
                s.frames.to_string(),
                format!("{:.1}", s.fps),
                format!("{:.2}", s.mean_latency_ms),
                match &s.error {
                    Some(e) => format!("{} ({e})", s.source),
                    None => s.source.to_string(),
                },
            ]
        })
        .collect();
    table(
        &[
            "DECODE",
            "CODEC",
            "STATE",
            "SIZE",
            "FRAMES",
            "FPS",
            "LATENCY_MS",
            "SOURCE",
        ],
        &rows,
    )
}

fn decode_start(runtime: &Path, a: &DecodeStartArgs) -> anyhow::Result<()> {
    let source = match (&a.file, a.encode_session) {
        (Some(f), None) => DecodeSource::File(
            std::path::absolute(f)
                .with_context(|| format!("cannot make {} absolute", f.display()))?
                .display()
                .to_string(),
        ),
        (None, Some(s)) => DecodeSource::EncodeSession(s),
        _ => anyhow::bail!("give either --file or --encode-session"),
    };
    let req = DecodeRequest {
        codec: a.codec,
        source,
    };
    // Checked here too, so that a bad setting is named before the VM is asked.
    req.validate().map_err(anyhow::Error::msg)?;
    let vm = client(runtime, &a.id)?;
    let mut info: DecodeSessionInfo =
        vm.call("POST", "/vm/decode", Some(serde_json::to_vec(&req)?))?;
    if a.wait {
        while !info.state.is_final() {
            std::thread::sleep(std::time::Duration::from_millis(50));
            info = vm.call("GET", &format!("/vm/decode/{}", info.id), None)?;
        }
    }
    if a.json {
        println!("{}", serde_json::to_string(&info)?);
    } else if a.wait {
        println!(
            "decode session {} {}: {} {} pictures of {}, {}x{}",
            info.id, info.state, info.frames, info.codec, info.source, info.width, info.height
        );
    } else {
        println!(
            "decode session {}: {} of {} (ray gpu decode-session list {})",
            info.id, info.codec, info.source, a.id
        );
    }
    if let Some(e) = info.error.as_deref().filter(|_| a.wait) {
        anyhow::bail!("decode session {} failed: {e}", info.id);
    }
    Ok(())
}

fn decode_list(runtime: &Path, a: &IdArgs) -> anyhow::Result<()> {
    list_sessions(runtime, a, "decode", |l: &DecodeList| {
        (!l.sessions.is_empty()).then(|| decode_table(&l.sessions))
    })
}

fn decode_show(runtime: &Path, a: &DecodeSessionArgs) -> anyhow::Result<()> {
    let info: DecodeSessionInfo =
        client(runtime, &a.id)?.call("GET", &format!("/vm/decode/{}", a.session), None)?;
    if print_structured(&info, a.out.format())? {
        return Ok(());
    }
    print!("{}", decode_table(std::slice::from_ref(&info)));
    Ok(())
}

fn decode_frame(runtime: &Path, a: &DecodeFrameArgs) -> anyhow::Result<()> {
    let answer =
        client(runtime, &a.id)?.raw("GET", &format!("/vm/decode/{}/frame.png", a.session), None)?;
    if answer.status >= 400 {
        return Err(api_error(answer.status, &answer.body).into());
    }
    std::fs::write(&a.output, &answer.body)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    println!("{}", a.output.display());
    Ok(())
}

fn decode_stop(runtime: &Path, a: &DecodeSessionArgs) -> anyhow::Result<()> {
    let info: DecodeSessionInfo =
        client(runtime, &a.id)?.call("DELETE", &format!("/vm/decode/{}", a.session), None)?;
    if print_structured(&info, a.out.format())? {
        return Ok(());
    }
    println!(
        "decode session {} stopped: {} pictures of {}",
        info.id, info.frames, info.source
    );
    Ok(())
}

fn decode(a: &DecodeArgs) -> anyhow::Result<()> {
    let stream =
        std::fs::read(&a.input).with_context(|| format!("cannot read {}", a.input.display()))?;
    if !a.last {
        std::fs::create_dir_all(&a.output)
            .with_context(|| format!("cannot make the directory {}", a.output.display()))?;
    }
    let mut last = None;
    let mut written = 0usize;
    let mut failed = None;
    let each = |f: DecodedFrame| {
        if a.last {
            last = Some(f);
            return;
        }
        let path = a.output.join(format!("frame-{written:05}.png"));
        if let Err(e) = write_png(&f, &path) {
            failed.get_or_insert(e);
        }
        written += 1;
    };
    // VP9 comes in IVF files, HEVC as .hevc/.h265 Annex-B streams; the rest is H.264.
    let ext = a.input.extension().and_then(|e| e.to_str()).unwrap_or("");
    let ffmpeg = stream.starts_with(b"DKIF") || ["hevc", "h265", "265"].contains(&ext);
    let n = if ffmpeg {
        decode_ffmpeg(&a.input, each)?
    } else {
        H264Decoder::new()
            .map_err(anyhow::Error::msg)?
            .decode(&stream, each)
            .map_err(|e| anyhow::anyhow!("{}: {e}", a.input.display()))?
    };
    if let Some(e) = failed {
        return Err(e);
    }
    if n == 0 {
        anyhow::bail!("{} holds no picture", a.input.display());
    }
    match last {
        Some(f) => {
            write_png(&f, &a.output)?;
            println!(
                "{} (the last of {n} pictures, {}x{})",
                a.output.display(),
                f.width,
                f.height
            );
        }
        None => println!("{n} pictures in {}", a.output.display()),
    }
    Ok(())
}

/// An HEVC or VP9 file through the host's FFmpeg.
#[cfg(feature = "ffmpeg")]
fn decode_ffmpeg(input: &Path, each: impl FnMut(DecodedFrame)) -> anyhow::Result<usize> {
    ray_display::encode::ffmpeg::decode_file(input, each).map_err(anyhow::Error::msg)
}

#[cfg(not(feature = "ffmpeg"))]
fn decode_ffmpeg(input: &Path, _each: impl FnMut(DecodedFrame)) -> anyhow::Result<usize> {
    anyhow::bail!(
        "{}: HEVC and VP9 files are decoded through the host's FFmpeg, which needs ray built \
         with the `ffmpeg` feature",
        input.display()
    )
}

fn write_png(f: &DecodedFrame, path: &Path) -> anyhow::Result<()> {
    let xrgb: Vec<u8> = f
        .rgb
        .chunks_exact(3)
        .flat_map(|p| [p[2], p[1], p[0], 0])
        .collect();
    let png = ray_display::png::encode(&xrgb, f.width, f.height, f.width * 4)
        .map_err(anyhow::Error::msg)?;
    std::fs::write(path, png).with_context(|| format!("cannot write {}", path.display()))
}
