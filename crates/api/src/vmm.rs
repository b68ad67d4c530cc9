//! The per-VM API: served by each `ray vmm` process on its Unix socket.
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Lifecycle state of a VM, as the API reports it (lower-case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmStateName {
    Created,
    Running,
    Paused,
    Suspended,
    MigrationSource,
    MigrationTarget,
    Terminated,
    Error,
}

impl VmStateName {
    pub const ALL: [VmStateName; 8] = [
        VmStateName::Created,
        VmStateName::Running,
        VmStateName::Paused,
        VmStateName::Suspended,
        VmStateName::MigrationSource,
        VmStateName::MigrationTarget,
        VmStateName::Terminated,
        VmStateName::Error,
    ];

    /// The name as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            VmStateName::Created => "created",
            VmStateName::Running => "running",
            VmStateName::Paused => "paused",
            VmStateName::Suspended => "suspended",
            VmStateName::MigrationSource => "migration_source",
            VmStateName::MigrationTarget => "migration_target",
            VmStateName::Terminated => "terminated",
            VmStateName::Error => "error",
        }
    }
}

impl std::fmt::Display for VmStateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snake-case name enum: `as_str`, `Display`, and comparison with its spelling.
macro_rules! names {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $v),* }

        impl $name {
            /// The name as the API spells it.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s),* }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

names! {
    /// Whether a snapshot holds all of memory or the pages written since its parent.
    SnapshotKindName { Full => "full", Incremental => "incremental" }
}

names! {
    /// A snapshot's own state in its store.
    SnapshotStateName {
        Idle => "idle",
        Creating => "creating",
        Verifying => "verifying",
        Ready => "ready",
        Restoring => "restoring",
        RestoreVerify => "restore_verify",
        RestoreComplete => "restore_complete",
        /// Kept (for history, or because children depend on it), not offered for restore.
        Archived => "archived",
        Error => "error",
    }
}

names! {
    /// A migration session's state.
    MigrationState {
        Idle => "idle",
        PreCopy => "pre_copy",
        StopAndCopy => "stop_and_copy",
        Verification => "verification",
        Completing => "completing",
        Completed => "completed",
        Failed => "failed",
        RollingBack => "rolling_back",
    }
}

names! {
    /// What became of the VM on this side of a migration.
    MigrationVmOutcome {
        /// The migration is still under way.
        Migrating => "migrating",
        /// Rolled back (source), or the VM now runs here (target).
        Running => "running",
        /// The source copy is gone: the VM runs on the target.
        Migrated => "migrated",
        /// The link failed after the switch-over: the target may run the VM, so the source
        /// stays paused until an operator fenced the target (see the split-brain rule).
        PausedOwnershipUncertain => "paused_ownership_uncertain",
        /// The source could not resume after a failure.
        RollbackFailed => "rollback_failed",
        /// A target that never ran the VM threw its copy away.
        Discarded => "discarded",
    }
}

/// Machine configuration, given before `start`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Path of the kernel on the VMM's host: an ELF (vmlinux, rayvisor's guest) or a bzImage.
    pub kernel: String,
    /// Optional initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Number of vCPUs, 1..=254 (the VMM's limit; the host's KVM may allow fewer, and a
    /// guest may use fewer: rayvisor's own guest runs on at most 64 and parks the rest).
    #[schema(minimum = 1, maximum = 254)]
    pub vcpus: u8,
    /// Guest RAM in bytes: a multiple of 4 KiB, at least 32 MiB, at most what the host has.
    #[schema(minimum = 33554432, multiple_of = 4096)]
    pub memory_bytes: u64,
    /// Paravirtual devices (virtio over PCI). Omitted: the defaults (virtio-rng only).
    #[serde(default, skip_serializing_if = "DevicesConfig::is_default")]
    pub devices: DevicesConfig,
    /// Guest NUMA nodes (`ray vm run --numa ...`); empty: one node, no binding. When
    /// given, the nodes' memory adds up to `memory_bytes` and their CPUs cover every vCPU.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub numa: Vec<NumaNodeConfig>,
    /// Which vCPU writes which guest memory (`ray vm run --numa-attribution ring`): KVM's
    /// per-vCPU dirty rings, harvested by the VMM; they also serve snapshots and
    /// migration. Off: no attribution, KVM's dirty bitmap as before.
    #[serde(default, skip_serializing_if = "NumaAttribution::is_off")]
    pub numa_attribution: NumaAttribution,
    /// The access-driven page migration policy (`ray vm run --numa-migrate ...`); needs
    /// `numa_attribution: ring`. Off unless asked for.
    #[serde(default, skip_serializing_if = "NumaMigrationConfig::is_default")]
    pub numa_migration: NumaMigrationConfig,
}

