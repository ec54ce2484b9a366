//! Reading what a client says about itself (PXE or HTTP boot firmware, iPXE,
//! architecture, GUID) and writing the PXE options of a reply.
//!
//! Also the one safe entry point for bytes off the wire: [`decode`] checks what
//! dhcproto trusts blindly (hardware address length, the magic cookie, options
//! whose length dhcproto only `debug_assert!`s) so a hostile packet is dropped
//! instead of panicking the server.

use std::fmt;
use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, HType, Message, OptionCode};
use dhcproto::{Decodable, Decoder};

use crate::inventory::MacAddr;

/// Fixed BOOTP header (236 bytes) plus the magic cookie.
const HEADER_LEN: usize = 240;
const MAGIC: [u8; 4] = [99, 130, 83, 99];

/// iPXE's "encapsulated options" (option 175): present only when the client is iPXE.
pub const IPXE_ENCAP: u8 = 175;

/// Option 43 for PXE clients: sub-option 6 (PXE_DISCOVERY_CONTROL) = 8, "use the
/// boot file name in this reply, skip boot-server discovery", then End.
pub const PXE_VENDOR_OPTIONS: [u8; 4] = [6, 1, 8, 255];

/// Why bytes off the wire were not a DHCP request we can look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeFailure {
    TooShort(usize),
    NotBootRequest(u8),
    NoMagicCookie,
    /// An option whose length dhcproto would assert on (a panic in debug builds).
    BadOptionLength {
        code: u8,
        len: usize,
    },
    Malformed(String),
}

impl fmt::Display for DecodeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeFailure::TooShort(n) => {
                write!(f, "{n} bytes is shorter than a DHCP header ({HEADER_LEN})")
            }
            DecodeFailure::NotBootRequest(op) => write!(f, "op {op} is not BOOTREQUEST"),
            DecodeFailure::NoMagicCookie => {
                f.write_str("no DHCP magic cookie (plain BOOTP or garbage)")
            }
            DecodeFailure::BadOptionLength { code, len } => {
                write!(f, "option {code} has invalid length {len}")
            }
            DecodeFailure::Malformed(e) => write!(f, "malformed: {e}"),
        }
    }
}

/// Options whose decoder in dhcproto 0.15 `debug_assert!`s a length, which
/// panics in debug builds (tests, fuzzing): rapid commit, client FQDN, client
/// network interface, bulk leasequery.
fn is_strict(code: u8) -> bool {
    matches!(code, 80 | 81 | 94 | 151..=155)
}

fn strict_length_ok(code: u8, len: usize) -> bool {
    match code {
        80 => len == 0,
        81 => len >= 3,
        94 => len == 3,
        151 => len >= 1,
        _ => len == 4,
    }
}

/// Decode a request from the wire, refusing anything dhcproto could trip over.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeFailure> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeFailure::TooShort(bytes.len()));
    }
    if bytes[0] != 1 {
        return Err(DecodeFailure::NotBootRequest(bytes[0]));
    }
    if bytes[236..240] != MAGIC {
        return Err(DecodeFailure::NoMagicCookie);
    }
    // dhcproto concatenates consecutive options with the same code (RFC 3396)
    // before decoding them, so a strict option may also appear only once.
    let mut seen = [false; 256];
    let mut i = HEADER_LEN;
    while i < bytes.len() {
        let code = bytes[i];
        match code {
            0 => i += 1,
            255 => break,
            _ => {
                // A truncated option just ends dhcproto's option parsing.
                let Some(&len) = bytes.get(i + 1) else { break };
                let len = len as usize;
                if is_strict(code) {
                    if seen[code as usize] || !strict_length_ok(code, len) {
                        return Err(DecodeFailure::BadOptionLength { code, len });
                    }
                    seen[code as usize] = true;
                }
                i += 2 + len;
            }
        }
    }
    Message::decode(&mut Decoder::new(bytes)).map_err(|e| DecodeFailure::Malformed(e.to_string()))
}

/// The client's Ethernet address, or None for anything that is not Ethernet
/// (checked before touching `chaddr()`, which slices by the untrusted `hlen`).
pub fn client_mac(req: &Message) -> Option<MacAddr> {
    if req.htype() != HType::Eth || req.hlen() != 6 {
        return None;
    }
    let c = req.chaddr();
    Some(MacAddr([c[0], c[1], c[2], c[3], c[4], c[5]]))
}

/// What kind of network-boot firmware, if any, sent a request (option 60).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootClass {
    /// Option 60 starts with "PXEClient".
    Pxe,
    /// Option 60 starts with "HTTPClient" (UEFI HTTP boot).
    Http,
    /// Anything else: an ordinary DHCP client.
    None,
}

impl BootClass {
    /// The option 60 value a reply to this client carries.
    pub fn reply_vendor_class(self) -> &'static str {
        match self {
            BootClass::Http => "HTTPClient",
            _ => "PXEClient",
        }
    }
}

/// What a client says about itself, read once per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub class: BootClass,
    /// Option 60 as sent (lossy UTF-8), for the discovered-clients list.
    pub vendor_class: String,
    /// Option 93, or the "Arch:NNNNN" field of option 60 when 93 is missing.
    pub arch: Option<u16>,
    /// Option 97 as sent, echoed back verbatim.
    pub guid: Option<Vec<u8>>,
    /// Already running iPXE (user class "iPXE" or option 175 present).
    pub ipxe: bool,
}

