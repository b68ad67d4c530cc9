//! What an attacker on the migration network sees and can do: two VMMs in two network
//! namespaces joined by a veth pair (private addresses), a guest holding a known byte
//! pattern in its RAM, and `tcpdump` on the target's end of the veth.
//!
//! - Encrypted (the default over TCP), the capture holds no copy of the pattern; with
//!   `--insecure-plaintext` on both ends it does (the control that shows the capture would
//!   have caught it).
//! - A relay that flips one bit of the stream after the handshake makes the target refuse
//!   the stream with an integrity error; the source rolls back and runs on.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ray_api::vmm::{MigrationStatus, VmInfo, VmStateName};
use ray_e2e::{region_of, Env, Vm};

use crate::migration::{
    assert_failed_and_running, assert_source_runs, boot_source, start_ok, start_to, Net,
};

/// Guest memory the pattern fills.
const PATTERN_MIB: u64 = 8;

/// A word that exists nowhere but in this run's guest memory.
fn fresh_word(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("RAYSEAL-{tag}-{nanos:x}")
}

/// Fills guest memory with `word`; returns (region, its sum).
fn fill_pattern(src: &mut Vm, word: &str) -> (u64, String) {
    let line = src.command(&format!("pattern {PATTERN_MIB} {word}"), "pattern on");
    let base = region_of(&line);
    let sum = src.sum(base, PATTERN_MIB << 20);
    (base, sum)
}

/// A target VMM in namespace B on `port`, with `extra` options for `migrate receive`.
fn receive(env: &Env, net: &Net, port: u16, key: &str, extra: &[&str]) -> Vm {
    let addr = net.target_addr(port);
    let mut args = vec![
        "migrate",
        "receive",
        "--listen",
        &addr,
        "--key-file",
        key,
        "--memory",
        "128M",
        "--vcpus",
        "2",
        "--id",
        "dst",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = net.ray_ok(env, &net.b, &args);
    let info: VmInfo = serde_json::from_str(&out).expect("migrate receive --json prints VmInfo");
    assert_eq!(info.state, VmStateName::MigrationTarget);
    env.attach("dst", info.pid)
}

/// `tcpdump` writing every packet to or from `port` on the target's veth into `file`;
/// returns once it captures.
fn capture(net: &Net, port: u16, file: &std::path::Path) -> Child {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.b,
            "tcpdump",
            "-i",
            &net.veth_b,
            "-U",
            "-s",
            "0",
            // A 128 MiB kernel buffer: the migration outruns the writer of a small one,
            // and a packet dropped is a packet not checked.
            "-B",
            "131072",
        ])
        .arg("-w")
        .arg(file)
        .args(["tcp", "port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run tcpdump (scripts/setup installs it)");
    let mut first = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("listening on"), "tcpdump: {first}");
    child
}

/// Stops `tcpdump` (SIGINT: it writes out what it holds) and returns the capture.
fn stop_capture(mut child: Child, file: &std::path::Path) -> Vec<u8> {
    // SAFETY: kill(2) of the tcpdump this test started (`ip netns exec` execs it).
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "tcpdump ended with {status}");
    std::fs::read(file).unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Migrates a guest holding a fresh word in its RAM across the veth while tcpdump
