//! The controller's memory: an embedded SQLite database (WAL) in the state dir,
//! plus secret files (mode 0600) beside it.
//!
//! Every state transition is committed before the controller acts on it, so a
//! crash or `kill -9` at any point leaves a database that opens clean and a
//! daemon that resumes where it stopped. Events are append-only: they are the
//! audit trail and the feed for progress lines, `homelab events` and SSE.

mod cluster;
mod lock;
mod migrations;
mod secrets;

pub use cluster::{AppRecord, RepoSeed};
pub use lock::{DaemonLock, LockError};
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

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// In the inventory, not yet seen on the network.
    Pending,
    /// Seen by DHCP; firmware is fetching its boot program or script.
    Booting,
    /// Booted its custom boot profile (kernel and initrds served).
    Booted,
    /// The installer is writing the OS image.
    Installing,
    /// The image is on disk and verified; the node boots its own disk from
    /// now on and is starting the installed system for the first time.
    Rebooting,
    /// The installed system came up and phoned home with the pinned host key.
    Installed,
    /// Reachable over SSH with the pinned host key.
    Ready,
    /// Installed, but the controller could not log in over SSH with the
    /// pinned host key; the detail says why. The disk is left alone.
    Unreachable,
    /// k3s is being installed and started on the node.
    Joining,
    /// k3s runs and the node is Ready in the cluster.
    Running,
    /// Installed and reachable, but k3s did not come up; the detail says
    /// why. The disk is left alone; a re-run tries again.
    ClusterFailed,
    /// Something went wrong; see the node's events.
    Failed,
    /// Taken out of the inventory while in the cluster: being cordoned,
    /// drained and deleted from the cluster, then k3s is uninstalled.
    Removing,
    /// Taking the node out of the cluster failed; the detail says why. A
    /// re-run tries again.
    RemoveFailed,
    /// Taken out of the inventory with its installed OS left on the disk
    /// (and k3s uninstalled). Put back into the inventory, it is checked
    /// over SSH and joins again, without a reinstall.
    Released,
    /// Taken out of the inventory (it had no installed OS).
    Removed,
    /// Taken out of the inventory and its removal given up with
    /// `homelab forget`: k3s may still be on its disk. Put back into the
    /// inventory, it is checked over SSH and configured again, like a
    /// released node.
    Forgotten,
}

impl Stage {
    pub const ALL: [Stage; 17] = [
        Stage::Pending,
        Stage::Booting,
        Stage::Booted,
        Stage::Installing,
        Stage::Rebooting,
        Stage::Installed,
        Stage::Ready,
        Stage::Unreachable,
        Stage::Joining,
        Stage::Running,
        Stage::ClusterFailed,
        Stage::Failed,
        Stage::Removing,
        Stage::RemoveFailed,
        Stage::Released,
        Stage::Removed,
        Stage::Forgotten,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pending => "pending",
            Stage::Booting => "booting",
            Stage::Booted => "booted",
            Stage::Installing => "installing",
            Stage::Rebooting => "rebooting",
            Stage::Installed => "installed",
            Stage::Ready => "ready",
            Stage::Unreachable => "unreachable",
            Stage::Joining => "joining",
            Stage::Running => "running",
            Stage::ClusterFailed => "cluster-failed",
            Stage::Failed => "failed",
            Stage::Removing => "removing",
            Stage::RemoveFailed => "remove-failed",
            Stage::Released => "released",
            Stage::Removed => "removed",
            Stage::Forgotten => "forgotten",
        }
    }
    /// The OS is on the node's disk: it must never be wiped without a request.
    pub fn has_installed_os(self) -> bool {
        matches!(
            self,
            Stage::Rebooting
                | Stage::Installed
                | Stage::Ready
                | Stage::Unreachable
                | Stage::Joining
                | Stage::Running
                | Stage::ClusterFailed
        )
    }

    /// The node stopped short of its goal and needs the user's attention.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Stage::Failed | Stage::Unreachable | Stage::ClusterFailed | Stage::RemoveFailed
        )
    }

    /// k3s may be on the node: taking it out of the inventory must take it
    /// out of the cluster and uninstall k3s.
    pub fn may_run_k3s(self) -> bool {
        matches!(
            self,
            Stage::Joining
                | Stage::Running
                | Stage::ClusterFailed
                | Stage::Removing
                | Stage::RemoveFailed
        )
    }

    /// The node is out of the inventory and nothing is left to do for it.
    pub fn is_gone(self) -> bool {
        matches!(self, Stage::Released | Stage::Removed | Stage::Forgotten)
    }

    /// Out of the inventory with its installed OS kept: put back, it joins
    /// again without a reinstall.
    pub fn is_kept_out(self) -> bool {
        matches!(
            self,
            Stage::Released | Stage::Removing | Stage::RemoveFailed | Stage::Forgotten
        )
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Stage::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown stage `{s}`"))
    }
}

