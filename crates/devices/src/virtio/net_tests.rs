use proptest::prelude::*;

use super::super::queue::Descriptor;
use super::*;

fn chain(parts: &[(u32, bool)]) -> Chain {
    Chain {
        head: 3,
        descriptors: parts
            .iter()
            .enumerate()
            .map(|(i, &(len, writable))| Descriptor {
                addr: 0x1000 * i as u64,
                len,
                writable,
            })
            .collect(),
    }
}

#[test]
fn receive_buffers_are_writable_and_hold_a_header() {
    assert_eq!(rx_capacity(&chain(&[(12, true), (1514, true)])), Ok(1526));
    let e = rx_capacity(&chain(&[(12, true), (100, false)])).unwrap_err();
    assert_eq!(
        e,
        "receive buffer 3 has a device-readable part (descriptor 1)"
    );
    let e = rx_capacity(&chain(&[(11, true)])).unwrap_err();
    assert!(e.contains("holds 11 bytes"), "{e}");
}

#[test]
fn transmit_requests_are_readable_and_bounded() {
    assert_eq!(tx_length(&chain(&[(12, false), (60, false)])), Ok(72));
    let e = tx_length(&chain(&[(12, false), (60, true)])).unwrap_err();
    assert_eq!(
        e,
        "transmit request 3 has a device-writable part (descriptor 1)"
    );
    assert!(tx_length(&chain(&[(11, false)])).is_err());
    assert!(tx_length(&chain(&[(12, false), (MAX_TX_FRAME, false)])).is_ok());
    let e = tx_length(&chain(&[(12, false), (MAX_TX_FRAME + 1, false)])).unwrap_err();
    assert!(e.contains("65563 bytes"), "{e}");
}

#[test]
fn the_configuration_holds_the_mac_and_link_up() {
    let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let net = Net::new(
        [2, 0, 0, 0, 0, 9],
        File::from(std::os::fd::OwnedFd::from(a)),
        Default::default(),
        None,
    )
    .unwrap();
    let mut c = [0u8; 8];
    net.read_config(0, &mut c);
    assert_eq!(c, [2, 0, 0, 0, 0, 9, 1, 0]);
    let mut c = [0xffu8; 4];
    net.read_config(6, &mut c);
    assert_eq!(c, [1, 0, 0, 0]);
    assert_ne!(net.features() & F_MAC, 0);
}

proptest! {
    /// Any chain is either accepted with its exact size or refused with a reason; never
    /// a panic, never a size beyond what the descriptors hold.
    #[test]
    fn chain_parsers_accept_exactly_the_well_formed(
        parts in proptest::collection::vec((0u32..70_000, any::<bool>()), 0..8)
    ) {
        let c = chain(&parts);
        let total: u64 = parts.iter().map(|p| u64::from(p.0)).sum();
        let all_w = parts.iter().all(|p| p.1);
        let all_r = parts.iter().all(|p| !p.1);
        match rx_capacity(&c) {
            Ok(n) => prop_assert!(all_w && total >= 12 && u64::from(n) == total.min(u64::from(u32::MAX))),
            Err(_) => prop_assert!(!all_w || total < 12),
        }
        match tx_length(&c) {
            Ok(n) => prop_assert!(all_r && u64::from(n) == total && (12..=65_562).contains(&total)),
            Err(_) => prop_assert!(!all_r || !(12..=65_562).contains(&total)),
        }
    }
}
