//! The last step of an install: the controller proves it can reach the
//! installed node over SSH, checking the host key pinned at install time and
//! logging in with its own key. Only then is the node `ready` for the cluster
//! steps.
//!
//! A node that phoned home (stage `installed`) is probed at once; a probe
//! that fails leaves the OS where it is and marks the node `unreachable` with
//! the cause (a re-run of `homelab up` tries again).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::context::Shared;
use crate::inventory::Node;
use crate::lifecycle::NodeEvent;
use crate::reconcile::{Outcome, Part, Reconcile, Snapshot};
use crate::ssh::{ConnectOptions, ControllerKey, HostKeyPin, Session, SshError, Target};
use crate::state::{Stage, State};

/// The user the installed image's cloud-init authorises the controller key for.
pub const LOGIN_USER: &str = "root";

/// What the probe runs: cheap, and its answer names the node.
const PROBE_COMMAND: &str = "cat /etc/hostname";

/// The SSH reachability check as a controller loop (see
/// [`crate::reconcile`]): its keys are the names of nodes to probe.
pub struct Reach;

impl Part for Reach {
    fn name(&self) -> &'static str {
        "reach"
    }

    fn due(&self, snapshot: &Snapshot, _in_flight: &BTreeSet<String>) -> Vec<String> {
        nodes_to_probe(snapshot)
    }

    fn reconcile(self: Arc<Self>, shared: Arc<Shared>, key: String) -> Reconcile {
        Box::pin(async move {
            if let Some(node) = shared.inventory().nodes.get(&key).cloned() {
                probe_and_record(&shared, &node).await;
            }
            Outcome::Done
        })
    }
}

/// Pure: the inventory's installer nodes whose installed system has phoned
/// home (stage `installed`).
pub fn nodes_to_probe(snapshot: &Snapshot) -> Vec<String> {
    snapshot
        .nodes
        .iter()
        .filter(|r| r.stage == Stage::Installed)
        .filter(|r| {
            snapshot
                .inventory
                .nodes
                .get(&r.name)
                .is_some_and(|n| n.boot.is_none())
        })
        .map(|r| r.name.clone())
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

#[cfg(test)]
mod due_tests {
    use super::*;

    #[test]
    fn only_installed_installer_nodes_of_the_inventory_are_probed() {
        let inventory = crate::testing::inventory(
            "\n[nodes.p1]\nmac = \"52:54:00:00:00:02\"\nip = \"10.0.0.12\"\nrole = \"agent\"\n\
             boot = { kernel = \"/etc/passwd\" }\n",
        );
        let rec = |name: &str, stage| crate::testing::record(name, "agent", stage);
        let snapshot = |stage| Snapshot {
            inventory: Arc::new(inventory.clone()),
            nodes: vec![
                rec("s1", stage),
                rec("p1", Stage::Installed),
                rec("gone", Stage::Installed),
            ],
            bootstrap: None,
            sagas: Vec::new(),
        };
        assert_eq!(nodes_to_probe(&snapshot(Stage::Installed)), ["s1"]);
        for stage in [Stage::Rebooting, Stage::Ready, Stage::Unreachable] {
            assert!(nodes_to_probe(&snapshot(stage)).is_empty(), "{stage}");
        }
    }
}
