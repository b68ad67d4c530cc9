//! End-to-end migrations between two in-memory VMs over real sockets.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use ray_memory::{GuestSpan, OwnedMemory};
use ray_migration::memvm::{InMemorySource, InMemoryTarget, MemGuest};
use ray_migration::protocol::regions_of;
use ray_migration::*;

const T: Duration = Duration::from_secs(10);

fn layout() -> MemoryLayout {
    MemoryLayout::new(&[(0, 4 << 20), (1 << 32, 1 << 20)]).unwrap()
}

fn guest() -> Arc<MemGuest> {
    Arc::new(MemGuest::new(&layout()).unwrap())
}

fn compat(vcpus: u32) -> CompatInfo {
    CompatInfo {
        vcpus,
        page_size: 4096,
        regions: regions_of(&layout()),
        cpuid_fingerprint: [7; 32],
        flavour: "rayvisor-test/1".into(),
    }
}

fn key(s: &str) -> PresharedKey {
    PresharedKey::new(s.as_bytes()).unwrap()
}

fn source() -> (Arc<MemGuest>, InMemorySource) {
    let g = guest();
    g.fill(42, 70);
    let vm = InMemorySource::new(g.clone(), b"vcpu+device state".to_vec());
    (g, vm)
}

struct Outcome {
    send: Result<SendReport, SendFailure>,
    recv: Result<ReceiveReport, ReceiveFailure>,
    target: InMemoryTarget,
    dst: Arc<MemGuest>,
}

/// Runs the receiver on a thread with `target_mem` and the sender here.
// Test plumbing: each argument is one knob a fault test turns.
#[allow(clippy::too_many_arguments)]
fn run<S, M, SM>(
    src_stream: S,
    dst_stream: impl Read + Write + Send + 'static,
    src_mem: &SM,
    vm: &mut InMemorySource,
    scfg: &SenderConfig,
    rcfg: ReceiverConfig,
    target_compat: CompatInfo,
    target_mem: Arc<M>,
    dst: Arc<MemGuest>,
    mut target: InMemoryTarget,
) -> Outcome
where
    S: Read + Write,
    M: GuestMemory + Send + Sync + 'static,
    SM: GuestMemory + ?Sized,
{
    let h = thread::spawn(move || {
        let r = receive_migration(dst_stream, &*target_mem, &mut target, &target_compat, &rcfg);
        (r, target)
    });
    let send = send_migration(src_stream, src_mem, vm, &compat(4), scfg);
    let (recv, target) = h.join().unwrap();
    Outcome {
        send,
        recv,
        target,
        dst,
    }
}

fn tcp_pair() -> (Stream, Stream) {
    let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into())).unwrap();
    let a = connect(l.endpoint(), T).unwrap();
    let b = l.accept(&CancelToken::new(), Some(T), T).unwrap();
    (a, b)
}

fn simple<SM: GuestMemory + ?Sized>(
    vm: &mut InMemorySource,
    src: &SM,
    scfg: &SenderConfig,
    rkey: &str,
    tcompat: CompatInfo,
    target: InMemoryTarget,
) -> Outcome {
    let (a, b) = tcp_pair();
    let dst = guest();
    let mut rcfg = ReceiverConfig::new(key(rkey));
    rcfg.protection = scfg.protection;
    run(a, b, src, vm, scfg, rcfg, tcompat, dst.clone(), dst, target)
}

fn assert_source_running(vm: &InMemorySource, f: &SendFailure) {
    assert!(!vm.flags.is_paused(), "source left paused after {f}");
    assert_eq!(vm.flags.throttle.load(Ordering::SeqCst), 0);
    assert!(!vm.logging, "dirty log left on");
    assert_eq!(f.vm, SourceVmAfterFailure::Running, "{f}");
    assert_eq!(f.session.state(), SessionState::Failed);
}

fn all_zero(g: &MemGuest) -> bool {
    g.contents().iter().all(|r| r.iter().all(|&b| b == 0))
}

