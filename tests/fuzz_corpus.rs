//! The fuzz targets in the ordinary test run: every committed input under
//! `fuzz/corpus/<target>/` (seeds) and `fuzz/regressions/<target>/` (what
//! the fuzzer once found, since fixed) through the target's body, the same
//! function `cargo fuzz run` drives. This also builds the targets' bodies
//! on every test run, so they cannot rot unseen.
//!
//! The seeds are the real packets and requests of the other tests; the
//! ignored test `write_seeds` writes them again:
//! `cargo test --test fuzz_corpus -- --ignored write_seeds`.

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::net::Ipv4Addr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use dhcproto::v4::{DhcpOption, MessageType, OptionCode, UnknownOption};
use dhcproto::{Encodable, Encoder};
use homelab::install::protocol::{DiskReport, Report};
use homelab::inventory::MacAddr;
use homelab::netboot::tftp::{self, Mode, Opcode};
use homelab::testing::{dhcp_request, pxe_request, Builder};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    out.sort();
    out
}

#[test]
fn every_seed_and_regression_input_passes_its_target() {
    let mut failed = Vec::new();
    for (name, run) in targets::TARGETS {
        let seeds = files(&fuzz_dir().join("corpus").join(name));
        assert!(!seeds.is_empty(), "fuzz/corpus/{name}/ has no seeds");
        let regressions = files(&fuzz_dir().join("regressions").join(name));
        for file in seeds.iter().chain(&regressions) {
            let data = std::fs::read(file).unwrap();
            if let Err(e) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failed.push(format!("{}: {why}", file.display()));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "inputs failing their target:\n{}",
        failed.join("\n")
    );
}

#[test]
fn every_input_folder_names_a_target() {
    for kind in ["corpus", "regressions"] {
        for dir in files(&fuzz_dir().join(kind)) {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                targets::TARGETS.iter().any(|(t, _)| *t == name),
                "fuzz/{kind}/{name} is no target's"
            );
        }
    }
}

