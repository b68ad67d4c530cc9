//! The end-to-end test harness: boots VMs with the real `ray` binary on real KVM and
//! drives rayvisor's own guest through its serial shell.
//!
//! Every test gets its own runtime directory. VMs are stopped (and their VMM processes
//! killed) when the [`Vm`] handle is dropped, so a failing test leaves nothing running.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ray::client::VmmClient;
use ray_api::vmm::{ConsoleInput, ConsoleTail, VmInfo, VmStateName};

/// The `ray` binary next to the test executable (target/<profile>/ray).
pub fn ray_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let bin = dir.join("ray");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace` first",
        bin.display()
    );
    bin
}

/// `$RAY_JAIL` for the `ray` processes a test starts: `$RAY_E2E_JAIL` (`0` or `1`: every
/// VM unjailed or jailed), else empty: ray's default (jailed as root).
pub fn jail_setting() -> String {
    std::env::var("RAY_E2E_JAIL").unwrap_or_default()
}

/// rayvisor's guest kernel next to it.
pub fn guest_bin() -> PathBuf {
    let bin = ray_bin().with_file_name("rayvisor-guest");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace` first",
        bin.display()
    );
    bin
}

/// VMs spin a host CPU each; tests that boot them run one at a time on small machines.
static SERIAL: Mutex<()> = Mutex::new(());

/// A per-test runtime directory, removed at the end.
pub struct Env {
    pub runtime: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

impl Env {
    pub fn new(name: &str) -> Env {
        let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let runtime = std::env::temp_dir().join(format!("ray-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&runtime);
        std::fs::create_dir_all(&runtime).unwrap();
        Env {
            runtime,
            _serial: guard,
        }
    }

    /// Runs `ray <args>` with this runtime directory. VMs run as ray's default has them
    /// (jailed as root), unless a test passes `--no-jail` (saying why) or
    /// `$RAY_E2E_JAIL=0|1` turns the jail off or on for every VM (`$RAY_JAIL`).
    pub fn ray(&self, args: &[&str]) -> Output {
        self.ray_with(args, &[])
    }

    /// Runs `ray <args>`, asserts success and returns stdout.
    pub fn ray_ok(&self, args: &[&str]) -> String {
        succeeded(self.ray(args), &format!("ray {args:?}"))
    }

    /// [`Env::ray`] with more environment variables (for `ray` and any VMM it starts).
    pub fn ray_with(&self, args: &[&str], vars: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(ray_bin());
        cmd.args(args)
            .env("RAY_RUNTIME_DIR", &self.runtime)
            .env("RAY_GUEST", guest_bin());
        cmd.env("RAY_JAIL", jail_setting());
        cmd.envs(vars.iter().copied())
            .output()
            .expect("cannot run ray")
    }

    /// A handle on a VM started by other means (a restore), by id and VMM pid.
    pub fn attach(&self, id: &str, pid: u32) -> Vm {
        let dir = self.runtime.join("vms").join(id);
        Vm {
            id: id.to_string(),
            pid,
            client: VmmClient::new(&dir.join("api.sock")),
            dir,
            seen: 0,
        }
    }

    /// Boots rayvisor's guest detached with extra `ray vm run` arguments.
    pub fn boot(&self, extra: &[&str]) -> Vm {
        let mut args = vec!["vm", "run", "--detach", "--json"];
        args.extend_from_slice(extra);
        let out = self.ray_ok(&args);
        let info: VmInfo = serde_json::from_str(&out).expect("vm run --json prints VmInfo");
        let dir = self.runtime.join("vms").join(&info.id);
        Vm {
            id: info.id.clone(),
            pid: info.pid,
            client: VmmClient::new(&dir.join("api.sock")),
            dir,
            seen: 0,
        }
    }
}

impl Env {
    /// Writes a pre-shared migration key into the runtime directory; returns its path.
    pub fn key_file(&self, name: &str, secret: &str) -> String {
        let path = self.runtime.join(name);
        std::fs::write(&path, secret).unwrap();
        path.display().to_string()
    }

    /// Pauses `vm`, snapshots it to `<runtime>/<name>`, stops it and restores the snapshot
    /// as VM `id`, which must come back running.
    pub fn snapshot_and_restore(&self, vm: &Vm, name: &str, id: &str) -> Vm {
        self.snapshot_and_restore_with(vm, name, id, &[])
    }

    /// [`Env::snapshot_and_restore`] with more `ray snapshot restore` arguments.
    pub fn snapshot_and_restore_with(&self, vm: &Vm, name: &str, id: &str, extra: &[&str]) -> Vm {
        self.ray_ok(&["vm", "pause", &vm.id]);
        let path = self.runtime.join(name);
        let path = path.to_str().unwrap();
        self.ray_ok(&["snapshot", "create", &vm.id, path]);
        self.ray_ok(&["vm", "stop", &vm.id, "--timeout-ms", "0"]);
        self.restore_with(path, id, extra)
    }

    /// `ray snapshot restore PATH --id ID --detach`; the VM must come back running.
    pub fn restore(&self, path: &str, id: &str) -> Vm {
        self.restore_with(path, id, &[])
    }

    /// [`Env::restore`] with more `ray snapshot restore` arguments.
    pub fn restore_with(&self, path: &str, id: &str, extra: &[&str]) -> Vm {
        let mut args = vec![
            "snapshot", "restore", path, "--id", id, "--detach", "--json",
        ];
        args.extend_from_slice(extra);
        let out = self.ray_ok(&args);
        let info: VmInfo = serde_json::from_str(&out).unwrap();
        assert_eq!(info.state, VmStateName::Running, "{id} after restore");
        self.attach(id, info.pid)
    }

    /// Starts a migration target `id` listening on a Unix socket in the runtime directory
    /// (`ray migrate receive`); returns it and its listen address.
    pub fn receive(&self, id: &str, key: &str, extra: &[&str]) -> (Vm, String) {
        let listen = format!("unix:{}", self.runtime.join(format!("{id}.sock")).display());
        (self.receive_on(id, &listen, key, extra), listen)
    }

    /// Starts a migration target `id` waiting on `listen` (more `ray migrate receive`
    /// arguments in `extra`).
    pub fn receive_on(&self, id: &str, listen: &str, key: &str, extra: &[&str]) -> Vm {
        let mut args = vec![
            "migrate",
            "receive",
            "--listen",
            listen,
            "--key-file",
            key,
            "--id",
            id,
            "--json",
        ];
        args.extend_from_slice(extra);
        let info: VmInfo = serde_json::from_str(&self.ray_ok(&args)).unwrap();
        assert_eq!(info.state, VmStateName::MigrationTarget);
        self.attach(id, info.pid)
    }

    /// `ray migrate start` of VM `src` to `listen` with `key`; its output, failed or not.
    pub fn migrate_start(&self, src: &str, listen: &str, key: &str) -> Output {
        self.ray(&[
            "migrate",
            "start",
            src,
            "--to",
            listen,
            "--key-file",
            key,
            "--json",
        ])
    }

    /// Live-migrates `src` to a new VMM `id` on this host over a Unix socket and waits for
    /// the source process to exit.
    pub fn migrate_here(&self, src: &Vm, id: &str) -> Vm {
        self.migrate_here_with(src, id, &[])
    }

    /// [`Env::migrate_here`] with more `ray migrate receive` arguments.
    pub fn migrate_here_with(&self, src: &Vm, id: &str, receive: &[&str]) -> Vm {
        let key = self.key_file(&format!("{id}.key"), "a pre-shared key of some length");
        let (dst, listen) = self.receive(id, &key, receive);
        succeeded(self.migrate_start(&src.id, &listen, &key), "migrate start");
        src.wait_exit(Duration::from_secs(10));
        dst
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.runtime);
    }
}

/// One booted VM.
pub struct Vm {
    pub id: String,
    pub pid: u32,
    pub dir: PathBuf,
    pub client: VmmClient,
    /// Console offset up to which output has been consumed by `expect`.
    seen: u64,
}

impl Vm {
    /// vCPU exits by reason, summed over vCPUs, from `GET /metrics`.
    pub fn exits(&self) -> BTreeMap<String, u64> {
        let a = self.client.raw("GET", "/metrics", None).unwrap();
        let text = String::from_utf8_lossy(&a.body).into_owned();
        let mut by_reason = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| l.starts_with("ray_vcpu_exits_total{"))
        {
            let reason = line
                .split("reason=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or_else(|| panic!("{line}"));
            let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            *by_reason.entry(reason.to_string()).or_default() += n;
        }
        by_reason
    }

