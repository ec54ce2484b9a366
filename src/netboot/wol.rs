//! Wake-on-LAN: a magic packet (6 x 0xff, then the MAC 16 times) broadcast on
//! UDP port 9 out of the provisioning interface.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use anyhow::{Context, Result};

use crate::inventory::MacAddr;

/// The 102-byte magic packet for `mac`. Pure.
pub fn magic_packet(mac: MacAddr) -> [u8; 102] {
    let mut p = [0xffu8; 102];
    for i in 0..16 {
        p[6 + i * 6..12 + i * 6].copy_from_slice(&mac.0);
    }
    p
}

/// Broadcast the magic packet for `mac` on `interface`.
pub fn send(interface: &str, mac: MacAddr) -> Result<()> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("opening a UDP socket")?;
    socket.set_broadcast(true)?;
    bind_to_device(&socket, interface)?;
    socket
        .send_to(
            &magic_packet(mac),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 9),
        )
        .with_context(|| format!("sending the Wake-on-LAN packet on {interface}"))?;
    Ok(())
}

/// Restrict a socket to one interface (SO_BINDTODEVICE).
pub fn bind_to_device(socket: &impl std::os::fd::AsFd, interface: &str) -> Result<()> {
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::BindToDevice,
        &std::ffi::OsString::from(interface),
    )
    .with_context(|| format!("binding to interface {interface}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_packet_layout() {
        let mac = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let p = magic_packet(mac);
        assert_eq!(&p[..6], &[0xff; 6]);
        for i in 0..16 {
            assert_eq!(&p[6 + i * 6..12 + i * 6], &mac.0);
        }
    }
}
