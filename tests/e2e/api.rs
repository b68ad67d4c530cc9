//! Bad input to the API and the CLI: clear 4xx errors, and the VMM keeps running.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ray::client::{ClientError, VmmClient};
use ray_api::vmm::{VmInfo, VmStateName};
use ray_e2e::{guest_bin, ray_bin, Env};

/// A VMM in state Created (no configuration), serving its API.
struct Bare {
    child: Child,
    client: VmmClient,
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bare_vmm(env: &Env) -> Bare {
    let dir = env.runtime.join("vms").join("bare");
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new(ray_bin())
        .args(["vmm", "--id", "bare", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let client = VmmClient::new(&dir.join("api.sock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.call::<VmInfo>("GET", "/vm", None).is_err() {
        assert!(Instant::now() < deadline, "bare VMM did not come up");
        std::thread::sleep(Duration::from_millis(5));
    }
    Bare { child, client }
}

fn put_config(b: &Bare, body: &str) -> (u16, String) {
    match b
        .client
        .call::<VmInfo>("PUT", "/vm/config", Some(body.as_bytes().to_vec()))
    {
        Ok(_) => (200, String::new()),
        Err(ClientError::Api {
            status, message, ..
        }) => (status, message),
        Err(e) => panic!("transport error: {e}"),
    }
}

#[test]
fn bad_bodies_get_clear_4xx_and_the_vmm_keeps_running() {
    let env = Env::new("badinput");
    let b = bare_vmm(&env);
    let kernel = guest_bin().display().to_string();
    let good = |vcpus: &str, mem: &str, kernel: &str| {
        format!(r#"{{"kernel":"{kernel}","vcpus":{vcpus},"memory_bytes":{mem}}}"#)
    };
    let cases: Vec<(String, u16, String)> = vec![
        (
            "{\"kernel\": ".into(),
            400,
            "invalid JSON body for PUT /vm/config".into(),
        ),
        ("".into(), 400, "needs a JSON body".into()),
        (
            format!(r#"{{"kernel":"{kernel}","vcpus":1,"memory_bytes":134217728,"cpu":1}}"#),
            400,
            "unknown field `cpu`".into(),
        ),
        (
            good("0", "134217728", &kernel),
            400,
            "vcpus must be between 1 and 254, got 0".into(),
        ),
        (
            good("1", "134217729", &kernel),
            400,
            "multiple of 4096 (a whole number of pages), got 134217729".into(),
        ),
        (
            good("1", "1099511627776", &kernel),
            400,
            "is more than this host has".into(),
        ),
        (
            good("1", "1048576", &kernel),
            400,
            "at least 33554432 (32 MiB), got 1048576".into(),
        ),
        (
            good("1", "134217728", "/no/such/kernel"),
            400,
            "kernel file /no/such/kernel does not exist".into(),
        ),
        (
            good("-1", "134217728", &kernel),
            400,
            "invalid value: integer `-1`".into(),
        ),
        (
            r#"{"kernel":5,"vcpus":1,"memory_bytes":1}"#.into(),
            400,
            "invalid type: integer `5`, expected a string".into(),
        ),
    ];
    for (body, status, needle) in cases {
        let (got, message) = put_config(&b, &body);
        assert_eq!(got, status, "body {body:?}: {message}");
        assert!(
            message.contains(&needle),
            "body {body:?}: {message:?} lacks {needle:?}"
        );
    }
    // Unknown endpoints and methods.
    let a = b.client.raw("GET", "/vm/nope", None).unwrap();
    assert_eq!(a.status, 404);
    assert!(String::from_utf8_lossy(&a.body).contains("no such endpoint: GET /vm/nope"));
    let a = b.client.raw("DELETE", "/vm", None).unwrap();
    assert_eq!(a.status, 405);
    // Starting before configuring is refused with the reason.
    let err = b
        .client
        .call::<VmInfo>("PUT", "/vm/start", None)
        .unwrap_err();
    assert!(err.to_string().contains("no configuration yet"), "{err}");
    // Nothing of the above changed the VMM: it still answers, still Created, no config.
    let info: VmInfo = b.client.call("GET", "/vm", None).unwrap();
    assert_eq!(info.state, VmStateName::Created);
    assert!(info.config.is_none());
    let events: Vec<serde_json::Value> = b.client.call("GET", "/vm/events", None).unwrap();
    assert!(
        events.is_empty(),
        "refused requests must not be recorded as transitions: {events:?}"
    );
    // And a good configuration is still accepted afterwards.
    let (got, message) = put_config(&b, &good("1", "134217728", &kernel));
    assert_eq!(got, 200, "{message}");
}

#[test]
fn openapi_document_is_served_and_matches_the_repository() {
    let env = Env::new("openapi");
    let b = bare_vmm(&env);
    let served: serde_json::Value = b.client.call("GET", "/openapi.json", None).unwrap();
    let committed: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/openapi/vmm.json")).unwrap();
    assert_eq!(served, committed);
    for path in [
        "/vm",
        "/vm/config",
        "/vm/pause",
        "/vm/resume",
        "/vm/stop",
        "/vm/events",
        "/vm/console",
    ] {
        assert!(
            served["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
}

#[test]
fn cli_errors_have_distinct_exit_codes() {
    let env = Env::new("cli");
    let out = env.ray(&["vm", "status", "nosuchvm"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM 'nosuchvm'"));
    let out = env.ray(&["vm", "run", "--vcpus", "many"]);
    assert_eq!(out.status.code(), Some(2));
    let out = env.ray(&["vm", "run", "--memory", "12Q", "--detach"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown size unit 'Q'"));
    let out = env.ray(&["vm", "status", "../etc"]);
    assert_eq!(out.status.code(), Some(6));
    let out = env.ray(&["vm", "run", "--detach", "--vcpus", "0"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vcpus must be between 1 and 254, got 0"));
}
