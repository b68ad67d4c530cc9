//! The controller's loop on the embedded store, with hosts that only register (the
//! agents and VMMs are tested end to end in tests/e2e/cluster.rs).
use super::*;
use crate::agent::{Alive, Inventory};
use crate::store::RedbStore;

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

async fn host_up<S: Store>(s: &S, host: &str, memory_mib: u64) {
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
    })
    .unwrap();
    s.commit(
        Txn::new()
            .put_leased(keys::host_alive(host), alive, lease)
            .put(keys::host_status(host), report),
    )
    .await
    .unwrap();
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

async fn wait_log<S: Store>(s: &S, vm: &str, kind: Kind) -> Entry {
    for _ in 0..200 {
        let log = decisions::read(s, Some(vm)).await.unwrap();
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
    assert!(s.list(keys::OPS).await.unwrap().kvs.is_empty());

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
