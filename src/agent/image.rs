//! Streaming an OS image onto a disk.
//!
//! The image arrives compressed or not, is decompressed on the fly and
//! written in 1 MiB chunks; runs of all-zero chunks become one "write
//! zeroes" request (BLKZEROOUT on a block device, a punched hole in a file),
//! which costs nothing on thin or SSD storage. The first [`HEAD`] bytes
//! (partition table, boot code) are held back in memory and written only
//! after the whole stream matched its sha256: a corrupted or cut-off image
//! never leaves a disk that looks installed, and an empty disk stays
//! "empty" to the next attempt.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::install::protocol::Compression;

/// Bytes at the start of the image written last.
pub const HEAD: usize = 1 << 20;
const CHUNK: usize = 1 << 20;

/// The disk (or, in tests, a file standing in for one).
pub struct Target {
    file: File,
    pub path: PathBuf,
    pub size: u64,
    is_block: bool,
}

nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blk_zeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
nix::ioctl_none!(blk_rrpart, 0x12, 95);

impl Target {
    /// Open a block device exclusively (fails if mounted or in use) or a file.
    pub fn open(path: &Path) -> Result<Target> {
        let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        let is_block = meta.file_type().is_block_device();
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if is_block {
            opts.custom_flags(libc::O_EXCL);
        }
        let file = opts
            .open(path)
            .with_context(|| format!("opening {} for writing (is it in use?)", path.display()))?;
        let size = if is_block {
            let mut n = 0u64;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
            unsafe { blk_getsize64(file.as_raw_fd(), &mut n) }
                .with_context(|| format!("reading the size of {}", path.display()))?;
            n
        } else {
            meta.len()
        };
        Ok(Target {
            file,
            path: path.to_path_buf(),
            size,
            is_block,
        })
    }

    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len.min(self.size.saturating_sub(offset) as usize)];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        if offset + data.len() as u64 > self.size {
            bail!(
                "the image is larger than the disk {} ({} bytes)",
                self.path.display(),
                self.size
            );
        }
        self.file
            .write_all_at(data, offset)
            .with_context(|| format!("writing {} at byte {offset}", self.path.display()))
    }

    /// Make `len` bytes at `offset` read as zeros.
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if offset + len > self.size {
            bail!(
                "the image is larger than the disk {} ({} bytes)",
                self.path.display(),
                self.size
            );
        }
        let done = if self.is_block {
            // SAFETY: BLKZEROOUT reads a [start, length] pair.
            unsafe { blk_zeroout(self.file.as_raw_fd(), &[offset, len]) }.is_ok()
        } else {
            nix::fcntl::fallocate(
                &self.file,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
            .is_ok()
        };
        if !done {
            // Neither is supported here: write the zeros.
            let zeros = vec![0u8; CHUNK];
            let mut at = offset;
            while at < offset + len {
                let n = CHUNK.min((offset + len - at) as usize);
                self.write_at(at, &zeros[..n])?;
                at += n as u64;
            }
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().context("flushing the disk")
    }

    /// Ask the kernel to re-read the partition table (block devices only).
    pub fn reread_partitions(&self) -> Result<()> {
        if self.is_block {
            // SAFETY: BLKRRPART takes no argument.
            unsafe { blk_rrpart(self.file.as_raw_fd()) }.with_context(|| {
                format!("re-reading the partition table of {}", self.path.display())
            })?;
        }
        Ok(())
    }
}

/// Counts and hashes the bytes as they arrive (before decompression).
pub struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: Arc<AtomicU64>,
}

impl<R: Read> Hashing<R> {
    pub fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: Arc::default(),
        }
    }
    /// The running count of bytes read, for progress reports.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.count.clone()
    }
    pub fn finish(self) -> (String, u64) {
        (
            hex::encode(self.hasher.finalize()),
            self.count.load(Ordering::Relaxed),
        )
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A decompressing reader over `r`.
pub fn decompress<'a, R: Read + 'a>(r: R, c: Compression) -> Result<Box<dyn Read + 'a>> {
    let buffered = io::BufReader::with_capacity(1 << 20, r);
    Ok(match c {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(buffered)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?),
    })
}

