//! Streaming the OS image to an installing node: homelab's image endpoint
//! (`/install/<mac>/image`, behind the plan's Bearer session) against nginx
//! (sendfile) serving the same bytes, in one run, one download at a time over
//! loopback, full and resumed (a range from the middle on); and each server's
//! CPU time and memory during the transfers. Goal: homelab at least 90 % of
//! nginx's throughput.
//!
//! Needs root and the lab packages (scripts/deps.sh); the installer is built
//! from the lab's kernel package (scripts/lab-assets.sh). Run with
//! `cargo bench --bench stream` (or `bash scripts/bench-stream.sh`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::homelab::{
    find_event, homelab_cmd_in, install_inventory, installer_plan_url, HTTP_PORT,
};
use common::{assets, lab_ready, sha256_file, tail, wait_until, HttpServer, Need, Netns, Proc};
use homelab::install::protocol::{Compression, InstallPlan};
use rand::RngCore;

const IMAGE_BYTES: u64 = 1 << 30;
const ROUNDS: usize = 9;
const GOAL: f64 = 0.9;
const MAC: &str = "52:54:00:42:00:01";
const NGINX_PORT: u16 = 8081;
/// Verifying the image and building the installer (~30 s on a quiet machine).
const MEDIA_TIMEOUT: Duration = Duration::from_secs(300);
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// `bytes` of incompressible random data, as a raw disk image: the first
/// sector is zero, like an unpartitioned disk, so that no compression magic
/// appears there by chance.
fn write_image(path: &Path, bytes: u64) {
    let mut f = std::fs::File::create(path).expect("create the image");
    let mut block = vec![0u8; 1 << 20];
    let mut rng = rand::rng();
    for i in 0..bytes.div_ceil(block.len() as u64) {
        rng.fill_bytes(&mut block);
        if i == 0 {
            block[..512].fill(0);
        }
        let n = (bytes - i * block.len() as u64).min(block.len() as u64) as usize;
        f.write_all(&block[..n]).expect("write the image");
    }
}

/// `curl` inside the namespace, its stdout; panics with curl's error.
fn curl(ns: &Netns, args: &[&str]) -> String {
    let max_time = FETCH_TIMEOUT.as_secs().to_string();
    let mut argv = vec!["curl", "-sSf", "--max-time", &max_time];
    argv.extend(args);
    ns.exec(&argv).unwrap_or_else(|e| panic!("{e}"))
}

/// The daemon serving node1's install, and what its installer presents.
struct Homelab {
    daemon: Proc,
    image_url: String,
    session: String,
}

impl Homelab {
    /// Starts `homelab serve` with its inventory and state in `dir`, waits for
    /// the install media, and takes the plan the way the agent does.
    fn start(ns: &Netns, dir: &Path, image: &Path, deb: &Path) -> Homelab {
        let inventory = install_inventory(ns, HTTP_PORT, MAC, image, &sha256_file(image), deb);
        std::fs::write(dir.join("inventory.toml"), inventory).expect("write the inventory");
        let mut daemon = ns
            .spawn("homelab", homelab_cmd_in(ns, dir, &["serve"]))
            .expect("homelab serve");
        let ready = wait_media(&mut daemon, &dir.join("state"));
        assert!(ready.starts_with("install.media-ready"), "{ready}");
        let script = curl(
            ns,
            &[&format!("http://{}:{HTTP_PORT}/boot/{MAC}.ipxe", ns.ip())],
        );
        let plan_url = installer_plan_url(ns, &script)
            .unwrap_or_else(|| panic!("no installer in the script:\n{script}"));
        let plan: InstallPlan =
            serde_json::from_str(&curl(ns, &[&plan_url])).expect("the plan's JSON");
        assert_eq!(plan.image.compression, Compression::None);
        assert_eq!(plan.image.size, IMAGE_BYTES);
        Homelab {
            daemon,
            image_url: plan.image.url,
            session: plan.session,
        }
    }

    /// Its image endpoint, as the agent downloads it.
    fn target(&self) -> Target<'_> {
        Target {
            server: &self.daemon,
            url: self.image_url.clone(),
            args: vec![
                "-H".into(),
                format!("Authorization: Bearer {}", self.session),
            ],
        }
    }
}

