//! TFTP against a real client (tftp-hpa) and hand-made packets, and the HTTP
//! service through tower (`oneshot`) and over a real socket, all on loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use homelab::install::media::{Media, MediaState};
use homelab::inventory::parse_str;
use homelab::netboot::tftp::{self, Mode, Opcode};
use homelab::netboot::{http, Shared};
use homelab::state::{Event, Stage, State};
use homelab::templates::Templates;
use tower::ServiceExt;

const KERNEL_LEN: usize = 10_000;
const INITRD_LEN: usize = 5_000;
const BIG_LEN: usize = 32 << 20;
const HUGE_LEN: u64 = 256 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    shared: Arc<Shared>,
}

/// An inventory with a profile node (`prof`), a node to install (`inst`), a
/// node whose address is 127.0.0.2 (`local`, for TFTP events), two with big
/// profile files (`big`, `huge`); fake iPXE binaries; a state database.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ipxe = d.join("ipxe");
    std::fs::create_dir(&ipxe).unwrap();
    // Distinct, non-repeating contents so a wrong block would show.
    let bin: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(ipxe.join("undionly.kpxe"), &bin).unwrap();
    std::fs::write(ipxe.join("ipxe.efi"), &bin[..70_001]).unwrap();
    std::fs::write(d.join("secret.txt"), "not for you").unwrap();
    std::fs::write(d.join("vmlinuz"), vec![1u8; KERNEL_LEN]).unwrap();
    let initrd: Vec<u8> = (0..INITRD_LEN as u32).map(|i| i as u8).collect();
    std::fs::write(d.join("initrd.gz"), initrd).unwrap();
    std::fs::write(d.join("img.raw"), b"x").unwrap();
    // Sparse, and more than socket buffers hold: the server's pace follows the client's.
    std::fs::File::create(d.join("big.img"))
        .unwrap()
        .set_len(BIG_LEN as u64)
        .unwrap();
    std::fs::File::create(d.join("huge.img"))
        .unwrap()
        .set_len(HUGE_LEN)
        .unwrap();
    let src = format!(
        "[controller]\ninterface = \"lo\"\naddress = \"127.0.0.1\"\ndhcp = \"off\"\nipxe_dir = \"{}\"\n\n\
         [cluster]\nk3s_version = \"v1.31.4+k3s1\"\n\n[os]\nimage = \"img.raw\"\nsha256 = \"{}\"\n\n\
         [nodes.prof]\nmac = \"52:54:00:00:00:01\"\nip = \"10.0.0.11\"\nrole = \"server\"\n\
         boot = {{ kernel = \"vmlinuz\", initrd = [\"initrd.gz\"], cmdline = \"quiet\" }}\n\n\
         [nodes.inst]\nmac = \"52:54:00:00:00:02\"\nip = \"10.0.0.12\"\nrole = \"agent\"\n\n\
         [nodes.local]\nmac = \"52:54:00:00:00:03\"\nip = \"10.0.0.13\"\nrole = \"agent\"\n\n\
         [nodes.big]\nmac = \"52:54:00:00:00:04\"\nip = \"10.0.0.14\"\nrole = \"agent\"\n\
         boot = {{ kernel = \"big.img\", initrd = [] }}\n\n\
         [nodes.huge]\nmac = \"52:54:00:00:00:05\"\nip = \"10.0.0.15\"\nrole = \"agent\"\n\
         boot = {{ kernel = \"huge.img\", initrd = [] }}\n",
        ipxe.display(),
        "ab".repeat(32)
    );
    let mut loaded = parse_str(&src, &d.join("inventory.toml")).unwrap_or_else(|e| panic!("{e}"));
    // The loader refuses loopback node addresses; the test clients live on loopback.
    loaded.inventory.nodes.get_mut("local").unwrap().ip = "127.0.0.2".parse().unwrap();
    let state = State::open(&d.join("state")).unwrap();
    let plan = homelab::plan::plan(&loaded.inventory, &[]);
    homelab::daemon::apply_plan(&state, &loaded.inventory, &plan).unwrap();
    Fixture {
        shared: Shared::new(state, loaded.inventory),
        dir,
    }
}

