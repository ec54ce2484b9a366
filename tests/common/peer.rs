//! Servers the lab machines talk to, besides homelab itself.
//!
//! - [`Peer`]: dnsmasq (authoritative DHCP + TFTP of the distro's iPXE) and
//!   nginx (the iPXE script, kernel, initrd, `/phone-home`): the classic
//!   dnsmasq + nginx PXE setup, and the reference for the netboot benchmark.
//! - [`PlainDhcp`]: dnsmasq in its own namespace plugged into the lab bridge,
//!   handing out addresses and nothing else, as a home router does; homelab's
//!   proxy mode runs beside it.
//! - [`HttpServer`]: nginx serving a directory and `/phone-home`, logging
//!   each request with a millisecond timestamp; on its own it is the
//!   phone-home sink for tests where homelab serves the boot files.
//! - [`RouterAdvertiser`]: IPv6 router advertisements on the lab bridge.
//!   iPXE's autoboot waits for IPv6 autoconfiguration as well as DHCP; on a
//!   network without RAs that wait is about 13 s of a 24 s boot here. Opt-in:
//!   the reference figures are measured without it.
//!
//! All of them run inside the test's namespaces and are killed on drop.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::assets::{ipxe_script, Assets};
use super::netns::{Netns, Proc, Proto};
use super::vm::Vm;
use super::{read_lossy, tail, wait_until, which};

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// nginx inside a namespace: serves `root` and answers `/phone-home` with
/// `ok`. Access log lines: `<unix time with ms> <client> "<request>" <status> <bytes>`.
pub struct HttpServer {
    proc: Proc,
    addr: Ipv4Addr,
    port: u16,
    root: PathBuf,
    access_log: PathBuf,
}

impl HttpServer {
    /// Starts nginx in `ns` on `addr:port` serving `root`; `name` keeps the
    /// files of several servers in one namespace apart. Returns once the
    /// port listens.
    pub fn start(
        ns: &Netns,
        name: &str,
        addr: Ipv4Addr,
        port: u16,
        root: &Path,
    ) -> Result<HttpServer, String> {
        let nginx = which("nginx").ok_or("nginx not found (package nginx-light)")?;
        let dir = ns.dir().join(name);
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let access_log = dir.join("access.log");
        let conf = dir.join("nginx.conf");
        let d = dir.display();
        let text = format!(
            r#"# homelab lab test: nginx serving {root} on {addr}:{port}
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format hl '$msec $remote_addr "$request" $status $body_bytes_sent';
    access_log {access} hl;
    client_body_temp_path {t}/body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    default_type application/octet-stream;
    types {{ text/plain ipxe; }}
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30;
    server {{
        listen {addr}:{port};
        root {root};
        location = /phone-home {{
            default_type text/plain;
            return 200 "ok\n";
        }}
        location / {{ }}
    }}
}}
"#,
            root = root.display(),
            access = access_log.display(),
            t = tmp.display(),
        );
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
        let mut cmd = ns.command(nginx);
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("startup.log"));
        let mut proc = ns
            .spawn(&format!("{name}-nginx"), cmd)
            .map_err(|e| format!("nginx: {e}"))?;
        proc.wait_listening(Proto::Tcp, port, START_TIMEOUT)
            .map_err(|e| {
                format!(
                    "{e}\nnginx error log:\n{}",
                    tail(&read_lossy(&dir.join("error.log")), 20)
                )
            })?;
        Ok(HttpServer {
            proc,
            addr,
            port,
            root: root.to_path_buf(),
            access_log,
        })
    }

    /// `http://addr:port` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}:{}", self.addr, self.port)
    }

    /// `http://addr:port/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base_url(), path.trim_start_matches('/'))
    }

    /// Where the lab initramfs phones home (`homelab.phone=`).
    pub fn phone_home_url(&self) -> String {
        self.url("phone-home")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The access log so far.
    pub fn access_log(&self) -> String {
        read_lossy(&self.access_log)
    }

    /// When a request whose line contains `needle` was first logged.
    pub fn request_time(&self, needle: &str) -> Option<SystemTime> {
        self.access_log()
            .lines()
            .find(|l| l.contains(needle))
            .and_then(|l| {
                let secs: f64 = l.split_whitespace().next()?.parse().ok()?;
                Some(UNIX_EPOCH + Duration::from_secs_f64(secs))
            })
    }

    /// When the machine with `mac` phoned home (first such request).
    pub fn phone_home_time(&self, mac: &str) -> Option<SystemTime> {
        self.request_time(&format!("/phone-home?mac={}", mac.to_ascii_lowercase()))
    }

    /// Waits until `vm` phones home; returns the time from its power-on to
    /// the request, from the server's own timestamp. Err with diagnostics on
    /// timeout, or as soon as the machine stops without having phoned home.
    pub fn wait_phone_home(&self, vm: &mut Vm, timeout: Duration) -> Result<Duration, String> {
        let what = format!(
            "{} ({}) to phone home to {}",
            vm.name(),
            vm.mac(),
            self.phone_home_url()
        );
        let started = vm.started_wall();
        let r = wait_until(&what, timeout, Duration::from_millis(50), || {
            if let Some(t) = self.phone_home_time(vm.mac()) {
                return Ok(Some(t.duration_since(started).unwrap_or_default()));
            }
            if let Some(st) = vm.try_wait() {
                if let Some(t) = self.phone_home_time(vm.mac()) {
                    return Ok(Some(t.duration_since(started).unwrap_or_default()));
                }
                return Err(format!(
                    "{} powered off ({st}) without phoning home",
                    vm.name()
                ));
            }
            Ok(None)
        });
        r.map_err(|e| {
            format!(
                "{e}\n{}\n--- http access log:\n{}",
                vm.diagnostics(),
                tail(&self.access_log(), 20)
            )
        })
    }
}