/// What the page migration policy does with what it decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NumaMigrationMode {
    /// The per-VM off switch: no decisions.
    #[default]
    Off,
    /// Decides and logs every window, moves nothing.
    DryRun,
    /// Decides, logs and moves pages (move_pages).
    On,
}

/// The page migration policy's settings for one VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NumaMigrationConfig {
    #[serde(default)]
    pub mode: NumaMigrationMode,
    /// Length of one attribution window, ms (at least 100).
    #[serde(default = "default_window_ms")]
    #[schema(minimum = 100)]
    pub window_ms: u64,
    /// Most bytes moved per second, MiB/s (positive).
    #[serde(default = "default_rate_limit")]
    #[schema(exclusive_minimum = 0.0)]
    pub rate_limit_mib_s: f64,
}

fn default_window_ms() -> u64 {
    5000
}

fn default_rate_limit() -> f64 {
    256.0
}

impl Default for NumaMigrationConfig {
    fn default() -> Self {
        Self {
            mode: NumaMigrationMode::Off,
            window_ms: default_window_ms(),
            rate_limit_mib_s: default_rate_limit(),
        }
    }
}

impl NumaMigrationConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// `PUT /vm/numa/policy` body: changes the NUMA policy of a running VM (`ray numa policy
/// VM ...`). A field left out keeps its value; the whole request is checked before any of
/// it takes effect, and the change is recorded in the decision log.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NumaPolicyRequest {
    /// `off` is the per-VM off switch; `dry-run` and `on` need attribution and guest nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<NumaMigrationMode>,
    /// Length of one attribution window, ms (at least 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 100)]
    pub window_ms: Option<u64>,
    /// Most bytes moved per second, MiB/s (positive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0.0)]
    pub rate_limit_mib_s: Option<f64>,
    /// The attribution source. The dirty rings exist from before the vCPUs to the VM's
    /// end, so a running VM keeps the one it started with: only that value is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<NumaAttribution>,
}

/// What the page migration policy did (`GET /vm`, `ray numa explain VM`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NumaMigrationReport {
    pub config: NumaMigrationConfig,
    /// Windows decided so far.
    pub windows: u64,
    pub moved_bytes: u64,
    /// Ranges worth moving that the rate limit deferred in the last window.
    pub pending_moves: u64,
    /// Each decision of the last window about a range with attributed writes.
    pub last_window: Vec<String>,
    /// Moves and window summaries, oldest first (the last 256).
    pub log: Vec<String>,
}

/// How the VMM attributes guest memory accesses to vCPUs (and so to NUMA nodes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NumaAttribution {
    #[default]
    Off,
    /// KVM's per-vCPU dirty rings: writes, by vCPU.
    Ring,
}

impl NumaAttribution {
    pub fn is_off(&self) -> bool {
        *self == NumaAttribution::Off
    }
}

/// The VM's virtio devices. Each kind is one field; a snapshot or migration carries the
/// state of each device, and a restore refuses a state whose devices differ from these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevicesConfig {
    /// virtio-rng, fed by the host's getrandom(2). Default: on.
    #[serde(default = "on")]
    pub rng: bool,
    /// virtio-blk disks, in bus order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs, each on a TAP interface (bus order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<crate::net::NetConfig>,
    /// GPUs and their displays (framebuffers in guest RAM, served over VNC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<crate::gpu::GpuConfig>,
    /// Limits on `gpus` (defaults: 8 GPUs, 4 displays a GPU, 16 displays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_limits: Option<crate::gpu::GpuLimits>,
    /// A virtio-vsock device (at most one), for host<->guest streams and `ray vm exec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<crate::vsock::VsockConfig>,
    /// A virtio-input keyboard and tablet that VNC viewers and `ray gpu type` type into.
    /// Default: on when the VM has a GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<bool>,
}

/// One virtio-blk disk: a raw image file or a block device on the VMM's host. In a live
/// migration the target opens the same path (shared storage) and refuses a file of
/// another size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Stable name: the device's id in snapshots and migrations and its serial (GET_ID).
    /// 1 to 20 of `A-Za-z0-9_-`.
    pub id: String,
    pub path: String,
    /// The guest may not write (VIRTIO_BLK_F_RO; writes fail with IOERR).
    #[serde(default)]
    pub readonly: bool,
    /// Open the file with O_DIRECT: I/O bypasses the host's page cache (guest buffers and
    /// requests must then be 512-byte aligned, or they fail with IOERR).
    #[serde(default)]
    pub direct: bool,
    /// Bytes per second the guest may move (reads and writes), if limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub rate_bytes: Option<u64>,
    /// Requests per second, if limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub rate_ops: Option<u64>,
    /// How the VMM does the disk's I/O (not part of saved state: a restored or migrated VM
    /// may use another).
    #[serde(default)]
    pub engine: DiskEngine,
}

