//! The controller's SSH client: how the install and k3s steps reach a node
//! once it runs its own OS.
//!
//! Three rules shape it:
//! - one controller key ([`ControllerKey`]), generated once and kept as a
//!   secret file, is what every node trusts;
//! - every node's host key is pinned ([`HostKeyPin`]) and checked before
//!   authentication; a different key stops the connection with
//!   [`SshError::HostKeyMismatch`], and there is no way to skip the check;
//! - output streams line by line to the caller (which records node events),
//!   every wait is bounded, and secrets travel only inside the channel
//!   ([`Session::upload`] sends file contents on stdin).
//!
//! The pure parts (pin parsing, backoff, line splitting, the upload script)
//! live in their own modules and are unit-tested; `collect` reads one
//! command's channel, `session` is the rest of the russh glue.

mod collect;
mod key;
pub mod openssh;
mod output;
mod pin;
mod retry;
mod session;
mod upload;

use std::net::SocketAddr;
use std::time::Duration;

pub use key::{ControllerKey, KEY_SECRET};
pub use output::{ExecResult, Stream};
pub use pin::{fingerprint, HostKeyPin, PinError};
pub use retry::{ConnectOptions, Transient};
pub use session::{Session, Target};

use retry::seconds;

/// The node presented a host key other than its pin. Boxed in [`SshError`]
/// because it carries four strings and is rare.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{node} ({addr}): REFUSED before authentication: the host key is not the one pinned for {node}\n  \
     expected  {expected}\n  presented {presented}\n\
     If {node} was reinstalled outside homelab, run `homelab reinstall {node}`; \
     otherwise someone may be intercepting the connection."
)]
pub struct HostKeyMismatch {
    pub node: String,
    pub addr: SocketAddr,
    /// `SHA256:...` of the pinned key.
    pub expected: String,
    /// `SHA256:...` of the key the server presented.
    pub presented: String,
}

/// Everything that can go wrong talking to a node. Each message starts with
/// the node and its address and ends with what to check, because it lands
/// in the node's event log in front of a user, not a developer.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(transparent)]
    HostKeyMismatch(Box<HostKeyMismatch>),

    #[error(
        "{node} ({addr}): sshd rejected homelab's key ({key}) for user `{user}`: the node's \
         authorized_keys does not hold it; `homelab reinstall {node}` installs it"
    )]
    AuthRejected {
        node: String,
        addr: SocketAddr,
        user: String,
        /// `SHA256:...` of the controller key.
        key: String,
    },

    #[error(
        "{node} ({addr}): {cause} after {attempts} attempt{s} over {over}: {hint}",
        s = if *attempts == 1 { "" } else { "s" },
        over = seconds(*elapsed),
        hint = cause.hint()
    )]
    Unreachable {
        node: String,
        addr: SocketAddr,
        cause: Transient,
        attempts: u32,
        elapsed: Duration,
    },

    #[error("{node} ({addr}): SSH {during} failed: {detail}")]
    Protocol {
        node: String,
        addr: SocketAddr,
        during: &'static str,
        detail: String,
    },

    #[error(
        "{node}: `{command}` did not finish within {limit}; {fate}",
        limit = seconds(*timeout),
        fate = if *killed { "homelab killed it" } else { "it may still be running on the node" }
    )]
    CommandTimeout {
        node: String,
        command: String,
        timeout: Duration,
        /// Whether the command and everything it started were killed.
        killed: bool,
    },

    #[error("{node}: `{command}` exited with status {status}{tail}",
        tail = if stderr_tail.is_empty() { String::new() } else { format!(":\n{stderr_tail}") })]
    CommandFailed {
        node: String,
        command: String,
        status: u32,
        /// The last lines of the command's stderr.
        stderr_tail: String,
    },

    #[error(
        "{node}: the connection ended before `{command}` reported an exit status \
         (node rebooted, or the network dropped)"
    )]
    NoExitStatus { node: String, command: String },

    #[error("{node}: upload to {path}: {reason}")]
    Upload {
        node: String,
        path: String,
        reason: String,
    },
}

/// A command as errors show it: its first line, shortened, so a long script
/// (or whatever a caller passed) does not flood the event log.
pub(crate) fn short_command(cmd: &str) -> String {
    const MAX: usize = 80;
    let first = cmd.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let more = cmd.trim().lines().count() > 1;
    if first.chars().count() > MAX {
        let cut: String = first.chars().take(MAX).collect();
        format!("{cut}...")
    } else if more {
        format!("{first} ...")
    } else {
        first.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "10.0.0.11:22".parse().unwrap()
    }

    #[test]
    fn unreachable_names_the_cause_and_the_fix() {
        let e = SshError::Unreachable {
            node: "node1".into(),
            addr: addr(),
            cause: Transient::Refused,
            attempts: 5,
            elapsed: Duration::from_millis(31_200),
        };
        assert_eq!(
            e.to_string(),
            "node1 (10.0.0.11:22): connection refused after 5 attempts over 31 s: is sshd running?"
        );
    }

    #[test]
    fn mismatch_names_both_fingerprints_and_what_to_do() {
        let e = SshError::HostKeyMismatch(Box::new(HostKeyMismatch {
            node: "node1".into(),
            addr: addr(),
            expected: "SHA256:aaa".into(),
            presented: "SHA256:bbb".into(),
        }));
        let text = e.to_string();
        for want in [
            "node1 (10.0.0.11:22)",
            "expected  SHA256:aaa",
            "presented SHA256:bbb",
            "run `homelab reinstall node1`",
            "someone may be intercepting the connection",
        ] {
            assert!(text.contains(want), "{want:?} not in {text}");
        }
    }

    #[test]
    fn commands_are_shortened_in_messages() {
        assert_eq!(short_command("uname -a"), "uname -a");
        assert_eq!(short_command("\nset -eu\necho hi\n"), "set -eu ...");
        let long = "x".repeat(100);
        assert_eq!(short_command(&long), format!("{}...", "x".repeat(80)));
    }
}
