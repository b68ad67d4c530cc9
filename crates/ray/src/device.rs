//! `ray device serve blk|net|vsock|gpu`: one of our device models as a vhost-user back end on a Unix
//! socket, for another VMM (QEMU) and its guest's drivers. Every argument is checked, the
//! disk, the TAP, the vsock host socket and the GPU's control socket opened before the
//! vhost-user socket exists; the process then serves one front end after another until it
//! is killed.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::bail;
use clap::{Args, Subcommand};
use ray_api::net::NetConfig;
use ray_api::vmm::DiskConfig;
use ray_api::vsock::VsockConfig;
use ray_devices::virtio::blk::Block;
use ray_devices::virtio::tap;
use ray_devices::virtio::vsock::{Opener, Vsock};
use ray_devices::virtio::VirtioDevice;
use ray_vhost::MakeDevice;

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Serve a device model as a vhost-user back end.
    #[command(subcommand)]
    Serve(ServeCommand),
}

#[derive(Subcommand)]
pub enum ServeCommand {
    /// A virtio-blk disk (QEMU: `-device vhost-user-blk-pci`).
    Blk(BlkArgs),
    /// A virtio-net NIC on a TAP (QEMU: `-netdev vhost-user`).
    Net(NetArgs),
    /// A virtio-vsock device whose host side is a Unix socket (QEMU:
    /// `-device vhost-user-vsock-pci`).
    Vsock(VsockArgs),
    /// A virtio-gpu 2D device (QEMU: `-device vhost-user-gpu-pci`); its frames go to the
    /// front end's display, and screenshots are taken through --control.
    Gpu(GpuArgs),
}

#[derive(Args)]
pub struct GpuArgs {
    /// The Unix socket to listen on for the front end (replaced if it is a stale socket).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Scanouts (displays); give the front end as many (QEMU: `max_outputs=N`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    scanouts: u32,
    /// Each scanout's mode, as GET_DISPLAY_INFO and the EDID report it.
    #[arg(long, default_value = "1024x768", value_name = "WIDTHxHEIGHT",
          value_parser = crate::gpu::parse_size)]
    mode: (u32, u32),
    /// A Unix socket taking one line per connection, answered with one line:
    /// `screenshot N PATH` (scanout N as a PNG at PATH; `ok WIDTHxHEIGHT`) or `stats`.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Args)]
pub struct BlkArgs {
    /// The Unix socket to listen on (replaced if it is a stale socket).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The disk, as `ray vm run --disk` takes it.
    #[arg(long, value_name = ray::disks::SYNTAX, value_parser = ray::disks::parse_disk)]
    disk: DiskConfig,
    /// Queues offered (VIRTIO_BLK_F_MQ); QEMU asks for one per vCPU unless told otherwise.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
}

#[derive(Args)]
pub struct NetArgs {
    /// The Unix socket to listen on (replaced if it is a stale socket).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The NIC, as `ray vm run --net` takes it: `tap=NAME[,netns=NS][,mac=..]`.
    #[arg(long, value_name = "tap=NAME[,netns=NS][,mac=MAC][,rate=B][,pps=N]",
          value_parser = NetConfig::parse)]
    net: NetConfig,
}

#[derive(Args)]
pub struct VsockArgs {
    /// The Unix socket to listen on for the front end (replaced if it is a stale socket).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The device, as `ray vm run --vsock` takes it; `socket=` (the host side: host
    /// programs connect there, and the guest's connections to port P go to `SOCKET_P`) is
    /// required here, as there is no VM directory to put it in.
    #[arg(long, value_name = "cid=N,socket=PATH", value_parser = VsockConfig::parse)]
    vsock: VsockConfig,
}

pub fn run(cmd: DeviceCommand) -> anyhow::Result<()> {
    let DeviceCommand::Serve(serve) = cmd;
    match serve {
        ServeCommand::Blk(a) => serve_blk(a),
        ServeCommand::Net(a) => serve_net(a),
        ServeCommand::Vsock(a) => serve_vsock(a),
        ServeCommand::Gpu(a) => serve_gpu(a),
    }
}

/// Refuses a socket path that cannot be ours: a missing directory, or something other
/// than a socket in the way (binding would delete it).
fn check_socket(path: &Path) -> anyhow::Result<()> {
    check_socket_flag("--socket", path)
}

/// [`check_socket`] for the socket given with `flag`.
fn check_socket_flag(flag: &str, path: &Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "{flag} {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => bail!(
            "{flag} {}: a file that is not a socket is in the way; remove it or pick another path",
            path.display()
        ),
        _ => Ok(()),
    }
}

fn serve_blk(a: BlkArgs) -> anyhow::Result<()> {
    check_socket(&a.socket)?;
    let config = ray_vmm::pci::block_config(&a.disk, a.queues);
    // Opened once here so that a bad disk is refused before the socket exists; each front
    // end gets a model of its own on the same file.
    let size = Block::open(config.clone())
        .map_err(|e| anyhow::anyhow!("--disk {}: {e}", a.disk.path))?
        .size();
    tracing::info!(
        "virtio-blk: disk {} ({size} bytes{}), {} queues",
        a.disk.path,
        if a.disk.readonly { ", read-only" } else { "" },
        a.queues
    );
    let make: MakeDevice = Arc::new(move || {
        Block::open(config.clone())
            .map(|b| Box::new(b) as Box<dyn VirtioDevice>)
            .map_err(|e| e.to_string())
    });
    ray_vhost::serve("virtio-blk", &a.socket, make)?;
    Ok(())
}

