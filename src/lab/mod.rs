//! The virtual lab: homelab against QEMU machines instead of hardware.
//!
//! `homelab lab up` makes a network namespace with a bridge, one tap and one
//! empty disk per VM, writes an inventory for them, runs `homelab up` inside
//! the namespace (the same controller and progress view as on real
//! hardware), and powers the VMs on once the controller listens. They
//! PXE-boot, install the OS image, come up reachable over SSH and join k3s. The lab
//! stays until `homelab lab down`; running `lab up` again re-applies the
//! (possibly edited) inventory and powers on VMs that are off, like a re-run
//! against real machines.
//!
//! Files live in `<lab dir>/<name>/`: `lab.json` (the [`spec::LabSpec`]),
//! `inventory.toml`, the controller's `state/`, and `vms/<node>/` with the
//! disk, serial console and QEMU pid file.

pub mod host;
pub mod spec;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::state::{DaemonLock, State};
use crate::templates::Templates;
use spec::{Firmware, FirmwareChoice, LabSpec};
use vm::VmFiles;

/// Where labs live unless `--lab-dir` says otherwise.
pub const DEFAULT_ROOT: &str = "/var/lib/homelab-labs";

/// How long the controller may take to start listening.
const CONTROLLER_START: Duration = Duration::from_secs(60);

/// The k3s version the lab's inventory names.
const K3S_VERSION: &str = "v1.31.4+k3s1";

/// Which lab: `--name` and `--lab-dir`.
#[derive(Debug, Clone, clap::Args)]
pub struct LabName {
    /// The lab's name (labs are independent; each has its own namespace).
    #[arg(long, default_value = "lab")]
    pub name: String,
    /// Where labs keep their disks, inventory and controller state.
    #[arg(long, default_value = DEFAULT_ROOT, env = "HOMELAB_LAB_DIR")]
    pub lab_dir: PathBuf,
}

/// `homelab lab up`'s options. `None` means "as the existing lab has it"
/// (or the default for a new lab).
#[derive(Debug, Clone, clap::Args)]
pub struct UpOptions {
    #[command(flatten)]
    pub lab: LabName,
    /// How many VMs (node1 is the k3s server).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=spec::MAX_NODES as i64))]
    pub nodes: Option<u8>,
    /// The VMs' firmware; mixed alternates BIOS and UEFI.
    #[arg(long, value_enum)]
    pub firmware: Option<FirmwareChoice>,
    /// The OS image to install (a new lab needs it; scripts/lab.sh builds one).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// The Debian linux-image .deb the installer's kernel comes from.
    #[arg(long)]
    pub installer_kernel: Option<PathBuf>,
    /// A directory holding the k3s release (k3s, its air-gap images,
    /// sha256sum-amd64.txt); without it the controller downloads the release
    /// named in the inventory. A new lab only.
    #[arg(long)]
    pub k3s_mirror: Option<PathBuf>,
    /// Passed to `homelab up`: give up waiting after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Print plain lines even on a terminal.
    #[arg(long)]
    pub plain: bool,
}

/// A lab's directory.
pub fn lab_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

pub fn state_dir(dir: &Path) -> PathBuf {
    dir.join("state")
}

pub fn inventory_path(dir: &Path) -> PathBuf {
    dir.join("inventory.toml")
}

fn spec_path(dir: &Path) -> PathBuf {
    dir.join("lab.json")
}

/// The lab saved in `dir`, if there is one.
pub fn load(dir: &Path) -> Result<Option<LabSpec>> {
    match std::fs::read_to_string(spec_path(dir)) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{} is not a lab description", spec_path(dir).display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", spec_path(dir).display())),
    }
}

