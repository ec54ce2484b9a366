//! Proves the lab harness against the dnsmasq + nginx peer: real PXE firmware
//! (QEMU TCG) boots the lab kernel and initramfs from servers inside a
//! network namespace, and the booted initramfs phones home.
//!
//! - SeaBIOS and OVMF with QEMU's iPXE NIC ROM, authoritative dnsmasq: the
//!   reference figures for the netboot benchmark (power-on to phone-home).
//! - OVMF with no NIC ROM (edk2's own PXE client, as on real hardware:
//!   TFTP of ipxe.efi, then iPXE) against dnsmasq in proxy mode beside a
//!   plain "home router" DHCP server: the topology of homelab's proxy mode.
//!
//! Needs root and the lab packages (scripts/deps.sh); skips without them
//! unless HOMELAB_REQUIRE_LAB=1.

mod common;

use std::time::Duration;

use common::assets::{MARK_INIT, MARK_PHONE_HOME};
use common::{
    assets, lab_ready, Firmware, Need, Netns, NicRom, Peer, PeerOptions, PlainDhcp, Vm, VmConfig,
};

/// Bound on one PXE boot under TCG (measured here: 24 to 36 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

const PEER_NEEDS: &[Need] = &[
    Need::Tool("dnsmasq"),
    Need::Tool("nginx"),
    Need::File("/usr/lib/ipxe/undionly.kpxe"),
    Need::File("/usr/lib/ipxe/ipxe.efi"),
    Need::File("/usr/lib/ipxe/qemu/efi-virtio.rom"),
];

struct Scenario {
    test: &'static str,
    firmware: Firmware,
    nic_rom: NicRom,
    /// dnsmasq as proxyDHCP beside a PlainDhcp router, else authoritative.
    proxy: bool,
}

fn boot_from_peer(s: Scenario) {
    let test = s.test;
    let needs: Vec<Need> = PEER_NEEDS
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
    let opts = PeerOptions {
        proxy: s.proxy,
        ..PeerOptions::default()
    };
    let peer = Peer::start_with(&ns, &assets, opts).expect("dnsmasq + nginx peer");
    let mut cfg = VmConfig::new(s.firmware);
    cfg.nic_rom = s.nic_rom;
    let mut vm = Vm::start(&ns, cfg).expect("start QEMU");

    let phone_home = peer
        .wait_phone_home(&mut vm, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    vm.wait_for_serial(MARK_PHONE_HOME, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    let init = vm
        .serial_time(MARK_INIT)
        .expect("the initramfs prints its start marker first");
    // The initramfs powers the machine off after phoning home.
    let off = vm.wait_exit(Duration::from_secs(30));
    assert!(
        off.is_some(),
        "{test}: the machine did not power off after phoning home"
    );

    let log = peer.dnsmasq_log();
    let access = peer.http().access_log();
    for path in ["/boot.ipxe", "/vmlinuz", "/initrd.gz"] {
        assert!(
            access.contains(&format!("GET {path} ")),
            "{test}: {path} never fetched:\n{access}"
        );
    }
    let tftp: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("dnsmasq-tftp") && l.contains("sent /"))
        .collect();
    if s.nic_rom == NicRom::Firmware {
        assert!(
            tftp.iter().any(|l| l.contains("ipxe.efi")),
            "{test}: edk2's PXE client should fetch ipxe.efi over TFTP:\n{log}"
        );
    }
    let lease_from = if let Some(router) = &router {
        assert!(
            router.leases().contains(vm.mac()),
            "{test}: the address should come from the router:\n{}",
            router.log()
        );
        assert!(
            log.contains(&format!("PXE(br0) {} proxy", vm.mac())),
            "{test}: the proxy never answered {}:\n{log}",
            vm.mac()
        );
        "router (PlainDhcp) + dnsmasq proxyDHCP"
    } else {
        assert!(
            peer.leases().contains(vm.mac()),
            "{test}: no lease for {}:\n{log}",
            vm.mac()
        );
        "dnsmasq authoritative"
    };
    let since_power_on = |needle: &str| {
        peer.http()
            .request_time(needle)
            .and_then(|t| t.duration_since(vm.started_wall()).ok())
            .map_or(f64::NAN, |d| d.as_secs_f64())
    };
    println!(
        "{test}: {:?}, NIC ROM {:?}, {lease_from}: power-on -> iPXE script {:.1} s -> initrd {:.1} s \
         -> initramfs /init {:.1} s -> phone-home {:.1} s (server clock); TFTP: {}",
        s.firmware,
        s.nic_rom,
        since_power_on("GET /boot.ipxe "),
        since_power_on("GET /initrd.gz "),
        init.as_secs_f64(),
        phone_home.as_secs_f64(),
        if tftp.is_empty() {
            "none".to_string()
        } else {
            tftp.iter().map(|l| l.split("sent ").last().unwrap_or(l)).collect::<Vec<_>>().join("; ")
        },
    );
}

#[test]
fn seabios_boots_from_dnsmasq_nginx_peer() {
    boot_from_peer(Scenario {
        test: "seabios_boots_from_dnsmasq_nginx_peer",
        firmware: Firmware::Bios,
        nic_rom: NicRom::Ipxe,
        proxy: false,
    });
}

#[test]
fn ovmf_boots_from_dnsmasq_nginx_peer() {
    boot_from_peer(Scenario {
        test: "ovmf_boots_from_dnsmasq_nginx_peer",
        firmware: Firmware::Uefi,
        nic_rom: NicRom::Ipxe,
        proxy: false,
    });
}

#[test]
fn ovmf_native_pxe_boots_from_dnsmasq_proxy_beside_plain_dhcp() {
    boot_from_peer(Scenario {
        test: "ovmf_native_pxe_boots_from_dnsmasq_proxy_beside_plain_dhcp",
        firmware: Firmware::Uefi,
        nic_rom: NicRom::Firmware,
        proxy: true,
    });
}
