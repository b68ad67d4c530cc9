//! The per-VM run token: the one thing that says which host may run a VM.
//!
//! `/ray/vms/<vm>/token` holds `{host, epoch}`. Every change of it is one revision-checked
//! transaction that also moves the VM's assignment (`/ray/hosts/<host>/vms/<vm>`), so the
//! token and the assignment never disagree, and two writers racing on one VM cannot both
//! win: the second one's compare (the token's revision it read) no longer holds.
//!
//! ```text
//! place      token absent, target alive            -> token {target, 1}, assignment on target
//! fail over  token at rev R, holder NOT alive,      -> token {target, E+1}, assignment moves
//!            target alive
//! hand over  token at rev R, target alive           -> token {target, E+1}, assignment moves
//!            (live migration switchover)
//! confirm    token at rev R names me, I am alive    -> nothing (an atomic check)
//! release    token at rev R                         -> token and assignment deleted
//! ```
//!
//! An agent runs (or resumes after a self-fence) a VM only after `confirm` succeeded with
//! its current lease, and only with the epoch it confirmed; "holder not alive" in fail-over
//! is the holder's agent key, which exists exactly while the holder's lease does. Together
//! with the self-fencing timing ([`crate::timing`]) this is why no VM runs twice.
use serde::{Deserialize, Serialize};

use crate::keys;
use crate::store::{Commit, Cond, Kv, Revision, Store, StoreError, Txn};

/// Who may run a VM, and how many times it has moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunToken {
    pub host: String,
    /// 1 at the first placement, +1 at every move.
    pub epoch: u64,
}

/// How an assigned VM gets its state on its host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Origin {
    /// Boot from its spec.
    Boot,
    /// Restore from this checkpoint (on shared storage) after its host failed.
    Checkpoint { path: String },
    /// Arrives by live migration from this host.
    Migration { from: String },
}

/// What an agent is told to run: the value of `/ray/hosts/<host>/vms/<vm>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The token epoch this assignment belongs to.
    pub epoch: u64,
    pub origin: Origin,
}

/// A token change that went through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Granted {
    pub token: RunToken,
    /// The revision it was written at (compare against it next time).
    pub revision: Revision,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the value of {key} is not valid: {why}")]
    Corrupt { key: String, why: String },
    /// The change was refused; the text says why, from what the store holds now.
    #[error("{0}")]
    Refused(String),
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain structs of strings and numbers: serializing cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Reads a VM's token and the revision it is at.
pub async fn read<S: Store>(s: &S, vm: &str) -> Result<Option<(RunToken, Kv)>, TokenError> {
    let key = keys::run_token(vm);
    let Some(kv) = s.get(&key).await? else {
        return Ok(None);
    };
    let token = serde_json::from_slice(&kv.value).map_err(|e| TokenError::Corrupt {
        key,
        why: e.to_string(),
    })?;
    Ok(Some((token, kv)))
}

async fn alive<S: Store>(s: &S, host: &str) -> Result<bool, StoreError> {
    Ok(s.get(&keys::host_alive(host)).await?.is_some())
}

/// First placement of `vm` on `host`.
pub async fn place<S: Store>(
    s: &S,
    vm: &str,
    host: &str,
    origin: Origin,
) -> Result<Granted, TokenError> {
    let token = RunToken {
        host: host.into(),
        epoch: 1,
    };
    let txn = Txn::new()
        .when(keys::run_token(vm), Cond::Absent)
        .when(keys::host_alive(host), Cond::Present)
        .put(keys::run_token(vm), json(&token))
        .put(
            keys::assignment(host, vm),
            json(&Assignment { epoch: 1, origin }),
        );
    match s.commit(txn).await? {
        Commit::Done(revision) => Ok(Granted { token, revision }),
        Commit::Conflict => {
            if let Some((t, _)) = read(s, vm).await? {
                return Err(TokenError::Refused(format!(
                    "VM {vm} already has a run token: host {} (epoch {})",
                    t.host, t.epoch
                )));
            }
            Err(TokenError::Refused(format!(
                "cannot place VM {vm} on host {host}: the host has no live agent (no lease)"
            )))
        }
    }
}

