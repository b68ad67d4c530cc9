//! The test tool of the two-node QEMU run (scripts/numa-qemu-test): inside a real
//! multi-node Linux, it reads the topology with this crate, binds a 64 MiB "guest memory"
//! region to node 0 with mbind, has a thread pinned to node 1's CPUs write it, feeds the
//! writes (attributed to node 1: the writer's node) to the migration policy, moves what it
//! decides with move_pages, and checks the region's checksum and where its pages are.
//! Prints `NUMA-PROBE:` lines and ends with `NUMA-PROBE: PASS ...` or a failure (exit 1).
use std::time::Instant;

use ray_numa::locality::residency;
use ray_numa::policy::{decide, Decision, PolicyConfig, RangeObservation};
use ray_numa::sys::{self, Mode};
use ray_numa::Topology;

const LEN: usize = 64 << 20;
const RANGE: usize = 2 << 20;
const PAGE: usize = 4096;

fn fail(what: String) -> ! {
    println!("NUMA-PROBE: FAIL {what}");
    std::process::exit(1)
}

/// FNV-1a over the region's words.
fn checksum(base: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..LEN / 8 {
        // SAFETY: inside the region, which lives for the whole run; no thread writes it now.
        let w = unsafe { ((base + i * 8) as *const u64).read_volatile() };
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Share of the region's present pages on `node` (all pages sampled).
fn on_node(base: usize, node: u32) -> f64 {
    // SAFETY: the region is ours and mapped.
    let r = unsafe { residency(base as *mut u8, LEN, LEN / PAGE) }
        .unwrap_or_else(|e| fail(format!("move_pages query: {e}")));
    r.on(&[node]) as f64 / r.present.max(1) as f64
}

fn main() {
    let t = Topology::host().unwrap_or_else(|e| fail(format!("topology: {e}")));
    for n in &t.nodes {
        println!(
            "NUMA-PROBE: node {} cpus={} total={} free={} distances={:?} hugepage_sizes={:?}",
            n.id,
            ray_numa::format_list(&n.cpus),
            n.memory_total,
            n.memory_free,
            n.distances,
            n.huge_pages
                .iter()
                .map(|h| h.page_bytes)
                .collect::<Vec<_>>()
        );
    }
    if t.nodes.len() < 2 || t.node(1).is_none_or(|n| n.cpus.is_empty()) {
        fail(format!(
            "needs nodes 0 and 1 with CPUs, found {:?}",
            t.node_ids()
        ));
    }
    // SAFETY: a fresh anonymous mapping, owned by this run.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        fail("mmap".into());
    }
    let base = p as usize;
    // The three policies, each checked where the kernel put the pages it touched.
    for (mode, nodes, want) in [
        (Mode::Interleave, vec![0, 1], None),
        (Mode::Preferred, vec![1], Some(1)),
        (Mode::Bind, vec![0], Some(0)),
    ] {
        // SAFETY: our mapping; MPOL_MF_MOVE moves pages already present.
        unsafe { sys::mbind(p.cast(), LEN, mode, &nodes) }
            .unwrap_or_else(|e| fail(format!("mbind {mode:?}: {e}")));
        for i in (0..LEN).step_by(PAGE) {
            // SAFETY: inside our mapping.
            unsafe { ((base + i) as *mut u8).write_volatile(1) };
        }
        let (n0, n1) = (on_node(base, 0), on_node(base, 1));
        println!("NUMA-PROBE: mbind {mode:?} {nodes:?}: node0={n0:.2} node1={n1:.2}");
        let ok = match want {
            Some(0) => n0 == 1.0,
            Some(_) => n1 == 1.0,
            None => (0.4..=0.6).contains(&n0) && (0.4..=0.6).contains(&n1),
        };
        if !ok {
            fail(format!("mbind {mode:?} placed node0={n0:.2} node1={n1:.2}"));
        }
    }
    // A thread on node 1's CPUs writes the whole region; every write is attributed to it.
    let node1_cpus = t.node(1).map(|n| n.cpus.clone()).unwrap_or_default();
    let writes = std::thread::spawn(move || {
        // SAFETY: pthread_self is this thread.
        sys::set_affinity(unsafe { libc::pthread_self() }, &node1_cpus)
            .unwrap_or_else(|e| fail(format!("pin to node 1: {e}")));
        let mut per_range = vec![0u64; LEN / RANGE];
        for i in (0..LEN).step_by(64) {
            // SAFETY: inside the region; the main thread waits for this one.
            unsafe {
                ((base + i) as *mut u64).write_volatile((i as u64).wrapping_mul(0x9e37_79b9))
            };
            per_range[i / RANGE] += 1;
        }
        per_range
    })
    .join()
    .unwrap_or_else(|_| fail("writer thread".into()));
    let sum_before = checksum(base);
    let locality_before = on_node(base, 1);
    let ranges: Vec<RangeObservation> = writes
        .iter()
        .enumerate()
        .map(|(i, &w)| RangeObservation {
            gpa: (i * RANGE) as u64,
            bytes: RANGE as u64,
            node: 0,
            accesses: vec![(1, w)],
            windows_since_move: None,
        })
        .collect();
    let cfg = PolicyConfig {
        rate_limit_mib_s: 1024.0,
        window_s: 1.0,
        ..PolicyConfig::default()
    };
    let decisions = decide(&cfg, &ranges);
    let start = Instant::now();
    let mut moved_bytes = 0u64;
    for (i, d) in decisions.iter().enumerate() {
        if i < 2 || i + 1 == decisions.len() {
            println!("NUMA-PROBE: log: {}", d.explain("probe", cfg.window_s));
        }
        if let Decision::Move { gpa, bytes, to, .. } = d {
            let pages: Vec<*mut u8> = (0..*bytes as usize / PAGE)
                .map(|k| (base + *gpa as usize + k * PAGE) as *mut u8)
                .collect();
            let to = [*to as i32];
            // SAFETY: the pages lie in our region.
            let status = unsafe { sys::move_to(&pages, to[0], 5) }
                .unwrap_or_else(|e| fail(format!("move_pages: {e}")));
            if let Some(bad) = status.iter().position(|&s| s != to[0]) {
                fail(format!(
                    "range {gpa:#x}: page {bad} is at {} after moving to node {} ({} of {} pages elsewhere)",
                    status[bad],
                    to[0],
                    status.iter().filter(|&&s| s != to[0]).count(),
                    status.len()
                ));
            }
            moved_bytes += bytes;
        }
    }
    let converge_s = start.elapsed().as_secs_f64();
    let locality_after = on_node(base, 1);
    let sum_after = checksum(base);
    let moves = decisions
        .iter()
        .filter(|d| matches!(d, Decision::Move { .. }))
        .count();
    println!(
        "NUMA-PROBE: decisions={} moves={moves} locality_before={locality_before:.3} locality_after={locality_after:.3} moved_bytes={moved_bytes} converge_s={converge_s:.3} checksum={sum_before:#x}/{sum_after:#x}",
        decisions.len()
    );
    // The same bytes copied by the CPU, for move_pages' throughput next to memcpy's.
    let mut copy = vec![1u8; LEN]; // written: its pages exist before the timing
    let t0 = Instant::now();
    // SAFETY: the region holds LEN bytes; no thread writes it now.
    copy.copy_from_slice(unsafe { std::slice::from_raw_parts(base as *const u8, LEN) });
    let memcpy_s = t0.elapsed().as_secs_f64();
    std::hint::black_box(&copy);
    let gib = |bytes: u64, s: f64| bytes as f64 / (1u64 << 30) as f64 / s.max(1e-9);
    println!(
        "NUMA-BENCH: {{\"locality_before\": {locality_before:.3}, \"locality_after\": {locality_after:.3}, \"moved_bytes\": {moved_bytes}, \"converge_s\": {converge_s:.3}, \"move_gib_s\": {:.3}, \"memcpy_gib_s\": {:.3}, \"move_ratio\": {:.3}}}",
        gib(moved_bytes, converge_s),
        gib(LEN as u64, memcpy_s),
        gib(moved_bytes, converge_s) / gib(LEN as u64, memcpy_s)
    );
    if sum_before != sum_after {
        fail("memory changed while its pages moved".into());
    }
    if moves != LEN / RANGE || locality_after < 0.9 {
        fail(format!("{moves} moves, locality after {locality_after:.3}"));
    }
    println!("NUMA-PROBE: PASS");
}
