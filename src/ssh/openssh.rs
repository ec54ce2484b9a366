//! `homelab ssh NODE`: an interactive shell (or one command) on a node with
//! the system's OpenSSH client, trusting only the host key pinned at install
//! and logging in with the controller's key. The pins are written as a
//! known_hosts file in the state dir, so OpenSSH checks them itself
//! (`StrictHostKeyChecking=yes`: a different key is refused, never learned).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::key::KEY_SECRET;
use crate::state::{self, State};

/// The known_hosts file homelab keeps in the state dir.
pub fn known_hosts_path(state_dir: &Path) -> PathBuf {
    state_dir.join("known_hosts")
}

/// Pure: known_hosts lines for (address, pinned key) pairs.
pub fn known_hosts(pins: &[(String, String)]) -> String {
    pins.iter()
        .map(|(addr, key)| {
            let mut words = key.split_whitespace();
            let algorithm = words.next().unwrap_or_default();
            let data = words.next().unwrap_or_default();
            format!("{addr} {algorithm} {data}\n")
        })
        .collect()
}

/// Rewrites the known_hosts file from every pinned node in the state.
pub fn write_known_hosts(st: &State) -> Result<PathBuf> {
    let mut pins = Vec::new();
    for rec in st.nodes()? {
        if let Some(key) = st.host_key(&rec.name)? {
            pins.push((rec.ip.clone(), key));
        }
    }
    let path = known_hosts_path(st.dir());
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, known_hosts(&pins))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Pure: OpenSSH's arguments to reach `ip` as `user` with these files.
pub fn ssh_args(
    ip: &str,
    user: &str,
    key: &Path,
    known_hosts: &Path,
    command: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-i".into(),
        key.display().to_string(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        format!("UserKnownHostsFile={}", known_hosts.display()),
        "-o".into(),
        "GlobalKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "ConnectTimeout=10".into(),
        format!("{user}@{ip}"),
    ];
    // Everything after the destination is the remote command.
    args.extend(command.iter().cloned());
    args
}

/// What `homelab ssh NODE` runs: `ssh` with its arguments, after checking
/// the node exists and has a pinned key, and refreshing known_hosts.
pub fn command_for(
    state_dir: &Path,
    node: &str,
    command: &[String],
) -> Result<std::process::Command> {
    let st = State::open_existing(state_dir)?.with_context(|| {
        format!(
            "no controller state in {}; run `homelab up` first",
            state_dir.display()
        )
    })?;
    let rec = st
        .node(node)?
        .with_context(|| format!("no node named `{node}`; see `homelab status`"))?;
    if st.host_key(node)?.is_none() {
        anyhow::bail!(
            "{node} has no pinned host key (stage {}): homelab has not installed it, so it cannot \
             tell the node from an impostor",
            rec.stage
        );
    }
    let known = write_known_hosts(&st)?;
    let key = state::secret_path(state_dir, KEY_SECRET)?;
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(ssh_args(
        &rec.ip,
        crate::install::reach::LOGIN_USER,
        &key,
        &known,
        command,
    ));
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_lines_drop_the_comment() {
        let text = known_hosts(&[
            (
                "10.0.0.11".into(),
                "ssh-ed25519 AAAAC3Nza node1@install".into(),
            ),
            ("10.0.0.12".into(), "ssh-ed25519 AAAAC3Nzb".into()),
        ]);
        assert_eq!(
            text,
            "10.0.0.11 ssh-ed25519 AAAAC3Nza\n10.0.0.12 ssh-ed25519 AAAAC3Nzb\n"
        );
    }

    #[test]
    fn strict_checking_against_our_file_only() {
        let args = ssh_args(
            "10.0.0.11",
            "root",
            Path::new("/s/secrets/ssh_ed25519"),
            Path::new("/s/known_hosts"),
            &["uname".into(), "-a".into()],
        );
        let joined = args.join(" ");
        assert!(joined.contains("StrictHostKeyChecking=yes"));
        assert!(joined.contains("UserKnownHostsFile=/s/known_hosts"));
        assert!(joined.contains("GlobalKnownHostsFile=/dev/null"));
        assert!(joined.ends_with("root@10.0.0.11 uname -a"), "{joined}");
        let shell = ssh_args("h", "root", Path::new("k"), Path::new("kh"), &[]);
        assert_eq!(shell.last().unwrap(), "root@h");
    }
}
