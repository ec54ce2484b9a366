//! Walks the spanned TOML tree by hand, turning each value into its typed form and
//! recording a positioned diagnostic for every problem instead of stopping at the first.
//!
//! The result is a [`Draft`]: everything that could be read, with the source spans the
//! cross-field checks in `validate` need to point at.

use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::diagnostic::{line_col, Diagnostic, Severity};
use super::model::{
    AddrRange, Algorithm, BootProfile, Checksum, DhcpMode, Digest, Disk, MacAddr, Power, Role,
};
use super::node_labels::{self, Taint};
use std::collections::BTreeMap;

pub(crate) type Span = Range<usize>;

/// A value and where it was written.
#[derive(Debug, Clone)]
pub(crate) struct At<T> {
    pub value: T,
    pub span: Span,
}

/// Collects diagnostics for one file.
pub(crate) struct Ctx<'a> {
    pub src: &'a str,
    pub file: &'a Path,
    /// Absolute folder of the inventory, for relative paths.
    pub base_dir: PathBuf,
    pub diags: Vec<Diagnostic>,
}

impl<'a> Ctx<'a> {
    pub fn new(src: &'a str, file: &'a Path, base_dir: PathBuf) -> Self {
        Ctx {
            src,
            file,
            base_dir,
            diags: Vec::new(),
        }
    }
    pub fn error(
        &mut self,
        span: Span,
        key: &str,
        message: impl Into<String>,
        help: impl Into<String>,
    ) {
        self.diags.push(Diagnostic::at(
            Severity::Error,
            self.file,
            self.src,
            span,
            key,
            message,
            help,
        ));
    }
    pub fn warn(
        &mut self,
        span: Span,
        key: &str,
        message: impl Into<String>,
        help: impl Into<String>,
    ) {
        self.diags.push(Diagnostic::at(
            Severity::Warning,
            self.file,
            self.src,
            span,
            key,
            message,
            help,
        ));
    }
    pub fn error_file(&mut self, key: &str, message: impl Into<String>, help: impl Into<String>) {
        self.diags.push(Diagnostic::whole_file(
            Severity::Error,
            self.file,
            key,
            message,
            help,
        ));
    }
    pub fn has_errors(&self) -> bool {
        self.diags.iter().any(Diagnostic::is_error)
    }
    /// 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        line_col(self.src, offset).0
    }
}

// ---------------------------------------------------------------------------------------
// The schema: every key a table accepts, with an example line used in help texts.

type Fields = &'static [(&'static str, &'static str)];

const ROOT: Fields = &[
    ("controller", "[controller]"),
    ("cluster", "[cluster]"),
    ("os", "[os]"),
    ("nodes", "[nodes.node1]"),
];
const CONTROLLER: Fields = &[
    ("interface", "interface = \"eth0\""),
    ("address", "address = \"192.168.50.2\""),
    ("dhcp", "dhcp = \"proxy\""),
    ("http_port", "http_port = 8080"),
    ("tftp", "tftp = true"),
    ("ipxe_dir", "ipxe_dir = \"/usr/lib/ipxe\""),
    ("mirror", "mirror = \"/srv/homelab-mirror\""),
    ("subnet", "subnet = \"192.168.50.0/24\""),
    ("gateway", "gateway = \"192.168.50.1\""),
    ("dns", "dns = [\"192.168.50.1\", \"1.1.1.1\"]"),
    ("pool", "pool = \"192.168.50.100-192.168.50.199\""),
    ("lease_time", "lease_time = 3600"),
];
/// Keys of [controller] only used by an authoritative DHCP server.
pub(crate) const AUTHORITATIVE_ONLY: &[&str] = &["gateway", "dns", "pool", "lease_time"];
const CLUSTER: Fields = &[
    ("name", "name = \"homelab\""),
    ("domain", "domain = \"home.arpa\""),
    ("k3s_version", "k3s_version = \"v1.31.4+k3s1\""),
];
const OS: Fields = &[
    (
        "image",
        "image = \"https://example.org/images/debian-12-amd64.raw\"",
    ),
    ("sha256", "sha256 = \"<64 hex characters>\""),
    ("sha512", "sha512 = \"<128 hex characters>\""),
    (
        "checksums",
        "checksums = \"https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS\"",
    ),
    (
        "installer_kernel",
        "installer_kernel = \"https://deb.debian.org/debian/pool/main/l/linux-signed-amd64/linux-image-6.1.0-28-amd64_6.1.119-1_amd64.deb\"",
    ),
    ("installer_kernel_sha256", "installer_kernel_sha256 = \"<64 hex characters>\""),
    (
        "installer_kernel_checksums",
        "installer_kernel_checksums = \"https://deb.debian.org/debian/dists/bookworm/main/binary-amd64/Packages.xz\"",
    ),
];
const NODE: Fields = &[
    ("mac", "mac = \"52:54:00:12:34:56\""),
    ("ip", "ip = \"192.168.50.11\""),
    ("role", "role = \"server\""),
    ("disk", "disk = \"auto\""),
    ("power", "power = { wol = true }"),
    ("boot", "boot = { kernel = \"boot/vmlinuz\", initrd = [\"boot/initrd.img\"], cmdline = \"console=ttyS0\" }"),
    ("reinstall", "reinstall = true"),
    ("labels", "labels = { disk = \"ssd\", \"topology.kubernetes.io/zone\" = \"rack1\" }"),
    ("taints", "taints = [\"dedicated=gpu:NoSchedule\"]"),
];
const POWER: Fields = &[("wol", "wol = true")];
const BOOT: Fields = &[
    ("kernel", "kernel = \"boot/vmlinuz\""),
    ("initrd", "initrd = [\"boot/initrd.img\"]"),
    ("cmdline", "cmdline = \"console=ttyS0\""),
];

/// The closest candidate to `word`, if one is close enough to be a likely typo.
pub(crate) fn suggest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let word = word.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(&word, c), *c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

// ---------------------------------------------------------------------------------------
// What the walk produces.

#[derive(Debug)]
pub(crate) struct Draft {
    pub controller: Option<DraftController>,
    pub cluster: Option<DraftCluster>,
    pub os: Option<DraftOs>,
    /// Whether an `os` key was written at all (even if it had errors).
    pub os_given: bool,
    /// Where [nodes] is (None when absent).
    pub nodes_span: Option<Span>,
    /// Nodes in source order.
    pub nodes: Vec<DraftNode>,
}

