//! The agent's core against a real etcd; the VMMs are a record of what the agent asked
//! (the real ones are `ray agent`'s, tested end to end).
use super::*;
use crate::runtoken::{Origin, Transfer};
use crate::store::EtcdStore;
use crate::testing::Etcd;
use std::sync::Mutex;
use std::time::Duration;

/// Short times, so a test sees leases lapse in seconds. Still passes `Timing::check`.
fn fast() -> Timing {
    Timing {
        lease_ttl: Duration::from_secs(3),
        renew_every: Duration::from_secs(1),
        retry_every: Duration::from_millis(200),
        local_margin: Duration::from_secs(1),
        watchdog_period: Duration::from_millis(50),
        ..Timing::default()
    }
}

fn t_local() -> Duration {
    fast().local_lease()
}

#[derive(Default)]
struct Record {
    running: BTreeMap<String, LocalVm>,
    log: Vec<(Instant, String)>,
    /// Each VMM's local lease deadline (start, then renewals).
    leases: BTreeMap<String, std::time::Instant>,
    /// How long a checkpoint takes (a window to change the store in).
    checkpoint_takes: Duration,
    /// How long starting a VM takes (a slow VMM start on a loaded host).
    start_takes: Duration,
}

/// VMMs that only record what they are asked.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Record>>);

impl Recorder {
    fn note(&self, what: String) {
        self.0.lock().unwrap().log.push((Instant::now(), what));
    }

