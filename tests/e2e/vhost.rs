//! `ray device serve` facing a hostile front end: malformed vhost-user messages end that
//! front end's session with a log line naming what was wrong, and the process serves the
//! next front end as if nothing happened.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ray_e2e::{ray_bin, Env};

const GET_FEATURES: u32 = 1;
const SET_MEM_TABLE: u32 = 5;
const VERSION_1: u64 = 1 << 32;

fn message(request: u32, flags: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

fn connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).expect("connect to the back end");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// A well-behaved front end's first question; the answer must offer VERSION_1.
fn features(socket: &Path) -> u64 {
    let mut s = connect(socket);
    s.write_all(&message(GET_FEATURES, 1, 0, &[])).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).expect("a GET_FEATURES reply");
    assert_eq!(
        u32::from_le_bytes(reply[..4].try_into().unwrap()),
        GET_FEATURES
    );
    u64::from_le_bytes(reply[12..].try_into().unwrap())
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn malformed_vhost_user_messages_end_only_that_front_end() {
    let env = Env::new("vhost-bad");
    let disk = env.runtime.join("d.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let socket = env.runtime.join("blk.sock");
    let log = env.runtime.join("serve.log");
    let mut served = Served(
        Command::new(ray_bin())
            .args(["device", "serve", "blk", "--socket"])
            .arg(&socket)
            .arg("--disk")
            .arg(&disk)
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the socket", || socket.exists());
    assert_ne!(features(&socket) & VERSION_1, 0);

    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "an oversized payload",
            message(GET_FEATURES, 1, 100_000, &[]),
            "GET_FEATURES announces a 100000-byte payload",
        ),
        (
            "an unknown request",
            message(9999, 1, 0, &[]),
            "request 9999 is not a vhost-user request",
        ),
        (
            "a memory table claiming 1000 regions",
            message(SET_MEM_TABLE, 1, 8, &1000u64.to_le_bytes()),
            "SET_MEM_TABLE names 1000 regions in a 8-byte payload",
        ),
        (
            "a header cut short",
            message(GET_FEATURES, 1, 0, &[])[..6].to_vec(),
            "the front end left in the middle of a message header",
        ),
    ];
    for (what, bytes, said) in cases {
        let mut s = connect(&socket);
        s.write_all(&bytes).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        // The back end hangs up on this front end (or answers nothing useful)...
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        drop(s);
        wait_for(what, || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains(said))
        });
        // ...and is alive and serves the next one.
        assert!(
            served.0.try_wait().unwrap().is_none(),
            "{what}: the back end exited"
        );
        assert_ne!(features(&socket) & VERSION_1, 0, "after {what}");
    }
}