/// Whether a transfer requires the current holder's lease to have lapsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// HA restart: only once the holder is gone.
    FailOver,
    /// Live migration switchover: between two live hosts.
    HandOver,
}

/// Moves `vm`'s token, as read at `seen`, to `to`.
pub async fn transfer<S: Store>(
    s: &S,
    vm: &str,
    seen: &Kv,
    to: &str,
    origin: Origin,
    kind: Transfer,
) -> Result<Granted, TokenError> {
    let from: RunToken = serde_json::from_slice(&seen.value).map_err(|e| TokenError::Corrupt {
        key: seen.key.clone(),
        why: e.to_string(),
    })?;
    let token = RunToken {
        host: to.into(),
        epoch: from.epoch + 1,
    };
    let mut txn = Txn::new()
        .when(keys::run_token(vm), Cond::ModRevision(seen.mod_revision))
        .when(keys::host_alive(to), Cond::Present);
    if kind == Transfer::FailOver {
        txn = txn.when(keys::host_alive(&from.host), Cond::Absent);
    }
    let txn = txn
        .put(keys::run_token(vm), json(&token))
        .delete(keys::assignment(&from.host, vm))
        .put(
            keys::assignment(to, vm),
            json(&Assignment {
                epoch: token.epoch,
                origin,
            }),
        );
    match s.commit(txn).await? {
        Commit::Done(revision) => Ok(Granted { token, revision }),
        Commit::Conflict => {
            let why = match read(s, vm).await? {
                None => format!("VM {vm} has no run token any more (it was deleted)"),
                Some((now, kv)) if kv.mod_revision != seen.mod_revision => format!(
                    "the run token of VM {vm} changed since it was read (now host {}, epoch {})",
                    now.host, now.epoch
                ),
                Some(_) if kind == Transfer::FailOver && alive(s, &from.host).await? => format!(
                    "host {} holds VM {vm} and its agent is alive again: no fail-over",
                    from.host
                ),
                Some(_) => format!("cannot move VM {vm} to host {to}: the host has no live agent"),
            };
            Err(TokenError::Refused(why))
        }
    }
}

/// Checks, in one revision, that `host` holds `vm`'s token at `epoch` and that its agent
/// lease is alive: the condition for running or resuming the VM there. A token rewritten
/// between the read and the check (still this host's at this epoch) is read again, a few
/// times: only a token that moved, or a dead lease, refuses.
pub async fn confirm<S: Store>(
    s: &S,
    vm: &str,
    host: &str,
    epoch: u64,
) -> Result<Revision, TokenError> {
    let refused =
        |why: String| TokenError::Refused(format!("host {host} may not run VM {vm}: {why}"));
    for _ in 0..CONFIRM_TRIES {
        let Some((token, kv)) = read(s, vm).await? else {
            return Err(refused("it has no run token".into()));
        };
        if token.host != host || token.epoch != epoch {
            return Err(refused(format!(
                "the run token names host {} at epoch {} (this host has epoch {epoch})",
                token.host, token.epoch
            )));
        }
        let txn = Txn::new()
            .when(keys::run_token(vm), Cond::ModRevision(kv.mod_revision))
            .when(keys::host_alive(host), Cond::Present);
        if let Commit::Done(revision) = s.commit(txn).await? {
            return Ok(revision);
        }
    }
    Err(refused(
        "its agent lease is not alive, or the token kept changing".into(),
    ))
}

/// How often [`confirm`] reads a token again that changed under it.
const CONFIRM_TRIES: usize = 3;

/// Deletes `vm`'s token (as read at `seen`) and its assignment: the VM is gone.
pub async fn release<S: Store>(s: &S, vm: &str, seen: &Kv) -> Result<Revision, TokenError> {
    let token: RunToken = serde_json::from_slice(&seen.value).map_err(|e| TokenError::Corrupt {
        key: seen.key.clone(),
        why: e.to_string(),
    })?;
    let txn = Txn::new()
        .when(keys::run_token(vm), Cond::ModRevision(seen.mod_revision))
        .delete(keys::run_token(vm))
        .delete(keys::assignment(&token.host, vm));
    match s.commit(txn).await? {
        Commit::Done(r) => Ok(r),
        Commit::Conflict => Err(TokenError::Refused(format!(
            "the run token of VM {vm} changed since it was read: read it again"
        ))),
    }
}

