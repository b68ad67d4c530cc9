//! `ray vm exec ID -- CMD ARGS...`: runs a command of the guest's shell over the VM's
//! vsock device and exits with the command's status.
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use clap::Args;
use ray_api::vmm::VmInfo;
use ray_api::vsock::ExecResult;
use ray_devices::virtio::vsock::client::{self, ExecError};

use ray::exit::{self, coded};
use ray::runtime;

#[derive(Args)]
pub struct ExecArgs {
    /// The VM's id.
    pub id: String,
    /// How long to wait for the guest's answer, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Print {"output", "status"} as JSON (and exit 0 whatever the status).
    #[arg(long)]
    pub json: bool,
    /// The command and its arguments (after `--`), joined by spaces into one line.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub fn run(runtime: &Path, a: &ExecArgs) -> anyhow::Result<()> {
    let info: VmInfo = crate::vm::client(runtime, &a.id)?.call("GET", "/vm", None)?;
    let vsock = info
        .config
        .as_ref()
        .and_then(|c| c.devices.vsock.clone())
        .ok_or_else(|| {
            coded(
                exit::REFUSED,
                format!(
                    "VM '{}' has no vsock device (run it with --vsock cid=N)",
                    a.id
                ),
            )
        })?;
    let socket = vsock.socket_path(&runtime::vm_dir(runtime, &a.id));
    let line = a.command.join(" ");
    let result = client::exec(&socket, &line, Duration::from_millis(a.timeout_ms));
    let out = match result {
        Ok(o) => o,
        Err(e @ ExecError::BadCommand(_)) => return Err(coded(exit::INVALID, e.to_string())),
        Err(e) => return Err(coded(exit::UNREACHABLE, e.to_string())),
    };
    let mut stdout = std::io::stdout().lock();
    if a.json {
        let r = ExecResult {
            output: out.output,
            status: out.status,
        };
        writeln!(stdout, "{}", serde_json::to_string(&r)?)?;
        return Ok(());
    }
    stdout.write_all(out.output.as_bytes())?;
    stdout.flush()?;
    if out.status != 0 {
        std::process::exit(out.status.clamp(1, 255));
    }
    Ok(())
}
