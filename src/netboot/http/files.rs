//! The files of custom boot profiles: their names in URLs, sending them
//! (tower-http's `ServeFile`: ranges, HEAD, conditional requests,
//! Content-Length), and counting the bytes as they go out, for progress events
//! and for moving a node to Booted once its whole profile was sent.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::Response;
use futures_util::Stream;
use serde::Serialize;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use super::Http;
use crate::inventory::BootProfile;
use crate::lifecycle::NodeEvent;
use crate::ui::format_bytes;

/// Progress of one file is recorded at most this often.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// A boot profile file as served: its name in `/files/<node>/<name>` (and in
/// the iPXE script) and its path on the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServedFile {
    pub name: String,
    pub path: PathBuf,
}

/// The files of a profile under unique, URL- and iPXE-safe names: the kernel
/// first, then each initrd. Characters other than `A-Za-z0-9._-` become `_`;
/// an index prefix keeps two files with one basename apart.
pub fn profile_files(profile: &BootProfile) -> Vec<ServedFile> {
    let mut out: Vec<ServedFile> = Vec::with_capacity(1 + profile.initrd.len());
    for (i, path) in std::iter::once(&profile.kernel)
        .chain(&profile.initrd)
        .enumerate()
    {
        let base = safe_name(path);
        let mut name = base.clone();
        let mut n = i;
        while out.iter().any(|f| f.name == name) {
            name = format!("{n}-{base}");
            n += 1;
        }
        out.push(ServedFile {
            name,
            path: path.clone(),
        });
    }
    out
}

fn safe_name(path: &Path) -> String {
    let base = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let safe: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe.is_empty() || safe.chars().all(|c| c == '.') {
        "file".into()
    } else {
        safe
    }
}

/// Bytes read from a file at a time for most files (tower-http's default):
/// boot files are at most a few hundred MB, and each download holds a buffer
/// of this size (two, with tokio's own).
pub(super) const READ_SIZE: usize = 64 << 10;

/// Bytes read at a time for the OS image, a file of GBs. tokio reads a file
/// on its blocking pool, a hand-off there and back per read; with the read
/// and write system calls and the wake-ups that go with each, 64 KiB reads
/// cost the daemon about 2.5 times the CPU per GB of 1 MiB reads, and held
/// the image download to half to two thirds of nginx's speed on loopback
/// (benches/stream.rs). A download in progress holds about twice this.
pub(super) const IMAGE_READ_SIZE: usize = 1 << 20;

/// Send the file at `path` as the answer to `req`, reading `read_size` bytes
/// at a time; with a tracker, count a full (200) GET's bytes as they go out.
pub(super) async fn send(
    path: &Path,
    req: Request,
    read_size: usize,
    tracker: Option<Tracker>,
) -> Response {
    let file = ServeFile::new(path).with_buf_chunk_size(read_size);
    let response = match file.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    if parts.status == StatusCode::NOT_FOUND {
        tracing::warn!("HTTP: {} cannot be read", path.display());
    }
    let total = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match (tracker, total) {
        (Some(mut tracker), Some(total)) if parts.status == StatusCode::OK => {
            tracker.start(total);
            let counting = Counting {
                inner: Body::new(body).into_data_stream(),
                tracker: Some(tracker),
            };
            // The Content-Length header stays, so the stream goes out with it, not chunked.
            Response::from_parts(parts, Body::from_stream(counting))
        }
        _ => Response::from_parts(parts, Body::new(body)),
    }
}

/// Counts the bytes of one profile file as they go out: a start event,
/// throttled progress, a done event (or an aborted one if the client went
/// away), and Booted for the node once every file of its profile was sent in full.
pub(super) struct Tracker {
    http: Arc<Http>,
    node: String,
    file: String,
    /// Every file name of the node's profile.
    all: Vec<String>,
    sent: u64,
    total: u64,
    started: Option<Instant>,
    last_report: Instant,
    done: bool,
}

