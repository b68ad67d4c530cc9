//! The KVM layer: the hypervisor flavour, the VM and its vCPUs. Nothing above this module
//! knows whether it runs on PVM or on VMX/SVM.
pub mod dirty_ring;
pub mod flavour;
pub mod irq;
pub mod persist;
pub mod vcpu;
pub mod vm;

pub use flavour::Flavour;
