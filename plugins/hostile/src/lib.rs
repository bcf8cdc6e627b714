//! `hostile`: a clinicbox TEST plugin written in Rust with `extism-pdk`
//! that misbehaves on purpose, for `tests/containment.rs`. Each export is
//! one attack; the host must contain every one of them.
//!
//! Never sign this with a real key or install it on a real box.
#![cfg(target_arch = "wasm32")]

use std::sync::Mutex;

use extism_pdk::{FnResult, log, plugin_fn};

/// Whatever the last call left behind (the cross-patient stash attack).
static STASH: Mutex<String> = Mutex::new(String::new());

/// A Rust panic (with `panic = "abort"`, a wasm trap).
#[plugin_fn]
pub fn panic(input: String) -> FnResult<String> {
    panic!("hostile plugin panics on purpose: {input}");
}

/// Logs without end, hoping to flood the host.
#[plugin_fn]
pub fn log_spam(_: String) -> FnResult<String> {
    let mut i: u64 = 0;
    loop {
        log!(
            extism_pdk::LogLevel::Error,
            "spam line {i} {}",
            "x".repeat(200)
        );
        i += 1;
    }
}

/// Returns 16 MiB of output.
#[plugin_fn]
pub fn huge(_: String) -> FnResult<String> {
    Ok("A".repeat(16 * 1024 * 1024))
}

/// Returns what the previous call stashed, then stashes this input.
#[plugin_fn]
pub fn stash(input: String) -> FnResult<String> {
    let mut s = STASH
        .lock()
        .map_err(|_| extism_pdk::Error::msg("poisoned"))?;
    let previous = std::mem::take(&mut *s);
    if !input.is_empty() {
        *s = input;
    } else {
        *s = previous.clone();
    }
    Ok(previous)
}
