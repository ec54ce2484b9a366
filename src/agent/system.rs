//! The installer's bare-machine chores as PID 1: mounting the kernel's
//! filesystems, loading driver modules, bringing up the network without any
//! tools (ioctls), and rebooting. Parsing the kernel command line is pure.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// `key=value` words of a kernel command line (later ones win).
pub fn parse_cmdline(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A dotted netmask's prefix length (`255.255.255.0` -> 24).
pub fn prefix_len(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    (m.leading_ones() + m.trailing_zeros() == 32).then_some(m.leading_ones() as u8)
}

/// Mount proc, sys, devtmpfs and tmpfs where a Linux userland expects them.
pub fn mount_basics() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    for (src, target, fs) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/run", "tmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
    ] {
        let _ = std::fs::create_dir_all(target);
        mount(Some(src), target, Some(fs), MsFlags::empty(), None::<&str>)
            .with_context(|| format!("mounting {fs} on {target}"))?;
    }
    Ok(())
}

/// Load the modules named in `order_file` from `dir`, in order. A module
/// that fails to load is reported and skipped (hardware it drives may be
/// absent, or it is built in); returns the messages.
pub fn load_modules(dir: &Path, order_file: &Path) -> Vec<String> {
    let mut notes = Vec::new();
    let Ok(order) = std::fs::read_to_string(order_file) else {
        notes.push(format!("no module list at {}", order_file.display()));
        return notes;
    };
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = dir.join(format!("{name}.ko"));
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                notes.push(format!("module {name}: {e}"));
                continue;
            }
        };
        match nix::kmod::finit_module(
            &file,
            &CString::default(),
            nix::kmod::ModuleInitFlags::empty(),
        ) {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(e) => notes.push(format!("module {name}: {e}")),
        }
    }
    notes
}

/// The interface whose MAC is `mac`, waiting up to `timeout` for its driver.
pub fn wait_for_interface(mac: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mac = mac.to_ascii_lowercase().replace('-', ":");
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
            for e in entries.flatten() {
                let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
                if addr.trim() == mac {
                    return Ok(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        if Instant::now() >= deadline {
            let seen: Vec<String> = std::fs::read_dir("/sys/class/net")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            bail!(
                "no network interface with MAC {mac} appeared within {timeout:?} (interfaces: {}); \
                 its driver may be missing from the installer",
                seen.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ifreq(name: &str) -> Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        bail!("interface name {name} is too long");
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(fd: i32, req: libc::c_ulong, arg: *mut libc::c_void, what: &str) -> Result<()> {
    // SAFETY: each caller passes the structure its request expects.
    let r = unsafe { libc::ioctl(fd, req as _, arg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| what.to_string());
    }
    Ok(())
}

/// Give `iface` the address `ip/mask`, bring it (and lo) up, and route via
/// `gateway` when there is one.
pub fn configure_ipv4(
    iface: &str,
    ip: Ipv4Addr,
    mask: Ipv4Addr,
    gateway: Option<Ipv4Addr>,
) -> Result<()> {
    let sock =
        std::net::UdpSocket::bind("0.0.0.0:0").context("opening a socket for interface setup")?;
    let fd = sock.as_raw_fd();
    for name in ["lo", iface] {
        let mut req = ifreq(name)?;
        ioctl(
            fd,
            libc::SIOCGIFFLAGS,
            &mut req as *mut _ as *mut _,
            "reading interface flags",
        )?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        ioctl(
            fd,
            libc::SIOCSIFFLAGS,
            &mut req as *mut _ as *mut _,
            "bringing the interface up",
        )?;
    }
    // ifr_addr and ifr_netmask are the same bytes of ifreq's union.
    for (request, value, what) in [
        (libc::SIOCSIFADDR, ip, "address"),
        (libc::SIOCSIFNETMASK, mask, "netmask"),
    ] {
        let mut req = ifreq(iface)?;
        req.ifr_ifru.ifru_addr = sockaddr(value);
        ioctl(
            fd,
            request,
            &mut req as *mut _ as *mut _,
            &format!("setting {what} {value} on {iface}"),
        )?;
    }
    if let Some(gw) = gateway.filter(|g| !g.is_unspecified()) {
        // SAFETY: rtentry is plain data; all-zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
        let dev = CString::new(iface)?;
        rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
        ioctl(
            fd,
            libc::SIOCADDRT,
            &mut rt as *mut _ as *mut _,
            &format!("adding the default route via {gw}"),
        )?;
    }
    Ok(())
}

/// Flush everything and restart the machine.
pub fn reboot() -> Result<()> {
    nix::unistd::sync();
    nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT).context("rebooting")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_words() {
        let m = parse_cmdline("initrd=initrd.img console=ttyS0 quiet homelab.plan=http://10.0.0.1:8080/install/52:54:00:00:00:01/plan?token=ab homelab.ip=10.0.0.5");
        assert_eq!(m["homelab.ip"], "10.0.0.5");
        assert_eq!(
            m["homelab.plan"],
            "http://10.0.0.1:8080/install/52:54:00:00:00:01/plan?token=ab"
        );
        assert!(!m.contains_key("quiet"));
    }

    #[test]
    fn masks() {
        assert_eq!(prefix_len("255.255.255.0".parse().unwrap()), Some(24));
        assert_eq!(prefix_len("255.255.0.0".parse().unwrap()), Some(16));
        assert_eq!(prefix_len("0.0.0.0".parse().unwrap()), Some(0));
        assert_eq!(prefix_len("255.0.255.0".parse().unwrap()), None);
    }
}
