//! DHCP leases (authoritative mode), declined addresses, and the unknown
//! network-boot clients `homelab discover` lists.

use super::*;

/// A DHCP lease (authoritative mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub mac: String,
    pub ip: String,
    pub expires_ms: i64,
    /// Static leases come from the inventory and never expire.
    pub is_static: bool,
}

/// One change to the lease table, as the DHCP server queues it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseWrite {
    /// Store a lease; whatever else held its address goes first (an expired
    /// lease being reused), and the client's own older lease with it.
    Bind(Lease),
    /// The client gave its address back.
    Release { mac: String },
    /// Keep an address out of the pool until `until_ms` (a client DECLINEd it).
    Quarantine { ip: String, until_ms: i64 },
}

/// A PXE client that is not in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovered {
    pub mac: String,
    pub arch: Option<u16>,
    pub vendor_class: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub seen_count: i64,
}

pub(super) fn apply_lease_write(conn: &Connection, write: &LeaseWrite) -> rusqlite::Result<()> {
    match write {
        LeaseWrite::Bind(lease) => {
            conn.prepare_cached("DELETE FROM leases WHERE mac = ?1 OR ip = ?2")?
                .execute([&lease.mac, &lease.ip])?;
            conn.prepare_cached(
                "INSERT INTO leases (mac, ip, expires_ms, is_static) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                lease.mac,
                lease.ip,
                lease.expires_ms,
                lease.is_static
            ])?;
        }
        LeaseWrite::Release { mac } => {
            conn.prepare_cached("DELETE FROM leases WHERE mac = ?1")?
                .execute([mac])?;
        }
        LeaseWrite::Quarantine { ip, until_ms } => {
            conn.prepare_cached("DELETE FROM leases WHERE ip = ?1 AND is_static = 0")?
                .execute([ip])?;
            conn.prepare_cached(
                "INSERT INTO quarantine (ip, until_ms) VALUES (?1, ?2)
                 ON CONFLICT(ip) DO UPDATE SET until_ms = excluded.until_ms",
            )?
            .execute(params![ip, until_ms])?;
        }
    }
    Ok(())
}

pub(super) fn lease_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Lease> {
    Ok(Lease {
        mac: r.get(0)?,
        ip: r.get(1)?,
        expires_ms: r.get(2)?,
        is_static: r.get(3)?,
    })
}

impl State {
    pub fn lease_by_mac(&self, mac: &str) -> Result<Option<Lease>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT mac, ip, expires_ms, is_static FROM leases WHERE mac = ?1")?;
        Ok(stmt.query_row([mac], lease_from_row).optional()?)
    }

    pub fn lease_by_ip(&self, ip: &str) -> Result<Option<Lease>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT mac, ip, expires_ms, is_static FROM leases WHERE ip = ?1")?;
        Ok(stmt.query_row([ip], lease_from_row).optional()?)
    }

    pub fn leases(&self) -> Result<Vec<Lease>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT mac, ip, expires_ms, is_static FROM leases ORDER BY ip")?;
        let rows = stmt.query_map([], lease_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Write a lease. The database refuses two leases for one address (UNIQUE ip):
    /// any other holder of that address must have been removed first.
    pub fn put_lease(&self, lease: &Lease) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM leases WHERE mac = ?1", [&lease.mac])?;
        tx.execute(
            "INSERT INTO leases (mac, ip, expires_ms, is_static) VALUES (?1, ?2, ?3, ?4)",
            params![lease.mac, lease.ip, lease.expires_ms, lease.is_static],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Commit the lease writes of several packets in one transaction: one
    /// fsync for all of them. Each packet's writes stand or fall together (a
    /// savepoint each), so one refused write costs only its own packet.
    /// `Err` when the commit itself failed: then nothing of the batch is stored.
    pub fn commit_leases(&self, packets: &[&[LeaseWrite]]) -> Result<Vec<Result<()>>> {
        let mut conn = self.conn();
        let mut tx = conn.transaction()?;
        let mut outcomes = Vec::with_capacity(packets.len());
        for writes in packets {
            let sp = tx.savepoint()?;
            let applied = writes.iter().try_for_each(|w| apply_lease_write(&sp, w));
            outcomes.push(match applied {
                Ok(()) => sp.commit().map_err(Into::into),
                // Dropping the savepoint rolls this packet's writes back.
                Err(e) => Err(e.into()),
            });
        }
        tx.commit().context("committing leases")?;
        Ok(outcomes)
    }

    pub fn delete_lease(&self, mac: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM leases WHERE mac = ?1", [mac])?
            > 0)
    }

    /// Mark an address as unusable until `until_ms` (a client DECLINEd it).
    pub fn quarantine_ip(&self, ip: &str, until_ms: i64) -> Result<()> {
        let write = LeaseWrite::Quarantine {
            ip: ip.to_owned(),
            until_ms,
        };
        self.commit_leases(&[std::slice::from_ref(&write)])?
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Addresses quarantined after a DECLINE whose quarantine has not ended.
    pub fn quarantined_ips(&self, now_ms: i64) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT ip FROM quarantine WHERE until_ms > ?1")?;
        let rows = stmt.query_map([now_ms], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Record a sighting of an unknown PXE client.
    pub fn record_discovered(
        &self,
        mac: &str,
        arch: Option<u16>,
        vendor_class: &str,
    ) -> Result<bool> {
        let conn = self.conn();
        let now = now_ms();
        let changed = conn.execute(
            "UPDATE discovered SET last_seen_ms = ?2, seen_count = seen_count + 1,
               arch = COALESCE(?3, arch), vendor_class = CASE WHEN ?4 = '' THEN vendor_class ELSE ?4 END
             WHERE mac = ?1",
            params![mac, now, arch, vendor_class],
        )?;
        if changed > 0 {
            return Ok(false);
        }
        conn.execute(
            "INSERT INTO discovered (mac, arch, vendor_class, first_seen_ms, last_seen_ms, seen_count)
             VALUES (?1, ?2, ?3, ?4, ?4, 1)",
            params![mac, arch, vendor_class, now],
        )?;
        Ok(true)
    }

    pub fn discovered(&self) -> Result<Vec<Discovered>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT mac, arch, vendor_class, first_seen_ms, last_seen_ms, seen_count FROM discovered ORDER BY first_seen_ms",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Discovered {
                mac: r.get(0)?,
                arch: r.get::<_, Option<i64>>(1)?.map(|a| a as u16),
                vendor_class: r.get(2)?,
                first_seen_ms: r.get(3)?,
                last_seen_ms: r.get(4)?,
                seen_count: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn forget_discovered(&self, mac: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM discovered WHERE mac = ?1", [mac])?;
        Ok(())
    }
}
