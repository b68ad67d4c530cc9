//! `ray web` in a real browser: Debian's chromium driven by playwright-core runs
//! web/tests/browser.mjs against a `ray web` this test starts (login, a VM started from
//! the page, serial and noVNC consoles compared with the screenshot API, a viewer refused
//! by the server, a snapshot, a same-host live migration followed by the progress bar).
//! Page screenshots are saved under target/web-artifacts.
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use ray_e2e::{guest_bin, jail_setting, ray_bin, Env};

const ADMIN: &str = "admin-token-0123456789abcdef";
const VIEWER: &str = "viewer-token-0123456789abcdef";
const CHROMIUM: &str = "/usr/bin/chromium";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_path_buf()
}

/// A `ray web` process, killed when dropped.
struct WebServer {
    child: Child,
    url: String,
}

impl Drop for WebServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tokens_file(env: &Env) -> PathBuf {
    let path = env.runtime.join("tokens.txt");
    std::fs::write(
        &path,
        format!("# role name token\nadmin ada {ADMIN}\nviewer vera {VIEWER}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn start_web(env: &Env, tokens: &Path) -> WebServer {
    start_web_with(env, tokens, &[])
}

fn start_web_with(env: &Env, tokens: &Path, extra: &[&str]) -> WebServer {
    let mut child = Command::new(ray_bin())
        .args(["web", "--listen", "127.0.0.1:0", "--tokens"])
        .arg(tokens)
        .args(extra)
        .env("RAY_RUNTIME_DIR", &env.runtime)
        .env("RAY_GUEST", guest_bin())
        // Inherited by the `ray vm run` (and `ray migrate receive`) it runs.
        .env("RAY_JAIL", jail_setting())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot run ray web");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("ray web: serving ")
        .unwrap_or_else(|| panic!("ray web did not say where it serves: {line:?}"))
        .trim_end_matches('/')
        .to_string();
    WebServer { child, url }
}

/// Kills every VMM the browser test left in the runtime directory.
fn kill_vmms(env: &Env) {
    let Ok(dirs) = std::fs::read_dir(env.runtime.join("vms")) else {
        return;
    };
    for dir in dirs.flatten() {
        let pid = std::fs::read_to_string(dir.path().join("vmm.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            // Dropping the handle kills the VMM if it still runs.
            drop(env.attach(&dir.file_name().to_string_lossy(), pid));
        }
    }
}

/// The npm packages in web/ and Debian's chromium, both required: these tests do not skip.
fn browser_ready() -> PathBuf {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: scripts/setup installs Debian's chromium; this test does not skip"
    );
    let web_dir = repo().join("web");
    assert!(
        web_dir.join("node_modules/playwright-core").is_dir(),
        "{}/node_modules is missing: run scripts/setup (npm ci in web/)",
        web_dir.display()
    );
    web_dir
}

/// Runs the browser script `script` of web/ with the settings `vars`; prints its output.
fn node(web_dir: &Path, script: &str, vars: &[(&str, &OsStr)]) -> std::process::Output {
    let out = Command::new("node")
        .arg(web_dir.join(script))
        .current_dir(web_dir)
        .envs(vars.iter().copied())
        .output()
        .expect("cannot run node (scripts/setup installs it)");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    out
}

/// Asserts that the browser script of `what` succeeded and printed `marker`.
fn passed(out: &std::process::Output, what: &str, marker: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(marker), "{stdout}");
}

/// Asserts that a screenshot of each page was saved as a test artifact.
fn saved(artifacts: &Path, pages: &[&str]) {
    for page in pages {
        let png = artifacts.join(format!("{page}.png"));
        assert!(png.is_file(), "{} was not saved", png.display());
    }
}

#[test]
fn the_dashboard_and_consoles_work_in_chromium() {
    let web_dir = browser_ready();
    let env = Env::new("web");
    let tokens = tokens_file(&env);
    let server = start_web(&env, &tokens);
    let artifacts = repo().join("target/web-artifacts");
    let out = node(
        &web_dir,
        "tests/browser.mjs",
        &[
            ("RAY_WEB_URL", server.url.as_ref()),
            ("RAY_WEB_ADMIN", ADMIN.as_ref()),
            ("RAY_WEB_VIEWER", VIEWER.as_ref()),
            ("RAY_WEB_ARTIFACTS", artifacts.as_ref()),
        ],
    );
    kill_vmms(&env);
    passed(&out, "the browser test", "browser test: all passed");
    saved(
        &artifacts,
        &[
            "login",
            "vm-list",
            "vm-detail",
            "serial-console",
            "graphical-console",
            "migration-done",
            "vm-list-phone",
        ],
    );
}

/// A self-signed certificate for localhost and 127.0.0.1 (openssl, as an operator would
/// make one): the certificate and key paths.
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}-cert.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("cannot run openssl");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// What a plain-HTTP client reads from `addr` after sending a request.
fn plain_http_answer(addr: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut answer = Vec::new();
    // The server closes the connection: read to the end (or to a reset).
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    answer
}

