//! virtio-vsock and `ray vm exec`: guest shell commands over vsock (output and status),
//! a long output that needs credit updates, two execs at once, a raw host CONNECT, the
//! guest connecting to a host listener, and exec again after a snapshot restore and a
//! live migration (the guest hears of a transport reset); bad `--vsock` arguments are
//! refused.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use ray_e2e::{Env, Vm};

const READY: Duration = Duration::from_secs(20);

fn boot(env: &Env, cid: &str) -> Vm {
    let mut vm = env.boot(&["--vsock", &format!("cid={cid}")]);
    vm.expect_line("ready", READY);
    vm
}

/// `ray vm exec ID -- CMD...`: (stdout, exit code).
fn exec(env: &Env, id: &str, cmd: &[&str]) -> (String, i32) {
    let mut args = vec!["vm", "exec", id, "--"];
    args.extend_from_slice(cmd);
    let out = env.ray(&args);
    assert!(
        out.stderr.is_empty() || out.status.code() != Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

fn exits(vm: &Vm) -> u64 {
    let a = vm.client.raw("GET", "/metrics", None).unwrap();
    String::from_utf8_lossy(&a.body)
        .lines()
        .filter(|l| l.starts_with("ray_vcpu_exits_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

fn check_exec(env: &Env, id: &str) {
    let (out, code) = exec(env, id, &["echo", "hello", "over", "vsock"]);
    assert_eq!((out.as_str(), code), ("hello over vsock\n", 0));
    let (out, code) = exec(env, id, &["no-such-command"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("err unknown command 'no-such-command'"),
        "{out}"
    );
}

#[test]
fn vsock_exec_returns_output_and_status() {
    let env = Env::new("vsock");
    let mut vm = boot(&env, "3");
    check_exec(&env, &vm.id);
    let line = vm.command("vsock", "vsock ");
    assert!(line.starts_with("vsock cid=3 "), "{line}");
    assert!(line.contains("execs=2"), "{line}");

    // A long output: more than the device's 64 KiB credit window and many buffers.
    let (out, code) = exec(&env, &vm.id, &["seq", "30000"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 30000);
    assert_eq!((lines[0], lines[29999]), ("1", "30000"));
    assert!(out.len() > 128 << 10, "{}", out.len());

    // JSON output.
    let json = env.ray_ok(&["vm", "exec", &vm.id, "--json", "--", "echo", "j"]);
    let r: ray_api::vsock::ExecResult = serde_json::from_str(&json).unwrap();
    assert_eq!((r.output.as_str(), r.status), ("j\n", 0));

    // The guest's own vsock commands work inside an exec (they see the state as it was).
    let (out, code) = exec(&env, &vm.id, &["vsock"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("vsock cid=3 conns=1 "), "{out}");
    let (out, code) = exec(&env, &vm.id, &["vsock", "connect", "5000", "x"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("not from a command that came over vsock"),
        "{out}"
    );

    // The same over the API: POST /vm/exec.
    let post = |body: &str| {
        vm.client
            .raw("POST", "/vm/exec", Some(body.as_bytes().to_vec()))
            .unwrap()
    };
    let a = post(r#"{"command": "echo api"}"#);
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let r: ray_api::vsock::ExecResult = serde_json::from_slice(&a.body).unwrap();
    assert_eq!((r.output.as_str(), r.status), ("api\n", 0));
    let a = post(r#"{"command": "bogus"}"#);
    let r: ray_api::vsock::ExecResult = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(r.status, 1);
    let a = post(r#"{"command": "a\nb"}"#);
    assert_eq!(a.status, 400);
    assert!(String::from_utf8_lossy(&a.body).contains("more than one line"));
    let a = post(r#"{"command": "echo", "timeout_ms": 0}"#);
    assert_eq!(a.status, 400);

    // Two at once: both answered, each with its own output.
    let ids = [vm.id.clone(), vm.id.clone()];
    let handles: Vec<_> = ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let runtime = env.runtime.clone();
            std::thread::spawn(move || {
                let out = std::process::Command::new(ray_e2e::ray_bin())
                    .args(["vm", "exec", &id, "--", "seq", &(5000 + i).to_string()])
                    .env("RAY_RUNTIME_DIR", runtime)
                    .output()
                    .unwrap();
                (i, out)
            })
        })
        .collect();
    for h in handles {
        let (i, out) = h.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().count(), 5000 + i);
        assert_eq!(text.lines().last(), Some((5000 + i).to_string().as_str()));
    }

    // Exits per exec (reported, not asserted as a speed).
    let e0 = exits(&vm);
    for _ in 0..5 {
        assert_eq!(exec(&env, &vm.id, &["echo", "x"]).1, 0);
    }
    eprintln!("exits per exec: {:.1}", (exits(&vm) - e0) as f64 / 5.0);

    // A command line the guest cannot take is refused by the host.
    let long = "x".repeat(300);
    let out = env.ray(&["vm", "exec", &vm.id, "--", "echo", &long]);
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 255"));
    // The guest goes on.
    check_exec(&env, &vm.id);
}

/// Connects to guest port `port` with the hybrid handshake by hand.
fn raw_connect(socket: &Path, port: u32) -> (BufReader<UnixStream>, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    (r, line)
}

/// Answers one connection on `l` with `pong to <its first line>`; the line, when joined.
fn pong_once(l: UnixListener) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        r.get_mut()
            .write_all(format!("pong to {}", line.trim()).as_bytes())
            .unwrap();
        line
    })
}

#[test]
fn vsock_raw_connects_both_ways() {
    let env = Env::new("vsock-raw");
    let mut vm = boot(&env, "42");
    let socket = vm.dir.join("vsock.sock");

    // Host to guest by hand: the shell port answers a command.
    let (mut r, ok) = raw_connect(&socket, 52);
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{ok:?}");
    ok[3..].trim().parse::<u32>().expect("OK <hostport>");
    r.get_mut().write_all(b"echo raw\n").unwrap();
    let mut all = String::new();
    r.read_to_string(&mut all).unwrap();
    assert_eq!(all, "raw\nray-exit 0\n");

    // A port nothing listens on: the device closes the stream without OK.
    let (_, line) = raw_connect(&socket, 53);
    assert_eq!(line, "", "port 53 answered {line:?}");

    // Guest to host: a listener on <socket>_5000 answers the guest's text.
    let listener = format!("{}_5000", socket.display());
    let l = UnixListener::bind(&listener).unwrap();
    // The VMM connects as the VM directory's owner (a jailed VMM has a uid of its own).
    let owner = std::fs::metadata(&vm.dir).unwrap();
    use std::os::unix::fs::MetadataExt;
    std::os::unix::fs::chown(&listener, Some(owner.uid()), Some(owner.gid())).unwrap();
    let server = pong_once(l);
    let reply = vm.command("vsock connect 5000 ping from the guest", "vsock reply");
    assert_eq!(reply, "vsock reply pong to ping from the guest");
    assert_eq!(server.join().unwrap(), "ping from the guest\n");
    let err = vm.command("vsock connect 5001 anyone", "err");
    assert!(err.contains("refused"), "{err}");
}

/// A jailed VMM whose vsock socket is outside its directory (the jail's root holds only
/// that directory): its keeper binds the socket and makes the guest's connections to the
/// listeners beside it, so exec, a raw CONNECT and a guest's connection out all work, and
/// the socket file is its owner's only (root here, who started the VM).
#[test]
fn a_jailed_vmm_serves_a_vsock_socket_outside_its_directory() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let env = Env::new("vsock-outside");
    let host_dir = env.runtime.join("host-side");
    std::fs::create_dir_all(&host_dir).unwrap();
    let socket = host_dir.join("v.sock");
    let mut vm = env.boot(&[
        "--jail",
        "--vsock",
        &format!("cid=44,socket={}", socket.display()),
    ]);
    vm.expect_line("ready", READY);
    assert!(!socket.starts_with(&vm.dir));
    let uids = ray_e2e::process_uids(vm.pid);
    assert!(!uids.contains(&0), "the VMM runs jailed: uids {uids:?}");
    let m = std::fs::metadata(&socket).unwrap();
    assert_eq!((m.uid(), m.permissions().mode() & 0o777), (0, 0o600));

    check_exec(&env, &vm.id);
    let (mut r, ok) = raw_connect(&socket, 52);
    assert!(ok.starts_with("OK "), "{ok:?}");
    r.get_mut().write_all(b"echo outside\n").unwrap();
    let mut all = String::new();
    r.read_to_string(&mut all).unwrap();
    assert_eq!(all, "outside\nray-exit 0\n");

    // The guest connects out to a root-owned listener beside the socket: the keeper, not
    // the jailed VMM's uid, makes the connection.
    let l = UnixListener::bind(format!("{}_5000", socket.display())).unwrap();
    let server = pong_once(l);
    let reply = vm.command("vsock connect 5000 from the jail", "vsock reply");
    assert_eq!(reply, "vsock reply pong to from the jail");
    assert_eq!(server.join().unwrap(), "from the jail\n");
    let err = vm.command("vsock connect 5001 anyone", "err");
    assert!(err.contains("refused"), "{err}");
    // The VM still answers after the refused connection.
    check_exec(&env, &vm.id);
}

#[test]
fn vsock_exec_works_after_snapshot_restore() {
    let env = Env::new("vsock-snap");
    let vm = boot(&env, "5");
    check_exec(&env, &vm.id);
    env.ray_ok(&["vm", "pause", &vm.id]);
    let path = env.runtime.join("snap-vsock");
    let path = path.to_str().unwrap();
    env.ray_ok(&["snapshot", "create", &vm.id, path]);
    env.ray_ok(&["vm", "stop", &vm.id, "--timeout-ms", "0"]);
    let out = env.ray_ok(&[
        "snapshot",
        "restore",
        path,
        "--id",
        "vsock-back",
        "--detach",
        "--json",
    ]);
    let info: ray_api::vmm::VmInfo = serde_json::from_str(&out).unwrap();
    let mut back = env.attach("vsock-back", info.pid);
    check_exec(&env, "vsock-back");
    let line = back.command("vsock", "vsock ");
    assert!(line.contains("transport_resets=1"), "{line}");
    assert!(line.starts_with("vsock cid=5 "), "{line}");
}

#[test]
fn vsock_exec_works_after_a_live_migration() {
    let env = Env::new("vsock-mig");
    let key = env.runtime.join("key");
    std::fs::write(&key, "a pre-shared key of some length").unwrap();
    let key = key.to_str().unwrap();
    let src = boot(&env, "6");
    check_exec(&env, &src.id);
    let sock = env.runtime.join("mig.sock");
    let listen = format!("unix:{}", sock.display());
    let out = env.ray_ok(&[
        "migrate",
        "receive",
        "--listen",
        &listen,
        "--key-file",
        key,
        "--id",
        "vsock-dst",
        "--json",
    ]);
    let info: ray_api::vmm::VmInfo = serde_json::from_str(&out).unwrap();
    let mut dst = env.attach("vsock-dst", info.pid);
    env.ray_ok(&[
        "migrate",
        "start",
        &src.id,
        "--to",
        &listen,
        "--key-file",
        key,
        "--json",
    ]);
    src.wait_exit(Duration::from_secs(10));
    check_exec(&env, "vsock-dst");
    let line = dst.command("vsock", "vsock ");
    assert!(line.contains("transport_resets=1"), "{line}");
}

#[test]
fn bad_vsock_arguments_are_refused_before_a_vm_starts() {
    let env = Env::new("vsock-bad");
    let cases: [(&[&str], &str); 5] = [
        (&["--vsock", "cid=2"], "cid 2 is reserved"),
        (&["--vsock", "cid=x"], "cid 'x' is not a number"),
        (&["--vsock", "cid=3,port=1"], "unknown key 'port'"),
        (&["--vsock", "cid=3,socket=rel"], "absolute path"),
        (
            &["--vsock", "cid=3", "--vsock", "cid=4"],
            "cannot be used multiple times",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["vm", "run", "--detach"];
        all.extend_from_slice(args);
        let out = env.ray(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A VM without vsock: exec says so.
    let vm = env.boot(&[]);
    let out = env.ray(&["vm", "exec", &vm.id, "--", "echo", "hi"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no vsock device"));
    let a = vm
        .client
        .raw("POST", "/vm/exec", Some(br#"{"command": "mem"}"#.to_vec()))
        .unwrap();
    assert_eq!(a.status, 409);
    assert!(String::from_utf8_lossy(&a.body).contains("no vsock device"));
    let out = env.ray_ok(&["vm", "list", "--json"]);
    assert_eq!(out.matches("running").count(), 1, "{out}");
}

#[test]
fn bad_served_vsock_arguments_are_refused_before_the_socket_exists() {
    let env = Env::new("vsock-serve-bad");
    let front = env.runtime.join("front.sock");
    let front_arg = front.to_str().unwrap();
    let host = format!("cid=3,socket={}", env.runtime.join("host.sock").display());
    let same = format!("cid=3,socket={front_arg}");
    let cases: [(&[&str], &str); 4] = [
        (&["--vsock", "cid=3"], "socket=PATH is required"),
        (&["--vsock", "cid=1,socket=/tmp/x"], "cid 1 is reserved"),
        (&["--vsock", &same], "must differ"),
        (
            &["--vsock", &host, "--bogus"],
            "unexpected argument '--bogus'",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["device", "serve", "vsock", "--socket", front_arg];
        all.extend_from_slice(args);
        let out = env.ray(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            !front.exists(),
            "{args:?}: the vhost-user socket was created"
        );
    }
}
