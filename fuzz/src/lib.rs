//! The fuzz targets' bodies, one function per target taking the fuzzer's
//! bytes, each asserting a property of a parser of what the LAN (or the
//! user's inventory) sends. `fuzz_targets/*.rs` hand them to libFuzzer; the
//! main crate's `tests/fuzz_corpus.rs` includes this file and replays every
//! committed corpus and regression input through them in `cargo test`, so
//! the targets are built by every test run and a fixed crash stays fixed.
//!
//! Everything here runs the functions the servers run (the DHCP handler, the
//! TFTP parser, `netboot::http::input`, `inventory::parse_str`), against
//! inventories from `homelab::testing`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dhcproto::v4::Message;
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use homelab::install::protocol::Report;
use homelab::inventory::{BootProfile, DhcpMode, Inventory, MacAddr};
use homelab::netboot::dhcp::{handle, options, Binaries, LeaseTable, Port, RequestContext};
use homelab::netboot::http::input;
use homelab::netboot::tftp::{allowed_name, parse_request, SERVED};
use homelab::testing::Builder;

/// A target's body: the fuzzer's bytes in, a panic for a broken property.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/corpus/<name>/` and `fuzz/regressions/<name>/` name them.
pub const TARGETS: &[(&str, Target)] = &[
    ("dhcp_handler", dhcp_handler),
    ("tftp_request", tftp_request),
    ("agent_report", agent_report),
    ("phone_home", phone_home),
    ("http_path", http_path),
    ("inventory", inventory),
];

/// The fixed clock of [`dhcp_handler`].
pub const NOW: i64 = 1_700_000_000_000;
/// The node of the fixtures: `node1`, this MAC, 10.9.0.11.
pub const NODE_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x11]);

/// The fixtures' inventory: node1 and, with a boot profile, `prof`.
pub fn fixture_inventory(mode: DhcpMode) -> Inventory {
    let mut inv = Builder::new()
        .address("10.9.0.1")
        .controller(&format!(
            "dhcp = \"{}\"\nsubnet = \"10.9.0.0/24\"\ngateway = \"10.9.0.254\"\n\
             dns = [\"10.9.0.53\"]\npool = \"10.9.0.100-10.9.0.110\"",
            match mode {
                DhcpMode::Proxy => "proxy",
                DhcpMode::Authoritative => "authoritative",
                DhcpMode::Off => "off",
            }
        ))
        .node("node1", NODE_MAC, "10.9.0.11", "server")
        .node("prof", "52:54:00:00:00:12", "10.9.0.12", "agent")
        .build();
    // Set here, not in the text: the loader wants the files to exist.
    inv.nodes.get_mut("prof").expect("prof").boot = Some(BootProfile {
        kernel: "/srv/boot/vmlinuz".into(),
        initrd: vec!["/srv/boot/initrd.gz".into(), "/srv/other/initrd.gz".into()],
        cmdline: "console=ttyS0".into(),
    });
    inv
}

struct Dhcp {
    inventories: Vec<Inventory>,
    leases: LeaseTable,
    binaries: Binaries,
}

fn dhcp_fixture() -> &'static Dhcp {
    static F: OnceLock<Dhcp> = OnceLock::new();
    F.get_or_init(|| {
        let mut leases = LeaseTable::new();
        for i in 0..5u8 {
            let mac = MacAddr([2, 0, 0, 0, 0, i]);
            let ip = Ipv4Addr::new(10, 9, 0, 100 + i);
            match i % 3 {
                0 => leases.bind(mac, ip, NOW + 60_000, false),
                1 => leases.bind(mac, ip, NOW - 60_000, false),
                _ => leases.reserve(mac, ip, NOW + 1_000),
            }
        }
        leases.quarantine(Ipv4Addr::new(10, 9, 0, 106), NOW + 60_000);
        Dhcp {
            inventories: [DhcpMode::Proxy, DhcpMode::Authoritative, DhcpMode::Off]
                .into_iter()
                .map(fixture_inventory)
                .collect(),
            leases,
            binaries: Binaries::new(["undionly.kpxe", "ipxe.efi"]),
        }
    })
}

