//! The operator's host operations (cordon, uncordon, drain and its abort) and the hosts
//! overview, as `ray node` and `ray cluster status` and `ray web` share them: each is a
//! revision-checked write of the host's spec (or of migration requests) the controller
//! then acts on; nothing here places or moves a VM itself.
use serde::Serialize;

use crate::controller::{leader, read_world, World};
use crate::keys;
use crate::migration::Request;
use crate::spec::HostSpec;
use crate::store::{Commit, Cond, Store, StoreError, Txn};

/// Why a host operation was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    BadName(String),
    #[error("host {0} is not known to the cluster (it never registered)")]
    UnknownHost(String),
    #[error("the spec of host {0} changed meanwhile: try again")]
    Conflict(String),
    #[error("the spec of host {host} cannot be read: {reason}")]
    BadSpec { host: String, reason: String },
    #[error("cannot encode a migration request: {0}")]
    Encode(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Changes a host's spec, revision-checked so a concurrent change is not lost.
pub async fn set_host_spec<S: Store>(
    s: &S,
    host: &str,
    change: impl FnOnce(&mut HostSpec),
) -> Result<(), OpError> {
    keys::check_name("host", host).map_err(OpError::BadName)?;
    if s.get(&keys::host_alive(host)).await?.is_none()
        && s.get(&keys::host_status(host)).await?.is_none()
    {
        return Err(OpError::UnknownHost(host.to_string()));
    }
    let current = s.get(&keys::host_spec(host)).await?;
    let mut spec =
        HostSpec::parse(current.as_ref().map(|kv| kv.value.as_slice())).map_err(|reason| {
            OpError::BadSpec {
                host: host.to_string(),
                reason,
            }
        })?;
    change(&mut spec);
    let cond = match &current {
        Some(kv) => Cond::ModRevision(kv.mod_revision),
        None => Cond::Absent,
    };
    let txn = Txn::new()
        .when(keys::host_spec(host), cond)
        .put(keys::host_spec(host), spec.to_json());
    if s.commit(txn).await? == Commit::Conflict {
        return Err(OpError::Conflict(host.to_string()));
    }
    Ok(())
}

/// The VMs whose run token names `host`.
pub fn vms_on(world: &World, host: &str) -> Vec<String> {
    world
        .vms
        .iter()
        .filter(|v| v.token.as_ref().is_some_and(|t| t.host == host))
        .map(|v| v.name.clone())
        .collect()
}

/// A host's state as the operator sees it: the placement state, or `Cordoned` for a live
/// cordoned host that is not draining.
pub fn host_state(world: &World, host: &str) -> Option<String> {
    let h = world.hosts.iter().find(|h| h.name == host)?;
    let left = vms_on(world, host).len();
    Some(if h.spec.cordon && h.alive && !h.spec.drain {
        "Cordoned".to_string()
    } else {
        h.state(left)
    })
}

/// Gives a host no new VMs; its own keep running.
pub async fn cordon<S: Store>(s: &S, host: &str) -> Result<(), OpError> {
    set_host_spec(s, host, |h| h.cordon = true).await
}

/// What an uncordon did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Uncordoned {
    /// The host takes new VMs again.
    Ready,
    /// The host was Drained: it is Rejoining until the controller checked it.
    Rejoining,
}

/// Lets a host take new VMs again (also ends a drain). A Drained host (its maintenance
/// over) goes through Rejoining first: the controller checks it before it is Ready.
pub async fn uncordon<S: Store>(s: &S, host: &str) -> Result<Uncordoned, OpError> {
    keys::check_name("host", host).map_err(OpError::BadName)?;
    let world = read_world(s).await?;
    let left = vms_on(&world, host).len();
    let drained = world
        .hosts
        .iter()
        .find(|h| h.name == host)
        .is_some_and(|h| h.spec.drain && left == 0);
    if drained {
        let request = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        set_host_spec(s, host, |h| {
            (h.cordon, h.drain, h.rejoin) = (false, false, Some(request));
        })
        .await?;
        Ok(Uncordoned::Rejoining)
    } else {
        set_host_spec(s, host, |h| (h.cordon, h.drain) = (false, false)).await?;
        Ok(Uncordoned::Ready)
    }
}

/// Asks for a drain: the host takes no new VMs and the controller live-migrates its own
/// away.
pub async fn drain<S: Store>(s: &S, host: &str) -> Result<(), OpError> {
    set_host_spec(s, host, |h| h.drain = true).await
}

/// Ends a drain: the migrations it asked for that are still under way are aborted (past
/// their switch-over they complete), the VMs left stay. Returns the VMs whose migration
/// was asked to abort.
pub async fn drain_abort<S: Store>(s: &S, host: &str) -> Result<Vec<String>, OpError> {
    set_host_spec(s, host, |h| h.drain = false).await?;
    let world = read_world(s).await?;
    let cause = crate::controller::drain::cause(host);
    let mut aborted = Vec::new();
    for (vm, m) in &world.migrations {
        if m.request.as_ref().and_then(|r| r.cause.as_deref()) == Some(cause.as_str()) {
            let abort = Request {
                abort: true,
                cause: Some(cause.clone()),
                ..Request::default()
            };
            let value = serde_json::to_vec(&abort).map_err(|e| OpError::Encode(e.to_string()))?;
            let txn = Txn::new()
                .when(keys::migrate_request(vm), Cond::Present)
                .put(keys::migrate_request(vm), value);
            s.commit(txn).await?;
            aborted.push(vm.clone());
        }
    }
    Ok(aborted)
}