/// captures it; `extra` goes to both ends. Returns (the word, the capture).
fn captured_migration(tag: &str, port: u16, extra: &[&str]) -> (String, Vec<u8>) {
    let env = Env::new(&format!("mig-{tag}"));
    let net = Net::new(tag);
    let key = env.key_file("key", "a pre-shared key of some length");
    let mut src = boot_source(&env, &net, "128M");
    let word = fresh_word(tag);
    let (base, before) = fill_pattern(&mut src, &word);
    let file = env.runtime.join(format!("{tag}.pcap"));
    let dump = capture(&net, port, &file);
    let mut dst = receive(&env, &net, port, &key, extra);
    let mut args = extra.to_vec();
    args.push("--json");
    let s: MigrationStatus = serde_json::from_str(&start_ok(&env, &net, port, &key, &args))
        .expect("migrate start --json prints the status");
    // "completed" includes the end-to-end check: the target compared its page hashes with
    // the source's before it resumed.
    assert_eq!(
        (s.state.as_str(), s.vm.as_str()),
        ("completed", "migrated"),
        "{s:?}"
    );
    assert_eq!(
        dst.sum(base, PATTERN_MIB << 20),
        before,
        "the pattern differs on the target"
    );
    let pcap = stop_capture(dump, &file);
    assert!(
        pcap.len() as u64 > PATTERN_MIB << 20,
        "the capture holds {} bytes, less than the pattern alone: it missed the migration",
        pcap.len()
    );
    (word, pcap)
}

#[test]
fn an_encrypted_migration_shows_no_guest_memory_on_the_wire_and_a_plaintext_one_does() {
    let (word, pcap) = captured_migration("wire-enc", 7011, &[]);
    assert!(
        !contains(&pcap, word.as_bytes()),
        "the guest's pattern {word} is readable in the capture of an encrypted migration"
    );
    // The control: the same capture of an explicitly plaintext migration shows it.
    let (word, pcap) = captured_migration("wire-clear", 7012, &["--insecure-plaintext"]);
    assert!(
        contains(&pcap, word.as_bytes()),
        "the pattern {word} is missing from a plaintext capture: the check above proves nothing"
    );
}

/// Moves the calling thread into network namespace `ns`.
fn enter_netns(ns: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: setns on a namespace descriptor held open; CLONE_NEWNET moves only this thread.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
}

/// A relay in namespace B from `listen` to `to` that flips one bit of the source's
/// stream at byte `at`; returns how many bytes it relayed from the source.
fn tampering_relay(
    ns: String,
    listen: String,
    to: String,
    at: u64,
) -> std::thread::JoinHandle<u64> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let relay = std::thread::spawn(move || {
        enter_netns(&ns);
        let l = TcpListener::bind(&listen).unwrap();
        ready_tx.send(()).unwrap();
        let (mut from_src, _) = l.accept().unwrap();
        let mut to_dst = TcpStream::connect(&to).unwrap();
        let (mut back_r, mut back_w) = (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_r, &mut back_w);
            let _ = back_w.shutdown(std::net::Shutdown::Both);
        });
        let (mut seen, mut buf) = (0u64, vec![0u8; 64 << 10]);
        loop {
            let n = match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (seen..seen + n as u64).contains(&at) {
                buf[(at - seen) as usize] ^= 0x10;
            }
            seen += n as u64;
            if to_dst.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
        seen
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the relay did not start");
    relay
}

#[test]
fn a_bit_flipped_on_the_wire_fails_the_migration_and_the_source_runs_on() {
    let env = Env::new("mig-tamper");
    let net = Net::new("tamper");
    let key = env.key_file("key", "a pre-shared key of some length");
    let mut src = boot_source(&env, &net, "128M");
    // Guest data to send, so that the flip lands in the page stream.
    fill_pattern(&mut src, &fresh_word("tamper"));
    let dst = receive(&env, &net, 7013, &key, &[]);
    // 1 MiB in: long after the handshake (a few hundred bytes), inside the page stream.
    let relay = tampering_relay(
        net.b.clone(),
        net.target_addr(7014),
        net.target_addr(7013),
        1 << 20,
    );
    let out = start_to(&env, &net, 7014, &key, &["--json"]);
    assert!(!out.status.success(), "a tampered migration completed");
    assert!(relay.join().unwrap() > 1 << 20);
    let s: MigrationStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert_failed_and_running(&s);
    assert_source_runs(&mut src);
    // The target names what failed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = dst.dir.join("vmm.log");
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("integrity check failed") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the target's log does not name the integrity failure:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
