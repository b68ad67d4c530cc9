//! Leader election on the store, and the fence that makes a deposed leader harmless.
//!
//! A controller campaigns by writing `/ray/controller/leader` under its own short lease,
//! only if the key is absent (one compare-and-swap: on etcd and on redb alike). It leads
//! while it keeps that lease alive; when it dies or stalls, the lease ends, the key
//! vanishes and a standby wins the next compare.
//!
//! A leader that stalled past its lease and wakes up must not act on old decisions:
//! [`Led`] wraps the store so that every transaction also requires the leader key to be
//! the one this controller wrote (its revision). Once another controller has won, every
//! write of the old one fails its compare; no timing argument is needed.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::keys;
use crate::store::{Commit, Cond, Kv, LeaseId, Listing, Revision, Store, StoreError, Txn};

/// The value of the leader key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// The controller's name (`--id`, default host name and pid).
    pub id: String,
    pub pid: u32,
}

/// This controller's term as leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Term {
    pub lease: LeaseId,
    /// The revision the leader key was written at: the fence.
    pub revision: Revision,
}

/// The current leader, if any.
pub async fn current<S: Store>(s: &S) -> Result<Option<LeaderRecord>, StoreError> {
    Ok(s.get(keys::LEADER)
        .await?
        .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
}

/// Campaigns until this controller leads; checks every `poll` while another one does.
pub async fn campaign<S: Store>(
    s: &S,
    me: &LeaderRecord,
    ttl: Duration,
    poll: Duration,
) -> Result<Term, StoreError> {
    let value = serde_json::to_vec(me).unwrap_or_default();
    loop {
        if s.get(keys::LEADER).await?.is_none() {
            let lease = s.grant(ttl).await?;
            let txn = Txn::new().when(keys::LEADER, Cond::Absent).put_leased(
                keys::LEADER,
                value.clone(),
                lease,
            );
            match s.commit(txn).await? {
                Commit::Done(revision) => return Ok(Term { lease, revision }),
                Commit::Conflict => s.revoke(lease).await?,
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// The store as the leader of `term` writes to it: every transaction is fenced by the
/// leader key.
#[derive(Clone)]
pub struct Led<S: Store> {
    pub inner: S,
    pub term: Term,
}

impl<S: Store> Store for Led<S> {
    type Watch = S::Watch;

    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        self.inner.list(prefix).await
    }

    async fn commit(&self, txn: Txn) -> Result<Commit, StoreError> {
        let txn = txn.when(keys::LEADER, Cond::ModRevision(self.term.revision));
        self.inner.commit(txn).await
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.grant(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke(lease).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Self::Watch, StoreError> {
        self.inner.watch(prefix, from).await
    }
}

/// Whether `term` still leads (its key is there at its revision).
pub async fn still_leads<S: Store>(s: &S, term: Term) -> Result<bool, StoreError> {
    Ok(s.get(keys::LEADER)
        .await?
        .is_some_and(|kv| kv.mod_revision == term.revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leads_and_a_deposed_leader_cannot_write() {
        let (s, dir) = crate::testing::fresh_redb("leader");
        let a = LeaderRecord {
            id: "a".into(),
            pid: 1,
        };
        let b = LeaderRecord {
            id: "b".into(),
            pid: 2,
        };
        let ttl = Duration::from_secs(5);
        let poll = Duration::from_millis(10);
        let ta = campaign(&s, &a, ttl, poll).await.unwrap();
        assert_eq!(current(&s).await.unwrap(), Some(a.clone()));
        // b waits while a leads.
        let waiting = tokio::time::timeout(Duration::from_millis(100), campaign(&s, &b, ttl, poll));
        assert!(waiting.await.is_err(), "b must not lead while a does");
        let led_a = Led {
            inner: s.clone(),
            term: ta,
        };
        let w = led_a.commit(Txn::new().put("/x", "a")).await.unwrap();
        assert!(matches!(w, Commit::Done(_)));
        // a's lease ends (it stalled); b wins; a's writes now fail.
        s.revoke(ta.lease).await.unwrap();
        let tb = campaign(&s, &b, ttl, poll).await.unwrap();
        assert_eq!(current(&s).await.unwrap(), Some(b));
        assert!(!still_leads(&s, ta).await.unwrap());
        assert!(still_leads(&s, tb).await.unwrap());
        let w = led_a.commit(Txn::new().put("/x", "stale")).await.unwrap();
        assert_eq!(w, Commit::Conflict);
        assert_eq!(s.get("/x").await.unwrap().unwrap().value, b"a");
        drop((s, led_a));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
