//! A virtio-vsock packet from a hostile guest: the first byte picks the guest's cid
//! (3..=10), the rest is the packet as the device gathers it from a transmit chain.
//! Whatever the parser accepts has the guest's source, the host's destination, a known
//! operation, and a payload inside the bytes (only RW carries one); a refusal that
//! earns a RST names the guest and the host.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ray_devices::virtio::vsock::packet::{self, op, HDR_LEN, HOST_CID};

fuzz_target!(|data: &[u8]| {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    let cid = 3 + u64::from(first % 8);
    match packet::parse_tx(bytes, cid) {
        Ok((h, payload)) => {
            assert_eq!((h.src_cid, h.dst_cid), (cid, HOST_CID));
            assert!((op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op));
            assert_eq!(payload.len(), h.len as usize);
            assert!(HDR_LEN + payload.len() <= bytes.len());
            assert!(h.op == op::RW || payload.is_empty());
            assert_eq!(packet::Header::parse(&h.to_bytes()), Ok(h));
        }
        Err(_) => {
            if let Some(h) = packet::rst_worthy(bytes, cid) {
                assert_eq!((h.src_cid, h.dst_cid), (cid, HOST_CID));
                assert_ne!(h.op, op::RST);
            }
        }
    }
});
