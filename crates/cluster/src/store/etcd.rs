//! [`Store`] on a real etcd (v3 API through etcd-client): for a cluster of hosts.
//!
//! The trait maps one to one onto etcd: [`Cond::Absent`] is "create revision = 0",
//! [`Cond::Present`] "create revision > 0", [`Cond::ModRevision`] "mod revision = R";
//! leases are etcd leases; a watch is one etcd watch with a prefix and a start revision.
//! Every request sent is counted ([`EtcdStore::requests`]): the benchmark reports the
//! load per host from it.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, TxnOp,
    WatchOptions, WatchStream,
};

use super::{
    ttl_secs, Commit, Cond, Event, Kv, LeaseId, Listing, Op, Revision, Store, StoreError, Txn,
    Watch,
};

/// Longest wait for one request's answer (a watch's creation included, not its events).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn no_answer(what: &str) -> etcd_client::Error {
    etcd_client::Error::InvalidArgs(format!("no answer to {what} within {REQUEST_TIMEOUT:?}"))
}

/// gRPC status codes (the gRPC specification's numbers).
const GRPC_UNKNOWN: i32 = 2;
const GRPC_UNAVAILABLE: i32 = 14;

/// What sending a request again may do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// Nothing: a read, or a write whose second application changes nothing (a lease
    /// renewal). Sent again on any "unavailable" answer.
    Harmless,
    /// Apply it twice: sent again only when it certainly reached no member's state
    /// machine.
    OnlyIfNotSent,
}

/// Whether `e` says the request reached no member's state machine: the client could not
/// connect to the member it picked (the client spreads requests over every endpoint it was
/// given, a dead member's included), or that member knows no leader and refused it before
/// proposing anything (during an election).
fn not_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            i32::from(s.code()) == GRPC_UNAVAILABLE
                && ["connect error", "error trying to connect", "no leader"]
                    .iter()
                    .any(|m| s.message().contains(m))
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// Whether `e` is etcd or the path to it being unavailable for a moment.
fn unavailable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            // Unknown: the connection broke under the request (the member died).
            [GRPC_UNAVAILABLE, GRPC_UNKNOWN].contains(&i32::from(s.code()))
        }
        other => not_sent(other),
    }
}

