//! The VMM's side of a remote GPU: the link to its back end.
//!
//! The device keeps the virtqueues, guest memory and a ledger ([`Core::new_ledger`]:
//! resources, backings, scanouts, cursor, no pixels), checks every guest command on the
//! ledger as the paravirt GPU does, and sends the back end what it needs: the commands'
//! parameters and, for a transfer, the pixels read out of the guest's backing. The back
//! end answers each request and sends the frame areas that changed, which the VMM keeps
//! as the scanouts' frames (what screenshots, VNC and encode sessions read).
//!
//! The link is Ready or in Error (with the reason). In Error the commands that need the
//! back end are refused with an error response naming the state; the frames keep their
//! last picture. A watcher thread pings a Ready link and reconnects a broken one with
//! backoff (100 ms doubling to 2 s); on a new connection it replays the ledger: every
//! resource, a full transfer from its backing in guest RAM, the scanouts and the cursor,
//! so the display is right again without the guest doing anything.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ray_memory::GuestMemory;

use super::commands::{Core, Refusal};
use super::protocol::*;
use super::wire::{self, Message, MAX_PIXELS, VERSION};

/// How long the VMM waits by default for a back end's whole answer (with the damage that
/// comes before it) before it gives the link up; `timeout-ms` sets it per GPU.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest wait between reconnection attempts.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often the watcher checks a Ready link.
pub const PING_EVERY: Duration = Duration::from_millis(250);

/// Where the back end is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    /// A TCP back end and the token it asks for.
    Tcp {
        addr: SocketAddr,
        token: Vec<u8>,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp { addr, .. } => write!(f, "tcp:{addr}"),
        }
    }
}

trait Stream: Read + Write + Send {
    /// Bounds the next reads.
    fn set_wait(&self, wait: Duration) -> std::io::Result<()>;
}
impl Stream for UnixStream {
    fn set_wait(&self, wait: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(wait))
    }
}
impl Stream for TcpStream {
    fn set_wait(&self, wait: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(wait))
    }
}

/// Reads of one answer, all before one deadline: a back end that stops, or trickles,
/// is given up when the bound has passed, not a bound per read.
struct Bounded<'a> {
    stream: &'a mut Box<dyn Stream>,
    deadline: Instant,
    /// What the socket's read timeout was last set to.
    wait: Duration,
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        // Only shortened (a syscall) when less than the last wait is left.
        if left < self.wait {
            self.stream.set_wait(left)?;
            self.wait = left;
        }
        match self.stream.read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(timed_out())
            }
            r => r,
        }
    }
}

/// The link's state as the GPU model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Ready,
    /// Not connected, and why (the last failure).
    Error(String),
}

/// The link to a back end.
pub struct Link {
    endpoint: Endpoint,
    /// The bound on one answer.
    timeout: Duration,
    conn: Option<Box<dyn Stream>>,
    state: LinkState,
    backoff: Duration,
    next_try: Instant,
    last_ping: Instant,
    /// Connections made (the first and every reconnection).
    pub connections: u64,
}

/// A connection made, not yet greeted.
pub struct Opened(Box<dyn Stream>);

fn is_timeout(e: &wire::RecvError) -> bool {
    matches!(e, wire::RecvError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut)
}

/// A request the link could not serve.
#[derive(Debug, Clone)]
pub struct LinkDown(pub String);