#[test]
fn migrates_a_running_vm_over_tcp_byte_for_byte() {
    let (src, mut vm) = source();
    let dirtier = vm.spawn_dirtier(5, 1);
    let cfg = SenderConfig::new(key("correct horse battery"));
    let progress = cfg.progress.clone();
    let o = simple(
        &mut vm,
        &*src,
        &cfg,
        "correct horse battery",
        compat(4),
        InMemoryTarget::default(),
    );
    vm.flags.stop.store(true, Ordering::SeqCst);
    let dirtied = dirtier.join().unwrap();
    let report = o.send.unwrap();
    let recv = o.recv.unwrap();
    assert!(dirtied > 0);
    assert_eq!(
        src.contents(),
        o.dst.contents(),
        "memory differs after migration"
    );
    assert!(o.target.running);
    assert_eq!(
        o.target.restored.as_deref(),
        Some(&b"vcpu+device state"[..])
    );
    // The source stays paused: its VM is the target's now.
    assert!(vm.flags.is_paused());
    assert_eq!(vm.flags.resumes.load(Ordering::SeqCst), 0);
    assert_eq!(report.session.state(), SessionState::Completed);
    assert_eq!(recv.session.state(), SessionState::Completed);
    assert!(report.passes.len() >= 2);
    assert_eq!(recv.pages_received, report.pages_sent);
    let p = progress.get();
    assert_eq!(p.state, SessionState::Completed);
    assert!(p.bytes_sent > 0 && p.bandwidth_bps > 0.0);
}

#[test]
fn forced_stop_and_copy_with_throttling_over_a_unix_socket_with_lz4() {
    let (src, mut vm) = source();
    let dirtier = vm.spawn_dirtier(50, 2);
    let mut cfg = SenderConfig::new(key("correct horse battery"));
    cfg.compress = true;
    cfg.policy.max_downtime = Duration::ZERO; // never converges on its own
    cfg.policy.max_passes = 4;
    cfg.policy.throttle_after_passes = 1;
    let (a, b) = UnixStream::pair().unwrap();
    let dst = guest();
    let o = run(
        a,
        b,
        &*src,
        &mut vm,
        &cfg,
        ReceiverConfig::new(key("correct horse battery")),
        compat(4),
        dst.clone(),
        dst,
        InMemoryTarget::default(),
    );
    vm.flags.stop.store(true, Ordering::SeqCst);
    dirtier.join().unwrap();
    let report = o.send.unwrap();
    o.recv.unwrap();
    assert!(report.forced);
    assert_eq!(
        report.passes.len(),
        5,
        "4 pre-copy passes and the final one"
    );
    let throttles: Vec<u8> = report.passes.iter().map(|p| p.throttle_percent).collect();
    assert_eq!(&throttles[..4], &[0, 20, 30, 40]);
    assert_eq!(src.contents(), o.dst.contents());
}

#[test]
fn pages_move_zero_copy_or_copied_in_plaintext_and_encrypted() {
    for (zero_copy, protection) in [true, false]
        .into_iter()
        .flat_map(|z| [(z, Protection::Plaintext), (z, Protection::Encrypted)])
    {
        let (src, mut vm) = source();
        let mut cfg = SenderConfig::new(key("correct horse battery"));
        cfg.protection = protection;
        cfg.zero_copy = zero_copy;
        cfg.batch_pages = 100; // batches that end mid-region
        let o = simple(
            &mut vm,
            &*src,
            &cfg,
            "correct horse battery",
            compat(4),
            InMemoryTarget::default(),
        );
        let r = o.send.unwrap();
        let rr = o.recv.unwrap();
        assert_eq!(o.dst.contents(), src.contents());
        assert!(o.target.running);
        assert_eq!(r.pages_sent, rr.pages_received);
    }
}

