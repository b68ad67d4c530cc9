//! What `ray cluster nodes` and `ray cluster vms` show, read from the store in one listing
//! each (the store's state at one revision).
use std::collections::BTreeMap;

use serde::Serialize;

use crate::agent::HostReport;
use crate::keys;
use crate::runtoken::RunToken;
use crate::spec::VmSpec;
use crate::store::{Store, StoreError};

/// One host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    pub host: String,
    /// `ready` (agent alive), `fenced` (alive but its VMs paused), `rejoining` (alive,
    /// back from maintenance, not checked yet), `down` (no lease).
    pub state: String,
    pub lease: Option<i64>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub vms: Vec<String>,
}

/// One cluster VM.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmRow {
    pub vm: String,
    /// The host its run token names, if it has been placed.
    pub host: Option<String>,
    pub epoch: Option<u64>,
    pub vcpus: Option<u8>,
    pub memory_mib: Option<u64>,
    /// Why the spec could not be read, if it could not.
    pub problem: Option<String>,
    /// Its latest checkpoint (HA VMs), how old it is now, and how long it paused the VM.
    #[serde(default)]
    pub checkpoint: Option<String>,
    #[serde(default)]
    pub checkpoint_age_s: Option<f64>,
    #[serde(default)]
    pub checkpoint_paused_ms: Option<f64>,
}

pub async fn nodes<S: Store>(s: &S) -> Result<(Vec<NodeRow>, i64), StoreError> {
    let listing = s.list(keys::HOSTS).await?;
    let mut rows: BTreeMap<String, NodeRow> = BTreeMap::new();
    let mut rejoining = Vec::new();
    for kv in &listing.kvs {
        let Some((host, rest)) = keys::split_host_key(&kv.key) else {
            continue;
        };
        let row = rows.entry(host.to_string()).or_insert_with(|| NodeRow {
            host: host.to_string(),
            state: "down".into(),
            lease: None,
            cpus: None,
            memory_mib: None,
            vms: Vec::new(),
        });
        match rest {
            "alive" => {
                row.lease = kv.lease;
                if row.state == "down" {
                    row.state = "ready".into();
                }
            }
            "status" => {
                if let Ok(r) = serde_json::from_slice::<HostReport>(&kv.value) {
                    row.cpus = Some(r.inventory.cpus);
                    row.memory_mib = Some(r.inventory.memory_mib);
                    row.vms = r.vms;
                    if r.fenced {
                        row.state = "fenced".into();
                    }
                }
            }
            "spec"
                if crate::spec::HostSpec::parse(Some(&kv.value))
                    .is_ok_and(|s| s.rejoin.is_some()) =>
            {
                rejoining.push(host.to_string());
            }
            _ => {}
        }
    }
    // A fenced report from a host whose lease is gone is just down.
    for row in rows.values_mut() {
        if row.lease.is_none() {
            row.state = "down".into();
        } else if rejoining.contains(&row.host) {
            row.state = "rejoining".into();
        }
    }
    Ok((rows.into_values().collect(), listing.revision))
}

pub async fn vms<S: Store>(s: &S) -> Result<(Vec<VmRow>, i64), StoreError> {
    let listing = s.list(keys::VMS).await?;
    let mut rows: BTreeMap<String, VmRow> = BTreeMap::new();
    for kv in &listing.kvs {
        let Some((vm, what)) = keys::split_vm_key(&kv.key) else {
            continue;
        };
        let row = rows.entry(vm.to_string()).or_insert_with(|| VmRow {
            vm: vm.to_string(),
            host: None,
            epoch: None,
            vcpus: None,
            memory_mib: None,
            problem: None,
            checkpoint: None,
            checkpoint_age_s: None,
            checkpoint_paused_ms: None,
        });
        match what {
            "token" => match serde_json::from_slice::<RunToken>(&kv.value) {
                Ok(t) => {
                    row.host = Some(t.host);
                    row.epoch = Some(t.epoch);
                }
                Err(e) => row.problem = Some(format!("invalid run token: {e}")),
            },
            "spec" => match VmSpec::parse(&kv.value) {
                Ok(spec) => {
                    row.vcpus = Some(spec.vcpus);
                    row.memory_mib = Some(spec.memory_mib);
                }
                Err(e) => row.problem = Some(e),
            },
            "observed" => {
                if let Ok(o) = serde_json::from_slice::<crate::controller::Observed>(&kv.value) {
                    row.checkpoint = o.checkpoint;
                    row.checkpoint_age_s = o
                        .taken_at_ms
                        .map(|t| crate::agent::unix_ms().saturating_sub(t) as f64 / 1000.0);
                    row.checkpoint_paused_ms = o.paused_ms;
                }
            }
            _ => {}
        }
    }
    Ok((rows.into_values().collect(), listing.revision))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtoken::{self, Origin};
    use crate::store::Txn;
    use std::time::Duration;

    #[tokio::test]
    async fn nodes_and_vms_as_the_store_holds_them() {
        let (s, dir) = crate::testing::fresh_redb("view");
        let lease = s.grant(Duration::from_secs(30)).await.unwrap();
        let report = br#"{"inventory":{"cpus":8,"memory_mib":16384,"numa_nodes":1},"vms":["a"],"fenced":false}"#;
        s.commit(
            Txn::new()
                .put_leased(keys::host_alive("h1"), "{}", lease)
                .put(keys::host_status("h1"), &report[..])
                .put(keys::host_status("h2"), &report[..])
                .put(keys::vm_spec("a"), &br#"{"vcpus":2,"memory_mib":256}"#[..])
                .put(
                    keys::vm_spec("bad"),
                    &br#"{"vcpus":0,"memory_mib":256}"#[..],
                ),
        )
        .await
        .unwrap();
        runtoken::place(&s, "a", "h1", Origin::Boot).await.unwrap();
        let (nodes, _) = nodes(&s).await.unwrap();
        let states: Vec<(&str, &str)> = nodes
            .iter()
            .map(|n| (n.host.as_str(), n.state.as_str()))
            .collect();
        assert_eq!(states, [("h1", "ready"), ("h2", "down")]);
        assert_eq!((nodes[0].cpus, nodes[0].lease), (Some(8), Some(lease)));
        let (vms, _) = vms(&s).await.unwrap();
        assert_eq!(vms[0].host.as_deref(), Some("h1"));
        assert_eq!((vms[0].epoch, vms[0].vcpus), (Some(1), Some(2)));
        assert!(
            vms[1].problem.as_deref().unwrap().contains("vcpus 0"),
            "{vms:?}"
        );
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
