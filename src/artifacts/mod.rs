//! Artifacts (OS images, kernels, k3s releases): fetched once, verified by
//! sha256, cached under `<state dir>/artifacts/<sha256>/<file name>`.
//!
//! The sha256 in the inventory is the only thing trusted: a file becomes an
//! artifact only after its bytes hashed to it, and a cached file is handed out
//! again only while its size and mtime are what they were when it was verified
//! (anything else is hashed again or fetched again). A local mirror directory
//! is consulted before any download, so a lab with no internet works from it.
//!
//! Downloads stream into a temp file in the cache dir while hashing and are
//! renamed into place only once the hash matches, so a crash, a cancelled
//! future or a bad download never leaves a half file where a good one belongs.

mod fetch;
mod image;
pub mod pin;
pub mod progress;
pub mod sums;

pub use image::{detect_format, servable_image, ImageFormat};

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::state::{now_ms, Artifact, State};

/// Name of the cache directory inside the state dir.
pub const CACHE_DIR: &str = "artifacts";
/// Prefix of in-progress files in the cache dir; they are never artifacts.
const TEMP_PREFIX: &str = ".tmp-";
/// Waiting longer than this for a TCP connection means the host is not there.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// No byte for this long means the transfer is stuck. There is deliberately no
/// total timeout: an OS image on a slow link may take an hour and be fine.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What the inventory asks for: a logical name, where the bytes are, and the
/// sha256 they must hash to (the only proof that they are the right bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Logical name (e.g. "os-image"); keys the artifact's database row.
    pub name: String,
    /// An `https://` URL or an absolute local path. Plain http is refused:
    /// the sha256 would still catch tampering, but not leak what we fetch.
    pub source: String,
    /// Lower-case hex sha256 of the file's bytes.
    pub sha256: String,
}

/// Why a fetch failed. Each message names the thing at fault and, where there
/// is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The bytes are not the ones the inventory pinned.
    #[error(
        "sha256 mismatch for {origin}: expected {expected}, got {actual}; the file was discarded. \
         Check the sha256 in inventory.toml: the file at the source may have changed"
    )]
    ChecksumMismatch {
        origin: String,
        expected: String,
        actual: String,
    },
    /// The bytes do not have the sha512 they were pinned to.
    #[error(
        "sha512 mismatch for {origin}: expected {expected}, got {actual}; the file was discarded. \
         Check the checksum in inventory.toml: the file at the source may have changed"
    )]
    Sha512Mismatch {
        origin: String,
        expected: String,
        actual: String,
    },
    /// Connecting, TLS, or reading the response failed.
    #[error("downloading {url} failed: {cause}")]
    Network { url: String, cause: String },
    /// The server answered, but not with the file.
    #[error("downloading {url} failed: the server answered {status}")]
    HttpStatus { url: String, status: u16 },
    /// The server stopped sending bytes mid-transfer (or before the headers).
    #[error(
        "downloading {url} stalled: no data for {} s after {done} bytes; \
         check the server or the network, then run again",
        .timeout.as_secs()
    )]
    Stalled {
        url: String,
        timeout: Duration,
        done: u64,
    },
    /// A local source path that is not there.
    #[error("artifact source {path} does not exist; fix the path in inventory.toml or copy the file there")]
    NotFound { path: PathBuf },
    /// `http://` sources are refused rather than silently downgraded.
    #[error("artifact source {url} uses plain http; use an https:// URL or put the file in the mirror directory")]
    InsecureUrl { url: String },
    /// The spec itself is malformed (bad sha256, unsupported source form).
    #[error("artifact `{name}`: {reason}")]
    InvalidSpec { name: String, reason: String },
    /// Reading or writing a local file failed.
    #[error("{context}: {error}")]
    Io { context: String, error: io::Error },
    /// The state database or another internal step failed.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl FetchError {
    fn io(context: impl Into<String>, error: io::Error) -> FetchError {
        FetchError::Io {
            context: context.into(),
            error,
        }
    }
}

/// The artifact cache and fetcher. Cheap to clone; clones share the
/// per-sha256 locks, so the whole daemon should use clones of one `Store`.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    state: State,
    dir: PathBuf,
    mirror: Option<PathBuf>,
    extra_roots: Vec<reqwest::Certificate>,
    stall_timeout: Duration,
    client: reqwest::Client,
    /// One async mutex per sha256 (and per conversion), so concurrent fetches
    /// of one file download it once. Weak: entries die with their last user.
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    /// Distinguishes temp files of concurrent operations in one process.
    temp_seq: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .field("mirror", &self.inner.mirror)
            .finish()
    }
}

