//! Copying disks inside the migration (`--copy-disks`, protocol version 5).
//!
//! The source announces its disks (`DiskList`: id and size) right after the target
//! accepted its [`crate::CompatInfo`]; the target creates `DIR/<id>.img` for each (sparse,
//! refusing a file that exists) and acknowledges. Each pre-copy pass then sends, after the
//! pass's memory pages, the disk blocks to send (`DiskBlocks` frames: one contiguous byte
//! range each, data or zeros) and a `DiskPass` marker with the byte count; the first pass
//! sends every block that holds data (`SEEK_DATA`/`SEEK_HOLE`: holes are not read or sent),
//! every later one the blocks the device's dirty-block tracker ([`BlockTracker`]) marked
//! meanwhile, the last one while the VM is paused and the devices drained. The
//! convergence counts dirty disk bytes with dirty pages. Before `VerifyHash`, `DiskVerify`
//! carries one digest per disk of what the source sent; the target compares it with the
//! digest of what its files hold (each block hashed from the file after it was written)
//! and refuses the switch-over on a difference. A failed, cancelled or refused migration
//! removes the target's files; the source's disk is only ever read.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ray_memory::{is_zero, PageBitmap};

/// Bytes per block: the unit of dirty tracking, hashing and sending. Part of protocol
/// version 5 (the VMM's tracker uses the same size).
pub const BLOCK_SIZE: u64 = 64 << 10;
/// Most blocks in one `DiskBlocks` frame (4 MiB).
pub const MAX_RUN_BLOCKS: u64 = 64;
/// Most disks one migration copies.
pub const MAX_DISKS: usize = 64;
/// Largest disk accepted (64 TiB).
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// A disk as the source announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// The device id (1 to 20 of `A-Za-z0-9_-`): the target's file is `<id>.img`.
    pub id: String,
    /// Bytes, a multiple of 512.
    pub size: u64,
}

