//! Plugin runtime benchmark. Not a test: it prints medians and side-by-side
//! ratios for BENCHMARKS.md (`cargo bench --bench runtime`).
//!
//! In one run, on the same trivial module (echo, 1 KiB in and out):
//! - clinicbox's host (`runtime::host::Instance::call`) on a warm instance:
//!   the per-call overhead;
//! - the whole `Runtime::call` (pool, lookups, durable call record);
//! - Extism's own `Plugin::call` on a warm instance, and a naive
//!   `Plugin::new` per call;
//! - the floor: a raw wasmtime `TypedFunc` call of a same-bodied function;
//! - cold start: runtime created → installed plugin (cached code) → first
//!   answer, and a fresh process doing the same beside one that only starts;
//! - one `fhir_read` host call from inside a plugin, SQLite time excluded;
//! - NEWS2: the plugin's own Rust code natively vs in wasm, same inputs;
//! - RSS per idle instance, 100 instances.

use std::time::Instant;

use clinicbox::datadir::DataDir;
use clinicbox::limits::Limits;
use clinicbox::runtime::host::{HostEngine, Instance, InstanceLimits};
use clinicbox::runtime::{CallRequest, Runtime};

// The NEWS2 plugin's own code, compiled natively for the compute baseline.
#[allow(dead_code)]
#[path = "../plugins/news2/src/assess.rs"]
mod assess;
#[allow(dead_code)]
#[path = "../plugins/news2/src/score.rs"]
mod score;
#[allow(dead_code)]
#[path = "../plugins/news2/src/vitals.rs"]
mod vitals;

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

// echo hands the input block back as the output (no guest-side copy), so
// the figure is the host's own per-call cost; the host still copies 1 KiB
// in and 1 KiB out. echo_bytes copies byte by byte through the kernel, as a
// naive guest would.
const ECHO: &str = r#"(func (export "echo") (result i32) (call $output_set (call $input_offset) (call $input_length)) (i32.const 0))
  (func (export "echo_bytes") (result i32) (call $out_block (call $copy_in)) (i32.const 0))
  (func (export "read") (result i32) (call $out_block (call $fhir_read (call $copy_in))) (i32.const 0))
  (func (export "read200") (result i32) (local $i i32) (local $p i64)
    (local.set $p (call $copy_in))
    (loop $l
      (drop (call $fhir_read (local.get $p)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 200))))
    (call $out_block (local.get $p)) (i32.const 0))"#;
const READS_PER_CALL: f64 = 200.0;

fn instance_limits() -> InstanceLimits {
    InstanceLimits {
        plugin: "bench/echo".into(),
        memory_bytes: 64 << 20,
        timeout: std::time::Duration::from_secs(60),
        table_elements: 10_000,
        log_bytes_per_call: 16 * 1024,
        log_line_bytes: 2048,
    }
}

