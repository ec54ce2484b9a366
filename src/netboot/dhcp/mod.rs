//! DHCP for network boot: proxyDHCP beside the home router (default), or an
//! authoritative server with static leases on a dedicated network.
//!
//! - [`options`]: reading PXE/HTTP-boot/iPXE clients, writing PXE options, and
//!   the panic-proof decoder for bytes off the wire.
//! - [`handler`]: the pure decision for one request ([`handle`]), with its side
//!   effects returned as data.
//! - [`pool`]: who holds which address, and the allocator.
//! - [`server`]: sockets, the receive loop, and applying effects to the state
//!   database before a reply leaves.
//! - [`writer`]: the lease writer, one commit for the leases of all the
//!   packets in flight.
//!
//! Unknown machines are never booted: they are recorded as discovered so that
//! `homelab discover` can print a stanza for them.

pub mod handler;
pub mod options;
pub mod pool;
pub mod server;
pub mod writer;

pub use handler::{handle, Binaries, Decision, Destination, Effect, Outcome, Port, RequestContext};
pub use pool::{LeaseTable, LeaseView};
pub use server::{bind, bind_with, run, serve, BindOptions, Listeners};

/// The PXE boot-server port (PXE spec 2.1): firmware asks here after a proxy offer.
pub const PXE_PORT: u16 = 4011;

#[cfg(test)]
mod tests;
