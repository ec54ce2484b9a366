//! The DHCP server against real clients.
//!
//! Lab tests (root): each creates two network namespaces, `hl-dhcp-<pid>-<n>-s`
//! (the controller: `hs0`, 10.231.0.1/24) and `...-c` (the client: `hc0`,
//! 10.231.0.2/24), joined by a veth pair; the addresses exist only there. The
//! test process re-runs itself inside the server namespace (`ip netns exec`),
//! so the server's sockets belong to it; clients run in the client namespace:
//! busybox udhcpc, ISC dhclient, and a PXE-style client crafted with dhcproto
//! (this test binary again, in its `helper` role). Namespaces are removed on
//! every exit path by a drop guard. Without root the lab tests are skipped
//! with a reason, unless HOMELAB_REQUIRE_LAB=1 (then they fail).
//!
//! The loopback test needs no privileges: the same server loop on 127.0.0.1
//! with unprivileged ports.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use homelab::inventory::{DhcpMode, Inventory, MacAddr};
use homelab::netboot::dhcp::{self, BindOptions};
use homelab::netboot::Shared;
use homelab::state::{now_ms, NodeRecord, Stage, State};
use tokio::sync::watch;

const SERVER_IF: &str = "hs0";
const CLIENT_IF: &str = "hc0";
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 11);
const NODE_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x23, 0x10, 0x11]);
const STRANGER: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x23, 0x10, 0x99]);
const GUID: [u8; 17] = [
    0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 1,
];

// ---- the inventory and a running server ----

fn inventory(mode: DhcpMode, address: Ipv4Addr, ipxe_dir: &Path) -> Inventory {
    let mut inv = homelab::testing::Builder::new()
        .interface(SERVER_IF)
        .address(SERVER_IP)
        .controller(&format!(
            "dhcp = {}\nsubnet = \"10.231.0.0/24\"\ngateway = \"{SERVER_IP}\"\n\
             dns = [\"{SERVER_IP}\"]\npool = \"10.231.0.100-10.231.0.199\"\n\
             lease_time = 600\nipxe_dir = {:?}",
            serde_json::to_string(&mode).unwrap(),
            ipxe_dir.display().to_string()
        ))
        .node("node1", NODE_MAC, NODE_IP, "server")
        .build();
    // The loopback test's controller address is outside the lab's subnet,
    // which the loader would refuse.
    inv.controller.address = address;
    inv
}

struct Server {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Open a state dir with node1 Pending, bind, and serve on a thread of its own.
    fn start(mode: DhcpMode, address: Ipv4Addr, bind: BindOptions) -> (Server, dhcp::Listeners) {
        let dir = tempfile::tempdir().unwrap();
        let ipxe = dir.path().join("ipxe");
        fs::create_dir(&ipxe).unwrap();
        for f in ["undionly.kpxe", "ipxe.efi"] {
            fs::write(ipxe.join(f), b"binary").unwrap();
        }
        let state = State::open(&dir.path().join("state")).unwrap();
        state
            .put_node(
                &NodeRecord {
                    name: "node1".into(),
                    mac: NODE_MAC.to_string(),
                    ip: NODE_IP.to_string(),
                    role: "server".into(),
                    stage: Stage::Pending,
                    reinstall: false,
                    spec_hash: String::new(),
                    bytes_done: 0,
                    bytes_total: 0,
                    detail: String::new(),
                    stage_since_ms: now_ms(),
                    updated_ms: now_ms(),
                },
                "plan.provision",
                "test",
            )
            .unwrap();
        let shared = Shared::new(state, inventory(mode, address, &ipxe));
        let listeners = dhcp::bind_with(&bind).unwrap();
        // Keep copies of the sockets' addresses for the caller; the server owns the sockets.
        let info = dhcp::Listeners {
            dhcp: listeners.dhcp.try_clone().unwrap(),
            pxe: listeners.pxe.as_ref().map(|s| s.try_clone().unwrap()),
            broadcast: listeners.broadcast,
        };
        let (stop, rx) = watch::channel(false);
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(dhcp::serve(s, listeners, rx))
        });
        (
            Server {
                shared,
                stop,
                thread: Some(thread),
                _dir: dir,
            },
            info,
        )
    }

    fn state(&self) -> &State {
        &self.shared.state
    }

    fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn events(&self, kind: &str) -> Vec<homelab::state::Event> {
        self.state()
            .last_events(1000, None)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == kind)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let result = t.join();
            if !std::thread::panicking() {
                result
                    .expect("the DHCP server panicked")
                    .expect("the DHCP server failed");
            }
        }
    }
}

