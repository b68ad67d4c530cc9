//! virtio-blk (§5.2) on a raw image file or a block device: read, write, flush
//! (fdatasync), discard and write-zeroes (hole punching / zero ranges), GET_ID, read-only
//! disks, several queues, and per-disk rate limits.
//!
//! Requests are checked on the notifier thread ([`request::parse`]) and done by the disk's
//! I/O engine ([`io`]: a worker pool, or an io_uring in [`uring`]); a malformed request
//! fails alone with an error status and a rate-limited log line, while ring faults
//! (loops, addresses outside guest memory) are the queue's and put the device in
//! NEEDS_RESET.
pub mod dirty;
pub mod io;
pub mod request;
pub mod uring;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ray_memory::GuestMemory;

use self::dirty::DirtyBlocks;
use self::io::{Backend, Engine, Job};
use self::request::{Limits, Op, Refused, ID_BYTES, SECTOR, S_OK};
use super::queue::Chain;
use super::{Completion, DeviceContext, VirtioDevice, WarnLimit};
use crate::rate::RateLimit;

pub const DEVICE_TYPE_BLOCK: u16 = 2;
pub const QUEUE_SIZE: u16 = 256;
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
/// Advertised limits: 1 MiB per segment, 126 segments (queue size - header - status would
/// allow more; this keeps one request's I/O vector small), 4 GiB... of ranges.
pub const SIZE_MAX: u32 = 1 << 20;
pub const SEG_MAX: u32 = 126;
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;
pub const MAX_RANGES: u32 = 16;
const CONFIG_LEN: usize = 60;
/// Pending requests from which a queue takes new ones at completions instead of asking
/// for kicks: deeper than a sequential writer's few 1 MiB requests (which would wait a
/// whole request for their turn), shallow enough for a queue-depth-32 random reader.
pub const HOLD_KICKS_AT: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {path} is neither a regular file nor a block device")]
    Kind { path: PathBuf },
    #[error("disk {path} has {size} bytes, not a whole number of 512-byte sectors")]
    Size { path: PathBuf, size: u64 },
    #[error(
        "disk {path}: engine=uring, but this host gives no io_uring ({source}); use engine=pool"
    )]
    Uring {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One disk as configured.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// O_DIRECT: bypass the host's page cache.
    pub direct: bool,
    /// The GET_ID answer (at most 20 bytes are sent).
    pub serial: String,
    pub queues: u16,
    pub rate: RateLimit,
    /// How requests reach the file.
    pub engine: Engine,
}

/// The size in bytes of an open disk: a file's length or a block device's size.
pub fn disk_size(file: &File, path: &Path) -> Result<u64, BlockError> {
    let meta = file.metadata().map_err(|source| BlockError::Open {
        path: path.into(),
        source,
    })?;
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok(meta.len());
    }
    if !kind.is_block_device() {
        return Err(BlockError::Kind { path: path.into() });
    }
    use std::io::Seek;
    let mut f = file;
    f.seek(std::io::SeekFrom::End(0))
        .map_err(|source| BlockError::Open {
            path: path.into(),
            source,
        })
}

pub struct Block {
    config: BlockConfig,
    file: Arc<File>,
    size: u64,
    limits: Limits,
    queue_sizes: Vec<u16>,
    workers: Option<Backend>,
    warn: WarnLimit,
    dirty: Arc<DirtyBlocks>,
}

impl Block {
    pub fn open(config: BlockConfig) -> Result<Self, BlockError> {
        let path = &config.path;
        let file = OpenOptions::new()
            .read(true)
            .write(!config.readonly)
            .custom_flags(if config.direct { libc::O_DIRECT } else { 0 })
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        Self::with_file(config, file)
    }

