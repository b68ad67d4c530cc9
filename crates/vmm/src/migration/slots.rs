//! Host-wide migration slots: at most `limit` migrations run on a host at once.
use std::fs::File;
use std::path::Path;

/// One host-wide migration slot: an exclusive `flock` on one of `limit` files in the
/// runtime directory, held until dropped (or the process dies).
pub struct Slot(File);

impl Slot {
    /// The slot's locked file, to hand to a jailed VMM (the lock goes with the open file).
    pub fn file(&self) -> &File {
        &self.0
    }

    /// A slot whose locked file was handed over (by `ray`, for a jailed VMM).
    pub fn from_handed(file: File) -> Slot {
        Slot(file)
    }
}

pub fn acquire_slot(runtime: &Path, limit: u32) -> Result<Slot, String> {
    let dir = runtime.join("migration-slots");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for i in 0..limit {
        let path = dir.join(format!("slot-{i}"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        if ray_snapshot::try_lock(&f).map_err(|e| format!("cannot lock {}: {e}", path.display()))? {
            return Ok(Slot(f));
        }
    }
    Err(format!(
        "this host already runs {limit} migrations, its limit; retry when one finishes (or raise max_concurrent)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_concurrent_migrations_per_runtime_dir() {
        let dir = std::env::temp_dir().join(format!("ray-slots-{}", std::process::id()));
        let a = acquire_slot(&dir, 2).unwrap();
        let _b = acquire_slot(&dir, 2).unwrap();
        let e = acquire_slot(&dir, 2).err().unwrap();
        assert!(e.contains("already runs 2 migrations"), "{e}");
        drop(a);
        assert!(acquire_slot(&dir, 2).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
