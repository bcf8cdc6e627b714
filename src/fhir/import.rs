//! Bulk import into the FHIR cache: FHIR Bulk Data NDJSON (optionally
//! gzipped), Bulk Data export manifests (`output[]` and `deleted[]`), and
//! transaction / batch / collection Bundles.
//!
//! Invariants:
//! - NDJSON is streamed line by line with a bounded line length
//!   (`Limits::max_ndjson_line_bytes`); a longer line is skipped without
//!   being held in memory, so memory stays flat for files of many GB.
//! - Work is committed every `Limits::import_batch` resources. A bad line or
//!   resource is reported as `file:line: reason` and skipped; nothing
//!   already stored is touched by it. With `strict`, the first error rolls
//!   the whole file back.
//! - Re-importing the same input changes nothing (see `store::upsert`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rusqlite::Connection;
use serde::Serialize;
use serde_json::Value;

use super::store::{self, Deleted, Upserted};
use super::{ResourceError, StoreError, date, tenant_id};
use crate::fsutil;
use crate::limits::Limits;

/// Counts for one resource type.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// New resources.
    pub created: u64,
    /// New versions.
    pub updated: u64,
    /// Identical to what was stored.
    pub unchanged: u64,
    /// Older than what was stored (skipped).
    pub stale: u64,
    /// Tombstoned.
    pub deleted: u64,
}

/// What importing one file did.
#[derive(Debug, Default, Serialize)]
pub struct FileReport {
    /// The file.
    pub file: String,
    /// What kind of input it was.
    pub kind: String,
    /// Per resource type.
    pub types: BTreeMap<String, Counts>,
    /// Lines or entries skipped for errors.
    pub skipped: u64,
    /// `file:line: reason`, at most `Limits::import_max_reported_errors`.
    pub errors: Vec<String>,
    /// True if `strict` rolled the file back.
    pub rolled_back: bool,
}

impl FileReport {
    /// Total resources written (created + updated + deleted).
    pub fn written(&self) -> u64 {
        self.types
            .values()
            .map(|c| c.created + c.updated + c.deleted)
            .sum()
    }
}

/// Import options.
#[derive(Debug, Clone)]
pub struct Options {
    /// The tenant (clinic) to import into.
    pub tenant: String,
    /// Abort and roll back a whole file on its first error.
    pub strict: bool,
    /// Fallback `meta.lastUpdated` when neither the resource nor an export
    /// manifest gives one (the import time), Unix ms.
    pub now_ms: i64,
    /// Progress callback, called with the number of lines processed since
    /// its last call (every 1,000 lines).
    pub progress: Option<fn(u64)>,
}

/// Imports each file in order. Returns one report per file (an export
/// manifest expands to a report per listed file).
pub fn import_files(
    conn: &mut Connection,
    files: &[PathBuf],
    opts: &Options,
    limits: &Limits,
) -> Result<Vec<FileReport>> {
    let tid = tenant_id(conn, &opts.tenant, true)?.context("tenant was just created")?;
    let mut reports = Vec::new();
    for f in files {
        let name = f.display().to_string();
        if is_ndjson(f) {
            reports.push(import_ndjson(conn, tid, f, None, opts, limits)?);
        } else {
            let doc = read_json_doc(f, limits)?;
            if doc.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
                reports.push(import_bundle(conn, tid, &name, doc, opts)?);
            } else if doc.get("transactionTime").is_some() && doc.get("output").is_some() {
                reports.extend(import_manifest(conn, tid, f, &doc, opts, limits)?);
            } else {
                bail!("{name}: not NDJSON (by name), a Bundle, or a Bulk Data export manifest");
            }
        }
    }
    Ok(reports)
}

/// Imports one Bundle already in memory (a searchset page pulled from
/// upstream, say), named `name` in errors.
pub fn import_bundle_doc(
    conn: &mut Connection,
    name: &str,
    doc: Value,
    opts: &Options,
) -> Result<FileReport> {
    let tid = tenant_id(conn, &opts.tenant, true)?.context("tenant was just created")?;
    import_bundle(conn, tid, name, doc, opts)
}

fn is_ndjson(p: &Path) -> bool {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    n.ends_with(".ndjson") || n.ends_with(".ndjson.gz")
}

