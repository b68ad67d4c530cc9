//! The VMM's metrics, served as `GET /metrics` in Prometheus' text format (version 0.0.4).
//!
//! One VMM process runs one VM, so the counters are process-wide statics that the code
//! doing the work bumps directly: each vCPU thread its own exit counters (one writer per
//! counter, no read-modify-write on the exit path), the dirty log its page count, the API
//! its snapshots, the migration glue its outcomes, the device builder each device's own
//! counters ([`device_built`]). A scrape reads them and /proc; it never
//! waits for the VMM thread, so it answers while a snapshot or a stop is under way.
//!
//! Names follow Prometheus' rules: a `ray_` prefix, base units in the name (`_seconds`,
//! `_bytes`), `_total` on counters; durations are summaries (`_sum` and `_count`).
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ray_devices::pci::ConfigCounters;
use ray_devices::virtio::net::NetCounters;
use ray_devices::virtio::vsock::VsockCounters;

/// Why a vCPU came out of KVM_RUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// A port access (the UART, the idle and power ports).
    Io,
    /// An access to unbacked guest-physical memory.
    Mmio,
    Hlt,
    /// KVM_EXIT_INTR.
    Intr,
    /// KVM_RUN returned EINTR/EAGAIN: the VMM kicked the vCPU (pause, throttle).
    Signal,
    /// A triple fault.
    Shutdown,
    /// The guest asked to power off or reset (KVM_EXIT_SYSTEM_EVENT).
    SystemEvent,
    /// Anything else (the vCPU fails on it).
    Other,
}

impl ExitReason {
    pub const ALL: [ExitReason; 8] = [
        ExitReason::Io,
        ExitReason::Mmio,
        ExitReason::Hlt,
        ExitReason::Intr,
        ExitReason::Signal,
        ExitReason::Shutdown,
        ExitReason::SystemEvent,
        ExitReason::Other,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            ExitReason::Io => "io",
            ExitReason::Mmio => "mmio",
            ExitReason::Hlt => "hlt",
            ExitReason::Intr => "intr",
            ExitReason::Signal => "signal",
            ExitReason::Shutdown => "shutdown",
            ExitReason::SystemEvent => "system_event",
            ExitReason::Other => "other",
        }
    }
}

/// The exit counters of one vCPU. Only its own thread writes them; the cache line is its
/// own too, so vCPUs never contend.
#[repr(align(64))]
#[derive(Default)]
pub struct VcpuCounters {
    exits: [AtomicU64; ExitReason::ALL.len()],
}

impl VcpuCounters {
    /// Counts one exit. Called only by the vCPU's own thread: a plain load and store is
    /// enough (readers see a value that was current a moment ago).
    #[inline]
    pub fn count(&self, reason: ExitReason) {
        let c = &self.exits[reason as usize];
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    pub fn get(&self, reason: ExitReason) -> u64 {
        self.exits[reason as usize].load(Ordering::Relaxed)
    }
}

static VCPUS: Mutex<Vec<Arc<VcpuCounters>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The counters of vCPU `index`. They outlive its thread: a VM rebuilt after a suspend
/// counts on.
pub fn vcpu(index: u8) -> Arc<VcpuCounters> {
    let mut v = lock(&VCPUS);
    while v.len() <= usize::from(index) {
        v.push(Arc::default());
    }
    v[usize::from(index)].clone()
}

/// Change detection of each emulated display, by display number.
static DISPLAYS: Mutex<Vec<Arc<ray_display::damage::ChangeStats>>> = Mutex::new(Vec::new());

/// The change-detection counts of display `index` (they count on across machines).
pub fn display_changes(index: usize) -> Arc<ray_display::damage::ChangeStats> {
    let mut v = lock(&DISPLAYS);
    while v.len() <= index {
        v.push(Arc::default());
    }
    v[index].clone()
}

fn render_displays(out: &mut String) {
    let displays = lock(&DISPLAYS).clone();
    if displays.is_empty() {
        return;
    }
    let reports: Vec<_> = displays.iter().map(|d| d.report()).collect();
    type Count = fn(&ray_api::gpu::ChangeDetection) -> u64;
    let families: [(&str, &str, &str, Count); 4] = [
        (
            "ray_display_dirty_pages_total",
            "counter",
            "Framebuffer pages of each emulated display the dirty log reported written.",
            |r| r.dirty_pages,
        ),
        (
            "ray_display_looks_total",
            "counter",
            "Looks of viewers at each emulated display that compared tiles (an idle display compares none).",
            |r| r.looks,
        ),
        (
            "ray_display_tiles_examined_total",
            "counter",
            "64x64 tiles of each emulated display compared with what a viewer has.",
            |r| r.tiles_examined,
        ),
        (
            "ray_display_tiles_changed_total",
            "counter",
            "Compared tiles of each emulated display that had changed.",
            |r| r.tiles_changed,
        ),
    ];
    for (name, kind, help, get) in families {
        family(out, name, kind, help);
        for (i, r) in reports.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{display=\"{i}\",mode=\"{}\"}} {}",
                r.mode,
                get(r)
            );
        }
    }
}