impl Link {
    /// A link to `endpoint` that waits at most `timeout` for an answer.
    pub fn new(endpoint: Endpoint, timeout: Duration) -> Self {
        Self {
            timeout,
            state: LinkState::Error(format!("not connected to the back end at {endpoint} yet")),
            endpoint,
            conn: None,
            backoff: BACKOFF_MIN,
            next_try: Instant::now(),
            last_ping: Instant::now(),
            connections: 0,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Takes one frame from the connection within the bound, starting now; the socket's
    /// wait is put back to the whole bound for the next answer.
    fn recv(&mut self) -> Result<Message, String> {
        let timeout = self.timeout;
        let Some(conn) = self.conn.as_mut() else {
            return Err("the link has no connection".into());
        };
        let mut b = Bounded {
            stream: conn,
            deadline: Instant::now() + timeout,
            wait: timeout,
        };
        let r = wire::recv(&mut b);
        if b.wait < timeout {
            let _ = b.stream.set_wait(timeout);
        }
        r.map_err(|e| {
            if is_timeout(&e) {
                format!(
                    "the back end did not answer within {} ms",
                    timeout.as_millis()
                )
            } else {
                format!("the back end's answer: {e}")
            }
        })
    }

    pub fn state(&self) -> &LinkState {
        &self.state
    }

    /// Gives the connection up: Error with `why`; the next attempt after the backoff.
    fn broken(&mut self, why: String) -> LinkDown {
        if self.conn.take().is_some() {
            tracing::warn!(backend = %self.endpoint, "remote GPU back end lost: {why}");
        }
        self.state = LinkState::Error(why.clone());
        self.next_try = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        LinkDown(why)
    }

    /// Sends `m` and reads the answer; damage frames go into `core`'s scanout frames
    /// (checked: inside the scanout's mode). A refusal is the back end's error code.
    pub fn call(&mut self, core: &mut Core, m: &Message) -> Result<Result<(), Refusal>, LinkDown> {
        let Some(conn) = self.conn.as_mut() else {
            let LinkState::Error(why) = &self.state else {
                return Err(self.broken("the link has no connection".into()));
            };
            return Err(LinkDown(format!(
                "the remote GPU is in state error ({why})"
            )));
        };
        if let Err(e) = wire::send(conn, m) {
            return Err(self.broken(format!("cannot send to the back end: {e}")));
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            if Instant::now() >= deadline {
                return Err(self.broken(format!(
                    "the back end did not finish its answer within {} ms",
                    self.timeout.as_millis()
                )));
            }
            let answer = match self.recv() {
                Ok(a) => a,
                Err(why) => return Err(self.broken(why)),
            };
            match answer {
                Message::Damage {
                    scanout,
                    rect,
                    pixels,
                } => {
                    if let Err(why) = apply_damage(core, scanout, rect, &pixels) {
                        return Err(self.broken(format!("the back end sent bad damage: {why}")));
                    }
                }
                Message::Answer { code, why } => {
                    return match code {
                        RESP_OK_NODATA => Ok(Ok(())),
                        RESP_ERR_UNSPEC
                        | RESP_ERR_OUT_OF_MEMORY
                        | RESP_ERR_INVALID_SCANOUT_ID
                        | RESP_ERR_INVALID_RESOURCE_ID
                        | RESP_ERR_INVALID_PARAMETER => Ok(Err(Refusal {
                            code,
                            why: format!("the back end refused: {why}"),
                        })),
                        other => Err(self.broken(format!(
                            "the back end answered with code {other:#x}, not a virtio-gpu response"
                        ))),
                    };
                }
                other => {
                    return Err(self.broken(format!(
                        "the back end sent {other:?} where an answer belongs"
                    )))
                }
            }
        }
    }

    /// While Ready: checks the back end is there (every [`PING_EVERY`]).
    pub fn ping_due(&self) -> bool {
        self.conn.is_some() && self.last_ping.elapsed() >= PING_EVERY
    }

    pub fn ping(&mut self, core: &mut Core) {
        self.last_ping = Instant::now();
        match self.call(core, &Message::Ping) {
            Ok(Ok(())) => {}
            Ok(Err(r)) => {
                self.broken(format!("the back end refused a ping: {}", r.why));
            }
            Err(_) => {}
        }
    }

    /// Whether a reconnection attempt is due.
    pub fn reconnect_due(&self) -> bool {
        self.conn.is_none() && Instant::now() >= self.next_try
    }

    /// Connects to `endpoint` (no lock held: a TCP connect may take a while).
    pub fn open(endpoint: &Endpoint, timeout: Duration) -> Result<Opened, String> {
        match endpoint {
            Endpoint::Unix(path) => {
                // Jailed, through the keeper (the socket is outside the jail).
                let s = ray_outside::connect_unix(path).map_err(|e| {
                    format!("cannot connect to the back end at {}: {e}", path.display())
                })?;
                let _ = s.set_read_timeout(Some(timeout));
                let _ = s.set_write_timeout(Some(timeout));
                Ok(Opened(Box::new(s)))
            }
            Endpoint::Tcp { addr, .. } => {
                // Blocking connect: no non-blocking switch (an ioctl the thread's
                // filter does not allow); refused at once on a closed loopback port.
                let s = ray_outside::connect_tcp(*addr)
                    .map_err(|e| format!("cannot connect to the back end at {addr}: {e}"))?;
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(timeout));
                let _ = s.set_write_timeout(Some(timeout));
                Ok(Opened(Box::new(s)))
            }
        }
    }

    /// One connection attempt with every lock held (at the device's start).
    pub fn connect(
        &mut self,
        core: &mut Core,
        mem: &(dyn GuestMemory + Send + Sync),
    ) -> Result<(), LinkDown> {
        let opened = Self::open(&self.endpoint, self.timeout);
        self.attach(opened, core, mem)
    }

    /// Takes a new connection (or why there is none): says Hello and replays `core` (the
    /// ledger) from guest memory. Ready on success; Error with the reason otherwise.
    pub fn attach(
        &mut self,
        opened: Result<Opened, String>,
        core: &mut Core,
        mem: &(dyn GuestMemory + Send + Sync),
    ) -> Result<(), LinkDown> {
        let conn = match opened {
            Ok(Opened(c)) => c,
            Err(why) => return Err(self.broken(why)),
        };
        let token = match &self.endpoint {
            Endpoint::Unix(_) => Vec::new(),
            Endpoint::Tcp { token, .. } => token.clone(),
        };
        self.conn = Some(conn);
        let hello = Message::Hello {
            version: VERSION,
            token,
            modes: core.scanouts.iter().map(|s| (s.width, s.height)).collect(),
        };
        let Some(c) = self.conn.as_mut() else {
            return Err(self.broken("the link has no connection".into()));
        };
        if let Err(e) = wire::send(c, &hello) {
            return Err(self.broken(format!("cannot greet the back end: {e}")));
        }
        match self.recv() {
            Ok(Message::Welcome { version: VERSION }) => {}
            Ok(Message::Answer { why, .. }) => {
                return Err(self.broken(format!("the back end refused this VMM: {why}")))
            }
            Ok(other) => {
                return Err(self.broken(format!("the back end answered the Hello with {other:?}")))
            }
            Err(why) => return Err(self.broken(format!("no welcome from the back end: {why}"))),
        }
        self.replay(core, mem)?;
        self.state = LinkState::Ready;
        self.backoff = BACKOFF_MIN;
        self.last_ping = Instant::now();
        self.connections += 1;
        tracing::info!(backend = %self.endpoint, "remote GPU back end ready");
        Ok(())
    }

    /// Sends the back end what the ledger holds: resources, their pixels from the guest's
    /// backing, scanouts, cursor.
    pub fn replay(
        &mut self,
        core: &mut Core,
        mem: &(dyn GuestMemory + Send + Sync),
    ) -> Result<(), LinkDown> {
        let must = |r: Result<(), Refusal>, what: String| {
            r.map_err(|e| format!("the back end refused the replay of {what}: {}", e.why))
        };
        let step = |link: &mut Link, core: &mut Core, m: Message, what: String| {
            let r = link.call(core, &m)?;
            must(r, what).map_err(|why| link.broken(why))
        };
        step(self, core, Message::Reset, "a reset".into())?;
        let resources: Vec<_> = core
            .resources
            .iter()
            .map(|(&id, r)| {
                (
                    id,
                    r.format as u32,
                    r.width,
                    r.height,
                    !r.backing.is_empty(),
                )
            })
            .collect();
        for (id, format, width, height, backed) in resources {
            step(
                self,
                core,
                Message::Create {
                    id,
                    format,
                    width,
                    height,
                },
                format!("resource {id}"),
            )?;
            let whole = Rect {
                x: 0,
                y: 0,
                width,
                height,
            };
            // A backing too short for the whole image leaves the resource black (a guest
            // may transfer parts), as a restore does.
            if backed {
                if let Ok(pixels) = core.gather(id, whole, 0, mem) {
                    for m in bands(id, whole, pixels) {
                        step(self, core, m, format!("resource {id}'s pixels"))?;
                    }
                }
            }
        }
        for i in 0..core.scanouts.len() {
            let (id, rect) = (core.scanouts[i].resource, core.scanouts[i].rect);
            if id != 0 {
                let m = Message::SetScanout {
                    scanout: i as u32,
                    id,
                    rect,
                };
                step(self, core, m, format!("scanout {i}"))?;
            }
        }
        let c = core.cursor;
        if c.resource != 0 {
            let m = Message::Cursor {
                command: CMD_UPDATE_CURSOR,
                fields: [c.scanout, c.x, c.y, 0, c.resource, c.hot_x, c.hot_y],
            };
            step(self, core, m, "the cursor".into())?;
        }
        Ok(())
    }
}

/// A transfer's pixels as Transfer messages of at most [`MAX_PIXELS`] bytes each.
pub fn bands(id: u32, rect: Rect, pixels: Vec<u8>) -> Vec<Message> {
    let line = rect.width as usize * 4;
    if line == 0 || rect.height == 0 || pixels.len() <= MAX_PIXELS {
        return vec![Message::Transfer { id, rect, pixels }];
    }
    let rows = (MAX_PIXELS / line).max(1);
    pixels
        .chunks(rows * line)
        .enumerate()
        .map(|(i, chunk)| Message::Transfer {
            id,
            rect: Rect {
                x: rect.x,
                y: rect.y + (i * rows) as u32,
                width: rect.width,
                height: (chunk.len() / line) as u32,
            },
            pixels: chunk.to_vec(),
        })
        .collect()
}

/// Copies a back end's damage into a scanout's frame, checked: a scanout that exists, a
/// rectangle inside its mode, the pixels it needs.
fn apply_damage(core: &mut Core, scanout: u32, rect: Rect, pixels: &[u8]) -> Result<(), String> {
    let n = core.scanouts.len();
    let Some(s) = core.scanouts.get_mut(scanout as usize) else {
        return Err(format!(
            "scanout {scanout} does not exist (this GPU has {n})"
        ));
    };
    if !rect.inside(s.width, s.height) {
        return Err(format!(
            "rectangle {}x{}+{}+{} is outside scanout {scanout} ({}x{})",
            rect.width, rect.height, rect.x, rect.y, s.width, s.height
        ));
    }
    let line = rect.width as usize * 4;
    if pixels.len() != line * rect.height as usize {
        return Err(format!(
            "{} bytes of pixels for {}x{}",
            pixels.len(),
            rect.width,
            rect.height
        ));
    }
    if line > 0 {
        for (row, src) in pixels.chunks_exact(line).enumerate() {
            let at = ((rect.y as usize + row) * s.width as usize + rect.x as usize) * 4;
            s.frame[at..at + line].copy_from_slice(src);
        }
    }
    s.flushes += 1;
    Ok(())
}

/// Serves one control-queue command of a remote GPU: checked and recorded on the ledger,
/// then sent to the back end. Commands that need the back end are refused while the link
/// is down, before the ledger changes.
pub fn command(
    core: &mut Core,
    link: &mut Link,
    hdr: &Header,
    req: &[u8],
    mem: &(dyn GuestMemory + Send + Sync),
) -> Result<(u32, Vec<u8>), Refusal> {
    let down = |link: &Link| -> Result<(), Refusal> {
        match link.state() {
            LinkState::Ready => Ok(()),
            LinkState::Error(why) => Err(Refusal {
                code: RESP_ERR_UNSPEC,
                why: format!("the remote GPU is in state error: {why}"),
            }),
        }
    };
    let lost = |e: LinkDown| Refusal {
        code: RESP_ERR_UNSPEC,
        why: format!("the remote GPU's back end failed: {}", e.0),
    };
    let mut r = Reader::new(&req[HDR_LEN.min(req.len())..]);
    match hdr.kind {
        CMD_RESOURCE_CREATE_2D => {
            down(link)?;
            let answer = core.command(hdr, req, mem)?;
            let (Some(id), Some(format), Some(width), Some(height)) =
                (r.u32(), r.u32(), r.u32(), r.u32())
            else {
                return Ok(answer);
            };
            let m = Message::Create {
                id,
                format,
                width,
                height,
            };
            match link.call(core, &m) {
                Ok(Ok(())) => Ok(answer),
                Ok(Err(refusal)) => {
                    core.forget(id);
                    Err(refusal)
                }
                Err(e) => {
                    core.forget(id);
                    Err(lost(e))
                }
            }
        }
        CMD_TRANSFER_TO_HOST_2D => {
            down(link)?;
            let (Some(rect), Some(offset), Some(id)) = (r.rect(), r.u64(), r.u32()) else {
                return core.command(hdr, req, mem);
            };
            let pixels = core.gather(id, rect, offset, mem)?;
            for m in bands(id, rect, pixels) {
                link.call(core, &m).map_err(lost)??;
            }
            Ok((RESP_OK_NODATA, Vec::new()))
        }
        CMD_RESOURCE_UNREF | CMD_SET_SCANOUT | CMD_RESOURCE_FLUSH => {
            down(link)?;
            let m = match hdr.kind {
                CMD_RESOURCE_UNREF => r.u32().map(|id| Message::Unref { id }),
                CMD_SET_SCANOUT => (|| {
                    let rect = r.rect()?;
                    Some(Message::SetScanout {
                        rect,
                        scanout: r.u32()?,
                        id: r.u32()?,
                    })
                })(),
                _ => (|| {
                    let rect = r.rect()?;
                    Some(Message::Flush { rect, id: r.u32()? })
                })(),
            };
            // Checked and recorded on the ledger first (a short request is refused there).
            let answer = core.command(hdr, req, mem)?;
            let Some(m) = m else {
                return Ok(answer);
            };
            link.call(core, &m).map_err(lost)??;
            Ok(answer)
        }
        // Display information, EDID and backings are the VMM's own.
        _ => core.command(hdr, req, mem),
    }
}

/// Serves one cursor-queue command of a remote GPU.
pub fn cursor_command(
    core: &mut Core,
    link: &mut Link,
    hdr: &Header,
    req: &[u8],
) -> Result<(), Refusal> {
    if let LinkState::Error(why) = link.state() {
        return Err(Refusal {
            code: RESP_ERR_UNSPEC,
            why: format!("the remote GPU is in state error: {why}"),
        });
    }
    let before = core.cursor;
    core.cursor_command(hdr, req)?;
    let c = core.cursor;
    let m = Message::Cursor {
        command: hdr.kind,
        fields: [c.scanout, c.x, c.y, 0, c.resource, c.hot_x, c.hot_y],
    };
    match link.call(core, &m) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(refusal)) => {
            core.cursor = before;
            Err(refusal)
        }
        Err(e) => {
            core.cursor = before;
            Err(Refusal {
                code: RESP_ERR_UNSPEC,
                why: format!("the remote GPU's back end failed: {}", e.0),
            })
        }
    }
}
