//! The pure handler, one scenario per test, asserting the reply's exact fields.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode, UnknownOption};
use dhcproto::{Encodable, Encoder};
use proptest::prelude::*;

use super::handler::{
    handle, Binaries, Decision, Destination, Effect, Outcome, Port, RequestContext,
};
use super::options;
use super::pool::{LeaseKind, LeaseTable, LeaseView, OFFER_HOLD_MS};
use crate::inventory::{DhcpMode, Inventory, MacAddr};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 11);
const NODE_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x11]);
const STRANGER: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x99]);
const GUID: [u8; 17] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
const XID: u32 = 0x1234_5678;
const NOW: i64 = 1_000_000;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn inventory(mode: DhcpMode) -> Inventory {
    crate::testing::Builder::new()
        .interface("hl0")
        .address(SERVER)
        .controller(&format!(
            "dhcp = {}\nsubnet = \"10.9.0.0/24\"\ngateway = \"10.9.0.254\"\n\
             dns = [\"10.9.0.53\"]\npool = \"10.9.0.100-10.9.0.199\"",
            serde_json::to_string(&mode).unwrap()
        ))
        .node("node1", NODE_MAC, NODE_IP, "server")
        .build()
}

/// A request as firmware or a DHCP client would send it.
fn request(mac: MacAddr, kind: MessageType) -> Message {
    crate::testing::dhcp_request(XID, mac, kind)
}

/// PXE firmware of architecture `arch` (option 93), with a GUID.
fn pxe(mac: MacAddr, kind: MessageType, arch: u16) -> Message {
    crate::testing::pxe_request(XID, mac, kind, arch, &GUID)
}

fn with(mut m: Message, opt: DhcpOption) -> Message {
    m.opts_mut().insert(opt);
    m
}

struct Env {
    inventory: Inventory,
    leases: LeaseTable,
    binaries: Binaries,
    now: i64,
}

impl Env {
    fn new(mode: DhcpMode) -> Env {
        Env {
            inventory: inventory(mode),
            leases: LeaseTable::new(),
            binaries: Binaries::all(),
            now: NOW,
        }
    }

    fn on(&self, port: Port, source: SocketAddrV4, req: &Message) -> Decision {
        let ctx = RequestContext {
            inventory: &self.inventory,
            mode: self.inventory.controller.dhcp,
            port,
            source,
            leases: &self.leases,
            binaries: &self.binaries,
            now_ms: self.now,
        };
        handle(req, &ctx)
    }

    /// Handle a request on port 67 from 0.0.0.0:68 and apply the lease effects, as the server does.
    fn send(&mut self, req: &Message) -> Decision {
        let d = self.on(
            Port::Dhcp,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
            req,
        );
        for e in &d.effects {
            self.leases.apply(e);
        }
        d
    }
}

fn reply(d: &Decision) -> (&Message, Destination) {
    d.reply()
        .unwrap_or_else(|| panic!("expected a reply, got {:?}", d.outcome))
}

fn ignored(d: &Decision) -> &str {
    match &d.outcome {
        Outcome::Ignore { reason } => reason,
        Outcome::Reply { message, .. } => panic!("expected no reply, got {message:?}"),
    }
}

fn opt(m: &Message, code: u8) -> Option<&DhcpOption> {
    m.opts().get(OptionCode::from(code))
}

fn bytes_opt(m: &Message, code: u8) -> Option<Vec<u8>> {
    match opt(m, code)? {
        DhcpOption::ClassIdentifier(v)
        | DhcpOption::VendorExtensions(v)
        | DhcpOption::BootfileName(v)
        | DhcpOption::ClientMachineIdentifier(v) => Some(v.clone()),
        other => panic!("option {code} is {other:?}"),
    }
}

/// The boot-information fields every boot reply carries.
fn assert_boot(m: &Message, file: &str, class: &str, pxe_options: bool) {
    assert_eq!(m.opcode(), Opcode::BootReply);
    assert_eq!(m.xid(), XID);
    assert_eq!(m.siaddr(), SERVER);
    assert_eq!(m.sname(), Some("10.9.0.1".as_bytes()));
    assert_eq!(m.fname(), Some(file.as_bytes()));
    assert_eq!(opt(m, 54), Some(&DhcpOption::ServerIdentifier(SERVER)));
    assert_eq!(bytes_opt(m, 60).as_deref(), Some(class.as_bytes()));
    assert_eq!(bytes_opt(m, 67).as_deref(), Some(file.as_bytes()));
    assert_eq!(bytes_opt(m, 43), pxe_options.then(|| vec![6, 1, 8, 255]));
    assert_eq!(bytes_opt(m, 97).as_deref(), Some(&GUID[..]));
}

