//! Daemon benchmark (`cargo bench --bench daemon`). Not a test: it prints
//! figures for BENCHMARKS.md. The daemon is the real release binary,
//! spoken to over loopback HTTP by a load generator in this process, on the
//! same machine.
//!
//! 1. Device ingest, open loop: `BENCH_DEVICES` (200) devices each POST one
//!    vital-sign Observation every 100 ms (2,000/s in all) for
//!    `BENCH_SECS` (60) seconds. Each request stores the Observation,
//!    records it, runs NEWS2 (subscribed to vital signs) for the patient
//!    and answers with the RiskAssessment. Latency is measured from each
//!    request's *scheduled* send time, so a stalled server cannot hide its
//!    queue (no coordinated omission). After it, each ingest stage's p50
//!    and p99 inside the daemon (from two `/metrics` scrapes), the
//!    daemon's CPU per request by thread, how busy the whole machine was (`/proc/stat`)
//!    and what the load generator itself cost, and how much `fhir.db` and
//!    `audit.db` grew per request.
//! 2. Maximum sustained rate: closed loop, `BENCH_CONNS` (32) connections
//!    posting back to back for 15 s.
//! 3. Start to `READY=1` with 50 installed plugins (code cache warm, as
//!    after any restart), 15 starts; beside it, a bare process start.
//! 4. The disk itself: `BENCH_FSYNC_SECS` (10) seconds of 4 KiB writes each
//!    followed by an fsync, in the bench's temp dir, as the ingest's group
//!    commit does. Every device answer waits for one fsync, so a machine
//!    whose own fsyncs stall shows those stalls in the ingest's p99.
//! 5. The CPU itself: every 100 ms, before, all through and after the open
//!    loop, a thread of this process times a fixed piece of arithmetic in
//!    its own CPU time ([`SpeedProbe`]). On a virtual machine the host can
//!    run the guest's CPUs slower for seconds at a time (another guest on
//!    the same cores), which the guest's own CPU accounting does not show
//!    (steal stays 0 here). The probe's speed, relative to the fastest it saw,
//!    tells a run on a slowed host from a slower daemon; how late another
//!    thread wakes from 5 ms sleeps at real-time priority tells a stall of
//!    the whole guest from one of the daemon.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clinicbox::fhir::synth::round::{Reading, bundle};

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use common::daemon::{Daemon, token};
use common::{NEWS2_VITALS, TestBox};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn env_n(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// A box with NEWS2 installed and granted, and one full round of vitals
/// ingested for each of `patients` patients (so every later single
/// Observation can be scored).
fn ingest_box(patients: usize) -> (TestBox, Daemon, String) {
    let b = TestBox::new();
    b.trust_dev_vendor();
    b.ok(&[
        "plugin",
        "install",
        common::example_bundle().to_str().unwrap(),
    ]);
    b.grant_news2();
    let device = token(&b, "bench", "device", "clinic-a", &[]);
    let d = Daemon::start(
        &b,
        &format!(
            "log_level = \"warn\"\n[api]\nlisten = \"127.0.0.1:0\"\n[limits]\nmax_inflight_requests = 4096\n{}",
            std::env::var("BENCH_LIMITS")
                .unwrap_or_default()
                .replace(';', "\n")
        ),
        &[],
    );
    for p in 0..patients {
        let doc = bundle(
            &format!("d{p:04}"),
            "2026-11-26T00:00:00Z",
            &Reading::NORMAL,
        );
        let a = d.post("/fhir/Bundle", Some(&device), doc.to_string().as_bytes());
        assert_eq!(a.status, 201, "{}", a.text());
    }
    let _ = NEWS2_VITALS;
    (b, d, device)
}

/// Where a device's request body has its reading's time.
const WHEN: &str = "@@WHEN@@";

/// The bodies a device cycles through, with [`WHEN`] in place of the time:
/// round `k` sends one Observation of the six vitals in turn, its pulse
/// varying. Built once per device, so that the load generator (on the same
/// two cores as the daemon) spends its time sending, not building JSON.
fn device_bodies(patient: &str) -> Vec<String> {
    (0..120u64)
        .map(|k| {
            let r = Reading {
                hr: 60.0 + (k % 40) as f64,
                ..Reading::NORMAL
            };
            bundle(patient, WHEN, &r)["entry"][(k % 6) as usize]["resource"].to_string()
        })
        .collect()
}

/// Round `k`'s body, timed now.
fn observation(bodies: &[String], k: u64) -> Vec<u8> {
    let when = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    bodies[(k % bodies.len() as u64) as usize]
        .replacen(WHEN, &when, 1)
        .into_bytes()
}

/// A device's HTTP/1.1 keep-alive connection: the request head written by
/// hand, the answer read by its `Content-Length`. A bedside monitor's
/// client is this simple; a general client (ureq) costs the shared two
/// cores about 0.1 ms per request more, which the daemon would pay for.
struct Conn {
    addr: String,
    head: String,
    io: Option<std::io::BufReader<std::net::TcpStream>>,
}

impl Conn {
    fn new(base: &str, path: &str, token: &str) -> Conn {
        let addr = base.trim_start_matches("http://").to_owned();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nContent-Length: "
        );
        Conn {
            addr,
            head,
            io: None,
        }
    }

    /// Posts `body`: (answered 201, the answer holds a RiskAssessment).
    fn post(&mut self, body: &[u8]) -> (bool, bool) {
        match self.try_post(body) {
            Ok(r) => r,
            Err(_) => {
                self.io = None;
                (false, false)
            }
        }
    }

    /// Opens the connection, if it is not open.
    fn connect(&mut self) -> std::io::Result<()> {
        if self.io.is_none() {
            let s = std::net::TcpStream::connect(&self.addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            self.io = Some(std::io::BufReader::new(s));
        }
        Ok(())
    }

    fn try_post(&mut self, body: &[u8]) -> std::io::Result<(bool, bool)> {
        use std::io::{BufRead, Read, Write};
        self.connect()?;
        let io = self.io.as_mut().ok_or(std::io::ErrorKind::NotConnected)?;
        let mut req = Vec::with_capacity(self.head.len() + body.len() + 16);
        req.extend_from_slice(self.head.as_bytes());
        req.extend_from_slice(format!("{}\r\n\r\n", body.len()).as_bytes());
        req.extend_from_slice(body);
        io.get_mut().write_all(&req)?;
        let mut line = String::new();
        io.read_line(&mut line)?;
        let status = line.split(' ').nth(1).unwrap_or("");
        let ok = status == "201";
        let (mut len, mut close) = (None, false);
        loop {
            line.clear();
            if io.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap_or((l, ""));
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
            {
                close = true;
            }
        }
        let len = len.ok_or(std::io::ErrorKind::InvalidData)?;
        let mut answer = vec![0; len];
        io.read_exact(&mut answer)?;
        if close {
            self.io = None;
        }
        let scored = answer
            .windows(b"\"RiskAssessment\"".len())
            .any(|w| w == b"\"RiskAssessment\"");
        Ok((ok, scored))
    }
}

struct Outcome {
    /// (second of the run the request was due or sent in, latency ms).
    lat: Vec<(u64, f64)>,
    errors: u64,
    not_scored: u64,
    sent: u64,
    secs: f64,
    /// The run's clock: second 0 starts here.
    start: Instant,
}

impl Outcome {
    fn new(secs: u64) -> Outcome {
        Outcome {
            lat: Vec::new(),
            errors: 0,
            not_scored: 0,
            sent: 0,
            secs: secs as f64,
            start: Instant::now(),
        }
    }
}

/// CPU readings taken together: the daemon's threads, the machine, and
/// this process (the load generator).
struct CpuNow {
    daemon: std::collections::BTreeMap<String, f64>,
    machine: (Vec<u64>, usize),
    own_ms: f64,
}

impl CpuNow {
    fn read(pid: u32) -> CpuNow {
        CpuNow {
            daemon: cpu_by_thread(pid),
            machine: machine_ticks(),
            own_ms: own_cpu_ms(),
        }
    }
}

/// The open-loop run, and the CPU readings at its clock's start and end
/// (the generator's set-up before it is not in them).
fn open_loop(d: &Daemon, token: &str, devices: usize, secs: u64) -> (Outcome, [CpuNow; 2]) {
    let out = Arc::new(Mutex::new(Outcome::new(secs)));
    // Every device's bodies are built and its connection opened before the
    // clock starts: the load generator's own start-up is not measured.
    let ready: Vec<(Vec<String>, Conn)> = (0..devices)
        .map(|i| {
            let mut conn = Conn::new(&d.base, "/fhir/Observation", token);
            conn.connect().expect("connect");
            (device_bodies(&format!("d{i:04}")), conn)
        })
        .collect();
    let cpu_start = CpuNow::read(d.child.id());
    let start = Instant::now() + Duration::from_millis(200);
    let period = Duration::from_millis(100);
    let mut threads = Vec::new();
    for (i, (bodies, mut conn)) in ready.into_iter().enumerate() {
        let out = out.clone();
        threads.push(std::thread::spawn(move || {
            // Devices are spread evenly over the 100 ms period.
            let offset = period * i as u32 / devices as u32;
            let mut local = Vec::new();
            let (mut errors, mut not_scored) = (0, 0);
            let mut k = 0u64;
            loop {
                let due = start + offset + period * k as u32;
                if due > start + Duration::from_secs(secs) {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let body = observation(&bodies, k);
                let (ok, scored) = conn.post(&body);
                local.push(((due - start).as_secs(), due.elapsed().as_secs_f64() * 1e3));
                errors += u64::from(!ok);
                not_scored += u64::from(ok && !scored);
                k += 1;
            }
            let mut o = out.lock().unwrap();
            o.sent += local.len() as u64;
            o.lat.extend(local);
            o.errors += errors;
            o.not_scored += not_scored;
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let cpu_end = CpuNow::read(d.child.id());
    let mut o = Arc::try_unwrap(out).ok().unwrap().into_inner().unwrap();
    // The rate achieved: all requests over the time they actually took (a
    // server that falls behind takes longer than the schedule).
    o.secs = start.elapsed().as_secs_f64();
    o.start = start;
    (o, [cpu_start, cpu_end])
}

fn closed_loop(d: &Daemon, token: &str, conns: usize, patients: usize, secs: u64) -> Outcome {
    let out = Arc::new(Mutex::new(Outcome::new(secs)));
    // Connection i sends for the patients p with p % conns == i % conns.
    let all: Vec<Vec<Vec<String>>> = (0..conns)
        .map(|i| {
            let mine: Vec<Vec<String>> = (0..patients)
                .filter(|p| p % conns == i % conns)
                .map(|p| device_bodies(&format!("d{p:04}")))
                .collect();
            if mine.is_empty() {
                vec![device_bodies(&format!("d{:04}", i % patients))]
            } else {
                mine
            }
        })
        .collect();
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut threads = Vec::new();
    for bodies in all {
        let out = out.clone();
        let mut conn = Conn::new(&d.base, "/fhir/Observation", token);
        threads.push(std::thread::spawn(move || {
            let mut local = Vec::new();
            let mut errors = 0;
            let mut k = 0u64;
            while Instant::now() < end {
                let body = observation(&bodies[k as usize % bodies.len()], k);
                let t = Instant::now();
                let (ok, _) = conn.post(&body);
                local.push(((t - start).as_secs(), t.elapsed().as_secs_f64() * 1e3));
                errors += u64::from(!ok);
                k += 1;
            }
            let mut o = out.lock().unwrap();
            o.sent += local.len() as u64;
            o.lat.extend(local);
            o.errors += errors;
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    Arc::try_unwrap(out).ok().unwrap().into_inner().unwrap()
}

/// `clinicbox_ingest_stage_seconds` and the ingest route's
/// `clinicbox_http_request_seconds` from one `/metrics` scrape: for each
/// series, its cumulative bucket counts by upper bound (seconds).
fn stage_buckets(text: &str) -> std::collections::BTreeMap<String, Vec<(f64, f64)>> {
    let mut out = std::collections::BTreeMap::<String, Vec<(f64, f64)>>::new();
    for line in text.lines() {
        let series = if let Some(rest) =
            line.strip_prefix("clinicbox_ingest_stage_seconds_bucket{stage=\"")
        {
            rest
        } else if let Some(rest) =
            line.strip_prefix("clinicbox_http_request_seconds_bucket{route=\"")
        {
            if !rest.starts_with("ingest\"") {
                continue;
            }
            rest
        } else {
            continue;
        };
        let (name, rest) = series.split_once('"').unwrap();
        let le = rest
            .split("le=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap()
        };
        let n: f64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
        let key = if name == "ingest" {
            "whole request".to_owned()
        } else {
            name.to_owned()
        };
        out.entry(key).or_default().push((le, n));
    }
    out
}

/// Where the open loop's time went inside the daemon: the p50 and p99 of
/// each ingest stage, from the difference of two `/metrics` scrapes (as
/// the bucket bound the quantile falls in: `≤ 5 ms` means between the
/// bound below and 5 ms).
fn report_stages(before: &str, after: &str) {
    let b = stage_buckets(before);
    let mut after = stage_buckets(after);
    let fmt = |s: f64| {
        if s.is_infinite() {
            "> 5 s".to_owned()
        } else {
            format!("≤ {} ms", s * 1000.0)
        }
    };
    let mut parts = Vec::new();
    for stage in [
        "queue",
        "store",
        "plugins",
        "durable",
        "record",
        "whole request",
    ] {
        let Some(a) = after.remove(stage) else {
            continue;
        };
        let zero = vec![(0.0, 0.0); a.len()];
        let b = b.get(stage).unwrap_or(&zero);
        let d: Vec<(f64, f64)> = a
            .iter()
            .zip(b)
            .map(|((le, x), (_, y))| (*le, x - y))
            .collect();
        let total = d.last().map_or(0.0, |(_, n)| *n);
        if total == 0.0 {
            continue;
        }
        let q = |p: f64| {
            fmt(d
                .iter()
                .find(|(_, n)| *n >= total * p)
                .map_or(f64::INFINITY, |(le, _)| *le))
        };
        parts.push(format!("{stage} p50 {} p99 {}", q(0.5), q(0.99)));
    }
    println!("  inside the daemon (/metrics): {}", parts.join("; "));
}

/// `machine`: what the speed probe saw, by second of the run (empty when
/// it did not run).
fn report(what: &str, o: Outcome, machine: &std::collections::BTreeMap<u64, Machine>) {
    let rate = o.sent as f64 / o.secs;
    let mut all: Vec<f64> = o.lat.iter().map(|(_, ms)| *ms).collect();
    println!(
        "{what}: {} requests in {:.0} s = {rate:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; {} errors, {} answered without a RiskAssessment",
        o.sent,
        o.secs,
        pct(&mut all, 0.50),
        pct(&mut all, 0.99),
        pct(&mut all, 0.999),
        pct(&mut all, 1.0),
        o.errors,
        o.not_scored
    );
    let mut by_second = std::collections::BTreeMap::<u64, Vec<f64>>::new();
    for (sec, ms) in o.lat {
        by_second.entry(sec).or_default().push(ms);
    }
    report_machine_seconds(&by_second, machine);
    // The p99 of each full second (the last, partial one left out): less
    // swayed by one stall than the whole run's p99, so runs compare better
    // side by side; and how many seconds met 10 ms.
    let mut p99s: Vec<f64> = by_second
        .values()
        .take(by_second.len().saturating_sub(1))
        .map(|v| pct(&mut v.clone(), 0.99))
        .collect();
    if p99s.len() > 1 {
        let met = p99s.iter().filter(|ms| **ms <= 10.0).count();
        println!(
            "  p99 of each full second: median {:.2} ms, p90 {:.2} ms, worst {:.2} ms; {met} of {} seconds at or under 10 ms",
            pct(&mut p99s, 0.5),
            pct(&mut p99s, 0.9),
            pct(&mut p99s, 1.0),
            p99s.len()
        );
    }
    // BENCH_TIMELINE=1: p50, p99 and max of each second of the run, to
    // tell a stall (one bad second) from a steady queue (every second).
    if std::env::var_os("BENCH_TIMELINE").is_some() {
        for (sec, mut v) in by_second {
            let cpu = machine
                .get(&sec)
                .map(|m| {
                    let speed = m
                        .speed
                        .map(|v| format!("{:3.0} %", v * 100.0))
                        .unwrap_or_else(|| "  n/a".into());
                    format!(", CPU speed {speed}, probe late {:5.1} ms", m.late_ms)
                })
                .unwrap_or_default();
            println!(
                "  second {sec:3}: {:5} requests, p50 {:7.2} ms, p99 {:7.2} ms, max {:7.2} ms{cpu}",
                v.len(),
                pct(&mut v, 0.5),
                pct(&mut v, 0.99),
                pct(&mut v, 1.0)
            );
        }
    }
}

/// The CPU speed and the machine's own stalls over the run, and the
/// latency of the seconds in which the host ran this guest at 90 % or
/// more of the probe's fastest and the probe never woke over 20 ms late:
/// beside the whole run's figures, not instead of them.
fn report_machine_seconds(
    by_second: &std::collections::BTreeMap<u64, Vec<f64>>,
    machine: &std::collections::BTreeMap<u64, Machine>,
) {
    let full = by_second.len().saturating_sub(1) as u64;
    let seen: Vec<Machine> = (0..full).filter_map(|s| machine.get(&s).copied()).collect();
    if seen.is_empty() {
        return;
    }
    let mut shares: Vec<f64> = seen.iter().filter_map(|m| m.speed).collect();
    if shares.is_empty() {
        return;
    }
    let stalls: Vec<f64> = seen
        .iter()
        .map(|m| m.late_ms)
        .filter(|ms| *ms > 20.0)
        .collect();
    let clear: Vec<u64> = (0..full)
        .filter(|s| {
            machine
                .get(s)
                .is_some_and(|m| m.speed.is_some_and(|v| v >= 0.9) && m.late_ms <= 20.0)
        })
        .collect();
    let mut lat: Vec<f64> = clear
        .iter()
        .flat_map(|s| by_second[s].iter().copied())
        .collect();
    let clear_p99 = if lat.is_empty() {
        "none".to_owned()
    } else {
        format!("p99 {:.2} ms", pct(&mut lat, 0.99))
    };
    println!(
        "  the machine by second (speed probe): CPU speed median {:.0} %, p10 {:.0} %, slowest {:.0} % of the fastest; {} seconds in which the probe woke over 20 ms late (longest {:.0} ms); {} of {full} seconds at 90 % speed or more and without such a stall, their requests: {clear_p99}",
        pct(&mut shares, 0.5) * 100.0,
        pct(&mut shares, 0.1) * 100.0,
        pct(&mut shares, 0.0) * 100.0,
        stalls.len(),
        stalls.iter().copied().fold(0.0, f64::max),
        clear.len(),
    );
}

fn start_to_ready(runs: usize) {
    let b = TestBox::new();
    let vendor = common::Vendor::new(b.tmp.path(), "bench");
    b.trust(&vendor, "acme/");
    for i in 0..50 {
        let bytes = common::signed_bundle(&format!("acme/p{i:02}"), "1.0.0", &[&vendor.key]);
        let p = b.file(&format!("p{i:02}.cbx"), &bytes);
        b.ok(&["plugin", "install", p.to_str().unwrap()]);
    }
    let sock_path = b.path("notify.sock");
    let mut ready = Vec::new();
    let mut bare = Vec::new();
    for _ in 0..runs {
        let _ = std::fs::remove_file(&sock_path);
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        std::fs::write(
            &b.config,
            "log_level = \"warn\"\n[api]\nlisten = \"127.0.0.1:0\"\n",
        )
        .unwrap();
        let t = Instant::now();
        let mut child = b
            .cmd()
            .arg("run")
            .env("NOTIFY_SOCKET", &sock_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 512];
        loop {
            let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break;
            }
        }
        ready.push(t.elapsed().as_secs_f64() * 1e3);
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
        let t = Instant::now();
        let _ = b.cmd().arg("--version").output();
        bare.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (r50, b50) = (pct(&mut ready, 0.5), pct(&mut bare, 0.5));
    println!(
        "start to READY=1, 50 installed plugins, {runs} starts: p50 {r50:.1} ms, max {:.1} ms; a bare `clinicbox --version` process: p50 {b50:.1} ms (READY/bare = {:.1})",
        pct(&mut ready, 1.0),
        r50 / b50
    );
}

/// Latency of 4 KiB write + fsync pairs on the disk the daemon uses.
fn fsync_probe(secs: u64) {
    use std::io::Write;
    if secs == 0 {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut f = std::fs::File::create(dir.path().join("probe")).expect("probe file");
    let block = [0x5au8; 4096];
    let (mut lat, start) = (Vec::new(), Instant::now());
    while start.elapsed() < Duration::from_secs(secs) {
        f.write_all(&block).expect("write");
        let t = Instant::now();
        f.sync_all().expect("fsync");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let slow = lat.iter().filter(|ms| **ms > 20.0).count();
    println!(
        "disk: {} write+fsync in {secs} s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.1} ms; {slow} over 20 ms",
        lat.len(),
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        pct(&mut lat, 0.999),
        pct(&mut lat, 1.0)
    );
}

/// Times a fixed piece of arithmetic every 100 ms in its thread's own CPU
/// time, until finished: how fast the host runs this guest's CPUs, second
/// by second. The piece takes about 35 µs and works in registers only.
/// Its thread runs at real-time priority (`chrt -f 50`, when allowed), so
/// no thread of the guest preempts it mid-piece (at normal priority, the
/// switches charged to the piece read as a slower CPU under load). Between
/// pieces the same thread sleeps 5 ms at a time and notes how late it
/// wakes: a thread that no other in this guest can keep from its CPU wakes
/// late only when the whole guest stopped running (the host paused it) or
/// the kernel held the CPU, so a stall in the run's latencies can be told
/// apart from one of the machine. At that priority it does nothing else
/// (200 wake-ups a second).
///
/// A second thread, at normal priority, walks 4,000 links of a random
/// cycle through 8 MiB every 100 ms (about 1 ms, 1 % of one CPU): that
/// follows how busy the host keeps the caches and memory that its guests
/// share, but under load also the daemon's own use of them, so its figure
/// during a run compares only with other runs at the same rate; the idle
/// spells before and after the run are reported beside it.
struct SpeedProbe {
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// The memory walks.
    walker: std::thread::JoinHandle<Timed>,
    /// The pieces, the late wake-ups, and whether the thread got its
    /// real-time priority.
    watch: std::thread::JoinHandle<(Timed, Timed, bool)>,
}

/// Readings, each with when it was taken.
type Timed = Vec<(Instant, f64)>;

/// What the probe saw: each piece (when it ended, the CPU ns it took),
/// each memory walk (when, CPU ns per link), and each 5 ms sleep that
/// woke more than 2 ms late (when, ms late).
#[derive(Default)]
struct Probed {
    pieces: Timed,
    walks: Timed,
    late: Timed,
}

impl Probed {
    /// The fastest piece's CPU ns.
    fn fastest(&self) -> f64 {
        self.pieces
            .iter()
            .map(|(_, ns)| *ns)
            .fold(f64::MAX, f64::min)
    }

    /// The median piece (µs) and walk (ns per link) between `from` and `to`.
    fn idle(&self, from: Instant, to: Instant) -> Option<(f64, f64)> {
        let within = |v: &[(Instant, f64)]| -> Vec<f64> {
            v.iter()
                .filter(|(at, _)| *at >= from && *at < to)
                .map(|(_, x)| *x)
                .collect()
        };
        let (mut p, mut w) = (within(&self.pieces), within(&self.walks));
        (!p.is_empty() && !w.is_empty()).then(|| (pct(&mut p, 0.5) / 1e3, pct(&mut w, 0.5)))
    }
}

impl SpeedProbe {
    fn start() -> SpeedProbe {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let cpu_ns = || {
            let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
            t.tv_sec as f64 * 1e9 + t.tv_nsec as f64
        };
        // The memory walk, at normal priority: about 1 ms every 100 ms.
        let walker = std::thread::spawn(move || {
            // One random cycle through 8 MiB (Sattolo's shuffle).
            let mut ring: Vec<u32> = (0..(2u32 << 20)).collect();
            for i in (1..ring.len()).rev() {
                ring.swap(i, fastrand::usize(..i));
            }
            let (mut link, mut walks) = (0u32, Vec::new());
            let mut next = Instant::now();
            while !halt.load(Ordering::Relaxed) {
                let before = cpu_ns();
                for _ in 0..4_000 {
                    link = ring[link as usize];
                }
                std::hint::black_box(link);
                walks.push((Instant::now(), (cpu_ns() - before) / 4e3));
                // Behind (a stall, or no CPU for a while): no catch-up
                // walks back to back, the next one 100 ms from now.
                next = (next + Duration::from_millis(100)).max(Instant::now());
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            walks
        });
        // The arithmetic piece and the stall watch, at real-time priority:
        // never preempted, so the piece's CPU time holds no switch.
        let halt = stop.clone();
        let watch = std::thread::spawn(move || {
            let tid = rustix::thread::gettid().as_raw_nonzero().get().to_string();
            let realtime = std::process::Command::new("chrt")
                .args(["-f", "-p", "50", &tid])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            let (mut late, mut pieces) = (Vec::new(), Vec::new());
            let mut next = Instant::now();
            let mut tick = 0u64;
            while !halt.load(Ordering::Relaxed) {
                if tick.is_multiple_of(20) {
                    let before = cpu_ns();
                    let mut x = std::hint::black_box(0x9e37_79b9_7f4a_7c15u64);
                    for _ in 0..20_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                    }
                    std::hint::black_box(x);
                    pieces.push((Instant::now(), cpu_ns() - before));
                }
                tick += 1;
                next += Duration::from_millis(5);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                let now = Instant::now();
                let ms = now.saturating_duration_since(next).as_secs_f64() * 1e3;
                if ms > 2.0 {
                    late.push((now, ms));
                    next = now;
                }
            }
            (pieces, late, realtime)
        });
        SpeedProbe {
            stop,
            walker,
            watch,
        }
    }

    /// Stops both threads; what they saw, and whether the watch got its
    /// real-time priority.
    fn finish(self) -> (Probed, bool) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let walks = self.walker.join().expect("memory walk");
        let (pieces, late, realtime) = self.watch.join().expect("speed probe");
        (
            Probed {
                pieces,
                walks,
                late,
            },
            realtime,
        )
    }
}

/// What the probe saw in one second of the run.
#[derive(Clone, Copy, Default)]
struct Machine {
    /// The probe's speed: the median piece's share of the fastest (None in
    /// a second without a piece, e.g. when the guest was paused).
    speed: Option<f64>,
    /// The longest the probe woke late (ms; 0 when never over 2 ms).
    late_ms: f64,
}

/// The probe's readings by second of a run that started at `start`.
fn machine_by_second(p: &Probed, start: Instant) -> std::collections::BTreeMap<u64, Machine> {
    let fastest = p.fastest();
    let mut speeds = std::collections::BTreeMap::<u64, Vec<f64>>::new();
    for (at, ns) in p.pieces.iter().filter(|(at, _)| *at >= start) {
        speeds
            .entry((*at - start).as_secs())
            .or_default()
            .push(fastest / ns);
    }
    let mut out: std::collections::BTreeMap<u64, Machine> = speeds
        .into_iter()
        .map(|(s, mut v)| {
            let speed = pct(&mut v, 0.5);
            (
                s,
                Machine {
                    speed: Some(speed),
                    late_ms: 0.0,
                },
            )
        })
        .collect();
    for (at, ms) in p.late.iter().filter(|(at, _)| *at >= start) {
        let m = out.entry((*at - start).as_secs()).or_default();
        m.late_ms = m.late_ms.max(*ms);
    }
    out
}

/// One clock tick of `/proc` CPU times, in ms (USER_HZ, 100 on Linux).
const TICK_MS: f64 = 1000.0 / 100.0;

/// The machine's CPU ticks since boot from `/proc/stat` (user, nice,
/// system, idle, iowait, irq, softirq, steal), and how many CPUs.
fn machine_ticks() -> (Vec<u64>, usize) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // All eight or none: a field that does not parse must not shift the
    // others.
    let ticks = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .and_then(|l| {
            l.split_whitespace()
                .skip(1)
                .take(8)
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()
        })
        .unwrap_or_default();
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    (ticks, cpus)
}

/// CPU time (ms) this bench process (the load generator) has used.
fn own_cpu_ms() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_cpu_ms(&s))
        .unwrap_or(0.0)
}

/// User + system CPU time (ms) from the text of a `/proc/…/stat` file:
/// after the ")" that ends the name, utime and stime are the 12th and
/// 13th fields.
fn stat_cpu_ms(stat: &str) -> Option<f64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) * TICK_MS)
}

/// How busy the whole machine was over the open-loop run, and what the
/// load generator itself cost per request: a p99 taken on a machine that
/// had no CPU to spare says so beside it.
fn report_machine(before: &(Vec<u64>, usize), after: &(Vec<u64>, usize), own_ms: f64, sent: u64) {
    if before.0.len() < 8 || after.0.len() < 8 || sent == 0 {
        return;
    }
    let d: Vec<f64> = (0..8)
        .map(|i| after.0[i].saturating_sub(before.0[i]) as f64)
        .collect();
    let total: f64 = d.iter().sum();
    if total == 0.0 {
        return;
    }
    let pct = |x: f64| 100.0 * x / total;
    println!(
        "  machine over the run: {} CPUs {:.0} % busy (user {:.0} %, system {:.0} %, irq {:.0} %, iowait {:.0} %, steal {:.0} %); the load generator {:.3} ms CPU per request",
        after.1,
        pct(total - d[3] - d[4]),
        pct(d[0] + d[1]),
        pct(d[2]),
        pct(d[5] + d[6]),
        pct(d[4]),
        pct(d[7]),
        own_ms / sent as f64
    );
}

/// CPU time (ms) of each thread of `pid`, summed by thread name with its
/// number stripped (`worker-7` → `worker`), from `/proc/<pid>/task`.
fn cpu_by_thread(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(t.path().join("comm")),
            std::fs::read_to_string(t.path().join("stat")),
        ) else {
            continue;
        };
        let Some(ms) = stat_cpu_ms(&stat) else {
            continue;
        };
        let name = comm.trim().trim_end_matches(|c: char| c.is_ascii_digit());
        *out.entry(name.trim_end_matches('-').to_owned())
            .or_insert(0.0) += ms;
    }
    out
}

/// Prints the daemon's CPU per request, by thread, between two readings.
fn report_cpu(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
    requests: u64,
) {
    let mut parts: Vec<(f64, &str)> = after
        .iter()
        .map(|(k, v)| {
            (
                (v - before.get(k).unwrap_or(&0.0)) / requests as f64,
                k.as_str(),
            )
        })
        .filter(|(ms, _)| *ms >= 0.001)
        .collect();
    let total: f64 = parts.iter().map(|(ms, _)| ms).sum();
    parts.sort_by(|a, b| b.0.total_cmp(&a.0));
    let list: Vec<String> = parts.iter().map(|(ms, k)| format!("{k} {ms:.3}")).collect();
    println!(
        "  daemon CPU per request: {total:.3} ms ({})",
        list.join(", ")
    );
}

/// Bytes that the database at `path` holds in its newest committed state:
/// pages in use times the page size, the WAL's pages included (SQLite
/// answers for the reader's snapshot), so it does not depend on when the
/// daemon last checkpointed.
fn db_bytes(path: &std::path::Path) -> u64 {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open a database read-only");
    let q = |p: &str| -> i64 {
        c.query_row(&format!("PRAGMA {p}"), [], |r| r.get(0))
            .expect("pragma")
    };
    ((q("page_count") - q("freelist_count")) * q("page_size")) as u64
}

/// How much `fhir.db` and `audit.db` grew per request between `before`
/// and now (docs/operations.md, "Disk growth").
fn report_growth(data: &std::path::Path, before: &[u64; 2], requests: u64) {
    let now = [
        db_bytes(&data.join("fhir.db")),
        db_bytes(&data.join("audit.db")),
    ];
    let per = |i: usize| now[i].saturating_sub(before[i]) as f64 / requests.max(1) as f64;
    println!(
        "  disk growth per request: fhir.db {:.0} B, audit.db {:.0} B ({:.1} MB/s at 2,000/s)",
        per(0),
        per(1),
        (per(0) + per(1)) * 2000.0 / 1e6
    );
}

/// The daemon's warnings and errors so far (its log level is `warn`), so
/// that a run's stall can be matched with what the daemon said about it.
fn report_warnings(d: &Daemon) {
    let log = d.log.lock().map(|l| l.clone()).unwrap_or_default();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    println!("  daemon warnings and errors: {}", said.len());
    for l in said.iter().take(8) {
        println!("    {l}");
    }
}

fn main() {
    fsync_probe(env_n("BENCH_FSYNC_SECS", 10));
    let devices = env_n("BENCH_DEVICES", 200) as usize;
    let secs = env_n("BENCH_SECS", 60);
    let conns = env_n("BENCH_CONNS", 32) as usize;
    start_to_ready(env_n("BENCH_STARTS", 15) as usize);
    let (b, d, device) = ingest_box(devices);
    let sizes = [
        db_bytes(&b.data.join("fhir.db")),
        db_bytes(&b.data.join("audit.db")),
    ];
    let admin = token(&b, "bench-admin", "admin", "clinic-a", &[]);
    let scrape = || d.get("/metrics", Some(&admin), &[]).text();
    let metrics_before = scrape();
    // The probe's idle baseline: 2 s with the daemon up and nothing sent.
    let probe = SpeedProbe::start();
    let probe_start = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let (o, [before, after]) = open_loop(&d, &device, devices, secs);
    // And 2 s idle after it.
    std::thread::sleep(Duration::from_secs(2));
    let (probed, realtime) = probe.finish();
    let machine = machine_by_second(&probed, o.start);
    let idle = |from, to| {
        probed
            .idle(from, to)
            .map(|(us, ns)| format!("piece {us:.1} µs, memory {ns:.0} ns per link"))
            .unwrap_or_else(|| "no readings".into())
    };
    // The idle spells: the 2 s before the load generator set up, and the
    // 2 s after the run less its first half second (the daemon's last
    // answers and checkpoints).
    let end = o.start + Duration::from_secs_f64(o.secs);
    println!(
        "speed probe: daemon idle before the run {}; idle after it {}; during the run {} (the memory walk then includes the daemon's own load on the caches: compare it only with runs at the same rate); real-time priority for the piece and the stall watch: {}",
        idle(probe_start, probe_start + Duration::from_secs(2)),
        idle(end + Duration::from_millis(500), Instant::now()),
        idle(o.start, end),
        if realtime {
            "yes"
        } else {
            "no (its wake-ups also wait for a CPU)"
        }
    );
    let metrics_after = scrape();
    let sent = o.sent;
    report(
        &format!(
            "ingest, open loop, {devices} devices at 10 Hz (target {}/s)",
            devices * 10
        ),
        o,
        &machine,
    );
    report_stages(&metrics_before, &metrics_after);
    report_cpu(&before.daemon, &after.daemon, sent);
    report_machine(
        &before.machine,
        &after.machine,
        after.own_ms - before.own_ms,
        sent,
    );
    report_growth(&b.data, &sizes, sent);
    report_warnings(&d);
    report(
        &format!("ingest, closed loop, {conns} connections back to back"),
        closed_loop(&d, &device, conns, devices, 15),
        &Default::default(),
    );
    let (status, _) = d.stop();
    assert!(status.success());
}
