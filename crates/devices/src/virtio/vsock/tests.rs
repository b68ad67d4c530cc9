//! The muxer driven as a guest would, with real Unix sockets on the host side.
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use proptest::prelude::*;

use super::muxer::{Muxer, BUF_ALLOC};
use super::packet::{op, Header, HDR_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::virtio::queue::Descriptor;

const CID: u64 = 7;

struct Rig {
    dir: PathBuf,
    socket: PathBuf,
    mux: Muxer,
    counters: Arc<VsockCounters>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rig(name: &str) -> Rig {
    let dir = std::env::temp_dir().join(format!("ray-vsock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vsock.sock");
    let listener = ray_outside::bind_private(&socket).unwrap();
    let counters = Arc::new(VsockCounters::default());
    let mux = Muxer::new(CID, socket.clone(), listener, Opener::Own, counters.clone()).unwrap();
    Rig {
        dir,
        socket,
        mux,
        counters,
    }
}

fn from_guest(guest_port: u32, host_port: u32, op: u16) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        kind: TYPE_STREAM,
        op,
        buf_alloc: 1 << 20,
        ..Header::default()
    }
}

impl Rig {
    /// Serves every pending epoll event, as the device thread does.
    fn poll(&mut self) {
        let mut events = vec![EpollEvent::default(); 16];
        for _ in 0..3 {
            let n = self.mux.epoll().wait(50, &mut events).unwrap();
            for e in &events[..n] {
                self.mux.handle(e);
            }
        }
    }

    /// The next packet for the guest (header, payload), with a 4 KiB receive buffer.
    fn next(&mut self) -> Option<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        if !self.mux.next_for_guest(4096, &mut out) {
            return None;
        }
        let h = Header::parse(&out).unwrap();
        assert_eq!(h.len as usize, out.len() - HDR_LEN);
        Some((h, out[HDR_LEN..].to_vec()))
    }

    /// A host process's connection to guest port `port`, accepted by the guest.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.poll();
        let (req, _) = self.next().expect("a REQUEST for the guest");
        assert_eq!(
            (req.op, req.dst_port, req.dst_cid, req.src_cid),
            (op::REQUEST, port, CID, HOST_CID)
        );
        self.mux
            .from_guest(&from_guest(port, req.src_port, op::RESPONSE), &[]);
        let mut line = [0u8; 64];
        let n = s.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {}\n", req.src_port)
        );
        (s, req.src_port)
    }
}

#[test]
fn a_host_connection_carries_bytes_both_ways() {
    let mut r = rig("both");
    let (mut s, hp) = r.host_connect(52);
    s.write_all(b"echo hi\n").unwrap();
    r.poll();
    let (h, data) = r.next().expect("data for the guest");
    assert_eq!((h.op, h.len, h.buf_alloc), (op::RW, 8, BUF_ALLOC));
    assert_eq!(data, b"echo hi\n");
    let mut rw = from_guest(52, hp, op::RW);
    rw.len = 3;
    r.mux.from_guest(&rw, b"hi\n");
    let mut got = [0u8; 3];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi\n");
    // The guest's credit counts its own bytes only, not the device's `OK` line.
    r.mux
        .from_guest(&from_guest(52, hp, op::CREDIT_REQUEST), &[]);
    let (h, _) = r.next().unwrap();
    assert_eq!((h.op, h.fwd_cnt), (op::CREDIT_UPDATE, 3));
    // The guest closes: the host sees EOF and the guest gets its RST.
    r.mux.from_guest(
        &Header {
            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
            ..from_guest(52, hp, op::SHUTDOWN)
        },
        &[],
    );
    assert_eq!(s.read(&mut got).unwrap(), 0);
    assert_eq!(r.next().unwrap().0.op, op::RST);
    assert_eq!(r.mux.connections(), 0);
    assert_eq!(r.counters.host_connects.load(Relaxed), 1);
}

#[test]
fn data_to_the_guest_stops_at_its_credit() {
    let mut r = rig("credit");
    let (mut s, hp) = r.host_connect(52);
    let mut h = from_guest(52, hp, op::CREDIT_UPDATE);
    h.buf_alloc = 1000;
    r.mux.from_guest(&h, &[]);
    s.write_all(&[1u8; 3000]).unwrap();
    r.poll();
    assert_eq!(r.next().unwrap().1.len(), 1000);
    assert!(r.next().is_none(), "no credit left");
    h.fwd_cnt = 600;
    r.mux.from_guest(&h, &[]);
    assert_eq!(r.next().unwrap().1.len(), 600);
    assert!(r.next().is_none());
}

#[test]
fn a_guest_beyond_its_credit_is_reset() {
    let mut r = rig("overrun");
    let (mut s, hp) = r.host_connect(52);
    // The host process does not read: the device keeps up to BUF_ALLOC bytes.
    let chunk = vec![0u8; 64 << 10];
    let mut rw = from_guest(52, hp, op::RW);
    rw.len = chunk.len() as u32;
    for _ in 0..(BUF_ALLOC as usize / chunk.len() + 8) {
        r.mux.from_guest(&rw, &chunk);
    }
    assert_eq!(r.mux.connections(), 0);
    let mut saw_rst = false;
    while let Some((h, _)) = r.next() {
        saw_rst |= h.op == op::RST;
    }
    assert!(saw_rst);
    // The host end is closed after what fit.
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert!(all.len() >= 64 << 10, "{}", all.len());
}

