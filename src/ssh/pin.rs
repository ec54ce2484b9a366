//! Pinned host keys: the one server key a node may present.
//!
//! A node's host key is learnt when homelab installs it (the installer
//! generates it and reports it home), so there is never a first-use prompt
//! and never an "accept any" mode: a key that differs from the pin is either
//! a node reinstalled behind homelab's back or someone in the middle.

use std::fmt;
use std::str::FromStr;

use russh::keys::{Algorithm, HashAlg, PublicKey};

/// The fingerprint OpenSSH prints (`SHA256:` + unpadded base64), so the text
/// in homelab's errors can be compared by eye with `ssh-keygen -l` on the node.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The host key a node must present; compared on key data only (comments and
/// the line's formatting do not matter).
#[derive(Clone, PartialEq, Eq)]
pub struct HostKeyPin {
    key: PublicKey,
}

/// Why a pin line was refused: each says what was wrong with the line, so a
/// typo in state or inventory is fixed without reading code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("empty host key: expected an OpenSSH public key line like `ssh-ed25519 AAAA...`")]
    Empty,
    #[error(
        "this is a private key, not a public key: give the `.pub` line (`ssh-ed25519 AAAA...`)"
    )]
    PrivateKey,
    #[error(
        "the line starts with a host name (`{host}`), as in known_hosts: drop it and keep `{algorithm} AAAA...`"
    )]
    KnownHostsLine { host: String, algorithm: String },
    #[error(
        "unknown key type `{0}`: expected ssh-ed25519 or ecdsa-sha2-nistp256/384/521 followed by base64 key data"
    )]
    UnknownAlgorithm(String),
    #[error("`{0}` has no key data: expected `{0} AAAA...`")]
    MissingKeyData(String),
    #[error("the key data is not valid base64 for a `{algorithm}` key: {detail}")]
    InvalidKeyData { algorithm: String, detail: String },
    #[error("the line says `{line}` but its key data is a `{data}` key")]
    AlgorithmMismatch { line: String, data: String },
}

/// Key types the client negotiates (russh here is built without RSA).
const ALGORITHMS: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
];

impl HostKeyPin {
    /// Parses `ALGORITHM BASE64 [COMMENT]`, the form of a `.pub` file and of
    /// what the installer reports, with an error that names the mistake.
    pub fn parse(line: &str) -> Result<HostKeyPin, PinError> {
        let line = line.trim();
        if line.is_empty() {
            return Err(PinError::Empty);
        }
        if line.starts_with("-----BEGIN") {
            return Err(PinError::PrivateKey);
        }
        let mut words = line.split_whitespace();
        let algorithm = words.next().unwrap_or_default();
        let data = words.next();
        if !ALGORITHMS.contains(&algorithm) {
            return Err(match data {
                Some(second) if ALGORITHMS.contains(&second) => PinError::KnownHostsLine {
                    host: algorithm.to_string(),
                    algorithm: second.to_string(),
                },
                _ => PinError::UnknownAlgorithm(algorithm.to_string()),
            });
        }
        let Some(data) = data else {
            return Err(PinError::MissingKeyData(algorithm.to_string()));
        };
        let key = PublicKey::from_openssh(&format!("{algorithm} {data}")).map_err(|e| {
            match PublicKey::from_bytes(&decode_base64(data).unwrap_or_default()) {
                Ok(k) => PinError::AlgorithmMismatch {
                    line: algorithm.to_string(),
                    data: k.algorithm().as_str().to_string(),
                },
                Err(_) => PinError::InvalidKeyData {
                    algorithm: algorithm.to_string(),
                    detail: e.to_string(),
                },
            }
        })?;
        Ok(HostKeyPin::from_key(&key))
    }

    /// Pins a key already in hand (e.g. read from the node's host key file in tests).
    pub fn from_key(key: &PublicKey) -> HostKeyPin {
        let mut key = key.clone();
        key.set_comment("");
        HostKeyPin { key }
    }

    /// The pinned key, for putting in a NoCloud seed or a known_hosts file.
    pub fn public_key(&self) -> &PublicKey {
        &self.key
    }

    /// The pinned key's algorithm: offered first, so a node that has several
    /// host keys presents the pinned one.
    pub fn algorithm(&self) -> Algorithm {
        self.key.algorithm()
    }

