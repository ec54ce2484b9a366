//! Netboot: the DHCP, TFTP and HTTP services that PXE firmware boots from.
//!
//! All three read the daemon's context ([`crate::context::Shared`]): the
//! current inventory and the state database where every step of a node is
//! recorded as an event.

pub mod boot;
pub mod dhcp;
pub mod http;
pub mod tftp;
pub mod wol;

pub use crate::context::Shared;
