//! TFTP (async-tftp): read-only, and only the iPXE binaries. BIOS and most
//! UEFI firmware can fetch their first program only over TFTP; everything
//! after that goes over HTTP.
//!
//! PXE ROMs abort and re-request transfers routinely, and async-tftp keeps an
//! abandoned transfer alive for retries x timeout, so both are kept low.

use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Result};
use async_tftp::packet;
use async_tftp::server::{Handler, TftpServerBuilder};
use futures_util::io::{AsyncRead, Cursor};
use tokio::sync::watch;

use super::Shared;
use crate::inventory::Controller;

/// The only files TFTP serves.
pub const SERVED: &[&str] = &["undionly.kpxe", "ipxe.efi", "snponly.efi", "ipxe-arm64.efi"];

/// Refuse to start when the iPXE binaries that clients will be told to fetch are missing.
pub fn check_ipxe_dir(controller: &Controller) -> Result<()> {
    let dir = &controller.ipxe_dir;
    let missing: Vec<String> = ["undionly.kpxe", "ipxe.efi"]
        .iter()
        .filter(|f| !dir.join(f).is_file())
        .map(|f| dir.join(f).display().to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "iPXE binaries missing: {}. Install them with `apt install ipxe`, or point \
             controller.ipxe_dir in the inventory at a folder that has them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// A TFTP request, parsed (for logging, checks and fuzzing; async-tftp parses
/// again internally).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub write: bool,
    pub filename: String,
    pub mode: String,
    pub options: Vec<(String, String)>,
}

/// Parse an RRQ/WRQ packet (RFC 1350, options RFC 2347). Pure; never panics.
pub fn parse_request(bytes: &[u8]) -> Result<Request, String> {
    if bytes.len() < 4 {
        return Err("packet too short".into());
    }
    let write = match u16::from_be_bytes([bytes[0], bytes[1]]) {
        1 => false,
        2 => true,
        op => return Err(format!("opcode {op} is not a request")),
    };
    let mut fields = bytes[2..].split(|b| *b == 0);
    let mut next = |what: &str| -> Result<String, String> {
        let f = fields.next().ok_or_else(|| format!("missing {what}"))?;
        String::from_utf8(f.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    };
    let filename = next("filename")?;
    let mode = next("mode")?.to_ascii_lowercase();
    if filename.is_empty() {
        return Err("empty filename".into());
    }
    if mode != "octet" && mode != "netascii" {
        return Err(format!("unsupported mode {mode}"));
    }
    if bytes.last() != Some(&0) {
        return Err("request not terminated".into());
    }
    let mut options = Vec::new();
    let rest: Vec<&[u8]> = bytes[2..]
        .split(|b| *b == 0)
        .skip(2)
        .filter(|f| !f.is_empty())
        .collect();
    for pair in rest.chunks(2) {
        let [k, v] = pair else {
            return Err("option without a value".into());
        };
        let k = String::from_utf8(k.to_vec()).map_err(|_| "option name is not UTF-8")?;
        let v = String::from_utf8(v.to_vec()).map_err(|_| "option value is not UTF-8")?;
        options.push((k.to_ascii_lowercase(), v));
    }
    Ok(Request {
        write,
        filename,
        mode,
        options,
    })
}

/// The served name a request path stands for, or None. Accepts "ipxe.efi" and
/// "/ipxe.efi"; refuses anything with directories, `..` or an unknown name.
pub fn allowed_name(path: &Path) -> Option<&'static str> {
    let mut comps = path
        .components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir));
    let Some(Component::Normal(name)) = comps.next() else {
        return None;
    };
    if comps.next().is_some() {
        return None;
    }
    SERVED
        .iter()
        .copied()
        .find(|s| name == std::ffi::OsStr::new(s))
}

struct IpxeHandler {
    shared: Arc<Shared>,
}

impl Handler for IpxeHandler {
    type Reader = Reporting;
    type Writer = futures_util::io::Sink;

