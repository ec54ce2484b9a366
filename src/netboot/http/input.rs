//! What machines on the LAN send the HTTP side, read into what it asks for:
//! small pure functions the handlers call on their (already URL-decoded)
//! path segments and bodies, so the fuzz targets (fuzz/) exercise exactly
//! the code the server runs, with no socket, state or file in the way.
//!
//! - request paths: [`script_mac`], [`ipxe_binary`], [`profile_file`],
//!   [`installer_file`], [`url_node`]; a file is only ever one the inventory
//!   or [`SERVED`](crate::netboot::tftp::SERVED) names, never a path joined from the request;
//! - the agent's reports: [`report`] (body to typed [`Report`]) and
//!   [`report_text`] (what is recorded, log lines included);
//! - the phone-home body: [`phone_home`] (cloud-init's form, or anything small).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use axum::http::{header, HeaderMap, StatusCode};

use super::files::{profile_files, ServedFile};
use crate::install::protocol::Report;
use crate::inventory::{Inventory, MacAddr, Node};
use crate::netboot::tftp::allowed_name;

/// `/boot/<file>`: the MAC of a `<mac>.ipxe` script name.
pub fn script_mac(file: &str) -> Option<MacAddr> {
    file.strip_suffix(".ipxe")?.parse().ok()
}

/// `/boot/ipxe/<file>`: the binary's name (one of [`crate::netboot::tftp::SERVED`]) and its path in `ipxe_dir`.
pub fn ipxe_binary(ipxe_dir: &Path, file: &str) -> Option<(&'static str, PathBuf)> {
    let name = allowed_name(Path::new(file))?;
    Some((name, ipxe_dir.join(name)))
}

/// A file of a node's boot profile, asked for by `/files/<node>/<name>`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileFile<'a> {
    pub node: &'a Node,
    /// Every file of the profile, the kernel first ([`profile_files`]).
    pub files: Vec<ServedFile>,
    /// The one asked for.
    pub file: ServedFile,
}

/// `/files/<node>/<name>`: the file, or why there is none (the 404's text).
pub fn profile_file<'a>(
    inv: &'a Inventory,
    node: &str,
    name: &str,
) -> Result<ProfileFile<'a>, &'static str> {
    let node = inv.nodes.get(node).ok_or("no such node")?;
    let profile = node.boot.as_ref().ok_or("that node has no boot profile")?;
    let files = profile_files(profile);
    let file = files
        .iter()
        .find(|f| f.name == name)
        .ok_or("not a file of that node's boot profile")?
        .clone();
    Ok(ProfileFile { node, files, file })
}

/// The installer's two files, `/install/<mac>/{vmlinuz,initrd.img}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallerFile {
    Kernel,
    Initrd,
}

/// `/install/<mac>/<file>`: which installer file.
pub fn installer_file(file: &str) -> Option<InstallerFile> {
    match file {
        "vmlinuz" => Some(InstallerFile::Kernel),
        "initrd.img" => Some(InstallerFile::Initrd),
        _ => None,
    }
}

/// `/phone-home/<mac>`, `/install/<mac>/...`: the inventory node of that MAC.
pub fn url_node<'a>(inv: &'a Inventory, mac: &str) -> Option<&'a Node> {
    inv.node_by_mac(mac.parse().ok()?)
}

/// Why a report was refused: the status and the text to answer with.
pub type Refused = (StatusCode, String);

/// The body of `POST /install/<mac>/report`: JSON (`Content-Type:
/// application/json`) of a [`Report`]. Refused as axum's `Json` would: 415
/// without the content type, 400 for bad JSON, 422 for JSON that is no report.
pub fn report(headers: &HeaderMap, body: &[u8]) -> Result<Report, Refused> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|essence| {
            let essence = essence.trim().to_ascii_lowercase();
            essence == "application/json"
                || (essence.starts_with("application/") && essence.ends_with("+json"))
        })
        .unwrap_or(false);
    if !json {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Expected request with `Content-Type: application/json`\n".into(),
        ));
    }
    parse_report(body)
}