fn client68() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)
}

fn events(d: &Decision) -> Vec<(&'static str, Option<String>)> {
    d.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Event { node, kind, .. } => Some((*kind, node.clone())),
            _ => None,
        })
        .collect()
}

// ---- proxy mode ----

#[test]
fn proxy_bios_discover_gets_undionly_offer_without_address() {
    let env = Env::new(DhcpMode::Proxy);
    let d = env.on(
        Port::Dhcp,
        client68(),
        &pxe(NODE_MAC, MessageType::Discover, 0),
    );
    let (m, dest) = reply(&d);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(m.ciaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(m.chaddr(), &NODE_MAC.0);
    assert_boot(m, "undionly.kpxe", "PXEClient", true);
    assert!(
        opt(m, 51).is_none() && opt(m, 1).is_none(),
        "proxy replies carry no lease"
    );
    assert_eq!(dest, Destination::Broadcast);
    assert_eq!(events(&d), vec![("dhcp.offer", Some("node1".into()))]);
    assert!(d.effects.contains(&Effect::Booting {
        node: "node1".into()
    }));
    assert!(!d
        .effects
        .iter()
        .any(|e| matches!(e, Effect::Reserve { .. } | Effect::Bind { .. })));
}

#[test]
fn proxy_uefi_x64_gets_ipxe_efi() {
    let env = Env::new(DhcpMode::Proxy);
    for arch in [7, 9] {
        let d = env.on(
            Port::Dhcp,
            client68(),
            &pxe(NODE_MAC, MessageType::Discover, arch),
        );
        let (m, dest) = reply(&d);
        assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_boot(m, "ipxe.efi", "PXEClient", true);
        assert_eq!(dest, Destination::Broadcast);
    }
}

#[test]
fn proxy_request_on_67_gets_ack() {
    let env = Env::new(DhcpMode::Proxy);
    let req = with(
        pxe(NODE_MAC, MessageType::Request, 0),
        DhcpOption::ServerIdentifier(SERVER),
    );
    let d = env.on(Port::Dhcp, client68(), &req);
    let (m, dest) = reply(&d);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_boot(m, "undionly.kpxe", "PXEClient", true);
    assert_eq!(dest, Destination::Broadcast);
    // A REQUEST that selects the router's offer is the router's business.
    let to_router = with(
        pxe(NODE_MAC, MessageType::Request, 0),
        DhcpOption::ServerIdentifier(ip("10.9.0.254")),
    );
    assert!(ignored(&env.on(Port::Dhcp, client68(), &to_router)).contains("10.9.0.254"));
}

#[test]
fn uefi_http_boot_gets_a_url_and_httpclient() {
    let env = Env::new(DhcpMode::Proxy);
    let d = env.on(
        Port::Dhcp,
        client68(),
        &pxe(NODE_MAC, MessageType::Discover, 16),
    );
    let (m, dest) = reply(&d);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
    assert_boot(
        m,
        "http://10.9.0.1:8080/boot/ipxe/ipxe.efi",
        "HTTPClient",
        false,
    );
    assert_eq!(dest, Destination::Broadcast);
}

#[test]
fn arm64_gets_its_binary_only_when_present() {
    let mut env = Env::new(DhcpMode::Proxy);
    let d = env.on(
        Port::Dhcp,
        client68(),
        &pxe(NODE_MAC, MessageType::Discover, 11),
    );
    assert_boot(reply(&d).0, "ipxe-arm64.efi", "PXEClient", true);
    env.binaries = Binaries::new(["undionly.kpxe", "ipxe.efi"]);
    let d = env.on(
        Port::Dhcp,
        client68(),
        &pxe(NODE_MAC, MessageType::Discover, 11),
    );
    assert!(ignored(&d).contains("ipxe-arm64.efi"));
    assert_eq!(
        events(&d),
        vec![("dhcp.no-boot-file", Some("node1".into()))]
    );
}

#[test]
fn ipxe_user_class_gets_its_script_url() {
    let env = Env::new(DhcpMode::Proxy);
    let req = with(
        pxe(NODE_MAC, MessageType::Discover, 7),
        DhcpOption::UserClass(b"iPXE".to_vec()),
    );
    let d = env.on(Port::Dhcp, client68(), &req);
    let (m, _) = reply(&d);
    assert_boot(
        m,
        "http://10.9.0.1:8080/boot/52:54:00:00:00:11.ipxe",
        "PXEClient",
        true,
    );
    // Option 175 alone also marks iPXE.
    let req = with(
        pxe(NODE_MAC, MessageType::Discover, 0),
        DhcpOption::Unknown(UnknownOption::new(
            OptionCode::from(175),
            vec![177, 5, 1, 0x10, 0xec, 0x81, 0x00],
        )),
    );
    let d = env.on(Port::Dhcp, client68(), &req);
    assert_eq!(
        reply(&d).0.fname(),
        Some("http://10.9.0.1:8080/boot/52:54:00:00:00:11.ipxe".as_bytes())
    );
}

#[test]
fn missing_guid_is_accepted_and_not_echoed() {
    let env = Env::new(DhcpMode::Proxy);
    let mut req = pxe(NODE_MAC, MessageType::Discover, 0);
    req.opts_mut().remove(OptionCode::ClientMachineIdentifier);
    let d = env.on(Port::Dhcp, client68(), &req);
    let (m, _) = reply(&d);
    assert_eq!(m.fname(), Some("undionly.kpxe".as_bytes()));
    assert!(opt(m, 97).is_none());
}

#[test]
fn unknown_mac_is_ignored_in_proxy_mode_but_recorded() {
    let env = Env::new(DhcpMode::Proxy);
    let d = env.on(
        Port::Dhcp,
        client68(),
        &pxe(STRANGER, MessageType::Discover, 7),
    );
    assert!(ignored(&d).contains("52:54:00:00:00:99"));
    assert_eq!(
        d.effects,
        vec![Effect::Discovered {
            mac: STRANGER,
            arch: Some(7),
            vendor_class: "PXEClient:Arch:00007:UNDI:003016".into()
        }]
    );
}

#[test]
fn ordinary_clients_are_ignored_in_proxy_mode_without_effects() {
    let env = Env::new(DhcpMode::Proxy);
    for mac in [NODE_MAC, STRANGER] {
        let d = env.on(Port::Dhcp, client68(), &request(mac, MessageType::Discover));
        ignored(&d);
        assert!(d.effects.is_empty());
    }
}

#[test]
fn port_4011_request_gets_unicast_ack_to_its_source() {
    let env = Env::new(DhcpMode::Proxy);
    let source = SocketAddrV4::new(ip("10.9.0.57"), 68);
    let mut req = pxe(NODE_MAC, MessageType::Request, 7);
    req.set_ciaddr(ip("10.9.0.57"));
    let d = env.on(Port::Pxe, source, &req);
    let (m, dest) = reply(&d);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(m.ciaddr(), ip("10.9.0.57"));
    assert_boot(m, "ipxe.efi", "PXEClient", true);
    assert_eq!(dest, Destination::Unicast(source));
    assert_eq!(events(&d), vec![("dhcp.ack", Some("node1".into()))]);
    // Unknown clients get nothing there either.
    let d = env.on(Port::Pxe, source, &pxe(STRANGER, MessageType::Request, 7));
    ignored(&d);
    assert!(matches!(d.effects[..], [Effect::Discovered { .. }]));
}

#[test]
fn relayed_proxy_offer_goes_back_through_the_relay() {
    let env = Env::new(DhcpMode::Proxy);
    let mut req = pxe(NODE_MAC, MessageType::Discover, 0);
    req.set_giaddr(ip("192.168.7.1"));
    let d = env.on(Port::Dhcp, SocketAddrV4::new(ip("192.168.7.1"), 67), &req);
    let (m, dest) = reply(&d);
    assert_eq!(m.giaddr(), ip("192.168.7.1"));
    assert_boot(m, "undionly.kpxe", "PXEClient", true);
    assert_eq!(
        dest,
        Destination::Unicast(SocketAddrV4::new(ip("192.168.7.1"), 67))
    );
}

#[test]
fn off_mode_answers_nothing() {
    let env = Env::new(DhcpMode::Off);
    ignored(&env.on(
        Port::Dhcp,
        client68(),
        &pxe(NODE_MAC, MessageType::Discover, 0),
    ));
}

// ---- authoritative mode ----

fn assert_lease_options(m: &Message) {
    assert_eq!(
        opt(m, 1),
        Some(&DhcpOption::SubnetMask(ip("255.255.255.0")))
    );
    assert_eq!(opt(m, 3), Some(&DhcpOption::Router(vec![ip("10.9.0.254")])));
    assert_eq!(
        opt(m, 6),
        Some(&DhcpOption::DomainNameServer(vec![ip("10.9.0.53")]))
    );
    assert_eq!(opt(m, 51), Some(&DhcpOption::AddressLeaseTime(3600)));
    assert_eq!(opt(m, 54), Some(&DhcpOption::ServerIdentifier(SERVER)));
    assert_eq!(opt(m, 58), Some(&DhcpOption::Renewal(1800)));
    assert_eq!(opt(m, 59), Some(&DhcpOption::Rebinding(3150)));
}

fn selecting(mac: MacAddr, want: Ipv4Addr) -> Message {
    let m = with(
        request(mac, MessageType::Request),
        DhcpOption::ServerIdentifier(SERVER),
    );
    with(m, DhcpOption::RequestedIpAddress(want))
}

#[test]
fn authoritative_dora_gives_a_pxe_node_its_static_address_and_boot_file() {
    let mut env = Env::new(DhcpMode::Authoritative);
    let d = env.send(&pxe(NODE_MAC, MessageType::Discover, 0));
    let (m, dest) = reply(&d);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(m.yiaddr(), NODE_IP);
    assert_lease_options(m);
    assert_boot(m, "undionly.kpxe", "PXEClient", true);
    assert_eq!(dest, Destination::Broadcast);

    let req = {
        let mut r = pxe(NODE_MAC, MessageType::Request, 0);
        r.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        r.opts_mut().insert(DhcpOption::RequestedIpAddress(NODE_IP));
        r
    };
    let d = env.send(&req);
    let (m, dest) = reply(&d);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), NODE_IP);
    assert_lease_options(m);
    assert_boot(m, "undionly.kpxe", "PXEClient", true);
    assert_eq!(dest, Destination::Broadcast);
    assert!(d.effects.contains(&Effect::Bind {
        mac: NODE_MAC,
        ip: NODE_IP,
        expires_ms: NOW + 3_600_000,
        is_static: true
    }));
    assert_eq!(events(&d), vec![("dhcp.ack", Some("node1".into()))]);
    assert_eq!(
        env.leases.bound(NODE_MAC).map(|l| (l.ip, l.kind)),
        Some((NODE_IP, LeaseKind::Static))
    );
}

