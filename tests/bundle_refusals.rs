//! Scope: every way `plugin install` must refuse a bundle. Each case checks
//! the exit status (3 = refused), the specific error text, that a
//! `rejected` decision was recorded, and that the state database and the
//! installed bundles are byte-identical afterwards.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clinicbox::bundle::container;
use clinicbox::bundle::envelope::{Envelope, PAYLOAD_TYPE};
use clinicbox::limits::Limits;
use common::*;

/// A box that trusts `acme` for `acme/` and already runs acme/news2 1.0.0,
/// so "nothing changed" covers a real installed state.
fn setup() -> (TestBox, Vendor) {
    let b = TestBox::new();
    let acme = Vendor::new(b.tmp.path(), "acme");
    b.trust(&acme, "acme/");
    let v1 = b.file(
        "v1.cbx",
        &signed_bundle("acme/news2", "1.0.0", &[&acme.key]),
    );
    b.ok(&["plugin", "install", v1.to_str().unwrap()]);
    (b, acme)
}

/// Installs `bytes` and asserts a refusal whose message contains `want`,
/// with nothing changed on disk but the decision log.
fn assert_refused(b: &TestBox, bytes: &[u8], want: &str) {
    assert_refused_env(b, bytes, want, &[]);
}

fn assert_refused_env(b: &TestBox, bytes: &[u8], want: &str, env: &[(&str, &str)]) {
    let before = b.snapshot();
    let decisions_before = b.decisions().len();
    let path = b.file("candidate.cbx", bytes);
    let out = b.run_env(&["plugin", "install", path.to_str().unwrap()], env);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(3),
        "expected refusal (exit 3), got {:?}: {err}",
        out.status
    );
    assert!(err.contains(want), "expected {want:?} in: {err}");
    assert!(
        b.snapshot() == before,
        "state.db or the plugins dir changed after a refusal"
    );
    let decisions = b.decisions();
    assert_eq!(
        decisions.len(),
        decisions_before + 1,
        "refusal not recorded"
    );
    let last = decisions.last().unwrap();
    assert_eq!(last["outcome"], "rejected");
    assert!(last["reason"].as_str().unwrap().contains(want), "{last}");
}

/// Splits bundle bytes into (envelope, wasm) owned copies.
fn parts(bytes: &[u8]) -> (Envelope, Vec<u8>) {
    let p = container::parse(bytes, &Limits::default()).unwrap();
    (serde_json::from_slice(p.envelope).unwrap(), p.wasm.to_vec())
}

#[test]
fn control_a_valid_newer_bundle_is_accepted() {
    // Proves the harness can tell acceptance from refusal.
    let (b, acme) = setup();
    let v2 = b.file(
        "v2.cbx",
        &signed_bundle("acme/news2", "1.1.0", &[&acme.key]),
    );
    b.ok(&["plugin", "install", v2.to_str().unwrap()]);
    assert_eq!(b.installed(), vec![("acme/news2".into(), "1.1.0".into())]);
}

#[test]
fn flipped_byte_in_wasm() {
    let (b, acme) = setup();
    let good = signed_bundle("acme/news2", "1.1.0", &[&acme.key]);
    let (env, mut wasm) = parts(&good);
    let mid = wasm.len() / 2;
    wasm[mid] ^= 0x01;
    let bad = container::build(&env.to_bytes(), &wasm);
    assert_refused(&b, &bad, "step 7 (wasm): module sha256");
}

#[test]
fn flipped_byte_in_manifest() {
    let (b, acme) = setup();
    let good = signed_bundle("acme/news2", "1.1.0", &[&acme.key]);
    let (mut env, wasm) = parts(&good);
    let mut payload = B64.decode(&env.payload).unwrap();
    // Turn "1.1.0" into "1.1.1" inside the signed manifest.
    let at = payload.windows(5).position(|w| w == b"1.1.0").unwrap() + 4;
    payload[at] ^= 0x01;
    env.payload = B64.encode(&payload);
    let bad = container::build(&env.to_bytes(), &wasm);
    assert_refused(&b, &bad, "step 4 (signature): signature 0 claims key");
}

