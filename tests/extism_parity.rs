//! Scope: clinicbox's own Extism-ABI host (src/runtime/host.rs) against the
//! `extism` 1.30 crate as the reference. The same real plugins (the Rust
//! NEWS2 plugin and the C allergy check) and a WAT module must give
//! byte-identical outputs and the same guest error messages under both, so
//! a plugin a vendor tested with stock Extism behaves the same on the box.

mod common;

use clinicbox::bundle::container;
use clinicbox::limits::Limits;
use clinicbox::runtime::host::{Failure, HostEngine, Instance, InstanceLimits};
use common::*;

fn ours(wasm: &[u8], exports: &[&str]) -> Instance {
    let engine = HostEngine::new(&Limits::default(), None).expect("engine");
    let module = engine.compile(wasm).expect("compiles");
    let exports: Vec<String> = exports.iter().map(|s| s.to_string()).collect();
    Instance::new(
        &engine,
        &module,
        &exports,
        &[],
        &InstanceLimits {
            plugin: "test/parity".into(),
            memory_bytes: 16 << 20,
            timeout: std::time::Duration::from_secs(10),
            table_elements: 10_000,
            log_bytes_per_call: 16 * 1024,
            log_line_bytes: 2048,
        },
    )
    .expect("instantiates")
}

/// The module under stock extism, with the clinicbox host functions as
/// stubs that fail (the parity cases make no host calls).
fn reference(wasm: &[u8]) -> extism::Plugin {
    let stubs = ["fhir_search", "fhir_read", "audit_note"].map(|name| {
        extism::Function::new(
            name,
            [extism::PTR],
            [extism::PTR],
            extism::UserData::new(()),
            |_, _, _, _| Err(extism::Error::msg("not under test")),
        )
        .with_namespace("extism:host/user")
    });
    let m = extism::Manifest::new([extism::Wasm::data(wasm.to_vec())]);
    extism::Plugin::new(m, stubs, false).expect("extism loads it")
}

/// Runs `function(input)` under both hosts: (ours, extism's), each as
/// Ok(output) or Err(message).
fn both(
    a: &mut Instance,
    b: &mut extism::Plugin,
    function: &str,
    input: &[u8],
) -> (Result<Vec<u8>, String>, Result<Vec<u8>, String>) {
    let x = a.call(function, input, None, 1 << 20).map_err(|e| match e {
        Failure::Guest(m) => m,
        other => format!("not a guest error: {other}"),
    });
    let y = b
        .call::<&[u8], Vec<u8>>(function, input)
        .map_err(|e| e.to_string());
    (x, y)
}