#[test]
fn authoritative_plain_client_of_a_node_gets_its_address_without_boot_file() {
    // The node's installed OS asking for its address.
    let mut env = Env::new(DhcpMode::Authoritative);
    let d = env.send(&request(NODE_MAC, MessageType::Discover));
    let (m, _) = reply(&d);
    assert_eq!(m.yiaddr(), NODE_IP);
    assert_eq!(m.fname(), None);
    assert!(opt(m, 67).is_none() && opt(m, 60).is_none());
    assert!(!d
        .effects
        .iter()
        .any(|e| matches!(e, Effect::Booting { .. })));
}

#[test]
fn pool_allocation_for_ordinary_clients() {
    let mut env = Env::new(DhcpMode::Authoritative);
    let a = MacAddr([2, 0, 0, 0, 0, 1]);
    let b = MacAddr([2, 0, 0, 0, 0, 2]);
    let d = env.send(&request(a, MessageType::Discover));
    let (m, _) = reply(&d);
    assert_eq!(m.yiaddr(), ip("10.9.0.100"));
    assert_eq!(m.siaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(m.fname(), None);
    assert_lease_options(m);
    assert_eq!(
        d.effects,
        vec![Effect::Reserve {
            mac: a,
            ip: ip("10.9.0.100"),
            until_ms: NOW + OFFER_HOLD_MS
        }]
    );
    // The offer is held: the next client gets the next address.
    let d = env.send(&request(b, MessageType::Discover));
    assert_eq!(reply(&d).0.yiaddr(), ip("10.9.0.101"));
    let d = env.send(&selecting(a, ip("10.9.0.100")));
    let (m, _) = reply(&d);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), ip("10.9.0.100"));
    assert!(events(&d).is_empty(), "no events for ordinary clients");
    // Discovering again returns the same address.
    let d = env.send(&request(a, MessageType::Discover));
    assert_eq!(reply(&d).0.yiaddr(), ip("10.9.0.100"));
}

