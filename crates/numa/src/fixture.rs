//! The sysfs captures of real multi-node kernels kept as test data in `tests/fixtures`
//! (see its README), unpacked for tests of this crate and of the crates that use it.
use std::path::{Path, PathBuf};
use std::process::Command;

/// The 2-node capture: CPUs 0-1 and 2-3, 1 GiB each, distance 21.
pub const TWO_NODES: &str = "2node-sys-devices-system-node.tgz";
/// The 3-node capture: as [`TWO_NODES`] plus node 2 with memory and no CPUs.
pub const THREE_NODES_ONE_CPULESS: &str = "3node-cpuless-sys-devices-system-node.tgz";

/// Unpacks capture `name` into a fresh directory named after `tag` (one per test, so tests
/// running at once do not share one); returns the sysfs root inside it.
pub fn unpack(name: &str, tag: &str) -> std::io::Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let dir = std::env::temp_dir().join(format!("ray-numa-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(&src)
        .arg("-C")
        .arg(&dir)
        .status()?;
    if !st.success() {
        return Err(std::io::Error::other(format!(
            "tar -xzf {} failed: {st}",
            src.display()
        )));
    }
    Ok(dir.join("sys"))
}
