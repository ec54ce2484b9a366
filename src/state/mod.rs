//! The controller's memory: an embedded SQLite database (WAL) in the state dir,
//! plus secret files (mode 0600) beside it.
//!
//! Every state transition is committed before the controller acts on it, so a
//! crash or `kill -9` at any point leaves a database that opens clean and a
//! daemon that resumes where it stopped. Events are append-only: they are the
//! audit trail and the feed for progress lines, `homelab events` and SSE.
//!
//! By concern: this file holds the handle, the schema and the audit trail;
//! `nodes` the machines and their lifecycle, `leases` DHCP, `installs` the
//! install attempts, `artifacts` the verified files and checksum pins, and
//! `cluster` what belongs to the cluster (sagas, the GitOps repository, apps,
//! the bootstrap server).

mod artifacts;
mod cluster;
mod installs;
mod leases;
mod lock;
mod migrations;
mod nodes;
mod secrets;

pub use artifacts::*;
pub use cluster::{AppRecord, RepoSeed};
pub use installs::*;
pub use leases::*;
pub use lock::{DaemonLock, LockError};
pub use nodes::*;
pub use secrets::{read_secret, secret_path, write_secret};

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::lifecycle::{self, NodeEvent};

/// Default state directory.
pub const DEFAULT_DIR: &str = "/var/lib/homelab";
const DB_FILE: &str = "homelab.db";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: i64,
    pub ts_ms: i64,
    pub node: Option<String>,
    pub kind: String,
    pub message: String,
    pub data: serde_json::Value,
}

/// Handle on the state database. Cheap to clone; safe to share between tasks.
#[derive(Clone)]
pub struct State {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    conn: Mutex<Connection>,
    events: broadcast::Sender<Event>,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

/// Create the state dir (mode 0700) if it does not exist.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating state dir {}", dir.display()))?;
    }
    Ok(())
}

impl State {
    /// Open (creating if needed) the database in `dir` and bring its schema up to date.
    pub fn open(dir: &Path) -> Result<State> {
        ensure_dir(dir)?;
        let path = dir.join(DB_FILE);
        let mut conn = Connection::open(&path)
            .with_context(|| format!("opening state database {}", path.display()))?;
        configure(&conn).with_context(|| format!("configuring {}", path.display()))?;
        migrations::apply(&mut conn).with_context(|| format!("migrating {}", path.display()))?;
        restrict_permissions(&path);
        let (events, _) = broadcast::channel(4096);
        Ok(State {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                conn: Mutex::new(conn),
                events,
            }),
        })
    }

    /// Open an existing database without creating anything (for `status`, `events`).
    pub fn open_existing(dir: &Path) -> Result<Option<State>> {
        if !dir.join(DB_FILE).exists() {
            return Ok(None);
        }
        State::open(dir).map(Some)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll back).
        self.inner.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run SQL on the connection (tests inject failures with triggers).
    #[cfg(test)]
    pub(crate) fn execute_batch(&self, sql: &str) -> Result<()> {
        Ok(self.conn().execute_batch(sql)?)
    }

    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Events appended through this handle (in this process), as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    // ---- events ----

    /// Append one event to the audit trail.
    pub fn append_event(
        &self,
        node: Option<&str>,
        kind: &str,
        message: &str,
        data: serde_json::Value,
    ) -> Result<Event> {
        let conn = self.conn();
        let ev = insert_event(&conn, node, kind, message, data)?;
        drop(conn);
        let _ = self.inner.events.send(ev.clone());
        Ok(ev)
    }

    /// Events with id greater than `after`, oldest first, at most `limit`.
    pub fn events_after(&self, after: i64, node: Option<&str>, limit: usize) -> Result<Vec<Event>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, ts_ms, node, kind, message, data FROM events
             WHERE id > ?1 AND (?2 IS NULL OR node = ?2) ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![after, node, limit as i64], event_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The last `n` events (oldest first).
    pub fn last_events(&self, n: usize, node: Option<&str>) -> Result<Vec<Event>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, ts_ms, node, kind, message, data FROM events
             WHERE (?1 IS NULL OR node = ?1) ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![node, n as i64], event_from_row)?;
        let mut v: Vec<Event> = rows.collect::<rusqlite::Result<_>>()?;
        v.reverse();
        Ok(v)
    }

    pub fn last_event_id(&self) -> Result<i64> {
        Ok(self
            .conn()
            .query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?)
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL in WAL mode is crash-safe (no corruption); FULL makes each commit durable
    // across power loss too, which is what "persist before acting" needs.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

fn restrict_permissions(db: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", db.display()));
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
    }
}

const NODE_COLS: &str = "name, mac, ip, role, stage, reinstall, spec_hash, bytes_done, bytes_total, detail, stage_since_ms, updated_ms";

fn event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let data: String = r.get(5)?;
    Ok(Event {
        id: r.get(0)?,
        ts_ms: r.get(1)?,
        node: r.get(2)?,
        kind: r.get(3)?,
        message: r.get(4)?,
        data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
    })
}

fn insert_event(
    conn: &Connection,
    node: Option<&str>,
    kind: &str,
    message: &str,
    data: serde_json::Value,
) -> Result<Event> {
    let ts = now_ms();
    let text = data.to_string();
    conn.prepare_cached(
        "INSERT INTO events (ts_ms, node, kind, message, data) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![ts, node, kind, message, text])?;
    Ok(Event {
        id: conn.last_insert_rowid(),
        ts_ms: ts,
        node: node.map(str::to_owned),
        kind: kind.to_owned(),
        message: message.to_owned(),
        data,
    })
}

#[cfg(test)]
mod tests;
