//! Image-based OS install, the controller's side: the installer environment
//! it assembles and serves ([`initramfs`]), the plan it hands the installer
//! agent on a node, and the reports it takes back. The agent's side is
//! [`crate::agent`]; both speak the types in [`protocol`].

pub mod cpio;
pub mod deb;
pub mod initramfs;
pub mod kmod;
pub mod media;
pub mod protocol;
pub mod reach;
pub mod seed;
