//! rayvisor's cluster control plane (issue 17). The design, with the key layout, the node
//! states and their causes, the run-token protocol, the self-fencing proof and the
//! 1,000-host arithmetic, is in the README ("Cluster control plane"); each module carries
//! its part:
//!
//! - [`agent`]: the host agent's core: lease, registration, status, reconcile, self-fence;
//! - [`controller`]: placement of desired VMs through crates/scheduler, leader election,
//!   operations recorded before they act;
//! - [`decisions`]: the decision log;
//! - [`store`]: the one [`store::Store`] trait, on an embedded redb file (one host, zero
//!   set-up) or a real etcd (a cluster): revision-checked transactions, leases, watches;
//! - [`keys`]: where everything lives in the store;
//! - [`migration`]: live migration through the cluster: who writes what;
//! - [`spec`]: what a cluster VM is;
//! - [`runtoken`]: the per-VM run token that makes a second start of a VM impossible;
//! - [`timing`]: lease, fence and grace times, and the inequality that proves no VM runs
//!   twice;
//! - [`view`]: what `ray cluster nodes|vms` show;
//! - [`testing`]: a real etcd for tests.
pub mod agent;
pub mod controller;
pub mod decisions;
pub mod keys;
pub mod migration;
pub mod ops;
pub mod runtoken;
pub mod spec;
pub mod store;
pub mod testing;
pub mod timing;
pub mod view;
