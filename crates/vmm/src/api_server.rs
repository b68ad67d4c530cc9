//! The per-VM HTTP/JSON API on a Unix socket (and, when asked, on a loopback TCP port).
//! Each handler parses its request into a typed [`Request`] and hands it to the VMM
//! thread; it never touches VM state itself.
//!
//! This is the one module that knows HTTP: controller errors become an [`ErrorBody`] with
//! a stable [`ErrorCode`] here, and the codes get their HTTP statuses in [`http_status`].
//! The OpenAPI document is generated from the handlers themselves ([`openapi`]).
//!
//! Every handler that takes a body, and every `PUT`, reads the whole body before it acts
//! (the [`Body`] extractor): a request whose body is still arriving has no effect yet.
use crate::logging::SpawnInSpan;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, State};
use axum::http::{header, request::Parts, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::{Json, Router};
use ray_api::vmm::{
    ConsoleInput, ConsoleStreamQuery, ConsoleTail, ConsoleTailQuery, ErrorBody, ErrorCode,
    LeaseRequest, LifecycleEvent, MigrateRequest, MigrationStatus, NumaPolicyRequest,
    SnapshotDelete, SnapshotEntry, SnapshotInfo, SnapshotList, SnapshotListQuery, SnapshotMerge,
    SnapshotProgress, SnapshotRequest, StopRequest, VersionInfo, VmConfig, VmInfo, API_VERSION,
    CONSOLE_KEPT_BYTES,
};
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::console_attach::{self, Attachment, ConsoleHub};
use crate::controller::{ControllerError, Message, Request, Response};
use crate::devices::ConsoleRing;
use crate::display::{DisplayError, EncodeStartError, TypeError};
use ray_api::decode::{DecodeList, DecodeRequest, DecodeSessionInfo};
use ray_api::encode::{EncodeList, EncodeRequest, EncodeSessionInfo};
use ray_api::gpu::{DisplaySize, GpuList, TypeText, Typed, MAX_TYPED};
use ray_display::decode::{DecodeSessionError, DecodeStartError};
use ray_display::encode::EncodeError;

#[derive(Clone)]
struct Api {
    inbox: Sender<Message>,
    ring: Arc<ConsoleRing>,
    meter: Arc<crate::snapshot::Meter>,
    /// The loopback TCP address the API is also served on.
    tcp: Option<String>,
    /// The attached consoles.
    console: Arc<ConsoleHub>,
    /// Turns true when the server stops.
    stop: tokio::sync::watch::Receiver<bool>,
    /// The GPUs and their displays.
    displays: Arc<crate::display::DisplayHub>,
    /// The VM's directory (where the API socket is): the default vsock socket is there.
    dir: std::path::PathBuf,
}

#[path = "api_exec.rs"]
mod exec;

/// An error answer: a stable code and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    fn shutting_down() -> Self {
        Self::new(ErrorCode::ShuttingDown, "the VMM is shutting down")
    }
}

/// The HTTP status of an error code: the one place the two meet.
pub fn http_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorCode::ForbiddenHost => StatusCode::FORBIDDEN,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::NotFound | ErrorCode::UnknownEndpoint => StatusCode::NOT_FOUND,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::WrongState | ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
        ErrorCode::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl From<ControllerError> for ApiError {
    fn from(e: ControllerError) -> Self {
        let code = match &e {
            ControllerError::Invalid(_) => ErrorCode::InvalidRequest,
            ControllerError::Refused(_) | ControllerError::Busy(_) => ErrorCode::WrongState,
            ControllerError::NotFound(_) => ErrorCode::NotFound,
            ControllerError::Failed(_) => ErrorCode::Failed,
        };
        ApiError::new(code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> HttpResponse {
        let mut r = (
            http_status(self.code),
            Json(ErrorBody {
                code: self.code,
                message: self.message,
            }),
        )
            .into_response();
        if self.code == ErrorCode::UpgradeRequired {
            r.headers_mut().insert(
                header::UPGRADE,
                header::HeaderValue::from_static(CONSOLE_PROTOCOL),
            );
        }
        r
    }
}

/// The `Upgrade` protocol of the console stream.
pub const CONSOLE_PROTOCOL: &str = "ray-console";

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Parses a JSON body, naming the endpoint and serde's account of what was wrong.
pub fn parse_body<T: DeserializeOwned>(endpoint: &str, body: &[u8]) -> Result<T, ControllerError> {
    if body.is_empty() {
        return Err(ControllerError::invalid(format!(
            "{endpoint} needs a JSON body, and the request had none"
        )));
    }
    // Every body is an object: serde would also fill a struct from an array of its
    // fields' values (`[null, null]`), which no client means.
    let text = body.trim_ascii_start();
    if !text.starts_with(b"{") {
        return Err(ControllerError::invalid(format!(
            "invalid JSON body for {endpoint}: it must be a JSON object, and it starts with {:?}",
            String::from_utf8_lossy(&text[..text.len().min(16)])
        )));
    }
    serde_json::from_slice(body)
        .map_err(|e| ControllerError::invalid(format!("invalid JSON body for {endpoint}: {e}")))
}

/// Checks the body of an endpoint that takes none: empty, or an empty JSON object.
pub fn expect_no_body(endpoint: &str, body: &[u8]) -> Result<(), ControllerError> {
    let text = body.trim_ascii();
    if text.is_empty()
        || serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(text)
            .is_ok_and(|m| m.is_empty())
    {
        return Ok(());
    }
    Err(ControllerError::invalid(format!(
        "{endpoint} takes no body (or `{{}}`), and the request had {} bytes: {:?}",
        body.len(),
        String::from_utf8_lossy(&body[..body.len().min(64)])
    )))
}

/// Whether a `Content-Type` value is JSON (`application/json`, any parameters).
pub fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// The whole request body. Taking it makes a handler wait until the body has fully
/// arrived, so a slow client's request has no effect before it is complete. A body must
/// be declared JSON: besides catching mistakes, a web page cannot send that to another
/// origin without the browser asking first (a CORS preflight, which this API never grants),
/// so a page the operator visits cannot drive a VM through a loopback TCP port.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let endpoint = format!("{} {}", req.method(), req.uri().path());
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let body = Bytes::from_request(req, state).await.map_err(|e| {
            let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ErrorCode::PayloadTooLarge
            } else {
                ErrorCode::InvalidRequest
            };
            ApiError::new(
                code,
                format!("cannot read the body of {endpoint}: {}", e.body_text()),
            )
        })?;
        if !body.trim_ascii().is_empty() && !content_type.as_deref().is_some_and(is_json) {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!(
                    "the body of {endpoint} must be JSON sent as `Content-Type: application/json`, not {}",
                    content_type.map_or("a body without a Content-Type".to_string(), |t| format!("{t:?}"))
                ),
            ));
        }
        Ok(Body(body))
    }
}

/// A query string, rejected with an [`ApiError`] that names the endpoint.
pub struct Q<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let endpoint = format!("{} {}", parts.method, parts.uri.path());
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Q(q))
            .map_err(|e| {
                ApiError::invalid(format!("invalid query for {endpoint}: {}", e.body_text()))
            })
    }
}

impl Api {
    /// Hands `request` to the VMM thread and waits for its answer.
    async fn ask(&self, request: Request) -> Result<Response, ApiError> {
        let (tx, rx) = oneshot::channel();
        let reply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        if self.inbox.send(Message::Api(request, reply)).is_err() {
            return Err(ApiError::shutting_down());
        }
        match rx.await {
            Ok(r) => r.map_err(ApiError::from),
            Err(_) => Err(ApiError::shutting_down()),
        }
    }

    async fn info(&self, request: Request) -> ApiResult<VmInfo> {
        match self.ask(request).await? {
            Response::Info(mut info) => {
                info.api_tcp = self.tcp.clone();
                Ok(Json(*info))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn migration(&self, request: Request) -> ApiResult<MigrationStatus> {
        match self.ask(request).await? {
            Response::Migration(s) => Ok(Json(*s)),
            other => Err(unexpected(other)),
        }
    }

    async fn done(&self, request: Request) -> Result<StatusCode, ApiError> {
        match self.ask(request).await? {
            Response::Done => Ok(StatusCode::NO_CONTENT),
            other => Err(unexpected(other)),
        }
    }
}

/// The VMM thread answered with another kind of response than the request calls for: a
/// bug, reported rather than hidden.
fn unexpected(r: Response) -> ApiError {
    ApiError::new(
        ErrorCode::Failed,
        format!("the VMM answered with an unexpected response: {r:?}"),
    )
}

/// Runs `op` (display work that may wait on a thread or a file) off the API's event
/// loop; a panic in it is an error naming `what`.
async fn off_loop<T: Send + 'static, E: Send + 'static>(
    what: &str,
    op: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<Result<T, E>, ApiError> {
    tokio::task::spawn_blocking(op)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Failed, format!("{what} failed: {e}")))
}

/// Runs a snapshot-store operation (file work, no VM state) off the API's event loop.
async fn store_op<T: Send + 'static>(
    op: impl FnOnce() -> Result<T, crate::snapshot::SnapshotError> + Send + 'static,
) -> Result<T, ApiError> {
    use crate::snapshot::SnapshotError;
    use ray_snapshot::StoreError;
    match tokio::task::spawn_blocking(op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            let code = match &e {
                SnapshotError::Store(StoreError::HasChildren { .. })
                | SnapshotError::Store(StoreError::AlreadyExists(_))
                | SnapshotError::InUse(_) => ErrorCode::Conflict,
                SnapshotError::Store(StoreError::NotFound(_)) => ErrorCode::NotFound,
                SnapshotError::Store(StoreError::File(ray_snapshot::FileError::Io { .. })) => {
                    ErrorCode::Failed
                }
                _ => ErrorCode::InvalidRequest,
            };
            Err(ApiError::new(code, e.to_string()))
        }
        Err(e) => Err(ApiError::new(
            ErrorCode::Failed,
            format!("the snapshot store operation did not finish: {e}"),
        )),
    }
}