/// Options for [`Peer`].
#[derive(Clone, Debug)]
pub struct PeerOptions {
    /// nginx port on the controller address.
    pub http_port: u16,
    /// Dynamic range `10.N.0.<first>` ..= `10.N.0.<last>`.
    pub range: (u8, u8),
    /// Where dnsmasq's TFTP serves iPXE binaries from.
    pub tftp_root: PathBuf,
    /// dnsmasq pings an address before offering it (its default); `true`
    /// turns that off.
    pub no_ping: bool,
    /// Replaces the generated iPXE script (served as `/boot.ipxe`).
    pub ipxe_script: Option<String>,
    /// More dnsmasq.conf lines, appended last.
    pub extra_dnsmasq: Vec<String>,
    /// proxyDHCP instead of authoritative: boot information only, no
    /// addresses (run a [`PlainDhcp`] beside it), the way homelab's default
    /// mode works. `range` is then unused.
    pub proxy: bool,
}

impl Default for PeerOptions {
    fn default() -> Self {
        PeerOptions {
            http_port: 80,
            range: (100, 199),
            tftp_root: "/usr/lib/ipxe".into(),
            no_ping: false,
            ipxe_script: None,
            extra_dnsmasq: Vec::new(),
            proxy: false,
        }
    }
}

/// dnsmasq + nginx on the lab's controller address: full PXE.
///
/// dnsmasq is authoritative on `br0`; plain PXE ROMs get `undionly.kpxe`
/// (arch 0) or `ipxe.efi` (arch 7, 9) over TFTP from /usr/lib/ipxe; iPXE
/// clients (option 175 or user class `iPXE`) get `http://<ctrl>/boot.ipxe`,
/// which boots the lab assets with [`ipxe_script`].
pub struct Peer {
    dnsmasq: Proc,
    http: HttpServer,
    leases: PathBuf,
    log: PathBuf,
}

impl Peer {
    pub fn start(ns: &Netns, assets: &Assets) -> Result<Peer, String> {
        Peer::start_with(ns, assets, PeerOptions::default())
    }

