//! `ray bench net`: our guest's virtio-net on a TAP against a host-to-host baseline on a
//! veth pair between two namespaces, in the same run: UDP guest->host (the guest's `net
//! blast`) and host->guest (into the guest's UDP sink) with 64- and 1514-byte Ethernet
//! frames, packets/s and Gbit/s; ping round trips; the VMM exits each packet costs.
//!
//! Everything lives in namespaces the benchmark creates and removes (10.79.0.0/24 for the
//! VM's TAP, 10.79.1.0/24 for the veth pair); no other interface is touched.
use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use ray::netns::Netns;
use ray_api::net::NetConfig;
use ray_api::vmm::{DevicesConfig, VmConfig};
use serde::Serialize;

use crate::bench::{field, print_row, BenchVmm, GuestShell, Stats};
use crate::vm::{default_guest, DEFAULT_GUEST_CMDLINE};

#[derive(Args)]
pub struct NetBenchArgs {
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Datagrams each pass sends.
    #[arg(long, default_value_t = 50_000)]
    pub packets: u64,
    /// Pings per run (guest and baseline each).
    #[arg(long, default_value_t = 20)]
    pub pings: u32,
    #[arg(long)]
    pub json: bool,
}

/// Ethernet + IPv4 + UDP headers: a frame is the payload plus these.
const HEADERS: usize = 14 + 20 + 8;
/// The two frame sizes measured: the smallest Ethernet frame and a full 1500-byte MTU.
const FRAMES: [usize; 2] = [64, 1514];
const TAP_HOST: &str = "10.79.0.1";
const GUEST: &str = "10.79.0.2";
const VETH_A: &str = "10.79.1.1";
const VETH_B: &str = "10.79.1.2";
const PORT: u16 = 5001;
/// The guest's UDP sink (counts what it receives).
const SINK_PORT: u16 = 9;

#[derive(Serialize)]
struct Report {
    runs: usize,
    packets: u64,
    /// Guest->host packets/s over baseline packets/s, 1514-byte frames.
    net_tx_ratio: Stats,
    /// Host->guest packets/s over baseline packets/s, 1514-byte frames.
    net_rx_ratio: Stats,
    /// The namespace pinging the guest, microseconds.
    ping_rtt_us: Stats,
    /// One namespace pinging the other over the veth pair, microseconds.
    baseline_ping_rtt_us: Stats,
    net_tx_ratio_64: Stats,
    net_rx_ratio_64: Stats,
    tx_64_pps: Stats,
    tx_1514_pps: Stats,
    tx_1514_gbit_s: Stats,
    rx_64_pps: Stats,
    rx_1514_pps: Stats,
    rx_1514_gbit_s: Stats,
    baseline_64_pps: Stats,
    baseline_1514_pps: Stats,
    baseline_1514_gbit_s: Stats,
    /// Share of the guest's datagrams that reached the host socket.
    tx_delivered: Stats,
    /// Share of the host's datagrams that reached the guest's sink.
    rx_delivered: Stats,
    /// Share of the baseline's datagrams that reached the other namespace.
    baseline_delivered: Stats,
    exits_per_packet_tx: Stats,
    exits_per_packet_rx: Stats,
}

/// The namespaces: one holding the VM's TAP, two joined by a veth pair for the baseline.
struct Net {
    vm: Netns,
    a: Netns,
    b: Netns,
}

impl Net {
    fn new() -> anyhow::Result<Net> {
        let pid = std::process::id();
        let net = Net {
            vm: Netns::new(&format!("ray-bn-vm-{pid}"))?,
            a: Netns::new(&format!("ray-bn-a-{pid}"))?,
            b: Netns::new(&format!("ray-bn-b-{pid}"))?,
        };
        net.vm.add_tap("rbn0", &format!("{TAP_HOST}/24"))?;
        net.a.add_veth(
            "rbva",
            &format!("{VETH_A}/24"),
            &net.b,
            "rbvb",
            &format!("{VETH_B}/24"),
        )?;
        Ok(net)
    }
}

/// A UDP socket bound inside `ns`, with a large receive buffer.
fn socket(ns: &Netns, addr: String) -> anyhow::Result<UdpSocket> {
    let sock = ns.run(move || UdpSocket::bind(&addr).with_context(|| format!("bind {addr}")))??;
    let size: libc::c_int = 8 << 20;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    Ok(sock)
}

