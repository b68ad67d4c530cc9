//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ray_snapshot::{DirtyBitmap, GuestMemory, MemoryLayout, NewSnapshot, OwnedMemory};

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
    let m = OwnedMemory::zeroed(layout).unwrap();
    let mut page = [0u8; 4096];
    for r in &layout.regions {
        for p in 0..r.len / 4096 {
            if rng.below(16) < fill {
                for b in page.chunks_exact_mut(8) {
                    b.copy_from_slice(&rng.next().to_le_bytes());
                }
                m.write(r.gpa + p * 4096, &page).unwrap();
            }
        }
    }
    m
}

/// Whether two memories have the same layout and the same bytes.
pub fn same(a: &OwnedMemory, b: &OwnedMemory) -> bool {
    a.layout() == b.layout() && a.to_vec() == b.to_vec()
}

/// A copy of `m`.
pub fn copy(m: &OwnedMemory) -> OwnedMemory {
    OwnedMemory::copy_of(m).unwrap()
}

/// Writes `n` random pages of `m` (a quarter of them zeroed), marking them in a bitmap.
pub fn dirty_some(m: &OwnedMemory, layout: &MemoryLayout, rng: &mut Rng, n: u64) -> DirtyBitmap {
    let mut d = DirtyBitmap::clean(layout);
    for _ in 0..n {
        let ri = rng.below(m.layout().regions.len() as u64) as usize;
        let r = m.layout().regions[ri];
        let pages = r.len / 4096;
        let p = rng.below(pages);
        let gpa = r.gpa + p * 4096;
        if rng.below(4) == 0 {
            m.write_zeros(gpa, 4096).unwrap();
        } else {
            let off = rng.below(4096);
            let mut b = [0u8];
            m.read(gpa + off, &mut b).unwrap();
            b[0] = b[0].wrapping_add(1 + (rng.below(200) as u8));
            m.write(gpa + off, &b).unwrap();
        }
        assert!(d.mark(layout, gpa, 4096));
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