#[derive(Debug)]
pub(crate) struct DraftController {
    pub interface: Option<String>,
    pub address: Option<At<Ipv4Addr>>,
    pub dhcp: DhcpMode,
    /// The `dhcp` value, or the table when defaulted.
    pub dhcp_span: Span,
    pub http_port: u16,
    pub tftp: bool,
    pub ipxe_dir: PathBuf,
    pub mirror: Option<PathBuf>,
    pub subnet: Option<At<Ipv4Net>>,
    pub gateway: Option<At<Ipv4Addr>>,
    pub dns: Vec<Ipv4Addr>,
    pub pool: Option<At<AddrRange>>,
    pub lease_time: u32,
    /// Authoritative-only keys that were written, with their key spans.
    pub authoritative_keys: Vec<(&'static str, Span)>,
}

#[derive(Debug)]
pub(crate) struct DraftCluster {
    pub name: String,
    pub domain: String,
    pub k3s_version: Option<String>,
}

#[derive(Debug)]
pub(crate) struct DraftOs {
    pub image: Option<String>,
    pub checksum: Option<Checksum>,
    pub installer_kernel: Option<String>,
    pub installer_kernel_checksum: Option<Checksum>,
}

#[derive(Debug)]
pub(crate) struct DraftNode {
    pub name: String,
    /// The node's table (its [nodes.NAME] header).
    pub span: Span,
    pub mac: Option<At<MacAddr>>,
    pub ip: Option<At<Ipv4Addr>>,
    pub role: Option<At<Role>>,
    pub disk: Disk,
    pub power: Power,
    /// Whether a `boot` key was written at all (even if it had errors).
    pub has_boot: bool,
    pub boot: Option<BootProfile>,
    pub reinstall: bool,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
}

// ---------------------------------------------------------------------------------------
// Reading tables and typed values.

type Value<'i> = Spanned<DeValue<'i>>;

/// A table being read, with its dotted path.
struct Table<'a, 'i> {
    /// e.g. "nodes.node1"; empty for the top level.
    path: String,
    span: Span,
    map: &'a DeTable<'i>,
    fields: Fields,
}

impl<'a, 'i> Table<'a, 'i> {
    fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }
    fn describe(&self) -> String {
        if self.path.is_empty() {
            "the top level".to_string()
        } else {
            format!("[{}]", self.path)
        }
    }
    /// "in [path]" or "at the top level".
    fn within(&self) -> String {
        if self.path.is_empty() {
            "at the top level".to_string()
        } else {
            format!("in [{}]", self.path)
        }
    }
    fn get(&self, name: &str) -> Option<&'a Value<'i>> {
        self.map.get(name)
    }
    fn example(&self, name: &str) -> &'static str {
        self.fields
            .iter()
            .find(|(k, _)| *k == name)
            .map_or("", |(_, e)| e)
    }
    fn names(&self) -> Vec<&'static str> {
        self.fields.iter().map(|(k, _)| *k).collect()
    }

    /// Report every key the schema does not know, with a did-you-mean.
    fn check_unknown(&self, ctx: &mut Ctx) {
        let names = self.names();
        for (key, _) in self.map.iter() {
            let k = key.get_ref().as_ref();
            if names.contains(&k) {
                continue;
            }
            let listed = names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let special = if self.fields == NODE && k == "wol" {
                Some((
                    "power",
                    "Wake-on-LAN goes in the power table: power = { wol = true }".to_string(),
                ))
            } else if self.fields == NODE && matches!(k, "name" | "hostname") {
                Some((
                    "",
                    "a node's name is its table name: [nodes.NAME]; remove this key".to_string(),
                ))
            } else {
                None
            };
            let (message, help) = match (special, suggest(k, &names)) {
                (Some((s, help)), _) if !s.is_empty() => (
                    format!("unknown key `{k}` {}; did you mean `{s}`?", self.within()),
                    help,
                ),
                (Some((_, help)), _) => (format!("unknown key `{k}` {}", self.within()), help),
                (None, Some(s)) => (
                    format!("unknown key `{k}` {}; did you mean `{s}`?", self.within()),
                    format!(
                        "rename it to `{s}`; the keys of {} are {listed}",
                        self.describe()
                    ),
                ),
                (None, None) => (
                    format!("unknown key `{k}` {}", self.within()),
                    format!("remove it; the keys of {} are {listed}", self.describe()),
                ),
            };
            ctx.error(key.span(), &self.key(k), message, help);
        }
    }

    /// Report `name` as missing when it is, pointing at the table.
    fn require(&self, ctx: &mut Ctx, name: &str) -> bool {
        if self.get(name).is_some() {
            return true;
        }
        // A misspelling already reported as "did you mean `name`?" says it all.
        let prefix = self.key("");
        let hint = format!("did you mean `{name}`?");
        if ctx
            .diags
            .iter()
            .any(|d| d.key.starts_with(&prefix) && d.message.ends_with(&hint))
        {
            return false;
        }
        ctx.error(
            self.span.clone(),
            &self.key(name),
            format!("missing `{name}` {}", self.within()),
            format!("add a line such as: {}", self.example(name)),
        );
        false
    }

    fn type_error(&self, ctx: &mut Ctx, name: &str, value: &Value, expected: &str) {
        ctx.error(
            value.span(),
            &self.key(name),
            format!("expected {expected}, found {}", a_type(value.get_ref())),
            format!("write it like this: {}", self.example(name)),
        );
    }

    fn string(&self, ctx: &mut Ctx, name: &str) -> Option<At<String>> {
        let v = self.get(name)?;
        match v.get_ref() {
            DeValue::String(s) => Some(At {
                value: s.to_string(),
                span: v.span(),
            }),
            _ => {
                self.type_error(ctx, name, v, "a string");
                None
            }
        }
    }

    fn boolean(&self, ctx: &mut Ctx, name: &str) -> Option<bool> {
        let v = self.get(name)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.type_error(ctx, name, v, "true or false");
                None
            }
        }
    }

    /// An integer in `range`.
    fn integer(
        &self,
        ctx: &mut Ctx,
        name: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<i64> {
        let v = self.get(name)?;
        let DeValue::Integer(i) = v.get_ref() else {
            self.type_error(ctx, name, v, "an integer");
            return None;
        };
        match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) if range.contains(&n) => Some(n),
            _ => {
                ctx.error(
                    v.span(),
                    &self.key(name),
                    format!("{} is out of range", &ctx.src[v.span()]),
                    format!(
                        "use a number from {} to {}, e.g. {}",
                        range.start(),
                        range.end(),
                        self.example(name)
                    ),
                );
                None
            }
        }
    }

    /// A sub-table (a `[a.b]` header, a dotted key or an inline table).
    fn table(&self, ctx: &mut Ctx, name: &str, fields: Fields) -> Option<Table<'a, 'i>> {
        let v = self.get(name)?;
        match v.get_ref() {
            DeValue::Table(map) => Some(Table {
                path: self.key(name),
                span: v.span(),
                map,
                fields,
            }),
            _ => {
                self.type_error(ctx, name, v, "a table");
                None
            }
        }
    }
}

