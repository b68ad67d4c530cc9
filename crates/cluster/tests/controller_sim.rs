//! A deterministic simulation of 1,000 hosts and 30,000 VMs through the controller's own
//! code (`read_world` -> `decide` -> `Applier`, the run-token transactions, the
//! decision log, operation recovery) on the embedded store in memory, with injected
//! failures: hosts whose lease ends and that come back, controllers that die between
//! recording an operation and carrying it out (a successor recovers), cordons, deletes.
//! After every round: every VM is on at most one host and its assignment matches its run
//! token, no VM was started twice (epoch 1 everywhere: nothing moves without HA), no host
//! holds more than its capacity or two members of one anti-affinity group, none is lost
//! (each desired VM is placed, held by a failed host, or refused with a logged reason),
//! and no new VM went to a cordoned or failed host.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ray_cluster::agent::{Alive, HostReport, Inventory};
use ray_cluster::controller::{decide, read_world, Action, Applier, Operation, PlanConfig};
use ray_cluster::decisions::{self, Kind};
use ray_cluster::keys;
use ray_cluster::runtoken::{Assignment, RunToken};
use ray_cluster::spec::{HostSpec, VmSpec};
use ray_cluster::store::{LeaseId, RedbStore, Store, Txn};
use ray_scheduler::Tier;

const HOSTS: usize = 1000;
const VMS: usize = 30_000;
const WAVES: usize = 10;
const CPUS: u32 = 32;
const MEMORY_MIB: u64 = 256 * 1024;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn host(i: usize) -> String {
    format!("h{i:04}")
}

async fn register<S: Store>(s: &S, h: &str) -> LeaseId {
    let lease = s.grant(Duration::from_secs(3600)).await.unwrap();
    let alive = serde_json::to_vec(&Alive { pid: 1, api: None }).unwrap();
    let report = serde_json::to_vec(&HostReport {
        inventory: Inventory {
            cpus: CPUS,
            memory_mib: MEMORY_MIB,
            numa_nodes: 1,
        },
        vms: Vec::new(),
        fenced: false,
        rejoin: None,
    })
    .unwrap();
    s.commit(
        Txn::new()
            .put_leased(keys::host_alive(h), alive, lease)
            .put(keys::host_status(h), report),
    )
    .await
    .unwrap();
    lease
}

