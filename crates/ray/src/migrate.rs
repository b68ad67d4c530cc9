//! `ray migrate ...`: live migration between two VMMs (two hosts, or one host).
//!
//! The target host runs `ray migrate receive --listen ADDR --key-file F`, which starts a
//! VMM in `migration_target` waiting on ADDR; the VM's vCPUs and memory come from the
//! source (given `--vcpus`/`--memory`, the source must match them). The source host runs
//! `ray migrate start ID --to ADDR --key-file F`, which starts the migration in the VM's VMM
//! and follows it with a progress bar until it ends.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ray_api::vmm::{
    MigrateRequest, MigrationRole, MigrationState, MigrationStatus, OnLimit, VmConfig,
};

use ray::exit::{self, coded};
use ray::runtime::{self, Presence};

use crate::vm::{client, launch_with, Origin, VmmExtras};
use ray::output::{self, Format, OutputArgs};

#[derive(Subcommand)]
pub enum MigrateCommand {
    /// Migrate a running VM to a target that waits for it (`ray migrate receive`).
    Start(StartArgs),
    /// Start a VMM that waits for an incoming migration (run this on the target host).
    Receive(ReceiveArgs),
    /// Show the migration of one VM (in flight or finished).
    Status(IdOutput),
    /// Follow a migration with a live progress bar until it ends.
    Progress(IdJson),
    /// List the migrations of this host.
    Sessions(OutputOnly),
    /// Cancel a migration in flight; the source VM keeps running.
    Cancel(IdJson),
    /// Resume a source left paused because the link failed after the switch-over
    /// (`paused_ownership_uncertain`). Only once the target is known dead (fenced).
    Reclaim(ReclaimArgs),
}

