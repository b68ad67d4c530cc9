//! Migration throughput vs raw TCP over loopback.
//!
//! `cargo run --release -p ray-migration --example throughput -- [runs] [mib] [lz4]`
//! runs `bench_migrate(mib, lz4)` `runs` times (default 7 runs of 512 MiB, no lz4) and
//! prints each result, then min/median/max of the migration/raw ratio.

fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(512);
    let compress = args.next().is_some_and(|a| a == "lz4" || a == "true");
    let mut ratios = Vec::with_capacity(runs);
    for i in 0..runs.max(1) {
        match ray_migration::bench::bench_migrate(mib, compress) {
            Ok(r) => {
                println!(
                    "run {i}: migration {:.0} MiB/s, raw tcp {:.0} MiB/s, end-to-end {:.0} MiB/s, ratio {:.3}",
                    r.migration_mib_s, r.raw_tcp_mib_s, r.end_to_end_mib_s, r.ratio
                );
                ratios.push(r.ratio);
            }
            Err(e) => {
                eprintln!("run {i} failed: {e}");
                std::process::exit(1);
            }
        }
    }
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let median = if n % 2 == 1 {
        ratios[n / 2]
    } else {
        (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0
    };
    println!(
        "ratio over {n} runs of {mib} MiB (lz4={compress}): min {:.3} median {:.3} max {:.3}",
        ratios[0],
        median,
        ratios[n - 1]
    );
}
