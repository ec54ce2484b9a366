//! Multi-step cluster work (seeding the GitOps repository, a rolling
//! upgrade, an image update) as sagas, in the spirit of Oxide's steno: a
//! saga is an ordered list of steps, each with an undo. Its log lives in the
//! state database (see [`crate::state::State::begin_saga`]): every step is
//! written `started`, with what undoing it needs, before it acts, and
//! `done` with its output after. So a controller killed at any point
//! resumes where it was: a step found `started` may or may not have acted,
//! and is run again (steps are idempotent: they compare before they write).
//! A failed step unwinds the saga: the steps that acted are undone, last
//! first, and the saga ends `unwound` with the failure as its cause.
//!
//! [`next`] decides what to do from the log alone (pure, tested); [`run`]
//! drives a saga to its end with a [`Steps`] implementation doing the work.

use std::future::Future;
use std::pin::Pin;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::state::State;

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    Pending,
    /// Written before it acts: it may or may not have acted.
    Started,
    Done,
    Failed,
    /// Its undo ran (or it had nothing to undo).
    Undone,
}

/// Where a saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SagaStatus {
    Running,
    /// A step failed; the steps before it are being undone.
    Unwinding,
    Done,
    /// Failed and undone; `detail` says why it failed.
    Unwound,
    /// An undo failed: stopped for the user, never retried blindly;
    /// `detail` says what failed.
    Halted,
}

impl SagaStatus {
    /// Still to be driven by the controller.
    pub fn is_active(self) -> bool {
        matches!(self, SagaStatus::Running | SagaStatus::Unwinding)
    }
}

macro_rules! text_enum {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $s),* }
            }
        }
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($s => Ok(<$t>::$v),)* other => Err(format!("unknown status `{other}`")) }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(StepStatus { Pending => "pending", Started => "started", Done => "done", Failed => "failed", Undone => "undone" });
text_enum!(SagaStatus { Running => "running", Unwinding => "unwinding", Done => "done", Unwound => "unwound", Halted => "halted" });

/// One step of a saga's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub seq: u32,
    pub name: String,
    pub status: StepStatus,
    /// What undoing it needs, written before it acted.
    pub undo: serde_json::Value,
    pub output: serde_json::Value,
    pub error: String,
}

/// A saga and its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaRecord {
    pub id: i64,
    /// What kind of work ("gitops-seed", "k3s-rollout", ...).
    pub kind: String,
    /// What it works on (a repository, a version).
    pub target: String,
    pub status: SagaStatus,
    pub detail: String,
    pub steps: Vec<StepRecord>,
}

/// What the log says to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Run (or run again) step `seq`.
    Run(u32),
    /// Undo step `seq` (it acted, or may have).
    Undo(u32),
    /// Every step is done.
    Finished,
    /// Every step that acted is undone.
    Unwound,
}

/// Pure: the next move of a saga, from its log. Forward while no step has
/// failed: the first step not done (a `started` one is run again). Once one
/// failed: the last step that is done or started (it may have acted) is
/// undone, until none is.
pub fn next(steps: &[StepRecord]) -> Next {
    let failed = steps.iter().any(|s| s.status == StepStatus::Failed);
    if !failed {
        return steps
            .iter()
            .find(|s| s.status != StepStatus::Done)
            .map_or(Next::Finished, |s| Next::Run(s.seq));
    }
    steps
        .iter()
        .rev()
        .find(|s| matches!(s.status, StepStatus::Done | StepStatus::Started))
        .map_or(Next::Unwound, |s| Next::Undo(s.seq))
}

pub type StepFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// The work of one kind of saga.
pub trait Steps: Sync {
    /// What undoing step `seq` will need, known before it acts (the version
    /// it replaces, the commit it moves from). Written before it runs.
    fn undo_info<'a>(&'a self, saga: &'a SagaRecord, seq: u32)
        -> StepFuture<'a, serde_json::Value>;
    /// Do step `seq`; its output is kept in the log.
    fn run<'a>(&'a self, saga: &'a SagaRecord, seq: u32) -> StepFuture<'a, serde_json::Value>;
    /// Undo step `seq` with what [`Steps::undo_info`] recorded.
    fn undo<'a>(
        &'a self,
        saga: &'a SagaRecord,
        seq: u32,
        undo: &'a serde_json::Value,
    ) -> StepFuture<'a, ()>;
}