    /// All vCPU exits so far, every reason.
    pub fn exits_total(&self) -> u64 {
        self.exits().values().sum()
    }

    pub fn info(&self) -> VmInfo {
        self.client.call("GET", "/vm", None).expect("GET /vm")
    }

    pub fn state(&self) -> VmStateName {
        self.info().state
    }

    pub fn console(&self) -> ConsoleTail {
        self.client
            .call("GET", "/vm/console?bytes=1048576", None)
            .expect("GET /vm/console")
    }

    /// Sends one shell line to the guest.
    pub fn send(&self, line: &str) {
        let body = serde_json::to_vec(&ConsoleInput {
            data: format!("{line}\n"),
        })
        .unwrap();
        let _: serde_json::Value = self
            .client
            .call("POST", "/vm/console", Some(body))
            .expect("POST /vm/console");
    }

    /// Waits for a console line (after what earlier calls consumed) that starts with
    /// `prefix`, and returns it.
    pub fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        self.expect(prefix, timeout, |l| l)
    }

    /// Like [`Vm::expect_line`] for a Linux kernel log: the `[    0.000000] ` timestamp is
    /// stripped before matching and from the returned line.
    pub fn expect_kernel_line(&mut self, prefix: &str, timeout: Duration) -> String {
        self.expect(prefix, timeout, |l| match l.strip_prefix('[') {
            Some(rest) => rest.split_once("] ").map_or(l, |(_, msg)| msg),
            None => l,
        })
    }