/// `None` when `id` is a usable disk id (and file name), else why not.
pub fn id_problem(id: &str) -> Option<String> {
    if id.is_empty() || id.len() > 20 {
        return Some(format!(
            "disk id {id:?} has {} characters; 1 to 20 are allowed",
            id.len()
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Some(format!(
            "disk id {id:?} has characters other than A-Z, a-z, 0-9, '_' and '-'"
        ));
    }
    None
}

/// Checks a disk list as a target receives it: count, ids (unique, usable as file names)
/// and sizes.
pub fn check_list(disks: &[DiskInfo]) -> Result<(), String> {
    if disks.is_empty() || disks.len() > MAX_DISKS {
        return Err(format!(
            "the source announces {} disks; 1 to {MAX_DISKS} are allowed",
            disks.len()
        ));
    }
    for (i, d) in disks.iter().enumerate() {
        if let Some(why) = id_problem(&d.id) {
            return Err(why);
        }
        if disks[..i].iter().any(|o| o.id == d.id) {
            return Err(format!("disk id {:?} is announced twice", d.id));
        }
        if d.size == 0 || !d.size.is_multiple_of(512) || d.size > MAX_DISK_SIZE {
            return Err(format!(
                "disk {:?} has {} bytes; a disk has a whole number of 512-byte sectors, at most {MAX_DISK_SIZE} bytes",
                d.id, d.size
            ));
        }
    }
    Ok(())
}

/// Blocks of a disk of `size` bytes (the last one may be short).
pub fn blocks_of(size: u64) -> usize {
    size.div_ceil(BLOCK_SIZE) as usize
}

/// Bytes of block `b` of a disk of `size` bytes.
pub fn block_len(size: u64, b: u64) -> u64 {
    BLOCK_SIZE.min(size.saturating_sub(b * BLOCK_SIZE))
}

/// The disk's dirty-block tracker on the source (the virtio-blk device marks a block
/// after a write, discard or write-zeroes on it returned from the host file).
pub trait BlockTracker: Send + Sync {
    /// Clears the bitmap and starts marking.
    fn start(&self);
    /// Blocks marked since the last call (or `start`), cleared atomically: a mark is in
    /// exactly one take.
    fn take(&self) -> PageBitmap;
    /// Stops marking.
    fn stop(&self);
}

/// A disk the source copies: its file (read only, with `pread`) and its tracker.
pub struct SourceDisk {
    pub id: String,
    pub size: u64,
    pub file: File,
    pub tracker: Arc<dyn BlockTracker>,
}

impl std::fmt::Debug for SourceDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceDisk")
            .field("id", &self.id)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl SourceDisk {
    /// Opens `path` for reading (a regular file or a block device).
    pub fn open(
        id: &str,
        path: &Path,
        size: u64,
        tracker: Arc<dyn BlockTracker>,
    ) -> Result<Self, String> {
        if let Some(why) = id_problem(id) {
            return Err(why);
        }
        let file = File::open(path)
            .map_err(|e| format!("cannot open disk {id} ({}): {e}", path.display()))?;
        Self::on_file(id, file, size, tracker)
    }

    /// The disk read from `file`, opened elsewhere (a jailed VMM's keeper opens its disks).
    pub fn on_file(
        id: &str,
        file: File,
        size: u64,
        tracker: Arc<dyn BlockTracker>,
    ) -> Result<Self, String> {
        if let Some(why) = id_problem(id) {
            return Err(why);
        }
        Ok(Self {
            id: id.into(),
            size,
            file,
            tracker,
        })
    }

    pub fn info(&self) -> DiskInfo {
        DiskInfo {
            id: self.id.clone(),
            size: self.size,
        }
    }

    pub fn blocks(&self) -> usize {
        blocks_of(self.size)
    }

    /// Blocks that may hold data: those overlapping the file's data extents
    /// (`SEEK_DATA`/`SEEK_HOLE`); every block when the file cannot tell (a block device).
    pub fn data_blocks(&self) -> PageBitmap {
        let mut set = PageBitmap::new(self.blocks());
        let fd = self.file.as_raw_fd();
        let mut at: i64 = 0;
        let size = self.size as i64;
        while at < size {
            // SAFETY: lseek on an open descriptor; it only moves the file offset, which
            // nothing here uses (reads are positioned).
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // No data past `at`.
                }
                // The file cannot say where its holes are: copy all of it.
                return PageBitmap::full(self.blocks());
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { size } else { hole.min(size) };
            if data >= size {
                break;
            }
            let first = (data as u64 / BLOCK_SIZE) as usize;
            let last = ((end as u64).div_ceil(BLOCK_SIZE) as usize).min(self.blocks());
            if last > first {
                set.set_range(first, last - first);
            }
            at = end.max(data + 1);
        }
        set
    }

    /// Reads `buf.len()` bytes at `offset` (whole blocks).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// One hash per block of a disk, as sent (source) or as the target's file holds it, and
/// a digest of them all kept up to date as blocks are recorded (like the memory's
/// [`crate::vm::PageHashes`]): blocks of zeros (and holes) count as nothing, so a fresh
/// table of a sparse disk starts at the digest of an empty disk.
#[derive(Debug, Clone)]
pub struct BlockHashes {
    hashes: Vec<u128>,
    sum: u128,
}

/// The hash of a block of zeros (whatever its length): none.
const ZERO: u128 = 0;

fn block_hash(data: &[u8]) -> u128 {
    if is_zero(data) {
        ZERO
    } else {
        xxhash_rust::xxh3::xxh3_128(data)
    }
}

fn mix(index: u64, hash: u128) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(&hash.to_le_bytes(), index)
}

impl BlockHashes {
    pub fn new(blocks: usize) -> Self {
        Self {
            hashes: vec![ZERO; blocks],
            sum: 0,
        }
    }

    /// Records block `b`'s bytes.
    pub fn record(&mut self, b: usize, data: &[u8]) {
        self.set(b, block_hash(data));
    }

    fn set(&mut self, b: usize, hash: u128) {
        let Some(slot) = self.hashes.get_mut(b) else {
            return;
        };
        if *slot != hash {
            let term = |h: u128| if h == ZERO { 0 } else { mix(b as u64, h) };
            self.sum = self.sum.wrapping_sub(term(*slot)).wrapping_add(term(hash));
            *slot = hash;
        }
    }

    /// Whether block `b` was recorded with these bytes.
    pub fn matches(&self, b: usize, data: &[u8]) -> bool {
        self.hashes.get(b) == Some(&block_hash(data))
    }

    /// The digest of every block's hash bound to its index.
    pub fn digest(&self) -> [u8; 16] {
        self.sum.to_le_bytes()
    }
}

/// The files a target creates for the disks the source copies. Dropped without
/// [`keep`](Self::keep) (a failed, refused or cancelled migration), it removes them.
#[derive(Debug)]
pub struct TargetDisks {
    disks: Vec<TargetDisk>,
    kept: bool,
}

#[derive(Debug)]
struct TargetDisk {
    id: String,
    /// The final name, `DIR/<id>.img`: the file has it only once the copy is complete,
    /// flushed and verified ([`TargetDisks::commit`]).
    path: PathBuf,
    /// The name it is written under until then ([`part_path`]).
    part: PathBuf,
    /// Whether it was renamed to `path`.
    committed: bool,
    file: File,
    size: u64,
    hashes: BlockHashes,
    /// Bytes received in the current pass.
    pass_bytes: u64,
}

/// `DIR/<id>.img`: where a target puts the copy of disk `id`.
pub fn target_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.img"))
}