/// A DHCP packet through the decoder and the pure handler, in every mode and
/// on both ports, against a lease table with some history: a reply always
/// encodes, and decodes again to a message with the request's transaction.
pub fn dhcp_handler(data: &[u8]) {
    let Ok(req) = options::decode(data) else {
        return;
    };
    let f = dhcp_fixture();
    for inventory in &f.inventories {
        for port in [Port::Dhcp, Port::Pxe] {
            let ctx = RequestContext {
                inventory,
                mode: inventory.controller.dhcp,
                port,
                source: SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, 50), 68),
                leases: &f.leases,
                binaries: &f.binaries,
                now_ms: NOW,
            };
            let decision = handle(&req, &ctx);
            if let Some((reply, _)) = decision.reply() {
                let mut out = Vec::new();
                reply
                    .encode(&mut Encoder::new(&mut out))
                    .expect("a reply always encodes");
                let back = Message::decode(&mut Decoder::new(&out)).expect("a reply decodes");
                assert_eq!(
                    back.xid(),
                    req.xid(),
                    "a reply answers the request's transaction"
                );
            }
        }
    }
}

/// A TFTP request: whatever parses encodes back to bytes that parse to the
/// same request, and no file name but the exact names of the iPXE binaries
/// is ever allowed.
pub fn tftp_request(data: &[u8]) {
    if let Ok(req) = parse_request(data) {
        assert_eq!(parse_request(&req.encode()), Ok(req.clone()));
        let _ = (req.blksize(), req.tsize(), req.to_string());
        match allowed_name(Path::new(&req.filename)) {
            Some(name) => assert!(SERVED.contains(&name) && name == req.filename),
            None => assert!(!SERVED.contains(&req.filename.as_str())),
        }
    }
}

/// An install report body, and the bytes as log lines: a report that parses
/// serialises back to itself; what is recorded has no control character but
/// the newline, and a log report is exactly one line per line sent.
pub fn agent_report(data: &[u8]) {
    let mut json = axum::http::HeaderMap::new();
    json.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    let parsed = input::report(&json, data);
    assert_eq!(parsed, input::parse_report(data));
    if let Ok(report) = parsed {
        let again = serde_json::to_vec(&report).expect("a report serialises");
        let back = input::parse_report(&again).expect("a serialised report parses");
        assert!(
            same_report(&back, &report),
            "{report:?} came back as {back:?}"
        );
        let text = input::report_text(&report);
        assert_clean(&text);
        match &report {
            Report::Log { lines } => assert_lines(&text, lines.len()),
            Report::Failed { .. } => {}
            _ => assert!(!text.contains('\n'), "one line: {text:?}"),
        }
    }
    let raw = String::from_utf8_lossy(data);
    let lines: Vec<String> = raw.split('\n').map(str::to_string).collect();
    let text = input::log_text(&lines);
    assert_clean(&text);
    assert_lines(&text, lines.len());
}

/// Equal, but for `seconds` of `Done` within a rounding: serde_json (without
/// its `float_roundtrip` feature) may read a float one unit in the last place
/// off, and the seconds are only ever shown rounded to whole seconds.
fn same_report(a: &Report, b: &Report) -> bool {
    match (a, b) {
        (
            Report::Done {
                host_key: ka,
                bytes_written: wa,
                seconds: sa,
            },
            Report::Done {
                host_key: kb,
                bytes_written: wb,
                seconds: sb,
            },
        ) => ka == kb && wa == wb && (sa - sb).abs() <= sa.abs().max(sb.abs()) * 4.0 * f64::EPSILON,
        _ => a == b,
    }
}

fn assert_clean(text: &str) {
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "a control character is recorded: {text:?}"
    );
}

fn assert_lines(text: &str, n: usize) {
    let got = if text.is_empty() && n == 0 {
        0
    } else {
        text.split('\n').count()
    };
    assert_eq!(got, n, "{n} log lines recorded as {text:?}");
}

/// A phone-home body: the form read from it is the form it encodes (a
/// percent-encoded copy decodes to the same fields), and what is recorded is
/// the form's fields for cloud-init, else the body, else nothing.
pub fn phone_home(data: &[u8]) {
    let home = input::phone_home(data);
    let encoded = encode_form(&home.form);
    assert_eq!(
        input::form_urlencoded(encoded.as_bytes()),
        home.form,
        "{encoded:?}"
    );
    match &home.detail {
        Some(("form", v)) => {
            assert_eq!(
                v["pub_key_ed25519"].as_str(),
                Some(home.form["pub_key_ed25519"].as_str())
            )
        }
        Some(("body", _)) => {
            assert!(!data.is_empty() && !home.form.contains_key("pub_key_ed25519"))
        }
        Some((other, _)) => panic!("recorded as {other:?}"),
        None => assert!(data.is_empty()),
    }
}

