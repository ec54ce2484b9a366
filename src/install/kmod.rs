//! Kernel modules for the installer: which `.ko` files go into the initramfs
//! and in which order the agent loads them. Read from the modules' own
//! `.modinfo` sections (`depends=`, `softdep=`), so neither kmod nor a
//! `modules.dep` (Debian generates it at install time, it is not in the
//! package) is needed. Pure.

use std::collections::{BTreeMap, BTreeSet};

/// Drivers the installer carries so that it finds the disk and the network
/// on real x86-64 machines, and mounts the installed root filesystem to
/// write its cloud-init seed. A name missing from a kernel is skipped.
pub const WANTED: &[&str] = &[
    // virtual machines
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    // entropy: without RDRAND (older CPUs, emulated ones) the host key's
    // generation would wait on an uninitialised random pool
    "virtio_rng",
    // network cards common in homelabs: Intel, Realtek, Broadcom, Aquantia,
    // and USB adapters on mini PCs
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "ixgbe",
    "i40e",
    "r8169",
    "tg3",
    "bnxt_en",
    "atlantic",
    "r8152",
    "ax88179_178a",
    "cdc_ether",
    // storage: NVMe, SATA, SAS HBAs, USB, eMMC
    "nvme",
    "ahci",
    "ata_piix",
    "sd_mod",
    "mpt3sas",
    "megaraid_sas",
    "xhci_pci",
    "ehci_pci",
    "usb_storage",
    "uas",
    "sdhci_pci",
    "mmc_block",
    // filesystems of the installed root (the seed is written into it)
    "crc32c_generic",
    "crc32c_intel",
    "ext4",
    "xfs",
    "btrfs",
];

/// What `.modinfo` says about one module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    pub depends: Vec<String>,
    /// Modules named by `softdep=pre: ...` (loaded before, when present).
    pub soft_pre: Vec<String>,
}

/// A module name as the kernel knows it: `-` and `_` are the same.
pub fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path like `.../kernel/drivers/net/virtio_net.ko.xz`.
pub fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(normalise(stem))
}

/// Parse the `key=value\0` strings of a module's `.modinfo` section. The
/// section is found by its keys, not by parsing ELF: `depends=` always
/// follows other modinfo keys in the same NUL-separated run.
pub fn modinfo(ko: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for s in ko.split(|&b| b == 0) {
        let Ok(s) = std::str::from_utf8(s) else {
            continue;
        };
        if let Some(deps) = s.strip_prefix("depends=") {
            if info.depends.is_empty() {
                info.depends = deps
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(normalise)
                    .collect();
            }
        } else if let Some(soft) = s.strip_prefix("softdep=") {
            // "pre: a b post: c"
            let mut pre = false;
            for word in soft.split_whitespace() {
                match word {
                    "pre:" => pre = true,
                    "post:" => pre = false,
                    m if pre => info.soft_pre.push(normalise(m)),
                    _ => {}
                }
            }
        }
    }
    info
}

/// The load order for `wanted`: every module after its dependencies, each
/// once. `available` maps a module name to its modinfo; `builtin` names the
/// modules compiled into the kernel (nothing to load). Returns the order
/// and the wanted names this kernel has neither as module nor built in.
pub fn load_order(
    wanted: &[&str],
    available: &BTreeMap<String, ModInfo>,
    builtin: &BTreeSet<String>,
) -> (Vec<String>, Vec<String>) {
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    let mut missing = Vec::new();
    for w in wanted {
        let w = normalise(w);
        if !available.contains_key(&w) && !builtin.contains(&w) {
            missing.push(w);
            continue;
        }
        visit(&w, available, builtin, &mut seen, &mut order);
    }
    (order, missing)
}

fn visit(
    name: &str,
    available: &BTreeMap<String, ModInfo>,
    builtin: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) {
    if !seen.insert(name.to_string()) || builtin.contains(name) {
        return;
    }
    let Some(info) = available.get(name) else {
        return; // a soft dependency this kernel lacks
    };
    for dep in info.soft_pre.iter().chain(&info.depends) {
        visit(dep, available, builtin, seen, order);
    }
    order.push(name.to_string());
}

/// Module names in a `modules.builtin` file (`kernel/fs/ext4/ext4.ko` lines).
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines().filter_map(module_name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(deps: &[&str], soft: &[&str]) -> ModInfo {
        ModInfo {
            depends: deps.iter().map(|s| s.to_string()).collect(),
            soft_pre: soft.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn modinfo_is_read_from_the_section_strings() {
        let ko = b"\x7fELF junk\0license=GPL\0softdep=pre: crc32c post: foo\0depends=jbd2,mbcache,crc16\0retpoline=Y\0name=ext4\0";
        let i = modinfo(ko);
        assert_eq!(i.depends, ["jbd2", "mbcache", "crc16"]);
        assert_eq!(i.soft_pre, ["crc32c"]);
        assert_eq!(modinfo(b"depends=\0name=x\0").depends, Vec::<String>::new());
    }

    #[test]
    fn names_from_paths() {
        assert_eq!(
            module_name("lib/modules/6.1/kernel/drivers/net/virtio_net.ko").as_deref(),
            Some("virtio_net")
        );
        assert_eq!(
            module_name("x/ax88179-178a.ko.xz").as_deref(),
            Some("ax88179_178a")
        );
        assert_eq!(module_name("x/modules.order"), None);
    }

    #[test]
    fn dependencies_load_first_once_and_builtins_are_skipped() {
        let mut avail = BTreeMap::new();
        avail.insert(
            "ext4".into(),
            info(&["jbd2", "mbcache", "crc16"], &["crc32c"]),
        );
        avail.insert("jbd2".into(), info(&[], &[]));
        avail.insert("mbcache".into(), info(&[], &[]));
        avail.insert("virtio_net".into(), info(&["net_failover"], &[]));
        avail.insert("net_failover".into(), info(&["failover"], &[]));
        avail.insert("failover".into(), info(&[], &[]));
        let builtin: BTreeSet<String> = ["crc16".to_string()].into();
        let (order, missing) = load_order(
            &["virtio_net", "ext4", "jbd2", "crc16", "nvme"],
            &avail,
            &builtin,
        );
        assert_eq!(
            order,
            [
                "failover",
                "net_failover",
                "virtio_net",
                "jbd2",
                "mbcache",
                "ext4"
            ]
        );
        assert_eq!(missing, ["nvme"]);
    }

    #[test]
    fn builtin_list_parses() {
        let b = parse_builtin("kernel/fs/ext4/ext4.ko\nkernel/lib/crc16.ko\n");
        assert!(b.contains("ext4") && b.contains("crc16"));
    }
}
