//! The cluster step: brings k3s up on nodes that are `ready` (installed and
//! reachable over SSH with their pinned key), in [`super::members`] order:
//! the bootstrap server first, then the other servers one at a time (each
//! joins etcd), then the agents side by side; and takes nodes that left the
//! inventory (`removing`) out of the cluster.
//!
//! Per node, over one SSH session: the configuration (with the token) is
//! uploaded 0600 on the channel's stdin, the verified binary and air-gap
//! images, the systemd unit and the uninstall script are put in place (each
//! skipped when the node's copy is the same), the unit is restarted if one
//! of its files changed (started if it is not running), and the node counts
//! as `running` once a server lists it Ready. The token never appears on a
//! command line, in an event or in a log line.
//!
//! Taking a node out: a running server cordons, drains and deletes it from
//! the cluster, then the node's own uninstall script (put there at install)
//! stops k3s and removes its files. Servers leave one at a time so etcd
//! keeps its quorum. The OS stays: the node is `released`, and put back in
//! the inventory it joins again without a reinstall.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use super::release::{self, Release};
use super::{
    choose_bootstrap, label_commands, members, parse_applied, render_config, render_uninstall,
    render_unit, start_command, unit_name, Join, Member, APPLIED_COMMAND, BINARY_PATH, CONFIG_PATH,
    RESTARTED, UNINSTALL_PATH,
};
use crate::context::Shared;
use crate::install::reach::{connect, connect_at};
use crate::inventory::{Inventory, Node, Role};
use crate::lifecycle::NodeEvent;
use crate::reconcile::{Outcome, Part, Reconcile, Snapshot};
use crate::ssh::Session;
use crate::state::{NodeRecord, Stage};
use crate::templates::Templates;

const POLL: Duration = Duration::from_secs(3);
/// How long a node may take to show up Ready after its unit started.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long pods get to leave a node being removed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
const IMAGES_PATH: &str = "/var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar.zst";

/// The cluster step as a controller loop (see [`crate::reconcile`]): its
/// keys are node names; a `ready` node whose turn it is joins, a `removing`
/// one leaves.
pub struct ClusterStep {
    templates: Arc<Templates>,
    /// The verified release, fetched once per daemon (and per version).
    release: tokio::sync::Mutex<Option<Release>>,
}

impl ClusterStep {
    pub fn new(templates: Arc<Templates>) -> ClusterStep {
        ClusterStep {
            templates,
            release: tokio::sync::Mutex::new(None),
        }
    }
}

impl Part for ClusterStep {
    fn name(&self) -> &'static str {
        "k3s"
    }

    fn due(&self, snapshot: &Snapshot, in_flight: &BTreeSet<String>) -> Vec<String> {
        let mut due: Vec<String> = due_members(snapshot, in_flight)
            .into_iter()
            .map(|m| m.node)
            .collect();
        due.extend(due_removals(snapshot, in_flight));
        due
    }

    fn reconcile(self: Arc<Self>, shared: Arc<Shared>, key: String) -> Reconcile {
        Box::pin(async move {
            match self.reconcile_node(&shared, &key).await {
                Ok(()) => Outcome::Done,
                Err(e) => Outcome::Failed(format!("{e:#}")),
            }
        })
    }
}

