//! Every bound clinicbox enforces, in one place, with its unit and its reason.
//!
//! Invariant: no reader in clinicbox allocates or reads more than one of these
//! bounds allows. Readers check a size *before* reading (file length from
//! `stat`, a length prefix from the container header) and then read through a
//! `take(bound + 1)` so a file that grows while being read is still caught.
//!
//! The admin may lower the bundle caps in the config file (`[limits]`), never
//! raise them past the hard ceilings below.

/// Bounds used across the appliance. `Limits::default()` is what ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest `.cbx` bundle file accepted, in bytes (default 64 MiB).
    /// Checked from the file's metadata before a single byte is read, so an
    /// endless or huge file (TUF "endless data") cannot exhaust memory.
    pub max_bundle_bytes: u64,
    /// Largest DSSE envelope inside a bundle, in bytes (default 256 KiB).
    /// The envelope holds only the manifest and signatures.
    pub max_envelope_bytes: u32,
    /// Largest decoded manifest (DSSE payload), in bytes (default 64 KiB).
    pub max_manifest_bytes: usize,
    /// Largest WebAssembly module, in bytes (default 48 MiB).
    pub max_wasm_bytes: u64,
    /// Most signatures one envelope may carry (default 16). Bounds the
    /// verification work an attacker can force.
    pub max_signatures: usize,
    /// Most exported functions a manifest may declare (default 64).
    pub max_exports: usize,
    /// Most scopes a manifest may request (default 64).
    pub max_scopes: usize,
    /// Ceiling on a plugin's requested linear memory, in MiB (default 256).
    /// A manifest asking for more is refused at verification.
    pub max_plugin_memory_mib: u32,
    /// Ceiling on a plugin's requested per-call timeout, in ms (default 10 s).
    pub max_plugin_timeout_ms: u32,
    /// Floor under every plugin's signed per-call timeout, in ms (default
    /// 0: the signed timeouts apply). For a box much slower than the
    /// vendor's, and for emulation: under `qemu-aarch64-static` a plugin's
    /// first call in a process takes about 300 ms while qemu translates
    /// its code (`cross/smoke.sh` sets 5,000 there). Never above
    /// `max_plugin_timeout_ms`.
    pub min_plugin_timeout_ms: u32,
    /// Largest key file (`.key` / `.pub`) read, in bytes (default 4 KiB).
    pub max_key_file_bytes: u64,
    /// Largest config file read, in bytes (default 1 MiB).
    pub max_config_bytes: u64,
    /// Largest vendor manifest source (`plugin.toml`) read by `bundle pack`,
    /// in bytes (default 64 KiB).
    pub max_manifest_source_bytes: u64,
    /// Longest NDJSON line accepted by `fhir import`, in bytes (default
    /// 16 MiB). A longer line is reported and skipped without being held in
    /// memory, so a many-GB file imports in flat memory.
    pub max_ndjson_line_bytes: usize,
    /// Largest Bundle or export manifest JSON file, in bytes (default
    /// 512 MiB). Bundles are parsed whole, unlike NDJSON.
    pub max_bundle_json_bytes: u64,
    /// Resources per import transaction (default 5,000): large enough to
    /// amortise commits, small enough to bound the WAL and lost work.
    pub import_batch: usize,
    /// File:line errors kept per imported file (default 1,000); the rest
    /// are counted.
    pub import_max_reported_errors: usize,
    /// Default `_count` of a search (default 50).
    pub search_default_count: usize,
    /// Largest `_count` of a search (default 500); larger values are capped.
    pub search_max_count: usize,
    /// Longest search query string, in bytes (default 8 KiB).
    pub search_max_query_bytes: usize,
    /// Most `state.db` reads an API worker thread keeps between requests
    /// while `state.db` is unchanged (default 256; see
    /// `runtime::conns`). Keys can come from request paths (plugin names),
    /// so past this the memo starts over.
    pub state_memo_entries: usize,
    /// Largest output a plugin call may return, in bytes (default 1 MiB).
    pub max_output_bytes: usize,
    /// Largest argument of a host function call, in bytes (default 64 KiB).
    pub max_host_arg_bytes: u64,
    /// Host function calls allowed within one plugin call (default 256).
    pub max_host_calls_per_call: u32,
    /// Log text a plugin may emit per call, in bytes (default 16 KiB).
    /// Beyond it, messages are dropped and one warning says how many.
    pub max_log_bytes_per_call: usize,
    /// Longest single log message forwarded, in bytes (default 2 KiB);
    /// longer ones are cut.
    pub max_log_line_bytes: usize,
    /// Wasm stack a plugin call may use, in bytes (default 512 KiB); deeper
    /// recursion traps with "call stack exhausted".
    pub max_wasm_stack_bytes: usize,
    /// Table elements a plugin instance may hold (default 100,000).
    pub max_table_elements: usize,
    /// Instances of one plugin serving calls at once (default 8): calls
    /// beyond wait (`pool_wait_ms`).
    pub max_instances_per_plugin: usize,
    /// Memory that idle instances may hold, box-wide, in MiB (default 512).
    /// An instance serves one (tenant, patient); kept idle, the next call
    /// for that patient skips instantiation (a bedside monitor calls NEWS2
    /// for its patient ten times a second). The least recently used are
    /// dropped first; 0 keeps none.
    pub idle_instances_mib: u32,
    /// How long a call waits for a free instance, in ms (default 2,000).
    pub pool_wait_ms: u64,
    /// Consecutive failed calls that quarantine a plugin (default 5).
    pub quarantine_after: u32,
    /// How long a writer thread (audit log, device ingest) waits after the
    /// first queued request for more to share its commit and fsync, in µs
    /// (default 500). 0 commits at once (src/group.rs).
    pub group_commit_wait_us: u64,
    /// Audit records between signed checkpoints (default 1,000).
    pub audit_checkpoint_every: u32,
    /// Seconds between signed checkpoints while records arrive (default 300).
    pub audit_checkpoint_secs: u32,
    /// Audit records per upstream batch Bundle (default 500, the most the
    /// upload protocol allows).
    pub sync_batch: usize,
    /// Largest upstream response read, in bytes (default 16 MiB).
    pub max_upstream_response_bytes: u64,
    /// Disk budget for audit records not yet acknowledged upstream, in bytes
    /// of record bodies; `None` (the default without an `[upstream]`) means
    /// unbounded. Over it, PHI-returning calls are refused (fail closed);
    /// records are never dropped.
    pub audit_budget_bytes: Option<u64>,
    /// Largest request body the local API reads, in bytes (default 1 MiB);
    /// larger gets 413 before the excess is read.
    pub max_request_body_bytes: usize,
    /// Largest request head (request line and headers) the local API
    /// buffers, in bytes (default 16 KiB); larger gets 431.
    pub max_request_head_bytes: usize,
    /// Time a client has to send a complete request head, ms (default
    /// 5,000): a slowloris client is disconnected after it.
    pub request_head_timeout_ms: u64,
    /// Time a client has to send a request body, ms (default 10,000);
    /// after it, 408.
    pub request_body_timeout_ms: u64,
    /// Open connections to the local API (default 1,024); beyond, new ones
    /// get 503 and are closed.
    pub max_connections: usize,
    /// Requests being worked on at once (default 256); beyond, 503 with
    /// `Retry-After`, so a burst cannot queue without bound.
    pub max_inflight_requests: usize,
    /// Threads that do the local API's work (SQLite, plugin calls); 0
    /// (the default) means sixteen per CPU core: a handler mostly waits for
    /// a group commit's fsync, and enough of them waiting at once keep the
    /// groups full (BENCHMARKS.md), while a fixed count keeps context
    /// switches bounded; requests beyond them wait in line (bounded by
    /// `max_inflight_requests`).
    pub api_workers: usize,
    /// Resources in one ingested Bundle (default 1,000).
    pub max_ingest_entries: usize,
    /// Largest update-channel index, in bytes (default 1 MiB).
    pub max_index_bytes: u64,
    /// Bundles listed in one update-channel index (default 1,000).
    pub max_index_entries: usize,
    /// Largest trust threshold accepted (default 16 = `max_signatures`):
    /// a higher threshold could never be met.
    pub max_threshold: u32,
}

