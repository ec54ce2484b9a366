//! The lab's OS image (Debian with cloud-init, bootable under BIOS and UEFI),
//! built once and cached by scripts/lab-image.sh.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::repo_root;

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
    let script = repo_root().join("scripts/lab-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            super::tail(&String::from_utf8_lossy(&out.stderr), 30)
        ));
    }
    let field = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .map(str::to_string)
            .ok_or_else(|| format!("{} printed no `{k}=`: {stdout}", script.display()))
    };
    Ok(LabImage {
        path: field("image")?.into(),
        sha256: field("sha256")?,
        size: field("size")?.parse().map_err(|e| format!("size: {e}"))?,
    })
}
