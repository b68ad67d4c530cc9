//! `ray snapshot ...`: snapshots of a VM (full and incremental), the chains they form in a
//! store directory, and restoring them into a new VMM.
//!
//! A snapshot's path is `<store>/<id>`. `create`, `checkpoint` and `restore` go through the
//! VM's VMM; `list`, `status`, `delete`, `merge` and `verify` work on the files directly,
//! so they need no running VM (the per-VM API offers the same operations).
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ray::client::VmmClient;
use ray::exit::{self, coded};
use ray_api::vmm::{SnapshotInfo, SnapshotKind, SnapshotList, SnapshotProgress, SnapshotRequest};

use crate::vm::{client, Origin};
use ray::output::{self, Format, OutputArgs};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Write a snapshot of a paused VM (or of a running one with --pause).
    Create(CreateArgs),
    /// Show the snapshots of a store as a tree of chains.
    List(ListArgs),
    /// Show a snapshot's manifest.
    Status(StatusArgs),
    /// Start a new VM from a snapshot; it continues where the snapshot was taken.
    Restore(RestoreArgs),
    /// Delete a snapshot (refused while incremental snapshots depend on it).
    Delete(PathArgs),
    /// Flatten a snapshot's chain into a new full snapshot beside it.
    Merge(MergeArgs),
    /// Read every file of a snapshot and check every checksum.
    Verify(PathArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// The VM's id.
    pub id: String,
    /// Directory to create for the snapshot: `<store>/<snapshot id>`.
    pub path: PathBuf,
    /// Pause a running VM for the snapshot and resume it afterwards.
    #[arg(long)]
    pub pause: bool,
    /// Only the pages written since the VM's previous snapshot, which becomes the parent
    /// (it must be in the same store).
    #[arg(long)]
    pub incremental: bool,
    #[command(flatten)]
    pub write: WriteFlags,
}

/// Flags of every command that writes a snapshot.
#[derive(Args)]
pub struct WriteFlags {
    /// zstd-compress memory.
    #[arg(long)]
    pub compress: bool,
    /// Most snapshots the VM may have in the store.
    #[arg(long, default_value_t = 256)]
    pub max_snapshots: u32,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CheckpointArgs {
    /// The VM's id.
    pub id: String,
    /// The store (default: $RAY_SNAPSHOT_DIR, else /var/lib/rayvisor/snapshots for root,
    /// else ~/.local/share/rayvisor/snapshots).
    #[arg(long)]
    pub store: Option<PathBuf>,
    #[command(flatten)]
    pub write: WriteFlags,
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
    #[command(flatten)]
    pub jail: ray::jail::JailArgs,
}

#[derive(Args)]
pub struct ListArgs {
    /// The store directory (default: as for `ray vm checkpoint`).
    pub store: Option<PathBuf>,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args)]
pub struct PathArgs {
    /// The snapshot directory.
    pub path: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    /// The snapshot directory.
    pub path: PathBuf,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args)]
pub struct MergeArgs {
    /// The snapshot whose chain to flatten.
    pub path: PathBuf,
    /// Id of the new full snapshot (created in the same store).
    #[arg(long)]
    pub into: String,
    #[arg(long)]
    pub compress: bool,
    #[arg(long)]
    pub json: bool,
}

/// The default snapshot store.
pub fn default_store() -> PathBuf {
    if let Some(dir) = std::env::var_os("RAY_SNAPSHOT_DIR") {
        return PathBuf::from(dir);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/rayvisor/snapshots");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/share/rayvisor/snapshots")
}

/// A snapshot-store error as a CLI error with the matching exit code.
fn store_error(e: ray_vmm::snapshot::SnapshotError) -> anyhow::Error {
    use ray_snapshot::StoreError;
    use ray_vmm::snapshot::SnapshotError;
    let code = match &e {
        SnapshotError::Store(StoreError::NotFound(_)) => exit::NOT_FOUND,
        SnapshotError::Store(StoreError::HasChildren { .. } | StoreError::AlreadyExists(_))
        | SnapshotError::InUse(_) => exit::REFUSED,
        SnapshotError::Store(StoreError::File(ray_snapshot::FileError::Io { .. })) => 1,
        _ => exit::INVALID,
    };
    coded(code, e.to_string())
}

