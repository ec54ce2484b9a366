//! The DHCP server at the edge: sockets on the provisioning interface, the
//! receive loop, and applying the handler's effects to the lease table and the
//! state database before the reply leaves (a lease is on disk before the
//! client is told it has it: the [`super::writer`] commits the leases of the
//! packets in flight together).
//!
//! Malformed packets are dropped with a debug log. Ordinary clients (the
//! thousands of a perfdhcp run, or a busy lab network) cost no database writes
//! except their lease, and no events.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket as StdUdpSocket};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use anyhow::{Context, Result};
use dhcproto::{Encodable, Encoder};
use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::handler::{handle, Binaries, Destination, Effect, Outcome, Port, RequestContext};
use super::options;
use super::pool::LeaseTable;
use super::writer::{Done, Job, Writer};
use super::PXE_PORT;
use crate::inventory::{Controller, MacAddr};
use crate::netboot::Shared;
use crate::state::{now_ms, Lease, LeaseWrite, State};

/// How often a still-unknown client's sighting is written again.
const DISCOVERED_REFRESH_MS: i64 = 60_000;
/// Bound on the memory of recent sightings.
const DISCOVERED_MEMORY: usize = 4096;
/// Socket receive buffer: about 8000 queued requests.
const RECEIVE_BUFFER: usize = 8 << 20;
/// How often expired offers and quarantines are dropped from memory.
const EXPIRE_EVERY_MS: i64 = 10_000;

/// How to open the DHCP sockets.
#[derive(Debug, Clone)]
pub struct BindOptions {
    /// Local address to bind (0.0.0.0 to hear broadcasts).
    pub address: Ipv4Addr,
    /// 67 in production; any port in tests (0 picks one).
    pub dhcp_port: u16,
    /// Also listen for PXE boot-server requests (4011 in production).
    pub pxe_port: Option<u16>,
    /// SO_BINDTODEVICE: only this interface's packets, and broadcasts go out of it.
    pub interface: Option<String>,
    /// Where a broadcast reply is sent (255.255.255.255:68 in production).
    pub broadcast: SocketAddrV4,
}

impl BindOptions {
    /// The production settings for a controller.
    pub fn for_controller(c: &Controller) -> BindOptions {
        BindOptions {
            address: Ipv4Addr::UNSPECIFIED,
            dhcp_port: 67,
            pxe_port: Some(PXE_PORT),
            interface: Some(c.interface.clone()),
            broadcast: SocketAddrV4::new(Ipv4Addr::BROADCAST, 68),
        }
    }
}

/// Bound sockets, ready for [`serve`].
#[derive(Debug)]
pub struct Listeners {
    pub dhcp: StdUdpSocket,
    pub pxe: Option<StdUdpSocket>,
    pub broadcast: SocketAddrV4,
}

impl Listeners {
    pub fn dhcp_addr(&self) -> io::Result<SocketAddr> {
        self.dhcp.local_addr()
    }
    pub fn pxe_addr(&self) -> Option<io::Result<SocketAddr>> {
        self.pxe.as_ref().map(StdUdpSocket::local_addr)
    }
}

/// Bind UDP 67 and 4011 on the controller's provisioning interface.
pub fn bind(controller: &Controller) -> Result<Listeners> {
    bind_with(&BindOptions::for_controller(controller))
}

/// Bind with explicit settings (tests use unprivileged ports on loopback).
pub fn bind_with(opts: &BindOptions) -> Result<Listeners> {
    let dhcp = open(opts.address, opts.dhcp_port, opts.interface.as_deref())?;
    let pxe = match opts.pxe_port {
        Some(port) => Some(open(opts.address, port, opts.interface.as_deref())?),
        None => None,
    };
    Ok(Listeners {
        dhcp,
        pxe,
        broadcast: opts.broadcast,
    })
}

