//! The upstream HTTP client: ureq on rustls, with the trust anchors, client
//! authentication and timeouts of `[upstream]`.
//!
//! Invariants:
//! - TLS always verifies the chain, the expiry and the host name; there is
//!   no switch to turn that off. Plain HTTP is used only for an `http://`
//!   URL that the config explicitly allows (a lab);
//! - no redirects are followed (a redirect could leave the trusted host);
//! - every response body is read with a cap (`Limits`).

use std::sync::Arc;

use serde_json::Value;
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

use crate::config::Upstream;
use crate::fsutil;
use crate::limits::Limits;

/// Why an exchange with upstream failed. Every variant is retried later;
/// none advances a cursor.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SyncError {
    /// The server's certificate was refused.
    #[error("upstream {url}: TLS: {reason}")]
    Tls {
        /// The URL.
        url: String,
        /// Untrusted issuer, wrong host name, expired, …
        reason: String,
    },
    /// No connection (refused, reset, DNS).
    #[error("upstream {url}: {reason}")]
    Transport {
        /// The URL.
        url: String,
        /// What happened.
        reason: String,
    },
    /// A connect, send or receive timeout.
    #[error("upstream {url}: timed out ({what})")]
    Timeout {
        /// The URL.
        url: String,
        /// Which timeout.
        what: String,
    },
    /// A non-2xx answer.
    #[error("upstream {url}: HTTP {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// Status code.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// A 2xx answer that is not what the protocol expects.
    #[error("upstream {url}: {reason}")]
    Protocol {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Our side: unreadable config files and the like.
    #[error("upstream: {0}")]
    Local(String),
    /// A download was larger than its cap.
    #[error("{url}: more than {cap} bytes")]
    TooLarge {
        /// The URL.
        url: String,
        /// The cap.
        cap: u64,
    },
}

/// A configured upstream.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    bearer: Option<String>,
    max_body: u64,
}