/// A node as the controller remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub mac: String,
    pub ip: String,
    pub role: String,
    pub stage: Stage,
    /// The user asked for a (re)install; cleared once the install starts.
    pub reinstall: bool,
    /// A fingerprint of the inventory stanza last applied (to detect edits).
    pub spec_hash: String,
    /// Bytes done / total for the current stage, where there are bytes.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Human-readable detail of the current stage (last step, or failure cause).
    pub detail: String,
    pub stage_since_ms: i64,
    pub updated_ms: i64,
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

/// A DHCP lease (authoritative mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub mac: String,
    pub ip: String,
    pub expires_ms: i64,
    /// Static leases come from the inventory and never expire.
    pub is_static: bool,
}

/// One change to the lease table, as the DHCP server queues it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseWrite {
    /// Store a lease; whatever else held its address goes first (an expired
    /// lease being reused), and the client's own older lease with it.
    Bind(Lease),
    /// The client gave its address back.
    Release { mac: String },
    /// Keep an address out of the pool until `until_ms` (a client DECLINEd it).
    Quarantine { ip: String, until_ms: i64 },
}

/// A PXE client that is not in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovered {
    pub mac: String,
    pub arch: Option<u16>,
    pub vendor_class: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub seen_count: i64,
}

/// A verified, cached file (OS image, kernel, k3s release...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub name: String,
    pub sha256: String,
    pub path: String,
    pub size: u64,
    pub source: String,
    pub fetched_ms: i64,
}

