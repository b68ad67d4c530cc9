//! [`Store`] on an embedded redb file: a single host with zero set-up.
//!
//! redb locks its file, so one process owns the store (the controller, in single-host
//! mode). Keys, values, the revision counter and the leases are in the file; what only
//! matters while the process lives is in memory: lease deadlines (a reopened store gives
//! every lease its full time to live again, as etcd does when its leader changes), the
//! watchers, and the recent history watches replay from (older revisions answer
//! [`StoreError::Compacted`], as a compacted etcd does).
//!
//! Every operation holds one lock, so the order of revisions is the order of events.
//! Commits are durable when they return (redb's immediate durability).
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use ::redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::mpsc;

use super::{
    ttl_secs, Commit, Cond, Event, Kv, LeaseId, Listing, Op, Revision, Store, StoreError, Txn,
    Watch,
};

/// key -> header (create revision, mod revision, lease; 8 bytes each, little-endian) + value.
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// lease id -> time to live, seconds.
const LEASES: TableDefinition<i64, i64> = TableDefinition::new("leases");
/// "revision" and "next_lease".
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");

const HEADER: usize = 24;
/// Events kept for watches that start in the past.
const HISTORY: usize = 10_000;
/// How often expired leases are looked for.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// The embedded store. Cheap to clone; every clone is the same store.
#[derive(Clone)]
pub struct RedbStore {
    shared: Arc<Mutex<Inner>>,
}

struct Inner {
    db: Database,
    revision: Revision,
    next_lease: LeaseId,
    /// Live leases: time to live and deadline.
    leases: HashMap<LeaseId, (Duration, Instant)>,
    watchers: Vec<(String, mpsc::UnboundedSender<Event>)>,
    history: VecDeque<Event>,
    /// Every event from this revision on is in `history`.
    history_start: Revision,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("redb: {e}"))
}

fn decode(key: &str, raw: &[u8]) -> Result<Kv, StoreError> {
    if raw.len() < HEADER {
        return Err(backend(format!(
            "the record of key {key} is {} bytes, shorter than its {HEADER}-byte header",
            raw.len()
        )));
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
        i64::from_le_bytes(b)
    };
    Ok(Kv {
        key: key.to_string(),
        create_revision: word(0),
        mod_revision: word(1),
        lease: Some(word(2)).filter(|&l| l != 0),
        value: raw[HEADER..].to_vec(),
    })
}

fn encode(kv: &Kv) -> Vec<u8> {
    let mut raw = Vec::with_capacity(HEADER + kv.value.len());
    raw.extend_from_slice(&kv.create_revision.to_le_bytes());
    raw.extend_from_slice(&kv.mod_revision.to_le_bytes());
    raw.extend_from_slice(&kv.lease.unwrap_or(0).to_le_bytes());
    raw.extend_from_slice(&kv.value);
    raw
}

fn read_kv(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Kv>, StoreError> {
    match table.get(key).map_err(backend)? {
        Some(raw) => decode(key, raw.value()).map(Some),
        None => Ok(None),
    }
}

impl RedbStore {
    /// Opens (or creates) the store file. Must run inside a Tokio runtime: a task of it
    /// ends expired leases.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = Database::create(path)
            .map_err(|e| backend(format!("cannot open {}: {e}", path.display())))?;
        RedbStore::with(db)
    }

    /// The same store in memory only (nothing survives the process): for simulations of
    /// thousands of hosts, where a file sync per commit would be the whole cost.
    pub fn in_memory() -> Result<RedbStore, StoreError> {
        let db = Database::builder()
            .create_with_backend(::redb::backends::InMemoryBackend::new())
            .map_err(|e| backend(format!("cannot create an in-memory store: {e}")))?;
        RedbStore::with(db)
    }

    fn with(db: Database) -> Result<RedbStore, StoreError> {
        let w = db.begin_write().map_err(backend)?;
        let (revision, next_lease, leases) = {
            let meta = w.open_table(META).map_err(backend)?;
            let get = |k: &str| -> Result<i64, StoreError> {
                Ok(meta.get(k).map_err(backend)?.map_or(0, |v| v.value()))
            };
            let revision = get("revision")?;
            let next_lease = get("next_lease")?.max(1);
            w.open_table(KV).map_err(backend)?;
            let table = w.open_table(LEASES).map_err(backend)?;
            let now = Instant::now();
            let mut leases = HashMap::new();
            for entry in table.iter().map_err(backend)? {
                let (id, ttl) = entry.map_err(backend)?;
                let ttl = Duration::from_secs(ttl.value().max(1) as u64);
                leases.insert(id.value(), (ttl, now + ttl));
            }
            (revision, next_lease, leases)
        };
        w.commit().map_err(backend)?;
        let shared = Arc::new(Mutex::new(Inner {
            db,
            revision,
            next_lease,
            leases,
            watchers: Vec::new(),
            history: VecDeque::new(),
            history_start: revision + 1,
        }));
        tokio::spawn(expire_leases(Arc::downgrade(&shared)));
        Ok(RedbStore { shared })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock aborts the process (panic = abort): never poisoned
        // in practice; if it were, the data under it is still consistent per commit.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Ends leases whose deadline passed, until the store is dropped.
async fn expire_leases(shared: Weak<Mutex<Inner>>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut inner = shared.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let expired: Vec<LeaseId> = inner
            .leases
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Err(e) = inner.end_lease(id) {
                tracing::warn!(lease = id, "cannot end an expired lease: {e}");
            }
        }
    }
}