/// Refusals of every endpoint that reads a body, before it acts.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only its OpenAPI description is used
enum BodyRefusals {
    /// `payload_too_large`: the body is too large.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// `unsupported_media_type`: a body not sent as `Content-Type: application/json`.
    #[response(status = 415)]
    Unsupported(ErrorBody),
}

/// The refusal of every endpoint that needs the VMM thread, while the VMM ends.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only its OpenAPI description is used
enum ShuttingDown {
    /// `shutting_down`: the VMM is ending.
    #[response(status = 503)]
    Ending(ErrorBody),
}

// ---- handlers ------------------------------------------------------------------------
//
// The first line of each handler's doc comment is its summary in the OpenAPI document, the
// rest its description. Every status a handler can answer with is listed.

/// Show the VM
///
/// Its state, configuration, uptime and the guest's heartbeat.
#[utoipa::path(get, path = "/vm", tag = "vm", responses(
    (status = 200, description = "The VM.", body = VmInfo),
    ShuttingDown))]
async fn get_vm(State(a): State<Api>) -> ApiResult<VmInfo> {
    a.info(Request::Info).await
}

/// Configure the VM
///
/// Sets kernel, command line, vCPUs and memory of a VM that was created without them.
#[utoipa::path(put, path = "/vm/config", tag = "vm", request_body = VmConfig, responses(
    (status = 200, description = "Configured.", body = VmInfo),
    (status = 400, description = "`invalid_request`: the body is not a valid configuration (unknown field, value out of range, kernel file missing).", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM is already configured.", body = ErrorBody),
    BodyRefusals,
    ShuttingDown))]
async fn put_config(State(a): State<Api>, Body(body): Body) -> ApiResult<VmInfo> {
    let cfg = parse_body::<VmConfig>("PUT /vm/config", &body)?;
    a.info(Request::Configure(cfg)).await
}

/// Boot the VM
#[utoipa::path(put, path = "/vm/start", tag = "vm", responses(
    (status = 200, description = "Running.", body = VmInfo),
    (status = 400, description = "`invalid_request`: a body was sent (the endpoint takes none), or the configuration no longer holds (the kernel file is gone).", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM is not in `created` or has no configuration.", body = ErrorBody),
    BodyRefusals,
    (status = 500, description = "`failed`: the VM could not be built or booted.", body = ErrorBody),
    ShuttingDown))]
async fn put_start(State(a): State<Api>, Body(body): Body) -> ApiResult<VmInfo> {
    expect_no_body("PUT /vm/start", &body)?;
    a.info(Request::Start).await
}

/// Pause every vCPU
#[utoipa::path(put, path = "/vm/pause", tag = "vm", responses(
    (status = 200, description = "Paused.", body = VmInfo),
    (status = 400, description = "`invalid_request`: a body was sent (the endpoint takes none).", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM is not running.", body = ErrorBody),
    BodyRefusals,
    ShuttingDown))]
async fn put_pause(State(a): State<Api>, Body(body): Body) -> ApiResult<VmInfo> {
    expect_no_body("PUT /vm/pause", &body)?;
    a.info(Request::Pause).await
}

/// Continue a paused or suspended VM
#[utoipa::path(put, path = "/vm/resume", tag = "vm", responses(
    (status = 200, description = "Running.", body = VmInfo),
    (status = 400, description = "`invalid_request`: a body was sent (the endpoint takes none), or the suspend image cannot be read.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM is neither paused nor suspended, or it is fenced and its local lease has not been renewed (or cleared).", body = ErrorBody),
    BodyRefusals,
    (status = 500, description = "`failed`: a suspended VM could not be rebuilt.", body = ErrorBody),
    ShuttingDown))]
async fn put_resume(State(a): State<Api>, Body(body): Body) -> ApiResult<VmInfo> {
    expect_no_body("PUT /vm/resume", &body)?;
    a.info(Request::Resume).await
}

/// Renew the local lease
///
/// The VM's guest runs only while this is renewed (a cluster agent's VMMs, started with
/// `--lease-ttl`): once the deadline passes, the VMM pauses its own vCPUs (fenced). A
/// renewal moves the deadline to `since_monotonic_ns` (default: now) plus `ttl_ms`; a fenced VM stays paused until
/// `resume`. Answered at once, even while long work (a snapshot) runs.
#[utoipa::path(put, path = "/vm/lease", tag = "vm", request_body = LeaseRequest, responses(
    (status = 200, description = "Renewed.", body = VmInfo),
    (status = 400, description = "`invalid_request`: the body is not a lease request, or `ttl_ms` is out of range, or `since_monotonic_ns` is in the future.", body = ErrorBody),
    BodyRefusals,
    ShuttingDown))]
async fn put_lease(State(a): State<Api>, Body(body): Body) -> ApiResult<VmInfo> {
    let r = parse_body::<LeaseRequest>("PUT /vm/lease", &body)?;
    let ttl = Duration::from_millis(r.ttl_ms);
    a.info(Request::Lease(Some((ttl, r.since_monotonic_ns))))
        .await
}

/// Clear the local lease
///
/// The operator takes the VM over from its agent: it no longer fences itself. A fenced
/// VM can then be resumed.
#[utoipa::path(delete, path = "/vm/lease", tag = "vm", responses(
    (status = 200, description = "Cleared.", body = VmInfo),
    ShuttingDown))]
async fn delete_lease(State(a): State<Api>) -> ApiResult<VmInfo> {
    a.info(Request::Lease(None)).await
}

/// Suspend the VM to disk
///
/// Writes the VM to a snapshot in its directory and releases its memory; `resume` brings
/// it back.
#[utoipa::path(put, path = "/vm/suspend", tag = "vm", responses(
    (status = 200, description = "Suspended.", body = VmInfo),
    (status = 400, description = "`invalid_request`: a body was sent (the endpoint takes none).", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM is neither running nor paused.", body = ErrorBody),
    BodyRefusals,
    (status = 500, description = "`failed`: the suspend image could not be written.", body = ErrorBody),
    ShuttingDown))]
async fn put_suspend(State(a): State<Api>, Body(body): Body) -> ApiResult<VmInfo> {
    expect_no_body("PUT /vm/suspend", &body)?;
    a.info(Request::Suspend).await
}

/// Stop the VM
///
/// Asks the guest to power off and waits up to `timeout_ms` for it, then stops the VM by
/// force. An empty body means the defaults.
#[utoipa::path(put, path = "/vm/stop", tag = "vm", request_body(content = Option<StopRequest>, description = "Optional: no body means the defaults."), responses(
    (status = 200, description = "Terminated.", body = VmInfo),
    (status = 400, description = "`invalid_request`: the body is not a valid stop request.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM has already ended, or is stopping.", body = ErrorBody),
    BodyRefusals,
    ShuttingDown))]
async fn put_stop(State(a): State<Api>, Body(body): Body) -> ApiResult<VmInfo> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { &body };
    let s = parse_body::<StopRequest>("PUT /vm/stop", body)?;
    a.info(Request::Stop {
        timeout: Duration::from_millis(s.timeout_ms),
    })
    .await
}

/// Change the NUMA policy of the running VM
///
/// The page migration policy's mode (`off`, the per-VM off switch; `dry-run`; `on`), its
/// window and its rate limit, from the next window on; fields left out keep their value.
/// The whole request is checked (as `--numa-migrate` is at boot) before any of it takes
/// effect, and the change is recorded in the decision log (`numa_migration.log`).
/// `attribution` may only repeat the VM's own: the dirty rings exist from boot to end.
#[utoipa::path(put, path = "/vm/numa/policy", tag = "vm", request_body = NumaPolicyRequest, responses(
    (status = 200, description = "In force.", body = VmInfo),
    (status = 400, description = "`invalid_request`: the body is not a policy request, a value is out of range, the mode needs attribution or guest nodes the VM lacks, or the attribution differs from the VM's.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM is not running or paused, or has no guest nodes placed here or no dirty rings.", body = ErrorBody),
    BodyRefusals,
    ShuttingDown))]
async fn put_numa_policy(State(a): State<Api>, Body(body): Body) -> ApiResult<VmInfo> {
    let r = parse_body::<NumaPolicyRequest>("PUT /vm/numa/policy", &body)?;
    a.info(Request::NumaPolicy(r)).await
}

