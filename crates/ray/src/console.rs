//! `ray vm console`: attach this terminal to a VM's serial console.
//!
//! The terminal goes raw, so every key (Ctrl-C included) goes to the guest, except
//! Ctrl-] which detaches and leaves the VM alone. Any number of consoles can follow one VM;
//! one of them has the input (see the VMM's `GET /vm/console/stream`). Without a terminal
//! (stdin a pipe or a file), the input is sent as it comes and the output followed until
//! the VM ends or Ctrl-] is read.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use ray_api::vmm::{console_frame, ConsoleMode, ConsoleTail};

use ray::client::api_error;
use ray::exit::{self, coded};
use ray::output::{print_structured, OutputArgs};
use ray::runtime;

/// The byte Ctrl-] sends.
pub const DETACH_KEY: u8 = 0x1d;

#[derive(Args)]
pub struct ConsoleArgs {
    /// The VM's id.
    pub id: String,
    /// Take the input over from the console that has it (that one becomes read-only).
    #[arg(long, conflicts_with = "read_only")]
    pub write: bool,
    /// Only watch: never take the input.
    #[arg(long)]
    pub read_only: bool,
    /// Bytes of earlier output to show first when attaching.
    #[arg(long, default_value_t = 4096, value_name = "BYTES")]
    pub history: u64,
    /// Print the last BYTES bytes of output and return instead of attaching.
    #[arg(long, value_name = "BYTES", conflicts_with_all = ["send", "write", "read_only"])]
    pub bytes: Option<u64>,
    /// Type this line into the console (a newline is added) and return instead of attaching.
    #[arg(long, value_name = "LINE", conflicts_with_all = ["write", "read_only"])]
    pub send: Option<String>,
    #[command(flatten)]
    pub out: OutputArgs,
}

pub fn run(runtime: &Path, a: &ConsoleArgs) -> anyhow::Result<()> {
    let c = crate::vm::client(runtime, &a.id)?;
    if let Some(line) = &a.send {
        let body = serde_json::to_vec(&ray_api::vmm::ConsoleInput {
            data: format!("{line}\n"),
        })?;
        let _: serde_json::Value = c.call("POST", "/vm/console", Some(body))?;
        return Ok(());
    }
    if let Some(bytes) = a.bytes {
        let tail: ConsoleTail = c.call("GET", &format!("/vm/console?bytes={bytes}"), None)?;
        if !print_structured(&tail, a.out.format())? {
            print!("{}", tail.data);
        }
        return Ok(());
    }
    let mode = if a.write {
        ConsoleMode::Takeover
    } else if a.read_only {
        ConsoleMode::ReadOnly
    } else {
        ConsoleMode::Auto
    };
    let dir = runtime::vm_dir(runtime, &a.id);
    let how = attach(
        &dir.join("api.sock"),
        &Attach {
            mode,
            start: Start::History(a.history),
            banner: Some(a.id.as_str()),
        },
    )?;
    after(runtime, &a.id, how)
}

/// Where the output of an attachment starts.
pub enum Start {
    /// This many bytes before the current end.
    History(u64),
    /// At this offset (0: everything the VMM still has).
    From(u64),
}

pub struct Attach<'a> {
    pub mode: ConsoleMode,
    pub start: Start,
    /// Say on stderr which VM this is and how to detach.
    pub banner: Option<&'a str>,
}

/// How an attachment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Ctrl-]: the VM runs on.
    Detached,
    /// The VMM said it is ending (the VM is gone).
    VmGone,
    /// The connection closed without a word (the VMM died).
    Lost,
}

