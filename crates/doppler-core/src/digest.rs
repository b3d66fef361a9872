//! A model file's SHA-256, the fingerprint doppler records for each `name@version` at
//! registration (doppler.models.sha256) and every external worker checks its own copy against,
//! so that a vector's model tag means the same weights on every host.

use std::io::Read;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The SHA-256 of the file at `path`, as 64 lowercase hex digits, read in 1 MiB pieces.
pub fn sha256_file(path: &str) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, &e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, &e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Whether `s` reads as a SHA-256 in hex (64 hex digits, any case).
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        let dir = std::env::temp_dir().join(format!("doppler-digest-{}", std::process::id()));
        std::fs::write(&dir, b"abc").unwrap();
        let d = sha256_file(dir.to_str().unwrap()).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(
            d,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256(&d));
        assert!(!is_sha256("abc"));
    }

    #[test]
    fn missing_file_is_an_error() {
        assert!(sha256_file("/nonexistent/doppler-model.onnx").is_err());
    }
}
