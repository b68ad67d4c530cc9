//! The line-oriented serial shell. Lines end with `\r` or `\n`, empty lines are ignored,
//! nothing is echoed on the serial port (the text console, `crate::fbcon`, echoes what is
//! typed on its display). Every reply is one or more whole lines; errors are one line
//! `err <what was wrong>`.

use core::sync::atomic::Ordering::*;

use ray_guest_abi::sum_words;

use crate::workload::{mib, Dirty, Workloads};
use crate::{bootparams, clock, heartbeat, smp};

const LINE_MAX: usize = 256;
/// `sum` beats the heartbeat every this many words (64 KiB: first reads of untouched
/// pages cost tens of µs each on PVM).
const BEAT_WORDS: u64 = 8 * 1024;

pub struct Shell {
    line: [u8; LINE_MAX],
    len: usize,
    overflow: bool,
}

impl Shell {
    pub const fn new() -> Self {
        Shell {
            line: [0; LINE_MAX],
            len: 0,
            overflow: false,
        }
    }

    /// Feed one input byte; runs the command when a line is complete.
    pub fn input(&mut self, byte: u8, work: &mut Workloads) {
        crate::fbcon::echo(byte);
        // Backspace (from the keyboard) takes back the last byte.
        if byte == 0x08 || byte == 0x7f {
            self.len = self.len.saturating_sub(1);
            return;
        }
        if byte != b'\r' && byte != b'\n' {
            if self.len < LINE_MAX {
                self.line[self.len] = byte;
                self.len += 1;
            } else {
                self.overflow = true;
            }
            return;
        }
        let (len, overflow) = (self.len, self.overflow);
        self.len = 0;
        self.overflow = false;
        if overflow {
            heartbeat::commands().fetch_add(1, Relaxed);
            println!("err line too long (more than {LINE_MAX} bytes)");
            return;
        }
        match core::str::from_utf8(&self.line[..len]) {
            Ok(line) if line.trim().is_empty() => {}
            Ok(line) => {
                heartbeat::commands().fetch_add(1, Relaxed);
                execute(line.trim_start(), work);
            }
            Err(_) => {
                heartbeat::commands().fetch_add(1, Relaxed);
                println!("err line is not UTF-8");
            }
        }
    }
}

/// `0x`-prefixed hex or decimal.
pub fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parse the next argument as a number, or print an error naming it.
fn number(arg: Option<&str>, what: &str) -> Option<u64> {
    match arg {
        None => {
            println!("err missing {what}");
            None
        }
        Some(s) => {
            let n = parse_number(s);
            if n.is_none() {
                println!("err bad {what} '{s}'");
            }
            n
        }
    }
}

fn no_more(mut args: core::str::SplitAsciiWhitespace, cmd: &str) -> bool {
    match args.next() {
        Some(extra) => {
            println!("err {cmd}: unexpected argument '{extra}'");
            false
        }
        None => true,
    }
}

/// Runs one command line that came another way than the serial port (vsock port 52).
pub fn run_line(line: &str, work: &mut Workloads) {
    heartbeat::commands().fetch_add(1, Relaxed);
    execute(line.trim_start(), work);
}