    async fn read_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
    ) -> Result<(Self::Reader, Option<u64>), packet::Error> {
        let Some(name) = allowed_name(path) else {
            tracing::info!(%client, path = %path.display(), "TFTP request refused: not an iPXE binary");
            return Err(packet::Error::PermissionDenied);
        };
        let full = self.shared.inventory().controller.ipxe_dir.join(name);
        let bytes = std::fs::read(&full).map_err(|_| packet::Error::FileNotFound)?;
        let size = bytes.len() as u64;
        Ok((
            Reporting {
                inner: Cursor::new(bytes),
                shared: self.shared.clone(),
                client: client.ip(),
                name,
                done: false,
            },
            Some(size),
        ))
    }

    async fn write_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
        _size: Option<u64>,
    ) -> Result<Self::Writer, packet::Error> {
        tracing::info!(%client, path = %path.display(), "TFTP write refused: the server is read-only");
        Err(packet::Error::IllegalOperation)
    }
}

/// Reads a binary and records an event once it has been read to the end.
struct Reporting {
    inner: Cursor<Vec<u8>>,
    shared: Arc<Shared>,
    client: IpAddr,
    name: &'static str,
    done: bool,
}

impl AsyncRead for Reporting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(0)) = r {
            if !self.done && !buf.is_empty() {
                self.done = true;
                let inv = self.shared.inventory();
                let node = inv
                    .nodes
                    .values()
                    .find(|n| IpAddr::V4(n.ip) == self.client)
                    .map(|n| n.name.clone());
                let size = self.inner.get_ref().len();
                let _ = self.shared.state.append_event(
                    node.as_deref(),
                    "tftp.sent",
                    &format!("{} sent to {} ({size} bytes)", self.name, self.client),
                    serde_json::json!({ "file": self.name, "client": self.client.to_string(), "bytes": size }),
                );
            }
        }
        r
    }
}

/// Serve TFTP on `socket` until `shutdown` flips.
pub async fn serve(
    shared: Arc<Shared>,
    socket: std::net::UdpSocket,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    socket.set_nonblocking(true)?;
    let server = TftpServerBuilder::with_handler(IpxeHandler { shared })
        .std_socket(socket)?
        .timeout(Duration::from_secs(2))
        .max_send_retries(5)
        .build()
        .await?;
    tokio::select! {
        r = server.serve() => r.map_err(Into::into),
        _ = shutdown.wait_for(|s| *s) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_ipxe_binaries_by_plain_name() {
        assert_eq!(
            allowed_name(Path::new("undionly.kpxe")),
            Some("undionly.kpxe")
        );
        assert_eq!(allowed_name(Path::new("/ipxe.efi")), Some("ipxe.efi"));
        assert_eq!(allowed_name(Path::new("../ipxe.efi")), None);
        assert_eq!(allowed_name(Path::new("/etc/passwd")), None);
        assert_eq!(allowed_name(Path::new("x/ipxe.efi")), None);
        assert_eq!(allowed_name(Path::new("homelab.db")), None);
    }

    #[test]
    fn parses_requests_with_options() {
        let pkt = b"\x00\x01undionly.kpxe\x00octet\x00blksize\x001428\x00tsize\x000\x00";
        let r = parse_request(pkt).unwrap();
        assert!(!r.write);
        assert_eq!(r.filename, "undionly.kpxe");
        assert_eq!(
            r.options,
            [
                ("blksize".into(), "1428".into()),
                ("tsize".into(), "0".into())
            ]
        );
        assert!(parse_request(b"\x00\x02f\x00octet\x00").unwrap().write);
        assert!(parse_request(b"\x00\x03f\x00octet\x00").is_err());
        assert!(parse_request(b"\x00\x01f\x00octet").is_err());
        assert!(parse_request(b"\x00\x01\x00octet\x00").is_err());
        assert!(parse_request(b"\x00\x01f\x00octet\x00blksize\x00").is_err());
    }
}
