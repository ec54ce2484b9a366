//! TFTP: read-only, and only the iPXE binaries. BIOS and most UEFI firmware
//! can fetch their first program only over TFTP; everything after that goes
//! over HTTP.
//!
//! The server is written here (RFC 1350 with the blksize, tsize and
//! windowsize options of RFCs 2348, 2349 and 7440), for what PXE ROMs do:
//! - They abort after the tsize probe with an ERROR and ask again. An ERROR
//!   ends the transfer at once and frees its place among the
//!   [`MAX_TRANSFERS`]; a new request from the same address replaces the
//!   transfer still running for it. (async-tftp, used before, ignored the
//!   ERROR and held the transfer through all its re-sends.)
//! - A silent client is given up after (retries + 1) x timeout
//!   ([`TIMEOUT`], [`MAX_SEND_RETRIES`]); clients may not raise the timeout.
//! - Files are a lookup in an in-memory cache of the few binaries, so a storm
//!   of requests costs neither disk reads nor a copy of the file each.
//! - Requests are parsed by [`parse_request`], pure and fuzzed.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use tokio::sync::watch;

use super::Shared;
use crate::inventory::Controller;

/// The only files TFTP serves (Debian's `ipxe` package names), by exact name.
pub const SERVED: &[&str] = &["undionly.kpxe", "ipxe.efi", "snponly.efi", "ipxe-arm64.efi"];

/// The binaries DHCP hands out to BIOS and x86-64 UEFI clients: start-up
/// fails without them. (snponly.efi and the arm64 binary are optional.)
pub const REQUIRED: &[(&str, &str)] = &[
    ("undionly.kpxe", "BIOS clients"),
    ("ipxe.efi", "x86-64 UEFI clients"),
];

/// How long the server waits for an ACK before sending a packet again. A
/// client's `timeout` option is ignored, so no client can stretch it.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// Re-sends of one packet before the transfer is dropped: an abandoned
/// transfer is gone after (MAX_SEND_RETRIES + 1) x TIMEOUT = 4 s.
pub const MAX_SEND_RETRIES: u32 = 3;
/// The largest block offered: a full Ethernet frame without IP fragmentation,
/// which some PXE ROMs cannot reassemble.
pub const BLOCK_SIZE_LIMIT: u16 = 1468;
/// Transfers running at once; more are refused ("busy") so a storm cannot
/// exhaust file descriptors (each transfer holds a socket).
pub const MAX_TRANSFERS: usize = 256;

/// Refuse to start when the iPXE binaries that clients will be told to fetch are missing.
pub fn check_ipxe_dir(controller: &Controller) -> Result<()> {
    let dir = &controller.ipxe_dir;
    let problems: Vec<String> = REQUIRED
        .iter()
        .filter_map(|(name, who)| {
            let path = dir.join(name);
            match std::fs::File::open(&path).and_then(|f| f.metadata()) {
                Ok(m) if m.is_file() && m.len() > 0 => None,
                Ok(_) => Some(format!(
                    "{} (for {who}) is empty or not a file",
                    path.display()
                )),
                Err(e) => Some(format!("{} (for {who}): {e}", path.display())),
            }
        })
        .collect();
    if !problems.is_empty() {
        bail!(
            "iPXE binaries missing:\n  {}\ninstall Debian's ipxe package (`apt install ipxe`, which puts \
             them in /usr/lib/ipxe), or set controller.ipxe_dir in the inventory to a folder that has them",
            problems.join("\n  ")
        );
    }
    Ok(())
}

// ---- the request grammar ----

/// Read (RRQ) or write (WRQ) request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Read,
    Write,
}

/// Transfer mode (RFC 1350), matched without regard to case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Netascii,
    Octet,
    Mail,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Netascii => "netascii",
            Mode::Octet => "octet",
            Mode::Mail => "mail",
        }
    }
}

/// A TFTP read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Opcode,
    /// As sent; may be empty or a path (the server refuses both).
    pub filename: String,
    pub mode: Mode,
    /// Options (RFC 2347) in the order sent, names in lower case, values as sent.
    pub options: Vec<(String, String)>,
}

/// Why bytes are not a TFTP request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("shorter than an opcode")]
    TooShort,
    #[error("opcode {0} is not a read or write request")]
    NotARequest(u16),
    #[error("the {0} is not NUL-terminated")]
    Unterminated(&'static str),
    #[error("the {0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("unknown transfer mode `{0}`")]
    UnknownMode(String),
}

