//! The `.cbx` container: how the DSSE envelope and the wasm module sit in
//! one file (docs/bundle-format.md §1).
//!
//! ```text
//! offset      size  field
//! 0           8     magic 43 42 58 31 0D 0A 1A 0A  ("CBX1\r\n\x1a\n")
//! 8           4     E = envelope length, u32 big-endian
//! 12          E     DSSE envelope, UTF-8 JSON
//! 12+E        8     W = wasm length, u64 big-endian
//! 20+E        W     WebAssembly module
//! 20+E+W            end of file: nothing may follow
//! ```
//!
//! Invariant: `parse` checks each length against its cap and against the
//! bytes actually present before slicing, and refuses trailing bytes, so the
//! same file can never be read two ways.

use thiserror::Error;

use crate::limits::Limits;

/// The 8 magic bytes every bundle starts with. `\r\n` and `\x1a` catch
/// text-mode and line-ending mangling in transit, as PNG's magic does.
pub const MAGIC: [u8; 8] = *b"CBX1\r\n\x1a\n";

/// The two parts of a framed bundle, borrowed from the file's bytes.
#[derive(Debug, Clone, Copy)]
pub struct Parts<'a> {
    /// The DSSE envelope JSON.
    pub envelope: &'a [u8],
    /// The WebAssembly module.
    pub wasm: &'a [u8],
}

/// Why the container framing is invalid (step 2).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// The file does not start with the magic bytes.
    #[error("not a clinicbox bundle: bad magic bytes at offset 0")]
    BadMagic,
    /// The file ends before a field it declares.
    #[error("truncated bundle: {field} at offset {offset} needs {need} bytes, only {have} present")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Its offset.
        offset: u64,
        /// Bytes it needs.
        need: u64,
        /// Bytes present from that offset.
        have: u64,
    },
    /// A declared length exceeds its cap.
    #[error("{field} declares {size} bytes, over the limit of {cap} bytes")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// Declared size.
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// Bytes follow the wasm module.
    #[error("{extra} unexpected trailing bytes after the wasm module at offset {offset}")]
    Trailing {
        /// Where they start.
        offset: u64,
        /// How many.
        extra: u64,
    },
}

/// Frames an envelope and a wasm module into bundle bytes.
pub fn build(envelope: &[u8], wasm: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + envelope.len() + wasm.len());
    out.extend_from_slice(&MAGIC);
    // Envelope sizes are bounded by Limits far below u32::MAX.
    out.extend_from_slice(&(envelope.len() as u32).to_be_bytes());
    out.extend_from_slice(envelope);
    out.extend_from_slice(&(wasm.len() as u64).to_be_bytes());
    out.extend_from_slice(wasm);
    out
}

/// Splits bundle bytes into envelope and wasm, checking every length.
pub fn parse<'a>(bytes: &'a [u8], limits: &Limits) -> Result<Parts<'a>, FrameError> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.take("magic", 8)?;
    if magic != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let env_len = u32::from_be_bytes(r.array("envelope length")?);
    if env_len > limits.max_envelope_bytes {
        return Err(FrameError::TooLarge {
            field: "envelope",
            size: env_len.into(),
            cap: limits.max_envelope_bytes.into(),
        });
    }
    let envelope = r.take("envelope", env_len.into())?;
    let wasm_len = u64::from_be_bytes(r.array("wasm length")?);
    if wasm_len > limits.max_wasm_bytes {
        return Err(FrameError::TooLarge {
            field: "wasm module",
            size: wasm_len,
            cap: limits.max_wasm_bytes,
        });
    }
    let wasm = r.take("wasm module", wasm_len)?;
    if r.pos < bytes.len() {
        return Err(FrameError::Trailing {
            offset: r.pos as u64,
            extra: (bytes.len() - r.pos) as u64,
        });
    }
    Ok(Parts { envelope, wasm })
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: u64) -> Result<&'a [u8], FrameError> {
        let have = (self.bytes.len() - self.pos) as u64;
        if n > have {
            return Err(FrameError::Truncated {
                field,
                offset: self.pos as u64,
                need: n,
                have,
            });
        }
        // n <= have <= usize::MAX, so the cast is lossless.
        let out = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FrameError> {
        let s = self.take(field, N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let b = build(b"{}", b"\0asm");
        let p = parse(&b, &Limits::default()).unwrap();
        assert_eq!(p.envelope, b"{}");
        assert_eq!(p.wasm, b"\0asm");
    }

    #[test]
    fn every_truncation_is_refused() {
        let b = build(b"{\"a\":1}", b"\0asm\x01\0\0\0");
        for cut in 0..b.len() {
            let err = parse(&b[..cut], &Limits::default()).unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { .. }),
                "cut at {cut}: {err:?}"
            );
        }
    }

    #[test]
    fn trailing_bytes_and_bad_magic_and_caps() {
        let mut b = build(b"{}", b"x");
        b.push(0);
        assert!(matches!(
            parse(&b, &Limits::default()),
            Err(FrameError::Trailing { extra: 1, .. })
        ));
        b[0] = b'X';
        assert_eq!(
            parse(&b, &Limits::default()).unwrap_err(),
            FrameError::BadMagic
        );
        let limits = Limits {
            max_wasm_bytes: 0,
            ..Limits::default()
        };
        assert!(matches!(
            parse(&build(b"{}", b"x"), &limits),
            Err(FrameError::TooLarge {
                field: "wasm module",
                ..
            })
        ));
    }
}
