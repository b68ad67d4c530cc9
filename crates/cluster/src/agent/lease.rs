//! The agent's lease keeper: a task of its own that renews the host's etcd lease and its
//! VMMs' local leases on time, whatever the agent's event loop is doing. The loop may
//! spend seconds on one event (starting VMs over a slow link, a reconcile after a store
//! error); a renewal that waited for it could let the lease lapse while the host is well
//! (a false fence). The keeper only renews; what needs the loop's state (resuming fenced
//! VMs after their run tokens are confirmed, the status) it asks of the loop through
//! [`Keeper::renewed`].
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{lease_file, lock, pause_all, AgentConfig, Alive, LocalLease, SharedFence, Vmms};
use crate::keys;
use crate::store::{LeaseId, Store, StoreError, Txn};

/// What the keeper and the agent's loop share.
pub(super) struct Keeper {
    /// The lease the host's keys live under (replaced after a lapse).
    pub lease: AtomicI64,
    /// Whether the last renewal attempt succeeded.
    pub good: AtomicBool,
    /// Signalled after every renewal attempt; the loop then writes its status and, if the
    /// VMs are fenced and the renewal was good, resumes those still this host's.
    pub renewed: Notify,
}

impl Keeper {
    pub fn new(lease: LeaseId) -> Arc<Keeper> {
        Arc::new(Keeper {
            lease: AtomicI64::new(lease),
            good: AtomicBool::new(true),
            renewed: Notify::new(),
        })
    }

    pub fn lease(&self) -> LeaseId {
        self.lease.load(Ordering::Acquire)
    }

    /// Whether the last renewal attempt succeeded.
    pub fn good(&self) -> bool {
        self.good.load(Ordering::Acquire)
    }
}

/// Writes the host's `alive` key under `lease`.
pub(super) async fn register<S: Store>(
    store: &S,
    cfg: &AgentConfig,
    lease: LeaseId,
) -> Result<(), StoreError> {
    let alive = Alive {
        pid: std::process::id(),
        api: cfg.api.clone(),
    };
    let value = serde_json::to_vec(&alive).unwrap_or_default();
    store
        .commit(Txn::new().put_leased(keys::host_alive(&cfg.host), value, lease))
        .await?;
    Ok(())
}

/// Renews the lease every `renew_every` from the send time of the last good renewal
/// (every `retry_every` after a failed one) until aborted.
pub(super) async fn keep<S: Store, V: Vmms>(
    store: S,
    vmms: Arc<V>,
    fence: SharedFence,
    cfg: AgentConfig,
    keeper: Arc<Keeper>,
) {
    let timing = cfg.timing;
    // The last good renewal was sent `local_lease` before the deadline it set.
    let last = lock(&fence).deadline - timing.local_lease();
    let mut next = last + timing.renew_every;
    loop {
        tokio::time::sleep_until(next).await;
        let renewed = renew(&store, &vmms, &fence, &cfg, &keeper).await;
        keeper.good.store(renewed.is_ok(), Ordering::Release);
        match renewed {
            Ok(sent) => {
                // Counted from the send, as the local deadline is: a slow answer (a
                // delayed link) does not push the next renewal towards the deadline.
                next = sent + timing.renew_every;
                renew_vmms(&vmms, &fence, &cfg).await;
            }
            Err(e) => {
                tracing::warn!("lease renewal failed, retrying: {e}");
                next = Instant::now() + timing.retry_every;
            }
        }
        keeper.renewed.notify_one();
    }
}

/// Renews the lease once; returns when the renewal was sent. A lease that had lapsed is
/// replaced, after fencing: the controller may be failing this host's VMs over, and the
/// loop's unfence keeps only what the run tokens still give it.
async fn renew<S: Store, V: Vmms>(
    store: &S,
    vmms: &Arc<V>,
    fence: &SharedFence,
    cfg: &AgentConfig,
    keeper: &Keeper,
) -> Result<Instant, StoreError> {
    let sent = Instant::now();
    let limit = cfg.timing.retry_every * 4;
    let answer = tokio::time::timeout(limit, store.keep_alive(keeper.lease()))
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Backend(format!(
                "no answer to the lease renewal within {limit:?}"
            )))
        });
    match answer {
        Ok(_) => {}
        Err(StoreError::NoLease(_)) => {
            let ids = {
                let mut f = lock(fence);
                let was = std::mem::replace(&mut f.fenced, true);
                if was {
                    Vec::new()
                } else {
                    f.vms.clone()
                }
            };
            pause_all(vmms, ids).await;
            let lease = store.grant(cfg.timing.lease_ttl).await?;
            keeper.lease.store(lease, Ordering::Release);
            let _ = std::fs::write(lease_file(cfg), lease.to_string());
            register(store, cfg, lease).await?;
            tracing::warn!(lease, "the lease had lapsed; registered again");
        }
        Err(e) => return Err(e),
    }
    lock(fence).deadline = sent + cfg.timing.local_lease();
    Ok(sent)
}

/// The local lease of the last good renewal; `None` once it ran out or the VMs are fenced.
pub(super) fn local_lease(fence: &SharedFence, cfg: &AgentConfig) -> Option<LocalLease> {
    let f = lock(fence);
    let ttl = cfg.timing.local_lease();
    (!f.fenced && Instant::now() < f.deadline).then(|| LocalLease {
        since: (f.deadline - ttl).into_std(),
        ttl,
    })
}

/// Renews every VMM's local lease after a good renewal of the agent's own (none while
/// fenced: the loop gives each VM its lease back once its run token is confirmed). A VMM
/// that does not answer fences itself when its lease runs out: nothing more to do here.
pub(super) async fn renew_vmms<V: Vmms>(vmms: &Arc<V>, fence: &SharedFence, cfg: &AgentConfig) {
    let Some(lease) = local_lease(fence, cfg) else {
        return;
    };
    let ids = lock(fence).vms.clone();
    let v = Arc::clone(vmms);
    let failed = tokio::task::spawn_blocking(move || {
        ids.into_iter()
            .filter_map(|vm| v.renew(&vm, lease).err())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_else(|e| vec![format!("the renewal call failed: {e}")]);
    for e in failed {
        tracing::warn!("cannot renew a VMM's local lease: {e}");
    }
}