fn open_maybe_gz(path: &Path) -> Result<Box<dyn Read>> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let gz = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    Ok(if gz {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    })
}

fn read_json_doc(path: &Path, limits: &Limits) -> Result<Value> {
    let name = path.display().to_string();
    let bytes = if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
    {
        let mut buf = Vec::new();
        open_maybe_gz(path)?
            .take(limits.max_bundle_json_bytes + 1)
            .read_to_end(&mut buf)
            .with_context(|| format!("{name}: cannot read"))?;
        anyhow::ensure!(
            buf.len() as u64 <= limits.max_bundle_json_bytes,
            "{name}: over {} bytes",
            limits.max_bundle_json_bytes
        );
        buf
    } else {
        fsutil::read_bounded(path, limits.max_bundle_json_bytes)?
    };
    serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{name}:{}: {e}", e.line()))
}

/// One bounded line: its bytes, or that it was too long (and skipped).
enum Line {
    Eof,
    Ok,
    TooLong(usize),
}

/// Reads one `\n`-terminated line into `buf`, holding at most `max` bytes.
fn read_line_bounded(r: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    buf.clear();
    let mut total = 0usize;
    let mut any = false;
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            return Ok(if !any {
                Line::Eof
            } else if total > max {
                Line::TooLong(total)
            } else {
                Line::Ok
            });
        }
        any = true;
        let (part, done) = match memchr(chunk) {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        total += part.len();
        if total <= max {
            buf.extend_from_slice(part);
        }
        let used = done.unwrap_or(chunk.len());
        r.consume(used);
        if done.is_some() {
            return Ok(if total > max {
                Line::TooLong(total)
            } else {
                Line::Ok
            });
        }
    }
}

fn memchr(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// Runs `f` in batches of transactions; in strict mode the whole file is
/// one transaction that the caller rolls back on error.
struct Batcher<'c> {
    conn: &'c mut Connection,
    in_tx: usize,
    batch: usize,
    strict: bool,
}

impl<'c> Batcher<'c> {
    fn new(conn: &'c mut Connection, batch: usize, strict: bool) -> Result<Batcher<'c>> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(Batcher {
            conn,
            in_tx: 0,
            batch,
            strict,
        })
    }

    fn tick(&mut self) -> Result<()> {
        self.in_tx += 1;
        if !self.strict && self.in_tx >= self.batch {
            self.conn.execute_batch("COMMIT; BEGIN IMMEDIATE")?;
            self.in_tx = 0;
        }
        Ok(())
    }

    fn finish(self, rollback: bool) -> Result<()> {
        self.conn
            .execute_batch(if rollback { "ROLLBACK" } else { "COMMIT" })?;
        Ok(())
    }
}

fn count<'r>(report: &'r mut FileReport, ty: &str) -> &'r mut Counts {
    if !report.types.contains_key(ty) {
        report.types.insert(ty.to_owned(), Counts::default());
    }
    report.types.get_mut(ty).expect("inserted above")
}

fn record_upsert(report: &mut FileReport, ty: &str, u: Upserted) {
    let c = count(report, ty);
    match u {
        Upserted::Created => c.created += 1,
        Upserted::Updated => c.updated += 1,
        Upserted::Unchanged => c.unchanged += 1,
        Upserted::Stale => c.stale += 1,
    }
}

fn record_delete(report: &mut FileReport, ty: &str, d: Deleted) {
    let c = count(report, ty);
    match d {
        Deleted::Deleted => c.deleted += 1,
        Deleted::Absent => c.unchanged += 1,
        Deleted::Stale => c.stale += 1,
    }
}

fn push_error(report: &mut FileReport, limits: &Limits, msg: String) {
    report.skipped += 1;
    if report.errors.len() < limits.import_max_reported_errors {
        report.errors.push(msg);
    }
}

/// The resource type a Bulk Data file name declares (`Observation.ndjson`,
/// `Observation.003.ndjson.gz`), if it looks like a type name.
fn declared_type(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    let stem = name.split('.').next()?;
    crate::scopes::is_type_name(stem).then(|| stem.to_owned())
}

/// What an NDJSON line holds: resources to upsert, or deletion Bundles.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NdjsonKind {
    Resources,
    Deletions,
}