#[test]
fn the_dashboard_and_consoles_work_over_https_in_chromium() {
    let web_dir = browser_ready();
    let env = Env::new("web-tls");
    let tokens = tokens_file(&env);
    let (cert, key) = self_signed(&env.runtime, "web");
    let server = start_web_with(
        &env,
        &tokens,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let addr = server
        .url
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("ray web with TLS serves {}, not https", server.url))
        .to_string();
    // A plain-HTTP request to the TLS port gets no page, and the server keeps serving.
    let answer = plain_http_answer(&addr);
    let text = String::from_utf8_lossy(&answer);
    assert!(
        !text.contains("HTTP/1") && !text.contains("<html") && !text.contains("ray web"),
        "a plain-HTTP request to the TLS port was answered: {text:?}"
    );
    let artifacts = repo().join("target/web-artifacts");
    let out = node(
        &web_dir,
        "tests/tls.mjs",
        &[
            ("RAY_WEB_URL", server.url.as_ref()),
            ("RAY_WEB_ADMIN", ADMIN.as_ref()),
            ("RAY_WEB_ARTIFACTS", artifacts.as_ref()),
        ],
    );
    kill_vmms(&env);
    passed(
        &out,
        "the https browser test",
        "tls browser test: all passed",
    );
    // The H.264 viewer's encode session ended with its WebSocket: its stream file (in the
    // VM's directory, where a jailed VMM may write) is gone.
    let streams = || -> Vec<PathBuf> {
        let vms = std::fs::read_dir(env.runtime.join("vms")).expect("the VMs' directories");
        vms.flatten()
            .filter_map(|vm| std::fs::read_dir(vm.path()).ok())
            .flat_map(|files| files.flatten().map(|f| f.path()))
            .filter(|f| {
                let name = f.file_name().unwrap_or_default().to_string_lossy();
                name.starts_with("h264-") && name.ends_with(".h264")
            })
            .collect()
    };
    wait_for("the H.264 viewer's stream file removed", || {
        streams().is_empty()
    });
    saved(
        &artifacts,
        &["https-vm-list", "https-graphical-console", "h264-viewer"],
    );
}