    pub fn start_with(ns: &Netns, assets: &Assets, opts: PeerOptions) -> Result<Peer, String> {
        for f in ["undionly.kpxe", "ipxe.efi"] {
            let p = opts.tftp_root.join(f);
            if !p.is_file() {
                return Err(format!("{} missing (package ipxe)", p.display()));
            }
        }
        let ctrl = ns.ip();
        let www = ns.dir().join("peer-www");
        std::fs::create_dir_all(&www).map_err(|e| e.to_string())?;
        let link = |src: &Path, name: &str| {
            let dst = www.join(name);
            let _ = std::fs::remove_file(&dst);
            std::os::unix::fs::symlink(src, &dst).map_err(|e| format!("{}: {e}", dst.display()))
        };
        link(&assets.kernel, "vmlinuz")?;
        link(&assets.initrd, "initrd.gz")?;
        let base = format!("http://{ctrl}:{}", opts.http_port);
        let script = opts
            .ipxe_script
            .clone()
            .unwrap_or_else(|| ipxe_script(&base, &format!("{base}/phone-home")));
        std::fs::write(www.join("boot.ipxe"), script).map_err(|e| e.to_string())?;
        let http = HttpServer::start(ns, "peer", ctrl, opts.http_port, &www)?;

        let leases = ns.dir().join("peer-dnsmasq.leases");
        let log = ns.dir().join("peer-dnsmasq-dhcp.log");
        let mut conf = dnsmasq_common(ns.interface(), &leases, &log);
        conf.extend([
            "enable-tftp".to_string(),
            format!("tftp-root={}", opts.tftp_root.display()),
            "dhcp-match=set:ipxe,175".into(),
            "dhcp-userclass=set:ipxe,iPXE".into(),
        ]);
        let script_url = format!("{base}/boot.ipxe");
        if opts.proxy {
            // dnsmasq's CSA names: BC_EFI is arch 7, X86-64_EFI is arch 9.
            conf.push(format!(
                "dhcp-range={},proxy,255.255.255.0",
                ns.subnet_ip(0)
            ));
            for csa in ["x86PC", "BC_EFI", "X86-64_EFI"] {
                let binary = if csa == "x86PC" {
                    "undionly.kpxe"
                } else {
                    "ipxe.efi"
                };
                conf.push(format!(
                    "pxe-service=tag:!ipxe,{csa},\"chainload iPXE\",{binary},{ctrl}"
                ));
                conf.push(format!(
                    "pxe-service=tag:ipxe,{csa},\"lab script\",{script_url}"
                ));
            }
        } else {
            conf.extend([
                "dhcp-authoritative".to_string(),
                format!(
                    "dhcp-range={},{},255.255.255.0,1h",
                    ns.subnet_ip(opts.range.0),
                    ns.subnet_ip(opts.range.1)
                ),
                format!("dhcp-option=option:router,{ctrl}"),
                "dhcp-match=set:bios,option:client-arch,0".into(),
                "dhcp-match=set:efi64,option:client-arch,7".into(),
                "dhcp-match=set:efi64,option:client-arch,9".into(),
                format!("dhcp-boot=tag:ipxe,{script_url}"),
                format!("dhcp-boot=tag:!ipxe,tag:bios,undionly.kpxe,,{ctrl}"),
                format!("dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi,,{ctrl}"),
            ]);
        }
        if opts.no_ping {
            conf.push("no-ping".into());
        }
        conf.extend(opts.extra_dnsmasq.iter().cloned());
        let mut dnsmasq = start_dnsmasq(ns, "peer", &conf)?;
        dnsmasq.wait_listening(Proto::Udp, 69, START_TIMEOUT)?;
        Ok(Peer {
            dnsmasq,
            http,
            leases,
            log,
        })
    }

    pub fn http(&self) -> &HttpServer {
        &self.http
    }

    pub fn phone_home_url(&self) -> String {
        self.http.phone_home_url()
    }

    /// dnsmasq's log (`log-dhcp`: every DHCP exchange and TFTP transfer),
    /// then its stderr.
    pub fn dnsmasq_log(&self) -> String {
        dnsmasq_log(&self.log, &self.dnsmasq)
    }

    pub fn leases(&self) -> String {
        read_lossy(&self.leases)
    }

    /// [`HttpServer::wait_phone_home`], with dnsmasq's log in the error.
    pub fn wait_phone_home(&self, vm: &mut Vm, timeout: Duration) -> Result<Duration, String> {
        self.http
            .wait_phone_home(vm, timeout)
            .map_err(|e| format!("{e}\n--- dnsmasq log:\n{}", tail(&self.dnsmasq_log(), 40)))
    }
}

/// A home router's DHCP: dnsmasq in its own namespace `<lab>-router`,
/// plugged into the lab bridge at `10.N.0.<host>` (254 by default), handing
/// out `10.N.0.<range>` with itself as the gateway, and no boot options.
pub struct PlainDhcp {
    // Field order is drop order: the process before its namespace.
    dnsmasq: Proc,
    leases: PathBuf,
    log: PathBuf,
    host: Netns,
}

impl PlainDhcp {
    pub fn start(lab: &Netns) -> Result<PlainDhcp, String> {
        PlainDhcp::start_with(lab, 254, (100, 199))
    }

    pub fn start_with(lab: &Netns, host_octet: u8, range: (u8, u8)) -> Result<PlainDhcp, String> {
        let host = lab
            .add_host("router", host_octet)
            .map_err(|e| format!("router namespace: {e}"))?;
        let leases = host.dir().join("router-dnsmasq.leases");
        let log = host.dir().join("router-dnsmasq-dhcp.log");
        let mut conf = dnsmasq_common(host.interface(), &leases, &log);
        conf.extend([
            "dhcp-authoritative".to_string(),
            format!(
                "dhcp-range={},{},255.255.255.0,1h",
                host.subnet_ip(range.0),
                host.subnet_ip(range.1)
            ),
            format!("dhcp-option=option:router,{}", host.ip()),
        ]);
        let dnsmasq = start_dnsmasq(&host, "router", &conf)?;
        Ok(PlainDhcp {
            dnsmasq,
            leases,
            log,
            host,
        })
    }

