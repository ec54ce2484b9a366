//! k3s on the installed nodes: which node bootstraps the cluster and who
//! joins whom, the per-node configuration and systemd unit (templates in
//! `k3s/`), the release files, and the cluster token.
//!
//! This module is the core of the cluster step: what to write where, and the
//! verified release ([`release`]); the step that uploads these over SSH and
//! waits for each node is built on it.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::inventory::{Inventory, Node, Role};

pub mod kubeconfig;
pub mod release;
pub mod step;

use crate::templates::Templates;

/// The cluster token's secret name in the state dir (mode 0600).
pub const TOKEN_SECRET: &str = "k3s_token";

/// Where the configuration goes on a node.
pub const CONFIG_PATH: &str = "/etc/rancher/k3s/config.yaml";

/// Where the binary goes on a node.
pub const BINARY_PATH: &str = "/usr/local/bin/k3s";

/// k3s's data directory on a node.
pub const DATA_DIR: &str = "/var/lib/rancher/k3s";

/// Where the uninstall script goes on a node.
pub const UNINSTALL_PATH: &str = "/usr/local/bin/homelab-k3s-uninstall";

/// How a node enters the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Join {
    /// The first server: starts embedded etcd (`cluster-init`).
    Init,
    /// A further server joining the etcd cluster through `server`.
    Server { server: Ipv4Addr },
    /// An agent registering with `server`.
    Agent { server: Ipv4Addr },
}

/// One node's place in the cluster, in the order they are brought up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node: String,
    pub join: Join,
}

/// Pure: the order nodes join and through whom. The bootstrap server is the
/// one already recorded (`bootstrap`, once the cluster exists) if it is
/// still a server in the inventory, else the first server by name; servers
/// come before agents, so agents always find a server.
pub fn members(inventory: &Inventory, bootstrap: Option<&str>) -> Result<Vec<Member>, String> {
    let mut servers: Vec<&Node> = inventory
        .nodes
        .values()
        .filter(|n| n.role == Role::Server && n.boot.is_none())
        .collect();
    servers.sort_by(|a, b| a.name.cmp(&b.name));
    // Nodes with a boot profile run no installed OS, so no k3s.
    let agents = inventory
        .nodes
        .values()
        .filter(|n| n.role != Role::Server && n.boot.is_none());
    let first = bootstrap
        .and_then(|b| servers.iter().position(|n| n.name == b))
        .unwrap_or(0);
    if servers.is_empty() {
        return Err(
            "the inventory has no node with role = \"server\": k3s needs one (three for HA)".into(),
        );
    }
    let init = servers.remove(first);
    let mut out = vec![Member {
        node: init.name.clone(),
        join: Join::Init,
    }];
    out.extend(servers.iter().map(|n| Member {
        node: n.name.clone(),
        join: Join::Server { server: init.ip },
    }));
    let mut agents: Vec<&Node> = agents.collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    out.extend(agents.iter().map(|n| Member {
        node: n.name.clone(),
        join: Join::Agent { server: init.ip },
    }));
    Ok(out)
}

/// Pure: the server the cluster runs through, for [`members`]: the recorded
/// bootstrap while it is still a server in the inventory; else a server that
/// already runs k3s (the cluster exists and must not be initialised a second
/// time); else none yet (the first server by name will initialise it).
pub fn choose_bootstrap(
    inventory: &Inventory,
    recorded: Option<&str>,
    running: &[&str],
) -> Option<String> {
    let is_server = |name: &str| {
        inventory
            .nodes
            .get(name)
            .is_some_and(|n| n.role == Role::Server && n.boot.is_none())
    };
    if let Some(r) = recorded.filter(|r| is_server(r)) {
        return Some(r.to_string());
    }
    let mut running: Vec<&str> = running.iter().copied().filter(|n| is_server(n)).collect();
    running.sort_unstable();
    running.first().map(|n| n.to_string())
}

/// Pure: the names a server's certificate must carry so the kubeconfig
/// works by address and by name.
pub fn tls_sans(node: &Node, domain: &str) -> Vec<String> {
    vec![
        node.ip.to_string(),
        node.name.clone(),
        format!("{}.{domain}", node.name),
    ]
}

/// Renders a node's `config.yaml`. It carries the token: it travels only
/// inside an SSH channel and is written 0600.
pub fn render_config(
    templates: &Templates,
    inventory: &Inventory,
    member: &Member,
    token: &str,
) -> Result<String> {
    let node = inventory
        .nodes
        .get(&member.node)
        .with_context(|| format!("{} is not in the inventory", member.node))?;
    templates.render(
        "k3s/config.yaml.j2",
        minijinja::context! {
            token => token,
            node => minijinja::context! {
                name => &node.name,
                ip => node.ip.to_string(),
                role => node.role.to_string(),
            },
            join => minijinja::value::Serde(&member.join),
            tls_sans => tls_sans(node, &inventory.cluster.domain),
            labels => node_labels(node),
            taints => node.taints.iter().map(ToString::to_string).collect::<Vec<_>>(),
        },
    )
}

/// Pure: the node's labels as k3s's `node-label` entries ("key=value"),
/// homelab's role label first.
pub fn node_labels(node: &Node) -> Vec<String> {
    std::iter::once(format!("{}={}", crate::inventory::ROLE_LABEL, node.role))
        .chain(node.labels.iter().map(|(k, v)| format!("{k}={v}")))
        .collect()
}

/// The node-label and node-taint entries of a config this module wrote
/// (read back before it is replaced, to take off what the inventory dropped).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub labels: Vec<String>,
    pub taints: Vec<String>,
}

