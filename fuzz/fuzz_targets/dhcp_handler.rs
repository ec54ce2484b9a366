//! Arbitrary bytes through the DHCP decoder and the pure handler, in every
//! mode and on both ports, against a lease table with some history. Nothing
//! may panic, and a reply must always encode.
#![no_main]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::OnceLock;

use dhcproto::{Encodable, Encoder};
use homelab::inventory::{
    Cluster, Controller, DhcpMode, Disk, Inventory, MacAddr, Node, Os, Power, Role,
};
use homelab::netboot::dhcp::{handle, options, Binaries, LeaseTable, Port, RequestContext};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_700_000_000_000;

struct Fixture {
    inventories: Vec<Inventory>,
    leases: LeaseTable,
    binaries: Binaries,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let node = Node {
            name: "node1".into(),
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 0x11]),
            ip: Ipv4Addr::new(10, 9, 0, 11),
            role: Role::Server,
            disk: Disk::Auto,
            power: Power::default(),
            boot: None,
            reinstall: false,
        };
        let inventory = |dhcp| Inventory {
            path: "inventory.toml".into(),
            controller: Controller {
                interface: "eth0".into(),
                address: Ipv4Addr::new(10, 9, 0, 1),
                dhcp,
                http_port: 8080,
                tftp: true,
                subnet: Some("10.9.0.0/24".parse().unwrap()),
                gateway: Some(Ipv4Addr::new(10, 9, 0, 254)),
                dns: vec![Ipv4Addr::new(10, 9, 0, 53)],
                pool: Some("10.9.0.100-10.9.0.110".parse().unwrap()),
                lease_time: 3600,
                ipxe_dir: "/usr/lib/ipxe".into(),
            },
            cluster: Cluster {
                name: "lab".into(),
                domain: "home.arpa".into(),
                k3s_version: "v1.31.4+k3s1".into(),
            },
            os: Os::default(),
            nodes: BTreeMap::from([("node1".to_string(), node.clone())]),
        };
        let mut leases = LeaseTable::new();
        for i in 0..5u8 {
            let mac = MacAddr([2, 0, 0, 0, 0, i]);
            let ip = Ipv4Addr::new(10, 9, 0, 100 + i);
            match i % 3 {
                0 => leases.bind(mac, ip, NOW + 60_000, false),
                1 => leases.bind(mac, ip, NOW - 60_000, false),
                _ => leases.reserve(mac, ip, NOW + 1_000),
            }
        }
        leases.quarantine(Ipv4Addr::new(10, 9, 0, 106), NOW + 60_000);
        Fixture {
            inventories: vec![
                inventory(DhcpMode::Proxy),
                inventory(DhcpMode::Authoritative),
                inventory(DhcpMode::Off),
            ],
            leases,
            binaries: Binaries::new(["undionly.kpxe", "ipxe.efi"]),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = options::decode(data) else {
        return;
    };
    let f = fixture();
    for inventory in &f.inventories {
        for port in [Port::Dhcp, Port::Pxe] {
            let ctx = RequestContext {
                inventory,
                mode: inventory.controller.dhcp,
                port,
                source: SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, 50), 68),
                leases: &f.leases,
                binaries: &f.binaries,
                now_ms: NOW,
            };
            let decision = handle(&req, &ctx);
            if let Some((reply, _)) = decision.reply() {
                let mut out = Vec::new();
                reply
                    .encode(&mut Encoder::new(&mut out))
                    .expect("a reply always encodes");
            }
        }
    }
});
