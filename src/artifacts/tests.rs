use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Mutex;

use super::fetch::{error_chain, Throttle};
use super::*;

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn spec(name: &str, source: &str, sha256: &str) -> Spec {
    Spec {
        name: name.into(),
        source: source.into(),
        sha256: sha256.into(),
    }
}

fn no_progress(_: u64, _: Option<u64>) {}

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    state: State,
    store: Store,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let state = State::open(&root.join("state")).unwrap();
    let store = Store::new(&state, None, None).unwrap();
    Env {
        _tmp: tmp,
        root,
        state,
        store,
    }
}

/// Every file under `dir`, recursively (temp files included).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
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

#[test]
fn detect_format_by_magic() {
    assert_eq!(detect_format(&[0x1f, 0x8b, 8, 0]), ImageFormat::Gzip);
    assert_eq!(
        detect_format(&[0xfd, b'7', b'z', b'X', b'Z', 0, 0, 4]),
        ImageFormat::Xz
    );
    assert_eq!(
        detect_format(&[0x28, 0xb5, 0x2f, 0xfd, 0x24]),
        ImageFormat::Zstd
    );
    assert_eq!(detect_format(b"QFI\xfb\0\0\0\x03"), ImageFormat::Qcow2);
    // An MBR, an empty file, and a truncated magic are all raw.
    let mut mbr = vec![0u8; 512];
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    assert_eq!(detect_format(&mbr), ImageFormat::Raw);
    assert_eq!(detect_format(&[]), ImageFormat::Raw);
    assert_eq!(detect_format(&[0xfd, b'7', b'z']), ImageFormat::Raw);
    assert_eq!(detect_format(b"QFI"), ImageFormat::Raw);
}

#[test]
fn detect_format_matches_real_compressors() {
    use std::io::Write;
    let data = b"hello disk".repeat(100);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&data).unwrap();
    assert_eq!(detect_format(&gz.finish().unwrap()), ImageFormat::Gzip);
    let zst = zstd::encode_all(&data[..], 1).unwrap();
    assert_eq!(detect_format(&zst), ImageFormat::Zstd);
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
    xz.write_all(&data).unwrap();
    assert_eq!(detect_format(&xz.finish().unwrap()), ImageFormat::Xz);
}

#[test]
fn spec_validation() {
    let good = sha(b"x");
    assert!(validate_spec(&spec("a", "/x", &good)).is_ok());
    for bad in [
        &good.to_uppercase(),
        &good[..63],
        "",
        &format!("{}g", &good[..63]),
    ] {
        let e = validate_spec(&spec("a", "/x", bad)).unwrap_err();
        assert!(matches!(e, FetchError::InvalidSpec { .. }), "{e}");
        assert!(e.to_string().contains("64 lower-case hex"), "{e}");
    }
    assert!(matches!(
        validate_spec(&spec(" ", "/x", &good)),
        Err(FetchError::InvalidSpec { .. })
    ));
    let s = |src: &str| Source::parse(&spec("a", src, &good));
    assert!(matches!(s("/srv/os.img"), Ok(Source::Local(_))));
    assert!(matches!(
        s("https://example.invalid/os.img"),
        Ok(Source::Https(_))
    ));
    let e = s("http://example.invalid/os.img").err().unwrap();
    assert!(matches!(e, FetchError::InsecureUrl { .. }));
    assert!(e.to_string().contains("plain http"), "{e}");
    assert!(matches!(
        s("HTTP://x/y"),
        Err(FetchError::InsecureUrl { .. })
    ));
    assert!(matches!(s("os.img"), Err(FetchError::InvalidSpec { .. })));
    assert!(matches!(
        s("ftp://x/os.img"),
        Err(FetchError::InvalidSpec { .. })
    ));
}

#[test]
fn cache_file_names_are_safe() {
    let h = sha(b"x");
    let n = |src: &str| cache_file_name(&spec("os-image", src, &h));
    assert_eq!(
        n("https://h.invalid/a/debian.qcow2?sig=1#f"),
        "debian.qcow2"
    );
    assert_eq!(n("/srv/images/k3s"), "k3s");
    assert_eq!(n("https://h.invalid/dir/"), "os-image");
    assert_eq!(n("https://h.invalid/a/..%2f..%2fetc"), "os-image");
    assert_eq!(n("https://h.invalid/.tmp-1-2-x"), "os-image");
    assert_eq!(
        cache_file_name(&spec("../x", "https://h.invalid/", &h)),
        "artifact"
    );
}

#[test]
fn error_chain_keeps_the_cause_once() {
    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }
    let e = E(
        "error sending request",
        Some(Box::new(E("refused", Some(Box::new(E("refused", None)))))),
    );
    assert_eq!(error_chain(&e), "error sending request: refused");
}