/// What the store holds, checked against every invariant. Returns (placed, held by
/// failed hosts, pending).
async fn check<S: Store>(
    s: &S,
    cfg: PlanConfig,
    barred: &BTreeSet<String>,
    since_seq: u64,
) -> (usize, usize, usize) {
    let world = read_world(s).await.unwrap();
    let hosts: BTreeMap<&str, _> = world.hosts.iter().map(|h| (h.name.as_str(), h)).collect();
    // Assignments, from the host side.
    let listing = s.list(keys::HOSTS).await.unwrap();
    let mut assigned: BTreeMap<String, Vec<(String, Assignment)>> = BTreeMap::new();
    for kv in &listing.kvs {
        let (h, rest) = keys::split_host_key(&kv.key).unwrap();
        if let Some(vm) = rest.strip_prefix("vms/") {
            let a: Assignment = serde_json::from_slice(&kv.value).unwrap();
            assigned
                .entry(vm.to_string())
                .or_default()
                .push((h.to_string(), a));
        }
    }
    let mut used: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut groups: BTreeSet<(&str, &str)> = BTreeSet::new();
    let (mut placed, mut held, mut pending) = (0, 0, 0);
    for v in &world.vms {
        let on = assigned.remove(&v.name).unwrap_or_default();
        match &v.token {
            Some(RunToken { host, epoch }) => {
                assert_eq!(*epoch, 1, "VM {} moved or started twice", v.name);
                assert_eq!(
                    on.iter()
                        .map(|(h, a)| (h.as_str(), a.epoch))
                        .collect::<Vec<_>>(),
                    [(host.as_str(), 1)],
                    "VM {}: its assignments do not match its run token",
                    v.name
                );
                let spec = v.spec.as_ref().unwrap().as_ref().unwrap();
                if hosts[host.as_str()].alive {
                    placed += 1;
                    let u = used.entry(host.as_str()).or_default();
                    u.0 += u64::from(spec.vcpus);
                    u.1 += spec.memory_mib;
                    if let Some(g) = &spec.group {
                        assert!(
                            groups.insert((g.as_str(), host.as_str())),
                            "two members of group {g} on host {host}"
                        );
                    }
                } else {
                    held += 1;
                }
            }
            None => {
                assert!(on.is_empty(), "VM {} is assigned without a token", v.name);
                assert!(v.spec.is_some(), "a deleted VM {} is still listed", v.name);
                pending += 1;
            }
        }
    }
    assert!(
        assigned.is_empty(),
        "assignments of unknown VMs: {assigned:?}"
    );
    let cap = (f64::from(CPUS) * cfg.cpu_overcommit) as u64;
    for (h, (cpu, mem)) in used {
        assert!(
            cpu <= cap && mem <= MEMORY_MIB,
            "host {h} over capacity: {cpu} vCPUs, {mem} MiB"
        );
    }
    // Nothing was placed on a host barred (cordoned or failed) during the round.
    for e in decisions::read(s, None).await.unwrap() {
        if e.seq > since_seq && e.kind == Kind::Placed {
            let h = e.host.unwrap();
            assert!(
                !barred.contains(&h),
                "VM {:?} placed on barred host {h}",
                e.vm
            );
        }
    }
    assert!(
        s.list(keys::OPS).await.unwrap().kvs.is_empty(),
        "operations left behind"
    );
    (placed, held, pending)
}

