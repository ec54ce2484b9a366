//! Writing into the installed system: find its root partition in the
//! partition table just written, mount it, put the cloud-init seed and the
//! node's new SSH host key in place, unmount.
//!
//! On a real disk the partition is the kernel's `/dev/<disk><n>`; when the
//! target is a file (tests, images) the partition is attached to a loop
//! device at its offset.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::transfer::LogSink;
use crate::install::protocol::SeedFile;

/// GPT type of a Linux x86-64 root partition (systemd's discoverable partitions).
const ROOT_X86_64: [u8; 16] = guid_bytes(
    0x4F68BCE3,
    0xE8CD,
    0x4DB1,
    [0x96, 0xE7, 0xFB, 0xCA, 0xF9, 0x84, 0xB7, 0x09],
);
/// GPT types never holding a root filesystem: BIOS boot, EFI system.
const NOT_ROOT: [[u8; 16]; 2] = [
    guid_bytes(
        0x21686148,
        0x6449,
        0x6E6F,
        [0x74, 0x4E, 0x65, 0x65, 0x64, 0x45, 0x46, 0x49],
    ),
    guid_bytes(
        0xC12A7328,
        0xF81F,
        0x11D2,
        [0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B],
    ),
];

const fn guid_bytes(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// A partition from the table: number (1-based) and sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub number: usize,
    pub first: u64,
    pub last: u64,
    pub root_type: bool,
}

/// Partitions worth trying as the root, best first: the root type, then by
/// size. Pure, from the disk's first sectors.
pub fn root_candidates(head: &[u8]) -> Vec<Partition> {
    let mut parts = Vec::new();
    if head.len() >= 1024 && &head[512..520] == b"EFI PART" {
        let le64 = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let at = (le64(head, 512 + 72) * 512) as usize;
        let (count, size) = (le32(head, 512 + 80) as usize, le32(head, 512 + 84) as usize);
        for i in 0..count.min(128) {
            let Some(e) = head.get(at + i * size..at + (i + 1) * size) else {
                break;
            };
            let kind: [u8; 16] = e[0..16].try_into().unwrap();
            if kind == [0; 16] || NOT_ROOT.contains(&kind) {
                continue;
            }
            parts.push(Partition {
                number: i + 1,
                first: le64(e, 32),
                last: le64(e, 40),
                root_type: kind == ROOT_X86_64,
            });
        }
    } else if head.len() >= 512 && head[510..512] == [0x55, 0xaa] {
        for i in 0..4 {
            let e = &head[446 + i * 16..][..16];
            let start = u32::from_le_bytes(e[8..12].try_into().unwrap()) as u64;
            let len = u32::from_le_bytes(e[12..16].try_into().unwrap()) as u64;
            if matches!(e[4], 0x83) && len > 0 {
                parts.push(Partition {
                    number: i + 1,
                    first: start,
                    last: start + len - 1,
                    root_type: false,
                });
            }
        }
    }
    parts.sort_by_key(|p| (!p.root_type, std::cmp::Reverse(p.last - p.first)));
    parts
}

/// Mount the installed root and write `files` and a new SSH host key into
/// it. Returns the host key's public OpenSSH line.
pub fn write_into_root(
    target: &Path,
    head: &[u8],
    files: &[SeedFile],
    log: &LogSink,
) -> Result<String> {
    let candidates = root_candidates(head);
    if candidates.is_empty() {
        bail!("the image has no partition that could hold a root filesystem");
    }
    let dir = PathBuf::from("/run/homelab-target");
    std::fs::create_dir_all(&dir)?;
    let mut tried = Vec::new();
    for part in candidates {
        let dev = PartitionDevice::attach(target, &part)?;
        match mount_any(dev.path(), &dir) {
            Ok(fs)
                if dir.join("etc/os-release").exists()
                    || dir.join("usr/lib/os-release").exists() =>
            {
                log.line(format!("root filesystem: partition {} ({fs})", part.number));
                let result = populate(&dir, files);
                let unmounted = nix::mount::umount(&dir).context("unmounting the installed root");
                let key = result?;
                unmounted?;
                return Ok(key);
            }
            Ok(fs) => {
                let _ = nix::mount::umount(&dir);
                tried.push(format!(
                    "partition {} ({fs}) has no /etc/os-release",
                    part.number
                ));
            }
            Err(e) => tried.push(format!("partition {}: {e:#}", part.number)),
        }
    }
    bail!(
        "found no root filesystem to write the seed into: {}",
        tried.join("; ")
    )
}

fn mount_any(dev: &Path, dir: &Path) -> Result<&'static str> {
    let mut errors = Vec::new();
    for fs in ["ext4", "xfs", "btrfs"] {
        match nix::mount::mount(
            Some(dev),
            dir,
            Some(fs),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) => return Ok(fs),
            Err(e) => errors.push(format!("{fs}: {e}")),
        }
    }
    bail!("cannot mount {} ({})", dev.display(), errors.join(", "))
}