impl Fixture {
    fn events(&self, node: Option<&str>) -> Vec<Event> {
        self.shared.state.last_events(10_000, node).unwrap()
    }
    fn kinds(&self, node: &str) -> Vec<String> {
        self.events(Some(node))
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }
    fn stage(&self, node: &str) -> Stage {
        self.shared.state.node(node).unwrap().unwrap().stage
    }
    fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(rel)).unwrap()
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- TFTP ----

/// Start TFTP on an ephemeral loopback port on a runtime of its own thread.
fn start_tftp(shared: Arc<Shared>) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(tftp::serve(shared, socket, rx)).unwrap();
    });
    (addr, tx)
}

fn tftp_get(addr: SocketAddr, name: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new("timeout")
        .args(["20", "tftp"])
        .args(extra)
        .args([
            "127.0.0.1",
            &addr.port().to_string(),
            "-m",
            "binary",
            "-c",
            "get",
            name,
        ])
        .arg(out)
        .output()
        .expect("tftp-hpa client (package tftp-hpa)")
}

fn tftp_client_present() -> bool {
    let ok = Command::new("sh")
        .args(["-c", "command -v tftp"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("HOMELAB_REQUIRE_LAB").is_err(),
            "tftp-hpa is required (scripts/deps.sh)"
        );
        eprintln!("skipping: the tftp client (tftp-hpa) is not installed");
    }
    ok
}

fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    tftp::Request {
        op: Opcode::Read,
        filename: name.into(),
        mode: Mode::Octet,
        options: options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
    .encode()
}

/// A hand-driven TFTP client on loopback address `ip`.
struct Client {
    sock: UdpSocket,
    buf: Vec<u8>,
}

