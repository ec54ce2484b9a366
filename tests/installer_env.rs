//! The installer environment built from the distribution's real kernel
//! package: the kernel comes out, the wanted drivers come out with their
//! dependencies in load order, and the initramfs is a cpio the kernel can
//! unpack, with the (static) homelab binary as /init.

mod common;

use std::path::PathBuf;
use std::process::Command;

use homelab::install::initramfs;

fn kernel_deb() -> Option<(PathBuf, String)> {
    let a = match common::assets() {
        Ok(a) => a,
        Err(e) => {
            assert!(!common::require_lab(), "lab assets: {e}");
            eprintln!("SKIP: lab assets unavailable: {e}");
            return None;
        }
    };
    let sha = common::sha256_file(&a.deb);
    Some((a.deb, sha))
}

#[test]
fn installer_is_built_from_the_kernel_package_and_cached() {
    let Some((deb, sha)) = kernel_deb() else {
        return;
    };
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_homelab"));
    let cache = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let built = initramfs::build(cache.path(), &deb, &sha, &agent, &[]).unwrap();
    eprintln!(
        "built in {:?}: {} modules",
        t.elapsed(),
        built.modules.len()
    );
    assert!(built.release.ends_with("-amd64"), "{}", built.release);
    for m in [
        "virtio_net",
        "virtio_blk",
        "e1000e",
        "igc",
        "r8169",
        "nvme",
        "ahci",
        "ext4",
    ] {
        assert!(
            built.modules.iter().any(|x| x == m),
            "{m} missing from {:?}",
            built.modules
        );
    }
    // Dependencies come before their users.
    let pos = |m: &str| built.modules.iter().position(|x| x == m).unwrap();
    assert!(pos("jbd2") < pos("ext4") && pos("mbcache") < pos("ext4"));
    assert!(pos("net_failover") < pos("virtio_net"));

    // The real cpio tool reads it back: /init is byte-for-byte the agent.
    let list = Command::new("sh")
        .arg("-c")
        .arg(format!("zcat {} | cpio -t --quiet", built.initrd.display()))
        .output()
        .unwrap();
    assert!(list.status.success());
    let names = String::from_utf8_lossy(&list.stdout);
    for want in [
        "init",
        "dev/console",
        "etc/homelab/modules",
        "lib/modules/ext4.ko",
    ] {
        assert!(
            names.lines().any(|l| l == want),
            "{want} not in the initramfs"
        );
    }
    let unpack = tempfile::tempdir().unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && zcat {} | cpio -i --quiet init",
            unpack.path().display(),
            built.initrd.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::read(unpack.path().join("init")).unwrap(),
        std::fs::read(&agent).unwrap()
    );

    // Same inputs: the cached environment, not a rebuild.
    let again = initramfs::build(cache.path(), &deb, &sha, &agent, &[]).unwrap();
    assert_eq!(again, built);
    let mtime = |p: &PathBuf| std::fs::metadata(p).unwrap().modified().unwrap();
    assert_eq!(mtime(&again.initrd), mtime(&built.initrd));
}

#[test]
fn a_dynamic_agent_is_refused_with_the_reason() {
    let Some((deb, sha)) = kernel_deb() else {
        return;
    };
    let cache = tempfile::tempdir().unwrap();
    let err = initramfs::build(
        cache.path(),
        &deb,
        &sha,
        std::path::Path::new("/bin/sh"),
        &[],
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("dynamically linked"), "{err:#}");
}
