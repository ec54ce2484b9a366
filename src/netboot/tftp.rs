//! TFTP (async-tftp): read-only, and only the iPXE binaries. BIOS and most
//! UEFI firmware can fetch their first program only over TFTP; everything
//! after that goes over HTTP.
//!
//! async-tftp's traps (see the PXE notes) and what is done about them:
//! - It ignores a client's ERROR while waiting for an ACK, so a transfer the
//!   client abandoned (PXE ROMs abort after the tsize probe and re-request)
//!   lives on for (retries + 1) x timeout, and a new request from the same
//!   address is ignored meanwhile. Both are kept low ([`TIMEOUT`],
//!   [`MAX_SEND_RETRIES`]) and clients may not raise the timeout.
//! - It opens files behind one mutex. Opens here are a lookup in an in-memory
//!   cache of the few binaries, so a storm of requests costs neither disk
//!   reads nor a copy of the file each, and at most [`MAX_TRANSFERS`] run at once.
//! - It parses packets internally and drops what it cannot parse. The same
//!   grammar is written out in [`parse_request`], pure and fuzzed.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use async_tftp::packet;
use async_tftp::server::{Handler, TftpServerBuilder};
use futures_util::io::{AsyncRead, Cursor};
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
/// Accepts what async-tftp accepts: UTF-8 strings, modes netascii, octet and
/// mail in any case, any option names (unknown ones are ignored by the
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

struct IpxeHandler {
    shared: Arc<Shared>,
    /// The binaries read so far, re-read when their size or mtime changes.
    cache: HashMap<&'static str, Cached>,
    active: Arc<AtomicUsize>,
}

struct Cached {
    len: u64,
    modified: Option<SystemTime>,
    bytes: Arc<[u8]>,
}

impl IpxeHandler {
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

impl Handler for IpxeHandler {
    type Reader = Transfer;
    type Writer = futures_util::io::Sink;

    async fn read_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
    ) -> Result<(Self::Reader, Option<u64>), packet::Error> {
        let Some(name) = allowed_name(path) else {
            tracing::info!(%client, path = %path.display(), "TFTP read refused: not an iPXE binary");
            return Err(if path.components().count() > 1 || path.has_root() {
                packet::Error::PermissionDenied
            } else {
                packet::Error::FileNotFound
            });
        };
        let slot = Slot::take(&self.active).ok_or_else(|| {
            tracing::warn!(%client, "TFTP read refused: {MAX_TRANSFERS} transfers already running");
            packet::Error::Msg("server busy, try again".into())
        })?;
        let bytes = self.load(name).map_err(|e| {
            tracing::warn!(%client, "TFTP: cannot read {name} from the iPXE directory: {e}");
            packet::Error::FileNotFound
        })?;
        let size = bytes.len() as u64;
        tracing::debug!(%client, name, size, "TFTP transfer starts");
        let transfer = Transfer {
            data: Cursor::new(bytes),
            shared: self.shared.clone(),
            client: *client,
            name,
            started: Instant::now(),
            eof_at: None,
            _slot: slot,
        };
        Ok((transfer, Some(size)))
    }

    async fn write_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
        _size: Option<u64>,
    ) -> Result<Self::Writer, packet::Error> {
        tracing::info!(%client, path = %path.display(), "TFTP write refused: the server is read-only");
        Err(packet::Error::PermissionDenied)
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

/// One transfer's reader. async-tftp reads block n+1 only after block n was
/// acknowledged, and drops the reader when the transfer ends; the last block
/// is read (end of file) before it is sent. So a reader dropped soon after
/// end of file means the last ACK came: the transfer completed. One dropped
/// after (retries + 1) x timeout was given up. That is when "tftp.sent" is
/// recorded, once per completed transfer.
struct Transfer {
    data: Cursor<Arc<[u8]>>,
    shared: Arc<Shared>,
    client: SocketAddr,
    name: &'static str,
    started: Instant,
    eof_at: Option<Instant>,
    _slot: Slot,
}

/// A reader dropped this long after end of file was given up (no last ACK).
/// Half a timeout short of the full give-up time, so that an ACK arriving
/// after a re-send or two still counts as completion.
const GIVEN_UP_AFTER: Duration = Duration::from_millis(
    TIMEOUT.as_millis() as u64 * (MAX_SEND_RETRIES as u64 + 1) - TIMEOUT.as_millis() as u64 / 2,
);

impl AsyncRead for Transfer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.data).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(0))) && !buf.is_empty() && self.eof_at.is_none() {
            self.eof_at = Some(Instant::now());
        }
        polled
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        let size = self.data.get_ref().len();
        let completed = self.eof_at.is_some_and(|t| t.elapsed() < GIVEN_UP_AFTER);
        if !completed {
            tracing::debug!(client = %self.client, name = self.name, "TFTP transfer abandoned by the client");
            return;
        }
        let ms = self.started.elapsed().as_millis() as u64;
        let node = node_for_ip(&self.shared, self.client.ip());
        let _ = self.shared.state.append_event(
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

/// Serve TFTP on `socket` (bound by the caller, e.g. to the controller's
/// address, port 69) until `shutdown` flips.
pub async fn serve(
    shared: Arc<Shared>,
    socket: std::net::UdpSocket,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let local = socket.local_addr()?;
    let handler = IpxeHandler {
        shared,
        cache: HashMap::new(),
        active: Arc::new(AtomicUsize::new(0)),
    };
    let server = TftpServerBuilder::with_handler(handler)
        .std_socket(socket)?
        .timeout(TIMEOUT)
        .ignore_client_timeout()
        .max_send_retries(MAX_SEND_RETRIES)
        .block_size_limit(BLOCK_SIZE_LIMIT)
        // One block in flight: a reader dropped soon after end of file then
        // means the last block was acknowledged (see `Transfer`).
        .window_size_limit(1)
        .build()
        .await
        .context("starting the TFTP server")?;
    tracing::info!(%local, "TFTP: serving the iPXE binaries");
    tokio::select! {
        r = server.serve() => r.context("the TFTP server stopped"),
        _ = shutdown.wait_for(|s| *s) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
