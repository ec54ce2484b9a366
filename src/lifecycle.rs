//! A node's lifecycle as data: one pure transition function, stage × event
//! -> stage, or refused. Every stage change in the controller names the
//! event that caused it and goes through [`transition`], applied by
//! [`crate::state::State::transition`] as a compare-and-set in one
//! transaction (the stage read and the stage written in the same
//! transaction), so two actors (the daemon's services, a command, the plan)
//! cannot both win, and no code path can move a node where its lifecycle
//! does not go.
//!
//! The table, by road:
//! - netboot: pending -> booting -> booted (a custom boot profile), or
//!   booting -> installing -> rebooting -> installed (the installer);
//! - reachability: installed -> ready | unreachable;
//! - the cluster: ready -> joining -> running | cluster-failed;
//! - leaving: the inventory drops a node -> removing (it may run k3s) ->
//!   released | remove-failed -> forgotten (`homelab forget`), or straight
//!   to released (an OS but no k3s) or removed (nothing installed);
//! - re-runs: unreachable -> installed, joining | cluster-failed -> ready
//!   (retry), running -> ready (its k3s settings changed), a released,
//!   leaving or forgotten node put back -> installed.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::state::Stage;

/// What happened to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeEvent {
    /// DHCP gave it a boot program, or its iPXE script sent it to the installer.
    NetbootStarted,
    /// Its iPXE script sent it to its custom boot profile (every boot).
    ProfileRequested,
    /// Every file of its boot profile was served.
    ProfileServed,
    /// The installer fetched its plan: an install attempt began.
    /// `reinstall` is whether the user asked for a reinstall, the only way
    /// an installed disk is ever written again.
    InstallStarted { reinstall: bool },
    /// The image is on its disk and its host key pinned; it reboots.
    ImageWritten,
    /// The install attempt failed.
    InstallFailed,
    /// The OS image or the installer could not be prepared.
    MediaFailed,
    /// The installed system phoned home with the pinned host key.
    PhonedHome,
    /// The controller logged in with the pinned host key.
    Reached,
    /// The controller could not log in.
    NotReached,
    /// The cluster step began on it.
    JoinStarted,
    /// k3s runs on it and it is Ready in the cluster.
    Joined,
    /// k3s did not come up (or could not be installed).
    JoinFailed,
    /// A re-run picks up a node that stopped short after its install.
    Retry,
    /// Its k3s settings (labels, taints) changed while it ran: configure again.
    Reconfigure,
    /// Put back into the inventory with its installed OS kept.
    Readded,
    /// Taken out of the inventory.
    Dropped,
    /// It left the cluster and k3s was uninstalled.
    Left,
    /// Taking it out of the cluster failed.
    LeaveFailed,
    /// `homelab forget`: its removal is given up.
    Forgotten,
}

impl NodeEvent {
    /// Every event, for exhaustive tables.
    pub const ALL: [NodeEvent; 21] = [
        NodeEvent::NetbootStarted,
        NodeEvent::ProfileRequested,
        NodeEvent::ProfileServed,
        NodeEvent::InstallStarted { reinstall: false },
        NodeEvent::InstallStarted { reinstall: true },
        NodeEvent::ImageWritten,
        NodeEvent::InstallFailed,
        NodeEvent::MediaFailed,
        NodeEvent::PhonedHome,
        NodeEvent::Reached,
        NodeEvent::NotReached,
        NodeEvent::JoinStarted,
        NodeEvent::Joined,
        NodeEvent::JoinFailed,
        NodeEvent::Retry,
        NodeEvent::Reconfigure,
        NodeEvent::Readded,
        NodeEvent::Dropped,
        NodeEvent::Left,
        NodeEvent::LeaveFailed,
        NodeEvent::Forgotten,
    ];
}

impl fmt::Display for NodeEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            NodeEvent::NetbootStarted => "netboot-started",
            NodeEvent::ProfileRequested => "profile-requested",
            NodeEvent::ProfileServed => "profile-served",
            NodeEvent::InstallStarted { reinstall: false } => "install-started",
            NodeEvent::InstallStarted { reinstall: true } => "reinstall-started",
            NodeEvent::ImageWritten => "image-written",
            NodeEvent::InstallFailed => "install-failed",
            NodeEvent::MediaFailed => "media-failed",
            NodeEvent::PhonedHome => "phoned-home",
            NodeEvent::Reached => "reached",
            NodeEvent::NotReached => "not-reached",
            NodeEvent::JoinStarted => "join-started",
            NodeEvent::Joined => "joined",
            NodeEvent::JoinFailed => "join-failed",
            NodeEvent::Retry => "retry",
            NodeEvent::Reconfigure => "reconfigure",
            NodeEvent::Readded => "readded",
            NodeEvent::Dropped => "dropped",
            NodeEvent::Left => "left",
            NodeEvent::LeaveFailed => "leave-failed",
            NodeEvent::Forgotten => "forgotten",
        };
        f.write_str(s)
    }
}

