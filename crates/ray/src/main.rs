//! `ray`: the one binary of rayvisor. This file parses the command line and dispatches;
//! the work is done in the library crates.
mod agent;
mod agent_api;
mod bench;
mod bench_blk;
mod bench_cluster;
mod bench_cluster_ha;
mod bench_display;
mod bench_idle;
mod bench_migrate;
mod bench_net;
mod bench_numa;
mod bench_snapshot;
mod cluster;
mod console;
mod controller;
mod device;
mod gpu;
mod help;
mod logs;
mod migrate;
mod numa_cmd;
mod sim;
mod snapshot;
mod store_sel;
mod version;
mod vm;
mod vm_admin;
mod vm_exec;
mod vm_show;
mod web;

use ray::{exit, runtime};
use ray_vmm::logging::LogFormat;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ray",
    version,
    about = "rayvisor: VMs on KVM, from one VM to a cluster"
)]
struct Cli {
    /// Runtime directory holding one sub-directory per VM.
    #[arg(long, global = true, env = "RAY_RUNTIME_DIR")]
    runtime_dir: Option<PathBuf>,
    /// How log lines are written: `text` or `json` (one object per line, with the `vm` and
    /// `migration` spans). `RUST_LOG` chooses which are written (a VMM logs `info` by
    /// default into its VM directory's vmm.log; other commands only warnings).
    #[arg(long, global = true, env = "RAY_LOG_FORMAT", default_value = "text",
          value_parser = clap::builder::PossibleValuesParser::new(LogFormat::NAMES))]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run, inspect and control VMs.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Full snapshots: create, restore, inspect.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Live migration: receive a VM on a target, move a running VM there, follow it.
    #[command(subcommand)]
    Migrate(migrate::MigrateCommand),
    /// A VM's GPUs and displays: status, screenshots.
    #[command(subcommand)]
    Gpu(gpu::GpuCommand),
    /// Devices served to VMs from their own process (vfio-user).
    #[command(subcommand)]
    GpuDevice(gpu::GpuDeviceCommand),
    #[command(about = VMM_ABOUT)]
    Vmm(vm::VmmArgs),
    /// Run this host's cluster agent: supervises its VMMs, reports it to the store, serves
    /// the host's API.
    Agent(agent::AgentArgs),
    /// Run a cluster controller: places desired VMs on hosts (one leads, others stand by).
    Controller(controller::ControllerArgs),
    /// The cluster as its store holds it, its decision log, and its desired VMs.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// This host's NUMA nodes and what each VM does with them (attribution, page moves).
    #[command(subcommand)]
    Numa(numa_cmd::NumaCommand),
    /// A cluster host: cordon, uncordon, drain; its agent's view (status, VMs).
    #[command(subcommand)]
    Node(cluster::NodeCommand),
    /// Simulate cluster placement at scale against baselines.
    Sim(sim::SimArgs),
    /// Measure rayvisor (boot time, memory overhead).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Serve rayvisor's device models to another VMM (vhost-user back ends).
    #[command(subcommand)]
    Device(device::DeviceCommand),
    /// Serve the browser dashboard and consoles (VM list, actions, noVNC, serial).
    Web(web::WebArgs),
    /// Print an OpenAPI document.
    Openapi {
        /// Which API: `vmm` (the per-VM API) or `agent` (the per-host agent API).
        #[arg(value_parser = ["vmm", "agent"])]
        api: String,
    },
    /// Show the version of `ray` and, with --vm, of a VM's VMM.
    Version(version::VersionArgs),
    /// Print a shell completion script.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print `ray`'s man page (roff), or write one page per command into a directory.
    Man {
        /// Write `ray.1`, `ray-vm.1`, `ray-vm-run.1`, ... into this directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// The command line's definition, with its examples.
fn cli_command() -> clap::Command {
    help::decorate(Cli::command())
}

const VMM_ABOUT: &str = "Run the VMM of one VM in this process (what `ray vm run` starts)";

/// `ray vmm ...`: parsed with its own arguments only. Every VM start and restore runs it,
/// and building the whole command tree (every subcommand, its help and examples) is
/// most of the time argument parsing takes. Anything else (e.g. a global option before
/// `vmm`) goes through the full parser.
fn vmm_args_only() -> Option<vm::VmmArgs> {
    use clap::Args;
    let mut args = std::env::args_os();
    args.next();
    if args.next().as_deref() != Some(std::ffi::OsStr::new("vmm")) {
        return None;
    }
    let cmd = vm::VmmArgs::augment_args(
        clap::Command::new("vmm")
            .bin_name("ray vmm")
            .about(VMM_ABOUT),
    );
    let cmd = help::decorate_at(cmd, "vmm");
    let matches = cmd.get_matches_from(std::env::args_os().skip(1));
    Some(vm::VmmArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

fn main() -> ExitCode {
    ray_vmm::startup::mark(ray_vmm::startup::Mark::Main);
    if let Some(args) = vmm_args_only() {
        // `ray vm run` passes the format on in the environment.
        let format = match std::env::var("RAY_LOG_FORMAT") {
            Ok(f) => f.parse().unwrap_or_else(|e| {
                eprintln!("ray vmm: RAY_LOG_FORMAT: {e}; writing text");
                LogFormat::Text
            }),
            Err(_) => LogFormat::Text,
        };
        ray_vmm::logging::init(format, "info");
        return exit_code(vm::vmm(args));
    }
    let cli = Cli::from_arg_matches(&cli_command().get_matches()).unwrap_or_else(|e| e.exit());
    let runtime = cli.runtime_dir.unwrap_or_else(runtime::default_dir);
    store_sel::set_runtime(&runtime);
    let format = cli.log_format.parse().unwrap_or_default();
    let default_level = match cli.command {
        Command::Vmm(_)
        | Command::Agent(_)
        | Command::Controller(_)
        | Command::Device(_)
        | Command::GpuDevice(_)
        | Command::Web(_) => "info",
        _ => "warn",
    };
    ray_vmm::logging::init(format, default_level);
    let result = match cli.command {
        Command::Vm(cmd) => vm::run(cmd, &runtime),
        Command::Vmm(args) => vm::vmm(args),
        Command::Snapshot(cmd) => snapshot::run(cmd, &runtime),
        Command::Migrate(cmd) => migrate::run(cmd, &runtime),
        Command::Gpu(cmd) => gpu::run(cmd, &runtime),
        Command::GpuDevice(cmd) => gpu::run_device(cmd),
        Command::Bench(cmd) => bench::run(cmd, &runtime),
        Command::Agent(args) => agent::run(args, &runtime),
        Command::Controller(args) => controller::run(args),
        Command::Cluster(cmd) => cluster::run(cmd),
        Command::Node(cmd) => cluster::run_node(cmd),
        Command::Sim(args) => sim::run(args),
        Command::Numa(cmd) => numa_cmd::run(cmd, &runtime),
        Command::Device(cmd) => device::run(cmd),
        Command::Web(args) => web::run(args, &runtime),
        Command::Openapi { api } => {
            match api.as_str() {
                "agent" => println!("{}", agent_api::openapi_json()),
                _ => println!("{}", ray_vmm::api_server::openapi_json()),
            }
            Ok(())
        }
        Command::Version(a) => version::run(&a, &runtime),
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut cli_command(), "ray", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => man(dir.as_deref()),
    };
    exit_code(result)
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ray: {e:#}");
            ExitCode::from(exit::code_of(&e))
        }
    }
}

/// `ray man`: the top page on stdout, or every page into `dir`.
fn man(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    let cmd = cli_command();
    match dir {
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .context("cannot write the man page"),
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            clap_mangen::generate_to(cmd, d)
                .with_context(|| format!("cannot write man pages into {}", d.display()))
        }
    }
}
