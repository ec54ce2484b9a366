//! The daemon's context: what every service and controller loop reads and
//! writes. The current inventory (swapped atomically when the user re-runs
//! `homelab up` or reloads the daemon), the state database where every step
//! is recorded as an event, and where the install media stand.

use std::sync::{Arc, Mutex, RwLock};

use crate::install::media::MediaState;
use crate::inventory::Inventory;
use crate::state::State;

/// What every service and controller loop of the daemon reads.
#[derive(Debug)]
pub struct Shared {
    pub state: State,
    inventory: RwLock<Arc<Inventory>>,
    media: RwLock<MediaState>,
    /// The media preparation under way (generation, task): a newer one
    /// replaces it, and only the newest may publish its result.
    media_task: Mutex<(u64, Option<tokio::task::AbortHandle>)>,
}

impl Shared {
    pub fn new(state: State, inventory: Inventory) -> Arc<Shared> {
        Arc::new(Shared {
            state,
            inventory: RwLock::new(Arc::new(inventory)),
            media: RwLock::new(MediaState::NotNeeded),
            media_task: Mutex::new((0, None)),
        })
    }

    /// Where the install media stand.
    pub fn media(&self) -> MediaState {
        self.media.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_media(&self, media: MediaState) {
        *self.media.write().unwrap_or_else(|e| e.into_inner()) = media;
    }

    /// A new media preparation begins: the one under way (if any) is
    /// aborted. Returns its generation, for [`Shared::publish_media`].
    pub fn begin_media(&self) -> u64 {
        let mut task = self.media_task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = task.1.take() {
            old.abort();
        }
        task.0 += 1;
        self.set_media(MediaState::Preparing);
        task.0
    }

    /// Remember the task of preparation `generation` so that a newer one
    /// (or shutdown) can abort it.
    pub fn track_media(&self, generation: u64, handle: tokio::task::AbortHandle) {
        let mut task = self.media_task.lock().unwrap_or_else(|e| e.into_inner());
        if task.0 == generation {
            task.1 = Some(handle);
        } else {
            handle.abort();
        }
    }

    /// Publish the outcome of preparation `generation`, unless a newer one
    /// began meanwhile (then it is dropped and false returned).
    pub fn publish_media(&self, generation: u64, media: MediaState) -> bool {
        let mut task = self.media_task.lock().unwrap_or_else(|e| e.into_inner());
        if task.0 != generation {
            return false;
        }
        task.1 = None;
        self.set_media(media);
        true
    }

    /// Abort the preparation under way (the daemon is stopping).
    pub fn abort_media(&self) {
        let mut task = self.media_task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = task.1.take() {
            t.abort();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> (tempfile::TempDir, Arc<Shared>) {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        (dir, Shared::new(state, crate::testing::inventory("")))
    }

    #[tokio::test]
    async fn the_newest_media_preparation_wins_and_the_older_is_aborted() {
        let (_dir, shared) = shared();
        let first = shared.begin_media();
        let slow = tokio::spawn(std::future::pending::<()>());
        shared.track_media(first, slow.abort_handle());
        let second = shared.begin_media();
        assert!(matches!(shared.media(), MediaState::Preparing));
        // The first one was aborted when the second began...
        assert!(slow.await.unwrap_err().is_cancelled());
        // ...and whatever it would still publish is dropped.
        assert!(!shared.publish_media(first, MediaState::Failed("old".into())));
        assert!(matches!(shared.media(), MediaState::Preparing));
        assert!(shared.publish_media(second, MediaState::NotNeeded));
        assert!(matches!(shared.media(), MediaState::NotNeeded));
        // A task tracked after a newer preparation began is aborted at once.
        let third = shared.begin_media();
        let _fourth = shared.begin_media();
        let late = tokio::spawn(std::future::pending::<()>());
        shared.track_media(third, late.abort_handle());
        assert!(late.await.unwrap_err().is_cancelled());
    }

    #[tokio::test]
    async fn stopping_aborts_the_preparation_under_way() {
        let (_dir, shared) = shared();
        let generation = shared.begin_media();
        let task = tokio::spawn(std::future::pending::<()>());
        shared.track_media(generation, task.abort_handle());
        shared.abort_media();
        assert!(task.await.unwrap_err().is_cancelled());
    }
}
