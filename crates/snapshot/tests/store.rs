//! The store end to end: full and incremental snapshots, chains, merge, damage, limits.
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{copy, dirty_some, layout, memory, meta, same, Rng, TempDir};
use ray_memory::GuestSpan;
use ray_snapshot::manifest::{MEMORY_FILE, PAGEMAP_FILE, PAGES_FILE, PAGES_ZST_FILE, STATE_FILE};
use ray_snapshot::{
    allocated_bytes, CreateOptions, DirtyBitmap, GuestMemory, Kind, MemoryError, MemoryLayout,
    OwnedMemory, SnapshotState, SnapshotStore, StoreError,
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
        .create_full(&meta("a"), b"vm state", &mem, &PLAIN)
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
    assert!(same(&plan.materialize_owned().unwrap(), &mem));

    // The file is laid out by guest address: offset = gpa, through the hole.
    let file = std::fs::read(&path).unwrap();
    assert_eq!(file.len() as u64, 6 << 20);
    let mut region1 = vec![0u8; 2 << 20];
    mem.read(4 << 20, &mut region1).unwrap();
    assert_eq!(&file[4 << 20..], &region1[..]);
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
        let mem = memory(&layout, &mut rng, 6);
        store
            .create_full(&meta("c0"), b"s0", &mem, &base_opts)
            .unwrap();
        let mut expected = vec![copy(&mem)];
        for i in 1..=3 {
            let dirty = dirty_some(&mem, &layout, &mut rng, 40);
            let id = format!("c{i}");
            let parent = format!("c{}", i - 1);
            let state = format!("s{i}");
            let m = store
                .create_incremental(&parent, &meta(&id), state.as_bytes(), &mem, &dirty, &opts)
                .unwrap();
            assert_eq!(m.kind, Kind::Incremental);
            assert_eq!(m.dirty_pages, dirty.count());
            expected.push(copy(&mem));
        }
        for (i, want) in expected.iter().enumerate() {
            let plan = store.restore_plan(&format!("c{i}"), "cpu-abc").unwrap();
            assert_eq!(plan.overlays.len(), i);
            assert_eq!(plan.state, format!("s{i}").as_bytes());
            assert!(
                same(&plan.materialize_owned().unwrap(), want),
                "checkpoint c{i}"
            );
            // The mapped path: the base file's bytes, then the overlays on top.
            if let Some(path) = plan.mappable_memory() {
                let file = std::fs::read(path).unwrap();
                let got = OwnedMemory::zeroed(&layout).unwrap();
                for r in &layout.regions {
                    got.write(r.gpa, &file[r.gpa as usize..r.end() as usize])
                        .unwrap();
                }
                plan.apply_overlays(&got).unwrap();
                assert!(same(&got, want), "mapped checkpoint c{i}");
            }
        }
        let merged = store.merge("c3", "flat", &PLAIN).unwrap();
        assert_eq!(merged.kind, Kind::Full);
        assert_eq!(merged.parent, None);
        let plan = store.restore_plan("flat", "cpu-abc").unwrap();
        assert_eq!(plan.state, b"s3");
        assert!(same(&plan.materialize_owned().unwrap(), &expected[3]));

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
    let mem = memory(&layout, &mut rng, 8);
    store.create_full(&meta("base"), b"", &mem, &PLAIN).unwrap();
    // Scattered single pages: the worst case for the page map (one run per page).
    let mut dirty = ray_snapshot::DirtyBitmap::clean(&layout);
    for p in (0..256u64).step_by(2) {
        let gpa = p * 4096;
        let mut b = [0u8];
        mem.read(gpa, &mut b).unwrap();
        mem.write(gpa, &[b[0].wrapping_add(1) | 1]).unwrap();
        dirty.mark(&layout, gpa, 1);
    }
    let m = store
        .create_incremental("base", &meta("inc"), b"", &mem, &dirty, &PLAIN)
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
        let mem = memory(&layout, &mut rng, 16);
        store
            .create_full(&meta("full"), b"state0", &mem, opts)
            .unwrap();
        let dirty = dirty_some(&mem, &layout, &mut rng, 30);
        store
            .create_incremental("full", &meta("inc"), b"state1", &mem, &dirty, opts)
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
            .create_full(&meta("a"), b"state", &mem, &opts)
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
    store.create_full(&meta("a"), b"", &mem, &PLAIN).unwrap();
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
    let mem = memory(&layout, &mut rng, 2);
    store.create_full(&meta("a"), b"", &mem, &PLAIN).unwrap();
    let d = dirty_some(&mem, &layout, &mut rng, 3);
    store
        .create_incremental("a", &meta("b"), b"", &mem, &d, &PLAIN)
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
    store.create_full(&meta("a"), b"", &mem, &PLAIN).unwrap();
    store.create_full(&meta("b"), b"", &mem, &PLAIN).unwrap();
    let err = store
        .create_full(&meta("c"), b"", &mem, &PLAIN)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("VM vm1 already has 2 checkpoints, the limit is 2"),
        "{err}"
    );
    let mut other = meta("c");
    other.vm_id = "vm2".into();
    store.create_full(&other, b"", &mem, &PLAIN).unwrap();
    assert!(!store.dir("c").join("..").join(".tmp-c").exists());
}