/// A disk's I/O engine in the VMM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskEngine {
    /// A pool of 32 threads per disk doing blocking preadv/pwritev.
    #[default]
    Pool,
    /// One thread per disk keeping every request in flight on an io_uring.
    Uring,
}

impl DiskEngine {
    pub fn name(self) -> &'static str {
        match self {
            DiskEngine::Pool => "pool",
            DiskEngine::Uring => "uring",
        }
    }

    /// Parses `pool` or `uring`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "pool" => Ok(DiskEngine::Pool),
            "uring" => Ok(DiskEngine::Uring),
            _ => Err(format!(
                "engine={text}: the disk engines are pool and uring"
            )),
        }
    }
}

fn on() -> bool {
    true
}

impl Default for DevicesConfig {
    fn default() -> Self {
        Self {
            rng: true,
            disks: Vec::new(),
            net: Vec::new(),
            gpus: Vec::new(),
            gpu_limits: None,
            vsock: None,
            input: None,
        }
    }
}

/// How a guest node's memory is placed on its host nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NumaPolicy {
    /// Only on the host nodes: the guest gets no memory once they are full.
    #[default]
    Bind,
    /// On the (first) host node while it has room, elsewhere after that: the policy for
    /// overcommitted hosts.
    Preferred,
    /// Page by page round-robin over the host nodes.
    Interleave,
}

impl NumaPolicy {
    pub fn name(self) -> &'static str {
        match self {
            NumaPolicy::Bind => "bind",
            NumaPolicy::Preferred => "preferred",
            NumaPolicy::Interleave => "interleave",
        }
    }
}

impl DevicesConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The limits its GPU list is checked against.
    pub fn gpu_limits(&self) -> crate::gpu::GpuLimits {
        self.gpu_limits.unwrap_or_default()
    }

    /// Whether the VM gets the virtio-input keyboard and tablet.
    pub fn input_enabled(&self) -> bool {
        self.input.unwrap_or(!self.gpus.is_empty())
    }
}

/// One guest NUMA node: its vCPUs, its memory, and the host nodes that hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NumaNodeConfig {
    /// Guest node id (its SRAT proximity domain); nodes are numbered 0, 1, ...
    pub node: u32,
    /// The node's vCPUs; empty for a memory-only node.
    #[serde(default)]
    pub cpus: Vec<u8>,
    /// The node's memory in bytes (whole 2 MiB pages); nodes are laid out in node order
    /// from guest-physical 0, around the MMIO hole.
    pub memory_bytes: u64,
    /// Host nodes holding the memory and running the vCPUs; empty: chosen by the VMM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_nodes: Vec<u32>,
    #[serde(default)]
    pub policy: NumaPolicy,
}

/// Where one guest NUMA node runs and how local its memory is (`GET /vm`, `numa`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NumaNodeStatus {
    pub node: u32,
    pub cpus: Vec<u8>,
    pub memory_bytes: u64,
    /// The host nodes its memory is bound to (given, or chosen by the VMM on this host);
    /// empty: unbound.
    pub host_nodes: Vec<u32>,
    pub policy: NumaPolicy,
    /// Host CPUs its vCPUs are pinned to; empty: unpinned.
    pub host_cpus: Vec<u32>,
    /// Pages of the node asked about (an even sample of at most 4096 pages).
    pub sampled_pages: u64,
    /// Of those, pages present (the guest touched them).
    pub present_pages: u64,
    /// Of the present ones, pages on one of `host_nodes`.
    pub local_pages: u64,
    /// `local_pages / present_pages`; absent when nothing is present or the node is unbound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<f64>,
}

/// Guest memory writes attributed to vCPUs by KVM's per-vCPU dirty rings, since boot, in
/// ring entries: a written page counts at least once per harvest (every 20 ms) it was
/// written in, and KVM may push a page more than once (one entry per page for a first
/// write here; ~5 per page for pages rewritten every second on PVM). Reads and the VMM's
/// own writes are not seen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AttributionInfo {
    /// Pages written, by vCPU index.
    pub vcpu_pages: Vec<u64>,
    /// Pages written by each guest node's vCPUs, by node id (one entry without `numa`).
    pub node_pages: Vec<u64>,
    /// Times the rings were emptied, and the time that took in all (the overhead).
    pub harvests: u64,
    pub harvest_ms: f64,
}

