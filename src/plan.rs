//! The plan: a pure function from the inventory and what the controller
//! remembers to an ordered list of actions. `homelab plan` prints it;
//! `homelab up` shows it, then applies it.
//!
//! Ordering: servers before agents (the first server bootstraps the cluster),
//! then updates and reinstalls, removals last so the cluster never shrinks
//! before it grows.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::artifacts::pin::PinStatus;
use crate::inventory::{Inventory, Node, Role};
use crate::lifecycle::NodeEvent;
use crate::state::{NodeRecord, Stage};

/// One step of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// A node new to the controller: record it; it boots and installs on its next PXE boot.
    Provision {
        node: String,
        role: Role,
        mac: String,
        ip: String,
        wake: bool,
    },
    /// An installed node the user asked to reinstall (`reinstall = true`, consumed once).
    Reinstall { node: String, wake: bool },
    /// Settings of a known node changed: recorded, and used where they
    /// matter (the next boot, the next cluster step). `reconfigure`: k3s
    /// runs on it and is configured again now (its labels and taints).
    Update {
        node: String,
        changes: Vec<String>,
        #[serde(default)]
        reconfigure: bool,
    },
    /// A node that was mid-way (booting, installing, failed) and is picked up again.
    Resume {
        node: String,
        stage: Stage,
        wake: bool,
    },
    /// A change that cannot be applied as asked; nothing is done for this node.
    Refuse {
        node: String,
        reason: String,
        help: String,
    },
    /// A node taken out of the inventory. `leave_cluster`: k3s may run on it,
    /// so it is cordoned, drained and deleted from the cluster and k3s is
    /// uninstalled; its installed OS stays on the disk either way.
    Remove { node: String, leave_cluster: bool },
    /// The node is where the inventory wants it.
    Nothing { node: String, stage: Stage },
}

impl Action {
    pub fn node(&self) -> &str {
        match self {
            Action::Provision { node, .. }
            | Action::Reinstall { node, .. }
            | Action::Update { node, .. }
            | Action::Resume { node, .. }
            | Action::Refuse { node, .. }
            | Action::Remove { node, .. }
            | Action::Nothing { node, .. } => node,
        }
    }

    /// Whether applying this action changes anything.
    pub fn is_change(&self) -> bool {
        !matches!(self, Action::Nothing { .. } | Action::Refuse { .. })
    }

    /// The lifecycle event applying this action gives the node (see
    /// [`crate::lifecycle`]), if it moves the node at all: the plan decides
    /// the whole transition, applying it only executes it.
    pub fn event(&self) -> Option<NodeEvent> {
        match self {
            Action::Update {
                reconfigure: true, ..
            } => Some(NodeEvent::Reconfigure),
            Action::Resume { stage, .. } if stage.is_kept_out() => Some(NodeEvent::Readded),
            Action::Resume {
                stage: Stage::Unreachable | Stage::Joining | Stage::ClusterFailed,
                ..
            } => Some(NodeEvent::Retry),
            Action::Remove { .. } => Some(NodeEvent::Dropped),
            _ => None,
        }
    }

    /// Whether a Wake-on-LAN packet should be sent for this action.
    pub fn wants_wake(&self) -> bool {
        matches!(
            self,
            Action::Provision { wake: true, .. }
                | Action::Reinstall { wake: true, .. }
                | Action::Resume { wake: true, .. }
        )
    }
}

/// An ordered list of actions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Files whose digest comes from a published checksum list, with their
    /// pins (filled in by the caller from the state: `plan` itself is pure).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checksums: Vec<PinStatus>,
    /// The cluster part: cluster work (sagas) not at its end, from
    /// [`plan_cluster`] (filled in by the caller from the state).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<ClusterAction>,
}

/// What the plan does about cluster-level work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum ClusterAction {
    /// Resumed where its log stopped (after a restart, say).
    Resume {
        saga: i64,
        kind: String,
        target: String,
        at: String,
    },
    /// Stopped for the user (an undo failed): nothing is done.
    Halted {
        saga: i64,
        kind: String,
        target: String,
        cause: String,
    },
}

/// Pure: the cluster part of the plan, from the sagas not at their end.
pub fn plan_cluster(sagas: &[crate::saga::SagaRecord]) -> Vec<ClusterAction> {
    use crate::saga::{next, Next, SagaStatus};
    sagas
        .iter()
        .filter_map(|s| {
            let (saga, kind, target) = (s.id, s.kind.clone(), s.target.clone());
            match s.status {
                SagaStatus::Halted => Some(ClusterAction::Halted {
                    saga,
                    kind,
                    target,
                    cause: s.detail.clone(),
                }),
                SagaStatus::Running | SagaStatus::Unwinding => {
                    let at = match next(&s.steps) {
                        Next::Run(seq) => s.steps[seq as usize].name.clone(),
                        Next::Undo(seq) => format!("undo {}", s.steps[seq as usize].name),
                        Next::Finished | Next::Unwound => "its end".into(),
                    };
                    Some(ClusterAction::Resume {
                        saga,
                        kind,
                        target,
                        at,
                    })
                }
                SagaStatus::Done | SagaStatus::Unwound => None,
            }
        })
        .collect()
}

