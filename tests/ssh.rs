//! The SSH client against a real OpenSSH server.
//!
//! Each test starts its own `sshd` (as root, on 127.0.0.1 and a free port,
//! in the foreground) with a fresh host key and an authorized_keys holding
//! the controller key, and kills it when the test ends, also on panic. Tests
//! that need sshd skip with a printed reason when it cannot run here (not
//! root, sshd missing), unless `HOMELAB_REQUIRE_LAB` is set, where they fail.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use homelab::ssh::{
    ConnectOptions, ControllerKey, HostKeyPin, Session, SshError, Stream, Target, Transient,
};

/// Whether sshd tests can run: root (sshd's privilege separation needs it)
/// and the OpenSSH programs. Same contract as `common::lab_ready`.
fn sshd_ready(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root (sshd runs as root)".to_string());
    }
    for tool in ["sshd", "ssh-keygen"] {
        if common::which(tool).is_none() {
            missing.push(format!("program `{tool}`"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: sshd prerequisites missing: {} (scripts/deps.sh installs openssh-server and openssh-client)",
        missing.join(", ")
    );
    if common::require_lab() {
        panic!("{msg}; HOMELAB_REQUIRE_LAB is set, so this fails instead of skipping");
    }
    eprintln!("SKIP {msg}");
    false
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn keygen(path: &Path) -> String {
    let status = Command::new(common::which("ssh-keygen").unwrap())
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "ssh-keygen failed");
    std::fs::read_to_string(path.with_extension("pub")).unwrap()
}

/// A throwaway state dir with the controller key in it.
struct Lab {
    dir: tempfile::TempDir,
    key: ControllerKey,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let key = ControllerKey::load_or_create(&dir.path().join("state")).unwrap();
        Lab { dir, key }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// An sshd's files, ready to start: its host key exists (and so the pin)
/// before the server does, as when homelab installs a node.
struct SshdSetup {
    port: u16,
    config: PathBuf,
    log: PathBuf,
    host_pub: String,
}

impl SshdSetup {
    /// Writes a host key, `authorized` as the only authorized_keys line, and
    /// the config for port `port` in `dir`. Logs at VERBOSE: at DEBUG, sshd
    /// also writes its debug lines to the session's stderr.
    fn new(dir: &Path, port: u16, authorized: &str) -> SshdSetup {
        Self::with_log_level(dir, port, authorized, "VERBOSE")
    }

    fn with_log_level(dir: &Path, port: u16, authorized: &str, level: &str) -> SshdSetup {
        std::fs::create_dir_all(dir).unwrap();
        let host_key = dir.join("host_ed25519");
        let host_pub = keygen(&host_key);
        let auth = dir.join("authorized_keys");
        std::fs::write(&auth, format!("{authorized}\n")).unwrap();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {auth}\n\
                 PidFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUseDNS no\n\
                 LogLevel {level}\n",
                hk = host_key.display(),
                auth = auth.display()
            ),
        )
        .unwrap();
        SshdSetup {
            port,
            config,
            log: dir.join("sshd.log"),
            host_pub,
        }
    }

    fn pin(&self) -> HostKeyPin {
        HostKeyPin::parse(&self.host_pub).unwrap()
    }

    /// Starts sshd in the foreground and waits (bounded) until it listens.
    fn spawn(self) -> Sshd {
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = Command::new(common::which("sshd").unwrap())
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).unwrap())
            .spawn()
            .expect("starting sshd");
        let mut sshd = Sshd { child, setup: self };
        let listening = format!("Server listening on 127.0.0.1 port {}", sshd.setup.port);
        let ready = common::wait_until(
            "sshd to listen",
            Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                if let Ok(Some(status)) = sshd.child.try_wait() {
                    return Err(format!("sshd exited with {status}"));
                }
                Ok(sshd.log_text().contains(&listening).then_some(()))
            },
        );
        if let Err(e) = ready {
            panic!("{e}; sshd log:\n{}", common::tail(&sshd.log_text(), 30));
        }
        sshd
    }
}

