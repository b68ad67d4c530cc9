//! `ray`: the one binary of rayvisor. This file parses the command line and dispatches;
//! the work is done in the library crates.
mod bench;
mod bench_migrate;
mod bench_snapshot;
mod migrate;
mod sim;
mod snapshot;
mod version;
mod vm;

use ray::{exit, runtime};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Run the VMM of one VM in this process (what `ray vm run` starts).
    Vmm(vm::VmmArgs),
    /// Simulate cluster placement at scale against baselines.
    Sim(sim::SimArgs),
    /// Measure rayvisor (boot time, memory overhead).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print an OpenAPI document.
    Openapi {
        /// Which API: `vmm` (the per-VM API).
        #[arg(value_parser = ["vmm"])]
        api: String,
    },
    /// Show the version of `ray` and, with --vm, of a VM's VMM.
    Version(version::VersionArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = cli.runtime_dir.unwrap_or_else(runtime::default_dir);
    let result = match cli.command {
        Command::Vm(cmd) => vm::run(cmd, &runtime),
        Command::Vmm(args) => vm::vmm(args),
        Command::Snapshot(cmd) => snapshot::run(cmd, &runtime),
        Command::Migrate(cmd) => migrate::run(cmd, &runtime),
        Command::Bench(cmd) => bench::run(cmd, &runtime),
        Command::Sim(args) => sim::run(args),
        Command::Openapi { .. } => {
            println!("{}", ray_vmm::api_server::openapi_json());
            Ok(())
        }
        Command::Version(a) => version::run(&a, &runtime),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ray: {e:#}");
            ExitCode::from(exit::code_of(&e))
        }
    }
}
