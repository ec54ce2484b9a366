//! Storms against the daemon (`homelab serve`) in a network namespace.
//!
//! Each test creates a lab namespace (the controller on `br0`, 10.N.0.1/24)
//! and a client namespace plugged into its bridge (`eth0`, 10.N.0.2), both
//! removed on every exit path. The clients are this test process: a thread
//! enters the client namespace (setns) and opens its sockets there, so they
//! stay in it when used from any thread.
//!
//! - DHCP: 50 PXE clients at once, half unknown, retrying every second:
//!   unknown ones are recorded once each (and never answered in proxy mode),
//!   known ones all get their answer (their lease in authoritative mode), and
//!   the daemon's memory stays bounded. A UEFI client that talks only to
//!   port 4011 gets its boot file.
//! - SIGKILL during a DHCP load: every ACK a client received names a lease
//!   that is in the database after the kill.
//! - TFTP: transfers aborted with ERROR give their slot back at once.
//! - HTTP: connections that send nothing are closed after the header timeout
//!   and do not hold up a download.
//!
//! Without root (or `ip`) they are skipped with a reason, unless
//! HOMELAB_REQUIRE_LAB=1 (then they fail).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Netns, Proc, Proto};
use dhcproto::v4::{Architecture, DhcpOption, Flags, Message, MessageType};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use homelab::state::State;

const HTTP_PORT: u16 = 8080;
/// Size of the fake ipxe.efi: big enough that its download spans the storm.
const EFI_LEN: usize = 16 << 20;

/// Root and iproute2, or skip (fail under HOMELAB_REQUIRE_LAB=1).
fn lab_ready(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root (network namespaces)");
    }
    if common::which("ip").is_none() {
        missing.push("program `ip` (iproute2)");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: needs {}", missing.join(", "));
    if common::require_lab() {
        panic!("{msg}; HOMELAB_REQUIRE_LAB is set, so this fails instead of skipping");
    }
    eprintln!("SKIP {msg}");
    false
}

// ---- the lab: the daemon and a client namespace ----

struct Lab {
    // Field order is drop order: the daemon goes before its namespaces.
    daemon: Proc,
    client: Netns,
    ns: Netns,
}

#[derive(Clone, Copy)]
enum Mode {
    Proxy,
    /// Authoritative on a /16 so that a load has thousands of addresses.
    Authoritative,
}

fn known_mac(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0xaa, 0x00, i as u8]
}

fn unknown_mac(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0xbb, 0x00, i as u8]
}

