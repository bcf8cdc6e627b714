//! Shared test harness: a throwaway appliance (data dir + the real
//! `clinicbox` binary), vendor keys, and bundles built in the test with the
//! library's own pack/sign, around the real example plugin's wasm.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clinicbox::bundle::envelope::Envelope;
use clinicbox::bundle::manifest::{ManifestSource, RequestedLimits};
use clinicbox::bundle::{self, container};
use clinicbox::keys;
use clinicbox::limits::Limits;
use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::macros::datetime;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The committed example bundle.
pub fn example_bundle() -> PathBuf {
    repo().join("update-bundles/acme-news2.cbx")
}

/// The real NEWS2 wasm, taken from the committed example bundle.
pub fn example_wasm() -> Vec<u8> {
    let bytes = std::fs::read(example_bundle()).expect("example bundle");
    container::parse(&bytes, &Limits::default())
        .expect("example bundle frames")
        .wasm
        .to_vec()
}

pub const CREATED: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);
pub const EXPIRES: OffsetDateTime = datetime!(2036-01-01 00:00 UTC);

/// A vendor manifest source for `name` at `version`.
pub fn source(name: &str, version: &str) -> ManifestSource {
    ManifestSource {
        name: name.into(),
        version: version.into(),
        abi: 1,
        exports: vec!["news2".into()],
        scopes: vec!["patient/Observation.rs".into()],
        limits: RequestedLimits {
            memory_mib: 16,
            timeout_ms: 50,
        },
        description: None,
        subscriptions: vec![],
    }
}

/// A bundle for `name`/`version`, signed by each of `signers` in order.
pub fn signed_bundle(name: &str, version: &str, signers: &[&SigningKey]) -> Vec<u8> {
    signed_bundle_times(name, version, signers, CREATED, EXPIRES)
}

pub fn signed_bundle_times(
    name: &str,
    version: &str,
    signers: &[&SigningKey],
    created: OffsetDateTime,
    expires: OffsetDateTime,
) -> Vec<u8> {
    let l = Limits::default();
    let (_, mut bytes) =
        bundle::pack(source(name, version), &example_wasm(), created, expires, &l).expect("pack");
    for k in signers {
        bytes = bundle::sign(&bytes, k, &l).expect("sign");
    }
    bytes
}

/// A bundle whose manifest payload is `payload` verbatim, under
/// `payload_type`, signed by `key` (for malformed-manifest cases that pack
/// would refuse to build).
pub fn bundle_with_raw_payload(payload: &[u8], payload_type: &str, key: &SigningKey) -> Vec<u8> {
    let mut env = Envelope::unsigned(payload);
    env.payload_type = payload_type.to_owned();
    env.sign(key).expect("sign");
    container::build(&env.to_bytes(), &example_wasm())
}

/// The signed-manifest JSON a valid bundle for `name` would carry.
pub fn manifest_json(name: &str, version: &str) -> serde_json::Value {
    let wasm = example_wasm();
    serde_json::json!({
        "name": name, "version": version, "abi": 1,
        "wasm": {"sha256": hex::encode(Sha256::digest(&wasm)), "size": wasm.len()},
        "exports": ["news2"], "scopes": ["patient/Observation.rs"],
        "limits": {"memory_mib": 16, "timeout_ms": 50},
        "created": "2026-01-01T00:00:00Z", "expires": "2036-01-01T00:00:00Z"
    })
}

/// A vendor key pair with its `.pub` written into `dir`.
pub struct Vendor {
    pub key: SigningKey,
    pub pub_path: PathBuf,
    pub key_path: PathBuf,
}

impl Vendor {
    pub fn new(dir: &Path, label: &str) -> Vendor {
        let key = keys::generate().expect("keygen");
        let pub_path = dir.join(format!("{label}.pub"));
        let key_path = dir.join(format!("{label}.key"));
        keys::write_pair(&key, &key_path, &pub_path, label, &[]).expect("write keys");
        Vendor {
            key,
            pub_path,
            key_path,
        }
    }

    pub fn id(&self) -> String {
        keys::KeyId::of(&self.key.verifying_key()).to_string()
    }
}

