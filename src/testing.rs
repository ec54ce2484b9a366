//! Inventories for tests, benchmarks and the fuzz targets (fuzz/), built
//! through the real parser from inventory text, and DHCP requests as
//! firmware sends them.
//!
//! Text, not struct literals: a literal of `Inventory` must name every field,
//! so each new inventory key broke the literals outside the crate that no
//! build checked (the fuzz targets rotted that way), while text gets the
//! parser's defaults for keys it does not mention and is checked like a
//! user's file.
//!
//! Public because integration tests and the fuzz crate see this crate as an
//! ordinary dependency (a `cfg(test)` item is invisible to them, and a cargo
//! feature would have to be switched on by every one of them); hidden from
//! the docs because it is not part of the product. It has no dependencies of
//! its own and nothing in the binary calls it.

use std::net::Ipv4Addr;
use std::path::Path;

use dhcproto::v4::{Architecture, DhcpOption, Message, MessageType};

use crate::inventory::{parse_str, Inventory, MacAddr};

/// A valid inventory with one server `s1` (52:54:00:00:00:01, 10.0.0.11) on a
/// controller at 10.0.0.1, and `extra` appended to the file (more nodes, or
/// keys for `s1`).
pub fn inventory(extra: &str) -> Inventory {
    Builder::new().extra(extra).build()
}

/// Inventory text with a controller, a cluster, an OS image and nodes, each
/// part replaceable; [`Builder::build`] parses it.
#[derive(Debug, Clone)]
pub struct Builder {
    interface: String,
    address: String,
    controller: String,
    nodes: String,
    extra: String,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder::new()
    }
}

impl Builder {
    /// Controller `eth0` at 10.0.0.1; without [`Builder::node`], the one server `s1`.
    pub fn new() -> Builder {
        Builder {
            interface: "eth0".into(),
            address: "10.0.0.1".into(),
            controller: String::new(),
            nodes: String::new(),
            extra: String::new(),
        }
    }

    /// The controller's interface.
    pub fn interface(mut self, name: &str) -> Builder {
        self.interface = name.into();
        self
    }

    /// The controller's address.
    pub fn address(mut self, address: impl ToString) -> Builder {
        self.address = address.to_string();
        self
    }

    /// More `[controller]` keys, TOML lines such as `dhcp = "authoritative"`.
    pub fn controller(mut self, lines: &str) -> Builder {
        self.controller.push_str(lines);
        self.controller.push('\n');
        self
    }

    /// A node (the first replaces the default `s1`); `role` is "server" or "agent".
    pub fn node(
        mut self,
        name: &str,
        mac: impl ToString,
        ip: impl ToString,
        role: &str,
    ) -> Builder {
        self.nodes.push_str(&format!(
            "\n[nodes.{name}]\nmac = \"{}\"\nip = \"{}\"\nrole = \"{role}\"\n",
            mac.to_string(),
            ip.to_string()
        ));
        self
    }

    /// Text appended to the file, after the last node's keys.
    pub fn extra(mut self, text: &str) -> Builder {
        self.extra.push_str(text);
        self
    }

    /// The inventory file.
    pub fn text(&self) -> String {
        let nodes = if self.nodes.is_empty() {
            "\n[nodes.s1]\nmac = \"52:54:00:00:00:01\"\nip = \"10.0.0.11\"\nrole = \"server\"\n"
        } else {
            &self.nodes
        };
        format!(
            "[controller]\ninterface = \"{}\"\naddress = \"{}\"\n{}\n\
             [cluster]\nk3s_version = \"v1.31.4+k3s1\"\n\n\
             [os]\nimage = \"https://example.org/os.raw\"\nsha256 = \"{}\"\n{nodes}{}",
            self.interface,
            self.address,
            self.controller,
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            self.extra
        )
    }

    /// The parsed inventory (named `inventory.toml`); panics with the
    /// diagnostics if the text is invalid, which is a mistake in the test.
    pub fn build(&self) -> Inventory {
        let text = self.text();
        parse_str(&text, Path::new("inventory.toml"))
            .unwrap_or_else(|d| panic!("{d}\n{text}"))
            .inventory
    }
}

/// A DHCP request of `kind` from `mac`, as a DHCP client sends it.
pub fn dhcp_request(xid: u32, mac: MacAddr, kind: MessageType) -> Message {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(xid, z, z, z, z, &mac.0);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m
}

/// PXE firmware of architecture `arch` (option 93) with machine id `guid`:
/// the class `HTTPClient` for UEFI HTTP boot (16, 19), else `PXEClient`.
pub fn pxe_request(xid: u32, mac: MacAddr, kind: MessageType, arch: u16, guid: &[u8]) -> Message {
    let mut m = dhcp_request(xid, mac, kind);
    let class = if arch == 16 || arch == 19 {
        "HTTPClient"
    } else {
        "PXEClient"
    };
    let o = m.opts_mut();
    o.insert(DhcpOption::ClassIdentifier(
        format!("{class}:Arch:{arch:05}:UNDI:003016").into_bytes(),
    ));
    o.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(
        arch,
    )));
    o.insert(DhcpOption::ClientNetworkInterface(1, 3, 16));
    o.insert(DhcpOption::ClientMachineIdentifier(guid.to_vec()));
    m
}

/// A node record as the state would hold it: `name` at `stage`, with the
/// given role; every other field empty.
pub fn record(name: &str, role: &str, stage: crate::state::Stage) -> crate::state::NodeRecord {
    crate::state::NodeRecord {
        name: name.into(),
        mac: String::new(),
        ip: String::new(),
        role: role.into(),
        stage,
        reinstall: false,
        spec_hash: String::new(),
        bytes_done: 0,
        bytes_total: 0,
        detail: String::new(),
        stage_since_ms: 0,
        updated_ms: 0,
    }
}

/// A DHCP client's socket, as the tests' clients use it: UDP 0.0.0.0:68
/// bound to `interface`, allowed to broadcast, with `recv_buffer` bytes of
/// receive buffer when given (room for the replies of a load). Call it in
/// the client's network namespace.
pub fn dhcp_client_socket(interface: &str, recv_buffer: Option<usize>) -> std::net::UdpSocket {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("a UDP socket");
    socket::setsockopt(&fd, sockopt::Broadcast, &true).expect("SO_BROADCAST");
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    socket::setsockopt(&fd, sockopt::BindToDevice, &interface.into()).expect("SO_BINDTODEVICE");
    if let Some(bytes) = recv_buffer {
        let _ = socket::setsockopt(&fd, sockopt::RcvBufForce, &bytes);
    }
    let addr = SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68));
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).expect("binding port 68");
    std::net::UdpSocket::from(fd)
}
