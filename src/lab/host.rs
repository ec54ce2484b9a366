//! The lab's footprint on the host: one network namespace holding a bridge
//! and one tap per VM, made and removed with iproute2. Nothing outside the
//! namespace is touched, so the lab cannot disturb the host's networks.

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
    std::path::Path::new("/run/netns").join(netns).exists()
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