/// Pages the dirty log has reported written.
static DIRTY_PAGES: AtomicU64 = AtomicU64::new(0);
/// Pages per second over the last collection interval, as f64 bits.
static DIRTY_RATE: AtomicU64 = AtomicU64::new(0);
static DIRTY_LAST: Mutex<Option<Instant>> = Mutex::new(None);

/// The dirty log was just turned on: the next collection's interval starts now.
pub fn dirty_log_started() {
    *lock(&DIRTY_LAST) = Some(Instant::now());
}

/// The dirty log was collected and `pages` were found written since the previous
/// collection.
pub fn dirty_pages_collected(pages: u64) {
    DIRTY_PAGES.fetch_add(pages, Ordering::Relaxed);
    let now = Instant::now();
    let previous = lock(&DIRTY_LAST).replace(now);
    if let Some(t) = previous {
        let secs = now.duration_since(t).as_secs_f64();
        if secs > 0.0 {
            DIRTY_RATE.store((pages as f64 / secs).to_bits(), Ordering::Relaxed);
        }
    }
}

/// A summary without quantiles: how many, and their sum.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
struct Summary {
    count: u64,
    sum: f64,
}

impl Summary {
    fn observe(&mut self, v: f64) {
        self.count += 1;
        self.sum += v;
    }
}

#[derive(Default)]
struct Snapshots {
    full: u64,
    incremental: u64,
    failed: u64,
    pause_seconds: Summary,
    write_seconds: Summary,
    written_bytes: u64,
}

static SNAPSHOTS: Mutex<Option<Snapshots>> = Mutex::new(None);

/// A snapshot was written: its kind, how long the vCPUs were stopped and the writing
/// took (ms), and its size on disk.
pub fn snapshot_taken(
    kind: ray_api::vmm::SnapshotKindName,
    paused_ms: f64,
    write_ms: f64,
    disk_bytes: u64,
) {
    let mut s = lock(&SNAPSHOTS);
    let s = s.get_or_insert_with(Snapshots::default);
    match kind {
        ray_api::vmm::SnapshotKindName::Full => s.full += 1,
        ray_api::vmm::SnapshotKindName::Incremental => s.incremental += 1,
    }
    s.pause_seconds.observe(paused_ms / 1e3);
    s.write_seconds.observe(write_ms / 1e3);
    s.written_bytes += disk_bytes;
}

/// A snapshot was asked for, allowed, and failed while being written.
pub fn snapshot_failed() {
    lock(&SNAPSHOTS)
        .get_or_insert_with(Snapshots::default)
        .failed += 1;
}

#[derive(Default)]
struct Migrations {
    /// (role, final state) → count.
    ended: Vec<((&'static str, &'static str), u64)>,
    downtime_seconds: Summary,
    duration_seconds: Summary,
    sent_bytes: u64,
}