#[test]
fn unknown_pxe_client_gets_an_address_but_no_boot_file_and_is_recorded() {
    let mut env = Env::new(DhcpMode::Authoritative);
    let d = env.send(&pxe(STRANGER, MessageType::Discover, 0));
    let (m, _) = reply(&d);
    assert_eq!(m.yiaddr(), ip("10.9.0.100"));
    assert_eq!(m.fname(), None);
    assert!(opt(m, 67).is_none() && opt(m, 43).is_none());
    assert!(d
        .effects
        .iter()
        .any(|e| matches!(e, Effect::Discovered { mac, arch: Some(0), .. } if *mac == STRANGER)));
}

#[test]
fn nak_when_the_requested_address_is_wrong() {
    let mut env = Env::new(DhcpMode::Authoritative);
    // INIT-REBOOT of a node remembering another address.
    let req = with(
        request(NODE_MAC, MessageType::Request),
        DhcpOption::RequestedIpAddress(ip("10.9.0.150")),
    );
    let d = env.send(&req);
    let (m, dest) = reply(&d);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(opt(m, 54), Some(&DhcpOption::ServerIdentifier(SERVER)));
    assert!(opt(m, 51).is_none());
    assert_eq!(dest, Destination::Broadcast);
    assert!(d.effects.iter().all(|e| !matches!(e, Effect::Bind { .. })));
    // A pool client asking for a node's address, or one outside the subnet.
    for wrong in [NODE_IP, ip("192.168.1.5"), SERVER] {
        let req = with(
            request(STRANGER, MessageType::Request),
            DhcpOption::RequestedIpAddress(wrong),
        );
        assert_eq!(
            reply(&env.send(&req)).0.opts().msg_type(),
            Some(MessageType::Nak),
            "{wrong}"
        );
    }
    // A renewing client (ciaddr) whose address another client holds: NAK, broadcast.
    let a = MacAddr([2, 0, 0, 0, 0, 1]);
    env.send(&request(a, MessageType::Discover));
    env.send(&selecting(a, ip("10.9.0.100")));
    let mut renew = request(STRANGER, MessageType::Request);
    renew.set_ciaddr(ip("10.9.0.100"));
    let (m, dest) = {
        let d = env.send(&renew);
        let (m, dest) = reply(&d);
        (m.clone(), dest)
    };
    assert_eq!(m.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(dest, Destination::Broadcast);
}

#[test]
fn renewing_extends_the_lease_unicast() {
    let mut env = Env::new(DhcpMode::Authoritative);
    let a = MacAddr([2, 0, 0, 0, 0, 1]);
    env.send(&request(a, MessageType::Discover));
    env.send(&selecting(a, ip("10.9.0.100")));
    env.now += 1_800_000;
    let mut renew = request(a, MessageType::Request);
    renew.set_ciaddr(ip("10.9.0.100"));
    let d = env.send(&renew);
    let (m, dest) = reply(&d);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), ip("10.9.0.100"));
    assert_eq!(m.ciaddr(), ip("10.9.0.100"));
    assert_eq!(
        dest,
        Destination::Unicast(SocketAddrV4::new(ip("10.9.0.100"), 68))
    );
    assert_eq!(
        env.leases.bound(a).unwrap().expires_ms,
        NOW + 1_800_000 + 3_600_000
    );
}