/// What an agent's write about a VM requires when it lands: the writer still holds the
/// VM's run token at its epoch, or (a migration's receiver, which holds no token yet) the
/// controller's request for it to receive the VM still stands. Read once ([`hold`]),
/// then every write made through it ([`Held::put`]) carries the condition in its own
/// transaction, so an epoch bump or a withdrawn request between the read and the write
/// makes the write fail with no effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub vm: String,
    pub host: String,
    /// The epoch the writer holds (`None`: a migration's receiver).
    pub epoch: Option<u64>,
    /// The compare: the token's (or the incoming request's) revision when read.
    key: String,
    revision: Revision,
}

/// Reads what `host` holds of `vm`: its run token at `epoch`. Refused (with the token's
/// holder and epoch) when the token names another host or another epoch.
pub async fn hold<S: Store>(s: &S, vm: &str, host: &str, epoch: u64) -> Result<Held, TokenError> {
    let stale = |why: String| {
        TokenError::Refused(format!(
            "host {host} (epoch {epoch}) may no longer write about VM {vm}: {why}"
        ))
    };
    let Some((token, kv)) = read(s, vm).await? else {
        return Err(stale("it has no run token".into()));
    };
    if token.host != host || token.epoch != epoch {
        return Err(stale(format!(
            "its run token names host {} at epoch {}",
            token.host, token.epoch
        )));
    }
    Ok(Held {
        vm: vm.into(),
        host: host.into(),
        epoch: Some(epoch),
        key: kv.key,
        revision: kv.mod_revision,
    })
}

/// Reads what `host`, receiving `vm` by migration, holds: the controller's request
/// (`/ray/hosts/<host>/incoming/<vm>`). Refused when there is none.
pub async fn hold_incoming<S: Store>(s: &S, vm: &str, host: &str) -> Result<Held, TokenError> {
    let key = keys::incoming(host, vm);
    let Some(kv) = s.get(&key).await? else {
        return Err(TokenError::Refused(format!(
            "host {host} may no longer write about receiving VM {vm}: the request is withdrawn"
        )));
    };
    Ok(Held {
        vm: vm.into(),
        host: host.into(),
        epoch: None,
        key,
        revision: kv.mod_revision,
    })
}

