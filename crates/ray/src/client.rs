//! A small HTTP/1.1 client for the per-VM API on its Unix socket.
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use ray_api::vmm::{ErrorBody, ErrorCode};
use serde::de::DeserializeOwned;

/// Why a call to a VMM did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the VMM at {path}: {reason}")]
    Unreachable { path: PathBuf, reason: String },
    /// The VMM answered with an error: its HTTP status, its machine code (`None` when the
    /// body is not an `ErrorBody`, e.g. from a VMM of an older release) and its message.
    #[error("{message}")]
    Api {
        status: u16,
        code: Option<ErrorCode>,
        message: String,
    },
    #[error("the VMM at {path} answered with something that is not the expected JSON: {reason}")]
    BadAnswer { path: PathBuf, reason: String },
}

/// An answer: status and body.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// The error a 4xx/5xx answer carries: its `ErrorBody`, or the raw text of a body that is
/// not one.
pub fn api_error(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ClientError::Api {
            status,
            code: Some(e.code),
            message: e.message,
        },
        Err(_) => ClientError::Api {
            status,
            code: None,
            message: match String::from_utf8_lossy(body).trim() {
                "" => format!("the VMM answered HTTP {status} with no explanation"),
                text => text.to_string(),
            },
        },
    }
}

impl ClientError {
    /// The machine code of an API error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => *code,
            _ => None,
        }
    }
}

pub struct VmmClient {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl VmmClient {
    pub fn new(socket: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .expect("a current-thread runtime needs no resources that can be missing");
        Self {
            socket: socket.to_path_buf(),
            rt,
        }
    }

    fn unreachable(&self, reason: impl ToString) -> ClientError {
        ClientError::Unreachable {
            path: self.socket.clone(),
            reason: reason.to_string(),
        }
    }

    /// A connection to the VMM's socket, ready for requests.
    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::UnixStream::connect(&self.socket),
        )
        .await
        .map_err(|_| self.unreachable("connect timed out"))?
        .map_err(|e| self.unreachable(e))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// Sends one request and returns the raw answer.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ClientError> {
        self.rt.block_on(async {
            let mut sender = self.connect().await?;
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| self.unreachable(e))?;
            let response =
                tokio::time::timeout(Duration::from_secs(120), sender.send_request(request))
                    .await
                    .map_err(|_| self.unreachable("no answer within 120 s"))?
                    .map_err(|e| self.unreachable(e))?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| self.unreachable(e))?
                .to_bytes();
            Ok(Answer { status, body })
        })
    }

    /// A `GET` whose answer is a stream: `each` gets its bytes as they come, until the
    /// stream ends, `each` returns false, or `until` passes. A 4xx/5xx becomes
    /// `ClientError::Api`. Returns the bytes received.
    pub fn stream(
        &self,
        path: &str,
        until: Option<std::time::Instant>,
        mut each: impl FnMut(&[u8]) -> bool,
    ) -> Result<u64, ClientError> {
        self.rt.block_on(async {
            let mut sender = self.connect().await?;
            let request = Request::builder()
                .method("GET")
                .uri(path)
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .map_err(|e| self.unreachable(e))?;
            let response =
                tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
                    .await
                    .map_err(|_| self.unreachable("no answer within 30 s"))?
                    .map_err(|e| self.unreachable(e))?;
            let status = response.status().as_u16();
            let mut body = response.into_body();
            if status >= 400 {
                let bytes = body
                    .collect()
                    .await
                    .map_err(|e| self.unreachable(e))?
                    .to_bytes();
                return Err(api_error(status, &bytes));
            }
            let mut total = 0u64;
            loop {
                let next = match until {
                    Some(t) => {
                        let left = t.saturating_duration_since(std::time::Instant::now());
                        match tokio::time::timeout(left, body.frame()).await {
                            Ok(f) => f,
                            Err(_) => break, // the time asked for is up
                        }
                    }
                    None => body.frame().await,
                };
                let Some(frame) = next else { break };
                let frame = frame.map_err(|e| self.unreachable(e))?;
                if let Some(data) = frame.data_ref() {
                    total += data.len() as u64;
                    if !each(data) {
                        break;
                    }
                }
            }
            Ok(total)
        })
    }

    /// Sends a request and decodes a 2xx JSON answer; a 4xx/5xx becomes `ClientError::Api`.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let answer = self.raw(method, path, body)?;
        if answer.status >= 400 {
            return Err(api_error(answer.status, &answer.body));
        }
        let body: &[u8] = if answer.body.is_empty() {
            b"null"
        } else {
            &answer.body
        };
        serde_json::from_slice(body).map_err(|e| ClientError::BadAnswer {
            path: self.socket.clone(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_give_code_and_message() {
        let e = api_error(
            409,
            br#"{"code":"wrong_state","message":"cannot pause a VM that is paused"}"#,
        );
        assert_eq!(e.code(), Some(ErrorCode::WrongState));
        assert_eq!(e.to_string(), "cannot pause a VM that is paused");
        // A body that is not an ErrorBody (an older VMM, a proxy) still says something.
        let e = api_error(502, b"bad gateway");
        assert_eq!(e.code(), None);
        assert_eq!(e.to_string(), "bad gateway");
        let e = api_error(500, b"");
        assert!(e.to_string().contains("HTTP 500"), "{e}");
    }
}