/// A digest looked up in a published checksum list and pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumPin {
    /// The list's https URL or absolute path, as the inventory names it.
    pub list: String,
    /// The file name looked up in it.
    pub file: String,
    pub algorithm: crate::inventory::Algorithm,
    pub digest: String,
    pub pinned_ms: i64,
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

    // ---- nodes ----

    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {NODE_COLS} FROM nodes ORDER BY name"))?;
        let rows = stmt.query_map([], node_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn node(&self, name: &str) -> Result<Option<NodeRecord>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {NODE_COLS} FROM nodes WHERE name = ?1"))?;
        Ok(stmt.query_row([name], node_from_row).optional()?)
    }

    /// The node with this MAC that is not gone (see [`Stage::is_gone`]).
    pub fn node_by_mac(&self, mac: &str) -> Result<Option<NodeRecord>> {
        Ok(self
            .nodes()?
            .into_iter()
            .find(|r| r.mac == mac && !r.stage.is_gone()))
    }

    /// Insert or replace a node record, with an event, in one transaction.
    pub fn put_node(&self, rec: &NodeRecord, event_kind: &str, message: &str) -> Result<Event> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO nodes (name, mac, ip, role, stage, reinstall, spec_hash, bytes_done, bytes_total, detail, stage_since_ms, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT(name) DO UPDATE SET mac=excluded.mac, ip=excluded.ip, role=excluded.role,
               stage=excluded.stage, reinstall=excluded.reinstall, spec_hash=excluded.spec_hash,
               bytes_done=excluded.bytes_done, bytes_total=excluded.bytes_total, detail=excluded.detail,
               stage_since_ms=excluded.stage_since_ms, updated_ms=excluded.updated_ms",
            params![
                rec.name,
                rec.mac,
                rec.ip,
                rec.role,
                rec.stage.as_str(),
                rec.reinstall,
                rec.spec_hash,
                rec.bytes_done as i64,
                rec.bytes_total as i64,
                rec.detail,
                rec.stage_since_ms,
                rec.updated_ms
            ],
        )?;
        let ev = insert_event(
            &tx,
            Some(&rec.name),
            event_kind,
            message,
            serde_json::json!({ "stage": rec.stage, "mac": rec.mac, "ip": rec.ip }),
        )?;
        tx.commit()?;
        drop(conn);
        let _ = self.inner.events.send(ev.clone());
        Ok(ev)
    }

    /// Apply a lifecycle event to a node: its stage moves where
    /// [`lifecycle::transition`] says (byte counters reset), with an event,
    /// as one compare-and-set transaction: the stage is read and written in
    /// the same (immediate) transaction, so a daemon and a command cannot
    /// both win. Returns the event written, or None when the node does not
    /// exist or its lifecycle refuses `event` from the stage it is at now
    /// (nothing is written then).
    pub fn transition(&self, name: &str, event: NodeEvent, message: &str) -> Result<Option<Event>> {
        self.transition_with(name, event, message, None)
    }

    /// [`State::transition`] that also rewrites the record's inventory
    /// fields (mac, ip, role, fingerprint) from `fields`, in the same
    /// transaction: a node put back into the inventory, say.
    pub fn transition_with(
        &self,
        name: &str,
        event: NodeEvent,
        message: &str,
        fields: Option<&NodeRecord>,
    ) -> Result<Option<Event>> {
        let mut conn = self.conn();
        // Most refusals (a DHCP retry of a node that is booting already) are
        // answered by a plain read, without taking the write lock; an allowed
        // move is checked again inside the write transaction (the CAS).
        if next_stage(&conn, name, event)?.is_err() {
            return Ok(None);
        }
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Ok(to) = next_stage(&tx, name, event)? else {
            return Ok(None);
        };
        let ev = write_stage(&tx, name, to, message, serde_json::Value::Null)?;
        if let Some(f) = fields {
            tx.execute(
                "UPDATE nodes SET mac = ?2, ip = ?3, role = ?4, spec_hash = ?5 WHERE name = ?1",
                params![name, f.mac, f.ip, f.role, f.spec_hash],
            )?;
        }
        tx.commit()?;
        drop(conn);
        let _ = self.inner.events.send(ev.clone());
        Ok(Some(ev))
    }

    /// Rewrite a known node's inventory fields (mac, ip, role, fingerprint)
    /// from `fields`, and with `reinstall` ask for a reinstall; its stage
    /// stays where it is. With an event. None when there is no such node.
    pub fn update_node(
        &self,
        fields: &NodeRecord,
        reinstall: bool,
        event_kind: &str,
        message: &str,
    ) -> Result<Option<Event>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = tx.execute(
            "UPDATE nodes SET mac = ?2, ip = ?3, role = ?4, spec_hash = ?5,
               reinstall = reinstall OR ?6, updated_ms = ?7 WHERE name = ?1",
            params![
                fields.name,
                fields.mac,
                fields.ip,
                fields.role,
                fields.spec_hash,
                reinstall,
                now_ms()
            ],
        )?;
        if n == 0 {
            return Ok(None);
        }
        let ev = insert_event(
            &tx,
            Some(&fields.name),
            event_kind,
            message,
            serde_json::json!({ "mac": fields.mac, "ip": fields.ip, "role": fields.role }),
        )?;
        tx.commit()?;
        drop(conn);
        let _ = self.inner.events.send(ev.clone());
        Ok(Some(ev))
    }

    /// Put a node at `stage` whatever its lifecycle says: for tests that
    /// start from a given stage, never for the controller's own work.
    #[doc(hidden)]
    pub fn force_stage(&self, name: &str, stage: Stage, message: &str) -> Result<Option<Event>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if self.node_in(&tx, name)?.is_none() {
            return Ok(None);
        }
        let ev = write_stage(&tx, name, stage, message, serde_json::Value::Null)?;
        tx.commit()?;
        drop(conn);
        let _ = self.inner.events.send(ev.clone());
        Ok(Some(ev))
    }

    fn node_in(&self, tx: &Connection, name: &str) -> Result<Option<String>> {
        Ok(tx
            .query_row("SELECT stage FROM nodes WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Record progress within a stage (bytes), with an event.
    pub fn set_progress(&self, name: &str, done: u64, total: u64, message: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE nodes SET bytes_done = ?2, bytes_total = ?3, detail = ?4, updated_ms = ?5 WHERE name = ?1",
            params![name, done as i64, total as i64, message, now_ms()],
        )?;
        let ev = insert_event(
            &tx,
            Some(name),
            "progress",
            message,
            serde_json::json!({ "bytes_done": done, "bytes_total": total }),
        )?;
        tx.commit()?;
        drop(conn);
        let _ = self.inner.events.send(ev);
        Ok(())
    }

    pub fn set_reinstall(&self, name: &str, reinstall: bool) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE nodes SET reinstall = ?2, updated_ms = ?3 WHERE name = ?1",
            params![name, reinstall, now_ms()],
        )?;
        Ok(n > 0)
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

    // ---- leases ----

    pub fn lease_by_mac(&self, mac: &str) -> Result<Option<Lease>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT mac, ip, expires_ms, is_static FROM leases WHERE mac = ?1")?;
        Ok(stmt.query_row([mac], lease_from_row).optional()?)
    }

    pub fn lease_by_ip(&self, ip: &str) -> Result<Option<Lease>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT mac, ip, expires_ms, is_static FROM leases WHERE ip = ?1")?;
        Ok(stmt.query_row([ip], lease_from_row).optional()?)
    }

    pub fn leases(&self) -> Result<Vec<Lease>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT mac, ip, expires_ms, is_static FROM leases ORDER BY ip")?;
        let rows = stmt.query_map([], lease_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Write a lease. The database refuses two leases for one address (UNIQUE ip):
    /// any other holder of that address must have been removed first.
    pub fn put_lease(&self, lease: &Lease) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM leases WHERE mac = ?1", [&lease.mac])?;
        tx.execute(
            "INSERT INTO leases (mac, ip, expires_ms, is_static) VALUES (?1, ?2, ?3, ?4)",
            params![lease.mac, lease.ip, lease.expires_ms, lease.is_static],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Commit the lease writes of several packets in one transaction: one
    /// fsync for all of them. Each packet's writes stand or fall together (a
    /// savepoint each), so one refused write costs only its own packet.
    /// `Err` when the commit itself failed: then nothing of the batch is stored.
    pub fn commit_leases(&self, packets: &[&[LeaseWrite]]) -> Result<Vec<Result<()>>> {
        let mut conn = self.conn();
        let mut tx = conn.transaction()?;
        let mut outcomes = Vec::with_capacity(packets.len());
        for writes in packets {
            let sp = tx.savepoint()?;
            let applied = writes.iter().try_for_each(|w| apply_lease_write(&sp, w));
            outcomes.push(match applied {
                Ok(()) => sp.commit().map_err(Into::into),
                // Dropping the savepoint rolls this packet's writes back.
                Err(e) => Err(e.into()),
            });
        }
        tx.commit().context("committing leases")?;
        Ok(outcomes)
    }

    pub fn delete_lease(&self, mac: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM leases WHERE mac = ?1", [mac])?
            > 0)
    }

    /// Mark an address as unusable until `until_ms` (a client DECLINEd it).
    pub fn quarantine_ip(&self, ip: &str, until_ms: i64) -> Result<()> {
        let write = LeaseWrite::Quarantine {
            ip: ip.to_owned(),
            until_ms,
        };
        self.commit_leases(&[std::slice::from_ref(&write)])?
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Addresses quarantined after a DECLINE whose quarantine has not ended.
    pub fn quarantined_ips(&self, now_ms: i64) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT ip FROM quarantine WHERE until_ms > ?1")?;
        let rows = stmt.query_map([now_ms], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ---- discovered clients ----

    /// Record a sighting of an unknown PXE client.
    pub fn record_discovered(
        &self,
        mac: &str,
        arch: Option<u16>,
        vendor_class: &str,
    ) -> Result<bool> {
        let conn = self.conn();
        let now = now_ms();
        let changed = conn.execute(
            "UPDATE discovered SET last_seen_ms = ?2, seen_count = seen_count + 1,
               arch = COALESCE(?3, arch), vendor_class = CASE WHEN ?4 = '' THEN vendor_class ELSE ?4 END
             WHERE mac = ?1",
            params![mac, now, arch, vendor_class],
        )?;
        if changed > 0 {
            return Ok(false);
        }
        conn.execute(
            "INSERT INTO discovered (mac, arch, vendor_class, first_seen_ms, last_seen_ms, seen_count)
             VALUES (?1, ?2, ?3, ?4, ?4, 1)",
            params![mac, arch, vendor_class, now],
        )?;
        Ok(true)
    }

    pub fn discovered(&self) -> Result<Vec<Discovered>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT mac, arch, vendor_class, first_seen_ms, last_seen_ms, seen_count FROM discovered ORDER BY first_seen_ms",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Discovered {
                mac: r.get(0)?,
                arch: r.get::<_, Option<i64>>(1)?.map(|a| a as u16),
                vendor_class: r.get(2)?,
                first_seen_ms: r.get(3)?,
                last_seen_ms: r.get(4)?,
                seen_count: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn forget_discovered(&self, mac: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM discovered WHERE mac = ?1", [mac])?;
        Ok(())
    }

    // ---- artifacts ----

    pub fn put_artifact(&self, a: &Artifact) -> Result<()> {
        self.conn().execute(
            "INSERT INTO artifacts (name, sha256, path, size, source, fetched_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(name) DO UPDATE SET sha256=excluded.sha256, path=excluded.path, size=excluded.size,
               source=excluded.source, fetched_ms=excluded.fetched_ms",
            params![a.name, a.sha256, a.path, a.size as i64, a.source, a.fetched_ms],
        )?;
        Ok(())
    }

    // ---- checksum pins ----

    /// Pin `pin` unless (list, file) is pinned already; returns the pin in force
    /// (the first one wins when two processes look the list up at once).
    pub fn pin_checksum(&self, pin: &ChecksumPin) -> Result<ChecksumPin> {
        self.conn().execute(
            "INSERT INTO checksum_pins (list, file, algorithm, digest, pinned_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(list, file) DO NOTHING",
            params![pin.list, pin.file, pin.algorithm.name(), pin.digest, pin.pinned_ms],
        )?;
        self.checksum_pin(&pin.list, &pin.file)?
            .context("the checksum pin just written is not there")
    }

    pub fn checksum_pin(&self, list: &str, file: &str) -> Result<Option<ChecksumPin>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT list, file, algorithm, digest, pinned_ms FROM checksum_pins WHERE list = ?1 AND file = ?2",
        )?;
        let row = stmt
            .query_row([list, file], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .optional()?;
        row.map(|(list, file, algorithm, digest, pinned_ms)| {
            Ok(ChecksumPin {
                list,
                file,
                algorithm: algorithm.parse().map_err(anyhow::Error::msg)?,
                digest,
                pinned_ms,
            })
        })
        .transpose()
    }

    /// Drop the pin of (list, file); true if there was one.
    pub fn unpin_checksum(&self, list: &str, file: &str) -> Result<bool> {
        Ok(self.conn().execute(
            "DELETE FROM checksum_pins WHERE list = ?1 AND file = ?2",
            [list, file],
        )? > 0)
    }

    /// Remember that the bytes with this sha512 have this sha256.
    pub fn put_verified_sha512(&self, sha512: &str, sha256: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO verified_sha512 (sha512, sha256, verified_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(sha512) DO UPDATE SET sha256 = excluded.sha256, verified_ms = excluded.verified_ms",
            params![sha512, sha256, now_ms()],
        )?;
        Ok(())
    }

    /// The sha256 of the file once verified against this sha512.
    pub fn verified_sha512(&self, sha512: &str) -> Result<Option<String>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT sha256 FROM verified_sha512 WHERE sha512 = ?1")?;
        Ok(stmt.query_row([sha512], |r| r.get(0)).optional()?)
    }

    pub fn artifact(&self, name: &str) -> Result<Option<Artifact>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, sha256, path, size, source, fetched_ms FROM artifacts WHERE name = ?1",
        )?;
        Ok(stmt
            .query_row([name], |r| {
                Ok(Artifact {
                    name: r.get(0)?,
                    sha256: r.get(1)?,
                    path: r.get(2)?,
                    size: r.get::<_, i64>(3)? as u64,
                    source: r.get(4)?,
                    fetched_ms: r.get(5)?,
                })
            })
            .optional()?)
    }
}

