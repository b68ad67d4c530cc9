//! `--numa` on the command line: one guest NUMA node per option,
//! `node=0,cpus=0-1,memory=512M,host-node=0,policy=bind`. Lists (`cpus`, `host-node`) use
//! the kernel's list format, and a bare item after a list continues it (`cpus=0,2` is
//! vCPUs 0 and 2).
use ray_api::vmm::{NumaMigrationConfig, NumaMigrationMode, NumaNodeConfig, NumaPolicy};
use ray_numa::parse_list;

/// Parses one `--numa` value.
pub fn parse_numa_node(text: &str) -> Result<NumaNodeConfig, String> {
    let mut node = None;
    let mut memory = None;
    let mut cpus: Option<String> = None;
    let mut hosts: Option<String> = None;
    let mut policy = NumaPolicy::default();
    let mut last_list: Option<&str> = None;
    for item in text.split(',') {
        let Some((key, value)) = item.split_once('=') else {
            // A bare item continues the list before it (`cpus=0,2`).
            let list = match last_list {
                Some("cpus") => cpus.as_mut(),
                Some(_) => hosts.as_mut(),
                None => None,
            };
            match list {
                Some(l) if !item.is_empty() => {
                    l.push(',');
                    l.push_str(item);
                    continue;
                }
                _ => return Err(format!("'{item}' in --numa '{text}' is not key=value")),
            }
        };
        last_list = None;
        match key {
            "node" => {
                node = Some(value.parse::<u32>().map_err(|_| {
                    format!("node '{value}' in --numa '{text}' is not a node number")
                })?)
            }
            "cpus" => {
                cpus = Some(value.to_string());
                last_list = Some("cpus");
            }
            "memory" | "mem" => {
                memory = Some(crate::sizes::parse_size(value)?);
            }
            "host-node" | "host-nodes" => {
                hosts = Some(value.to_string());
                last_list = Some("host-node");
            }
            "policy" => {
                policy = match value {
                    "bind" => NumaPolicy::Bind,
                    "preferred" => NumaPolicy::Preferred,
                    "interleave" => NumaPolicy::Interleave,
                    _ => {
                        return Err(format!(
                        "policy '{value}' in --numa '{text}' is not bind, preferred or interleave"
                    ))
                    }
                }
            }
            _ => {
                return Err(format!(
                    "'{key}' in --numa '{text}' is not one of node, cpus, memory, host-node, policy"
                ))
            }
        }
    }
    let node = node.ok_or_else(|| format!("--numa '{text}' has no node=N"))?;
    let memory_bytes = memory.ok_or_else(|| format!("--numa '{text}' has no memory=SIZE"))?;
    let cpus = match cpus {
        Some(c) => parse_list("cpus", &c)
            .map_err(|e| format!("--numa '{text}': {e}"))?
            .into_iter()
            .map(|c| {
                u8::try_from(c).map_err(|_| format!("--numa '{text}': vCPU {c} is beyond 255"))
            })
            .collect::<Result<Vec<u8>, String>>()?,
        None => Vec::new(),
    };
    let host_nodes = match hosts {
        Some(h) => parse_list("host-node", &h).map_err(|e| format!("--numa '{text}': {e}"))?,
        None => Vec::new(),
    };
    Ok(NumaNodeConfig {
        node,
        cpus,
        memory_bytes,
        host_nodes,
        policy,
    })
}

/// Parses `--numa-migrate MODE[,window=DURATION][,rate=MiB/s]`: MODE is `off`, `dry-run`
/// or `on`; the window defaults to 5 s and the rate limit to 256 MiB/s.
pub fn parse_numa_migrate(text: &str) -> Result<NumaMigrationConfig, String> {
    let mut items = text.split(',');
    let mode = match items.next().unwrap_or_default() {
        "off" => NumaMigrationMode::Off,
        "dry-run" => NumaMigrationMode::DryRun,
        "on" => NumaMigrationMode::On,
        other => {
            return Err(format!(
                "'{other}' in --numa-migrate '{text}' is not off, dry-run or on"
            ))
        }
    };
    let mut cfg = NumaMigrationConfig {
        mode,
        ..NumaMigrationConfig::default()
    };
    for item in items {
        match item.split_once('=') {
            Some(("window", v)) => {
                let d = crate::sizes::parse_duration(v)
                    .map_err(|e| format!("window in --numa-migrate '{text}': {e}"))?;
                cfg.window_ms = d.as_millis() as u64;
            }
            Some(("rate", v)) => {
                cfg.rate_limit_mib_s = v
                    .parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r > 0.0)
                    .ok_or_else(|| {
                        format!("rate '{v}' in --numa-migrate '{text}' is not a positive MiB/s")
                    })?;
            }
            _ => {
                return Err(format!(
                    "'{item}' in --numa-migrate '{text}' is not window=DURATION or rate=MiB/s"
                ))
            }
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_short_forms() {
        let n =
            parse_numa_node("node=1,cpus=0,2-3,memory=512M,host-node=0,policy=preferred").unwrap();
        assert_eq!(n.node, 1);
        assert_eq!(n.cpus, vec![0, 2, 3]);
        assert_eq!(n.memory_bytes, 512 << 20);
        assert_eq!(n.host_nodes, vec![0]);
        assert_eq!(n.policy, NumaPolicy::Preferred);
        let m = parse_numa_node("node=0,memory=1G").unwrap();
        assert!(m.cpus.is_empty() && m.host_nodes.is_empty());
        assert_eq!(m.policy, NumaPolicy::Bind);
        let i = parse_numa_node("node=0,memory=1G,host-node=0-1,policy=interleave").unwrap();
        assert_eq!(i.host_nodes, vec![0, 1]);
    }

    #[test]
    fn mistakes_are_named() {
        let e = |t: &str| parse_numa_node(t).unwrap_err();
        assert_eq!(e("node=0"), "--numa 'node=0' has no memory=SIZE");
        assert_eq!(e("memory=1G"), "--numa 'memory=1G' has no node=N");
        assert!(e("node=0,memory=1G,policy=fast").contains("policy 'fast'"));
        assert!(e("node=0,memory=1G,color=red").contains("'color'"));
        assert!(e("node=x,memory=1G").contains("node 'x'"));
        assert!(e("node=0,memory=lots").contains("'lots' is not a size"));
        assert!(e("node=0,memory=1G,cpus=0-300").contains("beyond 255"));
        assert!(e("node=0,7,memory=1G").contains("'7'"));
    }

    #[test]
    fn numa_migrate_takes_a_mode_a_window_and_a_rate() {
        let c = parse_numa_migrate("dry-run,window=500ms,rate=64").unwrap();
        assert_eq!(c.mode, NumaMigrationMode::DryRun);
        assert_eq!((c.window_ms, c.rate_limit_mib_s), (500, 64.0));
        assert_eq!(parse_numa_migrate("on").unwrap().window_ms, 5000);
        assert!(parse_numa_migrate("sometimes")
            .unwrap_err()
            .contains("not off, dry-run or on"));
        assert!(parse_numa_migrate("on,rate=-1")
            .unwrap_err()
            .contains("not a positive MiB/s"));
        assert!(parse_numa_migrate("on,speed=1")
            .unwrap_err()
            .contains("'speed=1'"));
    }
}
