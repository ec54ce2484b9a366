//! QEMU machines with real PXE firmware on the lab bridge.
//!
//! TCG only (`-accel tcg`: KVM guests hang on this machine). Firmware is
//! SeaBIOS or OVMF. The PXE client is QEMU's own iPXE NIC ROM (package
//! ipxe-qemu: virtio-net-pci loads efi-virtio.rom, carrying both the BIOS
//! and the UEFI image) or, under OVMF, edk2's own PXE with no ROM
//! ([`NicRom`]). The serial console goes to a file, stamped as it arrives so
//! tests can ask when a line appeared; the machine does not reboot
//! (`-no-reboot`), so a guest `poweroff -f` or a kernel panic (`panic=-1`)
//! ends the QEMU process.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::netns::{unique, Netns, Proc};
use super::{read_lossy, tail, wait_until, which};

/// The machine's firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS (QEMU's default): PXE client arch 0.
    Bios,
    /// OVMF (x86-64 UEFI): PXE client arch 7.
    Uefi,
}

/// Firmware files: `None` for BIOS (QEMU's built-in SeaBIOS, checked to
/// exist), `(code, vars template)` for OVMF, found as the lab finds them.
/// Err says what is missing.
pub fn firmware_files(fw: Firmware) -> Result<Option<(PathBuf, PathBuf)>, String> {
    match fw {
        Firmware::Bios => homelab::lab::vm::check_seabios().map(|()| None),
        Firmware::Uefi => homelab::lab::vm::ovmf_files().map(Some),
    }
}

/// Which PXE client runs on the NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicRom {
    /// QEMU's own iPXE option ROM (ipxe-qemu). iPXE is the PXE client from
    /// power-on: it sends user class `iPXE`, so the server hands it the
    /// script URL at once and no TFTP happens.
    Ipxe,
    /// No option ROM (`romfile=`): the firmware's own PXE client, like a
    /// real machine's. Under OVMF that is edk2's UefiPxeBcDxe, which fetches
    /// ipxe.efi over TFTP and chains to it. SeaBIOS has no PXE client of its
    /// own, so this is UEFI only.
    Firmware,
}

/// How to build a machine. `VmConfig::new(fw)` gives a PXE-booting machine
/// with a unique MAC; set fields to change it.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Label for logs and files (`vm0`, `vm1`, ...).
    pub name: String,
    pub firmware: Firmware,
    /// Lower-case `52:54:00:xx:xx:xx`.
    pub mac: String,
    /// QEMU NIC device; its iPXE ROM must exist in ipxe-qemu
    /// (`virtio-net-pci`, `e1000`, `rtl8139`, ...). The initramfs carries
    /// virtio_net and e1000 drivers.
    pub nic: String,
    pub nic_rom: NicRom,
    pub memory_mb: u32,
    /// Raw disk images, attached as virtio disks after the NIC in boot order.
    pub disks: Vec<PathBuf>,
    /// Under SeaBIOS, mirror the text screen (SeaBIOS and iPXE messages) to
    /// the serial console (SeaBIOS `etc/sercon-port`). OVMF already writes
    /// its console to serial.
    pub bios_serial_console: bool,
    /// Extra QEMU arguments, appended last.
    pub extra_args: Vec<String>,
    /// Let the guest reboot (an installer reboots into the installed disk);
    /// otherwise a reboot ends QEMU (`-no-reboot`).
    pub allow_reboot: bool,
}

impl VmConfig {
    pub fn new(firmware: Firmware) -> VmConfig {
        let k = unique();
        let pid = std::process::id();
        VmConfig {
            name: format!("vm{k}"),
            firmware,
            mac: format!(
                "52:54:00:{:02x}:{:02x}:{:02x}",
                (pid >> 8) as u8,
                pid as u8,
                k as u8
            ),
            nic: "virtio-net-pci".into(),
            nic_rom: NicRom::Ipxe,
            memory_mb: 512,
            disks: Vec::new(),
            bios_serial_console: true,
            extra_args: Vec::new(),
            allow_reboot: false,
        }
    }
}