    /// `SHA256:...` of the pinned key, for messages.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.key)
    }

    /// Whether the server's key is the pinned one (key data only).
    pub fn matches(&self, presented: &PublicKey) -> bool {
        self.key.key_data() == presented.key_data()
    }

    /// The `ALGORITHM BASE64` line, to store the pin.
    pub fn to_openssh(&self) -> String {
        self.key
            .to_openssh()
            .unwrap_or_else(|_| self.fingerprint())
            .trim()
            .to_string()
    }
}

/// Standard base64 (with or without padding), only to tell a wrong type
/// word from garbage in an error message.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use russh::keys::ssh_encoding::base64::{Base64, Base64Unpadded, Encoding};
    Base64::decode_vec(s)
        .ok()
        .or_else(|| Base64Unpadded::decode_vec(s).ok())
}

impl FromStr for HostKeyPin {
    type Err = PinError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostKeyPin::parse(s)
    }
}

impl fmt::Display for HostKeyPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_openssh())
    }
}

impl fmt::Debug for HostKeyPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostKeyPin({} {})", self.algorithm(), self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with `ssh-keygen -t ed25519`; fingerprints from `ssh-keygen -l`.
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDTVdWOkvr0/sVJPM4I8Tl99RJMOaQ+NQx8QSpsULDIn node1";
    const ED25519_FP: &str = "SHA256:FovQrwDJhq2TGM9Rqfvk3QloZA5Q90Supg4sRjWnq2o";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBESRVHIDjAML3FeXW0d5Q1+zO3qwlRLv1RfYbRKY++E4tu3tpMHl3uRlavMHZ3aL5vaR8cEOf/7cY/mEb3MpyQM=";
    const ECDSA_FP: &str = "SHA256:MM4n9yyT0RiI73lQQ0s9Tmc4UnYSCOfb3NyYDkYCCOg";

    #[test]
    fn fingerprint_is_what_ssh_keygen_prints() {
        assert_eq!(
            HostKeyPin::parse(ED25519).unwrap().fingerprint(),
            ED25519_FP
        );
        assert_eq!(HostKeyPin::parse(ECDSA).unwrap().fingerprint(), ECDSA_FP);
    }

    #[test]
    fn comment_and_whitespace_do_not_matter() {
        let a = HostKeyPin::parse(ED25519).unwrap();
        let b: HostKeyPin = format!("  {}\n", ED25519.replace(" node1", " other@host"))
            .parse()
            .unwrap();
        assert_eq!(a, b);
        assert!(a.matches(b.public_key()));
        assert!(!a.matches(HostKeyPin::parse(ECDSA).unwrap().public_key()));
        assert_eq!(a.to_openssh(), ED25519.trim_end_matches(" node1"));
        assert_eq!(a.algorithm(), Algorithm::Ed25519);
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        let data = ED25519.split(' ').nth(1).unwrap();
        let cases: Vec<(String, PinError)> = vec![
            ("".into(), PinError::Empty),
            ("  \n".into(), PinError::Empty),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----".into(),
                PinError::PrivateKey,
            ),
            (
                format!("node1 ssh-ed25519 {data}"),
                PinError::KnownHostsLine {
                    host: "node1".into(),
                    algorithm: "ssh-ed25519".into(),
                },
            ),
            (
                format!("ssh-rsa {data}"),
                PinError::UnknownAlgorithm("ssh-rsa".into()),
            ),
            (
                "ssh-ed25519".into(),
                PinError::MissingKeyData("ssh-ed25519".into()),
            ),
            (
                format!("ecdsa-sha2-nistp256 {data}"),
                PinError::AlgorithmMismatch {
                    line: "ecdsa-sha2-nistp256".into(),
                    data: "ssh-ed25519".into(),
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(HostKeyPin::parse(&line).unwrap_err(), want, "line {line:?}");
        }
        let bad = HostKeyPin::parse("ssh-ed25519 not!base64").unwrap_err();
        assert!(matches!(bad, PinError::InvalidKeyData { .. }), "{bad:?}");
        let truncated = HostKeyPin::parse(&format!("ssh-ed25519 {}", &data[..20])).unwrap_err();
        assert!(
            matches!(truncated, PinError::InvalidKeyData { .. }),
            "{truncated:?}"
        );
    }

    #[test]
    fn errors_read_as_advice() {
        let e = HostKeyPin::parse("node1 ssh-ed25519 AAAA").unwrap_err();
        assert_eq!(
            e.to_string(),
            "the line starts with a host name (`node1`), as in known_hosts: drop it and keep `ssh-ed25519 AAAA...`"
        );
    }
}