#[test]
fn wrong_key_is_rejected_before_any_memory_moves() {
    let (src, mut vm) = source();
    let cfg = SenderConfig::new(key("correct horse battery"));
    let o = simple(
        &mut vm,
        &*src,
        &cfg,
        "wrong horse battery!",
        compat(4),
        InMemoryTarget::default(),
    );
    let f = o.send.unwrap_err();
    assert!(
        matches!(
            f.error,
            MigrationError::Secure(SecureError::ClosedInHandshake)
        ),
        "{f}"
    );
    assert!(f.to_string().contains("pre-shared key"), "{f}");
    assert_eq!(f.failed_in, SessionState::Idle);
    assert_source_running(&vm, &f);
    assert_eq!(vm.flags.pauses.load(Ordering::SeqCst), 0);
    assert!(!vm.logging);
    let r = o.recv.unwrap_err();
    assert!(
        matches!(
            r.error,
            MigrationError::Secure(SecureError::SourceKeyRefused)
        ),
        "{r}"
    );
    assert!(!r.authenticated);
    assert!(all_zero(&o.dst));
    assert!(!o.target.running && o.target.restored.is_none());
}

#[test]
fn an_impostor_target_gets_nothing() {
    let (src, mut vm) = source();
    let (a, mut b) = tcp_pair();
    // Accepts the preamble, answers the Noise handshake with garbage, then records
    // every byte it gets after that.
    let impostor = thread::spawn(move || {
        let mut pre = [0u8; 8];
        b.read_exact(&mut pre).unwrap();
        b.write_all(&[0, pre[5]]).unwrap();
        let mut len = [0u8; 2];
        b.read_exact(&mut len).unwrap();
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        b.read_exact(&mut msg).unwrap();
        b.write_all(&48u16.to_be_bytes()).unwrap();
        b.write_all(&[0x5a; 48]).unwrap();
        let mut after = Vec::new();
        let _ = b.read_to_end(&mut after);
        after
    });
    let cfg = SenderConfig::new(key("correct horse battery"));
    let f = send_migration(a, &*src, &mut vm, &compat(4), &cfg).unwrap_err();
    assert!(
        matches!(
            f.error,
            MigrationError::Secure(SecureError::TargetKeyRefused)
        ),
        "{f}"
    );
    assert!(f.error.to_string().contains("pre-shared key"));
    assert_source_running(&vm, &f);
    let after = impostor.join().unwrap();
    assert!(
        after.is_empty(),
        "{} bytes followed a bad handshake",
        after.len()
    );
}

/// A TCP relay between `a` and `b` that flips one bit of the source's stream at `at`
/// bytes (counted from the first byte); returns how many source bytes it relayed.
fn tampering_relay(a: Stream, b: Stream, at: u64) -> thread::JoinHandle<u64> {
    let (mut a_r, mut a_w) = (a.try_clone().unwrap(), a);
    let (mut b_r, mut b_w) = (b.try_clone().unwrap(), b);
    thread::spawn(move || {
        let back = thread::spawn(move || {
            let _ = io::copy(&mut b_r, &mut a_w);
            let _ = a_w.shutdown(Shutdown::Both);
        });
        let mut seen = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match a_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (seen..seen + n as u64).contains(&at) {
                buf[(at - seen) as usize] ^= 0x10;
            }
            seen += n as u64;
            if b_w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = b_w.shutdown(Shutdown::Both);
        let _ = back.join();
        seen
    })
}

#[test]
fn a_byte_flipped_on_the_wire_fails_the_migration_with_an_integrity_error() {
    let (src, mut vm) = source();
    let (a, relay_in) = tcp_pair();
    let (relay_out, b) = tcp_pair();
    // Well past the handshake (a few hundred bytes), inside the first page batch.
    let relay = tampering_relay(relay_in, relay_out, 100_000);
    let dst = guest();
    let cfg = SenderConfig::new(key("correct horse battery"));
    let o = run(
        a,
        b,
        &*src,
        &mut vm,
        &cfg,
        ReceiverConfig::new(key("correct horse battery")),
        compat(4),
        dst.clone(),
        dst,
        InMemoryTarget::default(),
    );
    assert!(relay.join().unwrap() > 100_000);
    let r = o.recv.unwrap_err();
    assert!(r.to_string().contains("integrity check failed"), "{r}");
    assert!(!o.target.running);
    let f = o.send.unwrap_err();
    assert_source_running(&vm, &f);
}

