//! `ray vm ...` and `ray vmm`.
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use ray_api::vmm::{ConsoleTail, LifecycleEvent, VmConfig, VmInfo, VmStateName};

use ray::client::VmmClient;
use ray::exit::{self, coded, NOT_FOUND, UNREACHABLE};
use ray::runtime::{self, Presence};

/// The command line rayvisor's own guest gets by default. `ray.poll_ms=0`: our VMM rings
/// the input doorbell, so the guest never needs to poll the UART.
pub const DEFAULT_GUEST_CMDLINE: &str = "console=ttyS0 ray.poll_ms=0";

#[derive(Subcommand)]
pub enum VmCommand {
    /// Create and boot a VM (rayvisor's own guest by default) and attach to its console.
    Run(RunArgs),
    /// List the VMs of this host.
    List(JsonFlag),
    /// Show one VM.
    Status(IdArgs),
    /// Stop every vCPU of a running VM.
    Pause(IdArgs),
    /// Continue a paused or suspended VM.
    Resume(IdArgs),
    /// Write the VM to disk (a snapshot in its directory) and release its memory.
    Suspend(IdArgs),
    /// Stop a VM: ask the guest to power off, then force it after the timeout.
    Stop(StopArgs),
    /// Show a VM's lifecycle events.
    Events(IdArgs),
    /// Show the tail of a VM's serial console, or send it a line.
    Console(ConsoleArgs),
    /// Checkpoint a running VM into the snapshot store: paused for a moment, incremental on
    /// its previous checkpoint when there is one in the same store.
    Checkpoint(crate::snapshot::CheckpointArgs),
}

#[derive(Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct IdArgs {
    /// The VM's id.
    pub id: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct StopArgs {
    pub id: String,
    /// Milliseconds to wait for the guest to power off before forcing it.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ConsoleArgs {
    pub id: String,
    /// How many trailing bytes to show.
    #[arg(long, default_value_t = 4096)]
    pub bytes: usize,
    /// Send this line to the guest (a newline is added) instead of showing the tail.
    #[arg(long)]
    pub send: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Clone)]
pub struct RunArgs {
    /// Kernel to boot (ELF vmlinux or bzImage). Default: rayvisor's own guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Default for rayvisor's guest: "console=ttyS0 ray.poll_ms=0".
    #[arg(long)]
    pub cmdline: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory, e.g. 128M or 2G.
    #[arg(long, default_value = "128M", value_parser = ray::sizes::parse_memory)]
    pub memory: u64,
    /// VM id (default: generated).
    #[arg(long)]
    pub id: Option<String>,
    /// Return once the VM runs instead of attaching to its console.
    #[arg(long)]
    pub detach: bool,
    #[arg(long)]
    pub json: bool,
    /// Also serve the VM's API on this loopback TCP address, e.g. 127.0.0.1:0 (0: any free
    /// port; `ray vm status` shows it). Loopback only: the API has no authentication.
    #[arg(long, value_name = "ADDR", value_parser = parse_api_tcp)]
    pub api_tcp: Option<std::net::SocketAddr>,
}

/// A `--api-tcp` address: a loopback IP and a port.
pub fn parse_api_tcp(s: &str) -> Result<std::net::SocketAddr, String> {
    let addr: std::net::SocketAddr = s.parse().map_err(|e| {
        format!("'{s}' is not an IP address and port such as 127.0.0.1:0 or [::1]:8080: {e}")
    })?;
    ray_vmm::api_server::check_tcp_addr(addr)?;
    Ok(addr)
}

