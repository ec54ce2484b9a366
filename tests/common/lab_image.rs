//! The lab's OS image (Debian with cloud-init, bootable under BIOS and UEFI),
//! built once and cached by scripts/lab-image.sh.

use std::path::PathBuf;
use std::sync::OnceLock;

#[derive(Clone, Debug)]
pub struct LabImage {
    pub path: PathBuf,
    pub sha256: String,
    /// Bytes of the uncompressed image.
    pub size: u64,
}

pub fn lab_image() -> Result<LabImage, String> {
    static IMAGE: OnceLock<Result<LabImage, String>> = OnceLock::new();
    IMAGE.get_or_init(build).clone()
}

fn build() -> Result<LabImage, String> {
    let f = super::keyed_script("lab-image.sh")?;
    let get = |k: &str| super::field(&f, "lab-image.sh", k);
    Ok(LabImage {
        path: get("image")?.into(),
        sha256: get("sha256")?,
        size: get("size")?.parse().map_err(|e| format!("size: {e}"))?,
    })
}
