use super::*;
use crate::agent::Inventory;
use ray_scheduler::HostRole;

fn host(name: &str, memory_mib: u64) -> HostView {
    HostView {
        name: name.into(),
        alive: true,
        report: Some(HostReport {
            inventory: Inventory {
                cpus: 4,
                memory_mib,
                numa_nodes: 1,
            },
            vms: Vec::new(),
            fenced: false,
            rejoin: None,
        }),
        spec: HostSpec::default(),
    }
}

fn vm(name: &str, memory_mib: u64, group: Option<&str>, pool: &str) -> VmView {
    VmView {
        name: name.into(),
        spec: Some(Ok(VmSpec {
            vcpus: 1,
            memory_mib,
            kernel: None,
            cmdline: None,
            pool: pool.into(),
            group: group.map(String::from),
            restart_priority: None,
        })),
        token: None,
        checkpoint: None,
    }
}

fn placed(mut v: VmView, host: &str) -> VmView {
    v.token = Some(RunToken {
        host: host.into(),
        epoch: 1,
    });
    v
}

fn places(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Place { vm, host, .. } => Some((vm.clone(), host.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn anti_affinity_spreads_and_the_refusal_counts_each_reason() {
    let mut storage = host("s1", 8192);
    storage.spec.role = HostRole::Storage;
    let mut dead = host("d1", 8192);
    dead.alive = false;
    let mut cordoned = host("c1", 8192);
    cordoned.spec.cordon = true;
    let world = World {
        hosts: vec![
            host("a", 8192),
            host("b", 8192),
            host("small", 64),
            storage,
            dead,
            cordoned,
        ],
        vms: vec![
            vm("web-1", 512, Some("web"), "standard"),
            vm("web-2", 512, Some("web"), "standard"),
            vm("web-3", 512, Some("web"), "standard"),
        ],
        ..World::default()
    };
    let actions = decide(&world, PlanConfig::default());
    let p = places(&actions);
    assert_eq!(p.len(), 2, "{actions:?}");
    assert_ne!(p[0].1, p[1].1, "anti-affinity: two hosts");
    let Some(Action::Refuse { vm, reason, .. }) = actions.last() else {
        panic!("{actions:?}")
    };
    assert_eq!(vm, "web-3");
    assert_eq!(
        reason,
        "no host: 2 would break anti-affinity group web, 1 is Failed (no agent lease), \
         1 is Storage, not Worker (only Workers run VMs), 1 is cordoned, 1 lacks memory"
    );
}

#[test]
fn a_higher_tier_evicts_a_lower_one_and_deleted_vms_are_released() {
    let world = World {
        hosts: vec![host("a", 1024)],
        vms: vec![
            placed(vm("batch", 1024, None, "best-effort"), "a"),
            vm("db", 1024, None, "critical"),
            placed(
                VmView {
                    name: "gone".into(),
                    spec: None,
                    token: None,
                    checkpoint: None,
                },
                "a",
            ),
        ],
        ..World::default()
    };
    let actions = decide(&world, PlanConfig::default());
    assert!(actions.contains(&Action::Release {
        vm: "gone".into(),
        host: "a".into()
    }));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Evict { vm, by, .. } if vm == "batch" && by == "db")),
        "{actions:?}"
    );
    assert_eq!(places(&actions), [("db".into(), "a".into())]);
}

#[test]
fn an_invalid_spec_is_refused_with_its_reason_and_a_placed_vm_is_left_alone() {
    let world = World {
        hosts: vec![host("a", 4096)],
        vms: vec![
            VmView {
                name: "bad".into(),
                spec: Some(Err("vcpus 0 is out of range: use 1 to 254".into())),
                token: None,
                checkpoint: None,
            },
            placed(vm("ok", 512, None, "standard"), "a"),
        ],
        ..World::default()
    };
    let actions = decide(&world, PlanConfig::default());
    assert_eq!(
        actions,
        [Action::Refuse {
            vm: "bad".into(),
            reason: "not placed: vcpus 0 is out of range: use 1 to 254".into(),
            data: serde_json::Value::Null,
        }]
    );
}

fn ha(mut v: VmView, priority: u8) -> VmView {
    if let Some(Ok(spec)) = &mut v.spec {
        spec.restart_priority = Some(priority);
    }
    v
}

