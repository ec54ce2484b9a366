//! The cluster domain of the state: what belongs to the cluster rather than
//! to one node. Sagas (multi-step cluster work, see [`crate::saga`]) with
//! their step logs, the GitOps repository the controller seeded (its commit
//! and each file's blob, so a re-run can tell the user's edits from its
//! own), and the applications Argo CD runs from it.

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{insert_event, now_ms, State};
use crate::saga::{SagaRecord, SagaStatus, StepRecord, StepStatus};
use anyhow::{anyhow, Result};

/// An application as the controller last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    pub name: String,
    /// The commit it should run.
    pub desired_revision: String,
    /// Argo CD's words: Synced, OutOfSync, Unknown.
    pub sync: String,
    /// Argo CD's words: Healthy, Progressing, Degraded, Missing, Unknown.
    pub health: String,
    pub message: String,
    pub updated_ms: i64,
}

/// What the controller seeded into a GitOps repository.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RepoSeed {
    pub commit: String,
    /// (path, git blob sha) of every file it wrote.
    pub files: Vec<(String, String)>,
}

impl State {
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

    /// A new saga with its steps, all `pending`, written before any acts.
    pub fn begin_saga(&self, kind: &str, target: &str, steps: &[&str]) -> Result<i64> {
        let now = now_ms();
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO sagas (kind, target, status, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?4)",
            params![kind, target, SagaStatus::Running.as_str(), now],
        )?;
        let id = tx.last_insert_rowid();
        for (seq, name) in steps.iter().enumerate() {
            tx.execute(
                "INSERT INTO saga_steps (saga, seq, name, status) VALUES (?1, ?2, ?3, ?4)",
                params![id, seq as i64, name, StepStatus::Pending.as_str()],
            )?;
        }
        let ev = insert_event(
            &tx,
            None,
            "saga.begun",
            &format!(
                "{kind} {target}: {} steps ({})",
                steps.len(),
                steps.join(", ")
            ),
            serde_json::json!({ "saga": id, "kind": kind, "target": target }),
        )?;
        tx.commit()?;
        drop(conn);
        let _ = self.inner.events.send(ev);
        Ok(id)
    }

    /// A saga and its log.
    pub fn saga(&self, id: i64) -> Result<SagaRecord> {
        let conn = self.conn();
        let head = conn
            .query_row(
                "SELECT kind, target, status, detail FROM sagas WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| anyhow!("no saga {id}"))?;
        let mut stmt = conn.prepare_cached(
            "SELECT seq, name, status, undo, output, error FROM saga_steps WHERE saga = ?1 ORDER BY seq",
        )?;
        let steps = stmt
            .query_map([id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let steps = steps
            .into_iter()
            .map(|(seq, name, status, undo, output, error)| {
                Ok(StepRecord {
                    seq: seq as u32,
                    name,
                    status: status.parse().map_err(|e: String| anyhow!(e))?,
                    undo: serde_json::from_str(&undo)?,
                    output: serde_json::from_str(&output)?,
                    error,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SagaRecord {
            id,
            kind: head.0,
            target: head.1,
            status: head.2.parse().map_err(|e: String| anyhow!(e))?,
            detail: head.3,
            steps,
        })
    }

    /// Sagas not at their end (running, unwinding, or halted for the user),
    /// oldest first: what a restarted controller resumes or reports.
    pub fn unfinished_sagas(&self) -> Result<Vec<SagaRecord>> {
        let ids: Vec<i64> = {
            let conn = self.conn();
            let mut stmt = conn.prepare_cached(
                "SELECT id FROM sagas WHERE status IN ('running', 'unwinding', 'halted') ORDER BY id",
            )?;
            let ids = stmt
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            ids
        };
        ids.into_iter().map(|id| self.saga(id)).collect()
    }

    /// Step `seq` is about to act; `undo` is what undoing it will need.
    pub fn step_started(&self, saga: i64, seq: u32, undo: &serde_json::Value) -> Result<()> {
        self.step_change(
            saga,
            seq,
            StepStatus::Started,
            "UPDATE saga_steps SET status = ?3, undo = ?4, started_ms = ?5, error = '' WHERE saga = ?1 AND seq = ?2",
            &undo.to_string(),
            None,
        )
    }

    /// Step `seq` acted; its output.
    pub fn step_done(&self, saga: i64, seq: u32, output: &serde_json::Value) -> Result<()> {
        self.step_change(
            saga,
            seq,
            StepStatus::Done,
            "UPDATE saga_steps SET status = ?3, output = ?4, finished_ms = ?5 WHERE saga = ?1 AND seq = ?2",
            &output.to_string(),
            None,
        )
    }

    /// Step `seq` failed: the saga unwinds.
    pub fn step_failed(&self, saga: i64, seq: u32, error: &str) -> Result<()> {
        self.step_change(
            saga,
            seq,
            StepStatus::Failed,
            "UPDATE saga_steps SET status = ?3, error = ?4, finished_ms = ?5 WHERE saga = ?1 AND seq = ?2",
            error,
            Some(SagaStatus::Unwinding),
        )
    }

    /// Step `seq` was undone.
    pub fn step_undone(&self, saga: i64, seq: u32) -> Result<()> {
        self.step_change(
            saga,
            seq,
            StepStatus::Undone,
            // (?4, the text, is unused here: every change binds the same five.)
            "UPDATE saga_steps SET status = ?3, finished_ms = ?5 WHERE saga = ?1 AND seq = ?2 AND ?4 = ?4",
            "",
            None,
        )
    }

    /// One step's change, its saga's status (when given) and its event, in
    /// one transaction.
    fn step_change(
        &self,
        saga: i64,
        seq: u32,
        status: StepStatus,
        sql: &str,
        text: &str,
        saga_status: Option<SagaStatus>,
    ) -> Result<()> {
        let now = now_ms();
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = tx.execute(sql, params![saga, seq as i64, status.as_str(), text, now])?;
        if n == 0 {
            return Err(anyhow!("saga {saga} has no step {seq}"));
        }
        let (kind, target, name): (String, String, String) = tx.query_row(
            "SELECT s.kind, s.target, t.name FROM sagas s JOIN saga_steps t ON t.saga = s.id
              WHERE s.id = ?1 AND t.seq = ?2",
            params![saga, seq as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        tx.execute(
            "UPDATE sagas SET status = COALESCE(?2, status), updated_ms = ?3 WHERE id = ?1",
            params![saga, saga_status.map(|s| s.as_str()), now],
        )?;
        let message = match status {
            StepStatus::Failed => format!("{kind} {target}: {name} failed: {text}"),
            _ => format!("{kind} {target}: {name} {status}"),
        };
        let ev = insert_event(
            &tx,
            None,
            &format!("saga.step-{status}"),
            &message,
            serde_json::json!({ "saga": saga, "seq": seq, "step": name }),
        )?;
        tx.commit()?;
        drop(conn);
        let _ = self.inner.events.send(ev);
        Ok(())
    }

    /// The saga ended (or stopped for the user) with `status`.
    pub fn end_saga(&self, saga: i64, status: SagaStatus, detail: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let (kind, target, was): (String, String, String) = tx.query_row(
            "SELECT kind, target, status FROM sagas WHERE id = ?1",
            [saga],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        if was == status.as_str() {
            return Ok(());
        }
        tx.execute(
            "UPDATE sagas SET status = ?2, detail = ?3, updated_ms = ?4 WHERE id = ?1",
            params![saga, status.as_str(), detail, now_ms()],
        )?;
        let message = if detail.is_empty() {
            format!("{kind} {target}: {status}")
        } else {
            format!("{kind} {target}: {status}: {detail}")
        };
        let ev = insert_event(
            &tx,
            None,
            &format!("saga.{status}"),
            &message,
            serde_json::json!({ "saga": saga }),
        )?;
        tx.commit()?;
        drop(conn);
        let _ = self.inner.events.send(ev);
        Ok(())
    }

    /// Record what the controller seeded into repository `name`, replacing
    /// what it seeded before, in one transaction.
    pub fn put_repo_seed(&self, name: &str, seed: &RepoSeed) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO gitops_repos (name, seeded_commit, updated_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET seeded_commit = excluded.seeded_commit, updated_ms = excluded.updated_ms",
            params![name, seed.commit, now_ms()],
        )?;
        tx.execute("DELETE FROM gitops_files WHERE repo = ?1", [name])?;
        for (path, blob) in &seed.files {
            tx.execute(
                "INSERT INTO gitops_files (repo, path, blob_sha) VALUES (?1, ?2, ?3)",
                params![name, path, blob],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// What the controller seeded into repository `name`, if anything.
    pub fn repo_seed(&self, name: &str) -> Result<Option<RepoSeed>> {
        let conn = self.conn();
        let Some(commit) = conn
            .query_row(
                "SELECT seeded_commit FROM gitops_repos WHERE name = ?1",
                [name],
                |r| r.get::<_, String>(0),
            )
            .optional()?
        else {
            return Ok(None);
        };
        let mut stmt = conn.prepare_cached(
            "SELECT path, blob_sha FROM gitops_files WHERE repo = ?1 ORDER BY path",
        )?;
        let files = stmt
            .query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Some(RepoSeed { commit, files }))
    }

    /// Record an application's status (Argo CD's words).
    pub fn put_app(&self, app: &AppRecord) -> Result<()> {
        self.conn().execute(
            "INSERT INTO apps (name, desired_revision, sync, health, message, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(name) DO UPDATE SET desired_revision = excluded.desired_revision,
               sync = excluded.sync, health = excluded.health, message = excluded.message,
               updated_ms = excluded.updated_ms",
            params![
                app.name,
                app.desired_revision,
                app.sync,
                app.health,
                app.message,
                app.updated_ms
            ],
        )?;
        Ok(())
    }

    /// Forget an application (switched off and pruned).
    pub fn delete_app(&self, name: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM apps WHERE name = ?1", [name])?
            > 0)
    }

    /// Every application, by name.
    pub fn apps(&self) -> Result<Vec<AppRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, desired_revision, sync, health, message, updated_ms FROM apps ORDER BY name",
        )?;
        let apps = stmt
            .query_map([], |r| {
                Ok(AppRecord {
                    name: r.get(0)?,
                    desired_revision: r.get(1)?,
                    sync: r.get(2)?,
                    health: r.get(3)?,
                    message: r.get(4)?,
                    updated_ms: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(apps)
    }
}
