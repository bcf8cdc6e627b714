//! The Extism ABI host on wasmtime: the Extism kernel and one plugin module
//! in one wasmtime `Store`, and Extism's call sequence on them.
//!
//! clinicbox keeps Extism's ABI, kernel and PDKs (plugins are built with
//! `extism-pdk` and run unchanged under the `extism` crate, which the tests
//! use as the reference), but drives the call itself. `extism::Plugin::call`
//! sends two messages to a global timer thread on every call, which costs
//! about 2 µs and serialises threads, and its timeouts bump the epoch of
//! the engine shared by every plugin, which stops sibling calls too. Here
//! one ticker thread advances the engine's epoch every [`TICK`], and each
//! call sets its own store's deadline that many ticks ahead: a plugin that
//! runs past its time traps alone (docs/plugin-abi.md, "The host").
//!
//! The kernel is Extism 1.30.0's own `extism-runtime.wasm` (BSD-3-Clause,
//! Dylibso), vendored byte for byte as `extism-kernel.wasm`; its sha256 is
//! [`KERNEL_SHA256`] and a test checks it.
//!
//! Invariants:
//! - a store holds exactly one kernel and one plugin instance, and the
//!   plugin's imports resolve only to the kernel's exports, the Extism
//!   `config_get`/`log_*`/`get_log_level` functions and the clinicbox host
//!   functions: nothing else is linked, so there is no WASI, no HTTP, no
//!   filesystem and no host memory; a clinicbox host function the grants
//!   do not allow resolves to a denial stub;
//! - memory is one budget over every memory of the store (kernel and
//!   plugin, input and output included) for the instance's whole life;
//! - the per-call context is set just before the guest runs and taken back
//!   right after, whatever the outcome, so it never reaches the next call;
//! - any failure leaves the instance unfit: the caller discards it.

use std::sync::Arc;

use anyhow::{Context, Result};
use wasmtime::{
    Caller, Config, Engine, Extern, Func, Instance as WasmInstance, Memory, Module,
    ResourceLimiter, Store, Trap, TypedFunc,
};

use super::CallCtx;
use super::abi::{ENV_MODULE, USER_FUNCTIONS, USER_MODULE};
use super::host_fns;
use crate::limits::Limits;

/// The Extism kernel (Extism 1.30.0 `src/extism-runtime.wasm`).
const KERNEL: &[u8] = include_bytes!("extism-kernel.wasm");
/// The epoch tick: the granularity of plugin time limits.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(2);

/// sha256 of [`KERNEL`], as shipped in the `extism` 1.30.0 crate.
pub const KERNEL_SHA256: &str = "d1389b31abecf23eec65b4430d86f99f736aeb05c40948dbbe2f88cb17815803";

/// One wasmtime engine and the compiled kernel, shared by every plugin.
#[derive(Clone)]
pub struct HostEngine {
    engine: Engine,
    kernel: Module,
}

impl HostEngine {
    /// An engine with epoch interruption (and its ticker thread, which ends
    /// with the engine) and the given stack limit. With `cache_dir`,
    /// compiled code is kept there (never in `$HOME`).
    pub fn new(limits: &Limits, cache_dir: Option<&std::path::Path>) -> Result<HostEngine> {
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .max_wasm_stack(limits.max_wasm_stack_bytes);
        if let Some(dir) = cache_dir {
            let mut cc = wasmtime::CacheConfig::new();
            cc.with_directory(dir);
            let cache = wasmtime::Cache::new(cc)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("compiled-code cache in {}", dir.display()))?;
            config.cache(Some(cache));
        }
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("cannot create the wasm engine")?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(TICK);
                    match weak.upgrade() {
                        Some(e) => e.increment_epoch(),
                        None => break,
                    }
                }
            })
            .context("cannot start the epoch ticker")?;
        let kernel = Module::new(&engine, KERNEL)
            .map_err(anyhow::Error::from)
            .context("cannot compile the Extism kernel")?;
        Ok(HostEngine { engine, kernel })
    }

    /// Compiles (or loads from the cache) a plugin module.
    pub fn compile(&self, wasm: &[u8]) -> Result<Module> {
        Ok(Module::new(&self.engine, wasm)?)
    }
}

