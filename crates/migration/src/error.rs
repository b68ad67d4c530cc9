//! Error types: one for the wire, one for a migration as a whole.

use crate::protocol::{Command, ErrorCode};
use crate::session::{InvalidTransition, SessionState};
use crate::vm::VmError;
use ray_memory::MemoryError;

/// A frame or payload that could not be read or did not make sense.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the migration connection failed while {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the peer closed the migration connection")]
    PeerClosed,
    #[error("the frame was truncated in its {part}: {got} of {expected} bytes arrived before the connection ended")]
    Truncated {
        part: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("the frame starts with magic {found:02x?}, not b\"RYMG\"; the peer is not a rayvisor migration endpoint")]
    BadMagic { found: [u8; 4] },
    #[error(
        "the frame header checksum is {found:#010x} but the header hashes to {expected:#010x}"
    )]
    HeaderChecksum { expected: u32, found: u32 },
    #[error("the frame uses protocol version {found}; this build speaks {supported:?}")]
    UnsupportedVersion { found: u16, supported: Vec<u16> },
    #[error("the frame carries command 0 (Invalid)")]
    InvalidCommand,
    #[error("the frame carries unknown command {value}")]
    UnknownCommand { value: u16 },
    #[error("the frame sets unknown flag bits {flags:#06x}")]
    UnknownFlags { flags: u16 },
    #[error("the frame's reserved header field is {value}, not 0")]
    ReservedNonZero { value: u16 },
    #[error("the frame payload is {len} bytes, over the {max}-byte limit")]
    Oversize { len: u64, max: u64 },
    #[error(
        "the {command:?} frame's CRC32 is {found:#010x} but its contents hash to {expected:#010x}"
    )]
    Checksum {
        command: Command,
        expected: u32,
        found: u32,
    },
    #[error("the {command:?} payload could not be decompressed: {reason}")]
    Decompress { command: Command, reason: String },
    #[error("the {command:?} payload is malformed: {reason}")]
    Malformed { command: Command, reason: String },
}

/// Why a migration (either side) failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("no common protocol version: we speak {ours:?}, the peer offered {theirs:?}")]
    NoCommonVersion { ours: Vec<u16>, theirs: Vec<u16> },
    #[error(transparent)]
    Secure(#[from] crate::secure::SecureError),
    #[error("the target is incompatible: {reason}")]
    Incompatible { reason: String },
    #[error("in session state {state:?} the peer sent {got:?} where {expected} was expected")]
    Unexpected {
        state: SessionState,
        expected: &'static str,
        got: Command,
    },
    #[error("the peer answered request {expected} with a response to request {got}")]
    RequestIdMismatch { expected: u64, got: u64 },
    #[error("the peer reported {code:?}: {message}")]
    PeerError { code: ErrorCode, message: String },
    #[error("the peer aborted the migration: {reason}")]
    PeerAborted { reason: String },
    #[error("the source sent a {len}-byte page at {gpa:#x}, which is not a whole page inside guest memory")]
    PageOutOfRange { gpa: u64, len: usize },
    #[error("the source announced {announced} pages for pass {pass} but sent {received}")]
    PassCountMismatch {
        pass: u32,
        announced: u64,
        received: u64,
    },
    #[error("guest memory differs after the copy: {detail}")]
    VerifyMismatch { detail: String },
    #[error("the target cannot take the copied disks (--copy-disks): {reason}")]
    DiskCopyRefused { reason: String },
    #[error("copying the disks failed: {reason}")]
    Disk { reason: String },
    #[error("the source announced {announced} disk bytes for pass {pass} but sent {received}")]
    DiskPassMismatch {
        pass: u32,
        announced: u64,
        received: u64,
    },
    #[error("a copied disk differs after the copy: {detail}")]
    DiskVerifyMismatch { detail: String },
    #[error("pre-copy did not converge: {reason}")]
    NotConverged { reason: String },
    #[error("the migration was cancelled")]
    Cancelled,
    #[error("the VM dirty log returned {got} bitmaps for {regions} memory regions")]
    DirtyLogShape { got: usize, regions: usize },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Session(#[from] InvalidTransition),
}
