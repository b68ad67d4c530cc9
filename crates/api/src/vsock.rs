//! A VM's virtio-vsock device in its configuration, and the `--vsock` argument that
//! names it: `cid=N[,socket=PATH]`. Checked here so that the CLI and the VMM refuse the
//! same things with the same words, before a VM starts.
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The file name of the device's socket in the VM's directory, when none is given.
pub const DEFAULT_SOCKET: &str = "vsock.sock";
/// Longest socket path: a Unix socket address holds 107 bytes, and guest connections
/// to host port P go to `<socket>_P` (up to 11 more).
pub const MAX_SOCKET_PATH: usize = 96;

/// One virtio-vsock device; its host side is a Unix socket (the hybrid convention): a
/// host process connects, writes `CONNECT <port>\n`, reads `OK <hostport>\n`, then
/// talks to the guest's port; the guest's connections to host port P go to
/// `<socket>_P`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id: 3 to 4294967295 (0-2 are reserved).
    #[schema(minimum = 3, maximum = 4294967295u64)]
    pub cid: u64,
    /// The host-side socket; default: `vsock.sock` in the VM's directory (it moves with
    /// the VM's id on restore or migration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

impl VsockConfig {
    /// Parses a `--vsock` argument.
    pub fn parse(arg: &str) -> Result<VsockConfig, String> {
        let mut cid = None;
        let mut socket = None;
        for kv in arg.split(',') {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(format!("--vsock '{arg}': '{kv}' is not KEY=VALUE"));
            };
            match k {
                "cid" => {
                    cid = Some(
                        v.parse::<u64>()
                            .map_err(|_| format!("--vsock '{arg}': cid '{v}' is not a number"))?,
                    )
                }
                "socket" => socket = Some(v.to_string()),
                _ => {
                    return Err(format!(
                        "--vsock '{arg}': unknown key '{k}' (known: cid, socket)"
                    ))
                }
            }
        }
        let c = VsockConfig {
            cid: cid.ok_or_else(|| format!("--vsock '{arg}': cid=N is required"))?,
            socket,
        };
        c.validate().map_err(|e| format!("--vsock '{arg}': {e}"))?;
        Ok(c)
    }

    /// Checks the cid and the socket path.
    pub fn validate(&self) -> Result<(), String> {
        if self.cid < 3 || self.cid > u64::from(u32::MAX) {
            return Err(format!(
                "cid {} is reserved or too large; a guest's cid is 3 to 4294967295",
                self.cid
            ));
        }
        if let Some(s) = &self.socket {
            if !s.starts_with('/') || s.len() > MAX_SOCKET_PATH || s.contains('\0') {
                return Err(format!(
                    "socket '{s}' must be an absolute path of at most {MAX_SOCKET_PATH} bytes"
                ));
            }
        }
        Ok(())
    }

    /// The socket's path for a VM whose directory is `vm_dir`.
    pub fn socket_path(&self, vm_dir: &std::path::Path) -> std::path::PathBuf {
        match &self.socket {
            Some(s) => s.into(),
            None => vm_dir.join(DEFAULT_SOCKET),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_and_bad_ones_are_named() {
        assert_eq!(
            VsockConfig::parse("cid=3").unwrap(),
            VsockConfig {
                cid: 3,
                socket: None
            }
        );
        let c = VsockConfig::parse("cid=9,socket=/tmp/v.sock").unwrap();
        assert_eq!(c.socket.as_deref(), Some("/tmp/v.sock"));
        let bad = |a: &str| VsockConfig::parse(a).unwrap_err();
        assert_eq!(
            bad("cid=2"),
            "--vsock 'cid=2': cid 2 is reserved or too large; a guest's cid is 3 to 4294967295"
        );
        assert!(bad("cid=4294967296").contains("reserved or too large"));
        assert!(bad("cid=x").contains("cid 'x' is not a number"));
        assert!(bad("socket=/a").contains("cid=N is required"));
        assert!(bad("cid=3,port=4").contains("unknown key 'port'"));
        assert!(bad("cid=3,socket=rel.sock").contains("absolute path"));
        assert!(bad(&format!("cid=3,socket=/{}", "a".repeat(100))).contains("at most 96"));
        assert!(bad("cid").contains("not KEY=VALUE"));
    }
}

/// `POST /vm/exec` body: one command line of rayvisor's guest shell, run over vsock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The command line (one line, at most 255 bytes), e.g. `echo hello` or `mem`.
    pub command: String,
    /// How long to wait for the guest's answer; default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub timeout_ms: Option<u64>,
}

/// `POST /vm/exec` answer (and `ray vm exec --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// What the command printed (the guest's status line removed).
    pub output: String,
    /// 0: success; 1: the command reported an error (`err ...`).
    pub status: i32,
}