fn mac_str(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Lab {
    /// The daemon in a fresh lab with `nodes` known nodes (MACs
    /// [`known_mac`], addresses 10.N.0.10+i), listening on DHCP, TFTP, HTTP.
    fn start(mode: Mode, nodes: usize) -> Lab {
        let ns = Netns::new().expect("creating the lab namespace");
        let client = ns.add_host("c", 2).expect("creating the client namespace");
        let dir = ns.dir();
        let ipxe = dir.join("ipxe");
        std::fs::create_dir(&ipxe).unwrap();
        std::fs::write(ipxe.join("undionly.kpxe"), vec![0x55u8; 100_000]).unwrap();
        let efi: Vec<u8> = (0..EFI_LEN as u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(ipxe.join("ipxe.efi"), efi).unwrap();
        let dhcp = match mode {
            Mode::Proxy => format!("dhcp = \"proxy\"\nsubnet = \"{}\"\n", ns.subnet()),
            Mode::Authoritative => format!(
                "dhcp = \"authoritative\"\nsubnet = \"{net}/16\"\npool = \"{p}.1.0-{p}.250.255\"\nlease_time = 3600\n",
                net = ns.subnet().trim_end_matches("/24"),
                p = ns.subnet().split('.').take(2).collect::<Vec<_>>().join("."),
            ),
        };
        let mut inv = format!(
            "[controller]\ninterface = \"{BR}\"\naddress = \"{ip}\"\nhttp_port = {HTTP_PORT}\nipxe_dir = \"{ipxe}\"\n{dhcp}\n\
             [cluster]\nk3s_version = \"v1.31.4+k3s1\"\n\n\
             [os]\nimage = \"https://example.invalid/storm.raw\"\nsha256 = \"{digest}\"\n",
            BR = common::netns::BRIDGE,
            ip = ns.ip(),
            ipxe = ipxe.display(),
            digest = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        );
        for i in 0..nodes {
            let role = if i == 0 { "server" } else { "agent" };
            inv.push_str(&format!(
                "\n[nodes.n{i}]\nmac = \"{}\"\nip = \"{}\"\nrole = \"{role}\"\n",
                mac_str(&known_mac(i)),
                ns.subnet_ip(10 + i as u8),
            ));
        }
        std::fs::write(dir.join("inventory.toml"), inv).unwrap();
        let mut daemon = ns
            .spawn("homelab", common::homelab::homelab_cmd(&ns, &["serve"]))
            .expect("starting homelab serve");
        for (proto, port) in [(Proto::Udp, 67), (Proto::Udp, 69), (Proto::Tcp, HTTP_PORT)] {
            daemon
                .wait_listening(proto, port, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e}\n{}", common::tail(&daemon.log(), 40)));
        }
        Lab { daemon, client, ns }
    }

    fn state_dir(&self) -> PathBuf {
        self.ns.dir().join("state")
    }

    /// Run `f` on a thread inside the client namespace (sockets it opens stay there).
    fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.client.name());
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the client-namespace thread panicked")
    }

    /// UDP 0.0.0.0:68 on the client's eth0, allowed to broadcast.
    fn dhcp_client_socket(&self) -> UdpSocket {
        // Room for the replies of a load.
        self.in_client(|| homelab::testing::dhcp_client_socket("eth0", Some(8 << 20)))
    }

    fn udp(&self) -> UdpSocket {
        let ip = self.client.ip();
        self.in_client(move || UdpSocket::bind((ip, 0)).unwrap())
    }

    fn tcp(&self, n: usize) -> Vec<TcpStream> {
        let to = SocketAddr::from((self.ns.ip(), HTTP_PORT));
        self.in_client(move || {
            (0..n)
                .map(|_| TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap())
                .collect()
        })
    }

    /// Stop the daemon (SIGTERM) and open its state database.
    fn stop_and_open(&mut self) -> State {
        self.daemon.stop(Duration::from_secs(10));
        State::open(&self.state_dir()).unwrap()
    }
}

// ---- DHCP packets ----

const BROADCAST_67: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);

fn pxe(mac: &[u8; 6], xid: u32, kind: MessageType, arch: u16) -> Message {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(xid, z, z, z, z, mac);
    m.set_flags(Flags::default().set_broadcast());
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::ClassIdentifier(
        format!("PXEClient:Arch:{arch:05}:UNDI:003016").into_bytes(),
    ));
    o.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(
        arch,
    )));
    o.insert(DhcpOption::ClientNetworkInterface(1, 3, 16));
    m
}

/// An ordinary client's message (no PXE options), broadcast flag set.
fn plain(mac: &[u8; 6], xid: u32, kind: MessageType) -> Message {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(xid, z, z, z, z, mac);
    m.set_flags(Flags::default().set_broadcast());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m
}

/// The REQUEST that takes `offer`.
fn selecting(mut req: Message, offer: &Message) -> Message {
    let server = offer.opts().get(dhcproto::v4::OptionCode::ServerIdentifier);
    if let Some(DhcpOption::ServerIdentifier(s)) = server {
        req.opts_mut().insert(DhcpOption::ServerIdentifier(*s));
    }
    req.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
    req
}

fn encode(m: &Message) -> Vec<u8> {
    let mut v = Vec::new();
    m.encode(&mut Encoder::new(&mut v)).unwrap();
    v
}

fn recv_message(sock: &UdpSocket, buf: &mut [u8]) -> Option<Message> {
    let (n, _) = sock.recv_from(buf).ok()?;
    Message::decode(&mut Decoder::new(&buf[..n])).ok()
}

fn chaddr6(m: &Message) -> [u8; 6] {
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&m.chaddr()[..6]);
    mac
}

fn fname(m: &Message) -> String {
    String::from_utf8_lossy(m.fname().unwrap_or_default())
        .trim_end_matches('\0')
        .to_string()
}

// ---- DHCP storm ----

/// What the 50 clients of a storm got.
#[derive(Default)]
struct StormResult {
    /// Replies per client MAC: (message type, yiaddr, boot file).
    replies: HashMap<[u8; 6], Vec<(MessageType, Ipv4Addr, String)>>,
    rss_idle_kib: u64,
    rss_peak_kib: u64,
}

const KNOWN: usize = 25;
const UNKNOWN: usize = 25;
const ROUNDS: u32 = 4;
/// Known clients that ignore their first answer and retry like the unknown ones.
const STUBBORN: usize = 5;

