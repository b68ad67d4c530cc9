//! Which cluster store a command uses: etcd (`--etcd URL,...`, a cluster of hosts) or, by
//! default, the single-host store that `ray controller` owns (a redb file) and serves on
//! the Unix socket `store.sock` in its store directory (`--store-dir`, default
//! `<runtime-dir>/cluster`).
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;
use clap::Args;
use ray_cluster::store::{socket, AnyStore, EtcdStore, RedbStore, SocketStore};

/// The runtime directory the command line chose (main sets it once).
static RUNTIME: OnceLock<PathBuf> = OnceLock::new();

/// Records the runtime directory, the default store directory's parent.
pub fn set_runtime(dir: &Path) {
    let _ = RUNTIME.set(dir.to_path_buf());
}

/// The runtime directory of this command.
pub fn runtime_dir() -> PathBuf {
    RUNTIME
        .get()
        .cloned()
        .unwrap_or_else(ray::runtime::default_dir)
}

#[derive(Args, Clone, Debug, Default)]
pub struct StoreSel {
    /// etcd endpoints, comma-separated, e.g. http://10.0.0.1:2379 (a cluster of hosts).
    /// Without it: the single-host store of `ray controller` (see --store-dir).
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Single-host mode: the directory of the controller's store (its redb file
    /// `store.redb` and the socket `store.sock` it serves it on). Default:
    /// <runtime-dir>/cluster.
    #[arg(long, value_name = "DIR", conflicts_with = "etcd")]
    pub store_dir: Option<PathBuf>,
}

impl StoreSel {
    /// The single-host store's directory.
    pub fn dir(&self) -> PathBuf {
        self.store_dir
            .clone()
            .unwrap_or_else(|| runtime_dir().join("cluster"))
    }

    /// Connects to etcd, or to the controller's socket.
    pub async fn connect(&self) -> anyhow::Result<AnyStore> {
        if !self.etcd.is_empty() {
            return Ok(AnyStore::Etcd(Box::new(
                EtcdStore::connect(&self.etcd).await?,
            )));
        }
        let path = self.dir().join(socket::SOCKET);
        Ok(AnyStore::Socket(SocketStore::connect(&path).await?))
    }

    /// The controller's own store: etcd, or the redb file it owns, which it then serves
    /// to the host's agent and to `ray cluster` on the socket beside it (until the process
    /// ends). Must run inside a Tokio runtime.
    pub async fn own(&self) -> anyhow::Result<AnyStore> {
        if !self.etcd.is_empty() {
            return Ok(AnyStore::Etcd(Box::new(
                EtcdStore::connect(&self.etcd).await?,
            )));
        }
        let dir = self.dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the store directory {}", dir.display()))?;
        let store = RedbStore::open(&dir.join(socket::FILE)).with_context(|| {
            format!(
                "cannot open the single-host store (is another `ray controller` using {}?)",
                dir.display()
            )
        })?;
        let listener = socket::bind(&dir.join(socket::SOCKET))?;
        tokio::spawn(socket::serve(store.clone(), listener));
        tracing::info!(dir = %dir.display(), "single-host store served");
        Ok(AnyStore::Redb(store))
    }
}