/// A foreground sshd; killed (and reaped) on drop, also when a test panics.
struct Sshd {
    child: Child,
    setup: SshdSetup,
}

impl Sshd {
    fn start(dir: &Path, port: u16, authorized: &str) -> Sshd {
        SshdSetup::new(dir, port, authorized).spawn()
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.setup.port))
    }

    fn pin(&self) -> HostKeyPin {
        self.setup.pin()
    }

    fn target(&self, pin: HostKeyPin) -> Target {
        Target {
            node: "node1".into(),
            addr: self.addr(),
            user: "root".into(),
            pin,
        }
    }

    fn log_text(&self) -> String {
        common::read_lossy(&self.setup.log)
    }

    /// Waits (bounded) for `needle` in the log: sshd writes it after the
    /// client has already seen the outcome.
    fn wait_log(&self, needle: &str) -> String {
        let _ = common::wait_until(
            needle,
            Duration::from_secs(5),
            Duration::from_millis(20),
            || Ok(self.log_text().contains(needle).then_some(())),
        );
        self.log_text()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fast options for tests: the defaults, with small waits.
fn quick() -> ConnectOptions {
    ConnectOptions {
        connect_timeout: Duration::from_secs(5),
        max_attempts: 3,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        total_deadline: Duration::from_secs(10),
        command_timeout: Duration::from_secs(20),
        ..ConnectOptions::default()
    }
}

/// Starts the lab and an sshd trusting its key, or None when skipping.
fn lab_with_sshd(test: &str) -> Option<(Lab, Sshd)> {
    if !sshd_ready(test) {
        return None;
    }
    let lab = Lab::new();
    let sshd = Sshd::start(&lab.path("sshd"), free_port(), &lab.key.public_openssh());
    Some((lab, sshd))
}

async fn connect(lab: &Lab, sshd: &Sshd) -> Session {
    Session::connect(&sshd.target(sshd.pin()), &lab.key, &quick())
        .await
        .unwrap_or_else(|e| panic!("{e}\nsshd log:\n{}", common::tail(&sshd.log_text(), 30)))
}

// (a)
#[tokio::test]
async fn exec_returns_output_and_status_and_streams_lines_in_order() {
    let Some((lab, sshd)) = lab_with_sshd("exec_returns_output_and_status") else {
        return;
    };
    let session = connect(&lab, &sshd).await;
    let mut lines = Vec::new();
    let result = session
        .exec(
            "echo out1; echo err1 >&2; echo out2; sleep 1; echo out3; printf partial; exit 3",
            |stream, line| lines.push((stream, line.to_string(), Instant::now())),
        )
        .await
        .unwrap();
    assert_eq!(result.status, 3);
    assert_eq!(result.stdout, "out1\nout2\nout3\npartial");
    assert_eq!(result.stderr, "err1\n");
    assert!(!result.truncated);
    let of = |s: Stream| -> Vec<&str> {
        lines
            .iter()
            .filter(|l| l.0 == s)
            .map(|l| l.1.as_str())
            .collect()
    };
    assert_eq!(of(Stream::Stdout), ["out1", "out2", "out3", "partial"]);
    assert_eq!(of(Stream::Stderr), ["err1"]);
    // Lines arrive as the command prints them, not all at its end.
    let at = |text: &str| lines.iter().find(|l| l.1 == text).unwrap().2;
    assert!(
        at("out3") - at("out2") >= Duration::from_millis(800),
        "out2 was not delivered before the sleep"
    );
    session.close().await.unwrap();
}

#[tokio::test]
async fn commands_run_concurrently_on_one_session() {
    let Some((lab, sshd)) = lab_with_sshd("commands_run_concurrently_on_one_session") else {
        return;
    };
    let session = connect(&lab, &sshd).await;
    let started = Instant::now();
    let (a, b) = tokio::join!(
        session.exec("sleep 1; echo a", |_, _| {}),
        session.exec("sleep 1; echo b", |_, _| {}),
    );
    assert_eq!(a.unwrap().stdout, "a\n");
    assert_eq!(b.unwrap().stdout, "b\n");
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "ran one after the other"
    );
    session.close().await.unwrap();
}

