//! The per-host agent API (issue 17): what `ray agent` serves about its host and the
//! cluster VMs whose VMMs live there, on the Unix socket `api.sock` in its state directory
//! (mode 0600, always) and on TCP when asked (`--api-tcp ADDR`, only with
//! `--api-token-file`: every request over TCP carries `Authorization: Bearer <token>`,
//! compared in constant time; nothing is answered on TCP without it).
//!
//! Errors are the per-VM API's: an [`ErrorBody`] with a stable code and a sentence naming
//! what was wrong. The VMs are the ones the agent marked as the cluster's (`cluster.json`
//! in their directory); VMs started by hand on the host are not this API's.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use ray_api::agent::{
    HostGpu, HostHealth, HostInfo, HostInventory, HostLease, HostVm, HostVmStop, LeaseState,
    NumaHostNode, NumaHostStatus, NumaHostVm, API_VERSION,
};
use ray_api::vmm::{ErrorBody, ErrorCode, StopRequest, VmInfo, VmStateName};
use ray_cluster::agent::Inventory;
use ray_vmm::api_server::{expect_no_body, parse_body, ApiError, Body};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use ray::client::{ClientError, VmmClient};
use ray::runtime::{self, Presence};

/// The socket's file name in the agent's state directory.
pub const SOCKET: &str = "api.sock";
/// Largest request body the API reads.
const BODY_LIMIT: usize = 16 << 10;
/// Shortest and longest bearer token accepted in a token file.
const MIN_TOKEN: usize = 16;
const MAX_TOKEN: usize = 256;

/// The agent's lease as the API shows it: whether it fenced its VMs, and the time left
/// before it would.
pub type LeaseView = std::sync::Arc<dyn Fn() -> (bool, Duration) + Send + Sync>;

/// What the handlers share.
#[derive(Clone)]
pub struct AgentApi {
    pub host: String,
    pub runtime: PathBuf,
    pub lease: LeaseView,
    pub lease_ttl: Duration,
    /// The CPUs the host offers the cluster (`ray agent --cpus`), shown instead of the
    /// kernel's count.
    pub cpus: Option<u32>,
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn failed(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Failed, e.to_string())
}

/// Runs a blocking call (the VMMs' API clients block) off the server's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(failed)
}

/// A VMM's answer as this API's error: its code and message, or `failed`.
fn vmm_error(vm: &str, e: ClientError) -> ApiError {
    match e {
        ClientError::Api {
            code: Some(code),
            message,
            ..
        } => ApiError::new(code, format!("VM {vm}: {message}")),
        e => ApiError::new(ErrorCode::Failed, format!("VM {vm}: {e}")),
    }
}

impl AgentApi {
    /// The cluster's VMs on this host: those the agent marked, whose VMM is alive.
    fn vms(&self) -> Vec<HostVm> {
        runtime::list_ids(&self.runtime)
            .into_iter()
            .filter_map(|id| self.vm(&id))
            .collect()
    }

    /// One of this host's cluster VMs, if `id` is one.
    fn vm(&self, id: &str) -> Option<HostVm> {
        let dir = runtime::vm_dir(&self.runtime, id);
        let epoch = crate::agent::marked_epoch(&dir)?;
        let Presence::Live { pid } = runtime::presence(&dir) else {
            return None;
        };
        let mut vm = HostVm {
            id: id.to_string(),
            epoch,
            state: None,
            pid: Some(pid),
            fenced: false,
            problem: None,
        };
        match VmmClient::new(&dir.join("api.sock")).call::<VmInfo>("GET", "/vm", None) {
            Ok(info) => {
                vm.state = Some(info.state);
                vm.fenced = info.lease.is_some_and(|l| l.fenced);
            }
            Err(e) => vm.problem = Some(e.to_string()),
        }
        Some(vm)
    }

