//! Live migration in the VMM: the KVM side of `ray-migration`'s drivers.
//!
//! The drivers run on a migration thread of their own. Guest memory is read (source) and
//! written (target) directly from that thread through [`MemAccess`]; everything else —
//! dirty logging, pause, resume, throttle, saving and restoring the machine — goes to the
//! controller thread as a typed [`MigrationOp`] through [`Link`], which waits for the
//! answer. The controller therefore stays the single owner of VM state, and keeps
//! answering the API (`GET /vm`, `GET /vm/migration`) during a migration.
//!
//! # Split brain
//!
//! The VMM follows the rule in `ray_migration`'s crate docs. On the source the VM sits in
//! `MigrationSource` until the driver returns: `Completed` moves it to `Terminated` (its
//! vCPUs are never resumed: the process ends), a failure before the `Switchover` frame
//! moves it back to `Running` (the driver already lifted the throttle and resumed it), and
//! a failure after `Switchover` without the target's explicit refusal leaves it *paused*
//! in `MigrationSource` ("paused_ownership_uncertain"): the target may be running it, so
//! only an operator who fenced the target may bring it back (`ray vm stop` discards it).
//! On the target the state blob is only checked when it arrives; the machine is built and
//! its vCPUs started by [`TargetVm::resume`], which the driver calls after `Switchover`.
use std::fs::File;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ray_api::vmm::{MigrationRole, MigrationStatus, VmConfig};
use ray_migration::protocol::MemoryRegion;
use ray_migration::{
    CancelToken, CompatInfo, DirtyBitmap, GuestMemoryAccess, MemoryError, ProgressHandle,
    SessionState, SourceVm, TargetVm, VmError,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::controller::Message;
use crate::machine::MachineState;
use crate::memory::GuestMem;
use crate::vstate::Flavour;

pub const PAGE_SIZE: u64 = 4096;
/// Version of the state blob ([`MigrationState`] as JSON); part of the flavour string.
const STATE_FORMAT: u32 = 1;

/// Wall clock in µs since the Unix epoch (comparable between two VMMs on one host).
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The snake-case name of a session state, as the API spells it.
pub fn state_name(s: SessionState) -> &'static str {
    match s {
        SessionState::Idle => "idle",
        SessionState::PreCopy => "pre_copy",
        SessionState::StopAndCopy => "stop_and_copy",
        SessionState::Verification => "verification",
        SessionState::Completing => "completing",
        SessionState::Completed => "completed",
        SessionState::Failed => "failed",
        SessionState::RollingBack => "rolling_back",
    }
}

/// What the target must match: vCPUs, memory layout, CPUID and hypervisor flavour.
pub fn compat_info(vcpus: u8, memory_bytes: u64, flavour: Flavour, cpu: &str) -> CompatInfo {
    CompatInfo {
        vcpus: u32::from(vcpus),
        page_size: PAGE_SIZE as u32,
        regions: crate::boot::layout::ram_regions(memory_bytes)
            .into_iter()
            .map(|(gpa, len)| MemoryRegion {
                gpa: gpa.0,
                size: len as u64,
            })
            .collect(),
        cpuid_fingerprint: *blake3::hash(cpu.as_bytes()).as_bytes(),
        flavour: format!("rayvisor-kvm-x86_64-{}/{STATE_FORMAT}", flavour.name()),
    }
}

/// The state blob: everything but guest memory.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct MigrationState {
    pub config: VmConfig,
    pub uptime_ms: u64,
    pub machine: MachineState,
}

