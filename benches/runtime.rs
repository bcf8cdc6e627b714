//! Plugin runtime benchmark. Not a test: it prints medians and side-by-side
//! ratios for BENCHMARKS.md (`cargo bench --bench runtime`).
//!
//! In one run, on the same trivial module (echo, 1 KiB in and out):
//! - clinicbox's call path with a warm pooled instance (records included);
//! - Extism's own `Plugin::call` on a warm instance;
//! - a naive `Plugin::new` per call;
//! - the floor: a raw wasmtime `TypedFunc` call of a same-bodied function;
//! - cold start: runtime created → installed plugin compiled → first answer;
//! - one `fhir_read` host call from inside a plugin;
//! - RSS per idle instance, 100 instances.

use std::time::Instant;

use clinicbox::datadir::DataDir;
use clinicbox::limits::Limits;
use clinicbox::runtime::{CallRequest, Runtime};

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn p99(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() as f64 * 0.99) as usize]
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    s.split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or(0)
        * 4
}

const ECHO: &str = r#"(func (export "echo") (result i32) (call $out_block (call $copy_in)) (i32.const 0))
  (func (export "read") (result i32) (call $out_block (call $fhir_read (call $copy_in))) (i32.const 0))"#;
const IMPORTS: &str =
    r#"(import "extism:host/user" "fhir_read" (func $fhir_read (param i64) (result i64)))"#;

