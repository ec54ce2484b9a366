//! OS image formats: what the node's installer can stream as it is, and what
//! the controller must convert first.

use std::io::{self, Read};
use std::path::Path;

use anyhow::{bail, Context};

use super::{Spec, Store, TempFile};
use crate::state::Artifact;

/// An OS image's container format, told by its magic bytes (file names lie,
/// and cloud images are often plain `.img` files that are really qcow2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// A disk image, written to the disk byte for byte.
    Raw,
    /// gzip-compressed raw; the node decompresses while writing.
    Gzip,
    /// xz-compressed raw; the node decompresses while writing.
    Xz,
    /// zstd-compressed raw; the node decompresses while writing.
    Zstd,
    /// QEMU's format (sparse, clustered): the node cannot stream it, so the
    /// controller converts it to raw once.
    Qcow2,
}

impl ImageFormat {
    /// Lower-case name, as the installer and logs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Gzip => "gzip",
            ImageFormat::Xz => "xz",
            ImageFormat::Zstd => "zstd",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const QCOW2_MAGIC: &[u8] = &[b'Q', b'F', b'I', 0xfb];

/// The format of an image from its first bytes (a few are enough; 512 is
/// plenty). Pure, so the node's installer and the controller agree. Anything
/// unrecognised is raw: a disk image starts with whatever its boot sector holds.
pub fn detect_format(head: &[u8]) -> ImageFormat {
    if head.starts_with(QCOW2_MAGIC) {
        ImageFormat::Qcow2
    } else if head.starts_with(XZ_MAGIC) {
        ImageFormat::Xz
    } else if head.starts_with(ZSTD_MAGIC) {
        ImageFormat::Zstd
    } else if head.starts_with(GZIP_MAGIC) {
        ImageFormat::Gzip
    } else {
        ImageFormat::Raw
    }
}

/// The artifact to serve to nodes for an OS image, and its format.
///
/// qcow2 is converted once on the controller (qemu-img convert -O raw) into a derived cached
/// artifact with its own sha256 (row `<name>@raw`, source `qcow2:<sha256 of the qcow2>`);
/// raw/gz/xz/zst are served as they are (the node decompresses while writing, which keeps the
/// transfer small). A qcow2 with a backing file or external data file is refused: converting
/// it would read other files of the controller into an image served to the network.
pub async fn servable_image(
    store: &Store,
    fetched: &Artifact,
) -> anyhow::Result<(Artifact, ImageFormat)> {
    let path = Path::new(&fetched.path);
    let head = read_head(path).with_context(|| format!("reading {}", path.display()))?;
    let format = detect_format(&head);
    if format != ImageFormat::Qcow2 {
        return Ok((fetched.clone(), format));
    }
    let derived = format!("{}@raw", fetched.name);
    let origin = format!("qcow2:{}", fetched.sha256);
    let lock = store.lock_for(&format!("convert:{}", fetched.sha256));
    let _guard = lock.lock().await;
    if let Some(row) = store.inner.state.artifact(&derived)? {
        if row.source == origin && store.unchanged(&row) {
            return Ok((row, ImageFormat::Raw));
        }
    }

    check_standalone(path).await?;
    let mut temp = TempFile::new(store.temp_path("raw"));
    tracing::info!(image = %path.display(), "converting qcow2 to raw (once)");
    let target = temp.path.to_string_lossy().into_owned();
    qemu_img(
        &["convert", "-q", "-f", "qcow2", "-O", "raw"],
        path,
        &[&target],
    )
    .await?;
    let tpath = temp.path.clone();
    temp.sha256 = tokio::task::spawn_blocking(move || super::sha256_file(&tpath))
        .await?
        .with_context(|| format!("hashing {}", temp.path.display()))?;
    let spec = Spec {
        name: derived,
        source: origin,
        sha256: temp.sha256.clone(),
    };
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file_name = format!("{stem}.raw");
    let a = store.install(
        &spec,
        temp,
        &format!("qemu-img convert of {}", path.display()),
        &file_name,
    )?;
    Ok((a, ImageFormat::Raw))
}

fn read_head(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let mut head = Vec::with_capacity(512);
    f.by_ref().take(512).read_to_end(&mut head)?;
    Ok(head)
}

/// Run `qemu-img ARGS PATH REST`; a failure carries its stderr.
async fn qemu_img(
    args: &[&str],
    path: &Path,
    rest: &[&str],
) -> anyhow::Result<std::process::Output> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .arg(path)
        .args(rest)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(qemu_img_missing)?;
    if !out.status.success() {
        bail!(
            "qemu-img {} {} failed ({}): {}",
            args[0],
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn qemu_img_missing(e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "qemu-img not found: install qemu-utils on the controller to serve qcow2 images \
             (or use a raw, .gz, .xz or .zst image)"
        )
    } else {
        anyhow::Error::new(e).context("running qemu-img")
    }
}

/// Refuse a qcow2 that reads other files (backing file, external data file).
async fn check_standalone(path: &Path) -> anyhow::Result<()> {
    let out = qemu_img(&["info", "--output=json", "-f", "qcow2"], path, &[]).await?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing qemu-img info of {}", path.display()))?;
    if let Some(b) = info.get("backing-filename") {
        bail!(
            "qcow2 image {} has a backing file ({b}); only standalone images can be served \
             (flatten it with `qemu-img convert -O qcow2`)",
            path.display()
        );
    }
    if let Some(d) = info.pointer("/format-specific/data/data-file") {
        bail!(
            "qcow2 image {} has an external data file ({d}); only standalone images can be served",
            path.display()
        );
    }
    Ok(())
}
