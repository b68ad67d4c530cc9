//! The pre-shared key both hosts were configured with (`--key-file`). It keys the Noise
//! handshake of [`crate::secure`]: the secret is stretched to 32 bytes with BLAKE3's key
//! derivation, so any secret of at least [`MIN_KEY_LEN`] bytes works.

use std::fmt;
use std::io::Read;

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

    /// The 32 bytes that key the Noise handshake.
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
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

/// Constant-time equality: every byte is looked at whatever the first difference.
pub fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// 32 fresh random bytes from the kernel (the VMM's API tokens use them too).
pub fn fresh_nonce() -> std::io::Result<[u8; 32]> {
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_derived_from_the_whole_secret() {
        let k = PresharedKey::new(b"0123456789abcdef").unwrap();
        let other = PresharedKey::new(b"0123456789abcdeX").unwrap();
        assert_ne!(k.bytes(), other.bytes());
        assert_eq!(
            k.bytes(),
            PresharedKey::new(b"0123456789abcdef").unwrap().bytes()
        );
    }

    #[test]
    fn short_keys_are_refused_with_their_length() {
        let e = PresharedKey::new(b"short").unwrap_err();
        assert!(e.to_string().contains("5 bytes"), "{e}");
    }
}