#[test]
fn incompatible_target_is_rejected_with_the_reason() {
    let (src, mut vm) = source();
    let cfg = SenderConfig::new(key("correct horse battery"));
    let o = simple(
        &mut vm,
        &*src,
        &cfg,
        "correct horse battery",
        compat(2),
        InMemoryTarget::default(),
    );
    let f = o.send.unwrap_err();
    assert_eq!(
        f.error.to_string(),
        "the target is incompatible: vCPU count differs: source has 4, target has 2"
    );
    assert_source_running(&vm, &f);
    assert!(all_zero(&o.dst));
    assert!(o.recv.is_err());
}

/// Guest memory whose writes start failing (the target "dies") or corrupt a byte.
struct Faulty {
    inner: Arc<MemGuest>,
    writes: AtomicU64,
    fail_after: u64,
    corrupt: AtomicBool,
}

impl GuestMemory for Faulty {
    fn layout(&self) -> &MemoryLayout {
        self.inner.layout()
    }
    /// The receiver takes a span for every write (a run of pages, a zero page): the target
    /// dies after `fail_after` of them.
    fn span(&self, gpa: u64, len: u64) -> Result<GuestSpan<'_>, MemoryError> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        if n >= self.fail_after {
            return Err(MemoryError {
                gpa,
                len,
                reason: "the target died".into(),
            });
        }
        self.inner.span(gpa, len)
    }
    /// Reported as soon as written bytes landed, before they are hashed: the first data
    /// written gets its first byte flipped.
    fn note_write(&self, gpa: u64, len: u64) {
        self.inner.note_write(gpa, len);
        if !self.corrupt.load(Ordering::SeqCst) {
            return;
        }
        let Ok(s) = self.inner.span(gpa, len) else {
            return;
        };
        if !s.is_zero() && self.corrupt.swap(false, Ordering::SeqCst) {
            let b: u8 = s.load(0).unwrap();
            s.store(0, !b);
        }
    }
}

fn faulty(fail_after: u64, corrupt: bool) -> (Arc<Faulty>, Arc<MemGuest>) {
    let dst = guest();
    let f = Arc::new(Faulty {
        inner: dst.clone(),
        writes: AtomicU64::new(0),
        fail_after,
        corrupt: AtomicBool::new(corrupt),
    });
    (f, dst)
}

#[test]
fn target_dying_mid_precopy_leaves_the_source_running() {
    let (src, mut vm) = source();
    let dirtier = vm.spawn_dirtier(5, 3);
    let cfg = SenderConfig::new(key("correct horse battery"));
    let (mem, dst) = faulty(300, false);
    let (a, b) = tcp_pair();
    let rcfg = ReceiverConfig::new(key("correct horse battery"));
    let o = run(
        a,
        b,
        &*src,
        &mut vm,
        &cfg,
        rcfg,
        compat(4),
        mem,
        dst,
        InMemoryTarget::default(),
    );
    vm.flags.stop.store(true, Ordering::SeqCst);
    dirtier.join().unwrap();
    let f = o.send.unwrap_err();
    assert_eq!(f.failed_in, SessionState::PreCopy, "{f}");
    assert!(matches!(f.error, MigrationError::Protocol(_)), "{f}");
    assert_source_running(&vm, &f);
    let r = o.recv.unwrap_err();
    assert!(r.error.to_string().contains("the target died"), "{r}");
    assert!(o.target.discarded && !o.target.running);
}

