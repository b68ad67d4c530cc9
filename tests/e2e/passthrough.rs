//! GPU passthrough end to end: a GPU-like device served over vfio-user by its own process
//! (`ray gpu-device serve`), passed to a VM (`--gpu passthrough,vfio-user=SOCKET`), driven
//! by our guest: configuration space, BARs, MSI-X and DMA in both directions; the device
//! process dying puts the GPU in Error with the reason while the VM runs on. And on this
//! host (no IOMMU) a host device is refused before anything starts, naming what is missing.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ray_api::gpu::{GpuList, GpuStateName, GpuType};
use ray_api::vmm::VmStateName;
use ray_e2e::{ray_bin, Env, Vm};

const READY: Duration = Duration::from_secs(60);
const ANSWER: Duration = Duration::from_secs(60);

/// The device process; killed when dropped.
struct DeviceProcess(Child);

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(env: &Env) -> (DeviceProcess, PathBuf) {
    let socket = env.runtime.join("gpu-device.sock");
    let child = Command::new(ray_bin())
        .args(["gpu-device", "serve", "--socket"])
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start ray gpu-device serve");
    let p = DeviceProcess(child);
    wait("the device socket", || socket.exists());
    (p, socket)
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn gpus(vm: &Vm) -> GpuList {
    vm.client
        .call("GET", "/vm/gpus", None)
        .expect("GET /vm/gpus")
}

fn ask(vm: &mut Vm, line: &str, prefix: &str) -> String {
    vm.send(line);
    vm.expect_line(prefix, ANSWER)
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

#[test]
fn a_vfio_user_gpu_is_driven_by_the_guest_and_its_death_leaves_the_vm_running() {
    let env = Env::new("passthrough");
    let (mut device, socket) = serve(&env);
    let gpu = format!("passthrough,vfio-user={}", socket.display());
    // Jailed as by default: the device's socket is outside the jail's root, and the
    // jail's keeper connects to it for the VMM.
    let mut vm = env.boot(&["--memory", "128M", "--gpu", &gpu]);
    vm.expect_line("ready", READY);

    // The function is on the bus with the device's identity.
    ask(&mut vm, "pci", "pci config=");
    let mut slots = Vec::new();
    while !slots
        .last()
        .is_some_and(|l: &String| l.ends_with("1234:5247"))
    {
        assert!(slots.len() < 32, "no 1234:5247 among {slots:?}");
        slots.push(vm.expect_line("pci 00:", ANSWER));
    }

    let list = gpus(&vm);
    assert_eq!(list.gpus.len(), 1);
    let g = &list.gpus[0];
    assert_eq!(g.kind, GpuType::Passthrough);
    assert_eq!(g.state, GpuStateName::Ready);
    assert_eq!(
        g.device.as_deref(),
        Some(format!("vfio-user {}", socket.display()).as_str())
    );
    assert_eq!(g.error, None);
    assert!(g.displays.is_empty());

    // The whole path, twice with different patterns.
    for seed in [5u64, 9] {
        let line = ask(&mut vm, &format!("gpupt {seed}"), "gpupt ");
        assert!(line.starts_with("gpupt ok "), "{line}");
        assert_eq!(field(&line, "id"), "1234:5247");
        assert_eq!(field(&line, "class"), "038000");
        assert!(field(&line, "bar0").ends_with("/1048576"), "{line}");
        assert!(field(&line, "bar2").ends_with("/4096"), "{line}");
        assert_eq!(field(&line, "msix"), "2");
        assert_eq!(
            field(&line, "irqs"),
            "2",
            "one MSI-X interrupt per DMA command"
        );
        // A masked vector's interrupt waits (none comes, the PBA bit is set) and comes
        // once on unmasking (the bit clears): the vector's own mask, then the function's.
        assert_eq!(field(&line, "mask"), "0/1/1/0", "{line}");
        assert_eq!(field(&line, "fmask"), "0/1/1/0", "{line}");
        assert_eq!(field(&line, "vram_mismatch"), "0");
        assert_eq!(field(&line, "back_mismatch"), "0");
        // The checksum the host expects of the pattern that came back.
        let expect = (0..4096u64).fold(0u32, |s, i| {
            s.wrapping_mul(31)
                .wrapping_add(u32::from(i.wrapping_mul(7).wrapping_add(seed * 13) as u8))
        });
        assert_eq!(field(&line, "sum"), format!("{expect:08x}"));
    }
    let status = env.ray_ok(&["gpu", "status", &vm.id]);
    assert!(status.contains("passthrough"), "{status}");
    assert!(
        status.contains(&format!("GPU 0: vfio-user {}", socket.display())),
        "{status}"
    );

    // The device process dies: the GPU goes to Error with the reason, the VM runs on.
    device.0.kill().expect("kill the device process");
    device.0.wait().expect("reap the device process");
    wait("the GPU to go to Error", || {
        gpus(&vm).gpus[0].state == GpuStateName::Error
    });
    let g = gpus(&vm).gpus.remove(0);
    let e = g.error.expect("an Error GPU says why");
    assert!(
        e.starts_with(&format!(
            "passthrough device vfio-user {} stopped answering: ",
            socket.display()
        )),
        "{e}"
    );
    let line = ask(&mut vm, "gpupt 3", "gpupt ");
    assert_eq!(
        line, "gpupt err the device does not answer (id register 0xffffffff)",
        "{line}"
    );
    assert_eq!(ask(&mut vm, "echo still here", "still"), "still here");
    assert_eq!(vm.info().state, VmStateName::Running);
    let status = env.ray_ok(&["gpu", "status", &vm.id]);
    assert!(status.contains("error"), "{status}");
    assert!(
        status.contains("GPU 0 error: passthrough device vfio-user"),
        "{status}"
    );
}

#[test]
fn a_host_device_is_refused_on_a_host_without_iommu_naming_what_is_missing() {
    let env = Env::new("passthrough-host");
    let host = env.ray_ok(&["gpu", "list", "--host"]);
    let report: serde_json::Value =
        serde_json::from_str(&env.ray_ok(&["gpu", "list", "--host", "--json"])).unwrap();
    let groups = std::fs::read_dir("/sys/kernel/iommu_groups").map_or(0, |d| d.count());
    assert_eq!(report["iommu_groups"], groups);
    assert_eq!(
        report["vfio_container"],
        std::path::Path::new("/dev/vfio/vfio").exists()
    );
    if groups > 0 {
        // A host with an IOMMU: nothing more to check here.
        assert!(host.contains("passthrough: "), "{host}");
        return;
    }
    assert_eq!(report["passthrough"], false);
    assert!(
        host.contains("passthrough: not possible on this host"),
        "{host}"
    );
    assert!(
        host.contains("missing: no IOMMU (/sys/kernel/iommu_groups is empty"),
        "{host}"
    );

    for (args, msg) in [
        (
            "passthrough,host=0000:01:00.0",
            "GPU passthrough of host device 0000:01:00.0 is not possible here: no IOMMU",
        ),
        ("passthrough,host=1:2:3", "'1:2:3' is not a PCI address"),
        (
            "passthrough",
            "a passthrough GPU takes exactly one of vfio-user=SOCKET or host=BDF",
        ),
    ] {
        let out = env.ray(&["vm", "run", "--detach", "--gpu", args]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args} was accepted");
        assert!(err.contains(msg), "{args}: {err}");
    }
    // A vfio-user socket nobody serves: the VM does not start, and says why (jailed, as
    // by default: its keeper could not connect).
    let out = env.ray(&[
        "vm",
        "run",
        "--detach",
        "--gpu",
        "passthrough,vfio-user=/nonexistent/gpu.sock",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot reach the vfio-user device at /nonexistent/gpu.sock"),
        "{err}"
    );
    let list = env.ray_ok(&["vm", "list", "-o", "json"]);
    let vms: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert!(
        vms.as_array()
            .unwrap()
            .iter()
            .all(|v| v["state"] != "running"),
        "{list}"
    );
}

fn signal(p: &DeviceProcess, sig: libc::c_int) {
    // SAFETY: a signal to our own child, which has not been reaped (it is waited for only
    // when dropped).
    let r = unsafe { libc::kill(p.0.id() as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill({sig}): {}", std::io::Error::last_os_error());
}

#[test]
fn a_hung_device_process_is_given_up_after_its_bound_and_the_vm_runs_on() {
    let env = Env::new("passthrough-hung");
    let (mut device, socket) = serve(&env);
    let gpu = format!("passthrough,vfio-user={},timeout-ms=1000", socket.display());
    let mut vm = env.boot(&["--memory", "128M", "--gpu", &gpu]);
    vm.expect_line("ready", READY);
    let line = ask(&mut vm, "gpupt 5", "gpupt ");
    assert!(line.starts_with("gpupt ok "), "{line}");

    // The device process stops (as a hung one would): the guest's next BAR access waits
    // at most the bound, reads all-ones, and the shell goes on.
    signal(&device, libc::SIGSTOP);
    let line = ask(&mut vm, "gpupt 3", "gpupt ");
    assert_eq!(
        line, "gpupt err the device does not answer (id register 0xffffffff)",
        "{line}"
    );
    assert_eq!(ask(&mut vm, "echo still here", "still"), "still here");
    assert_eq!(vm.info().state, VmStateName::Running);
    let g = gpus(&vm).gpus.remove(0);
    assert_eq!(g.state, GpuStateName::Error);
    let s = socket.display();
    assert_eq!(
        g.error.as_deref(),
        Some(
            format!(
                "passthrough device vfio-user {s} stopped answering: the vfio-user device at \
                 {s} did not answer a read of region 2 at 0x0 within 1000 ms (the link is closed)"
            )
            .as_str()
        )
    );
    let status = env.ray_ok(&["gpu", "status", &vm.id]);
    assert!(status.contains("within 1000 ms"), "{status}");

    // Resumed, the device finds its link closed and serves the next VMM; this VM's GPU
    // stays in Error (the device was reset for the new link: the guest's driver state is
    // gone), and the VM still runs.
    signal(&device, libc::SIGCONT);
    let mut other = env.boot(&["--memory", "128M", "--gpu", &gpu]);
    other.expect_line("ready", READY);
    let line = ask(&mut other, "gpupt 9", "gpupt ");
    assert!(line.starts_with("gpupt ok "), "{line}");
    assert!(
        device.0.try_wait().unwrap().is_none(),
        "the device process runs"
    );
    assert_eq!(gpus(&vm).gpus[0].state, GpuStateName::Error);
    assert_eq!(ask(&mut vm, "echo and here", "and"), "and here");
}
