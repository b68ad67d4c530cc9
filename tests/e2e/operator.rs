//! The operator's view: API error codes and the OpenAPI document, the API over loopback
//! TCP and a bad-input sweep against it (schemathesis), version.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use ray::client::ClientError;
use ray_api::vmm::{ErrorBody, ErrorCode, VersionInfo, VmInfo, VmStateName};
use ray_e2e::{python, ray_bin, run_python, Env};

const READY: Duration = Duration::from_secs(20);

/// One HTTP/1.1 answer read off a raw connection.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn error(&self) -> ErrorBody {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not an ErrorBody ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends the request head (and `body`, if any) and reads the answer to the end.
fn send_raw(mut s: impl Read + Write, head: &str, body: &[u8]) -> Reply {
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) and close before taking all of an oversized body.
    let _ = s.write_all(body);
    read_reply(s)
}

fn read_reply(mut s: impl Read) -> Reply {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A server that refuses a body it has not read closes with that body unread;
            // the kernel then reports a reset once its answer has been read.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => panic!("reading the answer: {e}"),
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

fn request(method: &str, path: &str, host: &str, body: &[u8]) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
}

/// The VM's TCP bearer token, checking the file is its owner's alone.
fn api_token(vm_dir: &std::path::Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = vm_dir.join("api.token");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
    let token = std::fs::read_to_string(&path).unwrap().trim().to_string();
    assert_eq!(token.len(), 64, "{token:?}");
    token
}

fn unix(vm_dir: &std::path::Path, method: &str, path: &str, body: &[u8]) -> Reply {
    let s = UnixStream::connect(vm_dir.join("api.sock")).unwrap();
    send_raw(s, &request(method, path, "localhost", body), body)
}

#[test]
fn errors_carry_stable_codes() {
    let env = Env::new("errcodes");
    let b = env.bare_vmm("codes", &[]);
    let cases: [(&str, &str, &[u8], u16, ErrorCode); 8] = [
        (
            "PUT",
            "/vm/config",
            b"{\"kernel\": ",
            400,
            ErrorCode::InvalidRequest,
        ),
        ("PUT", "/vm/start", b"", 409, ErrorCode::WrongState),
        (
            "PUT",
            "/vm/pause",
            b"{\"now\": true}",
            400,
            ErrorCode::InvalidRequest,
        ),
        ("GET", "/vm/migration", b"", 404, ErrorCode::NotFound),
        ("GET", "/vm/nope", b"", 404, ErrorCode::UnknownEndpoint),
        ("DELETE", "/vm", b"", 405, ErrorCode::MethodNotAllowed),
        (
            "GET",
            "/vm/console?bytes=-1",
            b"",
            400,
            ErrorCode::InvalidRequest,
        ),
        (
            "GET",
            "/vm/console?lines=3",
            b"",
            400,
            ErrorCode::InvalidRequest,
        ),
    ];
    for (method, path, body, status, code) in cases {
        let r = unix(&b.dir, method, path, body);
        assert_eq!(r.status, status, "{method} {path}");
        let e = r.error();
        assert_eq!(e.code, code, "{method} {path}: {}", e.message);
        assert!(!e.message.is_empty());
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    // 405 says what is allowed.
    let r = unix(&b.dir, "DELETE", "/vm/console", b"");
    let allow = r.header("allow").unwrap_or_default().to_string();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    // A body must be declared JSON (a web page cannot send that cross-origin unasked).
    let body = br#"{"kernel":"k","vcpus":1,"memory_bytes":134217728}"#;
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let s = UnixStream::connect(b.dir.join("api.sock")).unwrap();
        let head = request("PUT", "/vm/config", "localhost", body).replace("application/json", ct);
        let r = send_raw(s, &head, body);
        assert_eq!(
            (r.status, r.error().code),
            (415, ErrorCode::UnsupportedMediaType),
            "{ct}"
        );
    }
    // A body beyond the limit is refused before it is parsed.
    let big = vec![b' '; 3 << 20];
    let r = unix(&b.dir, "PUT", "/vm/config", &big);
    assert_eq!(
        (r.status, r.error().code),
        (413, ErrorCode::PayloadTooLarge)
    );
    // The CLI's client reads the code.
    let err = b
        .client
        .call::<VmInfo>("PUT", "/vm/start", None)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Api {
                status: 409,
                code: Some(ErrorCode::WrongState),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("no configuration yet"), "{err}");
    assert_eq!(
        b.client.call::<VmInfo>("GET", "/vm", None).unwrap().state,
        VmStateName::Created
    );
}

/// A PUT whose body is still on its way has no effect yet: the handler acts only once the
/// whole body has arrived.
#[test]
fn put_acts_only_once_its_body_has_arrived() {
    let env = Env::new("slowbody");
    let mut vm = env.boot(&[]);
    vm.expect_line("ready", READY);
    for (path, body, then) in [
        ("/vm/pause", &b"{}"[..], VmStateName::Paused),
        (
            "/vm/stop",
            &b"{\"timeout_ms\": 0}"[..],
            VmStateName::Terminated,
        ),
    ] {
        let mut s = UnixStream::connect(vm.dir.join("api.sock")).unwrap();
        s.write_all(request("PUT", path, "localhost", body).as_bytes())
            .unwrap();
        // All but the last byte: the request is not complete.
        s.write_all(&body[..body.len() - 1]).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            vm.state(),
            VmStateName::Running,
            "PUT {path} acted before its body was complete"
        );
        s.write_all(&body[body.len() - 1..]).unwrap();
        let r = read_reply(s);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let info: VmInfo = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(info.state, then);
        if then == VmStateName::Paused {
            env.ray_ok(&["vm", "resume", &vm.id]);
        }
    }
    vm.wait_exit(Duration::from_secs(5));
}