static MIGRATIONS: Mutex<Option<Migrations>> = Mutex::new(None);

/// A migration of this VM ended (either role, any outcome).
pub fn migration_ended(s: &ray_api::vmm::MigrationStatus) {
    let role = match s.role {
        ray_api::vmm::MigrationRole::Source => "source",
        ray_api::vmm::MigrationRole::Target => "target",
    };
    let mut m = lock(&MIGRATIONS);
    let m = m.get_or_insert_with(Migrations::default);
    let key = (role, s.state.as_str());
    match m.ended.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => m.ended.push((key, 1)),
    }
    if let Some(d) = s.downtime_ms {
        m.downtime_seconds.observe(d / 1e3);
    }
    if let Some(t) = s.total_ms {
        m.duration_seconds.observe(t / 1e3);
    }
    m.sent_bytes += s.bytes_sent;
}

/// Resident memory of a process, split into guest RAM and the VMM's own pages.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Everything resident (RSS), bytes.
    pub rss: u64,
    /// Size of the guest-RAM mappings, bytes (0 while the VM has no memory).
    pub guest_size: u64,
    /// Resident guest RAM, bytes.
    pub guest_resident: u64,
    /// Pages no other process maps (`Private_Clean` + `Private_Dirty`), guest RAM
    /// included, bytes.
    pub private: u64,
    /// The guest-RAM mappings' share of `private`, bytes.
    pub guest_private: u64,
    /// Anonymous pages (heap, stacks, written data), guest RAM included, bytes.
    pub anon: u64,
    /// The guest-RAM mappings' share of `anon` (none for a memfd), bytes.
    pub guest_anon: u64,
}

impl Footprint {
    /// What the VMM itself costs: its private pages that are not guest RAM, bytes.
    pub fn vmm_private(&self) -> u64 {
        self.private.saturating_sub(self.guest_private)
    }

    /// The anonymous part of [`vmm_private`](Self::vmm_private), bytes: what no other
    /// process can share (the rest is the binary's pages no other process happens to map).
    pub fn vmm_anon(&self) -> u64 {
        self.anon.saturating_sub(self.guest_anon)
    }

    /// RSS minus resident guest RAM, bytes.
    pub fn vmm_rss(&self) -> u64 {
        self.rss.saturating_sub(self.guest_resident)
    }

    /// Reads this process's footprint from /proc/self/smaps.
    pub fn current() -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string("/proc/self/smaps")?))
    }

    /// Reads the footprint of process `pid` from /proc/PID/smaps.
    pub fn of_pid(pid: u32) -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string(format!(
            "/proc/{pid}/smaps"
        ))?))
    }

    /// The footprint in the text of an smaps file. Guest RAM is the mapping of the
    /// `ray-guest-ram` memfd.
    pub fn parse(smaps: &str) -> Self {
        let kib = |rest: &str| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
                * 1024
        };
        let mut f = Footprint::default();
        let mut in_guest = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            let is_header = first.split_once('-').is_some_and(|(a, b)| {
                !a.is_empty() && a.chars().chain(b.chars()).all(|c| c.is_ascii_hexdigit())
            });
            if is_header {
                // A mapping's header: `start-end perms offset dev inode path`.
                in_guest = line.contains("/memfd:ray-guest-ram");
                continue;
            }
            let Some((key, rest)) = line.split_once(':') else {
                continue;
            };
            let v = kib(rest);
            match key {
                "Size" if in_guest => f.guest_size += v,
                "Rss" => {
                    f.rss += v;
                    if in_guest {
                        f.guest_resident += v;
                    }
                }
                "Private_Clean" | "Private_Dirty" => {
                    f.private += v;
                    if in_guest {
                        f.guest_private += v;
                    }
                }
                "Anonymous" => {
                    f.anon += v;
                    if in_guest {
                        f.guest_anon += v;
                    }
                }
                _ => {}
            }
        }
        f
    }
}