    /// The disk of `config` on `file`, opened elsewhere as `config` says (read-write
    /// unless read-only, `O_DIRECT` if direct): a jailed VMM's keeper opens its disks.
    pub fn with_file(config: BlockConfig, file: File) -> Result<Self, BlockError> {
        let path = &config.path;
        if config.engine == Engine::Uring {
            uring::probe().map_err(|source| BlockError::Uring {
                path: path.clone(),
                source,
            })?;
        }
        let size = disk_size(&file, path)?;
        if !size.is_multiple_of(SECTOR) {
            return Err(BlockError::Size {
                path: path.clone(),
                size,
            });
        }
        let limits = Limits {
            capacity_sectors: size / SECTOR,
            seg_max: SEG_MAX,
            size_max: SIZE_MAX,
            max_range_sectors: MAX_RANGE_SECTORS,
            max_ranges: MAX_RANGES,
            readonly: config.readonly,
        };
        let queue_sizes = vec![QUEUE_SIZE; usize::from(config.queues.max(1))];
        Ok(Self {
            config,
            file: Arc::new(file),
            size,
            limits,
            queue_sizes,
            workers: None,
            warn: WarnLimit::default(),
            dirty: Arc::new(DirtyBlocks::new(size)),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The disk's dirty-block tracker (off until a migration that copies the disk starts it).
    pub fn dirty_blocks(&self) -> Arc<DirtyBlocks> {
        self.dirty.clone()
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.limits.capacity_sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        c[34..36].copy_from_slice(&(self.queue_sizes.len() as u16).to_le_bytes());
        c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_RANGES.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_RANGES.to_le_bytes());
        c[56] = 1;
        c
    }

    fn get_id(&self, segs: &[request::Segment], mem: &(dyn GuestMemory + Send + Sync)) -> u32 {
        let id = self.config.serial.as_bytes();
        let mut id20 = [0u8; ID_BYTES as usize];
        let n = id.len().min(id20.len());
        id20[..n].copy_from_slice(&id[..n]);
        let mut written = 0usize;
        for s in segs {
            let take = (s.len as usize).min(id20.len() - written);
            if take == 0 {
                break;
            }
            if mem.write(s.addr, &id20[written..written + take]).is_err() {
                break;
            }
            written += take;
        }
        written as u32
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f =
            F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_MQ | F_DISCARD | F_WRITE_ZEROES;
        if self.config.readonly {
            f |= F_RO;
        }
        f
    }

    fn queue_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| c.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn config_len(&self) -> u64 {
        CONFIG_LEN as u64
    }

    fn process(
        &mut self,
        queue: usize,
        chain: &Chain,
        memory: &(dyn GuestMemory + Send + Sync),
    ) -> Completion {
        let request = match request::parse(chain, memory, &self.limits) {
            Ok(r) => r,
            Err(Refused::NoStatus(why)) => return Completion::Failed(why),
            Err(Refused::Status { status, code, why }) => {
                self.warn.warn(
                    "virtio-blk",
                    format_args!("queue {queue}: request {} refused: {why}", chain.head),
                );
                return match memory.write(status, &[code]) {
                    Ok(()) => Completion::Done(1),
                    Err(e) => Completion::Failed(e.to_string()),
                };
            }
        };
        if let Op::GetId(segs) = &request.op {
            let n = self.get_id(segs, memory);
            return match memory.write(request.status, &[S_OK]) {
                Ok(()) => Completion::Done(n + 1),
                Err(e) => Completion::Failed(e.to_string()),
            };
        }
        let Some(workers) = &self.workers else {
            // Not activated (a test driving the model alone): do it here.
            return Completion::Done(io::execute(&request, &self.file, memory, &self.dirty));
        };
        let job = Job {
            queue: queue as u16,
            head: chain.head,
            request,
        };
        match workers.submit(job) {
            Ok(()) => Completion::Pending,
            Err(_) => Completion::Failed("the disk's I/O workers are gone".into()),
        }
    }

    /// With an engine running (its threads complete requests without holding the
    /// device), a queue with [`HOLD_KICKS_AT`] requests or more at the disk takes new
    /// ones as requests complete: no kick (VM exit) per batch a deep-queue driver adds.
    fn hold_kicks_at(&self) -> usize {
        if self.workers.is_some() {
            HOLD_KICKS_AT
        } else {
            0
        }
    }

    fn activate(&mut self, context: DeviceContext) {
        match Backend::start(
            self.config.engine,
            "blk",
            self.file.clone(),
            context,
            self.config.rate,
            self.dirty.clone(),
        ) {
            Ok(w) => self.workers = Some(w),
            Err(e) => tracing::error!(
                "virtio-blk {}: cannot start its {} I/O engine ({e}); requests are served on the notifier thread",
                self.config.path.display(),
                self.config.engine.name()
            ),
        }
    }

    fn save_device(&self) -> serde_json::Value {
        serde_json::json!({ "size": self.size, "readonly": self.config.readonly })
    }

    fn check_device(&self, saved: &serde_json::Value) -> Result<(), String> {
        let size = saved.get("size").and_then(serde_json::Value::as_u64);
        if size != Some(self.size) {
            return Err(format!(
                "disk {} has {} bytes here but the saved VM's disk had {} (the same file must be \
                 reachable at the same path, with the same size)",
                self.config.path.display(),
                self.size,
                size.map_or("an unknown size".to_string(), |s| s.to_string())
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