/// Where a migration goes to or listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl Endpoint {
    /// `unix:/path` or `HOST:PORT`.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("migration address {s:?} names no socket path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(p)));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!(
                "migration address {s:?} is neither HOST:PORT nor unix:/path"
            ));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!(
                "migration address {s:?} is neither HOST:PORT (port 0-65535) nor unix:/path"
            ));
        }
        Ok(Endpoint::Tcp(s.to_string()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => f.write_str(a),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected migration stream.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

pub fn connect(to: &Endpoint, timeout: Duration) -> io::Result<Stream> {
    use ray_migration::transport;
    match to {
        Endpoint::Tcp(a) => transport::connect_tcp(a.as_str(), timeout).map(Stream::Tcp),
        Endpoint::Unix(p) => transport::connect_unix(p, timeout).map(Stream::Unix),
    }
}

/// A bound listener for one incoming migration.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn bind(at: &Endpoint) -> io::Result<Listener> {
        let l = match at {
            Endpoint::Tcp(a) => Listener::Tcp(TcpListener::bind(a.as_str())?),
            Endpoint::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Listener::Unix(UnixListener::bind(p)?, p.clone())
            }
        };
        match &l {
            Listener::Tcp(t) => t.set_nonblocking(true)?,
            Listener::Unix(u, _) => u.set_nonblocking(true)?,
        }
        Ok(l)
    }

    /// The bound address (the real port when asked for port 0).
    pub fn local(&self) -> String {
        match self {
            Listener::Tcp(t) => t
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// Sleeps until a connection is pending or 100 ms passed (so a cancel is seen soon),
    /// without adding latency to the accept the way a fixed sleep would.
    fn wait_readable(&self) {
        let fd = match self {
            Listener::Tcp(t) => t.as_raw_fd(),
            Listener::Unix(u, _) => u.as_raw_fd(),
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes only the one pollfd passed, which lives on this
        // stack frame; the listener's fd stays open for the call.
        unsafe { libc::poll(&mut p, 1, 100) };
    }

    /// Waits for one connection until `cancel`; sockets get `timeout` for reads and writes.
    pub fn accept(&self, cancel: &CancelToken, timeout: Duration) -> io::Result<Stream> {
        loop {
            if cancel.is_cancelled() {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "cancelled while waiting for the source",
                ));
            }
            let r = match self {
                Listener::Tcp(t) => t.accept().map(|(s, _)| Stream::Tcp(s)),
                Listener::Unix(u, _) => u.accept().map(|(s, _)| Stream::Unix(s)),
            };
            match r {
                Ok(s) => {
                    match &s {
                        Stream::Tcp(t) => {
                            t.set_nonblocking(false)?;
                            t.set_nodelay(true)?;
                            t.set_read_timeout(Some(timeout))?;
                            t.set_write_timeout(Some(timeout))?;
                        }
                        Stream::Unix(u) => {
                            u.set_nonblocking(false)?;
                            u.set_read_timeout(Some(timeout))?;
                            u.set_write_timeout(Some(timeout))?;
                        }
                    }
                    return Ok(s);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait_readable(),
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Reads a pre-shared key file, naming the file in every error.
pub fn read_key(path: &Path) -> Result<ray_migration::PresharedKey, String> {
    let secret = std::fs::read(path)
        .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
    let trimmed = secret.trim_ascii();
    ray_migration::PresharedKey::new(trimmed)
        .map_err(|e| format!("the key file {}: {e}", path.display()))
}

/// One host-wide migration slot: an exclusive `flock` on one of `limit` files in the
/// runtime directory, held until dropped (or the process dies).
pub struct Slot(#[allow(dead_code)] File);

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
        // SAFETY: flock on a descriptor we own; it only takes an advisory lock.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Slot(f));
        }
    }
    Err(format!(
        "this host already runs {limit} migrations, its limit; retry when one finishes (or raise max_concurrent)"
    ))
}

/// Per-page "may hold data" bits: a clear bit means the page is known to be zero, so it is
/// neither read nor written. Source: the memfd's data extents when dirty logging started,
/// plus every page a dirty log reported since. Target: every page written with data.
pub struct PageMap {
    regions: Vec<(u64, u64)>,
    bits: Vec<Vec<AtomicU64>>,
    /// Off: every page is read and written.
    enabled: AtomicBool,
}

impl PageMap {
    fn new(regions: &[(u64, u64)]) -> Self {
        Self {
            enabled: AtomicBool::new(false),
            regions: regions.to_vec(),
            bits: regions
                .iter()
                .map(|&(_, len)| {
                    (0..(len / PAGE_SIZE).div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
        }
    }

    fn locate(&self, gpa: u64) -> Option<(usize, usize)> {
        self.regions
            .iter()
            .position(|&(start, len)| gpa >= start && gpa < start + len)
            .map(|r| (r, ((gpa - self.regions[r].0) / PAGE_SIZE) as usize))
    }

    fn get(&self, gpa: u64) -> bool {
        self.locate(gpa).is_none_or(|(r, p)| {
            self.bits[r][p / 64].load(Ordering::Acquire) & (1 << (p % 64)) != 0
        })
    }

    fn set(&self, gpa: u64) {
        if let Some((r, p)) = self.locate(gpa) {
            self.bits[r][p / 64].fetch_or(1 << (p % 64), Ordering::Release);
        }
    }

    fn set_range(&self, gpa: u64, len: u64) {
        let mut at = gpa & !(PAGE_SIZE - 1);
        while at < gpa + len {
            self.set(at);
            at += PAGE_SIZE;
        }
    }

    fn mark_dirty(&self, logs: &[DirtyBitmap]) {
        for (r, log) in logs.iter().enumerate().take(self.bits.len()) {
            for p in log.iter() {
                self.bits[r][p / 64].fetch_or(1 << (p % 64), Ordering::Release);
            }
        }
    }
}

/// Guest memory as the migration drivers see it: direct copies from and to the mapping.
pub struct MemAccess {
    /// Keeps the mapping alive as long as the pointers below are used.
    mem: GuestMem,
    regions: Vec<(u64, *mut u8, u64)>,
    map: Arc<PageMap>,
    /// Target: the prefault of this memory, if one runs; once complete, incoming pages
    /// need no populating.
    prefault: Option<Arc<crate::prefault::Prefault>>,
}

// SAFETY: the raw pointers point into mappings owned by `mem` (kept alive by this struct);
// concurrent access from several threads is what guest memory is for: the vCPUs write it
// while the migration reads it, and every page changed during a read is in the dirty log
// and sent again.
unsafe impl Send for MemAccess {}
// SAFETY: as above; `&self` methods only copy bytes in and out of the mapping.
unsafe impl Sync for MemAccess {}

impl MemAccess {
    pub fn new(mem: &GuestMem) -> Self {
        let regions: Vec<(u64, *mut u8, u64)> = mem
            .iter()
            .map(|r| {
                let host = r
                    .get_host_address(MemoryRegionAddress(0))
                    .expect("offset 0 lies inside every mapped region");
                (r.start_addr().0, host, r.len())
            })
            .collect();
        let spans: Vec<(u64, u64)> = regions.iter().map(|&(g, _, l)| (g, l)).collect();
        Self {
            mem: mem.clone(),
            map: Arc::new(PageMap::new(&spans)),
            prefault: None,
            regions,
        }
    }

    /// Target: `p` is allocating all of this memory ahead of the pages.
    pub fn with_prefault(mut self, p: Option<Arc<crate::prefault::Prefault>>) -> Self {
        self.prefault = p;
        self
    }

    /// Target: the memory is fresh (all zero); zero pages into untouched memory are skipped.
    pub fn track_target_writes(&self) {
        self.map.enabled.store(true, Ordering::SeqCst);
    }

    fn host(&self, gpa: u64, len: usize) -> Result<*mut u8, MemoryError> {
        self.regions
            .iter()
            .find(|&&(start, _, size)| {
                gpa >= start
                    && gpa
                        .checked_add(len as u64)
                        .is_some_and(|end| end <= start + size)
            })
            .map(|&(start, host, _)| {
                // SAFETY: gpa - start + len <= size (checked above): the offset stays
                // inside the region's mapping.
                unsafe { host.add((gpa - start) as usize) }
            })
            .ok_or_else(|| MemoryError {
                gpa,
                len,
                reason: "not inside guest RAM".into(),
            })
    }
}

impl GuestMemoryAccess for MemAccess {
    fn regions(&self) -> Vec<MemoryRegion> {
        self.regions
            .iter()
            .map(|&(gpa, _, size)| MemoryRegion { gpa, size })
            .collect()
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let host = self.host(gpa, buf.len())?;
        let use_map = self.map.enabled.load(Ordering::Acquire);
        if !use_map {
            // SAFETY: `host` maps `buf.len()` bytes (checked by `host`); a concurrent
            // guest write can only tear a page the dirty log reports again.
            unsafe { std::ptr::copy_nonoverlapping(host, buf.as_mut_ptr(), buf.len()) };
            return Ok(());
        }
        let mut off = 0usize;
        while off < buf.len() {
            let at = gpa + off as u64;
            let n = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(buf.len() - off);
            if self.map.get(at) {
                // SAFETY: [host + off, + n) lies inside the range checked by `host`.
                unsafe { std::ptr::copy_nonoverlapping(host.add(off), buf[off..].as_mut_ptr(), n) };
            } else {
                buf[off..off + n].fill(0);
            }
            off += n;
        }
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let host = self.host(gpa, data.len())?;
        let use_map = self.map.enabled.load(Ordering::Acquire);
        if use_map && !self.map.get(gpa) && ray_migration::protocol::is_zero(data) {
            // Fresh target memory is zero already: do not allocate the page.
            return Ok(());
        }
        // SAFETY: `host` maps `data.len()` bytes (checked by `host`); on the target no vCPU
        // runs while pages arrive.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host, data.len()) };
        if use_map {
            self.map.set_range(gpa, data.len() as u64);
        }
        Ok(())
    }

    fn write_zeros(&self, gpa: u64, len: usize) -> Result<(), MemoryError> {
        let host = self.host(gpa, len)?;
        if self.map.enabled.load(Ordering::Acquire) {
            let first = gpa & !(PAGE_SIZE - 1);
            let untouched = (first..gpa + len as u64)
                .step_by(PAGE_SIZE as usize)
                .all(|p| !self.map.get(p));
            if untouched {
                // Fresh target memory is zero already: nothing to allocate or scan.
                return Ok(());
            }
        }
        // SAFETY: `host` maps `len` bytes (checked by `host`); on the target no vCPU runs
        // while pages arrive.
        unsafe { std::ptr::write_bytes(host, 0, len) };
        Ok(())
    }

    fn fill_in_place(
        &self,
        gpa: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<bool, MemoryError> {
        let host = self.host(gpa, len)?;
        // SAFETY: `host` maps `len` bytes (checked by `host`) for as long as `self.mem`
        // lives. Only the receiver touches target memory (no vCPU runs before the
        // switch-over), so this is the only reference to these bytes while it lives.
        let dst = unsafe { std::slice::from_raw_parts_mut(host, len) };
        if !self.prefault.as_ref().is_some_and(|p| p.is_complete()) {
            // Allocates the run's pages in one call instead of one fault per page as the
            // socket fills them. Best effort: without it the copy faults them in.
            let start = host as usize & !(PAGE_SIZE as usize - 1);
            let end = (host as usize + len).next_multiple_of(PAGE_SIZE as usize);
            // SAFETY: [start, end) lies inside guest memory (checked by `host`, widened
            // to whole pages of the same page-aligned mapping), kept alive by `self.mem`.
            let _ = unsafe { crate::prefault::populate_write(start as *mut u8, end - start) };
        }
        // Walk the run's pages now, many at once: the kernel's copy from the socket then
        // finds their translations cached instead of stalling on one TLB walk per page.
        for page in dst.chunks(PAGE_SIZE as usize) {
            ray_migration::vm::prefetch_write(page.as_ptr());
        }
        fill(dst);
        if self.map.enabled.load(Ordering::Acquire) {
            self.map.set_range(gpa, len as u64);
        }
        Ok(true)
    }

    fn known_zero(&self, gpa: u64) -> bool {
        self.map.enabled.load(Ordering::Acquire) && !self.map.get(gpa)
    }

    fn guest_bytes(&self, gpa: u64, len: usize) -> Option<&[u8]> {
        let host = self.host(gpa, len).ok()?;
        // SAFETY: `host` maps `len` bytes (checked by `host`) for as long as `self.mem`,
        // and so `self`, lives. Running vCPUs may write these bytes while they are read:
        // the sender reads each byte once (zero check, hash, the kernel's copy) and never
        // relies on two reads agreeing; a page changed meanwhile is in the next dirty log
        // and sent again, the last time with the vCPUs paused.
        Some(unsafe { std::slice::from_raw_parts(host, len) })
    }
}

/// Whether the environment variable `RAY_FAULT` names `point`: failure injection for the
/// end-to-end tests, at points no outside action can hit deterministically.
pub fn fault_injected(point: &str) -> bool {
    std::env::var("RAY_FAULT").is_ok_and(|v| v.split(',').any(|p| p == point))
}

/// What the migration thread asks of the controller.
#[derive(Debug)]
pub enum MigrationOp {
    StartDirtyLog,
    DirtyLog,
    StopDirtyLog,
    Pause,
    Resume,
    Throttle(u8),
    SaveState,
    RestoreState(Vec<u8>),
    TargetResume,
    Discard,
}

impl MigrationOp {
    fn verb(&self) -> &'static str {
        match self {
            MigrationOp::StartDirtyLog => "start dirty logging",
            MigrationOp::DirtyLog => "read the dirty log",
            MigrationOp::StopDirtyLog => "stop dirty logging",
            MigrationOp::Pause => "pause",
            MigrationOp::Resume => "resume",
            MigrationOp::Throttle(_) => "throttle its vCPUs",
            MigrationOp::SaveState => "save its state",
            MigrationOp::RestoreState(_) => "restore the state",
            MigrationOp::TargetResume => "resume",
            MigrationOp::Discard => "discard",
        }
    }
}

#[derive(Debug)]
pub enum OpReply {
    Done,
    Dirty(Vec<Vec<u64>>),
    State(Vec<u8>),
}

pub type OpResult = Result<OpReply, String>;

/// The migration thread's handle on the controller: each call is one typed request.
pub struct Link {
    inbox: Sender<Message>,
    /// Region sizes in pages, for shaping dirty logs.
    pages: Vec<usize>,
    /// Source: the [`MemAccess`] whose page map dirty logs update.
    source_mem: Option<Arc<MemAccess>>,
}

impl Link {
    pub fn new(inbox: Sender<Message>, mem: &MemAccess) -> Self {
        Self {
            inbox,
            pages: mem
                .regions
                .iter()
                .map(|&(_, _, l)| (l / PAGE_SIZE) as usize)
                .collect(),
            source_mem: None,
        }
    }

    /// Source: once dirty logging is on, `mem`'s page map is seeded from the memfd's data
    /// extents, so pages the guest never touched are sent as zero without being read (and
    /// allocated); every later dirty log marks its pages as holding data.
    pub fn with_source_mem(mut self, mem: Arc<MemAccess>) -> Self {
        self.source_mem = Some(mem);
        self
    }

    fn call(&self, op: MigrationOp) -> Result<OpReply, VmError> {
        let verb = op.verb();
        let (tx, rx) = mpsc::channel();
        let gone = || VmError {
            op: verb,
            reason: "the VMM is shutting down".into(),
        };
        self.inbox
            .send(Message::Migration(op, tx))
            .map_err(|_| gone())?;
        rx.recv()
            .map_err(|_| gone())?
            .map_err(|reason| VmError { op: verb, reason })
    }

    fn done(&self, op: MigrationOp) -> Result<(), VmError> {
        self.call(op).map(|_| ())
    }
}

impl SourceVm for Link {
    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        self.done(MigrationOp::StartDirtyLog)?;
        if let Some(mem) = &self.source_mem {
            // Logging is on: a page outside these extents now is either still a hole
            // (zero) or written from now on, and then in a later dirty log.
            for (gpa, len) in crate::memory::data_extents(&mem.mem) {
                mem.map.set_range(gpa, len);
            }
            mem.map.enabled.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn dirty_log(&mut self) -> Result<Vec<DirtyBitmap>, VmError> {
        let OpReply::Dirty(words) = self.call(MigrationOp::DirtyLog)? else {
            return Err(VmError {
                op: "read the dirty log",
                reason: "the controller answered with something else".into(),
            });
        };
        let logs: Vec<DirtyBitmap> = words
            .into_iter()
            .zip(&self.pages)
            .map(|(w, &n)| DirtyBitmap::from_words(w, n))
            .collect();
        if let Some(mem) = &self.source_mem {
            mem.map.mark_dirty(&logs);
        }
        Ok(logs)
    }

    fn stop_dirty_log(&mut self) -> Result<(), VmError> {
        self.done(MigrationOp::StopDirtyLog)
    }

    fn pause(&mut self) -> Result<(), VmError> {
        self.done(MigrationOp::Pause)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.done(MigrationOp::Resume)
    }

    fn throttle(&mut self, percent: u8) -> Result<(), VmError> {
        self.done(MigrationOp::Throttle(percent))
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        match self.call(MigrationOp::SaveState)? {
            OpReply::State(s) => Ok(s),
            _ => Err(VmError {
                op: "save its state",
                reason: "the controller answered with something else".into(),
            }),
        }
    }
}

impl TargetVm for Link {
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.done(MigrationOp::RestoreState(state.to_vec()))
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.done(MigrationOp::TargetResume)
    }

    fn discard(&mut self) {
        let _ = self.done(MigrationOp::Discard);
    }
}

/// What the controller knows of this VM's migration besides the driver's progress.
#[derive(Debug, Clone)]
pub struct Record {
    pub role: MigrationRole,
    pub peer: String,
    pub started: Instant,
    pub finished: Option<Duration>,
    pub state_override: Option<SessionState>,
    pub error: Option<String>,
    pub vm: &'static str,
    pub downtime_ms: Option<f64>,
    pub total_ms: Option<f64>,
    pub bulk_mib_s: Option<f64>,
    pub forced: bool,
    pub passes: Option<u32>,
    pub bytes_sent: Option<u64>,
    pub paused_at_unix_us: Option<u64>,
    pub resumed_at_unix_us: Option<u64>,
    pub first_heartbeat_unix_us: Option<u64>,
    /// Target: guest memory being populated ahead of the transfer.
    pub prefault: Option<Arc<crate::prefault::Prefault>>,
}

/// One migration of this VM: shared by the controller and the migration thread.
#[derive(Clone)]
pub struct Handle {
    pub record: Arc<Mutex<Record>>,
    pub progress: ProgressHandle,
    pub cancel: CancelToken,
}

impl Handle {
    pub fn new(role: MigrationRole, peer: String) -> Self {
        Self {
            record: Arc::new(Mutex::new(Record {
                role,
                peer,
                started: Instant::now(),
                finished: None,
                state_override: None,
                error: None,
                vm: "migrating",
                downtime_ms: None,
                total_ms: None,
                bulk_mib_s: None,
                forced: false,
                passes: None,
                bytes_sent: None,
                paused_at_unix_us: None,
                resumed_at_unix_us: None,
                first_heartbeat_unix_us: None,
                prefault: None,
            })),
            progress: ProgressHandle::new(),
            cancel: CancelToken::new(),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut Record)) {
        let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut r);
    }

    /// Source: the vCPUs are stopped for the stop-and-copy (until the target resumes or a
    /// rollback resumes them here).
    pub fn paused_for_copy(&self) -> bool {
        let r = self.record.lock().unwrap_or_else(|p| p.into_inner());
        r.paused_at_unix_us.is_some() && r.finished.is_none()
    }

    pub fn is_finished(&self) -> bool {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finished
            .is_some()
    }

    pub fn status(&self) -> MigrationStatus {
        let p = self.progress.get();
        let r = self
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let state = r.state_override.unwrap_or(p.state);
        MigrationStatus {
            role: r.role,
            peer: r.peer,
            state: state_name(state).into(),
            pass: r.passes.unwrap_or(p.pass),
            pages_sent: p.pages_sent,
            bytes_sent: r.bytes_sent.unwrap_or(p.bytes_sent),
            dirty_pages: p.dirty_pages,
            dirty_rate_mib_s: p.dirty_rate_bps / (1u64 << 20) as f64,
            bandwidth_mib_s: p.bandwidth_bps / (1u64 << 20) as f64,
            expected_downtime_ms: p.expected_downtime.as_secs_f64() * 1e3,
            throttle_percent: p.throttle_percent,
            elapsed_ms: r
                .finished
                .unwrap_or_else(|| r.started.elapsed())
                .as_millis() as u64,
            error: r.error,
            vm: r.vm.into(),
            downtime_ms: r.downtime_ms,
            total_ms: r.total_ms,
            bulk_mib_s: r.bulk_mib_s,
            forced: r.forced,
            paused_at_unix_us: r.paused_at_unix_us,
            resumed_at_unix_us: r.resumed_at_unix_us,
            first_heartbeat_unix_us: r.first_heartbeat_unix_us,
            prefault_bytes: r.prefault.as_ref().map(|p| p.done_bytes()),
            prefault_total_bytes: r.prefault.as_ref().map(|p| p.total_bytes()),
            prefault_error: r.prefault.as_ref().and_then(|p| p.error()),
        }
    }
}

/// How a migration thread ended.
pub enum Ended {
    Source(Result<ray_migration::SendReport, SourceError>),
    Target(Result<ray_migration::ReceiveReport, TargetError>),
}

pub enum SourceError {
    /// Nothing was touched (no connection): the VM runs on.
    Setup(String),
    Driver(Box<ray_migration::SendFailure>),
}

pub enum TargetError {
    Setup(String),
    Driver(Box<ray_migration::ReceiveFailure>),
}

/// Polls the heartbeat page after a resume and records when the counter first moves.
/// `baseline` is the counter read before the vCPUs started.
pub fn watch_heartbeat(mem: GuestMem, baseline: Option<u64>, handle: Handle) {
    let Some(start) = baseline else { return };
    let _ = std::thread::Builder::new()
        .name("migration-heartbeat".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Some((c, _)) = crate::heartbeat::sample(&mem) {
                    if c != start {
                        let t = unix_us();
                        handle.update(|r| r.first_heartbeat_unix_us = Some(t));
                        return;
                    }
                }
                std::thread::sleep(Duration::from_micros(20));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn endpoints_parse_or_say_what_is_wrong() {
        assert_eq!(
            Endpoint::parse("10.0.0.2:7000").unwrap(),
            Endpoint::Tcp("10.0.0.2:7000".into())
        );
        assert_eq!(
            Endpoint::parse("unix:/run/m.sock").unwrap(),
            Endpoint::Unix("/run/m.sock".into())
        );
        assert!(Endpoint::parse("10.0.0.2")
            .unwrap_err()
            .contains("neither HOST:PORT"));
        assert!(Endpoint::parse("h:99999").unwrap_err().contains("65535"));
        assert!(Endpoint::parse("unix:")
            .unwrap_err()
            .contains("no socket path"));
    }

    #[test]
    fn mem_access_copies_and_skips_known_zero_pages() {
        let mem = crate::memory::create(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let target = MemAccess::new(&mem);
        target.track_target_writes();
        target.write(0x2000, &[0u8; 4096]).unwrap();
        assert!(
            !target.map.get(0x2000),
            "a zero page into fresh memory is skipped"
        );
        target.write(0x3000, &[7u8; 4096]).unwrap();
        let mut buf = vec![1u8; 8192];
        target.read(0x2000, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 7));
        target.write(0x3000, &[0u8; 4096]).unwrap();
        target.read(0x3000, &mut buf[..4096]).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0), "data pages get zeroed");
        target.write_zeros(0x4000, 4096).unwrap();
        assert!(
            !target.map.get(0x4000),
            "zeros into fresh memory are skipped"
        );
        target.write(0x5000, &[7u8; 4096]).unwrap();
        target.write_zeros(0x5000, 4096).unwrap();
        target.read(0x5000, &mut buf[..4096]).unwrap();
        assert!(
            buf[..4096].iter().all(|&b| b == 0),
            "written pages get zeroed"
        );
        let e = target.read(0xff000, &mut buf).unwrap_err();
        assert!(e.to_string().contains("not inside guest RAM"), "{e}");
    }

    #[test]
    fn source_pages_are_read_in_place_and_holes_are_known_zero() {
        let mem = crate::memory::create(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let m = MemAccess::new(&mem);
        m.write(0x5000, &[3u8; 4096]).unwrap();
        assert!(
            !m.known_zero(0x6000),
            "nothing is known before tracking starts"
        );
        for (gpa, len) in crate::memory::data_extents(&mem) {
            m.map.set_range(gpa, len);
        }
        m.map.enabled.store(true, Ordering::SeqCst);
        assert!(m.known_zero(0x6000) && !m.known_zero(0x5000));
        assert_eq!(m.guest_bytes(0x5000, 4096).unwrap(), &[3u8; 4096][..]);
        assert!(m.guest_bytes(0xff000, 8192).is_none(), "past the end");
    }

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
