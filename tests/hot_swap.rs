//! Scope: hot swap under load. Several threads call a plugin while new
//! versions are installed (20 swaps) and rolled back; every call succeeds,
//! and every answer comes whole from the version the runtime says served it
//! (the output names its own version).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clinicbox::datadir::DataDir;
use clinicbox::limits::Limits;
use clinicbox::runtime::{CallRequest, Runtime};
use common::*;

fn versioned(version: &str) -> Vec<u8> {
    let body = format!(
        r#"(data (i32.const 0) "{version}")
           (func (export "version") (result i32)
             (call $out_block (call $to_kernel (i32.const 0) (i32.const {len}))) (i32.const 0))"#,
        len = version.len()
    );
    wat("", &body)
}

#[test]
fn calls_from_many_threads_survive_twenty_swaps_and_rollbacks() {
    let b = TestBox::new();
    let acme = Vendor::new(b.tmp.path(), "acme");
    b.trust(&acme, "acme/");
    let install = |v: &str| {
        let bundle = custom_bundle("acme/swap", v, &versioned(v), &["version"], &[], &acme.key);
        let p = b.file(&format!("swap-{v}.cbx"), &bundle);
        b.ok(&["plugin", "install", p.to_str().unwrap()]);
    };
    install("1.0.0");
    let rt = Arc::new(Runtime::new(DataDir::new(&b.data), Limits::default()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let (rt, stop) = (rt.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = std::collections::BTreeSet::new();
                let mut calls = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let req = CallRequest {
                        tenant: "clinic-a".into(),
                        patient: format!("p{}", calls % 3 + t),
                        requester: "test".into(),
                        purpose: "TREAT".into(),
                        plugin: "acme/swap".into(),
                        function: "version".into(),
                        input: Vec::new(),
                    };
                    let out = rt
                        .call(&req)
                        .unwrap_or_else(|e| panic!("call {calls} of thread {t} failed: {e}"));
                    let said = String::from_utf8(out.output).unwrap();
                    assert_eq!(said, out.version, "a call was served by a mix of versions");
                    seen.insert(out.version);
                    calls += 1;
                }
                (calls, seen)
            })
        })
        .collect();
    for minor in 1..=20 {
        install(&format!("1.{minor}.0"));
    }
    for _ in 0..4 {
        b.ok(&["plugin", "rollback", "acme/swap"]);
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut versions = std::collections::BTreeSet::new();
    for w in workers {
        let (calls, seen) = w.join().expect("a worker failed");
        total += calls;
        versions.extend(seen);
    }
    assert!(total > 0);
    assert!(
        versions.len() >= 3,
        "swaps were not observed by callers: {versions:?}"
    );
    // After an even number of rollbacks the newest version serves again.
    assert_eq!(b.installed(), vec![("acme/swap".into(), "1.20.0".into())]);
    eprintln!("{total} calls, {} versions observed", versions.len());
}
