//! What the fuzz targets share.
use std::path::PathBuf;

/// A scratch file of this process named after `what` (on tmpfs when there is one): targets
/// that feed a file-reading parser write the input there.
pub fn scratch_file(what: &str) -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("ray-fuzz-{what}-{}", std::process::id()))
}
