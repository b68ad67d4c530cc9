//! rayvisor VMM: one process per VM on KVM.
pub mod boot;
pub mod memory;
