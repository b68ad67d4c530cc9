//! `ray gpu status|list|displays|screenshot|resize|type ID`: a VM's GPUs and displays
//! through its API.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use ray_api::gpu::GpuList;

use ray::client::api_error;
use ray::output::{print_structured, table, OutputArgs};

use crate::vm::client;

#[derive(Subcommand)]
pub enum GpuCommand {
    /// Each GPU's type, state and displays, and the VNC socket.
    Status(IdArgs),
    /// One line per GPU.
    List(IdArgs),
    /// One line per display.
    Displays(IdArgs),
    /// Save a display as a PNG.
    Screenshot(ScreenshotArgs),
    /// Give a virtio GPU's display a new size (the guest is told and redraws).
    Resize(ResizeArgs),
    /// Type text on the VM's keyboard (virtio-input, US layout; `\n` in TEXT is Enter).
    Type(TypeArgs),
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

fn parse_size(s: &str) -> Result<(u32, u32), String> {
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
        GpuCommand::List(a) => show(runtime, &a, View::List),
        GpuCommand::Displays(a) => show(runtime, &a, View::Displays),
        GpuCommand::Screenshot(a) => screenshot(runtime, &a),
        GpuCommand::Resize(a) => resize(runtime, &a),
        GpuCommand::Type(a) => type_text(runtime, &a),
    }
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
                    serde_json::to_value(g.state)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
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
            println!();
            print!("{}", table(DISPLAY_HEADER, &displays(&list)));
            match &list.vnc_socket {
                Some(s) => {
                    println!("\nVNC: {s} (display N: vnc-N.sock, view-only: vnc-N-view.sock)")
                }
                None => println!("\nVNC: not listening (the VM does not run)"),
            }
            for (i, a) in list.vnc_tcp.iter().enumerate() {
                println!("VNC display {i}: {a} (TCP, VNC authentication)");
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
