//! Secrets (SSH keys, tokens, passwords) are files of mode 0600 under
//! `<state dir>/secrets/`, never rows in the database and never logged.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub fn secret_path(state_dir: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("invalid secret name `{name}`");
    }
    Ok(state_dir.join("secrets").join(name))
}

/// Write a secret atomically with mode 0600 (temp file + rename, so a crash
/// never leaves a half-written secret).
pub fn write_secret(state_dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let path = secret_path(state_dir, name)?;
    let dir = path.parent().expect("secret path has a parent");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing secret {}", tmp.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Read a secret; refuses one that others can read.
pub fn read_secret(state_dir: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let path = secret_path(state_dir, name)?;
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "secret {} is readable by others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            meta.permissions().mode() & 0o777,
            path.display()
        );
    }
    Ok(Some(std::fs::read(&path)?))
}
