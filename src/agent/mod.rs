//! The installer agent: the homelab binary itself, running as `/init` of
//! the in-memory installer on a node (or as `homelab agent` for tests and
//! for installing from a running rescue system).
//!
//! It fetches its plan from the controller, picks the disk and refuses one
//! that holds data unless the plan allows overwriting it, streams the image
//! onto it (sha256-checked, the head written last), grows the partition
//! table to the disk, writes the cloud-init seed and a freshly generated SSH
//! host key into the installed root filesystem, reports the host key's
//! public half (which the controller pins), and reboots.

pub mod disk;
pub mod gpt;
pub mod image;
pub mod mount;
pub mod system;
pub mod transfer;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::install::initramfs::{MODULE_DIR, MODULE_ORDER};
use crate::install::protocol::{DiskReport, InstallPlan, Report};
use transfer::Controller;

/// Lab tests must not skip for a missing tool when this is set (CI).
#[cfg(test)]
pub(crate) fn tests_require_tools() -> bool {
    std::env::var("HOMELAB_REQUIRE_LAB").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// How the agent was started.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The plan URL, one-time token included.
    pub plan_url: String,
    /// Overrides the plan's disk choice (tests write to a file).
    pub disk_override: Option<PathBuf>,
    /// Where block devices are listed (normally /sys/block).
    pub sys_block: PathBuf,
}

/// Entry point as PID 1: set the machine up from the kernel command line,
/// install, reboot. Never returns; on failure the reason stays on the
/// console and is reported, and the machine waits to be reset.
pub fn main_as_init() -> ! {
    eprintln!("homelab installer starting");
    let result = (|| -> Result<AgentConfig> {
        system::mount_basics()?;
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let args = system::parse_cmdline(&cmdline);
        for note in system::load_modules(
            &Path::new("/").join(MODULE_DIR),
            &Path::new("/").join(MODULE_ORDER),
        ) {
            eprintln!("homelab installer: {note}");
        }
        let get = |k: &str| {
            args.get(k)
                .cloned()
                .with_context(|| format!("{k}= is missing from the kernel command line"))
        };
        let mac = get("homelab.mac")?;
        let ip = get("homelab.ip")?.parse().context("homelab.ip")?;
        let mask = get("homelab.netmask")?.parse().context("homelab.netmask")?;
        let gw = args.get("homelab.gateway").and_then(|g| g.parse().ok());
        let iface = system::wait_for_interface(&mac, Duration::from_secs(60))?;
        system::configure_ipv4(&iface, ip, mask, gw)?;
        eprintln!(
            "homelab installer: {iface} ({mac}) is {ip}/{}",
            system::prefix_len(mask).unwrap_or(32)
        );
        Ok(AgentConfig {
            plan_url: get("homelab.plan")?,
            disk_override: None,
            sys_block: "/sys/block".into(),
        })
    })();
    match result.and_then(|cfg| run(&cfg)) {
        Ok(()) => {
            eprintln!("homelab installer: done; rebooting");
            let _ = system::reboot();
        }
        Err(e) => eprintln!("homelab installer: FAILED: {e:#}"),
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Install according to the plan at `cfg.plan_url`. Failures are reported
/// to the controller before they are returned.
pub fn run(cfg: &AgentConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (controller, plan) = rt.block_on(Controller::fetch_plan(&cfg.plan_url))?;
    let log = controller.log_sink(rt.handle().clone());
    log.line(format!(
        "plan for {} fetched; image {} bytes",
        plan.node, plan.image.size
    ));
    match install(cfg, &plan, &controller, &log, rt.handle()) {
        Ok(done) => {
            log.flush();
            rt.block_on(controller.report_reliably(&done))?;
            Ok(())
        }
        Err(e) => {
            let error = format!("{e:#}");
            log.line(format!("failed: {error}"));
            log.flush();
            let _ = rt.block_on(controller.report_reliably(&Report::Failed { error }));
            Err(e)
        }
    }
}

fn install(
    cfg: &AgentConfig,
    plan: &InstallPlan,
    controller: &Controller,
    log: &transfer::LogSink,
    rt: &tokio::runtime::Handle,
) -> Result<Report> {
    let started = Instant::now();
    let device = match &cfg.disk_override {
        Some(p) => p.clone(),
        None => {
            let disks = disk::list(&cfg.sys_block, Path::new("/dev"));
            disk::pick(&disks, &plan.disk)?.device
        }
    };
    let target = image::Target::open(&device)?;
    let probe = target.read_at(0, disk::PROBE_BYTES)?;
    let previous = disk::previous_content(&probe);
    let model = std::fs::read_to_string(
        cfg.sys_block
            .join(device.file_name().unwrap_or_default())
            .join("device/model"),
    )
    .unwrap_or_default()
    .trim()
    .to_string();
    controller.report(
        rt,
        Report::Disk(DiskReport {
            device: device.display().to_string(),
            size: target.size,
            model,
            previous: previous.map(str::to_string),
        }),
    );
    if let Some(what) = previous {
        if !plan.may_overwrite {
            bail!(
                "{} holds {what}; refusing to overwrite it. To wipe it and install, run \
                 `homelab reinstall {}` on the controller (or set reinstall = true in its inventory stanza)",
                device.display(),
                plan.node
            );
        }
        log.line(format!(
            "{} holds {what}; overwriting it as the plan allows",
            device.display()
        ));
    }
    log.line(format!(
        "writing {} to {} ({} bytes)",
        plan.image.url,
        device.display(),
        target.size
    ));

    // The download runs on the runtime; the decompress-and-write on this thread.
    let body = controller.image_reader(rt, &plan.image);
    let mut hashing = image::Hashing::new(body);
    let mut progress = controller.progress_reporter(rt, plan.image.size, hashing.counter());
    let (mut head, written) = {
        let mut reader = image::decompress(&mut hashing, plan.image.compression)?;
        image::write_body(&mut reader, &target, |w| progress.update(w))?
    };
    let (sha, received) = hashing.finish();
    progress.finish(written);
    if sha != plan.image.sha256 {
        bail!(
            "the image's sha256 is {sha}, not {} as planned ({received} bytes received); \
             nothing that boots was written",
            plan.image.sha256
        );
    }
    log.line(format!(
        "image verified (sha256 {sha}), {written} bytes written"
    ));

    let grown = gpt::grow(&mut head, target.size)?;
    if let Some((g, writes)) = &grown {
        for w in writes {
            target.write_at(w.offset, &w.bytes)?;
        }
        log.line(format!(
            "{} partition {} grown from sector {} to {}",
            g.table, g.partition, g.old_end_sector, g.new_end_sector
        ));
    }
    target.sync()?;
    target.write_at(0, &head)?;
    target.sync()?;
    controller.report(rt, Report::HeadWritten);
    target.reread_partitions()?;
    // Our exclusive hold on the disk would make mounting its partition EBUSY.
    let device = target.path.clone();
    drop(target);

    let host_key = mount::write_into_root(&device, &head, &plan.files, log)?;
    nix::unistd::sync();
    Ok(Report::Done {
        host_key,
        bytes_written: written,
        seconds: started.elapsed().as_secs_f64(),
    })
}
