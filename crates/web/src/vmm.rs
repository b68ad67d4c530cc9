//! The web server's side of the per-VM API: requests to a VMM's `api.sock`, and the
//! upgraded serial console stream. `ray web` only relays what these answer.
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Why a VMM could not be asked.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the VMM at {path}: {reason}")]
pub struct Unreachable {
    pub path: PathBuf,
    pub reason: String,
}

/// A VMM's answer, relayed as is.
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl Answer {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// How long one API call may take (a snapshot of a large VM writes for a while).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

async fn connect(
    socket: &Path,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, Unreachable> {
    let fail = |reason: String| Unreachable {
        path: socket.to_path_buf(),
        reason,
    };
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::UnixStream::connect(socket),
    )
    .await
    .map_err(|_| fail("connect timed out".into()))?
    .map_err(|e| fail(e.to_string()))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(e.to_string()))?;
    tokio::spawn(conn.with_upgrades());
    Ok(sender)
}

/// One request to the VMM on `socket`; `body` is JSON.
pub async fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Answer, Unreachable> {
    let fail = |reason: String| Unreachable {
        path: socket.to_path_buf(),
        reason,
    };
    let mut sender = connect(socket).await?;
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| fail(e.to_string()))?;
    let response = tokio::time::timeout(CALL_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| fail(format!("no answer within {} s", CALL_TIMEOUT.as_secs())))?
        .map_err(|e| fail(e.to_string()))?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(e.to_string()))?
        .to_bytes();
    Ok(Answer {
        status,
        content_type,
        body,
    })
}

/// `GET` that decodes a 2xx JSON answer; `None` for anything else.
pub async fn get_json<T: serde::de::DeserializeOwned>(socket: &Path, path: &str) -> Option<T> {
    let answer = call(socket, "GET", path, None).await.ok()?;
    if !answer.ok() {
        return None;
    }
    serde_json::from_slice(&answer.body).ok()
}

/// The serial console stream (`GET /vm/console/stream` upgraded): frames from the VMM,
/// raw input to it. `query` is the stream's query string (history, mode).
pub async fn console_stream(
    socket: &Path,
    query: &str,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, Unreachable> {
    let fail = |reason: String| Unreachable {
        path: socket.to_path_buf(),
        reason,
    };
    let mut sender = connect(socket).await?;
    let request = hyper::Request::builder()
        .method("GET")
        .uri(format!("/vm/console/stream?{query}"))
        .header("host", "localhost")
        .header("connection", "upgrade")
        .header("upgrade", ray_vmm::api_server::CONSOLE_PROTOCOL)
        .body(Full::new(Bytes::new()))
        .map_err(|e| fail(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| fail(e.to_string()))?;
    if response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes());
        let text = body
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        return Err(fail(format!(
            "the console stream was refused ({status}): {text}"
        )));
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(TokioIo::new(upgraded))
}
