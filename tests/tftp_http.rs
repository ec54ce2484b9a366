//! TFTP against a real client (tftp-hpa) and hand-made packets, and the HTTP
//! router through tower, all on loopback.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use homelab::inventory::parse_str;
use homelab::netboot::{http, tftp, Shared};
use homelab::state::{Stage, State};
use homelab::templates::Templates;
use tower::ServiceExt;

struct Fixture {
    dir: tempfile::TempDir,
    shared: Arc<Shared>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ipxe = dir.path().join("ipxe");
    std::fs::create_dir(&ipxe).unwrap();
    // Distinct, non-repeating contents so a wrong block would show.
    let bin: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(ipxe.join("undionly.kpxe"), &bin).unwrap();
    std::fs::write(ipxe.join("ipxe.efi"), &bin[..70_001]).unwrap();
    std::fs::write(dir.path().join("secret.txt"), "not for you").unwrap();
    std::fs::write(dir.path().join("vmlinuz"), vec![1u8; 10_000]).unwrap();
    std::fs::write(
        dir.path().join("initrd.gz"),
        (0..5000u32).map(|i| i as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    let src = format!(
        "[controller]\ninterface = \"lo\"\naddress = \"127.0.0.1\"\ndhcp = \"off\"\nipxe_dir = \"{}\"\n\n\
         [cluster]\nk3s_version = \"v1.31.4+k3s1\"\n\n[os]\nimage = \"img.raw\"\nsha256 = \"{}\"\n\n\
         [nodes.prof]\nmac = \"52:54:00:00:00:01\"\nip = \"10.0.0.11\"\nrole = \"server\"\n\
         boot = {{ kernel = \"vmlinuz\", initrd = [\"initrd.gz\"], cmdline = \"quiet\" }}\n\n\
         [nodes.inst]\nmac = \"52:54:00:00:00:02\"\nip = \"10.0.0.12\"\nrole = \"agent\"\n",
        ipxe.display(),
        "ab".repeat(32)
    );
    std::fs::write(dir.path().join("img.raw"), b"x").unwrap();
    let inv_path = dir.path().join("inventory.toml");
    let loaded = parse_str(&src, &inv_path).unwrap_or_else(|d| panic!("{d}"));
    let state = State::open(&dir.path().join("state")).unwrap();
    let plan = homelab::plan::plan(&loaded.inventory, &[]);
    homelab::daemon::apply_plan(&state, &loaded.inventory, &plan).unwrap();
    Fixture {
        shared: Shared::new(state, loaded.inventory),
        dir,
    }
}

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

fn tftp_get(addr: SocketAddr, name: &str, out: &Path) -> std::process::Output {
    Command::new("timeout")
        .args([
            "20",
            "tftp",
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
    let mut p = vec![0, 1];
    for part in [name, "octet"]
        .into_iter()
        .chain(options.iter().flat_map(|(k, v)| [*k, *v]))
    {
        p.extend_from_slice(part.as_bytes());
        p.push(0);
    }
    p
}

#[test]
fn real_client_fetches_the_exact_bytes() {
    if !tftp_client_present() {
        return;
    }
    let f = fixture();
    let (addr, _stop) = start_tftp(f.shared.clone());
    let out = f.dir.path().join("got");
    let o = tftp_get(addr, "undionly.kpxe", &out);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(f.dir.path().join("ipxe/undionly.kpxe")).unwrap()
    );
    let start = Instant::now();
    while !f
        .shared
        .state
        .last_events(50, None)
        .unwrap()
        .iter()
        .any(|e| e.kind == "tftp.sent")
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no tftp.sent event"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn anything_but_the_ipxe_binaries_is_refused() {
    let f = fixture();
    let (addr, _stop) = start_tftp(f.shared.clone());
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let secret = f.dir.path().join("secret.txt");
    for name in [
        "../secret.txt",
        secret.to_str().unwrap(),
        "ipxe/../../secret.txt",
        "inventory.toml",
        "state/homelab.db",
    ] {
        c.send_to(&rrq(name, &[]), addr).unwrap();
        let mut buf = [0u8; 600];
        let (n, _) = c.recv_from(&mut buf).expect("an answer");
        assert_eq!(
            &buf[..2],
            &[0, 5],
            "{name}: an ERROR packet, got {:?}",
            &buf[..n.min(8)]
        );
    }
    // A write request.
    let mut wrq = rrq("ipxe.efi", &[]);
    wrq[1] = 2;
    c.send_to(&wrq, addr).unwrap();
    let mut buf = [0u8; 600];
    c.recv_from(&mut buf).expect("an answer");
    assert_eq!(&buf[..2], &[0, 5], "writes are refused");
    assert_eq!(
        std::fs::read(f.dir.path().join("ipxe/ipxe.efi"))
            .unwrap()
            .len(),
        70_001
    );
}

#[test]
fn blksize_and_tsize_options_are_acknowledged() {
    let f = fixture();
    let (addr, _stop) = start_tftp(f.shared.clone());
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.send_to(
        &rrq("ipxe.efi", &[("blksize", "1428"), ("tsize", "0")]),
        addr,
    )
    .unwrap();
    let mut buf = [0u8; 2000];
    let (n, from) = c.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..2], &[0, 6], "an OACK");
    let oack = String::from_utf8_lossy(&buf[2..n]).to_string();
    assert!(oack.contains("blksize\u{0}1428"), "{oack:?}");
    assert!(oack.contains("tsize\u{0}70001"), "{oack:?}");
    // Fetch it all with the negotiated block size.
    c.send_to(&[0, 4, 0, 0], from).unwrap();
    let mut got = Vec::new();
    loop {
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..2], &[0, 3]);
        got.extend_from_slice(&buf[4..n]);
        c.send_to(&[0, 4, buf[2], buf[3]], from).unwrap();
        if n - 4 < 1428 {
            break;
        }
    }
    assert_eq!(
        got,
        std::fs::read(f.dir.path().join("ipxe/ipxe.efi")).unwrap()
    );
}

