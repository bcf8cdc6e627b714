//! `clinicbox run`: the long-running appliance.
//!
//! Start-up, in order: complete the data dir (`init` is idempotent), bind
//! the API address, load every installed plugin, then tell systemd
//! `READY=1` and serve. While running:
//! - the local API ([`http`], [`api`], [`ingest`]): HTTP on one smol
//!   executor thread (`api`), handlers on a fixed set of worker threads
//!   (`workers`); `api` and the two writers every ingest passes through
//!   (`fhir-writer`, `audit-writer`) run `daemon.pipeline_priority_boost`
//!   nice levels ahead of the other threads ([`crate::priority`]);
//! - the inbox ([`inbox`]) scanned every `daemon.inbox_poll_ms`;
//! - audit upload and FHIR sync-down ([`crate::sync::pass`]) every
//!   `upstream.interval_secs`, with jittered backoff after a failure;
//! - the vendor update channel ([`crate::update`]) every
//!   `updates.interval_secs`;
//! - the data disk ([`disk`]) read every minute, with a warning in the
//!   log while it is low;
//! - `WATCHDOG=1` from the main loop at half the watchdog interval.
//!
//! Signals: SIGHUP reloads the config file (upstream, updates, inbox
//! period, drain time, disk warning threshold; the settings read at start
//! only wait for a restart, and a reload names each one it leaves waiting,
//! docs/configuration.md "Reloading"). SIGTERM or SIGINT drains: `/readyz`
//! turns 503, new requests get 503, requests in flight get up to
//! `daemon.drain_secs` to finish (each plugin call's record is committed
//! before its answer is sent, so a call is either recorded and answered,
//! or neither), background loops stop, and the process exits 0.
//!
//! Invariant: no background failure ends the daemon; it is logged, counted
//! in `/metrics`, and retried.

pub mod api;
pub mod disk;
mod http;
pub mod inbox;
pub mod ingest;
pub mod metrics;
mod workers;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::config::Config;
use crate::datadir::DataDir;
use crate::runtime::Runtime;
use crate::sync::backoff::Backoff;

/// What the daemon's parts share.
pub struct App {
    /// The plugin runtime (and through it the data dir, limits, audit log).
    pub rt: Runtime,
    config: RwLock<Arc<Config>>,
    /// The config the daemon started with, whose start-only settings are
    /// the ones in force (what a reload is compared with).
    started_with: Arc<Config>,
    /// Counters for `/metrics`.
    pub metrics: metrics::Metrics,
    /// Set once plugins are loaded.
    pub ready: AtomicBool,
    /// Set on SIGTERM.
    pub draining: AtomicBool,
    /// When the daemon started.
    pub started: Instant,
    /// The inbox directory.
    pub inbox: PathBuf,
    /// Device ingest's group-committing `fhir.db` writer.
    pub fhir_writer: crate::fhir::writer::Writer,
    /// The data disk's last readings (the `disk` thread's).
    pub disk: Mutex<disk::Watch>,
    stop: Stop,
    /// The threads that run handlers.
    workers: workers::Workers,
}