#[tokio::test(flavor = "current_thread")]
async fn a_thousand_hosts_thirty_thousand_vms_with_failures() {
    let s = RedbStore::in_memory().unwrap();
    let cfg = PlanConfig::default();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut leases: Vec<Option<LeaseId>> = Vec::new();
    for i in 0..HOSTS {
        leases.push(Some(register(&s, &host(i)).await));
    }
    let mut applier = Applier::new();
    let mut created = 0;
    let mut deleted = 0;
    let mut recovered = 0;
    for wave in 0..WAVES {
        // New VMs: sizes 1-4 vCPUs and 1-8 GiB, every fifth in a group of 20, all tiers.
        let mut txn = Txn::new();
        for _ in 0..VMS / WAVES {
            let id = created;
            created += 1;
            let spec = VmSpec {
                vcpus: 1 + rng.below(4) as u8,
                memory_mib: 1024 * (1 + rng.below(8)),
                kernel: None,
                cmdline: None,
                pool: ["best-effort", "standard", "high", "critical"][rng.below(4) as usize].into(),
                group: (id % 5 == 0).then(|| format!("g{}", id / 100)),
                restart_priority: None,
            };
            txn = txn.put(keys::vm_spec(&format!("vm{id:05}")), spec.to_json());
            if txn.ops.len() == 500 {
                s.commit(std::mem::take(&mut txn)).await.unwrap();
            }
        }
        s.commit(txn).await.unwrap();
        // Failures: 2% of hosts lose their lease, earlier failures come back, a few are
        // cordoned, 1% of VMs are deleted.
        let mut barred = BTreeSet::new();
        for (i, lease) in leases.iter_mut().enumerate() {
            match lease {
                Some(l) if rng.below(50) == 0 => {
                    s.revoke(*l).await.unwrap();
                    *lease = None;
                    barred.insert(host(i));
                }
                None if rng.below(2) == 0 => *lease = Some(register(&s, &host(i)).await),
                None => {
                    barred.insert(host(i));
                }
                _ => {}
            }
            let cordon = rng.below(100) == 0;
            s.commit(
                Txn::new().put(
                    keys::host_spec(&host(i)),
                    HostSpec {
                        cordon,
                        ..HostSpec::default()
                    }
                    .to_json(),
                ),
            )
            .await
            .unwrap();
            if cordon {
                barred.insert(host(i));
            }
        }
        for _ in 0..VMS / WAVES / 100 {
            let vm = format!("vm{:05}", rng.below(created as u64));
            if s.get(&keys::vm_spec(&vm)).await.unwrap().is_some() {
                s.commit(Txn::new().delete(keys::vm_spec(&vm)))
                    .await
                    .unwrap();
                deleted += 1;
            }
        }
        let since = decisions::read(&s, None)
            .await
            .unwrap()
            .last()
            .map_or(0, |e| e.seq);
        // The controller: a pass that dies part-way (its next operation recorded, not
        // carried out), a successor that recovers, then passes until nothing is left.
        let actions = decide(&read_world(&s).await.unwrap(), cfg);
        let cut = rng.below(actions.len() as u64 + 1) as usize;
        let rest: Vec<Action> = actions[cut..].to_vec();
        applier.apply(&s, actions[..cut].to_vec()).await.unwrap();
        if let Some(Action::Place { vm, host, .. }) = rest.first() {
            let op = Operation::Place {
                vm: vm.clone(),
                host: host.clone(),
            };
            let key = keys::op(&format!("place-{vm}"));
            s.commit(Txn::new().put(key, serde_json::to_vec(&op).unwrap()))
                .await
                .unwrap();
        }
        applier = Applier::new();
        recovered += applier.recover(&s).await.unwrap();
        for _ in 0..5 {
            let actions = decide(&read_world(&s).await.unwrap(), cfg);
            let pass = applier.apply(&s, actions).await.unwrap();
            if pass.placed + pass.evicted + pass.released == 0 {
                break;
            }
        }
        let (placed, held, pending) = check(&s, cfg, &barred, since).await;
        assert_eq!(placed + held + pending, created - deleted, "a VM was lost");
        eprintln!("wave {wave}: {placed} placed, {held} on failed hosts, {pending} pending");
    }
    assert!(recovered > 0, "no recovery was exercised");
    let (placed, _, pending) = check(&s, cfg, &BTreeSet::new(), u64::MAX).await;
    assert!(placed > VMS * 9 / 10, "{placed} placed");
    assert_eq!(pending, 0, "capacity is ample so far");

    // Then more than the cluster holds: 1,200 critical VMs of 128 GiB. They take free
    // room first, then evict lower tiers; the evicted stay desired and are refused with
    // a reason. Only lower tiers are ever evicted.
    let since = decisions::read(&s, None)
        .await
        .unwrap()
        .last()
        .map_or(0, |e| e.seq);
    let big = VmSpec {
        vcpus: 1,
        memory_mib: 128 * 1024,
        kernel: None,
        cmdline: None,
        pool: "critical".into(),
        group: None,
        restart_priority: None,
    };
    for chunk in (0..1200).collect::<Vec<_>>().chunks(400) {
        let txn = chunk.iter().fold(Txn::new(), |t, i| {
            t.put(keys::vm_spec(&format!("big{i:04}")), big.to_json())
        });
        s.commit(txn).await.unwrap();
    }
    created += 1200;
    for _ in 0..5 {
        let actions = decide(&read_world(&s).await.unwrap(), cfg);
        let pass = applier.apply(&s, actions).await.unwrap();
        if pass.placed + pass.evicted + pass.released == 0 {
            break;
        }
    }
    let (placed, held, pending) = check(&s, cfg, &BTreeSet::new(), u64::MAX).await;
    assert_eq!(placed + held + pending, created - deleted, "a VM was lost");
    let log = decisions::read(&s, None).await.unwrap();
    let preempted: Vec<_> = log
        .iter()
        .filter(|e| e.seq > since && e.kind == Kind::Preempted)
        .collect();
    assert!(!preempted.is_empty(), "nothing was preempted");
    for e in &preempted {
        let tier = |k: &str| serde_json::from_value::<Tier>(e.data[k].clone()).unwrap();
        assert!(tier("victim_tier") < tier("by_tier"), "{e:?}");
    }
    assert!(pending > 0, "the cluster was not full");
    eprintln!(
        "overload: {placed} placed, {held} on failed hosts, {pending} pending, {} preemptions",
        preempted.len()
    );
    let refused: BTreeSet<&str> = log
        .iter()
        .filter(|e| e.kind == Kind::Refused)
        .filter_map(|e| e.vm.as_deref())
        .collect();
    let world = read_world(&s).await.unwrap();
    for v in world.vms.iter().filter(|v| v.token.is_none()) {
        assert!(
            refused.contains(v.name.as_str()),
            "VM {} pending without a reason",
            v.name
        );
    }
    eprintln!("end: {placed} placed, {held} on failed hosts, {pending} pending");
}

