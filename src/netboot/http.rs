//! The HTTP side of netboot (axum): per-node iPXE scripts, the iPXE binaries
//! for UEFI HTTP boot, the files of custom boot profiles (with range
//! requests), and the phone-home endpoint.
//!
//! Files are looked up by name from the inventory, never by joining a request
//! path onto a directory, so nothing else on the controller (the state dir and
//! its secrets above all) is reachable.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State as AxState};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::Stream;
use minijinja::context;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;
use tokio_util::io::ReaderStream;

use super::boot::{boot_target, BootTarget};
use super::Shared;
use crate::inventory::{BootProfile, MacAddr, Node};
use crate::state::Stage;
use crate::templates::Templates;
use crate::ui::format_bytes;

/// iPXE binaries that may be fetched over HTTP (UEFI HTTP boot).
pub const IPXE_BINARIES: &[&str] = &["undionly.kpxe", "ipxe.efi", "snponly.efi", "ipxe-arm64.efi"];

struct Http {
    shared: Arc<Shared>,
    templates: Arc<Templates>,
    /// Per node: the profile files sent in full since its last script fetch.
    served: Mutex<HashMap<String, HashSet<String>>>,
}

/// The router, for `serve` and for tests.
pub fn router(shared: Arc<Shared>, templates: Arc<Templates>) -> Router {
    let http = Arc::new(Http {
        shared,
        templates,
        served: Mutex::new(HashMap::new()),
    });
    Router::new()
        .route("/boot/{file}", get(script))
        .route("/boot/ipxe/{file}", get(ipxe_binary))
        .route("/files/{node}/{name}", get(profile_file))
        .route("/phone-home/{mac}", get(phone_home).post(phone_home))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(http)
}

/// Serve until `shutdown` flips.
pub async fn serve(
    shared: Arc<Shared>,
    templates: Arc<Templates>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let app = router(shared, templates);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    text(StatusCode::NOT_FOUND, format!("{what} not found\n"))
}

/// A boot profile file as served: a unique name and its path on the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServedFile {
    pub name: String,
    pub path: PathBuf,
}

/// The files of a profile under unique names: the kernel first, then each
/// initrd (an index prefix keeps two initrds with one basename apart).
pub fn profile_files(profile: &BootProfile) -> Vec<ServedFile> {
    let base = |p: &Path| {
        p.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into())
    };
    let mut out = vec![ServedFile {
        name: base(&profile.kernel),
        path: profile.kernel.clone(),
    }];
    for (i, initrd) in profile.initrd.iter().enumerate() {
        let mut name = base(initrd);
        if out.iter().any(|f| f.name == name) {
            name = format!("{i}-{name}");
        }
        out.push(ServedFile {
            name,
            path: initrd.clone(),
        });
    }
    out
}

/// GET /boot/<mac>.ipxe
async fn script(AxState(http): AxState<Arc<Http>>, UrlPath(file): UrlPath<String>) -> Response {
    let Some(mac) = file
        .strip_suffix(".ipxe")
        .and_then(|m| m.parse::<MacAddr>().ok())
    else {
        return not_found("script");
    };
    let inv = http.shared.inventory();
    let node = inv.node_by_mac(mac);
    let record = match node {
        Some(n) => http.shared.state.node(&n.name).ok().flatten(),
        None => None,
    };
    let target = boot_target(node, record.as_ref());
    let base = format!(
        "http://{}:{}",
        inv.controller.address, inv.controller.http_port
    );
    let rendered = match (target, node) {
        (BootTarget::Profile, Some(n)) => render_profile(&http.templates, n, &base),
        (BootTarget::Installer, Some(n)) => http.templates.render(
            "pxe/installer.ipxe.j2",
            context! {
                name => n.name.clone(), mac => mac.to_string(),
                kernel_url => format!("{base}/install/{mac}/vmlinuz"),
                initrd_url => format!("{base}/install/{mac}/installer.img"),
                cmdline => format!("console=tty0 console=ttyS0,115200 homelab.plan={base}/install/{mac}/plan"),
            },
        ),
        (BootTarget::LocalDisk, Some(n)) => {
            http.templates.render("pxe/local-disk.ipxe.j2", context! { name => n.name.clone(), mac => mac.to_string() })
        }
        _ => http.templates.render("pxe/unknown.ipxe.j2", context! { mac => mac.to_string() }),
    };
    let body = match rendered {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("{e:#}");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "#!ipxe\necho homelab: script error, see the controller log\nshell\n".into(),
            );
        }
    };
    match node {
        Some(n) => {
            http.served
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&n.name);
            let st = &http.shared.state;
            let _ = st.append_event(
                Some(&n.name),
                "http.script",
                &format!("iPXE script served: {}", target_label(target)),
                serde_json::json!({ "target": target }),
            );
            let stage = record.map(|r| r.stage);
            let moves = match target {
                BootTarget::Profile => stage != Some(Stage::Booting),
                BootTarget::Installer => stage == Some(Stage::Pending),
                _ => false,
            };
            if moves {
                let _ = st.set_stage(
                    &n.name,
                    Stage::Booting,
                    &format!("fetching {}", target_label(target)),
                );
            }
        }
        None => {
            tracing::info!(%mac, "script asked for by a machine not in the inventory; told it so");
        }
    }
    text(StatusCode::OK, body)
}

