//! The boot assets every lab machine boots: a Debian kernel and a busybox
//! initramfs whose /init gets a DHCP lease, phones home over HTTP and powers
//! off. Built and cached by scripts/lab-assets.sh (outside the repo, under
//! `${HOMELAB_CACHE:-$HOME/.cache/homelab}/lab-assets`).

use std::path::PathBuf;
use std::sync::OnceLock;

/// Printed by the initramfs when /init starts (the initramfs booted).
pub const MARK_INIT: &str = "HOMELAB-INIT start";
/// Printed when udhcpc got a lease (`HOMELAB-DHCP ok ip=<ip> mac=<mac>`).
pub const MARK_DHCP: &str = "HOMELAB-DHCP ok";
/// Printed after the phone-home request succeeded.
pub const MARK_PHONE_HOME: &str = "HOMELAB-PHONE-HOME ok";
/// Printed when the initramfs gave up (then it powers off).
pub const MARK_FAILED: &str = "HOMELAB-PHONE-HOME failed";

/// Paths of the cached kernel and initramfs.
#[derive(Clone, Debug)]
pub struct Assets {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel release, e.g. `6.1.0-56-amd64`.
    pub version: String,
    /// The linux-image package they came from.
    pub deb: PathBuf,
}

/// Builds (first call per cache, ~70 MB download) or finds the assets. Runs
/// the script once per test process; concurrent processes serialise on the
/// script's lock.
pub fn assets() -> Result<Assets, String> {
    static ASSETS: OnceLock<Result<Assets, String>> = OnceLock::new();
    ASSETS.get_or_init(build).clone()
}

fn build() -> Result<Assets, String> {
    let f = super::keyed_script("lab-assets.sh")?;
    let get = |k: &str| super::field(&f, "lab-assets.sh", k);
    let a = Assets {
        kernel: get("kernel")?.into(),
        initrd: get("initrd")?.into(),
        version: get("version")?,
        deb: get("deb")?.into(),
    };
    for p in [&a.kernel, &a.initrd, &a.deb] {
        if !p.is_file() {
            return Err(format!(
                "scripts/lab-assets.sh printed {}, which is not a file",
                p.display()
            ));
        }
    }
    Ok(a)
}

/// The kernel command line for the lab initramfs. `initrd=initrd.gz` names
/// the initrd as iPXE fetched it (the last URL component): without it a UEFI
/// kernel never sees the initrd. `panic=-1` with QEMU's `-no-reboot` makes a
/// panic end the VM at once instead of hanging until the timeout.
pub fn boot_cmdline(phone_home_url: &str) -> String {
    format!("initrd=initrd.gz console=ttyS0 quiet panic=-1 homelab.phone={phone_home_url}")
}

/// An iPXE script booting the lab assets from `base_url` (which serves
/// `vmlinuz` and `initrd.gz`), phoning home to `phone_home_url`.
pub fn ipxe_script(base_url: &str, phone_home_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    format!(
        "#!ipxe\n\
         echo homelab lab: booting ${{net0/mac}} from {base}\n\
         kernel {base}/vmlinuz {cmdline}\n\
         initrd {base}/initrd.gz\n\
         boot\n",
        cmdline = boot_cmdline(phone_home_url)
    )
}