/// List lifecycle events
///
/// The VM's audit trail: every state transition and its cause.
#[utoipa::path(get, path = "/vm/events", tag = "vm", responses(
    (status = 200, description = "Oldest first.", body = Vec<LifecycleEvent>),
    ShuttingDown))]
async fn get_events(State(a): State<Api>) -> ApiResult<Vec<LifecycleEvent>> {
    match a.ask(Request::Events).await? {
        Response::Events(e) => Ok(Json(e)),
        other => Err(unexpected(other)),
    }
}

/// Read the tail of the serial console
#[utoipa::path(get, path = "/vm/console", tag = "console", params(ConsoleTailQuery), responses(
    (status = 200, description = "The last bytes the guest wrote.", body = ConsoleTail),
    (status = 400, description = "`invalid_request`: the query is not valid.", body = ErrorBody)))]
async fn get_console(State(a): State<Api>, Q(q): Q<ConsoleTailQuery>) -> ApiResult<ConsoleTail> {
    let max = at_most("bytes", q.bytes.unwrap_or(4096), CONSOLE_KEPT_BYTES)? as usize;
    let (total_bytes, data) = a.ring.tail(max);
    Ok(Json(ConsoleTail {
        total_bytes,
        data: String::from_utf8_lossy(&data).into_owned(),
    }))
}

/// Type into the serial console
#[utoipa::path(post, path = "/vm/console", tag = "console", request_body = ConsoleInput, responses(
    (status = 204, description = "Queued for the guest."),
    (status = 400, description = "`invalid_request`: the body is not valid console input.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM is not running or paused, or too much input is already waiting.", body = ErrorBody),
    BodyRefusals,
    ShuttingDown))]
async fn post_console(State(a): State<Api>, Body(body): Body) -> Result<StatusCode, ApiError> {
    let c = parse_body::<ConsoleInput>("POST /vm/console", &body)?;
    a.done(Request::ConsoleInput(c.data.into_bytes())).await
}

/// `value` of query parameter `name`, refused above `max`.
fn at_most(name: &str, value: u64, max: u64) -> Result<u64, ApiError> {
    if value > max {
        return Err(ApiError::invalid(format!(
            "{name} is at most {max} (the console output the VMM keeps), got {value}"
        )));
    }
    Ok(value)
}

/// Whether header `name` lists `token` (comma-separated, any case).
fn header_lists(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Attach to the serial console
///
/// Upgrades the connection (`Connection: upgrade`, `Upgrade: ray-console`) to a two-way
/// stream that follows the console live. The VMM sends frames: a kind byte (0 output,
/// 1 notice for the person at the console, 2 this attachment's mode, `write` or
/// `read_only`, 3 end: the VMM is ending), a big-endian u32 length and the payload. The
/// client sends raw input bytes. One attachment at a time has the input: the first to
/// attach in mode `auto`, or the latest to attach in mode `takeover`; the input of the
/// others is dropped. Closing the connection detaches and leaves the VM alone.
#[utoipa::path(get, path = "/vm/console/stream", tag = "console", params(ConsoleStreamQuery), responses(
    (status = 101, description = "Switched to the console stream."),
    (status = 400, description = "`invalid_request`: the query is not valid.", body = ErrorBody),
    (status = 426, description = "`upgrade_required`: the request lacks `Connection: upgrade` and `Upgrade: ray-console`.", body = ErrorBody)))]
async fn get_console_stream(
    State(a): State<Api>,
    Q(q): Q<ConsoleStreamQuery>,
    req: axum::extract::Request,
) -> Result<HttpResponse, ApiError> {
    if let Some(h) = q.history {
        at_most("history", h, CONSOLE_KEPT_BYTES)?;
    }
    let h = req.headers();
    if !(header_lists(h, header::CONNECTION, "upgrade")
        && header_lists(h, header::UPGRADE, CONSOLE_PROTOCOL))
    {
        return Err(ApiError::new(
            ErrorCode::UpgradeRequired,
            format!("GET /vm/console/stream streams the console over an upgraded connection: send `Connection: upgrade` and `Upgrade: {CONSOLE_PROTOCOL}`, or read it with GET /vm/console"),
        ));
    }
    let from = console_attach::start_offset(&a.ring, q.from, q.history);
    let (id, writes) = a.console.join(q.mode.unwrap_or_default());
    let attachment = Attachment {
        id,
        writes,
        from,
        ring: a.ring.clone(),
        inbox: a.inbox.clone(),
        hub: a.console.clone(),
        stop: a.stop.clone(),
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(io) => console_attach::run(hyper_util::rt::TokioIo::new(io), attachment).await,
            Err(_) => attachment.abandon(),
        }
    });
    let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    r.headers_mut().insert(
        header::UPGRADE,
        header::HeaderValue::from_static(CONSOLE_PROTOCOL),
    );
    Ok(r)
}

/// Take a snapshot
#[utoipa::path(put, path = "/vm/snapshot", tag = "snapshots", request_body = SnapshotRequest, responses(
    (status = 200, description = "Written.", body = SnapshotInfo),
    (status = 400, description = "`invalid_request`: the body is not valid, or its path cannot be used.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM's state does not allow it (not paused without `pause`, no parent for `incremental`, too many snapshots).", body = ErrorBody),
    BodyRefusals,
    (status = 500, description = "`failed`: writing the snapshot failed.", body = ErrorBody),
    ShuttingDown))]
async fn put_snapshot(State(a): State<Api>, Body(body): Body) -> ApiResult<SnapshotInfo> {
    let req = parse_body::<SnapshotRequest>("PUT /vm/snapshot", &body)?;
    match a.ask(Request::Snapshot(req)).await {
        Ok(Response::Snapshot(info)) => {
            crate::metrics::snapshot_taken(
                info.kind,
                info.paused_ms,
                info.write_ms,
                info.disk_bytes,
            );
            Ok(Json(info))
        }
        Ok(other) => Err(unexpected(other)),
        Err(e) => {
            if e.code == ErrorCode::Failed {
                crate::metrics::snapshot_failed();
            }
            Err(e)
        }
    }
}

/// Follow the snapshot being written
#[utoipa::path(get, path = "/vm/snapshot/progress", tag = "snapshots", responses(
    (status = 200, description = "The snapshot in progress, if any.", body = SnapshotProgress)))]
async fn get_snapshot_progress(State(a): State<Api>) -> Json<SnapshotProgress> {
    Json(a.meter.get())
}

/// List the snapshots of a store
///
/// Parents before their children; directories that are not readable snapshots are listed
/// apart.
#[utoipa::path(get, path = "/vm/snapshots", tag = "snapshots", params(SnapshotListQuery), responses(
    (status = 200, description = "The store's snapshots.", body = SnapshotList),
    (status = 400, description = "`invalid_request`: the query is not valid, the store is not a directory, or the VM has no snapshot to take the store from.", body = ErrorBody),
    (status = 404, description = "`not_found`: a snapshot the store refers to is missing.", body = ErrorBody),
    (status = 500, description = "`failed`: the store cannot be read.", body = ErrorBody),
    ShuttingDown))]
async fn get_snapshots(
    State(a): State<Api>,
    Q(q): Q<SnapshotListQuery>,
) -> ApiResult<SnapshotList> {
    let store = match q.store {
        Some(s) => std::path::PathBuf::from(s),
        None => {
            let Json(info) = a.info(Request::Info).await?;
            match info
                .last_snapshot
                .as_deref()
                .map(Path::new)
                .and_then(Path::parent)
            {
                Some(p) => p.to_path_buf(),
                None => {
                    return Err(ApiError::invalid(
                        "this VM has no snapshot yet: name the store with ?store=<directory>",
                    ))
                }
            }
        }
    };
    crate::jailed::check_visible(&store, "the snapshot store").map_err(ApiError::invalid)?;
    store_op(move || crate::snapshot::list(&store))
        .await
        .map(Json)
}

/// Delete a snapshot
#[utoipa::path(put, path = "/vm/snapshot/delete", tag = "snapshots", request_body = SnapshotDelete, responses(
    (status = 204, description = "Deleted."),
    (status = 400, description = "`invalid_request`: the body is not valid, or its path is not a snapshot.", body = ErrorBody),
    (status = 404, description = "`not_found`: there is no such snapshot.", body = ErrorBody),
    (status = 409, description = "`conflict`: other snapshots depend on it, or it is a suspended VM's image.", body = ErrorBody),
    BodyRefusals,
    (status = 500, description = "`failed`: the files could not be removed.", body = ErrorBody)))]