/// CPU time this process has used (user + system), seconds.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// Writes one metric family's `HELP` and `TYPE` lines.
pub(crate) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn summary(out: &mut String, name: &str, help: &str, s: Summary) {
    family(out, name, "summary", help);
    let _ = writeln!(out, "{name}_sum {}", s.sum);
    let _ = writeln!(out, "{name}_count {}", s.count);
}

/// Every metric, in Prometheus' text format.
/// A device's own counters, which its threads bump.
pub enum DeviceCounters {
    Net(Arc<NetCounters>),
    Vsock(Arc<VsockCounters>),
}

static DEVICES: Mutex<Vec<(String, DeviceCounters)>> = Mutex::new(Vec::new());

/// The PCI bus's configuration access counters (the bus of a rebuilt machine replaces
/// them: the counts start again with its VMM state).
static PCI_CONFIG: Mutex<Option<Arc<ConfigCounters>>> = Mutex::new(None);

/// Reports the configuration accesses of a new PCI bus from now on.
pub fn pci_bus_built(counters: Arc<ConfigCounters>) {
    *lock(&PCI_CONFIG) = Some(counters);
}

fn render_pci(out: &mut String) {
    if let Some(c) = lock(&PCI_CONFIG).clone() {
        render_pci_of(out, &c);
    }
}

fn render_pci_of(out: &mut String, c: &ConfigCounters) {
    family(
        out,
        "ray_pci_config_accesses_total",
        "counter",
        "PCI configuration space accesses of the guest, by mechanism: ports 0xcf8-0xcff (two per register: address, then data) or the ECAM window (one per register); each is one vCPU exit.",
    );
    for (mechanism, n) in [("ports", &c.ports), ("ecam", &c.ecam)] {
        let _ = writeln!(
            out,
            "ray_pci_config_accesses_total{{mechanism=\"{mechanism}\"}} {}",
            ConfigCounters::get(n)
        );
    }
    family(
        out,
        "ray_pci_config_bad_accesses_total",
        "counter",
        "ECAM accesses of a size or alignment that selects no register (read all-ones, writes dropped).",
    );
    let _ = writeln!(
        out,
        "ray_pci_config_bad_accesses_total {}",
        ConfigCounters::get(&c.bad)
    );
}

/// Reports device `id`'s counters from now on (a device rebuilt on restore replaces them).
pub fn device_built(id: &str, counters: DeviceCounters) {
    let mut devices = lock(&DEVICES);
    devices.retain(|(d, _)| d != id);
    devices.push((id.to_string(), counters));
}

/// One `{device=..,direction=..}` pair of samples per device for each `(family, rx, tx)`.
fn per_direction<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    samples: impl Iterator<Item = (&'a str, u64, u64)> + Clone,
) {
    family(out, name, "counter", help);
    for (id, rx, tx) in samples {
        let _ = writeln!(out, "{name}{{device=\"{id}\",direction=\"rx\"}} {rx}");
        let _ = writeln!(out, "{name}{{device=\"{id}\",direction=\"tx\"}} {tx}");
    }
}

