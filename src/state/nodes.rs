//! Nodes: each machine's record and stage. A stage changes only through
//! the lifecycle ([`crate::lifecycle`]), applied by [`State::transition`] as a
//! compare-and-set in one transaction.

use super::*;

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

pub(super) fn node_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRecord> {
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
pub(super) fn next_stage(
    tx: &Connection,
    name: &str,
    event: NodeEvent,
) -> Result<Result<Stage, NotMoved>> {
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
pub(super) fn write_stage(
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

impl State {
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
}
