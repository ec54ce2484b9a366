//! Artifact fetching against real servers and real tools, all on loopback or
//! temp dirs: a local HTTPS server (certificate from a test CA made here),
//! a mirror directory, and qemu-img for qcow2 conversion.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use homelab::artifacts::{servable_image, FetchError, ImageFormat, Spec, Store};
use homelab::state::State;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn no_progress(_: u64, _: Option<u64>) {}

fn body(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A test CA and a server certificate for 127.0.0.1 signed by it.
struct Pki {
    ca_pem: PathBuf,
    server: Arc<rustls::ServerConfig>,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "homelab test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();

    let ca_pem = dir.join("test-ca.pem");
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf_cert.der().clone()], key)
    .unwrap();
    Pki {
        ca_pem,
        server: Arc::new(server),
    }
}

/// What the test HTTPS server does with each request.
#[derive(Clone)]
enum Behave {
    /// 200 with this body, all at once.
    Serve(Arc<Vec<u8>>),
    /// 200 with this body in `pieces` parts, `delay` apart.
    Slow {
        body: Arc<Vec<u8>>,
        pieces: usize,
        delay: Duration,
    },
    /// Headers for `len` bytes, `sent` bytes of them, then silence.
    Stall { len: usize, sent: usize },
    /// TLS handshake, then nothing at all (no headers).
    Mute,
    /// An error status.
    Status(u16),
}

struct Server {
    port: u16,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

async fn https_server(config: Arc<rustls::ServerConfig>, behave: Behave) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let h = hits.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, behave, hits) = (acceptor.clone(), behave.clone(), h.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                hits.fetch_add(1, Ordering::SeqCst);
                let ok = |len: usize| {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\
                         Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
                    )
                };
                let _ = async {
                    match behave {
                        Behave::Serve(b) => {
                            tls.write_all(ok(b.len()).as_bytes()).await?;
                            tls.write_all(&b).await?;
                        }
                        Behave::Slow {
                            body,
                            pieces,
                            delay,
                        } => {
                            tls.write_all(ok(body.len()).as_bytes()).await?;
                            for part in body.chunks(body.len().div_ceil(pieces)) {
                                tls.write_all(part).await?;
                                tls.flush().await?;
                                tokio::time::sleep(delay).await;
                            }
                        }
                        Behave::Stall { len, sent } => {
                            tls.write_all(ok(len).as_bytes()).await?;
                            tls.write_all(&vec![0u8; sent]).await?;
                            tls.flush().await?;
                            tokio::time::sleep(Duration::from_secs(60)).await;
                        }
                        Behave::Mute => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                        }
                        Behave::Status(code) => {
                            let r = format!(
                                "HTTP/1.1 {code} Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            );
                            tls.write_all(r.as_bytes()).await?;
                        }
                    }
                    tls.flush().await?;
                    tls.shutdown().await
                }
                .await;
            });
        }
    });
    Server { port, hits, task }
}

/// A TCP port on 127.0.0.1 that counts connections and closes them at once:
/// a fetch through it would fail, and the count shows whether one was tried.
async fn tripwire() -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    (port, count, task)
}

struct Env {
    tmp: tempfile::TempDir,
    state: State,
    pki: Pki,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let state = State::open(&tmp.path().join("state")).unwrap();
        let pki = pki(tmp.path());
        Env { tmp, state, pki }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }
    /// A store trusting the test CA, with short timeouts.
    fn store(&self, mirror: Option<PathBuf>) -> Store {
        Store::new(&self.state, mirror, Some(self.pki.ca_pem.clone()))
            .unwrap()
            .with_timeouts(Duration::from_secs(5), Duration::from_secs(5))
            .unwrap()
    }
    fn mirror(&self) -> PathBuf {
        let m = self.path("mirror");
        std::fs::create_dir_all(&m).unwrap();
        m
    }
    async fn server(&self, behave: Behave) -> Server {
        https_server(self.pki.server.clone(), behave).await
    }
    fn cache_files(&self) -> Vec<PathBuf> {
        files_under(&self.state.dir().join("artifacts"))
    }
    fn events(&self, kind: &str) -> Vec<homelab::state::Event> {
        self.state
            .last_events(100, None)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == kind)
            .collect()
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn spec(name: &str, source: &str, sha256: &str) -> Spec {
    Spec {
        name: name.into(),
        source: source.into(),
        sha256: sha256.into(),
    }
}