/// Forwards source→target bytes until `limit`, then cuts both directions.
fn cutting_proxy(limit: u64) -> (Stream, Stream) {
    let (src_side, proxy_in) = tcp_pair();
    let (proxy_out, dst_side) = tcp_pair();
    let (mut i, mut o) = (
        proxy_in.try_clone().unwrap(),
        proxy_out.try_clone().unwrap(),
    );
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut sent = 0u64;
        while sent < limit {
            let n = match i.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n.min((limit - sent) as usize),
            };
            if o.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n as u64;
        }
        let _ = i.shutdown(Shutdown::Both);
        let _ = o.shutdown(Shutdown::Both);
    });
    let (mut back_in, mut back_out) = (proxy_out, proxy_in);
    thread::spawn(move || {
        let _ = io::copy(&mut back_in, &mut back_out);
    });
    (src_side, dst_side)
}

#[test]
fn link_cut_mid_transfer_fails_both_sides_cleanly() {
    let (src, mut vm) = source();
    let cfg = SenderConfig::new(key("correct horse battery"));
    let (a, b) = cutting_proxy(1 << 20);
    let dst = guest();
    let rcfg = ReceiverConfig::new(key("correct horse battery"));
    let o = run(
        a,
        b,
        &*src,
        &mut vm,
        &cfg,
        rcfg,
        compat(4),
        dst.clone(),
        dst,
        InMemoryTarget::default(),
    );
    let f = o.send.unwrap_err();
    assert_eq!(f.failed_in, SessionState::PreCopy, "{f}");
    assert_source_running(&vm, &f);
    let r = o.recv.unwrap_err();
    assert!(
        matches!(
            r.error,
            MigrationError::Protocol(ProtocolError::Truncated { .. } | ProtocolError::PeerClosed)
        ) || matches!(
            &r.error,
            MigrationError::Protocol(ProtocolError::Io { source, .. })
                if source.kind() == io::ErrorKind::UnexpectedEof
        ),
        "{r}"
    );
    assert!(o.target.discarded && !o.target.running);
}

#[test]
fn verification_mismatch_rolls_back_and_resumes_the_source() {
    let (src, mut vm) = source();
    let cfg = SenderConfig::new(key("correct horse battery"));
    let (mem, dst) = faulty(u64::MAX, true);
    let (a, b) = tcp_pair();
    let rcfg = ReceiverConfig::new(key("correct horse battery"));
    let o = run(
        a,
        b,
        &*src,
        &mut vm,
        &cfg,
        rcfg,
        compat(4),
        mem,
        dst,
        InMemoryTarget::default(),
    );
    let f = o.send.unwrap_err();
    assert!(
        matches!(f.error, MigrationError::VerifyMismatch { .. }),
        "{f}"
    );
    assert!(f.error.to_string().contains("region 0x0+0x400000"), "{f}");
    assert_eq!(f.failed_in, SessionState::Verification);
    assert!(f
        .session
        .history()
        .iter()
        .any(|s| s.to == SessionState::RollingBack));
    assert_source_running(&vm, &f);
    assert_eq!(vm.flags.pauses.load(Ordering::SeqCst), 1);
    assert_eq!(vm.flags.resumes.load(Ordering::SeqCst), 1);
    let r = o.recv.unwrap_err();
    assert!(matches!(r.error, MigrationError::VerifyMismatch { .. }));
    assert!(o.target.discarded && !o.target.running);
}

#[test]
fn cancel_mid_precopy_rolls_back() {
    let (src, mut vm) = source();
    let dirtier = vm.spawn_dirtier(50, 4);
    let mut cfg = SenderConfig::new(key("correct horse battery"));
    cfg.policy.max_downtime = Duration::ZERO;
    cfg.policy.max_passes = u32::MAX;
    cfg.policy.max_time = Duration::from_secs(3600);
    let (cancel, progress) = (cfg.cancel.clone(), cfg.progress.clone());
    thread::spawn(move || {
        while progress.get().pass < 3 {
            thread::sleep(Duration::from_millis(1));
        }
        cancel.cancel();
    });
    let o = simple(
        &mut vm,
        &*src,
        &cfg,
        "correct horse battery",
        compat(4),
        InMemoryTarget::default(),
    );
    vm.flags.stop.store(true, Ordering::SeqCst);
    dirtier.join().unwrap();
    let f = o.send.unwrap_err();
    assert!(matches!(f.error, MigrationError::Cancelled), "{f}");
    assert!(f
        .session
        .history()
        .iter()
        .any(|s| s.event == SessionEvent::Cancel));
    assert_source_running(&vm, &f);
    let r = o.recv.unwrap_err();
    assert!(matches!(r.error, MigrationError::PeerAborted { .. }), "{r}");
    assert!(r.error.to_string().contains("cancelled"), "{r}");
    assert!(o.target.discarded);
}