    /// `id` checked, and found among this host's cluster VMs.
    fn find(&self, id: &str) -> Result<HostVm, ApiError> {
        runtime::check_id(id).map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e))?;
        self.vm(id).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "no cluster VM {id} runs on host {} (see GET /vms)",
                    self.host
                ),
            )
        })
    }

    /// Asks `id`'s VMM for `path` and answers the VM as it is afterwards.
    fn act(&self, id: &str, path: &str, body: Option<Vec<u8>>) -> Result<HostVm, ApiError> {
        self.find(id)?;
        let socket = runtime::vm_dir(&self.runtime, id).join("api.sock");
        VmmClient::new(&socket)
            .call::<VmInfo>("PUT", path, body)
            .map_err(|e| vmm_error(id, e))?;
        Ok(self.vm(id).unwrap_or(HostVm {
            id: id.to_string(),
            epoch: 0,
            state: Some(VmStateName::Terminated),
            pid: None,
            fenced: false,
            problem: None,
        }))
    }

    fn host_info(&self) -> HostInfo {
        let inv = Inventory::read();
        let (fenced, fence_in) = (self.lease)();
        HostInfo {
            host: self.host.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: API_VERSION.to_string(),
            inventory: HostInventory {
                cpus: self.cpus.unwrap_or(inv.cpus),
                memory_mib: inv.memory_mib,
                numa_nodes: inv.numa_nodes,
                gpus: gpus(Path::new("/sys/bus/pci/devices")),
            },
            health: health(&self.runtime),
            lease: HostLease {
                state: if fenced {
                    LeaseState::Fenced
                } else {
                    LeaseState::Fresh
                },
                fence_in_ms: if fenced {
                    0
                } else {
                    fence_in.as_millis() as u64
                },
                ttl_ms: self.lease_ttl.as_millis() as u64,
            },
            vms: self.vms().len(),
        }
    }
}

/// The display controllers (PCI class 03) under `devices` (sysfs).
fn gpus(devices: &Path) -> Vec<HostGpu> {
    let read = |dir: &Path, f: &str| {
        std::fs::read_to_string(dir.join(f))
            .ok()
            .map(|s| s.trim().trim_start_matches("0x").to_string())
    };
    let mut gpus: Vec<HostGpu> = std::fs::read_dir(devices)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            let class = read(&dir, "class")?;
            if !class.starts_with("03") {
                return None;
            }
            Some(HostGpu {
                address: e.file_name().to_string_lossy().into_owned(),
                id: format!("{}:{}", read(&dir, "vendor")?, read(&dir, "device")?),
            })
        })
        .collect();
    gpus.sort_by(|a, b| a.address.cmp(&b.address));
    gpus
}

/// The host's health checks.
fn health(runtime: &Path) -> HostHealth {
    let mut problems = Vec::new();
    let kvm = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            problems.push(format!("/dev/kvm cannot be opened: {e}"));
            false
        }
    };
    let probe = runtime.join(format!(".agent-health-{}", std::process::id()));
    let runtime_dir = match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            true
        }
        Err(e) => {
            problems.push(format!(
                "the runtime directory {} is not writable: {e}",
                runtime.display()
            ));
            false
        }
    };
    HostHealth {
        ok: problems.is_empty(),
        kvm,
        runtime_dir,
        problems,
    }
}

// ---- handlers ---------------------------------------------------------------------------

/// This host: inventory, health, lease
#[utoipa::path(get, path = "/host", tag = "host", responses(
    (status = 200, description = "The host as its agent sees it.", body = HostInfo)))]
async fn get_host(State(a): State<AgentApi>) -> ApiResult<HostInfo> {
    Ok(Json(blocking(move || a.host_info()).await?))
}

/// The cluster VMs whose VMM lives on this host
#[utoipa::path(get, path = "/vms", tag = "vms", responses(
    (status = 200, description = "This host's cluster VMs, sorted by id.", body = Vec<HostVm>)))]
async fn get_vms(State(a): State<AgentApi>) -> ApiResult<Vec<HostVm>> {
    Ok(Json(blocking(move || a.vms()).await?))
}

/// One of this host's cluster VMs
#[utoipa::path(get, path = "/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "The VM's name.")),
    responses(
        (status = 200, description = "The VM.", body = HostVm),
        (status = 400, description = "`invalid_request`: not a valid VM name.", body = ErrorBody),
        (status = 404, description = "`not_found`: no cluster VM of that name runs on this host.", body = ErrorBody)))]