#[derive(Args)]
pub struct VmmArgs {
    #[arg(long)]
    pub id: String,
    /// The VM's directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Configuration as JSON (the body of PUT /vm/config).
    #[arg(long)]
    pub config_json: Option<String>,
    /// Start the VM at once.
    #[arg(long)]
    pub start: bool,
    /// Console on this process's stdin/stdout.
    #[arg(long)]
    pub attach: bool,
    /// Restore this snapshot directory instead of booting.
    #[arg(long, conflicts_with_all = ["config_json", "start"])]
    pub restore: Option<PathBuf>,
    /// With --restore: skip checking guest memory against the snapshot's checksums.
    #[arg(long, requires = "restore")]
    pub no_verify_memory: bool,
    /// Wait for an incoming live migration on HOST:PORT or unix:/path instead of booting
    /// (--config-json, if given, is the vCPUs and memory the source must match).
    #[arg(long, requires = "migrate_key_file", conflicts_with_all = ["start", "restore"])]
    pub migrate_listen: Option<String>,
    /// With --migrate-listen: the pre-shared key file.
    #[arg(long, requires = "migrate_listen")]
    pub migrate_key_file: Option<PathBuf>,
    /// With --migrate-listen: host-wide cap on concurrent migrations.
    #[arg(long, default_value_t = 8)]
    pub max_concurrent_migrations: u32,
    /// With --migrate-listen: populate all of guest memory while waiting.
    #[arg(long, requires = "migrate_listen")]
    pub migrate_prefault: bool,
    /// The VM directory's lock, inherited as this descriptor from `ray vm run` (which
    /// took it); without it the VMM takes the lock itself.
    #[arg(long, hide = true)]
    pub lock_fd: Option<i32>,
    /// Also serve the API on this loopback TCP address (port 0: any free port).
    #[arg(long, value_name = "ADDR", value_parser = parse_api_tcp)]
    pub api_tcp: Option<std::net::SocketAddr>,
}

/// Where rayvisor's guest kernel is: `$RAY_GUEST`, or next to this binary (the build puts
/// `rayvisor-guest` beside `ray`), or the installed copy.
pub fn default_guest() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("RAY_GUEST") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find the path of this program")?;
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join("rayvisor-guest"));
        if let Some(up) = dir.parent() {
            candidates.push(up.join("rayvisor-guest"));
        }
    }
    candidates.push(PathBuf::from("/usr/lib/rayvisor/rayvisor-guest"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot find rayvisor's guest kernel (looked at {}); build it with `cargo build` or pass --kernel",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )
        })
}

pub fn vm_config(args: &RunArgs) -> anyhow::Result<VmConfig> {
    let (kernel, default_cmdline) = match &args.kernel {
        Some(k) => (k.clone(), "console=ttyS0"),
        None => (default_guest()?, DEFAULT_GUEST_CMDLINE),
    };
    Ok(VmConfig {
        kernel: kernel.display().to_string(),
        initrd: args.initrd.as_ref().map(|p| p.display().to_string()),
        cmdline: args
            .cmdline
            .clone()
            .unwrap_or_else(|| default_cmdline.into()),
        vcpus: args.vcpus,
        memory_bytes: args.memory,
    })
}

pub fn run(cmd: VmCommand, runtime: &Path) -> anyhow::Result<()> {
    match cmd {
        VmCommand::Run(args) => run_vm(&args, runtime),
        VmCommand::List(f) => list(runtime, f.json),
        VmCommand::Status(a) => status(runtime, &a.id, a.json),
        VmCommand::Pause(a) => action(runtime, &a.id, "/vm/pause", None, a.json),
        VmCommand::Resume(a) => action(runtime, &a.id, "/vm/resume", None, a.json),
        VmCommand::Suspend(a) => action(runtime, &a.id, "/vm/suspend", None, a.json),
        VmCommand::Stop(a) => {
            let body = serde_json::to_vec(&ray_api::vmm::StopRequest {
                timeout_ms: a.timeout_ms,
            })?;
            action(runtime, &a.id, "/vm/stop", Some(body), a.json)
        }
        VmCommand::Events(a) => events(runtime, &a.id, a.json),
        VmCommand::Console(a) => console(runtime, &a),
        VmCommand::Checkpoint(a) => crate::snapshot::checkpoint(runtime, &a),
    }
}

/// A client for a live VM, or an error saying why there is none.
pub fn client(runtime: &Path, id: &str) -> anyhow::Result<VmmClient> {
    runtime::check_id(id).map_err(|e| coded(exit::INVALID, e))?;
    let dir = runtime::vm_dir(runtime, id);
    if !dir.is_dir() {
        return Err(coded(
            NOT_FOUND,
            format!("no VM '{id}' in {}", runtime.display()),
        ));
    }
    match runtime::presence(&dir) {
        Presence::Live { .. } => Ok(VmmClient::new(&dir.join("api.sock"))),
        Presence::Ended(r) => Err(coded(
            exit::REFUSED,
            format!(
                "VM '{id}' has ended ({}{})",
                state_name(r.state),
                r.reason.map(|x| format!(": {x}")).unwrap_or_default()
            ),
        )),
        Presence::Dead { pid } => Err(coded(
            UNREACHABLE,
            format!(
                "the VMM of '{id}' (pid {}) is dead: it ended without a clean shutdown",
                pid.map_or("?".into(), |p| p.to_string())
            ),
        )),
    }
}

