//! Encode sessions: a VM display encoded to a video stream while its picture changes
//! (`POST /vm/display/{n}/encode`, `GET /vm/encode`, `DELETE /vm/encode/{session}`), their
//! limits and what the API reports about them. Checked here so that the CLI and the VMM
//! refuse the same things with the same words.
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Most encode sessions on one display.
pub const MAX_SESSIONS_PER_DISPLAY: usize = 2;
/// Most encode sessions of one VM (over all its displays).
pub const MAX_SESSIONS_PER_VM: usize = 4;
/// Most encode sessions on one host (over all VMs).
pub const MAX_SESSIONS_PER_HOST: usize = 16;
/// The largest display an encode session takes (width and height, in pixels).
pub const MAX_ENCODE_WIDTH: u32 = 2560;
pub const MAX_ENCODE_HEIGHT: u32 = 1600;
/// Bit rate bounds, bits per second.
pub const MIN_BITRATE: u64 = 100_000;
pub const MAX_BITRATE: u64 = 50_000_000;
pub const DEFAULT_BITRATE: u64 = 2_000_000;
/// Frame rate bounds: at most this many frames a second, fewer while the screen is still.
pub const MIN_FPS: u32 = 1;
pub const MAX_FPS: u32 = 60;
pub const DEFAULT_FPS: u32 = 30;
/// Viewers of one session's live stream (`GET /vm/encode/{session}/stream`) at once.
pub const MAX_WATCHERS_PER_SESSION: usize = 4;

/// A video codec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    /// H.264 Constrained Baseline (openh264), Annex-B byte stream.
    #[default]
    H264,
    /// H.265 (the host's FFmpeg libraries, with the `ffmpeg` build feature).
    Hevc,
    /// VP9 (the host's FFmpeg libraries, with the `ffmpeg` build feature).
    Vp9,
}

impl Codec {
    pub const ALL: [Codec; 3] = [Codec::H264, Codec::Hevc, Codec::Vp9];

