//! homelab: a bare-metal homelab provisioning appliance.
//!
//! The binary is a thin shell over these modules, one per step of the chain:
//! inventory -> state -> plan -> netboot -> (install -> ssh -> k3s -> gitops ->
//! cloudflare -> upgrade), with `ui` rendering progress and `lab` providing
//! virtual bare metal for demos and tests.

pub mod agent;
pub mod artifacts;
pub mod cli;
pub mod context;
pub mod daemon;
pub mod install;
pub mod inventory;
pub mod k3s;
pub mod lab;
pub mod lifecycle;
pub mod logging;
pub mod netboot;
pub mod plan;
pub mod reconcile;
pub mod saga;
pub mod ssh;
pub mod state;
pub mod templates;
#[doc(hidden)]
pub mod testing;
pub mod ui;
