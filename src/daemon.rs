//! The daemon: applies plans to the state database, runs the netboot services,
//! and listens on a local control socket so that `homelab up` can hand a
//! running daemon a new inventory instead of fighting it over ports.
//!
//! Shutdown is one `watch` signal that every service task selects on.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::context::Shared;
use crate::inventory::{self, DhcpMode, Inventory};
use crate::lifecycle::NodeEvent;
use crate::netboot;
use crate::plan::{self, Action, Plan};
use crate::state::{now_ms, DaemonLock, NodeRecord, Stage, State};
use crate::templates::Templates;

pub const CONTROL_SOCKET: &str = "control.sock";

/// Execute a plan on the state database, each action in its own
/// transaction with its event, before any service acts on it. The plan has
/// decided every transition ([`Action::event`]); the lifecycle's
/// compare-and-set applies it, so a node that moved meanwhile is left where
/// it is.
pub fn apply_plan(state: &State, inventory: &Inventory, plan: &Plan) -> Result<()> {
    for action in plan.changes() {
        let name = action.node();
        let now = now_ms();
        let fields = inventory
            .nodes
            .get(name)
            .map(|n| record_for(n, Stage::Pending, now));
        match (action, action.event()) {
            (Action::Provision { .. }, _) => {
                let rec = fields.ok_or_else(|| anyhow!("{name} is not in the inventory"))?;
                state.put_node(
                    &rec,
                    "plan.provision",
                    "added to the controller; waiting for it to PXE-boot",
                )?;
            }
            (Action::Update { changes, .. }, event) => {
                let rec = fields.ok_or_else(|| anyhow!("{name} is not in the inventory"))?;
                let message = format!("updated: {}", changes.join(", "));
                state.update_node(&rec, false, "plan.update", &message)?;
                if let Some(event) = event {
                    // In the cluster: k3s is configured again (labels, taints).
                    state.transition(
                        name,
                        event,
                        &format!("{message}; k3s is configured again"),
                    )?;
                }
            }
            (Action::Reinstall { .. }, _) => {
                let rec = fields.ok_or_else(|| anyhow!("{name} is not in the inventory"))?;
                state.update_node(
                    &rec,
                    true,
                    "plan.reinstall",
                    "reinstall requested in the inventory; the disk is wiped on its next PXE boot",
                )?;
            }
            (Action::Resume { .. }, Some(NodeEvent::Readded)) => {
                // Back in the inventory with its OS kept: checked over SSH, then
                // it joins the cluster in the role it has now.
                state.transition_with(
                    name,
                    NodeEvent::Readded,
                    "back in the inventory; its installed OS is kept: trying SSH with the pinned host key",
                    fields.as_ref(),
                )?;
            }
            (Action::Resume { stage, .. }, Some(event)) => {
                let message = if *stage == Stage::Unreachable {
                    // Installed already: only the SSH check is tried again.
                    "trying SSH with the pinned host key again"
                } else {
                    // Installed and reachable: only the cluster step is tried again.
                    "trying k3s again"
                };
                state.transition(name, event, message)?;
            }
            (Action::Resume { stage, .. }, None) => {
                state.append_event(
                    Some(name),
                    "plan.resume",
                    &format!("resuming from {stage}"),
                    serde_json::Value::Null,
                )?;
            }
            (Action::Remove { .. }, Some(event)) => {
                let to = state
                    .node(name)?
                    .and_then(|r| crate::lifecycle::transition(r.stage, event).ok());
                let message = match to {
                    Some(Stage::Removing) => "removed from the inventory: leaving the cluster",
                    Some(Stage::Released) => {
                        "removed from the inventory; its installed OS stays on the disk"
                    }
                    _ => "removed from the inventory",
                };
                state.transition(name, event, message)?;
            }
            (Action::Remove { .. }, None) | (Action::Nothing { .. } | Action::Refuse { .. }, _) => {
            }
        }
    }
    for action in plan.refusals() {
        if let Action::Refuse { node, reason, help } = action {
            state.append_event(
                Some(node),
                "plan.refused",
                reason,
                serde_json::json!({ "help": help }),
            )?;
        }
    }
    Ok(())
}

fn record_for(node: &inventory::Node, stage: Stage, since: i64) -> NodeRecord {
    NodeRecord {
        name: node.name.clone(),
        mac: node.mac.to_string(),
        ip: node.ip.to_string(),
        role: node.role.to_string(),
        stage,
        reinstall: false,
        spec_hash: plan::spec_hash(node),
        bytes_done: 0,
        bytes_total: 0,
        detail: String::new(),
        stage_since_ms: since,
        updated_ms: now_ms(),
    }
}