/// Write the decompressed image from `image` onto `target`, all but the
/// head, which is returned. `progress(written)` is called after each chunk.
pub fn write_body(
    image: &mut dyn Read,
    target: &Target,
    mut progress: impl FnMut(u64),
) -> Result<(Vec<u8>, u64)> {
    let mut head = Vec::with_capacity(HEAD);
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let mut zeros_from: Option<u64> = None;
    loop {
        let n = read_full(image, &mut buf).context("reading the image")?;
        if n == 0 {
            break;
        }
        let mut chunk = &buf[..n];
        if head.len() < HEAD {
            let take = (HEAD - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            offset += take as u64;
        }
        if !chunk.is_empty() {
            if chunk.iter().all(|&b| b == 0) {
                zeros_from.get_or_insert(offset);
            } else {
                if let Some(z) = zeros_from.take() {
                    target.zero(z, offset - z)?;
                }
                target.write_at(offset, chunk)?;
            }
            offset += chunk.len() as u64;
        }
        progress(offset);
    }
    if let Some(z) = zeros_from.take() {
        target.zero(z, offset - z)?;
    }
    if offset > target.size {
        bail!(
            "the image ({offset} bytes) is larger than the disk ({} bytes)",
            target.size
        );
    }
    Ok((head, offset))
}

/// Fill `buf` unless the stream ends first; returns the bytes read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: usize) -> Vec<u8> {
        // Data, a long zero run, more data: like a real disk image.
        let mut v = vec![0u8; len];
        for (i, b) in v.iter_mut().enumerate().take(3 << 20) {
            *b = (i % 251) as u8;
        }
        let tail = len - (1 << 20);
        for (i, b) in v[tail..].iter_mut().enumerate() {
            *b = (i % 13) as u8 + 1;
        }
        v
    }

    #[test]
    fn the_body_is_written_the_head_is_held_back_and_zero_runs_read_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        // The disk held old data everywhere.
        std::fs::write(&disk, vec![0xaau8; 16 << 20]).unwrap();
        let img = image(12 << 20);
        let target = Target::open(&disk).unwrap();
        let mut calls = 0;
        let (head, written) = write_body(&mut &img[..], &target, |_| calls += 1).unwrap();
        assert_eq!(written, img.len() as u64);
        assert_eq!(head, img[..HEAD]);
        assert!(calls >= 12);
        let on_disk = std::fs::read(&disk).unwrap();
        // The head is still the old data: written last, by the caller.
        assert!(on_disk[..HEAD].iter().all(|&b| b == 0xaa));
        assert_eq!(on_disk[HEAD..img.len()], img[HEAD..]);
        // Beyond the image the old data is untouched.
        assert!(on_disk[img.len()..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn every_compression_round_trips_and_the_hash_covers_the_stream() {
        let img = image(6 << 20);
        let packed: Vec<(Compression, Vec<u8>)> = vec![
            (Compression::None, img.clone()),
            (Compression::Gzip, {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                io::Write::write_all(&mut e, &img).unwrap();
                e.finish().unwrap()
            }),
            (Compression::Xz, {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
                io::Write::write_all(&mut e, &img).unwrap();
                e.finish().unwrap()
            }),
            (Compression::Zstd, zstd::encode_all(&img[..], 3).unwrap()),
        ];
        for (c, bytes) in packed {
            assert_eq!(Compression::detect(&bytes), c);
            let dir = tempfile::tempdir().unwrap();
            let disk = dir.path().join("disk");
            std::fs::File::create(&disk)
                .unwrap()
                .set_len(8 << 20)
                .unwrap();
            let target = Target::open(&disk).unwrap();
            let mut hashing = Hashing::new(&bytes[..]);
            let (head, written) = {
                let mut r = decompress(&mut hashing, c).unwrap();
                write_body(&mut r, &target, |_| {}).unwrap()
            };
            let (sha, count) = hashing.finish();
            assert_eq!(count, bytes.len() as u64, "{c:?}");
            assert_eq!(sha, hex::encode(Sha256::digest(&bytes)), "{c:?}");
            assert_eq!(written, img.len() as u64);
            target.write_at(0, &head).unwrap();
            assert_eq!(std::fs::read(&disk).unwrap()[..img.len()], img[..], "{c:?}");
        }
    }

    #[test]
    fn an_image_larger_than_the_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let target = Target::open(&disk).unwrap();
        let img = image(6 << 20);
        let err = write_body(&mut &img[..], &target, |_| {}).unwrap_err();
        assert!(
            format!("{err:#}").contains("larger than the disk"),
            "{err:#}"
        );
    }
}