#[test]
fn ray_web_refuses_plain_http_beyond_loopback_and_bad_tls_files() {
    let env = Env::new("web-tls-refuse");
    let tokens = tokens_file(&env);
    let tokens = tokens.to_str().unwrap();
    let (cert, key) = self_signed(&env.runtime, "a");
    let (_, other_key) = self_signed(&env.runtime, "b");
    let (cert, key, other_key) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        other_key.to_str().unwrap(),
    );
    let refused = |args: &[&str], wants: &[&str]| {
        let mut all = vec!["web", "--tokens", tokens];
        all.extend_from_slice(args);
        let out = env.ray(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "ray {all:?} ran: {err}");
        // Validation comes before anything listens.
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("serving"),
            "ray {all:?} listened before refusing"
        );
        for want in wants {
            assert!(
                err.contains(want),
                "ray {all:?}: {want:?} missing from {err}"
            );
        }
    };
    refused(
        &["--listen", "0.0.0.0:0"],
        &[
            "0.0.0.0:0",
            "not a loopback address",
            "--tls-cert",
            "--tls-key",
        ],
    );
    refused(
        &["--listen", "[::]:0"],
        &["[::]:0", "not a loopback address", "--tls-cert"],
    );
    refused(
        &["--listen", "127.0.0.1:0", "--tls-cert", cert],
        &["--tls-key"],
    );
    refused(
        &["--listen", "127.0.0.1:0", "--tls-key", key],
        &["--tls-cert"],
    );
    refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            key,
            "--tls-key",
            key,
        ],
        &["--tls-cert", key, "no PEM CERTIFICATE"],
    );
    refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert,
            "--tls-key",
            cert,
        ],
        &["--tls-key", cert, "PRIVATE KEY"],
    );
    refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert,
            "--tls-key",
            other_key,
        ],
        &["--tls-key", other_key, "does not go with the certificate"],
    );
    // --cluster with no controller serving the store: refused, saying which.
    refused(
        &["--listen", "127.0.0.1:0", "--cluster"],
        &["cannot reach the cluster store", "ray controller"],
    );
    let missing = env.runtime.join("missing.pem");
    let missing = missing.to_str().unwrap();
    refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            missing,
            "--tls-key",
            key,
        ],
        &["--tls-cert", missing],
    );
}

