//! Choosing the disk to install on, and refusing one that holds data.
//!
//! Disks are read from sysfs (`/sys/block`), taken as a directory argument
//! so tests can hand in a fake tree; what a disk holds is judged from its
//! first bytes by [`previous_content`], a pure function.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Bytes read from the start of a disk to judge what it holds.
pub const PROBE_BYTES: usize = 128 * 1024;

/// A block device that could take the OS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Kernel name: `sda`, `nvme0n1`, `vda`.
    pub name: String,
    pub device: PathBuf,
    pub size: u64,
    pub removable: bool,
    pub model: String,
}

/// Kernel names that are never install targets.
fn is_virtual(name: &str) -> bool {
    [
        "loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd", "mtdblock",
    ]
    .iter()
    .any(|p| name.starts_with(p))
        || (name.starts_with("mmcblk") && name.contains("boot"))
}

/// The disks under `sys_block` (normally `/sys/block`), by kernel name.
pub fn list(sys_block: &Path, dev: &Path) -> Vec<DiskInfo> {
    let read = |p: PathBuf| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    let mut out: Vec<DiskInfo> = std::fs::read_dir(sys_block)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_virtual(&name) {
                return None;
            }
            let base = e.path();
            let sectors: u64 = read(base.join("size")).ok()?.parse().ok()?;
            if sectors == 0 {
                return None;
            }
            Some(DiskInfo {
                device: dev.join(&name),
                size: sectors * 512,
                removable: read(base.join("removable")).is_ok_and(|s| s == "1"),
                model: read(base.join("device/model")).unwrap_or_default(),
                name,
            })
        })
        .collect();
    out.sort_by_key(|d| natural_key(&d.name));
    out
}

/// `sdb` after `sda`, `nvme0n10` after `nvme0n2`.
fn natural_key(name: &str) -> Vec<(String, u64)> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut num = String::new();
    for c in name.chars() {
        if c.is_ascii_digit() {
            num.push(c);
        } else {
            if !num.is_empty() {
                parts.push((std::mem::take(&mut text), num.parse().unwrap_or(0)));
                num.clear();
            }
            text.push(c);
        }
    }
    parts.push((text, num.parse().unwrap_or(0)));
    parts
}

