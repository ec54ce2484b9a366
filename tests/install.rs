//! The install protocol end to end without a virtual machine: the real
//! daemon (`homelab serve`, in a network namespace) verifies the image and builds the
//! installer from the distribution's kernel package; the real agent
//! (`homelab agent`, the code that runs as the installer's /init) fetches
//! its one-time plan and writes a GPT disk image onto a file standing in for
//! the disk; the result is checked with sfdisk and debugfs. Needs root (the
//! agent mounts the installed root through a loop device) and the lab assets.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::homelab::{find_event, install_inventory, installer_plan_url, HTTP_PORT};
use homelab::state::{Stage, State};

const MAC: &str = "52:54:00:42:00:01";
const OLD_KEY: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ old-image-key";

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_homelab")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A small bootable-looking OS image: GPT with BIOS boot, ESP and a root
/// partition (ext4 with /etc/os-release and an old SSH host key), zstd-compressed.
fn os_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
    std::fs::write(root.join("etc/os-release"), "ID=debian\nVERSION_ID=12\n").unwrap();
    std::fs::write(root.join("etc/ssh/ssh_host_rsa_key.pub"), OLD_KEY).unwrap();
    std::fs::write(root.join("etc/hostname"), "image\n").unwrap();
    let rootfs = dir.join("root.ext4");
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-L", "root", "-d"])
        .arg(&root)
        .arg(&rootfs)
        .arg("24M"));
    let raw = dir.join("image.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let mut sf = Command::new("sfdisk")
        .args(["-q"])
        .arg(&raw)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sf.stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nstart=2048,size=2048,type=21686148-6449-6E6F-744E-656564454649\nsize=8MiB,type=U\nsize=24MiB,type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709\n")
        .unwrap();
    assert!(sf.wait().unwrap().success());
    // Partition 3 starts at 2048 + 2048 + 16384 sectors.
    run(Command::new("dd")
        .arg(format!("if={}", rootfs.display()))
        .arg(format!("of={}", raw.display()))
        .args(["bs=512", "seek=20480", "conv=notrunc", "status=none"]));
    let bytes = std::fs::read(&raw).unwrap();
    let packed = dir.join("image.raw.zst");
    std::fs::write(&packed, zstd::encode_all(&bytes[..], 3).unwrap()).unwrap();
    (packed, bytes)
}

