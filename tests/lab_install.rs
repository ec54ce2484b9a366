//! The virtual lab end to end, driven only by `homelab lab up` (which runs
//! `homelab up` on the inventory it generates, or on the user's edit of it):
//! three QEMU machines (TCG), under SeaBIOS, OVMF and SeaBIOS, with empty
//! qcow2 disks PXE-boot, run the installer, write the lab's Debian image,
//! reboot into it, phone home with the pinned host key, are logged in to by
//! the controller (stage `ready`), and get k3s: node1 bootstraps the cluster
//! as its server and node2 and node3 join it as agents (stage `running`).
//! k3s is the stand-in under tests/k3s-standin, shipped as a release mirror;
//! it refuses a config real k3s would refuse and a join with the wrong token.
//!
//! On the way the controller is killed with SIGKILL while an image is being
//! written; `homelab lab up` is run again and the install completes (the
//! agent resumes with a range request). Run again with nothing to do, it
//! says so, prints no error and succeeds. Then the inventory is edited as a
//! user would:
//! - node2 and node3 are taken out: they are cordoned, drained and deleted
//!   from the cluster and k3s is uninstalled from them, their OS kept;
//! - they are put back as servers (three servers: HA), node1 gets another
//!   label and node2 a taint, while node3 cannot be reached: node3 fails
//!   with its cause and the others finish; once it can be reached again, a
//!   re-run makes it the third server;
//! - node3 gets a power setting, which k3s does not see: it is configured
//!   again but its k3s is not restarted.
//!
//! Last, an installed node is powered off, PXE-booted again, and must boot
//! its own disk: the disk's contents are the same byte for byte.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Firmware, Need};
use homelab::lab::{self, host, spec::LabSpec, vm::VmFiles};
use homelab::state::{DaemonLock, NodeRecord, Stage, State};

/// A generous bound for one `lab up` run (three installs, TCG on 2 cores).
const LAB_TIMEOUT: Duration = Duration::from_secs(1500);
/// A bound for a `lab up` run that only changes the cluster.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(600);

/// The lab under test: a unique name in a temporary directory; `lab down`
/// on every exit path.
struct TestLab {
    name: String,
    root: tempfile::TempDir,
}

impl TestLab {
    fn new() -> TestLab {
        TestLab {
            name: format!("t{}", std::process::id() % 100_000),
            root: tempfile::Builder::new()
                .prefix("homelab-lab.")
                .tempdir()
                .unwrap(),
        }
    }

    fn dir(&self) -> PathBuf {
        lab::lab_dir(self.root.path(), &self.name)
    }

    fn spec(&self) -> LabSpec {
        lab::load(&self.dir()).unwrap().expect("lab.json")
    }

    fn state(&self) -> State {
        State::open_existing(&lab::state_dir(&self.dir()))
            .unwrap()
            .expect("the lab's state")
    }

    fn record(&self, node: &str) -> Option<NodeRecord> {
        State::open_existing(&lab::state_dir(&self.dir()))
            .ok()
            .flatten()?
            .node(node)
            .ok()
            .flatten()
    }

    fn homelab(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_homelab"));
        c.args(args)
            .arg("--name")
            .arg(&self.name)
            .arg("--lab-dir")
            .arg(self.root.path());
        c
    }

    /// `homelab lab up` in the background, its output in `log`.
    fn up(&self, extra: &[&str], log: &Path) -> Child {
        let out = std::fs::File::create(log).unwrap();
        self.homelab(&["lab", "up", "--plain", "--timeout", "1400"])
            .args(extra)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap()
    }

    /// Runs `lab up` to its end (bounded); its exit status and output.
    fn up_to_end(
        &self,
        log_name: &str,
        limit: Duration,
    ) -> (Option<std::process::ExitStatus>, String) {
        let log = self.root.path().join(log_name);
        let mut up = self.up(&[], &log);
        let status = wait_child(&mut up, limit);
        (status, common::read_lossy(&log))
    }