/// Per-instance settings, from the manifest clamped by [`Limits`].
#[derive(Debug, Clone)]
pub struct InstanceLimits {
    /// `vendor/name`, for log lines.
    pub plugin: String,
    /// Memory budget over all memories, in bytes.
    pub memory_bytes: usize,
    /// Time limit per call.
    pub timeout: std::time::Duration,
    /// Table elements.
    pub table_elements: usize,
    /// Log bytes per call.
    pub log_bytes_per_call: usize,
    /// Longest log message.
    pub log_line_bytes: usize,
}

/// The kernel's exports the host itself uses.
#[derive(Clone)]
pub(crate) struct Kernel {
    memory: Memory,
    alloc: TypedFunc<i64, i64>,
    free: TypedFunc<i64, ()>,
    length: TypedFunc<i64, i64>,
    reset: TypedFunc<(), ()>,
    input_set: TypedFunc<(i64, i64), ()>,
    output_offset: TypedFunc<(), i64>,
    output_length: TypedFunc<(), i64>,
    error_get: TypedFunc<(), i64>,
}

impl Kernel {
    fn of(store: &mut Store<State>, k: &WasmInstance) -> Result<Kernel> {
        Ok(Kernel {
            memory: k
                .get_memory(&mut *store, "memory")
                .context("the Extism kernel has no memory")?,
            alloc: k.get_typed_func(&mut *store, "alloc")?,
            free: k.get_typed_func(&mut *store, "free")?,
            length: k.get_typed_func(&mut *store, "length")?,
            reset: k.get_typed_func(&mut *store, "reset")?,
            input_set: k.get_typed_func(&mut *store, "input_set")?,
            output_offset: k.get_typed_func(&mut *store, "output_offset")?,
            output_length: k.get_typed_func(&mut *store, "output_length")?,
            error_get: k.get_typed_func(&mut *store, "error_get")?,
        })
    }
}

/// What a store carries: the budget, the kernel and the call context.
pub(crate) struct State {
    budget: Budget,
    kernel: Option<Kernel>,
    ctx: Option<Arc<CallCtx>>,
    log: LogBudget,
}

impl State {
    /// The context of the call in progress, if any.
    pub(crate) fn ctx(&self) -> Option<&Arc<CallCtx>> {
        self.ctx.as_ref()
    }
}

/// One memory budget for every memory in the store, and a table cap.
struct Budget {
    left: usize,
    /// Bytes of every memory of the store, as grown so far.
    used: usize,
    table_elements: usize,
    hit: bool,
}

impl ResourceLimiter for Budget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grow = desired.saturating_sub(current);
        if grow > self.left {
            self.hit = true;
            return Ok(false);
        }
        self.left -= grow;
        self.used += grow;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_elements)
    }
}

struct LogBudget {
    plugin: String,
    per_call: usize,
    line: usize,
    left: usize,
    dropped: u64,
}

/// Why a call failed. Every variant means the instance must be discarded.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The guest reported an error (Extism `error_set`) or a non-zero code.
    #[error("{0}")]
    Guest(String),
    /// The call ran past its time limit.
    #[error("time limit")]
    Timeout,
    /// A memory grow was refused by the budget.
    #[error("memory limit")]
    Memory,
    /// Deep recursion.
    #[error("stack overflow")]
    StackOverflow,
    /// Any other wasm trap.
    #[error("trapped: {0}")]
    Trap(String),
    /// The output is larger than allowed.
    #[error("output is {0} bytes, over the limit of {1}")]
    OutputTooLarge(u64, usize),
    /// A host function failed (or panicked), or the host itself did.
    #[error("{0}")]
    Host(String),
}

/// A ready plugin instance: its store, kernel and exported functions.
pub struct Instance {
    store: Store<State>,
    kernel: Kernel,
    funcs: Vec<(String, TypedFunc<(), i32>)>,
    ticks: u64,
    /// Log bytes dropped over the cap in the last call.
    pub dropped_log_bytes: u64,
}