impl App {
    /// The current config (reloaded on SIGHUP).
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A stop flag that interrupts sleeps.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    fn set(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
    }
    /// Sleeps up to `d`; true if stopped meanwhile.
    fn sleep(&self, d: Duration) -> bool {
        let g = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .wake
            .wait_timeout_while(g, d, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }
}

/// How the daemon re-reads its config on SIGHUP.
pub type Reload = Box<dyn Fn() -> Result<Config> + Send>;

/// Runs the daemon until SIGTERM/SIGINT. `on_listen` is told the bound
/// URL (`http://127.0.0.1:8787`).
pub fn run(
    dir: DataDir,
    config: Config,
    reload: Reload,
    on_listen: impl FnOnce(&str),
) -> Result<()> {
    let started = Instant::now();
    dir.init()?;
    let inbox = config
        .daemon
        .inbox
        .clone()
        .unwrap_or_else(|| dir.root().join("inbox"));
    inbox::prepare(&inbox)?;
    let listener = TcpListener::bind(&config.daemon.listen)
        .with_context(|| format!("cannot listen on {} (api.listen)", config.daemon.listen))?;
    let addr = listener.local_addr()?;
    let tls = match &config.daemon.tls {
        Some((cert, key)) => Some(http::tls_acceptor(cert, key)?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Before the pipeline threads start: the HTTP thread and the two
    // writers (the audit log's, started by the runtime) run ahead.
    crate::priority::set_pipeline_boost(config.daemon.pipeline_priority_boost);
    let rt = Runtime::new(dir.clone(), config.limits.clone())?;
    for (name, r) in rt.preload()? {
        match r {
            Ok(v) => log::info!("loaded {name} {v}"),
            Err(e) => log::warn!("not loaded: {name}: {e}"),
        }
    }
    let limits_workers = config.limits.api_workers_in_force();
    let fhir_writer = crate::fhir::writer::Writer::open(&dir, &config.limits)?;
    let warm_dir = dir.clone();
    let workers = workers::Workers::start(limits_workers, move || {
        if let Err(e) = crate::runtime::conns::warm(&warm_dir) {
            log::warn!("api worker: cannot open the databases yet: {e:#}");
        }
    })?;
    let config = Arc::new(config);
    let app = Arc::new(App {
        rt,
        started_with: config.clone(),
        config: RwLock::new(config),
        metrics: metrics::Metrics::default(),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        started,
        inbox,
        fhir_writer,
        disk: Mutex::new(disk::Watch::default()),
        stop: Stop::default(),
        workers,
    });

    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .context("cannot install signal handlers")?;
    let signal_handle = signals.handle();
    let (sig_tx, sig_rx) = smol::channel::unbounded();
    let signal_thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signals = signals;
            for s in signals.forever() {
                if sig_tx.send_blocking(s).is_err() {
                    break;
                }
            }
        })?;

    let ex = Arc::new(smol::Executor::new());
    let (stop_accept_tx, stop_accept_rx) = smol::channel::bounded::<()>(1);
    let (stop_ex_tx, stop_ex_rx) = smol::channel::bounded::<()>(1);
    // One thread runs the HTTP side (accept, hyper, TLS); everything that
    // blocks runs on the workers. It needs about 0.06 ms of CPU per
    // request, so one keeps up with far more than the box's 2,000/s, and
    // one thread that stays awake under load is woken less often than two
    // that take turns: the HTTP side's CPU per request fell from 0.088 to
    // 0.062 ms (BENCHMARKS.md, stop 14).
    // The reactor (and its `async-io` helper thread) starts here, on the
    // main thread: a thread inherits its creator's priority, and the
    // helper is not one of the pipeline threads.
    let listener = smol::Async::new(listener)?;
    let api_ex = ex.clone();
    let api_thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            crate::priority::pipeline_thread("api");
            smol::block_on(api_ex.run(async { stop_ex_rx.recv().await.ok() }))
        })?;
    ex.spawn(http::serve(
        app.clone(),
        listener,
        tls,
        ex.clone(),
        stop_accept_rx,
    ))
    .detach();

    let background = vec![
        spawn_loop("inbox", &app, inbox_loop)?,
        spawn_loop("sync", &app, sync_loop)?,
        spawn_loop("updates", &app, update_loop)?,
        spawn_loop("disk", &app, disk_loop)?,
    ];

    app.ready.store(true, Ordering::SeqCst);
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving on {addr}")),
    ]);
    log::info!(
        "clinicbox {} ready on {scheme}://{addr} in {} ms",
        env!("CARGO_PKG_VERSION"),
        started.elapsed().as_millis()
    );
    note(
        &app,
        "daemon",
        json!({"action": "start", "listen": addr.to_string()}),
    );
    on_listen(&format!("{scheme}://{addr}"));

    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    loop {
        let tick = watchdog.unwrap_or(Duration::from_secs(3600));
        let sig = smol::block_on(smol::future::or(
            async { sig_rx.recv().await.ok() },
            async {
                smol::Timer::after(tick).await;
                Some(0)
            },
        ));
        match sig {
            Some(0) => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            Some(signal_hook::consts::SIGHUP) => reload_config(&app, &reload),
            Some(s) => {
                log::info!("signal {s}: draining");
                break;
            }
            None => break,
        }
    }

    // Drain.
    app.draining.store(true, Ordering::SeqCst);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_accept_tx.try_send(());
    let drain = app.config().daemon.drain;
    let deadline = Instant::now() + drain;
    while app.metrics.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let left = app.metrics.inflight.load(Ordering::SeqCst);
    // Answers just computed are still being written: give open connections
    // (each told `Connection: close`) a moment to finish and close.
    let flush = (Instant::now() + Duration::from_secs(1)).min(deadline.max(Instant::now()));
    while app.metrics.connections.load(Ordering::SeqCst) > 0 && Instant::now() < flush {
        std::thread::sleep(Duration::from_millis(5));
    }
    app.stop.set();
    for t in background {
        let _ = t.join();
    }
    let _ = stop_ex_tx.try_send(());
    drop(stop_ex_tx);
    let _ = api_thread.join();
    signal_handle.close();
    let _ = signal_thread.join();
    note(
        &app,
        "daemon",
        json!({"action": "stop", "unfinished_requests": left}),
    );
    if left > 0 {
        log::warn!("stopped with {left} requests unfinished after {drain:?}");
    } else {
        log::info!("stopped cleanly");
    }
    Ok(())
}