impl Client {
    fn new(ip: &str) -> Client {
        let sock = UdpSocket::bind((ip, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        Client {
            sock,
            buf: vec![0; 70_000],
        }
    }
    fn send(&self, to: SocketAddr, pkt: &[u8]) {
        self.sock.send_to(pkt, to).unwrap();
    }
    /// The next packet: (opcode, the rest, its sender).
    fn recv(&mut self) -> (u16, Vec<u8>, SocketAddr) {
        let (n, from) = self
            .sock
            .recv_from(&mut self.buf)
            .expect("a packet from the server");
        let op = u16::from_be_bytes([self.buf[0], self.buf[1]]);
        (op, self.buf[2..n].to_vec(), from)
    }
    /// Options of an OACK, as "name=value" strings.
    fn oack(&mut self) -> (Vec<String>, SocketAddr) {
        let (op, rest, from) = self.recv();
        assert_eq!(op, 6, "an OACK, got opcode {op}: {rest:?}");
        let words: Vec<String> = rest
            .split(|b| *b == 0)
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        let opts = words
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| format!("{}={}", c[0], c[1]))
            .collect();
        (opts, from)
    }
    /// Receive a whole file, acknowledging each block; after an OACK from
    /// `oack_from`, start by acknowledging it (block 0).
    fn fetch(&mut self, oack_from: Option<SocketAddr>, blksize: usize) -> Vec<u8> {
        if let Some(from) = oack_from {
            self.send(from, &[0, 4, 0, 0]);
        }
        let mut got = Vec::new();
        loop {
            let (op, rest, from) = self.recv();
            assert_eq!(op, 3, "DATA");
            got.extend_from_slice(&rest[2..]);
            self.send(from, &[0, 4, rest[0], rest[1]]);
            if rest.len() - 2 < blksize {
                return got;
            }
        }
    }
}

fn same(got: &[u8], want: &[u8]) -> bool {
    got.len() == want.len() && got == want
}

#[test]
fn real_client_fetches_the_exact_bytes_and_the_transfer_is_recorded() {
    if !tftp_client_present() {
        return;
    }
    let f = fixture();
    let (addr, _stop) = start_tftp(f.shared.clone());
    let out = f.dir.path().join("got");
    let o = tftp_get(addr, "undionly.kpxe", &out, &[]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(std::fs::read(&out).unwrap(), f.read("ipxe/undionly.kpxe"));
    // tftp-hpa's client sends no options (blksize and tsize are tested with
    // hand-made requests below); a second file, verbose.
    let out2 = f.dir.path().join("got2");
    let o = tftp_get(addr, "ipxe.efi", &out2, &["-v"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(std::fs::read(&out2).unwrap(), f.read("ipxe/ipxe.efi"));
    wait_for("two tftp.sent events", Duration::from_secs(5), || {
        f.events(None)
            .iter()
            .filter(|e| e.kind == "tftp.sent")
            .count()
            == 2
    });
    let ev = f
        .events(None)
        .into_iter()
        .find(|e| e.kind == "tftp.sent")
        .unwrap();
    assert_eq!(ev.data["file"], "undionly.kpxe");
    assert_eq!(ev.data["bytes"], 200_000);
    assert_eq!(ev.node, None, "127.0.0.1 is no node's address");
}

#[test]
fn anything_but_the_ipxe_binaries_is_refused() {
    let f = fixture();
    let (addr, _stop) = start_tftp(f.shared.clone());
    let mut c = Client::new("127.0.0.1");
    let secret = f.dir.path().join("secret.txt");
    for (name, code) in [
        ("../secret.txt", 2),
        (secret.to_str().unwrap(), 2),
        ("/ipxe.efi", 2),
        ("ipxe/../../secret.txt", 2),
        ("../etc/passwd", 2),
        ("/etc/passwd", 2),
        ("inventory.toml", 1),
        ("state/homelab.db", 2),
        ("", 1),
    ] {
        c.send(addr, &rrq(name, &[]));
        let (op, rest, _) = c.recv();
        assert_eq!(op, 5, "{name:?}: an ERROR packet, got {op}");
        assert_eq!(u16::from_be_bytes([rest[0], rest[1]]), code, "{name:?}");
    }
    // A write request, even for a served name.
    let mut wrq = rrq("ipxe.efi", &[]);
    wrq[1] = 2;
    c.send(addr, &wrq);
    let (op, rest, _) = c.recv();
    assert_eq!(
        (op, rest[1]),
        (5, 2),
        "writes are refused (access violation)"
    );
    assert_eq!(f.read("ipxe/ipxe.efi").len(), 70_001);
    // Garbage is dropped, and the server still answers afterwards.
    c.send(addr, b"\x00\x01no terminator");
    c.send(addr, &[0xff; 40]);
    c.send(addr, &rrq("ipxe.efi", &[]));
    assert!(
        same(&c.fetch(None, 512), &f.read("ipxe/ipxe.efi")),
        "served after the garbage"
    );
}

#[test]
fn blksize_and_tsize_are_negotiated_and_limited() {
    let f = fixture();
    let (addr, _stop) = start_tftp(f.shared.clone());
    let want = f.read("ipxe/ipxe.efi");

    let mut c = Client::new("127.0.0.1");
    c.send(
        addr,
        &rrq("ipxe.efi", &[("blksize", "1428"), ("tsize", "0")]),
    );
    let (opts, from) = c.oack();
    assert_eq!(opts, ["blksize=1428", "tsize=70001"]);
    assert!(same(&c.fetch(Some(from), 1428), &want));

    // Larger than a frame: capped so PXE ROMs never see IP fragments.
    let mut c = Client::new("127.0.0.1");
    c.send(addr, &rrq("ipxe.efi", &[("blksize", "8192")]));
    let (opts, from) = c.oack();
    assert_eq!(opts, [format!("blksize={}", tftp::BLOCK_SIZE_LIMIT)]);
    assert!(same(
        &c.fetch(Some(from), tftp::BLOCK_SIZE_LIMIT as usize),
        &want
    ));

    // A client may not stretch the server's timeout, and gets one block at a time.
    let mut c = Client::new("127.0.0.1");
    c.send(
        addr,
        &rrq("ipxe.efi", &[("timeout", "255"), ("windowsize", "16")]),
    );
    let (opts, from) = c.oack();
    assert_eq!(opts, ["windowsize=1"]);
    assert!(same(&c.fetch(Some(from), 512), &want));
}

#[test]
fn many_clients_at_once_and_aborted_transfers_do_not_block() {
    if !tftp_client_present() {
        return;
    }
    let f = fixture();
    let (addr, _stop) = start_tftp(f.shared.clone());
    // A storm of transfers that are started and never acknowledged, as PXE ROMs do.
    let storm: Vec<UdpSocket> = (0..50)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for s in &storm {
        s.send_to(&rrq("undionly.kpxe", &[("tsize", "0")]), addr)
            .unwrap();
    }
    let want = f.read("ipxe/undionly.kpxe");
    let start = Instant::now();
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let out = f.dir.path().join(format!("got{i}"));
            std::thread::spawn(move || (tftp_get(addr, "undionly.kpxe", &out, &[]), out))
        })
        .collect();
    for h in handles {
        let (o, out) = h.join().unwrap();
        assert!(o.status.success(), "{o:?}");
        assert_eq!(std::fs::read(out).unwrap(), want);
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "20 clients took {took:?}");
    eprintln!("20 concurrent tftp-hpa clients beside 50 abandoned transfers: {took:?}");
    // Only the completed transfers are recorded, once each, after the
    // abandoned ones have been given up.
    std::thread::sleep(Duration::from_secs(5));
    let sent = f
        .events(None)
        .iter()
        .filter(|e| e.kind == "tftp.sent")
        .count();
    assert_eq!(sent, 20);
}

/// A PXE ROM asks with tsize, aborts after the OACK with an ERROR, and asks
/// again from the same port: it is served again within seconds (the ERROR
/// ends the old transfer), not after the old one is given up.
#[test]
fn an_aborted_transfer_from_the_same_port_is_retried_within_seconds() {
    let f = fixture();
    let (addr, _stop) = start_tftp(f.shared.clone());
    let mut c = Client::new("127.0.0.2");
    c.send(addr, &rrq("undionly.kpxe", &[("tsize", "0")]));
    let (opts, from) = c.oack();
    assert_eq!(opts, ["tsize=200000"]);
    c.send(from, b"\x00\x05\x00\x08abort\x00");
    let start = Instant::now();
    let mut c2 = Client::new("127.0.0.2");
    drop(std::mem::replace(&mut c2.sock, c.sock.try_clone().unwrap()));
    // Re-send the request every second until it is answered with DATA.
    let got = loop {
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "never answered again"
        );
        c.send(addr, &rrq("undionly.kpxe", &[("blksize", "1432")]));
        c.sock
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        match c.sock.recv_from(&mut c.buf) {
            Ok((_, from2)) if c.buf[..2] == [0, 6] && from2 != from => {
                c.sock
                    .set_read_timeout(Some(Duration::from_secs(6)))
                    .unwrap();
                break c.fetch(Some(from2), 1432);
            }
            _ => continue, // OACK re-sends of the abandoned transfer, or nothing yet
        }
    };
    let waited = start.elapsed();
    assert!(same(&got, &f.read("ipxe/undionly.kpxe")));
    assert!(waited < Duration::from_secs(6), "{waited:?}");
    eprintln!("re-request after an abort served after {waited:?}");
    // The completed transfer is recorded for the node at 127.0.0.2; the abandoned one is not.
    wait_for("tftp.sent", Duration::from_secs(3), || {
        f.kinds("local").contains(&"tftp.sent".into())
    });
    std::thread::sleep(Duration::from_secs(1));
    let sent: Vec<Event> = f
        .events(None)
        .into_iter()
        .filter(|e| e.kind == "tftp.sent")
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].node.as_deref(), Some("local"));
    assert_eq!(sent[0].data["bytes"], 200_000);
}

