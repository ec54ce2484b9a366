//! Pure decisions about what a PXE client boots: its architecture (DHCP option
//! 93), the boot program it gets, and what its iPXE script does.

use serde::Serialize;

use crate::inventory::Node;
use crate::state::NodeRecord;

/// Client system architecture, from DHCP option 93 (RFC 4578 and IANA's registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientArch {
    /// 0: x86 BIOS.
    Bios,
    /// 6: 32-bit x86 UEFI (rare; no binary shipped for it).
    UefiIa32,
    /// 7 and 9: x86-64 UEFI.
    UefiX64,
    /// 11: arm64 UEFI.
    UefiArm64,
    /// 16: x86-64 UEFI HTTP boot.
    UefiHttpX64,
    /// 19: arm64 UEFI HTTP boot.
    UefiHttpArm64,
    Other(u16),
}

impl ClientArch {
    pub fn from_code(code: u16) -> ClientArch {
        match code {
            0 => ClientArch::Bios,
            6 => ClientArch::UefiIa32,
            7 | 9 => ClientArch::UefiX64,
            11 => ClientArch::UefiArm64,
            16 => ClientArch::UefiHttpX64,
            19 => ClientArch::UefiHttpArm64,
            n => ClientArch::Other(n),
        }
    }

    /// Whether the firmware is UEFI (decides how to boot the local disk and
    /// whether the kernel line must name its initrd).
    pub fn is_uefi(self) -> bool {
        !matches!(self, ClientArch::Bios | ClientArch::Other(_))
    }

    /// UEFI HTTP boot clients take a URL, not a TFTP file name.
    pub fn is_http_boot(self) -> bool {
        matches!(self, ClientArch::UefiHttpX64 | ClientArch::UefiHttpArm64)
    }

    /// The iPXE binary this architecture chain-loads, by its file name in the
    /// iPXE directory (Debian's `ipxe` package names).
    pub fn ipxe_binary(self) -> Option<&'static str> {
        match self {
            ClientArch::Bios => Some("undionly.kpxe"),
            ClientArch::UefiX64 | ClientArch::UefiHttpX64 => Some("ipxe.efi"),
            ClientArch::UefiArm64 | ClientArch::UefiHttpArm64 => Some("ipxe-arm64.efi"),
            ClientArch::UefiIa32 | ClientArch::Other(_) => None,
        }
    }

    pub fn label(self) -> String {
        match self {
            ClientArch::Bios => "bios".into(),
            ClientArch::UefiIa32 => "uefi-ia32".into(),
            ClientArch::UefiX64 => "uefi-x64".into(),
            ClientArch::UefiArm64 => "uefi-arm64".into(),
            ClientArch::UefiHttpX64 => "uefi-http-x64".into(),
            ClientArch::UefiHttpArm64 => "uefi-http-arm64".into(),
            ClientArch::Other(n) => format!("arch-{n}"),
        }
    }
}

/// What a node's iPXE script does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootTarget {
    /// The node's custom boot profile (kernel, initrds, cmdline from the inventory).
    Profile,
    /// The in-memory installer, which writes the OS to disk.
    Installer,
    /// Boot the node's own disk: the OS is installed and no reinstall was asked for.
    LocalDisk,
    /// Not in the inventory: say so on the console and never install anything.
    Unknown,
}

/// Decide what a client boots. An installed node boots its own disk unless
/// a reinstall was explicitly requested; this is the one place that decides it.
pub fn boot_target(node: Option<&Node>, record: Option<&NodeRecord>) -> BootTarget {
    let Some(node) = node else {
        return BootTarget::Unknown;
    };
    if node.boot.is_some() {
        return BootTarget::Profile;
    }
    match record {
        Some(r) if r.stage.has_installed_os() && !r.reinstall => BootTarget::LocalDisk,
        _ => BootTarget::Installer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{BootProfile, Disk, MacAddr, Power, Role};
    use crate::state::Stage;

    fn node(boot: bool) -> Node {
        Node {
            name: "n1".into(),
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            ip: "10.0.0.2".parse().unwrap(),
            role: Role::Server,
            disk: Disk::Auto,
            power: Power::default(),
            boot: boot.then(|| BootProfile {
                kernel: "/k".into(),
                initrd: vec!["/i".into()],
                cmdline: String::new(),
            }),
            reinstall: false,
            labels: Default::default(),
            taints: Vec::new(),
        }
    }

    fn record(stage: Stage, reinstall: bool) -> NodeRecord {
        NodeRecord {
            reinstall,
            ..crate::testing::record("n1", "server", stage)
        }
    }

    #[test]
    fn architecture_codes_map_to_binaries() {
        assert_eq!(
            ClientArch::from_code(0).ipxe_binary(),
            Some("undionly.kpxe")
        );
        assert_eq!(ClientArch::from_code(7).ipxe_binary(), Some("ipxe.efi"));
        assert_eq!(ClientArch::from_code(9).ipxe_binary(), Some("ipxe.efi"));
        assert_eq!(
            ClientArch::from_code(11).ipxe_binary(),
            Some("ipxe-arm64.efi")
        );
        assert!(ClientArch::from_code(16).is_http_boot());
        assert_eq!(ClientArch::from_code(6).ipxe_binary(), None);
        assert_eq!(ClientArch::from_code(42), ClientArch::Other(42));
        assert!(!ClientArch::Bios.is_uefi() && ClientArch::UefiX64.is_uefi());
    }

    #[test]
    fn installed_nodes_boot_their_disk_unless_reinstall_was_asked() {
        let n = node(false);
        assert_eq!(boot_target(None, None), BootTarget::Unknown);
        assert_eq!(boot_target(Some(&n), None), BootTarget::Installer);
        assert_eq!(
            boot_target(Some(&n), Some(&record(Stage::Pending, false))),
            BootTarget::Installer
        );
        assert_eq!(
            boot_target(Some(&n), Some(&record(Stage::Failed, false))),
            BootTarget::Installer
        );
        assert_eq!(
            boot_target(Some(&n), Some(&record(Stage::Installed, false))),
            BootTarget::LocalDisk
        );
        assert_eq!(
            boot_target(Some(&n), Some(&record(Stage::Ready, false))),
            BootTarget::LocalDisk
        );
        assert_eq!(
            boot_target(Some(&n), Some(&record(Stage::Ready, true))),
            BootTarget::Installer
        );
        assert_eq!(
            boot_target(Some(&node(true)), Some(&record(Stage::Ready, false))),
            BootTarget::Profile
        );
    }
}
