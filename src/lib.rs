//! clinicbox: an edge appliance that runs vendor plugins, signed and
//! sandboxed, against a clinic's local FHIR data.
//!
//! Module map (one concern each):
//! - [`bundle`]: the `.cbx` format, DSSE signing, verification, trust, store;
//! - [`admin`]: install / rollback / remove, each recorded as a decision;
//! - [`audit`]: the append-only decision log in `audit.db`;
//! - [`clock`]: the trusted clock (never runs backwards);
//! - [`config`], [`limits`]: validated configuration and every bound;
//! - [`datadir`], [`db`], [`state`]: the data dir, SQLite, schemas;
//! - [`group`], [`checkpointer`]: group commit and off-path WAL checkpoints
//!   for the writer threads of `audit.db` and `fhir.db`;
//! - [`keys`], [`scopes`], [`fsutil`]: key files, SMART scopes, atomic I/O;
//! - [`daemon`], [`tokens`], [`update`]: `clinicbox run`: the local API and
//!   its bearer tokens, the inbox, the vendor update channel;
//! - [`cli`]: the command line.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod admin;
pub mod audit;
pub mod bundle;
pub mod checkpointer;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod datadir;
pub mod db;
pub mod fhir;
pub mod fsutil;
pub mod group;
pub mod keys;
pub mod limits;
pub mod priority;
pub mod runtime;
pub mod scopes;
pub mod state;
pub mod sync;
pub mod tokens;
pub mod update;