/// `DIR/.<id>.img.<tag>.part`: the name a target writes disk `id` under while the copy is
/// incomplete, `tag` naming the target VM (see [`remove_stale_parts`]). Hidden, and never
/// the name a VM or a later migration opens.
pub fn part_path(dir: &Path, id: &str, tag: &str) -> PathBuf {
    dir.join(format!(".{id}.img.{tag}.part"))
}

/// `None` when `tag` (the target VM's name in its partial files) is usable in a file
/// name, else why not.
pub fn tag_problem(tag: &str) -> Option<String> {
    if tag.is_empty()
        || tag.len() > 64
        || !tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Some(format!(
            "the target's name {tag:?} cannot name its partial disk files: 1 to 64 of A-Z, a-z, 0-9, '_' and '-'"
        ));
    }
    None
}

/// Removes the partial copies ([`part_path`]) a target of the VM `tag` left in `dir`
/// (one killed in the middle of a copy leaves them); returns the paths removed. Files of
/// other VMs and complete copies are left alone.
pub fn remove_stale_parts(dir: &Path, tag: &str) -> Result<Vec<PathBuf>, String> {
    if let Some(p) = tag_problem(tag) {
        return Err(p);
    }
    let suffix = format!(".img.{tag}.part");
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list the disk directory {}: {e}", dir.display()))?;
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_part = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(&suffix))
            .is_some_and(|id| id_problem(id).is_none());
        if !is_part || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        std::fs::remove_file(&path).map_err(|e| {
            format!(
                "cannot remove the stale partial copy {}: {e}",
                path.display()
            )
        })?;
        removed.push(path);
    }
    Ok(removed)
}

