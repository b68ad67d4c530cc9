//! `ray web` in a real browser: Debian's chromium driven by playwright-core runs
//! web/tests/browser.mjs against a `ray web` this test starts (login, a VM started from
//! the page, serial and noVNC consoles compared with the screenshot API, a viewer refused
//! by the server, a snapshot, a same-host live migration followed by the progress bar).
//! Page screenshots are saved under target/web-artifacts.
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use ray_e2e::{guest_bin, ray_bin, Env};

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
    let mut child = Command::new(ray_bin())
        .args(["web", "--listen", "127.0.0.1:0", "--tokens"])
        .arg(tokens)
        .env("RAY_RUNTIME_DIR", &env.runtime)
        .env("RAY_GUEST", guest_bin())
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

#[test]
fn the_dashboard_and_consoles_work_in_chromium() {
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
    let env = Env::new("web");
    let tokens = tokens_file(&env);
    let server = start_web(&env, &tokens);
    let artifacts = repo().join("target/web-artifacts");
    let out = Command::new("node")
        .arg(web_dir.join("tests/browser.mjs"))
        .current_dir(&web_dir)
        .env("RAY_WEB_URL", &server.url)
        .env("RAY_WEB_ADMIN", ADMIN)
        .env("RAY_WEB_VIEWER", VIEWER)
        .env("RAY_WEB_ARTIFACTS", &artifacts)
        .output()
        .expect("cannot run node (scripts/setup installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    kill_vmms(&env);
    assert!(
        out.status.success(),
        "the browser test failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("browser test: all passed"), "{stdout}");
    for page in [
        "login",
        "vm-list",
        "vm-detail",
        "serial-console",
        "graphical-console",
        "migration-done",
        "vm-list-phone",
    ] {
        let png = artifacts.join(format!("{page}.png"));
        assert!(png.is_file(), "{} was not saved", png.display());
    }
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
        err.contains("ray web serves only loopback addresses") && err.contains("0.0.0.0:0"),
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

#[test]
fn the_console_resolution_follows_the_browser_window() {
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
    let env = Env::new("web-resize");
    let tokens = tokens_file(&env);
    let server = start_web(&env, &tokens);
    let artifacts = repo().join("target/web-artifacts");
    let out = Command::new("node")
        .arg(web_dir.join("tests/resize.mjs"))
        .current_dir(&web_dir)
        .env("RAY_WEB_URL", &server.url)
        .env("RAY_WEB_ADMIN", ADMIN)
        .env("RAY_WEB_ARTIFACTS", &artifacts)
        .output()
        .expect("cannot run node (scripts/setup installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    kill_vmms(&env);
    assert!(
        out.status.success(),
        "the browser resize test failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("resize test: all passed"), "{stdout}");
    for page in ["console-follows-1024x640", "console-follows-1280x720"] {
        let png = artifacts.join(format!("{page}.png"));
        assert!(png.is_file(), "{} was not saved", png.display());
    }
}
