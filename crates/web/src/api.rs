//! The web server's HTTP API (`/api/...`): login, the VM list and its live stream, reads
//! and actions relayed to each VM's VMM, with every request's role checked here.
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};

use crate::actions::{self, MigrationRecord};
use crate::vmm::{self, Answer};
use crate::{assets, bridge, h264, hosts, Presence, Role, User, VmEntry, WebOptions};

/// The cookie a login sets.
pub const COOKIE: &str = "ray_web";

/// The server's state: its options and the migrations it started.
pub struct Web {
    pub opts: WebOptions,
    pub migrations: Mutex<HashMap<String, MigrationRecord>>,
}

impl Web {
    pub fn new(opts: WebOptions) -> Web {
        Web {
            opts,
            migrations: Mutex::new(HashMap::new()),
        }
    }

    /// The VM `id` of the runtime directory.
    pub fn vm(&self, id: &str) -> Result<VmEntry, Refusal> {
        self.opts
            .inventory
            .vms()
            .into_iter()
            .find(|v| v.id == id)
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("there is no VM '{id}' on this host"),
                )
            })
    }

    /// The VM `id`, which must have a running VMM.
    pub fn live_vm(&self, id: &str) -> Result<VmEntry, Refusal> {
        let vm = self.vm(id)?;
        match &vm.presence {
            Presence::Live => Ok(vm),
            Presence::Ended { state, .. } => Err(Refusal::new(
                StatusCode::CONFLICT,
                "wrong_state",
                format!("VM '{id}' has ended ({state}): its VMM no longer answers"),
            )),
            Presence::Dead => Err(Refusal::new(
                StatusCode::CONFLICT,
                "wrong_state",
                format!("VM '{id}' is dead: its VMM is gone"),
            )),
        }
    }

    /// The user a request's token stands for, if it may act as `need`.
    pub fn user(&self, headers: &HeaderMap, need: Role) -> Result<User, Refusal> {
        let token = bearer(headers).or_else(|| cookie(headers, COOKIE));
        let Some(user) = token.and_then(|t| self.opts.tokens.find(&t)) else {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "log in with a token from ray web's tokens file",
            ));
        };
        if user.role < need {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "{} is a {}: this needs the {} role",
                    user.name,
                    user.role.as_str(),
                    need.as_str()
                ),
            ));
        }
        Ok(user.clone())
    }
}

/// A refusal: HTTP status, a stable code and a sentence (the VMM API's error shape).
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn failed(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "failed", message)
    }
}