#[test]
fn version_of_the_cli_and_of_a_vmm() {
    let env = Env::new("version");
    let b = env.bare_vmm("v", &[]);
    let served: VersionInfo = b.client.call("GET", "/version", None).unwrap();
    assert_eq!(served, VersionInfo::current());
    let text = env.ray_ok(&["version"]);
    assert!(
        text.starts_with(&format!("client  ray {}", served.version)),
        "{text}"
    );
    let both: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["version", "--vm", "v", "-o", "json"])).unwrap();
    assert_eq!(both["vmm"]["api_version"], served.api_version);
    assert_eq!(both["client"]["version"], served.version);
    let yaml = env.ray_ok(&["version", "-o", "yaml"]);
    assert!(yaml.starts_with("client:\n  version: "), "{yaml}");
}

const VALIDATE: &str = r#"
import json, sys
from openapi_spec_validator import validate
from openapi_spec_validator.readers import read_from_filename
errors = 0
for path in sys.argv[1:]:
    spec, _ = read_from_filename(path)
    validate(spec)
    print("valid", path, spec["openapi"], len(spec["paths"]))
"#;

#[test]
fn openapi_document_validates_and_is_served() {
    let env = Env::new("openapival");
    let b = env.bare_vmm("doc", &[]);
    let served = b.client.raw("GET", "/openapi.json", None).unwrap();
    assert_eq!(served.status, 200);
    let path = env.runtime.join("served.json");
    std::fs::write(&path, &served.body).unwrap();
    let committed = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi/vmm.json");
    let out = run_python(VALIDATE, &[committed, path.to_str().unwrap()]);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("valid ")).count(),
        2,
        "{out}"
    );
    let served: serde_json::Value = serde_json::from_slice(&served.body).unwrap();
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(committed).unwrap()).unwrap();
    assert_eq!(
        served, committed,
        "the served document differs from docs/openapi/vmm.json"
    );
}

