//! Scope: each example plugin rebuilds to the exact wasm its committed,
//! signed bundle carries, from a copy of its sources in a different
//! directory (so checkout location cannot matter), using the same scripts
//! vendors use (`update-bundles/build-plugin.sh` for Rust, the plugin's own
//! `build.sh` for C).

mod common;

use std::process::Command;

use common::*;
use sha2::{Digest, Sha256};

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name == "target" {
            continue;
        }
        let dest = to.join(&name);
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// The wasm a committed bundle signs, by sha256.
fn signed_wasm_digest(bundle: &std::path::Path) -> String {
    let bytes = std::fs::read(bundle).unwrap();
    clinicbox::bundle::inspect(&bytes, &clinicbox::limits::Limits::default())
        .unwrap()
        .manifest
        .unwrap()
        .wasm
        .sha256
}

#[test]
fn c_example_bundle_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("elsewhere/allergy-check");
    copy_dir(&repo().join("plugins/allergy-check"), &src);
    // Run through bash rather than exec'ing the copy just written: another
    // test's fork can briefly hold it open for writing (ETXTBSY).
    let out = Command::new("bash")
        .arg(src.join("build.sh"))
        .arg(&src)
        .arg(tmp.path().join("out"))
        .output()
        .expect("run allergy-check/build.sh");
    assert!(
        out.status.success(),
        "build.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rebuilt =
        std::fs::read(String::from_utf8(out.stdout).unwrap().trim()).expect("rebuilt wasm");
    assert_eq!(
        hex::encode(Sha256::digest(&rebuilt)),
        signed_wasm_digest(&repo().join("update-bundles/acme-allergy-check.cbx")),
        "rebuilding plugins/allergy-check did not reproduce the signed wasm"
    );
}

#[test]
fn example_bundle_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("elsewhere/news2");
    copy_dir(&repo().join("plugins/news2"), &src);
    let out = Command::new(repo().join("update-bundles/build-plugin.sh"))
        .arg(&src)
        .arg(repo().join("target/plugins-repro"))
        .output()
        .expect("run build-plugin.sh");
    assert!(
        out.status.success(),
        "build-plugin.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wasm_path = String::from_utf8(out.stdout).unwrap();
    let rebuilt = std::fs::read(wasm_path.trim()).expect("rebuilt wasm");

    let committed = example_wasm();
    let bytes = std::fs::read(example_bundle()).unwrap();
    let inspect =
        clinicbox::bundle::inspect(&bytes, &clinicbox::limits::Limits::default()).unwrap();
    let signed_digest = inspect.manifest.unwrap().wasm.sha256;
    assert_eq!(hex::encode(Sha256::digest(&committed)), signed_digest);
    assert_eq!(
        hex::encode(Sha256::digest(&rebuilt)),
        signed_digest,
        "rebuilding plugins/news2 did not reproduce the signed wasm ({} vs {} bytes)",
        rebuilt.len(),
        committed.len()
    );
}
