//! Drains: a host whose spec says `drain` gets no new VMs (it is Draining), and each
//! pass asks for the live migration of its VMs, [`PARALLEL`] at a time, through the same
//! requests an operator writes (`migrate.rs` carries them out). A VM whose migration
//! failed is asked for again after [`RETRY`]. With none left the host is Drained, logged
//! once. An aborted drain (`ray node drain --abort`, or `ray node uncordon`) clears the
//! flag; the migrations under way are aborted by that command.
use std::collections::BTreeSet;
use std::time::Duration;

use super::plan::World;
use super::{Applier, ControllerError, Operation};
use crate::decisions::{Entry, Kind};
use crate::keys;
use crate::migration::{json, Request};
use crate::store::{Commit, Cond, Store, Txn};

/// Migrations under way per draining host.
pub const PARALLEL: usize = 2;
/// How long a VM whose migration failed waits before its drain asks again.
pub const RETRY: Duration = Duration::from_secs(30);

/// The cause written into a drain's requests.
pub fn cause(host: &str) -> String {
    format!("drain {host}")
}

/// Asks for the next migrations off every draining host; returns how many it asked for.
pub(super) async fn step<S: Store>(
    s: &S,
    world: &World,
    applier: &mut Applier,
) -> Result<usize, ControllerError> {
    let draining: Vec<&str> = world
        .hosts
        .iter()
        .filter(|h| h.spec.drain && h.alive)
        .map(|h| h.name.as_str())
        .collect();
    applier.drained.retain(|h| draining.contains(&h.as_str()));
    if draining.is_empty() {
        return Ok(0);
    }
    let mut busy: BTreeSet<String> = world
        .migrations
        .iter()
        .filter(|(_, m)| m.request.is_some())
        .map(|(vm, _)| vm.clone())
        .collect();
    for kv in s.list(keys::OPS).await?.kvs {
        if let Ok(Operation::Migrate { vm, .. }) = serde_json::from_slice(&kv.value) {
            busy.insert(vm);
        }
    }
    let mut asked = 0;
    for host in draining {
        let on: Vec<&str> = world
            .vms
            .iter()
            .filter(|v| v.token.as_ref().is_some_and(|t| t.host == host))
            .map(|v| v.name.as_str())
            .collect();
        if on.is_empty() {
            if applier.drained.insert(host.to_string()) {
                let msg = format!("host {host} is drained: no VMs left (maintenance)");
                applier
                    .log(s, Entry::new(Kind::Drained, None, Some(host), msg))
                    .await?;
            }
            continue;
        }
        let mut running = on.iter().filter(|vm| busy.contains(**vm)).count();
        for vm in on {
            if running >= PARALLEL {
                break;
            }
            let recent = applier
                .migration_failed
                .get(vm)
                .is_some_and(|t| t.elapsed() < applier.drain_retry);
            if busy.contains(vm) || recent {
                continue;
            }
            let req = Request {
                to: None,
                abort: false,
                cause: Some(cause(host)),
            };
            let txn = Txn::new()
                .when(keys::migrate_request(vm), Cond::Absent)
                .put(keys::migrate_request(vm), json(&req));
            if let Commit::Done(_) = s.commit(txn).await? {
                running += 1;
                asked += 1;
            }
        }
    }
    Ok(asked)
}