impl Inner {
    /// Writes a transaction's effects at the next revision and tells the watchers.
    fn commit(&mut self, txn: &Txn) -> Result<Commit, StoreError> {
        let w = self.db.begin_write().map_err(backend)?;
        let revision = self.revision + 1;
        let mut events = Vec::new();
        {
            let mut kv = w.open_table(KV).map_err(backend)?;
            for (key, cond) in &txn.compares {
                let cur = read_kv(&kv, key)?;
                let holds = match cond {
                    Cond::Absent => cur.is_none(),
                    Cond::Present => cur.is_some(),
                    Cond::ModRevision(r) => cur.is_some_and(|c| c.mod_revision == *r),
                };
                if !holds {
                    return Ok(Commit::Conflict);
                }
            }
            for op in &txn.ops {
                match op {
                    Op::Put { key, value, lease } => {
                        if let Some(l) = lease {
                            if !self.leases.contains_key(l) {
                                return Err(StoreError::NoLease(*l));
                            }
                        }
                        let create_revision =
                            read_kv(&kv, key)?.map_or(revision, |c| c.create_revision);
                        let new = Kv {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision,
                            mod_revision: revision,
                            lease: *lease,
                        };
                        kv.insert(key.as_str(), encode(&new).as_slice())
                            .map_err(backend)?;
                        events.push(Event::Put(new));
                    }
                    Op::Delete { key } => {
                        if kv.remove(key.as_str()).map_err(backend)?.is_some() {
                            events.push(Event::Delete {
                                key: key.clone(),
                                revision,
                            });
                        }
                    }
                }
            }
        }
        if events.is_empty() {
            // Nothing changed (deletes of absent keys): no new revision, as in etcd.
            return Ok(Commit::Done(self.revision));
        }
        w.open_table(META)
            .map_err(backend)?
            .insert("revision", revision)
            .map_err(backend)?;
        w.commit().map_err(backend)?;
        self.revision = revision;
        self.publish(events);
        Ok(Commit::Done(revision))
    }

    fn publish(&mut self, events: Vec<Event>) {
        for ev in events {
            self.watchers.retain(|(prefix, tx)| {
                !ev.key().starts_with(prefix) || tx.send(ev.clone()).is_ok()
            });
            self.history.push_back(ev);
        }
        // Drop whole revisions from the front, so a replay never starts mid-transaction.
        while self.history.len() > HISTORY {
            let Some(first) = self.history.front().map(Event::revision) else {
                break;
            };
            while self.history.front().is_some_and(|e| e.revision() == first) {
                self.history.pop_front();
            }
            self.history_start = first + 1;
        }
    }

    /// Revokes a lease: its keys are deleted in one revision.
    fn end_lease(&mut self, id: LeaseId) -> Result<(), StoreError> {
        if self.leases.remove(&id).is_none() {
            return Err(StoreError::NoLease(id));
        }
        let keys: Vec<String> = {
            let r = self.db.begin_read().map_err(backend)?;
            let kv = r.open_table(KV).map_err(backend)?;
            let mut keys = Vec::new();
            for entry in kv.iter().map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                if decode(k.value(), v.value())?.lease == Some(id) {
                    keys.push(k.value().to_string());
                }
            }
            keys
        };
        let txn = Txn {
            compares: Vec::new(),
            ops: keys.into_iter().map(|key| Op::Delete { key }).collect(),
        };
        self.commit(&txn)?;
        let w = self.db.begin_write().map_err(backend)?;
        w.open_table(LEASES)
            .map_err(backend)?
            .remove(id)
            .map_err(backend)?;
        w.commit().map_err(backend)
    }
}