async fn get_vm(State(a): State<AgentApi>, UrlPath(id): UrlPath<String>) -> ApiResult<HostVm> {
    Ok(Json(blocking(move || a.find(&id)).await??))
}

/// This host's NUMA summary
///
/// Nodes, CPUs and memory from sysfs, and over every live VM on this host (cluster or
/// not): how many have guest nodes, attribution and the migration policy, bytes moved and
/// moves pending. `ray numa status --json` prints the same.
#[utoipa::path(get, path = "/numa/status", tag = "host", responses(
    (status = 200, description = "The summary.", body = NumaHostStatus),
    (status = 500, description = "`failed`: this host's NUMA topology could not be read.", body = ErrorBody)))]
async fn get_numa_status(State(a): State<AgentApi>) -> ApiResult<NumaHostStatus> {
    let runtime = a.runtime.clone();
    Ok(Json(
        blocking(move || crate::numa_cmd::host_status(&runtime))
            .await?
            .map_err(failed)?,
    ))
}

/// This host's NUMA nodes
///
/// Each online node: CPUs, memory total and free, distances, huge pages (sysfs).
/// `ray numa nodes -o json` prints the same.
#[utoipa::path(get, path = "/numa/nodes", tag = "host", responses(
    (status = 200, description = "The nodes, by id.", body = Vec<NumaHostNode>),
    (status = 500, description = "`failed`: this host's NUMA topology could not be read.", body = ErrorBody)))]
async fn get_numa_nodes(State(_a): State<AgentApi>) -> ApiResult<Vec<NumaHostNode>> {
    Ok(Json(
        blocking(crate::numa_cmd::host_nodes)
            .await?
            .map_err(failed)?,
    ))
}

/// Each VM's NUMA on this host
///
/// Every live VM on this host (cluster or not): its guest nodes' binding, locality,
/// pages written per guest node, migration policy, bytes moved and moves pending.
/// `ray numa vms -o json` prints the same.
#[utoipa::path(get, path = "/numa/vms", tag = "host", responses(
    (status = 200, description = "The VMs, by id.", body = Vec<NumaHostVm>)))]
async fn get_numa_vms(State(a): State<AgentApi>) -> ApiResult<Vec<NumaHostVm>> {
    let runtime = a.runtime.clone();
    Ok(Json(
        blocking(move || {
            crate::numa_cmd::live_vms(&runtime)
                .iter()
                .map(crate::numa_cmd::row)
                .collect()
        })
        .await?,
    ))
}

/// Pause a VM's vCPUs
#[utoipa::path(post, path = "/vms/{id}/pause", tag = "vms",
    params(("id" = String, Path, description = "The VM's name.")),
    responses(
        (status = 200, description = "Paused.", body = HostVm),
        (status = 400, description = "`invalid_request`: a body was sent (none is taken), or not a valid VM name.", body = ErrorBody),
        (status = 404, description = "`not_found`: no cluster VM of that name runs on this host.", body = ErrorBody),
        (status = 409, description = "`wrong_state`: the VM is not running.", body = ErrorBody)))]
async fn post_pause(
    State(a): State<AgentApi>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body,
) -> ApiResult<HostVm> {
    act_without_body(a, id, "pause", body).await
}

/// Resume a paused VM
///
/// A VM its own local lease fenced resumes only once the agent renewed that lease.
#[utoipa::path(post, path = "/vms/{id}/resume", tag = "vms",
    params(("id" = String, Path, description = "The VM's name.")),
    responses(
        (status = 200, description = "Running.", body = HostVm),
        (status = 400, description = "`invalid_request`: a body was sent (none is taken), or not a valid VM name.", body = ErrorBody),
        (status = 404, description = "`not_found`: no cluster VM of that name runs on this host.", body = ErrorBody),
        (status = 409, description = "`wrong_state`: the VM is not paused, or is fenced.", body = ErrorBody)))]
async fn post_resume(
    State(a): State<AgentApi>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body,
) -> ApiResult<HostVm> {
    act_without_body(a, id, "resume", body).await
}