/// Run one line (leading blanks removed; trailing ones kept for `echo`).
fn execute(line: &str, work: &mut Workloads) {
    let mut args = line.split_ascii_whitespace();
    let cmd = args.next().unwrap_or_default();
    match cmd {
        "echo" => println!("{}", line[4..].strip_prefix(' ').unwrap_or(&line[4..])),
        "mem" if no_more(args.clone(), cmd) => mem(),
        "cpus" if no_more(args.clone(), cmd) => cpus(),
        "numa" if no_more(args.clone(), cmd) => crate::numa::command(),
        "pci" if no_more(args.clone(), cmd) => crate::pci::command(),
        "tick" => {
            let Some(ms) = number(args.next(), "tick period (ms)") else {
                return;
            };
            if !no_more(args, cmd) {
                return;
            }
            work.ticker.set(ms, clock::now());
            if ms == 0 {
                println!("tick off");
            } else {
                println!("tick on {ms}");
            }
        }
        "dirty" => dirty(args, work),
        "sum" => sum(args),
        "pattern" => pattern(args),
        "touch" => touch(args),
        "rng" => rng(args),
        "disk" => crate::virtio_blk::command(args),
        "net" => net(args),
        "draw" => crate::display::draw(args),
        "bochs" => crate::bochs::command(args),
        "rect" => crate::display::rect(args),
        "console" => crate::fbcon::command(args),
        "gpupt" => {
            let Some(seed) = number(args.next(), "seed") else {
                return;
            };
            if no_more(args, cmd) {
                crate::gpupt::command(seed);
            }
        }
        "scroll" => crate::display::scroll(args),
        "input" if no_more(args.clone(), cmd) => crate::virtio_input::show(),
        "pointer" if no_more(args.clone(), cmd) => crate::virtio_input::pointer(),
        "displays" if no_more(args.clone(), cmd) => crate::display::list(),
        "vsock" => vsock(line["vsock".len()..].trim_start()),
        "seq" => {
            let Some(n) = number(args.next(), "count") else {
                return;
            };
            if no_more(args, cmd) {
                seq(n);
            }
        }
        "poweroff" if no_more(args.clone(), cmd) => crate::poweroff(),
        "help" if no_more(args.clone(), cmd) => help(),
        "mem" | "cpus" | "numa" | "pci" | "poweroff" | "help" | "displays" | "input"
        | "pointer" => {}
        _ => println!("err unknown command '{cmd}'"),
    }
}

/// `e820 0x<start>-0x<end> <type>` per entry (end exclusive), then the totals: `total`
/// is the memory the VMM gave (entries in the MMIO hole, such as the PCI ECAM window,
/// reserve addresses, not memory), `usable` the RAM for the kernel.
fn mem() {
    let info = bootparams::get();
    let (mut total, mut usable) = (0u64, 0u64);
    for e in info.e820() {
        println!("e820 {:#x}-{:#x} {}", e.addr, e.end(), e.kind);
        if !(crate::paging::MMIO_START..crate::paging::MMIO_END).contains(&e.addr) {
            total += e.size;
        }
        if e.kind == bootparams::E820_USABLE {
            usable += e.size;
        }
    }
    println!("mem total={total} usable={usable}");
}

/// `cpus online=<n> counters=<c0>,<c1>,...` (counters of CPUs 0..=highest online).
fn cpus() {
    let mask = smp::online_mask();
    let n = heartbeat::cpus_online().load(Relaxed);
    crate::serial::print_fmt(format_args!("cpus online={n} counters="));
    let count = 64 - mask.leading_zeros() as usize;
    for cpu in 0..count {
        let c = heartbeat::cpu_counter(cpu).load(Relaxed);
        if cpu == 0 {
            crate::serial::print_fmt(format_args!("{c}"));
        } else {
            crate::serial::print_fmt(format_args!(",{c}"));
        }
    }
    crate::serial::write_str("\n");
}

fn dirty(mut args: core::str::SplitAsciiWhitespace, work: &mut Workloads) {
    let first = args.next();
    if first == Some("stop") {
        if no_more(args, "dirty") {
            println!("dirty off bytes={}", work.dirty.stop());
        }
        return;
    }
    let Some(size_mib) = number(first, "dirty size (MiB)") else {
        return;
    };
    let Some(rate_mib) = number(args.next(), "dirty rate (MiB/s)") else {
        return;
    };
    if !no_more(args, "dirty") {
        return;
    }
    if size_mib == 0 || rate_mib == 0 {
        println!("dirty off bytes={}", work.dirty.stop());
        return;
    }
    let (Some(size), Some(rate)) = (mib(size_mib), mib(rate_mib)) else {
        println!("err dirty: {size_mib} MiB at {rate_mib} MiB/s is too large");
        return;
    };
    let Some(base) = Dirty::find_region(bootparams::get(), size) else {
        println!(
            "err dirty: {size_mib} MiB does not fit in usable RAM above {:#x}",
            crate::paging::kernel_end()
        );
        return;
    };
    work.dirty.start(base, size, rate, clock::now());
    println!("dirty on region={base:#x} size={size} rate={rate}");
}

