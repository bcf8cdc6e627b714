//! A real HTTPS FHIR upstream on 127.0.0.1 for the sync tests: certificates
//! generated with rcgen (a CA, a server certificate for `localhost`, and
//! broken ones: expired, wrong host name, self-signed), rustls on plain
//! threads, and a small HTTP/1.1 handler that stores what it receives.
//!
//! It answers `POST /fhir/` batch Bundles (`PUT AuditEvent/{id}` entries,
//! stored by id, so a resend replaces and never duplicates) and
//! `GET /fhir/{Type}?…` searches over resources it was given, paged with
//! `link[next]`. Faults are queued and each is used by one request.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::{Value, json};

/// What the next request gets instead of a normal answer.
#[derive(Debug, Clone)]
pub enum Fault {
    /// No fault: answer normally (to aim a later fault at a later request).
    Pass,
    /// HTTP 500, nothing stored.
    Status500,
    /// The batch is processed, but entry `n` fails with 500.
    EntryFails(usize),
    /// The request is read, then nothing is answered for `Duration`.
    Hang(Duration),
    /// The connection is reset (TCP RST) right after the request is read.
    Reset,
    /// The batch is stored, then the connection is dropped: committed, but
    /// the response is lost.
    CommitThenDrop,
}

/// Which certificate the server presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// Issued by the test CA for localhost and 127.0.0.1.
    Good,
    /// Issued by the test CA, but expired.
    Expired,
    /// Issued by the test CA for another host name.
    WrongHost,
    /// Self-signed, not issued by the test CA.
    Untrusted,
}

/// Everything the server saw.
#[derive(Default)]
pub struct Seen {
    /// AuditEvents by id (the last PUT of each).
    pub audit_events: BTreeMap<String, Value>,
    /// How many PUTs each id got (resends show here, not as duplicates).
    pub puts: BTreeMap<String, u32>,
    /// Batches answered.
    pub batches: u32,
    /// Checkpoints that came with batches (decoded JSON).
    pub checkpoints: Vec<Value>,
    /// Authorization headers seen.
    pub auth: Vec<String>,
    /// GET paths seen.
    pub gets: Vec<String>,
}

/// Resources served to searches, by type.
type Resources = Mutex<BTreeMap<String, Vec<Value>>>;
/// Static files by path.
type Files = Mutex<BTreeMap<String, Vec<u8>>>;

/// The running server.
pub struct Upstream {
    /// `https://localhost:{port}/fhir`.
    pub url: String,
    /// PEM of the test CA, for `upstream.ca_file`.
    pub ca_pem: PathBuf,
    /// PEM of the server certificate, for `upstream.pinned_cert`.
    pub cert_pem: PathBuf,
    /// What it saw.
    pub seen: Arc<Mutex<Seen>>,
    /// Faults to apply, one per request.
    pub faults: Arc<Mutex<VecDeque<Fault>>>,
    /// Resources served to searches, by type.
    pub resources: Arc<Mutex<BTreeMap<String, Vec<Value>>>>,
    /// Static files served to GETs by exact path (the update channel).
    pub files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    /// Page size of searches.
    pub page_size: usize,
    stop: Arc<AtomicBool>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.url_addr());
    }
}

impl Upstream {
    fn url_addr(&self) -> String {
        let port = self
            .url
            .rsplit(':')
            .next()
            .unwrap_or("")
            .trim_end_matches("/fhir");
        format!("127.0.0.1:{port}")
    }

    /// Starts a server with `cert`, writing its PEM files into `dir`.
    pub fn start(dir: &Path, cert: CertKind) -> Upstream {
        Self::start_with(dir, cert, false)
    }

