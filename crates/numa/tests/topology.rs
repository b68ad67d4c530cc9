//! Topology read from sysfs trees captured on real multi-node kernels (see fixtures/README.md)
//! and from this host's own /sys.
use std::path::PathBuf;

use ray_numa::fixture::{THREE_NODES_ONE_CPULESS, TWO_NODES};
use ray_numa::Topology;

fn unpack(name: &str, tag: &str) -> PathBuf {
    ray_numa::fixture::unpack(name, tag).unwrap()
}

#[test]
fn two_node_capture() {
    let t = Topology::read(&unpack(TWO_NODES, "two")).unwrap();
    assert_eq!(t.node_ids(), vec![0, 1]);
    assert_eq!(t.nodes[0].cpus, vec![0, 1]);
    assert_eq!(t.nodes[1].cpus, vec![2, 3]);
    assert_eq!(t.nodes[0].memory_total, 1_030_480 * 1024);
    assert_eq!(t.nodes[0].memory_free, 995_868 * 1024);
    assert!(t.nodes[1].memory_total > 900 << 20);
    assert!(t.nodes.iter().all(|n| n.memory_free <= n.memory_total));
    assert_eq!(t.distance(0, 0), Some(10));
    assert_eq!(t.distance(0, 1), Some(21));
    assert_eq!(t.distance(1, 0), Some(21));
    assert_eq!(t.distance(0, 2), None);
    assert_eq!(t.node_of_cpu(3), Some(1));
    assert_eq!(t.node_of_cpu(4), None);
    let sizes: Vec<u64> = t.nodes[0].huge_pages.iter().map(|h| h.page_bytes).collect();
    assert_eq!(sizes, vec![2 << 20, 1 << 30]);
    assert!(t.nodes[0]
        .huge_pages
        .iter()
        .all(|h| h.total == 0 && h.free == 0));
    assert!(t.pci_devices.is_empty(), "the capture holds no PCI bus");
}

#[test]
fn three_node_capture_with_a_memory_only_node() {
    let t = Topology::read(&unpack(THREE_NODES_ONE_CPULESS, "three")).unwrap();
    assert_eq!(t.node_ids(), vec![0, 1, 2]);
    let n2 = t.node(2).unwrap();
    assert!(n2.cpus.is_empty(), "node 2 has memory only");
    assert_eq!(n2.memory_total, 983_908 * 1024);
    assert_eq!(n2.memory_free, 966_288 * 1024);
    assert_eq!(t.distance(0, 2), Some(31));
    assert_eq!(t.distance(2, 1), Some(41));
    assert_eq!(t.distance(1, 0), Some(21));
    for n in &t.nodes {
        assert_eq!(t.distance(n.id, n.id), Some(10));
    }
}

#[test]
fn a_damaged_tree_is_refused_naming_the_file() {
    let root = unpack(TWO_NODES, "damaged");
    let distance = root.join("devices/system/node/node1/distance");
    std::fs::write(&distance, "21 10 30\n").unwrap();
    let err = Topology::read(&root).unwrap_err().to_string();
    assert!(
        err.contains("node1/distance") && err.contains("3 distances for 2 online nodes"),
        "{err}"
    );
    std::fs::remove_file(root.join("devices/system/node/node0/meminfo")).unwrap();
    let err = Topology::read(&root).unwrap_err().to_string();
    assert!(err.contains("node0/meminfo"), "{err}");
}

#[test]
fn this_host() {
    let t = Topology::host().unwrap();
    assert!(!t.nodes.is_empty());
    let cpus: usize = t.nodes.iter().map(|n| n.cpus.len()).sum();
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    assert_eq!(cpus, ray_numa::parse_list("cpus", &online).unwrap().len());
    // Every PCI device of this host is listed, each with its node or none.
    let listed = std::fs::read_dir("/sys/bus/pci/devices").map_or(0, |d| d.count());
    assert_eq!(t.pci_devices.len(), listed);
    for d in &t.pci_devices {
        assert!(d.numa_node.is_none_or(|n| t.node(n).is_some()), "{d:?}");
    }
}
