//! The pure request -> reply logic.
//!
//! [`handle`] looks at one decoded request and a [`RequestContext`] (inventory,
//! mode, the port it came in on, a read-only lease view, the time) and returns
//! a [`Decision`]: a reply and where to send it, or a reason to stay silent,
//! plus the side effects (lease changes, discovered clients, events) as data.
//! It does no I/O, so every scenario is a plain unit test and a fuzz target;
//! the server applies the effects, then sends.
//!
//! Internally it is a short pipeline of steps over one [`Exchange`]; each step
//! answers, stays silent, or lets the next one look (the shape of
//! bluecatengineering/dora's plugins, kept to plain functions).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode};
use serde_json::json;

use super::options::{self, BootClass, BootInfo, ClientInfo};
use super::pool::{self, LeaseKind, LeaseView, DECLINE_PROBATION_MS, OFFER_HOLD_MS};

/// A lease younger than 1/CACHE_FRACTION of the lease time is not rewritten.
const CACHE_FRACTION: i64 = 4;
use crate::inventory::{DhcpMode, Inventory, MacAddr, Node};
use crate::netboot::boot::ClientArch;

/// The port a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// 67: DHCP (and proxyDHCP offers).
    Dhcp,
    /// 4011: PXE boot-server requests, answered unicast.
    Pxe,
}

/// iPXE binaries present in the configured directory, probed once at startup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Binaries(BTreeSet<String>);

impl Binaries {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Binaries {
        Binaries(names.into_iter().map(Into::into).collect())
    }

    /// Every binary any architecture can be given (for tests and fuzzing).
    pub fn all() -> Binaries {
        Binaries::new(Self::KNOWN)
    }

    const KNOWN: [&'static str; 3] = ["undionly.kpxe", "ipxe.efi", "ipxe-arm64.efi"];

    /// Which of the binaries we hand out exist in `dir`.
    pub fn probe(dir: &Path) -> Binaries {
        Binaries::new(Self::KNOWN.into_iter().filter(|n| dir.join(n).is_file()))
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// Everything the handler may look at besides the request.
pub struct RequestContext<'a> {
    pub inventory: &'a Inventory,
    pub mode: DhcpMode,
    pub port: Port,
    /// Where the request came from (port 4011 replies go back there).
    pub source: SocketAddrV4,
    pub leases: &'a dyn LeaseView,
    pub binaries: &'a Binaries,
    pub now_ms: i64,
}

/// Where a reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255:68 on the provisioning interface.
    Broadcast,
    Unicast(SocketAddrV4),
}

/// A change the server applies (to its lease table and the state database)
/// before sending the reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Hold `ip` for `mac` while the offer stands (memory only).
    Reserve {
        mac: MacAddr,
        ip: Ipv4Addr,
        until_ms: i64,
    },
    /// The client took another server's offer: drop ours.
    Unreserve { mac: MacAddr },
    /// Persist a lease; whatever else held `ip` is dropped first.
    Bind {
        mac: MacAddr,
        ip: Ipv4Addr,
        expires_ms: i64,
        is_static: bool,
    },
    /// The client gave its address back.
    Release { mac: MacAddr, ip: Ipv4Addr },
    /// The client found `ip` in use (DECLINE): keep it out of the pool.
    Quarantine {
        mac: MacAddr,
        ip: Ipv4Addr,
        until_ms: i64,
    },
    /// A network-boot client that is not in the inventory.
    Discovered {
        mac: MacAddr,
        arch: Option<u16>,
        vendor_class: String,
    },
    /// A known node was given boot information: Pending -> Booting.
    Booting { node: String },
    /// An audit-trail event.
    Event {
        node: Option<String>,
        kind: &'static str,
        message: String,
        data: serde_json::Value,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Reply {
        message: Message,
        destination: Destination,
    },
    /// No reply; the reason goes to the debug log.
    Ignore { reason: Cow<'static, str> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    pub effects: Vec<Effect>,
}

impl Decision {
    pub fn reply(&self) -> Option<(&Message, Destination)> {
        match &self.outcome {
            Outcome::Reply {
                message,
                destination,
            } => Some((message, *destination)),
            Outcome::Ignore { .. } => None,
        }
    }
}

/// What a step concluded.
enum Flow {
    Continue,
    Respond(Message),
    Ignore(Cow<'static, str>),
}

/// One request as the steps see it.
struct Exchange<'a> {
    req: &'a Message,
    ctx: &'a RequestContext<'a>,
    kind: MessageType,
    mac: MacAddr,
    client: ClientInfo,
    node: Option<&'a Node>,
    effects: Vec<Effect>,
}

type Step = for<'a> fn(&mut Exchange<'a>) -> Flow;

/// In order: each step may answer, stay silent, or pass on.
const PIPELINE: [Step; 6] = [
    mode_enabled,        // dhcp = "off" answers nothing
    relay_subnet,        // authoritative mode serves its own subnet only
    note_unknown_client, // unknown network-boot clients are recorded, never booted
    pxe_port,            // port 4011: boot information, unicast
    proxy,               // proxy mode on 67: boot information, no address
    authoritative,       // authoritative mode: leases (and boot information)
];

/// Decide what to do with one request.
pub fn handle(req: &Message, ctx: &RequestContext<'_>) -> Decision {
    let mut ex = match Exchange::new(req, ctx) {
        Ok(ex) => ex,
        Err(reason) => {
            return Decision {
                outcome: Outcome::Ignore { reason },
                effects: Vec::new(),
            }
        }
    };
    for step in PIPELINE {
        match step(&mut ex) {
            Flow::Continue => continue,
            Flow::Ignore(reason) => {
                return Decision {
                    outcome: Outcome::Ignore { reason },
                    effects: ex.effects,
                }
            }
            Flow::Respond(message) => {
                let destination = destination(req, &message, ctx);
                return Decision {
                    outcome: Outcome::Reply {
                        message,
                        destination,
                    },
                    effects: ex.effects,
                };
            }
        }
    }
    Decision {
        outcome: Outcome::Ignore {
            reason: "no step answered".into(),
        },
        effects: ex.effects,
    }
}

impl<'a> Exchange<'a> {
    fn new(
        req: &'a Message,
        ctx: &'a RequestContext<'a>,
    ) -> Result<Exchange<'a>, Cow<'static, str>> {
        if req.opcode() != Opcode::BootRequest {
            return Err("not a BOOTREQUEST".into());
        }
        let mac = options::client_mac(req).ok_or("not an Ethernet client (htype/hlen)")?;
        let kind = req
            .opts()
            .msg_type()
            .ok_or("no DHCP message type (option 53)")?;
        Ok(Exchange {
            req,
            ctx,
            kind,
            mac,
            client: ClientInfo::read(req),
            node: ctx.inventory.node_by_mac(mac),
            effects: Vec::new(),
        })
    }