impl TargetDisks {
    /// Checks the list, removes the partial copies an earlier target of the VM `tag` left
    /// in `dir`, then creates one sparse file of the announced size per disk under its
    /// partial name ([`part_path`]), refusing a disk whose final name exists: nothing is
    /// overwritten. On a failure the files made so far are removed.
    pub fn create(dir: &Path, tag: &str, list: &[DiskInfo]) -> Result<Self, String> {
        check_list(list)?;
        if let Some(p) = tag_problem(tag) {
            return Err(p);
        }
        let meta = std::fs::metadata(dir)
            .map_err(|e| format!("the disk directory {} is not usable: {e}", dir.display()))?;
        if !meta.is_dir() {
            return Err(format!(
                "the disk directory {} is not a directory",
                dir.display()
            ));
        }
        remove_stale_parts(dir, tag)?;
        let exists = |path: &Path| {
            format!(
                "{} exists already; the target does not overwrite a disk (remove it, or give another --disk-dir)",
                path.display()
            )
        };
        if let Some(d) = list
            .iter()
            .find(|d| std::fs::symlink_metadata(target_path(dir, &d.id)).is_ok())
        {
            return Err(exists(&target_path(dir, &d.id)));
        }
        let mut made = Self {
            disks: Vec::new(),
            kept: false,
        };
        for d in list {
            let path = target_path(dir, &d.id);
            let part = part_path(dir, &d.id, tag);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&part)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        exists(&part)
                    } else {
                        format!("cannot create {} for disk {}: {e}", part.display(), d.id)
                    }
                })?;
            // Pushed before it is sized, so a failure below removes it too.
            made.disks.push(TargetDisk {
                id: d.id.clone(),
                path: path.clone(),
                part: part.clone(),
                committed: false,
                file,
                size: d.size,
                hashes: BlockHashes::new(blocks_of(d.size)),
                pass_bytes: 0,
            });
            let last = made.disks.last().expect("just pushed");
            last.file
                .set_len(d.size)
                .map_err(|e| format!("cannot size {} to {} bytes: {e}", part.display(), d.size))?;
        }
        Ok(made)
    }

    /// `(id, path)` of every disk, in the announced order: the final names, which the
    /// files have once [`commit`](Self::commit)ted.
    pub fn paths(&self) -> Vec<(String, PathBuf)> {
        self.disks
            .iter()
            .map(|d| (d.id.clone(), d.path.clone()))
            .collect()
    }

    /// Writes one `DiskBlocks` range into disk `disk`: `data`, or zeros (`None`) over
    /// `len` bytes at `offset`, which must be whole blocks of the disk (the disk's last
    /// block may be short). Checked before anything is written; nothing outside the disk's
    /// file is touched. Each block is then read back from the file and hashed.
    pub fn write(
        &mut self,
        disk: u32,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<(), String> {
        let n = self.disks.len();
        let d = self.disks.get_mut(disk as usize).ok_or_else(|| {
            format!("the source sent blocks of disk {disk}, but it announced {n} disks")
        })?;
        let end = offset.checked_add(len).filter(|&e| e <= d.size);
        if end.is_none()
            || len == 0
            || !offset.is_multiple_of(BLOCK_SIZE)
            || !(len.is_multiple_of(BLOCK_SIZE) || end == Some(d.size))
            || len > MAX_RUN_BLOCKS * BLOCK_SIZE
        {
            return Err(format!(
                "the source sent {len} bytes at offset {offset} of disk {} ({} bytes), which is not a run of whole {BLOCK_SIZE}-byte blocks inside it",
                d.id, d.size
            ));
        }
        if let Some(data) = data {
            if data.len() as u64 != len {
                return Err(format!(
                    "the source sent {} data bytes for a {len}-byte range of disk {}",
                    data.len(),
                    d.id
                ));
            }
            d.file
                .write_all_at(data, offset)
                .map_err(|e| format!("cannot write disk {} ({}): {e}", d.id, d.part.display()))?;
        } else {
            zero_range(&d.file, offset, len)
                .map_err(|e| format!("cannot zero disk {} ({}): {e}", d.id, d.part.display()))?;
        }
        // Hash what the file now holds, not what arrived.
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        let mut at = offset;
        while at < offset + len {
            let b = at / BLOCK_SIZE;
            let l = block_len(d.size, b) as usize;
            d.file.read_exact_at(&mut buf[..l], at).map_err(|e| {
                format!("cannot read back disk {} ({}): {e}", d.id, d.part.display())
            })?;
            d.hashes.record(b as usize, &buf[..l]);
            at += l as u64;
        }
        d.pass_bytes += len;
        Ok(())
    }

    /// Bytes received this pass (all disks), and starts counting the next pass.
    pub fn end_pass(&mut self) -> u64 {
        self.disks
            .iter_mut()
            .map(|d| std::mem::take(&mut d.pass_bytes))
            .sum()
    }

    /// One digest per disk of what its file holds, in the announced order.
    pub fn digests(&self) -> Vec<[u8; 16]> {
        self.disks.iter().map(|d| d.hashes.digest()).collect()
    }

    /// The id of disk `i`.
    pub fn id(&self, i: usize) -> &str {
        self.disks.get(i).map_or("?", |d| d.id.as_str())
    }

    /// The copies are complete and verified: flushes every file to stable storage
    /// (`fdatasync`), gives it its final name (never replacing a file that appeared there
    /// meanwhile) and flushes the directory, so that the names survive a crash too. The
    /// target calls this when the VM state arrives (every block is in by then), before its
    /// devices open the files and before it acknowledges anything of the switch-over, so
    /// the source relinquishes the VM only once its disks are durable here.
    pub fn commit(&mut self) -> Result<(), String> {
        for d in &self.disks {
            d.file
                .sync_data()
                .map_err(|e| format!("cannot flush disk {} ({}): {e}", d.id, d.part.display()))?;
        }
        let mut dirs = Vec::new();
        for d in &mut self.disks {
            if d.committed {
                continue;
            }
            rename_noreplace(&d.part, &d.path).map_err(|e| {
                format!(
                    "cannot rename the copy of disk {} from {} to {}: {e}",
                    d.id,
                    d.part.display(),
                    d.path.display()
                )
            })?;
            d.committed = true;
            if let Some(dir) = d.path.parent() {
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
        for dir in dirs {
            File::open(dir)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("cannot flush the disk directory {}: {e}", dir.display()))?;
        }
        Ok(())
    }

    /// The migration succeeded: the files stay (the VM runs on them now).
    pub fn keep(mut self) -> Vec<(String, PathBuf)> {
        self.kept = true;
        self.paths()
    }
}

impl Drop for TargetDisks {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for d in &self.disks {
            // A committed file was renamed by us onto a name that was free: ours to remove.
            let _ = std::fs::remove_file(if d.committed { &d.path } else { &d.part });
        }
    }
}