fn import_ndjson(
    conn: &mut Connection,
    tid: i64,
    path: &Path,
    tx_time_ms: Option<i64>,
    opts: &Options,
    limits: &Limits,
) -> Result<FileReport> {
    import_ndjson_kind(
        conn,
        tid,
        path,
        tx_time_ms,
        NdjsonKind::Resources,
        opts,
        limits,
    )
}

fn import_ndjson_kind(
    conn: &mut Connection,
    tid: i64,
    path: &Path,
    tx_time_ms: Option<i64>,
    kind: NdjsonKind,
    opts: &Options,
    limits: &Limits,
) -> Result<FileReport> {
    let name = path.display().to_string();
    let mut report = FileReport {
        file: name.clone(),
        kind: if kind == NdjsonKind::Deletions {
            "ndjson-deleted"
        } else {
            "ndjson"
        }
        .into(),
        ..FileReport::default()
    };
    let declared = declared_type(path);
    let mut reader = BufReader::with_capacity(256 * 1024, open_maybe_gz(path)?);
    let fallback = tx_time_ms.unwrap_or(opts.now_ms);
    let mut batch = Batcher::new(conn, limits.import_batch, opts.strict)?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut line_no = 0u64;
    let mut failed = false;
    loop {
        line_no += 1;
        let line = match read_line_bounded(&mut reader, &mut buf, limits.max_ndjson_line_bytes) {
            Ok(Line::Eof) => break,
            Ok(Line::Ok) => &buf,
            Ok(Line::TooLong(n)) => {
                push_error(
                    &mut report,
                    limits,
                    format!(
                        "{name}:{line_no}: line is {n} bytes, over the limit of {}",
                        limits.max_ndjson_line_bytes
                    ),
                );
                failed = true;
                if opts.strict { break } else { continue }
            }
            Err(e) => {
                let why = if e.kind() == io::ErrorKind::UnexpectedEof {
                    "compressed stream is truncated".to_owned()
                } else {
                    e.to_string()
                };
                push_error(
                    &mut report,
                    limits,
                    format!("{name}:{line_no}: {why}; the rest of the file is unreadable"),
                );
                failed = true;
                break;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let outcome = (|| -> Result<(), StoreError> {
            let text = std::str::from_utf8(line)
                .map_err(|e| ResourceError(format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
            let res: Value = serde_json::from_str(text)
                .map_err(|e| ResourceError(format!("invalid JSON: {e}")))?;
            match kind {
                NdjsonKind::Resources => {
                    let ty = store::identify(&res)?.0.to_owned();
                    if let Some(d) = &declared
                        && *d != ty
                    {
                        return Err(ResourceError(format!(
                            "resourceType {ty} in a file named for {d}"
                        ))
                        .into());
                    }
                    let u = store::upsert(batch.conn, tid, &res, fallback)?;
                    record_upsert(&mut report, &ty, u);
                }
                NdjsonKind::Deletions => {
                    for (ty, id) in deletion_entries(&res)? {
                        let d = store::delete(batch.conn, tid, &ty, &id, fallback)?;
                        record_delete(&mut report, &ty, d);
                    }
                }
            }
            Ok(())
        })();
        match outcome {
            Ok(()) => {}
            Err(StoreError::Db(e)) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "{name}:{line_no}: database failure; import stopped"
                )));
            }
            Err(StoreError::Invalid(e)) => {
                push_error(&mut report, limits, format!("{name}:{line_no}: {e}"));
                failed = true;
                if opts.strict {
                    break;
                }
            }
        }
        batch.tick()?;
        if let Some(p) = opts.progress
            && line_no.is_multiple_of(1000)
        {
            p(1000);
        }
    }
    let rollback = opts.strict && failed;
    batch.finish(rollback)?;
    if rollback {
        report.rolled_back = true;
        report.types.clear();
    }
    Ok(report)
}