// ---- crafted clients ----

fn request(mac: MacAddr, kind: MessageType) -> Message {
    homelab::testing::dhcp_request(rand::random(), mac, kind)
}

fn pxe(mac: MacAddr, kind: MessageType, arch: u16) -> Message {
    homelab::testing::pxe_request(rand::random(), mac, kind, arch, &GUID)
}

fn encode(m: &Message) -> Vec<u8> {
    let mut v = Vec::new();
    m.encode(&mut Encoder::new(&mut v)).unwrap();
    v
}

fn decode(bytes: &[u8]) -> Message {
    Message::decode(&mut Decoder::new(bytes)).unwrap()
}

/// Send each packet from `socket` to `to`, then collect replies for `wait`.
fn exchange(
    socket: &UdpSocket,
    to: SocketAddr,
    packets: &[Vec<u8>],
    wait: Duration,
) -> Vec<Vec<u8>> {
    for p in packets {
        socket.send_to(p, to).unwrap();
    }
    let deadline = Instant::now() + wait;
    let mut replies = Vec::new();
    let mut buf = [0u8; 2048];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => replies.push(buf[..n].to_vec()),
            Err(_) => break,
        }
    }
    replies
}

fn fname(m: &Message) -> String {
    // dhcproto keeps the terminating NUL of a decoded field.
    String::from_utf8_lossy(m.fname().unwrap_or_default())
        .trim_end_matches('\0')
        .to_string()
}

// ---- the loopback test (any user) ----

#[test]
fn loopback_server_answers_known_clients_and_records_the_rest() {
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let SocketAddr::V4(client_addr) = client.local_addr().unwrap() else {
        unreachable!()
    };
    let bind = BindOptions {
        address: Ipv4Addr::LOCALHOST,
        dhcp_port: 0,
        pxe_port: Some(0),
        interface: None,
        // "Broadcast" replies come back to our socket.
        broadcast: client_addr,
    };
    let (server, socks) = Server::start(DhcpMode::Proxy, Ipv4Addr::LOCALHOST, bind);
    let dhcp_addr = socks.dhcp_addr().unwrap();
    let pxe_addr = socks.pxe_addr().unwrap().unwrap();
    let wait = Duration::from_millis(500);

    // A known BIOS node: a proxy offer with the boot file, and it starts Booting.
    let replies = exchange(
        &client,
        dhcp_addr,
        &[encode(&pxe(NODE_MAC, MessageType::Discover, 0))],
        wait,
    );
    assert_eq!(replies.len(), 1);
    let offer = decode(&replies[0]);
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(fname(&offer), "undionly.kpxe");
    assert_eq!(
        offer.opts().get(OptionCode::VendorExtensions),
        Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
    );
    assert_eq!(
        server.state().node("node1").unwrap().unwrap().stage,
        Stage::Booting
    );
    assert_eq!(server.events("dhcp.offer").len(), 1);

    // Port 4011: the ACK comes back to the source.
    let replies = exchange(
        &client,
        pxe_addr,
        &[encode(&pxe(NODE_MAC, MessageType::Request, 7))],
        wait,
    );
    assert_eq!(replies.len(), 1);
    let ack = decode(&replies[0]);
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(fname(&ack), "ipxe.efi");

    // An unknown machine, three times: no answer, recorded once, one event.
    let stranger = encode(&pxe(STRANGER, MessageType::Discover, 7));
    let replies = exchange(
        &client,
        dhcp_addr,
        &[stranger.clone(), stranger.clone(), stranger],
        wait,
    );
    assert!(replies.is_empty(), "unknown clients get no answer");
    let found = server.state().discovered().unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].mac, STRANGER.to_string());
    assert_eq!(found[0].arch, Some(7));
    assert_eq!(server.events("dhcp.unknown-client").len(), 1);

    // Garbage first, then a valid request: still answered.
    let mut garbage = vec![
        vec![],
        vec![0xff; 10],
        vec![1; 400],
        encode(&pxe(NODE_MAC, MessageType::Discover, 0))[..250].to_vec(),
    ];
    let mut bad_hlen = encode(&pxe(NODE_MAC, MessageType::Discover, 0));
    bad_hlen[2] = 200;
    garbage.push(bad_hlen);
    let mut bad_opt = encode(&request(NODE_MAC, MessageType::Discover))[..240].to_vec();
    bad_opt.extend_from_slice(&[53, 1, 1, 80, 3, 1, 2, 3, 255]);
    garbage.push(bad_opt);
    garbage.push(encode(&pxe(NODE_MAC, MessageType::Discover, 0)));
    let replies = exchange(&client, dhcp_addr, &garbage, wait);
    assert_eq!(replies.len(), 1, "only the valid request is answered");
    assert!(server.alive());
}

