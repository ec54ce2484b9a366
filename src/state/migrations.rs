//! Versioned schema migrations, tracked in `PRAGMA user_version`.
//!
//! Migrations only ever get appended; each runs in its own transaction together
//! with the version bump, so a crash mid-migration leaves the previous version.

use anyhow::{bail, Result};
use rusqlite::Connection;

/// Migration N (1-based) brings the schema from version N-1 to N.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: nodes, the audit trail, artifacts.
    "CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        mac TEXT NOT NULL,
        ip TEXT NOT NULL,
        role TEXT NOT NULL,
        stage TEXT NOT NULL,
        reinstall INTEGER NOT NULL DEFAULT 0,
        spec_hash TEXT NOT NULL DEFAULT '',
        bytes_done INTEGER NOT NULL DEFAULT 0,
        bytes_total INTEGER NOT NULL DEFAULT 0,
        detail TEXT NOT NULL DEFAULT '',
        stage_since_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE INDEX nodes_mac ON nodes(mac);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ms INTEGER NOT NULL,
        node TEXT,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT NOT NULL DEFAULT 'null'
    );
    CREATE INDEX events_node ON events(node, id);
    -- The audit trail is append-only.
    CREATE TRIGGER events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
    CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
    CREATE TABLE artifacts (
        name TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        source TEXT NOT NULL,
        fetched_ms INTEGER NOT NULL
    );",
    // 2: DHCP leases, declined addresses, unknown PXE clients.
    "CREATE TABLE leases (
        mac TEXT PRIMARY KEY,
        ip TEXT NOT NULL UNIQUE,
        expires_ms INTEGER NOT NULL,
        is_static INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE quarantine (
        ip TEXT PRIMARY KEY,
        until_ms INTEGER NOT NULL
    );
    CREATE TABLE discovered (
        mac TEXT PRIMARY KEY,
        arch INTEGER,
        vendor_class TEXT NOT NULL DEFAULT '',
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        seen_count INTEGER NOT NULL DEFAULT 1
    );",
    // 3: install attempts (one-time tokens, sessions), pinned host keys, and
    // whether an unfinished install already wrote a node's disk.
    "CREATE TABLE install_attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        node TEXT NOT NULL,
        token_sha256 TEXT NOT NULL UNIQUE,
        session_sha256 TEXT UNIQUE,
        created_ms INTEGER NOT NULL,
        started_ms INTEGER,
        finished_ms INTEGER,
        outcome TEXT
    );
    CREATE INDEX install_attempts_node ON install_attempts(node, id);
    ALTER TABLE nodes ADD COLUMN host_key TEXT NOT NULL DEFAULT '';
    ALTER TABLE nodes ADD COLUMN disk_written INTEGER NOT NULL DEFAULT 0;",
    // 4: facts about the cluster (the server that bootstrapped it).
    "CREATE TABLE cluster (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );",
    // 5: digests looked up in published checksum lists, pinned so later runs
    // never fetch the list again (keyed by the list's URL and the file's name,
    // so changing either pins afresh); and the sha256 of each file verified
    // against a sha512, which keys the artifact cache.
    "CREATE TABLE checksum_pins (
        list TEXT NOT NULL,
        file TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        digest TEXT NOT NULL,
        pinned_ms INTEGER NOT NULL,
        PRIMARY KEY (list, file)
    );
    CREATE TABLE verified_sha512 (
        sha512 TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL,
        verified_ms INTEGER NOT NULL
    );",
    // 6: the cluster domain. Multi-step cluster work (seeding, rollouts,
    // updates) as sagas: every step written before it acts, with what undoing
    // it needs. The GitOps repository (its seeded commit and each file's blob)
    // and its applications (desired revision, sync, health).
    "CREATE TABLE sagas (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        status TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE INDEX sagas_status ON sagas(status, id);
    CREATE TABLE saga_steps (
        saga INTEGER NOT NULL REFERENCES sagas(id),
        seq INTEGER NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        undo TEXT NOT NULL DEFAULT 'null',
        output TEXT NOT NULL DEFAULT 'null',
        error TEXT NOT NULL DEFAULT '',
        started_ms INTEGER,
        finished_ms INTEGER,
        PRIMARY KEY (saga, seq)
    );
    CREATE TABLE gitops_repos (
        name TEXT PRIMARY KEY,
        seeded_commit TEXT NOT NULL DEFAULT '',
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE gitops_files (
        repo TEXT NOT NULL REFERENCES gitops_repos(name),
        path TEXT NOT NULL,
        blob_sha TEXT NOT NULL,
        PRIMARY KEY (repo, path)
    );
    CREATE TABLE apps (
        name TEXT PRIMARY KEY,
        desired_revision TEXT NOT NULL DEFAULT '',
        sync TEXT NOT NULL DEFAULT 'Unknown',
        health TEXT NOT NULL DEFAULT 'Unknown',
        message TEXT NOT NULL DEFAULT '',
        updated_ms INTEGER NOT NULL
    );",
];

/// The schema version this build expects.
pub(crate) fn latest() -> i64 {
    MIGRATIONS.len() as i64
}

/// Bring the database up to the latest version.
pub(crate) fn apply(conn: &mut Connection) -> Result<()> {
    apply_up_to(conn, latest())
}

pub(crate) fn apply_up_to(conn: &mut Connection, target: i64) -> Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > latest() {
        bail!(
            "the state database has schema version {current}, newer than this homelab ({}); \
             upgrade homelab, or point --state-dir elsewhere",
            latest()
        );
    }
    for version in (current + 1)..=target {
        // IMMEDIATE takes the write lock before reading the version, so two
        // processes opening a new database at once (the daemon and `homelab
        // status`) do not both run the same migration.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if now >= version {
            continue;
        }
        tx.execute_batch(MIGRATIONS[(version - 1) as usize])?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
    }
    Ok(())
}