fn serve_net(a: NetArgs) -> anyhow::Result<()> {
    check_socket(&a.socket)?;
    let config = a.net;
    let tap = tap::open(&config.tap, config.netns.as_deref())
        .map_err(|e| anyhow::anyhow!("--net: {e}"))?;
    tracing::info!(
        "virtio-net: TAP {}{}, mac {:02x?}",
        config.tap,
        config
            .netns
            .as_deref()
            .map(|n| format!(" in namespace {n}"))
            .unwrap_or_default(),
        config.mac_address().map_err(anyhow::Error::msg)?
    );
    let make: MakeDevice = Arc::new(move || {
        let file = tap
            .try_clone()
            .map_err(|e| format!("cannot share TAP {}: {e}", config.tap))?;
        ray_vmm::net::on_tap(&config, file, true).map(|n| Box::new(n) as Box<dyn VirtioDevice>)
    });
    ray_vhost::serve("virtio-net", &a.socket, make)?;
    Ok(())
}

fn serve_vsock(a: VsockArgs) -> anyhow::Result<()> {
    check_socket(&a.socket)?;
    let cid = a.vsock.cid;
    let Some(host) = a.vsock.socket.map(PathBuf::from) else {
        bail!("--vsock: socket=PATH is required for a served device (the host side's Unix socket)");
    };
    if host == a.socket {
        bail!(
            "--vsock socket={} is the vhost-user --socket too; they must differ",
            host.display()
        );
    }
    // Bound once here so that a bad path is refused before the vhost-user socket exists;
    // each front end's model binds it again.
    drop(Vsock::new(cid, host.clone(), Opener::Own).map_err(|e| anyhow::anyhow!("--vsock: {e}"))?);
    tracing::info!(
        "virtio-vsock: guest cid {cid}, host side {}",
        host.display()
    );
    let make: MakeDevice = Arc::new(move || {
        Vsock::new(cid, host.clone(), Opener::Own).map(|v| Box::new(v) as Box<dyn VirtioDevice>)
    });
    ray_vhost::serve("virtio-vsock", &a.socket, make)?;
    Ok(())
}

fn serve_gpu(a: GpuArgs) -> anyhow::Result<()> {
    check_socket(&a.socket)?;
    if let Some(control) = &a.control {
        check_socket_flag("--control", control)?;
        if *control == a.socket {
            bail!(
                "--control {} is the vhost-user --socket too; they must differ",
                control.display()
            );
        }
    }
    let modes = vec![a.mode; a.scanouts as usize];
    let output =
        ray_vhost::gpu::GpuOutput::new(modes).map_err(|e| anyhow::anyhow!("--mode: {e}"))?;
    if let Some(control) = &a.control {
        if control.exists() {
            std::fs::remove_file(control)
                .map_err(|e| anyhow::anyhow!("--control {}: {e}", control.display()))?;
        }
        let listener = UnixListener::bind(control)
            .map_err(|e| anyhow::anyhow!("--control {}: {e}", control.display()))?;
        let output = output.clone();
        std::thread::Builder::new()
            .name("gpu-control".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(s) => {
                            if let Err(e) = control_request(&output, s) {
                                tracing::warn!("virtio-gpu control: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("virtio-gpu control: cannot accept: {e}"),
                    }
                }
            })?;
    }
    tracing::info!(
        "virtio-gpu: {} scanouts of {}x{}{}",
        a.scanouts,
        a.mode.0,
        a.mode.1,
        a.control
            .as_deref()
            .map(|c| format!(", control socket {}", c.display()))
            .unwrap_or_default()
    );
    ray_vhost::serve_with(
        "virtio-gpu",
        &a.socket,
        output.make_device(),
        Some(output.socket_hook()),
    )?;
    Ok(())
}

/// One control connection: one line in, one line out.
fn control_request(output: &ray_vhost::gpu::GpuOutput, stream: UnixStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(&stream).take(4096).read_line(&mut line)?;
    let answer = match control_answer(output, line.trim_end()) {
        Ok(a) => format!("ok {a}\n"),
        Err(e) => {
            tracing::warn!("virtio-gpu control: {e}");
            format!("error {e}\n")
        }
    };
    (&stream).write_all(answer.as_bytes())
}

fn control_answer(output: &ray_vhost::gpu::GpuOutput, line: &str) -> Result<String, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["stats"] => {
            let s = output.stats();
            let flushes: Vec<String> = s.flushes.iter().map(u64::to_string).collect();
            Ok(format!(
                "flushes={} refused={} scanouts_sent={} updates_sent={} update_bytes={} busy_ms={}",
                flushes.join(","),
                s.refused,
                s.scanouts_sent,
                s.updates_sent,
                s.update_bytes,
                s.busy.as_millis()
            ))
        }
        ["screenshot", n, path] => {
            let n: usize = n
                .parse()
                .map_err(|_| format!("screenshot: '{n}' is not a scanout number"))?;
            let displays = output
                .displays()
                .ok_or("screenshot: no front end has driven the GPU yet")?;
            let modes = displays.modes();
            let &(w, h) = modes.get(n).ok_or_else(|| {
                format!(
                    "screenshot: scanout {n} does not exist (this GPU has {})",
                    modes.len()
                )
            })?;
            let mut frame = vec![0u8; w as usize * h as usize * 4];
            if !displays.read(n, &mut frame) {
                return Err(format!(
                    "screenshot: scanout {n} changed its mode meanwhile; try again"
                ));
            }
            let png = ray_display::png::encode(&frame, w, h, w * 4)?;
            std::fs::write(path, png)
                .map_err(|e| format!("screenshot: cannot write {path}: {e}"))?;
            Ok(format!("{w}x{h}"))
        }
        _ => Err(format!(
            "'{line}' is not a control request (screenshot N PATH, or stats)"
        )),
    }
}
