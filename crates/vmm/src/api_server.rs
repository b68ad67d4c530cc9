//! The per-VM HTTP/JSON API on a Unix socket. Each handler parses its request into a
//! typed [`Request`] and hands it to the VMM thread; it never touches VM state itself.
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, put};
use axum::{Json, Router};
use ray_api::vmm::{
    ConsoleInput, ErrorBody, MigrateRequest, SnapshotDelete, SnapshotMerge, SnapshotRequest,
    StopRequest, VmConfig,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::controller::{ControllerError, Message, Request, Response};
use crate::devices::ConsoleRing;

#[derive(Clone)]
struct Api {
    inbox: Sender<Message>,
    ring: Arc<ConsoleRing>,
    meter: Arc<crate::snapshot::Meter>,
}

fn error(status: u16, message: impl Into<String>) -> HttpResponse {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// The HTTP status of a controller error: the one place the two meet.
fn http_status(e: &ControllerError) -> u16 {
    match e {
        ControllerError::Invalid(_) => 400,
        ControllerError::NotFound(_) => 404,
        ControllerError::Refused(_) => 409,
        ControllerError::Failed(_) => 500,
    }
}

fn controller_error(e: ControllerError) -> HttpResponse {
    error(http_status(&e), e.to_string())
}

/// Parses a JSON body, naming the endpoint and serde's account of what was wrong.
pub fn parse_body<T: DeserializeOwned>(endpoint: &str, body: &[u8]) -> Result<T, ControllerError> {
    if body.is_empty() {
        return Err(ControllerError::invalid(format!(
            "{endpoint} needs a JSON body, and the request had none"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|e| ControllerError::invalid(format!("invalid JSON body for {endpoint}: {e}")))
}

impl Api {
    async fn call(&self, request: Request) -> HttpResponse {
        let (tx, rx) = oneshot::channel();
        let reply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        if self.inbox.send(Message::Api(request, reply)).is_err() {
            return error(503, "the VMM is shutting down");
        }
        match rx.await {
            Ok(Ok(Response::Info(info))) => Json(*info).into_response(),
            Ok(Ok(Response::Events(events))) => Json(events).into_response(),
            Ok(Ok(Response::Snapshot(info))) => Json(info).into_response(),
            Ok(Ok(Response::Migration(status))) => Json(*status).into_response(),
            Ok(Ok(Response::Done)) => StatusCode::NO_CONTENT.into_response(),
            Ok(Err(e)) => controller_error(e),
            Err(_) => error(503, "the VMM is shutting down"),
        }
    }

    async fn call_parsed<T: DeserializeOwned>(
        &self,
        endpoint: &str,
        body: &[u8],
        make: impl FnOnce(T) -> Request,
    ) -> HttpResponse {
        match parse_body::<T>(endpoint, body) {
            Ok(v) => self.call(make(v)).await,
            Err(e) => controller_error(e),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TailQuery {
    bytes: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreQuery {
    store: Option<String>,
}

/// Runs a snapshot-store operation (file work, no VM state) off the API's event loop.
async fn store_op<T: serde::Serialize + Send + 'static>(
    op: impl FnOnce() -> Result<T, crate::snapshot::SnapshotError> + Send + 'static,
) -> HttpResponse {
    use crate::snapshot::SnapshotError;
    use ray_snapshot::StoreError;
    match tokio::task::spawn_blocking(op).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => {
            let status = match &e {
                SnapshotError::Store(StoreError::HasChildren { .. })
                | SnapshotError::Store(StoreError::AlreadyExists(_)) => 409,
                SnapshotError::Store(StoreError::NotFound(_)) => 404,
                SnapshotError::Store(StoreError::File(ray_snapshot::FileError::Io { .. })) => 500,
                _ => 400,
            };
            error(status, e.to_string())
        }
        Err(_) => error(500, "the snapshot store operation panicked"),
    }
}

/// The store to list: the query's, else the one of the VM's latest snapshot.
async fn snapshot_list(a: &Api, q: StoreQuery) -> HttpResponse {
    let store = match q.store {
        Some(s) => std::path::PathBuf::from(s),
        None => {
            let (tx, rx) = oneshot::channel();
            let reply = Box::new(move |r| {
                let _ = tx.send(r);
            });
            if a.inbox.send(Message::Api(Request::Info, reply)).is_err() {
                return error(503, "the VMM is shutting down");
            }
            let last = match rx.await {
                Ok(Ok(Response::Info(info))) => info.last_snapshot,
                _ => return error(503, "the VMM is shutting down"),
            };
            match last.as_deref().map(Path::new).and_then(Path::parent) {
                Some(p) => p.to_path_buf(),
                None => {
                    return error(
                        400,
                        "this VM has no snapshot yet: name the store with ?store=<directory>",
                    )
                }
            }
        }
    };
    store_op(move || crate::snapshot::list(&store)).await
}

fn router(api: Api) -> Router {
    Router::new()
        .route("/vm", get(|State(a): State<Api>| async move { a.call(Request::Info).await }))
        .route(
            "/vm/config",
            put(|State(a): State<Api>, body: Bytes| async move {
                a.call_parsed::<VmConfig>("PUT /vm/config", &body, Request::Configure)
                    .await
            }),
        )
        .route("/vm/start", put(|State(a): State<Api>| async move { a.call(Request::Start).await }))
        .route("/vm/pause", put(|State(a): State<Api>| async move { a.call(Request::Pause).await }))
        .route("/vm/resume", put(|State(a): State<Api>| async move { a.call(Request::Resume).await }))
        .route("/vm/suspend", put(|State(a): State<Api>| async move { a.call(Request::Suspend).await }))
        .route(
            "/vm/snapshot",
            put(|State(a): State<Api>, body: Bytes| async move {
                a.call_parsed::<SnapshotRequest>("PUT /vm/snapshot", &body, Request::Snapshot)
                    .await
            }),
        )
        .route(
            "/vm/snapshot/progress",
            get(|State(a): State<Api>| async move { Json(a.meter.get()).into_response() }),
        )
        .route(
            "/vm/snapshots",
            get(|State(a): State<Api>, q: Result<Query<StoreQuery>, axum::extract::rejection::QueryRejection>| async move {
                match q {
                    Ok(Query(q)) => snapshot_list(&a, q).await,
                    Err(e) => error(400, format!("invalid query for GET /vm/snapshots: {}", e.body_text())),
                }
            }),
        )
        .route(
            "/vm/snapshot/delete",
            put(|body: Bytes| async move {
                match parse_body::<SnapshotDelete>("PUT /vm/snapshot/delete", &body) {
                    Ok(d) => {
                        let r = store_op(move || crate::snapshot::delete(Path::new(&d.path))).await;
                        if r.status() == StatusCode::OK {
                            StatusCode::NO_CONTENT.into_response()
                        } else {
                            r
                        }
                    }
                    Err(e) => controller_error(e),
                }
            }),
        )
        .route(
            "/vm/snapshot/merge",
            put(|body: Bytes| async move {
                match parse_body::<SnapshotMerge>("PUT /vm/snapshot/merge", &body) {
                    Ok(m) => {
                        store_op(move || {
                            crate::snapshot::merge(Path::new(&m.path), &m.into, m.compress)
                        })
                        .await
                    }
                    Err(e) => controller_error(e),
                }
            }),
        )
        .route(
            "/vm/stop",
            put(|State(a): State<Api>, body: Bytes| async move {
                let body: &[u8] = if body.is_empty() { b"{}" } else { &body };
                a.call_parsed::<StopRequest>("PUT /vm/stop", body, |s| Request::Stop {
                    timeout: Duration::from_millis(s.timeout_ms),
                })
                .await
            }),
        )
        .route(
            "/vm/migration",
            put(|State(a): State<Api>, body: Bytes| async move {
                a.call_parsed::<MigrateRequest>("PUT /vm/migration", &body, Request::Migrate)
                    .await
            })
            .get(|State(a): State<Api>| async move { a.call(Request::MigrationStatus).await }),
        )
        .route(
            "/vm/migration/cancel",
            put(|State(a): State<Api>| async move { a.call(Request::MigrationCancel).await }),
        )
        .route(
            "/vm/migration/reclaim",
            put(|State(a): State<Api>| async move { a.call(Request::MigrationReclaim).await }),
        )
        .route("/vm/events", get(|State(a): State<Api>| async move { a.call(Request::Events).await }))
        .route(
            "/vm/console",
            get(|State(a): State<Api>, q: Result<Query<TailQuery>, axum::extract::rejection::QueryRejection>| async move {
                match q {
                    Ok(Query(q)) => {
                        let (total_bytes, data) = a.ring.tail(q.bytes.unwrap_or(4096));
                        Json(ray_api::vmm::ConsoleTail {
                            total_bytes,
                            data: String::from_utf8_lossy(&data).into_owned(),
                        })
                        .into_response()
                    }
                    Err(e) => error(400, format!("invalid query for GET /vm/console: {}", e.body_text())),
                }
            })
            .post(|State(a): State<Api>, body: Bytes| async move {
                a.call_parsed::<ConsoleInput>("POST /vm/console", &body, |c| {
                    Request::ConsoleInput(c.data.into_bytes())
                })
                .await
            }),
        )
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    ray_api::vmm::openapi_json(),
                )
            }),
        )
        .fallback(|method: Method, uri: Uri| async move {
            error(404, format!("no such endpoint: {method} {uri} (see GET /openapi.json)"))
        })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            error(405, format!("{method} is not allowed on {uri} (see GET /openapi.json)"))
        })
        .with_state(api)
}

/// The API server thread's handle: dropping `shutdown` ends it gracefully.
pub struct ApiServer {
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `socket` and serves on a thread of its own.
    pub fn start(
        socket: &Path,
        inbox: Sender<Message>,
        ring: Arc<ConsoleRing>,
        meter: Arc<crate::snapshot::Meter>,
    ) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(socket);
        let std_listener = std::os::unix::net::UnixListener::bind(socket)?;
        std_listener.set_nonblocking(true)?;
        let (tx, rx) = oneshot::channel::<()>();
        let app = router(Api { inbox, ring, meter });
        let thread = std::thread::Builder::new()
            .name("api".into())
            .stack_size(512 << 10)
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("ray vmm: cannot start the API runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::UnixListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("ray vmm: cannot serve the API socket: {e}");
                            return;
                        }
                    };
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = rx.await;
                        })
                        .await;
                });
            })?;
        Ok(Self {
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stops accepting, lets answers in flight finish, and joins the thread.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_errors_name_the_endpoint_and_the_problem() {
        let e = parse_body::<VmConfig>("PUT /vm/config", b"{\"kernel\": 3").unwrap_err();
        assert_eq!(http_status(&e), 400);
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
    }
}