/// Sends a request (built afresh by `f` each time) until it is answered, sending it again
/// after a failure `how` allows, with a growing pause, all within [`REQUEST_TIMEOUT`]: one
/// member of a cluster dying (or its election) is not a failure of the store.
async fn resent<T, F, Fut>(what: &str, how: Resend, mut f: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    let mut pause = Duration::from_millis(20);
    loop {
        let answer = tokio::time::timeout_at(deadline, f())
            .await
            .unwrap_or_else(|_| Err(no_answer(what)));
        let again = match &answer {
            Err(e) if how == Resend::Harmless => unavailable(e),
            Err(e) => not_sent(e),
            Ok(_) => false,
        };
        if !again || tokio::time::Instant::now() + pause >= deadline {
            return answer;
        }
        if let Err(e) = &answer {
            tracing::debug!("etcd {what}: {e}; sending it again");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// A connection to an etcd cluster. Cheap to clone; clones share the connection and the
/// request counter.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    requests: Arc<AtomicU64>,
}

fn backend(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

/// etcd answers a write or a renewal under an ended lease with "(requested) lease not
/// found" (a gRPC status, or the client's keep-alive error).
fn lease_error(e: etcd_client::Error, lease: Option<LeaseId>) -> StoreError {
    match lease {
        Some(l) if e.to_string().contains("lease not found") => StoreError::NoLease(l),
        _ => backend(e),
    }
}

fn kv_of(kv: &etcd_client::KeyValue) -> Result<Kv, StoreError> {
    let key = kv
        .key_str()
        .map_err(|e| StoreError::Backend(format!("etcd: a key is not UTF-8: {e}")))?;
    Ok(Kv {
        key: key.to_string(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: Some(kv.lease()).filter(|&l| l != 0),
    })
}

impl EtcdStore {
    /// Connects to the etcd members at `endpoints` (e.g. `http://127.0.0.1:2379`).
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        // No channel-wide timeout: it would also end every watch stream after that long.
        // Each request gets REQUEST_TIMEOUT instead (`resent`).
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            // HTTP/2 pings find a dead connection; a busy one (many watches on a loaded
            // host) must not be taken for dead: a dropped connection ends every watch.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(10));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| {
                StoreError::Backend(format!(
                    "cannot connect to etcd at {}: {e}",
                    endpoints.join(",")
                ))
            })?;
        // The connection is made lazily: ask once, so a wrong address fails here. Any
        // member that answers will do: with one of three down, the client may send this
        // to the dead one first.
        resent("status", Resend::Harmless, || {
            let mut probe = client.clone();
            async move { probe.status().await }
        })
        .await
        .map_err(|e| {
            StoreError::Backend(format!(
                "etcd at {} does not answer: {e}",
                endpoints.join(",")
            ))
        })?;
        Ok(EtcdStore {
            client,
            requests: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Requests sent to etcd so far by this store and its clones (a watch counts once,
    /// when created).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A client for one request, counted.
    fn client(&self) -> Client {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.client.clone()
    }
}

impl Store for EtcdStore {
    type Watch = EtcdWatch;

    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        let resp = resent("get", Resend::Harmless, || {
            let mut c = self.client();
            async move { c.get(key, None).await }
        })
        .await
        .map_err(backend)?;
        resp.kvs().first().map(kv_of).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let opts = GetOptions::new().with_prefix();
        let resp = resent("list", Resend::Harmless, || {
            let (mut c, opts) = (self.client(), opts.clone());
            async move { c.get(prefix, Some(opts)).await }
        })
        .await
        .map_err(backend)?;
        let kvs = resp.kvs().iter().map(kv_of).collect::<Result<_, _>>()?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok(Listing { kvs, revision })
    }

    async fn commit(&self, txn: Txn) -> Result<Commit, StoreError> {
        let compares: Vec<Compare> = txn
            .compares
            .iter()
            .map(|(key, cond)| match cond {
                Cond::Absent => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                Cond::Present => Compare::create_revision(key.as_str(), CompareOp::Greater, 0),
                Cond::ModRevision(r) => Compare::mod_revision(key.as_str(), CompareOp::Equal, *r),
            })
            .collect();
        let mut lease = None;
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put {
                    key,
                    value,
                    lease: l,
                } => {
                    lease = lease.or(*l);
                    let opts = l.map(|l| PutOptions::new().with_lease(l));
                    TxnOp::put(key.as_str(), value.clone(), opts)
                }
                Op::Delete { key } => TxnOp::delete(key.as_str(), None),
            })
            .collect();
        let resp = resent("txn", Resend::OnlyIfNotSent, || {
            let mut c = self.client();
            let txn = etcd_client::Txn::new()
                .when(compares.clone())
                .and_then(ops.clone());
            async move { c.txn(txn).await }
        })
        .await
        .map_err(|e| lease_error(e, lease))?;
        if !resp.succeeded() {
            return Ok(Commit::Conflict);
        }
        Ok(Commit::Done(resp.header().map_or(0, |h| h.revision())))
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl_secs(ttl)?;
        // A second grant leaves an unused lease behind, which expires: harmless.
        let resp = resent("lease_grant", Resend::Harmless, || {
            let mut c = self.client();
            async move { c.lease_grant(secs, None).await }
        })
        .await
        .map_err(backend)?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let lost = |e| lease_error(e, Some(lease));
        let answer = resent("lease_keep_alive", Resend::Harmless, || {
            let mut client = self.client();
            async move {
                let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                stream.message().await
            }
        });
        match answer.await.map_err(lost)? {
            Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl() as u64)),
            Some(_) => Err(StoreError::NoLease(lease)),
            None => Err(StoreError::Backend(
                "etcd closed the lease keep-alive stream without an answer".into(),
            )),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        resent("lease_revoke", Resend::OnlyIfNotSent, || {
            let mut c = self.client();
            async move { c.lease_revoke(lease).await }
        })
        .await
        .map(drop)
        .map_err(|e| lease_error(e, Some(lease)))
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<EtcdWatch, StoreError> {
        let mut opts = WatchOptions::new().with_prefix();
        if from > 0 {
            opts = opts.with_start_revision(from);
        }
        let stream = resent("watch", Resend::Harmless, || {
            let (mut c, opts) = (self.client(), opts.clone());
            async move { c.watch(prefix, Some(opts)).await }
        })
        .await
        .map_err(backend)?;
        Ok(EtcdWatch {
            stream,
            pending: VecDeque::new(),
            from,
        })
    }
}

/// An etcd watch; one response may carry many events, handed out one at a time.
pub struct EtcdWatch {
    stream: WatchStream,
    pending: VecDeque<Event>,
    from: Revision,
}

impl Watch for EtcdWatch {
    async fn next(&mut self) -> Result<Event, StoreError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(ev);
            }
            let resp = self
                .stream
                .message()
                .await
                .map_err(|e| StoreError::WatchEnded(format!("etcd: {e}")))?
                .ok_or_else(|| StoreError::WatchEnded("etcd closed the watch stream".into()))?;
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return Err(StoreError::Compacted {
                        wanted: self.from,
                        oldest: resp.compact_revision(),
                    });
                }
                return Err(StoreError::WatchEnded(format!(
                    "etcd canceled the watch: {}",
                    resp.cancel_reason()
                )));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                self.pending.push_back(match ev.event_type() {
                    EventType::Put => Event::Put(kv_of(kv)?),
                    EventType::Delete => Event::Delete {
                        key: kv_of(kv)?.key,
                        revision: kv.mod_revision(),
                    },
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Etcd;

    #[tokio::test]
    async fn conformance() {
        let etcd = Etcd::start("conformance").await;
        let store = EtcdStore::connect(&etcd.endpoints()).await.unwrap();
        crate::store::conformance::run(&store).await;
        assert!(store.requests() > 20, "{}", store.requests());
    }

    #[tokio::test]
    async fn a_watch_outlives_the_request_timeout() {
        let etcd = Etcd::start("long-watch").await;
        let store = EtcdStore::connect(&etcd.endpoints()).await.unwrap();
        let mut w = store.watch("/w/", 0).await.unwrap();
        tokio::time::sleep(REQUEST_TIMEOUT + Duration::from_secs(1)).await;
        store.commit(Txn::new().put("/w/late", "x")).await.unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("no event within 5 s")
            .expect("the watch ended");
        assert_eq!(ev.key(), "/w/late");
    }

    /// A client given a dead member's URL beside a live one (a member of three killed):
    /// the client sends some requests to the dead one; every read and write still
    /// succeeds, each write applied once.
    #[tokio::test]
    async fn a_dead_member_among_the_endpoints_is_passed_over() {
        let etcd = Etcd::start("dead-member").await;
        let dead = format!("http://127.0.0.1:{}", crate::testing::free_port());
        let mut endpoints = etcd.endpoints();
        endpoints.insert(0, dead);
        let store = EtcdStore::connect(&endpoints).await.unwrap();
        for i in 0..40 {
            let key = format!("/d/{i}");
            let txn = Txn::new()
                .when(key.as_str(), Cond::Absent)
                .put(key.as_str(), "x");
            assert!(
                matches!(store.commit(txn).await.unwrap(), Commit::Done(_)),
                "{key} written twice?"
            );
            assert!(store.get(&key).await.unwrap().is_some());
        }
        assert_eq!(store.list("/d/").await.unwrap().kvs.len(), 40);
        let lease = store.grant(Duration::from_secs(5)).await.unwrap();
        for _ in 0..10 {
            store.keep_alive(lease).await.unwrap();
        }
        // More requests than answers: some went to the dead member and were sent again.
        assert!(
            store.requests() > 40 * 2 + 1 + 1 + 10,
            "{}",
            store.requests()
        );
    }

    #[tokio::test]
    async fn an_unreachable_etcd_is_named() {
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let e = EtcdStore::connect(std::slice::from_ref(&endpoint))
            .await
            .err()
            .expect("nothing listens there");
        assert!(e.to_string().contains(&endpoint), "{e}");
    }
}
