//! Wake-on-LAN: a magic packet (6 x 0xff, then the MAC 16 times) broadcast on
//! UDP port 9 out of the provisioning interface.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use anyhow::{Context, Result};

use crate::inventory::MacAddr;

/// The UDP port magic packets go to ("discard"; NICs match the payload, not the port).
pub const PORT: u16 = 9;

/// The 102-byte magic packet for `mac`. Pure.
pub fn magic_packet(mac: MacAddr) -> [u8; 102] {
    let mut p = [0xffu8; 102];
    for chunk in p[6..].chunks_exact_mut(6) {
        chunk.copy_from_slice(&mac.0);
    }
    p
}

/// Broadcast the magic packet for `mac` out of `interface` (needs root or
/// CAP_NET_RAW, for SO_BINDTODEVICE: without it the broadcast would leave by
/// whichever interface the routing table picks, not the provisioning one).
pub fn send(interface: &str, mac: MacAddr) -> Result<()> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("opening a UDP socket")?;
    socket
        .set_broadcast(true)
        .context("enabling SO_BROADCAST")?;
    bind_to_device(&socket, interface)?;
    socket
        .send_to(
            &magic_packet(mac),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, PORT),
        )
        .with_context(|| format!("sending the Wake-on-LAN packet for {mac} on {interface}"))?;
    Ok(())
}

/// Restrict a socket to one interface (SO_BINDTODEVICE).
pub fn bind_to_device(socket: &impl std::os::fd::AsFd, interface: &str) -> Result<()> {
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::BindToDevice,
        &std::ffi::OsString::from(interface),
    )
    .with_context(|| {
        format!(
            "binding to interface {interface} (does it exist? binding needs root or CAP_NET_RAW)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn magic_packet_layout() {
        let mac = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let p = magic_packet(mac);
        assert_eq!(&p[..6], &[0xff; 6]);
        for i in 0..16 {
            assert_eq!(&p[6 + i * 6..12 + i * 6], &mac.0);
        }
        let mut expected = vec![0xffu8; 6];
        for _ in 0..16 {
            expected.extend_from_slice(&[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        }
        assert_eq!(p.to_vec(), expected);
    }

    #[test]
    fn an_unknown_interface_is_a_clear_error() {
        let err = send("no-such-if0", MacAddr([0; 6])).unwrap_err();
        assert!(format!("{err:#}").contains("no-such-if0"), "{err:#}");
    }

    /// The packet leaves by the named interface and arrives as sent. Needs root
    /// (SO_BINDTODEVICE, port 9); skipped otherwise.
    #[test]
    fn the_packet_is_broadcast_on_the_interface() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let rx = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT)).unwrap();
        bind_to_device(&rx, "lo").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mac = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        send("lo", mac).unwrap();
        let mut buf = [0u8; 200];
        let (n, _) = rx.recv_from(&mut buf).expect("the magic packet");
        assert_eq!(&buf[..n], &magic_packet(mac)[..]);
    }
}
