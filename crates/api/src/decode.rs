//! Decode sessions: a video stream turned back into frames by a thread of the VMM
//! (`POST /vm/decode`, `GET /vm/decode`, `GET /vm/decode/{session}`,
//! `GET /vm/decode/{session}/frame.png`, `DELETE /vm/decode/{session}`), their limits and
//! what the API reports about them. The stream is a file in the VM's directory or the live
//! stream of one of the VM's encode sessions.
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::encode::Codec;

/// Most decode sessions of one VM that have not ended. Over all VMs of a host, decode
/// sessions share the encode sessions' host slots
/// ([`crate::encode::MAX_SESSIONS_PER_HOST`]).
pub const MAX_DECODE_SESSIONS_PER_VM: usize = 4;
/// The largest picture a decode session takes (width and height, in pixels): the largest
/// an encode session makes.
pub const MAX_DECODE_WIDTH: u32 = crate::encode::MAX_ENCODE_WIDTH;
pub const MAX_DECODE_HEIGHT: u32 = crate::encode::MAX_ENCODE_HEIGHT;

/// What a decode session decodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DecodeSource {
    /// A file in the VM's directory (absolute, or relative to that directory) as an encode
    /// session writes it: H.264 or HEVC Annex-B, or VP9 in IVF. Decoded from its start to
    /// its end, as fast as the host decodes.
    File(String),
    /// One of this VM's encode sessions, by number: its live stream, as a watcher gets it
    /// (from the next key frame on), until the encode session ends.
    EncodeSession(u32),
}

impl std::fmt::Display for DecodeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeSource::File(p) => write!(f, "file {p}"),
            DecodeSource::EncodeSession(id) => write!(f, "encode session {id}"),
        }
    }
}

/// `POST /vm/decode` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecodeRequest {
    /// `h264`, `hevc` or `vp9` (the last two need a build with the `ffmpeg` feature).
    /// Without it: an encode session's own codec; for a file, VP9 when it starts with an
    /// IVF header, HEVC for `.hevc`, `.h265` and `.265`, otherwise H.264. Given for an
    /// encode session, it must be that session's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<Codec>,
    /// The stream: `{"file": "d0.h264"}` or `{"encode_session": 1}`.
    pub source: DecodeSource,
}

impl DecodeRequest {
    /// Checks what can be checked without the VM; the message names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        match &self.source {
            DecodeSource::File(p) if p.is_empty() => {
                Err("the decode session's file is empty: name a file in the VM's directory".into())
            }
            DecodeSource::File(p) if p.contains('\0') => {
                Err(format!("the decode session's file {p:?} holds a NUL byte"))
            }
            DecodeSource::EncodeSession(0) => {
                Err("encode session 0 does not exist: sessions are numbered from 1".into())
            }
            _ => Ok(()),
        }
    }
}

/// The codec of a file named `path` whose first bytes are `head`, when the request names
/// none: VP9 for an IVF file, HEVC for `.hevc` / `.h265` / `.265`, otherwise H.264 (the
/// same guess as `ray gpu decode FILE`).
pub fn guess_codec(path: &str, head: &[u8]) -> Codec {
    let ext = std::path::Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if head.starts_with(b"DKIF") || ext == "ivf" {
        Codec::Vp9
    } else if ["hevc", "h265", "265"].contains(&ext.as_str()) {
        Codec::Hevc
    } else {
        Codec::H264
    }
}

/// A decode session's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DecodeStateName {
    /// Set up; its thread has not read the stream yet.
    Starting,
    /// Decodes the stream as it comes.
    Running,
    /// The stream ended (the file's end, or the encode session ended) and every frame of
    /// it was decoded.
    Done,
    /// Stopped by a request or with its VM.
    Stopped,
    /// Failed (the message says why: the decoder's error for a corrupt stream).
    Error,
}

impl DecodeStateName {
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeStateName::Starting => "starting",
            DecodeStateName::Running => "running",
            DecodeStateName::Done => "done",
            DecodeStateName::Stopped => "stopped",
            DecodeStateName::Error => "error",
        }
    }

    /// Whether the session has ended (its thread is gone or going).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DecodeStateName::Done | DecodeStateName::Stopped | DecodeStateName::Error
        )
    }
}

impl std::fmt::Display for DecodeStateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One decode session as the API reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DecodeSessionInfo {
    /// The session's number in the VM: the `{session}` of `GET /vm/decode/{session}`.
    pub id: u32,
    pub codec: Codec,
    pub source: DecodeSource,
    pub state: DecodeStateName,
    /// The size of the last picture decoded (0 before the first).
    pub width: u32,
    pub height: u32,
    /// Pictures decoded.
    pub frames: u64,
    /// Pictures a second decoded: over the last few seconds while the session runs, over
    /// its whole run once it ended.
    pub fps: f64,
    /// Bytes of stream read.
    pub bytes: u64,
    /// Decode time of the last picture and the mean over all of them, ms.
    pub latency_ms: f64,
    pub mean_latency_ms: f64,
    /// Why the session failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /vm/decode`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DecodeList {
    pub sessions: Vec<DecodeSessionInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_check_and_guess_their_codec() {
        let r: DecodeRequest =
            serde_json::from_str(r#"{"codec":"h264","source":{"file":"d0.h264"}}"#).unwrap();
        assert_eq!(r.source, DecodeSource::File("d0.h264".into()));
        assert_eq!(r.codec, Some(Codec::H264));
        r.validate().unwrap();
        let r: DecodeRequest = serde_json::from_str(r#"{"source":{"encode_session":2}}"#).unwrap();
        assert_eq!((r.codec, r.source), (None, DecodeSource::EncodeSession(2)));
        for bad in [
            r#"{"codec":"mpeg2","source":{"file":"x"}}"#,
            r#"{"source":{"socket":"x"}}"#,
            r#"{"source":{"file":"x"},"fps":3}"#,
            r#"{"codec":"h264"}"#,
        ] {
            assert!(serde_json::from_str::<DecodeRequest>(bad).is_err(), "{bad}");
        }
        let e = DecodeRequest {
            codec: None,
            source: DecodeSource::EncodeSession(0),
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("encode session 0"), "{e}");
        assert_eq!(guess_codec("/a/b.ivf", b""), Codec::Vp9);
        assert_eq!(guess_codec("/a/b.bin", b"DKIF\0\0"), Codec::Vp9);
        assert_eq!(guess_codec("b.HEVC", b"\0\0\0\x01"), Codec::Hevc);
        assert_eq!(guess_codec("b.h264", b"\0\0\0\x01"), Codec::H264);
        assert!(DecodeStateName::Done.is_final() && !DecodeStateName::Running.is_final());
    }
}
