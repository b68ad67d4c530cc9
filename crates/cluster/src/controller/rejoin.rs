//! Rejoining: a host back from maintenance (`ray node uncordon` of a Drained host sets
//! `rejoin` in its spec) is Rejoining, and takes no VMs, until three checks pass:
//!
//! 1. its agent holds a fresh lease (the `alive` key is there);
//! 2. its agent re-reported its inventory for this request (its status answers the
//!    spec's `rejoin` value: written after the agent saw the request, inventory read then);
//! 3. no stale VMM runs there: every VM its agent reports running is one whose run token
//!    names this host.
//!
//! Then the controller clears the request (revision-checked) and the host is Ready. The
//! request (`Offline -> Rejoining`, cause `Recover`), every change of what it waits for,
//! and the end (`Rejoining -> Ready`, cause `RejoinOk`, with the evidence) are logged.
use ray_scheduler::status::{transition, HostEvent};
use ray_scheduler::HostStatus;
use serde_json::json;

use super::plan::{HostView, World};
use super::{Applier, ControllerError};
use crate::decisions::{Entry, Kind};
use crate::keys;
use crate::spec::HostSpec;
use crate::store::{Commit, Cond, Store, Txn};

/// What a rejoining host still waits for, or `None` when every check passed.
pub fn waiting_for(host: &HostView, world: &World, request: u64) -> Option<String> {
    if !host.alive {
        return Some("its agent has no lease: start `ray agent` on it".into());
    }
    let Some(report) = &host.report else {
        return Some("its agent has not reported its inventory yet".into());
    };
    if report.rejoin != Some(request) {
        return Some("its agent has not re-reported its inventory since the request".into());
    }
    let stale: Vec<&str> = report
        .vms
        .iter()
        .filter(|vm| {
            !world
                .vms
                .iter()
                .any(|v| &v.name == *vm && v.token.as_ref().is_some_and(|t| t.host == host.name))
        })
        .map(String::as_str)
        .collect();
    if !stale.is_empty() {
        return Some(format!(
            "stale VMMs run there (their run tokens do not name it): {}",
            stale.join(", ")
        ));
    }
    None
}

/// Checks every rejoining host; returns how many became Ready.
pub(super) async fn step<S: Store>(
    s: &S,
    world: &World,
    applier: &mut Applier,
) -> Result<usize, ControllerError> {
    let rejoining: Vec<(&HostView, u64)> = world
        .hosts
        .iter()
        .filter_map(|h| Some((h, h.spec.rejoin?)))
        .collect();
    applier
        .rejoins
        .retain(|h, _| rejoining.iter().any(|(r, _)| &r.name == h));
    let mut ready = 0;
    for (host, request) in rejoining {
        let name = host.name.as_str();
        let seen = applier.rejoins.get(name).filter(|(r, _)| *r == request);
        if seen.is_none() {
            let to = transition(HostStatus::Offline, HostEvent::Recover)
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            let msg = format!(
                "host {name}: Offline -> {to} (Recover): its maintenance ended; it takes no VMs until its agent holds a fresh lease, re-reports its inventory and runs no stale VMM"
            );
            applier
                .log(s, Entry::new(Kind::Rejoining, None, Some(name), msg))
                .await?;
            applier
                .rejoins
                .insert(name.to_string(), (request, String::new()));
        }
        match waiting_for(host, world, request) {
            Some(why) => {
                let last = applier.rejoins.get(name).map(|(_, w)| w.as_str());
                if last != Some(why.as_str()) {
                    let msg = format!("host {name}: Rejoining, waiting: {why}");
                    applier
                        .log(s, Entry::new(Kind::Rejoining, None, Some(name), msg))
                        .await?;
                    applier.rejoins.insert(name.to_string(), (request, why));
                }
            }
            None => {
                // Clear the request only if it is still this one.
                let Some(kv) = s.get(&keys::host_spec(name)).await? else {
                    continue;
                };
                let Ok(mut spec) = HostSpec::parse(Some(&kv.value)) else {
                    continue;
                };
                if spec.rejoin != Some(request) {
                    continue;
                }
                spec.rejoin = None;
                let txn = Txn::new()
                    .when(keys::host_spec(name), Cond::ModRevision(kv.mod_revision))
                    .put(keys::host_spec(name), spec.to_json());
                if s.commit(txn).await? != Commit::Conflict {
                    let inv = host.report.as_ref().map(|r| r.inventory.clone());
                    let vms = host.report.as_ref().map_or(0, |r| r.vms.len());
                    let to = transition(HostStatus::Rejoining, HostEvent::RejoinOk)
                        .map_or_else(|e| e.to_string(), |s| s.to_string());
                    let msg = format!(
                        "host {name}: Rejoining -> {to} (RejoinOk): fresh lease, inventory re-reported ({}), no stale VMM ({vms} VMs running, all its own)",
                        inv.as_ref().map_or("-".into(), |i| format!(
                            "{} CPUs, {} MiB, {} NUMA node(s)",
                            i.cpus, i.memory_mib, i.numa_nodes
                        ))
                    );
                    let data = json!({ "inventory": inv, "vms": vms, "request": request });
                    applier
                        .log(
                            s,
                            Entry::new(Kind::Rejoined, None, Some(name), msg).with(data),
                        )
                        .await?;
                    applier.rejoins.remove(name);
                    ready += 1;
                }
            }
        }
    }
    Ok(ready)
}
