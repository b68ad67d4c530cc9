//! Guest NUMA: a VM's `numa` configuration checked against the host's topology
//! ([`plan`]), its memory laid out node by node ([`GuestNuma::regions`]), bound to host
//! nodes with `mbind` ([`bind_memory`]) and its vCPUs pinned to the host nodes' CPUs
//! ([`GuestNuma::vcpu_cpus`]). The guest learns the nodes from the SRAT and SLIT
//! ([`crate::boot::acpi`]).
//!
//! Each guest node's memory is its own memfd, so a node's pages can be placed, measured
//! and moved without touching another's. Guest node *n* covers guest RAM from the end of
//! node *n - 1*, in guest-physical order around the MMIO hole.
use ray_api::vmm::{NumaNodeConfig, NumaPolicy, VmConfig};
use ray_numa::{format_list, sys, Topology};
use vm_memory::GuestAddress;

use crate::boot::layout;
use crate::memory::MemoryManager;

/// Guest node memory comes in whole 2 MiB pages, so a node never splits a huge page.
pub const NODE_ALIGN: u64 = 2 << 20;
/// Most guest nodes: the SRAT and SLIT must fit the ACPI area below 1 MiB.
pub const MAX_GUEST_NODES: usize = 64;
/// The SLIT's distance between two guest nodes whose host distance is unknown or local
/// (ACPI wants more than 10 between distinct nodes).
pub const REMOTE_DISTANCE: u8 = 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumaError {
    #[error("guest NUMA nodes must be numbered 0 to {last} once each, got nodes {got}")]
    NodeIds { last: usize, got: String },
    #[error("at most {MAX_GUEST_NODES} guest NUMA nodes are possible, got {0}")]
    TooManyNodes(usize),
    #[error("guest node {node}: memory of {bytes} bytes is not a positive multiple of 2 MiB")]
    NodeMemory { node: u32, bytes: u64 },
    #[error("the guest nodes' memory adds up to {sum} bytes, but the VM has {total}")]
    MemorySum { sum: u64, total: u64 },
    #[error("guest node {node}: vCPU {cpu} does not exist (the VM has vCPUs 0-{last})")]
    CpuRange { node: u32, cpu: u8, last: u8 },
    #[error("vCPU {cpu} is in guest nodes {first} and {second}; a vCPU belongs to one node")]
    CpuTwice { cpu: u8, first: u32, second: u32 },
    #[error("vCPUs {0} are in no guest node; every vCPU needs one")]
    CpusUncovered(String),
    #[error(
        "guest node {node}: host node {host_node} does not exist (this host's nodes: {online})"
    )]
    HostNodeMissing {
        node: u32,
        host_node: u32,
        online: String,
    },
    #[error("guest node {node}: host nodes {host_nodes} have no CPUs to run its vCPUs {cpus}")]
    HostNodesNoCpus {
        node: u32,
        host_nodes: String,
        cpus: String,
    },
    #[error(
        "guest node {node}: {need} bytes bound to host nodes {host_nodes} do not fit: they have \
         {free} bytes free (policy `preferred` allows the overflow elsewhere)"
    )]
    DoesNotFit {
        node: u32,
        host_nodes: String,
        need: u64,
        free: u64,
    },
    #[error("guest node {node}: policy preferred takes one host node, got {host_nodes}")]
    PreferredMany { node: u32, host_nodes: String },
    #[error("cannot place the guest nodes automatically: {0}")]
    NoPlacement(String),
}

/// One guest node, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNode {
    pub id: u32,
    pub cpus: Vec<u8>,
    pub memory_bytes: u64,
    /// Host nodes of its memory; empty: unbound.
    pub host_nodes: Vec<u32>,
    pub policy: NumaPolicy,
    /// Host CPUs its vCPUs run on (the host nodes' CPUs); empty: unpinned.
    pub host_cpus: Vec<u32>,
}

/// A VM's guest NUMA nodes, checked against the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNuma {
    pub nodes: Vec<GuestNode>,
    /// Distances between guest nodes, row by row (the SLIT).
    pub distances: Vec<Vec<u8>>,
}