#[test]
fn news2_scores_identically_under_both_hosts() {
    let wasm = example_wasm();
    let mut a = ours(&wasm, &["news2"]);
    let mut b = reference(&wasm);
    let mut inputs = Vec::new();
    // Every RCP chart band edge of every parameter, one parameter at a time.
    for rr in [8, 9, 11, 12, 20, 21, 24, 25] {
        inputs.push(format!(r#"{{"respiratory_rate": {rr}, "spo2": 97, "on_oxygen": false, "systolic_bp": 120, "pulse": 80, "consciousness": "A", "temperature": 37.0}}"#));
    }
    for (spo2, scale, o2) in [
        (91, 1, false),
        (92, 1, false),
        (96, 1, true),
        (83, 2, true),
        (88, 2, false),
        (93, 2, true),
        (97, 2, true),
    ] {
        inputs.push(format!(r#"{{"respiratory_rate": 16, "spo2": {spo2}, "spo2_scale": {scale}, "on_oxygen": {o2}, "systolic_bp": 120, "pulse": 80, "consciousness": "A", "temperature": 37.0, "patient": "Patient/p1"}}"#));
    }
    for (bp, pulse, c, t) in [
        (90, 40, "A", 35.0),
        (91, 41, "C", 35.1),
        (111, 91, "V", 38.1),
        (220, 131, "U", 39.1),
    ] {
        inputs.push(format!(r#"{{"respiratory_rate": 16, "spo2": 97, "on_oxygen": false, "systolic_bp": {bp}, "pulse": {pulse}, "consciousness": "{c}", "temperature": {t}}}"#));
    }
    // Bad input: both must fail with the plugin's own message.
    inputs.push(r#"{"respiratory_rate": "fast"}"#.into());
    inputs.push(r#"{"respiratory_rate": 16, "spo2": 97, "on_oxygen": false, "systolic_bp": 120, "pulse": 80, "consciousness": "A", "temperature": 98.6}"#.into());
    let mut ok = 0;
    for input in &inputs {
        let (x, y) = both(&mut a, &mut b, "news2", input.as_bytes());
        match (&x, &y) {
            (Ok(p), Ok(q)) => {
                assert_eq!(p, q, "outputs differ for {input}");
                let v: serde_json::Value = serde_json::from_slice(p).expect("JSON out");
                assert_eq!(v["resourceType"], "RiskAssessment", "{input}");
                ok += 1;
            }
            (Err(p), Err(q)) => assert!(
                q.contains(p.as_str()) && !p.is_empty(),
                "errors differ for {input}: ours {p:?}, extism {q:?}"
            ),
            _ => panic!("one host failed, the other did not, for {input}: {x:?} vs {y:?}"),
        }
    }
    assert_eq!(ok, inputs.len() - 2, "every valid input scored");
}

#[test]
fn the_c_allergy_check_behaves_identically_without_host_data() {
    // The C plugin, raw kernel ABI. With no fhir functions granted under
    // extism it cannot run its query; its input check is pure, though.
    let bytes = std::fs::read(repo().join("update-bundles/acme-allergy-check.cbx")).unwrap();
    let wasm = container::parse(&bytes, &Limits::default())
        .unwrap()
        .wasm
        .to_vec();
    let mut a = ours(&wasm, &["check"]);
    let mut b = reference(&wasm);
    let (x, y) = both(&mut a, &mut b, "check", b"not json at all");
    let (x, y) = (x.unwrap_err(), y.unwrap_err());
    assert!(x.contains("check takes no input"), "{x}");
    assert!(y.contains(&x), "ours {x:?}, extism {y:?}");
}

#[test]
fn input_output_and_state_follow_extism_semantics() {
    // echo: output = input; count: a global incremented per call (state
    // persists on one instance under both hosts); fail: error_set.
    let wasm = wat(
        "",
        r#"
        (global $n (mut i32) (i32.const 0))
        (func (export "echo") (result i32)
          (call $output_set (call $copy_in) (call $input_length)) (i32.const 0))
        (func (export "count") (result i32)
          (global.set $n (i32.add (global.get $n) (i32.const 1)))
          (i32.store8 (i32.const 0) (i32.add (i32.const 48) (global.get $n)))
          (call $output_set (call $to_kernel (i32.const 0) (i32.const 1)) (i64.const 1))
          (i32.const 0))
        (func (export "fail") (result i32)
          (i32.store (i32.const 0) (i32.const 0x6d6f6f62))
          (call $error_set (call $to_kernel (i32.const 0) (i32.const 4)))
          (i32.const 1))
        "#,
    );
    let mut a = ours(&wasm, &["echo", "count", "fail"]);
    let mut b = reference(&wasm);
    for input in [&b""[..], b"x", &[7u8; 1024][..], &vec![0xffu8; 100_000][..]] {
        let (x, y) = both(&mut a, &mut b, "echo", input);
        assert_eq!(x.as_deref(), Ok(input), "ours echoes {} bytes", input.len());
        assert_eq!(x, y, "{} bytes", input.len());
    }
    for want in ["1", "2", "3"] {
        let (x, y) = both(&mut a, &mut b, "count", b"");
        assert_eq!(x, Ok(want.as_bytes().to_vec()));
        assert_eq!(x, y);
    }
    let (x, y) = both(&mut a, &mut b, "fail", b"");
    assert_eq!(x, Err("boom".to_string()));
    assert!(y.unwrap_err().contains("boom"));
}
