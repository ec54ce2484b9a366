//! The installer environment: a kernel and an initramfs assembled on the
//! controller from the distribution's linux-image package (a verified
//! artifact) and the homelab binary itself, which runs as `/init` and is the
//! installer agent. Nothing is vendored: the drivers are the package's own
//! modules, picked by [`kmod::WANTED`] with their dependencies.
//!
//! The result is cached under `<state>/installer/<key>/`, the key a hash of
//! everything that goes in, so a new kernel package or a new homelab binary
//! builds a new environment and an unchanged one is reused.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::cpio::Cpio;
use super::deb;
use super::kmod::{self, ModInfo};

/// Where the agent finds its modules' load order inside the initramfs.
pub const MODULE_ORDER: &str = "etc/homelab/modules";
/// Where the modules are, inside the initramfs.
pub const MODULE_DIR: &str = "lib/modules";
/// Bumped when the layout of the initramfs changes (invalidates caches).
const LAYOUT: &str = "homelab-installer-1";

/// A built installer environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installer {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// Modules in load order.
    pub modules: Vec<String>,
    /// Wanted modules this kernel lacks.
    pub missing: Vec<String>,
}

/// Is `path` a static executable (no ELF interpreter)? The agent runs as
/// `/init` on a machine that has no libc, so only a static binary will do.
pub fn is_static_elf(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    elf_has_no_interpreter(&bytes)
        .with_context(|| format!("{} is not an ELF executable", path.display()))
}

/// Pure: parse an ELF64 little-endian header and look for PT_INTERP.
fn elf_has_no_interpreter(b: &[u8]) -> Result<bool> {
    if b.len() < 64 || &b[0..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        bail!("not a 64-bit little-endian ELF file");
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into()?) as usize;
    let phentsize = u16_at(54);
    let phnum = u16_at(56);
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let Some(ph) = b.get(at..at + 4) else {
            bail!("truncated program headers");
        };
        if u32::from_le_bytes(ph.try_into()?) == 3 {
            return Ok(false); // PT_INTERP: dynamically linked
        }
    }
    Ok(true)
}

/// The cache key of an environment built from these inputs.
pub fn cache_key(kernel_deb_sha256: &str, agent: &[u8], extra_modules: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(LAYOUT);
    h.update(kernel_deb_sha256);
    h.update(Sha256::digest(agent));
    for m in kmod::WANTED
        .iter()
        .map(|s| s.to_string())
        .chain(extra_modules.iter().cloned())
    {
        h.update(m.as_bytes());
        h.update(b"\0");
    }
    hex::encode(&h.finalize()[..12])
}