#[test]
fn loopback_authoritative_lease_is_stored_before_the_ack() {
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let SocketAddr::V4(client_addr) = client.local_addr().unwrap() else {
        unreachable!()
    };
    let bind = BindOptions {
        address: Ipv4Addr::LOCALHOST,
        dhcp_port: 0,
        pxe_port: None,
        interface: None,
        broadcast: client_addr,
    };
    // The controller's address must lie in the subnet for authoritative mode.
    let (server, socks) = Server::start(DhcpMode::Authoritative, SERVER_IP, bind);
    let to = socks.dhcp_addr().unwrap();
    let wait = Duration::from_millis(500);
    let pool_client = MacAddr([2, 0, 0, 0, 0, 7]);
    let offer = decode(
        &exchange(
            &client,
            to,
            &[encode(&request(pool_client, MessageType::Discover))],
            wait,
        )[0],
    );
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 231, 0, 100));
    assert!(
        server
            .state()
            .lease_by_mac(&pool_client.to_string())
            .unwrap()
            .is_none(),
        "an offer is not a lease"
    );
    let mut req = request(pool_client, MessageType::Request);
    req.opts_mut()
        .insert(DhcpOption::ServerIdentifier(SERVER_IP));
    req.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
    let ack = decode(&exchange(&client, to, &[encode(&req)], wait)[0]);
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    let lease = server
        .state()
        .lease_by_mac(&pool_client.to_string())
        .unwrap()
        .unwrap();
    assert_eq!(lease.ip, "10.231.0.100");
    assert!(!lease.is_static);
    assert!(
        server.events("dhcp.ack").is_empty(),
        "ordinary clients write no events"
    );
}

// ---- the lab (root, network namespaces) ----

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The two namespaces of one lab test; deleted on drop.
struct Lab {
    server_ns: String,
    client_ns: String,
}