#[test]
fn ray_web_refuses_non_loopback_addresses_and_open_token_files() {
    let env = Env::new("web-refuse");
    let tokens = tokens_file(&env);
    let out = env.ray(&[
        "web",
        "--listen",
        "0.0.0.0:0",
        "--tokens",
        tokens.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("0.0.0.0:0"),
        "{err}"
    );
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = env.ray(&[
        "web",
        "--listen",
        "127.0.0.1:0",
        "--tokens",
        tokens.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("readable by group or others (mode 640)"),
        "{err}"
    );
}

/// A `ray controller` or `ray agent` of the hosts test, killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn daemon(env: &Env, log: &str, args: &[&str]) -> Daemon {
    let log = std::fs::File::create(env.runtime.join(log)).unwrap();
    Daemon(
        Command::new(ray_bin())
            .args(args)
            .env("RAY_RUNTIME_DIR", &env.runtime)
            .env("RAY_GUEST", guest_bin())
            .env("RAY_JAIL", jail_setting())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start ray"),
    )
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn cluster_json(env: &Env, args: &[&str]) -> serde_json::Value {
    let out = env.ray_ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn the_hosts_page_shows_the_cluster_and_cordons_and_drains_in_chromium() {
    let web_dir = browser_ready();
    let env = Env::new("web-hosts");
    let tokens = tokens_file(&env);
    // Single-host mode: the controller serves its store on <runtime>/cluster/store.sock.
    let _controller = daemon(&env, "controller.log", &["controller"]);
    let socket = env.runtime.join("cluster/store.sock");
    wait_for("the store socket", || socket.exists());
    let _agent = daemon(&env, "agent.log", &["agent", "--host", "web-host"]);
    wait_for("the host Ready", || {
        cluster_json(&env, &["cluster", "status", "--json"])["hosts"]["Ready"] == 1
    });
    let server = start_web_with(&env, &tokens, &["--cluster"]);
    env.ray_ok(&["cluster", "vm", "create", "webclu", "--memory-mib", "128"]);
    let artifacts = repo().join("target/web-artifacts");
    let out = node(
        &web_dir,
        "tests/hosts.mjs",
        &[
            ("RAY_WEB_URL", server.url.as_ref()),
            ("RAY_WEB_ADMIN", ADMIN.as_ref()),
            ("RAY_WEB_VIEWER", VIEWER.as_ref()),
            ("RAY_WEB_ARTIFACTS", artifacts.as_ref()),
            ("RAY_WEB_HOST", "web-host".as_ref()),
            ("RAY_WEB_CLUSTER_VM", "webclu".as_ref()),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // What the page did is what the cluster store holds: the host Ready (uncordoned, its
    // drain aborted), the VM still placed on it.
    let status = cluster_json(&env, &["cluster", "status", "--json"]);
    let vms = cluster_json(&env, &["cluster", "vms", "--json"]);
    drop(server);
    drop(_agent);
    kill_vmms(&env);
    assert!(
        out.status.success(),
        "the hosts browser test failed ({}):\n{stdout}\n{}\ncontroller log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(env.runtime.join("controller.log")).unwrap_or_default()
    );
    assert!(
        stdout.contains("hosts browser test: all passed"),
        "{stdout}"
    );
    assert_eq!(status["hosts"]["Ready"], 1, "{status}");
    assert_eq!(vms[0]["vm"], "webclu", "{vms}");
    assert_eq!(vms[0]["host"], "web-host", "{vms}");
    saved(
        &artifacts,
        &["hosts", "hosts-phone", "hosts-cordoned", "hosts-draining"],
    );
}

/// An agent for host `host` whose VMs live in `<runtime>/<host>`, on the single-host store
/// of the controller in `<runtime>/cluster`.
fn agent_on(env: &Env, host: &str, key: &Path) -> Daemon {
    let dir = env.runtime.join(host);
    std::fs::create_dir_all(&dir).unwrap();
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let store = env.runtime.join("cluster");
    Daemon(
        Command::new(ray_bin())
            .args(["agent", "--host", host, "--store-dir"])
            .arg(&store)
            .arg("--migration-key-file")
            .arg(key)
            .env("RAY_RUNTIME_DIR", &dir)
            .env("RAY_GUEST", guest_bin())
            .env("RAY_JAIL", jail_setting())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start ray agent"),
    )
}

/// Kills the VMMs the agents of the drain test started.
struct ReapHosts(Vec<PathBuf>);

impl Drop for ReapHosts {
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

#[test]
fn the_hosts_page_drains_a_host_to_the_other_in_chromium() {
    let web_dir = browser_ready();
    let env = Env::new("web-drain");
    let tokens = tokens_file(&env);
    let key = env.runtime.join("migration.key");
    std::fs::write(&key, b"0123456789abcdef0123456789abcdef").unwrap();
    let _reap = ReapHosts(vec![env.runtime.join("h1"), env.runtime.join("h2")]);
    let _controller = daemon(&env, "controller.log", &["controller"]);
    let socket = env.runtime.join("cluster/store.sock");
    wait_for("the store socket", || socket.exists());
    let _agents = [agent_on(&env, "h1", &key), agent_on(&env, "h2", &key)];
    wait_for("both hosts Ready", || {
        cluster_json(&env, &["cluster", "status", "--json"])["hosts"]["Ready"] == 2
    });
    let server = start_web_with(&env, &tokens, &["--cluster"]);
    env.ray_ok(&["cluster", "vm", "create", "dr1", "--memory-mib", "128"]);
    // The VM runs on its host (its agent reports it) before the drain.
    let mut from = String::new();
    wait_for("dr1 running on its host", || {
        let nodes = cluster_json(&env, &["cluster", "nodes", "--json"]);
        let on = nodes.as_array().into_iter().flatten().find(|n| {
            n["vms"]
                .as_array()
                .is_some_and(|v| v.iter().any(|x| x == "dr1"))
        });
        if let Some(n) = on {
            from = n["host"].as_str().unwrap_or_default().to_string();
        }
        on.is_some()
    });
    let to = if from == "h1" { "h2" } else { "h1" };
    let artifacts = repo().join("target/web-artifacts");
    let out = node(
        &web_dir,
        "tests/hosts-drain.mjs",
        &[
            ("RAY_WEB_URL", server.url.as_ref()),
            ("RAY_WEB_ADMIN", ADMIN.as_ref()),
            ("RAY_WEB_ARTIFACTS", artifacts.as_ref()),
            ("RAY_WEB_FROM", from.as_ref()),
            ("RAY_WEB_TO", to.as_ref()),
            ("RAY_WEB_CLUSTER_VM", "dr1".as_ref()),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let vms = cluster_json(&env, &["cluster", "vms", "--json"]);
    assert!(
        out.status.success(),
        "the drain browser test failed ({}):\n{stdout}\n{}\ncontroller log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(env.runtime.join("controller.log")).unwrap_or_default()
    );
    assert!(
        stdout.contains("hosts drain browser test: all passed"),
        "{stdout}"
    );
    // The store agrees with the page: the VM's run token names the other host.
    assert_eq!(vms[0]["vm"], "dr1", "{vms}");
    assert_eq!(vms[0]["host"], to, "{vms}");
    assert!(artifacts.join("hosts-drained.png").is_file());
    // ... and the other host's agent reports it running there.
    wait_for("dr1 reported running on the other host", || {
        let nodes = cluster_json(&env, &["cluster", "nodes", "--json"]);
        nodes.as_array().into_iter().flatten().any(|n| {
            n["host"] == to
                && n["vms"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|x| x == "dr1"))
        })
    });
}

#[test]
fn the_console_resolution_follows_the_browser_window() {
    let web_dir = browser_ready();
    let env = Env::new("web-resize");
    let tokens = tokens_file(&env);
    let server = start_web(&env, &tokens);
    let artifacts = repo().join("target/web-artifacts");
    let out = node(
        &web_dir,
        "tests/resize.mjs",
        &[
            ("RAY_WEB_URL", server.url.as_ref()),
            ("RAY_WEB_ADMIN", ADMIN.as_ref()),
            ("RAY_WEB_ARTIFACTS", artifacts.as_ref()),
        ],
    );
    kill_vmms(&env);
    passed(&out, "the browser resize test", "resize test: all passed");
    saved(
        &artifacts,
        &["console-follows-1024x640", "console-follows-1280x720"],
    );
}

#[test]
fn novnc_gets_tight_and_copyrect_pixel_exact_and_h264_at_low_quality() {
    let web_dir = browser_ready();
    let env = Env::new("web-encodings");
    let tokens = tokens_file(&env);
    let server = start_web(&env, &tokens);
    let artifacts = repo().join("target/web-artifacts");
    let out = node(
        &web_dir,
        "tests/encodings.mjs",
        &[
            ("RAY_WEB_URL", server.url.as_ref()),
            ("RAY_WEB_ADMIN", ADMIN.as_ref()),
            ("RAY_WEB_ARTIFACTS", artifacts.as_ref()),
        ],
    );
    if !out.status.success() {
        kill_vmms(&env);
    }
    passed(
        &out,
        "the browser encodings test",
        "encodings test: all passed",
    );
    // What each console's viewer was sent, logged when it left (the browser closed): the
    // first got Tight and CopyRect, the second (quality level 2) H.264.
    let log = env.runtime.join("vms/encvm/vmm.log");
    let line = |encoding: &str| -> Option<String> {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .find(|l| l.contains("VNC viewer's updates") && l.contains(encoding))
            .map(String::from)
    };
    wait_for("the VMM logs what the noVNC viewers were sent", || {
        line("encoding=\"tight\"").is_some() && line("encoding=\"h264\"").is_some()
    });
    kill_vmms(&env);
    let number = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    };
    let tight = line("encoding=\"tight\"").unwrap();
    assert!(
        number(&tight, "copyrect=") >= 2,
        "the scrolls went as CopyRect: {tight}"
    );
    let h264 = line("encoding=\"h264\"").unwrap();
    assert!(number(&h264, "h264_frames=") >= 1, "{h264}");
    saved(&artifacts, &["encodings-console", "encodings-h264-console"]);
}