    /// As `start`; with `require_client_cert`, only clients presenting a
    /// certificate issued by the test CA get through (mTLS).
    pub fn start_with(dir: &Path, cert: CertKind, require_client_cert: bool) -> Upstream {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "clinicbox test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let names = match cert {
            CertKind::WrongHost => vec!["upstream.other.example".to_string()],
            _ => vec!["localhost".to_string()],
        };
        let mut params = CertificateParams::new(names).unwrap();
        if cert != CertKind::WrongHost {
            params
                .subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        if cert == CertKind::Expired {
            params.not_before = time::macros::datetime!(2020-01-01 00:00 UTC);
            params.not_after = time::macros::datetime!(2021-01-01 00:00 UTC);
        }
        let key = KeyPair::generate().unwrap();
        let server_cert = if cert == CertKind::Untrusted {
            params.self_signed(&key).unwrap()
        } else {
            params.signed_by(&key, &issuer).unwrap()
        };
        let ca_pem = dir.join("upstream-ca.pem");
        let cert_pem = dir.join("upstream-cert.pem");
        std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
        std::fs::write(&cert_pem, server_cert.pem()).unwrap();
        // A client certificate for mTLS tests, issued by the same CA.
        let ckey = KeyPair::generate().unwrap();
        let cparams = CertificateParams::new(vec!["clinicbox-box".to_string()]).unwrap();
        let ccert = cparams.signed_by(&ckey, &issuer).unwrap();
        std::fs::write(dir.join("client-cert.pem"), ccert.pem()).unwrap();
        std::fs::write(dir.join("client-key.pem"), ckey.serialize_pem()).unwrap();

        let certs = vec![server_cert.der().clone()];
        let pkey = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let builder = rustls::ServerConfig::builder();
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca_cert.der().clone()).unwrap();
            let v = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .unwrap();
            builder.with_client_cert_verifier(v)
        } else {
            builder.with_no_client_auth()
        };
        let config = Arc::new(builder.with_single_cert(certs, pkey).unwrap());

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Upstream {
            url: format!("https://localhost:{port}/fhir"),
            ca_pem,
            cert_pem,
            seen: Arc::default(),
            faults: Arc::default(),
            resources: Arc::default(),
            files: Arc::default(),
            page_size: 2,
            stop: Arc::default(),
        };
        let (seen, faults, resources, files, stop) = (
            up.seen.clone(),
            up.faults.clone(),
            up.resources.clone(),
            up.files.clone(),
            up.stop.clone(),
        );
        let page = up.page_size;
        let base = up.url.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(tcp) = conn else { continue };
                let (config, seen, faults, resources, files, base) = (
                    config.clone(),
                    seen.clone(),
                    faults.clone(),
                    resources.clone(),
                    files.clone(),
                    base.clone(),
                );
                std::thread::spawn(move || {
                    let _ = serve(
                        tcp,
                        config,
                        &seen,
                        &faults,
                        (&resources, &files),
                        &base,
                        page,
                    );
                });
            }
        });
        up
    }

    /// Queues faults for the next requests.
    pub fn inject(&self, faults: &[Fault]) {
        self.faults.lock().unwrap().extend(faults.iter().cloned());
    }

    /// Ids of the AuditEvents it holds.
    pub fn ids(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .audit_events
            .keys()
            .cloned()
            .collect()
    }
}

fn serve(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    seen: &Mutex<Seen>,
    faults: &Mutex<VecDeque<Fault>>,
    (resources, files): (&Resources, &Files),
    base: &str,
    page: usize,
) -> std::io::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut reader = BufReader::new(&mut tls);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    let mut len = 0usize;
    let mut auth = None;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((h, ""));
        match k.to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().unwrap_or(0),
            "authorization" => auth = Some(v.trim().to_owned()),
            _ => {}
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    drop(reader);
    if let Some(a) = auth {
        seen.lock().unwrap().auth.push(a);
    }
    let file = files.lock().unwrap().get(&path).cloned();
    if let (Some(bytes), "GET") = (file, method.as_str()) {
        seen.lock().unwrap().gets.push(path.clone());
        write!(
            tls,
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            bytes.len()
        )?;
        tls.write_all(&bytes)?;
        tls.flush()?;
        tls.conn.send_close_notify();
        let _ = tls.flush();
        return Ok(());
    }
    let fault = faults.lock().unwrap().pop_front();
    let (status, answer) = match (&fault, method.as_str()) {
        (Some(Fault::Status500), _) => (500, json!({"resourceType": "OperationOutcome"})),
        (Some(Fault::Hang(d)), _) => {
            std::thread::sleep(*d);
            return Ok(());
        }
        (Some(Fault::Reset), _) => {
            // SO_LINGER 0: closing sends a TCP RST, not a FIN.
            socket2::SockRef::from(&tls.sock).set_linger(Some(Duration::ZERO))?;
            return Ok(());
        }
        (_, "POST") => {
            let fail_at = match fault {
                Some(Fault::EntryFails(n)) => Some(n),
                _ => None,
            };
            let answer = batch(&body, fail_at, seen);
            if matches!(fault, Some(Fault::CommitThenDrop)) {
                return Ok(());
            }
            (200, answer)
        }
        (_, "GET") => {
            seen.lock().unwrap().gets.push(path.clone());
            search(&path, resources, base, page)
        }
        _ => (405, json!({})),
    };
    let text = answer.to_string();
    let reason = if status == 200 { "OK" } else { "Error" };
    write!(
        tls,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    tls.flush()?;
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(())
}