/// Options for starting the daemon.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub state_dir: PathBuf,
    /// Override directory for templates (a file there wins over the built-in one).
    pub templates_dir: Option<PathBuf>,
}

/// A running daemon. Dropping it without `shutdown` aborts its tasks.
pub struct Daemon {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<Result<()>>,
    http_addr: SocketAddr,
    _lock: DaemonLock,
}

impl Daemon {
    /// Take the state dir, apply the plan for `inventory`, and start the services.
    /// Returns the daemon and the plan it applied.
    pub async fn start(opts: &DaemonOptions, inventory: Inventory) -> Result<(Daemon, Plan)> {
        crate::state::ensure_dir(&opts.state_dir)?;
        let lock = DaemonLock::acquire(&opts.state_dir)?;
        let state = State::open(&opts.state_dir)?;
        let mut plan = plan::plan(&inventory, &state.nodes()?);
        plan.cluster = plan::plan_cluster(&state.unfinished_sagas()?);
        apply_plan(&state, &inventory, &plan)?;
        let templates = Arc::new(Templates::new(opts.templates_dir.clone())?);
        let controller = inventory.controller.clone();
        if controller.tftp || controller.dhcp != DhcpMode::Off {
            netboot::tftp::check_ipxe_dir(&controller)?;
        }
        let shared = Shared::new(state.clone(), inventory);
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = JoinSet::new();

        let http_addr = SocketAddr::from((controller.address, controller.http_port));
        let listener = tokio::net::TcpListener::bind(http_addr)
            .await
            .with_context(|| {
                format!(
                "cannot listen for HTTP on {http_addr}: is {} configured on {} and the port free? \
                 (set controller.address / controller.http_port)",
                controller.address, controller.interface
            )
            })?;
        let http_addr = listener.local_addr()?;
        tasks.spawn(netboot::http::serve(
            shared.clone(),
            templates.clone(),
            listener,
            rx.clone(),
        ));
        if controller.tftp {
            let addr = SocketAddr::from((controller.address, 69));
            let socket = std::net::UdpSocket::bind(addr).with_context(|| {
                format!("cannot listen for TFTP on {addr}: is another TFTP server running?")
            })?;
            tasks.spawn(netboot::tftp::serve(shared.clone(), socket, rx.clone()));
        }
        if controller.dhcp != DhcpMode::Off {
            let dhcp = netboot::dhcp::bind(&controller)?;
            tasks.spawn(netboot::dhcp::serve(shared.clone(), dhcp, rx.clone()));
        }
        // The controller loops, on one driver.
        let parts: Vec<Arc<dyn crate::reconcile::Part>> = vec![
            Arc::new(crate::install::reach::Reach),
            Arc::new(crate::k3s::step::ClusterStep::new(templates.clone())),
            // Cluster work as sagas; the kinds (GitOps seeding, rollouts,
            // image updates) register here as they are built.
            Arc::new(crate::saga::Sagas::new()),
        ];
        tasks.spawn(crate::reconcile::run(
            shared.clone(),
            parts,
            crate::reconcile::DriverOptions::default(),
            rx.clone(),
        ));
        let control = bind_control_socket(&opts.state_dir)?;
        tasks.spawn(control_loop(shared.clone(), control, rx.clone()));

        state.append_event(
            None,
            "daemon.started",
            &format!(
                "serving on {} (dhcp {:?}, tftp {})",
                controller.interface, controller.dhcp, controller.tftp
            ),
            serde_json::json!({ "pid": std::process::id(), "http": http_addr.to_string() }),
        )?;
        prepare_media(&shared, opts.state_dir.clone());
        wake_nodes(&shared, &plan);
        Ok((
            Daemon {
                shared,
                shutdown,
                tasks,
                http_addr,
                _lock: lock,
            },
            plan,
        ))
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Wait until a service fails (returning its error) or `stop` resolves.
    pub async fn run_until(&mut self, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::select! {
            _ = stop => Ok(()),
            Some(res) = self.tasks.join_next() => match res {
                Ok(Ok(())) => bail!("a service stopped unexpectedly"),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow!("a service crashed: {e}")),
            },
        }
    }

    /// Signal every service to stop and wait (bounded) for them.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        // An unfinished media preparation is simply dropped: the next start
        // prepares again (verified artifacts are cached).
        self.shared.abort_media();
        let _ = self.shared.state.append_event(
            None,
            "daemon.stopped",
            "daemon stopped",
            serde_json::Value::Null,
        );
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shared.abort_media();
    }
}

