//! Live migrations, as the leader drives them (the protocol is in [`crate::migration`]).
//!
//! Each pass looks at every request and every recorded migration and takes the one step
//! the store's state calls for; nothing is remembered between passes, so a successor
//! controller simply carries on where its predecessor stopped:
//!
//! ```text
//! request, no operation   -> pick the target (placement engine), record the operation and
//!                            the target's incoming key in one transaction   | refuse: log
//! token already on target -> finished (a predecessor handed it over): clear
//! token gone or elsewhere -> undo (deleted, or moved by someone else): clear
//! receiver done           -> hand the token over (revision-checked), clear, log migrated
//! receiver or sender failed -> undo: clear (the target drops its copy), log why
//! abort asked             -> take the outgoing key away (the source cancels; its report
//!                            then decides), or undo when nothing was sent yet
//! receiver waiting        -> write the source's outgoing key with the receiver's address
//! ```
//! "Clear" deletes the request, both hosts' keys, both reports and the operation in one
//! transaction.
use serde_json::json;

use super::plan::{target_for, PlanConfig, World};
use super::{conflict, Applier, ControllerError, Operation};
use crate::decisions::{Entry, Kind};
use crate::keys;
use crate::migration::{json, Incoming, Outgoing, Phase, Progress};
use crate::runtoken::{self, Origin, RunToken, Transfer};
use crate::store::{Commit, Store, Txn};

/// One recorded migration.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Move {
    vm: String,
    from: String,
    to: String,
    epoch: u64,
}

impl Move {
    fn op(&self) -> Operation {
        Operation::Migrate {
            vm: self.vm.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            epoch: self.epoch,
        }
    }

    /// Everything the migration wrote, deleted at once.
    fn clear(&self) -> Txn {
        Txn::new()
            .delete(keys::incoming(&self.to, &self.vm))
            .delete(keys::outgoing(&self.from, &self.vm))
            .delete(keys::receiver(&self.vm))
            .delete(keys::sender(&self.vm))
            .delete(keys::migrate_request(&self.vm))
            .delete(self.op().key())
    }
}

/// Takes one step for every migration asked for or under way; returns how many moved on.
pub(super) async fn step<S: Store>(
    s: &S,
    world: &World,
    applier: &mut Applier,
    cfg: PlanConfig,
) -> Result<usize, ControllerError> {
    let mut moves = std::collections::BTreeMap::new();
    for kv in s.list(keys::OPS).await?.kvs {
        if let Ok(Operation::Migrate {
            vm,
            from,
            to,
            epoch,
        }) = serde_json::from_slice(&kv.value)
        {
            moves.insert(
                vm.clone(),
                Move {
                    vm,
                    from,
                    to,
                    epoch,
                },
            );
        }
    }
    let mut n = 0;
    for (vm, m) in &world.migrations {
        if let (Some(req), false) = (&m.request, moves.contains_key(vm)) {
            start(s, world, applier, vm, req.to.as_deref(), req.abort, cfg).await?;
            n += 1;
        }
    }
    for m in moves.values() {
        n += usize::from(advance(s, world, applier, m).await?);
    }
    Ok(n)
}

async fn start<S: Store>(
    s: &S,
    world: &World,
    applier: &mut Applier,
    vm: &str,
    to: Option<&str>,
    abort: bool,
    cfg: PlanConfig,
) -> Result<(), ControllerError> {
    let token = world
        .vms
        .iter()
        .find(|v| v.name == vm)
        .and_then(|v| v.token.clone());
    let target = match (abort, &token) {
        (true, _) => Err("abort asked, but no migration is under way".to_string()),
        (false, None) => Err(format!("VM {vm} is not placed: nothing to migrate")),
        (false, Some(_)) => target_for(world, vm, to, cfg),
    };
    let (Some(RunToken { host: from, epoch }), Ok(to)) = (token, target.clone()) else {
        let why = target.err().unwrap_or_default();
        applier
            .migration_failed
            .insert(vm.to_string(), std::time::Instant::now());
        let done = Txn::new().delete(keys::migrate_request(vm));
        applier.fenced(matches!(s.commit(done).await?, Commit::Done(_)))?;
        let msg = format!("migration refused: {why}");
        return applier
            .log(s, Entry::new(Kind::MigrationFailed, Some(vm), None, msg))
            .await
            .map_err(Into::into);
    };
    let m = Move {
        vm: vm.into(),
        from: from.clone(),
        to: to.clone(),
        epoch,
    };
    let incoming = Incoming {
        from: from.clone(),
        epoch,
    };
    // The record and the first step in one transaction: the record is there before
    // anything acts on the step.
    let txn = Txn::new()
        .put(m.op().key(), json(&m.op()))
        .put(keys::incoming(&to, vm), json(&incoming));
    applier.fenced(matches!(s.commit(txn).await?, Commit::Done(_)))?;
    let cause = world
        .migrations
        .get(vm)
        .and_then(|r| r.request.as_ref()?.cause.clone())
        .unwrap_or_else(|| "operator".into());
    let msg = format!("migrating from host {from} to host {to} (asked by {cause})");
    let data = json!({"from": from, "to": to, "epoch": epoch, "cause": cause});
    applier
        .log(
            s,
            Entry::new(Kind::Migrating, Some(vm), Some(&to), msg).with(data),
        )
        .await?;
    Ok(())
}

