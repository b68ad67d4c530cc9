//! The remote GPU end to end: the guest's virtio-gpu driver against a VMM whose 2D work
//! a `ray gpu backend` process does, over a Unix socket and over loopback TCP with a
//! token. What the guest drew is what the screenshots show; the back end killed with
//! SIGKILL puts the GPU in error (the VM runs on, the display keeps its picture); a fake
//! back end sending garbage loses its connection; a new back end gets the VMM's replay and
//! the display is right again, also for what the guest drew while it was gone, and after
//! a snapshot's restore.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ray_api::gpu::{GpuInfo, GpuList};
use ray_api::vmm::VmStateName;
use ray_e2e::{ray_bin, Env, Vm};
use ray_guest_abi::display::Pattern;

use crate::display::{assert_shows_at, draw_virtio, screenshot};

const READY: Duration = Duration::from_secs(20);
/// Generous: the whole suite shares two cores.
const WAIT: Duration = Duration::from_secs(30);

/// `ray gpu backend ARGS`, its stdout piped.
fn backend(args: &[&str]) -> Child {
    let mut cmd = Command::new(ray_bin());
    cmd.args(["gpu", "backend"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start ray gpu backend")
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "waited {WAIT:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A back end on a Unix socket, once its socket takes connections.
fn unix_backend(socket: &Path) -> Child {
    let _ = std::fs::remove_file(socket);
    let child = backend(&["--socket", socket.to_str().unwrap()]);
    wait_until("the back end's socket", || {
        std::os::unix::net::UnixStream::connect(socket).is_ok()
    });
    child
}

fn gpu0(vm: &Vm) -> GpuInfo {
    let list: GpuList = vm
        .client
        .call("GET", "/vm/gpus", None)
        .expect("GET /vm/gpus");
    list.gpus.into_iter().next().expect("a GPU")
}

fn state(g: &GpuInfo) -> String {
    serde_json::to_value(g.state)
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

fn wait_state(vm: &Vm, want: &str) -> GpuInfo {
    let mut last = None;
    wait_until(&format!("GPU state {want}"), || {
        let g = gpu0(vm);
        let ok = state(&g) == want;
        last = Some(g);
        ok
    });
    last.unwrap()
}

/// A fake back end: takes each connection, reads the Hello and answers garbage (a frame
/// longer than the protocol allows), until stopped; counts the connections it spoiled.
struct Fake {
    stop: Arc<AtomicBool>,
    spoiled: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fake {
    fn start(socket: &Path) -> Fake {
        let _ = std::fs::remove_file(socket);
        let l = UnixListener::bind(socket).unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let spoiled = Arc::new(AtomicU32::new(0));
        let (s2, c2) = (stop.clone(), spoiled.clone());
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut len = [0u8; 4];
                if c.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut hello = vec![0; u32::from_le_bytes(len).min(4096) as usize];
                let _ = c.read_exact(&mut hello);
                let _ = c.write_all(&[0xff, 0xff, 0xff, 0x7f, 66, 1, 2, 3]);
                c2.fetch_add(1, Ordering::Relaxed);
            }
        });
        Fake {
            stop,
            spoiled,
            thread: Some(thread),
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_remote_gpu_shows_what_the_guest_drew_and_survives_its_back_end_dying_and_lying() {
    let env = Env::new("gpu-remote");
    let socket = env.runtime.join("gpu.sock");
    let mut back = unix_backend(&socket);
    let gpu = format!(
        "remote,socket={},width=640,height=480,displays=2",
        socket.display()
    );
    // Jailed as by default: the back end's socket is outside the jail's root, and the
    // jail's keeper connects to it (each reconnection too) for the VMM.
    let mut vm = env.boot(&["--memory", "128M", "--gpu", &gpu]);
    vm.expect_line("ready", READY);
    let (changed, requests, _) = draw_virtio(&mut vm, "checker", 7, 0);
    assert_eq!((changed.as_str(), requests), ("640x480+0+0", 2));
    draw_virtio(&mut vm, "gradient", 3, 1);
    let g = gpu0(&vm);
    assert_eq!(serde_json::to_value(g.kind).unwrap(), "remote");
    assert_eq!(state(&g), "ready");
    assert_eq!(g.backend, Some(format!("unix:{}", socket.display())));
    assert_eq!(g.error, None);
    assert_eq!(g.displays.len(), 2);
    let size = (640, 480);
    assert_shows_at(
        &screenshot(&env, &vm.id, 0, "a0.png"),
        Pattern::Checker,
        7,
        size,
    );
    assert_shows_at(
        &screenshot(&env, &vm.id, 1, "a1.png"),
        Pattern::Gradient,
        3,
        size,
    );

    // kill -9: the GPU goes to error with the reason; the VM runs on and the display
    // keeps its last picture.
    back.kill().unwrap();
    back.wait().unwrap();
    let g = wait_state(&vm, "error");
    let why = g.error.clone().expect("a reason");
    assert!(why.contains("back end"), "{why}");
    let status = env.ray_ok(&["gpu", "status", &vm.id]);
    assert!(status.contains("error"), "{status}");
    assert!(
        status.contains(&format!("unix:{}", socket.display())),
        "{status}"
    );
    assert_eq!(vm.state(), VmStateName::Running);
    assert_shows_at(
        &screenshot(&env, &vm.id, 0, "b0.png"),
        Pattern::Checker,
        7,
        size,
    );
    // The guest draws meanwhile: its commands are refused, its backing has the picture.
    let refused = vm.command("draw bars 0 0", "err draw");
    assert!(refused.contains("refused"), "{refused}");
    assert_eq!(vm.state(), VmStateName::Running);

    // A back end that answers garbage loses its connection (again at each attempt); the
    // VM carries on.
    let fake = Fake::start(&socket);
    wait_until("the fake back end's second spoiled connection", || {
        fake.spoiled.load(Ordering::Relaxed) >= 2
    });
    wait_until("a reason naming the broken protocol", || {
        gpu0(&vm)
            .error
            .is_some_and(|r| r.contains("broke the protocol"))
    });
    assert_eq!(state(&gpu0(&vm)), "error");
    assert_eq!(vm.state(), VmStateName::Running);
    drop(fake);

    // A new back end: the VMM reconnects and replays; the display shows what the guest
    // drew while the back end was gone, without the guest doing anything.
    let mut again = unix_backend(&socket);
    let g = wait_state(&vm, "ready");
    assert_eq!(g.error, None);
    assert_shows_at(
        &screenshot(&env, &vm.id, 0, "c0.png"),
        Pattern::Bars,
        0,
        size,
    );
    assert_shows_at(
        &screenshot(&env, &vm.id, 1, "c1.png"),
        Pattern::Gradient,
        3,
        size,
    );
    let (changed, requests, _) = draw_virtio(&mut vm, "fill", 0x123456, 1);
    assert_eq!((changed.as_str(), requests), ("640x480+0+0", 2));
    assert_shows_at(
        &screenshot(&env, &vm.id, 1, "d1.png"),
        Pattern::Fill,
        0x123456,
        size,
    );

    // A snapshot holds the ledger: the restored VM's GPU replays it to the back end and
    // shows the same pictures.
    let back = env.snapshot_and_restore(&vm, "snap", "restored");
    let g = wait_state(&back, "ready");
    assert_eq!(g.error, None);
    assert_shows_at(
        &screenshot(&env, "restored", 0, "r0.png"),
        Pattern::Bars,
        0,
        size,
    );
    assert_shows_at(
        &screenshot(&env, "restored", 1, "r1.png"),
        Pattern::Fill,
        0x123456,
        size,
    );
    let _ = again.kill();
    let _ = again.wait();
}

#[test]
fn a_remote_gpu_over_tcp_needs_the_token() {
    let env = Env::new("gpu-remote-tcp");
    let token = env.runtime.join("token");
    std::fs::write(&token, "a-token-of-twenty-four-b\n").unwrap();
    let wrong = env.runtime.join("wrong");
    std::fs::write(&wrong, "not-the-token-of-the-end").unwrap();
    let mut back = backend(&[
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    let mut line = String::new();
    BufReader::new(back.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("'{line}'"))
        .to_string();

    // Without a token file, or on a Unix socket with one: refused before the VM starts.
    let out = env.ray(&[
        "vm",
        "run",
        "--detach",
        "--gpu",
        &format!("remote,tcp={addr}"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs token-file=FILE"), "{err}");

    let gpu = |file: &Path| {
        format!(
            "remote,tcp={addr},token-file={},width=640,height=480",
            file.display()
        )
    };
    // Jailed as by default: the VMM has a network namespace of its own (not the host's
    // loopback), so its keeper dials the back end, and opens the token file, which stays
    // private to root.
    let mut vm = env.boot(&["--memory", "128M", "--gpu", &gpu(&token)]);
    vm.expect_line("ready", READY);
    draw_virtio(&mut vm, "checker", 5, 0);
    let g = gpu0(&vm);
    assert_eq!(
        (state(&g), g.backend),
        ("ready".into(), Some(format!("tcp:{addr}")))
    );
    assert_shows_at(
        &screenshot(&env, &vm.id, 0, "t0.png"),
        Pattern::Checker,
        5,
        (640, 480),
    );

    // The wrong token: refused by the back end, the GPU in error saying so, the VM runs.
    let bad = env.boot(&["--memory", "128M", "--gpu", &gpu(&wrong)]);
    let g = wait_state(&bad, "error");
    let why = g.error.unwrap_or_default();
    assert!(why.contains("the token is wrong"), "{why}");
    assert_eq!(bad.state(), VmStateName::Running);
    // The good VM is untouched.
    assert_eq!(state(&gpu0(&vm)), "ready");
    let _ = back.kill();
    let _ = back.wait();
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: a signal to our own child, not yet reaped.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill({sig}): {}", std::io::Error::last_os_error());
}

#[test]
fn a_stopped_back_end_puts_the_gpu_in_error_within_its_bound_and_resumed_it_is_ready_again() {
    let env = Env::new("gpu-remote-stopped");
    let socket = env.runtime.join("gpu.sock");
    let mut back = unix_backend(&socket);
    let gpu = format!(
        "remote,socket={},width=640,height=480,timeout-ms=1000",
        socket.display()
    );
    let mut vm = env.boot(&["--memory", "128M", "--gpu", &gpu]);
    vm.expect_line("ready", READY);
    draw_virtio(&mut vm, "checker", 7, 0);
    assert_eq!(state(&gpu0(&vm)), "ready");
    let size = (640, 480);

    // Stopped (as a hung back end): the link's next ping gets no answer within the bound;
    // the GPU goes to error naming it, the VM runs on and the display keeps its picture.
    signal(&back, libc::SIGSTOP);
    let g = wait_state(&vm, "error");
    let why = g.error.expect("a reason");
    assert!(why.contains("did not answer within 1000 ms"), "{why}");
    vm.send("echo still here");
    assert_eq!(vm.expect_line("still", WAIT), "still here");
    assert_eq!(vm.state(), VmStateName::Running);
    assert_shows_at(
        &screenshot(&env, &vm.id, 0, "s0.png"),
        Pattern::Checker,
        7,
        size,
    );

    // Resumed: the VMM's next attempt is welcomed, the ledger replayed, the GPU ready,
    // and what the guest draws shows again.
    signal(&back, libc::SIGCONT);
    let g = wait_state(&vm, "ready");
    assert_eq!(g.error, None);
    let (changed, requests, _) = draw_virtio(&mut vm, "gradient", 3, 0);
    assert_eq!((changed.as_str(), requests), ("640x480+0+0", 2));
    assert_shows_at(
        &screenshot(&env, &vm.id, 0, "r0.png"),
        Pattern::Gradient,
        3,
        size,
    );
    let _ = back.kill();
    let _ = back.wait();
}