#[test]
fn asking_again_soon_reuses_the_stored_lease_without_a_write() {
    let mut env = Env::new(DhcpMode::Authoritative);
    let a = MacAddr([2, 0, 0, 0, 0, 1]);
    env.send(&request(a, MessageType::Discover));
    assert!(env
        .send(&selecting(a, ip("10.9.0.100")))
        .effects
        .iter()
        .any(|e| matches!(e, Effect::Bind { .. })));
    // Ten minutes later (under a quarter of the hour's lease): the remaining 50 minutes, no write.
    env.now += 600_000;
    env.send(&request(a, MessageType::Discover));
    let d = env.send(&selecting(a, ip("10.9.0.100")));
    let (m, _) = reply(&d);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(opt(m, 51), Some(&DhcpOption::AddressLeaseTime(3000)));
    assert_eq!(opt(m, 58), Some(&DhcpOption::Renewal(1500)));
    assert_eq!(opt(m, 59), Some(&DhcpOption::Rebinding(2625)));
    assert!(d.effects.is_empty(), "{:?}", d.effects);
    // Past the quarter: a full lease, stored again.
    env.now += 600_000;
    let d = env.send(&selecting(a, ip("10.9.0.100")));
    assert_eq!(
        opt(reply(&d).0, 51),
        Some(&DhcpOption::AddressLeaseTime(3600))
    );
    assert!(d.effects.iter().any(|e| matches!(e, Effect::Bind { .. })));
}

#[test]
fn request_for_another_server_drops_our_offer() {
    let mut env = Env::new(DhcpMode::Authoritative);
    let a = MacAddr([2, 0, 0, 0, 0, 1]);
    env.send(&request(a, MessageType::Discover));
    assert!(env.leases.offered(a, NOW).is_some());
    let req = with(
        request(a, MessageType::Request),
        DhcpOption::ServerIdentifier(ip("10.9.0.254")),
    );
    let req = with(req, DhcpOption::RequestedIpAddress(ip("10.9.0.33")));
    ignored(&env.send(&req));
    assert!(env.leases.offered(a, NOW).is_none());
}