impl Client {
    /// Builds the client: reads the CA, pinned certificate, token and
    /// client certificate files named in the config.
    pub fn new(u: &Upstream, limits: &Limits) -> Result<Client, SyncError> {
        let local = |field: &str, e: String| SyncError::Local(format!("upstream.{field}: {e}"));
        let read = |field: &str, p: &std::path::Path| {
            fsutil::read_bounded(p, 1024 * 1024)
                .map_err(|e| local(field, format!("{}: {e}", p.display())))
        };
        let certs_of =
            |field: &str, p: &std::path::Path| -> Result<Vec<Certificate<'static>>, SyncError> {
                let pem = read(field, p)?;
                let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                    .filter_map(|i| match i {
                        Ok(PemItem::Certificate(c)) => Some(c.to_owned()),
                        _ => None,
                    })
                    .collect();
                if certs.is_empty() {
                    return Err(local(
                        field,
                        format!("{}: no PEM certificate in it", p.display()),
                    ));
                }
                Ok(certs)
            };
        let roots = if let Some(p) = &u.ca_file {
            RootCerts::Specific(Arc::new(certs_of("ca_file", p)?))
        } else if let Some(p) = &u.pinned_cert {
            // The pinned certificate is the only trust anchor: the server
            // must present exactly it (or a chain ending in it).
            RootCerts::Specific(Arc::new(certs_of("pinned_cert", p)?))
        } else {
            RootCerts::WebPki
        };
        let mut tls = TlsConfig::builder().root_certs(roots);
        if let Some((cert, key)) = &u.client_cert {
            let chain = certs_of("client_cert", cert)?;
            let key_pem = read("client_key", key)?;
            let key = PrivateKey::from_pem(&key_pem)
                .map_err(|e| local("client_key", format!("{}: {e}", key.display())))?
                .to_owned();
            tls = tls.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
        }
        let bearer = match &u.token_file {
            None => None,
            Some(p) => {
                let t = String::from_utf8(read("token_file", p)?)
                    .map_err(|_| local("token_file", format!("{}: not UTF-8", p.display())))?;
                let t = t.trim().to_owned();
                if t.is_empty() || t.contains(char::is_whitespace) {
                    return Err(local(
                        "token_file",
                        format!("{}: must hold one token without spaces", p.display()),
                    ));
                }
                Some(format!("Bearer {t}"))
            }
        };
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .https_only(!u.plain_http)
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(u.connect_timeout))
            .timeout_send_request(Some(u.io_timeout))
            .timeout_send_body(Some(u.io_timeout))
            .timeout_recv_response(Some(u.io_timeout))
            .timeout_recv_body(Some(u.io_timeout))
            .user_agent(concat!("clinicbox/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Client {
            agent,
            base: u.url.clone(),
            bearer,
            max_body: limits.max_upstream_response_bytes,
        })
    }

    /// The FHIR base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// POSTs serialised JSON (a batch Bundle) to the base URL and returns
    /// the JSON answer of a 2xx.
    pub fn post_json(&self, body: &[u8]) -> Result<Value, SyncError> {
        let url = format!("{}/", self.base);
        let mut req = self
            .agent
            .post(&url)
            .header("Content-Type", "application/fhir+json")
            .header("Accept", "application/fhir+json");
        if let Some(b) = &self.bearer {
            req = req.header("Authorization", b);
        }
        let resp = req.send(body).map_err(|e| classify(&url, e))?;
        self.json_of(&url, resp)
    }

    /// GETs `url` (absolute, or relative to the base) and returns the JSON
    /// answer of a 2xx. An absolute URL must be on the base URL.
    pub fn get(&self, url: &str) -> Result<Value, SyncError> {
        let url = self.absolute(url)?;
        let mut req = self
            .agent
            .get(&url)
            .header("Accept", "application/fhir+json");
        if let Some(b) = &self.bearer {
            req = req.header("Authorization", b);
        }
        let resp = req.call().map_err(|e| classify(&url, e))?;
        self.json_of(&url, resp)
    }

    /// GETs `url` (absolute on the base, or relative to it) and returns
    /// the body of a 2xx, at most `cap` bytes ([`SyncError::TooLarge`]
    /// beyond, without reading more than one byte past it).
    pub fn get_bytes(&self, url: &str, cap: u64) -> Result<Vec<u8>, SyncError> {
        let url = self.absolute(url)?;
        let mut req = self.agent.get(&url);
        if let Some(b) = &self.bearer {
            req = req.header("Authorization", b);
        }
        let mut resp = req.call().map_err(|e| classify(&url, e))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(SyncError::Status {
                url,
                status,
                body: String::new(),
            });
        }
        let bytes = match resp.body_mut().with_config().limit(cap + 1).read_to_vec() {
            Ok(b) => b,
            Err(ureq::Error::BodyExceedsLimit(_)) => return Err(SyncError::TooLarge { url, cap }),
            Err(e) => return Err(classify(&url, e)),
        };
        if bytes.len() as u64 > cap {
            return Err(SyncError::TooLarge { url, cap });
        }
        Ok(bytes)
    }

    fn absolute(&self, url: &str) -> Result<String, SyncError> {
        if url.starts_with("http://") || url.starts_with("https://") {
            if !url.starts_with(&format!("{}/", self.base)) && url != self.base {
                return Err(SyncError::Protocol {
                    url: url.to_owned(),
                    reason: format!("a link leaves the upstream base {}", self.base),
                });
            }
            Ok(url.to_owned())
        } else {
            Ok(format!("{}/{}", self.base, url.trim_start_matches('/')))
        }
    }

    fn json_of(
        &self,
        url: &str,
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> Result<Value, SyncError> {
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(self.max_body)
            .read_to_vec()
            .map_err(|e| classify(url, e))?;
        if !(200..300).contains(&status) {
            return Err(SyncError::Status {
                url: url.to_owned(),
                status,
                body: String::from_utf8_lossy(&bytes).chars().take(300).collect(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| SyncError::Protocol {
            url: url.to_owned(),
            reason: format!("the answer is not JSON: {e}"),
        })
    }
}

/// Turns a ureq error into a specific [`SyncError`], naming certificate
/// problems plainly.
fn classify(url: &str, e: ureq::Error) -> SyncError {
    let url = url.to_owned();
    let tls = |reason: String| SyncError::Tls {
        url: url.clone(),
        reason,
    };
    match e {
        ureq::Error::Rustls(r) => tls(describe_rustls(&r)),
        ureq::Error::Timeout(t) => SyncError::Timeout {
            url,
            what: format!("{t:?}"),
        },
        ureq::Error::Io(io) => {
            // rustls reports handshake failures through io::Error.
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return tls(describe_rustls(r));
            }
            if io.kind() == std::io::ErrorKind::TimedOut
                || io.kind() == std::io::ErrorKind::WouldBlock
            {
                return SyncError::Timeout {
                    url,
                    what: io.to_string(),
                };
            }
            SyncError::Transport {
                url,
                reason: format!("connection failed: {io}"),
            }
        }
        ureq::Error::RequireHttpsOnly(_) => SyncError::Local(format!(
            "{url}: refusing plain http (set upstream.allow_plain_http for a lab)"
        )),
        ureq::Error::BodyExceedsLimit(n) => SyncError::Protocol {
            url,
            reason: format!("the answer is over the limit of {n} bytes"),
        },
        other => SyncError::Transport {
            url,
            reason: other.to_string(),
        },
    }
}

fn describe_rustls(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => {
                "the server certificate is not issued by a trusted CA (untrusted certificate)"
                    .into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the server certificate is not valid for this host name (hostname mismatch)".into()
            }
            C::Expired | C::ExpiredContext { .. } => "the server certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the server certificate is not valid yet".into()
            }
            C::Revoked => "the server certificate is revoked".into(),
            C::BadSignature => "the server certificate has a bad signature".into(),
            other => format!("the server certificate is refused: {other:?}"),
        },
        other => format!("handshake failed: {other}"),
    }
}