    fn server(&self) -> Ipv4Addr {
        self.ctx.inventory.controller.address
    }

    fn event(&mut self, kind: &'static str, message: String, data: serde_json::Value) {
        let node = self.node.map(|n| n.name.clone());
        self.effects.push(Effect::Event {
            node,
            kind,
            message,
            data,
        });
    }
}

// ---- steps ----

fn mode_enabled(ex: &mut Exchange<'_>) -> Flow {
    match ex.ctx.mode {
        DhcpMode::Off => Flow::Ignore("dhcp = \"off\"".into()),
        _ => Flow::Continue,
    }
}

/// Authoritative mode serves one subnet: relays from elsewhere are refused.
fn relay_subnet(ex: &mut Exchange<'_>) -> Flow {
    let giaddr = ex.req.giaddr();
    if ex.ctx.mode != DhcpMode::Authoritative || giaddr.is_unspecified() {
        return Flow::Continue;
    }
    match ex.ctx.inventory.controller.subnet {
        Some(net) if net.contains(&giaddr) => Flow::Continue,
        Some(net) => {
            Flow::Ignore(format!("relayed from {giaddr}, outside the served subnet {net}").into())
        }
        None => Flow::Ignore("relayed request, but no subnet is configured".into()),
    }
}

/// Unknown network-boot clients are never booted, only recorded.
fn note_unknown_client(ex: &mut Exchange<'_>) -> Flow {
    if ex.node.is_none()
        && ex.client.is_netboot()
        && matches!(ex.kind, MessageType::Discover | MessageType::Request)
    {
        ex.effects.push(Effect::Discovered {
            mac: ex.mac,
            arch: ex.client.arch,
            vendor_class: ex.client.vendor_class.clone(),
        });
    }
    Flow::Continue
}

/// Port 4011: a PXE client asks the boot server directly; answer with boot
/// information only, unicast to where it asked from.
fn pxe_port(ex: &mut Exchange<'_>) -> Flow {
    if ex.ctx.port != Port::Pxe {
        return Flow::Continue;
    }
    if !matches!(ex.kind, MessageType::Request | MessageType::Inform) {
        return Flow::Ignore(format!("{:?} on port 4011", ex.kind).into());
    }
    boot_only_reply(ex, MessageType::Ack, "4011")
}

/// Proxy mode on port 67: boot information for known PXE clients, no address.
fn proxy(ex: &mut Exchange<'_>) -> Flow {
    if ex.ctx.mode != DhcpMode::Proxy {
        return Flow::Continue;
    }
    let reply_type = match ex.kind {
        MessageType::Discover => MessageType::Offer,
        MessageType::Request => {
            // A REQUEST naming another server (the router) selects that server's
            // offer; an ACK from us could be taken instead of the router's.
            if let Some(sid) = options::server_id(ex.req) {
                if sid != ex.server() {
                    return Flow::Ignore(format!("REQUEST for server {sid}").into());
                }
            }
            MessageType::Ack
        }
        other => return Flow::Ignore(format!("{other:?} in proxy mode").into()),
    };
    boot_only_reply(ex, reply_type, "67")
}

fn boot_only_reply(ex: &mut Exchange<'_>, reply_type: MessageType, port: &str) -> Flow {
    if !ex.client.is_netboot() {
        return Flow::Ignore("not a PXE or HTTP boot client".into());
    }
    let Some(node) = ex.node else {
        return Flow::Ignore(format!("{} is not in the inventory", ex.mac).into());
    };
    let boot = match boot_info(ex) {
        Ok(b) => b,
        Err(reason) => return no_boot_file(ex, reason),
    };
    let mut reply = base_reply(ex.req, reply_type, ex.server());
    if reply_type == MessageType::Ack {
        reply.set_ciaddr(ex.req.ciaddr());
    }
    options::put_boot_info(&mut reply, &boot, &ex.client, ex.server());
    booted(ex, node, reply_type, &boot, None, port);
    Flow::Respond(reply)
}

/// Authoritative mode on port 67: addresses for everyone, boot information
/// for known network-boot clients.
fn authoritative(ex: &mut Exchange<'_>) -> Flow {
    if ex.ctx.mode != DhcpMode::Authoritative {
        return Flow::Continue;
    }
    match ex.kind {
        MessageType::Discover => discover(ex),
        MessageType::Request => request(ex),
        MessageType::Decline => decline(ex),
        MessageType::Release => release(ex),
        MessageType::Inform => inform(ex),
        other => Flow::Ignore(format!("{other:?} is not a client message").into()),
    }
}

// ---- authoritative mode ----

/// Addresses never handed to pool clients: outside the subnet, network and
/// broadcast, the controller, the gateway, DNS servers, any node's address.
fn excluded(inv: &Inventory, ip: Ipv4Addr) -> bool {
    let c = &inv.controller;
    let Some(net) = c.subnet else { return true };
    !net.contains(&ip)
        || (net.prefix_len() < 31 && (ip == net.network() || ip == net.broadcast()))
        || ip == c.address
        || c.gateway == Some(ip)
        || c.dns.contains(&ip)
        || inv.nodes.values().any(|n| n.ip == ip)
}

/// The address this client gets, or why it gets none.
fn assign(ex: &Exchange<'_>) -> Result<(Ipv4Addr, bool), Cow<'static, str>> {
    let inv = ex.ctx.inventory;
    let subnet = inv
        .controller
        .subnet
        .ok_or("authoritative mode without a subnet")?;
    if let Some(node) = ex.node {
        if !subnet.contains(&node.ip) {
            return Err(format!("node {} has {} outside {subnet}", node.name, node.ip).into());
        }
        return Ok((node.ip, true));
    }
    let pool = inv
        .controller
        .pool
        .ok_or("not in the inventory and no pool is configured")?;
    let (view, now, mac) = (ex.ctx.leases, ex.ctx.now_ms, ex.mac);
    let usable = |ip: Ipv4Addr| {
        pool.contains(ip) && !excluded(inv, ip) && pool::free_for(view, ip, mac, now, true)
    };
    let previous = [
        view.offered(mac, now).map(|l| l.ip),
        view.bound(mac).map(|l| l.ip),
        options::requested_ip(ex.req),
    ];
    if let Some(ip) = previous.into_iter().flatten().find(|&ip| usable(ip)) {
        return Ok((ip, false));
    }
    pool::allocate(view, pool, mac, now, &|ip| excluded(inv, ip))
        .map(|ip| (ip, false))
        .ok_or_else(|| "the pool is exhausted".into())
}

/// May this client have `ip` (REQUEST in any state)?
fn valid_for(ex: &Exchange<'_>, ip: Ipv4Addr) -> bool {
    let inv = ex.ctx.inventory;
    if let Some(node) = ex.node {
        return node.ip == ip;
    }
    let Some(pool) = inv.controller.pool else {
        return false;
    };
    pool.contains(ip)
        && !excluded(inv, ip)
        && pool::free_for(ex.ctx.leases, ip, ex.mac, ex.ctx.now_ms, true)
}

fn discover(ex: &mut Exchange<'_>) -> Flow {
    let (ip, is_static) = match assign(ex) {
        Ok(a) => a,
        Err(reason) => return Flow::Ignore(reason),
    };
    let mut reply = base_reply(ex.req, MessageType::Offer, ex.server());
    reply.set_yiaddr(ip);
    put_lease_options(
        &mut reply,
        ex.ctx.inventory,
        Some(ex.ctx.inventory.controller.lease_time),
    );
    if !is_static {
        ex.effects.push(Effect::Reserve {
            mac: ex.mac,
            ip,
            until_ms: ex.ctx.now_ms + OFFER_HOLD_MS,
        });
    }
    add_boot_info(ex, &mut reply, Some(ip));
    Flow::Respond(reply)
}

fn request(ex: &mut Exchange<'_>) -> Flow {
    let server = ex.server();
    let ciaddr = ex.req.ciaddr();
    let requested = options::requested_ip(ex.req);
    // RFC 2131 4.3.2: which state the client is in decides which address it means.
    let wanted = match (options::server_id(ex.req), requested) {
        (Some(sid), _) if sid != server => {
            ex.effects.push(Effect::Unreserve { mac: ex.mac });
            return Flow::Ignore(format!("client chose server {sid}").into());
        }
        // SELECTING: answering our offer.
        (Some(_), Some(ip)) => ip,
        (Some(_), None) if !ciaddr.is_unspecified() => ciaddr,
        (Some(_), None) => return Flow::Ignore("REQUEST names us but no address".into()),
        // INIT-REBOOT: checking a remembered address.
        (None, Some(ip)) if ciaddr.is_unspecified() => ip,
        // RENEWING / REBINDING: extending the address it uses.
        (None, _) if !ciaddr.is_unspecified() => ciaddr,
        (None, _) => return Flow::Ignore("REQUEST without an address".into()),
    };
    if !valid_for(ex, wanted) {
        return nak(ex, wanted);
    }
    let is_static = ex.node.is_some();
    let now = ex.ctx.now_ms;
    let lease_ms = i64::from(ex.ctx.inventory.controller.lease_time) * 1000;
    // Lease caching (Kea's cache-threshold): a client asking again soon after
    // its lease was stored gets what is left of it, and nothing is written.
    // Clients that reboot or retry in a loop then cost no disk write.
    let kind = if is_static {
        LeaseKind::Static
    } else {
        LeaseKind::Dynamic
    };
    let cached = ex.ctx.leases.bound(ex.mac).filter(|l| {
        l.ip == wanted
            && l.kind == kind
            && l.expires_ms - now > lease_ms - lease_ms / CACHE_FRACTION
    });
    let lease_secs = match cached {
        Some(l) => ((l.expires_ms - now) / 1000) as u32,
        None => {
            ex.effects.push(Effect::Bind {
                mac: ex.mac,
                ip: wanted,
                expires_ms: now + lease_ms,
                is_static,
            });
            ex.ctx.inventory.controller.lease_time
        }
    };
    let mut reply = base_reply(ex.req, MessageType::Ack, server);
    reply.set_ciaddr(ciaddr).set_yiaddr(wanted);
    put_lease_options(&mut reply, ex.ctx.inventory, Some(lease_secs));
    add_boot_info(ex, &mut reply, Some(wanted));
    Flow::Respond(reply)
}

fn nak(ex: &mut Exchange<'_>, wanted: Ipv4Addr) -> Flow {
    let mut reply = base_reply(ex.req, MessageType::Nak, ex.server());
    let text = match ex.node {
        Some(n) => format!("{wanted} is not this client's address; it is {}", n.ip),
        None => format!("{wanted} is not available to this client"),
    };
    reply.opts_mut().insert(DhcpOption::Message(text.clone()));
    if !ex.req.giaddr().is_unspecified() {
        // RFC 2131 4.3.2: a NAK through a relay asks it to broadcast.
        reply.set_flags(Flags::default().set_broadcast());
    }
    if ex.node.is_some() {
        ex.event(
            "dhcp.nak",
            text,
            json!({ "mac": ex.mac.to_string(), "requested": wanted.to_string() }),
        );
    }
    Flow::Respond(reply)
}

fn decline(ex: &mut Exchange<'_>) -> Flow {
    if options::server_id(ex.req).is_some_and(|s| s != ex.server()) {
        return Flow::Ignore("DECLINE for another server".into());
    }
    let Some(ip) = options::requested_ip(ex.req) else {
        return Flow::Ignore("DECLINE without an address".into());
    };
    let view = ex.ctx.leases;
    let ours = ex.node.is_some_and(|n| n.ip == ip)
        || view.bound(ex.mac).is_some_and(|l| l.ip == ip)
        || view
            .offered(ex.mac, ex.ctx.now_ms)
            .is_some_and(|l| l.ip == ip);
    if !ours {
        return Flow::Ignore(format!("DECLINE of {ip}, which this client does not hold").into());
    }
    let until_ms = ex.ctx.now_ms + DECLINE_PROBATION_MS;
    ex.effects.push(Effect::Quarantine {
        mac: ex.mac,
        ip,
        until_ms,
    });
    ex.event(
        "dhcp.decline",
        format!(
            "{} reported {ip} already in use; the address is withheld for an hour",
            ex.mac
        ),
        json!({ "mac": ex.mac.to_string(), "ip": ip.to_string() }),
    );
    Flow::Ignore(format!("DECLINE: {ip} quarantined").into())
}

fn release(ex: &mut Exchange<'_>) -> Flow {
    if options::server_id(ex.req).is_some_and(|s| s != ex.server()) {
        return Flow::Ignore("RELEASE for another server".into());
    }
    let ip = ex.req.ciaddr();
    match ex.ctx.leases.bound(ex.mac) {
        Some(l) if l.ip == ip => {
            ex.effects.push(Effect::Release { mac: ex.mac, ip });
            Flow::Ignore(format!("RELEASE: {ip} freed").into())
        }
        _ => Flow::Ignore(format!("RELEASE of {ip}, which this client does not hold").into()),
    }
}

fn inform(ex: &mut Exchange<'_>) -> Flow {
    let mut reply = base_reply(ex.req, MessageType::Ack, ex.server());
    reply.set_ciaddr(ex.req.ciaddr());
    put_lease_options(&mut reply, ex.ctx.inventory, None);
    add_boot_info(ex, &mut reply, None);
    Flow::Respond(reply)
}

// ---- building replies ----

/// A reply to `req` with the fields every reply shares (RFC 2131 table 3).
fn base_reply(req: &Message, kind: MessageType, server: Ipv4Addr) -> Message {
    let mut m = Message::default();
    m.set_opcode(Opcode::BootReply)
        .set_htype(req.htype())
        .set_xid(req.xid())
        .set_flags(req.flags())
        .set_giaddr(req.giaddr())
        .set_chaddr(req.chaddr());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
    m
}

/// Options 1, 3, 6, and with a lease time 51, 58 (T1 = 1/2), 59 (T2 = 7/8).
fn put_lease_options(reply: &mut Message, inv: &Inventory, lease_secs: Option<u32>) {
    let c = &inv.controller;
    let opts = reply.opts_mut();
    if let Some(net) = c.subnet {
        opts.insert(DhcpOption::SubnetMask(net.netmask()));
    }
    if let Some(gw) = c.gateway {
        opts.insert(DhcpOption::Router(vec![gw]));
    }
    if !c.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(c.dns.clone()));
    }
    if let Some(t) = lease_secs {
        opts.insert(DhcpOption::AddressLeaseTime(t));
        opts.insert(DhcpOption::Renewal(t / 2));
        opts.insert(DhcpOption::Rebinding((u64::from(t) * 7 / 8) as u32));
    }
}

