//! Scope: the command line as clinic IT and vendors use it — init, keys,
//! the pack/sign/verify/inspect flow, trust management, plugin lifecycle
//! (install, list, rollback, remove, history), config errors, exit codes and
//! the demo.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_is_idempotent_and_private() {
    let b = TestBox::new();
    let first = b.json(&["init"]);
    let second = b.json(&["init"]);
    assert_eq!(
        first["created_identity"], false,
        "TestBox::new already ran init"
    );
    assert_eq!(first["identity_key_id"], second["identity_key_id"]);
    assert_eq!(mode(&b.data), 0o700);
    assert_eq!(mode(&b.data.join("identity.key")), 0o600);
    assert_eq!(mode(&b.data.join("state.db")), 0o600);
    assert_eq!(mode(&b.data.join("plugins")), 0o700);
}

#[test]
fn commands_refuse_an_uninitialised_data_dir() {
    let b = TestBox::new();
    let out = Command::new(env!("CARGO_BIN_EXE_clinicbox"))
        .args(["--config", b.config.to_str().unwrap(), "--data-dir"])
        .arg(b.path("typo"))
        .args(["plugin", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6));
    assert!(
        stderr(&out).contains("is not initialised"),
        "{}",
        stderr(&out)
    );
    assert!(
        !b.path("typo").exists(),
        "a typo must not create a data dir"
    );
}

