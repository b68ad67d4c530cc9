//! rayvisor snapshots without KVM: the on-disk format, the store, chains of incremental
//! checkpoints, and a snapshot's state machine. The VMM supplies VM state as opaque bytes
//! and guest memory as a `ray_memory::GuestMemory` view, which snapshots read and restores
//! write through spans only; this crate never touches KVM, so all of it is tested without
//! a VM.
//!
//! A snapshot is a directory (see `store`):
//! - `manifest.json` (`manifest`): id, parent, VM, time, kind, sizes, checksums, state;
//! - `state.bin` (`container::StateFile`): `magic | version | length | payload | CRC32`;
//! - memory, one of
//!   - `memory.raw` (`sparse`): full and uncompressed, laid out by guest-physical address
//!     with zero pages as holes, mapped privately on restore, and `memory.sums` (`blocks`):
//!     its CRC32s per 64 KiB block, for restores that verify lazily;
//!   - `pages.map` + `pages.bin`/`pages.zst` (`pages`): the dirty pages of an incremental
//!     snapshot, or the non-zero pages of a compressed full one.
//!
//! Checksums are CRC32 (crc32fast, several GB/s): they are for detecting damage, not
//! tampering; the store is the host's own directory.
pub mod bench;
pub mod blocks;
pub mod container;
pub mod error;
mod fsutil;
mod guest;
pub mod manifest;
pub mod pages;
pub mod restore;
pub mod sparse;
pub mod state_machine;
pub mod store;

#[cfg(test)]
mod test_util;

pub use bench::{sequential_write_speed, WriteSpeed};
pub use blocks::{Block, BlockSums, SparseBlocks, BLOCK_BYTES};
pub use container::StateFile;
pub use error::{FileError, StoreError};
pub use fsutil::{allocated_bytes, try_lock};
pub use manifest::{Compression, Kind, Manifest, FORMAT_VERSION};
/// Guest memory's vocabulary is `ray_memory`'s; these are the parts of it this crate's API
/// takes and returns.
pub use ray_memory::{
    DirtyBitmap, GuestMemory, MemoryError, MemoryLayout, OwnedMemory, PageBitmap, Region, PAGE_SIZE,
};
pub use restore::{BaseMemory, Overlay, RestorePlan};
pub use state_machine::{Event, SnapshotState};
pub use store::{CreateOptions, NewSnapshot, SnapshotStore, SnapshotTree, TreeNode};
