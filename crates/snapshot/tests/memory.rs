//! What snapshots rely on from ray-memory's vocabulary: layout checks that name the fault
//! (they surface in snapshot errors), KVM's dirty-log word format, zero detection, and the
//! manifest's on-disk shape of a layout.
use ray_snapshot::{DirtyBitmap, MemoryLayout, Region};

#[test]
fn layout_checks() {
    assert!(MemoryLayout::new(&[(0, 0x1000), (0x10000, 0x2000)]).is_ok());
    assert!(MemoryLayout::new(&[(0, 0x1001)])
        .unwrap_err()
        .to_string()
        .contains("aligned"));
    assert!(MemoryLayout::new(&[(0x2000, 0x1000), (0, 0x1000)])
        .unwrap_err()
        .to_string()
        .contains("overlaps"));
    assert!(MemoryLayout::new(&[(u64::MAX - 0xfff, 0x2000)])
        .unwrap_err()
        .to_string()
        .contains("overflows"));
}

#[test]
fn dirty_bitmap_marks_pages_like_kvm() {
    let layout = MemoryLayout::new(&[(0, 0x10000), (0x100000, 0x100000)]).unwrap();
    let mut d = DirtyBitmap::clean(&layout);
    assert!(d.mark(&layout, 0x100000 + 65 * 4096 + 5, 4096));
    assert!(d.is_dirty(1, 65) && d.is_dirty(1, 66) && !d.is_dirty(1, 64));
    assert_eq!(d.regions[1].words()[1], 0b110);
    assert!(!d.mark(&layout, 0x20000, 1));
    assert_eq!(d.count(), 2);
    assert!(d.check(&layout).is_ok());
}

#[test]
fn zero_detection() {
    let mut b = vec![0u8; 4096 + 3];
    assert!(ray_memory::is_zero(&b));
    b[4098] = 1;
    assert!(!ray_memory::is_zero(&b));
    b[4098] = 0;
    b[17] = 1;
    assert!(!ray_memory::is_zero(&b));
}

#[test]
fn a_layout_serializes_as_manifests_have_always_stored_it() {
    let layout = MemoryLayout::new(&[(0, 0x1000), (0x100000, 0x2000)]).unwrap();
    let json = serde_json::to_string(&layout).unwrap();
    assert_eq!(
        json,
        r#"{"regions":[{"gpa":0,"len":4096},{"gpa":1048576,"len":8192}]}"#
    );
    let back: MemoryLayout = serde_json::from_str(&json).unwrap();
    assert_eq!(back, layout);
    assert_eq!(
        back.regions[1],
        Region {
            gpa: 0x100000,
            len: 0x2000
        }
    );
    // Unknown fields are refused, as before.
    assert!(
        serde_json::from_str::<MemoryLayout>(r#"{"regions":[{"gpa":0,"len":4096,"x":1}]}"#)
            .is_err()
    );
}