/// `touch <cpu> <addr> <len>`: CPU `cpu` writes one word into every 4 KiB page of
/// [addr, addr+len) (page-aligned, usable RAM above the kernel): writes from a chosen vCPU,
/// so the host can check what it attributes to which vCPU (and NUMA node).
fn touch(mut args: core::str::SplitAsciiWhitespace) {
    let Some(cpu) = number(args.next(), "touch cpu") else {
        return;
    };
    let Some(addr) = number(args.next(), "touch address") else {
        return;
    };
    let Some(len) = number(args.next(), "touch length") else {
        return;
    };
    if !no_more(args, "touch") {
        return;
    }
    if cpu >= 64 || smp::online_mask() & (1 << cpu) == 0 {
        println!("err touch: cpu {cpu} is not online");
        return;
    }
    let end = addr.saturating_add(len);
    if len == 0
        || addr % 4096 != 0
        || addr < crate::paging::kernel_end()
        || !bootparams::get().is_usable(addr, len)
        || end > crate::paging::mapped_end()
    {
        println!("err touch: {addr:#x} +{len} is not page-aligned usable RAM above the kernel");
        return;
    }
    // SAFETY: [addr, addr+len) is usable, identity-mapped RAM above the kernel (checked).
    let done = unsafe { smp::touch_on(cpu as usize, addr, len, 5_000_000_000) };
    if done {
        println!(
            "touch cpu={cpu} addr={addr:#x} pages={}",
            len.div_ceil(4096)
        );
    } else {
        println!("err touch: cpu {cpu} did not answer");
    }
}

/// `sum <addr> <len>`: FNV-1a over the little-endian u64 words of [addr, addr+len).
fn sum(mut args: core::str::SplitAsciiWhitespace) {
    let Some(addr) = number(args.next(), "sum address") else {
        return;
    };
    let Some(len) = number(args.next(), "sum length") else {
        return;
    };
    if !no_more(args, "sum") {
        return;
    }
    if !bootparams::get().is_usable(addr, len) || addr + len > crate::paging::mapped_end() {
        println!("err sum: {addr:#x} +{len} is not inside usable RAM");
        return;
    }
    let words = (0..len.div_ceil(8)).map(|i| {
        if i % BEAT_WORDS == 0 {
            heartbeat::beat(clock::now());
        }
        let at = addr + i * 8;
        let n = (len - i * 8).min(8) as usize;
        let mut bytes = [0u8; 8];
        // SAFETY: [at, at+n) lies inside usable, identity-mapped RAM (checked above).
        unsafe { core::ptr::copy_nonoverlapping(at as *const u8, bytes.as_mut_ptr(), n) };
        u64::from_le_bytes(bytes)
    });
    println!("sum {addr:#x} {len} {:#018x}", sum_words(words));
}

/// `pattern <MiB> <word>`: fills MiB of usable RAM above the kernel (the region `dirty`
/// uses) with `word` (1 to 64 bytes) over and over, so a test can look for guest memory
/// where it must not appear (an encrypted migration's packet capture).
fn pattern(mut args: core::str::SplitAsciiWhitespace) {
    let Some(size) = number(args.next(), "pattern size (MiB)").and_then(mib) else {
        return;
    };
    let Some(word) = args.next().map(str::as_bytes) else {
        println!("err pattern: no word given");
        return;
    };
    if !no_more(args, "pattern") {
        return;
    }
    if word.len() > 64 || size == 0 {
        println!("err pattern: the word is 1 to 64 bytes and the size at least 1 MiB");
        return;
    }
    let Some(base) = Dirty::find_region(bootparams::get(), size) else {
        println!("err pattern: {size} bytes do not fit in usable RAM above the kernel");
        return;
    };
    for i in 0..size {
        if i % (BEAT_WORDS * 8) == 0 {
            heartbeat::beat(clock::now());
        }
        let b = word[(i % word.len() as u64) as usize];
        // SAFETY: [base, base+size) is usable, identity-mapped RAM above the kernel
        // (`find_region`); nothing else of the guest lives there.
        unsafe { ((base + i) as *mut u8).write_volatile(b) };
    }
    println!("pattern on region={base:#x} size={size}");
}