/// The (type, id) pairs of a Bulk Data deletion Bundle's DELETE entries.
fn deletion_entries(bundle: &Value) -> Result<Vec<(String, String)>, ResourceError> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(ResourceError::new("a deleted[] line must be a Bundle"));
    }
    let mut out = Vec::new();
    for (i, e) in bundle
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let url = e.pointer("/request/url").and_then(Value::as_str);
        let method = e.pointer("/request/method").and_then(Value::as_str);
        match (method, url.and_then(split_type_id)) {
            (Some("DELETE"), Some((t, id))) => out.push((t, id)),
            _ => {
                return Err(ResourceError(format!(
                    "entry[{i}] is not a DELETE of Type/id"
                )));
            }
        }
    }
    Ok(out)
}

/// Splits `Type/id` (ignoring a leading base URL).
pub fn split_type_id(url: &str) -> Option<(String, String)> {
    let mut parts = url.trim_end_matches('/').rsplit('/');
    let id = parts.next()?;
    let ty = parts.next()?;
    (crate::scopes::is_type_name(ty) && super::is_valid_id(id))
        .then(|| (ty.to_owned(), id.to_owned()))
}

fn import_manifest(
    conn: &mut Connection,
    tid: i64,
    path: &Path,
    doc: &Value,
    opts: &Options,
    limits: &Limits,
) -> Result<Vec<FileReport>> {
    let name = path.display().to_string();
    let tx_time = doc
        .get("transactionTime")
        .and_then(Value::as_str)
        .context(format!("{name}: transactionTime is not a string"))?;
    let tx_ms = date::parse(tx_time)
        .map_err(|e| anyhow::anyhow!("{name}: transactionTime: {e}"))?
        .low;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut reports = Vec::new();
    for (field, kind) in [
        ("output", NdjsonKind::Resources),
        ("deleted", NdjsonKind::Deletions),
    ] {
        let items = doc
            .get(field)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (i, item) in items.iter().enumerate() {
            let url = item
                .get("url")
                .and_then(Value::as_str)
                .with_context(|| format!("{name}: {field}[{i}].url is missing"))?;
            let local = if let Some(p) = url.strip_prefix("file://") {
                PathBuf::from(p)
            } else if url.starts_with("http://") || url.starts_with("https://") {
                bail!(
                    "{name}: {field}[{i}].url {url} is remote; import takes local files (download them next to the manifest)"
                );
            } else {
                base.join(url)
            };
            reports.push(import_ndjson_kind(
                conn,
                tid,
                &local,
                Some(tx_ms),
                kind,
                opts,
                limits,
            )?);
        }
    }
    Ok(reports)
}

fn import_bundle(
    conn: &mut Connection,
    tid: i64,
    name: &str,
    mut doc: Value,
    opts: &Options,
) -> Result<FileReport> {
    let btype = doc
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let mut report = FileReport {
        file: name.to_owned(),
        kind: format!("bundle/{btype}"),
        ..FileReport::default()
    };
    if !matches!(
        btype.as_str(),
        "transaction" | "batch" | "collection" | "searchset"
    ) {
        bail!(
            "{name}: Bundle.type {btype:?} is not importable (transaction, batch, collection, searchset)"
        );
    }
    let mut entries = match doc.get_mut("entry").map(Value::take) {
        Some(Value::Array(e)) => e,
        None | Some(Value::Null) => Vec::new(),
        Some(_) => bail!("{name}: Bundle.entry is not an array"),
    };
    let uuid_map = rewrite_map(&entries);
    for e in &mut entries {
        if let Some(r) = e.get_mut("resource") {
            rewrite_references(r, &uuid_map);
        }
    }
    let batch = Batcher::new(conn, usize::MAX, true)?;
    let mut failed = false;
    for (i, e) in entries.into_iter().enumerate() {
        let method = e
            .pointer("/request/method")
            .and_then(Value::as_str)
            .unwrap_or("PUT")
            .to_owned();
        let req_url = e
            .pointer("/request/url")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let full_url = e.get("fullUrl").and_then(Value::as_str).map(str::to_owned);
        let outcome = (|| -> Result<(), StoreError> {
            if method == "DELETE" {
                let (ty, id) = req_url
                    .as_deref()
                    .and_then(split_type_id)
                    .ok_or(ResourceError::new("DELETE needs request.url Type/id"))?;
                let d = store::delete(batch.conn, tid, &ty, &id, opts.now_ms)?;
                record_delete(&mut report, &ty, d);
                return Ok(());
            }
            let mut res = e
                .get("resource")
                .cloned()
                .ok_or(ResourceError::new("entry has no resource"))?;
            assign_id(&mut res, full_url.as_deref(), req_url.as_deref())?;
            let ty = store::identify(&res)?.0.to_owned();
            let u = store::upsert(batch.conn, tid, &res, opts.now_ms)?;
            record_upsert(&mut report, &ty, u);
            Ok(())
        })();
        match outcome {
            Ok(()) => {}
            Err(StoreError::Db(e)) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "{name}: entry[{i}]: database failure; import stopped"
                )));
            }
            Err(StoreError::Invalid(err)) => {
                push_error(
                    &mut report,
                    &Limits::default(),
                    format!("{name}: entry[{i}]: {err}"),
                );
                failed = true;
            }
        }
    }
    // A transaction is all or nothing (FHIR R4 §3.1.0.11.2); so is --strict.
    let rollback = failed && (btype == "transaction" || opts.strict);
    batch.finish(rollback)?;
    if rollback {
        report.rolled_back = true;
        report.types.clear();
    }
    Ok(report)
}