pub fn state_name(s: VmStateName) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// How a new VMM gets its VM.
pub enum Origin<'a> {
    Boot(&'a VmConfig),
    Restore {
        snapshot: &'a Path,
        verify_memory: bool,
    },
    /// Wait for an incoming live migration.
    Incoming {
        /// The vCPUs and memory the source must match; `None`: the source's.
        config: Option<&'a VmConfig>,
        listen: &'a str,
        key_file: &'a Path,
        max_concurrent: u32,
        /// Populate all of guest memory while waiting.
        prefault: bool,
    },
}

/// What else a new VMM is started with.
#[derive(Default)]
pub struct VmmExtras {
    /// Also serve the API on this loopback TCP address.
    pub api_tcp: Option<std::net::SocketAddr>,
}

fn spawn_vmm(
    id: &str,
    dir: &Path,
    origin: &Origin,
    attach: bool,
    extras: &VmmExtras,
    lock_fd: std::os::fd::RawFd,
) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("vmm").arg("--id").arg(id).arg("--dir").arg(dir);
    // The VM directory's lock, inherited (it is not close-on-exec): see runtime::claim.
    cmd.arg("--lock-fd").arg(lock_fd.to_string());
    if let Some(addr) = extras.api_tcp {
        cmd.arg("--api-tcp").arg(addr.to_string());
    }
    match origin {
        Origin::Boot(cfg) => {
            cmd.arg("--config-json")
                .arg(serde_json::to_string(cfg)?)
                .arg("--start");
        }
        Origin::Restore {
            snapshot,
            verify_memory,
        } => {
            cmd.arg("--restore").arg(snapshot);
            if !verify_memory {
                cmd.arg("--no-verify-memory");
            }
        }
        Origin::Incoming {
            config,
            listen,
            key_file,
            max_concurrent,
            prefault,
        } => {
            if let Some(config) = config {
                cmd.arg("--config-json").arg(serde_json::to_string(config)?);
            }
            cmd.arg("--migrate-listen")
                .arg(listen)
                .arg("--migrate-key-file")
                .arg(key_file)
                .arg("--max-concurrent-migrations")
                .arg(max_concurrent.to_string());
            if *prefault {
                cmd.arg("--migrate-prefault");
            }
        }
    }
    if attach {
        cmd.arg("--attach");
    } else {
        let log = std::fs::File::create(dir.join("vmm.log"))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe and touches no memory of ours; it detaches
        // the VMM from our session so it outlives this command and its terminal.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    }
    cmd.spawn().context("cannot start the VMM process")
}

fn run_vm(args: &RunArgs, runtime: &Path) -> anyhow::Result<()> {
    let cfg = vm_config(args)?;
    // An invalid request is refused here, before any VM directory or VMM exists.
    if let Some(id) = &args.id {
        runtime::check_id(id).map_err(|e| coded(exit::INVALID, e))?;
    }
    ray_vmm::config::validate(&cfg, ray_vmm::config::host_memory())
        .map_err(|e| coded(exit::INVALID, format!("invalid VM configuration: {e}")))?;
    launch_with(
        runtime,
        args.id.clone(),
        &Origin::Boot(&cfg),
        args.detach,
        args.json,
        &VmmExtras {
            api_tcp: args.api_tcp,
        },
    )
}

/// The exit code of a command whose VMM ended at start with `status`: the VMM's own for a
/// refused (4) or invalid (6) request, else 1.
fn start_failure_code(status: &std::process::ExitStatus) -> u8 {
    match status.code() {
        Some(c) if c == i32::from(exit::REFUSED) || c == i32::from(exit::INVALID) => c as u8,
        _ => 1,
    }
}

/// Starts a VMM for a new VM (booted or restored), attached or detached.
pub fn launch(
    runtime: &Path,
    id: Option<String>,
    origin: &Origin,
    detach: bool,
    json: bool,
) -> anyhow::Result<()> {
    launch_with(runtime, id, origin, detach, json, &VmmExtras::default())
}

