//! Migrations that copy a disk (`--copy-disks`) between two in-memory VMs over real
//! sockets: the disk is a real sparse file, its tracker the virtio-blk device's
//! dirty-block tracker, and a writer thread changes the file (and marks it, as the
//! device's workers do) while the migration runs, until the source pauses.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use ray_devices::virtio::blk::dirty::DirtyBlocks;
use ray_memory::PageBitmap;
use ray_migration::disk::{part_path, target_path};
use ray_migration::memvm::{InMemorySource, InMemoryTarget, MemGuest};
use ray_migration::protocol::regions_of;
use ray_migration::*;

const SIZE: u64 = (64 << 20) + 512;

fn layout() -> MemoryLayout {
    MemoryLayout::new(&[(0, 2 << 20)]).unwrap()
}

fn compat() -> CompatInfo {
    CompatInfo {
        vcpus: 1,
        page_size: 4096,
        regions: regions_of(&layout()),
        cpuid_fingerprint: [7; 32],
        flavour: "rayvisor-test/1".into(),
    }
}

fn key() -> PresharedKey {
    PresharedKey::new(b"a pre-shared key for disk tests").unwrap()
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ray-mig-disk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("dst")).unwrap();
    d
}

/// The device's tracker, as the VMM hands it to the migration.
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

/// The source disk: a sparse file with 2 MiB of data at 16 MiB and a short last block.
fn make_disk(path: &Path) -> File {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.set_len(SIZE).unwrap();
    let data: Vec<u8> = (0..2 << 20).map(|i| (i % 251) as u8 | 1).collect();
    f.write_all_at(&data, 16 << 20).unwrap();
    f.write_all_at(&[0x5a; 512], SIZE - 512).unwrap();
    f
}

/// A source VM whose pause also stops the disk writer (like draining the device).
struct Source {
    vm: InMemorySource,
    disk_paused: Arc<Mutex<bool>>,
}

impl SourceVm for Source {
    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        self.vm.start_dirty_log()
    }
    fn dirty_log(&mut self) -> Result<DirtyBitmap, VmError> {
        self.vm.dirty_log()
    }
    fn stop_dirty_log(&mut self) -> Result<(), VmError> {
        self.vm.stop_dirty_log()
    }
    fn pause(&mut self) -> Result<(), VmError> {
        // Stopping takes a moment, in which the guest still writes: those writes are in
        // the last take only.
        thread::sleep(Duration::from_millis(5));
        // Waits for a write in progress (and its mark), as the device's drain does.
        *self.disk_paused.lock().unwrap() = true;
        self.vm.pause()
    }
    fn resume(&mut self) -> Result<(), VmError> {
        *self.disk_paused.lock().unwrap() = false;
        self.vm.resume()
    }
    fn throttle(&mut self, percent: u8) -> Result<(), VmError> {
        self.vm.throttle(percent)
    }
    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        self.vm.save_state()
    }
}

/// Writes (and now and then discards) blocks in the first 8 MiB of the disk every
/// millisecond while not paused, marking each after it returned; returns the writes.
fn spawn_writer(
    file: File,
    dirty: Arc<DirtyBlocks>,
    paused: Arc<Mutex<bool>>,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        while !stop.load(Ordering::SeqCst) {
            {
                let paused = paused.lock().unwrap();
                if !*paused {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % (8 << 20)) / 512 * 512;
                    let len = 512 * (1 + (x >> 40) % 256);
                    if x.is_multiple_of(7) {
                        // SAFETY: fallocate on an open descriptor with integer arguments.
                        unsafe {
                            libc::fallocate(
                                file.as_raw_fd(),
                                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                                off as i64,
                                len as i64,
                            )
                        };
                    } else {
                        file.write_all_at(&vec![(x >> 16) as u8 | 1; len as usize], off)
                            .unwrap();
                    }
                    dirty.mark(off, len);
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
            thread::sleep(Duration::from_millis(1));
        }
    })
}

/// The target's VM, noting what its disk directory held when the switch-over resumed it
/// (the VMM opens the copied disks then).
struct Target {
    vm: InMemoryTarget,
    dir: PathBuf,
    at_resume: Arc<Mutex<Option<Vec<String>>>>,
}

impl TargetVm for Target {
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.vm.restore_state(state)
    }
    fn resume(&mut self) -> Result<(), VmError> {
        *self.at_resume.lock().unwrap() = Some(names(&self.dir));
        self.vm.resume()
    }
    fn discard(&mut self) {
        self.vm.discard()
    }
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    n.sort();
    n
}

/// The target VM's name in its partial files.
const TAG: &str = "vm-7";

struct Run {
    send: Result<SendReport, SendFailure>,
    recv: Result<ReceiveReport, ReceiveFailure>,
    src: PathBuf,
    dst: PathBuf,
    writes: u64,
    source: Source,
    /// The target's disk directory as the switch-over resumed the VM (None: never).
    at_resume: Option<Vec<String>>,
}