/// The command that prints only the node-label and node-taint entries of
/// the node's config (never the token), as `node-label: ENTRY` lines.
pub const APPLIED_COMMAND: &str = "awk '/^node-(label|taint):/ { key = $1; next } /^[^ ]/ { key = \"\" } key != \"\" && /^  - / { print key, $2 }' /etc/rancher/k3s/config.yaml 2>/dev/null";

/// Pure: reads [`APPLIED_COMMAND`]'s output.
pub fn parse_applied(text: &str) -> Applied {
    let mut out = Applied::default();
    for line in text.lines() {
        let Some((key, entry)) = line.split_once(' ') else {
            continue;
        };
        let entry = entry.trim().trim_matches('"').to_string();
        match key {
            "node-label:" => out.labels.push(entry),
            "node-taint:" => out.taints.push(entry),
            _ => {}
        }
    }
    out
}

/// Pure: the `kubectl` arguments that make `node`'s labels and taints in
/// the cluster what the inventory says: k3s applies `node-label` and
/// `node-taint` only when a node first registers, so changes to a node
/// already in the cluster go through the API. Entries the previous config
/// had and the inventory no longer has are taken off.
pub fn label_commands(node: &Node, previous: &Applied) -> Vec<String> {
    let name = &node.name;
    let labels = node_labels(node);
    let taints: Vec<String> = node.taints.iter().map(ToString::to_string).collect();
    let key_of = |entry: &str| entry.split_once('=').map_or(entry, |(k, _)| k).to_string();
    let mut out = Vec::new();
    let label_keys: Vec<String> = labels.iter().map(|l| key_of(l)).collect();
    let dropped: Vec<String> = previous
        .labels
        .iter()
        .map(|l| key_of(l))
        .filter(|k| !label_keys.contains(k))
        .map(|k| format!("{k}-"))
        .collect();
    if !dropped.is_empty() {
        out.push(format!("label node {name} {}", dropped.join(" ")));
    }
    out.push(format!(
        "label node {name} --overwrite {}",
        labels.join(" ")
    ));
    let taint_id = |t: &str| -> String {
        // "key=value:Effect" and "key:Effect" are both known by key and effect.
        let (kv, effect) = t.rsplit_once(':').unwrap_or((t, ""));
        format!("{}:{effect}", key_of(kv))
    };
    let current: Vec<String> = taints.iter().map(|t| taint_id(t)).collect();
    for old in &previous.taints {
        let id = taint_id(old);
        if !current.contains(&id) {
            out.push(format!("taint node {name} {id}-"));
        }
    }
    if !taints.is_empty() {
        out.push(format!(
            "taint node {name} --overwrite {}",
            taints.join(" ")
        ));
    }
    out
}

/// Renders the script that takes k3s off a node.
pub fn render_uninstall(templates: &Templates) -> Result<String> {
    templates.render(
        "k3s/uninstall.sh.j2",
        minijinja::context! { data_dir => DATA_DIR, binary => BINARY_PATH },
    )
}

/// Renders the systemd unit for a server or an agent.
pub fn render_unit(templates: &Templates, join: &Join) -> Result<String> {
    let mode = match join {
        Join::Agent { .. } => "agent",
        _ => "server",
    };
    templates.render("k3s/k3s.service.j2", minijinja::context! { mode })
}

/// The unit's file name on the node.
pub fn unit_name(join: &Join) -> &'static str {
    match join {
        Join::Agent { .. } => "k3s-agent.service",
        _ => "k3s.service",
    }
}

/// The official release files for `version` (x86-64).
pub fn release_urls(version: &str) -> ReleaseUrls {
    let base = format!(
        "https://github.com/k3s-io/k3s/releases/download/{}",
        version.replace('+', "%2B")
    );
    ReleaseUrls {
        binary: format!("{base}/k3s"),
        checksums: format!("{base}/sha256sum-amd64.txt"),
        airgap_images: format!("{base}/k3s-airgap-images-amd64.tar.zst"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseUrls {
    pub binary: String,
    pub checksums: String,
    pub airgap_images: String,
}

/// Pure: the sha256 of `file` in a release's `sha256sum-amd64.txt`.
pub fn checksum_of(sums: &str, file: &str) -> Result<String, String> {
    sums.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?, w.next()?.trim_start_matches('*')))
        })
        .find(|(_, name)| *name == file)
        .map(|(sum, _)| sum.to_ascii_lowercase())
        .filter(|sum| sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("the release's checksum file lists no valid sha256 for `{file}`"))
}

/// The cluster token, generated once (32 random bytes, hex) and kept as a
/// 0600 secret in the state dir.
pub fn token(state_dir: &Path) -> Result<String> {
    if let Some(bytes) = crate::state::read_secret(state_dir, TOKEN_SECRET)? {
        let token = String::from_utf8(bytes).context("the k3s token secret is not text")?;
        if token.len() < 32 {
            bail!("the k3s token secret is too short; it was not written by homelab");
        }
        return Ok(token);
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    crate::state::write_secret(state_dir, TOKEN_SECRET, token.as_bytes())?;
    Ok(token)
}

/// What the start command prints when it (re)started k3s.
pub const RESTARTED: &str = "homelab: k3s restarted";

/// Starts the unit: restarts it when one of its files changed, otherwise
/// only if it is not running. The config's mode is enforced either way.
pub fn start_command(unit: &str, changed: bool) -> String {
    let restart = format!("systemctl restart {unit} && echo '{RESTARTED}'");
    let start = if changed {
        restart
    } else {
        format!("{{ systemctl is-active --quiet {unit} || {{ {restart}; }}; }}")
    };
    format!(
        "chmod 600 {CONFIG_PATH} && systemctl daemon-reload && systemctl enable {unit} && {start}"
    )
}

#[cfg(test)]
mod tests;
