//! The lab's machines: QEMU with real PXE firmware (SeaBIOS or OVMF, and
//! QEMU's iPXE NIC ROM), an empty qcow2 disk, a tap on the lab bridge, the
//! serial console in a file. TCG only (`-accel tcg`). Each VM runs detached
//! (`-daemonize`) with a pid file, so the lab outlives the command that
//! started it and `lab down` finds it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::host;
use super::spec::{Firmware, LabNode, LabSpec};

/// SeaBIOS images QEMU may load (one must exist for BIOS VMs).
const SEABIOS: [&str; 2] = [
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/qemu/bios-256k.bin",
];

/// OVMF code and variable-store templates, newest layout first; not the
/// secure-boot variants (iPXE's EFI image is unsigned). Overridable with
/// `HOMELAB_OVMF_CODE` and `HOMELAB_OVMF_VARS`.
const OVMF: [(&str, &str); 2] = [
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
];

/// OVMF's code and variable template, or what to install.
pub fn ovmf_files() -> Result<(PathBuf, PathBuf), String> {
    if let (Ok(c), Ok(v)) = (
        std::env::var("HOMELAB_OVMF_CODE"),
        std::env::var("HOMELAB_OVMF_VARS"),
    ) {
        return Ok((c.into(), v.into()));
    }
    OVMF.iter()
        .find(|(c, v)| Path::new(c).exists() && Path::new(v).exists())
        .map(|(c, v)| (PathBuf::from(c), PathBuf::from(v)))
        .ok_or_else(|| "OVMF (package ovmf: /usr/share/OVMF/OVMF_CODE_4M.fd)".into())
}

/// Whether SeaBIOS is there, or what to install.
pub fn check_seabios() -> Result<(), String> {
    if SEABIOS.iter().any(|p| Path::new(p).exists()) {
        Ok(())
    } else {
        Err("SeaBIOS (package seabios, pulled in by qemu-system-x86)".into())
    }
}

/// Where one VM keeps its files.
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub dir: PathBuf,
}

impl VmFiles {
    pub fn new(lab_dir: &Path, node: &str) -> VmFiles {
        VmFiles {
            dir: lab_dir.join("vms").join(node),
        }
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    /// OVMF's variable store, the VM's own copy (its NVRAM).
    pub fn vars(&self) -> PathBuf {
        self.dir.join("OVMF_VARS.fd")
    }
    /// SeaBIOS reads the serial-console port from this fw_cfg file.
    fn sercon_port(&self) -> PathBuf {
        self.dir.join("sercon-port")
    }
}

/// Pure: QEMU's arguments for `node`. Network boot first, then the disk;
/// a guest reboot resets the machine (the installer reboots into its disk).
pub fn qemu_args(
    spec: &LabSpec,
    node: &LabNode,
    files: &VmFiles,
    ovmf_code: Option<&Path>,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-name",
        &format!(
            "homelab-{}-{},process=homelab-{}-{}",
            spec.name, node.name, spec.name, node.name
        ),
        "-accel",
        "tcg",
        "-machine",
        "pc",
        "-smp",
        "1",
        "-m",
        &spec.memory_mb.to_string(),
        "-display",
        "none",
        "-monitor",
        "none",
        // An entropy source, as hypervisors offer: TCG's CPU has no RDRAND.
        "-device",
        "virtio-rng-pci",
        "-serial",
        &format!("file:{}", files.serial().display()),
        "-netdev",
        &format!("tap,id=n0,ifname={},script=no,downscript=no", node.tap),
        "-device",
        &format!("virtio-net-pci,netdev=n0,mac={},bootindex=1", node.mac),
        "-drive",
        &format!(
            "file={},if=none,id=d0,format=qcow2,discard=unmap,detect-zeroes=unmap",
            files.disk().display()
        ),
        "-device",
        "virtio-blk-pci,drive=d0,bootindex=2",
        "-daemonize",
        "-pidfile",
        &files.pid_file().display().to_string(),
    ]
    .into_iter()
    .map(String::from)
    .collect();
    match (node.firmware, ovmf_code) {
        (Firmware::Uefi, Some(code)) => {
            args.push("-drive".into());
            args.push(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                code.display()
            ));
            args.push("-drive".into());
            args.push(format!(
                "if=pflash,format=raw,unit=1,file={}",
                files.vars().display()
            ));
            // IPv4 network boot only, as most machines ship: the lab's router
            // advertises IPv6 but runs no DHCPv6, so edk2's PXE and HTTP boot
            // over IPv6 would each wait for a timeout before the disk boots.
            args.push("-fw_cfg".into());
            args.push("name=opt/org.tianocore/IPv6Support,string=no".into());
        }
        _ => {
            // SeaBIOS mirrors its screen (and iPXE's) to the serial console.
            args.push("-fw_cfg".into());
            args.push(format!(
                "name=etc/sercon-port,file={}",
                files.sercon_port().display()
            ));
        }
    }
    args
}