fn a_type(v: &DeValue) -> String {
    let t = v.type_str();
    let article = if t.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {t}")
}

// ---------------------------------------------------------------------------------------
// Value checks shared by several keys.

/// Why `name` is not a valid hostname label, if it is not.
pub(crate) fn label_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.len() > 63 {
        Some("is longer than 63 characters")
    } else if name.chars().any(|c| c.is_ascii_uppercase()) {
        Some("contains upper-case letters")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        Some("contains characters other than a-z, 0-9 and '-'")
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("starts or ends with '-'")
    } else {
        None
    }
}

/// A valid label close to `name`, to suggest.
fn label_fix(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out: String = out.trim_matches('-').chars().take(63).collect();
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "node1".into()
    } else {
        out
    }
}

/// Whether `v` is a k3s release tag: vMAJOR.MINOR.PATCH+k3sN.
pub(crate) fn is_k3s_version(v: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some(rest) = v.strip_prefix('v') else {
        return false;
    };
    let Some((semver, build)) = rest.split_once('+') else {
        return false;
    };
    let parts: Vec<&str> = semver.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| digits(p))
        && build.strip_prefix("k3s").is_some_and(digits)
}

fn parse_ipv4(ctx: &mut Ctx, key: &str, at: &At<String>) -> Option<Ipv4Addr> {
    let s = at.value.trim();
    match s.parse::<Ipv4Addr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            let help = if let Some((addr, _)) = s.split_once('/') {
                format!("write the address without a prefix length: \"{addr}\"; the network goes in controller.subnet")
            } else {
                "write four numbers from 0 to 255 separated by dots, such as \"192.168.50.10\""
                    .to_string()
            };
            ctx.error(
                at.span.clone(),
                key,
                format!("`{}` is not an IPv4 address", at.value),
                help,
            );
            None
        }
    }
}

/// An address a machine can own (not 0.0.0.0, loopback, multicast or broadcast).
fn host_address(ctx: &mut Ctx, key: &str, at: &At<String>) -> Option<At<Ipv4Addr>> {
    let ip = parse_ipv4(ctx, key, at)?;
    let what = if ip.is_unspecified() {
        "the unspecified address"
    } else if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_multicast() {
        "a multicast address"
    } else if ip.is_broadcast() {
        "the broadcast address"
    } else {
        return Some(At {
            value: ip,
            span: at.span.clone(),
        });
    };
    ctx.error(
        at.span.clone(),
        key,
        format!("`{ip}` is {what}, not a host address"),
        "use the machine's address on the provisioning network, such as \"192.168.50.10\"",
    );
    None
}

/// Resolve a path against the inventory's folder (absolute paths stay as they are).
fn resolve(ctx: &Ctx, p: &str) -> PathBuf {
    ctx.base_dir.join(p)
}

