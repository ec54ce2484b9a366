//! The DHCP server at the edge: sockets on the provisioning interface, the
//! receive loop, and applying the handler's effects to the lease table and the
//! state database before the reply leaves (a lease is on disk before the
//! client is told it has it).
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
use super::PXE_PORT;
use crate::inventory::{Controller, MacAddr};
use crate::lifecycle::NodeEvent;
use crate::netboot::Shared;
use crate::state::{now_ms, Lease, State};

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
    tracing::info!(
        interface = %inventory.controller.interface,
        mode = ?inventory.controller.dhcp,
        dhcp = %dhcp.local_addr()?,
        pxe = ?pxe.as_ref().and_then(|s| s.local_addr().ok()),
        leases = server.table.len().0,
        "DHCP listening"
    );
    drop(inventory);
    let mut buf_dhcp = vec![0u8; 4096];
    let mut buf_pxe = vec![0u8; 4096];
    let mut out = Vec::with_capacity(1024);
    loop {
        if *shutdown.borrow_and_update() {
            return Ok(());
        }
        let pxe_recv = async {
            match &pxe {
                Some(s) => s.recv_from(&mut buf_pxe).await,
                None => std::future::pending().await,
            }
        };
        let (port, received) = tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    return Ok(());
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
        let Some((dest, reply_len)) = server.process(&shared, port, source, bytes, &mut out) else {
            continue;
        };
        let dest = match dest {
            Destination::Broadcast => listeners.broadcast,
            Destination::Unicast(a) => a,
        };
        let socket = match (port, &pxe) {
            (Port::Pxe, Some(s)) => s,
            _ => &dhcp,
        };
        if let Err(e) = socket.send_to(&out[..reply_len], dest).await {
            tracing::warn!("DHCP reply to {dest}: {e}");
        }
    }
}