    /// The router's address (also the gateway it hands out).
    pub fn router_ip(&self) -> Ipv4Addr {
        self.host.ip()
    }

    /// The router's namespace.
    pub fn netns(&self) -> &Netns {
        &self.host
    }

    /// dnsmasq's DHCP log (its stderr before the log file was opened).
    pub fn log(&self) -> String {
        dnsmasq_log(&self.log, &self.dnsmasq)
    }

    pub fn leases(&self) -> String {
        read_lossy(&self.leases)
    }
}

/// dnsmasq settings every instance here shares: DHCP only on `iface`, no
/// DNS, root (no privilege drop: the files live in a 0700 temp dir), every
/// DHCP detail logged to `log` (syslog format, timestamped to the second;
/// startup errors still go to stderr, the Proc's log).
fn dnsmasq_common(iface: &str, leases: &Path, log: &Path) -> Vec<String> {
    vec![
        "port=0".into(),
        "no-resolv".into(),
        "no-hosts".into(),
        format!("interface={iface}"),
        "bind-interfaces".into(),
        "user=root".into(),
        "group=root".into(),
        "pid-file=".into(),
        format!("dhcp-leasefile={}", leases.display()),
        "log-dhcp".into(),
        format!("log-facility={}", log.display()),
    ]
}

/// dnsmasq's log file; its stderr when the file is empty (config errors
/// come before the file is opened; afterwards stderr repeats the file).
fn dnsmasq_log(file: &Path, proc: &Proc) -> String {
    let text = read_lossy(file);
    if text.is_empty() {
        proc.log()
    } else {
        text
    }
}

fn start_dnsmasq(ns: &Netns, name: &str, conf: &[String]) -> Result<Proc, String> {
    let mut p = spawn_dnsmasq(ns, name, conf)?;
    p.wait_listening(Proto::Udp, 67, START_TIMEOUT)?;
    Ok(p)
}

fn spawn_dnsmasq(ns: &Netns, name: &str, conf: &[String]) -> Result<Proc, String> {
    let dnsmasq = which("dnsmasq").ok_or("dnsmasq not found (package dnsmasq-base)")?;
    let path = ns.dir().join(format!("{name}-dnsmasq.conf"));
    std::fs::write(&path, conf.join("\n") + "\n")
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut cmd = ns.command(dnsmasq);
    cmd.arg("--keep-in-foreground")
        .arg(format!("--conf-file={}", path.display()));
    let mut p = ns
        .spawn(&format!("{name}-dnsmasq"), cmd)
        .map_err(|e| format!("dnsmasq: {e}"))?;
    // Config errors make it exit at once; give it a moment to do so.
    std::thread::sleep(Duration::from_millis(100));
    p.ensure_running()?;
    Ok(p)
}

/// IPv6 router advertisements (SLAAC only, no DHCPv6, no DHCPv4) on the lab
/// bridge from `fd42:<N>::1/64`, so iPXE's IPv6 autoconfiguration finishes at
/// once instead of timing out (measured here: PXE power-on to phone-home
/// 24 s -> 11 s under SeaBIOS, 27 s -> 14 s under OVMF). Binds no DHCPv4
/// port, so it runs beside any DHCP server under test.
pub struct RouterAdvertiser {
    dnsmasq: Proc,
    log: PathBuf,
}

impl RouterAdvertiser {
    pub fn start(lab: &Netns) -> Result<RouterAdvertiser, String> {
        let iface = lab.interface();
        lab.exec([
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{iface}.disable_ipv6=0"),
        ])
        .map_err(|e| e.to_string())?;
        let prefix = format!("fd42:{:x}::", lab.subnet_ip(0).octets()[1]);
        lab.ip_cmd(&[
            "addr",
            "add",
            &format!("{prefix}1/64"),
            "dev",
            iface,
            "nodad",
        ])
        .map_err(|e| e.to_string())?;
        let log = lab.dir().join("ra-dnsmasq.log");
        let conf = vec![
            "port=0".to_string(),
            "no-resolv".into(),
            "no-hosts".into(),
            format!("interface={iface}"),
            "bind-interfaces".into(),
            "user=root".into(),
            "group=root".into(),
            "pid-file=".into(),
            "dhcp-leasefile=/dev/null".into(),
            format!("log-facility={}", log.display()),
            "enable-ra".into(),
            format!("dhcp-range=::,constructor:{iface},ra-only"),
        ];
        let dnsmasq = spawn_dnsmasq(lab, "ra", &conf)?;
        Ok(RouterAdvertiser { dnsmasq, log })
    }

    pub fn log(&self) -> String {
        dnsmasq_log(&self.log, &self.dnsmasq)
    }
}