/// `PUT /vm/config` answer and `GET /vm` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    pub id: String,
    pub state: VmStateName,
    /// Milliseconds since the guest first started running (0 before `start`).
    pub uptime_ms: u64,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<VmConfig>,
    /// Hypervisor flavour the VMM runs on: `pvm` or `vmx_svm`.
    pub hypervisor: String,
    /// The guest's heartbeat page, if it keeps one (rayvisor's own guest does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<HeartbeatInfo>,
    /// Why the VM is in `error` or `terminated`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_reason: Option<String>,
    /// Path of this VM's latest snapshot (taken or restored): the parent of its next
    /// incremental snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_snapshot: Option<String>,
    /// The guest NUMA nodes of a running VM with `numa` configured: placement and locality.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub numa: Vec<NumaNodeStatus>,
    /// What the dirty rings attributed, with `numa_attribution: ring`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<AttributionInfo>,
    /// The page migration policy's state, when it is not off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_migration: Option<NumaMigrationReport>,
    /// The loopback TCP address this API is also served on (`ray vm run --api-tcp`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_tcp: Option<String>,
    /// The local lease of a VMM started by a cluster agent (`ray vmm --lease-ttl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseInfo>,
}

/// A VMM's local lease: its guest runs only while it is renewed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LeaseInfo {
    /// The last renewal's time to live.
    pub ttl_ms: u64,
    /// Time left before the VMM fences itself; 0 once expired, absent once cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_ms: Option<u64>,
    /// The VMM paused its own vCPUs because the lease expired; only a resume (after a
    /// renewal or a clear) lets the guest run again.
    pub fenced: bool,
    /// Why it is fenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_reason: Option<String>,
}

/// `PUT /vm/lease` body: renew the local lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// The new deadline is the lease's start plus this (1 to 3,600,000).
    pub ttl_ms: u64,
    /// When the lease starts: a CLOCK_MONOTONIC time in ns, not in the future (a cluster
    /// agent passes when it sent its own lease's renewal, so the VMM's deadline never
    /// outlasts the agent's). Default: when the request arrives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_monotonic_ns: Option<u64>,
}

/// `GET /vm/jail`: the VMM's jail as the VMM itself sees it, from inside (its own
/// `/proc/self`, root, host name, network and cgroup files); unjailed, the same facts of
/// an ordinary process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JailView {
    /// Whether the VMM runs jailed.
    pub jailed: bool,
    /// Its pid as it sees it (1 when jailed: a PID namespace of its own).
    pub pid: u32,
    /// Its pid as the host sees it.
    pub host_pid: u32,
    /// Its real, effective, saved and file-system uids (`/proc/self/status`).
    pub uids: Vec<u32>,
    /// Its real, effective, saved and file-system gids.
    pub gids: Vec<u32>,
    /// Its supplementary groups.
    pub groups: Vec<u32>,
    /// Its effective and bounding capability sets, in hex as `/proc/self/status` has them.
    pub cap_effective: String,
    pub cap_bounding: String,
    /// `no_new_privs`.
    pub no_new_privs: bool,
    /// The seccomp mode of the thread that answered (2: a filter).
    pub seccomp: u32,
    /// Its host name (the VM's id when jailed: a UTS namespace of its own).
    pub hostname: String,
    /// The network interfaces it sees (`/proc/net/dev`).
    pub interfaces: Vec<String>,
    /// Every path in its root, not walking into what is mounted there (so a mount point is
    /// listed, its content not); at most 4096, sorted.
    pub paths: Vec<String>,
    /// What is mounted in its root (mount points, sorted).
    pub mounts: Vec<String>,
    /// Its cgroup's memory limit in bytes, where it can read it.
    pub memory_max: Option<u64>,
    /// Its cgroup's CPU quota and period in microseconds, where it can read them.
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: Option<u64>,
}

/// What the guest reports in its heartbeat page, read by the VMM without any exit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatInfo {
    pub counter: u64,
    /// Guest kvmclock time of the last counter update, in ns.
    pub time_ns: u64,
    pub cpus_online: u32,
    pub ready: bool,
    /// Guest loop iterations per second measured at boot (native ~1e9, emulated ~1e5).
    pub loop_rate: u64,
    /// The guest runs on PVM with its VIF area registered.
    pub pvm: bool,
    pub dirty_bytes: u64,
    pub ticks: u64,
    pub per_cpu_counter: Vec<u64>,
}

