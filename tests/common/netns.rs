//! Network namespaces and the processes that run inside them.
//!
//! A lab [`Netns`] is `hl-<pid>-<n>`: loopback up and a bridge `br0` holding
//! the controller address `10.N.0.1/24`, where N is picked per namespace. VMs
//! get taps on that bridge; other namespaces (hosts) get a veth into it. The
//! namespace, its bridge, taps and veths, and every process still inside it
//! are removed on drop. Namespaces left behind by a test process that died
//! (SIGKILL, no drop) are swept, with their work dirs, by the next `Netns::new`.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{read_lossy, tail, wait_until, which};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A process-wide unique small number (namespace names, taps, MACs).
pub fn unique() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A network namespace created by this test, removed on drop.
pub struct Netns {
    name: String,
    /// Second octet of the lab subnet: 10.N.0.0/24.
    net: u8,
    /// This namespace's own address on the lab subnet.
    ip: Ipv4Addr,
    /// Lab namespaces have the bridge; hosts have `eth0` into it.
    has_bridge: bool,
    /// Work directory for configs and logs (kept when the test panics).
    dir: Option<tempfile::TempDir>,
    next_tap: AtomicU32,
    next_host: AtomicU32,
}

/// The bridge every VM tap and host veth is attached to.
pub const BRIDGE: &str = "br0";

impl Netns {
    /// A lab namespace: lo up, `br0` up with `10.N.0.1/24`.
    pub fn new() -> io::Result<Netns> {
        sweep_stale();
        let n = unique();
        let pid = std::process::id();
        let net = 20 + ((pid.wrapping_mul(31).wrapping_add(n)) % 200) as u8;
        let name = format!("hl-{pid}-{n}");
        let ns = Netns::create(name, net, Ipv4Addr::new(10, net, 0, 1), true)?;
        ns.ip_cmd(&[
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
        ])?;
        // No IPv6 chatter (router solicitations, DAD) on the lab network;
        // `RouterAdvertiser` turns it back on for br0.
        let _ = ns.exec([
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]);
        ns.ip_cmd(&["addr", "add", &format!("{}/24", ns.ip), "dev", BRIDGE])?;
        ns.ip_cmd(&["link", "set", BRIDGE, "up"])?;
        Ok(ns)
    }

    fn create(name: String, net: u8, ip: Ipv4Addr, has_bridge: bool) -> io::Result<Netns> {
        run(Command::new(ip_path()).args(["netns", "add", &name]))?;
        // From here on, drop cleans up even if setup fails.
        let mut ns = Netns {
            name,
            net,
            ip,
            has_bridge,
            dir: None,
            next_tap: AtomicU32::new(0),
            next_host: AtomicU32::new(0),
        };
        ns.dir = Some(
            tempfile::Builder::new()
                .prefix(&format!("{}.", ns.name))
                .tempdir()?,
        );
        ns.ip_cmd(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This namespace's address on the lab subnet: 10.N.0.1 for the lab
    /// (the controller), the host's address for a host namespace.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Address `10.N.0.<host>` on the lab subnet.
    pub fn subnet_ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net, 0, host)
    }

    /// The lab subnet, `10.N.0.0/24`.
    pub fn subnet(&self) -> String {
        format!("10.{}.0.0/24", self.net)
    }

