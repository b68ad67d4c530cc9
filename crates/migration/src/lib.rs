//! rayvisor live migration, the part that needs no KVM: wire protocol, session state
//! machine, convergence policy, and the sender/receiver drivers.
//!
//! # Pieces
//!
//! - [`secure`]: the stream below the frames: a Noise handshake (`NNpsk0`, AES-GCM,
//!   SHA-256) that proves the pre-shared key both ways, then AES-GCM records counted per
//!   direction (or plaintext, for same-host moves and `--insecure-plaintext`); no memory or
//!   state moves before both sides proved the key and the target accepted the
//!   [`CompatInfo`].
//! - [`frame`] / [`protocol`]: versioned frames (`RYMG` header, command, flags, request id,
//!   length ≤ [`frame::MAX_PAYLOAD`], CRC32 trailer); every malformed frame is a
//!   [`ProtocolError`].
//! - [`auth`]: the pre-shared key.
//! - [`session`]: one enum, one transition table, shared by both sides.
//! - [`convergence`]: EMA dirty rate and bandwidth, expected downtime, throttle steps, limits.
//! - [`sender`] / [`receiver`]: drivers generic over ray-memory's [`GuestMemory`] view,
//!   [`SourceVm`], [`TargetVm`] and any `Read + Write` stream.
//! - [`transport`]: the migration endpoints (`HOST:PORT`, `unix:PATH`), connecting, a
//!   listener whose accept a [`CancelToken`] or [`transport::Canceller`] wakes at once, and
//!   the pre-shared key file reader.
//! - [`disk`]: disks copied with the VM (`--copy-disks`): dirty blocks sent in the
//!   pre-copy passes, the target's files, their verification.
//! - [`progress`]: a polled [`Progress`] cell, a [`CancelToken`], and [`MigrationSlots`]
//!   (at most 8 concurrent migrations per host by default).
//! - `memvm` (feature `test-util`): in-memory VMs for tests and the throughput bench.
//!
//! # Verification
//!
//! Each side keeps one XXH3 hash per guest page ([`vm::PageHashes`]): the source hashes
//! every page from the bytes it sends, the target every page right after placing it. After
//! the final pass both exchange digests of their tables and the target resumes only if
//! they match. Page data is read once per side on
//! its way through, never again in the background or in the pause; the page frames' CRC
//! covers just their header and index. `SenderConfig::recheck_memory` additionally rereads
//! the paused source against its table (catches a write the dirty log missed). Against an
//! attacker on the path, the secure stream's AEAD covers every byte.
//!
//! # Who runs the VM: the split-brain rule
//!
//! The VM must never run in two places and never be lost. Ownership passes exactly once,
//! at the `Switchover` frame, and only forward:
//!
//! 1. Until the source sends `Switchover`, the source owns the VM. The target may load
//!    memory and state but must not resume; any failure (link cut, target killed, wrong
//!    key, incompatible target, hash mismatch, cancel, policy abort) makes the source roll
//!    back — lift the throttle, stop dirty logging, resume — and the target discard its copy.
//!    The source sends `Switchover` only after the target acknowledged that the memory
//!    hashes match, so the target has everything it needs when it receives it.
//! 2. Sending `Switchover` is the source's commit point (session state `Completing`). From
//!    then on the source never resumes on its own. The target, on receiving `Switchover`,
//!    owns the VM: it resumes it and answers `Resumed`; the source then reports `Completed`
//!    and the VMM moves its copy to `Terminated`.
//! 3. The only way back after the commit point is an explicit `Error{ResumeFailed}` from the
//!    target, sent after its resume failed and before it tears the VM down: the target
//!    tells the source it has not run and will not run the VM, so the source may resume.
//! 4. If the link fails after `Switchover` (no `Resumed`, no explicit refusal), the source
//!    cannot tell "target runs the VM" from "target died": it ends `Failed` with
//!    [`sender::SourceVmAfterFailure::PausedOwnershipUncertain`], keeps the paused VM and
//!    its memory intact, and resumes it only when an operator or fencing confirms the
//!    target is dead. A target that dies after the switch-over therefore can never bring
//!    the source back by itself: at most one copy runs; at worst none runs until fencing,
//!    and the paused copy is still there, so the VM is not lost.
//!
//! The session table enforces it: from `Completing`, `Fault` leads to `Failed` (not
//! `RollingBack`), `Cancel` is refused, and only `ResumeFailed` leads to `RollingBack`.
//!
//! # What the VMM implements
//!
//! - [`GuestMemory`] over its guest memory map (regions in a fixed order): `layout` and
//!   `span`, and ideally [`GuestMemory::known_zero`] (pages the guest never touched: the
//!   sender sends them as one bit without reading them, the target leaves them unwritten),
//!   [`GuestMemory::note_write`] (the target's placed pages) and
//!   [`GuestMemory::prepare_write`] (the target populates a run before the socket fills
//!   it). The sender hands spans of guest memory to the kernel for the socket write; the
//!   target reads pages from the socket straight into its (not yet running) guest memory.
//! - [`SourceVm`]: dirty logging (`KVM_MEM_LOG_DIRTY_PAGES` + `KVM_GET_DIRTY_LOG`, ORed with
//!   the VMM's own device writes) as a ray-memory [`DirtyBitmap`], pause/resume of vCPUs
//!   and devices, vCPU throttling, and a state blob. The VM sits in its `MigrationSource`
//!   state while the sender runs.
//! - [`TargetVm`]: restore the blob (validating it), resume, discard. The VM sits in
//!   `MigrationTarget` while the receiver runs.
//! - A [`CompatInfo`] on each side: vCPU count, regions, CPUID fingerprint, flavour.

pub mod auth;
#[cfg(any(test, feature = "test-util"))]
pub mod bench;
pub mod convergence;
pub mod disk;
mod error;
pub mod frame;
#[cfg(any(test, feature = "test-util"))]
pub mod memvm;
pub mod progress;
pub mod protocol;
pub mod receiver;
pub mod secure;
pub mod sender;
pub mod session;
pub mod transport;
pub mod vm;

pub use auth::PresharedKey;
pub use convergence::{decide, Decision, LimitAction, Policy, Stats};
pub use disk::{BlockTracker, DiskInfo, SourceDisk, TargetDisks};
pub use error::{MigrationError, ProtocolError};
pub use progress::{CancelToken, MigrationSlots, Progress, ProgressHandle, TooManyMigrations};
pub use protocol::{CompatInfo, MemoryRegion};
pub use ray_memory::{DirtyBitmap, GuestMemory, MemoryError, MemoryLayout, PageBitmap};
pub use receiver::{receive_migration, ReceiveFailure, ReceiveReport, ReceiverConfig};
pub use secure::{Protection, SecureError};
pub use sender::{send_migration, SendFailure, SendReport, SenderConfig, SourceVmAfterFailure};
pub use session::{Session, SessionEvent, SessionState};
pub use transport::{
    adopt, connect, read_key_file, read_key_from, Canceller, Endpoint, KeyFileError, Listener,
    Stream, TransportError,
};
pub use vm::{SourceVm, TargetVm, VmError};