/// Creates or resumes the lab, runs the controller in it until every node is
/// done, and returns `homelab up`'s exit code.
pub fn up(opts: &UpOptions) -> Result<ExitCode> {
    spec::check_name(&opts.lab.name).map_err(|e| anyhow!(e))?;
    check_host()?;
    let dir = lab_dir(&opts.lab.lab_dir, &opts.lab.name);
    let spec = match load(&dir)? {
        Some(existing) => resume(existing, opts)?,
        None => create(&dir, opts)?,
    };
    let ovmf = needs_ovmf(&spec)?;
    host::ensure_network(&spec)?;
    if let Some(warning) = host::ensure_router_advertiser(&spec, &dir.join("ra.pid"))? {
        eprintln!("warning: {warning}");
    }
    for node in &spec.nodes {
        vm::prepare(
            node,
            &VmFiles::new(&dir, &node.name),
            spec.disk_gib,
            ovmf.as_ref().map(|(_, v)| v.as_path()),
        )?;
    }

    println!(
        "Lab `{}`: {} in network namespace {} (controller {}).",
        spec.name,
        spec.describe(),
        spec.netns,
        spec.controller
    );
    let mut controller = start_controller(&spec, &dir, opts)?;
    let started = Instant::now();
    let ovmf_code = ovmf.as_ref().map(|(c, _)| c.as_path());
    // When the controller had nothing to do it says so and exits without
    // listening; VMs that are off (the host restarted) are still powered on
    // and boot their installed disks.
    let powered = wait_listening(&dir, &mut controller)
        .and_then(|listening| power_on(&spec, &dir, ovmf_code).map(|()| listening));
    let listening = match powered {
        Ok(l) => l,
        Err(e) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(controller.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = controller.wait();
            return Err(e);
        }
    };
    let status = controller.wait().context("waiting for the controller")?;
    let code = status.code().unwrap_or(1);
    if code == 0 && listening {
        println!(
            "The lab converged {:.0} s after power-on.",
            started.elapsed().as_secs_f64()
        );
    }
    print_access(&spec, &dir);
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// Removes the lab: its VMs, anything else running in its namespace, the
/// namespace, and its directory (disks included).
pub fn down(root: &Path, name: &str) -> Result<()> {
    spec::check_name(name).map_err(|e| anyhow!(e))?;
    require_root()?;
    let dir = lab_dir(root, name);
    let spec = load(&dir)?;
    let netns = spec
        .as_ref()
        .map(|s| s.netns.clone())
        .unwrap_or_else(|| format!("homelab-{name}"));
    if spec.is_none() && !host::netns_exists(&netns) && !dir.exists() {
        println!("There is no lab named `{name}` under {}.", root.display());
        return Ok(());
    }
    if let Some(spec) = &spec {
        for node in &spec.nodes {
            if let Some(pid) = vm::running_pid(&VmFiles::new(&dir, &node.name), spec, node) {
                stop_process(pid, Duration::from_secs(5));
            }
        }
    }
    for pid in host::netns_pids(&netns) {
        stop_process(pid, Duration::from_secs(5));
    }
    host::remove_network(&netns)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    println!(
        "Removed lab `{name}` (namespace {netns}, {}).",
        dir.display()
    );
    Ok(())
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab needs root (network namespaces, tap devices): run it with sudo");
    }
    Ok(())
}