impl Store {
    /// cache dir = <state dir>/artifacts; mirror = a local folder consulted before any download
    /// (the air-gap path); extra_ca = a PEM file with extra trusted roots, for private HTTPS
    /// mirrors, added to (not replacing) the system's roots.
    pub fn new(
        state: &State,
        mirror: Option<PathBuf>,
        extra_ca: Option<PathBuf>,
    ) -> anyhow::Result<Store> {
        install_crypto_provider();
        let dir = state.dir().join(CACHE_DIR);
        create_dir_0755(&dir)?;
        if let Some(m) = &mirror {
            anyhow::ensure!(
                m.is_dir(),
                "mirror directory {} does not exist or is not a directory",
                m.display()
            );
        }
        let extra_roots = match &extra_ca {
            None => Vec::new(),
            Some(p) => {
                let pem = fs::read(p)
                    .with_context(|| format!("reading extra CA file {}", p.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .with_context(|| format!("parsing extra CA file {}", p.display()))?;
                anyhow::ensure!(
                    !certs.is_empty(),
                    "extra CA file {} holds no PEM certificate",
                    p.display()
                );
                certs
            }
        };
        let client = fetch::build_client(&extra_roots, DEFAULT_CONNECT_TIMEOUT)?;
        remove_stale_temps(&dir);
        Ok(Store {
            inner: Arc::new(Inner {
                state: state.clone(),
                dir,
                mirror,
                extra_roots,
                stall_timeout: DEFAULT_STALL_TIMEOUT,
                client,
                locks: Mutex::new(HashMap::new()),
                temp_seq: AtomicU64::new(0),
            }),
        })
    }

    /// Same store with other timeouts: tests and slow links need them shorter
    /// or longer than the defaults. Clones made before do not change.
    pub fn with_timeouts(&self, connect: Duration, stall: Duration) -> anyhow::Result<Store> {
        let i = &self.inner;
        let client = fetch::build_client(&i.extra_roots, connect)?;
        Ok(Store {
            inner: Arc::new(Inner {
                state: i.state.clone(),
                dir: i.dir.clone(),
                mirror: i.mirror.clone(),
                extra_roots: i.extra_roots.clone(),
                stall_timeout: stall,
                client,
                locks: Mutex::new(HashMap::new()),
                temp_seq: AtomicU64::new(0),
            }),
        })
    }

    /// The cache directory (`<state dir>/artifacts`), which HTTP serves files from.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The state the store records its artifacts (and their events) in.
    pub fn state(&self) -> &State {
        &self.inner.state
    }

    /// Return the verified cached file, fetching it if needed. `progress(done, total)` is
    /// called as bytes arrive (at most ~4 times a second) so the UI can show a live line.
    pub async fn fetch(
        &self,
        spec: &Spec,
        progress: &(dyn Fn(u64, Option<u64>) + Send + Sync),
    ) -> Result<Artifact, FetchError> {
        validate_spec(spec)?;
        let source = Source::parse(spec)?;
        let file_name = cache_file_name(spec);
        let lock = self.lock_for(&spec.sha256);
        let _guard = lock.lock().await;

        if let Some(a) = self.cached(spec)? {
            return Ok(a);
        }
        if let Some(a) = self.reverify(spec).await? {
            return Ok(a);
        }
        let (temp, origin) = self.obtain(spec, source, progress).await?;
        self.install(spec, temp, &origin, &file_name)
    }

    /// The file's bytes in a temp file (hashed with sha256 on the way): from the
    /// local path, else the mirror (only a file matching `spec.sha256`), else
    /// the https URL.
    async fn obtain(
        &self,
        spec: &Spec,
        source: Source,
        progress: &(dyn Fn(u64, Option<u64>) + Send + Sync),
    ) -> Result<(TempFile, String), FetchError> {
        match source {
            Source::Local(path) => {
                let origin = path.display().to_string();
                let temp = fetch::copy_to_temp(self, &path, &origin, progress).await?;
                Ok((temp, origin))
            }
            Source::Https(url) => {
                if let Some(found) = self.copy_from_mirror(spec, &url, progress).await? {
                    return Ok(found);
                }
                let temp = fetch::download(self, &url, progress).await?;
                Ok((temp, url.to_string()))
            }
        }
    }

    /// Like [`Store::fetch`], for a file pinned by sha256 or sha512. A sha512
    /// is checked on the fetched bytes here (a second pass over the temp
    /// file); the sha256 of bytes that passed is recorded, and from then on
    /// the file is cached, served and streamed to installers under that sha256.
    pub async fn fetch_digest(
        &self,
        name: &str,
        source: &str,
        digest: &crate::inventory::Digest,
        progress: &(dyn Fn(u64, Option<u64>) + Send + Sync),
    ) -> Result<Artifact, FetchError> {
        use crate::inventory::Algorithm;
        let mut spec = Spec {
            name: name.to_string(),
            source: source.to_string(),
            sha256: String::new(),
        };
        if digest.algorithm == Algorithm::Sha256 {
            spec.sha256 = digest.hex.clone();
            return self.fetch(&spec, progress).await;
        }
        let invalid = |reason: String| FetchError::InvalidSpec {
            name: name.to_string(),
            reason,
        };
        if crate::inventory::digest_problem(&digest.hex, Algorithm::Sha512).is_some() {
            return Err(invalid(format!("`{}` is not a sha512", digest.hex)));
        }
        let lock = self.lock_for(&digest.hex);
        let guard = lock.lock().await;
        if let Some(sha256) = self.inner.state.verified_sha512(&digest.hex)? {
            spec.sha256 = sha256;
            drop(guard);
            return self.fetch(&spec, progress).await;
        }
        // Unknown sha256: the mirror is searched by file name only.
        let source = Source::parse(&spec)?;
        let (temp, origin) = match source {
            Source::Https(url) => match self.mirror_by_name(&url) {
                Some(path) => {
                    let origin = path.display().to_string();
                    (
                        fetch::copy_to_temp(self, &path, &origin, progress).await?,
                        origin,
                    )
                }
                None => (
                    fetch::download(self, &url, progress).await?,
                    url.to_string(),
                ),
            },
            local => self.obtain(&spec, local, progress).await?,
        };
        let tpath = temp.path.clone();
        let actual = tokio::task::spawn_blocking(move || sha512_file(&tpath))
            .await
            .map_err(|e| anyhow::anyhow!("hashing task failed: {e}"))?
            .map_err(|e| FetchError::io(format!("hashing {origin}"), e))?;
        if actual != digest.hex {
            return Err(FetchError::Sha512Mismatch {
                origin,
                expected: digest.hex.clone(),
                actual,
            });
        }
        self.inner
            .state
            .put_verified_sha512(&digest.hex, &temp.sha256)?;
        spec.sha256 = temp.sha256.clone();
        let file_name = cache_file_name(&spec);
        self.install(&spec, temp, &origin, &file_name)
    }

    /// The mirror's file named like the URL's last part, if there is one.
    fn mirror_by_name(&self, url: &reqwest::Url) -> Option<PathBuf> {
        let path = self.inner.mirror.as_ref()?.join(url_file_name(url)?);
        path.is_file().then_some(path)
    }

    /// A small file nothing pins yet, such as a release's checksum list: from
    /// the mirror (by the URL's file name) if it is there, else downloaded over
    /// https. Refused above `max_bytes`. The files it names are then fetched
    /// pinned to the sums it lists. Returns where it came from and its bytes.
    pub async fn fetch_unpinned(
        &self,
        url: &str,
        max_bytes: usize,
    ) -> anyhow::Result<(String, Vec<u8>)> {
        let parsed = reqwest::Url::parse(url).with_context(|| format!("`{url}` is not a URL"))?;
        let name = parsed
            .path_segments()
            .and_then(|mut s| s.next_back())
            .unwrap_or_default()
            .to_string();
        if let Some(mirror) = &self.inner.mirror {
            let path = mirror.join(&name);
            if !name.is_empty() && path.is_file() {
                let bytes =
                    fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                anyhow::ensure!(
                    bytes.len() <= max_bytes,
                    "{} is larger than {max_bytes} bytes: not the file it should be",
                    path.display()
                );
                return Ok((path.display().to_string(), bytes));
            }
        }
        anyhow::ensure!(
            parsed.scheme() == "https",
            "{url}: only https downloads are made; put `{name}` in the mirror directory"
        );
        let mut resp = self
            .inner
            .client
            .get(parsed.clone())
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("downloading {url}"))?;
        let mut bytes = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .with_context(|| format!("downloading {url}"))?
        {
            bytes.extend_from_slice(&chunk);
            anyhow::ensure!(
                bytes.len() <= max_bytes,
                "{url} is larger than {max_bytes} bytes: not the file it should be"
            );
        }
        Ok((url.to_string(), bytes))
    }

    /// The cached, verified file if present and unchanged since it was verified; never
    /// fetches and never hashes (cheap enough for `plan` and `status`). A file that changed
    /// is not returned; the next `fetch` hashes it again or fetches it again.
    pub fn cached(&self, spec: &Spec) -> anyhow::Result<Option<Artifact>> {
        let Some(row) = self.inner.state.artifact(&spec.name)? else {
            return Ok(None);
        };
        if row.sha256 != spec.sha256 {
            return Ok(None);
        }
        Ok(self.unchanged(&row).then_some(row))
    }

    /// True when the row's file is inside this cache under its sha256 and still has the
    /// size and mtime recorded when it was verified.
    fn unchanged(&self, row: &Artifact) -> bool {
        let path = Path::new(&row.path);
        if path.parent() != Some(&self.inner.dir.join(&row.sha256)) {
            return false;
        }
        let Ok(meta) = fs::symlink_metadata(path) else {
            return false;
        };
        meta.file_type().is_file()
            && meta.len() == row.size
            && meta.modified().ok() == Some(ms_to_time(row.fetched_ms))
    }

    /// A file already in the cache whose size or mtime no longer match (or whose row was
    /// lost): hash it again rather than fetch it again; delete it if it is wrong.
    async fn reverify(&self, spec: &Spec) -> Result<Option<Artifact>, FetchError> {
        let sha_dir = self.inner.dir.join(&spec.sha256);
        let mut candidates = vec![sha_dir.join(cache_file_name(spec))];
        if let Some(row) = self.inner.state.artifact(&spec.name)? {
            let p = PathBuf::from(&row.path);
            if row.sha256 == spec.sha256 && p.parent() == Some(&sha_dir) && !candidates.contains(&p)
            {
                candidates.push(p);
            }
        }
        for path in candidates {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_file() => {}
                _ => continue,
            }
            let p = path.clone();
            let actual = tokio::task::spawn_blocking(move || sha256_file(&p))
                .await
                .map_err(|e| anyhow::anyhow!("hashing task failed: {e}"))?
                .map_err(|e| FetchError::io(format!("hashing {}", path.display()), e))?;
            if actual == spec.sha256 {
                tracing::info!(artifact = %spec.name, path = %path.display(), "cached file changed on disk but its sha256 still matches; keeping it");
                let a = self.record(spec, &path, "re-verified")?;
                return Ok(Some(a));
            }
            tracing::warn!(artifact = %spec.name, path = %path.display(), expected = %spec.sha256, %actual, "cached file no longer matches its sha256; deleting it and fetching again");
            let _ = self.inner.state.append_event(
                None,
                "artifact.cache_corrupt",
                &format!(
                    "cached {} no longer matches its sha256 (got {actual}); deleted, fetching again",
                    path.display()
                ),
                serde_json::json!({ "name": spec.name, "path": path, "expected": spec.sha256, "actual": actual }),
            );
            fs::remove_file(&path)
                .map_err(|e| FetchError::io(format!("deleting {}", path.display()), e))?;
        }
        Ok(None)
    }