#[test]
fn decline_quarantines_the_address() {
    let mut env = Env::new(DhcpMode::Authoritative);
    let a = MacAddr([2, 0, 0, 0, 0, 1]);
    env.send(&request(a, MessageType::Discover));
    env.send(&selecting(a, ip("10.9.0.100")));
    let decline = with(
        with(
            request(a, MessageType::Decline),
            DhcpOption::RequestedIpAddress(ip("10.9.0.100")),
        ),
        DhcpOption::ServerIdentifier(SERVER),
    );
    let d = env.send(&decline);
    assert!(ignored(&d).contains("quarantined"));
    assert!(d
        .effects
        .iter()
        .any(|e| matches!(e, Effect::Quarantine { ip: q, .. } if *q == ip("10.9.0.100"))));
    assert_eq!(events(&d), vec![("dhcp.decline", None)]);
    assert!(env.leases.quarantined(ip("10.9.0.100"), NOW));
    assert_eq!(env.leases.bound(a), None);
    // The client starts over and gets another address.
    let d = env.send(&request(a, MessageType::Discover));
    assert_eq!(reply(&d).0.yiaddr(), ip("10.9.0.101"));
    // Nobody else gets the declined one either.
    let d = env.send(&request(STRANGER, MessageType::Discover));
    assert_eq!(reply(&d).0.yiaddr(), ip("10.9.0.102"));
    // A DECLINE of an address the client does not hold changes nothing.
    let bogus = with(
        request(STRANGER, MessageType::Decline),
        DhcpOption::RequestedIpAddress(ip("10.9.0.150")),
    );
    let d = env.send(&bogus);
    ignored(&d);
    assert!(d.effects.is_empty());
}

#[test]
fn release_frees_the_address() {
    let mut env = Env::new(DhcpMode::Authoritative);
    env.inventory.controller.pool = Some("10.9.0.100-10.9.0.100".parse().unwrap());
    let a = MacAddr([2, 0, 0, 0, 0, 1]);
    env.send(&request(a, MessageType::Discover));
    env.send(&selecting(a, ip("10.9.0.100")));
    let mut rel = with(
        request(a, MessageType::Release),
        DhcpOption::ServerIdentifier(SERVER),
    );
    rel.set_ciaddr(ip("10.9.0.100"));
    assert!(ignored(&env.send(&request(STRANGER, MessageType::Discover))).contains("exhausted"));
    let d = env.send(&rel);
    assert!(ignored(&d).contains("freed"));
    assert_eq!(
        d.effects,
        vec![Effect::Release {
            mac: a,
            ip: ip("10.9.0.100")
        }]
    );
    assert_eq!(env.leases.holder(ip("10.9.0.100")), None);
    // Someone else may have it now.
    let d = env.send(&request(STRANGER, MessageType::Discover));
    assert_eq!(reply(&d).0.yiaddr(), ip("10.9.0.100"));
    // Releasing what one does not hold does nothing.
    let d = env.send(&rel);
    assert!(d.effects.is_empty());
}

#[test]
fn inform_gets_options_without_an_address() {
    let mut env = Env::new(DhcpMode::Authoritative);
    let mut inf = request(STRANGER, MessageType::Inform);
    inf.set_ciaddr(ip("10.9.0.77"));
    let d = env.send(&inf);
    let (m, dest) = reply(&d);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(m.ciaddr(), ip("10.9.0.77"));
    assert_eq!(
        opt(m, 1),
        Some(&DhcpOption::SubnetMask(ip("255.255.255.0")))
    );
    assert_eq!(opt(m, 3), Some(&DhcpOption::Router(vec![ip("10.9.0.254")])));
    assert_eq!(
        opt(m, 6),
        Some(&DhcpOption::DomainNameServer(vec![ip("10.9.0.53")]))
    );
    assert_eq!(opt(m, 54), Some(&DhcpOption::ServerIdentifier(SERVER)));
    assert!(opt(m, 51).is_none() && opt(m, 58).is_none() && opt(m, 59).is_none());
    assert_eq!(
        dest,
        Destination::Unicast(SocketAddrV4::new(ip("10.9.0.77"), 68))
    );
    assert!(d.effects.is_empty());
}

#[test]
fn relayed_request_is_served_from_the_subnet_and_answered_through_the_relay() {
    let mut env = Env::new(DhcpMode::Authoritative);
    let relay = ip("10.9.0.254");
    let mut disc = request(STRANGER, MessageType::Discover);
    disc.set_giaddr(relay);
    let d = env.send(&disc);
    let (m, dest) = reply(&d);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(m.yiaddr(), ip("10.9.0.100"));
    assert_eq!(m.giaddr(), relay);
    assert_eq!(dest, Destination::Unicast(SocketAddrV4::new(relay, 67)));
    // A NAK through the relay also goes to the relay, asking it to broadcast.
    let mut bad = with(
        request(STRANGER, MessageType::Request),
        DhcpOption::RequestedIpAddress(NODE_IP),
    );
    bad.set_giaddr(relay);
    let d = env.send(&bad);
    let (m, dest) = reply(&d);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Nak));
    assert!(m.flags().broadcast());
    assert_eq!(dest, Destination::Unicast(SocketAddrV4::new(relay, 67)));
    // Relays on other subnets are refused.
    let mut other = request(STRANGER, MessageType::Discover);
    other.set_giaddr(ip("172.16.0.1"));
    assert!(ignored(&env.send(&other)).contains("outside the served subnet"));
}

