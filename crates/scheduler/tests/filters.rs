//! Table-driven tests: one table per filter, each row a host/VM setup and
//! the expected first rejection kind (or none). Every row also checks that
//! the allocation-free fast path agrees with the explaining path.

mod common;
use common::*;
use ray_scheduler::filter::{first_rejection, passes, quota};
use ray_scheduler::*;

struct Row {
    name: &'static str,
    host: Host,
    /// VMs already on host 0 before the check.
    existing: Vec<VmSpec>,
    vm: VmSpec,
    want: Option<FilterKind>,
}

fn run(rows: Vec<Row>) {
    for r in rows {
        let mut snap = snapshot(vec![r.host]);
        snap.placements = r
            .existing
            .into_iter()
            .map(|vm| PlacedVm {
                vm,
                host: 0,
                numa: None,
            })
            .collect();
        let st = ClusterState::from_snapshot(&snap).unwrap_or_else(|e| panic!("{}: {e}", r.name));
        let got = first_rejection(&st, 0, &r.vm);
        assert_eq!(
            got.as_ref().map(Reject::kind),
            r.want,
            "{}: got {got:?}",
            r.name
        );
        assert_eq!(
            passes(&st, 0, &r.vm),
            got.is_none(),
            "{}: fast path disagrees",
            r.name
        );
        if let Some(rej) = got {
            assert!(!rej.to_string().is_empty());
        }
    }
}

fn with<F: FnOnce(&mut Host)>(f: F) -> Host {
    let mut h = worker("h", 8, 8192);
    f(&mut h);
    h
}

fn vmw<F: FnOnce(&mut VmSpec)>(f: F) -> VmSpec {
    let mut v = vm(100, 2, 1024);
    f(&mut v);
    v
}

#[test]
fn role_filter() {
    let mut rows = vec![];
    for role in [
        HostRole::Controller,
        HostRole::Storage,
        HostRole::Monitor,
        HostRole::Gateway,
    ] {
        rows.push(Row {
            name: "non-worker",
            host: with(|h| h.role = role),
            existing: vec![],
            vm: vm(1, 1, 1),
            want: Some(FilterKind::Role),
        });
    }
    rows.push(Row {
        name: "worker",
        host: with(|_| {}),
        existing: vec![],
        vm: vm(1, 1, 1),
        want: None,
    });
    run(rows);
}

#[test]
fn status_filter() {
    let rows = HostStatus::ALL
        .into_iter()
        .map(|s| Row {
            name: "status",
            host: with(|h| h.status = s),
            existing: vec![],
            vm: vm(1, 1, 1),
            want: (s != HostStatus::Ready).then_some(FilterKind::Status),
        })
        .collect();
    run(rows);
}

#[test]
fn selector_filter() {
    let labelled = || {
        with(|h| {
            h.labels.insert("zone".into(), "a".into());
        })
    };
    run(vec![
        Row {
            name: "match",
            host: labelled(),
            existing: vec![],
            vm: vmw(|v| v.selector = vec![("zone".into(), "a".into())]),
            want: None,
        },
        Row {
            name: "wrong value",
            host: labelled(),
            existing: vec![],
            vm: vmw(|v| v.selector = vec![("zone".into(), "b".into())]),
            want: Some(FilterKind::Selector),
        },
        Row {
            name: "missing key",
            host: labelled(),
            existing: vec![],
            vm: vmw(|v| v.selector = vec![("rack".into(), "1".into())]),
            want: Some(FilterKind::Selector),
        },
        Row {
            name: "no selector",
            host: labelled(),
            existing: vec![],
            vm: vmw(|_| {}),
            want: None,
        },
    ]);
}

#[test]
fn anti_affinity_and_affinity_filters() {
    let member = |id, g| {
        vmw(|v| {
            v.id = id;
            v.group = Some(g);
        })
    };
    run(vec![
        Row {
            name: "hard peer present",
            host: with(|_| {}),
            existing: vec![member(1, 0)],
            vm: member(2, 0),
            want: Some(FilterKind::AntiAffinity),
        },
        Row {
            name: "hard no peer",
            host: with(|_| {}),
            existing: vec![vm(1, 1, 1)],
            vm: member(2, 0),
            want: None,
        },
        Row {
            name: "soft peer present is not a filter",
            host: with(|_| {}),
            existing: vec![member(1, 1)],
            vm: member(2, 1),
            want: None,
        },
        Row {
            name: "affinity peer here",
            host: with(|_| {}),
            existing: vec![member(1, 2)],
            vm: member(2, 2),
            want: None,
        },
        Row {
            name: "affinity first member",
            host: with(|_| {}),
            existing: vec![],
            vm: member(2, 2),
            want: None,
        },
    ]);
    // Affinity peer on another host.
    let mut snap = snapshot(vec![worker("a", 8, 8192), worker("b", 8, 8192)]);
    snap.placements.push(PlacedVm {
        vm: member(1, 2),
        host: 1,
        numa: None,
    });
    let st = ClusterState::from_snapshot(&snap).expect("valid");
    let got = first_rejection(&st, 0, &member(2, 2));
    assert_eq!(got.map(|r| r.kind()), Some(FilterKind::Affinity));
    assert!(passes(&st, 1, &member(2, 2)));
}