#[test]
fn throttle_limits_the_rate_but_always_reports_the_end() {
    let calls = Mutex::new(Vec::new());
    let f = |d: u64, t: Option<u64>| calls.lock().unwrap().push((d, t));
    let mut t = Throttle::new(&f);
    for i in 0..1000 {
        t.tick(i, Some(1000));
    }
    t.finish(1000, Some(1000));
    let calls = calls.into_inner().unwrap();
    assert_eq!(calls.first(), Some(&(0, Some(1000))));
    assert_eq!(calls.last(), Some(&(1000, Some(1000))));
    assert!(calls.len() <= 3, "{calls:?}");
}

#[tokio::test]
async fn local_path_is_fetched_verified_and_cached() {
    let e = env();
    let body = b"kernel bytes ".repeat(10_000);
    let src = e.root.join("vmlinuz");
    fs::write(&src, &body).unwrap();
    let s = spec("kernel", src.to_str().unwrap(), &sha(&body));

    assert!(e.store.cached(&s).unwrap().is_none());
    let a = e.store.fetch(&s, &no_progress).await.unwrap();
    let want = e.store.dir().join(&s.sha256).join("vmlinuz");
    assert_eq!(Path::new(&a.path), want);
    assert_eq!(fs::read(&want).unwrap(), body);
    assert_eq!(a.size, body.len() as u64);
    assert_eq!(a.sha256, s.sha256);
    assert_eq!(a.source, s.source);
    assert_eq!(e.state.artifact("kernel").unwrap().as_ref(), Some(&a));
    assert_eq!(e.store.cached(&s).unwrap().as_ref(), Some(&a));

    // Modes: the file is world-readable (served over HTTP), the cache dir 0755.
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&want), 0o644);
    assert_eq!(mode(e.store.dir()), 0o755);
    assert_eq!(mode(&e.store.dir().join(&s.sha256)), 0o755);
    assert_eq!(mode(e.state.dir()), 0o700);

    // Second fetch: a cache hit, the same file untouched (no copy, no new row).
    let ino = fs::metadata(&want).unwrap().ino();
    fs::remove_file(&src).unwrap(); // the source is not even needed any more
    let b = e.store.fetch(&s, &no_progress).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(fs::metadata(&want).unwrap().ino(), ino);
    assert_eq!(files_under(e.store.dir()), vec![want]);
}

#[tokio::test]
async fn changed_cached_file_is_detected_and_fetched_again() {
    let e = env();
    let body = vec![7u8; 100_000];
    let src = e.root.join("os.img");
    fs::write(&src, &body).unwrap();
    let s = spec("os-image", src.to_str().unwrap(), &sha(&body));
    let a = e.store.fetch(&s, &no_progress).await.unwrap();

    // Same size, other bytes: not trusted any more, and replaced by a good copy.
    let mut bad = body.clone();
    bad[500] = 8;
    fs::write(&a.path, &bad).unwrap();
    assert!(e.store.cached(&s).unwrap().is_none());
    let b = e.store.fetch(&s, &no_progress).await.unwrap();
    assert_eq!(fs::read(&b.path).unwrap(), body);
    assert!(b.fetched_ms >= a.fetched_ms);
    assert_eq!(e.store.cached(&s).unwrap().as_ref(), Some(&b));
    let corrupt = e.state.last_events(10, None).unwrap();
    assert!(
        corrupt.iter().any(|ev| ev.kind == "artifact.cache_corrupt"),
        "{corrupt:?}"
    );

    // Truncated: size differs, fetched again.
    fs::write(&b.path, &body[..10]).unwrap();
    assert!(e.store.cached(&s).unwrap().is_none());
    let c = e.store.fetch(&s, &no_progress).await.unwrap();
    assert_eq!(fs::read(&c.path).unwrap(), body);

    // Deleted: fetched again.
    fs::remove_file(&c.path).unwrap();
    assert!(e.store.cached(&s).unwrap().is_none());
    let d = e.store.fetch(&s, &no_progress).await.unwrap();
    assert_eq!(fs::read(&d.path).unwrap(), body);
}

