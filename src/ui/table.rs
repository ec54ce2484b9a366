//! Tables and single lines, as plain text.

use std::net::Ipv4Addr;

use crate::inventory::Inventory;
use crate::netboot::boot::ClientArch;
use crate::state::{now_ms, Discovered, Event, NodeRecord};

use super::{format_elapsed, format_time};

pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Lay out rows under a header with columns padded to their widest cell.
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        for (i, c) in cells.into_iter().enumerate() {
            if i == last {
                out.push_str(&c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
    out
}

/// `homelab status`: one row per node.
pub fn status_table(nodes: &[NodeRecord]) -> String {
    if nodes.is_empty() {
        return "No nodes yet: run `homelab up` to apply the inventory.\n".into();
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let bytes = if n.bytes_total > 0 {
                format!(
                    " [{} / {}]",
                    format_bytes(n.bytes_done),
                    format_bytes(n.bytes_total)
                )
            } else {
                String::new()
            };
            vec![
                n.name.clone(),
                n.role.clone(),
                n.mac.clone(),
                n.ip.clone(),
                format!(
                    "{}{}",
                    n.stage,
                    if n.reinstall { " (reinstall)" } else { "" }
                ),
                format_elapsed(now - n.stage_since_ms),
                format!("{}{bytes}", n.detail),
            ]
        })
        .collect();
    render(
        &["NODE", "ROLE", "MAC", "IP", "STAGE", "SINCE", "DETAIL"],
        &rows,
    )
}

/// One event as a line of text.
pub fn event_line(e: &Event) -> String {
    format!(
        "{}  {:<12}  {:<22}  {}",
        format_time(e.ts_ms),
        e.node.as_deref().unwrap_or("-"),
        e.kind,
        e.message
    )
}

/// `homelab discover`: unknown PXE clients and a stanza to paste for each.
pub fn discover_table(found: &[Discovered], inventory: Option<&Inventory>) -> String {
    if found.is_empty() {
        return "No unknown PXE clients seen yet. Power on a machine set to network boot while the daemon runs.\n"
            .into();
    }
    let rows: Vec<Vec<String>> = found
        .iter()
        .map(|d| {
            vec![
                d.mac.clone(),
                d.arch
                    .map(|a| ClientArch::from_code(a).label())
                    .unwrap_or_else(|| "?".into()),
                d.vendor_class.clone(),
                format_time(d.first_seen_ms),
                format_time(d.last_seen_ms),
                d.seen_count.to_string(),
            ]
        })
        .collect();
    let mut out = render(
        &[
            "MAC",
            "ARCH",
            "VENDOR CLASS",
            "FIRST SEEN",
            "LAST SEEN",
            "SEEN",
        ],
        &rows,
    );
    out.push_str(
        "\nTo add them, run `homelab discover --adopt NAME...` (one name per machine, oldest \
         first), or paste into inventory.toml (choose the name, address and role):\n",
    );
    let mut taken: Vec<Ipv4Addr> = inventory
        .map(|i| i.nodes.values().map(|n| n.ip).collect())
        .unwrap_or_default();
    if let Some(inv) = inventory {
        taken.push(inv.controller.address);
    }
    for d in found {
        let name = format!("node-{}", d.mac.replace(':', "").get(6..).unwrap_or(&d.mac));
        let ip = inventory.and_then(|inv| crate::inventory::adopt::next_free_ip(inv, &taken));
        if let Some(ip) = ip {
            taken.push(ip);
        }
        out.push_str(&format!(
            "\n[nodes.{name}]\nmac = \"{}\"\nip = \"{}\"\nrole = \"agent\"\ndisk = \"auto\"\n",
            d.mac,
            ip.map(|i| i.to_string())
                .unwrap_or_else(|| "CHOOSE-AN-ADDRESS".into())
        ));
    }
    out
}