async fn put_snapshot_delete(Body(body): Body) -> Result<StatusCode, ApiError> {
    let d = parse_body::<SnapshotDelete>("PUT /vm/snapshot/delete", &body)?;
    crate::jailed::check_visible(Path::new(&d.path), "the snapshot").map_err(ApiError::invalid)?;
    store_op(move || crate::snapshot::delete(Path::new(&d.path))).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Merge a snapshot chain into a new full snapshot
#[utoipa::path(put, path = "/vm/snapshot/merge", tag = "snapshots", request_body = SnapshotMerge, responses(
    (status = 200, description = "The new full snapshot.", body = SnapshotEntry),
    (status = 400, description = "`invalid_request`: the body is not valid, or its path is not a snapshot.", body = ErrorBody),
    (status = 404, description = "`not_found`: there is no such snapshot (or a parent is missing).", body = ErrorBody),
    (status = 409, description = "`conflict`: a snapshot named `into` already exists.", body = ErrorBody),
    BodyRefusals,
    (status = 500, description = "`failed`: the files could not be read or written.", body = ErrorBody)))]
async fn put_snapshot_merge(Body(body): Body) -> ApiResult<SnapshotEntry> {
    let m = parse_body::<SnapshotMerge>("PUT /vm/snapshot/merge", &body)?;
    crate::jailed::check_visible(Path::new(&m.path), "the snapshot").map_err(ApiError::invalid)?;
    store_op(move || crate::snapshot::merge(Path::new(&m.path), &m.into, m.compress))
        .await
        .map(Json)
}

/// Migrate the VM to a waiting target
#[utoipa::path(put, path = "/vm/migration", tag = "migration", request_body = MigrateRequest, responses(
    (status = 200, description = "Started; follow it with `GET /vm/migration`.", body = MigrationStatus),
    (status = 400, description = "`invalid_request`: the body is not valid (bad address, unreadable key file, limits out of range).", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM is not running, or the host's migration limit is reached.", body = ErrorBody),
    BodyRefusals,
    (status = 500, description = "`failed`: the migration could not be started.", body = ErrorBody),
    ShuttingDown))]
async fn put_migration(State(a): State<Api>, Body(body): Body) -> ApiResult<MigrationStatus> {
    let req = parse_body::<MigrateRequest>("PUT /vm/migration", &body)?;
    a.migration(Request::Migrate(req)).await
}

/// Follow the VM's migration
#[utoipa::path(get, path = "/vm/migration", tag = "migration", responses(
    (status = 200, description = "The migration in flight, or the last one.", body = MigrationStatus),
    (status = 404, description = "`not_found`: this VM has never migrated.", body = ErrorBody),
    ShuttingDown))]
async fn get_migration(State(a): State<Api>) -> ApiResult<MigrationStatus> {
    a.migration(Request::MigrationStatus).await
}

/// Cancel the migration in flight
#[utoipa::path(put, path = "/vm/migration/cancel", tag = "migration", responses(
    (status = 200, description = "Cancelling; the VM keeps running here.", body = MigrationStatus),
    (status = 400, description = "`invalid_request`: a body was sent (the endpoint takes none).", body = ErrorBody),
    (status = 404, description = "`not_found`: this VM has never migrated.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the migration already ended.", body = ErrorBody),
    BodyRefusals,
    ShuttingDown))]
async fn put_migration_cancel(
    State(a): State<Api>,
    Body(body): Body,
) -> ApiResult<MigrationStatus> {
    expect_no_body("PUT /vm/migration/cancel", &body)?;
    a.migration(Request::MigrationCancel).await
}

/// Resume the source after an uncertain switch-over
///
/// After a link failure past the switch-over (`vm: paused_ownership_uncertain`), resumes
/// the paused source copy. Only call it once the target is known dead (fenced).
#[utoipa::path(put, path = "/vm/migration/reclaim", tag = "migration", responses(
    (status = 200, description = "The source copy runs again.", body = MigrationStatus),
    (status = 400, description = "`invalid_request`: a body was sent (the endpoint takes none).", body = ErrorBody),
    (status = 404, description = "`not_found`: this VM has never migrated.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the migration did not end with ownership uncertain.", body = ErrorBody),
    BodyRefusals,
    (status = 500, description = "`failed`: the source copy could not be resumed.", body = ErrorBody),
    ShuttingDown))]
async fn put_migration_reclaim(
    State(a): State<Api>,
    Body(body): Body,
) -> ApiResult<MigrationStatus> {
    expect_no_body("PUT /vm/migration/reclaim", &body)?;
    a.migration(Request::MigrationReclaim).await
}

/// Metrics in Prometheus' text format
///
/// vCPU exits by reason, dirty pages, snapshots and migrations (counts and durations),
/// memory (guest RAM, the VMM's own). Never waits for the VMM thread.
#[utoipa::path(get, path = "/metrics", tag = "meta", responses(
    (status = 200, description = "Prometheus text exposition format 0.0.4.", content_type = "text/plain", body = String)))]
async fn get_metrics(State(api): State<Api>) -> impl IntoResponse {
    let mut text = crate::metrics::render();
    api.displays.render_metrics(&mut text);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

/// The VMM's jail, seen from inside
///
/// What the VMM itself sees of its jail: its uids, gids and groups, capabilities,
/// `no_new_privs`, seccomp mode, pid (1 in a PID namespace of its own), host name,
/// network interfaces, the paths of its root and what is mounted there, and its cgroup's
/// limits where it can read them. Unjailed, the same facts of an ordinary process (no
/// paths: its root is the host's).
#[utoipa::path(get, path = "/vm/jail", tag = "vm", responses(
    (status = 200, description = "The VMM's view of its jail.", body = ray_api::vmm::JailView)))]
async fn get_jail() -> Result<Json<ray_api::vmm::JailView>, ApiError> {
    tokio::task::spawn_blocking(crate::jailed::view)
        .await
        .map(Json)
        .map_err(|e| ApiError::new(ErrorCode::Failed, format!("the jail view failed: {e}")))
}

/// List the VM's GPUs
///
/// Each GPU's type, state (`offline`, `initializing`, `ready`, `in_use`, `suspended`,
/// `error`) and displays, and the VNC socket. Never waits for the VMM thread.
#[utoipa::path(get, path = "/vm/gpus", tag = "display", responses(
    (status = 200, description = "The GPUs.", body = GpuList)))]
async fn get_gpus(State(api): State<Api>) -> Json<GpuList> {
    Json(api.displays.list())
}

/// A screenshot of one display
///
/// Display `n` (0-based over all GPUs) as an RGB PNG of its current pixels, read from
/// guest memory without pausing the guest. Never waits for the VMM thread.
#[utoipa::path(get, path = "/vm/display/{n}/screenshot.png", tag = "display",
    params(("n" = u32, Path, description = "The display's number.")),
    responses(
    (status = 200, description = "The picture.", content_type = "image/png", body = Vec<u8>),
    (status = 400, description = "`invalid_request`: `n` is not a number.", body = ErrorBody),
    (status = 404, description = "`not_found`: no such display.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM does not run.", body = ErrorBody)))]
