//! Pre-shared-key authentication: mutual challenge/response and a per-session MAC key.
//!
//! Each side sends a fresh 32-byte nonce in `Hello`. The source then proves knowledge of
//! the key with `MAC(k, "source" | version | nonce_s | nonce_t)`; the target answers with
//! its own proof (`"target"` label) only after checking the source's, so an impostor source
//! learns nothing and an impostor target is caught before a single page leaves the source.
//! Both proofs cover both nonces and the negotiated version, so a replayed or downgraded
//! handshake fails. The session key that MACs every later frame is derived the same way
//! with a `"session"` label. The MAC is keyed BLAKE3; comparisons are constant time.

use std::fmt;
use std::io::Read;

/// A nonce sent in `Hello`.
pub type Nonce = [u8; 32];

/// Shortest pre-shared key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;

/// The pre-shared key both hosts were configured with.
#[derive(Clone)]
pub struct PresharedKey([u8; 32]);

impl PresharedKey {
    /// Accepts a secret of at least [`MIN_KEY_LEN`] bytes.
    pub fn new(secret: &[u8]) -> Result<Self, KeyTooShort> {
        if secret.len() < MIN_KEY_LEN {
            return Err(KeyTooShort { len: secret.len() });
        }
        Ok(Self(blake3::derive_key(
            "rayvisor migration pre-shared key v1",
            secret,
        )))
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the migration pre-shared key is {len} bytes long; it must be at least {MIN_KEY_LEN}")]
pub struct KeyTooShort {
    pub len: usize,
}

/// The key that MACs every frame after the handshake.
#[derive(Clone)]
pub struct SessionKey([u8; 32]);

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// Which side a proof speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

fn labelled(key: &[u8; 32], label: &[u8], version: u16, ns: &Nonce, nt: &Nonce) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(label);
    h.update(&version.to_le_bytes());
    h.update(ns);
    h.update(nt);
    *h.finalize().as_bytes()
}

/// The proof `side` sends in its `Auth` frame.
pub fn proof(psk: &PresharedKey, side: Side, version: u16, ns: &Nonce, nt: &Nonce) -> [u8; 32] {
    let label: &[u8] = match side {
        Side::Source => b"source",
        Side::Target => b"target",
    };
    labelled(&psk.0, label, version, ns, nt)
}

/// Checks a peer's proof in constant time.
pub fn verify_proof(
    psk: &PresharedKey,
    side: Side,
    version: u16,
    ns: &Nonce,
    nt: &Nonce,
    mac: &[u8; 32],
) -> bool {
    ct_eq(&proof(psk, side, version, ns, nt), mac)
}

/// The session key both sides derive once the proofs check out.
pub fn derive_session_key(psk: &PresharedKey, version: u16, ns: &Nonce, nt: &Nonce) -> SessionKey {
    SessionKey(labelled(&psk.0, b"session", version, ns, nt))
}

/// Test helper: a session key straight from raw bytes.
#[cfg(test)]
pub fn session_key(secret: &[u8], ns: &Nonce, nt: &Nonce, version: u16) -> SessionKey {
    let psk = PresharedKey(blake3::derive_key("test", secret));
    derive_session_key(&psk, version, ns, nt)
}

/// MAC of one frame: the per-direction sequence number, the header and the payload.
pub fn frame_mac(key: &SessionKey, seq: u64, header: &[u8], payload: &[u8]) -> [u8; 32] {
    frame_mac_parts(key, seq, header, &[payload])
}

/// [`frame_mac`] of a payload given as consecutive parts.
pub fn frame_mac_parts(key: &SessionKey, seq: u64, header: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(&seq.to_le_bytes());
    h.update(header);
    for p in parts {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// Constant-time equality: every byte is looked at whatever the first difference.
pub fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A fresh random nonce from the kernel.
pub fn fresh_nonce() -> std::io::Result<Nonce> {
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_side_key_version_and_both_nonces() {
        let k = PresharedKey::new(b"0123456789abcdef").unwrap();
        let other = PresharedKey::new(b"0123456789abcdeX").unwrap();
        let (ns, nt) = ([1u8; 32], [2u8; 32]);
        let p = proof(&k, Side::Source, 1, &ns, &nt);
        assert!(verify_proof(&k, Side::Source, 1, &ns, &nt, &p));
        assert!(!verify_proof(&k, Side::Target, 1, &ns, &nt, &p));
        assert!(!verify_proof(&other, Side::Source, 1, &ns, &nt, &p));
        assert!(!verify_proof(&k, Side::Source, 2, &ns, &nt, &p));
        assert!(!verify_proof(&k, Side::Source, 1, &nt, &ns, &p));
    }

    #[test]
    fn short_keys_are_refused_with_their_length() {
        let e = PresharedKey::new(b"short").unwrap_err();
        assert!(e.to_string().contains("5 bytes"), "{e}");
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(fresh_nonce().unwrap(), fresh_nonce().unwrap());
    }
}
