//! `ray vm ...` and `ray vmm`.
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use ray_api::vmm::{DevicesConfig, VmConfig, VmInfo, VmStateName};

use ray::client::VmmClient;
use ray::exit::{self, coded, NOT_FOUND, UNREACHABLE};
use ray::runtime::{self, Presence};

/// The command line rayvisor's own guest gets by default. `ray.poll_ms=0`: our VMM rings
/// the input doorbell, so the guest never needs to poll the UART.
pub const DEFAULT_GUEST_CMDLINE: &str = "console=ttyS0 ray.poll_ms=0";

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process, never stored
pub enum VmCommand {
    /// Create and boot a VM (rayvisor's own guest by default) and attach to its console.
    Run(RunArgs),
    /// List the VMs of this host.
    #[command(visible_alias = "ls")]
    List(crate::vm_show::ListArgs),
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
    /// Attach to a VM's serial console (Ctrl-] detaches), or print its tail, or type a line.
    Console(crate::console::ConsoleArgs),
    /// Show a VM's serial console log, or its VMM's log; follow it with -f.
    Logs(crate::logs::LogsArgs),
    /// Print a VM's configuration: the file `ray vm run -f` takes.
    Config(IdArgs),
    /// Remove VMs that have ended (terminated, failed or dead): their directories and logs.
    Rm(crate::vm_admin::RmArgs),
    /// Remove every VM that has ended.
    Prune(crate::vm_admin::PruneArgs),
    /// Checkpoint a running VM into the snapshot store: paused for a moment, incremental on
    /// its previous checkpoint when there is one in the same store.
    Checkpoint(crate::snapshot::CheckpointArgs),
    /// Run a command of the guest's shell over vsock (port 52); exits with its status.
    Exec(crate::vm_exec::ExecArgs),
}

#[derive(Args)]
pub struct IdArgs {
    /// The VM's id.
    pub id: String,
    #[command(flatten)]
    pub out: ray::output::OutputArgs,
}

#[derive(Args)]
pub struct StopArgs {
    /// The VM's id.
    pub id: String,
    /// Milliseconds to wait for the guest to power off before forcing it.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    #[command(flatten)]
    pub out: ray::output::OutputArgs,
}

