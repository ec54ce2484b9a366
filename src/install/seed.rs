//! The files the installer writes into a node's installed system: the
//! cloud-init NoCloud seed (hostname, static network, the controller's SSH
//! key, phone home) and sshd's settings, rendered from cloud-init/.

use std::net::Ipv4Addr;

use anyhow::Result;
use minijinja::context;

use super::protocol::SeedFile;
use crate::inventory::{Inventory, Node};
use crate::templates::Templates;

/// The node's network as the installed system will configure it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

impl Network {
    /// The inventory's subnet, gateway and DNS when it has them; otherwise
    /// what the installer learned from DHCP (`netmask`, `gateway`).
    pub fn for_node(
        inv: &Inventory,
        netmask_prefix: Option<u8>,
        dhcp_gateway: Option<Ipv4Addr>,
    ) -> Network {
        let c = &inv.controller;
        let gateway = c.gateway.or(dhcp_gateway);
        Network {
            prefix: c
                .subnet
                .map(|s| s.prefix_len())
                .or(netmask_prefix)
                .unwrap_or(24),
            gateway,
            dns: if c.dns.is_empty() {
                gateway.into_iter().collect()
            } else {
                c.dns.clone()
            },
        }
    }
}

const SEED_DIR: &str = "/var/lib/cloud/seed/nocloud";

pub fn render(
    templates: &Templates,
    inv: &Inventory,
    node: &Node,
    attempt: i64,
    net: &Network,
    authorized_key: &str,
    phone_home_url: &str,
) -> Result<Vec<SeedFile>> {
    let ctx = context! {
        name => node.name.clone(),
        fqdn => format!("{}.{}", node.name, inv.cluster.domain),
        attempt => attempt,
        mac => node.mac.to_string(),
        ip => node.ip.to_string(),
        prefix => net.prefix,
        gateway => net.gateway.map(|g| g.to_string()),
        dns => net.dns.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        authorized_key => authorized_key.trim(),
        phone_home_url => phone_home_url,
    };
    let file = |path: &str, mode: u32, template: &str| -> Result<SeedFile> {
        Ok(SeedFile {
            path: path.to_string(),
            mode,
            content: templates.render(template, ctx.clone())?,
        })
    };
    Ok(vec![
        file(
            &format!("{SEED_DIR}/meta-data"),
            0o600,
            "cloud-init/meta-data.j2",
        )?,
        file(
            &format!("{SEED_DIR}/user-data"),
            0o600,
            "cloud-init/user-data.j2",
        )?,
        file(
            &format!("{SEED_DIR}/network-config"),
            0o600,
            "cloud-init/network-config.j2",
        )?,
        file(
            "/etc/ssh/sshd_config.d/homelab.conf",
            0o644,
            "cloud-init/sshd-homelab.conf.j2",
        )?,
    ])
}
