//! What a lab is made of, decided without touching the machine: the
//! namespace's name, the private network, and each VM's name, MAC, address,
//! firmware and tap. Saved as `lab.json` so a re-run and `lab down` find the
//! same lab.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The lab's private network. It exists only inside the lab's namespace, so
/// it can never meet the host's networks and every lab can use the same one.
pub const NETWORK: [u8; 3] = [10, 77, 0];
/// The bridge inside the namespace that the controller and every tap share.
pub const BRIDGE: &str = "br0";
/// The controller's HTTP port inside the lab.
pub const HTTP_PORT: u16 = 8080;
/// More VMs than this would not install in any useful time on a small host.
pub const MAX_NODES: u8 = 9;

/// Which firmware the VMs get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FirmwareChoice {
    /// SeaBIOS on every VM.
    Bios,
    /// OVMF (UEFI) on every VM.
    Uefi,
    /// Alternating: node1 BIOS, node2 UEFI, node3 BIOS, ...
    Mixed,
}

/// One VM's firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Bios,
    Uefi,
}

impl fmt::Display for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        })
    }
}

/// One VM of the lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabNode {
    /// Its inventory name (`node1`, ...), also the VM's directory name.
    pub name: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub role: String,
    pub firmware: Firmware,
    /// Its tap device inside the namespace.
    pub tap: String,
}

/// A whole lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    pub name: String,
    pub netns: String,
    pub controller: Ipv4Addr,
    pub nodes: Vec<LabNode>,
    /// The OS image and the installer's kernel package the inventory names.
    pub image: PathBuf,
    pub installer_kernel: PathBuf,
    /// A k3s release mirror for the controller (`[controller] mirror`).
    #[serde(default)]
    pub k3s_mirror: Option<PathBuf>,
    pub memory_mb: u32,
    pub disk_gib: u32,
}

/// Lab names become namespace and file names: keep them short and plain.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 12
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "lab name `{name}`: use 1 to 12 lower-case letters, digits or dashes (e.g. `lab`)"
        ))
    }
}

/// Plans a lab of `nodes` VMs. Node 1 is the k3s server, the rest agents.
pub fn plan(
    name: &str,
    nodes: u8,
    firmware: FirmwareChoice,
    image: PathBuf,
    installer_kernel: PathBuf,
) -> Result<LabSpec, String> {
    check_name(name)?;
    if nodes == 0 || nodes > MAX_NODES {
        return Err(format!("--nodes {nodes}: a lab has 1 to {MAX_NODES} VMs"));
    }
    let [a, b, c] = NETWORK;
    let nodes = (1..=nodes)
        .map(|i| LabNode {
            name: format!("node{i}"),
            mac: format!("52:54:00:{a:02x}:{c:02x}:{i:02x}"),
            ip: Ipv4Addr::new(a, b, c, 10 + i),
            role: if i == 1 { "server" } else { "agent" }.into(),
            firmware: match firmware {
                FirmwareChoice::Bios => Firmware::Bios,
                FirmwareChoice::Uefi => Firmware::Uefi,
                FirmwareChoice::Mixed if i % 2 == 1 => Firmware::Bios,
                FirmwareChoice::Mixed => Firmware::Uefi,
            },
            tap: format!("tap{i}"),
        })
        .collect();
    Ok(LabSpec {
        name: name.into(),
        netns: format!("homelab-{name}"),
        controller: Ipv4Addr::new(a, b, c, 1),
        nodes,
        image,
        installer_kernel,
        k3s_mirror: None,
        memory_mb: 1024,
        disk_gib: 4,
    })
}

impl LabSpec {
    pub fn subnet(&self) -> String {
        let [a, b, c] = NETWORK;
        format!("{a}.{b}.{c}.0/24")
    }

    /// Addresses DHCP may hand to machines that are not in the inventory.
    pub fn pool(&self) -> String {
        let [a, b, c] = NETWORK;
        format!("{a}.{b}.{c}.100-{a}.{b}.{c}.199")
    }

    pub fn node(&self, name: &str) -> Option<&LabNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Firmware counts for messages: "2 VMs (1 bios, 1 uefi)".
    pub fn describe(&self) -> String {
        let bios = self
            .nodes
            .iter()
            .filter(|n| n.firmware == Firmware::Bios)
            .count();
        let n = self.nodes.len();
        format!(
            "{n} VM{} ({bios} bios, {} uefi)",
            if n == 1 { "" } else { "s" },
            n - bios
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: u8, fw: FirmwareChoice) -> Result<LabSpec, String> {
        plan("lab", n, fw, "/i.raw".into(), "/k.deb".into())
    }

    #[test]
    fn mixed_alternates_firmware_and_node1_is_the_server() {
        let s = spec(3, FirmwareChoice::Mixed).unwrap();
        let fw: Vec<_> = s.nodes.iter().map(|n| n.firmware).collect();
        assert_eq!(fw, [Firmware::Bios, Firmware::Uefi, Firmware::Bios]);
        let roles: Vec<_> = s.nodes.iter().map(|n| n.role.as_str()).collect();
        assert_eq!(roles, ["server", "agent", "agent"]);
        assert_eq!(s.nodes[2].ip, Ipv4Addr::new(10, 77, 0, 13));
        assert_eq!(s.nodes[2].mac, "52:54:00:0a:00:03");
        assert_eq!(s.netns, "homelab-lab");
        assert_eq!(s.describe(), "3 VMs (2 bios, 1 uefi)");
    }

    #[test]
    fn addresses_and_macs_are_distinct_and_outside_the_pool() {
        let s = spec(MAX_NODES, FirmwareChoice::Uefi).unwrap();
        let mut macs: Vec<_> = s.nodes.iter().map(|n| &n.mac).collect();
        macs.dedup();
        assert_eq!(macs.len(), MAX_NODES as usize);
        assert!(s.nodes.iter().all(|n| n.ip.octets()[3] < 100));
        assert!(s.nodes.iter().all(|n| n.firmware == Firmware::Uefi));
    }

    #[test]
    fn bad_sizes_and_names_are_refused_with_the_rule() {
        assert!(spec(0, FirmwareChoice::Bios)
            .unwrap_err()
            .contains("1 to 9"));
        assert!(spec(10, FirmwareChoice::Bios).is_err());
        for bad in ["", "Lab", "a b", "-x", "much-too-long-name"] {
            let e = plan(bad, 1, FirmwareChoice::Bios, "/i".into(), "/k".into()).unwrap_err();
            assert!(e.contains("lower-case"), "{bad}: {e}");
        }
    }
}