/// `urn:uuid:…` fullUrls → `Type/id` (the resource's id, else the uuid).
fn rewrite_map(entries: &[Value]) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for e in entries {
        let Some(full) = e.get("fullUrl").and_then(Value::as_str) else {
            continue;
        };
        let Some(uuid) = full.strip_prefix("urn:uuid:") else {
            continue;
        };
        let Some(ty) = e.pointer("/resource/resourceType").and_then(Value::as_str) else {
            continue;
        };
        let id = e
            .pointer("/resource/id")
            .and_then(Value::as_str)
            .unwrap_or(uuid);
        map.insert(full.to_owned(), format!("{ty}/{id}"));
    }
    map
}

fn rewrite_references(v: &mut Value, map: &BTreeMap<String, String>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o.iter_mut() {
                if k == "reference"
                    && let Value::String(s) = child
                    && let Some(to) = map.get(s.as_str())
                {
                    *s = to.clone();
                } else {
                    rewrite_references(child, map);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| rewrite_references(c, map)),
        _ => {}
    }
}

/// Gives a Bundle entry's resource an id: its own, else from a `PUT
/// Type/id` request, else from its `urn:uuid` fullUrl.
fn assign_id(
    res: &mut Value,
    full_url: Option<&str>,
    req_url: Option<&str>,
) -> Result<(), ResourceError> {
    if res.get("id").is_some() {
        return Ok(());
    }
    let id = req_url
        .and_then(split_type_id)
        .map(|(_, id)| id)
        .or_else(|| {
            full_url
                .and_then(|u| u.strip_prefix("urn:uuid:"))
                .map(str::to_owned)
        })
        .ok_or(ResourceError::new(
            "resource has no id, and neither request.url nor a urn:uuid fullUrl gives one",
        ))?;
    if let Some(o) = res.as_object_mut() {
        o.insert("id".into(), Value::String(id));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_lines_skip_long_ones_without_holding_them() {
        let data = b"short\nxxxxxxxxxxxxxxxxxxxx\nok\nlast-no-newline";
        let mut r = io::BufReader::with_capacity(4, &data[..]);
        let mut buf = Vec::new();
        let mut seen = Vec::new();
        loop {
            match read_line_bounded(&mut r, &mut buf, 10).unwrap() {
                Line::Eof => break,
                Line::Ok => seen.push(String::from_utf8(buf.clone()).unwrap()),
                Line::TooLong(n) => {
                    assert!(buf.len() <= 10);
                    seen.push(format!("<{n}>"));
                }
            }
        }
        assert_eq!(seen, ["short", "<20>", "ok", "<15>"]);
    }

    #[test]
    fn declared_types_and_type_id_urls() {
        assert_eq!(
            declared_type(Path::new("/x/Observation.ndjson")).as_deref(),
            Some("Observation")
        );
        assert_eq!(
            declared_type(Path::new("Observation.002.ndjson.gz")).as_deref(),
            Some("Observation")
        );
        assert_eq!(declared_type(Path::new("export.ndjson")), None);
        assert_eq!(
            split_type_id("https://x/fhir/Patient/1"),
            Some(("Patient".into(), "1".into()))
        );
        assert_eq!(split_type_id("Patient"), None);
    }
}