fn open(address: Ipv4Addr, port: u16, interface: Option<&str>) -> Result<StdUdpSocket> {
    let what = format!("UDP {address}:{port}");
    let fd: OwnedFd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .with_context(|| format!("creating a socket for {what}"))?;
    socket::setsockopt(&fd, sockopt::Broadcast, &true).context("setting SO_BROADCAST")?;
    // SO_REUSEADDR only matters for UDP when several sockets share a port; it lets
    // us start beside a server that bound its own interface with it too.
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).context("setting SO_REUSEADDR")?;
    // A deep receive queue rides out bursts (a thousand clients powered on at
    // once, or a slow disk write) instead of dropping them: the default holds
    // only a couple of hundred packets. SO_RCVBUFFORCE passes rmem_max as root.
    if socket::setsockopt(&fd, sockopt::RcvBufForce, &RECEIVE_BUFFER).is_err() {
        let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &RECEIVE_BUFFER);
    }
    if let Some(ifname) = interface {
        socket::setsockopt(
            &fd,
            sockopt::BindToDevice,
            &std::ffi::OsString::from(ifname),
        )
        .map_err(|e| {
            let why = match e {
                Errno::ENODEV => {
                    format!("there is no interface named `{ifname}` (controller.interface)")
                }
                Errno::EPERM => "binding to an interface needs root (CAP_NET_RAW)".to_string(),
                e => e.to_string(),
            };
            anyhow::anyhow!("cannot listen for DHCP on {ifname}: {why}")
        })?;
    }
    let addr = SockaddrIn::from(SocketAddrV4::new(address, port));
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).map_err(|e| {
        let on = interface.map(|i| format!(" on {i}")).unwrap_or_default();
        match e {
            Errno::EADDRINUSE => anyhow::anyhow!(
                "cannot listen for DHCP on {what}{on}: port {port} is in use — is dnsmasq (or another \
                 DHCP server) running? Stop it, or set dhcp = \"off\" in [controller]"
            ),
            Errno::EACCES => anyhow::anyhow!(
                "cannot listen for DHCP on {what}{on}: port {port} needs root (or CAP_NET_BIND_SERVICE)"
            ),
            e => anyhow::anyhow!("cannot listen for DHCP on {what}{on}: {e}"),
        }
    })?;
    Ok(StdUdpSocket::from(fd))
}

/// Bind on the controller's interface and serve until `shutdown` turns true.
pub async fn run(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) -> Result<()> {
    let listeners = bind(&shared.inventory().controller)?;
    serve(shared, listeners, shutdown).await
}

/// Serve DHCP (and PXE on 4011 when bound) until `shutdown` turns true or its sender goes.
///
/// One loop reads packets and decides them in memory; their database work
/// goes to the lease writer, which commits everything that queued up meanwhile
/// in one transaction and hands the packets back; their replies leave only
/// then. So many packets are in flight while one fsync runs.
pub async fn serve(
    shared: Arc<Shared>,
    listeners: Listeners,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let dhcp = UdpSocket::from_std(listeners.dhcp).context("registering the DHCP socket")?;
    let pxe = match listeners.pxe {
        Some(s) => Some(UdpSocket::from_std(s).context("registering the PXE socket")?),
        None => None,
    };
    let inventory = shared.inventory();
    let mut server = Server::new(
        shared.state.clone(),
        Binaries::probe(&inventory.controller.ipxe_dir),
    )?;
    let (writer, mut stored) =
        Writer::start(shared.state.clone()).context("starting the lease writer")?;
    tracing::info!(
        interface = %inventory.controller.interface,
        mode = ?inventory.controller.dhcp,
        dhcp = %dhcp.local_addr()?,
        pxe = ?pxe.as_ref().and_then(|s| s.local_addr().ok()),
        leases = server.table.len().0,
        "DHCP listening"
    );
    drop(inventory);
    let send = |reply: Reply| {
        let dest = match reply.destination {
            Destination::Broadcast => listeners.broadcast,
            Destination::Unicast(a) => a,
        };
        let socket = match (reply.port, &pxe) {
            (Port::Pxe, Some(s)) => s,
            _ => &dhcp,
        };
        (socket, dest, reply.bytes)
    };
    let mut buf_dhcp = vec![0u8; 4096];
    let mut buf_pxe = vec![0u8; 4096];
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        let pxe_recv = async {
            match &pxe {
                Some(s) => s.recv_from(&mut buf_pxe).await,
                None => std::future::pending().await,
            }
        };
        let (port, received) = tokio::select! {
            // Replies whose leases are on disk go first: they are what clients wait for.
            biased;
            Some(done) = stored.recv() => {
                if let Some(reply) = server.finish(done) {
                    let (socket, dest, bytes) = send(reply);
                    if let Err(e) = socket.send_to(&bytes, dest).await {
                        tracing::warn!("DHCP reply to {dest}: {e}");
                    }
                }
                continue;
            }
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
            r = dhcp.recv_from(&mut buf_dhcp) => (Port::Dhcp, r.map(|(n, a)| (n, a, false))),
            r = pxe_recv => (Port::Pxe, r.map(|(n, a)| (n, a, true))),
        };
        let (len, source, from_pxe) = match received {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from earlier sends surface here (ECONNREFUSED): not fatal.
                tracing::debug!("DHCP receive: {e}");
                continue;
            }
        };
        let bytes = if from_pxe {
            &buf_pxe[..len]
        } else {
            &buf_dhcp[..len]
        };
        let SocketAddr::V4(source) = source else {
            continue;
        };
        let Some(reply) = server.process(&shared, &writer, port, source, bytes) else {
            continue;
        };
        let (socket, dest, bytes) = send(reply);
        if let Err(e) = socket.send_to(&bytes, dest).await {
            tracing::warn!("DHCP reply to {dest}: {e}");
        }
    }
    // What is queued still gets stored (its replies no longer go out).
    tokio::task::spawn_blocking(move || writer.finish())
        .await
        .context("waiting for the lease writer")?;
    Ok(())
}

