//! The russh glue: connecting with retries, the host key check, running
//! commands on channels, closing. Decisions (what to retry, how to cut
//! lines, what the upload script does) live in the sibling modules.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::client::{self, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect, Preferred, SshId};
use tokio::net::TcpStream;

use super::collect::{pump, with_pid_marker, Collector};
use super::output::{ExecResult, Stream};
use super::pin::fingerprint;
use super::retry::{ConnectOptions, Transient};
use super::{short_command, upload, ControllerKey, HostKeyMismatch, HostKeyPin, SshError};

/// Where a node's sshd is and who it must be: the pin travels with the
/// address so no code path can connect without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The node's inventory name, for messages and events.
    pub node: String,
    pub addr: SocketAddr,
    pub user: String,
    pub pin: HostKeyPin,
}

/// An authenticated connection to one node. Commands may run concurrently
/// on it (each gets its own channel).
pub struct Session {
    handle: Handle<Client>,
    node: String,
    addr: SocketAddr,
    command_timeout: Duration,
    max_output: usize,
}

impl Session {
    /// Connects, checks the host key against the pin, authenticates with the
    /// controller key. Retries only what can heal by waiting (see
    /// [`Transient`]), within `opts`' attempts and deadline.
    pub async fn connect(
        target: &Target,
        key: &ControllerKey,
        opts: &ConnectOptions,
    ) -> Result<Session, SshError> {
        let config = Arc::new(client_config(opts, &target.pin));
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let limit = opts.attempt_timeout(started.elapsed());
            let cause = match attempt(target, key, Arc::clone(&config), limit).await {
                Ok(handle) => return Ok(Session::new(handle, target, opts)),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(cause)) => cause,
            };
            let Some(wait) = opts.next_backoff(attempts, started.elapsed()) else {
                return Err(SshError::Unreachable {
                    node: target.node.clone(),
                    addr: target.addr,
                    cause,
                    attempts,
                    elapsed: started.elapsed(),
                });
            };
            tracing::debug!(node = %target.node, addr = %target.addr, attempts, %cause,
                wait_ms = wait.as_millis() as u64, "ssh: not reachable yet, retrying");
            tokio::time::sleep(wait).await;
        }
    }

    fn new(handle: Handle<Client>, target: &Target, opts: &ConnectOptions) -> Session {
        tracing::info!(node = %target.node, addr = %target.addr, user = %target.user,
            host_key = %target.pin.fingerprint(), "ssh: connected");
        Session {
            handle,
            node: target.node.clone(),
            addr: target.addr,
            command_timeout: opts.command_timeout,
            max_output: opts.max_output,
        }
    }

    /// The node's name, for the caller's events.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The address connected to, for the caller's events.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the connection has ended (keepalives unanswered, node gone),
    /// so a caller holding a session can reconnect instead of failing a step.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Runs `cmd` with the session's command timeout. `on_line` sees each
    /// output line as it arrives, so the caller can record progress while
    /// the command runs. Secrets must not be put in `cmd` (it shows in the
    /// node's process list and in error messages): use [`Session::upload`].
    pub async fn exec(
        &self,
        cmd: &str,
        on_line: impl FnMut(Stream, &str),
    ) -> Result<ExecResult, SshError> {
        self.exec_timeout(cmd, self.command_timeout, on_line).await
    }

    /// [`Session::exec`] with its own time limit, for the few commands known
    /// to be slow (or that must be quick).
    pub async fn exec_timeout(
        &self,
        cmd: &str,
        timeout: Duration,
        on_line: impl FnMut(Stream, &str),
    ) -> Result<ExecResult, SshError> {
        let label = short_command(cmd);
        tracing::debug!(node = %self.node, command = %label, "ssh: exec");
        self.run(cmd, &label, None, timeout, on_line).await
    }

    /// [`Session::exec`] for steps that must succeed: a non-zero exit becomes
    /// an error quoting the end of stderr, which is usually the reason.
    pub async fn exec_checked(
        &self,
        cmd: &str,
        on_line: impl FnMut(Stream, &str),
    ) -> Result<ExecResult, SshError> {
        let result = self.exec(cmd, on_line).await?;
        if result.success() {
            return Ok(result);
        }
        Err(SshError::CommandFailed {
            node: self.node.clone(),
            command: short_command(cmd),
            status: result.status,
            stderr_tail: result.stderr_tail(10),
        })
    }

    /// Writes `bytes` to `remote_path` with `mode`, atomically, and checks
    /// the node wrote exactly these bytes (sha256). Needs only `sh`,
    /// `sha256sum`, `cat`, `chmod` and `mv` on the node. The directory must
    /// exist; the file is owned by the session's user.
    pub async fn upload(&self, remote_path: &str, bytes: &[u8], mode: u32) -> Result<(), SshError> {
        let fail = |reason: String| SshError::Upload {
            node: self.node.clone(),
            path: remote_path.to_string(),
            reason,
        };
        let script = upload::script(remote_path, mode).map_err(|e| fail(e.to_string()))?;
        let sha = upload::sha256_hex(bytes);
        let label = format!("upload to {remote_path}");
        tracing::debug!(node = %self.node, path = remote_path, bytes = bytes.len(),
            mode = format!("{mode:o}"), "ssh: upload");
        let input = upload::stdin(bytes, &sha);
        let result = self
            .run(
                &script,
                &label,
                Some(input),
                self.command_timeout,
                |_, _| {},
            )
            .await?;
        if !result.success() {
            return Err(fail(format!(
                "the node's upload script exited with status {}: {}",
                result.status,
                result.stderr_tail(5)
            )));
        }
        match upload::reported_sha(&result.stdout) {
            Some(got) if got == sha => Ok(()),
            Some(got) => Err(fail(format!(
                "the node reports sha256 {got}, but homelab sent {sha}"
            ))),
            None => Err(fail(
                "the node printed no sha256 (is sha256sum installed?)".to_string(),
            )),
        }
    }

    /// Says goodbye to sshd and waits (briefly) for the connection to end,
    /// so the node's logs show a clean disconnect rather than a reset.
    pub async fn close(self) -> Result<(), SshError> {
        let (node, addr) = (self.node.clone(), self.addr);
        let handle = self.handle;
        // An already-closed session has nobody to say goodbye to.
        let _ = handle
            .disconnect(Disconnect::ByApplication, "homelab is done", "en")
            .await;
        match tokio::time::timeout(Duration::from_secs(5), handle).await {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(ClientError::Ssh(e))) if is_hangup(&e) => Ok(()),
            Ok(Err(e)) => Err(SshError::Protocol {
                node,
                addr,
                during: "disconnect",
                detail: e.to_string(),
            }),
        }
    }

    /// Opens a channel, runs `cmd`, feeds `stdin` (then EOF) while reading
    /// output, and kills the command at `timeout`.
    async fn run(
        &self,
        cmd: &str,
        label: &str,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
        mut on_line: impl FnMut(Stream, &str),
    ) -> Result<ExecResult, SshError> {
        let channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| self.protocol("opening a channel", e))?;
        channel
            .exec(true, with_pid_marker(cmd))
            .await
            .map_err(|e| self.protocol("exec request", e))?;
        let (mut reader, writer) = channel.split();
        let mut collector = Collector::new(self.max_output);
        let io = pump(&mut reader, &writer, stdin, &mut collector, &mut on_line);
        if tokio::time::timeout(timeout, io).await.is_ok() {
            return collector.finish(&self.node, label);
        }
        let killed = match collector.pid {
            Some(pid) => self.kill_group(pid).await,
            None => false,
        };
        let _ = writer.close().await;
        Err(SshError::CommandTimeout {
            node: self.node.clone(),
            command: label.to_string(),
            timeout,
            killed,
        })
    }

    /// Kills a timed-out command's whole process group from a second
    /// channel. Closing the channel alone leaves it running (sshd sends no
    /// SIGHUP without a pty), and OpenSSH refuses `signal` requests in many
    /// setups, so a runaway install script would go on behind our back.
    async fn kill_group(&self, pid: u32) -> bool {
        let cmd = format!("kill -KILL -- -{pid} 2>/dev/null || kill -KILL {pid}");
        let kill = async {
            let mut channel = self.handle.channel_open_session().await.ok()?;
            channel.exec(true, cmd).await.ok()?;
            let _ = channel.eof().await;
            while let Some(msg) = channel.wait().await {
                if let ChannelMsg::ExitStatus { exit_status } = msg {
                    return Some(exit_status);
                }
            }
            None
        };
        let status = tokio::time::timeout(Duration::from_secs(5), kill).await;
        let killed = matches!(status, Ok(Some(0)));
        tracing::debug!(node = %self.node, pid, killed, "ssh: killed a timed-out command");
        killed
    }

    fn protocol(&self, during: &'static str, e: russh::Error) -> SshError {
        SshError::Protocol {
            node: self.node.clone(),
            addr: self.addr,
            during,
            detail: e.to_string(),
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({} at {})", self.node, self.addr)
    }
}

