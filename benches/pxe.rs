//! PXE power-on to a booted initramfs (its phone-home), homelab against
//! dnsmasq + nginx serving the same kernel and initramfs to the same kind of
//! machine, in one run; and the daemon's memory. Goal: ratio at most 1.0,
//! RSS under 30 MB idle.
//!
//! Needs root and the lab packages (scripts/deps.sh). Run with
//! `cargo bench --bench pxe` (or `bash scripts/bench-pxe.sh`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::assets::MARK_PHONE_HOME;
use common::homelab::{homelab_cmd, inventory, HTTP_PORT};
use common::{assets, lab_ready, Firmware, Need, Netns, Peer, Proto, Vm, VmConfig};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn boot_peer(fw: Firmware) -> f64 {
    let assets = assets().expect("assets");
    let ns = Netns::new().expect("namespace");
    let peer = Peer::start(&ns, &assets).expect("dnsmasq + nginx");
    let mut vm = Vm::start(&ns, VmConfig::new(fw)).expect("qemu");
    let t = peer
        .wait_phone_home(&mut vm, BOOT_TIMEOUT)
        .expect("peer boot");
    t.as_secs_f64()
}

/// Returns (seconds to phone-home, RSS idle KiB, RSS after the boot KiB).
fn boot_homelab(fw: Firmware) -> (f64, u64, u64) {
    let assets = assets().expect("assets");
    let ns = Netns::new().expect("namespace");
    let cfg = VmConfig::new(fw);
    std::fs::write(
        ns.dir().join("inventory.toml"),
        inventory(&ns, &cfg.mac, &assets.kernel, &assets.initrd, false),
    )
    .unwrap();
    let mut daemon = ns
        .spawn("homelab", homelab_cmd(&ns, &["serve"]))
        .expect("homelab serve");
    daemon
        .wait_listening(Proto::Udp, 67, Duration::from_secs(30))
        .expect("listening");
    daemon
        .wait_listening(Proto::Tcp, HTTP_PORT, Duration::from_secs(30))
        .expect("listening");
    std::thread::sleep(Duration::from_secs(1));
    let idle = daemon.rss_kib();
    let mut vm = Vm::start(&ns, cfg).expect("qemu");
    let t = vm
        .wait_for_serial(MARK_PHONE_HOME, BOOT_TIMEOUT)
        .expect("homelab boot");
    let after = daemon.rss_kib();
    (t.as_secs_f64(), idle, after)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !lab_ready(
        "bench pxe",
        &[
            Need::File("/usr/lib/ipxe/undionly.kpxe"),
            Need::Tool("dnsmasq"),
            Need::Tool("nginx"),
        ],
    ) {
        return;
    }
    println!("PXE power-on to phone-home from the booted initramfs (QEMU TCG, iPXE NIC ROM, authoritative DHCP):");
    println!(
        "{:<6} {:>16} {:>12} {:>7}",
        "", "dnsmasq+nginx", "homelab", "ratio"
    );
    let mut rss = Vec::new();
    for fw in [Firmware::Bios, Firmware::Uefi] {
        let peer = boot_peer(fw);
        let (ours, idle, after) = boot_homelab(fw);
        rss.push((idle, after));
        let verdict = if ours / peer <= 1.0 {
            "meets"
        } else {
            "MISSES"
        };
        println!(
            "{:<6} {:>14.1} s {:>10.1} s {:>7.3}  ({verdict} the 1.0 goal)",
            format!("{fw:?}"),
            peer,
            ours,
            ours / peer
        );
    }
    let idle = rss.iter().map(|r| r.0).max().unwrap_or(0);
    let after = rss.iter().map(|r| r.1).max().unwrap_or(0);
    let verdict = if idle < 30 * 1024 { "meets" } else { "MISSES" };
    println!(
        "homelab serve RSS: idle {:.1} MiB ({verdict} the 30 MB goal), after a boot {:.1} MiB",
        idle as f64 / 1024.0,
        after as f64 / 1024.0
    );
}
