//! The cluster step: brings k3s up on nodes that are `ready` (installed and
//! reachable over SSH with their pinned key), in [`super::members`] order:
//! the bootstrap server first, then the other servers one at a time (each
//! joins etcd), then the agents side by side.
//!
//! Per node, over one SSH session: the configuration (with the token) is
//! uploaded 0600 on the channel's stdin, the verified binary and air-gap
//! images and the systemd unit are put in place (skipped when already
//! there), the unit is (re)started, and the node counts as `running` once a
//! server lists it Ready. The token never appears on a command line, in an
//! event or in a log line.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::watch;

use super::release::{self, Release};
use super::{members, render_config, render_unit, unit_name, Join, Member, CONFIG_PATH};
use crate::install::reach::connect;
use crate::inventory::Inventory;
use crate::netboot::Shared;
use crate::ssh::Session;
use crate::state::Stage;
use crate::templates::Templates;

const POLL: Duration = Duration::from_secs(3);
/// How long a node may take to show up Ready after its unit started.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
const BINARY_PATH: &str = "/usr/local/bin/k3s";
const IMAGES_PATH: &str = "/var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar.zst";

/// Runs the cluster step until shutdown.
pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let release: Arc<tokio::sync::Mutex<Option<Release>>> = Arc::default();
    loop {
        for member in next_members(&shared, &in_flight) {
            let (shared, in_flight, release) = (shared.clone(), in_flight.clone(), release.clone());
            tokio::spawn(async move {
                let inventory = shared.inventory();
                let outcome = async {
                    let rel = release_for(&shared, &release, &inventory).await?;
                    provision(&shared, &inventory, &member, &rel).await
                }
                .await;
                let _ = match outcome {
                    Ok(message) => shared
                        .state
                        .set_stage(&member.node, Stage::Running, &message),
                    Err(e) => shared.state.set_stage(
                        &member.node,
                        Stage::ClusterFailed,
                        &format!("k3s: {e:#}"),
                    ),
                };
                in_flight.lock().unwrap().remove(&member.node);
            });
        }
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = tokio::time::sleep(POLL) => {}
        }
    }
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
    let Ok(order) = members(&inventory, None) else {
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
    state.set_stage(
        &node.name,
        Stage::Joining,
        &format!("installing k3s {} ({unit})", release.version),
    )?;
    let templates = Templates::new(None)?;
    let token = super::token(state.dir())?;
    let config = render_config(&templates, inventory, member, &token)?;
    let unit_text = render_unit(&templates, &member.join)?;

    let session = connect(&shared.state, node).await?;
    session
        .exec_checked(
            "mkdir -p /etc/rancher/k3s /var/lib/rancher/k3s/agent/images && chmod 700 /etc/rancher/k3s",
            |_, _| {},
        )
        .await?;
    session
        .upload(CONFIG_PATH, config.as_bytes(), 0o600)
        .await?;
    put_file(&session, BINARY_PATH, &release.binary, 0o755).await?;
    put_file(&session, IMAGES_PATH, &release.images, 0o644).await?;
    session
        .upload(
            &format!("/etc/systemd/system/{unit}"),
            unit_text.as_bytes(),
            0o644,
        )
        .await?;
    let log = |_: crate::ssh::Stream, line: &str| {
        let _ = state.append_event(Some(&node.name), "k3s.log", line, serde_json::Value::Null);
    };
    session
        .exec_checked(
            &format!(
                "systemctl daemon-reload && systemctl enable {unit} && systemctl restart {unit}"
            ),
            log,
        )
        .await?;
    let _ = session.close().await;

    wait_ready(shared, inventory, member).await?;
    Ok(format!(
        "k3s {} {} active; {} is Ready in the cluster",
        release.version,
        if unit == "k3s.service" {
            "server"
        } else {
            "agent"
        },
        node.name
    ))
}

/// Uploads an artifact unless the node already has exactly that file.
async fn put_file(
    session: &Session,
    path: &str,
    artifact: &crate::state::Artifact,
    mode: u32,
) -> Result<()> {
    let have = session
        .exec_timeout(
            &format!("sha256sum {path} 2>/dev/null"),
            Duration::from_secs(60),
            |_, _| {},
        )
        .await?;
    if have.stdout.split_whitespace().next() == Some(artifact.sha256.as_str()) {
        return Ok(());
    }
    let bytes = tokio::fs::read(&artifact.path)
        .await
        .with_context(|| format!("reading {}", artifact.path))?;
    session.upload(path, &bytes, mode).await?;
    Ok(())
}

/// Asks the bootstrap server, until it lists `member` Ready (bounded).
async fn wait_ready(shared: &Shared, inventory: &Inventory, member: &Member) -> Result<()> {
    let order = members(inventory, None).map_err(|e| anyhow!(e))?;
    let bootstrap = inventory
        .nodes
        .get(&order[0].node)
        .context("the bootstrap server left the inventory")?;
    let session = connect(&shared.state, bootstrap).await?;
    let query = format!(
        "k3s kubectl get node {} -o jsonpath='{{.status.conditions[?(@.type==\"Ready\")].status}}'",
        member.node
    );
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < READY_TIMEOUT {
        let out = session
            .exec_timeout(&query, Duration::from_secs(30), |_, _| {})
            .await?;
        if out.status == 0 && out.stdout.trim() == "True" {
            return Ok(());
        }
        last = format!("{} {}", out.stdout.trim(), out.stderr_tail(3));
        tokio::time::sleep(POLL).await;
    }
    bail!(
        "{} not Ready in the cluster after {:?} (last answer from {}: {})",
        member.node,
        READY_TIMEOUT,
        bootstrap.name,
        last.trim()
    )
}
