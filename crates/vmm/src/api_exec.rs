//! `POST /vm/exec`: a command of rayvisor's guest shell over the VM's vsock device, for
//! clients of the API (the cluster, a web console) that cannot reach the VM's socket
//! file. The same client as `ray vm exec` ([`ray_devices::virtio::vsock::client`]); the
//! exchange runs off the API's event loop and never involves the VMM thread beyond
//! reading the configuration.
use std::path::PathBuf;
use std::time::Duration;

use ray_api::vmm::VmStateName;
use ray_api::vsock::{ExecRequest, ExecResult};
use ray_devices::virtio::vsock::client::{self, ExecError};

use super::*;

const DEFAULT_TIMEOUT_MS: u64 = 10_000;
const MAX_TIMEOUT_MS: u64 = 600_000;

/// Run a guest shell command over vsock
///
/// Connects to the guest's port 52 through the VM's vsock device, sends `command` and
/// returns what it printed and its status (0 success, 1 the command reported an error).
/// Needs a running VM with a vsock device and rayvisor's guest (or any guest serving
/// the same protocol on port 52).
#[utoipa::path(post, path = "/vm/exec", tag = "vm", request_body = ExecRequest, responses(
    (status = 200, description = "The command ran; its output and status.", body = ExecResult),
    (status = 400, description = "`invalid_request`: not one command line of at most 255 bytes, or a timeout out of range.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM is not running or has no vsock device.", body = ErrorBody),
    (status = 500, description = "`failed`: the guest did not accept the connection or did not answer in time.", body = ErrorBody),
    BodyRefusals,
    ShuttingDown))]
pub(super) async fn post_exec(State(a): State<Api>, Body(body): Body) -> ApiResult<ExecResult> {
    let r = parse_body::<ExecRequest>("POST /vm/exec", &body)?;
    let timeout_ms = r.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
        return Err(ApiError::invalid(format!(
            "timeout_ms must be 1 to {MAX_TIMEOUT_MS}, got {timeout_ms}"
        )));
    }
    client::check_command(&r.command).map_err(|e| ApiError::invalid(e.to_string()))?;
    let Json(info) = a.info(Request::Info).await?;
    if info.state != VmStateName::Running {
        return Err(ApiError::new(
            ErrorCode::WrongState,
            "the VM is not running; a guest command needs a running guest",
        ));
    }
    let vsock = info.config.and_then(|c| c.devices.vsock).ok_or_else(|| {
        ApiError::new(
            ErrorCode::WrongState,
            "the VM has no vsock device (configure devices.vsock)",
        )
    })?;
    let socket: PathBuf = vsock.socket_path(&a.dir);
    let timeout = Duration::from_millis(timeout_ms);
    let done = tokio::task::spawn_blocking(move || client::exec(&socket, &r.command, timeout))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Failed, format!("the exec did not finish: {e}")))?;
    match done {
        Ok(o) => Ok(Json(ExecResult {
            output: o.output,
            status: o.status,
        })),
        Err(e @ ExecError::BadCommand(_)) => Err(ApiError::invalid(e.to_string())),
        Err(e) => Err(ApiError::new(ErrorCode::Failed, e.to_string())),
    }
}
