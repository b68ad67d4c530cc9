//! What a cluster VM is (the value of `/ray/vms/<vm>/spec`, written by the operator,
//! read by the controller to place it and by the agent to start it), what a host is for
//! (`/ray/hosts/<host>/spec`), and the resource pools with their priority tiers.
use ray_scheduler::{HostRole, Tier};
use serde::{Deserialize, Serialize};

/// The resource pools: one per priority tier. A VM names its pool; a pool's tier decides
/// who may preempt whom (higher tiers evict lower ones when nothing else fits).
pub const POOLS: [(&str, Tier); 4] = [
    ("best-effort", Tier::BestEffort),
    ("standard", Tier::Standard),
    ("high", Tier::High),
    ("critical", Tier::Critical),
];

/// The index of a pool in [`POOLS`], or why the name is not one.
pub fn pool_index(name: &str) -> Result<usize, String> {
    POOLS.iter().position(|(n, _)| *n == name).ok_or_else(|| {
        let names: Vec<&str> = POOLS.iter().map(|(n, _)| *n).collect();
        format!(
            "pool '{name}' does not exist: use one of {}",
            names.join(", ")
        )
    })
}

/// What a host is for, set by the operator: the value of `/ray/hosts/<host>/spec`. A host
/// without one is a Worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    #[serde(default = "worker")]
    pub role: HostRole,
    /// A cordoned host keeps its VMs but gets no new ones.
    #[serde(default)]
    pub cordon: bool,
    /// A draining host gets no new VMs and the controller live-migrates its own away
    /// (`ray node drain`); with none left it is Drained (Offline: maintenance).
    #[serde(default)]
    pub drain: bool,
    /// The host's maintenance ended (`ray node uncordon` of a Drained host): it is
    /// Rejoining until the controller checked it (fresh lease, inventory re-reported by its
    /// agent for this request, no stale VMM), then Ready. The value tells requests apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejoin: Option<u64>,
}

fn worker() -> HostRole {
    HostRole::Worker
}

impl Default for HostSpec {
    fn default() -> Self {
        HostSpec {
            role: HostRole::Worker,
            cordon: false,
            drain: false,
            rejoin: None,
        }
    }
}

impl HostSpec {
    /// Parses a host spec; an absent one is the default (a Worker, not cordoned).
    pub fn parse(bytes: Option<&[u8]>) -> Result<HostSpec, String> {
        match bytes {
            None => Ok(HostSpec::default()),
            Some(b) => {
                serde_json::from_slice(b).map_err(|e| format!("the host spec is not valid: {e}"))
            }
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Most vCPUs a cluster VM may ask for (the VMM's own limit).
pub const MAX_VCPUS: u8 = 254;

/// A cluster VM's specification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Kernel to boot; rayvisor's own guest when absent.
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Resource pool (gives the priority tier).
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Anti-affinity group: members never share a host.
    #[serde(default)]
    pub group: Option<String>,
    /// HA opt-in: restarted elsewhere after its host fails, higher priorities first.
    #[serde(default)]
    pub restart_priority: Option<u8>,
}

fn default_pool() -> String {
    "standard".into()
}

impl VmSpec {
    /// Parses and checks a spec, saying what is wrong with which value.
    pub fn parse(bytes: &[u8]) -> Result<VmSpec, String> {
        if bytes.is_empty() {
            return Err("the VM has no spec".into());
        }
        let spec: VmSpec =
            serde_json::from_slice(bytes).map_err(|e| format!("the VM spec is not valid: {e}"))?;
        spec.check()?;
        Ok(spec)
    }

    pub fn check(&self) -> Result<(), String> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(format!(
                "vcpus {} is out of range: use 1 to {MAX_VCPUS}",
                self.vcpus
            ));
        }
        if self.memory_mib < 32 {
            return Err(format!(
                "memory_mib {} is too small: use at least 32",
                self.memory_mib
            ));
        }
        if let Some(g) = &self.group {
            crate::keys::check_name("group", g)?;
        }
        pool_index(&self.pool).map(drop)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Strings and numbers only: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_bad_ones_say_why() {
        let s = VmSpec::parse(br#"{"vcpus":2,"memory_mib":256}"#).unwrap();
        assert_eq!((s.pool.as_str(), s.group.as_ref()), ("standard", None));
        assert_eq!(VmSpec::parse(&s.to_json()).unwrap(), s);
        for (bad, why) in [
            (&b""[..], "no spec"),
            (
                br#"{"vcpus":0,"memory_mib":256}"#,
                "vcpus 0 is out of range",
            ),
            (
                br#"{"vcpus":1,"memory_mib":8}"#,
                "memory_mib 8 is too small",
            ),
            (
                br#"{"vcpus":1,"memory_mib":64,"group":"a/b"}"#,
                "group name 'a/b'",
            ),
            (
                br#"{"vcpus":1,"memory_mib":64,"pool":"gold"}"#,
                "pool 'gold' does not exist: use one of best-effort, standard, high, critical",
            ),
            (
                br#"{"vcpus":1,"memory_mib":64,"colour":1}"#,
                "unknown field `colour`",
            ),
        ] {
            let e = VmSpec::parse(bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