async fn get_screenshot(
    State(api): State<Api>,
    axum::extract::Path(n): axum::extract::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let index: usize = n.parse().map_err(|_| {
        ApiError::invalid(format!("display '{n}' is not a display number (0, 1, ...)"))
    })?;
    let hub = api.displays.clone();
    let png = off_loop("the screenshot", move || hub.screenshot(index))
        .await?
        .map_err(|e| ApiError::new(display_error_code(&e), e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

fn display_error_code(e: &DisplayError) -> ErrorCode {
    match e {
        DisplayError::NoSuchDisplay { .. } => ErrorCode::NotFound,
        DisplayError::NotRunning(_) => ErrorCode::WrongState,
        DisplayError::Encode(_) => ErrorCode::Failed,
        DisplayError::Resize(_) => ErrorCode::InvalidRequest,
    }
}

/// Change a display's size
///
/// Gives display `n`, a virtio GPU's scanout, a new mode: the guest's driver gets a
/// display event, re-reads the display information and draws in the new size. The
/// display is dark until it does. Never waits for the VMM thread.
#[utoipa::path(put, path = "/vm/display/{n}/size", tag = "display", request_body = DisplaySize,
    params(("n" = u32, Path, description = "The display's number.")),
    responses(
    (status = 204, description = "The guest was told."),
    (status = 400, description = "`invalid_request`: `n` is not a number, the size is out of range, or the display belongs to an emulated GPU.", body = ErrorBody),
    (status = 404, description = "`not_found`: no such display.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM does not run.", body = ErrorBody),
    BodyRefusals))]
async fn put_display_size(
    State(api): State<Api>,
    axum::extract::Path(n): axum::extract::Path<String>,
    Body(body): Body,
) -> Result<StatusCode, ApiError> {
    let index: usize = n.parse().map_err(|_| {
        ApiError::invalid(format!("display '{n}' is not a display number (0, 1, ...)"))
    })?;
    let size = parse_body::<DisplaySize>("PUT /vm/display/{n}/size", &body)?;
    api.displays
        .resize(index, size.width, size.height)
        .map_err(|e| ApiError::new(display_error_code(&e), e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Start an encode session
///
/// Encodes display `n` to a video stream written to `path` (H.264 Annex-B for `h264`) by
/// a thread of the VMM: a frame only when the display changed, at most `fps` a second;
/// an idle display adds nothing. The session pauses with the VM and stops with it.
/// Limits: 2 sessions a display, 4 a VM, 16 a host; displays up to 2560x1600. `hevc` and
/// `vp9` need a build with the `ffmpeg` feature and are refused otherwise.
/// Never waits for the VMM thread.
#[utoipa::path(post, path = "/vm/display/{n}/encode", tag = "display", request_body = EncodeRequest,
    params(("n" = u32, Path, description = "The display's number.")),
    responses(
    (status = 200, description = "The session, started.", body = EncodeSessionInfo),
    (status = 400, description = "`invalid_request`: `n` is not a number, a setting is out of range, the codec is not available, the display is too large, or the file cannot be created.", body = ErrorBody),
    (status = 404, description = "`not_found`: no such display.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM does not run; `conflict`: a session limit is reached.", body = ErrorBody),
    BodyRefusals))]
async fn post_encode(
    State(api): State<Api>,
    axum::extract::Path(n): axum::extract::Path<String>,
    Body(body): Body,
) -> ApiResult<EncodeSessionInfo> {
    let index: usize = n.parse().map_err(|_| {
        ApiError::invalid(format!("display '{n}' is not a display number (0, 1, ...)"))
    })?;
    let req = parse_body::<EncodeRequest>("POST /vm/display/{n}/encode", &body)?;
    // A jailed VMM writes only inside its own directory (its jail holds the host's
    // encode slots read-only; a stream-only session writes nothing), or into a file a
    // client created and handed over.
    req.validate().map_err(ApiError::invalid)?;
    let handed = match (&req.handoff, &req.path) {
        (Some(token), _) => match api.ask(Request::TakeHandoff(token.clone())).await? {
            Response::Handed(fd) => Some(std::fs::File::from(fd)),
            other => return Err(unexpected(other)),
        },
        (None, Some(path)) => {
            crate::jailed::check_writable(
                std::path::Path::new(path),
                "the encode session's output",
            )
            .map_err(ApiError::invalid)?;
            None
        }
        (None, None) => None,
    };
    let hub = api.displays.clone();
    let info = off_loop("the encode session", move || {
        hub.encode_start(index, &req, handed)
    })
    .await?
    .map_err(|e| {
        let code = match &e {
            EncodeStartError::Display(d) => display_error_code(d),
            EncodeStartError::Encode(e) => encode_error_code(e),
        };
        ApiError::new(code, e.to_string())
    })?;
    Ok(Json(info))
}

fn encode_error_code(e: &EncodeError) -> ErrorCode {
    match e {
        EncodeError::Invalid(_) | EncodeError::Codec { .. } | EncodeError::TooLarge { .. } => {
            ErrorCode::InvalidRequest
        }
        EncodeError::PerDisplay { .. }
        | EncodeError::PerVm
        | EncodeError::PerHost
        | EncodeError::Watchers(_) => ErrorCode::Conflict,
        EncodeError::Transition { .. } => ErrorCode::WrongState,
        EncodeError::NoSuchSession(_) => ErrorCode::NotFound,
        EncodeError::Setup(_) => ErrorCode::Failed,
    }
}

/// List the encode sessions
///
/// Each session's display, codec, state (`starting`, `running`, `paused`, `stopped`,
/// `error`), frames, frames a second, bytes and encode latency. Never waits for the VMM
/// thread.
#[utoipa::path(get, path = "/vm/encode", tag = "display", responses(
    (status = 200, description = "The sessions, oldest first.", body = EncodeList)))]
async fn get_encode(State(api): State<Api>) -> Json<EncodeList> {
    Json(api.displays.encode_list())
}

/// Stop an encode session
///
/// Stops the session and waits for its thread: the file is complete when the answer
/// comes. Never waits for the VMM thread.
#[utoipa::path(delete, path = "/vm/encode/{session}", tag = "display",
    params(("session" = u32, Path, description = "The session's number.")),
    responses(
    (status = 200, description = "The session, stopped.", body = EncodeSessionInfo),
    (status = 400, description = "`invalid_request`: `session` is not a number.", body = ErrorBody),
    (status = 404, description = "`not_found`: no such session.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the session has stopped or failed already.", body = ErrorBody)))]
async fn delete_encode(
    State(api): State<Api>,
    axum::extract::Path(session): axum::extract::Path<String>,
) -> ApiResult<EncodeSessionInfo> {
    let id = session_number("encode", &session)?;
    let hub = api.displays.clone();
    let info = off_loop("stopping the session", move || hub.encode_stop(id))
        .await?
        .map_err(|e| ApiError::new(encode_error_code(&e), e.to_string()))?;
    Ok(Json(info))
}

/// Watch an encode session's stream
///
/// The session's stream as it is made, for as long as it runs: the stream's header (VP9:
/// IVF), then every frame from the next key frame on, which the session makes at once
/// (parameter sets included), so a player can start anywhere. H.264 and HEVC are Annex-B.
/// At most 4 watchers a session; one that falls 120 frames behind is dropped. A session
/// started without `path` encodes only while it is watched. Never waits for the VMM
/// thread.
#[utoipa::path(get, path = "/vm/encode/{session}/stream", tag = "display",
    params(("session" = u32, Path, description = "The session's number.")),
    responses(
    (status = 200, description = "The stream, chunked, until the session ends: `video/h264`, `video/h265` or `video/x-ivf`.", content_type = "application/octet-stream", body = Vec<u8>),
    (status = 400, description = "`invalid_request`: `session` is not a number, or the session has ended.", body = ErrorBody),
    (status = 404, description = "`not_found`: no such session.", body = ErrorBody),
    (status = 409, description = "`conflict`: the session has 4 watchers already.", body = ErrorBody)))]
async fn get_encode_stream(
    State(api): State<Api>,
    axum::extract::Path(session): axum::extract::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = session_number("encode", &session)?;
    let hub = api.displays.clone();
    let (codec, watch) = off_loop("watching", move || hub.encode_watch(id))
        .await?
        .map_err(|e| ApiError::new(encode_error_code(&e), e.to_string()))?;
    // The session's thread never waits: a blocking task carries its units to the body
    // and ends when either side does (the viewer left: checked at least once a second).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<axum::body::Bytes>(8);
    tokio::task::spawn_blocking(move || loop {
        match watch.recv_timeout(Duration::from_secs(1)) {
            Ok(unit) => {
                if tx
                    .blocking_send(axum::body::Bytes::copy_from_slice(&unit))
                    .is_err()
                {
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !tx.is_closed() => {}
            Err(_) => break,
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|u| u.map(Ok::<_, std::convert::Infallible>))
    });
    let kind = match codec {
        ray_api::encode::Codec::H264 => "video/h264",
        ray_api::encode::Codec::Hevc => "video/h265",
        ray_api::encode::Codec::Vp9 => "video/x-ivf",
    };
    Ok((
        [(header::CONTENT_TYPE, kind)],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// Start a decode session
///
/// Decodes a video stream back into pictures on a thread of the VMM: a file in the VM's
/// directory (`{"file": PATH}`, absolute or relative to that directory; H.264 or HEVC
/// Annex-B, VP9 in IVF, as encode sessions write them), from its start to its end (then
/// `done`), or the live stream of one of this VM's encode sessions
/// (`{"encode_session": N}`), taken as a watcher takes it (from a key frame made for it)
/// until that session ends. A corrupt stream puts the session in `error` with the
/// decoder's message. Limits: 4 sessions a VM that have not ended; over the host, decode
/// and encode sessions share 16 slots; pictures up to 2560x1600. `hevc` and `vp9` need a
/// build with the `ffmpeg` feature and are refused otherwise. Never waits for the VMM
/// thread.
#[utoipa::path(post, path = "/vm/decode", tag = "display", request_body = DecodeRequest,
    responses(
    (status = 200, description = "The session, started.", body = DecodeSessionInfo),
    (status = 400, description = "`invalid_request`: the body is not valid, the codec is not available or is not the encode session's, the file is outside the VM's directory or not a regular file, or the encode session has ended.", body = ErrorBody),
    (status = 404, description = "`not_found`: no such file, or no such encode session.", body = ErrorBody),
    (status = 409, description = "`conflict`: a session limit is reached, or the encode session has 4 watchers already.", body = ErrorBody),
    BodyRefusals))]
async fn post_decode(State(api): State<Api>, Body(body): Body) -> ApiResult<DecodeSessionInfo> {
    let req = parse_body::<DecodeRequest>("POST /vm/decode", &body)?;
    let hub = api.displays.clone();
    let info = off_loop("the decode session", move || hub.decode_start(&req))
        .await?
        .map_err(|e| ApiError::new(decode_start_error_code(&e), e.to_string()))?;
    Ok(Json(info))
}

fn decode_start_error_code(e: &DecodeStartError) -> ErrorCode {
    match e {
        DecodeStartError::Invalid(_)
        | DecodeStartError::Codec { .. }
        | DecodeStartError::CodecMismatch { .. }
        | DecodeStartError::EncodeSessionEnded { .. }
        | DecodeStartError::OutsideVmDir { .. }
        | DecodeStartError::NotAFile { .. }
        | DecodeStartError::File { .. } => ErrorCode::InvalidRequest,
        DecodeStartError::NoSuchEncodeSession(_) | DecodeStartError::NoSuchFile { .. } => {
            ErrorCode::NotFound
        }
        DecodeStartError::PerVm | DecodeStartError::PerHost | DecodeStartError::Watchers(_) => {
            ErrorCode::Conflict
        }
        DecodeStartError::Setup(_) => ErrorCode::Failed,
    }
}

fn decode_session_error(e: DecodeSessionError) -> ApiError {
    let code = match &e {
        DecodeSessionError::NoSuchSession(_) => ErrorCode::NotFound,
        DecodeSessionError::Transition { .. } | DecodeSessionError::NoFrame { .. } => {
            ErrorCode::WrongState
        }
        DecodeSessionError::Png { .. } => ErrorCode::Failed,
    };
    ApiError::new(code, e.to_string())
}

/// The number of a `kind` (encode, decode) session in a path.
fn session_number(kind: &str, session: &str) -> Result<u32, ApiError> {
    session.parse().map_err(|_| {
        ApiError::invalid(format!(
            "{kind} session '{session}' is not a session number (1, 2, ...)"
        ))
    })
}

/// List the decode sessions
///
/// Each session's codec, source, state (`starting`, `running`, `done`, `stopped`,
/// `error`), pictures decoded, their size, pictures a second and mean decode time. Never
/// waits for the VMM thread.
#[utoipa::path(get, path = "/vm/decode", tag = "display", responses(
    (status = 200, description = "The sessions, oldest first.", body = DecodeList)))]
