//! The controller's own SSH key: generated once, kept as a secret file, and
//! written into every node's authorized_keys by the installer. One key for
//! the whole lab keeps "which key reaches node3?" out of the user's mind.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, PrivateKey};

use super::pin::fingerprint;
use crate::state::{read_secret, secret_path, write_secret};

/// The secret's file name under `<state dir>/secrets/`.
pub const KEY_SECRET: &str = "ssh_ed25519";

/// The controller's ed25519 key. Debug and Display show only the public
/// fingerprint, so the key cannot leak into a log by accident.
#[derive(Clone)]
pub struct ControllerKey {
    key: Arc<PrivateKey>,
    path: PathBuf,
}

impl ControllerKey {
    /// Loads the key, creating it on first use. Creating it again would lock
    /// the controller out of every node installed so far, so an unreadable or
    /// corrupt file is an error, never a reason to generate a new key.
    pub fn load_or_create(state_dir: &Path) -> Result<ControllerKey> {
        let path = secret_path(state_dir, KEY_SECRET)?;
        let key = match read_secret(state_dir, KEY_SECRET)? {
            Some(bytes) => parse(&bytes, &path)?,
            None => create(state_dir)?,
        };
        Ok(ControllerKey {
            key: Arc::new(key),
            path,
        })
    }

    /// The authorized_keys line (`ssh-ed25519 AAAA... homelab@<controller>`)
    /// the installer writes on each node.
    pub fn public_openssh(&self) -> String {
        self.key
            .public_key()
            .to_openssh()
            .expect("an ed25519 public key always encodes")
    }

    /// `SHA256:...` of the public key, to name the key in messages.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.key.public_key())
    }

    /// Where the private key lives (for messages; never read it elsewhere).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn private(&self) -> Arc<PrivateKey> {
        Arc::clone(&self.key)
    }
}

fn parse(bytes: &[u8], path: &Path) -> Result<PrivateKey> {
    let key = PrivateKey::from_openssh(bytes).with_context(|| {
        format!(
            "the controller SSH key {} is not an OpenSSH private key; restore it from a backup \
             (a new key would lock homelab out of the nodes installed with the old one)",
            path.display()
        )
    })?;
    if key.is_encrypted() {
        bail!(
            "the controller SSH key {} is passphrase-protected; homelab needs it unencrypted \
             (`ssh-keygen -p -N '' -f {}`)",
            path.display(),
            path.display()
        );
    }
    Ok(key)
}

fn create(state_dir: &Path) -> Result<PrivateKey> {
    let mut key = PrivateKey::random(&mut russh::keys::key::safe_rng(), Algorithm::Ed25519)
        .context("generating the controller SSH key")?;
    key.set_comment(format!("homelab@{}", controller_name()));
    let pem = key
        .to_openssh(LineEnding::LF)
        .context("encoding the controller SSH key")?;
    let path = write_secret(state_dir, KEY_SECRET, pem.as_bytes())?;
    tracing::info!(
        path = %path.display(),
        fingerprint = %fingerprint(key.public_key()),
        "created the controller SSH key"
    );
    Ok(key)
}

/// The controller's host name, to tell this controller's key from others in
/// a node's authorized_keys.
fn controller_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or_else(|| "controller".to_string())
}

impl fmt::Debug for ControllerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ControllerKey({})", self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = ControllerKey::load_or_create(dir.path()).unwrap();
        let b = ControllerKey::load_or_create(dir.path()).unwrap();
        assert_eq!(a.public_openssh(), b.public_openssh());
        assert!(a.public_openssh().starts_with("ssh-ed25519 AAAA"));
        assert!(a.public_openssh().contains(" homelab@"));
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            format!("{a:?}"),
            format!("ControllerKey({})", a.fingerprint())
        );
    }

    #[test]
    fn a_corrupt_key_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        write_secret(dir.path(), KEY_SECRET, b"not a key").unwrap();
        let e = ControllerKey::load_or_create(dir.path()).unwrap_err();
        assert!(
            format!("{e:#}").contains("restore it from a backup"),
            "{e:#}"
        );
        assert_eq!(
            read_secret(dir.path(), KEY_SECRET).unwrap().unwrap(),
            b"not a key"
        );
    }
}