    fn expect(&mut self, prefix: &str, timeout: Duration, view: impl Fn(&str) -> &str) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let tail = self.console();
            let start = tail.total_bytes - tail.data.len() as u64;
            let skip = self.seen.saturating_sub(start) as usize;
            let fresh = tail.data.get(skip..).unwrap_or("");
            let mut offset = 0;
            for line in fresh.split_inclusive('\n') {
                offset += line.len();
                if !line.ends_with('\n') {
                    break;
                }
                let shown = view(line.trim_end());
                if shown.starts_with(prefix) {
                    self.seen = start + (skip + offset) as u64;
                    return shown.to_string();
                }
            }
            if Instant::now() >= deadline {
                let last: String = tail
                    .data
                    .chars()
                    .rev()
                    .take(3000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                panic!("no console line starting with {prefix:?} within {timeout:?}; console ends with:\n{last}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends a command and returns the first reply line starting with `prefix`.
    pub fn command(&mut self, line: &str, prefix: &str) -> String {
        self.send(line);
        self.expect_line(prefix, Duration::from_secs(10))
    }

    /// The guest's checksum of `len` bytes of its memory at `addr` (the shell's `sum`).
    pub fn sum(&mut self, addr: u64, len: u64) -> String {
        let line = self.command(&format!("sum {addr:#x} {len}"), "sum ");
        line.split_whitespace()
            .nth(3)
            .unwrap_or_else(|| panic!("{line}"))
            .to_string()
    }

    /// Waits until `f(info)` holds.
    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&VmInfo) -> bool) -> VmInfo {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(info) = self.client.call::<VmInfo>("GET", "/vm", None) {
                if f(&info) {
                    return info;
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the VMM process is still alive.
    pub fn process_alive(&self) -> bool {
        ray::runtime::pid_alive(self.pid)
    }

    /// Waits for the VMM process to exit.
    pub fn wait_exit(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        // A jailed VMM's keeper holds the VM directory's lock until it has cleaned up
        // after the VMM: the VM has ended once both are gone.
        while self.process_alive() || self.dir_locked() {
            assert!(
                Instant::now() < deadline,
                "VMM {} still alive after {timeout:?}",
                self.pid
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Vm {
    /// Whether a process (the VMM, or a jailed VMM's keeper) holds the VM directory's lock.
    fn dir_locked(&self) -> bool {
        use std::os::fd::AsRawFd;
        let Ok(f) = std::fs::File::open(self.dir.join("vmm.lock")) else {
            return false;
        };
        // SAFETY: flock of a file this function opened; the lock goes with it.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.process_alive() {
            // SAFETY: kill(2) of a VMM process this test started.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

/// The real, effective, saved and filesystem uids of process `pid` (`Uid:` in
/// /proc/PID/status): a jailed VMM's are all its own, never 0.
pub fn process_uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap_or_else(|| panic!("no Uid in /proc/{pid}/status"));
    line.split_whitespace()
        .map(|u| u.parse().expect("a uid"))
        .collect()
}

/// The guest memory region a workload line names (`dirty on region=0x...`,
/// `pattern on region=0x...`).
pub fn region_of(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("region=0x"))
        .map(|r| u64::from_str_radix(r, 16).unwrap())
        .unwrap_or_else(|| panic!("no region in {line:?}"))
}

/// The standard output of `out`, after asserting that `what` (named in the failure, with
/// its status and both outputs) succeeded.
pub fn succeeded(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The Python of the test tools' virtual environment (scripts/setup creates it and
/// installs scripts/requirements-test.txt): `$RAY_PYENV/bin/python3`, by default under
/// `${XDG_CACHE_HOME:-~/.cache}/rayvisor/pyenv`.
pub fn python() -> PathBuf {
    let venv = std::env::var_os("RAY_PYENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache")
                });
            cache.join("rayvisor").join("pyenv")
        });
    let py = venv.join("bin").join("python3");
    assert!(
        py.is_file(),
        "{} is missing: run scripts/setup (it installs the Python test tools of scripts/requirements-test.txt)",
        py.display()
    );
    py
}

/// Runs `script` with the test tools' Python and `args`, asserts success and returns its
/// standard output.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("cannot run python");
    succeeded(out, &format!("python {args:?}"))
}

/// A VMM started with `ray vmm` and no configuration (state `created`), serving its API.
pub struct BareVmm {
    pub child: std::process::Child,
    pub client: VmmClient,
    pub dir: PathBuf,
}

impl Drop for BareVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Env {
    /// Starts a bare VMM with id `id` and extra `ray vmm` arguments; waits for its API.
    pub fn bare_vmm(&self, id: &str, extra: &[&str]) -> BareVmm {
        let dir = self.runtime.join("vms").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(ray_bin())
            .args(["vmm", "--id", id, "--dir"])
            .arg(&dir)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let client = VmmClient::new(&dir.join("api.sock"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.call::<VmInfo>("GET", "/vm", None).is_err() {
            assert!(Instant::now() < deadline, "bare VMM {id} did not come up");
            std::thread::sleep(Duration::from_millis(5));
        }
        BareVmm { child, client, dir }
    }
}
