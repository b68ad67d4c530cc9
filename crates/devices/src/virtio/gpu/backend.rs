//! The remote GPU's back end (`ray gpu backend`): the 2D work of a virtio GPU whose VMM
//! keeps only the queues, guest memory and a ledger. Each connection is one GPU with its
//! own resources, scanouts and cursor; its requests are checked as a guest's commands are
//! (the VMM is not trusted either), and each scanout change or flush is answered with the
//! frame areas that changed.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::commands::{Core, Limits, Refusal};
use super::protocol::*;
use super::wire::{self, Message, RecvError, MAX_PIXELS, VERSION};

/// Where a back end listens.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// A Unix socket (made 0600): no token asked.
    pub socket: Option<PathBuf>,
    /// A TCP address: every Hello must carry `token`.
    pub listen: Option<SocketAddr>,
    pub token: Option<Vec<u8>>,
    pub limits: Limits,
}

/// Reads a token file: its bytes, without a trailing newline; 16 to 256 bytes.
pub fn read_token(path: &Path) -> Result<Vec<u8>, String> {
    // A jailed VMM's keeper opens it (it stays private to its owner).
    let mut t = Vec::new();
    ray_outside::open_read(path)
        .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut t))
        .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    while t.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
        t.pop();
    }
    if !(16..=wire::MAX_TOKEN).contains(&t.len()) {
        return Err(format!(
            "the token file {} holds {} bytes; a token has 16 to {}",
            path.display(),
            t.len(),
            wire::MAX_TOKEN
        ));
    }
    Ok(t)
}