/// [`report`]'s JSON part.
pub fn parse_report(body: &[u8]) -> Result<Report, Refused> {
    serde_json::from_slice(body).map_err(|e| {
        let status = match e.classify() {
            serde_json::error::Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        (status, format!("not an install report: {e}\n"))
    })
}

/// What a report records (the event's message, or the failure's reason).
/// Text from the node is shown in the operator's terminal, so control
/// characters in it are replaced (an escape sequence could rewrite the
/// screen); a log report is one line of text per line the agent sent.
pub fn report_text(report: &Report) -> String {
    use crate::ui::format_bytes;
    match report {
        Report::Disk(d) => format!(
            "installing on {} ({}{}){}",
            one_line(&d.device),
            format_bytes(d.size),
            if d.model.is_empty() {
                String::new()
            } else {
                format!(", {}", one_line(&d.model))
            },
            d.previous
                .as_deref()
                .map(|p| format!("; it held {}", one_line(p)))
                .unwrap_or_default()
        ),
        Report::Progress {
            received,
            total,
            written,
        } => format!(
            "image {}/{}, {} written",
            format_bytes(*received),
            format_bytes(*total),
            format_bytes(*written)
        ),
        Report::HeadWritten => "partition table written".into(),
        Report::Log { lines } => log_text(lines),
        Report::Done {
            bytes_written,
            seconds,
            ..
        } => format!(
            "image written ({} in {seconds:.0} s); booting the installed system",
            format_bytes(*bytes_written)
        ),
        Report::Failed { error } => error.lines().map(one_line).collect::<Vec<_>>().join("\n"),
    }
}

/// The agent's log lines as one event message, a line each.
pub fn log_text(lines: &[String]) -> String {
    lines
        .iter()
        .map(|l| one_line(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `s` with no control characters: a tab becomes a space, others U+FFFD.
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\t' => ' ',
            c if c.is_control() => char::REPLACEMENT_CHARACTER,
            c => c,
        })
        .collect()
}

/// A phone-home body as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct PhoneHome {
    /// The form fields (empty when the body is not a form).
    pub form: HashMap<String, String>,
    /// What goes into the event's data: `("form", fields)` for cloud-init's
    /// phone_home, else `("body", JSON or trimmed text)`; none for no body.
    pub detail: Option<(&'static str, serde_json::Value)>,
}

/// `/phone-home/<mac>`'s body.
pub fn phone_home(body: &[u8]) -> PhoneHome {
    // cloud-init's phone_home posts a form with the host's public keys.
    let form = form_urlencoded(body);
    let detail = if form.contains_key("pub_key_ed25519") {
        Some((
            "form",
            serde_json::json!({
                "hostname": form.get("hostname"),
                "instance_id": form.get("instance_id"),
                "pub_key_ed25519": form.get("pub_key_ed25519"),
            }),
        ))
    } else if !body.is_empty() {
        Some((
            "body",
            serde_json::from_slice(body)
                .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().into()),
        ))
    } else {
        None
    };
    PhoneHome { form, detail }
}

/// `a=b&c=d` with percent-decoding and `+` as space; empty when not a form.
pub fn form_urlencoded(body: &[u8]) -> HashMap<String, String> {
    let Ok(text) = std::str::from_utf8(body) else {
        return HashMap::new();
    };
    let decode = |s: &str| {
        let bytes = s.replace('+', " ").into_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                if let Ok(b) =
                    u8::from_str_radix(&String::from_utf8_lossy(&bytes[i + 1..i + 3]), 16)
                {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    text.trim()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode() {
        let f = form_urlencoded(b"pub_key_ed25519=ssh-ed25519+AAAA%2Bb%3D+root%40n1&hostname=n1");
        assert_eq!(f["pub_key_ed25519"], "ssh-ed25519 AAAA+b= root@n1");
        assert_eq!(f["hostname"], "n1");
        assert!(form_urlencoded(b"{\"json\": 1}").is_empty());
    }

    #[test]
    fn log_lines_stay_lines_and_escapes_are_not_recorded() {
        let lines = ["a\tb".to_string(), "\x1b[2Jgone\r\nfake".to_string()];
        assert_eq!(log_text(&lines), "a b\n\u{fffd}[2Jgone\u{fffd}\u{fffd}fake");
        assert_eq!(log_text(&[]), "");
    }

    #[test]
    fn reports_need_json() {
        let mut h = HeaderMap::new();
        let body = br#"{"kind":"head-written"}"#;
        assert_eq!(
            report(&h, body).unwrap_err().0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        h.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(report(&h, body).unwrap(), Report::HeadWritten);
        assert_eq!(report(&h, b"{").unwrap_err().0, StatusCode::BAD_REQUEST);
        assert_eq!(
            report(&h, br#"{"kind":"nope"}"#).unwrap_err().0,
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
}