/// `rng <n>`: n bytes (1..=1024) from the virtio-rng device, in hex.
fn rng(mut args: core::str::SplitAsciiWhitespace) {
    let Some(n) = number(args.next(), "byte count") else {
        return;
    };
    if !no_more(args, "rng") {
        return;
    }
    if n == 0 || n > crate::virtio_rng::MAX_REQUEST as u64 {
        println!(
            "err rng {n}: between 1 and {} bytes",
            crate::virtio_rng::MAX_REQUEST
        );
        return;
    }
    let mut buf = [0u8; crate::virtio_rng::MAX_REQUEST];
    let out = &mut buf[..n as usize];
    let t0 = clock::now();
    let result = crate::virtio_rng::read(out);
    let ns = clock::now().saturating_sub(t0);
    match result {
        Ok(got) if got == out.len() => {
            let mut hex = [0u8; 2 * crate::virtio_rng::MAX_REQUEST];
            for (i, b) in out.iter().enumerate() {
                hex[2 * i] = b"0123456789abcdef"[usize::from(b >> 4)];
                hex[2 * i + 1] = b"0123456789abcdef"[usize::from(b & 0xf)];
            }
            let hex = core::str::from_utf8(&hex[..2 * out.len()]).unwrap_or("");
            let (irqs, timer) = crate::virtio_rng::interrupts();
            println!("rng {hex} irqs={irqs} watchdog={timer} ns={ns}");
        }
        Ok(got) => println!("err rng {n}: the device gave {got} bytes"),
        Err(e) => println!("err rng: {e}"),
    }
}

/// The most lines `seq` prints.
const SEQ_MAX: u64 = 1_000_000;

/// `seq N`: the numbers 1 to N, one a line (long output for tests of the vsock path).
fn seq(n: u64) {
    if n > SEQ_MAX {
        println!("err seq: {n} is more than {SEQ_MAX}");
        return;
    }
    for i in 1..=n {
        println!("{i}");
    }
}

/// `vsock` (cid, connections, counters), `vsock connect PORT TEXT` (to a host port:
/// sends TEXT and a newline, prints the answer).
fn vsock(rest: &str) {
    use crate::virtio_vsock as vv;
    if rest.is_empty() {
        match vv::info() {
            Ok((cid, open, c)) => println!(
                "vsock cid={cid} conns={open} rx={} tx={} execs={} resets={} transport_resets={}",
                c.rx, c.tx, c.execs, c.resets, c.transport_resets
            ),
            Err(e) => println!("err vsock: {e}"),
        }
        return;
    }
    let Some(args) = rest.strip_prefix("connect ") else {
        println!("err vsock: unknown subcommand '{rest}' (connect PORT TEXT)");
        return;
    };
    let (port, text) = args
        .trim_start()
        .split_once(' ')
        .unwrap_or((args.trim(), ""));
    let port = match port.parse::<u32>() {
        Ok(p) => p,
        Err(_) => {
            println!("err vsock connect: port '{port}' is not a number");
            return;
        }
    };
    match vv::connect(port, text) {
        Ok((reply, len)) => {
            let reply = core::str::from_utf8(&reply[..len]).unwrap_or("(not UTF-8)");
            println!("vsock reply {}", reply.trim_end_matches('\n'));
        }
        Err(e) => println!("err vsock connect {port}: {e}"),
    }
}