    /// The interface the lab subnet is on inside this namespace: `br0` in the
    /// lab, `eth0` in a host.
    pub fn interface(&self) -> &'static str {
        if self.has_bridge {
            BRIDGE
        } else {
            "eth0"
        }
    }

    /// Work directory for this namespace's configs and logs. Kept (and its
    /// path printed) when the test panics or `HOMELAB_KEEP_LAB=1`.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("netns dir").path()
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(ip_path());
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `argv` inside the namespace and returns its stdout; an error
    /// carries stderr when it exits non-zero.
    pub fn exec<I, S>(&self, argv: I) -> io::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut argv = argv.into_iter();
        let prog = argv.next().ok_or_else(|| io::Error::other("empty argv"))?;
        let mut c = self.command(prog);
        c.args(argv);
        run(&mut c)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip_cmd(&self, args: &[&str]) -> io::Result<String> {
        run(Command::new(ip_path()).args(["-n", &self.name]).args(args))
    }

    /// Starts `cmd` (built with [`Netns::command`]) as a [`Proc`] named
    /// `name`, stdin null, stdout and stderr to `<dir>/<name>.log`. The
    /// process gets SIGKILL if the spawning thread dies (PR_SET_PDEATHSIG).
    pub fn spawn(&self, name: &str, mut cmd: Command) -> io::Result<Proc> {
        let log = self.dir().join(format!("{name}.log"));
        let out = File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: only an async-signal-safe prctl between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)
            });
        }
        let child = cmd.spawn()?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    /// A new tap `tapK` attached to the bridge and up. The VM that opens it
    /// must run inside this namespace.
    pub fn add_tap(&self) -> io::Result<String> {
        if !self.has_bridge {
            return Err(io::Error::other("taps go on a lab namespace (with br0)"));
        }
        let tap = format!("tap{}", self.next_tap.fetch_add(1, Ordering::Relaxed));
        self.ip_cmd(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        self.ip_cmd(&["link", "set", &tap, "master", BRIDGE])?;
        self.ip_cmd(&["link", "set", &tap, "up"])?;
        Ok(tap)
    }

    /// Deletes a link (tap, veth) in this namespace; errors ignored.
    pub fn del_link(&self, link: &str) {
        let _ = self.ip_cmd(&["link", "del", link]);
    }

    /// Adds another address to this namespace's lab interface (`cidr` like
    /// `10.N.0.2/24`), e.g. a second server address.
    pub fn add_address(&self, cidr: &str) -> io::Result<()> {
        self.ip_cmd(&["addr", "add", cidr, "dev", self.interface()])
            .map(|_| ())
    }

    /// Another namespace plugged into this lab's bridge: a veth whose inner
    /// end is `eth0` with `10.N.0.<host>/24`. For a "home router", a DHCP
    /// client, a benchmark load generator. Removed on its own drop (and its
    /// veth goes with whichever namespace is removed first).
    pub fn add_host(&self, label: &str, host: u8) -> io::Result<Netns> {
        if !self.has_bridge {
            return Err(io::Error::other(
                "hosts attach to a lab namespace (with br0)",
            ));
        }
        let k = self.next_host.fetch_add(1, Ordering::Relaxed);
        let ip = self.subnet_ip(host);
        let h = Netns::create(format!("{}-{label}", self.name), self.net, ip, false)?;
        let veth = format!("veth{k}");
        self.ip_cmd(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &h.name,
        ])?;
        self.ip_cmd(&["link", "set", &veth, "master", BRIDGE])?;
        self.ip_cmd(&["link", "set", &veth, "up"])?;
        let _ = h.exec([
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]);
        h.ip_cmd(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        h.ip_cmd(&["link", "set", "eth0", "up"])?;
        Ok(h)
    }

    /// Pids of every process inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        ns_pids(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        let _ = Command::new(ip_path())
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(dir) = self.dir.take() {
            let keep = std::thread::panicking()
                || std::env::var("HOMELAB_KEEP_LAB").is_ok_and(|v| !v.is_empty() && v != "0");
            if keep {
                let path = dir.keep();
                eprintln!("lab {}: logs kept in {}", self.name, path.display());
            }
        }
    }
}