/// The server's memory between packets.
struct Server {
    state: State,
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
            state,
            table: LeaseTable::load(&leases, &quarantined, now),
            binaries,
            discovered: HashMap::new(),
            last_expire_ms: now,
        })
    }

    /// Decode, decide, apply effects, encode. Returns where to send `out[..len]`.
    fn process(
        &mut self,
        shared: &Shared,
        port: Port,
        source: SocketAddrV4,
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<(Destination, usize)> {
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
        let mac = options::client_mac(&req);
        let applied = self.apply(decision.effects, now);
        match decision.outcome {
            Outcome::Ignore { reason } => {
                tracing::debug!(%source, mac = ?mac.map(|m| m.to_string()), ?port, "no reply: {reason}");
                None
            }
            Outcome::Reply { .. } if !applied => None,
            Outcome::Reply {
                message,
                destination,
            } => {
                out.clear();
                if let Err(e) = message.encode(&mut Encoder::new(out)) {
                    tracing::warn!("encoding a DHCP reply: {e}");
                    return None;
                }
                // Some BOOTP-era clients drop replies shorter than a minimal BOOTP packet.
                if out.len() < dhcproto::v4::MIN_PACKET_SIZE {
                    out.resize(dhcproto::v4::MIN_PACKET_SIZE, 0);
                }
                tracing::debug!(%source, mac = ?mac.map(|m| m.to_string()), ?destination,
                    kind = ?message.opts().msg_type(), yiaddr = %message.yiaddr(), "reply");
                Some((destination, out.len()))
            }
        }
    }

    /// Apply effects in order. Returns false when a lease could not be stored
    /// (then no reply goes out: the client retries).
    fn apply(&mut self, effects: Vec<Effect>, now: i64) -> bool {
        let mut ok = true;
        for effect in effects {
            match effect {
                Effect::Reserve { .. } | Effect::Unreserve { .. } => self.table.apply(&effect),
                Effect::Bind {
                    mac,
                    ip,
                    expires_ms,
                    is_static,
                } => match self.persist_lease(mac, ip, expires_ms, is_static) {
                    Ok(()) => self.table.apply(&effect),
                    Err(e) => {
                        tracing::error!("storing the lease of {ip} for {mac}: {e:#}");
                        ok = false;
                    }
                },
                Effect::Release { mac, ip } => {
                    if let Err(e) = self.state.delete_lease(&mac.to_string()) {
                        tracing::error!("releasing {ip} of {mac}: {e:#}");
                    }
                    self.table.apply(&effect);
                }
                Effect::Quarantine { mac, ip, until_ms } => {
                    if let Err(e) = self.state.quarantine_ip(&ip.to_string(), until_ms) {
                        tracing::error!("quarantining {ip} declined by {mac}: {e:#}");
                    }
                    self.table.apply(&effect);
                }
                Effect::Discovered {
                    mac,
                    arch,
                    vendor_class,
                } => self.discovered(mac, arch, &vendor_class, now),
                Effect::Booting { node } => self.booting(&node),
                Effect::Event {
                    node,
                    kind,
                    message,
                    data,
                } => {
                    if let Err(e) = self
                        .state
                        .append_event(node.as_deref(), kind, &message, data)
                    {
                        tracing::warn!("recording event {kind}: {e:#}");
                    }
                }
            }
        }
        ok
    }

    fn persist_lease(
        &self,
        mac: MacAddr,
        ip: Ipv4Addr,
        expires_ms: i64,
        is_static: bool,
    ) -> Result<()> {
        use super::pool::LeaseView;
        let lease = Lease {
            mac: mac.to_string(),
            ip: ip.to_string(),
            expires_ms,
            is_static,
        };
        // The table mirrors the database: if another client holds the address
        // there (an expired lease being reused), its row goes first.
        if let Some(other) = self.table.holder(ip).filter(|h| h.mac != mac) {
            self.state.delete_lease(&other.mac.to_string())?;
        }
        match self.state.put_lease(&lease) {
            Ok(()) => Ok(()),
            Err(first) => {
                // Out of step with the database: ask it who holds the address.
                match self.state.lease_by_ip(&lease.ip)? {
                    Some(other) if other.mac != lease.mac => {
                        self.state.delete_lease(&other.mac)?;
                        self.state.put_lease(&lease)
                    }
                    _ => Err(first),
                }
            }
        }
    }

    /// Record an unknown network-boot client; an event only the first time ever.
    fn discovered(&mut self, mac: MacAddr, arch: Option<u16>, vendor_class: &str, now: i64) {
        if self
            .discovered
            .get(&mac)
            .is_some_and(|&last| now - last < DISCOVERED_REFRESH_MS)
        {
            return;
        }
        if self.discovered.len() >= DISCOVERED_MEMORY {
            self.discovered.clear();
        }
        self.discovered.insert(mac, now);
        match self
            .state
            .record_discovered(&mac.to_string(), arch, vendor_class)
        {
            Ok(true) => {
                let arch_label = arch
                    .map(|a| crate::netboot::boot::ClientArch::from_code(a).label())
                    .unwrap_or_else(|| "unknown architecture".into());
                let message = format!(
                    "unknown machine {mac} ({arch_label}) tried to network-boot; \
                     `homelab discover` shows a [nodes] stanza for it"
                );
                let data = serde_json::json!({ "mac": mac.to_string(), "arch": arch, "vendor_class": vendor_class });
                if let Err(e) = self
                    .state
                    .append_event(None, "dhcp.unknown-client", &message, data)
                {
                    tracing::warn!("recording discovered client {mac}: {e:#}");
                }
                tracing::info!("{message}");
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("recording discovered client {mac}: {e:#}"),
        }
    }

    /// A known node got its boot program: pending -> booting (the
    /// lifecycle leaves a node at any other stage where it is).
    fn booting(&self, name: &str) {
        if let Err(e) = self.state.transition(
            name,
            NodeEvent::NetbootStarted,
            "network-booting: DHCP gave it a boot program",
        ) {
            tracing::warn!("moving {name} to booting: {e:#}");
        }
    }
}