#[derive(Args, Clone)]
pub struct RunArgs {
    /// Read the configuration from FILE: YAML (JSON for a .json file; - is stdin), as
    /// `ray vm config ID` prints it.
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "memory", "no_rng", "disks", "net", "numa", "numa_attribution", "numa_migrate", "gpus", "gpu_limits", "vsock", "input"]
    )]
    pub file: Option<PathBuf>,
    /// Kernel to boot (ELF vmlinux or bzImage). Default: rayvisor's own guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk to load with the kernel.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Default for rayvisor's guest: "console=ttyS0 ray.poll_ms=0".
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Number of vCPUs. Default: 1, or as many as the --numa nodes list.
    #[arg(long)]
    pub vcpus: Option<u8>,
    /// Guest memory, e.g. 128M or 2G. Default: 128M, or the --numa nodes' sum.
    #[arg(long, value_parser = ray::sizes::parse_memory)]
    pub memory: Option<u64>,
    /// Leave out the virtio-rng device (present by default).
    #[arg(long)]
    pub no_rng: bool,
    /// A virtio-blk disk (a raw image file or block device); repeat for more. Options: ro
    /// (read-only), direct (O_DIRECT, no host page cache), id=NAME (default diskN), rate=BYTES per second, iops=N,
    /// engine=pool|uring (the VMM's I/O: a thread pool or an io_uring).
    #[arg(long = "disk", value_name = ray::disks::SYNTAX, value_parser = ray::disks::parse_disk)]
    pub disks: Vec<ray_api::vmm::DiskConfig>,
    /// A virtio-net NIC on a TAP (repeatable): tap=NAME[,netns=NS][,mac=02:..:..]
    /// [,rate=BYTES/s][,pps=PACKETS/s]. The TAP is created if missing; with netns it is
    /// opened inside that namespace (/run/netns/NS).
    #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
    pub net: Vec<ray_api::net::NetConfig>,
    /// A guest NUMA node (repeat for each): `node=0,cpus=0-1,memory=512M,host-node=0,
    /// policy=bind`. cpus: its vCPUs (none: memory only); host-node: the host nodes that
    /// hold its memory and run its vCPUs (none: chosen for it); policy: bind (only there),
    /// preferred (there while it has room: for overcommitted hosts) or interleave.
    #[arg(long, value_name = "NODE", value_parser = ray::numa::parse_numa_node)]
    pub numa: Vec<ray_api::vmm::NumaNodeConfig>,
    /// Attribute guest memory writes to vCPUs (and so to guest NUMA nodes): `ring` (KVM's
    /// per-vCPU dirty rings, which then also serve snapshots and migration) or `off`.
    #[arg(long, value_name = "ring|off", value_parser = parse_attribution)]
    pub numa_attribution: Option<ray_api::vmm::NumaAttribution>,
    /// The access-driven page migration policy: `off`, `dry-run` (decide and log, move
    /// nothing) or `on`, with `,window=5s` (attribution window) and `,rate=256` (MiB/s).
    /// Needs --numa-attribution ring and --numa nodes.
    #[arg(long, value_name = "MODE[,window=D][,rate=MiB/s]", value_parser = ray::numa::parse_numa_migrate)]
    pub numa_migrate: Option<ray_api::vmm::NumaMigrationConfig>,
    /// A GPU (repeatable): emulated|virtio[,width=W][,height=H][,displays=N] (default
    /// 1024x768, one display; up to 8 GPUs, 4 displays each, 16 in all: see
    /// --gpu-limits), or none. An
    /// emulated GPU's displays are framebuffers in guest RAM, a virtio GPU's the scanouts
    /// of a virtio-gpu device; all are served over VNC on the VM directory's vnc-N.sock.
    /// emulated,device=bochs is instead a Bochs-display-style PCI device (1234:1111, 32
    /// MiB VRAM BAR, DISPI mode registers; one display, the guest sets its mode).
    /// Also remote,socket=PATH|tcp=ADDR,token-file=F[,...] and
    /// passthrough,vfio-user=SOCKET|host=BDF; both take ,timeout-ms=N (how long the device
    /// outside the VMM has to answer one request: 100..=60000, default 5000 remote, 2000
    /// passthrough).
    #[arg(long = "gpu", value_name = "SPEC", value_parser = parse_gpu)]
    pub gpus: Vec<Option<ray_api::gpu::GpuConfig>>,
    /// Limits the --gpu list is checked against, any of gpus=N,displays-per-gpu=N,
    /// displays=N (defaults 8, 4 and 16; each 1 to 16: lower them to bound what a VM may
    /// have, raise them for a guest that drives more scanouts, as Linux's virtio-gpu does).
    #[arg(long, value_name = "gpus=N,displays-per-gpu=N,displays=N")]
    pub gpu_limits: Option<ray_api::gpu::GpuLimits>,
    /// A virtio-vsock device (one at most): cid=N[,socket=PATH]. N is the guest's context
    /// id (3 or more); the host side listens on PATH (default: vsock.sock in the VM's
    /// directory). `ray vm exec` runs guest shell commands through it.
    #[arg(long, value_name = "cid=N[,socket=PATH]", value_parser = ray_api::vsock::VsockConfig::parse)]
    pub vsock: Option<ray_api::vsock::VsockConfig>,
    /// A virtio-input keyboard and tablet (on or off) for VNC viewers and `ray gpu type`.
    /// Default: on when the VM has a GPU.
    #[arg(long, value_name = "on|off", value_parser = clap::builder::BoolishValueParser::new())]
    pub input: Option<bool>,
    /// VM id (default: generated).
    #[arg(long)]
    pub id: Option<String>,
    /// Return once the VM runs instead of attaching to its console.
    #[arg(long)]
    pub detach: bool,
    #[arg(long)]
    pub json: bool,
    /// Also serve the VM's API on this loopback TCP address, e.g. 127.0.0.1:0 (0: any free
    /// port; `ray vm status` shows it). Every request needs `Authorization: Bearer TOKEN`,
    /// the token being in the file api.token of the VM's directory (mode 0600).
    #[arg(long, value_name = "ADDR", value_parser = parse_api_tcp)]
    pub api_tcp: Option<std::net::SocketAddr>,
    /// The VMM threads' seccomp filters: kill (a forbidden system call ends the VMM and
    /// its exit record says which thread made which call), log (allowed, logged by the
    /// kernel) or off. Default: $RAY_SECCOMP, else kill.
    #[arg(long, value_name = "off|log|kill", env = "RAY_SECCOMP")]
    pub seccomp: Option<ray_vmm::seccomp::Mode>,
    #[command(flatten)]
    pub jail: ray::jail::JailArgs,
    #[command(flatten)]
    pub vnc: VncTcpArgs,
}

