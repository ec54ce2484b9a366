//! One daemon per state dir: an exclusive `flock` on `daemon.lock`, held for the
//! daemon's lifetime and released by the kernel when the process dies (even on
//! `kill -9`), so a stale lock can never keep the next start out.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another homelab daemon (pid {pid}) is already running on state dir {dir}; \
         `homelab up` hands it the inventory, or stop it first (systemctl stop homelab)"
    )]
    Held { pid: String, dir: PathBuf },
    #[error("cannot open lock file {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Held while the daemon runs.
#[derive(Debug)]
pub struct DaemonLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl DaemonLock {
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join("daemon.lock")
    }

    /// Take the lock, or say who holds it.
    pub fn acquire(dir: &Path) -> Result<DaemonLock, LockError> {
        let path = Self::path_in(dir);
        let io = |error| LockError::Io {
            path: path.clone(),
            error,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut locked) => {
                locked.set_len(0).map_err(io)?;
                locked.seek(SeekFrom::Start(0)).map_err(io)?;
                write!(locked, "{}", std::process::id()).map_err(io)?;
                locked.flush().map_err(io)?;
                Ok(DaemonLock {
                    _file: locked,
                    path,
                })
            }
            Err((mut file, _)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                Err(LockError::Held {
                    pid: pid.trim().to_string(),
                    dir: dir.to_path_buf(),
                })
            }
        }
    }

    /// The pid of the running daemon, if one holds the lock.
    pub fn holder(dir: &Path) -> Option<String> {
        match DaemonLock::acquire(dir) {
            Err(LockError::Held { pid, .. }) => Some(pid),
            _ => None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