/// What the handler reports: russh's own errors, or our host key refusal
/// (kept apart so it is never mistaken for a network error and retried).
#[derive(Debug)]
enum ClientError {
    Ssh(russh::Error),
    HostKey(Box<PublicKey>),
}

impl From<russh::Error> for ClientError {
    fn from(e: russh::Error) -> Self {
        ClientError::Ssh(e)
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Ssh(e) => e.fmt(f),
            ClientError::HostKey(k) => write!(f, "host key {} refused", fingerprint(k)),
        }
    }
}

/// The russh handler: only the host key check, against the pin.
struct Client {
    pin: HostKeyPin,
}

impl client::Handler for Client {
    type Error = ClientError;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let presented = server_key.public_key();
        if self.pin.matches(&presented) {
            Ok(true)
        } else {
            Err(ClientError::HostKey(Box::new(presented)))
        }
    }
}

/// One attempt's outcome when it fails: retry or give up.
enum Failure {
    Transient(Transient),
    Fatal(SshError),
}

async fn attempt(
    target: &Target,
    key: &ControllerKey,
    config: Arc<client::Config>,
    limit: Duration,
) -> Result<Handle<Client>, Failure> {
    match tokio::time::timeout(limit, handshake(target, key, config)).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Transient(Transient::TimedOut)),
    }
}

