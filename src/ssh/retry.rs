//! When to try connecting again. A node that has just rebooted into its new
//! OS refuses or drops connections for a while, so those are retried with
//! backoff; a wrong host key or a rejected key never heals by waiting, so
//! those fail at once.

use std::fmt;
use std::io;
use std::time::Duration;

/// Limits for reaching a node. Every wait is bounded: by attempts, by the
/// total deadline, and per attempt by the connect timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// One attempt (TCP connect, SSH handshake and authentication) gives up
    /// after this long; a silent node must not stall the install.
    pub connect_timeout: Duration,
    /// Idle sessions send a keepalive this often, so a node that vanished
    /// (powered off, cable pulled) is noticed instead of hanging a command.
    pub keepalive_interval: Duration,
    /// Unanswered keepalives after which the session is dropped.
    pub keepalive_max: usize,
    /// The session is dropped after this long with nothing received at all.
    pub inactivity_timeout: Duration,
    /// Attempts in total, the first included (at least 1).
    pub max_attempts: u32,
    /// The wait after the first failed attempt; doubled after each one.
    pub initial_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
    /// No attempt starts after this much time since the first one.
    pub total_deadline: Duration,
    /// How long one `exec` may run unless the caller says otherwise.
    pub command_timeout: Duration,
    /// Bytes of stdout and of stderr kept per command (the end is kept).
    pub max_output: usize,
}

impl Default for ConnectOptions {
    /// Sized for a node rebooting into its new OS: about two minutes of
    /// retries, ten seconds per attempt.
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            keepalive_max: 3,
            inactivity_timeout: Duration::from_secs(300),
            max_attempts: 12,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(15),
            total_deadline: Duration::from_secs(120),
            command_timeout: Duration::from_secs(600),
            max_output: 1 << 20,
        }
    }
}

impl ConnectOptions {
    /// The pause before the next attempt, or None when the attempts or the
    /// deadline are spent. `failed` counts the attempts made so far and
    /// `elapsed` the time since the first started.
    pub fn next_backoff(&self, failed: u32, elapsed: Duration) -> Option<Duration> {
        if failed >= self.max_attempts.max(1) {
            return None;
        }
        let doublings = failed.saturating_sub(1).min(30);
        let delay = self
            .initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff);
        (elapsed + delay < self.total_deadline).then_some(delay)
    }

    /// The time one attempt may take: the connect timeout, but never past
    /// the total deadline.
    pub fn attempt_timeout(&self, elapsed: Duration) -> Duration {
        self.connect_timeout
            .min(self.total_deadline.saturating_sub(elapsed))
            .max(Duration::from_millis(100))
    }
}

/// A failure that may go away on its own: the node is booting, sshd is
/// starting, a switch port is coming up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transient {
    Refused,
    TimedOut,
    Reset,
    NoRoute,
    /// The server hung up during the handshake (sshd still starting, or
    /// its MaxStartups limit reached).
    ClosedEarly,
}

impl Transient {
    /// Classifies a socket error; None for errors that waiting won't fix.
    pub fn from_io(e: &io::Error) -> Option<Transient> {
        use io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Some(Transient::Refused),
            K::TimedOut => Some(Transient::TimedOut),
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Some(Transient::Reset),
            K::UnexpectedEof => Some(Transient::ClosedEarly),
            K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable => {
                Some(Transient::NoRoute)
            }
            _ => None,
        }
    }

    /// What the user should check, in the words of the symptom.
    pub fn hint(self) -> &'static str {
        match self {
            Transient::Refused => "is sshd running?",
            Transient::TimedOut => "is the node powered on and reachable on this network?",
            Transient::Reset | Transient::ClosedEarly => {
                "sshd hung up: is it still starting, or limiting connections (MaxStartups)?"
            }
            Transient::NoRoute => "is the node up, and is its address right?",
        }
    }
}

impl fmt::Display for Transient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transient::Refused => "connection refused",
            Transient::TimedOut => "connection timed out",
            Transient::Reset => "connection reset",
            Transient::NoRoute => "no route to host",
            Transient::ClosedEarly => "connection closed during the SSH handshake",
        })
    }
}

/// Seconds for a message: tenths below ten seconds, whole seconds above.
pub(crate) fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.1} s")
    } else {
        format!("{} s", d.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ConnectOptions {
        ConnectOptions {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
            total_deadline: Duration::from_secs(60),
            ..ConnectOptions::default()
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let o = opts();
        let waits: Vec<_> = (1..5)
            .map(|n| o.next_backoff(n, Duration::ZERO).unwrap().as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 5]);
    }

    #[test]
    fn attempts_and_deadline_both_stop_retries() {
        let o = opts();
        assert_eq!(o.next_backoff(5, Duration::ZERO), None);
        assert_eq!(o.next_backoff(1, Duration::from_secs(59)), None);
        assert!(o.next_backoff(1, Duration::from_secs(58)).is_some());
        let once = ConnectOptions {
            max_attempts: 0,
            ..opts()
        };
        assert_eq!(once.next_backoff(1, Duration::ZERO), None);
    }

    #[test]
    fn an_attempt_never_outlives_the_deadline() {
        let o = opts();
        assert_eq!(o.attempt_timeout(Duration::ZERO), o.connect_timeout);
        assert_eq!(
            o.attempt_timeout(Duration::from_secs(57)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn socket_errors_are_classified() {
        let e = |k| io::Error::from(k);
        assert_eq!(
            Transient::from_io(&e(io::ErrorKind::ConnectionRefused)),
            Some(Transient::Refused)
        );
        assert_eq!(
            Transient::from_io(&io::Error::from_raw_os_error(libc_ehostunreach())),
            Some(Transient::NoRoute)
        );
        assert_eq!(
            Transient::from_io(&e(io::ErrorKind::PermissionDenied)),
            None
        );
    }

    fn libc_ehostunreach() -> i32 {
        nix::errno::Errno::EHOSTUNREACH as i32
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(seconds(Duration::from_millis(420)), "0.4 s");
        assert_eq!(seconds(Duration::from_millis(31_400)), "31 s");
    }
}