/// One step of a recorded migration; true if it changed anything.
async fn advance<S: Store>(
    s: &S,
    world: &World,
    applier: &mut Applier,
    m: &Move,
) -> Result<bool, ControllerError> {
    let token = world
        .vms
        .iter()
        .find(|v| v.name == m.vm)
        .and_then(|v| v.token.clone());
    let view = world.migrations.get(&m.vm).cloned().unwrap_or_default();
    let (receiver, sender) = (view.receiver.as_ref(), view.sender.as_ref());
    let moved = RunToken {
        host: m.to.clone(),
        epoch: m.epoch + 1,
    };
    let at_source = RunToken {
        host: m.from.clone(),
        epoch: m.epoch,
    };
    if token.as_ref() == Some(&moved) {
        return end(
            s,
            applier,
            m,
            true,
            "finished (the run token had moved)",
            sender,
        )
        .await;
    }
    if token.as_ref() != Some(&at_source) {
        let why = match token {
            None => "the VM was deleted meanwhile".to_string(),
            Some(t) => format!(
                "its run token changed meanwhile (host {}, epoch {})",
                t.host, t.epoch
            ),
        };
        return end(s, applier, m, false, &why, sender).await;
    }
    if receiver.is_some_and(|r| r.phase == Phase::Done) {
        let Some((_, kv)) = runtoken::read(s, &m.vm).await.map_err(tokerr)? else {
            return Ok(false);
        };
        let origin = Origin::Migration {
            from: m.from.clone(),
        };
        return match runtoken::transfer(s, &m.vm, &kv, &m.to, origin, Transfer::HandOver).await {
            Ok(_) => end(s, applier, m, true, "the VM runs on its target", sender).await,
            // The target's agent is away (or the token moved): decided again next pass.
            Err(e) => conflict(&m.vm, e).map(|_| false),
        };
    }
    for side in [receiver, sender].into_iter().flatten() {
        if side.phase == Phase::Failed {
            let why = format!(
                "host {} reports: {}",
                side.host,
                side.error.as_deref().unwrap_or("failed")
            );
            return end(s, applier, m, false, &why, sender).await;
        }
    }
    let outgoing = s.get(&keys::outgoing(&m.from, &m.vm)).await?;
    if view.request.as_ref().is_some_and(|r| r.abort) {
        if outgoing.is_some() {
            // The source cancels; its report (rolled back, or too late) decides.
            let txn = Txn::new().delete(keys::outgoing(&m.from, &m.vm));
            applier.fenced(matches!(s.commit(txn).await?, Commit::Done(_)))?;
            return Ok(true);
        }
        if sender.is_none() {
            return end(s, applier, m, false, "aborted before it started", None).await;
        }
        return Ok(false);
    }
    if let (None, Some(r)) = (&outgoing, receiver) {
        if let (Phase::Waiting, Some(addr)) = (r.phase, &r.addr) {
            let out = Outgoing {
                to: m.to.clone(),
                addr: addr.clone(),
                epoch: m.epoch,
            };
            let txn = Txn::new().put(keys::outgoing(&m.from, &m.vm), json(&out));
            applier.fenced(matches!(s.commit(txn).await?, Commit::Done(_)))?;
            return Ok(true);
        }
    }
    Ok(false)
}

fn tokerr(e: runtoken::TokenError) -> ControllerError {
    match e {
        runtoken::TokenError::Store(e) => e.into(),
        e => ControllerError::LostLead(e.to_string()),
    }
}

/// Clears a migration and logs its outcome.
async fn end<S: Store>(
    s: &S,
    applier: &mut Applier,
    m: &Move,
    moved: bool,
    why: &str,
    sender: Option<&Progress>,
) -> Result<bool, ControllerError> {
    applier.fenced(matches!(s.commit(m.clear()).await?, Commit::Done(_)))?;
    let (kind, host, msg) = if moved {
        let msg = format!(
            "migrated from host {} to host {} (run token epoch {}): {why}",
            m.from,
            m.to,
            m.epoch + 1
        );
        (Kind::Migrated, &m.to, msg)
    } else {
        applier
            .migration_failed
            .insert(m.vm.clone(), std::time::Instant::now());
        let msg = format!(
            "migration to host {} ended, the VM stays on host {}: {why}",
            m.to, m.from
        );
        (Kind::MigrationFailed, &m.from, msg)
    };
    let data = json!({
        "from": m.from, "to": m.to, "epoch": m.epoch,
        "downtime_ms": sender.and_then(|p| p.downtime_ms),
        "elapsed_ms": sender.map(|p| p.elapsed_ms),
        "bytes_sent": sender.map(|p| p.bytes_sent),
    });
    applier
        .log(s, Entry::new(kind, Some(&m.vm), Some(host), msg).with(data))
        .await?;
    Ok(true)
}