/// Checks `config.numa` against the VM and the host `topology` before anything is
/// allocated, and places guest nodes given no host node ([`place_unbound`], by free
/// memory and `cpu_load`, each node's CPU busy share by node id). `None`: the VM has no
/// NUMA configuration (one node, unbound).
pub fn plan(
    config: &VmConfig,
    topology: &Topology,
    cpu_load: &[f64],
) -> Result<Option<GuestNuma>, NumaError> {
    if config.numa.is_empty() {
        return Ok(None);
    }
    let placed = place_unbound(config, topology, cpu_load)?;
    let mut cfg: Vec<&NumaNodeConfig> = placed.iter().collect();
    cfg.sort_by_key(|n| n.node);
    if cfg.len() > MAX_GUEST_NODES {
        return Err(NumaError::TooManyNodes(cfg.len()));
    }
    if cfg.iter().enumerate().any(|(i, n)| n.node as usize != i) {
        return Err(NumaError::NodeIds {
            last: cfg.len() - 1,
            got: cfg
                .iter()
                .map(|n| n.node.to_string())
                .collect::<Vec<_>>()
                .join(","),
        });
    }
    let mut sum = 0u64;
    let mut owner: Vec<Option<u32>> = vec![None; usize::from(config.vcpus)];
    let online = format_list(&topology.node_ids());
    let mut nodes = Vec::with_capacity(cfg.len());
    for n in &cfg {
        if n.memory_bytes == 0 || !n.memory_bytes.is_multiple_of(NODE_ALIGN) {
            return Err(NumaError::NodeMemory {
                node: n.node,
                bytes: n.memory_bytes,
            });
        }
        sum = sum.saturating_add(n.memory_bytes);
        for &cpu in &n.cpus {
            let Some(slot) = owner.get_mut(usize::from(cpu)) else {
                return Err(NumaError::CpuRange {
                    node: n.node,
                    cpu,
                    last: config.vcpus.saturating_sub(1),
                });
            };
            if let Some(first) = slot.replace(n.node) {
                return Err(NumaError::CpuTwice {
                    cpu,
                    first,
                    second: n.node,
                });
            }
        }
        nodes.push(host_side(n, topology, &online)?);
    }
    if sum != config.memory_bytes {
        return Err(NumaError::MemorySum {
            sum,
            total: config.memory_bytes,
        });
    }
    let uncovered: Vec<u32> = (0..owner.len() as u32)
        .filter(|&c| owner[c as usize].is_none())
        .collect();
    if !uncovered.is_empty() {
        return Err(NumaError::CpusUncovered(format_list(&uncovered)));
    }
    let distances = nodes
        .iter()
        .map(|a| nodes.iter().map(|b| distance(topology, a, b)).collect())
        .collect();
    Ok(Some(GuestNuma { nodes, distances }))
}

/// `config.numa` with a host node chosen for every guest node that has none: best fit by
/// free memory, then CPU load ([`ray_numa::placement::place`]), after the memory of the
/// nodes bound explicitly is taken from their host nodes' free memory.
pub fn place_unbound(
    config: &VmConfig,
    topology: &Topology,
    cpu_load: &[f64],
) -> Result<Vec<NumaNodeConfig>, NumaError> {
    let mut nodes = config.numa.clone();
    let unbound: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].host_nodes.is_empty())
        .collect();
    if unbound.is_empty() {
        return Ok(nodes);
    }
    let mut host = topology.clone();
    for n in nodes.iter().filter(|n| !n.host_nodes.is_empty()) {
        let share = n.memory_bytes / n.host_nodes.len() as u64;
        for h in host
            .nodes
            .iter_mut()
            .filter(|h| n.host_nodes.contains(&h.id))
        {
            h.memory_free = h.memory_free.saturating_sub(share);
        }
    }
    let needs: Vec<ray_numa::placement::Need> = unbound
        .iter()
        .map(|&i| ray_numa::placement::Need {
            memory_bytes: nodes[i].memory_bytes,
            has_cpus: !nodes[i].cpus.is_empty(),
        })
        .collect();
    let chosen = ray_numa::placement::place(&host, cpu_load, &needs).map_err(|e| {
        let mut e = e;
        e.node = nodes[unbound[e.node]].node as usize;
        NumaError::NoPlacement(e.to_string())
    })?;
    for (&i, h) in unbound.iter().zip(chosen) {
        nodes[i].host_nodes = vec![h];
    }
    Ok(nodes)
}