/// The extism reference, with the clinicbox user functions as stubs.
fn extism_plugin(wasm: &[u8]) -> extism::Plugin {
    extism::Plugin::new(
        extism::Manifest::new([extism::Wasm::data(wasm.to_vec())]),
        [extism::Function::new(
            "fhir_read",
            [extism::PTR],
            [extism::PTR],
            extism::UserData::new(()),
            |_, _, _, _| Err(extism::Error::msg("stub")),
        )
        .with_namespace("extism:host/user")],
        false,
    )
    .unwrap()
}
const IMPORTS: &str = r#"(import "extism:host/env" "input_offset" (func $input_offset (result i64)))
    (import "extism:host/user" "fhir_read" (func $fhir_read (param i64) (result i64)))"#;

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
        &["echo", "read", "read200"],
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
    b.import("clinic-a", &[&f]);
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

    // Cold start as the daemon sees it: the runtime is up, and an installed
    // plugin it has not loaded yet is called: load its compiled code from
    // the cache, instantiate, answer, durable record. 100 distinct plugins
    // (each module differs by one constant, so each has its own cache
    // entry), installed first, then the first call of each.
    let n_cold = 100;
    for i in 0..n_cold {
        let w = common::wat(
            IMPORTS,
            &format!("{ECHO}\n(func $id (result i32) (i32.const {i}))"),
        );
        let bundle = common::custom_bundle(
            &format!("acme/cold{i}"),
            "1.0.0",
            &w,
            &["echo"],
            &["patient/Observation.rs"],
            &vendor.key,
        );
        let p = b.file(&format!("cold{i}.cbx"), &bundle);
        b.ok(&["plugin", "install", p.to_str().unwrap()]);
    }
    let daemon = Runtime::new(DataDir::new(&b.data), Limits::default()).unwrap();
    daemon.call(&req("echo", &input)).unwrap();
    let mut cold = Vec::new();
    for i in 0..n_cold {
        let mut r = req("echo", &input);
        r.plugin = format!("acme/cold{i}");
        let t = Instant::now();
        daemon.call(&r).unwrap();
        cold.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(daemon);
    // And with a new runtime each time (engine, audit log, connections).
    let mut cold_rt = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let rt = Runtime::new(DataDir::new(&b.data), Limits::default()).unwrap();
        rt.call(&req("echo", &input)).unwrap();
        cold_rt.push(t.elapsed().as_secs_f64() * 1e6);
    }

    let rt = Runtime::new(DataDir::new(&b.data), Limits::default()).unwrap();
    rt.call(&req("echo", &input)).unwrap();
    let mut ours = time_n(n / 10, || {
        rt.call(&req("echo", &input)).unwrap();
    });
    // fhir_read from inside the plugin: 200 reads per call; the instance's
    // own run time minus what host functions spent in SQLite (the read and
    // its durable access record), per read.
    let mut read_host = Vec::new();
    let mut read_db = Vec::new();
    for _ in 0..30 {
        let out = rt.call(&req("read200", b"Observation/o1")).unwrap();
        read_host.push((out.guest_us - out.host_db_us) as f64 / READS_PER_CALL);
        read_db.push(out.host_db_us as f64 / READS_PER_CALL);
    }

    // The host layer alone: a warm instance, the same module.
    let engine = HostEngine::new(&Limits::default(), None).unwrap();
    let module = engine.compile(&wasm).unwrap();
    let exports = vec!["echo".to_string()];
    let mut inst = Instance::new(&engine, &module, &exports, &[], &instance_limits()).unwrap();
    let mut host = time_n(n, || {
        inst.call("echo", &input, None, 1 << 20).unwrap();
    });

    // Extism directly, same module, warm.
    let mut plugin = extism_plugin(&wasm);
    let mut xt = time_n(n, || {
        let _: Vec<u8> = plugin.call("echo", input.as_slice()).unwrap();
    });
    let mut naive = time_n(200, || {
        let mut p = extism_plugin(&wasm);
        let _: Vec<u8> = p.call("echo", input.as_slice()).unwrap();
    });
    let mut fresh_instance = time_n(500, || {
        let mut i = Instance::new(&engine, &module, &exports, &[], &instance_limits()).unwrap();
        i.call("echo", &input, None, 1 << 20).unwrap();
    });

    // Floor: raw wasmtime typed call of a function with no imports.
    let wengine = wasmtime::Engine::default();
    let wmodule = wasmtime::Module::new(
        &wengine,
        wat::parse_str(r#"(module (func (export "f") (result i32) (i32.const 0)))"#).unwrap(),
    )
    .unwrap();
    let mut store = wasmtime::Store::new(&wengine, ());
    let winst = wasmtime::Instance::new(&mut store, &wmodule, &[]).unwrap();
    let typed = winst.get_typed_func::<(), i32>(&mut store, "f").unwrap();
    let raw = time_n(n, || {
        typed.call(&mut store, ()).unwrap();
    });

    // NEWS2: the same Rust code natively and in wasm, over many windows.
    // BENCH_NEWS2_WASM: another build of the plugin, to compare builds.
    let news2 = match std::env::var_os("BENCH_NEWS2_WASM") {
        Some(p) => std::fs::read(p).unwrap(),
        None => common::example_wasm(),
    };
    let news2_module = engine.compile(&news2).unwrap();
    let mut news2_inst = Instance::new(
        &engine,
        &news2_module,
        &["news2".to_string()],
        &[],
        &instance_limits(),
    )
    .unwrap();
    let windows: Vec<String> = (0..2000)
        .map(|i| {
            format!(
                r#"{{"respiratory_rate": {}, "spo2": {}, "on_oxygen": {}, "systolic_bp": {}, "pulse": {}, "consciousness": "{}", "temperature": {:.1}, "patient": "Patient/p{}"}}"#,
                8 + i % 20,
                85 + i % 15,
                i % 3 == 0,
                85 + i % 140,
                35 + i % 110,
                ["A", "C", "V", "P", "U"][i % 5],
                34.5 + (i % 60) as f64 / 10.0,
                i
            )
        })
        .collect();
    for w in &windows {
        let native = assess::assess(w).unwrap();
        let wasm_out = news2_inst
            .call("news2", w.as_bytes(), None, 1 << 20)
            .unwrap();
        assert_eq!(native.as_bytes(), wasm_out.as_slice(), "same answer");
    }
    let mut native_runs = Vec::new();
    let mut wasm_runs = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        for w in &windows {
            std::hint::black_box(assess::assess(std::hint::black_box(w)).unwrap());
        }
        native_runs.push(t.elapsed().as_secs_f64() * 1e6 / windows.len() as f64);
        let t = Instant::now();
        for w in &windows {
            std::hint::black_box(
                news2_inst
                    .call("news2", w.as_bytes(), None, 1 << 20)
                    .unwrap(),
            );
        }
        wasm_runs.push(t.elapsed().as_secs_f64() * 1e6 / windows.len() as f64);
    }

    // Memory per idle, ready instance: 100 NEWS2 instances (the real Rust
    // plugin, each after one call), beside the trivial module.
    let rss_of = |module: &wasmtime::Module, function: &str, input: &[u8]| {
        let names = vec![function.to_string()];
        let before = rss_kib();
        let idle: Vec<_> = (0..100)
            .map(|_| {
                let mut i =
                    Instance::new(&engine, module, &names, &[], &instance_limits()).unwrap();
                i.call(function, input, None, 1 << 20).unwrap();
                i
            })
            .collect();
        let per = (rss_kib().saturating_sub(before)) as f64 / 100.0;
        drop(idle);
        per
    };
    let per_instance = rss_of(&module, "echo", b"x");
    let per_news2 = rss_of(&news2_module, "news2", windows[0].as_bytes());
    let before = rss_kib();
    let idle_x: Vec<_> = (0..100)
        .map(|_| {
            let mut p = extism_plugin(&wasm);
            let _: Vec<u8> = p.call("echo", b"x".as_slice()).unwrap();
            p
        })
        .collect();
    let per_extism = (rss_kib().saturating_sub(before)) as f64 / 100.0;
    drop(idle_x);

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
        "cold start, runtime up → installed plugin (cached code) → first answer, 100 plugins: p50 {:.0} µs, p99 {:.0} µs",
        median(&mut cold.clone()),
        p99(&mut cold)
    );
    println!(
        "  the same with a new runtime each time (engine, audit writer, connections): p50 {:.0} µs, p99 {:.0} µs",
        median(&mut cold_rt.clone()),
        p99(&mut cold_rt)
    );
    let h = median(&mut host.clone());
    println!(
        "clinicbox host call, warm instance, 1 KiB echo: p50 {h:.2} µs  p99 {:.2} µs  ({:.0}x floor)",
        p99(&mut host),
        h / floor
    );
    let x = median(&mut xt.clone());
    println!(
        "extism Plugin::call, warm, same module:      p50 {x:.2} µs  p99 {:.2} µs  ({:.0}x floor; ours/extism = {:.2})",
        p99(&mut xt),
        x / floor,
        h / x
    );
    println!(
        "Runtime::call, warm (pool, lookups, durable call record): p50 {:.1} µs  p99 {:.1} µs",
        median(&mut ours.clone()),
        p99(&mut ours)
    );
    println!(
        "one fhir_read host call, SQLite excluded: p50 {:.2} µs (SQLite read + durable access record: p50 {:.1} µs)",
        median(&mut read_host),
        median(&mut read_db)
    );
    println!(
        "new instance + call (clinicbox host): p50 {:.0} µs; naive extism Plugin::new per call: p50 {:.0} µs",
        median(&mut fresh_instance),
        median(&mut naive)
    );
    let (nat, wa) = (median(&mut native_runs), median(&mut wasm_runs));
    println!(
        "NEWS2 per window (JSON in → RiskAssessment out), same code: native {nat:.2} µs, wasm via clinicbox host {wa:.2} µs ({:+.1} %)",
        (wa / nat - 1.0) * 100.0
    );
    println!("floor: raw wasmtime TypedFunc call: p50 {floor:.3} µs");
    println!(
        "RSS per idle, ready instance (100 instances): NEWS2 {per_news2:.0} KiB; trivial module: clinicbox host {per_instance:.0} KiB, extism Plugin {per_extism:.0} KiB"
    );
}
