//! The k3s release a cluster runs: its binary and air-gap images, fetched
//! once (from the official release URLs, or the mirror directory) and
//! verified against the release's own checksum list, then cached as
//! artifacts like the OS image.

use anyhow::{anyhow, Context, Result};

use crate::artifacts::{Spec, Store};
use crate::state::Artifact;

use super::{checksum_of, release_urls};

/// The release's checksum list is a few lines; anything bigger is wrong.
const CHECKSUMS_MAX: usize = 64 * 1024;

/// The binary and the air-gap images of one version, verified.
#[derive(Debug, Clone)]
pub struct Release {
    pub version: String,
    pub binary: Artifact,
    pub images: Artifact,
}

/// Fetches (or finds in the cache) everything `version` needs.
pub async fn prepare(store: &Store, version: &str) -> Result<Release> {
    let urls = release_urls(version);
    let (origin, sums) = store
        .fetch_unpinned(&urls.checksums, CHECKSUMS_MAX)
        .await
        .with_context(|| format!("the checksum list of k3s {version}"))?;
    let sums = String::from_utf8(sums)
        .map_err(|_| anyhow!("{origin} is not a checksum list (not text)"))?;
    let spec = |name: &str, url: &str| -> Result<Spec> {
        let file = url.rsplit('/').next().unwrap_or_default();
        let sha256 = checksum_of(&sums, file).map_err(|e| anyhow!("{origin}: {e}"))?;
        Ok(Spec {
            name: format!("k3s-{name}"),
            source: url.to_string(),
            sha256,
        })
    };
    let progress = |name: &str| crate::artifacts::progress::events(store.state().clone(), name);
    let binary = store
        .fetch(&spec("binary", &urls.binary)?, &progress("k3s-binary"))
        .await
        .with_context(|| format!("the k3s {version} binary"))?;
    let images = store
        .fetch(
            &spec("airgap-images", &urls.airgap_images)?,
            &progress("k3s-airgap-images"),
        )
        .await
        .with_context(|| format!("the k3s {version} air-gap images"))?;
    Ok(Release {
        version: version.to_string(),
        binary,
        images,
    })
}
