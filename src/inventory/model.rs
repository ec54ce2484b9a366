//! The typed inventory: what the user asked for, after validation.
//!
//! Every value here has already been checked; code downstream never re-validates.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use super::node_labels::{Taint, TaintEffect, ROLE_LABEL};

/// A whole, valid inventory file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inventory {
    /// The file this was read from (for messages and for resolving relative paths).
    pub path: PathBuf,
    pub controller: Controller,
    pub cluster: Cluster,
    pub os: Os,
    /// Nodes by name, in name order.
    pub nodes: BTreeMap<String, Node>,
}

/// How the controller answers DHCP on the provisioning network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    /// Boot information only, beside the home router's DHCP server (default).
    Proxy,
    /// Full DHCP server with static leases, for a dedicated network.
    Authoritative,
    /// No DHCP at all (another server points clients at us).
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Controller {
    /// Provisioning interface, e.g. "eth0".
    pub interface: String,
    /// The controller's address on that interface.
    pub address: Ipv4Addr,
    pub dhcp: DhcpMode,
    pub http_port: u16,
    pub tftp: bool,
    /// Required in authoritative mode; optional otherwise (then used for checks only).
    pub subnet: Option<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// Dynamic pool for clients not in the inventory (authoritative mode).
    pub pool: Option<AddrRange>,
    /// Lease time in seconds.
    pub lease_time: u32,
    /// Where the iPXE binaries live (default /usr/lib/ipxe).
    pub ipxe_dir: PathBuf,
    /// A local folder consulted for artifacts before any download (air-gap).
    pub mirror: Option<PathBuf>,
}

/// Serialises a subnet as its CIDR string (ipnet's own serde support is a feature not enabled here).
/// An inclusive range of IPv4 addresses, written "A-B".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AddrRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl AddrRange {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ip >= self.first && ip <= self.last
    }
    pub fn len(&self) -> u64 {
        u64::from(u32::from(self.last)) - u64::from(u32::from(self.first)) + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn iter(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.first)..=u32::from(self.last)).map(Ipv4Addr::from)
    }
}

impl FromStr for AddrRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once('-').ok_or_else(|| {
            format!(
                "`{s}` is not a range; write it as \"FIRST-LAST\", e.g. \"10.0.0.100-10.0.0.199\""
            )
        })?;
        let first: Ipv4Addr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{}` is not an IPv4 address", a.trim()))?;
        let last: Ipv4Addr = b
            .trim()
            .parse()
            .map_err(|_| format!("`{}` is not an IPv4 address", b.trim()))?;
        if first > last {
            return Err(format!(
                "the range starts after it ends ({first} > {last}); swap the two ends"
            ));
        }
        Ok(AddrRange { first, last })
    }
}

impl fmt::Display for AddrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cluster {
    pub name: String,
    pub domain: String,
    /// A k3s release, e.g. "v1.31.4+k3s1".
    pub k3s_version: String,
}

/// Empty (the default) only when every node has a custom boot profile and [os] was omitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Os {
    /// An https URL, or a local path (written relative to the inventory, stored absolute).
    pub image: String,
    /// What the image's bytes must hash to, or the published list that says so.
    pub checksum: Checksum,
    /// The distribution's linux-image package (.deb) the installer's kernel
    /// and drivers are taken from. Needed by nodes that install the OS.
    pub installer_kernel: Option<Artifact>,
}

/// A file named by an https URL or a local path, and its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Artifact {
    pub source: String,
    pub checksum: Checksum,
}

/// A digest algorithm a downloaded file may be pinned with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// Hex characters of a digest.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
    /// The algorithm whose digests have `len` hex characters.
    pub fn from_hex_len(len: usize) -> Option<Algorithm> {
        [Algorithm::Sha256, Algorithm::Sha512]
            .into_iter()
            .find(|a| a.hex_len() == len)
    }
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sha256" => Ok(Algorithm::Sha256),
            "sha512" => Ok(Algorithm::Sha512),
            other => Err(format!(
                "`{other}` is not a digest algorithm (sha256 or sha512)"
            )),
        }
    }
}

/// A digest and its algorithm; the hex is lower-case and of the right length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Digest {
    pub algorithm: Algorithm,
    pub hex: String,
}

impl Digest {
    pub fn sha256(hex: impl Into<String>) -> Digest {
        Digest {
            algorithm: Algorithm::Sha256,
            hex: hex.into(),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

/// Where a file's expected digest comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Checksum {
    /// Written in the inventory (`sha256 = "…"` or `sha512 = "…"`).
    Digest(Digest),
    /// A published checksum list (SHA512SUMS, SHA256SUMS or a Debian Packages
    /// index; an https URL or an absolute path), looked up by the file's name
    /// once and then pinned in the state database.
    List(String),
}

impl Default for Checksum {
    fn default() -> Checksum {
        Checksum::Digest(Digest::sha256(String::new()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Server,
    Agent,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Server => "server",
            Role::Agent => "agent",
        })
    }
}

/// Which disk the OS goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Disk {
    /// The first non-removable disk.
    Auto,
    /// A device path such as /dev/nvme0n1.
    Path(String),
}

impl fmt::Display for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disk::Auto => f.write_str("auto"),
            Disk::Path(p) => f.write_str(p),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Power {
    /// Send a Wake-on-LAN magic packet when the node needs to boot.
    pub wol: bool,
}

/// A custom boot profile served instead of the installer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootProfile {
    /// Absolute path of the kernel on the controller (resolved against the inventory's folder).
    pub kernel: PathBuf,
    pub initrd: Vec<PathBuf>,
    pub cmdline: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub name: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub role: Role,
    pub disk: Disk,
    pub power: Power,
    pub boot: Option<BootProfile>,
    /// Wipe and reinstall on the next boot (consumed once).
    pub reinstall: bool,
    /// Kubernetes node labels (set through k3s's `node-label`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Kubernetes node taints (set through k3s's `node-taint`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
}

/// An Ethernet MAC address. Displays as lower-case "aa:bb:cc:dd:ee:ff".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        let bad = || {
            format!("`{s}` is not a MAC address; write six hex pairs such as \"52:54:00:12:34:56\"")
        };
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut out = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            // Hex digits only: from_str_radix also takes a sign ("+a").
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            out[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Inventory {
    pub fn node_by_mac(&self, mac: MacAddr) -> Option<&Node> {
        self.nodes.values().find(|n| n.mac == mac)
    }
    pub fn servers(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().filter(|n| n.role == Role::Server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_normalises() {
        let m: MacAddr = "52-54-00-AB-cd-01".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:0g".parse::<MacAddr>().is_err());
        // Found by fuzzing (fuzz/regressions/http_path/): a sign is no hex digit.
        assert!("52:54:00:ab:cd:+1".parse::<MacAddr>().is_err());
    }

    #[test]
    fn range_parses_and_counts() {
        let r: AddrRange = "10.0.0.10-10.0.0.19".parse().unwrap();
        assert_eq!(r.len(), 10);
        assert!(r.contains("10.0.0.15".parse().unwrap()));
        assert!(!r.contains("10.0.0.20".parse().unwrap()));
        assert!("10.0.0.19-10.0.0.10".parse::<AddrRange>().is_err());
    }
}