/// 25 known and 25 unknown PXE clients DISCOVER at once; unknown ones (and
/// the first few known ones, the first time) DISCOVER again every second;
/// known ones take their offer (REQUEST) in authoritative mode.
fn storm(lab: &Lab, authoritative: bool) -> StormResult {
    let sock = lab.dhcp_client_socket();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut result = StormResult {
        rss_idle_kib: lab.daemon.rss_kib(),
        ..StormResult::default()
    };
    let clients: Vec<([u8; 6], u32, bool)> = (0..KNOWN)
        .map(|i| (known_mac(i), 0x1000 + i as u32, true))
        .chain((0..UNKNOWN).map(|i| (unknown_mac(i), 0x2000 + i as u32, false)))
        .collect();
    let mut done: BTreeSet<[u8; 6]> = BTreeSet::new();
    let mut buf = vec![0u8; 2048];
    for round in 0..ROUNDS {
        for &(mac, xid, known) in &clients {
            if !done.contains(&mac) || !known {
                let arch = if known { 7 } else { 0 };
                let m = encode(&pxe(&mac, xid, MessageType::Discover, arch));
                sock.send_to(&m, BROADCAST_67).unwrap();
            }
        }
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            result.rss_peak_kib = result.rss_peak_kib.max(lab.daemon.rss_kib());
            let Some(reply) = recv_message(&sock, &mut buf) else {
                continue;
            };
            let mac = chaddr6(&reply);
            let Some(&(_, xid, known)) = clients.iter().find(|c| c.0 == mac) else {
                continue;
            };
            let kind = reply.opts().msg_type().unwrap_or(MessageType::Unknown(0));
            result
                .replies
                .entry(mac)
                .or_default()
                .push((kind, reply.yiaddr(), fname(&reply)));
            let stubborn = known && round == 0 && (mac[5] as usize) < STUBBORN;
            if !known || stubborn {
                continue;
            }
            match kind {
                MessageType::Offer if authoritative => {
                    let req = selecting(pxe(&mac, xid, MessageType::Request, 7), &reply);
                    sock.send_to(&encode(&req), BROADCAST_67).unwrap();
                }
                MessageType::Offer | MessageType::Ack => {
                    done.insert(mac);
                }
                _ => {}
            }
        }
    }
    result
}

/// Unknown clients: in the discovered table once each (one sighting, one event).
fn assert_recorded_once(state: &State) {
    let discovered = state.discovered().unwrap();
    let macs: BTreeSet<String> = discovered.iter().map(|d| d.mac.clone()).collect();
    let want: BTreeSet<String> = (0..UNKNOWN).map(|i| mac_str(&unknown_mac(i))).collect();
    assert_eq!(macs, want, "exactly the unknown clients are recorded");
    for d in &discovered {
        assert_eq!(d.seen_count, 1, "{} recorded more than once: {d:?}", d.mac);
    }
    let events = state
        .last_events(10_000, None)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "dhcp.unknown-client")
        .count();
    assert_eq!(
        events, UNKNOWN,
        "one dhcp.unknown-client event per unknown client"
    );
}

/// Bound on the daemon's memory growth through a 50-client storm. The
/// storm's own state is small (an offer and a sighting per client, a few
/// hundred bytes each, and at most a few dozen queued lease writes), so any
/// growth beyond allocator and SQLite page-cache warm-up (a few MiB) would
/// mean something grows per packet.
const RSS_GROWTH_KIB: u64 = 16 << 10;

fn assert_rss_bounded(r: &StormResult) {
    eprintln!(
        "daemon RSS: {} KiB idle, {} KiB peak during the storm",
        r.rss_idle_kib, r.rss_peak_kib
    );
    assert!(r.rss_idle_kib > 0, "no RSS read for the daemon");
    assert!(
        r.rss_peak_kib <= r.rss_idle_kib + RSS_GROWTH_KIB,
        "RSS grew from {} to {} KiB",
        r.rss_idle_kib,
        r.rss_peak_kib
    );
}

