//! Errors. `FileError` is about one file (it always names it); `StoreError` is about an
//! operation on the store and wraps a `FileError` when a file was the cause.
use std::path::PathBuf;

use crate::state_machine::{Event, SnapshotState};

/// Something wrong with one file of a snapshot: I/O, or its content failing a check.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a {expected} file: its magic is {got:?}")]
    BadMagic {
        path: PathBuf,
        expected: &'static str,
        got: String,
    },
    #[error("{path} has unsupported format version {got} (supported: {supported})")]
    UnsupportedVersion {
        path: PathBuf,
        got: u32,
        supported: u32,
    },
    #[error("{path} is truncated at byte {at}: {what}")]
    Truncated {
        path: PathBuf,
        at: u64,
        what: String,
    },
    #[error("{path} declares a {got}-byte payload, more than the limit of {limit} bytes")]
    TooLarge { path: PathBuf, got: u64, limit: u64 },
    #[error("{path} fails its checksum{location}: expected {expected:#010x}, got {got:#010x}")]
    Checksum {
        path: PathBuf,
        /// Where in the file, e.g. " in the run at guest address 0x1000", or empty.
        location: String,
        expected: u32,
        got: u32,
    },
    #[error("{path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Builds the `map_err` closure for an I/O step on `path`.
pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn invalid(path: &std::path::Path, reason: impl Into<String>) -> FileError {
    FileError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A store operation (create, list, delete, merge, restore) that could not be done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("snapshot id {0:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ - not starting with '.'")]
    InvalidId(String),
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    #[error("cannot delete snapshot {id}: snapshots {children:?} depend on it; delete or merge them first")]
    HasChildren { id: String, children: Vec<String> },
    #[error("VM {vm_id} already has {count} checkpoints, the limit is {limit}; delete or merge some first")]
    LimitReached {
        vm_id: String,
        count: usize,
        limit: usize,
    },
    #[error("snapshot {id} is {state:?}; {action} needs it {needs}")]
    WrongState {
        id: String,
        state: SnapshotState,
        action: &'static str,
        needs: &'static str,
    },
    #[error("snapshot state {from:?} has no transition for event {event:?}")]
    InvalidTransition { from: SnapshotState, event: Event },
    #[error("snapshot {id} is of format version {got}; this build restores version {supported}")]
    IncompatibleVersion {
        id: String,
        got: u32,
        supported: u32,
    },
    #[error(
        "snapshot {id} was taken on an incompatible host: its hypervisor and CPU features are {snapshot:?}, this host's are {host:?}"
    )]
    IncompatibleCpu {
        id: String,
        snapshot: String,
        host: String,
    },
    #[error("memory does not match: {0}")]
    MemoryMismatch(String),
    #[error("the chain of snapshot {id} is broken: {reason}")]
    BrokenChain { id: String, reason: String },
}