/// Build (or find in `cache_dir`) the installer from a verified kernel
/// package and the agent binary. Blocking: run it off the async runtime.
pub fn build(
    cache_dir: &Path,
    kernel_deb: &Path,
    kernel_deb_sha256: &str,
    agent: &Path,
    extra_modules: &[String],
) -> Result<Installer> {
    let agent_bytes =
        std::fs::read(agent).with_context(|| format!("reading {}", agent.display()))?;
    let is_static = elf_has_no_interpreter(&agent_bytes)
        .with_context(|| format!("{} is not an ELF executable", agent.display()))?;
    if !is_static {
        bail!(
            "{} is dynamically linked; the installer agent must be a static binary \
             (build homelab with the repository's .cargo/config.toml, which makes it static-pie)",
            agent.display()
        );
    }
    let key = cache_key(kernel_deb_sha256, &agent_bytes, extra_modules);
    let dir = cache_dir.join(&key);
    if let Some(found) = read_cached(&dir)? {
        return Ok(found);
    }

    // Pass 1: the kernel, the builtin list, and every module's modinfo.
    let mut kernel: Option<(String, Vec<u8>)> = None;
    let mut builtin = BTreeSet::new();
    let mut infos: BTreeMap<String, ModInfo> = BTreeMap::new();
    let mut paths: BTreeMap<String, String> = BTreeMap::new();
    deb::for_each_file(kernel_deb, |path, _size, r| {
        if let Some(release) = path.strip_prefix("boot/vmlinuz-") {
            let mut k = Vec::new();
            r.read_to_end(&mut k)?;
            kernel = Some((release.to_string(), k));
        } else if path.ends_with("/modules.builtin") && in_modules_dir(path) {
            let mut s = String::new();
            r.read_to_string(&mut s)?;
            builtin.extend(kmod::parse_builtin(&s));
        } else if in_modules_dir(path) {
            if let Some(name) = kmod::module_name(path) {
                let bytes = deb::read_module(path, r)?;
                infos.insert(name.clone(), kmod::modinfo(&bytes));
                paths.insert(name, path.to_string());
            }
        }
        Ok(true)
    })?;
    let (release, kernel) = kernel.with_context(|| {
        format!(
            "{} has no boot/vmlinuz-*: is it a linux-image package?",
            kernel_deb.display()
        )
    })?;
    let wanted: Vec<&str> = kmod::WANTED
        .iter()
        .copied()
        .chain(extra_modules.iter().map(String::as_str))
        .collect();
    let (order, missing) = kmod::load_order(&wanted, &infos, &builtin);

    // Pass 2: the chosen modules' bytes.
    let chosen: BTreeMap<&str, &str> = order
        .iter()
        .filter_map(|m| paths.get(m).map(|p| (p.as_str(), m.as_str())))
        .collect();
    let mut module_bytes: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    deb::for_each_file(kernel_deb, |path, _size, r| {
        if let Some(name) = chosen.get(path) {
            module_bytes.insert(name.to_string(), deb::read_module(path, r)?);
        }
        Ok(module_bytes.len() < chosen.len())
    })?;

    let tmp = tempfile_dir(cache_dir)?;
    std::fs::write(tmp.join("vmlinuz"), &kernel)?;
    let initrd = std::fs::File::create(tmp.join("initrd.img"))?;
    let gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(initrd), flate2::Compression::new(6));
    let mut cpio = Cpio::new(gz);
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "mnt",
        "etc",
        "etc/homelab",
        "lib",
        MODULE_DIR,
    ] {
        cpio.dir(d)?;
    }
    // The kernel opens /dev/console for /init's stdio before /init can mount devtmpfs.
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.file("init", 0o755, &agent_bytes)?;
    let mut listed = String::new();
    for m in &order {
        let bytes = &module_bytes[m];
        cpio.file(&format!("{MODULE_DIR}/{m}.ko"), 0o644, bytes)?;
        listed.push_str(m);
        listed.push('\n');
    }
    cpio.file(MODULE_ORDER, 0o644, listed.as_bytes())?;
    cpio.file("etc/homelab/release", 0o644, release.as_bytes())?;
    let gz = cpio.finish()?;
    gz.finish()?.flush()?;
    std::fs::write(tmp.join("release"), &release)?;
    std::fs::write(tmp.join("modules"), &listed)?;
    std::fs::write(tmp.join("missing"), missing.join("\n"))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("moving the installer into {}", dir.display()))?;
    // Older environments are obsolete once a new one is built.
    if let Ok(entries) = std::fs::read_dir(cache_dir) {
        for e in entries.flatten() {
            if e.path() != dir {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    read_cached(&dir)?.context("the installer vanished right after it was built")
}

fn in_modules_dir(path: &str) -> bool {
    path.starts_with("lib/modules/") || path.starts_with("usr/lib/modules/")
}

fn read_cached(dir: &Path) -> Result<Option<Installer>> {
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.img"));
    if !(kernel.is_file() && initrd.is_file() && dir.join("release").is_file()) {
        return Ok(None);
    }
    let lines = |f: &str| -> Vec<String> {
        std::fs::read_to_string(dir.join(f))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    };
    Ok(Some(Installer {
        kernel,
        initrd,
        release: std::fs::read_to_string(dir.join("release"))?,
        modules: lines("modules"),
        missing: lines("missing"),
    }))
}

/// A fresh build directory inside `parent` (so the final rename is atomic).
fn tempfile_dir(parent: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(parent)?;
    let dir = parent.join(format!(
        ".build-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_binary_is_static() {
        // The crate is built static (see .cargo/config.toml); the agent relies on it.
        let me = std::env::current_exe().unwrap();
        assert!(
            is_static_elf(&me).unwrap(),
            "{} is not static",
            me.display()
        );
    }

    #[test]
    fn a_dynamic_binary_is_recognised() {
        let sh = Path::new("/bin/sh");
        if sh.exists() {
            assert!(!is_static_elf(sh).unwrap());
        }
        assert!(elf_has_no_interpreter(b"#!/bin/sh\n").is_err());
    }

    #[test]
    fn the_key_changes_with_every_input() {
        let a = cache_key("aa", b"agent", &[]);
        assert_ne!(a, cache_key("ab", b"agent", &[]));
        assert_ne!(a, cache_key("aa", b"agent2", &[]));
        assert_ne!(a, cache_key("aa", b"agent", &["zram".into()]));
        assert_eq!(a, cache_key("aa", b"agent", &[]));
    }
}