#[test]
fn ha_vms_of_a_lapsed_host_restart_elsewhere_by_priority_after_the_grace_only() {
    let mut dead = host("dead", 4096);
    dead.alive = false;
    let mut world = World {
        hosts: vec![host("a", 1024), dead],
        vms: vec![
            placed(ha(vm("low", 1024, None, "standard"), 1), "dead"),
            placed(ha(vm("high", 1024, None, "standard"), 9), "dead"),
            placed(vm("plain", 512, None, "standard"), "dead"),
        ],
        ..World::default()
    };
    world.vms[1].checkpoint = Some("/shared/high".into());
    // Lease lapsed, grace not over yet: nothing moves.
    assert!(decide(&world, PlanConfig::default()).is_empty());
    // After the grace: the higher priority takes the one host's room; the lower one is
    // refused saying why; the VM without HA stays with its host.
    world.lapsed.insert("dead".into());
    let actions = decide(&world, PlanConfig::default());
    let moved: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::FailOver {
                vm,
                from,
                to,
                checkpoint,
                ..
            } => Some((vm.as_str(), from.as_str(), to.as_str(), checkpoint.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        moved,
        [("high", "dead", "a", Some("/shared/high".to_string()))]
    );
    let refused: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Refuse { vm, reason, .. } => Some((vm.as_str(), reason.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 1, "{actions:?}");
    assert_eq!(refused[0].0, "low");
    assert!(
        refused[0]
            .1
            .starts_with("not restarted after host dead failed: no host: ")
            && refused[0].1.contains("1 lacks memory"),
        "{}",
        refused[0].1
    );
    assert!(places(&actions).is_empty(), "{actions:?}");
    // A host whose agent is back is not failed over, lapsed or not.
    world.hosts[1].alive = true;
    assert!(decide(&world, PlanConfig::default()).is_empty());
}

#[test]
fn a_drained_host_goes_through_rejoining_to_ready() {
    use crate::controller::rejoin::waiting_for;
    // The transition table: drained (Offline: maintenance), back (Recover), checked.
    let mut state = HostStatus::Draining;
    for (event, want) in [
        (HostEvent::DrainComplete, HostStatus::Offline),
        (HostEvent::Recover, HostStatus::Rejoining),
        (HostEvent::RejoinOk, HostStatus::Ready),
    ] {
        state = transition(state, event).unwrap();
        assert_eq!(state, want, "after {event}");
    }
    // No shortcut from maintenance to Ready, and Rejoining takes no VMs.
    assert!(transition(HostStatus::Offline, HostEvent::RejoinOk).is_err());
    assert!(transition(HostStatus::Offline, HostEvent::InitOk).is_err());
    assert!(!HostStatus::Rejoining.schedulable());

    // A host whose spec asks to rejoin is Rejoining while alive, Failed without a lease.
    let mut h = host("h1", 4096);
    h.spec.rejoin = Some(5);
    assert_eq!(h.status(), HostStatus::Rejoining);
    assert_eq!(h.state(0), "Rejoining");
    let mut world = World {
        hosts: vec![h.clone()],
        vms: vec![placed(vm("mine", 256, None, "standard"), "h1")],
        ..World::default()
    };
    let why = waiting_for(&world.hosts[0], &world, 5).unwrap();
    assert!(why.contains("not re-reported"), "{why}");
    let r = world.hosts[0].report.as_mut().unwrap();
    r.rejoin = Some(5);
    r.vms = vec!["mine".into(), "old".into()];
    let why = waiting_for(&world.hosts[0], &world, 5).unwrap();
    assert!(why.ends_with("do not name it): old"), "{why}");
    world.hosts[0].report.as_mut().unwrap().vms = vec!["mine".into()];
    assert_eq!(waiting_for(&world.hosts[0], &world, 5), None);
    // An answer to an older request does not count.
    assert!(waiting_for(&world.hosts[0], &world, 6).is_some());
    world.hosts[0].alive = false;
    assert_eq!(world.hosts[0].status(), HostStatus::Failed);
    assert!(waiting_for(&world.hosts[0], &world, 5)
        .unwrap()
        .contains("no lease"));
}
