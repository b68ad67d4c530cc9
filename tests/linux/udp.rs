//! `udp`: the UDP end of the Linux vhost-user network test (scripts/vhost-qemu-test), for
//! the guest's busybox (whose `nc` has no UDP) and for the host's namespace side. Built
//! statically with plain `rustc`, no crates, so that it runs inside a bare initramfs.
//!
//! ```text
//! udp send ADDR:PORT MESSAGE COUNT   COUNT datagrams of MESSAGE, 100 ms apart
//! udp recv PORT SECONDS              prints the first datagram from anyone; exit 1 on timeout
//! ```
use std::net::UdpSocket;
use std::process::ExitCode;
use std::time::Duration;

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [cmd, to, message, count] if cmd == "send" => {
            let count: u32 = count
                .parse()
                .map_err(|_| format!("count '{count}' is not a number"))?;
            let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
            for _ in 0..count {
                // A datagram lost before the peer is up (no ARP answer yet) is retried.
                let _ = socket.send_to(message.as_bytes(), to.as_str());
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        }
        [cmd, port, seconds] if cmd == "recv" => {
            let seconds: u64 = seconds
                .parse()
                .map_err(|_| format!("seconds '{seconds}' is not a number"))?;
            let socket = UdpSocket::bind((
                "0.0.0.0",
                port.parse::<u16>()
                    .map_err(|_| format!("port '{port}' is not a port"))?,
            ))
            .map_err(|e| format!("bind port {port}: {e}"))?;
            socket
                .set_read_timeout(Some(Duration::from_secs(seconds)))
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 2048];
            let (n, from) = socket
                .recv_from(&mut buf)
                .map_err(|e| format!("nothing arrived on port {port} within {seconds} s ({e})"))?;
            println!("{} from {from}", String::from_utf8_lossy(&buf[..n]));
            Ok(())
        }
        _ => Err("usage: udp send ADDR:PORT MESSAGE COUNT | udp recv PORT SECONDS".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp: {e}");
            ExitCode::FAILURE
        }
    }
}
