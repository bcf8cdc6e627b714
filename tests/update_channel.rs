//! The vendor update channel against a real HTTPS static server on
//! 127.0.0.1: an index made with `clinicbox bundle index` is fetched and
//! its bundles installed; a stale index, a rolled-back index, an oversize
//! download, a digest mismatch, a foreign namespace and an untrusted signer
//! are each refused with their reason, recorded, and change nothing.

mod common;

use std::path::Path;

use clinicbox::limits::Limits;
use common::daemon::{Daemon, TEST_CONFIG, records, token};
use common::upstream::{CertKind, Upstream};
use common::{TestBox, Vendor, signed_bundle, stderr};

struct Channel {
    b: TestBox,
    vendor: Vendor,
    up: Upstream,
    config: String,
}

impl Channel {
    fn new() -> Channel {
        let b = TestBox::new();
        let vendor = Vendor::new(b.tmp.path(), "acme");
        b.trust(&vendor, "acme/");
        let up = Upstream::start(b.tmp.path(), CertKind::Good);
        let config = format!(
            "[updates]\nurl = \"{}/updates\"\nca_file = \"{}\"\ninterval_secs = 1\n",
            up.url,
            up.ca_pem.display()
        );
        std::fs::write(&b.config, &config).unwrap();
        Channel {
            b,
            vendor,
            up,
            config,
        }
    }

    /// Publishes `bytes` under `file` (what the server sends may differ
    /// from what the index signs: `served`).
    fn serve(&self, file: &str, served: &[u8]) {
        self.up
            .files
            .lock()
            .unwrap()
            .insert(format!("/fhir/updates/{file}"), served.to_vec());
    }

    /// Writes the bundles to disk, indexes them with the CLI (signed by
    /// `key_path`), and publishes the index.
    fn publish(&self, version: u64, bundles: &[(&str, &[u8])], key_path: &Path) {
        let mut args = vec![
            "bundle".to_owned(),
            "index".into(),
            "--key".into(),
            key_path.display().to_string(),
            "--index-version".into(),
            version.to_string(),
            "--out".into(),
            self.b.path("index.json").display().to_string(),
        ];
        for (file, bytes) in bundles {
            let p = self.b.file(&format!("pub/{file}"), bytes);
            args.push(p.display().to_string());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.b.ok(&refs);
        self.serve(
            "index.json",
            &std::fs::read(self.b.path("index.json")).unwrap(),
        );
    }

    fn update(&self) -> std::process::Output {
        self.b.run(&["update"])
    }
}

#[test]
fn update_channel_installs_and_refuses_stale_rollback_oversize_and_substitutes() {
    let c = Channel::new();
    let v1 = signed_bundle("acme/vitals", "1.0.0", &[&c.vendor.key]);
    c.serve("acme-vitals-1.0.0.cbx", &v1);
    c.publish(5, &[("acme-vitals-1.0.0.cbx", &v1)], &c.vendor.key_path);
    let out = c.update();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        c.b.installed(),
        vec![("acme/vitals".into(), "1.0.0".into())]
    );
    // Polling again changes nothing.
    assert!(c.update().status.success());
    assert_eq!(c.b.decisions().len(), 1);