impl Instance {
    /// The bytes of the instance's memories (kernel and plugin): what it
    /// holds while it waits idle in a pool.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().budget.used
    }

    /// Instantiates `module` with its kernel. `exports` are the functions
    /// callers may run (the manifest's list); `linked` are the clinicbox
    /// host functions the grants allow: any other one the module imports
    /// is bound to a stub that only records and returns the denial.
    pub fn new(
        engine: &HostEngine,
        module: &Module,
        exports: &[String],
        linked: &[&'static str],
        lim: &InstanceLimits,
    ) -> Result<Instance> {
        let state = State {
            budget: Budget {
                left: lim.memory_bytes,
                used: 0,
                table_elements: lim.table_elements,
                hit: false,
            },
            kernel: None,
            ctx: None,
            log: LogBudget {
                plugin: lim.plugin.clone(),
                per_call: lim.log_bytes_per_call,
                line: lim.log_line_bytes,
                left: lim.log_bytes_per_call,
                dropped: 0,
            },
        };
        let mut store = Store::new(&engine.engine, state);
        store.limiter(|s| &mut s.budget);
        let ticks = deadline_ticks(lim.timeout);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks);
        let k = WasmInstance::new(&mut store, &engine.kernel, &[])
            .map_err(anyhow::Error::from)
            .context("cannot instantiate the Extism kernel")?;
        let kernel = Kernel::of(&mut store, &k)?;
        store.data_mut().kernel = Some(kernel.clone());
        let mut imports: Vec<Extern> = Vec::new();
        for imp in module.imports() {
            let ext: Extern = match (imp.module(), imp.name()) {
                (ENV_MODULE, "config_get") => Func::wrap(&mut store, config_get).into(),
                (ENV_MODULE, "get_log_level") => {
                    Func::wrap(&mut store, |_: Caller<'_, State>| log_level_int()).into()
                }
                (ENV_MODULE, name) if name.starts_with("log_") => {
                    let level = match name {
                        "log_error" => log::Level::Error,
                        "log_warn" => log::Level::Warn,
                        "log_info" => log::Level::Info,
                        "log_debug" => log::Level::Debug,
                        "log_trace" => log::Level::Trace,
                        other => anyhow::bail!(
                            "imports {ENV_MODULE}::{other}, which host ABI 1 does not provide"
                        ),
                    };
                    Func::wrap(&mut store, move |c: Caller<'_, State>, off: i64| {
                        plugin_log(c, level, off)
                    })
                    .into()
                }
                (ENV_MODULE, name) => k.get_export(&mut store, name).with_context(|| {
                    format!("imports {ENV_MODULE}::{name}, which the Extism kernel does not export")
                })?,
                (USER_MODULE, name) => {
                    let Some(&name) = USER_FUNCTIONS.iter().find(|n| **n == name) else {
                        anyhow::bail!(
                            "imports {USER_MODULE}::{name}, which host ABI 1 does not provide"
                        );
                    };
                    let granted = linked.contains(&name);
                    Func::wrap(&mut store, move |c: Caller<'_, State>, off: i64| {
                        host_fns::host_call(name, granted, c, off)
                    })
                    .into()
                }
                (m, name) => {
                    anyhow::bail!("imports {m}::{name}, which host ABI 1 does not provide")
                }
            };
            imports.push(ext);
        }
        let inst = WasmInstance::new(&mut store, module, &imports)
            .map_err(anyhow::Error::from)
            .context("cannot instantiate the plugin")?;
        // A WASI-style reactor initialiser, as Extism runs it.
        if let Ok(init) = inst.get_typed_func::<(), ()>(&mut store, "_initialize") {
            init.call(&mut store, ())
                .map_err(anyhow::Error::from)
                .context("the plugin's _initialize failed")?;
        }
        let mut funcs = Vec::with_capacity(exports.len());
        for name in exports {
            let f = inst
                .get_typed_func::<(), i32>(&mut store, name)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("export {name:?} is missing or not () -> i32"))?;
            funcs.push((name.clone(), f));
        }
        Ok(Instance {
            store,
            kernel,
            funcs,
            ticks,
            dropped_log_bytes: 0,
        })
    }

    /// Runs `function` with `input` under `ctx` and returns its output.
    /// After an `Err` the instance must be discarded.
    pub fn call(
        &mut self,
        function: &str,
        input: &[u8],
        ctx: Option<Arc<CallCtx>>,
        max_output: usize,
    ) -> Result<Vec<u8>, Failure> {
        let f = self
            .funcs
            .iter()
            .find(|(n, _)| n == function)
            .map(|(_, f)| f.clone())
            .ok_or_else(|| Failure::Host(format!("no export {function:?}")))?;
        let host = |e: wasmtime::Error| Failure::Host(format!("{e:#}"));
        self.store.set_epoch_deadline(self.ticks);
        {
            let data = self.store.data_mut();
            data.log.left = data.log.per_call;
            data.log.dropped = 0;
            data.budget.hit = false;
        }
        let k = &self.kernel;
        let result = (|| -> wasmtime::Result<i32> {
            k.reset.call(&mut self.store, ())?;
            let len = input.len() as i64;
            let off = k.alloc.call(&mut self.store, len)?;
            if off == 0 && len > 0 {
                return Err(wasmtime::Error::msg("memory limit"));
            }
            k.memory.write(&mut self.store, off as usize, input)?;
            k.input_set.call(&mut self.store, (off, len))?;
            self.store.data_mut().ctx = ctx;
            let r = f.call(&mut self.store, ());
            self.store.data_mut().ctx = None;
            // Reading the result is the host's work: a fresh deadline, so a
            // guest that finished in its last tick is not misreported.
            self.store.set_epoch_deadline(self.ticks);
            r
        })();
        self.dropped_log_bytes = self.store.data().log.dropped;
        let rc = match result {
            Ok(rc) => rc,
            Err(e) => return Err(self.classify(e)),
        };
        let err_off = k.error_get.call(&mut self.store, ()).map_err(host)?;
        if err_off != 0 {
            let text = read_block(&mut self.store, k, err_off, 64 * 1024).map_err(host)?;
            return Err(Failure::Guest(String::from_utf8_lossy(&text).into_owned()));
        }
        if rc != 0 {
            return Err(Failure::Guest(format!("returned code {rc}")));
        }
        let off = k.output_offset.call(&mut self.store, ()).map_err(host)?;
        let len = k.output_length.call(&mut self.store, ()).map_err(host)? as u64;
        if len > max_output as u64 {
            return Err(Failure::OutputTooLarge(len, max_output));
        }
        let mut out = vec![0u8; len as usize];
        if len > 0 {
            k.memory
                .read(&self.store, off as usize, &mut out)
                .map_err(|e| Failure::Host(format!("output out of bounds: {e}")))?;
        }
        Ok(out)
    }

    fn classify(&mut self, e: wasmtime::Error) -> Failure {
        if self.store.data().budget.hit {
            return Failure::Memory;
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::StackOverflow) => Failure::StackOverflow,
            Some(Trap::Interrupt) => Failure::Timeout,
            Some(t) => Failure::Trap(t.to_string()),
            None => Failure::Host(format!("{e:#}")),
        }
    }
}