impl Plan {
    pub fn changes(&self) -> impl Iterator<Item = &Action> {
        self.actions.iter().filter(|a| a.is_change())
    }
    pub fn has_changes(&self) -> bool {
        self.changes().next().is_some()
    }
    pub fn refusals(&self) -> impl Iterator<Item = &Action> {
        self.actions
            .iter()
            .filter(|a| matches!(a, Action::Refuse { .. }))
    }
}

/// A fingerprint of everything in a node's stanza, to notice edits.
pub fn spec_hash(node: &Node) -> String {
    let json = serde_json::to_vec(node).expect("a node serialises");
    hex::encode(&Sha256::digest(&json)[..8])
}

/// Compute the plan. Pure: the same inputs always give the same plan.
pub fn plan(inventory: &Inventory, observed: &[NodeRecord]) -> Plan {
    let known: BTreeMap<&str, &NodeRecord> =
        observed.iter().map(|r| (r.name.as_str(), r)).collect();
    let mut servers = Vec::new();
    let mut agents = Vec::new();
    let mut others = Vec::new();

    for node in inventory.nodes.values() {
        let action = plan_node(node, known.get(node.name.as_str()).copied());
        match (&action, node.role) {
            (Action::Provision { .. }, Role::Server) => servers.push(action),
            (Action::Provision { .. }, Role::Agent) => agents.push(action),
            _ => others.push(action),
        }
    }
    let mut removals: Vec<Action> = observed
        .iter()
        .filter(|r| !r.stage.is_gone() && !inventory.nodes.contains_key(&r.name))
        .map(|r| Action::Remove {
            node: r.name.clone(),
            leave_cluster: r.stage.may_run_k3s(),
        })
        .collect();
    removals.sort_by(|a, b| a.node().cmp(b.node()));

    let mut actions = servers;
    actions.append(&mut agents);
    actions.append(&mut others);
    actions.append(&mut removals);
    Plan {
        actions,
        checksums: Vec::new(),
        cluster: Vec::new(),
    }
}

fn plan_node(node: &Node, record: Option<&NodeRecord>) -> Action {
    let wake = node.power.wol;
    let Some(rec) = record.filter(|r| r.stage != Stage::Removed) else {
        return Action::Provision {
            node: node.name.clone(),
            role: node.role,
            mac: node.mac.to_string(),
            ip: node.ip.to_string(),
            wake,
        };
    };
    if rec.stage.is_kept_out() {
        // Back in the inventory. Its OS is still on the disk and k3s is (being)
        // uninstalled: it is checked over SSH and joins in whatever role the
        // inventory now gives it.
        return Action::Resume {
            node: node.name.clone(),
            stage: rec.stage,
            wake,
        };
    }
    let hash = spec_hash(node);
    let installed = rec.stage.has_installed_os();
    // `reinstall = true` is consumed once: it applies when the stanza carrying it
    // has not been applied yet (a different fingerprint).
    let reinstall_requested = node.reinstall && rec.spec_hash != hash && node.boot.is_none();
    let role = node.role.to_string();

    if installed && rec.role != role && !reinstall_requested {
        return Action::Refuse {
            node: node.name.clone(),
            reason: format!("changing the role of installed node from {} to {role} needs a reinstall", rec.role),
            help: format!("set `reinstall = true` in [nodes.{}] to wipe and reinstall it as {role}, or change the role back", node.name),
        };
    }
    if installed && reinstall_requested {
        return Action::Reinstall {
            node: node.name.clone(),
            wake,
        };
    }

    let mut changes = Vec::new();
    if rec.mac != node.mac.to_string() {
        changes.push(format!("mac {} -> {}", rec.mac, node.mac));
    }
    if rec.ip != node.ip.to_string() {
        changes.push(format!("ip {} -> {}", rec.ip, node.ip));
    }
    if rec.role != role {
        changes.push(format!("role {} -> {role}", rec.role));
    }
    if changes.is_empty() && rec.spec_hash != hash {
        changes.push("settings changed (disk, power, boot profile, labels or taints)".into());
    }
    if !changes.is_empty() {
        return Action::Update {
            node: node.name.clone(),
            changes,
            reconfigure: rec.stage == Stage::Running,
        };
    }
    match rec.stage {
        Stage::Booting
        | Stage::Installing
        | Stage::Failed
        | Stage::Unreachable
        | Stage::Joining
        | Stage::ClusterFailed => Action::Resume {
            node: node.name.clone(),
            stage: rec.stage,
            wake,
        },
        stage => Action::Nothing {
            node: node.name.clone(),
            stage,
        },
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_actions(f)?;
        if !self.cluster.is_empty() {
            writeln!(f, "\nCluster:")?;
        }
        for c in &self.cluster {
            match c {
                ClusterAction::Resume {
                    saga,
                    kind,
                    target,
                    at,
                } => writeln!(f, "> {kind} {target} (#{saga})  resume at {at}")?,
                ClusterAction::Halted {
                    saga,
                    kind,
                    target,
                    cause,
                } => writeln!(f, "x {kind} {target} (#{saga})  halted: {cause}")?,
            }
        }
        if !self.checksums.is_empty() {
            writeln!(f, "\nChecksums from published lists:")?;
        }
        for c in &self.checksums {
            match &c.pin {
                Some(p) => writeln!(
                    f,
                    "  {}  {} {} (pinned {} from {})",
                    c.file,
                    p.algorithm,
                    p.digest,
                    crate::ui::format_time(p.pinned_ms),
                    c.list
                )?,
                None => writeln!(
                    f,
                    "  {}  not pinned yet: looked up in {} on `homelab up`",
                    c.file, c.list
                )?,
            }
        }
        Ok(())
    }
}

