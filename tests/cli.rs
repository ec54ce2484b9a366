//! The command line end to end, through the built binary, on loopback only.
//! The netboot "client" here is this test speaking HTTP the way iPXE does.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_homelab")
}

struct Lab {
    dir: tempfile::TempDir,
    port: u16,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), vec![7u8; 300_000]).unwrap();
        std::fs::write(dir.path().join("initrd.gz"), vec![9u8; 100_000]).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let lab = Lab { dir, port };
        lab.write_inventory(&["n1"]);
        lab
    }

    fn inventory(&self) -> PathBuf {
        self.dir.path().join("inventory.toml")
    }
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// An inventory on loopback: no DHCP, no TFTP, nodes with a boot profile.
    fn write_inventory(&self, nodes: &[&str]) {
        let mut s = format!(
            "[controller]\ninterface = \"lo\"\naddress = \"127.0.0.1\"\ndhcp = \"off\"\ntftp = false\nhttp_port = {}\n\n\
             [cluster]\nname = \"t\"\nk3s_version = \"v1.31.4+k3s1\"\n\n",
            self.port
        );
        for (i, n) in nodes.iter().enumerate() {
            s.push_str(&format!(
                "[nodes.{n}]\nmac = \"52:54:00:00:00:{:02x}\"\nip = \"10.9.0.{}\"\nrole = \"{}\"\n\
                 boot = {{ kernel = \"vmlinuz\", initrd = [\"initrd.gz\"], cmdline = \"console=ttyS0\" }}\n\n",
                i + 1,
                i + 10,
                if i == 0 { "server" } else { "agent" }
            ));
        }
        std::fs::write(self.inventory(), s).unwrap();
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(exe());
        c.arg("-i")
            .arg(self.inventory())
            .arg("--state-dir")
            .arg(self.state())
            .args(args);
        c.env_remove("RUST_LOG");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn spawn(&self, args: &[&str]) -> Guard {
        Guard(
            self.cmd(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    /// What a PXE-booted node does: fetch its script, then every file it names.
    fn boot_node(&self, mac: &str) -> String {
        let script = wait_http(self.port, &format!("/boot/{mac}.ipxe"));
        for url in script
            .split_whitespace()
            .filter(|w| w.starts_with("http://"))
        {
            let path = url.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap();
            http_get(self.port, &path).expect("boot file served");
        }
        script
    }
}

/// Kills the child on drop, whatever happens in the test.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
impl Guard {
    fn wait_output(mut self, limit: Duration) -> Output {
        let start = Instant::now();
        loop {
            if let Some(_status) = self.0.try_wait().unwrap() {
                let child = std::mem::replace(&mut self.0, Command::new("true").spawn().unwrap());
                return child.wait_with_output().unwrap();
            }
            assert!(
                start.elapsed() < limit,
                "command did not finish within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), sig).unwrap();
    }
}

fn http_get(port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, buf[head_end + 4..].to_vec()))
}

fn wait_http(port: u16, path: &str) -> String {
    let start = Instant::now();
    loop {
        if let Some((200, body)) = http_get(port, path) {
            return String::from_utf8(body).unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no HTTP answer on {path}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn help_is_worth_reading() {
    let o = Command::new(exe()).arg("--help").output().unwrap();
    let (out, _) = text(&o);
    for cmd in [
        "init",
        "validate",
        "plan",
        "up",
        "serve",
        "status",
        "events",
        "discover",
        "reinstall",
        "forget",
        "completions",
    ] {
        assert!(out.contains(cmd), "--help lists {cmd}: {out}");
    }
    let o = Command::new(exe())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("homelab"));
}

/// A network namespace made by this test (removed on drop), holding a veth
/// pair; commands run inside it see only its routes and addresses.
struct Ns(String);

impl Ns {
    fn new(tag: &str, setup: &[&[&str]]) -> Ns {
        let ns = Ns(format!("hl-cli-{}-{tag}", std::process::id()));
        let ip = |args: &[&str]| {
            let o = Command::new("ip").args(args).output().unwrap();
            assert!(o.status.success(), "ip {args:?}: {:?}", text(&o));
        };
        ip(&["netns", "add", &ns.0]);
        for cmd in setup {
            let mut args = vec!["-n", ns.0.as_str()];
            args.extend_from_slice(cmd);
            ip(&args);
        }
        ns
    }
    fn homelab(&self, inv: &std::path::Path, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0, exe(), "-i"])
            .arg(inv)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn init_writes_an_inventory_for_this_machine_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inventory.toml");
    let ns = Ns::new(
        "route",
        &[
            &[
                "link", "add", "lab0", "type", "veth", "peer", "name", "lab0p",
            ],
            &["addr", "add", "10.77.3.5/23", "dev", "lab0"],
            &["link", "set", "lab0p", "up"],
            &["link", "set", "lab0", "up"],
            &["route", "add", "default", "via", "10.77.2.1", "dev", "lab0"],
        ],
    );
    let o = ns.homelab(&inv, &["init"]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(
        text(&o).0.contains("lab0 10.77.3.5 on 10.77.2.0/23"),
        "{:?}",
        text(&o)
    );
    let first = std::fs::read_to_string(&inv).unwrap();
    for line in [
        "interface = \"lab0\"",
        "address = \"10.77.3.5\"",
        "subnet = \"10.77.2.0/23\"",
        "dhcp = \"proxy\"",
        "checksums = \"https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS\"",
        "installer_kernel_checksums = \"https://",
    ] {
        assert!(first.contains(line), "{line} not in:\n{first}");
    }
    assert!(!first.lines().any(|l| l.starts_with("[nodes.")), "{first}");
    assert!(!first.contains("0000000000"), "{first}");
    let o = ns.homelab(&inv, &["validate"]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(text(&o).0.contains("is valid: 0 nodes"), "{:?}", text(&o));
    assert!(
        text(&o).1.contains("homelab discover --adopt"),
        "{:?}",
        text(&o)
    );

    std::fs::write(&inv, "# mine\n").unwrap();
    let o = ns.homelab(&inv, &["init"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("never overwrites"));
    assert_eq!(std::fs::read_to_string(&inv).unwrap(), "# mine\n");
}

#[test]
fn init_without_a_default_route_writes_a_file_validate_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inventory.toml");
    let ns = Ns::new("noroute", &[&["link", "set", "lo", "up"]]);
    let o = ns.homelab(&inv, &["init"]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(
        text(&o).0.contains("no IPv4 default route"),
        "{:?}",
        text(&o)
    );
    let written = std::fs::read_to_string(&inv).unwrap();
    assert!(written.contains("interface = \"\"") && written.contains("address = \"\""));
    let o = Command::new(exe())
        .arg("-i")
        .arg(&inv)
        .arg("validate")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    let err = text(&o).1;
    for key in [
        "controller.interface",
        "controller.address",
        "controller.subnet",
    ] {
        assert!(err.contains(&format!(": {key}: ")), "{key}:\n{err}");
    }
}

#[test]
fn init_on_this_machine_names_its_default_route() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inventory.toml");
    let o = Command::new(exe())
        .arg("-i")
        .arg(&inv)
        .arg("init")
        .output()
        .unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    let routes = std::fs::read_to_string("/proc/net/route").unwrap();
    let default = routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000")).then(|| f[0].to_string())
    });
    let o = Command::new(exe())
        .arg("-i")
        .arg(&inv)
        .arg("validate")
        .output()
        .unwrap();
    match default {
        Some(iface) => {
            assert!(o.status.success(), "{:?}", text(&o));
            let written = std::fs::read_to_string(&inv).unwrap();
            assert!(
                written.contains(&format!("interface = \"{iface}\"")),
                "{written}"
            );
        }
        None => assert_eq!(o.status.code(), Some(2)),
    }
}

const REAL_SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn installing_inventory(sha256: &str) -> String {
    format!(
        "# The lab.\n[controller]\ninterface = \"lab0\"  # the lab switch\naddress = \"10.9.0.1\"\n\
         subnet = \"10.9.0.0/24\"\ndhcp = \"off\"\n\n[cluster]\nk3s_version = \"v1.31.4+k3s1\"\n\n\
         [os]\nimage = \"https://example.org/os.raw\"\nsha256 = \"{sha256}\"\n\n\
         # Nodes go here.\n"
    )
}

#[test]
fn validate_refuses_a_placeholder_checksum_at_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inventory.toml");
    std::fs::write(&inv, installing_inventory(&"0".repeat(64))).unwrap();
    let o = Command::new(exe())
        .arg("-i")
        .arg(&inv)
        .arg("validate")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    let err = text(&o).1;
    assert!(
        err.contains("inventory.toml:13:10: os.sha256: ") && err.contains("a placeholder"),
        "{err}"
    );
    assert!(
        err.contains("= help: ") && err.contains("sha256sum FILE"),
        "{err}"
    );
}

#[test]
fn discover_adopt_writes_the_machines_in_and_keeps_comments() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inventory.toml");
    let state_dir = dir.path().join("state");
    let original = installing_inventory(REAL_SHA);
    std::fs::write(&inv, &original).unwrap();
    let st = homelab::state::State::open(&state_dir).unwrap();
    for mac in [
        "52:54:00:00:aa:01",
        "52:54:00:00:aa:02",
        "52:54:00:00:aa:03",
    ] {
        st.record_discovered(mac, Some(7), "PXEClient:Arch:00007")
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(st);
    let run = |args: &[&str]| {
        Command::new(exe())
            .arg("-i")
            .arg(&inv)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(args)
            .output()
            .unwrap()
    };
    // Refused, and nothing written: more names than machines, a bad name.
    let o = run(&["discover", "--adopt", "a", "b", "c", "d"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o)
            .1
            .contains("4 names given but 3 unknown machines were seen"),
        "{:?}",
        text(&o)
    );
    let o = run(&["discover", "--adopt", "Web_1"]);
    assert!(
        text(&o).1.contains("cannot be a node name"),
        "{:?}",
        text(&o)
    );
    assert_eq!(std::fs::read_to_string(&inv).unwrap(), original);

    let o = run(&["discover", "--adopt", "s1", "w1"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let out = text(&o).0;
    assert!(
        out.contains("+ [nodes.s1] mac = 52:54:00:00:aa:01, ip = 10.9.0.2, role = server"),
        "{out}"
    );
    assert!(
        out.contains("+ [nodes.w1] mac = 52:54:00:00:aa:02, ip = 10.9.0.3, role = agent"),
        "{out}"
    );
    let written = std::fs::read_to_string(&inv).unwrap();
    assert!(
        written.starts_with(&original),
        "comments and layout kept:\n{written}"
    );
    assert!(
        written.contains(
            "[nodes.w1]\nmac = \"52:54:00:00:aa:02\"\nip = \"10.9.0.3\"\nrole = \"agent\"\n"
        ),
        "{written}"
    );
    let o = run(&["validate"]);
    assert!(o.status.success(), "{:?}", text(&o));
    // The third machine is all that is left to adopt; a taken name is refused.
    let o = run(&["discover", "--json"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let o = run(&["discover", "--adopt", "w1"]);
    assert!(text(&o).1.contains("already"), "{:?}", text(&o));
    let o = run(&["discover", "--adopt", "w2", "--role", "server"]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(
        text(&o).0.contains("ip = 10.9.0.4, role = server"),
        "{:?}",
        text(&o)
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 2, "no temp file left: {left:?}");
}

#[test]
fn invalid_inventory_lists_every_error_and_applies_nothing() {
    let lab = Lab::new();
    let mut s = std::fs::read_to_string(lab.inventory()).unwrap();
    s = s.replace("mac = \"52:54:00:00:00:01\"", "mac = \"52:54:00:00:00:zz\"");
    s = s.replace("interface = \"lo\"", "interfce = \"lo\"");
    std::fs::write(lab.inventory(), s).unwrap();
    for args in [
        &["validate"][..],
        &["plan"],
        &["up", "--plain", "--timeout", "5"],
    ] {
        let o = lab.run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {:?}", text(&o));
        let (_, err) = text(&o);
        assert!(err.contains("inventory.toml:13:7"), "{err}");
        assert!(err.contains("interfce"), "{err}");
        assert!(err.contains("did you mean"), "{err}");
        assert!(err.contains("nothing was applied"), "{err}");
    }
    assert!(
        !lab.state().join("homelab.db").exists(),
        "nothing was written to the state dir"
    );
}

#[test]
fn plan_shows_the_difference_and_json() {
    let lab = Lab::new();
    lab.write_inventory(&["n1", "n2", "n3"]);
    let o = lab.run(&["plan"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("+ n1  provision server"), "{out}");
    assert!(out.contains("3 to provision"), "{out}");
    let o = lab.run(&["plan", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["actions"].as_array().unwrap().len(), 3);
    assert_eq!(v["actions"][0]["node"], "n1");
}

#[test]
fn up_serves_the_boot_profile_and_finishes_when_the_node_booted() {
    let lab = Lab::new();
    let up = lab.spawn(&["up", "--plain", "--timeout", "60"]);
    let script = lab.boot_node("52:54:00:00:00:01");
    assert!(script.starts_with("#!ipxe"), "{script}");
    assert!(
        script.contains("initrd=initrd.gz"),
        "the kernel line names its initrd: {script}"
    );
    let o = up.wait_output(Duration::from_secs(60));
    let (out, err) = text(&o);
    assert!(o.status.success(), "up failed:\n{out}\n{err}");
    assert!(out.contains("+ n1  provision server"), "{out}");
    assert!(out.contains("All nodes are up"), "{out}");
    // Plain mode prints timestamped event lines.
    assert!(out.contains("stage.booted"), "{out}");

    let o = lab.run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["name"], "n1");
    assert_eq!(v[0]["stage"], "booted");
    let (table, _) = text(&lab.run(&["status"]));
    assert!(
        table.contains("NODE") && table.contains("booted"),
        "{table}"
    );

    // Re-run without changes: nothing to do, and it is already done.
    let o = lab
        .spawn(&["up", "--plain", "--timeout", "30"])
        .wait_output(Duration::from_secs(40));
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("nothing to do (booted)"), "{out}");

    let (events, _) = text(&lab.run(&["events", "--node", "n1"]));
    assert!(events.contains("plan.provision"), "{events}");
    assert!(events.contains("http.script"), "{events}");
}

#[test]
fn second_daemon_refuses_and_up_hands_the_inventory_to_the_running_one() {
    let lab = Lab::new();
    let serve = lab.spawn(&["serve"]);
    wait_http(lab.port, "/boot/52:54:00:00:00:01.ipxe");

    let o = lab.run(&["serve"]);
    assert!(!o.status.success());
    let (_, err) = text(&o);
    assert!(err.contains("already running"), "{err}");
    assert!(
        err.contains(&serve.0.id().to_string()),
        "names the pid: {err}"
    );

    lab.write_inventory(&["n1", "n2"]);
    let up = lab.spawn(&["up", "--plain", "--timeout", "60"]);
    // The running daemon serves the new node once it has the new inventory.
    let start = Instant::now();
    while !lab.run(&["status"]).stdout.windows(2).any(|w| w == b"n2") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "n2 never appeared"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.boot_node("52:54:00:00:00:01");
    lab.boot_node("52:54:00:00:00:02");
    let o = up.wait_output(Duration::from_secs(60));
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        out.contains("Handed the inventory to the running daemon"),
        "{out}"
    );
    assert!(out.contains("+ n2  provision agent"), "{out}");
    drop(serve);
}

#[test]
fn killed_daemon_restarts_and_resumes() {
    let lab = Lab::new();
    lab.write_inventory(&["n1", "n2"]);
    let serve = lab.spawn(&["serve"]);
    lab.boot_node("52:54:00:00:00:01");
    serve.signal(nix::sys::signal::Signal::SIGKILL);
    drop(serve);
    // The lock died with the process; the stale control socket is replaced.
    let up = lab.spawn(&["up", "--plain", "--timeout", "60"]);
    lab.boot_node("52:54:00:00:00:02");
    let o = up.wait_output(Duration::from_secs(60));
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        out.contains("nothing to do (booted)"),
        "n1's progress survived the kill: {out}"
    );
}

#[test]
fn sighup_reloads_and_a_bad_edit_keeps_the_old_inventory() {
    let lab = Lab::new();
    let serve = lab.spawn(&["serve"]);
    wait_http(lab.port, "/boot/52:54:00:00:00:01.ipxe");
    std::fs::write(lab.inventory(), "this is not toml [").unwrap();
    serve.signal(nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    // Still serving the old inventory.
    assert!(wait_http(lab.port, "/boot/52:54:00:00:00:01.ipxe").contains("initrd="));
    lab.write_inventory(&["n1", "n2"]);
    serve.signal(nix::sys::signal::Signal::SIGHUP);
    let start = Instant::now();
    while !wait_http(lab.port, "/boot/52:54:00:00:00:02.ipxe").contains("initrd=") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "n2 never served after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn reinstall_and_discover_commands() {
    let lab = Lab::new();
    let o = lab.run(&["reinstall", "n1"]);
    assert!(!o.status.success(), "unknown until applied");
    let o = lab
        .spawn(&["up", "--plain", "--timeout", "2"])
        .wait_output(Duration::from_secs(30));
    assert!(!o.status.success(), "times out: the node never booted");
    assert!(text(&o).1.contains("Timed out"));
    let o = lab.run(&["reinstall", "n1"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let o = lab.run(&["discover"]);
    assert!(text(&o).0.contains("No unknown PXE clients"));
}

#[test]
fn forget_gives_up_only_a_removal_that_cannot_finish() {
    let lab = Lab::new();
    lab.write_inventory(&["n1", "n2"]);
    let o = lab
        .spawn(&["up", "--plain", "--timeout", "2"])
        .wait_output(Duration::from_secs(30));
    assert!(text(&o).1.contains("Timed out"), "{:?}", text(&o));
    lab.write_inventory(&["n1"]);
    let refused = |node: &str, says: &str| {
        let o = lab.run(&["forget", node]);
        assert!(!o.status.success(), "forget {node} was taken");
        assert!(text(&o).1.contains(says), "{says}: {:?}", text(&o));
    };
    refused("n1", "is still in");
    refused("ghost", "knows no node named `ghost`");
    refused(
        "n2",
        "is pending, not leaving the cluster: run `homelab up` first",
    );

    // As after `homelab up` failed to take n2 out of the cluster.
    homelab::state::State::open(&lab.state())
        .unwrap()
        .force_stage(
            "n2",
            homelab::state::Stage::RemoveFailed,
            "no route to host",
        )
        .unwrap()
        .unwrap();
    let o = lab.run(&["forget", "n2"]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(text(&o).0.contains("n2 is forgotten"), "{:?}", text(&o));
    let status = text(&lab.run(&["status"])).0;
    assert!(
        status
            .lines()
            .any(|l| l.contains("n2") && l.contains("forgotten")),
        "{status}"
    );
    let events = text(&lab.run(&["events", "--node", "n2"])).0;
    assert!(events.contains("stage.forgotten"), "{events}");
    refused("n2", "is forgotten already");
    let plan = text(&lab.run(&["plan"])).0;
    assert!(!plan.contains("n2"), "not removed again: {plan}");

    // Put back, it is checked over SSH and joins; it is not reinstalled.
    lab.write_inventory(&["n1", "n2"]);
    let plan = text(&lab.run(&["plan"])).0;
    assert!(
        plan.lines()
            .any(|l| l.contains("n2") && l.contains("back in the inventory")),
        "{plan}"
    );
}

#[test]
fn a_rerun_with_nothing_to_do_says_so_starts_no_service_and_exits_0() {
    use homelab::state::{Stage, State};
    let lab = Lab::new();
    // Nodes that install an OS (no boot profile), already running k3s.
    let image = lab.dir.path().join("os.raw");
    let deb = lab.dir.path().join("linux-image.deb");
    std::fs::write(&image, vec![1u8; 4096]).unwrap();
    std::fs::write(&deb, vec![2u8; 4096]).unwrap();
    let sha = |p: &std::path::Path| homelab::artifacts::sha256_file(p).unwrap();
    let text_of = format!(
        "[controller]\ninterface = \"lo\"\naddress = \"127.0.0.1\"\ndhcp = \"off\"\ntftp = false\nhttp_port = {}\n\n\
         [cluster]\nname = \"t\"\nk3s_version = \"v1.31.4+k3s1\"\n\n\
         [os]\nimage = \"os.raw\"\nsha256 = \"{}\"\ninstaller_kernel = \"linux-image.deb\"\ninstaller_kernel_sha256 = \"{}\"\n\n\
         [nodes.n1]\nmac = \"52:54:00:00:00:01\"\nip = \"10.9.0.10\"\nrole = \"server\"\n\n\
         [nodes.n2]\nmac = \"52:54:00:00:00:02\"\nip = \"10.9.0.11\"\nrole = \"agent\"\n",
        lab.port,
        sha(&image),
        sha(&deb)
    );
    std::fs::write(lab.inventory(), text_of).unwrap();
    let inv = homelab::inventory::load(&lab.inventory())
        .unwrap()
        .inventory;
    let last_event = {
        let st = State::open(&lab.state()).unwrap();
        let p = homelab::plan::plan(&inv, &st.nodes().unwrap());
        homelab::daemon::apply_plan(&st, &inv, &p).unwrap();
        for n in ["n1", "n2"] {
            st.force_stage(n, Stage::Running, "k3s runs").unwrap();
        }
        st.last_event_id().unwrap()
    };
    // The HTTP port is taken: `up` must not try to serve.
    let _taken = std::net::TcpListener::bind(("127.0.0.1", lab.port)).unwrap();

    let o = lab
        .spawn(&["up", "--plain", "--timeout", "30"])
        .wait_output(Duration::from_secs(30));
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("nothing to do (running)"), "{out}");
    assert!(out.contains("Nothing to do: every node is as"), "{out}");
    assert!(!out.contains("Serving on"), "{out}");
    assert!(
        !err.to_lowercase().contains("error"),
        "no error on a re-run: {err}"
    );
    let st = State::open(&lab.state()).unwrap();
    assert_eq!(
        st.last_event_id().unwrap(),
        last_event,
        "a re-run with nothing to do writes nothing"
    );

    // One node short of its goal: now `up` has work, starts its services
    // and (the port being taken) says why it cannot.
    st.force_stage("n2", Stage::Ready, "").unwrap();
    let o = lab
        .spawn(&["up", "--plain", "--timeout", "30"])
        .wait_output(Duration::from_secs(30));
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}{err}");
    assert!(err.contains("cannot listen for HTTP"), "{err}");
}