#[derive(Args)]
pub struct ReclaimArgs {
    pub id: String,
    /// Confirms that the target host was fenced: otherwise the VM could run twice.
    #[arg(long, required = true)]
    pub target_fenced: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct IdJson {
    pub id: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct IdOutput {
    pub id: String,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args)]
pub struct OutputOnly {
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OnLimitArg {
    Force,
    Abort,
}

#[derive(Args)]
pub struct StartArgs {
    /// The VM to migrate.
    pub id: String,
    /// The target: HOST:PORT, or unix:/path for a same-host move.
    #[arg(long)]
    pub to: String,
    /// File holding the pre-shared key (the target must use the same).
    #[arg(long)]
    pub key_file: PathBuf,
    /// Longest acceptable pause of the guest.
    #[arg(long, default_value_t = 30)]
    pub max_downtime_ms: u64,
    /// When pre-copy does not converge within the limits: force stop-and-copy or abort.
    #[arg(long, value_enum, default_value = "force")]
    pub on_limit: OnLimitArg,
    /// Pre-copy passes before the limit applies (default 30).
    #[arg(long)]
    pub max_passes: Option<u32>,
    /// Pre-copy time before the limit applies (default 60000).
    #[arg(long)]
    pub max_time_ms: Option<u64>,
    /// Do not throttle the vCPUs when the guest dirties memory faster than the link.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// lz4-compress page batches (slow links).
    #[arg(long)]
    pub compress: bool,
    /// Send the VM unencrypted over TCP (the key is still proved both ways). Only for a
    /// trusted network; the target needs --insecure-plaintext too. `unix:` moves on one
    /// host are plaintext anyway.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Reread the paused VM's memory before the switch-over and compare it with what was
    /// sent (proves dirty tracking missed nothing; lengthens the downtime).
    #[arg(long)]
    pub recheck_memory: bool,
    /// Copy the VM's disks with it instead of the target opening the same paths (shared
    /// storage): blocks with data go in the pre-copy passes, blocks written meanwhile again,
    /// the rest in the pause. The target needs --disk-dir.
    #[arg(long)]
    pub copy_disks: bool,
    /// Host-wide cap on concurrent migrations.
    #[arg(long, env = "RAY_MAX_MIGRATIONS", default_value_t = 8)]
    pub max_concurrent: u32,
    /// Return once the migration started instead of following it.
    #[arg(long)]
    pub detach: bool,
    /// Print the final status as JSON (no progress bar).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ReceiveArgs {
    /// Where to wait: HOST:PORT (port 0 picks one), or unix:/path.
    #[arg(long)]
    pub listen: String,
    /// File holding the pre-shared key.
    #[arg(long)]
    pub key_file: PathBuf,
    /// vCPUs of the VM to receive. Default: the source's; given, the source must match.
    #[arg(long, requires = "memory")]
    pub vcpus: Option<u8>,
    /// Memory of the VM to receive, e.g. 1G. Default: the source's; given (with
    /// --vcpus), the source must match, and the memory is allocated before it arrives.
    #[arg(long, requires = "vcpus", value_parser = ray::sizes::parse_memory)]
    pub memory: Option<u64>,
    /// Id of the VM here (default: generated).
    #[arg(long)]
    pub id: Option<String>,
    /// Host-wide cap on concurrent migrations.
    #[arg(long, env = "RAY_MAX_MIGRATIONS", default_value_t = 8)]
    pub max_concurrent: u32,
    /// Populate all of the guest's memory while waiting for the source (progress in
    /// `ray migrate status`). The target then holds all of the guest's memory at once, even
    /// pages the source never touched; in exchange the transfer allocates no pages and the
    /// guest takes no first-touch faults after the switch-over. Needs --memory.
    #[arg(long, requires = "memory")]
    pub prefault: bool,
    /// Accept the VM unencrypted over TCP (the source needs --insecure-plaintext too).
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Where disks a source copies (--copy-disks) go: DIR/<disk id>.img, made sparse (an
    /// existing file is refused, a failed migration removes them); the VM here uses them.
    /// A jailed target holds disks copied here and shared disks under --shared-dir.
    #[arg(long)]
    pub disk_dir: Option<PathBuf>,
    /// A directory of shared storage (the source's disks at the same paths): a jailed
    /// target's keeper opens the source's disks under it, and no others (repeatable; an
    /// unjailed target opens any path the source names).
    #[arg(long, value_name = "DIR")]
    pub shared_dir: Vec<PathBuf>,
    #[command(flatten)]
    pub jail: ray::jail::JailArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: MigrateCommand, runtime: &Path) -> anyhow::Result<()> {
    match cmd {
        MigrateCommand::Start(a) => start(runtime, &a),
        MigrateCommand::Receive(a) => receive(runtime, &a),
        MigrateCommand::Status(a) => {
            let s = status(runtime, &a.id)?;
            if output::print_structured(&s, a.out.format())? {
                return Ok(());
            }
            print_status(&a.id, &s, false)
        }
        MigrateCommand::Progress(a) => {
            let s = follow(runtime, &a.id, !a.json)?;
            print_status(&a.id, &s, a.json)?;
            outcome(&s)
        }
        MigrateCommand::Sessions(a) => sessions(runtime, a.out.format()),
        MigrateCommand::Reclaim(a) => {
            let s: MigrationStatus =
                client(runtime, &a.id)?.call("PUT", "/vm/migration/reclaim", None)?;
            print_status(&a.id, &s, a.json)
        }
        MigrateCommand::Cancel(a) => {
            let _: MigrationStatus =
                client(runtime, &a.id)?.call("PUT", "/vm/migration/cancel", None)?;
            let s = follow(runtime, &a.id, false)?;
            print_status(&a.id, &s, a.json)?;
            // A cancel that arrives after the switch-over cannot win: the VM runs on the
            // target now, and saying "cancelled" would be a lie.
            if s.state == MigrationState::Completed {
                return Err(coded(
                    exit::REFUSED,
                    format!(
                        "too late to cancel: the migration of VM '{}' had passed its switch-over and completed; the VM runs on {} now",
                        a.id, s.peer
                    ),
                ));
            }
            Ok(())
        }
    }
}

fn start(runtime: &Path, a: &StartArgs) -> anyhow::Result<()> {
    let key_file = std::path::absolute(&a.key_file)
        .with_context(|| format!("cannot resolve {}", a.key_file.display()))?;
    let mut req = MigrateRequest {
        to: a.to.clone(),
        key_file: key_file.display().to_string(),
        handoff: None,
        max_downtime_ms: a.max_downtime_ms,
        on_limit: match a.on_limit {
            OnLimitArg::Force => OnLimit::Force,
            OnLimitArg::Abort => OnLimit::Abort,
        },
        max_passes: a.max_passes,
        max_time_ms: a.max_time_ms,
        auto_converge: !a.no_auto_converge,
        compress: a.compress,
        insecure_plaintext: a.insecure_plaintext,
        recheck_memory: a.recheck_memory,
        copy_disks: a.copy_disks,
        max_concurrent: Some(a.max_concurrent),
    };
    let c = client(runtime, &a.id)?;
    // A jailed VMM is handed the connection, the key file and a migration slot; open until
    // it answered.
    let handed = ray_vmm::hand_over::migration(
        &runtime::vm_dir(runtime, &a.id),
        runtime,
        &req.to,
        &key_file,
        req.max_concurrent,
    )?;
    req.handoff = handed.as_ref().map(|h| h.token.clone());
    let started: MigrationStatus =
        c.call("PUT", "/vm/migration", Some(serde_json::to_vec(&req)?))?;
    if a.detach {
        return print_status(&a.id, &started, a.json);
    }
    let s = follow(runtime, &a.id, !a.json)?;
    print_status(&a.id, &s, a.json)?;
    outcome(&s)
}

/// A failed migration is a failed command.
fn outcome(s: &MigrationStatus) -> anyhow::Result<()> {
    if s.state == "completed" {
        return Ok(());
    }
    Err(coded(
        1,
        format!(
            "migration {}: {} (the VM here is {})",
            s.state,
            s.error.as_deref().unwrap_or("no reason given"),
            s.vm
        ),
    ))
}

fn receive(runtime: &Path, a: &ReceiveArgs) -> anyhow::Result<()> {
    let key_file = std::path::absolute(&a.key_file)
        .with_context(|| format!("cannot resolve {}", a.key_file.display()))?;
    // Kernel and command line come with the source's state; only the shape is needed,
    // and only to check the source against (and to allocate memory early).
    let cfg = a.memory.map(|memory_bytes| VmConfig {
        kernel: String::new(),
        initrd: None,
        cmdline: String::new(),
        vcpus: a.vcpus.unwrap_or_default(),
        memory_bytes,
        devices: Default::default(),
        numa: Vec::new(),
        numa_attribution: Default::default(),
        numa_migration: Default::default(),
    });
    if let Some(id) = &a.id {
        runtime::check_id(id).map_err(|e| coded(exit::INVALID, e))?;
    }
    // Absolute: the VMM runs in its own directory.
    let disk_dir = a
        .disk_dir
        .as_ref()
        .map(|d| std::path::absolute(d).with_context(|| format!("cannot resolve {}", d.display())))
        .transpose()?;
    let shared_dirs = a
        .shared_dir
        .iter()
        .map(|d| std::path::absolute(d).with_context(|| format!("cannot resolve {}", d.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let jail = ray::jail::wanted(&a.jail).map_err(|e| coded(exit::INVALID, e.to_string()))?;
    // A jailed target cannot listen in the host's network namespace, open the key file or
    // take the host's migration slot: `ray` does, and the VMM inherits them.
    let opened = match jail {
        Some(_) => Some(open_for_jail(
            runtime,
            &a.listen,
            a.max_concurrent,
            &key_file,
        )?),
        None => None,
    };
    let listen = opened
        .as_ref()
        .map_or_else(|| a.listen.clone(), |o| o.endpoint.to_string());
    let launched = launch_with(
        runtime,
        a.id.clone(),
        &Origin::Incoming {
            config: cfg.as_ref(),
            listen: &listen,
            key_file: &key_file,
            max_concurrent: a.max_concurrent,
            prefault: a.prefault,
            insecure_plaintext: a.insecure_plaintext,
            disk_dir: disk_dir.as_deref(),
            shared_dirs: &shared_dirs,
            handed: opened.as_ref().map(Opened::raw),
        },
        true,
        a.json,
        &VmmExtras {
            jail,
            ..Default::default()
        },
    );
    if let (Err(_), Some(o)) = (&launched, &opened) {
        o.remove_socket();
    }
    launched
}

/// What `ray migrate receive` (and `ray agent`) opens for a jailed target, inheritable (no
/// close-on-exec).
pub struct Opened {
    listener: std::os::fd::OwnedFd,
    /// Where it listens (a port 0 made a port).
    pub endpoint: ray_migration::Endpoint,
    key: std::os::fd::OwnedFd,
    slot: std::os::fd::OwnedFd,
}

impl Opened {
    pub fn raw(&self) -> [std::os::fd::RawFd; 3] {
        use std::os::fd::AsRawFd;
        [
            self.listener.as_raw_fd(),
            self.key.as_raw_fd(),
            self.slot.as_raw_fd(),
        ]
    }

    /// A Unix listener's file, when no VMM took it.
    pub fn remove_socket(&self) {
        if let ray_migration::Endpoint::Unix(p) = &self.endpoint {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A copy of `fd` that a spawned process inherits (dup never copies close-on-exec).
fn inheritable(fd: std::os::fd::BorrowedFd) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: dup of a descriptor borrowed for the call; the copy is owned below.
    let new = unsafe { libc::dup(fd.as_raw_fd()) };
    if new < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot duplicate a descriptor");
    }
    // SAFETY: `new` was just returned by dup and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(new) })
}

/// Checks the key file and the address, takes a migration slot and binds the listener,
/// in that order (each undone if a later one fails), for a jailed target waiting on
/// `listen`.
pub fn open_for_jail(
    runtime: &Path,
    listen: &str,
    max_concurrent: u32,
    key_file: &Path,
) -> anyhow::Result<Opened> {
    use std::os::fd::AsFd;
    let at = ray_migration::Endpoint::parse(listen).map_err(|e| coded(exit::INVALID, e))?;
    if max_concurrent == 0 {
        return Err(coded(
            exit::INVALID,
            "--max-concurrent is 0; it must be at least 1",
        ));
    }
    let key = ray_vmm::hand_over::open_key_file(key_file)?;
    let slot = ray_vmm::migration::acquire_slot(runtime, max_concurrent)
        .map_err(|e| coded(exit::REFUSED, e))?;
    let listener =
        ray_migration::Listener::bind(&at).map_err(|e| coded(exit::INVALID, e.to_string()))?;
    let (listener, endpoint) = listener.into_handed();
    let opened = Opened {
        listener: inheritable(listener.as_fd())?,
        endpoint,
        key: inheritable(key.as_fd())?,
        slot: inheritable(slot.file().as_fd())?,
    };
    Ok(opened)
}

/// The status from the live VMM, or the record an ended VMM left behind.
pub fn status(runtime: &Path, id: &str) -> anyhow::Result<MigrationStatus> {
    match client(runtime, id) {
        Ok(c) => match c.call("GET", "/vm/migration", None) {
            Ok(s) => Ok(s),
            // Ended between the check and the call: fall through to the record.
            Err(ray::client::ClientError::Unreachable { .. }) => record(runtime, id),
            Err(e) => Err(e.into()),
        },
        Err(e) if exit::code_of(&e) != exit::NOT_FOUND => record(runtime, id).map_err(|_| e),
        Err(e) => Err(e),
    }
}

fn record(runtime: &Path, id: &str) -> anyhow::Result<MigrationStatus> {
    let path = runtime::vm_dir(runtime, id).join("migration.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        coded(
            exit::NOT_FOUND,
            format!(
                "VM '{id}' has no migration record ({}: {e})",
                path.display()
            ),
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
}

/// The VMM recorded the outcome (the driver's state alone may run ahead of it).
fn finished(s: &MigrationStatus) -> bool {
    s.vm != "migrating"
}

/// Polls until the migration ends; draws a progress line when `bar`.
fn follow(runtime: &Path, id: &str, bar: bool) -> anyhow::Result<MigrationStatus> {
    let pb = bar.then(|| {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(100));
        b
    });
    let mut last_error = None;
    let deadline_without_answer = Duration::from_secs(30);
    let mut last_answer = Instant::now();
    loop {
        match status(runtime, id) {
            Ok(s) => {
                last_answer = Instant::now();
                if let Some(b) = &pb {
                    b.set_message(progress_line(&s));
                }
                if finished(&s) {
                    if let Some(b) = &pb {
                        b.finish_and_clear();
                    }
                    return Ok(s);
                }
            }
            Err(e) => last_error = Some(e),
        }
        if last_answer.elapsed() > deadline_without_answer {
            if let Some(b) = &pb {
                b.finish_and_clear();
            }
            return Err(last_error.unwrap_or_else(|| {
                coded(exit::UNREACHABLE, format!("VM '{id}' stopped answering"))
            }));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn progress_line(s: &MigrationStatus) -> String {
    format!(
        "{:<13} pass {:>2} | {:>6.2} GiB sent | dirty {:>7.1} MiB/s | bw {:>7.1} MiB/s | expected downtime {:>7.1} ms | throttle {:>2}%",
        s.state,
        s.pass,
        s.bytes_sent as f64 / (1u64 << 30) as f64,
        s.dirty_rate_mib_s,
        s.bandwidth_mib_s,
        s.expected_downtime_ms,
        s.throttle_percent
    )
}

fn print_status(id: &str, s: &MigrationStatus, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    let role = match s.role {
        MigrationRole::Source => "source",
        MigrationRole::Target => "target",
    };
    println!("vm          {id} ({role}, {})", s.vm);
    println!("peer        {}", s.peer);
    println!("state       {}", s.state);
    println!("pass        {}", s.pass);
    println!(
        "sent        {:.3} GiB ({} pages)",
        s.bytes_sent as f64 / (1u64 << 30) as f64,
        s.pages_sent
    );
    println!(
        "rates       dirty {:.1} MiB/s, bandwidth {:.1} MiB/s",
        s.dirty_rate_mib_s, s.bandwidth_mib_s
    );
    println!(
        "downtime    expected {:.1} ms{}",
        s.expected_downtime_ms,
        s.downtime_ms
            .map(|d| format!(", actual {d:.1} ms"))
            .unwrap_or_default()
    );
    println!("throttle    {}%", s.throttle_percent);
    if let (Some(done), Some(total)) = (s.prefault_bytes, s.prefault_total_bytes) {
        println!(
            "prefault    {} of {} MiB{}",
            done >> 20,
            total >> 20,
            s.prefault_error
                .as_deref()
                .map(|e| format!(" (stopped: {e})"))
                .unwrap_or_default()
        );
    }
    println!("elapsed     {:.3} s", s.elapsed_ms as f64 / 1e3);
    if let Some(e) = &s.error {
        println!("error       {e}");
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct SessionRow {
    id: String,
    #[serde(flatten)]
    status: MigrationStatus,
}

fn sessions(runtime: &Path, format: Format) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for id in runtime::list_ids(runtime) {
        let dir = runtime::vm_dir(runtime, &id);
        let s = match runtime::presence(&dir) {
            Presence::Live { .. } => client(runtime, &id)
                .ok()
                .and_then(|c| c.call::<MigrationStatus>("GET", "/vm/migration", None).ok()),
            _ => record(runtime, &id).ok(),
        };
        if let Some(status) = s {
            rows.push(SessionRow { id, status });
        }
    }
    if output::print_structured(&rows, format)? {
        return Ok(());
    }
    println!(
        "{:<16} {:<7} {:<22} {:<14} {:>4} {:>9} {:<27} ERROR",
        "ID", "ROLE", "PEER", "STATE", "PASS", "SENT", "VM"
    );
    for r in rows {
        let s = &r.status;
        println!(
            "{:<16} {:<7} {:<22} {:<14} {:>4} {:>8.2}G {:<27} {}",
            r.id,
            match s.role {
                MigrationRole::Source => "source",
                MigrationRole::Target => "target",
            },
            s.peer,
            s.state,
            s.pass,
            s.bytes_sent as f64 / (1u64 << 30) as f64,
            s.vm,
            s.error.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}
