//! The controller's logic without KVM: request checks, refusals by state, and the order of
//! validation and side effects (a refused request changes nothing).
use std::sync::mpsc;

use ray_api::vmm::{SnapshotKind, SnapshotRequest, VmConfig};

use super::snapshots::plan_snapshot;
use super::*;

fn controller() -> (Controller, Receiver<Message>) {
    let (tx, rx) = mpsc::channel();
    let dir = std::env::temp_dir().join(format!(
        "ray-ctl-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let c = Controller::new(
        "t".into(),
        VmPaths { dir },
        false,
        AuditTrail::in_memory(),
        tx,
    );
    (c, rx)
}

fn config() -> VmConfig {
    VmConfig {
        kernel: "/nonexistent/kernel".into(),
        initrd: None,
        cmdline: String::new(),
        vcpus: 1,
        memory_bytes: 64 << 20,
        devices: Default::default(),
        numa: Vec::new(),
        numa_attribution: Default::default(),
        numa_migration: Default::default(),
    }
}

fn snap(path: &str) -> SnapshotRequest {
    SnapshotRequest {
        handoff: None,
        path: path.into(),
        pause: false,
        kind: SnapshotKind::Auto,
        compress: false,
        max_snapshots: None,
    }
}

#[test]
fn snapshot_plans_check_everything_before_anything_happens() {
    let cfg = config();
    let dir = std::env::temp_dir();
    let fresh = dir.join(format!("ray-plan-{}", std::process::id()));
    let fresh_s = fresh.display().to_string();
    // Running without --pause, or in a state that has no memory: refused naming it.
    let e = plan_snapshot(VmState::Running, None, Some(&cfg), &snap(&fresh_s), None).unwrap_err();
    assert!(
        matches!(e, ControllerError::Refused(_)) && e.to_string().contains("--pause"),
        "{e}"
    );
    let e = plan_snapshot(VmState::Created, None, Some(&cfg), &snap(&fresh_s), None).unwrap_err();
    assert!(e.to_string().contains("created"), "{e}");
    // The defect where --max-snapshots 0 was found after pausing: now part of the plan.
    let mut r = snap(&fresh_s);
    r.pause = true;
    r.max_snapshots = Some(0);
    let e = plan_snapshot(VmState::Running, None, Some(&cfg), &r, None).unwrap_err();
    assert!(
        matches!(e, ControllerError::Invalid(_)) && e.to_string().contains("max_snapshots is 0"),
        "{e}"
    );
    let e = plan_snapshot(VmState::Paused, None, Some(&cfg), &snap("rel/path"), None).unwrap_err();
    assert!(e.to_string().contains("must be absolute"), "{e}");
    let e = plan_snapshot(
        VmState::Paused,
        None,
        Some(&cfg),
        &snap(&dir.display().to_string()),
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    // Parent selection.
    let store = fresh.parent().unwrap().to_path_buf();
    let last = (store.clone(), "base".to_string());
    let p = plan_snapshot(
        VmState::Paused,
        Some(&last),
        Some(&cfg),
        &snap(&fresh_s),
        None,
    )
    .unwrap();
    assert_eq!(
        p.parent.as_deref(),
        Some("base"),
        "auto: incremental beside the parent"
    );
    let mut full = snap(&fresh_s);
    full.kind = SnapshotKind::Full;
    assert_eq!(
        plan_snapshot(VmState::Paused, Some(&last), Some(&cfg), &full, None)
            .unwrap()
            .parent,
        None
    );
    let elsewhere = (PathBuf::from("/other/store"), "base".to_string());
    let p = plan_snapshot(
        VmState::Paused,
        Some(&elsewhere),
        Some(&cfg),
        &snap(&fresh_s),
        None,
    )
    .unwrap();
    assert_eq!(p.parent, None, "auto in another store: full");
    let mut inc = snap(&fresh_s);
    inc.kind = SnapshotKind::Incremental;
    let e = plan_snapshot(VmState::Paused, Some(&elsewhere), Some(&cfg), &inc, None).unwrap_err();
    assert!(e.to_string().contains("beside its parent"), "{e}");
    let e = plan_snapshot(VmState::Paused, None, Some(&cfg), &inc, None).unwrap_err();
    assert!(e.to_string().contains("no earlier snapshot"), "{e}");
    let e = plan_snapshot(VmState::Paused, None, None, &snap(&fresh_s), None).unwrap_err();
    assert!(e.to_string().contains("no configuration"), "{e}");
    assert_eq!(p.id, fresh.file_name().unwrap().to_string_lossy());
    assert_eq!(
        p.max_snapshots,
        ray_snapshot::SnapshotStore::DEFAULT_MAX_PER_VM
    );
}

#[test]
fn requests_a_vm_without_a_machine_cannot_serve_are_refused_naming_its_state() {
    let (mut c, rx) = controller();
    for (req, what) in [
        (Request::Pause, "paused"),
        (Request::Resume, "resume"),
        (Request::Suspend, "suspend"),
        (Request::Snapshot(snap("/tmp/x-never")), "created"),
        (Request::ConsoleInput(b"x".to_vec()), "created"),
    ] {
        let e = c.handle(req, &rx).unwrap_err();
        assert!(matches!(e, ControllerError::Refused(_)), "{e:?}");
        assert!(
            e.to_string().to_lowercase().contains(what) || e.to_string().contains("created"),
            "{e}"
        );
        assert_eq!(c.state(), VmState::Created, "a refusal changes nothing");
    }
    let e = c.handle(Request::MigrationStatus, &rx).unwrap_err();
    assert!(matches!(e, ControllerError::NotFound(_)), "{e:?}");
    let e = c.handle(Request::MigrationCancel, &rx).unwrap_err();
    assert!(matches!(e, ControllerError::NotFound(_)), "{e:?}");
    let e = c.handle(Request::Start, &rx).unwrap_err();
    assert!(e.to_string().contains("no configuration"), "{e}");
    assert_eq!(c.state(), VmState::Created);
}

#[test]
fn a_bad_configuration_is_invalid_and_leaves_the_vm_unconfigured() {
    let (mut c, rx) = controller();
    let mut cfg = config();
    cfg.vcpus = 0;
    let e = c.handle(Request::Configure(cfg), &rx).unwrap_err();
    assert!(matches!(e, ControllerError::Invalid(_)), "{e:?}");
    assert_eq!(c.state(), VmState::Created);
    assert!(c.info().config.is_none());
    // A valid shape but a kernel that does not exist: named, and nothing configured.
    let e = c.handle(Request::Configure(config()), &rx).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/kernel"), "{e}");
    assert!(c.info().config.is_none());
    let events = match c.handle(Request::Events, &rx).unwrap() {
        Response::Events(ev) => ev,
        _ => unreachable!("Events answers with events"),
    };
    assert!(events.is_empty(), "no transition was recorded: {events:?}");
}

fn migrate_request() -> MigrateRequest {
    serde_json::from_str(r#"{"to": "unix:/nowhere", "key_file": "/nonexistent/key"}"#).unwrap()
}

#[test]
fn migration_settings_default_to_what_the_docs_say_and_bad_ones_are_named() {
    let req = migrate_request();
    let (policy, limit) = super::migrations::policy_of(&req).unwrap();
    // The API and the CLI document a 60 s pre-copy limit; the VMM applies it.
    assert_eq!(policy.max_time, Duration::from_secs(60));
    assert_eq!(policy.max_downtime, Duration::from_millis(30));
    assert_eq!(limit, 8);
    let mut r = migrate_request();
    r.max_time_ms = Some(120_000);
    assert_eq!(
        super::migrations::policy_of(&r).unwrap().0.max_time,
        Duration::from_secs(120)
    );
    for (field, set) in [
        (
            "max_downtime_ms",
            (|r: &mut MigrateRequest| r.max_downtime_ms = 0) as fn(&mut _),
        ),
        ("max_passes", |r| r.max_passes = Some(0)),
        ("max_time_ms", |r| r.max_time_ms = Some(0)),
        ("max_concurrent", |r| r.max_concurrent = Some(0)),
    ] {
        let mut r = migrate_request();
        set(&mut r);
        let e = super::migrations::policy_of(&r).unwrap_err();
        assert!(
            matches!(e, ControllerError::Invalid(_))
                && e.to_string().contains(&format!("{field} is 0")),
            "{e}"
        );
    }
}

#[test]
fn a_migration_request_is_checked_before_anything_happens() {
    // A running VM is needed for any side effect; a created one is refused by state, and
    // every bad value is refused before the state is even looked at again.
    let (mut c, rx) = controller();
    let e = c
        .handle(Request::Migrate(migrate_request()), &rx)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot migrate out a VM that is created"),
        "{e}"
    );
    assert!(c.migration_handle().is_err(), "no migration was recorded");
    assert_eq!(c.state(), VmState::Created);
}

#[test]
fn a_target_without_a_shape_cannot_prefault_and_bad_listens_change_nothing() {
    let (mut c, _rx) = controller();
    let e = c
        .listen_incoming(crate::Incoming {
            listen: "unix:/nowhere/x.sock".into(),
            key_file: Path::new("/dev/zero").into(),
            max_concurrent: 8,
            prefault: true,
            insecure_plaintext: false,
            disk_dir: None,
            handed: None,
        })
        .unwrap_err();
    assert!(
        matches!(e, ControllerError::Invalid(_)) && e.to_string().contains("prefault needs"),
        "{e}"
    );
    let e = c
        .listen_incoming(crate::Incoming {
            listen: "unix:/nowhere/x.sock".into(),
            key_file: Path::new("/dev/zero").into(),
            max_concurrent: 8,
            prefault: false,
            insecure_plaintext: false,
            disk_dir: None,
            handed: None,
        })
        .unwrap_err();
    assert!(
        e.to_string().contains("/dev/zero is a character device"),
        "{e}"
    );
    let e = c
        .listen_incoming(crate::Incoming {
            listen: "nowhere".into(),
            key_file: Path::new("/dev/zero").into(),
            max_concurrent: 8,
            prefault: false,
            insecure_plaintext: false,
            disk_dir: None,
            handed: None,
        })
        .unwrap_err();
    assert!(e.to_string().contains("\"nowhere\""), "{e}");
    // A disk directory that is not one is refused before anything else.
    let e = c
        .listen_incoming(crate::Incoming {
            listen: "unix:/nowhere/x.sock".into(),
            key_file: Path::new("/dev/zero").into(),
            max_concurrent: 8,
            prefault: false,
            insecure_plaintext: false,
            disk_dir: Some("/dev/null".into()),
            handed: None,
        })
        .unwrap_err();
    assert!(
        e.to_string().contains("/dev/null is not a directory"),
        "{e}"
    );
    assert_eq!(c.state(), VmState::Created);
    assert!(c.migration_handle().is_err());
}

#[test]
fn the_memory_recheck_is_priced_by_the_memory_that_holds_data() {
    use vm_memory::{Bytes, GuestAddress};
    let regions = [(GuestAddress(0), 64 << 20)];
    let empty = crate::memory::MemoryManager::create(&regions).unwrap();
    assert_eq!(super::migrations::recheck_cost(&empty), Duration::ZERO);
    let mem = crate::memory::MemoryManager::create(&regions).unwrap();
    let data = vec![0x5au8; 16 << 20];
    mem.ram().write_slice(&data, GuestAddress(0)).unwrap();
    let cost = super::migrations::recheck_cost(&mem);
    assert!(cost > Duration::ZERO, "{cost:?}");
    assert!(cost < Duration::from_secs(1), "{cost:?}");
}