/// `ray vm run --api-tcp` serves the API on loopback TCP as well, says where in
/// `vm status`, answers only requests addressed to a loopback name, and refuses to listen
/// anywhere else.
#[test]
fn api_over_loopback_tcp() {
    let env = Env::new("apitcp");
    let out = env.ray(&["vm", "run", "--detach", "--api-tcp", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("loopback address only") && err.contains("0.0.0.0:0"),
        "{err}"
    );
    let out = env.ray(&["vm", "run", "--detach", "--api-tcp", "localhost"]);
    assert_eq!(out.status.code(), Some(2));

    // Jailed as by default: a jailed VMM without NICs has a loopback of its own, so its
    // keeper binds the listener on the host's.
    let mut vm = env.boot(&["--api-tcp", "127.0.0.1:0"]);
    vm.expect_line("ready", READY);
    let addr = vm.info().api_tcp.expect("GET /vm reports the TCP address");
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    let status = env.ray_ok(&["vm", "status", &vm.id]);
    assert!(status.contains(&format!("http://{addr}")), "{status}");

    use std::os::unix::fs::PermissionsExt;
    let socket_mode = std::fs::metadata(vm.dir.join("api.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(socket_mode & 0o777, 0o600, "api.sock mode {socket_mode:o}");
    let token = api_token(&vm.dir);
    let with_auth = |auth: &str, host: &str, method: &str, path: &str, body: &[u8]| {
        let s = TcpStream::connect(&addr).unwrap();
        let head = request(method, path, host, body).replacen("\r\n", &format!("\r\n{auth}"), 1);
        send_raw(s, &head, body)
    };
    let tcp = |host: &str, method: &str, path: &str, body: &[u8]| {
        with_auth(
            &format!("Authorization: Bearer {token}\r\n"),
            host,
            method,
            path,
            body,
        )
    };
    // No token, a wrong one, another scheme: 401, the VM untouched.
    let wrong = format!("Authorization: Bearer {}\r\n", "0".repeat(64));
    let basic = "Authorization: Basic cmF5OnJheQ==\r\n".to_string();
    for auth in [String::new(), wrong, basic] {
        for (method, path) in [
            ("GET", "/vm"),
            ("PUT", "/vm/pause"),
            ("GET", "/openapi.json"),
        ] {
            let r = with_auth(&auth, "localhost", method, path, b"");
            assert_eq!(
                (r.status, r.error().code),
                (401, ErrorCode::Unauthorized),
                "{auth:?} {method} {path}"
            );
            assert!(r
                .header("www-authenticate")
                .is_some_and(|h| h.starts_with("Bearer")));
        }
    }
    assert_eq!(vm.state(), VmStateName::Running);
    let r = tcp(&addr, "GET", "/vm", b"");
    assert_eq!(r.status, 200);
    let info: VmInfo = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (info.id.as_str(), info.state),
        (vm.id.as_str(), VmStateName::Running)
    );
    let r = tcp("localhost", "PUT", "/vm/pause", b"");
    assert_eq!(r.status, 200);
    let r = tcp("localhost", "PUT", "/vm/resume", b"");
    assert_eq!(r.status, 200);
    // DNS rebinding: a page on evil.example resolving to 127.0.0.1 is turned away.
    for host in ["evil.example", "evil.example:80", "10.1.2.3"] {
        let r = tcp(host, "PUT", "/vm/pause", b"");
        assert_eq!(
            (r.status, r.error().code),
            (403, ErrorCode::ForbiddenHost),
            "{host}"
        );
    }
    assert_eq!(vm.state(), VmStateName::Running);
    assert_eq!(vm.command("echo still here", "still"), "still here");
}

/// schemathesis generates valid and invalid requests from the served OpenAPI document
/// and checks every answer against it: no 5xx, no undocumented status, no answer that
/// does not match its schema, every schema-violating request refused, 405 with `Allow` for
/// the methods a path lacks. Operations that would write or delete files or migrate get
/// only invalid requests; stop and suspend none. The VM answers and runs its guest
/// afterwards, and nothing was written beside it.
#[test]
fn schemathesis_sweep_finds_nothing() {
    let env = Env::new("schemathesis");
    // The VMM's working directory is the test's: a relative path in a generated request
    // cannot reach the repository.
    let out = Command::new(ray_bin())
        .args([
            "vm",
            "run",
            "--detach",
            "--json",
            "--api-tcp",
            "127.0.0.1:0",
        ])
        .env("RAY_RUNTIME_DIR", &env.runtime)
        .env("RAY_GUEST", ray_e2e::guest_bin())
        // Jailed as the rest (its keeper binds --api-tcp on the host's loopback).
        .env("RAY_JAIL", ray_e2e::jail_setting())
        .current_dir(&env.runtime)
        .output()
        .unwrap();
    let info: VmInfo = serde_json::from_str(&ray_e2e::succeeded(out, "vm run")).unwrap();
    let mut vm = env.attach(&info.id, info.pid);
    vm.expect_line("ready", READY);
    let addr = info.api_tcp.expect("api_tcp");
    // The document as the TCP listener serves it (with the token, like every request).
    let token = api_token(&vm.dir);
    let auth = format!("Authorization: Bearer {token}");
    let head = request("GET", "/openapi.json", "localhost", b"").replacen(
        "\r\n",
        &format!("\r\n{auth}\r\n"),
        1,
    );
    let doc = send_raw(TcpStream::connect(&addr).unwrap(), &head, b"");
    assert_eq!(doc.status, 200);
    let schema = env.runtime.join("openapi.json");
    std::fs::write(&schema, &doc.body).unwrap();
    let schemathesis = python().with_file_name("schemathesis");
    // `ignored_auth`: the document declares the bearer token; requests without it (or with
    // a wrong one) must be refused.
    let checks = "not_a_server_error,status_code_conformance,content_type_conformance,\
                  response_headers_conformance,response_schema_conformance,\
                  negative_data_rejection,unsupported_method,allow_header_conformance,\
                  ignored_auth";
    // Never: a valid request ends the VM or takes its memory away, and so does an empty
    // body (stop's defaults).
    let never = ["put_stop", "put_suspend"];
    // Invalid requests only: a valid one would write or delete files, or migrate.
    let risky = [
        "put_snapshot",
        "put_snapshot_delete",
        "put_snapshot_merge",
        "put_migration",
    ];
    let run = |mode: &str, filter: &[String], examples: &str| {
        let mut cmd = Command::new(&schemathesis);
        cmd.arg("run")
            .arg(&schema)
            .args(["--url", &format!("http://{addr}"), "-H", &auth])
            .args(["--checks", checks, "--mode", mode])
            .args(["--max-examples", examples, "--seed", "20261203"])
            .args(["--phases", "examples,coverage,fuzzing", "--workers", "1"])
            .args([
                "--request-timeout",
                "20",
                "--no-color",
                "--suppress-health-check",
                "all",
            ])
            .args(filter)
            .current_dir(&env.runtime)
            .env("SCHEMATHESIS_HOOKS", "")
            .env(
                "HYPOTHESIS_STORAGE_DIRECTORY",
                env.runtime.join("hypothesis"),
            );
        let out = cmd.output().expect("cannot run schemathesis");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{text}");
        assert!(
            out.status.success(),
            "schemathesis ({mode}) found problems:\n{text}"
        );
        text
    };
    let safe: Vec<String> = risky
        .iter()
        .chain(&never)
        .flat_map(|op| ["--exclude-operation-id".to_string(), op.to_string()])
        .collect();
    run("all", &safe, "40");
    let only_risky: Vec<String> = risky
        .iter()
        .flat_map(|op| ["--include-operation-id".to_string(), op.to_string()])
        .collect();
    run("negative", &only_risky, "25");

    // Still there, still answering, the guest still runs its shell.
    assert!(vm.process_alive());
    if vm.state() == VmStateName::Paused {
        env.ray_ok(&["vm", "resume", &vm.id]);
    }
    assert_eq!(vm.state(), VmStateName::Running);
    assert_eq!(vm.command("echo survived", "survived"), "survived");
    let files: Vec<_> = std::fs::read_dir(&env.runtime)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            ![
                "vms",
                "hypothesis",
                ".hypothesis",
                ".schemathesis",
                "openapi.json",
                // The host's encode slots, made when a jailed VMM starts.
                "encode-slots",
            ]
            .contains(&n.as_str())
        })
        .collect();
    assert!(files.is_empty(), "the sweep created files: {files:?}");
}

