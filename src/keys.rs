//! ed25519 key files: the text format, key ids, and generation.
//!
//! A key file is UTF-8 text. Blank lines and lines starting with `#` are
//! comments. Exactly one line carries the key:
//!
//! ```text
//! clinicbox-ed25519-public-v1 <base64 of the 32-byte public key> [comment]
//! clinicbox-ed25519-secret-v1 <base64 of the 32-byte secret seed> [comment]
//! ```
//!
//! (standard base64 with padding, RFC 4648 §4). A key's id is the lowercase
//! hex SHA-256 of its 32 raw public-key bytes. The id is only ever a *hint*
//! (DSSE `keyid`, display); trust decisions always verify the signature with
//! the trusted key itself.
//!
//! Invariants: secret key files are written with mode 0600; a public key is
//! accepted only if it is a valid, non-weak (not small-order) Edwards point.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::fsutil;

/// Tag of a public key line.
pub const PUBLIC_TAG: &str = "clinicbox-ed25519-public-v1";
/// Tag of a secret key line.
pub const SECRET_TAG: &str = "clinicbox-ed25519-secret-v1";

/// The id of a public key: hex SHA-256 of its raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// The id of `key`.
    pub fn of(key: &VerifyingKey) -> KeyId {
        KeyId(hex::encode(Sha256::digest(key.as_bytes())))
    }

    /// Parses a full 64-hex-digit key id.
    pub fn parse(s: &str) -> Option<KeyId> {
        let ok = s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        ok.then(|| KeyId(s.to_owned()))
    }

    /// The id as hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 16 hex digits, for humans.
    pub fn short(&self) -> &str {
        &self.0[..16]
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key file could not be used.
#[derive(Debug, Error)]
pub enum KeyError {
    /// Reading the file failed.
    #[error(transparent)]
    Read(#[from] fsutil::ReadError),
    /// The file is not in the documented format.
    #[error("{file}:{line}: {reason}")]
    Format {
        /// The file.
        file: String,
        /// 1-based line number (0 when the whole file is at fault).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Writing a key file failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The OS random source failed.
    #[error("cannot get randomness from the operating system: {0}")]
    Random(String),
}

/// Parses the text of a public key file. `file` names it in errors.
pub fn parse_public(text: &str, file: &str) -> Result<VerifyingKey, KeyError> {
    let (line, bytes) = parse_key_line(text, file, PUBLIC_TAG)?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Format {
        file: file.to_owned(),
        line,
        reason: "not a valid ed25519 public key (not a curve point)".into(),
    })?;
    if key.is_weak() {
        return Err(KeyError::Format {
            file: file.to_owned(),
            line,
            reason: "weak ed25519 public key (small-order point) refused".into(),
        });
    }
    Ok(key)
}

/// Parses the text of a secret key file. `file` names it in errors.
pub fn parse_secret(text: &str, file: &str) -> Result<SigningKey, KeyError> {
    let (_, bytes) = parse_key_line(text, file, SECRET_TAG)?;
    Ok(SigningKey::from_bytes(&bytes))
}

fn parse_key_line(text: &str, file: &str, tag: &str) -> Result<(usize, [u8; 32]), KeyError> {
    let err = |line: usize, reason: String| KeyError::Format {
        file: file.to_owned(),
        line,
        reason,
    };
    let mut found = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if found.is_some() {
            return Err(err(line_no, "more than one key line".into()));
        }
        let mut parts = line.split_whitespace();
        let got_tag = parts.next().unwrap_or_default();
        if got_tag != tag {
            let hint = if got_tag == SECRET_TAG || got_tag == PUBLIC_TAG {
                format!("expected a {tag} line, found a {got_tag} line (wrong kind of key file?)")
            } else {
                format!("expected a line starting with {tag}")
            };
            return Err(err(line_no, hint));
        }
        let b64 = parts
            .next()
            .ok_or_else(|| err(line_no, "missing base64 key after the tag".into()))?;
        let bytes = B64
            .decode(b64)
            .map_err(|e| err(line_no, format!("key is not valid base64: {e}")))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|v: Vec<u8>| err(line_no, format!("key is {} bytes, expected 32", v.len())))?;
        found = Some((line_no, bytes));
    }
    found.ok_or_else(|| err(0, format!("no {tag} line found")))
}