/// Creates the VM's disk (empty) and NVRAM if missing; never touches an
/// existing disk: it holds the installed system.
pub fn prepare(
    node: &LabNode,
    files: &VmFiles,
    disk_gib: u32,
    ovmf_vars: Option<&Path>,
) -> Result<()> {
    std::fs::create_dir_all(&files.dir)
        .with_context(|| format!("creating {}", files.dir.display()))?;
    if !files.disk().exists() {
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(files.disk())
            .arg(format!("{disk_gib}G"))
            .output()
            .context("running qemu-img (package qemu-utils)")?;
        if !out.status.success() {
            bail!(
                "qemu-img create {}: {}",
                files.disk().display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    match (node.firmware, ovmf_vars) {
        (Firmware::Uefi, Some(template)) if !files.vars().exists() => {
            std::fs::copy(template, files.vars())
                .with_context(|| format!("copying {}", template.display()))?;
        }
        _ => std::fs::write(files.sercon_port(), 0x3f8u16.to_le_bytes())?,
    }
    Ok(())
}

/// Powers the VM on inside the lab's namespace. Returns once QEMU has
/// started (it daemonizes after setting the machine up, so a bad argument
/// is reported here).
pub fn start(
    spec: &LabSpec,
    node: &LabNode,
    files: &VmFiles,
    ovmf_code: Option<&Path>,
) -> Result<()> {
    let _ = std::fs::remove_file(files.pid_file());
    let args = qemu_args(spec, node, files, ovmf_code);
    let out = host::in_netns(&spec.netns, "qemu-system-x86_64")
        .args(&args)
        .output()
        .context("running qemu-system-x86_64 (package qemu-system-x86)")?;
    if !out.status.success() {
        bail!(
            "QEMU did not start {}: {}",
            node.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The running QEMU's pid, if its pid file names a live QEMU of this VM.
pub fn running_pid(files: &VmFiles, spec: &LabSpec, node: &LabNode) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(files.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = format!("homelab-{}-{}", spec.name, node.name);
    String::from_utf8_lossy(&cmdline)
        .contains(&needle)
        .then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::spec::{plan, FirmwareChoice};

    fn args_for(i: usize) -> Vec<String> {
        let spec = plan("t", 2, FirmwareChoice::Mixed, "/i".into(), "/k".into()).unwrap();
        let node = &spec.nodes[i];
        let files = VmFiles::new(Path::new("/labs/t"), &node.name);
        qemu_args(&spec, node, &files, Some(Path::new("/ovmf/CODE.fd")))
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn network_boots_first_then_the_disk_under_tcg() {
        let a = args_for(0);
        assert_eq!(value_after(&a, "-accel"), ["tcg"]);
        let devices = value_after(&a, "-device");
        assert!(devices
            .iter()
            .any(|d| d.contains("mac=52:54:00:0a:00:01,bootindex=1")));
        assert!(devices.iter().any(|d| d.ends_with("bootindex=2")));
        assert!(!a.contains(&"-no-reboot".to_string()));
        assert_eq!(value_after(&a, "-pidfile"), ["/labs/t/vms/node1/qemu.pid"]);
        assert!(value_after(&a, "-netdev")[0].contains("ifname=tap1"));
    }

    #[test]
    fn bios_gets_the_serial_mirror_and_uefi_its_own_nvram() {
        let bios = args_for(0);
        assert!(value_after(&bios, "-fw_cfg")[0].contains("sercon-port"));
        assert!(!bios.iter().any(|a| a.contains("pflash")));
        let uefi = args_for(1);
        let drives = value_after(&uefi, "-drive");
        assert!(drives
            .iter()
            .any(|d| d.contains("readonly=on,file=/ovmf/CODE.fd")));
        assert!(drives
            .iter()
            .any(|d| d.ends_with("file=/labs/t/vms/node2/OVMF_VARS.fd")));
        assert_eq!(
            value_after(&uefi, "-fw_cfg"),
            ["name=opt/org.tianocore/IPv6Support,string=no"]
        );
    }
}
