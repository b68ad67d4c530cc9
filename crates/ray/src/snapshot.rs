//! `ray snapshot ...`: full snapshots of a VM and restoring them into a new VMM.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ray_api::vmm::{SnapshotInfo, SnapshotRequest};

use crate::vm::{client, launch, Origin};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Write a full snapshot of a paused VM (or of a running one with --pause).
    Create(CreateArgs),
    /// Start a new VM from a snapshot; it continues where the snapshot was taken.
    Restore(RestoreArgs),
    /// Show a snapshot's manifest.
    Status(StatusArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// The VM's id.
    pub id: String,
    /// Directory to create for the snapshot.
    pub path: PathBuf,
    /// Pause a running VM for the snapshot and resume it afterwards.
    #[arg(long)]
    pub pause: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The snapshot directory.
    pub path: PathBuf,
    /// Id of the new VM (default: generated).
    #[arg(long)]
    pub id: Option<String>,
    /// Skip checking guest memory against the snapshot's checksums (faster for large guests).
    #[arg(long)]
    pub no_verify_memory: bool,
    /// Return once the VM runs instead of attaching to its console.
    #[arg(long)]
    pub detach: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    pub path: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: SnapshotCommand, runtime: &Path) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create(a) => create(runtime, &a),
        SnapshotCommand::Restore(a) => {
            let snapshot = a
                .path
                .canonicalize()
                .with_context(|| format!("no snapshot at {}", a.path.display()))?;
            let origin = Origin::Restore {
                snapshot: &snapshot,
                verify_memory: !a.no_verify_memory,
            };
            launch(runtime, a.id.clone(), &origin, a.detach, a.json)
        }
        SnapshotCommand::Status(a) => status(&a),
    }
}

pub fn create(runtime: &Path, a: &CreateArgs) -> anyhow::Result<()> {
    let c = client(runtime, &a.id)?;
    let path = std::path::absolute(&a.path)
        .with_context(|| format!("cannot resolve {}", a.path.display()))?;
    let body = serde_json::to_vec(&SnapshotRequest {
        path: path.display().to_string(),
        pause: a.pause,
    })?;
    let bar = (!a.json).then(|| {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        b.set_message(format!(
            "writing snapshot of {} to {}",
            a.id,
            path.display()
        ));
        b.enable_steady_tick(std::time::Duration::from_millis(100));
        b
    });
    let info: Result<SnapshotInfo, _> = c.call("PUT", "/vm/snapshot", Some(body));
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let info = info?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!(
            "{} -> {}: {} MiB of memory, {} MiB on disk, written in {:.1} ms, vCPUs stopped {:.1} ms",
            a.id,
            info.path,
            info.memory_bytes >> 20,
            info.memory_allocated_bytes >> 20,
            info.write_ms,
            info.paused_ms
        );
    }
    Ok(())
}

fn status(a: &StatusArgs) -> anyhow::Result<()> {
    let m = ray_vmm::snapshot::Manifest::read(&a.path)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    println!("id           {}", m.id);
    println!("vm           {}", m.vm_id);
    println!("created_ms   {}", m.created_ms);
    println!("hypervisor   {}", m.hypervisor);
    println!("vcpus        {}", m.config.vcpus);
    println!(
        "memory       {} MiB ({} MiB on disk)",
        m.memory_bytes >> 20,
        m.memory_allocated_bytes >> 20
    );
    println!(
        "state        {} bytes, crc32 {:08x}",
        m.state_bytes, m.state_crc32
    );
    Ok(())
}
