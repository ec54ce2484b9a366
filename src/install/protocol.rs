//! What the controller and the installer agent say to each other, as JSON
//! over the controller's HTTP port.
//!
//! 1. iPXE boots the installer with `homelab.plan=<url>` on the kernel line;
//!    the URL carries a one-time token, minted when the script was served.
//! 2. The agent GETs its [`InstallPlan`]; that consumes the token, and the
//!    plan carries a `session` the agent presents (Bearer) from then on.
//! 3. The agent GETs the image (range requests, to resume) and POSTs
//!    [`Report`]s to `report_url`: the disk it chose, progress, its log, and
//!    in the end `Done` (with the public host key it generated, which the
//!    controller pins) or `Failed`.
//!
//! Nothing secret travels this way: the node's SSH host key is generated on
//! the node and only its public half is reported; the controller's key is
//! sent as a public key. The token and session only bind one install attempt.

use serde::{Deserialize, Serialize};

/// How the image is compressed (the agent decompresses while writing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
}

impl From<crate::artifacts::ImageFormat> for Compression {
    /// How the agent must decompress an image the controller serves; a
    /// qcow2 image is served converted to raw.
    fn from(f: crate::artifacts::ImageFormat) -> Compression {
        use crate::artifacts::ImageFormat;
        match f {
            ImageFormat::Gzip => Compression::Gzip,
            ImageFormat::Xz => Compression::Xz,
            ImageFormat::Zstd => Compression::Zstd,
            ImageFormat::Raw | ImageFormat::Qcow2 => Compression::None,
        }
    }
}

impl Compression {
    /// By magic bytes ([`crate::artifacts::detect_format`]); unrecognised is raw.
    pub fn detect(head: &[u8]) -> Compression {
        crate::artifacts::detect_format(head).into()
    }
}

/// The image to write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub url: String,
    /// sha256 of the bytes as served (compressed, if compressed).
    pub sha256: String,
    /// Size of the bytes as served.
    pub size: u64,
    pub compression: Compression,
}

/// A file the agent writes into the installed system's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedFile {
    /// Absolute path inside the installed system.
    pub path: String,
    pub mode: u32,
    pub content: String,
}

/// Everything the agent needs for one install attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallPlan {
    pub node: String,
    /// Bearer credential for the image and the reports of this attempt.
    pub session: String,
    pub image: ImageRef,
    /// `auto` or a device path from the inventory.
    pub disk: String,
    /// The disk may hold data and be overwritten: a reinstall was asked for,
    /// or an earlier attempt of this node already wrote to it.
    pub may_overwrite: bool,
    /// cloud-init's NoCloud seed and the like, written into the root fs.
    pub files: Vec<SeedFile>,
    pub report_url: String,
}

/// The disk the agent chose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    pub device: String,
    pub size: u64,
    pub model: String,
    /// What was on it before (a partition table, a filesystem...), if anything.
    pub previous: Option<String>,
}

/// A message from the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Report {
    Disk(DiskReport),
    /// Bytes of the image received and written so far.
    Progress {
        received: u64,
        total: u64,
        written: u64,
    },
    /// The first sectors (partition table, boot code) are on the disk: from
    /// now on the disk holds this node's (possibly unfinished) system.
    HeadWritten,
    Log {
        lines: Vec<String>,
    },
    Done {
        /// OpenSSH public key line of the host key generated on the node.
        host_key: String,
        bytes_written: u64,
        seconds: f64,
    },
    Failed {
        error: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_by_magic() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(Compression::detect(b"\xfd7zXZ\0rest"), Compression::Xz);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(b"\xeb\x63\x90"), Compression::None);
        assert_eq!(Compression::detect(b""), Compression::None);
    }

    #[test]
    fn reports_are_tagged_json() {
        let r = Report::Progress {
            received: 1,
            total: 2,
            written: 3,
        };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(
            j,
            r#"{"kind":"progress","received":1,"total":2,"written":3}"#
        );
        assert_eq!(serde_json::from_str::<Report>(&j).unwrap(), r);
        let h: Report = serde_json::from_str(r#"{"kind":"head-written"}"#).unwrap();
        assert_eq!(h, Report::HeadWritten);
    }
}