/// Plays every agent's part of the migrations in the store for one round: receivers wait
/// when asked for, and the VM arrives when its source is told to send, except that one
/// receiver in `fail_one_in` reports a failure instead.
async fn agents_round<S: Store>(s: &S, rng: &mut Rng, fail_one_in: u64) {
    use ray_cluster::migration::{Outgoing, Phase, Progress};
    for kv in s.list(keys::HOSTS).await.unwrap().kvs {
        let (host, rest) = keys::split_host_key(&kv.key).unwrap();
        let write = |vm: &str, p: Progress| {
            Txn::new().put(keys::receiver(vm), serde_json::to_vec(&p).unwrap())
        };
        if let Some(vm) = rest.strip_prefix("incoming/") {
            if s.get(&keys::receiver(vm)).await.unwrap().is_none() {
                let p = Progress {
                    addr: Some(format!("{host}:7000")),
                    ..Progress::new(host, Phase::Waiting)
                };
                s.commit(write(vm, p)).await.unwrap();
            }
        }
        if let Some(vm) = rest.strip_prefix("outgoing/") {
            let out: Outgoing = serde_json::from_slice(&kv.value).unwrap();
            let p = if rng.below(fail_one_in) == 0 {
                Progress {
                    error: Some("the link dropped".into()),
                    ..Progress::new(&out.to, Phase::Failed)
                }
            } else {
                Progress::new(&out.to, Phase::Done)
            };
            s.commit(write(vm, p)).await.unwrap();
        }
    }
}

