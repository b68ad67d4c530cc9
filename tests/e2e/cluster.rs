//! The cluster on real parts: a real etcd (started here, on 127.0.0.1), the real `ray
//! agent` and `ray controller` processes, real VMMs running rayvisor's guest; the guest's
//! heartbeat proves where a VM runs.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ray::netns::Netns;
use ray_cluster::keys;
use ray_cluster::runtoken::{self, Origin};
use ray_cluster::spec::VmSpec;
use ray_cluster::store::{EtcdStore, Store, Txn};
use ray_cluster::testing::Etcd;
use ray_e2e::{guest_bin, ray_bin, Env};

/// Starts `ray <args>` in the background with `runtime` as its runtime directory, its
/// output appended to `log`.
pub(crate) fn spawn_ray(runtime: &Path, log: &Path, args: &[&str]) -> Child {
    spawn_ray_in(None, runtime, log, args)
}

/// [`spawn_ray`] inside network namespace `ns` (`ip netns exec`, which execs `ray`: the
/// child's pid is ray's).
pub(crate) fn spawn_ray_in(ns: Option<&Netns>, runtime: &Path, log: &Path, args: &[&str]) -> Child {
    std::fs::create_dir_all(runtime).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let ray = ray_bin();
    let mut cmd = match ns {
        // Only the network namespace: the agent sees the host's cgroups and jails.
        Some(ns) => ns.enter_command(ray.to_str().unwrap()).unwrap(),
        None => Command::new(ray),
    };
    cmd.args(args)
        .env("RAY_RUNTIME_DIR", runtime)
        .env("RAY_GUEST", guest_bin())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("cannot start ray")
}

/// A `ray agent` or `ray controller` process, killed (-9) when dropped.
pub(crate) struct Daemon(pub(crate) Child);

impl Daemon {
    fn start(env: &Env, etcd: &Etcd, host: &str) -> Daemon {
        Daemon::start_in(&env.runtime, etcd, host)
    }

    /// An agent whose host's VMs live in `runtime` (its log: `runtime/agent.log`).
    fn start_in(runtime: &Path, etcd: &Etcd, host: &str) -> Daemon {
        Daemon::start_with(runtime, etcd, host, &[])
    }

    /// [`Daemon::start_in`] with more arguments for the agent.
    fn start_with(runtime: &Path, etcd: &Etcd, host: &str, extra: &[&str]) -> Daemon {
        let url = etcd.endpoints().join(",");
        let mut args = vec!["agent", "--host", host, "--etcd", &url];
        args.extend_from_slice(extra);
        Daemon(spawn_ray(runtime, &runtime.join("agent.log"), &args))
    }

    pub(crate) fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub(crate) fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn agent_log(env: &Env) -> String {
    std::fs::read_to_string(env.runtime.join("agent.log")).unwrap_or_default()
}

#[test]
fn an_agent_runs_its_vm_which_outlives_a_kill_9_and_is_adopted_back() {
    let env = Env::new("cluster-agent");
    let rt = runtime();
    let etcd = rt.block_on(Etcd::start("e2e-agent"));
    let store = rt.block_on(EtcdStore::connect(&etcd.endpoints())).unwrap();
    let mut agent = Daemon::start(&env, &etcd, "h1");
    wait("the agent's registration", Duration::from_secs(20), || {
        rt.block_on(store.get(&keys::host_alive("h1")))
            .unwrap()
            .is_some()
    });

    // The operator's spec and the controller's placement (the run token).
    let spec = VmSpec::parse(br#"{"vcpus":1,"memory_mib":128}"#).unwrap();
    rt.block_on(store.commit(Txn::new().put(keys::vm_spec("c1"), spec.to_json())))
        .unwrap();
    rt.block_on(runtoken::place(&store, "c1", "h1", Origin::Boot))
        .unwrap();

    // The agent starts it: the guest's heartbeat moves.
    let pid_file = env.runtime.join("vms/c1/vmm.pid");
    let started = Instant::now();
    while !env.runtime.join("vms/c1/cluster.json").is_file() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no VMM of c1; the agent's log:\n{}",
            agent_log(&env)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let vm = env.attach("c1", pid);
    let first = vm
        .wait_for("heartbeat ready", Duration::from_secs(30), |i| {
            i.heartbeat.as_ref().is_some_and(|h| h.ready)
        })
        .heartbeat
        .unwrap()
        .counter;

    // `ray cluster` shows it: on h1 at epoch 1, and h1 ready and running it.
    let url = etcd.endpoints().join(",");
    let vms: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["cluster", "vms", "--etcd", &url, "-o", "json"]))
            .unwrap();
    assert_eq!(vms[0]["vm"], "c1", "{vms}");
    assert_eq!(
        (&vms[0]["host"], &vms[0]["epoch"]),
        (&"h1".into(), &1.into()),
        "{vms}"
    );
    wait("h1's status listing c1", Duration::from_secs(20), || {
        let out = env.ray_ok(&["cluster", "nodes", "--etcd", &url, "-o", "json"]);
        let nodes: serde_json::Value = serde_json::from_str(&out).unwrap();
        nodes[0]["host"] == "h1" && nodes[0]["state"] == "ready" && nodes[0]["vms"][0] == "c1"
    });

    // kill -9 the agent: the VM does not depend on it and keeps running.
    agent.kill9();
    vm.wait_for(
        "the heartbeat after the agent died",
        Duration::from_secs(10),
        |i| i.heartbeat.as_ref().is_some_and(|h| h.counter > first),
    );

    // A new agent keeps the lease and adopts the running VMM: no second copy.
    let _agent = Daemon::start(&env, &etcd, "h1");
    wait("the adoption", Duration::from_secs(20), || {
        agent_log(&env).contains("adopted a running VMM")
    });
    assert!(vm.process_alive(), "the adopted VMM is the same process");
    assert_eq!(
        ray::runtime::list_ids(&env.runtime),
        ["c1"],
        "one VM on this host"
    );
    assert_eq!(
        agent_log(&env).matches("started").count(),
        1,
        "started once: {}",
        agent_log(&env)
    );
    let later = vm.info().heartbeat.unwrap().counter;
    vm.wait_for(
        "the heartbeat after the adoption",
        Duration::from_secs(10),
        |i| i.heartbeat.as_ref().is_some_and(|h| h.counter > later),
    );

    // Releasing the run token (the VM is deleted) makes the agent stop it.
    let (_, seen) = rt.block_on(runtoken::read(&store, "c1")).unwrap().unwrap();
    rt.block_on(runtoken::release(&store, "c1", &seen)).unwrap();
    vm.wait_exit(Duration::from_secs(15));
}

/// Kills every VMM under the given runtime directories when dropped: VMMs outlive their
/// agents by design, so a test must end them itself.
pub(crate) struct ReapVmms(pub(crate) Vec<PathBuf>);

