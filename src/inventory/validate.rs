//! Checks that span several keys (duplicates, addresses against the subnet, the DHCP pool,
//! etcd quorum, whether [os] is needed) and the final assembly of a valid [`Inventory`].

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;

use super::diagnostic::{Diagnostic, Severity};
use super::model::{Artifact, Cluster, Controller, DhcpMode, Inventory, Node, Os, Role};
use super::parse::{Ctx, Draft, DraftController, DraftNode};

/// The addresses of `net` a host may use (all but network and broadcast, except in /31 and /32).
fn host_range(net: &Ipv4Net) -> (Ipv4Addr, Ipv4Addr) {
    if net.prefix_len() >= 31 {
        (net.network(), net.broadcast())
    } else {
        (
            Ipv4Addr::from(u32::from(net.network()) + 1),
            Ipv4Addr::from(u32::from(net.broadcast()) - 1),
        )
    }
}

/// Why `ip` cannot be a host in `net`, if it cannot.
fn outside(ip: Ipv4Addr, net: &Ipv4Net) -> Option<String> {
    let (first, last) = host_range(net);
    if !net.contains(&ip) {
        Some(format!(
            "`{ip}` is outside the subnet {net} (controller.subnet)"
        ))
    } else if ip < first {
        Some(format!(
            "`{ip}` is the network address of {net}, not a host address"
        ))
    } else if ip > last {
        Some(format!(
            "`{ip}` is the broadcast address of {net}, not a host address"
        ))
    } else {
        None
    }
}

pub(crate) fn check(ctx: &mut Ctx, d: &Draft) {
    if let Some(c) = &d.controller {
        controller(ctx, c);
        if let Some(net) = &c.subnet {
            node_addresses_in_subnet(ctx, &net.value, &d.nodes);
        }
        if let Some(addr) = &c.address {
            for n in &d.nodes {
                if let Some(ip) = n.ip.as_ref().filter(|ip| ip.value == addr.value) {
                    ctx.error(
                        ip.span.clone(),
                        &format!("nodes.{}.ip", n.name),
                        format!(
                            "`{}` is the controller's own address (controller.address)",
                            ip.value
                        ),
                        "give the node an address of its own",
                    );
                }
            }
        }
        if c.dhcp == DhcpMode::Authoritative {
            pool(ctx, c, &d.nodes);
        }
    }
    duplicates(ctx, &d.nodes);
    servers(ctx, d);
    os_needed(ctx, d);
}

fn controller(ctx: &mut Ctx, c: &DraftController) {
    if c.dhcp == DhcpMode::Authoritative {
        if c.subnet.is_none() && !ctx.diags.iter().any(|e| e.key == "controller.subnet") {
            ctx.error(
                c.dhcp_span.clone(),
                "controller.subnet",
                "dhcp = \"authoritative\" needs the network's `subnet`",
                "add subnet = \"192.168.50.0/24\" (your provisioning network) to [controller], \
                 or use dhcp = \"proxy\" beside an existing DHCP server",
            );
        }
        if let (Some(net), Some(gw)) = (&c.subnet, &c.gateway) {
            if let Some(why) = outside(gw.value, &net.value) {
                let (first, last) = host_range(&net.value);
                ctx.error(
                    gw.span.clone(),
                    "controller.gateway",
                    why,
                    format!("the gateway is the router on this network: use an address in {first}-{last}"),
                );
            }
        }
    } else {
        let mode = if c.dhcp == DhcpMode::Off {
            "off"
        } else {
            "proxy"
        };
        for (key, span) in &c.authoritative_keys {
            ctx.warn(
                span.clone(),
                &format!("controller.{key}"),
                format!("`{key}` is only used when dhcp = \"authoritative\"; it is ignored in {mode} mode"),
                "remove it, or set dhcp = \"authoritative\" if the controller should hand out addresses",
            );
        }
    }
    if let (Some(net), Some(addr)) = (&c.subnet, &c.address) {
        if let Some(why) = outside(addr.value, &net.value) {
            ctx.error(
                addr.span.clone(),
                "controller.address",
                why,
                "use the controller's address on the provisioning network, or fix controller.subnet",
            );
        }
    }
}

fn node_addresses_in_subnet(ctx: &mut Ctx, net: &Ipv4Net, nodes: &[DraftNode]) {
    let (first, last) = host_range(net);
    for n in nodes {
        let Some(ip) = &n.ip else { continue };
        if let Some(why) = outside(ip.value, net) {
            let help = format!("use an address in {first}-{last}, or change controller.subnet");
            ctx.error(ip.span.clone(), &format!("nodes.{}.ip", n.name), why, help);
        }
    }
}

