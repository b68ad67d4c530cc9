//! `ray vm rm` and `ray vm prune`: remove what ended VMs leave in the runtime directory
//! (their logs, audit trail, exit record). A VM whose VMM runs, or is starting, is never
//! removed; the refusal names its state.
use std::path::Path;

use clap::Args;
use ray_api::vmm::VmInfo;
use serde::Serialize;

use ray::client::VmmClient;
use ray::exit::{self, coded, NOT_FOUND};
use ray::output::{print_structured, OutputArgs};
use ray::runtime::{self, Presence};
use ray_vmm::vmlock::VmLock;

use crate::vm::state_name;

#[derive(Args)]
pub struct RmArgs {
    /// Ids of the VMs to remove.
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<String>,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args)]
pub struct PruneArgs {
    /// Only say what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// A VM that was (or would be) removed.
#[derive(Serialize)]
struct Removed {
    id: String,
    /// `terminated`, `error`, ... or `dead` (the VMM is gone without a record).
    state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Whether the VM in `dir` may be removed: its state if so, the refusal if not.
fn removable(id: &str, dir: &Path) -> anyhow::Result<Removed> {
    match runtime::presence(dir) {
        Presence::Ended(r) => Ok(Removed {
            id: id.to_string(),
            state: state_name(r.state),
            reason: r.reason,
        }),
        Presence::Dead { pid } if !pid.is_some_and(runtime::pid_alive) => Ok(Removed {
            id: id.to_string(),
            state: "dead".into(),
            reason: None,
        }),
        Presence::Dead { pid } => Err(coded(
            exit::REFUSED,
            format!(
                "VM '{id}' is starting (VMM pid {}): it can be removed once it has ended",
                pid.map_or("?".into(), |p| p.to_string())
            ),
        )),
        Presence::Live { pid } => {
            let state = VmmClient::new(&dir.join("api.sock"))
                .call::<VmInfo>("GET", "/vm", None)
                .map_or_else(|_| "unresponsive".to_string(), |i| state_name(i.state));
            Err(coded(
                exit::REFUSED,
                format!("VM '{id}' is {state} (VMM pid {pid}): stop it first (`ray vm stop {id}`)"),
            ))
        }
    }
}

/// Removes the VM in `dir` if it has ended (with `dry_run`, only says it would), holding
/// the directory's lock meanwhile: no VMM can start there while it goes, and one that holds
/// the lock (running, or just being started) is refused, naming it.
fn remove_ended(id: &str, dir: &Path, dry_run: bool) -> anyhow::Result<Removed> {
    let _lock = match VmLock::acquire(dir, id) {
        Ok(lock) => lock,
        Err(e) => {
            return Err(removable(id, dir)
                .err()
                .unwrap_or_else(|| coded(exit::REFUSED, e.to_string())))
        }
    };
    let r = removable(id, dir)?;
    if !dry_run {
        std::fs::remove_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot remove {}: {e}", dir.display()))?;
    }
    Ok(r)
}

fn print(removed: &[Removed], out: &OutputArgs, verb: &str) -> anyhow::Result<()> {
    if print_structured(&removed, out.format())? {
        return Ok(());
    }
    for r in removed {
        match &r.reason {
            Some(why) => println!("{verb} {} ({}: {why})", r.id, r.state),
            None => println!("{verb} {} ({})", r.id, r.state),
        }
    }
    Ok(())
}

/// `ray vm rm`: removes each VM that has ended; the first refusal is the command's error
/// (the others are still removed).
pub fn rm(runtime: &Path, a: &RmArgs) -> anyhow::Result<()> {
    let mut removed = Vec::new();
    let mut first_error = None;
    for id in &a.ids {
        let outcome = runtime::check_id(id)
            .map_err(|e| coded(exit::INVALID, e))
            .and_then(|()| {
                let dir = runtime::vm_dir(runtime, id);
                if !dir.is_dir() {
                    return Err(coded(
                        NOT_FOUND,
                        format!("no VM '{id}' in {}", runtime.display()),
                    ));
                }
                remove_ended(id, &dir, false)
            });
        match outcome {
            Ok(r) => removed.push(r),
            Err(e) if first_error.is_none() => first_error = Some(e),
            Err(e) => eprintln!("ray: {e:#}"),
        }
    }
    print(&removed, &a.out, "removed")?;
    first_error.map_or(Ok(()), Err)
}

/// `ray vm prune`: removes every VM that has ended.
pub fn prune(runtime: &Path, a: &PruneArgs) -> anyhow::Result<()> {
    let mut removed = Vec::new();
    for id in runtime::list_ids(runtime) {
        let dir = runtime::vm_dir(runtime, &id);
        // Live and starting VMs are left alone; a directory that cannot be removed is said.
        match remove_ended(&id, &dir, a.dry_run) {
            Ok(r) => removed.push(r),
            Err(e) if exit::code_of(&e) == exit::REFUSED => {}
            Err(e) => eprintln!("ray: {e:#}"),
        }
    }
    print(
        &removed,
        &a.out,
        if a.dry_run { "would remove" } else { "removed" },
    )
}
