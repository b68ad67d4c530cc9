//! The host end of a VM's vsock socket, for `ray vm exec` and `POST /vm/exec`: connect
//! to a guest port with the hybrid handshake, and run one command of rayvisor's guest
//! shell over port [`EXEC_PORT`].
//!
//! The exec protocol: the host sends one command line; the guest answers with the
//! command's output, then one last line `ray-exit <status>` (0: success, 1: the command
//! reported an error), then closes. The output may hold any bytes; the trailer is
//! always the final line.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The guest port rayvisor's guest serves its shell on.
pub const EXEC_PORT: u32 = 52;
pub const TRAILER: &str = "ray-exit ";
/// The longest command line the guest's shell takes.
pub const MAX_COMMAND: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot connect to the VM's vsock socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the guest did not accept a connection to vsock port {port} within {timeout:?} (is its vsock driver up?)")]
    NoAnswer { port: u32, timeout: Duration },
    #[error("the guest refused vsock port {0} (nothing listens there)")]
    Refused(u32),
    #[error("the guest did not finish the command within {0:?}")]
    Timeout(Duration),
    #[error("the command is {0}")]
    BadCommand(String),
    #[error("the guest's answer ended without its `ray-exit` status line")]
    NoStatus,
    #[error("vsock connection: {0}")]
    Io(#[from] std::io::Error),
}

/// What a guest command printed and its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub output: String,
    pub status: i32,
}

/// Connects to guest port `port` through the device's socket at `socket`: the stream
/// (past the handshake) and the host port the device gave it.
pub fn connect(
    socket: &Path,
    port: u32,
    timeout: Duration,
) -> Result<(UnixStream, u32), ExecError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ExecError::Socket {
        path: socket.to_path_buf(),
        source,
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: what follows the line is the guest's.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Err(ExecError::Refused(port)),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 64 => line.push(b[0]),
            Ok(_) => return Err(ExecError::Refused(port)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ExecError::NoAnswer { port, timeout })
            }
            Err(e) => return Err(e.into()),
        }
    }
    let line = String::from_utf8_lossy(&line);
    let host_port = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or(ExecError::Refused(port))?;
    Ok((s, host_port))
}

/// Checks a command line for the guest's shell.
pub fn check_command(command: &str) -> Result<(), ExecError> {
    if command.trim().is_empty() {
        return Err(ExecError::BadCommand("empty".into()));
    }
    if command.contains(['\n', '\r']) {
        return Err(ExecError::BadCommand("more than one line".into()));
    }
    if command.len() > MAX_COMMAND {
        return Err(ExecError::BadCommand(format!(
            "{} bytes long; the guest's shell takes at most {MAX_COMMAND}",
            command.len()
        )));
    }
    Ok(())
}

/// Runs `command` in the guest's shell and returns its output and status; `timeout`
/// bounds the whole exchange.
pub fn exec(socket: &Path, command: &str, timeout: Duration) -> Result<ExecOutput, ExecError> {
    check_command(command)?;
    let start = Instant::now();
    let (mut s, _) = connect(socket, EXEC_PORT, timeout)?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut all = Vec::new();
    let mut reader = BufReader::new(s);
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(ExecError::Timeout(timeout));
        }
        reader.get_ref().set_read_timeout(Some(left))?;
        match reader.read_until(b'\n', &mut all) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ExecError::Timeout(timeout))
            }
            Err(e) => return Err(e.into()),
        }
    }
    split_status(&all)
}

/// Splits a guest's answer into output and the status of its `ray-exit` line.
pub fn split_status(all: &[u8]) -> Result<ExecOutput, ExecError> {
    let body = all.strip_suffix(b"\n").ok_or(ExecError::NoStatus)?;
    let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let status = std::str::from_utf8(&body[start..])
        .ok()
        .and_then(|l| l.strip_prefix(TRAILER))
        .and_then(|n| n.parse().ok())
        .ok_or(ExecError::NoStatus)?;
    Ok(ExecOutput {
        output: String::from_utf8_lossy(&all[..start]).into_owned(),
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_is_split_off() {
        let o = split_status(b"a\nb\nray-exit 0\n").unwrap();
        assert_eq!(
            o,
            ExecOutput {
                output: "a\nb\n".into(),
                status: 0
            }
        );
        assert_eq!(split_status(b"ray-exit 1\n").unwrap().status, 1);
        assert!(matches!(
            split_status(b"a\nray-exit 1"),
            Err(ExecError::NoStatus)
        ));
        assert!(matches!(split_status(b"a\nb\n"), Err(ExecError::NoStatus)));
        assert!(matches!(split_status(b""), Err(ExecError::NoStatus)));
    }

    #[test]
    fn commands_are_one_short_line() {
        assert!(check_command("echo hi").is_ok());
        assert!(check_command(" ").is_err());
        assert!(check_command("a\nb").is_err());
        let e = check_command(&"x".repeat(300)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the command is 300 bytes long; the guest's shell takes at most 255"
        );
    }
}
