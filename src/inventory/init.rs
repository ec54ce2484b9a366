//! What `homelab init` writes: the commented example, filled in for the
//! machine it runs on (the interface of its default route, its address and
//! subnet), with no nodes yet but a pointer to `homelab discover --adopt`.
//!
//! The example is the template, so the file init writes documents every key
//! exactly as inventory.example.toml does; only the lines below differ.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::EXAMPLE;

/// The controller's network as found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNet {
    pub interface: String,
    pub address: Ipv4Addr,
    pub subnet: Ipv4Net,
}

/// The example's values that init replaces.
const EXAMPLE_INTERFACE: &str = "interface = \"eth0\"";
const EXAMPLE_ADDRESS: &str = "address = \"192.168.50.2\"";
const EXAMPLE_SUBNET: &str = "subnet = \"192.168.50.0/24\"";
/// Where the example's sample nodes start; init writes none.
const FIRST_EXAMPLE_NODE: &str = "\n[nodes.node1]\n";

const NO_NODES: &str = "
# No nodes yet. Set the machines to boot from the network, run `homelab up`
# and power them on: they are told to wait, and `homelab discover` lists them.
# Then
#   homelab discover --adopt NAME... [--role server|agent]
# writes one [nodes.NAME] table per machine (oldest first) below, with the next
# free addresses after the controller's, keeping this file's comments.
";

/// The inventory text for a controller on `host`, or, when no default route
/// was found, one whose interface, address and subnet are empty so that
/// `homelab validate` names each of them until they are filled in.
pub fn render(host: Option<&HostNet>) -> String {
    let body = EXAMPLE
        .split_once(FIRST_EXAMPLE_NODE)
        .map_or(EXAMPLE, |(head, _)| head);
    let (interface, address, subnet, note) = match host {
        Some(h) => (
            h.interface.clone(),
            h.address.to_string(),
            h.subnet.trunc().to_string(),
            format!(
                "# Found by `homelab init`: {} is the interface of this machine's default route.\n",
                h.interface
            ),
        ),
        None => (
            String::new(),
            String::new(),
            String::new(),
            "# `homelab init` found no default route on this machine: fill in the interface on the\n\
             # provisioning network, this machine's address on it and its subnet below.\n"
                .to_string(),
        ),
    };
    let text = body
        .replacen(
            EXAMPLE_INTERFACE,
            &format!("{note}interface = \"{interface}\""),
            1,
        )
        .replacen(EXAMPLE_ADDRESS, &format!("address = \"{address}\""), 1)
        .replacen(EXAMPLE_SUBNET, &format!("subnet = \"{subnet}\""), 1);
    format!("{}\n{NO_NODES}", text.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn host() -> HostNet {
        HostNet {
            interface: "enp3s0".into(),
            address: "10.1.2.7".parse().unwrap(),
            subnet: "10.1.2.0/23".parse().unwrap(),
        }
    }

    #[test]
    fn the_template_lines_are_in_the_example() {
        for line in [
            EXAMPLE_INTERFACE,
            EXAMPLE_ADDRESS,
            EXAMPLE_SUBNET,
            FIRST_EXAMPLE_NODE,
        ] {
            assert_eq!(EXAMPLE.matches(line).count(), 1, "{line}");
        }
    }

    #[test]
    fn rendered_for_a_host_is_valid_and_has_no_nodes() {
        let text = render(Some(&host()));
        let l = crate::inventory::parse_str(&text, Path::new("inventory.toml"))
            .unwrap_or_else(|d| panic!("{d}\n{text}"));
        let c = &l.inventory.controller;
        assert_eq!(c.interface, "enp3s0");
        assert_eq!(c.address, "10.1.2.7".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.subnet, Some("10.1.2.0/23".parse().unwrap()));
        assert_eq!(c.dhcp, crate::inventory::DhcpMode::Proxy);
        assert!(l.inventory.nodes.is_empty());
        assert!(matches!(
            l.inventory.os.checksum,
            crate::inventory::Checksum::List(_)
        ));
        assert!(!text.contains("address = \"192.168.50.2\""));
        assert!(!text.lines().any(|l| l.starts_with("[nodes.")));
        assert!(text.contains("homelab discover --adopt"));
        // Everything but the filled-in lines and the nodes is the example's.
        let example_head = EXAMPLE.split_once(FIRST_EXAMPLE_NODE).unwrap().0;
        let kept = example_head
            .lines()
            .filter(|l| ![EXAMPLE_INTERFACE, EXAMPLE_ADDRESS, EXAMPLE_SUBNET].contains(l))
            .all(|l| text.lines().any(|t| t == l));
        assert!(kept);
    }

    #[test]
    fn without_a_default_route_validation_names_the_fields() {
        let text = render(None);
        let d = crate::inventory::parse_str(&text, Path::new("inventory.toml")).unwrap_err();
        let keys: Vec<&str> = d.0.iter().map(|d| d.key.as_str()).collect();
        for key in [
            "controller.interface",
            "controller.address",
            "controller.subnet",
        ] {
            assert!(keys.contains(&key), "{key} not in {keys:?}");
        }
        assert!(text.contains("found no default route"));
    }
}

/// The interface of the IPv4 default route in /proc/net/route's text (the
/// lowest metric wins when there are several).
pub fn default_route_interface(proc_net_route: &str) -> Option<String> {
    proc_net_route
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            let up = u16::from_str_radix(f.get(3)?, 16).ok()? & 1 == 1;
            (f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000") && up)
                .then(|| Some((f.get(6)?.parse::<u32>().ok()?, f[0].to_string())))
                .flatten()
        })
        .min()
        .map(|(_, iface)| iface)
}

/// This machine's default-route interface and its first IPv4 address and
/// subnet; None when there is no default route or it has no IPv4 address.
pub fn detect() -> Option<HostNet> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    let interface = default_route_interface(&routes)?;
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs.filter(|a| a.interface_name == interface) {
        let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
            continue;
        };
        let (Some(addr), Some(mask)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) else {
            continue;
        };
        let prefix = u32::from(mask.ip()).leading_ones() as u8;
        let subnet = Ipv4Net::new(addr.ip(), prefix).ok()?.trunc();
        return Some(HostNet {
            interface,
            address: addr.ip(),
            subnet,
        });
    }
    None
}

#[cfg(test)]
mod route_tests {
    use super::*;

    #[test]
    fn default_route_by_lowest_metric() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            wlan0\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
            eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
            down0\t00000000\t0101A8C0\t0002\t0\t0\t1\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_interface(table).as_deref(), Some("eth0"));
        let no_default = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
            eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\n";
        assert_eq!(default_route_interface(no_default), None);
    }
}