    /// Look the URL's file up in the mirror, by file name and by sha256. A mirror file with
    /// the wrong sha256 is reported (log and event) and skipped: it is probably an older
    /// release under the same name, and the download may still succeed.
    async fn copy_from_mirror(
        &self,
        spec: &Spec,
        url: &reqwest::Url,
        progress: &(dyn Fn(u64, Option<u64>) + Send + Sync),
    ) -> Result<Option<(TempFile, String)>, FetchError> {
        let Some(mirror) = &self.inner.mirror else {
            return Ok(None);
        };
        let mut candidates = Vec::new();
        if let Some(name) = url_file_name(url) {
            candidates.push(mirror.join(name));
        }
        candidates.push(mirror.join(&spec.sha256));
        for path in candidates {
            if !path.is_file() {
                continue;
            }
            let origin = path.display().to_string();
            match fetch::copy_to_temp(self, &path, &origin, progress).await {
                Ok(temp) if temp.sha256 == spec.sha256 => return Ok(Some((temp, origin))),
                Ok(temp) => {
                    tracing::warn!(artifact = %spec.name, path = %origin, expected = %spec.sha256, actual = %temp.sha256, "mirror file has the wrong sha256; skipping it");
                    self.inner.state.append_event(
                        None,
                        "artifact.mirror_mismatch",
                        &format!(
                            "mirror file {origin} for `{}` has sha256 {}, expected {}; skipped",
                            spec.name, temp.sha256, spec.sha256
                        ),
                        serde_json::json!({ "name": spec.name, "path": origin, "expected": spec.sha256, "actual": temp.sha256 }),
                    )?;
                    drop(temp);
                }
                Err(e) => {
                    tracing::warn!(artifact = %spec.name, path = %origin, error = %e, "cannot read mirror file; skipping it");
                }
            }
        }
        Ok(None)
    }