/// A reply ready to leave.
#[derive(Debug)]
struct Reply {
    port: Port,
    destination: Destination,
    bytes: Vec<u8>,
}

/// A packet waiting for its leases to be stored.
#[derive(Debug)]
struct Pending {
    /// Lease-table changes that mirror the writes: applied once they are on disk.
    table: Vec<Effect>,
    reply: Option<Reply>,
}

/// The server's memory between packets.
struct Server {
    table: LeaseTable,
    binaries: Binaries,
    /// Last time each unknown client's sighting was written.
    discovered: HashMap<MacAddr, i64>,
    last_expire_ms: i64,
}

impl Server {
    fn new(state: State, binaries: Binaries) -> Result<Server> {
        let now = now_ms();
        let leases = state.leases().context("reading DHCP leases")?;
        let quarantined = state
            .quarantined_ips(now)
            .context("reading quarantined addresses")?;
        Ok(Server {
            table: LeaseTable::load(&leases, &quarantined, now),
            binaries,
            discovered: HashMap::new(),
            last_expire_ms: now,
        })
    }

    /// Decode, decide, encode. A reply that needs nothing stored comes back
    /// at once; one that does is queued to the writer and comes back from
    /// [`Server::finish`] once its leases are on disk.
    fn process(
        &mut self,
        shared: &Shared,
        writer: &Writer<Pending>,
        port: Port,
        source: SocketAddrV4,
        bytes: &[u8],
    ) -> Option<Reply> {
        let now = now_ms();
        if now - self.last_expire_ms > EXPIRE_EVERY_MS {
            self.table.expire(now);
            self.last_expire_ms = now;
        }
        let req = match options::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%source, "dropping DHCP packet: {e}");
                return None;
            }
        };
        let inventory = shared.inventory();
        let ctx = RequestContext {
            inventory: &inventory,
            mode: inventory.controller.dhcp,
            port,
            source,
            leases: &self.table,
            binaries: &self.binaries,
            now_ms: now,
        };
        let decision = handle(&req, &ctx);
        drop(inventory);
        let mac = options::client_mac(&req);
        let reply = match decision.outcome {
            Outcome::Ignore { reason } => {
                tracing::debug!(%source, mac = ?mac.map(|m| m.to_string()), ?port, "no reply: {reason}");
                None
            }
            Outcome::Reply {
                message,
                destination,
            } => {
                let mut out = Vec::with_capacity(dhcproto::v4::MIN_PACKET_SIZE);
                if let Err(e) = message.encode(&mut Encoder::new(&mut out)) {
                    tracing::warn!("encoding a DHCP reply: {e}");
                    return None;
                }
                // Some BOOTP-era clients drop replies shorter than a minimal BOOTP packet.
                if out.len() < dhcproto::v4::MIN_PACKET_SIZE {
                    out.resize(dhcproto::v4::MIN_PACKET_SIZE, 0);
                }
                tracing::debug!(%source, mac = ?mac.map(|m| m.to_string()), ?destination,
                    kind = ?message.opts().msg_type(), yiaddr = %message.yiaddr(), "reply");
                Some(Reply {
                    port,
                    destination,
                    bytes: out,
                })
            }
        };
        let work = Work::sort(decision.effects, |mac| self.seen_lately(mac, now));
        if work.writes.is_empty() && work.records.is_empty() {
            work.memory.iter().for_each(|e| self.table.apply(e));
            return reply;
        }
        let Some(slot) = writer.slot() else {
            // Nothing applied: the client asks again and is decided afresh.
            tracing::debug!(%source, "lease writer queue full: dropping the packet");
            return None;
        };
        work.memory.iter().for_each(|e| self.table.apply(e));
        for r in &work.records {
            if let Effect::Discovered { mac, .. } = r {
                self.saw(*mac, now);
            }
        }
        slot.send(Job {
            writes: work.writes,
            records: work.records,
            token: Pending {
                table: work.table,
                reply,
            },
        });
        None
    }

    /// A queued packet is through the writer: mirror its stored leases in the
    /// table and release its reply, or drop both when they could not be stored.
    fn finish(&mut self, done: Done<Pending>) -> Option<Reply> {
        if !done.stored {
            return None;
        }
        done.token.table.iter().for_each(|e| self.table.apply(e));
        done.token.reply
    }

    /// This unknown client's sighting was written less than a refresh ago.
    fn seen_lately(&self, mac: MacAddr, now: i64) -> bool {
        self.discovered
            .get(&mac)
            .is_some_and(|&last| now - last < DISCOVERED_REFRESH_MS)
    }

    fn saw(&mut self, mac: MacAddr, now: i64) {
        if self.discovered.len() >= DISCOVERED_MEMORY {
            self.discovered.clear();
        }
        self.discovered.insert(mac, now);
    }
}