#[tokio::test]
async fn touched_cached_file_is_rehashed_not_copied() {
    let e = env();
    let body = vec![3u8; 50_000];
    let src = e.root.join("os.img");
    fs::write(&src, &body).unwrap();
    let s = spec("os-image", src.to_str().unwrap(), &sha(&body));
    let a = e.store.fetch(&s, &no_progress).await.unwrap();
    let ino = fs::metadata(&a.path).unwrap().ino();

    // Only the mtime changed: not trusted by `cached`, but `fetch` hashes it,
    // finds it good and keeps the same file (the source is gone, so no copy).
    let f = fs::File::options().write(true).open(&a.path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    drop(f);
    fs::remove_file(&src).unwrap();
    assert!(e.store.cached(&s).unwrap().is_none());
    let b = e.store.fetch(&s, &no_progress).await.unwrap();
    assert_eq!(fs::metadata(&b.path).unwrap().ino(), ino);
    assert_eq!(e.store.cached(&s).unwrap().as_ref(), Some(&b));
}

#[tokio::test]
async fn lost_database_row_is_recovered_by_hashing() {
    let e = env();
    let body = b"k3s".repeat(1000);
    let src = e.root.join("k3s");
    fs::write(&src, &body).unwrap();
    let s = spec("k3s", src.to_str().unwrap(), &sha(&body));
    let a = e.store.fetch(&s, &no_progress).await.unwrap();
    fs::remove_file(&src).unwrap();
    // Another name for the same bytes and file name finds the cached file.
    let s2 = Spec {
        name: "k3s-again".into(),
        ..s.clone()
    };
    let b = e.store.fetch(&s2, &no_progress).await.unwrap();
    assert_eq!(a.path, b.path);
    assert_eq!(b.name, "k3s-again");
}

#[tokio::test]
async fn local_checksum_mismatch_discards_everything() {
    let e = env();
    let src = e.root.join("os.img");
    fs::write(&src, b"the wrong image").unwrap();
    let expected = sha(b"the right image");
    let s = spec("os-image", src.to_str().unwrap(), &expected);
    let err = e.store.fetch(&s, &no_progress).await.unwrap_err();
    let msg = err.to_string();
    match &err {
        FetchError::ChecksumMismatch {
            origin,
            expected: exp,
            actual,
        } => {
            assert_eq!(origin, src.to_str().unwrap());
            assert_eq!(exp, &expected);
            assert_eq!(actual, &sha(b"the wrong image"));
        }
        other => panic!("{other:?}"),
    }
    for part in [
        src.to_str().unwrap(),
        &expected,
        &sha(b"the wrong image"),
        "discarded",
        "check the sha256 in inventory.toml: the file at the source may have changed",
    ] {
        assert!(
            msg.to_lowercase().contains(&part.to_lowercase()),
            "{part}: {msg}"
        );
    }
    assert!(files_under(e.store.dir()).is_empty());
    assert!(e.state.artifact("os-image").unwrap().is_none());
}

#[tokio::test]
async fn missing_local_path_is_named() {
    let e = env();
    let src = e.root.join("nowhere/os.img");
    let s = spec("os-image", src.to_str().unwrap(), &sha(b""));
    let err = e.store.fetch(&s, &no_progress).await.unwrap_err();
    assert!(matches!(err, FetchError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains(src.to_str().unwrap()), "{err}");
    assert!(files_under(e.store.dir()).is_empty());
}

#[tokio::test]
async fn local_copy_reports_progress_to_the_total() {
    let e = env();
    let body = vec![1u8; 3 << 20];
    let src = e.root.join("big.img");
    fs::write(&src, &body).unwrap();
    let s = spec("big", src.to_str().unwrap(), &sha(&body));
    let seen = Mutex::new(Vec::new());
    let p = |d: u64, t: Option<u64>| seen.lock().unwrap().push((d, t));
    e.store.fetch(&s, &p).await.unwrap();
    let seen = seen.into_inner().unwrap();
    assert_eq!(
        seen.last(),
        Some(&(body.len() as u64, Some(body.len() as u64)))
    );
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
}

#[test]
fn stale_temp_files_of_dead_processes_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let state = State::open(&tmp.path().join("state")).unwrap();
    let dir = state.dir().join(CACHE_DIR);
    fs::create_dir_all(&dir).unwrap();
    // pid 0 never names a live process; our own pid does.
    let dead = dir.join(format!("{TEMP_PREFIX}0-1-x"));
    let ours = dir.join(format!("{TEMP_PREFIX}{}-1-x", std::process::id()));
    fs::write(&dead, b"x").unwrap();
    fs::write(&ours, b"x").unwrap();
    Store::new(&state, None, None).unwrap();
    assert!(!dead.exists());
    assert!(ours.exists());
}

#[test]
fn bad_mirror_or_ca_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let state = State::open(&tmp.path().join("state")).unwrap();
    let e = Store::new(&state, Some(tmp.path().join("no-mirror")), None).unwrap_err();
    assert!(format!("{e:#}").contains("no-mirror"), "{e:#}");
    let ca = tmp.path().join("ca.pem");
    fs::write(&ca, "not a certificate\n").unwrap();
    let e = Store::new(&state, None, Some(ca)).unwrap_err();
    assert!(format!("{e:#}").contains("ca.pem"), "{e:#}");
}
