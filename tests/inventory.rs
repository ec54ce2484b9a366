//! Inventory loading: one test per class of error, each asserting the exact line:column,
//! the dotted key and that a help line says how to fix it.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use homelab::inventory::{
    self, line_col, Algorithm, Checksum, DhcpMode, Diagnostic, Diagnostics, Digest, Disk, Loaded,
    Role, Severity,
};

const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// A small valid inventory. Line numbers matter to the tests below:
///  1 [controller]            9 [os]
///  2 interface = "eth0"     10 image = "https://..."
///  3 address = "..."        11 sha256 = "..."
///  4 subnet = "..."         12
///  5                        13 [nodes.node1]
///  6 [cluster]              14 mac = "..."
///  7 k3s_version = "..."    15 ip = "..."
///  8                        16 role = "server"
fn valid() -> String {
    format!(
        r#"[controller]
interface = "eth0"
address = "192.168.50.2"
subnet = "192.168.50.0/24"

[cluster]
k3s_version = "v1.31.4+k3s1"

[os]
image = "https://example.org/os.raw"
sha256 = "{SHA}"

[nodes.node1]
mac = "52:54:00:00:00:01"
ip = "192.168.50.11"
role = "server"
"#
    )
}

/// `valid()` with `from` (which must occur exactly once) replaced by `to`.
fn with(from: &str, to: &str) -> String {
    let v = valid();
    assert_eq!(v.matches(from).count(), 1, "{from:?} must occur once");
    v.replace(from, to)
}

fn parse(src: &str) -> Result<Loaded, Diagnostics> {
    inventory::parse_str(src, Path::new("inventory.toml"))
}

fn ok(src: &str) -> Loaded {
    match parse(src) {
        Ok(l) => l,
        Err(d) => panic!("expected a valid inventory, got:\n{d}"),
    }
}

fn errors(src: &str) -> Vec<Diagnostic> {
    match parse(src) {
        Ok(_) => panic!("expected errors, the inventory was accepted:\n{src}"),
        Err(d) => {
            d.0.into_iter()
                .filter(|d| d.severity == Severity::Error)
                .collect()
        }
    }
}

/// The only error of `src`.
fn one(src: &str) -> Diagnostic {
    let e = errors(src);
    assert_eq!(
        e.len(),
        1,
        "expected one error, got:\n{}",
        Diagnostics(e.clone())
    );
    e.into_iter().next().unwrap()
}