/// Fields as `application/x-www-form-urlencoded`, every byte but
/// alphanumerics percent-encoded.
fn encode_form(form: &HashMap<String, String>) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    form.iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A request path, split and percent-decoded as the router does, through the
/// functions of each route: no file is ever resolved but an iPXE binary in
/// `ipxe_dir` or a file of the named node's boot profile, and a MAC in a URL
/// is only ever read from six hex pairs.
pub fn http_path(data: &[u8]) {
    static INV: OnceLock<Inventory> = OnceLock::new();
    let inv = INV.get_or_init(|| fixture_inventory(DhcpMode::Proxy));
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Some(segments) = path
        .strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .map(percent_decode)
        .collect::<Option<Vec<String>>>()
    else {
        return;
    };
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    // Each route's functions on the segments it would capture, and on every
    // segment anyway, so no prefix has to be found first.
    match s.as_slice() {
        ["boot", file] => check_script(file),
        ["boot", "ipxe", file] => check_ipxe(inv, file),
        ["files", node, name] => check_profile_file(inv, node, name),
        ["phone-home", mac] | ["install", mac, ..] => check_url_node(inv, mac),
        _ => {}
    }
    for seg in &s {
        check_script(seg);
        check_ipxe(inv, seg);
        check_url_node(inv, seg);
        assert!(input::installer_file(seg).is_none() || ["vmlinuz", "initrd.img"].contains(seg));
    }
    for pair in s.windows(2) {
        check_profile_file(inv, pair[0], pair[1]);
    }
}

fn check_script(file: &str) {
    if let Some(mac) = input::script_mac(file) {
        assert_eq!(file.len(), 22, "{file:?}");
        assert_eq!(
            file[..17].to_ascii_lowercase().replace('-', ":"),
            mac.to_string(),
            "{file:?} is read as {mac}"
        );
    }
}

fn check_ipxe(inv: &Inventory, file: &str) {
    let dir = &inv.controller.ipxe_dir;
    if let Some((name, path)) = input::ipxe_binary(dir, file) {
        assert!(SERVED.contains(&name) && file == name, "{file:?}");
        assert_eq!(path, dir.join(name));
        assert_eq!(path.parent(), Some(dir.as_path()));
    }
}

fn check_profile_file(inv: &Inventory, node: &str, name: &str) {
    if let Ok(f) = input::profile_file(inv, node, name) {
        assert_eq!(f.node.name, node);
        assert_eq!(f.file.name, name);
        let profile = f.node.boot.as_ref().expect("a profile");
        let allowed: Vec<&PathBuf> = std::iter::once(&profile.kernel)
            .chain(&profile.initrd)
            .collect();
        assert!(
            allowed.contains(&&f.file.path),
            "{node}/{name} is {:?}",
            f.file.path
        );
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !name.chars().all(|c| c == '.'),
            "{name:?} is served"
        );
    }
}

fn check_url_node(inv: &Inventory, mac: &str) {
    if let Some(node) = input::url_node(inv, mac) {
        assert_eq!(mac.len(), 17, "{mac:?}");
        assert_eq!(
            mac.to_ascii_lowercase().replace('-', ":"),
            node.mac.to_string()
        );
    }
}

/// Percent-decoding as the router applies it to a captured segment: `None`
/// when the result is not UTF-8 (the router answers 400 then).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Inventory text (a user's file): parsing never panics, a failure always
/// has an error, and every finding renders and points into the file (its
/// line and column exist, its snippet is that line).
pub fn inventory(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let diags = match homelab::inventory::parse_str(&text, Path::new("inventory.toml")) {
        Ok(loaded) => {
            assert!(loaded.inventory.nodes.iter().all(|(k, n)| *k == n.name));
            loaded.warnings
        }
        Err(d) => {
            assert!(d.has_errors(), "a failed load without an error");
            assert!(!d.to_string().is_empty());
            d.0
        }
    };
    let lines: Vec<&str> = text.split('\n').collect();
    for d in &diags {
        let shown = d.to_string();
        assert!(
            shown.starts_with("error: inventory.toml")
                || shown.starts_with("warning: inventory.toml")
        );
        if d.line == 0 {
            continue;
        }
        let line = lines
            .get(d.line - 1)
            .unwrap_or_else(|| panic!("line {} of {}", d.line, lines.len()));
        let line = line.strip_suffix('\r').unwrap_or(line);
        let snippet = d.snippet.as_ref().expect("a finding at a line shows it");
        assert_eq!(snippet.text, line, "{shown}");
        assert!(
            d.column >= 1 && d.column <= line.chars().count() + 1,
            "{shown}"
        );
    }
}
