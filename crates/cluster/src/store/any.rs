//! [`AnyStore`]: whichever store a command was pointed at (etcd, the controller's socket,
//! or a redb file it owns), behind the one [`Store`] trait.
use std::time::Duration;

use super::{
    Commit, EtcdStore, Kv, LeaseId, Listing, RedbStore, Revision, SocketStore, Store, StoreError,
    Txn, Watch,
};

/// One of the stores.
#[derive(Clone)]
pub enum AnyStore {
    Etcd(Box<EtcdStore>),
    /// The controller's redb store, through its socket (single-host mode).
    Socket(SocketStore),
    /// A redb file this process owns (the controller in single-host mode).
    Redb(RedbStore),
}

/// A watch on one of the stores.
pub enum AnyWatch {
    Etcd(Box<<EtcdStore as Store>::Watch>),
    Socket(<SocketStore as Store>::Watch),
    Redb(<RedbStore as Store>::Watch),
}

impl Watch for AnyWatch {
    async fn next(&mut self) -> Result<super::Event, StoreError> {
        match self {
            AnyWatch::Etcd(w) => w.next().await,
            AnyWatch::Socket(w) => w.next().await,
            AnyWatch::Redb(w) => w.next().await,
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Etcd($s) => $e,
            AnyStore::Socket($s) => $e,
            AnyStore::Redb($s) => $e,
        }
    };
}

impl Store for AnyStore {
    type Watch = AnyWatch;

    async fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        each!(self, s => s.get(key).await)
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        each!(self, s => s.list(prefix).await)
    }

    async fn commit(&self, txn: Txn) -> Result<Commit, StoreError> {
        each!(self, s => s.commit(txn).await)
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        each!(self, s => s.grant(ttl).await)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        each!(self, s => s.keep_alive(lease).await)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        each!(self, s => s.revoke(lease).await)
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<AnyWatch, StoreError> {
        Ok(match self {
            AnyStore::Etcd(s) => AnyWatch::Etcd(Box::new(s.watch(prefix, from).await?)),
            AnyStore::Socket(s) => AnyWatch::Socket(s.watch(prefix, from).await?),
            AnyStore::Redb(s) => AnyWatch::Redb(s.watch(prefix, from).await?),
        })
    }
}
