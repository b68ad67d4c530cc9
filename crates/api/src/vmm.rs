//! The per-VM API: served by each `ray vmm` process on its Unix socket.
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

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
    pub vcpus: u8,
    /// Guest RAM in bytes: a multiple of 4 KiB, at least 32 MiB, at most what the host has.
    pub memory_bytes: u64,
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
    /// MAC every byte of page data (keyed BLAKE3) instead of checking it with per-page
    /// hashes at the end: integrity against an attacker on the migration network, at a
    /// fraction of the throughput (default false; control frames are always MACed).
    #[serde(default)]
    pub mac_pages: bool,
    /// Before the switch-over, reread all of the paused VM's memory and compare it with what
    /// was sent: proves the dirty log missed no write, at the cost of one pass over guest
    /// memory inside the downtime (default false).
    #[serde(default)]
    pub recheck_memory: bool,
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

/// Body of every 4xx/5xx answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A sentence saying what was wrong and with which value.
    pub error: String,
}

// The paths below exist only to carry the OpenAPI description; the server is in `ray-vmm`.
#[allow(dead_code)]
mod paths {
    use super::*;

    #[utoipa::path(get, path = "/vm", responses((status = 200, body = VmInfo)))]
    fn get_vm() {}

    #[utoipa::path(put, path = "/vm/config", request_body = VmConfig, responses(
        (status = 200, body = VmInfo), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn put_config() {}

    #[utoipa::path(put, path = "/vm/start", responses((status = 200, body = VmInfo), (status = 409, body = ErrorBody)))]
    fn start() {}

    #[utoipa::path(put, path = "/vm/pause", responses((status = 200, body = VmInfo), (status = 409, body = ErrorBody)))]
    fn pause() {}

    #[utoipa::path(put, path = "/vm/resume", responses((status = 200, body = VmInfo), (status = 409, body = ErrorBody)))]
    fn resume() {}

    #[utoipa::path(put, path = "/vm/suspend", responses((status = 200, body = VmInfo), (status = 409, body = ErrorBody)))]
    fn suspend() {}

    #[utoipa::path(put, path = "/vm/snapshot", request_body = SnapshotRequest, responses(
        (status = 200, body = SnapshotInfo), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn snapshot() {}

    #[utoipa::path(get, path = "/vm/snapshot/progress", responses((status = 200, body = SnapshotProgress)))]
    fn snapshot_progress() {}

    #[utoipa::path(get, path = "/vm/snapshots", params(("store" = Option<String>, Query, description = "the store directory (default: the store of this VM's latest snapshot)")),
        responses((status = 200, body = SnapshotList), (status = 400, body = ErrorBody)))]
    fn snapshot_list() {}

    #[utoipa::path(put, path = "/vm/snapshot/delete", request_body = SnapshotDelete, responses(
        (status = 204), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn snapshot_delete() {}

    #[utoipa::path(put, path = "/vm/snapshot/merge", request_body = SnapshotMerge, responses(
        (status = 200, body = SnapshotEntry), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn snapshot_merge() {}

    #[utoipa::path(put, path = "/vm/stop", request_body = StopRequest, responses(
        (status = 200, body = VmInfo), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn stop() {}

    #[utoipa::path(get, path = "/vm/events", responses((status = 200, body = Vec<LifecycleEvent>)))]
    fn events() {}

    #[utoipa::path(get, path = "/vm/console", params(("bytes" = Option<u64>, Query, description = "how many trailing bytes (default 4096)")),
        responses((status = 200, body = ConsoleTail)))]
    fn console_tail() {}

    #[utoipa::path(post, path = "/vm/console", request_body = ConsoleInput, responses(
        (status = 204), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn console_input() {}

    #[utoipa::path(put, path = "/vm/migration", request_body = MigrateRequest, responses(
        (status = 200, body = MigrationStatus), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn migrate() {}

    #[utoipa::path(get, path = "/vm/migration", responses(
        (status = 200, body = MigrationStatus), (status = 404, body = ErrorBody)))]
    fn migration_status() {}

    #[utoipa::path(put, path = "/vm/migration/cancel", responses(
        (status = 200, body = MigrationStatus), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn migration_cancel() {}

    /// After a link failure past the switch-over (`vm: paused_ownership_uncertain`), resumes
    /// the paused source copy. Only call it once the target is known dead (fenced).
    #[utoipa::path(put, path = "/vm/migration/reclaim", responses(
        (status = 200, body = MigrationStatus), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
    fn migration_reclaim() {}

    #[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "this document")))]
    fn openapi() {}
}

/// The OpenAPI document of the per-VM API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "rayvisor per-VM API",
        description = "Served by `ray vmm` on its Unix socket."
    ),
    paths(
        paths::get_vm,
        paths::put_config,
        paths::start,
        paths::pause,
        paths::resume,
        paths::suspend,
        paths::snapshot,
        paths::snapshot_progress,
        paths::snapshot_list,
        paths::snapshot_delete,
        paths::snapshot_merge,
        paths::stop,
        paths::events,
        paths::console_tail,
        paths::console_input,
        paths::migrate,
        paths::migration_status,
        paths::migration_cancel,
        paths::migration_reclaim,
        paths::openapi
    ),
    components(schemas(
        VmConfig,
        VmInfo,
        VmStateName,
        HeartbeatInfo,
        StopRequest,
        ConsoleInput,
        ConsoleTail,
        LifecycleEvent,
        SnapshotKind,
        SnapshotKindName,
        SnapshotStateName,
        SnapshotRequest,
        SnapshotInfo,
        MigrateRequest,
        OnLimit,
        MigrationRole,
        MigrationState,
        MigrationVmOutcome,
        MigrationStatus,
        SnapshotProgress,
        SnapshotEntry,
        BrokenSnapshot,
        SnapshotList,
        SnapshotDelete,
        SnapshotMerge,
        ErrorBody
    ))
)]
pub struct VmmApiDoc;

/// The per-VM OpenAPI document as pretty JSON.
pub fn openapi_json() -> String {
    VmmApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document is plain data and always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_openapi_document_is_current() {
        let committed = include_str!("../../../docs/openapi/vmm.json");
        assert_eq!(
            committed.trim(),
            openapi_json().trim(),
            "docs/openapi/vmm.json is stale: regenerate it with `ray openapi vmm > docs/openapi/vmm.json`"
        );
    }

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
    fn stop_timeout_defaults_to_five_seconds() {
        let s: StopRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(s.timeout_ms, 5000);
    }
}
