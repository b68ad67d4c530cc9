//! Guest memory with one vocabulary, for every part of rayvisor that touches it.
//!
//! - [`MemoryLayout`] / [`Region`]: guest RAM as regions by guest-physical address.
//! - [`PageBitmap`] (one region) and [`DirtyBitmap`] (one per layout region): the only dirty
//!   bitmap; KVM's `KVM_GET_DIRTY_LOG` words drop straight into it.
//! - [`DirtyFanout`]: one dirty log read once and handed to named consumers (incremental
//!   snapshots, a migration, a display), each taking its own set without stealing another's.
//! - [`GuestMemory`]: the view trait snapshot, migration, devices and display use. Its
//!   accessors hand out [`GuestSpan`]s, raw host spans with copy, volatile, fill, hash and
//!   I/O helpers, never a `&[u8]` over memory a vCPU may be writing.
//! - [`OwnedMemory`]: guest memory on the heap (snapshot merge, tests); `vm-memory`'s
//!   `GuestMemoryMmap` implements [`GuestMemory`] too ([`mmap`]).
//!
//! - [`LazyFill`] ([`lazy`], over [`uffd`]): memory filled block by block from a source
//!   that checks each block, on first touch or in the background (lazily verified
//!   restores).
//!
//! Nothing here touches KVM, so all of it is tested anywhere.

pub mod bitmap;
pub mod fanout;
pub mod layout;
pub mod lazy;
pub mod mmap;
pub mod owned;
pub mod span;
pub mod uffd;
pub mod view;

pub use bitmap::{DirtyBitmap, PageBitmap};
pub use fanout::{ConsumerId, DirtyFanout};
pub use layout::{MemoryLayout, Region, MAX_MEMORY_BYTES, PAGE_SIZE};
pub use lazy::{BlockSource, FillState, LazyFill, LazyRange};
pub use owned::OwnedMemory;
pub use span::{is_zero, page_hash, GuestSpan};
pub use view::{GuestMemory, MemoryError};