/// `POST /vms/{id}/ACTION` with no body: the VMM's `/vm/ACTION`.
async fn act_without_body(
    a: AgentApi,
    id: String,
    action: &'static str,
    body: axum::body::Bytes,
) -> ApiResult<HostVm> {
    expect_no_body(&format!("POST /vms/{id}/{action}"), &body)?;
    Ok(Json(
        blocking(move || a.act(&id, &format!("/vm/{action}"), None)).await??,
    ))
}

/// Stop a VM's VMM
///
/// The operator's stop: the VM stays the cluster's (its run token still names this host),
/// so the agent starts it again when it next reconciles; `ray cluster vm delete` removes a
/// VM for good.
#[utoipa::path(post, path = "/vms/{id}/stop", tag = "vms",
    params(("id" = String, Path, description = "The VM's name.")),
    request_body(content = Option<HostVmStop>, description = "Optional: no body means the defaults."),
    responses(
        (status = 200, description = "Stopped.", body = HostVm),
        (status = 400, description = "`invalid_request`: the body is not a valid stop request (e.g. an unknown field), or not a valid VM name.", body = ErrorBody),
        (status = 404, description = "`not_found`: no cluster VM of that name runs on this host.", body = ErrorBody),
        (status = 409, description = "`wrong_state`: the VM has ended already.", body = ErrorBody)))]
async fn post_stop(
    State(a): State<AgentApi>,
    UrlPath(id): UrlPath<String>,
    Body(body): Body,
) -> ApiResult<HostVm> {
    let endpoint = format!("POST /vms/{id}/stop");
    let stop: HostVmStop = if body.trim_ascii().is_empty() {
        HostVmStop::default()
    } else {
        parse_body(&endpoint, &body)?
    };
    let req = StopRequest {
        timeout_ms: stop.timeout_ms.unwrap_or(2000),
    };
    let body = serde_json::to_vec(&req).map_err(failed)?;
    Ok(Json(
        blocking(move || a.act(&id, "/vm/stop", Some(body))).await??,
    ))
}

/// This OpenAPI document
#[utoipa::path(get, path = "/openapi.json", tag = "meta", responses(
    (status = 200, description = "This document.", content_type = "application/json", body = Object)))]
async fn get_openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json())
}

// ---- the document and the router --------------------------------------------------------

#[derive(OpenApi)]
#[openapi(
    info(
        title = "rayvisor per-host agent API",
        description = "Served by `ray agent` (one per host) on the Unix socket `api.sock` in its state directory (mode 0600, no token), and on TCP when started with `--api-tcp ADDR --api-token-file FILE`. Over TCP every request needs `Authorization: Bearer <token>` (the token in that file); without it, or with another, the answer is 401 `unauthorized`. Every error answer is an `ErrorBody`: a stable `code` for programs and a `message` for people. The VMs are the cluster's VMs whose VMM runs on this host.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    tags(
        (name = "host", description = "The host: inventory, health, lease."),
        (name = "vms", description = "The cluster VMs on this host: list, pause, resume, stop."),
        (name = "meta", description = "About the API itself.")
    ),
    components(schemas(ErrorCode, ErrorBody))
)]
struct ApiDoc;

fn routes() -> OpenApiRouter<AgentApi> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(get_host))
        .routes(routes!(get_vms))
        .routes(routes!(get_vm))
        .routes(routes!(post_pause))
        .routes(routes!(post_resume))
        .routes(routes!(post_stop))
        .routes(routes!(get_numa_status))
        .routes(routes!(get_numa_nodes))
        .routes(routes!(get_numa_vms))
        .routes(routes!(get_openapi))
}

