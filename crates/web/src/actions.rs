//! Actions that take more than one API call or start a VMM: create a VM, snapshot into
//! the web server's store and restore from it, and live-migrate to a new VMM on this
//! host. New VMMs are started by running this same `ray` binary, so the web server holds
//! no start-up logic of its own.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};

use crate::api::{act, parse_body, relay, Refusal, Reply, Web};
use crate::{vmm, Presence, Role};

/// A name the web server puts into a path or passes to `ray`: 1-64 letters, digits, '-',
/// '_' or '.', not starting with '-' or '.' (as VM ids are).
fn check_name(what: &str, name: &str) -> Result<(), Refusal> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Refusal::invalid(format!(
            "{what} '{name}' is not valid: use 1-64 letters, digits, '-', '_' or '.', not starting with '-' or '.'"
        )))
    }
}

/// Runs `ray ARGS --json` against the web server's runtime directory and decodes the
/// `VmInfo` it prints; its error output becomes the refusal.
async fn run_ray(web: &Web, args: &[String]) -> Result<ray_api::vmm::VmInfo, Refusal> {
    // std's process on a blocking thread, not tokio's: tokio's process support brings a
    // signal driver into every runtime of the binary, including the VMM's API thread,
    // whose seccomp filter has no room for the socket pair that driver opens.
    let mut cmd = std::process::Command::new(&web.opts.ray_exe);
    cmd.args(args)
        .arg("--json")
        .env("RAY_RUNTIME_DIR", &web.opts.runtime_dir)
        .stdin(std::process::Stdio::null());
    let cannot_run = |e: &dyn std::fmt::Display| {
        Refusal::failed(format!("cannot run {}: {e}", web.opts.ray_exe.display()))
    };
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(|e| cannot_run(&e))?
        .map_err(|e| cannot_run(&e))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim().trim_start_matches("ray: ");
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "refused",
            format!("ray {} refused: {err}", args.join(" ")),
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| Refusal::failed(format!("ray {} printed no VM: {e}", args.join(" "))))
}

/// `POST /api/vms` body: what `ray vm run` takes, all optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    id: Option<String>,
    vcpus: Option<u8>,
    /// `512M`, `1G`, ...
    memory: Option<String>,
    /// `emulated[,width=W][,height=H][,displays=N]`
    gpu: Option<String>,
}

/// Creates and boots a VM with rayvisor's guest (`ray vm run --detach`); admin.
pub async fn create(State(web): State<Arc<Web>>, h: HeaderMap, body: Bytes) -> Reply {
    let user = web.user(&h, Role::Admin)?;
    let c: Create = parse_body("POST /api/vms", &body)?;
    let mut args: Vec<String> = vec!["vm".into(), "run".into(), "--detach".into()];
    if let Some(id) = &c.id {
        check_name("VM id", id)?;
        args.extend(["--id".into(), id.clone()]);
    }
    if let Some(n) = c.vcpus {
        if n == 0 || n > 64 {
            return Err(Refusal::invalid(format!("vcpus is 1 to 64, got {n}")));
        }
        args.extend(["--vcpus".into(), n.to_string()]);
    }
    if let Some(m) = &c.memory {
        let digits = m.trim_end_matches(['M', 'G']);
        if digits.is_empty()
            || digits.len() == m.len()
            || !digits.chars().all(|c| c.is_ascii_digit())
        {
            return Err(Refusal::invalid(format!(
                "memory '{m}' is not a size like 128M or 1G"
            )));
        }
        args.extend(["--memory".into(), m.clone()]);
    }
    if let Some(g) = &c.gpu {
        ray_api::gpu::GpuConfig::parse(g).map_err(|e| Refusal::invalid(format!("gpu: {e}")))?;
        args.extend(["--gpu".into(), g.clone()]);
    }
    tracing::info!(user = user.name, ?args, "ray web: create");
    let info = run_ray(&web, &args).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// The snapshot store of VM `id` in the web server's state directory.
fn store(web: &Web, id: &str) -> PathBuf {
    web.opts.state_dir.join("snapshots").join(id)
}

/// The snapshots the web server took of VM `id` (an empty list before the first). Read
/// here, not by the VMM: a jailed VMM cannot see the web server's store.
pub async fn snapshots(State(web): State<Arc<Web>>, h: HeaderMap, Path(id): Path<String>) -> Reply {
    web.user(&h, Role::Viewer)?;
    web.vm(&id)?;
    let store = store(&web, &id);
    if !store.is_dir() {
        return Ok(Json(serde_json::json!({
            "store": store.display().to_string(), "snapshots": [], "broken": []
        }))
        .into_response());
    }
    let list = tokio::task::spawn_blocking(move || ray_vmm::snapshot::list(&store))
        .await
        .map_err(|e| Refusal::failed(format!("the snapshot list did not finish: {e}")))?
        .map_err(|e| Refusal::failed(format!("cannot list VM '{id}''s snapshots: {e}")))?;
    Ok(Json(list).into_response())
}

/// A failed hand-over to a jailed VMM as a refusal of its kind.
fn hand_over_refusal(e: ray_vmm::hand_over::HandOverError) -> Refusal {
    use ray_vmm::hand_over::Failure;
    match e.failure {
        Failure::Invalid => Refusal::invalid(e.message),
        Failure::Unreachable => Refusal::new(StatusCode::BAD_GATEWAY, "unreachable", e.message),
        Failure::Refused => Refusal::new(StatusCode::CONFLICT, "refused", e.message),
        Failure::Failed => Refusal::failed(e.message),
    }
}

/// Runs a blocking hand-over off the server's threads.
async fn hand_over<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, ray_vmm::hand_over::HandOverError> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Refusal::failed(format!("handing {what} to the VMM did not finish: {e}")))?
        .map_err(hand_over_refusal)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotName {
    name: String,
}