#[test]
fn flipped_byte_in_signature() {
    let (b, acme) = setup();
    let good = signed_bundle("acme/news2", "1.1.0", &[&acme.key]);
    let (mut env, wasm) = parts(&good);
    let mut sig = B64.decode(&env.signatures[0].sig).unwrap();
    sig[10] ^= 0x01;
    env.signatures[0].sig = B64.encode(&sig);
    let bad = container::build(&env.to_bytes(), &wasm);
    assert_refused(&b, &bad, "step 4 (signature): signature 0 claims key");
}

#[test]
fn untrusted_key() {
    let (b, _) = setup();
    let stranger = Vendor::new(b.tmp.path(), "stranger");
    let bad = signed_bundle("acme/news2", "1.1.0", &[&stranger.key]);
    assert_refused(
        &b,
        &bad,
        "step 4 (signature): no signature is by a trusted key",
    );
}

#[test]
fn trusted_key_outside_its_namespace() {
    let (b, acme) = setup();
    let evil = Vendor::new(b.tmp.path(), "evil");
    b.trust(&evil, "evil/");
    let bad = signed_bundle("evil/news2", "1.0.0", &[&acme.key]);
    assert_refused(&b, &bad, "is trusted only for acme/, not for evil/news2");
    // And a key cannot reach into another vendor's namespace either.
    let bad = signed_bundle("acme/news2", "1.1.0", &[&evil.key]);
    assert_refused(&b, &bad, "is trusted only for evil/, not for acme/news2");
}

#[test]
fn threshold_of_two_met_only_by_one_key_twice() {
    let (b, acme) = setup();
    let second = Vendor::new(b.tmp.path(), "acme2");
    b.ok(&[
        "trust",
        "add",
        "--namespace",
        "acme/",
        "--threshold",
        "2",
        second.pub_path.to_str().unwrap(),
    ]);
    let once = signed_bundle("acme/news2", "1.1.0", &[&acme.key]);
    let (mut env, wasm) = parts(&once);
    env.signatures.push(env.signatures[0].clone());
    let twice = container::build(&env.to_bytes(), &wasm);
    assert_refused(
        &b,
        &twice,
        "namespace acme/ needs 2 distinct trusted keys, got 1 (2 signatures; a key counts once)",
    );
    // Control: two distinct keys meet it.
    let both = signed_bundle("acme/news2", "1.1.0", &[&acme.key, &second.key]);
    let p = b.file("both.cbx", &both);
    b.ok(&["plugin", "install", p.to_str().unwrap()]);
    assert_eq!(b.installed(), vec![("acme/news2".into(), "1.1.0".into())]);
}