/// The disk for `choice`: `auto` is the first non-removable disk; anything
/// else names a device (`/dev/sda`, `/dev/disk/by-id/...`), resolved.
pub fn pick(disks: &[DiskInfo], choice: &str) -> Result<DiskInfo> {
    let names = || {
        disks
            .iter()
            .map(|d| {
                format!(
                    "{} ({}, {}{})",
                    d.device.display(),
                    human(d.size),
                    d.model,
                    if d.removable { ", removable" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    if choice == "auto" {
        return match disks.iter().find(|d| !d.removable) {
            Some(d) => Ok(d.clone()),
            None => bail!(
                "no non-removable disk found (disks seen: {}); set disk = \"/dev/...\" for this node",
                if disks.is_empty() { "none".into() } else { names() }
            ),
        };
    }
    let wanted = std::fs::canonicalize(choice).unwrap_or_else(|_| PathBuf::from(choice));
    match disks.iter().find(|d| d.device == wanted || Path::new(choice) == d.device) {
        Some(d) => Ok(d.clone()),
        None => bail!(
            "disk {choice} was not found on this machine (disks seen: {}); fix disk = in the inventory",
            if disks.is_empty() { "none".into() } else { names() }
        ),
    }
}

/// What the first bytes of a disk say it holds, if anything: a partition
/// table or a filesystem/volume signature. `None` means it looks empty.
pub fn previous_content(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(512, b"EFI PART") || at(4096, b"EFI PART") {
        return Some("a GPT partition table");
    }
    if at(0, b"LUKS\xba\xbe") {
        return Some("a LUKS encrypted volume");
    }
    if at(0, b"XFSB") {
        return Some("an XFS filesystem");
    }
    if at(1080, &[0x53, 0xef]) {
        return Some("an ext2/3/4 filesystem");
    }
    if at(65600, b"_BHRfS_M") {
        return Some("a btrfs filesystem");
    }
    if at(536, b"LVM2 001") || at(24 + 512, b"LVM2 001") {
        return Some("an LVM physical volume");
    }
    if at(4086, b"SWAPSPACE2") {
        return Some("swap space");
    }
    if at(32769, b"CD001") {
        return Some("an ISO 9660 image");
    }
    if at(510, &[0x55, 0xaa]) {
        // An MBR: a partition table if any entry has a type, else boot code
        // or a FAT boot sector.
        let any_partition = (0..4).any(|i| head.get(446 + i * 16 + 4).is_some_and(|&t| t != 0));
        return Some(if any_partition {
            "an MBR partition table"
        } else {
            "a boot sector"
        });
    }
    None
}

/// `1.5 GiB`-style size for messages.
pub fn human(bytes: u64) -> String {
    crate::ui::format_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_block(root: &Path, name: &str, sectors: u64, removable: bool, model: &str) {
        let d = root.join(name);
        std::fs::create_dir_all(d.join("device")).unwrap();
        std::fs::write(d.join("size"), format!("{sectors}\n")).unwrap();
        std::fs::write(d.join("removable"), if removable { "1\n" } else { "0\n" }).unwrap();
        std::fs::write(d.join("device/model"), format!("{model}\n")).unwrap();
    }

    #[test]
    fn auto_picks_the_first_fixed_disk_and_skips_virtual_ones() {
        let t = tempfile::tempdir().unwrap();
        fake_block(t.path(), "loop0", 100, false, "");
        fake_block(t.path(), "sr0", 100, true, "cdrom");
        fake_block(t.path(), "sdb", 2000, false, "Disk B");
        fake_block(t.path(), "sda", 1000, true, "USB stick");
        fake_block(t.path(), "nvme0n1", 4000, false, "Samsung");
        fake_block(t.path(), "vdz", 0, false, "empty");
        let disks = list(t.path(), Path::new("/dev"));
        let names: Vec<_> = disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["nvme0n1", "sda", "sdb"]);
        let d = pick(&disks, "auto").unwrap();
        assert_eq!(d.device, Path::new("/dev/nvme0n1"));
        assert_eq!(d.size, 4000 * 512);
        assert_eq!(pick(&disks, "/dev/sdb").unwrap().model, "Disk B");
        let err = pick(&disks, "/dev/sdq").unwrap_err().to_string();
        assert!(
            err.contains("/dev/sdq") && err.contains("/dev/sdb"),
            "{err}"
        );
        let only_usb = [disks[1].clone()];
        assert!(pick(&only_usb, "auto")
            .unwrap_err()
            .to_string()
            .contains("removable"));
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["sdb", "nvme0n10", "sda", "nvme0n2"];
        v.sort_by_key(|n| natural_key(n));
        assert_eq!(v, ["nvme0n2", "nvme0n10", "sda", "sdb"]);
    }

    #[test]
    fn previous_content_is_recognised() {
        let blank = vec![0u8; PROBE_BYTES];
        assert_eq!(previous_content(&blank), None);
        let with = |off: usize, magic: &[u8]| {
            let mut b = blank.clone();
            b[off..off + magic.len()].copy_from_slice(magic);
            b
        };
        assert_eq!(
            previous_content(&with(512, b"EFI PART")),
            Some("a GPT partition table")
        );
        assert_eq!(
            previous_content(&with(1080, &[0x53, 0xef])),
            Some("an ext2/3/4 filesystem")
        );
        assert_eq!(
            previous_content(&with(0, b"XFSB")),
            Some("an XFS filesystem")
        );
        assert_eq!(
            previous_content(&with(65600, b"_BHRfS_M")),
            Some("a btrfs filesystem")
        );
        let mut mbr = with(510, &[0x55, 0xaa]);
        assert_eq!(previous_content(&mbr), Some("a boot sector"));
        mbr[446 + 4] = 0x83;
        assert_eq!(previous_content(&mbr), Some("an MBR partition table"));
        // Short reads (a tiny disk) do not panic.
        assert_eq!(previous_content(&[0u8; 10]), None);
    }
}
