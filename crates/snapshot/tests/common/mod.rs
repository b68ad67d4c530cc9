//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ray_snapshot::{DirtyBitmap, MemoryLayout, NewSnapshot, OwnedMemory};

pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "ray-snapshot-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64: deterministic test data without a rand dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Two regions with a hole between them, like x86 RAM around the 32-bit PCI hole.
pub fn layout() -> MemoryLayout {
    MemoryLayout::new(&[(0, 1 << 20), (4 << 20, 2 << 20)]).unwrap()
}

/// Memory for `layout` where about `fill` of 16 pages hold random data, the rest zero.
pub fn memory(layout: &MemoryLayout, rng: &mut Rng, fill: u64) -> OwnedMemory {
    let mut m = OwnedMemory::zeroed(layout).unwrap();
    for (_, r) in m.regions.iter_mut() {
        for page in r.chunks_exact_mut(4096) {
            if rng.below(16) < fill {
                for b in page.chunks_exact_mut(8) {
                    b.copy_from_slice(&rng.next().to_le_bytes());
                }
            }
        }
    }
    m
}

/// Writes `n` random pages of `m` (a quarter of them zeroed), marking them in a bitmap.
pub fn dirty_some(
    m: &mut OwnedMemory,
    layout: &MemoryLayout,
    rng: &mut Rng,
    n: u64,
) -> DirtyBitmap {
    let mut d = DirtyBitmap::clean(layout);
    for _ in 0..n {
        let ri = rng.below(m.regions.len() as u64) as usize;
        let (gpa, r) = &mut m.regions[ri];
        let pages = r.len() as u64 / 4096;
        let p = rng.below(pages);
        let page = &mut r[(p * 4096) as usize..((p + 1) * 4096) as usize];
        if rng.below(4) == 0 {
            page.fill(0);
        } else {
            let off = rng.below(4096) as usize;
            page[off] = page[off].wrapping_add(1 + (rng.below(200) as u8));
        }
        assert!(d.mark(layout, *gpa + p * 4096, 4096));
    }
    d
}

pub fn meta(id: &str) -> NewSnapshot {
    NewSnapshot {
        id: id.to_string(),
        vm_id: "vm1".into(),
        cpu: "cpu-abc".into(),
        vm_config: serde_json::json!({"vcpus": 2, "memory_mib": 6}),
    }
}