/// `PUT /vm/stop` body.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// How long to wait for the guest to power off after asking it to, before the VM is
    /// stopped by force. 0 stops at once.
    #[serde(default = "default_stop_timeout")]
    pub timeout_ms: u64,
}

fn default_stop_timeout() -> u64 {
    5000
}

/// `POST /vm/console` body: bytes for the guest's serial console.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleInput {
    pub data: String,
}

/// `GET /vm/console` answer: the tail of the serial output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConsoleTail {
    /// Total bytes the guest has written since boot; `data` ends at this offset.
    pub total_bytes: u64,
    pub data: String,
}

/// One lifecycle event of the audit trail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LifecycleEvent {
    /// Wall-clock time, ms since the Unix epoch.
    pub time_ms: u64,
    pub from: VmStateName,
    pub to: VmStateName,
    /// What caused it: an API action (`api:pause`), a guest action (`guest:poweroff`), ...
    pub cause: String,
}

/// Which kind of snapshot `PUT /vm/snapshot` writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// All of memory: restores on its own.
    #[default]
    Full,
    /// Only the pages written since this VM's previous snapshot (its parent), which must be
    /// in the same directory.
    Incremental,
    /// Incremental if this VM has a previous snapshot in the same directory, else full.
    Auto,
}

/// `PUT /vm/snapshot` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Directory to create for the snapshot (must not exist), on the VMM's host. Its parent
    /// directory is the snapshot store; its name is the snapshot's id.
    pub path: String,
    /// Pause a running VM for the snapshot and resume it afterwards. Without it, the VM
    /// must already be paused.
    #[serde(default)]
    pub pause: bool,
    #[serde(default)]
    pub kind: SnapshotKind,
    /// zstd-compress memory (a compressed full snapshot is read, not mapped, on restore).
    #[serde(default)]
    pub compress: bool,
    /// Most snapshots this VM may have in the store (default 256); beyond it the snapshot
    /// is refused until some are deleted or merged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_snapshots: Option<u32>,
    /// A hand-off token: the store directory (the parent of `path`), opened and handed to
    /// the VMM over `handoff.sock` in its directory under this token by a client in the
    /// host's namespaces (`ray snapshot create` and `ray vm checkpoint` do it for a jailed
    /// VMM, whose root holds only its own directory). Default: the VMM opens `path` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<String>,
}

/// `PUT /vm/snapshot` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    pub id: String,
    pub path: String,
    /// The snapshot this one is incremental on, if any.
    pub parent: Option<String>,
    pub kind: SnapshotKindName,
    pub compressed: bool,
    /// Guest RAM size.
    pub memory_bytes: u64,
    /// Pages stored: non-zero pages of a full snapshot, dirtied pages of an incremental one.
    pub stored_pages: u64,
    /// Bytes the snapshot's files occupy on disk (holes excluded).
    pub disk_bytes: u64,
    pub state_bytes: u64,
    /// How long the vCPUs were stopped for the snapshot, in ms.
    pub paused_ms: f64,
    /// Time to save state and write all files (fsync included), in ms.
    pub write_ms: f64,
}

/// What a source does when pre-copy hits its pass or time limit without converging.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    /// Stop and copy anyway (the pause may exceed `max_downtime_ms`).
    #[default]
    Force,
    /// Give up; the VM keeps running here.
    Abort,
}