fn note(app: &App, kind: &'static str, body: serde_json::Value) {
    if let Err(e) = app
        .rt
        .env()
        .audit
        .append(crate::audit::log::Entry::new(kind, &body))
    {
        log::error!("cannot record {kind}: {e:#}");
    }
}

fn reload_config(app: &App, reload: &Reload) {
    match reload() {
        Ok(new) => {
            let waiting = app.started_with.restart_needed(&new);
            if waiting.is_empty() {
                log::info!("config reloaded");
            } else {
                log::warn!(
                    "config reloaded; these changes wait for the next restart (until then the daemon runs with their old values): {}",
                    waiting.join(", ")
                );
            }
            *app.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
            note(
                app,
                "daemon",
                json!({"action": "reload", "outcome": "ok", "restart_needed": waiting}),
            );
        }
        Err(e) => {
            log::error!("config reload refused, keeping the running config: {e:#}");
            note(
                app,
                "daemon",
                json!({"action": "reload", "outcome": "refused", "reason": format!("{e:#}")}),
            );
        }
    }
}

fn spawn_loop(name: &str, app: &Arc<App>, f: fn(&App)) -> Result<std::thread::JoinHandle<()>> {
    let app = app.clone();
    Ok(std::thread::Builder::new()
        .name(name.into())
        .spawn(move || f(&app))?)
}

fn inbox_loop(app: &App) {
    let mut seen = inbox::Seen::new();
    loop {
        if let Err(e) = inbox::scan(app, &app.inbox, &mut seen) {
            log::warn!("inbox: {e:#}");
        }
        // Plugins removed or replaced meanwhile (by the CLI, say) free
        // their code and idle instances.
        match app.rt.forget_stale() {
            Ok(gone) if !gone.is_empty() => {
                log::info!("unloaded (removed or replaced): {}", gone.join(", "));
            }
            Ok(_) => {}
            Err(e) => log::warn!("cannot check for removed plugins: {e:#}"),
        }
        if app.stop.sleep(app.config().daemon.inbox_poll) {
            return;
        }
    }
}

fn sync_loop(app: &App) {
    let mut backoff: Option<((Duration, Duration), Backoff)> = None;
    loop {
        let config = app.config();
        let Some(up) = config.upstream.clone() else {
            // Not configured: look again after a reload.
            if app.stop.sleep(Duration::from_secs(5)) {
                return;
            }
            continue;
        };
        // A reload may change the backoff settings: start a fresh one then.
        if backoff
            .as_ref()
            .is_none_or(|(settings, _)| *settings != (up.backoff, up.backoff_max))
        {
            backoff = Some((
                (up.backoff, up.backoff_max),
                Backoff::new(up.backoff, up.backoff_max),
            ));
        }
        let Some((_, b)) = backoff.as_mut() else {
            continue;
        };
        let wait = match crate::sync::pass(&app.rt.env().dir, &config) {
            Ok(r) => {
                app.metrics.sync_successes.fetch_add(1, Ordering::Relaxed);
                log::debug!("sync: sent {} records", r.upload.sent);
                b.reset();
                up.interval
            }
            Err(e) => {
                app.metrics.sync_failures.fetch_add(1, Ordering::Relaxed);
                let d = b.next_delay().max(up.backoff);
                log::warn!("sync failed, next try in {d:?}: {e}");
                d
            }
        };
        if app.stop.sleep(wait) {
            return;
        }
    }
}

fn disk_loop(app: &App) {
    // A reading that keeps failing is logged when it starts and when it
    // ends, not every minute.
    let mut failing = false;
    loop {
        match disk::Usage::of(&app.rt.env().dir) {
            Ok(u) => {
                if std::mem::replace(&mut failing, false) {
                    log::info!("disk: the data disk can be read again");
                }
                let percent = app.config().daemon.disk_warn_percent;
                let say = app.disk.lock().unwrap_or_else(|p| p.into_inner()).observe(
                    Instant::now(),
                    &u,
                    percent,
                );
                match say {
                    disk::Say::Warn(msg) => log::warn!("{msg}"),
                    disk::Say::Recovered(msg) => log::info!("{msg}"),
                    disk::Say::Nothing => {}
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    log::warn!("disk: {e:#} (no low-disk warning until it can be read)");
                }
            }
        }
        if app.stop.sleep(disk::CHECK_EVERY) {
            return;
        }
    }
}

fn update_loop(app: &App) {
    loop {
        let config = app.config();
        let wait = match &config.updates {
            None => Duration::from_secs(5),
            Some(up) => {
                match crate::update::poll(app, up) {
                    Ok(n) if n > 0 => log::info!("updates: {n} bundles installed"),
                    Ok(_) => {}
                    Err(e) => log::warn!("updates: {e:#}"),
                }
                up.interval
            }
        };
        if app.stop.sleep(wait) {
            return;
        }
    }
}
