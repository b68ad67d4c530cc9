//! The virtio-vsock packet header (virtio 1.2 §5.10.6) and the checks a packet from the
//! guest must pass before the device acts on it. Pure functions: the fuzz target and the
//! property tests drive them with arbitrary bytes.

/// The host's context id; the guest's comes from the configuration (>= 3).
pub const HOST_CID: u64 = 2;
pub const HDR_LEN: usize = 44;
/// The only socket type offered (no SEQPACKET feature).
pub const TYPE_STREAM: u16 = 1;
/// Largest payload the device takes in one packet from the guest (Linux sends at most
/// 64 KiB).
pub const MAX_PAYLOAD: u32 = 64 << 10;

/// Operations (`op`).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: the sender will receive no more, send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("the packet has {0} bytes, less than the 44-byte header")]
    Short(usize),
    #[error("socket type {0} is not a stream (1)")]
    Type(u16),
    #[error("operation {0} does not exist")]
    Op(u16),
    #[error("source cid {got} is not the guest's ({guest})")]
    SrcCid { got: u64, guest: u64 },
    #[error("destination cid {0} is not the host (2)")]
    DstCid(u64),
    #[error("payload length {len} is beyond the {have} bytes the buffers hold")]
    Len { len: u32, have: usize },
    #[error("payload length {0} is more than the 64 KiB a packet may carry")]
    TooLong(u32),
    #[error("operation {op} carries {len} payload bytes; only RW carries data")]
    Payload { op: u16, len: u32 },
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from(u32_at(b, i)) | u64::from(u32_at(b, i + 4)) << 32
}

impl Header {
    /// Reads a header from the first 44 bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<Header, PacketError> {
        if b.len() < HDR_LEN {
            return Err(PacketError::Short(b.len()));
        }
        Ok(Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            kind: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        })
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Checks a packet the guest sent (`bytes`: header and payload as gathered from its
/// chain) and returns its header and payload. A packet that fails is dropped; one whose
/// addresses are sound but whose content is not gets a RST (see [`rst_worthy`]).
pub fn parse_tx(bytes: &[u8], guest_cid: u64) -> Result<(Header, &[u8]), PacketError> {
    let h = Header::parse(bytes)?;
    if h.src_cid != guest_cid {
        return Err(PacketError::SrcCid {
            got: h.src_cid,
            guest: guest_cid,
        });
    }
    if h.dst_cid != HOST_CID {
        return Err(PacketError::DstCid(h.dst_cid));
    }
    if h.kind != TYPE_STREAM {
        return Err(PacketError::Type(h.kind));
    }
    if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op) {
        return Err(PacketError::Op(h.op));
    }
    if h.len > MAX_PAYLOAD {
        return Err(PacketError::TooLong(h.len));
    }
    let have = bytes.len() - HDR_LEN;
    if h.len as usize > have {
        return Err(PacketError::Len { len: h.len, have });
    }
    if h.op != op::RW && h.len != 0 {
        return Err(PacketError::Payload {
            op: h.op,
            len: h.len,
        });
    }
    Ok((h, &bytes[HDR_LEN..HDR_LEN + h.len as usize]))
}

/// Whether a refused packet deserves a RST to its source port (its addresses are the
/// guest's and the host's, and it is not itself a RST): the guest's socket then fails
/// at once instead of waiting.
pub fn rst_worthy(bytes: &[u8], guest_cid: u64) -> Option<Header> {
    let h = Header::parse(bytes).ok()?;
    (h.src_cid == guest_cid && h.dst_cid == HOST_CID && h.op != op::RST).then_some(h)
}

/// A packet from the host to the guest.
pub fn to_guest(guest_cid: u64, host_port: u32, guest_port: u32, op: u16) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: host_port,
        dst_port: guest_port,
        kind: TYPE_STREAM,
        op,
        ..Header::default()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn packet(h: Header, payload: &[u8]) -> Vec<u8> {
        let mut v = h.to_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn rw(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            kind: TYPE_STREAM,
            op: op::RW,
            ..Header::default()
        }
    }

    #[test]
    fn a_header_round_trips_and_a_good_packet_parses() {
        let h = rw(5);
        assert_eq!(Header::parse(&h.to_bytes()), Ok(h));
        let p = packet(h, b"hello, and more");
        assert_eq!(parse_tx(&p, 3), Ok((h, &b"hello"[..])));
    }

    #[test]
    fn each_malformation_is_named() {
        let e = |h: Header, extra: usize| parse_tx(&packet(h, &vec![0; extra]), 3).unwrap_err();
        assert_eq!(parse_tx(&[0; 43], 3), Err(PacketError::Short(43)));
        assert_eq!(
            e(
                Header {
                    src_cid: 4,
                    ..rw(0)
                },
                0
            )
            .to_string(),
            "source cid 4 is not the guest's (3)"
        );
        assert_eq!(
            e(
                Header {
                    dst_cid: 9,
                    ..rw(0)
                },
                0
            ),
            PacketError::DstCid(9)
        );
        assert_eq!(e(Header { kind: 2, ..rw(0) }, 0), PacketError::Type(2));
        assert_eq!(e(Header { op: 0, ..rw(0) }, 0), PacketError::Op(0));
        assert_eq!(e(Header { op: 8, ..rw(0) }, 0), PacketError::Op(8));
        assert_eq!(e(rw(10), 9), PacketError::Len { len: 10, have: 9 });
        assert_eq!(
            e(rw(MAX_PAYLOAD + 1), 0),
            PacketError::TooLong(MAX_PAYLOAD + 1)
        );
        assert_eq!(
            e(
                Header {
                    op: op::REQUEST,
                    ..rw(1)
                },
                1
            ),
            PacketError::Payload { op: 1, len: 1 }
        );
    }

    #[test]
    fn only_packets_with_our_addresses_get_a_reset() {
        assert!(rst_worthy(&packet(Header { kind: 7, ..rw(0) }, &[]), 3).is_some());
        assert!(rst_worthy(
            &packet(
                Header {
                    src_cid: 5,
                    ..rw(0)
                },
                &[]
            ),
            3
        )
        .is_none());
        assert!(rst_worthy(
            &packet(
                Header {
                    op: op::RST,
                    ..rw(0)
                },
                &[]
            ),
            3
        )
        .is_none());
        assert!(rst_worthy(&[0; 10], 3).is_none());
    }

    proptest! {
        /// Any bytes either parse into a header whose payload lies inside them, or are
        /// refused; never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok((h, payload)) = parse_tx(&bytes, 3) {
                prop_assert_eq!(payload.len(), h.len as usize);
                prop_assert!(HDR_LEN + payload.len() <= bytes.len());
                prop_assert!(h.op == op::RW || h.len == 0);
                prop_assert_eq!(h.src_cid, 3);
            }
        }

        /// Headers with random fields: accepted exactly when every rule holds.
        #[test]
        fn random_headers_are_judged_by_every_rule(
            src in 0u64..6, dst in 0u64..4, kind in 0u16..3, opc in 0u16..9,
            len in 0u32..100, extra in 0usize..100,
        ) {
            let h = Header { src_cid: src, dst_cid: dst, kind, op: opc, len, ..Header::default() };
            let ok = src == 3 && dst == HOST_CID && kind == TYPE_STREAM
                && (1..=7).contains(&opc) && len as usize <= extra && (opc == op::RW || len == 0);
            prop_assert_eq!(parse_tx(&packet(h, &vec![1; extra]), 3).is_ok(), ok);
        }
    }
}