/// Parse an RRQ or WRQ (RFC 1350, options RFC 2347): opcode, file name NUL,
/// mode NUL, then (name NUL value NUL) pairs to the end of the packet.
///
/// Accepts UTF-8 strings, modes netascii, octet and mail in any case (all
/// served as bytes), any option names (unknown ones are ignored by the
/// server). Pure; never panics.
pub fn parse_request(bytes: &[u8]) -> Result<Request, ParseError> {
    let (op, mut rest) = match bytes {
        [0, 1, rest @ ..] => (Opcode::Read, rest),
        [0, 2, rest @ ..] => (Opcode::Write, rest),
        [a, b, ..] => return Err(ParseError::NotARequest(u16::from_be_bytes([*a, *b]))),
        _ => return Err(ParseError::TooShort),
    };
    let filename = nul_str(&mut rest, "file name")?.to_string();
    let mode = nul_str(&mut rest, "mode")?;
    let mode = [Mode::Netascii, Mode::Octet, Mode::Mail]
        .into_iter()
        .find(|m| mode.eq_ignore_ascii_case(m.as_str()))
        .ok_or_else(|| ParseError::UnknownMode(mode.to_string()))?;
    let mut options = Vec::new();
    while !rest.is_empty() {
        let name = nul_str(&mut rest, "option name")?.to_ascii_lowercase();
        let value = nul_str(&mut rest, "option value")?.to_string();
        options.push((name, value));
    }
    Ok(Request {
        op,
        filename,
        mode,
        options,
    })
}

fn nul_str<'a>(rest: &mut &'a [u8], what: &'static str) -> Result<&'a str, ParseError> {
    let end = rest
        .iter()
        .position(|b| *b == 0)
        .ok_or(ParseError::Unterminated(what))?;
    let s = std::str::from_utf8(&rest[..end]).map_err(|_| ParseError::NotUtf8(what))?;
    *rest = &rest[end + 1..];
    Ok(s)
}

