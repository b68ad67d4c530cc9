//! A real etcd for tests: Debian's `etcd` binary on 127.0.0.1, random free ports, a
//! temporary data directory, killed and removed on drop.
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
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cannot create the etcd data directory");
        let client_url = format!("http://{ip}:{}", free_port());
        let peer_url = format!("http://{ip}:{}", free_port());
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
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .arg("--initial-cluster")
            .arg(format!("{name}={peer_url}"))
            // Healthy in ~0.15 s instead of ~1 s.
            .args(["--election-timeout", "100", "--heartbeat-interval", "10"])
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
