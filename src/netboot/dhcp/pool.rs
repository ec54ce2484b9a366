//! Address bookkeeping for authoritative mode: who holds which address, the
//! allocator that picks a free one, and the in-memory table the server keeps
//! in step with the state database.
//!
//! The handler only ever reads through [`LeaseView`]; changes come back from it
//! as effects that the server applies here and (for bound leases) in the
//! database, so an address is taken in memory before the next packet is read.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use super::handler::Effect;
use crate::inventory::{AddrRange, MacAddr};
use crate::state::Lease;

/// How long an OFFERed address stays reserved for the client it was offered to.
pub const OFFER_HOLD_MS: i64 = 60_000;
/// How long a DECLINEd address stays out of the pool (Kea's default is a day;
/// a homelab pool is small, an hour is enough to stop handing out a conflict).
pub const DECLINE_PROBATION_MS: i64 = 3_600_000;

/// What holding an address means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    /// OFFERed and not yet REQUESTed: memory only.
    Offered,
    /// Bound from the pool.
    Dynamic,
    /// Bound to an inventory node's fixed address.
    Static,
}

/// One address held by one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseInfo {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub expires_ms: i64,
    pub kind: LeaseKind,
}

impl LeaseInfo {
    pub fn live(&self, now_ms: i64) -> bool {
        self.kind == LeaseKind::Static || self.expires_ms > now_ms
    }
}

/// What the handler may ask about leases. Read-only by design.
pub trait LeaseView {
    /// The lease bound to `mac` (live or expired).
    fn bound(&self, mac: MacAddr) -> Option<LeaseInfo>;
    /// The address offered to `mac`, while the offer holds.
    fn offered(&self, mac: MacAddr, now_ms: i64) -> Option<LeaseInfo>;
    /// The client holding `ip`: a bound lease (live or expired) or an offer.
    fn holder(&self, ip: Ipv4Addr) -> Option<LeaseInfo>;
    fn quarantined(&self, ip: Ipv4Addr, now_ms: i64) -> bool;
    /// Where the next search for a free address should start.
    fn search_hint(&self) -> Option<Ipv4Addr>;
}

/// May `mac` be given `ip`? Nobody else holds it live, and it is not quarantined.
/// With `take_expired`, an expired lease of another client does not count.
pub fn free_for(
    view: &dyn LeaseView,
    ip: Ipv4Addr,
    mac: MacAddr,
    now_ms: i64,
    take_expired: bool,
) -> bool {
    if view.quarantined(ip, now_ms) {
        return false;
    }
    match view.holder(ip) {
        None => true,
        Some(h) if h.mac == mac => true,
        Some(h) => match h.kind {
            LeaseKind::Static => false,
            LeaseKind::Offered => h.expires_ms <= now_ms,
            LeaseKind::Dynamic => take_expired && h.expires_ms <= now_ms,
        },
    }
}

/// Pick a free pool address for `mac`, skipping `excluded` ones (node
/// addresses, the controller, the gateway, network and broadcast addresses).
/// Never-used and released addresses come first; an expired lease of another
/// client is only taken when nothing else is left, so returning clients tend
/// to find their old address still free.
pub fn allocate(
    view: &dyn LeaseView,
    pool: AddrRange,
    mac: MacAddr,
    now_ms: i64,
    excluded: &dyn Fn(Ipv4Addr) -> bool,
) -> Option<Ipv4Addr> {
    let first = u32::from(pool.first);
    let last = u32::from(pool.last);
    let start = view
        .search_hint()
        .map(u32::from)
        .filter(|h| (first..=last).contains(h))
        .unwrap_or(first);
    let order = (start..=last).chain(first..start).map(Ipv4Addr::from);
    for take_expired in [false, true] {
        let found = order
            .clone()
            .find(|&ip| !excluded(ip) && free_for(view, ip, mac, now_ms, take_expired));
        if found.is_some() {
            return found;
        }
    }
    None
}

#[derive(Debug, Clone, Copy)]
struct Bound {
    ip: Ipv4Addr,
    expires_ms: i64,
    is_static: bool,
}

/// The server's lease table: the database's leases plus live offers and quarantine.
#[derive(Debug, Default)]
pub struct LeaseTable {
    bound: HashMap<MacAddr, Bound>,
    offers: HashMap<MacAddr, (Ipv4Addr, i64)>,
    /// The latest client to claim each address (bound or offered).
    by_ip: HashMap<Ipv4Addr, MacAddr>,
    quarantine: HashMap<Ipv4Addr, i64>,
    hint: Option<Ipv4Addr>,
}

impl LeaseTable {
    pub fn new() -> LeaseTable {
        LeaseTable::default()
    }

    /// Build the table from the database's leases and quarantined addresses.
    /// Rows that do not parse are skipped (they cannot have come from us).
    pub fn load(leases: &[Lease], quarantined: &[String], now_ms: i64) -> LeaseTable {
        let mut t = LeaseTable::new();
        for l in leases {
            if let (Ok(mac), Ok(ip)) = (l.mac.parse::<MacAddr>(), l.ip.parse::<Ipv4Addr>()) {
                t.bind(mac, ip, l.expires_ms, l.is_static);
            }
        }
        for q in quarantined {
            if let Ok(ip) = q.parse() {
                // The database keeps the end of the quarantine but does not return it:
                // a full probation from now is the safe side.
                t.quarantine(ip, now_ms + DECLINE_PROBATION_MS);
            }
        }
        t
    }

