//! Guest memory: the VMM's view of guest RAM.
use vm_memory::bitmap::AtomicBitmap;

/// Guest memory as the VMM holds it. The bitmap records every write the VMM itself makes
/// (device DMA, loader, doorbells) so snapshots and migration can merge it with KVM's log.
pub type GuestMem = vm_memory::GuestMemoryMmap<AtomicBitmap>;