#[test]
fn capacity_filters() {
    run(vec![
        Row {
            name: "cpu exact",
            host: with(|_| {}),
            existing: vec![vm(1, 6, 1)],
            vm: vm(2, 2, 1),
            want: None,
        },
        Row {
            name: "cpu short",
            host: with(|_| {}),
            existing: vec![vm(1, 7, 1)],
            vm: vm(2, 2, 1),
            want: Some(FilterKind::Cpu),
        },
        Row {
            name: "overcommit gives room",
            host: with(|h| h.cpu_overcommit = 2.0),
            existing: vec![vm(1, 14, 1)],
            vm: vm(2, 2, 1),
            want: None,
        },
        Row {
            name: "overcommit limit",
            host: with(|h| h.cpu_overcommit = 1.5),
            existing: vec![vm(1, 11, 1)],
            vm: vm(2, 2, 1),
            want: Some(FilterKind::Cpu),
        },
        Row {
            name: "memory short",
            host: with(|_| {}),
            existing: vec![vm(1, 1, 8000)],
            vm: vm(2, 1, 500),
            want: Some(FilterKind::Memory),
        },
        Row {
            name: "memory exact",
            host: with(|_| {}),
            existing: vec![vm(1, 1, 8000)],
            vm: vm(2, 1, 192),
            want: None,
        },
    ]);
}

#[test]
fn gpu_filter() {
    let gpu_host = || with(|h| h.gpus = vec![GpuSlots { model: 0, count: 2 }]);
    let gpu_vm = |id, n| {
        vmw(|v| {
            v.id = id;
            v.gpu = Some(GpuDemand { model: 0, count: n });
        })
    };
    run(vec![
        Row {
            name: "no gpus on host",
            host: with(|_| {}),
            existing: vec![],
            vm: gpu_vm(2, 1),
            want: Some(FilterKind::Gpu),
        },
        Row {
            name: "enough",
            host: gpu_host(),
            existing: vec![gpu_vm(1, 1)],
            vm: gpu_vm(2, 1),
            want: None,
        },
        Row {
            name: "used up",
            host: gpu_host(),
            existing: vec![gpu_vm(1, 2)],
            vm: gpu_vm(2, 1),
            want: Some(FilterKind::Gpu),
        },
    ]);
}

#[test]
fn numa_filter() {
    let two_nodes = || {
        with(|h| {
            h.numa = vec![
                NumaNode {
                    cpus: 4,
                    memory_mib: 4096
                };
                2
            ]
        })
    };
    let strict = |id, c, m| {
        vmw(|v| {
            v.id = id;
            v.vcpus = c;
            v.memory_mib = m;
            v.numa_strict = true;
        })
    };
    run(vec![
        Row {
            name: "fits a node",
            host: two_nodes(),
            existing: vec![],
            vm: strict(2, 4, 4096),
            want: None,
        },
        Row {
            name: "spans nodes",
            host: two_nodes(),
            existing: vec![],
            vm: strict(2, 6, 1024),
            want: Some(FilterKind::Numa),
        },
        Row {
            name: "not strict may span",
            host: two_nodes(),
            existing: vec![],
            vm: vm(2, 6, 1024),
            want: None,
        },
        Row {
            name: "node memory",
            host: two_nodes(),
            existing: vec![],
            vm: strict(2, 1, 5000),
            want: Some(FilterKind::Numa),
        },
    ]);
}

#[test]
fn quota_filter_table() {
    let mut snap = snapshot(vec![worker("a", 64, 65536)]);
    snap.pools[1].quota = Some(Quota {
        vcpus: 8,
        memory_mib: 4096,
        gpus: 0,
    });
    snap.placements.push(PlacedVm {
        vm: vmw(|v| {
            v.id = 1;
            v.pool = 1;
            v.vcpus = 6;
        }),
        host: 0,
        numa: None,
    });
    let st = ClusterState::from_snapshot(&snap).expect("valid");
    for (c, m, pool, want) in [
        (2, 1024, 1, None),
        (3, 1024, 1, Some("vcpus")),
        (1, 4000, 1, Some("memory_mib")),
        (30, 1024, 0, None),
    ] {
        let got = quota(
            &st,
            &vmw(|v| {
                v.vcpus = c;
                v.memory_mib = m;
                v.pool = pool;
            }),
        );
        assert_eq!(
            got.as_ref().map(|q| q.resource),
            want,
            "{c} vCPU {m} MiB pool {pool}"
        );
    }
}

#[test]
fn explain_names_every_host() {
    let mut h2 = worker("down", 8, 8192);
    h2.status = HostStatus::Failed;
    let snap = snapshot(vec![worker("small", 2, 8192), h2, worker("ok", 8, 8192)]);
    let s = session(&snap);
    let e = s.explain(&vm(1, 4, 1024));
    assert_eq!(e.fits, vec![2]);
    assert_eq!(e.hosts.len(), 2);
    assert_eq!(e.hosts[0].reject.kind(), FilterKind::Cpu);
    assert_eq!(e.hosts[1].reject.kind(), FilterKind::Status);
    assert_eq!(e.summary(), "1/3 hosts fit: 1 status, 1 cpu");
    assert!(e.hosts[0]
        .reject
        .to_string()
        .contains("needs 4 vCPUs, 2 free"));
}