impl Tracker {
    pub(super) fn new(http: Arc<Http>, node: &str, file: &str, all: Vec<String>) -> Tracker {
        Tracker {
            http,
            node: node.to_string(),
            file: file.to_string(),
            all,
            sent: 0,
            total: 0,
            started: None,
            last_report: Instant::now(),
            done: false,
        }
    }

    fn start(&mut self, total: u64) {
        self.total = total;
        self.started = Some(Instant::now());
        let _ = self.http.shared.state.append_event(
            Some(&self.node),
            "http.file-start",
            &format!("sending {} ({})", self.file, format_bytes(total)),
            serde_json::json!({ "file": self.file, "bytes": total }),
        );
        if total == 0 {
            self.finish();
        }
    }

    fn add(&mut self, n: usize) {
        self.sent += n as u64;
        if self.sent >= self.total {
            self.finish();
        } else if self.last_report.elapsed() >= PROGRESS_EVERY {
            self.last_report = Instant::now();
            let _ = self.http.shared.state.set_progress(
                &self.node,
                self.sent,
                self.total,
                &format!(
                    "{} {}/{}",
                    self.file,
                    format_bytes(self.sent),
                    format_bytes(self.total)
                ),
            );
        }
    }

    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let secs = self.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let state = &self.http.shared.state;
        let _ = state.append_event(
            Some(&self.node),
            "http.file-done",
            &format!("sent {} ({}) in {secs:.1} s", self.file, format_bytes(self.sent)),
            serde_json::json!({ "file": self.file, "bytes": self.sent, "ms": (secs * 1000.0) as u64 }),
        );
        let complete = {
            let mut served = self.http.served.lock().unwrap_or_else(|e| e.into_inner());
            let set = served.entry(self.node.clone()).or_default();
            set.insert(self.file.clone());
            let complete = self.all.iter().all(|f| set.contains(f));
            if complete {
                // The next boot starts counting afresh (and a second download
                // of the same files does not mark the node Booted twice).
                served.remove(&self.node);
            }
            complete
        };
        if complete {
            let _ = state.transition(&self.node, NodeEvent::ProfileServed, "boot profile served");
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.started.is_some() && !self.done {
            let _ = self.http.shared.state.append_event(
                Some(&self.node),
                "http.file-aborted",
                &format!(
                    "sending {} stopped after {} of {}: the client went away",
                    self.file,
                    format_bytes(self.sent),
                    format_bytes(self.total)
                ),
                serde_json::json!({ "file": self.file, "bytes": self.sent, "total": self.total }),
            );
        }
    }
}

struct Counting<S> {
    inner: S,
    tracker: Option<Tracker>,
}

impl<S> Stream for Counting<S>
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &polled {
            // Counted on the last chunk, not at end of stream: the server may
            // stop polling once Content-Length bytes went out.
            let n = chunk.len();
            if let Some(t) = self.tracker.as_mut() {
                t.add(n);
                if t.done {
                    self.tracker = None;
                }
            }
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(kernel: &str, initrds: &[&str]) -> Vec<String> {
        let p = BootProfile {
            kernel: kernel.into(),
            initrd: initrds.iter().map(PathBuf::from).collect(),
            cmdline: String::new(),
        };
        profile_files(&p).into_iter().map(|f| f.name).collect()
    }

    #[test]
    fn profile_file_names_are_unique_and_safe() {
        assert_eq!(
            names("/a/vmlinuz", &["/a/initrd.img", "/b/initrd.img"]),
            ["vmlinuz", "initrd.img", "2-initrd.img"]
        );
        assert_eq!(names("/a/x", &["/b/x", "/c/x"]), ["x", "1-x", "2-x"]);
        assert_eq!(names("/a/2-x", &["/b/x", "/c/x"]), ["2-x", "x", "3-x"]);
        assert_eq!(
            names("/boot/vmlinuz 6.1", &["/boot/init#rd?.gz", "/"]),
            ["vmlinuz_6.1", "init_rd_.gz", "file"]
        );
    }
}