/// The agent API's OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    let (_, mut doc) = routes().split_for_parts();
    doc.info.version = API_VERSION.to_string();
    let unauthorized = ray_vmm::api_server::error_response(
        "`unauthorized`: over TCP, no `Authorization: Bearer` header with the agent's token.",
    );
    let too_large =
        ray_vmm::api_server::error_response("`payload_too_large`: the body is over 16 KiB.");
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            "agent_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Over TCP: the token in the agent's `--api-token-file`. The Unix socket needs none.",
                    ))
                    .build(),
            ),
        );
    doc.security = Some(vec![SecurityRequirement::new(
        "agent_token",
        Vec::<String>::new(),
    )]);
    for item in doc.paths.paths.values_mut() {
        for op in [&mut item.get, &mut item.post].into_iter().flatten() {
            op.responses
                .responses
                .insert("401".to_string(), unauthorized.clone().into());
        }
        if let Some(op) = item.post.as_mut() {
            op.responses
                .responses
                .insert("413".to_string(), too_large.clone().into());
        }
    }
    doc
}

/// The agent API's OpenAPI document as pretty JSON.
pub fn openapi_json() -> String {
    ray_vmm::api_server::pretty_openapi(&openapi())
}

pub fn router(api: AgentApi) -> Router {
    let (router, _) = routes().split_for_parts();
    router
        .fallback(ray_vmm::api_server::unknown_endpoint)
        .method_not_allowed_fallback(ray_vmm::api_server::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(api)
}

// ---- authentication ---------------------------------------------------------------------

/// The bearer token of the TCP listener, read from `--api-token-file`.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl Token {
    /// Reads and checks a token file: readable by its owner only, one token of 16 to 256
    /// characters out of `A-Z a-z 0-9 - _ . ~ + / =`.
    pub fn load(path: &Path) -> anyhow::Result<Token> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| anyhow::anyhow!("cannot read the token file {}: {e}", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "the token file {} is readable by group or others (mode {mode:o}): make it 0600",
                path.display()
            );
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read the token file {}: {e}", path.display()))?;
        Token::parse(&text).map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))
    }

    /// A token from a file's text (surrounding white space ignored).
    pub fn parse(text: &str) -> Result<Token, String> {
        let t = text.trim();
        if !(MIN_TOKEN..=MAX_TOKEN).contains(&t.len()) {
            return Err(format!(
                "the token has {} characters: it needs {MIN_TOKEN} to {MAX_TOKEN}",
                t.len()
            ));
        }
        if let Some(c) = t
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "-_.~+/=".contains(*c)))
        {
            return Err(format!(
                "the token contains {c:?}: use A-Z a-z 0-9 - _ . ~ + / ="
            ));
        }
        Ok(Token(t.as_bytes().to_vec()))
    }

    /// The token as a header value would carry it.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Whether `header` (an `Authorization` value) is `Bearer <this token>`. The time it
    /// takes depends on neither where the first difference is nor the given token's length
    /// (every comparison runs over [`MAX_TOKEN`] bytes).
    pub fn admits(&self, header: &str) -> bool {
        let Some(given) = header.strip_prefix("Bearer ") else {
            return false;
        };
        let given = given.trim().as_bytes();
        let mut diff = u8::from(given.len() != self.0.len());
        for i in 0..MAX_TOKEN {
            let a = given.get(i).copied().unwrap_or(0);
            let b = self.0.get(i).copied().unwrap_or(0);
            diff |= a ^ b;
        }
        std::hint::black_box(diff) == 0
    }
}

/// The TCP listener's authentication.
async fn bearer_token_only(
    State(token): State<Token>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    if given.is_some_and(|g| token.admits(g)) {
        return next.run(request).await;
    }
    ray_vmm::api_server::unauthorized(
        given.is_some(),
        "this agent's token",
        "the agent's --api-token-file",
        "Bearer realm=\"rayvisor-agent\"",
    )
}

/// The router behind the TCP listener: every request authenticated first.
pub fn tcp_router(api: AgentApi, token: Token) -> Router {
    router(api).layer(axum::middleware::from_fn_with_state(
        token,
        bearer_token_only,
    ))
}

/// The API's listeners, bound (so a bad address fails before the agent joins).
pub struct Listeners {
    unix: tokio::net::UnixListener,
    socket: PathBuf,
    tcp: Option<(tokio::net::TcpListener, Token)>,
}