fn render_devices(out: &mut String) {
    let devices = lock(&DEVICES);
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let nets = devices.iter().filter_map(|(id, c)| match c {
        DeviceCounters::Net(n) => Some((id.as_str(), n)),
        DeviceCounters::Vsock(_) => None,
    });
    let vsocks = devices.iter().filter_map(|(id, c)| match c {
        DeviceCounters::Vsock(v) => Some((id.as_str(), v)),
        DeviceCounters::Net(_) => None,
    });
    per_direction(
        out,
        "ray_net_packets_total",
        "Frames a NIC passed to the guest (rx) and from it (tx).",
        nets.clone()
            .map(|(id, n)| (id, load(&n.rx_packets), load(&n.tx_packets))),
    );
    per_direction(
        out,
        "ray_net_bytes_total",
        "Bytes of the frames a NIC passed to the guest (rx) and from it (tx).",
        nets.clone()
            .map(|(id, n)| (id, load(&n.rx_bytes), load(&n.tx_bytes))),
    );
    per_direction(
        out,
        "ray_net_dropped_total",
        "Frames a NIC dropped: too large for the guest's buffer (rx), or refused by the TAP (tx).",
        nets.map(|(id, n)| (id, load(&n.rx_dropped), load(&n.tx_dropped))),
    );
    per_direction(
        out,
        "ray_vsock_packets_total",
        "vsock packets to the guest (rx) and from it (tx).",
        vsocks
            .clone()
            .map(|(id, v)| (id, load(&v.rx_packets), load(&v.tx_packets))),
    );
    per_direction(
        out,
        "ray_vsock_bytes_total",
        "vsock payload bytes to the guest (rx) and from it (tx).",
        vsocks
            .clone()
            .map(|(id, v)| (id, load(&v.rx_bytes), load(&v.tx_bytes))),
    );
    family(
        out,
        "ray_vsock_connections_total",
        "counter",
        "vsock connections opened, by the side that opened them.",
    );
    for (id, v) in vsocks.clone() {
        for (from, n) in [("host", &v.host_connects), ("guest", &v.guest_connects)] {
            let _ = writeln!(
                out,
                "ray_vsock_connections_total{{device=\"{id}\",from=\"{from}\"}} {}",
                load(n)
            );
        }
    }
    for (name, help, get) in [
        (
            "ray_vsock_resets_total",
            "vsock connections reset (refused, closed abruptly, or by a transport reset).",
            (|v: &VsockCounters| &v.resets) as fn(&VsockCounters) -> &AtomicU64,
        ),
        (
            "ray_vsock_bad_packets_total",
            "Malformed vsock packets from the guest, dropped.",
            |v: &VsockCounters| &v.bad_packets,
        ),
    ] {
        family(out, name, "counter", help);
        for (id, v) in vsocks.clone() {
            let _ = writeln!(out, "{name}{{device=\"{id}\"}} {}", load(get(v)));
        }
    }
}