#[test]
fn a_credit_update_follows_the_hosts_reads() {
    let mut r = rig("fwd");
    let (mut s, hp) = r.host_connect(52);
    let chunk = vec![5u8; 64 << 10];
    let mut rw = from_guest(52, hp, op::RW);
    rw.len = chunk.len() as u32;
    let mut got = vec![0u8; chunk.len()];
    let mut updates = 0;
    for _ in 0..8 {
        r.mux.from_guest(&rw, &chunk);
        s.read_exact(&mut got).unwrap();
        r.poll();
        while let Some((h, _)) = r.next() {
            if h.op == op::CREDIT_UPDATE {
                updates += 1;
                assert!(h.fwd_cnt >= BUF_ALLOC / 2);
            }
        }
    }
    assert!(updates >= 1);
}

#[test]
fn a_guest_connect_reaches_a_listener_or_gets_a_reset() {
    let mut r = rig("out");
    let l = UnixListener::bind(format!("{}_5000", r.socket.display())).unwrap();
    r.mux.from_guest(&from_guest(2000, 5000, op::REQUEST), &[]);
    let (resp, _) = r.next().unwrap();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (op::RESPONSE, 5000, 2000)
    );
    let (mut peer, _) = l.accept().unwrap();
    let mut rw = from_guest(2000, 5000, op::RW);
    rw.len = 4;
    r.mux.from_guest(&rw, b"ping");
    let mut b = [0u8; 4];
    peer.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    peer.write_all(b"pong").unwrap();
    drop(peer);
    r.poll();
    let (h, d) = r.next().unwrap();
    assert_eq!((h.op, d.as_slice()), (op::RW, &b"pong"[..]));
    let (h, _) = r.next().unwrap();
    assert_eq!((h.op, h.flags), (op::SHUTDOWN, SHUTDOWN_SEND));

    r.mux.from_guest(&from_guest(2001, 5001, op::REQUEST), &[]);
    assert_eq!(r.next().unwrap().0.op, op::RST);
}

#[test]
fn bad_connect_lines_are_answered_and_dropped() {
    let mut r = rig("line");
    let mut s = UnixStream::connect(&r.socket).unwrap();
    s.write_all(b"HELLO 52\n").unwrap();
    r.poll();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "ERR expected CONNECT <port>\n");
    assert!(r.next().is_none());
}

#[test]
fn packets_for_no_connection_get_a_reset_but_a_reset_does_not() {
    let mut r = rig("stray");
    r.mux.from_guest(&from_guest(1, 2, op::RW), &[]);
    assert_eq!(r.next().unwrap().0.op, op::RST);
    r.mux.from_guest(&from_guest(1, 2, op::RST), &[]);
    assert!(r.next().is_none());
}

#[test]
fn chains_are_checked_per_queue() {
    let c = |parts: &[(u32, bool)]| Chain {
        head: 1,
        descriptors: parts
            .iter()
            .map(|&(len, writable)| Descriptor {
                addr: 0,
                len,
                writable,
            })
            .collect(),
    };
    assert!(check_chain(RX, &c(&[(44, true), (4096, true)])).is_ok());
    assert!(check_chain(RX, &c(&[(43, true)])).is_err());
    assert!(check_chain(TX, &c(&[(44, false), (10, false)])).is_ok());
    let e = check_chain(TX, &c(&[(44, false), (10, true)])).unwrap_err();
    assert_eq!(
        e,
        "transmitted packet 1 has a device-writable part (descriptor 1)"
    );
    assert!(check_chain(TX, &c(&[(44, false), (MAX_PAYLOAD + 1, false)])).is_err());
    assert!(check_chain(EVENT, &c(&[(4, true)])).is_ok());
    assert!(check_chain(3, &c(&[(4, true)])).is_err());
}

#[test]
fn the_configuration_holds_the_cid_and_restore_checks_it() {
    let dir = std::env::temp_dir().join(format!("ray-vsock-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let v = Vsock::new(42, dir.join("v.sock"), Opener::Own).unwrap();
    let mut c = [0u8; 8];
    v.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c), 42);
    assert!(v.check_device(&v.save_device()).is_ok());
    let e = v.check_device(&serde_json::json!({"cid": 43})).unwrap_err();
    assert!(e.contains("cid 43"), "{e}");
    assert!(Vsock::new(2, dir.join("w.sock"), Opener::Own).is_err());
    std::fs::write(dir.join("file"), b"x").unwrap();
    let e = Vsock::new(3, dir.join("file"), Opener::Own).err().unwrap();
    assert!(e.contains("not a socket"), "{e}");
    drop(v);
    let _ = std::fs::remove_dir_all(&dir);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any sequence of well-addressed packets with random operations, ports, flags and
    /// credit leaves the muxer consistent: it never panics, and everything it answers is
    /// a well-formed packet to the guest.
    #[test]
    fn random_guest_packets_never_break_the_muxer(
        packets in proptest::collection::vec((1u16..8, 0u32..3, 0u32..3, 0u32..4, any::<u32>(), any::<u32>(), 0usize..100), 1..40)
    ) {
        let mut r = rig("prop");
        let _l = UnixListener::bind(format!("{}_1", r.socket.display())).unwrap();
        for (opc, gp, hp, flags, buf_alloc, fwd, len) in packets {
            let mut h = from_guest(gp, hp, opc);
            h.flags = flags;
            h.buf_alloc = buf_alloc;
            h.fwd_cnt = fwd;
            let payload = vec![0u8; if opc == op::RW { len } else { 0 }];
            h.len = payload.len() as u32;
            r.mux.from_guest(&h, &payload);
            while let Some((out, _)) = r.next() {
                prop_assert_eq!((out.src_cid, out.dst_cid, out.kind), (HOST_CID, CID, TYPE_STREAM));
                prop_assert!((op::REQUEST..=op::CREDIT_REQUEST).contains(&out.op));
            }
        }
    }
}