fn target_label(t: BootTarget) -> &'static str {
    match t {
        BootTarget::Profile => "boot profile",
        BootTarget::Installer => "installer",
        BootTarget::LocalDisk => "boot from local disk",
        BootTarget::Unknown => "unknown machine",
    }
}

fn render_profile(templates: &Templates, node: &Node, base: &str) -> Result<String> {
    let profile = node.boot.as_ref().expect("profile target has a profile");
    let files = profile_files(profile);
    let url = |f: &ServedFile| format!("{base}/files/{}/{}", node.name, f.name);
    let initrds: Vec<_> = files[1..]
        .iter()
        .map(|f| context! { name => f.name.clone(), url => url(f) })
        .collect();
    templates.render(
        "pxe/profile.ipxe.j2",
        context! {
            name => node.name.clone(), mac => node.mac.to_string(),
            kernel_url => url(&files[0]), initrds => initrds, cmdline => profile.cmdline.clone(),
        },
    )
}

/// GET /boot/ipxe/<file>
async fn ipxe_binary(
    AxState(http): AxState<Arc<Http>>,
    UrlPath(file): UrlPath<String>,
) -> Response {
    if !IPXE_BINARIES.contains(&file.as_str()) {
        return not_found("iPXE binary");
    }
    let path = http.shared.inventory().controller.ipxe_dir.join(&file);
    send_file(&path, &HeaderMap::new(), None).await
}

/// GET /files/<node>/<name>
async fn profile_file(
    AxState(http): AxState<Arc<Http>>,
    UrlPath((node_name, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let inv = http.shared.inventory();
    let Some(node) = inv.nodes.get(&node_name) else {
        return not_found("node");
    };
    let Some(profile) = &node.boot else {
        return not_found("boot profile");
    };
    let files = profile_files(profile);
    let Some(file) = files.iter().find(|f| f.name == name) else {
        return not_found("file");
    };
    let all: HashSet<String> = files.iter().map(|f| f.name.clone()).collect();
    let tracker = Tracker {
        http: http.clone(),
        node: node.name.clone(),
        file: file.name.clone(),
        all,
        sent: 0,
        total: 0,
        last_report: Instant::now(),
    };
    send_file(&file.path, &headers, Some(tracker)).await
}

/// GET|POST /phone-home/<mac>
async fn phone_home(
    AxState(http): AxState<Arc<Http>>,
    UrlPath(mac): UrlPath<String>,
    body: Bytes,
) -> Response {
    let Ok(mac) = mac.parse::<MacAddr>() else {
        return not_found("node");
    };
    let inv = http.shared.inventory();
    let Some(node) = inv.node_by_mac(mac) else {
        return not_found("node");
    };
    let note = String::from_utf8_lossy(&body[..body.len().min(1024)])
        .trim()
        .to_string();
    let _ = http.shared.state.append_event(
        Some(&node.name),
        "node.phoned-home",
        if note.is_empty() {
            "phoned home"
        } else {
            &note
        },
        serde_json::Value::Null,
    );
    text(StatusCode::OK, "ok\n".into())
}

/// A byte range asked for with `Range: bytes=...` (one range only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No (usable) Range header: the whole file.
    Whole,
    /// Inclusive start..=end, already clamped to the file.
    Part(u64, u64),
    /// Cannot be satisfied (416).
    Unsatisfiable,
}

/// Parse a Range header against a file of `len` bytes. Pure.
pub fn parse_range(header: Option<&str>, len: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        // Multiple ranges: answer with the whole file, which RFC 9110 allows.
        return RangeRequest::Whole;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeRequest::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        (Some(start), Some(end)) if start <= end => Some((start, end.min(len.saturating_sub(1)))),
        (Some(start), None) if b.is_empty() => Some((start, len.saturating_sub(1))),
        (None, Some(suffix)) if a.is_empty() && suffix > 0 => {
            Some((len.saturating_sub(suffix), len.saturating_sub(1)))
        }
        _ => return RangeRequest::Whole,
    };
    match range {
        Some((start, end)) if len > 0 && start < len && start <= end => {
            RangeRequest::Part(start, end)
        }
        _ => RangeRequest::Unsatisfiable,
    }
}