#[test]
fn many_clients_at_once_and_aborted_transfers_do_not_block() {
    if !tftp_client_present() {
        return;
    }
    let f = fixture();
    let (addr, _stop) = start_tftp(f.shared.clone());
    // A storm of transfers that are started and never acknowledged, as PXE ROMs do.
    let storm: Vec<UdpSocket> = (0..30)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for s in &storm {
        s.send_to(&rrq("undionly.kpxe", &[]), addr).unwrap();
    }
    let want = std::fs::read(f.dir.path().join("ipxe/undionly.kpxe")).unwrap();
    let start = Instant::now();
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let out = f.dir.path().join(format!("got{i}"));
            std::thread::spawn(move || (tftp_get(addr, "undionly.kpxe", &out), out))
        })
        .collect();
    for h in handles {
        let (o, out) = h.join().unwrap();
        assert!(o.status.success(), "{o:?}");
        assert_eq!(std::fs::read(out).unwrap(), want);
    }
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "20 clients took {:?}",
        start.elapsed()
    );
}

async fn get(
    app: &axum::Router,
    uri: &str,
    range: Option<&str>,
) -> (StatusCode, Vec<u8>, axum::http::HeaderMap) {
    let mut req = Request::get(uri);
    if let Some(r) = range {
        req = req.header("range", r);
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

fn app(f: &Fixture) -> axum::Router {
    http::router(f.shared.clone(), Arc::new(Templates::new(None).unwrap()))
}

#[tokio::test]
async fn profile_script_names_its_initrd_and_serving_every_file_means_booted() {
    let f = fixture();
    let app = app(&f);
    let (s, body, _) = get(&app, "/boot/52-54-00-00-00-01.ipxe", None).await;
    assert_eq!(s, StatusCode::OK);
    let script = String::from_utf8(body).unwrap();
    assert!(script.starts_with("#!ipxe"));
    let kernel_line = script.lines().find(|l| l.starts_with("kernel ")).unwrap();
    assert!(
        kernel_line.contains("http://127.0.0.1:8080/files/prof/vmlinuz"),
        "{kernel_line}"
    );
    assert!(
        kernel_line.contains("initrd=initrd.gz"),
        "under UEFI the kernel line names the initrd: {kernel_line}"
    );
    assert!(kernel_line.contains("quiet"));
    assert!(script.contains("initrd --name initrd.gz http://127.0.0.1:8080/files/prof/initrd.gz"));
    assert_eq!(
        f.shared.state.node("prof").unwrap().unwrap().stage,
        Stage::Booting
    );

    let (s, body, h) = get(&app, "/files/prof/vmlinuz", None).await;
    assert_eq!((s, body.len()), (StatusCode::OK, 10_000));
    assert_eq!(h["content-length"], "10000");
    assert_eq!(
        f.shared.state.node("prof").unwrap().unwrap().stage,
        Stage::Booting,
        "not all files yet"
    );
    let (s, body, _) = get(&app, "/files/prof/initrd.gz", None).await;
    assert_eq!((s, body.len()), (StatusCode::OK, 5000));
    assert_eq!(
        f.shared.state.node("prof").unwrap().unwrap().stage,
        Stage::Booted
    );
    let kinds: Vec<String> = f
        .shared
        .state
        .last_events(20, Some("prof"))
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    for k in [
        "http.script",
        "stage.booting",
        "http.file-start",
        "http.file-done",
        "stage.booted",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} in {kinds:?}");
    }
}

#[tokio::test]
async fn range_requests_and_nothing_outside_the_profile() {
    let f = fixture();
    let app = app(&f);
    let (s, body, h) = get(&app, "/files/prof/initrd.gz", Some("bytes=100-199")).await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, (100..200u32).map(|i| i as u8).collect::<Vec<_>>());
    assert_eq!(h["content-range"], "bytes 100-199/5000");
    let (s, _, _) = get(&app, "/files/prof/initrd.gz", Some("bytes=9000-")).await;
    assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);
    for uri in [
        "/files/prof/secret.txt",
        "/files/prof/..%2Fsecret.txt",
        "/files/inst/vmlinuz",
        "/files/nope/vmlinuz",
        "/boot/ipxe/secret.txt",
        "/state/homelab.db",
    ] {
        let (s, _, _) = get(&app, uri, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
    }
    let (s, body, _) = get(&app, "/boot/ipxe/ipxe.efi", None).await;
    assert_eq!((s, body.len()), (StatusCode::OK, 70_001));
}

