//! Running the homelab daemon inside a lab namespace: a generated inventory
//! whose node boots the lab's boot profile, and `homelab` commands run there.

use std::path::Path;
use std::process::Command;

use super::Netns;

pub const HTTP_PORT: u16 = 8080;

pub fn inventory(ns: &Netns, mac: &str, kernel: &Path, initrd: &Path, proxy: bool) -> String {
    let ctrl = ns.ip();
    let phone = format!("http://{ctrl}:{HTTP_PORT}/phone-home/{mac}");
    let cmdline = super::assets::boot_cmdline(&phone);
    let dhcp = if proxy {
        "dhcp = \"proxy\"\n".to_string()
    } else {
        format!(
            "dhcp = \"authoritative\"\ngateway = \"{ctrl}\"\npool = \"{}-{}\"\nlease_time = 600\n",
            ns.subnet_ip(100),
            ns.subnet_ip(150)
        )
    };
    format!(
        "[controller]\ninterface = \"{iface}\"\naddress = \"{ctrl}\"\nsubnet = \"{subnet}\"\nhttp_port = {HTTP_PORT}\n{dhcp}\n\
         [cluster]\nname = \"lab\"\nk3s_version = \"v1.31.4+k3s1\"\n\n\
         [nodes.node1]\nmac = \"{mac}\"\nip = \"{ip}\"\nrole = \"server\"\n\
         boot = {{ kernel = \"{kernel}\", initrd = [\"{initrd}\"], cmdline = \"{cmdline}\" }}\n",
        iface = ns.interface(),
        subnet = ns.subnet(),
        ip = ns.subnet_ip(10),
        kernel = kernel.display(),
        initrd = initrd.display(),
    )
}

/// `homelab` inside `ns` with the inventory and state dir of the namespace's
/// work dir.
pub fn homelab_cmd(ns: &Netns, args: &[&str]) -> Command {
    homelab_cmd_in(ns, ns.dir(), args)
}

/// `homelab` inside `ns` with `dir/inventory.toml` and the state dir
/// `dir/state`: for state too big to keep with the namespace's logs.
pub fn homelab_cmd_in(ns: &Netns, dir: &Path, args: &[&str]) -> Command {
    let mut c = ns.command(env!("CARGO_BIN_EXE_homelab"));
    c.arg("-i")
        .arg(dir.join("inventory.toml"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(args);
    c
}

/// An inventory for one installing node, node1 (`mac`, at `.11` of the
/// namespace's subnet), served from the namespace's bridge address with DHCP
/// and TFTP off: the daemon, and the SSH probe it makes of an installed node,
/// stay inside the namespace.
pub fn install_inventory(
    ns: &Netns,
    port: u16,
    mac: &str,
    image: &Path,
    image_sha256: &str,
    deb: &Path,
) -> String {
    format!(
        "[controller]\ninterface = \"{iface}\"\naddress = \"{ctrl}\"\ndhcp = \"off\"\ntftp = false\nhttp_port = {port}\n\n\
         [cluster]\nname = \"t\"\ndomain = \"lab.example\"\nk3s_version = \"v1.31.4+k3s1\"\n\n\
         [os]\nimage = \"{}\"\nsha256 = \"{image_sha256}\"\ninstaller_kernel = \"{}\"\ninstaller_kernel_sha256 = \"{}\"\n\n\
         [nodes.node1]\nmac = \"{mac}\"\nip = \"{node_ip}\"\nrole = \"server\"\n",
        image.display(),
        deb.display(),
        super::sha256_file(deb),
        iface = ns.interface(),
        ctrl = ns.ip(),
        node_ip = ns.subnet_ip(11),
    )
}

/// The plan URL of an installer script (`homelab.plan=` on its kernel line)
/// as iPXE expands it for node1 of [`install_inventory`] in `ns`; None when
/// the script boots no installer.
pub fn installer_plan_url(ns: &Netns, script: &str) -> Option<String> {
    let word = script
        .split_whitespace()
        .find_map(|w| w.strip_prefix("homelab.plan="))?;
    Some(
        word.replace("${netmask}", "255.255.255.0")
            .replace("${gateway}", &ns.ip().to_string()),
    )
}

/// The newest daemon-wide event of one of `kinds` in the state dir, as
/// `kind message`; None while there is none (or no state yet).
pub fn find_event(state_dir: &Path, kinds: &[&str]) -> Option<String> {
    homelab::state::State::open(state_dir)
        .ok()?
        .last_events(500, None)
        .ok()?
        .into_iter()
        .find(|e| kinds.contains(&e.kind.as_str()))
        .map(|e| format!("{} {}", e.kind, e.message))
}