/// `PUT /vm/migration` body: migrate this running VM out to a waiting target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The target: `HOST:PORT` (TCP) or `unix:/path` (a same-host Unix socket).
    pub to: String,
    /// File on the VMM's host holding the pre-shared key (at least 16 bytes); the target
    /// must use the same key.
    pub key_file: String,
    /// A hand-off token: the connection to `to` and the open key file were handed to the
    /// VMM (in that order) over `handoff.sock` in its directory under this token, by a
    /// client in the host's namespaces (`ray migrate start` does it for a jailed VMM, which
    /// cannot connect or open the key file itself). Default: the VMM connects and opens them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<String>,
    /// Longest acceptable pause of the guest, in ms (default 30).
    #[serde(default = "default_max_downtime_ms")]
    pub max_downtime_ms: u64,
    /// What to do when pre-copy does not converge within the limits (default `force`).
    #[serde(default)]
    pub on_limit: OnLimit,
    /// Pre-copy passes before the limit applies (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_passes: Option<u32>,
    /// Pre-copy time before the limit applies, in ms (default 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_time_ms: Option<u64>,
    /// Throttle vCPUs in growing steps when the dirty rate outruns the link (default true).
    #[serde(default = "default_true")]
    pub auto_converge: bool,
    /// lz4-compress page batches (pays off on slow links only).
    #[serde(default)]
    pub compress: bool,
    /// Send the VM in the clear over TCP after the Noise handshake proved the key (default
    /// false: every byte is encrypted and authenticated). The target must be started with
    /// the same choice. Same-host `unix:` moves are always plaintext after the handshake.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Before the switch-over, reread all of the paused VM's memory and compare it with what
    /// was sent: proves the dirty log missed no write, at the cost of one pass over guest
    /// memory inside the downtime (default false).
    #[serde(default)]
    pub recheck_memory: bool,
    /// Copy the VM's disks with it (default false: the target opens the same paths, shared
    /// storage). Each disk's blocks go in the pre-copy passes, written blocks again (dirty
    /// block tracking), the last ones in the pause; the target, started with a disk
    /// directory, writes them to `DIR/<disk id>.img` and its VM uses those files.
    #[serde(default)]
    pub copy_disks: bool,
    /// Host-wide cap on concurrent migrations, both directions (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
}

fn default_max_downtime_ms() -> u64 {
    30
}

fn default_true() -> bool {
    true
}

/// Which end of a migration this VMM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationRole {
    Source,
    Target,
}

/// `GET /vm/migration`: the migration of this VM, in flight or finished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationStatus {
    pub role: MigrationRole,
    /// The other end: the target address (source) or the listening address (target).
    pub peer: String,
    /// Session state.
    pub state: MigrationState,
    /// Current pre-copy pass (1 = the full copy).
    pub pass: u32,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    /// Pages dirtied during the last pass.
    pub dirty_pages: u64,
    pub dirty_rate_mib_s: f64,
    pub bandwidth_mib_s: f64,
    /// Predicted pause if stop-and-copy started now.
    pub expected_downtime_ms: f64,
    pub throttle_percent: u8,
    /// Since the migration started.
    pub elapsed_ms: u64,
    /// Why it failed (state `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What became of the VM here.
    pub vm: MigrationVmOutcome,
    /// Source: from pause to the target's `Resumed`, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<f64>,
    /// Source: rate of the first (bulk) pre-copy pass, from its first page read to the
    /// target's acknowledgement, MiB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk_mib_s: Option<f64>,
    /// Source: stop-and-copy was forced by the limit.
    #[serde(default)]
    pub forced: bool,
    /// Source: wall clock (µs since the Unix epoch) when the vCPUs stopped for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at_unix_us: Option<u64>,
    /// Target: wall clock when the vCPUs started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at_unix_us: Option<u64>,
    /// Target: wall clock when the guest's heartbeat first moved after the resume. Minus
    /// the source's `paused_at_unix_us` it is the downtime the guest saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_heartbeat_unix_us: Option<u64>,
    /// Target started with prefault: bytes of guest memory populated so far, of
    /// `prefault_total_bytes` (done when equal). It stops when the migration ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefault_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefault_total_bytes: Option<u64>,
    /// Why the prefault gave up (the migration goes on without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefault_error: Option<String>,
    /// Source copying disks (`copy_disks`): disk data bytes sent so far (ranges of zeros
    /// and holes cost none), and of them those sent while the VM was paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes_sent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes_final: Option<u64>,
}

/// `GET /vm/snapshot/progress`: the snapshot being written, if any.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotProgress {
    pub active: bool,
    pub id: Option<String>,
    /// Bytes of guest memory gone through so far, of `total_bytes`.
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// One snapshot in a store listing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotEntry {
    pub id: String,
    pub parent: Option<String>,
    /// Distance from the root of its chain (0 for a full snapshot).
    pub depth: u32,
    pub vm_id: String,
    pub kind: SnapshotKindName,
    /// The snapshot's own state.
    pub state: SnapshotStateName,
    pub created_ms: u64,
    pub memory_bytes: u64,
    pub stored_pages: u64,
    pub disk_bytes: u64,
}

/// A directory in a store that is not a readable snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BrokenSnapshot {
    pub id: String,
    pub error: String,
}

/// `GET /vm/snapshots`: every snapshot of a store, parents before their children.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub store: String,
    pub snapshots: Vec<SnapshotEntry>,
    pub broken: Vec<BrokenSnapshot>,
}

/// `PUT /vm/snapshot/delete` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDelete {
    /// The snapshot's directory.
    pub path: String,
}

