//! The hosts page's API (`/api/hosts...`): the cluster's hosts and their VMs read from the
//! cluster store, live, and the operator's cordon, uncordon, drain and drain abort, all
//! through `ray_cluster::ops` (what `ray node` runs): the controller carries them out.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use hyper::body::Bytes;
use ray_cluster::ops::{self, OpError};
use ray_cluster::store::AnyStore;

use crate::api::{Refusal, Reply, Web};
use crate::Role;

/// How often the live hosts view reads the store.
const STREAM_PERIOD: Duration = Duration::from_millis(500);

impl From<OpError> for Refusal {
    fn from(e: OpError) -> Refusal {
        let (status, code) = match &e {
            OpError::BadName(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            OpError::UnknownHost(_) => (StatusCode::NOT_FOUND, "not_found"),
            OpError::Conflict(_) | OpError::BadSpec { .. } => (StatusCode::CONFLICT, "conflict"),
            OpError::Store(_) => (StatusCode::BAD_GATEWAY, "unreachable"),
            OpError::Encode(_) => (StatusCode::INTERNAL_SERVER_ERROR, "failed"),
        };
        Refusal::new(status, code, e.to_string())
    }
}

fn store(web: &Web) -> Result<&AnyStore, Refusal> {
    web.opts.cluster.as_ref().ok_or_else(|| {
        Refusal::new(
            StatusCode::NOT_FOUND,
            "no_cluster",
            "ray web was started without the cluster store: give it --cluster (single-host mode) or --etcd",
        )
    })
}

/// `GET /api/hosts`: the hosts overview.
pub async fn list(State(web): State<Arc<Web>>, headers: HeaderMap) -> Reply {
    web.user(&headers, Role::Viewer)?;
    let s = store(&web)?;
    Ok(Json(ops::overview(s).await?).into_response())
}

/// `GET /api/hosts/stream`: server-sent events, a `hosts` event with the overview whenever
/// it changes, an `unreachable` event while the store does not answer, and a comment every
/// 15 s to keep the connection open.
pub async fn stream(State(web): State<Arc<Web>>, headers: HeaderMap) -> Reply {
    web.user(&headers, Role::Viewer)?;
    store(&web)?;
    let state = (web, None::<String>, 0u32);
    let events = futures_util::stream::unfold(state, |(web, last, idle)| async move {
        let mut idle = idle;
        loop {
            let s = web.opts.cluster.as_ref()?;
            let chunk = match ops::overview(s).await {
                Ok(o) => format!(
                    "event: hosts\ndata: {}\n\n",
                    serde_json::to_string(&o).unwrap_or_else(|_| "{}".into())
                ),
                Err(e) => format!(
                    "event: unreachable\ndata: {}\n\n",
                    serde_json::json!({ "message": e.to_string() })
                ),
            };
            if last.as_deref() != Some(chunk.as_str()) {
                return Some((
                    Ok::<_, Infallible>(Bytes::from(chunk.clone())),
                    (web, Some(chunk), 0),
                ));
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

/// `POST /api/hosts/{host}/{op}`, op `cordon`, `uncordon`, `drain` or `drain-abort`, for an
/// operator or admin.
pub async fn act(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path((host, op)): Path<(String, String)>,
) -> Reply {
    let user = web.user(&headers, Role::Operator)?;
    let s = store(&web)?;
    let body = match op.as_str() {
        "cordon" => {
            ops::cordon(s, &host).await?;
            serde_json::json!({ "host": host, "state": "cordoned" })
        }
        "uncordon" => {
            let now = ops::uncordon(s, &host).await?;
            serde_json::json!({ "host": host, "state": now })
        }
        "drain" => {
            ops::drain(s, &host).await?;
            serde_json::json!({ "host": host, "state": "draining" })
        }
        "drain-abort" => {
            let aborted = ops::drain_abort(s, &host).await?;
            serde_json::json!({ "host": host, "state": "drain aborted", "aborted_migrations": aborted })
        }
        other => {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("there is no host action '{other}' (cordon, uncordon, drain, drain-abort)"),
            ))
        }
    };
    tracing::info!(user = user.name, host, op, "ray web: host action");
    Ok(Json(body).into_response())
}
