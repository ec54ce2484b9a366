//! scripts/deps.sh is the one place that installs what the lab and the tests
//! run. Its list names what actually runs (commands and files) rather than
//! packages, because a package can be registered while its command is gone
//! (apt removes a backported qemu-utils when it installs Debian's
//! qemu-system-x86). These tests keep that list complete and check that what
//! it names is there, so a missing install step fails here and not only on a
//! newcomer's first run.

use std::path::Path;
use std::process::Command;

fn deps_script() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deps.sh")).unwrap()
}

/// The `needs` entries of scripts/deps.sh: (command or path, package).
fn needs() -> Vec<(String, String)> {
    let script = deps_script();
    let start = script.find("needs=(").expect("deps.sh has a needs list");
    let end = start + script[start..].find("\n)").expect("the needs list ends");
    script[start..end]
        .lines()
        .skip(1)
        .filter_map(|l| {
            let quoted = l.trim().strip_prefix('"')?;
            let entry = &quoted[..quoted.find('"')?];
            let mut words = entry.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

/// Every `Need::Tool("x")` and `Need::File("y")` the lab tests declare.
fn test_needs() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut files = vec![];
    for entry in walk(&dir) {
        if entry.extension().is_some_and(|e| e == "rs") && !entry.ends_with("deps.rs") {
            files.push(std::fs::read_to_string(&entry).unwrap());
        }
    }
    let mut found = vec![];
    for text in files {
        for marker in ["Need::Tool(\"", "Need::File(\""] {
            let mut rest = text.as_str();
            while let Some(i) = rest.find(marker) {
                rest = &rest[i + marker.len()..];
                if let Some(end) = rest.find('"') {
                    found.push(rest[..end].to_string());
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_list_names_everything_the_lab_and_the_tests_run() {
    let needs = needs();
    assert!(needs.len() > 20, "parsed {needs:?}");
    let listed = |what: &str| needs.iter().any(|(w, _)| w == what);
    for (program, package) in homelab::lab::PROGRAMS {
        assert!(
            needs.iter().any(|(w, p)| w == program && p == package),
            "scripts/deps.sh does not list `{program} {package}`, which `homelab lab up` runs"
        );
    }
    // What the tests skip (or, as root in CI, fail) without.
    let unlisted: Vec<String> = test_needs()
        .into_iter()
        .filter(|n| !listed(n) && n != "/dev/net/tun")
        .collect();
    assert!(
        unlisted.is_empty(),
        "tests need {unlisted:?}, which scripts/deps.sh does not install or check"
    );
}

#[test]
fn what_the_list_names_is_there() {
    // As root (CI), scripts/test.sh ran deps.sh first: every need is met, or
    // the run already stopped. Elsewhere this only reports.
    let required = std::env::var("HOMELAB_REQUIRE_LAB").is_ok_and(|v| v == "1");
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deps.sh"))
        .arg("--check")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if required {
        assert!(out.status.success(), "scripts/deps.sh --check: {err}");
    } else if !out.status.success() {
        eprintln!("not all of the lab's needs are met here (not required): {err}");
    }
}

#[test]
fn a_need_that_is_gone_is_named_with_its_package() {
    // The check looks at the command, not at dpkg: with PATH emptied of
    // everything but bash's own directory, commands are reported missing
    // by name, with the package that brings them.
    let bash = which("bash");
    let tmp = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&bash, tmp.path().join("bash")).unwrap();
    for tool in ["awk", "sort", "tr", "id"] {
        std::os::unix::fs::symlink(which(tool), tmp.path().join(tool)).unwrap();
    }
    let out = Command::new(tmp.path().join("bash"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deps.sh"))
        .arg("--check")
        .env("PATH", tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("qemu-img"), "{err}");
    assert!(err.contains("qemu-utils"), "the package is named: {err}");
}

fn which(tool: &str) -> std::path::PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    panic!("{tool} not found");
}