    /// Runs `lab up` to its end and asserts it converged; its output.
    fn converge(&self, log_name: &str, what: &str) -> String {
        let (status, out) = self.up_to_end(log_name, CLUSTER_TIMEOUT);
        assert!(
            status.is_some_and(|s| s.success()),
            "{what} did not converge ({status:?})\n{out}\n{}",
            self.diagnostics(&self.root.path().join(log_name))
        );
        out
    }

    /// On `node`: k3s's `unit` is active and its config 0600; what the
    /// stand-in recorded when it started (mode and config, without the token).
    fn k3s_started(&self, node: &str, unit: &str) -> serde_json::Value {
        let out = self
            .ssh(
                node,
                &format!(
                    "systemctl is-active {unit}; stat -c %a /etc/rancher/k3s/config.yaml; \
                     cat /var/lib/rancher/k3s/standin/started"
                ),
            )
            .unwrap_or_else(|e| panic!("ssh {node}: {e}"));
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("active"), "{node}: {out}");
        assert_eq!(lines.next(), Some("600"), "{node}: {out}");
        serde_json::from_str(lines.next().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{node}: {e}: {out}"))
    }

    /// Rewrites the lab's inventory as a user editing it would.
    fn edit_inventory(&self, edit: impl FnOnce(String) -> String) {
        let path = lab::inventory_path(&self.dir());
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, edit(text)).unwrap();
    }

    /// The node as the cluster (node1's API) sees it: labels and taints.
    fn cluster_node(&self, node: &str) -> serde_json::Value {
        let out = self
            .ssh("node1", &format!("k3s kubectl get node {node} -o json"))
            .unwrap_or_else(|e| panic!("kubectl get node {node}: {e}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    fn members(&self) -> String {
        self.ssh("node1", "k3s kubectl get nodes -o name")
            .unwrap()
            .trim()
            .to_string()
    }

    fn events(&self, node: &str) -> String {
        self.state()
            .last_events(60, Some(node))
            .unwrap_or_default()
            .iter()
            .map(|e| format!("{} {}: {}", e.ts_ms, e.kind, e.message))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn diagnostics(&self, log: &Path) -> String {
        let mut s = format!(
            "--- lab up:\n{}",
            common::tail(&common::read_lossy(log), 40)
        );
        for n in self.spec().nodes {
            let serial = VmFiles::new(&self.dir(), &n.name).serial();
            s.push_str(&format!(
                "\n--- {} events:\n{}\n--- {} serial:\n{}",
                n.name,
                self.events(&n.name),
                n.name,
                common::tail(&common::read_lossy(&serial), 25)
            ));
        }
        s
    }

    /// `homelab ssh NODE -- COMMAND` inside the lab's namespace: OpenSSH
    /// with the controller's key, trusting only the pinned host key.
    fn ssh(&self, node: &str, command: &str) -> Result<String, String> {
        let out = host::in_netns(&self.spec().netns, env!("CARGO_BIN_EXE_homelab"))
            .arg("--state-dir")
            .arg(lab::state_dir(&self.dir()))
            .args(["ssh", node, "--"])
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = self
            .homelab(&["lab", "down"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Waits (bounded) for `child` to exit; kills it on timeout.
fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Waits (bounded) until the VM's QEMU has exited.
fn wait_powered_off(
    files: &VmFiles,
    spec: &LabSpec,
    node: &homelab::lab::spec::LabNode,
    limit: Duration,
) {
    common::wait_until(
        &format!("{} to power off", node.name),
        limit,
        Duration::from_millis(200),
        || {
            Ok(lab::vm::running_pid(files, spec, node)
                .is_none()
                .then_some(()))
        },
    )
    .unwrap();
}

/// sha256 of what the guest sees on a qcow2 disk (converted to raw).
fn disk_sha256(disk: &Path) -> String {
    let raw = disk.with_extension("raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(disk)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert {}", disk.display());
    let sum = common::sha256_file(&raw);
    std::fs::remove_file(&raw).unwrap();
    sum
}

#[test]
fn three_machines_install_run_k3s_leave_the_cluster_and_come_back_as_ha_servers() {
    if !common::lab_ready(
        "three_machines_install_run_k3s_leave_the_cluster_and_come_back_as_ha_servers",
        &[
            Need::Firmware(Firmware::Bios),
            Need::Firmware(Firmware::Uefi),
            Need::Tool("ssh"),
            Need::Tool("qemu-img"),
        ],
    ) {
        return;
    }
    let assets = common::assets().expect("lab assets");
    let image = common::lab_image().expect("lab image");
    let k3s_mirror = common::field(
        &common::keyed_script("k3s-standin.sh").expect("k3s stand-in mirror"),
        "k3s-standin.sh",
        "mirror",
    )
    .unwrap();
    let lab = TestLab::new();
    let (victim, started) =
        install_with_the_controller_killed_mid_image(&lab, &image, &assets, &k3s_mirror);
    resume_and_converge(&lab, &victim, started);
    rerun_with_nothing_to_do(&lab);
    nodes_are_reachable_and_run_k3s(&lab);
    let inventory_before = leave_the_cluster(&lab);
    come_back_as_ha_servers(&lab, &inventory_before);
    an_installed_disk_survives_a_pxe_boot(&lab);
    lab_down_removes_everything(&lab);
}

/// Phase of the lab test: 1. A new lab; the controller is killed while an image is being written.
fn install_with_the_controller_killed_mid_image(
    lab: &TestLab,
    image: &common::LabImage,
    assets: &common::Assets,
    k3s_mirror: &str,
) -> (String, Instant) {
    let log1 = lab.root.path().join("up-1.log");
    // 1. A new lab; the controller is killed while an image is being written.
    let started = Instant::now();
    let mut up = lab.up(
        &[
            "--nodes",
            "3",
            "--firmware",
            "mixed",
            "--image",
            &image.path.to_string_lossy(),
            "--installer-kernel",
            &assets.deb.to_string_lossy(),
            "--k3s-mirror",
            k3s_mirror,
        ],
        &log1,
    );
    let state_dir = lab::state_dir(&lab.dir());
    let deadline = Instant::now() + LAB_TIMEOUT;
    let (victim, killed_at) = loop {
        if let Some(status) = up.try_wait().unwrap() {
            panic!(
                "lab up ended ({status}) before any image was being written\n{}",
                lab.diagnostics(&log1)
            );
        }
        let writing = ["node1", "node2", "node3"].into_iter().find_map(|n| {
            let r = lab.record(n)?;
            (r.stage == Stage::Installing
                && r.bytes_total > 0
                && r.bytes_done * 4 >= r.bytes_total
                && r.bytes_done < r.bytes_total)
                .then_some((n, r.bytes_done))
        });
        if let (Some((node, done)), Some(pid)) = (writing, DaemonLock::holder(&state_dir)) {
            let pid: i32 = pid.trim().parse().unwrap();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            break (node, done);
        }
        assert!(
            Instant::now() < deadline,
            "no image write started\n{}",
            lab.diagnostics(&log1)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "killed the controller {:.0} s after lab up while {victim} had {killed_at} bytes of its image",
        started.elapsed().as_secs_f64()
    );
    let status = wait_child(&mut up, Duration::from_secs(60)).expect("lab up did not end");
    assert!(
        !status.success(),
        "lab up succeeded although its controller was killed"
    );

    (victim.to_string(), started)
}

/// Phase of the lab test: 2. Run it again: the same lab resumes and every node ends ready.
fn resume_and_converge(lab: &TestLab, victim: &str, started: Instant) {
    let spec = lab.spec();
    let state_dir = lab::state_dir(&lab.dir());
    let _ = (&spec, &state_dir);
    // 2. Run it again: the same lab resumes and every node ends ready.
    let log2 = lab.root.path().join("up-2.log");
    let mut up = lab.up(&[], &log2);
    let status = wait_child(&mut up, LAB_TIMEOUT);
    assert!(
        status.is_some_and(|s| s.success()),
        "the re-run did not converge ({status:?})\n{}",
        lab.diagnostics(&log2)
    );
    eprintln!(
        "lab converged {:.0} s after the first lab up",
        started.elapsed().as_secs_f64()
    );
    let spec = lab.spec();
    for n in &spec.nodes {
        let r = lab.record(&n.name).unwrap();
        assert_eq!(r.stage, Stage::Running, "{}: {}", n.name, r.detail);
        let ready = lab
            .state()
            .last_events(500, Some(&n.name))
            .unwrap()
            .into_iter()
            .find(|e| e.kind == "stage.ready")
            .unwrap_or_else(|| panic!("{} never became ready", n.name));
        assert!(
            ready.message.contains("pinned host key"),
            "{}",
            ready.message
        );
    }
    let resumed = lab
        .state()
        .last_events(500, Some(victim))
        .unwrap()
        .into_iter()
        .any(|e| e.kind == "install.image" && e.message.contains("(resuming)"));
    assert!(
        resumed,
        "{victim} did not resume its image\n{}",
        lab.events(victim)
    );
}

/// Phase of the lab test: 3. Run it again with nothing to do, as its closing text says: it says
fn rerun_with_nothing_to_do(lab: &TestLab) {
    let spec = lab.spec();
    let state_dir = lab::state_dir(&lab.dir());
    let _ = (&spec, &state_dir);
    // 3. Run it again with nothing to do, as its closing text says: it says
    // so, prints no error and succeeds, without starting the controller's
    // services.
    let (status, out) = lab.up_to_end("up-again.log", Duration::from_secs(120));
    assert!(
        status.is_some_and(|s| s.success()),
        "a re-run with nothing to do failed ({status:?})\n{out}"
    );
    assert!(out.contains("Nothing to do"), "{out}");
    assert!(
        !out.contains("ERROR") && !out.contains("error:"),
        "a re-run with nothing to do printed an error\n{out}"
    );
}

/// Phase of the lab test: `homelab ssh` (OpenSSH trusting only the pinned key): the node's name, the root grown.
fn nodes_are_reachable_and_run_k3s(lab: &TestLab) {
    let spec = lab.spec();
    let state_dir = lab::state_dir(&lab.dir());
    let _ = (&spec, &state_dir);
    // `homelab ssh` (OpenSSH trusting only the pinned key): the node's name, the root grown.
    for n in &spec.nodes {
        let out = lab
            .ssh(&n.name, "hostname; findmnt -bno SIZE /")
            .unwrap_or_else(|e| panic!("ssh {}: {e}", n.name));
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some(n.name.as_str()), "{out}");
        let size: u64 = lines.next().unwrap().trim().parse().unwrap();
        assert!(
            size > 3 << 30,
            "{}: root filesystem {size} bytes, not grown to the 4 GiB disk",
            n.name
        );
    }

    // k3s on each node: the unit active, the config private, the right role.
    for n in &spec.nodes {
        let (unit, mode) = if n.role == "server" {
            ("k3s", "server")
        } else {
            ("k3s-agent", "agent")
        };
        let started = lab.k3s_started(&n.name, unit);
        let out = started.to_string();
        assert_eq!(started["mode"], mode, "{out}");
        assert_eq!(started["config"]["node-name"], n.name.as_str(), "{out}");
        assert_eq!(started["config"]["node-ip"], n.ip.to_string(), "{out}");
        assert_eq!(
            started["config"]["node-label"],
            serde_json::json!([
                format!("homelab.role={}", n.role),
                format!("homelab.lab/firmware={}", n.firmware)
            ]),
            "{out}"
        );
        if n.name == "node1" {
            assert_eq!(started["config"]["cluster-init"], "true", "{out}");
        } else {
            assert_eq!(
                started["config"]["server"], "https://10.77.0.11:6443",
                "{out}"
            );
        }
    }
    assert_eq!(lab.members(), "node/node1\nnode/node2\nnode/node3");

    // `homelab kubeconfig`: read from the server over SSH, pointed at it, 0600.
    let kubeconfig = lab.root.path().join("kubeconfig");
    let out = host::in_netns(&spec.netns, env!("CARGO_BIN_EXE_homelab"))
        .arg("--inventory")
        .arg(lab::inventory_path(&lab.dir()))
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("kubeconfig")
        .arg("--output")
        .arg(&kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(
        text.contains("server: https://10.77.0.11:6443") && !text.contains("127.0.0.1"),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kubeconfig).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// Phase of the lab test: 3. node2 and node3 leave the inventory: out of the cluster, k3s off, OS kept.
fn leave_the_cluster(lab: &TestLab) -> String {
    let spec = lab.spec();
    let state_dir = lab::state_dir(&lab.dir());
    let _ = (&spec, &state_dir);
    // 3. node2 and node3 leave the inventory: out of the cluster, k3s off, OS kept.
    let stanza = |text: &str, node: &str| -> (usize, usize) {
        let start = text.find(&format!("[nodes.{node}]")).unwrap();
        let start = text[..start].rfind("\n#").map_or(start, |i| i + 1);
        let end = text[start + 1..]
            .find("\n# ")
            .map_or(text.len(), |i| start + 2 + i);
        (start, end)
    };
    let inventory_before = std::fs::read_to_string(lab::inventory_path(&lab.dir())).unwrap();
    lab.edit_inventory(|mut text| {
        for node in ["node3", "node2"] {
            let (a, b) = stanza(&text, node);
            text.replace_range(a..b, "");
        }
        text
    });
    lab.converge("up-remove.log", "removing node2 and node3");
    assert_eq!(lab.members(), "node/node1");
    for node in ["node2", "node3"] {
        let r = lab.record(node).unwrap();
        assert_eq!(r.stage, Stage::Released, "{node}: {}", r.detail);
        assert!(
            r.detail
                .contains("cordoned, drained and deleted from the cluster")
                && r.detail.contains("k3s uninstalled"),
            "{node}: {}",
            r.detail
        );
        let left = lab
            .ssh(
                node,
                "systemctl is-active k3s-agent; ls /usr/local/bin/k3s /etc/rancher/k3s \
                 /var/lib/rancher/k3s /etc/systemd/system/k3s-agent.service 2>&1; hostname",
            )
            .unwrap_or_else(|e| panic!("ssh {node} after its removal: {e}"));
        assert!(
            left.starts_with("inactive") || left.starts_with("unknown"),
            "{node}: {left}"
        );
        assert_eq!(
            left.matches("No such file or directory").count(),
            4,
            "{node} kept k3s files: {left}"
        );
        assert!(left.trim_end().ends_with(node), "{node}'s OS: {left}");
    }

    inventory_before
}

/// Phase of the lab test: 4. They come back as servers (HA with node1), node2 with a taint, node1
fn come_back_as_ha_servers(lab: &TestLab, inventory_before: &str) {
    let spec = lab.spec();
    let state_dir = lab::state_dir(&lab.dir());
    let _ = (&spec, &state_dir);
    // 4. They come back as servers (HA with node1), node2 with a taint, node1
    // with another label; node3 cannot be reached (no route from the
    // controller): it fails with its cause while the others finish.
    lab.edit_inventory(|_| {
        inventory_before
            .replace("role = \"agent\"", "role = \"server\"")
            .replace(
                "labels = { \"homelab.lab/firmware\" = \"uefi\" }",
                "labels = { \"homelab.lab/firmware\" = \"uefi\" }\n\
                 taints = [\"homelab.test/dedicated=etcd:NoSchedule\"]",
            )
            .replacen(
                "labels = { \"homelab.lab/firmware\" = \"bios\" }",
                "labels = { \"homelab.lab/firmware\" = \"bios\", zone = \"a\" }",
                1,
            )
    });
    let node3 = spec.node("node3").unwrap();
    let route = |op: &str| {
        let st = host::in_netns(&spec.netns, "ip")
            .args(["route", op, "unreachable"])
            .arg(format!("{}/32", node3.ip))
            .status()
            .unwrap();
        assert!(st.success(), "ip route {op} unreachable {}", node3.ip);
    };
    route("add");
    let (status, out) = lab.up_to_end("up-readd.log", CLUSTER_TIMEOUT);
    route("del");
    assert!(
        status.is_some_and(|s| !s.success()),
        "lab up did not fail with node3 unreachable ({status:?})\n{out}"
    );
    let r3 = lab.record("node3").unwrap();
    assert_eq!(r3.stage, Stage::Unreachable, "node3: {}", r3.detail);
    assert!(
        r3.detail.contains(&format!("{}:22", node3.ip)) && r3.detail.contains("attempts"),
        "node3's cause: {}",
        r3.detail
    );
    assert!(out.contains(&format!("{}:22", node3.ip)), "{out}");
    for node in ["node1", "node2"] {
        let r = lab.record(node).unwrap();
        assert_eq!(r.stage, Stage::Running, "{node}: {}", r.detail);
    }
    assert_eq!(lab.members(), "node/node1\nnode/node2");

    // node3 reachable again: a re-run makes it the third server.
    lab.converge("up-ha.log", "the re-run with node3 reachable");
    assert_eq!(lab.members(), "node/node1\nnode/node2\nnode/node3");
    for n in &spec.nodes {
        let started = lab.k3s_started(&n.name, "k3s");
        let out = started.to_string();
        assert_eq!(started["mode"], "server", "{}: {out}", n.name);
        if n.name != "node1" {
            assert_eq!(
                started["config"]["server"], "https://10.77.0.11:6443",
                "{out}"
            );
            assert!(started["config"].get("cluster-init").is_none(), "{out}");
        }
        let seen = lab.cluster_node(&n.name);
        assert_eq!(
            seen["metadata"]["labels"]["homelab.role"], "server",
            "{seen}"
        );
    }
    assert_eq!(lab.cluster_node("node1")["metadata"]["labels"]["zone"], "a");
    assert_eq!(
        lab.cluster_node("node2")["spec"]["taints"],
        serde_json::json!(["homelab.test/dedicated=etcd:NoSchedule"])
    );
    assert_eq!(
        lab.state().bootstrap_server().unwrap().as_deref(),
        Some("node1")
    );

    // An edit k3s does not see (power) configures node3 again, but its k3s
    // files are the same: it keeps running, not restarted.
    let k3s_since = || {
        lab.ssh(
            "node3",
            "systemctl show -p ActiveEnterTimestampMonotonic --value k3s",
        )
        .unwrap()
    };
    let before = k3s_since();
    lab.edit_inventory(|text| {
        text.replacen(
            "[nodes.node3]\n",
            "[nodes.node3]\npower = { wol = true }\n",
            1,
        )
    });
    lab.converge("up-power.log", "node3's power edit");
    let r3 = lab.record("node3").unwrap();
    assert_eq!(r3.stage, Stage::Running, "node3: {}", r3.detail);
    assert!(r3.detail.contains("not restarted"), "node3: {}", r3.detail);
    assert_eq!(k3s_since(), before, "k3s on node3 was restarted");

    // The token never left the SSH channel: not in an event, a log or a
    // console (HTTP answers are checked below, with a controller serving).
    let token = String::from_utf8(
        homelab::state::read_secret(&state_dir, homelab::k3s::TOKEN_SECRET)
            .unwrap()
            .expect("the k3s token"),
    )
    .unwrap();
    let mut haystacks = vec![
        (
            "lab up output".to_string(),
            std::fs::read_dir(lab.root.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .map(|p| common::read_lossy(&p))
                .collect::<String>(),
        ),
        (
            "events".to_string(),
            lab.state()
                .last_events(100_000, None)
                .unwrap()
                .iter()
                .map(|e| format!("{} {} {}\n", e.kind, e.message, e.data))
                .collect(),
        ),
    ];
    for n in &spec.nodes {
        let files = VmFiles::new(&lab.dir(), &n.name);
        haystacks.push((
            format!("{} console", n.name),
            common::read_lossy(&files.serial()),
        ));
    }
    for (what, text) in &haystacks {
        assert!(!text.is_empty(), "{what} is empty");
        assert!(
            !text.contains(&token),
            "the k3s token appears in the {what}"
        );
    }
}

/// Phase of the lab test: 5. Reinstall protection: node1 powered off, PXE-booted again, boots its disk.
fn an_installed_disk_survives_a_pxe_boot(lab: &TestLab) {
    let spec = lab.spec();
    let state_dir = lab::state_dir(&lab.dir());
    let _ = (&spec, &state_dir);
    let token = String::from_utf8(
        homelab::state::read_secret(&state_dir, homelab::k3s::TOKEN_SECRET)
            .unwrap()
            .expect("the k3s token"),
    )
    .unwrap();
    // 5. Reinstall protection: node1 powered off, PXE-booted again, boots its disk.
    let node = spec.node("node1").unwrap();
    let files = VmFiles::new(&lab.dir(), &node.name);
    let _ = lab.ssh(&node.name, "systemctl poweroff");
    wait_powered_off(&files, &spec, node, Duration::from_secs(180));
    let before = disk_sha256(&files.disk());
    std::fs::remove_file(files.serial()).unwrap();
    let after_event = lab.state().last_event_id().unwrap();

    // A controller keeps serving; `lab up` hands it the inventory and powers node1 on.
    let serve_log = lab.root.path().join("serve.log");
    let mut serve = host::in_netns(&spec.netns, env!("CARGO_BIN_EXE_homelab"))
        .arg("--inventory")
        .arg(lab::inventory_path(&lab.dir()))
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&serve_log).unwrap())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(&mut serve);
    common::wait_until(
        "the controller to serve",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || Ok(DaemonLock::holder(&state_dir).map(|_| ())),
    )
    .unwrap();
    let log3 = lab.root.path().join("up-3.log");
    let mut up = lab.up(&[], &log3);
    let status = wait_child(&mut up, Duration::from_secs(120));
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        common::read_lossy(&log3)
    );
    common::wait_until(
        "node1's GRUB from its own disk",
        Duration::from_secs(300),
        Duration::from_millis(200),
        || {
            Ok(common::read_lossy(&files.serial())
                .contains("homelab-lab-image: GRUB")
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnostics(&log3)));
    let pid = lab::vm::running_pid(&files, &spec, node).expect("node1 running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_powered_off(&files, &spec, node, Duration::from_secs(30));
    let events = lab
        .state()
        .events_after(after_event, Some("node1"), 500)
        .unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "http.script" && e.message.contains("local disk")),
        "node1 was not told to boot its disk: {events:#?}"
    );
    assert!(
        !events.iter().any(|e| e.kind.starts_with("install.")),
        "an install started on an installed node: {events:#?}"
    );
    for n in &spec.nodes {
        let script = host::in_netns(&spec.netns, "curl")
            .args(["-s", "--max-time", "10"])
            .arg(format!(
                "http://{}:8080/boot/{}.ipxe",
                spec.controller, n.mac
            ))
            .output()
            .unwrap();
        let script = String::from_utf8_lossy(&script.stdout);
        assert!(
            script.contains("local disk") || script.contains("sanboot"),
            "{script}"
        );
        assert!(
            !script.contains(&token),
            "the k3s token appears in {}'s boot script",
            n.name
        );
    }
    drop(guard);
    assert_eq!(
        disk_sha256(&files.disk()),
        before,
        "node1's disk changed on a PXE boot"
    );
}

/// Phase of the lab test: 6. lab down removes everything.
fn lab_down_removes_everything(lab: &TestLab) {
    let spec = lab.spec();
    let state_dir = lab::state_dir(&lab.dir());
    let _ = (&spec, &state_dir);
    // 6. lab down removes everything.
    let out = lab.homelab(&["lab", "down"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!host::netns_exists(&spec.netns));
    assert!(!lab.dir().exists());
}

struct KillOnDrop<'a>(&'a mut Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