/// Verify the OS image and build the installer in the background when some
/// node installs. Until it is ready, installing nodes are told to wait; if it
/// fails, they are marked failed with the reason and nothing is served.
pub fn prepare_media(shared: &Arc<Shared>, state_dir: PathBuf) {
    use crate::install::media::{self, MediaState};
    let inv = shared.inventory();
    let installing: Vec<String> = inv
        .nodes
        .values()
        .filter(|n| n.boot.is_none())
        .map(|n| n.name.clone())
        .collect();
    if installing.is_empty() {
        let generation = shared.begin_media();
        shared.publish_media(generation, MediaState::NotNeeded);
        return;
    }
    let generation = shared.begin_media();
    let task_shared = shared.clone();
    let task = tokio::spawn(async move {
        let shared = task_shared;
        let started = std::time::Instant::now();
        let result = async {
            let agent = std::env::current_exe()
                .context("finding the homelab binary (the install agent)")?;
            let store =
                crate::artifacts::Store::new(&shared.state, inv.controller.mirror.clone(), None)?;
            media::prepare(&store, &state_dir, &inv.os, &agent).await
        }
        .await;
        let state = &shared.state;
        match result {
            Ok(m) => {
                let message = format!(
                    "OS image verified ({}), installer built (kernel {}, {} drivers) in {:.1} s",
                    crate::ui::format_bytes(m.image_size),
                    m.installer.release,
                    m.installer.modules.len(),
                    started.elapsed().as_secs_f64()
                );
                let missing = m.installer.missing.clone();
                if shared.publish_media(generation, MediaState::Ready(Arc::new(m))) {
                    let _ = state.append_event(
                        None,
                        "install.media-ready",
                        &message,
                        serde_json::json!({ "missing_modules": missing }),
                    );
                }
            }
            Err(e) => {
                let why = format!("{e:#}");
                if !shared.publish_media(generation, MediaState::Failed(why.clone())) {
                    // A newer preparation (the [os] table was edited) decides.
                    return;
                }
                tracing::error!("install media: {why}");
                let _ =
                    state.append_event(None, "install.media-failed", &why, serde_json::Value::Null);
                // Only nodes still to be installed fail; the lifecycle
                // leaves installed or departed ones where they are.
                for name in installing {
                    let _ = state.transition(
                        &name,
                        NodeEvent::MediaFailed,
                        &format!("not installed: {why}"),
                    );
                }
            }
        }
    });
    shared.track_media(generation, task.abort_handle());
}

fn wake_nodes(shared: &Shared, plan: &Plan) {
    let inv = shared.inventory();
    for action in plan.actions.iter().filter(|a| a.wants_wake()) {
        let Some(node) = inv.nodes.get(action.node()) else {
            continue;
        };
        let message = match netboot::wol::send(&inv.controller.interface, node.mac) {
            Ok(()) => format!("Wake-on-LAN packet sent to {}", node.mac),
            Err(e) => format!("Wake-on-LAN to {} failed: {e:#}", node.mac),
        };
        let _ = shared.state.append_event(
            Some(&node.name),
            "power.wol",
            &message,
            serde_json::Value::Null,
        );
    }
}

// ---- control socket ----

/// A request over the control socket (one JSON line).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ControlRequest {
    /// Validate and apply this inventory.
    Apply {
        path: PathBuf,
        source: String,
    },
    Ping,
}

/// The answer (one JSON line).
#[derive(Debug, Serialize, Deserialize)]
pub struct ControlResponse {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub plan: Option<Plan>,
    #[serde(default)]
    pub warnings: Vec<String>,
}

fn bind_control_socket(dir: &Path) -> Result<tokio::net::UnixListener> {
    let path = dir.join(CONTROL_SOCKET);
    // We hold the daemon lock, so a socket file left here is stale.
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot create control socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn control_loop(
    shared: Arc<Shared>,
    listener: tokio::net::UnixListener,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_control(shared, stream).await {
                        tracing::warn!("control connection: {e:#}");
                    }
                });
            }
        }
    }
}

async fn serve_control(shared: Arc<Shared>, stream: tokio::net::UnixStream) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read.take(16 << 20)).lines();
    let Some(line) = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await??
    else {
        return Ok(());
    };
    let response = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(ControlRequest::Ping) => ControlResponse {
            ok: true,
            error: None,
            plan: None,
            warnings: vec![],
        },
        Ok(ControlRequest::Apply { path, source }) => apply_source(&shared, &path, &source),
        Err(e) => ControlResponse {
            ok: false,
            error: Some(format!("bad request: {e}")),
            plan: None,
            warnings: vec![],
        },
    };
    let mut text = serde_json::to_string(&response)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    Ok(())
}

use tokio::io::AsyncReadExt as _;