/// Takes a full snapshot named `name` into the VM's store, pausing a running VM for it;
/// operator.
pub async fn snapshot(
    State(web): State<Arc<Web>>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply {
    web.user(&h, Role::Operator)?;
    let s: SnapshotName = parse_body("POST snapshot", &body)?;
    check_name("snapshot name", &s.name)?;
    let vm = web.live_vm(&id)?;
    let store = store(&web, &id);
    std::fs::create_dir_all(&store).map_err(|e| {
        Refusal::failed(format!("cannot create the store {}: {e}", store.display()))
    })?;
    let path = std::path::absolute(store.join(&s.name)).map_err(|e| {
        Refusal::failed(format!("cannot resolve the store {}: {e}", store.display()))
    })?;
    // A jailed VMM is handed the store, which is outside its directory.
    let lent = {
        let (dir, path) = (vm.dir.clone(), path.clone());
        hand_over("the snapshot store", move || {
            ray_vmm::hand_over::snapshot_store(&dir, &path)
        })
        .await?
    };
    let req = ray_api::vmm::SnapshotRequest {
        handoff: lent.as_ref().map(|l| l.token.clone()),
        path: path.display().to_string(),
        pause: true,
        kind: Default::default(),
        compress: false,
        max_snapshots: None,
    };
    let body = serde_json::to_vec(&req).map_err(|e| Refusal::failed(e.to_string()))?;
    let answer = act(
        &web,
        &h,
        &id,
        Role::Operator,
        "PUT",
        "/vm/snapshot",
        Some(body),
    )
    .await;
    if let Some(lent) = lent {
        lent.give_back(&path).map_err(hand_over_refusal)?;
    }
    answer
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Restore {
    name: String,
    /// The restored VM's id (default: a fresh one).
    new_id: Option<String>,
}

/// Restores snapshot `name` of VM `id` as a new VM (`ray snapshot restore --detach`);
/// admin.
pub async fn restore(
    State(web): State<Arc<Web>>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Reply {
    let user = web.user(&h, Role::Admin)?;
    let r: Restore = parse_body("POST restore", &body)?;
    check_name("snapshot name", &r.name)?;
    web.vm(&id)?;
    let path = store(&web, &id).join(&r.name);
    if !path.is_dir() {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("VM '{id}' has no snapshot '{}' in ray web's store", r.name),
        ));
    }
    let mut args: Vec<String> = vec![
        "snapshot".into(),
        "restore".into(),
        path.display().to_string(),
        "--detach".into(),
    ];
    if let Some(n) = &r.new_id {
        check_name("VM id", n)?;
        args.extend(["--id".into(), n.clone()]);
    }
    tracing::info!(
        user = user.name,
        vm = id,
        snapshot = r.name,
        "ray web: restore"
    );
    let info = run_ray(&web, &args).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// A migration the web server started: the target's id and the latest status the source
/// (then, once the source has gone, the target) reported.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationRecord {
    pub target: String,
    /// The latest `MigrationStatus` (JSON as the VMM sent it), once there is one.
    pub status: Option<serde_json::Value>,
    /// The migration ended (completed, failed or cancelled).
    pub done: bool,
    /// The source's guest memory, for a progress bar over the first pass.
    pub memory_bytes: u64,
}

/// The pre-shared key of the migrations the web server starts (same host only), created
/// on first use with mode 0600.
fn key_file(web: &Web) -> Result<PathBuf, Refusal> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = web.opts.state_dir.join("migration.key");
    if path.is_file() {
        return Ok(path);
    }
    let fail = |e: std::io::Error| {
        Refusal::failed(format!("cannot write the key {}: {e}", path.display()))
    };
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(fail)?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(fail)?;
    f.write_all(hex.as_bytes()).map_err(fail)?;
    Ok(path)
}