/// Epoch ticks for `timeout`, rounded up, plus one: the current tick may
/// be nearly over when the call starts.
fn deadline_ticks(timeout: std::time::Duration) -> u64 {
    (timeout.as_micros().div_ceil(TICK.as_micros()) as u64).saturating_add(1)
}

/// Reads the kernel block at `off` (at most `cap` bytes).
fn read_block(
    store: &mut impl wasmtime::AsContextMut<Data = State>,
    k: &Kernel,
    off: i64,
    cap: usize,
) -> wasmtime::Result<Vec<u8>> {
    let len = k.length.call(&mut *store, off)?;
    if len <= 0 {
        return Err(wasmtime::Error::msg(format!(
            "offset {off} is not a kernel memory block"
        )));
    }
    let len = (len as usize).min(cap);
    let mut buf = vec![0u8; len];
    k.memory.read(&*store, off as usize, &mut buf)?;
    Ok(buf)
}

/// Host side of a host function: the argument block's bytes (owned), with
/// its length checked against `cap` first.
pub(crate) fn read_arg(
    caller: &mut Caller<'_, State>,
    off: i64,
    cap: u64,
    what: &str,
) -> wasmtime::Result<Vec<u8>> {
    let k = kernel(caller)?;
    let len = k.length.call(&mut *caller, off)?;
    if len <= 0 {
        return Err(wasmtime::Error::msg(format!(
            "{what}: argument {off} is not a valid memory offset"
        )));
    }
    if len as u64 > cap {
        return Err(wasmtime::Error::msg(format!(
            "{what}: argument is {len} bytes, over the limit of {cap}"
        )));
    }
    let mut buf = vec![0u8; len as usize];
    k.memory.read(&*caller, off as usize, &mut buf)?;
    Ok(buf)
}

