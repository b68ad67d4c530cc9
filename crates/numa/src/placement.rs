//! Automatic placement of a VM's guest NUMA nodes on host nodes: best fit by free memory,
//! then by CPU load. A pure function of the host's state, so it is tested on captured
//! topologies and re-run wherever the VM lands (a restore, a migration target): the
//! topology of the host the VM runs on decides.
use crate::topology::Topology;

/// What one guest node needs from a host node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub memory_bytes: u64,
    /// Whether it has vCPUs (then its host node must have CPUs).
    pub has_cpus: bool,
}

/// Why a guest node found no host node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no host node has {need} bytes free for guest node {node}{cpus}: {why}", cpus = if *has_cpus { " and CPUs for its vCPUs" } else { "" })]
pub struct NoFit {
    pub node: usize,
    pub need: u64,
    pub has_cpus: bool,
    /// Each host node's free memory, as `node N: B bytes free`.
    pub why: String,
}

/// Chooses a host node for each guest node in `needs` (by index). Guest nodes are placed
/// largest first; each goes to the host node that fits it with the least free memory left
/// over (best fit, keeping large holes for large nodes), ties going to the node whose CPUs
/// are less busy (`cpu_load[node id]`, 0.0-1.0 per CPU; missing: 0). Memory placed
/// earlier counts against a node's free memory. Memory-only guest nodes may go to
/// CPU-less host nodes; guest nodes with vCPUs need host CPUs.
pub fn place(topology: &Topology, cpu_load: &[f64], needs: &[Need]) -> Result<Vec<u32>, NoFit> {
    let mut free: Vec<(u32, u64)> = topology
        .nodes
        .iter()
        .map(|n| (n.id, n.memory_free))
        .collect();
    let mut order: Vec<usize> = (0..needs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(needs[i].memory_bytes));
    let mut out = vec![0u32; needs.len()];
    for i in order {
        let need = needs[i];
        let load = |id: u32| cpu_load.get(id as usize).copied().unwrap_or(0.0);
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, &(id, f))| {
                f >= need.memory_bytes
                    && (!need.has_cpus || topology.node(id).is_some_and(|n| !n.cpus.is_empty()))
            })
            .min_by(|(_, a), (_, b)| {
                (a.1 - need.memory_bytes)
                    .cmp(&(b.1 - need.memory_bytes))
                    .then(load(a.0).total_cmp(&load(b.0)))
            })
            .map(|(at, _)| at);
        let Some(at) = best else {
            return Err(NoFit {
                node: i,
                need: need.memory_bytes,
                has_cpus: need.has_cpus,
                why: free
                    .iter()
                    .map(|(id, f)| format!("node {id}: {f} bytes free"))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        free[at].1 -= need.memory_bytes;
        out[i] = free[at].0;
    }
    Ok(out)
}

/// Busy share (0.0-1.0) of each node's CPUs over `window`, by node id, from two reads of
/// /proc/stat.
pub fn cpu_load(topology: &Topology, window: std::time::Duration) -> Vec<f64> {
    fn sample() -> Vec<(u32, u64, u64)> {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let cpu: u32 = w.next()?.strip_prefix("cpu")?.parse().ok()?;
                let v: Vec<u64> = w.filter_map(|x| x.parse().ok()).collect();
                let total: u64 = v.iter().sum();
                // idle + iowait are not busy.
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                Some((cpu, total, idle))
            })
            .collect()
    }
    let a = sample();
    std::thread::sleep(window);
    let b = sample();
    let top = topology.nodes.iter().map(|n| n.id).max().unwrap_or(0) as usize;
    let mut load = vec![0.0; top + 1];
    for n in &topology.nodes {
        let (mut busy, mut all) = (0u64, 0u64);
        for (cpu, t1, i1) in &b {
            if let (true, Some((_, t0, i0))) =
                (n.cpus.contains(cpu), a.iter().find(|s| s.0 == *cpu))
            {
                all += t1.saturating_sub(*t0);
                busy += t1
                    .saturating_sub(*t0)
                    .saturating_sub(i1.saturating_sub(*i0));
            }
        }
        load[n.id as usize] = if all == 0 {
            0.0
        } else {
            busy as f64 / all as f64
        };
    }
    load
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;

    fn three(tag: &str) -> Topology {
        Topology::read(&fixture::unpack(fixture::THREE_NODES_ONE_CPULESS, tag).unwrap()).unwrap()
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn best_fit_by_memory_then_load() {
        // Free: node 0 977 MiB, node 1 905 MiB, node 2 943 MiB (memory only).
        let t = three("place-best");
        let free: Vec<u64> = t.nodes.iter().map(|n| n.memory_free >> 20).collect();
        assert_eq!(free, vec![977, 904, 943]);
        let vcpus = Need {
            memory_bytes: 512 * MIB,
            has_cpus: true,
        };
        // Node 1 leaves less over: best fit.
        assert_eq!(place(&t, &[], &[vcpus]), Ok(vec![1]));
        // 920 MiB fits nodes 0 and 2; a memory-only guest node fits node 2 tightest, one
        // with vCPUs needs node 0.
        let mem = Need {
            memory_bytes: 920 * MIB,
            has_cpus: false,
        };
        assert_eq!(place(&t, &[], &[mem]), Ok(vec![2]));
        let cpu = Need {
            memory_bytes: 920 * MIB,
            has_cpus: true,
        };
        assert_eq!(place(&t, &[], &[cpu]), Ok(vec![0]));
        // Two 512 MiB nodes cannot share node 1: the second goes to node 0.
        assert_eq!(place(&t, &[], &[vcpus, vcpus]), Ok(vec![1, 0]));
        // With equal leftovers, load breaks the tie.
        let mut even = t.clone();
        even.nodes[1].memory_free = even.nodes[0].memory_free;
        assert_eq!(place(&even, &[0.9, 0.1], &[vcpus]), Ok(vec![1]));
        assert_eq!(place(&even, &[0.1, 0.9], &[vcpus]), Ok(vec![0]));
    }

    #[test]
    fn what_does_not_fit_is_named() {
        let t = three("place-nofit");
        let huge = Need {
            memory_bytes: 4 << 30,
            has_cpus: true,
        };
        let err = place(&t, &[], &[huge]).unwrap_err();
        assert_eq!(err.node, 0);
        let msg = err.to_string();
        assert!(
            msg.starts_with("no host node has 4294967296 bytes free for guest node 0 and CPUs for its vCPUs: node 0: "),
            "{msg}"
        );
        assert!(msg.contains("node 2: 989478912 bytes free"), "{msg}");
        // Node 2 has room but no CPUs for a node with vCPUs once 0 and 1 are full.
        let big = Need {
            memory_bytes: 900 * MIB,
            has_cpus: true,
        };
        assert!(place(&t, &[], &[big, big, big]).is_err());
        let mem = Need {
            memory_bytes: 900 * MIB,
            has_cpus: false,
        };
        assert_eq!(place(&t, &[], &[big, big, mem]), Ok(vec![1, 0, 2]));
    }

    #[test]
    fn this_hosts_load_is_a_share() {
        let t = Topology::host().unwrap();
        let load = cpu_load(&t, std::time::Duration::from_millis(20));
        for n in &t.nodes {
            let l = load[n.id as usize];
            assert!((0.0..=1.0).contains(&l), "{l}");
        }
    }
}
