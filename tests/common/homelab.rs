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

pub fn homelab_cmd(ns: &Netns, args: &[&str]) -> Command {
    let mut c = ns.command(env!("CARGO_BIN_EXE_homelab"));
    c.arg("-i")
        .arg(ns.dir().join("inventory.toml"))
        .arg("--state-dir")
        .arg(ns.dir().join("state"))
        .args(args);
    c
}