/// A throwaway appliance driven through the real binary.
pub struct TestBox {
    pub tmp: tempfile::TempDir,
    pub data: PathBuf,
    pub config: PathBuf,
}

impl TestBox {
    /// A new, initialised appliance with an empty config file.
    pub fn new() -> TestBox {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let config = tmp.path().join("clinicbox.toml");
        std::fs::write(&config, "").expect("config");
        let b = TestBox { tmp, data, config };
        b.ok(&["init"]);
        b
    }

    /// A scratch path inside the box's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Writes `bytes` to a scratch file and returns its path.
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, bytes).expect("write");
        p
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_clinicbox"));
        c.env_remove("CLINICBOX_FAILPOINT")
            .env_remove("CLINICBOX_FAKE_NOW")
            .env_remove("RUST_BACKTRACE")
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--config")
            .arg(&self.config);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = self.cmd();
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run clinicbox")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "clinicbox {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs with `--json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).expect("json output")
    }

    pub fn trust(&self, v: &Vendor, namespace: &str) {
        self.ok(&[
            "trust",
            "add",
            "--namespace",
            namespace,
            v.pub_path.to_str().unwrap(),
        ]);
    }

    /// Installed plugins as (name, version) pairs.
    pub fn installed(&self) -> Vec<(String, String)> {
        self.json(&["plugin", "list"])
            .as_array()
            .expect("array")
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_owned(),
                    p["version"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Bytes of every file in the data dir except the audit log and the
    /// compiled-code cache: the state database and the installed bundles.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        snapshot_into(&self.data, &self.data, &mut out);
        // The audit log may grow and the compiled-code cache may be touched;
        // neither is state.
        out.retain(|k, _| !k.starts_with("audit.db") && !k.starts_with("cache/"));
        out
    }

    /// Number of recorded bundle decisions.
    pub fn decisions(&self) -> Vec<serde_json::Value> {
        self.json(&["plugin", "history", "--limit", "100000"])
            .as_array()
            .expect("array")
            .clone()
    }
}

fn snapshot_into(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let e = e.expect("entry");
        let p = e.path();
        if p.is_dir() {
            snapshot_into(root, &p, out);
        } else {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            out.insert(rel, std::fs::read(&p).expect("read"));
        }
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A signed bundle around any wasm module, with the given exports and scopes.
pub fn custom_bundle(
    name: &str,
    version: &str,
    wasm: &[u8],
    exports: &[&str],
    scopes: &[&str],
    key: &SigningKey,
) -> Vec<u8> {
    let l = Limits::default();
    let mut src = source(name, version);
    src.exports = exports.iter().map(|s| s.to_string()).collect();
    src.scopes = scopes.iter().map(|s| s.to_string()).collect();
    let (_, bytes) = bundle::pack(src, wasm, CREATED, EXPIRES, &l).expect("pack");
    bundle::sign(&bytes, key, &l).expect("sign")
}

/// The Extism-ABI WAT prelude: kernel imports, a memory, and helpers
/// `$copy_in` (input → kernel block) and `$out_str` (static string → output).
pub const WAT_PRELUDE: &str = r#"
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "length" (func $length (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "load_u8" (func $load_u8 (param i64) (result i32)))
  (import "extism:host/env" "input_length" (func $input_length (result i64)))
  (import "extism:host/env" "input_load_u8" (func $input_load_u8 (param i64) (result i32)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/env" "error_set" (func $error_set (param i64)))
  (memory (export "memory") 1)
  ;; copies the call input into a new kernel block; returns its offset
  (func $copy_in (result i64) (local $n i64) (local $p i64) (local $i i64)
    (local.set $n (call $input_length))
    (local.set $p (call $alloc (local.get $n)))
    (block $done (loop $l
      (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
      (call $store_u8 (i64.add (local.get $p) (local.get $i)) (call $input_load_u8 (local.get $i)))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br $l)))
    (local.get $p))
  ;; copies $len bytes of plugin memory at $src into a new kernel block
  (func $to_kernel (param $src i32) (param $len i32) (result i64) (local $p i64) (local $i i32)
    (local.set $p (call $alloc (i64.extend_i32_u (local.get $len))))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
      (call $store_u8 (i64.add (local.get $p) (i64.extend_i32_u (local.get $i)))
                      (i32.load8_u (i32.add (local.get $src) (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (local.get $p))
  ;; sets the output to the kernel block at $p
  (func $out_block (param $p i64) (call $output_set (local.get $p) (call $length (local.get $p))))
"#;

/// Compiles a WAT module: extra `imports`, the prelude, then `body`.
pub fn wat(imports: &str, body: &str) -> Vec<u8> {
    wat::parse_str(format!("(module {imports} {WAT_PRELUDE} {body})")).expect("valid WAT")
}

/// The NEWS2 vital-signs scope the example plugin requests.
pub const NEWS2_VITALS: &str = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs";

/// A box as clinic IT would set it up for NEWS2: the dev vendor trusted for
/// `acme/`, the example bundle installed, `patients` synthetic patients
/// (120 observations each) imported for clinic-a, and, with `grant`, the
/// plugin granted its vital-signs scope.
pub fn news2_box(patients: u32, grant: bool) -> TestBox {
    let b = TestBox::new();
    b.trust_dev_vendor();
    b.ok(&["plugin", "install", example_bundle().to_str().unwrap()]);
    b.synth_and_import(patients, 120, &["clinic-a"]);
    if grant {
        b.grant_news2();
    }
    b
}

impl TestBox {
    /// `fhir search --tenant TENANT --patient PATIENT QUERY` as JSON.
    pub fn search(&self, tenant: &str, patient: &str, query: &str) -> serde_json::Value {
        self.json(&[
            "fhir",
            "search",
            "--tenant",
            tenant,
            "--patient",
            patient,
            query,
        ])
    }

    /// Trusts the dev vendor key (update-bundles/, TEST ONLY) for `acme/`.
    pub fn trust_dev_vendor(&self) {
        let key = repo().join("update-bundles/dev-vendor.pub");
        self.ok(&[
            "trust",
            "add",
            "--namespace",
            "acme/",
            key.to_str().unwrap(),
        ]);
    }

    /// `fhir import --tenant TENANT FILES…`, asserting success.
    pub fn import(&self, tenant: &str, files: &[&Path]) {
        let mut args = vec!["fhir", "import", "--tenant", tenant];
        args.extend(files.iter().map(|f| f.to_str().unwrap()));
        self.ok(&args);
    }

    /// A synthetic data set (`fhir synth`, default seed) for `tenants`,
    /// imported file by file in name order.
    pub fn synth_and_import(&self, patients: u32, per_patient: u32, tenants: &[&str]) {
        let out = self.path("synth");
        let (p, n, t) = (
            patients.to_string(),
            per_patient.to_string(),
            tenants.join(","),
        );
        self.ok(&[
            "fhir",
            "synth",
            "--out",
            out.to_str().unwrap(),
            "--patients",
            &p,
            "--per-patient",
            &n,
            "--tenants",
            &t,
        ]);
        for tenant in tenants {
            let mut files: Vec<PathBuf> = std::fs::read_dir(out.join(tenant))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            self.import(
                tenant,
                &files.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
            );
        }
    }

    /// Grants NEWS2 its vital-signs scope for clinic-a.
    pub fn grant_news2(&self) {
        self.ok(&[
            "plugin",
            "grant",
            "--tenant",
            "clinic-a",
            "acme/news2",
            NEWS2_VITALS,
        ]);
    }

    /// Runs `clinicbox call … acme/news2 news2_latest` for `patient`.
    pub fn call_news2(&self, patient: &str) -> Output {
        self.run(&as_refs(&news2_call(patient)))
    }
}

/// `&str`s of owned arguments.
pub fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `clinicbox call` arguments for NEWS2 on one patient.
pub fn news2_call(patient: &str) -> Vec<String> {
    [
        "call",
        "--tenant",
        "clinic-a",
        "--patient",
        patient,
        "acme/news2",
        "news2_latest",
    ]
    .map(String::from)
    .to_vec()
}
pub mod daemon;
pub mod upstream;