/// Listens as `config` says and serves every connection on its own thread, until the
/// process ends. Errors only if a listener cannot be made.
pub fn serve(config: BackendConfig) -> Result<(), String> {
    if config.socket.is_none() && config.listen.is_none() {
        return Err("the back end needs --socket PATH, --listen ADDR or both".into());
    }
    if config.listen.is_some() && config.token.is_none() {
        return Err(
            "--listen needs --token-file: a TCP back end asks every VMM for a token".into(),
        );
    }
    let mut threads = Vec::new();
    if let Some(path) = &config.socket {
        // A stale socket is replaced, anything else at the path refused.
        let l = ray_outside::bind_private(path)?;
        l.set_nonblocking(false)
            .map_err(|e| format!("cannot make {} blocking: {e}", path.display()))?;
        tracing::info!(socket = %path.display(), "GPU back end listening");
        let limits = config.limits;
        threads.push(std::thread::spawn(move || {
            for c in l.incoming() {
                match c {
                    Ok(s) => spawn_conn(s, None, limits, "unix".into()),
                    Err(e) => tracing::warn!("accept: {e}"),
                }
            }
        }));
    }
    if let Some(addr) = config.listen {
        let l = TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local = l.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(%local, "GPU back end listening on TCP (token)");
        println!("listening on {local}");
        let _ = std::io::stdout().flush();
        let token = config.token.clone();
        let limits = config.limits;
        threads.push(std::thread::spawn(move || {
            for c in l.incoming() {
                match c {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        let peer = s
                            .peer_addr()
                            .map_or_else(|_| "tcp".into(), |a: SocketAddr| a.to_string());
                        spawn_conn(s, token.clone(), limits, peer)
                    }
                    Err(e) => tracing::warn!("accept: {e}"),
                }
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

trait Conn: Read + Write + Send + 'static {}
impl Conn for UnixStream {}
impl Conn for TcpStream {}

fn spawn_conn(s: impl Conn, token: Option<Vec<u8>>, limits: Limits, peer: String) {
    let spawned = std::thread::Builder::new()
        .name("gpu-conn".into())
        .spawn(move || {
            let mut s = s;
            match serve_conn(&mut s, token.as_deref(), limits) {
                Ok(()) => tracing::info!(%peer, "VMM left"),
                Err(e) => tracing::warn!(%peer, "connection closed: {e}"),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a connection's thread: {e}");
    }
}

/// Serves one VMM until it leaves (Ok) or breaks the protocol (the reason).
pub fn serve_conn(
    s: &mut (impl Read + Write),
    token: Option<&[u8]>,
    limits: Limits,
) -> Result<(), String> {
    let hello = match wire::recv(s) {
        Ok(m) => m,
        Err(RecvError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let refuse_hello = |s: &mut dyn Write, why: String| {
        let _ = wire::send(
            &mut WriteRef(s),
            &Message::Answer {
                code: RESP_ERR_UNSPEC,
                why: why.clone(),
            },
        );
        Err(why)
    };
    let Message::Hello {
        version,
        token: given,
        modes,
    } = hello
    else {
        return refuse_hello(s, format!("the first message is not a Hello but {hello:?}"));
    };
    if version != VERSION {
        return refuse_hello(
            s,
            format!("protocol version {version}; this back end speaks {VERSION}"),
        );
    }
    if let Some(want) = token {
        if !wire::same_token(want, &given) {
            return refuse_hello(s, "the token is wrong".into());
        }
    }
    for &(w, h) in &modes {
        if !(1..=super::MAX_MODE_EDGE).contains(&w) || !(1..=super::MAX_MODE_EDGE).contains(&h) {
            return refuse_hello(s, format!("a {w}x{h} mode"));
        }
    }
    wire::send(s, &Message::Welcome { version: VERSION }).map_err(|e| e.to_string())?;
    let mut core = Core::new(&modes, limits);
    core.damage = Some(Vec::new());
    loop {
        let m = match wire::recv(s) {
            Ok(m) => m,
            Err(RecvError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        let result = apply(&mut core, m)?;
        for (scanout, rect) in core.damage.replace(Vec::new()).unwrap_or_default() {
            send_damage(s, &core, scanout, rect).map_err(|e| e.to_string())?;
        }
        let answer = match result {
            Ok(()) => Message::Answer {
                code: RESP_OK_NODATA,
                why: String::new(),
            },
            Err(Refusal { code, mut why }) => {
                why.truncate(wire::MAX_WHY);
                while std::str::from_utf8(why.as_bytes()).is_err() {
                    why.pop();
                }
                Message::Answer { code, why }
            }
        };
        wire::send(s, &answer).map_err(|e| e.to_string())?;
    }
}

struct WriteRef<'a>(&'a mut dyn Write);
impl Write for WriteRef<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// One request on the GPU; Err (outer) for a message a VMM does not send.
fn apply(core: &mut Core, m: Message) -> Result<Result<(), Refusal>, String> {
    Ok(match m {
        Message::Reset => {
            core.reset();
            Ok(())
        }
        Message::Create {
            id,
            format,
            width,
            height,
        } => core.create_2d(id, format, width, height),
        Message::Unref { id } => unref(core, id),
        Message::Transfer { id, rect, pixels } => core.transfer_rows(id, rect, &pixels),
        Message::SetScanout { scanout, id, rect } => core.set_scanout(scanout, id, rect),
        Message::Flush { id, rect } => core.flush(id, rect),
        Message::Cursor { command, fields } => core.cursor_fields(command, fields),
        Message::SetMode {
            scanout,
            width,
            height,
        } => {
            if !(1..=super::MAX_MODE_EDGE).contains(&width)
                || !(1..=super::MAX_MODE_EDGE).contains(&height)
            {
                return Err(format!("the VMM asked for a {width}x{height} mode"));
            }
            core.set_mode(scanout as usize, width, height)
                .map_err(|why| Refusal {
                    code: RESP_ERR_INVALID_SCANOUT_ID,
                    why,
                })
        }
        Message::Ping => Ok(()),
        other => return Err(format!("a VMM does not send {}", name(&other))),
    })
}

fn unref(core: &mut Core, id: u32) -> Result<(), Refusal> {
    core.resource(id)?;
    core.forget(id);
    for s in core.scanouts.iter_mut().filter(|s| s.resource == id) {
        s.resource = 0;
    }
    if core.cursor.resource == id {
        core.cursor.resource = 0;
    }
    Ok(())
}

fn name(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::Welcome { .. } => "Welcome",
        Message::Damage { .. } => "Damage",
        Message::Answer { .. } => "Answer",
        _ => "a request",
    }
}

/// Sends `rect` of scanout `scanout`'s frame, in bands of at most [`MAX_PIXELS`].
fn send_damage(s: &mut impl Write, core: &Core, scanout: usize, rect: Rect) -> std::io::Result<()> {
    let Some(sc) = core.scanouts.get(scanout) else {
        return Ok(());
    };
    let line = rect.width as usize * 4;
    if line == 0 || rect.height == 0 {
        return Ok(());
    }
    let band = (MAX_PIXELS / line).max(1) as u32;
    let mut y = rect.y;
    while y < rect.y + rect.height {
        let h = band.min(rect.y + rect.height - y);
        let mut pixels = Vec::with_capacity(line * h as usize);
        for row in y..y + h {
            let at = (row as usize * sc.width as usize + rect.x as usize) * 4;
            pixels.extend_from_slice(&sc.frame[at..at + line]);
        }
        wire::send(
            s,
            &Message::Damage {
                scanout: scanout as u32,
                rect: Rect {
                    x: rect.x,
                    y,
                    width: rect.width,
                    height: h,
                },
                pixels,
            },
        )?;
        y += h;
    }
    Ok(())
}