/// Tells the person at the console how it ended; an ended VM's record decides the result.
pub fn after(runtime: &Path, id: &str, how: Ended) -> anyhow::Result<()> {
    match how {
        Ended::Detached => {
            eprintln!("[ray: detached from {id}; it keeps running: `ray vm console {id}` re-attaches, `ray vm stop {id}` stops it]");
            Ok(())
        }
        Ended::VmGone | Ended::Lost => {
            let dir = runtime::vm_dir(runtime, id);
            // The VMM writes its exit record as it goes; give it a moment.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match runtime::presence(&dir) {
                    runtime::Presence::Ended(r) => {
                        let state = crate::vm::state_name(r.state);
                        let why = r.reason.unwrap_or_default();
                        eprintln!("[ray: {id} ended: {state} ({why})]");
                        return if r.state == ray_api::vmm::VmStateName::Terminated {
                            Ok(())
                        } else {
                            Err(coded(1, format!("VM '{id}' ended in state {state}: {why}")))
                        };
                    }
                    _ if Instant::now() > deadline => {
                        return Err(coded(
                            exit::UNREACHABLE,
                            format!("the console of '{id}' closed and its VMM left no exit record"),
                        ))
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// The terminal in raw mode while this lives (when stdin is a terminal): keys go to the
/// guest as they are typed, Ctrl-C included. Output processing stays on, so a guest's
/// bare `\n` still starts a new line.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: isatty, tcgetattr, cfmakeraw and tcsetattr only read and write the
        // termios struct we own (zero-initialised plain data) and the terminal of fd 0.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            t.c_oflag |= libc::OPOST | libc::ONLCR;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(Self { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter` on the same fd.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
        }
    }
}

/// Opens the console stream of the VMM at `socket`: sends the upgrade request and reads
/// the answer's head. Returns the stream and whatever followed the head.
fn open(socket: &Path, how: &Attach) -> anyhow::Result<(UnixStream, Vec<u8>)> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        coded(
            exit::UNREACHABLE,
            format!("cannot reach the VMM at {}: {e}", socket.display()),
        )
    })?;
    let mode = match how.mode {
        ConsoleMode::Auto => "auto",
        ConsoleMode::ReadOnly => "read_only",
        ConsoleMode::Takeover => "takeover",
    };
    let start = match how.start {
        Start::History(n) => format!("history={}", n.min(ray_api::vmm::CONSOLE_KEPT_BYTES)),
        Start::From(o) => format!("from={o}"),
    };
    write!(
        s,
        "GET /vm/console/stream?mode={mode}&{start} HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\nUpgrade: ray-console\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            anyhow::bail!("the VMM closed the console connection before answering");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let rest = buf[head_end..].to_vec();
    if status == 101 {
        return Ok((s, rest));
    }
    // An error answer: its body is an ErrorBody of Content-Length bytes.
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = rest;
    while body.len() < len {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Err(api_error(status, &body).into())
}

/// Attaches this process's stdin and stdout to the console of the VMM at `socket` until
/// Ctrl-], the VM's end or a lost connection.
pub fn attach(socket: &Path, how: &Attach) -> anyhow::Result<Ended> {
    let (stream, pending) = open(socket, how)?;
    let raw = RawTerminal::enter();
    // In raw mode the terminal does not turn `\n` into a line start for our own notes.
    let nl = if raw.is_some() { "\r\n" } else { "\n" };
    if let Some(id) = how.banner {
        eprint!("[ray: attached to {id}; Ctrl-] detaches]{nl}");
    }
    let mut input = stream.try_clone()?;
    let detach = stream.try_clone()?;
    let detached = Arc::new(AtomicBool::new(false));
    let asked = detached.clone();
    std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 1024];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return, // no more input; the output goes on
                    Ok(n) => n,
                };
                let keys = &buf[..n];
                match keys.iter().position(|b| *b == DETACH_KEY) {
                    Some(i) => {
                        let _ = input.write_all(&keys[..i]);
                        asked.store(true, Ordering::SeqCst);
                        let _ = detach.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    None => {
                        if input.write_all(keys).is_err() {
                            return;
                        }
                    }
                }
            }
        })?;
    let ended = follow(stream, pending, nl, &detached);
    drop(raw);
    ended
}

/// Reads frames until the end: output to stdout, notes to stderr.
fn follow(
    mut stream: UnixStream,
    mut buf: Vec<u8>,
    nl: &str,
    detached: &AtomicBool,
) -> anyhow::Result<Ended> {
    let mut out = std::io::stdout();
    let mut chunk = vec![0u8; 64 << 10];
    let mut writes: Option<bool> = None;
    loop {
        while let Some((kind, payload, used)) = console_frame::decode(&buf) {
            match kind {
                console_frame::OUTPUT => {
                    out.write_all(payload)?;
                    out.flush()?;
                }
                console_frame::NOTICE => {
                    eprint!("{nl}[ray: {}]{nl}", String::from_utf8_lossy(payload));
                }
                console_frame::MODE => {
                    let now = payload == b"write";
                    // Say so when the input moves, and when attaching without it.
                    if writes.is_some() || !now {
                        eprint!(
                            "{nl}[ray: {}]{nl}",
                            if now {
                                "this console has the input now"
                            } else {
                                "read-only: another console has the input (--write takes it over)"
                            }
                        );
                    }
                    writes = Some(now);
                }
                console_frame::END => return Ok(Ended::VmGone),
                _ => {}
            }
            buf.drain(..used);
        }
        // An error is Ctrl-] having shut the socket down under us.
        let n = stream.read(&mut chunk).unwrap_or_default();
        if n == 0 {
            // Our own shutdown (Ctrl-]) reads as an end too.
            return Ok(if detached.load(Ordering::SeqCst) {
                Ended::Detached
            } else {
                Ended::Lost
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
