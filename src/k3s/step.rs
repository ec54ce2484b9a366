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

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::release::{self, Release};
use super::{
    choose_bootstrap, label_commands, members, parse_applied, render_config, render_uninstall,
    render_unit, start_command, unit_name, Join, Member, APPLIED_COMMAND, BINARY_PATH, CONFIG_PATH,
    RESTARTED, UNINSTALL_PATH,
};
use crate::install::reach::{connect, connect_at};
use crate::inventory::{Inventory, Node, Role};
use crate::lifecycle::NodeEvent;
use crate::netboot::Shared;
use crate::ssh::Session;
use crate::state::{NodeRecord, Stage};
use crate::templates::Templates;

const POLL: Duration = Duration::from_secs(3);
/// How long a node may take to show up Ready after its unit started.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long pods get to leave a node being removed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
const IMAGES_PATH: &str = "/var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar.zst";

type InFlight = Arc<Mutex<HashSet<String>>>;

/// Runs the cluster step until shutdown.
pub async fn run(
    shared: Arc<Shared>,
    templates: Arc<Templates>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let in_flight: InFlight = Arc::default();
    let release: Arc<tokio::sync::Mutex<Option<Release>>> = Arc::default();
    loop {
        for member in next_members(&shared, &in_flight) {
            let (shared, templates, in_flight, release) = (
                shared.clone(),
                templates.clone(),
                in_flight.clone(),
                release.clone(),
            );
            tokio::spawn(async move {
                let inventory = shared.inventory();
                let outcome = async {
                    let rel = release_for(&shared, &release, &inventory).await?;
                    provision(&shared, &templates, &inventory, &member, &rel).await
                }
                .await;
                let state = &shared.state;
                let _ = match outcome {
                    Ok(message) => {
                        if member.join == Join::Init {
                            let _ = state.set_bootstrap_server(&member.node);
                        }
                        state.transition(&member.node, NodeEvent::Joined, &message)
                    }
                    Err(e) => state.transition(
                        &member.node,
                        NodeEvent::JoinFailed,
                        &format!("k3s: {e:#}"),
                    ),
                };
                in_flight.lock().unwrap().remove(&member.node);
            });
        }
        for record in next_removals(&shared, &in_flight) {
            let (shared, templates, in_flight) =
                (shared.clone(), templates.clone(), in_flight.clone());
            tokio::spawn(async move {
                let outcome = remove(&shared, &templates, &record).await;
                // Recorded only if still leaving: put back into the inventory
                // or forgotten meanwhile, the plan or the user took it over.
                let (event, message) = match outcome {
                    Ok(message) => (NodeEvent::Left, message),
                    Err(e) => (
                        NodeEvent::LeaveFailed,
                        format!("leaving the cluster: {e:#}"),
                    ),
                };
                let _ = shared.state.transition(&record.name, event, &message);
                in_flight.lock().unwrap().remove(&record.name);
            });
        }
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// The server the cluster runs through now (recorded when it changes).
fn bootstrap(shared: &Shared, inventory: &Inventory, records: &[NodeRecord]) -> Option<String> {
    let recorded = shared.state.bootstrap_server().ok().flatten();
    let running: Vec<&str> = records
        .iter()
        .filter(|r| r.stage == Stage::Running)
        .map(|r| r.name.as_str())
        .collect();
    let chosen = choose_bootstrap(inventory, recorded.as_deref(), &running);
    if let Some(c) = chosen.as_deref().filter(|c| running.contains(c)) {
        if recorded.as_deref() != Some(c) {
            let _ = shared.state.set_bootstrap_server(c);
        }
    }
    chosen
}

/// The members whose turn it is (and marks them in flight). A joining server
/// waits for the bootstrap and every server before it; agents wait for the
/// bootstrap only.
fn next_members(shared: &Shared, in_flight: &Mutex<HashSet<String>>) -> Vec<Member> {
    let inventory = shared.inventory();
    let Ok(records) = shared.state.nodes() else {
        return Vec::new();
    };
    let stage = |name: &str| records.iter().find(|r| r.name == name).map(|r| r.stage);
    let boot = bootstrap(shared, &inventory, &records);
    let Ok(order) = members(&inventory, boot.as_deref()) else {
        return Vec::new();
    };
    let mut in_flight = in_flight.lock().unwrap();
    let mut out = Vec::new();
    let bootstrap_running = stage(&order[0].node) == Some(Stage::Running);
    for (i, m) in order.iter().enumerate() {
        // etcd members join one at a time: every earlier server is settled
        // (running, or failed with its cause, which must not hold up the rest).
        let earlier_servers_settled = order[..i]
            .iter()
            .filter(|o| !matches!(o.join, Join::Agent { .. }))
            .all(|o| stage(&o.node).is_some_and(|s| s == Stage::Running || s.is_failure()));
        let turn = match m.join {
            Join::Init => true,
            Join::Server { .. } => bootstrap_running && earlier_servers_settled,
            Join::Agent { .. } => bootstrap_running,
        };
        if turn && stage(&m.node) == Some(Stage::Ready) && in_flight.insert(m.node.clone()) {
            out.push(m.clone());
        }
    }
    out
}

/// Nodes to take out of the cluster (marked in flight): agents side by
/// side, servers one at a time.
fn next_removals(shared: &Shared, in_flight: &Mutex<HashSet<String>>) -> Vec<NodeRecord> {
    let inventory = shared.inventory();
    let Ok(records) = shared.state.nodes() else {
        return Vec::new();
    };
    let mut in_flight = in_flight.lock().unwrap();
    let is_server = |r: &NodeRecord| r.role == Role::Server.to_string();
    let mut server_busy = records
        .iter()
        .any(|r| r.stage == Stage::Removing && is_server(r) && in_flight.contains(&r.name));
    let mut out = Vec::new();
    for r in records {
        if r.stage != Stage::Removing
            || inventory.nodes.contains_key(&r.name)
            || in_flight.contains(&r.name)
            || (is_server(&r) && server_busy)
        {
            continue;
        }
        server_busy |= is_server(&r);
        in_flight.insert(r.name.clone());
        out.push(r);
    }
    out
}

/// The verified release, fetched once per daemon.
async fn release_for(
    shared: &Shared,
    cache: &tokio::sync::Mutex<Option<Release>>,
    inventory: &Inventory,
) -> Result<Release> {
    let mut cached = cache.lock().await;
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
async fn remove(shared: &Shared, templates: &Templates, record: &NodeRecord) -> Result<String> {
    let state = &shared.state;
    let name = &record.name;
    let inventory = shared.inventory();
    let records = state.nodes()?;
    let log = |line: &str| {
        let _ = state.append_event(Some(name), "k3s.remove", line, serde_json::Value::Null);
    };
    // A running server other than this node answers for the cluster.
    let boot = bootstrap(shared, &inventory, &records);
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
