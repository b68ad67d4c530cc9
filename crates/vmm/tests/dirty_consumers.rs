//! The dirty log's consumers on a real KVM VM running rayvisor's guest: a snapshot, a
//! migration and a display-like consumer each take their own dirty pages, interleaved,
//! while the guest keeps writing memory; each must see every page whose contents changed
//! since its own previous take (checked against copies of guest memory taken with the VM
//! paused at each take).
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ray_memory::{ConsumerId, DirtyBitmap, GuestMemory, OwnedMemory, PAGE_SIZE};
use ray_vmm::boot::BootSpec;
use ray_vmm::devices::ConsoleRing;
use ray_vmm::machine::{ConsoleSinks, Machine};
use ray_vmm::vstate::vcpu::EventSink;
use ray_vmm::vstate::Flavour;

/// rayvisor's guest kernel, built next to this test (target/<profile>/rayvisor-guest).
fn guest() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("rayvisor-guest");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace` first",
        bin.display()
    );
    bin
}

fn wait_for(ring: &ConsoleRing, text: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, tail) = ring.tail(1 << 16);
        let tail = String::from_utf8_lossy(&tail).into_owned();
        if tail.contains(text) {
            return tail;
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} on the console: {tail}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn type_line(m: &Machine, line: &str) {
    m.bus
        .lock_console()
        .queue_input(format!("{line}\r").as_bytes())
        .unwrap();
    ray_vmm::heartbeat::raise(m.vm.memory.ram(), ray_guest_abi::offset::INPUT_DOORBELL);
    m.wake_idle();
}

/// Pages whose contents differ between two copies of guest memory.
fn changed(before: &OwnedMemory, after: &OwnedMemory) -> Vec<u64> {
    let mut out = Vec::new();
    let (mut a, mut b) = (vec![0u8; PAGE_SIZE as usize], vec![0u8; PAGE_SIZE as usize]);
    for r in &before.layout().regions {
        for p in 0..r.pages() {
            let gpa = r.gpa + p * PAGE_SIZE;
            before.read(gpa, &mut a).unwrap();
            after.read(gpa, &mut b).unwrap();
            if a != b {
                out.push(gpa);
            }
        }
    }
    out
}

#[test]
fn snapshot_migration_and_display_consumers_each_see_every_change_since_their_own_take() {
    let ring = Arc::new(ConsoleRing::default());
    let events: EventSink = Arc::new(|_| {});
    let spec = BootSpec {
        kernel: guest(),
        initrd: None,
        cmdline: String::new(),
        vcpus: 1,
        mem_bytes: 64 << 20,
        devices: Default::default(),
        numa: None,
        attribution: false,
    };
    let sinks = ConsoleSinks {
        log: None,
        stdout: false,
        ring: ring.clone(),
    };
    let mut m = Machine::boot(&spec, Flavour::detect(), sinks, events).unwrap();
    wait_for(&ring, "ready", Duration::from_secs(10));
    let names = ["snapshot", "migration", "display"];
    let ids: Vec<ConsumerId> = names
        .iter()
        .map(|n| m.vm.add_dirty_consumer(n, None).unwrap())
        .collect();
    // Each consumer's copy of memory as of its last take (the VM paused at that moment).
    let copy = |m: &Machine| OwnedMemory::copy_of(&m.vm.memory).unwrap();
    let mut last: Vec<OwnedMemory> = (0..3).map(|_| copy(&m)).collect();
    type_line(&m, "dirty 2 50");
    wait_for(&ring, "dirty on", Duration::from_secs(5));
    // Interleaved takes: consumer k takes at rounds where its schedule says so.
    let schedule: [&[usize]; 6] = [&[0], &[1, 2], &[0], &[2], &[0, 1], &[0, 1, 2]];
    let mut seen = [0u64; 3];
    for (round, takers) in schedule.iter().enumerate() {
        std::thread::sleep(Duration::from_millis(15 + 10 * round as u64));
        m.pause();
        let now = copy(&m);
        for &k in *takers {
            let taken: DirtyBitmap = m.vm.take_dirty(ids[k]).unwrap();
            let reported: std::collections::BTreeSet<u64> =
                taken.gpas(m.vm.memory.layout()).collect();
            let missed: Vec<u64> = changed(&last[k], &now)
                .into_iter()
                .filter(|g| !reported.contains(g))
                .collect();
            assert!(
                missed.is_empty(),
                "round {round}: the {} consumer missed {} changed pages, first {:#x?}",
                names[k],
                missed.len(),
                &missed[..missed.len().min(4)]
            );
            seen[k] += reported.len() as u64;
            last[k] = copy(&m);
        }
        m.resume();
    }
    for (k, n) in seen.iter().enumerate() {
        assert!(
            *n > 256,
            "the {} consumer saw only {n} pages: the guest's writes did not reach it",
            names[k]
        );
    }
    // Removing consumers hands nothing of theirs to the others, and the last one turns
    // KVM's logging off.
    for id in ids {
        m.vm.remove_dirty_consumer(id).unwrap();
    }
    assert!(!m.vm.dirty_logging());
    m.shutdown();
}
