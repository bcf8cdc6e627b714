//! The inbox: a directory where clinic IT (or a USB-stick script) drops
//! `.cbx` bundles; the daemon installs them without a restart.
//!
//! Each scan looks at the regular files directly in the inbox. A file is
//! taken only once its size and modification time are unchanged since the
//! previous scan, so a copy still in progress is left alone. Then it is
//! verified and installed exactly as `clinicbox plugin install` would
//! (the decision is recorded in the audit log either way), and moved:
//! - accepted (or already installed): to `accepted/<file>`;
//! - refused: to `rejected/<file>`, with `rejected/<file>.reason.txt`
//!   holding the reason. It is never retried; dropping it again retries it.
//!
//! Names starting with `.` are ignored (editors' and rsync's temp files).
//! The runtime serves a new version from the next call on (it checks the
//! current version on every call); the inbox also preloads it so that the
//! first call does not pay for compiling.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};

use super::App;

/// What one scan saw of a file: (size, mtime).
pub type Seen = HashMap<PathBuf, (u64, SystemTime)>;

/// Creates the inbox and its `accepted/` and `rejected/` directories.
pub fn prepare(inbox: &Path) -> Result<()> {
    for d in [
        inbox.to_path_buf(),
        inbox.join("accepted"),
        inbox.join("rejected"),
    ] {
        crate::fsutil::ensure_private_dir(&d, 0o700)
            .with_context(|| format!("cannot create inbox directory {}", d.display()))?;
    }
    Ok(())
}

/// One scan. Returns the files handled, with their outcome.
pub fn scan(
    app: &App,
    inbox: &Path,
    seen: &mut Seen,
) -> Result<Vec<(String, Result<String, String>)>> {
    let mut now: Seen = HashMap::new();
    let entries = std::fs::read_dir(inbox)
        .with_context(|| format!("cannot read inbox {}", inbox.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        now.insert(entry.path(), (meta.len(), meta.modified()?));
    }
    let mut handled = Vec::new();
    let mut paths: Vec<_> = now.keys().cloned().collect();
    paths.sort();
    for path in paths {
        if seen.get(&path) != now.get(&path) {
            continue; // new or still changing: look again next scan
        }
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("bundle")
            .to_owned();
        let outcome = take(app, inbox, &path, &file);
        match &outcome {
            Ok(v) => {
                app.metrics.bundle("inbox", "accepted");
                log::info!("inbox: {file}: {v}");
            }
            Err(reason) => {
                app.metrics.bundle("inbox", "rejected");
                log::warn!("inbox: {file} rejected: {reason}");
            }
        }
        now.remove(&path);
        handled.push((file, outcome));
    }
    *seen = now;
    Ok(handled)
}

fn take(app: &App, inbox: &Path, path: &Path, file: &str) -> Result<String, String> {
    let env = app.rt.env();
    let result = if file.ends_with(".cbx") {
        // Recorded (accepted or refused) by the install itself.
        crate::admin::install_file(&env.dir, path, &env.limits).map_err(|e| format!("{e:#}"))
    } else {
        let reason = "not a .cbx bundle (only .cbx files are taken from the inbox)".to_owned();
        let body = serde_json::json!({"action": "inbox", "file": file, "outcome": "rejected", "reason": reason});
        if let Err(e) = env
            .audit
            .append(crate::audit::log::Entry::new("inbox", &body))
        {
            log::error!("inbox: cannot record the refusal of {file}: {e:#}");
        }
        Err(reason)
    };
    match result {
        Ok(report) => {
            let text = format!(
                "{} {} {:?} (decision {})",
                report.plugin, report.version, report.outcome, report.decision
            );
            if let Err(e) = std::fs::rename(path, inbox.join("accepted").join(file)) {
                log::warn!("inbox: cannot move {file} to accepted/: {e}; removing it");
                let _ = std::fs::remove_file(path);
            }
            if let Err(e) = app.rt.preload() {
                log::warn!("inbox: preload after install: {e:#}");
            }
            Ok(text)
        }
        Err(reason) => {
            let dest = inbox.join("rejected").join(file);
            let note = format!("{reason}\n");
            let moved = std::fs::write(
                inbox.join("rejected").join(format!("{file}.reason.txt")),
                note,
            )
            .and_then(|()| std::fs::rename(path, &dest));
            if let Err(e) = moved {
                // Never retry a rejected file forever: if it cannot be moved,
                // remove it (its refusal is in the audit log).
                log::error!("inbox: cannot move {file} to rejected/: {e}; removing it");
                let _ = std::fs::remove_file(path);
            }
            Err(reason)
        }
    }
}