#[test]
fn broadcast_flag_and_ciaddr_decide_the_destination() {
    let mut env = Env::new(DhcpMode::Authoritative);
    let mut disc = request(STRANGER, MessageType::Discover);
    disc.set_flags(Flags::default().set_broadcast());
    let d = env.send(&disc);
    let (m, dest) = reply(&d);
    assert!(m.flags().broadcast(), "flags are copied");
    assert_eq!(dest, Destination::Broadcast);
}

#[test]
fn exhausted_pool_is_silent() {
    let mut env = Env::new(DhcpMode::Authoritative);
    env.inventory.controller.pool = Some("10.9.0.100-10.9.0.101".parse().unwrap());
    for n in 1..=2 {
        let mac = MacAddr([2, 0, 0, 0, 0, n]);
        env.send(&request(mac, MessageType::Discover));
        env.send(&selecting(mac, ip(&format!("10.9.0.{}", 99 + n))));
    }
    assert!(ignored(&env.send(&request(STRANGER, MessageType::Discover))).contains("exhausted"));
    // The node still gets its static address.
    assert_eq!(
        reply(&env.send(&request(NODE_MAC, MessageType::Discover)))
            .0
            .yiaddr(),
        NODE_IP
    );
    // Without a pool, strangers get nothing.
    env.inventory.controller.pool = None;
    assert!(ignored(&env.send(&request(STRANGER, MessageType::Discover))).contains("no pool"));
}

#[test]
fn malformed_packets_never_panic() {
    let env = Env::new(DhcpMode::Authoritative);
    let mut valid = Vec::new();
    pxe(NODE_MAC, MessageType::Discover, 7)
        .encode(&mut Encoder::new(&mut valid))
        .unwrap();
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![1; 10],
        vec![0; 300],
        valid[..239].to_vec(),
        {
            let mut v = valid.clone();
            v[2] = 255; // hlen past chaddr
            v
        },
        {
            let mut v = valid.clone();
            v.truncate(245); // cut inside the options
            v
        },
    ];
    for bytes in cases {
        if let Ok(req) = options::decode(&bytes) {
            for port in [Port::Dhcp, Port::Pxe] {
                let _ = env.on(port, client68(), &req);
            }
        }
    }
}

// ---- properties ----

fn all_envs() -> Vec<Env> {
    vec![Env::new(DhcpMode::Proxy), Env::new(DhcpMode::Authoritative)]
}

fn valid_packet() -> Vec<u8> {
    let mut v = Vec::new();
    let mut m = pxe(NODE_MAC, MessageType::Request, 7);
    m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
    m.opts_mut().insert(DhcpOption::RequestedIpAddress(NODE_IP));
    m.encode(&mut Encoder::new(&mut v)).unwrap();
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
        if let Ok(req) = options::decode(&bytes) {
            for env in all_envs() {
                let _ = env.on(Port::Dhcp, client68(), &req);
                let _ = env.on(Port::Pxe, client68(), &req);
            }
        }
    }

    #[test]
    fn mutated_requests_never_panic(edits in proptest::collection::vec((0usize..400, any::<u8>()), 1..12)) {
        let mut bytes = valid_packet();
        for (at, b) in edits {
            let n = bytes.len();
            bytes[at % n] = b;
        }
        if let Ok(req) = options::decode(&bytes) {
            for env in all_envs() {
                let _ = env.on(Port::Dhcp, client68(), &req);
                let _ = env.on(Port::Pxe, client68(), &req);
            }
        }
    }
}

/// One client action in the property test.
#[derive(Debug, Clone)]
enum Act {
    Discover(usize),
    /// SELECTING: request what was offered (or any pool address).
    Select(usize, u8),
    /// INIT-REBOOT with an arbitrary address.
    Reboot(usize, u8),
    /// RENEWING with the address it has (or any).
    Renew(usize, u8),
    Release(usize),
    Decline(usize),
    Wait(u32),
}

fn act() -> impl Strategy<Value = Act> {
    let who = 0usize..6;
    prop_oneof![
        who.clone().prop_map(Act::Discover),
        (who.clone(), any::<u8>()).prop_map(|(w, a)| Act::Select(w, a)),
        (who.clone(), any::<u8>()).prop_map(|(w, a)| Act::Reboot(w, a)),
        (who.clone(), any::<u8>()).prop_map(|(w, a)| Act::Renew(w, a)),
        who.clone().prop_map(Act::Release),
        who.prop_map(Act::Decline),
        (0u32..200).prop_map(Act::Wait),
    ]
}