/// Counts datagrams on `sock` until none came for 300 ms (or 60 s pass): (datagrams, bytes).
fn receive(sock: UdpSocket) -> std::thread::JoinHandle<anyhow::Result<(u64, u64)>> {
    std::thread::spawn(move || {
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 2048];
        let (mut n, mut bytes) = (0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match sock.recv(&mut buf) {
                Ok(len) => {
                    n += 1;
                    bytes += len as u64;
                    sock.set_read_timeout(Some(Duration::from_millis(300)))?;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok((n, bytes))
    })
}

/// Sends `count` datagrams of `payload` bytes as fast as the socket takes them: seconds.
fn blast(sock: &UdpSocket, to: &str, count: u64, payload: usize) -> anyhow::Result<f64> {
    let buf = vec![0x5au8; payload];
    let t0 = Instant::now();
    for _ in 0..count {
        // A full queue drops the datagram (ENOBUFS): delivered counts say what arrived.
        let _ = sock.send_to(&buf, to);
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Round trips of `count` pings from `ns` to `ip`, in microseconds.
fn ping(ns: &Netns, ip: &str, count: u32) -> anyhow::Result<Vec<f64>> {
    let out = ns
        .command("ping")
        .args(["-c", &count.to_string(), "-i", "0.01", "-W", "2", ip])
        .output()
        .context("cannot run ping (iputils-ping)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            l.split("time=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map(|ms| ms * 1000.0)
        .collect();
    if rtts.len() < count as usize {
        bail!("ping {ip}: {} of {count} answered:\n{text}", rtts.len());
    }
    Ok(rtts)
}

/// The guest's sink counter (`net`: `sink=N`).
fn sink(g: &mut GuestShell) -> anyhow::Result<u64> {
    Ok(field(&g.command("net", "net mac=")?, "sink")? as u64)
}

pub fn run(a: &NetBenchArgs, runtime: &std::path::Path) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if !(1000..=10_000_000).contains(&a.packets) {
        bail!("--packets must be 1000 to 10000000");
    }
    if !(1..=1000).contains(&a.pings) {
        bail!("--pings must be 1 to 1000");
    }
    let net = Net::new()?;
    let cfg = VmConfig {
        kernel: default_guest()?.display().to_string(),
        initrd: None,
        cmdline: format!("{DEFAULT_GUEST_CMDLINE} ray.ip={GUEST}/24"),
        vcpus: 1,
        memory_bytes: 128 << 20,
        numa: Vec::new(),
        numa_attribution: Default::default(),
        numa_migration: Default::default(),
        devices: DevicesConfig {
            rng: false,
            net: vec![NetConfig {
                tap: "rbn0".into(),
                netns: Some(net.vm.name.clone()),
                mac: None,
                rate_bytes: None,
                rate_packets: None,
            }],
            ..Default::default()
        },
    };
    let id = format!("bench-net-{}", std::process::id());
    let vmm = BenchVmm::start(runtime, &id, &serde_json::to_string(&cfg)?)?;
    let report = measure(a, &net, &mut vmm.shell());
    vmm.stop()?;
    let report = report?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "virtio-net on a TAP vs a veth pair, {} runs of {} datagrams:",
        report.runs, report.packets
    );
    let rows: [(&str, Stats, &str); 20] = [
        ("tx ratio (1514 B)", report.net_tx_ratio, "x"),
        ("rx ratio (1514 B)", report.net_rx_ratio, "x"),
        ("tx ratio (64 B)", report.net_tx_ratio_64, "x"),
        ("rx ratio (64 B)", report.net_rx_ratio_64, "x"),
        ("ping guest", report.ping_rtt_us, "us"),
        ("ping baseline", report.baseline_ping_rtt_us, "us"),
        ("guest tx 64 B", report.tx_64_pps, "pps"),
        ("guest tx 1514 B", report.tx_1514_pps, "pps"),
        ("guest tx 1514 B", report.tx_1514_gbit_s, "Gbit/s"),
        ("guest rx 64 B", report.rx_64_pps, "pps"),
        ("guest rx 1514 B", report.rx_1514_pps, "pps"),
        ("guest rx 1514 B", report.rx_1514_gbit_s, "Gbit/s"),
        ("veth 64 B", report.baseline_64_pps, "pps"),
        ("veth 1514 B", report.baseline_1514_pps, "pps"),
        ("veth 1514 B", report.baseline_1514_gbit_s, "Gbit/s"),
        ("tx delivered", report.tx_delivered, ""),
        ("rx delivered", report.rx_delivered, ""),
        ("veth delivered", report.baseline_delivered, ""),
        ("exits per packet tx", report.exits_per_packet_tx, ""),
        ("exits per packet rx", report.exits_per_packet_rx, ""),
    ];
    for (name, s, unit) in rows {
        print_row(name, s, unit);
    }
    Ok(())
}

fn measure(a: &NetBenchArgs, net: &Net, g: &mut GuestShell) -> anyhow::Result<Report> {
    let mut v: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut push = |k: String, x: f64| v.entry(k).or_default().push(x);
    let mut pings = Vec::new();
    let mut base_pings = Vec::new();
    // Resolves the guest's MAC (and the guest the namespace's) before the first pass.
    pings.extend(ping(&net.vm, GUEST, 1)?);
    pings.clear();
    let gbit = |pps: f64, frame: usize| pps * (frame * 8) as f64 / 1e9;
    for _ in 0..a.runs {
        pings.extend(ping(&net.vm, GUEST, a.pings)?);
        base_pings.extend(ping(&net.a, VETH_B, a.pings)?);
        for frame in FRAMES {
            let payload = frame - HEADERS;
            // Guest -> host.
            let rx = receive(socket(&net.vm, format!("{TAP_HOST}:{PORT}"))?);
            let e0 = g.exits()?;
            let line = g.command(
                &format!("net blast {TAP_HOST} {PORT} {} {payload}", a.packets),
                "net blast",
            )?;
            let e1 = g.exits()?;
            let (got, _) = rx
                .join()
                .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
            let secs = field(&line, "ns")? / 1e9;
            let tx_pps = got as f64 / secs;
            push(format!("tx_{frame}"), tx_pps);
            push("tx_delivered".into(), got as f64 / field(&line, "sent")?);
            push("exits_tx".into(), (e1 - e0) as f64 / a.packets as f64);
            // Host -> guest.
            let tx = socket(&net.vm, format!("{TAP_HOST}:0"))?;
            let before = sink(g)?;
            let e0 = g.exits()?;
            let secs = blast(&tx, &format!("{GUEST}:{SINK_PORT}"), a.packets, payload)?;
            std::thread::sleep(Duration::from_millis(200));
            let e1 = g.exits()?;
            let got = sink(g)? - before;
            let rx_pps = got as f64 / secs;
            push(format!("rx_{frame}"), rx_pps);
            push("rx_delivered".into(), got as f64 / a.packets as f64);
            push("exits_rx".into(), (e1 - e0) as f64 / got.max(1) as f64);
            // The baseline: one namespace to the other over the veth pair.
            let rx = receive(socket(&net.b, format!("{VETH_B}:{PORT}"))?);
            let tx = socket(&net.a, format!("{VETH_A}:0"))?;
            let secs = blast(&tx, &format!("{VETH_B}:{PORT}"), a.packets, payload)?;
            let (got, _) = rx
                .join()
                .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
            let base_pps = got as f64 / secs;
            push("base_delivered".into(), got as f64 / a.packets as f64);
            push(format!("base_{frame}"), base_pps);
            push(format!("tx_ratio_{frame}"), tx_pps / base_pps);
            push(format!("rx_ratio_{frame}"), rx_pps / base_pps);
            if frame == 1514 {
                push("tx_gbit".into(), gbit(tx_pps, frame));
                push("rx_gbit".into(), gbit(rx_pps, frame));
                push("base_gbit".into(), gbit(base_pps, frame));
            }
        }
    }
    let s = |k: &str| Stats::of(v.get(k).map_or(&[][..], |x| &x[..]));
    Ok(Report {
        runs: a.runs,
        packets: a.packets,
        net_tx_ratio: s("tx_ratio_1514"),
        net_rx_ratio: s("rx_ratio_1514"),
        ping_rtt_us: Stats::of(&pings),
        baseline_ping_rtt_us: Stats::of(&base_pings),
        net_tx_ratio_64: s("tx_ratio_64"),
        net_rx_ratio_64: s("rx_ratio_64"),
        tx_64_pps: s("tx_64"),
        tx_1514_pps: s("tx_1514"),
        tx_1514_gbit_s: s("tx_gbit"),
        rx_64_pps: s("rx_64"),
        rx_1514_pps: s("rx_1514"),
        rx_1514_gbit_s: s("rx_gbit"),
        baseline_64_pps: s("base_64"),
        baseline_1514_pps: s("base_1514"),
        baseline_1514_gbit_s: s("base_gbit"),
        tx_delivered: s("tx_delivered"),
        rx_delivered: s("rx_delivered"),
        baseline_delivered: s("base_delivered"),
        exits_per_packet_tx: s("exits_tx"),
        exits_per_packet_rx: s("exits_rx"),
    })
}