fn batch(body: &[u8], fail_at: Option<usize>, seen: &Mutex<Seen>) -> Value {
    let mut b: Value = serde_json::from_slice(body).unwrap_or_default();
    let checkpoint = b
        .pointer("/signature/0/data")
        .and_then(Value::as_str)
        .and_then(|data| {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .ok()?;
            serde_json::from_slice::<Value>(&bytes).ok()
        });
    let entries = match b["entry"].take() {
        Value::Array(a) => a,
        _ => Vec::new(),
    };
    let mut s = seen.lock().unwrap();
    s.batches += 1;
    s.checkpoints.extend(checkpoint);
    let mut out = Vec::with_capacity(entries.len());
    for (i, mut e) in entries.into_iter().enumerate() {
        let url = e
            .pointer("/request/url")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let ok = e.pointer("/request/method") == Some(&json!("PUT"))
            && url.starts_with("AuditEvent/")
            && fail_at != Some(i);
        if ok {
            let id = url.trim_start_matches("AuditEvent/").to_owned();
            let existed = s
                .audit_events
                .insert(id.clone(), e["resource"].take())
                .is_some();
            *s.puts.entry(id).or_default() += 1;
            out.push(
                json!({"response": {"status": if existed { "200 OK" } else { "201 Created" }}}),
            );
        } else {
            out.push(json!({"response": {"status": "500 Internal Server Error",
                "outcome": {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}}}));
        }
    }
    json!({"resourceType": "Bundle", "type": "batch-response", "entry": out})
}

/// `GET /fhir/{Type}?_lastUpdated=gt…&_offset=…`: resources newer than the
/// bound, oldest first, `page` at a time.
fn search(
    path: &str,
    resources: &Mutex<BTreeMap<String, Vec<Value>>>,
    base: &str,
    page: usize,
) -> (u16, Value) {
    let path = path.trim_start_matches("/fhir/");
    let (ty, query) = path.split_once('?').unwrap_or((path, ""));
    let mut gt = None;
    let mut offset = 0usize;
    for kv in query.split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned();
        match k {
            "_lastUpdated" => gt = v.strip_prefix("gt").map(str::to_owned),
            "_offset" => offset = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    let mut all: Vec<Value> = resources
        .lock()
        .unwrap()
        .get(ty)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| {
            let t = r
                .pointer("/meta/lastUpdated")
                .and_then(Value::as_str)
                .unwrap_or("");
            gt.as_deref().is_none_or(|g| t > g)
        })
        .collect();
    all.sort_by(|a, b| {
        a["meta"]["lastUpdated"]
            .as_str()
            .cmp(&b["meta"]["lastUpdated"].as_str())
    });
    let entries: Vec<Value> = all
        .iter()
        .skip(offset)
        .take(page)
        .map(|r| json!({"fullUrl": format!("{base}/{ty}/{}", r["id"].as_str().unwrap_or("")), "resource": r, "search": {"mode": "match"}}))
        .collect();
    let mut links = vec![json!({"relation": "self", "url": format!("{base}/{path}")})];
    if offset + page < all.len() {
        let mut next = format!(
            "{base}/{ty}?_sort=_lastUpdated&_count={page}&_offset={}",
            offset + page
        );
        if let Some(g) = &gt {
            next += &format!(
                "&_lastUpdated=gt{}",
                percent_encoding::utf8_percent_encode(g, percent_encoding::NON_ALPHANUMERIC)
            );
        }
        links.push(json!({"relation": "next", "url": next}));
    }
    (
        200,
        json!({"resourceType": "Bundle", "type": "searchset", "total": all.len(), "link": links, "entry": entries}),
    )
}