/// `--vnc ADDR --vnc-password-file FILE`.
#[derive(Args, Clone, Default)]
pub struct VncTcpArgs {
    /// Also serve VNC on this loopback TCP address, e.g. 127.0.0.1:5900 (display N on the
    /// port plus N; port 0: any free ports, `ray gpu status` shows them), with VNC
    /// authentication.
    /// Other addresses are refused: they would need TLS, which is not supported.
    #[arg(long = "vnc", value_name = "ADDR")]
    pub vnc: Option<std::net::SocketAddr>,
    /// The VNC password for --vnc: the first line (1 to 8 bytes) of a file that only its
    /// owner may read.
    #[arg(long, value_name = "FILE")]
    pub vnc_password_file: Option<PathBuf>,
}

impl VncTcpArgs {
    /// The address and password file, checked (loopback only; a password is required).
    pub fn checked(&self) -> anyhow::Result<Option<(std::net::SocketAddr, PathBuf)>> {
        match (&self.vnc, &self.vnc_password_file) {
            (None, None) => Ok(None),
            (Some(addr), Some(file)) => {
                ray_vmm::display::check_vnc_tcp(*addr, file)
                    .map_err(|e| coded(exit::INVALID, format!("--vnc: {e}")))?;
                Ok(Some((*addr, file.clone())))
            }
            (Some(addr), None) => Err(coded(
                exit::INVALID,
                format!(
                    "--vnc {addr} needs --vnc-password-file: VNC over TCP without \
                     authentication is refused"
                ),
            )),
            (None, Some(_)) => Err(coded(
                exit::INVALID,
                "--vnc-password-file is for --vnc ADDR, which is missing",
            )),
        }
    }
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
    /// With --migrate-listen on TCP: accept the VM unencrypted.
    #[arg(long, requires = "migrate_listen")]
    pub migrate_insecure_plaintext: bool,
    /// With --migrate-listen: where disks the source copies go (DIR/<disk id>.img).
    #[arg(long, requires = "migrate_listen")]
    pub migrate_disk_dir: Option<PathBuf>,
    /// With --migrate-listen: LISTENER,KEY,SLOT, descriptors inherited from `ray migrate
    /// receive` (which bound, opened and took them for a jailed target).
    #[arg(long, hide = true, value_delimiter = ',', requires = "migrate_listen")]
    pub migrate_handed_fds: Vec<i32>,
    /// The VM directory's lock, inherited as this descriptor from `ray vm run` (which
    /// took it); without it the VMM takes the lock itself.
    #[arg(long, hide = true)]
    pub lock_fd: Option<i32>,
    /// Also serve the API on this loopback TCP address (port 0: any free port), with a
    /// bearer token written to api.token in the VM directory.
    #[arg(long, value_name = "ADDR", value_parser = parse_api_tcp)]
    pub api_tcp: Option<std::net::SocketAddr>,
    /// Write the start-up times (CLOCK_MONOTONIC stamps of each step) to this JSON file
    /// when the VMM ends; `ray bench snapshot` reads them.
    #[arg(long, hide = true, value_name = "FILE")]
    pub timings: Option<PathBuf>,
    /// The threads' seccomp filters: kill, log or off.
    #[arg(
        long,
        value_name = "off|log|kill",
        env = "RAY_SECCOMP",
        default_value = "kill"
    )]
    pub seccomp: ray_vmm::seccomp::Mode,
    /// Run jailed as this plan (JSON) says: `ray vm run --jail` makes it.
    #[arg(long = "jail", hide = true, value_name = "PLAN")]
    pub jail_plan: Option<String>,
    /// Fence (pause the vCPUs) unless the local lease is renewed (PUT /vm/lease) within
    /// this time, e.g. 19s: a cluster agent's VMMs have one.
    #[arg(long, value_name = "TIME", value_parser = ray::sizes::parse_duration)]
    pub lease_ttl: Option<std::time::Duration>,
    /// With --lease-ttl: the CLOCK_MONOTONIC time (ns) the lease counts from (the agent's
    /// renewal); default: the VMM's start.
    #[arg(long, hide = true, requires = "lease_ttl")]
    pub lease_since_ns: Option<u64>,
    #[command(flatten)]
    pub vnc: VncTcpArgs,
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

