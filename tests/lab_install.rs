//! The lab end to end: QEMU machines (TCG) with empty disks PXE-boot from
//! `homelab serve` in a network namespace, run the installer, write the
//! lab's Debian image, reboot into it, phone home with the pinned host key,
//! and take an SSH login that checks that key (OpenSSH, StrictHostKeyChecking).
//!
//! Under UEFI the installed disk boots because iPXE hands back to the firmware
//! with an error status (`exit 1`): edk2 ends its boot loop in the setup menu
//! when an entry returns success.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::homelab::{homelab_cmd, HTTP_PORT};
use common::{Firmware, Need, Netns, Proto, Vm, VmConfig};
use homelab::state::{Stage, State};

const INSTALL_TIMEOUT: Duration = Duration::from_secs(900);

fn inventory(ns: &Netns, nodes: &[(&str, &str)], image: &common::LabImage, deb: &Path) -> String {
    let ctrl = ns.ip();
    let mut s = format!(
        "[controller]\ninterface = \"{iface}\"\naddress = \"{ctrl}\"\nsubnet = \"{subnet}\"\nhttp_port = {HTTP_PORT}\n\
         dhcp = \"authoritative\"\ngateway = \"{ctrl}\"\ndns = [\"{ctrl}\"]\nlease_time = 3600\n\n\
         [cluster]\nname = \"lab\"\ndomain = \"lab.home.arpa\"\nk3s_version = \"v1.31.4+k3s1\"\n\n\
         [os]\nimage = \"{img}\"\nsha256 = \"{sha}\"\ninstaller_kernel = \"{deb}\"\ninstaller_kernel_sha256 = \"{deb_sha}\"\n\n",
        iface = ns.interface(),
        subnet = ns.subnet(),
        img = image.path.display(),
        sha = image.sha256,
        deb = deb.display(),
        deb_sha = common::sha256_file(deb),
    );
    for (i, (name, mac)) in nodes.iter().enumerate() {
        s.push_str(&format!(
            "[nodes.{name}]\nmac = \"{mac}\"\nip = \"{}\"\nrole = \"{}\"\n\n",
            ns.subnet_ip(10 + i as u8),
            if i == 0 { "server" } else { "agent" }
        ));
    }
    s
}

fn stage_of(ns: &Netns, node: &str) -> Option<(Stage, String)> {
    let st = State::open_existing(&ns.dir().join("state")).ok()??;
    st.node(node).ok()?.map(|r| (r.stage, r.detail))
}

fn events(ns: &Netns, node: &str) -> String {
    State::open_existing(&ns.dir().join("state"))
        .ok()
        .flatten()
        .map(|st| {
            st.last_events(40, Some(node))
                .unwrap_or_default()
                .iter()
                .map(|e| format!("{} {}: {}", e.ts_ms, e.kind, e.message))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// Log in with OpenSSH using the controller's key, trusting only the pinned host key.
fn ssh(ns: &Netns, ip: &str, node: &str, command: &str) -> Result<String, String> {
    let st = State::open_existing(&ns.dir().join("state"))
        .unwrap()
        .unwrap();
    let pinned = st.host_key(node).unwrap().ok_or("no pinned key")?;
    let known = ns.dir().join(format!("known_hosts-{node}"));
    std::fs::write(&known, format!("{ip} {pinned}\n")).unwrap();
    let key =
        homelab::state::secret_path(&ns.dir().join("state"), homelab::ssh::KEY_SECRET).unwrap();
    let out = ns
        .command(common::which("ssh").expect("ssh"))
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=10",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .arg("-i")
        .arg(&key)
        .arg(format!("root@{ip}"))
        .arg(command)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn bios_and_uefi_machines_install_debian_and_are_reachable_with_the_pinned_key() {
    if !common::lab_ready(
        "bios_and_uefi_machines_install_debian_and_are_reachable_with_the_pinned_key",
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
    let ns = Netns::new().unwrap();
    let bios = VmConfig::new(Firmware::Bios);
    let uefi = VmConfig::new(Firmware::Uefi);
    let nodes = [("node1", bios.mac.clone()), ("node2", uefi.mac.clone())];
    let node_refs: Vec<(&str, &str)> = nodes.iter().map(|(n, m)| (*n, m.as_str())).collect();
    std::fs::write(
        ns.dir().join("inventory.toml"),
        inventory(&ns, &node_refs, &image, &assets.deb),
    )
    .unwrap();
    let mut daemon = ns.spawn("homelab", homelab_cmd(&ns, &["serve"])).unwrap();
    daemon
        .wait_listening(Proto::Tcp, HTTP_PORT, Duration::from_secs(30))
        .unwrap();

    let started = Instant::now();
    let mut vms = Vec::new();
    for mut cfg in [bios, uefi] {
        let disk = ns.dir().join(format!("{}.qcow2", cfg.name));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("4G")
            .status()
            .unwrap();
        assert!(st.success());
        cfg.disks = vec![disk];
        cfg.memory_mb = 1024;
        cfg.allow_reboot = true;
        vms.push(Vm::start(&ns, cfg).unwrap());
    }
    for (i, (name, _)) in nodes.iter().enumerate() {
        let deadline = Instant::now() + INSTALL_TIMEOUT;
        loop {
            let s = stage_of(&ns, name);
            if s.as_ref().is_some_and(|(st, _)| *st == Stage::Installed) {
                break;
            }
            if let Some((Stage::Failed, detail)) = &s {
                panic!(
                    "{name} failed: {detail}\n{}\n{}",
                    events(&ns, name),
                    vms[i].diagnostics()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{name} not installed within {INSTALL_TIMEOUT:?} (stage {s:?})\n{}\n{}\n--- daemon:\n{}",
                events(&ns, name),
                vms[i].diagnostics(),
                common::tail(&daemon.log(), 30)
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        eprintln!(
            "{name}: installed {:.0} s after power-on",
            started.elapsed().as_secs_f64()
        );
    }
    for (i, (name, _)) in nodes.iter().enumerate() {
        let ip = ns.subnet_ip(10 + i as u8).to_string();
        let mut last;
        let deadline = Instant::now() + Duration::from_secs(180);
        let out = loop {
            match ssh(
                &ns,
                &ip,
                name,
                "hostname; findmnt -no SOURCE,SIZE /; cat /etc/ssh/ssh_host_ed25519_key.pub",
            ) {
                Ok(out) => break out,
                Err(e) => last = e,
            }
            assert!(
                Instant::now() < deadline,
                "no SSH login to {name}: {last}\n{}",
                vms[i].diagnostics()
            );
            std::thread::sleep(Duration::from_secs(3));
        };
        eprintln!(
            "{name}: SSH {:.0} s after power-on:\n{out}",
            started.elapsed().as_secs_f64()
        );
        assert!(out.starts_with(&format!("{name}\n")), "{out}");
    }
}
