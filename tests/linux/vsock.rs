//! `vsock`: both ends of the Linux vhost-user vsock test (scripts/vhost-qemu-test). The
//! guest side speaks AF_VSOCK (busybox has nothing for it); the host side speaks the
//! hybrid Unix-socket scheme of `ray device serve vsock` (`CONNECT PORT` / `OK ...`, and
//! `<socket>_PORT` for connections the guest opens). Built statically with plain `rustc`,
//! no crates, so that it runs inside a bare initramfs; the few socket calls are declared
//! here against the C library std already links.
//!
//! ```text
//! vsock serve PORT                       (guest) accepts one connection on PORT, reads a
//!                                         line, answers "guest got LINE", prints LINE
//! vsock send CID PORT MESSAGE             (guest) connects to CID:PORT, sends MESSAGE,
//!                                         prints the answer line
//! vsock host-connect SOCKET PORT MESSAGE SECONDS
//!                                         (host) connects to the guest's PORT through
//!                                         SOCKET (retrying until the guest listens), sends
//!                                         MESSAGE, prints the answer line
//! vsock host-serve PATH SECONDS           (host) accepts one connection on PATH, reads a
//!                                         line, answers "host got LINE", prints LINE
//! ```
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;

#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved: u16,
    port: u32,
    cid: u32,
    zero: [u8; 4],
}

extern "C" {
    fn socket(domain: i32, kind: i32, protocol: i32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn listen(fd: i32, backlog: i32) -> i32;
    fn accept(fd: i32, addr: *mut SockaddrVm, len: *mut u32) -> i32;
}

fn vsock_addr(cid: u32, port: u32) -> SockaddrVm {
    SockaddrVm {
        family: AF_VSOCK as u16,
        reserved: 0,
        port,
        cid,
        zero: [0; 4],
    }
}

fn check(what: &str, r: i32) -> Result<i32, String> {
    if r < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(r)
    }
}

fn vsock_socket() -> Result<i32, String> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    check("socket(AF_VSOCK)", unsafe { socket(AF_VSOCK, SOCK_STREAM, 0) })
}

/// Takes ownership of a descriptor the calls above returned.
fn file(fd: i32) -> File {
    // SAFETY: `fd` was just returned by socket(2)/accept(2) and nothing else owns it.
    unsafe { File::from_raw_fd(fd) }
}

fn read_line(from: impl std::io::Read) -> Result<String, String> {
    let mut line = String::new();
    BufReader::new(from)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    Ok(line.trim_end().to_string())
}

/// Reads a line, answers "WHO got LINE", prints the line.
fn answer<S: std::io::Read + Write + Copy>(conn: S, who: &str) -> Result<(), String> {
    let line = read_line(conn)?;
    let mut out = conn;
    out.write_all(format!("{who} got {line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    println!("{line}");
    Ok(())
}

fn number<T: std::str::FromStr>(what: &str, s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("{what} '{s}' is not a number"))
}

fn guest_serve(port: u32) -> Result<(), String> {
    let fd = vsock_socket()?;
    let listener = file(fd);
    let any = vsock_addr(u32::MAX, port);
    let len = std::mem::size_of::<SockaddrVm>() as u32;
    // SAFETY: `any` is a valid sockaddr_vm of `len` bytes for the duration of the call.
    check("bind", unsafe { bind(fd, &any, len) })?;
    // SAFETY: listen(2) on the socket we own.
    check("listen", unsafe { listen(fd, 1) })?;
    let mut peer = vsock_addr(0, 0);
    let mut peer_len = len;
    // SAFETY: `peer` and `peer_len` are writable and sized for a sockaddr_vm.
    let conn = file(check("accept", unsafe {
        accept(fd, &mut peer, &mut peer_len)
    })?);
    drop(listener);
    answer(&conn, "guest")
}

fn guest_send(cid: u32, port: u32, message: &str) -> Result<(), String> {
    let fd = vsock_socket()?;
    let conn = file(fd);
    let to = vsock_addr(cid, port);
    // SAFETY: `to` is a valid sockaddr_vm for the duration of the call.
    check("connect", unsafe {
        connect(fd, &to, std::mem::size_of::<SockaddrVm>() as u32)
    })?;
    (&conn)
        .write_all(format!("{message}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    println!("{}", read_line(&conn)?);
    Ok(())
}

/// One attempt at the hybrid handshake: `Ok(None)` when the guest does not listen yet.
fn host_try(socket: &str, port: u32) -> Result<Option<(UnixStream, BufReader<UnixStream>)>, String> {
    let mut conn = UnixStream::connect(socket).map_err(|e| format!("connect {socket}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    conn.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    let mut answer = String::new();
    let _ = reader.read_line(&mut answer);
    Ok(answer.starts_with("OK ").then_some((conn, reader)))
}

fn host_connect(socket: &str, port: u32, message: &str, seconds: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut conn, mut reader) = loop {
        if let Some(c) = host_try(socket, port)? {
            break c;
        }
        if Instant::now() > deadline {
            return Err(format!("the guest did not accept on port {port} within {seconds} s"));
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    conn.write_all(format!("{message}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    println!("{}", line.trim_end());
    Ok(())
}

fn host_serve(path: &str, seconds: u64) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("bind {path}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(format!("nobody connected to {path} within {seconds} s"));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    conn.set_nonblocking(false).map_err(|e| e.to_string())?;
    answer(&conn, "host")
}

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [cmd, port] if cmd == "serve" => guest_serve(number("port", port)?),
        [cmd, cid, port, message] if cmd == "send" => {
            guest_send(number("cid", cid)?, number("port", port)?, message)
        }
        [cmd, socket, port, message, seconds] if cmd == "host-connect" => host_connect(
            socket,
            number("port", port)?,
            message,
            number("seconds", seconds)?,
        ),
        [cmd, path, seconds] if cmd == "host-serve" => host_serve(path, number("seconds", seconds)?),
        _ => Err("usage: vsock serve PORT | vsock send CID PORT MESSAGE | \
                  vsock host-connect SOCKET PORT MESSAGE SECONDS | vsock host-serve PATH SECONDS"
            .into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vsock: {e}");
            ExitCode::FAILURE
        }
    }
}