/// [`launch`] with extras for the VMM.
pub fn launch_with(
    runtime: &Path,
    id: Option<String>,
    origin: &Origin,
    detach: bool,
    json: bool,
    extras: &VmmExtras,
) -> anyhow::Result<()> {
    let id = id.unwrap_or_else(runtime::new_id);
    // One VMM per VM: refused, naming the live VMM, while another runs or starts.
    let mut claim = runtime::claim(runtime, &id)?;
    let dir = claim.dir.clone();
    let lock_fd = claim.inheritable_fd()?;
    if !detach {
        let mut child = match spawn_vmm(&id, &dir, origin, true, extras, lock_fd) {
            Ok(c) => c,
            Err(e) => {
                claim.abandon();
                return Err(e);
            }
        };
        claim.spawned(child.id());
        // The VMM takes Ctrl-C itself (and stops the VM); this process just waits.
        // SAFETY: SIG_IGN for SIGINT in this process only; no handler code runs.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
        }
        let status = child.wait()?;
        if status.success() {
            return Ok(());
        }
        let code = start_failure_code(&status);
        if runtime::failed_at_start(&dir) {
            claim.abandon();
        }
        return Err(coded(
            code,
            format!("the VMM of '{id}' ended with {status}"),
        ));
    }
    let mut child = match spawn_vmm(&id, &dir, origin, false, extras, lock_fd) {
        Ok(c) => c,
        Err(e) => {
            claim.abandon();
            return Err(e);
        }
    };
    claim.spawned(child.id());
    let socket = dir.join("api.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    let info: VmInfo = loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
            let code = start_failure_code(&status);
            if runtime::failed_at_start(&dir) {
                claim.abandon();
            }
            let why = log.trim();
            return Err(coded(
                code,
                match code {
                    1 => format!("the VMM of '{id}' ended at start ({status}): {why}"),
                    _ => format!(
                        "cannot start VM '{id}': {}",
                        why.strip_prefix("ray: ").unwrap_or(why)
                    ),
                },
            ));
        }
        if socket.exists() {
            // Only an answer from this VMM counts (pid): the socket is its own once it
            // has bound it.
            if let Ok(info) = VmmClient::new(&socket).call::<VmInfo>("GET", "/vm", None) {
                if info.state != VmStateName::Created && info.pid == child.id() {
                    break info;
                }
            }
        }
        if Instant::now() > deadline {
            return Err(coded(
                UNREACHABLE,
                format!("the VMM of '{id}' did not come up within 30 s"),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("{id}");
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct ListRow {
    id: String,
    state: String,
    pid: Option<u32>,
    vcpus: Option<u8>,
    memory_bytes: Option<u64>,
    uptime_ms: Option<u64>,
}

fn list(runtime: &Path, json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for id in runtime::list_ids(runtime) {
        let dir = runtime::vm_dir(runtime, &id);
        let row = match runtime::presence(&dir) {
            Presence::Live { pid } => {
                match VmmClient::new(&dir.join("api.sock")).call::<VmInfo>("GET", "/vm", None) {
                    Ok(info) => ListRow {
                        id,
                        state: state_name(info.state),
                        pid: Some(pid),
                        vcpus: info.config.as_ref().map(|c| c.vcpus),
                        memory_bytes: info.config.as_ref().map(|c| c.memory_bytes),
                        uptime_ms: Some(info.uptime_ms),
                    },
                    Err(_) => ListRow {
                        id,
                        state: "unresponsive".into(),
                        pid: Some(pid),
                        vcpus: None,
                        memory_bytes: None,
                        uptime_ms: None,
                    },
                }
            }
            Presence::Ended(r) => ListRow {
                id,
                state: state_name(r.state),
                pid: None,
                vcpus: None,
                memory_bytes: None,
                uptime_ms: None,
            },
            Presence::Dead { pid } => ListRow {
                id,
                state: "dead".into(),
                pid,
                vcpus: None,
                memory_bytes: None,
                uptime_ms: None,
            },
        };
        rows.push(row);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<18} {:>8} {:>5} {:>9} {:>10}",
        "ID", "STATE", "PID", "VCPUS", "MEMORY", "UPTIME"
    );
    let dash = || "-".to_string();
    for r in rows {
        println!(
            "{:<16} {:<18} {:>8} {:>5} {:>9} {:>10}",
            r.id,
            r.state,
            r.pid.map_or_else(dash, |p| p.to_string()),
            r.vcpus.map_or_else(dash, |v| v.to_string()),
            r.memory_bytes
                .map_or_else(dash, |m| format!("{}M", m >> 20)),
            r.uptime_ms
                .map_or_else(dash, |u| format!("{:.1}s", u as f64 / 1000.0)),
        );
    }
    Ok(())
}

fn print_info(info: &VmInfo, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(info)?);
        return Ok(());
    }
    println!("id          {}", info.id);
    println!("state       {}", state_name(info.state));
    println!("pid         {}", info.pid);
    println!("hypervisor  {}", info.hypervisor);
    println!("uptime      {:.3}s", info.uptime_ms as f64 / 1000.0);
    if let Some(c) = &info.config {
        println!("vcpus       {}", c.vcpus);
        println!("memory      {} MiB", c.memory_bytes >> 20);
        println!("kernel      {}", c.kernel);
        println!("cmdline     {}", c.cmdline);
    }
    if let Some(h) = &info.heartbeat {
        println!(
            "heartbeat   counter={} guest_time={:.3}s cpus_online={} loop_rate={:.0}M/s pvm={}",
            h.counter,
            h.time_ns as f64 / 1e9,
            h.cpus_online,
            h.loop_rate as f64 / 1e6,
            h.pvm
        );
    }
    if let Some(r) = &info.exit_reason {
        println!("reason      {r}");
    }
    if let Some(a) = &info.api_tcp {
        println!("api_tcp     http://{a}");
    }
    Ok(())
}