/// `PUT /vm/snapshot/merge` body: flatten the chain of `path` into a new full snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMerge {
    pub path: String,
    /// Id of the new full snapshot, created beside `path`.
    pub into: String,
    #[serde(default)]
    pub compress: bool,
}

/// The machine-readable kind of an error: stable across releases (new kinds may be
/// added), so clients branch on it rather than on the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is wrong: a malformed or invalid body, query or value.
    InvalidRequest,
    /// Over TCP: the `Host` header names something other than a loopback address (a
    /// DNS-rebinding guard).
    ForbiddenHost,
    /// Over TCP: no `Authorization: Bearer` token, or not this VM's (`api.token` in its
    /// directory).
    Unauthorized,
    /// What the request names does not exist (a migration, a snapshot).
    NotFound,
    /// No such path.
    UnknownEndpoint,
    /// The path exists, the method does not.
    MethodNotAllowed,
    /// The VM's state (or the host's) does not allow the request now.
    WrongState,
    /// The request collides with what exists (a snapshot that already exists, or that
    /// others depend on).
    Conflict,
    /// The body is larger than the API accepts.
    PayloadTooLarge,
    /// A body that is not declared `Content-Type: application/json`.
    UnsupportedMediaType,
    /// The endpoint needs an HTTP upgrade (`Connection: upgrade`, `Upgrade: ray-console`).
    UpgradeRequired,
    /// The request was valid and allowed, and carrying it out failed.
    Failed,
    /// The VMM is ending and takes no more requests.
    ShuttingDown,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::InvalidRequest,
        ErrorCode::ForbiddenHost,
        ErrorCode::Unauthorized,
        ErrorCode::NotFound,
        ErrorCode::UnknownEndpoint,
        ErrorCode::MethodNotAllowed,
        ErrorCode::WrongState,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::UpgradeRequired,
        ErrorCode::Failed,
        ErrorCode::ShuttingDown,
    ];

    /// The code as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::ForbiddenHost => "forbidden_host",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::UnknownEndpoint => "unknown_endpoint",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::WrongState => "wrong_state",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::UpgradeRequired => "upgrade_required",
            ErrorCode::Failed => "failed",
            ErrorCode::ShuttingDown => "shutting_down",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of every 4xx/5xx answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What kind of error: stable, for programs.
    pub code: ErrorCode,
    /// A sentence saying what was wrong and with which value: for people.
    pub message: String,
}

/// `GET /version`: what this VMM is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VersionInfo {
    /// rayvisor's version (the `ray` binary that runs this VMM).
    pub version: String,
    /// Version of this API's OpenAPI document (`info.version`).
    pub api_version: String,
    /// `os/arch` of the VMM's host, e.g. `linux/x86_64`.
    pub platform: String,
}

impl VersionInfo {
    /// The version of this build.
    pub fn current() -> Self {
        VersionInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: API_VERSION.to_string(),
            platform: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }
}

/// Most console output a VMM keeps, and so returns or replays: 1 MiB.
pub const CONSOLE_KEPT_BYTES: u64 = 1 << 20;

/// Version of the per-VM API (the OpenAPI document's `info.version`): the major number
/// changes when a request or answer changes incompatibly.
pub const API_VERSION: &str = "1.0.0";

/// `GET /vm/console` query.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConsoleTailQuery {
    /// How many trailing bytes to return (default 4096; at most the 1 MiB the VMM keeps).
    #[param(minimum = 0, maximum = 1048576)]
    pub bytes: Option<u64>,
}

/// Who may type into an attached console.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleMode {
    /// Write if no other attachment writes, else read only.
    #[default]
    Auto,
    /// Read only: input on this attachment is ignored.
    ReadOnly,
    /// Write, taking input over from the attachment that has it (it becomes read only).
    Takeover,
}

/// `GET /vm/console/stream` query.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConsoleStreamQuery {
    /// Start at this output offset (`total_bytes` of an earlier answer). Output older than
    /// the 1 MiB the VMM keeps is skipped (with a notice).
    #[param(minimum = 0)]
    pub from: Option<u64>,
    /// Without `from`: start this many bytes before the current end (default 0: only new
    /// output; at most the 1 MiB the VMM keeps).
    #[param(minimum = 0, maximum = 1048576)]
    pub history: Option<u64>,
    /// Whether to take the console's input (default `auto`).
    #[param(inline)]
    pub mode: Option<ConsoleMode>,
}