/// A running QEMU machine; killed on drop, its tap removed.
pub struct Vm {
    name: String,
    mac: String,
    firmware: Firmware,
    proc: Proc,
    serial: PathBuf,
    tap: String,
    netns: String,
    started: Instant,
    started_wall: SystemTime,
    watch: SerialWatch,
}

impl Vm {
    /// Creates a tap on the lab bridge and powers the machine on inside the
    /// namespace. The power-on instant is taken just before the spawn.
    pub fn start(ns: &Netns, cfg: VmConfig) -> io::Result<Vm> {
        let qemu = which("qemu-system-x86_64").ok_or_else(|| {
            io::Error::other("qemu-system-x86_64 not found (package qemu-system-x86)")
        })?;
        let fw = firmware_files(cfg.firmware).map_err(io::Error::other)?;
        if cfg.firmware == Firmware::Bios && cfg.nic_rom == NicRom::Firmware {
            return Err(io::Error::other(
                "SeaBIOS has no PXE client of its own: use NicRom::Ipxe",
            ));
        }
        let dir = ns.dir().join(&cfg.name);
        std::fs::create_dir_all(&dir)?;
        let serial = dir.join("serial.log");
        let tap = ns.add_tap()?;
        let rom = match cfg.nic_rom {
            NicRom::Ipxe => "",
            NicRom::Firmware => ",romfile=",
        };

        let mut cmd = ns.command(&qemu);
        cmd.args([
            "-name", &cfg.name, "-accel", "tcg", "-machine", "pc", "-smp", "1",
        ])
        .args(["-m", &cfg.memory_mb.to_string()])
        .args(["-display", "none", "-monitor", "none"])
        // An entropy source, as hypervisors offer: the emulated CPU has no
        // RDRAND, and a fresh kernel's random pool would take long to fill.
        .args(["-device", "virtio-rng-pci"])
        .args(if cfg.allow_reboot {
            &[][..]
        } else {
            &["-no-reboot"][..]
        })
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args([
            "-netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        ])
        .args([
            "-device",
            &format!("{},netdev=n0,mac={},bootindex=1{rom}", cfg.nic, cfg.mac),
        ]);
        for (i, d) in cfg.disks.iter().enumerate() {
            cmd.args([
                "-drive",
                &format!(
                    "file={},if=none,id=d{i},format={},discard=unmap,detect-zeroes=unmap",
                    d.display(),
                    if d.extension().is_some_and(|e| e == "qcow2") {
                        "qcow2"
                    } else {
                        "raw"
                    }
                ),
            ])
            .args([
                "-device",
                &format!("virtio-blk-pci,drive=d{i},bootindex={}", i + 2),
            ]);
        }
        match (cfg.firmware, fw) {
            (Firmware::Uefi, Some((code, vars))) => {
                let vars_copy = dir.join("OVMF_VARS.fd");
                std::fs::copy(&vars, &vars_copy)?;
                cmd.args([
                    "-drive",
                    &format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        code.display()
                    ),
                ])
                .args([
                    "-drive",
                    &format!("if=pflash,format=raw,unit=1,file={}", vars_copy.display()),
                ]);
            }
            _ => {
                if cfg.bios_serial_console {
                    // SeaBIOS reads the port as a little-endian integer file.
                    let port = dir.join("sercon-port");
                    std::fs::write(&port, 0x3f8u16.to_le_bytes())?;
                    cmd.args([
                        "-fw_cfg",
                        &format!("name=etc/sercon-port,file={}", port.display()),
                    ]);
                }
            }
        }
        cmd.args(&cfg.extra_args);

        let started_wall = SystemTime::now();
        let started = Instant::now();
        let proc = match ns.spawn(&format!("{}-qemu", cfg.name), cmd) {
            Ok(p) => p,
            Err(e) => {
                ns.del_link(&tap);
                return Err(e);
            }
        };
        let watch = SerialWatch::start(serial.clone(), started);
        Ok(Vm {
            watch,
            name: cfg.name,
            mac: cfg.mac,
            firmware: cfg.firmware,
            proc,
            serial,
            tap,
            netns: ns.name().to_string(),
            started,
            started_wall,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mac(&self) -> &str {
        &self.mac
    }

    pub fn firmware(&self) -> Firmware {
        self.firmware
    }

    /// The power-on instant (monotonic).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The power-on instant (wall clock, to compare with server log stamps).
    pub fn started_wall(&self) -> SystemTime {
        self.started_wall
    }

    pub fn serial_path(&self) -> &Path {
        &self.serial
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        read_lossy(&self.serial)
    }

    /// QEMU's own stdout/stderr (argument errors, tap errors).
    pub fn qemu_log(&self) -> String {
        self.proc.log()
    }

    /// A failure report: the last lines of the serial console and QEMU's log.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- {} ({:?}, {}) serial, last lines:\n{}\n--- qemu log:\n{}",
            self.name,
            self.firmware,
            self.mac,
            tail(&self.serial(), 40),
            tail(&self.qemu_log(), 20)
        )
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc.try_wait().is_none()
    }

    /// QEMU's exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.proc.try_wait()
    }

    /// Waits (bounded) for the machine to power off.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(timeout)
    }