impl Limits {
    /// Hard ceiling for `max_bundle_bytes`; config cannot raise it.
    pub const CEILING_BUNDLE_BYTES: u64 = 256 * 1024 * 1024;
    /// Hard ceiling for `max_wasm_bytes`; config cannot raise it.
    pub const CEILING_WASM_BYTES: u64 = 200 * 1024 * 1024;

    /// The API worker threads these limits start: `api_workers`, or for 0
    /// sixteen per CPU core of this machine.
    pub fn api_workers_in_force(&self) -> usize {
        match self.api_workers {
            0 => 16 * std::thread::available_parallelism().map_or(2, usize::from),
            n => n,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bundle_bytes: 64 * 1024 * 1024,
            max_envelope_bytes: 256 * 1024,
            max_manifest_bytes: 64 * 1024,
            max_wasm_bytes: 48 * 1024 * 1024,
            max_signatures: 16,
            max_exports: 64,
            max_scopes: 64,
            max_plugin_memory_mib: 256,
            max_plugin_timeout_ms: 10_000,
            min_plugin_timeout_ms: 0,
            max_key_file_bytes: 4 * 1024,
            max_config_bytes: 1024 * 1024,
            max_manifest_source_bytes: 64 * 1024,
            max_threshold: 16,
            max_request_body_bytes: 1024 * 1024,
            max_request_head_bytes: 16 * 1024,
            request_head_timeout_ms: 5_000,
            request_body_timeout_ms: 10_000,
            max_connections: 1_024,
            max_inflight_requests: 256,
            api_workers: 0,
            max_ingest_entries: 1_000,
            max_index_bytes: 1024 * 1024,
            max_index_entries: 1_000,
            max_output_bytes: 1024 * 1024,
            max_host_arg_bytes: 64 * 1024,
            max_host_calls_per_call: 256,
            max_log_bytes_per_call: 16 * 1024,
            max_log_line_bytes: 2 * 1024,
            max_wasm_stack_bytes: 512 * 1024,
            max_table_elements: 100_000,
            max_instances_per_plugin: 8,
            idle_instances_mib: 512,
            group_commit_wait_us: 500,
            pool_wait_ms: 2_000,
            quarantine_after: 5,
            audit_checkpoint_every: 1_000,
            audit_checkpoint_secs: 300,
            sync_batch: 500,
            max_upstream_response_bytes: 16 * 1024 * 1024,
            audit_budget_bytes: None,
            max_ndjson_line_bytes: 16 * 1024 * 1024,
            max_bundle_json_bytes: 512 * 1024 * 1024,
            import_batch: 5_000,
            import_max_reported_errors: 1_000,
            search_default_count: 50,
            search_max_count: 500,
            search_max_query_bytes: 8 * 1024,
            state_memo_entries: 256,
        }
    }
}