impl Lab {
    fn create() -> Result<Lab, String> {
        sweep_stale();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = format!("hl-dhcp-{}-{n}", std::process::id());
        let lab = Lab {
            server_ns: format!("{base}-s"),
            client_ns: format!("{base}-c"),
        };
        for ns in [&lab.server_ns, &lab.client_ns] {
            ip(&["netns", "add", ns])?;
        }
        let (s, c) = (lab.server_ns.as_str(), lab.client_ns.as_str());
        ip(&[
            "-n", s, "link", "add", SERVER_IF, "type", "veth", "peer", "name", CLIENT_IF, "netns",
            c,
        ])?;
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            SERVER_IF,
        ])?;
        ip(&[
            "-n",
            c,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            CLIENT_IF,
        ])?;
        for (ns, dev) in [(s, SERVER_IF), (s, "lo"), (c, CLIENT_IF), (c, "lo")] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(lab)
    }

    fn from_env() -> Lab {
        Lab {
            server_ns: std::env::var("HL_DHCP_SERVER_NS").unwrap(),
            client_ns: std::env::var("HL_DHCP_CLIENT_NS").unwrap(),
        }
    }

    /// A command run in the client namespace.
    fn client(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.client_ns, program]);
        c
    }

    /// Run this test binary's helper inside the client namespace: it sends
    /// `packets` to `to` from hc0 port 68 and returns what came back in `wait`.
    fn crafted(&self, to: SocketAddrV4, packets: &[Vec<u8>], wait: Duration) -> Vec<Message> {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = self.client(exe.to_str().unwrap());
        cmd.args(["--exact", "helper", "--nocapture", "--test-threads=1"])
            .env("HL_DHCP_HELPER", "client")
            .env("HL_DHCP_TO", to.to_string())
            .env("HL_DHCP_WAIT_MS", wait.as_millis().to_string())
            .env(
                "HL_DHCP_PACKETS",
                packets
                    .iter()
                    .map(hex::encode)
                    .collect::<Vec<_>>()
                    .join(","),
            );
        let out = run(cmd, wait + Duration::from_secs(30)).unwrap();
        assert!(
            out.status.success(),
            "helper failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            // The harness prints "test helper ... " before the first line.
            .filter_map(|l| l.split_once("REPLY ").map(|(_, hex)| hex))
            .map(|h| decode(&hex::decode(h.trim()).unwrap()))
            .collect()
    }

    fn set_client_mac(&self, mac: MacAddr) {
        ip(&[
            "-n",
            &self.client_ns,
            "link",
            "set",
            CLIENT_IF,
            "address",
            &mac.to_string(),
        ])
        .unwrap();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Namespaces left by a test process that was killed before its guard ran.
fn sweep_stale() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("hl-dhcp-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Run to completion, killed after `limit`.
fn run(mut cmd: Command, limit: Duration) -> std::io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            let _ = child.kill();
            return child.wait_with_output();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// Run `body` inside a fresh lab's server namespace. `needs` are programs
/// that must be installed.
fn lab_test(name: &str, needs: &[&str], body: impl FnOnce(&Lab)) {
    if std::env::var_os("HL_DHCP_SERVER_NS").is_some() {
        let lab = Lab::from_env();
        body(&lab);
        std::mem::forget(lab); // the parent owns the namespaces
        return;
    }
    let required = std::env::var("HOMELAB_REQUIRE_LAB").is_ok_and(|v| v == "1");
    let skip = |why: String| {
        if required {
            panic!("{name}: {why} (HOMELAB_REQUIRE_LAB=1)");
        }
        eprintln!("skipping {name}: {why}");
    };
    if !nix::unistd::geteuid().is_root() {
        return skip("needs root to create network namespaces".into());
    }
    if let Some(missing) = ["ip"].iter().chain(needs).find(|p| !which(p)) {
        return skip(format!("`{missing}` is not installed"));
    }
    let lab = match Lab::create() {
        Ok(l) => l,
        Err(e) => return skip(format!("cannot create network namespaces: {e}")),
    };
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.server_ns])
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("HL_DHCP_SERVER_NS", &lab.server_ns)
        .env("HL_DHCP_CLIENT_NS", &lab.client_ns);
    let out = run(cmd, Duration::from_secs(120)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- {name} in {} ---\n{stdout}\n{stderr}", lab.server_ns);
    assert!(
        out.status.success(),
        "{name} failed inside the namespace (see output above)"
    );
    assert!(
        stdout.contains("1 passed"),
        "{name} did not run inside the namespace:\n{stdout}"
    );
}

/// Not a test: the crafted client, run by [`Lab::crafted`] inside the client namespace.
#[test]
fn helper() {
    if std::env::var("HL_DHCP_HELPER").as_deref() != Ok("client") {
        return;
    }
    let to: SocketAddr = std::env::var("HL_DHCP_TO").unwrap().parse().unwrap();
    let wait = Duration::from_millis(std::env::var("HL_DHCP_WAIT_MS").unwrap().parse().unwrap());
    let packets: Vec<Vec<u8>> = std::env::var("HL_DHCP_PACKETS")
        .unwrap()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|h| hex::decode(h).unwrap())
        .collect();
    let socket = client_socket();
    for reply in exchange(&socket, to, &packets, wait) {
        println!("REPLY {}", hex::encode(reply));
    }
}

/// UDP 0.0.0.0:68 on hc0, allowed to broadcast.
fn client_socket() -> UdpSocket {
    homelab::testing::dhcp_client_socket(CLIENT_IF, None)
}

fn lab_server(mode: DhcpMode) -> Server {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("homelab=debug")
        .with_test_writer()
        .try_init();
    let bind = BindOptions {
        address: Ipv4Addr::UNSPECIFIED,
        dhcp_port: 67,
        pxe_port: Some(dhcp::PXE_PORT),
        interface: Some(SERVER_IF.into()),
        broadcast: SocketAddrV4::new(Ipv4Addr::BROADCAST, 68),
    };
    Server::start(mode, SERVER_IP, bind).0
}

/// A client script that writes its environment to `out` once bound.
fn recorder(dir: &Path, bound: &str, out: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("record.sh");
    fs::write(
        &script,
        format!("#!/bin/sh\ncase \"$1$reason\" in {bound}) env > '{}.tmp' && mv '{0}.tmp' '{0}' ;; esac\nexit 0\n", out.display()),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn env_file(path: &Path) -> BTreeMap<String, String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn udhcpc_gets_the_static_address_in_authoritative_mode() {
    lab_test(
        "udhcpc_gets_the_static_address_in_authoritative_mode",
        &["busybox"],
        |lab| {
            let server = lab_server(DhcpMode::Authoritative);
            lab.set_client_mac(NODE_MAC);
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("lease.env");
            let script = recorder(dir.path(), "bound", &out);
            let mut cmd = lab.client("busybox");
            cmd.args([
                "udhcpc", "-i", CLIENT_IF, "-n", "-q", "-f", "-t", "5", "-T", "1", "-s",
            ])
            .arg(&script);
            let result = run(cmd, Duration::from_secs(20)).unwrap();
            let lease = env_file(&out);
            assert!(
                result.status.success(),
                "udhcpc failed: {}{}",
                String::from_utf8_lossy(&result.stdout),
                String::from_utf8_lossy(&result.stderr)
            );
            assert_eq!(
                lease.get("ip").map(String::as_str),
                Some("10.231.0.11"),
                "{lease:?}"
            );
            assert_eq!(
                lease.get("subnet").map(String::as_str),
                Some("255.255.255.0")
            );
            assert_eq!(lease.get("router").map(|r| r.trim()), Some("10.231.0.1"));
            assert_eq!(lease.get("dns").map(|r| r.trim()), Some("10.231.0.1"));
            assert_eq!(
                lease.get("serverid").map(String::as_str),
                Some("10.231.0.1")
            );
            assert_eq!(lease.get("lease").map(String::as_str), Some("600"));
            let stored = server
                .state()
                .lease_by_mac(&NODE_MAC.to_string())
                .unwrap()
                .expect("lease stored");
            assert_eq!(stored.ip, "10.231.0.11");
            assert!(stored.is_static);
            assert!(!server.events("dhcp.ack").is_empty());
        },
    );
}

#[test]
fn dhclient_gets_a_pool_address_in_authoritative_mode() {
    lab_test(
        "dhclient_gets_a_pool_address_in_authoritative_mode",
        &["dhclient"],
        |lab| {
            let server = lab_server(DhcpMode::Authoritative);
            let mac = MacAddr([0x52, 0x54, 0x00, 0x23, 0x10, 0x42]);
            lab.set_client_mac(mac);
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("lease.env");
            let script = recorder(dir.path(), "BOUND", &out);
            let lf = dir.path().join("dhclient.leases");
            let pf = dir.path().join("dhclient.pid");
            let mut cmd = lab.client("dhclient");
            cmd.args(["-4", "-d", "-1", "-sf"])
                .arg(&script)
                .arg("-lf")
                .arg(&lf)
                .arg("-pf")
                .arg(&pf)
                .arg(CLIENT_IF);
            // dhclient stays in the foreground after binding: wait for the script's record.
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !out.exists() && Instant::now() < deadline && child.try_wait().unwrap().is_none()
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let result = child.wait_with_output().unwrap();
            let lease = env_file(&out);
            assert!(
                !lease.is_empty(),
                "dhclient got no lease: {}",
                String::from_utf8_lossy(&result.stderr)
            );
            assert_eq!(
                lease.get("new_ip_address").map(String::as_str),
                Some("10.231.0.100"),
                "{lease:?}"
            );
            assert_eq!(
                lease.get("new_subnet_mask").map(String::as_str),
                Some("255.255.255.0")
            );
            assert_eq!(
                lease.get("new_dhcp_server_identifier").map(String::as_str),
                Some("10.231.0.1")
            );
            assert_eq!(
                lease.get("new_dhcp_lease_time").map(String::as_str),
                Some("600")
            );
            let stored = server
                .state()
                .lease_by_mac(&mac.to_string())
                .unwrap()
                .expect("lease stored");
            assert_eq!(stored.ip, "10.231.0.100");
            assert!(!stored.is_static);
        },
    );
}

#[test]
fn unknown_pxe_client_gets_no_answer_in_proxy_mode_and_is_recorded() {
    lab_test(
        "unknown_pxe_client_gets_no_answer_in_proxy_mode_and_is_recorded",
        &[],
        |lab| {
            let server = lab_server(DhcpMode::Proxy);
            let bcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
            let stranger = encode(&pxe(STRANGER, MessageType::Discover, 7));
            let replies = lab.crafted(bcast, &[stranger.clone(), stranger], Duration::from_secs(2));
            assert!(
                replies.is_empty(),
                "an unknown MAC was answered: {replies:?}"
            );
            let found = server.state().discovered().unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].mac, STRANGER.to_string());
            assert_eq!(found[0].arch, Some(7));
            assert!(found[0].vendor_class.starts_with("PXEClient"));
            assert_eq!(
                server.events("dhcp.unknown-client").len(),
                1,
                "one event for the first sighting only"
            );

            // The same path answers a known node: a broadcast proxy offer.
            let replies = lab.crafted(
                bcast,
                &[encode(&pxe(NODE_MAC, MessageType::Discover, 0))],
                Duration::from_secs(2),
            );
            assert_eq!(replies.len(), 1);
            let offer = &replies[0];
            assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
            assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
            assert_eq!(offer.siaddr(), SERVER_IP);
            assert_eq!(fname(offer), "undionly.kpxe");
            assert_eq!(
                offer.opts().get(OptionCode::ClientMachineIdentifier),
                Some(&DhcpOption::ClientMachineIdentifier(GUID.to_vec()))
            );
            assert_eq!(
                server.state().node("node1").unwrap().unwrap().stage,
                Stage::Booting
            );

            // And on port 4011, unicast back to the client.
            let mut req = pxe(NODE_MAC, MessageType::Request, 7);
            req.set_ciaddr(CLIENT_IP);
            let replies = lab.crafted(
                SocketAddrV4::new(SERVER_IP, dhcp::PXE_PORT),
                &[encode(&req)],
                Duration::from_secs(2),
            );
            assert_eq!(replies.len(), 1);
            assert_eq!(replies[0].opts().msg_type(), Some(MessageType::Ack));
            assert_eq!(fname(&replies[0]), "ipxe.efi");
        },
    );
}

#[test]
fn malformed_packets_leave_the_server_answering() {
    lab_test("malformed_packets_leave_the_server_answering", &[], |lab| {
        let server = lab_server(DhcpMode::Proxy);
        let bcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
        let valid = encode(&pxe(NODE_MAC, MessageType::Discover, 0));
        let mut packets = vec![
            vec![0u8; 1],
            vec![0xff; 100],
            vec![1; 600],
            valid[..241].to_vec(),
        ];
        let mut bad_hlen = valid.clone();
        bad_hlen[2] = 255;
        packets.push(bad_hlen);
        let mut bad_option = valid[..240].to_vec();
        bad_option.extend_from_slice(&[53, 1, 1, 94, 7, 1, 2, 3, 4, 5, 6, 7, 81, 1, 0, 255]);
        packets.push(bad_option);
        let mut seed = 0x2545_f491_u32;
        for _ in 0..200 {
            let mut p = valid.clone();
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let at = (seed as usize) % p.len();
                p[at] = (seed >> 8) as u8;
            }
            packets.push(p);
        }
        lab.crafted(bcast, &packets, Duration::from_millis(500));
        assert!(server.alive(), "the server stopped");
        // A fresh transaction id tells its answer from late answers to the
        // mutated packets that were still valid requests.
        let mut last = pxe(NODE_MAC, MessageType::Discover, 0);
        last.set_xid(0x5eed_0001);
        let replies = lab.crafted(bcast, &[encode(&last)], Duration::from_secs(2));
        let ours: Vec<_> = replies.iter().filter(|r| r.xid() == 0x5eed_0001).collect();
        assert_eq!(ours.len(), 1, "no answer after the malformed packets");
        assert_eq!(fname(ours[0]), "undionly.kpxe");
    });
}

#[test]
fn a_busy_port_67_is_a_clear_error() {
    lab_test("a_busy_port_67_is_a_clear_error", &[], |_lab| {
        let _squatter = std::net::UdpSocket::bind("0.0.0.0:67").unwrap();
        let inv = inventory(DhcpMode::Proxy, SERVER_IP, Path::new("/nonexistent"));
        let err = dhcp::bind(&inv.controller).unwrap_err().to_string();
        assert!(
            err.contains("port 67 is in use") && err.contains("dnsmasq"),
            "{err}"
        );
        let mut bad = inv.controller.clone();
        bad.interface = "nosuch0".into();
        drop(_squatter);
        let err = dhcp::bind(&bad).unwrap_err().to_string();
        assert!(err.contains("no interface named `nosuch0`"), "{err}");
    });
}