pub fn render() -> String {
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        "ray_vcpu_exits_total",
        "counter",
        "Exits from KVM_RUN of each vCPU, by reason.",
    );
    let vcpus = lock(&VCPUS).clone();
    for (i, c) in vcpus.iter().enumerate() {
        for r in ExitReason::ALL {
            let _ = writeln!(
                out,
                "ray_vcpu_exits_total{{vcpu=\"{i}\",reason=\"{}\"}} {}",
                r.label(),
                c.get(r)
            );
        }
    }

    render_displays(&mut out);

    family(
        &mut out,
        "ray_dirty_pages_total",
        "counter",
        "Guest pages the dirty log reported written (counted while it is on: during a migration, or for a chain of incremental snapshots).",
    );
    let _ = writeln!(
        out,
        "ray_dirty_pages_total {}",
        DIRTY_PAGES.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "ray_dirty_pages_per_second",
        "gauge",
        "Guest pages written per second over the dirty log's last collection interval.",
    );
    let _ = writeln!(
        out,
        "ray_dirty_pages_per_second {}",
        f64::from_bits(DIRTY_RATE.load(Ordering::Relaxed))
    );

    {
        let s = lock(&SNAPSHOTS);
        let d = Snapshots::default();
        let s = s.as_ref().unwrap_or(&d);
        family(
            &mut out,
            "ray_snapshots_total",
            "counter",
            "Snapshots written through the API, by kind.",
        );
        let _ = writeln!(out, "ray_snapshots_total{{kind=\"full\"}} {}", s.full);
        let _ = writeln!(
            out,
            "ray_snapshots_total{{kind=\"incremental\"}} {}",
            s.incremental
        );
        family(
            &mut out,
            "ray_snapshot_failures_total",
            "counter",
            "Snapshots asked for through the API that failed while being written.",
        );
        let _ = writeln!(out, "ray_snapshot_failures_total {}", s.failed);
        summary(
            &mut out,
            "ray_snapshot_pause_seconds",
            "How long the vCPUs were stopped for each snapshot.",
            s.pause_seconds,
        );
        summary(
            &mut out,
            "ray_snapshot_write_seconds",
            "How long saving the state and writing the files of each snapshot took.",
            s.write_seconds,
        );
        family(
            &mut out,
            "ray_snapshot_written_bytes_total",
            "counter",
            "Bytes the written snapshots occupy on disk.",
        );
        let _ = writeln!(out, "ray_snapshot_written_bytes_total {}", s.written_bytes);
    }

    {
        let m = lock(&MIGRATIONS);
        let d = Migrations::default();
        let m = m.as_ref().unwrap_or(&d);
        family(
            &mut out,
            "ray_migrations_total",
            "counter",
            "Migrations of this VM that ended, by role and final state.",
        );
        for ((role, state), n) in &m.ended {
            let _ = writeln!(
                out,
                "ray_migrations_total{{role=\"{role}\",state=\"{state}\"}} {n}"
            );
        }
        summary(
            &mut out,
            "ray_migration_downtime_seconds",
            "Pause of the guest at the switch-over of each completed outgoing migration.",
            m.downtime_seconds,
        );
        summary(
            &mut out,
            "ray_migration_duration_seconds",
            "Duration of each outgoing migration, start to end.",
            m.duration_seconds,
        );
        family(
            &mut out,
            "ray_migration_sent_bytes_total",
            "counter",
            "Bytes sent by the migrations of this VM.",
        );
        let _ = writeln!(out, "ray_migration_sent_bytes_total {}", m.sent_bytes);
    }

    if let Ok(f) = Footprint::current() {
        let gauges = [
            (
                "ray_guest_memory_size_bytes",
                "Guest RAM mapped (0 while the VM has no memory, e.g. suspended).",
                f.guest_size,
            ),
            (
                "ray_guest_memory_resident_bytes",
                "Guest RAM resident in host memory.",
                f.guest_resident,
            ),
            (
                "ray_vmm_private_memory_bytes",
                "The VMM's own private memory: its private pages that are not guest RAM.",
                f.vmm_private(),
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory of the VMM process, guest RAM included.",
                f.rss,
            ),
        ];
        for (name, help, v) in gauges {
            family(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        }
    }
    if let Some(s) = cpu_seconds() {
        family(
            &mut out,
            "process_cpu_seconds_total",
            "counter",
            "CPU time of the VMM process (vCPU threads included), user and system.",
        );
        let _ = writeln!(out, "process_cpu_seconds_total {s}");
    }
    render_devices(&mut out);
    render_pci(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0100000 r-xp 00000000 08:01 1234 /usr/bin/ray
Size:               1024 kB
Rss:                 800 kB
Private_Clean:       100 kB
Private_Dirty:        20 kB
7f0000000000-7f0008000000 rw-s 00000000 00:01 99 /memfd:ray-guest-ram (deleted)
Size:             131072 kB
Rss:               65536 kB
Private_Clean:         0 kB
Private_Dirty:     65536 kB
7fff00000000-7fff00021000 rw-p 00000000 00:00 0 [stack]
Size:                132 kB
Rss:                  12 kB
Private_Dirty:        12 kB
Anonymous:            12 kB
VmFlags: rd wr mr mw me gd ac
";

    #[test]
    fn footprint_splits_guest_ram_from_the_vmm() {
        let f = Footprint::parse(SMAPS);
        assert_eq!(f.guest_size, 128 << 20);
        assert_eq!(f.guest_resident, 64 << 20);
        assert_eq!(f.rss, (800 + 65536 + 12) << 10);
        assert_eq!(f.vmm_private(), (100 + 20 + 12) << 10);
        assert_eq!(f.vmm_rss(), (800 + 12) << 10);
        assert_eq!(f.vmm_anon(), 12 << 10);
        assert_eq!(Footprint::parse("").vmm_private(), 0);
        let over = Footprint {
            private: 1,
            guest_private: 2,
            anon: 1,
            guest_anon: 2,
            ..Footprint::default()
        };
        assert_eq!(
            (over.vmm_private(), over.vmm_anon()),
            (0, 0),
            "never negative"
        );
    }

    #[test]
    fn own_footprint_is_readable() {
        let f = Footprint::current().unwrap();
        // Other tests of this binary may have guest RAM mapped right now, so only what
        // holds whatever else runs is checked.
        assert!(f.rss > 0 && f.private > 0, "{f:?}");
        assert!(
            f.rss >= f.guest_resident && f.private >= f.guest_private,
            "{f:?}"
        );
    }

    #[test]
    fn exits_are_counted_per_vcpu_and_reason() {
        let c = vcpu(3);
        c.count(ExitReason::Io);
        c.count(ExitReason::Io);
        c.count(ExitReason::Hlt);
        assert_eq!(c.get(ExitReason::Io), 2);
        assert!(Arc::ptr_eq(&c, &vcpu(3)));
        let text = render();
        assert!(
            text.contains("ray_vcpu_exits_total{vcpu=\"3\",reason=\"io\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("ray_vcpu_exits_total{vcpu=\"0\",reason=\"mmio\"} 0\n"));
    }

    #[test]
    fn pci_configuration_accesses_are_reported_by_mechanism() {
        // Rendered from this bus's counters: other tests of this binary build buses too.
        let bus = ray_devices::pci::PciBus::new();
        let mut id = [0; 4];
        bus.write_port(0xcf8, &(1u32 << 31).to_le_bytes());
        bus.read_port(0xcfc, &mut id);
        let mut text = String::new();
        render_pci_of(&mut text, bus.counters());
        assert!(
            text.contains("ray_pci_config_accesses_total{mechanism=\"ports\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("ray_pci_config_accesses_total{mechanism=\"ecam\"} 0\n"));
        assert!(text.contains("ray_pci_config_bad_accesses_total 0\n"));
    }

    #[test]
    fn every_family_has_help_and_type_and_valid_names() {
        let text = render();
        let mut families = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(
                    name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                    "{name}"
                );
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "counter {name} lacks _total");
                } else {
                    assert!(!name.ends_with("_total"), "{kind} {name} ends in _total");
                }
                families.push(name.to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(
                    families.iter().any(|f| name == f
                        || name == format!("{f}_sum")
                        || name == format!("{f}_count")),
                    "sample {line} before its TYPE"
                );
            }
        }
        assert!(families.len() >= 14, "{families:?}");
    }

    #[test]
    fn device_counters_are_reported_per_device_and_replaced_on_rebuild() {
        let net = Arc::new(NetCounters::default());
        net.tx_packets.store(3, Ordering::Relaxed);
        device_built("net-test", DeviceCounters::Net(net));
        let vsock = Arc::new(VsockCounters::default());
        vsock.guest_connects.store(2, Ordering::Relaxed);
        device_built("vsock-test", DeviceCounters::Vsock(vsock));
        let text = render();
        assert!(text.contains("ray_net_packets_total{device=\"net-test\",direction=\"tx\"} 3\n"));
        assert!(
            text.contains("ray_vsock_connections_total{device=\"vsock-test\",from=\"guest\"} 2\n")
        );
        device_built("net-test", DeviceCounters::Net(Arc::default()));
        let text = render();
        assert!(text.contains("ray_net_packets_total{device=\"net-test\",direction=\"tx\"} 0\n"));
        assert_eq!(
            text.matches("device=\"net-test\",direction=\"tx\"").count(),
            3
        );
    }

    #[test]
    fn outcomes_and_durations_accumulate() {
        snapshot_taken(ray_api::vmm::SnapshotKindName::Full, 5.0, 20.0, 4096);
        snapshot_failed();
        dirty_log_started();
        dirty_pages_collected(10);
        let text = render();
        assert!(
            text.contains("ray_snapshots_total{kind=\"full\"} "),
            "{text}"
        );
        assert!(text.contains("ray_snapshot_pause_seconds_count "));
        assert!(!text.contains("ray_dirty_pages_total 0\n"));
    }
}