async fn get_decode(State(api): State<Api>) -> Json<DecodeList> {
    Json(api.displays.decode_list())
}

/// Show a decode session
///
/// Its state, source, pictures decoded and their size, rate and decode time, and why it
/// failed when it did. Never waits for the VMM thread.
#[utoipa::path(get, path = "/vm/decode/{session}", tag = "display",
    params(("session" = u32, Path, description = "The decode session's number.")),
    responses(
    (status = 200, description = "The session.", body = DecodeSessionInfo),
    (status = 400, description = "`invalid_request`: `session` is not a number.", body = ErrorBody),
    (status = 404, description = "`not_found`: no such session.", body = ErrorBody)))]
async fn get_decode_session(
    State(api): State<Api>,
    axum::extract::Path(session): axum::extract::Path<String>,
) -> ApiResult<DecodeSessionInfo> {
    let id = session_number("decode", &session)?;
    Ok(Json(
        api.displays.decode_info(id).map_err(decode_session_error)?,
    ))
}

/// A decode session's last picture
///
/// The last picture the session decoded, as an RGB PNG. Never waits for the VMM thread.
#[utoipa::path(get, path = "/vm/decode/{session}/frame.png", tag = "display",
    params(("session" = u32, Path, description = "The decode session's number.")),
    responses(
    (status = 200, description = "The picture.", content_type = "image/png", body = Vec<u8>),
    (status = 400, description = "`invalid_request`: `session` is not a number.", body = ErrorBody),
    (status = 404, description = "`not_found`: no such session.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the session has decoded no picture yet.", body = ErrorBody)))]
async fn get_decode_frame(
    State(api): State<Api>,
    axum::extract::Path(session): axum::extract::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = session_number("decode", &session)?;
    let hub = api.displays.clone();
    let png = off_loop("the picture", move || hub.decode_frame_png(id))
        .await?
        .map_err(decode_session_error)?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

/// Stop a decode session
///
/// Stops the session and waits for its thread. Never waits for the VMM thread.
#[utoipa::path(delete, path = "/vm/decode/{session}", tag = "display",
    params(("session" = u32, Path, description = "The decode session's number.")),
    responses(
    (status = 200, description = "The session, stopped.", body = DecodeSessionInfo),
    (status = 400, description = "`invalid_request`: `session` is not a number.", body = ErrorBody),
    (status = 404, description = "`not_found`: no such session.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the session has ended already (done, stopped or failed).", body = ErrorBody)))]
async fn delete_decode(
    State(api): State<Api>,
    axum::extract::Path(session): axum::extract::Path<String>,
) -> ApiResult<DecodeSessionInfo> {
    let id = session_number("decode", &session)?;
    let hub = api.displays.clone();
    let info = off_loop("stopping the session", move || hub.decode_stop(id))
        .await?
        .map_err(decode_session_error)?;
    Ok(Json(info))
}

/// Type text on the keyboard
///
/// The text as key strokes on the VM's virtio-input keyboard (US layout), sent as one
/// batch. Never waits for the VMM thread.
#[utoipa::path(post, path = "/vm/keyboard/type", tag = "display", request_body = TypeText,
    responses(
    (status = 200, description = "Sent to the guest.", body = Typed),
    (status = 400, description = "`invalid_request`: not valid JSON, too long, or a character a US keyboard cannot type.", body = ErrorBody),
    (status = 409, description = "`wrong_state`: the VM does not run, or has no keyboard.", body = ErrorBody),
    BodyRefusals))]
async fn post_type(State(api): State<Api>, Body(body): Body) -> ApiResult<Typed> {
    let t = parse_body::<TypeText>("POST /vm/keyboard/type", &body)?;
    if t.text.chars().count() > MAX_TYPED {
        return Err(ApiError::invalid(format!(
            "the text has {} characters; one request types at most {MAX_TYPED}",
            t.text.chars().count()
        )));
    }
    let events = api.displays.type_text(&t.text).map_err(|e| {
        let code = match e {
            TypeError::Text(_) => ErrorCode::InvalidRequest,
            TypeError::NoKeyboard | TypeError::NotRunning(_) => ErrorCode::WrongState,
        };
        ApiError::new(code, e.to_string())
    })?;
    Ok(Json(Typed {
        events: events as u64,
    }))
}

/// Show the VMM's version
#[utoipa::path(get, path = "/version", tag = "meta", responses(
    (status = 200, description = "This VMM's version.", body = VersionInfo)))]
async fn get_version() -> Json<VersionInfo> {
    Json(VersionInfo::current())
}

/// This OpenAPI document
#[utoipa::path(get, path = "/openapi.json", tag = "meta", responses(
    (status = 200, description = "This document.", content_type = "application/json", body = Object)))]
async fn get_openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json())
}

// ---- the document and the router ------------------------------------------------------

#[derive(OpenApi)]
#[openapi(
    info(
        title = "rayvisor per-VM API",
        description = "Served by each `ray vmm` process (one per VM) on the Unix socket `api.sock` in its VM directory, and on a loopback TCP port when started with `--api-tcp`. Every error answer is an `ErrorBody`: a stable `code` for programs and a `message` for people. Requests act only once their whole body has arrived. Over TCP, a request whose `Host` is not a loopback name is refused with 403 `forbidden_host`, and one without the VM's bearer token (the file `api.token` in its VM directory, mode 0600, fresh for each VMM process) with 401 `unauthorized`; the Unix socket (mode 0600) needs no token.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    tags(
        (name = "vm", description = "The VM's lifecycle: configure, start, pause, resume, suspend, stop, events."),
        (name = "console", description = "The serial console: its output and input."),
        (name = "snapshots", description = "Snapshots of the VM and the stores that hold them."),
        (name = "migration", description = "Live migration of the VM to another host."),
        (name = "display", description = "GPUs, displays and screenshots (VNC viewers connect to the sockets `vnc-N.sock` and `vnc-N-view.sock` in the VM directory)."),
        (name = "meta", description = "About the API itself.")
    ),
    components(schemas(ErrorCode))
)]
struct ApiDoc;

/// The routes, with the document their annotations describe.
fn routes() -> OpenApiRouter<Api> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(get_vm))
        .routes(routes!(put_config))
        .routes(routes!(put_start))
        .routes(routes!(put_pause))
        .routes(routes!(put_resume))
        .routes(routes!(put_lease, delete_lease))
        .routes(routes!(put_suspend))
        .routes(routes!(put_stop))
        .routes(routes!(put_numa_policy))
        .routes(routes!(get_events))
        .routes(routes!(exec::post_exec))
        .routes(routes!(get_console, post_console))
        .routes(routes!(get_console_stream))
        .routes(routes!(put_snapshot))
        .routes(routes!(get_snapshot_progress))
        .routes(routes!(get_snapshots))
        .routes(routes!(put_snapshot_delete))
        .routes(routes!(put_snapshot_merge))
        .routes(routes!(put_migration, get_migration))
        .routes(routes!(put_migration_cancel))
        .routes(routes!(put_migration_reclaim))
        .routes(routes!(get_jail))
        .routes(routes!(get_gpus))
        .routes(routes!(get_screenshot))
        .routes(routes!(put_display_size))
        .routes(routes!(post_type))
        .routes(routes!(post_encode))
        .routes(routes!(get_encode))
        .routes(routes!(delete_encode))
        .routes(routes!(get_encode_stream))
        .routes(routes!(post_decode, get_decode))
        .routes(routes!(get_decode_session, delete_decode))
        .routes(routes!(get_decode_frame))
        .routes(routes!(get_metrics))
        .routes(routes!(get_version))
        .routes(routes!(get_openapi))
}

