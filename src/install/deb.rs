//! Reading a Debian package (.deb) without dpkg: an `ar` archive whose
//! `data.tar.{xz,zst,gz}` member holds the files. Used to take the kernel
//! and its modules out of the distribution's linux-image package.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// One member of the ar archive: its name and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

/// The members of an ar archive, from its headers. Pure over any reader.
pub fn members(r: &mut (impl Read + Seek)) -> Result<Vec<Member>> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).context("reading the ar magic")?;
    if &magic != b"!<arch>\n" {
        bail!("not a Debian package (no ar archive magic)");
    }
    let mut out = Vec::new();
    let mut pos = 8u64;
    loop {
        let mut head = [0u8; 60];
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e).context("reading an ar member header"),
        }
        if &head[58..60] != b"`\n" {
            bail!("corrupt ar member header at byte {pos}");
        }
        let name = String::from_utf8_lossy(&head[0..16])
            .trim_end()
            .trim_end_matches('/')
            .to_string();
        let size: u64 = String::from_utf8_lossy(&head[48..58])
            .trim()
            .parse()
            .with_context(|| format!("bad size in the ar header of {name}"))?;
        let offset = pos + 60;
        out.push(Member { name, offset, size });
        // Members are padded to an even offset.
        pos = offset + size + (size % 2);
        r.seek(SeekFrom::Start(pos))?;
    }
    Ok(out)
}

/// Calls `f(path, size, reader)` for every regular file in the package's
/// data archive, paths without the leading `./`. `f` returns false to stop.
pub fn for_each_file(
    deb: &Path,
    mut f: impl FnMut(&str, u64, &mut dyn Read) -> Result<bool>,
) -> Result<()> {
    let mut file = File::open(deb).with_context(|| format!("opening {}", deb.display()))?;
    let members = members(&mut file).with_context(|| format!("reading {}", deb.display()))?;
    let data = members
        .iter()
        .find(|m| m.name.starts_with("data.tar"))
        .with_context(|| format!("{} has no data.tar member", deb.display()))?;
    file.seek(SeekFrom::Start(data.offset))?;
    let raw = BufReader::with_capacity(1 << 20, file.take(data.size));
    let decoded: Box<dyn Read> = match data.name.as_str() {
        "data.tar.xz" => Box::new(liblzma::read::XzDecoder::new(raw)),
        "data.tar.zst" => Box::new(zstd::stream::read::Decoder::with_buffer(raw)?),
        "data.tar.gz" => Box::new(flate2::bufread::GzDecoder::new(raw)),
        "data.tar" => Box::new(raw),
        other => bail!("{}: unsupported data member {other}", deb.display()),
    };
    let mut archive = tar::Archive::new(decoded);
    for entry in archive
        .entries()
        .with_context(|| format!("reading the files of {}", deb.display()))?
    {
        let mut entry = entry.with_context(|| format!("reading the files of {}", deb.display()))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path()?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./").to_string();
        let size = entry.size();
        if !f(&path, size, &mut entry)? {
            break;
        }
    }
    Ok(())
}

/// Decompress a module file by its suffix (`.ko`, `.ko.xz`, `.ko.zst`, `.ko.gz`).
pub fn read_module(path: &str, r: &mut dyn Read) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    if path.ends_with(".ko.xz") {
        liblzma::read::XzDecoder::new(r).read_to_end(&mut out)?;
    } else if path.ends_with(".ko.zst") {
        zstd::stream::read::Decoder::new(r)?.read_to_end(&mut out)?;
    } else if path.ends_with(".ko.gz") {
        flate2::read::GzDecoder::new(r).read_to_end(&mut out)?;
    } else {
        r.read_to_end(&mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn ar(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = b"!<arch>\n".to_vec();
        for (name, data) in members {
            let head = format!(
                "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                name,
                0,
                0,
                0,
                100644,
                data.len()
            );
            assert_eq!(head.len(), 60);
            out.extend_from_slice(head.as_bytes());
            out.extend_from_slice(data);
            if data.len() % 2 == 1 {
                out.push(b'\n');
            }
        }
        out
    }

    #[test]
    fn ar_members_with_odd_sizes_are_found() {
        let bytes = ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar.xz", b"abc"),
            ("data.tar", b"xy"),
        ]);
        let m = members(&mut Cursor::new(&bytes)).unwrap();
        let names: Vec<_> = m.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["debian-binary", "control.tar.xz", "data.tar"]);
        assert_eq!(&bytes[m[1].offset as usize..][..3], b"abc");
        assert_eq!(&bytes[m[2].offset as usize..][..2], b"xy");
        assert!(members(&mut Cursor::new(b"not an archive")).is_err());
    }

    #[test]
    fn files_come_out_of_a_compressed_data_member() {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, data) in [
            ("./boot/vmlinuz-1", &b"kernel"[..]),
            ("./lib/modules/1/a.ko", b"module"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, path, data).unwrap();
        }
        let tar = tar.into_inner().unwrap();
        let xz = {
            let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 1);
            std::io::Write::write_all(&mut enc, &tar).unwrap();
            enc.finish().unwrap()
        };
        let deb = ar(&[("debian-binary", b"2.0\n"), ("data.tar.xz", &xz)]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.deb");
        std::fs::write(&path, deb).unwrap();
        let mut seen = Vec::new();
        for_each_file(&path, |p, size, r| {
            let mut s = String::new();
            r.read_to_string(&mut s)?;
            seen.push((p.to_string(), size, s));
            Ok(true)
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                ("boot/vmlinuz-1".to_string(), 6, "kernel".to_string()),
                ("lib/modules/1/a.ko".to_string(), 6, "module".to_string())
            ]
        );
    }
}
