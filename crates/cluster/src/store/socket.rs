//! The [`Store`] of a single host, served over a Unix socket: `ray controller` without etcd
//! owns the redb file (redb locks it: one process) and serves it to the host's agent and to
//! `ray cluster` through `store.sock` beside it; [`SocketStore`] is their client.
//!
//! The protocol is JSON lines. A client connects, writes one request a line and reads one
//! reply a line; a `watch` request turns the connection into a stream of `event` lines
//! (or one `error` line) until either side closes it. Values travel as hex. Leases,
//! revisions and watches are the served store's own, so the client behaves exactly as the
//! store behind it (the conformance suite runs against it).
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

use super::{
    Commit, Cond, Event, Kv, LeaseId, Listing, Op, Revision, Store, StoreError, Txn, Watch,
};

/// The socket's file name in the store directory.
pub const SOCKET: &str = "store.sock";
/// The redb file's name in the store directory.
pub const FILE: &str = "store.redb";
/// Longest wait for one reply (a watch's creation included, not its events).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a store socket that is not there (a restarting controller).
const RECONNECT: Duration = Duration::from_secs(10);
/// Longest request line the server reads (a transaction of many puts fits).
const MAX_LINE: usize = 16 << 20;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireKv {
    key: String,
    /// Hex.
    value: String,
    create_revision: Revision,
    mod_revision: Revision,
    #[serde(default)]
    lease: Option<LeaseId>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum WireCond {
    Absent,
    Present,
    ModRevision(Revision),
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum WireOp {
    Put {
        key: String,
        value: String,
        #[serde(default)]
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Get {
        key: String,
    },
    List {
        prefix: String,
    },
    Commit {
        compares: Vec<(String, WireCond)>,
        ops: Vec<WireOp>,
    },
    Grant {
        ttl_ms: u64,
    },
    KeepAlive {
        lease: LeaseId,
    },
    Revoke {
        lease: LeaseId,
    },
    Watch {
        prefix: String,
        from: Revision,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum WireError {
    Backend(String),
    NoLease(LeaseId),
    Compacted { wanted: Revision, oldest: Revision },
    WatchEnded(String),
    BadTtl { ttl_ms: u64 },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Reply {
    Kv(Option<WireKv>),
    Listing {
        kvs: Vec<WireKv>,
        revision: Revision,
    },
    Done(Revision),
    Conflict,
    Lease(LeaseId),
    TtlMs(u64),
    Ok,
    Watching,
    Put(WireKv),
    Delete {
        key: String,
        revision: Revision,
    },
    Error(WireError),
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, StoreError> {
    if !s.len().is_multiple_of(2) {
        return Err(bad_wire(format!("a value of odd hex length {}", s.len())));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| bad_wire(format!("a value that is not hex at offset {i}")))
        })
        .collect()
}

fn bad_wire(what: String) -> StoreError {
    StoreError::Backend(format!("store socket: {what}"))
}

impl From<&Kv> for WireKv {
    fn from(kv: &Kv) -> Self {
        WireKv {
            key: kv.key.clone(),
            value: hex(&kv.value),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }
    }
}

impl WireKv {
    fn into_kv(self) -> Result<Kv, StoreError> {
        Ok(Kv {
            value: unhex(&self.value)?,
            key: self.key,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            lease: self.lease,
        })
    }
}

impl From<StoreError> for WireError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Backend(m) => WireError::Backend(m),
            StoreError::NoLease(l) => WireError::NoLease(l),
            StoreError::Compacted { wanted, oldest } => WireError::Compacted { wanted, oldest },
            StoreError::WatchEnded(m) => WireError::WatchEnded(m),
            StoreError::BadTtl(d) => WireError::BadTtl {
                ttl_ms: d.as_millis() as u64,
            },
        }
    }
}

impl From<WireError> for StoreError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Backend(m) => StoreError::Backend(m),
            WireError::NoLease(l) => StoreError::NoLease(l),
            WireError::Compacted { wanted, oldest } => StoreError::Compacted { wanted, oldest },
            WireError::WatchEnded(m) => StoreError::WatchEnded(m),
            WireError::BadTtl { ttl_ms } => StoreError::BadTtl(Duration::from_millis(ttl_ms)),
        }
    }
}