#[tokio::test]
async fn exec_checked_quotes_the_end_of_stderr() {
    let Some((lab, sshd)) = lab_with_sshd("exec_checked_quotes_the_end_of_stderr") else {
        return;
    };
    let session = connect(&lab, &sshd).await;
    let ok = session.exec_checked("echo fine", |_, _| {}).await.unwrap();
    assert_eq!(ok.stdout, "fine\n");
    let err = session
        .exec_checked(
            "echo noise >&2; echo 'k3s: no such unit' >&2; exit 2",
            |_, _| {},
        )
        .await
        .unwrap_err();
    match &err {
        SshError::CommandFailed {
            status,
            stderr_tail,
            ..
        } => {
            assert_eq!(*status, 2);
            assert!(stderr_tail.ends_with("k3s: no such unit"), "{stderr_tail}");
        }
        other => panic!("expected CommandFailed, got {other:?}"),
    }
    assert!(
        err.to_string().starts_with("node1: `echo noise >&2;"),
        "{err}"
    );
    session.close().await.unwrap();
}

#[tokio::test]
async fn retained_output_is_capped_but_every_line_is_streamed() {
    let Some((lab, sshd)) = lab_with_sshd("retained_output_is_capped") else {
        return;
    };
    let opts = ConnectOptions {
        max_output: 1000,
        ..quick()
    };
    let session = Session::connect(&sshd.target(sshd.pin()), &lab.key, &opts)
        .await
        .unwrap();
    let mut count = 0;
    let result = session
        .exec("seq 1 20000", |_, _| count += 1)
        .await
        .unwrap();
    assert_eq!(count, 20000);
    assert!(result.truncated);
    assert!(result.stdout.len() <= 1000);
    assert!(result.stdout.ends_with("19999\n20000\n"));
    session.close().await.unwrap();
}

// (b)
#[tokio::test]
async fn a_different_host_key_is_refused_before_authentication() {
    if !sshd_ready("a_different_host_key_is_refused") {
        return;
    }
    let lab = Lab::new();
    // At DEBUG1 sshd logs every `userauth-request`: their absence is the proof.
    let sshd = SshdSetup::with_log_level(
        &lab.path("sshd"),
        free_port(),
        &lab.key.public_openssh(),
        "DEBUG1",
    )
    .spawn();
    let other = HostKeyPin::parse(&keygen(&lab.path("other_host_key"))).unwrap();
    // A retry would take seconds: the test checks there was none.
    let opts = ConnectOptions {
        initial_backoff: Duration::from_secs(3),
        ..quick()
    };
    let started = Instant::now();
    let err = Session::connect(&sshd.target(other.clone()), &lab.key, &opts)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "retried");
    let SshError::HostKeyMismatch(m) = &err else {
        panic!("expected HostKeyMismatch, got {err:?}");
    };
    assert_eq!(m.node, "node1");
    assert_eq!(m.addr, sshd.addr());
    assert_eq!(m.expected, other.fingerprint());
    assert_eq!(m.presented, sshd.pin().fingerprint());
    let text = err.to_string();
    for want in [
        format!("node1 ({})", sshd.addr()),
        other.fingerprint(),
        sshd.pin().fingerprint(),
        "homelab reinstall node1".to_string(),
        "intercepting".to_string(),
    ] {
        assert!(text.contains(&want), "{want:?} not in:\n{text}");
    }
    assert!(other.fingerprint().starts_with("SHA256:"));

    let log = sshd.wait_log("Connection from 127.0.0.1");
    assert!(log.contains("Connection from 127.0.0.1"), "{log}");
    for never in ["userauth-request", "Accepted", "Failed publickey"] {
        assert!(
            !log.contains(never),
            "sshd saw an authentication attempt ({never}):\n{log}"
        );
    }
}