#[test]
fn archived_snapshots_are_kept_but_not_restored() {
    let dir = TempDir::new("archive");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let mem = memory(&layout(), &mut Rng(4), 1);
    store.create_full(&meta("a"), b"", &mem, &PLAIN).unwrap();
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
            store.create_full(&meta(id), b"", &mem, &PLAIN),
            Err(StoreError::InvalidId(_))
        ));
    }
    store.create_full(&meta("a"), b"", &mem, &PLAIN).unwrap();
    assert!(matches!(
        store.create_full(&meta("a"), b"", &mem, &PLAIN),
        Err(StoreError::AlreadyExists(_))
    ));
    let short = ray_snapshot::DirtyBitmap {
        regions: vec![ray_snapshot::PageBitmap::from_words(vec![0], 64)],
    };
    let err = store
        .create_incremental("a", &meta("b"), b"", &mem, &short, &PLAIN)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dirty bitmap has 1 regions"), "{err}");
    let d = ray_snapshot::DirtyBitmap::clean(&layout);
    assert!(matches!(
        store.create_incremental("zz", &meta("b"), b"", &mem, &d, &PLAIN),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn a_half_written_snapshot_is_never_listed_and_is_cleaned_up() {
    let dir = TempDir::new("partial");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let mem = memory(&layout(), &mut Rng(4), 1);
    store.create_full(&meta("a"), b"", &mem, &PLAIN).unwrap();
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

/// Memory that says where it is known to be zero: the writers must not read there. Spans
/// reaching into that part are counted.
struct Holey<'a> {
    inner: &'a OwnedMemory,
    zero_from: u64,
    spans_past: AtomicU64,
}

impl<'a> Holey<'a> {
    fn new(inner: &'a OwnedMemory, zero_from: u64) -> Self {
        Holey {
            inner,
            zero_from,
            spans_past: AtomicU64::new(0),
        }
    }
}

impl GuestMemory for Holey<'_> {
    fn layout(&self) -> &ray_snapshot::MemoryLayout {
        self.inner.layout()
    }
    fn span(&self, gpa: u64, len: u64) -> Result<GuestSpan<'_>, MemoryError> {
        if gpa + len > self.zero_from {
            self.spans_past.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.span(gpa, len)
    }
    fn known_zero(&self, gpa: u64, _len: u64) -> bool {
        gpa >= self.zero_from
    }
}

/// Sets the protection of `len` bytes of `mem` at `gpa` (page aligned): with
/// `PROT_NONE`, any read there kills the test.
fn protect(mem: &OwnedMemory, gpa: u64, len: u64, prot: libc::c_int) {
    let ptr = mem.span(gpa, len).unwrap().as_ptr();
    // SAFETY: the range lies in `mem`'s own page-aligned anonymous mapping, which outlives
    // the call; it changes no memory, and the test reads the range only once it is
    // accessible again.
    let rc = unsafe { libc::mprotect(ptr.cast(), len as usize, prot) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

#[test]
fn known_zero_memory_is_skipped_and_holes_still_verify() {
    let dir = TempDir::new("holes");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let layout = ray_snapshot::MemoryLayout::new(&[(0, 16 << 20)]).unwrap();
    let mem = OwnedMemory::zeroed(&layout).unwrap();
    mem.write(0, &vec![0x5a; 4 << 20]).unwrap();
    let source = Holey::new(&mem, 8 << 20);
    protect(&mem, 8 << 20, 8 << 20, libc::PROT_NONE);
    store
        .create_full(&meta("h"), b"s", &source, &PLAIN)
        .unwrap();
    protect(&mem, 8 << 20, 8 << 20, libc::PROT_READ | libc::PROT_WRITE);
    assert_eq!(
        source.spans_past.load(Ordering::Relaxed),
        0,
        "known-zero chunks must not be read"
    );
    let plan = store.restore_plan("h", "cpu-abc").unwrap();
    // Whole-file and mapped verification agree, hole chunks included.
    plan.verify_base_memory().unwrap();
    plan.verify_mapped_base(&mem).unwrap();
    assert!(same(&plan.materialize_owned().unwrap(), &mem));
    // Memory that differs from the file is caught in the mapped check, with its range.
    let changed = copy(&mem);
    changed.write((12 << 20) + 5, &[1]).unwrap();
    // Chunks that are holes in the file are checked against zero without reading memory,
    // so only data chunks catch a mapped change; a file hole that should hold data is
    // caught by the checksum of zeros.
    plan.verify_mapped_base(&changed).unwrap();
    changed.write(5, &[0]).unwrap();
    let err = plan.verify_mapped_base(&changed).unwrap_err().to_string();
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

#[test]
fn page_sets_skip_known_zero_pages_too() {
    let dir = TempDir::new("holes-pages");
    let store = SnapshotStore::open(dir.path()).unwrap();
    let layout = MemoryLayout::new(&[(0, 4 << 20), (8 << 20, 4 << 20)]).unwrap();
    let mem = OwnedMemory::zeroed(&layout).unwrap();
    // Not chunk aligned: the writers must stop at the page.
    let zero_from = (9 << 20) + 3 * 4096;
    mem.write(8 << 20, &vec![0x77; (zero_from - (8 << 20)) as usize])
        .unwrap();
    mem.write(4096, &[1; 8192]).unwrap();
    let first = copy(&mem);
    let source = Holey::new(&mem, zero_from);
    protect(&mem, zero_from, (12 << 20) - zero_from, libc::PROT_NONE);
    let full = store.create_full(&meta("z"), b"", &source, &ZSTD).unwrap();
    assert_eq!(full.dirty_pages, 2 + 256 + 3);
    mem.write((9 << 20) - 4096, &[5; 4096]).unwrap();
    let mut dirty = DirtyBitmap::clean(&layout);
    // Straddles `zero_from`: known-zero pages are recorded as zero runs, unread.
    assert!(dirty.mark(&layout, (9 << 20) - 8 * 4096, 16 * 4096));
    let inc = store
        .create_incremental("z", &meta("z1"), b"", &source, &dirty, &PLAIN)
        .unwrap();
    assert_eq!(inc.dirty_pages, 16);
    protect(
        &mem,
        zero_from,
        (12 << 20) - zero_from,
        libc::PROT_READ | libc::PROT_WRITE,
    );
    assert_eq!(source.spans_past.load(Ordering::Relaxed), 0);
    let plan = store.restore_plan("z", "cpu-abc").unwrap();
    assert!(same(&plan.materialize_owned().unwrap(), &first));
    let plan = store.restore_plan("z1", "cpu-abc").unwrap();
    assert!(same(&plan.materialize_owned().unwrap(), &mem));
}

#[test]
fn materialize_overwrites_what_memory_held() {
    for base_opts in [PLAIN, ZSTD] {
        let dir = TempDir::new("overwrite");
        let store = SnapshotStore::open(dir.path()).unwrap();
        let layout = layout();
        let mut rng = Rng(21);
        let mem = memory(&layout, &mut rng, 3);
        store
            .create_full(&meta("a"), b"", &mem, &base_opts)
            .unwrap();
        let dirty = dirty_some(&mem, &layout, &mut rng, 50);
        store
            .create_incremental("a", &meta("b"), b"", &mem, &dirty, &PLAIN)
            .unwrap();
        let plan = store.restore_plan("b", "cpu-abc").unwrap();
        let target = OwnedMemory::zeroed(&layout).unwrap();
        for r in &layout.regions {
            target.write(r.gpa, &vec![0xee; r.len as usize]).unwrap();
        }
        plan.materialize(&target).unwrap();
        assert!(same(&target, &mem), "base {base_opts:?}");
        // Memory that does not cover the snapshot's layout is refused.
        let small = OwnedMemory::zeroed(&MemoryLayout::new(&[(0, 1 << 20)]).unwrap()).unwrap();
        let err = plan.materialize(&small).unwrap_err();
        assert!(
            matches!(err, StoreError::MemoryMismatch(_)),
            "base {base_opts:?}: {err}"
        );
    }
}

#[test]
fn progress_counts_the_memory_each_snapshot_covers() {
    let dir = TempDir::new("progress");
    let done = Arc::new(AtomicU64::new(0));
    let store = SnapshotStore::open(dir.path())
        .unwrap()
        .with_progress(done.clone());
    let layout = layout();
    let mut rng = Rng(8);
    let mem = memory(&layout, &mut rng, 5);
    store.create_full(&meta("a"), b"", &mem, &PLAIN).unwrap();
    assert_eq!(done.load(Ordering::Relaxed), layout.total_bytes());
    done.store(0, Ordering::Relaxed);
    let dirty = dirty_some(&mem, &layout, &mut rng, 20);
    store
        .create_incremental("a", &meta("b"), b"", &mem, &dirty, &ZSTD)
        .unwrap();
    assert_eq!(done.load(Ordering::Relaxed), dirty.count() * 4096);
    done.store(0, Ordering::Relaxed);
    store.create_full(&meta("c"), b"", &mem, &ZSTD).unwrap();
    assert_eq!(done.load(Ordering::Relaxed), layout.total_bytes());
}
