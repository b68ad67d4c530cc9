//! The store end to end: full and incremental snapshots, chains, merge, damage, limits.
mod common;

use common::{dirty_some, layout, memory, meta, Rng, TempDir};
use ray_snapshot::manifest::{MEMORY_FILE, PAGEMAP_FILE, PAGES_FILE, PAGES_ZST_FILE, STATE_FILE};
use ray_snapshot::{
    allocated_bytes, CreateOptions, Kind, SnapshotState, SnapshotStore, StoreError,
};

const PLAIN: CreateOptions = CreateOptions { compress: false };
const ZSTD: CreateOptions = CreateOptions { compress: true };

#[test]
fn full_snapshot_is_sparse_and_round_trips() {
    let dir = TempDir::new("full");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let layout = layout();
    let mem = memory(&layout, &mut Rng(7), 2);
    let m = store
        .create_full(&meta("a"), b"vm state", &mem.as_source(), &PLAIN)
        .unwrap();
    assert_eq!(m.kind, Kind::Full);
    assert_eq!(m.state, SnapshotState::Ready);

    let plan = store.restore_plan("a", "cpu-abc").unwrap();
    assert_eq!(plan.state, b"vm state");
    assert_eq!(plan.phase, SnapshotState::RestoreComplete);
    let path = plan
        .mappable_memory()
        .expect("a full uncompressed snapshot maps")
        .to_path_buf();
    plan.verify_base_memory().unwrap();
    assert_eq!(plan.materialize_owned().unwrap(), mem);

    // The file is laid out by guest address: offset = gpa, through the hole.
    let file = std::fs::read(&path).unwrap();
    assert_eq!(file.len() as u64, 6 << 20);
    assert_eq!(&file[4 << 20..], &mem.regions[1].1[..]);
    assert!(file[1 << 20..4 << 20].iter().all(|b| *b == 0));
    // Zero pages are holes: about 2/16 of the 768 pages hold data.
    let nonzero = m.dirty_pages;
    assert!(nonzero > 40 && nonzero < 200, "{nonzero}");
    let alloc = allocated_bytes(&path).unwrap();
    assert!(
        alloc <= nonzero * 4096 + (64 << 10),
        "allocated {alloc} for {nonzero} pages"
    );
}

#[test]
fn three_deep_chain_rebuilds_every_checkpoint_and_merge_equals_chain() {
    for (opts, base_opts) in [(PLAIN, PLAIN), (ZSTD, ZSTD), (PLAIN, ZSTD), (ZSTD, PLAIN)] {
        let dir = TempDir::new("chain");
        let store = SnapshotStore::open(dir.path()).unwrap();
        let layout = layout();
        let mut rng = Rng(11);
        let mut mem = memory(&layout, &mut rng, 6);
        store
            .create_full(&meta("c0"), b"s0", &mem.as_source(), &base_opts)
            .unwrap();
        let mut expected = vec![mem.clone()];
        for i in 1..=3 {
            let dirty = dirty_some(&mut mem, &layout, &mut rng, 40);
            let id = format!("c{i}");
            let parent = format!("c{}", i - 1);
            let state = format!("s{i}");
            let m = store
                .create_incremental(
                    &parent,
                    &meta(&id),
                    state.as_bytes(),
                    &mem.as_source(),
                    &dirty,
                    &opts,
                )
                .unwrap();
            assert_eq!(m.kind, Kind::Incremental);
            assert_eq!(m.dirty_pages, dirty.count());
            expected.push(mem.clone());
        }
        for (i, want) in expected.iter().enumerate() {
            let plan = store.restore_plan(&format!("c{i}"), "cpu-abc").unwrap();
            assert_eq!(plan.overlays.len(), i);
            assert_eq!(plan.state, format!("s{i}").as_bytes());
            assert_eq!(&plan.materialize_owned().unwrap(), want, "checkpoint c{i}");
            // The mapped path: the base file's bytes, then the overlays on top.
            if let Some(path) = plan.mappable_memory() {
                let file = std::fs::read(path).unwrap();
                let mut got = want.clone();
                for (gpa, r) in got.regions.iter_mut() {
                    let len = r.len();
                    r.copy_from_slice(&file[*gpa as usize..*gpa as usize + len]);
                }
                plan.apply_overlays(&mut got.as_mut_slices()).unwrap();
                assert_eq!(&got, want);
            }
        }
        let merged = store.merge("c3", "flat", &PLAIN).unwrap();
        assert_eq!(merged.kind, Kind::Full);
        assert_eq!(merged.parent, None);
        let plan = store.restore_plan("flat", "cpu-abc").unwrap();
        assert_eq!(plan.state, b"s3");
        assert_eq!(&plan.materialize_owned().unwrap(), &expected[3]);

        let tree = store.list().unwrap();
        assert!(tree.broken.is_empty(), "{:?}", tree.broken);
        let ids: Vec<&str> = tree.roots.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["c0", "flat"]);
        assert_eq!(tree.roots[0].children[0].children[0].children[0].id, "c3");
        assert!(
            tree.to_string().contains("      c3 Incremental Ready"),
            "{tree}"
        );
    }
}

