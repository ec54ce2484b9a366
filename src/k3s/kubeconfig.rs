//! `homelab kubeconfig`: the cluster's admin kubeconfig for the user. k3s
//! writes it on each server (0600) pointing at 127.0.0.1; the controller
//! reads it over SSH from a running server and rewrites the address to that
//! server's, which is in the certificate's `tls-san`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{members, Join};
use crate::inventory::Inventory;
use crate::state::{Stage, State};

/// Where k3s writes the admin kubeconfig on a server.
pub const REMOTE_PATH: &str = "/etc/rancher/k3s/k3s.yaml";

/// Pure: `server:` lines pointed at `host` (k3s writes 127.0.0.1).
pub fn rewrite(text: &str, host: &str) -> Result<String, String> {
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            match trimmed.strip_prefix("server: https://") {
                Some(rest) => {
                    found = true;
                    let port = rest.rsplit_once(':').map_or("6443", |(_, p)| p);
                    let indent = &line[..line.len() - trimmed.len()];
                    format!("{indent}server: https://{host}:{port}")
                }
                None => line.to_string(),
            }
        })
        .collect();
    if !found {
        return Err("the kubeconfig has no `server: https://...` line".into());
    }
    Ok(out.join("\n") + "\n")
}

/// Reads the kubeconfig from the first running server, rewrites it for that
/// server's address and writes it to `output` with mode 0600.
pub async fn write(state: &State, inventory: &Inventory, output: &Path) -> Result<String> {
    let recorded = state.bootstrap_server()?;
    let order = members(inventory, recorded.as_deref()).map_err(|e| anyhow::anyhow!(e))?;
    let running = |name: &str| {
        state
            .node(name)
            .ok()
            .flatten()
            .is_some_and(|r| r.stage == Stage::Running)
    };
    let Some(server) = order
        .iter()
        .filter(|m| !matches!(m.join, Join::Agent { .. }))
        .find(|m| running(&m.node))
        .and_then(|m| inventory.nodes.get(&m.node))
    else {
        bail!(
            "no k3s server is running yet; run `homelab up` and wait for a server to be `running`"
        );
    };
    let session = crate::install::reach::connect(state, server).await?;
    let out = session
        .exec_checked(&format!("cat {REMOTE_PATH}"), |_, _| {})
        .await?;
    let _ = session.close().await;
    let text = rewrite(&out.stdout, &server.ip.to_string())
        .map_err(|e| anyhow::anyhow!("{} on {}: {e}", REMOTE_PATH, server.name))?;
    let tmp = output.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, output).with_context(|| format!("writing {}", output.display()))?;
    Ok(server.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_address_is_rewritten_and_nothing_else() {
        let k3s = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: QUJD\n    server: https://127.0.0.1:6443\n  name: default\n";
        let out = rewrite(k3s, "10.0.0.11").unwrap();
        assert_eq!(out, k3s.replace("127.0.0.1", "10.0.0.11"));
        assert!(rewrite("apiVersion: v1\n", "10.0.0.11").is_err());
    }
}