    /// When `pattern` first appeared on the serial console, as time from
    /// power-on (stamped by a watcher thread polling every 20 ms).
    pub fn serial_time(&self, pattern: &str) -> Option<Duration> {
        self.watch.time_of(pattern.as_bytes())
    }

    /// Waits until the serial console contains `pattern`; returns when it
    /// appeared, as time from power-on ([`Vm::serial_time`]). Err, with
    /// diagnostics, on timeout or when the machine stops first.
    pub fn wait_for_serial(
        &mut self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let what = format!("`{pattern}` on {}'s serial console", self.name);
        let r = wait_until(&what, timeout, Duration::from_millis(20), || {
            if let Some(t) = self.serial_time(pattern) {
                return Ok(Some(t));
            }
            if let Some(st) = self.proc.try_wait() {
                self.watch.poll();
                if let Some(t) = self.serial_time(pattern) {
                    return Ok(Some(t));
                }
                return Err(format!(
                    "{} stopped ({st}) before printing `{pattern}`",
                    self.name
                ));
            }
            Ok(None)
        });
        r.map_err(|e| format!("{e}\n{}", self.diagnostics()))
    }
}

/// Tails the serial file in a thread, stamping each chunk with its arrival
/// time, so a line's time is known whenever the test looks for it.
struct SerialWatch {
    state: Arc<Mutex<SerialState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct SerialState {
    path: PathBuf,
    started: Instant,
    bytes: Vec<u8>,
    /// (end offset in `bytes`, arrival time from power-on), ascending.
    chunks: Vec<(usize, Duration)>,
}

impl SerialState {
    fn poll(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.bytes.len() as u64)).is_err() {
            return;
        }
        let before = self.bytes.len();
        let _ = f.read_to_end(&mut self.bytes);
        if self.bytes.len() > before {
            self.chunks.push((self.bytes.len(), self.started.elapsed()));
        }
    }
}

impl SerialWatch {
    fn start(path: PathBuf, started: Instant) -> SerialWatch {
        let state = Arc::new(Mutex::new(SerialState {
            path,
            started,
            bytes: Vec::new(),
            chunks: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                st.lock().unwrap_or_else(|e| e.into_inner()).poll();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        SerialWatch {
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn poll(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).poll();
    }

    fn time_of(&self, pattern: &[u8]) -> Option<Duration> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if pattern.is_empty() || st.bytes.len() < pattern.len() {
            return None;
        }
        let end = st.bytes.windows(pattern.len()).position(|w| w == pattern)? + pattern.len();
        st.chunks
            .iter()
            .find(|(off, _)| *off >= end)
            .map(|(_, t)| *t)
    }
}

impl Drop for SerialWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Proc's own drop kills QEMU; do it first so the tap is free.
        if self.proc.try_wait().is_none() {
            self.proc.stop(Duration::ZERO);
        }
        let _ = std::process::Command::new(which("ip").unwrap_or_else(|| "ip".into()))
            .args(["-n", &self.netns, "link", "del", &self.tap])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