#[tokio::test]
async fn installed_nodes_boot_their_disk_and_reinstall_must_be_asked() {
    let f = fixture();
    let app = app(&f);
    let script = |b: Vec<u8>| String::from_utf8(b).unwrap();
    let (_, b, _) = get(&app, "/boot/52:54:00:00:00:02.ipxe", None).await;
    let s = script(b);
    assert!(
        s.contains("/install/52:54:00:00:00:02/vmlinuz") && s.contains("initrd=installer.img"),
        "{s}"
    );
    f.shared
        .state
        .set_stage("inst", Stage::Installed, "test")
        .unwrap();
    let (_, b, _) = get(&app, "/boot/52:54:00:00:00:02.ipxe", None).await;
    let s = script(b);
    assert!(
        s.contains("sanboot --no-describe --drive 0x80") && s.contains("exit"),
        "{s}"
    );
    assert!(
        !s.contains("kernel "),
        "an installed node never gets a kernel: {s}"
    );
    f.shared.state.set_reinstall("inst", true).unwrap();
    let (_, b, _) = get(&app, "/boot/52:54:00:00:00:02.ipxe", None).await;
    assert!(script(b).contains("/install/"), "reinstall on request");
}

#[tokio::test]
async fn unknown_machines_are_told_so_and_never_installed() {
    let f = fixture();
    let app = app(&f);
    let (s, b, _) = get(&app, "/boot/52:54:00:99:99:99.ipxe", None).await;
    assert_eq!(s, StatusCode::OK);
    let s = String::from_utf8(b).unwrap();
    assert!(
        s.contains("not in the homelab inventory") && s.contains("homelab discover"),
        "{s}"
    );
    assert!(
        !s.contains("kernel") && !s.contains("initrd") && !s.contains("sanboot"),
        "{s}"
    );
    let (s, _, _) = get(&app, "/boot/not-a-mac.ipxe", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = get(&app, "/phone-home/52:54:00:99:99:99", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = get(&app, "/phone-home/52:54:00:00:00:01", None).await;
    assert_eq!(s, StatusCode::OK);
}