    /// Move a verified temp file into place: checked, mode 0644, mtime = the recorded
    /// fetch time, synced, renamed, recorded. Consumes the temp file (removed on error).
    fn install(
        &self,
        spec: &Spec,
        temp: TempFile,
        origin: &str,
        file_name: &str,
    ) -> Result<Artifact, FetchError> {
        if temp.sha256 != spec.sha256 {
            let actual = temp.sha256.clone();
            drop(temp);
            return Err(FetchError::ChecksumMismatch {
                origin: origin.to_owned(),
                expected: spec.sha256.clone(),
                actual,
            });
        }
        let sha_dir = self.inner.dir.join(&spec.sha256);
        create_dir_0755(&sha_dir)?;
        let dest = sha_dir.join(file_name);
        let fetched_ms = now_ms();
        seal(&temp.path, fetched_ms)
            .map_err(|e| FetchError::io(format!("finishing {}", temp.path.display()), e))?;
        fs::rename(&temp.path, &dest).map_err(|e| {
            FetchError::io(
                format!("moving {} to {}", temp.path.display(), dest.display()),
                e,
            )
        })?;
        temp.disarm();
        sync_dir(&sha_dir);
        let a = Artifact {
            name: spec.name.clone(),
            sha256: spec.sha256.clone(),
            path: dest.display().to_string(),
            size: fs::metadata(&dest)
                .map_err(|e| FetchError::io(format!("reading {}", dest.display()), e))?
                .len(),
            source: spec.source.clone(),
            fetched_ms,
        };
        self.inner.state.put_artifact(&a)?;
        let _ = self.inner.state.append_event(
            None,
            "artifact.fetched",
            &format!("fetched `{}` from {origin} ({} bytes)", a.name, a.size),
            serde_json::json!({ "name": a.name, "sha256": a.sha256, "from": origin, "size": a.size }),
        );
        Ok(a)
    }