    fn unindex(&mut self, ip: Ipv4Addr, mac: MacAddr) {
        if self.by_ip.get(&ip) == Some(&mac) {
            self.by_ip.remove(&ip);
        }
    }

    /// Forget whatever another client holds at `ip`.
    fn evict(&mut self, ip: Ipv4Addr, mac: MacAddr) {
        if let Some(&other) = self.by_ip.get(&ip) {
            if other != mac {
                if self.bound.get(&other).is_some_and(|b| b.ip == ip) {
                    self.bound.remove(&other);
                }
                if self.offers.get(&other).is_some_and(|o| o.0 == ip) {
                    self.offers.remove(&other);
                }
                self.by_ip.remove(&ip);
            }
        }
    }

    /// Hold `ip` for `mac` until `until_ms` (an OFFER).
    pub fn reserve(&mut self, mac: MacAddr, ip: Ipv4Addr, until_ms: i64) {
        self.evict(ip, mac);
        if let Some((old, _)) = self.offers.insert(mac, (ip, until_ms)) {
            if old != ip && self.bound.get(&mac).is_none_or(|b| b.ip != old) {
                self.unindex(old, mac);
            }
        }
        self.by_ip.insert(ip, mac);
        self.hint = Some(Ipv4Addr::from(u32::from(ip).wrapping_add(1)));
    }

    /// Drop the offer to `mac` (it chose another server).
    pub fn unreserve(&mut self, mac: MacAddr) {
        if let Some((ip, _)) = self.offers.remove(&mac) {
            if self.bound.get(&mac).is_none_or(|b| b.ip != ip) {
                self.unindex(ip, mac);
            }
        }
    }

    /// Bind `ip` to `mac`, replacing the client's previous lease and whatever
    /// another client held at that address.
    pub fn bind(&mut self, mac: MacAddr, ip: Ipv4Addr, expires_ms: i64, is_static: bool) {
        self.evict(ip, mac);
        if let Some((offered, _)) = self.offers.remove(&mac) {
            if offered != ip {
                self.unindex(offered, mac);
            }
        }
        if let Some(old) = self.bound.insert(
            mac,
            Bound {
                ip,
                expires_ms,
                is_static,
            },
        ) {
            if old.ip != ip {
                self.unindex(old.ip, mac);
            }
        }
        self.by_ip.insert(ip, mac);
    }

    /// Free the lease of `mac`.
    pub fn release(&mut self, mac: MacAddr) {
        if let Some(b) = self.bound.remove(&mac) {
            self.unindex(b.ip, mac);
        }
        self.unreserve(mac);
    }

    /// Take `ip` out of use until `until_ms`; a dynamic lease or offer on it is dropped.
    pub fn quarantine(&mut self, ip: Ipv4Addr, until_ms: i64) {
        if let Some(&mac) = self.by_ip.get(&ip) {
            let is_static = self
                .bound
                .get(&mac)
                .is_some_and(|b| b.ip == ip && b.is_static);
            if !is_static {
                if self.bound.get(&mac).is_some_and(|b| b.ip == ip) {
                    self.bound.remove(&mac);
                }
                if self.offers.get(&mac).is_some_and(|o| o.0 == ip) {
                    self.offers.remove(&mac);
                }
                self.by_ip.remove(&ip);
            }
        }
        self.quarantine.insert(ip, until_ms);
    }

    /// Drop expired offers and quarantines (bound leases stay, as in the database).
    pub fn expire(&mut self, now_ms: i64) {
        let stale: Vec<(MacAddr, Ipv4Addr)> = self
            .offers
            .iter()
            .filter(|(_, &(_, until))| until <= now_ms)
            .map(|(&mac, &(ip, _))| (mac, ip))
            .collect();
        for (mac, ip) in stale {
            self.offers.remove(&mac);
            if self.bound.get(&mac).is_none_or(|b| b.ip != ip) {
                self.unindex(ip, mac);
            }
        }
        self.quarantine.retain(|_, until| *until > now_ms);
    }

    /// Apply the lease part of a handler effect to memory (the server stores
    /// bound leases in the database first). Other effects are ignored.
    pub fn apply(&mut self, effect: &Effect) {
        match *effect {
            Effect::Reserve { mac, ip, until_ms } => self.reserve(mac, ip, until_ms),
            Effect::Unreserve { mac } => self.unreserve(mac),
            Effect::Bind {
                mac,
                ip,
                expires_ms,
                is_static,
            } => self.bind(mac, ip, expires_ms, is_static),
            Effect::Release { mac, .. } => self.release(mac),
            Effect::Quarantine { ip, until_ms, .. } => self.quarantine(ip, until_ms),
            Effect::Discovered { .. } | Effect::Booting { .. } | Effect::Event { .. } => {}
        }
    }

