//! `ray web`: the browser dashboard and consoles (crates/web) for this host's VMs.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use ray::runtime::{self, Presence};

#[derive(Args)]
pub struct WebArgs {
    /// Address to serve on; port 0 picks a free one. Beyond loopback (127.0.0.0/8, [::1])
    /// only with --tls-cert and --tls-key.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Serve HTTPS and WSS only, with this PEM certificate chain (server certificate first).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Who may log in: one `ROLE NAME TOKEN` line per token (ROLE viewer, operator or
    /// admin; TOKEN 16-256 characters), mode 0600.
    #[arg(long, value_name = "FILE")]
    pub tokens: PathBuf,
    /// Where snapshots taken from the page and the migration key are kept (default: `web`
    /// in the runtime directory).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Show the cluster's hosts (state, load, VMs; cordon, uncordon, drain) from the
    /// single-host store `ray controller` serves (see --store-dir); --etcd implies it.
    #[arg(long)]
    pub cluster: bool,
    #[command(flatten)]
    pub store: crate::store_sel::StoreSel,
}

/// The runtime directory's VMs, as `ray vm list` reads them.
struct RuntimeDir(PathBuf);

impl ray_web::Inventory for RuntimeDir {
    fn vms(&self) -> Vec<ray_web::VmEntry> {
        runtime::list_ids(&self.0)
            .into_iter()
            .map(|id| {
                let dir = runtime::vm_dir(&self.0, &id);
                let presence = match runtime::presence(&dir) {
                    Presence::Live { .. } => ray_web::Presence::Live,
                    Presence::Ended(r) => ray_web::Presence::Ended {
                        state: r.state,
                        reason: r.reason,
                    },
                    Presence::Dead { .. } => ray_web::Presence::Dead,
                };
                ray_web::VmEntry { id, dir, presence }
            })
            .collect()
    }
}

pub fn run(args: WebArgs, runtime: &Path) -> anyhow::Result<()> {
    let tokens = ray_web::Tokens::load(&args.tokens)?;
    let opts = ray_web::WebOptions {
        listen: args.listen,
        tokens,
        inventory: Arc::new(RuntimeDir(runtime.to_path_buf())),
        ray_exe: std::env::current_exe().context("cannot find the path of this program")?,
        runtime_dir: runtime.to_path_buf(),
        state_dir: args.state_dir.unwrap_or_else(|| runtime.join("web")),
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(ray_web::TlsFiles { cert, key }),
            _ => None,
        },
        cluster: None,
    };
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let cluster = args.cluster || !args.store.etcd.is_empty() || args.store.store_dir.is_some();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the web server's runtime")?;
    rt.block_on(async move {
        let mut opts = opts;
        if cluster {
            // Checked before anything listens: a store that does not answer is refused.
            let store = args.store.connect().await.context(
                "ray web --cluster: cannot reach the cluster store (is `ray controller` running?)",
            )?;
            opts.cluster = Some(store);
        }
        ray_web::serve(opts, |addr| {
            // Scripts wait for this line to learn the port.
            println!("ray web: serving {scheme}://{addr}/");
        })
        .await?;
        anyhow::Ok(())
    })?;
    Ok(())
}