/// Copies `bytes` into a new kernel block and returns its offset.
pub(crate) fn write_block(caller: &mut Caller<'_, State>, bytes: &[u8]) -> wasmtime::Result<i64> {
    let k = kernel(caller)?;
    let off = k.alloc.call(&mut *caller, bytes.len() as i64)?;
    if off == 0 && !bytes.is_empty() {
        return Err(wasmtime::Error::msg(
            "memory limit: no room for the host function's result",
        ));
    }
    k.memory.write(&mut *caller, off as usize, bytes)?;
    Ok(off)
}

fn kernel(caller: &mut Caller<'_, State>) -> wasmtime::Result<Kernel> {
    caller
        .data()
        .kernel
        .clone()
        .ok_or_else(|| wasmtime::Error::msg("the Extism kernel is not linked"))
}

/// `config_get(key) -> value`: plugins get no configuration in ABI 1, so
/// every key is absent (0). The key block is freed, as Extism does.
fn config_get(mut caller: Caller<'_, State>, off: i64) -> wasmtime::Result<i64> {
    let k = kernel(&mut caller)?;
    k.free.call(&mut caller, off)?;
    Ok(0)
}

/// Extism's level numbers: trace 0 … error 4, `i32::MAX` when off.
fn log_level_int() -> i32 {
    match log::max_level() {
        log::LevelFilter::Off => i32::MAX,
        log::LevelFilter::Error => 4,
        log::LevelFilter::Warn => 3,
        log::LevelFilter::Info => 2,
        log::LevelFilter::Debug => 1,
        log::LevelFilter::Trace => 0,
    }
}

/// `log_*(message)`: forwarded to the host log under target `plugin`, cut
/// to the line cap, within the per-call byte budget; beyond it, dropped
/// and counted. The message block is freed, as Extism does.
fn plugin_log(mut caller: Caller<'_, State>, level: log::Level, off: i64) -> wasmtime::Result<()> {
    let k = kernel(&mut caller)?;
    let len = k.length.call(&mut caller, off)?.max(0) as usize;
    let enabled = level <= log::max_level();
    let log = &caller.data().log;
    let take = len.min(log.line).min(log.left);
    if enabled && take > 0 {
        let mut buf = vec![0u8; take];
        k.memory.read(&caller, off as usize, &mut buf)?;
        let plugin = &caller.data().log.plugin;
        log::log!(target: "plugin", level, "{plugin}: {}", String::from_utf8_lossy(&buf));
    }
    let log = &mut caller.data_mut().log;
    if enabled {
        log.left -= take;
        log.dropped += (len.min(log.line) - take) as u64;
    }
    if len > 0 {
        k.free.call(&mut caller, off)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn the_vendored_kernel_is_extisms() {
        assert_eq!(hex::encode(Sha256::digest(KERNEL)), KERNEL_SHA256);
    }
}