struct Daemon {
    child: Child,
    dir: PathBuf,
    port: u16,
    /// The daemon, the agent and every client run in this namespace, so the
    /// controller's SSH probe of the node's address never leaves it.
    ns: common::Netns,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(dir: &Path, image: &Path, image_sha: &str, deb: &Path) -> Daemon {
        let ns = common::Netns::new().unwrap();
        let port = HTTP_PORT;
        let inv = install_inventory(&ns, port, MAC, image, image_sha, deb);
        std::fs::write(dir.join("inventory.toml"), inv).unwrap();
        let child = ns
            .command(exe())
            .arg("-i")
            .arg(dir.join("inventory.toml"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
            .spawn()
            .unwrap();
        Daemon {
            child,
            dir: dir.to_path_buf(),
            port,
            ns,
        }
    }

    fn state(&self) -> State {
        State::open(&self.dir.join("state")).unwrap()
    }

    fn get(&self, path: &str) -> (u16, String) {
        let out = self
            .ns
            .command("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "20"])
            .arg(format!("{}{path}", self.base_url()))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Wait for a daemon-wide event; panics with the log on timeout.
    fn wait_event(&mut self, kinds: &[&str], limit: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the daemon exited ({status}):\n{}",
                    common::read_lossy(&self.dir.join("serve.log"))
                );
            }
            if let Some(e) = find_event(&self.dir.join("state"), kinds) {
                return e;
            }
            assert!(
                start.elapsed() < limit,
                "no {kinds:?} event in {limit:?}; daemon log:\n{}",
                common::read_lossy(&self.dir.join("serve.log"))
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}:{}", self.ns.ip(), self.port)
    }

    /// `program` inside the daemon's namespace.
    fn command(&self, program: &str) -> Command {
        self.ns.command(program)
    }

    /// The plan URL of a fresh installer script, as iPXE would expand it.
    fn plan_url(&self) -> String {
        let (code, script) = self.get(&format!("/boot/{MAC}.ipxe"));
        assert_eq!(code, 200);
        installer_plan_url(&self.ns, &script)
            .unwrap_or_else(|| panic!("no installer in the script:\n{script}"))
    }
}

fn ready(test: &str) -> Option<common::Assets> {
    if !common::lab_ready(
        test,
        &[
            common::Need::Tool("sfdisk"),
            common::Need::Tool("debugfs"),
            common::Need::Tool("curl"),
        ],
    ) {
        return None;
    }
    Some(common::assets().expect("lab assets"))
}

/// `cat` a file out of the ext4 partition `part` (1-based) of a GPT disk image.
fn debugfs_cat(disk: &Path, part: usize, file: &str) -> String {
    let dump = run(Command::new("sfdisk").arg("-J").arg(disk));
    let json: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    let p = &json["partitiontable"]["partitions"][part - 1];
    let (start, size) = (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap());
    let img = disk.with_extension(format!("p{part}"));
    run(Command::new("dd")
        .arg(format!("if={}", disk.display()))
        .arg(format!("of={}", img.display()))
        .arg(format!("skip={start}"))
        .arg(format!("count={}", size.min(64 * 2048)))
        .args(["bs=512", "status=none"]));
    let out = run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {file}"))
        .arg(&img));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_agent_installs_an_image_onto_a_disk_and_the_controller_pins_its_host_key() {
    let Some(assets) =
        ready("the_agent_installs_an_image_onto_a_disk_and_the_controller_pins_its_host_key")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (image, raw) = os_image(tmp.path());
    let mut d = Daemon::start(
        tmp.path(),
        &image,
        &common::sha256_file(&image),
        &assets.deb,
    );
    let ready = d.wait_event(
        &["install.media-ready", "install.media-failed"],
        Duration::from_secs(240),
    );
    assert!(ready.starts_with("install.media-ready"), "{ready}");

    // The disk held an older system: refused without a reinstall request.
    let disk = tmp.path().join("disk.img");
    std::fs::write(&disk, &raw[..4 << 20]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let before = common::sha256_file(&disk);
    let out = d
        .command(exe())
        .arg("agent")
        .arg(d.plan_url())
        .arg("--disk")
        .arg(&disk)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("holds a GPT partition table") && err.contains("homelab reinstall node1"),
        "{err}"
    );
    assert_eq!(
        common::sha256_file(&disk),
        before,
        "a refused disk is not touched"
    );
    assert_eq!(
        d.state().node("node1").unwrap().unwrap().stage,
        Stage::Failed
    );

    // An empty disk: installed.
    std::fs::remove_file(&disk).unwrap();
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let url = d.plan_url();
    let out = d
        .command(exe())
        .arg("agent")
        .arg(&url)
        .arg("--disk")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "agent failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = d.state();
    let node = st.node("node1").unwrap().unwrap();
    assert_eq!(node.stage, Stage::Rebooting, "{}", node.detail);
    let pinned = st.host_key("node1").unwrap().expect("a pinned host key");
    assert!(pinned.starts_with("ssh-ed25519 "), "{pinned}");

    // The token was one-time.
    let (code, _) = d.get(
        url.split_once(&d.ns.ip().to_string())
            .map(|(_, p)| p.split_once('/').unwrap().1)
            .map(|p| format!("/{p}"))
            .as_deref()
            .unwrap(),
    );
    assert_eq!(code, 409, "an installed node gets no second plan");

    // The partition table is valid and grown to the disk; the image is there.
    let verify = run(Command::new("sfdisk").arg("--verify").arg(&disk));
    assert!(String::from_utf8_lossy(&verify.stdout).contains("No errors detected"));
    let dump: serde_json::Value =
        serde_json::from_slice(&run(Command::new("sfdisk").arg("-J").arg(&disk)).stdout).unwrap();
    let p3 = &dump["partitiontable"]["partitions"][2];
    let end = p3["start"].as_u64().unwrap() + p3["size"].as_u64().unwrap();
    assert!(
        end > (120 << 20) / 512,
        "partition 3 ends at sector {end}: not grown"
    );
    let written = std::fs::read(&disk).unwrap();
    assert_eq!(
        written[1 << 20..(20480 * 512)],
        raw[1 << 20..(20480 * 512)],
        "the image body"
    );

    // Inside the root: the seed, the controller's key, the new host key, no old key.
    let user_data = debugfs_cat(&disk, 3, "/var/lib/cloud/seed/nocloud/user-data");
    assert!(
        user_data.starts_with("#cloud-config") && user_data.contains("ssh_deletekeys: false"),
        "{user_data}"
    );
    assert!(user_data.contains("hostname: node1") && user_data.contains("fqdn: node1.lab.example"));
    assert!(user_data.contains(&format!("url: {}/phone-home/{MAC}", d.base_url())));
    let network = debugfs_cat(&disk, 3, "/var/lib/cloud/seed/nocloud/network-config");
    assert!(
        network.contains(&format!("addresses: [{}/24]", d.ns.subnet_ip(11)))
            && network.contains(MAC),
        "{network}"
    );
    let host_pub = debugfs_cat(&disk, 3, "/etc/ssh/ssh_host_ed25519_key.pub");
    assert_eq!(host_pub.trim(), pinned);
    assert!(
        debugfs_cat(&disk, 3, "/etc/ssh/ssh_host_rsa_key.pub").is_empty(),
        "the image's old key is gone"
    );
    let sshd = debugfs_cat(&disk, 3, "/etc/ssh/sshd_config.d/homelab.conf");
    assert!(sshd.contains("HostKey /etc/ssh/ssh_host_ed25519_key"));

    // The installed system boots its disk from now on.
    let (_, script) = d.get(&format!("/boot/{MAC}.ipxe"));
    assert!(
        script.contains("sanboot") && !script.contains("/install/"),
        "{script}"
    );

    // Phone-home with another key is not trusted; with the pinned key the node is installed.
    let post = |key: &str| {
        run(d
            .command("curl")
            .args(["-s", "--max-time", "10", "--data-urlencode"])
            .arg(format!("pub_key_ed25519={key}"))
            .args(["--data-urlencode", "hostname=node1"])
            .arg(format!("{}/phone-home/{MAC}", d.base_url())));
    };
    post(OLD_KEY);
    assert_eq!(
        d.state().node("node1").unwrap().unwrap().stage,
        Stage::Rebooting
    );
    assert!(d
        .state()
        .last_events(50, Some("node1"))
        .unwrap()
        .iter()
        .any(|e| e.kind == "install.host-key-mismatch"));
    post(&format!("{pinned} root@node1"));
    // Installed; the controller then probes SSH at the node's (loopback) address.
    assert!(d
        .state()
        .node("node1")
        .unwrap()
        .unwrap()
        .stage
        .has_installed_os());

    // The audit trail has the install's steps, and the agent's log.
    let kinds: Vec<String> = d
        .state()
        .last_events(200, Some("node1"))
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    for k in [
        "stage.installing",
        "install.disk",
        "install.image",
        "install.head-written",
        "install.log",
        "stage.rebooting",
        "stage.installed",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} event in {kinds:?}");
    }
}

#[test]
fn an_image_with_the_wrong_checksum_is_never_served() {
    let Some(assets) = ready("an_image_with_the_wrong_checksum_is_never_served") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (image, _) = os_image(tmp.path());
    let mut d = Daemon::start(
        tmp.path(),
        &image,
        &"0123456789abcdef".repeat(4),
        &assets.deb,
    );
    let failed = d.wait_event(
        &["install.media-ready", "install.media-failed"],
        Duration::from_secs(120),
    );
    assert!(failed.starts_with("install.media-failed"), "{failed}");
    assert!(
        failed.contains("[os] image")
            && failed.contains(&"0123456789abcdef".repeat(4))
            && failed.contains("sha256"),
        "{failed}"
    );
    let node = d.state().node("node1").unwrap().unwrap();
    assert_eq!(node.stage, Stage::Failed);
    // The node is told why and gets no installer; nothing of the image is served.
    let (code, script) = d.get(&format!("/boot/{MAC}.ipxe"));
    assert_eq!(code, 200);
    assert!(
        script.contains("cannot run") && !script.contains("kernel "),
        "{script}"
    );
    assert_ne!(d.get(&format!("/install/{MAC}/image")).0, 200);
    assert_ne!(d.get(&format!("/install/{MAC}/vmlinuz")).0, 200);
}