/// The seeds, by target and file name.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, data: Vec<u8>| {
        out.push((target, name.to_string(), data))
    };

    // DHCP: firmware and clients as the handler's tests send them.
    let mac = targets::NODE_MAC;
    let stranger = MacAddr([0x52, 0x54, 0, 0, 0, 0x99]);
    let guid: Vec<u8> = (0..17).collect();
    let encode = |m: &dhcproto::v4::Message| {
        let mut v = Vec::new();
        m.encode(&mut Encoder::new(&mut v)).unwrap();
        v
    };
    for (arch, label) in [(0, "bios"), (7, "uefi"), (11, "arm64"), (16, "http")] {
        for (kind, k) in [
            (MessageType::Discover, "discover"),
            (MessageType::Request, "request"),
        ] {
            let m = pxe_request(0x1234_5678, mac, kind, arch, &guid);
            add("dhcp_handler", &format!("pxe-{label}-{k}"), encode(&m));
        }
    }
    let mut ipxe = pxe_request(7, mac, MessageType::Discover, 7, &guid);
    ipxe.opts_mut()
        .insert(DhcpOption::Unknown(UnknownOption::new(
            OptionCode::UserClass,
            b"iPXE".to_vec(),
        )));
    add("dhcp_handler", "ipxe-discover", encode(&ipxe));
    add(
        "dhcp_handler",
        "stranger-discover",
        encode(&dhcp_request(9, stranger, MessageType::Discover)),
    );
    let mut selecting = dhcp_request(10, stranger, MessageType::Request);
    selecting
        .opts_mut()
        .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 9, 0, 1)));
    selecting
        .opts_mut()
        .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 9, 0, 100)));
    add("dhcp_handler", "pool-selecting", encode(&selecting));
    for (kind, k) in [
        (MessageType::Release, "release"),
        (MessageType::Decline, "decline"),
        (MessageType::Inform, "inform"),
    ] {
        add(
            "dhcp_handler",
            &format!("node-{k}"),
            encode(&dhcp_request(11, mac, kind)),
        );
    }

    // TFTP: the read requests of the TFTP tests, options included.
    let rrq = |name: &str, options: &[(&str, &str)]| {
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
    };
    add("tftp_request", "undionly", rrq("undionly.kpxe", &[]));
    add(
        "tftp_request",
        "ipxe-efi-options",
        rrq("ipxe.efi", &[("blksize", "1468"), ("tsize", "0")]),
    );
    add(
        "tftp_request",
        "traversal",
        rrq("ipxe/../../secret.txt", &[]),
    );
    add("tftp_request", "absolute", rrq("/etc/passwd", &[]));
    let mut wrq = rrq("ipxe.efi", &[]);
    wrq[1] = 2;
    add("tftp_request", "write", wrq);

    // The agent's reports, as it posts them.
    let reports = [
        (
            "disk",
            Report::Disk(DiskReport {
                device: "/dev/vda".into(),
                size: 8 << 30,
                model: "QEMU HARDDISK".into(),
                previous: Some("a GPT partition table".into()),
            }),
        ),
        (
            "progress",
            Report::Progress {
                received: 1 << 20,
                total: 300 << 20,
                written: 1 << 19,
            },
        ),
        ("head-written", Report::HeadWritten),
        (
            "log",
            Report::Log {
                lines: vec![
                    "disk /dev/vda chosen".into(),
                    "writing the image\twith zstd".into(),
                ],
            },
        ),
        (
            "done",
            Report::Done {
                host_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEx3 root@node1\n".into(),
                bytes_written: 2 << 30,
                seconds: 41.5,
            },
        ),
        (
            "failed",
            Report::Failed {
                error: "the image's sha256 does not match: expected aa, got bb".into(),
            },
        ),
    ];
    for (name, r) in reports {
        add("agent_report", name, serde_json::to_vec(&r).unwrap());
    }

    // Phone-home: cloud-init's form (the keys user-data.j2 asks it to post) and the tests' bodies.
    add(
        "phone_home",
        "cloud-init",
        b"pub_key_ed25519=ssh-ed25519+AAAAC3NzaC1lZDI1NTE5AAAAIEx3+root%40node1%0A\
          &instance_id=iid-node1-3&hostname=node1&fqdn=node1.home.arpa"
            .to_vec(),
    );
    add("phone_home", "json", br#"{"uptime": 3}"#.to_vec());
    add("phone_home", "text", b"booted\n".to_vec());

    // Request paths: those the HTTP tests ask for, on the fixture's nodes.
    for (name, path) in [
        ("script-dashes", "/boot/52-54-00-00-00-11.ipxe"),
        ("script-colons", "/boot/52:54:00:00:00:12.ipxe"),
        ("script-not-a-mac", "/boot/not-a-mac.ipxe"),
        ("ipxe-binary", "/boot/ipxe/ipxe.efi"),
        ("ipxe-traversal", "/boot/ipxe/..%2Fsecret.txt"),
        ("profile-kernel", "/files/prof/vmlinuz"),
        ("profile-initrd", "/files/prof/2-initrd.gz"),
        ("profile-traversal", "/files/prof/..%2F..%2Fsecret.txt"),
        ("profile-nul", "/files/prof/initrd.gz%00"),
        ("phone-home", "/phone-home/52:54:00:00:00:12"),
        ("installer-kernel", "/install/52:54:00:00:00:11/vmlinuz"),
        ("install-plan", "/install/52-54-00-00-00-11/plan"),
    ] {
        add("http_path", name, path.as_bytes().to_vec());
    }

    // Inventories: the documented example, the tests' builder, a broken file.
    add(
        "inventory",
        "example",
        homelab::inventory::EXAMPLE.as_bytes().to_vec(),
    );
    add("inventory", "builder", Builder::new().text().into_bytes());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    add(
        "inventory",
        "broken",
        std::fs::read(repo.join("tests/fixtures/inventory/broken.toml")).unwrap(),
    );
    out
}

#[test]
#[ignore = "writes fuzz/corpus/; run it to refresh the seeds"]
fn write_seeds() {
    for (target, name, data) in seeds() {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    }
}