/// What [`State::start_install`] made of an installer's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallStart {
    /// The attempt began: it and its session credential.
    Started(Attempt, String),
    /// The token is unknown, used or expired.
    BadToken,
    /// The node's lifecycle does not install from where it is (an
    /// installed disk without a reinstall request, a node taken out).
    Refused(lifecycle::Refused),
}

/// One install attempt, as the controller tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The row: unique across nodes.
    pub id: i64,
    pub node: String,
    /// Which attempt of this node it is: 1 for its first install.
    pub number: i64,
}

/// Which of `node`'s started install attempts row `id` is, counting from 1.
fn attempt_number(conn: &rusqlite::Connection, node: &str, id: i64) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM install_attempts
          WHERE node = ?1 AND id <= ?2 AND started_ms IS NOT NULL",
        params![node, id],
        |r| r.get(0),
    )?)
}

/// Tokens of install scripts expire after this long unused.
pub const INSTALL_TOKEN_TTL_MS: i64 = 3600 * 1000;

fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl State {
    /// Mint a one-time token for an install script served to `node`. Only
    /// its hash is stored.
    pub fn new_install_token(&self, node: &str) -> Result<String> {
        let token = random_token();
        self.conn().execute(
            "INSERT INTO install_attempts (node, token_sha256, created_ms) VALUES (?1, ?2, ?3)",
            params![node, sha256_hex(&token), now_ms()],
        )?;
        Ok(token)
    }

    /// Consume `token` for `node`: the attempt starts, the node is
    /// Installing, and a session credential for the rest of the attempt is
    /// returned. None when the token is unknown, used or expired.
    pub fn start_install(&self, node: &str, token: &str) -> Result<InstallStart> {
        let session = random_token();
        let now = now_ms();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let id: Option<i64> = tx
            .query_row(
                "SELECT id FROM install_attempts WHERE node = ?1 AND token_sha256 = ?2
                   AND started_ms IS NULL AND created_ms > ?3",
                params![node, sha256_hex(token), now - INSTALL_TOKEN_TTL_MS],
                |r| r.get(0),
            )
            .optional()?;
        // The guard against wiping an installed disk is the lifecycle's,
        // checked in this transaction: a reinstall request is the only way.
        let reinstall: bool = tx
            .query_row("SELECT reinstall FROM nodes WHERE name = ?1", [node], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(false);
        let to = match next_stage(&tx, node, NodeEvent::InstallStarted { reinstall })? {
            Ok(to) => to,
            Err(NotMoved::Refused(r)) => return Ok(InstallStart::Refused(r)),
            Err(NotMoved::NoSuchNode) => return Ok(InstallStart::BadToken),
        };
        let Some(id) = id else {
            return Ok(InstallStart::BadToken);
        };
        tx.execute(
            "UPDATE install_attempts SET started_ms = ?2, session_sha256 = ?3 WHERE id = ?1",
            params![id, now, sha256_hex(&session)],
        )?;
        // Earlier attempts of this node are over: their sessions stop working.
        tx.execute(
            "UPDATE install_attempts SET finished_ms = ?3, outcome = 'superseded'
             WHERE node = ?1 AND id != ?2 AND finished_ms IS NULL",
            params![node, id, now],
        )?;
        let number = attempt_number(&tx, node, id)?;
        let ev = write_stage(
            &tx,
            node,
            to,
            &format!("the installer fetched its plan (attempt {number})"),
            serde_json::json!({ "attempt": number }),
        )?;
        tx.execute(
            "UPDATE nodes SET detail = 'installer started' WHERE name = ?1",
            [node],
        )?;
        tx.commit()?;
        drop(conn);
        let _ = self.inner.events.send(ev);
        Ok(InstallStart::Started(
            Attempt {
                id,
                node: node.to_string(),
                number,
            },
            session,
        ))
    }

    /// The running attempt `session` belongs to, if it is still running.
    pub fn install_session(&self, node: &str, session: &str) -> Result<Option<Attempt>> {
        let conn = self.conn();
        let id = conn
            .query_row(
                "SELECT id FROM install_attempts WHERE node = ?1 AND session_sha256 = ?2
                   AND finished_ms IS NULL",
                params![node, sha256_hex(session)],
                |r| r.get(0),
            )
            .optional()?;
        let Some(id) = id else {
            return Ok(None);
        };
        Ok(Some(Attempt {
            id,
            node: node.to_string(),
            number: attempt_number(&conn, node, id)?,
        }))
    }

    /// The attempt's image is on disk: pin the host key the node generated,
    /// clear the reinstall request, and let the node boot its disk.
    pub fn finish_install(&self, attempt: &Attempt, host_key: &str, message: &str) -> Result<()> {
        self.end_attempt(
            attempt,
            "done",
            NodeEvent::ImageWritten,
            message,
            Some(host_key),
        )
    }

    /// The attempt failed; the node can be retried.
    pub fn fail_install(&self, attempt: &Attempt, error: &str) -> Result<()> {
        self.end_attempt(
            attempt,
            "failed",
            NodeEvent::InstallFailed,
            &format!("install failed: {error}"),
            None,
        )
    }

    /// The attempt's outcome is recorded; the node moves (and the host key
    /// is pinned) only if its lifecycle takes the event from where it is
    /// now (it may have been taken out of the inventory meanwhile).
    fn end_attempt(
        &self,
        attempt: &Attempt,
        outcome: &str,
        event: NodeEvent,
        message: &str,
        host_key: Option<&str>,
    ) -> Result<()> {
        let now = now_ms();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE install_attempts SET finished_ms = ?2, outcome = ?3 WHERE id = ?1",
            params![attempt.id, now, outcome],
        )?;
        let mut sent = None;
        if let Ok(to) = next_stage(&tx, &attempt.node, event)? {
            if let Some(key) = host_key {
                tx.execute(
                    "UPDATE nodes SET host_key = ?2, reinstall = 0, disk_written = 0 WHERE name = ?1",
                    params![attempt.node, key],
                )?;
            }
            sent = Some(write_stage(
                &tx,
                &attempt.node,
                to,
                message,
                serde_json::json!({ "attempt": attempt.number }),
            )?);
        }
        tx.commit()?;
        drop(conn);
        if let Some(ev) = sent {
            let _ = self.inner.events.send(ev);
        }
        Ok(())
    }

    /// An unfinished install wrote the node's disk: a retry may overwrite it.
    pub fn set_disk_written(&self, node: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE nodes SET disk_written = 1 WHERE name = ?1",
            params![node],
        )?;
        Ok(())
    }

    pub fn disk_written(&self, node: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT disk_written FROM nodes WHERE name = ?1",
                [node],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(false))
    }

    /// The server that bootstrapped the cluster (`cluster-init`), once one has.
    pub fn bootstrap_server(&self) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT value FROM cluster WHERE key = 'bootstrap_server'",
                [],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Records the server the cluster was bootstrapped on (or now runs through).
    pub fn set_bootstrap_server(&self, node: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO cluster (key, value) VALUES ('bootstrap_server', ?1) \
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [node],
        )?;
        Ok(())
    }

    /// The node's pinned SSH host key (OpenSSH public line), once installed.
    pub fn host_key(&self, node: &str) -> Result<Option<String>> {
        let key: Option<String> = self
            .conn()
            .query_row("SELECT host_key FROM nodes WHERE name = ?1", [node], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(key.filter(|k| !k.is_empty()))
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

fn node_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRecord> {
    let stage: String = r.get(4)?;
    Ok(NodeRecord {
        name: r.get(0)?,
        mac: r.get(1)?,
        ip: r.get(2)?,
        role: r.get(3)?,
        stage: stage.parse().map_err(|e: String| {
            rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, e.into())
        })?,
        reinstall: r.get(5)?,
        spec_hash: r.get(6)?,
        bytes_done: r.get::<_, i64>(7)? as u64,
        bytes_total: r.get::<_, i64>(8)? as u64,
        detail: r.get(9)?,
        stage_since_ms: r.get(10)?,
        updated_ms: r.get(11)?,
    })
}

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

fn apply_lease_write(conn: &Connection, write: &LeaseWrite) -> rusqlite::Result<()> {
    match write {
        LeaseWrite::Bind(lease) => {
            conn.prepare_cached("DELETE FROM leases WHERE mac = ?1 OR ip = ?2")?
                .execute([&lease.mac, &lease.ip])?;
            conn.prepare_cached(
                "INSERT INTO leases (mac, ip, expires_ms, is_static) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                lease.mac,
                lease.ip,
                lease.expires_ms,
                lease.is_static
            ])?;
        }
        LeaseWrite::Release { mac } => {
            conn.prepare_cached("DELETE FROM leases WHERE mac = ?1")?
                .execute([mac])?;
        }
        LeaseWrite::Quarantine { ip, until_ms } => {
            conn.prepare_cached("DELETE FROM leases WHERE ip = ?1 AND is_static = 0")?
                .execute([ip])?;
            conn.prepare_cached(
                "INSERT INTO quarantine (ip, until_ms) VALUES (?1, ?2)
                 ON CONFLICT(ip) DO UPDATE SET until_ms = excluded.until_ms",
            )?
            .execute(params![ip, until_ms])?;
        }
    }
    Ok(())
}