/// A target id for VM `id` that no VM directory uses yet.
fn target_id(web: &Web, id: &str) -> String {
    let taken: Vec<String> = web.opts.inventory.vms().into_iter().map(|v| v.id).collect();
    let base: String = id.chars().take(56).collect();
    (1..)
        .map(|n| format!("{base}-m{n}"))
        .find(|t| !taken.contains(t))
        .expect("an unbounded range has an unused name")
}

/// Live-migrates VM `id` to a new VMM on this host: starts the target (`ray migrate
/// receive` on a Unix socket), asks the source to migrate (`PUT /vm/migration`), and
/// follows its progress; admin.
pub async fn migrate(State(web): State<Arc<Web>>, h: HeaderMap, Path(id): Path<String>) -> Reply {
    let user = web.user(&h, Role::Admin)?;
    let vm = web.live_vm(&id)?;
    if web
        .migrations
        .lock()
        .map_err(|_| Refusal::failed("poisoned"))?
        .get(&id)
        .is_some_and(|m| !m.done)
    {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "wrong_state",
            format!("VM '{id}' is already migrating"),
        ));
    }
    let source = vm.dir.join("api.sock");
    let info: ray_api::vmm::VmInfo = vmm::get_json(&source, "/vm")
        .await
        .ok_or_else(|| Refusal::failed(format!("VM '{id}' did not describe itself")))?;
    if info.state != ray_api::vmm::VmStateName::Running {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "wrong_state",
            format!("VM '{id}' is {}: only a running VM migrates", info.state),
        ));
    }
    let key = key_file(&web)?;
    let target = target_id(&web, &id);
    let listen = format!(
        "unix:{}",
        web.opts.state_dir.join(format!("{target}.sock")).display()
    );
    tracing::info!(user = user.name, vm = id, target, "ray web: migrate");
    let key_arg = key.display().to_string();
    run_ray(
        &web,
        &[
            "migrate".into(),
            "receive".into(),
            "--listen".into(),
            listen.clone(),
            "--key-file".into(),
            key_arg.clone(),
            "--id".into(),
            target.clone(),
        ],
    )
    .await?;
    // A jailed source is handed the connection to the target, the key file and a
    // migration slot; open until it answered.
    let handed = {
        let (dir, runtime, to) = (vm.dir.clone(), web.opts.runtime_dir.clone(), listen.clone());
        hand_over("the migration", move || {
            ray_vmm::hand_over::migration(&dir, &runtime, &to, &key, None)
        })
        .await
    };
    let answer = match handed {
        Ok(handed) => {
            let mut req = serde_json::json!({ "to": listen, "key_file": key_arg });
            if let Some(h) = &handed {
                req["handoff"] = h.token.clone().into();
            }
            let answer = vmm::call(
                &source,
                "PUT",
                "/vm/migration",
                Some(req.to_string().into_bytes()),
            )
            .await;
            drop(handed);
            answer.map_err(Refusal::from)
        }
        Err(e) => Err(e),
    };
    let answer = match answer {
        Ok(a) if a.ok() => a,
        failed => {
            // The target waits for nobody now.
            if let Ok(t) = web.live_vm(&target) {
                let _ = vmm::call(&t.dir.join("api.sock"), "PUT", "/vm/stop", None).await;
            }
            return failed.map(relay);
        }
    };
    let record = MigrationRecord {
        target: target.clone(),
        status: serde_json::from_slice(&answer.body).ok(),
        done: false,
        memory_bytes: info.config.map_or(0, |c| c.memory_bytes),
    };
    web.migrations
        .lock()
        .map_err(|_| Refusal::failed("poisoned"))?
        .insert(id.clone(), record.clone());
    tokio::spawn(follow(web.clone(), id, source, target));
    Ok(Json(record).into_response())
}

