//! The local API's HTTP/1.1 plumbing: hyper on smol, with every request
//! bound from [`Limits`] applied before a handler sees the request.
//!
//! - connections: at most `max_connections`; one more gets a bare 503 and
//!   is closed;
//! - request head: at most `max_request_head_bytes` (hyper answers 431) and
//!   `request_head_timeout_ms` to arrive (a slowloris client is dropped);
//!   a malformed head gets hyper's 400;
//! - body: a declared length over `max_request_body_bytes` gets 413 before
//!   any of it is read; a streamed one is cut off at the bound (413); it
//!   must arrive within `request_body_timeout_ms` (else 408);
//! - work: at most `max_inflight_requests` at once; more get 503 with
//!   `Retry-After`, so a burst never queues without bound.
//!
//! Handlers ([`super::api::handle`]) are synchronous (SQLite, wasmtime) and
//! run on the daemon's worker threads ([`super::workers`]), never on the
//! executor's one thread ("api"), which they would stall.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use smol::Async;
use smol::io::AsyncWriteExt;
use smol_hyper::rt::{FuturesIo, SmolTimer};

use super::App;
use super::api::{self, Reply};

/// Loads `[api] tls_cert` and `tls_key` into a TLS acceptor.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<futures_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("api.tls_cert: {}: {e}", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "api.tls_cert: {}: no PEM certificate in it",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("api.tls_key: {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("api TLS: protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("api.tls_key does not match api.tls_cert")?;
    Ok(futures_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections until `stop` fires, serving each on `ex` (over
/// TLS when `tls` is given).
pub async fn serve(
    app: Arc<App>,
    listener: Async<TcpListener>,
    tls: Option<futures_rustls::TlsAcceptor>,
    ex: Arc<smol::Executor<'static>>,
    stop: smol::channel::Receiver<()>,
) {
    loop {
        let accepted = smol::future::or(async { Some(listener.accept().await) }, async {
            let _ = stop.recv().await;
            None
        })
        .await;
        let Some(accepted) = accepted else { break };
        let (mut stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep going.
                log::warn!("api: accept failed: {e}");
                smol::Timer::after(Duration::from_millis(50)).await;
                continue;
            }
        };
        let limits = app.rt.env().limits.clone();
        let open = app.metrics.connections.fetch_add(1, Ordering::Relaxed) + 1;
        if open as usize > limits.max_connections {
            app.metrics.connections.fetch_sub(1, Ordering::Relaxed);
            app.metrics.request("overload", 503, Duration::ZERO);
            ex.spawn(async move {
                let _ = stream
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            })
            .detach();
            continue;
        }
        let app = app.clone();
        let tls = tls.clone();
        ex.spawn(async move {
            let guard = ConnGuard(app.clone());
            match tls {
                None => serve_conn(app, peer, stream, &limits).await,
                Some(acceptor) => {
                    // The handshake gets the head's time limit (slowloris).
                    let hs = async { Some(acceptor.accept(stream).await) };
                    let late = async {
                        smol::Timer::after(Duration::from_millis(limits.request_head_timeout_ms))
                            .await;
                        None
                    };
                    match smol::future::or(hs, late).await {
                        Some(Ok(s)) => serve_conn(app, peer, s, &limits).await,
                        Some(Err(e)) => log::debug!("api: TLS handshake with {peer}: {e}"),
                        None => log::debug!("api: TLS handshake with {peer} timed out"),
                    }
                }
            }
            drop(guard);
        })
        .detach();
    }
}

async fn serve_conn<S>(app: Arc<App>, peer: SocketAddr, io: S, limits: &crate::limits::Limits)
where
    S: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(respond(app, peer, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(SmolTimer::new())
        .header_read_timeout(Duration::from_millis(limits.request_head_timeout_ms))
        .max_buf_size(limits.max_request_head_bytes.max(8192))
        .serve_connection(FuturesIo::new(io), svc);
    if let Err(e) = conn.await {
        log::debug!("api: connection from {peer}: {e}");
    }
}

struct ConnGuard(Arc<App>);
impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.metrics.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

struct InflightGuard(Arc<App>);
impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.metrics.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn respond(app: Arc<App>, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let (route, reply) = serve_one(&app, peer, req).await;
    app.metrics.request(route, reply.status, started.elapsed());
    log::debug!(
        "api: {peer} {route} {} in {} µs",
        reply.status,
        started.elapsed().as_micros()
    );
    let draining = app.draining.load(Ordering::Relaxed);
    to_response(reply, draining)
}

async fn serve_one(
    app: &Arc<App>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> (&'static str, Reply) {
    let limits = &app.rt.env().limits;
    let n = app.metrics.inflight.fetch_add(1, Ordering::Relaxed) + 1;
    let _inflight = InflightGuard(app.clone());
    let (parts, body) = req.into_parts();
    // Liveness and readiness answer even when busy or draining.
    if let Some(r) = api::probe(app, &parts) {
        return r;
    }
    if app.draining.load(Ordering::Relaxed) {
        return (
            "draining",
            Reply::error(503, "transient", "clinicbox is shutting down").retry_after(1),
        );
    }
    if n as usize > limits.max_inflight_requests {
        return (
            "overload",
            Reply::error(503, "throttled", "too many requests in flight; retry").retry_after(1),
        );
    }
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits.max_request_body_bytes as u64) {
        return ("body", too_large(limits));
    }
    let read = Limited::new(body, limits.max_request_body_bytes).collect();
    let timeout = async {
        smol::Timer::after(Duration::from_millis(limits.request_body_timeout_ms)).await;
        Err(None)
    };
    let body = match smol::future::or(async { read.await.map_err(Some) }, timeout).await {
        Ok(b) => b.to_bytes(),
        Err(None) => {
            return (
                "body",
                Reply::error(
                    408,
                    "timeout",
                    &format!(
                        "the request body did not arrive within {} ms",
                        limits.request_body_timeout_ms
                    ),
                ),
            );
        }
        Err(Some(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return ("body", too_large(limits));
            }
            return (
                "body",
                Reply::error(
                    400,
                    "structure",
                    &format!("cannot read the request body: {e}"),
                ),
            );
        }
    };
    let worker_app = app.clone();
    let queued = Instant::now();
    app.workers
        .run(move || {
            let waited = queued.elapsed();
            let (route, reply) = api::handle(&worker_app, peer, &parts, &body);
            if route == "ingest" {
                worker_app
                    .metrics
                    .ingest_stage(super::metrics::IngestStage::Queue, waited);
            }
            (route, reply)
        })
        .await
        .unwrap_or_else(|| {
            (
                "workers",
                Reply::error(503, "transient", "clinicbox is shutting down"),
            )
        })
}

fn too_large(limits: &crate::limits::Limits) -> Reply {
    Reply::error(
        413,
        "too-costly",
        &format!(
            "the request body is over {} bytes",
            limits.max_request_body_bytes
        ),
    )
}

fn to_response(reply: Reply, close: bool) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(reply.status)
        .header("Content-Type", reply.content_type)
        .header("Cache-Control", "no-store");
    for (k, v) in &reply.headers {
        b = b.header(*k, v.as_str());
    }
    if close {
        b = b.header("Connection", "close");
    }
    b.body(Full::new(Bytes::from(reply.body)))
        .unwrap_or_else(|e| {
            log::error!("api: cannot build a response: {e}");
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
}