/// Migrates a VM with one copied disk (`disk0`) while the writer runs.
fn migrate(
    name: &str,
    protection: Protection,
    configure: impl FnOnce(&mut SenderConfig, &mut ReceiverConfig),
) -> Run {
    let d = dir(name);
    let src = d.join("src.img");
    let file = make_disk(&src);
    let dirty = Arc::new(DirtyBlocks::new(SIZE));
    let guest = Arc::new(MemGuest::new(&layout()).unwrap());
    guest.fill(3, 50);
    let mut source = Source {
        vm: InMemorySource::new(guest.clone(), b"state".to_vec()),
        disk_paused: Arc::new(Mutex::new(false)),
    };
    let (stop, count) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let writer = spawn_writer(
        file,
        dirty.clone(),
        source.disk_paused.clone(),
        stop.clone(),
        count.clone(),
    );
    let mut scfg = SenderConfig::new(key());
    scfg.protection = protection;
    scfg.disks = vec![Arc::new(
        SourceDisk::open("disk0", &src, SIZE, Arc::new(Tracker(dirty))).unwrap(),
    )];
    // Enough passes for the writer to change blocks the first pass already sent.
    scfg.policy.max_downtime = Duration::from_millis(1);
    scfg.policy.max_passes = 4;
    scfg.policy.auto_converge = false;
    let mut rcfg = ReceiverConfig::new(key());
    rcfg.protection = protection;
    rcfg.disk_dir = Some(d.join("dst"));
    rcfg.disk_tag = TAG.into();
    configure(&mut scfg, &mut rcfg);
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    let at_resume = Arc::new(Mutex::new(None));
    let mut vm = Target {
        vm: InMemoryTarget::default(),
        dir: d.join("dst"),
        at_resume: at_resume.clone(),
    };
    let target = thread::spawn(move || {
        let dst = MemGuest::new(&layout()).unwrap();
        receive_migration(b, &dst, &mut vm, &compat(), &rcfg)
    });
    // Let the writer get going first.
    thread::sleep(Duration::from_millis(20));
    let send = send_migration(a, &*guest, &mut source, &compat(), &scfg);
    let recv = target.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let at_resume = at_resume.lock().unwrap().take();
    Run {
        send,
        recv,
        dst: target_path(&d.join("dst"), "disk0"),
        src,
        writes: count.load(Ordering::SeqCst),
        source,
        at_resume,
    }
}

fn check_copied(r: Run) {
    let report = r.send.unwrap();
    let recv = r.recv.unwrap();
    assert_eq!(recv.disks, vec![("disk0".to_string(), r.dst.clone())]);
    // Flushed and under its final name before the target acknowledged the disks, so
    // before the switch-over: no partial file left.
    let at_resume = r.at_resume.clone().expect("resumed");
    assert!(
        at_resume.contains(&"disk0.img".to_string())
            && !at_resume
                .iter()
                .any(|n| n.ends_with(&format!(".{TAG}.part"))),
        "{at_resume:?}"
    );
    assert!(r.writes > 0, "the writer ran");
    // The source is paused at the switch-over (the writer too): its file is final.
    assert!(*r.source.disk_paused.lock().unwrap());
    let (src, dst) = (
        std::fs::read(&r.src).unwrap(),
        std::fs::read(&r.dst).unwrap(),
    );
    assert_eq!(src.len(), dst.len());
    let first_diff = src.iter().zip(&dst).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "the copy differs from the source");
    // Holes were not sent: the 64 MiB disk holds at most ~10 MiB of data, and a pass
    // sends at most that (blocks the writer dirtied are sent again in later passes, and a
    // loaded host makes more passes; the sparse copy below is checked too).
    assert!(
        report.disk_bytes_sent < report.passes.len() as u64 * (12 << 20),
        "sent {} disk bytes in {} passes",
        report.disk_bytes_sent,
        report.passes.len()
    );
    assert!(report.disk_bytes_sent >= 2 << 20);
    assert!(report.passes.len() >= 2, "{} passes", report.passes.len());
    let blocks = std::fs::metadata(&r.dst).unwrap().blocks() * 512;
    assert!(
        blocks < 24 << 20,
        "the copy is sparse: {blocks} bytes allocated"
    );
}

#[test]
fn a_disk_written_during_an_encrypted_migration_arrives_byte_for_byte() {
    let r = migrate("enc", Protection::Encrypted, |s, _| s.recheck_memory = true);
    check_copied(r);
}

#[test]
fn partial_copies_a_killed_target_of_the_vm_left_are_removed() {
    let stale = Arc::new(Mutex::new(Vec::new()));
    let s2 = stale.clone();
    let r = migrate("stale", Protection::Plaintext, |_, t| {
        // What targets killed in the middle of a copy left: this VM's (of this disk and
        // another) and another VM's.
        let dir = t.disk_dir.clone().unwrap();
        let made = [
            part_path(&dir, "disk0", TAG),
            part_path(&dir, "disk3", TAG),
            part_path(&dir, "disk0", "vm-8"),
        ];
        for p in &made {
            std::fs::write(p, b"half a disk").unwrap();
        }
        *s2.lock().unwrap() = made.to_vec();
    });
    let dir = r.dst.parent().unwrap().to_path_buf();
    let theirs = stale.lock().unwrap()[2].clone();
    check_copied(r);
    assert_eq!(
        names(&dir),
        vec![
            theirs.file_name().unwrap().to_str().unwrap().to_string(),
            "disk0.img".to_string()
        ],
        "this VM's partial copies went, another VM's stayed"
    );
}