impl Listeners {
    /// Binds `<state_dir>/api.sock` (mode 0600) and, if asked, `tcp` with its token.
    pub fn bind(state_dir: &Path, tcp: Option<(SocketAddr, Token)>) -> anyhow::Result<Listeners> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(state_dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", state_dir.display()))?;
        let tcp = match tcp {
            Some((addr, token)) => {
                let l = std::net::TcpListener::bind(addr)
                    .map_err(|e| anyhow::anyhow!("--api-tcp {addr}: cannot listen: {e}"))?;
                l.set_nonblocking(true)?;
                Some((tokio::net::TcpListener::from_std(l)?, token))
            }
            None => None,
        };
        let socket = state_dir.join(SOCKET);
        let _ = std::fs::remove_file(&socket);
        let unix = std::os::unix::net::UnixListener::bind(&socket)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", socket.display()))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        unix.set_nonblocking(true)?;
        Ok(Listeners {
            unix: tokio::net::UnixListener::from_std(unix)?,
            socket,
            tcp,
        })
    }

    /// The TCP address served, if any (the port chosen for port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves both listeners until the process ends.
    pub async fn serve(self, api: AgentApi) {
        tracing::info!(socket = %self.socket.display(), tcp = ?self.tcp_addr(), "agent API up");
        if let Some((l, token)) = self.tcp {
            let app = tcp_router(api.clone(), token);
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    tracing::error!("the agent API on TCP ended: {e}");
                }
            });
        }
        if let Err(e) = axum::serve(self.unix, router(api)).await {
            tracing::error!("the agent API socket ended: {e}");
        }
    }
}

// ---- the client (`ray node status|vms`) --------------------------------------------------

/// Where an agent's API is: `unix:PATH` or `http://HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAddr {
    Unix(PathBuf),
    Tcp(String),
}

impl std::str::FromStr for AgentAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(
                    "--agent unix: needs a socket path, e.g. unix:/run/rayvisor/agent/api.sock"
                        .into(),
                );
            }
            return Ok(AgentAddr::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("http://") {
            let authority = rest.trim_end_matches('/');
            if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
                return Err(format!("--agent {s}: expected http://HOST:PORT (no path)"));
            }
            return Ok(AgentAddr::Tcp(authority.to_string()));
        }
        Err(format!(
            "--agent {s}: expected unix:PATH or http://HOST:PORT"
        ))
    }
}

impl std::fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            AgentAddr::Tcp(a) => write!(f, "http://{a}"),
        }
    }
}

/// A client of one agent's API.
pub struct AgentClient {
    addr: AgentAddr,
    token: Option<Token>,
}

async fn exchange<T>(
    io: T,
    request: hyper::Request<http_body_util::Full<hyper::body::Bytes>>,
) -> Result<(u16, hyper::body::Bytes), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = tokio::time::timeout(Duration::from_secs(60), sender.send_request(request))
        .await
        .map_err(|_| "no answer within 60 s".to_string())?
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

impl AgentClient {
    pub fn new(addr: AgentAddr, token: Option<Token>) -> AgentClient {
        AgentClient { addr, token }
    }