fn time_n(n: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

fn main() {
    let n = 20_000;
    let b = common::TestBox::new();
    let vendor = common::Vendor::new(b.tmp.path(), "acme");
    b.trust(&vendor, "acme/");
    let wasm = common::wat(IMPORTS, ECHO);
    let bundle = common::custom_bundle(
        "acme/echo",
        "1.0.0",
        &wasm,
        &["echo", "read"],
        &["patient/Observation.rs"],
        &vendor.key,
    );
    let p = b.file("echo.cbx", &bundle);
    b.ok(&["plugin", "install", p.to_str().unwrap()]);
    b.ok(&[
        "plugin",
        "grant",
        "--tenant",
        "clinic-a",
        "acme/echo",
        "patient/Observation.rs",
    ]);
    let obs = serde_json::json!({"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}});
    let f = b.file("Observation.ndjson", format!("{obs}\n").as_bytes());
    b.ok(&[
        "fhir",
        "import",
        "--tenant",
        "clinic-a",
        f.to_str().unwrap(),
    ]);
    let input = vec![b'x'; 1024];
    let req = |function: &str, input: &[u8]| CallRequest {
        tenant: "clinic-a".into(),
        patient: "p1".into(),
        requester: "bench".into(),
        purpose: "TREAT".into(),
        plugin: "acme/echo".into(),
        function: function.into(),
        input: input.to_vec(),
    };

    // Cold start: a new runtime, the installed plugin, first call answered.
    let mut cold = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let rt = Runtime::new(DataDir::new(&b.data), Limits::default());
        rt.call(&req("echo", &input)).unwrap();
        cold.push(t.elapsed().as_secs_f64() * 1e6);
    }

    let rt = Runtime::new(DataDir::new(&b.data), Limits::default());
    rt.call(&req("echo", &input)).unwrap();
    let mut ours = time_n(n / 10, || {
        rt.call(&req("echo", &input)).unwrap();
    });
    let mut read = time_n(n / 20, || {
        rt.call(&req("read", b"Observation/o1")).unwrap();
    });

    // Extism directly, same module, warm.
    let compiled =
        extism::PluginBuilder::new(extism::Manifest::new([extism::Wasm::data(wasm.clone())]))
            .with_functions(clinicbox::runtime::host_fns::functions())
            .with_cache_disabled()
            .compile()
            .unwrap();
    let mut plugin = extism::Plugin::new_from_compiled(&compiled).unwrap();
    let mut xt = time_n(n, || {
        let _: Vec<u8> = plugin.call("echo", input.as_slice()).unwrap();
    });
    let mut naive = time_n(200, || {
        let mut p = extism::Plugin::new(
            extism::Manifest::new([extism::Wasm::data(wasm.clone())]),
            clinicbox::runtime::host_fns::functions(),
            false,
        )
        .unwrap();
        let _: Vec<u8> = p.call("echo", input.as_slice()).unwrap();
    });
    let mut from_compiled = time_n(500, || {
        let mut p = extism::Plugin::new_from_compiled(&compiled).unwrap();
        let _: Vec<u8> = p.call("echo", input.as_slice()).unwrap();
    });

    // Floor: raw wasmtime typed call of a function with no imports.
    let engine = wasmtime::Engine::default();
    let module = wasmtime::Module::new(
        &engine,
        wat::parse_str(r#"(module (func (export "f") (result i32) (i32.const 0)))"#).unwrap(),
    )
    .unwrap();
    let mut store = wasmtime::Store::new(&engine, ());
    let inst = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
    let typed = inst.get_typed_func::<(), i32>(&mut store, "f").unwrap();
    let raw = time_n(n, || {
        typed.call(&mut store, ()).unwrap();
    });

    // Memory per idle instance.
    let before = rss_kib();
    let idle: Vec<_> = (0..100)
        .map(|_| {
            let mut p = extism::Plugin::new_from_compiled(&compiled).unwrap();
            let _: Vec<u8> = p.call("echo", b"x".as_slice()).unwrap();
            p
        })
        .collect();
    let per_instance = (rss_kib().saturating_sub(before)) as f64 / 100.0;
    drop(idle);

    // A fresh process: start → installed plugin (cached code) → first answer,
    // beside a process that only starts (`--version`).
    let exe = env!("CARGO_BIN_EXE_clinicbox");
    let mut process = time_n(20, || {
        let out = std::process::Command::new(exe)
            .args([
                "--config",
                b.config.to_str().unwrap(),
                "--data-dir",
                b.data.to_str().unwrap(),
            ])
            .args([
                "call",
                "--tenant",
                "clinic-a",
                "--patient",
                "p1",
                "--input",
                "x",
                "acme/echo",
                "echo",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
    });
    let mut start_only = time_n(20, || {
        std::process::Command::new(exe)
            .arg("--version")
            .output()
            .unwrap();
    });

    let floor = median(&mut raw.clone());
    println!(
        "fresh process → first call answered (clinicbox call): p50 {:.1} ms, p99 {:.1} ms; a process that only starts: p50 {:.1} ms",
        median(&mut process.clone()) / 1000.0,
        p99(&mut process) / 1000.0,
        median(&mut start_only) / 1000.0
    );
    println!(
        "cold start (new runtime → compile installed plugin → first answer): p50 {:.0} µs, p99 {:.0} µs",
        median(&mut cold.clone()),
        p99(&mut cold)
    );
    println!(
        "clinicbox call, warm, 1 KiB echo (incl. audit record): p50 {:.1} µs  p99 {:.1} µs  ({:.0}x floor)",
        median(&mut ours.clone()),
        p99(&mut ours),
        median(&mut ours.clone()) / floor
    );
    println!(
        "  with one fhir_read host call (incl. SQLite + durable access record): p50 {:.1} µs",
        median(&mut read)
    );
    println!(
        "extism Plugin::call, warm, same module: p50 {:.2} µs  p99 {:.2} µs  ({:.0}x floor)",
        median(&mut xt.clone()),
        p99(&mut xt),
        median(&mut xt.clone()) / floor
    );
    println!(
        "extism Plugin::new_from_compiled + call: p50 {:.0} µs",
        median(&mut from_compiled)
    );
    println!(
        "naive Plugin::new per call: p50 {:.0} µs",
        median(&mut naive)
    );
    println!("floor: raw wasmtime TypedFunc call: p50 {:.3} µs", floor);
    println!("RSS per idle instance (100 instances): {per_instance:.0} KiB");
}