    /// Record an already-verified file in place (re-verification): new mtime, new row.
    fn record(&self, spec: &Spec, path: &Path, how: &str) -> Result<Artifact, FetchError> {
        let fetched_ms = now_ms();
        seal(path, fetched_ms)
            .map_err(|e| FetchError::io(format!("finishing {}", path.display()), e))?;
        let size = fs::metadata(path)
            .map_err(|e| FetchError::io(format!("reading {}", path.display()), e))?
            .len();
        let a = Artifact {
            name: spec.name.clone(),
            sha256: spec.sha256.clone(),
            path: path.display().to_string(),
            size,
            source: spec.source.clone(),
            fetched_ms,
        };
        self.inner.state.put_artifact(&a)?;
        tracing::debug!(artifact = %a.name, how, "artifact recorded");
        Ok(a)
    }

    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.inner.locks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = map.get(key).and_then(Weak::upgrade) {
            return l;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let l = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(key.to_owned(), Arc::downgrade(&l));
        l
    }

    /// A fresh temp file path in the cache dir (same filesystem, so rename is atomic).
    fn temp_path(&self, hint: &str) -> PathBuf {
        let seq = self.inner.temp_seq.fetch_add(1, Ordering::Relaxed);
        let hint: String = hint
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(12)
            .collect();
        self.inner
            .dir
            .join(format!("{TEMP_PREFIX}{}-{seq}-{hint}", std::process::id()))
    }
}