    /// Sends one request; a 2xx answer is decoded as `T`, a 4xx/5xx becomes
    /// [`ClientError::Api`] with the agent's code and message.
    pub fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
    ) -> Result<T, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            path: PathBuf::from(self.addr.to_string()),
            reason,
        };
        let host = match &self.addr {
            AgentAddr::Unix(_) => "localhost".to_string(),
            AgentAddr::Tcp(a) => a.clone(),
        };
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        if let Some(t) = &self.token {
            request = request.header("authorization", format!("Bearer {}", t.as_str()));
        }
        let request = request
            .body(http_body_util::Full::new(hyper::body::Bytes::new()))
            .map_err(|e| unreachable(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| unreachable(e.to_string()))?;
        let (status, body) = rt
            .block_on(async {
                let connect = Duration::from_secs(5);
                match &self.addr {
                    AgentAddr::Unix(p) => {
                        let s = tokio::time::timeout(connect, tokio::net::UnixStream::connect(p))
                            .await
                            .map_err(|_| "connect timed out".to_string())?
                            .map_err(|e| e.to_string())?;
                        exchange(s, request).await
                    }
                    AgentAddr::Tcp(a) => {
                        let s = tokio::time::timeout(connect, tokio::net::TcpStream::connect(a))
                            .await
                            .map_err(|_| "connect timed out".to_string())?
                            .map_err(|e| e.to_string())?;
                        exchange(s, request).await
                    }
                }
            })
            .map_err(unreachable)?;
        if status >= 400 {
            return Err(ray::client::api_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer {
            path: PathBuf::from(self.addr.to_string()),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_openapi_document_is_current() {
        let committed = include_str!("../../../docs/openapi/agent.json");
        let current = openapi_json();
        assert!(
            committed.trim_end() == current.trim_end(),
            "docs/openapi/agent.json is stale: regenerate it with `target/debug/ray openapi agent > docs/openapi/agent.json`"
        );
        let doc: serde_json::Value = serde_json::from_str(&current).unwrap();
        for path in [
            "/host",
            "/vms",
            "/vms/{id}",
            "/vms/{id}/pause",
            "/vms/{id}/resume",
            "/vms/{id}/stop",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} is not documented");
        }
    }

    #[test]
    fn tokens_are_checked_and_compared_whole() {
        let t = Token::parse("  s3cret-token-0123456789\n").unwrap();
        assert!(t.admits("Bearer s3cret-token-0123456789"));
        for wrong in [
            "Bearer s3cret-token-012345678",
            "Bearer s3cret-token-01234567890",
            "Bearer S3cret-token-0123456789",
            "Bearer ",
            "s3cret-token-0123456789",
            "Basic s3cret-token-0123456789",
        ] {
            assert!(!t.admits(wrong), "{wrong} was admitted");
        }
        let e = Token::parse("short").err().unwrap();
        assert!(e.contains("5 characters"), "{e}");
        let e = Token::parse("0123456789abcdef<").err().unwrap();
        assert!(e.contains("'<'"), "{e}");
    }

    /// One HTTP/1.1 request over TCP, as any client could send it: status and body.
    fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        // A refusal may come before the whole body was read (then the close may reset
        // the connection): keep what arrived.
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buf[..n]);
        }
        let answer = String::from_utf8_lossy(&bytes).into_owned();
        let status = answer[9..12].parse().unwrap();
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (status, body.to_string())
    }

    fn post(path: &str, token: &str, body: &str) -> String {
        format!(
            "POST {path} HTTP/1.1\r\nHost: h1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn routes_refusals_and_tcp_authentication() {
        let dir = std::env::temp_dir().join(format!("ray-agent-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let runtime = dir.join("run");
        std::fs::create_dir_all(runtime.join("vms")).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let secret = "test-token-0123456789";
        let token = Token::parse(secret).unwrap();
        let api = AgentApi {
            host: "h1".into(),
            runtime: runtime.clone(),
            lease: std::sync::Arc::new(|| (false, Duration::from_millis(2500))),
            lease_ttl: Duration::from_secs(4),
            cpus: None,
        };
        let state = dir.join("state");
        let listeners = rt
            .block_on(async {
                Listeners::bind(
                    &state,
                    Some(("127.0.0.1:0".parse().unwrap(), token.clone())),
                )
            })
            .unwrap();
        let tcp = listeners.tcp_addr().unwrap();
        rt.spawn(listeners.serve(api));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join(SOCKET))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // The Unix socket needs no token; TCP with the token answers the same.
        let unix = AgentClient::new(AgentAddr::Unix(state.join(SOCKET)), None);
        let info: HostInfo = unix.call("GET", "/host").unwrap();
        assert_eq!((info.host.as_str(), info.vms), ("h1", 0));
        assert_eq!(info.lease.state, LeaseState::Fresh);
        assert_eq!((info.lease.fence_in_ms, info.lease.ttl_ms), (2500, 4000));
        assert!(info.inventory.cpus >= 1 && info.inventory.memory_mib > 0);
        let good = AgentClient::new(AgentAddr::Tcp(tcp.to_string()), Some(token));
        assert_eq!(good.call::<HostInfo>("GET", "/host").unwrap().host, "h1");
        assert!(good.call::<Vec<HostVm>>("GET", "/vms").unwrap().is_empty());

        // TCP without the token, or with another: 401, saying which.
        let code = |e: ClientError| (e.code(), e.to_string());
        let none = AgentClient::new(AgentAddr::Tcp(tcp.to_string()), None);
        let (c, m) = code(none.call::<HostInfo>("GET", "/host").unwrap_err());
        assert_eq!(c, Some(ErrorCode::Unauthorized), "{m}");
        assert!(m.contains("Authorization: Bearer"), "{m}");
        let wrong = AgentClient::new(
            AgentAddr::Tcp(tcp.to_string()),
            Some(Token::parse("test-token-0123456780").unwrap()),
        );
        let (c, m) = code(wrong.call::<HostInfo>("GET", "/host").unwrap_err());
        assert_eq!(c, Some(ErrorCode::Unauthorized), "{m}");
        assert!(m.contains("does not carry this agent's token"), "{m}");
        // Authentication comes before anything else: an unknown path says 401 too.
        let (c, _) = code(none.call::<HostInfo>("GET", "/nothing").unwrap_err());
        assert_eq!(c, Some(ErrorCode::Unauthorized));

        // Routing: unknown VM, invalid name, unknown path, wrong method.
        let (c, m) = code(good.call::<HostVm>("GET", "/vms/nope").unwrap_err());
        assert_eq!(c, Some(ErrorCode::NotFound), "{m}");
        assert!(m.contains("nope") && m.contains("host h1"), "{m}");
        let (c, m) = code(good.call::<HostVm>("POST", "/vms/nope/pause").unwrap_err());
        assert_eq!(c, Some(ErrorCode::NotFound), "{m}");
        let (c, m) = code(good.call::<HostVm>("GET", "/vms/-x").unwrap_err());
        assert_eq!(c, Some(ErrorCode::InvalidRequest), "{m}");
        assert!(m.contains("'-x'"), "{m}");
        let (c, _) = code(good.call::<HostVm>("GET", "/nothing").unwrap_err());
        assert_eq!(c, Some(ErrorCode::UnknownEndpoint));
        let (c, _) = code(good.call::<HostVm>("DELETE", "/host").unwrap_err());
        assert_eq!(c, Some(ErrorCode::MethodNotAllowed));

        // Bodies: an unknown field and bad JSON are named; a body where none is taken,
        // and one over the limit, are refused.
        let (status, body) = raw(
            tcp,
            &post("/vms/nope/stop", secret, r#"{"timeout_ms":5,"force":true}"#),
        );
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("unknown field `force`"), "{body}");
        let (status, body) = raw(tcp, &post("/vms/nope/stop", secret, r#"{"timeout_ms":"#));
        assert_eq!(status, 400, "{body}");
        assert!(
            body.contains("invalid JSON body for POST /vms/nope/stop"),
            "{body}"
        );
        let (status, body) = raw(tcp, &post("/vms/nope/pause", secret, r#"{"now":1}"#));
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("takes no body"), "{body}");
        let big = format!("{{\"timeout_ms\":1{}}}", " ".repeat(BODY_LIMIT));
        let (status, body) = raw(tcp, &post("/vms/nope/stop", secret, &big));
        assert_eq!(status, 413, "{body}");
        assert!(body.contains("payload_too_large"), "{body}");
        drop(rt);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn agent_addresses_parse_or_say_why() {
        assert_eq!(
            "unix:/run/a.sock".parse::<AgentAddr>(),
            Ok(AgentAddr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "http://10.0.0.2:7450".parse::<AgentAddr>(),
            Ok(AgentAddr::Tcp("10.0.0.2:7450".into()))
        );
        for bad in ["10.0.0.2:7450", "http://h/x", "unix:", "https://h:1"] {
            let e = bad.parse::<AgentAddr>().unwrap_err();
            assert!(
                e.contains(bad.trim_end_matches('/')) || e.contains("unix:"),
                "{e}"
            );
        }
    }
}