impl Request {
    /// The packet bytes; `parse_request(&r.encode()) == Ok(r)` for any parsed `r`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0, if self.op == Opcode::Read { 1 } else { 2 }];
        let fields = [self.filename.as_str(), self.mode.as_str()]
            .into_iter()
            .chain(
                self.options
                    .iter()
                    .flat_map(|(k, v)| [k.as_str(), v.as_str()]),
            );
        for field in fields {
            out.extend_from_slice(field.as_bytes());
            out.push(0);
        }
        out
    }

    /// The value of option `name` (the last one, if sent twice).
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The block size asked for, when valid (RFC 2348: 8 to 65464).
    pub fn blksize(&self) -> Option<u16> {
        self.option("blksize")?
            .parse()
            .ok()
            .filter(|n| (8..=65464).contains(n))
    }

    /// The transfer size option (RFC 2349; 0 in a read request asks for the size).
    pub fn tsize(&self) -> Option<u64> {
        self.option("tsize")?.parse().ok()
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = if self.op == Opcode::Read {
            "read"
        } else {
            "write"
        };
        write!(f, "{op} {:?} ({})", self.filename, self.mode.as_str())?;
        for (k, v) in &self.options {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

/// The served name a requested file name stands for: exactly one of
/// [`SERVED`]. Directories, `..`, absolute paths and every other name are refused.
pub fn allowed_name(path: &Path) -> Option<&'static str> {
    let name = path.to_str()?;
    SERVED.iter().copied().find(|s| *s == name)
}

/// The inventory node a client address belongs to: the node with that
/// address in the inventory, or the node whose MAC holds that lease.
pub(crate) fn node_for_ip(shared: &Shared, ip: IpAddr) -> Option<String> {
    let inv = shared.inventory();
    if let Some(n) = inv.nodes.values().find(|n| IpAddr::V4(n.ip) == ip) {
        return Some(n.name.clone());
    }
    let lease = shared.state.lease_by_ip(&ip.to_string()).ok()??;
    let mac = lease.mac.parse().ok()?;
    inv.node_by_mac(mac).map(|n| n.name.clone())
}

// ---- serving ----

/// The binaries read so far, re-read when their size or mtime changes.
struct Files {
    shared: Arc<Shared>,
    cache: HashMap<&'static str, Cached>,
}

struct Cached {
    len: u64,
    modified: Option<SystemTime>,
    bytes: Arc<[u8]>,
}

impl Files {
    fn load(&mut self, name: &'static str) -> std::io::Result<Arc<[u8]>> {
        let path = self.shared.inventory().controller.ipxe_dir.join(name);
        let meta = std::fs::metadata(&path)?;
        if !meta.is_file() {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        let modified = meta.modified().ok();
        if let Some(c) = self.cache.get(name) {
            if c.len == meta.len() && c.modified == modified {
                return Ok(c.bytes.clone());
            }
        }
        let bytes: Arc<[u8]> = std::fs::read(&path)?.into();
        self.cache.insert(
            name,
            Cached {
                len: bytes.len() as u64,
                modified,
                bytes: bytes.clone(),
            },
        );
        Ok(bytes)
    }
}

/// TFTP error codes (RFC 1350).
const NOT_DEFINED: u16 = 0;
const FILE_NOT_FOUND: u16 = 1;
const ACCESS_VIOLATION: u16 = 2;

/// An ERROR packet.
fn error_packet(code: u16, message: &str) -> Vec<u8> {
    let mut p = vec![0, 5];
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(message.as_bytes());
    p.push(0);
    p
}

/// What a read request gets: the options acknowledged (in an OACK, when
/// any) and the block size. Unknown options and `timeout` are not
/// acknowledged (the server keeps its own [`TIMEOUT`]); `windowsize` is
/// acknowledged as 1 (one block in flight, RFC 7440).
fn negotiate(req: &Request, size: u64) -> (Vec<(&'static str, String)>, usize) {
    let mut oack = Vec::new();
    let blksize = req.blksize().map(|b| b.min(BLOCK_SIZE_LIMIT));
    if let Some(b) = blksize {
        oack.push(("blksize", b.to_string()));
    }
    if req.tsize() == Some(0) {
        oack.push(("tsize", size.to_string()));
    }
    if req.option("windowsize").is_some() {
        oack.push(("windowsize", "1".to_string()));
    }
    (oack, blksize.map_or(512, usize::from))
}

fn oack_packet(options: &[(&str, String)]) -> Vec<u8> {
    let mut p = vec![0, 6];
    for (k, v) in options {
        p.extend_from_slice(k.as_bytes());
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        p.push(0);
    }
    p
}

/// What came back from the client for the packet just sent.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// The ACK of this block.
    Ack,
    /// The client sent ERROR: it gave the transfer up.
    Aborted,
    /// Nothing after every re-send.
    Silent,
}

/// Classify a packet from the client while block `block` is outstanding:
/// `None` for anything to ignore (an old ACK, garbage).
fn answer(packet: &[u8], block: u16) -> Option<Answer> {
    match packet {
        [0, 4, hi, lo, ..] if u16::from_be_bytes([*hi, *lo]) == block => Some(Answer::Ack),
        [0, 5, ..] => Some(Answer::Aborted),
        _ => None,
    }
}

/// One read transfer, from its own port (the transfer ID, RFC 1350).
struct Transfer {
    socket: tokio::net::UdpSocket,
    client: SocketAddr,
    name: &'static str,
    data: Arc<[u8]>,
    _slot: Slot,
}

impl Transfer {
    /// Send `packet` until the client acknowledges `block`, gives up, or
    /// stays silent through the re-sends.
    async fn send(&self, packet: &[u8], block: u16) -> std::io::Result<Answer> {
        let mut buf = [0u8; 1024];
        for _ in 0..=MAX_SEND_RETRIES {
            self.socket.send_to(packet, self.client).await?;
            let deadline = tokio::time::Instant::now() + TIMEOUT;
            loop {
                let got = tokio::time::timeout_at(deadline, self.socket.recv_from(&mut buf)).await;
                let Ok(received) = got else {
                    break; // timed out: send again
                };
                let (n, from) = received?;
                if from != self.client {
                    continue;
                }
                if let Some(a) = answer(&buf[..n], block) {
                    return Ok(a);
                }
            }
        }
        Ok(Answer::Silent)
    }

    /// Run the transfer to its end; whether it completed.
    async fn run(
        &self,
        oack: &[(&'static str, String)],
        blksize: usize,
    ) -> std::io::Result<Answer> {
        if !oack.is_empty() {
            let a = self.send(&oack_packet(oack), 0).await?;
            if a != Answer::Ack {
                return Ok(a);
            }
        }
        let mut packet = Vec::with_capacity(4 + blksize);
        // The last block is shorter than blksize, empty when the size is a multiple.
        for (i, offset) in (0..=self.data.len()).step_by(blksize).enumerate() {
            let block = (i + 1) as u16; // wraps past 65535 blocks, as clients expect
            let chunk = &self.data[offset..(offset + blksize).min(self.data.len())];
            packet.clear();
            packet.extend_from_slice(&[0, 3]);
            packet.extend_from_slice(&block.to_be_bytes());
            packet.extend_from_slice(chunk);
            let a = self.send(&packet, block).await?;
            if a != Answer::Ack {
                return Ok(a);
            }
        }
        Ok(Answer::Ack)
    }

    fn record(&self, shared: &Shared, started: Instant) {
        let size = self.data.len();
        let ms = started.elapsed().as_millis() as u64;
        let node = node_for_ip(shared, self.client.ip());
        let _ = shared.state.append_event(
            node.as_deref(),
            "tftp.sent",
            &format!(
                "{} ({}) sent over TFTP to {} in {:.1} s",
                self.name,
                crate::ui::format_bytes(size as u64),
                self.client.ip(),
                ms as f64 / 1000.0
            ),
            serde_json::json!({
                "file": self.name, "client": self.client.to_string(), "bytes": size, "ms": ms,
            }),
        );
    }
}

/// One place among the [`MAX_TRANSFERS`], given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>) -> Option<Slot> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_TRANSFERS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A file opened for a transfer, with its place among the [`MAX_TRANSFERS`].
struct Opened {
    name: &'static str,
    data: Arc<[u8]>,
    slot: Slot,
}

/// The answer to a request: a transfer to start, or an ERROR to send.
fn open(
    files: &mut Files,
    active: &Arc<AtomicUsize>,
    client: SocketAddr,
    req: &Request,
) -> Result<Opened, Vec<u8>> {
    if req.op == Opcode::Write {
        tracing::info!(%client, file = %req.filename, "TFTP write refused: the server is read-only");
        return Err(error_packet(ACCESS_VIOLATION, "read-only server"));
    }
    let path = Path::new(&req.filename);
    let Some(name) = allowed_name(path) else {
        tracing::info!(%client, path = %req.filename, "TFTP read refused: not an iPXE binary");
        return Err(if path.components().count() > 1 || path.has_root() {
            error_packet(ACCESS_VIOLATION, "access violation")
        } else {
            error_packet(FILE_NOT_FOUND, "file not found")
        });
    };
    let slot = Slot::take(active).ok_or_else(|| {
        tracing::warn!(%client, "TFTP read refused: {MAX_TRANSFERS} transfers already running");
        error_packet(NOT_DEFINED, "server busy, try again")
    })?;
    let bytes = files.load(name).map_err(|e| {
        tracing::warn!(%client, "TFTP: cannot read {name} from the iPXE directory: {e}");
        error_packet(FILE_NOT_FOUND, "file not found")
    })?;
    Ok(Opened {
        name,
        data: bytes,
        slot,
    })
}

/// Serve TFTP on `socket` (bound by the caller, e.g. to the controller's
/// address, port 69) until `shutdown` flips.
pub async fn serve(
    shared: Arc<Shared>,
    socket: std::net::UdpSocket,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    socket.set_nonblocking(true)?;
    let socket = tokio::net::UdpSocket::from_std(socket).context("starting the TFTP server")?;
    let local = socket.local_addr()?;
    let mut files = Files {
        shared: shared.clone(),
        cache: HashMap::new(),
    };
    let active = Arc::new(AtomicUsize::new(0));
    // The transfer running for each client address: a new request from the
    // same address means the client gave the old one up.
    let mut running: HashMap<SocketAddr, tokio::task::AbortHandle> = HashMap::new();
    let mut transfers = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; 2048];
    tracing::info!(%local, "TFTP: serving the iPXE binaries");
    loop {
        let (n, client) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("TFTP receive: {e}");
                    continue;
                }
            },
            Some(_) = transfers.join_next(), if !transfers.is_empty() => {
                running.retain(|_, h| !h.is_finished());
                continue;
            }
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let req = match parse_request(&buf[..n]) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%client, "TFTP: dropping a packet: {e}");
                continue;
            }
        };
        if let Some(old) = running.remove(&client) {
            old.abort();
        }
        let Opened { name, data, slot } = match open(&mut files, &active, client, &req) {
            Ok(t) => t,
            Err(packet) => {
                let _ = socket.send_to(&packet, client).await;
                continue;
            }
        };
        let transfer_socket = match tokio::net::UdpSocket::bind((local.ip(), 0)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%client, "TFTP: no socket for a transfer: {e}");
                continue;
            }
        };
        let (oack, blksize) = negotiate(&req, data.len() as u64);
        tracing::debug!(%client, name, size = data.len(), "TFTP transfer starts");
        let transfer = Transfer {
            socket: transfer_socket,
            client,
            name,
            data,
            _slot: slot,
        };
        let shared = shared.clone();
        let handle = transfers.spawn(async move {
            let started = Instant::now();
            match transfer.run(&oack, blksize).await {
                Ok(Answer::Ack) => transfer.record(&shared, started),
                Ok(Answer::Aborted) => {
                    tracing::debug!(%client, name, "TFTP transfer aborted by the client")
                }
                Ok(Answer::Silent) => {
                    tracing::debug!(%client, name, "TFTP transfer abandoned by the client")
                }
                Err(e) => tracing::debug!(%client, name, "TFTP transfer: {e}"),
            }
        });
        running.insert(client, handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read(options: &[(&str, &str)]) -> Request {
        Request {
            op: Opcode::Read,
            filename: "ipxe.efi".into(),
            mode: Mode::Octet,
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn options_are_acknowledged_capped_or_left_out() {
        assert_eq!(negotiate(&read(&[]), 70_001), (vec![], 512));
        let (oack, blksize) = negotiate(
            &read(&[
                ("blksize", "8192"),
                ("tsize", "0"),
                ("timeout", "255"),
                ("windowsize", "16"),
            ]),
            70_001,
        );
        assert_eq!(
            oack,
            [
                ("blksize", BLOCK_SIZE_LIMIT.to_string()),
                ("tsize", "70001".to_string()),
                ("windowsize", "1".to_string())
            ]
        );
        assert_eq!(blksize, BLOCK_SIZE_LIMIT as usize);
        // An invalid block size is no option at all.
        assert_eq!(negotiate(&read(&[("blksize", "4")]), 1), (vec![], 512));
        assert_eq!(
            oack_packet(&[("tsize", "5".into())]),
            b"\x00\x06tsize\x005\x00"
        );
    }

    #[test]
    fn an_error_from_the_client_ends_the_transfer_and_old_acks_are_ignored() {
        assert_eq!(answer(&[0, 4, 0, 7], 7), Some(Answer::Ack));
        assert_eq!(
            answer(&[0, 4, 0, 6], 7),
            None,
            "a duplicate ACK is no reason to re-send"
        );
        assert_eq!(
            answer(b"\x00\x05\x00\x00aborted\x00", 7),
            Some(Answer::Aborted)
        );
        assert_eq!(answer(&[0, 5], 7), Some(Answer::Aborted));
        assert_eq!(answer(&[0, 1, 0, 7], 7), None);
        assert_eq!(answer(&[0, 4, 0], 0), None);
        assert_eq!(
            error_packet(1, "file not found"),
            b"\x00\x05\x00\x01file not found\x00"
        );
    }

    #[test]
    fn only_the_ipxe_binaries_by_their_exact_name() {
        assert_eq!(
            allowed_name(Path::new("undionly.kpxe")),
            Some("undionly.kpxe")
        );
        assert_eq!(
            allowed_name(Path::new("ipxe-arm64.efi")),
            Some("ipxe-arm64.efi")
        );
        for refused in [
            "/ipxe.efi",
            "./ipxe.efi",
            "../ipxe.efi",
            "/etc/passwd",
            "x/ipxe.efi",
            "ipxe.efi/",
            "IPXE.EFI",
            "homelab.db",
            "",
        ] {
            assert_eq!(allowed_name(Path::new(refused)), None, "{refused:?}");
        }
    }

    #[test]
    fn parses_requests_with_options() {
        let pkt = b"\x00\x01undionly.kpxe\x00OCTET\x00BlkSize\x001428\x00tsize\x000\x00";
        let r = parse_request(pkt).unwrap();
        assert_eq!((r.op, r.mode), (Opcode::Read, Mode::Octet));
        assert_eq!(r.filename, "undionly.kpxe");
        assert_eq!(
            r.options,
            [
                ("blksize".into(), "1428".into()),
                ("tsize".into(), "0".into())
            ]
        );
        assert_eq!((r.blksize(), r.tsize()), (Some(1428), Some(0)));
        assert_eq!(
            r.to_string(),
            "read \"undionly.kpxe\" (octet) blksize=1428 tsize=0"
        );
        let w = parse_request(b"\x00\x02f\x00netascii\x00").unwrap();
        assert_eq!(
            (w.op, w.mode, w.options.len()),
            (Opcode::Write, Mode::Netascii, 0)
        );
        // Empty names and values are well-formed (the server refuses the name).
        assert_eq!(
            parse_request(b"\x00\x01\x00mail\x00x\x00\x00")
                .unwrap()
                .filename,
            ""
        );
    }

    #[test]
    fn malformed_requests_say_why() {
        use ParseError::*;
        assert_eq!(parse_request(b""), Err(TooShort));
        assert_eq!(parse_request(b"\x00"), Err(TooShort));
        assert_eq!(
            parse_request(b"\x00\x03f\x00octet\x00"),
            Err(NotARequest(3))
        );
        assert_eq!(parse_request(b"\x00\x04\x00\x01"), Err(NotARequest(4)));
        assert_eq!(parse_request(b"\x00\x01f"), Err(Unterminated("file name")));
        assert_eq!(
            parse_request(b"\x00\x01f\x00octet"),
            Err(Unterminated("mode"))
        );
        assert_eq!(
            parse_request(b"\x00\x01f\x00binary\x00"),
            Err(UnknownMode("binary".into()))
        );
        assert_eq!(
            parse_request(b"\x00\x01\xff\x00octet\x00"),
            Err(NotUtf8("file name"))
        );
        assert_eq!(
            parse_request(b"\x00\x01f\x00octet\x00blksize\x00"),
            Err(Unterminated("option value"))
        );
        assert_eq!(
            parse_request(b"\x00\x01f\x00octet\x00blksize\x001428"),
            Err(Unterminated("option value"))
        );
    }

    #[test]
    fn invalid_option_values_are_not_options() {
        let r =
            parse_request(b"\x00\x01f\x00octet\x00blksize\x0070000\x00tsize\x00-1\x00").unwrap();
        assert_eq!((r.blksize(), r.tsize()), (None, None));
        let r = parse_request(b"\x00\x01f\x00octet\x00blksize\x007\x00").unwrap();
        assert_eq!(r.blksize(), None);
    }

    #[test]
    fn a_missing_binary_is_a_clear_start_up_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ipxe.efi"), b"efi").unwrap();
        std::fs::write(dir.path().join("undionly.kpxe"), b"").unwrap();
        let controller = Controller {
            interface: "eth0".into(),
            address: "10.0.0.1".parse().unwrap(),
            dhcp: crate::inventory::DhcpMode::Proxy,
            http_port: 8080,
            tftp: true,
            subnet: None,
            gateway: None,
            dns: vec![],
            pool: None,
            lease_time: 3600,
            ipxe_dir: dir.path().to_path_buf(),
            mirror: None,
        };
        let err = format!("{:#}", check_ipxe_dir(&controller).unwrap_err());
        assert!(
            err.contains(&dir.path().join("undionly.kpxe").display().to_string()),
            "{err}"
        );
        assert!(
            err.contains("apt install ipxe") && err.contains("controller.ipxe_dir"),
            "{err}"
        );
        assert!(!err.contains("ipxe.efi (for"), "ipxe.efi is there: {err}");
        std::fs::write(dir.path().join("undionly.kpxe"), b"bios").unwrap();
        check_ipxe_dir(&controller).unwrap();
        let gone = Controller {
            ipxe_dir: dir.path().join("nope"),
            mirror: None,
            ..controller
        };
        let err = format!("{:#}", check_ipxe_dir(&gone).unwrap_err());
        assert!(
            err.contains("undionly.kpxe") && err.contains("ipxe.efi"),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn never_panics_and_round_trips(
            op in prop_oneof![Just(1u8), Just(2u8), any::<u8>()],
            body in proptest::collection::vec(prop_oneof![Just(0u8), Just(b'a'), any::<u8>()], 0..48),
        ) {
            let bytes: Vec<u8> = [0, op].into_iter().chain(body).collect();
            if let Ok(r) = parse_request(&bytes) {
                prop_assert_eq!(parse_request(&r.encode()), Ok(r));
            }
        }

        #[test]
        fn well_formed_requests_round_trip(
            name in "[^\\x00]{0,20}",
            mode in prop_oneof![Just(Mode::Octet), Just(Mode::Netascii), Just(Mode::Mail)],
            options in proptest::collection::vec(("[a-z]{1,8}", "[0-9]{0,6}"), 0..4),
        ) {
            let r = Request { op: Opcode::Read, filename: name, mode, options };
            prop_assert_eq!(parse_request(&r.encode()), Ok(r));
        }
    }
}