#[test]
fn proxy_storm_answers_known_clients_and_records_unknown_ones_once() {
    if !lab_ready("proxy_storm") {
        return;
    }
    let mut lab = Lab::start(Mode::Proxy, KNOWN);
    let start = Instant::now();
    let r = storm(&lab, false);
    for i in 0..UNKNOWN {
        let mac = unknown_mac(i);
        assert!(
            r.replies.get(&mac).is_none_or(|v| v.is_empty()),
            "unknown {} was answered: {:?}",
            mac_str(&mac),
            r.replies[&mac]
        );
    }
    for i in 0..KNOWN {
        let mac = known_mac(i);
        let got = r.replies.get(&mac).map(Vec::as_slice).unwrap_or_default();
        assert!(
            got.iter()
                .any(|(k, _, f)| *k == MessageType::Offer && f.ends_with(".efi")),
            "known {} got no boot offer: {got:?}",
            mac_str(&mac)
        );
    }
    // Stubborn clients asked again and were answered again.
    assert!(r.replies[&known_mac(0)].len() >= 2);
    eprintln!(
        "proxy storm: 50 clients, {ROUNDS} rounds in {:?}",
        start.elapsed()
    );
    assert_rss_bounded(&r);
    // A UEFI client that talks only to port 4011 (after the home router's
    // address offer and our proxy offer) gets its boot file, unicast.
    let sock = lab.udp();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mac = known_mac(3);
    let mut req = pxe(&mac, 0x4011, MessageType::Request, 7);
    req.set_ciaddr(lab.client.ip());
    req.set_flags(Flags::default());
    let to = SocketAddr::from((lab.ns.ip(), 4011));
    let mut buf = vec![0u8; 2048];
    let mut ack = None;
    for _ in 0..3 {
        sock.send_to(&encode(&req), to).unwrap();
        if let Some(m) = recv_message(&sock, &mut buf) {
            ack = Some(m);
            break;
        }
    }
    let ack = ack.expect("no answer on port 4011");
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.xid(), 0x4011);
    assert_eq!(fname(&ack), "ipxe.efi");
    let state = lab.stop_and_open();
    assert_recorded_once(&state);
}

#[test]
fn authoritative_storm_leases_every_known_client_and_records_unknown_ones_once() {
    if !lab_ready("authoritative_storm") {
        return;
    }
    let mut lab = Lab::start(Mode::Authoritative, KNOWN);
    let r = storm(&lab, true);
    for i in 0..KNOWN {
        let mac = known_mac(i);
        let want = lab.ns.subnet_ip(10 + i as u8);
        let got = r.replies.get(&mac).map(Vec::as_slice).unwrap_or_default();
        assert!(
            got.iter()
                .any(|(k, ip, _)| *k == MessageType::Ack && *ip == want),
            "known {} got no ACK for {want}: {got:?}",
            mac_str(&mac)
        );
    }
    // Unknown PXE clients get an address (ordinary clients of the network)
    // but never a boot file.
    for i in 0..UNKNOWN {
        let mac = unknown_mac(i);
        for (_, _, f) in r.replies.get(&mac).map(Vec::as_slice).unwrap_or_default() {
            assert!(f.is_empty(), "unknown {} was offered {f}", mac_str(&mac));
        }
    }
    assert_rss_bounded(&r);
    let state = lab.stop_and_open();
    let leases: BTreeMap<String, String> = state
        .leases()
        .unwrap()
        .into_iter()
        .map(|l| (l.mac, l.ip))
        .collect();
    for i in 0..KNOWN {
        assert_eq!(
            leases.get(&mac_str(&known_mac(i))),
            Some(&lab.ns.subnet_ip(10 + i as u8).to_string()),
            "lease of n{i}"
        );
    }
    assert_recorded_once(&state);
}

// ---- SIGKILL during a load ----

