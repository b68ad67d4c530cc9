//! Disks copied with a migration (`copy_disks`): the source hands each disk's file and
//! its virtio-blk dirty-block tracker to the migration; the target's VM takes the copies'
//! paths instead of the source's.
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ray_api::vmm::VmConfig;
use ray_devices::virtio::blk::dirty::{self, DirtyBlocks};
use ray_memory::PageBitmap;
use ray_migration::{BlockTracker, SourceDisk};

// The device tracks in the blocks the protocol sends.
const _: () = assert!(dirty::BLOCK_SIZE == ray_migration::disk::BLOCK_SIZE);

/// The trackers of this VMM's disks by id, as the devices were built (one VM per VMM; a
/// rebuilt device replaces its entry).
static TRACKERS: Mutex<Vec<(String, Arc<DirtyBlocks>)>> = Mutex::new(Vec::new());

/// Called as a disk's device is built.
pub fn disk_built(id: &str, tracker: Arc<DirtyBlocks>) {
    let mut t = TRACKERS.lock().unwrap_or_else(|p| p.into_inner());
    t.retain(|(i, _)| i != id);
    t.push((id.to_string(), tracker));
}

fn tracker_of(id: &str) -> Option<Arc<DirtyBlocks>> {
    TRACKERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(i, _)| i == id)
        .map(|(_, t)| t.clone())
}

/// The device's tracker as the migration sees it.
struct Tracker(Arc<DirtyBlocks>);

impl BlockTracker for Tracker {
    fn start(&self) {
        self.0.start();
    }
    fn take(&self) -> PageBitmap {
        self.0.take()
    }
    fn stop(&self) {
        self.0.stop();
    }
}

/// Every disk of `config`, opened for reading with its device's tracker: what a source
/// that copies its disks sends. Refused, naming the disk, when one cannot be read.
pub fn source_disks(config: &VmConfig) -> Result<Vec<Arc<SourceDisk>>, String> {
    config
        .devices
        .disks
        .iter()
        .map(|d| {
            let tracker = tracker_of(&d.id).ok_or_else(|| {
                format!("disk {} has no running device to track its writes", d.id)
            })?;
            let path = PathBuf::from(&d.path);
            let tracker: Arc<Tracker> = Arc::new(Tracker(tracker));
            let size = tracker.0.disk_size();
            let file = crate::jailed::open_disk(&path, false, false)
                .map_err(|e| format!("cannot open disk {} ({}): {e}", d.id, d.path))?;
            SourceDisk::on_file(&d.id, file, size, tracker).map(Arc::new)
        })
        .collect()
}

/// Target: points the disks of `config` that were copied (`copied`: id and file made
/// here) at their copies. A copied disk the VM does not have is refused.
pub fn use_copies(config: &mut VmConfig, copied: &[(String, PathBuf)]) -> Result<(), String> {
    for (id, path) in copied {
        let disk = config
            .devices
            .disks
            .iter_mut()
            .find(|d| &d.id == id)
            .ok_or_else(|| {
                format!("the source copied disk {id}, which its VM's configuration does not have")
            })?;
        disk.path = path.display().to_string();
    }
    Ok(())
}