pub fn apply_source(shared: &Arc<Shared>, path: &Path, source: &str) -> ControlResponse {
    let fail = |error: String| ControlResponse {
        ok: false,
        error: Some(error),
        plan: None,
        warnings: vec![],
    };
    let loaded = match inventory::parse_str(source, path) {
        Ok(l) => l,
        Err(d) => return fail(d.to_string()),
    };
    let mut warnings: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
    let old = shared.inventory();
    if old.controller != loaded.inventory.controller {
        warnings.push(
            "the [controller] settings changed; they take effect when the daemon restarts \
             (systemctl restart homelab)"
                .into(),
        );
    }
    let result = (|| -> Result<Plan> {
        let mut plan = plan::plan(&loaded.inventory, &shared.state.nodes()?);
        plan.cluster = plan::plan_cluster(&shared.state.unfinished_sagas()?);
        apply_plan(&shared.state, &loaded.inventory, &plan)?;
        Ok(plan)
    })();
    match result {
        Ok(plan) => {
            let mut inv = loaded.inventory;
            // Services keep running with the controller settings they started with.
            inv.controller = old.controller.clone();
            let os_changed = inv.os != old.os;
            shared.set_inventory(inv);
            if os_changed || matches!(shared.media(), crate::install::media::MediaState::Failed(_))
            {
                prepare_media(shared, shared.state.dir().to_path_buf());
            }
            wake_nodes(shared, &plan);
            ControlResponse {
                ok: true,
                error: None,
                plan: Some(plan),
                warnings,
            }
        }
        Err(e) => fail(format!("{e:#}")),
    }
}

/// Client side: send one request to the daemon on `state_dir`.
pub fn control_request(state_dir: &Path, request: &ControlRequest) -> Result<ControlResponse> {
    let path = state_dir.join(CONTROL_SOCKET);
    let mut stream = UnixStream::connect(&path)
        .with_context(|| format!("cannot reach the running daemon at {}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer)
        .with_context(|| format!("unexpected answer from the daemon: {answer:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory(nodes: &str) -> Inventory {
        crate::testing::inventory(nodes)
    }

    const AGENTS: &str = "\n[nodes.a1]\nmac = \"52:54:00:00:00:02\"\nip = \"10.0.0.12\"\nrole = \"agent\"\n\
                          \n[nodes.a2]\nmac = \"52:54:00:00:00:03\"\nip = \"10.0.0.13\"\nrole = \"agent\"\n\
                          \n[nodes.a3]\nmac = \"52:54:00:00:00:04\"\nip = \"10.0.0.14\"\nrole = \"agent\"\n";

    fn apply(state: &State, inv: &Inventory) {
        let plan = plan::plan(inv, &state.nodes().unwrap());
        apply_plan(state, inv, &plan).unwrap();
    }

    fn stage(state: &State, node: &str) -> Stage {
        state.node(node).unwrap().unwrap().stage
    }

    #[test]
    fn removal_leaves_the_cluster_keeps_the_os_and_a_readded_node_is_not_reinstalled() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let all = inventory(AGENTS);
        apply(&state, &all);
        for (node, st) in [
            ("s1", Stage::Running),
            ("a1", Stage::Running),
            ("a2", Stage::Ready),
            ("a3", Stage::Pending),
        ] {
            state.force_stage(node, st, "").unwrap();
        }

        apply(&state, &inventory(""));
        assert_eq!(stage(&state, "s1"), Stage::Running);
        assert_eq!(stage(&state, "a1"), Stage::Removing, "in the cluster");
        assert_eq!(stage(&state, "a2"), Stage::Released, "installed, no k3s");
        assert_eq!(stage(&state, "a3"), Stage::Removed, "nothing installed");

        // Back in the inventory, as a server: the installed ones (released,
        // or forgotten while leaving) are checked over SSH, never
        // reinstalled; the one without an OS is provisioned.
        state.force_stage("a1", Stage::Forgotten, "").unwrap();
        let back = inventory(&AGENTS.replace("role = \"agent\"", "role = \"server\""));
        apply(&state, &back);
        for node in ["a1", "a2"] {
            let rec = state.node(node).unwrap().unwrap();
            assert_eq!(
                (rec.stage, rec.role.as_str(), rec.reinstall),
                (Stage::Installed, "server", false),
                "{node}"
            );
        }
        assert_eq!(stage(&state, "a3"), Stage::Pending);
    }

    #[test]
    fn an_edited_running_node_is_configured_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        apply(&state, &inventory(""));
        state.force_stage("s1", Stage::Running, "").unwrap();
        let labelled = inventory("labels = { zone = \"a\" }\n");
        apply(&state, &labelled);
        assert_eq!(stage(&state, "s1"), Stage::Ready);
        let last = state.last_events(1, Some("s1")).unwrap();
        assert!(
            last[0].message.contains("k3s is configured again"),
            "{}",
            last[0].message
        );
    }
}