/// A file that must exist, resolved to an absolute path.
fn existing_file(ctx: &mut Ctx, key: &str, at: &At<String>) -> Option<PathBuf> {
    if at.value.trim().is_empty() {
        ctx.error(
            at.span.clone(),
            key,
            "the path is empty",
            "name a file, e.g. \"boot/vmlinuz\"",
        );
        return None;
    }
    let path = resolve(ctx, &at.value);
    let relative_note = if Path::new(&at.value).is_absolute() {
        String::new()
    } else {
        format!(
            "; relative paths are resolved against the inventory's folder ({})",
            ctx.base_dir.display()
        )
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Some(path),
        Ok(_) => {
            ctx.error(
                at.span.clone(),
                key,
                format!(
                    "`{}` is a directory, not a file ({})",
                    at.value,
                    path.display()
                ),
                format!("name the file inside it{relative_note}"),
            );
            None
        }
        Err(e) => {
            let what = if e.kind() == std::io::ErrorKind::NotFound {
                "does not exist".to_string()
            } else {
                format!("cannot be read: {e}")
            };
            ctx.error(
                at.span.clone(),
                key,
                format!("`{}` {what} (looked for {})", at.value, path.display()),
                format!("put the file there or fix the path{relative_note}"),
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------------------
// The walk.

pub(crate) fn document(ctx: &mut Ctx, root: &Spanned<DeTable>) -> Draft {
    let top = Table {
        path: String::new(),
        span: root.span(),
        map: root.get_ref(),
        fields: ROOT,
    };
    top.check_unknown(ctx);

    let controller = match top.table(ctx, "controller", CONTROLLER) {
        Some(t) => Some(controller(ctx, &t)),
        None => {
            if top.get("controller").is_none() {
                ctx.error_file(
                    "controller",
                    "missing [controller] table",
                    "add a [controller] table with at least interface = \"eth0\" and address = \"192.168.50.2\" \
                     (the controller's network interface and its address on it)",
                );
            }
            None
        }
    };

    let cluster = match top.table(ctx, "cluster", CLUSTER) {
        Some(t) => Some(cluster(ctx, &t)),
        None => {
            if top.get("cluster").is_none() {
                ctx.error_file(
                    "cluster",
                    "missing [cluster] table",
                    "add a [cluster] table with at least k3s_version = \"v1.31.4+k3s1\"",
                );
            }
            None
        }
    };

    // A missing [os] is judged in `validate`: it is fine when every node has a boot profile.
    let os = top.table(ctx, "os", OS).map(|t| os(ctx, &t));

    let mut nodes = Vec::new();
    let mut nodes_span = None;
    if let Some(v) = top.get("nodes") {
        nodes_span = Some(v.span());
        match v.get_ref() {
            DeValue::Table(map) => {
                for (name, value) in map.iter() {
                    if let Some(n) = node(ctx, name, value) {
                        nodes.push(n);
                    }
                }
            }
            DeValue::Array(_) => ctx.error(
                v.span(),
                "nodes",
                "nodes must be tables named after the node, not an array of tables",
                "write each node as its own table named by its hostname: [nodes.node1] (not [[nodes]])",
            ),
            other => ctx.error(
                v.span(),
                "nodes",
                format!("expected a table of nodes, found {}", a_type(other)),
                "write each node as its own table named by its hostname: [nodes.node1]",
            ),
        }
    }
    nodes.sort_by_key(|n| n.span.start);

    Draft {
        controller,
        cluster,
        os,
        os_given: top.get("os").is_some(),
        nodes_span,
        nodes,
    }
}

fn controller(ctx: &mut Ctx, t: &Table) -> DraftController {
    t.check_unknown(ctx);

    let mut interface = None;
    if t.require(ctx, "interface") {
        if let Some(at) = t.string(ctx, "interface") {
            let s = at.value.as_str();
            if s.is_empty() || s.len() > 15 || s.contains(['/', ' ', '\t']) {
                ctx.error(
                    at.span,
                    &t.key("interface"),
                    format!("`{s}` is not a network interface name"),
                    "use the name `ip link` shows for the interface on the provisioning network, e.g. \"eth0\" or \"enp1s0\"",
                );
            } else {
                interface = Some(at.value);
            }
        }
    }

    let mut dhcp = DhcpMode::Proxy;
    let mut dhcp_span = t.span.clone();
    if let Some(at) = t.string(ctx, "dhcp") {
        dhcp_span = at.span.clone();
        match at.value.as_str() {
            "proxy" => dhcp = DhcpMode::Proxy,
            "authoritative" => dhcp = DhcpMode::Authoritative,
            "off" => dhcp = DhcpMode::Off,
            other => {
                let mean = suggest(other, &["proxy", "authoritative", "off"])
                    .map(|s| format!("; did you mean \"{s}\"?"))
                    .unwrap_or_default();
                ctx.error(
                    at.span,
                    &t.key("dhcp"),
                    format!("`{other}` is not a DHCP mode{mean}"),
                    "use \"proxy\" (beside your router's DHCP server, the default), \"authoritative\" \
                     (the only DHCP server on a dedicated network) or \"off\"",
                );
            }
        }
    }

    let mut address = None;
    if t.require(ctx, "address") {
        if let Some(at) = t.string(ctx, "address") {
            let loopback = at
                .value
                .parse::<Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback());
            if loopback && dhcp == DhcpMode::Off {
                // Only useful to try homelab on one machine: nothing else can reach it.
                ctx.warn(
                    at.span.clone(),
                    &t.key("address"),
                    format!("`{}` is a loopback address: no other machine can boot from it", at.value),
                    "fine for trying homelab locally; use the address on the provisioning network for real nodes",
                );
                address = at.value.parse().ok().map(|value| At {
                    value,
                    span: at.span.clone(),
                });
            } else {
                address = host_address(ctx, &t.key("address"), &at);
            }
        }
    }

    let http_port = t
        .integer(ctx, "http_port", 1..=65535)
        .map_or(8080, |n| n as u16);
    let tftp = t.boolean(ctx, "tftp").unwrap_or(true);
    let mut ipxe_dir = PathBuf::from("/usr/lib/ipxe");
    if let Some(at) = t.string(ctx, "ipxe_dir") {
        if at.value.trim().is_empty() {
            ctx.error(
                at.span,
                &t.key("ipxe_dir"),
                "the path is empty",
                "name the folder holding undionly.kpxe and ipxe.efi, e.g. \"/usr/lib/ipxe\" (Debian's ipxe package)",
            );
        } else {
            ipxe_dir = resolve(ctx, &at.value);
        }
    }

    let mut mirror = None;
    if let Some(at) = t.string(ctx, "mirror") {
        let dir = resolve(ctx, at.value.trim());
        if at.value.trim().is_empty() || !dir.is_dir() {
            ctx.error(
                at.span,
                &t.key("mirror"),
                format!("`{}` is not a folder", at.value),
                "name an existing folder holding the OS image and the installer's kernel package \
                 (by file name or by sha256), or remove the key",
            );
        } else {
            mirror = Some(dir);
        }
    }

    let mut subnet = None;
    if let Some(at) = t.string(ctx, "subnet") {
        match at.value.trim().parse::<Ipv4Net>() {
            Ok(net) => {
                if net.trunc() != net {
                    ctx.warn(
                        at.span.clone(),
                        &t.key("subnet"),
                        format!(
                            "`{}` has host bits set; it is read as {}",
                            at.value,
                            net.trunc()
                        ),
                        format!("write the network address: subnet = \"{}\"", net.trunc()),
                    );
                }
                subnet = Some(At {
                    value: net.trunc(),
                    span: at.span,
                });
            }
            Err(_) => {
                let help = if at.value.trim().parse::<Ipv4Addr>().is_ok() {
                    format!("add the prefix length, e.g. \"{}/24\"", at.value.trim())
                } else {
                    "write the network in CIDR form, such as \"192.168.50.0/24\"".to_string()
                };
                ctx.error(
                    at.span,
                    &t.key("subnet"),
                    format!("`{}` is not a subnet", at.value),
                    help,
                );
            }
        }
    }

    let mut gateway = None;
    if let Some(at) = t.string(ctx, "gateway") {
        gateway = host_address(ctx, &t.key("gateway"), &at);
    }

    let mut dns = Vec::new();
    if let Some(v) = t.get("dns") {
        match v.get_ref() {
            DeValue::Array(items) => {
                for item in items.iter() {
                    match item.get_ref() {
                        DeValue::String(s) => {
                            let at = At {
                                value: s.to_string(),
                                span: item.span(),
                            };
                            if let Some(ip) = parse_ipv4(ctx, &t.key("dns"), &at) {
                                dns.push(ip);
                            }
                        }
                        other => ctx.error(
                            item.span(),
                            &t.key("dns"),
                            format!("expected an address in quotes, found {}", a_type(other)),
                            format!("write it like this: {}", t.example("dns")),
                        ),
                    }
                }
            }
            _ => t.type_error(ctx, "dns", v, "a list of addresses"),
        }
    }

    let mut pool = None;
    if let Some(at) = t.string(ctx, "pool") {
        match at.value.parse::<AddrRange>() {
            Ok(r) => {
                pool = Some(At {
                    value: r,
                    span: at.span,
                })
            }
            Err(e) => {
                let (message, help) = match e.split_once("; ") {
                    Some((m, h)) => (m.to_string(), h.to_string()),
                    None => (
                        e,
                        "write it as \"FIRST-LAST\", e.g. \"192.168.50.100-192.168.50.199\""
                            .to_string(),
                    ),
                };
                ctx.error(at.span, &t.key("pool"), message, help);
            }
        }
    }

    let lease_time = t
        .integer(ctx, "lease_time", 1..=i64::from(u32::MAX))
        .map_or(3600, |n| n as u32);

    let authoritative_keys = AUTHORITATIVE_ONLY
        .iter()
        .filter_map(|k| t.map.get_key_value(*k).map(|(key, _)| (*k, key.span())))
        .collect();

    DraftController {
        interface,
        address,
        dhcp,
        dhcp_span,
        http_port,
        tftp,
        ipxe_dir,
        mirror,
        subnet,
        gateway,
        dns,
        pool,
        lease_time,
        authoritative_keys,
    }
}

fn cluster(ctx: &mut Ctx, t: &Table) -> DraftCluster {
    t.check_unknown(ctx);

    let mut name = "homelab".to_string();
    if let Some(at) = t.string(ctx, "name") {
        match label_problem(&at.value) {
            None => name = at.value,
            Some(problem) => ctx.error(
                at.span,
                &t.key("name"),
                format!("cluster name `{}` {problem}", at.value),
                format!(
                    "use lower-case letters, digits and '-' (at most 63 characters), e.g. name = \"{}\"",
                    label_fix(&at.value)
                ),
            ),
        }
    }

    let mut domain = "home.arpa".to_string();
    if let Some(at) = t.string(ctx, "domain") {
        let d = at.value.trim_end_matches('.');
        match d.split('.').find_map(label_problem) {
            None if d.len() <= 253 => domain = d.to_string(),
            problem => ctx.error(
                at.span,
                &t.key("domain"),
                format!("`{}` is not a DNS domain ({})", at.value, problem.unwrap_or("is too long")),
                "use lower-case labels separated by dots, e.g. \"home.arpa\" (the name reserved for home networks) \
                 or \"lab.example.com\"",
            ),
        }
    }

    let mut k3s_version = None;
    if t.require(ctx, "k3s_version") {
        if let Some(at) = t.string(ctx, "k3s_version") {
            let v = at.value.trim();
            if is_k3s_version(v) {
                k3s_version = Some(v.to_string());
            } else {
                let help = if is_k3s_version(&format!("v{v}")) {
                    format!("add the leading \"v\": \"v{v}\"")
                } else if !v.contains('+') && is_k3s_version(&format!("{v}+k3s1")) {
                    format!("add the k3s build suffix, e.g. \"{v}+k3s1\" (see https://github.com/k3s-io/k3s/releases)")
                } else {
                    "use a k3s release tag vMAJOR.MINOR.PATCH+k3sN, such as \"v1.31.4+k3s1\" \
                     (see https://github.com/k3s-io/k3s/releases)"
                        .to_string()
                };
                ctx.error(
                    at.span,
                    &t.key("k3s_version"),
                    format!("`{}` is not a k3s version", at.value),
                    help,
                );
            }
        }
    }

    DraftCluster {
        name,
        domain,
        k3s_version,
    }
}

fn os(ctx: &mut Ctx, t: &Table) -> DraftOs {
    t.check_unknown(ctx);
    let image = if t.require(ctx, "image") {
        source(ctx, t, "image")
    } else {
        None
    };
    let checksum = checksum_choice(
        ctx,
        t,
        "the image",
        &[("sha256", Algorithm::Sha256), ("sha512", Algorithm::Sha512)],
        "checksums",
        true,
    );
    let installer_kernel = t
        .get("installer_kernel")
        .and_then(|_| source(ctx, t, "installer_kernel"));
    let kernel_keys = ["installer_kernel_sha256", "installer_kernel_checksums"];
    let installer_kernel_checksum = checksum_choice(
        ctx,
        t,
        "installer_kernel",
        &[("installer_kernel_sha256", Algorithm::Sha256)],
        "installer_kernel_checksums",
        false,
    );
    let kernel_sum_given = kernel_keys.iter().any(|k| t.get(k).is_some());
    if t.get("installer_kernel").is_some() != kernel_sum_given && !ctx.has_errors() {
        ctx.error(
            t.span.clone(),
            &t.key("installer_kernel"),
            "installer_kernel and its checksum go together",
            "give both: the package (URL or path) and either installer_kernel_checksums (the \
             archive's Packages index, e.g. \"https://deb.debian.org/debian/dists/bookworm/main/binary-amd64/Packages.xz\") \
             or installer_kernel_sha256 (`sha256sum FILE`)",
        );
    }
    DraftOs {
        image,
        checksum,
        installer_kernel,
        installer_kernel_checksum,
    }
}

/// The checksum of one file: exactly one of the digest keys or the checksum
/// list key. `what` names the file in messages.
fn checksum_choice(
    ctx: &mut Ctx,
    t: &Table,
    what: &str,
    digests: &[(&'static str, Algorithm)],
    list: &'static str,
    required: bool,
) -> Option<Checksum> {
    let mut given: Vec<&'static str> = digests
        .iter()
        .map(|(k, _)| *k)
        .chain([list])
        .filter(|k| t.get(k).is_some())
        .collect();
    given.sort_by_key(|k| t.get(k).map(|v| v.span().start));
    let first_digest = digests.first().map_or("sha256", |(k, _)| *k);
    match given.as_slice() {
        [] => {
            if required {
                ctx.error(
                    t.span.clone(),
                    &t.key(list),
                    format!("missing the checksum of {what} {}", t.within()),
                    format!(
                        "add the checksum list published beside it, e.g. {}, or its digest: {first_digest} = \"…\" \
                         (`sha256sum FILE`)",
                        t.example(list)
                    ),
                );
            }
            None
        }
        [one] if *one == list => source(ctx, t, list).map(Checksum::List),
        [one] => {
            let algorithm = digests.iter().find(|(k, _)| k == one).map(|(_, a)| *a)?;
            checksum(ctx, t, one, algorithm).map(|hex| Checksum::Digest(Digest { algorithm, hex }))
        }
        [first, second, ..] => {
            let span = t.map.get_key_value(*second).map(|(k, _)| k.span());
            ctx.error(
                span.unwrap_or_else(|| t.span.clone()),
                &t.key(second),
                format!("`{first}` and `{second}` both give the checksum of {what}"),
                format!(
                    "keep one of them: `{list}` (looked up and pinned on `homelab up`) or a digest"
                ),
            );
            None
        }
    }
}

/// An https:// URL or a local path (resolved against the inventory's folder).
fn source(ctx: &mut Ctx, t: &Table, name: &str) -> Option<String> {
    let at = t.string(ctx, name)?;
    let s = at.value.trim();
    let key = t.key(name);
    if s.is_empty() {
        ctx.error(
            at.span,
            &key,
            "the value is empty",
            "name a local file or an https:// URL",
        );
    } else if let Some(rest) = s.strip_prefix("http://") {
        ctx.error(
            at.span,
            &key,
            format!("`{s}` is a plain http:// URL"),
            format!("use https://{rest}, or download the file into a local mirror folder and give its path"),
        );
    } else if let Some(rest) = s.strip_prefix("https://") {
        if rest.is_empty() || rest.starts_with('/') {
            ctx.error(
                at.span,
                &key,
                format!("`{s}` has no host"),
                "write a full URL such as \"https://cloud.debian.org/...\"",
            );
        } else {
            return Some(s.to_string());
        }
    } else if let Some((scheme, _)) = s.split_once("://") {
        ctx.error(
            at.span,
            &key,
            format!("`{scheme}://` URLs are not supported"),
            "use an https:// URL or a local path",
        );
    } else {
        return Some(resolve(ctx, s).to_string_lossy().into_owned());
    }
    None
}

/// A digest of `algorithm`: its number of hex characters, stored lower-case.
/// Placeholders (one character repeated, such as all zeros) are refused: a file
/// written with one would be downloaded and then refused on its checksum.
fn checksum(ctx: &mut Ctx, t: &Table, name: &str, algorithm: Algorithm) -> Option<String> {
    let at = t.string(ctx, name)?;
    let s = at.value.trim();
    let Some(problem) = digest_problem(s, algorithm) else {
        return Some(s.to_ascii_lowercase());
    };
    let tool = format!("{algorithm}sum FILE");
    let list_key = if name.starts_with("installer_kernel") {
        "installer_kernel_checksums"
    } else {
        "checksums"
    };
    ctx.error(
        at.span,
        &t.key(name),
        format!("`{s}` is not a {algorithm} checksum ({problem})"),
        format!(
            "run `{tool}` on the file you mean, copy its line from the published checksum list, \
             or replace this key with {} so homelab looks it up",
            t.example(list_key)
        ),
    );
    None
}

/// Why `s` is not a real digest of `algorithm`, if it is not.
pub fn digest_problem(s: &str, algorithm: Algorithm) -> Option<String> {
    let want = algorithm.hex_len();
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some("it contains characters that are not hex digits".to_string());
    }
    if s.len() != want {
        return Some(format!(
            "{} hex characters; a {algorithm} has {want}",
            s.len()
        ));
    }
    let first = s.as_bytes()[0].to_ascii_lowercase();
    if s.bytes().all(|b| b.to_ascii_lowercase() == first) {
        return Some(format!(
            "a placeholder: `{}` repeated, not the digest of any file",
            first as char
        ));
    }
    None
}

fn node(ctx: &mut Ctx, name: &Spanned<std::borrow::Cow<str>>, value: &Value) -> Option<DraftNode> {
    let raw = name.get_ref().to_string();
    let path = format!("nodes.{raw}");
    let DeValue::Table(map) = value.get_ref() else {
        ctx.error(
            value.span(),
            &path,
            format!(
                "expected a table for node `{raw}`, found {}",
                a_type(value.get_ref())
            ),
            format!("write the node as a table: [nodes.{raw}] followed by mac, ip and role lines"),
        );
        return None;
    };
    if let Some(problem) = label_problem(&raw) {
        ctx.error(
            name.span(),
            &path,
            format!("node name `{raw}` {problem}; node names are hostnames"),
            format!(
                "rename it, e.g. [nodes.{}]: lower-case letters, digits and '-', at most 63 characters",
                label_fix(&raw)
            ),
        );
    }
    let t = Table {
        path,
        span: value.span(),
        map,
        fields: NODE,
    };
    t.check_unknown(ctx);

    let mut mac = None;
    if t.require(ctx, "mac") {
        if let Some(at) = t.string(ctx, "mac") {
            match at.value.trim().parse::<MacAddr>() {
                Ok(m) if m.0[0] & 1 == 1 => ctx.error(
                    at.span,
                    &t.key("mac"),
                    format!("`{}` is a multicast address, not a network card's", at.value),
                    "copy the MAC of the node's network card (the lowest bit of the first byte is 0); \
                     `homelab discover` lists machines that tried to PXE-boot",
                ),
                Ok(m) => mac = Some(At { value: m, span: at.span }),
                Err(_) => ctx.error(
                    at.span,
                    &t.key("mac"),
                    format!("`{}` is not a MAC address", at.value),
                    "write six hex pairs such as \"52:54:00:12:34:56\"",
                ),
            }
        }
    }

    let mut ip = None;
    if t.require(ctx, "ip") {
        if let Some(at) = t.string(ctx, "ip") {
            ip = host_address(ctx, &t.key("ip"), &at);
        }
    }

    let mut role = None;
    if t.require(ctx, "role") {
        if let Some(at) = t.string(ctx, "role") {
            match at.value.as_str() {
                "server" => {
                    role = Some(At {
                        value: Role::Server,
                        span: at.span,
                    })
                }
                "agent" => {
                    role = Some(At {
                        value: Role::Agent,
                        span: at.span,
                    })
                }
                other => {
                    let mean = match other.to_ascii_lowercase().as_str() {
                        "master" | "control-plane" | "controlplane" | "control_plane" => {
                            Some("server")
                        }
                        "worker" | "node" => Some("agent"),
                        o => suggest(o, &["server", "agent"]),
                    }
                    .map(|s| format!("; did you mean \"{s}\"?"))
                    .unwrap_or_default();
                    ctx.error(
                        at.span,
                        &t.key("role"),
                        format!("`{other}` is not a role{mean}"),
                        "use \"server\" (runs the k3s control plane and etcd) or \"agent\" (runs workloads only)",
                    );
                }
            }
        }
    }

    let mut disk = Disk::Auto;
    if let Some(at) = t.string(ctx, "disk") {
        let s = at.value.trim();
        if s == "auto" {
            disk = Disk::Auto;
        } else if s.len() > 5 && s.starts_with("/dev/") {
            disk = Disk::Path(s.to_string());
        } else {
            ctx.error(
                at.span,
                &t.key("disk"),
                format!("`{s}` is not a disk"),
                "use \"auto\" (the first non-removable disk) or a device path such as \"/dev/nvme0n1\" \
                 or \"/dev/disk/by-id/...\"",
            );
        }
    }

    let mut power = Power::default();
    if let Some(pt) = t.table(ctx, "power", POWER) {
        pt.check_unknown(ctx);
        power.wol = pt.boolean(ctx, "wol").unwrap_or(false);
    }

    let has_boot = t.get("boot").is_some();
    let boot = t
        .table(ctx, "boot", BOOT)
        .and_then(|bt| boot_profile(ctx, &bt));

    let reinstall = t.boolean(ctx, "reinstall").unwrap_or(false);
    let labels = node_labels(ctx, &t);
    let taints = node_taints(ctx, &t);

    Some(DraftNode {
        name: raw,
        span: t.span.clone(),
        mac,
        ip,
        role,
        disk,
        power,
        has_boot,
        boot,
        reinstall,
        labels,
        taints,
    })
}

/// `labels = { KEY = "VALUE", ... }`: Kubernetes node labels, checked as the
/// kubelet checks them.
fn node_labels(ctx: &mut Ctx, t: &Table) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(lt) = t.table(ctx, "labels", &[]) else {
        return out;
    };
    let help = "labels are KEY = \"VALUE\" pairs: a key is [prefix/]name (a DNS name, then \
                1-63 letters, digits, '-', '_' or '.'), a value up to 63 of those, e.g. \
                labels = { disk = \"ssd\" }";
    for (key, value) in lt.map.iter() {
        let k = key.get_ref().to_string();
        let path = lt.key(&k);
        let problem = node_labels::key_problem(&k)
            .map(|p| format!("label key `{k}` {p}"))
            .or_else(|| node_labels::reserved_problem(&k).map(|p| format!("label `{k}`: {p}")));
        if let Some(problem) = problem {
            ctx.error(key.span(), &path, problem, help);
            continue;
        }
        match value.get_ref() {
            DeValue::String(v) => match node_labels::value_problem(v) {
                Some(p) => ctx.error(value.span(), &path, format!("label value `{v}` {p}"), help),
                None => {
                    out.insert(k, v.to_string());
                }
            },
            other => ctx.error(
                value.span(),
                &path,
                format!(
                    "expected the label's value in quotes, found {}",
                    a_type(other)
                ),
                help,
            ),
        }
    }
    out
}

/// `taints = ["key=value:Effect", ...]`.
fn node_taints(ctx: &mut Ctx, t: &Table) -> Vec<Taint> {
    let mut out: Vec<Taint> = Vec::new();
    let Some(v) = t.get("taints") else {
        return out;
    };
    let key = t.key("taints");
    let DeValue::Array(items) = v.get_ref() else {
        t.type_error(ctx, "taints", v, "a list of taints");
        return out;
    };
    for item in items {
        let parsed = match item.get_ref() {
            DeValue::String(s) => s.parse::<Taint>(),
            other => Err(format!(
                "expected a taint in quotes, found {}",
                a_type(other)
            )),
        };
        match parsed {
            Ok(taint)
                if out
                    .iter()
                    .any(|o| o.key == taint.key && o.effect == taint.effect) =>
            {
                ctx.error(
                    item.span(),
                    &key,
                    format!("taint `{}` repeats the key and effect of another", taint),
                    "keep one taint per key and effect",
                )
            }
            Ok(taint) => out.push(taint),
            Err(e) => ctx.error(
                item.span(),
                &key,
                e,
                format!("write it like this: {}", t.example("taints")),
            ),
        }
    }
    out
}

fn boot_profile(ctx: &mut Ctx, t: &Table) -> Option<BootProfile> {
    t.check_unknown(ctx);
    let errors_before = ctx.diags.len();

    let mut kernel = None;
    if t.require(ctx, "kernel") {
        if let Some(at) = t.string(ctx, "kernel") {
            kernel = existing_file(ctx, &t.key("kernel"), &at);
        }
    }

    let mut initrd = Vec::new();
    if let Some(v) = t.get("initrd") {
        let key = t.key("initrd");
        let items: Vec<&Value> = match v.get_ref() {
            DeValue::String(_) => vec![v],
            DeValue::Array(a) => a.iter().collect(),
            _ => {
                t.type_error(ctx, "initrd", v, "a path or a list of paths");
                vec![]
            }
        };
        for item in items {
            match item.get_ref() {
                DeValue::String(s) => {
                    let at = At {
                        value: s.to_string(),
                        span: item.span(),
                    };
                    if let Some(p) = existing_file(ctx, &key, &at) {
                        initrd.push(p);
                    }
                }
                other => ctx.error(
                    item.span(),
                    &key,
                    format!("expected a path in quotes, found {}", a_type(other)),
                    format!("write it like this: {}", t.example("initrd")),
                ),
            }
        }
    }

    let cmdline = t
        .string(ctx, "cmdline")
        .map(|at| at.value)
        .unwrap_or_default();

    let kernel = kernel?;
    (ctx.diags.len() == errors_before).then_some(BootProfile {
        kernel,
        initrd,
        cmdline,
    })
}

// ---------------------------------------------------------------------------------------
// TOML syntax errors.

/// Report TOML parse errors. Once a table header is reported as a duplicate, the
/// duplicate keys the parser then finds inside that table are echoes and are dropped.
pub(crate) fn syntax_errors(ctx: &mut Ctx, errs: &[toml::de::Error]) {
    let mut duplicated_tables: Vec<String> = Vec::new();
    for err in errs {
        let span = err.span().unwrap_or(0..0);
        let at = span.start.min(ctx.src.len());
        let line_start = ctx.src[..at].rfind('\n').map_or(0, |i| i + 1);
        if err.message().trim().starts_with("duplicate key") {
            let line_end = ctx.src[at..].find('\n').map_or(ctx.src.len(), |i| at + i);
            if let Some(h) = header_name(&ctx.src[line_start..line_end]) {
                duplicated_tables.push(h);
            } else if duplicated_tables.contains(&current_header(&ctx.src[..line_start])) {
                continue;
            }
        }
        syntax_error(ctx, err);
    }
}

/// Turn a TOML parse error into a diagnostic with a key and a targeted help.
fn syntax_error(ctx: &mut Ctx, err: &toml::de::Error) {
    let src = ctx.src;
    let span = err.span().unwrap_or(0..0);
    let raw = err.message().trim();
    let (line_start, line_end) = {
        let at = span.start.min(src.len());
        let s = src[..at].rfind('\n').map_or(0, |i| i + 1);
        let e = src[at..].find('\n').map_or(src.len(), |i| at + i);
        (s, e)
    };
    let line = src[line_start..line_end].trim_end_matches('\r');
    let header = current_header(&src[..line_start]);
    let this_header = header_name(line);
    let kv = key_of_line(line);
    let key = match (&this_header, &kv) {
        (Some(h), _) => h.clone(),
        (None, Some(k)) if header.is_empty() => k.clone(),
        (None, Some(k)) => format!("{header}.{k}"),
        (None, None) => header.clone(),
    };

    if raw.starts_with("duplicate key") {
        let before = &src[..line_start];
        let (message, help) = if let Some(h) = &this_header {
            let first = before
                .lines()
                .position(|l| header_name(l).as_deref() == Some(h.as_str()));
            let at = first
                .map(|i| format!(" (first at line {})", i + 1))
                .unwrap_or_default();
            match h.strip_prefix("nodes.") {
                Some(n) => (
                    format!("node `{n}` is defined twice{at}"),
                    "node names must be unique: rename one of them, or merge the two tables"
                        .to_string(),
                ),
                None => (
                    format!("table [{h}] is defined twice{at}"),
                    format!("keep one [{h}] table and move the keys of both into it"),
                ),
            }
        } else {
            let k = kv.clone().unwrap_or_default();
            // The first occurrence is the last earlier line setting the same key in the same table.
            let first = before
                .lines()
                .enumerate()
                .filter(|(_, l)| key_of_line(l).as_deref() == Some(k.as_str()))
                .last();
            let at = first
                .map(|(i, _)| format!(" (first at line {})", i + 1))
                .unwrap_or_default();
            let table = if header.is_empty() {
                "the top level".to_string()
            } else {
                format!("[{header}]")
            };
            (
                format!("`{k}` is set twice in {table}{at}"),
                "delete one of the two lines".to_string(),
            )
        };
        ctx.error(span, &key, message, help);
        return;
    }

    let message = format!("invalid TOML: {raw}");
    let mut span = span;
    // The value of a `key = value` line, and where it starts in the line.
    let (value, value_at) = match line.find('=') {
        Some(eq) => {
            let rest = &line[eq + 1..];
            let value = strip_comment(rest).trim();
            (
                value.to_string(),
                eq + 1 + (rest.len() - rest.trim_start().len()),
            )
        }
        None => (String::new(), 0),
    };
    let help = if raw.contains("must be quoted")
        || raw.starts_with("invalid float")
        || raw.starts_with("invalid integer")
    {
        match &kv {
            Some(k) if !value.is_empty() && !value.starts_with(['"', '\'', '[', '{']) => {
                // Point at the whole unquoted value, not wherever the number parser gave up.
                span = line_start + value_at..line_start + value_at + value.len();
                format!("put text in double quotes: {k} = \"{value}\"")
            }
            _ => "put text values in double quotes, e.g. address = \"192.168.50.2\"".to_string(),
        }
    } else if raw.contains("string") {
        "close the string with a matching quote on the same line (use \"\"\" quotes for text spanning lines)".to_string()
    } else if raw.contains("table") && raw.contains("expected `]`") {
        "close the table header with `]`, e.g. [controller]".to_string()
    } else if raw.contains("array") {
        "separate list items with commas and close the list with `]`, e.g. dns = [\"1.1.1.1\", \"9.9.9.9\"]".to_string()
    } else if raw.contains("inline table") || raw.contains("inline-table") {
        "write inline tables on one line as { key = value, other = value }".to_string()
    } else if raw.contains("no value")
        || raw.contains("missing assignment")
        || raw.contains("missing value")
    {
        "write one setting per line as key = value".to_string()
    } else {
        "fix the TOML syntax at this position (the format is described at https://toml.io)"
            .to_string()
    };
    ctx.error(span, &key, message, help);
}

fn strip_comment(s: &str) -> &str {
    match s.find(" #") {
        Some(i) if !s[..i].contains('"') => &s[..i],
        _ => s,
    }
}

/// The name inside a `[a.b]` or `[[a.b]]` header line, whitespace removed.
fn header_name(line: &str) -> Option<String> {
    let t = strip_comment(line).trim();
    let inner = t.strip_prefix('[')?;
    let inner = inner.trim_start_matches('[');
    let end = inner.find(']')?;
    Some(
        inner[..end]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect(),
    )
}

/// The table the text ends in (from the last header line), or "" for the top level.
fn current_header(before: &str) -> String {
    before
        .lines()
        .rev()
        .find_map(header_name)
        .unwrap_or_default()
}

/// The (dotted) key a `key = value` line sets.
fn key_of_line(line: &str) -> Option<String> {
    let (k, _) = line.split_once('=')?;
    let k = k.trim();
    let ok = !k.is_empty()
        && k.chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | '\'' | ' ' | '\t'));
    ok.then(|| k.chars().filter(|c| !c.is_whitespace()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_digests_are_refused() {
        let real = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(digest_problem(real, Algorithm::Sha256), None);
        assert_eq!(
            digest_problem(&real.to_uppercase(), Algorithm::Sha256),
            None
        );
        for (bad, why) in [
            ("0".repeat(64), "placeholder"),
            ("f".repeat(64), "placeholder"),
            ("aA".repeat(32), "placeholder"),
            ("0".repeat(128), "placeholder"),
            (real[..63].to_string(), "63 hex characters; a sha256 has 64"),
            (format!("{}g", &real[..63]), "not hex digits"),
            (String::new(), "0 hex characters"),
        ] {
            let alg = Algorithm::from_hex_len(bad.len()).unwrap_or(Algorithm::Sha256);
            let p = digest_problem(&bad, alg).unwrap_or_default();
            assert!(p.contains(why), "{bad}: {p}");
        }
        assert!(digest_problem(real, Algorithm::Sha512)
            .unwrap()
            .contains("a sha512 has 128"));
        assert_eq!(
            digest_problem(&format!("{real}{real}"), Algorithm::Sha512),
            None
        );
    }

    #[test]
    fn k3s_versions() {
        for good in ["v1.31.4+k3s1", "v1.28.15+k3s12", "v2.0.0+k3s3"] {
            assert!(is_k3s_version(good), "{good}");
        }
        for bad in [
            "1.31.4+k3s1",
            "v1.31+k3s1",
            "v1.31.4",
            "v1.31.4+k3s",
            "v1.31.4+rke2r1",
            "v1.31.4-rc1+k3s1",
            "v1..4+k3s1",
            "",
        ] {
            assert!(!is_k3s_version(bad), "{bad}");
        }
    }

    #[test]
    fn labels() {
        assert_eq!(label_problem("node-1"), None);
        assert_eq!(label_problem("1"), None);
        assert!(label_problem("Node1").is_some());
        assert!(label_problem("node_1").is_some());
        assert!(label_problem("-a").is_some());
        assert!(label_problem(&"a".repeat(64)).is_some());
        assert_eq!(label_fix("Node_1"), "node-1");
        assert_eq!(label_fix("__"), "node1");
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest("adress", &["interface", "address", "dhcp"]),
            Some("address")
        );
        assert_eq!(suggest("MAC", &["mac", "ip", "role"]), Some("mac"));
        assert_eq!(suggest("zzz", &["mac", "ip", "role"]), None);
    }

    #[test]
    fn syntax_helpers() {
        assert_eq!(header_name("  [ nodes.a ] # x").as_deref(), Some("nodes.a"));
        assert_eq!(header_name("[[nodes]]").as_deref(), Some("nodes"));
        assert_eq!(header_name("a = 1"), None);
        assert_eq!(
            key_of_line("  power . wol = true").as_deref(),
            Some("power.wol")
        );
        assert_eq!(key_of_line("# a = b"), None);
        assert_eq!(current_header("[a]\nx = 1\n[b.c]\ny = 2\n"), "b.c");
    }
}