fn parse_gpu(arg: &str) -> Result<Option<ray_api::gpu::GpuConfig>, String> {
    ray_api::gpu::GpuConfig::parse(arg)
}

fn parse_net(arg: &str) -> Result<ray_api::net::NetConfig, String> {
    ray_api::net::NetConfig::parse(arg)
}
/// Guest memory when neither --memory nor --numa says.
const DEFAULT_MEMORY: u64 = 128 << 20;

pub fn vm_config(args: &RunArgs) -> anyhow::Result<VmConfig> {
    if let Some(file) = &args.file {
        return crate::vm_show::read_config_file(file);
    }
    let (kernel, default_cmdline) = match &args.kernel {
        Some(k) => (k.clone(), "console=ttyS0"),
        None => (default_guest()?, DEFAULT_GUEST_CMDLINE),
    };
    // Absolute, as disks are: the VMM may run elsewhere (a jail's root holds the files at
    // their absolute paths).
    let absolute = |p: &Path| {
        std::path::absolute(p)
            .with_context(|| format!("cannot resolve {}", p.display()))
            .map(|p| p.display().to_string())
    };
    Ok(VmConfig {
        kernel: absolute(&kernel)?,
        initrd: args.initrd.as_deref().map(absolute).transpose()?,
        cmdline: args
            .cmdline
            .clone()
            .unwrap_or_else(|| default_cmdline.into()),
        vcpus: args.vcpus.unwrap_or_else(|| {
            let listed: usize = args.numa.iter().map(|n| n.cpus.len()).sum();
            u8::try_from(listed).unwrap_or(u8::MAX).max(1)
        }),
        memory_bytes: args.memory.unwrap_or_else(|| match args.numa.is_empty() {
            true => DEFAULT_MEMORY,
            false => args.numa.iter().map(|n| n.memory_bytes).sum(),
        }),
        numa: args.numa.clone(),
        numa_attribution: args.numa_attribution.unwrap_or_default(),
        numa_migration: args.numa_migrate.clone().unwrap_or_default(),
        devices: DevicesConfig {
            rng: !args.no_rng,
            disks: {
                let mut disks = args.disks.clone();
                ray::disks::number(&mut disks);
                disks
            },
            net: args.net.clone(),
            gpus: {
                let gpus: Vec<_> = args.gpus.iter().flatten().cloned().collect();
                ray_api::gpu::check_gpus(&gpus, &args.gpu_limits.unwrap_or_default())
                    .map_err(|e| anyhow::anyhow!("--gpu: {e}"))?;
                // A host device's IOMMU, VFIO and driver, before anything starts.
                ray_vmm::passthrough::check(&gpus).map_err(|e| anyhow::anyhow!("--gpu: {e}"))?;
                gpus
            },
            gpu_limits: args.gpu_limits,
            vsock: args.vsock.clone(),
            input: args.input,
        },
    })
}

