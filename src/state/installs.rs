//! Install attempts: one-time tokens of install scripts, the sessions of
//! running attempts, and the host keys pinned when an install finishes.

use super::*;

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
pub(super) fn attempt_number(conn: &rusqlite::Connection, node: &str, id: i64) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM install_attempts
          WHERE node = ?1 AND id <= ?2 AND started_ms IS NOT NULL",
        params![node, id],
        |r| r.get(0),
    )?)
}

/// Tokens of install scripts expire after this long unused.
pub const INSTALL_TOKEN_TTL_MS: i64 = 3600 * 1000;

pub(super) fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub(super) fn random_token() -> String {
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