#[test]
fn revoked_key_stops_counting_at_once() {
    let (b, acme) = setup();
    let bundle = signed_bundle("acme/news2", "1.1.0", &[&acme.key]);
    b.ok(&["trust", "revoke", &acme.id()[..12]]);
    assert_refused(&b, &bundle, "step 6 (trust): key");
    let out = b.run(&[
        "plugin",
        "install",
        b.file("again.cbx", &bundle).to_str().unwrap(),
    ]);
    assert!(stderr(&out).contains("was revoked at"), "{}", stderr(&out));
    // Revocation is permanent.
    let out = b.run(&[
        "trust",
        "add",
        "--namespace",
        "acme/",
        acme.pub_path.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("revocation is permanent"),
        "{}",
        stderr(&out)
    );
}

/// A bundle valid from 10 days ago until 30 days from now (real time).
fn short_lived(key: &ed25519_dalek::SigningKey) -> (Vec<u8>, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    let expires = now + time::Duration::days(30);
    let bytes = signed_bundle_times(
        "acme/news2",
        "1.1.0",
        &[key],
        now - time::Duration::days(10),
        expires,
    );
    (bytes, expires)
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    clinicbox::bundle::manifest::format_time(t)
}

#[test]
fn expired_bundle_even_after_the_clock_is_set_back() {
    let (b, acme) = setup();
    let (bundle, expires) = short_lived(&acme.key);
    let later = expires + time::Duration::days(30);
    // The box's clock reads 30 days past expiry: refused.
    let want = format!("step 8 (expiry): bundle expired at {}", rfc3339(expires));
    assert_refused_env(
        &b,
        &bundle,
        &want,
        &[("CLINICBOX_FAKE_NOW", &rfc3339(later))],
    );
    // Someone sets the system clock back to today: the trusted clock remembers.
    let today = rfc3339(time::OffsetDateTime::now_utc());
    let want = format!("trusted time is {}", rfc3339(later));
    assert_refused_env(&b, &bundle, &want, &[("CLINICBOX_FAKE_NOW", &today)]);
}

#[test]
fn control_the_same_bundle_is_accepted_today() {
    let (b, acme) = setup();
    let (bundle, _) = short_lived(&acme.key);
    let p = b.file("short.cbx", &bundle);
    b.ok(&["plugin", "install", p.to_str().unwrap()]);
    assert_eq!(b.installed(), vec![("acme/news2".into(), "1.1.0".into())]);
}

#[test]
fn downgrade_is_refused_and_same_version_other_content_too() {
    let (b, acme) = setup();
    let v2 = b.file(
        "v2.cbx",
        &signed_bundle("acme/news2", "2.0.0", &[&acme.key]),
    );
    b.ok(&["plugin", "install", v2.to_str().unwrap()]);
    let old = signed_bundle("acme/news2", "1.5.0", &[&acme.key]);
    assert_refused(
        &b,
        &old,
        "step 9 (version floor): acme/news2 1.5.0 is older than 2.0.0",
    );
    let mut different = manifest_json("acme/news2", "2.0.0");
    different["description"] = "same version, different content".into();
    let reused = bundle_with_raw_payload(different.to_string().as_bytes(), PAYLOAD_TYPE, &acme.key);
    assert_refused(
        &b,
        &reused,
        "acme/news2 2.0.0 was already accepted with different content",
    );
    // The floor survives removal: remove, then try the old version again.
    b.ok(&["plugin", "remove", "acme/news2"]);
    assert_refused(&b, &old, "step 9 (version floor)");
}

#[test]
fn same_version_and_digest_again_is_a_no_op() {
    let (b, acme) = setup();
    let before = b.snapshot();
    // Re-signing adds no new content: the manifest digest is the identity.
    let again = b.file(
        "again.cbx",
        &signed_bundle("acme/news2", "1.0.0", &[&acme.key]),
    );
    let r = b.json(&["plugin", "install", again.to_str().unwrap()]);
    assert_eq!(r["outcome"], "already-installed");
    assert!(b.snapshot() == before);
    assert_eq!(b.decisions().last().unwrap()["outcome"], "no-op");
}

#[test]
fn truncated_files() {
    let (b, acme) = setup();
    let good = signed_bundle("acme/news2", "1.1.0", &[&acme.key]);
    for cut in [0, 5, 8, 11, 100, good.len() - 20_000, good.len() - 1] {
        assert_refused(&b, &good[..cut], "step 2 (container): truncated bundle");
    }
}

#[test]
fn trailing_garbage() {
    let (b, acme) = setup();
    let mut bad = signed_bundle("acme/news2", "1.1.0", &[&acme.key]);
    bad.extend_from_slice(b"#!/bin/sh\n");
    assert_refused(&b, &bad, "unexpected trailing bytes");
}

#[test]
fn oversize_file_is_refused_from_its_size_alone() {
    let (b, _) = setup();
    // 1 TiB, sparse. The error quotes its full size, which only `stat` can
    // know: the bounded reader stops at the cap + 1 byte.
    let p = b.path("huge.cbx");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(1 << 40).unwrap();
    let before = b.snapshot();
    let out = b.run(&["plugin", "install", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("step 1 (size)")
            && stderr(&out).contains("1099511627776 bytes, over the limit of 67108864"),
        "{}",
        stderr(&out)
    );
    assert!(b.snapshot() == before);
}

#[test]
fn endless_stream_is_cut_at_the_cap() {
    let (b, _) = setup();
    // A FIFO has no size to stat; the reader must stop at cap + 1 bytes.
    std::fs::write(&b.config, "[limits]\nmax_bundle_mib = 1\n").unwrap();
    let fifo = b.path("endless.cbx");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let writer_path = fifo.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(writer_path)
            .unwrap();
        let chunk = vec![0x41u8; 64 * 1024];
        let mut sent = 0u64;
        // Writes until the reader hangs up (EPIPE) — or 64 MiB as a backstop.
        while sent < 64 << 20 {
            if f.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len() as u64;
        }
        sent
    });
    let out = b.run(&["plugin", "install", fifo.to_str().unwrap()]);
    let sent = writer.join().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("over the limit of 1048576 bytes"),
        "{}",
        stderr(&out)
    );
    assert!(
        sent < 64 << 20,
        "reader consumed the whole stream ({sent} bytes)"
    );
}