/// Drains of 20 of 1,000 hosts through the controller's own passes (placement,
/// migration steps, drain steps) with migrations that fail now and then and controllers
/// that die between passes (a successor carries on from the store alone). Afterwards:
/// every drained host is empty, every VM is on exactly one host with its assignment
/// matching its token, no VM is lost, and each VM's epoch is 1 + its `migrated` entries:
/// the token moved once per migration, never twice.
#[tokio::test(flavor = "current_thread")]
async fn drains_of_twenty_hosts_move_every_vm_once_through_failures() {
    const N: usize = 6000;
    let s = RedbStore::in_memory().unwrap();
    let cfg = PlanConfig::default();
    let mut rng = Rng(0xd7a1_0000_5eed_0042);
    for i in 0..HOSTS {
        register(&s, &host(i)).await;
    }
    let mut txn = Txn::new();
    for id in 0..N {
        let spec = VmSpec {
            vcpus: 1 + rng.below(4) as u8,
            memory_mib: 1024 * (1 + rng.below(8)),
            kernel: None,
            cmdline: None,
            pool: "standard".into(),
            group: (id % 5 == 0).then(|| format!("g{}", id / 100)),
            restart_priority: None,
        };
        txn = txn.put(keys::vm_spec(&format!("vm{id:05}")), spec.to_json());
        if txn.ops.len() == 500 {
            s.commit(std::mem::take(&mut txn)).await.unwrap();
        }
    }
    s.commit(txn).await.unwrap();
    let mut applier = Applier::new().with_drain_retry(Duration::ZERO);
    loop {
        let pass = applier
            .apply(&s, decide(&read_world(&s).await.unwrap(), cfg))
            .await
            .unwrap();
        if pass.placed == 0 {
            break;
        }
    }
    let drained: Vec<String> = (0..20).map(|i| host(i * 50)).collect();
    let world = read_world(&s).await.unwrap();
    let on_drained = world
        .vms
        .iter()
        .filter(|v| v.token.as_ref().is_some_and(|t| drained.contains(&t.host)))
        .count();
    assert!(on_drained > 60, "only {on_drained} VMs to drain");
    for h in &drained {
        let spec = HostSpec {
            drain: true,
            ..HostSpec::default()
        };
        s.commit(Txn::new().put(keys::host_spec(h), spec.to_json()))
            .await
            .unwrap();
    }
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 2000, "the drains did not finish");
        // Every 7th round the controller dies: its successor knows only the store.
        if rounds % 7 == 0 {
            applier = Applier::new().with_drain_retry(Duration::ZERO);
            applier.recover(&s).await.unwrap();
        }
        let world = read_world(&s).await.unwrap();
        applier.apply(&s, decide(&world, cfg)).await.unwrap();
        let moved = applier.migrations(&s, &world, cfg).await.unwrap();
        agents_round(&s, &mut rng, 20).await;
        let left = world
            .vms
            .iter()
            .filter(|v| v.token.as_ref().is_some_and(|t| drained.contains(&t.host)))
            .count();
        let busy = s.list(keys::OPS).await.unwrap().kvs.len();
        if left == 0 && busy == 0 && moved == 0 {
            break;
        }
    }
    // The invariants.
    let world = read_world(&s).await.unwrap();
    let listing = s.list(keys::HOSTS).await.unwrap();
    let mut assigned: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for kv in &listing.kvs {
        let (h, rest) = keys::split_host_key(&kv.key).unwrap();
        if let Some(vm) = rest.strip_prefix("vms/") {
            let a: Assignment = serde_json::from_slice(&kv.value).unwrap();
            assigned
                .entry(vm.into())
                .or_default()
                .push((h.into(), a.epoch));
        }
        assert!(
            !rest.starts_with("incoming/") && !rest.starts_with("outgoing/"),
            "left over: {}",
            kv.key
        );
    }
    let log = decisions::read(&s, None).await.unwrap();
    let mut migrated: BTreeMap<&str, u64> = BTreeMap::new();
    let mut failed = 0;
    for e in &log {
        match e.kind {
            Kind::Migrated => *migrated.entry(e.vm.as_deref().unwrap()).or_default() += 1,
            Kind::MigrationFailed => failed += 1,
            _ => {}
        }
    }
    assert_eq!(world.vms.len(), N);
    for v in &world.vms {
        let t = v.token.as_ref().expect("every VM stays placed");
        assert!(
            !drained.contains(&t.host),
            "VM {} left on {}",
            v.name,
            t.host
        );
        assert_eq!(
            assigned.remove(&v.name).unwrap_or_default(),
            [(t.host.clone(), t.epoch)],
            "VM {}: assignments do not match the token",
            v.name
        );
        let moves = migrated.get(v.name.as_str()).copied().unwrap_or(0);
        assert_eq!(t.epoch, 1 + moves, "VM {}: epoch vs migrations", v.name);
    }
    assert!(assigned.is_empty());
    assert_eq!(
        migrated.values().sum::<u64>() as usize,
        on_drained,
        "each VM on a drained host moved once"
    );
    assert!(failed > 0, "no migration failure was exercised");
    let drains_done = log.iter().filter(|e| e.kind == Kind::Drained).count();
    assert!(drains_done >= drained.len(), "{drains_done} drains logged");
    assert!(s.list(keys::OPS).await.unwrap().kvs.is_empty());
    for kv in s.list(keys::VMS).await.unwrap().kvs {
        assert!(
            !kv.key.ends_with("/migrate")
                && !kv.key.ends_with("/receiver")
                && !kv.key.ends_with("/sender"),
            "left over: {}",
            kv.key
        );
    }
}