#[test]
fn incremental_size_is_close_to_dirtied_bytes() {
    let dir = TempDir::new("size");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let layout = layout();
    let mut rng = Rng(3);
    let mut mem = memory(&layout, &mut rng, 8);
    store
        .create_full(&meta("base"), b"", &mem.as_source(), &PLAIN)
        .unwrap();
    // Scattered single pages: the worst case for the page map (one run per page).
    let mut dirty = ray_snapshot::DirtyBitmap::clean(&layout);
    for p in (0..256u64).step_by(2) {
        let gpa = p * 4096;
        let page = &mut mem.regions[0].1[gpa as usize..gpa as usize + 4096];
        page[0] = page[0].wrapping_add(1) | 1;
        dirty.mark(&layout, gpa, 1);
    }
    let m = store
        .create_incremental("base", &meta("inc"), b"", &mem.as_source(), &dirty, &PLAIN)
        .unwrap();
    let dirtied = dirty.count() * 4096;
    let memory_files: u64 = [PAGEMAP_FILE, PAGES_FILE]
        .iter()
        .map(|f| m.files[*f].bytes)
        .sum();
    assert!(
        memory_files as f64 <= 1.1 * dirtied as f64,
        "{memory_files} bytes for {dirtied} dirtied"
    );
    let manifest = std::fs::metadata(store.dir("inc").join("manifest.json"))
        .unwrap()
        .len();
    let total: u64 = m.files.values().map(|f| f.bytes).sum::<u64>() + manifest;
    assert!(total as f64 <= 1.1 * dirtied as f64 + manifest as f64 + 64.0);
}

/// Flips one byte of `file` in snapshot `id` at `offset`.
fn flip(store: &SnapshotStore, id: &str, file: &str, offset: u64) {
    use std::os::unix::fs::FileExt;
    let path = store.dir(id).join(file);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).unwrap();
}

fn restore_all(store: &SnapshotStore, id: &str) -> Result<(), StoreError> {
    let plan = store.restore_plan(id, "cpu-abc")?;
    plan.verify_base_memory()?;
    plan.materialize_owned().map(|_| ())
}

#[test]
fn a_flipped_byte_in_any_file_is_a_clear_error() {
    let layout = layout();
    let cases: &[(&str, CreateOptions, &str, u64)] = &[
        ("full", PLAIN, STATE_FILE, 22),
        ("full", PLAIN, MEMORY_FILE, (4 << 20) + 100),
        ("full", PLAIN, MEMORY_FILE, (1 << 20) - 5),
        ("inc", PLAIN, PAGEMAP_FILE, 21),
        ("inc", PLAIN, PAGES_FILE, 5000),
        ("inc", ZSTD, PAGES_ZST_FILE, 200),
        ("inc", PLAIN, STATE_FILE, 0),
    ];
    for (which, opts, file, offset) in cases {
        let dir = TempDir::new("flip");
        let store = SnapshotStore::open(dir.path()).unwrap();
        let mut rng = Rng(5);
        let mut mem = memory(&layout, &mut rng, 16);
        store
            .create_full(&meta("full"), b"state0", &mem.as_source(), opts)
            .unwrap();
        let dirty = dirty_some(&mut mem, &layout, &mut rng, 30);
        store
            .create_incremental(
                "full",
                &meta("inc"),
                b"state1",
                &mem.as_source(),
                &dirty,
                opts,
            )
            .unwrap();
        flip(&store, which, file, *offset);
        // Restoring `inc` reads `full`'s memory but not its state file.
        let target = if *file == STATE_FILE { which } else { "inc" };
        let err = restore_all(&store, target)
            .expect_err(&format!("{which}/{file}@{offset}"))
            .to_string();
        assert!(err.contains(file), "{which}/{file}@{offset}: {err}");
        // `verify` finds it too and marks the snapshot damaged.
        let verr = store
            .verify(which)
            .expect_err(&format!("{which}/{file}@{offset}"))
            .to_string();
        assert!(verr.contains(file), "{verr}");
        assert_eq!(store.get(which).unwrap().state, SnapshotState::Error);
        assert!(store.restore_plan(which, "cpu-abc").is_err());
    }
}