#[test]
fn key_generate_writes_private_key_and_refuses_to_overwrite() {
    let b = TestBox::new();
    let prefix = b.path("vendor");
    let r = b.json(&["key", "generate", "--out", prefix.to_str().unwrap()]);
    assert_eq!(r["key_id"].as_str().unwrap().len(), 64);
    assert_eq!(mode(&b.path("vendor.key")), 0o600);
    let text = std::fs::read_to_string(b.path("vendor.pub")).unwrap();
    assert!(text.contains("clinicbox-ed25519-public-v1 "), "{text}");
    let out = b.run(&["key", "generate", "--out", prefix.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refusing to overwrite"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn vendor_flow_pack_sign_twice_verify_inspect_install() {
    let b = TestBox::new();
    let k1 = Vendor::new(b.tmp.path(), "k1");
    let k2 = Vendor::new(b.tmp.path(), "k2");
    let wasm = b.file("news2.wasm", &example_wasm());
    let manifest = repo().join("plugins/news2/plugin.toml");
    let out = b.path("news2.cbx");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    b.ok(&[
        "bundle",
        "pack",
        "--manifest",
        &s(&manifest),
        "--wasm",
        &s(&wasm),
        "--out",
        &s(&out),
        "--valid-days",
        "30",
    ]);
    // Unsigned: verification refuses it.
    let r = b.run(&["bundle", "verify", "--pub", &s(&k1.pub_path), &s(&out)]);
    assert_eq!(r.status.code(), Some(3));
    b.ok(&["bundle", "sign", "--key", &s(&k1.key_path), &s(&out)]);
    b.ok(&["bundle", "sign", "--key", &s(&k2.key_path), &s(&out)]);
    let again = b.run(&["bundle", "sign", "--key", &s(&k1.key_path), &s(&out)]);
    assert!(
        stderr(&again).contains("has already signed this bundle"),
        "{}",
        stderr(&again)
    );

    let i = b.json(&["bundle", "inspect", &s(&out)]);
    assert_eq!(i["verified"], false);
    assert_eq!(i["signer_hints"], serde_json::json!([k1.id(), k2.id()]));
    assert_eq!(i["manifest"]["name"], "acme/news2");
    assert_eq!(
        i["manifest"]["exports"],
        serde_json::json!(["news2", "news2_latest"])
    );
    assert_eq!(i["wasm_sha256"], i["manifest"]["wasm"]["sha256"]);

    let v = b.json(&["bundle", "verify", "--pub", &s(&k2.pub_path), &s(&out)]);
    assert_eq!(v["signers"], serde_json::json!([k2.id()]));

    // Trust store with threshold 2 over both keys: verify and install.
    b.ok(&[
        "trust",
        "add",
        "--namespace",
        "acme/",
        "--threshold",
        "2",
        &s(&k1.pub_path),
    ]);
    let r = b.run(&["bundle", "verify", &s(&out)]);
    assert_eq!(
        r.status.code(),
        Some(3),
        "threshold 2 with one trusted key must fail"
    );
    b.ok(&["trust", "add", "--namespace", "acme/*", &s(&k2.pub_path)]);
    let v = b.json(&["bundle", "verify", &s(&out)]);
    assert_eq!(v["signers"].as_array().unwrap().len(), 2);
    let r = b.json(&["plugin", "install", &s(&out)]);
    assert_eq!(r["outcome"], "installed");

    let t = b.json(&["trust", "list"]);
    assert_eq!(t["thresholds"]["acme/"], 2);
    assert_eq!(t["keys"].as_array().unwrap().len(), 2);
}

#[test]
fn rollback_swaps_to_the_kept_version_and_back() {
    let b = TestBox::new();
    let acme = Vendor::new(b.tmp.path(), "acme");
    b.trust(&acme, "acme/");
    for v in ["1.0.0", "1.1.0", "2.0.0"] {
        let p = b.file(
            &format!("{v}.cbx"),
            &signed_bundle("acme/news2", v, &[&acme.key]),
        );
        b.ok(&["plugin", "install", p.to_str().unwrap()]);
    }
    // Only one previous version is kept: 1.0.0's file is gone.
    assert_eq!(
        std::fs::read_dir(b.data.join("plugins")).unwrap().count(),
        2
    );
    let r = b.json(&["plugin", "rollback", "acme/news2"]);
    assert_eq!(
        (r["from"].as_str(), r["to"].as_str()),
        (Some("2.0.0"), Some("1.1.0"))
    );
    assert_eq!(b.installed(), vec![("acme/news2".into(), "1.1.0".into())]);
    b.ok(&["plugin", "rollback", "acme/news2"]);
    assert_eq!(b.installed(), vec![("acme/news2".into(), "2.0.0".into())]);
    // Reinstalling the current version after a rollback round-trip is a no-op.
    let r = b.json(&["plugin", "install", b.path("2.0.0.cbx").to_str().unwrap()]);
    assert_eq!(r["outcome"], "already-installed");
    let actions: Vec<String> = b
        .decisions()
        .iter()
        .map(|d| {
            format!(
                "{} {}",
                d["action"].as_str().unwrap(),
                d["outcome"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            "install accepted",
            "install accepted",
            "install accepted",
            "rollback accepted",
            "rollback accepted",
            "install no-op"
        ]
    );
}

#[test]
fn rollback_does_not_revive_a_bundle_whose_key_was_revoked() {
    let b = TestBox::new();
    let old = Vendor::new(b.tmp.path(), "old");
    let new = Vendor::new(b.tmp.path(), "new");
    b.trust(&old, "acme/");
    b.trust(&new, "acme/");
    let p1 = b.file("1.cbx", &signed_bundle("acme/news2", "1.0.0", &[&old.key]));
    let p2 = b.file("2.cbx", &signed_bundle("acme/news2", "2.0.0", &[&new.key]));
    b.ok(&["plugin", "install", p1.to_str().unwrap()]);
    b.ok(&["plugin", "install", p2.to_str().unwrap()]);
    b.ok(&["trust", "revoke", &old.id()]);
    let before = b.snapshot();
    let out = b.run(&["plugin", "rollback", "acme/news2"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the kept previous version no longer verifies"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("was revoked at"), "{}", stderr(&out));
    assert!(b.snapshot() == before);
}

#[test]
fn remove_keeps_the_floor_and_unknown_names_exit_4() {
    let b = TestBox::new();
    let acme = Vendor::new(b.tmp.path(), "acme");
    b.trust(&acme, "acme/");
    let p = b.file("1.cbx", &signed_bundle("acme/news2", "1.0.0", &[&acme.key]));
    b.ok(&["plugin", "install", p.to_str().unwrap()]);
    b.ok(&["plugin", "remove", "acme/news2"]);
    assert!(b.installed().is_empty());
    assert_eq!(
        std::fs::read_dir(b.data.join("plugins")).unwrap().count(),
        0
    );
    // The same version may come back (it is the floor, not below it).
    b.ok(&["plugin", "install", p.to_str().unwrap()]);
    let out = b.run(&["plugin", "remove", "acme/nothing"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let out = b.run(&["plugin", "rollback", "../etc"]);
    assert!(
        stderr(&out).contains("contains a path component"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn trust_add_refuses_bad_namespaces_thresholds_and_key_files() {
    let b = TestBox::new();
    let acme = Vendor::new(b.tmp.path(), "acme");
    let pubp = acme.pub_path.to_str().unwrap();
    for (args, want) in [
        (vec!["--namespace", "ACME/"], "uppercase"),
        (vec!["--namespace", "*"], "must be vendor/ or vendor/name"),
        (
            vec!["--namespace", "acme/", "--threshold", "0"],
            "--threshold 0 is outside",
        ),
    ] {
        let mut a = vec!["trust", "add"];
        a.extend(args);
        a.push(pubp);
        let out = b.run(&a);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(want), "{want}: {}", stderr(&out));
    }
    // A secret key file given where a public one belongs is named as such.
    let out = b.run(&[
        "trust",
        "add",
        "--namespace",
        "acme/",
        acme.key_path.to_str().unwrap(),
    ]);
    assert!(
        stderr(&out).contains("acme.key:2: expected a clinicbox-ed25519-public-v1 line"),
        "{}",
        stderr(&out)
    );
    let out = b.run(&["trust", "revoke", "abc"]);
    assert!(
        stderr(&out).contains("at least 8 hex digits"),
        "{}",
        stderr(&out)
    );
    assert!(
        b.json(&["trust", "list"])["keys"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn config_errors_name_the_field_and_exit_5() {
    let b = TestBox::new();
    std::fs::write(&b.config, "[limits]\nmax_bundle_mib = 0\n").unwrap();
    let out = b.run(&["plugin", "list"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(
        stderr(&out).contains("field `limits.max_bundle_mib`: 0 is outside"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&b.config, "colour = \"blue\"\n").unwrap();
    let out = b.run(&["plugin", "list"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(
        stderr(&out).contains("unknown field `colour`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn demo_runs_the_whole_walkthrough_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_clinicbox"))
            .current_dir(tmp.path())
            .env_remove("CLINICBOX_DATA_DIR")
            .args(["--config", "/dev/null", "--json", "demo", "--no-serve"])
            .output()
            .unwrap()
    };
    let mut records = 0;
    for round in 0..2 {
        let out = run();
        assert!(out.status.success(), "round {round}: {}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let list = &v["plugins"];
        assert_eq!(list[0]["name"], "acme/allergy-check");
        assert_eq!(list[0]["version"], "0.1.0");
        assert_eq!(list[1]["name"], "acme/news2");
        assert_eq!(list[1]["version"], "0.4.0");
        assert_eq!(v["risk_assessment"]["resourceType"], "RiskAssessment");
        assert_eq!(
            v["risk_assessment"]["subject"]["reference"],
            "Patient/p0002"
        );
        // The audit log verifies and grows on each run (a new call).
        let n = v["audit"]["records"].as_i64().unwrap();
        assert!(n > records, "round {round}: {n} records");
        records = n;
        if round == 1 {
            assert!(stderr(&out).contains("already installed, nothing changed"));
        }
    }
    assert!(tmp.path().join("clinicbox-demo/state.db").is_file());
}