fn ns_pids(name: &str) -> Vec<i32> {
    Command::new(ip_path())
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILL everything inside the namespace, a bounded number of rounds.
fn kill_all_in(name: &str) {
    for _ in 0..20 {
        let pids = ns_pids(name);
        if pids.is_empty() {
            return;
        }
        for p in pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes `hl-<pid>-*` namespaces whose test process no longer exists.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("hl-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        kill_all_in(&name);
        let _ = Command::new(ip_path())
            .args(["netns", "del", &name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Its work dir too (a panicking test's kept logs have no namespace
        // left, so they are never swept).
        if let Ok(tmp) = std::fs::read_dir(std::env::temp_dir()) {
            let prefix = format!("{name}.");
            for d in tmp.flatten() {
                if d.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(d.path());
                }
            }
        }
    }
}

/// Whether `pid` exists and is not a zombie (a killed test process can
/// linger as a zombie until its parent reaps it).
fn process_alive(pid: u32) -> bool {
    let stat = read_lossy(Path::new(&format!("/proc/{pid}/stat")));
    // Format: `pid (comm) state ...`; comm may contain spaces or parens.
    match stat.rfind(')') {
        Some(i) => !matches!(
            stat[i + 1..].split_whitespace().next(),
            Some("Z" | "X") | None
        ),
        None => false,
    }
}

fn ip_path() -> PathBuf {
    which("ip").unwrap_or_else(|| PathBuf::from("ip"))
}

/// Runs a command to completion; stdout on success, an error with the
/// command line and stderr otherwise.
pub fn run(cmd: &mut Command) -> io::Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Transport for [`Proc::wait_listening`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// A process started inside a namespace; killed (SIGKILL) and reaped on drop.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pid (with `ip netns exec`, the program itself: ip execs it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Its resident memory (VmRSS) in KiB; 0 once it is gone.
    pub fn rss_kib(&self) -> u64 {
        read_lossy(Path::new(&format!("/proc/{}/status", self.pid())))
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// CPU time it has used so far, user and system, all its threads; zero
    /// once it is gone.
    pub fn cpu_time(&self) -> Duration {
        let stat = read_lossy(Path::new(&format!("/proc/{}/stat", self.pid())));
        // After `pid (comm)`: the state, ..., utime and stime as the 12th and
        // 13th fields, in USER_HZ ticks (100 per second).
        let ticks: u64 = stat.rfind(')').map_or(0, |i| {
            stat[i + 1..]
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<u64>().ok())
                .sum()
        });
        Duration::from_millis(ticks * 10)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its stdout and stderr so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// Exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Err (with the log's tail) when the process has exited.
    pub fn ensure_running(&mut self) -> Result<(), String> {
        match self.try_wait() {
            None => Ok(()),
            Some(st) => Err(format!(
                "{} exited ({st}); its log:\n{}",
                self.name,
                tail(&self.log(), 40)
            )),
        }
    }

    /// Waits until the process has a socket on `port` (LISTEN for TCP, bound
    /// for UDP) in its namespace, read from /proc/<pid>/net: no traffic sent.
    pub fn wait_listening(
        &mut self,
        proto: Proto,
        port: u16,
        timeout: Duration,
    ) -> Result<(), String> {
        let what = format!("{} to listen on {proto:?} port {port}", self.name);
        wait_until(&what, timeout, Duration::from_millis(50), || {
            self.ensure_running()?;
            Ok(listening(self.pid(), proto, port).then_some(()))
        })
    }

    /// Waits until the log contains `pattern`; Err if the process exits first.
    pub fn wait_for_log(&mut self, pattern: &str, timeout: Duration) -> Result<(), String> {
        let what = format!("`{pattern}` in {}'s log", self.name);
        wait_until(&what, timeout, Duration::from_millis(50), || {
            if self.log().contains(pattern) {
                return Ok(Some(()));
            }
            self.ensure_running()?;
            Ok(None)
        })
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Waits (bounded) for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn listening(pid: u32, proto: Proto, port: u16) -> bool {
    let files: &[&str] = match proto {
        Proto::Tcp => &["tcp", "tcp6"],
        Proto::Udp => &["udp", "udp6"],
    };
    let want = format!(":{port:04X}");
    files.iter().any(|f| {
        read_lossy(Path::new(&format!("/proc/{pid}/net/{f}")))
            .lines()
            .skip(1)
            .any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3
                    && cols[1].ends_with(&want)
                    && (proto == Proto::Udp || cols[3] == "0A")
            })
    })
}
