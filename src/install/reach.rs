//! The last step of an install: the controller proves it can reach the
//! installed node over SSH, checking the host key pinned at install time and
//! logging in with its own key. Only then is the node `ready` for the cluster
//! steps.
//!
//! A node that phoned home (stage `installed`) is probed at once; a probe
//! that fails leaves the OS where it is and marks the node `unreachable` with
//! the cause (a re-run of `homelab up` tries again).

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::sync::watch;

use crate::inventory::Node;
use crate::lifecycle::NodeEvent;
use crate::netboot::Shared;
use crate::ssh::{ConnectOptions, ControllerKey, HostKeyPin, Session, SshError, Target};
use crate::state::{Stage, State};

/// How often the controller looks for nodes that phoned home.
const POLL: Duration = Duration::from_secs(2);

/// The user the installed image's cloud-init authorises the controller key for.
pub const LOGIN_USER: &str = "root";

/// What the probe runs: cheap, and its answer names the node.
const PROBE_COMMAND: &str = "cat /etc/hostname";

/// Watches for installed nodes and probes each one once, until shutdown.
pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        for node in nodes_to_probe(&shared) {
            if !in_flight.lock().unwrap().insert(node.name.clone()) {
                continue;
            }
            let shared = shared.clone();
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                probe_and_record(&shared, &node).await;
                in_flight.lock().unwrap().remove(&node.name);
            });
        }
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// The inventory's installer nodes whose installed system has phoned home.
fn nodes_to_probe(shared: &Shared) -> Vec<Node> {
    let inventory = shared.inventory();
    let Ok(records) = shared.state.nodes() else {
        return Vec::new();
    };
    records
        .into_iter()
        .filter(|r| r.stage == Stage::Installed)
        .filter_map(|r| inventory.nodes.get(&r.name).cloned())
        .filter(|n| n.boot.is_none())
        .collect()
}

async fn probe_and_record(shared: &Shared, node: &Node) {
    let state = &shared.state;
    let outcome = probe(shared, node).await;
    // Applied only if the node is still installed: it may have been sent
    // elsewhere (a removal) meanwhile, and the lifecycle's compare-and-set
    // then leaves it there.
    let _ = match outcome {
        Ok(message) => state.transition(&node.name, NodeEvent::Reached, &message),
        Err(cause) => state.transition(&node.name, NodeEvent::NotReached, &cause),
    };
}

/// Connects with the pinned host key and runs [`PROBE_COMMAND`]. Ok carries
/// the message for the node's event, Err the cause in front of the user.
/// Where `node`'s sshd is and the host key it must present (pinned at install).
pub fn target(state: &State, node: &Node) -> anyhow::Result<Target> {
    target_at(state, &node.name, node.ip)
}

/// [`target`] for a node known by name and address (one that has left the
/// inventory, say).
pub fn target_at(state: &State, name: &str, ip: Ipv4Addr) -> anyhow::Result<Target> {
    let pinned = state.host_key(name)?.ok_or_else(|| {
        anyhow::anyhow!("no host key was pinned at install; `homelab reinstall` it")
    })?;
    Ok(Target {
        node: name.to_string(),
        addr: SocketAddr::from((ip, 22)),
        user: LOGIN_USER.into(),
        pin: HostKeyPin::parse(&pinned).map_err(|e| anyhow::anyhow!("the pinned host key: {e}"))?,
    })
}

/// An SSH session to `node` as [`LOGIN_USER`] with the controller's key,
/// refused unless the node presents its pinned host key.
pub async fn connect(state: &State, node: &Node) -> anyhow::Result<Session> {
    connect_at(state, &node.name, node.ip).await
}

/// [`connect`] for a node known by name and address.
pub async fn connect_at(state: &State, name: &str, ip: Ipv4Addr) -> anyhow::Result<Session> {
    let target = target_at(state, name, ip)?;
    let key = ControllerKey::load_or_create(state.dir())?;
    Ok(Session::connect(&target, &key, &ConnectOptions::default()).await?)
}

async fn probe(shared: &Shared, node: &Node) -> Result<String, String> {
    let state = &shared.state;
    let target = target(state, node).map_err(|e| format!("{e:#}"))?;
    let key = ControllerKey::load_or_create(state.dir())
        .map_err(|e| format!("the controller's SSH key: {e:#}"))?;
    let fingerprint = target.pin.fingerprint();
    let run = async {
        let session = Session::connect(&target, &key, &ConnectOptions::default()).await?;
        let out = session
            .exec_timeout(PROBE_COMMAND, Duration::from_secs(30), |_, _| {})
            .await?;
        let _ = session.close().await;
        Ok::<_, SshError>(out)
    };
    let out = run.await.map_err(|e| e.to_string())?;
    check_answer(&node.name, out.status, &out.stdout)?;
    Ok(format!(
        "reachable over SSH as {LOGIN_USER}@{} with the pinned host key {fingerprint}",
        node.ip
    ))
}

/// Pure: the probe's answer must be a success naming the node itself (a
/// machine at the node's address with the right key but another name means
/// the inventory and the network disagree).
fn check_answer(node: &str, status: u32, stdout: &str) -> Result<(), String> {
    if status != 0 {
        return Err(format!(
            "`{PROBE_COMMAND}` over SSH failed (exit status {status})"
        ));
    }
    let name = stdout.trim();
    if name != node {
        return Err(format!(
            "the machine at {node}'s address calls itself `{name}`, not `{node}`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_must_name_the_node() {
        assert!(check_answer("node1", 0, "node1\n").is_ok());
        let e = check_answer("node1", 0, "other\n").unwrap_err();
        assert!(e.contains("calls itself `other`"), "{e}");
        let e = check_answer("node1", 1, "").unwrap_err();
        assert!(e.contains("exit status"), "{e}");
    }
}