// ---- HTTP through tower ----

async fn get(
    app: &axum::Router,
    uri: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Vec<u8>, HeaderMap) {
    let mut req = Request::get(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .unwrap();
    (status, body.to_vec(), headers)
}

async fn post(app: &axum::Router, uri: &str, body: Vec<u8>) -> StatusCode {
    let req = Request::post(uri).body(Body::from(body)).unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

fn app(f: &Fixture) -> axum::Router {
    http::router(f.shared.clone(), Arc::new(Templates::new(None).unwrap()))
}

fn script(body: Vec<u8>) -> String {
    let s = String::from_utf8(body).unwrap();
    assert!(s.starts_with("#!ipxe\n"), "{s}");
    s
}

#[tokio::test]
async fn profile_script_names_its_initrd_and_serving_every_file_means_booted() {
    let f = fixture();
    let app = app(&f);
    let (s, body, h) = get(&app, "/boot/52-54-00-00-00-01.ipxe", &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let script = script(body);
    let kernel_line = script.lines().find(|l| l.starts_with("kernel ")).unwrap();
    assert!(
        kernel_line
            .starts_with("kernel http://127.0.0.1:8080/files/prof/vmlinuz initrd=initrd.gz quiet "),
        "under UEFI the kernel line names the initrd: {kernel_line}"
    );
    assert!(
        script.contains("\ninitrd --name initrd.gz http://127.0.0.1:8080/files/prof/initrd.gz ")
    );
    assert!(script.contains("\nboot "));
    assert_eq!(f.stage("prof"), Stage::Booting);
    // The same script for the MAC in any case and form.
    let (_, again, _) = get(&app, "/boot/52:54:00:00:00:01.ipxe", &[]).await;
    assert_eq!(String::from_utf8(again).unwrap(), script);

    let (s, body, h) = get(&app, "/files/prof/vmlinuz", &[]).await;
    assert_eq!((s, body.len()), (StatusCode::OK, KERNEL_LEN));
    assert_eq!(h["content-length"], KERNEL_LEN.to_string().as_str());
    assert_eq!(f.stage("prof"), Stage::Booting, "not all files yet");
    let (s, body, _) = get(&app, "/files/prof/initrd.gz", &[]).await;
    assert_eq!((s, body), (StatusCode::OK, f.read("initrd.gz")));
    assert_eq!(f.stage("prof"), Stage::Booted);
    let kinds = f.kinds("prof");
    let order = [
        "http.script",
        "stage.booting",
        "http.file-start",
        "http.file-done",
        "stage.booted",
    ];
    let mut at = 0;
    for k in order {
        at += kinds[at..]
            .iter()
            .position(|x| x == k)
            .unwrap_or_else(|| panic!("{k} after {at} in {kinds:?}"));
    }
    let done: Vec<Event> = f
        .events(Some("prof"))
        .into_iter()
        .filter(|e| e.kind == "http.file-done")
        .collect();
    assert_eq!(done.len(), 2);
    assert_eq!(
        (done[0].data["file"].clone(), done[0].data["bytes"].clone()),
        ("vmlinuz".into(), KERNEL_LEN.into())
    );
    // A second download does not mark it Booted again; the next script fetch starts a new boot.
    get(&app, "/files/prof/initrd.gz", &[]).await;
    assert_eq!(
        f.kinds("prof")
            .iter()
            .filter(|k| *k == "stage.booted")
            .count(),
        1
    );
    get(&app, "/boot/52:54:00:00:00:01.ipxe", &[]).await;
    assert_eq!(f.stage("prof"), Stage::Booting);
}

#[tokio::test]
async fn range_requests_and_nothing_outside_the_profile() {
    let f = fixture();
    let app = app(&f);
    let (s, body, h) = get(&app, "/files/prof/initrd.gz", &[("range", "bytes=100-199")]).await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, f.read("initrd.gz")[100..200]);
    assert_eq!(h["content-range"], "bytes 100-199/5000");
    assert_eq!(h["content-length"], "100");
    let (s, body, _) = get(&app, "/files/prof/initrd.gz", &[("range", "bytes=4990-")]).await;
    assert_eq!(
        (s, body),
        (
            StatusCode::PARTIAL_CONTENT,
            f.read("initrd.gz")[4990..].to_vec()
        )
    );
    let (s, _, _) = get(&app, "/files/prof/initrd.gz", &[("range", "bytes=9000-")]).await;
    assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);
    // A partial download neither completes the file nor counts toward Booted.
    assert!(!f
        .kinds("prof")
        .iter()
        .any(|k| k == "http.file-done" || k == "stage.booted"));
    // iPXE binaries over HTTP, with ranges too.
    let (s, body, _) = get(&app, "/boot/ipxe/ipxe.efi", &[]).await;
    assert_eq!((s, body), (StatusCode::OK, f.read("ipxe/ipxe.efi")));
    let (s, body, _) = get(&app, "/boot/ipxe/undionly.kpxe", &[("range", "bytes=-10")]).await;
    assert_eq!(
        (s, body),
        (
            StatusCode::PARTIAL_CONTENT,
            f.read("ipxe/undionly.kpxe")[199_990..].to_vec()
        )
    );
    for uri in [
        "/files/prof/secret.txt",
        "/files/prof/..%2Fsecret.txt",
        "/files/prof/..%2F..%2Fsecret.txt",
        "/files/prof/%2Fetc%2Fpasswd",
        "/files/prof/initrd.gz%00",
        "/files/inst/vmlinuz",
        "/files/nope/vmlinuz",
        "/files/..%2Fstate/homelab.db",
        "/boot/ipxe/secret.txt",
        "/boot/ipxe/..%2Fsecret.txt",
        "/boot/ipxe/ipxe.iso",
        "/state/homelab.db",
        "/secret.txt",
    ] {
        let (s, body, _) = get(&app, uri, &[]).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
        assert!(!body.starts_with(b"not for you"), "{uri}");
    }
}

/// A profile pointing into the state dir (where the secrets are) is refused.
#[tokio::test]
async fn nothing_under_the_state_dir_is_served() {
    let f = fixture();
    homelab::state::write_secret(f.shared.state.dir(), "k3s-token", b"hunter2").unwrap();
    let mut inv = (*f.shared.inventory()).clone();
    let prof = inv.nodes.get_mut("prof").unwrap().boot.as_mut().unwrap();
    prof.initrd = vec![
        f.shared.state.dir().join("secrets/k3s-token"),
        f.shared.state.dir().join("homelab.db"),
    ];
    f.shared.set_inventory(inv);
    let app = app(&f);
    for uri in ["/files/prof/k3s-token", "/files/prof/homelab.db"] {
        let (s, body, _) = get(&app, uri, &[]).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
        assert!(!body.windows(7).any(|w| w == b"hunter2"));
    }
}

#[tokio::test]
async fn installed_nodes_boot_their_disk_and_reinstall_must_be_asked() {
    let f = fixture();
    let app = app(&f);
    assert_eq!(f.stage("inst"), Stage::Pending);
    let (_, b, _) = get(&app, "/boot/52:54:00:00:00:02.ipxe", &[]).await;
    let s = script(b);
    assert!(
        s.contains("the controller is preparing the installer"),
        "{s}"
    );
    assert!(
        !s.contains("kernel "),
        "no installer before the media are ready: {s}"
    );
    f.shared
        .set_media(MediaState::Ready(std::sync::Arc::new(Media {
            installer: homelab::install::initramfs::Installer {
                kernel: "/nonexistent/vmlinuz".into(),
                initrd: "/nonexistent/initrd.img".into(),
                release: "test".into(),
                modules: vec![],
                missing: vec![],
            },
            image: "/nonexistent/image".into(),
            image_sha256: "ab".repeat(32),
            image_size: 1,
            compression: homelab::install::protocol::Compression::None,
        })));
    let (_, b, _) = get(&app, "/boot/52:54:00:00:00:02.ipxe", &[]).await;
    let s = script(b);
    let kernel_line = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
    let prefix =
        "kernel http://127.0.0.1:8080/install/52:54:00:00:00:02/vmlinuz initrd=initrd.img \
         homelab.mac=${mac} homelab.ip=${ip} homelab.netmask=${netmask} homelab.gateway=${gateway} \
         homelab.plan=http://127.0.0.1:8080/install/52:54:00:00:00:02/plan?token=";
    assert!(kernel_line.starts_with(prefix), "{kernel_line}");
    let token = &kernel_line[prefix.len()..][..64];
    // One-time: the token starts one attempt, and only one.
    assert!(matches!(
        f.shared.state.start_install("inst", token).unwrap(),
        homelab::state::InstallStart::Started(..)
    ));
    assert!(
        f.shared.state.start_install("inst", token).unwrap()
            == homelab::state::InstallStart::BadToken
    );
    assert_eq!(f.stage("inst"), Stage::Installing);
    f.shared
        .state
        .force_stage("inst", Stage::Booting, "test")
        .unwrap();
    assert!(s.contains(
        "\ninitrd --name initrd.img http://127.0.0.1:8080/install/52:54:00:00:00:02/initrd.img "
    ));
    assert_eq!(
        f.stage("inst"),
        Stage::Booting,
        "Pending moves to Booting on the first fetch"
    );

    f.shared
        .state
        .force_stage("inst", Stage::Installed, "test")
        .unwrap();
    let (_, b, _) = get(&app, "/boot/52:54:00:00:00:02.ipxe", &[]).await;
    let s = script(b);
    assert!(
        s.contains("sanboot --no-describe --drive 0x80") && s.contains("iseq ${platform} efi"),
        "{s}"
    );
    assert!(
        !s.contains("kernel ") && !s.contains("/install/"),
        "an installed node never gets a kernel: {s}"
    );
    assert_eq!(f.stage("inst"), Stage::Installed);

    f.shared.state.set_reinstall("inst", true).unwrap();
    let (_, b, _) = get(&app, "/boot/52:54:00:00:00:02.ipxe", &[]).await;
    assert!(
        script(b).contains("/install/52:54:00:00:00:02/vmlinuz"),
        "reinstall on request"
    );
    let scripts: Vec<String> = f
        .events(Some("inst"))
        .into_iter()
        .filter(|e| e.kind == "http.script")
        .map(|e| e.data["target"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        scripts,
        ["installer", "installer", "local-disk", "installer"]
    );
}

#[tokio::test]
async fn unknown_machines_are_told_so_and_never_installed() {
    let f = fixture();
    let app = app(&f);
    let before = f.events(None).len();
    let (s, b, _) = get(&app, "/boot/52:54:00:99:99:99.ipxe", &[]).await;
    assert_eq!(s, StatusCode::OK);
    let s = script(b);
    assert!(
        s.contains("(52:54:00:99:99:99) is not in the homelab inventory")
            && s.contains("homelab discover"),
        "{s}"
    );
    assert!(
        !s.contains("kernel") && !s.contains("initrd") && !s.contains("sanboot"),
        "{s}"
    );
    assert!(s.trim_end().ends_with("exit 1"), "{s}");
    for uri in [
        "/boot/not-a-mac.ipxe",
        "/boot/52:54:00:00:00:01",
        "/boot/52:54:00:00:00:01.ipxe.j2",
    ] {
        assert_eq!(get(&app, uri, &[]).await.0, StatusCode::NOT_FOUND, "{uri}");
    }
    assert_eq!(
        get(&app, "/phone-home/52:54:00:99:99:99", &[]).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        post(&app, "/phone-home/52:54:00:99:99:99", b"hi".to_vec()).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        f.events(None).len(),
        before,
        "nothing recorded for strangers"
    );
}

#[tokio::test]
async fn phone_home_is_recorded_with_its_small_body() {
    let f = fixture();
    let app = app(&f);
    assert_eq!(
        get(&app, "/phone-home/52:54:00:00:00:01", &[]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        post(
            &app,
            "/phone-home/52-54-00-00-00-01",
            br#"{"uptime": 3}"#.to_vec()
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        post(&app, "/phone-home/52:54:00:00:00:01", b"booted\n".to_vec()).await,
        StatusCode::OK
    );
    assert_eq!(
        post(
            &app,
            "/phone-home/52:54:00:00:00:01",
            vec![b'x'; http::BODY_LIMIT + 1]
        )
        .await,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let homes: Vec<Event> = f
        .events(Some("prof"))
        .into_iter()
        .filter(|e| e.kind == "node.phoned-home")
        .collect();
    assert_eq!(homes.len(), 3);
    assert!(homes[0].data.get("body").is_none());
    assert_eq!(homes[1].data["body"]["uptime"], 3);
    assert_eq!(homes[2].data["body"], "booted");
}

// ---- HTTP over a socket ----

/// `http::serve` on an ephemeral loopback port.
async fn start_http(
    f: &Fixture,
) -> (
    SocketAddr,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let templates = Arc::new(Templates::new(None).unwrap());
    let task = tokio::spawn(http::serve(f.shared.clone(), templates, listener, rx).map_ok());
    (addr, tx, task)
}

trait MapOk {
    fn map_ok(self) -> impl std::future::Future<Output = ()> + Send;
}
impl<F: std::future::Future<Output = anyhow::Result<()>> + Send> MapOk for F {
    async fn map_ok(self) {
        self.await.unwrap()
    }
}

/// Send a raw HTTP/1.1 request; the response head, and the stream to read the body from.
fn raw_request(addr: SocketAddr, request: &str) -> (String, TcpStream) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    (String::from_utf8(head).unwrap().to_ascii_lowercase(), s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_socket_files_have_a_length_progress_is_throttled_and_aborts_are_recorded() {
    let f = fixture();
    let (addr, stop, task) = start_http(&f).await;
    let f = Arc::new(f);
    let f2 = f.clone();
    tokio::task::spawn_blocking(move || {
        let f = f2;
        // The script, to the client's address.
        let (head, mut s) = raw_request(
            addr,
            "GET /boot/52:54:00:00:00:04.ipxe HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        );
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.contains("/files/big/big.img"), "{body}");
        let ev = f
            .events(Some("big"))
            .into_iter()
            .find(|e| e.kind == "http.script")
            .unwrap();
        assert_eq!(ev.data["client"], "127.0.0.1");

        // A 32 MiB file read at 16 MiB/s: a Content-Length on the wire (not
        // chunked), and a few progress events a second at most.
        let (head, mut s) = raw_request(addr, "GET /files/big/big.img HTTP/1.1\r\nhost: x\r\n\r\n");
        assert!(
            head.contains(&format!("content-length: {BIG_LEN}\r\n")),
            "{head}"
        );
        assert!(!head.contains("transfer-encoding"), "{head}");
        let start = Instant::now();
        let mut got = 0;
        let mut buf = vec![0u8; 256 << 10];
        while got < BIG_LEN {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got += n;
            let due = Duration::from_secs_f64(got as f64 / (16 << 20) as f64);
            std::thread::sleep(due.saturating_sub(start.elapsed()));
        }
        let took = start.elapsed();
        wait_for("booted", Duration::from_secs(5), || {
            f.stage("big") == Stage::Booted
        });
        let progress = f.kinds("big").iter().filter(|k| *k == "progress").count() as u128;
        let most = took.as_millis() / http::PROGRESS_EVERY.as_millis() + 2;
        assert!(
            (2..=most).contains(&progress),
            "{progress} progress events in {took:?}"
        );
        eprintln!("{progress} progress events over {took:?}");

        // A client that goes away mid-file: recorded as aborted, not done.
        let (head, mut s) =
            raw_request(addr, "GET /files/huge/huge.img HTTP/1.1\r\nhost: x\r\n\r\n");
        assert!(
            head.contains(&format!("content-length: {HUGE_LEN}\r\n")),
            "{head}"
        );
        s.read_exact(&mut buf).unwrap();
        drop(s);
        wait_for("http.file-aborted", Duration::from_secs(10), || {
            f.kinds("huge").contains(&"http.file-aborted".to_string())
        });
        assert!(!f.kinds("huge").contains(&"http.file-done".to_string()));
        assert_eq!(
            f.stage("huge"),
            Stage::Pending,
            "no script fetched, not booted"
        );

        // HEAD: the length, no body, nothing counted.
        let (head, _) = raw_request(addr, "HEAD /files/prof/vmlinuz HTTP/1.1\r\nhost: x\r\n\r\n");
        assert!(
            head.contains(&format!("content-length: {KERNEL_LEN}\r\n")),
            "{head}"
        );
        assert!(!f.kinds("prof").contains(&"http.file-start".to_string()));
    })
    .await
    .unwrap();
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("shuts down")
        .unwrap();
}