/// The host half of one guest node: its host nodes exist, have CPUs for its vCPUs, and
/// (bound) have room for its memory.
fn host_side(
    n: &NumaNodeConfig,
    topology: &Topology,
    online: &str,
) -> Result<GuestNode, NumaError> {
    let mut host_cpus = Vec::new();
    let mut free = 0u64;
    for &h in &n.host_nodes {
        let Some(host) = topology.node(h) else {
            return Err(NumaError::HostNodeMissing {
                node: n.node,
                host_node: h,
                online: online.to_string(),
            });
        };
        host_cpus.extend_from_slice(&host.cpus);
        free = free.saturating_add(host.memory_free);
    }
    let host_list = format_list(&n.host_nodes);
    if n.policy == NumaPolicy::Preferred && n.host_nodes.len() > 1 {
        return Err(NumaError::PreferredMany {
            node: n.node,
            host_nodes: host_list,
        });
    }
    if !n.host_nodes.is_empty() && host_cpus.is_empty() && !n.cpus.is_empty() {
        let cpus: Vec<u32> = n.cpus.iter().map(|&c| u32::from(c)).collect();
        return Err(NumaError::HostNodesNoCpus {
            node: n.node,
            host_nodes: host_list,
            cpus: format_list(&cpus),
        });
    }
    if !n.host_nodes.is_empty() && n.policy != NumaPolicy::Preferred && n.memory_bytes > free {
        return Err(NumaError::DoesNotFit {
            node: n.node,
            host_nodes: host_list,
            need: n.memory_bytes,
            free,
        });
    }
    host_cpus.sort_unstable();
    Ok(GuestNode {
        id: n.node,
        cpus: n.cpus.clone(),
        memory_bytes: n.memory_bytes,
        host_nodes: n.host_nodes.clone(),
        policy: n.policy,
        host_cpus,
    })
}

/// The SLIT entry between guest nodes `a` and `b`: 10 for a node itself, else the host
/// distance between their (first) host nodes when that says remote, else
/// [`REMOTE_DISTANCE`].
fn distance(topology: &Topology, a: &GuestNode, b: &GuestNode) -> u8 {
    if a.id == b.id {
        return 10;
    }
    match (a.host_nodes.first(), b.host_nodes.first()) {
        (Some(&x), Some(&y)) => topology
            .distance(x, y)
            .filter(|&d| d > 10)
            .map_or(REMOTE_DISTANCE, |d| d.min(254) as u8),
        _ => REMOTE_DISTANCE,
    }
}

impl GuestNuma {
    /// Guest RAM as (guest-physical start, length, guest node), node by node: what
    /// [`MemoryManager::create_split`] takes (one memfd per node).
    pub fn regions(&self) -> Vec<(GuestAddress, usize, usize)> {
        node_regions(
            &self
                .nodes
                .iter()
                .map(|n| n.memory_bytes)
                .collect::<Vec<_>>(),
        )
    }

    /// The guest node holding guest-physical address `gpa`.
    pub fn node_of(&self, gpa: u64) -> Option<usize> {
        self.regions()
            .into_iter()
            .find(|r| gpa >= r.0 .0 && gpa - r.0 .0 < r.1 as u64)
            .map(|r| r.2)
    }

