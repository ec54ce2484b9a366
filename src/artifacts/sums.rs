//! Published checksum lists: finding one file's digest in a distribution's
//! SHA512SUMS / SHA256SUMS file or in a Debian archive's Packages index.
//!
//! Pure functions over the list's bytes; fetching the list and pinning the
//! result are the caller's (see `pin`). Formats read:
//! - GNU coreutils: `DIGEST  NAME` (text mode) and `DIGEST *NAME` (binary mode);
//! - BSD / `sha512sum --tag`: `SHA512 (NAME) = DIGEST`;
//! - a Debian Packages index (plain, .xz or .gz): the stanza whose `Filename:`
//!   ends in NAME, its `SHA256:` field.
//!
//! The algorithm comes from the digest's length (64 hex: sha256, 128: sha512)
//! or the BSD tag; a list named SHA256SUMS or SHA512SUMS must agree with it.

use std::io::Read;

use crate::inventory::{Algorithm, Digest};

/// The most a checksum list may be, compressed or not. Debian's largest
/// Packages index (main, amd64) is about 50 MB unpacked.
pub const MAX_LIST_BYTES: usize = 128 << 20;

/// The list's text: xz and gzip are unpacked (by their magic bytes), at most
/// [`MAX_LIST_BYTES`] in all.
pub fn decode(bytes: &[u8]) -> Result<String, String> {
    let mut out = Vec::new();
    let cap = MAX_LIST_BYTES as u64 + 1;
    let read = if bytes.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        liblzma::read::XzDecoder::new(bytes)
            .take(cap)
            .read_to_end(&mut out)
            .map_err(|e| format!("cannot unpack it (xz): {e}"))
    } else if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(bytes)
            .take(cap)
            .read_to_end(&mut out)
            .map_err(|e| format!("cannot unpack it (gzip): {e}"))
    } else {
        out = bytes.to_vec();
        Ok(out.len())
    };
    read?;
    if out.len() > MAX_LIST_BYTES {
        return Err(format!(
            "it unpacks to more than {MAX_LIST_BYTES} bytes: not a checksum list"
        ));
    }
    String::from_utf8(out).map_err(|_| "it is not text: not a checksum list".to_string())
}

/// The digest `list` gives for `file` (a bare file name). `list_name` is the
/// list's own file name (SHA512SUMS, Packages.xz...), used to check the
/// algorithm and in messages.
pub fn lookup(list: &str, list_name: &str, file: &str) -> Result<Digest, String> {
    let packages = list.starts_with("Package:") || list.contains("\nFilename:");
    let found = if packages {
        packages_lookup(list, file)
    } else {
        list.lines().find_map(|l| sums_line(l, file))
    };
    let Some(digest) = found else {
        let near = similar_names(list, packages, file);
        let near = if near.is_empty() {
            String::new()
        } else {
            format!("; it lists {}", near.join(", "))
        };
        return Err(format!("{list_name} has no entry for `{file}`{near}"));
    };
    let upper = list_name.to_ascii_uppercase();
    for alg in [Algorithm::Sha256, Algorithm::Sha512] {
        let other = if alg == Algorithm::Sha256 {
            "SHA512"
        } else {
            "SHA256"
        };
        if upper.contains(other) && digest.algorithm == alg {
            return Err(format!(
                "{list_name} gives `{file}` a {alg} digest, but its name says {}",
                other.to_ascii_lowercase()
            ));
        }
    }
    Ok(digest)
}

/// One line of a SHA*SUMS file, if it is `file`'s.
fn sums_line(line: &str, file: &str) -> Option<Digest> {
    let line = line.trim_end_matches('\r');
    // BSD: `SHA512 (NAME) = DIGEST`
    if let Some((tag, rest)) = line.split_once(" (") {
        if let Some((name, hex)) = rest.rsplit_once(") = ") {
            let algorithm: Algorithm = tag.to_ascii_lowercase().parse().ok()?;
            return (name == file).then(|| digest(algorithm, hex)).flatten();
        }
    }
    // GNU: `DIGEST  NAME` or `DIGEST *NAME`
    let (hex, name) = line.split_once(' ')?;
    let name = name.strip_prefix(['*', ' '])?;
    if name != file && name.strip_prefix("./") != Some(file) {
        return None;
    }
    digest(Algorithm::from_hex_len(hex.len())?, hex)
}

fn digest(algorithm: Algorithm, hex: &str) -> Option<Digest> {
    let hex = hex.trim();
    (hex.len() == algorithm.hex_len() && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| {
        Digest {
            algorithm,
            hex: hex.to_ascii_lowercase(),
        }
    })
}

/// The SHA256 of the Packages stanza whose Filename's last part is `file`.
fn packages_lookup(list: &str, file: &str) -> Option<Digest> {
    list.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(str::trim)
            })
        };
        let filename = field("Filename")?;
        if filename.rsplit('/').next() != Some(file) {
            return None;
        }
        digest(Algorithm::Sha256, field("SHA256")?)
    })
}