/// A transition the lifecycle does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub from: Stage,
    pub event: NodeEvent,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} node does not take `{}`", self.from, self.event)
    }
}

impl std::error::Error for Refused {}

/// The lifecycle: where `event` takes a node that is at `from`. Pure.
pub fn transition(from: Stage, event: NodeEvent) -> Result<Stage, Refused> {
    use NodeEvent as E;
    use Stage as S;
    let to = match (event, from) {
        (E::NetbootStarted, S::Pending) => S::Booting,
        // A profile node boots its profile on every boot.
        (E::ProfileRequested, s) if s != S::Booting && !s.is_kept_out() && !s.is_gone() => {
            S::Booting
        }
        (E::ProfileServed, S::Booting) => S::Booted,
        // An installed disk is written again only on request.
        (E::InstallStarted { reinstall }, s)
            if matches!(
                s,
                S::Pending | S::Booting | S::Booted | S::Installing | S::Failed
            ) || (reinstall && s.has_installed_os()) =>
        {
            S::Installing
        }
        (E::ImageWritten, S::Installing) => S::Rebooting,
        (E::InstallFailed, S::Installing) => S::Failed,
        (E::MediaFailed, S::Pending | S::Booting | S::Booted | S::Installing | S::Failed) => {
            S::Failed
        }
        (E::PhonedHome, S::Rebooting) => S::Installed,
        (E::Reached, S::Installed) => S::Ready,
        (E::NotReached, S::Installed) => S::Unreachable,
        (E::JoinStarted, S::Ready) => S::Joining,
        (E::Joined, S::Joining) => S::Running,
        (E::JoinFailed, S::Ready | S::Joining) => S::ClusterFailed,
        (E::Retry, S::Unreachable) => S::Installed,
        (E::Retry, S::Joining | S::ClusterFailed) => S::Ready,
        (E::Reconfigure, S::Running) => S::Ready,
        (E::Readded, s) if s.is_kept_out() => S::Installed,
        (E::Dropped, s) if s.may_run_k3s() => S::Removing,
        (E::Dropped, s) if s.has_installed_os() => S::Released,
        (E::Dropped, S::Pending | S::Booting | S::Booted | S::Installing | S::Failed) => S::Removed,
        (E::Left, S::Removing) => S::Released,
        (E::LeaveFailed, S::Removing) => S::RemoveFailed,
        (E::Forgotten, S::Removing | S::RemoveFailed) => S::Forgotten,
        _ => return Err(Refused { from, event }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use NodeEvent as E;
    use Stage as S;

    /// Every allowed pair, written out. Anything not here is refused.
    const ALLOWED: &[(S, E, S)] = &[
        (S::Pending, E::NetbootStarted, S::Booting),
        (S::Pending, E::ProfileRequested, S::Booting),
        (S::Booted, E::ProfileRequested, S::Booting),
        (S::Installing, E::ProfileRequested, S::Booting),
        (S::Rebooting, E::ProfileRequested, S::Booting),
        (S::Installed, E::ProfileRequested, S::Booting),
        (S::Ready, E::ProfileRequested, S::Booting),
        (S::Unreachable, E::ProfileRequested, S::Booting),
        (S::Joining, E::ProfileRequested, S::Booting),
        (S::Running, E::ProfileRequested, S::Booting),
        (S::ClusterFailed, E::ProfileRequested, S::Booting),
        (S::Failed, E::ProfileRequested, S::Booting),
        (S::Booting, E::ProfileServed, S::Booted),
        (
            S::Pending,
            E::InstallStarted { reinstall: false },
            S::Installing,
        ),
        (
            S::Booting,
            E::InstallStarted { reinstall: false },
            S::Installing,
        ),
        (
            S::Booted,
            E::InstallStarted { reinstall: false },
            S::Installing,
        ),
        (
            S::Installing,
            E::InstallStarted { reinstall: false },
            S::Installing,
        ),
        (
            S::Failed,
            E::InstallStarted { reinstall: false },
            S::Installing,
        ),
        (
            S::Pending,
            E::InstallStarted { reinstall: true },
            S::Installing,
        ),
        (
            S::Booting,
            E::InstallStarted { reinstall: true },
            S::Installing,
        ),
        (
            S::Booted,
            E::InstallStarted { reinstall: true },
            S::Installing,
        ),
        (
            S::Installing,
            E::InstallStarted { reinstall: true },
            S::Installing,
        ),
        (
            S::Failed,
            E::InstallStarted { reinstall: true },
            S::Installing,
        ),
        (
            S::Rebooting,
            E::InstallStarted { reinstall: true },
            S::Installing,
        ),
        (
            S::Installed,
            E::InstallStarted { reinstall: true },
            S::Installing,
        ),
        (
            S::Ready,
            E::InstallStarted { reinstall: true },
            S::Installing,
        ),
        (
            S::Unreachable,
            E::InstallStarted { reinstall: true },
            S::Installing,
        ),
        (
            S::Joining,
            E::InstallStarted { reinstall: true },
            S::Installing,
        ),
        (
            S::Running,
            E::InstallStarted { reinstall: true },
            S::Installing,
        ),
        (
            S::ClusterFailed,
            E::InstallStarted { reinstall: true },
            S::Installing,
        ),
        (S::Installing, E::ImageWritten, S::Rebooting),
        (S::Installing, E::InstallFailed, S::Failed),
        (S::Pending, E::MediaFailed, S::Failed),
        (S::Booting, E::MediaFailed, S::Failed),
        (S::Booted, E::MediaFailed, S::Failed),
        (S::Installing, E::MediaFailed, S::Failed),
        (S::Failed, E::MediaFailed, S::Failed),
        (S::Rebooting, E::PhonedHome, S::Installed),
        (S::Installed, E::Reached, S::Ready),
        (S::Installed, E::NotReached, S::Unreachable),
        (S::Ready, E::JoinStarted, S::Joining),
        (S::Joining, E::Joined, S::Running),
        (S::Ready, E::JoinFailed, S::ClusterFailed),
        (S::Joining, E::JoinFailed, S::ClusterFailed),
        (S::Unreachable, E::Retry, S::Installed),
        (S::Joining, E::Retry, S::Ready),
        (S::ClusterFailed, E::Retry, S::Ready),
        (S::Running, E::Reconfigure, S::Ready),
        (S::Released, E::Readded, S::Installed),
        (S::Removing, E::Readded, S::Installed),
        (S::RemoveFailed, E::Readded, S::Installed),
        (S::Forgotten, E::Readded, S::Installed),
        (S::Joining, E::Dropped, S::Removing),
        (S::Running, E::Dropped, S::Removing),
        (S::ClusterFailed, E::Dropped, S::Removing),
        (S::Removing, E::Dropped, S::Removing),
        (S::RemoveFailed, E::Dropped, S::Removing),
        (S::Rebooting, E::Dropped, S::Released),
        (S::Installed, E::Dropped, S::Released),
        (S::Ready, E::Dropped, S::Released),
        (S::Unreachable, E::Dropped, S::Released),
        (S::Pending, E::Dropped, S::Removed),
        (S::Booting, E::Dropped, S::Removed),
        (S::Booted, E::Dropped, S::Removed),
        (S::Installing, E::Dropped, S::Removed),
        (S::Failed, E::Dropped, S::Removed),
        (S::Removing, E::Left, S::Released),
        (S::Removing, E::LeaveFailed, S::RemoveFailed),
        (S::Removing, E::Forgotten, S::Forgotten),
        (S::RemoveFailed, E::Forgotten, S::Forgotten),
    ];

    #[test]
    fn every_pair_is_allowed_as_the_table_says_or_refused() {
        let mut allowed = 0;
        for from in Stage::ALL {
            for event in NodeEvent::ALL {
                let want = ALLOWED
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event)
                    .map(|(_, _, to)| *to);
                match (transition(from, event), want) {
                    (Ok(to), Some(w)) => {
                        assert_eq!(to, w, "{from} x {event}");
                        allowed += 1;
                    }
                    (Err(r), None) => assert_eq!(r, Refused { from, event }),
                    (got, want) => panic!("{from} x {event}: got {got:?}, the table says {want:?}"),
                }
            }
        }
        assert_eq!(allowed, ALLOWED.len(), "a row of the table is duplicated");
    }

    #[test]
    fn an_installed_disk_is_written_again_only_on_request() {
        for from in Stage::ALL.into_iter().filter(|s| s.has_installed_os()) {
            assert!(transition(from, E::InstallStarted { reinstall: false }).is_err());
            assert!(transition(from, E::MediaFailed).is_err(), "{from}");
            assert_eq!(
                transition(from, E::InstallStarted { reinstall: true }),
                Ok(S::Installing)
            );
        }
    }

    #[test]
    fn a_node_out_of_the_inventory_moves_only_on_its_way_out_or_back() {
        for from in Stage::ALL.into_iter().filter(|s| s.is_gone()) {
            for event in NodeEvent::ALL {
                let ok = transition(from, event).is_ok();
                assert_eq!(
                    ok,
                    event == E::Readded && from != S::Removed,
                    "{from} x {event}"
                );
            }
        }
    }

    #[test]
    fn refusals_read_as_a_sentence() {
        let r = transition(S::Running, E::ImageWritten).unwrap_err();
        assert_eq!(
            r.to_string(),
            "a running node does not take `image-written`"
        );
    }
}
