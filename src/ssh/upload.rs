//! Putting a file on a node with nothing but `sh` there: no SFTP subsystem
//! to depend on, and the bytes (a k3s join token, say) travel only inside
//! the SSH channel, on the command's stdin, never on a command line.
//!
//! The remote script reads the expected sha256 as the first line of stdin
//! and the file after it, writes a private temp file beside the target,
//! and renames it into place only when the hash matches: a reader of the
//! target sees the old file or the whole new one, never a torn one.

use sha2::{Digest, Sha256};

/// What `upload` refuses before talking to the node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UploadPathError {
    #[error("remote path `{0}` must be absolute and name a file")]
    NotAFilePath(String),
    #[error("mode {0:o} is not a file mode (at most 7777)")]
    BadMode(u32),
}

/// The sha256 of `bytes` as lowercase hex, as `sha256sum` prints it.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Quotes `s` for POSIX sh: inside single quotes nothing is special except
/// the quote itself.
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The remote command for writing `path` with `mode`.
pub(crate) fn script(path: &str, mode: u32) -> Result<String, UploadPathError> {
    let (dir, name) = split_path(path)?;
    if mode > 0o7777 {
        return Err(UploadPathError::BadMode(mode));
    }
    let dst = sh_quote(path);
    let tmp = sh_quote(&format!("{dir}/.{name}.homelab-upload."));
    Ok(format!(
        r#"set -eu
umask 077
dst={dst}
tmp={tmp}$$
trap 'rm -f "$tmp"' EXIT
IFS= read -r want
(set -C; cat >"$tmp")
got=$(sha256sum "$tmp")
got=${{got%% *}}
if [ "$got" != "$want" ]; then
  echo "homelab upload: checksum mismatch on the node (got $got); $dst left unchanged" >&2
  exit 3
fi
chmod {mode:o} "$tmp"
mv -f "$tmp" "$dst"
trap - EXIT
echo "sha256 $got""#
    ))
}

/// The stdin for [`script`]: the expected hash line, then the file.
pub(crate) fn stdin(bytes: &[u8], sha: &str) -> Vec<u8> {
    let mut input = Vec::with_capacity(sha.len() + 1 + bytes.len());
    input.extend_from_slice(sha.as_bytes());
    input.push(b'\n');
    input.extend_from_slice(bytes);
    input
}

/// The hash the node reported (its last `sha256 HEX` line), if any.
pub(crate) fn reported_sha(stdout: &str) -> Option<&str> {
    stdout
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("sha256 "))
}

fn split_path(path: &str) -> Result<(&str, &str), UploadPathError> {
    let bad = || UploadPathError::NotAFilePath(path.to_string());
    let (dir, name) = path.rsplit_once('/').ok_or_else(bad)?;
    if !path.starts_with('/') || name.is_empty() || name == "." || name == ".." {
        return Err(bad());
    }
    if path.contains('\0') || path.contains('\n') {
        return Err(bad());
    }
    Ok((dir, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes_and_spaces() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn paths_must_be_absolute_files() {
        for bad in ["", "rel/file", "/etc/", "/etc/..", "/a/b\nc", "file"] {
            assert_eq!(
                script(bad, 0o600).unwrap_err(),
                UploadPathError::NotAFilePath(bad.into())
            );
        }
        assert_eq!(
            script("/etc/x", 0o10000).unwrap_err(),
            UploadPathError::BadMode(0o10000)
        );
        let s = script("/etc/rancher/k3s/my token", 0o640).unwrap();
        assert!(s.contains("dst='/etc/rancher/k3s/my token'"));
        assert!(s.contains("tmp='/etc/rancher/k3s/.my token.homelab-upload.'$$"));
        assert!(s.contains("chmod 640 "));
        // A file at the root: the temp file sits beside it.
        assert!(script("/x", 0o600)
            .unwrap()
            .contains("tmp='/.x.homelab-upload.'$$"));
    }

    #[test]
    fn stdin_carries_the_hash_then_the_bytes() {
        let sha = sha256_hex(b"abc");
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(stdin(b"abc", &sha), format!("{sha}\nabc").into_bytes());
        assert_eq!(reported_sha("noise\nsha256 ab12\n"), Some("ab12"));
        assert_eq!(reported_sha("nothing"), None);
    }
}