fn lease_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Lease> {
    Ok(Lease {
        mac: r.get(0)?,
        ip: r.get(1)?,
        expires_ms: r.get(2)?,
        is_static: r.get(3)?,
    })
}

/// Why a lifecycle event did not move a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotMoved {
    /// There is no node of that name.
    NoSuchNode,
    /// Its lifecycle has no such transition from the stage it is at.
    Refused(lifecycle::Refused),
}

/// The compare-and-set at the heart of [`State::transition`], inside the
/// caller's transaction: reads `name`'s stage and asks the lifecycle where
/// `event` takes it. Writes nothing; the caller writes the stage it got
/// with [`write_stage`] in the same transaction.
fn next_stage(tx: &Connection, name: &str, event: NodeEvent) -> Result<Result<Stage, NotMoved>> {
    let current: Option<String> = tx
        .query_row("SELECT stage FROM nodes WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(current) = current else {
        return Ok(Err(NotMoved::NoSuchNode));
    };
    let from: Stage = current
        .parse()
        .map_err(|e: String| anyhow::anyhow!("node {name}: {e}"))?;
    // Refusals are routine (a DHCP retry of a node that is booting already)
    // and are not logged: nothing is logged while the database is held.
    Ok(lifecycle::transition(from, event).map_err(NotMoved::Refused))
}

/// Write a node's stage (byte counters reset) and its `stage.*` event,
/// whose data is `data` with the stage added.
fn write_stage(
    tx: &Connection,
    name: &str,
    stage: Stage,
    message: &str,
    mut data: serde_json::Value,
) -> Result<Event> {
    let now = now_ms();
    tx.execute(
        "UPDATE nodes SET stage = ?2, detail = ?3, bytes_done = 0, bytes_total = 0,
           stage_since_ms = CASE WHEN stage = ?2 THEN stage_since_ms ELSE ?4 END, updated_ms = ?4
         WHERE name = ?1",
        params![name, stage.as_str(), message, now],
    )?;
    if !data.is_object() {
        data = serde_json::json!({});
    }
    data["stage"] = serde_json::json!(stage);
    insert_event(
        tx,
        Some(name),
        &format!("stage.{}", stage.as_str()),
        message,
        data,
    )
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