impl Held {
    /// Writes `key` = `value` only if what was read still holds and the host's agent
    /// lease is alive; refused otherwise, saying what the token names now.
    pub async fn put<S: Store>(
        &self,
        s: &S,
        key: String,
        value: Vec<u8>,
    ) -> Result<Revision, TokenError> {
        let txn = Txn::new()
            .when(self.key.clone(), Cond::ModRevision(self.revision))
            .when(keys::host_alive(&self.host), Cond::Present)
            .put(key.clone(), value);
        match s.commit(txn).await? {
            Commit::Done(r) => Ok(r),
            Commit::Conflict => {
                let now = match self.epoch {
                    None => "the controller withdrew or changed its request".to_string(),
                    Some(_) => match read(s, &self.vm).await? {
                        None => "the VM's run token is gone".into(),
                        Some((t, _)) => {
                            format!(
                                "the run token names host {} at epoch {} now",
                                t.host, t.epoch
                            )
                        }
                    },
                };
                let epoch = self
                    .epoch
                    .map_or_else(String::new, |e| format!(" (epoch {e})"));
                Err(TokenError::Refused(format!(
                    "stale write refused: host {}{epoch} may no longer write {key} about VM {}: {now}, or its agent lease lapsed",
                    self.host, self.vm
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EtcdStore;
    use std::time::Duration;

    async fn agent_up<S: Store>(s: &S, host: &str) -> i64 {
        let lease = s.grant(Duration::from_secs(30)).await.unwrap();
        let c = s
            .commit(Txn::new().put_leased(keys::host_alive(host), "{}", lease))
            .await
            .unwrap();
        assert!(matches!(c, Commit::Done(_)));
        lease
    }

    /// The whole protocol on one store.
    async fn protocol<S: Store>(s: &S) {
        let h1 = agent_up(s, "h1").await;
        let _h2 = agent_up(s, "h2").await;

        // No placement on a host without an agent; a VM is placed once.
        let e = place(s, "vm1", "h9", Origin::Boot).await.unwrap_err();
        assert!(
            e.to_string().contains("host h9") && e.to_string().contains("no live agent"),
            "{e}"
        );
        let g = place(s, "vm1", "h1", Origin::Boot).await.unwrap();
        assert_eq!(
            g.token,
            RunToken {
                host: "h1".into(),
                epoch: 1
            }
        );
        let e = place(s, "vm1", "h2", Origin::Boot).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("already has a run token: host h1 (epoch 1)"),
            "{e}"
        );
        assert!(s
            .get(&keys::assignment("h1", "vm1"))
            .await
            .unwrap()
            .is_some());
        confirm(s, "vm1", "h1", 1).await.unwrap();
        let e = confirm(s, "vm1", "h2", 1).await.unwrap_err();
        assert!(e.to_string().contains("names host h1"), "{e}");

        // Fail-over is refused while h1's agent lives.
        let (_, seen) = read(s, "vm1").await.unwrap().unwrap();
        let cp = Origin::Checkpoint {
            path: "/shared/vm1".into(),
        };
        let e = transfer(s, "vm1", &seen, "h2", cp.clone(), Transfer::FailOver)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("agent is alive again"), "{e}");

        // h1's lease lapses: h1 can no longer confirm; fail-over moves token and assignment.
        s.revoke(h1).await.unwrap();
        let e = confirm(s, "vm1", "h1", 1).await.unwrap_err();
        assert!(e.to_string().contains("lease is not alive"), "{e}");
        let g = transfer(s, "vm1", &seen, "h2", cp.clone(), Transfer::FailOver)
            .await
            .unwrap();
        assert_eq!(
            g.token,
            RunToken {
                host: "h2".into(),
                epoch: 2
            }
        );
        assert!(s
            .get(&keys::assignment("h1", "vm1"))
            .await
            .unwrap()
            .is_none());
        let a = s
            .get(&keys::assignment("h2", "vm1"))
            .await
            .unwrap()
            .unwrap();
        let a: Assignment = serde_json::from_slice(&a.value).unwrap();
        assert_eq!(
            a,
            Assignment {
                epoch: 2,
                origin: cp.clone()
            }
        );

        // A second controller acting on the same stale read loses: the VM moves once.
        let _h3 = agent_up(s, "h3").await;
        let e = transfer(s, "vm1", &seen, "h3", cp, Transfer::FailOver)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("changed since it was read (now host h2, epoch 2)"),
            "{e}"
        );

        // h1 comes back with a new lease: it still may not run vm1 at epoch 1.
        agent_up(s, "h1").await;
        let e = confirm(s, "vm1", "h1", 1).await.unwrap_err();
        assert!(e.to_string().contains("names host h2 at epoch 2"), "{e}");

        // Hand-over between live hosts (migration), then release.
        let (_, seen) = read(s, "vm1").await.unwrap().unwrap();
        let g = transfer(
            s,
            "vm1",
            &seen,
            "h3",
            Origin::Migration { from: "h2".into() },
            Transfer::HandOver,
        )
        .await
        .unwrap();
        assert_eq!(g.token.epoch, 3);
        let (_, seen) = read(s, "vm1").await.unwrap().unwrap();
        release(s, "vm1", &seen).await.unwrap();
        assert!(read(s, "vm1").await.unwrap().is_none());
        assert!(s
            .get(&keys::assignment("h3", "vm1"))
            .await
            .unwrap()
            .is_none());
        let e = release(s, "vm1", &seen).await.unwrap_err();
        assert!(e.to_string().contains("changed since it was read"), "{e}");
    }

    /// Many controllers fail one VM over at once from the same read: exactly one wins.
    async fn racing_fail_overs<S: Store + Clone>(s: &S) {
        let dead = agent_up(s, "r0").await;
        for h in 1..=8 {
            agent_up(s, &format!("r{h}")).await;
        }
        place(s, "race", "r0", Origin::Boot).await.unwrap();
        let (_, seen) = read(s, "race").await.unwrap().unwrap();
        s.revoke(dead).await.unwrap();
        let mut tasks = Vec::new();
        for h in 1..=8 {
            let (s, seen) = (s.clone(), seen.clone());
            tasks.push(tokio::spawn(async move {
                let to = format!("r{h}");
                transfer(&s, "race", &seen, &to, Origin::Boot, Transfer::FailOver)
                    .await
                    .is_ok()
            }));
        }
        let mut wins = 0;
        for t in tasks {
            wins += usize::from(t.await.unwrap());
        }
        assert_eq!(wins, 1);
        let assigned = s.list(keys::HOSTS).await.unwrap();
        let n = assigned
            .kvs
            .iter()
            .filter(|kv| kv.key.ends_with("/vms/race"))
            .count();
        assert_eq!(n, 1, "exactly one host is assigned the VM");
    }

    /// An agent's writes about a VM land only while it holds the VM at its epoch: an epoch
    /// bump, a lapsed lease or a withdrawn receive request between its read and its write
    /// makes the write fail with no effect.
    async fn stale_writes<S: Store>(s: &S) {
        agent_up(s, "s1").await;
        let s2 = agent_up(s, "s2").await;
        place(s, "stale", "s1", Origin::Boot).await.unwrap();
        let observed = keys::vm_observed("stale");
        async fn value<S: Store>(s: &S) -> Option<Vec<u8>> {
            let key = keys::vm_observed("stale");
            s.get(&key).await.unwrap().map(|kv| kv.value)
        }
        let held = hold(s, "stale", "s1", 1).await.unwrap();
        held.put(s, observed.clone(), b"first".to_vec())
            .await
            .unwrap();
        assert_eq!(value(s).await.as_deref(), Some(&b"first"[..]));

        // Read at epoch 1; the token moves to s2 (epoch 2) before the write.
        let held = hold(s, "stale", "s1", 1).await.unwrap();
        let (_, seen) = read(s, "stale").await.unwrap().unwrap();
        let mig = Origin::Migration { from: "s1".into() };
        transfer(s, "stale", &seen, "s2", mig, Transfer::HandOver)
            .await
            .unwrap();
        let e = held
            .put(s, observed.clone(), b"late".to_vec())
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("stale write refused")
                && e.to_string().contains("host s1 (epoch 1)")
                && e.to_string().contains("names host s2 at epoch 2"),
            "{e}"
        );
        assert_eq!(value(s).await.as_deref(), Some(&b"first"[..]), "no effect");
        let e = hold(s, "stale", "s1", 1).await.unwrap_err();
        assert!(e.to_string().contains("names host s2 at epoch 2"), "{e}");

        // The holder's lease lapses between its read and its write.
        let held = hold(s, "stale", "s2", 2).await.unwrap();
        s.revoke(s2).await.unwrap();
        let e = held
            .put(s, observed.clone(), b"fenced".to_vec())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("lease lapsed"), "{e}");
        assert_eq!(value(s).await.as_deref(), Some(&b"first"[..]), "no effect");

        // A receiver whose request is withdrawn between its read and its report.
        agent_up(s, "s3").await;
        let incoming = keys::incoming("s3", "stale");
        s.commit(Txn::new().put(incoming.clone(), "{}"))
            .await
            .unwrap();
        let held = hold_incoming(s, "stale", "s3").await.unwrap();
        held.put(s, keys::receiver("stale"), b"waiting".to_vec())
            .await
            .unwrap();
        s.commit(Txn::new().delete(incoming)).await.unwrap();
        let e = held
            .put(s, keys::receiver("stale"), b"done".to_vec())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("withdrew"), "{e}");
        let r = s.get(&keys::receiver("stale")).await.unwrap().unwrap();
        assert_eq!(r.value, b"waiting");
        let e = hold_incoming(s, "stale", "s3").await.unwrap_err();
        assert!(e.to_string().contains("withdrawn"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_redb() {
        let (s, dir) = crate::testing::fresh_redb("token");
        protocol(&s).await;
        racing_fail_overs(&s).await;
        stale_writes(&s).await;
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_etcd() {
        let etcd = crate::testing::Etcd::start("runtoken").await;
        let s = EtcdStore::connect(&etcd.endpoints()).await.unwrap();
        protocol(&s).await;
        racing_fail_overs(&s).await;
        stale_writes(&s).await;
    }
}