    /// Number of bound leases and live offers (for logs and tests).
    pub fn len(&self) -> (usize, usize) {
        (self.bound.len(), self.offers.len())
    }

    /// Every client holding each address, for invariant checks: each address
    /// appears once per holder (bound or offered).
    pub fn holders(&self) -> Vec<(Ipv4Addr, MacAddr, LeaseKind)> {
        let mut v: Vec<_> = self
            .bound
            .iter()
            .map(|(&m, b)| {
                (
                    b.ip,
                    m,
                    if b.is_static {
                        LeaseKind::Static
                    } else {
                        LeaseKind::Dynamic
                    },
                )
            })
            .chain(
                self.offers
                    .iter()
                    .map(|(&m, &(ip, _))| (ip, m, LeaseKind::Offered)),
            )
            .collect();
        v.sort_by_key(|&(ip, m, _)| (ip, m));
        v
    }
}

impl LeaseView for LeaseTable {
    fn bound(&self, mac: MacAddr) -> Option<LeaseInfo> {
        self.bound.get(&mac).map(|b| LeaseInfo {
            mac,
            ip: b.ip,
            expires_ms: b.expires_ms,
            kind: if b.is_static {
                LeaseKind::Static
            } else {
                LeaseKind::Dynamic
            },
        })
    }

    fn offered(&self, mac: MacAddr, now_ms: i64) -> Option<LeaseInfo> {
        self.offers
            .get(&mac)
            .filter(|(_, until)| *until > now_ms)
            .map(|&(ip, until)| LeaseInfo {
                mac,
                ip,
                expires_ms: until,
                kind: LeaseKind::Offered,
            })
    }

    fn holder(&self, ip: Ipv4Addr) -> Option<LeaseInfo> {
        let mac = *self.by_ip.get(&ip)?;
        if let Some(&(oip, until)) = self.offers.get(&mac) {
            if oip == ip {
                // A live bound lease on the same address outranks the offer.
                if let Some(b) = self.bound(mac).filter(|b| b.ip == ip) {
                    return Some(b);
                }
                return Some(LeaseInfo {
                    mac,
                    ip,
                    expires_ms: until,
                    kind: LeaseKind::Offered,
                });
            }
        }
        self.bound(mac).filter(|b| b.ip == ip)
    }

    fn quarantined(&self, ip: Ipv4Addr, now_ms: i64) -> bool {
        self.quarantine
            .get(&ip)
            .is_some_and(|&until| until > now_ms)
    }

    fn search_hint(&self) -> Option<Ipv4Addr> {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn pool() -> AddrRange {
        "10.9.0.10-10.9.0.12".parse().unwrap()
    }

    #[test]
    fn allocation_skips_held_quarantined_and_excluded_addresses() {
        let mut t = LeaseTable::new();
        let none = |_: Ipv4Addr| false;
        assert_eq!(
            allocate(&t, pool(), mac(1), 0, &none),
            Some(ip("10.9.0.10"))
        );
        t.reserve(mac(1), ip("10.9.0.10"), 100);
        assert_eq!(
            allocate(&t, pool(), mac(2), 0, &none),
            Some(ip("10.9.0.11"))
        );
        t.quarantine(ip("10.9.0.11"), 1000);
        let skip12 = |a: Ipv4Addr| a == ip("10.9.0.12");
        assert_eq!(allocate(&t, pool(), mac(2), 0, &skip12), None);
        // The offer to mac(1) ends at 100.
        assert_eq!(
            allocate(&t, pool(), mac(2), 100, &skip12),
            Some(ip("10.9.0.10"))
        );
        assert_eq!(
            allocate(&t, pool(), mac(2), 1000, &skip12),
            Some(ip("10.9.0.11"))
        );
    }

    #[test]
    fn expired_leases_are_taken_last() {
        let mut t = LeaseTable::new();
        t.bind(mac(1), ip("10.9.0.10"), 50, false);
        let none = |_: Ipv4Addr| false;
        assert_eq!(
            allocate(&t, pool(), mac(2), 100, &none),
            Some(ip("10.9.0.11"))
        );
        t.bind(mac(3), ip("10.9.0.11"), 500, false);
        t.bind(mac(4), ip("10.9.0.12"), 500, false);
        assert_eq!(
            allocate(&t, pool(), mac(2), 100, &none),
            Some(ip("10.9.0.10"))
        );
        t.bind(mac(2), ip("10.9.0.10"), 500, false);
        assert_eq!(t.bound(mac(1)), None, "the expired holder was evicted");
        assert_eq!(t.holder(ip("10.9.0.10")).unwrap().mac, mac(2));
    }

    #[test]
    fn rebinding_elsewhere_frees_the_old_address() {
        let mut t = LeaseTable::new();
        t.bind(mac(1), ip("10.9.0.10"), 500, false);
        t.reserve(mac(1), ip("10.9.0.11"), 100);
        t.bind(mac(1), ip("10.9.0.11"), 500, false);
        assert_eq!(t.holder(ip("10.9.0.10")), None);
        t.release(mac(1));
        assert_eq!(t.holder(ip("10.9.0.11")), None);
        assert_eq!(t.len(), (0, 0));
    }
}
