//! Lab harness for integration tests: real PXE firmware (QEMU under SeaBIOS or
//! OVMF, TCG) booting from a server that runs inside a network namespace the
//! test creates and removes itself.
//!
//! The pieces, each a guard that cleans up on drop (also while panicking):
//! - [`Netns`]: a namespace `hl-<pid>-<n>` with a bridge `br0` holding the
//!   controller address `10.N.0.1/24`; [`Netns::add_host`] plugs another
//!   namespace (a "home router", a DHCP client) into that bridge over a veth.
//! - [`Proc`]: a process started inside a namespace, output to a log file.
//! - [`Vm`]: a QEMU machine on a tap of the bridge, serial console in a file.
//! - [`assets()`]: the Debian kernel and the busybox initramfs that phones home
//!   (built and cached by `scripts/lab-assets.sh`).
//! - [`Peer`]: dnsmasq + nginx doing full PXE (the reference the netboot
//!   benchmark compares homelab against); [`PlainDhcp`]: dnsmasq handing out
//!   addresses only (the home router beside homelab's proxy mode);
//!   [`HttpServer`]: nginx serving a directory and `/phone-home`, with an
//!   access log the tests read; [`RouterAdvertiser`]: IPv6 RAs on the lab
//!   bridge, which spare iPXE a ~13 s IPv6 autoconfiguration timeout.
//!
//! Traffic never leaves the namespaces: every address is a private `10.N.0.x`
//! that exists only inside them.
//!
//! Use from a test file with `mod common;`. Lab tests start with
//! [`lab_ready`], which skips (and passes) when the machine cannot run them,
//! unless `HOMELAB_REQUIRE_LAB=1` (set by scripts/test.sh as root), where a
//! missing prerequisite fails the test.
#![allow(dead_code, unused_imports)]

pub mod assets;
pub mod lab_image;
pub mod netns;
pub mod peer;
pub mod vm;

pub mod homelab;
pub use assets::{assets, boot_cmdline, ipxe_script, Assets};
pub use lab_image::{lab_image, LabImage};
pub use netns::{Netns, Proc, Proto};
pub use peer::{HttpServer, Peer, PeerOptions, PlainDhcp, RouterAdvertiser};
pub use vm::{Firmware, NicRom, Vm, VmConfig};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Something a lab test needs from the machine.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// A program on PATH (or in /usr/sbin, /sbin).
    Tool(&'static str),
    /// A file that must exist (e.g. `/usr/lib/ipxe/undionly.kpxe`).
    File(&'static str),
    /// The firmware files for this boot mode (OVMF for UEFI, SeaBIOS for BIOS).
    Firmware(Firmware),
}

/// What every lab test needs besides root: QEMU, iproute2, taps, the tools
/// that build the boot assets.
pub const LAB_BASE: &[Need] = &[
    Need::Tool("qemu-system-x86_64"),
    Need::Tool("ip"),
    Need::Tool("busybox"),
    Need::Tool("cpio"),
    Need::Tool("gzip"),
    Need::Tool("dpkg-deb"),
    Need::File("/dev/net/tun"),
];

/// Whether the lab can run here. Prints the reason and returns false when it
/// cannot (the test should then return early and pass), unless
/// `HOMELAB_REQUIRE_LAB` is set to something other than `0`, where a missing
/// prerequisite panics. Always checks root and [`LAB_BASE`], plus `needs`.
pub fn lab_ready(test: &str, needs: &[Need]) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root (namespaces, bridges, taps)".to_string());
    }
    for need in LAB_BASE.iter().chain(needs) {
        match *need {
            Need::Tool(t) => {
                if which(t).is_none() {
                    missing.push(format!("program `{t}`"));
                }
            }
            Need::File(f) => {
                if !Path::new(f).exists() {
                    missing.push(format!("file {f}"));
                }
            }
            Need::Firmware(fw) => {
                if let Err(e) = vm::firmware_files(fw) {
                    missing.push(e);
                }
            }
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: lab prerequisites missing: {} (scripts/deps.sh installs the packages)",
        missing.join(", ")
    );
    if require_lab() {
        panic!("{msg}; HOMELAB_REQUIRE_LAB is set, so this fails instead of skipping");
    }
    // Straight to stderr, past the test harness's output capture, so the skip
    // is visible without --nocapture.
    let _ = writeln!(std::io::stderr(), "SKIP {msg}");
    false
}

/// `HOMELAB_REQUIRE_LAB` set and not `0`: lab tests must run.
pub fn require_lab() -> bool {
    std::env::var("HOMELAB_REQUIRE_LAB").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// A program's full path: PATH first, then the sbin directories (not on a
/// non-root PATH, and `ip netns exec` needs a path it can exec).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Polls `check` every `every` until it returns `Ok(Some(v))` (done), `Err`
/// (give up now), or `timeout` passes (`Err` naming `what`). Bounded always.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(every);
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs a `scripts/` build script that prints `key=value` lines and returns
/// them; Err with the end of its stderr when it fails.
pub fn keyed_script(name: &str) -> Result<std::collections::HashMap<String, String>, String> {
    let script = repo_root().join("scripts").join(name);
    let out = std::process::Command::new(which("bash").unwrap_or_else(|| "bash".into()))
        .arg(&script)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 30)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// The value of `key` printed by `script`, or an error naming both.
pub fn field(
    fields: &std::collections::HashMap<String, String>,
    script: &str,
    key: &str,
) -> Result<String, String> {
    fields
        .get(key)
        .cloned()
        .ok_or_else(|| format!("scripts/{script} printed no `{key}=`"))
}

/// The lower-case hex sha256 of a file.
pub fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// A file's contents as text ("" when it does not exist yet).
pub fn read_lossy(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