fn event_reply(ev: Event) -> Reply {
    match ev {
        Event::Put(kv) => Reply::Put(WireKv::from(&kv)),
        Event::Delete { key, revision } => Reply::Delete { key, revision },
    }
}

fn line(reply: &Reply) -> Vec<u8> {
    let mut l = serde_json::to_vec(reply).unwrap_or_default();
    l.push(b'\n');
    l
}

// ---- the server ---------------------------------------------------------------------------

/// Binds `path` (mode 0600: the store is the whole cluster's state), replacing a stale
/// socket file.
pub fn bind(path: &Path) -> Result<UnixListener, StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |e: std::io::Error| {
        StoreError::Backend(format!("cannot serve the store on {}: {e}", path.display()))
    };
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    l.set_nonblocking(true).map_err(fail)?;
    UnixListener::from_std(l).map_err(fail)
}

/// Serves `store` on `listener` until the task is dropped: one task per connection.
pub async fn serve<S: Store + Clone>(store: S, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                let store = store.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(store, conn).await {
                        tracing::debug!("a store socket connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("the store socket cannot accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn read_line(r: &mut BufReader<OwnedReadHalf>) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(std::io::Error::other(if buf.len() > MAX_LINE {
            format!("a line longer than {MAX_LINE} bytes")
        } else {
            "a line cut short".to_string()
        }));
    }
    buf.pop();
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| std::io::Error::other("a line that is not UTF-8"))
}

async fn connection<S: Store>(store: S, conn: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    while let Some(text) = read_line(&mut r).await? {
        let request = match serde_json::from_str::<Request>(&text) {
            Ok(req) => req,
            Err(e) => {
                let e = WireError::Backend(format!("store socket: invalid request: {e}"));
                w.write_all(&line(&Reply::Error(e))).await?;
                continue;
            }
        };
        let reply = match request {
            Request::Watch { prefix, from } => {
                return match store.watch(&prefix, from).await {
                    Ok(watch) => {
                        w.write_all(&line(&Reply::Watching)).await?;
                        stream(watch, r, w).await
                    }
                    Err(e) => w.write_all(&line(&Reply::Error(e.into()))).await,
                };
            }
            other => answer(&store, other).await,
        };
        w.write_all(&line(&reply)).await?;
    }
    Ok(())
}

/// Forwards a watch's events until the client closes its end (or the watch ends).
async fn stream<W: Watch>(
    mut watch: W,
    mut r: BufReader<OwnedReadHalf>,
    mut w: OwnedWriteHalf,
) -> std::io::Result<()> {
    let mut sink = [0u8; 64];
    loop {
        tokio::select! {
            ev = watch.next() => match ev {
                Ok(ev) => w.write_all(&line(&event_reply(ev))).await?,
                Err(e) => return w.write_all(&line(&Reply::Error(e.into()))).await,
            },
            n = r.read(&mut sink) => if n? == 0 {
                return Ok(());
            },
        }
    }
}

async fn answer<S: Store>(store: &S, request: Request) -> Reply {
    let result: Result<Reply, StoreError> = async {
        Ok(match request {
            Request::Get { key } => Reply::Kv(store.get(&key).await?.as_ref().map(WireKv::from)),
            Request::List { prefix } => {
                let l = store.list(&prefix).await?;
                Reply::Listing {
                    kvs: l.kvs.iter().map(WireKv::from).collect(),
                    revision: l.revision,
                }
            }
            Request::Commit { compares, ops } => {
                let txn = Txn {
                    compares: compares
                        .into_iter()
                        .map(|(k, c)| {
                            let c = match c {
                                WireCond::Absent => Cond::Absent,
                                WireCond::Present => Cond::Present,
                                WireCond::ModRevision(r) => Cond::ModRevision(r),
                            };
                            (k, c)
                        })
                        .collect(),
                    ops: ops
                        .into_iter()
                        .map(|op| {
                            Ok(match op {
                                WireOp::Put { key, value, lease } => Op::Put {
                                    key,
                                    value: unhex(&value)?,
                                    lease,
                                },
                                WireOp::Delete { key } => Op::Delete { key },
                            })
                        })
                        .collect::<Result<_, StoreError>>()?,
                };
                match store.commit(txn).await? {
                    Commit::Done(r) => Reply::Done(r),
                    Commit::Conflict => Reply::Conflict,
                }
            }
            Request::Grant { ttl_ms } => {
                Reply::Lease(store.grant(Duration::from_millis(ttl_ms)).await?)
            }
            Request::KeepAlive { lease } => {
                Reply::TtlMs(store.keep_alive(lease).await?.as_millis() as u64)
            }
            Request::Revoke { lease } => {
                store.revoke(lease).await?;
                Reply::Ok
            }
            Request::Watch { .. } => {
                return Err(bad_wire("a watch in the middle of a connection".into()))
            }
        })
    }
    .await;
    result.unwrap_or_else(|e| Reply::Error(e.into()))
}

