//! The low-bandwidth viewer's stream: `GET /api/vms/{id}/h264/{n}` (WebSocket) starts an
//! encode session of display `n` on the VM's VMM (`POST /vm/display/{n}/encode`, H.264
//! into a file of the VM's own directory, where even a jailed VMM may write), and sends
//! the browser the stream as it grows, whole access units only: each message ends where
//! the session's byte count (`GET /vm/encode`, counted after each frame is written) says
//! the last frame ends. The page decodes it with WebCodecs. The session is stopped and
//! its file removed when the WebSocket closes.
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use axum::extract::{Path, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use ray_api::encode::{EncodeList, EncodeSessionInfo};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::api::{Refusal, Reply, Web};
use crate::{vmm, Role};

/// How often the stream's growth is looked at.
const POLL: Duration = Duration::from_millis(50);
/// The viewer's bit rate and frame rate (the encode API's bounds apply).
const BITRATE: u64 = 1_000_000;
const FPS: u32 = 15;

static STREAMS: AtomicU64 = AtomicU64::new(0);

pub async fn stream(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path((id, n)): Path<(String, String)>,
    ws: WebSocketUpgrade,
) -> Reply {
    let user = web.user(&headers, Role::Viewer)?;
    let vm = web.live_vm(&id)?;
    let n = crate::bridge::display_number(&n)?;
    // In the VM's own directory: a jailed VMM may write nowhere else.
    let dir = std::path::absolute(&vm.dir)
        .map_err(|e| Refusal::failed(format!("cannot resolve {}: {e}", vm.dir.display())))?;
    let file = dir.join(format!(
        "h264-{}-{n}-{}.h264",
        std::process::id(),
        STREAMS.fetch_add(1, Ordering::Relaxed)
    ));
    let socket = vm.dir.join("api.sock");
    let request = serde_json::json!({
        "codec": "h264", "bitrate": BITRATE, "fps": FPS, "path": file.display().to_string(),
    });
    let answer = vmm::call(
        &socket,
        "POST",
        &format!("/vm/display/{n}/encode"),
        Some(request.to_string().into_bytes()),
    )
    .await?;
    if !answer.ok() {
        return Ok(crate::api::relay(answer));
    }
    let session: EncodeSessionInfo = serde_json::from_slice(&answer.body).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_GATEWAY,
            "failed",
            format!("the VMM's encode answer: {e}"),
        )
    })?;
    tracing::info!(
        user = user.name,
        vm = id,
        display = n,
        session = session.id,
        "ray web: H.264 viewer"
    );
    Ok(ws
        .on_upgrade(move |ws| async move {
            pump(ws, &socket, session.id, &file).await;
            let _ = vmm::call(
                &socket,
                "DELETE",
                &format!("/vm/encode/{}", session.id),
                None,
            )
            .await;
            let _ = std::fs::remove_file(&file);
        })
        .into_response())
}

/// The session's byte count, `None` once it is gone or failed.
async fn written(socket: &std::path::Path, session: u32) -> Option<u64> {
    let list: EncodeList = vmm::get_json(socket, "/vm/encode").await?;
    let s = list.sessions.into_iter().find(|s| s.id == session)?;
    s.error.is_none().then_some(s.bytes)
}

async fn pump(mut ws: WebSocket, socket: &std::path::Path, session: u32, file: &PathBuf) {
    let mut sent = 0u64;
    let mut reader: Option<tokio::fs::File> = None;
    loop {
        tokio::select! {
            msg = ws.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => continue,
            },
            _ = tokio::time::sleep(POLL) => {}
        }
        let Some(bytes) = written(socket, session).await else {
            let _ = ws.send(Message::Close(None)).await;
            return;
        };
        if bytes <= sent {
            continue;
        }
        if reader.is_none() {
            reader = tokio::fs::File::open(file).await.ok();
        }
        let Some(r) = reader.as_mut() else { continue };
        let mut chunk = vec![0u8; (bytes - sent) as usize];
        if r.seek(std::io::SeekFrom::Start(sent)).await.is_err()
            || r.read_exact(&mut chunk).await.is_err()
        {
            return;
        }
        sent = bytes;
        if ws.send(Message::Binary(chunk.into())).await.is_err() {
            return;
        }
    }
}
