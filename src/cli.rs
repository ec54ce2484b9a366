//! The command line: a thin layer that parses arguments, loads the inventory,
//! and calls into the modules. Exit codes: 0 done, 1 failed, 2 usage or
//! invalid inventory.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};

use crate::daemon::{self, ControlRequest, Daemon, DaemonOptions};
use crate::inventory::{self, Inventory};
use crate::lab;
use crate::lifecycle::NodeEvent;
use crate::logging::{self, LogFormat};
use crate::plan;
use crate::state::{self, DaemonLock, State};
use crate::ui::{self, FollowOptions, Outcome};

#[derive(Debug, Parser)]
#[command(
    name = "homelab",
    version,
    about = "Bare-metal homelab provisioning: PXE-boot machines from an inventory, install an OS, run k3s.",
    long_about = "homelab turns machines with empty disks into a cluster. Describe them in inventory.toml, \
run `homelab up`, and watch them PXE-boot from this controller. Edit the inventory and run `homelab up` \
again to converge to it.\n\nStart with `homelab init` to write a commented inventory.toml.",
    after_help = "Typical flow:\n  homelab init            write a commented inventory.toml\n  homelab validate        check it\n  homelab plan            see what would change\n  homelab up              apply it and watch the nodes come up\n  homelab status          see where every node is"
)]
pub struct Cli {
    /// The inventory file.
    #[arg(
        short,
        long,
        global = true,
        default_value = "inventory.toml",
        env = "HOMELAB_INVENTORY"
    )]
    pub inventory: PathBuf,
    /// Where the controller keeps its database, secrets and cache.
    #[arg(long, global = true, default_value = state::DEFAULT_DIR, env = "HOMELAB_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Log format on stderr (filter with RUST_LOG, e.g. RUST_LOG=homelab=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// A directory of templates that override the built-in ones (same relative names).
    #[arg(long, global = true, env = "HOMELAB_TEMPLATES")]
    pub templates: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a commented inventory.toml for this machine (never overwrites).
    ///
    /// The controller's interface, address and subnet are those of this
    /// machine's default route; DHCP runs in proxy mode beside your router;
    /// the OS is Debian's cloud image with its published checksum list. No
    /// nodes: add them with `homelab discover --adopt NAME...`.
    Init,
    /// Check the inventory and print every problem at once.
    Validate,
    /// Show what `up` would do.
    Plan {
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply the inventory and watch the nodes come up.
    ///
    /// Validates, shows the plan, starts the netboot services (or hands the
    /// inventory to a daemon already running on the state dir) and draws one
    /// live line per node until every node is done.
    Up {
        /// Give up waiting after this many seconds (the services stop too, unless a daemon runs them).
        #[arg(long)]
        timeout: Option<u64>,
        /// Keep serving after every node is done (until Ctrl-C).
        #[arg(long)]
        keep_serving: bool,
        /// Print plain lines even on a terminal.
        #[arg(long)]
        plain: bool,
    },
    /// Run the daemon in the foreground (for systemd). SIGHUP re-reads the inventory.
    Serve,
    /// Show every node's stage.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Show the audit trail.
    Events {
        /// Keep printing new events as they happen.
        #[arg(short, long)]
        follow: bool,
        /// Only this node's events.
        #[arg(long)]
        node: Option<String>,
        /// How many past events to show.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
        #[arg(long)]
        json: bool,
    },
    /// List PXE clients that are not in the inventory, or add them to it.
    Discover {
        #[arg(long)]
        json: bool,
        /// Add the listed machines to the inventory as these nodes (oldest
        /// seen first, one per name), with the next free addresses; the
        /// file's comments and layout are kept.
        #[arg(long, num_args = 1.., value_name = "NAME")]
        adopt: Vec<String>,
        /// The role of the adopted nodes (default: the first is a server when
        /// the inventory has none, the rest agents).
        #[arg(long, requires = "adopt", value_parser = ["agent", "server"])]
        role: Option<String>,
    },
    /// Look the inventory's checksums up again in their published lists on
    /// the next `homelab up` (when upstream replaced a file, e.g. a "latest"
    /// image): drops their pins.
    Repin,
    /// Wipe and reinstall a node on its next PXE boot.
    Reinstall {
        /// The node's name in the inventory.
        node: String,
    },
    /// Give up taking a node out of the cluster (when it is dead or gone for
    /// good): it is marked `forgotten` and no longer retried or reported.
    ///
    /// Only for a node already taken out of the inventory whose removal
    /// cannot finish (`removing` or `remove-failed`). Nothing is done on the
    /// node: if it comes back, k3s may still be on its disk.
    Forget {
        /// The node's name (as `homelab status` shows it).
        node: String,
    },
    /// Open a shell (or run COMMAND) on a node over SSH, trusting only the
    /// host key pinned at install (uses the system's OpenSSH client).
    Ssh {
        /// The node's name in the inventory.
        node: String,
        /// A command to run instead of a shell.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Write the cluster's admin kubeconfig (mode 0600), pointed at a
    /// running k3s server.
    Kubeconfig {
        /// Where to write it.
        #[arg(short, long, default_value = "kubeconfig")]
        output: PathBuf,
    },
    /// The virtual lab: QEMU machines with empty disks that PXE-boot from
    /// homelab inside a network namespace (needs root).
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Run the install agent by hand (it normally runs as /init of the
    /// installer): fetch the plan at PLAN_URL and install onto the disk.
    #[command(hide = true)]
    Agent {
        /// The plan URL, token included, as the installer script gives it.
        plan_url: String,
        /// Install onto this device or file instead of the plan's disk.
        #[arg(long)]
        disk: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create the lab (or resume it), run `homelab up` in it and power the
    /// VMs on; exits when every node runs k3s. The lab stays.
    Up(lab::UpOptions),
    /// Remove the lab: its VMs, disks, namespace and files.
    Down {
        #[command(flatten)]
        lab: lab::LabName,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet_default =
        matches!(cli.command, Command::Up { .. }) && std::io::stdout().is_terminal();
    logging::init(cli.log_format, if quiet_default { "warn" } else { "info" });
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Load and validate the inventory, printing warnings; invalid -> None (errors printed).
fn load_inventory(path: &Path) -> Option<Inventory> {
    match inventory::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("{w}");
            }
            Some(loaded.inventory)
        }
        Err(diags) => {
            eprintln!("{diags}");
            let n = diags
                .0
                .iter()
                .filter(|d| d.severity == inventory::Severity::Error)
                .count();
            eprintln!(
                "{} has {n} error{}; nothing was applied.",
                path.display(),
                if n == 1 { "" } else { "s" }
            );
            None
        }
    }
}

/// `homelab forget`: give up a removal that cannot finish.
fn forget(st: &State, inv: &Inventory, inventory_path: &Path, node: &str) -> Result<String> {
    if inv.nodes.contains_key(node) {
        bail!(
            "`{node}` is still in {}: take its [nodes.{node}] stanza out and run `homelab up`, \
             which takes it out of the cluster; forget is for a removal that cannot finish",
            inventory_path.display()
        );
    }
    let Some(rec) = st.node(node)? else {
        bail!("the controller knows no node named `{node}`; see `homelab status`");
    };
    let message = "forgotten by `homelab forget`: its removal was given up, nothing was done on \
                   the node, and k3s may still be on its disk";
    if st
        .transition(node, NodeEvent::Forgotten, message)?
        .is_none()
    {
        let stage = st.node(node)?.map_or(rec.stage, |r| r.stage);
        if stage.is_gone() {
            bail!("`{node}` is {stage} already: nothing to forget");
        }
        bail!(
            "`{node}` is {stage}, not leaving the cluster: run `homelab up` first, which takes it \
             out of the cluster properly; forget is for a removal that cannot finish"
        );
    }
    Ok(format!(
        "{node} is forgotten: no longer taken out of the cluster or reported. If it still \
         appears in `kubectl get nodes`, delete it there; if the machine comes back, reinstall \
         it or put it back into the inventory."
    ))
}

/// Discovered machines whose MAC is not a node of the inventory, oldest first.
fn unknown_machines(
    found: Vec<state::Discovered>,
    inv: Option<&Inventory>,
) -> Vec<state::Discovered> {
    found
        .into_iter()
        .filter(|d| inv.is_none_or(|i| !i.nodes.values().any(|n| n.mac.to_string() == d.mac)))
        .collect()
}

/// `homelab discover --adopt`: write the machines in as nodes, all or nothing.
fn discover_adopt(
    path: &Path,
    found: &[state::Discovered],
    names: &[String],
    role: Option<&str>,
) -> Result<ExitCode> {
    let Some(inv) = load_inventory(path) else {
        eprintln!("Nothing was written: fix the inventory first.");
        return Ok(ExitCode::from(2));
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let machines: Vec<inventory::MacAddr> = unknown_machines(found.to_vec(), Some(&inv))
        .iter()
        .filter_map(|d| d.mac.parse().ok())
        .collect();
    let role = match role {
        Some("server") => Some(inventory::Role::Server),
        Some(_) => Some(inventory::Role::Agent),
        None => None,
    };
    let (new_text, added) = match inventory::adopt::adopt(&text, path, &inv, &machines, names, role)
    {
        Ok(r) => r,
        Err(why) => {
            eprintln!(
                "error: {why}
Nothing was written to {}.",
                path.display()
            );
            return Ok(ExitCode::from(2));
        }
    };
    replace_file(path, &new_text)?;
    for a in &added {
        println!(
            "+ [nodes.{}] mac = {}, ip = {}, role = {}",
            a.name, a.mac, a.ip, a.role
        );
    }
    println!(
        "Added {} node{} to {}. Check the addresses are free on your network (outside your \
         router's DHCP range), then run `homelab up`.",
        added.len(),
        plural(added.len()),
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Replace a file atomically: a temp file beside it (same mode), synced, renamed.
fn replace_file(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f =
            std::fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&temp, path).with_context(|| format!("replacing {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let invalid = ExitCode::from(2);
    match cli.command {
        Command::Init => {
            if cli.inventory.exists() {
                bail!(
                    "{} already exists; homelab init never overwrites a file",
                    cli.inventory.display()
                );
            }
            let host = inventory::init::detect();
            write_new_file(&cli.inventory, &inventory::init::render(host.as_ref()))?;
            match host {
                Some(h) => println!(
                    "Wrote {} for this machine: {} {} on {}, DHCP in proxy mode. Check it with \
                     `homelab validate`, run `homelab up` and power on the machines; then \
                     `homelab discover --adopt NAME...` adds them.",
                    cli.inventory.display(),
                    h.interface,
                    h.address,
                    h.subnet
                ),
                None => println!(
                    "Wrote {}, but this machine has no IPv4 default route: fill in interface, \
                     address and subnet in [controller] (`homelab validate` names them until then).",
                    cli.inventory.display()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate => {
            let Some(inv) = load_inventory(&cli.inventory) else {
                return Ok(invalid);
            };
            let servers = inv.servers().count();
            println!(
                "{} is valid: {} node{} ({servers} server{}, {} agent{}).",
                cli.inventory.display(),
                inv.nodes.len(),
                plural(inv.nodes.len()),
                plural(servers),
                inv.nodes.len() - servers,
                plural(inv.nodes.len() - servers)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan { json } => {
            let Some(inv) = load_inventory(&cli.inventory) else {
                return Ok(invalid);
            };
            let st = State::open_existing(&cli.state_dir)?;
            let observed = match &st {
                Some(st) => st.nodes()?,
                None => Vec::new(),
            };
            let mut p = plan::plan(&inv, &observed);
            p.checksums = crate::artifacts::pin::status(st.as_ref(), &inv.os)?;
            if let Some(st) = &st {
                p.cluster = plan::plan_cluster(&st.unfinished_sagas()?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                print!("{p}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Up {
            timeout,
            keep_serving,
            plain,
        } => {
            let Some(inv) = load_inventory(&cli.inventory) else {
                return Ok(invalid);
            };
            let live = !plain && std::io::stdout().is_terminal();
            let opts = DaemonOptions {
                state_dir: cli.state_dir.clone(),
                templates_dir: cli.templates.clone(),
            };
            runtime()?.block_on(up(
                &cli.inventory,
                inv,
                opts,
                timeout.map(Duration::from_secs),
                keep_serving,
                live,
            ))
        }
        Command::Serve => {
            let Some(inv) = load_inventory(&cli.inventory) else {
                return Ok(invalid);
            };
            let opts = DaemonOptions {
                state_dir: cli.state_dir.clone(),
                templates_dir: cli.templates.clone(),
            };
            runtime()?.block_on(serve(&cli.inventory, inv, opts))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let nodes = match State::open_existing(&cli.state_dir)? {
                Some(st) => st.nodes()?,
                None => Vec::new(),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                print!("{}", ui::status_table(&nodes));
                if let Some(pid) = DaemonLock::holder(&cli.state_dir) {
                    println!("\nDaemon running (pid {pid}).");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Events {
            follow,
            node,
            lines,
            json,
        } => {
            let Some(st) = State::open_existing(&cli.state_dir)? else {
                println!(
                    "No events yet: {} has no state database.",
                    cli.state_dir.display()
                );
                return Ok(ExitCode::SUCCESS);
            };
            let print = |e: &state::Event| {
                if json {
                    println!("{}", serde_json::to_string(e).unwrap_or_default());
                } else {
                    println!("{}", ui::event_line(e));
                }
            };
            let mut last = 0;
            for e in st.last_events(lines, node.as_deref())? {
                last = e.id;
                print(&e);
            }
            if follow {
                last = last.max(st.last_event_id()?);
                loop {
                    for e in st.events_after(last, node.as_deref(), 1000)? {
                        last = e.id;
                        print(&e);
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Discover { json, adopt, role } => {
            let st = State::open_existing(&cli.state_dir)?;
            let found = match &st {
                Some(st) => st.discovered()?,
                None => Vec::new(),
            };
            if !adopt.is_empty() {
                return discover_adopt(&cli.inventory, &found, &adopt, role.as_deref());
            }
            // Known MACs may have been added to the inventory since they were seen.
            let inv = inventory::load(&cli.inventory).ok().map(|l| l.inventory);
            let found = unknown_machines(found, inv.as_ref());
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                print!("{}", ui::discover_table(&found, inv.as_ref()));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Repin => {
            let Some(inv) = load_inventory(&cli.inventory) else {
                return Ok(invalid);
            };
            let listed = crate::artifacts::pin::listed(&inv.os);
            if listed.is_empty() {
                println!(
                    "No checksum in {} comes from a list: nothing to repin.",
                    cli.inventory.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let st = State::open_existing(&cli.state_dir)?;
            for (artifact, source, list) in listed {
                let file = crate::artifacts::pin::file_name(source);
                let dropped = match &st {
                    Some(st) => st.unpin_checksum(list, &file)?,
                    None => false,
                };
                if dropped {
                    if let Some(st) = &st {
                        st.append_event(
                            None,
                            "artifact.unpinned",
                            &format!("pin of {file} from {list} dropped: looked up again on the next `homelab up`"),
                            serde_json::json!({ "artifact": artifact, "list": list, "file": file }),
                        )?;
                    }
                    println!(
                        "{file}: pin dropped; looked up again in {list} on the next `homelab up`."
                    );
                } else {
                    println!("{file}: not pinned; looked up in {list} on the next `homelab up`.");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reinstall { node } => {
            let st = State::open(&cli.state_dir)?;
            if !st.set_reinstall(&node, true)? {
                bail!(
                    "no node named `{node}` in {}; see `homelab status`",
                    cli.state_dir.display()
                );
            }
            st.append_event(
                Some(&node),
                "node.reinstall-requested",
                "reinstall requested: the disk is wiped on the next PXE boot",
                serde_json::Value::Null,
            )?;
            println!("{node} will be wiped and reinstalled on its next PXE boot.");
            Ok(ExitCode::SUCCESS)
        }
        Command::Forget { node } => {
            let Some(inv) = load_inventory(&cli.inventory) else {
                return Ok(invalid);
            };
            let st = State::open(&cli.state_dir)?;
            println!("{}", forget(&st, &inv, &cli.inventory, &node)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent { plan_url, disk } => {
            crate::agent::run(&crate::agent::AgentConfig {
                plan_url,
                disk_override: disk,
                sys_block: "/sys/block".into(),
            })?;
            println!("installed");
            Ok(ExitCode::SUCCESS)
        }
        Command::Ssh { node, command } => {
            use std::os::unix::process::CommandExt;
            let mut cmd = crate::ssh::openssh::command_for(&cli.state_dir, &node, &command)?;
            let err = cmd.exec();
            Err(anyhow::Error::new(err).context("running ssh (package openssh-client)"))
        }
        Command::Kubeconfig { output } => {
            let Some(inv) = load_inventory(&cli.inventory) else {
                return Ok(invalid);
            };
            let st = State::open_existing(&cli.state_dir)?.with_context(|| {
                format!(
                    "no controller state in {}; run `homelab up` first",
                    cli.state_dir.display()
                )
            })?;
            let server = runtime()?.block_on(crate::k3s::kubeconfig::write(&st, &inv, &output))?;
            println!(
                "Wrote {} (from {server}); use it with KUBECONFIG={} kubectl get nodes",
                output.display(),
                output.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab { command } => match command {
            LabCommand::Up(opts) => lab::up(&opts),
            LabCommand::Down { lab } => {
                lab::down(&lab.lab_dir, &lab.name).map(|()| ExitCode::SUCCESS)
            }
        },
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "homelab",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn write_new_file(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

async fn up(
    path: &Path,
    inv: Inventory,
    opts: DaemonOptions,
    timeout: Option<Duration>,
    keep_serving: bool,
    live: bool,
) -> Result<ExitCode> {
    state::ensure_dir(&opts.state_dir)?;
    // A daemon already owns the ports: hand it the inventory and watch.
    if DaemonLock::holder(&opts.state_dir).is_some() {
        let source = std::fs::read_to_string(path)?;
        let abs = std::fs::canonicalize(path)?;
        let answer = daemon::control_request(
            &opts.state_dir,
            &ControlRequest::Apply { path: abs, source },
        )?;
        for w in &answer.warnings {
            eprintln!("warning: {w}");
        }
        if !answer.ok {
            bail!(
                "the running daemon refused the inventory:\n{}",
                answer.error.unwrap_or_default()
            );
        }
        if let Some(p) = &answer.plan {
            print!("{p}");
        }
        println!("Handed the inventory to the running daemon.");
        let st = State::open(&opts.state_dir)?;
        let follow = FollowOptions {
            live,
            timeout,
            after_event: st.last_event_id()?,
        };
        let outcome = ui::follow(&st, &inv, follow, ctrl_c()).await?;
        return Ok(report(outcome));
    }

    let existing = State::open_existing(&opts.state_dir)?;
    // Nothing to do: say so without starting a service (no ports taken, no
    // image verified), and leave the state untouched.
    if let Some(st) = existing.as_ref().filter(|_| !keep_serving) {
        let observed = st.nodes()?;
        let mut p = plan::plan(&inv, &observed);
        p.cluster = plan::plan_cluster(&st.unfinished_sagas()?);
        if plan::converged(&inv, &p, &observed) {
            print!("{p}");
            println!("Nothing to do: every node is as {} asks.", path.display());
            return Ok(ExitCode::SUCCESS);
        }
    }
    let after_event = match &existing {
        Some(st) => st.last_event_id()?,
        None => 0,
    };
    drop(existing);
    let (mut daemon, plan) = Daemon::start(&opts, inv.clone()).await?;
    print!("{plan}");
    println!(
        "Serving on {} (HTTP {}). Waiting for the nodes; Ctrl-C to stop.",
        inv.controller.interface,
        daemon.http_addr()
    );
    let state = daemon.shared().state.clone();
    let follow = FollowOptions {
        live,
        timeout,
        after_event,
    };
    let outcome = {
        let watch = ui::follow(&state, &inv, follow, ctrl_c());
        tokio::select! {
            o = watch => o?,
            r = daemon.run_until(std::future::pending()) => { r?; Outcome::Interrupted }
        }
    };
    let code = report(outcome.clone());
    if keep_serving && outcome != Outcome::Interrupted {
        println!("Still serving; Ctrl-C to stop.");
        daemon.run_until(ctrl_c()).await?;
    }
    daemon.shutdown().await;
    Ok(code)
}

fn report(outcome: Outcome) -> ExitCode {
    match outcome {
        Outcome::Converged => {
            println!("All nodes are up.");
            ExitCode::SUCCESS
        }
        Outcome::Failed(failed) => {
            for (name, cause) in failed {
                // A node's name is one word; cluster work is named with its kind.
                let see = if name.contains(' ') {
                    "homelab events".to_string()
                } else {
                    format!("homelab events --node {name}")
                };
                eprintln!("{name} failed: {cause} (see `{see}`)");
            }
            ExitCode::from(1)
        }
        Outcome::TimedOut => {
            eprintln!("Timed out before every node was done; see `homelab status`.");
            ExitCode::from(1)
        }
        Outcome::Interrupted => {
            eprintln!("Interrupted; run `homelab up` again to resume.");
            ExitCode::from(130)
        }
    }
}

async fn serve(path: &Path, inv: Inventory, opts: DaemonOptions) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut daemon, plan) = Daemon::start(&opts, inv).await?;
    tracing::info!(http = %daemon.http_addr(), "daemon started; {} change(s) applied", plan.changes().count());
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    loop {
        let reload = async {
            hup.recv().await;
        };
        let stop = async {
            tokio::select! { _ = term.recv() => {}, _ = ctrl_c() => {} }
        };
        let mut reloaded = false;
        daemon
            .run_until(async {
                tokio::select! { _ = reload => reloaded = true, _ = stop => {} }
            })
            .await?;
        if !reloaded {
            break;
        }
        reload_from_file(&daemon, path);
    }
    daemon.shutdown().await;
    Ok(())
}

fn reload_from_file(daemon: &Daemon, path: &Path) {
    let result = std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))
        .and_then(|source| {
            let answer = daemon::apply_source(daemon.shared(), path, &source);
            if answer.ok {
                Ok(answer)
            } else {
                bail!("{}", answer.error.unwrap_or_default())
            }
        });
    match result {
        Ok(_) => tracing::info!("inventory reloaded from {}", path.display()),
        Err(e) => {
            tracing::error!("inventory not reloaded, the previous one stays in force:\n{e:#}")
        }
    }
}