fn clients() -> Vec<MacAddr> {
    // Client 0 is the inventory node; the others are pool clients.
    let mut v = vec![NODE_MAC];
    v.extend((1..6).map(|i| MacAddr([2, 0, 0, 0, 0, i])));
    v
}

/// Candidate addresses: the small pool, the node's address, the controller, outside.
fn some_address(a: u8) -> Ipv4Addr {
    match a % 8 {
        0 => NODE_IP,
        1 => SERVER,
        2 => ip("10.9.0.254"),
        _ => Ipv4Addr::new(10, 9, 0, 100 + a % 5),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// However clients behave, no address is ever held by two clients at once,
    /// and what a client believes it holds (after an ACK) is never another's.
    #[test]
    fn an_address_is_never_handed_to_two_clients(acts in proptest::collection::vec(act(), 1..120)) {
        let mut env = Env::new(DhcpMode::Authoritative);
        env.inventory.controller.pool = Some("10.9.0.100-10.9.0.104".parse().unwrap());
        env.inventory.controller.lease_time = 60;
        let macs = clients();
        let mut offered: HashMap<MacAddr, Ipv4Addr> = HashMap::new();
        // What each client was ACKed and until when.
        let mut holds: HashMap<MacAddr, (Ipv4Addr, i64)> = HashMap::new();
        for a in acts {
            let (mac, req) = match a {
                Act::Wait(s) => { env.now += i64::from(s) * 1000; continue; }
                Act::Discover(w) => (macs[w], request(macs[w], MessageType::Discover)),
                Act::Select(w, a) => {
                    let want = offered.get(&macs[w]).copied().unwrap_or_else(|| some_address(a));
                    (macs[w], selecting(macs[w], want))
                }
                Act::Reboot(w, a) => (macs[w], with(request(macs[w], MessageType::Request), DhcpOption::RequestedIpAddress(some_address(a)))),
                Act::Renew(w, a) => {
                    let mut r = request(macs[w], MessageType::Request);
                    r.set_ciaddr(holds.get(&macs[w]).map(|h| h.0).unwrap_or_else(|| some_address(a)));
                    (macs[w], r)
                }
                Act::Release(w) => {
                    let Some(&(held, _)) = holds.get(&macs[w]) else { continue };
                    let mut r = request(macs[w], MessageType::Release);
                    r.set_ciaddr(held);
                    holds.remove(&macs[w]);
                    (macs[w], r)
                }
                Act::Decline(w) => {
                    let Some(&(held, _)) = holds.get(&macs[w]) else { continue };
                    holds.remove(&macs[w]);
                    (macs[w], with(request(macs[w], MessageType::Decline), DhcpOption::RequestedIpAddress(held)))
                }
            };
            let d = env.send(&req);
            if let Some((m, _)) = d.reply() {
                let y = m.yiaddr();
                match m.opts().msg_type() {
                    Some(MessageType::Offer) => { offered.insert(mac, y); }
                    Some(MessageType::Ack) => {
                        for (other, &(held, until)) in &holds {
                            prop_assert!(
                                *other == mac || held != y || until <= env.now,
                                "{y} ACKed to {mac} while {other} holds it until {until} (now {})", env.now
                            );
                        }
                        prop_assert!(y != SERVER && y != ip("10.9.0.254"));
                        prop_assert!(mac == NODE_MAC || y != NODE_IP, "a node's address went to {mac}");
                        prop_assert!(mac != NODE_MAC || y == NODE_IP);
                        let secs = match opt(m, 51) {
                            Some(DhcpOption::AddressLeaseTime(t)) => i64::from(*t),
                            other => panic!("ACK without a lease time: {other:?}"),
                        };
                        holds.insert(mac, (y, env.now + secs * 1000));
                    }
                    Some(MessageType::Nak) => { holds.remove(&mac); offered.remove(&mac); }
                    _ => {}
                }
            }
            // The table itself: one live holder per address.
            let mut live: HashMap<Ipv4Addr, MacAddr> = HashMap::new();
            for (addr, holder, kind) in env.leases.holders() {
                let info = env.leases.holder(addr);
                let is_live = match kind {
                    LeaseKind::Offered => env.leases.offered(holder, env.now).is_some_and(|o| o.ip == addr),
                    _ => env.leases.bound(holder).is_some_and(|b| b.ip == addr && b.live(env.now)),
                };
                if is_live {
                    if let Some(prev) = live.insert(addr, holder) {
                        prop_assert_eq!(prev, holder, "{} held live by two clients ({:?})", addr, info);
                    }
                }
            }
        }
    }
}