/// In authoritative mode: known network-boot clients also get boot information.
fn add_boot_info(ex: &mut Exchange<'_>, reply: &mut Message, ip: Option<Ipv4Addr>) {
    let Some(node) = ex.node else { return };
    if !ex.client.is_netboot() {
        let (kind, verb) = match reply.opts().msg_type() {
            Some(MessageType::Offer) => ("dhcp.offer", "offered"),
            _ => ("dhcp.ack", "acknowledged"),
        };
        if let Some(ip) = ip {
            ex.event(
                kind,
                format!("{verb} {ip}"),
                json!({ "mac": ex.mac.to_string(), "ip": ip.to_string() }),
            );
        }
        return;
    }
    match boot_info(ex) {
        Ok(boot) => {
            options::put_boot_info(reply, &boot, &ex.client, ex.server());
            let kind = reply.opts().msg_type().unwrap_or(MessageType::Ack);
            booted(ex, node, kind, &boot, ip, "67");
        }
        Err(reason) => {
            // The address still helps (an OS installer, a shell); say why no boot file.
            ex.event(
                "dhcp.no-boot-file",
                reason.into_owned(),
                json!({ "mac": ex.mac.to_string() }),
            );
        }
    }
}

/// The boot file for this client: its own iPXE script when it already runs
/// iPXE, else the iPXE binary for its architecture (a URL for HTTP boot).
fn boot_info(ex: &Exchange<'_>) -> Result<BootInfo, Cow<'static, str>> {
    let c = &ex.ctx.inventory.controller;
    if ex.client.ipxe {
        return Ok(BootInfo {
            file: format!("http://{}:{}/boot/{}.ipxe", c.address, c.http_port, ex.mac),
            class: ex.client.class,
        });
    }
    let arch = ClientArch::from_code(ex.client.arch.unwrap_or(0));
    let binary = arch
        .ipxe_binary()
        .ok_or_else(|| format!("no iPXE binary for client architecture {}", arch.label()))?;
    if !ex.ctx.binaries.has(binary) {
        return Err(format!(
            "{binary} (for {}) is not in {}",
            arch.label(),
            c.ipxe_dir.display()
        )
        .into());
    }
    if arch.is_http_boot() || ex.client.class == BootClass::Http {
        Ok(BootInfo {
            file: format!("http://{}:{}/boot/ipxe/{binary}", c.address, c.http_port),
            class: BootClass::Http,
        })
    } else {
        Ok(BootInfo {
            file: binary.to_string(),
            class: BootClass::Pxe,
        })
    }
}

fn no_boot_file(ex: &mut Exchange<'_>, reason: Cow<'static, str>) -> Flow {
    ex.event(
        "dhcp.no-boot-file",
        reason.to_string(),
        json!({ "mac": ex.mac.to_string(), "arch": ex.client.arch }),
    );
    Flow::Ignore(reason)
}

/// Effects of giving a known node boot information.
fn booted(
    ex: &mut Exchange<'_>,
    node: &Node,
    kind: MessageType,
    boot: &BootInfo,
    ip: Option<Ipv4Addr>,
    port: &str,
) {
    let (event, verb) = match kind {
        MessageType::Offer => ("dhcp.offer", "offered"),
        _ => ("dhcp.ack", "acknowledged"),
    };
    let arch = ex
        .client
        .arch
        .map(|a| ClientArch::from_code(a).label())
        .unwrap_or_else(|| "unknown".into());
    let what = if ex.client.ipxe {
        "its iPXE script".to_string()
    } else {
        format!("{} ({arch})", boot.file)
    };
    ex.event(
        event,
        format!("{verb} {what} on port {port}"),
        json!({
            "mac": ex.mac.to_string(),
            "arch": ex.client.arch,
            "file": boot.file,
            "ip": ip.map(|i| i.to_string()),
            "ipxe": ex.client.ipxe,
            "port": port,
        }),
    );
    ex.effects.push(Effect::Booting {
        node: node.name.clone(),
    });
}

/// RFC 2131 4.1: where a reply goes.
fn destination(req: &Message, reply: &Message, ctx: &RequestContext<'_>) -> Destination {
    if ctx.port == Port::Pxe {
        return Destination::Unicast(ctx.source);
    }
    let giaddr = req.giaddr();
    if !giaddr.is_unspecified() {
        return Destination::Unicast(SocketAddrV4::new(giaddr, 67));
    }
    if reply.opts().msg_type() == Some(MessageType::Nak) {
        return Destination::Broadcast;
    }
    let ciaddr = req.ciaddr();
    if !ciaddr.is_unspecified() {
        return Destination::Unicast(SocketAddrV4::new(ciaddr, 68));
    }
    // Broadcast flag set, or not: unicasting to yiaddr before the client has
    // configured it needs an ARP entry injected for chaddr (raw sockets or
    // SIOCSARP); broadcasting is what every client accepts.
    Destination::Broadcast
}