/// Drives saga `id` to its end (done or unwound), resuming from its log.
/// An undo that fails halts the saga with the cause, for the user: nothing
/// is retried blindly.
pub async fn run(state: &State, id: i64, steps: &dyn Steps) -> Result<SagaRecord> {
    loop {
        let saga = state.saga(id)?;
        match next(&saga.steps) {
            Next::Finished => {
                state.end_saga(id, SagaStatus::Done, "")?;
                return state.saga(id);
            }
            Next::Unwound => {
                let cause = saga
                    .steps
                    .iter()
                    .find(|s| s.status == StepStatus::Failed)
                    .map(|s| format!("{}: {}", s.name, s.error))
                    .unwrap_or_default();
                state.end_saga(id, SagaStatus::Unwound, &cause)?;
                return state.saga(id);
            }
            Next::Run(seq) => {
                let undo = steps.undo_info(&saga, seq).await?;
                state.step_started(id, seq, &undo)?;
                match steps.run(&saga, seq).await {
                    Ok(output) => state.step_done(id, seq, &output)?,
                    Err(e) => state.step_failed(id, seq, &format!("{e:#}"))?,
                }
            }
            Next::Undo(seq) => {
                let step = &saga.steps[seq as usize];
                match steps.undo(&saga, seq, &step.undo).await {
                    Ok(()) => state.step_undone(id, seq)?,
                    Err(e) => {
                        let why = format!("undoing {}: {e:#}", step.name);
                        state.end_saga(id, SagaStatus::Halted, &why)?;
                        anyhow::bail!(why);
                    }
                }
            }
        }
    }
}

impl SagaRecord {
    /// One line for the live view and `plan`: where it stands.
    pub fn progress_line(&self) -> String {
        let total = self.steps.len();
        let done = self
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Done)
            .count();
        let at = match next(&self.steps) {
            Next::Run(seq) | Next::Undo(seq) => self.steps[seq as usize].name.as_str(),
            Next::Finished | Next::Unwound => "",
        };
        let mut line = format!("{:<10} {done}/{total}", self.status.as_str());
        match self.status {
            SagaStatus::Running | SagaStatus::Unwinding if !at.is_empty() => {
                let verb = if self.status == SagaStatus::Running {
                    ""
                } else {
                    "undo "
                };
                line.push_str(&format!("  {verb}{at}"));
            }
            _ if !self.detail.is_empty() => line.push_str(&format!("  {}", self.detail)),
            _ => {}
        }
        line
    }
}

/// The sagas of the kinds this controller runs, as a controller loop (see
/// [`crate::reconcile`]): an active saga is driven to its end, after a
/// restart too. Keys are `saga:ID`.
pub struct Sagas {
    kinds: std::collections::HashMap<&'static str, std::sync::Arc<dyn Steps + Send>>,
}

impl Sagas {
    pub fn new() -> Sagas {
        Sagas {
            kinds: std::collections::HashMap::new(),
        }
    }

    /// Run sagas of `kind` with `steps`.
    pub fn with(mut self, kind: &'static str, steps: std::sync::Arc<dyn Steps + Send>) -> Sagas {
        self.kinds.insert(kind, steps);
        self
    }
}

impl Default for Sagas {
    fn default() -> Self {
        Sagas::new()
    }
}

impl crate::reconcile::Part for Sagas {
    fn name(&self) -> &'static str {
        "saga"
    }

    fn due(
        &self,
        snapshot: &crate::reconcile::Snapshot,
        _in_flight: &std::collections::BTreeSet<String>,
    ) -> Vec<String> {
        snapshot
            .sagas
            .iter()
            .filter(|s| s.status.is_active() && self.kinds.contains_key(s.kind.as_str()))
            .map(|s| format!("saga:{}", s.id))
            .collect()
    }

    fn reconcile(
        self: std::sync::Arc<Self>,
        shared: std::sync::Arc<crate::context::Shared>,
        key: String,
    ) -> crate::reconcile::Reconcile {
        use crate::reconcile::Outcome;
        Box::pin(async move {
            let Some(id) = key.strip_prefix("saga:").and_then(|i| i.parse().ok()) else {
                return Outcome::Failed(format!("`{key}` is not a saga key"));
            };
            let kind = match shared.state.saga(id) {
                Ok(s) => s.kind,
                Err(e) => return Outcome::Failed(format!("{e:#}")),
            };
            let Some(steps) = self.kinds.get(kind.as_str()).cloned() else {
                return Outcome::Done;
            };
            match run(&shared.state, id, &*steps).await {
                Ok(_) => Outcome::Done,
                Err(e) => Outcome::Failed(format!("{e:#}")),
            }
        })
    }
}

#[cfg(test)]
mod tests;