// ---- the client ---------------------------------------------------------------------------

/// A client of a store served on a Unix socket. Cheap to clone; each request opens its own
/// connection (a local socket: tens of microseconds), so clones share nothing. A request
/// finding nothing listening retries for up to 10 s (a controller restart); a request cut
/// off half-way is not sent again (it may have been carried out): its error goes up.
#[derive(Clone, Debug)]
pub struct SocketStore {
    path: PathBuf,
}

struct Conn {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl SocketStore {
    /// A client of the store served at `path`; checks that something answers there.
    pub async fn connect(path: &Path) -> Result<SocketStore, StoreError> {
        let s = SocketStore {
            path: path.to_path_buf(),
        };
        s.open().await?;
        Ok(s)
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend(format!(
            "cannot reach the store at {} ({e}): is `ray controller` running with this store directory, or does the cluster use etcd (--etcd)?",
            self.path.display()
        ))
    }

    async fn open(&self) -> Result<Conn, StoreError> {
        let conn = tokio::time::timeout(REQUEST_TIMEOUT, UnixStream::connect(&self.path))
            .await
            .map_err(|_| self.unreachable("connect timed out"))?
            .map_err(|e| self.unreachable(e))?;
        let (r, w) = conn.into_split();
        Ok(Conn {
            r: BufReader::new(r),
            w,
        })
    }