#[tokio::test]
async fn a_rejected_key_fails_at_once_and_says_so() {
    if !sshd_ready("a_rejected_key_fails_at_once") {
        return;
    }
    let lab = Lab::new();
    let stranger = keygen(&lab.path("stranger"));
    let sshd = Sshd::start(&lab.path("sshd"), free_port(), &stranger);
    let opts = ConnectOptions {
        initial_backoff: Duration::from_secs(3),
        ..quick()
    };
    let started = Instant::now();
    let err = Session::connect(&sshd.target(sshd.pin()), &lab.key, &opts)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "retried");
    assert!(
        matches!(&err, SshError::AuthRejected { user, key, .. }
            if user == "root" && *key == lab.key.fingerprint()),
        "{err:?}"
    );
    assert!(err.to_string().contains("authorized_keys"), "{err}");
}

// (c)
#[tokio::test]
async fn nothing_listening_fails_with_its_cause_after_bounded_retries() {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let lab = Lab::new();
    let pin = HostKeyPin::parse(&lab.key.public_openssh()).unwrap();
    let target = Target {
        node: "node1".into(),
        addr,
        user: "root".into(),
        pin,
    };
    let opts = ConnectOptions {
        max_attempts: 4,
        ..quick()
    };
    let started = Instant::now();
    let err = Session::connect(&target, &lab.key, &opts)
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("{err}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // 50 + 100 + 200 ms of backoff between the four attempts.
    assert!(took >= Duration::from_millis(350), "took {took:?}");
    match &err {
        SshError::Unreachable {
            cause, attempts, ..
        } => {
            assert_eq!(*cause, Transient::Refused);
            assert_eq!(*attempts, 4);
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "node1 ({addr}): connection refused after 4 attempts over 0."
        )),
        "{text}"
    );
    assert!(text.ends_with(" s: is sshd running?"), "{text}");
}

// (d)
#[tokio::test]
async fn a_retry_succeeds_when_sshd_starts_late() {
    if !sshd_ready("a_retry_succeeds_when_sshd_starts_late") {
        return;
    }
    let lab = Lab::new();
    let setup = SshdSetup::new(&lab.path("sshd"), free_port(), &lab.key.public_openssh());
    let target = Target {
        node: "node1".into(),
        addr: SocketAddr::from(([127, 0, 0, 1], setup.port)),
        user: "root".into(),
        pin: setup.pin(),
    };
    let opts = ConnectOptions {
        max_attempts: 30,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(300),
        total_deadline: Duration::from_secs(20),
        ..quick()
    };
    let started = Instant::now();
    let sshd = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(800));
        setup.spawn()
    });
    let session = Session::connect(&target, &lab.key, &opts).await;
    let sshd = sshd.await.unwrap();
    let session = session
        .unwrap_or_else(|e| panic!("{e}\nsshd log:\n{}", common::tail(&sshd.log_text(), 30)));
    assert!(started.elapsed() >= Duration::from_millis(800));
    let r = session.exec("echo up", |_, _| {}).await.unwrap();
    assert_eq!(r.stdout, "up\n");
    session.close().await.unwrap();
}

