//! NUMA for rayvisor, without KVM, so all of it runs (and is tested) anywhere, including
//! inside a multi-node test kernel:
//!
//! - [`cpulist`]: the kernel's list format (`0-3,8`), for sysfs files and `--numa cpus=`.
//! - [`topology`]: the host's nodes, their CPUs, memory, distances, huge pages, and which
//!   node each PCI device sits on, read from sysfs under any root, so captures from real
//!   multi-node kernels serve as test data.
//! - [`placement`]: choosing host nodes for guest nodes (best fit by free memory, then
//!   CPU load).
//! - [`locality`]: which nodes a range's pages are on (a `move_pages` sample).
//! - [`policy`]: the access-driven page migration policy, a pure function with a
//!   decision log.
//! - [`damon`]: what the kernel's data access monitor offers here (read only).
//! - [`fixture`]: those captures, for tests.
//! - [`sys`]: `mbind`, `move_pages` and thread affinity.

pub mod cpulist;
pub mod damon;
pub mod fixture;
pub mod locality;
pub mod placement;
pub mod policy;
pub mod sys;
pub mod topology;

pub use cpulist::{format_list, parse_list, ListError};
pub use topology::{HugePages, Node, PciDevice, Topology, TopologyError};