/// A watch on the embedded store: events arrive through a channel the store fills under
/// its lock.
pub struct RedbWatch {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Watch for RedbWatch {
    async fn next(&mut self) -> Result<Event, StoreError> {
        self.rx
            .recv()
            .await
            .ok_or_else(|| StoreError::WatchEnded("the store was closed".into()))
    }
}

impl Store for RedbStore {
    type Watch = RedbWatch;

    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        let inner = self.inner();
        let r = inner.db.begin_read().map_err(backend)?;
        let kv = r.open_table(KV).map_err(backend)?;
        match kv.get(key).map_err(backend)? {
            Some(raw) => decode(key, raw.value()).map(Some),
            None => Ok(None),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let inner = self.inner();
        let r = inner.db.begin_read().map_err(backend)?;
        let kv = r.open_table(KV).map_err(backend)?;
        let mut kvs = Vec::new();
        for entry in kv.range(prefix..).map_err(backend)? {
            let (k, v) = entry.map_err(backend)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            kvs.push(decode(k.value(), v.value())?);
        }
        Ok(Listing {
            kvs,
            revision: inner.revision,
        })
    }

    async fn commit(&self, txn: Txn) -> Result<Commit, StoreError> {
        self.inner().commit(&txn)
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl_secs(ttl)?;
        let mut inner = self.inner();
        let id = inner.next_lease;
        let w = inner.db.begin_write().map_err(backend)?;
        w.open_table(LEASES)
            .map_err(backend)?
            .insert(id, secs)
            .map_err(backend)?;
        w.open_table(META)
            .map_err(backend)?
            .insert("next_lease", id + 1)
            .map_err(backend)?;
        w.commit().map_err(backend)?;
        inner.next_lease = id + 1;
        inner.leases.insert(id, (ttl, Instant::now() + ttl));
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let mut inner = self.inner();
        let (ttl, deadline) = inner
            .leases
            .get_mut(&lease)
            .ok_or(StoreError::NoLease(lease))?;
        *deadline = Instant::now() + *ttl;
        Ok(*ttl)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner().end_lease(lease)
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<RedbWatch, StoreError> {
        let mut inner = self.inner();
        let from = if from == 0 { inner.revision + 1 } else { from };
        if from < inner.history_start {
            return Err(StoreError::Compacted {
                wanted: from,
                oldest: inner.history_start,
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for ev in inner
            .history
            .iter()
            .filter(|e| e.revision() >= from && e.key().starts_with(prefix))
        {
            // The receiver is still in hand: this cannot fail.
            let _ = tx.send(ev.clone());
        }
        inner.watchers.push((prefix.to_string(), tx));
        Ok(RedbWatch { rx })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ray-redb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn conformance() {
        let dir = temp("conf");
        let store = RedbStore::open(&dir.join("store.redb")).unwrap();
        crate::store::conformance::run(&store).await;
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        crate::store::conformance::run(&RedbStore::in_memory().unwrap()).await;
    }

    #[tokio::test]
    async fn keys_revisions_and_leases_survive_a_reopen() {
        let dir = temp("reopen");
        let path = dir.join("store.redb");
        let (rev, lease) = {
            let s = RedbStore::open(&path).unwrap();
            let lease = s.grant(Duration::from_secs(30)).await.unwrap();
            let Commit::Done(rev) = s
                .commit(Txn::new().put("/a", "1").put_leased("/b", "2", lease))
                .await
                .unwrap()
            else {
                panic!("an unconditional commit conflicted");
            };
            (rev, lease)
        };
        let s = RedbStore::open(&path).unwrap();
        let a = s.get("/a").await.unwrap().unwrap();
        assert_eq!((a.value.as_slice(), a.mod_revision), (&b"1"[..], rev));
        assert_eq!(s.get("/b").await.unwrap().unwrap().lease, Some(lease));
        assert_eq!(s.keep_alive(lease).await.unwrap(), Duration::from_secs(30));
        // The next revision and the next lease continue where they were.
        let Commit::Done(next) = s.commit(Txn::new().put("/c", "3")).await.unwrap() else {
            panic!("conflict");
        };
        assert_eq!(next, rev + 1);
        assert!(s.grant(Duration::from_secs(5)).await.unwrap() > lease);
        // History before the reopen is gone: a watch from there is refused, saying why.
        let e = s.watch("/", rev).await.err().unwrap();
        assert!(matches!(e, StoreError::Compacted { .. }), "{e}");
        assert!(e.to_string().contains("list again"), "{e}");
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_second_process_cannot_open_an_open_store() {
        let dir = temp("twice");
        let path = dir.join("store.redb");
        let _s = RedbStore::open(&path).unwrap();
        let e = RedbStore::open(&path).err().unwrap();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