/// One host of the overview.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostSummary {
    pub host: String,
    /// As [`host_state`] says.
    pub state: String,
    pub role: String,
    /// Its agent's lease is alive.
    pub alive: bool,
    pub cordoned: bool,
    pub draining: bool,
    /// Its inventory, as its agent last reported it.
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    /// What the VMs placed on it ask for.
    pub vcpus_used: u64,
    pub memory_used_mib: u64,
    /// The VMs whose run token names it.
    pub vms: Vec<String>,
}

/// One migration under way.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MigrationSummary {
    pub vm: String,
    /// Why it was asked for (`drain HOST`), if said.
    pub cause: Option<String>,
    /// The sender's (else the receiver's) last report, or `asked for`.
    pub progress: String,
}

/// The hosts overview at one reading of the store.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Overview {
    /// The leading controller's name.
    pub leader: Option<String>,
    pub hosts: Vec<HostSummary>,
    pub migrations: Vec<MigrationSummary>,
    /// Desired VMs without a host yet.
    pub vms_pending: usize,
}

/// Reads the hosts overview.
pub async fn overview<S: Store>(s: &S) -> Result<Overview, OpError> {
    let world = read_world(s).await?;
    let hosts = world
        .hosts
        .iter()
        .map(|h| {
            let vms = vms_on(&world, &h.name);
            let (mut vcpus_used, mut memory_used_mib) = (0u64, 0u64);
            for v in world.vms.iter().filter(|v| vms.contains(&v.name)) {
                if let Some(Ok(spec)) = &v.spec {
                    vcpus_used += u64::from(spec.vcpus);
                    memory_used_mib += spec.memory_mib;
                }
            }
            HostSummary {
                host: h.name.clone(),
                state: host_state(&world, &h.name).unwrap_or_default(),
                role: serde_json::to_value(h.spec.role)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                alive: h.alive,
                cordoned: h.spec.cordon,
                draining: h.spec.drain,
                cpus: h.report.as_ref().map(|r| r.inventory.cpus),
                memory_mib: h.report.as_ref().map(|r| r.inventory.memory_mib),
                vcpus_used,
                memory_used_mib,
                vms,
            }
        })
        .collect();
    let migrations = world
        .migrations
        .iter()
        .map(|(vm, m)| MigrationSummary {
            vm: vm.clone(),
            cause: m.request.as_ref().and_then(|r| r.cause.clone()),
            progress: m
                .sender
                .as_ref()
                .or(m.receiver.as_ref())
                .map_or_else(|| "asked for".into(), |p| p.line()),
        })
        .collect();
    let desired = world.vms.iter().filter(|v| v.spec.is_some());
    let vms_pending = desired.filter(|v| v.token.is_none()).count();
    Ok(Overview {
        leader: leader::current(s).await?.map(|l| l.id),
        hosts,
        migrations,
        vms_pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtoken::{self, Origin};
    use std::time::Duration;

    #[tokio::test]
    async fn cordon_drain_abort_and_uncordon_write_the_host_spec_the_overview_reads() {
        let (s, dir) = crate::testing::fresh_redb("ops");
        let lease = s.grant(Duration::from_secs(30)).await.unwrap();
        let report = br#"{"inventory":{"cpus":8,"memory_mib":16384,"numa_nodes":1},"vms":["a"],"fenced":false}"#;
        s.commit(
            Txn::new()
                .put_leased(keys::host_alive("h1"), "{}", lease)
                .put(keys::host_status("h1"), &report[..])
                .put(keys::vm_spec("a"), &br#"{"vcpus":2,"memory_mib":256}"#[..])
                .put(keys::vm_spec("b"), &br#"{"vcpus":1,"memory_mib":64}"#[..]),
        )
        .await
        .unwrap();
        runtoken::place(&s, "a", "h1", Origin::Boot).await.unwrap();
        let state = |o: &Overview| (o.hosts[0].state.clone(), o.hosts[0].vms.clone());
        let o = overview(&s).await.unwrap();
        assert_eq!(state(&o), ("Ready".into(), vec!["a".to_string()]));
        let h = &o.hosts[0];
        assert_eq!((h.cpus, h.vcpus_used, h.memory_used_mib), (Some(8), 2, 256));
        assert_eq!((h.role.as_str(), o.vms_pending), ("worker", 1));

        cordon(&s, "h1").await.unwrap();
        assert_eq!(state(&overview(&s).await.unwrap()).0, "Cordoned");
        assert_eq!(uncordon(&s, "h1").await.unwrap(), Uncordoned::Ready);
        assert_eq!(state(&overview(&s).await.unwrap()).0, "Ready");

        drain(&s, "h1").await.unwrap();
        let o = overview(&s).await.unwrap();
        assert!(o.hosts[0].draining);
        assert_eq!(state(&o).0, "Draining");
        assert_eq!(drain_abort(&s, "h1").await.unwrap(), Vec::<String>::new());
        let o = overview(&s).await.unwrap();
        assert!(!o.hosts[0].draining && !o.hosts[0].cordoned);
        assert_eq!(state(&o).0, "Ready");

        assert!(matches!(
            cordon(&s, "nope").await,
            Err(OpError::UnknownHost(h)) if h == "nope"
        ));
        assert!(matches!(cordon(&s, "../x").await, Err(OpError::BadName(_))));
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
