//! Property: any sequence of writes, checkpointed as a chain, restores exactly at every
//! checkpoint, and merging the chain gives the same memory.
mod common;

use common::{copy, same, TempDir};
use proptest::prelude::*;
use ray_snapshot::{
    CreateOptions, DirtyBitmap, GuestMemory, MemoryLayout, OwnedMemory, SnapshotStore,
};

/// A write to guest memory: region, page, byte offset, value; value 0 with `clear`
/// zeroes the whole page.
type Write = (usize, u64, usize, u8, bool);

fn layout() -> MemoryLayout {
    MemoryLayout::new(&[(0, 16 * 4096), (1 << 20, 24 * 4096)]).unwrap()
}

fn apply(mem: &OwnedMemory, layout: &MemoryLayout, writes: &[Write]) -> DirtyBitmap {
    let mut d = DirtyBitmap::clean(layout);
    for &(ri, page, off, val, clear) in writes {
        let r = layout.regions[ri % layout.regions.len()];
        let page_gpa = r.gpa + (page % r.pages()) * 4096;
        if clear {
            mem.write_zeros(page_gpa, 4096).unwrap();
        } else {
            mem.write(page_gpa + (off % 4096) as u64, &[val]).unwrap();
        }
        assert!(d.mark(layout, page_gpa, 1));
    }
    d
}

fn writes() -> impl Strategy<Value = Vec<Write>> {
    prop::collection::vec(
        (
            0usize..2,
            0u64..24,
            0usize..4096,
            any::<u8>(),
            prop::bool::weighted(0.2),
        ),
        0..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn chains_restore_exactly_and_merge_equals_chain(
        steps in prop::collection::vec(writes(), 1..5),
        compress in prop::collection::vec(any::<bool>(), 5),
    ) {
        let dir = TempDir::new("prop");
        let store = SnapshotStore::open(dir.path()).unwrap();
        let layout = layout();
        let mem = OwnedMemory::zeroed(&layout).unwrap();
        let mut expected = Vec::new();
        for (i, w) in steps.iter().enumerate() {
            let dirty = apply(&mem, &layout, w);
            let opts = CreateOptions { compress: compress[i] };
            let meta = common::meta(&format!("s{i}"));
            if i == 0 {
                store.create_full(&meta, b"", &mem, &opts).unwrap();
            } else {
                store
                    .create_incremental(&format!("s{}", i - 1), &meta, b"", &mem, &dirty, &opts)
                    .unwrap();
            }
            expected.push(copy(&mem));
        }
        for (i, want) in expected.iter().enumerate() {
            let plan = store.restore_plan(&format!("s{i}"), "cpu-abc").unwrap();
            prop_assert!(same(&plan.materialize_owned().unwrap(), want), "checkpoint s{}", i);
        }
        let last = expected.len() - 1;
        store.merge(&format!("s{last}"), "merged", &CreateOptions::default()).unwrap();
        let merged = store.restore_plan("merged", "cpu-abc").unwrap().materialize_owned().unwrap();
        prop_assert!(same(&merged, expected.last().unwrap()));
    }
}
