//! Verified, cached files (OS images, kernels, k3s releases) and the
//! digests pinned from published checksum lists.

use super::*;

/// A verified, cached file (OS image, kernel, k3s release...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub name: String,
    pub sha256: String,
    pub path: String,
    pub size: u64,
    pub source: String,
    pub fetched_ms: i64,
}

/// A digest looked up in a published checksum list and pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumPin {
    /// The list's https URL or absolute path, as the inventory names it.
    pub list: String,
    /// The file name looked up in it.
    pub file: String,
    pub algorithm: crate::inventory::Algorithm,
    pub digest: String,
    pub pinned_ms: i64,
}

impl State {
    pub fn put_artifact(&self, a: &Artifact) -> Result<()> {
        self.conn().execute(
            "INSERT INTO artifacts (name, sha256, path, size, source, fetched_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(name) DO UPDATE SET sha256=excluded.sha256, path=excluded.path, size=excluded.size,
               source=excluded.source, fetched_ms=excluded.fetched_ms",
            params![a.name, a.sha256, a.path, a.size as i64, a.source, a.fetched_ms],
        )?;
        Ok(())
    }

    /// Pin `pin` unless (list, file) is pinned already; returns the pin in force
    /// (the first one wins when two processes look the list up at once).
    pub fn pin_checksum(&self, pin: &ChecksumPin) -> Result<ChecksumPin> {
        self.conn().execute(
            "INSERT INTO checksum_pins (list, file, algorithm, digest, pinned_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(list, file) DO NOTHING",
            params![pin.list, pin.file, pin.algorithm.name(), pin.digest, pin.pinned_ms],
        )?;
        self.checksum_pin(&pin.list, &pin.file)?
            .context("the checksum pin just written is not there")
    }

    pub fn checksum_pin(&self, list: &str, file: &str) -> Result<Option<ChecksumPin>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT list, file, algorithm, digest, pinned_ms FROM checksum_pins WHERE list = ?1 AND file = ?2",
        )?;
        let row = stmt
            .query_row([list, file], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .optional()?;
        row.map(|(list, file, algorithm, digest, pinned_ms)| {
            Ok(ChecksumPin {
                list,
                file,
                algorithm: algorithm.parse().map_err(anyhow::Error::msg)?,
                digest,
                pinned_ms,
            })
        })
        .transpose()
    }

    /// Drop the pin of (list, file); true if there was one.
    pub fn unpin_checksum(&self, list: &str, file: &str) -> Result<bool> {
        Ok(self.conn().execute(
            "DELETE FROM checksum_pins WHERE list = ?1 AND file = ?2",
            [list, file],
        )? > 0)
    }

    /// Remember that the bytes with this sha512 have this sha256.
    pub fn put_verified_sha512(&self, sha512: &str, sha256: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO verified_sha512 (sha512, sha256, verified_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(sha512) DO UPDATE SET sha256 = excluded.sha256, verified_ms = excluded.verified_ms",
            params![sha512, sha256, now_ms()],
        )?;
        Ok(())
    }

    /// The sha256 of the file once verified against this sha512.
    pub fn verified_sha512(&self, sha512: &str) -> Result<Option<String>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT sha256 FROM verified_sha512 WHERE sha512 = ?1")?;
        Ok(stmt.query_row([sha512], |r| r.get(0)).optional()?)
    }

    pub fn artifact(&self, name: &str) -> Result<Option<Artifact>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, sha256, path, size, source, fetched_ms FROM artifacts WHERE name = ?1",
        )?;
        Ok(stmt
            .query_row([name], |r| {
                Ok(Artifact {
                    name: r.get(0)?,
                    sha256: r.get(1)?,
                    path: r.get(2)?,
                    size: r.get::<_, i64>(3)? as u64,
                    source: r.get(4)?,
                    fetched_ms: r.get(5)?,
                })
            })
            .optional()?)
    }
}