/// Assert position, key and message, and that help and the rendered form are present.
#[track_caller]
fn assert_diag(d: &Diagnostic, line: usize, column: usize, key: &str, message: &str) {
    assert_eq!(
        (d.line, d.column, d.key.as_str()),
        (line, column, key),
        "\n{d}"
    );
    assert!(
        d.message.contains(message),
        "message {:?} lacks {message:?}\n{d}",
        d.message
    );
    let help = d.help.as_deref().unwrap_or("");
    assert!(!help.is_empty(), "no help:\n{d}");
    let shown = d.to_string();
    assert!(shown.contains("= help: "), "{shown}");
    if line > 0 {
        assert!(
            shown.contains(&format!("inventory.toml:{line}:{column}: {key}: ")),
            "{shown}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The happy path.

#[test]
fn valid_inventory_loads_with_defaults() {
    let l = ok(&valid());
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    let inv = l.inventory;
    assert_eq!(inv.path, PathBuf::from("inventory.toml"));
    let c = &inv.controller;
    assert_eq!(c.interface, "eth0");
    assert_eq!(c.address, Ipv4Addr::new(192, 168, 50, 2));
    assert_eq!(c.dhcp, DhcpMode::Proxy);
    assert_eq!(c.http_port, 8080);
    assert!(c.tftp);
    assert_eq!(c.ipxe_dir, PathBuf::from("/usr/lib/ipxe"));
    assert_eq!(c.subnet, Some("192.168.50.0/24".parse().unwrap()));
    assert_eq!(
        (c.gateway, c.dns.len(), c.pool, c.lease_time),
        (None, 0, None, 3600)
    );
    assert_eq!(
        (inv.cluster.name.as_str(), inv.cluster.domain.as_str()),
        ("homelab", "home.arpa")
    );
    assert_eq!(inv.cluster.k3s_version, "v1.31.4+k3s1");
    assert_eq!(inv.os.image, "https://example.org/os.raw");
    assert_eq!(inv.os.checksum, Checksum::Digest(Digest::sha256(SHA)));
    let n = &inv.nodes["node1"];
    assert_eq!(n.name, "node1");
    assert_eq!(n.mac.to_string(), "52:54:00:00:00:01");
    assert_eq!(n.ip, Ipv4Addr::new(192, 168, 50, 11));
    assert_eq!(n.role, Role::Server);
    assert_eq!(n.disk, Disk::Auto);
    assert!(!n.power.wol && !n.reinstall && n.boot.is_none());
}

#[test]
fn every_key_is_read() {
    let src = r#"
[controller]
interface = "enp1s0"
address = "10.9.0.1"
dhcp = "authoritative"
http_port = 80
tftp = false
ipxe_dir = "/opt/ipxe"
subnet = "10.9.0.0/24"
gateway = "10.9.0.254"
dns = ["10.9.0.254", "1.1.1.1"]
pool = "10.9.0.100-10.9.0.199"
lease_time = 600

[cluster]
name = "lab-2"
domain = "lab.example.com"
k3s_version = "v1.30.8+k3s12"

[os]
image = "https://example.org/os.raw"
sha256 = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"

[nodes.a]
mac = "52-54-00-AA-00-01"
ip = "10.9.0.11"
role = "server"
disk = "/dev/nvme0n1"
power = { wol = true }
reinstall = true
"#;
    let inv = ok(src).inventory;
    let c = &inv.controller;
    assert_eq!(c.dhcp, DhcpMode::Authoritative);
    assert_eq!((c.http_port, c.tftp, c.lease_time), (80, false, 600));
    assert_eq!(c.ipxe_dir, PathBuf::from("/opt/ipxe"));
    assert_eq!(c.gateway, Some(Ipv4Addr::new(10, 9, 0, 254)));
    assert_eq!(
        c.dns,
        vec![Ipv4Addr::new(10, 9, 0, 254), Ipv4Addr::new(1, 1, 1, 1)]
    );
    assert_eq!(c.pool.unwrap().to_string(), "10.9.0.100-10.9.0.199");
    assert_eq!(
        (inv.cluster.name.as_str(), inv.cluster.domain.as_str()),
        ("lab-2", "lab.example.com")
    );
    assert_eq!(
        inv.os.checksum,
        Checksum::Digest(Digest::sha256(SHA)),
        "sha256 is normalised to lower case"
    );
    let n = &inv.nodes["a"];
    assert_eq!(n.mac.to_string(), "52:54:00:aa:00:01");
    assert_eq!(n.disk, Disk::Path("/dev/nvme0n1".into()));
    assert!(n.power.wol && n.reinstall);
}

#[test]
fn the_example_parses_without_warnings() {
    let l = match inventory::parse_str(inventory::EXAMPLE, Path::new("inventory.example.toml")) {
        Ok(l) => l,
        Err(d) => panic!("{d}"),
    };
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    let inv = l.inventory;
    assert_eq!(inv.nodes.len(), 3);
    assert_eq!(inv.servers().count(), 1);
    assert!(inv.nodes.values().any(|n| n.power.wol));
    assert!(inv
        .nodes
        .values()
        .all(|n| n.mac.to_string().starts_with("52:54:00:")));
}

#[test]
fn the_example_documents_every_key_and_its_authoritative_keys_work() {
    for key in [
        "interface",
        "address",
        "dhcp",
        "http_port",
        "tftp",
        "ipxe_dir",
        "subnet",
        "gateway",
        "dns",
        "pool",
        "lease_time",
        "name",
        "domain",
        "k3s_version",
        "image",
        "checksums",
        "sha256",
        "sha512",
        "installer_kernel",
        "installer_kernel_checksums",
        "installer_kernel_sha256",
        "mac",
        "ip",
        "role",
        "disk",
        "power",
        "reinstall",
        "boot",
        "kernel",
        "initrd",
        "cmdline",
        "labels",
        "taints",
    ] {
        assert!(
            inventory::EXAMPLE.contains(&format!("{key} ")),
            "the example does not document `{key}`"
        );
    }
    // Switch the example to authoritative mode with the commented keys enabled.
    let src = inventory::EXAMPLE
        .replace("dhcp = \"proxy\"", "dhcp = \"authoritative\"")
        .replace("# gateway = ", "gateway = ")
        .replace("# dns = ", "dns = ")
        .replace("# pool = ", "pool = ")
        .replace("# lease_time = ", "lease_time = ");
    let l = ok(&src);
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    assert!(l.inventory.controller.pool.is_some() && l.inventory.controller.gateway.is_some());
}

// ---------------------------------------------------------------------------------------
// One test per class of error.

#[test]
fn toml_syntax_error_has_its_position() {
    // An unterminated string: reported at the end of line 2.
    let d = one(&with("interface = \"eth0\"", "interface = \"eth0"));
    assert_diag(&d, 2, 18, "controller.interface", "invalid TOML");
    assert!(d.help.unwrap().contains("quote"));
}

#[test]
fn unquoted_value_gets_a_quoted_suggestion() {
    let d = one(&with(
        "address = \"192.168.50.2\"",
        "address = 192.168.50.2",
    ));
    assert_diag(&d, 3, 11, "controller.address", "invalid TOML");
    assert_eq!(d.snippet.as_ref().unwrap().width, "192.168.50.2".len());
    assert_eq!(
        d.help.as_deref(),
        Some("put text in double quotes: address = \"192.168.50.2\"")
    );
}

#[test]
fn node_defined_twice_names_the_first() {
    let src = format!("{}\n[nodes.node1]\nmac = \"52:54:00:00:00:02\"\n", valid());
    let d = one(&src);
    assert_diag(
        &d,
        18,
        8,
        "nodes.node1",
        "node `node1` is defined twice (first at line 13)",
    );
}

#[test]
fn key_set_twice_names_the_first() {
    let d = one(&with(
        "role = \"server\"\n",
        "role = \"server\"\nrole = \"agent\"\n",
    ));
    assert_diag(
        &d,
        17,
        1,
        "nodes.node1.role",
        "`role` is set twice in [nodes.node1] (first at line 16)",
    );
}

#[test]
fn unknown_key_with_did_you_mean() {
    // One error: the misspelt key is not also reported as missing.
    let d = one(&with("address = ", "adress = "));
    assert_diag(
        &d,
        3,
        1,
        "controller.adress",
        "unknown key `adress` in [controller]; did you mean `address`?",
    );
    assert!(d.help.as_deref().unwrap().contains("`address`"));
}

#[test]
fn unknown_keys_everywhere() {
    // At the top level.
    let d = one(&format!("{}\n[clustr]\nname = \"x\"\n", valid()));
    assert_diag(
        &d,
        18,
        2,
        "clustr",
        "unknown key `clustr` at the top level; did you mean `cluster`?",
    );
    // In a node, and in an inline table.
    let d = one(&with(
        "role = \"server\"",
        "role = \"server\"\npower = { wool = true }",
    ));
    assert_diag(
        &d,
        17,
        11,
        "nodes.node1.power.wool",
        "unknown key `wool` in [nodes.node1.power]; did you mean `wol`?",
    );
    // Without a close match: the help lists the valid keys.
    let d = one(&with(
        "role = \"server\"",
        "role = \"server\"\ncolour = \"blue\"",
    ));
    assert_diag(
        &d,
        17,
        1,
        "nodes.node1.colour",
        "unknown key `colour` in [nodes.node1]",
    );
    assert!(d.help.unwrap().contains("`mac`, `ip`, `role`"));
    // A common slip: wol directly in the node.
    let d = one(&with("role = \"server\"", "role = \"server\"\nwol = true"));
    assert_diag(&d, 17, 1, "nodes.node1.wol", "did you mean `power`?");
    assert!(d.help.unwrap().contains("power = { wol = true }"));
}

#[test]
fn wrong_types() {
    let d = one(&with("subnet = ", "http_port = \"8080\"\nsubnet = "));
    assert_diag(
        &d,
        4,
        13,
        "controller.http_port",
        "expected an integer, found a string",
    );
    assert!(d.help.unwrap().contains("http_port = 8080"));

    let d = one(&with("subnet = ", "tftp = \"yes\"\nsubnet = "));
    assert_diag(
        &d,
        4,
        8,
        "controller.tftp",
        "expected true or false, found a string",
    );

    let d = one(&with("subnet = ", "dns = \"1.1.1.1\"\nsubnet = "));
    assert_diag(
        &d,
        4,
        7,
        "controller.dns",
        "expected a list of addresses, found a string",
    );

    let d = one(&with(
        "role = \"server\"",
        "role = \"server\"\nreinstall = 1",
    ));
    assert_diag(
        &d,
        17,
        13,
        "nodes.node1.reinstall",
        "expected true or false, found an integer",
    );

    let d = one(&with(
        "role = \"server\"",
        "role = \"server\"\npower = true",
    ));
    assert_diag(
        &d,
        17,
        9,
        "nodes.node1.power",
        "expected a table, found a boolean",
    );

    let d = one(&format!(
        "cluster = 3\n{}",
        with("[cluster]\nk3s_version = \"v1.31.4+k3s1\"\n", "")
    ));
    assert_diag(&d, 1, 11, "cluster", "expected a table, found an integer");

    // A malformed [os] is one error, not also "missing [os]".
    let without_os = valid().replace(
        &format!("[os]\nimage = \"https://example.org/os.raw\"\nsha256 = \"{SHA}\"\n"),
        "",
    );
    let d = one(&format!("os = \"debian\"\n{without_os}"));
    assert_diag(&d, 1, 6, "os", "expected a table, found a string");
}

#[test]
fn out_of_range_integers() {
    let d = one(&with("subnet = ", "http_port = 70000\nsubnet = "));
    assert_diag(&d, 4, 13, "controller.http_port", "70000 is out of range");
    assert!(d.help.unwrap().contains("1 to 65535"));
}

#[test]
fn missing_required_keys_point_at_the_table_header() {
    let d = one(&with("interface = \"eth0\"\n", ""));
    assert_diag(
        &d,
        1,
        1,
        "controller.interface",
        "missing `interface` in [controller]",
    );
    assert!(d.help.unwrap().contains("interface = \"eth0\""));

    let d = one(&with("role = \"server\"\n", ""));
    assert_diag(
        &d,
        13,
        1,
        "nodes.node1.role",
        "missing `role` in [nodes.node1]",
    );
    let shown = d.to_string();
    assert!(
        shown.contains("13 | [nodes.node1]\n   | ^^^^^^^^^^^^^"),
        "{shown}"
    );

    let d = one(&with("k3s_version = \"v1.31.4+k3s1\"\n", ""));
    assert_diag(
        &d,
        6,
        1,
        "cluster.k3s_version",
        "missing `k3s_version` in [cluster]",
    );
}

#[test]
fn missing_tables_are_whole_file_errors() {
    let src = valid().replace("[controller]\ninterface = \"eth0\"\naddress = \"192.168.50.2\"\nsubnet = \"192.168.50.0/24\"\n", "");
    let d = one(&src);
    assert_diag(&d, 0, 0, "controller", "missing [controller] table");
    assert_eq!(
        d.to_string().lines().next().unwrap(),
        "error: inventory.toml: controller: missing [controller] table"
    );

    let src = valid().replace(
        &format!("[os]\nimage = \"https://example.org/os.raw\"\nsha256 = \"{SHA}\"\n"),
        "",
    );
    let d = one(&src);
    assert_diag(
        &d,
        0,
        0,
        "os",
        "missing [os] table; `node1` install the OS from it",
    );
}

#[test]
fn duplicate_mac_points_at_the_second_and_names_the_first() {
    let src = format!("{}\n[nodes.node2]\nmac = \"52:54:00:00:00:01\"\nip = \"192.168.50.12\"\nrole = \"agent\"\n", valid());
    let d = one(&src);
    assert_diag(
        &d,
        19,
        7,
        "nodes.node2.mac",
        "MAC 52:54:00:00:00:01 is already used by node `node1` (line 14)",
    );
}

#[test]
fn duplicate_mac_is_found_whatever_its_spelling() {
    // Sorted by name node0 comes first, but node0 is written second: it is the duplicate.
    let src = format!("{}\n[nodes.node0]\nmac = \"52-54-00-00-00-01\"\nip = \"192.168.50.12\"\nrole = \"agent\"\n", valid());
    let d = one(&src);
    assert_diag(&d, 19, 7, "nodes.node0.mac", "already used by node `node1`");
}

#[test]
fn duplicate_ip_points_at_the_second_and_names_the_first() {
    let src = format!("{}\n[nodes.node2]\nmac = \"52:54:00:00:00:02\"\nip = \"192.168.50.11\"\nrole = \"agent\"\n", valid());
    let d = one(&src);
    assert_diag(
        &d,
        20,
        6,
        "nodes.node2.ip",
        "address 192.168.50.11 is already used by node `node1` (line 15)",
    );
}

#[test]
fn malformed_mac() {
    let d = one(&with("52:54:00:00:00:01", "52:54:00:zz:00:01"));
    assert_diag(
        &d,
        14,
        7,
        "nodes.node1.mac",
        "`52:54:00:zz:00:01` is not a MAC address",
    );
    assert_eq!(
        d.help.as_deref(),
        Some("write six hex pairs such as \"52:54:00:12:34:56\"")
    );
    assert_eq!(
        d.to_string(),
        "error: inventory.toml:14:7: nodes.node1.mac: `52:54:00:zz:00:01` is not a MAC address\n   |\n\
         14 | mac = \"52:54:00:zz:00:01\"\n   |       ^^^^^^^^^^^^^^^^^^^\n   = help: write six hex pairs such as \"52:54:00:12:34:56\""
    );
    let d = one(&with("52:54:00:00:00:01", "01:00:5e:00:00:01"));
    assert_diag(&d, 14, 7, "nodes.node1.mac", "multicast");
}

#[test]
fn malformed_ip() {
    let d = one(&with("ip = \"192.168.50.11\"", "ip = \"192.168.50.300\""));
    assert_diag(
        &d,
        15,
        6,
        "nodes.node1.ip",
        "`192.168.50.300` is not an IPv4 address",
    );

    let d = one(&with("ip = \"192.168.50.11\"", "ip = \"192.168.50.11/24\""));
    assert_diag(&d, 15, 6, "nodes.node1.ip", "is not an IPv4 address");
    assert!(d.help.unwrap().contains("without a prefix length"));

    let d = one(&with(
        "address = \"192.168.50.2\"",
        "address = \"127.0.0.1\"",
    ));
    assert_diag(&d, 3, 11, "controller.address", "is a loopback address");
}

#[test]
fn node_ip_outside_the_subnet() {
    let d = one(&with("192.168.50.11", "192.168.51.11"));
    assert_diag(
        &d,
        15,
        6,
        "nodes.node1.ip",
        "`192.168.51.11` is outside the subnet 192.168.50.0/24",
    );
    assert!(d.help.unwrap().contains("192.168.50.1-192.168.50.254"));
    // Without a subnet nothing can be checked.
    ok(&with("192.168.50.11", "192.168.51.11").replace("subnet = \"192.168.50.0/24\"\n", ""));
}

#[test]
fn node_ip_is_the_controller_network_or_broadcast() {
    let d = one(&with("192.168.50.11", "192.168.50.2"));
    assert_diag(
        &d,
        15,
        6,
        "nodes.node1.ip",
        "`192.168.50.2` is the controller's own address",
    );
    let d = one(&with("192.168.50.11", "192.168.50.0"));
    assert_diag(
        &d,
        15,
        6,
        "nodes.node1.ip",
        "is the network address of 192.168.50.0/24",
    );
    let d = one(&with("192.168.50.11", "192.168.50.255"));
    assert_diag(
        &d,
        15,
        6,
        "nodes.node1.ip",
        "is the broadcast address of 192.168.50.0/24",
    );
}

#[test]
fn controller_address_outside_the_subnet() {
    let d = one(&with(
        "address = \"192.168.50.2\"",
        "address = \"10.0.0.2\"",
    ));
    assert_diag(
        &d,
        3,
        11,
        "controller.address",
        "`10.0.0.2` is outside the subnet",
    );
}

fn authoritative(extra: &str) -> String {
    with(
        "subnet = ",
        &format!("dhcp = \"authoritative\"\n{extra}\nsubnet = "),
    )
}

#[test]
fn pool_outside_the_subnet() {
    let d = one(&authoritative("pool = \"192.168.50.200-192.168.51.10\""));
    assert_diag(
        &d,
        5,
        8,
        "controller.pool",
        "the pool 192.168.50.200-192.168.51.10 is not inside the host addresses",
    );
}

#[test]
fn pool_overlapping_static_addresses() {
    let d = one(&authoritative("pool = \"192.168.50.10-192.168.50.20\""));
    assert_diag(
        &d,
        5,
        8,
        "controller.pool",
        "overlaps static addresses: node `node1` (192.168.50.11)",
    );
    let d = one(&authoritative("pool = \"192.168.50.1-192.168.50.5\""));
    assert_diag(&d, 5, 8, "controller.pool", "the controller (192.168.50.2)");
}

#[test]
fn malformed_pool() {
    let d = one(&authoritative("pool = \"192.168.50.20-192.168.50.10\""));
    assert_diag(
        &d,
        5,
        8,
        "controller.pool",
        "the range starts after it ends",
    );
    assert_eq!(d.help.as_deref(), Some("swap the two ends"));
    let d = one(&authoritative("pool = \"192.168.50.20\""));
    assert_diag(&d, 5, 8, "controller.pool", "is not a range");
}

#[test]
fn gateway_outside_the_subnet() {
    let d = one(&authoritative("gateway = \"192.168.1.1\""));
    assert_diag(
        &d,
        5,
        11,
        "controller.gateway",
        "`192.168.1.1` is outside the subnet 192.168.50.0/24",
    );
}

#[test]
fn authoritative_mode_without_subnet() {
    let src = with(
        "subnet = \"192.168.50.0/24\"\n",
        "dhcp = \"authoritative\"\n",
    );
    let d = one(&src);
    assert_diag(
        &d,
        4,
        8,
        "controller.subnet",
        "dhcp = \"authoritative\" needs the network's `subnet`",
    );
}

#[test]
fn bad_dhcp_mode_suggests_the_closest() {
    let d = one(&with("subnet = ", "dhcp = \"authorative\"\nsubnet = "));
    assert_diag(
        &d,
        4,
        8,
        "controller.dhcp",
        "`authorative` is not a DHCP mode; did you mean \"authoritative\"?",
    );
}

#[test]
fn bad_subnet() {
    let d = one(&with("192.168.50.0/24", "192.168.50.0"));
    assert_diag(
        &d,
        4,
        10,
        "controller.subnet",
        "`192.168.50.0` is not a subnet",
    );
    assert!(d.help.unwrap().contains("192.168.50.0/24"));
}

#[test]
fn no_server_node() {
    let d = one(&with("role = \"server\"", "role = \"agent\""));
    assert_diag(
        &d,
        16,
        8,
        "nodes.node1.role",
        "no node has role = \"server\"",
    );
    // No nodes at all is valid (machines are discovered and adopted later), with a warning.
    let l = ok(&valid().replace(
        "[nodes.node1]\nmac = \"52:54:00:00:00:01\"\nip = \"192.168.50.11\"\nrole = \"server\"\n",
        "",
    ));
    assert!(l.inventory.nodes.is_empty());
    assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
    assert!(l.warnings[0].message.contains("no nodes yet"));
    assert!(l.warnings[0]
        .help
        .as_deref()
        .unwrap()
        .contains("homelab discover --adopt"));
}

#[test]
fn bad_role_suggests_k3s_words() {
    let d = one(&with("role = \"server\"", "role = \"master\""));
    assert_diag(
        &d,
        16,
        8,
        "nodes.node1.role",
        "`master` is not a role; did you mean \"server\"?",
    );
}

#[test]
fn labels_and_taints_are_read_and_checked_like_the_kubelet() {
    let l = ok(&format!(
        "{}labels = {{ disk = \"ssd\", \"topology.kubernetes.io/zone\" = \"rack-1\" }}\n\
         taints = [\"dedicated=gpu:NoSchedule\", \"example.com/maint:NoExecute\"]\n",
        valid()
    ));
    let n = &l.inventory.nodes["node1"];
    assert_eq!(n.labels["disk"], "ssd");
    assert_eq!(n.labels["topology.kubernetes.io/zone"], "rack-1");
    let taints: Vec<String> = n.taints.iter().map(ToString::to_string).collect();
    assert_eq!(
        taints,
        ["dedicated=gpu:NoSchedule", "example.com/maint:NoExecute"]
    );

    // Line 17 is the first line after valid(); columns point at the culprit.
    let d = one(&format!(
        "{}labels = {{ \"disk type\" = \"ssd\" }}\n",
        valid()
    ));
    assert_diag(
        &d,
        17,
        12,
        "nodes.node1.labels.disk type",
        "label key `disk type` has a name that contains characters",
    );
    let d = one(&format!("{}labels = {{ disk = \"fast!\" }}\n", valid()));
    assert_diag(
        &d,
        17,
        19,
        "nodes.node1.labels.disk",
        "label value `fast!` contains characters",
    );
    let d = one(&format!("{}labels = {{ disk = 3 }}\n", valid()));
    assert_diag(
        &d,
        17,
        19,
        "nodes.node1.labels.disk",
        "expected the label's value in quotes, found an integer",
    );
    let d = one(&format!(
        "{}labels = {{ \"node-role.kubernetes.io/worker\" = \"true\" }}\n",
        valid()
    ));
    assert_diag(
        &d,
        17,
        12,
        "nodes.node1.labels.node-role.kubernetes.io/worker",
        "the kubelet refuses to set",
    );
    let d = one(&format!(
        "{}labels = {{ \"homelab.role\" = \"x\" }}\n",
        valid()
    ));
    assert_diag(
        &d,
        17,
        12,
        "nodes.node1.labels.homelab.role",
        "set by homelab",
    );
    let d = one(&format!("{}taints = [\"dedicated=gpu\"]\n", valid()));
    assert_diag(&d, 17, 11, "nodes.node1.taints", "has no effect");
    let d = one(&format!(
        "{}taints = [\"a:NoSchedule\", \"a=b:NoSchedule\"]\n",
        valid()
    ));
    assert_diag(
        &d,
        17,
        27,
        "nodes.node1.taints",
        "repeats the key and effect",
    );
    let d = one(&format!("{}taints = \"a:NoSchedule\"\n", valid()));
    assert_diag(
        &d,
        17,
        10,
        "nodes.node1.taints",
        "expected a list of taints, found a string",
    );
}

#[test]
fn even_number_of_servers_is_a_warning_not_an_error() {
    let src = format!("{}\n[nodes.node2]\nmac = \"52:54:00:00:00:02\"\nip = \"192.168.50.12\"\nrole = \"server\"\n", valid());
    let l = ok(&src);
    assert_eq!(l.inventory.servers().count(), 2);
    assert_eq!(l.warnings.len(), 1);
    let w = &l.warnings[0];
    assert_eq!(w.severity, Severity::Warning);
    assert_diag(
        w,
        21,
        8,
        "nodes.node2.role",
        "2 servers tolerate no failure; use 1 or 3",
    );
    assert!(w.to_string().starts_with("warning: inventory.toml:21:8: "));
}

#[test]
fn warnings_travel_with_errors() {
    // An ignored proxy-mode key (warning) and a bad MAC (error): both reported.
    let src = with(
        "subnet = ",
        "pool = \"192.168.50.100-192.168.50.199\"\nsubnet = ",
    )
    .replace("00:00:01\"", "00:00:zz\"");
    let d = parse(&src).unwrap_err();
    assert_eq!(d.errors().count(), 1);
    assert_eq!(d.warnings().count(), 1);
    let w = d.warnings().next().unwrap();
    assert_diag(
        w,
        4,
        1,
        "controller.pool",
        "only used when dhcp = \"authoritative\"",
    );
}

#[test]
fn bad_k3s_versions() {
    let d = one(&with("v1.31.4+k3s1", "1.31.4+k3s1"));
    assert_diag(
        &d,
        7,
        15,
        "cluster.k3s_version",
        "`1.31.4+k3s1` is not a k3s version",
    );
    assert!(d.help.unwrap().contains("\"v1.31.4+k3s1\""));
    let d = one(&with("v1.31.4+k3s1", "v1.31.4"));
    assert!(d.help.unwrap().contains("v1.31.4+k3s1"));
    let d = one(&with("v1.31.4+k3s1", "latest"));
    assert_diag(
        &d,
        7,
        15,
        "cluster.k3s_version",
        "`latest` is not a k3s version",
    );
}

#[test]
fn os_image_and_checksum() {
    let d = one(&with("https://example.org", "http://example.org"));
    assert_diag(&d, 10, 9, "os.image", "plain http:// URL");
    let help = d.help.unwrap();
    assert!(
        help.contains("https://example.org/os.raw") && help.contains("local mirror"),
        "{help}"
    );

    let d = one(&with(SHA, "abc123"));
    assert_diag(
        &d,
        11,
        10,
        "os.sha256",
        "`abc123` is not a sha256 checksum (6 hex characters; a sha256 has 64)",
    );

    // Placeholders are refused where they are written, with the way to the real one.
    for placeholder in ["0".repeat(64), "f".repeat(64)] {
        let d = one(&with(SHA, &placeholder));
        assert_diag(&d, 11, 10, "os.sha256", "a placeholder");
        let help = d.help.unwrap();
        assert!(
            help.contains("sha256sum FILE") && help.contains("checksums = "),
            "{help}"
        );
    }
    let d = one(&with(
        &format!("sha256 = \"{SHA}\""),
        &format!("sha512 = \"{}\"", "0".repeat(128)),
    ));
    assert_diag(&d, 11, 10, "os.sha512", "a placeholder");
    assert!(d.help.unwrap().contains("sha512sum FILE"));
    let d = one(&with(
        &format!("sha256 = \"{SHA}\""),
        &format!("sha512 = \"{SHA}\""),
    ));
    assert_diag(&d, 11, 10, "os.sha512", "a sha512 has 128");
    let sha512 = format!("{SHA}{SHA}");
    let inv = ok(&with(
        &format!("sha256 = \"{SHA}\""),
        &format!("sha512 = \"{}\"", sha512.to_uppercase()),
    ))
    .inventory;
    assert_eq!(
        inv.os.checksum,
        Checksum::Digest(Digest {
            algorithm: Algorithm::Sha512,
            hex: sha512
        })
    );

    // A published checksum list instead: https or a local file, never plain http.
    let list = "https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS";
    let inv = ok(&with(
        &format!("sha256 = \"{SHA}\""),
        &format!("checksums = \"{list}\""),
    ))
    .inventory;
    assert_eq!(inv.os.checksum, Checksum::List(list.into()));
    let d = one(&with(
        &format!("sha256 = \"{SHA}\""),
        "checksums = \"http://mirror.example/SHA512SUMS\"",
    ));
    assert_diag(&d, 11, 13, "os.checksums", "plain http:// URL");
    assert!(d
        .help
        .unwrap()
        .contains("https://mirror.example/SHA512SUMS"));
    let inv = inventory::parse_str(
        &with(
            &format!("sha256 = \"{SHA}\""),
            "checksums = \"sums/SHA256SUMS\"",
        ),
        Path::new("/srv/lab/inventory.toml"),
    )
    .unwrap()
    .inventory;
    assert_eq!(
        inv.os.checksum,
        Checksum::List("/srv/lab/sums/SHA256SUMS".into())
    );
    // Exactly one of them.
    let d = one(&with(
        &format!("sha256 = \"{SHA}\""),
        &format!("sha256 = \"{SHA}\"\nchecksums = \"{list}\""),
    ));
    assert_diag(
        &d,
        12,
        1,
        "os.checksums",
        "both give the checksum of the image",
    );
    let d = one(&with(&format!("sha256 = \"{SHA}\"\n"), ""));
    assert_diag(
        &d,
        9,
        1,
        "os.checksums",
        "missing the checksum of the image",
    );
    assert!(d.help.unwrap().contains("SHA512SUMS"));

    // The installer's kernel: placeholder refused, the Packages index accepted.
    let kernel = "installer_kernel = \"https://deb.debian.org/debian/pool/main/l/linux-signed-amd64/k.deb\"\n";
    let d = one(&with(
        &format!("sha256 = \"{SHA}\"\n"),
        &format!(
            "sha256 = \"{SHA}\"\n{kernel}installer_kernel_sha256 = \"{}\"\n",
            "0".repeat(64)
        ),
    ));
    assert_diag(&d, 13, 27, "os.installer_kernel_sha256", "a placeholder");
    assert!(d.help.unwrap().contains("installer_kernel_checksums = "));
    let index = "https://deb.debian.org/debian/dists/bookworm/main/binary-amd64/Packages.xz";
    let inv = ok(&with(
        &format!("sha256 = \"{SHA}\"\n"),
        &format!("sha256 = \"{SHA}\"\n{kernel}installer_kernel_checksums = \"{index}\"\n"),
    ))
    .inventory;
    assert_eq!(
        inv.os.installer_kernel.unwrap().checksum,
        Checksum::List(index.into())
    );
    let d = one(&with(
        &format!("sha256 = \"{SHA}\"\n"),
        &format!("sha256 = \"{SHA}\"\n{kernel}"),
    ));
    assert_diag(&d, 9, 1, "os.installer_kernel", "go together");

    // A local image is resolved against the inventory's folder.
    let inv = inventory::parse_str(
        &with("https://example.org/os.raw", "images/os.raw"),
        Path::new("/srv/lab/inventory.toml"),
    )
    .unwrap()
    .inventory;
    assert_eq!(inv.os.image, "/srv/lab/images/os.raw");
}

#[test]
fn bad_node_names_and_disks() {
    let d = one(&with("[nodes.node1]", "[nodes.Node_1]"));
    assert_diag(
        &d,
        13,
        8,
        "nodes.Node_1",
        "node name `Node_1` contains upper-case letters",
    );
    assert!(d.help.unwrap().contains("[nodes.node-1]"));

    let d = one(&with(
        "role = \"server\"",
        "role = \"server\"\ndisk = \"sda\"",
    ));
    assert_diag(&d, 17, 8, "nodes.node1.disk", "`sda` is not a disk");
}

#[test]
fn three_errors_are_reported_at_once() {
    let src = valid()
        .replace("address = \"192.168.50.2\"", "address = \"192.168.50\"")
        .replace("v1.31.4+k3s1", "v1.31")
        .replace("52:54:00:00:00:01", "52:54:00:00:00");
    let e = errors(&src);
    let got: Vec<_> = e
        .iter()
        .map(|d| (d.line, d.column, d.key.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (3, 11, "controller.address"),
            (7, 15, "cluster.k3s_version"),
            (14, 7, "nodes.node1.mac")
        ]
    );
    let Err(all) = parse(&src) else {
        unreachable!()
    };
    assert_eq!(all.to_string().matches("error: inventory.toml:").count(), 3);
}

#[test]
fn columns_count_characters_after_multibyte_text() {
    // "é" and "€" are 2 and 3 bytes; the bad value after them is at character column 35.
    let d = one(&with(
        "role = \"server\"",
        "role = \"server\"\nboot = { cmdline = \"é€\", kernel = 5 }",
    ));
    assert_diag(
        &d,
        17,
        35,
        "nodes.node1.boot.kernel",
        "expected a string, found an integer",
    );
    let line = "boot = { cmdline = \"é€\", kernel = 5 }";
    assert_eq!(line.chars().position(|c| c == '5').unwrap() + 1, 35);
}

#[test]
fn line_col_is_one_based_and_counts_characters() {
    let src = "ä = 1\n# ünïcödé\nkey = \"€\"";
    assert_eq!(line_col(src, 0), (1, 1));
    assert_eq!(line_col(src, "ä ".len()), (1, 3));
    let euro = src.find('€').unwrap();
    assert_eq!(line_col(src, euro), (3, 8));
    assert_eq!(line_col(src, euro + '€'.len_utf8()), (3, 9));
    assert_eq!(line_col(src, src.len()), (3, 10));
}

// ---------------------------------------------------------------------------------------
// Boot profiles: files resolved against the inventory's folder.

fn boot_node(boot: &str) -> String {
    with(
        "role = \"server\"",
        &format!("role = \"server\"\nboot = {boot}"),
    )
}

#[test]
fn boot_profile_files_are_resolved_and_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rescue")).unwrap();
    std::fs::write(dir.path().join("rescue/vmlinuz"), b"kernel").unwrap();
    std::fs::write(dir.path().join("rescue/initrd.img"), b"initrd").unwrap();
    let file = dir.path().join("inventory.toml");

    std::fs::write(&file, boot_node(r#"{ kernel = "rescue/vmlinuz", initrd = "rescue/initrd.img", cmdline = "console=ttyS0" }"#)).unwrap();
    let inv = inventory::load(&file).unwrap().inventory;
    let boot = inv.nodes["node1"].boot.clone().unwrap();
    assert_eq!(boot.kernel, dir.path().join("rescue/vmlinuz"));
    assert!(boot.kernel.is_absolute());
    assert_eq!(boot.initrd, vec![dir.path().join("rescue/initrd.img")]);
    assert_eq!(boot.cmdline, "console=ttyS0");

    // Missing files: one error per file, at the path.
    std::fs::write(
        &file,
        boot_node(
            r#"{ kernel = "rescue/vmlinux", initrd = ["rescue/initrd.img", "rescue/extra.img"] }"#,
        ),
    )
    .unwrap();
    let Err(d) = inventory::load(&file) else {
        panic!("missing files accepted")
    };
    let e: Vec<_> = d.errors().collect();
    assert_eq!(e.len(), 2, "{d}");
    assert_eq!(
        (e[0].line, e[0].column, e[0].key.as_str()),
        (17, 19, "nodes.node1.boot.kernel")
    );
    assert!(
        e[0].message.contains("`rescue/vmlinux` does not exist"),
        "{}",
        e[0]
    );
    assert!(e[0]
        .help
        .as_deref()
        .unwrap()
        .contains("relative paths are resolved against the inventory's folder"));
    assert_eq!(
        (e[1].line, e[1].column, e[1].key.as_str()),
        (17, 68, "nodes.node1.boot.initrd")
    );

    // A folder is not a kernel.
    std::fs::write(&file, boot_node(r#"{ kernel = "rescue" }"#)).unwrap();
    let Err(d) = inventory::load(&file) else {
        panic!("directory accepted")
    };
    assert!(d.0[0].message.contains("is a directory"), "{d}");

    // The kernel is required.
    std::fs::write(&file, boot_node(r#"{ cmdline = "x" }"#)).unwrap();
    let Err(d) = inventory::load(&file) else {
        panic!("no kernel accepted")
    };
    assert_diag(
        &d.0[0],
        17,
        8,
        "nodes.node1.boot.kernel",
        "missing `kernel` in [nodes.node1.boot]",
    );
}

#[test]
fn os_is_optional_only_when_every_node_has_a_boot_profile() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("memtest"), b"x").unwrap();
    let file = dir.path().join("inventory.toml");
    let no_os = |s: String| {
        s.replace(
            &format!("[os]\nimage = \"https://example.org/os.raw\"\nsha256 = \"{SHA}\"\n"),
            "",
        )
    };

    std::fs::write(&file, no_os(boot_node(r#"{ kernel = "memtest" }"#))).unwrap();
    let inv = inventory::load(&file).unwrap().inventory;
    assert_eq!(inv.os.image, "");
    assert!(inv.nodes["node1"].boot.as_ref().unwrap().initrd.is_empty());

    let src = format!("{}\n[nodes.node2]\nmac = \"52:54:00:00:00:02\"\nip = \"192.168.50.12\"\nrole = \"agent\"\n", boot_node(r#"{ kernel = "memtest" }"#));
    std::fs::write(&file, no_os(src)).unwrap();
    let Err(d) = inventory::load(&file) else {
        panic!("[os] was not required")
    };
    assert_eq!(d.errors().count(), 1, "{d}");
    assert_diag(
        &d.0[0],
        0,
        0,
        "os",
        "missing [os] table; `node2` install the OS from it",
    );
}

#[test]
fn nodes_as_an_array_of_tables() {
    let src = valid().replace("[nodes.node1]\n", "[[nodes]]\n");
    let d = one(&src);
    assert_diag(&d, 13, 1, "nodes", "not an array of tables");
    assert!(d.help.unwrap().contains("[nodes.node1]"));
}

#[test]
fn missing_file_is_a_clear_diagnostic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let d = inventory::load(&path).unwrap_err();
    assert_eq!(d.0.len(), 1);
    let shown = d.to_string();
    assert!(
        shown.starts_with(&format!("error: {}: no such file", path.display())),
        "{shown}"
    );
    assert!(shown.contains("homelab init"), "{shown}");
}

#[test]
fn a_fixture_file_with_many_problems() {
    let path = Path::new(file!())
        .parent()
        .unwrap()
        .join("fixtures/inventory/broken.toml");
    let d = inventory::load(&path).unwrap_err();
    let got: Vec<_> =
        d.0.iter()
            .map(|d| (d.severity, d.line, d.column, d.key.as_str()))
            .collect();
    use Severity::{Error as E, Warning as W};
    assert_eq!(
        got,
        vec![
            (E, 4, 1, "controller.adress"),
            (E, 5, 8, "controller.subnet"),
            (E, 19, 7, "nodes.db.mac"),
            (E, 20, 6, "nodes.db.ip"),
            (E, 24, 7, "nodes.web.mac"),
            (W, 26, 8, "nodes.web.role"),
        ],
        "\n{d}"
    );
}