pub fn run(cmd: VmCommand, runtime: &Path) -> anyhow::Result<()> {
    use crate::vm_show::{action, events, list, status};
    match cmd {
        VmCommand::Run(args) => run_vm(&args, runtime),
        VmCommand::List(a) => list(runtime, &a.out),
        VmCommand::Status(a) => status(runtime, &a.id, &a.out),
        VmCommand::Pause(a) => action(runtime, &a.id, "/vm/pause", None, &a.out),
        VmCommand::Resume(a) => action(runtime, &a.id, "/vm/resume", None, &a.out),
        VmCommand::Suspend(a) => action(runtime, &a.id, "/vm/suspend", None, &a.out),
        VmCommand::Stop(a) => {
            let body = serde_json::to_vec(&ray_api::vmm::StopRequest {
                timeout_ms: a.timeout_ms,
            })?;
            action(runtime, &a.id, "/vm/stop", Some(body), &a.out)
        }
        VmCommand::Events(a) => events(runtime, &a.id, &a.out),
        VmCommand::Console(a) => crate::console::run(runtime, &a),
        VmCommand::Logs(a) => crate::logs::run(runtime, &a),
        VmCommand::Config(a) => crate::vm_show::config(runtime, &a.id, &a.out),
        VmCommand::Rm(a) => crate::vm_admin::rm(runtime, &a),
        VmCommand::Prune(a) => crate::vm_admin::prune(runtime, &a),
        VmCommand::Checkpoint(a) => crate::snapshot::checkpoint(runtime, &a),
        VmCommand::Exec(a) => crate::vm_exec::run(runtime, &a),
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
        /// Accept the VM unencrypted over TCP.
        insecure_plaintext: bool,
        /// Where copied disks go (`--disk-dir`).
        disk_dir: Option<&'a Path>,
        /// Where a jailed target's keeper opens shared disks (`--shared-dir`).
        shared_dirs: &'a [PathBuf],
        /// The listener (bound on `listen`), key file and migration slot `ray migrate
        /// receive` opened for a jailed target, as inheritable descriptors.
        handed: Option<[std::os::fd::RawFd; 3]>,
    },
}

/// What else a new VMM is started with.
#[derive(Default)]
pub struct VmmExtras {
    /// Also serve the API on this loopback TCP address.
    pub api_tcp: Option<std::net::SocketAddr>,
    /// The VMM's seccomp mode (None: the VMM's default, from $RAY_SECCOMP or kill).
    pub seccomp: Option<ray_vmm::seccomp::Mode>,
    /// Jail the VMM with a uid from this range (see [`ray::jail`]).
    pub jail: Option<ray::jail::UidRange>,
    /// The VMM's local lease (`ray vmm --lease-ttl`): its time to live, counted from a
    /// CLOCK_MONOTONIC time in ns (`--lease-since-ns`).
    pub lease: Option<(std::time::Duration, u64)>,
    /// Also serve VNC on this loopback TCP address, with this password file.
    pub vnc_tcp: Option<(std::net::SocketAddr, PathBuf)>,
}

