//! A VM's network interfaces in its configuration, and the `--net` argument that names
//! one: `tap=NAME[,netns=NS][,mac=02:..][,rate=BYTES/s][,pps=PACKETS/s]` or
//! `netns=NS,tap=NAME,...`. Checked here so that the CLI and the VMM refuse the same
//! things with the same words, before a VM starts.
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One virtio-net NIC backed by a TAP interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP interface (created if it does not exist; up to 15 characters).
    pub tap: String,
    /// The network namespace (a name under /run/netns) that holds the TAP; default: the
    /// VMM's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The guest's MAC address, e.g. 02:00:00:00:00:01; default: derived from the TAP's
    /// name (locally administered, stable across restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Limit of each direction in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_bytes: Option<u64>,
    /// Limit of each direction in packets per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_packets: Option<u64>,
}

const IFNAMSIZ: usize = 16;

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Parses `02:00:00:00:00:01`; a multicast address is refused.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("mac '{s}' is not six hex bytes separated by ':'"));
    }
    for (m, p) in mac.iter_mut().zip(&parts) {
        *m = match u8::from_str_radix(p, 16) {
            Ok(v) if p.len() == 2 => v,
            _ => return Err(format!("mac '{s}' is not six hex bytes separated by ':'")),
        };
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "mac '{s}' is a multicast address; a NIC needs a unicast one"
        ));
    }
    Ok(mac)
}

impl NetConfig {
    /// Parses a `--net` argument.
    pub fn parse(arg: &str) -> Result<NetConfig, String> {
        let mut c = NetConfig {
            tap: String::new(),
            netns: None,
            mac: None,
            rate_bytes: None,
            rate_packets: None,
        };
        for kv in arg.split(',') {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(format!("--net '{arg}': '{kv}' is not KEY=VALUE"));
            };
            let number = |v: &str| {
                v.parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("--net '{arg}': {k} '{v}' is not a positive number"))
            };
            match k {
                "tap" => c.tap = v.into(),
                "netns" => c.netns = Some(v.into()),
                "mac" => c.mac = Some(v.into()),
                "rate" => c.rate_bytes = Some(number(v)?),
                "pps" => c.rate_packets = Some(number(v)?),
                _ => {
                    return Err(format!(
                        "--net '{arg}': unknown key '{k}' (known: tap, netns, mac, rate, pps)"
                    ))
                }
            }
        }
        c.validate().map_err(|e| format!("--net '{arg}': {e}"))?;
        Ok(c)
    }

    /// Checks names, MAC and limits.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_name(&self.tap) || self.tap.len() >= IFNAMSIZ {
            return Err(format!(
                "tap '{}' is not an interface name (1-15 characters of a-z, 0-9, '-', '_', '.')",
                self.tap
            ));
        }
        if let Some(ns) = &self.netns {
            if !valid_name(ns) || ns.starts_with('.') {
                return Err(format!("netns '{ns}' is not a namespace name"));
            }
        }
        if let Some(m) = &self.mac {
            parse_mac(m)?;
        }
        if self.rate_bytes == Some(0) || self.rate_packets == Some(0) {
            return Err("a rate limit of 0 would stop the NIC; leave it out for no limit".into());
        }
        Ok(())
    }

    /// The MAC address: the configured one, or one derived from the TAP's name.
    pub fn mac_address(&self) -> Result<[u8; 6], String> {
        match &self.mac {
            Some(m) => parse_mac(m),
            None => {
                // FNV-1a of the name: stable, and distinct for distinct names in practice.
                let h = self.tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                });
                let b = h.to_le_bytes();
                Ok([0x02, b[0], b[1], b[2], b[3], b[4]])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_net_argument_parses_or_says_what_is_wrong() {
        let c = NetConfig::parse("tap=rt0,netns=ns1,mac=02:00:00:00:00:05,rate=1000000,pps=500")
            .unwrap();
        assert_eq!(c.tap, "rt0");
        assert_eq!(c.netns.as_deref(), Some("ns1"));
        assert_eq!(c.mac_address().unwrap(), [2, 0, 0, 0, 0, 5]);
        assert_eq!((c.rate_bytes, c.rate_packets), (Some(1_000_000), Some(500)));
        let bad = |a: &str| NetConfig::parse(a).unwrap_err();
        assert_eq!(bad("tap"), "--net 'tap': 'tap' is not KEY=VALUE");
        assert!(bad("netns=x").contains("tap '' is not an interface name"));
        assert!(bad("tap=a-very-long-name0").contains("is not an interface name"));
        assert!(bad("tap=t0,mac=01:00:00:00:00:01").contains("multicast"));
        assert!(bad("tap=t0,mac=02:00:00:00:00").contains("six hex bytes"));
        assert!(bad("tap=t0,rate=0").contains("rate '0' is not a positive number"));
        assert!(bad("tap=t0,speed=1").contains("unknown key 'speed'"));
        assert!(bad("tap=t0,netns=../x").contains("netns '../x'"));
        assert!(bad("tap=t/0").contains("tap 't/0'"));
    }

    #[test]
    fn a_derived_mac_is_unicast_local_and_stable() {
        let c = NetConfig::parse("tap=rt0").unwrap();
        let m = c.mac_address().unwrap();
        assert_eq!(m[0], 2);
        assert_eq!(
            m,
            NetConfig::parse("tap=rt0").unwrap().mac_address().unwrap()
        );
        assert_ne!(
            m,
            NetConfig::parse("tap=rt1").unwrap().mac_address().unwrap()
        );
    }
}
