//! The host's NUMA topology as the kernel describes it in sysfs: nodes (`devices/system/node`)
//! with their CPUs, memory, distances and huge pages, and the node of every PCI device
//! (`bus/pci/devices/*/numa_node`).
//!
//! Everything is read under a root directory (`/sys` on a live host), so captures of real
//! multi-node kernels' sysfs are test data (`tests/fixtures`). Nodes are whatever the
//! kernel lists as online: there is no fixed limit, node ids need not be contiguous, and a
//! node may have memory but no CPUs (CXL or persistent memory) or CPUs but no memory.
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cpulist::{parse_list, ListError};

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    List { path: PathBuf, source: ListError },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// Huge pages of one size on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugePages {
    pub page_bytes: u64,
    pub total: u64,
    pub free: u64,
    pub surplus: u64,
}

/// One online NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: u32,
    /// Online CPUs of the node, ascending; empty for a memory-only node.
    pub cpus: Vec<u32>,
    pub memory_total: u64,
    pub memory_free: u64,
    /// Distance to each online node, as (node id, distance); 10 is the node itself.
    pub distances: Vec<(u32, u32)>,
    /// Huge page pools, by ascending page size.
    pub huge_pages: Vec<HugePages>,
}

/// A PCI device and the node it is attached to (`None`: the firmware does not say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDevice {
    /// Domain:bus:device.function, as sysfs names it (`0000:00:02.0`).
    pub address: String,
    pub numa_node: Option<u32>,
}

/// The host's NUMA topology at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Online nodes, by ascending id.
    pub nodes: Vec<Node>,
    /// PCI devices, by address; empty where the root has no PCI bus.
    pub pci_devices: Vec<PciDevice>,
}

fn read(path: &Path) -> Result<String, TopologyError> {
    fs::read_to_string(path).map_err(|source| TopologyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_list(what: &'static str, path: &Path) -> Result<Vec<u32>, TopologyError> {
    parse_list(what, &read(path)?).map_err(|source| TopologyError::List {
        path: path.to_path_buf(),
        source,
    })
}

fn read_u64(path: &Path) -> Result<u64, TopologyError> {
    let text = read(path)?;
    text.trim().parse().map_err(|_| TopologyError::Format {
        path: path.to_path_buf(),
        reason: format!("{:?} is not a number", text.trim()),
    })
}

/// `Node N MemTotal:   1030480 kB` lines: the value of `key` in bytes.
fn meminfo_bytes(path: &Path, text: &str, key: &str) -> Result<u64, TopologyError> {
    let bad = |reason: String| TopologyError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(key))
        .ok_or_else(|| bad(format!("no {key} line")))?;
    let mut words = line.split_whitespace().skip(3);
    let kib: u64 = words
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad(format!("{key} has no number: {line:?}")))?;
    match words.next() {
        Some("kB") => Ok(kib * 1024),
        other => Err(bad(format!("{key} is in {other:?}, not kB: {line:?}"))),
    }
}

fn huge_pages(dir: &Path) -> Result<Vec<HugePages>, TopologyError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        // Kernels without huge page support have no such directory.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TopologyError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(kib) = name
            .strip_prefix("hugepages-")
            .and_then(|s| s.strip_suffix("kB"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let p = e.path();
        out.push(HugePages {
            page_bytes: kib * 1024,
            total: read_u64(&p.join("nr_hugepages"))?,
            free: read_u64(&p.join("free_hugepages"))?,
            surplus: read_u64(&p.join("surplus_hugepages"))?,
        });
    }
    out.sort_by_key(|h| h.page_bytes);
    Ok(out)
}

fn pci_devices(dir: &Path) -> Result<Vec<PciDevice>, TopologyError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TopologyError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path().join("numa_node");
        // Kernels built without NUMA have no numa_node file: the device is on no node.
        let node = match fs::read_to_string(&path) {
            Ok(t) => t.trim().parse::<i64>().map_err(|_| TopologyError::Format {
                path: path.clone(),
                reason: format!("{:?} is not a node number", t.trim()),
            })?,
            Err(_) => -1,
        };
        out.push(PciDevice {
            address: e.file_name().to_string_lossy().into_owned(),
            numa_node: u32::try_from(node).ok(),
        });
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(out)
}

impl Topology {
    /// The live host's topology (`/sys`).
    pub fn host() -> Result<Self, TopologyError> {
        Self::read(Path::new("/sys"))
    }

    /// Reads the topology of the sysfs tree at `root` (`/sys`, or a capture of one).
    pub fn read(root: &Path) -> Result<Self, TopologyError> {
        let base = root.join("devices/system/node");
        let online = read_list("online nodes", &base.join("online"))?;
        let mut nodes = Vec::with_capacity(online.len());
        for &id in &online {
            let dir = base.join(format!("node{id}"));
            let meminfo_path = dir.join("meminfo");
            let meminfo = read(&meminfo_path)?;
            let distance_path = dir.join("distance");
            let distance_text = read(&distance_path)?;
            let values: Vec<u32> = distance_text
                .split_whitespace()
                .map(|w| w.parse())
                .collect::<Result<_, _>>()
                .map_err(|_| TopologyError::Format {
                    path: distance_path.clone(),
                    reason: format!("{:?} is not a list of numbers", distance_text.trim()),
                })?;
            // The kernel prints one distance per online node, in node order.
            if values.len() != online.len() {
                return Err(TopologyError::Format {
                    path: distance_path,
                    reason: format!(
                        "{} distances for {} online nodes",
                        values.len(),
                        online.len()
                    ),
                });
            }
            nodes.push(Node {
                id,
                cpus: read_list("node cpus", &dir.join("cpulist"))?,
                memory_total: meminfo_bytes(&meminfo_path, &meminfo, "MemTotal:")?,
                memory_free: meminfo_bytes(&meminfo_path, &meminfo, "MemFree:")?,
                distances: online.iter().copied().zip(values).collect(),
                huge_pages: huge_pages(&dir.join("hugepages"))?,
            });
        }
        Ok(Self {
            nodes,
            pci_devices: pci_devices(&root.join("bus/pci/devices"))?,
        })
    }

    /// The node with id `id`, if online.
    pub fn node(&self, id: u32) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The distance from node `from` to node `to` (10 = local), if both are online.
    pub fn distance(&self, from: u32, to: u32) -> Option<u32> {
        self.node(from)?
            .distances
            .iter()
            .find(|d| d.0 == to)
            .map(|d| d.1)
    }

    /// The node CPU `cpu` belongs to.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.cpus.contains(&cpu))
            .map(|n| n.id)
    }

    /// Online node ids, ascending.
    pub fn node_ids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.id).collect()
    }
}