/// Collects everything `tracing` prints while a test runs on this thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// (e)
#[tokio::test]
async fn upload_writes_exact_bytes_and_mode_atomically_and_never_logs_them() {
    let Some((lab, sshd)) = lab_with_sshd("upload_writes_exact_bytes") else {
        return;
    };
    // Global, with the `log` bridge, so russh's own TRACE output (it logs
    // through `log`) is searched too; other tests' lines only add to it.
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("only this test installs a subscriber");

    let session = connect(&lab, &sshd).await;
    let secret = format!(
        "K10{:x}::server:{}",
        std::process::id(),
        "s3cr3t-join-token"
    );
    // Binary, no trailing newline, several SSH packets long.
    let mut bytes = secret.clone().into_bytes();
    bytes.extend((0..300_000u32).map(|i| (i * 7 % 256) as u8));
    let dir = lab.path("remote dir");
    std::fs::create_dir(&dir).unwrap();
    let dest = dir.join("token");
    let dest_str = dest.to_str().unwrap();

    std::fs::write(&dest, b"old").unwrap();
    let old_inode = std::fs::metadata(&dest).unwrap().ino();
    session.upload(dest_str, &bytes, 0o640).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    let meta = std::fs::metadata(&dest).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    // Replaced by a rename, not rewritten in place: readers never see a torn file.
    assert_ne!(meta.ino(), old_inode);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["token"], "temp files left behind");

    // Again with another mode and empty content.
    session.upload(dest_str, b"", 0o600).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"");
    let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o600);

    // A missing directory fails plainly and leaves nothing behind.
    let missing = lab.path("nowhere").join("token");
    let err = session
        .upload(missing.to_str().unwrap(), secret.as_bytes(), 0o600)
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::Upload { .. }), "{err:?}");
    assert!(err.to_string().contains("exited with status"), "{err}");
    assert!(!missing.exists());
    assert!(!err.to_string().contains(&secret));

    session.close().await.unwrap();
    let logs = captured.text();
    assert!(logs.contains("ssh: upload"), "no log captured:\n{logs}");
    assert!(logs.contains("russh"), "russh's log was not captured");
    assert!(!logs.contains(&secret), "the secret was logged");
    assert!(!logs.contains("s3cr3t"), "the secret was logged");
    assert!(
        !sshd.log_text().contains("s3cr3t"),
        "sshd logged the secret"
    );
}

// (f)
#[test]
fn the_controller_key_is_private_and_stable() {
    let state = tempfile::tempdir().unwrap();
    let a = ControllerKey::load_or_create(state.path()).unwrap();
    let file = std::fs::metadata(a.path()).unwrap();
    assert_eq!(file.permissions().mode() & 0o777, 0o600);
    assert!(a.path().starts_with(state.path().join("secrets")));
    let b = ControllerKey::load_or_create(state.path()).unwrap();
    assert_eq!(a.public_openssh(), b.public_openssh());
    assert_eq!(a.fingerprint(), b.fingerprint());
    let line = a.public_openssh();
    assert!(line.starts_with("ssh-ed25519 AAAA"), "{line}");
    assert!(HostKeyPin::parse(&line).is_ok());
    // Nothing that prints the key shows the private part.
    let pem = std::fs::read_to_string(a.path()).unwrap();
    assert!(pem.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    let body: String = pem.lines().nth(2).unwrap().chars().take(20).collect();
    assert!(!format!("{a:?}").contains(&body));
}

/// Whether a process whose command line is exactly `cmd` (words joined by
/// spaces) runs on this machine.
fn process_running(cmd: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim() == cmd)
            .unwrap_or(false)
    })
}

// (g)
#[tokio::test]
async fn a_command_past_its_timeout_fails_and_the_session_survives() {
    let Some((lab, sshd)) = lab_with_sshd("a_command_past_its_timeout") else {
        return;
    };
    let session = connect(&lab, &sshd).await;
    // A duration no other process here sleeps, to find it in /proc.
    let sleeper = format!("sleep {}.{}", 40 + std::process::id() % 50, 7);
    let started = Instant::now();
    let err = session
        .exec_timeout(
            &format!("echo started; {sleeper}; echo never"),
            Duration::from_secs(1),
            |_, _| {},
        )
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(
        matches!(&err, SshError::CommandTimeout { timeout, killed: true, .. }
            if *timeout == Duration::from_secs(1)),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "node1: `echo started; {sleeper}; echo never` did not finish within 1.0 s; homelab killed it"
        )
    );
    // The command's children went with it ("node" and test share a machine).
    let gone = common::wait_until(
        "the timed-out command's sleep to end",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || Ok((!process_running(&sleeper)).then_some(())),
    );
    assert!(gone.is_ok(), "`{sleeper}` still runs after the timeout");
    let r = session.exec("echo still here", |_, _| {}).await.unwrap();
    assert_eq!(r.stdout, "still here\n");
    session.close().await.unwrap();
}