/// Up to five names in the list that share `file`'s start (before its first
/// digit), so a version that moved on is easy to spot.
fn similar_names(list: &str, packages: bool, file: &str) -> Vec<String> {
    let stem: String = file.chars().take_while(|c| !c.is_ascii_digit()).collect();
    if stem.len() < 3 {
        return Vec::new();
    }
    let names: Vec<&str> = if packages {
        list.lines()
            .filter_map(|l| l.strip_prefix("Filename:"))
            .filter_map(|f| f.trim().rsplit('/').next())
            .collect()
    } else {
        list.lines()
            .filter_map(|l| {
                l.split_once(" (")
                    .and_then(|(_, r)| r.rsplit_once(") = ").map(|(n, _)| n))
                    .or_else(|| {
                        l.split_once(' ')
                            .map(|(_, n)| n.trim_start_matches([' ', '*']))
                    })
            })
            .collect()
    };
    let mut near: Vec<String> = names
        .into_iter()
        .filter(|n| n.starts_with(&stem) && !n.contains("dbg"))
        .map(str::to_string)
        .collect();
    near.sort();
    near.dedup();
    let skip = near.len().saturating_sub(5);
    near.split_off(skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn a512() -> String {
        format!("{A256}{}", &A256.to_uppercase())
    }

    #[test]
    fn gnu_text_and_binary_lines() {
        let list = format!(
            "{}  debian-12-genericcloud-amd64.qcow2\n{}  debian-12-genericcloud-amd64.raw\n",
            "1".repeat(128),
            a512()
        );
        let d = lookup(&list, "SHA512SUMS", "debian-12-genericcloud-amd64.raw").unwrap();
        assert_eq!(d.algorithm, Algorithm::Sha512);
        assert_eq!(d.hex, a512().to_ascii_lowercase());
        let list = format!("{A256} *os.img\r\n");
        let d = lookup(&list, "SHA256SUMS", "os.img").unwrap();
        assert_eq!(d, Digest::sha256(A256));
        assert!(lookup(&list, "SHA256SUMS", "os.im").is_err());
    }

    #[test]
    fn bsd_tagged_lines() {
        let list = format!("SHA512 (os.raw) = {}\nSHA256 (k.deb) = {A256}\n", a512());
        assert_eq!(
            lookup(&list, "CHECKSUMS", "os.raw").unwrap().algorithm,
            Algorithm::Sha512
        );
        assert_eq!(
            lookup(&list, "CHECKSUMS", "k.deb").unwrap(),
            Digest::sha256(A256)
        );
    }

    #[test]
    fn the_list_name_must_agree_with_the_digest() {
        let list = format!("{A256}  os.raw\n");
        let e = lookup(&list, "SHA512SUMS", "os.raw").unwrap_err();
        assert!(e.contains("its name says sha512"), "{e}");
    }

    #[test]
    fn missing_entries_name_the_near_ones() {
        let list =
            format!("{A256}  linux-image-6.1.0-31-amd64_6.1.128-1_amd64.deb\n{A256}  other.raw\n");
        let e = lookup(
            &list,
            "SHA256SUMS",
            "linux-image-6.1.0-28-amd64_6.1.119-1_amd64.deb",
        )
        .unwrap_err();
        assert!(
            e.contains("no entry for")
                && e.contains("linux-image-6.1.0-31-amd64_6.1.128-1_amd64.deb"),
            "{e}"
        );
        assert!(!e.contains("other.raw"), "{e}");
    }

    #[test]
    fn packages_index_by_file_name() {
        let index = format!(
            "Package: linux-image-6.1.0-28-amd64\nVersion: 6.1.119-1\n\
             Filename: pool/main/l/linux-signed-amd64/linux-image-6.1.0-28-amd64_6.1.119-1_amd64.deb\n\
             Size: 1\nMD5sum: 00\nSHA256: {A256}\n\n\
             Package: other\nFilename: pool/main/o/other/other_1_amd64.deb\nSHA256: {}\n",
            "2".repeat(64)
        );
        let d = lookup(
            &index,
            "Packages.xz",
            "linux-image-6.1.0-28-amd64_6.1.119-1_amd64.deb",
        )
        .unwrap();
        assert_eq!(d, Digest::sha256(A256));
        // Compressed the way the archive serves it.
        let mut xz = Vec::new();
        liblzma::read::XzEncoder::new(index.as_bytes(), 6)
            .read_to_end(&mut xz)
            .unwrap();
        assert_eq!(decode(&xz).unwrap(), index);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, index.as_bytes()).unwrap();
        assert_eq!(decode(&gz.finish().unwrap()).unwrap(), index);
        assert!(decode(&[0xff, 0xfe, 0]).is_err());
    }
}