/// Ordinary clients run DISCOVER-OFFER-REQUEST-ACK with fresh MACs, 64 at a
/// time, while the daemon is killed with SIGKILL. Every ACK received must
/// name a lease that the database holds after the kill: the reply leaves
/// only after the lease is committed.
#[test]
fn sigkill_during_a_dhcp_load_loses_no_acknowledged_lease() {
    if !lab_ready("sigkill_during_a_dhcp_load") {
        return;
    }
    let mut lab = Lab::start(Mode::Authoritative, 1);
    let sock = lab.dhcp_client_socket();
    sock.set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    const IN_FLIGHT: u32 = 64;
    let mac_of = |n: u32| -> [u8; 6] {
        let b = n.to_be_bytes();
        [0x02, 0x77, b[0], b[1], b[2], b[3]]
    };
    let discover = |n: u32| encode(&plain(&mac_of(n), n, MessageType::Discover));
    let mut next: u32 = 0;
    // Exchanges started and not finished: xid -> when last sent.
    let mut open: HashMap<u32, Instant> = HashMap::new();
    let mut acked: Vec<([u8; 6], Ipv4Addr)> = Vec::new();
    let mut last_ack = Instant::now();
    let mut buf = vec![0u8; 2048];
    let load_for = Duration::from_millis(1500);
    let start = Instant::now();
    let mut killed_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if killed_at.is_none() && now - start >= load_for {
            // The daemon is `ip netns exec`'s pid, exec'd into homelab.
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(lab.daemon.pid() as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            killed_at = Some(now);
        }
        // After the kill, only drain what is already on its way.
        if killed_at.is_some_and(|k| now - k > Duration::from_millis(500)) {
            break;
        }
        if killed_at.is_none() {
            while (open.len() as u32) < IN_FLIGHT {
                sock.send_to(&discover(next), BROADCAST_67).unwrap();
                open.insert(next, now);
                next += 1;
            }
            // Lost packets: start that exchange again.
            for (&xid, sent) in open.iter_mut() {
                if now - *sent > Duration::from_millis(500) {
                    sock.send_to(&discover(xid), BROADCAST_67).unwrap();
                    *sent = now;
                }
            }
        }
        let Some(reply) = recv_message(&sock, &mut buf) else {
            continue;
        };
        let xid = reply.xid();
        if !open.contains_key(&xid) {
            continue;
        }
        match reply.opts().msg_type() {
            Some(MessageType::Offer) if killed_at.is_none() => {
                let req = selecting(plain(&mac_of(xid), xid, MessageType::Request), &reply);
                sock.send_to(&encode(&req), BROADCAST_67).unwrap();
            }
            Some(MessageType::Ack) => {
                acked.push((chaddr6(&reply), reply.yiaddr()));
                open.remove(&xid);
                last_ack = Instant::now();
            }
            _ => {}
        }
    }
    let killed_at = killed_at.unwrap();
    assert!(
        lab.daemon.wait_exit(Duration::from_secs(5)).is_some(),
        "the daemon did not die"
    );
    eprintln!(
        "{} ACKs in {:?}; the last {:?} before the kill; {} exchanges open at the kill",
        acked.len(),
        killed_at - start,
        killed_at.saturating_duration_since(last_ack),
        open.len()
    );
    assert!(
        acked.len() >= 200,
        "too little load to mean anything: {} ACKs",
        acked.len()
    );
    assert!(
        last_ack + Duration::from_millis(200) >= killed_at,
        "the load had stopped before the kill"
    );
    // Restarted: the database as the next daemon would open it.
    let state = State::open(&lab.state_dir()).unwrap();
    let leases: HashMap<String, String> = state
        .leases()
        .unwrap()
        .into_iter()
        .map(|l| (l.mac, l.ip))
        .collect();
    let lost: Vec<String> = acked
        .iter()
        .filter(|(mac, ip)| leases.get(&mac_str(mac)) != Some(&ip.to_string()))
        .map(|(mac, ip)| format!("{} {ip}", mac_str(mac)))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged leases are not in the database after SIGKILL: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
}

// ---- TFTP: aborted transfers ----

fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut p = vec![0, 1];
    for part in [name, "octet"]
        .into_iter()
        .chain(options.iter().flat_map(|(k, v)| [*k, *v]))
    {
        p.extend_from_slice(part.as_bytes());
        p.push(0);
    }
    p
}

/// How many transfers at once the daemon allows (homelab::netboot::tftp::MAX_TRANSFERS).
const TFTP_SLOTS: usize = homelab::netboot::tftp::MAX_TRANSFERS;