fn pool(ctx: &mut Ctx, c: &DraftController, nodes: &[DraftNode]) {
    let Some(pool) = &c.pool else { return };
    let range = pool.value;
    if let Some(net) = &c.subnet {
        let (first, last) = host_range(&net.value);
        if range.first < first || range.last > last {
            ctx.error(
                pool.span.clone(),
                "controller.pool",
                format!(
                    "the pool {range} is not inside the host addresses of {} ({first}-{last})",
                    net.value
                ),
                format!("choose a range within {first}-{last}"),
            );
        }
    }
    let mut taken = Vec::new();
    if let Some(a) = c.address.as_ref().filter(|a| range.contains(a.value)) {
        taken.push(format!("the controller ({})", a.value));
    }
    if let Some(g) = c.gateway.as_ref().filter(|g| range.contains(g.value)) {
        taken.push(format!("the gateway ({})", g.value));
    }
    for n in nodes {
        if let Some(ip) = n.ip.as_ref().filter(|ip| range.contains(ip.value)) {
            taken.push(format!("node `{}` ({})", n.name, ip.value));
        }
    }
    if !taken.is_empty() {
        ctx.error(
            pool.span.clone(),
            "controller.pool",
            format!(
                "the pool {range} overlaps static addresses: {}",
                taken.join(", ")
            ),
            "move the pool or those addresses so they don't overlap; the pool is for machines \
             not in the inventory",
        );
    }
}

/// Two nodes with one MAC or one IP: point at the second, name the first.
fn duplicates(ctx: &mut Ctx, nodes: &[DraftNode]) {
    let mut macs: HashMap<_, &DraftNode> = HashMap::new();
    let mut ips: HashMap<Ipv4Addr, &DraftNode> = HashMap::new();
    for n in nodes {
        if let Some(mac) = &n.mac {
            match macs.get(&mac.value) {
                Some(first) => {
                    let line = ctx.line_of(
                        first
                            .mac
                            .as_ref()
                            .map_or(first.span.start, |m| m.span.start),
                    );
                    ctx.error(
                        mac.span.clone(),
                        &format!("nodes.{}.mac", n.name),
                        format!("MAC {} is already used by node `{}` (line {line})", mac.value, first.name),
                        "every machine has its own MAC: copy this node's MAC from its network card, \
                         or run `homelab discover` to list machines that tried to boot",
                    );
                }
                None => {
                    macs.insert(mac.value, n);
                }
            }
        }
        if let Some(ip) = &n.ip {
            match ips.get(&ip.value) {
                Some(first) => {
                    let line =
                        ctx.line_of(first.ip.as_ref().map_or(first.span.start, |i| i.span.start));
                    ctx.error(
                        ip.span.clone(),
                        &format!("nodes.{}.ip", n.name),
                        format!(
                            "address {} is already used by node `{}` (line {line})",
                            ip.value, first.name
                        ),
                        "give each node an address of its own",
                    );
                }
                None => {
                    ips.insert(ip.value, n);
                }
            }
        }
    }
}

fn servers(ctx: &mut Ctx, d: &Draft) {
    if d.nodes.is_empty() {
        if ctx.diags.iter().any(|e| e.key == "nodes") {
            return; // [nodes] is there but malformed; that error says more.
        }
        // Valid: `homelab up` then serves PXE so machines can be discovered and adopted.
        let (message, help) = (
            "the inventory has no nodes yet",
            "power on the machines set to network boot while `homelab up` runs, then add them with \
             `homelab discover --adopt NAME...` (or write [nodes.NAME] tables by hand)",
        );
        let diag = match &d.nodes_span {
            Some(span) => Diagnostic::at(
                Severity::Warning,
                ctx.file,
                ctx.src,
                span.clone(),
                "nodes",
                message,
                help,
            ),
            None => Diagnostic::whole_file(Severity::Warning, ctx.file, "nodes", message, help),
        };
        ctx.diags.push(diag);
        return;
    }
    // With a role missing or misspelt the count is unknown; that error already speaks.
    let Some(roles) = d
        .nodes
        .iter()
        .map(|n| n.role.as_ref())
        .collect::<Option<Vec<_>>>()
    else {
        return;
    };
    let servers: Vec<_> = roles.iter().filter(|r| r.value == Role::Server).collect();
    match servers.len() {
        0 => ctx.error(
            roles[0].span.clone(),
            &format!("nodes.{}.role", d.nodes[0].name),
            "no node has role = \"server\"; a k3s cluster needs at least one server",
            "make one node (or three, for high availability) role = \"server\"",
        ),
        n if n % 2 == 0 => {
            let last = servers[n - 1];
            let node = d
                .nodes
                .iter()
                .find(|x| x.role.as_ref().is_some_and(|r| r.span == last.span));
            let name = node.map_or("?", |x| x.name.as_str());
            let message = if n == 2 {
                "2 servers tolerate no failure; use 1 or 3".to_string()
            } else {
                format!(
                    "{n} servers tolerate {} failure(s), no more than {}; use {} or {}",
                    n / 2 - 1,
                    n - 1,
                    n - 1,
                    n + 1
                )
            };
            ctx.warn(
                last.span.clone(),
                &format!("nodes.{name}.role"),
                message,
                format!(
                    "etcd needs a majority of servers up, so an even number adds a machine without adding \
                     failure tolerance; make this node an agent or add one more server ({} total)",
                    n + 1
                ),
            );
        }
        _ => {}
    }
}

