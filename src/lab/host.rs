//! The lab's footprint on the host: one network namespace holding a bridge
//! and one tap per VM, made and removed with iproute2. Nothing outside the
//! namespace is touched, so the lab cannot disturb the host's networks.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::spec::{LabSpec, BRIDGE};

/// `program` to run inside `netns`.
pub fn in_netns(netns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, program]);
    cmd
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (package iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether `ip -n NETNS link show DEV` finds the device.
fn has_link(netns: &str, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", netns, "link", "show", dev])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn netns_exists(netns: &str) -> bool {
    Path::new("/run/netns").join(netns).exists()
}

/// Creates what is missing of the namespace, bridge and taps; leaves what
/// exists (a re-run after a host reboot rebuilds only the network).
pub fn ensure_network(spec: &LabSpec) -> Result<()> {
    let ns = spec.netns.as_str();
    if !netns_exists(ns) {
        ip(&["netns", "add", ns])?;
    }
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    // No IPv6 chatter (router solicitations, duplicate address detection).
    let _ = in_netns(ns, "sysctl")
        .args([
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])
        .output();
    if !has_link(ns, BRIDGE) {
        ip(&[
            "-n",
            ns,
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", spec.controller),
            "dev",
            BRIDGE,
        ])?;
    }
    ip(&["-n", ns, "link", "set", BRIDGE, "up"])?;
    for node in &spec.nodes {
        if !has_link(ns, &node.tap) {
            ip(&["-n", ns, "tuntap", "add", "dev", &node.tap, "mode", "tap"])?;
        }
        ip(&["-n", ns, "link", "set", &node.tap, "master", BRIDGE, "up"])?;
    }
    Ok(())
}

/// The lab network's IPv6 prefix (unique local, inside the namespace only).
const IPV6_PREFIX: &str = "fd77::";

/// Runs IPv6 router advertisements on the lab bridge (dnsmasq, RA only: no
/// DHCP of either family), as a home router does. Without them iPXE waits for
/// IPv6 autoconfiguration to time out on every network boot (about 13 s).
/// Returns a warning when dnsmasq is missing: the lab works, only slower.
pub fn ensure_router_advertiser(spec: &LabSpec, pid_file: &Path) -> Result<Option<String>> {
    if pid_alive(pid_file) {
        return Ok(None);
    }
    if !on_path("dnsmasq") {
        return Ok(Some(
            "dnsmasq not found: no IPv6 router advertisements in the lab, so every network \
             boot waits about 13 s longer (apt-get install dnsmasq-base)"
                .into(),
        ));
    }
    let ns = spec.netns.as_str();
    in_netns(ns, "sysctl")
        .args(["-qw", &format!("net.ipv6.conf.{BRIDGE}.disable_ipv6=0")])
        .output()?;
    let _ = ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{IPV6_PREFIX}1/64"),
        "dev",
        BRIDGE,
        "nodad",
    ]);
    let out = in_netns(ns, "dnsmasq")
        .args([
            "--port=0",
            "--no-resolv",
            "--no-hosts",
            &format!("--interface={BRIDGE}"),
            "--bind-interfaces",
            "--user=root",
            "--group=root",
            "--dhcp-leasefile=/dev/null",
            "--enable-ra",
            &format!("--dhcp-range=::,constructor:{BRIDGE},ra-only"),
        ])
        .arg(format!("--pid-file={}", pid_file.display()))
        .output()
        .context("running dnsmasq")?;
    if !out.status.success() {
        bail!(
            "dnsmasq (IPv6 router advertisements): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(None)
}

/// Whether the pid in `pid_file` is a running process.
fn pid_alive(pid_file: &Path) -> bool {
    std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// Whether `program` is an executable file on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Pids of every process running in the namespace.
pub fn netns_pids(netns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes the namespace (its bridge and taps go with it).
pub fn remove_network(netns: &str) -> Result<()> {
    if netns_exists(netns) {
        ip(&["netns", "del", netns])?;
    }
    Ok(())
}