async fn send_file(path: &Path, headers: &HeaderMap, tracker: Option<Tracker>) -> Response {
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("cannot open {}: {e}", path.display());
            return not_found("file");
        }
    };
    let len = match f.metadata().await {
        Ok(m) => m.len(),
        Err(_) => return not_found("file"),
    };
    let range = parse_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        len,
    );
    let (status, start, count) = match range {
        RangeRequest::Whole => (StatusCode::OK, 0, len),
        RangeRequest::Part(s, e) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
        RangeRequest::Unsatisfiable => {
            let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).unwrap(),
            );
            return r;
        }
    };
    if start > 0 && f.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return not_found("file");
    }
    // Only a whole-file download counts as the file having been fetched.
    let tracker = tracker.filter(|_| status == StatusCode::OK).map(|mut t| {
        t.total = len;
        t.start();
        t
    });
    let stream = Counting {
        inner: ReaderStream::with_capacity(f.take(count), 64 * 1024),
        tracker,
    };
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        let v = format!("bytes {start}-{}/{len}", start + count - 1);
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&v).unwrap());
    }
    resp
}

/// Counts the bytes of a profile file as they go out, records progress, and
/// moves the node to Booted once every file of its profile went out in full.
struct Tracker {
    http: Arc<Http>,
    node: String,
    file: String,
    all: HashSet<String>,
    sent: u64,
    total: u64,
    last_report: Instant,
}

impl Tracker {
    fn start(&mut self) {
        let _ = self.http.shared.state.append_event(
            Some(&self.node),
            "http.file-start",
            &format!("sending {} ({})", self.file, format_bytes(self.total)),
            serde_json::json!({ "file": self.file, "bytes": self.total }),
        );
    }

    fn add(&mut self, n: usize) {
        self.sent += n as u64;
        if self.last_report.elapsed() >= Duration::from_millis(250) && self.sent < self.total {
            self.last_report = Instant::now();
            let _ = self.http.shared.state.set_progress(
                &self.node,
                self.sent,
                self.total,
                &format!(
                    "{} {} / {}",
                    self.file,
                    format_bytes(self.sent),
                    format_bytes(self.total)
                ),
            );
        }
    }

    fn finish(&mut self) {
        let st = &self.http.shared.state;
        let _ = st.append_event(
            Some(&self.node),
            "http.file-done",
            &format!("sent {} ({})", self.file, format_bytes(self.sent)),
            serde_json::json!({ "file": self.file, "bytes": self.sent }),
        );
        let complete = {
            let mut served = self.http.served.lock().unwrap_or_else(|e| e.into_inner());
            let set = served.entry(self.node.clone()).or_default();
            set.insert(self.file.clone());
            set.is_superset(&self.all)
        };
        if complete {
            let _ = st.set_stage(&self.node, Stage::Booted, "boot profile served");
        }
    }
}

struct Counting<S> {
    inner: S,
    tracker: Option<Tracker>,
}

impl<S> Stream for Counting<S>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let polled = Pin::new(&mut self.inner).poll_next(cx);
        match &polled {
            // The server may stop polling once Content-Length bytes went out,
            // so completion is noticed on the last chunk, not on end-of-stream.
            Poll::Ready(Some(Ok(chunk))) => {
                let n = chunk.len();
                if let Some(t) = self.tracker.as_mut() {
                    t.add(n);
                    if t.sent >= t.total {
                        if let Some(mut t) = self.tracker.take() {
                            t.finish();
                        }
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(mut t) = self.tracker.take() {
                    if t.sent == t.total {
                        t.finish();
                    }
                }
            }
            _ => {}
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range(None, 100), Whole);
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Part(0, 9));
        assert_eq!(parse_range(Some("bytes=90-"), 100), Part(90, 99));
        assert_eq!(parse_range(Some("bytes=-10"), 100), Part(90, 99));
        assert_eq!(parse_range(Some("bytes=50-500"), 100), Part(50, 99));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Whole);
        assert_eq!(parse_range(Some("items=0-1"), 100), Whole);
        assert_eq!(parse_range(Some("bytes=9-3"), 100), Whole);
    }

    #[test]
    fn profile_file_names_are_unique() {
        let p = BootProfile {
            kernel: "/a/vmlinuz".into(),
            initrd: vec!["/a/initrd.img".into(), "/b/initrd.img".into()],
            cmdline: String::new(),
        };
        let names: Vec<_> = profile_files(&p).into_iter().map(|f| f.name).collect();
        assert_eq!(names, ["vmlinuz", "initrd.img", "1-initrd.img"]);
    }
}
