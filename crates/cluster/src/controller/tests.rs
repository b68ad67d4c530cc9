//! The controller's loop on the embedded store, with hosts that only register (the
//! agents and VMMs are tested end to end in tests/e2e/cluster.rs).
use super::*;
use crate::agent::{Alive, Inventory};
use crate::store::{Kv, RedbStore};

struct Dir(std::path::PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("ray-ctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn host_up<S: Store>(s: &S, host: &str, memory_mib: u64) -> crate::store::LeaseId {
    let lease = s.grant(Duration::from_secs(60)).await.unwrap();
    let alive = serde_json::to_vec(&Alive { pid: 1, api: None }).unwrap();
    let report = serde_json::to_vec(&HostReport {
        inventory: Inventory {
            cpus: 4,
            memory_mib,
            numa_nodes: 1,
        },
        vms: Vec::new(),
        fenced: false,
        rejoin: None,
    })
    .unwrap();
    s.commit(
        Txn::new()
            .put_leased(keys::host_alive(host), alive, lease)
            .put(keys::host_status(host), report),
    )
    .await
    .unwrap();
    lease
}

async fn create<S: Store>(s: &S, vm: &str, spec: &str) {
    s.commit(Txn::new().put(keys::vm_spec(vm), spec))
        .await
        .unwrap();
}

fn fast(id: &str) -> ControllerConfig {
    ControllerConfig {
        leader_ttl: Duration::from_secs(1),
        renew_every: Duration::from_millis(200),
        poll: Duration::from_millis(50),
        resync: Duration::from_millis(500),
        ..ControllerConfig::new(id.into())
    }
}

async fn wait_token<S: Store>(s: &S, vm: &str) -> RunToken {
    for _ in 0..200 {
        if let Some((t, _)) = runtoken::read(s, vm).await.unwrap() {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("VM {vm} got no run token within 5 s");
}

/// The first `kind` entry of `vm` ("-": of no VM).
async fn wait_log<S: Store>(s: &S, vm: &str, kind: Kind) -> Entry {
    for _ in 0..400 {
        let log = decisions::read(s, Some(vm).filter(|v| *v != "-"))
            .await
            .unwrap();
        if let Some(e) = log.into_iter().find(|e| e.kind == kind) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no {kind:?} entry for VM {vm} within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn places_explains_releases_and_a_standby_takes_over() {
    let dir = Dir::new("loop");
    let s = RedbStore::open(&dir.0.join("s.redb")).unwrap();
    host_up(&s, "h1", 4096).await;
    host_up(&s, "h2", 4096).await;

    // A predecessor died between recording a placement and making it: undone.
    let op = Operation::Place {
        vm: "ghost".into(),
        host: "h1".into(),
    };
    s.commit(Txn::new().put(op.key(), serde_json::to_vec(&op).unwrap()))
        .await
        .unwrap();

    let a = tokio::spawn(Controller::new(s.clone(), fast("a")).run());
    for i in 1..=3 {
        create(
            &s,
            &format!("web-{i}"),
            r#"{"vcpus":1,"memory_mib":256,"group":"web"}"#,
        )
        .await;
    }
    let t1 = wait_token(&s, "web-1").await;
    let t2 = wait_token(&s, "web-2").await;
    assert_ne!(t1.host, t2.host, "anti-affinity");
    let refused = wait_log(&s, "web-3", Kind::Refused).await;
    assert_eq!(
        refused.message,
        "no host: 2 would break anti-affinity group web"
    );
    assert!(runtoken::read(&s, "web-3").await.unwrap().is_none());
    let placed = wait_log(&s, "web-1", Kind::Placed).await;
    assert_eq!(placed.host.as_deref(), Some(t1.host.as_str()));
    assert_eq!(placed.data["host_free_memory_mib_after"], 4096 - 256);
    let rec = wait_log(&s, "ghost", Kind::Recovered).await;
    assert!(
        rec.message.contains("never happened: undone"),
        "{}",
        rec.message
    );
    wait_no_ops(&s).await;

    // Deleting a VM releases its token: its host's assignment goes.
    s.commit(Txn::new().delete(keys::vm_spec("web-1")))
        .await
        .unwrap();
    wait_log(&s, "web-1", Kind::Released).await;
    assert!(s
        .get(&keys::assignment(&t1.host, "web-1"))
        .await
        .unwrap()
        .is_none());
    // ... which makes room for web-3 on that host.
    assert_eq!(wait_token(&s, "web-3").await.host, t1.host);

    // The leader dies; a standby takes the lead and serves new VMs; the old one's
    // writes are fenced (it is gone here; the fence itself is tested in `leader`).
    let b = tokio::spawn(Controller::new(s.clone(), fast("b")).run());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(leader::current(&s).await.unwrap().unwrap().id, "a");
    a.abort();
    let _ = a.await;
    create(
        &s,
        "db",
        r#"{"vcpus":1,"memory_mib":256,"pool":"critical"}"#,
    )
    .await;
    wait_token(&s, "db").await;
    assert_eq!(leader::current(&s).await.unwrap().unwrap().id, "b");
    let log = decisions::read(&s, None).await.unwrap();
    let leaders: Vec<&str> = log
        .iter()
        .filter(|e| e.kind == Kind::Leader)
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(leaders, ["controller a leads", "controller b leads"]);
    // Every VM is placed exactly once: epoch 1 everywhere.
    for vm in ["web-2", "web-3", "db"] {
        assert_eq!(wait_token(&s, vm).await.epoch, 1);
    }
    b.abort();
}

async fn wait_key<S: Store>(s: &S, key: &str, present: bool) -> Option<Kv> {
    for _ in 0..200 {
        let kv = s.get(key).await.unwrap();
        if kv.is_some() == present {
            return kv;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "{key} is not {} within 5 s",
        if present { "there" } else { "gone" }
    );
}

/// Waits until every recorded operation is done (its record deleted): the controller
/// deletes a record in its own commit after the operation's, so a test that sees the
/// operation's effect may still see its record for a moment.
async fn wait_no_ops<S: Store>(s: &S) {
    let mut left = Vec::new();
    for _ in 0..200 {
        left = s.list(keys::OPS).await.unwrap().kvs;
        if left.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let keys: Vec<&str> = left.iter().map(|kv| kv.key.as_str()).collect();
    panic!("operations still recorded after 5 s: {keys:?}");
}

async fn put<S: Store, T: Serialize>(s: &S, key: String, v: &T) {
    s.commit(Txn::new().put(key, serde_json::to_vec(v).unwrap()))
        .await
        .unwrap();
}

/// The count of `kind` entries for `vm`, once it reaches `n`.
async fn wait_logs<S: Store>(s: &S, vm: &str, kind: Kind, n: usize) -> Entry {
    for _ in 0..200 {
        let log = decisions::read(s, Some(vm)).await.unwrap();
        let of: Vec<Entry> = log.into_iter().filter(|e| e.kind == kind).collect();
        if of.len() >= n {
            return of[n - 1].clone();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("fewer than {n} {kind:?} entries for VM {vm} within 5 s");
}

/// Live migration as the controller drives it; the agents' parts (receiver and sender
/// reports) are written here as the agents write them (the real ones: tests/e2e).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_move_the_token_once_or_leave_the_vm_where_it_was() {
    use crate::migration::{Incoming, Outgoing, Phase, Progress, Request};
    let dir = Dir::new("migrate");
    let s = RedbStore::open(&dir.0.join("s.redb")).unwrap();
    for h in ["h1", "h2", "h3"] {
        host_up(&s, h, 4096).await;
    }
    let ctl = tokio::spawn(Controller::new(s.clone(), fast("a")).run());
    create(&s, "m", r#"{"vcpus":1,"memory_mib":256}"#).await;
    let first = wait_token(&s, "m").await;
    let to = if first.host == "h2" { "h3" } else { "h2" };
    let ask = |to: Option<&str>, abort: bool| Request {
        to: to.map(String::from),
        abort,
        cause: None,
    };
    let waiting = |host: &str| Progress {
        addr: Some(format!("{host}:7000")),
        ..Progress::new(host, Phase::Waiting)
    };

    // Refused before anything acts: its own host, a host with no agent.
    put(
        &s,
        keys::migrate_request("m"),
        &ask(Some(&first.host), false),
    )
    .await;
    let e = wait_logs(&s, "m", Kind::MigrationFailed, 1).await;
    assert!(e.message.contains("runs on host"), "{}", e.message);
    put(&s, keys::migrate_request("m"), &ask(Some("nowhere"), false)).await;
    let e = wait_logs(&s, "m", Kind::MigrationFailed, 2).await;
    assert!(
        e.message.contains("host nowhere has no live agent"),
        "{}",
        e.message
    );

    // A migration that works: incoming on the target, outgoing on the source with the
    // receiver's address, then the receiver's "done" moves the token to epoch 2.
    put(&s, keys::migrate_request("m"), &ask(Some(to), false)).await;
    let inc = wait_key(&s, &keys::incoming(to, "m"), true).await.unwrap();
    let inc: Incoming = serde_json::from_slice(&inc.value).unwrap();
    assert_eq!(
        inc,
        Incoming {
            from: first.host.clone(),
            epoch: 1
        }
    );
    put(&s, keys::receiver("m"), &waiting(to)).await;
    let out = wait_key(&s, &keys::outgoing(&first.host, "m"), true)
        .await
        .unwrap();
    let out: Outgoing = serde_json::from_slice(&out.value).unwrap();
    assert_eq!(
        (out.to.as_str(), out.addr.clone()),
        (to, format!("{to}:7000"))
    );
    put(
        &s,
        keys::sender("m"),
        &Progress::new(&first.host, Phase::Copying),
    )
    .await;
    // The controller dies here; its successor carries the migration on.
    ctl.abort();
    let _ = ctl.await;
    let ctl = tokio::spawn(Controller::new(s.clone(), fast("b")).run());
    put(&s, keys::receiver("m"), &Progress::new(to, Phase::Done)).await;
    let e = wait_logs(&s, "m", Kind::Migrated, 1).await;
    assert_eq!(e.host.as_deref(), Some(to));
    let (t, _) = runtoken::read(&s, "m").await.unwrap().unwrap();
    assert_eq!(
        t,
        RunToken {
            host: to.into(),
            epoch: 2
        }
    );
    let a = s.get(&keys::assignment(to, "m")).await.unwrap().unwrap();
    let a: runtoken::Assignment = serde_json::from_slice(&a.value).unwrap();
    assert_eq!(
        a.origin,
        Origin::Migration {
            from: first.host.clone()
        }
    );
    assert!(s
        .get(&keys::assignment(&first.host, "m"))
        .await
        .unwrap()
        .is_none());
    for key in [
        keys::incoming(to, "m"),
        keys::outgoing(&first.host, "m"),
        keys::receiver("m"),
        keys::sender("m"),
        keys::migrate_request("m"),
    ] {
        wait_key(&s, &key, false).await;
    }
    wait_no_ops(&s).await;

    // The engine picks the target when none is given; the receiver fails: the VM stays.
    put(&s, keys::migrate_request("m"), &ask(None, false)).await;
    let mut target = None;
    for _ in 0..200 {
        for h in ["h1", "h2", "h3"] {
            if s.get(&keys::incoming(h, "m")).await.unwrap().is_some() {
                target = Some(h);
            }
        }
        if target.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let target = target.expect("an incoming key on some host");
    assert_ne!(target, to, "not its own host");
    let failed = Progress {
        error: Some("no migration arrived".into()),
        ..Progress::new(target, Phase::Failed)
    };
    put(&s, keys::receiver("m"), &failed).await;
    let e = wait_logs(&s, "m", Kind::MigrationFailed, 3).await;
    assert!(e.message.contains("no migration arrived"), "{}", e.message);
    wait_key(&s, &keys::incoming(target, "m"), false).await;

    // An abort: the outgoing key goes (the source cancels); the source's "rolled back"
    // ends it with the VM where it was.
    put(
        &s,
        keys::migrate_request("m"),
        &ask(Some(&first.host), false),
    )
    .await;
    wait_key(&s, &keys::incoming(&first.host, "m"), true).await;
    put(&s, keys::receiver("m"), &waiting(&first.host)).await;
    wait_key(&s, &keys::outgoing(to, "m"), true).await;
    put(&s, keys::sender("m"), &Progress::new(to, Phase::Copying)).await;
    put(&s, keys::migrate_request("m"), &ask(None, true)).await;
    wait_key(&s, &keys::outgoing(to, "m"), false).await;
    assert!(s.get(&keys::migrate_request("m")).await.unwrap().is_some());
    put(&s, keys::sender("m"), &Progress::new(to, Phase::Failed)).await;
    wait_logs(&s, "m", Kind::MigrationFailed, 4).await;
    wait_key(&s, &keys::migrate_request("m"), false).await;
    let (t, _) = runtoken::read(&s, "m").await.unwrap().unwrap();
    assert_eq!(
        t,
        RunToken {
            host: to.into(),
            epoch: 2
        },
        "the token never moved"
    );
    wait_no_ops(&s).await;
    ctl.abort();
}

/// Plays both agents' parts of every migration in the store: a receiver waits as soon as
/// it is asked for, and the VM arrives as soon as the source is told to send. Returns the
/// most migrations seen under way at once.
async fn agents_that_migrate<S: Store>(s: S, stop: Arc<tokio::sync::Notify>) -> usize {
    use crate::migration::{Outgoing, Phase, Progress};
    let mut most = 0;
    loop {
        let ops = s.list(keys::OPS).await.unwrap().kvs.len();
        most = most.max(ops);
        for kv in s.list(keys::HOSTS).await.unwrap().kvs {
            let Some((host, rest)) = keys::split_host_key(&kv.key) else {
                continue;
            };
            if let Some(vm) = rest.strip_prefix("incoming/") {
                if s.get(&keys::receiver(vm)).await.unwrap().is_none() {
                    let p = Progress {
                        addr: Some(format!("{host}:7000")),
                        ..Progress::new(host, Phase::Waiting)
                    };
                    put(&s, keys::receiver(vm), &p).await;
                }
            }
            if let Some(vm) = rest.strip_prefix("outgoing/") {
                let out: Outgoing = serde_json::from_slice(&kv.value).unwrap();
                put(&s, keys::receiver(vm), &Progress::new(&out.to, Phase::Done)).await;
            }
        }
        tokio::select! {
            _ = stop.notified() => return most,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_moves_every_vm_off_two_at_a_time_and_ends_drained() {
    let dir = Dir::new("drain");
    let s = RedbStore::open(&dir.0.join("s.redb")).unwrap();
    for h in ["h1", "h2", "h3"] {
        host_up(&s, h, 4096).await;
    }
    let ctl = tokio::spawn(Controller::new(s.clone(), fast("a")).run());
    // Five VMs on h1 (the others cordoned meanwhile).
    for h in ["h2", "h3"] {
        let spec = HostSpec {
            cordon: true,
            ..HostSpec::default()
        };
        s.commit(Txn::new().put(keys::host_spec(h), spec.to_json()))
            .await
            .unwrap();
    }
    for i in 0..5 {
        create(&s, &format!("d{i}"), r#"{"vcpus":1,"memory_mib":256}"#).await;
    }
    for i in 0..5 {
        assert_eq!(wait_token(&s, &format!("d{i}")).await.host, "h1");
    }
    for h in ["h2", "h3"] {
        s.commit(Txn::new().delete(keys::host_spec(h)))
            .await
            .unwrap();
    }
    let stop = Arc::new(tokio::sync::Notify::new());
    let agents = tokio::spawn(agents_that_migrate(s.clone(), Arc::clone(&stop)));
    let spec = HostSpec {
        drain: true,
        ..HostSpec::default()
    };
    s.commit(Txn::new().put(keys::host_spec("h1"), spec.to_json()))
        .await
        .unwrap();
    let drained = wait_log(&s, "-", Kind::Drained).await;
    assert_eq!(drained.host.as_deref(), Some("h1"));
    stop.notify_one();
    let most = agents.await.unwrap();
    assert!(
        (1..=drain::PARALLEL).contains(&most),
        "{most} migrations at once"
    );
    // Every VM moved once (epoch 2), off h1, by the drain; a new VM does not go to h1.
    for i in 0..5 {
        let vm = format!("d{i}");
        let t = wait_token(&s, &vm).await;
        assert!(t.host != "h1" && t.epoch == 2, "{vm}: {t:?}");
        let m = wait_log(&s, &vm, Kind::Migrating).await;
        assert_eq!(m.data["cause"], "drain h1");
    }
    let world = read_world(&s).await.unwrap();
    let h1 = world.hosts.iter().find(|h| h.name == "h1").unwrap();
    assert_eq!(h1.state(0), "Drained (Offline: maintenance)");
    create(&s, "late", r#"{"vcpus":1,"memory_mib":256}"#).await;
    assert_ne!(wait_token(&s, "late").await.host, "h1");
    ctl.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_host_s_ha_vms_restart_elsewhere_after_the_grace_and_others_stay() {
    let dir = Dir::new("ha");
    let s = RedbStore::open(&dir.0.join("s.redb")).unwrap();
    let lease = host_up(&s, "h1", 4096).await;
    // A predecessor recorded an HA restart it never made: undone.
    let op = Operation::FailOver {
        vm: "ghost".into(),
        from: "h0".into(),
        to: "h1".into(),
    };
    s.commit(Txn::new().put(op.key(), serde_json::to_vec(&op).unwrap()))
        .await
        .unwrap();
    let timing = Timing::for_lease(Duration::from_secs(2));
    let cfg = ControllerConfig {
        timing,
        ..fast("a")
    };
    let c = tokio::spawn(Controller::new(s.clone(), cfg).run());
    create(
        &s,
        "ha",
        r#"{"vcpus":1,"memory_mib":256,"restart_priority":5}"#,
    )
    .await;
    create(&s, "plain", r#"{"vcpus":1,"memory_mib":256}"#).await;
    assert_eq!(wait_token(&s, "ha").await.host, "h1");
    assert_eq!(wait_token(&s, "plain").await.host, "h1");
    let rec = wait_log(&s, "ghost", Kind::Recovered).await;
    assert!(
        rec.message.contains("HA restart") && rec.message.contains("undone"),
        "{}",
        rec.message
    );

    // h1's lease ends; h2 is there to take its HA VM.
    host_up(&s, "h2", 4096).await;
    s.revoke(lease).await.unwrap();
    let lapsed = wait_log(&s, "-", Kind::LeaseLapsed).await;
    assert_eq!(lapsed.host.as_deref(), Some("h1"));
    assert_eq!(lapsed.data["vms"], 2);
    let restarted = wait_log(&s, "ha", Kind::Restarted).await;
    assert_eq!(restarted.host.as_deref(), Some("h2"));
    assert!(
        restarted.at_ms >= lapsed.at_ms + timing.grace.as_millis() as u64,
        "restarted {} ms after the lapse was seen, before the grace ended",
        restarted.at_ms - lapsed.at_ms
    );
    assert!(
        restarted.message.contains("by a fresh boot"),
        "{}",
        restarted.message
    );
    assert_eq!(restarted.data["epoch"], 2);
    // The token and the assignment moved together; the VM without HA stays with h1.
    let t = wait_token(&s, "ha").await;
    assert_eq!((t.host.as_str(), t.epoch), ("h2", 2));
    assert!(wait_key(&s, &keys::assignment("h1", "ha"), false)
        .await
        .is_none());
    let a = wait_key(&s, &keys::assignment("h2", "ha"), true)
        .await
        .unwrap();
    let a: runtoken::Assignment = serde_json::from_slice(&a.value).unwrap();
    assert_eq!((a.epoch, a.origin), (2, Origin::Boot));
    let plain = wait_token(&s, "plain").await;
    assert_eq!((plain.host.as_str(), plain.epoch), ("h1", 1));
    wait_no_ops(&s).await;
    c.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uneven_loads_held_for_three_passes_get_one_logged_recommendation() {
    let dir = Dir::new("rebalance");
    let s = RedbStore::open(&dir.0.join("s.redb")).unwrap();
    host_up(&s, "h1", 4096).await;
    let c = tokio::spawn(Controller::new(s.clone(), fast("a")).run());
    for vm in ["r1", "r2", "r3"] {
        create(&s, vm, r#"{"vcpus":1,"memory_mib":1024}"#).await;
        wait_token(&s, vm).await;
    }
    // An empty host joins: the loads are uneven from now on.
    host_up(&s, "h2", 4096).await;
    let e = wait_log(&s, "-", Kind::RebalanceRecommended).await;
    assert_eq!(e.host.as_deref(), Some("h2"));
    assert!(
        e.message.contains("from host h1 to host h2"),
        "{}",
        e.message
    );
    assert!(e.data["imbalance_after"].as_f64() < e.data["imbalance_before"].as_f64());
    // Recommend-only: nothing moved, and it is logged once however many passes follow.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for vm in ["r1", "r2", "r3"] {
        let t = wait_token(&s, vm).await;
        assert_eq!((t.host.as_str(), t.epoch), ("h1", 1));
    }
    let n = decisions::read(&s, None)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == Kind::RebalanceRecommended)
        .count();
    assert_eq!(n, 1);
    c.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_rebalancing_asks_for_one_migration_to_the_empty_host() {
    let dir = Dir::new("rebalance-auto");
    let s = RedbStore::open(&dir.0.join("s.redb")).unwrap();
    host_up(&s, "h1", 4096).await;
    let cfg = ControllerConfig {
        rebalance: Some(rebalance::RebalanceConfig {
            auto: true,
            ..Default::default()
        }),
        ..fast("a")
    };
    let c = tokio::spawn(Controller::new(s.clone(), cfg).run());
    for vm in ["r1", "r2", "r3"] {
        create(&s, vm, r#"{"vcpus":1,"memory_mib":1024}"#).await;
        wait_token(&s, vm).await;
    }
    host_up(&s, "h2", 4096).await;
    let e = wait_log(&s, "-", Kind::RebalanceRecommended).await;
    assert!(
        e.message.ends_with("(asked for: automatic mode)"),
        "{}",
        e.message
    );
    let vm = e.vm.clone().unwrap();
    let req = wait_key(&s, &keys::migrate_request(&vm), true)
        .await
        .unwrap();
    let req: crate::migration::Request = serde_json::from_slice(&req.value).unwrap();
    assert_eq!(
        (req.to.as_deref(), req.cause.as_deref()),
        (Some("h2"), Some("rebalance"))
    );
    // No agents here: the migration stays under way, and no second one is asked for.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let asked = s
        .list(keys::VMS)
        .await
        .unwrap()
        .kvs
        .iter()
        .filter(|kv| kv.key.ends_with("/migrate"))
        .count();
    assert_eq!(asked, 1);
    c.abort();
}

/// The status h1's agent writes: `vms` running, answering rejoin request `rejoin`.
async fn report<S: Store>(s: &S, host: &str, vms: &[&str], rejoin: Option<u64>) {
    let report = HostReport {
        inventory: Inventory {
            cpus: 4,
            memory_mib: 4096,
            numa_nodes: 1,
        },
        vms: vms.iter().map(|v| v.to_string()).collect(),
        fenced: false,
        rejoin,
    };
    s.commit(Txn::new().put(
        keys::host_status(host),
        serde_json::to_vec(&report).unwrap(),
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_back_from_maintenance_rejoins_only_once_checked() {
    let dir = Dir::new("rejoin");
    let s = RedbStore::open(&dir.0.join("s.redb")).unwrap();
    host_up(&s, "h1", 4096).await;
    let ctl = tokio::spawn(Controller::new(s.clone(), fast("a")).run());
    // h1 is back from maintenance, and a stale VMM (no token names h1 for it) runs there.
    let spec = HostSpec {
        rejoin: Some(7),
        ..HostSpec::default()
    };
    s.commit(Txn::new().put(keys::host_spec("h1"), spec.to_json()))
        .await
        .unwrap();
    let started = wait_log(&s, "-", Kind::Rejoining).await;
    assert!(
        started.message.contains("Offline -> Rejoining (Recover)"),
        "{}",
        started.message
    );
    let world = read_world(&s).await.unwrap();
    assert_eq!(
        world.hosts[0].status(),
        ray_scheduler::HostStatus::Rejoining
    );
    // Not Ready: a new VM waits, explained.
    create(&s, "v", r#"{"vcpus":1,"memory_mib":256}"#).await;
    let refused = wait_log(&s, "v", Kind::Refused).await;
    assert!(refused.message.contains("Rejoining"), "{}", refused.message);

    let waits = |log: Vec<Entry>| -> Vec<String> {
        log.into_iter()
            .filter(|e| e.kind == Kind::Rejoining)
            .map(|e| e.message)
            .collect()
    };
    let until = |want: &'static str| {
        let s = s.clone();
        async move {
            for _ in 0..200 {
                let log = decisions::read(&s, None).await.unwrap();
                if waits(log).iter().any(|m| m.contains(want)) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("no Rejoining entry saying {want:?}");
        }
    };
    until("has not re-reported its inventory since the request").await;
    report(&s, "h1", &["ghost"], Some(7)).await;
    until("stale VMMs run there (their run tokens do not name it): ghost").await;
    assert!(runtoken::read(&s, "v").await.unwrap().is_none());
    // The agent stopped the stale VMM: the checks pass, h1 is Ready and takes the VM.
    report(&s, "h1", &[], Some(7)).await;
    let done = wait_log(&s, "-", Kind::Rejoined).await;
    assert!(
        done.message
            .contains("Rejoining -> Ready (RejoinOk): fresh lease, inventory re-reported (4 CPUs"),
        "{}",
        done.message
    );
    assert_eq!(wait_token(&s, "v").await.host, "h1");
    let spec = s.get(&keys::host_spec("h1")).await.unwrap().unwrap();
    assert_eq!(HostSpec::parse(Some(&spec.value)).unwrap().rejoin, None);
    // Each wait was logged once, in order.
    let log = waits(decisions::read(&s, None).await.unwrap());
    assert_eq!(log.len(), 3, "{log:?}");
    ctl.abort();
}