#[test]
fn truncated_files_are_clear_errors() {
    let layout = layout();
    for (opts, file) in [
        (PLAIN, MEMORY_FILE),
        (ZSTD, PAGES_ZST_FILE),
        (PLAIN, STATE_FILE),
    ] {
        let dir = TempDir::new("trunc");
        let store = SnapshotStore::open(dir.path()).unwrap();
        let mem = memory(&layout, &mut Rng(9), 4);
        store
            .create_full(&meta("a"), b"state", &mem.as_source(), &opts)
            .unwrap();
        let path = store.dir("a").join(file);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let err = restore_all(&store, "a").unwrap_err().to_string();
        assert!(
            err.contains(file) && (err.contains("truncated") || err.contains("damaged")),
            "{err}"
        );
    }
}

#[test]
fn incompatible_version_or_cpu_is_refused() {
    let dir = TempDir::new("compat");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let mem = memory(&layout(), &mut Rng(1), 1);
    store
        .create_full(&meta("a"), b"", &mem.as_source(), &PLAIN)
        .unwrap();
    let err = store
        .restore_plan("a", "cpu-other")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cpu-abc") && err.contains("cpu-other"),
        "{err}"
    );

    let path = store.dir("a").join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"format_version\": 1", "\"format_version\": 7"),
    )
    .unwrap();
    let err = store.restore_plan("a", "cpu-abc").unwrap_err().to_string();
    assert!(
        err.contains("format version 7") && err.contains("restores version 1"),
        "{err}"
    );

    std::fs::write(&path, "{ not json").unwrap();
    let err = store.restore_plan("a", "cpu-abc").unwrap_err().to_string();
    assert!(err.contains("manifest.json is invalid"), "{err}");
    assert_eq!(store.list().unwrap().broken.len(), 1);
}

#[test]
fn delete_is_refused_while_children_depend_on_it() {
    let dir = TempDir::new("delete");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let layout = layout();
    let mut rng = Rng(2);
    let mut mem = memory(&layout, &mut rng, 2);
    store
        .create_full(&meta("a"), b"", &mem.as_source(), &PLAIN)
        .unwrap();
    let d = dirty_some(&mut mem, &layout, &mut rng, 3);
    store
        .create_incremental("a", &meta("b"), b"", &mem.as_source(), &d, &PLAIN)
        .unwrap();
    let err = store.delete("a").unwrap_err().to_string();
    assert!(
        err.contains("cannot delete snapshot a") && err.contains("\"b\""),
        "{err}"
    );
    store.delete("b").unwrap();
    store.delete("a").unwrap();
    assert!(store.list().unwrap().roots.is_empty());
    assert!(matches!(store.delete("a"), Err(StoreError::NotFound(_))));
}

#[test]
fn checkpoint_limit_per_vm() {
    let dir = TempDir::new("limit");
    let store = SnapshotStore::open(dir.path()).unwrap().with_max_per_vm(2);
    let mem = memory(&layout(), &mut Rng(4), 1);
    store
        .create_full(&meta("a"), b"", &mem.as_source(), &PLAIN)
        .unwrap();
    store
        .create_full(&meta("b"), b"", &mem.as_source(), &PLAIN)
        .unwrap();
    let err = store
        .create_full(&meta("c"), b"", &mem.as_source(), &PLAIN)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("VM vm1 already has 2 checkpoints, the limit is 2"),
        "{err}"
    );
    let mut other = meta("c");
    other.vm_id = "vm2".into();
    store
        .create_full(&other, b"", &mem.as_source(), &PLAIN)
        .unwrap();
    assert!(!store.dir("c").join("..").join(".tmp-c").exists());
}

#[test]
fn archived_snapshots_are_kept_but_not_restored() {
    let dir = TempDir::new("archive");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let mem = memory(&layout(), &mut Rng(4), 1);
    store
        .create_full(&meta("a"), b"", &mem.as_source(), &PLAIN)
        .unwrap();
    assert_eq!(store.archive("a").unwrap().state, SnapshotState::Archived);
    let err = store.restore_plan("a", "cpu-abc").unwrap_err().to_string();
    assert!(err.contains("snapshot a is Archived"), "{err}");
    store.unarchive("a").unwrap();
    store.restore_plan("a", "cpu-abc").unwrap();
}