/// `net` (mac, address, counters), `net ip A.B.C.D/N`, `net ping IP [n]`,
/// `net blast IP PORT COUNT SIZE` (SIZE: UDP payload bytes, up to 1472).
fn net(mut args: core::str::SplitAsciiWhitespace) {
    use crate::virtio_net as vn;
    let ip_arg = |a: Option<&str>| {
        let got = a.and_then(vn::parse_ip);
        if got.is_none() {
            println!("err net: '{}' is not an IPv4 address", a.unwrap_or(""));
        }
        got
    };
    match args.next() {
        None => match vn::info() {
            Ok((m, ip, prefix, c)) => println!(
                "net mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip={}.{}.{}.{}/{prefix} rx={} tx={} echoed={} sink={} sink_bytes={} dropped={}",
                m[0], m[1], m[2], m[3], m[4], m[5], ip[0], ip[1], ip[2], ip[3],
                c.rx, c.tx, c.echoed, c.sink, c.sink_bytes, c.dropped
            ),
            Err(e) => println!("err net: {e}"),
        },
        Some("ip") => {
            let Some(a) = args.next() else {
                println!("err net ip: missing A.B.C.D/N");
                return;
            };
            if !no_more(args, "net ip") {
                return;
            }
            match vn::parse_cidr(a).and_then(|(ip, p)| vn::set_ip(ip, p).map(|()| (ip, p))) {
                Ok((ip, p)) => println!("net ip {}.{}.{}.{}/{p}", ip[0], ip[1], ip[2], ip[3]),
                Err(e) => println!("err net ip {a}: {e}"),
            }
        }
        Some("ping") => {
            let Some(ip) = ip_arg(args.next()) else {
                return;
            };
            let n = match args.next() {
                None => 1,
                Some(s) => match parse_number(s) {
                    Some(n) if (1..=1000).contains(&n) => n as u16,
                    _ => {
                        println!("err net ping: count '{s}' is not 1 to 1000");
                        return;
                    }
                },
            };
            if !no_more(args, "net ping") {
                return;
            }
            match vn::ping(ip, n) {
                Ok((0, ..)) => println!("err net ping: no reply from {}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]),
                Ok((got, min, sum, max)) => println!(
                    "net ping replies={got}/{n} min_us={} avg_us={} max_us={}",
                    min / 1000,
                    sum / u64::from(got) / 1000,
                    max / 1000
                ),
                Err(e) => println!("err net ping: {e}"),
            }
        }
        Some("blast") => {
            let Some(ip) = ip_arg(args.next()) else {
                return;
            };
            let Some(port) = number(args.next(), "port") else {
                return;
            };
            let Some(count) = number(args.next(), "count") else {
                return;
            };
            let Some(size) = number(args.next(), "size") else {
                return;
            };
            if !no_more(args, "net blast") {
                return;
            }
            if port == 0 || port > 0xffff || size as usize > vn::MAX_PAYLOAD {
                println!("err net blast: port 1-65535 and size 0-{} bytes", vn::MAX_PAYLOAD);
                return;
            }
            match vn::blast(ip, port as u16, count, size as usize) {
                Ok((sent, ns)) => println!("net blast sent={sent} ns={ns}"),
                Err(e) => println!("err net blast: {e}"),
            }
        }
        Some(other) => println!("err net: unknown subcommand '{other}' (ip, ping, blast)"),
    }
}

fn help() {
    println!("commands: echo <text> | mem | cpus | numa | pci | tick <ms> (0 stops) | dirty <MiB> <MiB/s> | dirty stop | sum <addr> <len> | pattern <MiB> <word> | touch <cpu> <addr> <len> | rng <bytes> | disk [read|sum|write|flush|discard|bench ...] | net [ip A.B.C.D/N | ping IP [n] | blast IP PORT COUNT SIZE] | displays | draw bars|gradient|checker|fill [SEED] [DISPLAY] | rect X Y W H RGB [DISPLAY] | scroll <lines> [DISPLAY] | console [DISPLAY|off] | bochs [mode W H [BPP] | off | reg I [V]] | gpupt <seed> | input | pointer | vsock [connect PORT TEXT] | seq <n> | poweroff | help");
}