/// The frames the VMM sends on an attached console (`GET /vm/console/stream` after its
/// upgrade): a kind byte, a big-endian u32 length and that many bytes of payload. The
/// client sends raw input bytes (no frames); closing the connection detaches.
pub mod console_frame {
    /// Output of the guest.
    pub const OUTPUT: u8 = 0;
    /// A message for the person at the console (UTF-8): output skipped, input dropped.
    pub const NOTICE: u8 = 1;
    /// This attachment's mode changed: `write` or `read_only`.
    pub const MODE: u8 = 2;
    /// The VMM is ending; nothing follows.
    pub const END: u8 = 3;
    /// Frame header size.
    pub const HEADER: usize = 5;

    /// A frame of `kind` carrying `payload`.
    pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(HEADER + payload.len());
        f.push(kind);
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Splits the first whole frame off `buf`: `(kind, payload, bytes used)`.
    pub fn decode(buf: &[u8]) -> Option<(u8, &[u8], usize)> {
        let len = u32::from_be_bytes(buf.get(1..HEADER)?.try_into().ok()?) as usize;
        let payload = buf.get(HEADER..HEADER + len)?;
        Some((buf[0], payload, HEADER + len))
    }
}

/// `GET /vm/snapshots` query.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SnapshotListQuery {
    /// The store directory (default: the store of this VM's latest snapshot).
    pub store: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rejects_unknown_fields_naming_them() {
        let err = serde_json::from_str::<VmConfig>(
            r#"{"kernel":"k","vcpus":1,"memory_bytes":67108864,"cpus":2}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `cpus`"), "{err}");
    }

    #[test]
    fn config_requires_kernel_vcpus_and_memory() {
        let err =
            serde_json::from_str::<VmConfig>(r#"{"vcpus":1,"memory_bytes":67108864}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `kernel`"), "{err}");
    }

    #[test]
    fn devices_default_to_rng_and_are_left_out_when_default() {
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel":"k","vcpus":1,"memory_bytes":67108864}"#).unwrap();
        assert!(c.devices.rng);
        assert!(!serde_json::to_string(&c).unwrap().contains("devices"));
        let c: VmConfig = serde_json::from_str(
            r#"{"kernel":"k","vcpus":1,"memory_bytes":67108864,"devices":{"rng":false}}"#,
        )
        .unwrap();
        assert!(!c.devices.rng);
        let e = serde_json::from_str::<VmConfig>(
            r#"{"kernel":"k","vcpus":1,"memory_bytes":67108864,"devices":{"gpu":true}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `gpu`"), "{e}");
    }

    #[test]
    fn state_names_are_lower_case_and_match_serde() {
        for s in VmStateName::ALL {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(VmStateName::MigrationSource.as_str(), "migration_source");
    }

    #[test]
    fn migrate_request_defaults_and_rejects_unknown_fields() {
        let r: MigrateRequest =
            serde_json::from_str(r#"{"to":"10.0.0.2:7000","key_file":"/k"}"#).unwrap();
        assert_eq!(r.max_downtime_ms, 30);
        assert_eq!(r.on_limit, OnLimit::Force);
        assert!(r.auto_converge && !r.compress);
        let e = serde_json::from_str::<MigrateRequest>(
            r#"{"to":"a:1","key_file":"/k","on_limit":"retry"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown variant `retry`"), "{e}");
        let e = serde_json::from_str::<MigrateRequest>(r#"{"to":"a:1","key":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `key`"), "{e}");
    }

    #[test]
    fn error_codes_are_snake_case_and_match_serde() {
        for c in ErrorCode::ALL {
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{c}\""));
        }
        let body: ErrorBody =
            serde_json::from_str(r#"{"code":"wrong_state","message":"m"}"#).unwrap();
        assert_eq!(body.code, ErrorCode::WrongState);
    }

    #[test]
    fn console_frames_round_trip() {
        let mut buf = console_frame::encode(console_frame::OUTPUT, b"hello");
        buf.extend(console_frame::encode(console_frame::END, b""));
        let (k, p, used) = console_frame::decode(&buf).unwrap();
        assert_eq!((k, p, used), (console_frame::OUTPUT, &b"hello"[..], 10));
        let (k, p, _) = console_frame::decode(&buf[used..]).unwrap();
        assert_eq!((k, p), (console_frame::END, &b""[..]));
        assert!(
            console_frame::decode(&buf[..7]).is_none(),
            "a partial frame waits"
        );
    }

    #[test]
    fn stop_timeout_defaults_to_five_seconds() {
        let s: StopRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(s.timeout_ms, 5000);
    }
}
