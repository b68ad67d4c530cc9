//! The cluster agent on real parts: a real etcd (started here, on 127.0.0.1), the real
//! `ray agent`, real VMMs running rayvisor's guest; the guest's heartbeat proves where a
//! VM runs.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ray_cluster::keys;
use ray_cluster::runtoken::{self, Origin};
use ray_cluster::spec::VmSpec;
use ray_cluster::store::{EtcdStore, Store, Txn};
use ray_cluster::testing::Etcd;
use ray_e2e::{guest_bin, ray_bin, Env};

/// A `ray agent` process, killed (-9) when dropped.
struct AgentProcess(Child);

impl AgentProcess {
    fn start(env: &Env, etcd: &Etcd, host: &str) -> AgentProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(env.runtime.join("agent.log"))
            .unwrap();
        let child = Command::new(ray_bin())
            .args([
                "agent",
                "--host",
                host,
                "--etcd",
                &etcd.endpoints().join(","),
            ])
            .env("RAY_RUNTIME_DIR", &env.runtime)
            .env("RAY_GUEST", guest_bin())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start ray agent");
        AgentProcess(child)
    }

    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
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
    let mut agent = AgentProcess::start(&env, &etcd, "h1");
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
    wait("the VMM of c1", Duration::from_secs(30), || {
        env.runtime.join("vms/c1/cluster.json").is_file()
    });
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
    let _agent = AgentProcess::start(&env, &etcd, "h1");
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