/// HA restarts through host failures, on 1,000 hosts with 10,000 VMs (half of them HA,
/// restart priorities 0-9), through the controller's own passes (`observe` -> `decide`
/// -> `Applier`) with a zero grace (the grace's timing is proven in `timing` and tested
/// end to end). Each round 2% of hosts lose their lease and earlier failures come back;
/// a controller dies part-way through its fail-overs and a successor recovers. After
/// every round: each VM's assignments are exactly its run token's (a host that comes
/// back finds nothing of the VMs that moved, so it can run none of them), its epoch is 1
/// plus its logged restarts (the token moved once per restart, never twice), no VM is
/// lost, no VM without HA moved, and every HA VM of a failed host runs elsewhere or is
/// refused with a logged reason.
#[tokio::test(flavor = "current_thread")]
async fn ha_restarts_through_host_failures_never_move_a_vm_twice() {
    const N: usize = 10_000;
    const ROUNDS: usize = 8;
    let s = RedbStore::in_memory().unwrap();
    let cfg = PlanConfig::default();
    let mut rng = Rng(0x4a05_5eed_0000_0017);
    let mut leases: Vec<Option<LeaseId>> = Vec::new();
    for i in 0..HOSTS {
        leases.push(Some(register(&s, &host(i)).await));
    }
    let mut txn = Txn::new();
    for id in 0..N {
        let spec = VmSpec {
            vcpus: 1 + rng.below(4) as u8,
            memory_mib: 1024 * (1 + rng.below(8)),
            kernel: None,
            cmdline: None,
            pool: ["standard", "high"][rng.below(2) as usize].into(),
            group: (id % 5 == 0).then(|| format!("g{}", id / 100)),
            restart_priority: (id % 2 == 0).then(|| rng.below(10) as u8),
        };
        txn = txn.put(keys::vm_spec(&format!("vm{id:05}")), spec.to_json());
        if txn.ops.len() == 500 {
            s.commit(std::mem::take(&mut txn)).await.unwrap();
        }
    }
    s.commit(txn).await.unwrap();
    let mut applier = Applier::new().with_grace(Duration::ZERO);
    async fn passes<S: Store>(s: &S, applier: &mut Applier, cfg: PlanConfig) -> usize {
        let mut restarted = 0;
        for _ in 0..6 {
            let mut world = read_world(s).await.unwrap();
            applier.observe(s, &mut world).await.unwrap();
            let pass = applier.apply(s, decide(&world, cfg)).await.unwrap();
            restarted += pass.restarted;
            if pass.placed + pass.evicted + pass.released + pass.restarted == 0 {
                break;
            }
        }
        restarted
    }
    passes(&s, &mut applier, cfg).await;
    let (mut restarts, mut recovered) = (0, 0);
    for round in 0..ROUNDS {
        for (i, lease) in leases.iter_mut().enumerate() {
            match lease {
                Some(l) if rng.below(50) == 0 => {
                    s.revoke(*l).await.unwrap();
                    *lease = None;
                }
                None if rng.below(2) == 0 => *lease = Some(register(&s, &host(i)).await),
                _ => {}
            }
        }
        // The controller dies after carrying out part of its decisions and recording the
        // next fail-over; a successor (knowing only the store) recovers and goes on.
        let mut world = read_world(&s).await.unwrap();
        applier.observe(&s, &mut world).await.unwrap();
        let actions = decide(&world, cfg);
        let cut = rng.below(actions.len() as u64 + 1) as usize;
        restarts += applier
            .apply(&s, actions[..cut].to_vec())
            .await
            .unwrap()
            .restarted;
        if let Some(Action::FailOver { vm, from, to, .. }) = actions[cut..]
            .iter()
            .find(|a| matches!(a, Action::FailOver { .. }))
        {
            let op = Operation::FailOver {
                vm: vm.clone(),
                from: from.clone(),
                to: to.clone(),
            };
            let key = keys::op(&format!("failover-{vm}"));
            s.commit(Txn::new().put(key, serde_json::to_vec(&op).unwrap()))
                .await
                .unwrap();
        }
        applier = Applier::new().with_grace(Duration::ZERO);
        recovered += applier.recover(&s).await.unwrap();
        restarts += passes(&s, &mut applier, cfg).await;

        // The invariants.
        let world = read_world(&s).await.unwrap();
        let alive: BTreeSet<&str> = world
            .hosts
            .iter()
            .filter(|h| h.alive)
            .map(|h| h.name.as_str())
            .collect();
        let mut assigned: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
        for kv in s.list(keys::HOSTS).await.unwrap().kvs {
            let (h, rest) = keys::split_host_key(&kv.key).unwrap();
            if let Some(vm) = rest.strip_prefix("vms/") {
                let a: Assignment = serde_json::from_slice(&kv.value).unwrap();
                assigned
                    .entry(vm.into())
                    .or_default()
                    .push((h.into(), a.epoch));
            }
        }
        let log = decisions::read(&s, None).await.unwrap();
        let mut restarted: BTreeMap<&str, u64> = BTreeMap::new();
        for e in log.iter().filter(|e| e.kind == Kind::Restarted) {
            *restarted.entry(e.vm.as_deref().unwrap()).or_default() += 1;
        }
        let refused: BTreeSet<&str> = log
            .iter()
            .filter(|e| e.kind == Kind::Refused)
            .filter_map(|e| e.vm.as_deref())
            .collect();
        let (mut running, mut held, mut waiting) = (0, 0, 0);
        assert_eq!(world.vms.len(), N, "a VM was lost");
        for v in &world.vms {
            let ha = v.spec.as_ref().unwrap().as_ref().unwrap().restart_priority;
            let Some(t) = &v.token else {
                assert!(
                    refused.contains(v.name.as_str()),
                    "VM {} pending without a reason",
                    v.name
                );
                continue;
            };
            assert_eq!(
                assigned.remove(&v.name).unwrap_or_default(),
                [(t.host.clone(), t.epoch)],
                "VM {}: assignments do not match its token",
                v.name
            );
            let moves = restarted.get(v.name.as_str()).copied().unwrap_or(0);
            assert_eq!(
                t.epoch,
                1 + moves,
                "VM {}: epoch vs logged restarts",
                v.name
            );
            if ha.is_none() {
                assert_eq!(moves, 0, "VM {} without HA moved", v.name);
            }
            match (alive.contains(t.host.as_str()), ha) {
                (true, _) => running += 1,
                (false, None) => held += 1,
                (false, Some(_)) => {
                    // Not restarted: only when no host could take it, said in the log.
                    assert!(
                        refused.contains(v.name.as_str()),
                        "HA VM {} left on failed host {} without a reason",
                        v.name,
                        t.host
                    );
                    waiting += 1;
                }
            }
        }
        assert!(assigned.is_empty(), "assignments of unknown VMs");
        assert!(
            s.list(keys::OPS).await.unwrap().kvs.is_empty(),
            "operations left behind"
        );
        eprintln!(
            "round {round}: {} hosts down, {running} VMs running, {held} held by failed hosts (no HA), {waiting} HA waiting, {restarts} restarts so far ({} logged)",
            HOSTS - alive.len(),
            restarted.values().sum::<u64>()
        );
    }
    assert!(restarts > 100, "only {restarts} restarts");
    assert!(recovered > 0, "no recovery was exercised");
}