/// Reads and parses a public key file.
pub fn read_public(path: &Path, cap: u64) -> Result<VerifyingKey, KeyError> {
    let bytes = fsutil::read_bounded(path, cap)?;
    let text = utf8(&bytes, path)?;
    parse_public(text, &path.display().to_string())
}

/// Reads and parses a secret key file.
pub fn read_secret(path: &Path, cap: u64) -> Result<SigningKey, KeyError> {
    let bytes = fsutil::read_bounded(path, cap)?;
    let text = utf8(&bytes, path)?;
    parse_secret(text, &path.display().to_string())
}

fn utf8<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a str, KeyError> {
    std::str::from_utf8(bytes).map_err(|e| KeyError::Format {
        file: path.display().to_string(),
        line: 0,
        reason: format!("not UTF-8 text: {e}"),
    })
}

/// Renders a public key file.
pub fn public_file_text(key: &VerifyingKey, comment: &str) -> String {
    format!(
        "# clinicbox ed25519 public key, id {}\n{PUBLIC_TAG} {} {}\n",
        KeyId::of(key),
        B64.encode(key.as_bytes()),
        comment
    )
}

/// Renders a secret key file. `banner` lines are written as comments first.
pub fn secret_file_text(key: &SigningKey, comment: &str, banner: &[&str]) -> String {
    let mut out = String::new();
    for line in banner {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!(
        "# clinicbox ed25519 secret key, public id {}\n{SECRET_TAG} {} {}\n",
        KeyId::of(&key.verifying_key()),
        B64.encode(key.to_bytes()),
        comment
    ));
    out
}

/// A new random signing key from the OS random source.
pub fn generate() -> Result<SigningKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes `NAME.key` (0600) and `NAME.pub` (0644) for a new key, refusing to
/// overwrite either. Returns the paths written.
pub fn write_pair(
    key: &SigningKey,
    secret_path: &Path,
    public_path: &Path,
    comment: &str,
    banner: &[&str],
) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write_new = |path: &Path, mode: u32, text: &str| {
        let werr = |source| KeyError::Write {
            path: path.display().to_string(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(werr)?;
        f.write_all(text.as_bytes()).map_err(werr)?;
        f.sync_all().map_err(werr)
    };
    write_new(secret_path, 0o600, &secret_file_text(key, comment, banner))?;
    write_new(
        public_path,
        0o644,
        &public_file_text(&key.verifying_key(), comment),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_public_and_secret() {
        let key = generate().unwrap();
        let pub_text = public_file_text(&key.verifying_key(), "vendor");
        let sec_text = secret_file_text(&key, "vendor", &["TEST ONLY"]);
        assert_eq!(
            parse_public(&pub_text, "k.pub").unwrap(),
            key.verifying_key()
        );
        assert_eq!(
            parse_secret(&sec_text, "k.key").unwrap().to_bytes(),
            key.to_bytes()
        );
    }

    #[test]
    fn wrong_kind_of_file_is_named() {
        let key = generate().unwrap();
        let sec_text = secret_file_text(&key, "", &[]);
        let err = parse_public(&sec_text, "k.pub").unwrap_err().to_string();
        assert!(
            err.starts_with("k.pub:2: expected a clinicbox-ed25519-public-v1 line"),
            "{err}"
        );
    }

    #[test]
    fn short_and_weak_keys_are_refused() {
        let short = format!("{PUBLIC_TAG} {}\n", B64.encode([1u8; 31]));
        let err = parse_public(&short, "s.pub").unwrap_err().to_string();
        assert!(err.contains("31 bytes, expected 32"), "{err}");
        // The identity point (all zero but the first byte = 1) is small-order.
        let mut ident = [0u8; 32];
        ident[0] = 1;
        let weak = format!("{PUBLIC_TAG} {}\n", B64.encode(ident));
        let err = parse_public(&weak, "w.pub").unwrap_err().to_string();
        assert!(err.contains("weak"), "{err}");
    }
}