    async fn send(&self, c: &mut Conn, request: &Request) -> Result<Reply, StoreError> {
        let mut l = serde_json::to_vec(request).map_err(|e| bad_wire(e.to_string()))?;
        l.push(b'\n');
        let exchange = async {
            c.w.write_all(&l).await?;
            read_line(&mut c.r).await
        };
        let text = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| self.unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))?
            .map_err(|e| self.unreachable(e))?
            .ok_or_else(|| self.unreachable("the server closed the connection"))?;
        match serde_json::from_str::<Reply>(&text) {
            Ok(Reply::Error(e)) => Err(e.into()),
            Ok(r) => Ok(r),
            Err(e) => Err(bad_wire(format!("an invalid reply: {e}"))),
        }
    }

    /// Opens a connection, retrying for a while if nothing listens: a controller being
    /// restarted is back within that time, and its clients carry on.
    async fn reopen(&self) -> Result<Conn, StoreError> {
        let deadline = tokio::time::Instant::now() + RECONNECT;
        loop {
            match self.open().await {
                Ok(c) => return Ok(c),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn ask(&self, request: Request) -> Result<Reply, StoreError> {
        let mut c = self.reopen().await?;
        self.send(&mut c, &request).await
    }
}

fn unexpected<T>(what: &str) -> Result<T, StoreError> {
    Err(bad_wire(format!("an unexpected reply to {what}")))
}

/// A watch through the socket: one connection streaming events.
pub struct SocketWatch {
    conn: Conn,
}

impl Watch for SocketWatch {
    async fn next(&mut self) -> Result<Event, StoreError> {
        let text = read_line(&mut self.conn.r)
            .await
            .map_err(|e| StoreError::WatchEnded(format!("the store socket failed: {e}")))?
            .ok_or_else(|| StoreError::WatchEnded("the store socket was closed".into()))?;
        match serde_json::from_str::<Reply>(&text) {
            Ok(Reply::Put(kv)) => Ok(Event::Put(kv.into_kv()?)),
            Ok(Reply::Delete { key, revision }) => Ok(Event::Delete { key, revision }),
            Ok(Reply::Error(e)) => Err(e.into()),
            Ok(_) => unexpected("a watch"),
            Err(e) => Err(bad_wire(format!("an invalid event: {e}"))),
        }
    }
}

impl Store for SocketStore {
    type Watch = SocketWatch;

    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        match self.ask(Request::Get { key: key.into() }).await? {
            Reply::Kv(kv) => kv.map(WireKv::into_kv).transpose(),
            _ => unexpected("get"),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        match self
            .ask(Request::List {
                prefix: prefix.into(),
            })
            .await?
        {
            Reply::Listing { kvs, revision } => Ok(Listing {
                kvs: kvs
                    .into_iter()
                    .map(WireKv::into_kv)
                    .collect::<Result<_, _>>()?,
                revision,
            }),
            _ => unexpected("list"),
        }
    }

    async fn commit(&self, txn: Txn) -> Result<Commit, StoreError> {
        let request = Request::Commit {
            compares: txn
                .compares
                .into_iter()
                .map(|(k, c)| {
                    let c = match c {
                        Cond::Absent => WireCond::Absent,
                        Cond::Present => WireCond::Present,
                        Cond::ModRevision(r) => WireCond::ModRevision(r),
                    };
                    (k, c)
                })
                .collect(),
            ops: txn
                .ops
                .into_iter()
                .map(|op| match op {
                    Op::Put { key, value, lease } => WireOp::Put {
                        key,
                        value: hex(&value),
                        lease,
                    },
                    Op::Delete { key } => WireOp::Delete { key },
                })
                .collect(),
        };
        match self.ask(request).await? {
            Reply::Done(r) => Ok(Commit::Done(r)),
            Reply::Conflict => Ok(Commit::Conflict),
            _ => unexpected("commit"),
        }
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if !ttl.subsec_nanos().is_multiple_of(1_000_000) {
            // Whole seconds are all a store takes; this one cannot even travel.
            return Err(StoreError::BadTtl(ttl));
        }
        match self
            .ask(Request::Grant {
                ttl_ms: ttl.as_millis() as u64,
            })
            .await?
        {
            Reply::Lease(l) => Ok(l),
            _ => unexpected("grant"),
        }
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        match self.ask(Request::KeepAlive { lease }).await? {
            Reply::TtlMs(ms) => Ok(Duration::from_millis(ms)),
            _ => unexpected("keep_alive"),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.ask(Request::Revoke { lease }).await? {
            Reply::Ok => Ok(()),
            _ => unexpected("revoke"),
        }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<SocketWatch, StoreError> {
        let mut conn = self.reopen().await?;
        let request = Request::Watch {
            prefix: prefix.into(),
            from,
        };
        match self.send(&mut conn, &request).await? {
            Reply::Watching => Ok(SocketWatch { conn }),
            _ => unexpected("watch"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ray-sock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The socket client passes the same behaviour suite as the stores themselves.
    #[tokio::test]
    async fn conformance_through_the_socket() {
        let dir = temp("conf");
        let store = RedbStore::open(&dir.join(FILE)).unwrap();
        let listener = bind(&dir.join(SOCKET)).unwrap();
        let server = tokio::spawn(serve(store, listener));
        let client = SocketStore::connect(&dir.join(SOCKET)).await.unwrap();
        crate::store::conformance::run(&client).await;
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_absent_server_and_bad_requests_are_explained() {
        let dir = temp("bad");
        let e = SocketStore::connect(&dir.join(SOCKET)).await.err().unwrap();
        let text = e.to_string();
        assert!(
            text.contains(&dir.join(SOCKET).display().to_string())
                && text.contains("ray controller"),
            "{text}"
        );
        let listener = bind(&dir.join(SOCKET)).unwrap();
        let server = tokio::spawn(serve(RedbStore::in_memory().unwrap(), listener));
        // A request the protocol does not know gets an error line naming it, and the
        // connection keeps serving.
        let conn = UnixStream::connect(dir.join(SOCKET)).await.unwrap();
        let (r, mut w) = conn.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"op\":\"get\",\"key\":\"/a\",\"x\":1}\n")
            .await
            .unwrap();
        let reply = read_line(&mut r).await.unwrap().unwrap();
        assert!(reply.contains("unknown field `x`"), "{reply}");
        w.write_all(b"{\"op\":\"get\",\"key\":\"/a\"}\n")
            .await
            .unwrap();
        assert_eq!(read_line(&mut r).await.unwrap().unwrap(), "{\"kv\":null}");
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