impl From<vmm::Unreachable> for Refusal {
    fn from(e: vmm::Unreachable) -> Refusal {
        Refusal::new(StatusCode::BAD_GATEWAY, "unreachable", e.to_string())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.code, "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

pub type Reply = Result<Response, Refusal>;

/// A VMM's answer passed on as is (status, content type, body).
pub fn relay(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut r = (status, answer.body).into_response();
    if let Some(ct) = answer
        .content_type
        .and_then(|c| HeaderValue::from_str(&c).ok())
    {
        r.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    r
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

pub fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/me", get(me))
        .route("/api/vms", get(list).post(actions::create))
        .route("/api/vms/stream", get(stream))
        .route("/api/hosts", get(hosts::list))
        .route("/api/hosts/stream", get(hosts::stream))
        .route("/api/hosts/{host}/{op}", post(hosts::act))
        .route("/api/vms/{id}", get(detail))
        .route("/api/vms/{id}/events", get(read_events))
        .route("/api/vms/{id}/gpus", get(read_gpus))
        .route("/api/vms/{id}/metrics", get(read_metrics))
        .route(
            "/api/vms/{id}/console",
            get(read_console).post(type_console),
        )
        .route(
            "/api/vms/{id}/snapshots",
            get(actions::snapshots).post(actions::snapshot),
        )
        .route(
            "/api/vms/{id}/snapshots/progress",
            get(read_snapshot_progress),
        )
        .route("/api/vms/{id}/restore", post(actions::restore))
        .route(
            "/api/vms/{id}/migration",
            get(actions::migration).post(actions::migrate),
        )
        .route("/api/vms/{id}/migration/cancel", post(actions::cancel))
        .route("/api/vms/{id}/display/{n}/screenshot.png", get(screenshot))
        .route("/api/vms/{id}/vnc/{n}", get(bridge::vnc))
        .route("/api/vms/{id}/h264/{n}", get(h264::stream))
        .route("/api/vms/{id}/serial", get(bridge::serial))
        .route("/api/vms/{id}/{action}", post(lifecycle))
        .fallback(assets::serve)
        .layer(axum::middleware::from_fn_with_state(web.clone(), guard))
        .with_state(web)
}

/// Refuses requests addressed to a name that is not loopback (DNS rebinding) when serving
/// plain HTTP (over TLS the certificate binds the name: a browser sent to this server
/// under another name refuses the certificate), and requests that change something or
/// open a WebSocket from a page of another origin.
async fn guard(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if web.opts.tls.is_none() && !ray_vmm::api_server::is_loopback_host(host) {
        return Refusal::new(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            format!("Host {host:?} is not a loopback name: ray web answers only requests addressed to localhost, 127.0.0.0/8 or [::1]"),
        )
        .into_response();
    }
    let changes = request.method() != Method::GET || headers.contains_key(header::UPGRADE);
    if changes {
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
            let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
            if origin_host != host {
                return Refusal::new(
                    StatusCode::FORBIDDEN,
                    "forbidden_origin",
                    format!("a page from {origin} may not act on ray web at {host}"),
                )
                .into_response();
            }
        }
    }
    next.run(request).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

/// A request body: a JSON object (an empty body is `{}`; serde would also fill a struct
/// from an array of its fields, which no client means).
fn parse<T: serde::de::DeserializeOwned>(what: &str, body: &Bytes) -> Result<T, Refusal> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(Refusal::invalid(format!(
            "{what}: the body must be a JSON object"
        )));
    }
    serde_json::from_slice(body).map_err(|e| Refusal::invalid(format!("{what}: {e}")))
}

pub fn parse_body<T: serde::de::DeserializeOwned>(what: &str, body: &Bytes) -> Result<T, Refusal> {
    parse(what, body)
}

async fn login(State(web): State<Arc<Web>>, body: Bytes) -> Reply {
    let login: Login = parse("POST /api/login", &body)?;
    let Some(user) = web.opts.tokens.find(&login.token).cloned() else {
        tracing::warn!("ray web: a login with an unknown token");
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this token is not in ray web's tokens file",
        ));
    };
    tracing::info!(
        user = user.name,
        role = user.role.as_str(),
        "ray web: login"
    );
    // Over TLS the browser must never send the token in clear.
    let secure = if web.opts.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{secure}",
        login.token
    );
    let mut r = Json(user).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| Refusal::failed(e.to_string()))?,
    );
    Ok(r)
}

async fn logout() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("ray_web=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

async fn me(State(web): State<Arc<Web>>, headers: HeaderMap) -> Reply {
    Ok(Json(web.user(&headers, Role::Viewer)?).into_response())
}

/// One line of the VM list.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmSummary {
    pub id: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Every VM with its state, asking each live VMM (`GET /vm`).
async fn summaries(web: &Web) -> Vec<VmSummary> {
    let mut out = Vec::new();
    for vm in web.opts.inventory.vms() {
        let mut s = VmSummary {
            id: vm.id.clone(),
            state: String::new(),
            uptime_ms: None,
            vcpus: None,
            memory_bytes: None,
            reason: None,
        };
        match &vm.presence {
            Presence::Live => {
                match vmm::get_json::<ray_api::vmm::VmInfo>(&vm.dir.join("api.sock"), "/vm").await {
                    Some(info) => {
                        s.state = info.state.as_str().to_string();
                        s.uptime_ms = Some(info.uptime_ms);
                        s.vcpus = info.config.as_ref().map(|c| c.vcpus);
                        s.memory_bytes = info.config.as_ref().map(|c| c.memory_bytes);
                        s.reason = info.exit_reason;
                    }
                    None => s.state = "unreachable".into(),
                }
            }
            Presence::Ended { state, reason } => {
                s.state = state.as_str().to_string();
                s.reason = reason.clone();
            }
            Presence::Dead => s.state = "dead".into(),
        }
        out.push(s);
    }
    out
}

async fn list(State(web): State<Arc<Web>>, headers: HeaderMap) -> Reply {
    web.user(&headers, Role::Viewer)?;
    Ok(Json(summaries(&web).await).into_response())
}

/// How often the live list asks the VMMs.
const STREAM_PERIOD: Duration = Duration::from_millis(500);

/// Server-sent events: a `vms` event with the whole list whenever it changes (uptime
/// aside), and a comment every 15 s to keep the connection open.
async fn stream(State(web): State<Arc<Web>>, headers: HeaderMap) -> Reply {
    web.user(&headers, Role::Viewer)?;
    let state = (web, None::<Vec<VmSummary>>, 0u32);
    let events = futures_util::stream::unfold(state, |(web, last, idle)| async move {
        let mut idle = idle;
        loop {
            let now = summaries(&web).await;
            let key = |l: &[VmSummary]| {
                l.iter()
                    .map(|s| (s.id.clone(), s.state.clone()))
                    .collect::<Vec<_>>()
            };
            if last.as_deref().map(key) != Some(key(&now)) {
                let data = serde_json::to_string(&now).unwrap_or_else(|_| "[]".into());
                let chunk = format!("event: vms\ndata: {data}\n\n");
                return Some((Ok::<_, Infallible>(Bytes::from(chunk)), (web, Some(now), 0)));
            }
            idle += 1;
            if idle * STREAM_PERIOD.as_millis() as u32 >= 15_000 {
                return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), (web, last, 0)));
            }
            tokio::time::sleep(STREAM_PERIOD).await;
        }
    });
    let mut r = axum::body::Body::from_stream(events).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// Relays `GET path` to the live VM `id`, for a viewer or more.
