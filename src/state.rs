//! The state database (`state.db`): what the appliance is configured to
//! trust and run. Its schema, as ordered migrations.
//!
//! Invariant: a refused bundle never writes here; only accepted installs,
//! removals, rollbacks and trust changes do, each in one transaction.

/// Ordered migrations; index + 1 is the schema version.
pub const MIGRATIONS: &[&str] = &[
    // 1: trust store, installed plugins, version floors.
    "
    CREATE TABLE trusted_keys (
        key_id      TEXT PRIMARY KEY,          -- hex sha256 of public_key
        public_key  BLOB NOT NULL UNIQUE,      -- 32 raw bytes
        comment     TEXT NOT NULL,
        added_at    TEXT NOT NULL,             -- RFC 3339
        revoked_at  TEXT                       -- NULL while trusted; permanent
    ) STRICT;
    CREATE TABLE namespaces (
        namespace   TEXT PRIMARY KEY,          -- 'vendor/' or 'vendor/name'
        threshold   INTEGER NOT NULL CHECK (threshold >= 1)
    ) STRICT;
    CREATE TABLE delegations (
        namespace   TEXT NOT NULL REFERENCES namespaces(namespace),
        key_id      TEXT NOT NULL REFERENCES trusted_keys(key_id),
        PRIMARY KEY (namespace, key_id)
    ) STRICT;
    CREATE TABLE plugin_versions (
        digest        TEXT PRIMARY KEY,        -- sha256 of the signed manifest
        name          TEXT NOT NULL,
        version       TEXT NOT NULL,
        wasm_sha256   TEXT NOT NULL,
        wasm_size     INTEGER NOT NULL,
        bundle_sha256 TEXT NOT NULL,           -- sha256 of the .cbx file stored
        signers       TEXT NOT NULL,           -- JSON array of key ids
        manifest      TEXT NOT NULL,           -- the signed manifest JSON
        installed_at  TEXT NOT NULL
    ) STRICT;
    CREATE TABLE plugins (
        name          TEXT PRIMARY KEY,
        current       TEXT NOT NULL REFERENCES plugin_versions(digest),
        previous      TEXT REFERENCES plugin_versions(digest),
        updated_at    TEXT NOT NULL
    ) STRICT;
    CREATE TABLE version_floors (
        name          TEXT PRIMARY KEY,        -- survives `plugin remove`
        version       TEXT NOT NULL,           -- highest version ever accepted
        digest        TEXT NOT NULL            -- its manifest digest
    ) STRICT;
    ",
    // 2: per-tenant scope grants, and quarantine after repeated failures.
    "
    CREATE TABLE plugin_grants (
        tenant      TEXT NOT NULL,
        plugin      TEXT NOT NULL,
        scope       TEXT NOT NULL,             -- canonical SMART v2 scope
        granted_at  TEXT NOT NULL,
        PRIMARY KEY (tenant, plugin, scope)
    ) STRICT;
    CREATE TABLE plugin_health (
        plugin                TEXT PRIMARY KEY,
        consecutive_failures  INTEGER NOT NULL DEFAULT 0,
        quarantined_at        TEXT,            -- set after Limits::quarantine_after failures
        reason                TEXT
    ) STRICT;
    ",
    // 3: anchors: audit checkpoints that left the box (acknowledged by
    // upstream, or exported), kept apart from audit.db so that `audit
    // verify` can detect a truncated log.
    "
    CREATE TABLE audit_anchors (
        size        INTEGER NOT NULL,
        checkpoint  TEXT NOT NULL,                 -- the signed checkpoint, JSON
        source      TEXT NOT NULL CHECK (source IN ('upstream', 'export')),
        time        TEXT NOT NULL,
        PRIMARY KEY (source, size)
    ) STRICT;
    -- sync down: per tenant and type, how far the cache is refreshed.
    CREATE TABLE pull_cursors (
        tenant        TEXT NOT NULL,
        type          TEXT NOT NULL,
        last_updated  TEXT,            -- everything up to here is in the cache
        pending_max   TEXT,            -- newest seen in the chain in progress
        next_url      TEXT,            -- where the chain in progress goes on
        PRIMARY KEY (tenant, type)
    ) STRICT;
    ",
    // 4: bearer tokens of the local API (hashes only) and the update
    // channel's last accepted index (rollback / freeze defence).
    "
    CREATE TABLE api_tokens (
        id          TEXT PRIMARY KEY,          -- public handle, 'tok_' + 8 hex
        name        TEXT NOT NULL UNIQUE,
        role        TEXT NOT NULL CHECK (role IN ('device', 'app', 'admin')),
        tenant      TEXT NOT NULL,
        scopes      TEXT NOT NULL,             -- JSON array of SMART v2 scopes
        hash        BLOB NOT NULL UNIQUE,      -- sha256 of the secret
        created_at  TEXT NOT NULL,
        revoked_at  TEXT                       -- NULL while valid; permanent
    ) STRICT;
    CREATE TABLE update_channel (
        url         TEXT PRIMARY KEY,
        version     INTEGER NOT NULL,          -- highest index version accepted
        expires     TEXT NOT NULL,
        digest      TEXT NOT NULL,             -- sha256 of that index envelope
        checked_at  TEXT NOT NULL
    ) STRICT;
    ",
];