const PARSE_METRICS: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
families = {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    families[fam.name] = {
        "type": fam.type,
        "samples": [[s.name, s.labels, s.value] for s in fam.samples],
    }
print(json.dumps(families))
"#;

/// `GET /metrics` parsed by prometheus-client's own text parser.
fn scrape(vm: &ray_e2e::Vm, dir: &std::path::Path) -> serde_json::Value {
    let a = vm.client.raw("GET", "/metrics", None).unwrap();
    assert_eq!(a.status, 200);
    let path = dir.join("metrics.txt");
    std::fs::write(&path, &a.body).unwrap();
    serde_json::from_str(&run_python(PARSE_METRICS, &[path.to_str().unwrap()])).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(m: &serde_json::Value, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let f = &m[family];
    assert!(f.is_object(), "no metric family {family} in {m}");
    f["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][*k] == *v))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?} in {f}"))[2]
        .as_f64()
        .unwrap()
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    let env = Env::new("metrics");
    // Idling through the port, so that every vCPU has port exits to count.
    let mut vm = env.boot(&[
        "--vcpus",
        "2",
        "--cmdline",
        "console=ttyS0 ray.poll_ms=0 ray.idle=port",
    ]);
    vm.expect_line("ready", READY);
    assert_eq!(vm.command("echo counted", "counted"), "counted");
    // The snapshots go through the API alone: into the VM's directory, where a jailed
    // VMM writes by itself (`ray snapshot create` hands it a store elsewhere).
    let store = vm.dir.join("store");
    let snap = |vm: &ray_e2e::Vm, id: &str, kind: &str| {
        let body = format!(
            r#"{{"path":"{}","pause":true,"kind":"{kind}"}}"#,
            store.join(id).display()
        );
        let _: serde_json::Value = vm
            .client
            .call("PUT", "/vm/snapshot", Some(body.into_bytes()))
            .unwrap();
    };
    snap(&vm, "s1", "full");
    vm.command("dirty 4 64", "dirty on");
    std::thread::sleep(Duration::from_millis(200));
    vm.command("dirty stop", "dirty off");
    snap(&vm, "s2", "incremental");
    // A migration to a "target" that hangs up at once fails; it is counted too. `ray
    // migrate start` makes the connection (a jailed VMM's network is its own).
    let key = env.key_file("key", "a pre-shared key of some length");
    let hangs_up = env.runtime.join("hangs-up.sock");
    let listener = std::os::unix::net::UnixListener::bind(&hangs_up).unwrap();
    let closer = std::thread::spawn(move || drop(listener.accept()));
    let out = env.ray(&[
        "migrate",
        "start",
        &vm.id,
        "--to",
        &format!("unix:{}", hangs_up.display()),
        "--key-file",
        &key,
    ]);
    assert!(!out.status.success(), "{out:?}");
    closer.join().unwrap();
    vm.wait_for(
        "the failed migration to end",
        Duration::from_secs(10),
        |i| i.state == VmStateName::Running,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = scrape(&vm, &env.runtime);
        if m["ray_migrations"]["samples"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
            || std::time::Instant::now() > deadline
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    assert_eq!(m["ray_vcpu_exits"]["type"], "counter");
    for vcpu in ["0", "1"] {
        assert!(
            sample(
                &m,
                "ray_vcpu_exits",
                "ray_vcpu_exits_total",
                &[("vcpu", vcpu), ("reason", "io")]
            ) > 0.0,
            "vCPU {vcpu} made no port exits"
        );
    }
    let full = sample(
        &m,
        "ray_snapshots",
        "ray_snapshots_total",
        &[("kind", "full")],
    );
    let incr = sample(
        &m,
        "ray_snapshots",
        "ray_snapshots_total",
        &[("kind", "incremental")],
    );
    assert_eq!((full, incr), (1.0, 1.0));
    assert_eq!(m["ray_snapshot_pause_seconds"]["type"], "summary");
    assert_eq!(
        sample(
            &m,
            "ray_snapshot_pause_seconds",
            "ray_snapshot_pause_seconds_count",
            &[]
        ),
        2.0
    );
    assert!(sample(&m, "ray_dirty_pages", "ray_dirty_pages_total", &[]) > 0.0);
    assert_eq!(
        sample(
            &m,
            "ray_migrations",
            "ray_migrations_total",
            &[("role", "source"), ("state", "failed")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "ray_guest_memory_size_bytes",
            "ray_guest_memory_size_bytes",
            &[]
        ),
        (128u64 << 20) as f64
    );
    assert!(
        sample(
            &m,
            "ray_guest_memory_resident_bytes",
            "ray_guest_memory_resident_bytes",
            &[]
        ) > 0.0
    );
    assert!(
        sample(
            &m,
            "ray_vmm_private_memory_bytes",
            "ray_vmm_private_memory_bytes",
            &[]
        ) > 0.0
    );
    assert!(sample(&m, "process_cpu_seconds", "process_cpu_seconds_total", &[]) > 0.0);
}

/// `ray vm rm` removes an ended VM and refuses a live one, naming its state; `ray vm prune`
/// removes every ended (terminated or dead) VM and nothing else.
#[test]
fn rm_and_prune_remove_only_ended_vms() {
    let env = Env::new("rmprune");
    let mut keep = env.boot(&["--id", "keep"]);
    let mut done = env.boot(&["--id", "done"]);
    let mut dead = env.boot(&["--id", "dead"]);
    for vm in [&mut keep, &mut done, &mut dead] {
        vm.expect_line("ready", READY);
    }
    let out = env.ray(&["vm", "rm", "keep"]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("VM 'keep' is running") && err.contains("ray vm stop keep"),
        "{err}"
    );
    env.ray_ok(&["vm", "pause", "keep"]);
    let err = String::from_utf8_lossy(&env.ray(&["vm", "rm", "keep"]).stderr).into_owned();
    assert!(err.contains("VM 'keep' is paused"), "{err}");
    env.ray_ok(&["vm", "resume", "keep"]);

    env.ray_ok(&["vm", "stop", "done", "--timeout-ms", "0"]);
    done.wait_exit(Duration::from_secs(5));
    // SAFETY: kill(2) of a VMM this test started.
    unsafe {
        libc::kill(dead.pid as libc::pid_t, libc::SIGKILL);
    }
    dead.wait_exit(Duration::from_secs(5));

    let dry = env.ray_ok(&["vm", "prune", "--dry-run"]);
    assert!(
        dry.contains("would remove dead (dead)") && dry.contains("would remove done (terminated"),
        "{dry}"
    );
    assert!(env.runtime.join("vms/done").is_dir());
    let pruned: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["vm", "prune", "-o", "json"])).unwrap();
    let ids: Vec<&str> = pruned
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["dead", "done"]);
    let list: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["vm", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], "keep");

    env.ray_ok(&["vm", "stop", "keep"]);
    keep.wait_exit(Duration::from_secs(10));
    // Whoever holds the directory's lock (a VMM being started there) keeps it from going.
    let lock = env.runtime.join("vms/keep/vmm.lock");
    let mut holder = Command::new("flock")
        .arg("--no-fork")
        .arg(&lock)
        .args(["sleep", "60"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let out = env.ray(&["vm", "rm", "keep"]);
        if out.status.code() == Some(4) || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("VM 'keep'"));
    assert!(lock.exists());
    assert_eq!(
        env.ray_ok(&["vm", "rm", "keep"]),
        "removed keep (terminated: guest:poweroff (asked by api:stop))\n"
    );
    assert!(!env.runtime.join("vms/keep").exists());
    let out = env.ray(&["vm", "rm", "keep"]);
    assert_eq!(out.status.code(), Some(3), "a removed VM is gone");
}

/// `ray vm config ID -o yaml` gives back what `ray vm run -f` takes: a VM started from it
/// has the same configuration.
#[test]
fn vm_config_round_trips_through_run_file() {
    let env = Env::new("runfile");
    let mut a = env.boot(&[
        "--id",
        "a",
        "--vcpus",
        "2",
        "--memory",
        "192M",
        "--cmdline",
        "console=ttyS0 ray.poll_ms=0 note=\"x y\"",
    ]);
    a.expect_line("ready", READY);
    let yaml = env.ray_ok(&["vm", "config", "a", "-o", "yaml"]);
    assert!(
        yaml.contains("vcpus: 2\n") && yaml.contains("memory_bytes: 201326592\n"),
        "{yaml}"
    );
    let file = env.runtime.join("a.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let json_file = env.runtime.join("a.json");
    std::fs::write(&json_file, env.ray_ok(&["vm", "config", "a", "-o", "json"])).unwrap();
    env.ray_ok(&["vm", "stop", "a", "--timeout-ms", "0"]);
    a.wait_exit(Duration::from_secs(5));

    let mut b = env.boot(&["--id", "b", "-f", file.to_str().unwrap()]);
    b.expect_line("ready", READY);
    assert_eq!(env.ray_ok(&["vm", "config", "b", "-o", "yaml"]), yaml);
    let mut c = env.boot(&["--id", "c", "-f", json_file.to_str().unwrap()]);
    c.expect_line("ready", READY);
    assert_eq!(env.ray_ok(&["vm", "config", "c", "-o", "yaml"]), yaml);
    // -f and the flags it replaces do not mix; a bad file is refused, naming what is wrong.
    let out = env.ray(&[
        "vm",
        "run",
        "--detach",
        "-f",
        file.to_str().unwrap(),
        "--vcpus",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(&file, "kernel: /k\nvcpus: 1\nmemory: 1G\n").unwrap();
    let out = env.ray(&["vm", "run", "--detach", "-f", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(6));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `memory`"), "{err}");
}

/// Every list and status command speaks table, wide, JSON and YAML; `--json` is `-o json`.
#[test]
fn output_formats() {
    let env = Env::new("formats");
    let mut vm = env.boot(&["--id", "fmt", "--api-tcp", "127.0.0.1:0"]);
    vm.expect_line("ready", READY);
    let table = env.ray_ok(&["vm", "list"]);
    assert!(table.starts_with("ID   STATE    PID"), "{table}");
    let wide = env.ray_ok(&["vm", "list", "-o", "wide"]);
    assert!(
        wide.lines()
            .next()
            .unwrap()
            .ends_with("HYPERVISOR  API                    REASON")
            || wide.contains("HYPERVISOR") && wide.contains("http://127.0.0.1:"),
        "{wide}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["vm", "list", "-o", "json"])).unwrap();
    let alias: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["vm", "list", "--json"])).unwrap();
    assert_eq!(json[0]["id"], "fmt");
    assert_eq!(json[0]["id"], alias[0]["id"]);
    let yaml = env.ray_ok(&["vm", "list", "-o", "yaml"]);
    assert!(yaml.starts_with("- id: fmt\n  state: running\n"), "{yaml}");

    for cmd in [&["vm", "status", "fmt"][..], &["vm", "events", "fmt"][..]] {
        let j: serde_json::Value =
            serde_json::from_str(&env.ray_ok(&[cmd, &["-o", "json"]].concat())).unwrap();
        let y = env.ray_ok(&[cmd, &["-o", "yaml"]].concat());
        assert!(
            !y.trim_start().starts_with('{'),
            "{cmd:?} -o yaml printed JSON: {y}"
        );
        assert!(!j.is_null());
        env.ray_ok(&[cmd, &["-o", "wide"]].concat());
    }
    let wide = env.ray_ok(&["vm", "status", "fmt", "-o", "wide"]);
    assert!(wide.contains("ready=true"), "{wide}");

    // Snapshots and migrations too.
    let store = env.runtime.join("store");
    let snap = store.join("s1");
    let (store, snap) = (store.to_str().unwrap(), snap.to_str().unwrap());
    env.ray_ok(&["snapshot", "create", "fmt", snap, "--pause"]);
    let table = env.ray_ok(&["snapshot", "list", store]);
    assert!(
        table.starts_with("SNAPSHOT  KIND  STATE") && table.contains("\ns1  "),
        "{table}"
    );
    let wide = env.ray_ok(&["snapshot", "list", store, "-o", "wide"]);
    assert!(
        wide.lines().next().unwrap().ends_with("PARENT  CREATED"),
        "{wide}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["snapshot", "list", store, "-o", "json"])).unwrap();
    assert_eq!(json["snapshots"][0]["id"], "s1");
    let yaml = env.ray_ok(&["snapshot", "list", store, "-o", "yaml"]);
    assert!(yaml.contains("snapshots:\n- id: s1\n"), "{yaml}");
    let yaml = env.ray_ok(&["snapshot", "status", snap, "-o", "yaml"]);
    assert!(yaml.contains("id: s1\n"), "{yaml}");
    assert_eq!(
        env.ray_ok(&["migrate", "sessions", "-o", "json"]).trim(),
        "[]"
    );
    assert_eq!(
        env.ray_ok(&["migrate", "sessions", "-o", "yaml"]).trim(),
        "[]"
    );

    let out = env.ray(&["vm", "list", "-o", "xml"]);
    assert_eq!(out.status.code(), Some(2));
    let out = env.ray(&["vm", "list", "-o", "json", "--json"]);
    assert_eq!(out.status.code(), Some(2), "-o and --json conflict");
}

/// `--help` of every command has examples; completions and man pages are generated and
/// well-formed.
#[test]
fn help_completion_and_man_pages() {
    let env = Env::new("helpman");
    for cmd in [
        &["vm", "run"][..],
        &["vm", "console"],
        &["snapshot", "create"],
        &["migrate", "start"],
        &[],
    ] {
        let help = env.ray_ok(&[cmd, &["--help"]].concat());
        assert!(help.contains("\nExamples:\n  ray "), "{cmd:?}: {help}");
    }
    let bash = env.runtime.join("ray.bash");
    std::fs::write(&bash, env.ray_ok(&["completion", "bash"])).unwrap();
    let check = Command::new("bash").arg("-n").arg(&bash).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    // Sourced, it completes `ray vm r` to the commands starting with r.
    let script = format!(
        "source {}; COMP_WORDS=(ray vm r); COMP_CWORD=2; COMP_LINE='ray vm r'; COMP_POINT=8; _ray ray r vm; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        bash.display()
    );
    let words = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let words = String::from_utf8_lossy(&words.stdout);
    for w in ["run", "resume", "rm"] {
        assert!(
            words.lines().any(|l| l == w),
            "`ray vm r<TAB>` misses {w}: {words}"
        );
    }
    assert!(env
        .ray_ok(&["completion", "zsh"])
        .starts_with("#compdef ray"));
    assert!(env
        .ray_ok(&["completion", "fish"])
        .contains("complete -c ray "));

    let page = env.ray_ok(&["man"]);
    assert!(page.contains(".TH ray 1"), "{page}");
    let dir = env.runtime.join("man");
    env.ray_ok(&["man", "--dir", dir.to_str().unwrap()]);
    for name in [
        "ray.1",
        "ray-vm.1",
        "ray-vm-run.1",
        "ray-vm-console.1",
        "ray-snapshot-create.1",
    ] {
        let p = dir.join(name);
        assert!(p.is_file(), "{} missing", p.display());
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(&p)
            .output()
            .expect("groff (scripts/setup installs groff-base)");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let run = std::fs::read_to_string(dir.join("ray-vm-run.1")).unwrap();
    assert!(
        run.contains("Examples:") && run.contains("api\\-tcp"),
        "{run}"
    );
}

/// A tmux server of its own (its socket in the test's directory), killed at the end.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    fn new(env: &Env) -> Tmux {
        Tmux {
            socket: env.runtime.join("tmux.sock"),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux (scripts/setup installs it)");
        ray_e2e::succeeded(out, &format!("tmux {args:?}"))
    }

    /// A session running `command` (through sh; it stays open after the command ends).
    fn session(&self, env: &Env, name: &str, command: &str) {
        let shell = format!(
            "export RAY_RUNTIME_DIR='{}' RAY_GUEST='{}'; {command}; echo \"[exit $?]\"; sleep 600",
            env.runtime.display(),
            ray_e2e::guest_bin().display()
        );
        self.run(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "160",
            "-y",
            "50",
            "sh",
            "-c",
            &shell,
        ]);
    }

    fn keys(&self, session: &str, keys: &[&str]) {
        self.run(&[&["send-keys", "-t", session][..], keys].concat());
    }

    fn screen(&self, session: &str) -> String {
        self.run(&["capture-pane", "-p", "-J", "-t", session, "-S", "-500"])
    }

    /// Waits until the session's screen has a line for which `f` holds.
    fn wait_for(&self, session: &str, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen(session);
            if screen.lines().any(|l| f(l.trim_end())) {
                return screen;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "session {session}: no {what} on the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_line(&self, session: &str, line: &str) -> String {
        self.wait_for(session, &format!("line {line:?}"), |l| l == line)
    }

    fn wait_text(&self, session: &str, text: &str) -> String {
        self.wait_for(session, &format!("{text:?}"), |l| l.contains(text))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

/// `ray vm console` in real terminals (tmux): typing reaches the guest's shell, Ctrl-C goes
/// to the guest and not to the VM, Ctrl-] detaches and leaves the VM running, re-attaching
/// shows the history; several consoles follow one VM, one has the input and `--write`
/// takes it over.
#[test]
fn console_in_a_terminal_detaches_and_reattaches() {
    let env = Env::new("console");
    let mut vm = env.boot(&["--id", "tty"]);
    vm.expect_line("ready", READY);
    let ray = ray_bin().display().to_string();
    let t = Tmux::new(&env);
    t.session(&env, "one", &format!("{ray} vm console tty"));
    t.wait_text("one", "[ray: attached to tty; Ctrl-] detaches]");
    t.keys("one", &["echo hello from tmux", "Enter"]);
    t.wait_line("one", "hello from tmux");
    // Ctrl-C is a byte for the guest (its shell reports an unknown command), not a signal
    // for the VM or the console.
    t.keys("one", &["C-c", "Enter"]);
    vm.expect_line("err unknown command '\u{3}'", Duration::from_secs(10));
    t.keys("one", &["echo after ctrl-c", "Enter"]);
    t.wait_line("one", "after ctrl-c");
    t.keys("one", &["C-]"]);
    t.wait_text("one", "[ray: detached from tty; it keeps running");
    t.wait_line("one", "[exit 0]");
    assert_eq!(vm.state(), VmStateName::Running);

    // Re-attached, the history is there; this console has the input again.
    t.session(&env, "two", &format!("{ray} vm console tty"));
    t.wait_line("two", "hello from tmux");
    t.keys("two", &["echo second", "Enter"]);
    t.wait_line("two", "second");
    // A third console watches; its input goes nowhere until it takes over.
    t.session(&env, "three", &format!("{ray} vm console tty"));
    t.wait_text("three", "read-only: another console has the input");
    t.keys("three", &["echo ignored", "Enter"]);
    t.wait_text("three", "this console is read-only");
    t.keys("two", &["echo seen by all", "Enter"]);
    t.wait_line("three", "seen by all");
    assert!(!vm.console().data.contains("ignored\n"));
    t.keys("three", &["C-]"]);
    t.wait_line("three", "[exit 0]");
    t.session(&env, "four", &format!("{ray} vm console tty --write"));
    t.wait_text("two", "read-only: another console has the input");
    t.keys("four", &["echo taken over", "Enter"]);
    t.wait_line("four", "taken over");
    t.wait_line("two", "taken over");

    // When the VM ends, every console says so and returns.
    t.keys("four", &["poweroff", "Enter"]);
    t.wait_text("two", "[ray: tty ended: terminated (guest:poweroff)]");
    t.wait_line("two", "[exit 0]");
    t.wait_line("four", "[exit 0]");
    vm.wait_exit(Duration::from_secs(5));
}

/// An attached `ray vm run` is a console too: Ctrl-C reaches the guest, Ctrl-] detaches and
/// the VM runs on.
#[test]
fn attached_run_is_a_console() {
    let env = Env::new("runattached");
    let ray = ray_bin().display().to_string();
    let t = Tmux::new(&env);
    t.session(&env, "run", &format!("{ray} vm run --id att"));
    t.wait_line("run", "ready");
    t.keys("run", &["echo typed into run", "Enter"]);
    t.wait_line("run", "typed into run");
    t.keys("run", &["C-c"]);
    t.keys("run", &["C-]"]);
    t.wait_line("run", "[exit 0]");
    let status = env.ray_ok(&["vm", "status", "att", "-o", "json"]);
    let info: VmInfo = serde_json::from_str(&status).unwrap();
    assert_eq!(
        info.state,
        VmStateName::Running,
        "Ctrl-C or detaching touched the VM"
    );
    let vm = env.attach("att", info.pid);
    env.ray_ok(&["vm", "stop", "att"]);
    vm.wait_exit(Duration::from_secs(10));
}

/// `ray vm logs` shows the serial log (also of an ended VM), its tail, follows it, and the
/// VMM's log.
#[test]
fn logs_show_and_follow() {
    let env = Env::new("logs");
    let mut vm = env.boot(&["--id", "lg"]);
    vm.expect_line("ready", READY);
    vm.command("echo first line", "first line");
    let all = env.ray_ok(&["vm", "logs", "lg"]);
    assert!(
        all.contains("ready\n") && all.ends_with("first line\n"),
        "{all}"
    );
    assert_eq!(
        env.ray_ok(&["vm", "logs", "lg", "--tail", "1"]),
        "first line\n"
    );
    let mut follow = Command::new(ray_bin())
        .args(["vm", "logs", "lg", "-f", "--tail", "1"])
        .env("RAY_RUNTIME_DIR", &env.runtime)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(follow.stdout.take().unwrap()));
    assert_eq!(lines.next().unwrap().unwrap(), "first line");
    vm.command("echo second line", "second line");
    assert_eq!(lines.next().unwrap().unwrap(), "second line");
    env.ray_ok(&["vm", "stop", "lg"]);
    // The follower ends by itself once the VM has ended and all of the log is out.
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(follow.wait().unwrap().success());
    assert!(rest.iter().any(|l| l == "poweroff"), "{rest:?}");
    assert!(
        env.ray_ok(&["vm", "logs", "lg"]).contains("second line"),
        "an ended VM's log stays"
    );
    let out = env.ray(&["vm", "logs", "lg", "--since", "10m"]);
    assert_eq!(out.status.code(), Some(2), "--since needs --vmm");
    env.ray_ok(&["vm", "logs", "lg", "--vmm"]);
}

/// The VMM's log: one JSON object per line with `--log-format json`, every event in the VM's
/// span (whatever thread logged it), `RUST_LOG` choosing levels per module; text at `info`
/// by default; an unknown format is refused naming the known ones.
#[test]
fn vmm_log_formats_spans_and_levels() {
    let env = Env::new("logfmt");
    let out = env.ray_with(
        &[
            "--log-format",
            "json",
            "vm",
            "run",
            "--detach",
            "--json",
            "--id",
            "lj",
        ],
        &[("RUST_LOG", "info,ray_vmm::api_server=debug")],
    );
    let info: VmInfo = serde_json::from_str(&ray_e2e::succeeded(out, "vm run")).unwrap();
    let mut vm = env.attach("lj", info.pid);
    vm.expect_line("ready", READY);
    env.ray_ok(&["vm", "pause", "lj"]);
    env.ray_ok(&["vm", "resume", "lj"]);
    env.ray_ok(&["vm", "stop", "lj"]);
    vm.wait_exit(Duration::from_secs(10));
    let log = std::fs::read_to_string(vm.dir.join("vmm.log")).unwrap();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let message = |e: &serde_json::Value| e["fields"]["message"].as_str().unwrap_or("").to_string();
    for e in &events {
        let spans = e["spans"]
            .as_array()
            .unwrap_or_else(|| panic!("no spans: {e}"));
        assert_eq!(
            (spans[0]["name"].as_str(), spans[0]["id"].as_str()),
            (Some("vm"), Some("lj")),
            "{e}"
        );
        if e["level"] == "DEBUG" {
            assert_eq!(
                e["target"], "ray_vmm::api_server",
                "RUST_LOG allows debug only there: {e}"
            );
        }
    }
    let has = |f: &dyn Fn(&serde_json::Value) -> bool| events.iter().any(f);
    assert!(
        has(&|e| message(e) == "VMM started" && e["fields"]["origin"] == "boot"),
        "{log}"
    );
    assert!(
        has(&|e| message(e) == "state changed" && e["fields"]["to"] == "paused"),
        "{log}"
    );
    assert!(
        has(&|e| message(e) == "state changed" && e["fields"]["to"] == "terminated"),
        "{log}"
    );
    assert!(
        has(&|e| message(e) == "API request"
            && e["fields"]["path"] == "/vm/pause"
            && e["fields"]["status"] == 200),
        "{log}"
    );
    assert!(has(&|e| message(e) == "VMM ended"), "{log}");

    // The default: text lines at info, nothing below it.
    let mut vm = env.boot(&["--id", "lt"]);
    vm.expect_line("ready", READY);
    env.ray_ok(&["vm", "pause", "lt"]);
    env.ray_ok(&["vm", "stop", "lt"]);
    vm.wait_exit(Duration::from_secs(10));
    let text = std::fs::read_to_string(vm.dir.join("vmm.log")).unwrap();
    assert!(
        text.lines().any(
            |l| l.contains(" INFO vm{id=lt}: ray_vmm::controller: state changed")
                && l.contains("to=paused")
        ),
        "{text}"
    );
    assert!(!text.contains("DEBUG") && !text.starts_with('{'), "{text}");

    let bad = env.ray(&["--log-format", "yaml", "vm", "list"]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("yaml") && err.contains("text") && err.contains("json"),
        "{err}"
    );
}