/// How often a migration's progress is read.
const FOLLOW_PERIOD: Duration = Duration::from_millis(200);

/// Follows a migration through `GET /vm/migration` of the source until it ends; once the
/// source VMM has gone (the VM moved), the target's own status closes the record.
async fn follow(web: Arc<Web>, id: String, source: PathBuf, target: String) {
    loop {
        tokio::time::sleep(FOLLOW_PERIOD).await;
        let status = match vmm::get_json::<serde_json::Value>(&source, "/vm/migration").await {
            Some(s) => s,
            None => {
                let dir = web
                    .vm(&target)
                    .ok()
                    .filter(|t| matches!(t.presence, Presence::Live));
                match dir {
                    Some(t) => {
                        match vmm::get_json(&t.dir.join("api.sock"), "/vm/migration").await {
                            Some(s) => s,
                            None => {
                                serde_json::json!({ "state": "failed", "error": "neither end of the migration answers" })
                            }
                        }
                    }
                    None => {
                        serde_json::json!({ "state": "failed", "error": "the source ended and the target is gone" })
                    }
                }
            }
        };
        let done = status
            .get("vm")
            .and_then(|v| v.as_str())
            .is_some_and(|v| v != "migrating")
            || matches!(status.get("state").and_then(|s| s.as_str()), Some("failed"));
        if let Ok(mut m) = web.migrations.lock() {
            if let Some(r) = m.get_mut(&id) {
                r.status = Some(status);
                r.done = done;
            }
        }
        if done {
            return;
        }
    }
}

/// The migration the web server started for VM `id`, else the VMM's own record.
pub async fn migration(State(web): State<Arc<Web>>, h: HeaderMap, Path(id): Path<String>) -> Reply {
    web.user(&h, Role::Viewer)?;
    let record = web
        .migrations
        .lock()
        .map_err(|_| Refusal::failed("poisoned"))?
        .get(&id)
        .cloned();
    match record {
        Some(r) => Ok(Json(r).into_response()),
        None => {
            let vm = web.live_vm(&id)?;
            Ok(relay(
                vmm::call(&vm.dir.join("api.sock"), "GET", "/vm/migration", None).await?,
            ))
        }
    }
}

/// Cancels VM `id`'s migration (`PUT /vm/migration/cancel`); operator.
pub async fn cancel(State(web): State<Arc<Web>>, h: HeaderMap, Path(id): Path<String>) -> Reply {
    act(
        &web,
        &h,
        &id,
        Role::Operator,
        "PUT",
        "/vm/migration/cancel",
        None,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_they_reach_a_path() {
        for ok in ["a", "snap-1", "vm_2.b", &"x".repeat(64)] {
            assert!(check_name("n", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "../x", "a/b", "a b", &"x".repeat(65)] {
            let e = check_name("snapshot name", bad).unwrap_err();
            assert!(
                e.message
                    .starts_with(&format!("snapshot name '{bad}' is not valid")),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn a_failed_hand_over_is_refused_with_the_status_of_its_kind() {
        use ray_vmm::hand_over::{Failure, HandOverError};
        for (failure, status, code) in [
            (Failure::Invalid, StatusCode::BAD_REQUEST, "invalid_request"),
            (Failure::Unreachable, StatusCode::BAD_GATEWAY, "unreachable"),
            (Failure::Refused, StatusCode::CONFLICT, "refused"),
            (Failure::Failed, StatusCode::INTERNAL_SERVER_ERROR, "failed"),
        ] {
            let r = hand_over_refusal(HandOverError {
                failure,
                message: "cannot connect to the target unix:/x".into(),
            });
            assert_eq!((r.status, r.code), (status, code), "{failure:?}");
            assert_eq!(r.message, "cannot connect to the target unix:/x");
        }
    }
}
