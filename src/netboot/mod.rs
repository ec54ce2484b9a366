//! Netboot: the DHCP, TFTP and HTTP services that PXE firmware boots from.
//!
//! All three read the same [`Shared`] context: the current inventory (swapped
//! atomically when the user re-runs `homelab up`) and the state database where
//! every step of a node is recorded as an event.

pub mod boot;
pub mod dhcp;
pub mod http;
pub mod tftp;
pub mod wol;

use std::sync::{Arc, RwLock};

use crate::install::media::MediaState;
use crate::inventory::Inventory;
use crate::state::State;

/// What every netboot service reads.
#[derive(Debug)]
pub struct Shared {
    pub state: State,
    inventory: RwLock<Arc<Inventory>>,
    media: RwLock<MediaState>,
}

impl Shared {
    pub fn new(state: State, inventory: Inventory) -> Arc<Shared> {
        Arc::new(Shared {
            state,
            inventory: RwLock::new(Arc::new(inventory)),
            media: RwLock::new(MediaState::NotNeeded),
        })
    }

    /// Where the install media stand.
    pub fn media(&self) -> MediaState {
        self.media.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_media(&self, media: MediaState) {
        *self.media.write().unwrap_or_else(|e| e.into_inner()) = media;
    }

    /// The inventory in force now.
    pub fn inventory(&self) -> Arc<Inventory> {
        self.inventory
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Swap in a new (already validated) inventory.
    pub fn set_inventory(&self, inventory: Inventory) {
        *self.inventory.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(inventory);
    }
}
