//! Real PXE firmware against the real daemon: QEMU (TCG) machines boot a
//! custom boot profile (a Debian kernel and a small busybox initramfs that
//! phones home) from `homelab serve` running in a network namespace.
//!
//! - authoritative mode: homelab is the only DHCP server (SeaBIOS, OVMF);
//! - proxy mode: a separate plain DHCP server hands out addresses, as a home
//!   router would, and homelab answers with boot information only — under
//!   SeaBIOS with QEMU's iPXE ROM, and under OVMF with edk2's own PXE client,
//!   which fetches ipxe.efi from homelab's TFTP server first.
//!
//! Needs root and the lab packages (scripts/deps.sh); skips without them
//! unless HOMELAB_REQUIRE_LAB=1.

mod common;

use common::homelab::{homelab_cmd, inventory, HTTP_PORT};

use std::time::Duration;

use common::assets::{MARK_INIT, MARK_PHONE_HOME};
use common::{
    assets, lab_ready, Firmware, Need, Netns, NicRom, PlainDhcp, Proc, Proto, Vm, VmConfig,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

const NEEDS: &[Need] = &[
    Need::File("/usr/lib/ipxe/undionly.kpxe"),
    Need::File("/usr/lib/ipxe/ipxe.efi"),
    Need::File("/usr/lib/ipxe/qemu/efi-virtio.rom"),
];

struct Scenario {
    test: &'static str,
    firmware: Firmware,
    nic_rom: NicRom,
    proxy: bool,
}

fn status_json(ns: &Netns) -> serde_json::Value {
    let out = homelab_cmd(ns, &["status", "--json"])
        .output()
        .expect("homelab status");
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

fn events(ns: &Netns) -> String {
    let out = homelab_cmd(ns, &["events", "-n", "500"])
        .output()
        .expect("homelab events");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn boot_from_homelab(s: Scenario) {
    let test = s.test;
    let needs: Vec<Need> = NEEDS
        .iter()
        .copied()
        .chain([Need::Firmware(s.firmware)])
        .collect();
    if !lab_ready(test, &needs) {
        return;
    }
    let assets = assets().expect("lab boot assets");
    let ns = Netns::new().expect("lab namespace");
    let router = s
        .proxy
        .then(|| PlainDhcp::start(&ns).expect("plain DHCP router"));
    let mut cfg = VmConfig::new(s.firmware);
    cfg.nic_rom = s.nic_rom;
    std::fs::write(
        ns.dir().join("inventory.toml"),
        inventory(&ns, &cfg.mac, &assets.kernel, &assets.initrd, s.proxy),
    )
    .unwrap();

    let mut daemon: Proc = ns
        .spawn("homelab", homelab_cmd(&ns, &["serve"]))
        .expect("start homelab serve");
    daemon
        .wait_listening(Proto::Tcp, HTTP_PORT, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", daemon.log()));
    daemon
        .wait_listening(Proto::Udp, 67, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", daemon.log()));

    let mut vm = Vm::start(&ns, cfg).expect("start QEMU");
    let phoned = vm
        .wait_for_serial(MARK_PHONE_HOME, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: {e}\n{}", daemon.log()));
    let init = vm
        .serial_time(MARK_INIT)
        .expect("init marker before phone-home");
    let off = vm.wait_exit(Duration::from_secs(30));
    assert!(
        off.is_some(),
        "{test}: the machine did not power off after phoning home"
    );

    let st = status_json(&ns);
    assert_eq!(st[0]["name"], "node1");
    assert_eq!(st[0]["stage"], "booted", "{test}: {st}");
    let ev = events(&ns);
    for kind in [
        "http.script",
        "http.file-done",
        "stage.booted",
        "node.phoned-home",
    ] {
        assert!(ev.contains(kind), "{test}: no {kind} event:\n{ev}");
    }
    if s.nic_rom == NicRom::Firmware {
        assert!(
            ev.contains("tftp.sent") && ev.contains("ipxe.efi"),
            "{test}: edk2 fetches ipxe.efi over TFTP:\n{ev}"
        );
    }
    match &router {
        Some(router) => {
            assert!(
                router.leases().contains(vm.mac()),
                "{test}: the address comes from the router:\n{}",
                router.log()
            );
            assert!(
                ev.contains("dhcp.offer"),
                "{test}: homelab answered as proxy:\n{ev}"
            );
        }
        None => assert!(
            ev.contains("dhcp.ack"),
            "{test}: homelab leased the address:\n{ev}"
        ),
    }
    daemon
        .ensure_running()
        .unwrap_or_else(|e| panic!("{test}: daemon died: {e}"));
    println!(
        "{test}: {:?}, NIC ROM {:?}, {}: power-on -> initramfs /init {:.1} s -> phone-home {:.1} s",
        s.firmware,
        s.nic_rom,
        if s.proxy {
            "proxy beside a plain DHCP server"
        } else {
            "authoritative"
        },
        init.as_secs_f64(),
        phoned.as_secs_f64()
    );
}

#[test]
fn seabios_boots_from_homelab_authoritative() {
    boot_from_homelab(Scenario {
        test: "seabios_boots_from_homelab_authoritative",
        firmware: Firmware::Bios,
        nic_rom: NicRom::Ipxe,
        proxy: false,
    });
}

#[test]
fn ovmf_boots_from_homelab_authoritative() {
    boot_from_homelab(Scenario {
        test: "ovmf_boots_from_homelab_authoritative",
        firmware: Firmware::Uefi,
        nic_rom: NicRom::Ipxe,
        proxy: false,
    });
}

#[test]
fn seabios_boots_from_homelab_proxy_beside_a_router() {
    boot_from_homelab(Scenario {
        test: "seabios_boots_from_homelab_proxy_beside_a_router",
        firmware: Firmware::Bios,
        nic_rom: NicRom::Ipxe,
        proxy: true,
    });
}

#[test]
fn ovmf_firmware_pxe_boots_from_homelab_proxy_via_tftp() {
    boot_from_homelab(Scenario {
        test: "ovmf_firmware_pxe_boots_from_homelab_proxy_via_tftp",
        firmware: Firmware::Uefi,
        nic_rom: NicRom::Firmware,
        proxy: true,
    });
}