    fn log(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .log
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    fn deadline(&self, vm: &str) -> std::time::Instant {
        self.0.lock().unwrap().leases[vm]
    }

    fn when(&self, what: &str) -> Option<Instant> {
        let r = self.0.lock().unwrap();
        r.log.iter().find(|(_, s)| s == what).map(|(t, _)| *t)
    }

    async fn wait_for(&self, what: &str) -> Instant {
        for _ in 0..200 {
            if let Some(t) = self.when(what) {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no '{what}' within 10 s; the agent did: {:?}", self.log());
    }
}

impl Vmms for Recorder {
    fn scan(&self) -> Vec<LocalVm> {
        self.0.lock().unwrap().running.values().cloned().collect()
    }
    fn start(
        &self,
        vm: &str,
        _spec: &[u8],
        a: &Assignment,
        lease: LocalLease,
    ) -> Result<(), String> {
        self.note(format!("start {vm} {}", a.epoch));
        self.renew(vm, lease)?;
        let takes = self.0.lock().unwrap().start_takes;
        std::thread::sleep(takes);
        let local = LocalVm {
            id: vm.into(),
            epoch: a.epoch,
            paused: false,
            fenced: false,
        };
        self.0.lock().unwrap().running.insert(vm.into(), local);
        Ok(())
    }
    fn stop(&self, vm: &str) -> Result<(), String> {
        self.note(format!("stop {vm}"));
        self.0.lock().unwrap().running.remove(vm);
        Ok(())
    }
    fn renew(&self, vm: &str, lease: LocalLease) -> Result<(), String> {
        assert!(
            lease.since <= std::time::Instant::now(),
            "a lease counts from a renewal sent already"
        );
        let deadline = lease.since + lease.ttl;
        self.0.lock().unwrap().leases.insert(vm.into(), deadline);
        Ok(())
    }
    fn pause(&self, vm: &str) -> Result<(), String> {
        self.note(format!("pause {vm}"));
        Ok(())
    }
    fn resume(&self, vm: &str) -> Result<(), String> {
        self.note(format!("resume {vm}"));
        Ok(())
    }
    fn checkpoint(
        &self,
        vm: &str,
        path: &std::path::Path,
        full: bool,
    ) -> Result<Checkpoint, String> {
        self.note(format!(
            "checkpoint {vm} {}",
            if full { "full" } else { "inc" }
        ));
        let takes = self.0.lock().unwrap().checkpoint_takes;
        std::fs::create_dir(path).map_err(|e| e.to_string())?;
        std::fs::write(path.join("manifest.json"), "{}").map_err(|e| e.to_string())?;
        std::thread::sleep(takes);
        self.note(format!("checkpointed {vm}"));
        Ok(Checkpoint {
            path: path.to_path_buf(),
            full,
            paused_ms: 1.5,
        })
    }
}

fn config(name: &str) -> AgentConfig {
    let state_dir = std::env::temp_dir().join(format!("ray-agent-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    AgentConfig {
        host: "h1".into(),
        state_dir,
        timing: fast(),
        api: None,
        checkpoints: None,
        cpus: None,
    }
}

async fn spawn(s: &EtcdStore, rec: &Recorder, cfg: &AgentConfig) -> (LeaseId, AbortOnDrop) {
    let agent = Agent::join(s.clone(), rec.clone(), cfg.clone())
        .await
        .unwrap();
    let lease = agent.lease();
    let task = tokio::spawn(async move {
        if let Err(e) = agent.run().await {
            panic!("the agent failed: {e}");
        }
    });
    (lease, AbortOnDrop(task))
}

/// An agent configuration that checkpoints every 300 ms (chains of 3) into a fresh shared
/// directory, and that directory.
fn checkpointing(name: &str) -> (AgentConfig, PathBuf) {
    let mut cfg = config(name);
    let dir = cfg.state_dir.with_extension("shared");
    let _ = std::fs::remove_dir_all(&dir);
    cfg.checkpoints = Some(CheckpointConfig {
        dir: dir.clone(),
        every: Duration::from_millis(300),
        chain: 3,
    });
    (cfg, dir)
}

/// Writes a small VM's spec (HA with restart priority 1 if `ha`) and places it on h1.
async fn place_vm(s: &EtcdStore, vm: &str, ha: bool) {
    let spec = crate::spec::VmSpec {
        vcpus: 1,
        memory_mib: 64,
        kernel: None,
        cmdline: None,
        pool: "standard".into(),
        group: None,
        restart_priority: ha.then_some(1),
    };
    s.commit(Txn::new().put(keys::vm_spec(vm), spec.to_json()))
        .await
        .unwrap();
    runtoken::place(s, vm, "h1", Origin::Boot).await.unwrap();
}

async fn other_host(s: &EtcdStore, host: &str) {
    let lease = s.grant(Duration::from_secs(60)).await.unwrap();
    s.commit(Txn::new().put_leased(keys::host_alive(host), "{}", lease))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_what_it_is_assigned_and_adopts_it_after_a_restart() {
    let etcd = Etcd::start("agent-adopt").await;
    let s = EtcdStore::connect(&etcd.endpoints()).await.unwrap();
    let (rec, cfg) = (Recorder::default(), config("adopt"));
    let (lease, agent) = spawn(&s, &rec, &cfg).await;
    let alive = s.get(&keys::host_alive("h1")).await.unwrap().unwrap();
    assert_eq!(alive.lease, Some(lease));

    runtoken::place(&s, "vm1", "h1", Origin::Boot)
        .await
        .unwrap();
    rec.wait_for("start vm1 1").await;
    // The status lists it (written on change).
    let mut listed = false;
    for _ in 0..100 {
        if let Some(kv) = s.get(&keys::host_status("h1")).await.unwrap() {
            let r: HostReport = serde_json::from_slice(&kv.value).unwrap();
            assert!(r.inventory.cpus >= 1 && r.inventory.memory_mib > 0, "{r:?}");
            if r.vms == ["vm1"] {
                listed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(listed, "the host status never listed vm1");

    // The agent dies (its VMs live on); a new one keeps the lease and adopts vm1.
    drop(agent);
    let restarted = std::time::Instant::now();
    let (again, _agent) = spawn(&s, &rec, &cfg).await;
    assert_eq!(again, lease, "a restarted agent keeps its lease");
    // It renews the adopted VMM's local lease at once, from its own renewal.
    let mut renewed = false;
    for _ in 0..100 {
        if rec.deadline("vm1") >= restarted + cfg.timing.local_lease() {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(renewed, "the adopted VMM's local lease was not renewed");
    // Releasing the VM stops it; it was never started twice.
    let (_, seen) = runtoken::read(&s, "vm1").await.unwrap().unwrap();
    runtoken::release(&s, "vm1", &seen).await.unwrap();
    rec.wait_for("stop vm1").await;
    assert_eq!(rec.log(), ["start vm1 1", "stop vm1"]);
    let _ = std::fs::remove_dir_all(&cfg.state_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_fences_and_only_what_still_is_ours_resumes() {
    let etcd = Etcd::start("agent-lapse").await;
    let s = EtcdStore::connect(&etcd.endpoints()).await.unwrap();
    let (rec, cfg) = (Recorder::default(), config("lapse"));
    let (lease, _agent) = spawn(&s, &rec, &cfg).await;
    other_host(&s, "h2").await;
    runtoken::place(&s, "moved", "h1", Origin::Boot)
        .await
        .unwrap();
    runtoken::place(&s, "kept", "h1", Origin::Boot)
        .await
        .unwrap();
    rec.wait_for("start kept 1").await;
    rec.wait_for("start moved 1").await;

    // The lease ends (as if h1 was cut off) and a controller fails "moved" over to h2.
    s.revoke(lease).await.unwrap();
    let (_, seen) = runtoken::read(&s, "moved").await.unwrap().unwrap();
    let cp = Origin::Checkpoint {
        path: "/shared/moved".into(),
    };
    runtoken::transfer(&s, "moved", &seen, "h2", cp, Transfer::FailOver)
        .await
        .unwrap();

    rec.wait_for("stop moved").await;
    rec.wait_for("resume kept").await;
    let log = rec.log();
    assert!(log.contains(&"pause kept".to_string()), "{log:?}");
    assert!(!log.contains(&"resume moved".to_string()), "{log:?}");
    // Registered again under a new lease.
    let alive = s.get(&keys::host_alive("h1")).await.unwrap().unwrap();
    assert_ne!(alive.lease, Some(lease));
    let _ = std::fs::remove_dir_all(&cfg.state_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_store_fences_before_the_lease_can_lapse() {
    let etcd = Etcd::start("agent-silent").await;
    let s = EtcdStore::connect(&etcd.endpoints()).await.unwrap();
    let (rec, cfg) = (Recorder::default(), config("silent"));
    let (_lease, _agent) = spawn(&s, &rec, &cfg).await;
    runtoken::place(&s, "vm1", "h1", Origin::Boot)
        .await
        .unwrap();
    rec.wait_for("start vm1 1").await;

    // etcd stops answering: the last good renewal was at most `renew_every` ago, so the
    // fence comes within `renew_every + local_lease` (+ the watchdog's period).
    let frozen = Instant::now();
    etcd.freeze();
    let paused = rec.wait_for("pause vm1").await;
    // The VMM's own lease was last renewed before the freeze: it fences itself by then
    // too, never later than the agent's deadline.
    let vmm_deadline = rec.deadline("vm1");
    assert!(
        vmm_deadline <= frozen.into_std() + t_local(),
        "renewed after the freeze"
    );
    assert!(
        vmm_deadline <= paused.into_std(),
        "the VMM outlives the agent's fence"
    );
    let t = fast();
    let bound = t.renew_every + t.local_lease() + t.watchdog_period * 4;
    assert!(
        paused - frozen <= bound,
        "fenced after {:?}",
        paused - frozen
    );
    // Earlier than etcd could let the lease lapse (its TTL from the last renewal).
    assert!(paused - frozen < t.lease_ttl, "{:?}", paused - frozen);

    // etcd answers again; nobody moved vm1, so it resumes.
    etcd.thaw();
    let thawed = std::time::Instant::now();
    rec.wait_for("resume vm1").await;
    assert!(
        rec.deadline("vm1") > thawed,
        "resumed without a fresh local lease"
    );
    assert!(
        !rec.log().contains(&"stop vm1".to_string()),
        "{:?}",
        rec.log()
    );
    let _ = std::fs::remove_dir_all(&cfg.state_dir);
}

/// The HA VM (not the other) is checkpointed every period into `<dir>/<vm>/e1/`, each
/// named in `observed` with its host and epoch; a chain of 3 starts again with a full one
/// and the old chain goes. The VM moves to another host while a checkpoint is being
/// written: the agent's write of `observed` is refused (stale epoch), the files it wrote
/// go, and `observed` still names the last good checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_its_ha_vms_and_a_late_write_after_the_vm_moved_has_no_effect() {
    use crate::controller::Observed;
    let etcd = Etcd::start("agent-ckpt").await;
    let s = EtcdStore::connect(&etcd.endpoints()).await.unwrap();
    let (cfg, dir) = checkpointing("ckpt");
    let rec = Recorder::default();
    let (_lease, _agent) = spawn(&s, &rec, &cfg).await;
    other_host(&s, "h2").await;
    place_vm(&s, "ha", true).await;
    place_vm(&s, "plain", false).await;
    let observed = || async {
        s.get(&keys::vm_observed("ha"))
            .await
            .unwrap()
            .map(|kv| serde_json::from_slice::<Observed>(&kv.value).unwrap())
    };
    // Two chains: full, inc, inc, then full again.
    for _ in 0..200 {
        let fulls = rec
            .log()
            .iter()
            .filter(|l| *l == "checkpoint ha full")
            .count();
        if fulls >= 2 && rec.log().last().is_some_and(|l| l == "checkpointed ha") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let kinds: Vec<String> = rec
        .log()
        .into_iter()
        .filter(|l| l.starts_with("checkpoint "))
        .collect();
    assert_eq!(
        kinds[..4],
        [
            "checkpoint ha full",
            "checkpoint ha inc",
            "checkpoint ha inc",
            "checkpoint ha full"
        ],
        "{kinds:?}"
    );
    let o = observed().await.unwrap();
    assert_eq!((o.host.as_deref(), o.epoch), (Some("h1"), Some(1)));
    assert_eq!(o.paused_ms, Some(1.5));
    let named = PathBuf::from(o.checkpoint.clone().unwrap());
    assert!(named.starts_with(dir.join("ha").join("e1")), "{named:?}");
    assert!(s.get(&keys::vm_observed("plain")).await.unwrap().is_none());

    // The next checkpoint takes a while; the VM moves to h2 meanwhile.
    rec.0.lock().unwrap().checkpoint_takes = Duration::from_millis(1500);
    let n = rec
        .log()
        .iter()
        .filter(|l| l.starts_with("checkpoint ha"))
        .count();
    let mut started = false;
    for _ in 0..100 {
        let now = rec
            .log()
            .iter()
            .filter(|l| l.starts_with("checkpoint ha"))
            .count();
        if now > n {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started, "no further checkpoint: {:?}", rec.log());
    let before = observed().await.unwrap();
    let (_, seen) = runtoken::read(&s, "ha").await.unwrap().unwrap();
    let mig = Origin::Migration { from: "h1".into() };
    runtoken::transfer(&s, "ha", &seen, "h2", mig, runtoken::Transfer::HandOver)
        .await
        .unwrap();
    rec.wait_for("stop ha").await;
    // The checkpoint task finishes the late checkpoint after the stop (the agent's loop
    // does not wait for it): its write is refused and its files go.
    let left = || -> Vec<PathBuf> {
        std::fs::read_dir(dir.join("ha").join("e1"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect()
    };
    let named = PathBuf::from(before.checkpoint.clone().unwrap());
    for _ in 0..200 {
        if left() == [named.clone()] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        observed().await.unwrap(),
        before,
        "the late write had no effect"
    );
    // Only the checkpoint `observed` names is left: the late one was deleted.
    assert_eq!(left(), [named]);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&cfg.state_dir);
}

/// A checkpoint that takes twice the VMMs' local lease does not hold the lease up: it runs
/// in the agent's checkpoint task while the agent's loop goes on renewing its own lease
/// and the VMMs' (a checkpoint in the loop itself let the VMMs fence themselves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_checkpoint_does_not_delay_the_lease_renewals() {
    let etcd = Etcd::start("agent-slow-ckpt").await;
    let s = EtcdStore::connect(&etcd.endpoints()).await.unwrap();
    let (cfg, dir) = checkpointing("slow-ckpt");
    let rec = Recorder::default();
    rec.0.lock().unwrap().checkpoint_takes = t_local() * 2;
    let (_lease, _agent) = spawn(&s, &rec, &cfg).await;
    place_vm(&s, "ha", true).await;
    rec.wait_for("checkpoint ha full").await;
    let during = rec.deadline("ha");
    rec.wait_for("checkpointed ha").await;
    let after = rec.deadline("ha");
    assert!(
        after > during + fast().renew_every,
        "no renewal of the VMM's lease while the checkpoint ran: {:?}",
        after - during
    );
    assert!(
        !rec.log().iter().any(|l| l.starts_with("pause")),
        "fenced during a slow checkpoint: {:?}",
        rec.log()
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&cfg.state_dir);
}

/// A VM start that takes longer than the whole lease (a VMM slow to come up on a loaded
/// host, a slow link to the store) does not hold the lease up: the lease keeper renews the
/// host's lease and the running VMMs' local leases on time while the agent's loop waits
/// for the start; nothing is fenced and the host keeps its lease (renewals that waited for
/// the loop let it lapse: a false fence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_vm_start_does_not_delay_the_lease_renewals() {
    let etcd = Etcd::start("agent-slow-start").await;
    let s = EtcdStore::connect(&etcd.endpoints()).await.unwrap();
    let cfg = config("slow-start");
    let rec = Recorder::default();
    let (lease, _agent) = spawn(&s, &rec, &cfg).await;
    runtoken::place(&s, "first", "h1", Origin::Boot)
        .await
        .unwrap();
    rec.wait_for("start first 1").await;
    rec.0.lock().unwrap().start_takes = fast().lease_ttl * 2;
    runtoken::place(&s, "slow", "h1", Origin::Boot)
        .await
        .unwrap();
    rec.wait_for("start slow 1").await;
    let during = rec.deadline("first");
    // The start returns a whole lease after the deadline it began with.
    tokio::time::sleep(fast().lease_ttl * 2 + Duration::from_millis(500)).await;
    let after = rec.deadline("first");
    assert!(
        after > during + fast().lease_ttl,
        "the running VMM's lease was not renewed while a start took {:?}: {:?}",
        fast().lease_ttl * 2,
        after - during
    );
    assert!(
        !rec.log().iter().any(|l| l.starts_with("pause")),
        "fenced during a slow start: {:?}",
        rec.log()
    );
    let alive = s.get(&keys::host_alive("h1")).await.unwrap().unwrap();
    assert_eq!(alive.lease, Some(lease), "the host kept its lease");
    let _ = std::fs::remove_dir_all(&cfg.state_dir);
}
