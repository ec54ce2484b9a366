//! Moving bytes into the cache: copying a local file and downloading over
//! HTTPS, both hashing as they write into a temp file.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{FetchError, Store, TempFile};

/// How often progress is reported at most: a UI line needs no more, and the
/// state database records some of these.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_millis(250);
const CHUNK: usize = 1 << 20;

pub(crate) type Progress<'a> = &'a (dyn Fn(u64, Option<u64>) + Send + Sync);

/// Calls `progress` at most every [`PROGRESS_EVERY`], plus once at the end.
pub(crate) struct Throttle<'a> {
    f: Progress<'a>,
    last: Option<Instant>,
}

impl<'a> Throttle<'a> {
    pub(crate) fn new(f: Progress<'a>) -> Throttle<'a> {
        Throttle { f, last: None }
    }
    pub(crate) fn tick(&mut self, done: u64, total: Option<u64>) {
        if self.last.is_none_or(|l| l.elapsed() >= PROGRESS_EVERY) {
            (self.f)(done, total);
            self.last = Some(Instant::now());
        }
    }
    pub(crate) fn finish(&mut self, done: u64, total: Option<u64>) {
        (self.f)(done, total);
        self.last = Some(Instant::now());
    }
}

/// The HTTP client: https only (redirects included), extra roots added to the
/// system's, a connect timeout but no total timeout (stalls are caught per read).
pub(crate) fn build_client(
    extra_roots: &[reqwest::Certificate],
    connect_timeout: Duration,
) -> anyhow::Result<reqwest::Client> {
    use reqwest::redirect::Policy;
    let policy = Policy::custom(|attempt| {
        if attempt.url().scheme() != "https" {
            let to = attempt.url().to_string();
            attempt.error(format!("refusing a redirect to non-https {to}"))
        } else if attempt.previous().len() >= 10 {
            attempt.error("more than 10 redirects")
        } else {
            attempt.follow()
        }
    });
    let client = reqwest::Client::builder()
        .https_only(true)
        .connect_timeout(connect_timeout)
        .redirect(policy)
        .user_agent(concat!("homelab/", env!("CARGO_PKG_VERSION")))
        .tls_certs_merge(extra_roots.iter().cloned())
        .build()
        .map_err(|e| anyhow::anyhow!("building the HTTPS client: {}", error_chain(&e)))?;
    Ok(client)
}

/// Copy a local file into a temp file in the cache, hashing on the way. The copy
/// runs on a blocking thread; progress is sampled from it.
pub(crate) async fn copy_to_temp(
    store: &Store,
    src: &Path,
    origin: &str,
    progress: Progress<'_>,
) -> Result<TempFile, FetchError> {
    let mut input = match fs::File::open(src) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(FetchError::NotFound {
                path: src.to_path_buf(),
            })
        }
        Err(e) => return Err(FetchError::io(format!("reading {origin}"), e)),
    };
    let meta = input
        .metadata()
        .map_err(|e| FetchError::io(format!("reading {origin}"), e))?;
    if !meta.is_file() {
        return Err(FetchError::io(
            format!("reading {origin}"),
            io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    let total = meta.len();
    let name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut temp = TempFile::new(store.temp_path(&name));
    let tpath = temp.path.clone();
    let done = Arc::new(AtomicU64::new(0));
    let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
    let (done2, cancel2) = (done.clone(), cancel.0.clone());
    let mut job = tokio::task::spawn_blocking(move || -> io::Result<String> {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tpath)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            if cancel2.load(Ordering::Relaxed) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            h.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            done2.fetch_add(n as u64, Ordering::Relaxed);
        }
        out.flush()?;
        Ok(hex::encode(h.finalize()))
    });
    let mut throttle = Throttle::new(progress);
    let result = loop {
        tokio::select! {
            r = &mut job => break r,
            _ = tokio::time::sleep(PROGRESS_EVERY) => {
                throttle.tick(done.load(Ordering::Relaxed), Some(total));
            }
        }
    };
    let sha = result
        .map_err(|e| anyhow::anyhow!("copy task failed: {e}"))?
        .map_err(|e| FetchError::io(format!("copying {origin} into the cache"), e))?;
    throttle.finish(done.load(Ordering::Relaxed), Some(total));
    temp.sha256 = sha;
    Ok(temp)
}

/// Stops the blocking copy when the fetch future is dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Download an https URL into a temp file in the cache, hashing on the way.
/// Fails when no byte arrives for the stall timeout (waiting for the headers included).
pub(crate) async fn download(
    store: &Store,
    url: &reqwest::Url,
    progress: Progress<'_>,
) -> Result<TempFile, FetchError> {
    let stall = store.inner.stall_timeout;
    let url_s = url.to_string();
    let network = |e: reqwest::Error| FetchError::Network {
        url: url_s.clone(),
        cause: error_chain(&e.without_url()),
    };
    let stalled = |done: u64| FetchError::Stalled {
        url: url_s.clone(),
        timeout: stall,
        done,
    };
    tracing::info!(url = %url_s, "downloading");
    let resp = match tokio::time::timeout(stall, store.inner.client.get(url.clone()).send()).await {
        Err(_) => return Err(stalled(0)),
        Ok(Err(e)) => return Err(network(e)),
        Ok(Ok(r)) => r,
    };
    if !resp.status().is_success() {
        return Err(FetchError::HttpStatus {
            url: url_s.clone(),
            status: resp.status().as_u16(),
        });
    }
    let total = resp.content_length();
    let name = super::url_file_name(url).unwrap_or("download");
    let mut temp = TempFile::new(store.temp_path(name));
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp.path)
        .await
        .map_err(|e| FetchError::io(format!("creating {}", temp.path.display()), e))?;
    let write_err =
        |e: io::Error| FetchError::io(format!("writing {} into the cache", url_s.clone()), e);
    let mut out = tokio::io::BufWriter::with_capacity(CHUNK, file);
    let mut h = Sha256::new();
    let mut done = 0u64;
    let mut throttle = Throttle::new(progress);
    let mut body = resp.bytes_stream();
    loop {
        match tokio::time::timeout(stall, body.next()).await {
            Err(_) => return Err(stalled(done)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(network(e)),
            Ok(Some(Ok(chunk))) => {
                h.update(&chunk);
                out.write_all(&chunk).await.map_err(write_err)?;
                done += chunk.len() as u64;
                throttle.tick(done, total);
            }
        }
    }
    out.flush().await.map_err(write_err)?;
    drop(out);
    throttle.finish(done, total);
    temp.sha256 = hex::encode(h.finalize());
    Ok(temp)
}

/// An error and its causes on one line: reqwest's own message is only
/// "error sending request"; the reason (refused, TLS, DNS) is in the chain.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}