impl Drop for ReapVmms {
    fn drop(&mut self) {
        for runtime in &self.0 {
            for id in ray::runtime::list_ids(runtime) {
                let pid = std::fs::read_to_string(runtime.join("vms").join(&id).join("vmm.pid"));
                if let Some(pid) = pid.ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                    // SAFETY: kill(2) of a VMM process this test's agents started.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

/// The guest heartbeat counter of VM `id` in `runtime`, if its VMM answers and the guest
/// is up.
pub(crate) fn heartbeat(runtime: &Path, id: &str) -> Option<u64> {
    let sock = runtime.join("vms").join(id).join("api.sock");
    let info: ray_api::vmm::VmInfo = ray::client::VmmClient::new(&sock)
        .call("GET", "/vm", None)
        .ok()?;
    info.heartbeat.filter(|h| h.ready).map(|h| h.counter)
}

/// Waits until VM `id`'s guest heartbeat moves in `runtime`: it runs there. On a
/// timeout, says what the VMM reports and the end of the agent's and the VMM's logs.
pub(crate) fn runs_in(runtime: &Path, id: &str) {
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match (first, heartbeat(runtime, id)) {
            (None, Some(c)) => first = Some(c),
            (Some(a), Some(b)) if b > a => return,
            _ => {}
        }
        if Instant::now() >= deadline {
            let tail = |p: PathBuf| {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(15)..].join("\n")
            };
            panic!(
                "timed out waiting for VM {id}'s heartbeat in {} (first {first:?}); the VMM says {:?}\nagent.log:\n{}\nvmm.log:\n{}",
                runtime.display(),
                vm_info(runtime, id),
                tail(runtime.join("agent.log")),
                tail(runtime.join("vms").join(id).join("vmm.log")),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn the_controller_places_vms_apart_explains_refusals_and_a_standby_takes_over() {
    let env = Env::new("cluster-ctl");
    let rt = runtime();
    let etcd = rt.block_on(Etcd::start("e2e-ctl"));
    let store = rt.block_on(EtcdStore::connect(&etcd.endpoints())).unwrap();
    let url = etcd.endpoints().join(",");
    let hosts = [env.runtime.join("h1"), env.runtime.join("h2")];
    let _reap = ReapVmms(hosts.to_vec());
    let _agents: Vec<Daemon> = ["h1", "h2"]
        .iter()
        .zip(&hosts)
        .map(|(h, dir)| Daemon::start_in(dir, &etcd, h))
        .collect();
    let log = env.runtime.join("controllers.log");
    let mut c1 = Daemon(spawn_ray(
        &env.runtime,
        &log,
        &["controller", "--id", "c1", "--etcd", &url],
    ));
    wait("c1 leads", Duration::from_secs(20), || {
        json(&env.ray_ok(&["cluster", "status", "--etcd", &url, "--json"]))["leader"] == "c1"
    });
    let _c2 = Daemon(spawn_ray(
        &env.runtime,
        &log,
        &["controller", "--id", "c2", "--etcd", &url],
    ));
    wait("both hosts Ready", Duration::from_secs(20), || {
        json(&env.ray_ok(&["cluster", "status", "--etcd", &url, "--json"]))["hosts"]["Ready"] == 2
    });

    // Bad input is refused before anything is written.
    let bad = env.ray(&[
        "cluster", "vm", "create", "x", "--pool", "gold", "--etcd", &url,
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("pool 'gold' does not exist"),
        "{bad:?}"
    );

    // Three members of one anti-affinity group on two hosts: two run, apart.
    for vm in ["web-1", "web-2", "web-3"] {
        env.ray_ok(&[
            "cluster",
            "vm",
            "create",
            vm,
            "--memory-mib",
            "128",
            "--group",
            "web",
            "--etcd",
            &url,
        ]);
    }
    let host_of = |vm: &str| {
        let (t, _) = rt.block_on(runtoken::read(&store, vm)).unwrap()?;
        Some(t.host)
    };
    wait("two placements", Duration::from_secs(20), || {
        host_of("web-1").is_some() && host_of("web-2").is_some()
    });
    let (h1, h2) = (host_of("web-1").unwrap(), host_of("web-2").unwrap());
    assert_ne!(h1, h2, "anti-affinity");
    let dir = |h: &str| env.runtime.join(h);
    runs_in(&dir(&h1), "web-1");
    runs_in(&dir(&h2), "web-2");
    assert_eq!(host_of("web-3"), None);
    let explain = env.ray_ok(&["cluster", "explain", "web-3", "--etcd", &url]);
    assert!(
        explain.contains("pending: no host yet")
            && explain.contains("no host: 2 would break anti-affinity group web"),
        "{explain}"
    );
    let vms = json(&env.ray_ok(&["cluster", "vms", "--etcd", &url, "--json"]));
    assert_eq!(vms.as_array().unwrap().len(), 3, "{vms}");
    let pools = json(&env.ray_ok(&["cluster", "pools", "--etcd", &url, "--json"]));
    assert_eq!(pools[1]["pool"], "standard");
    assert_eq!(
        (&pools[1]["vms"], &pools[1]["memory_mib"]),
        (&2.into(), &256.into())
    );

    // kill -9 the leader: c2 takes over and serves the next request; nothing already
    // running moves (epoch 1 everywhere).
    c1.kill9();
    env.ray_ok(&[
        "cluster",
        "vm",
        "create",
        "db",
        "--memory-mib",
        "128",
        "--pool",
        "critical",
        "--etcd",
        &url,
    ]);
    wait("c2 places db", Duration::from_secs(30), || {
        host_of("db").is_some()
    });
    let status = json(&env.ray_ok(&["cluster", "status", "--etcd", &url, "--json"]));
    assert_eq!(status["leader"], "c2", "{status}");
    runs_in(&dir(&host_of("db").unwrap()), "db");

    // Deleting web-1 stops its VMM and makes room for web-3 on that host.
    env.ray_ok(&["cluster", "vm", "delete", "web-1", "--etcd", &url]);
    wait("web-1 stopped", Duration::from_secs(30), || {
        heartbeat(&dir(&h1), "web-1").is_none()
    });
    wait("web-3 placed", Duration::from_secs(30), || {
        host_of("web-3").is_some()
    });
    assert_eq!(host_of("web-3").unwrap(), h1);
    runs_in(&dir(&h1), "web-3");

    // The decision log tells the story, with both leaders; every VM got exactly one
    // run token (epoch 1): none ran twice.
    let events = json(&env.ray_ok(&["cluster", "events", "--etcd", &url, "--json"]));
    let kinds: Vec<(String, String)> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().into(),
                e["vm"].as_str().unwrap_or("-").into(),
            )
        })
        .collect();
    for want in [
        ("leader", "-"),
        ("placed", "web-1"),
        ("placed", "web-2"),
        ("refused", "web-3"),
        ("placed", "db"),
        ("released", "web-1"),
        ("placed", "web-3"),
    ] {
        assert!(
            kinds.contains(&(want.0.into(), want.1.into())),
            "{want:?} not in {kinds:?}"
        );
    }
    let placed_twice = kinds
        .iter()
        .filter(|k| k.0 == "placed" && k.1 == "web-2")
        .count();
    assert_eq!(placed_twice, 1);
    for vm in ["web-2", "web-3", "db"] {
        let (t, _) = rt.block_on(runtoken::read(&store, vm)).unwrap().unwrap();
        assert_eq!(t.epoch, 1, "{vm}");
    }
}

#[test]
fn the_controller_live_migrates_a_vm_through_the_agents_and_drains_a_host() {
    let env = Env::new("cluster-migrate");
    let rt = runtime();
    let etcd = rt.block_on(Etcd::start("e2e-migrate"));
    let store = rt.block_on(EtcdStore::connect(&etcd.endpoints())).unwrap();
    let url = etcd.endpoints().join(",");
    let key = env.runtime.join("migration.key");
    std::fs::create_dir_all(&env.runtime).unwrap();
    std::fs::write(&key, b"0123456789abcdef0123456789abcdef").unwrap();
    let key = key.display().to_string();
    let hosts = [env.runtime.join("h1"), env.runtime.join("h2")];
    let _reap = ReapVmms(hosts.to_vec());
    let agents: Vec<Daemon> = ["h1", "h2"]
        .iter()
        .zip(&hosts)
        .map(|(h, dir)| Daemon::start_with(dir, &etcd, h, &["--migration-key-file", &key]))
        .collect();
    let _ctl = Daemon(spawn_ray(
        &env.runtime,
        &env.runtime.join("controller.log"),
        &["controller", "--id", "c1", "--etcd", &url],
    ));
    wait("both hosts Ready", Duration::from_secs(30), || {
        json(&env.ray_ok(&["cluster", "status", "--etcd", &url, "--json"]))["hosts"]["Ready"] == 2
    });
    env.ray_ok(&[
        "cluster",
        "vm",
        "create",
        "m1",
        "--memory-mib",
        "128",
        "--etcd",
        &url,
    ]);
    let token = || {
        rt.block_on(runtoken::read(&store, "m1"))
            .unwrap()
            .map(|(t, _)| t)
    };
    wait("m1 placed", Duration::from_secs(20), || token().is_some());
    let from = token().unwrap().host;
    let to = if from == "h1" { "h2" } else { "h1" };
    let dir = |h: &str| env.runtime.join(h);
    runs_in(&dir(&from), "m1");

    // Bad requests are refused before anything is written.
    let bad = env.ray(&[
        "cluster", "vm", "migrate", "m1", "--to", &from, "--etcd", &url,
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains(&format!("runs on host {from} already")),
        "{bad:?}"
    );
    let bad = env.ray(&["cluster", "vm", "migrate", "m1", "--abort", "--etcd", &url]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("no migration under way to abort"),
        "{bad:?}"
    );

    // Migrate without naming a target: the engine picks the other host. The command
    // follows it to its end.
    let before = heartbeat(&dir(&from), "m1").unwrap();
    let out = env.ray_ok(&["cluster", "vm", "migrate", "m1", "--etcd", &url]);
    assert!(
        out.contains(&format!(
            "migrated from host {from} to host {to} (run token epoch 2)"
        )),
        "{out}"
    );
    // The guest goes on where it was (its heartbeat counter carried over) on the target,
    // and the source's copy is gone.
    runs_in(&dir(to), "m1");
    assert!(heartbeat(&dir(to), "m1").unwrap() > before);
    wait("the source's VMM gone", Duration::from_secs(20), || {
        heartbeat(&dir(&from), "m1").is_none()
    });
    let t = token().unwrap();
    assert_eq!((t.host.as_str(), t.epoch), (to, 2));
    wait(
        "the target's agent adopted it",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(dir(to).join("agent.log"))
                .unwrap_or_default()
                .contains("adopted the VM that arrived by migration")
        },
    );
    assert!(dir(to).join("vms/m1/cluster.json").is_file());

    // And back, naming the target; the log has both moves; nothing is left over.
    let out = env.ray_ok(&[
        "cluster", "vm", "migrate", "m1", "--to", &from, "--etcd", &url,
    ]);
    assert!(out.contains("(run token epoch 3)"), "{out}");
    runs_in(&dir(&from), "m1");
    let explain = env.ray_ok(&["cluster", "explain", "m1", "--etcd", &url]);
    assert_eq!(
        explain.matches("migrated from host").count(),
        2,
        "{explain}"
    );
    // The controller clears a migration's keys and its operation record in commits of their
    // own after the run token moved (what the command waits for): give them a moment, but
    // anything still there after 10 s is left over for good.
    let left_over = || {
        let mut left: Vec<String> = rt
            .block_on(store.list(keys::OPS))
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        for key in [
            keys::receiver("m1"),
            keys::sender("m1"),
            keys::migrate_request("m1"),
        ] {
            if rt.block_on(store.get(&key)).unwrap().is_some() {
                left.push(key);
            }
        }
        left
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = left_over();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = left_over();
    }
    assert!(
        left.is_empty(),
        "left over after the migration back: {left:?}"
    );

    // Drain the host: every VM on it moves to the other one, their guests carry on.
    env.ray_ok(&[
        "cluster",
        "vm",
        "create",
        "m2",
        "--memory-mib",
        "128",
        "--etcd",
        &url,
    ]);
    let host_of = |vm: &str| {
        rt.block_on(runtoken::read(&store, vm))
            .unwrap()
            .map(|(t, _)| t.host)
    };
    wait("m2 placed", Duration::from_secs(20), || {
        host_of("m2").is_some()
    });
    runs_in(&dir(&host_of("m2").unwrap()), "m2");
    let on: Vec<&str> = ["m1", "m2"]
        .into_iter()
        .filter(|vm| host_of(vm).as_deref() == Some(from.as_str()))
        .collect();
    assert!(on.contains(&"m1"));
    let counters: Vec<u64> = on
        .iter()
        .map(|vm| heartbeat(&dir(&from), vm).unwrap())
        .collect();
    let out = env.ray_ok(&["node", "drain", &from, "--etcd", &url]);
    assert!(out.contains("Drained"), "{out}");
    for (vm, before) in on.iter().zip(counters) {
        assert_eq!(host_of(vm).as_deref(), Some(to), "{vm}");
        runs_in(&dir(to), vm);
        assert!(heartbeat(&dir(to), vm).unwrap() > before, "{vm}");
    }
    let status = json(&env.ray_ok(&["cluster", "status", "--etcd", &url, "--json"]));
    assert_eq!(status["drains"][0]["vms_left"], 0, "{status}");
    let events = env.ray_ok(&["cluster", "events", "--etcd", &url]);
    assert!(
        events.contains(&format!("(asked by drain {from})")),
        "{events}"
    );
    assert!(
        events.contains(&format!("host {from} is drained")),
        "{events}"
    );
    // A new VM does not go to the drained host.
    env.ray_ok(&[
        "cluster",
        "vm",
        "create",
        "m3",
        "--memory-mib",
        "128",
        "--etcd",
        &url,
    ]);
    wait("m3 placed", Duration::from_secs(20), || {
        host_of("m3").is_some()
    });
    assert_eq!(host_of("m3").as_deref(), Some(to));

    // Maintenance over: `ray node uncordon` of the drained host goes through Rejoining.
    // Its agent stopped (SIGSTOP) cannot re-report its inventory, so the host stays
    // Rejoining in `ray cluster nodes` and the wait is logged; running again, its agent
    // re-reports and the host is Ready.
    let agent = &agents[if from == "h1" { 0 } else { 1 }];
    let signal = |sig: i32| {
        // SAFETY: kill(2) of an agent process this test started.
        let r = unsafe { libc::kill(agent.0.id() as i32, sig) };
        assert_eq!(r, 0, "kill({sig}) of the agent of {from}");
    };
    let state_of = || {
        let nodes = json(&env.ray_ok(&["cluster", "nodes", "--etcd", &url, "--json"]));
        let row = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["host"] == from.as_str())
            .cloned()
            .unwrap();
        row["state"].as_str().unwrap().to_string()
    };
    signal(libc::SIGSTOP);
    let out = env.ray(&["node", "uncordon", &from, "--etcd", &url]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Rejoining"),
        "{out:?}"
    );
    assert_eq!(state_of(), "rejoining");
    wait(
        "the wait for the agent logged",
        Duration::from_secs(20),
        || {
            env.ray_ok(&["cluster", "events", "--etcd", &url])
                .contains("has not re-reported its inventory since the request")
        },
    );
    assert_eq!(state_of(), "rejoining");
    signal(libc::SIGCONT);
    wait("the host Ready again", Duration::from_secs(30), || {
        state_of() == "ready"
    });
    let events = json(&env.ray_ok(&["cluster", "events", "--etcd", &url, "--json"]));
    let rejoin: Vec<(String, String)> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["host"] == from.as_str())
        .filter(|e| e["kind"] == "rejoining" || e["kind"] == "rejoined")
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(rejoin.len(), 3, "{rejoin:?}");
    assert!(
        rejoin[0].1.contains("Offline -> Rejoining (Recover)"),
        "{rejoin:?}"
    );
    assert!(rejoin[1].1.contains("waiting"), "{rejoin:?}");
    assert_eq!(rejoin[2].0, "rejoined", "{rejoin:?}");
    assert!(
        rejoin[2]
            .1
            .contains("Rejoining -> Ready (RejoinOk): fresh lease, inventory re-reported"),
        "{rejoin:?}"
    );
}

/// `PUT /vm/lease` with `body`: the status and, on refusal, the message.
fn put_lease(client: &ray::client::VmmClient, body: &str) -> (u16, String) {
    let body = Some(body.as_bytes().to_vec());
    match client.call::<ray_api::vmm::VmInfo>("PUT", "/vm/lease", body) {
        Ok(_) => (200, String::new()),
        Err(ray::client::ClientError::Api {
            status, message, ..
        }) => (status, message),
        Err(e) => panic!("transport error: {e}"),
    }
}

#[test]
fn a_vmm_whose_local_lease_runs_out_fences_itself_until_renewed_and_resumed() {
    use ray_api::vmm::{LifecycleEvent, VmInfo, VmStateName};
    let env = Env::new("cluster-lease");
    let kernel = guest_bin().display().to_string();
    let cfg = format!(
        r#"{{"kernel":"{kernel}","cmdline":"console=ttyS0 ray.poll_ms=0","vcpus":1,"memory_bytes":134217728}}"#
    );
    let args = ["--config-json", &cfg, "--start", "--lease-ttl", "30s"];
    let b = env.bare_vmm("leased", &args);
    let vm = env.attach("leased", b.child.id());
    vm.wait_for("heartbeat ready", Duration::from_secs(30), |i| {
        i.heartbeat.as_ref().is_some_and(|h| h.ready)
    });

    // Renewed every 500 ms it runs on, past its time to live.
    let mut last_renewal = Instant::now();
    for _ in 0..8 {
        assert_eq!(
            put_lease(&vm.client, r#"{"ttl_ms":3000}"#),
            (200, String::new())
        );
        last_renewal = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
    }
    let info = vm.info();
    assert_eq!(info.state, VmStateName::Running);
    let lease = info.lease.expect("a leased VMM shows its lease");
    assert!(!lease.fenced && lease.ttl_ms == 3000, "{lease:?}");

    // Bad renewals are refused, naming what is wrong; the VM runs on.
    for (body, why) in [
        (r#"{"ttl_ms":0}"#, "ttl_ms 0 is out of range"),
        (r#"{"ttl_ms":100,"ttl":1}"#, "unknown field `ttl`"),
        (
            r#"{"ttl_ms":100,"since_monotonic_ns":18446744073709551615}"#,
            "in the future",
        ),
    ] {
        let (status, message) = put_lease(&vm.client, body);
        assert_eq!(status, 400, "{body}: {message}");
        assert!(message.contains(why), "{body}: {message}");
    }
    assert_eq!(vm.state(), VmStateName::Running);

    // Nobody renews any more: the VMM pauses its own vCPUs, and says why.
    let fenced = vm.wait_for("the fence", Duration::from_secs(10), |i| {
        i.lease.as_ref().is_some_and(|l| l.fenced)
    });
    assert!(
        last_renewal.elapsed() >= Duration::from_millis(3000),
        "fenced before its lease ran out"
    );
    assert_eq!(fenced.state, VmStateName::Paused);
    let reason = fenced.lease.unwrap().fence_reason.unwrap();
    assert!(reason.contains("lease:expired"), "{reason}");
    let events: Vec<LifecycleEvent> = vm.client.call("GET", "/vm/events", None).unwrap();
    let last = events.last().unwrap();
    assert_eq!(
        (last.from, last.to),
        (VmStateName::Running, VmStateName::Paused)
    );
    assert!(last.cause.starts_with("lease:expired"), "{last:?}");
    // Its guest no longer runs.
    let hb = |i: &VmInfo| i.heartbeat.as_ref().map(|h| h.counter);
    let before = hb(&vm.info());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(hb(&vm.info()), before, "a fenced guest's heartbeat moved");

    // Resuming needs a renewal first; a renewal alone does not resume.
    let e = vm
        .client
        .call::<VmInfo>("PUT", "/vm/resume", None)
        .unwrap_err();
    assert!(e.to_string().contains("fenced"), "{e}");
    assert_eq!(
        put_lease(&vm.client, r#"{"ttl_ms":60000}"#),
        (200, String::new())
    );
    assert_eq!(vm.state(), VmStateName::Paused);
    vm.client.call::<VmInfo>("PUT", "/vm/resume", None).unwrap();
    vm.wait_for("the heartbeat again", Duration::from_secs(5), |i| {
        hb(i) != before && i.lease.as_ref().is_some_and(|l| !l.fenced)
    });

    // An operator who clears the lease takes the VM over: it never fences again.
    let info: VmInfo = vm.client.call("DELETE", "/vm/lease", None).unwrap();
    assert!(info.lease.is_none(), "{:?}", info.lease);
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(vm.state(), VmStateName::Running);
}

/// VM `id`'s VMM in `runtime`, as it answers.
pub(crate) fn vm_info(runtime: &Path, id: &str) -> Option<ray_api::vmm::VmInfo> {
    let sock = runtime.join("vms").join(id).join("api.sock");
    ray::client::VmmClient::new(&sock)
        .call("GET", "/vm", None)
        .ok()
}

/// VM `id`'s audit trail in `runtime`.
pub(crate) fn vm_events(runtime: &Path, id: &str) -> Vec<ray_api::vmm::LifecycleEvent> {
    let sock = runtime.join("vms").join(id).join("api.sock");
    ray::client::VmmClient::new(&sock)
        .call("GET", "/vm/events", None)
        .unwrap()
}

/// Two agents on loopback, each with its own runtime (state) directory, one controller,
/// a 4 s host lease, both agents checkpointing HA VMs every second into one directory
/// (the shared storage). An HA VM and a plain one run on h1; the HA VM is checkpointed
/// periodically (`observed` names each one after it verified). kill -9 h1's agent: both
/// VMMs fence themselves (paused, `lease:expired`) once their local lease runs out, the
/// controller restarts the HA VM on h2 only after h1's lease lapsed plus the grace, from
/// h1's latest checkpoint: the guest's heartbeat counter (guest memory) carries on from
/// where it was, so it was restored, not booted; the audit trails show h1's copy paused
/// before h2's started: it never ran twice. h2 checkpoints it under epoch 2 and h1's
/// epoch-1 checkpoints are pruned. A new agent on h1 stops the copy that is not h1's any
/// more and resumes the plain VM.
#[test]
fn a_killed_agent_s_ha_vm_fences_itself_and_runs_once_on_the_other_host() {
    use ray_api::vmm::VmStateName;
    use ray_cluster::decisions::{self, Kind};
    let env = Env::new("cluster-ha");
    let rt = runtime();
    let etcd = rt.block_on(Etcd::start("e2e-ha"));
    let store = rt.block_on(EtcdStore::connect(&etcd.endpoints())).unwrap();
    let url = etcd.endpoints().join(",");
    let (h1, h2) = (env.runtime.join("h1"), env.runtime.join("h2"));
    let _reap = ReapVmms(vec![h1.clone(), h2.clone()]);
    let shared = env.runtime.join("shared");
    let lease = [
        "--lease-ttl",
        "4s",
        "--checkpoint-dir",
        shared.to_str().unwrap(),
        "--checkpoint-interval",
        "1s",
        "--checkpoint-chain",
        "3",
    ];
    let bad = env.ray(&[
        "agent",
        "--host",
        "hx",
        "--etcd",
        &url,
        "--checkpoint-dir",
        shared.to_str().unwrap(),
        "--checkpoint-interval",
        "10ms",
    ]);
    assert!(
        !bad.status.success()
            && String::from_utf8_lossy(&bad.stderr).contains("--checkpoint-interval"),
        "{bad:?}"
    );
    let mut agent1 = Daemon::start_with(&h1, &etcd, "h1", &lease);
    let _ctl = Daemon(spawn_ray(
        &env.runtime,
        &env.runtime.join("controller.log"),
        &[
            "controller",
            "--id",
            "c1",
            "--etcd",
            &url,
            "--lease-ttl",
            "4s",
        ],
    ));
    wait("h1 Ready", Duration::from_secs(30), || {
        json(&env.ray_ok(&["cluster", "status", "--etcd", &url, "--json"]))["hosts"]["Ready"] == 1
    });
    let bad = env.ray(&[
        "cluster",
        "vm",
        "create",
        "x",
        "--restart-priority",
        "2",
        "--etcd",
        &url,
    ]);
    assert!(!bad.status.success(), "--restart-priority without --ha");
    for (vm, ha) in [("ha1", true), ("plain", false)] {
        let mut args = vec!["cluster", "vm", "create", vm, "--memory-mib", "128"];
        if ha {
            args.extend_from_slice(&["--ha", "--restart-priority", "3"]);
        }
        args.extend_from_slice(&["--etcd", &url]);
        env.ray_ok(&args);
    }
    let token = |vm: &str| {
        rt.block_on(runtoken::read(&store, vm))
            .unwrap()
            .map(|(t, _)| t)
    };
    wait("both placed on h1", Duration::from_secs(20), || {
        token("ha1").is_some_and(|t| t.host == "h1")
            && token("plain").is_some_and(|t| t.host == "h1")
    });
    runs_in(&h1, "ha1");
    runs_in(&h1, "plain");
    let _agent2 = Daemon::start_with(&h2, &etcd, "h2", &lease);
    wait("both hosts Ready", Duration::from_secs(30), || {
        json(&env.ray_ok(&["cluster", "status", "--etcd", &url, "--json"]))["hosts"]["Ready"] == 2
    });

    // h1's agent checkpoints ha1 (and only ha1: plain is not HA) into the shared
    // directory and names each checkpoint in `observed`, with its time and its pause.
    let observed = |vm: &str| {
        rt.block_on(store.get(&keys::vm_observed(vm)))
            .unwrap()
            .map(|kv| json(&String::from_utf8_lossy(&kv.value)))
    };
    // The marker: the guest's heartbeat counter, in guest memory, past this value before
    // a checkpoint is taken.
    let marker = heartbeat(&h1, "ha1").unwrap();
    let since = ray_cluster::agent::unix_ms();
    wait(
        "two checkpoints of ha1 after the marker",
        Duration::from_secs(30),
        || {
            let mut times = std::collections::BTreeSet::new();
            for _ in 0..30 {
                if let Some(o) = observed("ha1").and_then(|o| o["taken_at_ms"].as_u64()) {
                    if o > since {
                        times.insert(o);
                    }
                }
                if times.len() >= 2 {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        },
    );
    let o = observed("ha1").unwrap();
    assert_eq!(
        (o["host"].as_str(), o["epoch"].as_u64()),
        (Some("h1"), Some(1)),
        "{o}"
    );
    let path = PathBuf::from(o["checkpoint"].as_str().unwrap());
    assert!(
        path.starts_with(shared.join("ha1").join("e1")),
        "{}",
        path.display()
    );
    assert!(o["paused_ms"].as_f64().is_some_and(|p| p > 0.0), "{o}");
    assert!(
        observed("plain").is_none(),
        "a VM without HA is not checkpointed"
    );
    let wide = env.ray_ok(&["cluster", "vms", "--etcd", &url, "-o", "wide"]);
    assert!(
        wide.contains("CHECKPOINT")
            && wide.contains("AGE")
            && wide.contains(&*shared.join("ha1").to_string_lossy()),
        "{wide}"
    );

    // h1's agent dies: nobody renews its lease or its VMMs' local leases, and nobody
    // names a newer checkpoint.
    agent1.kill9();
    let ckpt = PathBuf::from(observed("ha1").unwrap()["checkpoint"].as_str().unwrap());
    assert!(ckpt.is_dir(), "{}", ckpt.display());
    for vm in ["ha1", "plain"] {
        wait(
            &format!("{vm} on h1 fenced"),
            Duration::from_secs(15),
            || vm_info(&h1, vm).is_some_and(|i| i.lease.is_some_and(|l| l.fenced)),
        );
        assert_eq!(vm_info(&h1, vm).unwrap().state, VmStateName::Paused);
    }
    wait("ha1's run token on h2", Duration::from_secs(30), || {
        token("ha1").is_some_and(|t| t.host == "h2")
    });
    runs_in(&h2, "ha1");
    assert_eq!(token("ha1").unwrap().epoch, 2);
    // Restored, not booted: the counter in guest memory carries on past the marker.
    let restored = heartbeat(&h2, "ha1").unwrap();
    assert!(
        restored > marker,
        "h2's ha1 heartbeat {restored} does not carry on from h1's {marker}: booted afresh?"
    );
    // The plain VM is not HA: it stays h1's, fenced, not lost.
    let plain = token("plain").unwrap();
    assert_eq!((plain.host.as_str(), plain.epoch), ("h1", 1));

    // Exactly once: h1's copy paused itself before h2's started (both audit trails, one
    // host's clock), and it stays paused.
    let fenced_at = vm_events(&h1, "ha1")
        .iter()
        .rev()
        .find(|e| e.to == VmStateName::Paused)
        .map(|e| (e.time_ms, e.cause.clone()))
        .unwrap();
    assert!(fenced_at.1.starts_with("lease:expired"), "{fenced_at:?}");
    let (started_at, how) = vm_events(&h2, "ha1")
        .iter()
        .find(|e| e.to == VmStateName::Running)
        .map(|e| (e.time_ms, e.cause.clone()))
        .unwrap();
    // From the checkpoint, not a fresh boot.
    assert!(how.starts_with("restore:"), "h2 started ha1 by {how}");
    assert!(
        fenced_at.0 < started_at,
        "h1's copy paused at {} ms, h2's started at {started_at} ms",
        fenced_at.0
    );
    let frozen = vm_info(&h1, "ha1").unwrap().heartbeat.map(|h| h.counter);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        vm_info(&h1, "ha1").unwrap().heartbeat.map(|h| h.counter),
        frozen
    );
    // The run-token history: placed once at epoch 1, restarted once at epoch 2, after
    // h1's lease lapsed plus the grace.
    let log = rt.block_on(decisions::read(&store, Some("ha1"))).unwrap();
    let moves: Vec<(Kind, Option<String>)> = log
        .iter()
        .filter(|e| matches!(e.kind, Kind::Placed | Kind::Restarted))
        .map(|e| (e.kind, e.host.clone()))
        .collect();
    assert_eq!(
        moves,
        [
            (Kind::Placed, Some("h1".into())),
            (Kind::Restarted, Some("h2".into()))
        ],
        "{log:?}"
    );
    let restarted = log.iter().find(|e| e.kind == Kind::Restarted).unwrap();
    assert_eq!(restarted.data["epoch"], 2);
    assert!(
        restarted.message.contains("host h1's lease lapsed")
            && restarted
                .message
                .contains(&format!("from its checkpoint {} taken", ckpt.display()))
            && restarted
                .message
                .contains("s before the host's lease lapse was seen"),
        "{}",
        restarted.message
    );
    assert!(
        restarted.data["checkpoint_age_ms"].as_u64().is_some(),
        "{:?}",
        restarted.data
    );

    // h2 checkpoints ha1 under epoch 2; once it named one, h1's epoch-1 chain is gone.
    wait(
        "ha1 checkpointed by h2 at epoch 2",
        Duration::from_secs(30),
        || observed("ha1").is_some_and(|o| o["host"] == "h2" && o["epoch"] == 2),
    );
    let o = observed("ha1").unwrap();
    assert!(
        Path::new(o["checkpoint"].as_str().unwrap()).starts_with(shared.join("ha1").join("e2")),
        "{o}"
    );
    wait(
        "h1's epoch-1 checkpoints pruned",
        Duration::from_secs(10),
        || !shared.join("ha1").join("e1").exists(),
    );
    let all = rt.block_on(decisions::read(&store, None)).unwrap();
    let lapsed = all
        .iter()
        .find(|e| e.kind == Kind::LeaseLapsed && e.host.as_deref() == Some("h1"))
        .expect("h1's lapse is logged");
    assert!(
        restarted.at_ms >= lapsed.at_ms + 400,
        "restarted within the grace"
    );

    // h1's agent comes back: the copy that is h2's now stops, the plain VM resumes.
    let _agent1 = Daemon::start_with(&h1, &etcd, "h1", &lease);
    wait("h1's old copy of ha1 gone", Duration::from_secs(30), || {
        vm_info(&h1, "ha1").is_none_or(|i| i.state == VmStateName::Terminated)
    });
    runs_in(&h1, "plain");
    runs_in(&h2, "ha1");
    assert!(vm_info(&h1, "plain")
        .unwrap()
        .lease
        .is_some_and(|l| !l.fenced));
    // One owner per epoch: h1 never wrote about ha1 again, h2 still names its checkpoint.
    std::thread::sleep(Duration::from_secs(2));
    let o = observed("ha1").unwrap();
    assert_eq!(
        (o["host"].as_str(), o["epoch"].as_u64()),
        (Some("h2"), Some(2)),
        "{o}"
    );
    assert!(!shared.join("ha1").join("e1").exists());
    let t = token("ha1").unwrap();
    assert_eq!((t.host.as_str(), t.epoch), ("h2", 2));
}

/// A bridge in namespace `hub` (etcd and the controller live there) and two hosts, each
/// in its own namespace with a veth on it: `10.<a>.<b>.1` the hub, `.2` and `.3` the
/// hosts. Returns (hub, [host namespaces], hub address).
fn bridged_hosts(tag: &str) -> (Netns, [Netns; 2], String) {
    let pid = std::process::id();
    let net = format!("10.79.{}", pid % 250);
    let hub = Netns::new(&format!("ray-{tag}-hub-{pid}")).unwrap();
    hub.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    hub.ip(&["addr", "add", &format!("{net}.1/24"), "dev", "br0"])
        .unwrap();
    hub.ip(&["link", "set", "br0", "up"]).unwrap();
    let hosts = [2, 3].map(|i| {
        let ns = Netns::new(&format!("ray-{tag}-h{i}-{pid}")).unwrap();
        let peer = format!("v{i}");
        ns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", &hub.name,
        ])
        .unwrap();
        ns.ip(&["addr", "add", &format!("{net}.{i}/24"), "dev", "eth0"])
            .unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
        hub.ip(&["link", "set", &peer, "master", "br0"]).unwrap();
        hub.ip(&["link", "set", &peer, "up"]).unwrap();
        ns
    });
    (hub, hosts, format!("{net}.1"))
}

/// Each agent in its own network namespace on a bridge, etcd and the controller in a third:
/// h1's link is cut (`ip link set eth0 down`) while its agent lives. It cannot renew: it
/// and its VMM fence the HA VM; the controller restarts it on h2 after the lease and the
/// grace; h1's copy was paused before h2's started. The link comes back: h1's agent takes
/// a new lease, finds the VM is h2's now and stops its own copy.
#[test]
fn a_host_whose_link_is_cut_fences_and_its_ha_vm_runs_once_on_the_other_host() {
    use ray_api::vmm::VmStateName;
    let env = Env::new("cluster-link");
    let (hub, [n1, n2], hub_ip) = bridged_hosts("link");
    let etcd = Etcd::spawn("e2e-link", &hub_ip, Some(&hub.name));
    let url = etcd.endpoints().join(",");
    let (h1, h2) = (env.runtime.join("h1"), env.runtime.join("h2"));
    let _reap = ReapVmms(vec![h1.clone(), h2.clone()]);
    // The CLI, in the hub's namespace: it reaches etcd there.
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--etcd", &url]);
        hub.command(ray_bin().to_str().unwrap())
            .args(&all)
            .env("RAY_RUNTIME_DIR", &env.runtime)
            .output()
            .unwrap()
    };
    let ready = |n: u64| {
        let out = cli(&["cluster", "status", "--json"]);
        out.status.success() && json(&String::from_utf8_lossy(&out.stdout))["hosts"]["Ready"] == n
    };
    // Jailed agents (root's default; `--jail` says so).
    let agent = |ns: &Netns, runtime: &Path, host: &str| {
        let args = [
            "agent",
            "--host",
            host,
            "--etcd",
            &url,
            "--lease-ttl",
            "4s",
            "--jail",
        ];
        Daemon(spawn_ray_in(
            Some(ns),
            runtime,
            &runtime.join("agent.log"),
            &args,
        ))
    };
    // etcd answers (an agent that cannot reach its store at start gives up).
    wait("etcd in the hub", Duration::from_secs(20), || {
        cli(&["cluster", "status", "--json"]).status.success()
    });
    let _a1 = agent(&n1, &h1, "h1");
    let _ctl = Daemon(spawn_ray_in(
        Some(&hub),
        &env.runtime,
        &env.runtime.join("controller.log"),
        &[
            "controller",
            "--id",
            "c1",
            "--etcd",
            &url,
            "--lease-ttl",
            "4s",
        ],
    ));
    wait("h1 Ready", Duration::from_secs(30), || ready(1));
    let out = cli(&[
        "cluster",
        "vm",
        "create",
        "ha1",
        "--memory-mib",
        "128",
        "--ha",
    ]);
    assert!(out.status.success(), "{out:?}");
    let placed = |host: &str, epoch: u64| {
        let out = cli(&["cluster", "vms", "-o", "json"]);
        let vms = json(&String::from_utf8_lossy(&out.stdout));
        vms[0]["vm"] == "ha1" && vms[0]["host"] == host && vms[0]["epoch"] == epoch
    };
    wait("ha1 on h1", Duration::from_secs(20), || placed("h1", 1));
    runs_in(&h1, "ha1");
    // The agent, asked to, jails its VMMs as `ray vm run` does: not root's.
    let pid = std::fs::read_to_string(h1.join("vms/ha1/vmm.pid")).unwrap();
    let uids = ray_e2e::process_uids(pid.trim().parse().unwrap());
    assert!(!uids.contains(&0), "the agent's VMM runs as uids {uids:?}");
    let _a2 = agent(&n2, &h2, "h2");
    wait("both hosts Ready", Duration::from_secs(30), || ready(2));

    // h1's link goes down: its agent lives but reaches nobody.
    n1.ip(&["link", "set", "eth0", "down"]).unwrap();
    wait("ha1 on h1 paused", Duration::from_secs(15), || {
        vm_info(&h1, "ha1").is_some_and(|i| i.state == VmStateName::Paused)
    });
    wait("ha1 on h2, epoch 2", Duration::from_secs(30), || {
        placed("h2", 2)
    });
    runs_in(&h2, "ha1");
    let paused_at = vm_events(&h1, "ha1")
        .iter()
        .rev()
        .find(|e| e.to == VmStateName::Paused)
        .map(|e| e.time_ms)
        .unwrap();
    let started_at = vm_events(&h2, "ha1")
        .iter()
        .find(|e| e.to == VmStateName::Running)
        .map(|e| e.time_ms)
        .unwrap();
    assert!(
        paused_at < started_at,
        "h1's copy paused at {paused_at} ms, h2's started at {started_at} ms"
    );

    // The link comes back: h1 learns the VM is h2's and stops its copy.
    n1.ip(&["link", "set", "eth0", "up"]).unwrap();
    wait("h1's copy of ha1 gone", Duration::from_secs(30), || {
        vm_info(&h1, "ha1").is_none_or(|i| i.state == VmStateName::Terminated)
    });
    wait("both hosts Ready again", Duration::from_secs(30), || {
        ready(2)
    });
    runs_in(&h2, "ha1");
    assert!(placed("h2", 2), "the run token stayed with h2");
}

/// One HTTP/1.1 request over TCP: the status and the JSON body.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, json(body))
}

#[test]
fn the_agent_api_shows_its_host_and_vms_pauses_and_resumes_and_refuses_without_its_token() {
    let env = Env::new("cluster-agent-api");
    let rt = runtime();
    let etcd = rt.block_on(Etcd::start("e2e-agent-api"));
    let store = rt.block_on(EtcdStore::connect(&etcd.endpoints())).unwrap();
    let _reap = ReapVmms(vec![env.runtime.clone()]);
    let token = "e2e-agent-token-0123456789";
    let token_file = env.runtime.join("agent.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let tf = token_file.display().to_string();

    // Bad input first: TCP without a token file, and a token file others can read.
    let url = etcd.endpoints().join(",");
    let out = env.ray(&[
        "agent",
        "--host",
        "h1",
        "--etcd",
        &url,
        "--api-tcp",
        "127.0.0.1:1",
    ]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--api-token-file"),
        "{out:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = env.ray(&[
        "agent",
        "--host",
        "h1",
        "--etcd",
        &url,
        "--api-tcp",
        "127.0.0.1:1",
        "--api-token-file",
        &tf,
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("make it 0600"),
        "{out:?}"
    );
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let tcp = format!("127.0.0.1:{}", ray_cluster::testing::free_port());
    let _agent = Daemon::start_with(
        &env.runtime,
        &etcd,
        "h1",
        &["--api-tcp", &tcp, "--api-token-file", &tf],
    );
    wait("the agent's registration", Duration::from_secs(20), || {
        rt.block_on(store.get(&keys::host_alive("h1")))
            .unwrap()
            .is_some()
    });
    // The TCP API is in the registration, for operators and the controller.
    let alive = rt
        .block_on(store.get(&keys::host_alive("h1")))
        .unwrap()
        .unwrap();
    assert_eq!(
        json(std::str::from_utf8(&alive.value).unwrap())["api"],
        tcp.as_str()
    );

    let spec = VmSpec::parse(br#"{"vcpus":1,"memory_mib":128}"#).unwrap();
    rt.block_on(store.commit(Txn::new().put(keys::vm_spec("c1"), spec.to_json())))
        .unwrap();
    rt.block_on(runtoken::place(&store, "c1", "h1", Origin::Boot))
        .unwrap();
    runs_in(&env.runtime, "c1");

    // The Unix socket (the default of `ray node`) needs no token.
    let host = json(&env.ray_ok(&["node", "status", "h1", "-o", "json"]));
    assert_eq!(host["host"], "h1", "{host}");
    assert_eq!(host["lease"]["state"], "fresh", "{host}");
    assert_eq!(host["vms"], 1, "{host}");
    assert!(host["inventory"]["cpus"].as_u64().unwrap() >= 1, "{host}");
    assert!(host["health"]["kvm"].as_bool().unwrap(), "{host}");
    let table = env.ray_ok(&["node", "status", "h1"]);
    assert!(table.contains("lease:   fresh"), "{table}");

    // Over TCP with the token: this host's VMs with their epoch, state and pid.
    let agent = format!("http://{tcp}");
    let vms = json(&env.ray_ok(&[
        "node",
        "vms",
        "h1",
        "--agent",
        &agent,
        "--token-file",
        &tf,
        "-o",
        "json",
    ]));
    let pid: u64 = std::fs::read_to_string(env.runtime.join("vms/c1/vmm.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    assert_eq!(
        (
            &vms[0]["id"],
            &vms[0]["epoch"],
            &vms[0]["state"],
            &vms[0]["pid"]
        ),
        (&"c1".into(), &1.into(), &"running".into(), &pid.into()),
        "{vms}"
    );
    let yaml = env.ray_ok(&[
        "node",
        "vms",
        "h1",
        "--agent",
        &agent,
        "--token-file",
        &tf,
        "-o",
        "yaml",
    ]);
    assert!(yaml.contains("id: c1"), "{yaml}");

    // Nothing without the token on TCP, nor with another one.
    let (status, body) = http(&tcp, "GET", "/host", None, "");
    assert_eq!(
        (status, &body["code"]),
        (401, &"unauthorized".into()),
        "{body}"
    );
    let (status, body) = http(&tcp, "GET", "/vms", Some("not-the-token-0123456789"), "");
    assert_eq!(
        (status, &body["code"]),
        (401, &"unauthorized".into()),
        "{body}"
    );
    let (status, body) = http(&tcp, "POST", "/vms/c1/pause", None, "");
    assert_eq!(status, 401, "{body}");
    // The refused pause did nothing.
    let info: ray_api::vmm::VmInfo =
        ray::client::VmmClient::new(&env.runtime.join("vms/c1/api.sock"))
            .call("GET", "/vm", None)
            .unwrap();
    assert_eq!(info.state, ray_api::vmm::VmStateName::Running);
    let out = env.ray(&["node", "vms", "h1", "--agent", &agent]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--token-file"),
        "{out:?}"
    );
    let out = env.ray(&["node", "status", "h2"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("serves host h1, not h2"),
        "{out:?}"
    );

    // Malformed and unknown: named.
    let (status, body) = http(&tcp, "GET", "/vms/nope", Some(token), "");
    assert_eq!(status, 404, "{body}");
    assert!(body["message"].as_str().unwrap().contains("nope"), "{body}");
    let (status, body) = http(
        &tcp,
        "POST",
        "/vms/c1/stop",
        Some(token),
        r#"{"force":true}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("`force`"),
        "{body}"
    );

    // Pause and resume through the API: the guest's heartbeat stops, then moves again.
    let (status, body) = http(&tcp, "POST", "/vms/c1/pause", Some(token), "");
    assert_eq!((status, &body["state"]), (200, &"paused".into()), "{body}");
    let frozen = heartbeat(&env.runtime, "c1");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(heartbeat(&env.runtime, "c1"), frozen, "paused");
    let (status, body) = http(&tcp, "POST", "/vms/c1/pause", Some(token), "");
    assert_eq!(
        (status, &body["code"]),
        (409, &"wrong_state".into()),
        "{body}"
    );
    let (status, body) = http(&tcp, "POST", "/vms/c1/resume", Some(token), "");
    assert_eq!((status, &body["state"]), (200, &"running".into()), "{body}");
    runs_in(&env.runtime, "c1");

    // The served document is the committed one.
    let (status, doc) = http(&tcp, "GET", "/openapi.json", Some(token), "");
    assert_eq!(status, 200);
    let committed: serde_json::Value = json(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi/agent.json"),
        )
        .unwrap(),
    );
    assert_eq!(doc, committed);
}

#[test]
fn one_host_runs_controller_and_agent_on_the_embedded_store_with_no_set_up() {
    let env = Env::new("cluster-single");
    let _reap = ReapVmms(vec![env.runtime.clone()]);
    let ctl_log = env.runtime.join("controller.log");
    // No store flags: the controller owns <runtime-dir>/cluster/store.redb and serves it.
    let mut controller = Daemon(spawn_ray(&env.runtime, &ctl_log, &["controller"]));
    let socket = env.runtime.join("cluster/store.sock");
    wait("the store socket", Duration::from_secs(20), || {
        socket.exists()
    });
    let _agent = Daemon(spawn_ray(
        &env.runtime,
        &env.runtime.join("agent.log"),
        &["agent", "--host", "solo-host"],
    ));
    wait("the host Ready", Duration::from_secs(30), || {
        json(&env.ray_ok(&["cluster", "status", "--json"]))["hosts"]["Ready"] == 1
    });
    env.ray_ok(&["cluster", "vm", "create", "solo", "--memory-mib", "128"]);
    wait("solo placed", Duration::from_secs(30), || {
        json(&env.ray_ok(&["cluster", "vms", "--json"]))[0]["host"] == "solo-host"
    });
    runs_in(&env.runtime, "solo");
    let nodes = json(&env.ray_ok(&["cluster", "nodes", "--json"]));
    assert_eq!(nodes[0]["host"], "solo-host", "{nodes}");

    // The controller restarts (kill -9: redb recovers its file): the VM is still the
    // cluster's, on the same host at the same epoch, and never stopped running.
    controller.kill9();
    let _controller = Daemon(spawn_ray(&env.runtime, &ctl_log, &["controller"]));
    wait("the store again", Duration::from_secs(30), || {
        let out = env.ray(&["cluster", "vms", "--json"]);
        out.status.success() && {
            let vms = json(&String::from_utf8_lossy(&out.stdout));
            vms[0]["vm"] == "solo" && vms[0]["host"] == "solo-host" && vms[0]["epoch"] == 1
        }
    });
    runs_in(&env.runtime, "solo");
    // The agent kept its lease through the restart and still answers for its host.
    wait("the host Ready again", Duration::from_secs(30), || {
        json(&env.ray_ok(&["cluster", "status", "--json"]))["hosts"]["Ready"] == 1
    });
    let explain = env.ray_ok(&["cluster", "explain", "solo"]);
    assert!(
        explain.contains("runs on host solo-host (run token epoch 1)"),
        "{explain}"
    );
    // A second controller on the same store directory is refused, saying why.
    let out = env.ray(&["controller"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another `ray controller`"),
        "{out:?}"
    );
}