/// A decision's effects, sorted by where they go.
#[derive(Debug, Default)]
struct Work {
    /// Offers held in memory only: applied at once.
    memory: Vec<Effect>,
    /// Lease-table changes: stored first, then mirrored in the table.
    writes: Vec<LeaseWrite>,
    table: Vec<Effect>,
    /// Records written with the packet.
    records: Vec<Effect>,
}

impl Work {
    fn sort(effects: Vec<Effect>, seen_lately: impl Fn(MacAddr) -> bool) -> Work {
        let mut w = Work::default();
        for effect in effects {
            match effect {
                Effect::Reserve { .. } | Effect::Unreserve { .. } => w.memory.push(effect),
                Effect::Bind {
                    mac,
                    ip,
                    expires_ms,
                    is_static,
                } => {
                    w.writes.push(LeaseWrite::Bind(Lease {
                        mac: mac.to_string(),
                        ip: ip.to_string(),
                        expires_ms,
                        is_static,
                    }));
                    w.table.push(effect);
                }
                Effect::Release { mac, .. } => {
                    w.writes.push(LeaseWrite::Release {
                        mac: mac.to_string(),
                    });
                    w.table.push(effect);
                }
                Effect::Quarantine { ip, until_ms, .. } => {
                    w.writes.push(LeaseWrite::Quarantine {
                        ip: ip.to_string(),
                        until_ms,
                    });
                    w.table.push(effect);
                }
                Effect::Discovered { mac, .. } if seen_lately(mac) => {}
                Effect::Discovered { .. } | Effect::Booting { .. } | Effect::Event { .. } => {
                    w.records.push(effect)
                }
            }
        }
        w
    }
}