// ---- https ----

#[tokio::test]
async fn https_download_is_verified_and_cached() {
    let env = Env::new();
    let data = Arc::new(body(300_000, 1));
    let srv = env.server(Behave::Serve(data.clone())).await;
    let store = env.store(None);
    let s = spec("os-image", &srv.url("/images/debian.img"), &sha(&data));

    let a = store.fetch(&s, &no_progress).await.unwrap();
    assert_eq!(std::fs::read(&a.path).unwrap(), *data);
    assert_eq!(
        Path::new(&a.path),
        env.state
            .dir()
            .join("artifacts")
            .join(&s.sha256)
            .join("debian.img")
    );
    assert_eq!(a.source, s.source);
    assert_eq!(
        std::fs::metadata(&a.path).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert_eq!(env.cache_files(), vec![PathBuf::from(&a.path)]);
    assert_eq!(srv.hits.load(Ordering::SeqCst), 1);

    // Cached: no second request, same file.
    let ino = std::fs::metadata(&a.path).unwrap().ino();
    let b = store.fetch(&s, &no_progress).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(std::fs::metadata(&b.path).unwrap().ino(), ino);
    assert_eq!(srv.hits.load(Ordering::SeqCst), 1);
    // A new Store on the same state dir (a restarted daemon) trusts the cache too.
    let again = env.store(None);
    assert_eq!(again.cached(&s).unwrap(), Some(a));
}

#[tokio::test]
async fn https_progress_sees_increasing_done_and_the_total() {
    let env = Env::new();
    let data = Arc::new(body(1 << 20, 2));
    let srv = env
        .server(Behave::Slow {
            body: data.clone(),
            pieces: 12,
            delay: Duration::from_millis(100),
        })
        .await;
    let store = env.store(None);
    let s = spec("os-image", &srv.url("/os.img"), &sha(&data));
    let seen = Mutex::new(Vec::new());
    let progress = |done: u64, total: Option<u64>| {
        seen.lock().unwrap().push((Instant::now(), done, total));
    };
    let start = Instant::now();
    store.fetch(&s, &progress).await.unwrap();
    let elapsed = start.elapsed();
    let seen = seen.into_inner().unwrap();
    let len = data.len() as u64;
    assert!(seen.len() >= 3, "{} calls", seen.len());
    assert!(seen.iter().all(|(_, _, t)| *t == Some(len)));
    assert!(seen.windows(2).all(|w| w[0].1 <= w[1].1));
    assert!(seen.windows(2).any(|w| w[0].1 < w[1].1));
    assert_eq!(seen.last().unwrap().1, len);
    // At most ~4 a second: one per 250 ms, plus the final one.
    let max = (elapsed.as_millis() / 250) as usize + 2;
    assert!(seen.len() <= max, "{} calls in {elapsed:?}", seen.len());
}

#[tokio::test]
async fn https_wrong_bytes_are_a_mismatch_and_leave_nothing() {
    let env = Env::new();
    let served = Arc::new(body(200_000, 3));
    let expected = sha(&body(200_000, 4));
    let srv = env.server(Behave::Serve(served.clone())).await;
    let store = env.store(None);
    let url = srv.url("/os.img");
    let err = store
        .fetch(&spec("os-image", &url, &expected), &no_progress)
        .await
        .unwrap_err();
    match &err {
        FetchError::ChecksumMismatch {
            origin,
            expected: e,
            actual,
        } => {
            assert_eq!(origin, &url);
            assert_eq!(e, &expected);
            assert_eq!(actual, &sha(&served));
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&url) && msg.contains(&expected) && msg.contains(&sha(&served)));
    assert!(msg.contains("discarded"), "{msg}");
    assert!(msg.contains("inventory.toml"), "{msg}");
    // Neither the temp file nor a final file exists, and nothing was recorded.
    assert!(env.cache_files().is_empty(), "{:?}", env.cache_files());
    assert!(env.state.artifact("os-image").unwrap().is_none());
}

#[tokio::test]
async fn https_stall_is_a_timeout_and_leaves_nothing() {
    let env = Env::new();
    let store = Store::new(&env.state, None, Some(env.pki.ca_pem.clone()))
        .unwrap()
        .with_timeouts(Duration::from_secs(5), Duration::from_secs(1))
        .unwrap();
    let want = sha(&[0u8; 100_000]);

    // Mid-body: headers and some bytes, then nothing.
    let srv = env
        .server(Behave::Stall {
            len: 100_000,
            sent: 10_000,
        })
        .await;
    let url = srv.url("/os.img");
    let start = Instant::now();
    let err = store
        .fetch(&spec("os-image", &url, &want), &no_progress)
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10));
    match &err {
        FetchError::Stalled { url: u, done, .. } => {
            assert_eq!(u, &url);
            assert!(*done > 0 && *done <= 10_000, "{done}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("stalled"), "{err}");
    assert!(env.cache_files().is_empty(), "{:?}", env.cache_files());

    // Before the headers: the TLS handshake completes, then silence.
    let mute = env.server(Behave::Mute).await;
    let err = store
        .fetch(&spec("os-image", &mute.url("/os.img"), &want), &no_progress)
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Stalled { done: 0, .. }),
        "{err:?}"
    );
    assert!(env.cache_files().is_empty());
}