    /// The host CPUs each vCPU runs on (empty: unpinned), vCPU by vCPU.
    pub fn vcpu_cpus(&self, vcpus: u8) -> Vec<Vec<u32>> {
        (0..vcpus)
            .map(|v| {
                self.nodes
                    .iter()
                    .find(|n| n.cpus.contains(&v))
                    .map(|n| n.host_cpus.clone())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// Guest RAM for nodes of `node_bytes` each, as (guest-physical start, length, node):
/// nodes follow each other in guest RAM order, which skips the MMIO hole, so a node that
/// straddles the hole has two regions.
pub fn node_regions(node_bytes: &[u64]) -> Vec<(GuestAddress, usize, usize)> {
    let total: u64 = node_bytes.iter().sum();
    let mut out = Vec::new();
    let mut node_start = 0u64; // offset into guest RAM, holes left out
    for (node, &bytes) in node_bytes.iter().enumerate() {
        let node_end = node_start + bytes;
        let mut ram_offset = 0u64;
        for (gpa, len) in layout::ram_regions(total) {
            let (lo, hi) = (ram_offset, ram_offset + len as u64);
            let (s, e) = (node_start.max(lo), node_end.min(hi));
            if s < e {
                out.push((GuestAddress(gpa.0 + (s - lo)), (e - s) as usize, node));
            }
            ram_offset = hi;
        }
        node_start = node_end;
    }
    out
}

/// Guest RAM regions of `config`: one per node (two for a node across the MMIO hole), or
/// the plain layout without NUMA. The memory layout snapshots and migrations carry.
pub fn config_regions(config: &VmConfig) -> Vec<(GuestAddress, usize, usize)> {
    if config.numa.is_empty() {
        return node_regions(&[config.memory_bytes]);
    }
    let mut nodes: Vec<&NumaNodeConfig> = config.numa.iter().collect();
    nodes.sort_by_key(|n| n.node);
    node_regions(&nodes.iter().map(|n| n.memory_bytes).collect::<Vec<_>>())
}

/// Places a restored or migrated-in `machine` of `config` on this host's nodes: the
/// host the VM runs on decides. Guest nodes without a host node are placed afresh; a
/// binding this host cannot honour (a host node it lacks, memory that does not fit) is
/// replaced by an automatic placement. The guest keeps the nodes it booted with whatever
/// happens; if nothing fits, the VM runs unbound, with a warning in the VMM's log.
/// Returns where the nodes went (`None`: no NUMA, or unbound).
pub fn place_restored(machine: &crate::machine::Machine, config: &VmConfig) -> Option<GuestNuma> {
    if config.numa.is_empty() {
        return None;
    }
    let numa = crate::config::guest_numa(config).or_else(|e| {
        let mut auto = config.clone();
        auto.numa.iter_mut().for_each(|n| n.host_nodes.clear());
        tracing::info!("the VM's guest NUMA binding does not fit this host ({e}); placing it anew");
        crate::config::guest_numa(&auto)
    });
    let placed = match numa {
        Ok(Some(n)) => machine.place(&n).map(|()| n).map_err(|e| e.to_string()),
        Ok(None) => return None,
        Err(e) => Err(e.to_string()),
    };
    match placed {
        Ok(n) => {
            log_placement(&n);
            Some(n)
        }
        Err(e) => {
            tracing::warn!(
                "cannot place the VM's guest NUMA nodes on this host ({e}); it runs unbound"
            );
            None
        }
    }
}

/// One log line per guest node: where it runs.
pub fn log_placement(numa: &GuestNuma) {
    for n in &numa.nodes {
        tracing::info!(
            "guest node {}: {} bytes on host nodes {} ({}), vCPUs {:?} on host CPUs {}",
            n.id,
            n.memory_bytes,
            format_list(&n.host_nodes),
            n.policy.name(),
            n.cpus,
            format_list(&n.host_cpus)
        );
    }
}

/// Pages sampled per guest node for its locality.
pub const LOCALITY_SAMPLES: usize = 4096;

/// Each guest node's placement and the share of its present pages that are on its host
/// nodes (a `move_pages` sample of [`LOCALITY_SAMPLES`] pages per node).
pub fn status(memory: &MemoryManager, numa: &GuestNuma) -> Vec<ray_api::vmm::NumaNodeStatus> {
    numa.nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut seen = ray_numa::locality::Residency::default();
            let slots: Vec<(u64, u64)> = memory
                .slots()
                .filter(|s| numa.node_of(s.0) == Some(i))
                .map(|s| (s.1, s.2))
                .collect();
            let total: u64 = slots.iter().map(|s| s.1).sum::<u64>().max(1);
            for (host, len) in slots {
                let share = (LOCALITY_SAMPLES as u64 * len).div_ceil(total) as usize;
                let at = host as *mut u8;
                // SAFETY: [host, host + len) is guest memory `memory` keeps mapped;
                // move_pages only reports where its pages are.
                let sample = unsafe { ray_numa::locality::residency(at, len as usize, share) };
                if let Ok(r) = sample {
                    seen.merge(&r);
                }
            }
            let local = seen.on(&n.host_nodes);
            ray_api::vmm::NumaNodeStatus {
                node: n.id,
                cpus: n.cpus.clone(),
                memory_bytes: n.memory_bytes,
                host_nodes: n.host_nodes.clone(),
                policy: n.policy,
                host_cpus: n.host_cpus.clone(),
                sampled_pages: seen.sampled,
                present_pages: seen.present,
                local_pages: local,
                locality: (seen.present > 0 && !n.host_nodes.is_empty())
                    .then(|| local as f64 / seen.present as f64),
            }
        })
        .collect()
}

/// What `rings` attributed since boot, by vCPU and by guest node.
pub fn attribution(
    rings: &crate::vstate::dirty_ring::DirtyRings,
    numa: Option<&GuestNuma>,
) -> ray_api::vmm::AttributionInfo {
    rings.harvest();
    let vcpu_pages = rings.totals();
    let node_pages = match numa {
        Some(numa) => numa
            .nodes
            .iter()
            .map(|n| {
                n.cpus
                    .iter()
                    .filter_map(|&c| vcpu_pages.get(usize::from(c)))
                    .sum()
            })
            .collect(),
        None => vec![vcpu_pages.iter().sum()],
    };
    let stats = rings.stats();
    ray_api::vmm::AttributionInfo {
        vcpu_pages,
        node_pages,
        harvests: stats.harvests,
        harvest_ms: stats.busy.as_secs_f64() * 1e3,
    }
}

/// Binds each node's memory in `memory` to its host nodes (nothing for unbound nodes).
pub fn bind_memory(memory: &MemoryManager, numa: &GuestNuma) -> std::io::Result<()> {
    for (gpa, host, len) in memory.slots() {
        let Some(node) = numa.node_of(gpa).and_then(|i| numa.nodes.get(i)) else {
            continue;
        };
        if node.host_nodes.is_empty() {
            continue;
        }
        let mode = match node.policy {
            NumaPolicy::Bind => sys::Mode::Bind,
            NumaPolicy::Preferred => sys::Mode::Preferred,
            NumaPolicy::Interleave => sys::Mode::Interleave,
        };
        // SAFETY: [host, host + len) is a mapping of guest memory that `memory` keeps
        // alive; mbind changes where its pages live, never their contents.
        unsafe { sys::mbind(host as *mut u8, len as usize, mode, &node.host_nodes) }.map_err(
            |e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot bind guest node {}'s memory at {gpa:#x} to host nodes {}: {e}",
                        node.id,
                        format_list(&node.host_nodes)
                    ),
                )
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ray_numa::fixture;

    fn two_node_host(tag: &str) -> Topology {
        Topology::read(&fixture::unpack(fixture::TWO_NODES, tag).unwrap()).unwrap()
    }

    fn node(node: u32, cpus: &[u8], mib: u64, host: &[u32]) -> NumaNodeConfig {
        NumaNodeConfig {
            node,
            cpus: cpus.to_vec(),
            memory_bytes: mib << 20,
            host_nodes: host.to_vec(),
            policy: NumaPolicy::Bind,
        }
    }

    fn vm(vcpus: u8, numa: Vec<NumaNodeConfig>) -> VmConfig {
        VmConfig {
            kernel: String::new(),
            initrd: None,
            cmdline: String::new(),
            vcpus,
            memory_bytes: numa.iter().map(|n| n.memory_bytes).sum(),
            devices: Default::default(),
            numa,
            numa_attribution: Default::default(),
            numa_migration: Default::default(),
        }
    }

    #[test]
    fn two_guest_nodes_on_two_host_nodes() {
        let host = two_node_host("vmm-two");
        let cfg = vm(
            4,
            vec![node(1, &[2, 3], 256, &[1]), node(0, &[0, 1], 256, &[0])],
        );
        let p = plan(&cfg, &host, &[]).unwrap().unwrap();
        assert_eq!(p.nodes[0].host_cpus, vec![0, 1]);
        assert_eq!(p.nodes[1].host_cpus, vec![2, 3]);
        assert_eq!(p.distances, vec![vec![10, 21], vec![21, 10]]);
        assert_eq!(
            p.vcpu_cpus(4),
            vec![vec![0, 1], vec![0, 1], vec![2, 3], vec![2, 3]]
        );
        assert_eq!(
            p.regions(),
            vec![
                (GuestAddress(0), 256 << 20, 0),
                (GuestAddress(256 << 20), 256 << 20, 1)
            ]
        );
        assert_eq!(p.node_of((256 << 20) + 5), Some(1));
        assert_eq!(plan(&vm(1, vec![]), &host, &[]), Ok(None));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let host = two_node_host("vmm-refusals");
        let err = |cfg: VmConfig| plan(&cfg, &host, &[]).unwrap_err().to_string();
        assert_eq!(
            err(vm(
                2,
                vec![node(0, &[0], 64, &[0]), node(1, &[1], 64, &[2])]
            )),
            "guest node 1: host node 2 does not exist (this host's nodes: 0-1)"
        );
        assert_eq!(
            err(vm(2, vec![node(0, &[0, 1], 2048, &[0])])),
            "guest node 0: 2147483648 bytes bound to host nodes 0 do not fit: they have \
             1019768832 bytes free (policy `preferred` allows the overflow elsewhere)"
        );
        let mut preferred = node(0, &[0, 1], 2048, &[0]);
        preferred.policy = NumaPolicy::Preferred;
        assert!(
            plan(&vm(2, vec![preferred]), &host, &[]).is_ok(),
            "overcommit"
        );
        assert_eq!(
            err(vm(2, vec![node(0, &[0, 2], 64, &[0])])),
            "guest node 0: vCPU 2 does not exist (the VM has vCPUs 0-1)"
        );
        assert_eq!(
            err(vm(
                3,
                vec![node(0, &[0], 64, &[0]), node(1, &[1], 64, &[1])]
            )),
            "vCPUs 2 are in no guest node; every vCPU needs one"
        );
        assert_eq!(
            err(vm(
                2,
                vec![node(0, &[0, 1], 64, &[0]), node(1, &[1], 64, &[1])]
            )),
            "vCPU 1 is in guest nodes 0 and 1; a vCPU belongs to one node"
        );
        assert_eq!(
            err(vm(1, vec![node(0, &[0], 64, &[0]), node(2, &[], 64, &[1])])),
            "guest NUMA nodes must be numbered 0 to 1 once each, got nodes 0,2"
        );
        let mut odd = vm(1, vec![node(0, &[0], 64, &[0])]);
        odd.numa[0].memory_bytes += 4096;
        odd.memory_bytes += 4096;
        assert!(plan(&odd, &host, &[])
            .unwrap_err()
            .to_string()
            .contains("multiple of 2 MiB"));
        let mut short = vm(1, vec![node(0, &[0], 64, &[0])]);
        short.memory_bytes = 128 << 20;
        assert_eq!(
            plan(&short, &host, &[]).unwrap_err(),
            NumaError::MemorySum {
                sum: 64 << 20,
                total: 128 << 20
            }
        );
    }

    #[test]
    fn a_memory_only_host_node_takes_memory_but_no_vcpus() {
        let host = Topology::read(
            &fixture::unpack(fixture::THREE_NODES_ONE_CPULESS, "vmm-cpuless").unwrap(),
        )
        .unwrap();
        let ok = vm(2, vec![node(0, &[0, 1], 64, &[0]), node(1, &[], 64, &[2])]);
        let p = plan(&ok, &host, &[]).unwrap().unwrap();
        assert_eq!(p.distances[0][1], 31);
        assert!(p.nodes[1].host_cpus.is_empty());
        assert_eq!(
            plan(
                &vm(2, vec![node(0, &[0], 64, &[0]), node(1, &[1], 64, &[2])]),
                &host,
                &[]
            )
            .unwrap_err()
            .to_string(),
            "guest node 1: host nodes 2 have no CPUs to run its vCPUs 1"
        );
    }

    #[test]
    fn unbound_nodes_are_placed_by_free_memory_after_the_bound_ones() {
        // Free: node 0 972 MiB, node 1 929 MiB.
        let host = two_node_host("vmm-auto");
        let auto = vm(
            4,
            vec![node(0, &[0, 1], 512, &[]), node(1, &[2, 3], 512, &[])],
        );
        let p = plan(&auto, &host, &[]).unwrap().unwrap();
        let hosts: Vec<Vec<u32>> = p.nodes.iter().map(|n| n.host_nodes.clone()).collect();
        // Best fit: the first goes where less is left over (node 1); both do not fit one.
        assert_eq!(hosts, vec![vec![1], vec![0]]);
        assert_eq!(p.nodes[1].host_cpus, vec![0, 1]);
        // Bound memory counts: with node 1's 600 MiB bound there, 400 MiB fit node 0 only.
        let mixed = vm(
            4,
            vec![node(0, &[0, 1], 400, &[]), node(1, &[2, 3], 600, &[1])],
        );
        let p = plan(&mixed, &host, &[]).unwrap().unwrap();
        assert_eq!(p.nodes[0].host_nodes, vec![0]);
        // Equal room: the less busy node's CPUs win.
        let one = vm(2, vec![node(0, &[0, 1], 64, &[])]);
        let mut even = host.clone();
        even.nodes[1].memory_free = even.nodes[0].memory_free;
        let on = |load: &[f64]| plan(&one, &even, load).unwrap().unwrap().nodes[0].host_nodes[0];
        assert_eq!(on(&[0.8, 0.2]), 1);
        assert_eq!(on(&[0.2, 0.8]), 0);
        let too_big = vm(2, vec![node(0, &[0, 1], 2048, &[])]);
        let err = plan(&too_big, &host, &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("cannot place the guest nodes automatically: no host node has 2147483648 bytes free for guest node 0"),
            "{err}"
        );
    }

    #[test]
    fn nodes_tile_guest_ram_around_the_hole() {
        let r = node_regions(&[2 << 30, 2 << 30]);
        assert_eq!(
            r,
            vec![
                (GuestAddress(0), 2 << 30, 0),
                (GuestAddress(2 << 30), 1 << 30, 1),
                (GuestAddress(4 << 30), 1 << 30, 1),
            ]
        );
        for sizes in [
            vec![64u64 << 20],
            vec![1 << 30, 3 << 30, 2 << 20],
            vec![3 << 30],
        ] {
            let total: u64 = sizes.iter().sum();
            let plain: Vec<(u64, u64)> = layout::ram_regions(total)
                .iter()
                .map(|r| (r.0 .0, r.1 as u64))
                .collect();
            // Adjacent pieces of one plain region join back into it.
            let mut joined: Vec<(u64, u64)> = Vec::new();
            for (g, l, _) in node_regions(&sizes) {
                match joined.last_mut() {
                    Some(last) if last.0 + last.1 == g.0 => last.1 += l as u64,
                    _ => joined.push((g.0, l as u64)),
                }
            }
            assert_eq!(joined, plain, "{sizes:?}");
        }
    }
}