#[test]
fn target_that_cannot_resume_says_so_and_the_source_resumes() {
    let (src, mut vm) = source();
    let cfg = SenderConfig::new(key("correct horse battery"));
    let target = InMemoryTarget {
        fail_resume: true,
        ..InMemoryTarget::default()
    };
    let o = simple(
        &mut vm,
        &*src,
        &cfg,
        "correct horse battery",
        compat(4),
        target,
    );
    let f = o.send.unwrap_err();
    assert_eq!(f.failed_in, SessionState::Completing);
    assert!(f
        .session
        .history()
        .iter()
        .any(|s| s.event == SessionEvent::ResumeFailed));
    assert_source_running(&vm, &f);
    assert!(o.target.discarded && !o.target.running);
}

/// A stream whose reads fail once a Switchover frame was written: the target's answer is lost.
struct LoseAnswersAfterSwitchover(Stream, bool);

impl Read for LoseAnswersAfterSwitchover {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        if self.1 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "link cut after switch-over",
            ));
        }
        self.0.read(b)
    }
}

impl Write for LoseAnswersAfterSwitchover {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if b.len() == 32 && b[..4] == *b"RYMG" && b[6..8] == 9u16.to_le_bytes() {
            self.1 = true;
        }
        self.0.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[test]
fn link_lost_after_switchover_never_resumes_the_source() {
    let (src, mut vm) = source();
    // Plaintext, so the wrapper can spot the Switchover frame on the wire.
    let mut cfg = SenderConfig::new(key("correct horse battery"));
    cfg.protection = Protection::Plaintext;
    let (a, b) = tcp_pair();
    let dst = guest();
    let mut rcfg = ReceiverConfig::new(key("correct horse battery"));
    rcfg.protection = Protection::Plaintext;
    let o = run(
        LoseAnswersAfterSwitchover(a, false),
        b,
        &*src,
        &mut vm,
        &cfg,
        rcfg,
        compat(4),
        dst.clone(),
        dst,
        InMemoryTarget::default(),
    );
    let f = o.send.unwrap_err();
    assert_eq!(f.failed_in, SessionState::Completing);
    assert_eq!(f.vm, SourceVmAfterFailure::PausedOwnershipUncertain);
    assert_eq!(f.session.state(), SessionState::Failed);
    assert!(vm.flags.is_paused(), "the source must stay paused");
    assert_eq!(vm.flags.resumes.load(Ordering::SeqCst), 0);
    // The target got Switchover and owns the VM: exactly one copy runs.
    assert!(o.target.running);
    assert!(o.recv.is_ok());
}

#[test]
fn benchmark_helper_reports_both_rates() {
    let r = bench::bench_migrate(8, false).unwrap();
    assert!(r.migration_mib_s > 0.0 && r.raw_tcp_mib_s > 0.0, "{r:?}");
}

/// `cargo test --release -p ray-migration --test migration -- --ignored --nocapture`
#[test]
#[ignore = "benchmark: run in release"]
fn throughput_vs_raw_tcp() {
    for compress in [false, true] {
        let r = bench::bench_migrate(256, compress).unwrap();
        println!("lz4={compress}: {r:?}");
    }
}

/// Source memory the sender sends in place: a frozen copy of the guest (no dirtier
/// runs), counting the copies the sender makes through `read`.
struct InPlace {
    frozen: OwnedMemory,
    reads: AtomicU64,
}

impl GuestMemory for InPlace {
    fn layout(&self) -> &MemoryLayout {
        self.frozen.layout()
    }
    fn span(&self, gpa: u64, len: u64) -> Result<GuestSpan<'_>, MemoryError> {
        self.frozen.span(gpa, len)
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.frozen.read(gpa, buf)
    }
    fn write(&self, _: u64, _: &[u8]) -> Result<(), MemoryError> {
        unreachable!("the source is never written")
    }
}

