//! WebSocket bridges from the browser to a VM's consoles: noVNC to the VM's VNC socket
//! (the read-write `vnc-N.sock` for operators, the view-only `vnc-N-view.sock` for
//! viewers; the VNC server takes several viewers at once), and xterm.js to the serial
//! console stream of the VMM API.
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::api::{Refusal, Reply, Web};
use crate::{vmm, Role};

/// Most displays a VM has (the display layer's limit).
const MAX_DISPLAYS: u32 = 16;

/// The display number of a request path, checked against the display layer's limit.
pub(crate) fn display_number(n: &str) -> Result<u32, Refusal> {
    n.parse().ok().filter(|n| *n < MAX_DISPLAYS).ok_or_else(|| {
        Refusal::invalid(format!(
            "display '{n}' is not a display number (0 to {})",
            MAX_DISPLAYS - 1
        ))
    })
}

/// `GET /api/vms/{id}/vnc/{n}` (WebSocket): RFB bytes both ways.
pub async fn vnc(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path((id, n)): Path<(String, String)>,
    ws: WebSocketUpgrade,
) -> Reply {
    let user = web.user(&headers, Role::Viewer)?;
    let vm = web.live_vm(&id)?;
    let n = display_number(&n)?;
    let name = if user.role >= Role::Operator {
        format!("vnc-{n}.sock")
    } else {
        format!("vnc-{n}-view.sock")
    };
    let path = vm.dir.join(name);
    let socket = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
        Refusal::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "VM '{id}' has no VNC server for display {n} ({}: {e})",
                path.display()
            ),
        )
    })?;
    tracing::info!(
        user = user.name,
        vm = id,
        display = n,
        role = user.role.as_str(),
        "ray web: VNC viewer"
    );
    Ok(ws
        .protocols(["binary"])
        .on_upgrade(move |ws| async move { pump_raw(ws, socket).await })
        .into_response())
}

/// Copies WebSocket binary messages to `io` and what `io` sends back as binary messages,
/// until either side closes.
async fn pump_raw<S: AsyncRead + AsyncWrite + Unpin>(mut ws: WebSocket, mut io: S) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            msg = ws.recv() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if io.write_all(&b).await.is_err() { break; }
                }
                Some(Ok(Message::Text(t))) => {
                    if io.write_all(t.as_bytes()).await.is_err() { break; }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                _ => break,
            },
            n = io.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() { break; }
                }
            },
        }
    }
    let _ = ws.send(Message::Close(None)).await;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialQuery {
    /// Bytes of earlier output to show first (default 64 KiB).
    history: Option<u64>,
}

/// Default history shown when a serial console opens.
const HISTORY: u64 = 64 * 1024;

/// `GET /api/vms/{id}/serial` (WebSocket): guest output as binary messages, the VMM's
/// notices and this console's mode as JSON text messages (`{"notice": ..}`,
/// `{"mode": "write"|"read_only"}`, `{"end": true}`); the browser's messages are input
/// (dropped for viewers, who attach read-only).
pub async fn serial(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<SerialQuery>,
    ws: WebSocketUpgrade,
) -> Reply {
    let user = web.user(&headers, Role::Viewer)?;
    let vm = web.live_vm(&id)?;
    let history = q.history.unwrap_or(HISTORY);
    let writes = user.role >= Role::Operator;
    let mode = if writes { "auto" } else { "read_only" };
    let stream = vmm::console_stream(
        &vm.dir.join("api.sock"),
        &format!("history={history}&mode={mode}"),
    )
    .await?;
    tracing::info!(user = user.name, vm = id, mode, "ray web: serial console");
    Ok(ws
        .on_upgrade(move |ws| async move { pump_serial(ws, stream, writes).await })
        .into_response())
}

async fn pump_serial<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut ws: WebSocket,
    io: S,
    writes: bool,
) {
    use ray_api::vmm::console_frame;
    let (mut rd, mut wr) = tokio::io::split(io);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u8, Vec<u8>)>(64);
    // Frames are read in their own task: a half-read frame must not be dropped when the
    // browser's side of the select below wins.
    let reader = tokio::spawn(async move {
        loop {
            let mut head = [0u8; 5];
            if rd.read_exact(&mut head).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if len > 1 << 20 {
                break;
            }
            let mut payload = vec![0u8; len];
            if rd.read_exact(&mut payload).await.is_err()
                || tx.send((head[0], payload)).await.is_err()
            {
                break;
            }
        }
    });
    loop {
        tokio::select! {
            frame = rx.recv() => {
                let Some((kind, payload)) = frame else { break };
                let text = |k: &str, v: serde_json::Value| Message::Text(serde_json::json!({ k: v }).to_string().into());
                let msg = match kind {
                    console_frame::OUTPUT => Message::Binary(payload.into()),
                    console_frame::NOTICE => text("notice", String::from_utf8_lossy(&payload).into()),
                    console_frame::MODE => text("mode", String::from_utf8_lossy(&payload).into()),
                    console_frame::END => {
                        let _ = ws.send(text("end", true.into())).await;
                        break;
                    }
                    _ => continue,
                };
                if ws.send(msg).await.is_err() { break; }
            }
            msg = ws.recv() => match msg {
                Some(Ok(Message::Binary(b))) if writes => {
                    if wr.write_all(&b).await.is_err() { break; }
                }
                Some(Ok(Message::Text(t))) if writes => {
                    if wr.write_all(t.as_bytes()).await.is_err() { break; }
                }
                Some(Ok(Message::Binary(_) | Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
                _ => break,
            },
        }
    }
    reader.abort();
    let _ = ws.send(Message::Close(None)).await;
}
