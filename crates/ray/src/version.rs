//! `ray version`: this binary's version and, with `--vm`, the version of a VM's VMM.
use std::path::Path;

use clap::Args;
use ray_api::vmm::VersionInfo;
use serde::Serialize;

use ray::output::{print_structured, OutputArgs};

#[derive(Args)]
pub struct VersionArgs {
    /// Also ask this VM's VMM for its version (it may be older than this binary).
    #[arg(long, value_name = "ID")]
    pub vm: Option<String>,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Serialize)]
struct Versions {
    client: VersionInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    vmm: Option<VersionInfo>,
}

pub fn run(a: &VersionArgs, runtime: &Path) -> anyhow::Result<()> {
    let vmm = match &a.vm {
        Some(id) => {
            Some(crate::vm::client(runtime, id)?.call::<VersionInfo>("GET", "/version", None)?)
        }
        None => None,
    };
    let v = Versions {
        client: VersionInfo::current(),
        vmm,
    };
    if print_structured(&v, a.out.format())? {
        return Ok(());
    }
    let line = |who: &str, v: &VersionInfo| {
        println!(
            "{who:<7} ray {} (API {}, {})",
            v.version, v.api_version, v.platform
        )
    };
    line("client", &v.client);
    if let Some(s) = &v.vmm {
        line("vmm", s);
    }
    Ok(())
}