/// Renames `from` to `to`, failing if `to` exists (`renameat2` with `RENAME_NOREPLACE`).
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both are NUL-terminated paths that live across the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Zeros `len` bytes at `offset`: a hole where the file system can punch one, else
/// written zeros.
fn zero_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an open descriptor with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; len as usize];
    file.write_all_at(&zeros, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ray-disk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn lists_are_checked_before_any_file_is_made() {
        let ok = |id: &str, size| DiskInfo {
            id: id.into(),
            size,
        };
        assert!(check_list(&[ok("disk0", 1 << 20)]).is_ok());
        for (list, want) in [
            (vec![], "0 disks"),
            (vec![ok("../etc", 512)], "characters other than"),
            (vec![ok("a/b", 512)], "characters other than"),
            (vec![ok("", 512)], "0 characters"),
            (vec![ok("d", 512), ok("d", 512)], "announced twice"),
            (vec![ok("d", 513)], "513 bytes"),
            (vec![ok("d", 0)], "0 bytes"),
            (vec![ok("d", MAX_DISK_SIZE + 512)], "bytes"),
        ] {
            let e = check_list(&list).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let dir = tmp("list");
        assert!(TargetDisks::create(&dir, "t", &[ok("x/y", 512)]).is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing made");
        let e = TargetDisks::create(&dir.join("missing"), "t", &[ok("d", 512)]).unwrap_err();
        assert!(e.contains("not usable"), "{e}");
    }

    #[test]
    fn target_files_are_sparse_partial_until_committed_and_go_unless_kept() {
        let dir = tmp("files");
        let list = [
            DiskInfo {
                id: "a".into(),
                size: 256 << 20,
            },
            DiskInfo {
                id: "b".into(),
                size: 3 * BLOCK_SIZE + 512,
            },
        ];
        let (a, b) = (target_path(&dir, "a"), target_path(&dir, "b"));
        let disks = TargetDisks::create(&dir, "vm1", &list).unwrap();
        // Written under the partial name: nothing at the final one yet.
        let part = part_path(&dir, "a", "vm1");
        assert_eq!(part, dir.join(".a.img.vm1.part"));
        let meta = std::fs::metadata(&part).unwrap();
        assert_eq!(meta.len(), 256 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() < 64, "sparse: {} blocks", meta.blocks());
        assert!(!a.exists() && !b.exists());
        assert_eq!(disks.paths()[0], ("a".to_string(), a.clone()));
        drop(disks);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "removed");

        // Committed: the final names; kept, they stay.
        let mut disks = TargetDisks::create(&dir, "vm1", &list).unwrap();
        disks
            .write(1, 0, BLOCK_SIZE, Some(&vec![7u8; BLOCK_SIZE as usize]))
            .unwrap();
        disks.commit().unwrap();
        assert!(a.exists() && !part.exists());
        assert_eq!(
            std::fs::read(&b).unwrap()[..BLOCK_SIZE as usize],
            vec![7u8; BLOCK_SIZE as usize]
        );
        let kept = disks.keep();
        assert_eq!(kept[1], ("b".to_string(), b.clone()));
        assert!(a.exists() && b.exists());
        // A second migration into the same directory is refused, and the refusal
        // removes nothing.
        let e = TargetDisks::create(&dir, "vm2", &list[..1]).unwrap_err();
        assert!(e.contains("a.img exists already"), "{e}");
        // A file in the way of the second disk: nothing is made.
        std::fs::remove_file(&a).unwrap();
        let e = TargetDisks::create(&dir, "vm1", &list).unwrap_err();
        assert!(e.contains("b.img exists already"), "{e}");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("b.img")]);
        std::fs::remove_file(&b).unwrap();

        // A file that appears at the final name during the copy is not replaced: the
        // commit fails, and dropping removes only our partial file.
        let mut disks = TargetDisks::create(&dir, "vm1", &list[..1]).unwrap();
        std::fs::write(&a, b"someone's disk").unwrap();
        let e = disks.commit().unwrap_err();
        assert!(e.contains("cannot rename"), "{e}");
        drop(disks);
        assert_eq!(std::fs::read(&a).unwrap(), b"someone's disk");
        assert!(!part.exists());
    }

    #[test]
    fn stale_partial_copies_of_the_same_vm_go_when_a_copy_starts() {
        let dir = tmp("stale");
        let mine = part_path(&dir, "a", "vm1");
        let theirs = part_path(&dir, "a", "vm2");
        for p in [
            &mine,
            &theirs,
            &dir.join("a.img"),
            &dir.join(".notes.vm1.part"),
        ] {
            std::fs::write(p, b"x").unwrap();
        }
        assert_eq!(remove_stale_parts(&dir, "vm1").unwrap(), vec![mine.clone()]);
        assert!(
            theirs.exists() && dir.join("a.img").exists() && dir.join(".notes.vm1.part").exists()
        );
        std::fs::write(&mine, b"x").unwrap();
        std::fs::remove_file(dir.join("a.img")).unwrap();
        // Starting a copy removes them too (a killed target of this VM left it).
        let disks = TargetDisks::create(
            &dir,
            "vm1",
            &[DiskInfo {
                id: "b".into(),
                size: 512,
            }],
        )
        .unwrap();
        assert!(!mine.exists() && theirs.exists());
        drop(disks);
        for bad in ["", "a/b", "..", &"x".repeat(65)] {
            let e = remove_stale_parts(&dir, bad).unwrap_err();
            assert!(e.contains("cannot name its partial disk files"), "{e}");
            assert!(TargetDisks::create(
                &dir,
                bad,
                &[DiskInfo {
                    id: "b".into(),
                    size: 512
                }]
            )
            .is_err());
        }
    }

    #[test]
    fn writes_outside_the_disk_or_not_whole_blocks_are_refused_and_write_nothing() {
        let dir = tmp("ranges");
        let size = 3 * BLOCK_SIZE + 512;
        let mut disks = TargetDisks::create(
            &dir,
            "t",
            &[DiskInfo {
                id: "d".into(),
                size,
            }],
        )
        .unwrap();
        let bs = BLOCK_SIZE;
        let block = vec![9u8; bs as usize];
        for (disk, offset, len, want) in [
            (1, 0, bs, "announced 1 disks"),
            (0, 3 * bs, bs, "not a run of whole"), // past the end
            (0, 512, bs, "not a run of whole"),    // not aligned
            (0, 0, 512, "not a run of whole"),     // not a whole block
            (0, u64::MAX - 511, bs, "not a run of whole"),
            (0, 0, 0, "not a run of whole"),
        ] {
            let e = disks.write(disk, offset, len, Some(&block[..len.min(bs) as usize]));
            assert!(e.unwrap_err().contains(want), "{disk} {offset} {len}");
        }
        let e = disks.write(0, 0, bs, Some(&block[..100])).unwrap_err();
        assert!(e.contains("100 data bytes"), "{e}");
        let path = part_path(&dir, "d", "t");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size, "not grown");
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
        // The short last block, then zeros over a written block.
        disks.write(0, 3 * bs, 512, Some(&[7u8; 512])).unwrap();
        disks.write(0, bs, bs, Some(&block)).unwrap();
        disks.write(0, bs, bs, None).unwrap();
        assert_eq!(disks.end_pass(), 512 + 2 * bs);
        let data = std::fs::read(&path).unwrap();
        assert!(data[..3 * bs as usize].iter().all(|&b| b == 0));
        assert_eq!(&data[3 * bs as usize..], &[7u8; 512][..]);
        // The digest is of what the file holds: the same as a source's that sent it.
        let mut src = BlockHashes::new(blocks_of(size));
        src.record(3, &[7u8; 512]);
        src.record(1, &block);
        src.record(1, &vec![0u8; bs as usize]);
        assert_eq!(disks.digests(), vec![src.digest()]);
        src.record(0, &block);
        assert_ne!(disks.digests(), vec![src.digest()]);
    }

    #[test]
    fn data_blocks_skip_holes() {
        let dir = tmp("holes");
        let path = dir.join("sparse.img");
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(1 << 30).unwrap();
        f.write_all_at(&[1u8; 4096], 5 * BLOCK_SIZE + 100).unwrap();
        f.write_all_at(&[2u8; 4096], (1 << 30) - 4096).unwrap();
        struct Off;
        impl BlockTracker for Off {
            fn start(&self) {}
            fn take(&self) -> PageBitmap {
                PageBitmap::new(0)
            }
            fn stop(&self) {}
        }
        let d = SourceDisk::open("s", &path, 1 << 30, Arc::new(Off)).unwrap();
        let set = d.data_blocks();
        let blocks: Vec<usize> = set.iter().collect();
        // File systems allocate in their own units (4 KiB here): the written blocks,
        // at most a neighbour, never the whole 1 GiB.
        assert!(
            blocks.contains(&5) && blocks.contains(&(blocks_of(1 << 30) - 1)),
            "{blocks:?}"
        );
        assert!(blocks.len() <= 4, "{blocks:?}");
    }
}