#[tokio::test]
async fn https_errors_name_the_url_and_the_cause() {
    let env = Env::new();
    let store = env.store(None);
    let any = sha(b"x");

    // An error status.
    let srv = env.server(Behave::Status(404)).await;
    let url = srv.url("/missing.img");
    let err = store
        .fetch(&spec("a", &url, &any), &no_progress)
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::HttpStatus { status: 404, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&url), "{err}");

    // Nobody listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("https://127.0.0.1:{port}/os.img");
    let err = store
        .fetch(&spec("a", &url, &any), &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Network { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&url), "{msg}");
    assert!(msg.to_lowercase().contains("refused"), "{msg}");

    // A server whose CA is not trusted (no extra_ca).
    let good = Arc::new(body(1000, 5));
    let srv = env.server(Behave::Serve(good.clone())).await;
    let plain = Store::new(&env.state, None, None).unwrap();
    let url = srv.url("/os.img");
    let err = plain
        .fetch(&spec("a", &url, &sha(&good)), &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Network { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&url), "{msg}");
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");
    assert!(env.cache_files().is_empty());
}

#[tokio::test]
async fn plain_http_is_refused_without_a_request() {
    let env = Env::new();
    let (port, count, _task) = tripwire().await;
    let store = env.store(None);
    let url = format!("http://127.0.0.1:{port}/os.img");
    let err = store
        .fetch(&spec("a", &url, &sha(b"x")), &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::InsecureUrl { .. }), "{err:?}");
    assert!(err.to_string().contains(&url));
    assert_eq!(count.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_of_one_spec_download_once() {
    let env = Env::new();
    let data = Arc::new(body(500_000, 6));
    let srv = env
        .server(Behave::Slow {
            body: data.clone(),
            pieces: 5,
            delay: Duration::from_millis(50),
        })
        .await;
    let store = env.store(None);
    let s = spec("os-image", &srv.url("/os.img"), &sha(&data));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (store, s) = (store.clone(), s.clone());
            tokio::spawn(async move { store.fetch(&s, &no_progress).await })
        })
        .collect();
    let mut paths = Vec::new();
    for t in tasks {
        paths.push(t.await.unwrap().unwrap().path);
    }
    assert!(paths.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(std::fs::read(&paths[0]).unwrap(), *data);
    assert_eq!(srv.hits.load(Ordering::SeqCst), 1);
    assert_eq!(env.cache_files().len(), 1);
}

// ---- mirror ----