pub fn run(cmd: SnapshotCommand, runtime: &Path) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create(a) => {
            let kind = if a.incremental {
                SnapshotKind::Incremental
            } else {
                SnapshotKind::Full
            };
            let opts = Options {
                kind,
                pause: a.pause,
                compress: a.write.compress,
                max_snapshots: a.write.max_snapshots,
            };
            create(runtime, &a.id, &a.path, &opts, a.write.json)
        }
        SnapshotCommand::Restore(a) => {
            let snapshot = a
                .path
                .canonicalize()
                .with_context(|| format!("no snapshot at {}", a.path.display()))
                .map_err(|e| coded(exit::NOT_FOUND, format!("{e:#}")))?;
            let origin = Origin::Restore {
                snapshot: &snapshot,
                verify_memory: !a.no_verify_memory,
            };
            let extras = crate::vm::VmmExtras {
                jail: ray::jail::wanted(&a.jail)
                    .map_err(|e| coded(exit::INVALID, e.to_string()))?,
                ..Default::default()
            };
            crate::vm::launch_with(runtime, a.id.clone(), &origin, a.detach, a.json, &extras)
        }
        SnapshotCommand::List(a) => list(&a),
        SnapshotCommand::Status(a) => status(&a),
        SnapshotCommand::Delete(a) => {
            ray_vmm::snapshot::delete(&a.path).map_err(store_error)?;
            if !a.json {
                println!("deleted {}", a.path.display());
            } else {
                println!("{}", serde_json::json!({ "deleted": a.path }));
            }
            Ok(())
        }
        SnapshotCommand::Merge(a) => {
            let e = ray_vmm::snapshot::merge(&a.path, &a.into, a.compress).map_err(store_error)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                println!(
                    "{} -> {}: full snapshot, {} pages, {} MiB on disk",
                    a.path.display(),
                    e.id,
                    e.stored_pages,
                    e.disk_bytes >> 20
                );
            }
            Ok(())
        }
        SnapshotCommand::Verify(a) => {
            let (store, id) = ray_vmm::snapshot::split_path(&a.path).map_err(store_error)?;
            ray_snapshot::SnapshotStore::open(&store)
                .and_then(|s| s.verify(&id))
                .map_err(|e| store_error(e.into()))?;
            if a.json {
                println!("{}", serde_json::json!({ "verified": a.path }));
            } else {
                println!("{}: every checksum matches", a.path.display());
            }
            Ok(())
        }
    }
}

/// `ray vm checkpoint`: a paused-for-a-moment snapshot into the store, incremental on the
/// VM's previous one when there is one there.
pub fn checkpoint(runtime: &Path, a: &CheckpointArgs) -> anyhow::Result<()> {
    let store = a.store.clone().unwrap_or_else(default_store);
    std::fs::create_dir_all(&store)
        .with_context(|| format!("cannot create the snapshot store {}", store.display()))?;
    hand_to_vm(runtime, &a.id, &store)?;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let path = store.join(format!("{}-{ms}", a.id));
    let opts = Options {
        kind: SnapshotKind::Auto,
        pause: true,
        compress: a.write.compress,
        max_snapshots: a.write.max_snapshots,
    };
    create(runtime, &a.id, &path, &opts, a.write.json)
}

/// A store made inside the VM's directory belongs to that directory's owner: a jailed
/// VMM (its own uid, no capabilities) can then write there.
fn hand_to_vm(runtime: &Path, id: &str, store: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::path::absolute(ray::runtime::vm_dir(runtime, id))?;
    let store = std::path::absolute(store)?;
    let (Some(vm), Ok(st)) = (std::fs::metadata(&dir).ok(), std::fs::metadata(&store)) else {
        return Ok(());
    };
    if store.starts_with(&dir) && (st.uid(), st.gid()) != (vm.uid(), vm.gid()) {
        std::os::unix::fs::chown(&store, Some(vm.uid()), Some(vm.gid()))
            .with_context(|| format!("cannot hand {} to the VM's user", store.display()))?;
    }
    Ok(())
}

/// A bar that follows the VMM's `GET /vm/snapshot/progress` while `work` runs.
fn with_progress<T>(
    socket_client: VmmClient,
    label: String,
    show: bool,
    work: impl FnOnce() -> T,
) -> T {
    if !show {
        return work();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(label);
    let (done, finished) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let bar = &bar;
        s.spawn(move || {
            // Only show the bar for writes that take more than a moment.
            let mut wait = Duration::from_millis(300);
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(wait)
            {
                wait = Duration::from_millis(100);
                let progress =
                    socket_client.call::<SnapshotProgress>("GET", "/vm/snapshot/progress", None);
                if let Some(p) = progress.ok().filter(|p| p.active) {
                    bar.set_length(p.total_bytes);
                    bar.set_position(p.done_bytes);
                }
            }
        });
        let out = work();
        let _ = done.send(());
        bar.finish_and_clear();
        out
    })
}