fn os_needed(ctx: &mut Ctx, d: &Draft) {
    if d.os_given {
        return; // Present; any problem in it has been reported where it is.
    }
    let installing: Vec<&str> = d
        .nodes
        .iter()
        .filter(|n| !n.has_boot)
        .map(|n| n.name.as_str())
        .collect();
    if !d.nodes.is_empty() && installing.is_empty() {
        return; // Every node boots its own profile; no OS image is needed.
    }
    let who = if installing.is_empty() {
        String::new()
    } else {
        let shown: Vec<_> = installing
            .iter()
            .take(5)
            .map(|n| format!("`{n}`"))
            .collect();
        let more = if installing.len() > 5 {
            format!(" and {} more", installing.len() - 5)
        } else {
            String::new()
        };
        format!("; {}{more} install the OS from it", shown.join(", "))
    };
    ctx.error_file(
        "os",
        format!("missing [os] table{who}"),
        "add an [os] table with image = \"https://...\" (or a local path) and sha256 = \"...\" \
         (only nodes that all have a boot profile can do without it)",
    );
}

/// Build the inventory; None if anything is missing (errors have then been reported).
pub(crate) fn assemble(ctx: &Ctx, d: Draft, path: &Path) -> Option<Inventory> {
    if ctx.has_errors() {
        return None;
    }
    let c = d.controller?;
    let controller = Controller {
        interface: c.interface?,
        address: c.address?.value,
        dhcp: c.dhcp,
        http_port: c.http_port,
        tftp: c.tftp,
        subnet: c.subnet.map(|s| s.value),
        gateway: c.gateway.map(|g| g.value),
        dns: c.dns,
        pool: c.pool.map(|p| p.value),
        lease_time: c.lease_time,
        ipxe_dir: c.ipxe_dir,
        mirror: c.mirror,
    };
    let cl = d.cluster?;
    let cluster = Cluster {
        name: cl.name,
        domain: cl.domain,
        k3s_version: cl.k3s_version?,
    };
    let os = match d.os {
        Some(o) => Os {
            image: o.image?,
            checksum: o.checksum?,
            installer_kernel: o
                .installer_kernel
                .zip(o.installer_kernel_checksum)
                .map(|(source, checksum)| Artifact { source, checksum }),
        },
        None => Os::default(),
    };
    let mut nodes = BTreeMap::new();
    for n in d.nodes {
        let node = Node {
            name: n.name.clone(),
            mac: n.mac?.value,
            ip: n.ip?.value,
            role: n.role?.value,
            disk: n.disk,
            power: n.power,
            boot: if n.has_boot { Some(n.boot?) } else { None },
            reinstall: n.reinstall,
            labels: n.labels,
            taints: n.taints,
        };
        nodes.insert(n.name, node);
    }
    Some(Inventory {
        path: path.to_path_buf(),
        controller,
        cluster,
        os,
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ranges() {
        let net: Ipv4Net = "192.168.50.0/24".parse().unwrap();
        assert_eq!(
            host_range(&net),
            (
                "192.168.50.1".parse().unwrap(),
                "192.168.50.254".parse().unwrap()
            )
        );
        assert!(outside("192.168.50.0".parse().unwrap(), &net)
            .unwrap()
            .contains("network address"));
        assert!(outside("192.168.50.255".parse().unwrap(), &net)
            .unwrap()
            .contains("broadcast"));
        assert!(outside("192.168.51.1".parse().unwrap(), &net)
            .unwrap()
            .contains("outside"));
        assert_eq!(outside("192.168.50.7".parse().unwrap(), &net), None);
        let p2p: Ipv4Net = "10.0.0.0/31".parse().unwrap();
        assert_eq!(outside("10.0.0.0".parse().unwrap(), &p2p), None);
    }
}
