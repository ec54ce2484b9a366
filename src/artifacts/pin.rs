//! Checksums from published lists, pinned: an inventory may name the list a
//! distribution publishes beside its files (`checksums = ".../SHA512SUMS"`)
//! instead of a digest. The list is fetched once, the file's entry looked up,
//! and the digest pinned in the state database; every later run uses the pin
//! and never fetches the list again, so a list that changes upstream cannot
//! silently change what is installed. Changing the list's URL or the file's
//! name pins afresh; `homelab repin` drops the pins of the inventory's files
//! when upstream "latest" has moved on.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{sums, Store};
use crate::inventory::{Checksum, Digest, Os};
use crate::state::{now_ms, ChecksumPin, State};

/// One file of the inventory whose digest comes from a list, and its pin if
/// it has one (what `plan` shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinStatus {
    /// Which file: "os-image" or "installer-kernel".
    pub artifact: String,
    pub list: String,
    pub file: String,
    /// None: the list is fetched and the digest pinned on `homelab up`.
    pub pin: Option<ChecksumPin>,
}

/// The name a file is listed under: the last part of its URL or path.
pub fn file_name(source: &str) -> String {
    let s = source.trim();
    let s = s.split(['?', '#']).next().unwrap_or(s);
    s.rsplit('/').next().unwrap_or(s).to_string()
}

/// The inventory's list-checked files: (artifact name, source, list).
pub fn listed(os: &Os) -> Vec<(&'static str, &str, &str)> {
    let mut out = Vec::new();
    if let Checksum::List(list) = &os.checksum {
        out.push(("os-image", os.image.as_str(), list.as_str()));
    }
    if let Some(k) = &os.installer_kernel {
        if let Checksum::List(list) = &k.checksum {
            out.push(("installer-kernel", k.source.as_str(), list.as_str()));
        }
    }
    out
}

/// The pins of the inventory's list-checked files (none when there is no state yet).
pub fn status(state: Option<&State>, os: &Os) -> Result<Vec<PinStatus>> {
    listed(os)
        .into_iter()
        .map(|(artifact, source, list)| {
            let file = file_name(source);
            let pin = match state {
                Some(st) => st.checksum_pin(list, &file)?,
                None => None,
            };
            Ok(PinStatus {
                artifact: artifact.to_string(),
                list: list.to_string(),
                file,
                pin,
            })
        })
        .collect()
}

/// The digest `source` must have: the inventory's own, or the pinned one from
/// its list (fetching the list and pinning now if this is the first time).
/// Returns the pin too when the digest came from a list.
pub async fn resolve(
    store: &Store,
    artifact: &str,
    source: &str,
    checksum: &Checksum,
) -> Result<(Digest, Option<ChecksumPin>)> {
    let list = match checksum {
        Checksum::Digest(d) => return Ok((d.clone(), None)),
        Checksum::List(list) => list,
    };
    let state = store.state();
    let file = file_name(source);
    if let Some(pin) = state.checksum_pin(list, &file)? {
        return Ok((digest_of(&pin), Some(pin)));
    }
    let (origin, bytes) = if list.starts_with('/') {
        read_local(Path::new(list))?
    } else {
        store.fetch_unpinned(list, sums::MAX_LIST_BYTES).await?
    };
    let list_name = file_name(list);
    let digest = sums::decode(&bytes)
        .and_then(|text| sums::lookup(&text, &list_name, &file))
        .map_err(|e| anyhow::anyhow!("checksum list {origin}: {e}"))
        .with_context(|| {
            format!(
                "looking up {file} for `{artifact}`: check that the list and the file belong \
                 together (the same release and architecture)"
            )
        })?;
    let pin = state.pin_checksum(&ChecksumPin {
        list: list.to_string(),
        file: file.clone(),
        algorithm: digest.algorithm,
        digest: digest.hex.clone(),
        pinned_ms: now_ms(),
    })?;
    let _ = state.append_event(
        None,
        "artifact.pinned",
        &format!(
            "pinned {file} to {} {} from {origin}",
            pin.algorithm, pin.digest
        ),
        serde_json::json!({ "artifact": artifact, "list": list, "file": file,
                            "algorithm": pin.algorithm, "digest": pin.digest }),
    );
    tracing::info!(%artifact, %file, list = %origin, "checksum pinned");
    Ok((digest_of(&pin), Some(pin)))
}

/// The help for a download that no longer matches its pin.
pub fn repin_help(pin: &ChecksumPin) -> String {
    format!(
        "{} was pinned to {} {} from {} at {}; if upstream has since published a new file \
         under the same name (a \"latest\" link that moved on), run `homelab repin` to look it \
         up again, then `homelab up`",
        pin.file,
        pin.algorithm,
        pin.digest,
        pin.list,
        crate::ui::format_time(pin.pinned_ms)
    )
}

fn digest_of(pin: &ChecksumPin) -> Digest {
    Digest {
        algorithm: pin.algorithm,
        hex: pin.digest.clone(),
    }
}

fn read_local(path: &Path) -> Result<(String, Vec<u8>)> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("checksum list {}", path.display()))?;
    if meta.len() > sums::MAX_LIST_BYTES as u64 {
        bail!(
            "checksum list {} is larger than {} bytes: not a checksum list",
            path.display(),
            sums::MAX_LIST_BYTES
        );
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("reading checksum list {}", path.display()))?;
    Ok((path.display().to_string(), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_of_sources() {
        assert_eq!(
            file_name("https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.raw"),
            "debian-12-genericcloud-amd64.raw"
        );
        assert_eq!(file_name("/srv/mirror/k.deb"), "k.deb");
        assert_eq!(file_name("https://h/x/os.img?token=1"), "os.img");
    }
}