impl Plan {
    fn fmt_actions(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.actions.is_empty() {
            return writeln!(
                f,
                "The inventory has no nodes and the controller remembers none: nothing to do."
            );
        }
        let width = self
            .actions
            .iter()
            .map(|a| a.node().len())
            .max()
            .unwrap_or(0);
        for a in &self.actions {
            let (sign, text) = match a {
                Action::Provision {
                    role,
                    mac,
                    ip,
                    wake,
                    ..
                } => (
                    '+',
                    format!(
                        "provision {role} ({mac}, {ip}){}",
                        if *wake { ", wake-on-LAN" } else { "" }
                    ),
                ),
                Action::Reinstall { .. } => (
                    '!',
                    "reinstall: wipe the disk and install again (requested)".into(),
                ),
                Action::Update {
                    changes,
                    reconfigure,
                    ..
                } => (
                    '~',
                    format!(
                        "update: {}{}",
                        changes.join(", "),
                        if *reconfigure {
                            "; k3s is configured again"
                        } else {
                            ""
                        }
                    ),
                ),
                Action::Resume { stage, .. } if stage.is_kept_out() => (
                    '>',
                    "back in the inventory: keep its installed OS, check SSH and join k3s".into(),
                ),
                Action::Resume { stage, .. } => ('>', format!("resume (was {stage})")),
                Action::Refuse { reason, help, .. } => (
                    'x',
                    format!("refused: {reason}\n{:w$}    help: {help}", "", w = width),
                ),
                Action::Remove {
                    leave_cluster: true,
                    ..
                } => (
                    '-',
                    "remove: cordon, drain and delete from the cluster, uninstall k3s (the OS stays)"
                        .into(),
                ),
                Action::Remove { .. } => ('-', "remove from the controller".into()),
                Action::Nothing { stage, .. } => (' ', format!("nothing to do ({stage})")),
            };
            writeln!(f, "{sign} {:<width$}  {text}", a.node())?;
        }
        let count = |p: fn(&Action) -> bool| self.actions.iter().filter(|a| p(a)).count();
        writeln!(
            f,
            "\nPlan: {} to provision, {} to update, {} to reinstall, {} to resume, {} to remove, {} refused, {} unchanged.",
            count(|a| matches!(a, Action::Provision { .. })),
            count(|a| matches!(a, Action::Update { .. })),
            count(|a| matches!(a, Action::Reinstall { .. })),
            count(|a| matches!(a, Action::Resume { .. })),
            count(|a| matches!(a, Action::Remove { .. })),
            count(|a| matches!(a, Action::Refuse { .. })),
            count(|a| matches!(a, Action::Nothing { .. })),
        )
    }
}

#[cfg(test)]
mod tests;

/// The stage at which `homelab up` considers a node done: a custom boot profile
/// is done once served; an installed OS once the controller has logged in to
/// it over SSH with the pinned host key and k3s runs on it, Ready in the
/// cluster.
pub fn goal_stage(node: &Node) -> Stage {
    if node.boot.is_some() {
        Stage::Booted
    } else {
        Stage::Running
    }
}

/// Whether a node has reached its goal (a later stage on the same road counts).
pub fn goal_reached(node: &Node, record: &NodeRecord) -> bool {
    match goal_stage(node) {
        Stage::Booted => record.stage == Stage::Booted,
        _ => record.stage == Stage::Running && !record.reinstall,
    }
}

/// Whether `homelab up` has nothing to do: the plan changes nothing, refuses
/// nothing, has no cluster work under way, every inventory node has reached its goal and every node out of
/// the inventory is gone. Then `up` says so and starts no service.
pub fn converged(inventory: &Inventory, plan: &Plan, observed: &[NodeRecord]) -> bool {
    if plan.has_changes() || plan.refusals().next().is_some() || !plan.cluster.is_empty() {
        return false;
    }
    let record = |name: &str| observed.iter().find(|r| r.name == name);
    let nodes_done = inventory
        .nodes
        .values()
        .all(|n| record(&n.name).is_some_and(|r| goal_reached(n, r)));
    let others_gone = observed
        .iter()
        .filter(|r| !inventory.nodes.contains_key(&r.name))
        .all(|r| r.stage.is_gone());
    nodes_done && others_gone
}