#[tokio::test]
async fn mirror_hit_by_file_name_makes_no_network_request() {
    let env = Env::new();
    let data = body(100_000, 7);
    let mirror = env.mirror();
    std::fs::write(mirror.join("debian.img"), &data).unwrap();
    let (port, count, _task) = tripwire().await;
    let store = env.store(Some(mirror.clone()));
    let s = spec(
        "os-image",
        &format!("https://127.0.0.1:{port}/dists/debian.img"),
        &sha(&data),
    );
    let a = store.fetch(&s, &no_progress).await.unwrap();
    assert_eq!(std::fs::read(&a.path).unwrap(), data);
    assert!(a.path.ends_with("/debian.img"));
    assert_eq!(a.source, s.source);
    assert_eq!(
        count.load(Ordering::SeqCst),
        0,
        "the mirror had it: no connection"
    );
    let fetched = env.events("artifact.fetched");
    let from = mirror.join("debian.img").display().to_string();
    assert!(
        fetched.iter().any(|e| e.message.contains(&from)),
        "{fetched:?}"
    );
    // The mirror's file is left alone.
    assert!(mirror.join("debian.img").exists());
}

#[tokio::test]
async fn mirror_hit_by_sha256() {
    let env = Env::new();
    let data = body(100_000, 8);
    let mirror = env.mirror();
    std::fs::write(mirror.join(sha(&data)), &data).unwrap();
    let (port, count, _task) = tripwire().await;
    let store = env.store(Some(mirror));
    let s = spec(
        "k3s",
        &format!("https://127.0.0.1:{port}/releases/k3s"),
        &sha(&data),
    );
    let a = store.fetch(&s, &no_progress).await.unwrap();
    assert_eq!(std::fs::read(&a.path).unwrap(), data);
    // Cached under the URL's file name, whichever mirror name it came from.
    assert!(
        a.path.ends_with(&format!("{}/k3s", sha(&data))),
        "{}",
        a.path
    );
    assert_eq!(count.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn bad_mirror_file_is_reported_and_skipped() {
    let env = Env::new();
    let data = Arc::new(body(100_000, 9));
    let mirror = env.mirror();
    let stale = mirror.join("os.img");
    std::fs::write(&stale, body(100_000, 10)).unwrap();

    // The stale file is skipped and the download is used.
    let srv = env.server(Behave::Serve(data.clone())).await;
    let store = env.store(Some(mirror.clone()));
    let s = spec("os-image", &srv.url("/os.img"), &sha(&data));
    let a = store.fetch(&s, &no_progress).await.unwrap();
    assert_eq!(std::fs::read(&a.path).unwrap(), *data);
    assert_eq!(srv.hits.load(Ordering::SeqCst), 1);
    let reports = env.events("artifact.mirror_mismatch");
    assert_eq!(reports.len(), 1, "{reports:?}");
    let msg = &reports[0].message;
    assert!(msg.contains(&stale.display().to_string()), "{msg}");
    assert!(msg.contains(&sha(&data)), "{msg}");
    assert!(stale.exists(), "a mirror file is the user's: never deleted");
    assert_eq!(env.cache_files(), vec![PathBuf::from(&a.path)]);

    // A bad file by name and a good one by sha256: the good one, no network.
    let other = body(50_000, 11);
    std::fs::write(mirror.join("k3s"), b"an older release").unwrap();
    std::fs::write(mirror.join(sha(&other)), &other).unwrap();
    let (port, count, _task) = tripwire().await;
    let s = spec(
        "k3s",
        &format!("https://127.0.0.1:{port}/k3s"),
        &sha(&other),
    );
    let b = store.fetch(&s, &no_progress).await.unwrap();
    assert_eq!(std::fs::read(&b.path).unwrap(), other);
    assert_eq!(count.load(Ordering::SeqCst), 0);
    assert_eq!(env.events("artifact.mirror_mismatch").len(), 2);
}

// ---- images ----

/// qemu-img, or a skip with the reason (a failure when the lab is required).
fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let required =
            std::env::var("HOMELAB_REQUIRE_LAB").is_ok_and(|v| !v.is_empty() && v != "0");
        assert!(
            !required,
            "qemu-img not found and HOMELAB_REQUIRE_LAB is set: install qemu-utils"
        );
        eprintln!("skipped: qemu-img not found (install qemu-utils to run this test)");
    }
    ok
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn fetch_local(store: &Store, name: &str, path: &Path) -> homelab::state::Artifact {
    let bytes = std::fs::read(path).unwrap();
    store
        .fetch(
            &spec(name, path.to_str().unwrap(), &sha(&bytes)),
            &no_progress,
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn qcow2_is_converted_once_to_raw_with_the_original_content() {
    if !have_qemu_img() {
        return;
    }
    let env = Env::new();
    // Raw content with data and holes, as a disk image has.
    let mut raw = vec![0u8; 2 << 20];
    raw[..300_000].copy_from_slice(&body(300_000, 12));
    raw[1_500_000..1_600_000].copy_from_slice(&body(100_000, 13));
    let raw_path = env.path("disk.raw");
    std::fs::write(&raw_path, &raw).unwrap();
    let q = env.path("debian.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw_path.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    let store = env.store(None);
    let fetched = fetch_local(&store, "os-image", &q).await;

    let (a, format) = servable_image(&store, &fetched).await.unwrap();
    assert_eq!(format, ImageFormat::Raw);
    assert_eq!(a.sha256, sha(&raw));
    assert_eq!(a.size, raw.len() as u64);
    assert_eq!(a.name, "os-image@raw");
    assert!(
        a.path.ends_with(&format!("{}/debian.raw", sha(&raw))),
        "{}",
        a.path
    );
    assert_eq!(std::fs::read(&a.path).unwrap(), raw);
    assert_eq!(
        std::fs::metadata(&a.path).unwrap().permissions().mode() & 0o777,
        0o644
    );
    // No temp file left: the qcow2 and its raw.
    assert_eq!(env.cache_files().len(), 2, "{:?}", env.cache_files());

    // Second call: the cached conversion, not a new one.
    let ino = std::fs::metadata(&a.path).unwrap().ino();
    let (b, _) = servable_image(&store, &fetched).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(std::fs::metadata(&b.path).unwrap().ino(), ino);
    // Also from a new Store (a restarted daemon).
    let (c, _) = servable_image(&env.store(None), &fetched).await.unwrap();
    assert_eq!(a, c);
}

#[tokio::test]
async fn empty_qcow2_converts_to_zeros() {
    if !have_qemu_img() {
        return;
    }
    let env = Env::new();
    let q = env.path("empty.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "1M"]);
    let store = env.store(None);
    let fetched = fetch_local(&store, "blank", &q).await;
    let (a, format) = servable_image(&store, &fetched).await.unwrap();
    assert_eq!(format, ImageFormat::Raw);
    assert_eq!(a.sha256, sha(&vec![0u8; 1 << 20]));
}

#[tokio::test]
async fn qcow2_with_a_backing_file_is_refused() {
    if !have_qemu_img() {
        return;
    }
    let env = Env::new();
    let base = env.path("secret.raw");
    std::fs::write(&base, vec![b's'; 1 << 20]).unwrap();
    let q = env.path("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        q.to_str().unwrap(),
    ]);
    let store = env.store(None);
    let fetched = fetch_local(&store, "os-image", &q).await;
    let err = servable_image(&store, &fetched).await.unwrap_err();
    assert!(format!("{err:#}").contains("backing file"), "{err:#}");
    assert_eq!(env.cache_files().len(), 1, "{:?}", env.cache_files());
}

#[tokio::test]
async fn compressed_and_raw_images_are_served_as_they_are() {
    use std::io::Write;
    let env = Env::new();
    let store = env.store(None);
    let raw = body(10_000, 14);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
    xz.write_all(&raw).unwrap();
    let cases = [
        ("os.img", raw.clone(), ImageFormat::Raw),
        ("os.img.gz", gz.finish().unwrap(), ImageFormat::Gzip),
        ("os.img.xz", xz.finish().unwrap(), ImageFormat::Xz),
        (
            "os.img.zst",
            zstd::encode_all(&raw[..], 1).unwrap(),
            ImageFormat::Zstd,
        ),
    ];
    for (name, bytes, want) in cases {
        let p = env.path(name);
        std::fs::write(&p, &bytes).unwrap();
        let fetched = fetch_local(&store, name, &p).await;
        let (a, format) = servable_image(&store, &fetched).await.unwrap();
        assert_eq!(format, want, "{name}");
        assert_eq!(a, fetched, "{name}");
    }
}

// ---------------------------------------------------------------------------------------
// Checksums from published lists: fetched once, pinned, then verified by sha512.

fn sha512(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha512::digest(bytes))
}

#[tokio::test(flavor = "multi_thread")]
async fn checksum_list_is_fetched_once_pinned_shown_and_verifies_sha512() {
    use homelab::artifacts::pin;
    use homelab::inventory::{Algorithm, Checksum, Os};
    let env = Env::new();
    let data = Arc::new(body(200_000, 7));
    let img = env.server(Behave::Serve(data.clone())).await;
    let image_url = img.url("/cloud/latest/os.raw");
    let sums = format!(
        "{}  other.raw\n{} *os.raw\n",
        sha512(b"other"),
        sha512(&data)
    );
    let lists = env.server(Behave::Serve(Arc::new(sums.into_bytes()))).await;
    let list_url = lists.url("/cloud/latest/SHA512SUMS");
    let checksum = Checksum::List(list_url.clone());
    let os = Os {
        image: image_url.clone(),
        checksum: checksum.clone(),
        installer_kernel: None,
    };
    let mut plan = homelab::plan::Plan {
        checksums: pin::status(Some(&env.state), &os).unwrap(),
        ..Default::default()
    };
    assert!(plan.checksums[0].pin.is_none());
    assert!(
        plan.to_string().contains("os.raw  not pinned yet"),
        "{plan}"
    );

    let store = env.store(None);
    let (digest, pinned) = pin::resolve(&store, "os-image", &image_url, &checksum)
        .await
        .unwrap();
    assert_eq!(digest.algorithm, Algorithm::Sha512);
    assert_eq!(digest.hex, sha512(&data));
    assert_eq!(pinned.unwrap().list, list_url);
    assert_eq!(lists.hits.load(Ordering::SeqCst), 1);
    let a = store
        .fetch_digest("os-image", &image_url, &digest, &no_progress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&a.path).unwrap(), *data);
    assert_eq!(
        a.sha256,
        sha(&data),
        "cached under the verified bytes' sha256"
    );
    assert_eq!(img.hits.load(Ordering::SeqCst), 1);

    // Later runs (a new store on the same state): the pin, no list fetched,
    // the cached image, no download.
    let store = env.store(None);
    let (again, _) = pin::resolve(&store, "os-image", &image_url, &checksum)
        .await
        .unwrap();
    assert_eq!(again, digest);
    store
        .fetch_digest("os-image", &image_url, &again, &no_progress)
        .await
        .unwrap();
    assert_eq!(lists.hits.load(Ordering::SeqCst), 1);
    assert_eq!(img.hits.load(Ordering::SeqCst), 1);

    plan.checksums = pin::status(Some(&env.state), &os).unwrap();
    let shown = plan.to_string();
    assert!(
        shown.contains(&format!("os.raw  sha512 {}", sha512(&data))) && shown.contains(&list_url),
        "{shown}"
    );
    let json = serde_json::to_value(&plan).unwrap();
    assert_eq!(json["checksums"][0]["pin"]["digest"], sha512(&data));
    assert_eq!(env.events("artifact.pinned").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_that_does_not_match_its_pinned_sha512_is_refused() {
    use homelab::inventory::{Algorithm, Digest};
    let env = Env::new();
    let data = Arc::new(body(50_000, 3));
    let img = env.server(Behave::Serve(data.clone())).await;
    let store = env.store(None);
    let wrong = Digest {
        algorithm: Algorithm::Sha512,
        hex: sha512(b"what upstream published before"),
    };
    let err = store
        .fetch_digest("os-image", &img.url("/os.raw"), &wrong, &no_progress)
        .await
        .unwrap_err();
    match &err {
        FetchError::Sha512Mismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &wrong.hex);
            assert_eq!(actual, &sha512(&data));
        }
        other => panic!("{other:?}"),
    }
    assert!(env.cache_files().is_empty(), "{:?}", env.cache_files());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_http_checksum_list_is_never_fetched() {
    use homelab::artifacts::pin;
    use homelab::inventory::Checksum;
    let env = Env::new();
    let (port, tries, task) = tripwire().await;
    let store = env.store(None);
    let list = Checksum::List(format!("http://127.0.0.1:{port}/SHA512SUMS"));
    let err = pin::resolve(&store, "os-image", "https://127.0.0.1:1/os.raw", &list)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("only https"), "{err:#}");
    assert_eq!(tries.load(Ordering::SeqCst), 0);
    task.abort();
}
