//! The stand-in k3s the lab runs (tests/k3s-standin/k3s) must refuse what
//! real k3s would refuse, or the lab test would prove nothing about the
//! configs homelab writes. Here it runs on this machine, its paths moved
//! into a temporary directory: a config rendered by homelab for a server and
//! an agent is accepted (the agent joins, labels and taints registered),
//! each kind of bad config or a wrong token is refused with its reason, and
//! changes arriving together all land.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use homelab::k3s::{members, render_config};
use homelab::templates::Templates;

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The stand-in with its paths and port moved under `root`, its host name
/// fixed to `name`.
struct StandIn {
    root: PathBuf,
    script: PathBuf,
}

impl StandIn {
    fn new(root: &Path, name: &str, port: u16) -> StandIn {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/k3s-standin/k3s"),
        )
        .unwrap();
        let r = root.display();
        let moved = text
            .replace(
                "\"/etc/rancher/k3s/config.yaml\"",
                &format!("\"{r}/config.yaml\""),
            )
            .replace(
                "\"/etc/rancher/k3s/k3s.yaml\"",
                &format!("\"{r}/k3s.yaml\""),
            )
            .replace(
                "\"/var/lib/rancher/k3s/standin\"",
                &format!("\"{r}/state\""),
            )
            .replace("6443", &port.to_string())
            .replace("socket.gethostname()", &format!("\"{name}\""));
        assert_ne!(moved, text);
        let script = root.join("k3s");
        std::fs::write(&script, moved).unwrap();
        StandIn {
            root: root.to_path_buf(),
            script,
        }
    }

    fn config(&self, text: &str, mode: u32) {
        let path = self.root.join("config.yaml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("python3");
        c.arg(&self.script).args(args).env_remove("NOTIFY_SOCKET");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn spawn(&self, mode: &str) -> KillOnDrop {
        KillOnDrop(
            self.command(&[mode])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// homelab's configs for `s1` (server) and `a1` (agent joining it).
fn rendered(port: u16) -> (String, String) {
    let text = format!(
        "[controller]\ninterface = \"eth0\"\naddress = \"10.0.0.1\"\n\n\
         [cluster]\nk3s_version = \"v1.31.4+k3s1\"\n\n\
         [os]\nimage = \"https://example.org/os.raw\"\nsha256 = \"{}\"\n\n\
         [nodes.s1]\nmac = \"52:54:00:00:00:01\"\nip = \"10.0.0.11\"\nrole = \"server\"\n\n\
         [nodes.a1]\nmac = \"52:54:00:00:00:02\"\nip = \"10.0.0.12\"\nrole = \"agent\"\n\
         labels = {{ disk = \"ssd\" }}\ntaints = [\"dedicated=gpu:NoSchedule\"]\n",
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
    let inv = homelab::inventory::parse_str(&text, Path::new("inventory.toml"))
        .unwrap_or_else(|d| panic!("{d}"))
        .inventory;
    let t = Templates::new(None).unwrap();
    let m = members(&inv, None).unwrap();
    // Both run on this machine: their addresses become loopback.
    let cfg = |i: usize| {
        render_config(&t, &inv, &m[i], TOKEN)
            .unwrap()
            .replace("10.0.0.11", "127.0.0.1")
            .replace("10.0.0.12", "127.0.0.1")
            .replace(":6443", &format!(":{port}"))
    };
    (cfg(0), cfg(1))
}

#[test]
fn the_stand_in_accepts_homelabs_configs_and_refuses_what_k3s_would() {
    if Command::new("python3").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("HOMELAB_REQUIRE_LAB").is_none(),
            "python3 is missing"
        );
        eprintln!("skipped: no python3");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server_dir = dir.path().join("s1");
    let agent_dir = dir.path().join("a1");
    std::fs::create_dir_all(&server_dir).unwrap();
    std::fs::create_dir_all(&agent_dir).unwrap();
    let server = StandIn::new(&server_dir, "s1", port);
    let agent = StandIn::new(&agent_dir, "a1", port);
    let (server_cfg, agent_cfg) = rendered(port);

    // Each refusal, on the server's or the agent's side.
    let refused = |s: &StandIn, mode: &str, cfg: &str, file_mode: u32, says: &str| {
        s.config(cfg, file_mode);
        let out = s.run(&[mode]);
        assert!(!out.status.success(), "accepted: {cfg}");
        assert!(stderr(&out).contains(says), "{says}: {}", stderr(&out));
    };
    refused(&server, "server", &server_cfg, 0o644, "must be 0600");
    refused(
        &server,
        "server",
        &server_cfg.replace(TOKEN, "short"),
        0o600,
        "token",
    );
    refused(
        &server,
        "server",
        &server_cfg.replace("node-name: \"s1\"", "node-name: \"other\""),
        0o600,
        "is not this machine",
    );
    refused(
        &server,
        "server",
        &server_cfg.replace("node-ip: \"127.0.0.1\"", "node-ip: \"192.0.2.1\""),
        0o600,
        "not an address of this machine",
    );
    refused(
        &server,
        "server",
        &format!("{server_cfg}server: \"https://127.0.0.1:{port}\"\n"),
        0o600,
        "exactly one of cluster-init and server",
    );
    refused(
        &agent,
        "agent",
        &agent_cfg
            .lines()
            .filter(|l| !l.starts_with("server:"))
            .collect::<Vec<_>>()
            .join("\n"),
        0o600,
        "an agent needs server",
    );
    refused(
        &agent,
        "agent",
        &agent_cfg.replace("disk=ssd", "disk ssd"),
        0o600,
        "node-label",
    );
    refused(
        &agent,
        "agent",
        &agent_cfg.replace("gpu:NoSchedule", "gpu:Never"),
        0o600,
        "node-taint",
    );

    // homelab's own configs: the server comes up, the agent joins with its
    // labels and taints; the same agent with another token is refused.
    server.config(&server_cfg, 0o600);
    let _server_proc = server.spawn("server");
    let deadline = Instant::now() + Duration::from_secs(30);
    while server
        .run(&["kubectl", "get", "node", "s1", "-o", "name"])
        .status
        .code()
        != Some(0)
    {
        assert!(
            Instant::now() < deadline,
            "the stand-in server did not come up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.config(&agent_cfg.replace(TOKEN, &"f".repeat(64)), 0o600);
    let out = agent.run(&["agent"]);
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));
    agent.config(&agent_cfg, 0o600);
    let _agent_proc = agent.spawn("agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let out = server.run(&["kubectl", "get", "node", "a1", "-o", "json"]);
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "a1 did not join: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(seen["metadata"]["labels"]["disk"], "ssd", "{seen}");
    assert_eq!(
        seen["metadata"]["labels"]["homelab.role"], "agent",
        "{seen}"
    );
    assert_eq!(
        seen["spec"]["taints"],
        serde_json::json!(["dedicated=gpu:NoSchedule"])
    );
    // Two nodes leave at once: their kubectl calls reach the API together,
    // and every change must land and be answered.
    let changes: Vec<_> = (0..24)
        .map(|i| {
            server
                .command(&["kubectl", "label", "node", "s1", &format!("k{i}=v{i}")])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in changes {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "concurrent label: {}", stderr(&out));
    }
    let out = server.run(&["kubectl", "get", "node", "s1", "-o", "json"]);
    let s1: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for i in 0..24 {
        assert_eq!(
            s1["metadata"]["labels"][format!("k{i}")],
            format!("v{i}"),
            "{s1}"
        );
    }
    // The removal commands homelab sends.
    for args in [
        &["kubectl", "cordon", "a1"][..],
        &[
            "kubectl",
            "drain",
            "a1",
            "--ignore-daemonsets",
            "--timeout=300s",
        ],
        &["kubectl", "delete", "node", "a1"],
    ] {
        let out = server.run(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let out = server.run(&["kubectl", "get", "node", "a1", "-o", "name"]);
    assert!(!out.status.success() && stderr(&out).contains("NotFound"));
}