impl ClientInfo {
    pub fn read(req: &Message) -> ClientInfo {
        let opts = req.opts();
        let raw_class = match opts.get(OptionCode::ClassIdentifier) {
            Some(DhcpOption::ClassIdentifier(v)) => v.as_slice(),
            _ => &[],
        };
        let class = if raw_class.starts_with(b"PXEClient") {
            BootClass::Pxe
        } else if raw_class.starts_with(b"HTTPClient") {
            BootClass::Http
        } else {
            BootClass::None
        };
        let arch = match opts.get(OptionCode::ClientSystemArchitecture) {
            Some(DhcpOption::ClientSystemArchitecture(a)) => Some(u16::from(*a)),
            _ => arch_from_vendor_class(raw_class),
        };
        let guid = match opts.get(OptionCode::ClientMachineIdentifier) {
            Some(DhcpOption::ClientMachineIdentifier(g)) => Some(g.clone()),
            _ => None,
        };
        let user_class_ipxe = match opts.get(OptionCode::UserClass) {
            // iPXE sends the bare string "iPXE" (not RFC 3004 length-prefixed); others
            // may wrap it, so look for it anywhere.
            Some(DhcpOption::UserClass(v)) => v.windows(4).any(|w| w == b"iPXE"),
            _ => false,
        };
        let ipxe = user_class_ipxe || opts.contains(OptionCode::from(IPXE_ENCAP));
        ClientInfo {
            class,
            vendor_class: if class == BootClass::None {
                String::new()
            } else {
                String::from_utf8_lossy(raw_class).into_owned()
            },
            arch,
            guid,
            ipxe,
        }
    }

    /// Network-boot firmware (PXE or HTTP boot) rather than an ordinary client.
    pub fn is_netboot(&self) -> bool {
        self.class != BootClass::None
    }
}

/// "PXEClient:Arch:00007:UNDI:003016" -> 7.
fn arch_from_vendor_class(raw: &[u8]) -> Option<u16> {
    let s = std::str::from_utf8(raw).ok()?;
    let mut parts = s.split(':');
    while let Some(p) = parts.next() {
        if p == "Arch" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

/// Requested IP address (option 50).
pub fn requested_ip(req: &Message) -> Option<Ipv4Addr> {
    match req.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    }
}

/// Server identifier (option 54).
pub fn server_id(req: &Message) -> Option<Ipv4Addr> {
    match req.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}

/// Boot information added to a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo {
    /// A TFTP file name relative to the iPXE directory, or a full http:// URL.
    pub file: String,
    pub class: BootClass,
}

/// Write boot information into a reply: siaddr, sname, file, options 43, 60,
/// 67 and 97. `server` is the controller's address.
pub fn put_boot_info(reply: &mut Message, boot: &BootInfo, client: &ClientInfo, server: Ipv4Addr) {
    reply.set_siaddr(server);
    reply.set_sname_str(server.to_string());
    // The BOOTP file field holds 128 bytes; longer names travel in option 67 only.
    if boot.file.len() < 128 {
        reply.set_fname_str(&boot.file);
    }
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::ServerIdentifier(server));
    opts.insert(DhcpOption::ClassIdentifier(
        boot.class.reply_vendor_class().as_bytes().to_vec(),
    ));
    if boot.class == BootClass::Pxe {
        // UEFI HTTP boot ignores PXE vendor options; only PXE firmware gets them.
        opts.insert(DhcpOption::VendorExtensions(PXE_VENDOR_OPTIONS.to_vec()));
    }
    opts.insert(DhcpOption::BootfileName(boot.file.as_bytes().to_vec()));
    if let Some(guid) = &client.guid {
        opts.insert(DhcpOption::ClientMachineIdentifier(guid.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(options: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 240];
        b[0] = 1;
        b[1] = 1;
        b[2] = 6;
        b[236..240].copy_from_slice(&MAGIC);
        b.extend_from_slice(options);
        b
    }

    #[test]
    fn lengths_dhcproto_asserts_on_are_refused() {
        assert!(decode(&packet(&[53, 1, 1, 255])).is_ok());
        assert_eq!(
            decode(&packet(&[80, 1, 0, 255])),
            Err(DecodeFailure::BadOptionLength { code: 80, len: 1 })
        );
        assert!(decode(&packet(&[94, 2, 1, 2, 255])).is_err());
        assert!(decode(&packet(&[94, 3, 1, 2, 3, 255])).is_ok());
        assert!(
            decode(&packet(&[94, 3, 1, 2, 3, 94, 3, 1, 2, 3, 255])).is_err(),
            "concatenated"
        );
        assert!(decode(&packet(&[81, 1, 0, 255])).is_err());
        assert!(decode(&packet(&[152, 0, 255])).is_err());
        assert!(decode(&packet(&[80, 0, 255])).is_ok());
        assert!(
            decode(&packet(&[80, 0, 80, 0, 255])).is_err(),
            "repeated strict option"
        );
    }

    #[test]
    fn junk_is_refused_not_panicked_on() {
        assert!(matches!(
            decode(&[1, 2, 3]),
            Err(DecodeFailure::TooShort(3))
        ));
        let mut p = packet(&[255]);
        p[236] = 0;
        assert_eq!(decode(&p), Err(DecodeFailure::NoMagicCookie));
        let mut p = packet(&[53, 1, 1, 255]);
        p[2] = 200; // hlen beyond chaddr
        let m = decode(&p).unwrap();
        assert_eq!(client_mac(&m), None);
    }

    #[test]
    fn arch_falls_back_to_the_vendor_class() {
        assert_eq!(
            arch_from_vendor_class(b"PXEClient:Arch:00007:UNDI:003016"),
            Some(7)
        );
        assert_eq!(arch_from_vendor_class(b"PXEClient"), None);
        assert_eq!(arch_from_vendor_class(b"HTTPClient:Arch:00016"), Some(16));
    }
}