async fn relay_get(web: &Web, headers: &HeaderMap, id: &str, path: &str) -> Reply {
    web.user(headers, Role::Viewer)?;
    let vm = web.live_vm(id)?;
    Ok(relay(
        vmm::call(&vm.dir.join("api.sock"), "GET", path, None).await?,
    ))
}

async fn detail(State(web): State<Arc<Web>>, headers: HeaderMap, Path(id): Path<String>) -> Reply {
    web.user(&headers, Role::Viewer)?;
    let vm = web.vm(&id)?;
    match vm.presence {
        Presence::Live => relay_get(&web, &headers, &id, "/vm").await,
        Presence::Ended { state, reason } => Ok(Json(serde_json::json!({
            "id": id, "state": state.as_str(), "exit_reason": reason
        }))
        .into_response()),
        Presence::Dead => {
            Ok(Json(serde_json::json!({ "id": id, "state": "dead" })).into_response())
        }
    }
}

async fn read_events(State(web): State<Arc<Web>>, h: HeaderMap, Path(id): Path<String>) -> Reply {
    relay_get(&web, &h, &id, "/vm/events").await
}

async fn read_gpus(State(web): State<Arc<Web>>, h: HeaderMap, Path(id): Path<String>) -> Reply {
    relay_get(&web, &h, &id, "/vm/gpus").await
}

async fn read_metrics(State(web): State<Arc<Web>>, h: HeaderMap, Path(id): Path<String>) -> Reply {
    relay_get(&web, &h, &id, "/metrics").await
}

async fn read_snapshot_progress(
    State(web): State<Arc<Web>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Reply {
    relay_get(&web, &h, &id, "/vm/snapshot/progress").await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TailQuery {
    bytes: Option<u64>,
}

async fn read_console(
    State(web): State<Arc<Web>>,
    h: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TailQuery>,
) -> Reply {
    let path = match q.bytes {
        Some(n) => format!("/vm/console?bytes={n}"),
        None => "/vm/console".to_string(),
    };
    relay_get(&web, &h, &id, &path).await
}

/// Types into the serial console (`POST /vm/console`, the body as the VMM takes it).
async fn type_console(
    State(web): State<Arc<Web>>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply {
    let input: ray_api::vmm::ConsoleInput = parse("POST console", &body)?;
    act(
        &web,
        &h,
        &id,
        Role::Operator,
        "POST",
        "/vm/console",
        Some(serde_json::to_vec(&input).map_err(|e| Refusal::failed(e.to_string()))?),
    )
    .await
}

async fn screenshot(
    State(web): State<Arc<Web>>,
    h: HeaderMap,
    Path((id, n)): Path<(String, String)>,
) -> Reply {
    let n: u32 = n.parse().map_err(|_| {
        Refusal::invalid(format!("display '{n}' is not a display number (0, 1, ...)"))
    })?;
    relay_get(&web, &h, &id, &format!("/vm/display/{n}/screenshot.png")).await
}

/// Sends an action to the live VM `id` once the user is at least `need`; logs who did it.
pub async fn act(
    web: &Web,
    headers: &HeaderMap,
    id: &str,
    need: Role,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Reply {
    let user = web.user(headers, need)?;
    let vm = web.live_vm(id)?;
    tracing::info!(user = user.name, vm = id, method, path, "ray web: action");
    Ok(relay(
        vmm::call(&vm.dir.join("api.sock"), method, path, body).await?,
    ))
}

/// `POST /api/vms/{id}/start|pause|resume|stop`: the VMM's `PUT /vm/<action>`.
async fn lifecycle(
    State(web): State<Arc<Web>>,
    h: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> Reply {
    web.user(&h, Role::Operator)?;
    let path = match action.as_str() {
        "start" | "pause" | "resume" | "stop" => format!("/vm/{action}"),
        other => {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "unknown_action",
                format!("'{other}' is not an action: use start, pause, resume or stop"),
            ))
        }
    };
    act(&web, &h, &id, Role::Operator, "PUT", &path, None).await
}