/// Where a spec's bytes come from.
enum Source {
    Local(PathBuf),
    Https(reqwest::Url),
}

impl Source {
    fn parse(spec: &Spec) -> Result<Source, FetchError> {
        let s = spec.source.trim();
        let invalid = |reason: String| FetchError::InvalidSpec {
            name: spec.name.clone(),
            reason,
        };
        if s.starts_with('/') {
            return Ok(Source::Local(PathBuf::from(s)));
        }
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("http://") {
            return Err(FetchError::InsecureUrl { url: s.to_owned() });
        }
        if lower.starts_with("https://") {
            let url = reqwest::Url::parse(s)
                .map_err(|e| invalid(format!("source `{s}` is not a valid URL: {e}")))?;
            return Ok(Source::Https(url));
        }
        Err(invalid(format!(
            "source `{s}` is neither an https:// URL nor an absolute path"
        )))
    }
}

fn validate_spec(spec: &Spec) -> Result<(), FetchError> {
    if spec.name.trim().is_empty() {
        return Err(FetchError::InvalidSpec {
            name: spec.name.clone(),
            reason: "the name is empty (it keys the cache record)".into(),
        });
    }
    let ok = spec.sha256.len() == 64
        && spec
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FetchError::InvalidSpec {
            name: spec.name.clone(),
            reason: format!(
                "sha256 `{}` is not 64 lower-case hex digits (as printed by `sha256sum`)",
                spec.sha256
            ),
        })
    }
}

/// The file name an artifact gets in the cache: the source's last path component
/// (so served files keep recognisable names), or the logical name when that is
/// empty or unsafe.
fn cache_file_name(spec: &Spec) -> String {
    let s = spec.source.trim();
    let candidate = if s.starts_with('/') {
        Path::new(s)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    } else {
        reqwest::Url::parse(s)
            .ok()
            .and_then(|u| url_file_name(&u).map(str::to_owned))
    };
    candidate
        .filter(|n| safe_file_name(n))
        .or_else(|| Some(spec.name.clone()).filter(|n| safe_file_name(n)))
        .unwrap_or_else(|| "artifact".to_owned())
}

fn url_file_name(url: &reqwest::Url) -> Option<&str> {
    url.path_segments()?
        .next_back()
        .filter(|n| safe_file_name(n))
}

fn safe_file_name(n: &str) -> bool {
    !n.is_empty()
        && n != "."
        && n != ".."
        && !n.starts_with(TEMP_PREFIX)
        && !n.contains(['/', '\0', '%'])
        && n.len() <= 200
}

/// A file being written in the cache dir. Removed on drop unless installed, so every
/// error path (and a cancelled future) cleans up after itself.
pub(crate) struct TempFile {
    path: PathBuf,
    sha256: String,
    armed: bool,
}

impl TempFile {
    fn new(path: PathBuf) -> TempFile {
        TempFile {
            path,
            sha256: String::new(),
            armed: true,
        }
    }
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Make the file what a cached artifact is: 0644 (artifacts are not secrets and are
/// served over HTTP), mtime = the recorded fetch time, durable on disk.
fn seal(path: &Path, fetched_ms: i64) -> io::Result<()> {
    let f = fs::OpenOptions::new().write(true).open(path)?;
    f.set_permissions(fs::Permissions::from_mode(0o644))?;
    f.set_modified(ms_to_time(fetched_ms))?;
    f.sync_all()
}

fn ms_to_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn create_dir_0755(dir: &Path) -> anyhow::Result<()> {
    match fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    // The umask may have narrowed the mode; set it exactly.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// sha256 of a whole file, lower-case hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// sha512 of a whole file, lower-case hex.
pub fn sha512_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = sha2::Sha512::new();
    io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Temp files left by a process that died (crash, kill -9): their pid is gone.
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let me = std::process::id();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TEMP_PREFIX) else {
            continue;
        };
        let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        let alive = pid.is_some_and(|p| p == me || Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Install ring as rustls's process-wide crypto provider. reqwest is built
/// without one (so the static binary carries ring only, not aws-lc); another
/// module may have installed it first, which is fine.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests;