#[test]
fn pages_go_straight_from_guest_memory_when_it_allows() {
    let (src, mut vm) = source();
    let mem = InPlace {
        frozen: OwnedMemory::copy_of(&*src).unwrap(),
        reads: AtomicU64::new(0),
    };
    // Zero copy needs a plaintext stream: the cipher gets copies.
    let mut cfg = SenderConfig::new(key("correct horse battery"));
    cfg.protection = Protection::Plaintext;
    let o = simple(
        &mut vm,
        &mem,
        &cfg,
        "correct horse battery",
        compat(4),
        InMemoryTarget::default(),
    );
    let r = o.send.unwrap();
    assert!(o.recv.is_ok() && o.target.running);
    assert_eq!(o.dst.contents(), src.contents());
    assert_eq!(mem.reads.load(Ordering::SeqCst), 0, "a page was copied");
    // 70% of the pages hold data; the zero pages cost a bit each.
    let data = src.contents().iter().flatten().count() as u64 * 7 / 10;
    assert!(r.bytes_sent < data * 11 / 10, "{} bytes sent", r.bytes_sent);
}

/// Source memory whose first read of one page returns a byte that memory no longer
/// holds by the time the VM is paused, with nothing in the dirty log: a missed write.
/// That first read is served from `shadow`, a copy of the guest with that byte flipped.
struct MissedWrite {
    inner: Arc<MemGuest>,
    shadow: OwnedMemory,
    page: u64,
    served: AtomicBool,
}

impl MissedWrite {
    fn new(inner: Arc<MemGuest>, page: u64) -> Self {
        let shadow = OwnedMemory::copy_of(&*inner).unwrap();
        let b: u8 = shadow.load(page).unwrap();
        shadow.store(page, b ^ 0xff).unwrap();
        Self {
            inner,
            shadow,
            page,
            served: AtomicBool::new(false),
        }
    }
}

impl GuestMemory for MissedWrite {
    fn layout(&self) -> &MemoryLayout {
        self.inner.layout()
    }
    fn span(&self, gpa: u64, len: u64) -> Result<GuestSpan<'_>, MemoryError> {
        let end = gpa + len;
        if (gpa..end).contains(&self.page) && !self.served.swap(true, Ordering::SeqCst) {
            return self.shadow.span(gpa, len);
        }
        self.inner.span(gpa, len)
    }
}

#[test]
fn recheck_finds_a_write_the_dirty_log_missed() {
    for recheck in [false, true] {
        let (src, mut vm) = source();
        let mem = MissedWrite::new(src.clone(), 0x3000);
        let mut cfg = SenderConfig::new(key("correct horse battery"));
        cfg.recheck_memory = recheck;
        let o = simple(
            &mut vm,
            &mem,
            &cfg,
            "correct horse battery",
            compat(4),
            InMemoryTarget::default(),
        );
        if !recheck {
            // Both sides agree on what was sent: only rereading the source can tell.
            assert!(o.send.is_ok() && o.target.running);
            continue;
        }
        let f = o.send.unwrap_err();
        assert!(
            f.error.to_string().contains("page at 0x3000")
                && f.error.to_string().contains("dirty log did not report"),
            "{f}"
        );
        assert_eq!(f.failed_in, SessionState::Verification);
        assert_source_running(&vm, &f);
        assert!(o.target.discarded && !o.target.running);
    }
}