/// Waits for the media's verdict (ready or failed) in the daemon's events.
fn wait_media(daemon: &mut Proc, state: &Path) -> String {
    let kinds = ["install.media-ready", "install.media-failed"];
    wait_until(
        "the install media",
        MEDIA_TIMEOUT,
        Duration::from_millis(200),
        || {
            daemon.ensure_running()?;
            Ok(find_event(state, &kinds))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\nhomelab log:\n{}", tail(&daemon.log(), 40)))
}

/// One server as the benchmark downloads from it.
struct Target<'a> {
    server: &'a Proc,
    url: String,
    /// Extra curl arguments (homelab's Bearer session).
    args: Vec<String>,
}

/// One download: throughput, the server's CPU time meanwhile, and its
/// largest RSS seen.
struct Fetch {
    mb_per_s: f64,
    cpu: Duration,
    rss_kib: u64,
}

/// Downloads `target` (from byte `from` on) to /dev/null with curl inside the
/// namespace, sampling the server's RSS until curl exits.
fn fetch(ns: &Netns, target: &Target, from: u64) -> Fetch {
    let mut cmd = ns.command("curl");
    cmd.args(["-s", "-o", "/dev/null", "--max-time"])
        .arg(FETCH_TIMEOUT.as_secs().to_string())
        .args(["-w", "%{http_code} %{size_download} %{speed_download}"])
        .args(&target.args);
    if from > 0 {
        cmd.arg("-r").arg(format!("{from}-"));
    }
    let cpu_before = target.server.cpu_time();
    let mut child = cmd
        .arg(&target.url)
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    let deadline = Instant::now() + FETCH_TIMEOUT + Duration::from_secs(10);
    let mut rss_kib = 0;
    while child.try_wait().expect("curl").is_none() {
        assert!(Instant::now() < deadline, "curl {} did not end", target.url);
        rss_kib = rss_kib.max(target.server.rss_kib());
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu = target.server.cpu_time().saturating_sub(cpu_before);
    let out = child.wait_with_output().expect("curl");
    let written = String::from_utf8_lossy(&out.stdout).into_owned();
    let [code, size, speed] = written.split_whitespace().collect::<Vec<_>>()[..] else {
        panic!("curl {}: {written:?} ({})", target.url, out.status);
    };
    let status = if from > 0 { "206" } else { "200" };
    assert!(
        code == status && size.parse() == Ok(IMAGE_BYTES - from),
        "curl {}: status {code}, {size} bytes; wanted {status}, {} bytes",
        target.url,
        IMAGE_BYTES - from
    );
    Fetch {
        mb_per_s: speed.parse::<f64>().expect("curl's speed") / 1e6,
        cpu,
        rss_kib,
    }
}

/// What the downloads from one server came to.
struct Figures {
    /// Median throughput.
    mb_per_s: f64,
    /// Server CPU time per GiB sent, seconds.
    cpu_per_gib: f64,
    rss_kib: u64,
}

impl Figures {
    fn of(fetches: Vec<Fetch>, bytes_each: u64) -> Figures {
        let cpu: Duration = fetches.iter().map(|f| f.cpu).sum();
        let gib = (bytes_each * fetches.len() as u64) as f64 / (1u64 << 30) as f64;
        let mut speeds: Vec<f64> = fetches.iter().map(|f| f.mb_per_s).collect();
        speeds.sort_by(f64::total_cmp);
        Figures {
            mb_per_s: speeds[speeds.len() / 2],
            cpu_per_gib: cpu.as_secs_f64() / gib,
            rss_kib: fetches.iter().map(|f| f.rss_kib).max().unwrap_or(0),
        }
    }
}

/// The figures of each target over `ROUNDS` alternating downloads (from
/// byte `from` on), after one unmeasured warm-up each.
fn race(ns: &Netns, targets: &[&Target], from: u64) -> Vec<Figures> {
    for t in targets {
        fetch(ns, t, from);
    }
    let mut runs: Vec<Vec<Fetch>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for (t, r) in targets.iter().zip(&mut runs) {
            r.push(fetch(ns, t, from));
        }
    }
    runs.into_iter()
        .map(|r| Figures::of(r, IMAGE_BYTES - from))
        .collect()
}

/// A throughput row: nginx, homelab, their ratio against the goal.
fn print_row(what: &str, peer: &Figures, ours: &Figures) {
    let ratio = ours.mb_per_s / peer.mb_per_s;
    let verdict = if ratio >= GOAL { "meets" } else { "MISSES" };
    println!(
        "{what:<22} {:>9.0} MB/s {:>9.0} MB/s {ratio:>7.3}  ({verdict} the {GOAL:.2} goal)",
        peer.mb_per_s, ours.mb_per_s
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !lab_ready("bench stream", &[Need::Tool("nginx"), Need::Tool("curl")]) {
        return;
    }
    let assets = assets().expect("assets");
    // The image and the daemon's state (with its copy of the image) live
    // apart from the namespace's logs, which a panic keeps.
    let work = tempfile::tempdir().expect("tempdir");
    let image = work.path().join("image.raw");
    write_image(&image, IMAGE_BYTES);
    let ns = Netns::new().expect("namespace");
    let homelab = Homelab::start(&ns, work.path(), &image, &assets.deb);
    let mut nginx = HttpServer::start(&ns, "nginx", Ipv4Addr::LOCALHOST, NGINX_PORT, work.path())
        .expect("nginx");
    let peer = Target {
        url: nginx.url("image.raw"),
        server: nginx.proc(),
        args: Vec::new(),
    };
    let ours = homelab.target();

    let full = race(&ns, &[&peer, &ours], 0);
    let ranged = race(&ns, &[&peer, &ours], IMAGE_BYTES / 2);
    println!(
        "OS image download over loopback, {} MiB raw image, curl to /dev/null \
         (MB = 10^6 bytes; median of {ROUNDS} alternating rounds):",
        IMAGE_BYTES >> 20
    );
    println!(
        "{:<22} {:>14} {:>14} {:>7}",
        "", "nginx", "homelab", "ratio"
    );
    print_row("full GET", &full[0], &full[1]);
    print_row("ranged GET (2nd half)", &ranged[0], &ranged[1]);
    println!(
        "{:<22} {:>12.2} s {:>12.2} s",
        "server CPU per GiB", full[0].cpu_per_gib, full[1].cpu_per_gib
    );
    let rss = |i: usize| full[i].rss_kib.max(ranged[i].rss_kib) as f64 / 1024.0;
    println!(
        "server RSS during the transfers (peak sampled): nginx {:.1} MiB, homelab {:.1} MiB",
        rss(0),
        rss(1)
    );
}