/// More transfers than there are slots are started and each aborted with an
/// ERROR right after its OACK (as PXE ROMs do after the tsize probe); a new
/// client right after must be served, not told the server is busy.
#[test]
fn tftp_transfers_aborted_with_error_free_their_slots_at_once() {
    if !lab_ready("tftp_aborts") {
        return;
    }
    let lab = Lab::start(Mode::Proxy, 1);
    let server = SocketAddr::from((lab.ns.ip(), 69));
    let socks: Vec<UdpSocket> = (0..TFTP_SLOTS + 44).map(|_| lab.udp()).collect();
    let mut buf = vec![0u8; 2048];
    let start = Instant::now();
    let mut aborted = 0;
    // In waves smaller than the slots, each aborted before the next.
    for wave in socks.chunks(100) {
        for s in wave {
            s.send_to(&rrq("undionly.kpxe", &[("tsize", "0")]), server)
                .unwrap();
        }
        for s in wave {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let (n, from) = s.recv_from(&mut buf).expect("an answer to the RRQ");
            assert_eq!(
                &buf[..2],
                [0, 6],
                "an OACK, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            s.send_to(b"\x00\x05\x00\x00aborted\x00", from).unwrap();
            aborted += 1;
        }
    }
    let aborts_took = start.elapsed();
    // A new client right away: served (OACK), not "server busy".
    let fresh = lab.udp();
    fresh
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let asked = Instant::now();
    fresh
        .send_to(&rrq("undionly.kpxe", &[("tsize", "0")]), server)
        .unwrap();
    let (n, from) = fresh.recv_from(&mut buf).expect("an answer");
    let answered = asked.elapsed();
    assert_eq!(
        &buf[..2],
        [0, 6],
        "a fresh client after {aborted} aborted transfers got {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // And fetches the whole file.
    fresh.send_to(&[0, 4, 0, 0], from).unwrap();
    let mut got = 0;
    loop {
        let (n, from) = fresh.recv_from(&mut buf).expect("DATA");
        assert_eq!(&buf[..2], [0, 3]);
        got += n - 4;
        fresh.send_to(&[0, 4, buf[2], buf[3]], from).unwrap();
        if n - 4 < 512 {
            break;
        }
    }
    assert_eq!(got, 100_000);
    eprintln!("{aborted} transfers started and aborted in {aborts_took:?}; a fresh one answered in {answered:?}");
}

// ---- HTTP: connections that send nothing ----

fn get(stream: &mut TcpStream, path: &str) -> (String, usize) {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut all = Vec::new();
    stream.read_to_end(&mut all).unwrap();
    let head_end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&all[..head_end]).into_owned();
    (head, all.len() - head_end - 4)
}

/// Hundreds of connections that open and send nothing (more than the
/// connection limit): a download started before them runs through, they
/// are closed after the header timeout, and a new download after them works.
#[test]
fn http_connections_that_send_nothing_are_bounded_and_downloads_go_on() {
    if !lab_ready("http_slowloris") {
        return;
    }
    let lab = Lab::start(Mode::Proxy, 1);
    let limit = homelab::netboot::http::MAX_CONNECTIONS;
    let header_timeout = homelab::netboot::http::HEADER_TIMEOUT;
    // The real download, read slowly while the storm comes.
    let mut stream = lab.tcp(1).pop().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET /boot/ipxe/ipxe.efi HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let download = std::thread::spawn(move || {
        let mut total = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        let start = Instant::now();
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) => panic!("the download broke after {total} bytes: {e}"),
            }
            // About 2 MB/s: the download spans most of the storm.
            std::thread::sleep(Duration::from_millis(30));
        }
        (total, start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let storm_start = Instant::now();
    // The kernel queues connections past the limit (backlog): they connect too.
    let idle = lab.tcp(limit + 50);
    eprintln!(
        "{} silent connections opened in {:?}",
        idle.len(),
        storm_start.elapsed()
    );
    // While they sit there: a new client is answered once the header timeout
    // has closed silent ones, not after the 30 s idle timeout.
    let mut fresh = lab.tcp(1).pop().unwrap();
    fresh.set_read_timeout(Some(header_timeout * 3)).unwrap();
    let asked = Instant::now();
    let (head, body) = get(&mut fresh, "/boot/ipxe/undionly.kpxe");
    let answered = asked.elapsed();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, 100_000);
    assert!(
        answered < header_timeout + Duration::from_secs(3),
        "a new client waited {answered:?} behind silent connections"
    );
    // Every silent connection is closed by the server within two header
    // timeouts (those past the limit waited for a place first).
    let settled = storm_start + header_timeout * 2 + Duration::from_secs(1);
    std::thread::sleep(settled.saturating_duration_since(Instant::now()));
    let mut open = 0;
    for mut c in idle {
        c.set_nonblocking(true).unwrap();
        let mut one = [0u8; 1];
        if matches!(c.read(&mut one), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            open += 1;
        }
    }
    assert_eq!(
        open,
        0,
        "silent connections still open after {:?}",
        storm_start.elapsed()
    );
    let (total, took) = download.join().unwrap();
    assert!(total > EFI_LEN, "the download ended short: {total} bytes");
    eprintln!(
        "download of {EFI_LEN} bytes beside the storm took {took:?}; a new client was answered after {answered:?}"
    );
}