#[test]
fn bad_input_is_refused_with_reasons() {
    let dir = TempDir::new("input");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let layout = layout();
    let mem = memory(&layout, &mut Rng(4), 1);
    for id in ["", "../x", ".hidden", "a/b"] {
        assert!(matches!(
            store.create_full(&meta(id), b"", &mem.as_source(), &PLAIN),
            Err(StoreError::InvalidId(_))
        ));
    }
    store
        .create_full(&meta("a"), b"", &mem.as_source(), &PLAIN)
        .unwrap();
    assert!(matches!(
        store.create_full(&meta("a"), b"", &mem.as_source(), &PLAIN),
        Err(StoreError::AlreadyExists(_))
    ));
    let short = ray_snapshot::DirtyBitmap {
        regions: vec![vec![0]],
    };
    let err = store
        .create_incremental("a", &meta("b"), b"", &mem.as_source(), &short, &PLAIN)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dirty bitmap has 1 regions"), "{err}");
    let d = ray_snapshot::DirtyBitmap::clean(&layout);
    assert!(matches!(
        store.create_incremental("zz", &meta("b"), b"", &mem.as_source(), &d, &PLAIN),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn a_half_written_snapshot_is_never_listed_and_is_cleaned_up() {
    let dir = TempDir::new("partial");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let mem = memory(&layout(), &mut Rng(4), 1);
    store
        .create_full(&meta("a"), b"", &mem.as_source(), &PLAIN)
        .unwrap();
    // What a writer killed before its rename leaves: files, maybe even a manifest.
    let tmp = dir.path().join(".tmp-b");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::copy(
        store.dir("a").join("manifest.json"),
        tmp.join("manifest.json"),
    )
    .unwrap();
    std::fs::write(tmp.join("memory.raw"), b"partial").unwrap();
    let del = dir.path().join(".del-c");
    std::fs::create_dir(&del).unwrap();
    let tree = store.list().unwrap();
    assert_eq!(tree.roots.len(), 1);
    assert!(tree.broken.is_empty());
    drop(store);
    let store = SnapshotStore::open(dir.path()).unwrap();
    assert!(!tmp.exists() && !del.exists());
    restore_all(&store, "a").unwrap();
}

/// A source that says where memory is known to be zero: the writer must not read there.
struct Holey<'a> {
    inner: ray_snapshot::GuestSlices<'a>,
    zero_from: u64,
    reads_past: std::cell::Cell<u64>,
}

impl ray_snapshot::MemorySource for Holey<'_> {
    fn layout(&self) -> ray_snapshot::MemoryLayout {
        self.inner.layout()
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if gpa >= self.zero_from {
            self.reads_past.set(self.reads_past.get() + 1);
        }
        self.inner.read(gpa, buf)
    }
    fn known_zero(&self, gpa: u64, _len: u64) -> bool {
        gpa >= self.zero_from
    }
}

#[test]
fn known_zero_memory_is_skipped_and_holes_still_verify() {
    let dir = TempDir::new("holes");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let layout = ray_snapshot::MemoryLayout::new(&[(0, 16 << 20)]).unwrap();
    let mut mem = ray_snapshot::OwnedMemory::zeroed(&layout).unwrap();
    mem.regions[0].1[..4 << 20].fill(0x5a);
    let source = Holey {
        inner: mem.as_source(),
        zero_from: 8 << 20,
        reads_past: std::cell::Cell::new(0),
    };
    store
        .create_full(&meta("h"), b"s", &source, &PLAIN)
        .unwrap();
    assert_eq!(
        source.reads_past.get(),
        0,
        "known-zero chunks must not be read"
    );
    let plan = store.restore_plan("h", "cpu-abc").unwrap();
    // Whole-file and mapped verification agree, hole chunks included.
    plan.verify_base_memory().unwrap();
    let slices: Vec<(u64, &[u8])> = mem
        .regions
        .iter()
        .map(|(g, v)| (*g, v.as_slice()))
        .collect();
    plan.verify_mapped_base(&slices).unwrap();
    assert_eq!(plan.materialize_owned().unwrap(), mem);
    // Memory that differs from the file is caught in the mapped check, with its range.
    let mut changed = mem.clone();
    changed.regions[0].1[(12 << 20) + 5] = 1;
    let slices: Vec<(u64, &[u8])> = changed
        .regions
        .iter()
        .map(|(g, v)| (*g, v.as_slice()))
        .collect();
    // Chunks that are holes in the file are checked against zero without reading memory,
    // so only data chunks catch a mapped change; a file hole that should hold data is
    // caught by the checksum of zeros.
    plan.verify_mapped_base(&slices).unwrap();
    changed.regions[0].1[5] = 0;
    let slices: Vec<(u64, &[u8])> = changed
        .regions
        .iter()
        .map(|(g, v)| (*g, v.as_slice()))
        .collect();
    let err = plan.verify_mapped_base(&slices).unwrap_err().to_string();
    assert!(err.contains("in guest memory 0x0..0x400000"), "{err}");
    // Punching a hole where data was is found without the data.
    let path = plan.mappable_memory().unwrap().to_path_buf();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a file this test owns.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4 << 20,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let err = store.verify("h").unwrap_err().to_string();
    assert!(err.contains("(the file has a hole there)"), "{err}");
}