    pub fn as_str(self) -> &'static str {
        match self {
            Codec::H264 => "h264",
            Codec::Hevc => "hevc",
            Codec::Vp9 => "vp9",
        }
    }

    /// Parses a codec name (`h264`, `hevc`, `vp9`; `avc` and `h265` too).
    pub fn parse(s: &str) -> Result<Codec, String> {
        match s.to_ascii_lowercase().as_str() {
            "h264" | "avc" => Ok(Codec::H264),
            "hevc" | "h265" => Ok(Codec::Hevc),
            "vp9" => Ok(Codec::Vp9),
            _ => Err(format!("'{s}' is not a codec (h264, hevc or vp9)")),
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /vm/display/{n}/encode` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EncodeRequest {
    /// `h264` (the default), `hevc` or `vp9`.
    #[serde(default)]
    pub codec: Codec,
    /// Target bit rate in bits per second (100 kbit/s to 50 Mbit/s; 2 Mbit/s by default).
    #[serde(default = "default_bitrate")]
    pub bitrate: u64,
    /// At most this many frames a second (1 to 60; 30 by default).
    #[serde(default = "default_fps")]
    pub fps: u32,
    /// The file the VMM writes the stream to (absolute; created or truncated). Without it
    /// the stream goes only to its watchers (`GET /vm/encode/{session}/stream`), and the
    /// session encodes only while someone watches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A hand-off token: the output file `path`, created and handed to the VMM over
    /// `handoff.sock` in its directory under this token by a client in the host's
    /// namespaces (`ray gpu encode start` does it for a jailed VMM writing outside its
    /// directory, which its root does not hold). Needs `path`. Default: the VMM creates
    /// `path` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<String>,
}

fn default_bitrate() -> u64 {
    DEFAULT_BITRATE
}

fn default_fps() -> u32 {
    DEFAULT_FPS
}

impl EncodeRequest {
    /// Checks the bounds; the message names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_BITRATE..=MAX_BITRATE).contains(&self.bitrate) {
            return Err(format!(
                "bit rate {} bit/s is out of range ({MIN_BITRATE} to {MAX_BITRATE})",
                self.bitrate
            ));
        }
        if !(MIN_FPS..=MAX_FPS).contains(&self.fps) {
            return Err(format!(
                "frame rate {} is out of range ({MIN_FPS} to {MAX_FPS} frames a second)",
                self.fps
            ));
        }
        if let Some(path) = self.path.as_deref().filter(|p| !p.starts_with('/')) {
            return Err(format!(
                "output path '{path}' is not absolute: the VMM writes it and has its own working directory"
            ));
        }
        if let (Some(token), None) = (&self.handoff, &self.path) {
            return Err(format!(
                "hand-off {token:?} needs the output file's path: a hand-off carries the output file"
            ));
        }
        Ok(())
    }
}

/// Parses a bit rate: bits per second, with an optional `k` or `M` (`2M`, `500k`).
pub fn parse_bitrate(s: &str) -> Result<u64, String> {
    let bad = || format!("'{s}' is not a bit rate (2000000, 500k, 2M)");
    let (num, mul) = match s.strip_suffix(['k', 'K']) {
        Some(n) => (n, 1_000),
        None => match s.strip_suffix('M') {
            Some(n) => (n, 1_000_000),
            None => (s, 1),
        },
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 {
        return Err(bad());
    }
    Ok((v * mul as f64).round() as u64)
}

/// An encode session's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EncodeStateName {
    /// Set up; its thread has not looked at the display yet.
    Starting,
    /// Encodes each change of the display.
    Running,
    /// The VM is paused: nothing to encode until it runs.
    Paused,
    /// Stopped by a request or with its VM; the file is complete.
    Stopped,
    /// Failed (the message says why); the file holds what was encoded before.
    Error,
}

/// One encode session as the API reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EncodeSessionInfo {
    /// The session's number in the VM: the `{session}` of `DELETE /vm/encode/{session}`.
    pub id: u32,
    pub display: u32,
    pub codec: Codec,
    pub state: EncodeStateName,
    pub width: u32,
    pub height: u32,
    pub bitrate: u64,
    /// The frame rate asked for (the most frames a second).
    pub fps_limit: u32,
    /// Frames encoded: one per change of the display (an idle display adds none).
    pub frames: u64,
    /// Frames a second encoded over the last few seconds.
    pub fps: f64,
    /// Bytes of stream written.
    pub bytes: u64,
    /// Encode latency (frame read to stream written) of the last frame, and the mean, ms.
    pub latency_ms: f64,
    pub mean_latency_ms: f64,
    /// The file the stream goes to (none: only to its watchers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Viewers of the live stream now (`GET /vm/encode/{session}/stream`).
    #[serde(default)]
    pub watchers: u32,
    /// Why the session failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /vm/encode`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EncodeList {
    pub sessions: Vec<EncodeSessionInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_arguments_are_checked() {
        let ok = EncodeRequest {
            codec: Codec::H264,
            bitrate: 2_000_000,
            fps: 30,
            path: Some("/tmp/x.h264".into()),
            handoff: None,
        };
        ok.validate().unwrap();
        let e = EncodeRequest {
            path: None,
            handoff: Some("t".into()),
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("needs the output file's path"), "{e}");
        let e = EncodeRequest {
            fps: 0,
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("frame rate 0"), "{e}");
        let e = EncodeRequest {
            bitrate: 10,
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("bit rate 10"), "{e}");
        let e = EncodeRequest {
            path: Some("x.h264".into()),
            ..ok
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("not absolute"), "{e}");
        assert_eq!(parse_bitrate("2M").unwrap(), 2_000_000);
        assert_eq!(parse_bitrate("500k").unwrap(), 500_000);
        assert_eq!(parse_bitrate("1.5M").unwrap(), 1_500_000);
        assert!(parse_bitrate("fast").unwrap_err().contains("'fast'"));
        assert_eq!(Codec::parse("HEVC").unwrap(), Codec::Hevc);
        assert!(Codec::parse("mpeg2").unwrap_err().contains("'mpeg2'"));
        let r: EncodeRequest = serde_json::from_str(r#"{"path":"/a.h264"}"#).unwrap();
        assert_eq!((r.codec, r.bitrate, r.fps), (Codec::H264, 2_000_000, 30));
    }
}
