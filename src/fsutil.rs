//! Small filesystem primitives: bounded reads, atomic writes, private dirs,
//! and the crash-injection fail-points the install tests use.
//!
//! Invariants:
//! - `read_bounded` never allocates more than `cap + 1` bytes, whatever the
//!   file claims or becomes while being read.
//! - `write_atomic` leaves either the old file or the complete new file at
//!   `path`, never a mix, after a crash at any point: it writes a temp file in
//!   the same directory, fsyncs it, renames it over `path`, then fsyncs the
//!   directory (the RAUC / SQLite recipe).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// A bounded read failed.
#[derive(Debug, Error)]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file is larger than the cap; nothing past the cap was read.
    #[error("{path} is {size} bytes, over the limit of {cap} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size as seen (from metadata, or bytes read so far).
        size: u64,
        /// The cap.
        cap: u64,
    },
}

/// Reads `path` whole if it is at most `cap` bytes. The size is checked from
/// metadata first, and the read itself stops at `cap + 1` bytes, so a file
/// that lies about its size or grows meanwhile is still refused.
pub fn read_bounded(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    let io_err = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if meta.is_file() && meta.len() > cap {
        return Err(ReadError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
            cap,
        });
    }
    let hint = if meta.is_file() { meta.len() } else { 0 };
    let mut buf = Vec::with_capacity(usize::try_from(hint.min(cap)).unwrap_or(0));
    file.take(cap.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(io_err)?;
    if buf.len() as u64 > cap {
        return Err(ReadError::TooLarge {
            path: path.to_path_buf(),
            size: buf.len() as u64,
            cap,
        });
    }
    Ok(buf)
}

/// Creates `dir` (and parents) if missing and sets its mode to `mode`.
pub fn ensure_private_dir(dir: &Path, mode: u32) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

/// fsyncs a directory so that a rename or create inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Atomically replaces `path` with `bytes`, created with `mode`.
///
/// Fail-points (see [`failpoint`]) named `<fp_prefix>.tmp-created`,
/// `.tmp-written`, `.tmp-synced`, `.renamed` and `.dir-synced` let the crash
/// tests kill the process between every step.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32, fp_prefix: &str) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).map_err(|e| io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        hex::encode(suffix)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        failpoint(&format!("{fp_prefix}.tmp-created"));
        file.write_all(bytes)?;
        failpoint(&format!("{fp_prefix}.tmp-written"));
        file.sync_all()?;
        failpoint(&format!("{fp_prefix}.tmp-synced"));
        fs::rename(&tmp, path)?;
        failpoint(&format!("{fp_prefix}.renamed"));
        sync_dir(dir)?;
        failpoint(&format!("{fp_prefix}.dir-synced"));
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Name of the environment variable that arms a fail-point.
pub const FAILPOINT_ENV: &str = "CLINICBOX_FAILPOINT";

/// The armed fail-point, if any: `CLINICBOX_FAILPOINT` as the process
/// started (read once; the tests arm it per process), so an unarmed
/// fail-point on a hot path costs one load.
pub fn armed_failpoint() -> Option<&'static str> {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(FAILPOINT_ENV).ok())
        .as_deref()
}

/// Crash-injection hook for the atomicity tests.
///
/// When the environment variable `CLINICBOX_FAILPOINT` equals `name`, the
/// process aborts on the spot (as a power cut or `kill -9` would stop it:
/// no destructors, no flushing). Otherwise this does nothing. It can only
/// stop the process, never skip a check, so it is safe to ship.
pub fn failpoint(name: &str) {
    if armed_failpoint() == Some(name) {
        eprintln!("clinicbox: fail-point {name} reached, aborting");
        std::process::abort();
    }
}

/// Like [`failpoint`], but panics instead of aborting: for tests of panic
/// containment (e.g. `host.fhir_read`).
pub fn panicpoint(name: &str) {
    if armed_failpoint() == Some(name) {
        panic!("clinicbox: panic-point {name} reached");
    }
}

/// Error-injection hook for the fault tests: true when the variable equals
/// `error:` + `name`, and the caller then fails the named operation as a
/// broken disk would (e.g. `audit.append`: every audit append fails at
/// its commit). It can only make an operation fail, never succeed or skip
/// a check, so it is safe to ship.
pub fn errpoint(name: &str) -> bool {
    armed_failpoint().and_then(|v| v.strip_prefix("error:")) == Some(name)
}

/// Like [`failpoint`], but waits [`DELAYPOINT_WAIT`] when the variable
/// equals `delay:` + `name`: for tests of a slow host (a stalled disk
/// behind a host function) without loading the machine.
pub fn delaypoint(name: &str) {
    if armed_failpoint().and_then(|v| v.strip_prefix("delay:")) == Some(name) {
        std::thread::sleep(DELAYPOINT_WAIT);
    }
}

/// How long an armed [`delaypoint`] waits.
pub const DELAYPOINT_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_bounded_refuses_over_cap_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, vec![7u8; 100]).unwrap();
        assert_eq!(read_bounded(&p, 100).unwrap().len(), 100);
        match read_bounded(&p, 99) {
            Err(ReadError::TooLarge {
                size: 100, cap: 99, ..
            }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600, "t").unwrap();
        write_atomic(&p, b"two", 0o600, "t").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temp file left behind");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