/// How to take a snapshot.
pub struct Options {
    pub kind: SnapshotKind,
    pub pause: bool,
    pub compress: bool,
    pub max_snapshots: u32,
}

pub fn create(
    runtime: &Path,
    vm: &str,
    path: &Path,
    opts: &Options,
    json: bool,
) -> anyhow::Result<()> {
    let c = client(runtime, vm)?;
    let poller = client(runtime, vm)?;
    let path =
        std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    // A jailed VMM is handed a store outside its directory.
    let lent = ray_vmm::hand_over::snapshot_store(&ray::runtime::vm_dir(runtime, vm), &path)?;
    let body = serde_json::to_vec(&SnapshotRequest {
        handoff: lent.as_ref().map(|l| l.token.clone()),
        path: path.display().to_string(),
        pause: opts.pause,
        kind: opts.kind,
        compress: opts.compress,
        max_snapshots: Some(opts.max_snapshots),
    })?;
    let label = format!("snapshot of {vm}");
    let info: anyhow::Result<SnapshotInfo> = with_progress(poller, label, !json, || {
        c.call("PUT", "/vm/snapshot", Some(body))
    })
    .map_err(Into::into);
    if let Some(lent) = lent {
        lent.give_back(&path)?;
    }
    let info = info?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!(
            "{vm} -> {}: {}{}, {} pages, {:.1} MiB on disk, written in {:.1} ms, vCPUs stopped {:.1} ms",
            info.path,
            info.kind,
            info.parent
                .as_deref()
                .map(|p| format!(" on {p}"))
                .unwrap_or_default(),
            info.stored_pages,
            info.disk_bytes as f64 / (1 << 20) as f64,
            info.write_ms,
            info.paused_ms
        );
    }
    Ok(())
}

fn list(a: &ListArgs) -> anyhow::Result<()> {
    let store = a.store.clone().unwrap_or_else(default_store);
    let l: SnapshotList = ray_vmm::snapshot::list(&store).map_err(store_error)?;
    let format = a.out.format();
    if output::print_structured(&l, format)? {
        return Ok(());
    }
    if l.snapshots.is_empty() && l.broken.is_empty() {
        println!("no snapshots in {}", l.store);
        return Ok(());
    }
    let wide = format == Format::Wide;
    let mut header = vec!["SNAPSHOT", "KIND", "STATE", "VM", "PAGES", "DISK"];
    if wide {
        header.extend(["MEMORY", "PARENT", "CREATED"]);
    }
    let mib = |b: u64| format!("{:.1}Mi", b as f64 / (1 << 20) as f64);
    let mut rows: Vec<Vec<String>> = l
        .snapshots
        .iter()
        .map(|s| {
            // Children are indented under their parent.
            let mut row = vec![
                format!("{}{}", "  ".repeat(s.depth as usize), s.id),
                s.kind.to_string(),
                s.state.to_string(),
                s.vm_id.clone(),
                s.stored_pages.to_string(),
                mib(s.disk_bytes),
            ];
            if wide {
                row.extend([
                    mib(s.memory_bytes),
                    s.parent.clone().unwrap_or_else(|| "-".into()),
                    s.created_ms.to_string(),
                ]);
            }
            row
        })
        .collect();
    rows.extend(l.broken.iter().map(|b| {
        let mut row = vec![b.id.clone(), "-".into(), "BROKEN".into()];
        row.resize(header.len() - 1, "-".into());
        row.push(b.error.clone());
        row
    }));
    print!("{}", output::table(&header, &rows));
    Ok(())
}

fn status(a: &StatusArgs) -> anyhow::Result<()> {
    let m = ray_vmm::snapshot::manifest(&a.path).map_err(store_error)?;
    if output::print_structured(&m, a.out.format())? {
        return Ok(());
    }
    let entry = ray_vmm::snapshot::entry(&ray_snapshot::TreeNode::of(&m), 0);
    println!("id           {}", m.id);
    println!("parent       {}", m.parent.as_deref().unwrap_or("-"));
    println!("kind         {}", entry.kind);
    println!("state        {}", entry.state);
    println!("vm           {}", m.vm_id);
    println!("created_ms   {}", m.created_ms);
    println!("host         {}", m.cpu);
    println!("format       {}", m.format_version);
    println!(
        "memory       {} MiB, {} pages stored, {:.1} MiB on disk",
        m.memory_bytes >> 20,
        m.dirty_pages,
        entry.disk_bytes as f64 / (1 << 20) as f64
    );
    for (name, f) in &m.files {
        println!(
            "file         {name}: {} bytes{}",
            f.bytes,
            f.crc32
                .map(|c| format!(", crc32 {c:08x}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
