//! What a cluster VM is: the value of `/ray/vms/<vm>/spec`, written by the operator,
//! read by the controller (to place it) and by the agent (to start it).
use serde::{Deserialize, Serialize};

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
        crate::keys::check_name("pool", &self.pool)
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
                br#"{"vcpus":1,"memory_mib":64,"colour":1}"#,
                "unknown field `colour`",
            ),
        ] {
            let e = VmSpec::parse(bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