impl ClusterStep {
    /// Joins or takes out `name`, as the state has it now. The outcome goes
    /// into the node's stage; an Err here is a failure of the controller
    /// itself (reading its state).
    async fn reconcile_node(&self, shared: &Shared, name: &str) -> Result<()> {
        let snapshot = Snapshot::take(shared)?;
        let Some(record) = snapshot.node(name).cloned() else {
            return Ok(());
        };
        let state = &shared.state;
        if let Some(chosen) = bootstrap_change(&snapshot) {
            state.set_bootstrap_server(&chosen)?;
        }
        match record.stage {
            Stage::Ready => {
                let boot = current_bootstrap(&snapshot);
                let member = members(&snapshot.inventory, boot.as_deref())
                    .ok()
                    .and_then(|order| order.into_iter().find(|m| m.node == name));
                let Some(member) = member else {
                    return Ok(());
                };
                let inventory = &snapshot.inventory;
                let outcome = async {
                    let rel = self.release_for(shared, inventory).await?;
                    provision(shared, &self.templates, inventory, &member, &rel).await
                }
                .await;
                match outcome {
                    Ok(message) => {
                        if member.join == Join::Init {
                            state.set_bootstrap_server(&member.node)?;
                        }
                        state.transition(&member.node, NodeEvent::Joined, &message)?;
                    }
                    Err(e) => {
                        state.transition(
                            &member.node,
                            NodeEvent::JoinFailed,
                            &format!("k3s: {e:#}"),
                        )?;
                    }
                }
            }
            Stage::Removing => {
                let outcome = remove(shared, &self.templates, &snapshot, &record).await;
                // Applied only if still leaving: put back into the inventory
                // or forgotten meanwhile, the plan or the user took it over.
                let (event, message) = match outcome {
                    Ok(message) => (NodeEvent::Left, message),
                    Err(e) => (
                        NodeEvent::LeaveFailed,
                        format!("leaving the cluster: {e:#}"),
                    ),
                };
                state.transition(&record.name, event, &message)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The verified release, fetched once per daemon.
    async fn release_for(&self, shared: &Shared, inventory: &Inventory) -> Result<Release> {
        let mut cached = self.release.lock().await;
        if let Some(r) = cached
            .as_ref()
            .filter(|r| r.version == inventory.cluster.k3s_version)
        {
            return Ok(r.clone());
        }
        let store =
            crate::artifacts::Store::new(&shared.state, inventory.controller.mirror.clone(), None)?;
        let r = release::prepare(&store, &inventory.cluster.k3s_version).await?;
        *cached = Some(r.clone());
        Ok(r)
    }
}

/// Pure: the server the cluster runs through now.
fn current_bootstrap(snapshot: &Snapshot) -> Option<String> {
    let running: Vec<&str> = snapshot
        .nodes
        .iter()
        .filter(|r| r.stage == Stage::Running)
        .map(|r| r.name.as_str())
        .collect();
    choose_bootstrap(&snapshot.inventory, snapshot.bootstrap.as_deref(), &running)
}

/// Pure: the bootstrap server to record, when the chosen one runs and is
/// not the one recorded (the recorded one left the inventory, say).
fn bootstrap_change(snapshot: &Snapshot) -> Option<String> {
    let chosen = current_bootstrap(snapshot)?;
    let runs = snapshot
        .node(&chosen)
        .is_some_and(|r| r.stage == Stage::Running);
    (runs && snapshot.bootstrap.as_deref() != Some(chosen.as_str())).then_some(chosen)
}

/// Pure: the members whose turn it is, in [`members`] order. The bootstrap
/// server first; a joining server waits for the bootstrap and for every
/// server before it to settle (etcd members join one at a time); agents
/// wait for the bootstrap only, and join side by side. A node in flight is
/// not due again.
pub fn due_members(snapshot: &Snapshot, in_flight: &BTreeSet<String>) -> Vec<Member> {
    let stage = |name: &str| snapshot.node(name).map(|r| r.stage);
    let boot = current_bootstrap(snapshot);
    let Ok(order) = members(&snapshot.inventory, boot.as_deref()) else {
        return Vec::new();
    };
    let bootstrap_running = stage(&order[0].node) == Some(Stage::Running);
    let mut out = Vec::new();
    for (i, m) in order.iter().enumerate() {
        // Every earlier server is settled: running, or failed with its cause
        // (which must not hold up the rest), and none is still in flight.
        let earlier_servers_settled = order[..i]
            .iter()
            .filter(|o| !matches!(o.join, Join::Agent { .. }))
            .all(|o| {
                !in_flight.contains(&o.node)
                    && stage(&o.node).is_some_and(|s| s == Stage::Running || s.is_failure())
            });
        let turn = match m.join {
            Join::Init => true,
            Join::Server { .. } => bootstrap_running && earlier_servers_settled,
            Join::Agent { .. } => bootstrap_running,
        };
        if turn && stage(&m.node) == Some(Stage::Ready) && !in_flight.contains(&m.node) {
            out.push(m.clone());
        }
    }
    out
}

/// Pure: nodes to take out of the cluster: agents side by side, servers one
/// at a time (etcd keeps its quorum).
pub fn due_removals(snapshot: &Snapshot, in_flight: &BTreeSet<String>) -> Vec<String> {
    let is_server = |r: &NodeRecord| r.role == Role::Server.to_string();
    let leaving = |r: &&NodeRecord| {
        r.stage == Stage::Removing && !snapshot.inventory.nodes.contains_key(&r.name)
    };
    let mut server_busy = snapshot
        .nodes
        .iter()
        .filter(leaving)
        .any(|r| is_server(r) && in_flight.contains(&r.name));
    let mut out = Vec::new();
    for r in snapshot.nodes.iter().filter(leaving) {
        if in_flight.contains(&r.name) || (is_server(r) && server_busy) {
            continue;
        }
        server_busy |= is_server(r);
        out.push(r.name.clone());
    }
    out
}

/// Installs, configures and starts k3s on one node; Ok is the event message.
async fn provision(
    shared: &Shared,
    templates: &Templates,
    inventory: &Inventory,
    member: &Member,
    release: &Release,
) -> Result<String> {
    let state = &shared.state;
    let node = inventory
        .nodes
        .get(&member.node)
        .with_context(|| format!("{} left the inventory", member.node))?;
    let unit = unit_name(&member.join);
    state.transition(
        &node.name,
        NodeEvent::JoinStarted,
        &format!("installing k3s {} ({unit})", release.version),
    )?;
    let token = super::token(state.dir())?;
    let config = render_config(templates, inventory, member, &token)?;
    let unit_text = render_unit(templates, &member.join)?;
    let uninstall = render_uninstall(templates)?;

    let session = connect(&shared.state, node).await?;
    session
        .exec_checked(
            "mkdir -p /etc/rancher/k3s /var/lib/rancher/k3s/agent/images && chmod 700 /etc/rancher/k3s",
            |_, _| {},
        )
        .await?;
    // What the config set before, to take off what the inventory dropped.
    let applied = session
        .exec_timeout(APPLIED_COMMAND, Duration::from_secs(30), |_, _| {})
        .await?;
    let applied = parse_applied(&applied.stdout);
    // Each file is written only if the node's copy differs; k3s is restarted
    // only if one it runs with changed (or it is not running).
    let mut changed = put_bytes(&session, CONFIG_PATH, config.as_bytes(), 0o600).await?;
    changed |= put_file(&session, BINARY_PATH, &release.binary, 0o755).await?;
    changed |= put_file(&session, IMAGES_PATH, &release.images, 0o644).await?;
    changed |= put_bytes(
        &session,
        &format!("/etc/systemd/system/{unit}"),
        unit_text.as_bytes(),
        0o644,
    )
    .await?;
    put_bytes(&session, UNINSTALL_PATH, uninstall.as_bytes(), 0o700).await?;
    let log = |_: crate::ssh::Stream, line: &str| {
        let _ = state.append_event(Some(&node.name), "k3s.log", line, serde_json::Value::Null);
    };
    let started = session
        .exec_checked(&start_command(unit, changed), log)
        .await?;
    let restarted = started.stdout.contains(RESTARTED);
    let _ = session.close().await;

    let asked = asked_server(inventory, member)?;
    let server = connect(&shared.state, asked).await?;
    wait_ready(&server, &asked.name, &member.node).await?;
    for args in label_commands(node, &applied) {
        kubectl_checked(&server, &args, Duration::from_secs(60), |_| {}).await?;
    }
    let _ = server.close().await;
    Ok(format!(
        "k3s {} {} active{}; {} is Ready in the cluster",
        release.version,
        if unit == "k3s.service" {
            "server"
        } else {
            "agent"
        },
        if restarted {
            ""
        } else {
            " (its files were unchanged: not restarted)"
        },
        node.name
    ))
}

/// The server a member registers with (itself for the bootstrap).
fn asked_server<'i>(inventory: &'i Inventory, member: &Member) -> Result<&'i Node> {
    match member.join {
        Join::Init => inventory.nodes.get(&member.node),
        Join::Server { server } | Join::Agent { server } => {
            inventory.nodes.values().find(|n| n.ip == server)
        }
    }
    .ok_or_else(|| {
        anyhow!(
            "the server {} joins through left the inventory",
            member.node
        )
    })
}

/// Whether the node's file at `path` has this sha256 (hex).
async fn node_has(session: &Session, path: &str, sha256: &str) -> Result<bool> {
    let have = session
        .exec_timeout(
            &format!("sha256sum {path} 2>/dev/null"),
            Duration::from_secs(60),
            |_, _| {},
        )
        .await?;
    Ok(have.stdout.split_whitespace().next() == Some(sha256))
}

/// Uploads an artifact unless the node already has exactly that file; true
/// when it wrote.
async fn put_file(
    session: &Session,
    path: &str,
    artifact: &crate::state::Artifact,
    mode: u32,
) -> Result<bool> {
    if node_has(session, path, &artifact.sha256).await? {
        return Ok(false);
    }
    let bytes = tokio::fs::read(&artifact.path)
        .await
        .with_context(|| format!("reading {}", artifact.path))?;
    session.upload(path, &bytes, mode).await?;
    Ok(true)
}

/// Uploads `bytes` unless the node already has exactly that file; true when
/// it wrote.
async fn put_bytes(session: &Session, path: &str, bytes: &[u8], mode: u32) -> Result<bool> {
    if node_has(session, path, &hex::encode(Sha256::digest(bytes))).await? {
        return Ok(false);
    }
    session.upload(path, bytes, mode).await?;
    Ok(true)
}

/// `k3s kubectl ARGS` on a server; a failure quotes kubectl's complaint.
async fn kubectl_checked(
    server: &Session,
    args: &str,
    timeout: Duration,
    mut on_line: impl FnMut(&str),
) -> Result<()> {
    let out = server
        .exec_timeout(&format!("k3s kubectl {args}"), timeout, |_, line| {
            on_line(line)
        })
        .await?;
    if out.status != 0 {
        bail!(
            "`kubectl {args}` failed (exit status {}): {}",
            out.status,
            out.stderr_tail(3)
        );
    }
    Ok(())
}

/// Asks `server` until it lists `node` Ready (bounded).
async fn wait_ready(server: &Session, server_name: &str, node: &str) -> Result<()> {
    let query = format!(
        "k3s kubectl get node {node} -o jsonpath='{{.status.conditions[?(@.type==\"Ready\")].status}}'"
    );
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < READY_TIMEOUT {
        let out = server
            .exec_timeout(&query, Duration::from_secs(30), |_, _| {})
            .await?;
        if out.status == 0 && out.stdout.trim() == "True" {
            return Ok(());
        }
        last = format!("{} {}", out.stdout.trim(), out.stderr_tail(3));
        tokio::time::sleep(POLL).await;
    }
    bail!(
        "{node} not Ready in the cluster after {:?} (last answer from {server_name}: {})",
        READY_TIMEOUT,
        last.trim()
    )
}

/// Takes a node that left the inventory out of the cluster and k3s off it;
/// Ok is the event message.
async fn remove(
    shared: &Shared,
    templates: &Templates,
    snapshot: &Snapshot,
    record: &NodeRecord,
) -> Result<String> {
    let state = &shared.state;
    let name = &record.name;
    let inventory = &snapshot.inventory;
    let records = &snapshot.nodes;
    let log = |line: &str| {
        let _ = state.append_event(Some(name), "k3s.remove", line, serde_json::Value::Null);
    };
    // A running server other than this node answers for the cluster.
    let boot = current_bootstrap(snapshot);
    let running_server = |n: &&Node| {
        n.name != *name
            && n.role == Role::Server
            && records
                .iter()
                .any(|r| r.name == n.name && r.stage == Stage::Running)
    };
    let server = boot
        .as_deref()
        .and_then(|b| inventory.nodes.get(b))
        .filter(running_server)
        .or_else(|| inventory.nodes.values().find(running_server));
    let cluster_part = match server {
        Some(server) => {
            let session = connect(state, server).await?;
            let present = session
                .exec_timeout(
                    &format!("k3s kubectl get node {name} -o name"),
                    Duration::from_secs(30),
                    |_, _| {},
                )
                .await?;
            let part = if present.status == 0 {
                for args in [
                    format!("cordon {name}"),
                    format!(
                        "drain {name} --ignore-daemonsets --delete-emptydir-data --force --timeout={}s",
                        DRAIN_TIMEOUT.as_secs()
                    ),
                    format!("delete node {name}"),
                ] {
                    kubectl_checked(&session, &args, DRAIN_TIMEOUT + Duration::from_secs(60), log)
                        .await?;
                }
                format!(
                    "cordoned, drained and deleted from the cluster (through {})",
                    server.name
                )
            } else if present.stderr.contains("NotFound") || present.stderr.contains("not found") {
                format!("not in the cluster (asked {})", server.name)
            } else {
                bail!(
                    "asking {} whether {name} is in the cluster: {}",
                    server.name,
                    present.stderr_tail(3)
                );
            };
            let _ = session.close().await;
            part
        }
        None => "no running server is left to take it out of the cluster".to_string(),
    };
    let ip = record
        .ip
        .parse()
        .with_context(|| format!("{name}'s recorded address `{}`", record.ip))?;
    let session = connect_at(state, name, ip).await?;
    let script = render_uninstall(templates)?;
    put_bytes(&session, UNINSTALL_PATH, script.as_bytes(), 0o700).await?;
    session
        .exec_checked(UNINSTALL_PATH, |_, line| log(line))
        .await?;
    let _ = session.close().await;
    Ok(format!(
        "{cluster_part}; k3s uninstalled; its installed OS stays on the disk"
    ))
}
