//! The cluster store: where desired and observed state live.
//!
//! One trait, [`Store`], two implementations: [`RedbStore`] (embedded, one file, the default
//! for a single host) and [`EtcdStore`] (a real etcd, for a cluster of hosts). On a single
//! host the controller owns the redb file and serves it on a Unix socket ([`socket`]);
//! the host's agent and `ray cluster` use it through [`SocketStore`]. [`AnyStore`] is
//! whichever of them a command was pointed at. The trait is
//! the subset of etcd's model the control plane needs, so both behave alike:
//!
//! - every committed change gets the next store-wide [`Revision`]; a key remembers the
//!   revision that created it and the one that last changed it;
//! - writes are transactions ([`Txn`]): compares on keys ("absent", "present", "last
//!   changed at revision R"), then puts and deletes, all or nothing. A revision-checked
//!   write (compare-and-swap) is a transaction with one compare;
//! - a lease ([`LeaseId`]) has a time to live; keys written under it vanish (with a delete
//!   event) when it is revoked or not kept alive in time;
//! - a watch ([`Watch`]) delivers every change under a prefix, in revision order, from a
//!   given revision on, so a reader that listed at revision R and watches from R + 1 misses
//!   nothing.
//!
//! Values are opaque bytes; the control plane stores JSON.
use std::future::Future;
use std::time::Duration;

mod any;
mod etcd;
mod redb;
pub mod socket;

pub use self::any::{AnyStore, AnyWatch};
pub use self::etcd::EtcdStore;
pub use self::redb::RedbStore;
pub use self::socket::SocketStore;

/// A store-wide revision: every committed change increments it. 0 is "never".
pub type Revision = i64;
/// A lease's id, chosen by the store.
pub type LeaseId = i64;

/// A key, its value and its history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the change that created the key (since it was last absent).
    pub create_revision: Revision,
    /// Revision of the change that last wrote it.
    pub mod_revision: Revision,
    /// The lease the key lives under, if any.
    pub lease: Option<LeaseId>,
}

/// The keys under a prefix, as of one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    /// Sorted by key.
    pub kvs: Vec<Kv>,
    /// The store's revision when they were read: watch from `revision + 1`.
    pub revision: Revision,
}

/// What a transaction requires of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cond {
    /// The key does not exist.
    Absent,
    /// The key exists.
    Present,
    /// The key exists and was last written at this revision.
    ModRevision(Revision),
}

/// One write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// Compares, then writes: all the writes happen, at one new revision, if every compare
/// holds; none otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<(String, Cond)>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Txn::default()
    }

    /// Requires `cond` of `key`.
    pub fn when(mut self, key: impl Into<String>, cond: Cond) -> Self {
        self.compares.push((key.into(), cond));
        self
    }

    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        });
        self
    }

    /// Puts a key that lives as long as `lease`.
    pub fn put_leased(
        mut self,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        });
        self
    }

    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }
}

/// How a transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Every compare held; the writes are in at this revision.
    Done(Revision),
    /// A compare failed; nothing was written.
    Conflict,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The key was written (created or changed).
    Put(Kv),
    /// The key was deleted (or its lease ended) at this revision.
    Delete { key: String, revision: Revision },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// What went wrong talking to a store. A failed compare is not an error ([`Commit`]).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store is unreachable or failed: {0}")]
    Backend(String),
    #[error("lease {0} does not exist (it expired or was revoked)")]
    NoLease(LeaseId),
    #[error("cannot watch from revision {wanted}: history before revision {oldest} is gone (compacted); list again and watch from there")]
    Compacted { wanted: Revision, oldest: Revision },
    #[error("the watch ended: {0}")]
    WatchEnded(String),
    #[error("lease time to live {0:?} is out of range: use 1 s to 1 day, in whole seconds")]
    BadTtl(Duration),
}

/// Changes under a prefix, in revision order.
pub trait Watch: Send {
    /// The next change; waits for one.
    fn next(&mut self) -> impl Future<Output = Result<Event, StoreError>> + Send;
}

/// The store the control plane runs on.
pub trait Store: Send + Sync + 'static {
    type Watch: Watch;

    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Kv>, StoreError>> + Send;

    /// Every key starting with `prefix`, and the revision they were read at.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Listing, StoreError>> + Send;

    fn commit(&self, txn: Txn) -> impl Future<Output = Result<Commit, StoreError>> + Send;

    /// A new lease of `ttl` (whole seconds, as etcd counts them).
    fn grant(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId, StoreError>> + Send;

    /// Renews a lease for its full time to live; returns that time, or
    /// [`StoreError::NoLease`] if it already ended.
    fn keep_alive(
        &self,
        lease: LeaseId,
    ) -> impl Future<Output = Result<Duration, StoreError>> + Send;

    /// Ends a lease now; its keys are deleted.
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Changes under `prefix` from revision `from` on (`from` 0: from now).
    fn watch(
        &self,
        prefix: &str,
        from: Revision,
    ) -> impl Future<Output = Result<Self::Watch, StoreError>> + Send;
}

/// Whole seconds of a lease's time to live, checked.
fn ttl_secs(ttl: Duration) -> Result<i64, StoreError> {
    let secs = ttl.as_secs();
    if ttl.subsec_nanos() != 0 || !(1..=86_400).contains(&secs) {
        return Err(StoreError::BadTtl(ttl));
    }
    Ok(secs as i64)
}

#[cfg(test)]
pub(crate) mod conformance;