/// An error answer of an OpenAPI document (this API's or the agent's): `{code, message}`.
pub fn error_response(description: &str) -> utoipa::openapi::Response {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// The per-VM API's OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    let (_, mut doc) = routes().split_for_parts();
    doc.info.version = API_VERSION.to_string();
    // The TCP listener's checks apply to every operation.
    let forbidden =
        error_response("`forbidden_host`: over TCP, the `Host` header is not a loopback name.");
    let unauthorized = error_response(
        "`unauthorized`: over TCP, no `Authorization: Bearer` header with this VM's token.",
    );
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            "vm_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Over TCP: the VM's token, from the file `api.token` in its VM directory. The Unix socket needs none.",
                    ))
                    .build(),
            ),
        );
    doc.security = Some(vec![SecurityRequirement::new(
        "vm_token",
        Vec::<String>::new(),
    )]);
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            op.responses
                .responses
                .insert("403".to_string(), forbidden.clone().into());
            op.responses
                .responses
                .insert("401".to_string(), unauthorized.clone().into());
        }
    }
    doc
}

/// The per-VM OpenAPI document as pretty JSON.
pub fn openapi_json() -> String {
    pretty_openapi(&openapi())
}

/// An OpenAPI document (this API's or the agent's) as pretty JSON.
pub fn pretty_openapi(doc: &utoipa::openapi::OpenApi) -> String {
    let text = doc
        .to_pretty_json()
        .expect("the OpenAPI document is plain data and always serializes");
    // utoipa 6 spells the unsigned integer formats `u-int8` ... `u-int64` (its serde
    // kebab-cases the variant names); the names in use are `uint8` ... `uint64`. In pretty
    // JSON a format is always `"format": "<name>"` (a description quoting it would have
    // its quotes escaped), so the replacement touches formats only.
    text.replace("\"format\": \"u-int", "\"format\": \"uint")
}

/// The answer to a path no route serves (this API's and the agent's).
pub async fn unknown_endpoint(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::UnknownEndpoint,
        format!("no such endpoint: {method} {uri} (see GET /openapi.json)"),
    )
}

/// The answer to a method a route does not take (this API's and the agent's).
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {uri} (see GET /openapi.json)"),
    )
}

fn router(api: Api) -> Router {
    let (router, _) = routes().split_for_parts();
    router
        .fallback(unknown_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(log_request))
        .with_state(api)
}

/// Logs each request with its answer and how long it took: at debug level, or as a
/// warning when the answer is a server error.
async fn log_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> HttpResponse {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let t = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let took_us = t.elapsed().as_micros() as u64;
    if status >= 500 {
        tracing::warn!(%method, path, status, took_us, "API request failed");
    } else {
        tracing::debug!(%method, path, status, took_us, "API request");
    }
    response
}

/// Whether `host` (a `Host` header: name or address, with or without a port) names this
/// machine's loopback interface.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port or [v6]
        match rest.split_once(']') {
            Some((addr, _)) => addr,
            None => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The TCP listener's guard against DNS rebinding: a web page may make a browser send
/// requests to 127.0.0.1, but under its own host name.
async fn loopback_host_only(
    headers: HeaderMap,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> HttpResponse {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if is_loopback_host(host) {
        next.run(request).await
    } else {
        ApiError::new(
            ErrorCode::ForbiddenHost,
            format!(
                "Host {host:?} is not a loopback name: over TCP this API answers only requests addressed to localhost, 127.0.0.0/8 or [::1]"
            ),
        )
        .into_response()
    }
}

/// The file in the VM directory holding the TCP listener's bearer token (mode 0600).
pub const TOKEN_FILE: &str = "api.token";

/// The bearer token every request over TCP must carry: 32 random bytes, in hex, fresh for
/// each VMM process and written to [`TOKEN_FILE`] readable by the VM's owner only. It
/// grants exactly this VM's API (each VMM has its own).
#[derive(Clone)]
pub struct ApiToken([u8; 32]);

impl ApiToken {
    /// A fresh token, written to `path` (replacing any older one) with mode 0600.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let token = ApiToken(ray_migration::auth::fresh_nonce()?);
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()))
            })?;
        writeln!(f, "{}", token.hex())?;
        Ok(token)
    }

    fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `header` (an `Authorization` value) is `Bearer <this token>`; the
    /// comparison takes the same time wherever the first difference is.
    fn admits(&self, header: &str) -> bool {
        let Some(given) = header.strip_prefix("Bearer ") else {
            return false;
        };
        let given = given.trim().as_bytes();
        if given.len() != 64 {
            return false;
        }
        let mut bytes = [0u8; 32];
        for (i, pair) in given.chunks_exact(2).enumerate() {
            let Some(b) = std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
            else {
                return false;
            };
            bytes[i] = b;
        }
        ray_migration::auth::ct_eq(&bytes, &self.0)
    }
}

/// The TCP listener's authentication: `Authorization: Bearer <token>` ([`ApiToken`]).
async fn bearer_token_only(
    axum::extract::State(token): axum::extract::State<ApiToken>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> HttpResponse {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    if given.is_some_and(|g| token.admits(g)) {
        return next.run(request).await;
    }
    unauthorized(
        given.is_some(),
        "this VM's token",
        &format!("the file {TOKEN_FILE} of the VM's directory"),
        "Bearer realm=\"rayvisor-vm\"",
    )
}

/// The 401 of a TCP listener with bearer tokens (the VM's API and the agent's): why the
/// request was refused, where the token is, and the `WWW-Authenticate` challenge.
pub fn unauthorized(
    given: bool,
    whose: &str,
    kept_in: &str,
    challenge: &'static str,
) -> HttpResponse {
    let why = if given {
        format!("the Authorization header does not carry {whose}")
    } else {
        "over TCP every request needs `Authorization: Bearer <token>`".to_string()
    };
    let mut response = ApiError::new(
        ErrorCode::Unauthorized,
        format!("{why} (the token is in {kept_in})"),
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static(challenge),
    );
    response
}

/// Checks that `addr` may serve the API over TCP: loopback addresses only. The token keeps
/// other local users out; the traffic itself is not encrypted, so it never leaves the host.
pub fn check_tcp_addr(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "the API can be served over TCP on a loopback address only (127.0.0.0/8 or [::1]), not {addr}: its traffic is not encrypted"
        ))
    }
}

/// The API server thread's handle: dropping `shutdown` ends it gracefully.
pub struct ApiServer {
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
    tcp: Option<SocketAddr>,
}

/// The API's sockets, bound but not served yet: clients may connect (their requests wait
/// in the listen backlog) while the VMM restores or boots, and are answered once
/// [`ApiServer::start`] serves them.
pub struct ApiListeners {
    unix: std::os::unix::net::UnixListener,
    tcp: Option<(std::net::TcpListener, ApiToken)>,
}

impl ApiListeners {
    /// Binds `socket` (mode 0600: the VM's owner only), and `tcp` (a loopback address) if
    /// given, whose token goes to [`TOKEN_FILE`] beside the socket.
    pub fn bind(socket: &Path, tcp: Option<SocketAddr>) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let tcp = match tcp {
            Some(addr) => {
                check_tcp_addr(addr).map_err(std::io::Error::other)?;
                // Jailed, the keeper binds it in the host's network namespace.
                let l = ray_outside::listen_tcp(addr).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
                })?;
                l.set_nonblocking(true)?;
                let dir = socket.parent().unwrap_or(Path::new("."));
                Some((l, ApiToken::create(&dir.join(TOKEN_FILE))?))
            }
            None => None,
        };
        let _ = std::fs::remove_file(socket);
        let unix = std::os::unix::net::UnixListener::bind(socket)?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        unix.set_nonblocking(true)?;
        Ok(Self { unix, tcp })
    }
}