async fn handshake(
    target: &Target,
    key: &ControllerKey,
    config: Arc<client::Config>,
) -> Result<Handle<Client>, Failure> {
    let tcp = TcpStream::connect(target.addr)
        .await
        .map_err(|e| classify(target, "connect", ClientError::Ssh(e.into())))?;
    let _ = tcp.set_nodelay(true);
    let client = Client {
        pin: target.pin.clone(),
    };
    let mut handle = client::connect_stream(config, tcp, client)
        .await
        .map_err(|e| classify(target, "handshake", e))?;
    let auth = handle
        .authenticate_publickey(
            target.user.clone(),
            PrivateKeyWithHashAlg::new(key.private(), None),
        )
        .await
        .map_err(|e| classify(target, "authentication", e.into()))?;
    if !auth.success() {
        return Err(Failure::Fatal(SshError::AuthRejected {
            node: target.node.clone(),
            addr: target.addr,
            user: target.user.clone(),
            key: key.fingerprint(),
        }));
    }
    Ok(handle)
}

fn classify(target: &Target, during: &'static str, e: ClientError) -> Failure {
    let e = match e {
        ClientError::HostKey(presented) => {
            return Failure::Fatal(SshError::HostKeyMismatch(Box::new(HostKeyMismatch {
                node: target.node.clone(),
                addr: target.addr,
                expected: target.pin.fingerprint(),
                presented: fingerprint(&presented),
            })))
        }
        ClientError::Ssh(e) => e,
    };
    let transient = match &e {
        russh::Error::IO(io) => Transient::from_io(io),
        russh::Error::Disconnect | russh::Error::HUP => Some(Transient::ClosedEarly),
        russh::Error::ConnectionTimeout => Some(Transient::TimedOut),
        _ => None,
    };
    match transient {
        Some(t) => Failure::Transient(t),
        None => Failure::Fatal(SshError::Protocol {
            node: target.node.clone(),
            addr: target.addr,
            during,
            detail: e.to_string(),
        }),
    }
}

fn is_hangup(e: &russh::Error) -> bool {
    matches!(
        e,
        russh::Error::Disconnect | russh::Error::HUP | russh::Error::SendError
    ) || matches!(e, russh::Error::IO(io) if Transient::from_io(io).is_some())
}

/// The russh client configuration: keepalives and inactivity from `opts`,
/// and the pinned key's algorithm offered first so a node with several host
/// keys presents the pinned one.
fn client_config(opts: &ConnectOptions, pin: &HostKeyPin) -> client::Config {
    let pinned = pin.algorithm();
    let mut keys = vec![pinned.clone()];
    keys.extend(
        Preferred::DEFAULT
            .key
            .iter()
            .filter(|a| **a != pinned)
            .cloned(),
    );
    client::Config {
        client_id: SshId::Standard(Cow::Borrowed(concat!(
            "SSH-2.0-homelab_",
            env!("CARGO_PKG_VERSION")
        ))),
        keepalive_interval: Some(opts.keepalive_interval),
        keepalive_max: opts.keepalive_max,
        inactivity_timeout: Some(opts.inactivity_timeout),
        nodelay: true,
        preferred: Preferred {
            key: Cow::Owned(keys),
            ..Preferred::DEFAULT
        },
        ..client::Config::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_can_be_shared_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Session>();
    }

    #[test]
    fn the_pinned_algorithm_is_offered_first() {
        let ecdsa = HostKeyPin::parse("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBESRVHIDjAML3FeXW0d5Q1+zO3qwlRLv1RfYbRKY++E4tu3tpMHl3uRlavMHZ3aL5vaR8cEOf/7cY/mEb3MpyQM=").unwrap();
        let config = client_config(&ConnectOptions::default(), &ecdsa);
        assert_eq!(config.preferred.key[0], ecdsa.algorithm());
        let n = config
            .preferred
            .key
            .iter()
            .filter(|a| **a == ecdsa.algorithm())
            .count();
        assert_eq!(n, 1);
        assert_eq!(config.preferred.key.len(), Preferred::DEFAULT.key.len());
    }
}