#[test]
fn a_disk_written_during_a_plaintext_migration_arrives_byte_for_byte() {
    let r = migrate("plain", Protection::Plaintext, |s, _| s.compress = true);
    check_copied(r);
}

fn assert_refused(r: &Run, want: &str) {
    let f = r.send.as_ref().expect_err("the migration must fail");
    assert!(f.to_string().contains(want), "{f}");
    assert_eq!(f.vm, SourceVmAfterFailure::Running, "{f}");
    assert!(
        !*r.source.disk_paused.lock().unwrap(),
        "source disk resumed"
    );
    assert!(!r.dst.exists(), "no copy is left");
    let dir = r.dst.parent().unwrap();
    assert_eq!(names(dir), Vec::<String>::new(), "no partial copy is left");
    assert!(r.recv.is_err());
    // The source's disk is whole: its data is still there.
    let src = std::fs::read(&r.src).unwrap();
    assert_eq!(&src[src.len() - 512..], &[0x5a; 512][..]);
}

#[test]
fn a_target_without_a_disk_directory_refuses_by_name() {
    let r = migrate("nodir", Protection::Plaintext, |_, t| t.disk_dir = None);
    assert_refused(
        &r,
        "without a disk directory (ray migrate receive --disk-dir DIR)",
    );
    assert!(r.send.as_ref().err().unwrap().to_string().contains("disk0"));
}

#[test]
fn a_target_that_speaks_no_disk_protocol_refuses_clearly() {
    let r = migrate("old", Protection::Encrypted, |_, t| t.versions = vec![4]);
    assert_refused(&r, "copying disks needs migration protocol version 5");
}

#[test]
fn an_existing_target_file_is_refused_and_left_alone() {
    let d = std::env::temp_dir().join(format!("ray-mig-disk-exists-{}", std::process::id()));
    let mut existing = None;
    let r = migrate("exists", Protection::Plaintext, |_, t| {
        let p = target_path(t.disk_dir.as_ref().unwrap(), "disk0");
        std::fs::write(&p, b"someone's disk").unwrap();
        existing = Some(p);
    });
    let f = r.send.as_ref().err().unwrap();
    assert!(f.to_string().contains("exists already"), "{f}");
    assert_eq!(f.vm, SourceVmAfterFailure::Running);
    let p = existing.unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"someone's disk");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn a_cancelled_copy_leaves_no_target_file_and_the_source_runs_on() {
    let mid_copy = Arc::new(Mutex::new(None));
    let seen = mid_copy.clone();
    let r = migrate("cancel", Protection::Encrypted, |s, t| {
        let (cancel, progress) = (s.cancel.clone(), s.progress.clone());
        let dir = t.disk_dir.clone().unwrap();
        thread::spawn(move || {
            // Cancel once disk blocks are moving, noting what the directory holds then.
            for _ in 0..20_000 {
                if progress.get().disk_bytes_sent > 0 {
                    break;
                }
                thread::sleep(Duration::from_micros(100));
            }
            *seen.lock().unwrap() = Some(names(&dir));
            cancel.cancel();
        });
        s.policy.max_passes = 1000;
        s.policy.max_downtime = Duration::from_nanos(1);
    });
    // In the middle of the copy the disk has only its partial name: a target killed
    // then leaves nothing at the name a VM would open.
    assert_eq!(
        mid_copy.lock().unwrap().clone(),
        Some(vec![format!(".disk0.img.{TAG}.part")])
    );
    assert_refused(&r, "cancelled");
}

/// A tracker that reports nothing: the writes it misses must not go unnoticed.
struct Blind;

impl BlockTracker for Blind {
    fn start(&self) {}
    fn take(&self) -> PageBitmap {
        PageBitmap::new(ray_migration::disk::blocks_of(SIZE))
    }
    fn stop(&self) {}
}

#[test]
fn writes_the_tracking_missed_fail_the_recheck_and_the_source_runs_on() {
    let r = migrate("blind", Protection::Plaintext, |s, _| {
        let src = s.disks[0].clone();
        s.disks = vec![Arc::new(
            SourceDisk::open(
                &src.id,
                &std::env::temp_dir()
                    .join(format!("ray-mig-disk-blind-{}/src.img", std::process::id())),
                SIZE,
                Arc::new(Blind),
            )
            .unwrap(),
        )];
        s.recheck_memory = true;
    });
    assert_refused(&r, "a write the dirty-block tracking did not report");
}
