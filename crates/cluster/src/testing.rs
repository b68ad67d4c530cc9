//! A real etcd for tests: Debian's `etcd` binary on 127.0.0.1, random free ports, a
//! temporary data directory, killed and removed on drop; one member, or a cluster of
//! several on loopback ([`EtcdCluster`]) for losing its leader.
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd member started by a test.
pub struct Etcd {
    child: Child,
    dir: PathBuf,
    client_url: String,
}

/// A port free right now on 127.0.0.1 (the OS picks it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind a port on 127.0.0.1")
}

impl Etcd {
    /// Starts etcd on `ip` (random ports) inside network namespace `netns` (`ip netns
    /// exec`) if given, without waiting for it: a test in another namespace cannot ask it
    /// whether it is up; its clients retry.
    pub fn spawn(name: &str, ip: &str, netns: Option<&str>) -> Etcd {
        let dir = std::env::temp_dir().join(format!("ray-etcd-{name}-{}", std::process::id()));
        let client_url = format!("http://{ip}:{}", free_port());
        let peer_url = format!("http://{ip}:{}", free_port());
        let cluster = format!("{name}={peer_url}");
        // Healthy in ~0.15 s instead of ~1 s.
        let fast = ["--election-timeout", "100", "--heartbeat-interval", "10"];
        Etcd::member(name, dir, client_url, &peer_url, &cluster, &fast, netns)
    }

    /// Starts one member `name` in `dir` (emptied first) of the cluster `cluster`
    /// (`name=peer-url,...`).
    fn member(
        name: &str,
        dir: PathBuf,
        client_url: String,
        peer_url: &str,
        cluster: &str,
        extra: &[&str],
        netns: Option<&str>,
    ) -> Etcd {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cannot create the etcd data directory");
        let log = std::fs::File::create(dir.join("etcd.log")).expect("cannot create etcd.log");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        let child = cmd
            .arg("--name")
            .arg(name)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", peer_url])
            .args(["--initial-advertise-peer-urls", peer_url])
            .args(["--initial-cluster", cluster])
            .args(["--initial-cluster-state", "new"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cannot share etcd.log"))
            .stderr(log)
            .spawn()
            .expect("cannot start etcd (Debian package etcd-server; scripts/setup installs it)");
        Etcd {
            child,
            dir,
            client_url,
        }
    }

    /// Starts etcd and waits until it answers (panics, with its log, if it does not within
    /// 20 s). `name` tells concurrent tests' data directories apart.
    pub async fn start(name: &str) -> Etcd {
        let etcd = Etcd::spawn(name, "127.0.0.1", None);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([&etcd.client_url], None).await {
                if c.status().await.is_ok() {
                    return etcd;
                }
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default();
                panic!("etcd did not answer within 20 s; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the process (SIGSTOP): it keeps its sockets but answers nothing.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen etcd run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot send {sig} to etcd (pid {})", self.child.id());
    }

    /// Its client URL, for [`crate::store::EtcdStore::connect`].
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.client_url.clone()]
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Several etcd members on 127.0.0.1 forming one cluster, their data under a directory
/// the test chooses (removed on drop), each killable on its own.
pub struct EtcdCluster {
    members: Vec<Option<Etcd>>,
    urls: Vec<String>,
    dir: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` members under `dir` and waits until the cluster has a leader (panics,
    /// with the members' logs, if not within 30 s). etcd's default election timing (1 s,
    /// 100 ms heartbeats): a shorter one flaps on a loaded machine.
    pub async fn start(name: &str, n: usize, dir: &std::path::Path) -> EtcdCluster {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let names: Vec<String> = (0..n).map(|i| format!("{name}-{i}")).collect();
        let cluster = names
            .iter()
            .zip(&ports)
            .map(|(m, (_, peer))| format!("{m}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = ["--initial-cluster-token", name];
        let members = names
            .iter()
            .zip(&ports)
            .map(|(m, (client, peer))| {
                Some(Etcd::member(
                    m,
                    dir.join(m),
                    format!("http://127.0.0.1:{client}"),
                    &format!("http://127.0.0.1:{peer}"),
                    &cluster,
                    &token,
                    None,
                ))
            })
            .collect();
        let urls = ports
            .iter()
            .map(|(client, _)| format!("http://127.0.0.1:{client}"))
            .collect();
        let c = EtcdCluster {
            members,
            urls,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.leader().await.is_none() {
            if Instant::now() > deadline {
                let logs: Vec<String> = c
                    .members
                    .iter()
                    .flatten()
                    .map(|m| std::fs::read_to_string(m.dir.join("etcd.log")).unwrap_or_default())
                    .collect();
                panic!(
                    "the etcd cluster has no leader after 30 s; logs:\n{}",
                    logs.join("\n---\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c
    }

    /// Every member's client URL (the killed ones too: clients must cope).
    pub fn endpoints(&self) -> Vec<String> {
        self.urls.clone()
    }

    /// The index of the member that leads now, as the live members agree on it.
    pub async fn leader(&self) -> Option<usize> {
        let mut ids = Vec::new();
        let mut leader = None;
        for m in &self.members {
            let Some(m) = m else {
                ids.push(None);
                continue;
            };
            let status = match etcd_client::Client::connect([&m.client_url], None).await {
                Ok(mut c) => tokio::time::timeout(Duration::from_secs(2), c.status()).await,
                Err(_) => {
                    ids.push(None);
                    continue;
                }
            };
            let Ok(Ok(st)) = status else {
                ids.push(None);
                continue;
            };
            ids.push(st.header().map(|h| h.member_id()));
            match leader {
                None => leader = Some(st.leader()),
                Some(l) if l != st.leader() => return None,
                Some(_) => {}
            }
        }
        let leader = leader.filter(|&l| l != 0)?;
        ids.iter().position(|id| *id == Some(leader))
    }

    /// Kills member `i` (SIGKILL) and leaves its data.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut m) = self.members[i].take() {
            let _ = m.child.kill();
            let _ = m.child.wait();
            // Its data stays until the cluster is dropped.
            m.dir = PathBuf::new();
        }
    }

    /// How many members are still running.
    pub fn live(&self) -> usize {
        self.members.iter().flatten().count()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.members.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A new, empty redb store in a fresh temporary directory named after `name` (and this
/// process); returns the store and the directory, for the test to remove at the end.
pub fn fresh_redb(name: &str) -> (crate::store::RedbStore, PathBuf) {
    let dir = std::env::temp_dir().join(format!("ray-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = crate::store::RedbStore::open(&dir.join("s.redb")).unwrap();
    (store, dir)
}