    // Rollback: an older index version, even if correctly signed.
    let v2 = signed_bundle("acme/vitals", "2.0.0", &[&c.vendor.key]);
    c.serve("acme-vitals-2.0.0.cbx", &v2);
    c.publish(4, &[("acme-vitals-2.0.0.cbx", &v2)], &c.vendor.key_path);
    let out = c.update();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("rollback: version 4 is older than version 5"),
        "{}",
        stderr(&out)
    );

    // Stale: past its expiry (built with the library: the CLI only makes
    // fresh indexes).
    let key = clinicbox::keys::read_secret(&c.vendor.key_path, 4096).unwrap();
    let p = c.b.file("pub/acme-vitals-2.0.0.cbx", &v2);
    let past = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let stale =
        clinicbox::update::build_index(&[p.as_path()], 9, past, &key, &Limits::default()).unwrap();
    c.serve("index.json", &stale);
    let out = c.update();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("stale: it expired at"),
        "{}",
        stderr(&out)
    );

    // Oversize: the server sends more than the index signs.
    c.publish(6, &[("acme-vitals-2.0.0.cbx", &v2)], &c.vendor.key_path);
    let mut bigger = v2.clone();
    bigger.extend_from_slice(&[0u8; 4096]);
    c.serve("acme-vitals-2.0.0.cbx", &bigger);
    let out = c.update();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("oversize"), "{}", stderr(&out));

    // Digest mismatch: same size, other bytes.
    let mut swapped = v2.clone();
    let n = swapped.len();
    swapped[n - 10] ^= 0xff;
    c.serve("acme-vitals-2.0.0.cbx", &swapped);
    let out = c.update();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("digest mismatch"), "{}", stderr(&out));
    assert_eq!(
        c.b.installed(),
        vec![("acme/vitals".into(), "1.0.0".into())],
        "a refused download was installed"
    );

    // A key trusted for acme/ cannot publish for other/.
    let other = signed_bundle("other/x", "1.0.0", &[&c.vendor.key]);
    c.publish(7, &[("other-x.cbx", &other)], &c.vendor.key_path);
    let out = c.update();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("outside every namespace"),
        "{}",
        stderr(&out)
    );
    // An untrusted signer.
    let stranger = Vendor::new(c.b.tmp.path(), "stranger");
    c.publish(8, &[("acme-vitals-2.0.0.cbx", &v2)], &stranger.key_path);
    let out = c.update();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no signature by a trusted"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        c.b.installed(),
        vec![("acme/vitals".into(), "1.0.0".into())],
        "a refused index installed something"
    );

    // The honest index and bundle again: installed, and the report says
    // so per bundle.
    c.serve("acme-vitals-2.0.0.cbx", &v2);
    c.publish(8, &[("acme-vitals-2.0.0.cbx", &v2)], &c.vendor.key_path);
    let out = c.b.run(&["--json", "update"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["index_version"], 8);
    assert_eq!(report["installed"], 1);
    assert_eq!(
        report["bundles"][0],
        serde_json::json!({"file": "acme-vitals-2.0.0.cbx", "outcome": "installed",
                           "plugin": "acme/vitals", "version": "2.0.0", "install": "installed"})
    );
    assert_eq!(
        c.b.installed(),
        vec![("acme/vitals".into(), "2.0.0".into())]
    );
    // An admin's rollback stays: the channel brings back only newer releases.
    c.b.ok(&["plugin", "rollback", "acme/vitals"]);
    assert!(c.update().status.success());
    assert_eq!(
        c.b.installed(),
        vec![("acme/vitals".into(), "1.0.0".into())]
    );

    let refusals: Vec<_> = records(&c.b, "update")
        .into_iter()
        .filter(|r| r["outcome"] == "refused")
        .collect();
    assert_eq!(refusals.len(), 6, "{refusals:?}");
    c.b.ok(&["audit", "verify"]);
}

#[test]
fn the_daemon_polls_the_channel_and_serves_what_it_installed() {
    let c = Channel::new();
    let admin = token(&c.b, "it", "admin", "clinic-a", &[]);
    let d = Daemon::start(&c.b, &format!("{TEST_CONFIG}{}", c.config), &[]);
    let v1 = signed_bundle("acme/vitals", "1.0.0", &[&c.vendor.key]);
    c.serve("acme-vitals-1.0.0.cbx", &v1);
    c.publish(1, &[("acme-vitals-1.0.0.cbx", &v1)], &c.vendor.key_path);
    d.wait_for("the update to be installed and served", || {
        d.get("/status", Some(&admin), &[]).json()["plugins"][0]["version"] == "1.0.0"
    });
    d.wait_for("the install to be counted", || {
        d.get("/metrics", Some(&admin), &[])
            .text()
            .contains("clinicbox_bundles_total{source=\"updates\",outcome=\"accepted\"} 1")
    });
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}