fn populate(root: &Path, files: &[SeedFile]) -> Result<String> {
    for f in files {
        let rel = f.path.trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|c| c == "..") {
            bail!("refusing to write {:?} outside the installed root", f.path);
        }
        write_file(&root.join(rel), f.content.as_bytes(), f.mode)?;
    }
    wait_for_entropy();
    let (private, public) = host_key()?;
    // Keys the image may carry are dropped: every node gets its own.
    if let Ok(entries) = std::fs::read_dir(root.join("etc/ssh")) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    write_file(
        &root.join("etc/ssh/ssh_host_ed25519_key"),
        private.as_bytes(),
        0o600,
    )?;
    write_file(
        &root.join("etc/ssh/ssh_host_ed25519_key.pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )?;
    Ok(public)
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = path.with_extension("homelab-tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Say so when the kernel's random pool is not ready yet: generating the key
/// then waits for it (a machine with no hardware entropy source).
fn wait_for_entropy() {
    let mut b = [0u8; 1];
    // SAFETY: getrandom writes at most one byte into `b`.
    let r = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 1, libc::GRND_NONBLOCK) };
    if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
        eprintln!(
            "homelab installer: waiting for the kernel's random pool to fill \
             (this machine offers no hardware entropy source)"
        );
    }
}

/// A new ed25519 host key: (OpenSSH private key, public line).
pub fn host_key() -> Result<(String, String)> {
    use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
    use russh::keys::ssh_key::LineEnding;
    let seed: [u8; 32] = rand::random();
    let pair = Ed25519Keypair::from_seed(&seed);
    let key = russh::keys::PrivateKey::new(KeypairData::Ed25519(pair), "homelab")?;
    let private = key.to_openssh(LineEnding::LF)?.to_string();
    let public = key.public_key().to_openssh()?;
    Ok((private, public))
}

/// A partition as a block device path, released on drop.
enum PartitionDevice {
    Kernel(PathBuf),
    Loop(File, PathBuf),
}

/// `struct loop_info64` of linux/loop.h.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

impl PartitionDevice {
    fn attach(target: &Path, part: &Partition) -> Result<PartitionDevice> {
        let meta = std::fs::metadata(target)?;
        if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
            let name = target.to_string_lossy().into_owned();
            let sep = if name.ends_with(|c: char| c.is_ascii_digit()) {
                "p"
            } else {
                ""
            };
            let path = PathBuf::from(format!("{name}{sep}{}", part.number));
            let deadline = Instant::now() + Duration::from_secs(10);
            while !path.exists() {
                if Instant::now() > deadline {
                    bail!(
                        "{} did not appear after re-reading the partition table",
                        path.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            return Ok(PartitionDevice::Kernel(path));
        }
        // A file: a loop device over the partition's byte range.
        let ctl = File::open("/dev/loop-control").context("opening /dev/loop-control")?;
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("finding a free loop device");
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let backing = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(target)?;
        // SAFETY: LOOP_SET_FD takes the backing file descriptor.
        if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD as _, backing.as_raw_fd()) } < 0 {
            return Err(std::io::Error::last_os_error()).context("attaching a loop device");
        }
        // SAFETY: loop_info64 is plain data; all-zero is valid.
        let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
        info.offset = part.first * 512;
        info.sizelimit = (part.last - part.first + 1) * 512;
        // SAFETY: LOOP_SET_STATUS64 reads a loop_info64.
        if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64 as _, &info) } < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: as above.
            unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD as _, 0) };
            return Err(e).context("setting the loop device's offset");
        }
        Ok(PartitionDevice::Loop(dev, path))
    }

    fn path(&self) -> &Path {
        match self {
            PartitionDevice::Kernel(p) | PartitionDevice::Loop(_, p) => p,
        }
    }
}

impl Drop for PartitionDevice {
    fn drop(&mut self) {
        if let PartitionDevice::Loop(dev, _) = self {
            // SAFETY: LOOP_CLR_FD takes no argument.
            unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD as _, 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_type_guid_layout_matches_the_disk_encoding() {
        // 4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709 as stored on disk.
        assert_eq!(
            ROOT_X86_64,
            [
                0xE3, 0xBC, 0x68, 0x4F, 0xCD, 0xE8, 0xB1, 0x4D, 0x96, 0xE7, 0xFB, 0xCA, 0xF9, 0x84,
                0xB7, 0x09
            ]
        );
    }

    #[test]
    fn host_keys_are_fresh_openssh_keys() {
        let (private, public) = host_key().unwrap();
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        assert!(public.starts_with("ssh-ed25519 "));
        assert_ne!(host_key().unwrap().1, public);
    }
}