fn spawn_vmm(
    id: &str,
    dir: &Path,
    origin: &Origin,
    attach: bool,
    extras: &VmmExtras,
    lock_fd: std::os::fd::RawFd,
    jail: Option<&ray::jail::Plan>,
) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("vmm").arg("--id").arg(id).arg("--dir").arg(dir);
    cmd.env("RAY_LOG_FORMAT", ray_vmm::logging::format().name());
    // The VM directory's lock, inherited (it is not close-on-exec): see runtime::claim.
    cmd.arg("--lock-fd").arg(lock_fd.to_string());
    if let Some(addr) = extras.api_tcp {
        cmd.arg("--api-tcp").arg(addr.to_string());
    }
    if let Some(mode) = extras.seccomp {
        cmd.arg("--seccomp").arg(mode.name());
    }
    if let Some(plan) = jail {
        cmd.arg("--jail").arg(serde_json::to_string(plan)?);
    }
    if let Some((ttl, since)) = extras.lease {
        cmd.arg("--lease-ttl")
            .arg(format!("{:.3}s", ttl.as_secs_f64().max(0.001)))
            .arg("--lease-since-ns")
            .arg(since.to_string());
    }
    if let Some((addr, file)) = &extras.vnc_tcp {
        cmd.arg("--vnc").arg(addr.to_string());
        cmd.arg("--vnc-password-file").arg(file);
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
            insecure_plaintext,
            disk_dir,
            handed,
            // In the jail's plan: the keeper opens shared disks, not the VMM.
            shared_dirs: _,
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
            if *insecure_plaintext {
                cmd.arg("--migrate-insecure-plaintext");
            }
            if let Some(d) = disk_dir {
                cmd.arg("--migrate-disk-dir").arg(d);
            }
            if let Some(fds) = handed {
                cmd.arg("--migrate-handed-fds")
                    .arg(fds.map(|fd| fd.to_string()).join(","));
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
    let vnc_tcp = args.vnc.checked()?;
    launch_with(
        runtime,
        args.id.clone(),
        &Origin::Boot(&cfg),
        args.detach,
        args.json,
        &VmmExtras {
            api_tcp: args.api_tcp,
            seccomp: args.seccomp,
            jail: ray::jail::wanted(&args.jail).map_err(|e| coded(exit::INVALID, e.to_string()))?,
            lease: None,
            vnc_tcp,
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

/// Starts a VMM for a new VM (booted, restored or incoming), attached or detached, with
/// extras for the VMM.
pub fn launch_with(
    runtime: &Path,
    id: Option<String>,
    origin: &Origin,
    detach: bool,
    json: bool,
    extras: &VmmExtras,
) -> anyhow::Result<()> {
    let info = start_vmm(runtime, id, origin, extras)?;
    let id = info.id.clone();
    let socket = runtime::vm_dir(runtime, &id).join("api.sock");
    if !detach {
        // Everything since boot, then live; Ctrl-C goes to the guest, Ctrl-] detaches.
        let how = crate::console::attach(
            &socket,
            &crate::console::Attach {
                mode: ray_api::vmm::ConsoleMode::Auto,
                start: crate::console::Start::From(0),
                banner: Some(&id),
            },
        )?;
        return crate::console::after(runtime, &id, how);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("{id}");
    }
    Ok(())
}

/// Starts a detached VMM for a new VM (booted, restored or incoming) and waits until it
/// answers with its VM past `created`: what `ray vm run` and `ray agent` share.
pub fn start_vmm(
    runtime: &Path,
    id: Option<String>,
    origin: &Origin,
    extras: &VmmExtras,
) -> anyhow::Result<VmInfo> {
    let id = id.unwrap_or_else(runtime::new_id);
    // The jail's mounts need absolute paths; its plan is checked before anything exists.
    let runtime = &std::path::absolute(runtime)
        .with_context(|| format!("cannot resolve {}", runtime.display()))?;
    let jail = match extras.jail {
        Some(uids) => Some(jail_plan(
            runtime,
            &id,
            origin,
            uids,
            // TCP listeners the host should reach (its keeper binds them) and the files
            // they read.
            &ray::jail::Listeners {
                tcp: extras
                    .api_tcp
                    .into_iter()
                    .chain(extras.vnc_tcp.as_ref().map(|v| v.0))
                    .collect(),
                files: extras.vnc_tcp.iter().map(|v| v.1.clone()).collect(),
            },
        )?),
        None => None,
    };
    // One VMM per VM: refused, naming the live VMM, while another runs or starts.
    let mut claim = runtime::claim(runtime, &id)?;
    let dir = claim.dir.clone();
    let lock_fd = claim.inheritable_fd()?;
    // Attached or not, the VMM runs on its own (its own session, its log in vmm.log); an
    // attached `ray vm run` then follows its console as `ray vm console` does.
    let mut child = match spawn_vmm(&id, &dir, origin, false, extras, lock_fd, jail.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            claim.abandon();
            return Err(e);
        }
    };
    claim.spawned(jail.is_none().then(|| child.id()));
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
                if info.state != VmStateName::Created && started_by(info.pid, child.id()) {
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
    Ok(info)
}

/// Whether the VMM `pid` is the process `child` this command started, or the one that
/// process (a jail's keeper) cloned.
fn started_by(pid: u32, child: u32) -> bool {
    pid == child
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
            == Some(child)
}

/// The jail of VM `id` started as `origin`, checked before anything starts.
fn jail_plan(
    runtime: &Path,
    id: &str,
    origin: &Origin,
    uids: ray::jail::UidRange,
    listeners: &ray::jail::Listeners,
) -> anyhow::Result<ray::jail::Plan> {
    let invalid = |e: ray::jail::JailError| coded(exit::INVALID, e.to_string());
    let dir = runtime::vm_dir(runtime, id);
    match origin {
        Origin::Boot(cfg) => ray::jail::plan(id, &dir, uids, cfg, None, listeners).map_err(invalid),
        Origin::Restore { snapshot, .. } => {
            let manifest = ray_vmm::snapshot::manifest(snapshot)
                .map_err(|e| coded(exit::NOT_FOUND, e.to_string()))?;
            let cfg: VmConfig = serde_json::from_value(manifest.vm_config)
                .context("the snapshot's VM configuration is invalid")?;
            let store = snapshot.parent().unwrap_or(snapshot);
            ray::jail::plan(id, &dir, uids, &cfg, Some(store), listeners).map_err(invalid)
        }
        Origin::Incoming {
            config,
            disk_dir,
            shared_dirs,
            listen,
            ..
        } => {
            let socket = match ray_migration::Endpoint::parse(listen) {
                Ok(ray_migration::Endpoint::Unix(p)) => Some(p),
                _ => None,
            };
            ray::jail::plan_incoming(
                id,
                &dir,
                uids,
                *config,
                *disk_dir,
                shared_dirs,
                socket.as_deref(),
                listeners,
            )
            .map_err(invalid)
        }
    }
}

/// `ray vmm`: runs one VMM in this process.
pub fn vmm(args: VmmArgs) -> anyhow::Result<()> {
    use std::os::fd::FromRawFd;
    if let Some(plan) = &args.jail_plan {
        let plan: ray::jail::Plan = serde_json::from_str(plan).context("invalid --jail plan")?;
        // Returns in the jailed VMM only; the keeper exits when the VMM has ended.
        ray::jail::keeper::jail(
            &plan,
            &args.id,
            &args.dir,
            args.lock_fd,
            &args.migrate_handed_fds,
        )
        .map_err(|e| anyhow::anyhow!(e))?;
    }
    let handed = match args.migrate_handed_fds[..] {
        [] => None,
        // SAFETY: descriptors `ray migrate receive` opened and this process inherited
        // for the VMM, named once on its command line; nothing else here owns them.
        [listener, key, slot] => unsafe {
            Some(ray_vmm::HandedIncoming {
                listener: std::os::fd::OwnedFd::from_raw_fd(listener),
                key: std::fs::File::from_raw_fd(key),
                slot: std::fs::File::from_raw_fd(slot),
            })
        },
        _ => anyhow::bail!("--migrate-handed-fds takes three descriptors: LISTENER,KEY,SLOT"),
    };
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
            insecure_plaintext: args.migrate_insecure_plaintext,
            disk_dir: args.migrate_disk_dir,
            handed,
        }),
        lock_fd: args.lock_fd,
        api_tcp: args.api_tcp,
        timings: args.timings,
        seccomp: args.seccomp,
        lease: args.lease_ttl.map(|ttl| (ttl, args.lease_since_ns)),
        vnc_tcp: args.vnc.checked()?,
    })?;
    match state {
        ray_vmm::lifecycle::VmState::Terminated => Ok(()),
        other => Err(coded(1, format!("the VM ended in state {other}"))),
    }
}

/// `--numa-attribution ring|off`.
fn parse_attribution(text: &str) -> Result<ray_api::vmm::NumaAttribution, String> {
    match text {
        "ring" => Ok(ray_api::vmm::NumaAttribution::Ring),
        "off" => Ok(ray_api::vmm::NumaAttribution::Off),
        _ => Err(format!("'{text}' is not ring or off")),
    }
}