impl ApiServer {
    /// Serves `listeners` on a thread of its own. Building the router (and its OpenAPI
    /// description) is the caller's work, ~1 ms: the VMM starts the server once idle.
    pub fn start(
        listeners: ApiListeners,
        inbox: Sender<Message>,
        ring: Arc<ConsoleRing>,
        meter: Arc<crate::snapshot::Meter>,
        displays: Arc<crate::display::DisplayHub>,
    ) -> std::io::Result<Self> {
        let ApiListeners {
            unix: std_listener,
            tcp: tcp_listener,
        } = listeners;
        let tcp = match &tcp_listener {
            Some((l, _)) => Some(l.local_addr()?),
            None => None,
        };
        let dir = std_listener
            .local_addr()?
            .as_pathname()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let (tx, rx) = tokio::sync::watch::channel(false);
        // Built here, on the caller's (already grown) stack: on the API thread's own it
        // would touch stack pages that stay allocated for the VMM's life.
        let console = Arc::new(ConsoleHub::default());
        let hub = console.clone();
        ring.on_output(move || hub.output_written());
        let app = router(Api {
            inbox,
            ring,
            meter,
            tcp: tcp.map(|a| a.to_string()),
            console: console.clone(),
            stop: rx.clone(),
            displays,
            dir,
        });
        let thread = std::thread::Builder::new()
            .name("api".into())
            .stack_size(512 << 10)
            .spawn_in_span(move || {
                crate::seccomp::enter(crate::seccomp::Kind::Api);
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .on_thread_start(|| crate::seccomp::inherit(crate::seccomp::Kind::Api))
                    .enable_io()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("cannot start the API runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    serve(std_listener, tcp_listener, app, rx).await;
                    // Attached consoles have been told; let them send their last output.
                    console.drained(Duration::from_secs(2)).await;
                });
            })?;
        Ok(Self {
            shutdown: Some(tx),
            thread: Some(thread),
            tcp,
        })
    }

    /// The TCP address the API is served on, if any (the port chosen for port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// Stops accepting, lets answers in flight finish, and joins the thread.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    unix: std::os::unix::net::UnixListener,
    tcp: Option<(std::net::TcpListener, ApiToken)>,
    app: Router,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let unix = match tokio::net::UnixListener::from_std(unix) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot serve the API socket: {e}");
            return;
        }
    };
    let tcp_task = tcp.and_then(|(l, token)| match tokio::net::TcpListener::from_std(l) {
        Ok(l) => {
            // The Host check first: a rebound page learns nothing, not even 401.
            let app = app
                .clone()
                .layer(axum::middleware::from_fn_with_state(
                    token,
                    bearer_token_only,
                ))
                .layer(axum::middleware::from_fn(loopback_host_only));
            let rx = stop.clone();
            Some(tokio::spawn(async move {
                let _ = axum::serve(l, app)
                    .with_graceful_shutdown(stopped(rx))
                    .await;
            }))
        }
        Err(e) => {
            tracing::error!("cannot serve the API on TCP: {e}");
            None
        }
    });
    let _ = axum::serve(unix, app)
        .with_graceful_shutdown(stopped(stop))
        .await;
    if let Some(t) = tcp_task {
        let _ = t.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each VM's token opens its own API only, and a new VMM of the same VM makes the old
    /// token worthless.
    #[test]
    fn a_token_is_scoped_to_its_vm_and_process() {
        let dir = std::env::temp_dir().join(format!("ray-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let read = |p: &Path| format!("Bearer {}", std::fs::read_to_string(p).unwrap().trim());
        let (a_path, b_path) = (dir.join("a.token"), dir.join("b.token"));
        let a = ApiToken::create(&a_path).unwrap();
        let b = ApiToken::create(&b_path).unwrap();
        let (a_header, b_header) = (read(&a_path), read(&b_path));
        assert!(a.admits(&a_header) && b.admits(&b_header));
        assert!(!a.admits(&b_header) && !b.admits(&a_header));
        let a_again = ApiToken::create(&a_path).unwrap();
        assert!(!a_again.admits(&a_header) && a_again.admits(&read(&a_path)));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&a_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn committed_openapi_document_is_current() {
        let committed = include_str!("../../../docs/openapi/vmm.json");
        let current = openapi_json();
        let first_difference = committed
            .trim()
            .lines()
            .zip(current.trim().lines())
            .enumerate()
            .find(|(_, (a, b))| a != b);
        assert!(
            committed.trim() == current.trim(),
            "docs/openapi/vmm.json is stale (first difference: {:?}, lines {} vs {}): regenerate it with `target/debug/ray openapi vmm > docs/openapi/vmm.json`",
            first_difference.map(|(i, (a, b))| (i + 1, a, b)),
            committed.trim().lines().count(),
            current.trim().lines().count()
        );
    }

    #[test]
    fn every_operation_has_a_summary_a_tag_and_documented_errors() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        assert!(!doc["info"]["description"].as_str().unwrap().is_empty());
        assert_eq!(doc["info"]["license"]["name"], "Apache-2.0");
        assert_eq!(doc["info"]["version"], API_VERSION);
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 19, "{} paths", paths.len());
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let what = format!("{method} {path}");
                assert!(
                    op["summary"].as_str().is_some_and(|s| !s.is_empty()),
                    "{what} has no summary"
                );
                assert!(
                    op["tags"].as_array().is_some_and(|t| !t.is_empty()),
                    "{what} has no tag"
                );
                let responses = op["responses"].as_object().unwrap();
                for (status, r) in responses {
                    assert!(
                        r["description"].as_str().is_some_and(|d| !d.is_empty()),
                        "{what} {status} has no description"
                    );
                    if status.starts_with('4') || status.starts_with('5') {
                        assert_eq!(
                            r["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/ErrorBody",
                            "{what} {status} must answer an ErrorBody"
                        );
                    }
                }
                // Every body-taking or state-changing operation reads (and can reject) its body.
                if method == "put" || method == "post" {
                    for s in ["400", "413", "415"] {
                        assert!(responses.contains_key(s), "{what} does not document {s}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_controller_error_has_a_code_and_every_code_a_status() {
        let cases = [
            (
                ControllerError::invalid("x"),
                ErrorCode::InvalidRequest,
                400,
            ),
            (ControllerError::refused("x"), ErrorCode::WrongState, 409),
            (ControllerError::not_found("x"), ErrorCode::NotFound, 404),
            (ControllerError::failed("x"), ErrorCode::Failed, 500),
        ];
        for (e, code, status) in cases {
            let a = ApiError::from(e);
            assert_eq!(a.code, code);
            assert_eq!(http_status(a.code).as_u16(), status);
        }
        for c in ErrorCode::ALL {
            let s = http_status(c).as_u16();
            assert!((400..600).contains(&s), "{c} -> {s}");
        }
    }

    #[test]
    fn body_errors_name_the_endpoint_and_the_problem() {
        let e = parse_body::<VmConfig>("PUT /vm/config", b"{\"kernel\": 3").unwrap_err();
        assert_eq!(ApiError::from(e.clone()).code, ErrorCode::InvalidRequest);
        assert!(
            e.to_string()
                .starts_with("invalid JSON body for PUT /vm/config: "),
            "{e}"
        );
        let e = parse_body::<VmConfig>("PUT /vm/config", b"").unwrap_err();
        assert!(e.to_string().contains("needs a JSON body"), "{e}");
        let e = parse_body::<StopRequest>("PUT /vm/stop", b"{\"timeout\": 5}").unwrap_err();
        assert!(e.to_string().contains("unknown field `timeout`"), "{e}");
        let e = parse_body::<StopRequest>("PUT /vm/stop", b"{\"timeout_ms\": -1}").unwrap_err();
        assert!(e.to_string().contains("invalid value: integer `-1`"), "{e}");
        // A struct's fields as an array are not an object.
        let e = parse_body::<StopRequest>("PUT /vm/stop", b" [null]").unwrap_err();
        assert!(e.to_string().contains("must be a JSON object"), "{e}");
        let e =
            parse_body::<NumaPolicyRequest>("PUT /vm/numa/policy", b"[null, null]").unwrap_err();
        assert!(e.to_string().contains("must be a JSON object"), "{e}");
    }

    #[test]
    fn unsigned_integers_have_their_own_formats() {
        let doc = openapi_json();
        assert!(
            !doc.contains("\"u-int"),
            "utoipa's spelling left in the document"
        );
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        let vcpus = &v["components"]["schemas"]["VmConfig"]["properties"]["vcpus"];
        assert_eq!(vcpus["format"], "uint8");
        let memory = &v["components"]["schemas"]["VmConfig"]["properties"]["memory_bytes"];
        assert_eq!(memory["format"], "uint64");
    }

    #[test]
    fn the_documented_console_limit_is_the_rings() {
        assert_eq!(
            CONSOLE_KEPT_BYTES,
            crate::devices::console::RING_BYTES as u64
        );
    }

    #[test]
    fn bodyless_endpoints_take_nothing_or_an_empty_object() {
        for ok in [&b""[..], b"{}", b" { } \n"] {
            assert!(expect_no_body("PUT /vm/pause", ok).is_ok(), "{ok:?}");
        }
        let e = expect_no_body("PUT /vm/pause", b"{\"x\":1}").unwrap_err();
        assert!(e.to_string().contains("PUT /vm/pause takes no body"), "{e}");
        assert!(expect_no_body("PUT /vm/pause", b"[]").is_err());
    }

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/json ;x=y",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for bad in [
            "",
            "text/plain",
            "application/jsonx",
            "multipart/form-data",
            "application/x-www-form-urlencoded",
        ] {
            assert!(!is_json(bad), "{bad}");
        }
    }

    #[test]
    fn only_loopback_hosts_and_addresses_pass() {
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "127.1.2.3:1",
            "localhost:9",
            "LOCALHOST",
            "[::1]:80",
            "[::1]",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example:80",
            "10.0.0.1:80",
            "[::2]:80",
            "localhost.evil.example",
            "[::1",
            "0.0.0.0:1",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
        assert!(check_tcp_addr("127.0.0.1:0".parse().unwrap()).is_ok());
        assert!(check_tcp_addr("[::1]:0".parse().unwrap()).is_ok());
        let e = check_tcp_addr("0.0.0.0:80".parse().unwrap()).unwrap_err();
        assert!(e.contains("not 0.0.0.0:80"), "{e}");
    }
}
