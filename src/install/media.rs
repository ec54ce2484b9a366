//! What the controller serves to nodes that install: the verified OS image
//! and the installer environment built for it. Prepared once when the daemon
//! starts (and again when the inventory's [os] changes); until it is ready,
//! nodes that PXE-boot are told to wait, and if it fails (a checksum that does
//! not match), they are told why and nothing is written anywhere.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::initramfs::{self, Installer};
use super::protocol::Compression;
use crate::artifacts::{pin, progress, servable_image, FetchError, Store};
use crate::inventory::{Checksum, Os};

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

/// Fetch one file, verified against its digest: the inventory's own, or the
/// one pinned from its checksum list (looked up and pinned the first time).
/// A download that no longer matches a pin says how to pin again.
async fn fetch(
    store: &Store,
    name: &str,
    source: &str,
    checksum: &Checksum,
) -> Result<crate::state::Artifact> {
    let (digest, pin) = pin::resolve(store, name, source, checksum).await?;
    match store
        .fetch_digest(
            name,
            source,
            &digest,
            &progress::events(store.state().clone(), name),
        )
        .await
    {
        Ok(a) => Ok(a),
        Err(e @ (FetchError::ChecksumMismatch { .. } | FetchError::Sha512Mismatch { .. })) => {
            match pin {
                Some(pin) => Err(anyhow::Error::new(e).context(pin::repin_help(&pin))),
                None => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Fetch (or take from the cache or the mirror) and verify the image and the
/// installer's kernel package, convert a qcow2 image once, and build the
/// installer environment with `agent` (the static homelab binary) as /init.
pub async fn prepare(store: &Store, state_dir: &Path, os: &Os, agent: &Path) -> Result<Media> {
    let Some(kernel) = &os.installer_kernel else {
        bail!(
            "[os] installer_kernel is not set: nodes without a boot profile install the OS, and the installer \
             needs a kernel package (linux-image-*.deb) and its checksum; see inventory.example.toml"
        );
    };
    let image = fetch(store, "os-image", &os.image, &os.checksum)
        .await
        .context("[os] image")?;
    let (image, format) = servable_image(store, &image).await.context("[os] image")?;
    let deb = fetch(store, "installer-kernel", &kernel.source, &kernel.checksum)
        .await
        .context("[os] installer_kernel")?;
    let (state_dir, agent, deb_sha) = (
        state_dir.to_path_buf(),
        agent.to_path_buf(),
        deb.sha256.clone(),
    );
    let installer = tokio::task::spawn_blocking(move || {
        initramfs::build(
            &state_dir.join("installer"),
            Path::new(&deb.path),
            &deb_sha,
            &agent,
            &[],
        )
    })
    .await??;
    Ok(Media {
        installer,
        image: PathBuf::from(&image.path),
        image_sha256: image.sha256,
        image_size: image.size,
        compression: format.into(),
    })
}
