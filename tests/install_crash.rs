//! Scope: crash safety of `plugin install`. A fail-point aborts the real
//! binary (SIGABRT, no cleanup, like kill -9 or a power cut) at every step of
//! the install protocol; afterwards exactly the old or the new version is
//! installed, complete and verifiable, and a plain retry finishes the job.

mod common;

use common::*;
use sha2::{Digest, Sha256};

/// Every fail-point on the install path, in protocol order, with the version
/// that must be current after a crash there.
const STEPS: &[(&str, &str)] = &[
    ("install.begin", "1.0.0"),
    ("install.blob.tmp-created", "1.0.0"),
    ("install.blob.tmp-written", "1.0.0"),
    ("install.blob.tmp-synced", "1.0.0"),
    ("install.blob.renamed", "1.0.0"),
    ("install.blob.dir-synced", "1.0.0"),
    ("install.before-commit", "1.0.0"),
    ("install.committed", "2.0.0"),
    ("install.done", "2.0.0"),
];

/// Checks that the current version's stored bundle is complete: its file
/// exists, hashes to what state.db recorded, and verifies with the vendor key.
fn assert_current_is_whole(b: &TestBox, vendor: &Vendor) {
    let list = b.json(&["plugin", "list"]);
    let p = &list[0];
    let file = p["file"].as_str().unwrap();
    let bytes = std::fs::read(file).expect("current bundle file exists");
    let digest = p["digest"].as_str().unwrap();
    assert!(file.ends_with(&format!("{digest}.cbx")));
    let out = b.run(&[
        "bundle",
        "verify",
        "--pub",
        vendor.pub_path.to_str().unwrap(),
        file,
    ]);
    assert!(
        out.status.success(),
        "stored bundle does not verify: {}",
        stderr(&out)
    );
    let v = b.json(&[
        "bundle",
        "verify",
        "--pub",
        vendor.pub_path.to_str().unwrap(),
        file,
    ]);
    assert_eq!(v["manifest_sha256"], digest);
    assert_eq!(
        v["bundle_sha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(&bytes))
    );
}

#[test]
fn a_crash_at_every_install_step_leaves_old_or_new_never_a_mix() {
    for &(step, expect) in STEPS {
        let b = TestBox::new();
        let acme = Vendor::new(b.tmp.path(), "acme");
        b.trust(&acme, "acme/");
        let v1 = b.file(
            "v1.cbx",
            &signed_bundle("acme/news2", "1.0.0", &[&acme.key]),
        );
        let v2 = b.file(
            "v2.cbx",
            &signed_bundle("acme/news2", "2.0.0", &[&acme.key]),
        );
        b.ok(&["plugin", "install", v1.to_str().unwrap()]);

        let out = b.run_env(
            &["plugin", "install", v2.to_str().unwrap()],
            &[("CLINICBOX_FAILPOINT", step)],
        );
        assert!(!out.status.success(), "{step}: install did not crash");
        assert!(
            stderr(&out).contains(&format!("fail-point {step} reached")),
            "{step}: fail-point never fired: {}",
            stderr(&out)
        );

        // Exactly one version is installed, the expected one, and it is whole.
        assert_eq!(
            b.installed(),
            vec![("acme/news2".into(), expect.into())],
            "after crash at {step}"
        );
        assert_current_is_whole(&b, &acme);

        // A retry completes the install and leaves no debris behind.
        b.ok(&["plugin", "install", v2.to_str().unwrap()]);
        let list = b.json(&["plugin", "list"]);
        assert_eq!(list[0]["version"], "2.0.0", "{step}");
        assert_eq!(
            list[0]["previous_version"], "1.0.0",
            "{step}: previous version not kept"
        );
        assert_current_is_whole(&b, &acme);
        let files: Vec<String> = std::fs::read_dir(b.data.join("plugins"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            files.len(),
            2,
            "{step}: expected exactly v1 and v2 bundle files, found {files:?}"
        );
        assert!(
            files
                .iter()
                .all(|f| f.ends_with(".cbx") && !f.starts_with('.')),
            "{files:?}"
        );
    }
}
