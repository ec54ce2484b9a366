//! What the controller serves to nodes that install: the verified OS image
//! and the installer environment built for it. Prepared once when the daemon
//! starts (and again when the inventory's [os] changes); until it is ready,
//! nodes that PXE-boot are told to wait, and if it fails (a checksum that does
//! not match), they are told why and nothing is written anywhere.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::initramfs::{self, Installer};
use super::protocol::Compression;
use crate::inventory::{Artifact, Os};

/// The verified files behind an install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    pub installer: Installer,
    pub image: PathBuf,
    pub image_sha256: String,
    pub image_size: u64,
    pub compression: Compression,
}

/// Where preparing the media stands (shared with the HTTP handlers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaState {
    /// No node installs: nothing to prepare.
    NotNeeded,
    Preparing,
    Ready(std::sync::Arc<Media>),
    Failed(String),
}

/// Verify a local file against its sha256, reading it once.
pub fn verify_local(path: &Path, sha256: &str, what: &str) -> Result<u64> {
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("{what}: cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    let got = hex::encode(h.finalize());
    if got != sha256 {
        bail!(
            "{what}: {} has sha256 {got}, but the inventory says {sha256}; it is not served. \
             Fix the checksum in inventory.toml if the file is the one you meant (`sha256sum {}`)",
            path.display(),
            path.display()
        );
    }
    Ok(size)
}

fn local(a: &str, what: &str) -> Result<PathBuf> {
    if a.starts_with("https://") {
        bail!("{what}: {a} is a URL; downloading it is not supported yet: put the file in a local folder and give its path");
    }
    Ok(PathBuf::from(a))
}

/// Verify the image and the installer's kernel package and build the
/// installer environment with `agent` (the static homelab binary) as /init.
/// Blocking (hashing, decompressing): run it off the async runtime.
pub fn prepare(state_dir: &Path, os: &Os, agent: &Path) -> Result<Media> {
    let image = local(&os.image, "[os] image")?;
    let image_size = verify_local(&image, &os.sha256, "[os] image")?;
    let Some(Artifact { source, sha256 }) = &os.installer_kernel else {
        bail!(
            "[os] installer_kernel is not set: nodes without a boot profile install the OS, and the installer \
             needs a kernel package (linux-image-*.deb) and its sha256; see inventory.example.toml"
        );
    };
    let deb = local(source, "[os] installer_kernel")?;
    verify_local(&deb, sha256, "[os] installer_kernel")?;
    let installer = initramfs::build(&state_dir.join("installer"), &deb, sha256, agent, &[])?;
    let mut head = [0u8; 8];
    let n = std::fs::File::open(&image)?.read(&mut head)?;
    Ok(Media {
        installer,
        image,
        image_sha256: os.sha256.clone(),
        image_size,
        compression: Compression::detect(&head[..n]),
    })
}
