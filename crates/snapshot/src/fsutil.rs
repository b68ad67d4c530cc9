//! Crash-safe file writing: a file is complete on disk before any name points at it.
use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{io_err, FileError};

/// Writes `data` to a new file at `path` and fsyncs it.
pub(crate) fn write_synced(path: &Path, data: &[u8]) -> Result<(), FileError> {
    let mut f = File::create(path).map_err(io_err("create", path))?;
    f.write_all(data).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

/// Fsyncs a directory, so that the names created, renamed or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Replaces `path` atomically with `data`: write a sibling temp file, fsync, rename, fsync
/// the directory. A crash leaves either the old or the new content, never a mix.
pub(crate) fn replace_file(path: &Path, data: &[u8]) -> Result<(), FileError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    write_synced(&tmp, data)?;
    std::fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Bytes actually allocated on disk for `path` (holes excluded), from `st_blocks`.
pub fn allocated_bytes(path: &Path) -> Result<u64, FileError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(io_err("stat", path))?;
    Ok(m.blocks() * 512)
}

/// Tries to take an exclusive `flock` on `file` without waiting; false if another process
/// holds it. The kernel drops the lock when its holder dies, even by `kill -9`, which is
/// what lets `open` tell an abandoned temporary directory from one being written.
pub fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock only reads the descriptor, which `file` keeps open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Whether `file` has data (not a hole) anywhere in `off..off + len`, from `SEEK_DATA`.
/// On a file system without hole reporting every range counts as data.
pub(crate) fn has_data(file: &File, off: u64, len: u64) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek only reads the descriptor, which `file` keeps open for the call, and
    // changes nothing but the file position, which this crate never relies on (it uses
    // positioned reads and writes).
    let data = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let err = std::io::Error::last_os_error();
        // ENXIO: no data at or after `off`.
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(false),
            _ => Err(err),
        };
    }
    Ok((data as u64) < off + len)
}