#[test]
fn unknown_manifest_field() {
    let (b, acme) = setup();
    let mut m = manifest_json("acme/news2", "1.1.0");
    m["allow_network"] = true.into();
    let bad = bundle_with_raw_payload(m.to_string().as_bytes(), PAYLOAD_TYPE, &acme.key);
    assert_refused(
        &b,
        &bad,
        "step 5 (manifest): malformed manifest: unknown field `allow_network`",
    );
}

#[test]
fn wrong_payload_type() {
    let (b, acme) = setup();
    let m = manifest_json("acme/news2", "1.1.0");
    let bad = bundle_with_raw_payload(
        m.to_string().as_bytes(),
        "application/vnd.in-toto+json",
        &acme.key,
    );
    assert_refused(
        &b,
        &bad,
        "step 3 (envelope): wrong DSSE payloadType \"application/vnd.in-toto+json\"",
    );
}

#[test]
fn path_and_name_tricks_in_the_plugin_name() {
    let (b, acme) = setup();
    // Trust a broad namespace so that only the name check can refuse these.
    for (name, want) in [
        (
            "acme/../../etc/passwd",
            "manifest field `name`: contains a path component",
        ),
        ("/etc/passwd", "manifest field `name`: is an absolute path"),
        (
            "ACME/news2",
            "manifest field `name`: contains uppercase letters",
        ),
        (
            "acme/News2",
            "manifest field `name`: contains uppercase letters",
        ),
        (
            "\u{430}cme/news2",
            "manifest field `name`: contains the non-ASCII character U+0430",
        ),
        (
            "acme/news\u{2082}",
            "manifest field `name`: contains the non-ASCII character U+2082",
        ),
        (
            "acme/news2/../x",
            "manifest field `name`: contains a path component",
        ),
        (
            "acme\\news2",
            "manifest field `name`: contains a path component",
        ),
    ] {
        let m = manifest_json(name, "1.1.0");
        let bad = bundle_with_raw_payload(m.to_string().as_bytes(), PAYLOAD_TYPE, &acme.key);
        assert_refused(&b, &bad, want);
    }
}

#[test]
fn not_a_bundle_at_all() {
    let (b, _) = setup();
    assert_refused(
        &b,
        b"\x7fELF\x02\x01\x01\0\0\0\0\0",
        "not a clinicbox bundle: bad magic",
    );
}

#[test]
fn unsigned_bundle() {
    let (b, _) = setup();
    let (_, bytes) = clinicbox::bundle::pack(
        source("acme/news2", "1.1.0"),
        &example_wasm(),
        CREATED,
        EXPIRES,
        &Limits::default(),
    )
    .unwrap();
    assert_refused(&b, &bytes, "envelope has 0 signatures");
}
