//! VNC authentication (RFB security type 2, RFC 6143 §7.2.2): the server sends a random
//! 16-byte challenge, the viewer answers with it DES-encrypted under the password. The
//! password comes from a file only its owner may read; RFB uses its first 8 bytes, so a
//! longer one is refused rather than silently cut.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use des::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};

/// Longest password RFB's DES key holds.
pub const MAX_PASSWORD: usize = 8;

/// Why a password file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("cannot read the VNC password file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the VNC password file {path} has mode {mode:o}: others may read it (chmod 600 it)")]
    Mode { path: String, mode: u32 },
    #[error("the VNC password file {path} is empty")]
    Empty { path: String },
    #[error(
        "the VNC password in {path} has {len} bytes; VNC authentication uses at most {MAX_PASSWORD}"
    )]
    TooLong { path: String, len: usize },
}

/// A VNC password (its DES key).
#[derive(Clone, PartialEq, Eq)]
pub struct Password([u8; MAX_PASSWORD]);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

impl Password {
    /// A password of at most 8 bytes (longer is refused by the caller).
    pub fn new(bytes: &[u8]) -> Password {
        let mut p = [0u8; MAX_PASSWORD];
        let n = bytes.len().min(MAX_PASSWORD);
        p[..n].copy_from_slice(&bytes[..n]);
        Password(p)
    }

    /// Reads the password from `path`: the first line, which must be 1 to 8 bytes, of a
    /// file that neither group nor others may read or write.
    pub fn from_file(path: &Path) -> Result<Password, PasswordError> {
        let name = path.display().to_string();
        let read = |source| PasswordError::Read {
            path: name.clone(),
            source,
        };
        // A jailed VMM's keeper opens it (it stays private to its owner).
        let mut file = ray_outside::open_read(path).map_err(read)?;
        let meta = file.metadata().map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(PasswordError::Mode { path: name, mode });
        }
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut text).map_err(read)?;
        let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match line.len() {
            0 => Err(PasswordError::Empty { path: name }),
            len if len > MAX_PASSWORD => Err(PasswordError::TooLong { path: name, len }),
            _ => Ok(Password::new(line)),
        }
    }

    /// What a viewer knowing this password answers to `challenge`.
    pub fn response(&self, challenge: &[u8; 16]) -> [u8; 16] {
        // RFB's quirk: each key byte's bits are mirrored.
        let key: Vec<u8> = self.0.iter().map(|b| b.reverse_bits()).collect();
        let cipher = des::Des::new(GenericArray::from_slice(&key));
        let mut out = *challenge;
        for half in out.chunks_exact_mut(8) {
            cipher.encrypt_block(GenericArray::from_mut_slice(half));
        }
        out
    }

    /// Whether `answer` is the response to `challenge`, compared in constant time.
    pub fn verify(&self, challenge: &[u8; 16], answer: &[u8; 16]) -> bool {
        let want = self.response(challenge);
        want.iter()
            .zip(answer)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// 16 random bytes from the kernel's CSPRNG.
pub fn challenge() -> std::io::Result<[u8; 16]> {
    let mut c = [0u8; 16];
    let mut done = 0;
    while done < c.len() {
        // SAFETY: the kernel writes at most `c.len() - done` bytes into the rest of `c`, a
        // live, writable buffer.
        let n = unsafe { libc::getrandom(c[done..].as_mut_ptr().cast(), c.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        done += n as usize;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn des_matches_the_published_test_vector() {
        // FIPS 81 / the classic DES example: key 133457799BBCDFF1 encrypts
        // 0123456789ABCDEF to 85E813540F0AB405. Our key bytes are mirrored first, so
        // mirror them back here.
        let key = [0x13u8, 0x34, 0x57, 0x79, 0x9b, 0xbc, 0xdf, 0xf1].map(|b| b.reverse_bits());
        let p = Password(key);
        let mut block = [0u8; 16];
        block[..8].copy_from_slice(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        block[8..].copy_from_slice(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        let r = p.response(&block);
        assert_eq!(&r[..8], &[0x85, 0xe8, 0x13, 0x54, 0x0f, 0x0a, 0xb4, 0x05]);
        assert_eq!(r[..8], r[8..]);
        assert!(p.verify(&block, &r));
        let mut wrong = r;
        wrong[15] ^= 1;
        assert!(!p.verify(&block, &wrong));
        assert_ne!(challenge().unwrap(), challenge().unwrap());
    }

    #[test]
    fn password_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("ray-vnc-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &[u8], mode: u32| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let ok = write("ok", b"s3cret\n", 0o600);
        assert_eq!(Password::from_file(&ok).unwrap(), Password::new(b"s3cret"));
        let e = Password::from_file(&write("open", b"x\n", 0o644)).unwrap_err();
        assert!(
            e.to_string().contains("has mode 644: others may read it"),
            "{e}"
        );
        let e = Password::from_file(&write("long", b"123456789", 0o400)).unwrap_err();
        assert!(e.to_string().contains("has 9 bytes"), "{e}");
        let e = Password::from_file(&write("empty", b"\n", 0o600)).unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");
        let e = Password::from_file(&dir.join("missing")).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
