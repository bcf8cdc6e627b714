//! Host ABI version 1: what a plugin's wasm module may import and must
//! export (docs/plugin-abi.md), checked at install (verification step 7).
//!
//! Allowed imports: the Extism kernel's memory and I/O functions and its
//! `config_get` and log functions (`extism:host/env`), and the clinicbox
//! host functions `fhir_search`, `fhir_read` and `audit_note`
//! (`extism:host/user`). Nothing else: no WASI, no HTTP, no Extism vars (a
//! cross-call stash), no memories, tables or globals from the host.
//! Invariant: a module that passes has been fully validated by wasmparser,
//! imports only the above, and exports every function its manifest lists
//! with the Extism signature `() -> i32`.

use wasmparser::{Parser, Payload, TypeRef, ValType, Validator, WasmFeatures};

use crate::bundle::manifest::Manifest;

/// Extism kernel functions (from the kernel's own exports) and the Extism
/// host functions ABI 1 keeps.
pub const ENV_FUNCTIONS: &[&str] = &[
    "alloc",
    "free",
    "length",
    "length_unsafe",
    "load_u8",
    "load_u64",
    "store_u8",
    "store_u64",
    "input_set",
    "input_length",
    "input_offset",
    "input_load_u8",
    "input_load_u64",
    "output_set",
    "output_length",
    "output_offset",
    "reset",
    "error_set",
    "error_get",
    "memory_bytes",
    "config_get",
    "log_info",
    "log_warn",
    "log_debug",
    "log_error",
    "log_trace",
    "get_log_level",
];

/// The clinicbox host functions of ABI 1 (`extism:host/user`).
pub const USER_FUNCTIONS: &[&str] = &["fhir_search", "fhir_read", "audit_note"];

/// Namespace of the Extism kernel.
pub const ENV_MODULE: &str = "extism:host/env";
/// Namespace of the clinicbox host functions.
pub const USER_MODULE: &str = "extism:host/user";

/// Why a module does not fit ABI 1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AbiError {
    /// Not a valid wasm module.
    #[error("the module is not valid WebAssembly: {0}")]
    Invalid(String),
    /// An import outside the ABI.
    #[error("the module imports {module}::{name} ({kind}), which host ABI 1 does not provide")]
    Import {
        /// Import module.
        module: String,
        /// Import name.
        name: String,
        /// function, memory, table, global, tag.
        kind: &'static str,
    },
    /// A host function import the manifest's scopes never allow.
    #[error("the module imports {name}, but the manifest requests no scope allowing it ({needs})")]
    Unscoped {
        /// The host function.
        name: String,
        /// What it needs.
        needs: &'static str,
    },
    /// A declared export is missing or has the wrong type.
    #[error("export {name:?} listed in the manifest {problem}")]
    Export {
        /// The export.
        name: String,
        /// What is wrong.
        problem: &'static str,
    },
}

/// Checks `wasm` against ABI 1 and the manifest's exports and scopes.
pub fn check(wasm: &[u8], manifest: &Manifest) -> Result<(), AbiError> {
    let mut features = WasmFeatures::default();
    features.remove(WasmFeatures::THREADS);
    Validator::new_with_features(features)
        .validate_all(wasm)
        .map_err(|e| AbiError::Invalid(e.to_string()))?;
    let mut func_types: Vec<(usize, usize)> = Vec::new(); // (params, results) per type index
    let mut result_is_i32: Vec<bool> = Vec::new();
    let mut func_type_of: Vec<u32> = Vec::new(); // type index per function index
    let mut exports: Vec<(String, u32)> = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(|e| AbiError::Invalid(e.to_string()))? {
            Payload::TypeSection(r) => {
                for ty in r.into_iter_err_on_gc_types() {
                    let f = ty.map_err(|e| AbiError::Invalid(e.to_string()))?;
                    func_types.push((f.params().len(), f.results().len()));
                    result_is_i32.push(f.results() == [ValType::I32]);
                }
            }
            Payload::ImportSection(r) => {
                for imp in r.into_imports() {
                    let imp = imp.map_err(|e| AbiError::Invalid(e.to_string()))?;
                    let kind = match imp.ty {
                        TypeRef::Func(t) | TypeRef::FuncExact(t) => {
                            func_type_of.push(t);
                            "function"
                        }
                        TypeRef::Memory(_) => "memory",
                        TypeRef::Table(_) => "table",
                        TypeRef::Global(_) => "global",
                        TypeRef::Tag(_) => "tag",
                    };
                    check_import(imp.module, imp.name, kind, manifest)?;
                }
            }
            Payload::FunctionSection(r) => {
                for t in r {
                    func_type_of.push(t.map_err(|e| AbiError::Invalid(e.to_string()))?);
                }
            }
            Payload::ExportSection(r) => {
                for e in r {
                    let e = e.map_err(|e| AbiError::Invalid(e.to_string()))?;
                    if e.kind == wasmparser::ExternalKind::Func {
                        exports.push((e.name.to_owned(), e.index));
                    }
                }
            }
            _ => {}
        }
    }
    for name in &manifest.exports {
        let Some((_, idx)) = exports.iter().find(|(n, _)| n == name) else {
            return Err(AbiError::Export {
                name: name.clone(),
                problem: "is not exported as a function",
            });
        };
        let ty = func_type_of.get(*idx as usize).map(|t| *t as usize);
        let ok = ty.is_some_and(|t| func_types.get(t) == Some(&(0, 1)) && result_is_i32[t]);
        if !ok {
            return Err(AbiError::Export {
                name: name.clone(),
                problem: "does not have the Extism signature () -> i32",
            });
        }
    }
    Ok(())
}

fn check_import(
    module: &str,
    name: &str,
    kind: &'static str,
    manifest: &Manifest,
) -> Result<(), AbiError> {
    let outside = || AbiError::Import {
        module: module.to_owned(),
        name: name.to_owned(),
        kind,
    };
    if kind != "function" {
        return Err(outside());
    }
    match module {
        ENV_MODULE if ENV_FUNCTIONS.contains(&name) => Ok(()),
        USER_MODULE if USER_FUNCTIONS.contains(&name) => {
            let (allowed, needs) = match name {
                "fhir_search" => (
                    manifest.scopes.iter().any(|s| s.search),
                    "a patient/….s scope",
                ),
                "fhir_read" => (
                    manifest.scopes.iter().any(|s| s.read),
                    "a patient/….r scope",
                ),
                _ => (true, ""),
            };
            if allowed {
                Ok(())
            } else {
                Err(AbiError::Unscoped {
                    name: name.to_owned(),
                    needs,
                })
            }
        }
        _ => Err(outside()),
    }
}
