//! Proves the lab harness: real PXE firmware (QEMU TCG, SeaBIOS and OVMF,
//! with QEMU's own iPXE NIC ROM) boots the lab kernel and initramfs from the
//! dnsmasq + nginx peer inside a network namespace, and the booted initramfs
//! phones home. Prints power-on to phone-home seconds: the reference figures
//! for the netboot benchmark. Needs root and the lab packages; skips without
//! them unless HOMELAB_REQUIRE_LAB=1.

mod common;

use std::time::Duration;

use common::assets::{MARK_INIT, MARK_PHONE_HOME};
use common::{assets, lab_ready, Firmware, Need, Netns, Peer, Vm, VmConfig};

/// Bound on one PXE boot under TCG (measured here: about 25 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

const PEER_NEEDS: &[Need] = &[
    Need::Tool("dnsmasq"),
    Need::Tool("nginx"),
    Need::File("/usr/lib/ipxe/undionly.kpxe"),
    Need::File("/usr/lib/ipxe/ipxe.efi"),
    Need::File("/usr/lib/ipxe/qemu/efi-virtio.rom"),
];

fn boot_from_peer(test: &str, fw: Firmware) {
    let needs: Vec<Need> = PEER_NEEDS.iter().copied().chain([Need::Firmware(fw)]).collect();
    if !lab_ready(test, &needs) {
        return;
    }
    let assets = assets().expect("lab boot assets");
    let ns = Netns::new().expect("lab namespace");
    let peer = Peer::start(&ns, &assets).expect("dnsmasq + nginx peer");
    let mut vm = Vm::start(&ns, VmConfig::new(fw)).expect("start QEMU");

    let phone_home = peer.wait_phone_home(&mut vm, BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{test}: {e}"));
    vm.wait_for_serial(MARK_PHONE_HOME, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    let init = vm.serial_time(MARK_INIT).expect("the initramfs prints its start marker first");
    // The initramfs powers the machine off after phoning home.
    let off = vm.wait_exit(Duration::from_secs(30));

    let log = peer.dnsmasq_log();
    let access = peer.http().access_log();
    assert!(access.contains("GET /boot.ipxe"), "{test}: the iPXE script was never fetched:\n{access}");
    assert!(access.contains("GET /vmlinuz"), "{test}: the kernel was never fetched:\n{access}");
    assert!(access.contains("GET /initrd.gz"), "{test}: the initrd was never fetched:\n{access}");
    assert!(log.contains(vm.mac()), "{test}: dnsmasq never saw {}:\n{log}", vm.mac());
    let since_power_on = |needle: &str| {
        peer.http()
            .request_time(needle)
            .and_then(|t| t.duration_since(vm.started_wall()).ok())
            .map_or(f64::NAN, |d| d.as_secs_f64())
    };
    let tftp: Vec<&str> = log.lines().filter(|l| l.contains("sent /")).collect();
    println!(
        "{test}: {fw:?} power-on -> iPXE script {:.1} s -> initrd fetched {:.1} s -> initramfs /init {:.1} s \
         -> phone-home {:.1} s (server timestamp); powered off: {}; TFTP: {}",
        since_power_on("GET /boot.ipxe"),
        since_power_on("GET /initrd.gz"),
        init.as_secs_f64(),
        phone_home.as_secs_f64(),
        off.is_some(),
        if tftp.is_empty() { "none (the NIC ROM is iPXE itself)".to_string() } else { tftp.join("; ") },
    );
}

#[test]
fn seabios_boots_from_dnsmasq_nginx_peer() {
    boot_from_peer("seabios_boots_from_dnsmasq_nginx_peer", Firmware::Bios);
}

#[test]
fn ovmf_boots_from_dnsmasq_nginx_peer() {
    boot_from_peer("ovmf_boots_from_dnsmasq_nginx_peer", Firmware::Uefi);
}