/// The programs the lab runs, with the packages that provide them
/// (scripts/deps.sh installs each and checks it afterwards).
pub const PROGRAMS: [(&str, &str); 3] = [
    ("ip", "iproute2"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-img", "qemu-utils"),
];

/// Root, and the programs the lab runs.
fn check_host() -> Result<()> {
    require_root()?;
    let missing: Vec<&str> = PROGRAMS
        .into_iter()
        .filter(|(program, _)| !host::on_path(program))
        .map(|(_, package)| package)
        .collect();
    if !missing.is_empty() {
        bail!(
            "the lab needs these packages: {} (sudo apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    Ok(())
}

/// A new lab: its spec and inventory, written before anything else exists.
fn create(dir: &Path, opts: &UpOptions) -> Result<LabSpec> {
    let need = |v: &Option<PathBuf>, flag: &str| {
        v.clone().ok_or_else(|| {
            anyhow!("a new lab needs {flag} FILE (scripts/lab.sh builds and passes it)")
        })
    };
    let image = absolute(&need(&opts.image, "--image")?)?;
    let kernel = absolute(&need(&opts.installer_kernel, "--installer-kernel")?)?;
    let mut spec = spec::plan(
        &opts.lab.name,
        opts.nodes.unwrap_or(2),
        opts.firmware.unwrap_or(FirmwareChoice::Mixed),
        image,
        kernel,
    )
    .map_err(|e| anyhow!(e))?;
    spec.k3s_mirror = opts.k3s_mirror.as_deref().map(absolute).transpose()?;
    let inventory = render_inventory(&spec)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(inventory_path(dir), inventory)?;
    std::fs::write(spec_path(dir), serde_json::to_string_pretty(&spec)?)?;
    Ok(spec)
}

/// An existing lab: the options may not change what it is made of.
fn resume(existing: LabSpec, opts: &UpOptions) -> Result<LabSpec> {
    let mut differs = Vec::new();
    if opts
        .nodes
        .is_some_and(|n| n as usize != existing.nodes.len())
    {
        differs.push(format!("it has {} nodes", existing.nodes.len()));
    }
    if let Some(fw) = opts.firmware {
        let wanted = spec::plan(
            &existing.name,
            existing.nodes.len() as u8,
            fw,
            "".into(),
            "".into(),
        )
        .map_err(|e| anyhow!(e))?;
        let same = wanted
            .nodes
            .iter()
            .zip(&existing.nodes)
            .all(|(a, b)| a.firmware == b.firmware);
        if !same {
            differs.push("its VMs have other firmware".into());
        }
    }
    if !differs.is_empty() {
        bail!(
            "lab `{}` already exists and {}: run `homelab lab down --name {}` first, or drop those options to resume it",
            existing.name,
            differs.join(" and "),
            existing.name
        );
    }
    Ok(existing)
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{}: no such file", path.display()))
}

/// Pure but for hashing the two files the inventory pins.
fn render_inventory(spec: &LabSpec) -> Result<String> {
    let hash = |p: &Path| {
        crate::artifacts::sha256_file(p).with_context(|| format!("reading {}", p.display()))
    };
    let templates = Templates::new(None)?;
    templates.render(
        "lab/inventory.toml.j2",
        minijinja::context! {
            name => &spec.name,
            netns => &spec.netns,
            bridge => spec::BRIDGE,
            controller => spec.controller.to_string(),
            subnet => spec.subnet(),
            pool => spec.pool(),
            http_port => spec::HTTP_PORT,
            k3s_version => K3S_VERSION,
            image => spec.image.display().to_string(),
            image_sha256 => hash(&spec.image)?,
            installer_kernel => spec.installer_kernel.display().to_string(),
            installer_kernel_sha256 => hash(&spec.installer_kernel)?,
            mirror => spec.k3s_mirror.as_ref().map(|m| m.display().to_string()),
            nodes => minijinja::value::Serde(&spec.nodes),
        },
    )
}

/// OVMF's (code, vars) when some VM runs UEFI; SeaBIOS checked when some runs BIOS.
fn needs_ovmf(spec: &LabSpec) -> Result<Option<(PathBuf, PathBuf)>> {
    let has = |fw| spec.nodes.iter().any(|n| n.firmware == fw);
    if has(Firmware::Bios) {
        vm::check_seabios().map_err(|p| anyhow!("BIOS VMs need {p}"))?;
    }
    if has(Firmware::Uefi) {
        return vm::ovmf_files()
            .map(Some)
            .map_err(|p| anyhow!("UEFI VMs need {p}"));
    }
    Ok(None)
}

/// `homelab up` on the lab's inventory, inside the namespace, on this terminal.
fn start_controller(spec: &LabSpec, dir: &Path, opts: &UpOptions) -> Result<std::process::Child> {
    let exe = std::env::current_exe().context("finding the homelab binary")?;
    let mut cmd = host::in_netns(&spec.netns, &exe.to_string_lossy());
    cmd.arg("--inventory")
        .arg(inventory_path(dir))
        .arg("--state-dir")
        .arg(state_dir(dir))
        .arg("up");
    if let Some(t) = opts.timeout {
        cmd.args(["--timeout", &t.to_string()]);
    }
    if opts.plain {
        cmd.arg("--plain");
    }
    cmd.spawn().context("starting the controller in the lab")
}

/// Waits until a controller holds the lab's state dir (it then listens):
/// true. False when it exited successfully without listening: the lab
/// already was as its inventory asks.
fn wait_listening(dir: &Path, controller: &mut std::process::Child) -> Result<bool> {
    let deadline = Instant::now() + CONTROLLER_START;
    loop {
        if DaemonLock::holder(&state_dir(dir)).is_some() {
            return Ok(true);
        }
        if let Some(status) = controller.try_wait()? {
            if status.success() {
                return Ok(false);
            }
            bail!("the controller exited before it listened ({status}); see its messages above");
        }
        if Instant::now() > deadline {
            bail!("the controller did not start listening within {CONTROLLER_START:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Powers on every VM that is not running.
fn power_on(spec: &LabSpec, dir: &Path, ovmf_code: Option<&Path>) -> Result<()> {
    for node in &spec.nodes {
        let files = VmFiles::new(dir, &node.name);
        if vm::running_pid(&files, spec, node).is_none() {
            vm::start(spec, node, &files, ovmf_code)?;
        }
    }
    Ok(())
}

/// SIGTERM, then SIGKILL after `grace`.
fn stop_process(pid: i32, grace: Duration) {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(pid);
    if kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if kill(pid, None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = kill(pid, Signal::SIGKILL);
}

/// Where the nodes stand and how to reach them, re-run and remove the lab.
fn print_access(spec: &LabSpec, dir: &Path) {
    let state_dir = state_dir(dir);
    let Ok(Some(st)) = State::open_existing(&state_dir) else {
        return;
    };
    for n in &spec.nodes {
        let stage = st
            .node(&n.name)
            .ok()
            .flatten()
            .map(|r| r.stage.to_string())
            .unwrap_or_default();
        println!(
            "  {:<8} {:<12} {:<5} {stage}",
            n.name,
            n.ip.to_string(),
            n.firmware.to_string()
        );
    }
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "homelab".into());
    let first = spec
        .nodes
        .first()
        .map(|n| n.name.as_str())
        .unwrap_or("node1");
    println!(
        "Log in:    ip netns exec {} {exe} --state-dir {} ssh {first}",
        spec.netns,
        state_dir.display()
    );
    println!("Consoles:  {}/vms/<node>/serial.log", dir.display());
    println!(
        "Re-run:    homelab lab up --name {} (after editing {})",
        spec.name,
        inventory_path(dir).display()
    );
    println!("Remove:    homelab lab down --name {}", spec.name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_inventory_is_valid_and_names_every_vm() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("lab.raw.zst");
        let deb = dir.path().join("linux-image.deb");
        std::fs::write(&image, b"image").unwrap();
        std::fs::write(&deb, b"deb").unwrap();
        let mut spec = spec::plan("t", 3, FirmwareChoice::Mixed, image, deb).unwrap();
        spec.k3s_mirror = Some(dir.path().to_path_buf());
        let text = render_inventory(&spec).unwrap();
        let path = dir.path().join("inventory.toml");
        std::fs::write(&path, &text).unwrap();
        let inv = crate::inventory::load(&path)
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
            .inventory;
        assert_eq!(inv.nodes.len(), 3);
        assert_eq!(inv.controller.interface, spec::BRIDGE);
        assert_eq!(inv.nodes["node2"].ip, spec.nodes[1].ip);
        assert_eq!(inv.controller.mirror.as_deref(), Some(dir.path()));
        assert!(text.contains(&crate::artifacts::sha256_file(&spec.image).unwrap()));
    }

    #[test]
    fn resuming_refuses_a_different_shape() {
        let spec = spec::plan("t", 2, FirmwareChoice::Mixed, "/i".into(), "/k".into()).unwrap();
        let opts = |nodes, firmware| UpOptions {
            lab: LabName {
                name: "t".into(),
                lab_dir: "/labs".into(),
            },
            nodes,
            firmware,
            image: None,
            installer_kernel: None,
            k3s_mirror: None,
            timeout: None,
            plain: true,
        };
        assert!(resume(spec.clone(), &opts(None, None)).is_ok());
        assert!(resume(spec.clone(), &opts(Some(2), Some(FirmwareChoice::Mixed))).is_ok());
        let e = resume(spec.clone(), &opts(Some(3), None))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("it has 2 nodes") && e.contains("lab down"),
            "{e}"
        );
        let e = resume(spec, &opts(None, Some(FirmwareChoice::Uefi)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("other firmware"), "{e}");
    }
}
