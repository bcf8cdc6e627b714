//! `clinicbox run` as a child process for end-to-end tests: started on
//! 127.0.0.1 with an OS-chosen port (read back from its stderr), spoken to
//! with a real HTTP client, and stopped with real signals.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::TestBox;

/// A running daemon.
pub struct Daemon {
    pub child: Child,
    pub base: String,
    pub log: Arc<Mutex<String>>,
    agent: ureq::Agent,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): status {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The daemon's config for tests: any free port, a fast inbox, short drain.
pub const TEST_CONFIG: &str =
    "[api]\nlisten = \"127.0.0.1:0\"\n[daemon]\ninbox_poll_ms = 100\ndrain_secs = 10\n";

impl Daemon {
    /// Writes `config` to the box's config file and starts `clinicbox run`,
    /// waiting until it listens.
    pub fn start(b: &TestBox, config: &str, env: &[(&str, &str)]) -> Daemon {
        std::fs::write(&b.config, config).expect("config");
        let mut cmd: Command = b.cmd();
        cmd.arg("run")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn clinicbox run");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("clinicbox: serving on ") {
                    let _ = tx.send(addr.to_owned());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("daemon did not start: {}", log.lock().unwrap()));
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Daemon {
            child,
            base,
            log,
            agent,
        }
    }

    pub fn addr(&self) -> String {
        self.base
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_owned()
    }

    fn answer(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
        let mut resp = resp.expect("HTTP exchange");
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_vec()
            .expect("body");
        Answer {
            status,
            headers,
            body,
        }
    }

    /// GET with an optional bearer token and extra headers.
    pub fn get(&self, path: &str, token: Option<&str>, headers: &[(&str, &str)]) -> Answer {
        let mut r = self.agent.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        Self::answer(r.call())
    }

    /// POST a body with an optional bearer token.
    pub fn post(&self, path: &str, token: Option<&str>, body: &[u8]) -> Answer {
        let mut r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json");
        if let Some(t) = token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        Self::answer(r.send(body))
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -{sig} failed");
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                std::thread::sleep(Duration::from_millis(100));
                let log = self.log.lock().unwrap().clone();
                return (s, log);
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not stop: {}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `f` holds (polling), or panics with `what` and the log.
    pub fn wait_for(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a token with the CLI and returns it.
pub fn token(b: &TestBox, name: &str, role: &str, tenant: &str, scopes: &[&str]) -> String {
    let mut args = vec![
        "token", "create", "--name", name, "--role", role, "--tenant", tenant,
    ];
    for s in scopes {
        args.push("--scope");
        args.push(s);
    }
    b.json(&args)["token"]
        .as_str()
        .expect("token in JSON")
        .to_owned()
}

/// Audit records of `kind`, parsed, from the box's audit.db.
pub fn records(b: &TestBox, kind: &str) -> Vec<Value> {
    let conn = rusqlite::Connection::open(b.data.join("audit.db")).expect("audit.db");
    let mut stmt = conn
        .prepare("SELECT body FROM log WHERE kind = ?1 ORDER BY seq")
        .expect("query");
    stmt.query_map([kind], |r| r.get::<_, String>(0))
        .expect("rows")
        .map(|b| serde_json::from_str(&b.expect("row")).expect("record body is JSON"))
        .collect()
}