fn status(runtime: &Path, id: &str, json: bool) -> anyhow::Result<()> {
    let info: VmInfo = client(runtime, id)?.call("GET", "/vm", None)?;
    print_info(&info, json)
}

fn action(
    runtime: &Path,
    id: &str,
    path: &str,
    body: Option<Vec<u8>>,
    json: bool,
) -> anyhow::Result<()> {
    let info: VmInfo = client(runtime, id)?.call("PUT", path, body)?;
    if json {
        print_info(&info, true)
    } else {
        println!("{id} {}", state_name(info.state));
        Ok(())
    }
}

fn events(runtime: &Path, id: &str, json: bool) -> anyhow::Result<()> {
    let dir = runtime::vm_dir(runtime, id);
    // A live VMM answers from its ring; an ended one still has its audit file.
    let events: Vec<LifecycleEvent> = match client(runtime, id) {
        Ok(c) => c.call("GET", "/vm/events", None)?,
        Err(e) if dir.join("events.jsonl").is_file() && exit::code_of(&e) != NOT_FOUND => {
            std::fs::read_to_string(dir.join("events.jsonl"))?
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        }
        Err(e) => return Err(e),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&events)?);
        return Ok(());
    }
    println!("{:<15} {:<17} {:<17} CAUSE", "TIME_MS", "FROM", "TO");
    for e in events {
        println!(
            "{:<15} {:<17} {:<17} {}",
            e.time_ms,
            state_name(e.from),
            state_name(e.to),
            e.cause
        );
    }
    Ok(())
}

fn console(runtime: &Path, a: &ConsoleArgs) -> anyhow::Result<()> {
    let c = client(runtime, &a.id)?;
    if let Some(line) = &a.send {
        let body = serde_json::to_vec(&ray_api::vmm::ConsoleInput {
            data: format!("{line}\n"),
        })?;
        let _: serde_json::Value = c.call("POST", "/vm/console", Some(body))?;
        return Ok(());
    }
    let tail: ConsoleTail = c.call("GET", &format!("/vm/console?bytes={}", a.bytes), None)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&tail)?);
    } else {
        print!("{}", tail.data);
    }
    Ok(())
}

/// `ray vmm`: runs one VMM in this process.
pub fn vmm(args: VmmArgs) -> anyhow::Result<()> {
    let config = args
        .config_json
        .as_deref()
        .map(|j| serde_json::from_str::<VmConfig>(j).context("invalid --config-json"))
        .transpose()?;
    let state = ray_vmm::run(ray_vmm::VmmOptions {
        id: args.id,
        dir: args.dir,
        attach: args.attach,
        config,
        start: args.start,
        restore: args.restore,
        verify_memory: !args.no_verify_memory,
        incoming: args.migrate_listen.map(|listen| ray_vmm::Incoming {
            listen,
            key_file: args.migrate_key_file.unwrap_or_default(),
            max_concurrent: args.max_concurrent_migrations,
            prefault: args.migrate_prefault,
        }),
        lock_fd: args.lock_fd,
        api_tcp: args.api_tcp,
    })?;
    match state {
        ray_vmm::lifecycle::VmState::Terminated => Ok(()),
        other => Err(coded(1, format!("the VM ended in state {other}"))),
    }
}
